//! TLS for Sund's QUIC: the gateway's self-signed Ed25519 identity (created on first start, kept
//! in `DATA_DIR/tls/`, its key readable by its owner only) and the node's pin of it.
//!
//! No certificate authority is involved: a node pins the SHA-256 of the gateway's certificate
//! ([`certificate_pin`]) and accepts exactly that certificate, with its signatures still checked.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::endpoint::QuicError;

/// The gateway's TLS identity: certificate and private key, both DER.
pub struct TlsIdentity {
    /// The self-signed certificate (nodes pin these bytes).
    pub cert: CertificateDer<'static>,
    pub(crate) key: PrivatePkcs8KeyDer<'static>,
}

impl TlsIdentity {
    /// Loads `cert.der` and `key.der` from `dir`, creating an Ed25519 identity on first start.
    pub fn load_or_create(dir: &Path) -> Result<TlsIdentity, QuicError> {
        let cert_path = dir.join("cert.der");
        let key_path = dir.join("key.der");
        if cert_path.exists() && key_path.exists() {
            let cert = std::fs::read(&cert_path).map_err(identity_error(&cert_path))?;
            let key = std::fs::read(&key_path).map_err(identity_error(&key_path))?;
            return Ok(TlsIdentity {
                cert: CertificateDer::from(cert),
                key: PrivatePkcs8KeyDer::from(key),
            });
        }
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .map_err(|e| QuicError::Certificate(e.to_string()))?;
        let identity = TlsIdentity::self_signed(&key_pair)?;
        identity.save(dir)?;
        Ok(identity)
    }

    /// The identity of `key_pair` with its self-signed certificate.
    fn self_signed(key_pair: &rcgen::KeyPair) -> Result<TlsIdentity, QuicError> {
        let params = rcgen::CertificateParams::new(vec!["sund-gateway".to_string()])
            .map_err(|e| QuicError::Certificate(e.to_string()))?;
        let cert = params
            .self_signed(key_pair)
            .map_err(|e| QuicError::Certificate(e.to_string()))?;
        Ok(TlsIdentity {
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key_pair.serialize_der()),
        })
    }

    /// An identity whose Ed25519 key is `seed`, for simulations that must repeat bit for bit
    /// (the certificate is then the same too: rcgen derives its serial from the key and its
    /// validity is fixed). Never for production: the key is only as secret as the seed.
    pub fn from_seed(seed: [u8; 32]) -> Result<TlsIdentity, QuicError> {
        // PKCS#8 v1 of an Ed25519 private key (RFC 8410): a fixed prefix, then the seed.
        const PREFIX: [u8; 16] = [
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        let mut der = PREFIX.to_vec();
        der.extend_from_slice(&seed);
        let key = PrivatePkcs8KeyDer::from(der);
        let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&key, &rcgen::PKCS_ED25519)
            .map_err(|e| QuicError::Certificate(e.to_string()))?;
        TlsIdentity::self_signed(&key_pair)
    }

    /// Writes this identity where [`TlsIdentity::load_or_create`] finds it.
    pub fn save(&self, dir: &Path) -> Result<(), QuicError> {
        crate::files::private_dir(dir).map_err(|e| QuicError::Identity {
            path: dir.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let key_path = dir.join("key.der");
        let cert_path = dir.join("cert.der");
        write_private(&key_path, self.key.secret_pkcs8_der()).map_err(identity_error(&key_path))?;
        std::fs::write(&cert_path, self.cert.as_ref()).map_err(identity_error(&cert_path))
    }

    /// The key of the gateway's QUIC stateless resets (and of its connection id generator),
    /// derived from its TLS key: the same across restarts, so a device still talking on a
    /// connection the gateway forgot (it restarted, or dropped a peer whose close never got
    /// through) gets a reset it can verify and reconnects at once instead of waiting out its
    /// idle timeout.
    pub fn reset_key(&self) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::new()
            .chain_update(b"sund/quic-stateless-reset/v1")
            .chain_update(self.key.secret_pkcs8_der())
            .finalize()
            .into()
    }
}

/// An I/O error on an identity file, naming the file.
fn identity_error(path: &Path) -> impl FnOnce(io::Error) -> QuicError {
    let path = path.display().to_string();
    move |source| QuicError::Identity { path, source }
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

/// Checks that `der` is an X.509 certificate a node could pin (it parses as one), so that a
/// wrong file given to `sund init --gateway-cert` is refused at once rather than at every
/// connection.
pub fn check_certificate(der: &[u8]) -> Result<(), String> {
    let cert = CertificateDer::from(der);
    webpki::EndEntityCert::try_from(&cert)
        .map(|_| ())
        .map_err(|e| format!("not a DER X.509 certificate ({e:?})"))
}

/// What a node pins of its gateway's certificate: the SHA-256 of its DER bytes. A pairing code
/// carries this instead of the certificate, so that it fits a QR code.
pub fn certificate_pin(cert: &CertificateDer<'_>) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(cert.as_ref()).into()
}

/// The words of the TLS error a node's pin check raises, so that drivers can tell a wrong
/// pin from a gateway that is down.
pub const NOT_PINNED: &str = "the gateway's certificate is not the pinned one";

/// Accepts the gateway's certificate only if its SHA-256 is the pinned one; signatures are
/// still verified, so the peer must hold the matching key.
#[derive(Debug)]
pub(crate) struct PinnedCertificate {
    pub(crate) pin: [u8; 32],
    pub(crate) provider: Arc<rustls::crypto::CryptoProvider>,
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
            Err(rustls::Error::General(NOT_PINNED.into()))
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
        verify_tls13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes(&self.provider)
    }
}

/// Accepts whichever certificate a peer gateway's federation endpoint shows (checking only that
/// the handshake is signed by its key). Gateways do not pin each other's TLS certificates: the
/// operator pins the peer's trust root, and the federation handshake proves the domain and
/// binds itself to this TLS session through the exporter
/// (`sund_model::federation::handshake`), so a host in between gains nothing from being let in
/// here.
#[derive(Debug)]
pub(crate) struct AnyCertificate {
    pub(crate) provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
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
        verify_tls13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes(&self.provider)
    }
}

/// The handshake signature check both verifiers make (the certificate's key signed it).
fn verify_tls13(
    provider: &rustls::crypto::CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

fn schemes(provider: &rustls::crypto::CryptoProvider) -> Vec<SignatureScheme> {
    provider
        .signature_verification_algorithms
        .supported_schemes()
}
