//! quinn over turmoil's simulated UDP: the network of the driver-level simulation.
//!
//! [`TurmoilUdp`] is quinn's `AsyncUdpSocket` on a turmoil UDP socket, one datagram per
//! transmit, with per-datagram loss drawn from a seeded stream (turmoil's own fail rate cuts
//! whole links). Give it to [`crate::environment::Simulated`].
//!
//! [`PacketTrace`] digests every datagram the sockets of a run send (when, from, to, every
//! byte, lost or not): the trace hash of the driver layer. With the seeded stack
//! ([`crate::seeded`]) two runs from one seed give the same digest.

use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

type Readable = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

/// quinn's socket trait over a turmoil UDP socket, with seeded per-datagram loss and
/// duplication.
pub struct TurmoilUdp {
    socket: Arc<turmoil::net::UdpSocket>,
    readable: Mutex<Option<Readable>>,
    faults: SocketFaults,
    rng: Mutex<ChaCha20Rng>,
    trace: Option<PacketTrace>,
}

/// What the wire does to the datagrams a [`TurmoilUdp`] sends, each drawn independently.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DatagramFaults {
    /// Probability a datagram is lost.
    pub loss: f64,
    /// Probability a datagram arrives twice.
    pub duplicate: f64,
}

/// The faults a socket applies to what it sends, per destination: a default and overrides per
/// destination address. A handle: a simulation keeps one per host and changes it while the run
/// goes on (a `network` or `link` change), and it outlives the host's restarts.
#[derive(Clone, Debug, Default)]
pub struct SocketFaults(Arc<Mutex<FaultTable>>);

#[derive(Debug, Default)]
struct FaultTable {
    default: DatagramFaults,
    to: std::collections::BTreeMap<std::net::IpAddr, DatagramFaults>,
}

impl SocketFaults {
    /// The same faults towards every destination.
    pub fn uniform(faults: DatagramFaults) -> SocketFaults {
        let shared = SocketFaults::default();
        shared.set_default(faults);
        shared
    }

    /// Sets the faults towards every destination without an override.
    pub fn set_default(&self, faults: DatagramFaults) {
        self.0.lock().expect("never poisoned").default = faults;
    }

    /// Sets the faults towards `destination`, overriding the default.
    pub fn set_to(&self, destination: std::net::IpAddr, faults: DatagramFaults) {
        self.0
            .lock()
            .expect("never poisoned")
            .to
            .insert(destination, faults);
    }

    /// The faults towards `destination`.
    pub fn towards(&self, destination: std::net::IpAddr) -> DatagramFaults {
        let table = self.0.lock().expect("never poisoned");
        table.to.get(&destination).copied().unwrap_or(table.default)
    }
}

/// A running SHA-256 over every datagram the traced sockets of one run send, in the order
/// they are sent: simulated time (µs), source, destination, whether the wire lost it, and its
/// bytes. Share one (it is a handle) among every socket of a run.
#[derive(Clone, Default)]
pub struct PacketTrace(Arc<Mutex<TraceState>>);

#[derive(Default)]
struct TraceState {
    hasher: sha2::Sha256,
    datagrams: u64,
    bytes: u64,
    lost: u64,
}

/// What a [`PacketTrace`] saw so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketTraceSummary {
    /// The digest of every datagram, in order.
    pub hash: [u8; 32],
    /// Datagrams sent (lost ones included).
    pub datagrams: u64,
    /// Their bytes.
    pub bytes: u64,
    /// How many the wire lost.
    pub lost: u64,
}

impl PacketTraceSummary {
    /// The first eight bytes of the digest in hex, as reports print trace hashes.
    pub fn short_hash(&self) -> String {
        self.hash[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl PacketTrace {
    /// An empty trace.
    pub fn new() -> PacketTrace {
        PacketTrace::default()
    }

    fn record(&self, from: Option<SocketAddr>, to: SocketAddr, contents: &[u8], lost: bool) {
        use sha2::Digest;
        let micros = turmoil::sim_elapsed().unwrap_or_default().as_micros() as u64;
        let mut state = self.0.lock().expect("a trace's lock is never poisoned");
        let address = |a: Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
        let header = format!(
            "{micros} {} {} {lost} {}|",
            address(from),
            to,
            contents.len()
        );
        if std::env::var_os("SUND_DEBUG_PACKETS").is_some() {
            let hex: String = contents.iter().map(|b| format!("{b:02x}")).collect();
            eprintln!("PKT {header} {hex}");
        }
        state.hasher.update(header.as_bytes());
        state.hasher.update(contents);
        state.datagrams += 1;
        state.bytes += contents.len() as u64;
        state.lost += u64::from(lost);
    }

    /// The digest and counts so far.
    pub fn summary(&self) -> PacketTraceSummary {
        use sha2::Digest;
        let state = self.0.lock().expect("a trace's lock is never poisoned");
        PacketTraceSummary {
            hash: state.hasher.clone().finalize().into(),
            datagrams: state.datagrams,
            bytes: state.bytes,
            lost: state.lost,
        }
    }
}

impl std::fmt::Debug for TurmoilUdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TurmoilUdp({:?})", self.socket.local_addr())
    }
}

impl TurmoilUdp {
    /// Binds `port` on this simulated host; `loss` of the datagrams it sends are dropped, drawn
    /// from a stream seeded with `seed`.
    pub async fn bind(port: u16, loss: f64, seed: u64) -> Arc<TurmoilUdp> {
        let faults = DatagramFaults {
            loss,
            duplicate: 0.0,
        };
        TurmoilUdp::bind_traced(port, SocketFaults::uniform(faults), seed, None).await
    }

    /// Binds `port` with `faults` drawn from a stream seeded with `seed`, adding every datagram
    /// it sends to `trace`.
    pub async fn bind_traced(
        port: u16,
        faults: SocketFaults,
        seed: u64,
        trace: Option<PacketTrace>,
    ) -> Arc<TurmoilUdp> {
        let socket = turmoil::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
            .await
            .expect("bind in the simulation");
        Arc::new(TurmoilUdp {
            socket: Arc::new(socket),
            readable: Mutex::new(None),
            faults,
            rng: Mutex::new(ChaCha20Rng::seed_from_u64(seed)),
            trace,
        })
    }
}

#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(())) // turmoil's UDP has no backpressure
    }
}

impl AsyncUdpSocket for TurmoilUdp {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let draw =
            |p: f64| p > 0.0 && (self.rng.lock().unwrap().next_u64() as f64 / u64::MAX as f64) < p;
        let faults = self.faults.towards(transmit.destination.ip());
        let lost = draw(faults.loss);
        let copies = if !lost && draw(faults.duplicate) {
            2
        } else {
            1
        };
        if let Some(trace) = &self.trace {
            let from = self.socket.local_addr().ok();
            trace.record(from, transmit.destination, transmit.contents, lost);
        }
        if lost {
            return Ok(()); // lost on the wire
        }
        for _ in 0..copies {
            match self
                .socket
                .try_send_to(transmit.contents, transmit.destination)
            {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(e),
                // Unreachable hosts (crashed, partitioned) swallow datagrams as a real network
                // does.
                Err(_) => {}
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.socket.try_recv_from(&mut bufs[0]) {
                Ok((len, addr)) => {
                    meta[0] = RecvMeta {
                        addr,
                        len,
                        stride: len,
                        ..RecvMeta::default()
                    };
                    return Poll::Ready(Ok(1));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut slot = self.readable.lock().unwrap();
                    let socket = self.socket.clone();
                    let future = slot
                        .get_or_insert_with(|| Box::pin(async move { socket.readable().await }));
                    match future.as_mut().poll(cx) {
                        Poll::Ready(_) => *slot = None, // try again
                        Poll::Pending => return Poll::Pending,
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }
}
