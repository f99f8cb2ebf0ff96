//! One conversation's log at its authority gateway: members, seq assignment, deduplication,
//! retention.
//!
//! The sequencer is the heart of delivery: it gives each accepted message the next `seq`, and a
//! message sent twice (a retry after a lost acknowledgement) gets its original `seq` back. It is
//! pure data; the [`crate::gateway`] state machine persists what it appends before anyone hears
//! of it.
//!
//! Retention: entries leave the front of the log once every member has acknowledged them or
//! once they are older than the retention limit ([`ConversationLog::collect_garbage`]). The
//! deduplication record of a message outlives its entry (`dedup_retention`), so that a sender
//! retrying an old message still gets its original seq rather than a second copy.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;

use crate::env::{StoreError, Table, WriteBatch};
use crate::ids::{ConversationId, DeviceId, MsgId};
use crate::time::Instant;

/// Table of log entries: key `conversation(16) ++ seq(8, big-endian)`, value an encoded entry.
pub const LOG_TABLE: Table = Table("log");
/// Table of members: key `conversation(16) ++ device(16)`, empty value.
pub const MEMBERS_TABLE: Table = Table("members");
/// Table of log bounds: key `conversation(16)`, value `head(8) ++ first_seq(8)`; written when
/// garbage collection moves `first_seq` (entries appended later extend the head).
pub const BOUNDS_TABLE: Table = Table("log_bounds");
/// Table of deduplication records, one chunk per garbage-collection step: key
/// `conversation(16) ++ first_seq(8)`, value `records` of [`DEDUP_RECORD_BYTES`] each
/// (`seq(8) ++ sender(16) ++ msg_id(16) ++ accepted_at(8)`, seqs contiguous from `first_seq`).
/// A chunk is written when garbage collection drops its entries (a retained entry is its own
/// record) and deleted when its last record expires, so a step costs one put however many
/// entries it drops. Stores from before chunks hold one record per key
/// (`conversation(16) ++ sender(16) ++ msg_id(16)` to `seq(8) ++ accepted_at(8)`); recovery
/// still reads those.
pub const DEDUP_TABLE: Table = Table("dedup");

/// Bytes of one record in a deduplication chunk.
pub const DEDUP_RECORD_BYTES: usize = 48;

/// One sequenced message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    /// Position in the conversation, from 1.
    pub seq: u64,
    /// Originating device.
    pub sender: DeviceId,
    /// The sender's message id.
    pub msg_id: MsgId,
    /// When the gateway sequenced it (gateway clock).
    pub accepted_at: Instant,
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

#[derive(Clone, Copy, Debug)]
struct DedupRecord {
    seq: u64,
    accepted_at: Instant,
}

/// The ordered, deduplicated log of one conversation.
#[derive(Clone, Debug)]
pub struct ConversationLog {
    id: ConversationId,
    members: BTreeSet<DeviceId>,
    /// Retained entries; `entries[0].seq == first_seq`.
    entries: VecDeque<LogEntry>,
    /// Beside each retained entry, the bytes of every body up to and including it since the
    /// conversation began (so the bytes after any seq are one subtraction).
    ends: VecDeque<u64>,
    /// Bytes of the bodies of the entries already dropped.
    dropped_bytes: u64,
    first_seq: u64,
    dedup: BTreeMap<(DeviceId, MsgId), DedupRecord>,
    /// Deduplication keys in seq order, for expiry.
    dedup_order: VecDeque<(u64, DeviceId, MsgId)>,
    /// Persisted deduplication chunks in seq order: `(last seq, store key)`; a chunk is deleted
    /// once its last record is forgotten.
    dedup_chunks: VecDeque<(u64, Vec<u8>)>,
    /// During recovery: the head the bounds record promised.
    expected_head: Option<u64>,
}

impl ConversationLog {
    /// An empty conversation with these members.
    pub fn new(id: ConversationId, members: impl IntoIterator<Item = DeviceId>) -> Self {
        ConversationLog {
            id,
            members: members.into_iter().collect(),
            entries: VecDeque::new(),
            ends: VecDeque::new(),
            dropped_bytes: 0,
            first_seq: 1,
            dedup: BTreeMap::new(),
            dedup_order: VecDeque::new(),
            dedup_chunks: VecDeque::new(),
            expected_head: None,
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

    /// The highest assigned seq (0 for a conversation that never had a message).
    pub fn head(&self) -> u64 {
        self.first_seq - 1 + self.entries.len() as u64
    }

    /// The lowest seq still retained (`head + 1` when nothing is retained).
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// Retained entries.
    pub fn retained(&self) -> usize {
        self.entries.len()
    }

    /// The entry at `seq`, if assigned and still retained.
    pub fn get(&self, seq: u64) -> Option<&LogEntry> {
        let index = seq.checked_sub(self.first_seq)?;
        self.entries.get(usize::try_from(index).ok()?)
    }

    /// Bytes of the bodies of the retained entries after `seq`.
    pub fn bytes_after(&self, seq: u64) -> u64 {
        let end = self.ends.back().copied().unwrap_or(self.dropped_bytes);
        let upto = match seq.checked_sub(self.first_seq) {
            None => self.dropped_bytes,
            Some(index) => match usize::try_from(index).ok().and_then(|i| self.ends.get(i)) {
                Some(upto) => *upto,
                None => end,
            },
        };
        end - upto
    }

    /// The retained entries, in seq order.
    pub fn entries(&self) -> impl Iterator<Item = &LogEntry> + '_ {
        self.entries.iter()
    }

    /// Offers a message; sequences it unless it is a duplicate.
    pub fn append(
        &mut self,
        now: Instant,
        sender: DeviceId,
        msg_id: MsgId,
        body: Bytes,
    ) -> Result<Appended, SequencerError> {
        // A copy of a message sequenced while its sender was a member gets its seq back even
        // if the sender has been removed since: it was sequenced, and must not be reported
        // refused.
        if let Some(record) = self.dedup.get(&(sender, msg_id)) {
            return Ok(Appended::Duplicate(record.seq));
        }
        if !self.is_member(sender) {
            return Err(SequencerError::NotMember);
        }
        Ok(Appended::New(self.push_next(now, sender, msg_id, body)))
    }

    /// Sequences a new message at the next seq.
    fn push_next(&mut self, now: Instant, sender: DeviceId, msg_id: MsgId, body: Bytes) -> u64 {
        let seq = self.head() + 1;
        self.push(LogEntry {
            seq,
            sender,
            msg_id,
            accepted_at: now,
            body,
        });
        seq
    }

    /// Offers a message of a device that is a member elsewhere: a device of another domain in
    /// a conversation homed here, whose gateway relayed it (the caller checked that it is a
    /// member there). Sequences it unless it is a duplicate.
    pub fn append_relayed(
        &mut self,
        now: Instant,
        sender: DeviceId,
        msg_id: MsgId,
        body: Bytes,
    ) -> Appended {
        if let Some(record) = self.dedup.get(&(sender, msg_id)) {
            return Appended::Duplicate(record.seq);
        }
        Appended::New(self.push_next(now, sender, msg_id, body))
    }

    /// Puts the message the conversation's authority (another domain's gateway) sequenced at
    /// `seq == head + 1` into this replica of its log. A record of the same message id at an
    /// earlier seq (the authority forgot it and sequenced a copy again) gives way to it.
    pub fn append_at(
        &mut self,
        now: Instant,
        seq: u64,
        sender: DeviceId,
        msg_id: MsgId,
        body: Bytes,
    ) {
        assert_eq!(seq, self.head() + 1, "a replica's entries are contiguous");
        if self.dedup.remove(&(sender, msg_id)).is_some() {
            self.dedup_order
                .retain(|&(_, s, m)| !(s == sender && m == msg_id));
        }
        self.push(LogEntry {
            seq,
            sender,
            msg_id,
            accepted_at: now,
            body,
        });
        // The window forgets in `dedup_order`'s order what `dedup` holds: the same messages.
        debug_assert_eq!(self.dedup.len(), self.dedup_order.len());
    }

    /// Sequences a message of the conversation's authority itself (an external proposal); its
    /// sender is [`AUTHORITY_SENDER`].
    pub fn append_by_authority(&mut self, now: Instant, msg_id: MsgId, body: Bytes) -> u64 {
        self.push_next(now, AUTHORITY_SENDER, msg_id, body)
    }

    /// Marks `head + 1 ..= upto` as lost: a device showed that it had read up to `upto`, so
    /// this gateway once sequenced those seqs and lost them with writes its disk had reported
    /// durable (a lying fsync). Each gets a placeholder entry from [`LOST_SENDER`], so that no
    /// seq a device has seen is ever given to another message, and devices behind are told of
    /// the loss as they reach it. The placeholder at `upto` keeps `read`, the id of the
    /// message the device read there ([`lost_read`]), so that a device that read another
    /// message at that seq (a second lossy crash gave it to another) is known to have diverged.
    /// `run`: where the device began reading in the gateway run its token names, and that
    /// run's stamp; each placeholder after that point keeps the stamp ([`lost_stamp`]), so
    /// that a device that read there in another run is known to have read other messages.
    /// Returns the first lost seq; the caller persists the placeholders with
    /// [`ConversationLog::persist_append`].
    pub fn fence(
        &mut self,
        now: Instant,
        upto: u64,
        read: Option<[u8; 16]>,
        run: Option<ReadRun>,
    ) -> u64 {
        let from = self.head() + 1;
        for seq in from..=upto {
            let id = read.filter(|_| seq == upto);
            let stamp = run.and_then(|run| run.stamp_at(seq));
            // Always the full length, a stamp or an id not known as zeros: a later device may
            // fill in the stamp ([`ConversationLog::stamp_lost`]) without moving the byte
            // counts of the entries after it.
            let mut body = Vec::with_capacity(PLACEHOLDER_BYTES);
            body.push(STAMPED);
            body.extend_from_slice(&stamp.unwrap_or_default());
            body.extend_from_slice(&id.unwrap_or_default());
            let body = Bytes::from(body);
            self.push(LogEntry {
                seq,
                sender: LOST_SENDER,
                msg_id: MsgId(u128::from(seq)),
                accepted_at: now,
                body,
            });
        }
        from
    }

    /// Gives the placeholders in `from..=to` that keep no run yet the stamp of the run in
    /// which a device read those seqs (`run`, but where it skipped them): the first device to show where
    /// it read them is the one the next devices are compared with (a fencer whose own reading
    /// of them began in an earlier run could not stamp them). Returns the seqs stamped; the
    /// caller persists them with [`ConversationLog::persist_append`].
    pub fn stamp_lost(&mut self, from: u64, to: u64, run: ReadRun) -> Vec<u64> {
        let mut stamped = Vec::new();
        for seq in from.max(self.first_seq)..=to.min(self.head()) {
            let Some(stamp) = run.stamp_at(seq) else {
                continue;
            };
            let Some(index) = usize::try_from(seq - self.first_seq).ok() else {
                break;
            };
            let Some(entry) = self.entries.get_mut(index) else {
                break;
            };
            let body = entry.body.as_ref();
            if entry.sender != LOST_SENDER
                || body.len() != PLACEHOLDER_BYTES
                || body[0] != STAMPED
                || body[1..17] != [0; 16]
            {
                continue;
            }
            let mut new = body.to_vec();
            new[1..17].copy_from_slice(&stamp);
            debug_assert_eq!(new.len(), entry.body.len(), "the byte counts stay");
            entry.body = Bytes::from(new);
            stamped.push(seq);
        }
        stamped
    }

    fn push(&mut self, entry: LogEntry) {
        assert_eq!(entry.seq, self.head() + 1, "log entries must be contiguous");
        let record = DedupRecord {
            seq: entry.seq,
            accepted_at: entry.accepted_at,
        };
        let previous = self.dedup.insert((entry.sender, entry.msg_id), record);
        assert!(previous.is_none(), "a message id must map to one seq");
        self.dedup_order
            .push_back((entry.seq, entry.sender, entry.msg_id));
        let before = self.ends.back().copied().unwrap_or(self.dropped_bytes);
        self.ends.push_back(before + entry.body.len() as u64);
        self.entries.push_back(entry);
        debug_assert_eq!(self.ends.len(), self.entries.len());
    }

    /// Adds the writes that persist the entry at `seq` (entry, bounds, deduplication record).
    ///
    /// One write per message on the hot path: the entry itself carries what deduplication and the
    /// log's bounds need while it is retained; its deduplication record and the new bounds are
    /// written when garbage collection drops it.
    pub fn persist_append(&self, seq: u64, batch: &mut WriteBatch) {
        let entry = self.get(seq).expect("persisting a retained seq");
        batch.put(LOG_TABLE, log_key(self.id, seq), encode_entry(entry));
    }

    fn persist_bounds(&self, batch: &mut WriteBatch) {
        let mut value = Vec::with_capacity(16);
        value.extend_from_slice(&self.head().to_be_bytes());
        value.extend_from_slice(&self.first_seq.to_be_bytes());
        batch.put(BOUNDS_TABLE, self.id.to_bytes().to_vec(), value);
    }

    /// Adds the writes that persist the member list.
    pub fn persist_members(&self, batch: &mut WriteBatch) {
        for member in &self.members {
            batch.put(MEMBERS_TABLE, member_key(self.id, *member), Vec::new());
        }
    }

    /// Drops up to `limit` entries from the front that every member has acknowledged
    /// (`seq <= acked_by_all`) or that were sequenced before `expire_before`, and deduplication
    /// records sequenced before `dedup_expire_before` whose entries are gone. Shows each entry
    /// to `dropping` before it goes; returns how many entries were dropped.
    pub fn collect_garbage(
        &mut self,
        acked_by_all: u64,
        expire_before: Instant,
        dedup_expire_before: Instant,
        limit: usize,
        batch: &mut WriteBatch,
        dropping: &mut dyn FnMut(&LogEntry),
    ) -> usize {
        let mut dropped = 0;
        let chunk_first = self.first_seq;
        let mut chunk = Vec::new();
        while dropped < limit {
            let Some(front) = self.entries.front() else {
                break;
            };
            if front.seq > acked_by_all && front.accepted_at >= expire_before {
                break;
            }
            dropping(front);
            batch.delete(LOG_TABLE, log_key(self.id, front.seq));
            // The entry's deduplication record outlives it, in this step's chunk.
            chunk.extend_from_slice(&front.seq.to_be_bytes());
            chunk.extend_from_slice(&front.sender.to_bytes());
            chunk.extend_from_slice(&front.msg_id.to_bytes());
            chunk.extend_from_slice(&front.accepted_at.0.to_be_bytes());
            self.entries.pop_front();
            self.dropped_bytes = self.ends.pop_front().expect("one end per entry");
            self.first_seq += 1;
            dropped += 1;
        }
        if dropped > 0 {
            let key = log_key(self.id, chunk_first);
            batch.put(DEDUP_TABLE, key.clone(), chunk);
            self.dedup_chunks.push_back((self.first_seq - 1, key));
        }
        let mut forgotten = 0;
        while forgotten < limit {
            let Some(&(seq, sender, msg_id)) = self.dedup_order.front() else {
                break;
            };
            let record = self.dedup[&(sender, msg_id)];
            if seq >= self.first_seq || record.accepted_at >= dedup_expire_before {
                break;
            }
            self.dedup_order.pop_front();
            self.dedup.remove(&(sender, msg_id));
            while self
                .dedup_chunks
                .front()
                .is_some_and(|(last, _)| *last <= seq)
            {
                let (_, key) = self.dedup_chunks.pop_front().expect("checked");
                batch.delete(DEDUP_TABLE, key);
            }
            forgotten += 1;
        }
        if dropped > 0 {
            self.persist_bounds(batch);
        }
        debug_assert!(self.first_seq <= self.head() + 1);
        dropped
    }

    /// Restores the bounds read back from the store during recovery.
    ///
    /// The bounds are written when garbage collection moves `first_seq`; entries appended since
    /// then extend the head beyond the recorded one.
    pub fn restore_bounds(&mut self, head: u64, first_seq: u64) -> Result<(), StoreError> {
        if first_seq == 0 || first_seq > head + 1 || !self.entries.is_empty() {
            return Err(corrupt(
                BOUNDS_TABLE,
                format!("bounds head {head} first {first_seq}"),
            ));
        }
        self.first_seq = first_seq;
        // Entries are restored next; the head must end at or after the recorded one.
        self.expected_head = Some(head);
        Ok(())
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

    /// Restores a deduplication chunk (stored under `key`) during recovery.
    pub fn restore_dedup_chunk(&mut self, key: Vec<u8>, records: &[DedupEntry]) {
        let Some(last) = records.iter().map(|r| r.seq).max() else {
            return;
        };
        for r in records {
            self.dedup.insert(
                (r.sender, r.msg_id),
                DedupRecord {
                    seq: r.seq,
                    accepted_at: r.accepted_at,
                },
            );
            self.dedup_order.push_back((r.seq, r.sender, r.msg_id));
        }
        self.dedup_chunks.push_back((last, key));
    }

    /// Checks a recovered log for consistency and orders its deduplication records.
    pub fn finish_restore(&mut self) -> Result<(), StoreError> {
        if let Some(recorded) = self.expected_head.take() {
            if recorded > self.head() {
                return Err(corrupt(
                    LOG_TABLE,
                    format!(
                        "{}: bounds say head {recorded}, entries end at {}",
                        self.id,
                        self.head()
                    ),
                ));
            }
        }
        let mut order: Vec<_> = self.dedup_order.drain(..).collect();
        order.sort_unstable();
        self.dedup_order = order.into();
        let mut chunks: Vec<_> = self.dedup_chunks.drain(..).collect();
        chunks.sort_unstable();
        self.dedup_chunks = chunks.into();
        Ok(())
    }

    /// The seq an earlier copy of this message got, if it is a duplicate.
    pub fn duplicate_of(&self, sender: DeviceId, msg_id: MsgId) -> Option<u64> {
        self.dedup.get(&(sender, msg_id)).map(|r| r.seq)
    }

    /// Planted bug [`crate::planted::PlantedBug::DedupForgets`] (simulator only): forgets the
    /// duplicate record of a message once two newer ones are sequenced after it.
    pub fn forget_old_duplicate(&mut self, sender: DeviceId, msg_id: MsgId) {
        let head = self.head();
        if self
            .dedup
            .get(&(sender, msg_id))
            .is_some_and(|r| r.seq + 2 <= head)
        {
            self.dedup.remove(&(sender, msg_id));
        }
    }

    /// Adds a member (a commit added its device) and the write that persists it.
    pub fn add_member(&mut self, device: DeviceId, batch: &mut WriteBatch) {
        if self.members.insert(device) {
            batch.put(MEMBERS_TABLE, member_key(self.id, device), Vec::new());
        }
    }

    /// Removes a member (a commit removed its device) and adds the write that persists it.
    pub fn remove_member(&mut self, device: DeviceId, batch: &mut WriteBatch) {
        if self.members.remove(&device) {
            batch.delete(MEMBERS_TABLE, member_key(self.id, device));
        }
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

/// The sender of what the gateway itself puts in a log (no device has id 0: device ids are
/// hashes of keys).
pub const AUTHORITY_SENDER: DeviceId = DeviceId(0);

/// The sender of the placeholders for seqs the gateway lost ([`ConversationLog::fence`]).
pub const LOST_SENDER: DeviceId = DeviceId(1);

/// The first byte of a placeholder's body that keeps the run its seq was read in.
const STAMPED: u8 = b'R';

/// Where a device began reading a conversation in a gateway run, and that run's stamp (a
/// resume token's first 16 bytes): it read every seq after `since` there, but the stretch it
/// `skipped` (told they were lost, or past the replay window).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadRun {
    /// The cursor before its first read in the run.
    pub since: u64,
    /// The run's stamp.
    pub stamp: [u8; 16],
    /// Seqs after `since` it did not read there, first and last.
    pub skipped: Option<(u64, u64)>,
}

impl ReadRun {
    /// The run's stamp if the device read `seq` in it.
    pub fn stamp_at(&self, seq: u64) -> Option<[u8; 16]> {
        let skipped = self
            .skipped
            .is_some_and(|(from, to)| (from..=to).contains(&seq));
        (seq > self.since && !skipped && self.stamp != [0; 16]).then_some(self.stamp)
    }
}

/// The length of a placeholder's body as [`ConversationLog::fence`] writes it.
const PLACEHOLDER_BYTES: usize = 33;

/// The id of the message a device had read at a lost seq, if a placeholder ([`LOST_SENDER`])
/// keeps one. A placeholder's body is [`STAMPED`], the stamp of the gateway run a device read
/// the seq in (16, see [`lost_stamp`]) and the id (16), each all zeros if not known; bodies
/// written before were empty, the id alone, or [`STAMPED`] and the stamp alone.
pub fn lost_read(entry: &LogEntry) -> Option<[u8; 16]> {
    debug_assert_eq!(entry.sender, LOST_SENDER);
    let body = entry.body.as_ref();
    let id: [u8; 16] = match body.len() {
        16 => body.try_into().ok()?,
        PLACEHOLDER_BYTES if body[0] == STAMPED => body[17..].try_into().ok()?,
        _ => return None,
    };
    (id != [0; 16]).then_some(id)
}

/// The stamp of the gateway run in which a device read this lost seq, if a placeholder
/// ([`LOST_SENDER`]) keeps one (see [`lost_read`]).
pub fn lost_stamp(entry: &LogEntry) -> Option<[u8; 16]> {
    debug_assert_eq!(entry.sender, LOST_SENDER);
    let body = entry.body.as_ref();
    let stamp: [u8; 16] = match body.len() {
        17 | PLACEHOLDER_BYTES if body[0] == STAMPED => body[1..17].try_into().ok()?,
        _ => return None,
    };
    (stamp != [0; 16]).then_some(stamp)
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

fn u128_at(bytes: &[u8], at: usize) -> u128 {
    u128::from_be_bytes(bytes[at..at + 16].try_into().expect("16 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Splits a 32-byte key into two 128-bit ids.
pub fn split_pair_key(table: Table, key: &[u8]) -> Result<(u128, u128), StoreError> {
    if key.len() != 32 {
        return Err(corrupt(
            table,
            format!("key of {} bytes, want 32", key.len()),
        ));
    }
    Ok((u128_at(key, 0), u128_at(key, 16)))
}

/// Decodes a bounds record: `(conversation, head, first_seq)`.
pub fn decode_bounds(key: &[u8], value: &[u8]) -> Result<(ConversationId, u64, u64), StoreError> {
    if key.len() != 16 || value.len() != 16 {
        return Err(corrupt(
            BOUNDS_TABLE,
            format!("key {} / value {} bytes", key.len(), value.len()),
        ));
    }
    Ok((
        ConversationId(u128_at(key, 0)),
        u64_at(value, 0),
        u64_at(value, 8),
    ))
}

/// One deduplication record read back from the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DedupEntry {
    /// The seq the message got.
    pub seq: u64,
    /// Its sender.
    pub sender: DeviceId,
    /// The sender's message id.
    pub msg_id: MsgId,
    /// When it was sequenced.
    pub accepted_at: Instant,
}

/// Most records one stored chunk may hold (a chunk is one GC step, bounded by `gc_batch_max`).
pub const DEDUP_CHUNK_RECORDS_MAX: usize = 1 << 20;

/// Decodes a deduplication chunk, or a single record of the pre-chunk format:
/// `(conversation, records)`.
pub fn decode_dedup(
    key: &[u8],
    value: &[u8],
) -> Result<(ConversationId, Vec<DedupEntry>), StoreError> {
    match key.len() {
        24 => {
            let first = u64_at(key, 16);
            if value.is_empty()
                || value.len() % DEDUP_RECORD_BYTES != 0
                || value.len() / DEDUP_RECORD_BYTES > DEDUP_CHUNK_RECORDS_MAX
            {
                return Err(corrupt(
                    DEDUP_TABLE,
                    format!("chunk of {} bytes", value.len()),
                ));
            }
            let records: Vec<DedupEntry> = value
                .chunks_exact(DEDUP_RECORD_BYTES)
                .map(|r| DedupEntry {
                    seq: u64_at(r, 0),
                    sender: DeviceId(u128_at(r, 8)),
                    msg_id: MsgId(u128_at(r, 24)),
                    accepted_at: Instant(u64_at(r, 40)),
                })
                .collect();
            let contiguous = records
                .iter()
                .enumerate()
                .all(|(i, r)| Some(r.seq) == first.checked_add(i as u64));
            if !contiguous {
                return Err(corrupt(
                    DEDUP_TABLE,
                    format!("chunk from seq {first} is not contiguous"),
                ));
            }
            Ok((ConversationId(u128_at(key, 0)), records))
        }
        48 if value.len() == 16 => Ok((
            ConversationId(u128_at(key, 0)),
            vec![DedupEntry {
                seq: u64_at(value, 0),
                sender: DeviceId(u128_at(key, 16)),
                msg_id: MsgId(u128_at(key, 32)),
                accepted_at: Instant(u64_at(value, 8)),
            }],
        )),
        _ => Err(corrupt(
            DEDUP_TABLE,
            format!("key {} / value {} bytes", key.len(), value.len()),
        )),
    }
}

/// Entry value: `seq(8) ++ sender(16) ++ msg_id(16) ++ accepted_at(8) ++ body`.
fn encode_entry(entry: &LogEntry) -> Vec<u8> {
    let mut value = Vec::with_capacity(48 + entry.body.len());
    value.extend_from_slice(&entry.seq.to_be_bytes());
    value.extend_from_slice(&entry.sender.to_bytes());
    value.extend_from_slice(&entry.msg_id.to_bytes());
    value.extend_from_slice(&entry.accepted_at.0.to_be_bytes());
    value.extend_from_slice(&entry.body);
    value
}

/// Decodes a log entry read from the store, checking it against its key.
pub fn decode_entry(key: &[u8], value: &[u8]) -> Result<(ConversationId, LogEntry), StoreError> {
    if key.len() != 24 || value.len() < 48 {
        return Err(corrupt(
            LOG_TABLE,
            format!("key {} / value {} bytes", key.len(), value.len()),
        ));
    }
    let conversation = ConversationId(u128_at(key, 0));
    let key_seq = u64_at(key, 16);
    let seq = u64_at(value, 0);
    if seq != key_seq {
        return Err(corrupt(
            LOG_TABLE,
            format!("entry seq {seq} under key seq {key_seq}"),
        ));
    }
    let entry = LogEntry {
        seq,
        sender: DeviceId(u128_at(value, 8)),
        msg_id: MsgId(u128_at(value, 24)),
        accepted_at: Instant(u64_at(value, 40)),
        body: Bytes::copy_from_slice(&value[48..]),
    };
    Ok((conversation, entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> ConversationLog {
        ConversationLog::new(ConversationId(7), [DeviceId(1), DeviceId(2)])
    }

    fn at(s: u64) -> Instant {
        Instant(s * 1_000_000)
    }

    #[test]
    fn a_copy_from_a_sender_removed_since_keeps_its_seq_and_a_new_message_is_refused() {
        let mut log = log();
        let body = Bytes::from_static(b"m");
        assert_eq!(
            log.append(at(1), DeviceId(1), MsgId(5), body.clone()),
            Ok(Appended::New(1))
        );
        log.remove_member(DeviceId(1), &mut WriteBatch::default());
        assert_eq!(
            log.append(at(2), DeviceId(1), MsgId(5), body.clone()),
            Ok(Appended::Duplicate(1)),
            "sequenced while a member: not refused"
        );
        assert_eq!(
            log.append(at(2), DeviceId(1), MsgId(6), body),
            Err(SequencerError::NotMember)
        );
    }

    #[test]
    fn a_copy_sequenced_again_at_a_replica_keeps_the_senders_other_messages_in_the_window() {
        // Found by the mutation run (`&&` for `||` in `append_at` survived the simulator: a
        // window that forgets too early only costs a retry's deduplication).
        let mut log = log();
        let body = Bytes::from_static(b"m");
        log.append_at(at(1), 1, DeviceId(1), MsgId(5), body.clone());
        log.append_at(at(1), 2, DeviceId(1), MsgId(6), body.clone());
        log.append_at(at(1), 3, DeviceId(2), MsgId(5), body.clone());
        // The authority forgot seq 1 and sequenced the copy again.
        log.append_at(at(2), 4, DeviceId(1), MsgId(5), body);
        let order: Vec<_> = log.dedup_order.iter().copied().collect();
        assert_eq!(
            order,
            [
                (2, DeviceId(1), MsgId(6)),
                (3, DeviceId(2), MsgId(5)),
                (4, DeviceId(1), MsgId(5)),
            ]
        );
        assert_eq!(log.dedup.len(), order.len());
    }

    /// One step of [`garbage_collection_keeps_what_it_must_and_forgets_what_it_may`].
    #[derive(Clone, Debug)]
    enum GcStep {
        /// Device 1..=3 sends message id 0..8 (a retry when it sent that id before).
        Send(u8, u8),
        /// Time goes on by this many seconds.
        Wait(u8),
        /// Garbage collection with every member's acknowledgement up to this many entries
        /// behind the head, and this limit.
        Collect(u8, u8),
    }

    fn gc_step() -> impl proptest::strategy::Strategy<Value = GcStep> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (1u8..=3, 0u8..8).prop_map(|(d, m)| GcStep::Send(d, m)),
            2 => (1u8..20).prop_map(GcStep::Wait),
            2 => (0u8..6, 1u8..6).prop_map(|(b, l)| GcStep::Collect(b, l)),
        ]
    }

    proptest::proptest! {
        /// Found missing by the mutation run: five mutants of `collect_garbage` (no collection
        /// at all, records forgotten while their entry is retained, one record forgotten per
        /// call, bounds written when nothing moved, a chunk's last seq off by one) passed the
        /// simulator, whose runs rarely retry a message after its entry is gone. Here, after
        /// every step: a retry of a message whose entry is retained or whose window has not
        /// passed gets its seq back; collection drops exactly the entries it may up to its
        /// limit, and forgets exactly the records it may up to its limit; a step that moves
        /// nothing writes nothing; and a persisted deduplication chunk is deleted exactly when
        /// the last of its records is forgotten.
        #[test]
        fn garbage_collection_keeps_what_it_must_and_forgets_what_it_may(
            steps in proptest::collection::vec(gc_step(), 1..120),
        ) {
            const RETENTION_S: u64 = 60;
            const WINDOW_S: u64 = 30;
            let mut log = ConversationLog::new(ConversationId(3), [DeviceId(1), DeviceId(2), DeviceId(3)]);
            let mut now = 1_000u64;
            // Every message sequenced: (sender, msg id) -> (seq, accepted at, seconds).
            let mut sent: BTreeMap<(DeviceId, MsgId), (u64, u64)> = BTreeMap::new();
            // Persisted deduplication chunks: store key -> seqs it covers.
            let mut chunks: BTreeMap<Vec<u8>, (u64, u64)> = BTreeMap::new();
            for step in steps {
                match step {
                    GcStep::Send(d, m) => {
                        let (sender, msg) = (DeviceId(u128::from(d)), MsgId(u128::from(m)));
                        let got = log.append(at(now), sender, msg, Bytes::from_static(b"x")).unwrap();
                        match got {
                            Appended::New(seq) => {
                                sent.insert((sender, msg), (seq, now));
                            }
                            Appended::Duplicate(seq) => {
                                proptest::prop_assert_eq!(sent.get(&(sender, msg)).map(|s| s.0), Some(seq));
                            }
                        }
                    }
                    GcStep::Wait(s) => now += u64::from(s),
                    GcStep::Collect(behind, limit) => {
                        let acked = log.head().saturating_sub(u64::from(behind));
                        let (expire, dexp) = (at(now - RETENTION_S.min(now)), at(now - WINDOW_S.min(now)));
                        let limit = usize::from(limit);
                        let may_drop = log
                            .entries
                            .iter()
                            .take_while(|e| e.seq <= acked || e.accepted_at < expire)
                            .count()
                            .min(limit);
                        let first_after = log.first_seq + may_drop as u64;
                        let may_forget = log
                            .dedup_order
                            .iter()
                            .take_while(|(seq, s, m)| {
                                *seq < first_after && log.dedup[&(*s, *m)].accepted_at < dexp
                            })
                            .count()
                            .min(limit);
                        let (records, chunk_first) = (log.dedup.len(), log.first_seq);
                        let mut batch = WriteBatch::default();
                        let dropped = log.collect_garbage(acked, expire, dexp, limit, &mut batch, &mut |_| {});
                        proptest::prop_assert_eq!(dropped, may_drop);
                        proptest::prop_assert_eq!(records - log.dedup.len(), may_forget);
                        if dropped == 0 && may_forget == 0 {
                            proptest::prop_assert!(batch.ops().is_empty(), "nothing moved, nothing written");
                        }
                        for op in batch.ops() {
                            match op {
                                crate::env::WriteOp::Put { table, key, .. } if *table == DEDUP_TABLE => {
                                    chunks.insert(key.clone(), (chunk_first, log.first_seq - 1));
                                }
                                crate::env::WriteOp::Delete { table, key } if *table == DEDUP_TABLE => {
                                    let range = chunks.remove(key);
                                    proptest::prop_assert!(range.is_some(), "a chunk deleted twice or never written");
                                    let (first, last) = range.unwrap();
                                    proptest::prop_assert!(
                                        !log.dedup.values().any(|r| (first..=last).contains(&r.seq)),
                                        "chunk {}..={} deleted while it holds a record kept", first, last
                                    );
                                }
                                _ => {}
                            }
                        }
                    }
                }
                proptest::prop_assert_eq!(log.dedup.len(), log.dedup_order.len());
                for (&(sender, msg), &(seq, when)) in &sent {
                    let must_keep = seq >= log.first_seq || when + WINDOW_S > now;
                    if must_keep {
                        let mut probe = log.clone();
                        proptest::prop_assert_eq!(
                            probe.append(at(now), sender, msg, Bytes::new()),
                            Ok(Appended::Duplicate(seq)),
                            "a retry of seq {} forgotten too early", seq
                        );
                    }
                }
                for (first, last) in chunks.values() {
                    proptest::prop_assert!(
                        log.dedup.values().any(|r| (*first..=*last).contains(&r.seq)),
                        "chunk {}..={} kept after all its records were forgotten", first, last
                    );
                }
            }
        }
    }

    #[test]
    fn a_log_whose_last_entries_are_missing_at_recovery_is_corrupt() {
        // Found missing by the mutation run: `finish_restore` doing nothing passed the
        // simulator, whose disks never lose a committed row.
        let mut restored = ConversationLog::new(ConversationId(7), [DeviceId(1)]);
        restored.restore_bounds(3, 1).unwrap();
        for seq in 1..=2 {
            restored
                .restore_entry(LogEntry {
                    seq,
                    sender: DeviceId(1),
                    msg_id: MsgId(u128::from(seq)),
                    accepted_at: at(1),
                    body: Bytes::new(),
                })
                .unwrap();
        }
        let error = restored.finish_restore().unwrap_err().to_string();
        assert!(
            error.contains("bounds say head 3, entries end at 2"),
            "{error}"
        );
        // Deduplication chunks read back in any order are put back in seq order.
        let mut log = ConversationLog::new(ConversationId(7), [DeviceId(1)]);
        log.restore_bounds(0, 1).unwrap();
        log.dedup_order.push_back((9, DeviceId(1), MsgId(9)));
        log.dedup_order.push_back((4, DeviceId(1), MsgId(4)));
        log.finish_restore().unwrap();
        assert_eq!(log.dedup_order.front().map(|r| r.0), Some(4));
    }

    #[test]
    fn a_lost_seq_keeps_the_read_message_id_only_when_a_cursor_named_one() {
        // Found missing by the mutation run: `lost_read` always naming a message passed the
        // simulator.
        let mut log = log();
        log.append(at(1), DeviceId(2), MsgId(1), Bytes::from_static(b"a"))
            .unwrap();
        // The gateway lost seqs 2 and 3; a device's cursor named the message it read at 3.
        assert_eq!(log.fence(at(2), 3, Some([7; 16]), None), 2);
        assert_eq!(log.get(2).map(lost_read), Some(None));
        assert_eq!(log.get(3).map(lost_read), Some(Some([7; 16])));
    }

    #[test]
    fn a_retry_gets_its_original_seq() {
        let mut log = log();
        let first = log
            .append(at(0), DeviceId(1), MsgId(10), Bytes::from_static(b"a"))
            .unwrap();
        let other = log
            .append(at(0), DeviceId(2), MsgId(10), Bytes::from_static(b"b"))
            .unwrap();
        let retry = log
            .append(at(0), DeviceId(1), MsgId(10), Bytes::from_static(b"a"))
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
        let result = log.append(at(0), DeviceId(9), MsgId(1), Bytes::new());
        assert_eq!(result, Err(SequencerError::NotMember));
        assert_eq!(log.head(), 0);
    }

    #[test]
    fn entries_round_trip_through_their_store_encoding() {
        let mut log = log();
        log.append(at(3), DeviceId(2), MsgId(3), Bytes::from_static(b"hello"))
            .unwrap();
        let mut batch = WriteBatch::default();
        log.persist_append(1, &mut batch);
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
        assert!(decode_entry(&key, &[0; 47]).is_err());
        let mut value = vec![0; 48];
        value[7] = 4;
        assert!(
            decode_entry(&key, &value).is_err(),
            "seq in value must match the key"
        );
    }

    #[test]
    fn garbage_collection_drops_acknowledged_and_expired_entries_from_the_front() {
        let mut log = log();
        for i in 0..10 {
            log.append(at(i), DeviceId(1), MsgId(u128::from(i)), Bytes::new())
                .unwrap();
        }
        let mut batch = WriteBatch::default();
        // Acknowledged by all up to 3; nothing expired yet.
        assert_eq!(
            log.collect_garbage(3, at(0), at(0), 100, &mut batch, &mut |_| {}),
            3
        );
        assert_eq!((log.first_seq(), log.head()), (4, 10));
        assert!(log.get(3).is_none() && log.get(4).is_some());
        // Entries sequenced before 7s are past retention, acknowledged or not; at most 2 a pass.
        assert_eq!(
            log.collect_garbage(3, at(7), at(0), 2, &mut batch, &mut |_| {}),
            2
        );
        assert_eq!(
            log.collect_garbage(3, at(7), at(0), 100, &mut batch, &mut |_| {}),
            2
        );
        assert_eq!(log.first_seq(), 8);
        // Deduplication outlives the entry until its own expiry.
        assert_eq!(
            log.append(at(20), DeviceId(1), MsgId(0), Bytes::new())
                .unwrap(),
            Appended::Duplicate(1)
        );
        log.collect_garbage(0, at(0), at(5), 100, &mut batch, &mut |_| {});
        assert_eq!(
            log.append(at(20), DeviceId(1), MsgId(0), Bytes::new())
                .unwrap(),
            Appended::New(11)
        );
        assert_eq!(
            log.append(at(20), DeviceId(1), MsgId(6), Bytes::new())
                .unwrap(),
            Appended::Duplicate(7)
        );
    }

    fn dedup_keys(store: &crate::env::MemStore) -> usize {
        store.table_len(DEDUP_TABLE)
    }

    /// Rebuilds a log from `store` the way gateway recovery does.
    fn recovered(store: &crate::env::MemStore) -> ConversationLog {
        use crate::env::scan_all;
        let mut log = log();
        scan_all(store, BOUNDS_TABLE, |k, v| {
            let (_, head, first) = decode_bounds(k, v)?;
            log.restore_bounds(head, first)
        })
        .unwrap();
        scan_all(store, DEDUP_TABLE, |k, v| {
            let (_, records) = decode_dedup(k, v)?;
            log.restore_dedup_chunk(k.to_vec(), &records);
            Ok(())
        })
        .unwrap();
        scan_all(store, LOG_TABLE, |k, v| {
            log.restore_entry(decode_entry(k, v)?.1)
        })
        .unwrap();
        log.finish_restore().unwrap();
        log
    }

    #[test]
    fn each_gc_step_writes_one_dedup_chunk_and_expiry_deletes_it() {
        use crate::env::{MemStore, Store};
        let mut store = MemStore::default();
        let mut log = log();
        let mut batch = WriteBatch::default();
        for i in 0..10 {
            log.append(at(i), DeviceId(1), MsgId(u128::from(i)), Bytes::new())
                .unwrap();
            log.persist_append(i + 1, &mut batch);
        }
        store.commit(batch.take()).unwrap();
        // Two steps of 4, one of 2: three chunks, each one put.
        for expected in [4, 4, 2] {
            assert_eq!(
                log.collect_garbage(10, at(0), at(0), 4, &mut batch, &mut |_| {}),
                expected
            );
            let puts = batch
                .ops()
                .iter()
                .filter(|op| matches!(op, crate::env::WriteOp::Put { table, .. } if *table == DEDUP_TABLE))
                .count();
            assert_eq!(puts, 1);
            store.commit(batch.take()).unwrap();
        }
        assert_eq!(dedup_keys(&store), 3);
        assert_eq!(store.table_len(LOG_TABLE), 0);
        // Recovery reads the chunks back: every retry still gets its original seq.
        let mut back = recovered(&store);
        for i in 0..10u64 {
            assert_eq!(
                back.append(at(11), DeviceId(1), MsgId(u128::from(i)), Bytes::new()),
                Ok(Appended::Duplicate(i + 1))
            );
        }
        // Records sequenced before 6 s expire: chunk 1-4 goes, chunk 5-8 stays (7 and 8 live).
        log.collect_garbage(10, at(0), at(6), 100, &mut batch, &mut |_| {});
        store.commit(batch.take()).unwrap();
        assert_eq!(dedup_keys(&store), 2);
        log.collect_garbage(10, at(0), at(100), 100, &mut batch, &mut |_| {});
        store.commit(batch.take()).unwrap();
        assert_eq!(dedup_keys(&store), 0, "every chunk expired");
        let mut back = recovered(&store);
        assert_eq!(
            back.append(at(101), DeviceId(1), MsgId(3), Bytes::new()),
            Ok(Appended::New(11))
        );
    }

    #[test]
    fn a_record_of_the_pre_chunk_format_is_still_read() {
        let mut key = ConversationId(7).to_bytes().to_vec();
        key.extend_from_slice(&DeviceId(1).to_bytes());
        key.extend_from_slice(&MsgId(5).to_bytes());
        let mut value = 3u64.to_be_bytes().to_vec();
        value.extend_from_slice(&9u64.to_be_bytes());
        let (conv, records) = decode_dedup(&key, &value).unwrap();
        assert_eq!(conv, ConversationId(7));
        assert_eq!(
            records,
            vec![DedupEntry {
                seq: 3,
                sender: DeviceId(1),
                msg_id: MsgId(5),
                accepted_at: Instant(9)
            }]
        );
    }

    #[test]
    fn corrupt_dedup_chunks_are_errors_not_panics() {
        let key = log_key(ConversationId(7), 5);
        let record = |seq: u64| {
            let mut r = seq.to_be_bytes().to_vec();
            r.extend_from_slice(&[0; 40]);
            r
        };
        assert!(decode_dedup(&key, &[]).is_err(), "empty");
        assert!(decode_dedup(&key, &[0; 47]).is_err(), "partial record");
        assert!(
            decode_dedup(&key, &record(6)).is_err(),
            "does not start at the key's seq"
        );
        let mut gap = record(5);
        gap.extend(record(7));
        assert!(decode_dedup(&key, &gap).is_err(), "not contiguous");
        assert!(decode_dedup(&key[..20], &record(5)).is_err(), "key length");
        let mut two = record(5);
        two.extend(record(6));
        assert_eq!(decode_dedup(&key, &two).unwrap().1.len(), 2);
    }
}
