//! The node's tokio driver: moves bytes and time between quinn, redb and the state machine.
//!
//! One task (the core) owns the [`Node`] state machine; a commit thread owns its [`RedbStore`]
//! ([`Committer`]). A `Connect` output spawns a connection attempt; an established session gets
//! the runtime's reader and writer tasks ([`session::spawn`]). Commands from the application
//! (send, status, stop) arrive on a channel; application events leave on a bounded one. Each
//! round's `Ready`s are merged into one job for the committer, which commits queued jobs together
//! while the core goes on; a round's held outputs (frames, events, replies to `send`) leave only
//! when its commit is back, its eager ones (message transmissions) at once. While the
//! application does not take its events, the core stops reading from the gateway.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sund_model::env::Ready;
use sund_model::env::StoreRead;
use sund_model::files::ContentHash;
use sund_model::files::{seal_chunk_in_place, sealed_len, Manifest, ManifestDigest, UploadId};
use sund_model::identity::{DeviceKey, DevicePublicKey};
use sund_model::ids::{ConnectionId, ConversationId, DeviceId, MsgId, UserId};
use sund_model::mls::device::DeviceMlsConfig;
use sund_model::mls::device_groups::{GroupError, GroupStatus, Intent};
use sund_model::mls::group_ops::GroupKind;
use sund_model::node::files::{assemble, AssemblyError, CHUNK_BYTES_TABLE};
use sund_model::node::transfers::{ChunkToSend, OfferState};
use sund_model::node::{
    ConnectionStatus, Node, NodeConfig, NodeEvent, NodeInput, NodeOutput, PairingOffer, SendError,
};
use sund_model::trust::{EnrolmentToken, TrustRoot};
use sund_model::wire::payload::ChunkHead;
use sund_model::wire::{Frame, Payload, Routing};
use sund_runtime::chunk_stream::{read_chunk_stream, write_chunk_stream};
use sund_runtime::clock::DriverClock;
use sund_runtime::committer::Committer;
use sund_runtime::direct_io::DirectFile;
use sund_runtime::endpoint::{self, QuicError};
use sund_runtime::environment::Environment;
use sund_runtime::metrics::{StageReport, Stages};
use sund_runtime::session::{self, CloseCause, SessionEvent, SessionHandle, SessionLimits};
use sund_runtime::store::{RedbReader, RedbStore};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most frames queued for the gateway.
pub const WRITER_QUEUE_MAX: usize = 4096;
/// Most application commands folded into one commit.
pub const COMMAND_BATCH_MAX: usize = 512;
/// Most application commands waiting for the core.
pub const COMMAND_QUEUE_MAX: usize = 1024;
/// Most connection reports (connects, batches of frames, closes) waiting for the core.
pub const LINK_QUEUE_MAX: usize = 4096;
/// Most events waiting for the application; beyond it the core stops reading from the gateway
/// until the application takes some.
pub const EVENT_QUEUE_MAX: usize = 4096;
/// How long a goodbye may take to reach the gateway before the connection closes anyway.
pub const LINGER: Duration = Duration::from_millis(200);

/// What a node needs to run.
#[derive(Clone)]
pub struct NodeOptions {
    /// Where the node's database lives.
    pub data_dir: PathBuf,
    /// The gateway's address.
    pub gateway: SocketAddr,
    /// The SHA-256 of the gateway's certificate (`quic::certificate_pin`), pinned.
    pub gateway_pin: [u8; 32],
    /// This device's key.
    pub key: DeviceKey,
    /// Where its clock, randomness, network and commits come from.
    pub environment: Arc<dyn Environment>,
    /// The user the device belongs to, named in every hello.
    pub user: Option<UserId>,
    /// MLS on this device: it keeps a KeyPackage pool at the gateway (`None`: no MLS state).
    pub mls: Option<DeviceMlsConfig>,
    /// The enrolment token to register with if the device has no certificate yet (`None`:
    /// register without one, which only a gateway with open enrolment accepts).
    pub enrolment: Option<EnrolmentToken>,
    /// For a device set up from a pairing code: the fingerprint of the device that showed it
    /// (see `NodeConfig::pairing_voucher`).
    pub pairing_voucher: Option<[u8; 16]>,
    /// Keep delivered messages until the application calls [`NodeHandle::taken`], and deliver
    /// untaken ones again at the next start (see `NodeConfig::hold_until_taken`).
    pub hold_until_taken: bool,
    /// The protocol's timers, where a simulation sets its own (`None`: the model's defaults,
    /// as in production).
    pub timers: Option<NodeTimers>,
}

/// The node's protocol timers, as a simulation sets them (`cargo sim --drivers` carries a
/// scenario's `config` lines here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeTimers {
    /// `NodeConfig::heartbeat_interval`.
    pub heartbeat_interval: Duration,
    /// `NodeConfig::idle_timeout`.
    pub idle_timeout: Duration,
    /// `NodeConfig::handshake_timeout`.
    pub handshake_timeout: Duration,
    /// `NodeConfig::resend_after`.
    pub resend_after: Duration,
    /// `NodeConfig::backoff_initial`.
    pub backoff_initial: Duration,
    /// `NodeConfig::backoff_max`.
    pub backoff_max: Duration,
}

impl NodeTimers {
    /// The timers of `config`.
    pub fn of(config: &NodeConfig) -> NodeTimers {
        NodeTimers {
            heartbeat_interval: config.heartbeat_interval,
            idle_timeout: config.idle_timeout,
            handshake_timeout: config.handshake_timeout,
            resend_after: config.resend_after,
            backoff_initial: config.backoff_initial,
            backoff_max: config.backoff_max,
        }
    }

    fn apply(&self, config: &mut NodeConfig) {
        config.heartbeat_interval = self.heartbeat_interval;
        config.idle_timeout = self.idle_timeout;
        config.handshake_timeout = self.handshake_timeout;
        config.resend_after = self.resend_after;
        config.backoff_initial = self.backoff_initial;
        config.backoff_max = self.backoff_max;
    }
}

/// Why the node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// QUIC setup.
    #[error(transparent)]
    Quic(#[from] QuicError),
    /// The store.
    #[error("storage: {0}")]
    Store(#[from] sund_model::env::StoreError),
    /// The node task is gone.
    #[error("the node stopped")]
    Stopped,
}

/// A snapshot for `sund status`.
#[derive(Clone, Debug)]
pub struct NodeStatus {
    /// Connection status.
    pub connection: ConnectionStatus,
    /// Messages waiting for acknowledgement.
    pub outbox: usize,
    /// This device's certificate: its user and serial, if it registered.
    pub certificate: Option<(UserId, u64)>,
    /// The trust root it pinned.
    pub root: Option<TrustRoot>,
    /// Other domains' roots, as its own root vouched for them (whose members it can check).
    pub peer_roots: Vec<TrustRoot>,
    /// The device whose pairing code this device took, once the gateway confirmed it.
    pub paired_with: Option<DeviceId>,
    /// The version of the CRL it holds.
    pub crl_version: u64,
    /// Other domains' CRLs it holds: domain, version, devices revoked.
    pub peer_crls: Vec<(String, u64, usize)>,
    /// Delivered messages the application has not taken yet (`hold_until_taken`).
    pub unread: usize,
    /// While not connected: why the last connection failed or ended, as the network or the
    /// gateway said it.
    pub last_problem: Option<String>,
    /// The gateway found this copy of the device's data stale (another copy was used since):
    /// it never connects again (`last_problem` says why).
    pub state_copied: bool,
}

enum Command {
    Send {
        conversation: ConversationId,
        body: Bytes,
        reply: oneshot::Sender<Result<MsgId, SendError>>,
    },
    Status {
        reply: oneshot::Sender<NodeStatus>,
    },
    Group {
        request: GroupRequest,
        reply: oneshot::Sender<Result<ConversationId, GroupError>>,
    },
    Groups {
        reply: oneshot::Sender<Vec<GroupSummary>>,
    },
    OfferPairing {
        reply: oneshot::Sender<(PairingOffer, Option<TrustRoot>)>,
    },
    SendFile {
        conversation: ConversationId,
        manifest: Manifest,
        source: Bytes,
        reply: oneshot::Sender<Result<UploadId, SendError>>,
    },
    FetchFile {
        conversation: ConversationId,
        digest: ManifestDigest,
        reply: oneshot::Sender<bool>,
    },
    Files {
        reply: oneshot::Sender<Vec<FileSummary>>,
    },
    SentFiles {
        reply: oneshot::Sender<Vec<SentFileSummary>>,
    },
    SaveFile {
        conversation: ConversationId,
        digest: ManifestDigest,
        dir: PathBuf,
        /// Save a file still being fetched, each chunk as soon as it is committed.
        as_it_arrives: bool,
        reply: oneshot::Sender<Result<PathBuf, String>>,
    },
    Social {
        request: SocialRequest,
        reply: oneshot::Sender<Option<u64>>,
    },
    Reconnect,
    Taken {
        conversation: ConversationId,
        seq: u64,
    },
    Stop,
}

/// A file this device knows: offered to it, being fetched, or held.
#[derive(Clone, Debug)]
pub struct FileSummary {
    /// The conversation it came in.
    pub conversation: ConversationId,
    /// Its digest (what `fetch_file` names).
    pub digest: ManifestDigest,
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Who sent it.
    pub sender: DeviceId,
    /// Where it stands.
    pub state: OfferState,
    /// Bytes this device still lacks.
    pub missing_bytes: u64,
}

/// A file this device sent, as `sund file list` shows it: who said they hold it.
#[derive(Clone, Debug)]
pub struct SentFileSummary {
    /// The conversation it went into.
    pub conversation: ConversationId,
    /// Its digest.
    pub digest: ManifestDigest,
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Devices that sent a receipt, and whether its signature verified.
    pub receipts: Vec<(DeviceId, bool)>,
}

/// A change to this device's groups, asked for by the application.
#[derive(Clone, Debug)]
pub enum GroupRequest {
    /// Start (or find) the DM with a user.
    Dm(UserId),
    /// Start (or find) the DM with a user of another domain (the second field).
    DmAcross(UserId, String),
    /// Create a room inviting these users.
    Room(Vec<UserId>),
    /// Change a group (add users, remove a user or device, update keys, set a role).
    Change(ConversationId, Intent),
    /// Start (or find) the group of this user's own devices, where they share the contact
    /// book.
    Own,
}

/// One group as `sund devices` shows it.
#[derive(Clone, Debug)]
pub struct GroupSummary {
    /// Conversation.
    pub conversation: ConversationId,
    /// DM or room.
    pub kind: GroupKind,
    /// Where this device stands.
    pub status: GroupStatus,
    /// The MLS epoch.
    pub epoch: Option<u64>,
    /// Member devices and their users.
    pub members: Vec<(DeviceId, UserId)>,
    /// Changes still queued.
    pub queued: usize,
    /// The certified keys of the member devices in this device's MLS state (for safety
    /// numbers); empty while it is not in the group yet.
    pub keys: BTreeMap<DeviceId, DevicePublicKey>,
    /// The addresses of member users told in the group's rosters, each checked against the
    /// user id (`sund_model::node::told_names`): how a member this user never named is shown.
    pub names: BTreeMap<UserId, sund_model::address::Address>,
}

/// What a connection attempt and its session tell the core, in one queue so that a
/// connection's events keep their order (connected, frames, closed).
enum Link {
    Connected(ConnectionId, SessionHandle, quinn::Connection),
    Failed(String),
    Session(SessionEvent),
    /// A chunk stream from the gateway, read whole.
    Chunk(ConnectionId, Bytes, Bytes),
    /// A chunk of an upload could not be read from its file as it was when sent.
    SourceFailed(UploadId, String),
    /// A save found the device's copy of a chunk missing or damaged: the node drops it, so
    /// that the file is fetched again, then the save's reply goes.
    ChunkLost(ContentHash, Reply),
}

impl From<SessionEvent> for Link {
    fn from(event: SessionEvent) -> Link {
        Link::Session(event)
    }
}

/// A contact or presence request ([`NodeHandle::social`]).
#[derive(Clone, Debug)]
pub enum SocialRequest {
    /// Add (ask, or accept), remove, block or unblock a user, of the domain named if it is
    /// not this device's.
    Change(
        UserId,
        Option<String>,
        sund_model::wire::payload::ContactAction,
    ),
    /// Be invisible (`true`) or visible.
    Invisible(bool),
    /// List this user's contacts.
    Fetch,
    /// Watch these users' presence.
    Watch(Vec<UserId>),
}

/// A running node.
pub struct NodeHandle {
    commands: mpsc::Sender<Command>,
    /// What the application hears: deliveries, acceptances, status changes (bounded: while the
    /// application leaves [`EVENT_QUEUE_MAX`] events untaken, the node reads no more).
    pub events: mpsc::Receiver<NodeEvent>,
    core: JoinHandle<Result<(), NodeError>>,
    stages: Arc<Stages>,
}

/// A file being saved ([`NodeHandle::save_file_as_it_arrives`]).
pub struct SaveInProgress(oneshot::Receiver<Result<PathBuf, String>>);

impl SaveInProgress {
    /// Where the file was saved, or why it was not.
    pub async fn finished(self) -> Result<Result<PathBuf, String>, NodeError> {
        self.0.await.map_err(|_| NodeError::Stopped)
    }
}

/// A cloneable way to send through a running node, for applications that send from several
/// tasks at once (their messages share commits).
#[derive(Clone)]
pub struct NodeSender {
    commands: mpsc::Sender<Command>,
}

impl NodeSender {
    /// Queues a message; returns once it is durable in the outbox. It is sent now if connected,
    /// else after the next reconnect.
    pub async fn send(
        &self,
        conversation: ConversationId,
        body: Bytes,
    ) -> Result<Result<MsgId, SendError>, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Send {
                conversation,
                body,
                reply,
            })
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }
}

impl NodeHandle {
    /// Where the core's time went so far, stage by stage (microseconds; commit sizes in writes).
    pub fn stages(&self) -> StageReport {
        self.stages.report()
    }

    /// Starts the stage histograms afresh (see [`Stages::reset`]).
    pub fn reset_stages(&self) {
        self.stages.reset();
    }

    /// Queues a message; see [`NodeSender::send`].
    pub async fn send(
        &self,
        conversation: ConversationId,
        body: Bytes,
    ) -> Result<Result<MsgId, SendError>, NodeError> {
        self.sender().send(conversation, body).await
    }

    /// A cloneable sender.
    pub fn sender(&self) -> NodeSender {
        NodeSender {
            commands: self.commands.clone(),
        }
    }

    /// The connection status and outbox size.
    pub async fn status(&self) -> Result<NodeStatus, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Status { reply })
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// The application took (showed) the message at `seq` of `conversation`: with
    /// `hold_until_taken` the node forgets it and does not deliver it again when it starts.
    pub async fn taken(&self, conversation: ConversationId, seq: u64) -> Result<(), NodeError> {
        self.commands
            .send(Command::Taken { conversation, seq })
            .await
            .map_err(|_| NodeError::Stopped)
    }

    /// Drops the current session (cleanly, with a goodbye) and reconnects at once: a user's
    /// "reconnect" button, and the disconnect cycles of the simulation tests.
    pub async fn reconnect(&self) -> Result<(), NodeError> {
        self.commands
            .send(Command::Reconnect)
            .await
            .map_err(|_| NodeError::Stopped)
    }

    /// Asks for a group change; returns the conversation once the request is durable (the
    /// change itself happens when the gateway sequences its commit: watch the events).
    pub async fn group(
        &self,
        request: GroupRequest,
    ) -> Result<Result<ConversationId, GroupError>, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Group { request, reply })
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Asks for a contact or presence change, a listing or a watchlist: returns the request
    /// id its answer names (a [`NodeEvent::Contacts`] or [`NodeEvent::ContactsRefused`]); a
    /// watchlist has none (its states come as [`NodeEvent::Presence`]).
    pub async fn social(&self, request: SocialRequest) -> Result<Option<u64>, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Social { request, reply })
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// This device's groups.
    pub async fn groups(&self) -> Result<Vec<GroupSummary>, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Groups { reply })
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Makes a pairing code's secret and this device's vouch for it (see
    /// `Node::offer_pairing`); returns once the vouch is durable, with the pinned trust root.
    pub async fn offer_pairing(&self) -> Result<(PairingOffer, Option<TrustRoot>), NodeError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::OfferPairing { reply })
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Starts sending a file (its manifest from `files::ManifestBuilder`, `source` the path
    /// the driver reads its chunks from); returns once the upload is durable. Watch for
    /// `UploadProgress` and `FileSent`.
    pub async fn send_file(
        &self,
        conversation: ConversationId,
        manifest: Manifest,
        source: Bytes,
    ) -> Result<Result<UploadId, SendError>, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::SendFile {
                conversation,
                manifest,
                source,
                reply,
            })
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Starts fetching a file offered to this device; false if it was never offered. Watch
    /// for `FileProgress`, then `FileComplete` (or `FileFailed`).
    pub async fn fetch_file(
        &self,
        conversation: ConversationId,
        digest: ManifestDigest,
    ) -> Result<bool, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::FetchFile {
                conversation,
                digest,
                reply,
            })
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Every file this device knows.
    pub async fn files(&self) -> Result<Vec<FileSummary>, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Files { reply })
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// The files this device sent, with their receipts.
    pub async fn sent_files(&self) -> Result<Vec<SentFileSummary>, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::SentFiles { reply })
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Writes a complete file into `dir` under its own name, checking every chunk read back;
    /// the file appears only whole (written beside it, then renamed). Refuses to replace a
    /// file that exists.
    pub async fn save_file(
        &self,
        conversation: ConversationId,
        digest: ManifestDigest,
        dir: PathBuf,
    ) -> Result<Result<PathBuf, String>, NodeError> {
        self.start_saving(conversation, digest, dir, false)
            .await?
            .finished()
            .await
    }

    /// Starts saving a file that is being fetched ([`NodeHandle::fetch_file`]) into `dir`:
    /// each chunk is written as soon as it is committed, so that the file is whole moments
    /// after its last chunk arrives instead of after a second pass over the whole file. The
    /// file appears only whole, as with [`NodeHandle::save_file`]; if the node stops first,
    /// the partial file is removed and [`SaveInProgress::finished`] says why.
    pub async fn save_file_as_it_arrives(
        &self,
        conversation: ConversationId,
        digest: ManifestDigest,
        dir: PathBuf,
    ) -> Result<SaveInProgress, NodeError> {
        self.start_saving(conversation, digest, dir, true).await
    }

    async fn start_saving(
        &self,
        conversation: ConversationId,
        digest: ManifestDigest,
        dir: PathBuf,
        as_it_arrives: bool,
    ) -> Result<SaveInProgress, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::SaveFile {
                conversation,
                digest,
                dir,
                as_it_arrives,
                reply,
            })
            .await
            .map_err(|_| NodeError::Stopped)?;
        Ok(SaveInProgress(rx))
    }

    /// Disconnects cleanly and stops.
    pub async fn stop(self) -> Result<(), NodeError> {
        let _ = self.commands.send(Command::Stop).await;
        self.core.await.map_err(|_| NodeError::Stopped)?
    }
}

/// How long a stopping node waits, at most, for its gateway to take its KeyPackages (see
/// `Node::key_packages_settled`).
const KEY_PACKAGES_LINGER: Duration = Duration::from_secs(5);

/// Opens the node's store, recovers its state and starts connecting.
pub async fn start(options: NodeOptions) -> Result<NodeHandle, NodeError> {
    sund_runtime::files::private_dir(&options.data_dir)
        .map_err(|e| NodeError::Store(sund_model::env::StoreError::Backend(e.to_string())))?;
    // Plaintext chunks of files live in files of their own in `values/` (see
    // `sund_runtime::value_files`), not in the database.
    let store = RedbStore::open_with(
        &options.data_dir.join("node.redb"),
        options.environment.disk(),
    )?
    .with_value_files(&options.data_dir.join("values"), &[CHUNK_BYTES_TABLE])?;
    let environment = options.environment.clone();
    let clock = environment.clock();
    let mut config = NodeConfig::new(options.key.clone());
    config.user = options.user;
    config.mls = options.mls;
    config.enrolment = options.enrolment;
    config.pairing_voucher = options.pairing_voucher;
    config.hold_until_taken = options.hold_until_taken;
    if let Some(timers) = &options.timers {
        timers.apply(&mut config);
    }
    let node = Node::recover(config, environment.entropy(), clock.now(), &store)?;
    let endpoint = endpoint::client_endpoint(environment.as_ref(), options.gateway_pin)?;
    let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE_MAX);
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE_MAX);
    let stages = Arc::new(Stages::default());
    let reader = store.reader();
    let committer =
        Committer::with_stages(environment.commit_mode(), store, "node", stages.clone());
    let (links_tx, links_rx) = mpsc::channel(LINK_QUEUE_MAX);
    let core = Core {
        stages: stages.clone(),
        node,
        committer,
        clock,
        endpoint,
        gateway: options.gateway,
        next_conn: 1,
        sessions: BTreeMap::new(),
        connections: BTreeMap::new(),
        reader,
        commits: watch::Sender::new(0),
        links: links_tx,
        events: events_tx,
        waiting_events: VecDeque::new(),
        last_problem: None,
        data_dir: options.data_dir.clone(),
        own: options.user.map(|u| (u, sund_model::node::own_id(u))),
    };
    let core = tokio::spawn(core.run(commands_rx, links_rx));
    Ok(NodeHandle {
        commands: commands_tx,
        events: events_rx,
        core,
        stages,
    })
}

/// What a commit releases: the state machine's outputs and the driver's replies to commands
/// (a reply says "durable", so it waits for the commit).
enum Released {
    Model(NodeOutput),
    Reply(Box<dyn FnOnce() + Send>),
}

type Reply = Box<dyn FnOnce() + Send>;

fn reply<T: Send + 'static>(to: oneshot::Sender<T>, value: T) -> Reply {
    Box::new(move || {
        let _ = to.send(value);
    })
}

struct Core {
    stages: Arc<Stages>,
    node: Node,
    committer: Committer<Released>,
    clock: DriverClock,
    endpoint: quinn::Endpoint,
    gateway: SocketAddr,
    next_conn: u64,
    sessions: BTreeMap<ConnectionId, SessionHandle>,
    /// The QUIC connection of each session, for the chunk streams it opens.
    connections: BTreeMap<ConnectionId, quinn::Connection>,
    /// Reads the committed store beside the committer (chunks of files to save).
    reader: RedbReader,
    /// Counts finished commits: a file being saved as it arrives waits on it for its next
    /// chunk.
    commits: watch::Sender<u64>,
    links: mpsc::Sender<Link>,
    events: mpsc::Sender<NodeEvent>,
    /// Events released but not yet taken by the application (bounded by the reading pause).
    waiting_events: VecDeque<NodeEvent>,
    /// Why the last connection failed or ended, if the network or the gateway said.
    last_problem: Option<String>,
    /// The data directory, where records from the user's other devices update the contact
    /// book's files.
    data_dir: PathBuf,
    /// This device's user and the group of its devices (`None`: no user, no contact book).
    own: Option<(UserId, ConversationId)>,
}

impl Core {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut links: mpsc::Receiver<Link>,
    ) -> Result<(), NodeError> {
        let clock = self.clock;
        let events = self.events.clone();
        // Once asked to stop: until when the node goes on for its KeyPackages to settle.
        let mut lingering: Option<tokio::time::Instant> = None;
        loop {
            if lingering.is_some_and(|until| {
                self.node.key_packages_settled() || tokio::time::Instant::now() >= until
            }) {
                break;
            }
            let deadline = self.node.poll_timeout().map(|d| clock.deadline(d));
            let saturated = self.committer.is_saturated();
            // While the application leaves events untaken, read nothing more from the gateway.
            let reading = self.waiting_events.len() < EVENT_QUEUE_MAX;
            let mut replies = Vec::new();
            tokio::select! {
                biased;
                done = self.committer.completed() => {
                    let outputs = done.inspect_err(|e| {
                        tracing::error!(error = %e, "the device's store failed: the node stops");
                    })?;
                    self.commits.send_modify(|n| *n += 1);
                    self.release(outputs);
                }
                permit = events.reserve(), if !self.waiting_events.is_empty() => {
                    let Ok(permit) = permit else { break };
                    permit.send(self.waiting_events.pop_front().expect("checked non-empty"));
                }
                _ = async { match lingering { Some(until) => tokio::time::sleep_until(until).await, None => std::future::pending().await } } => {}
                command = commands.recv(), if !saturated && lingering.is_none() => {
                    // Group commit: take every command already waiting (up to a bound); their
                    // messages become durable in one commit, and each reply waits for it.
                    let mut next = command;
                    let mut stop = false;
                    for _ in 0..COMMAND_BATCH_MAX {
                        match next {
                            None | Some(Command::Stop) => {
                                stop = true;
                                break;
                            }
                            Some(command) => self.command(command, &mut replies),
                        }
                        match commands.try_recv() {
                            Ok(more) => next = Some(more),
                            Err(_) => break,
                        }
                    }
                    if stop {
                        if self.node.key_packages_settled() {
                            self.submit(replies);
                            break;
                        }
                        // The gateway has not yet taken this device's KeyPackages in this
                        // session (a first command, most often): stopping now would leave
                        // nobody able to add the device until its next run.
                        lingering = Some(tokio::time::Instant::now() + KEY_PACKAGES_LINGER);
                    }
                }
                event = links.recv(), if !saturated && reading => {
                    let Some(event) = event else { break };
                    let started = tokio::time::Instant::now();
                    self.link(event);
                    while let Ok(more) = links.try_recv() {
                        self.link(more);
                    }
                    self.stages.machine.record_duration(started.elapsed());
                }
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                    self.node.handle_timeout(clock.now());
                }
            }
            self.submit(replies);
        }
        self.node.go_offline(clock.now());
        self.submit(Vec::new());
        while self.committer.is_busy() {
            let done = self.committer.completed().await?;
            self.release(done);
            self.submit(Vec::new());
        }
        let Core {
            committer,
            sessions,
            endpoint,
            events,
            waiting_events,
            ..
        } = self;
        committer.finish().await?;
        for event in waiting_events {
            if events.send(event).await.is_err() {
                break;
            }
        }
        for (_, session) in sessions {
            session.close();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        endpoint.close(0u32.into(), b"node stopped");
        Ok(())
    }

    /// One application command; a reply that says "durable" joins `replies`, to leave with
    /// the round's commit.
    fn command(&mut self, command: Command, replies: &mut Vec<Reply>) {
        let now = self.clock.now();
        match command {
            Command::Send {
                conversation,
                body,
                reply: to,
            } => {
                let result = self.node.send(now, conversation, body);
                replies.push(reply(to, result));
            }
            Command::Group { request, reply: to } => {
                let result = match request {
                    GroupRequest::Dm(user) => self.node.create_dm(now, user),
                    GroupRequest::DmAcross(user, domain) => {
                        self.node.create_dm_across(now, user, &domain)
                    }
                    GroupRequest::Room(users) => self.node.create_room(now, &users),
                    GroupRequest::Own => self.node.create_own(now),
                    GroupRequest::Change(conv, intent) => {
                        self.node.change_group(now, conv, intent).map(|()| conv)
                    }
                };
                replies.push(reply(to, result));
            }
            Command::Groups { reply: to } => {
                let _ = to.send(self.summaries());
            }
            Command::Social { request, reply: to } => {
                let id = match request {
                    SocialRequest::Change(user, domain, action) => {
                        Some(self.node.change_contact_abroad(now, user, domain, action))
                    }
                    SocialRequest::Invisible(on) => Some(self.node.set_invisible(now, on)),
                    SocialRequest::Fetch => Some(self.node.fetch_contacts(now)),
                    SocialRequest::Watch(users) => {
                        self.node.watch(now, users);
                        None
                    }
                };
                let _ = to.send(id);
            }
            Command::Taken { conversation, seq } => self.node.taken(conversation, seq),
            Command::Reconnect => {
                self.node.go_offline(now);
                self.node.go_online(now);
            }
            Command::Status { reply } => {
                let trust = self.node.trust();
                let _ = reply.send(NodeStatus {
                    connection: self.node.status(),
                    outbox: self.node.outbox_len(),
                    certificate: trust.certificate().map(|c| (c.user, c.serial)),
                    root: trust.root().cloned(),
                    peer_roots: trust.peer_roots().map_or_else(Vec::new, |set| {
                        set.roots
                            .keys()
                            .filter_map(|domain| set.root_of(domain))
                            .collect()
                    }),
                    paired_with: trust.paired_with().map(|c| c.device()),
                    crl_version: trust.crl_version(),
                    peer_crls: trust
                        .peer_crls()
                        .iter()
                        .map(|(domain, crl)| (domain.clone(), crl.version, crl.revoked.len()))
                        .collect(),
                    unread: self.node.unread_len(),
                    state_copied: self.node.state_copied(),
                    last_problem: match self.node.status() {
                        ConnectionStatus::Connected => None,
                        _ if self.node.state_copied() => {
                            Some(sund_model::node::STATE_COPIED.to_string())
                        }
                        _ => self.last_problem.clone(),
                    },
                });
            }
            Command::SendFile {
                conversation,
                manifest,
                source,
                reply: to,
            } => {
                let result = self.node.send_file(now, conversation, manifest, source);
                replies.push(reply(to, result));
            }
            Command::FetchFile {
                conversation,
                digest,
                reply: to,
            } => {
                let known = self.node.fetch_file(now, conversation, digest);
                replies.push(reply(to, known));
            }
            Command::Files { reply: to } => {
                let _ = to.send(self.file_summaries());
            }
            Command::SentFiles { reply: to } => {
                let sent = self
                    .node
                    .transfers()
                    .sent_files()
                    .map(|(conversation, digest, file)| SentFileSummary {
                        conversation,
                        digest,
                        name: file.name.clone(),
                        size: file.size,
                        receipts: file.receipts.iter().map(|(&d, &v)| (d, v)).collect(),
                    })
                    .collect();
                let _ = to.send(sent);
            }
            Command::SaveFile {
                conversation,
                digest,
                dir,
                as_it_arrives,
                reply: to,
            } => match self.node.files().file(conversation, digest) {
                Some(record)
                    if as_it_arrives || self.node.files().is_complete(conversation, digest) =>
                {
                    let manifest = record.manifest.clone();
                    let reader = self.reader.clone();
                    let held = manifest
                        .chunks
                        .iter()
                        .map(|c| c.hash)
                        .filter(|hash| self.node.files().holds(conversation, hash))
                        .collect();
                    let arrivals = ChunkArrivals {
                        held,
                        commits: self.commits.subscribe(),
                        runtime: tokio::runtime::Handle::current(),
                        stopped: false,
                    };
                    let links = self.links.clone();
                    tokio::task::spawn_blocking(move || {
                        match save_file(&reader, &manifest, &dir, arrivals) {
                            Err(SaveError::ChunkLost { hash, why }) => {
                                let answer = reply(to, Err(why));
                                if let Err(unsent) =
                                    links.blocking_send(Link::ChunkLost(hash, answer))
                                {
                                    if let Link::ChunkLost(_, answer) = unsent.0 {
                                        answer(); // the node stopped: nothing to drop
                                    }
                                }
                            }
                            saved => {
                                let _ = to.send(saved.map_err(|e| e.to_string()));
                            }
                        }
                    });
                }
                Some(_) => {
                    let _ = to.send(Err(
                        "this device does not hold the whole file yet: fetch it first".into(),
                    ));
                }
                None => {
                    let _ = to.send(Err("no such file on this device".into()));
                }
            },
            Command::OfferPairing { reply: to } => {
                let offer = self.node.offer_pairing(now);
                let root = self.node.trust().root().cloned();
                replies.push(reply(to, (offer, root)));
            }
            Command::Stop => unreachable!("handled by the loop"),
        }
    }

    fn link(&mut self, event: Link) {
        let now = self.clock.now();
        match event {
            Link::Connected(conn, session, connection) => {
                self.sessions.insert(conn, session);
                self.connections.insert(conn, connection);
                self.node.handle(now, NodeInput::Connected(conn));
            }
            Link::Chunk(conn, head, body) => {
                self.node.handle(now, NodeInput::Chunk { conn, head, body });
            }
            Link::ChunkLost(hash, answer) => {
                let lacking = self.node.chunk_lost(now, hash);
                tracing::warn!(
                    files = lacking.len(),
                    "a chunk in this device's store was missing or damaged: dropped, so that the files that have it are fetched again"
                );
                answer();
            }
            Link::SourceFailed(upload, why) => {
                tracing::warn!(?upload, %why, "a file being sent can no longer be read as it was");
                self.node.cancel_upload(now, upload, why);
            }
            Link::Failed(why) => {
                tracing::debug!(%why, "connection attempt failed");
                if why.contains("not the gateway this device pinned")
                    && self.last_problem.as_ref() != Some(&why)
                {
                    tracing::warn!(%why, "refusing the gateway's certificate");
                }
                self.last_problem = Some(why);
                self.node.handle(now, NodeInput::ConnectFailed);
            }
            Link::Session(event) => self.session(now, event),
        }
    }

    fn session(&mut self, now: sund_model::time::Instant, event: SessionEvent) {
        match event {
            SessionEvent::Frames(conn, frames, read_at) => {
                self.stages.queued.record_duration(read_at.elapsed());
                for frame in frames {
                    self.node.handle(now, NodeInput::Frame(conn, frame));
                }
            }
            SessionEvent::Closed(conn, cause) => {
                tracing::debug!(?conn, ?cause, "connection closed");
                if matches!(cause, CloseCause::Reset) {
                    tracing::info!(
                        "the gateway no longer knows this connection (it restarted, or dropped it): reconnecting"
                    );
                }
                if let CloseCause::PeerClosed { reason, .. } = &cause {
                    let problem = format!("the gateway said: {reason}");
                    // Logged when it changes, not on every retry.
                    if self.last_problem.as_ref() != Some(&problem) {
                        tracing::warn!(%reason, "the gateway closed the connection");
                    }
                    self.last_problem = Some(problem);
                }
                self.connections.remove(&conn);
                if self.sessions.remove(&conn).is_some() {
                    self.node.handle(now, NodeInput::Closed(conn));
                }
            }
        }
    }

    fn file_summaries(&self) -> Vec<FileSummary> {
        let transfers = self.node.transfers();
        let files = self.node.files();
        transfers
            .offers()
            .filter_map(|(conversation, digest, offer)| {
                let record = files.file(conversation, digest)?;
                let missing_bytes = files.lacking_bytes(conversation, digest).unwrap_or(0);
                Some(FileSummary {
                    conversation,
                    digest,
                    name: record.manifest.name.as_str().to_string(),
                    size: record.manifest.size,
                    sender: offer.sender,
                    state: offer.state,
                    missing_bytes,
                })
            })
            .collect()
    }

    fn summaries(&self) -> Vec<GroupSummary> {
        let Some(groups) = self.node.groups() else {
            return Vec::new();
        };
        let told = self.node.told_names();
        groups
            .entries()
            .map(|(conv, entry)| {
                let members: Vec<(DeviceId, UserId)> = entry
                    .members
                    .iter()
                    .map(|m| (DeviceId::from_bytes(*m.device), UserId::from_bytes(*m.user)))
                    .collect();
                let names = members
                    .iter()
                    .filter_map(|(_, u)| Some((*u, told.get(u)?.clone())))
                    .collect();
                GroupSummary {
                    conversation: *conv,
                    kind: entry.group_kind(),
                    status: entry.status.clone(),
                    epoch: groups.epoch(*conv),
                    members,
                    queued: entry.intents.len(),
                    keys: groups.member_keys(*conv).unwrap_or_default(),
                    names,
                }
            })
            .collect()
    }

    /// Hands this round's writes and outputs, and the replies waiting for them, to the committer.
    fn submit(&mut self, replies: Vec<Reply>) {
        let mut batch: Option<Ready<Released>> = None;
        while let Some(mut ready) = self.node.poll_ready() {
            // Message transmissions need not wait for the outbox commit (see `Ready`).
            let eager = ready.take_eager();
            if !eager.is_empty() {
                self.release(eager.into_iter().map(Released::Model).collect());
            }
            let ready = ready.map(Released::Model);
            match &mut batch {
                Some(b) => b.merge(ready),
                None => batch = Some(ready),
            }
        }
        if batch.is_none() && replies.is_empty() {
            return;
        }
        let mut batch =
            batch.unwrap_or_else(|| Ready::new(sund_model::env::WriteBatch::default(), Vec::new()));
        for reply in replies {
            batch.push_output(Released::Reply(reply));
        }
        self.committer.submit(batch);
    }

    /// Acts on what a finished commit released.
    fn release(&mut self, outputs: Vec<Released>) {
        for output in outputs {
            let output = match output {
                Released::Model(output) => output,
                Released::Reply(reply) => {
                    reply();
                    continue;
                }
            };
            match output {
                NodeOutput::Connect => {
                    let conn = ConnectionId(self.next_conn);
                    self.next_conn += 1;
                    tokio::spawn(connect(
                        self.endpoint.clone(),
                        self.gateway,
                        conn,
                        self.links.clone(),
                    ));
                }
                NodeOutput::Send(conn, bytes) => {
                    let Some(session) = self.sessions.get(&conn) else {
                        continue;
                    };
                    if let Err(full) = session.send(bytes) {
                        tracing::warn!(error = %full, "the gateway reads too slowly; reconnecting");
                        self.connections.remove(&conn);
                        if let Some(session) = self.sessions.remove(&conn) {
                            session.abort("the gateway does not read");
                        }
                        self.node.handle(self.clock.now(), NodeInput::Closed(conn));
                    }
                }
                NodeOutput::Close(conn) => {
                    self.connections.remove(&conn);
                    if let Some(session) = self.sessions.remove(&conn) {
                        session.close();
                    }
                }
                NodeOutput::SendChunk(chunk) => {
                    let Some(connection) = self.connections.get(&chunk.conn) else {
                        continue; // the session is gone; the next one opens the upload again
                    };
                    tokio::spawn(send_chunk(connection.clone(), chunk, self.links.clone()));
                }
                NodeOutput::Event(NodeEvent::Delivered {
                    conversation,
                    seq,
                    sender,
                    body,
                    ..
                }) if self.own.is_some_and(|(_, own)| own == conversation) => {
                    self.contact_records(conversation, seq, sender, &body);
                }
                NodeOutput::Event(event) => match self.events.try_send(event) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(event)) => {
                        self.waiting_events.push_back(event)
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {} // nobody listens
                },
            }
        }
    }
}

impl Core {
    /// A message in the group of this user's own devices: contact-book records from another
    /// device (or this one), applied to the files and taken, so the application never sees
    /// them. A message that cannot be written stays untaken and comes again at the next start;
    /// one that is not records, or not from a device of this user, is logged and dropped.
    fn contact_records(
        &mut self,
        conversation: ConversationId,
        seq: u64,
        sender: DeviceId,
        body: &[u8],
    ) {
        let Some((user, _)) = self.own else { return };
        let entry = self.node.groups().and_then(|g| g.entry(conversation));
        let from_own_device = entry.is_some_and(|e| {
            e.group_kind() == GroupKind::Own
                && e.members.iter().any(|m| {
                    DeviceId::from_bytes(*m.device) == sender && UserId::from_bytes(*m.user) == user
                })
        });
        if !from_own_device {
            tracing::warn!(%sender, seq, "a message in the group of this user's devices from a device not of this user: dropped");
        } else if body.is_empty() {
            // Nothing to apply.
        } else {
            match sund_model::node::contact_book::decode(body) {
                Ok(records) => match crate::contact_files::apply(&self.data_dir, &records) {
                    Ok(changed) => {
                        tracing::info!(%sender, seq, records = records.len(), changed, "contact book updated from the user's devices");
                    }
                    Err((path, error)) => {
                        tracing::error!(path = %path.display(), %error, "the contact book could not be written; it is applied again at the next start");
                        return;
                    }
                },
                Err(error) => {
                    tracing::warn!(%sender, seq, %error, "a contact-book message this version cannot read: dropped (upgrade sund)");
                }
            }
        }
        self.node.taken(conversation, seq);
    }
}

/// A file being saved is synced every this many bytes. Left to the end, a gigabyte's sync made
/// every small sync on the same disk (the gateway's commits, when they share it) wait behind a
/// gigabyte of writes, hundreds of milliseconds; synced as it goes, they wait for a few MiB.
const SAVE_SYNC_BYTES: usize = 16 << 20;

/// Where a file named `name` is saved in `dir`, or why it cannot be: a file is never replaced.
pub fn save_target(dir: &Path, name: &str) -> Result<PathBuf, String> {
    let path = dir.join(name);
    if path.exists() {
        return Err(format!(
            "{} exists already: move it away or choose another directory with --out",
            path.display()
        ));
    }
    Ok(path)
}

/// How a save waits for chunks still being fetched: it looks again after each commit.
struct ChunkArrivals {
    /// Chunks the device held when the save began: one of these missing from the store is
    /// lost, not on its way. (All of them, for a file already whole.)
    held: BTreeSet<ContentHash>,
    commits: watch::Receiver<u64>,
    runtime: tokio::runtime::Handle,
    /// The node stopped while the save waited.
    stopped: bool,
}

impl ChunkArrivals {
    /// The chunk `hash` from the store, waiting for it while the node runs; `None` if the node
    /// stopped first, or at once if it was held already (so it is lost).
    fn chunk(&mut self, reader: &RedbReader, hash: &ContentHash) -> Option<Vec<u8>> {
        loop {
            // Marks the commits seen so far before looking, so that a commit landing between
            // the look and the wait still wakes the wait.
            self.commits.borrow_and_update();
            if let Some(bytes) = reader.get(CHUNK_BYTES_TABLE, &hash.0).ok().flatten() {
                return Some(bytes);
            }
            if self.held.contains(hash) {
                return None;
            }
            if self.runtime.block_on(self.commits.changed()).is_err() {
                self.stopped = true;
                return None;
            }
        }
    }
}

/// Why a file was not saved.
#[derive(Debug)]
enum SaveError {
    /// The device's copy of a chunk was missing or damaged: the node drops it, and the file
    /// can be fetched again.
    ChunkLost { hash: ContentHash, why: String },
    /// Anything else, in words for the user.
    Failed(String),
}

impl std::fmt::Display for SaveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SaveError::ChunkLost { why, .. } | SaveError::Failed(why) => f.write_str(why),
        }
    }
}

impl From<String> for SaveError {
    fn from(why: String) -> SaveError {
        SaveError::Failed(why)
    }
}

/// Writes `manifest`'s file into `dir` from the device's chunk store, in order, each chunk as
/// soon as it is there: into a hidden temporary file beside its place, synced, then renamed,
/// so that a crash, a damaged chunk or a fetch that never ends leaves no half-written file
/// under the real name.
fn save_file(
    reader: &RedbReader,
    manifest: &Manifest,
    dir: &Path,
    mut arrivals: ChunkArrivals,
) -> Result<PathBuf, SaveError> {
    let name = manifest.name.as_str();
    let path = save_target(dir, name)?;
    let temp = dir.join(format!(".{name}.sund-part"));
    // Around the page cache, as the chunk store (see `sund_runtime::direct_io`): a gigabyte
    // saved through it cost the receiver seconds of CPU claiming cache pages.
    let mut file = DirectFile::create(&temp, false)
        .map_err(|e| format!("cannot write into {}: {e}", dir.display()))?;
    let mut io_error = None;
    let mut unsynced = 0;
    let assembled = assemble(
        manifest,
        |hash| arrivals.chunk(reader, hash),
        |bytes| {
            if io_error.is_some() {
                return;
            }
            io_error = file.write_all(bytes).err();
            unsynced += bytes.len();
            if unsynced >= SAVE_SYNC_BYTES {
                unsynced = 0;
                io_error = io_error.take().or_else(|| file.sync_data().err());
            }
        },
    );
    let result = match (assembled, io_error) {
        (Err(AssemblyError::MissingChunk { .. }), _) if arrivals.stopped => {
            Err(SaveError::Failed("the device stopped before the file was whole; `sund file get` goes on from what arrived".into()))
        }
        (
            Err(
                e @ (AssemblyError::MissingChunk { index } | AssemblyError::Damaged { index }),
            ),
            _,
        ) => Err(SaveError::ChunkLost {
            hash: manifest.chunks[index].hash,
            why: e.to_string(),
        }),
        (Ok(()), Some(e)) => Err(SaveError::Failed(format!(
            "cannot write {} ({e}): free some space and get it again",
            path.display()
        ))),
        (Ok(()), None) => file
            .finish()
            .and_then(|()| std::fs::rename(&temp, &path))
            .map(|()| path.clone())
            .map_err(|e| SaveError::Failed(format!("cannot write {} ({e})", path.display()))),
    };
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// Reads every chunk stream the gateway opens on `connection` and hands each over whole.
async fn accept_chunk_streams(
    conn: ConnectionId,
    connection: quinn::Connection,
    links: mpsc::Sender<Link>,
) {
    while let Ok(mut recv) = connection.accept_uni().await {
        let links = links.clone();
        tokio::spawn(async move {
            match read_chunk_stream(&mut recv).await {
                Ok(stream) => {
                    let _ = links
                        .send(Link::Chunk(conn, stream.head, stream.body))
                        .await;
                }
                // Asked for again at the next heartbeat or session.
                Err(e) => tracing::debug!(?conn, error = %e, "chunk stream not read to its end"),
            }
        });
    }
}

/// Reads one chunk of a file being sent, seals it, checks it is the chunk the manifest names,
/// and sends it on a chunk stream of its own.
async fn send_chunk(connection: quinn::Connection, chunk: ChunkToSend, links: mpsc::Sender<Link>) {
    let upload = chunk.upload;
    let sealed = tokio::task::spawn_blocking(move || read_and_seal(&chunk).map(|s| (chunk, s)))
        .await
        .expect("sealing does not panic");
    match sealed {
        Ok((chunk, sealed)) => {
            let head = ChunkHead {
                upload: chunk.upload.0,
                id: chunk.id.0,
                len: sealed.len() as u32,
            };
            let routing = Routing {
                conversation: chunk.conversation,
                ..Routing::default()
            };
            let head = Frame::new(routing, Payload::Chunk(head)).encode();
            if let Err(e) = write_chunk_stream(&connection, &head, Bytes::from(sealed)).await {
                // The connection went; the next session opens the upload again.
                tracing::debug!(error = %e, "chunk not sent");
            }
        }
        Err(why) => {
            let _ = links.send(Link::SourceFailed(upload, why)).await;
        }
    }
}

/// The sealed bytes of `chunk`, read from its file; an error in words if the file is gone or
/// no longer holds what was sent.
fn read_and_seal(chunk: &ChunkToSend) -> Result<Vec<u8>, String> {
    use std::io::{Read, Seek, SeekFrom};
    let path = std::path::PathBuf::from(String::from_utf8_lossy(&chunk.source).into_owned());
    let entry = chunk.manifest.chunks[chunk.index];
    let mut file = std::fs::File::open(&path).map_err(|e| {
        format!(
            "{} cannot be read any more ({e}): send it again",
            path.display()
        )
    })?;
    // Read into a buffer the sealing can fill in place: the chunk is copied once, from the
    // file.
    let len = entry.len as usize;
    let mut plain = Vec::with_capacity(sealed_len(len));
    file.seek(SeekFrom::Start(chunk.offset))
        .and_then(|_| (&mut file).take(len as u64).read_to_end(&mut plain))
        .map_err(|e| {
            format!(
                "{} cannot be read any more ({e}): send it again",
                path.display()
            )
        })?;
    if plain.len() != len {
        return Err(format!(
            "{} is shorter than when it was sent: send it again",
            path.display()
        ));
    }
    let (read, sealed) = seal_chunk_in_place(&chunk.manifest.secret, plain);
    if read.hash != entry.hash || sealed.id != chunk.id {
        return Err(format!(
            "{} changed since it was sent: send it again",
            path.display()
        ));
    }
    Ok(sealed.ciphertext)
}

/// Words for a failed connection attempt that say what to do; a certificate that is not the
/// pinned one is named as such (it is not a gateway that is down).
fn explain_connect_error(addr: SocketAddr, error: &str) -> String {
    if error.contains(sund_runtime::tls::NOT_PINNED) {
        format!(
            "the server at {addr} is not the gateway this device pinned (its certificate differs): if the gateway's certificate was replaced, set this device up again with the new `tls/cert.der`; otherwise another server answers at that address"
        )
    } else {
        format!("connecting to {addr}: {error}")
    }
}

async fn connect(
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    conn: ConnectionId,
    links: mpsc::Sender<Link>,
) {
    let attempt = async {
        let connecting = endpoint
            .connect(addr, "sund-gateway")
            .map_err(|e| e.to_string())?;
        let connection = connecting.await.map_err(|e| e.to_string())?;
        let (send, recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((connection, send, recv))
    };
    let (connection, send, recv) = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(Ok(parts)) => parts,
        Ok(Err(e)) => {
            let _ = links
                .send(Link::Failed(explain_connect_error(addr, &e)))
                .await;
            return;
        }
        Err(_) => {
            let why = format!(
                "no answer from {addr} within {} s: is the gateway running there?",
                CONNECT_TIMEOUT.as_secs()
            );
            let _ = links.send(Link::Failed(why)).await;
            return;
        }
    };
    let limits = SessionLimits {
        writer_queue_max: WRITER_QUEUE_MAX,
        linger: LINGER,
        reason: b"closed by node",
    };
    // `Connected` (with the handle) goes to the core first; the session's own reports are
    // relayed after it through the same queue, so none can overtake it.
    let (relay_tx, mut relay_rx) = mpsc::channel::<Link>(LINK_QUEUE_MAX);
    let session = session::spawn(
        conn,
        connection.clone(),
        send,
        recv,
        relay_tx.clone(),
        limits,
    );
    if links
        .send(Link::Connected(conn, session, connection.clone()))
        .await
        .is_err()
    {
        return;
    }
    tokio::spawn(accept_chunk_streams(conn, connection, relay_tx));
    while let Some(event) = relay_rx.recv().await {
        if links.send(event).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sund_model::env::{Store, WriteBatch};
    use sund_model::files::{seal_file, FileName, FileSecret};

    /// A file of three chunks or more, and its plaintext chunks in order.
    fn file() -> (Manifest, Vec<Vec<u8>>) {
        let data = sund_model::testing::noise(6_000_000, 0x2545_f491_4f6c_dd1d);
        let (manifest, _) = seal_file(
            FileName::new("f.bin").unwrap(),
            FileSecret::from_bytes([4; 32]),
            &data,
        )
        .unwrap();
        let mut chunks = Vec::new();
        let mut at = 0;
        for entry in &manifest.chunks {
            chunks.push(data[at..at + entry.len as usize].to_vec());
            at += entry.len as usize;
        }
        assert!(chunks.len() >= 3, "{} chunks", chunks.len());
        (manifest, chunks)
    }

    #[test]
    fn a_chunk_is_read_and_sealed_as_the_manifest_names_it_and_a_changed_file_is_refused() {
        let (manifest, chunks) = file();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        std::fs::write(&path, chunks.concat()).unwrap();
        let manifest = Arc::new(manifest);
        let index = 1;
        let to_send = ChunkToSend {
            conn: ConnectionId(1),
            conversation: ConversationId::from_name("read and seal"),
            upload: UploadId([1; 16]),
            source: Bytes::from(path.to_str().unwrap().to_string()),
            manifest: manifest.clone(),
            index,
            id: manifest.chunk_id(index),
            offset: chunks[0].len() as u64,
        };
        let sealed = read_and_seal(&to_send).unwrap();
        let opened =
            sund_model::files::open_chunk(&manifest.secret, &manifest.chunks[index], sealed)
                .unwrap();
        assert_eq!(opened, chunks[index]);

        // One byte of the chunk changed on disk: not sent under the old id.
        let mut changed = chunks.concat();
        changed[chunks[0].len() + 10] ^= 1;
        std::fs::write(&path, &changed).unwrap();
        let error = read_and_seal(&to_send).unwrap_err();
        assert!(
            error.contains("changed since it was sent: send it again"),
            "{error}"
        );
        // Cut short inside the chunk.
        std::fs::write(&path, &changed[..chunks[0].len() + 5]).unwrap();
        let error = read_and_seal(&to_send).unwrap_err();
        assert!(
            error.contains("is shorter than when it was sent"),
            "{error}"
        );
        // Gone.
        std::fs::remove_file(&path).unwrap();
        let error = read_and_seal(&to_send).unwrap_err();
        assert!(error.contains("cannot be read any more"), "{error}");
    }

    fn keep(store: &mut RedbStore, manifest: &Manifest, chunks: &[Vec<u8>], index: usize) {
        let mut batch = WriteBatch::default();
        batch.put(
            CHUNK_BYTES_TABLE,
            manifest.chunks[index].hash.0.to_vec(),
            chunks[index].clone(),
        );
        store.commit(batch).unwrap();
    }

    fn store(dir: &Path) -> RedbStore {
        RedbStore::open(&dir.join("node.redb"))
            .unwrap()
            .with_value_files(&dir.join("values"), &[CHUNK_BYTES_TABLE])
            .unwrap()
    }

    /// A save of a file of which the store holds only chunk 0 yet, started on a thread.
    struct Saving {
        runtime: tokio::runtime::Runtime,
        _tmp: tempfile::TempDir,
        out: PathBuf,
        manifest: Manifest,
        chunks: Vec<Vec<u8>>,
        store: RedbStore,
        commits: watch::Sender<u64>,
        saver: std::thread::JoinHandle<Result<PathBuf, SaveError>>,
    }

    fn start_saving() -> Saving {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let (manifest, chunks) = file();
        let mut store = store(tmp.path());
        keep(&mut store, &manifest, &chunks, 0);
        let commits = watch::Sender::new(0u64);
        let arrivals = ChunkArrivals {
            held: BTreeSet::new(),
            commits: commits.subscribe(),
            runtime: runtime.handle().clone(),
            stopped: false,
        };
        let (reader, m, o) = (store.reader(), manifest.clone(), out.clone());
        let saver = std::thread::spawn(move || save_file(&reader, &m, &o, arrivals));
        Saving {
            runtime,
            _tmp: tmp,
            out,
            manifest,
            chunks,
            store,
            commits,
            saver,
        }
    }

    #[test]
    fn a_file_saved_as_it_arrives_waits_for_each_chunk_and_appears_whole() {
        let Saving {
            runtime: _runtime,
            _tmp,
            out,
            manifest,
            chunks,
            mut store,
            commits,
            saver,
        } = start_saving();
        // The rest arrives later, last chunk first; the save goes on after each commit.
        for index in (1..chunks.len()).rev() {
            std::thread::sleep(Duration::from_millis(20));
            assert!(!saver.is_finished(), "waits for chunk 1");
            assert!(
                !out.join("f.bin").exists(),
                "nothing under the real name yet"
            );
            keep(&mut store, &manifest, &chunks, index);
            commits.send_modify(|n| *n += 1);
        }
        let saved = saver.join().unwrap().unwrap();
        assert_eq!(saved, out.join("f.bin"));
        assert_eq!(std::fs::read(&saved).unwrap(), chunks.concat());
        let names: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["f.bin"], "no temporary file left");
    }

    #[test]
    fn a_save_whose_node_stops_first_says_so_and_leaves_nothing_behind() {
        let Saving {
            _tmp,
            out,
            commits,
            saver,
            ..
        } = start_saving();
        std::thread::sleep(Duration::from_millis(20));
        drop(commits); // the node stops
        let error = saver.join().unwrap().unwrap_err().to_string();
        assert!(
            error.contains("stopped before the file was whole"),
            "{error}"
        );
        assert_eq!(
            std::fs::read_dir(&out).unwrap().count(),
            0,
            "nothing left behind"
        );
    }

    /// A chunk the device held when the save began but that is gone or damaged in its store
    /// is not waited for: the save fails at once, naming the chunk, so that the node can drop
    /// it and the file be fetched again; nothing is left behind.
    #[test]
    fn a_save_that_finds_a_held_chunk_lost_names_it_and_leaves_nothing_behind() {
        let Saving {
            runtime,
            _tmp,
            out,
            manifest,
            chunks,
            mut store,
            commits,
            saver,
        } = start_saving();
        drop(commits);
        let _ = saver.join();
        let all_held = || ChunkArrivals {
            held: manifest.chunks.iter().map(|c| c.hash).collect(),
            commits: watch::Sender::new(0u64).subscribe(),
            runtime: runtime.handle().clone(),
            stopped: false,
        };
        // Missing: only chunk 0 is in the store.
        match save_file(&store.reader(), &manifest, &out, all_held()) {
            Err(SaveError::ChunkLost { hash, why }) => {
                assert_eq!(hash, manifest.chunks[1].hash);
                assert!(why.contains("chunk 1") && why.contains("missing"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
        // Damaged: chunk 1 is there with one bit flipped.
        let mut damaged = chunks.clone();
        damaged[1][1_000] ^= 1;
        for index in 1..chunks.len() {
            keep(&mut store, &manifest, &damaged, index);
        }
        match save_file(&store.reader(), &manifest, &out, all_held()) {
            Err(SaveError::ChunkLost { hash, why }) => {
                assert_eq!(hash, manifest.chunks[1].hash);
                assert!(why.contains("chunk 1") && why.contains("damaged"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
        keep(&mut store, &manifest, &chunks, 1);
        let saved = save_file(&store.reader(), &manifest, &out, all_held()).unwrap();
        assert_eq!(std::fs::read(saved).unwrap(), chunks.concat());
    }
}
