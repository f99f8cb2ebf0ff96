//! The environment a driver runs in: its clock, its randomness, its network and where its
//! commits run. The model's machines see none of it; the drivers take every one of these from an
//! [`Environment`], so the same driver code runs in production ([`Production`]: the wall clock,
//! OS entropy, the OS's UDP, commits on their own thread) and in a reproducible simulation
//! ([`Simulated`]: a clock from a fixed origin, seeded entropy, a socket the simulation
//! provides such as turmoil's, commits inline). Storage is redb in both.

use std::net::SocketAddr;
use std::sync::Arc;

use sund_model::env::Entropy;
use sund_model::time::Instant;

use crate::clock::DriverClock;
use crate::committer::CommitMode;
use crate::endpoint::{bound_socket, QuicError};
use crate::entropy::{OsEntropy, SeededEntropy};
use crate::sim_disk::SimulatedDisk;

/// A UDP socket for a QUIC endpoint, and the seed of quinn's own randomness (connection ids,
/// reset tokens; `None`: from the OS).
pub type EndpointSocket = (Arc<dyn quinn::AsyncUdpSocket>, Option<[u8; 32]>);

/// Where a driver's time, randomness, network and commits come from.
pub trait Environment: Send + Sync + 'static {
    /// The driver's clock (call once per driver: it starts counting at the call).
    fn clock(&self) -> DriverClock;
    /// Entropy for the driver's state machine.
    fn entropy(&self) -> Box<dyn Entropy + Send>;
    /// The socket a QUIC endpoint at `addr` uses.
    fn udp_socket(&self, addr: SocketAddr) -> Result<EndpointSocket, QuicError>;
    /// Where commits run.
    fn commit_mode(&self) -> CommitMode;
    /// A switch that fills the driver's disk, in a simulation (`None`: a real disk only).
    fn disk(&self) -> Option<SimulatedDisk> {
        None
    }
}

/// Production: the wall clock, OS entropy, the OS's UDP with 4 MiB buffers, commits pipelined
/// on their own thread.
#[derive(Clone, Copy, Debug, Default)]
pub struct Production;

impl Environment for Production {
    fn clock(&self) -> DriverClock {
        DriverClock::wall()
    }

    fn entropy(&self) -> Box<dyn Entropy + Send> {
        Box::new(OsEntropy)
    }

    fn udp_socket(&self, addr: SocketAddr) -> Result<EndpointSocket, QuicError> {
        let socket = bound_socket(addr)?;
        let runtime =
            quinn::default_runtime().ok_or_else(|| QuicError::Tls("no async runtime".into()))?;
        let socket = runtime
            .wrap_udp_socket(socket)
            .map_err(|source| QuicError::Bind { addr, source })?;
        Ok((socket, None))
    }

    fn commit_mode(&self) -> CommitMode {
        CommitMode::Pipelined
    }
}

/// A reproducible simulation of one machine: tokio's (simulated) clock from a fixed origin, a
/// seeded entropy stream, the socket the simulation gives, commits inline (a commit thread
/// would make the timeline depend on the OS scheduler).
#[derive(Clone)]
pub struct Simulated {
    socket: Arc<dyn quinn::AsyncUdpSocket>,
    /// Sockets for endpoints on other ports (a gateway's federation endpoint beside its
    /// devices' one), by port.
    more_sockets: std::collections::BTreeMap<u16, Arc<dyn quinn::AsyncUdpSocket>>,
    seed: [u8; 32],
    origin: Instant,
    disk: Option<SimulatedDisk>,
    /// How many entropy streams were handed out: each call of [`Environment::entropy`] gets
    /// a stream of its own, as each read of the OS generator gets fresh bytes.
    entropy_streams: Arc<std::sync::atomic::AtomicU64>,
}

impl Simulated {
    /// A machine on `socket` whose randomness all derives from `seed` and whose clock reads
    /// `origin` when its driver starts.
    pub fn new(socket: Arc<dyn quinn::AsyncUdpSocket>, seed: [u8; 32], origin: Instant) -> Self {
        Simulated {
            socket,
            more_sockets: std::collections::BTreeMap::new(),
            seed,
            origin,
            disk: None,
            entropy_streams: Arc::default(),
        }
    }

    /// The same machine on a disk `switch` can fill.
    pub fn with_disk(mut self, switch: SimulatedDisk) -> Self {
        self.disk = Some(switch);
        self
    }

    /// The same machine with `socket` for an endpoint on `port` (every other endpoint gets
    /// the first socket). Its QUIC and TLS stacks draw from a stream of their own.
    pub fn with_socket(mut self, port: u16, socket: Arc<dyn quinn::AsyncUdpSocket>) -> Self {
        self.more_sockets.insert(port, socket);
        self
    }

    /// `seed` with its last byte changed: one independent stream per use.
    fn stream(&self, salt: u8) -> [u8; 32] {
        let mut seed = self.seed;
        seed[31] ^= salt;
        seed
    }
}

impl Environment for Simulated {
    fn clock(&self) -> DriverClock {
        DriverClock::starting_at(self.origin)
    }

    fn entropy(&self) -> Box<dyn Entropy + Send> {
        // A new stream per call: the gateway driver recovers its machine after a storage outage
        // and asks again; one stream for both would repeat every token it drew before (found by
        // `cargo sim --drivers` on a full disk: the recovered gateway issued a resume token it
        // had issued already, and the session table's invariant caught it).
        let n = self
            .entropy_streams
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Box::new(SeededEntropy::new(crate::seeded::derive(
            &self.stream(1),
            &format!("entropy/{n}"),
        )))
    }

    fn udp_socket(&self, addr: SocketAddr) -> Result<EndpointSocket, QuicError> {
        match self.more_sockets.get(&addr.port()) {
            Some(socket) => Ok((
                socket.clone(),
                Some(crate::seeded::derive(
                    &self.stream(2),
                    &format!("socket/{}", addr.port()),
                )),
            )),
            None => Ok((self.socket.clone(), Some(self.stream(2)))),
        }
    }

    fn commit_mode(&self) -> CommitMode {
        CommitMode::Inline
    }

    fn disk(&self) -> Option<SimulatedDisk> {
        self.disk.clone()
    }
}
