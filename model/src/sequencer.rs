//! One conversation's log at its authority gateway: members, seq assignment, deduplication.
//!
//! The sequencer is the heart of delivery: it gives each accepted message the next `seq`, and a
//! message sent twice (a retry after a lost acknowledgement) gets its original `seq` back. It is
//! pure data; the [`crate::gateway`] state machine persists what it appends before anyone hears
//! of it.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use crate::env::{StoreError, Table, WriteBatch};
use crate::ids::{ConversationId, DeviceId, MsgId};

/// Table of log entries: key `conversation(16) ++ seq(8, big-endian)`, value an encoded entry.
pub const LOG_TABLE: Table = Table("log");
/// Table of members: key `conversation(16) ++ device(16)`, empty value.
pub const MEMBERS_TABLE: Table = Table("members");

/// One sequenced message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    /// Position in the conversation, from 1.
    pub seq: u64,
    /// Originating device.
    pub sender: DeviceId,
    /// The sender's message id.
    pub msg_id: MsgId,
    /// Opaque content.
    pub body: Bytes,
}

/// What happened to an offered message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    /// Newly sequenced at this seq; the caller must persist it before acknowledging.
    New(u64),
    /// Seen before; this is its original seq.
    Duplicate(u64),
}

/// Why a message was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SequencerError {
    /// Only member devices may send.
    #[error("device is not a member of the conversation")]
    NotMember,
}

/// The ordered, deduplicated log of one conversation.
#[derive(Clone, Debug)]
pub struct ConversationLog {
    id: ConversationId,
    members: BTreeSet<DeviceId>,
    entries: Vec<LogEntry>,
    dedup: BTreeMap<(DeviceId, MsgId), u64>,
}

impl ConversationLog {
    /// An empty conversation with these members.
    pub fn new(id: ConversationId, members: impl IntoIterator<Item = DeviceId>) -> Self {
        ConversationLog {
            id,
            members: members.into_iter().collect(),
            entries: Vec::new(),
            dedup: BTreeMap::new(),
        }
    }

    /// The conversation id.
    pub fn id(&self) -> ConversationId {
        self.id
    }

    /// Member devices, in id order.
    pub fn members(&self) -> &BTreeSet<DeviceId> {
        &self.members
    }

    /// True if `device` is a member.
    pub fn is_member(&self, device: DeviceId) -> bool {
        self.members.contains(&device)
    }

    /// The highest assigned seq (0 for an empty log).
    pub fn head(&self) -> u64 {
        self.entries.len() as u64
    }

    /// The entry at `seq`, if assigned.
    pub fn get(&self, seq: u64) -> Option<&LogEntry> {
        let index = seq.checked_sub(1)?;
        self.entries.get(usize::try_from(index).ok()?)
    }

    /// Offers a message; sequences it unless it is a duplicate.
    pub fn append(
        &mut self,
        sender: DeviceId,
        msg_id: MsgId,
        body: Bytes,
    ) -> Result<Appended, SequencerError> {
        if !self.is_member(sender) {
            return Err(SequencerError::NotMember);
        }
        if let Some(&seq) = self.dedup.get(&(sender, msg_id)) {
            return Ok(Appended::Duplicate(seq));
        }
        let seq = self.head() + 1;
        self.push(LogEntry {
            seq,
            sender,
            msg_id,
            body,
        });
        Ok(Appended::New(seq))
    }

    fn push(&mut self, entry: LogEntry) {
        assert_eq!(entry.seq, self.head() + 1, "log entries must be contiguous");
        let previous = self.dedup.insert((entry.sender, entry.msg_id), entry.seq);
        assert!(previous.is_none(), "a message id must map to one seq");
        self.entries.push(entry);
    }

    /// Adds the write that persists the entry at `seq`.
    pub fn persist_entry(&self, seq: u64, batch: &mut WriteBatch) {
        let entry = self.get(seq).expect("persisting an assigned seq");
        batch.put(LOG_TABLE, log_key(self.id, seq), encode_entry(entry));
    }

    /// Adds the writes that persist the member list.
    pub fn persist_members(&self, batch: &mut WriteBatch) {
        for member in &self.members {
            batch.put(MEMBERS_TABLE, member_key(self.id, *member), Vec::new());
        }
    }

    /// Re-appends an entry read back from the store during recovery.
    pub fn restore_entry(&mut self, entry: LogEntry) -> Result<(), StoreError> {
        if entry.seq != self.head() + 1 {
            return Err(corrupt(
                LOG_TABLE,
                format!("seq {} follows {}", entry.seq, self.head()),
            ));
        }
        if self.dedup.contains_key(&(entry.sender, entry.msg_id)) {
            return Err(corrupt(LOG_TABLE, "a message id appears twice".to_string()));
        }
        self.push(entry);
        Ok(())
    }

    /// Adds a member read back from the store during recovery.
    pub fn restore_member(&mut self, device: DeviceId) {
        self.members.insert(device);
    }
}

fn corrupt(table: Table, reason: String) -> StoreError {
    StoreError::Corrupt {
        table: table.0,
        reason,
    }
}

/// The store key of a log entry.
pub fn log_key(conversation: ConversationId, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(24);
    key.extend_from_slice(&conversation.to_bytes());
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The store key of a membership.
pub fn member_key(conversation: ConversationId, device: DeviceId) -> Vec<u8> {
    let mut key = Vec::with_capacity(32);
    key.extend_from_slice(&conversation.to_bytes());
    key.extend_from_slice(&device.to_bytes());
    key
}

/// Splits a 32-byte key into two 128-bit ids.
pub fn split_pair_key(table: Table, key: &[u8]) -> Result<(u128, u128), StoreError> {
    let bytes: [u8; 32] = key
        .try_into()
        .map_err(|_| corrupt(table, format!("key of {} bytes, want 32", key.len())))?;
    let (a, b) = bytes.split_at(16);
    Ok((
        u128::from_be_bytes(a.try_into().expect("16 bytes")),
        u128::from_be_bytes(b.try_into().expect("16 bytes")),
    ))
}

/// Entry value: `seq(8) ++ sender(16) ++ msg_id(16) ++ body`.
fn encode_entry(entry: &LogEntry) -> Vec<u8> {
    let mut value = Vec::with_capacity(40 + entry.body.len());
    value.extend_from_slice(&entry.seq.to_be_bytes());
    value.extend_from_slice(&entry.sender.to_bytes());
    value.extend_from_slice(&entry.msg_id.to_bytes());
    value.extend_from_slice(&entry.body);
    value
}

/// Decodes a log entry read from the store, checking it against its key.
pub fn decode_entry(key: &[u8], value: &[u8]) -> Result<(ConversationId, LogEntry), StoreError> {
    if key.len() != 24 || value.len() < 40 {
        return Err(corrupt(
            LOG_TABLE,
            format!("key {} / value {} bytes", key.len(), value.len()),
        ));
    }
    let conversation = ConversationId::from_bytes(key[..16].try_into().expect("16 bytes"));
    let key_seq = u64::from_be_bytes(key[16..24].try_into().expect("8 bytes"));
    let seq = u64::from_be_bytes(value[..8].try_into().expect("8 bytes"));
    if seq != key_seq {
        return Err(corrupt(
            LOG_TABLE,
            format!("entry seq {seq} under key seq {key_seq}"),
        ));
    }
    let entry = LogEntry {
        seq,
        sender: DeviceId::from_bytes(value[8..24].try_into().expect("16 bytes")),
        msg_id: MsgId::from_bytes(value[24..40].try_into().expect("16 bytes")),
        body: Bytes::copy_from_slice(&value[40..]),
    };
    Ok((conversation, entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> ConversationLog {
        ConversationLog::new(ConversationId(7), [DeviceId(1), DeviceId(2)])
    }

    #[test]
    fn a_retry_gets_its_original_seq() {
        let mut log = log();
        let first = log
            .append(DeviceId(1), MsgId(10), Bytes::from_static(b"a"))
            .unwrap();
        let other = log
            .append(DeviceId(2), MsgId(10), Bytes::from_static(b"b"))
            .unwrap();
        let retry = log
            .append(DeviceId(1), MsgId(10), Bytes::from_static(b"a"))
            .unwrap();
        assert_eq!(first, Appended::New(1));
        assert_eq!(
            other,
            Appended::New(2),
            "the same msg id from another sender is another message"
        );
        assert_eq!(retry, Appended::Duplicate(1));
        assert_eq!(log.head(), 2);
    }

    #[test]
    fn a_non_member_cannot_send() {
        let mut log = log();
        let result = log.append(DeviceId(9), MsgId(1), Bytes::new());
        assert_eq!(result, Err(SequencerError::NotMember));
        assert_eq!(log.head(), 0);
    }

    #[test]
    fn entries_round_trip_through_their_store_encoding() {
        let mut log = log();
        log.append(DeviceId(2), MsgId(3), Bytes::from_static(b"hello"))
            .unwrap();
        let mut batch = WriteBatch::default();
        log.persist_entry(1, &mut batch);
        let crate::env::WriteOp::Put { key, value, .. } = &batch.ops()[0] else {
            panic!()
        };
        let (conv, entry) = decode_entry(key, value).unwrap();
        assert_eq!(conv, ConversationId(7));
        assert_eq!(&entry, log.get(1).unwrap());
    }

    #[test]
    fn a_corrupt_entry_is_an_error_not_a_panic() {
        let key = log_key(ConversationId(1), 5);
        assert!(decode_entry(&key, &[0; 39]).is_err());
        let mut value = vec![0; 40];
        value[7] = 4;
        assert!(
            decode_entry(&key, &value).is_err(),
            "seq in value must match the key"
        );
    }
}
