//! The node (device) state machine: connection life cycle, durable outbox, cursors, gap repair.
//!
//! Shape (quinn-proto / str0m style):
//! - getters take `&self` (`status`, `cursor`, `outbox_len`, ...);
//! - [`Node::handle`] takes inputs from the transport (connected, failed, frame, closed);
//! - mutators are user commands: [`Node::send`], [`Node::go_offline`], [`Node::go_online`];
//! - [`Node::handle_timeout`] runs due timers (reconnect, heartbeat, resend);
//! - [`Node::poll_ready`] hands out writes and outputs; [`Node::poll_timeout`] says when to wake.
//!
//! Drain rule: after every input, command or timeout, drain `poll_ready` and commit each `Ready`
//! before releasing its held outputs; then re-read `poll_timeout`. Message transmissions are
//! eager (see [`Ready`]): they may leave before the commit that writes their outbox entry.
//!
//! Guarantees: a message stays in the durable outbox until the gateway acknowledges it, and is
//! resent after every reconnect and after `resend_after` without an answer (at-least-once on the
//! wire). Delivery to the application is exactly once and in seq order: the per-conversation
//! cursor is committed in the same batch that releases the `Delivered` event, and anything at or
//! below the cursor is dropped as a duplicate. A seq jump is buffered (bounded) and answered with
//! a `ReplayRequest`.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::time::Duration;

use bytes::Bytes;

use crate::env::{Entropy, Ready, StoreError, StoreRead, Table, WriteBatch};
use crate::identity::{session_proof_message, DeviceKey, DevicePublicKey};
use crate::ids::{ConnectionId, ConversationId, DeviceId, MsgId, UserId};
use crate::mls::device::{DeviceMls, DeviceMlsConfig};
use crate::mls::group_ops::{GroupKind, Role};
use crate::mls::groups::{DeviceGroups, GroupAction, GroupError, Intent, Processed};
use crate::time::Instant;
use crate::trust::handshake::PeerIdentity;
use crate::trust::pairing::{confirm_voucher, vouch_message, PAIRING_TTL};
use crate::trust::RENEWAL_WINDOW;
use crate::trust::{
    register_message, DeviceCertificate, EnrolmentToken, PendingVouch, TrustHolder, TrustRoot,
};
use crate::wire::payload::Certificate as CertificatePayload;
use crate::wire::payload::{
    Ack, CrlFetch, Cursor, ErrorCode, FetchedKeyPackage, Goodbye, Heartbeat, Hello,
    KeyPackageCount, KeyPackageFetch, KeyPackageUpload, Leave, PairVouch, Proof, Register,
    RenewCertificate, ReplayRequest, Send, CURSORS_LEN_MAX,
};
use crate::wire::{Frame, Payload, Routing, PAYLOAD_BYTES_MAX};

/// Table of unacknowledged messages: key `msg_id(16)`, value `conversation(16) ++ body`.
pub const OUTBOX_TABLE: Table = Table("outbox");
/// Table of delivery cursors: key `conversation(16)`, value seq (8, big-endian).
pub const NODE_CURSORS_TABLE: Table = Table("node_cursors");
/// Table of session state: key `b"resume_token"`, value the token (32).
pub const NODE_SESSION_TABLE: Table = Table("node_session");
/// Table of the Welcomes that travel with outbox commits: key msg id, value Welcome bytes.
pub const OUTBOX_WELCOME_TABLE: Table = Table("outbox_welcome");
const RESUME_TOKEN_KEY: &[u8] = b"resume_token";
/// Key of the gateway's external-sender key in the session table.
const GATEWAY_KEY: &[u8] = b"gateway_mls_key";

/// Tunables of a node. Every queue and timer has a named bound here.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This device's key; the device id is derived from it.
    pub key: DeviceKey,
    /// This device (the id of `key`).
    pub device: DeviceId,
    /// Heartbeat period while connected (the gateway's `HelloOk` overrides it).
    pub heartbeat_interval: Duration,
    /// Silence from the gateway for this long means the connection is dead.
    pub idle_timeout: Duration,
    /// A handshake (hello to session) that has not completed in this long starts over with a
    /// new connection (a lost handshake frame is not retransmitted).
    pub handshake_timeout: Duration,
    /// First reconnect delay cap; doubles per failed attempt.
    pub backoff_initial: Duration,
    /// Largest reconnect delay cap.
    pub backoff_max: Duration,
    /// An unacknowledged message is resent after this long on the same connection.
    pub resend_after: Duration,
    /// At most one replay request per conversation per this interval.
    pub replay_request_interval: Duration,
    /// Most out-of-order deliveries buffered per conversation.
    pub reorder_buffer_max: usize,
    /// Most messages waiting in the outbox; `send` refuses beyond it.
    pub outbox_len_max: usize,
    /// Largest message body.
    pub body_bytes_max: usize,
    /// The user this device belongs to, named in every hello (`None`: not bound to a user).
    pub user: Option<UserId>,
    /// MLS on this device (`None`: bodies stay plaintext and no KeyPackages are kept).
    pub mls: Option<DeviceMlsConfig>,
    /// The one-time enrolment token this device registers with when it has no certificate
    /// (`None`: register without one, which only a gateway with open enrolment accepts).
    pub enrolment: Option<EnrolmentToken>,
    /// For a device set up from a pairing code: the fingerprint (first 16 bytes of the key) of
    /// the device that showed it. Trusted on first use; the device takes its certificate only
    /// if the gateway names that device as the voucher (see `trust::pairing`).
    pub pairing_voucher: Option<[u8; 16]>,
}

impl NodeConfig {
    /// Defaults for a device.
    pub fn new(key: DeviceKey) -> NodeConfig {
        NodeConfig {
            device: key.device_id(),
            key,
            heartbeat_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(15),
            handshake_timeout: Duration::from_secs(15),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            resend_after: Duration::from_secs(3),
            replay_request_interval: Duration::from_millis(500),
            reorder_buffer_max: 256,
            outbox_len_max: 10_000,
            body_bytes_max: PAYLOAD_BYTES_MAX as usize - 1024,
            user: None,
            mls: None,
            enrolment: None,
            pairing_voucher: None,
        }
    }

    /// The user named in this device's certificate: the configured one, or for a device
    /// configured without a user (plain conversations only), a user of its own with the
    /// device's id.
    pub fn certificate_user(&self) -> UserId {
        self.user.unwrap_or(UserId(self.device.0))
    }
}

/// How often a device whose certificate is due for renewal asks again within one session.
const RENEWAL_RETRY_INTERVAL: Duration = Duration::from_secs(3600);

/// A pairing code's secret and expiry, as [`Node::offer_pairing`] made them; the application
/// adds the gateway's address and the user's name to show a `trust::pairing::PairingCode`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PairingOffer {
    /// The one-time secret.
    pub secret: [u8; 16],
    /// Unix seconds after which the gateway refuses it.
    pub expires: u64,
}

impl core::fmt::Debug for PairingOffer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "PairingOffer(expires {})", self.expires)
    }
}

/// Inputs from the transport to [`Node::handle`].
#[derive(Clone, Debug)]
pub enum NodeInput {
    /// The connection asked for by `Connect` is up.
    Connected(ConnectionId),
    /// The connection asked for by `Connect` failed.
    ConnectFailed,
    /// A frame arrived.
    Frame(ConnectionId, Bytes),
    /// The connection is gone.
    Closed(ConnectionId),
}

/// Connection status as the user sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionStatus {
    /// A session with the gateway is open.
    Connected,
    /// Trying to (re)connect; `attempt` counts failures since the last session.
    Reconnecting {
        /// Failed attempts so far.
        attempt: u32,
    },
    /// Not connected and not trying (the user went offline).
    Offline,
}

/// What the application hears.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeEvent {
    /// A message, exactly once and in seq order per conversation.
    Delivered {
        /// Conversation.
        conversation: ConversationId,
        /// Its seq.
        seq: u64,
        /// Originating device.
        sender: DeviceId,
        /// The sender's id for it.
        msg_id: MsgId,
        /// Content.
        body: Bytes,
    },
    /// The gateway durably sequenced one of our messages.
    Accepted {
        /// Conversation.
        conversation: ConversationId,
        /// Our id for it.
        msg_id: MsgId,
        /// The seq it got.
        seq: u64,
    },
    /// The gateway refused one of our messages; it left the outbox.
    Rejected {
        /// Our id for it.
        msg_id: MsgId,
        /// Why.
        code: ErrorCode,
    },
    /// Messages `from..=to` of a conversation are gone for good: the gateway no longer retains
    /// them (this device was away longer than the retention limit). Delivery goes on after them.
    Gap {
        /// Conversation.
        conversation: ConversationId,
        /// First lost seq.
        from: u64,
        /// Last lost seq.
        to: u64,
    },
    /// The gateway refused this device (registration, certificate or proof); the node keeps
    /// retrying with backoff, registering again if its certificate was the problem.
    Refused {
        /// Why.
        code: ErrorCode,
        /// The gateway's explanation.
        message: String,
    },
    /// The connection status changed.
    Status(ConnectionStatus),
    /// The gateway issued this device a certificate.
    Registered {
        /// Its serial.
        serial: u64,
    },
    /// A newer CRL arrived and is kept.
    CrlUpdated {
        /// Its version.
        version: u64,
    },
    /// A CRL was refused (forged, foreign, or older than the one held).
    CrlRefused {
        /// Why.
        reason: String,
    },
    /// This device is revoked: it disconnected and will not connect again.
    Revoked,
    /// This device registered with a pairing code, and the gateway confirmed that the device
    /// which showed the code vouched for it.
    Paired {
        /// The vouching device.
        voucher: DeviceId,
    },
    /// The gateway holds this device's vouch for its pairing code: the code works now.
    PairingReady {
        /// Unix seconds after which the code is refused.
        expires: u64,
    },
    /// The gateway refused this device's vouch for its pairing code (or it expired unsent).
    PairingRefused {
        /// Why.
        reason: String,
    },
    /// A new device of this user registered with this device's pairing code.
    DeviceLinked {
        /// The new device.
        device: DeviceId,
    },
    /// A commit at `seq` moved a group to `epoch` (ours once it came back sequenced, or
    /// another member's once processed).
    GroupChanged {
        /// Conversation.
        conversation: ConversationId,
        /// The commit's seq.
        seq: u64,
        /// The committing device.
        sender: DeviceId,
        /// The commit's message id.
        msg_id: MsgId,
        /// The group's new epoch.
        epoch: u64,
        /// Devices it added.
        added: Vec<DeviceId>,
        /// Devices it removed.
        removed: Vec<DeviceId>,
    },
    /// This device joined a group from a Welcome; the conversation is read from `seq + 1`.
    Joined {
        /// Conversation.
        conversation: ConversationId,
        /// The seq of the commit that added this device.
        seq: u64,
        /// DM or room.
        kind: GroupKind,
    },
    /// A commit at `seq` removed this device from a group.
    RemovedFrom {
        /// Conversation.
        conversation: ConversationId,
        /// The removing commit's seq.
        seq: u64,
    },
    /// The message at `seq` of a group could not be decrypted or applied; delivery goes on.
    Undecryptable {
        /// Conversation.
        conversation: ConversationId,
        /// Its seq.
        seq: u64,
        /// Originating device.
        sender: DeviceId,
        /// What went wrong (no plaintext, no key material).
        reason: String,
    },
    /// The gateway proposed (as the group's external sender) to remove `device`; a member
    /// commits it next.
    RemovalProposed {
        /// Conversation.
        conversation: ConversationId,
        /// The proposal's seq.
        seq: u64,
        /// Its message id.
        msg_id: MsgId,
        /// The device to be removed.
        device: DeviceId,
    },
    /// A group message this device was configured not to decrypt (simulation sampling in
    /// large rooms; see `DeviceMlsConfig::decrypt_sample`).
    Skipped {
        /// Conversation.
        conversation: ConversationId,
        /// Its seq.
        seq: u64,
        /// Originating device.
        sender: DeviceId,
        /// The sender's id for it.
        msg_id: MsgId,
    },
    /// The gateway refused a group change of ours (role, or an invalid commit); it is dropped.
    GroupChangeRefused {
        /// Conversation.
        conversation: ConversationId,
        /// Why.
        code: ErrorCode,
        /// The gateway's explanation.
        message: String,
    },
}

/// Outputs released by a committed [`Ready`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeOutput {
    /// Open a connection to the home gateway; answer with `Connected` or `ConnectFailed`.
    Connect,
    /// Send an encoded frame.
    Send(ConnectionId, Bytes),
    /// Close a connection.
    Close(ConnectionId),
    /// Tell the application.
    Event(NodeEvent),
}

/// Why `send` refused a message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The outbox is full: wait for acknowledgements (or reconnect) and try again.
    #[error("outbox full ({max} messages waiting); wait until the gateway acknowledges some")]
    OutboxFull {
        /// The limit.
        max: usize,
    },
    /// The body is larger than allowed.
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    BodyTooLarge {
        /// Body length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The conversation is a group this device cannot encrypt for now.
    #[error("{0}")]
    Group(GroupError),
}

/// Counters for logs, metrics and the simulator's checks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Connections that reached `HelloOk`.
    pub sessions: u64,
    /// Deliveries dropped as duplicates (at or below the cursor).
    pub duplicate_deliveries: u64,
    /// Replay requests sent.
    pub replay_requests: u64,
    /// Outbox messages resent.
    pub resends: u64,
    /// KeyPackages uploaded to the gateway.
    pub key_packages_uploaded: u64,
    /// KeyPackage uploads the gateway refused, or that could not be made.
    pub key_package_failures: u64,
}

#[derive(Clone, Debug)]
enum Link {
    /// Not connected; reconnect at `retry_at`, or never if `None` (user went offline).
    Offline { retry_at: Option<Instant> },
    /// `Connect` was emitted; waiting for the transport.
    Connecting,
    /// Connected, `Hello` sent, waiting for `HelloOk` until `deadline`.
    Handshaking {
        conn: ConnectionId,
        deadline: Instant,
    },
    /// Session open.
    Open {
        conn: ConnectionId,
        last_heard: Instant,
        next_heartbeat: Instant,
    },
}

#[derive(Clone, Debug)]
struct Outgoing {
    conversation: ConversationId,
    body: Bytes,
    /// The Welcome that travels with a commit adding devices.
    welcome: Option<Bytes>,
    last_sent: Option<Instant>,
}

#[derive(Clone, Debug)]
struct Inbound {
    sender: DeviceId,
    msg_id: MsgId,
    body: Bytes,
}

/// One device as a deterministic state machine. See the module docs.
pub struct Node {
    config: NodeConfig,
    entropy: Box<dyn Entropy + core::marker::Send>,
    /// When this session last asked to renew the certificate (in memory).
    renewal_asked: Option<Instant>,
    link: Link,
    attempts: u32,
    heartbeat_interval: Duration,
    outbox: BTreeMap<MsgId, Outgoing>,
    cursors: BTreeMap<ConversationId, u64>,
    reorder: BTreeMap<ConversationId, BTreeMap<u64, Inbound>>,
    replay_asked: BTreeMap<ConversationId, Instant>,
    next_heartbeat_nonce: u64,
    resume_token: Option<[u8; 32]>,
    /// Certificate, pinned trust root and CRL.
    trust: TrustHolder,
    status: ConnectionStatus,
    writes: WriteBatch,
    outputs: Vec<NodeOutput>,
    /// Message transmissions, which may leave before the batch's commit (see [`Ready`]).
    eager: Vec<NodeOutput>,
    mls: Option<DeviceMls>,
    groups: Option<DeviceGroups>,
    stats: NodeStats,
}

impl core::fmt::Debug for Node {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Node")
            .field("device", &self.config.device)
            .field("link", &self.link)
            .field("outbox", &self.outbox.len())
            .field("cursors", &self.cursors)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Rebuilds a node from committed storage (empty storage for a new device) and starts
    /// connecting at once.
    pub fn recover(
        config: NodeConfig,
        entropy: Box<dyn Entropy + core::marker::Send>,
        now: Instant,
        store: &dyn StoreRead,
    ) -> Result<Node, StoreError> {
        assert!(config.outbox_len_max > 0, "outbox_len_max must be positive");
        assert!(
            config.backoff_initial <= config.backoff_max,
            "backoff_initial <= backoff_max"
        );
        let mut outbox = BTreeMap::new();
        let mut failure = None;
        store.scan_from(
            OUTBOX_TABLE,
            &[],
            &mut |key, value| match decode_outbox(key, value) {
                Ok((id, out)) => {
                    outbox.insert(id, out);
                    ControlFlow::Continue(())
                }
                Err(e) => {
                    failure = Some(e);
                    ControlFlow::Break(())
                }
            },
        )?;
        let mut cursors = BTreeMap::new();
        store.scan_from(NODE_CURSORS_TABLE, &[], &mut |key, value| match (
            <[u8; 16]>::try_from(key),
            <[u8; 8]>::try_from(value),
        ) {
            (Ok(k), Ok(v)) => {
                cursors.insert(ConversationId::from_bytes(k), u64::from_be_bytes(v));
                ControlFlow::Continue(())
            }
            _ => {
                failure = Some(corrupt(NODE_CURSORS_TABLE, "cursor key or value length"));
                ControlFlow::Break(())
            }
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        crate::env::scan_all(store, OUTBOX_WELCOME_TABLE, |key, value| {
            let id: [u8; 16] = key
                .try_into()
                .map_err(|_| corrupt(OUTBOX_WELCOME_TABLE, "key length"))?;
            if let Some(out) = outbox.get_mut(&MsgId::from_bytes(id)) {
                out.welcome = Some(Bytes::copy_from_slice(value));
            }
            Ok(())
        })?;
        let resume_token = match store.get(NODE_SESSION_TABLE, RESUME_TOKEN_KEY)? {
            Some(value) => Some(
                <[u8; 32]>::try_from(value.as_slice())
                    .map_err(|_| corrupt(NODE_SESSION_TABLE, "resume token length"))?,
            ),
            None => None,
        };
        let mut writes = WriteBatch::default();
        let mut entropy = entropy;
        let mls = match config.mls {
            Some(mls_config) => Some(DeviceMls::recover(
                mls_config,
                config.device,
                entropy.as_mut(),
                store,
                NODE_SESSION_TABLE,
                &mut writes,
            )?),
            None => None,
        };
        let groups = match &mls {
            Some(mls) => {
                let mut groups = DeviceGroups::recover(config.device, config.user, store, mls)?;
                groups.set_gateway_key(store.get(NODE_SESSION_TABLE, GATEWAY_KEY)?);
                Some(groups)
            }
            None => None,
        };
        let trust = TrustHolder::recover(store)?;
        let mut node = Node {
            resume_token,
            trust,
            heartbeat_interval: config.heartbeat_interval,
            config,
            entropy,
            renewal_asked: None,
            link: Link::Offline {
                retry_at: Some(now),
            },
            attempts: 0,
            outbox,
            cursors,
            reorder: BTreeMap::new(),
            replay_asked: BTreeMap::new(),
            next_heartbeat_nonce: 0,
            status: ConnectionStatus::Reconnecting { attempt: 0 },
            writes,
            outputs: Vec::new(),
            eager: Vec::new(),
            mls,
            groups,
            stats: NodeStats::default(),
        };
        node.bind_mls_to_trust();
        Ok(node)
    }

    // ---- getters ----

    /// This device.
    pub fn device(&self) -> DeviceId {
        self.config.device
    }

    /// Connection status.
    pub fn status(&self) -> ConnectionStatus {
        self.status
    }

    /// Highest seq delivered to the application in a conversation.
    pub fn cursor(&self, conversation: ConversationId) -> u64 {
        self.cursors.get(&conversation).copied().unwrap_or(0)
    }

    /// Messages waiting for the gateway's acknowledgement.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// Counters.
    pub fn stats(&self) -> &NodeStats {
        &self.stats
    }

    /// True while a session is open.
    pub fn is_connected(&self) -> bool {
        matches!(self.link, Link::Open { .. })
    }

    /// When `handle_timeout` must next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.link {
            Link::Offline { retry_at } => *retry_at,
            Link::Connecting => None,
            Link::Handshaking { deadline, .. } => Some(*deadline),
            Link::Open {
                last_heard,
                next_heartbeat,
                ..
            } => Some((*next_heartbeat).min(*last_heard + self.config.idle_timeout)),
        }
    }

    /// The writes and outputs produced so far, or `None`.
    pub fn poll_ready(&mut self) -> Option<Ready<NodeOutput>> {
        if self.writes.is_empty() && self.outputs.is_empty() && self.eager.is_empty() {
            return None;
        }
        Some(Ready::with_eager(
            self.writes.take(),
            std::mem::take(&mut self.outputs),
            std::mem::take(&mut self.eager),
        ))
    }

    // ---- commands ----

    /// Queues a message for a conversation; it is sent now if connected, else after reconnect.
    pub fn send(
        &mut self,
        now: Instant,
        conversation: ConversationId,
        body: Bytes,
    ) -> Result<MsgId, SendError> {
        if self.outbox.len() >= self.config.outbox_len_max {
            return Err(SendError::OutboxFull {
                max: self.config.outbox_len_max,
            });
        }
        if body.len() > self.config.body_bytes_max {
            return Err(SendError::BodyTooLarge {
                len: body.len(),
                max: self.config.body_bytes_max,
            });
        }
        let msg_id = self.new_msg_id();
        let body = match (&mut self.groups, &self.mls) {
            (Some(groups), Some(mls)) if groups.is_group(conversation) => groups
                .encrypt(conversation, msg_id, &body, mls, &mut self.writes)
                .map_err(SendError::Group)?,
            _ => body,
        };
        self.enqueue(now, conversation, msg_id, body, None);
        Ok(msg_id)
    }

    fn new_msg_id(&mut self) -> MsgId {
        let mut id = [0u8; 16];
        self.entropy.fill_bytes(&mut id);
        MsgId::from_bytes(id)
    }

    /// Puts a message in the durable outbox and sends it if connected.
    fn enqueue(
        &mut self,
        now: Instant,
        conversation: ConversationId,
        msg_id: MsgId,
        body: Bytes,
        welcome: Option<Bytes>,
    ) {
        let id = msg_id.to_bytes();
        let mut value = Vec::with_capacity(16 + body.len());
        value.extend_from_slice(&conversation.to_bytes());
        value.extend_from_slice(&body);
        self.writes.put(OUTBOX_TABLE, id.to_vec(), value);
        if let Some(welcome) = &welcome {
            self.writes
                .put(OUTBOX_WELCOME_TABLE, id.to_vec(), welcome.to_vec());
        }
        self.outbox.insert(
            msg_id,
            Outgoing {
                conversation,
                body,
                welcome,
                last_sent: None,
            },
        );
        if let Link::Open { conn, .. } = self.link {
            self.transmit(now, conn, msg_id);
        }
    }

    fn remove_from_outbox(&mut self, msg_id: MsgId) -> Option<Outgoing> {
        let out = self.outbox.remove(&msg_id)?;
        let id = msg_id.to_bytes().to_vec();
        if out.welcome.is_some() {
            self.writes.delete(OUTBOX_WELCOME_TABLE, id.clone());
        }
        self.writes.delete(OUTBOX_TABLE, id);
        Some(out)
    }

    /// Closes the session cleanly and stays offline until `go_online`.
    pub fn go_offline(&mut self, _now: Instant) {
        if let Link::Open { conn, .. } | Link::Handshaking { conn, .. } = self.link {
            let goodbye = Goodbye {
                code: ErrorCode::Unknown as u16,
                message: "going offline".into(),
            };
            self.send_frame(conn, Routing::default(), Payload::Goodbye(goodbye));
            self.outputs.push(NodeOutput::Close(conn));
        }
        self.link = Link::Offline { retry_at: None };
        self.set_status(ConnectionStatus::Offline);
    }

    /// Starts connecting again after `go_offline`.
    pub fn go_online(&mut self, now: Instant) {
        if let Link::Offline { .. } = self.link {
            self.attempts = 0;
            self.link = Link::Offline {
                retry_at: Some(now),
            };
            self.set_status(ConnectionStatus::Reconnecting { attempt: 0 });
        }
    }

    // ---- inputs ----

    /// Feeds one transport input. Then drain [`Node::poll_ready`].
    pub fn handle(&mut self, now: Instant, input: NodeInput) {
        match input {
            NodeInput::Connected(conn) => {
                if !matches!(self.link, Link::Connecting) {
                    self.outputs.push(NodeOutput::Close(conn));
                    return;
                }
                self.link = Link::Handshaking {
                    conn,
                    deadline: now + self.config.handshake_timeout,
                };
                if self.trust.certificate().is_some() {
                    self.send_hello(conn);
                } else {
                    self.register(conn);
                }
            }
            NodeInput::ConnectFailed => {
                if matches!(self.link, Link::Connecting) {
                    self.schedule_reconnect(now);
                }
            }
            NodeInput::Closed(conn) => {
                if self.current_conn() == Some(conn) {
                    self.schedule_reconnect(now);
                }
            }
            NodeInput::Frame(conn, bytes) => {
                if self.current_conn() != Some(conn) {
                    return; // a late frame from a connection we already left
                }
                match Frame::decode(&bytes, PAYLOAD_BYTES_MAX) {
                    Ok(frame) => self.handle_frame(now, conn, frame),
                    Err(_) => {
                        // A gateway that sends garbage is broken or not a gateway: start over.
                        self.outputs.push(NodeOutput::Close(conn));
                        self.schedule_reconnect(now);
                    }
                }
            }
        }
    }

    /// Runs due timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.link.clone() {
            Link::Offline { retry_at: Some(at) } if now >= at => {
                self.link = Link::Connecting;
                self.outputs.push(NodeOutput::Connect);
            }
            Link::Handshaking { conn, deadline } if now >= deadline => {
                self.outputs.push(NodeOutput::Close(conn));
                self.schedule_reconnect(now);
            }
            Link::Open {
                conn,
                last_heard,
                next_heartbeat,
            } => {
                if now >= last_heard + self.config.idle_timeout {
                    self.outputs.push(NodeOutput::Close(conn));
                    self.schedule_reconnect(now);
                    return;
                }
                if now >= next_heartbeat {
                    self.next_heartbeat_nonce += 1;
                    let beat = Heartbeat {
                        nonce: self.next_heartbeat_nonce,
                        crl_version: None,
                    };
                    self.send_frame(conn, Routing::default(), Payload::Heartbeat(beat));
                    self.link = Link::Open {
                        conn,
                        last_heard,
                        next_heartbeat: now + self.heartbeat_interval,
                    };
                    self.resend_stale(now, conn);
                    if let Some(groups) = &mut self.groups {
                        groups.expire_fetches(now, self.config.resend_after);
                    }
                    self.drive_groups(now);
                }
            }
            _ => {}
        }
    }

    // ---- internals ----

    /// Opens a session with the device's certificate.
    fn send_hello(&mut self, conn: ConnectionId) {
        let mut cursors: Vec<Cursor> = self
            .cursors
            .iter()
            .map(|(c, s)| Cursor::new(*c, *s))
            .collect();
        cursors.truncate(CURSORS_LEN_MAX);
        let routing = Routing {
            sender: self.config.device,
            ..Routing::default()
        };
        let hello = Hello {
            cursors,
            device_key: self.config.key.public().0,
            resume_token: self.resume_token,
            user: self.config.user.map(UserId::to_bytes),
            certificate: self.trust.certificate().map(|c| c.encode().into()),
        };
        self.send_frame(conn, routing, Payload::Hello(hello));
    }

    /// Asks for a certificate, with the enrolment token if the device has one.
    fn register(&mut self, conn: ConnectionId) {
        let key = self.config.key.public();
        let user = self.config.certificate_user();
        let token = self.config.enrolment.map_or([0; 16], |t| t.secret);
        let proof = self.config.key.sign(&register_message(&token, &key, user));
        let routing = Routing {
            sender: self.config.device,
            ..Routing::default()
        };
        let register = Register {
            device_key: key.0,
            user: user.to_bytes(),
            token,
            proof,
        };
        self.send_frame(conn, routing, Payload::Register(register));
    }

    /// The gateway issued our certificate: keep it and open the session. A paired device first
    /// checks that the gateway names the device whose code it took as the voucher.
    fn on_certificate(&mut self, now: Instant, conn: ConnectionId, answer: CertificatePayload) {
        let mut voucher = None;
        if let Some(fingerprint) = self.config.pairing_voucher {
            let root = DeviceCertificate::decode(&answer.certificate).map(|cert| TrustRoot {
                key: DevicePublicKey(answer.root_key),
                domain: cert.domain,
            });
            let confirmed = match root {
                Ok(root) => confirm_voucher(
                    &fingerprint,
                    self.config.certificate_user(),
                    &root,
                    answer.voucher.as_deref().map(|v| &v[..]),
                )
                .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match confirmed {
                Ok(cert) => voucher = Some(cert),
                Err(message) => {
                    self.outputs.push(NodeOutput::Event(NodeEvent::Refused {
                        code: ErrorCode::CertificateInvalid,
                        message,
                    }));
                    self.outputs.push(NodeOutput::Close(conn));
                    self.schedule_reconnect(now);
                    return;
                }
            }
        }
        if !self.take_certificate(&answer) {
            self.outputs.push(NodeOutput::Close(conn));
            self.schedule_reconnect(now);
            return;
        }
        if let Some(voucher) = voucher {
            self.trust.record_pairing(&voucher, &mut self.writes);
            self.outputs.push(NodeOutput::Event(NodeEvent::Paired {
                voucher: voucher.device(),
            }));
        }
        self.send_hello(conn);
    }

    /// Keeps a certificate the gateway issued (at registration or renewal) if it checks out
    /// against the pinned root, this key and user: then `Registered`, else `Refused`.
    fn take_certificate(&mut self, answer: &CertificatePayload) -> bool {
        let accepted = self
            .trust
            .accept_certificate(
                &answer.certificate,
                answer.root_key,
                self.config.key.public(),
                self.config.certificate_user(),
                self.config.enrolment.as_ref(),
                &mut self.writes,
            )
            .map(|cert| cert.serial);
        match accepted {
            Ok(serial) => {
                self.bind_mls_to_trust();
                self.outputs
                    .push(NodeOutput::Event(NodeEvent::Registered { serial }));
                true
            }
            Err(e) => {
                self.outputs.push(NodeOutput::Event(NodeEvent::Refused {
                    code: ErrorCode::CertificateInvalid,
                    message: e.to_string(),
                }));
                false
            }
        }
    }

    /// Makes a pairing code's secret and this device's signed vouch for it, valid for
    /// [`PAIRING_TTL`] from `now` (`now_unix_seconds` is the same instant on the wall clock the
    /// gateway checks expiry against). The vouch waits durably until the gateway has it: at once
    /// if a session is open, else at the next one. A new offer replaces an unsent one.
    pub fn offer_pairing(&mut self, now: Instant) -> PairingOffer {
        let mut secret = [0u8; 16];
        self.entropy.fill_bytes(&mut secret);
        let expires = (now + PAIRING_TTL).as_micros() / 1_000_000;
        let user = self.config.certificate_user();
        let signature = self.config.key.sign(&vouch_message(user, &secret, expires));
        let vouch = PendingVouch {
            secret,
            expires,
            signature,
        };
        self.trust.set_pending_vouch(vouch, &mut self.writes);
        self.send_pending_vouch(now);
        PairingOffer { secret, expires }
    }

    fn send_pending_vouch(&mut self, now: Instant) {
        let Some(vouch) = self.trust.pending_vouch().copied() else {
            return;
        };
        if vouch.expires <= now.as_micros() / 1_000_000 {
            self.trust
                .take_pending_vouch(&vouch.secret, &mut self.writes);
            self.outputs.push(NodeOutput::Event(NodeEvent::PairingRefused {
                reason: "the pairing code expired before this device reached the gateway; show a new one".into(),
            }));
            return;
        }
        let Link::Open { conn, .. } = self.link else {
            return;
        };
        let payload = Payload::PairVouch(PairVouch {
            secret: vouch.secret,
            expires: vouch.expires,
            signature: vouch.signature,
        });
        self.send_frame(conn, Routing::default(), payload);
    }

    /// Asks for a new certificate once this one is within `RENEWAL_WINDOW` of expiry: at each
    /// session open, and on heartbeats (at most hourly) for sessions that stay up for weeks.
    fn renew_if_due(&mut self, now: Instant, conn: ConnectionId) {
        let renew_from = self
            .trust
            .certificate()
            .map(|c| c.not_after_s.saturating_sub(RENEWAL_WINDOW.as_secs()));
        let due = renew_from.is_some_and(|from| now.as_micros() / 1_000_000 >= from);
        let asked_lately = self
            .renewal_asked
            .is_some_and(|at| now < at + RENEWAL_RETRY_INTERVAL);
        if due && !asked_lately {
            self.renewal_asked = Some(now);
            let renew = Payload::RenewCertificate(RenewCertificate {});
            self.send_frame(conn, Routing::default(), renew);
        }
    }

    /// The gateway answered a renewal: keep the certificate if it is a newer one for this key
    /// and user under the pinned root.
    fn on_renewed(&mut self, answer: CertificatePayload) {
        let held = self.trust.certificate().map(|c| c.serial);
        let fresh = DeviceCertificate::decode(&answer.certificate)
            .is_ok_and(|c| held.is_some_and(|h| c.serial > h));
        if !fresh {
            return;
        }
        self.take_certificate(&answer);
    }

    /// A CRL from the gateway (pushed on revocation, or answering our fetch).
    fn on_crl(&mut self, now: Instant, crl: &[u8]) {
        match self.trust.accept_crl(crl, &mut self.writes) {
            Ok(true) => {
                self.bind_mls_to_trust();
                let version = self.trust.crl_version();
                self.outputs
                    .push(NodeOutput::Event(NodeEvent::CrlUpdated { version }));
                if self.trust.is_revoked(self.config.device) {
                    self.revoked(now);
                }
            }
            Ok(false) => {}
            Err(e) => self.outputs.push(NodeOutput::Event(NodeEvent::CrlRefused {
                reason: e.to_string(),
            })),
        }
    }

    /// Gives the MLS layer this device's certificate (its credential binding) and the root and
    /// CRL other members' credentials are checked against.
    fn bind_mls_to_trust(&mut self) {
        let Some(mls) = &mut self.mls else {
            return;
        };
        if let Some(cert) = self.trust.certificate() {
            mls.bind_certificate(&self.config.key, cert);
        }
        if let Some(root) = self.trust.root() {
            mls.set_trust(root.clone(), self.trust.crl().cloned());
        }
    }

    /// This device is revoked: it stops connecting for good.
    fn revoked(&mut self, _now: Instant) {
        if let Some(conn) = self.current_conn() {
            self.outputs.push(NodeOutput::Close(conn));
        }
        self.forget_resume_token();
        self.link = Link::Offline { retry_at: None };
        self.set_status(ConnectionStatus::Offline);
        self.outputs.push(NodeOutput::Event(NodeEvent::Revoked));
    }

    /// This device's trust state (certificate, pinned root, CRL).
    pub fn trust(&self) -> &TrustHolder {
        &self.trust
    }

    /// What this device brings to a device-to-device handshake (`trust::handshake`): its key,
    /// certificate, pinned root and CRL. `None` until it has registered.
    pub fn peer_identity(&self) -> Option<PeerIdentity<'_>> {
        Some(PeerIdentity {
            key: &self.config.key,
            certificate: self.trust.certificate()?,
            root: self.trust.root()?,
            crl: self.trust.crl(),
        })
    }

    fn current_conn(&self) -> Option<ConnectionId> {
        match self.link {
            Link::Handshaking { conn, .. } | Link::Open { conn, .. } => Some(conn),
            Link::Offline { .. } | Link::Connecting => None,
        }
    }

    fn handle_frame(&mut self, now: Instant, conn: ConnectionId, frame: Frame) {
        if let Link::Open { last_heard, .. } = &mut self.link {
            *last_heard = now;
        }
        let routing = frame.routing;
        match frame.payload {
            Payload::Challenge(challenge) => {
                if !matches!(self.link, Link::Handshaking { .. }) {
                    return;
                }
                let message = session_proof_message(&challenge.nonce, self.config.device);
                let signature = self.config.key.sign(&message);
                self.send_frame(
                    conn,
                    Routing::default(),
                    Payload::Proof(Proof { signature }),
                );
            }
            Payload::HelloOk(ok) => {
                if !matches!(self.link, Link::Handshaking { .. }) {
                    return;
                }
                if self.resume_token != Some(ok.resume_token) {
                    self.resume_token = Some(ok.resume_token);
                    self.writes.put(
                        NODE_SESSION_TABLE,
                        RESUME_TOKEN_KEY.to_vec(),
                        ok.resume_token.to_vec(),
                    );
                }
                if ok.heartbeat_interval_ms > 0 {
                    self.heartbeat_interval =
                        Duration::from_millis(ok.heartbeat_interval_ms.into());
                }
                self.link = Link::Open {
                    conn,
                    last_heard: now,
                    next_heartbeat: now + self.heartbeat_interval,
                };
                if let (Some(groups), Some(key)) = (&mut self.groups, ok.external_sender) {
                    let key = Vec::from(key);
                    if groups.gateway_key() != Some(key.as_slice()) {
                        self.writes
                            .put(NODE_SESSION_TABLE, GATEWAY_KEY.to_vec(), key.clone());
                        groups.set_gateway_key(Some(key));
                    }
                }
                self.attempts = 0;
                self.stats.sessions += 1;
                self.set_status(ConnectionStatus::Connected);
                // Catch up on revocations made while this device was away.
                let fetch = CrlFetch {
                    have_version: self.trust.crl_version(),
                };
                self.send_frame(conn, Routing::default(), Payload::CrlFetch(fetch));
                self.send_pending_vouch(now);
                self.renewal_asked = None;
                self.renew_if_due(now, conn);
                let pending: Vec<MsgId> = self.outbox.keys().copied().collect();
                for msg_id in pending {
                    self.transmit(now, conn, msg_id);
                }
                self.drive_groups(now);
            }
            Payload::Crl(crl) => self.on_crl(now, &crl.crl),
            Payload::Certificate(answer) if matches!(self.link, Link::Handshaking { .. }) => {
                self.on_certificate(now, conn, answer);
            }
            Payload::Certificate(answer) if matches!(self.link, Link::Open { .. }) => {
                self.on_renewed(answer);
            }
            _ if !matches!(self.link, Link::Open { .. }) => {
                // Before HelloOk only a challenge, a token refusal or a goodbye make sense.
                match frame.payload {
                    Payload::Error(report)
                        if matches!(
                            ErrorCode::from_u16(report.code),
                            ErrorCode::ResumeTokenExpired | ErrorCode::ResumeTokenInvalid
                        ) =>
                    {
                        self.forget_resume_token();
                    }
                    Payload::Goodbye(goodbye) => self.refused(now, conn, &goodbye),
                    _ => {}
                }
            }
            Payload::Heartbeat(beat) => {
                self.send_frame(conn, Routing::default(), Payload::HeartbeatAck(beat));
            }
            Payload::HeartbeatAck(ack) => {
                self.renew_if_due(now, conn);
                let held = self.trust.crl_version();
                if ack.crl_version.is_some_and(|v| v > held) {
                    let fetch = CrlFetch { have_version: held };
                    self.send_frame(conn, Routing::default(), Payload::CrlFetch(fetch));
                }
            }
            Payload::SendAck(ack) => {
                self.settle(
                    routing.conversation,
                    MsgId::from_bytes(ack.msg_id),
                    routing.seq,
                );
            }
            Payload::Deliver(deliver) => {
                let inbound = Inbound {
                    sender: routing.sender,
                    msg_id: MsgId::from_bytes(deliver.msg_id),
                    body: Bytes::from(deliver.body),
                };
                self.receive(now, conn, routing.conversation, routing.seq, inbound);
            }
            Payload::Error(report)
                if ErrorCode::from_u16(report.code) == ErrorCode::ReplayWindowExceeded =>
            {
                self.skip_expired(conn, routing.conversation, routing.seq);
            }
            Payload::PairVouched(answer) => {
                if let Some(vouch) = self
                    .trust
                    .take_pending_vouch(&answer.secret, &mut self.writes)
                {
                    self.outputs
                        .push(NodeOutput::Event(NodeEvent::PairingReady {
                            expires: vouch.expires,
                        }));
                }
            }
            Payload::Error(report)
                if ErrorCode::from_u16(report.code) == ErrorCode::PairingRefused =>
            {
                // The refusal names the vouch by its signature's first half: an old refusal
                // must not drop a newer code.
                let named =
                    |v: &PendingVouch| report.msg_id.is_some_and(|id| id == v.signature[..16]);
                if let Some(vouch) = self.trust.pending_vouch().copied().filter(named) {
                    self.trust
                        .take_pending_vouch(&vouch.secret, &mut self.writes);
                    self.outputs
                        .push(NodeOutput::Event(NodeEvent::PairingRefused {
                            reason: report.message,
                        }));
                }
            }
            Payload::DeviceLinked(linked) => {
                if let Ok(cert) = DeviceCertificate::decode(&linked.certificate) {
                    let ours = self.config.certificate_user();
                    let from_root = self
                        .trust
                        .root()
                        .is_some_and(|r| cert.verify_issuer(r).is_ok());
                    if from_root && cert.user == ours {
                        self.outputs
                            .push(NodeOutput::Event(NodeEvent::DeviceLinked {
                                device: cert.device(),
                            }));
                    }
                }
            }
            Payload::KeyPackageCount(count) => self.replenish(now, conn, count),
            Payload::KeyPackages(answer) => self.on_key_packages(now, routing.seq, answer.found),
            Payload::Welcome(welcome) => {
                self.on_welcome(now, routing.conversation, welcome);
            }
            Payload::Removed(removed) => {
                let (Some(groups), Some(mls)) = (&mut self.groups, &self.mls) else {
                    return;
                };
                let conv = routing.conversation;
                let (action, news) = groups.on_removed(conv, removed.seq, mls, &mut self.writes);
                if news {
                    self.outputs.push(NodeOutput::Event(NodeEvent::RemovedFrom {
                        conversation: conv,
                        seq: removed.seq,
                    }));
                }
                self.perform(now, action);
            }
            Payload::Error(report) => {
                let code = ErrorCode::from_u16(report.code);
                if code == ErrorCode::KeyPackageRejected {
                    self.stats.key_package_failures += 1;
                    if let Some(mls) = &mut self.mls {
                        mls.upload_abandoned();
                    }
                }
                if code == ErrorCode::RateLimited && report.msg_id.is_none() {
                    // Only KeyPackage fetches are rate limited: the waiting group tries again
                    // at its next chance.
                    if let Some(groups) = &mut self.groups {
                        groups.fetch_refused(routing.seq);
                    }
                }
                let stale_message = code == ErrorCode::StaleEpoch
                    && report.msg_id.is_some_and(|id| {
                        self.groups
                            .as_ref()
                            .is_some_and(|g| g.is_own_message(MsgId::from_bytes(id)))
                    });
                if let (true, Some(id)) = (stale_message, report.msg_id) {
                    // Our application message was made before the group's current epoch: it
                    // stays in the outbox and is encrypted again once we are there.
                    let id = MsgId::from_bytes(id);
                    let sent_in = self.outbox.get(&id).and_then(|out| {
                        crate::mls::commit_authority::read_framing(&out.body)
                            .ok()
                            .map(|f| f.epoch)
                    });
                    let groups = self.groups.as_mut().expect("checked above");
                    groups.message_stale(routing.conversation, id, routing.epoch, sent_in);
                    self.drive_groups(now);
                } else if let Some(id) = report.msg_id.map(MsgId::from_bytes) {
                    let refused = matches!(
                        code,
                        ErrorCode::NotMember
                            | ErrorCode::UnknownConversation
                            | ErrorCode::StaleEpoch
                            | ErrorCode::Forbidden
                            | ErrorCode::InvalidGroupMessage
                    );
                    if refused && self.remove_from_outbox(id).is_some() {
                        self.group_message_refused(now, routing, id, code, &report.message);
                        self.outputs
                            .push(NodeOutput::Event(NodeEvent::Rejected { msg_id: id, code }));
                    }
                }
            }
            Payload::Goodbye(goodbye) => self.refused(now, conn, &goodbye),
            _ => {} // frames meant for gateways are ignored
        }
    }

    fn forget_resume_token(&mut self) {
        if self.resume_token.take().is_some() {
            self.writes
                .delete(NODE_SESSION_TABLE, RESUME_TOKEN_KEY.to_vec());
        }
    }

    /// The gateway ended the session: tell the user if it refused us, then reconnect.
    fn refused(&mut self, now: Instant, conn: ConnectionId, goodbye: &Goodbye) {
        let code = ErrorCode::from_u16(goodbye.code);
        if code == ErrorCode::DeviceRevoked {
            self.revoked(now);
            return;
        }
        if matches!(
            code,
            ErrorCode::CertificateExpired
                | ErrorCode::CertificateInvalid
                | ErrorCode::ForeignDomain
                | ErrorCode::CertificateRequired
        ) {
            // Register again on the next connection.
            self.trust.forget_certificate(&mut self.writes);
        }
        if matches!(
            code,
            ErrorCode::AuthenticationFailed
                | ErrorCode::DeviceNotAdmitted
                | ErrorCode::UserMismatch
                | ErrorCode::CertificateExpired
                | ErrorCode::CertificateInvalid
                | ErrorCode::CertificateNotYetValid
                | ErrorCode::ForeignDomain
                | ErrorCode::CertificateRequired
                | ErrorCode::EnrolmentTokenInvalid
                | ErrorCode::EnrolmentTokenUsed
                | ErrorCode::EnrolmentTokenExpired
                | ErrorCode::PairingRefused
        ) {
            self.forget_resume_token();
            self.outputs.push(NodeOutput::Event(NodeEvent::Refused {
                code,
                message: goodbye.message.clone(),
            }));
        }
        self.outputs.push(NodeOutput::Close(conn));
        self.schedule_reconnect(now);
    }

    /// The gateway no longer holds anything before `first_available`: report the gap and move
    /// the cursor past it.
    fn skip_expired(&mut self, conn: ConnectionId, conv: ConversationId, first_available: u64) {
        let cursor = self.cursor(conv);
        if first_available <= cursor + 1 {
            return; // nothing of ours is missing
        }
        let to = first_available - 1;
        self.outputs.push(NodeOutput::Event(NodeEvent::Gap {
            conversation: conv,
            from: cursor + 1,
            to,
        }));
        self.cursors.insert(conv, to);
        self.writes.put(
            NODE_CURSORS_TABLE,
            conv.to_bytes().to_vec(),
            to.to_be_bytes().to_vec(),
        );
        if let Some(buffer) = self.reorder.get_mut(&conv) {
            buffer.retain(|&s, _| s > to);
        }
        self.ack(conn, conv, to);
    }

    fn receive(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        conv: ConversationId,
        seq: u64,
        inbound: Inbound,
    ) {
        if inbound.sender == self.config.device {
            // Our own message coming back proves the gateway sequenced it, even if its SendAck
            // was lost: settle the outbox entry now, so that a resend after the log entry is
            // garbage-collected cannot become a second copy.
            self.settle(conv, inbound.msg_id, seq);
        }
        let cursor = self.cursor(conv);
        if seq <= cursor {
            self.stats.duplicate_deliveries += 1;
            self.ack(conn, conv, cursor);
            return;
        }
        if seq > cursor + 1 {
            let buffer = self.reorder.entry(conv).or_default();
            if buffer.len() < self.config.reorder_buffer_max || buffer.contains_key(&seq) {
                buffer.insert(seq, inbound);
            }
            let asked = self.replay_asked.get(&conv).copied();
            if asked.is_none_or(|t| now >= t + self.config.replay_request_interval) {
                self.replay_asked.insert(conv, now);
                self.stats.replay_requests += 1;
                let routing = Routing {
                    conversation: conv,
                    ..Routing::default()
                };
                self.send_frame(
                    conn,
                    routing,
                    Payload::ReplayRequest(ReplayRequest {
                        from_seq: cursor + 1,
                    }),
                );
            }
            return;
        }
        let mut next = seq;
        let mut item = inbound;
        let mut group_changed = false;
        loop {
            let event = self.process(conv, next, item);
            group_changed |= matches!(
                event,
                Some(NodeEvent::GroupChanged { .. } | NodeEvent::RemovalProposed { .. })
            );
            if let Some(event) = event {
                self.outputs.push(NodeOutput::Event(event));
            }
            match self
                .reorder
                .get_mut(&conv)
                .and_then(|b| b.remove(&(next + 1)))
            {
                Some(buffered) => {
                    next += 1;
                    item = buffered;
                }
                None => break,
            }
        }
        if let Some(buffer) = self.reorder.get_mut(&conv) {
            buffer.retain(|&s, _| s > next);
        }
        debug_assert!(next > cursor, "cursor only moves forward");
        self.cursors.insert(conv, next);
        self.writes.put(
            NODE_CURSORS_TABLE,
            conv.to_bytes().to_vec(),
            next.to_be_bytes().to_vec(),
        );
        self.ack(conn, conv, next);
        if group_changed {
            self.drive_groups(now);
        }
    }

    /// What the application hears of the message at `seq`: the body itself in a plain
    /// conversation; in a group, the decrypted message or the commit's effect.
    fn process(&mut self, conv: ConversationId, seq: u64, item: Inbound) -> Option<NodeEvent> {
        let delivered = |body: Bytes| NodeEvent::Delivered {
            conversation: conv,
            seq,
            sender: item.sender,
            msg_id: item.msg_id,
            body,
        };
        let (Some(groups), Some(mls)) = (&mut self.groups, &self.mls) else {
            return Some(delivered(item.body.clone()));
        };
        if !groups.is_group(conv) {
            return Some(delivered(item.body.clone()));
        }
        let processed = groups.on_deliver(
            conv,
            seq,
            item.sender,
            item.msg_id,
            &item.body,
            mls,
            &mut self.writes,
        );
        match processed {
            Processed::Message(plaintext) => Some(delivered(plaintext)),
            Processed::Commit {
                epoch,
                added,
                removed,
            } => Some(NodeEvent::GroupChanged {
                conversation: conv,
                seq,
                sender: item.sender,
                msg_id: item.msg_id,
                epoch,
                added,
                removed,
            }),
            Processed::Failed(reason) => Some(NodeEvent::Undecryptable {
                conversation: conv,
                seq,
                sender: item.sender,
                reason,
            }),
            Processed::RemovalProposed { device } => Some(NodeEvent::RemovalProposed {
                conversation: conv,
                seq,
                msg_id: item.msg_id,
                device,
            }),
            Processed::Skipped => Some(NodeEvent::Skipped {
                conversation: conv,
                seq,
                sender: item.sender,
                msg_id: item.msg_id,
            }),
            Processed::Nothing => None,
        }
    }

    // ---- groups ----

    /// Starts a DM with every device of `peer` (and this user's other devices). The DM's id
    /// follows from the two users, so both sides name the same conversation; if both create it
    /// at once, the first creating commit wins and the other side joins from its Welcome.
    pub fn create_dm(&mut self, now: Instant, peer: UserId) -> Result<ConversationId, GroupError> {
        let user = self.config.user.ok_or(GroupError::NoIdentity)?;
        let conv = dm_id(user, peer);
        let groups = self.groups.as_mut().ok_or(GroupError::NoIdentity)?;
        groups.create(conv, GroupKind::Dm, &[peer], &mut self.writes)?;
        self.drive_groups(now);
        Ok(conv)
    }

    /// Creates a room owned by this device's user, inviting `users`.
    pub fn create_room(
        &mut self,
        now: Instant,
        users: &[UserId],
    ) -> Result<ConversationId, GroupError> {
        let mut id = [0u8; 16];
        self.entropy.fill_bytes(&mut id);
        let conv = ConversationId::from_bytes(id);
        let groups = self.groups.as_mut().ok_or(GroupError::NoIdentity)?;
        groups.create(conv, GroupKind::Room, users, &mut self.writes)?;
        self.drive_groups(now);
        Ok(conv)
    }

    /// Queues a change to a group (add users, remove a user or device, update, set a role).
    pub fn change_group(
        &mut self,
        now: Instant,
        conv: ConversationId,
        intent: Intent,
    ) -> Result<(), GroupError> {
        let groups = self.groups.as_mut().ok_or(GroupError::NoIdentity)?;
        groups.request(conv, intent, &mut self.writes)?;
        self.drive_groups(now);
        Ok(())
    }

    /// Leaves a group: the gateway proposes this device's removal, and a member commits it.
    pub fn leave(&mut self, now: Instant, conv: ConversationId) -> Result<(), GroupError> {
        self.change_group(now, conv, Intent::Leave)
    }

    /// Gives `user` a role in a room (the gateway checks that our user owns it).
    pub fn set_role(
        &mut self,
        now: Instant,
        conv: ConversationId,
        user: UserId,
        role: Role,
    ) -> Result<(), GroupError> {
        self.change_group(now, conv, DeviceGroups::role_change(user, role))
    }

    /// This device's groups.
    pub fn groups(&self) -> Option<&DeviceGroups> {
        self.groups.as_ref()
    }

    /// Lets every group with a queued change move, if a session is open.
    fn drive_groups(&mut self, now: Instant) {
        if !matches!(self.link, Link::Open { .. }) {
            return;
        }
        let (Some(groups), Some(mls)) = (&mut self.groups, &self.mls) else {
            return;
        };
        let entropy = &mut self.entropy;
        let mut next_id = || {
            let mut id = [0u8; 16];
            entropy.fill_bytes(&mut id);
            MsgId::from_bytes(id)
        };
        let actions = groups.drive(now, mls, &mut next_id, &mut self.writes);
        let again = groups.reencrypt_ready(mls, &mut self.writes);
        for action in actions {
            self.perform(now, action);
        }
        for (msg_id, conv, result) in again {
            match result {
                Ok(body) => {
                    // Same id, new ciphertext: the gateway never sequenced the old one.
                    self.remove_from_outbox(msg_id);
                    self.enqueue(now, conv, msg_id, body, None);
                }
                Err(_) => {
                    self.remove_from_outbox(msg_id);
                    if let Some(groups) = &mut self.groups {
                        groups.forget_sent(msg_id, &mut self.writes);
                    }
                    self.outputs.push(NodeOutput::Event(NodeEvent::Rejected {
                        msg_id,
                        code: ErrorCode::NotMember,
                    }));
                }
            }
        }
    }

    fn perform(&mut self, now: Instant, action: GroupAction) {
        let Some(conn) = self.current_conn() else {
            return;
        };
        match action {
            GroupAction::Submit {
                conversation,
                msg_id,
                body,
                welcome,
            } => self.enqueue(now, conversation, msg_id, body, welcome),
            GroupAction::Fetch { request, users } => {
                let fetch = KeyPackageFetch {
                    users: users.iter().map(|u| u.to_bytes().into()).collect(),
                };
                let routing = Routing {
                    seq: request,
                    ..Routing::default()
                };
                self.send_frame(conn, routing, Payload::KeyPackageFetch(fetch));
            }
            GroupAction::Joined { conversation, seq } => {
                self.cursors.insert(conversation, seq);
                self.writes.put(
                    NODE_CURSORS_TABLE,
                    conversation.to_bytes().to_vec(),
                    seq.to_be_bytes().to_vec(),
                );
                if let Some(buffer) = self.reorder.get_mut(&conversation) {
                    buffer.retain(|&s, _| s > seq);
                }
                self.ack(conn, conversation, seq);
            }
            GroupAction::Acknowledge { conversation, seq } => self.ack(conn, conversation, seq),
            GroupAction::Leave(conversation) => {
                let routing = Routing {
                    conversation,
                    ..Routing::default()
                };
                self.send_frame(conn, routing, Payload::Leave(Leave {}));
            }
        }
    }

    fn on_key_packages(&mut self, now: Instant, request: u64, found: Vec<FetchedKeyPackage>) {
        let msg_id = self.new_msg_id();
        let (Some(groups), Some(mls)) = (&mut self.groups, &self.mls) else {
            return;
        };
        let writes = &mut self.writes;
        if let Some(action) = groups.on_key_packages(now, request, &found, mls, msg_id, writes) {
            self.perform(now, action);
        }
        self.drive_groups(now);
    }

    fn on_welcome(
        &mut self,
        now: Instant,
        conv: ConversationId,
        welcome: crate::wire::payload::Welcome,
    ) {
        let (Some(groups), Some(mls)) = (&mut self.groups, &self.mls) else {
            return;
        };
        let cursor = self.cursors.get(&conv).copied().unwrap_or(0);
        let result = groups.on_welcome(conv, &welcome, cursor, mls, &mut self.writes);
        match result {
            Ok(action) => {
                if let GroupAction::Joined { seq, .. } = action {
                    self.outputs.push(NodeOutput::Event(NodeEvent::Joined {
                        conversation: conv,
                        seq,
                        kind: GroupKind::from_u8(welcome.kind).unwrap_or(GroupKind::Room),
                    }));
                }
                self.perform(now, action);
                self.drive_groups(now);
            }
            Err(e) => {
                // A Welcome we cannot use stays in the inbox; tell the application once per
                // session, without the Welcome's bytes.
                self.outputs
                    .push(NodeOutput::Event(NodeEvent::Undecryptable {
                        conversation: conv,
                        seq: welcome.seq,
                        sender: DeviceId(0),
                        reason: format!("cannot join from this Welcome: {e}"),
                    }));
            }
        }
    }

    /// The gateway refused our message `msg_id`; for a commit, the group drops or retries it.
    fn group_message_refused(
        &mut self,
        now: Instant,
        routing: Routing,
        msg_id: MsgId,
        code: ErrorCode,
        message: &str,
    ) {
        let (Some(groups), Some(mls)) = (&mut self.groups, &self.mls) else {
            return;
        };
        groups.forget_sent(msg_id, &mut self.writes);
        let conv = routing.conversation;
        let stale = code == ErrorCode::StaleEpoch;
        let refused =
            groups.on_commit_refused(conv, msg_id, stale, routing.epoch, mls, &mut self.writes);
        if refused.is_some() {
            self.outputs
                .push(NodeOutput::Event(NodeEvent::GroupChangeRefused {
                    conversation: conv,
                    code,
                    message: message.to_string(),
                }));
        }
        self.drive_groups(now);
    }

    /// The gateway sequenced our `msg_id` at `seq`: it leaves the outbox.
    fn settle(&mut self, conv: ConversationId, msg_id: MsgId, seq: u64) {
        if let Some(out) = self.remove_from_outbox(msg_id) {
            debug_assert!(
                conv == out.conversation,
                "a message settles in its own conversation"
            );
            self.outputs.push(NodeOutput::Event(NodeEvent::Accepted {
                conversation: out.conversation,
                msg_id,
                seq,
            }));
        }
    }

    fn ack(&mut self, conn: ConnectionId, conv: ConversationId, seq: u64) {
        let routing = Routing {
            conversation: conv,
            seq,
            ..Routing::default()
        };
        self.send_frame(conn, routing, Payload::Ack(Ack {}));
    }

    fn transmit(&mut self, now: Instant, conn: ConnectionId, msg_id: MsgId) {
        let out = self
            .outbox
            .get_mut(&msg_id)
            .expect("transmitting an outbox entry");
        if out.last_sent.is_some() {
            self.stats.resends += 1;
        }
        out.last_sent = Some(now);
        let routing = Routing {
            conversation: out.conversation,
            sender: self.config.device,
            ..Routing::default()
        };
        let payload = Payload::Send(Send {
            welcome: out.welcome.as_ref().map(|w| w.to_vec().into()),
            msg_id: msg_id.to_bytes(),
            body: out.body.to_vec(),
        });
        let frame = NodeOutput::Send(conn, Frame::new(routing, payload).encode());
        let group = self
            .groups
            .as_ref()
            .is_some_and(|g| g.is_group(out.conversation));
        if group {
            // Held: an MLS message leaves only once the state it advanced is durable. A commit
            // the gateway accepted but we forgot would fork us from the group, and a ratchet
            // generation used twice would reuse a key and nonce.
            self.outputs.push(frame);
        } else {
            // Eager: the gateway deduplicates on the message id, so the frame may leave before
            // the outbox entry is durable. A crash in between loses only a message whose `send`
            // had not returned yet; one the gateway accepted is delivered either way.
            self.eager.push(frame);
        }
    }

    fn resend_stale(&mut self, now: Instant, conn: ConnectionId) {
        let stale: Vec<MsgId> = self
            .outbox
            .iter()
            .filter(|(_, o)| {
                o.last_sent
                    .is_none_or(|t| now >= t + self.config.resend_after)
            })
            .map(|(id, _)| *id)
            .collect();
        for msg_id in stale {
            self.transmit(now, conn, msg_id);
        }
    }

    fn schedule_reconnect(&mut self, now: Instant) {
        if let Link::Offline { retry_at: None } = self.link {
            return; // the user asked to stay offline
        }
        self.reorder.clear();
        self.replay_asked.clear();
        if let Some(groups) = &mut self.groups {
            groups.connection_lost();
        }
        let cap = self
            .config
            .backoff_initial
            .saturating_mul(1u32 << self.attempts.min(20))
            .min(self.config.backoff_max);
        let cap_us = u64::try_from(cap.as_micros()).unwrap_or(u64::MAX);
        let delay = Duration::from_micros(self.entropy.below_inclusive(cap_us));
        self.attempts = self.attempts.saturating_add(1);
        self.link = Link::Offline {
            retry_at: Some(now + delay),
        };
        self.set_status(ConnectionStatus::Reconnecting {
            attempt: self.attempts,
        });
    }

    /// Tops up this device's KeyPackage pool when the gateway says it runs low.
    fn replenish(&mut self, now: Instant, conn: ConnectionId, count: KeyPackageCount) {
        let Some(mls) = &mut self.mls else {
            return; // a device without MLS keeps no pool
        };
        let result = mls.on_count(
            now,
            count.remaining as usize,
            count.last_resort,
            count.replenish_below as usize,
            &mut self.writes,
        );
        match result {
            Ok(Some((packages, last_resort))) => {
                self.stats.key_packages_uploaded += packages.len() as u64;
                let upload = KeyPackageUpload {
                    packages: packages.into_iter().map(|p| p.to_vec().into()).collect(),
                    last_resort: last_resort.map(|p| p.to_vec().into()),
                };
                // Held until the commit that carries the packages' private keys.
                self.send_frame(conn, Routing::default(), Payload::KeyPackageUpload(upload));
            }
            Ok(None) => {}
            Err(_) => self.stats.key_package_failures += 1,
        }
    }

    /// The device's MLS state, if it runs MLS.
    pub fn mls(&self) -> Option<&DeviceMls> {
        self.mls.as_ref()
    }

    fn set_status(&mut self, status: ConnectionStatus) {
        if self.status != status {
            self.status = status;
            self.outputs
                .push(NodeOutput::Event(NodeEvent::Status(status)));
        }
    }

    fn send_frame(&mut self, conn: ConnectionId, routing: Routing, payload: Payload) {
        self.outputs.push(NodeOutput::Send(
            conn,
            Frame::new(routing, payload).encode(),
        ));
    }
}

fn corrupt(table: Table, reason: &str) -> StoreError {
    StoreError::Corrupt {
        table: table.0,
        reason: reason.to_string(),
    }
}

fn decode_outbox(key: &[u8], value: &[u8]) -> Result<(MsgId, Outgoing), StoreError> {
    let id: [u8; 16] = key
        .try_into()
        .map_err(|_| corrupt(OUTBOX_TABLE, "key length"))?;
    if value.len() < 16 {
        return Err(corrupt(
            OUTBOX_TABLE,
            "value shorter than a conversation id",
        ));
    }
    let conversation = ConversationId::from_bytes(value[..16].try_into().expect("16 bytes"));
    let body = Bytes::copy_from_slice(&value[16..]);
    Ok((
        MsgId::from_bytes(id),
        Outgoing {
            conversation,
            body,
            welcome: None,
            last_sent: None,
        },
    ))
}

/// The id of the DM between two users: the same whichever of them creates it.
pub fn dm_id(a: UserId, b: UserId) -> ConversationId {
    use sha2::{Digest, Sha256};
    let (low, high) = if a <= b { (a, b) } else { (b, a) };
    let digest = Sha256::new()
        .chain_update(b"sund/dm/v1")
        .chain_update(low.to_bytes())
        .chain_update(high.to_bytes())
        .finalize();
    ConversationId::from_bytes(digest[..16].try_into().expect("16 bytes"))
}
