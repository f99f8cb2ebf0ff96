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

use crate::environment::Environment;
use crate::tls::{PinnedCertificate, TlsIdentity};

/// ALPN of protocol version 1.
pub const ALPN: &[u8] = b"sund/1";
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
/// what Sund does not use (unidirectional streams, datagrams), so a hostile peer cannot park data
/// in quinn's buffers. A server admits one bidirectional stream per connection; a client none.
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
    transport.max_concurrent_uni_streams(0u32.into());
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

fn endpoint(
    environment: &dyn Environment,
    addr: SocketAddr,
    server: Option<(quinn::ServerConfig, [u8; 32])>,
) -> Result<quinn::Endpoint, QuicError> {
    let runtime =
        quinn::default_runtime().ok_or_else(|| QuicError::Tls("no async runtime".into()))?;
    let (socket, seed) = environment.udp_socket(addr)?;
    let mut config = quinn::EndpointConfig::default();
    let server = server.map(|(server, reset_key)| {
        // Both derived from the identity, so that a restarted gateway recognises the connection
        // ids it gave out before and answers them with resets the devices can verify.
        config.reset_key(Arc::new(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            &reset_key,
        )));
        let cid_key = u64::from_be_bytes(reset_key[..8].try_into().expect("8 bytes"));
        config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        server
    });
    config.rng_seed(seed);
    quinn::Endpoint::new_with_abstract_socket(config, server, socket, runtime)
        .map_err(|source| QuicError::Bind { addr, source })
}

/// A server endpoint at `addr` presenting `identity`.
pub fn server_endpoint(
    environment: &dyn Environment,
    addr: SocketAddr,
    identity: &TlsIdentity,
) -> Result<quinn::Endpoint, QuicError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
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
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(Side::Server)));
    endpoint(environment, addr, Some((config, identity.reset_key())))
}

/// A client endpoint that trusts exactly the gateway certificate whose
/// [`crate::tls::certificate_pin`] is `pin`.
pub fn client_endpoint(
    environment: &dyn Environment,
    pin: [u8; 32],
) -> Result<quinn::Endpoint, QuicError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedCertificate {
        pin,
        provider: provider.clone(),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| QuicError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| QuicError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(Side::Client)));
    let any: SocketAddr = "0.0.0.0:0".parse().expect("a valid address");
    let mut endpoint = endpoint(environment, any, None)?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}
