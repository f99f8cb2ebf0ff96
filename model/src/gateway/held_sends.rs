//! Messages that came ahead of their sender's order, kept until the gap before them fills.
//!
//! A device pipelines its messages to a conversation, each naming the one it comes after (see
//! `sender_order`). When one is lost on the way (the simulator's network loses frames; a real
//! connection that drops loses what was in flight), every later one arrives out of order.
//! Refusing them all made the device send its whole backlog again for one loss: on a slow
//! uplink that backlog never drained (plain swarm seed 502431).
//!
//! So the gateway keeps a few such messages per sender, in memory, keyed by the message they
//! come after. It tells the device once per gap (`sender_out_of_order` with `held`), and the
//! device sends again only what waits before the held message. When a message is sequenced,
//! the one held after it is taken through the whole acceptance path as if it had just arrived
//! (rate limits, group admission, handover all apply then), and so on down the chain.
//!
//! Nothing held is acknowledged, so nothing is lost by forgetting: a device's holds go when its
//! session ends or is replaced, and all of them when the gateway restarts; the device's outbox
//! still has every one and sends it again. Bounded per sender ([`HELD_PER_SENDER_MAX`]) and in
//! all ([`HELD_BYTES_MAX`]); past either, a message is refused out of order as before.

use std::collections::{BTreeMap, BTreeSet};

use core::time::Duration;

use crate::ids::{ConnectionId, ConversationId, DeviceId, MsgId};
use crate::time::Instant;
use crate::wire::payload::Send;

/// The most messages held for one device in one conversation: a little more than the pace a
/// device keeps after a refusal (`node::PACING_START`), so that a paced window fits.
pub const HELD_PER_SENDER_MAX: usize = 64;

/// The most body bytes held in all, across devices: 16 MiB (a held message is at most a frame).
pub const HELD_BYTES_MAX: usize = 16 << 20;

/// A message held until the one it comes after is sequenced.
#[derive(Clone, Debug)]
pub struct HeldSend {
    /// The session it came on; it is answered there when taken.
    pub conn: ConnectionId,
    /// The message as it came.
    pub send: Send,
}

/// What holding a message did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holding {
    /// Held, and the device is to be told of gaps, each as (the held message at its head, the
    /// message it comes after, which has not arrived): of the gap before this message, when
    /// what it comes after is neither sequenced nor held (a new gap); or of every gap of this
    /// sender, when the last was told more than [`TELL_AGAIN_AFTER`] ago and they are still
    /// open (what the device sent again was lost too, or is slow).
    Tell(Vec<(MsgId, MsgId)>),
    /// Held behind a gap the device was told of lately.
    Quiet,
    /// Not held: the sender's or the gateway's bound is reached. Refuse it out of order.
    Full,
}

/// A gap still open this long after the device was told of it is told again with the next
/// message held behind it (the device's answer was lost, or is slow).
pub const TELL_AGAIN_AFTER: Duration = Duration::from_millis(500);

/// What holding did, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct HeldSendStats {
    /// Messages held (copies that replaced a held one included).
    pub held: u64,
    /// Times a device was told of a gap (once per gap, and again while it stays open).
    pub gaps_told: u64,
    /// Held messages taken once the message before them was sequenced.
    pub taken: u64,
    /// Messages refused out of order because a bound was reached.
    pub full: u64,
    /// Held messages let go: the one before them was refused, or their session ended.
    pub let_go: u64,
}

/// One sender's held messages in one conversation.
#[derive(Debug)]
struct Sender {
    /// By the message each comes after.
    by_after: BTreeMap<MsgId, HeldSend>,
    /// When the device was last told of a gap.
    told_at: Instant,
}

/// The held messages of every (device, conversation). See the module docs.
#[derive(Debug, Default)]
pub struct HeldSends {
    held: BTreeMap<(DeviceId, ConversationId), Sender>,
    /// Body bytes held in all (what [`HELD_BYTES_MAX`] bounds).
    bytes: usize,
}

fn size(send: &Send) -> usize {
    send.body.len() + send.welcome.as_ref().map_or(0, |w| w.len())
}

impl HeldSends {
    /// Messages held now.
    pub fn len(&self) -> usize {
        self.held.values().map(|s| s.by_after.len()).sum()
    }

    /// True if nothing is held (a sender's entry goes with its last message).
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Body bytes held now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Holds `send` of `device` in `conv`, which comes `after` a message that is not its
    /// sender's last sequenced (the caller checked that `after` is not sequenced at all: a
    /// device behind the gateway is refused, not held). A copy of a message already held
    /// replaces it (the newer copy may chain differently, and came on the newer session).
    pub fn hold(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        device: DeviceId,
        conv: ConversationId,
        after: MsgId,
        send: Send,
    ) -> Holding {
        let msg_id = MsgId::from_bytes(send.msg_id);
        let replaced = self.take_copy(device, conv, msg_id);
        let added = size(&send);
        let sender = self.held.entry((device, conv)).or_insert(Sender {
            by_after: BTreeMap::new(),
            told_at: now,
        });
        if sender.by_after.len() >= HELD_PER_SENDER_MAX || self.bytes + added > HELD_BYTES_MAX {
            if sender.by_after.is_empty() {
                self.held.remove(&(device, conv));
            }
            return Holding::Full;
        }
        // A new gap unless what it comes after is itself held (its gap was told already).
        let behind = sender
            .by_after
            .values()
            .any(|h| MsgId::from_bytes(h.send.msg_id) == after);
        let new_gap = !behind && replaced != Some(after);
        if let Some(old) = sender.by_after.insert(after, HeldSend { conn, send }) {
            // Two messages after the same one: only a device that lost its outbox sends
            // that; keep the newer, forget the older (its device sends it again if needed).
            self.bytes -= size(&old.send);
        }
        let tell = new_gap || now >= sender.told_at + TELL_AGAIN_AFTER;
        if tell {
            sender.told_at = now;
        }
        let holding = if !tell {
            Holding::Quiet
        } else if new_gap {
            Holding::Tell(vec![(msg_id, after)])
        } else {
            let held: BTreeSet<MsgId> = sender
                .by_after
                .values()
                .map(|h| MsgId::from_bytes(h.send.msg_id))
                .collect();
            let heads = sender
                .by_after
                .iter()
                .filter(|(after, _)| !held.contains(after))
                .map(|(&after, h)| (MsgId::from_bytes(h.send.msg_id), after))
                .collect();
            Holding::Tell(heads)
        };
        self.bytes += added;
        debug_assert_eq!(
            self.bytes,
            self.held
                .values()
                .flat_map(|s| s.by_after.values())
                .map(|h| size(&h.send))
                .sum::<usize>()
        );
        holding
    }

    /// `msg_id` of `device` in `conv` was sequenced: the message held after it, to be taken
    /// now. A held copy of `msg_id` itself goes too.
    pub fn release(
        &mut self,
        device: DeviceId,
        conv: ConversationId,
        msg_id: MsgId,
    ) -> Option<HeldSend> {
        if self.is_empty() {
            return None;
        }
        self.take_copy(device, conv, msg_id);
        let sender = self.held.get_mut(&(device, conv))?;
        let next = sender.by_after.remove(&msg_id);
        if sender.by_after.is_empty() {
            self.held.remove(&(device, conv));
        }
        if let Some(next) = &next {
            self.bytes -= size(&next.send);
        }
        next
    }

    /// `msg_id` of `device` in `conv` was refused: what is held after it cannot be taken in
    /// order. Every message held for that sender goes (how many is returned); the first one
    /// after `msg_id`, if any, is returned so that the device can be told to send again from
    /// its last sequenced message.
    pub fn refused(
        &mut self,
        device: DeviceId,
        conv: ConversationId,
        msg_id: MsgId,
    ) -> (Option<HeldSend>, usize) {
        let Some(mut sender) = self.held.remove(&(device, conv)) else {
            return (None, 0);
        };
        self.bytes -= sender
            .by_after
            .values()
            .map(|h| size(&h.send))
            .sum::<usize>();
        let let_go = sender.by_after.len();
        (sender.by_after.remove(&msg_id), let_go)
    }

    /// The session `conn` of `device` ended or was replaced: what came on it goes (the
    /// device sends it again on its next session); how many.
    pub fn session_ended(&mut self, device: DeviceId, conn: ConnectionId) -> usize {
        let mut let_go = 0;
        let senders: Vec<(DeviceId, ConversationId)> = self
            .held
            .range((device, ConversationId(0))..=(device, ConversationId(u128::MAX)))
            .map(|(&sender, _)| sender)
            .collect();
        for key in senders {
            let Some(sender) = self.held.get_mut(&key) else {
                continue;
            };
            let before = sender.by_after.len();
            let mut bytes = 0;
            sender.by_after.retain(|_, h| {
                let keep = h.conn != conn;
                if !keep {
                    bytes += size(&h.send);
                }
                keep
            });
            let_go += before - sender.by_after.len();
            self.bytes -= bytes;
            if sender.by_after.is_empty() {
                self.held.remove(&key);
            }
        }
        let_go
    }

    /// Takes a held copy of `msg_id` out, wherever it was chained; the message it came after.
    fn take_copy(
        &mut self,
        device: DeviceId,
        conv: ConversationId,
        msg_id: MsgId,
    ) -> Option<MsgId> {
        let sender = self.held.get_mut(&(device, conv))?;
        let after = sender
            .by_after
            .iter()
            .find(|(_, h)| MsgId::from_bytes(h.send.msg_id) == msg_id)
            .map(|(&after, _)| after)?;
        if let Some(old) = sender.by_after.remove(&after) {
            self.bytes -= size(&old.send);
        }
        // The sender's entry stays while empty within `hold` (its `told_at` with it); `release`
        // removes it.
        Some(after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: DeviceId = DeviceId(1);
    const E: DeviceId = DeviceId(2);
    const C: ConversationId = ConversationId(7);
    const CONN: ConnectionId = ConnectionId(3);

    fn send(id: u128, after: u128, len: usize) -> Send {
        Send {
            msg_id: MsgId(id).to_bytes(),
            body: vec![0; len],
            welcome: None,
            after: Some(MsgId(after).to_bytes()),
        }
    }

    fn tell(id: u128, after: u128) -> Holding {
        Holding::Tell(vec![(MsgId(id), MsgId(after))])
    }

    fn hold(h: &mut HeldSends, device: DeviceId, id: u128, after: u128) -> Holding {
        h.hold(
            Instant::ZERO,
            CONN,
            device,
            C,
            MsgId(after),
            send(id, after, 10),
        )
    }

    #[test]
    fn a_gap_is_told_once_and_its_chain_comes_out_in_order() {
        let mut h = HeldSends::default();
        // 5 lost: 6, 7, 8 arrive.
        assert_eq!(hold(&mut h, D, 6, 5), tell(6, 5));
        assert_eq!(hold(&mut h, D, 7, 6), Holding::Quiet);
        assert_eq!(hold(&mut h, D, 8, 7), Holding::Quiet);
        // 10 arrives with 9 lost: a second gap.
        assert_eq!(hold(&mut h, D, 10, 9), tell(10, 9));
        assert_eq!((h.len(), h.bytes()), (4, 40));
        assert!(h.release(D, C, MsgId(4)).is_none());
        let mut out = Vec::new();
        let mut last = MsgId(5);
        while let Some(next) = h.release(D, C, last) {
            last = MsgId::from_bytes(next.send.msg_id);
            out.push(last.0);
        }
        assert_eq!(out, [6, 7, 8]);
        assert_eq!((h.len(), h.bytes()), (1, 10));
        assert_eq!(
            h.release(D, C, MsgId(9)).map(|s| s.send.msg_id),
            Some(MsgId(10).to_bytes())
        );
        assert!(h.is_empty() && h.bytes() == 0);
    }

    #[test]
    fn a_copy_replaces_the_held_one_wherever_it_was_chained() {
        let mut h = HeldSends::default();
        assert_eq!(hold(&mut h, D, 6, 5), tell(6, 5));
        // A copy of it: the gap was told lately.
        assert_eq!(hold(&mut h, D, 6, 5), Holding::Quiet);
        // The same message again, chained after another (the device rechained): a new gap.
        assert_eq!(hold(&mut h, D, 6, 4), tell(6, 4));
        assert_eq!(h.len(), 1);
        assert!(h.release(D, C, MsgId(5)).is_none());
        assert!(h.release(D, C, MsgId(4)).is_some());
        // Sequenced by another path (it came in order): its held copy goes.
        assert_eq!(hold(&mut h, D, 8, 7), tell(8, 7));
        assert!(h.release(D, C, MsgId(8)).is_none());
        assert!(h.is_empty());
    }

    #[test]
    fn a_gap_still_open_is_told_again_with_the_next_message_held_after_a_while() {
        let mut h = HeldSends::default();
        let at = |ms| Instant::ZERO + Duration::from_millis(ms);
        let mut hold_at = |ms, id: u128, after: u128| {
            h.hold(at(ms), CONN, D, C, MsgId(after), send(id, after, 1))
        };
        assert_eq!(hold_at(0, 6, 5), tell(6, 5));
        assert_eq!(hold_at(100, 7, 6), Holding::Quiet);
        assert_eq!(hold_at(499, 6, 5), Holding::Quiet, "a copy, lately told");
        assert_eq!(hold_at(500, 8, 7), tell(6, 5), "the gap at 6 is still open");
        assert_eq!(
            hold_at(600, 10, 9),
            tell(10, 9),
            "a new gap is told at once"
        );
        assert_eq!(
            hold_at(1100, 6, 5),
            Holding::Tell(vec![(MsgId(6), MsgId(5)), (MsgId(10), MsgId(9))]),
            "a copy after a while: every gap still open"
        );
    }

    #[test]
    fn bounds_refuse_to_hold_and_count_nothing() {
        let mut h = HeldSends::default();
        for i in 0..HELD_PER_SENDER_MAX as u128 {
            assert_ne!(hold(&mut h, D, 100 + i, 99 + i), Holding::Full);
        }
        assert_eq!(hold(&mut h, D, 1000, 999), Holding::Full);
        assert_eq!(h.len(), HELD_PER_SENDER_MAX);
        // Another sender is not bound by this one's count.
        assert_eq!(hold(&mut h, E, 6, 5), tell(6, 5));
        let big = HeldSends::default();
        let mut big = big;
        let huge = send(6, 5, HELD_BYTES_MAX);
        assert_eq!(
            big.hold(Instant::ZERO, CONN, D, C, MsgId(5), huge),
            tell(6, 5)
        );
        assert_eq!(hold(&mut big, E, 8, 7), Holding::Full);
        assert_eq!(big.len(), 1);
    }

    #[test]
    fn a_refusal_or_an_ended_session_lets_go_of_the_senders_holds() {
        let mut h = HeldSends::default();
        hold(&mut h, D, 6, 5);
        hold(&mut h, D, 7, 6);
        hold(&mut h, E, 6, 5);
        let (first, let_go) = h.refused(D, C, MsgId(5));
        assert_eq!(
            first.expect("the one held after 5").send.msg_id,
            MsgId(6).to_bytes()
        );
        assert_eq!((let_go, h.len()), (2, 1));
        assert_eq!(h.refused(D, C, MsgId(5)).1, 0);
        assert_eq!(h.session_ended(E, ConnectionId(99)), 0);
        assert_eq!(h.len(), 1, "another session's holds stay");
        assert_eq!(h.session_ended(E, CONN), 1);
        assert!(h.is_empty() && h.bytes() == 0);
    }
}
