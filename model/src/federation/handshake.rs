//! Mutual authentication of a federation link: each gateway proves its domain with a link key
//! certified by its trust root, and checks the peer's root against the fingerprint its
//! operator configured for that domain.
//!
//! Three messages, each carried in a `FederationHello` frame; signatures cover the transcript
//! hash, so both fresh nonces, both certificates and both domains are bound together:
//!
//! ```text
//! D -> A  hello:   "SFH" 1 | 0x01 | nonce_D (32) | root_D (32) | cert_D length (u16) | cert_D
//!                  | wanted domain length (u8) | wanted domain
//! A -> D  reply:   "SFH" 1 | 0x02 | nonce_A (32) | root_A (32) | cert_A length (u16) | cert_A
//!                  | signature_A (64) over H("sund/federation/v1 answerer" | binding | hello | reply-without-signature)
//! D -> A  finish:  "SFH" 1 | 0x03 | signature_D (64) over H("sund/federation/v1 dialer" | binding | hello | reply)
//! ```
//!
//! The dialer names the domain it wants, so a hello recorded at one gateway cannot be played
//! to another; a replayed hello gets a fresh reply that only the holder of the dialer's link
//! key can finish, and a replayed finish does not match a new reply's nonce. The QUIC
//! connection's TLS keeps the frames private; this exchange is what names the domains.
//!
//! Both signatures cover the connection's *channel binding*: 32 bytes both ends of one TLS
//! session derive alike and no other session yields (on the real stack, the TLS exporter of RFC
//! 5705 with label `EXPORTER-sund-federation-v1`). Gateways do not pin each other's TLS
//! certificates (the operator pins the trust root), so without it a host in between could end
//! TLS on both sides, relay the three messages and then read and alter the link's frames; with
//! it, its two TLS sessions have different bindings and neither signature verifies.

use sha2::{Digest, Sha256};

use crate::codec::Reader;
use crate::env::Entropy;
use crate::identity::{DeviceKey, DevicePublicKey};
use crate::time::Instant;
use crate::trust::codec::{get_domain, put_domain};
use crate::trust::{CertificateError, TrustRoot};

use super::certificate::{GatewayCertificate, GATEWAY_CERTIFICATE_BYTES_MAX};

const MAGIC: &[u8; 3] = b"SFH";
const VERSION: u8 = 1;
const HELLO: u8 = 1;
const REPLY: u8 = 2;
const FINISH: u8 = 3;
const ANSWERER_CONTEXT: &[u8] = b"sund/federation/v1 answerer";
const DIALER_CONTEXT: &[u8] = b"sund/federation/v1 dialer";

/// Why a link's authentication failed. Each is logged and counted by the gateway; none
/// reveals more to the peer than that the link was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FederationHandshakeError {
    /// The bytes are not the handshake message expected.
    #[error("malformed federation handshake message: {0}")]
    Malformed(&'static str),
    /// The peer speaks for a domain this gateway does not federate with.
    #[error("domain `{0}` is not a configured federation peer")]
    UnknownDomain(String),
    /// The peer's root is not the one its operator pinned for its domain.
    #[error("the trust root of `{domain}` has fingerprint {found}, not the configured {expected}")]
    WrongRoot {
        /// The peer's domain.
        domain: String,
        /// The fingerprint presented.
        found: String,
        /// The fingerprint configured.
        expected: String,
    },
    /// The peer's certificate does not check out under its root.
    #[error("the peer's gateway certificate is refused: {0}")]
    Certificate(CertificateError),
    /// The dialer wanted another domain than this gateway's.
    #[error("the peer wanted domain `{0}`, not this gateway's")]
    NotForUs(String),
    /// The gateway dialed answered as another domain than the one dialed.
    #[error("the gateway at this peer's address answered as `{answered}`, not as `{dialed}`")]
    AnsweredAs {
        /// The domain dialed.
        dialed: String,
        /// The domain its certificate names.
        answered: String,
    },
    /// A transcript signature does not verify against the certified link key.
    #[error("the peer's handshake signature does not verify")]
    BadSignature,
}

/// What this gateway brings to every link: its domain, its link key and certificate, and its
/// root's public key (which peers check against their pinned fingerprint).
#[derive(Clone, Debug)]
pub struct LinkIdentity {
    /// This gateway's domain.
    pub domain: String,
    /// The link key (signs transcripts).
    pub key: DeviceKey,
    /// Its certificate, issued by this domain's root.
    pub certificate: GatewayCertificate,
    /// The root's public key.
    pub root: DevicePublicKey,
}

/// One federation peer as the operator configured it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    /// Its domain.
    pub domain: String,
    /// Its trust root's fingerprint (`TrustRoot::fingerprint`: 32 hex digits).
    pub root_fingerprint: String,
}

impl PeerConfig {
    /// Checks a presented root key and certificate against this peer at `now`.
    fn check(
        &self,
        root: DevicePublicKey,
        cert: &GatewayCertificate,
        now: Instant,
    ) -> Result<(), FederationHandshakeError> {
        let root = TrustRoot {
            key: root,
            domain: self.domain.clone(),
        };
        let found = root.fingerprint();
        if !found.eq_ignore_ascii_case(&self.root_fingerprint) {
            return Err(FederationHandshakeError::WrongRoot {
                domain: self.domain.clone(),
                found,
                expected: self.root_fingerprint.clone(),
            });
        }
        cert.verify(&root, now)
            .map_err(FederationHandshakeError::Certificate)
    }
}

/// The dialer after sending its hello.
#[derive(Debug)]
pub struct Dialing {
    hello: Vec<u8>,
    peer: PeerConfig,
    binding: ChannelBinding,
}

/// The answerer after sending its reply.
#[derive(Debug)]
pub struct Answering {
    peer: String,
    peer_key: DevicePublicKey,
    peer_root: DevicePublicKey,
    transcript: Vec<u8>,
    binding: ChannelBinding,
}

fn header(kind: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(kind);
    out
}

fn put_credentials(out: &mut Vec<u8>, nonce: &[u8; 32], me: &LinkIdentity) {
    out.extend_from_slice(nonce);
    out.extend_from_slice(&me.root.0);
    let cert = me.certificate.encode();
    let len = u16::try_from(cert.len()).expect("a certificate is at most 346 bytes");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&cert);
}

fn read_header(r: &mut Reader<'_>, kind: u8) -> Result<(), FederationHandshakeError> {
    let short = FederationHandshakeError::Malformed("truncated");
    if r.take(3).ok_or(short.clone())? != MAGIC || r.u8().ok_or(short.clone())? != VERSION {
        return Err(FederationHandshakeError::Malformed(
            "not a Sund federation handshake of version 1",
        ));
    }
    if r.u8().ok_or(short)? != kind {
        return Err(FederationHandshakeError::Malformed(
            "unexpected handshake message",
        ));
    }
    Ok(())
}

/// (nonce, root key, certificate) of a hello or reply.
fn read_credentials(
    r: &mut Reader<'_>,
) -> Result<([u8; 32], DevicePublicKey, GatewayCertificate), FederationHandshakeError> {
    let short = FederationHandshakeError::Malformed("truncated");
    let nonce = r.array().ok_or(short.clone())?;
    let root = DevicePublicKey(r.array().ok_or(short.clone())?);
    let len = usize::from(u16::from_be_bytes(r.array().ok_or(short.clone())?));
    if len > GATEWAY_CERTIFICATE_BYTES_MAX {
        return Err(FederationHandshakeError::Malformed("certificate too long"));
    }
    let cert = GatewayCertificate::decode(r.take(len).ok_or(short)?)
        .map_err(FederationHandshakeError::Certificate)?;
    Ok((nonce, root, cert))
}

/// 32 bytes both ends of one connection derive alike (see the module's documentation).
pub type ChannelBinding = [u8; 32];

fn transcript_hash(context: &[u8], binding: &ChannelBinding, transcript: &[u8]) -> Vec<u8> {
    Sha256::new()
        .chain_update(context)
        .chain_update(binding)
        .chain_update(transcript)
        .finalize()
        .to_vec()
}

fn fresh_nonce(entropy: &mut dyn Entropy) -> [u8; 32] {
    let mut nonce = [0u8; 32];
    entropy.fill_bytes(&mut nonce);
    nonce
}

/// True if `message` is a hello (by its header only; nothing is checked).
pub fn is_hello(message: &[u8]) -> bool {
    message.len() > 5 && &message[..3] == MAGIC && message[3] == VERSION && message[4] == HELLO
}

/// Starts a link to `peer` on a connection with `binding`: the hello to send.
pub fn dial(
    me: &LinkIdentity,
    peer: &PeerConfig,
    binding: ChannelBinding,
    entropy: &mut dyn Entropy,
) -> (Dialing, Vec<u8>) {
    let mut hello = header(HELLO);
    put_credentials(&mut hello, &fresh_nonce(entropy), me);
    put_domain(&mut hello, &peer.domain);
    let dialing = Dialing {
        hello: hello.clone(),
        peer: peer.clone(),
        binding,
    };
    (dialing, hello)
}

impl Dialing {
    /// The peer answered: checks its root, certificate and signature; the finish to send,
    /// the peer's link key (which signs what it sequences) and its root key (checked against
    /// the pinned fingerprint, which is all the configuration holds of it).
    pub fn finish(
        self,
        me: &LinkIdentity,
        reply: &[u8],
        now: Instant,
    ) -> Result<(Vec<u8>, DevicePublicKey, DevicePublicKey), FederationHandshakeError> {
        let mut r = Reader::new(reply);
        read_header(&mut r, REPLY)?;
        let (_, root, cert) = read_credentials(&mut r)?;
        if cert.domain != self.peer.domain {
            return Err(FederationHandshakeError::AnsweredAs {
                dialed: self.peer.domain.clone(),
                answered: cert.domain,
            });
        }
        self.peer.check(root, &cert, now)?;
        let signed_len = reply.len() - r.remaining();
        let signature: [u8; 64] = r
            .array()
            .ok_or(FederationHandshakeError::Malformed("truncated"))?;
        if r.remaining() != 0 {
            return Err(FederationHandshakeError::Malformed("trailing bytes"));
        }
        let mut transcript = self.hello.clone();
        transcript.extend_from_slice(&reply[..signed_len]);
        if !cert.link_key.verify(
            &transcript_hash(ANSWERER_CONTEXT, &self.binding, &transcript),
            &signature,
        ) {
            return Err(FederationHandshakeError::BadSignature);
        }
        let mut transcript = self.hello;
        transcript.extend_from_slice(reply);
        let mut finish = header(FINISH);
        finish.extend_from_slice(&me.key.sign(&transcript_hash(
            DIALER_CONTEXT,
            &self.binding,
            &transcript,
        )));
        Ok((finish, cert.link_key, root))
    }

    /// The peer this dial is for.
    pub fn peer(&self) -> &str {
        &self.peer.domain
    }
}

/// Answers a hello from a gateway that dialed this one on a connection with `binding`: finds
/// its domain among `peers`, checks its root and certificate; the reply to send.
pub fn answer(
    me: &LinkIdentity,
    peers: &[PeerConfig],
    hello: &[u8],
    binding: ChannelBinding,
    now: Instant,
    entropy: &mut dyn Entropy,
) -> Result<(Answering, Vec<u8>), FederationHandshakeError> {
    let mut r = Reader::new(hello);
    read_header(&mut r, HELLO)?;
    let (_, root, cert) = read_credentials(&mut r)?;
    let wanted =
        get_domain(&mut r).ok_or(FederationHandshakeError::Malformed("bad wanted domain"))?;
    if r.remaining() != 0 {
        return Err(FederationHandshakeError::Malformed("trailing bytes"));
    }
    if wanted != me.domain {
        return Err(FederationHandshakeError::NotForUs(wanted));
    }
    let peer = peers
        .iter()
        .find(|p| p.domain == cert.domain)
        .ok_or_else(|| FederationHandshakeError::UnknownDomain(cert.domain.clone()))?;
    peer.check(root, &cert, now)?;
    let mut reply = header(REPLY);
    put_credentials(&mut reply, &fresh_nonce(entropy), me);
    let mut transcript = hello.to_vec();
    transcript.extend_from_slice(&reply);
    reply.extend_from_slice(&me.key.sign(&transcript_hash(
        ANSWERER_CONTEXT,
        &binding,
        &transcript,
    )));
    let mut transcript = hello.to_vec();
    transcript.extend_from_slice(&reply);
    let answering = Answering {
        peer: cert.domain,
        peer_key: cert.link_key,
        peer_root: root,
        transcript,
        binding,
    };
    Ok((answering, reply))
}

impl Answering {
    /// The dialer finished: checks its signature; the peer's domain, now authenticated, its
    /// link key (which signs what it sequences) and its root key (checked against the pinned
    /// fingerprint).
    pub fn finish(
        self,
        finish: &[u8],
    ) -> Result<(String, DevicePublicKey, DevicePublicKey), FederationHandshakeError> {
        let mut r = Reader::new(finish);
        read_header(&mut r, FINISH)?;
        let signature: [u8; 64] = r
            .array()
            .ok_or(FederationHandshakeError::Malformed("truncated"))?;
        if r.remaining() != 0 {
            return Err(FederationHandshakeError::Malformed("trailing bytes"));
        }
        if !self.peer_key.verify(
            &transcript_hash(DIALER_CONTEXT, &self.binding, &self.transcript),
            &signature,
        ) {
            return Err(FederationHandshakeError::BadSignature);
        }
        Ok((self.peer, self.peer_key, self.peer_root))
    }

    /// The domain the dialer claims (not yet proven until [`Self::finish`]).
    pub fn peer(&self) -> &str {
        &self.peer
    }
}

/// A gateway's link identity made from seeds, for tests and the simulator: root and link keys
/// from `seed`, a certificate valid for 100 years from time zero.
pub fn test_identity(domain: &str, seed: u8) -> LinkIdentity {
    let root_key = DeviceKey::from_seed([seed; 32]);
    let key = DeviceKey::from_seed([seed.wrapping_add(128); 32]);
    let certificate =
        GatewayCertificate::issue(&root_key, domain, 1, key.public(), 0, 100 * 365 * 86_400);
    LinkIdentity {
        domain: domain.to_string(),
        key,
        certificate,
        root: root_key.public(),
    }
}

/// The peer configuration that pins `identity`'s root.
pub fn peer_of(identity: &LinkIdentity) -> PeerConfig {
    PeerConfig {
        domain: identity.domain.clone(),
        root_fingerprint: TrustRoot {
            key: identity.root,
            domain: identity.domain.clone(),
        }
        .fingerprint(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestEntropy as Counter;
    use proptest::prelude::*;

    const NOW: Instant = Instant(1_000_000_000);
    const BINDING: ChannelBinding = [0x42; 32];

    #[test]
    fn a_host_in_between_with_two_tls_sessions_cannot_finish_either_side() {
        // It relays every message unchanged, but its session with each side has its own
        // binding: the answerer's signature fails at the dialer, and a finish signed for one
        // session fails at the other.
        let (a, b) = pair();
        let mut entropy = Counter(5);
        let (dialing, hello) = dial(&a, &peer_of(&b), [1; 32], &mut entropy);
        let (answering, reply) =
            answer(&b, &[peer_of(&a)], &hello, [2; 32], NOW, &mut entropy).unwrap();
        assert_eq!(
            dialing.finish(&a, &reply, NOW).unwrap_err(),
            FederationHandshakeError::BadSignature
        );
        let (dialing, hello) = dial(&a, &peer_of(&b), [1; 32], &mut entropy);
        let (_, reply_on_1) =
            answer(&b, &[peer_of(&a)], &hello, [1; 32], NOW, &mut entropy).unwrap();
        let (finish, _, _) = dialing.finish(&a, &reply_on_1, NOW).unwrap();
        assert_eq!(
            answering.finish(&finish).unwrap_err(),
            FederationHandshakeError::BadSignature
        );
    }

    fn pair() -> (LinkIdentity, LinkIdentity) {
        (test_identity("a.example", 1), test_identity("b.example", 2))
    }

    #[test]
    fn two_configured_gateways_authenticate_each_other() {
        let (a, b) = pair();
        let mut entropy = Counter(5);
        let (dialing, hello) = dial(&a, &peer_of(&b), BINDING, &mut entropy);
        let (answering, reply) =
            answer(&b, &[peer_of(&a)], &hello, BINDING, NOW, &mut entropy).unwrap();
        assert_eq!(answering.peer(), "a.example");
        let (finish, b_key, b_root) = dialing.finish(&a, &reply, NOW).unwrap();
        assert_eq!(b_key, b.key.public());
        assert_eq!(b_root, b.root);
        assert_eq!(
            answering.finish(&finish).unwrap(),
            ("a.example".to_string(), a.key.public(), a.root)
        );
    }

    #[test]
    fn an_unknown_domain_or_a_wrong_root_is_refused() {
        let (a, b) = pair();
        let mut entropy = Counter(5);
        let (_, hello) = dial(&a, &peer_of(&b), BINDING, &mut entropy);
        let c = test_identity("c.example", 3);
        assert_eq!(
            answer(&b, &[peer_of(&c)], &hello, BINDING, NOW, &mut entropy).unwrap_err(),
            FederationHandshakeError::UnknownDomain("a.example".into())
        );
        // a.example's name with another root (an impostor with its own root).
        let impostor = test_identity("a.example", 9);
        let (_, hello) = dial(&impostor, &peer_of(&b), BINDING, &mut entropy);
        assert!(matches!(
            answer(&b, &[peer_of(&a)], &hello, BINDING, NOW, &mut entropy),
            Err(FederationHandshakeError::WrongRoot { .. })
        ));
        // The dialer checks the answerer the same way.
        let (dialing, hello) = dial(&a, &peer_of(&b), BINDING, &mut entropy);
        let b_impostor = test_identity("b.example", 8);
        let (_, reply) = answer(
            &b_impostor,
            &[peer_of(&a)],
            &hello,
            BINDING,
            NOW,
            &mut entropy,
        )
        .unwrap();
        assert!(matches!(
            dialing.finish(&a, &reply, NOW),
            Err(FederationHandshakeError::WrongRoot { .. })
        ));
    }

    #[test]
    fn a_hello_meant_for_another_gateway_is_refused() {
        let (a, b) = pair();
        let c = test_identity("c.example", 3);
        let mut entropy = Counter(5);
        let (_, hello) = dial(&a, &peer_of(&c), BINDING, &mut entropy);
        assert_eq!(
            answer(&b, &[peer_of(&a)], &hello, BINDING, NOW, &mut entropy).unwrap_err(),
            FederationHandshakeError::NotForUs("c.example".into())
        );
    }

    #[test]
    fn a_replayed_hello_cannot_be_finished_and_a_replayed_finish_does_not_match() {
        let (a, b) = pair();
        let mut entropy = Counter(5);
        let (dialing, hello) = dial(&a, &peer_of(&b), BINDING, &mut entropy);
        let (answering, reply) =
            answer(&b, &[peer_of(&a)], &hello, BINDING, NOW, &mut entropy).unwrap();
        let (finish, _, _) = dialing.finish(&a, &reply, NOW).unwrap();
        answering.finish(&finish).unwrap();
        // An attacker replays the hello and the finish it recorded: the new reply has a new
        // nonce, so the old finish does not verify.
        let (again, _) = answer(&b, &[peer_of(&a)], &hello, BINDING, NOW, &mut entropy).unwrap();
        assert_eq!(
            again.finish(&finish).unwrap_err(),
            FederationHandshakeError::BadSignature
        );
    }

    #[test]
    fn a_forged_signature_or_an_expired_certificate_is_refused() {
        let (a, b) = pair();
        let mut entropy = Counter(5);
        let (dialing, hello) = dial(&a, &peer_of(&b), BINDING, &mut entropy);
        let (_, mut reply) =
            answer(&b, &[peer_of(&a)], &hello, BINDING, NOW, &mut entropy).unwrap();
        let last = reply.len() - 1;
        reply[last] ^= 1;
        assert_eq!(
            dialing.finish(&a, &reply, NOW).unwrap_err(),
            FederationHandshakeError::BadSignature
        );
        let late = Instant(200 * 365 * 86_400 * 1_000_000);
        let (_, hello) = dial(&a, &peer_of(&b), BINDING, &mut entropy);
        assert!(matches!(
            answer(&b, &[peer_of(&a)], &hello, BINDING, late, &mut entropy),
            Err(FederationHandshakeError::Certificate(
                CertificateError::Expired { .. }
            ))
        ));
    }

    proptest! {
        #[test]
        fn any_bytes_are_refused_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            let (a, b) = pair();
            let mut entropy = Counter(5);
            let _ = answer(&b, &[peer_of(&a)], &bytes, BINDING, NOW, &mut entropy);
            let (dialing, _) = dial(&a, &peer_of(&b), BINDING, &mut entropy);
            let _ = dialing.finish(&a, &bytes, NOW);
            let (answering, _) = answer(&b, &[peer_of(&a)], &dial(&a, &peer_of(&b), BINDING, &mut entropy).1, BINDING, NOW, &mut entropy).unwrap();
            let _ = answering.finish(&bytes);
        }
    }
}
