//! The gateway's tokio driver: moves bytes and time between quinn, redb and the state machine.
//!
//! One task (the core) owns the [`Gateway`] state machine; a commit thread owns the
//! [`RedbStore`] ([`Committer`]). Each QUIC connection gets a task that completes the QUIC
//! handshake and tells the core at once (the state machine's hello timeout runs from there,
//! whatever the peer does), then waits for the session's stream and hands it to the runtime's
//! session reader and writer ([`session::spawn`]). The core takes the frames of up to
//! [`BATCH_MAX`] frames' worth of input, feeds them to the state machine, merges the resulting
//! `Ready`s into one job for the committer, and goes on with the next inputs while the commit
//! runs; outputs reach the writers only when their commit is back, so no acknowledgement leaves
//! before its commit.
//!
//! What the driver adds to the machine is only what the machine cannot see: connection limits
//! per source address and in total, a peer that reads too slowly (closed at once), log lines for
//! refusals (rate-limited, with the peer's address), and the stop of the whole gateway when its
//! store fails: a gateway that cannot commit must not keep accepting connections.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::CertificateDer;
use sund_model::env::{Ready, Store, StoreError, WriteBatch};
use sund_model::gateway::files::BLOBS_TABLE;
use sund_model::gateway::limits::SourceAddress;
use sund_model::gateway::peer_crls::PeerCrlTaken;
use sund_model::gateway::{
    AdminAnswer, AdminCommand, ChunkToServe, Gateway, GatewayConfig, GatewayInput, GatewayOutput,
    GatewayStats, HistoryKind,
};
use sund_model::ids::ConnectionId;
use sund_model::time::Instant;
use sund_model::trust::{EnrolmentToken, RegistrationAuthority};
use sund_model::wire::{Frame, Payload, PAYLOAD_BYTES_MAX};
use sund_runtime::clock::DriverClock;
use sund_runtime::committer::Committer;
use sund_runtime::endpoint::{self, QuicError};
use sund_runtime::environment::Environment;
use sund_runtime::files::private_dir;
use sund_runtime::metrics::{StageReport, Stages};
use sund_runtime::session::{self, CloseCause, SessionEvent, SessionHandle, SessionLimits};
use sund_runtime::store::{RedbReader, RedbStore};
use sund_runtime::tls::TlsIdentity;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::chunks::{accept_chunk_streams, ChunkServer, QueueRefused};
use crate::federation::{is_link, FederationOptions, LinkRoute, Links};
use sund_model::federation::{FederationInput, FederationOutput};

/// Most frames folded into one commit.
pub const BATCH_MAX: usize = 512;
/// Most frames queued for one connection; a peer that reads slower than this is disconnected.
pub const WRITER_QUEUE_MAX: usize = 4096;
/// Most connection reports (connects, batches of frames, closes) waiting for the core.
pub const LINK_QUEUE_MAX: usize = 16_384;
/// Most admin commands waiting for the core.
pub const CONTROL_QUEUE_MAX: usize = 1024;
/// Most connections from one address at once.
pub const CONNECTIONS_PER_ADDRESS_MAX: usize = 256;
/// Most connections at once.
pub const CONNECTIONS_MAX: usize = 100_000;
/// How long a goodbye may take to reach its peer before the connection closes anyway.
pub const LINGER: Duration = Duration::from_millis(500);
/// How long shutdown waits for the endpoint to go idle.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);
/// At most one log line per refusal code per this interval (the rest are counted).
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Why the gateway could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// QUIC or TLS setup.
    #[error(transparent)]
    Quic(#[from] QuicError),
    /// The store.
    #[error("storage: {0}")]
    Store(#[from] sund_model::env::StoreError),
    /// The data directory or a secret file is accessible to other users.
    #[error(transparent)]
    Private(#[from] sund_runtime::files::FileError),
    /// The data directory.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
}

/// What a gateway needs to start.
#[derive(Clone)]
pub struct GatewayOptions {
    /// Where to listen (port 0 picks one).
    pub listen: SocketAddr,
    /// Where its clock, randomness, network and commits come from.
    pub environment: Arc<dyn Environment>,
    /// Where the database and the TLS identity live.
    pub data_dir: PathBuf,
    /// Protocol tunables.
    pub config: GatewayConfig,
    /// Where links to federation peers are accepted and where the peers are (`None`: no
    /// federation; the peers' domains and roots are in `config.federation_peers`).
    pub federation: Option<FederationOptions>,
}

/// A running gateway.
pub struct GatewayHandle {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its certificate (nodes pin it).
    pub cert: CertificateDer<'static>,
    /// The address its federation endpoint listens on, if it federates.
    pub federation_addr: Option<SocketAddr>,
    control: mpsc::Sender<Control>,
    shutdown: Option<oneshot::Sender<()>>,
    core: JoinHandle<Result<GatewayStats, DriverError>>,
    endpoint: quinn::Endpoint,
    stages: Arc<Stages>,
    health: Arc<Mutex<Health>>,
}

impl GatewayHandle {
    /// Whether the gateway serves, or waits for its store.
    pub fn health(&self) -> Health {
        self.health.lock().expect("not poisoned").clone()
    }

    /// Where the core's time went so far, stage by stage (microseconds; commit sizes in writes).
    pub fn stages(&self) -> StageReport {
        self.stages.report()
    }

    /// The stage histograms themselves, for a reader elsewhere (the metrics endpoint).
    pub fn stage_histograms(&self) -> Arc<Stages> {
        self.stages.clone()
    }

    /// Starts the stage histograms afresh (see [`Stages::reset`]).
    pub fn reset_stages(&self) {
        self.stages.reset();
    }

    /// Carries out an operator's command on the running gateway; the answer comes once the
    /// commit that makes it true is durable. `None` if the gateway stopped.
    pub async fn admin(&self, command: AdminCommand) -> Option<AdminAnswer> {
        self.admin_client().admin(command).await
    }

    /// A handle for operator requests that others (the control socket) can hold.
    pub fn admin_client(&self) -> AdminClient {
        AdminClient {
            control: self.control.clone(),
        }
    }

    /// Issues a one-time enrolment token for a new device of `user` (a name in this gateway's
    /// domain), once it is stored. `None` if the gateway stopped or does not enrol that user.
    pub async fn enrolment_token(&self, user: &str) -> Option<EnrolmentToken> {
        match self
            .admin(AdminCommand::IssueEnrolmentToken(user.to_string()))
            .await?
        {
            AdminAnswer::EnrolmentToken(token, _) => Some(token),
            _ => None,
        }
    }

    /// Resolves if the gateway stops by itself (its store failed): the error says why. Await it
    /// beside the shutdown signal, so that a gateway that cannot commit does not linger.
    pub async fn failed(&mut self) -> DriverError {
        match (&mut self.core).await {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => DriverError::Store(sund_model::env::StoreError::Backend(
                "the gateway core stopped".into(),
            )),
            Err(panic) => DriverError::Store(sund_model::env::StoreError::Backend(format!(
                "the gateway core panicked: {panic}"
            ))),
        }
    }

    /// Graceful shutdown: stop accepting, finish in-flight work, say goodbye, close.
    pub async fn shutdown(mut self) -> Result<GatewayStats, DriverError> {
        self.endpoint.set_server_config(None);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let stats = match self.core.await {
            Ok(result) => result?,
            Err(panic) => {
                return Err(DriverError::Store(sund_model::env::StoreError::Backend(
                    format!("the gateway core panicked: {panic}"),
                )))
            }
        };
        // Each session's writer delivers its goodbye (with the retry hint), then closes its
        // connection (within LINGER): wait for that before closing what is left, or a goodbye
        // still in flight is lost and its device comes back at once.
        let _ = tokio::time::timeout(LINGER * 2, self.endpoint.wait_idle()).await;
        self.endpoint.close(0u32.into(), b"gateway shut down");
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, self.endpoint.wait_idle()).await;
        Ok(stats)
    }
}

/// What a connection's tasks tell the core, in one queue so that each connection's events keep
/// their order (connected, stream, frames, closed).
pub(crate) enum Link {
    /// A QUIC handshake completed: the session's clock starts.
    Connected(ConnectionId, quinn::Connection),
    /// The session's stream is open.
    Stream(ConnectionId, SessionHandle),
    /// The connection ended before its stream opened.
    Gone(ConnectionId),
    /// Frames or the end of the session.
    Session(SessionEvent),
    /// A chunk stream read whole: its head frame and the bytes after it.
    Chunk(ConnectionId, Bytes, Bytes),
    /// A chunk to serve failed its digest check when read from the store.
    ChunkDamaged(ChunkToServe),
    /// A federation link's connection opened (its stream too), dialed to `dialed` or accepted.
    PeerOpened {
        /// The link's connection id (see [`crate::federation::LINK_CONNS`]).
        conn: ConnectionId,
        /// The connection.
        connection: quinn::Connection,
        /// Its TLS channel binding.
        binding: [u8; 32],
        /// The peer this gateway dialed; `None` for a link a peer opened.
        dialed: Option<String>,
    },
    /// A link's session tasks run.
    PeerStream(ConnectionId, SessionHandle),
    /// Dialing a peer failed.
    PeerDialFailed(String),
}

impl From<SessionEvent> for Link {
    fn from(event: SessionEvent) -> Link {
        Link::Session(event)
    }
}

/// What the operator tells the core.
enum Control {
    /// An operator's command and where its answer goes.
    Admin(AdminCommand, oneshot::Sender<AdminAnswer>),
    /// A look at the gateway's state (listings), run by the core between inputs.
    Inspect(Inspection),
    /// A reader of the database (for a backup), while the gateway serves.
    Reader(oneshot::Sender<RedbReader>),
}

/// A look at the running gateway's state: it runs in the core, so it must be quick.
type Inspection = Box<dyn FnOnce(&Gateway, Instant) + Send>;

/// Operator requests to a running gateway: changes through [`AdminCommand`]s, answered once
/// committed, and looks at its state. Cheap to clone; every call returns `None` when the
/// gateway stopped or cannot commit (its store is out).
#[derive(Clone)]
pub struct AdminClient {
    control: mpsc::Sender<Control>,
}

impl AdminClient {
    /// Carries out `command`; the answer comes once the commit that makes it true is durable.
    pub async fn admin(&self, command: AdminCommand) -> Option<AdminAnswer> {
        let (tx, rx) = oneshot::channel();
        self.control.send(Control::Admin(command, tx)).await.ok()?;
        rx.await.ok()
    }

    /// A reader of the gateway's database (it sees the last committed state; a read
    /// transaction is a consistent snapshot while commits go on).
    pub async fn reader(&self) -> Option<RedbReader> {
        let (tx, rx) = oneshot::channel();
        self.control.send(Control::Reader(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Runs `look` on the gateway's state (as the machine holds it: what an answer reported
    /// is committed; what devices did in the last few milliseconds may still be committing).
    pub async fn inspect<T: Send + 'static>(
        &self,
        look: impl FnOnce(&Gateway, Instant) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        let job: Inspection = Box::new(move |gateway, now| {
            let _ = tx.send(look(gateway, now));
        });
        self.control.send(Control::Inspect(job)).await.ok()?;
        rx.await.ok()
    }
}

/// Opens the gateway's database at `path`, with file chunks ([`BLOBS_TABLE`]) in files of
/// their own in `values/` beside it (see [`sund_runtime::value_files`]).
pub fn open_store(
    path: &Path,
    disk: Option<sund_runtime::sim_disk::SimulatedDisk>,
) -> Result<RedbStore, StoreError> {
    let values = path.with_file_name("values");
    let store = match disk {
        Some(disk) => RedbStore::open_with(path, Some(disk))?,
        // An admin command that found a restarting gateway's control socket dead opens the
        // database itself for a moment: wait for it rather than fail to start.
        None => RedbStore::open_patiently(path, STORE_OPEN_PATIENCE)?,
    };
    store.with_value_files(&values, &[BLOBS_TABLE])
}

/// How long a starting gateway waits for another process to let go of its database.
pub const STORE_OPEN_PATIENCE: Duration = Duration::from_secs(5);

/// Starts a gateway: opens (or creates) its data directory, recovers its state, listens.
pub async fn start(options: GatewayOptions) -> Result<GatewayHandle, DriverError> {
    let dir = &options.data_dir;
    private_dir(dir)?;
    let environment = options.environment.clone();
    let store = open_store(&dir.join("gateway.redb"), environment.disk())?;
    // A database with tables but no trust root is damaged: recovering would make a new root
    // and silently turn this into another gateway that none of its devices trust.
    if !store.is_empty()? && RegistrationAuthority::recover(&store)?.is_none() {
        return Err(DriverError::Store(sund_model::env::StoreError::Damaged(
            format!(
                "{} holds data but no trust root: it is damaged. Restore the data directory from a backup",
                dir.join("gateway.redb").display()
            ),
        )));
    }
    // An empty database the gateway did not just create lost its data: a disk that lost
    // writes it had reported durable can leave redb at its empty first commit
    // (`sund_runtime::sim_disk`'s tests found it), or the file was replaced. Starting would
    // make a new trust root, as above.
    if store.is_empty()? && !store.was_created() {
        return Err(DriverError::Store(sund_model::env::StoreError::Damaged(
            empty_database(&dir.join("gateway.redb")),
        )));
    }
    let identity = TlsIdentity::load_or_create(&dir.join("tls"))?;
    let clock = environment.clock();
    let mut gateway = Gateway::recover(
        options.config.clone(),
        clock.now(),
        &store,
        environment.entropy(),
    )?;
    // A new database gets its trust root durably before the gateway listens, so that an
    // empty database at a later start always means lost data.
    let mut store = store;
    if store.is_empty()? {
        while let Some(ready) = gateway.poll_ready() {
            let outputs = ready.commit(&mut store)?;
            assert!(outputs.is_empty(), "a new gateway has no one to answer");
        }
    }
    let endpoint = bind_patiently(options.listen, || {
        endpoint::server_endpoint(environment.as_ref(), options.listen, &identity)
    })
    .await?;
    let addr = endpoint
        .local_addr()
        .map_err(|source| DriverError::DataDir {
            path: "socket".into(),
            source,
        })?;
    tracing::info!(%addr, data_dir = %dir.display(), conversations = gateway.conversations().count(), "gateway listening");
    for (domain, conversations) in gateway.spans_without_peer() {
        tracing::warn!(
            %domain,
            conversations,
            "conversations here span a domain this gateway does not federate with (no [[federation.peer]] for it in the config): its members cannot send into them, and miss every message sequenced here meanwhile even if it becomes a peer again (they are told of a gap); `sund-gateway admin list` names them"
        );
    }

    let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE_MAX);
    let (link_tx, link_rx) = mpsc::channel(LINK_QUEUE_MAX);
    let (shutdown_tx, shutdown_rx) = oneshot::channel();
    let hello_timeout = options.config.hello_timeout;
    tokio::spawn(accept_loop(
        endpoint.clone(),
        link_tx.clone(),
        hello_timeout,
    ));
    let federation = match &options.federation {
        Some(links) if !options.config.federation_peers.is_empty() => {
            let (endpoint, client) = bind_patiently(links.listen, || {
                endpoint::federation_endpoint(environment.as_ref(), links.listen, &identity)
            })
            .await?;
            let links = Links::start(endpoint, client, links, link_tx.clone());
            tracing::info!(addr = %links.addr, peers = options.config.federation_peers.len(), domain = %options.config.domain, "federation listening");
            Some(links)
        }
        _ => None,
    };
    let federation_addr = federation.as_ref().map(|l| l.addr);
    let stages = Arc::new(Stages::default());
    let reader = store.reader();
    let committer =
        Committer::with_stages(environment.commit_mode(), store, "gateway", stages.clone());
    let health = Arc::new(Mutex::new(Health::Serving));
    let core = Core {
        stages: stages.clone(),
        environment: environment.clone(),
        config: options.config.clone(),
        store_path: dir.join("gateway.redb"),
        clock,
        serving: Some(Serving {
            gateway,
            committer,
            reader,
        }),
        links: link_tx.clone(),
        health: health.clone(),
        retry_at: tokio::time::Instant::now(),
        outages: 0,
        outage_logged_at: None,
        routes: BTreeMap::new(),
        admin: BTreeMap::new(),
        next_admin: 0,
        refusals: RefusalLog::default(),
        federation,
    };
    let core = tokio::spawn(core.run(control_rx, link_rx, shutdown_rx));
    Ok(GatewayHandle {
        addr,
        federation_addr,
        cert: identity.cert.clone(),
        control: control_tx,
        shutdown: Some(shutdown_tx),
        core,
        endpoint,
        stages,
        health,
    })
}

/// Words for a gateway database that opened empty though it existed before.
pub fn empty_database(path: &std::path::Path) -> String {
    format!(
        "{} holds no data, but the file existed before: the database lost its data (for example a disk that lost writes in a power cut) or was replaced. Restore the data directory from a backup. Only if this gateway never enrolled a device, delete the file to start anew",
        path.display()
    )
}

/// Connections open per source address, and in all, within limits (the device listener's and
/// the federation listener's).
pub(crate) struct Admission {
    per_address: BTreeMap<IpAddr, usize>,
    total: usize,
    per_address_max: usize,
    total_max: usize,
}

impl Admission {
    /// No connection yet; at most `per_address_max` from one address, `total_max` in all.
    pub(crate) fn new(per_address_max: usize, total_max: usize) -> Admission {
        Admission {
            per_address: BTreeMap::new(),
            total: 0,
            per_address_max,
            total_max,
        }
    }

    /// Counts a connection from `ip`, or refuses it (false) past a limit.
    pub(crate) fn admit(&mut self, ip: IpAddr) -> bool {
        let here = self.per_address.entry(ip).or_default();
        if *here >= self.per_address_max || self.total >= self.total_max {
            return false;
        }
        *here += 1;
        self.total += 1;
        true
    }

    /// A connection from `ip` is gone.
    pub(crate) fn release(&mut self, ip: IpAddr) {
        if let Some(here) = self.per_address.get_mut(&ip) {
            *here -= 1;
            if *here == 0 {
                self.per_address.remove(&ip);
            }
        }
        self.total = self.total.saturating_sub(1);
    }
}

/// How long a start waits for its port while it is in use.
const BIND_PATIENCE: Duration = Duration::from_secs(2);

/// Binds with `bind`, trying again for up to [`BIND_PATIENCE`] while `addr`'s port is in use:
/// a gateway started again in the same process right after [`GatewayHandle::shutdown`] (or
/// just after its previous process exited) finds its port held for a moment by the previous
/// incarnation's socket, which closes only as that endpoint's last task ends. Anything else,
/// or a port still taken after the wait (another process's), fails at once / then.
async fn bind_patiently<T>(
    addr: SocketAddr,
    mut bind: impl FnMut() -> Result<T, QuicError>,
) -> Result<T, QuicError> {
    let give_up = tokio::time::Instant::now() + BIND_PATIENCE;
    loop {
        match bind() {
            Err(QuicError::Bind { source, .. })
                if source.kind() == std::io::ErrorKind::AddrInUse
                    && addr.port() != 0
                    && tokio::time::Instant::now() < give_up =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    links: mpsc::Sender<Link>,
    hello_timeout: Duration,
) {
    let admission = Arc::new(Mutex::new(Admission::new(
        CONNECTIONS_PER_ADDRESS_MAX,
        CONNECTIONS_MAX,
    )));
    let mut next_conn = 1u64;
    let mut refused_logged: Option<tokio::time::Instant> = None;
    while let Some(incoming) = endpoint.accept().await {
        let ip = incoming.remote_address().ip();
        if !admission.lock().expect("not poisoned").admit(ip) {
            let now = tokio::time::Instant::now();
            if refused_logged.is_none_or(|at| now >= at + REFUSAL_LOG_INTERVAL) {
                refused_logged = Some(now);
                tracing::warn!(%ip, per_address_max = CONNECTIONS_PER_ADDRESS_MAX, total_max = CONNECTIONS_MAX, "connection refused: too many connections");
            }
            incoming.refuse();
            continue;
        }
        let conn = ConnectionId(next_conn);
        next_conn += 1;
        let links = links.clone();
        let admission = admission.clone();
        tokio::spawn(async move {
            serve_connection(incoming, conn, links, hello_timeout).await;
            admission.lock().expect("not poisoned").release(ip);
        });
    }
}

/// One connection: the QUIC handshake, then (within the hello timeout) its stream.
async fn serve_connection(
    incoming: quinn::Incoming,
    conn: ConnectionId,
    links: mpsc::Sender<Link>,
    hello_timeout: Duration,
) {
    let connection = match tokio::time::timeout(hello_timeout, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(?conn, error = %e, "QUIC handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(?conn, "QUIC handshake not completed in time");
            return;
        }
    };
    if links
        .send(Link::Connected(conn, connection.clone()))
        .await
        .is_err()
    {
        return;
    }
    // The state machine closes a connection that has not said hello within `hello_timeout`
    // of now; the stream must come within that too.
    let stream = tokio::time::timeout(hello_timeout, connection.accept_bi()).await;
    let (send, recv) = match stream {
        Ok(Ok(pair)) => pair,
        Ok(Err(_)) | Err(_) => {
            connection.close(2u32.into(), b"no stream opened in time");
            let _ = links.send(Link::Gone(conn)).await;
            return;
        }
    };
    let limits = SessionLimits {
        writer_queue_max: WRITER_QUEUE_MAX,
        linger: LINGER,
        reason: b"closed by gateway",
    };
    // The reader's frames follow `Connected` in the one queue (the machine has accepted the
    // connection by then); what the machine answers before `Stream` reaches the core waits in the
    // route's `early` frames.
    let handle = session::spawn(conn, connection.clone(), send, recv, links.clone(), limits);
    if links.send(Link::Stream(conn, handle)).await.is_err() {
        return;
    }
    tokio::spawn(accept_chunk_streams(conn, connection.clone(), links));
    // Keep the admission slot until the connection is really gone.
    connection.closed().await;
}

/// A connection as the core knows it.
struct Route {
    connection: quinn::Connection,
    session: Option<SessionHandle>,
    /// Serves the chunks the device asks for; started at its first request.
    chunks: Option<ChunkServer>,
    /// Frames released before the stream opened (a goodbye to a peer that never opened one).
    early: Vec<Bytes>,
}

/// Logs each refusal the gateway sends, at most one line per code per interval.
#[derive(Default)]
struct RefusalLog {
    last: BTreeMap<u16, (tokio::time::Instant, u64)>,
}

impl RefusalLog {
    /// If `frame` is an error or a goodbye, logs it (rate-limited) with the peer's address.
    fn observe(&mut self, peer: Option<SocketAddr>, conn: ConnectionId, frame: &Bytes) {
        let Ok(frame) = Frame::decode(frame, PAYLOAD_BYTES_MAX) else {
            return;
        };
        let (code, message, goodbye) = match frame.payload {
            Payload::Goodbye(g) => (g.code, g.message, true),
            Payload::Error(e) => (e.code, e.message, false),
            _ => return,
        };
        let now = tokio::time::Instant::now();
        let entry = self
            .last
            .entry(code)
            .or_insert((now - REFUSAL_LOG_INTERVAL, 0));
        if now < entry.0 + REFUSAL_LOG_INTERVAL {
            entry.1 += 1;
            return;
        }
        let suppressed = std::mem::take(&mut entry.1);
        entry.0 = now;
        let code = sund_model::wire::payload::ErrorCode::from_u16(code);
        let peer = peer.map_or_else(|| "-".to_string(), |p| p.to_string());
        if goodbye {
            tracing::info!(%peer, ?conn, ?code, %message, suppressed, "session refused");
        } else {
            tracing::info!(%peer, ?conn, ?code, %message, suppressed, "request refused");
        }
    }
}

/// Whether the gateway can serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Serving.
    Serving,
    /// Its store cannot commit (a full disk): it refuses every connection, and recovers by
    /// itself once a commit succeeds again.
    StorageUnavailable {
        /// What the store said.
        reason: String,
    },
}

/// How often a gateway whose store failed tries to commit again.
pub const STORAGE_RETRY: Duration = Duration::from_secs(1);
/// The QUIC close code of a connection whose stream ended in the middle of a frame.
pub const CLOSE_TORN_FRAME: u32 = 4;
/// The QUIC close code of connections refused while the store is unavailable.
pub const CLOSE_STORAGE_UNAVAILABLE: u32 = 3;
/// What devices are told when the store is unavailable (their users read it).
const STORAGE_UNAVAILABLE_REASON: &[u8] =
    b"the gateway cannot store messages right now (its disk may be full or failing); retry later";

/// The machine and its committer, while the store works.
struct Serving {
    gateway: Gateway,
    committer: Committer<GatewayOutput>,
    /// Reads the committed store beside the committer (file chunks to serve).
    reader: RedbReader,
}

/// Waits for the next finished commit, or forever while not serving.
async fn completed(serving: &mut Option<Serving>) -> Result<Vec<GatewayOutput>, StoreError> {
    match serving {
        Some(s) => s.committer.completed().await,
        None => std::future::pending().await,
    }
}

struct Core {
    stages: Arc<Stages>,
    environment: Arc<dyn Environment>,
    config: GatewayConfig,
    store_path: PathBuf,
    clock: DriverClock,
    /// `None` while the store is unavailable.
    serving: Option<Serving>,
    health: Arc<Mutex<Health>>,
    /// While the store is unavailable: when to try it again.
    retry_at: tokio::time::Instant,
    /// How many times the store became unavailable.
    outages: u64,
    /// When an outage was last logged.
    outage_logged_at: Option<tokio::time::Instant>,
    routes: BTreeMap<ConnectionId, Route>,
    /// The connections' queue to the core, for tasks the core starts (chunk servers).
    links: mpsc::Sender<Link>,
    admin: BTreeMap<u64, oneshot::Sender<AdminAnswer>>,
    next_admin: u64,
    refusals: RefusalLog,
    /// Links to federation peers (`None`: this gateway does not federate).
    federation: Option<Links>,
}

impl Core {
    async fn run(
        mut self,
        mut control: mpsc::Receiver<Control>,
        mut links: mpsc::Receiver<Link>,
        mut shutdown: oneshot::Receiver<()>,
    ) -> Result<GatewayStats, DriverError> {
        let mut last_gc = 0;
        loop {
            let (deadline, saturated) = match &self.serving {
                Some(s) => (
                    self.clock.deadline(s.gateway.poll_timeout()),
                    s.committer.is_saturated(),
                ),
                None => (self.retry_at, false),
            };
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                done = completed(&mut self.serving) => match done {
                    Ok(outputs) => {
                        let started = tokio::time::Instant::now();
                        self.release(outputs);
                        self.stages.release.record_duration(started.elapsed());
                    }
                    Err(e @ (StoreError::Backend(_) | StoreError::Refused(_))) => self.storage_lost(e),
                    Err(e) => {
                        tracing::error!(error = %e, "the store failed: the gateway stops");
                        return Err(e.into());
                    }
                },
                input = control.recv() => {
                    let Some(input) = input else { break };
                    self.control(input);
                }
                // While too many commits wait, leave input in the queue: the readers then block
                // and QUIC flow control pushes back on the senders.
                first = links.recv(), if !saturated => {
                    let Some(first) = first else { break };
                    let started = tokio::time::Instant::now();
                    let mut frames = self.link(first);
                    // Group commit: take what else is already waiting, up to a bound.
                    while frames < BATCH_MAX {
                        match links.try_recv() {
                            Ok(event) => frames += self.link(event),
                            Err(_) => break,
                        }
                    }
                    self.stages.machine.record_duration(started.elapsed());
                }
                _ = tokio::time::sleep_until(deadline) => {
                    let now = self.clock.now();
                    match &mut self.serving {
                        Some(s) => s.gateway.handle_timeout(now),
                        None => self.try_storage()?,
                    }
                }
            }
            self.submit();
            if let Some(s) = &self.serving {
                let gc_dropped = s.gateway.delivery_stats().gc_dropped;
                if gc_dropped != last_gc {
                    last_gc = gc_dropped;
                    tracing::debug!(
                        gc_dropped_total = last_gc,
                        "garbage collection dropped acknowledged or expired messages"
                    );
                }
            }
        }
        let Some(mut serving) = self.serving.take() else {
            if let Some(links) = &mut self.federation {
                links.close_all();
            }
            for (_, route) in std::mem::take(&mut self.routes) {
                route.connection.close(0u32.into(), b"gateway shut down");
            }
            return Ok(GatewayStats::default());
        };
        tracing::info!(
            sessions = serving.gateway.session_count(),
            "shutting down: saying goodbye to every session"
        );
        let now = self.clock.now();
        serving.gateway.shut_down(now);
        self.serving = Some(serving);
        self.submit();
        let mut serving = self.serving.take().expect("set above");
        while serving.committer.is_busy() {
            let done = serving.committer.completed().await?;
            self.serving = Some(serving);
            self.release(done);
            self.submit();
            serving = self.serving.take().expect("set above");
        }
        let Serving {
            gateway, committer, ..
        } = serving;
        committer.finish().await?;
        // Dropping the sessions lets each writer flush its goodbye and close (within LINGER);
        // each federation link's goodbye went the same way (the machine closed them).
        for (_, route) in std::mem::take(&mut self.routes) {
            if let Some(session) = route.session {
                session.close();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Some(links) = &mut self.federation {
            links.close_all();
        }
        Ok(gateway.stats())
    }

    /// The store failed to commit in a way that may pass (a full disk): what the machine held
    /// in memory beyond the last commit is gone with it, so the machine goes, every session
    /// ends (devices keep their unacknowledged messages and retry), and the gateway refuses
    /// connections until a commit succeeds again.
    fn storage_lost(&mut self, error: StoreError) {
        self.outages += 1;
        let now = tokio::time::Instant::now();
        // Logged once, and again at most once a minute while it keeps failing (a disk that
        // stays nearly full fails again soon after each recovery).
        if self
            .outage_logged_at
            .is_none_or(|at| now.duration_since(at) >= OUTAGE_LOG_EVERY)
        {
            self.outage_logged_at = Some(now);
            tracing::error!(
                error = %error,
                sessions = self.routes.len(),
                outages_total = self.outages,
                "the store cannot commit: refusing every connection until it can again (devices keep their messages and retry)"
            );
        }
        *self.health.lock().expect("not poisoned") = Health::StorageUnavailable {
            reason: error.to_string(),
        };
        // Its commit thread stopped after the failure; what it held is not durable.
        self.serving = None;
        self.admin.clear();
        for (_, route) in std::mem::take(&mut self.routes) {
            route
                .connection
                .close(CLOSE_STORAGE_UNAVAILABLE.into(), STORAGE_UNAVAILABLE_REASON);
        }
        // The federation machine goes with the rest: its links end too (the machine recovered
        // later dials or is dialed again), rather than linger unknown to it.
        if let Some(links) = &mut self.federation {
            links.close_links();
        }
        self.retry_at = tokio::time::Instant::now() + STORAGE_RETRY;
    }

    /// While the store is unavailable: tries to open it and commit; on success recovers the
    /// machine from what is durable and serves again.
    fn try_storage(&mut self) -> Result<(), DriverError> {
        self.retry_at = tokio::time::Instant::now() + STORAGE_RETRY;
        let mut store = match open_store(&self.store_path, self.environment.disk()) {
            Ok(store) => store,
            Err(e @ StoreError::Damaged(_)) => return Err(e.into()),
            Err(e) => {
                tracing::debug!(error = %e, "the store is still unavailable");
                return Ok(());
            }
        };
        // The probe commits a megabyte, then frees it in a second commit (within one the
        // store would never write it): a store that can take it has room for the commits that
        // follow, so a disk that is still nearly full does not flap.
        let mut fill = WriteBatch::default();
        fill.put(PROBE_TABLE, b"probe".to_vec(), vec![0; PROBE_BYTES]);
        let mut free = WriteBatch::default();
        free.delete(PROBE_TABLE, b"probe".to_vec());
        if let Err(e) = store.commit(fill).and_then(|()| store.commit(free)) {
            tracing::debug!(error = %e, "the store still cannot commit");
            return Ok(());
        }
        let gateway = Gateway::recover(
            self.config.clone(),
            self.clock.now(),
            &store,
            self.environment.entropy(),
        )?;
        let reader = store.reader();
        let committer = Committer::with_stages(
            self.environment.commit_mode(),
            store,
            "gateway",
            self.stages.clone(),
        );
        self.serving = Some(Serving {
            gateway,
            committer,
            reader,
        });
        *self.health.lock().expect("not poisoned") = Health::Serving;
        tracing::info!(
            outages_total = self.outages,
            "the store commits again: serving"
        );
        Ok(())
    }

    fn control(&mut self, input: Control) {
        let now = self.clock.now();
        match input {
            Control::Admin(command, reply) => {
                let Some(s) = &mut self.serving else {
                    return; // dropping `reply` tells the caller the gateway cannot answer now
                };
                let request = self.next_admin;
                self.next_admin += 1;
                self.admin.insert(request, reply);
                s.gateway
                    .handle(now, GatewayInput::Admin { request, command });
            }
            Control::Reader(reply) => {
                if let Some(s) = &self.serving {
                    let _ = reply.send(s.reader.clone());
                }
            }
            Control::Inspect(look) => {
                if let Some(s) = &self.serving {
                    look(&s.gateway, now);
                } // else dropping `look` tells the caller the gateway cannot answer now
            }
        }
    }

    /// Feeds what a connection's tasks reported to the machine; returns how many frames it
    /// carried (at least one, to bound a round).
    fn link(&mut self, event: Link) -> usize {
        let now = self.clock.now();
        match event {
            Link::Session(event) => return self.session(event),
            Link::Connected(conn, connection) => {
                let Some(s) = &mut self.serving else {
                    connection.close(CLOSE_STORAGE_UNAVAILABLE.into(), STORAGE_UNAVAILABLE_REASON);
                    return 1;
                };
                let source = SourceAddress::of(connection.remote_address().ip());
                self.routes.insert(
                    conn,
                    Route {
                        connection,
                        session: None,
                        chunks: None,
                        early: Vec::new(),
                    },
                );
                s.gateway
                    .handle(now, GatewayInput::AcceptedFrom(conn, source));
            }
            Link::Stream(conn, session) => match self.routes.get_mut(&conn) {
                Some(route) => {
                    for frame in route.early.drain(..) {
                        let _ = session.send(frame);
                    }
                    route.session = Some(session);
                }
                // The machine closed the connection before its stream came.
                None => session.abort("closed by gateway"),
            },
            Link::Gone(conn) => self.forget(now, conn),
            Link::Chunk(conn, head, body) => {
                if let Some(s) = &mut self.serving {
                    s.gateway
                        .handle(now, GatewayInput::Chunk { conn, head, body });
                }
            }
            Link::PeerOpened {
                conn,
                connection,
                binding,
                dialed,
            } => {
                let (Some(s), Some(links)) = (&mut self.serving, &mut self.federation) else {
                    connection.close(CLOSE_STORAGE_UNAVAILABLE.into(), STORAGE_UNAVAILABLE_REASON);
                    return 1;
                };
                links.routes.insert(
                    conn,
                    LinkRoute {
                        connection,
                        session: None,
                        early: Vec::new(),
                    },
                );
                let input = match dialed {
                    Some(peer) => FederationInput::Connected {
                        peer,
                        conn,
                        binding,
                    },
                    None => FederationInput::Accepted(conn, binding),
                };
                s.gateway.handle(now, GatewayInput::Federation(input));
            }
            Link::PeerStream(conn, session) => {
                match self
                    .federation
                    .as_mut()
                    .and_then(|l| l.routes.get_mut(&conn))
                {
                    Some(route) => {
                        for frame in route.early.drain(..) {
                            let _ = session.send(frame);
                        }
                        route.session = Some(session);
                    }
                    None => session.abort("link closed by gateway"),
                }
            }
            Link::PeerDialFailed(peer) => {
                if let Some(s) = &mut self.serving {
                    s.gateway.handle(
                        now,
                        GatewayInput::Federation(FederationInput::ConnectFailed { peer }),
                    );
                }
            }
            Link::ChunkDamaged(chunk) => {
                tracing::error!(
                    conversation = %chunk.conversation,
                    chunk = %chunk.id,
                    "a stored file chunk is damaged (its bytes no longer match what was stored): it was not sent, and its uploader is asked for it again. Check the disk"
                );
                if let Some(s) = &mut self.serving {
                    s.gateway.handle(now, GatewayInput::ChunkDamaged(chunk));
                }
            }
        }
        1
    }

    /// Feeds a session's report to the machine; returns how many frames it carried.
    fn session(&mut self, event: SessionEvent) -> usize {
        let now = self.clock.now();
        match event {
            SessionEvent::Frames(conn, frames, _) if is_link(conn) => {
                let count = frames.len();
                if let Some(s) = &mut self.serving {
                    for frame in frames {
                        s.gateway.handle(
                            now,
                            GatewayInput::Federation(FederationInput::Frame(conn, frame)),
                        );
                    }
                }
                count
            }
            SessionEvent::Closed(conn, cause) if is_link(conn) => {
                let gone = self
                    .federation
                    .as_mut()
                    .and_then(|l| l.routes.remove(&conn));
                if let Some(route) = gone {
                    tracing::debug!(peer = %route.connection.remote_address(), ?conn, ?cause, "a federation link's connection ended");
                    if let Some(s) = &mut self.serving {
                        s.gateway
                            .handle(now, GatewayInput::Federation(FederationInput::Closed(conn)));
                    }
                }
                1
            }
            SessionEvent::Frames(conn, frames, read_at) => {
                self.stages.queued.record_duration(read_at.elapsed());
                let count = frames.len();
                let Some(s) = &mut self.serving else {
                    return count; // its connection was closed when the store failed
                };
                for frame in frames {
                    s.gateway.handle(now, GatewayInput::Frame(conn, frame));
                }
                count
            }
            SessionEvent::Closed(conn, cause) => {
                let peer = self
                    .routes
                    .get(&conn)
                    .map(|r| r.connection.remote_address());
                match cause {
                    CloseCause::Ended | CloseCause::Reset => {}
                    CloseCause::PeerClosed { code, reason } => {
                        tracing::debug!(?peer, ?conn, code, %reason, "the device closed its connection");
                    }
                    CloseCause::InvalidFrame(e) => {
                        tracing::info!(?peer, ?conn, error = %e, "connection closed after an invalid frame");
                    }
                    CloseCause::TornFrame { bytes } => {
                        tracing::info!(
                            ?peer,
                            ?conn,
                            bytes,
                            "connection ended in the middle of a frame"
                        );
                        // The peer finished its stream but may still read: say why it is over.
                        if let Some(route) = self.routes.get(&conn) {
                            route.connection.close(
                                CLOSE_TORN_FRAME.into(),
                                b"your stream ended in the middle of a frame",
                            );
                        }
                    }
                }
                self.forget(now, conn);
                1
            }
        }
    }

    fn forget(&mut self, now: Instant, conn: ConnectionId) {
        if self.routes.remove(&conn).is_some() {
            if let Some(s) = &mut self.serving {
                s.gateway.handle(now, GatewayInput::Closed(conn));
            }
        }
    }

    /// Hands everything the state machine produced to the committer as one job.
    fn submit(&mut self) {
        let Some(s) = &mut self.serving else {
            return;
        };
        let mut batch: Option<Ready<GatewayOutput>> = None;
        while let Some(ready) = s.gateway.poll_ready() {
            match &mut batch {
                Some(b) => b.merge(ready),
                None => batch = Some(ready),
            }
        }
        if let Some(batch) = batch {
            s.committer.submit(batch);
        }
    }

    /// Carries out the outputs a finished commit released.
    fn release(&mut self, outputs: Vec<GatewayOutput>) {
        let now = self.clock.now();
        for output in outputs {
            match output {
                GatewayOutput::Send(conn, bytes) => {
                    let Some(route) = self.routes.get_mut(&conn) else {
                        continue;
                    };
                    self.refusals
                        .observe(Some(route.connection.remote_address()), conn, &bytes);
                    let Some(session) = &route.session else {
                        route.early.push(bytes);
                        continue;
                    };
                    if let Err(full) = session.send(bytes) {
                        tracing::warn!(peer = %route.connection.remote_address(), ?conn, error = %full, "disconnecting a peer that does not read");
                        if let Some(route) = self.routes.remove(&conn) {
                            match route.session {
                                Some(session) => session.abort("the peer does not read"),
                                None => route.connection.close(1u32.into(), b"not reading"),
                            }
                        }
                        if let Some(s) = &mut self.serving {
                            s.gateway.handle(now, GatewayInput::Closed(conn));
                        }
                    }
                }
                GatewayOutput::Close(conn) => {
                    if let Some(route) = self.routes.remove(&conn) {
                        match route.session {
                            Some(session) => session.close(),
                            None => route.connection.close(0u32.into(), b"closed by gateway"),
                        }
                    }
                }
                GatewayOutput::Admin { request, answer } => {
                    if let Some(reply) = self.admin.remove(&request) {
                        let _ = reply.send(answer);
                    }
                }
                GatewayOutput::ServeChunk(chunk) => self.serve_chunk(chunk),
                GatewayOutput::Federation(output) => self.federation_output(output),
                GatewayOutput::PauseReading(conn, pause) => {
                    // A device's session, or a federation link whose peer relayed past its
                    // limit.
                    let session = if is_link(conn) {
                        self.federation
                            .as_ref()
                            .and_then(|links| links.routes.get(&conn))
                            .and_then(|r| r.session.as_ref())
                    } else {
                        self.routes.get(&conn).and_then(|r| r.session.as_ref())
                    };
                    if let Some(session) = session {
                        session.pause_reading(pause);
                    }
                }
                GatewayOutput::PeerCrl(event) => match &event.outcome {
                    PeerCrlTaken::Taken { version, revoked } => tracing::info!(
                        peer = %event.peer,
                        version,
                        revoked,
                        "took {}'s CRL: its revoked devices can send through this gateway no more",
                        event.peer
                    ),
                    PeerCrlTaken::Refused(why) => tracing::warn!(
                        peer = %event.peer,
                        %why,
                        "refused {}'s CRL; check that its root fingerprint in [[federation.peer]] is right",
                        event.peer
                    ),
                    PeerCrlTaken::Stale { .. } => {}
                },
                GatewayOutput::PeerIgnoresHints { peer, pause } => tracing::warn!(
                    %peer,
                    pause_ms = pause.as_millis() as u64,
                    "{peer} goes on relaying past the peer_limited hints it was given: this gateway stops reading its link for a while at each such relay, so that QUIC holds it back (`sund-gateway admin federation` counts them); its operator should check why its gateway does not pass the hints on"
                ),
                GatewayOutput::PeerLimited { peer, rate } => tracing::warn!(
                    %peer,
                    "{peer} relays more than {} into conversations homed here; the excess is refused (peer_limited) and its devices send again later. If this traffic is expected, raise peer_relays_per_second in [limits]",
                    sund_model::gateway::limits::describe(rate)
                ),
                GatewayOutput::HandedOver(done) => match &done.declined {
                    None => tracing::info!(
                        conversation = %done.conversation,
                        to = %done.to,
                        last_seq = done.last_seq,
                        frozen_ms = done.frozen_for.as_millis() as u64,
                        "handover done: the conversation's authority is {} now; this gateway keeps a replica and relays its devices' messages there",
                        done.to
                    ),
                    Some(reason) => tracing::warn!(
                        conversation = %done.conversation,
                        to = %done.to,
                        %reason,
                        "handover declined: this gateway sequences the conversation again"
                    ),
                },
                GatewayOutput::HistoryLost(lost) => match lost.kind {
                    HistoryKind::Lost => tracing::error!(
                        conversation = %lost.conversation,
                        device = %lost.device,
                        from = lost.from,
                        to = lost.to,
                        "this gateway lost messages it had acknowledged: a device has read up to seq {} of a conversation whose log ends before it. The disk lost writes it had reported durable (a volatile write cache, or a copy of the data directory restored from an older backup). The seqs are marked lost and the members told; check the disk's write cache settings",
                        lost.to
                    ),
                    HistoryKind::Diverged => tracing::error!(
                        conversation = %lost.conversation,
                        device = %lost.device,
                        from = lost.from,
                        to = lost.to,
                        "a device read messages this gateway has since lost, at seqs now given to other messages: the device was told its history diverged. The disk lost writes it had reported durable (a volatile write cache), or the data directory was restored from an older backup; check the disk's write cache settings"
                    ),
                },
            }
        }
    }
}

impl Core {
    /// Queues a chunk for its connection's chunk server (started at the first).
    /// Carries out what the federation machine asks, and logs what it reports.
    fn federation_output(&mut self, output: FederationOutput) {
        let Some(links) = &mut self.federation else {
            debug_assert!(false, "a federation output without federation links");
            return;
        };
        match output {
            FederationOutput::Connect { peer } => links.dial(peer),
            FederationOutput::Send(conn, frame) => links.send(conn, frame),
            FederationOutput::Close(conn) => links.close(conn),
            FederationOutput::Received { peer, seq, body } => {
                // The gateway took it within the input that brought it (`gateway::relay`).
                tracing::debug!(%peer, seq, bytes = body.len(), "federation entry received");
            }
            FederationOutput::LinkUp { peer } => {
                tracing::info!(%peer, "federation link up");
            }
            FederationOutput::LinkDown {
                peer,
                reason,
                graceful: true,
            } => {
                tracing::info!(%peer, %reason, "federation peer shut down; entries for it wait in its outbox");
            }
            FederationOutput::LinkDown { peer, reason, .. } => {
                tracing::warn!(%peer, %reason, "federation link down; it is dialed again with backoff");
            }
            FederationOutput::HistoryBehind { peer, peer_cursor } => {
                tracing::error!(%peer, peer_cursor, "a federation peer took entries numbered past this gateway's last: this data directory is older than the peer's view of it (restored from a backup, or reset); numbering goes on after the peer's cursor");
            }
            FederationOutput::Refused { conn, reason } => {
                let peer = links
                    .routes
                    .get(&conn)
                    .map(|r| r.connection.remote_address());
                tracing::warn!(?peer, %reason, "federation connection refused");
            }
        }
    }

    fn serve_chunk(&mut self, chunk: ChunkToServe) {
        let conn = chunk.conn;
        let (Some(route), Some(s)) = (self.routes.get_mut(&conn), &self.serving) else {
            return; // the connection is gone; the device asks again on its next one
        };
        let server = route.chunks.get_or_insert_with(|| {
            ChunkServer::spawn(
                route.connection.clone(),
                s.reader.clone(),
                self.links.clone(),
            )
        });
        match server.queue(chunk) {
            Ok(()) | Err(QueueRefused::Gone) => {}
            Err(QueueRefused::Full) => {
                tracing::warn!(peer = %route.connection.remote_address(), ?conn, "disconnecting a device that asks for file chunks faster than it reads them");
                let now = self.clock.now();
                if let Some(route) = self.routes.remove(&conn) {
                    match route.session {
                        Some(session) => session.abort("too many file chunks asked for at once"),
                        None => route.connection.close(1u32.into(), b"not reading"),
                    }
                }
                if let Some(s) = &mut self.serving {
                    s.gateway.handle(now, GatewayInput::Closed(conn));
                }
            }
        }
    }
}

/// A table only the storage probe writes (and deletes again).
const PROBE_TABLE: sund_model::env::Table = sund_model::env::Table("storage_probe");
/// How much the storage probe writes.
const PROBE_BYTES: usize = 1 << 20;
/// Least time between two logged storage outages.
const OUTAGE_LOG_EVERY: Duration = Duration::from_secs(60);
