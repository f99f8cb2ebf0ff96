//! Delivery: conversation logs, member cursors, per-session delivery windows, device inboxes and
//! garbage collection.
//!
//! Delivery to each device and conversation is a sliding window over the log: up to
//! `delivery_window` unacknowledged messages in flight on the device's session; if its
//! acknowledgement cursor stalls for `redeliver_after`, the window rewinds to the cursor, and a
//! replay request rewinds it to where the device asks. Acknowledgements move the device's durable
//! cursor. Inboxes hold what a device must see outside a conversation's log: the Welcome of a
//! group that added it (its stream waits for it) and the notice of a removal, both resent until
//! acknowledged. Garbage collection drops, in bounded steps, what every member acknowledged or
//! what passed retention.
//!
//! Invariants: for every window `acked <= sent_upto <= head` and `sent_upto - acked <=
//! delivery_window`; a conversation's seqs are contiguous from its first retained seq to its
//! head (the sequencer asserts it).

mod inboxes;
mod runs;

pub use runs::{Runs, RUNS_TABLE, RUN_STARTS_TABLE, TOKEN_STAMP_BYTES};

use inboxes::send_inbox_item;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;

use super::groups::{Change, GroupState, Groups, GROUPS_TABLE};
use super::sender_order::SenderOrder;
use super::sequencer::{
    decode_bounds, decode_dedup, decode_entry, lost_read, lost_stamp, split_pair_key, Appended,
    ConversationLog, ReadRun, SequencerError, BOUNDS_TABLE, DEDUP_TABLE, LOG_TABLE, LOST_SENDER,
    MEMBERS_TABLE,
};
use super::session::Sessions;
use super::{Fx, Refusal};
use crate::env::{scan_all, StoreError, StoreRead, Table, WriteBatch};
use crate::ids::{ConnectionId, ConversationId, DeviceId, MsgId};
use crate::mls::group_ops::GroupKind;
use crate::time::Instant;
use crate::wire::payload::{
    Cursor, Deliver, ErrorCode, ErrorReport, Payload, Removed, RosterEntry, Welcome,
};
use crate::wire::Routing;

/// Table of per-device acknowledgement cursors: key `device(16) ++ conversation(16)`, value seq.
pub const CURSORS_TABLE: Table = Table("cursors");

/// Table of device inboxes (Welcomes and removal notices): key `device(16) ++
/// conversation(16)`, value `tag(1) ++ seq(8) ++ kind(1) ++ welcome` (tag 1 Welcome, 2 Removed).
pub const INBOX_TABLE: Table = Table("inbox");

/// Table of departing devices (removed before they read everything sequenced while they were
/// members): key `device(16) ++ conversation(16)`, value the removing commit's seq (8,
/// big-endian).
pub const DEPARTING_TABLE: Table = Table("departing");

/// What waits in a device's inbox for one conversation until the device acknowledges `seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum InboxItem {
    /// The commit at `seq` added the device; it joins with the Welcome.
    Welcome {
        seq: u64,
        kind: GroupKind,
        welcome: Bytes,
    },
    /// The commit at `seq` removed the device.
    Removed { seq: u64 },
    /// What the device read up to `seq` is not what the gateway holds there (it lost messages
    /// the device had read and gave their seqs to others). Delivery of the conversation waits
    /// until the device acknowledges the notice, so that it cannot be lost unseen.
    Diverged { seq: u64 },
}

impl InboxItem {
    fn seq(&self) -> u64 {
        match self {
            InboxItem::Welcome { seq, .. }
            | InboxItem::Removed { seq }
            | InboxItem::Diverged { seq } => *seq,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut value = Vec::new();
        match self {
            InboxItem::Welcome { seq, kind, welcome } => {
                value.push(1);
                value.extend_from_slice(&seq.to_be_bytes());
                value.push(*kind as u8);
                value.extend_from_slice(welcome);
            }
            InboxItem::Removed { seq } => {
                value.push(2);
                value.extend_from_slice(&seq.to_be_bytes());
                value.push(0);
            }
            InboxItem::Diverged { seq } => {
                value.push(3);
                value.extend_from_slice(&seq.to_be_bytes());
                value.push(0);
            }
        }
        value
    }

    fn decode(value: &[u8]) -> Result<InboxItem, StoreError> {
        let corrupt = |reason: &str| StoreError::Corrupt {
            table: INBOX_TABLE.0,
            reason: reason.to_string(),
        };
        if value.len() < 10 {
            return Err(corrupt("record shorter than 10 bytes"));
        }
        let seq = u64::from_be_bytes(value[1..9].try_into().expect("8 bytes"));
        match value[0] {
            1 => Ok(InboxItem::Welcome {
                seq,
                kind: GroupKind::from_u8(value[9]).ok_or_else(|| corrupt("unknown kind"))?,
                welcome: Bytes::copy_from_slice(&value[10..]),
            }),
            2 => Ok(InboxItem::Removed { seq }),
            3 => Ok(InboxItem::Diverged { seq }),
            _ => Err(corrupt("unknown tag")),
        }
    }

    fn payload(&self, group: Option<&GroupState>) -> Payload {
        match self {
            InboxItem::Welcome { seq, kind, welcome } => Payload::Welcome(Welcome {
                seq: *seq,
                kind: *kind as u8,
                welcome: welcome.to_vec().into(),
                members: group
                    .into_iter()
                    .flat_map(|g| g.devices())
                    .map(|(d, u)| RosterEntry {
                        device: d.to_bytes().into(),
                        user: u.to_bytes().into(),
                    })
                    .collect(),
            }),
            InboxItem::Removed { seq } => Payload::Removed(Removed { seq: *seq }),
            InboxItem::Diverged { seq } => Payload::Error(ErrorReport {
                code: ErrorCode::HistoryDiverged as u16,
                message: format!("what this device read of the conversation up to seq {seq} is not what the gateway holds: the gateway lost messages this device had read (its disk lost writes it had reported durable), and others took their seqs"),
                msg_id: None,
                after: None,
                retry_after_ms: None,
                held: None,
            }),
        }
    }
}

/// Tells a device that what comes before `first_available` in `conv` is gone (`code` says why:
/// expired, or lost by the gateway); the node moves its cursor past it and tells its user.
fn send_skip_notice(
    conn: ConnectionId,
    conv: ConversationId,
    code: ErrorCode,
    first_available: u64,
    message: String,
    fx: &mut Fx,
) {
    let report = ErrorReport {
        code: code as u16,
        message,
        msg_id: None,
        after: None,
        retry_after_ms: None,
        held: None,
    };
    let routing = Routing {
        conversation: conv,
        seq: first_available,
        ..Routing::default()
    };
    fx.send(conn, routing, Payload::Error(report));
}

/// The store key of a `(device, conversation)` pair, or any two 128-bit ids.
pub(super) fn pair_key(a: u128, b: u128) -> Vec<u8> {
    let mut key = Vec::with_capacity(32);
    key.extend_from_slice(&a.to_be_bytes());
    key.extend_from_slice(&b.to_be_bytes());
    key
}

/// A cursor a device presented at session open, with what it says of where it was read.
#[derive(Clone, Copy, Debug)]
struct ShownCursor {
    /// The seq it read up to.
    shown: u64,
    /// The id of the message it read there, if one.
    read: Option<[u8; 16]>,
    /// Where it began reading in the last gateway run it read from (the one its token names,
    /// unless it read nothing there), that run's stamp, and what it skipped there.
    run: Option<ReadRun>,
    /// The last run of this store it may have read from (`None`: this run).
    last_session: Option<u64>,
}

/// Whether a placeholder in `from..=to` (at most [`FENCE_MAX`] seqs back from `to`) keeps the
/// stamp of another gateway run than the one `run` says this device read that seq in: the
/// device that stamped it read it in another run.
fn read_in_another_run(log: &ConversationLog, from: u64, to: u64, run: ReadRun) -> bool {
    (from.max(to.saturating_sub(FENCE_MAX))..=to).any(|seq| {
        let Some(stamp) = run.stamp_at(seq) else {
            return false;
        };
        log.get(seq).is_some_and(|e| {
            e.sender == LOST_SENDER && lost_stamp(e).is_some_and(|kept| kept != stamp)
        })
    })
}

/// Why a message could not be appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendError {
    /// No such conversation here.
    UnknownConversation,
    /// The sender is not a member.
    NotMember,
}

/// Limits of delivery, from the gateway's configuration.
#[derive(Clone, Copy, Debug)]
pub struct DeliveryLimits {
    /// Most unacknowledged deliveries in flight per device and conversation.
    pub window: u64,
    /// A stalled window, or an unacknowledged inbox item, goes out again after this long.
    pub redeliver_after: Duration,
    /// Messages older than this are dropped even if some member never acknowledged them.
    pub retention_max: Duration,
    /// How long a deduplication record outlives its message.
    pub dedup_retention: Duration,
    /// Most bytes of messages kept for one device past its cursors, over all its
    /// conversations (its mailbox); past it the oldest are no longer kept for it, as if their
    /// retention had passed (`None`: no quota). See [`Delivery::collect_garbage`].
    pub mailbox_bytes_max: Option<u64>,
    /// Most log entries garbage-collected per conversation in one step.
    pub gc_batch_max: usize,
    /// How soon the next GC step runs while a step left a backlog.
    pub gc_backlog_interval: Duration,
    /// Planted bug [`crate::planted::PlantedBug::ResumeOffByOne`] (simulator only).
    pub resume_off_by_one: bool,
}

/// Counters of the delivery sub-machine.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeliveryStats {
    /// Messages newly sequenced.
    pub sequenced: u64,
    /// Messages another domain's gateway sequenced, put into replicas of its logs here.
    pub replicated: u64,
    /// Sends answered as duplicates.
    pub duplicates: u64,
    /// Deliver frames sent (first sends and redeliveries).
    pub deliveries: u64,
    /// Window rewinds after a stalled cursor or a replay request.
    pub rewinds: u64,
    /// Replay requests from devices (a device asking again from a seq).
    pub replays: u64,
    /// Messages sent again because of a rewind (replay request or stalled cursor): the sum of
    /// the replays' sizes.
    pub replayed: u64,
    /// Log entries garbage-collected (acknowledged by all, or past retention).
    pub gc_dropped: u64,
    /// Replays refused because they started before the retained log.
    pub replay_window_exceeded: u64,
    /// Sends that came out of their sender's order (held until the gap filled, or refused).
    pub out_of_sender_order: u64,
    /// Devices removed before everything sequenced while they were members had reached them
    /// (they read up to their removal first).
    pub departing: u64,
    /// Times a device showed a cursor beyond a conversation's head: the gateway had lost
    /// messages it acknowledged (see [`Delivery::open_session`]).
    pub history_lost: u64,
    /// Seqs marked lost that way.
    pub lost_seqs: u64,
    /// Cursors beyond the head by more than [`FENCE_MAX`], taken as a device's error.
    pub implausible_cursors: u64,
    /// Devices told that what they read differs from what the gateway now holds.
    pub history_diverged: u64,
    /// Times a device was found holding more than its mailbox quota (one per device and
    /// check, a check a minute at most).
    pub mailbox_over_quota: u64,
    /// Messages no longer kept for a device because its mailbox was over its quota.
    pub mailbox_released: u64,
    /// Memberships ended at once because their device was revoked: of plain conversations
    /// at the revocation, of groups at the commit removing it (a departure would have waited
    /// for it to read up to there).
    pub revoked_left: u64,
}

/// How often the mailboxes are measured against their quota (each check walks every
/// membership once).
pub const MAILBOX_CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// Most seqs one device's cursor may show lost at once. More is not a disk that lost its last
/// writes but a broken or hostile device, and is not believed.
pub const FENCE_MAX: u64 = 1 << 16;

/// What a device's cursor showed of messages the gateway lost (see [`Delivery::open_session`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HistoryKind {
    /// The device read `from..=to`, which the gateway no longer has: marked lost.
    Lost,
    /// The device read other messages at seqs up to `to` (after `from - 1`) than the gateway
    /// now holds there: it was told.
    Diverged,
}

/// Seqs of a conversation the gateway found lost or diverged (see [`Delivery::open_session`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LostHistory {
    /// Lost, or diverged at this device.
    pub kind: HistoryKind,
    /// The conversation.
    pub conversation: ConversationId,
    /// The device whose cursor showed it.
    pub device: DeviceId,
    /// First seq concerned.
    pub from: u64,
    /// Last seq concerned.
    pub to: u64,
}

#[derive(Clone, Debug)]
struct Window {
    acked: u64,
    sent_upto: u64,
    last_progress: Instant,
    /// For a device a commit removed: the last seq it still gets (the one before the commit).
    cap: Option<u64>,
    /// Where `acked` stood before a gap or loss notice moved it on without the device's
    /// acknowledgement, until the device acknowledges that far: a replay request from before
    /// it means the notice never arrived, and it goes again.
    unconfirmed: Option<u64>,
}

impl Window {
    fn at(seq: u64, now: Instant) -> Window {
        Window {
            acked: seq,
            sent_upto: seq,
            last_progress: now,
            cap: None,
            unconfirmed: None,
        }
    }

    /// A notice moves the window past `to` before the device acknowledges it.
    fn skip_to(&mut self, to: u64) {
        if to > self.acked {
            self.unconfirmed.get_or_insert(self.acked);
            self.acked = to;
        }
        self.sent_upto = self.sent_upto.max(to);
    }
}

/// The windows of one open session.
#[derive(Clone, Debug)]
struct SessionWindows {
    device: DeviceId,
    windows: BTreeMap<ConversationId, Window>,
}

/// Logs, cursors, windows, inboxes. See the module docs.
#[derive(Debug)]
pub struct Delivery {
    limits: DeliveryLimits,
    conversations: BTreeMap<ConversationId, ConversationLog>,
    memberships: BTreeMap<DeviceId, BTreeSet<ConversationId>>,
    cursors: BTreeMap<(DeviceId, ConversationId), u64>,
    sessions: BTreeMap<ConnectionId, SessionWindows>,
    inbox: BTreeMap<(DeviceId, ConversationId), InboxItem>,
    /// When each inbox item last went out (in memory: a restart resends at session open).
    inbox_sent: BTreeMap<(DeviceId, ConversationId), Instant>,
    /// When the next GC step runs ahead of the tick, while there is a backlog.
    gc_again_at: Option<Instant>,
    /// Devices a commit removed that have not yet received everything sequenced before it,
    /// with the commit's seq: they keep their cursor and a window capped below it, and their
    /// removal notice waits in their inbox until they acknowledged up to there. Rebuilt at
    /// recovery from the notices and the cursors.
    departing: BTreeMap<(DeviceId, ConversationId), u64>,
    /// The last message sequenced from each device in each conversation.
    sender_order: SenderOrder,
    /// The gateway's runs: which one sequenced where, and each device's last session's (to
    /// tell what a device read from what the log holds now, see [`Delivery::open_session`]).
    runs: Runs,
    /// From the last mailbox check: for a device over its quota, per conversation, the seq up
    /// to which messages are no longer kept for it (garbage collection counts it as its
    /// cursor). In memory: a restart measures again.
    mailbox_floors: BTreeMap<(DeviceId, ConversationId), u64>,
    /// Conversations whose acknowledged entries are kept for now: this gateway took them over
    /// by a handover, and a member gateway has not said where its replica ends yet (it gets
    /// everything after that from this log). Retention still applies.
    kept: BTreeSet<ConversationId>,
    /// When the mailboxes were last checked.
    mailbox_checked_at: Option<Instant>,
    stats: DeliveryStats,
}

/// Decodes a record keyed `device(16) ++ conversation(16)` whose value is a seq (8,
/// big-endian): a cursor or a departure.
fn decode_seq_record(
    table: Table,
    key: &[u8],
    value: &[u8],
) -> Result<(DeviceId, ConversationId, u64), StoreError> {
    let (device, conv) = split_pair_key(table, key)?;
    let seq: [u8; 8] = value.try_into().map_err(|_| StoreError::Corrupt {
        table: table.0,
        reason: format!("seq value of {} bytes", value.len()),
    })?;
    Ok((
        DeviceId(device),
        ConversationId(conv),
        u64::from_be_bytes(seq),
    ))
}

impl Delivery {
    /// Empty delivery state.
    pub fn new(limits: DeliveryLimits) -> Delivery {
        assert!(limits.window > 0, "delivery_window must be positive");
        assert!(limits.gc_batch_max > 0, "gc_batch_max must be positive");
        Delivery {
            limits,
            conversations: BTreeMap::new(),
            memberships: BTreeMap::new(),
            cursors: BTreeMap::new(),
            sessions: BTreeMap::new(),
            inbox: BTreeMap::new(),
            inbox_sent: BTreeMap::new(),
            gc_again_at: None,
            departing: BTreeMap::new(),
            sender_order: SenderOrder::default(),
            runs: Runs::default(),
            mailbox_floors: BTreeMap::new(),
            kept: BTreeSet::new(),
            mailbox_checked_at: None,
            stats: DeliveryStats::default(),
        }
    }

    /// Reads logs, members, cursors and inboxes back from the store.
    pub fn recover(limits: DeliveryLimits, store: &dyn StoreRead) -> Result<Delivery, StoreError> {
        let mut d = Delivery::new(limits);
        // A group's log exists even when every device has left it, and a conversation spanning
        // domains has one here even when no device of this gateway is in it.
        for table in [GROUPS_TABLE, super::spanning::SPANNING_TABLE] {
            scan_all(store, table, |key, _| {
                let conv = ConversationId::from_bytes(key.try_into().map_err(|_| {
                    StoreError::Corrupt {
                        table: table.0,
                        reason: format!("key of {} bytes", key.len()),
                    }
                })?);
                d.conversations
                    .entry(conv)
                    .or_insert_with(|| ConversationLog::new(conv, []));
                Ok(())
            })?;
        }
        scan_all(store, INBOX_TABLE, |key, value| {
            let (device, conv) = split_pair_key(INBOX_TABLE, key)?;
            let item = InboxItem::decode(value)?;
            d.inbox
                .insert((DeviceId(device), ConversationId(conv)), item);
            Ok(())
        })?;
        scan_all(store, MEMBERS_TABLE, |key, _| {
            let (conv, device) = split_pair_key(MEMBERS_TABLE, key)?;
            d.add_member(ConversationId(conv), DeviceId(device));
            Ok(())
        })?;
        scan_all(store, BOUNDS_TABLE, |key, value| {
            let (conv, head, first) = decode_bounds(key, value)?;
            d.conversations
                .entry(conv)
                .or_insert_with(|| ConversationLog::new(conv, []))
                .restore_bounds(head, first)
        })?;
        scan_all(store, DEDUP_TABLE, |key, value| {
            let (conv, records) = decode_dedup(key, value)?;
            if let Some(log) = d.conversations.get_mut(&conv) {
                log.restore_dedup_chunk(key.to_vec(), &records);
            }
            Ok(())
        })?;
        // A plain conversation can have no member left (its last devices were revoked) and
        // still hold messages until garbage collection drops them: its log is restored too.
        scan_all(store, LOG_TABLE, |key, value| {
            let (conv, entry) = decode_entry(key, value)?;
            d.conversations
                .entry(conv)
                .or_insert_with(|| ConversationLog::new(conv, []))
                .restore_entry(entry)
        })?;
        for log in d.conversations.values_mut() {
            log.finish_restore()?;
        }
        d.sender_order = SenderOrder::recover(store, d.conversations.values())?;
        scan_all(store, CURSORS_TABLE, |key, value| {
            let (device, conv, seq) = decode_seq_record(CURSORS_TABLE, key, value)?;
            d.cursors.insert((device, conv), seq);
            Ok(())
        })?;
        scan_all(store, DEPARTING_TABLE, |key, value| {
            let (device, conv, seq) = decode_seq_record(DEPARTING_TABLE, key, value)?;
            d.departing.insert((device, conv), seq);
            d.memberships.entry(device).or_default().insert(conv);
            Ok(())
        })?;
        d.runs = Runs::recover(store)?;
        Ok(d)
    }

    /// A run of the gateway begins (after [`Delivery::new`] or [`Delivery::recover`]), with
    /// a nonce from the gateway's entropy (see [`Runs`]).
    pub fn start_run(&mut self, nonce: u64) {
        self.runs.start(nonce);
    }

    /// The start of each resume token this run issues: its number and nonce, which the device
    /// presents again at its next session (see [`Runs`]).
    pub fn token_stamp(&mut self, writes: &mut WriteBatch) -> [u8; TOKEN_STAMP_BYTES] {
        self.runs.token_stamp(writes)
    }

    // ---- getters ----

    /// Whether a divergence notice waits in `device`'s inbox for `conversation`.
    pub fn divergence_waiting(&self, device: DeviceId, conversation: ConversationId) -> bool {
        matches!(
            self.inbox.get(&(device, conversation)),
            Some(InboxItem::Diverged { .. })
        )
    }

    /// The highest seq of a conversation, if it exists here.
    pub fn head(&self, conversation: ConversationId) -> Option<u64> {
        self.conversations
            .get(&conversation)
            .map(ConversationLog::head)
    }

    /// True if the conversation has a log here.
    pub fn contains(&self, conversation: ConversationId) -> bool {
        self.conversations.contains_key(&conversation)
    }

    /// The conversation's log.
    pub fn log(&self, conversation: ConversationId) -> Option<&ConversationLog> {
        self.conversations.get(&conversation)
    }

    /// Every conversation, in id order.
    pub fn conversations(&self) -> impl Iterator<Item = &ConversationLog> {
        self.conversations.values()
    }

    /// The durable acknowledgement cursor of a device in a conversation.
    pub fn cursor(&self, device: DeviceId, conversation: ConversationId) -> u64 {
        self.cursors
            .get(&(device, conversation))
            .copied()
            .unwrap_or(0)
    }

    /// When the next GC step is due ahead of the tick, if a step left a backlog.
    pub fn gc_again_at(&self) -> Option<Instant> {
        self.gc_again_at
    }

    /// Counters.
    pub fn stats(&self) -> &DeliveryStats {
        &self.stats
    }

    // ---- membership ----

    /// Makes `device` a member of `conv` in memory (recovery and admin creation).
    pub fn add_member(&mut self, conv: ConversationId, device: DeviceId) {
        self.conversations
            .entry(conv)
            .or_insert_with(|| ConversationLog::new(conv, []))
            .restore_member(device);
        self.memberships.entry(device).or_default().insert(conv);
    }

    /// `device` was revoked: it leaves every plain conversation it is a member of here (the
    /// members of an MLS group remove it by a commit instead: `is_group` tells them apart),
    /// so that no member list names it and nothing is kept for it any more (its cursor held
    /// every message back until retention ran out). Returns those conversations.
    pub fn drop_revoked_member(
        &mut self,
        device: DeviceId,
        is_group: impl Fn(ConversationId) -> bool,
        sessions: &Sessions,
        fx: &mut Fx,
    ) -> Vec<ConversationId> {
        let plain: Vec<ConversationId> = self
            .memberships
            .get(&device)
            .into_iter()
            .flatten()
            .copied()
            .filter(|conv| !is_group(*conv))
            .collect();
        for &conv in &plain {
            if let Some(log) = self.conversations.get_mut(&conv) {
                log.remove_member(device, fx.writes());
            }
            self.forget_member(device, conv, sessions, fx);
            self.stats.revoked_left += 1;
        }
        plain
    }

    /// `devices`, removed from `conv` by a commit and revoked, will never read up to their
    /// removal: their departures end now, so that nothing is kept for them any more.
    pub fn revoked_departed(
        &mut self,
        conv: ConversationId,
        devices: &[DeviceId],
        sessions: &Sessions,
        fx: &mut Fx,
    ) {
        for &device in devices {
            if !self.departing.contains_key(&(device, conv)) {
                continue;
            }
            self.end_departure(device, conv, fx);
            self.forget_member(device, conv, sessions, fx);
            if self.inbox.remove(&(device, conv)).is_some() {
                fx.delete(INBOX_TABLE, pair_key(device.0, conv.0));
            }
            self.stats.revoked_left += 1;
        }
    }

    /// A conversation spanning domains that has no member device here yet: its log exists
    /// (recovery finds it through its role, `spanning_conversations`).
    pub fn ensure_log(&mut self, conv: ConversationId) {
        self.conversations
            .entry(conv)
            .or_insert_with(|| ConversationLog::new(conv, []));
    }

    /// A creating commit made `conv`, with its creator as the sole member so far; the creator's
    /// session on `conn` starts reading it from the start.
    pub fn create_group_log(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        conv: ConversationId,
        creator: DeviceId,
        writes: &mut WriteBatch,
    ) {
        debug_assert!(!self.conversations.contains_key(&conv), "created once");
        let mut log = ConversationLog::new(conv, []);
        log.add_member(creator, writes);
        self.conversations.insert(conv, log);
        self.memberships.entry(creator).or_default().insert(conv);
        self.store_cursor(creator, conv, 0, writes);
        if let Some(session) = self.sessions.get_mut(&conn) {
            session.windows.insert(conv, Window::at(0, now));
        }
    }

    /// An accepted commit at `seq` changed `conv`'s members: added devices get a cursor at
    /// `seq` and the Welcome in their inbox, removed ones lose their stream and get a notice.
    /// `group` is the group as the commit left it (for the Welcome's roster).
    #[allow(clippy::too_many_arguments)]
    pub fn apply_membership(
        &mut self,
        now: Instant,
        conv: ConversationId,
        seq: u64,
        change: &Change,
        welcome: Option<&Bytes>,
        group: &GroupState,
        sessions: &Sessions,
        fx: &mut Fx,
    ) {
        let log = self.conversations.get_mut(&conv).expect("sequenced here");
        for (device, _, _) in &change.added {
            log.add_member(*device, fx.writes());
        }
        for device in &change.removed {
            log.remove_member(*device, fx.writes());
        }
        if let Some(welcome) = welcome {
            let added: Vec<DeviceId> = change.added.iter().map(|(d, _, _)| *d).collect();
            let kind = group.kind();
            self.join(
                now,
                conv,
                seq,
                kind,
                welcome,
                &added,
                Some(group),
                sessions,
                fx,
            );
        }
        debug_assert!(
            welcome.is_some() || change.added.is_empty(),
            "checked: adds carry a Welcome"
        );
        self.depart(now, conv, seq, &change.removed, Some(group), sessions, fx);
    }

    /// At a member gateway: the authority of `conv` (which this gateway keeps a replica of)
    /// sequenced at `seq` a commit removing `devices` of this gateway: each reads up to it,
    /// then hears that it was removed.
    pub fn removed_by_authority(
        &mut self,
        now: Instant,
        conv: ConversationId,
        seq: u64,
        devices: &[DeviceId],
        sessions: &Sessions,
        fx: &mut Fx,
    ) {
        let Some(log) = self.conversations.get_mut(&conv) else {
            return;
        };
        for device in devices {
            log.remove_member(*device, fx.writes());
        }
        self.depart(now, conv, seq, devices, None, sessions, fx);
    }

    /// `devices`, removed by the commit at `seq`, leave `conv`: at once if they have read up
    /// to it, else once they have.
    #[allow(clippy::too_many_arguments)]
    fn depart(
        &mut self,
        now: Instant,
        conv: ConversationId,
        seq: u64,
        devices: &[DeviceId],
        group: Option<&GroupState>,
        sessions: &Sessions,
        fx: &mut Fx,
    ) {
        for device in devices {
            if self.departing.contains_key(&(*device, conv)) {
                // Removed again before its first removal took effect: it never joined from
                // the Welcome in between, which it no longer needs.
                if self.inbox.remove(&(*device, conv)).is_some() {
                    fx.delete(INBOX_TABLE, pair_key(device.0, conv.0));
                }
                continue;
            }
            if self.cursor(*device, conv) + 1 >= seq {
                self.forget_member(*device, conv, sessions, fx);
                let item = InboxItem::Removed { seq };
                self.put_inbox(now, *device, conv, item, group, sessions, fx);
                continue;
            }
            // Messages sequenced while it was a member have not all reached it (or it has
            // not acknowledged its Welcome yet): it keeps reading up to the commit, and hears
            // of its removal after.
            self.departing.insert((*device, conv), seq);
            fx.put(
                DEPARTING_TABLE,
                pair_key(device.0, conv.0),
                seq.to_be_bytes().to_vec(),
            );
            self.stats.departing += 1;
            if let Some(conn) = sessions.online(*device) {
                if let Some(window) = self
                    .sessions
                    .get_mut(&conn)
                    .and_then(|s| s.windows.get_mut(&conv))
                {
                    window.cap = Some(seq - 1);
                }
                self.pump(now, conn, conv, fx);
            }
        }
    }

    /// At a member gateway: the authority of `conv` (which this gateway keeps a replica of)
    /// sequenced at `seq` a commit adding `devices` of this gateway: each becomes a member
    /// here, gets `welcome` in its inbox and reads after `seq`.
    #[allow(clippy::too_many_arguments)]
    pub fn welcome_from_authority(
        &mut self,
        now: Instant,
        conv: ConversationId,
        seq: u64,
        kind: GroupKind,
        welcome: &Bytes,
        devices: &[DeviceId],
        sessions: &Sessions,
        fx: &mut Fx,
    ) {
        let log = self
            .conversations
            .get_mut(&conv)
            .expect("the replica exists");
        for &device in devices {
            log.add_member(device, fx.writes());
        }
        self.join(now, conv, seq, kind, welcome, devices, None, sessions, fx);
    }

    /// `devices`, added by the commit at `seq`, join `conv` from `welcome`: each reads after
    /// `seq`, once it has read up to a removal it is still departing from.
    #[allow(clippy::too_many_arguments)]
    fn join(
        &mut self,
        now: Instant,
        conv: ConversationId,
        seq: u64,
        kind: GroupKind,
        welcome: &Bytes,
        devices: &[DeviceId],
        group: Option<&GroupState>,
        sessions: &Sessions,
        fx: &mut Fx,
    ) {
        for &device in devices {
            self.memberships.entry(device).or_default().insert(conv);
            let item = InboxItem::Welcome {
                seq,
                kind,
                welcome: welcome.clone(),
            };
            if let Some(&removed_at) = self.departing.get(&(device, conv)) {
                if self.welcome_before(device, conv, removed_at) {
                    // It never joined the membership it is departing: nothing to read there.
                    self.end_departure(device, conv, fx);
                } else {
                    // Added again before it read what came before its removal: it reads that
                    // first (its cursor and capped window stay), then gets this Welcome.
                    self.hold_inbox(device, conv, item, fx);
                    continue;
                }
            }
            self.store_cursor(device, conv, seq, fx.writes());
            self.put_inbox(now, device, conv, item, group, sessions, fx);
            if let Some(conn) = sessions.online(device) {
                if let Some(session) = self.sessions.get_mut(&conn) {
                    session.windows.insert(conv, Window::at(seq, now));
                }
            }
        }
    }

    /// True if `device`'s inbox holds a Welcome to `conv` from before seq `before` (one it has
    /// not acknowledged: it may not have joined yet).
    fn welcome_before(&self, device: DeviceId, conv: ConversationId, before: u64) -> bool {
        matches!(
            self.inbox.get(&(device, conv)),
            Some(InboxItem::Welcome { seq, .. }) if *seq < before
        )
    }

    /// True if `device`'s inbox item for `conv` waits for the device's departure (a Welcome
    /// from after the removal it is reading up to).
    fn held_for_departure(&self, device: DeviceId, conv: ConversationId) -> bool {
        match (
            self.departing.get(&(device, conv)),
            self.inbox.get(&(device, conv)),
        ) {
            (Some(removed_at), Some(item)) => item.seq() > *removed_at,
            _ => false,
        }
    }

    /// Puts an item in a departing device's inbox without sending it: it goes out when the
    /// device has read up to its removal.
    fn hold_inbox(&mut self, device: DeviceId, conv: ConversationId, item: InboxItem, fx: &mut Fx) {
        fx.put(INBOX_TABLE, pair_key(device.0, conv.0), item.encode());
        self.inbox.insert((device, conv), item);
        self.inbox_sent.remove(&(device, conv));
    }

    fn end_departure(&mut self, device: DeviceId, conv: ConversationId, fx: &mut Fx) {
        self.departing.remove(&(device, conv));
        fx.delete(DEPARTING_TABLE, pair_key(device.0, conv.0));
    }

    /// A device's membership of `conv` is over: its cursor and window go.
    fn forget_member(
        &mut self,
        device: DeviceId,
        conv: ConversationId,
        sessions: &Sessions,
        fx: &mut Fx,
    ) {
        if let Some(convs) = self.memberships.get_mut(&device) {
            convs.remove(&conv);
        }
        self.cursors.remove(&(device, conv));
        fx.delete(CURSORS_TABLE, pair_key(device.0, conv.0));
        if let Some(conn) = sessions.online(device) {
            if let Some(session) = self.sessions.get_mut(&conn) {
                session.windows.remove(&conv);
            }
        }
    }

    /// A departing device acknowledged `seq` of `conv`: once that is everything before the
    /// commit that removed it, its removal takes effect and its notice goes out. If it was
    /// added again meanwhile, it reads on from the Welcome waiting in its inbox, sent right
    /// after the notice (the notice goes once: the Welcome supersedes it if lost).
    #[allow(clippy::too_many_arguments)]
    fn depart_if_done(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        device: DeviceId,
        conv: ConversationId,
        seq: u64,
        group: Option<&GroupState>,
        fx: &mut Fx,
    ) {
        let Some(&removed_at) = self.departing.get(&(device, conv)) else {
            return;
        };
        if seq + 1 < removed_at || self.welcome_before(device, conv, removed_at) {
            return;
        }
        let rejoined = self.held_for_departure(device, conv);
        self.end_departure(device, conv, fx);
        let notice = InboxItem::Removed { seq: removed_at };
        if rejoined {
            let joined_at = self.inbox[&(device, conv)].seq();
            self.store_cursor(device, conv, joined_at, fx.writes());
            if let Some(session) = self.sessions.get_mut(&conn) {
                session.windows.insert(conv, Window::at(joined_at, now));
            }
            send_inbox_item(conn, conv, &notice, None, fx);
            let welcome = self.inbox[&(device, conv)].clone();
            self.inbox_sent.insert((device, conv), now);
            send_inbox_item(conn, conv, &welcome, group, fx);
            return;
        }
        if let Some(convs) = self.memberships.get_mut(&device) {
            convs.remove(&conv);
        }
        self.cursors.remove(&(device, conv));
        fx.delete(CURSORS_TABLE, pair_key(device.0, conv.0));
        if let Some(session) = self.sessions.get_mut(&conn) {
            session.windows.remove(&conv);
        }
        fx.put(INBOX_TABLE, pair_key(device.0, conv.0), notice.encode());
        self.inbox.insert((device, conv), notice.clone());
        self.inbox_sent.insert((device, conv), now);
        send_inbox_item(conn, conv, &notice, None, fx);
    }

    // ---- sequencing ----

    /// Whether a message of `device` that comes `after` another may be sequenced now (see
    /// [`SenderOrder`]): a duplicate always may (it keeps its seq), and so may a group
    /// operation (no `after`); otherwise only one that comes after the last sequenced, which
    /// `Err` names.
    pub fn check_sender_order(
        &mut self,
        conv: ConversationId,
        device: DeviceId,
        msg_id: MsgId,
        after: Option<MsgId>,
    ) -> Result<(), MsgId> {
        let Some(after) = after else {
            return Ok(());
        };
        let checked = self.sender_order.check(conv, device, after);
        if checked.is_err() {
            // Only a message out of order needs the duplicate lookup: one in order is either
            // new or a copy of the last, and either may go on.
            if self.is_sequenced(conv, device, msg_id) {
                return Ok(());
            }
            self.stats.out_of_sender_order += 1;
        }
        checked
    }

    /// True if `msg_id` of `device` is sequenced in `conv`, as far as its log's duplicate
    /// window remembers.
    pub fn is_sequenced(&self, conv: ConversationId, device: DeviceId, msg_id: MsgId) -> bool {
        self.conversations
            .get(&conv)
            .is_some_and(|log| log.duplicate_of(device, msg_id).is_some())
    }

    /// The last chained message sequenced from `device` in `conv` (see `sender_order`).
    pub fn sender_last(&self, conv: ConversationId, device: DeviceId) -> MsgId {
        self.sender_order.last(conv, device)
    }

    /// Sequences a message that passed [`Delivery::check_sender_order`] (and, in a group, its
    /// admission), with the writes that make it durable; a `chained` one becomes its sender's
    /// last.
    #[allow(clippy::too_many_arguments)]
    pub fn append(
        &mut self,
        now: Instant,
        device: DeviceId,
        conv: ConversationId,
        msg_id: MsgId,
        chained: bool,
        body: Bytes,
        writes: &mut WriteBatch,
    ) -> Result<Appended, AppendError> {
        let log = self
            .conversations
            .get_mut(&conv)
            .ok_or(AppendError::UnknownConversation)?;
        let appended = log
            .append(now, device, msg_id, body)
            .map_err(|SequencerError::NotMember| AppendError::NotMember)?;
        if let Appended::New(seq) = appended {
            log.persist_append(seq, writes);
            self.runs.sequenced(conv, seq, writes);
        }
        self.appended(conv, device, msg_id, chained, appended);
        Ok(appended)
    }

    /// What sequencing a message leaves beside its log (whose entry the caller persisted): its
    /// sender's order, the counters.
    fn appended(
        &mut self,
        conv: ConversationId,
        device: DeviceId,
        msg_id: MsgId,
        chained: bool,
        appended: Appended,
    ) {
        match appended {
            Appended::New(seq) => {
                if chained {
                    self.sender_order.chained(conv, device, msg_id);
                } else {
                    self.sender_order.unchained(conv, device, seq);
                }
                self.stats.sequenced += 1;
            }
            Appended::Duplicate(_) => self.stats.duplicates += 1,
        }
    }

    /// Sequences a message that a member gateway of another domain relayed from its device
    /// (the caller checked that the device is a member there, and its sender order), with the
    /// writes that make it durable.
    #[allow(clippy::too_many_arguments)]
    pub fn append_relayed(
        &mut self,
        now: Instant,
        device: DeviceId,
        conv: ConversationId,
        msg_id: MsgId,
        chained: bool,
        body: Bytes,
        writes: &mut WriteBatch,
    ) -> Result<Appended, AppendError> {
        let log = self
            .conversations
            .get_mut(&conv)
            .ok_or(AppendError::UnknownConversation)?;
        let appended = log.append_relayed(now, device, msg_id, body);
        if let Appended::New(seq) = appended {
            log.persist_append(seq, writes);
            self.runs.sequenced(conv, seq, writes);
        }
        self.appended(conv, device, msg_id, chained, appended);
        Ok(appended)
    }

    /// Puts a message the conversation's authority (another domain's gateway) sequenced at
    /// `seq` into this gateway's replica of the log, with the writes that make it durable.
    /// Entries arrive once and in order, so `seq` is the head's next; seqs below it are
    /// ignored (returns false), and seqs skipped (the authority's disk lost them) become
    /// placeholders, as lost seqs do at an authority. `chained` as at the authority: the
    /// replica keeps each sender's order as the authority does, so that this gateway refuses a
    /// device's message out of order before relaying it.
    #[allow(clippy::too_many_arguments)]
    pub fn append_replica(
        &mut self,
        now: Instant,
        conv: ConversationId,
        seq: u64,
        sender: DeviceId,
        msg_id: MsgId,
        chained: bool,
        body: Bytes,
        writes: &mut WriteBatch,
    ) -> Result<bool, AppendError> {
        let log = self
            .conversations
            .get_mut(&conv)
            .ok_or(AppendError::UnknownConversation)?;
        let head = log.head();
        if seq <= head {
            self.stats.duplicates += 1;
            return Ok(false);
        }
        if seq > head + 1 {
            let from = log.fence(now, seq - 1, None, None);
            for lost in from..seq {
                log.persist_append(lost, writes);
            }
        }
        log.append_at(now, seq, sender, msg_id, body);
        log.persist_append(seq, writes);
        if chained {
            self.sender_order.chained(conv, sender, msg_id);
        } else {
            self.sender_order.unchained(conv, sender, seq);
        }
        self.stats.replicated += 1;
        Ok(true)
    }

    /// Each device's last chained message in `conv` (see `sender_order`).
    pub fn senders_last(&self, conv: ConversationId) -> Vec<(DeviceId, MsgId)> {
        self.sender_order.of_conversation(conv)
    }

    /// After a handover to this gateway: each device's last chained message in `conv` as the
    /// old authority knew it at `head`.
    pub fn adopt_senders_last(
        &mut self,
        conv: ConversationId,
        senders: &[(DeviceId, MsgId)],
        head: u64,
    ) {
        for &(device, last) in senders {
            self.sender_order.adopt(conv, device, last, head);
        }
    }

    /// Keeps (or stops keeping) the acknowledged entries of `conv` for member gateways that
    /// will read them after a handover (see `kept`).
    pub fn keep_acknowledged(&mut self, conv: ConversationId, keep: bool) {
        if keep {
            self.kept.insert(conv);
        } else {
            self.kept.remove(&conv);
        }
    }

    /// A plain conversation gets these member devices (it is created if new: an operator's
    /// `create-conversation`, or another domain's gateway, its authority, opening its replica
    /// here), durably, and each of them online now a window on it, so that what is sequenced
    /// reaches it without waiting for its next session. Idempotent.
    pub fn add_plain_members(
        &mut self,
        now: Instant,
        conv: ConversationId,
        members: &[DeviceId],
        writes: &mut WriteBatch,
    ) {
        for &device in members {
            if !self
                .memberships
                .get(&device)
                .is_some_and(|convs| convs.contains(&conv))
            {
                // A new member: it read nothing of `conv` before this run.
            }
            self.add_member(conv, device);
        }
        if let Some(log) = self.conversations.get(&conv) {
            log.persist_members(writes);
        }
        for session in self.sessions.values_mut() {
            if members.contains(&session.device) && !session.windows.contains_key(&conv) {
                let cursor = self
                    .cursors
                    .get(&(session.device, conv))
                    .copied()
                    .unwrap_or(0);
                session.windows.insert(conv, Window::at(cursor, now));
            }
        }
    }

    /// Adds the sender-order rows changed since the last call to `writes`: call it before the
    /// batch that holds the log entries leaves (see [`SenderOrder::flush`]).
    pub fn flush_sender_order(&mut self, writes: &mut WriteBatch) {
        self.sender_order.flush(writes);
    }

    /// Sequences a message of the gateway itself (an external proposal) in `conv`.
    pub fn append_by_authority(
        &mut self,
        now: Instant,
        conv: ConversationId,
        msg_id: MsgId,
        body: Bytes,
        writes: &mut WriteBatch,
    ) -> u64 {
        let log = self
            .conversations
            .get_mut(&conv)
            .expect("a group has a log");
        let seq = log.append_by_authority(now, msg_id, body);
        log.persist_append(seq, writes);
        self.runs.sequenced(conv, seq, writes);
        seq
    }

    // ---- windows ----

    /// A session opened on `conn` for `device`: one window per conversation it is in, starting
    /// at the cursor it presented (or the stored one), which moves the stored one forward.
    ///
    /// A presented cursor beyond the head means the device read messages this gateway no longer
    /// has: it sequenced them and lost them with writes its disk had reported durable (fsync
    /// that lies, then a crash). The gateway cannot give those seqs back, and must never give
    /// them to other messages (the device would take a different message for one it has, a
    /// silent fork): they become placeholders ([`ConversationLog::fence`]), the devices behind
    /// are told of the loss as they reach it, and the loss is returned for the operator.
    /// `token` is the resume token the device presented (known here or not): it names the
    /// last run the device read from, so what it shows it read is compared with what later
    /// runs sequenced ([`Delivery::examine_cursor`]).
    pub fn open_session(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        device: DeviceId,
        presented: &[Cursor],
        token: Option<&[u8; 32]>,
        writes: &mut WriteBatch,
    ) -> Vec<LostHistory> {
        let mut lost = Vec::new();
        let presented: BTreeMap<ConversationId, &Cursor> =
            presented.iter().map(|c| (c.conversation_id(), c)).collect();
        let mut windows = BTreeMap::new();
        // The last run it may have read from, if not this one (see [`Runs`]), and that run's
        // stamp (the token's first bytes).
        let last_session = self.runs.last_read_run(token);
        let stamp: Option<[u8; TOKEN_STAMP_BYTES]> =
            token.map(|t| t[..TOKEN_STAMP_BYTES].try_into().expect("16 bytes"));
        let convs: Vec<ConversationId> = self
            .memberships
            .get(&device)
            .into_iter()
            .flatten()
            .copied()
            .collect();
        for conv in convs {
            if let Some(c) = presented.get(&conv) {
                let cursor = ShownCursor {
                    shown: c.seq,
                    read: c.last,
                    run: c
                        .since
                        .zip(c.since_run.or(stamp))
                        .map(|(since, stamp)| ReadRun {
                            since,
                            stamp,
                            skipped: c.skipped.map(|[from, to]| (from, to)),
                        }),
                    last_session,
                };
                self.examine_cursor(now, device, conv, cursor, writes, &mut lost);
            }
            let head = self.conversations[&conv].head();
            let stored = self.cursor(device, conv);
            let mut acked = presented.get(&conv).map_or(stored, |c| c.seq).min(head);
            if self.limits.resume_off_by_one && acked < head {
                acked += 1; // planted by the simulator: never in a real gateway
            }
            if acked > stored {
                self.store_cursor(device, conv, acked, writes);
            }
            let mut window = Window::at(acked, now);
            window.cap = self.departing.get(&(device, conv)).map(|r| r - 1);
            windows.insert(conv, window);
        }
        self.sessions
            .insert(conn, SessionWindows { device, windows });
        lost
    }

    /// What a cursor `device` presented for `conv` (read there: the message it read at it)
    /// shows of history this gateway lost; see [`Delivery::open_session`]. A cursor beyond the
    /// head fences the seqs up to it as lost. The device read nothing this gateway sequenced
    /// in a run after its last session (`last_session`: `None` if that was this run), so a
    /// message of such a run at a seq it read, past its stored cursor, is one where its
    /// history diverged, and it is told; that holds however many times the gateway restarted
    /// since ([`Runs`]). So is a device that read another message at its cursor than the one
    /// there now, or another lost message than the one a placeholder there kept, or one that,
    /// since it began reading in its token's run, read lost seqs that another device read in
    /// another run (the placeholders keep that run's stamp: two lossy crashes in one lying
    /// spell gave those seqs to other messages). A placeholder that keeps no run yet takes the
    /// first one a device shows for it ([`ConversationLog::stamp_lost`]).
    fn examine_cursor(
        &mut self,
        now: Instant,
        device: DeviceId,
        conv: ConversationId,
        cursor: ShownCursor,
        writes: &mut WriteBatch,
        found: &mut Vec<LostHistory>,
    ) {
        let ShownCursor {
            shown,
            read,
            run,
            last_session,
        } = cursor;
        let stored = self.cursor(device, conv);
        let log = self.conversations.get_mut(&conv).expect("a member's log");
        let head = log.head();
        if shown > head && shown - head > FENCE_MAX {
            self.stats.implausible_cursors += 1;
            return;
        }
        // What it read where the log holds the seq already: at its cursor, the message (or,
        // where a placeholder kept one, the lost message another device read there); and
        // before it, since it began reading in its token's run, the run each lost seq was read
        // in (two lossy crashes in one lying spell gave those seqs to other messages).
        let mut other_message = shown > stored
            && shown <= head
            && match (read, log.get(shown)) {
                (Some(id), Some(entry)) if entry.sender == LOST_SENDER => {
                    lost_read(entry).is_some_and(|kept| kept != id)
                }
                (Some(id), Some(entry)) => entry.msg_id.to_bytes() != id,
                _ => false,
            };
        if let Some(run) = run.filter(|_| !other_message) {
            let (from, to) = (run.since.max(stored).saturating_add(1), shown.min(head));
            if from <= to {
                if read_in_another_run(log, from, to, run) {
                    other_message = true;
                } else {
                    for seq in log.stamp_lost(from.max(to.saturating_sub(FENCE_MAX)), to, run) {
                        log.persist_append(seq, writes);
                    }
                }
            }
        }
        if shown > head {
            let from = log.fence(now, shown, read, run);
            for seq in from..=shown {
                log.persist_append(seq, writes);
            }
            self.stats.history_lost += 1;
            self.stats.lost_seqs += shown - from + 1;
            found.push(LostHistory {
                kind: HistoryKind::Lost,
                conversation: conv,
                device,
                from,
                to: shown,
            });
        }
        if other_message {
            self.diverged_found(device, conv, stored + 1, shown, writes, found);
            return;
        }
        // Messages of runs after its last session, at seqs it says it read.
        let Some(since) = last_session
            .and_then(|run| self.runs.first_seq_after(conv, run))
            .map(|first| first.max(stored + 1))
        else {
            return;
        };
        let log = &self.conversations[&conv];
        let replaced = (since..=shown.min(log.head()))
            .rev()
            .find(|&s| log.get(s).is_some_and(|e| e.sender != LOST_SENDER));
        if let Some(to) = replaced {
            self.diverged_found(device, conv, since, to, writes, found);
        }
    }

    /// `device`'s history of `conv` diverged over `from..=to`: unless it is being told already,
    /// a notice goes to its inbox (sent when its session opens, and again until it
    /// acknowledges; the conversation's delivery waits for that).
    fn diverged_found(
        &mut self,
        device: DeviceId,
        conv: ConversationId,
        from: u64,
        to: u64,
        writes: &mut WriteBatch,
        found: &mut Vec<LostHistory>,
    ) {
        match self.inbox.get(&(device, conv)) {
            Some(InboxItem::Diverged { seq }) if *seq >= to => return,
            // A Welcome or a removal notice holds the slot (a group; not handled yet): the
            // operator hears, the device does not.
            Some(InboxItem::Welcome { .. } | InboxItem::Removed { .. }) => {}
            _ => {
                let item = InboxItem::Diverged { seq: to };
                writes.put(INBOX_TABLE, pair_key(device.0, conv.0), item.encode());
                self.inbox.insert((device, conv), item);
                self.inbox_sent.remove(&(device, conv));
            }
        }
        self.stats.history_diverged += 1;
        found.push(LostHistory {
            kind: HistoryKind::Diverged,
            conversation: conv,
            device,
            from,
            to,
        });
    }

    /// A departing device whose session opens with a cursor that covers everything before
    /// its removal has nothing left to read there: its removal takes effect now, and its
    /// notice (and a Welcome waiting behind it) goes out. Its acknowledgement of the last
    /// message may have been lost with the connection it was sent on; it will not send
    /// another, so waiting for one would leave it out of the conversation for good.
    pub fn settle_departures(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        device: DeviceId,
        groups: &Groups,
        fx: &mut Fx,
    ) {
        let departing: Vec<(ConversationId, u64)> = self
            .departing
            .range((device, ConversationId(0))..=(device, ConversationId(u128::MAX)))
            .map(|(&(_, conv), _)| (conv, self.cursor(device, conv)))
            .collect();
        for (conv, acked) in departing {
            self.depart_if_done(now, conn, device, conv, acked, groups.get(conv), fx);
        }
    }

    /// Planted bug [`crate::planted::PlantedBug::DedupForgets`] (simulator only): forgets the
    /// duplicate record of `msg_id` once two newer messages are sequenced after it.
    pub fn forget_old_duplicate(&mut self, conv: ConversationId, device: DeviceId, msg_id: MsgId) {
        if let Some(log) = self.conversations.get_mut(&conv) {
            log.forget_old_duplicate(device, msg_id);
        }
    }

    /// The session on `conn` ended: its windows go.
    pub fn close_session(&mut self, conn: ConnectionId) {
        self.sessions.remove(&conn);
    }

    /// Sends what each of the session's windows allows.
    pub fn pump_session(&mut self, now: Instant, conn: ConnectionId, fx: &mut Fx) {
        let convs: Vec<ConversationId> = self
            .sessions
            .get(&conn)
            .map(|s| s.windows.keys().copied().collect())
            .unwrap_or_default();
        for conv in convs {
            self.pump(now, conn, conv, fx);
        }
    }

    /// Sends what each online member's window of `conv` allows.
    pub fn pump_members(
        &mut self,
        now: Instant,
        conv: ConversationId,
        sessions: &Sessions,
        fx: &mut Fx,
    ) {
        let members: Vec<DeviceId> = match self.conversations.get(&conv) {
            Some(log) => log.members().iter().copied().collect(),
            None => return,
        };
        for member in members {
            if let Some(conn) = sessions.online(member) {
                self.pump(now, conn, conv, fx);
            }
        }
    }

    /// Sends as much of the conversation as the window allows.
    pub fn pump(&mut self, now: Instant, conn: ConnectionId, conv: ConversationId, fx: &mut Fx) {
        let window_max = self.limits.window;
        let Some(log) = self.conversations.get(&conv) else {
            return;
        };
        let Some(session) = self.sessions.get_mut(&conn) else {
            return;
        };
        let held = match (
            self.inbox.get(&(session.device, conv)),
            self.departing.get(&(session.device, conv)),
        ) {
            (Some(item @ InboxItem::Welcome { .. }), Some(removed_at)) => item.seq() < *removed_at,
            (Some(InboxItem::Welcome { .. }), None) => true,
            // It hears that its history diverged before it reads on.
            (Some(InboxItem::Diverged { .. }), _) => true,
            _ => false,
        };
        if held {
            // The device reads the group only once it has joined from its Welcome (a departing
            // device added again first reads up to its removal).
            return;
        }
        let Some(window) = session.windows.get_mut(&conv) else {
            return;
        };
        if window.acked == window.sent_upto {
            window.last_progress = now;
        }
        if window.sent_upto + 1 < log.first_seq() {
            // What this device still needs is gone (retention): say so, and go on from what
            // is left. The node moves its cursor and reports the gap to its user.
            let first = log.first_seq();
            window.skip_to(first - 1);
            self.stats.replay_window_exceeded += 1;
            let message = format!("messages before seq {first} are no longer retained");
            send_skip_notice(
                conn,
                conv,
                ErrorCode::ReplayWindowExceeded,
                first,
                message,
                fx,
            );
        }
        let last = window.cap.map_or(log.head(), |cap| cap.min(log.head()));
        while window.sent_upto < last && window.sent_upto - window.acked < window_max {
            let next = log.get(window.sent_upto + 1).expect("seq within head");
            if next.sender == LOST_SENDER {
                // Lost seqs: once what went before them is acknowledged (the device's cursor
                // stands just before them), say so, and go on after them. The node moves its
                // cursor past them and tells its user.
                if window.acked < window.sent_upto {
                    break;
                }
                let from = next.seq;
                let mut to = from;
                while to < last && log.get(to + 1).is_some_and(|e| e.sender == LOST_SENDER) {
                    to += 1;
                }
                window.skip_to(to);
                let message = format!("messages {from}..={to} were lost by the gateway (its disk lost writes it had reported durable)");
                send_skip_notice(conn, conv, ErrorCode::HistoryLost, to + 1, message, fx);
                continue;
            }
            window.sent_upto += 1;
            let entry = log.get(window.sent_upto).expect("seq within head");
            let routing = Routing {
                conversation: conv,
                sender: entry.sender,
                seq: entry.seq,
                epoch: 0,
            };
            let payload = Payload::Deliver(Deliver {
                msg_id: entry.msg_id.to_bytes(),
                body: entry.body.to_vec(),
            });
            fx.send(conn, routing, payload);
            self.stats.deliveries += 1;
        }
        debug_assert!(window.acked <= window.sent_upto, "acked <= sent_upto");
        // A device that joined from a Welcome of another domain's authority past what this
        // replica holds yet (a domain that had left, brought back) stands beyond the head,
        // with nothing in flight, until the entries after its join arrive (federation-mls-
        // handover seed 17).
        debug_assert!(
            window.sent_upto <= log.head() || window.sent_upto == window.acked,
            "sent_upto <= head, or nothing in flight"
        );
        debug_assert!(
            window.sent_upto - window.acked <= window_max,
            "the window stays within its bound"
        );
    }

    /// The device acknowledged `seq` of `conv`: an inbox item up to it is done, else its window
    /// and durable cursor move.
    #[allow(clippy::too_many_arguments)]
    pub fn acknowledge(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        device: DeviceId,
        conv: ConversationId,
        seq: u64,
        group: Option<&GroupState>,
        fx: &mut Fx,
    ) -> Result<(), Refusal> {
        if self.settle_inbox(device, conv, seq, fx.writes()) {
            return Ok(());
        }
        let head = self.head(conv).unwrap_or(0);
        let Some(window) = self
            .sessions
            .get_mut(&conn)
            .and_then(|s| s.windows.get_mut(&conv))
        else {
            return Err(Refusal::error(
                ErrorCode::NotMember,
                "ack for a conversation you are not in",
            ));
        };
        let seq = seq.min(head);
        if seq >= window.acked {
            window.unconfirmed = None;
        }
        if seq > window.acked {
            window.acked = seq;
            window.last_progress = now;
            window.sent_upto = window.sent_upto.max(seq);
            self.store_cursor(device, conv, seq, fx.writes());
        }
        self.pump(now, conn, conv, fx);
        self.depart_if_done(now, conn, device, conv, seq, group, fx);
        Ok(())
    }

    /// Restarts delivery from `from_seq` (a replay request) or from the cursor (a stall).
    pub fn rewind(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        conv: ConversationId,
        from_seq: Option<u64>,
        fx: &mut Fx,
    ) {
        let Some(window) = self
            .sessions
            .get_mut(&conn)
            .and_then(|s| s.windows.get_mut(&conv))
        else {
            return;
        };
        if from_seq.is_some() {
            self.stats.replays += 1;
        }
        let restart = match from_seq {
            Some(from) => {
                let before = from.saturating_sub(1);
                if before < window.acked && window.unconfirmed.is_some_and(|u| before >= u) {
                    // It asks again for what this window took as read on a gap or loss
                    // notice it never received (the connection dropped it): the notice goes
                    // again.
                    window.acked = before;
                }
                before.max(window.acked)
            }
            None => window.acked,
        };
        if restart < window.sent_upto {
            self.stats.replayed += window.sent_upto - restart;
            window.sent_upto = restart;
            self.stats.rewinds += 1;
        }
        window.last_progress = now;
        self.pump(now, conn, conv, fx);
    }

    /// Windows whose cursor stalled for `redeliver_after` with deliveries outstanding, in
    /// (connection, conversation) order.
    pub fn stalled(&self, now: Instant) -> Vec<(ConnectionId, ConversationId)> {
        let mut stalled = Vec::new();
        for (&conn, session) in &self.sessions {
            for (&conv, window) in &session.windows {
                if window.acked < window.sent_upto
                    && now.saturating_since(window.last_progress) >= self.limits.redeliver_after
                {
                    stalled.push((conn, conv));
                }
            }
        }
        stalled
    }

    fn store_cursor(
        &mut self,
        device: DeviceId,
        conv: ConversationId,
        seq: u64,
        writes: &mut WriteBatch,
    ) {
        self.cursors.insert((device, conv), seq);
        writes.put(
            CURSORS_TABLE,
            pair_key(device.0, conv.0),
            seq.to_be_bytes().to_vec(),
        );
    }

    // ---- garbage collection ----

    /// One GC step: drops log entries every member acknowledged or that passed retention, a
    /// bounded amount per conversation, and schedules the next step soon if any conversation
    /// had more than that.
    ///
    /// With a mailbox quota, once a minute each device's mailbox (the bytes of every retained
    /// message past its cursors) is measured; for a device over the quota, the oldest messages
    /// across its conversations (by when they were sequenced) that bring it back under it are
    /// no longer kept for it: collection treats them as acknowledged by it. They stay while
    /// another member needs them (and the device still gets them); once dropped, the device is
    /// told of the gap when it reads there, as after retention.
    pub fn collect_garbage(&mut self, now: Instant, writes: &mut WriteBatch) {
        let limits = self.limits;
        if let Some(quota) = limits.mailbox_bytes_max {
            if self
                .mailbox_checked_at
                .is_none_or(|at| now >= at + MAILBOX_CHECK_INTERVAL)
            {
                self.mailbox_checked_at = Some(now);
                self.check_mailboxes(quota);
            }
        }
        let floors = &self.mailbox_floors;
        let kept = &self.kept;
        let expire_before = now - limits.retention_max;
        let dedup_expire_before = now - limits.dedup_retention;
        let mut backlog = false;
        for log in self.conversations.values_mut() {
            // Departing devices still read what came before their removal.
            let departing = self
                .departing
                .keys()
                .filter(|(_, conv)| *conv == log.id())
                .map(|(device, _)| device);
            let acked_by_all = log
                .members()
                .iter()
                .chain(departing)
                .map(|d| {
                    let cursor = self.cursors.get(&(*d, log.id())).copied().unwrap_or(0);
                    floors
                        .get(&(*d, log.id()))
                        .map_or(cursor, |floor| cursor.max(*floor))
                })
                .min()
                .unwrap_or(0);
            let acked_by_all = if kept.contains(&log.id()) {
                0
            } else {
                acked_by_all
            };
            let (conv, head) = (log.id(), log.head());
            let order = &mut self.sender_order;
            let dropped = log.collect_garbage(
                acked_by_all,
                expire_before,
                dedup_expire_before,
                limits.gc_batch_max,
                writes,
                &mut |entry| order.dropping(conv, entry.sender, entry.seq, head),
            );
            if dropped > 0 {
                self.runs.collected(conv, log.first_seq(), writes);
            }
            self.stats.gc_dropped += dropped as u64;
            backlog |= dropped > 0 && dropped == limits.gc_batch_max;
        }
        self.gc_again_at = backlog.then(|| now + limits.gc_backlog_interval);
    }

    /// Measures every device's mailbox against `quota` and sets the floors of those over it
    /// (see [`Delivery::collect_garbage`]).
    fn check_mailboxes(&mut self, quota: u64) {
        let mut floors = BTreeMap::new();
        for (device, convs) in &self.memberships {
            let held = |conv: &ConversationId| -> Option<(ConversationId, u64, &ConversationLog)> {
                let log = self.conversations.get(conv)?;
                let cursor = self.cursors.get(&(*device, *conv)).copied().unwrap_or(0);
                Some((*conv, cursor.max(log.first_seq() - 1), log))
            };
            let held: Vec<_> = convs.iter().filter_map(held).collect();
            let total: u64 = held.iter().map(|(_, c, log)| log.bytes_after(*c)).sum();
            if total <= quota {
                continue;
            }
            self.stats.mailbox_over_quota += 1;
            // The oldest first, across conversations, until the rest fits.
            let mut excess = total - quota;
            let mut next: BTreeSet<(Instant, ConversationId, u64)> = BTreeSet::new();
            let logs: BTreeMap<ConversationId, &ConversationLog> =
                held.iter().map(|(conv, _, log)| (*conv, *log)).collect();
            for (conv, cursor, log) in &held {
                if let Some(entry) = log.get(cursor + 1) {
                    next.insert((entry.accepted_at, *conv, entry.seq));
                }
            }
            while excess > 0 {
                let Some((_, conv, seq)) = next.pop_first() else {
                    break;
                };
                let log = logs[&conv];
                let entry = log.get(seq).expect("queued from the retained log");
                excess = excess.saturating_sub(entry.body.len() as u64);
                let previous = self
                    .mailbox_floors
                    .get(&(*device, conv))
                    .copied()
                    .unwrap_or(0);
                if seq > previous {
                    self.stats.mailbox_released += 1;
                }
                floors.insert((*device, conv), seq);
                if let Some(after) = log.get(seq + 1) {
                    next.insert((after.accepted_at, conv, after.seq));
                }
            }
        }
        self.mailbox_floors = floors;
    }
}
