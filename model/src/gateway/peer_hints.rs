//! Which peer gateways go on relaying past the hints they were given, and the hints this
//! gateway's own devices were given by other domains' authorities.
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
//! A member gateway keeps the hints its devices were given ([`HeldHints`]) and refuses a
//! device's message to that conversation before its time itself, with the time left, rather
//! than relaying it: so one device that ignores its hints (a modified client) never makes its
//! whole gateway look like a peer that ignores them, and an honest gateway's link is never
//! paused. What a device sent before it heard of its hint is refused here the same way, and
//! sent again at the time, as the authority's own refusal would have it.
//!
//! Kept in memory only (a restart forgets the hints, which costs at most one missed pause or
//! one relay refused at the authority rather than here) and bounded: past [`HINTS_MAX`] open
//! hints, expired ones are dropped, and if none has expired new ones are not recorded.

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

/// How often the operator is told that a peer ignores its hints, while it lasts.
pub const REPORT_EVERY: Duration = Duration::from_secs(60);

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
    /// When the operator was last told of each peer (peers are configured: bounded).
    reported: BTreeMap<String, Instant>,
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

    /// True if the operator should hear now that `peer` ignores its hints: at most once per
    /// [`REPORT_EVERY`] per peer.
    pub fn report_due(&mut self, now: Instant, peer: &str) -> bool {
        let due = self
            .reported
            .get(peer)
            .is_none_or(|last| now.saturating_since(*last) >= REPORT_EVERY);
        if due {
            self.reported.insert(peer.to_string(), now);
        }
        due
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

/// The hints other domains' authorities gave this gateway's devices, by device and
/// conversation: until when each must not relay there.
#[derive(Debug, Default)]
pub struct HeldHints {
    until: BTreeMap<(DeviceId, ConversationId), Instant>,
}

impl HeldHints {
    /// The authority refused `device`'s relay in `conversation` at `now`, to come again after
    /// `wait`.
    pub fn hold(
        &mut self,
        now: Instant,
        device: DeviceId,
        conversation: ConversationId,
        wait: Duration,
    ) {
        let key = (device, conversation);
        if self.until.len() >= HINTS_MAX && !self.until.contains_key(&key) {
            self.until.retain(|_, until| *until > now);
            if self.until.len() >= HINTS_MAX {
                return;
            }
        }
        let until = now + wait;
        let held = self.until.entry(key).or_insert(until);
        *held = (*held).max(until);
        debug_assert!(self.until.len() <= HINTS_MAX);
    }

    /// How long `device` must still wait before its next relay in `conversation` (`None`:
    /// it may relay now).
    pub fn wait(
        &self,
        now: Instant,
        device: DeviceId,
        conversation: ConversationId,
    ) -> Option<Duration> {
        let until = *self.until.get(&(device, conversation))?;
        (until > now).then(|| until.saturating_since(now))
    }

    /// How many hints are held.
    pub fn len(&self) -> usize {
        self.until.len()
    }

    /// True if no hint is held.
    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
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
    }

    #[test]
    fn a_device_waits_until_the_latest_hint_of_its_conversation_only() {
        let mut held = HeldHints::default();
        assert_eq!(held.wait(T0, DEVICE, CONV), None);
        held.hold(T0, DEVICE, CONV, Duration::from_secs(10));
        held.hold(at(1), DEVICE, CONV, Duration::from_secs(3));
        assert_eq!(held.wait(at(4), DEVICE, CONV), Some(Duration::from_secs(6)));
        assert_eq!(held.wait(at(4), DeviceId(2), CONV), None);
        assert_eq!(held.wait(at(4), DEVICE, ConversationId(8)), None);
        assert_eq!(held.wait(at(10), DEVICE, CONV), None);
        // Bounded: full of open hints, a new one is not held; expired ones make room.
        for i in 0..HINTS_MAX as u128 {
            held.hold(at(20), DeviceId(100 + i), CONV, Duration::from_secs(1));
        }
        assert_eq!(held.len(), HINTS_MAX);
        held.hold(at(20), DeviceId(u128::MAX), CONV, Duration::from_secs(1));
        assert_eq!(held.wait(at(20), DeviceId(u128::MAX), CONV), None);
        held.hold(at(22), DeviceId(u128::MAX), CONV, Duration::from_secs(1));
        assert_eq!(held.len(), 1);
    }

    #[test]
    fn the_operator_hears_of_a_peer_ignoring_its_hints_once_a_minute() {
        let mut hints = PeerHints::default();
        assert!(hints.report_due(T0, "b.example"));
        assert!(!hints.report_due(at(59), "b.example"));
        assert!(hints.report_due(at(1), "c.example"));
        assert!(hints.report_due(at(60), "b.example"));
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
