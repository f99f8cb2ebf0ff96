//! quinn over turmoil's simulated UDP: the network of the driver-level simulation.
//!
//! [`TurmoilUdp`] is quinn's `AsyncUdpSocket` on a turmoil UDP socket, one datagram per
//! transmit, with per-datagram loss drawn from a seeded stream (turmoil's own fail rate cuts
//! whole links). Give it to [`crate::environment::Simulated`].

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

/// quinn's socket trait over a turmoil UDP socket, with seeded per-datagram loss.
pub struct TurmoilUdp {
    socket: Arc<turmoil::net::UdpSocket>,
    readable: Mutex<Option<Readable>>,
    loss: f64,
    rng: Mutex<ChaCha20Rng>,
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
        let socket = turmoil::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
            .await
            .expect("bind in the simulation");
        Arc::new(TurmoilUdp {
            socket: Arc::new(socket),
            readable: Mutex::new(None),
            loss,
            rng: Mutex::new(ChaCha20Rng::seed_from_u64(seed)),
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
        if self.loss > 0.0 {
            let draw = self.rng.lock().unwrap().next_u64() as f64 / u64::MAX as f64;
            if draw < self.loss {
                return Ok(()); // lost on the wire
            }
        }
        match self
            .socket
            .try_send_to(transmit.contents, transmit.destination)
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(e),
            // Unreachable hosts (crashed, partitioned) swallow datagrams as a real network does.
            Err(_) => Ok(()),
        }
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
