//! Federation links on the real stack: the QUIC side of the model's `Federation` machine.
//!
//! A gateway with federation peers listens on a UDP port of its own for them (ALPN
//! `sund-federation/1`, so neither a device nor a peer reaches the wrong service by mistake)
//! and dials them from the same endpoint when the machine asks. Each link is one connection
//! with one bidirectional stream of the usual frames, read and written by the same session
//! tasks as a device's ([`sund_runtime::session`]). Its channel binding, the TLS exporter,
//! goes to the machine with the connection, so the handshake is bound to this TLS session.
//!
//! Connection ids of links start at [`LINK_CONNS`], apart from the devices' ids: the core
//! routes a session's frames by its id.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sund_model::ids::ConnectionId;
use sund_runtime::endpoint::federation_binding;
use sund_runtime::session::{self, SessionHandle, SessionLimits};
use tokio::sync::mpsc;

use crate::driver::{Admission, Link};

/// The first connection id of a link (devices' ids count up from 1).
pub const LINK_CONNS: u64 = 1 << 62;

/// How long a dial or an accepted link may take to open its stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Link connections accepted at once, from all addresses: a gateway has a handful of peers,
/// so anyone opening connections to the federation port by the thousand is refused.
const ACCEPTED_MAX: usize = 64;
/// Link connections accepted at once from one address.
const ACCEPTED_PER_ADDRESS_MAX: usize = 4;

/// What a gateway needs to run links beside its machine's federation config.
#[derive(Clone, Debug)]
pub struct FederationOptions {
    /// The UDP address of the federation endpoint.
    pub listen: SocketAddr,
    /// Each peer's address (`HOST:PORT`, resolved at every dial), by domain.
    pub peers: BTreeMap<String, String>,
}

/// True if `conn` is a link's connection, not a device's.
pub fn is_link(conn: ConnectionId) -> bool {
    conn.0 >= LINK_CONNS
}

/// A link connection as the core knows it.
pub(crate) struct LinkRoute {
    pub(crate) connection: quinn::Connection,
    pub(crate) session: Option<SessionHandle>,
    /// Frames the machine sent before the stream's tasks were running.
    pub(crate) early: Vec<Bytes>,
}

/// The core's side of the links.
pub(crate) struct Links {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    peers: BTreeMap<String, String>,
    next_conn: Arc<AtomicU64>,
    events: mpsc::Sender<Link>,
    pub(crate) routes: BTreeMap<ConnectionId, LinkRoute>,
    /// The address links are accepted on.
    pub(crate) addr: SocketAddr,
}

fn limits() -> SessionLimits {
    SessionLimits {
        writer_queue_max: crate::driver::WRITER_QUEUE_MAX,
        linger: Duration::from_millis(200),
        reason: b"link closed by gateway",
    }
}

impl Links {
    /// Starts accepting links on `endpoint`.
    pub(crate) fn start(
        endpoint: quinn::Endpoint,
        client: quinn::ClientConfig,
        options: &FederationOptions,
        events: mpsc::Sender<Link>,
    ) -> Links {
        let next_conn = Arc::new(AtomicU64::new(LINK_CONNS));
        let addr = endpoint.local_addr().unwrap_or(options.listen);
        tokio::spawn(accept_loop(
            endpoint.clone(),
            next_conn.clone(),
            events.clone(),
        ));
        Links {
            endpoint,
            client,
            peers: options.peers.clone(),
            next_conn,
            events,
            routes: BTreeMap::new(),
            addr,
        }
    }

    /// Dials `peer` in a task of its own; it reports `PeerOpened` or `PeerDialFailed`.
    pub(crate) fn dial(&self, peer: String) {
        let Some(address) = self.peers.get(&peer).cloned() else {
            tracing::warn!(%peer, "asked to dial a federation peer with no address configured");
            let events = self.events.clone();
            tokio::spawn(async move {
                let _ = events.send(Link::PeerDialFailed(peer)).await;
            });
            return;
        };
        let conn = ConnectionId(self.next_conn.fetch_add(1, Ordering::Relaxed));
        let (endpoint, client, events) = (
            self.endpoint.clone(),
            self.client.clone(),
            self.events.clone(),
        );
        tokio::spawn(async move {
            match tokio::time::timeout(OPEN_TIMEOUT, open(&endpoint, client, &peer, &address)).await
            {
                Ok(Ok((connection, send, recv, binding))) => {
                    opened(conn, connection, send, recv, binding, Some(peer), events).await;
                }
                Ok(Err(why)) => {
                    tracing::info!(%peer, %address, %why, "could not reach a federation peer");
                    let _ = events.send(Link::PeerDialFailed(peer)).await;
                }
                Err(_) => {
                    tracing::info!(%peer, %address, "a federation peer did not answer in time");
                    let _ = events.send(Link::PeerDialFailed(peer)).await;
                }
            }
        });
    }

    /// Sends a frame on a link (kept until its stream's tasks run).
    pub(crate) fn send(&mut self, conn: ConnectionId, frame: Bytes) {
        let Some(route) = self.routes.get_mut(&conn) else {
            return;
        };
        match &route.session {
            Some(session) => {
                if let Err(full) = session.send(frame) {
                    tracing::warn!(?conn, error = %full, "closing a federation link whose peer does not read");
                    // Its session's end reaches the machine as the link's close.
                    if let Some(session) = route.session.take() {
                        session.abort("the peer does not read");
                    }
                }
            }
            None => route.early.push(frame),
        }
    }

    /// Closes a link.
    pub(crate) fn close(&mut self, conn: ConnectionId) {
        if let Some(route) = self.routes.remove(&conn) {
            match route.session {
                Some(session) => session.close(),
                None => route
                    .connection
                    .close(0u32.into(), b"link closed by gateway"),
            }
        }
    }

    /// Closes every link, keeping the endpoint (the store failed; the machine goes).
    pub(crate) fn close_links(&mut self) {
        for conn in self.routes.keys().copied().collect::<Vec<_>>() {
            self.close(conn);
        }
    }

    /// Closes every link and the endpoint (the gateway stops).
    pub(crate) fn close_all(&mut self) {
        self.close_links();
        self.endpoint.close(0u32.into(), b"gateway shut down");
    }
}

type Opened = (
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
    [u8; 32],
);

/// Resolves `address`, connects and opens the link's stream.
async fn open(
    endpoint: &quinn::Endpoint,
    client: quinn::ClientConfig,
    peer: &str,
    address: &str,
) -> Result<Opened, String> {
    let addr = tokio::net::lookup_host(address)
        .await
        .map_err(|e| format!("cannot resolve {address}: {e}"))?
        .next()
        .ok_or_else(|| format!("{address} resolves to no address"))?;
    // The server name is not checked (the handshake proves the domain), but must be a name.
    let name = if peer.is_empty() { "peer" } else { peer };
    let connection = endpoint
        .connect_with(client, addr, name)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let binding = federation_binding(&connection)
        .ok_or_else(|| "the TLS session gives no channel binding".to_string())?;
    let (send, recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
    Ok((connection, send, recv, binding))
}

/// Tells the core of a link connection, then runs its session.
async fn opened(
    conn: ConnectionId,
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    binding: [u8; 32],
    dialed: Option<String>,
    events: mpsc::Sender<Link>,
) {
    let opened = Link::PeerOpened {
        conn,
        connection: connection.clone(),
        binding,
        dialed,
    };
    if events.send(opened).await.is_err() {
        return;
    }
    let handle = session::spawn(
        conn,
        connection.clone(),
        send,
        recv,
        events.clone(),
        limits(),
    );
    let _ = events.send(Link::PeerStream(conn, handle)).await;
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    next_conn: Arc<AtomicU64>,
    events: mpsc::Sender<Link>,
) {
    let admission = Arc::new(Mutex::new(Admission::new(
        ACCEPTED_PER_ADDRESS_MAX,
        ACCEPTED_MAX,
    )));
    let mut refused_logged: Option<tokio::time::Instant> = None;
    while let Some(incoming) = endpoint.accept().await {
        let ip = incoming.remote_address().ip();
        if !admission.lock().expect("not poisoned").admit(ip) {
            let now = tokio::time::Instant::now();
            if refused_logged.is_none_or(|at| now >= at + Duration::from_secs(60)) {
                refused_logged = Some(now);
                tracing::warn!(%ip, per_address_max = ACCEPTED_PER_ADDRESS_MAX, total_max = ACCEPTED_MAX, "federation connection refused: too many at once");
            }
            incoming.refuse();
            continue;
        }
        let conn = ConnectionId(next_conn.fetch_add(1, Ordering::Relaxed));
        let events = events.clone();
        let admission = admission.clone();
        tokio::spawn(async move {
            accept_one(incoming, conn, events).await;
            admission.lock().expect("not poisoned").release(ip);
        });
    }
}

/// One accepted link connection, until it closes (its admission slot is held meanwhile).
async fn accept_one(incoming: quinn::Incoming, conn: ConnectionId, events: mpsc::Sender<Link>) {
    let from = incoming.remote_address();
    let accepted = async {
        let connection = incoming.await.map_err(|e| e.to_string())?;
        let binding = federation_binding(&connection)
            .ok_or_else(|| "the TLS session gives no channel binding".to_string())?;
        let (send, recv) = connection.accept_bi().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((connection, send, recv, binding))
    };
    match tokio::time::timeout(OPEN_TIMEOUT, accepted).await {
        Ok(Ok((connection, send, recv, binding))) => {
            opened(conn, connection.clone(), send, recv, binding, None, events).await;
            connection.closed().await;
        }
        Ok(Err(why)) => {
            tracing::info!(%from, %why, "a federation connection failed before its link opened")
        }
        Err(_) => tracing::info!(%from, "a federation connection opened no link in time"),
    }
}
