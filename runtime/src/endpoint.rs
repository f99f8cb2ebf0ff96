//! QUIC endpoints: the gateway's server and the node's client, over a UDP socket the driver's
//! [`crate::environment::Environment`] provides (a real one with 4 MiB buffers, or turmoil's).
//!
//! Each session is one QUIC connection with one bidirectional stream carrying Sund frames back
//! to back. Sund uses neither unidirectional streams nor datagrams: peers get no credit for them,
//! so a hostile peer cannot make quinn buffer data Sund never reads.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::PrivateKeyDer;

use crate::chunk_stream::CHUNK_STREAMS_MAX;
use crate::clock::DriverClock;
use crate::environment::Environment;
use crate::seeded;
use crate::tls::{AnyCertificate, PinnedCertificate, TlsIdentity};

/// ALPN of protocol version 1.
pub const ALPN: &[u8] = b"sund/1";
/// The ALPN of links between gateways: a device cannot open one, nor a gateway a device's
/// session, by mistake.
pub const FEDERATION_ALPN: &[u8] = b"sund-federation/1";
/// The TLS exporter label of a federation link's channel binding.
pub const FEDERATION_EXPORTER_LABEL: &[u8] = b"EXPORTER-sund-federation-v1";
/// UDP socket buffers: the kernel's 208 KiB default loses QUIC Initial packets under load and
/// stalls handshakes for about a second.
pub const UDP_BUFFER_BYTES: usize = 4 << 20;
/// A session with no packets for this long is dead (the protocol's heartbeats are more frequent).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why QUIC setup failed.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    /// Reading or writing the TLS identity files failed.
    #[error("TLS identity in {path}: {source}")]
    Identity {
        /// The file.
        path: String,
        /// The I/O error.
        source: io::Error,
    },
    /// Certificate generation failed.
    #[error("cannot create the gateway certificate: {0}")]
    Certificate(String),
    /// TLS configuration failed.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The UDP socket could not be bound.
    #[error("cannot bind UDP {addr}: {source}; is another process using the port?")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: io::Error,
    },
}

/// Most bidirectional streams a peer may open: a session is one stream.
pub const BIDI_STREAMS_MAX: u32 = 1;

/// How often a node's connection sends QUIC keep-alives (the gateway sends none: a peer that
/// goes quiet must let the idle timeout run out).
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Which side of a session an endpoint is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Server,
    Client,
}

/// How a connection is run: idle timeout, keep-alives from the client only, and no credit for
/// what Sund does not use (datagrams), so a hostile peer cannot park data in quinn's buffers.
/// A server admits one bidirectional stream per connection (the session's), a client none;
/// each side admits [`CHUNK_STREAMS_MAX`] unidirectional chunk streams at once from the other
/// (see [`crate::chunk_stream`]).
fn transport_config(side: Side) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        IDLE_TIMEOUT.try_into().expect("30 s fits a QUIC varint"),
    ));
    let (keep_alive, bidi_streams) = match side {
        Side::Server => (None, BIDI_STREAMS_MAX),
        Side::Client => (Some(KEEP_ALIVE_INTERVAL), 0),
    };
    transport.keep_alive_interval(keep_alive);
    transport.max_concurrent_uni_streams(CHUNK_STREAMS_MAX.into());
    transport.max_concurrent_bidi_streams(bidi_streams.into());
    transport.datagram_receive_buffer_size(None);
    transport
}

/// A UDP socket bound to `addr` with large buffers.
pub(crate) fn bound_socket(addr: SocketAddr) -> Result<UdpSocket, QuicError> {
    let bind_err = |source| QuicError::Bind { addr, source };
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
        .map_err(bind_err)?;
    // Best effort: the kernel may cap these below what we ask.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    socket.bind(&addr.into()).map_err(bind_err)?;
    Ok(socket.into())
}

/// Where an endpoint's QUIC and TLS stacks draw their randomness and read the time: the OS and
/// the wall clock in production, a seed and the driver clock in a simulation
/// ([`crate::seeded`]).
struct Stack {
    socket: Arc<dyn quinn::AsyncUdpSocket>,
    seed: Option<[u8; 32]>,
    clock: DriverClock,
}

impl Stack {
    fn new(environment: &dyn Environment, addr: SocketAddr) -> Result<Stack, QuicError> {
        let (socket, seed) = environment.udp_socket(addr)?;
        Ok(Stack {
            socket,
            seed,
            clock: environment.clock(),
        })
    }

    fn tls_provider(&self) -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(match &self.seed {
            None => rustls::crypto::ring::default_provider(),
            Some(seed) => seeded::tls_provider(seed),
        })
    }

    fn tls_time(&self) -> Arc<dyn rustls::time_provider::TimeProvider> {
        match self.seed {
            None => Arc::new(rustls::time_provider::DefaultTimeProvider),
            Some(_) => Arc::new(seeded::ClockTime(self.clock)),
        }
    }

    /// A server's QUIC config: handshake tokens keyed from the OS, or from the seed and
    /// stamped with the driver clock.
    fn server_config(&self, crypto: Arc<QuicServerConfig>) -> quinn::ServerConfig {
        match &self.seed {
            None => quinn::ServerConfig::with_crypto(crypto),
            Some(seed) => {
                let key = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, &[])
                    .extract(&seeded::derive(seed, "quic-token-key"));
                let mut config = quinn::ServerConfig::new(crypto, Arc::new(key));
                config.time_source(Arc::new(seeded::ClockTime(self.clock)));
                config
            }
        }
    }

    fn endpoint(
        self,
        addr: SocketAddr,
        server: Option<(quinn::ServerConfig, [u8; 32])>,
    ) -> Result<quinn::Endpoint, QuicError> {
        let runtime =
            quinn::default_runtime().ok_or_else(|| QuicError::Tls("no async runtime".into()))?;
        let mut config = quinn::EndpointConfig::default();
        // The key behind reset tokens and connection ids: a server derives it from its identity,
        // so that a restarted gateway recognises the connection ids it gave out before and
        // answers them with resets the devices can verify; a simulated client from its seed.
        let key = match (&server, &self.seed) {
            (Some((_, reset_key)), _) => Some(*reset_key),
            (None, Some(seed)) => Some(seeded::derive(seed, "quic-reset-key")),
            (None, None) => None,
        };
        if let Some(key) = key {
            config.reset_key(Arc::new(ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                &key,
            )));
            let cid_key = u64::from_be_bytes(key[..8].try_into().expect("8 bytes"));
            match self.seed {
                None => config.cid_generator(move || {
                    Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
                }),
                Some(seed) => {
                    // One stream per generator the endpoint asks for.
                    let made = std::sync::atomic::AtomicU64::new(0);
                    config.cid_generator(move || {
                        let n = made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let label = format!("quic-connection-ids/{n}");
                        Box::new(seeded::SeededConnectionIds::new(
                            cid_key,
                            seeded::derive(&seed, &label),
                        ))
                    })
                }
            };
        }
        config.rng_seed(self.seed.map(|seed| seeded::derive(&seed, "quinn-rng")));
        quinn::Endpoint::new_with_abstract_socket(
            config,
            server.map(|(server, _)| server),
            self.socket,
            runtime,
        )
        .map_err(|source| QuicError::Bind { addr, source })
    }
}

/// A server endpoint at `addr` presenting `identity`.
pub fn server_endpoint(
    environment: &dyn Environment,
    addr: SocketAddr,
    identity: &TlsIdentity,
) -> Result<quinn::Endpoint, QuicError> {
    let stack = Stack::new(environment, addr)?;
    let mut tls =
        rustls::ServerConfig::builder_with_details(stack.tls_provider(), stack.tls_time())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| QuicError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(
                vec![identity.cert.clone()],
                PrivateKeyDer::Pkcs8(identity.key.clone_key()),
            )
            .map_err(|e| QuicError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut config = stack.server_config(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(Side::Server)));
    stack.endpoint(addr, Some((config, identity.reset_key())))
}

/// A client endpoint that trusts exactly the gateway certificate whose
/// [`crate::tls::certificate_pin`] is `pin`.
pub fn client_endpoint(
    environment: &dyn Environment,
    pin: [u8; 32],
) -> Result<quinn::Endpoint, QuicError> {
    let any: SocketAddr = "0.0.0.0:0".parse().expect("a valid address");
    let stack = Stack::new(environment, any)?;
    let provider = stack.tls_provider();
    let verifier = Arc::new(PinnedCertificate {
        pin,
        provider: provider.clone(),
    });
    let mut tls = rustls::ClientConfig::builder_with_details(provider, stack.tls_time())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| QuicError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(Side::Client)));
    if let Some(seed) = &stack.seed {
        // The id a client's first packet is addressed to: otherwise from `rand::rng()`.
        config.initial_dst_cid_provider(seeded::initial_connection_ids(seed));
    }
    let mut endpoint = stack.endpoint(any, None)?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// A gateway's federation endpoint on `addr`: it accepts links from peer gateways and dials
/// them (with the client configuration returned), both with ALPN [`FEDERATION_ALPN`]. Either
/// side may open the one bidirectional stream of a link; keep-alives run both ways.
pub fn federation_endpoint(
    environment: &dyn Environment,
    addr: SocketAddr,
    identity: &TlsIdentity,
) -> Result<(quinn::Endpoint, quinn::ClientConfig), QuicError> {
    let stack = Stack::new(environment, addr)?;
    let provider = stack.tls_provider();
    let mut transport = transport_config(Side::Server);
    transport.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    transport.max_concurrent_uni_streams(0u8.into());
    let transport = Arc::new(transport);
    let mut server = rustls::ServerConfig::builder_with_details(provider.clone(), stack.tls_time())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| QuicError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(
            vec![identity.cert.clone()],
            PrivateKeyDer::Pkcs8(identity.key.clone_key()),
        )
        .map_err(|e| QuicError::Tls(e.to_string()))?;
    server.alpn_protocols = vec![FEDERATION_ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(server).map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut server = stack.server_config(Arc::new(crypto));
    server.transport_config(transport.clone());
    let mut client = rustls::ClientConfig::builder_with_details(provider.clone(), stack.tls_time())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| QuicError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate { provider }))
        .with_no_client_auth();
    client.alpn_protocols = vec![FEDERATION_ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(client).map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(transport);
    if let Some(seed) = &stack.seed {
        client.initial_dst_cid_provider(seeded::initial_connection_ids(seed));
    }
    let endpoint = stack.endpoint(addr, Some((server, identity.reset_key())))?;
    Ok((endpoint, client))
}

/// A federation connection's channel binding: the TLS exporter under
/// [`FEDERATION_EXPORTER_LABEL`], the same at both ends of one TLS session.
pub fn federation_binding(connection: &quinn::Connection) -> Option<[u8; 32]> {
    let mut binding = [0u8; 32];
    connection
        .export_keying_material(&mut binding, FEDERATION_EXPORTER_LABEL, b"")
        .ok()?;
    Some(binding)
}
