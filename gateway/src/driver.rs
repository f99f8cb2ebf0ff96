//! The gateway's tokio driver: moves bytes and time between quinn, redb and the state machine.
//!
//! One task owns the [`Gateway`] state machine; a commit thread owns the [`RedbStore`]. Each QUIC
//! connection gets a reader task (frames in) and a writer task (frames out); they talk to the core
//! over channels.
//! The core takes a batch of inputs (up to [`BATCH_MAX`]), feeds them to the state machine, merges
//! the resulting `Ready`s into one job and hands it to the [`Committer`], which commits queued jobs
//! together in one redb transaction on its own thread while the core goes on with the next
//! inputs. Outputs reach the writers only when their commit is back — so no acknowledgement
//! leaves before its commit.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rustls::pki_types::CertificateDer;
use sund_model::env::Ready;
use sund_model::gateway::{
    AdminAnswer, AdminCommand, Gateway, GatewayConfig, GatewayInput, GatewayOutput, GatewayStats,
};
use sund_model::ids::{ConnectionId, UserId};
use sund_model::time::Instant;
use sund_model::trust::EnrolmentToken;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::clock::DriverClock;
use crate::committer::{CommitMode, Committer};
use crate::entropy::EntropySource;
use crate::quic::{self, FrameReader, ReadError, Socket, TlsIdentity, WriterCommand};
use crate::store::RedbStore;

/// Most inputs folded into one commit.
pub const BATCH_MAX: usize = 512;
/// Most frames queued for one connection; a peer that reads slower than this is disconnected.
pub const WRITER_QUEUE_MAX: usize = 4096;
/// Most inputs waiting for the core.
pub const CORE_QUEUE_MAX: usize = 16_384;
/// How long shutdown waits for writers to flush their goodbyes.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// The model's clock in production: microseconds since the Unix epoch.
pub fn wall_clock() -> Instant {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Instant(u64::try_from(since.as_micros()).unwrap_or(u64::MAX))
}

/// Why the gateway could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// QUIC or TLS setup.
    #[error(transparent)]
    Quic(#[from] quic::QuicError),
    /// The store.
    #[error("storage: {0}")]
    Store(#[from] sund_model::env::StoreError),
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
#[derive(Clone, Debug)]
pub struct GatewayOptions {
    /// Where to listen: a UDP address (port 0 picks one) or an injected socket.
    pub socket: Socket,
    /// Where its randomness comes from.
    pub entropy: EntropySource,
    /// Its clock (the wall clock in production; a fixed origin under simulation).
    pub clock: Option<Instant>,
    /// Where the database and the TLS identity live.
    pub data_dir: PathBuf,
    /// Protocol tunables.
    pub config: GatewayConfig,
    /// Where commits run: pipelined on their own thread (production) or inline (turmoil).
    pub commit: CommitMode,
}

/// A running gateway.
pub struct GatewayHandle {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its certificate (nodes pin it).
    pub cert: CertificateDer<'static>,
    admin: mpsc::Sender<CoreInput>,
    shutdown: Option<oneshot::Sender<()>>,
    core: JoinHandle<Result<GatewayStats, DriverError>>,
    endpoint: quinn::Endpoint,
}

impl GatewayHandle {
    /// Carries out an operator's command on the running gateway; the answer comes once the
    /// commit that makes it true is durable. `None` if the gateway stopped.
    pub async fn admin(&self, command: AdminCommand) -> Option<AdminAnswer> {
        let (tx, rx) = oneshot::channel();
        self.admin.send(CoreInput::Admin(command, tx)).await.ok()?;
        rx.await.ok()
    }

    /// Issues a one-time enrolment token for a new device of `user`, once it is stored. `None`
    /// if the gateway stopped.
    pub async fn enrolment_token(&self, user: UserId) -> Option<EnrolmentToken> {
        match self.admin(AdminCommand::IssueEnrolmentToken(user)).await? {
            AdminAnswer::EnrolmentToken(token) => Some(token),
            _ => None,
        }
    }

    /// Graceful shutdown: stop accepting, finish in-flight work, say goodbye, close.
    pub async fn shutdown(mut self) -> Result<GatewayStats, DriverError> {
        self.endpoint.set_server_config(None);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let stats = self
            .core
            .await
            .expect("the gateway core task does not panic")?;
        self.endpoint.close(0u32.into(), b"gateway shut down");
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, self.endpoint.wait_idle()).await;
        Ok(stats)
    }
}

enum CoreInput {
    Accepted(ConnectionId, mpsc::Sender<WriterCommand>),
    Frame(ConnectionId, Bytes),
    Closed(ConnectionId),
    Admin(AdminCommand, oneshot::Sender<AdminAnswer>),
}

/// The core's own state beside the machine: writers by connection, admin callers waiting.
#[derive(Default)]
struct Routes {
    writers: BTreeMap<ConnectionId, mpsc::Sender<WriterCommand>>,
    admin: BTreeMap<u64, oneshot::Sender<AdminAnswer>>,
    next_admin: u64,
}

/// Starts a gateway: opens (or creates) its data directory, recovers its state, listens.
pub async fn start(options: GatewayOptions) -> Result<GatewayHandle, DriverError> {
    let dir = &options.data_dir;
    std::fs::create_dir_all(dir).map_err(|source| DriverError::DataDir {
        path: dir.display().to_string(),
        source,
    })?;
    let store = RedbStore::open(&dir.join("gateway.redb"))?;
    let identity = TlsIdentity::load_or_create(&dir.join("tls"))?;
    let clock = options
        .clock
        .map_or_else(DriverClock::wall, DriverClock::starting_at);
    let gateway = Gateway::recover(
        options.config.clone(),
        clock.now(),
        &store,
        options.entropy.boxed(),
    )?;
    let endpoint = quic::server_endpoint(options.socket.clone(), &identity)?;
    let addr = endpoint
        .local_addr()
        .map_err(|source| DriverError::DataDir {
            path: "socket".into(),
            source,
        })?;
    tracing::info!(%addr, data_dir = %dir.display(), conversations = gateway.conversations().count(), "gateway listening");

    let (core_tx, core_rx) = mpsc::channel(CORE_QUEUE_MAX);
    let (shutdown_tx, shutdown_rx) = oneshot::channel();
    tokio::spawn(accept_loop(endpoint.clone(), core_tx.clone()));
    let committer = Committer::new(options.commit, store, "gateway");
    let core = tokio::spawn(core_loop(gateway, committer, clock, core_rx, shutdown_rx));
    Ok(GatewayHandle {
        addr,
        cert: identity.cert.clone(),
        admin: core_tx,
        shutdown: Some(shutdown_tx),
        core,
        endpoint,
    })
}

async fn accept_loop(endpoint: quinn::Endpoint, core: mpsc::Sender<CoreInput>) {
    let mut next_conn = 1u64;
    while let Some(incoming) = endpoint.accept().await {
        let conn = ConnectionId(next_conn);
        next_conn += 1;
        tokio::spawn(serve_connection(incoming, conn, core.clone()));
    }
}

async fn serve_connection(
    incoming: quinn::Incoming,
    conn: ConnectionId,
    core: mpsc::Sender<CoreInput>,
) {
    let connection = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(?conn, error = %e, "handshake failed");
            return;
        }
    };
    let (send, recv) = match connection.accept_bi().await {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(?conn, error = %e, "no stream opened");
            return;
        }
    };
    let (writer_tx, writer_rx) = mpsc::channel(WRITER_QUEUE_MAX);
    if core
        .send(CoreInput::Accepted(conn, writer_tx))
        .await
        .is_err()
    {
        return;
    }
    tokio::spawn(quic::write_frames(
        send,
        writer_rx,
        connection.clone(),
        Duration::from_millis(500),
        b"closed by gateway",
    ));
    let mut reader = FrameReader::new(recv);
    loop {
        match reader.next().await {
            Ok(frame) => {
                if core.send(CoreInput::Frame(conn, frame)).await.is_err() {
                    break;
                }
            }
            Err(ReadError::Closed) => break,
            Err(ReadError::Wire(e)) => {
                // The stream lost sync: nothing after this can be trusted.
                tracing::info!(?conn, error = %e, "closing connection after an invalid frame");
                connection.close(1u32.into(), e.to_string().as_bytes());
                break;
            }
        }
    }
    let _ = core.send(CoreInput::Closed(conn)).await;
}

async fn core_loop(
    mut gateway: Gateway,
    mut committer: Committer<GatewayOutput>,
    clock: DriverClock,
    mut inputs: mpsc::Receiver<CoreInput>,
    mut shutdown: oneshot::Receiver<()>,
) -> Result<GatewayStats, DriverError> {
    let mut routes = Routes::default();
    let mut last_gc = 0;
    loop {
        let deadline = clock.deadline(gateway.poll_timeout());
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            done = committer.completed() => release(&mut gateway, &mut routes, clock.now(), done?),
            // While too many commits wait, leave input in the queue: the readers then block and
            // QUIC flow control pushes back on the senders.
            first = inputs.recv(), if !committer.is_saturated() => {
                let Some(first) = first else { break };
                apply(&mut gateway, &mut routes, clock.now(), first);
                // Group commit: take what else is already waiting, up to a bound.
                for _ in 1..BATCH_MAX {
                    match inputs.try_recv() {
                        Ok(input) => apply(&mut gateway, &mut routes, clock.now(), input),
                        Err(_) => break,
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline) => gateway.handle_timeout(clock.now()),
        }
        submit(&mut gateway, &mut committer);
        if gateway.delivery_stats().gc_dropped != last_gc {
            last_gc = gateway.delivery_stats().gc_dropped;
            tracing::debug!(
                gc_dropped_total = last_gc,
                "garbage collection dropped acknowledged or expired messages"
            );
        }
    }
    tracing::info!(
        sessions = gateway.session_count(),
        "shutting down: saying goodbye to every session"
    );
    gateway.shut_down(clock.now());
    submit(&mut gateway, &mut committer);
    while committer.is_busy() {
        let done = committer.completed().await?;
        release(&mut gateway, &mut routes, clock.now(), done);
        submit(&mut gateway, &mut committer);
    }
    committer.finish().await?;
    // Dropping the writers lets each flush and close.
    drop(routes);
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(gateway.stats().clone())
}

fn apply(gateway: &mut Gateway, routes: &mut Routes, now: Instant, input: CoreInput) {
    match input {
        CoreInput::Accepted(conn, writer) => {
            routes.writers.insert(conn, writer);
            gateway.handle(now, GatewayInput::Accepted(conn));
        }
        CoreInput::Frame(conn, bytes) => gateway.handle(now, GatewayInput::Frame(conn, bytes)),
        CoreInput::Closed(conn) => {
            routes.writers.remove(&conn);
            gateway.handle(now, GatewayInput::Closed(conn));
        }
        CoreInput::Admin(command, reply) => {
            let request = routes.next_admin;
            routes.next_admin += 1;
            routes.admin.insert(request, reply);
            gateway.handle(now, GatewayInput::Admin { request, command });
        }
    }
}

/// Hands everything the state machine produced to the committer as one job.
fn submit(gateway: &mut Gateway, committer: &mut Committer<GatewayOutput>) {
    let mut batch: Option<Ready<GatewayOutput>> = None;
    while let Some(ready) = gateway.poll_ready() {
        match &mut batch {
            Some(b) => b.merge(ready),
            None => batch = Some(ready),
        }
    }
    if let Some(batch) = batch {
        committer.submit(batch);
    }
}

/// Sends the outputs a finished commit released to their connections.
fn release(gateway: &mut Gateway, routes: &mut Routes, now: Instant, outputs: Vec<GatewayOutput>) {
    for output in outputs {
        match output {
            GatewayOutput::Send(conn, bytes) => {
                let Some(writer) = routes.writers.get(&conn) else {
                    continue;
                };
                if writer.try_send(WriterCommand::Frame(bytes)).is_err() {
                    tracing::warn!(?conn, "peer reads too slowly; disconnecting it");
                    routes.writers.remove(&conn);
                    gateway.handle(now, GatewayInput::Closed(conn));
                }
            }
            GatewayOutput::Close(conn) => {
                if let Some(writer) = routes.writers.remove(&conn) {
                    let _ = writer.try_send(WriterCommand::Close);
                }
            }
            GatewayOutput::Admin { request, answer } => {
                if let Some(reply) = routes.admin.remove(&request) {
                    let _ = reply.send(answer);
                }
            }
        }
    }
}
