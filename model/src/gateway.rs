//! The gateway state machine: sessions, sequencing, fan-out, acknowledgement cursors, redelivery.
//!
//! Shape (quinn-proto / str0m style):
//! - getters take `&self` (`conversation_head`, `stats`, ...);
//! - [`Gateway::handle`] takes every input (a connection accepted or closed, a frame, an admin
//!   command) with the current time;
//! - [`Gateway::handle_timeout`] runs periodic work when [`Gateway::poll_timeout`] says so;
//! - [`Gateway::poll_ready`] hands out the writes and outputs produced since the last call.
//!
//! Drain rule: after every `handle` or `handle_timeout`, call `poll_ready` until it returns `None`
//! and re-read `poll_timeout`. Commit each `Ready`'s writes before releasing its outputs (see
//! [`crate::env::Ready`]): an acknowledgement never leaves before the message it acknowledges is
//! durable.
//!
//! Sessions are opened by `Hello` (authentication with challenge, proof and certificates lands
//! with the core delivery and trust issues). Delivery to each device and conversation is a
//! sliding window over the log: up to `delivery_window` unacknowledged messages in flight; if the
//! device's acknowledgement cursor stalls for `redeliver_after`, the window rewinds to the cursor.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;

use crate::directory::{DirectoryConfig, Fetched, KeyPackageDirectory, KEY_PACKAGES_TABLE};
use crate::env::{scan_all, Entropy, Ready, StoreError, StoreRead, Table, WriteBatch};
use crate::groups::{Change, GroupKind, GroupOps, GroupRefusal, GroupState, GROUPS_TABLE};
use crate::identity::{session_proof_message, DevicePublicKey};
use crate::ids::{ConnectionId, ConversationId, DeviceId, MsgId, UserId};
use crate::mls;
use crate::mls::authority::{Admission, Kind};
use crate::sequencer::{
    decode_bounds, decode_dedup, decode_entry, split_pair_key, Appended, ConversationLog,
    SequencerError, BOUNDS_TABLE, DEDUP_TABLE, LOG_TABLE, MEMBERS_TABLE,
};
use crate::time::Instant;
use crate::trust::pairing::vouch_message;
use crate::trust::{
    CertificateError, EnrolmentToken, RegistrationAuthority, RegistrationError, TrustRoot,
};
use crate::wire::payload::{
    Ack, Challenge, Cursor, Deliver, ErrorCode, ErrorReport, FetchedKeyPackage, Goodbye, Heartbeat,
    Hello, HelloOk, KeyPackageCount, KeyPackageFetch, KeyPackageUpload, KeyPackages, Proof,
    Register, Removed, RosterEntry, SendAck, Welcome,
};
use crate::wire::payload::{
    Certificate as CertificatePayload, Crl as CrlPayload, TrustRoot as TrustRootPayload,
};
use crate::wire::payload::{DeviceLinked, PairVouch, PairVouched};
use crate::wire::{Frame, Payload, Routing, PAYLOAD_BYTES_MAX};

/// Table of resume tokens: key `token(32)`, value `device(16) ++ expires_at(8)`.
pub const TOKENS_TABLE: Table = Table("resume_tokens");

/// Table binding devices to users: key `user(16) ++ device(16)`, empty value.
pub const USERS_TABLE: Table = Table("user_devices");

/// Table of the gateway's own keys: key `mls_signer`, value its MLS signing key's 32-byte seed
/// (the key it signs external proposals with).
pub const GATEWAY_KEYS_TABLE: Table = Table("gateway_keys");
const MLS_SIGNER_KEY: &[u8] = b"mls_signer";

/// Table of per-device acknowledgement cursors: key `device(16) ++ conversation(16)`, value seq.
pub const CURSORS_TABLE: Table = Table("cursors");

/// Table of device inboxes (Welcomes and removal notices): key `device(16) ++
/// conversation(16)`, value `tag(1) ++ seq(8) ++ kind(1) ++ welcome` (tag 1 Welcome, 2 Removed).
pub const INBOX_TABLE: Table = Table("inbox");

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
}

impl InboxItem {
    fn seq(&self) -> u64 {
        match self {
            InboxItem::Welcome { seq, .. } | InboxItem::Removed { seq } => *seq,
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
        }
    }
}

/// What an accepted commit does once it has its seq.
struct GroupEffect {
    state: GroupState,
    change: Change,
    welcome: Option<Bytes>,
}

/// The gateway's decision on a message in an MLS conversation.
enum GroupAdmit {
    /// Sequence it (or answer it as a duplicate); then apply the commit's effect, if any.
    Pass(Option<Box<GroupEffect>>),
    /// Refused; the error frame is queued.
    Refused,
}

fn pair_key(a: u128, b: u128) -> Vec<u8> {
    let mut key = Vec::with_capacity(32);
    key.extend_from_slice(&a.to_be_bytes());
    key.extend_from_slice(&b.to_be_bytes());
    key
}

/// Tunables of a gateway. Every queue and timer has a named bound here.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// How often nodes are asked to send heartbeats.
    pub heartbeat_interval: Duration,
    /// A session that sends nothing for this long is closed.
    pub session_idle_timeout: Duration,
    /// A connection that has not said `Hello` within this is closed.
    pub hello_timeout: Duration,
    /// Most unacknowledged deliveries in flight per device and conversation.
    pub delivery_window: u64,
    /// A stalled acknowledgement cursor triggers redelivery after this long.
    pub redeliver_after: Duration,
    /// Period of the housekeeping tick (timeouts, redelivery).
    pub tick_interval: Duration,
    /// Largest accepted frame payload.
    pub payload_bytes_max: u32,
    /// Messages older than this are dropped even if some member never acknowledged them.
    pub retention_max: Duration,
    /// How long a deduplication record outlives its message (a sender's late retry still gets
    /// its original seq within this window).
    pub dedup_retention: Duration,
    /// Most log entries garbage-collected per conversation in one step. GC runs incrementally:
    /// one step per tick, and further steps every `gc_backlog_interval` while a step found more
    /// than it could take. Small steps keep each commit short, so GC adds little latency to the
    /// messages that share its commits.
    pub gc_batch_max: usize,
    /// How soon the next GC step runs while acknowledged or expired entries remain.
    pub gc_backlog_interval: Duration,
    /// Issue a certificate to any device that registers without an enrolment token (local use
    /// and demos); otherwise registration needs a one-time token from
    /// [`Gateway::issue_enrolment_token`]. Sessions need a certificate either way.
    pub open_enrolment: bool,
    /// The domain this gateway is the registration authority of (named in every certificate).
    pub domain: String,
    /// How long a resume token stays valid.
    pub resume_token_ttl: Duration,
    /// Limits of the KeyPackage directory.
    pub directory: DirectoryConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            heartbeat_interval: Duration::from_secs(5),
            session_idle_timeout: Duration::from_secs(15),
            hello_timeout: Duration::from_secs(10),
            delivery_window: 128,
            redeliver_after: Duration::from_secs(2),
            tick_interval: Duration::from_millis(250),
            payload_bytes_max: PAYLOAD_BYTES_MAX,
            retention_max: Duration::from_secs(30 * 24 * 3600),
            dedup_retention: Duration::from_secs(30 * 24 * 3600),
            gc_batch_max: 128,
            gc_backlog_interval: Duration::from_millis(5),
            open_enrolment: false,
            domain: "localhost".into(),
            resume_token_ttl: Duration::from_secs(7 * 24 * 3600),
            directory: DirectoryConfig::default(),
        }
    }
}

/// Inputs to [`Gateway::handle`].
#[derive(Clone, Debug)]
pub enum GatewayInput {
    /// A node connected.
    Accepted(ConnectionId),
    /// A frame arrived on a connection.
    Frame(ConnectionId, Bytes),
    /// A connection is gone.
    Closed(ConnectionId),
    /// Admin: create a conversation with these member devices (idempotent; members are added;
    /// an empty list creates nothing).
    CreateConversation(ConversationId, Vec<DeviceId>),
    /// Admin: revoke a device. A new CRL goes to every connected device, the device's sessions
    /// close, it never opens another, and the gateway proposes its removal from each of its
    /// groups.
    RevokeDevice(DeviceId),
    /// Admin: remove a device from an MLS conversation (the gateway proposes it as the group's
    /// external sender; the next committing member commits it).
    RemoveDevice(ConversationId, DeviceId),
}

/// Outputs released by a committed [`Ready`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GatewayOutput {
    /// Send an encoded frame on a connection.
    Send(ConnectionId, Bytes),
    /// Close a connection (after sending any frame queued before this output).
    Close(ConnectionId),
}

/// Counters for logs and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GatewayStats {
    /// Messages newly sequenced.
    pub sequenced: u64,
    /// Sends answered as duplicates.
    pub duplicates: u64,
    /// Deliver frames sent (first sends and redeliveries).
    pub deliveries: u64,
    /// Window rewinds after a stalled cursor or a replay request.
    pub rewinds: u64,
    /// Frames rejected as malformed.
    pub malformed: u64,
    /// Sessions closed for silence.
    pub idle_closes: u64,
    /// Log entries garbage-collected (acknowledged by all, or past retention).
    pub gc_dropped: u64,
    /// Replays refused because they started before the retained log.
    pub replay_window_exceeded: u64,
    /// Sessions opened by a challenge and proof.
    pub authenticated: u64,
    /// Sessions opened by a resume token.
    pub resumed: u64,
    /// Handshakes refused (bad proof, key mismatch, missing, invalid or revoked certificate).
    pub auth_failures: u64,
    /// Certificates issued.
    pub registrations: u64,
    /// Registrations refused (token, proof, revoked).
    pub registrations_refused: u64,
    /// Devices revoked.
    pub revocations: u64,
    /// Devices registered with a pairing code another device vouched for.
    pub pairings: u64,
    /// Certificates renewed before expiry.
    pub renewals: u64,
    /// Pairing vouches refused (signature, expiry, secret in use).
    pub pairings_refused: u64,
    /// CRL frames sent (answers and pushes).
    pub crls_sent: u64,
    /// KeyPackages accepted into pools.
    pub key_packages_uploaded: u64,
    /// KeyPackage uploads refused.
    pub key_package_uploads_refused: u64,
    /// KeyPackages handed out (one-time and last-resort).
    pub key_packages_fetched: u64,
    /// Fetches refused by the rate limit.
    pub key_package_fetches_limited: u64,
    /// Commits accepted into MLS conversations.
    pub commits: u64,
    /// Commits refused as stale (another commit won the epoch).
    pub stale_commits: u64,
    /// Application messages refused as made in an earlier epoch (the sender re-encrypts).
    pub stale_messages: u64,
    /// Group messages refused (roles, malformed, inconsistent).
    pub group_refusals: u64,
    /// Remove proposals the gateway sent as external sender.
    pub removals_proposed: u64,
}

#[derive(Clone, Debug)]
struct Stream {
    acked: u64,
    sent_upto: u64,
    last_progress: Instant,
}

/// Where a connection is in the handshake.
#[derive(Clone, Debug)]
enum Auth {
    /// Connected; no `Hello` yet.
    AwaitingHello,
    /// `Challenge` sent; waiting for the `Proof`.
    AwaitingProof {
        device: DeviceId,
        key: DevicePublicKey,
        nonce: [u8; 32],
        cursors: Vec<Cursor>,
        user: Option<UserId>,
    },
    /// Session open for this device.
    Open(DeviceId),
}

#[derive(Clone, Debug)]
struct Session {
    auth: Auth,
    opened_at: Instant,
    last_heard: Instant,
    streams: BTreeMap<ConversationId, Stream>,
}

impl Session {
    fn device(&self) -> Option<DeviceId> {
        match self.auth {
            Auth::Open(device) => Some(device),
            _ => None,
        }
    }
}

/// The gateway of one domain as a deterministic state machine. See the module docs.
pub struct Gateway {
    config: GatewayConfig,
    entropy: Box<dyn Entropy + Send>,
    conversations: BTreeMap<ConversationId, ConversationLog>,
    /// Conversations that are MLS groups (the others are plain, created by an operator).
    groups: BTreeMap<ConversationId, GroupState>,
    inbox: BTreeMap<(DeviceId, ConversationId), InboxItem>,
    /// When each inbox item last went out (in memory: a restart resends at session open).
    inbox_sent: BTreeMap<(DeviceId, ConversationId), Instant>,
    memberships: BTreeMap<DeviceId, BTreeSet<ConversationId>>,
    cursors: BTreeMap<(DeviceId, ConversationId), u64>,
    /// The registration authority (created at first use, then kept in the store).
    authority: Option<RegistrationAuthority>,
    tokens: BTreeMap<[u8; 32], (DeviceId, Instant)>,
    device_tokens: BTreeMap<DeviceId, [u8; 32]>,
    sessions: BTreeMap<ConnectionId, Session>,
    online: BTreeMap<DeviceId, ConnectionId>,
    directory: KeyPackageDirectory,
    users: BTreeMap<UserId, BTreeSet<DeviceId>>,
    device_users: BTreeMap<DeviceId, UserId>,
    /// Verifies uploaded KeyPackages; verification draws no randomness.
    mls_crypto: openmls_rust_crypto::RustCrypto,
    /// The key the gateway signs external proposals with (made at the first session).
    mls_signer: Option<openmls_basic_credential::SignatureKeyPair>,
    next_tick: Instant,
    /// When the next GC step runs ahead of the tick, while there is a backlog.
    gc_again_at: Option<Instant>,
    writes: WriteBatch,
    outputs: Vec<GatewayOutput>,
    stats: GatewayStats,
}

impl core::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Gateway")
            .field("conversations", &self.conversations.len())
            .field("sessions", &self.sessions.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway with empty storage. `entropy` supplies challenge nonces and resume tokens.
    pub fn new(config: GatewayConfig, now: Instant, entropy: Box<dyn Entropy + Send>) -> Gateway {
        assert!(
            config.delivery_window > 0,
            "delivery_window must be positive"
        );
        assert!(
            !config.tick_interval.is_zero(),
            "tick_interval must be positive"
        );
        let directory_config = config.directory.clone();
        Gateway {
            next_tick: now + config.tick_interval,
            gc_again_at: None,
            config,
            entropy,
            conversations: BTreeMap::new(),
            groups: BTreeMap::new(),
            inbox: BTreeMap::new(),
            inbox_sent: BTreeMap::new(),
            memberships: BTreeMap::new(),
            cursors: BTreeMap::new(),
            authority: None,
            tokens: BTreeMap::new(),
            device_tokens: BTreeMap::new(),
            sessions: BTreeMap::new(),
            online: BTreeMap::new(),
            directory: KeyPackageDirectory::new(directory_config),
            users: BTreeMap::new(),
            device_users: BTreeMap::new(),
            mls_crypto: openmls_rust_crypto::RustCrypto::default(),
            mls_signer: None,
            writes: WriteBatch::default(),
            outputs: Vec::new(),
            stats: GatewayStats::default(),
        }
    }

    /// Rebuilds a gateway from committed storage after a (re)start. Sessions start empty; resume
    /// tokens survive.
    pub fn recover(
        config: GatewayConfig,
        now: Instant,
        store: &dyn StoreRead,
        entropy: Box<dyn Entropy + Send>,
    ) -> Result<Gateway, StoreError> {
        let mut g = Gateway::new(config, now, entropy);
        // A group's log exists even when every device has left it.
        scan_all(store, GROUPS_TABLE, |key, value| {
            let (conv, state) = GroupState::decode(key, value)?;
            g.conversations
                .entry(conv)
                .or_insert_with(|| ConversationLog::new(conv, []));
            g.groups.insert(conv, state);
            Ok(())
        })?;
        if let Some(seed) = store.get(GATEWAY_KEYS_TABLE, MLS_SIGNER_KEY)? {
            let seed: [u8; 32] = seed
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt {
                    table: GATEWAY_KEYS_TABLE.0,
                    reason: format!("MLS signing key of {} bytes, want 32", seed.len()),
                })?;
            g.mls_signer = Some(signer_from_seed(seed));
        }
        scan_all(store, INBOX_TABLE, |key, value| {
            let (device, conv) = split_pair_key(INBOX_TABLE, key)?;
            let item = InboxItem::decode(value)?;
            g.inbox
                .insert((DeviceId(device), ConversationId(conv)), item);
            Ok(())
        })?;
        scan_all(store, MEMBERS_TABLE, |key, _| {
            let (conv, device) = split_pair_key(MEMBERS_TABLE, key)?;
            g.add_member(ConversationId(conv), DeviceId(device));
            Ok(())
        })?;
        scan_all(store, BOUNDS_TABLE, |key, value| {
            let (conv, head, first) = decode_bounds(key, value)?;
            g.conversations
                .entry(conv)
                .or_insert_with(|| ConversationLog::new(conv, []))
                .restore_bounds(head, first)
        })?;
        scan_all(store, DEDUP_TABLE, |key, value| {
            let (conv, records) = decode_dedup(key, value)?;
            if let Some(log) = g.conversations.get_mut(&conv) {
                log.restore_dedup_chunk(key.to_vec(), &records);
            }
            Ok(())
        })?;
        scan_all(store, LOG_TABLE, |key, value| {
            let (conv, entry) = decode_entry(key, value)?;
            match g.conversations.get_mut(&conv) {
                Some(log) => log.restore_entry(entry),
                None => Err(StoreError::Corrupt {
                    table: LOG_TABLE.0,
                    reason: format!("entry for {conv} which has no members"),
                }),
            }
        })?;
        for log in g.conversations.values_mut() {
            log.finish_restore()?;
        }
        scan_all(store, CURSORS_TABLE, |key, value| {
            let (device, conv) = split_pair_key(CURSORS_TABLE, key)?;
            let seq: [u8; 8] = value.try_into().map_err(|_| StoreError::Corrupt {
                table: CURSORS_TABLE.0,
                reason: format!("cursor value of {} bytes", value.len()),
            })?;
            g.cursors.insert(
                (DeviceId(device), ConversationId(conv)),
                u64::from_be_bytes(seq),
            );
            Ok(())
        })?;
        g.authority = RegistrationAuthority::recover(store)?;
        scan_all(store, KEY_PACKAGES_TABLE, |key, value| {
            g.directory.restore(key, value)
        })?;
        scan_all(store, USERS_TABLE, |key, _| {
            let (user, device) = split_pair_key(USERS_TABLE, key)?;
            g.bind_user(UserId(user), DeviceId(device));
            Ok(())
        })?;
        scan_all(store, TOKENS_TABLE, |key, value| {
            let corrupt = || StoreError::Corrupt {
                table: TOKENS_TABLE.0,
                reason: format!("token record {} / {} bytes", key.len(), value.len()),
            };
            let token: [u8; 32] = key.try_into().map_err(|_| corrupt())?;
            if value.len() != 24 {
                return Err(corrupt());
            }
            let device = DeviceId::from_bytes(value[..16].try_into().expect("16 bytes"));
            let expires = Instant(u64::from_be_bytes(value[16..].try_into().expect("8 bytes")));
            g.tokens.insert(token, (device, expires));
            g.device_tokens.insert(device, token);
            Ok(())
        })?;
        Ok(g)
    }

    // ---- getters ----

    /// The highest seq of a conversation, if it exists here.
    pub fn conversation_head(&self, conversation: ConversationId) -> Option<u64> {
        self.conversations
            .get(&conversation)
            .map(ConversationLog::head)
    }

    /// The conversations this gateway is authority for, in id order.
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

    /// Number of open connections (authenticated or not).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Counters.
    pub fn stats(&self) -> &GatewayStats {
        &self.stats
    }

    /// When `handle_timeout` must next be called.
    pub fn poll_timeout(&self) -> Instant {
        self.gc_again_at
            .map_or(self.next_tick, |at| at.min(self.next_tick))
    }

    // ---- inputs ----

    /// Feeds one input. Then drain [`Gateway::poll_ready`].
    pub fn handle(&mut self, now: Instant, input: GatewayInput) {
        match input {
            GatewayInput::Accepted(conn) => {
                let session = Session {
                    auth: Auth::AwaitingHello,
                    opened_at: now,
                    last_heard: now,
                    streams: BTreeMap::new(),
                };
                let previous = self.sessions.insert(conn, session);
                debug_assert!(previous.is_none(), "connection ids are unique");
            }
            GatewayInput::Frame(conn, bytes) => self.handle_frame(now, conn, &bytes),
            GatewayInput::Closed(conn) => self.forget_session(conn),
            GatewayInput::RemoveDevice(conv, device) => self.propose_removal(now, conv, device),
            GatewayInput::RevokeDevice(device) => self.revoke(now, device),
            GatewayInput::CreateConversation(conv, members) => {
                for device in members {
                    self.add_member(conv, device);
                }
                // A conversation exists through its members: with none, there is nothing to
                // create (and nothing that could be recovered).
                if let Some(log) = self.conversations.get(&conv) {
                    log.persist_members(&mut self.writes);
                }
            }
        }
    }

    /// Periodic work: idle sessions, missing `Hello`s, stalled delivery windows.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_tick {
            if self.gc_again_at.is_some_and(|at| at <= now) {
                self.collect_garbage(now);
            }
            return;
        }
        self.next_tick = now + self.config.tick_interval;
        let mut to_close = Vec::new();
        let mut to_rewind = Vec::new();
        for (&conn, session) in &self.sessions {
            match session.device() {
                None if now.saturating_since(session.opened_at) >= self.config.hello_timeout => {
                    to_close.push((
                        conn,
                        ErrorCode::NotAuthenticated,
                        "handshake not completed in time",
                    ));
                }
                Some(_)
                    if now.saturating_since(session.last_heard)
                        >= self.config.session_idle_timeout =>
                {
                    to_close.push((conn, ErrorCode::HeartbeatTimeout, "no heartbeat in time"));
                }
                Some(_) => {
                    for (&conv, stream) in &session.streams {
                        if stream.acked < stream.sent_upto
                            && now.saturating_since(stream.last_progress)
                                >= self.config.redeliver_after
                        {
                            to_rewind.push((conn, conv));
                        }
                    }
                }
                None => {}
            }
        }
        for (conn, code, why) in to_close {
            if code == ErrorCode::HeartbeatTimeout {
                self.stats.idle_closes += 1;
            }
            self.goodbye(conn, code, why);
        }
        for (conn, conv) in to_rewind {
            self.rewind(now, conn, conv, None);
        }
        self.resend_inbox(now);
        self.collect_garbage(now);
        self.expire_tokens(now);
    }

    fn expire_tokens(&mut self, now: Instant) {
        let expired: Vec<[u8; 32]> = self
            .tokens
            .iter()
            .filter(|(_, (_, expires))| *expires <= now)
            .take(self.config.gc_batch_max)
            .map(|(t, _)| *t)
            .collect();
        for token in expired {
            self.remove_token(token);
        }
    }

    fn remove_token(&mut self, token: [u8; 32]) {
        if let Some((device, _)) = self.tokens.remove(&token) {
            if self.device_tokens.get(&device) == Some(&token) {
                self.device_tokens.remove(&device);
            }
            self.writes.delete(TOKENS_TABLE, token.to_vec());
        }
    }

    /// Issues the device's new resume token, replacing its old one.
    fn issue_token(&mut self, now: Instant, device: DeviceId) -> [u8; 32] {
        if let Some(old) = self.device_tokens.get(&device).copied() {
            self.remove_token(old);
        }
        let mut token = [0u8; 32];
        self.entropy.fill_bytes(&mut token);
        let expires = now + self.config.resume_token_ttl;
        self.tokens.insert(token, (device, expires));
        self.device_tokens.insert(device, token);
        let mut value = Vec::with_capacity(24);
        value.extend_from_slice(&device.to_bytes());
        value.extend_from_slice(&expires.0.to_be_bytes());
        self.writes.put(TOKENS_TABLE, token.to_vec(), value);
        token
    }

    /// One GC step: drops log entries every member acknowledged or that passed retention, a
    /// bounded amount per conversation, and schedules the next step soon if any conversation
    /// had more than that.
    fn collect_garbage(&mut self, now: Instant) {
        let expire_before = now - self.config.retention_max;
        let dedup_expire_before = now - self.config.dedup_retention;
        let mut backlog = false;
        for log in self.conversations.values_mut() {
            let acked_by_all = log
                .members()
                .iter()
                .map(|d| self.cursors.get(&(*d, log.id())).copied().unwrap_or(0))
                .min()
                .unwrap_or(0);
            let dropped = log.collect_garbage(
                acked_by_all,
                expire_before,
                dedup_expire_before,
                self.config.gc_batch_max,
                &mut self.writes,
            );
            self.stats.gc_dropped += dropped as u64;
            backlog |= dropped > 0 && dropped == self.config.gc_batch_max;
        }
        self.gc_again_at = backlog.then(|| now + self.config.gc_backlog_interval);
    }

    /// Graceful shutdown: says goodbye to every session (`ShuttingDown`) and closes it. The
    /// driver commits and flushes the resulting `Ready` before it stops.
    pub fn shut_down(&mut self, _now: Instant) {
        let conns: Vec<ConnectionId> = self.sessions.keys().copied().collect();
        for conn in conns {
            self.goodbye(
                conn,
                ErrorCode::ShuttingDown,
                "the gateway is shutting down; reconnect shortly",
            );
        }
    }

    /// The writes and outputs produced so far, or `None` if there are none.
    pub fn poll_ready(&mut self) -> Option<Ready<GatewayOutput>> {
        if self.writes.is_empty() && self.outputs.is_empty() {
            return None;
        }
        Some(Ready::new(
            self.writes.take(),
            std::mem::take(&mut self.outputs),
        ))
    }

    // ---- internals ----

    fn add_member(&mut self, conv: ConversationId, device: DeviceId) {
        self.conversations
            .entry(conv)
            .or_insert_with(|| ConversationLog::new(conv, []))
            .restore_member(device);
        self.memberships.entry(device).or_default().insert(conv);
    }

    fn handle_frame(&mut self, now: Instant, conn: ConnectionId, bytes: &[u8]) {
        let Some(session) = self.sessions.get_mut(&conn) else {
            return; // a frame raced with the close of its connection
        };
        session.last_heard = now;
        let authenticated = session.device();
        let awaiting_proof = matches!(session.auth, Auth::AwaitingProof { .. });
        let frame = match Frame::decode(bytes, self.config.payload_bytes_max) {
            Ok(frame) => frame,
            Err(error) => {
                self.stats.malformed += 1;
                self.goodbye(conn, ErrorCode::MalformedFrame, &error.to_string());
                return;
            }
        };
        let routing = frame.routing;
        match (authenticated, frame.payload) {
            (None, Payload::Hello(hello)) if !awaiting_proof => {
                self.handle_hello(now, conn, routing.sender, hello)
            }
            (None, Payload::Proof(proof)) if awaiting_proof => self.handle_proof(now, conn, proof),
            (None, Payload::Register(register)) if !awaiting_proof => {
                self.handle_register(now, conn, routing.sender, register)
            }
            (_, Payload::TrustRootFetch(_)) => {
                let root = self.authority(now).root().clone();
                let answer = TrustRootPayload {
                    key: root.key.0,
                    domain: root.domain,
                };
                self.send(conn, Routing::default(), Payload::TrustRoot(answer));
            }
            (_, Payload::CrlFetch(fetch)) => {
                if self.authority(now).crl().version > fetch.have_version {
                    self.send_crl(now, conn);
                }
            }
            (Some(_), Payload::Hello(_)) => {
                // One device per session: a second Hello would leave the first device's routing
                // pointing at a session that is no longer its own.
                self.error(
                    conn,
                    ErrorCode::UnexpectedOpcode,
                    "this session is already open",
                    None,
                );
            }
            (None, _) => {
                self.goodbye(conn, ErrorCode::NotAuthenticated, "say hello first");
            }
            (Some(_), Payload::Heartbeat(beat)) => {
                let crl_version = self.authority.as_ref().map(|a| a.crl().version);
                let ack = Heartbeat {
                    nonce: beat.nonce,
                    crl_version,
                };
                self.send(conn, Routing::default(), Payload::HeartbeatAck(ack));
            }
            (Some(_), Payload::HeartbeatAck(_)) => {}
            (Some(device), Payload::Send(send)) => {
                let msg_id = send.msg_id();
                let welcome = send.welcome.map(|w| Bytes::from(Vec::from(w)));
                let conv = routing.conversation;
                self.accept_message(now, conn, device, conv, msg_id, send.body, welcome)
            }
            (Some(device), Payload::Ack(Ack {})) => {
                self.acknowledge(now, conn, device, routing.conversation, routing.seq)
            }
            (Some(device), Payload::Leave(_)) => {
                let conv = routing.conversation;
                if self
                    .groups
                    .get(&conv)
                    .is_some_and(|g| g.devices().contains_key(&device))
                {
                    self.propose_removal(now, conv, device);
                } else {
                    self.error_in(
                        conn,
                        Routing {
                            conversation: conv,
                            ..Routing::default()
                        },
                        ErrorCode::NotMember,
                        "this device is not in that group",
                        None,
                    );
                }
            }
            (Some(_), Payload::ReplayRequest(request)) => {
                self.rewind(now, conn, routing.conversation, Some(request.from_seq))
            }
            (Some(device), Payload::PairVouch(vouch)) => {
                self.accept_vouch(now, conn, device, vouch)
            }
            (Some(device), Payload::RenewCertificate(_)) => self.renew(now, conn, device),
            (Some(device), Payload::KeyPackageUpload(upload)) => {
                self.upload_key_packages(conn, device, upload)
            }
            (Some(device), Payload::KeyPackageFetch(fetch)) => {
                self.fetch_key_packages(now, conn, device, fetch, routing.seq)
            }
            (Some(_), Payload::Goodbye(_)) => {
                self.outputs.push(GatewayOutput::Close(conn));
                self.forget_session(conn);
            }
            (Some(_), other) => {
                let message = format!("{:?} is not accepted by a gateway", other.opcode());
                self.error(conn, ErrorCode::UnexpectedOpcode, &message, None);
            }
        }
    }

    /// Checks the key and admission, then resumes with a valid token or sends a challenge.
    fn handle_hello(&mut self, now: Instant, conn: ConnectionId, device: DeviceId, hello: Hello) {
        let key = DevicePublicKey(hello.device_key);
        if key.device_id() != device {
            self.stats.auth_failures += 1;
            self.goodbye(
                conn,
                ErrorCode::AuthenticationFailed,
                "the sender device id does not match the device key",
            );
            return;
        }
        let Some(certificate) = hello.certificate else {
            self.stats.auth_failures += 1;
            self.goodbye(
                conn,
                ErrorCode::CertificateRequired,
                "a session needs a device certificate: register this device first",
            );
            return;
        };
        let checked = self.authority(now).check(now, &certificate, &key);
        let cert = match checked {
            Ok(cert) => cert,
            Err(e) => {
                self.stats.auth_failures += 1;
                self.goodbye(conn, certificate_error_code(&e), &e.to_string());
                return;
            }
        };
        if let Some(claimed) = hello.user.map(UserId::from_bytes) {
            if claimed != cert.user {
                self.stats.auth_failures += 1;
                let message = format!(
                    "this device's certificate is for {}, not {claimed}",
                    cert.user
                );
                self.goodbye(conn, ErrorCode::UserMismatch, &message);
                return;
            }
        }
        let user = Some(cert.user);
        if let Some(token) = hello.resume_token {
            match self.tokens.get(&token).copied() {
                Some((owner, expires)) if owner == device && now < expires => {
                    self.stats.resumed += 1;
                    self.open_session(now, conn, device, &hello.cursors, user);
                    return;
                }
                Some((owner, _)) if owner == device => {
                    self.error(
                        conn,
                        ErrorCode::ResumeTokenExpired,
                        "resume token expired; answer the challenge",
                        None,
                    );
                }
                _ => {
                    self.error(
                        conn,
                        ErrorCode::ResumeTokenInvalid,
                        "resume token unknown or not yours; answer the challenge",
                        None,
                    );
                }
            }
        }
        let mut nonce = [0u8; 32];
        self.entropy.fill_bytes(&mut nonce);
        let session = self.sessions.get_mut(&conn).expect("session exists");
        session.auth = Auth::AwaitingProof {
            device,
            key,
            nonce,
            cursors: hello.cursors,
            user,
        };
        self.send(
            conn,
            Routing::default(),
            Payload::Challenge(Challenge { nonce }),
        );
    }

    fn handle_proof(&mut self, now: Instant, conn: ConnectionId, proof: Proof) {
        let session = self.sessions.get_mut(&conn).expect("session exists");
        let Auth::AwaitingProof {
            device,
            key,
            nonce,
            cursors,
            user,
        } = std::mem::replace(&mut session.auth, Auth::AwaitingHello)
        else {
            unreachable!("checked by the caller");
        };
        if !key.verify(&session_proof_message(&nonce, device), &proof.signature) {
            self.stats.auth_failures += 1;
            self.goodbye(
                conn,
                ErrorCode::AuthenticationFailed,
                "the proof does not verify against the device key",
            );
            return;
        }
        self.stats.authenticated += 1;
        self.open_session(now, conn, device, &cursors, user);
    }

    fn open_session(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        device: DeviceId,
        cursors: &[Cursor],
        user: Option<UserId>,
    ) {
        debug_assert!(device != DeviceId(0), "device ids come from keys");
        // Checked only now that the device proved its key, so the binding is not revealed to
        // whoever merely claims a device id.
        if let (Some(claimed), Some(bound)) = (user, self.device_users.get(&device)) {
            if claimed != *bound {
                self.stats.auth_failures += 1;
                let message = format!("this device belongs to {bound}, not {claimed}");
                self.goodbye(conn, ErrorCode::UserMismatch, &message);
                return;
            }
        }
        if let Some(user) = user {
            if !self.device_users.contains_key(&device) {
                self.bind_user(user, device);
                let mut key = user.to_bytes().to_vec();
                key.extend_from_slice(&device.to_bytes());
                self.writes.put(USERS_TABLE, key, Vec::new());
            }
        }
        if let Some(old) = self.online.insert(device, conn) {
            let still_that_device = self
                .sessions
                .get(&old)
                .is_some_and(|s| s.device() == Some(device));
            if old != conn && still_that_device {
                self.goodbye(
                    old,
                    ErrorCode::SessionReplaced,
                    "a newer session replaced this one",
                );
            }
        }
        let presented: BTreeMap<ConversationId, u64> = cursors
            .iter()
            .map(|c| (c.conversation_id(), c.seq))
            .collect();
        let mut streams = BTreeMap::new();
        let convs: Vec<ConversationId> = self
            .memberships
            .get(&device)
            .into_iter()
            .flatten()
            .copied()
            .collect();
        for conv in convs {
            let head = self.conversations[&conv].head();
            let stored = self.cursor(device, conv);
            let acked = presented.get(&conv).copied().unwrap_or(stored).min(head);
            if acked > stored {
                self.store_cursor(device, conv, acked);
            }
            streams.insert(
                conv,
                Stream {
                    acked,
                    sent_upto: acked,
                    last_progress: now,
                },
            );
        }
        let session = self.sessions.get_mut(&conn).expect("session exists");
        session.auth = Auth::Open(device);
        session.streams = streams;
        let token = self.issue_token(now, device);
        let interval_ms =
            u32::try_from(self.config.heartbeat_interval.as_millis()).unwrap_or(u32::MAX);
        let ttl_s = u32::try_from(self.config.resume_token_ttl.as_secs()).unwrap_or(u32::MAX);
        let external_sender = self.external_signer().public().to_vec();
        let ok = HelloOk {
            heartbeat_interval_ms: interval_ms,
            resume_token: token,
            resume_token_ttl_s: ttl_s,
            external_sender: Some(external_sender.into()),
        };
        self.send(conn, Routing::default(), Payload::HelloOk(ok));
        self.send_key_package_count(conn, device);
        let waiting: Vec<(ConversationId, InboxItem)> = self
            .inbox
            .range((device, ConversationId(0))..=(device, ConversationId(u128::MAX)))
            .map(|((_, conv), item)| (*conv, item.clone()))
            .collect();
        for (conv, item) in waiting {
            self.inbox_sent.insert((device, conv), now);
            self.send_inbox_item(conn, conv, &item);
        }
        let convs: Vec<ConversationId> = self.sessions[&conn].streams.keys().copied().collect();
        for conv in convs {
            self.pump(now, conn, conv);
        }
    }

    fn bind_user(&mut self, user: UserId, device: DeviceId) {
        self.users.entry(user).or_default().insert(device);
        self.device_users.insert(device, user);
    }

    /// Tells a device how many KeyPackages it has left.
    fn send_key_package_count(&mut self, conn: ConnectionId, device: DeviceId) {
        let count = KeyPackageCount {
            remaining: u32::try_from(self.directory.remaining(device)).unwrap_or(u32::MAX),
            last_resort: self.directory.has_last_resort(device),
            replenish_below: u32::try_from(self.directory.config().replenish_below)
                .unwrap_or(u32::MAX),
        };
        self.send(conn, Routing::default(), Payload::KeyPackageCount(count));
    }

    fn upload_key_packages(
        &mut self,
        conn: ConnectionId,
        device: DeviceId,
        upload: KeyPackageUpload,
    ) {
        let count = upload.packages.len();
        let packages = upload
            .packages
            .into_iter()
            .map(|p| Bytes::from(Vec::<u8>::from(p)))
            .collect();
        let last_resort = upload.last_resort.map(|p| Bytes::from(Vec::<u8>::from(p)));
        let crypto = &self.mls_crypto;
        let validate = |bytes: &[u8]| mls::key_packages::check(crypto, bytes, device);
        match self
            .directory
            .upload(device, packages, last_resort, &validate, &mut self.writes)
        {
            Ok(_) => {
                self.stats.key_packages_uploaded += count as u64;
                self.send_key_package_count(conn, device);
            }
            Err(error) => {
                self.stats.key_package_uploads_refused += 1;
                self.error(
                    conn,
                    ErrorCode::KeyPackageRejected,
                    &error.to_string(),
                    None,
                );
            }
        }
    }

    /// One KeyPackage per device of each requested user, the requesting device excluded. The
    /// answer (or the refusal) carries the request's id (the header's seq) back.
    fn fetch_key_packages(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        requester: DeviceId,
        fetch: KeyPackageFetch,
        request: u64,
    ) {
        let routing = Routing {
            seq: request,
            ..Routing::default()
        };
        if let Err(limited) = self.directory.admit_fetch(now, requester) {
            self.stats.key_package_fetches_limited += 1;
            let message = limited.to_string();
            self.error_in(conn, routing, ErrorCode::RateLimited, &message, None);
            return;
        }
        let mut targets: Vec<(UserId, DeviceId)> = Vec::new();
        for user in fetch.users.iter().map(|u| UserId::from_bytes(**u)) {
            for &device in self.users.get(&user).into_iter().flatten() {
                if device != requester && !targets.iter().any(|(_, d)| *d == device) {
                    targets.push((user, device));
                }
            }
        }
        let devices: Vec<DeviceId> = targets.iter().map(|(_, d)| *d).collect();
        let taken = self.directory.take(&devices, &mut self.writes);
        let mut answer = KeyPackages::default();
        let mut drained = Vec::new();
        for ((user, _), fetched) in targets.into_iter().zip(taken) {
            match fetched {
                Fetched::Package {
                    device,
                    package,
                    last_resort,
                } => {
                    self.stats.key_packages_fetched += 1;
                    if self.directory.needs_replenishing(device) {
                        drained.push(device);
                    }
                    answer.found.push(FetchedKeyPackage {
                        user: user.to_bytes().into(),
                        device: device.to_bytes().into(),
                        package: package.to_vec().into(),
                        last_resort,
                    });
                }
                Fetched::Exhausted(device) => answer.exhausted.push(device.to_bytes().into()),
            }
        }
        self.send(conn, routing, Payload::KeyPackages(answer));
        for owner in drained {
            if let Some(&owner_conn) = self.online.get(&owner) {
                self.send_key_package_count(owner_conn, owner);
            }
        }
    }

    /// Every user a device is bound to, in id order.
    pub fn users(&self) -> impl Iterator<Item = UserId> + '_ {
        self.users.keys().copied()
    }

    /// The devices bound to `user`.
    pub fn devices_of(&self, user: UserId) -> impl Iterator<Item = DeviceId> + '_ {
        self.users.get(&user).into_iter().flatten().copied()
    }

    /// One-time KeyPackages `device` has in the directory.
    pub fn key_packages_left(&self, device: DeviceId) -> usize {
        self.directory.remaining(device)
    }

    #[allow(clippy::too_many_arguments)]
    fn accept_message(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        device: DeviceId,
        conv: ConversationId,
        msg_id: MsgId,
        body: Vec<u8>,
        welcome: Option<Bytes>,
    ) {
        let plain = self.conversations.contains_key(&conv) && !self.groups.contains_key(&conv);
        let mut effect = None;
        if !plain {
            match self.admit_group_message(conn, device, conv, msg_id, &body, welcome) {
                GroupAdmit::Pass(admitted) => effect = admitted,
                GroupAdmit::Refused => return,
            }
            if effect.is_some() && !self.conversations.contains_key(&conv) {
                // A creating commit: the conversation starts with its creator as sole member,
                // and the commit adds the others.
                let mut log = ConversationLog::new(conv, []);
                log.add_member(device, &mut self.writes);
                self.conversations.insert(conv, log);
                self.memberships.entry(device).or_default().insert(conv);
                self.store_cursor(device, conv, 0);
                if let Some(session) = self.sessions.get_mut(&conn) {
                    let stream = Stream {
                        acked: 0,
                        sent_upto: 0,
                        last_progress: now,
                    };
                    session.streams.insert(conv, stream);
                }
            }
        }
        let Some(log) = self.conversations.get_mut(&conv) else {
            self.error(
                conn,
                ErrorCode::UnknownConversation,
                "no such conversation here",
                Some(msg_id),
            );
            return;
        };
        let seq = match log.append(now, device, msg_id, Bytes::from(body)) {
            Ok(Appended::New(seq)) => {
                log.persist_append(seq, &mut self.writes);
                self.stats.sequenced += 1;
                if let Some(effect) = effect.take() {
                    self.stats.commits += 1;
                    self.apply_group_effect(now, conv, seq, *effect);
                }
                seq
            }
            Ok(Appended::Duplicate(seq)) => {
                self.stats.duplicates += 1;
                seq
            }
            Err(SequencerError::NotMember) => {
                self.error(
                    conn,
                    ErrorCode::NotMember,
                    "not a member of this conversation",
                    Some(msg_id),
                );
                return;
            }
        };
        let routing = Routing {
            conversation: conv,
            seq,
            ..Routing::default()
        };
        self.send(
            conn,
            routing,
            Payload::SendAck(SendAck {
                msg_id: msg_id.to_bytes(),
            }),
        );
        let members: Vec<DeviceId> = self.conversations[&conv]
            .members()
            .iter()
            .copied()
            .collect();
        for member in members {
            if let Some(&member_conn) = self.online.get(&member) {
                self.pump(now, member_conn, conv);
            }
        }
    }

    /// Decides on a message for an MLS conversation (or one that a creating commit is about
    /// to make): deduplication first, then the commit authority and the roles.
    fn admit_group_message(
        &mut self,
        conn: ConnectionId,
        device: DeviceId,
        conv: ConversationId,
        msg_id: MsgId,
        body: &[u8],
        welcome: Option<Bytes>,
    ) -> GroupAdmit {
        let duplicate = self
            .conversations
            .get(&conv)
            .and_then(|log| log.duplicate_of(device, msg_id));
        if duplicate.is_some() {
            // A retried message that was accepted gets its original seq, never stale_epoch.
            return GroupAdmit::Pass(None);
        }
        let refuse = |g: &mut Gateway, code: ErrorCode, message: String, epoch: u64| {
            g.stats.group_refusals += 1;
            let routing = Routing {
                conversation: conv,
                epoch,
                ..Routing::default()
            };
            g.error_in(conn, routing, code, &message, Some(msg_id));
            GroupAdmit::Refused
        };
        let (framing, aad) = match mls::authority::read_message(body) {
            Ok(read) => read,
            Err(_) if !self.groups.contains_key(&conv) => {
                let message = "no such conversation here".to_string();
                return refuse(self, ErrorCode::UnknownConversation, message, 0);
            }
            Err(e) => return refuse(self, ErrorCode::InvalidGroupMessage, e.to_string(), 0),
        };
        if framing.group_id != conv.to_bytes() {
            let message = "the MLS group id differs from the conversation id".to_string();
            return refuse(self, ErrorCode::InvalidGroupMessage, message, 0);
        }
        let current = self.groups.get(&conv).map(GroupState::epoch);
        match framing.kind {
            Kind::Application => match current {
                None => {
                    let message = "no such conversation here".to_string();
                    refuse(self, ErrorCode::UnknownConversation, message, 0)
                }
                Some(epoch) if framing.epoch > epoch => {
                    let message = format!("epoch {} is ahead of the group's", framing.epoch);
                    refuse(self, ErrorCode::InvalidGroupMessage, message, epoch)
                }
                Some(epoch) if framing.epoch < epoch => {
                    // Sequenced now, it would reach members (new ones among them) in a later
                    // epoch than it was made for: the sender encrypts it again.
                    self.stats.stale_messages += 1;
                    let message = format!(
                        "made in epoch {}, the group is at epoch {epoch}; encrypt it again",
                        framing.epoch
                    );
                    refuse(self, ErrorCode::StaleEpoch, message, epoch)
                }
                Some(_) => GroupAdmit::Pass(None),
            },
            Kind::Proposal => {
                let message = "Sund members commit their changes; proposals by members are \
                               not accepted"
                    .to_string();
                refuse(
                    self,
                    ErrorCode::InvalidGroupMessage,
                    message,
                    current.unwrap_or(0),
                )
            }
            Kind::Commit => {
                let ops = match GroupOps::decode(&aad) {
                    Ok(ops) => ops,
                    Err(e) => {
                        let epoch = current.unwrap_or(0);
                        return refuse(self, ErrorCode::InvalidGroupMessage, e.to_string(), epoch);
                    }
                };
                match self.check_commit(device, conv, framing.epoch, &ops, welcome) {
                    Ok(effect) => GroupAdmit::Pass(Some(Box::new(effect))),
                    Err((code, message, epoch)) => {
                        if code == ErrorCode::StaleEpoch {
                            self.stats.stale_commits += 1;
                        }
                        refuse(self, code, message, epoch)
                    }
                }
            }
        }
    }

    /// Checks a commit against the authority and the roles; on success returns the group as it
    /// will be after the commit.
    fn check_commit(
        &self,
        device: DeviceId,
        conv: ConversationId,
        epoch: u64,
        ops: &GroupOps,
        welcome: Option<Bytes>,
    ) -> Result<GroupEffect, (ErrorCode, String, u64)> {
        let mut state = match (self.groups.get(&conv), ops.create) {
            (Some(state), None) => state.clone(),
            (Some(state), Some(_)) => {
                return Err((
                    ErrorCode::StaleEpoch,
                    "this conversation exists already; join it from its Welcome".into(),
                    state.epoch(),
                ))
            }
            (None, None) => {
                return Err((
                    ErrorCode::UnknownConversation,
                    "no such conversation here".into(),
                    0,
                ))
            }
            (None, Some(kind)) => {
                let Some(kind) = GroupKind::from_u8(kind) else {
                    let message = format!("unknown conversation kind {kind}");
                    return Err((ErrorCode::InvalidGroupMessage, message, 0));
                };
                if self.conversations.contains_key(&conv) {
                    let message = "an operator-made conversation has this id".into();
                    return Err((ErrorCode::InvalidGroupMessage, message, 0));
                }
                let Some(&user) = self.device_users.get(&device) else {
                    let message = "say which user this device belongs to before creating \
                                   conversations (sund init --user NAME)"
                        .into();
                    return Err((ErrorCode::Forbidden, message, 0));
                };
                GroupState::create(kind, device, user)
            }
        };
        let before = state.epoch();
        match state.authority_mut().admit(epoch, Kind::Commit) {
            Admission::Accept => {}
            Admission::Stale { current } => {
                let message = format!(
                    "a commit for epoch {epoch} was already accepted; the group is at epoch \
                     {current}"
                );
                return Err((ErrorCode::StaleEpoch, message, current));
            }
            Admission::Future { current } => {
                let message = format!("epoch {epoch} is ahead of the group's {current}");
                return Err((ErrorCode::InvalidGroupMessage, message, current));
            }
        }
        let change = state
            .check(device, ops, |d| self.device_users.get(&d).copied())
            .map_err(|refusal| match refusal {
                GroupRefusal::Forbidden(m) => (ErrorCode::Forbidden, m, before),
                GroupRefusal::Invalid(m) => (ErrorCode::InvalidGroupMessage, m, before),
            })?;
        if !change.added.is_empty() && welcome.is_none() {
            let message = "a commit that adds devices must carry their Welcome".into();
            return Err((ErrorCode::InvalidGroupMessage, message, before));
        }
        if let Some(crl) = self.authority.as_ref().map(|a| a.crl()) {
            if let Some((revoked, _, _)) = change
                .added
                .iter()
                .find(|(d, _, _)| crl.revoked.contains(d))
            {
                let message = format!("device {revoked} is revoked and cannot be added");
                return Err((ErrorCode::Forbidden, message, before));
            }
        }
        state.apply(&change);
        Ok(GroupEffect {
            state,
            change,
            welcome,
        })
    }

    /// Applies an accepted commit sequenced at `seq`: the group's new state, the members it
    /// adds (cursor at `seq`, a Welcome in their inbox) and removes (a notice in theirs).
    fn apply_group_effect(
        &mut self,
        now: Instant,
        conv: ConversationId,
        seq: u64,
        effect: GroupEffect,
    ) {
        let GroupEffect {
            state,
            change,
            welcome,
        } = effect;
        state.persist(conv, &mut self.writes);
        let kind = state.kind();
        self.groups.insert(conv, state);
        let log = self.conversations.get_mut(&conv).expect("sequenced here");
        for (device, _, _) in &change.added {
            log.add_member(*device, &mut self.writes);
        }
        for device in &change.removed {
            log.remove_member(*device, &mut self.writes);
        }
        for (device, _, _) in &change.added {
            self.memberships.entry(*device).or_default().insert(conv);
            self.store_cursor(*device, conv, seq);
            let welcome = welcome.clone().expect("checked: adds carry a Welcome");
            self.put_inbox(
                now,
                *device,
                conv,
                InboxItem::Welcome { seq, kind, welcome },
            );
            if let Some(&conn) = self.online.get(device) {
                if let Some(session) = self.sessions.get_mut(&conn) {
                    let stream = Stream {
                        acked: seq,
                        sent_upto: seq,
                        last_progress: now,
                    };
                    session.streams.insert(conv, stream);
                }
            }
        }
        for device in &change.removed {
            if let Some(convs) = self.memberships.get_mut(device) {
                convs.remove(&conv);
            }
            self.cursors.remove(&(*device, conv));
            self.writes
                .delete(CURSORS_TABLE, pair_key(device.0, conv.0));
            if let Some(&conn) = self.online.get(device) {
                if let Some(session) = self.sessions.get_mut(&conn) {
                    session.streams.remove(&conv);
                }
            }
            self.put_inbox(now, *device, conv, InboxItem::Removed { seq });
        }
        // Proposals are bound to their epoch: what this commit did not remove is proposed
        // again in the new one, one device per epoch (a commit holds at most one removal: see
        // `groups`).
        let next = self.groups[&conv].removals().first().copied();
        if let Some(device) = next {
            self.issue_removal(now, conv, device);
        }
    }

    /// Puts an item in a device's inbox (replacing an older one for the conversation) and sends
    /// it at once if the device is online.
    fn put_inbox(&mut self, now: Instant, device: DeviceId, conv: ConversationId, item: InboxItem) {
        self.writes
            .put(INBOX_TABLE, pair_key(device.0, conv.0), item.encode());
        self.inbox.insert((device, conv), item.clone());
        self.inbox_sent.remove(&(device, conv));
        if let Some(&conn) = self.online.get(&device) {
            self.inbox_sent.insert((device, conv), now);
            self.send_inbox_item(conn, conv, &item);
        }
    }

    /// Sends again every inbox item of an online device that has waited `redeliver_after` for
    /// its acknowledgement (frames can be lost).
    fn resend_inbox(&mut self, now: Instant) {
        let due: Vec<(ConnectionId, DeviceId, ConversationId)> = self
            .inbox
            .keys()
            .filter_map(|&(device, conv)| {
                let conn = *self.online.get(&device)?;
                let sent = self.inbox_sent.get(&(device, conv)).copied();
                let due =
                    sent.is_none_or(|t| now.saturating_since(t) >= self.config.redeliver_after);
                due.then_some((conn, device, conv))
            })
            .collect();
        for (conn, device, conv) in due {
            let item = self.inbox[&(device, conv)].clone();
            self.inbox_sent.insert((device, conv), now);
            self.send_inbox_item(conn, conv, &item);
        }
    }

    fn send_inbox_item(&mut self, conn: ConnectionId, conv: ConversationId, item: &InboxItem) {
        let routing = Routing {
            conversation: conv,
            seq: item.seq(),
            ..Routing::default()
        };
        let payload = item.payload(self.groups.get(&conv));
        self.send(conn, routing, payload);
    }

    /// The device acknowledged `seq` in `conv`: an inbox item up to it is done. Returns true if
    /// the item was a removal notice (the device has no stream left there).
    fn settle_inbox(&mut self, device: DeviceId, conv: ConversationId, seq: u64) -> bool {
        match self.inbox.get(&(device, conv)) {
            Some(item) if item.seq() <= seq => {
                let removed = matches!(item, InboxItem::Removed { .. });
                self.inbox.remove(&(device, conv));
                self.inbox_sent.remove(&(device, conv));
                self.writes.delete(INBOX_TABLE, pair_key(device.0, conv.0));
                removed
            }
            _ => false,
        }
    }

    /// The gateway's external-sender signing key, made from the entropy on first use.
    fn external_signer(&mut self) -> &openmls_basic_credential::SignatureKeyPair {
        if self.mls_signer.is_none() {
            let mut seed = zeroize::Zeroizing::new([0u8; 32]);
            self.entropy.fill_bytes(seed.as_mut_slice());
            self.writes
                .put(GATEWAY_KEYS_TABLE, MLS_SIGNER_KEY.to_vec(), seed.to_vec());
            self.mls_signer = Some(signer_from_seed(*seed));
        }
        self.mls_signer.as_ref().expect("made above")
    }

    /// Proposes, as the group's external sender, to remove `device` from `conv`: a signed MLS
    /// Remove proposal for the device's leaf, sequenced into the conversation for the members.
    /// It is proposed again in each new epoch until a commit removes the device.
    fn propose_removal(&mut self, now: Instant, conv: ConversationId, device: DeviceId) {
        let Some(group) = self.groups.get_mut(&conv) else {
            return;
        };
        if group.devices().len() == 1 && group.devices().contains_key(&device) {
            // The last member leaves: nobody is left to commit, so it goes at once and the
            // conversation is over.
            let mut state = group.clone();
            let change = Change {
                removed: vec![device],
                ..Change::default()
            };
            state.apply(&change);
            let head = self.conversation_head(conv).unwrap_or(0);
            let effect = GroupEffect {
                state,
                change,
                welcome: None,
            };
            self.apply_group_effect(now, conv, head, effect);
            return;
        }
        let already = group.removals().contains(&device);
        let queued_behind = group.removals().first().copied();
        if !group.propose_removal(device) {
            return;
        }
        if already {
            return; // proposed in this epoch; a repeated request changes nothing
        }
        let mut batch = std::mem::take(&mut self.writes);
        group.persist(conv, &mut batch);
        self.writes = batch;
        // One removal per commit, so one proposal per epoch: a removal requested while another
        // is pending is proposed once that one is committed.
        if queued_behind.is_none() {
            self.issue_removal(now, conv, device);
        }
    }

    /// Sequences the Remove proposal for `device` in the group's current epoch.
    fn issue_removal(&mut self, now: Instant, conv: ConversationId, device: DeviceId) {
        let (Some(leaf), epoch) = (
            self.groups[&conv].leaf_of(device),
            self.groups[&conv].epoch(),
        ) else {
            return;
        };
        self.external_signer();
        let signer = self.mls_signer.as_ref().expect("made above");
        let proposal = openmls::prelude::ExternalProposal::new_remove::<mls::MlsProvider>(
            openmls::prelude::LeafNodeIndex::new(leaf),
            openmls::prelude::GroupId::from_slice(&conv.to_bytes()),
            openmls::prelude::GroupEpoch::from(epoch),
            signer,
            openmls::prelude::SenderExtensionIndex::new(0),
        );
        let Some(bytes) = proposal.ok().and_then(|m| m.to_bytes().ok()) else {
            return; // signing with our own key cannot fail in practice; nothing to send if it does
        };
        let mut id = [0u8; 16];
        self.entropy.fill_bytes(&mut id);
        let log = self
            .conversations
            .get_mut(&conv)
            .expect("a group has a log");
        let seq = log.append_by_authority(now, MsgId::from_bytes(id), Bytes::from(bytes));
        log.persist_append(seq, &mut self.writes);
        self.stats.removals_proposed += 1;
        let members: Vec<DeviceId> = log.members().iter().copied().collect();
        for member in members {
            if let Some(&member_conn) = self.online.get(&member) {
                self.pump(now, member_conn, conv);
            }
        }
    }

    /// Kind, epoch, roles and devices of an MLS conversation.
    pub fn group(&self, conversation: ConversationId) -> Option<&GroupState> {
        self.groups.get(&conversation)
    }

    fn acknowledge(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        device: DeviceId,
        conv: ConversationId,
        seq: u64,
    ) {
        if self.settle_inbox(device, conv, seq) {
            return;
        }
        let head = self.conversation_head(conv).unwrap_or(0);
        let Some(stream) = self
            .sessions
            .get_mut(&conn)
            .and_then(|s| s.streams.get_mut(&conv))
        else {
            self.error(
                conn,
                ErrorCode::NotMember,
                "ack for a conversation you are not in",
                None,
            );
            return;
        };
        let seq = seq.min(head);
        if seq > stream.acked {
            stream.acked = seq;
            stream.last_progress = now;
            stream.sent_upto = stream.sent_upto.max(seq);
            self.store_cursor(device, conv, seq);
        }
        self.pump(now, conn, conv);
    }

    /// Restarts delivery from `from_seq` (a replay request) or from the cursor (a stall).
    fn rewind(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        conv: ConversationId,
        from_seq: Option<u64>,
    ) {
        let Some(stream) = self
            .sessions
            .get_mut(&conn)
            .and_then(|s| s.streams.get_mut(&conv))
        else {
            return;
        };
        let restart = match from_seq {
            Some(from) => from.saturating_sub(1).max(stream.acked),
            None => stream.acked,
        };
        if restart < stream.sent_upto {
            stream.sent_upto = restart;
            self.stats.rewinds += 1;
        }
        stream.last_progress = now;
        self.pump(now, conn, conv);
    }

    /// Sends as much of the conversation as the window allows.
    fn pump(&mut self, now: Instant, conn: ConnectionId, conv: ConversationId) {
        let window = self.config.delivery_window;
        let Some(log) = self.conversations.get(&conv) else {
            return;
        };
        let device = self.sessions.get(&conn).and_then(Session::device);
        if let Some(device) = device {
            if let Some(InboxItem::Welcome { .. }) = self.inbox.get(&(device, conv)) {
                // The device reads the group only once it has joined from its Welcome.
                return;
            }
        }
        let Some(stream) = self
            .sessions
            .get_mut(&conn)
            .and_then(|s| s.streams.get_mut(&conv))
        else {
            return;
        };
        if stream.acked == stream.sent_upto {
            stream.last_progress = now;
        }
        if stream.sent_upto + 1 < log.first_seq() {
            // What this device still needs is gone (retention): say so, and go on from what
            // is left. The node moves its cursor and reports the gap to its user.
            let first = log.first_seq();
            stream.sent_upto = first - 1;
            stream.acked = stream.acked.max(first - 1);
            self.stats.replay_window_exceeded += 1;
            let report = ErrorReport {
                code: ErrorCode::ReplayWindowExceeded as u16,
                message: format!("messages before seq {first} are no longer retained"),
                msg_id: None,
            };
            let routing = Routing {
                conversation: conv,
                seq: first,
                ..Routing::default()
            };
            let frame = Frame::new(routing, Payload::Error(report)).encode();
            self.outputs.push(GatewayOutput::Send(conn, frame));
        }
        while stream.sent_upto < log.head() && stream.sent_upto - stream.acked < window {
            stream.sent_upto += 1;
            let entry = log.get(stream.sent_upto).expect("seq within head");
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
            self.outputs.push(GatewayOutput::Send(
                conn,
                Frame::new(routing, payload).encode(),
            ));
            self.stats.deliveries += 1;
        }
    }

    fn store_cursor(&mut self, device: DeviceId, conv: ConversationId, seq: u64) {
        self.cursors.insert((device, conv), seq);
        let mut key = Vec::with_capacity(32);
        key.extend_from_slice(&device.to_bytes());
        key.extend_from_slice(&conv.to_bytes());
        self.writes
            .put(CURSORS_TABLE, key, seq.to_be_bytes().to_vec());
    }

    fn send(&mut self, conn: ConnectionId, routing: Routing, payload: Payload) {
        self.outputs.push(GatewayOutput::Send(
            conn,
            Frame::new(routing, payload).encode(),
        ));
    }

    fn error(&mut self, conn: ConnectionId, code: ErrorCode, message: &str, msg_id: Option<MsgId>) {
        self.error_in(conn, Routing::default(), code, message, msg_id);
    }

    /// An error frame with routing (conversation, and for `stale_epoch` the group's epoch).
    fn error_in(
        &mut self,
        conn: ConnectionId,
        routing: Routing,
        code: ErrorCode,
        message: &str,
        msg_id: Option<MsgId>,
    ) {
        let message = truncate_utf8(message, crate::wire::payload::MESSAGE_BYTES_MAX);
        let report = ErrorReport {
            code: code as u16,
            message: message.to_string(),
            msg_id: msg_id.map(MsgId::to_bytes),
        };
        self.send(conn, routing, Payload::Error(report));
    }

    fn goodbye(&mut self, conn: ConnectionId, code: ErrorCode, message: &str) {
        let message = truncate_utf8(message, crate::wire::payload::MESSAGE_BYTES_MAX).to_string();
        self.send(
            conn,
            Routing::default(),
            Payload::Goodbye(Goodbye {
                code: code as u16,
                message,
            }),
        );
        self.outputs.push(GatewayOutput::Close(conn));
        self.forget_session(conn);
    }

    /// The registration authority, created with a fresh root at first use.
    fn authority(&mut self, now: Instant) -> &mut RegistrationAuthority {
        self.authority.get_or_insert_with(|| {
            RegistrationAuthority::create(
                &self.config.domain,
                now,
                self.entropy.as_mut(),
                &mut self.writes,
            )
        })
    }

    /// Admin: a one-time token that lets one new device of `user` register. Its text form
    /// (`EnrolmentToken::to_text`) is what the operator hands over.
    pub fn issue_enrolment_token(&mut self, now: Instant, user: UserId) -> EnrolmentToken {
        self.authority(now);
        let authority = self.authority.as_mut().expect("created above");
        authority.issue_token(now, user, self.entropy.as_mut(), &mut self.writes)
    }

    /// The registration authority's trust root (created if this gateway has none yet).
    pub fn trust_root(&mut self, now: Instant) -> TrustRoot {
        self.authority(now).root().clone()
    }

    /// The registration authority, if it exists yet (admin listings).
    pub fn registration_authority(&self) -> Option<&RegistrationAuthority> {
        self.authority.as_ref()
    }

    /// A device asks for a certificate (before any session).
    fn handle_register(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        sender: DeviceId,
        register: Register,
    ) {
        let key = DevicePublicKey(register.device_key);
        if key.device_id() != sender {
            self.stats.registrations_refused += 1;
            self.goodbye(
                conn,
                ErrorCode::AuthenticationFailed,
                "the sender device id does not match the device key",
            );
            return;
        }
        let open = self.config.open_enrolment;
        if !open && register.token == [0; 16] {
            self.stats.registrations_refused += 1;
            self.goodbye(
                conn,
                ErrorCode::EnrolmentTokenInvalid,
                "this gateway needs an enrolment token to register a device: its operator issues one with `sund-gateway admin enrol-token USER`, given to `sund init --user USER --token TOKEN`",
            );
            return;
        }
        let user = UserId::from_bytes(register.user);
        self.authority(now);
        let authority = self.authority.as_mut().expect("created above");
        let result = authority.register(
            now,
            key,
            user,
            register.token,
            &register.proof,
            open,
            &mut self.writes,
        );
        match result {
            Ok(cert) => {
                self.stats.registrations += 1;
                let authority = self.authority(now);
                let root_key = authority.root().key.0;
                let voucher = authority.voucher_certificate(&register.token).cloned();
                let answer = CertificatePayload {
                    certificate: cert.encode().into(),
                    root_key,
                    voucher: voucher.as_ref().map(|v| v.encode().into()),
                };
                self.send(conn, Routing::default(), Payload::Certificate(answer));
                if let Some(voucher) = voucher {
                    self.stats.pairings += 1;
                    if let Some(voucher_conn) = self.online.get(&voucher.device()).copied() {
                        let linked = DeviceLinked {
                            certificate: cert.encode().into(),
                        };
                        self.send(
                            voucher_conn,
                            Routing::default(),
                            Payload::DeviceLinked(linked),
                        );
                    }
                }
            }
            Err(e) => {
                self.stats.registrations_refused += 1;
                self.goodbye(conn, registration_error_code(&e), &e.to_string());
            }
        }
    }

    /// A device vouches for a pairing code: checked against its certified key, then kept by the
    /// authority until the new device registers with it or it expires.
    fn accept_vouch(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        device: DeviceId,
        vouch: PairVouch,
    ) {
        let authority = self.authority(now);
        let Some(voucher) = authority.certificate_of(device).cloned() else {
            self.error(
                conn,
                ErrorCode::PairingRefused,
                "this device has no certificate from this gateway",
                None,
            );
            return;
        };
        // The refusal names the vouch by its signature's first half (not by its secret).
        let vouch_id = MsgId::from_bytes(vouch.signature[..16].try_into().expect("16 of 64"));
        let message = vouch_message(voucher.user, &vouch.secret, vouch.expires);
        if !voucher.device_key.verify(&message, &vouch.signature) {
            self.stats.pairings_refused += 1;
            self.error(
                conn,
                ErrorCode::PairingRefused,
                "the vouch's signature does not verify against this device's key",
                Some(vouch_id),
            );
            return;
        }
        let expires = Instant(vouch.expires.saturating_mul(1_000_000));
        let authority = self.authority.as_mut().expect("created above");
        match authority.accept_vouch(now, device, vouch.secret, expires, &mut self.writes) {
            Ok(_) => {
                let answer = PairVouched {
                    secret: vouch.secret,
                };
                self.send(conn, Routing::default(), Payload::PairVouched(answer));
            }
            Err(e) => {
                self.stats.pairings_refused += 1;
                self.error(
                    conn,
                    ErrorCode::PairingRefused,
                    &e.to_string(),
                    Some(vouch_id),
                );
            }
        }
    }

    /// A device renews its certificate over its session (see `trust::RENEWAL_WINDOW`).
    fn renew(&mut self, now: Instant, conn: ConnectionId, device: DeviceId) {
        self.authority(now);
        let authority = self.authority.as_mut().expect("created above");
        let before = authority.certificate_of(device).map(|c| c.serial);
        match authority.renew(now, device, &mut self.writes) {
            Ok(cert) => {
                if Some(cert.serial) != before {
                    self.stats.renewals += 1;
                }
                let answer = CertificatePayload {
                    certificate: cert.encode().into(),
                    root_key: self.authority(now).root().key.0,
                    voucher: None,
                };
                self.send(conn, Routing::default(), Payload::Certificate(answer));
            }
            Err(e) => {
                self.error(conn, registration_error_code(&e), &e.to_string(), None);
            }
        }
    }

    fn send_crl(&mut self, now: Instant, conn: ConnectionId) {
        let crl = self.authority(now).crl().encode();
        self.stats.crls_sent += 1;
        self.send(
            conn,
            Routing::default(),
            Payload::Crl(CrlPayload { crl: crl.into() }),
        );
    }

    /// Revokes `device`: new CRL to every session, the device's sessions and resume token end,
    /// and a removal proposal in each of its groups.
    fn revoke(&mut self, now: Instant, device: DeviceId) {
        let before = self.authority(now).crl().version;
        let authority = self.authority.as_mut().expect("created above");
        let result = authority
            .revoke(now, device, &mut self.writes)
            .map(|crl| crl.version);
        match result {
            Ok(version) if version > before => {}
            Ok(_) => return,  // already revoked
            Err(_) => return, // never registered here: nothing to revoke
        }
        self.stats.revocations += 1;
        if let Some(token) = self.device_tokens.get(&device).copied() {
            self.remove_token(token);
        }
        // Nobody may add it to a group again.
        self.directory.forget(device, &mut self.writes);
        let open: Vec<(ConnectionId, Option<DeviceId>)> = self
            .sessions
            .iter()
            .map(|(&conn, session)| (conn, session.device()))
            .collect();
        for (conn, holder) in open {
            if holder == Some(device) {
                self.goodbye(conn, ErrorCode::DeviceRevoked, "this device was revoked");
            } else if holder.is_some() {
                self.send_crl(now, conn);
            }
        }
        let groups: Vec<ConversationId> = self
            .groups
            .iter()
            .filter(|(_, g)| g.devices().contains_key(&device))
            .map(|(&conv, _)| conv)
            .collect();
        for conv in groups {
            self.propose_removal(now, conv, device);
        }
    }

    fn forget_session(&mut self, conn: ConnectionId) {
        let Some(session) = self.sessions.remove(&conn) else {
            return;
        };
        if let Some(device) = session.device() {
            if self.online.get(&device) == Some(&conn) {
                self.online.remove(&device);
            }
        }
    }
}

/// The longest prefix of `text` that fits in `max` bytes and ends on a character boundary.
fn truncate_utf8(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The error code of a refused certificate.
fn certificate_error_code(error: &CertificateError) -> ErrorCode {
    match error {
        CertificateError::Malformed(_)
        | CertificateError::BadSignature
        | CertificateError::KeyMismatch => ErrorCode::CertificateInvalid,
        CertificateError::ForeignDomain { .. } => ErrorCode::ForeignDomain,
        CertificateError::Expired { .. } => ErrorCode::CertificateExpired,
        CertificateError::NotYetValid { .. } => ErrorCode::CertificateNotYetValid,
        CertificateError::Revoked(_) => ErrorCode::DeviceRevoked,
    }
}

/// The error code of a refused registration.
fn registration_error_code(error: &RegistrationError) -> ErrorCode {
    match error {
        RegistrationError::TokenUnknown | RegistrationError::TokenForAnotherUser { .. } => {
            ErrorCode::EnrolmentTokenInvalid
        }
        RegistrationError::TokenUsed => ErrorCode::EnrolmentTokenUsed,
        RegistrationError::TokenExpired => ErrorCode::EnrolmentTokenExpired,
        RegistrationError::BadProof => ErrorCode::AuthenticationFailed,
        RegistrationError::Revoked(_) => ErrorCode::DeviceRevoked,
        RegistrationError::BoundToAnotherUser { .. } => ErrorCode::UserMismatch,
        RegistrationError::CrlFull | RegistrationError::UnknownDevice(_) => ErrorCode::Forbidden,
        RegistrationError::VoucherRevoked(_)
        | RegistrationError::SecretTaken
        | RegistrationError::TooManyVouches => ErrorCode::PairingRefused,
    }
}

/// An Ed25519 MLS signing key from its 32-byte seed.
fn signer_from_seed(seed: [u8; 32]) -> openmls_basic_credential::SignatureKeyPair {
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    openmls_basic_credential::SignatureKeyPair::from_raw(
        openmls_traits::types::SignatureScheme::ED25519,
        key.to_bytes().to_vec(),
        key.verifying_key().to_bytes().to_vec(),
    )
}
