//! The node's tokio driver: moves bytes and time between quinn, redb and the state machine.
//!
//! One task owns the [`Node`] state machine; a commit thread owns its [`RedbStore`]. A `Connect`
//! output spawns a connection attempt; an established connection gets a reader task (frames in)
//! and a writer task (frames out). Commands from the application (send, status, stop) arrive on a
//! channel; application events leave on another. Each round's `Ready`s are merged into one job
//! for the [`Committer`], which commits queued jobs together while the core goes on; a round's
//! held outputs (frames, events, replies to `send`) leave only when its commit is back, its eager
//! ones (message transmissions) at once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use sund_gateway::clock::DriverClock;
use sund_gateway::committer::{CommitMode, Committer};
use sund_gateway::entropy::EntropySource;
use sund_gateway::quic::{self, FrameReader, Socket, WriterCommand};
use sund_gateway::store::RedbStore;
use sund_model::env::Ready;
use sund_model::identity::DeviceKey;
use sund_model::ids::{ConnectionId, ConversationId, DeviceId, MsgId, UserId};
use sund_model::mls::device::DeviceMlsConfig;
use sund_model::mls::device_groups::{GroupError, GroupStatus, Intent};
use sund_model::mls::group_ops::GroupKind;
use sund_model::node::{
    ConnectionStatus, Node, NodeConfig, NodeEvent, NodeInput, NodeOutput, PairingOffer, SendError,
};
use sund_model::time::Instant;
use sund_model::trust::{EnrolmentToken, TrustRoot};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most frames queued for the gateway.
pub const WRITER_QUEUE_MAX: usize = 4096;
/// Most application commands folded into one commit.
pub const COMMAND_BATCH_MAX: usize = 512;

/// What a node needs to run.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// Where the node's database lives.
    pub data_dir: PathBuf,
    /// The gateway's address.
    pub gateway: SocketAddr,
    /// The SHA-256 of the gateway's certificate (`quic::certificate_pin`), pinned.
    pub gateway_pin: [u8; 32],
    /// This device's key.
    pub key: DeviceKey,
    /// The node's UDP socket (an ephemeral port in production; injected under simulation).
    pub socket: Socket,
    /// Where its randomness comes from.
    pub entropy: EntropySource,
    /// Its clock (the wall clock in production; a fixed origin under simulation).
    pub clock: Option<Instant>,
    /// Where commits run: pipelined on their own thread (production) or inline (turmoil).
    pub commit: CommitMode,
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
}

/// Why the node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// QUIC setup.
    #[error(transparent)]
    Quic(#[from] quic::QuicError),
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
    /// The device whose pairing code this device took, once the gateway confirmed it.
    pub paired_with: Option<DeviceId>,
    /// The version of the CRL it holds.
    pub crl_version: u64,
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
    Reconnect,
    Stop,
}

/// A change to this device's groups, asked for by the application.
#[derive(Clone, Debug)]
pub enum GroupRequest {
    /// Start (or find) the DM with a user.
    Dm(UserId),
    /// Create a room inviting these users.
    Room(Vec<UserId>),
    /// Change a group (add users, remove a user or device, update keys, set a role).
    Change(ConversationId, Intent),
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
}

enum LinkInput {
    Connected(ConnectionId, mpsc::Sender<WriterCommand>),
    ConnectFailed(String),
    Frame(ConnectionId, Bytes),
    Closed(ConnectionId),
}

/// A running node.
pub struct NodeHandle {
    commands: mpsc::Sender<Command>,
    /// What the application hears: deliveries, acceptances, status changes.
    pub events: mpsc::UnboundedReceiver<NodeEvent>,
    core: JoinHandle<Result<(), NodeError>>,
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

    /// Disconnects cleanly and stops.
    pub async fn stop(self) -> Result<(), NodeError> {
        let _ = self.commands.send(Command::Stop).await;
        self.core.await.map_err(|_| NodeError::Stopped)?
    }
}

/// Opens the node's store, recovers its state and starts connecting.
pub async fn start(options: NodeOptions) -> Result<NodeHandle, NodeError> {
    std::fs::create_dir_all(&options.data_dir)
        .map_err(|e| NodeError::Store(sund_model::env::StoreError::Backend(e.to_string())))?;
    let store = RedbStore::open(&options.data_dir.join("node.redb"))?;
    let clock = options
        .clock
        .map_or_else(DriverClock::wall, DriverClock::starting_at);
    let mut config = NodeConfig::new(options.key.clone());
    config.user = options.user;
    config.mls = options.mls;
    config.enrolment = options.enrolment;
    config.pairing_voucher = options.pairing_voucher;
    let node = Node::recover(config, options.entropy.boxed(), clock.now(), &store)?;
    let endpoint = quic::client_endpoint(options.socket.clone(), options.gateway_pin)?;
    let (commands_tx, commands_rx) = mpsc::channel(1024);
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let committer = Committer::new(options.commit, store, "node");
    let core = tokio::spawn(core_loop(
        node,
        committer,
        clock,
        endpoint,
        options.gateway,
        commands_rx,
        events_tx,
    ));
    Ok(NodeHandle {
        commands: commands_tx,
        events: events_rx,
        core,
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
    node: Node,
    committer: Committer<Released>,
    clock: DriverClock,
    endpoint: quinn::Endpoint,
    gateway: SocketAddr,
    next_conn: u64,
    writers: BTreeMap<ConnectionId, mpsc::Sender<WriterCommand>>,
    link_tx: mpsc::Sender<LinkInput>,
    events: mpsc::UnboundedSender<NodeEvent>,
}

async fn core_loop(
    node: Node,
    committer: Committer<Released>,
    clock: DriverClock,
    endpoint: quinn::Endpoint,
    gateway: SocketAddr,
    mut commands: mpsc::Receiver<Command>,
    events: mpsc::UnboundedSender<NodeEvent>,
) -> Result<(), NodeError> {
    let (link_tx, mut link_rx) = mpsc::channel(4096);
    let mut core = Core {
        node,
        committer,
        clock,
        endpoint,
        gateway,
        next_conn: 1,
        writers: BTreeMap::new(),
        link_tx,
        events,
    };
    loop {
        let deadline = core.node.poll_timeout().map(|d| clock.deadline(d));
        let saturated = core.committer.is_saturated();
        let mut replies = Vec::new();
        tokio::select! {
            biased;
            done = core.committer.completed() => core.release(done?),
            command = commands.recv(), if !saturated => {
                // Group commit: take every command already waiting (up to a bound); their
                // messages become durable in one commit, and each reply waits for it.
                let mut stop = false;
                let mut next = command;
                for _ in 0..COMMAND_BATCH_MAX {
                    match next {
                        None | Some(Command::Stop) => {
                            stop = true;
                            break;
                        }
                        Some(Command::Send { conversation, body, reply: to }) => {
                            let result = core.node.send(clock.now(), conversation, body);
                            replies.push(reply(to, result));
                        }
                        Some(Command::Group { request, reply: to }) => {
                            let now = clock.now();
                            let result = match request {
                                GroupRequest::Dm(user) => core.node.create_dm(now, user),
                                GroupRequest::Room(users) => core.node.create_room(now, &users),
                                GroupRequest::Change(conv, intent) => {
                                    core.node.change_group(now, conv, intent).map(|()| conv)
                                }
                            };
                            replies.push(reply(to, result));
                        }
                        Some(Command::Groups { reply: to }) => {
                            let _ = to.send(core.summaries());
                        }
                        Some(Command::Reconnect) => {
                            core.node.go_offline(clock.now());
                            core.node.go_online(clock.now());
                        }
                        Some(Command::Status { reply }) => {
                            let trust = core.node.trust();
                            let _ = reply.send(NodeStatus {
                                connection: core.node.status(),
                                outbox: core.node.outbox_len(),
                                certificate: trust.certificate().map(|c| (c.user, c.serial)),
                                root: trust.root().cloned(),
                                paired_with: trust.paired_with().map(|c| c.device()),
                                crl_version: trust.crl_version(),
                            });
                        }
                        Some(Command::OfferPairing { reply: to }) => {
                            let offer = core.node.offer_pairing(clock.now());
                            let root = core.node.trust().root().cloned();
                            replies.push(reply(to, (offer, root)));
                        }
                    }
                    match commands.try_recv() {
                        Ok(more) => next = Some(more),
                        Err(_) => break,
                    }
                }
                if stop {
                    core.submit(replies);
                    break;
                }
            }
            input = link_rx.recv(), if !saturated => {
                let Some(input) = input else { break };
                core.link(input);
                while let Ok(more) = link_rx.try_recv() {
                    core.link(more);
                }
            }
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                core.node.handle_timeout(clock.now());
            }
        }
        core.submit(replies);
    }
    core.node.go_offline(clock.now());
    core.submit(Vec::new());
    while core.committer.is_busy() {
        let done = core.committer.completed().await?;
        core.release(done);
        core.submit(Vec::new());
    }
    let Core {
        committer,
        writers,
        endpoint,
        ..
    } = core;
    committer.finish().await?;
    drop(writers);
    tokio::time::sleep(Duration::from_millis(50)).await;
    endpoint.close(0u32.into(), b"node stopped");
    Ok(())
}

impl Core {
    fn link(&mut self, input: LinkInput) {
        let now = self.clock.now();
        match input {
            LinkInput::Connected(conn, writer) => {
                self.writers.insert(conn, writer);
                self.node.handle(now, NodeInput::Connected(conn));
            }
            LinkInput::ConnectFailed(why) => {
                tracing::debug!(%why, "connection attempt failed");
                self.node.handle(now, NodeInput::ConnectFailed);
            }
            LinkInput::Frame(conn, bytes) => self.node.handle(now, NodeInput::Frame(conn, bytes)),
            LinkInput::Closed(conn) => {
                self.writers.remove(&conn);
                self.node.handle(now, NodeInput::Closed(conn));
            }
        }
    }

    fn summaries(&self) -> Vec<GroupSummary> {
        let Some(groups) = self.node.groups() else {
            return Vec::new();
        };
        groups
            .entries()
            .map(|(conv, entry)| GroupSummary {
                conversation: *conv,
                kind: entry.group_kind(),
                status: entry.status.clone(),
                epoch: groups.epoch(*conv),
                members: entry
                    .members
                    .iter()
                    .map(|m| (DeviceId::from_bytes(*m.device), UserId::from_bytes(*m.user)))
                    .collect(),
                queued: entry.intents.len(),
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
                        self.link_tx.clone(),
                    ));
                }
                NodeOutput::Send(conn, bytes) => {
                    if let Some(w) = self.writers.get(&conn) {
                        if w.try_send(WriterCommand::Frame(bytes)).is_err() {
                            tracing::warn!("gateway reads too slowly; reconnecting");
                            self.writers.remove(&conn);
                            self.node.handle(self.clock.now(), NodeInput::Closed(conn));
                        }
                    }
                }
                NodeOutput::Close(conn) => {
                    if let Some(w) = self.writers.remove(&conn) {
                        let _ = w.try_send(WriterCommand::Close);
                    }
                }
                NodeOutput::Event(event) => {
                    let _ = self.events.send(event);
                }
            }
        }
    }
}

async fn connect(
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    conn: ConnectionId,
    link: mpsc::Sender<LinkInput>,
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
            let _ = link.send(LinkInput::ConnectFailed(e)).await;
            return;
        }
        Err(_) => {
            let _ = link
                .send(LinkInput::ConnectFailed("timed out".into()))
                .await;
            return;
        }
    };
    let (writer_tx, writer_rx) = mpsc::channel(WRITER_QUEUE_MAX);
    if link
        .send(LinkInput::Connected(conn, writer_tx))
        .await
        .is_err()
    {
        return;
    }
    tokio::spawn(quic::write_frames(
        send,
        writer_rx,
        connection.clone(),
        Duration::from_millis(200),
        b"closed by node",
    ));
    let mut reader = FrameReader::new(recv);
    while let Ok(frame) = reader.next().await {
        if link.send(LinkInput::Frame(conn, frame)).await.is_err() {
            return;
        }
    }
    let _ = link.send(LinkInput::Closed(conn)).await;
}
