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
    seed: [u8; 32],
    origin: Instant,
}

impl Simulated {
    /// A machine on `socket` whose randomness all derives from `seed` and whose clock reads
    /// `origin` when its driver starts.
    pub fn new(socket: Arc<dyn quinn::AsyncUdpSocket>, seed: [u8; 32], origin: Instant) -> Self {
        Simulated {
            socket,
            seed,
            origin,
        }
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
        Box::new(SeededEntropy::new(self.stream(1)))
    }

    fn udp_socket(&self, _addr: SocketAddr) -> Result<EndpointSocket, QuicError> {
        Ok((self.socket.clone(), Some(self.stream(2))))
    }

    fn commit_mode(&self) -> CommitMode {
        CommitMode::Inline
    }
}
