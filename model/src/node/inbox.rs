//! The inbox: per-conversation delivery cursors, the reorder buffer and replay requests.
//!
//! Delivery to the application is exactly once and in seq order: the cursor is committed in the
//! same batch that releases the event, and anything at or below it is a duplicate. A seq beyond
//! `cursor + 1` waits in a bounded reorder buffer while the node asks the gateway to replay from
//! `cursor + 1` (at most once per `replay_request_interval`).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;

use crate::env::{scan_all, StoreError, StoreRead, Table, WriteBatch};
use crate::ids::{ConversationId, DeviceId, MsgId};
use crate::time::Instant;

/// Table of delivery cursors: key `conversation(16)`, value seq (8, big-endian), then the id of
/// the message read at it (16) where there is one.
pub const NODE_CURSORS_TABLE: Table = Table("node_cursors");

/// Table of where reading under the current resume token began: key `conversation(16)`, value
/// the cursor before the first move under that token (8, big-endian) and the token's first 16
/// bytes (the gateway run that issued it). Written once per conversation per token, with the
/// cursor move it precedes.
pub const NODE_READ_SINCE_TABLE: Table = Table("node_read_since");

/// A delivery waiting for its turn.
#[derive(Clone, Debug)]
pub struct Inbound {
    /// Originating device.
    pub sender: DeviceId,
    /// The sender's id for it.
    pub msg_id: MsgId,
    /// Content as delivered (ciphertext in a group).
    pub body: Bytes,
}

/// Where a device began reading a conversation in the last gateway run it read it from: every
/// seq after `since` up to the cursor was read in that run, but those in `skipped`. A gateway
/// that loses those messages compares the run with the one other devices read them in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadSince {
    /// The cursor before the first move under the token (or after a move that read nothing,
    /// when it cannot be kept in `skipped`).
    pub since: u64,
    /// The token's stamp: its first 16 bytes, naming the gateway run that issued it.
    pub stamp: [u8; 16],
    /// The last stretch after `since` that the cursor moved over without reading (a gap, a
    /// loss it was told of), first and last seq.
    pub skipped: Option<(u64, u64)>,
}

impl ReadSince {
    fn encode(&self) -> Vec<u8> {
        let mut value = Vec::with_capacity(40);
        value.extend_from_slice(&self.since.to_be_bytes());
        value.extend_from_slice(&self.stamp);
        if let Some((from, to)) = self.skipped {
            value.extend_from_slice(&from.to_be_bytes());
            value.extend_from_slice(&to.to_be_bytes());
        }
        value
    }

    fn decode(value: &[u8]) -> Option<ReadSince> {
        let u64_at = |at: usize| -> Option<u64> {
            Some(u64::from_be_bytes(value.get(at..at + 8)?.try_into().ok()?))
        };
        let skipped = match value.len() {
            24 => None,
            40 => Some((u64_at(24)?, u64_at(32)?)),
            _ => return None,
        };
        Some(ReadSince {
            since: u64_at(0)?,
            stamp: value[8..24].try_into().ok()?,
            skipped,
        })
    }

    /// The cursor moved from `cursor` to `seq` without reading (`seq` below it: a Welcome
    /// restarted the conversation there).
    fn moved_unread(&mut self, cursor: u64, seq: u64) {
        if seq <= cursor || self.since >= cursor {
            // Back, or in place (a divergence: what it read up to here is not what the run
            // holds), or nothing read yet: reading begins after it.
            self.since = seq;
            self.skipped = None;
            return;
        }
        self.skipped = match self.skipped {
            Some((from, to)) if to == cursor => Some((from, seq)),
            Some((_, to)) => {
                // One stretch is kept: what came before the older one is no longer claimed.
                self.since = to;
                Some((cursor + 1, seq))
            }
            None => Some((cursor + 1, seq)),
        };
    }
}

/// Cursors and the reorder buffer. See the module docs.
#[derive(Clone, Debug)]
pub struct Inbox {
    cursors: BTreeMap<ConversationId, u64>,
    /// The id of the message read at each cursor, where the cursor moved by reading one.
    last_read: BTreeMap<ConversationId, MsgId>,
    /// Per conversation: where reading began under the last token the cursor moved under.
    read_since: BTreeMap<ConversationId, ReadSince>,
    /// The stamp of the token of the current session, if any: cursor moves now are reads
    /// from that gateway run.
    stamp: Option<[u8; 16]>,
    reorder: BTreeMap<ConversationId, BTreeMap<u64, Inbound>>,
    replay_asked: BTreeMap<ConversationId, Instant>,
    reorder_buffer_max: usize,
    replay_request_interval: Duration,
}

impl Inbox {
    /// Reads the cursors back; the buffer starts empty.
    pub fn recover(
        reorder_buffer_max: usize,
        replay_request_interval: Duration,
        store: &dyn StoreRead,
    ) -> Result<Inbox, StoreError> {
        let mut cursors = BTreeMap::new();
        let mut last_read = BTreeMap::new();
        scan_all(store, NODE_CURSORS_TABLE, |key, value| {
            // A cursor alone (8 bytes), or with the id of the message read at it (24); any
            // other length fails the conversion below.
            let (seq, last) = match value.len() {
                24 => (&value[..8], Some(&value[8..])),
                _ => (value, None),
            };
            match (<[u8; 16]>::try_from(key), <[u8; 8]>::try_from(seq)) {
                (Ok(k), Ok(v)) => {
                    let conversation = ConversationId::from_bytes(k);
                    cursors.insert(conversation, u64::from_be_bytes(v));
                    if let Some(id) = last.and_then(|l| <[u8; 16]>::try_from(l).ok()) {
                        last_read.insert(conversation, MsgId::from_bytes(id));
                    }
                    Ok(())
                }
                _ => Err(StoreError::Corrupt {
                    table: NODE_CURSORS_TABLE.0,
                    reason: "cursor key or value length".into(),
                }),
            }
        })?;
        let mut read_since = BTreeMap::new();
        scan_all(store, NODE_READ_SINCE_TABLE, |key, value| {
            match (<[u8; 16]>::try_from(key), ReadSince::decode(value)) {
                (Ok(k), Some(v)) => {
                    read_since.insert(ConversationId::from_bytes(k), v);
                    Ok(())
                }
                _ => Err(StoreError::Corrupt {
                    table: NODE_READ_SINCE_TABLE.0,
                    reason: "read-since key or value length".into(),
                }),
            }
        })?;
        Ok(Inbox {
            cursors,
            last_read,
            read_since,
            stamp: None,
            reorder: BTreeMap::new(),
            replay_asked: BTreeMap::new(),
            reorder_buffer_max,
            replay_request_interval,
        })
    }

    /// Highest seq delivered to the application in a conversation.
    pub fn cursor(&self, conversation: ConversationId) -> u64 {
        self.cursors.get(&conversation).copied().unwrap_or(0)
    }

    /// Every cursor, in conversation order.
    pub fn cursors(&self) -> &BTreeMap<ConversationId, u64> {
        &self.cursors
    }

    /// The id of the message read at the cursor, if the cursor moved by reading one.
    pub fn last_read(&self, conversation: ConversationId) -> Option<MsgId> {
        self.last_read.get(&conversation).copied()
    }

    /// The session's resume token changed (a `HelloOk`, or the token read back at a start):
    /// cursor moves from now on are reads from the gateway run it names.
    pub fn set_token(&mut self, token: Option<&[u8; 32]>) {
        self.stamp = token.map(|t| t[..16].try_into().expect("16 bytes"));
    }

    /// Where the device began reading `conversation` in the last gateway run it read it from
    /// (see [`ReadSince`]): under the last token it moved under. If it has not moved under
    /// any, the cursor itself and `token`'s stamp. `None` without either.
    pub fn read_since(
        &self,
        conversation: ConversationId,
        token: Option<&[u8; 32]>,
    ) -> Option<ReadSince> {
        let cursor = self.cursor(conversation);
        match self.read_since.get(&conversation) {
            Some(&read) => Some(ReadSince {
                since: read.since.min(cursor),
                ..read
            }),
            None => {
                let stamp: [u8; 16] = token?[..16].try_into().expect("16 bytes");
                Some(ReadSince {
                    since: cursor,
                    stamp,
                    skipped: None,
                })
            }
        }
    }

    /// Moves a conversation's cursor to `seq` (forward only, except when a Welcome resets
    /// where a group is read from) and drops what the buffer holds up to it.
    pub fn set_cursor(&mut self, conversation: ConversationId, seq: u64, writes: &mut WriteBatch) {
        self.set(conversation, seq, None, writes);
    }

    /// [`Inbox::set_cursor`] to the seq of a message just read, `msg_id`.
    pub fn set_cursor_read(
        &mut self,
        conversation: ConversationId,
        seq: u64,
        msg_id: MsgId,
        writes: &mut WriteBatch,
    ) {
        self.set(conversation, seq, Some(msg_id), writes);
    }

    fn set(
        &mut self,
        conversation: ConversationId,
        seq: u64,
        last: Option<MsgId>,
        writes: &mut WriteBatch,
    ) {
        if let Some(stamp) = self.stamp {
            let cursor = self.cursor(conversation);
            let mut read = match self.read_since.get(&conversation) {
                Some(&read) if read.stamp == stamp => read,
                // The first move under this token: reading in its run begins here.
                _ => ReadSince {
                    since: cursor,
                    stamp,
                    skipped: None,
                },
            };
            if last.is_none() {
                read.moved_unread(cursor, seq);
            }
            if self.read_since.get(&conversation) != Some(&read) {
                self.read_since.insert(conversation, read);
                writes.put(
                    NODE_READ_SINCE_TABLE,
                    conversation.to_bytes().to_vec(),
                    read.encode(),
                );
            }
        }
        self.cursors.insert(conversation, seq);
        let mut value = seq.to_be_bytes().to_vec();
        match last {
            Some(id) => {
                self.last_read.insert(conversation, id);
                value.extend_from_slice(&id.to_bytes());
            }
            None => {
                self.last_read.remove(&conversation);
            }
        }
        writes.put(NODE_CURSORS_TABLE, conversation.to_bytes().to_vec(), value);
        if let Some(buffer) = self.reorder.get_mut(&conversation) {
            buffer.retain(|&s, _| s > seq);
        }
    }

    /// Keeps a delivery that arrived ahead of its turn (the buffer is bounded; a full one keeps
    /// only what it holds already). True if a replay request should go out now.
    pub fn hold(
        &mut self,
        now: Instant,
        conversation: ConversationId,
        seq: u64,
        inbound: Inbound,
    ) -> bool {
        debug_assert!(
            seq > self.cursor(conversation) + 1,
            "only what is ahead waits"
        );
        let buffer = self.reorder.entry(conversation).or_default();
        if buffer.len() < self.reorder_buffer_max || buffer.contains_key(&seq) {
            buffer.insert(seq, inbound);
        }
        debug_assert!(
            buffer.len() <= self.reorder_buffer_max,
            "the buffer is bounded"
        );
        let asked = self.replay_asked.get(&conversation).copied();
        if asked.is_none_or(|t| now >= t + self.replay_request_interval) {
            self.replay_asked.insert(conversation, now);
            return true;
        }
        false
    }

    /// Keeps the delivery at the cursor's next seq, which could not be processed yet (a
    /// commit adding a device of a domain whose root is not vouched for yet): it is taken
    /// again by [`Inbox::ready`] when that changes, or comes again from the gateway.
    pub fn park(&mut self, conversation: ConversationId, seq: u64, inbound: Inbound) {
        debug_assert_eq!(
            seq,
            self.cursor(conversation) + 1,
            "only the next one is parked"
        );
        self.reorder
            .entry(conversation)
            .or_default()
            .insert(seq, inbound);
    }

    /// The conversations whose next delivery waits in the buffer (parked, or arrived after
    /// the one before it was parked).
    pub fn ready(&self) -> Vec<ConversationId> {
        self.reorder
            .iter()
            .filter(|(conv, buffer)| buffer.contains_key(&(self.cursor(**conv) + 1)))
            .map(|(conv, _)| *conv)
            .collect()
    }

    /// The buffered delivery at `seq`, if any, taken out.
    pub fn take(&mut self, conversation: ConversationId, seq: u64) -> Option<Inbound> {
        self.reorder.get_mut(&conversation)?.remove(&seq)
    }

    /// The connection is gone: the buffer and replay timers start over on the next one.
    pub fn connection_lost(&mut self) {
        self.reorder.clear();
        self.replay_asked.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{MemStore, Store};

    const CONV: ConversationId = ConversationId(3);

    fn recovered(store: &MemStore) -> Inbox {
        Inbox::recover(8, Duration::from_secs(1), store).unwrap()
    }

    #[test]
    fn a_cursor_keeps_the_id_of_the_message_read_at_it_and_loses_it_when_moved_otherwise() {
        let mut store = MemStore::default();
        let mut inbox = recovered(&store);
        let mut writes = WriteBatch::default();
        inbox.set_cursor_read(CONV, 4, MsgId(44), &mut writes);
        store.commit(writes.take()).unwrap();
        let again = recovered(&store);
        assert_eq!(
            (again.cursor(CONV), again.last_read(CONV)),
            (4, Some(MsgId(44)))
        );
        inbox.set_cursor(CONV, 6, &mut writes);
        store.commit(writes.take()).unwrap();
        let again = recovered(&store);
        assert_eq!((again.cursor(CONV), again.last_read(CONV)), (6, None));
    }

    /// What a device read under a token came from the gateway run that issued it: the
    /// cursor before its first move under that token is kept (durably) with the token's stamp,
    /// and shown with every `Hello` until the cursor moves under another token, even one shown
    /// with a later token under which it read nothing.
    #[test]
    fn where_reading_began_under_each_token_is_kept() {
        let mut store = MemStore::default();
        let mut inbox = recovered(&store);
        let mut writes = WriteBatch::default();
        let first = [1u8; 32];
        let second = [2u8; 32];
        let at = |since: u64, t: &[u8; 32]| {
            Some(ReadSince {
                since,
                stamp: t[..16].try_into().unwrap(),
                skipped: None,
            })
        };
        assert_eq!(inbox.read_since(CONV, None), None);
        inbox.set_cursor(CONV, 3, &mut writes);
        assert_eq!(
            inbox.read_since(CONV, Some(&first)),
            at(3, &first),
            "nothing under it"
        );
        inbox.set_token(Some(&first));
        inbox.set_cursor_read(CONV, 5, MsgId(5), &mut writes);
        inbox.set_cursor_read(CONV, 7, MsgId(7), &mut writes);
        assert_eq!(inbox.read_since(CONV, Some(&first)), at(3, &first));
        store.commit(writes.take()).unwrap();
        let mut again = recovered(&store);
        assert_eq!(again.read_since(CONV, Some(&first)), at(3, &first));
        // A new session's token under which it has read nothing yet: what it read came from
        // the first token's run, and it says so.
        again.set_token(Some(&second));
        assert_eq!(again.read_since(CONV, Some(&second)), at(3, &first));
        assert_eq!(again.read_since(CONV, None), at(3, &first));
        // Reading under it begins at 7.
        again.set_cursor_read(CONV, 8, MsgId(8), &mut writes);
        assert_eq!(again.read_since(CONV, Some(&second)), at(7, &second));
        store.commit(writes.take()).unwrap();
        assert_eq!(
            recovered(&store).read_since(CONV, Some(&second)),
            at(7, &second)
        );
        // A loss it is told of, under that token, was not read there: the stretch is kept
        // beside what it reads. Before anything was read under the token, reading begins after
        // it; a second stretch keeps only the newer, and what came before it is no longer
        // claimed; a move back (a Welcome) begins anew.
        let mut again = recovered(&store);
        again.set_token(Some(&second));
        again.set_cursor(CONV, 12, &mut writes);
        let skipped = |since, skipped| {
            Some(ReadSince {
                skipped: Some(skipped),
                ..at(since, &second).unwrap()
            })
        };
        assert_eq!(again.read_since(CONV, Some(&second)), skipped(7, (9, 12)));
        again.set_cursor(CONV, 14, &mut writes);
        assert_eq!(again.read_since(CONV, Some(&second)), skipped(7, (9, 14)));
        again.set_cursor_read(CONV, 15, MsgId(15), &mut writes);
        store.commit(writes.take()).unwrap();
        let mut again = recovered(&store);
        assert_eq!(again.read_since(CONV, Some(&second)), skipped(7, (9, 14)));
        again.set_token(Some(&second));
        again.set_cursor(CONV, 20, &mut writes);
        assert_eq!(again.read_since(CONV, Some(&second)), skipped(14, (16, 20)));
        again.set_cursor(CONV, 20, &mut writes);
        assert_eq!(
            again.read_since(CONV, Some(&second)),
            at(20, &second),
            "diverged"
        );
        again.set_cursor_read(CONV, 21, MsgId(21), &mut writes);
        again.set_cursor(CONV, 2, &mut writes);
        assert_eq!(
            again.read_since(CONV, Some(&second)),
            at(2, &second),
            "a Welcome"
        );
        let mut fresh = recovered(&MemStore::default());
        fresh.set_token(Some(&first));
        fresh.set_cursor(CONV, 4, &mut writes);
        assert_eq!(
            fresh.read_since(CONV, None),
            at(4, &first),
            "nothing read before"
        );
        // A damaged row is refused.
        let mut writes = WriteBatch::default();
        writes.put(
            NODE_READ_SINCE_TABLE,
            CONV.to_bytes().to_vec(),
            vec![0u8; 23],
        );
        store.commit(writes).unwrap();
        assert!(matches!(
            Inbox::recover(8, Duration::from_secs(1), &store),
            Err(StoreError::Corrupt {
                table: "node_read_since",
                ..
            })
        ));
    }

    #[test]
    fn a_cursor_written_before_ids_were_kept_still_reads() {
        let mut store = MemStore::default();
        let mut writes = WriteBatch::default();
        writes.put(
            NODE_CURSORS_TABLE,
            CONV.to_bytes().to_vec(),
            9u64.to_be_bytes().to_vec(),
        );
        store.commit(writes).unwrap();
        let inbox = recovered(&store);
        assert_eq!((inbox.cursor(CONV), inbox.last_read(CONV)), (9, None));
    }

    #[test]
    fn a_cursor_row_of_another_length_or_key_is_refused_as_corrupt() {
        for (key, value) in [
            (CONV.to_bytes().to_vec(), vec![0u8; 16]),
            (CONV.to_bytes().to_vec(), vec![0u8; 7]),
            (vec![1u8; 15], 9u64.to_be_bytes().to_vec()),
        ] {
            let mut store = MemStore::default();
            let mut writes = WriteBatch::default();
            writes.put(NODE_CURSORS_TABLE, key, value);
            store.commit(writes).unwrap();
            assert!(matches!(
                Inbox::recover(8, Duration::from_secs(1), &store),
                Err(StoreError::Corrupt {
                    table: "node_cursors",
                    ..
                })
            ));
        }
    }
}
