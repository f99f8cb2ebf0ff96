//! What a node tells its driver and its application: inputs, outputs, events, errors, counters.

use bytes::Bytes;

use crate::files::{ManifestDigest, UploadId};
use crate::ids::{ConnectionId, ConversationId, DeviceId, MsgId, UserId};
use crate::mls::device_groups::GroupError;
use crate::mls::group_ops::GroupKind;
use crate::wire::payload::{Contacts, ErrorCode, Seen};

/// This user's contacts, requests, blocks and visibility, as the gateway last listed them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContactList {
    /// Mutual contacts.
    pub contacts: Vec<UserId>,
    /// Users who asked this user and were not added back.
    pub incoming: Vec<UserId>,
    /// Users this user asked who have not added back.
    pub outgoing: Vec<UserId>,
    /// Users this user blocked.
    pub blocked: Vec<UserId>,
    /// Whether this user is invisible.
    pub invisible: bool,
}

impl From<Contacts> for ContactList {
    fn from(c: Contacts) -> ContactList {
        let ids = |list: Vec<minicbor::bytes::ByteArray<16>>| {
            list.into_iter().map(|u| UserId::from_bytes(*u)).collect()
        };
        ContactList {
            contacts: ids(c.contacts),
            incoming: ids(c.incoming),
            outgoing: ids(c.outgoing),
            blocked: ids(c.blocked),
            invisible: c.invisible,
        }
    }
}

/// A pairing code's secret and expiry, as [`super::Node::offer_pairing`] made them; the application
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

/// Inputs from the transport to [`super::Node::handle`].
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
    /// A chunk stream of the connection was read whole: its head frame and the sealed bytes
    /// after it (at most the head's length, checked before reading).
    Chunk {
        /// The connection.
        conn: ConnectionId,
        /// The encoded head frame.
        head: Bytes,
        /// The sealed chunk.
        body: Bytes,
    },
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
    /// The gateway took no more messages from this device for a while (a rate limit): what
    /// waits in the outbox goes again after `retry_after`. Said once per pause, not per
    /// message.
    Throttled {
        /// The limit: `sends_limited` or `conversations_limited`.
        code: ErrorCode,
        /// How long sending pauses.
        retry_after: core::time::Duration,
        /// The gateway's explanation (names the limit).
        message: String,
    },
    /// The gateway listed this user's contacts: the answer to `request` (a contact change,
    /// visibility change or fetch), or unasked (`None`) after a change made elsewhere.
    Contacts {
        /// The request answered.
        request: Option<u64>,
        /// The listing.
        contacts: ContactList,
    },
    /// A watched user's presence changed (or was first told).
    Presence {
        /// The user.
        user: UserId,
        /// Online, or a coarse bucket of when last seen; unknown for anyone not a mutual
        /// contact, invisible, or blocking.
        seen: Seen,
    },
    /// The gateway refused a contact or presence request.
    ContactsRefused {
        /// The request.
        request: u64,
        /// Why (`contacts_limited`, `contact_list_full`, `watchlist_too_long`,
        /// `presence_limited`, `forbidden`...).
        code: ErrorCode,
        /// The gateway's explanation.
        message: String,
        /// With a rate limit: when to ask again.
        retry_after: Option<core::time::Duration>,
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
    /// Messages `from..=to` of a conversation are gone for good because the gateway lost them:
    /// its disk lost writes it had reported durable, and another device's cursor showed it.
    /// Unlike [`NodeEvent::Gap`] this is a fault, not policy: the user should hear it as one.
    HistoryLost {
        /// Conversation.
        conversation: ConversationId,
        /// First lost seq.
        from: u64,
        /// Last lost seq.
        to: u64,
    },
    /// What this device read of a conversation up to `upto` is not what the gateway holds
    /// there: the gateway lost messages this device had read (its disk lost writes it had
    /// reported durable) and has since given their seqs to other messages, which this device
    /// will not be shown. It keeps what it read, and reads on after `upto`.
    HistoryDiverged {
        /// Conversation.
        conversation: ConversationId,
        /// The seq up to which this device's history differs (from somewhere before it).
        upto: u64,
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
    /// A newer CRL of another domain arrived (its gateway pushed it to this device's) and is
    /// kept: members that domain revoked are refused in commits from now on.
    PeerCrlUpdated {
        /// The domain that revoked.
        domain: String,
        /// Its CRL's version.
        version: u64,
    },
    /// A CRL was refused (forged, foreign, or older than the one held).
    CrlRefused {
        /// Why.
        reason: String,
    },
    /// The gateway's set of other domains' roots was refused (not signed by this device's
    /// root, or malformed): members of other domains cannot be checked against it. The set
    /// held before, if any, stays.
    PeerRootsRefused {
        /// Why.
        reason: String,
    },
    /// A Welcome to `conversation`, or a commit in it, cannot be checked yet: a member is
    /// certified by a domain whose root this device's gateway has not vouched for (its link to
    /// that domain may not have come up). The Welcome stays at the gateway and is tried again
    /// when it comes again; a commit waits, and the conversation's reading with it, until the
    /// gateway vouches for that root.
    JoinWaiting {
        /// The conversation.
        conversation: ConversationId,
        /// Why, in words.
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
    /// The conversation's authority moved to another gateway, and the old one proposed (as
    /// the group's external sender) the new one's key in its place; a member commits it next.
    ExternalSenderProposed {
        /// Conversation.
        conversation: ConversationId,
        /// The proposal's seq.
        seq: u64,
        /// Its message id.
        msg_id: MsgId,
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
    /// A group change of ours waits: the KeyPackages it needs could not be fetched now (another
    /// domain's gateway is not reachable, or paces this one). The change stays queued and the
    /// device asks again by itself; this says why it has not happened yet.
    GroupChangeDelayed {
        /// Conversation.
        conversation: ConversationId,
        /// Why.
        code: ErrorCode,
        /// The gateway's explanation.
        message: String,
    },
    /// A file arrived in a conversation (its chunks wait at the gateway): fetch it with
    /// `Node::fetch_file`.
    FileOffered {
        /// Conversation.
        conversation: ConversationId,
        /// The sending device.
        sender: DeviceId,
        /// The file, as `fetch_file` names it.
        digest: ManifestDigest,
        /// Its name (checked safe).
        name: String,
        /// Its size in bytes.
        size: u64,
        /// Bytes this device lacks of it (less than `size` when it holds some chunks already).
        missing_bytes: u64,
    },
    /// A chunk of a file being fetched arrived and verified.
    FileProgress {
        /// Conversation.
        conversation: ConversationId,
        /// The file.
        digest: ManifestDigest,
        /// Bytes still to fetch.
        remaining_bytes: u64,
    },
    /// Every chunk of a file is held and verified: assemble it (`files::assemble`).
    FileComplete {
        /// Conversation.
        conversation: ConversationId,
        /// The file.
        digest: ManifestDigest,
    },
    /// A fetch gave up; the reason says what to do.
    FileFailed {
        /// Conversation.
        conversation: ConversationId,
        /// The file.
        digest: ManifestDigest,
        /// Why, in words.
        reason: String,
    },
    /// The gateway said what an upload lacks, or a chunk of it became durable there.
    UploadProgress {
        /// Conversation.
        conversation: ConversationId,
        /// The upload.
        upload: UploadId,
        /// Sealed bytes the gateway still lacks.
        remaining_bytes: u64,
    },
    /// Every chunk of an upload is at the gateway and the file message is queued.
    FileSent {
        /// Conversation.
        conversation: ConversationId,
        /// The upload.
        upload: UploadId,
        /// The file message's id.
        msg_id: MsgId,
    },
    /// The gateway refused an upload; nothing more of it is sent.
    FileSendFailed {
        /// Conversation.
        conversation: ConversationId,
        /// The upload.
        upload: UploadId,
        /// Why.
        code: ErrorCode,
        /// The gateway's words.
        message: String,
    },
    /// A member device says it holds a file this device sent, complete and verified.
    FileReceipt {
        /// Conversation.
        conversation: ConversationId,
        /// The file.
        digest: ManifestDigest,
        /// The device that holds it.
        device: DeviceId,
        /// Its signature checked against the key of its certificate (false: the key could not
        /// be found, as in a conversation without MLS).
        verified: bool,
    },
}

/// Outputs released by a committed [`crate::env::Ready`].
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
    /// Send a chunk of a file this device uploads, on a chunk stream of its own (see
    /// `transfers::ChunkToSend`).
    SendChunk(super::transfers::ChunkToSend),
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
    /// `Hello`s sent again on a connection because nothing answered the first in time.
    pub hellos_again: u64,
    /// Sets of peer roots from the gateway refused (see `NodeEvent::PeerRootsRefused`).
    pub peer_roots_refused: u64,
    /// Welcomes that could not be checked yet (see `NodeEvent::JoinWaiting`).
    pub welcomes_waiting_for_roots: u64,
    /// Deliveries parked because a commit could not be checked yet (see
    /// `NodeEvent::JoinWaiting`).
    pub deliveries_parked: u64,
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
    /// Times the gateway refused a message out of this device's order and what waited went
    /// out again, chained from the gateway's last.
    pub sender_resyncs: u64,
    /// Times the gateway held a message of this device until the ones before it came (some
    /// were lost on the way) and only those went out again.
    pub sender_gaps_filled: u64,
    /// Messages the gateway refused while their conversation's authority moved to another
    /// gateway, sent again after its hint.
    pub authority_moving: u64,
    /// Messages the gateway refused because their conversation's authority, another domain's
    /// gateway, took no more from this device's gateway for a while (`peer_limited`), sent
    /// again after its hint.
    pub peer_limited: u64,
    /// Chunk streams whose head was not a chunk head.
    pub bad_chunk_streams: u64,
    /// File messages whose manifest this device refused.
    pub bad_file_messages: u64,
    /// Times a whole upload's message had to wait (a removal waiting for its commit, a full
    /// outbox) and was sent again at a later heartbeat.
    pub file_messages_waiting: u64,
    /// Chunks of this device's store found missing or damaged when a file was saved, and
    /// dropped so that the file is fetched again.
    pub chunks_lost: u64,
    /// File receipts this device sent.
    pub receipts_sent: u64,
    /// Receipts that could not be sent (this device is no longer in the conversation).
    pub receipts_unsent: u64,
    /// Receipts refused: malformed, naming another device than their sender, or with a
    /// signature that does not verify against the device's certificate key.
    pub receipts_refused: u64,
    /// Messages the gateway refused by a rate limit (`sends_limited`,
    /// `conversations_limited`, `invitations_limited`); each waited in the outbox and went
    /// again after the hint.
    pub throttled: u64,
    /// Frames from the gateway this device could not decode (each ended its connection).
    pub unreadable_frames: u64,
    /// Members' addresses learnt from rosters (see `node::told_names`).
    pub names_told: u64,
}
