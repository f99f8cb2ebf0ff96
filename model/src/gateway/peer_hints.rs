//! Which peer gateways go on relaying past the hints they were given.
//!
//! The authority answers a peer's relay past the peer's limit with `peer_limited` and a time to
//! come again; the peer's gateway passes it on, and its device holds that conversation until
//! then. An honest peer therefore sends a refused sender's conversation again only at its hint
//! (what was already on its way when the refusal was sent still arrives, shortly after it). A
//! relay for the same sender and conversation that arrives well after a refusal but before its
//! hint shows a peer that ignores its hints: only then does the authority pause the reading of
//! its link, since a pause also holds back the peer's acknowledgements and copies, which would
//! slow an honest peer's recovery from a backlog (measured: `federation-peer-limit`, seeds 1–20,
//! recovery median 6.3 s without pauses, 8.2 s with a 200 ms pause at every refusal).
//!
//! Kept in memory only (a restart forgets the hints, which costs at most one missed pause) and
//! bounded: past [`HINTS_MAX`] open hints, expired ones are dropped, and if none has expired
//! new ones are not recorded.

use core::time::Duration;
use std::collections::BTreeMap;

use crate::ids::{ConversationId, DeviceId};
use crate::time::Instant;

/// Most hints remembered at once, over every peer.
pub const HINTS_MAX: usize = 16_384;

/// How long after a refusal a relay for the same sender and conversation may still be one that
/// was on its way before the refusal reached the device: the link's round trip and the
/// go-back of a backlog flowing after a link came back.
pub const HINT_GRACE: Duration = Duration::from_secs(5);

/// When a refusal was given and the time it promised.
#[derive(Clone, Copy, Debug)]
struct Hint {
    given: Instant,
    promised: Instant,
}

/// The open hints given to peers' relays, by peer, sender and conversation.
#[derive(Debug, Default)]
pub struct PeerHints {
    hints: BTreeMap<(String, DeviceId, ConversationId), Hint>,
    ignored: u64,
}

impl PeerHints {
    /// A relay from `peer` for `sender` in `conversation` was refused at `now`, told to come
    /// again after `retry_after`. True if it came while an earlier hint for the same sender and
    /// conversation still held, and later than [`HINT_GRACE`] after that hint was given: the
    /// peer ignores its hints.
    pub fn refused(
        &mut self,
        now: Instant,
        peer: &str,
        sender: DeviceId,
        conversation: ConversationId,
        retry_after: Duration,
    ) -> bool {
        let key = (peer.to_string(), sender, conversation);
        let ignored = self
            .hints
            .get(&key)
            .is_some_and(|h| now < h.promised && now.saturating_since(h.given) > HINT_GRACE);
        if ignored {
            self.ignored += 1;
        }
        let hint = Hint {
            given: now,
            promised: now + retry_after,
        };
        if self.hints.len() >= HINTS_MAX && !self.hints.contains_key(&key) {
            self.hints.retain(|_, h| h.promised > now);
        }
        if self.hints.len() < HINTS_MAX || self.hints.contains_key(&key) {
            self.hints.insert(key, hint);
        }
        debug_assert!(self.hints.len() <= HINTS_MAX);
        ignored
    }

    /// How many relays came before their hint (since this gateway started).
    pub fn ignored(&self) -> u64 {
        self.ignored
    }

    /// How many hints are remembered.
    pub fn len(&self) -> usize {
        self.hints.len()
    }

    /// True if no hint is remembered.
    pub fn is_empty(&self) -> bool {
        self.hints.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONV: ConversationId = ConversationId(7);
    const DEVICE: DeviceId = DeviceId(1);
    const T0: Instant = Instant(1_000_000_000);

    fn at(seconds: u64) -> Instant {
        T0 + Duration::from_secs(seconds)
    }

    #[test]
    fn a_relay_at_its_hint_or_on_its_way_before_the_refusal_is_honest() {
        let mut hints = PeerHints::default();
        let wait = Duration::from_secs(30);
        assert!(!hints.refused(T0, "b.example", DEVICE, CONV, wait));
        // Already on its way: within the grace.
        assert!(!hints.refused(at(3), "b.example", DEVICE, CONV, wait));
        // At its hint (the one given at 3 s), refused again as the window comes back.
        assert!(!hints.refused(at(33), "b.example", DEVICE, CONV, wait));
        assert_eq!(hints.ignored(), 0);
    }

    #[test]
    fn a_relay_well_after_its_refusal_and_before_its_hint_is_ignoring_it() {
        let mut hints = PeerHints::default();
        let wait = Duration::from_secs(30);
        assert!(!hints.refused(T0, "b.example", DEVICE, CONV, wait));
        assert!(hints.refused(at(6), "b.example", DEVICE, CONV, wait));
        // Another sender, conversation or peer has hints of its own.
        assert!(!hints.refused(at(12), "b.example", DeviceId(2), CONV, wait));
        assert!(!hints.refused(at(12), "b.example", DEVICE, ConversationId(8), wait));
        assert!(!hints.refused(at(12), "c.example", DEVICE, CONV, wait));
        assert!(hints.refused(at(12), "b.example", DEVICE, CONV, wait));
        assert_eq!(hints.ignored(), 2);
    }

    #[test]
    fn the_hints_are_bounded_and_expired_ones_make_room() {
        let mut hints = PeerHints::default();
        let wait = Duration::from_secs(1);
        for i in 0..HINTS_MAX as u128 {
            hints.refused(T0, "b.example", DeviceId(i), CONV, wait);
        }
        assert_eq!(hints.len(), HINTS_MAX);
        // Full, nothing expired: a new hint is not kept, the old ones are.
        hints.refused(T0, "b.example", DeviceId(u128::MAX), CONV, wait);
        assert_eq!(hints.len(), HINTS_MAX);
        // Once they expired, they make room.
        hints.refused(at(2), "b.example", DeviceId(u128::MAX), CONV, wait);
        assert_eq!(hints.len(), 1);
    }
}
