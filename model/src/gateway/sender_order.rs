//! Sender order: a device's messages to a conversation are sequenced in the order it sent them.
//!
//! Each application message names the message it comes *after*: the device's previous
//! application message to the conversation still waiting for the gateway's answer, or, if none
//! waits, the last one it knows the gateway sequenced (see `node::outbox`). Group operations
//! (commits) name none and are not part of the chain: the MLS commit authority orders them, and
//! a message waiting for its group's next epoch must not hold up the commit that makes it. The
//! gateway keeps the id of the last message it sequenced from each device in each conversation,
//! durably with the log entry, and sequences a new message only if it comes after exactly that
//! one. Anything else is refused with `sender_out_of_order` naming the last one (or, when the
//! message it names may still come, held until it does: `held_sends`), and the device sends
//! what waits again, chained from it:
//!
//! - an earlier message lost or overtaken on the way: it is among what waits, and goes first;
//! - an earlier message refused for good (the device dropped it): the next now comes after
//!   the last sequenced one;
//! - a message the gateway sequenced but the device forgot (it crashed before writing it): the
//!   device takes it as its last and chains after it.
//!
//! Every waiting message but the first is chained to the one before it, so none can be
//! sequenced before an earlier one, whatever copies are still on the way. Message ids are
//! random and never reused, so a chain cannot be confused by a crash. Duplicates are recognised
//! by message id before any of this and keep their original seq. A refused message consumes
//! nothing: one refused as stale is encrypted again and keeps its place.
//!
//! # Durability without a write per message
//!
//! The log entries themselves say who sent what, in order, so a row per message is not needed:
//! at recovery a device's last chained message is its newest entry still in the log. Two things
//! break that rule, and only they write a row, `(last, through)`, meaning "as of seq `through`
//! the device's last chained message was `last`, and every entry of it after `through` is
//! chained":
//!
//! - an unchained entry (a commit) of the device: `through` becomes its seq;
//! - garbage collection dropping an entry of the device after `through`: `through` becomes the
//!   conversation's head, and `last` is kept in the row since its entry may be gone.
//!
//! Recovery takes, per device, its newest entry after the row's `through`, or else the row's
//! `last`. Writing `(last, head)` is correct at any moment; rows are written by
//! [`SenderOrder::flush`] into the batch that carries the change that required them (the
//! gateway flushes before it hands out every `Ready`), with their newest values, once each.
//! Rows of the earlier format (16 bytes, the last message, written with every message) are read
//! as exact and written again in this format with the first batch.

use std::collections::{BTreeMap, BTreeSet};

use crate::env::{scan_all, StoreError, StoreRead, Table, WriteBatch};
use crate::ids::{ConversationId, DeviceId, MsgId};

use super::sequencer::{ConversationLog, AUTHORITY_SENDER};

/// Table of sender order: key `conversation(16) ++ device(16)`, value the id (16) of the device's
/// last chained message as of seq `through` (8, big-endian); see the module docs.
pub const SENDER_ORDER_TABLE: Table = Table("sender_order");

/// The `after` of a device's first message to a conversation.
pub const NO_MESSAGE: MsgId = MsgId(0);

/// Bytes of a row of the earlier format: the last message only.
const LEGACY_ROW_BYTES: usize = 16;
/// Bytes of a row: the last message and `through`.
const ROW_BYTES: usize = 24;

fn key(conv: ConversationId, device: DeviceId) -> Vec<u8> {
    let mut key = Vec::with_capacity(32);
    key.extend_from_slice(&conv.to_bytes());
    key.extend_from_slice(&device.to_bytes());
    key
}

/// One device's order in one conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Row {
    /// The last chained message sequenced.
    last: MsgId,
    /// The seq as of which the stored row is exact; the device's entries after it are chained
    /// (0: no row stored).
    through: u64,
}

impl Row {
    const NONE: Row = Row {
        last: NO_MESSAGE,
        through: 0,
    };
}

/// The last message sequenced from every (conversation, device). See the module docs.
#[derive(Clone, Debug, Default)]
pub struct SenderOrder {
    rows: BTreeMap<(ConversationId, DeviceId), Row>,
    /// Rows to write with the next [`SenderOrder::flush`].
    unwritten: BTreeSet<(ConversationId, DeviceId)>,
}

impl SenderOrder {
    /// Rebuilds sender order from the stored rows and the entries of the recovered `logs`.
    pub fn recover<'a>(
        store: &dyn StoreRead,
        logs: impl Iterator<Item = &'a ConversationLog>,
    ) -> Result<SenderOrder, StoreError> {
        let mut order = SenderOrder::default();
        let mut legacy = Vec::new();
        scan_all(store, SENDER_ORDER_TABLE, |key, value| {
            let corrupt = || StoreError::Corrupt {
                table: SENDER_ORDER_TABLE.0,
                reason: format!("key of {} bytes, value of {}", key.len(), value.len()),
            };
            let (conv, device) = key.split_first_chunk::<16>().ok_or_else(corrupt)?;
            let conv = ConversationId::from_bytes(*conv);
            let device = DeviceId::from_bytes(device.try_into().map_err(|_| corrupt())?);
            let (last, through) = value.split_first_chunk::<16>().ok_or_else(corrupt)?;
            let last = MsgId::from_bytes(*last);
            let through = match value.len() {
                LEGACY_ROW_BYTES => {
                    legacy.push((conv, device));
                    u64::MAX // exact: written with every message, so no entry comes after it
                }
                ROW_BYTES => u64::from_be_bytes(through.try_into().map_err(|_| corrupt())?),
                _ => return Err(corrupt()),
            };
            order.rows.insert((conv, device), Row { last, through });
            Ok(())
        })?;
        let mut heads = BTreeMap::new();
        for log in logs {
            heads.insert(log.id(), log.head());
            for entry in log.entries() {
                if entry.sender == AUTHORITY_SENDER {
                    continue;
                }
                let row = order
                    .rows
                    .entry((log.id(), entry.sender))
                    .or_insert(Row::NONE);
                if entry.seq > row.through {
                    row.last = entry.msg_id;
                }
            }
        }
        for (conv, device) in legacy {
            let head = heads.get(&conv).copied().unwrap_or(0);
            order.mark(conv, device, head);
        }
        Ok(order)
    }

    /// The last message sequenced from `device` in `conv` ([`NO_MESSAGE`]: none yet).
    pub fn last(&self, conv: ConversationId, device: DeviceId) -> MsgId {
        self.rows
            .get(&(conv, device))
            .map_or(NO_MESSAGE, |r| r.last)
    }

    /// Whether a new (not duplicate) message that comes `after` may be sequenced now; `Err`
    /// names the message it must come after instead.
    pub fn check(&self, conv: ConversationId, device: DeviceId, after: MsgId) -> Result<(), MsgId> {
        let last = self.last(conv, device);
        if after == last {
            Ok(())
        } else {
            Err(last)
        }
    }

    /// `msg_id` of `device` was sequenced in `conv` as a chained message: the next must come
    /// after it. Its log entry is what makes this durable; no row is written.
    pub fn chained(&mut self, conv: ConversationId, device: DeviceId, msg_id: MsgId) {
        assert_ne!(msg_id, NO_MESSAGE, "a sequenced message has an id");
        self.rows.entry((conv, device)).or_insert(Row::NONE).last = msg_id;
    }

    /// An unchained message (a commit) of `device` was sequenced in `conv` at `seq`: recovery
    /// must not take it for the last, so the row is written as of it.
    pub fn unchained(&mut self, conv: ConversationId, device: DeviceId, seq: u64) {
        self.mark(conv, device, seq);
    }

    /// Garbage collection drops the entry at `seq` of `device` in `conv`, whose head is `head`:
    /// if recovery would have needed it, the row is written as of the head.
    pub fn dropping(&mut self, conv: ConversationId, device: DeviceId, seq: u64, head: u64) {
        let needed = self
            .rows
            .get(&(conv, device))
            .is_some_and(|row| seq > row.through);
        // Placeholders of lost seqs (`LOST_SENDER`) have no sender to order.
        debug_assert!(
            device == AUTHORITY_SENDER
                || device == super::sequencer::LOST_SENDER
                || self.rows.contains_key(&(conv, device)),
            "every device with an entry has a row in memory"
        );
        if needed {
            self.mark(conv, device, head);
        }
    }

    /// Each device's last chained message in `conv`, in device order (none for devices that
    /// sent none): what a handover gives the new authority.
    pub fn of_conversation(&self, conv: ConversationId) -> Vec<(DeviceId, MsgId)> {
        self.rows
            .range((conv, DeviceId(0))..=(conv, DeviceId(u128::MAX)))
            .filter(|(_, row)| row.last != NO_MESSAGE)
            .map(|((_, device), row)| (*device, row.last))
            .collect()
    }

    /// After a handover: `device`'s last chained message in `conv` is `last`, as the old
    /// authority knew it when its log stopped at `head` (this gateway's replica may have
    /// begun after it). Written as of `head`.
    pub fn adopt(&mut self, conv: ConversationId, device: DeviceId, last: MsgId, head: u64) {
        let row = self.rows.entry((conv, device)).or_insert(Row::NONE);
        row.last = last;
        let through = row.through.max(head);
        self.mark(conv, device, through);
    }

    fn mark(&mut self, conv: ConversationId, device: DeviceId, through: u64) {
        let row = self.rows.entry((conv, device)).or_insert(Row::NONE);
        debug_assert!(through >= row.through || row.through == u64::MAX);
        row.through = through;
        self.unwritten.insert((conv, device));
    }

    /// Writes every row marked since the last flush, once each, with its newest values. Call
    /// it before the batch holding the changes that marked them leaves.
    pub fn flush(&mut self, writes: &mut WriteBatch) {
        for (conv, device) in std::mem::take(&mut self.unwritten) {
            let row = self.rows[&(conv, device)];
            let mut value = Vec::with_capacity(ROW_BYTES);
            value.extend_from_slice(&row.last.to_bytes());
            value.extend_from_slice(&row.through.to_be_bytes());
            writes.put(SENDER_ORDER_TABLE, key(conv, device), value);
        }
    }

    /// True if some row waits for a flush.
    pub fn has_unwritten(&self) -> bool {
        !self.unwritten.is_empty()
    }

    /// Devices known per conversation (one per device that sent in a conversation).
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True if no device sent anything yet.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{MemStore, Store};
    use crate::gateway::sequencer::{Appended, LogEntry};
    use crate::time::Instant;
    use bytes::Bytes;

    const C: ConversationId = ConversationId(1);
    const D: DeviceId = DeviceId(2);
    const E: DeviceId = DeviceId(3);

    /// A gateway's log and sender order over a store, sequencing and collecting as it does.
    struct Gateway {
        log: ConversationLog,
        order: SenderOrder,
        store: MemStore,
    }

    impl Gateway {
        fn new() -> Gateway {
            Gateway {
                log: ConversationLog::new(C, [D, E]),
                order: SenderOrder::default(),
                store: MemStore::default(),
            }
        }

        /// Sequences `msg` of `device`, chained or not, and commits the batch.
        fn send(&mut self, device: DeviceId, msg: u128, chained: bool) {
            let mut writes = WriteBatch::default();
            let Ok(Appended::New(seq)) =
                self.log
                    .append(Instant(0), device, MsgId(msg), Bytes::from_static(b"m"))
            else {
                panic!("a new message")
            };
            self.log.persist_append(seq, &mut writes);
            if chained {
                self.order.chained(C, device, MsgId(msg));
            } else {
                self.order.unchained(C, device, seq);
            }
            self.order.flush(&mut writes);
            self.store.commit(writes).unwrap();
        }

        /// Drops every entry up to `seq` and commits the batch.
        fn collect(&mut self, seq: u64) {
            let mut writes = WriteBatch::default();
            let head = self.log.head();
            let order = &mut self.order;
            self.log.collect_garbage(
                seq,
                Instant(0),
                Instant(0),
                usize::MAX,
                &mut writes,
                &mut |e: &LogEntry| order.dropping(C, e.sender, e.seq, head),
            );
            self.order.flush(&mut writes);
            self.store.commit(writes).unwrap();
        }

        fn rows(&self) -> usize {
            let mut rows = 0;
            scan_all(&self.store, SENDER_ORDER_TABLE, |_, _| {
                rows += 1;
                Ok(())
            })
            .unwrap();
            rows
        }

        /// Sender order as a restarted gateway rebuilds it.
        fn recovered(&self) -> SenderOrder {
            let mut log = ConversationLog::new(C, [D, E]);
            let first = self.log.first_seq();
            log.restore_bounds(first - 1, first).unwrap();
            scan_all(&self.store, crate::gateway::sequencer::LOG_TABLE, |k, v| {
                log.restore_entry(crate::gateway::sequencer::decode_entry(k, v)?.1)
            })
            .unwrap();
            log.finish_restore().unwrap();
            assert_eq!(log.head(), self.log.head());
            SenderOrder::recover(&self.store, [&log].into_iter()).unwrap()
        }
    }

    #[test]
    fn a_message_is_taken_only_right_after_the_last() {
        let mut order = SenderOrder::default();
        assert_eq!(order.check(C, D, NO_MESSAGE), Ok(()));
        assert_eq!(order.check(C, D, MsgId(7)), Err(NO_MESSAGE), "a gap");
        order.chained(C, D, MsgId(7));
        order.chained(C, D, MsgId(9));
        assert_eq!(order.check(C, D, MsgId(9)), Ok(()));
        assert_eq!(order.check(C, D, MsgId(7)), Err(MsgId(9)), "a stale chain");
        assert_eq!(order.check(C, E, NO_MESSAGE), Ok(()), "each device its own");
        assert!(!order.has_unwritten(), "chained messages write no row");
    }

    #[test]
    fn chained_messages_write_no_row_and_recovery_reads_the_log() {
        let mut g = Gateway::new();
        g.send(D, 7, true);
        g.send(E, 8, true);
        g.send(D, 9, true);
        assert_eq!(g.rows(), 0);
        let order = g.recovered();
        assert_eq!(order.last(C, D), MsgId(9));
        assert_eq!(order.last(C, E), MsgId(8));
    }

    #[test]
    fn a_commit_is_never_taken_for_the_last_chained_message() {
        let mut g = Gateway::new();
        g.send(E, 100, false); // a commit before any chained message
        g.send(D, 7, true);
        g.send(D, 50, false);
        assert_eq!(g.rows(), 2, "one row per commit's sender");
        assert_eq!(g.recovered().last(C, D), MsgId(7));
        assert_eq!(g.recovered().last(C, E), NO_MESSAGE);
        g.send(D, 9, true);
        g.send(E, 11, true);
        assert_eq!(g.recovered().last(C, D), MsgId(9));
        assert_eq!(g.recovered().last(C, E), MsgId(11));
    }

    #[test]
    fn garbage_collection_keeps_the_last_in_a_row_once_its_entry_is_gone() {
        let mut g = Gateway::new();
        for msg in 1..=5 {
            g.send(D, msg, true);
        }
        g.send(E, 6, true);
        g.collect(2);
        assert_eq!(g.rows(), 1, "a row for the device whose entries went");
        assert_eq!(g.recovered().last(C, D), MsgId(5));
        g.collect(6);
        assert_eq!(g.recovered().last(C, D), MsgId(5));
        assert_eq!(g.recovered().last(C, E), MsgId(6));
        // After the rows, the log again decides.
        g.send(D, 20, false);
        g.send(D, 21, true);
        g.collect(7);
        assert_eq!(g.recovered().last(C, D), MsgId(21));
    }

    #[test]
    fn a_row_of_the_earlier_format_is_exact_and_written_again_in_this_one() {
        let mut g = Gateway::new();
        g.send(D, 7, true);
        let mut writes = WriteBatch::default();
        writes.put(SENDER_ORDER_TABLE, key(C, D), MsgId(7).to_bytes().to_vec());
        g.store.commit(writes).unwrap();
        g.order = g.recovered();
        assert_eq!(g.order.last(C, D), MsgId(7));
        assert!(g.order.has_unwritten(), "rewritten with the first batch");
        g.send(D, 9, true);
        assert_eq!(g.recovered().last(C, D), MsgId(9));
    }

    proptest::proptest! {
        /// Whatever mix of chained messages, commits and collection steps two devices go
        /// through, a restart after any batch finds each device's last exactly as it was.
        #[test]
        fn recovery_always_finds_the_last_chained_message(
            steps in proptest::collection::vec((0u8..4, proptest::bool::ANY), 1..60),
        ) {
            let mut g = Gateway::new();
            for (next, (kind, on_e)) in (1u128..).zip(steps) {
                let device = if on_e { E } else { D };
                match kind {
                    0 | 1 => g.send(device, next, true),
                    2 => g.send(device, next, false),
                    _ => {
                        let upto = g.log.first_seq() + (next as u64 % 5);
                        g.collect(upto.min(g.log.head()));
                    }
                }
                let recovered = g.recovered();
                for device in [D, E] {
                    proptest::prop_assert_eq!(recovered.last(C, device), g.order.last(C, device));
                }
            }
        }
    }

    #[test]
    fn a_damaged_row_is_an_error() {
        let mut store = MemStore::default();
        let mut writes = WriteBatch::default();
        writes.put(SENDER_ORDER_TABLE, key(C, D), vec![1; 20]);
        store.commit(writes).unwrap();
        assert!(SenderOrder::recover(&store, std::iter::empty()).is_err());
    }

    #[test]
    fn a_new_authority_adopts_the_last_messages_its_replica_never_held_and_keeps_them() {
        let mut g = Gateway::new();
        // The replica here began after D's message 5 and E's 6, at seq 3.
        g.send(D, 1, true);
        g.send(D, 2, true);
        g.send(E, 3, true);
        assert_eq!(
            g.order.of_conversation(C),
            vec![(D, MsgId(2)), (E, MsgId(3))]
        );
        // The old authority knew D's last as 9 when it stopped at seq 3.
        g.order.adopt(C, D, MsgId(9), 3);
        assert_eq!(g.order.last(C, D), MsgId(9));
        assert_eq!(g.order.check(C, D, MsgId(9)), Ok(()));
        let mut writes = WriteBatch::default();
        g.order.flush(&mut writes);
        g.store.commit(writes).unwrap();
        // A restart keeps it: the row is written as of the old authority's head.
        let back = g.recovered();
        assert_eq!(back.last(C, D), MsgId(9));
        assert_eq!(back.last(C, E), MsgId(3));
        // Messages sequenced here after it are taken from the log again.
        g.send(D, 10, true);
        assert_eq!(g.recovered().last(C, D), MsgId(10));
    }
}
