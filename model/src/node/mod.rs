//! The node (device) state machine: a thin router over sub-machines that each own their state.
//!
//! Shape (quinn-proto / str0m style):
//! - getters take `&self` (`status`, `cursor`, `outbox_len`, ...);
//! - [`Node::handle`] takes inputs from the transport (connected, failed, frame, closed);
//! - mutators are user commands: [`Node::send`], [`Node::go_offline`], [`Node::go_online`],
//!   the group commands, [`Node::offer_pairing`];
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
//!
//! The sub-machines: [`link`] (connection, handshake, heartbeats, backoff, resume token),
//! [`outbox`], [`inbox`] (cursors, reorder buffer, replay requests), [`trust`] (registration,
//! renewal, pairing, CRL) and [`mls`] (the device's MLS identity and groups, one optional value);
//! [`files`] (the chunk store, files being received) and [`transfers`] (uploads and fetches
//! on the wire).
//! Every handler writes into one effects sink ([`Effects`]).

mod config;
pub mod contact_book;
mod events;
pub mod files;
pub mod inbox;
pub mod link;
pub mod mls;
pub mod outbox;
pub mod round_trip;
mod session;
pub mod social;
mod timers;
pub mod told_names;
pub mod transfers;
pub mod trust;
pub mod unread;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;

use crate::effects::Effects;
use crate::env::{Entropy, Ready, StoreError, StoreRead};
use crate::identity::session_proof_message;
use crate::ids::{ConnectionId, ConversationId, DeviceId, MsgId, UserId};
use crate::mls::device::DeviceMls;
use crate::mls::device_groups::{DeviceGroups, GroupError, Processed};
use crate::time::Instant;
use crate::timers::TimerTable;
use crate::trust::handshake::PeerIdentity;
use crate::trust::TrustHolder;
use crate::wire::payload::{
    Ack, CrlFetch, Cursor, ErrorCode, ErrorReport, Goodbye, Hello, HelloOk, Proof, ReplayRequest,
    CURSORS_LEN_MAX,
};
use crate::wire::{Frame, Payload, Routing, PAYLOAD_BYTES_MAX};

pub use config::NodeConfig;
pub use events::{
    ConnectionStatus, ContactList, NodeEvent, NodeInput, NodeOutput, NodeStats, PairingOffer,
    SendError,
};
pub use inbox::NODE_CURSORS_TABLE;
pub use link::NODE_SESSION_TABLE;
pub use outbox::{OUTBOX_TABLE, OUTBOX_WELCOME_TABLE};
pub use unread::NODE_UNREAD_TABLE;

use inbox::{Inbound, Inbox};
use link::{Link, LinkDue};
use mls::NodeMls;
use outbox::Outbox;
use timers::NodeTimer;
use trust::{CrlOutcome, NodeTrust};
use unread::Unread;

/// How long a device pauses sending after a rate-limit refusal that carries no hint.
const THROTTLE_DEFAULT: Duration = Duration::from_secs(1);
/// How long a device waits for a `HelloOk` once frames of the open session came without it.
const HELLO_OK_GRACE: Duration = Duration::from_secs(1);
/// When a message refused `authority_moving` without a hint goes again.
const AUTHORITY_MOVING_DEFAULT: Duration = Duration::from_millis(500);
/// After a rate limit, only the first this many messages waiting in each conversation go out
/// (one more per acknowledgement, no pace again past `PACING_MAX`): a backlog goes out from
/// its head, a window at a time, not all at once to be refused again. Within a window the
/// gateway takes what its limit allows and refuses the rest, which goes in the next.
const PACING_START: usize = 32;
/// Past this pace, pacing ends.
const PACING_MAX: usize = 1024;

/// What a device whose data was copied is told (the gateway's refusal, and every start after).
pub const STATE_COPIED: &str = "another copy of this device's data (a copied data directory, or one restored from a backup) has connected since this copy last did. Using both would reuse encryption secrets, so this copy stays offline for good. Keep using the other copy; to use this machine as well, set it up as a new device in a new data directory (`sund pair show` on the other copy, `sund pair accept` here)";

/// The node's effects sink.
pub(crate) type NodeFx = Effects<NodeOutput>;

impl Effects<NodeOutput> {
    /// Queues a frame, released with this batch's commit.
    pub(crate) fn send(&mut self, conn: ConnectionId, routing: Routing, payload: Payload) {
        self.hold(NodeOutput::Send(
            conn,
            Frame::new(routing, payload).encode(),
        ));
    }

    /// Tells the application, with this batch's commit.
    pub(crate) fn event(&mut self, event: NodeEvent) {
        self.hold(NodeOutput::Event(event));
    }
}

/// One device as a deterministic state machine. See the module docs.
pub struct Node {
    config: NodeConfig,
    entropy: Box<dyn Entropy + core::marker::Send>,
    link: Link,
    outbox: Outbox,
    inbox: Inbox,
    unread: Unread,
    /// Members' addresses told in rosters (see [`told_names`]).
    told_names: told_names::ToldNames,
    trust: NodeTrust,
    mls: Option<NodeMls>,
    files: files::DeviceFiles,
    transfers: transfers::NodeTransfers,
    social: social::NodeSocial,
    timers: TimerTable<NodeTimer>,
    /// When each conversation was last sent again in sender order (see `resync_sender_order`).
    sender_resync_at: BTreeMap<ConversationId, Instant>,
    /// Until when the gateway takes no messages from this device (its rate limit said so):
    /// what waits in the outbox is held back until then (in memory only).
    throttled_until: Option<Instant>,
    /// Conversations whose messages wait until then: their authority is moving to another
    /// gateway (`authority_moving`), limits what our gateway relays (`peer_limited`), or a
    /// change in it was refused by the limit on invitations or on new conversations.
    deferred: BTreeMap<ConversationId, Instant>,
    /// The application was told that the gateway sends frames this device cannot read (once
    /// per run of the node).
    told_unreadable: bool,
    /// After a rate limit: only the first this many messages waiting in a conversation go
    /// out (see `throttle`); `None` when no limit was met recently.
    pacing: Option<usize>,
    /// The link's measured round trip: how long the outbox waits before sending again.
    round_trip: round_trip::RoundTrip,
    /// The session on which the gateway last said it holds enough of this device's
    /// KeyPackages (see [`Node::key_packages_settled`]).
    key_packages_settled_on: Option<ConnectionId>,
    stats: NodeStats,
    fx: NodeFx,
}

impl core::fmt::Debug for Node {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Node")
            .field("device", &self.config.device)
            .field("link", &self.link.state())
            .field("outbox", &self.outbox.len())
            .field("cursors", self.inbox.cursors())
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
        let outbox = Outbox::recover(config.outbox_len_max, store)?;
        let inbox = Inbox::recover(
            config.reorder_buffer_max,
            config.replay_request_interval,
            store,
        )?;
        let link = Link::recover(&config, now, store)?;
        let mut fx = NodeFx::default();
        let mut entropy = entropy;
        let mls = match &config.mls {
            Some(mls_config) => Some(NodeMls::recover(
                mls_config.clone(),
                config.device,
                config.user,
                entropy.as_mut(),
                store,
                fx.writes(),
            )?),
            None => None,
        };
        let trust = NodeTrust::recover(store)?;
        let files = files::DeviceFiles::recover(store)?;
        let transfers = transfers::NodeTransfers::recover(store)?;
        let told_names = told_names::ToldNames::recover(store)?;
        let mut unread = Unread::default();
        if config.hold_until_taken {
            let (held, untaken) = Unread::recover(store)?;
            unread = held;
            for event in untaken {
                fx.event(event);
            }
        }
        let mut node = Node {
            config,
            entropy,
            link,
            outbox,
            inbox,
            unread,
            told_names,
            trust,
            mls,
            files,
            transfers,
            social: social::NodeSocial::default(),
            timers: TimerTable::default(),
            sender_resync_at: BTreeMap::new(),
            throttled_until: None,
            deferred: BTreeMap::new(),
            told_unreadable: false,
            pacing: None,
            round_trip: round_trip::RoundTrip::default(),
            key_packages_settled_on: None,
            stats: NodeStats::default(),
            fx,
        };
        node.bind_mls_to_trust();
        if node.link.state_copied() {
            node.set_status(ConnectionStatus::Offline);
            node.fx.event(NodeEvent::Refused {
                code: ErrorCode::DeviceStateCopied,
                message: STATE_COPIED.into(),
            });
        }
        node.refresh_timers();
        Ok(node)
    }

    // ---- getters ----

    /// Contacts and presence as this device knows them.
    pub fn social(&self) -> &social::NodeSocial {
        &self.social
    }

    /// Adds (asks to be contacts, or accepts a request), removes, blocks or unblocks `user`.
    /// Returns the request id: the answer is a [`NodeEvent::Contacts`] or a
    /// [`NodeEvent::ContactsRefused`] naming it. Sent now if a session is open, else when one
    /// opens.
    pub fn change_contact(
        &mut self,
        now: Instant,
        user: UserId,
        action: crate::wire::payload::ContactAction,
    ) -> u64 {
        self.change_contact_abroad(now, user, None, action)
    }

    /// [`Node::change_contact`] for a user of `domain` when it is not this device's (`None`:
    /// a user of its own domain, or one its gateway knows, who asked from abroad).
    pub fn change_contact_abroad(
        &mut self,
        _now: Instant,
        user: UserId,
        domain: Option<String>,
        action: crate::wire::payload::ContactAction,
    ) -> u64 {
        let conn = self.link.open_conn();
        self.social.change(user, domain, action, conn, &mut self.fx)
    }

    /// Appears offline to everyone (`true`) or not; answered as [`Node::change_contact`].
    pub fn set_invisible(&mut self, _now: Instant, invisible: bool) -> u64 {
        let conn = self.link.open_conn();
        self.social.set_invisible(invisible, conn, &mut self.fx)
    }

    /// Asks the gateway for this user's contacts; answered as [`Node::change_contact`].
    pub fn fetch_contacts(&mut self, _now: Instant) -> u64 {
        let conn = self.link.open_conn();
        self.social.fetch(conn, &mut self.fx)
    }

    /// Watches the presence of `users` (replacing the watchlist): each one's state comes as
    /// a [`NodeEvent::Presence`] now and whenever it changes.
    pub fn watch(&mut self, _now: Instant, users: Vec<UserId>) {
        let conn = self.link.open_conn();
        self.social.watch(users, conn, &mut self.fx);
    }

    /// The user this device's certificate names.
    pub fn user(&self) -> UserId {
        self.config.certificate_user()
    }

    /// This device.
    pub fn device(&self) -> DeviceId {
        self.config.device
    }

    /// Connection status.
    pub fn status(&self) -> ConnectionStatus {
        self.link.status()
    }

    /// Highest seq delivered to the application in a conversation.
    pub fn cursor(&self, conversation: ConversationId) -> u64 {
        self.inbox.cursor(conversation)
    }

    /// Messages waiting for the gateway's acknowledgement.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// Members' addresses this device was told in its groups (see [`told_names`]).
    pub fn told_names(&self) -> &BTreeMap<UserId, crate::address::Address> {
        self.told_names.all()
    }

    /// Delivered messages the application has not taken yet (with `hold_until_taken`).
    pub fn unread_len(&self) -> usize {
        self.unread.len()
    }

    /// Counters.
    pub fn stats(&self) -> &NodeStats {
        &self.stats
    }

    /// True while a session is open.
    pub fn is_connected(&self) -> bool {
        self.link.is_open()
    }

    /// False while this device is connected and its gateway has not yet said, in this
    /// session, that it holds enough of the device's KeyPackages (it says so as the session
    /// opens, and answers every upload): a command that stops the node now would leave
    /// others unable to add this device, since the upload dies with the connection. A
    /// driver stopping for the command line waits (briefly) for this. Always true for a
    /// device without MLS or without a session.
    pub fn key_packages_settled(&self) -> bool {
        match (&self.mls, self.link.current_conn()) {
            (Some(_), Some(conn)) if self.link.is_open() => {
                self.key_packages_settled_on == Some(conn)
            }
            _ => true,
        }
    }

    /// This device's trust state (certificate, pinned root, CRL).
    pub fn trust(&self) -> &TrustHolder {
        self.trust.holder()
    }

    /// What this device brings to a device-to-device handshake (`trust::handshake`): its key,
    /// certificate, pinned root and CRL. `None` until it has registered.
    pub fn peer_identity(&self) -> Option<PeerIdentity<'_>> {
        let holder = self.trust.holder();
        Some(PeerIdentity {
            key: &self.config.key,
            certificate: holder.certificate()?,
            root: holder.root()?,
            crl: holder.crl(),
        })
    }

    /// This device's groups.
    pub fn groups(&self) -> Option<&DeviceGroups> {
        self.mls.as_ref().map(|m| &m.groups)
    }

    /// The device's MLS state, if it runs MLS.
    pub fn mls(&self) -> Option<&DeviceMls> {
        self.mls.as_ref().map(|m| &m.device)
    }

    /// When `handle_timeout` must next be called, if ever: the earliest of every timer.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// The writes and outputs produced so far, or `None`.
    pub fn poll_ready(&mut self) -> Option<Ready<NodeOutput>> {
        self.fx.take_ready()
    }

    /// The device's chunk store and the files it knows.
    pub fn files(&self) -> &files::DeviceFiles {
        &self.files
    }

    /// Uploads and offered files.
    pub fn transfers(&self) -> &transfers::NodeTransfers {
        &self.transfers
    }

    // ---- commands ----

    /// Starts sending a file into a conversation: `manifest` from cutting and sealing it
    /// (`files::ManifestBuilder`), `source` where the driver finds its bytes again (a path).
    /// Its chunks go first; the file message follows once the gateway holds them all
    /// ([`NodeEvent::FileSent`]). Durable: it resumes after a restart.
    pub fn send_file(
        &mut self,
        now: Instant,
        conversation: ConversationId,
        manifest: crate::files::Manifest,
        source: Bytes,
    ) -> Result<crate::files::UploadId, SendError> {
        if source.len() > transfers::SOURCE_BYTES_MAX {
            return Err(SendError::BodyTooLarge {
                len: source.len(),
                max: transfers::SOURCE_BYTES_MAX,
            });
        }
        // The same file into the same conversation while its upload is unfinished (the
        // command run again after a crash): that upload goes on.
        if let Some(upload) = self.transfers.upload_of(conversation, manifest.digest()) {
            return Ok(upload);
        }
        let mut id = [0u8; 16];
        self.entropy.fill_bytes(&mut id);
        let upload = crate::files::UploadId(id);
        let conn = self.link.open_conn();
        self.transfers.start_upload(
            now,
            conn,
            conversation,
            upload,
            manifest,
            source,
            &mut self.fx,
        );
        Ok(upload)
    }

    /// Fetches a file offered here ([`NodeEvent::FileOffered`]); durable, resumed after a
    /// restart. False if no such file was offered in that conversation.
    pub fn fetch_file(
        &mut self,
        now: Instant,
        conversation: ConversationId,
        digest: crate::files::ManifestDigest,
    ) -> bool {
        let conn = self.link.open_conn();
        let known =
            self.transfers
                .fetch(now, conn, conversation, digest, &self.files, &mut self.fx);
        self.send_receipts(now);
        known
    }

    /// The driver found this device's copy of chunk `hash` missing or damaged while saving a
    /// file. The chunk is dropped (durably) and each file that has it lacks it again: a
    /// complete one goes back to offered, so fetching it asks for the chunk anew (or says the
    /// gateway no longer holds it). Returns those files.
    pub fn chunk_lost(
        &mut self,
        _now: Instant,
        hash: crate::files::ContentHash,
    ) -> Vec<files::FileAt> {
        self.stats.chunks_lost += 1;
        let lacking = self.files.chunk_lost(hash, self.fx.writes());
        self.transfers.files_incomplete(&lacking, &mut self.fx);
        lacking
    }

    /// Gives up an upload the driver cannot go on with (its file changed or went since it was
    /// sent): nothing more of it is sent, and the application hears why.
    pub fn cancel_upload(&mut self, _now: Instant, upload: crate::files::UploadId, reason: String) {
        if let Some(failed) = self.transfers.upload_refused(upload, &mut self.fx) {
            self.fx.event(NodeEvent::FileSendFailed {
                conversation: failed.conversation,
                upload,
                code: ErrorCode::Unknown,
                message: reason,
            });
        }
    }

    /// Sends a finished upload's file message into its conversation.
    fn send_file_message(
        &mut self,
        now: Instant,
        conversation: ConversationId,
        message: crate::files::FileMessage,
    ) {
        let upload = message.upload;
        match self.send(now, conversation, Bytes::from(message.encode())) {
            Ok(msg_id) => {
                self.transfers.upload_finished(upload, &mut self.fx);
                self.transfers
                    .file_sent(conversation, &message.manifest, &mut self.fx);
                self.fx.event(NodeEvent::FileSent {
                    conversation,
                    upload,
                    msg_id,
                });
            }
            // Passing: the message goes at a later heartbeat (the upload stays until then,
            // durably, so a restart sends it too).
            Err(
                SendError::OutboxFull { .. } | SendError::Group(GroupError::ProposalPending(_)),
            ) => {
                self.stats.file_messages_waiting += 1;
            }
            Err(error) => {
                self.transfers.upload_finished(upload, &mut self.fx);
                self.fx.event(NodeEvent::FileSendFailed {
                    conversation,
                    upload,
                    code: ErrorCode::Unknown,
                    message: format!("the file's chunks are at the gateway, but its message could not be sent: {error}"),
                });
            }
        }
    }

    /// Queues a message for a conversation; it is sent now if connected, else after reconnect.
    pub fn send(
        &mut self,
        now: Instant,
        conversation: ConversationId,
        body: Bytes,
    ) -> Result<MsgId, SendError> {
        if self.outbox.is_full() {
            return Err(SendError::OutboxFull {
                max: self.outbox.len_max(),
            });
        }
        if body.len() > self.config.body_bytes_max {
            return Err(SendError::BodyTooLarge {
                len: body.len(),
                max: self.config.body_bytes_max,
            });
        }
        let msg_id = self.new_msg_id();
        let body = match &mut self.mls {
            Some(m) if m.groups.is_group(conversation) => m
                .groups
                .encrypt(conversation, msg_id, &body, &m.device, self.fx.writes())
                .map_err(SendError::Group)?,
            _ => body,
        };
        self.enqueue(now, conversation, msg_id, true, body, None);
        self.refresh_timers();
        Ok(msg_id)
    }

    fn new_msg_id(&mut self) -> MsgId {
        let mut id = [0u8; 16];
        self.entropy.fill_bytes(&mut id);
        MsgId::from_bytes(id)
    }

    /// Puts a message in the durable outbox and sends it if connected.
    /// An application message is `chained` in sender order; a group operation is not.
    fn enqueue(
        &mut self,
        now: Instant,
        conversation: ConversationId,
        msg_id: MsgId,
        chained: bool,
        body: Bytes,
        welcome: Option<Bytes>,
    ) {
        self.outbox.insert(
            msg_id,
            conversation,
            chained,
            body,
            welcome,
            self.fx.writes(),
        );
        if let Some(conn) = self.link.open_conn() {
            self.transmit(now, conn, msg_id);
        }
    }

    /// The application took (showed, stored) the message at `seq` of `conversation`: with
    /// `hold_until_taken`, it is forgotten and not delivered again. Taking twice is harmless.
    pub fn taken(&mut self, conversation: ConversationId, seq: u64) {
        self.unread.taken(conversation, seq, self.fx.writes());
    }

    /// Closes the session cleanly and stays offline until `go_online`.
    pub fn go_offline(&mut self, _now: Instant) {
        if let Some(conn) = self.link.stay_offline() {
            let goodbye = Goodbye {
                code: ErrorCode::Unknown as u16,
                message: "going offline".into(),
                retry_after_ms: None,
            };
            self.fx
                .send(conn, Routing::default(), Payload::Goodbye(goodbye));
            self.fx.hold(NodeOutput::Close(conn));
        }
        self.set_status(ConnectionStatus::Offline);
        self.refresh_timers();
    }

    /// Starts connecting again after `go_offline`.
    pub fn go_online(&mut self, now: Instant) {
        if self.link.go_online(now) {
            self.set_status(ConnectionStatus::Reconnecting { attempt: 0 });
        }
        self.refresh_timers();
    }

    /// Makes a pairing code's secret and this device's signed vouch for it, valid for
    /// `trust::pairing::PAIRING_TTL` from `now` (the gateway checks expiry on its wall clock,
    /// which `now` is in production). The vouch waits durably until the gateway has it: at once
    /// if a session is open, else at the next one. A new offer replaces an unsent one.
    pub fn offer_pairing(&mut self, now: Instant) -> PairingOffer {
        let offer =
            self.trust
                .offer_pairing(&self.config, now, self.entropy.as_mut(), &mut self.fx);
        self.send_pending_vouch(now);
        self.refresh_timers();
        offer
    }

    // ---- inputs ----

    /// Feeds one transport input. Then drain [`Node::poll_ready`].
    pub fn handle(&mut self, now: Instant, input: NodeInput) {
        self.route(now, input);
        self.send_receipts(now);
        self.refresh_timers();
    }

    /// Sends a receipt for every file completed since: in the same batch as the completion,
    /// so that a crash loses neither or both. One the group cannot take now (a removal
    /// waiting for its commit, a full outbox) waits on disk for a later input.
    fn send_receipts(&mut self, now: Instant) {
        for (conversation, digest) in self.transfers.take_receipts_owed() {
            let receipt = files::Receipt::sign(&self.config.key, digest);
            match self.send(now, conversation, Bytes::from(receipt.encode_message())) {
                Ok(_) => self.stats.receipts_sent += 1,
                Err(
                    SendError::OutboxFull { .. } | SendError::Group(GroupError::ProposalPending(_)),
                ) => {
                    self.transfers
                        .receipt_waits(conversation, digest, &mut self.fx);
                    continue;
                }
                Err(_) => self.stats.receipts_unsent += 1,
            }
            // A receipt that had waited on disk is owed no more (for one sent with its
            // completion this deletes nothing).
            self.transfers
                .receipt_settled(conversation, digest, &mut self.fx);
        }
    }

    fn route(&mut self, now: Instant, input: NodeInput) {
        match input {
            NodeInput::Connected(conn) => {
                if !self.link.connected(now, conn) {
                    self.fx.hold(NodeOutput::Close(conn));
                    return;
                }
                if self.trust.holder().certificate().is_some() {
                    self.send_hello(now, conn);
                } else {
                    let routing = Routing {
                        sender: self.config.device,
                        ..Routing::default()
                    };
                    let register = self.trust.register(&self.config);
                    self.fx.send(conn, routing, register);
                }
            }
            NodeInput::ConnectFailed => {
                if self.link.is_connecting() {
                    self.schedule_reconnect(now);
                }
            }
            NodeInput::Closed(conn) => {
                if self.link.current_conn() == Some(conn) {
                    self.schedule_reconnect(now);
                }
            }
            NodeInput::Chunk { conn, head, body } => {
                if self.link.open_conn() != Some(conn) {
                    return; // a late stream from a connection we already left
                }
                let Ok(Frame {
                    routing,
                    payload: Payload::Chunk(head),
                    ..
                }) = Frame::decode(&head, PAYLOAD_BYTES_MAX)
                else {
                    self.stats.bad_chunk_streams += 1;
                    return;
                };
                self.transfers.on_chunk(
                    now,
                    conn,
                    routing.conversation,
                    crate::files::UploadId(head.upload),
                    head.chunk_id(),
                    body,
                    &mut self.files,
                    &mut self.fx,
                );
            }
            NodeInput::Frame(conn, bytes) => {
                if self.link.current_conn() != Some(conn) {
                    return; // a late frame from a connection we already left
                }
                match Frame::decode(&bytes, PAYLOAD_BYTES_MAX) {
                    Ok(frame) => self.handle_frame(now, conn, frame),
                    Err(e) => {
                        // A gateway that sends what this device cannot read speaks a newer
                        // protocol, or is broken: start over, backing off as after a refusal,
                        // so that one that does it in every session is not asked again in a
                        // tight loop; and say so once.
                        self.stats.unreadable_frames += 1;
                        self.fx.hold(NodeOutput::Close(conn));
                        self.link.refused(now);
                        if !self.told_unreadable {
                            self.told_unreadable = true;
                            self.fx.event(NodeEvent::Refused {
                                code: ErrorCode::MalformedFrame,
                                message: format!(
                                    "the gateway sent a frame this device cannot read ({e}); it keeps trying, waiting longer each time. If the gateway was upgraded, upgrade sund too"
                                ),
                            });
                        }
                        self.schedule_reconnect(now);
                    }
                }
            }
        }
    }

    /// Runs every timer due at `now` (see `timers`).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.fire_timers(now);
        self.send_receipts(now);
    }

    /// A link timer is due: connect, give up on a dead connection, or beat.
    fn on_link_timeout(&mut self, now: Instant) {
        match self.link.on_timeout(now) {
            LinkDue::Nothing => {}
            LinkDue::Connect => self.fx.hold(NodeOutput::Connect),
            LinkDue::Dead(conn) => {
                self.fx.hold(NodeOutput::Close(conn));
                self.schedule_reconnect(now);
            }
            LinkDue::HelloAgain(conn) => self.send_hello_again(conn),
            LinkDue::Heartbeat(conn, beat) => {
                self.round_trip.beat_sent(beat.nonce, now);
                self.fx
                    .send(conn, Routing::default(), Payload::Heartbeat(beat));
                // A periodic nudge for group work that waits on no timer of its own (a
                // KeyPackage fetch the gateway rate-limited is asked again here), and for
                // chunks the gateway could not serve a moment ago.
                self.drive_groups(now);
                let stall = self.config.transfer_stall;
                let waiting = self
                    .transfers
                    .retry(now, stall, conn, &self.files, &mut self.fx);
                for (conversation, message) in waiting {
                    self.send_file_message(now, conversation, message);
                }
            }
        }
    }

    fn handle_frame(&mut self, now: Instant, conn: ConnectionId, frame: Frame) {
        self.link.heard(now);
        let routing = frame.routing;
        match frame.payload {
            Payload::Challenge(challenge) => {
                if !self.link.is_handshaking() {
                    return;
                }
                self.link.handshake_answered(now);
                let message = session_proof_message(&challenge.nonce, self.config.device);
                let signature = self.config.key.sign(&message);
                self.fx.send(
                    conn,
                    Routing::default(),
                    Payload::Proof(Proof { signature }),
                );
            }
            Payload::HelloOk(ok) if self.link.is_handshaking() => self.opened(now, conn, ok),
            Payload::Crl(crl) => self.on_crl(now, &crl.crl),
            Payload::Certificate(answer) if self.link.is_handshaking() => {
                if self
                    .trust
                    .on_certificate(&self.config, &answer, &mut self.fx)
                {
                    self.bind_mls_to_trust();
                    self.send_hello(now, conn);
                } else {
                    self.fx.hold(NodeOutput::Close(conn));
                    self.schedule_reconnect(now);
                }
            }
            Payload::Certificate(answer) if self.link.is_open() => {
                let renewed = self.trust.on_renewed(&self.config, &answer, &mut self.fx);
                if renewed {
                    self.bind_mls_to_trust();
                }
            }
            _ if !self.link.is_open() => {
                // Before HelloOk only a challenge, a token refusal or a goodbye make sense.
                // A refused resume token is kept until the next `HelloOk` brings a new one:
                // the challenge follows at once, and each `Hello` until then still shows the
                // gateway the run of this device's last session (what it may have read).
                match frame.payload {
                    Payload::Goodbye(goodbye) => self.refused(now, conn, &goodbye),
                    Payload::Deliver(_) | Payload::SendAck(_) | Payload::KeyPackageCount(_)
                        if self.link.is_handshaking() =>
                    {
                        self.hello_ok_overdue(now, conn);
                    }
                    // A `Hello` sent again after the gateway had opened the session (its
                    // `HelloOk` lost): the same.
                    Payload::Error(report)
                        if self.link.is_handshaking()
                            && ErrorCode::from_u16(report.code) == ErrorCode::UnexpectedOpcode =>
                    {
                        self.hello_ok_overdue(now, conn);
                    }
                    _ => {}
                }
            }
            Payload::Heartbeat(beat) => {
                self.fx
                    .send(conn, Routing::default(), Payload::HeartbeatAck(beat));
            }
            Payload::HeartbeatAck(ack) => {
                self.round_trip.beat_answered(ack.nonce, now);
                self.renew_if_due(now, conn);
                self.social
                    .on_heartbeat(ack.presence, ack.contacts, conn, &mut self.fx);
                let roots_held = self
                    .trust
                    .holder()
                    .peer_roots()
                    .map_or(0, crate::trust::peer_roots::PeerRoots::digest);
                if ack.peer_roots.is_some_and(|d| d != roots_held) {
                    // A pushed set of peer roots was lost on the way: ask for it.
                    let ask = crate::wire::payload::PeerRootsUpdate {
                        roots: Vec::new().into(),
                    };
                    self.fx
                        .send(conn, Routing::default(), Payload::PeerRoots(ask));
                }
                let held = self.trust.holder().crl_version();
                if ack.crl_version.is_some_and(|v| v > held) {
                    let fetch = CrlFetch {
                        have_version: held,
                        peers: None,
                    };
                    self.fx
                        .send(conn, Routing::default(), Payload::CrlFetch(fetch));
                }
                if ack.peer_crls.is_some()
                    && ack.peer_crls != self.trust.holder().peer_crls_digest()
                {
                    // Another domain's CRL was revised and this device missed it (or it
                    // connected since): ask for them all.
                    let fetch = CrlFetch {
                        have_version: held,
                        peers: Some(true),
                    };
                    self.fx
                        .send(conn, Routing::default(), Payload::CrlFetch(fetch));
                }
            }
            Payload::UploadStatus(status) => {
                if let Some((conv, message)) =
                    self.transfers.on_status(now, conn, status, &mut self.fx)
                {
                    self.send_file_message(now, conv, message);
                }
            }
            Payload::ChunkAck(ack) => {
                if let Some((conv, message)) = self.transfers.on_ack(now, conn, ack, &mut self.fx) {
                    self.send_file_message(now, conv, message);
                }
            }
            Payload::ChunksUnavailable(answer) => {
                self.transfers.on_unavailable(routing.conversation, answer);
            }
            // A file operation refused because this device is no longer in the conversation
            // (a removal it has not read yet): its transfers there end, each with its reason.
            Payload::Error(report)
                if report.msg_id.is_some_and(|id| {
                    let upload = crate::files::UploadId(id);
                    self.transfers.knows_upload(routing.conversation, upload)
                }) && matches!(
                    ErrorCode::from_u16(report.code),
                    ErrorCode::NotMember | ErrorCode::UnknownConversation
                ) =>
            {
                self.transfers
                    .conversation_left(routing.conversation, &mut self.fx);
            }
            Payload::Error(report)
                if report.msg_id.is_some()
                    && matches!(
                        ErrorCode::from_u16(report.code),
                        ErrorCode::QuotaExceeded
                            | ErrorCode::UploadRefused
                            | ErrorCode::ChunkRefused
                            | ErrorCode::NoSuchUpload
                    ) =>
            {
                self.file_refused(now, conn, routing.conversation, report);
            }
            Payload::SendAck(ack) => {
                let msg_id = MsgId::from_bytes(ack.msg_id);
                self.settle(now, routing.conversation, msg_id, routing.seq);
                self.send_paced(now);
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
                self.skip_missing(conn, routing.conversation, routing.seq, Missing::Expired);
            }
            Payload::Error(report)
                if ErrorCode::from_u16(report.code) == ErrorCode::HistoryLost =>
            {
                self.skip_missing(conn, routing.conversation, routing.seq, Missing::Lost);
            }
            Payload::Error(report)
                if ErrorCode::from_u16(report.code) == ErrorCode::HistoryDiverged =>
            {
                // What we read up to our cursor differs from what the gateway holds there: it
                // lost what we read. We keep it, and read on after our cursor; the message id
                // at our cursor no longer matches the gateway's, so it is forgotten.
                // The notice comes again until acknowledged (its delivery waits for that): the
                // user hears it once, while the cursor still names the message it read.
                let conv = routing.conversation;
                let cursor = self.inbox.cursor(conv);
                if self.inbox.last_read(conv).is_some() {
                    self.inbox.set_cursor(conv, cursor, self.fx.writes());
                    self.fx.event(NodeEvent::HistoryDiverged {
                        conversation: conv,
                        upto: routing.seq,
                    });
                }
                self.ack(conn, conv, cursor);
            }
            Payload::PairVouched(answer) => self.trust.on_vouched(&answer.secret, &mut self.fx),
            Payload::Error(report)
                if ErrorCode::from_u16(report.code) == ErrorCode::PairingRefused =>
            {
                self.trust.on_vouch_refused(report, &mut self.fx);
            }
            Payload::DeviceLinked(linked) => {
                self.trust
                    .on_device_linked(&self.config, &linked, &mut self.fx);
            }
            Payload::PeerRoots(update) => self.take_peer_roots(now, &update.roots),
            Payload::KeyPackageCount(count) => self.replenish(now, conn, count),
            Payload::KeyPackages(answer) => {
                let exhausted = answer.exhausted.len();
                self.on_key_packages(now, routing.seq, answer.found, exhausted)
            }
            Payload::Welcome(welcome) => self.on_welcome(now, routing.conversation, welcome),
            Payload::Removed(removed) => self.on_removed(now, routing.conversation, removed.seq),
            Payload::Contacts(listing) => {
                self.social.on_contacts(routing.seq, listing, &mut self.fx);
            }
            Payload::PresenceNotify(notify) => {
                self.social.on_presence(routing.seq, notify, &mut self.fx);
            }
            Payload::Error(report)
                if routing.conversation == ConversationId(0)
                    && social::NodeSocial::owns(routing.seq) =>
            {
                self.social
                    .on_error(now, routing.seq, &report, &mut self.fx);
            }
            Payload::Error(report) => self.on_error(now, routing, report),
            Payload::Goodbye(goodbye) => self.refused(now, conn, &goodbye),
            _ => {} // frames meant for gateways are ignored
        }
    }

    /// The gateway's session on `conn` is open, but its `HelloOk` was lost (a QUIC stream would
    /// not lose it; the simulator's frames can) or is overtaken: a moment more, then a new
    /// connection, rather than the whole handshake timeout (15 s).
    fn hello_ok_overdue(&mut self, now: Instant, conn: ConnectionId) {
        let grace = HELLO_OK_GRACE.max(self.round_trip.estimate());
        self.link.hello_ok_overdue(conn, now + grace);
    }

    /// An error frame on the open session.
    fn on_error(&mut self, now: Instant, routing: Routing, report: ErrorReport) {
        let code = ErrorCode::from_u16(report.code);
        if code == ErrorCode::SenderOutOfOrder {
            let last = MsgId::from_bytes(report.after.unwrap_or_default());
            match report.msg_id.map(MsgId::from_bytes) {
                Some(held) if report.held == Some(true) => {
                    self.fill_sender_gap(now, routing.conversation, held, last);
                }
                refused => self.resync_sender_order(now, routing.conversation, last, refused),
            }
            return;
        }
        if matches!(code, ErrorCode::AuthorityMoving | ErrorCode::PeerLimited) {
            if let Some(id) = report.msg_id.map(MsgId::from_bytes) {
                self.defer_conversation(now, id, code, &report);
            }
            return;
        }
        if code == ErrorCode::KeyPackageRejected {
            self.stats.key_package_failures += 1;
            if let Some(m) = &mut self.mls {
                m.device.upload_abandoned();
            }
        }
        if matches!(
            code,
            ErrorCode::SendsLimited
                | ErrorCode::ConversationsLimited
                | ErrorCode::InvitationsLimited
        ) {
            if let Some(id) = report.msg_id.map(MsgId::from_bytes) {
                self.throttle(now, id, code, &report);
            }
            return;
        }
        let fetch_refused_for_now = matches!(
            code,
            ErrorCode::RateLimited | ErrorCode::PeerLimited | ErrorCode::PeerUnreachable
        );
        if code == ErrorCode::UnknownDomain && report.msg_id.is_none() {
            // A fetch of users of a domain the gateway does not federate with: the change
            // that waited for it cannot be made.
            let conversation = self
                .mls
                .as_mut()
                .and_then(|m| m.groups.fetch_failed(routing.seq, self.fx.writes()));
            if let Some(conversation) = conversation {
                self.fx.event(NodeEvent::GroupChangeRefused {
                    conversation,
                    code,
                    message: report.message.clone(),
                });
            }
            self.drive_groups(now);
        }
        if fetch_refused_for_now && report.msg_id.is_none() {
            // Only KeyPackage fetches are refused for now without a message id (by the
            // gateway's limit, or another domain's gateway's, or while that one is not
            // reachable): the waiting group tries again at its next chance.
            let conversation = self
                .mls
                .as_mut()
                .and_then(|m| m.groups.fetch_refused(routing.seq));
            // Another domain's gateway out of reach or pacing this one is worth telling: the
            // change waits on something this device's own gateway cannot help. (This
            // gateway's own limit on fetches is a pause of a second or so.)
            if let (Some(conversation), true) = (conversation, code != ErrorCode::RateLimited) {
                self.fx.event(NodeEvent::GroupChangeDelayed {
                    conversation,
                    code,
                    message: report.message.clone(),
                });
            }
        }
        let stale_message = code == ErrorCode::StaleEpoch
            && report.msg_id.is_some_and(|id| {
                self.mls
                    .as_ref()
                    .is_some_and(|m| m.groups.is_own_message(MsgId::from_bytes(id)))
            });
        if let (true, Some(id)) = (stale_message, report.msg_id) {
            // Our application message was made before the group's current epoch: it stays in
            // the outbox and is encrypted again once we are there.
            let id = MsgId::from_bytes(id);
            let conv = routing.conversation;
            let sent_in = |out: &outbox::Outgoing| {
                crate::mls::commit_authority::read_framing(&out.body)
                    .ok()
                    .map(|f| f.epoch)
            };
            // Only what still waits: a late refusal of a copy of a message acknowledged or
            // refused since changes nothing.
            let mut stale: Vec<(MsgId, Option<u64>)> = self
                .outbox
                .get(id)
                .map(|out| (id, sent_in(out)))
                .into_iter()
                .collect();
            // What waits behind it in sender order was made no later, and would be refused
            // the same way once its turn comes: encrypt it again now, all together.
            for other in self.outbox.ids_in(conv) {
                let Some(out) = self.outbox.get(other).filter(|o| o.chained && other != id) else {
                    continue;
                };
                let epoch = sent_in(out);
                if epoch.is_some_and(|e| e < routing.epoch) {
                    stale.push((other, epoch));
                }
            }
            let m = self.mls.as_mut().expect("checked above");
            for (msg_id, epoch) in stale {
                if m.groups.is_own_message(msg_id) {
                    m.groups.message_stale(conv, msg_id, routing.epoch, epoch);
                }
            }
            self.drive_groups(now);
        } else if let Some(id) = report.msg_id.map(MsgId::from_bytes) {
            let refused = matches!(
                code,
                ErrorCode::NotMember
                    | ErrorCode::UnknownConversation
                    | ErrorCode::StaleEpoch
                    | ErrorCode::Forbidden
                    | ErrorCode::InvalidGroupMessage
                    | ErrorCode::InvitationTooLarge
                    | ErrorCode::ConversationQuota
                    // A DM with a domain the gateway does not federate with.
                    | ErrorCode::UnknownDomain
            );
            if refused && self.outbox.remove(id, self.fx.writes()).is_some() {
                self.group_message_refused(now, routing, id, code, &report.message);
                self.fx.event(NodeEvent::Rejected { msg_id: id, code });
                // What came after it named it: chained anew, it goes again.
                self.retransmit_conversation(now, routing.conversation);
            }
        }
    }

    // ---- sending ----

    /// The gateway says `last` is the last message of this device it sequenced in `conv`, and
    /// refused one that named another: send what waits there again, chained from `last` (see
    /// `outbox`). If `last` is itself waiting, its acknowledgement is on the way and what waits
    /// is merely in flight or lost: it goes again at most once per `replay_request_interval`,
    /// however many later messages the gateway turned away meanwhile.
    fn resync_sender_order(
        &mut self,
        now: Instant,
        conv: ConversationId,
        last: MsgId,
        refused: Option<MsgId>,
    ) {
        let waiting = self.outbox.get(last).is_some();
        let rechained = !waiting && self.outbox.chain_after(conv, last, self.fx.writes());
        if let (true, Some(refused)) = (
            rechained,
            refused.filter(|id| self.outbox.get(*id).is_some()),
        ) {
            // The chain starts elsewhere now: only its head names another message than its
            // copies on the way did, and the gateway holds what comes after it until it
            // does. What waits up to the refused message goes again; the rest is on its way
            // (sending everything again at every such refusal, while the gateway's last moved
            // on through a burst, sent a backlog of 1,097 messages dozens of times: swarm
            // seed 71).
            self.stats.sender_resyncs += 1;
            self.sender_resync_at.insert(conv, now);
            let Some(conn) = self.link.open_conn() else {
                return;
            };
            for msg_id in self.outbox.ids_in(conv) {
                self.transmit(now, conn, msg_id);
                if msg_id == refused {
                    break;
                }
            }
            return;
        }
        if !rechained {
            // Refusals keep coming for the copies sent before the last resync until its own
            // copies arrive: one resync per round trip (on a slow link's long queue, one per
            // `replay_request_interval` sent the whole backlog again and again: plain swarm
            // seed 502431).
            let gap = self
                .config
                .replay_request_interval
                .max(self.round_trip.estimate());
            let recent = self
                .sender_resync_at
                .get(&conv)
                .is_some_and(|&at| now < at + gap);
            if recent {
                return;
            }
        }
        self.stats.sender_resyncs += 1;
        self.sender_resync_at.insert(conv, now);
        self.retransmit_conversation(now, conv);
    }

    /// The gateway holds our `held` message in `conv` until the one before it comes (it was
    /// lost on the way, or is late): that one goes again, unless it went out after `held` and
    /// within a round trip (see [`Outbox::missing_before`]). If more were lost, the gateway
    /// holds the one sent again and tells of the next gap. The notice's `last` (the gateway's
    /// last sequenced from us) matters only when nothing of ours waits before `held`: then
    /// what it lacks is where our chain starts (the gateway lost it, or sequenced one we
    /// forgot), and everything goes again from its last. Otherwise it is not acted on: notices
    /// of a burst of gaps cross the acknowledgements, so it is often older than what we know,
    /// and taking it as the chain's start sent the whole backlog again for each (swarm seed
    /// 71); a chain that starts elsewhere shows at its head.
    fn fill_sender_gap(&mut self, now: Instant, conv: ConversationId, held: MsgId, last: MsgId) {
        if self.outbox.get(held).is_none() {
            return; // a late notice about a message settled since
        }
        let start = self.outbox.last_sequenced(conv);
        let at_head = self.outbox.after(held) == Some(start);
        if at_head && start != last && self.outbox.get(last).is_none() {
            self.resync_sender_order(now, conv, last, None);
            return;
        }
        // An answer: the link carries what we send, whatever the resend timer thought. What
        // waits in the conversation is answered only once the gap fills: those answers must
        // not teach the round trip (a message held for seconds is no sign of a slow link).
        self.round_trip.answered();
        self.outbox.answers_delayed(conv);
        let sent_by = now - self.round_trip.estimate();
        let Some(missing) = self.outbox.missing_before(held, sent_by) else {
            return;
        };
        let Some(conn) = self.link.open_conn() else {
            return;
        };
        self.stats.sender_gaps_filled += 1;
        self.transmit(now, conn, missing);
    }

    /// Sends every message waiting in `conv` again, in order (each names the one before it).
    fn retransmit_conversation(&mut self, now: Instant, conv: ConversationId) {
        let Some(conn) = self.link.open_conn() else {
            return;
        };
        for msg_id in self.outbox.ids_in(conv) {
            self.transmit(now, conn, msg_id);
        }
    }

    /// The gateway refused our `msg_id` because its conversation's authority is moving to
    /// another gateway (an operator's handover, `authority_moving`), or is another domain's
    /// gateway that takes no more from ours for a while (`peer_limited`): it and what waits
    /// behind it in that conversation (refused likewise) go again once the hint has passed,
    /// in order. Other conversations are not held up, and this device was not over a limit.
    fn defer_conversation(
        &mut self,
        now: Instant,
        msg_id: MsgId,
        code: ErrorCode,
        report: &ErrorReport,
    ) {
        let Some(conv) = self.outbox.get(msg_id).map(|out| out.conversation) else {
            return; // a late refusal of a copy of a message settled since
        };
        if code == ErrorCode::PeerLimited {
            self.stats.peer_limited += 1;
            // A backlog goes again from its head, a window at a time (as after our own rate
            // limit), not all at once to be refused again.
            self.pacing = Some(self.pacing.unwrap_or(PACING_START).min(PACING_START));
        } else {
            self.stats.authority_moving += 1;
        }
        let wait = report
            .retry_after_ms
            .map_or(AUTHORITY_MOVING_DEFAULT, |ms| {
                Duration::from_millis(u64::from(ms))
            });
        let mut behind = false;
        for id in self.outbox.ids_in(conv) {
            behind |= id == msg_id;
            if behind {
                self.outbox.unsend(id);
            }
        }
        let until = now + wait;
        let at = self.deferred.entry(conv).or_insert(until);
        *at = (*at).max(until);
    }

    /// The gateway refused our `msg_id` by a rate limit: it stays in the outbox, and nothing
    /// (of its conversation, for a limit on invitations or new conversations) goes out until
    /// the hint has passed; then everything waiting goes, in order.
    fn throttle(&mut self, now: Instant, msg_id: MsgId, code: ErrorCode, report: &ErrorReport) {
        if self.outbox.get(msg_id).is_none() {
            return; // a late refusal of a copy of a message settled since
        }
        self.stats.throttled += 1;
        // Older gateways send no hint: a second is what their limits refill in.
        let wait = report
            .retry_after_ms
            .map_or(THROTTLE_DEFAULT, |ms| Duration::from_millis(u64::from(ms)));
        // It and what waits behind it in its conversation (the gateway refuses those as out
        // of order) go again, in order, when the pause ends.
        let conv = self.outbox.get(msg_id).map(|out| out.conversation);
        let mut behind = false;
        for id in conv.map(|c| self.outbox.ids_in(c)).unwrap_or_default() {
            behind |= id == msg_id;
            if behind {
                self.outbox.unsend(id);
            }
        }
        let until = now + wait;
        // The send limit is the device's: everything waits. The limits on invitations and
        // on new conversations hold back only the conversation they refused a change in, so
        // the user's other conversations go on.
        let per_conversation = matches!(
            code,
            ErrorCode::InvitationsLimited | ErrorCode::ConversationsLimited
        );
        let paused = match (per_conversation, conv) {
            (true, Some(conv)) => {
                let paused = self.deferred.get(&conv).is_some_and(|&at| now < at);
                let at = self.deferred.entry(conv).or_insert(until);
                *at = (*at).max(until);
                paused
            }
            _ => {
                let paused = self.throttled_until.is_some_and(|at| now < at);
                if !paused {
                    self.pacing = Some(self.pacing.unwrap_or(PACING_START).min(PACING_START));
                }
                self.throttled_until = Some(self.throttled_until.map_or(until, |at| at.max(until)));
                paused
            }
        };
        if !paused {
            self.fx.event(NodeEvent::Throttled {
                code,
                retry_after: wait,
                message: report.message.clone(),
            });
        }
    }

    /// After a rate limit: sends what waits within the pace, in order.
    fn send_paced(&mut self, now: Instant) {
        let Some(cap) = self.pacing else {
            return;
        };
        if self.throttled(now) {
            return;
        }
        let Some(conn) = self.link.open_conn() else {
            return;
        };
        for msg_id in self.outbox.leading_unsent(cap) {
            self.transmit(now, conn, msg_id);
        }
    }

    /// True while the gateway's rate limit holds this device's messages back.
    fn throttled(&self, now: Instant) -> bool {
        self.throttled_until.is_some_and(|at| now < at)
    }

    fn transmit(&mut self, now: Instant, conn: ConnectionId, msg_id: MsgId) {
        let over_pace = self
            .pacing
            .is_some_and(|cap| !self.outbox.is_leading(msg_id, cap));
        let deferred = self
            .outbox
            .get(msg_id)
            .and_then(|out| self.deferred.get(&out.conversation))
            .is_some_and(|&until| now < until);
        if self.throttled(now) || over_pace || deferred {
            // Goes with the rest when the pause ends (see `timers`), or as acknowledgements
            // make room (`send_paced`).
            self.outbox.unsend(msg_id);
            return;
        }
        let (frame, conversation, resend) = self.outbox.transmit(now, self.config.device, msg_id);
        if resend {
            self.stats.resends += 1;
        }
        let output = NodeOutput::Send(conn, frame);
        let group = self
            .mls
            .as_ref()
            .is_some_and(|m| m.groups.is_group(conversation));
        if group {
            // Held: an MLS message leaves only once the state it advanced is durable. A commit
            // the gateway accepted but we forgot would fork us from the group, and a ratchet
            // generation used twice would reuse a key and nonce.
            self.fx.hold(output);
        } else {
            // Eager: the gateway deduplicates on the message id, so the frame may leave before
            // the outbox entry is durable. A crash in between loses only a message whose `send`
            // had not returned yet; one the gateway accepted is delivered either way.
            self.fx.eager(output);
        }
    }

    fn resend_stale(&mut self, now: Instant, conn: ConnectionId) {
        let resends = self.stats.resends;
        for msg_id in self.outbox.stale(now, self.resend_after()) {
            self.transmit(now, conn, msg_id);
        }
        if self.stats.resends > resends {
            // Sent again for want of an answer: wait twice as long next time, until one comes.
            self.round_trip.timed_out();
        }
    }

    /// How long a transmitted message waits for an answer before it goes again: the
    /// configured `resend_after`, or longer on a link whose answers take longer (see
    /// [`round_trip`]).
    pub(super) fn resend_after(&self) -> Duration {
        self.round_trip.resend_after(self.config.resend_after)
    }

    /// The gateway sequenced our `msg_id` at `seq`: it leaves the outbox.
    fn settle(&mut self, now: Instant, conv: ConversationId, msg_id: MsgId, seq: u64) {
        if self.outbox.get(msg_id).is_some_and(|out| out.chained) {
            self.outbox.sequenced(conv, msg_id, seq, self.fx.writes());
        }
        if let Some(out) = self.outbox.remove(msg_id, self.fx.writes()) {
            match out.answered_once(now) {
                Some(round_trip) => self.round_trip.sample(round_trip),
                None => self.round_trip.answered(),
            }
            debug_assert!(
                conv == out.conversation,
                "a message settles in its own conversation"
            );
            // Each acknowledgement widens the pace by one, until it needs none.
            self.pacing = self
                .pacing
                .map(|cap| cap + 1)
                .filter(|&cap| cap < PACING_MAX);
            self.fx.event(NodeEvent::Accepted {
                conversation: out.conversation,
                msg_id,
                seq,
            });
        }
    }

    // ---- receiving ----

    fn ack(&mut self, conn: ConnectionId, conv: ConversationId, seq: u64) {
        let routing = Routing {
            conversation: conv,
            seq,
            ..Routing::default()
        };
        if self.config.planted == Some(crate::planted::PlantedBug::NodeAckBeforeDurable) {
            // Planted by the simulator: never in a real device.
            let frame = Frame::new(routing, Payload::Ack(Ack {})).encode();
            self.fx.eager(NodeOutput::Send(conn, frame));
        } else {
            self.fx.send(conn, routing, Payload::Ack(Ack {}));
        }
    }

    /// The gateway no longer holds anything before `first_available`: report the gap and move
    /// the cursor past it.
    /// The gateway says what comes before `first_available` is gone (expired, or lost by the
    /// gateway): the user is told, and reading goes on after it.
    fn skip_missing(
        &mut self,
        conn: ConnectionId,
        conv: ConversationId,
        first_available: u64,
        why: Missing,
    ) {
        let cursor = self.inbox.cursor(conv);
        if first_available <= cursor + 1 {
            return; // nothing of ours is missing
        }
        let to = first_available - 1;
        let from = cursor + 1;
        self.fx.event(match why {
            Missing::Expired => NodeEvent::Gap {
                conversation: conv,
                from,
                to,
            },
            Missing::Lost => NodeEvent::HistoryLost {
                conversation: conv,
                from,
                to,
            },
        });
        self.inbox.set_cursor(conv, to, self.fx.writes());
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
            self.settle(now, conv, inbound.msg_id, seq);
            // It widens the pace as an acknowledgement does, so what waits behind goes: when
            // every acknowledgement of a paced window was lost, nothing else would send it.
            self.send_paced(now);
        }
        let cursor = self.inbox.cursor(conv);
        if seq <= cursor {
            self.stats.duplicate_deliveries += 1;
            self.ack(conn, conv, cursor);
            return;
        }
        if seq > cursor + 1 {
            if self.inbox.hold(now, conv, seq, inbound) {
                self.stats.replay_requests += 1;
                let routing = Routing {
                    conversation: conv,
                    ..Routing::default()
                };
                let request = ReplayRequest {
                    from_seq: cursor + 1,
                };
                self.fx.send(conn, routing, Payload::ReplayRequest(request));
            }
            return;
        }
        let mut next = seq;
        let mut item = inbound;
        let mut group_changed = false;
        let mut last_read = None;
        loop {
            let event = match self.process(conv, next, &item) {
                Ok(event) => event,
                Err(reason) => {
                    // Parked until its gateway vouches for the root it needs (or the gateway
                    // sends it again): nothing after it is read before it.
                    self.inbox.park(conv, next, item);
                    self.stats.deliveries_parked += 1;
                    self.fx.event(NodeEvent::JoinWaiting {
                        conversation: conv,
                        reason,
                    });
                    next -= 1;
                    break;
                }
            };
            last_read = Some(item.msg_id);
            group_changed |= matches!(
                event,
                Some(
                    NodeEvent::GroupChanged { .. }
                        | NodeEvent::RemovalProposed { .. }
                        | NodeEvent::ExternalSenderProposed { .. }
                )
            );
            if let Some(NodeEvent::Delivered {
                conversation,
                sender,
                body,
                ..
            }) = &event
            {
                self.note_file(*conversation, *sender, body);
            }
            if let Some(event) = event {
                if self.config.hold_until_taken && matches!(event, NodeEvent::Delivered { .. }) {
                    self.unread.keep(&event, self.fx.writes());
                }
                self.fx.event(event);
            }
            match self.inbox.take(conv, next + 1) {
                Some(buffered) => {
                    next += 1;
                    item = buffered;
                }
                None => break,
            }
        }
        let Some(last_read) = last_read else {
            return; // the first one waits: nothing was read
        };
        debug_assert!(next > cursor, "cursor only moves forward");
        self.inbox
            .set_cursor_read(conv, next, last_read, self.fx.writes());
        self.ack(conn, conv, next);
        if group_changed {
            self.drive_groups(now);
        }
    }

    /// A delivered body that is a file message: the file is offered to this device.
    fn note_file(&mut self, conversation: ConversationId, sender: DeviceId, body: &[u8]) {
        if sender == self.config.device {
            return; // its own file: the bytes are where it sent them from
        }
        if let Some(receipt) = files::Receipt::decode_message(body) {
            self.note_receipt(conversation, sender, receipt);
            return;
        }
        match crate::files::FileMessage::decode(body) {
            None => {}
            Some(Ok(message)) => {
                let conn = self.link.open_conn();
                self.transfers.offered(
                    conn,
                    conversation,
                    sender,
                    message,
                    &mut self.files,
                    &mut self.fx,
                );
            }
            Some(Err(error)) => {
                self.stats.bad_file_messages += 1;
                self.fx.event(NodeEvent::FileFailed {
                    conversation,
                    digest: crate::files::ManifestDigest([0; 32]),
                    reason: format!("a member sent a file this device refuses: {error}"),
                });
            }
        }
    }

    /// A receipt in `conversation` from `sender`: kept if it is for a file this device sent
    /// and names its sender; verified against the key of the sender's certificate in the
    /// group.
    fn note_receipt(
        &mut self,
        conversation: ConversationId,
        sender: DeviceId,
        receipt: Option<files::Receipt>,
    ) {
        let Some(receipt) = receipt.filter(|r| r.device == sender) else {
            self.stats.receipts_refused += 1;
            return;
        };
        let key = self
            .mls
            .as_ref()
            .and_then(|m| m.groups.member_key(conversation, sender));
        let verified = match key {
            Some(key) if receipt.verify(&key) => true,
            Some(_) => {
                self.stats.receipts_refused += 1;
                return;
            }
            None => false,
        };
        let digest = receipt.digest;
        if self
            .transfers
            .receipt(conversation, digest, sender, verified, &mut self.fx)
        {
            self.fx.event(NodeEvent::FileReceipt {
                conversation,
                digest,
                device: sender,
                verified,
            });
        }
    }

    /// The gateway refused something of an upload (its `msg_id` names the upload): an
    /// expired upload is opened again; any other refusal ends the upload.
    fn file_refused(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        conversation: ConversationId,
        report: ErrorReport,
    ) {
        let upload = crate::files::UploadId(report.msg_id.expect("matched"));
        let code = ErrorCode::from_u16(report.code);
        if code == ErrorCode::NoSuchUpload {
            self.transfers
                .upload_gone(now, conn, conversation, upload, &mut self.fx);
            return;
        }
        if let Some(failed) = self.transfers.upload_refused(upload, &mut self.fx) {
            self.fx.event(NodeEvent::FileSendFailed {
                conversation: failed.conversation,
                upload,
                code,
                message: report.message,
            });
        }
    }

    /// What the application hears of the message at `seq`: the body itself in a plain
    /// conversation; in a group, the decrypted message or the commit's effect.
    fn process(
        &mut self,
        conv: ConversationId,
        seq: u64,
        item: &Inbound,
    ) -> Result<Option<NodeEvent>, String> {
        let delivered = |body: Bytes| NodeEvent::Delivered {
            conversation: conv,
            seq,
            sender: item.sender,
            msg_id: item.msg_id,
            body,
        };
        let Some(m) = self.mls.as_mut().filter(|m| m.groups.is_group(conv)) else {
            return Ok(Some(delivered(item.body.clone())));
        };
        let processed = m.groups.on_deliver(
            conv,
            seq,
            item.sender,
            item.msg_id,
            &item.body,
            &m.device,
            self.fx.writes(),
        );
        Ok(match processed {
            Processed::Wait(reason) => return Err(reason),
            Processed::Message(plaintext) => {
                if told_names::is_roster(&plaintext) {
                    // Addresses of this group's members, told by one of them.
                    let members: BTreeSet<UserId> = m
                        .groups
                        .entry(conv)
                        .map(|e| {
                            e.members
                                .iter()
                                .map(|r| UserId::from_bytes(*r.user))
                                .collect()
                        })
                        .unwrap_or_default();
                    let learnt = self.told_names.learn(
                        &plaintext,
                        |u| members.contains(&u),
                        self.fx.writes(),
                    );
                    self.stats.names_told += learnt as u64;
                }
                Some(delivered(plaintext))
            }
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
            Processed::ExternalSenderProposed => Some(NodeEvent::ExternalSenderProposed {
                conversation: conv,
                seq,
                msg_id: item.msg_id,
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
        })
    }

    /// Reads on in every conversation whose next delivery waits in the buffer (parked until
    /// a root was vouched for, which just changed).
    pub(super) fn resume_parked(&mut self, now: Instant) {
        let Some(conn) = self.link.open_conn() else {
            return;
        };
        for conv in self.inbox.ready() {
            let seq = self.inbox.cursor(conv) + 1;
            if let Some(item) = self.inbox.take(conv, seq) {
                self.receive(now, conn, conv, seq, item);
            }
        }
    }
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

/// The id of the group of one user's own devices ([`GroupKind::Own`](crate::mls::group_ops::GroupKind::Own)):
/// the same on every device of the user, so two devices creating it at once name one group.
pub fn own_id(user: UserId) -> ConversationId {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"sund/own/v1")
        .chain_update(user.to_bytes())
        .finalize();
    ConversationId::from_bytes(digest[..16].try_into().expect("16 bytes"))
}

/// Why messages a node was owed are gone.
#[derive(Clone, Copy, Debug)]
enum Missing {
    /// Past the gateway's retention.
    Expired,
    /// The gateway lost them (its disk lost writes it had reported durable).
    Lost,
}
