//! QUIC plumbing shared by the gateway and the node: TLS identities, endpoints, and frames on a
//! stream.
//!
//! Each session is one QUIC connection with one bidirectional stream that carries Sund frames
//! back to back; [`FrameDecoder`] splits them, so a torn or hostile stream is rejected with a
//! wire error instead of a panic. The gateway's certificate is self-signed (Ed25519) and created
//! on first start; nodes pin its SHA-256 (`certificate_pin`), so no certificate authority is involved.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sund_model::wire::{FrameDecoder, PAYLOAD_BYTES_MAX};

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

/// The gateway's TLS identity: certificate and private key, both DER.
pub struct TlsIdentity {
    /// The self-signed certificate (nodes pin these bytes).
    pub cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl TlsIdentity {
    /// Loads `cert.der` and `key.der` from `dir`, creating an Ed25519 identity on first start.
    pub fn load_or_create(dir: &Path) -> Result<TlsIdentity, QuicError> {
        let cert_path = dir.join("cert.der");
        let key_path = dir.join("key.der");
        let io_err = |path: &Path| {
            let path = path.display().to_string();
            move |source| QuicError::Identity { path, source }
        };
        if cert_path.exists() && key_path.exists() {
            let cert = std::fs::read(&cert_path).map_err(io_err(&cert_path))?;
            let key = std::fs::read(&key_path).map_err(io_err(&key_path))?;
            return Ok(TlsIdentity {
                cert: CertificateDer::from(cert),
                key: PrivatePkcs8KeyDer::from(key),
            });
        }
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .map_err(|e| QuicError::Certificate(e.to_string()))?;
        let params = rcgen::CertificateParams::new(vec!["sund-gateway".to_string()])
            .map_err(|e| QuicError::Certificate(e.to_string()))?;
        let cert = params
            .self_signed(&key_pair)
            .map_err(|e| QuicError::Certificate(e.to_string()))?;
        let key_der = key_pair.serialize_der();
        write_private(&key_path, &key_der).map_err(io_err(&key_path))?;
        std::fs::write(&cert_path, cert.der()).map_err(io_err(&cert_path))?;
        Ok(TlsIdentity {
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key_der),
        })
    }
}

/// Writes a secret file readable by its owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(
        IDLE_TIMEOUT.try_into().expect("30 s fits a QUIC varint"),
    ));
    transport.keep_alive_interval(Some(Duration::from_secs(10)));
    transport
}

fn bound_socket(addr: SocketAddr) -> Result<UdpSocket, QuicError> {
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

/// Where an endpoint's datagrams go.
#[derive(Clone)]
pub enum Socket {
    /// A real UDP socket bound to this address (4 MiB buffers).
    Bind(SocketAddr),
    /// Any quinn socket (the turmoil simulation plugs in here), with a seed for the endpoint's
    /// own randomness (connection ids, stateless reset keys) so that simulated runs repeat.
    Custom(Arc<dyn quinn::AsyncUdpSocket>, [u8; 32]),
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Socket::Bind(addr) => write!(f, "Bind({addr})"),
            Socket::Custom(s, _) => write!(f, "Custom({:?})", s.local_addr()),
        }
    }
}

fn endpoint(
    socket: Socket,
    server: Option<quinn::ServerConfig>,
) -> Result<quinn::Endpoint, QuicError> {
    let runtime =
        quinn::default_runtime().ok_or_else(|| QuicError::Tls("no async runtime".into()))?;
    match socket {
        Socket::Bind(addr) => {
            let socket = bound_socket(addr)?;
            quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)
                .map_err(|source| QuicError::Bind { addr, source })
        }
        Socket::Custom(socket, seed) => {
            let addr = socket
                .local_addr()
                .unwrap_or_else(|_| "0.0.0.0:0".parse().expect("valid"));
            let mut config = quinn::EndpointConfig::default();
            config.rng_seed(Some(seed));
            quinn::Endpoint::new_with_abstract_socket(config, server, socket, runtime)
                .map_err(|source| QuicError::Bind { addr, source })
        }
    }
}

/// A server endpoint on `socket` presenting `identity`.
pub fn server_endpoint(
    socket: Socket,
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
    config.transport_config(Arc::new(transport_config()));
    endpoint(socket, Some(config))
}

/// What a node pins of its gateway's certificate: the SHA-256 of its DER bytes. A pairing code
/// carries this instead of the certificate, so that it fits a QR code.
pub fn certificate_pin(cert: &CertificateDer<'_>) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(cert.as_ref()).into()
}

/// A client endpoint on `socket` that trusts exactly the gateway certificate whose
/// [`certificate_pin`] is `pin`.
pub fn client_endpoint(socket: Socket, pin: [u8; 32]) -> Result<quinn::Endpoint, QuicError> {
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
    config.transport_config(Arc::new(transport_config()));
    let mut endpoint = endpoint(socket, None)?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Accepts the gateway's certificate only if its SHA-256 is the pinned one; signatures are
/// still verified, so the peer must hold the matching key.
#[derive(Debug)]
struct PinnedCertificate {
    pin: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if certificate_pin(end_entity) == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the gateway's certificate is not the pinned one".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Reads whole frames from a QUIC receive stream.
pub struct FrameReader {
    stream: quinn::RecvStream,
    decoder: FrameDecoder,
}

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The stream ended or the connection closed.
    #[error("connection closed")]
    Closed,
    /// The peer sent bytes that are not a valid frame.
    #[error("invalid frame: {0}")]
    Wire(#[from] sund_model::wire::WireError),
}

impl FrameReader {
    /// A reader over `stream`.
    pub fn new(stream: quinn::RecvStream) -> FrameReader {
        FrameReader {
            stream,
            decoder: FrameDecoder::new(PAYLOAD_BYTES_MAX),
        }
    }

    /// The next frame's bytes (header validated, payload left to the state machine).
    pub async fn next(&mut self) -> Result<Bytes, ReadError> {
        loop {
            if let Some(frame) = self.decoder.next_frame_bytes()? {
                return Ok(frame);
            }
            match self.stream.read_chunk(64 * 1024, true).await {
                Ok(Some(chunk)) => self.decoder.push(&chunk.bytes),
                Ok(None) | Err(_) => return Err(ReadError::Closed),
            }
        }
    }
}

/// What a connection's writer task is told by its driver.
#[derive(Debug)]
pub enum WriterCommand {
    /// Write one encoded frame.
    Frame(Bytes),
    /// Finish the stream, give the peer `linger` to read it, then close the connection.
    Close,
}

/// A connection's writer task: writes frames in order until told to close or until its driver
/// drops the channel (shutdown), then finishes the stream and closes with `reason`.
pub async fn write_frames(
    mut send: quinn::SendStream,
    mut commands: tokio::sync::mpsc::Receiver<WriterCommand>,
    connection: quinn::Connection,
    linger: Duration,
    reason: &'static [u8],
) {
    while let Some(command) = commands.recv().await {
        match command {
            WriterCommand::Frame(bytes) => {
                if send.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            WriterCommand::Close => break,
        }
    }
    let _ = send.finish();
    let _ = tokio::time::timeout(linger, send.stopped()).await;
    connection.close(0u32.into(), reason);
}
