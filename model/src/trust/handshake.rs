//! The device-to-device handshake and channel (direct transfers use it): certificates
//! exchanged, ephemeral X25519 keys signed by the device keys, HKDF-SHA256 to one key per
//! direction, and ChaCha20-Poly1305 records with counters that only grow.
//!
//! Three messages (a SIGMA-style exchange, signatures over the transcript hash):
//!
//! ```text
//! I -> R  hello:    "SDH" 1 | 0x01 | ephemeral_I (32) | nonce_I (32) | cert_I length (u16) | cert_I
//! R -> I  reply:    "SDH" 1 | 0x02 | ephemeral_R (32) | nonce_R (32) | cert_R length (u16) | cert_R
//!                   | signature_R (64) over H("sund/peer/v1 responder" | hello | reply-without-signature)
//! I -> R  finish:   "SDH" 1 | 0x03 | signature_I (64) over H("sund/peer/v1 initiator" | hello | reply)
//! ```
//!
//! Each side checks the other's certificate against its pinned trust root (issuer, domain,
//! validity on its own clock) and its cached CRL, and the signature against the certified key.
//! The session keys come from HKDF-SHA256 with the X25519 shared secret as input key material,
//! the hash of the whole transcript as salt, and one label per direction, so they are bound to
//! both certificates and both fresh nonces: a replayed hello gets a fresh reply nobody can finish,
//! and a replayed finish does not match a new transcript.
//!
//! A record is `counter (u64) | ciphertext+tag`, the nonce being the counter; a receiver takes
//! only counters above the last one it opened, so replayed or reordered records are refused.

use chacha20poly1305::aead::{Aead, KeyInit, Payload as AeadPayload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::env::Entropy;
use crate::identity::DeviceKey;
use crate::ids::{DeviceId, UserId};
use crate::time::Instant;

use super::certificate::{CertificateError, DeviceCertificate};
use super::crl::Crl;
use super::TrustRoot;

const MAGIC: &[u8; 3] = b"SDH";
const VERSION: u8 = 1;
const HELLO: u8 = 1;
const REPLY: u8 = 2;
const FINISH: u8 = 3;
const RESPONDER_CONTEXT: &[u8] = b"sund/peer/v1 responder";
const INITIATOR_CONTEXT: &[u8] = b"sund/peer/v1 initiator";
const KEY_I_TO_R: &[u8] = b"sund/peer/v1 key initiator to responder";
const KEY_R_TO_I: &[u8] = b"sund/peer/v1 key responder to initiator";
/// Longest certificate a handshake carries.
const CERTIFICATE_BYTES_MAX: usize = 512;
/// Largest record plaintext.
pub const RECORD_PLAINTEXT_MAX: usize = 1 << 20;

/// Why a handshake or a record was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The bytes are not the handshake message expected.
    #[error("malformed handshake message: {0}")]
    Malformed(&'static str),
    /// The peer's certificate does not check out.
    #[error("the peer's certificate is refused: {0}")]
    Certificate(CertificateError),
    /// The peer is revoked in the CRL this device holds.
    #[error("the peer device {0} is revoked")]
    Revoked(DeviceId),
    /// The transcript signature does not verify against the certified key.
    #[error("the peer's handshake signature does not verify")]
    BadSignature,
    /// A record failed authentication (tampered, or under another key).
    #[error("a record failed authentication")]
    Tampered,
    /// A record's counter is not above the last one opened (replayed or reordered).
    #[error("record {got} replayed or out of order (last opened {last})")]
    Replayed {
        /// The record's counter.
        got: u64,
        /// The last counter opened.
        last: u64,
    },
    /// A record is too large.
    #[error("record of {0} bytes is larger than allowed")]
    TooLarge(usize),
}

/// What one device brings to a handshake: its key and certificate, and the trust root and CRL it
/// checks the peer against.
pub struct PeerIdentity<'a> {
    /// The device key (signs the transcript).
    pub key: &'a DeviceKey,
    /// Its certificate.
    pub certificate: &'a DeviceCertificate,
    /// The pinned trust root.
    pub root: &'a TrustRoot,
    /// The newest CRL this device holds.
    pub crl: Option<&'a Crl>,
}

/// The verified peer of a finished handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its device.
    pub device: DeviceId,
    /// Its user.
    pub user: UserId,
}

/// The initiator after sending its hello.
pub struct Initiator {
    secret: StaticSecret,
    hello: Vec<u8>,
}

/// The responder after sending its reply.
pub struct Responder {
    peer_cert: DeviceCertificate,
    transcript: Vec<u8>,
    shared: Zeroizing<[u8; 32]>,
}

fn fresh_secret(entropy: &mut dyn Entropy) -> StaticSecret {
    let mut bytes = Zeroizing::new([0u8; 32]);
    entropy.fill_bytes(bytes.as_mut());
    StaticSecret::from(*bytes)
}

fn hello_like(kind: u8, ephemeral: &PublicKey, nonce: &[u8; 32], cert: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(72 + cert.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(ephemeral.as_bytes());
    out.extend_from_slice(nonce);
    let len = u16::try_from(cert.len()).expect("certificates are at most 408 bytes");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(cert);
    out
}

/// Parses the common part of a hello or reply: (ephemeral, certificate, bytes consumed).
fn parse_hello_like(
    kind: u8,
    bytes: &[u8],
) -> Result<([u8; 32], DeviceCertificate, usize), HandshakeError> {
    let short = HandshakeError::Malformed("truncated");
    if bytes.len() < 72 {
        return Err(short);
    }
    if &bytes[..3] != MAGIC || bytes[3] != VERSION {
        return Err(HandshakeError::Malformed(
            "not a Sund peer handshake of version 1",
        ));
    }
    if bytes[4] != kind {
        return Err(HandshakeError::Malformed("unexpected handshake message"));
    }
    let ephemeral: [u8; 32] = bytes[5..37].try_into().expect("32 bytes");
    let len = usize::from(u16::from_be_bytes([bytes[69], bytes[70]]));
    if len > CERTIFICATE_BYTES_MAX {
        return Err(HandshakeError::Malformed("certificate too long"));
    }
    let end = 71 + len;
    let cert_bytes = bytes.get(71..end).ok_or(short)?;
    let cert = DeviceCertificate::decode(cert_bytes).map_err(HandshakeError::Certificate)?;
    Ok((ephemeral, cert, end))
}

fn transcript_hash(context: &[u8], transcript: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update(context)
        .chain_update(transcript)
        .finalize()
        .into()
}

/// Checks a peer's certificate as this device sees it: issuer, validity on its clock, CRL.
fn check_peer(
    me: &PeerIdentity<'_>,
    now: Instant,
    cert: &DeviceCertificate,
) -> Result<(), HandshakeError> {
    cert.verify(me.root, now)
        .map_err(HandshakeError::Certificate)?;
    if me
        .crl
        .is_some_and(|crl| crl.revoked.contains(&cert.device()))
    {
        return Err(HandshakeError::Revoked(cert.device()));
    }
    Ok(())
}

/// HKDF-SHA256 expand of `shared` under `salt` into the two direction keys (initiator to
/// responder, responder to initiator).
pub fn derive_keys(
    shared: &[u8; 32],
    salt: &[u8; 32],
) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
    let hk = Hkdf::<Sha256>::new(Some(salt), shared);
    let mut i_to_r = Zeroizing::new([0u8; 32]);
    let mut r_to_i = Zeroizing::new([0u8; 32]);
    hk.expand(KEY_I_TO_R, i_to_r.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 length");
    hk.expand(KEY_R_TO_I, r_to_i.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 length");
    (i_to_r, r_to_i)
}

impl Initiator {
    /// Starts a handshake: the hello to send.
    pub fn start(me: &PeerIdentity<'_>, entropy: &mut dyn Entropy) -> (Initiator, Vec<u8>) {
        let secret = fresh_secret(entropy);
        let mut nonce = [0u8; 32];
        entropy.fill_bytes(&mut nonce);
        let hello = hello_like(
            HELLO,
            &PublicKey::from(&secret),
            &nonce,
            &me.certificate.encode(),
        );
        (
            Initiator {
                secret,
                hello: hello.clone(),
            },
            hello,
        )
    }

    /// Takes the responder's reply: checks its certificate and signature, and returns the
    /// channel and the finish message to send.
    pub fn finish(
        self,
        me: &PeerIdentity<'_>,
        now: Instant,
        reply: &[u8],
    ) -> Result<(Channel, Peer, Vec<u8>), HandshakeError> {
        let (ephemeral, cert, end) = parse_hello_like(REPLY, reply)?;
        if reply.len() != end + 64 {
            return Err(HandshakeError::Malformed("reply length"));
        }
        check_peer(me, now, &cert)?;
        let signature: [u8; 64] = reply[end..].try_into().expect("64 bytes");
        let mut transcript = self.hello.clone();
        transcript.extend_from_slice(&reply[..end]);
        let signed = transcript_hash(RESPONDER_CONTEXT, &transcript);
        if !cert.device_key.verify(&signed, &signature) {
            return Err(HandshakeError::BadSignature);
        }
        transcript.extend_from_slice(&signature);
        let own = transcript_hash(INITIATOR_CONTEXT, &transcript);
        let mut finish = MAGIC.to_vec();
        finish.push(VERSION);
        finish.push(FINISH);
        finish.extend_from_slice(&me.key.sign(&own));
        let shared = Zeroizing::new(
            self.secret
                .diffie_hellman(&PublicKey::from(ephemeral))
                .to_bytes(),
        );
        let (send, receive) = derive_keys(&shared, &own);
        let peer = Peer {
            device: cert.device(),
            user: cert.user,
        };
        Ok((Channel::new(send, receive), peer, finish))
    }
}

impl Responder {
    /// Answers a hello: checks the initiator's certificate and returns the reply to send.
    pub fn respond(
        me: &PeerIdentity<'_>,
        now: Instant,
        hello: &[u8],
        entropy: &mut dyn Entropy,
    ) -> Result<(Responder, Vec<u8>), HandshakeError> {
        let (ephemeral, cert, end) = parse_hello_like(HELLO, hello)?;
        if hello.len() != end {
            return Err(HandshakeError::Malformed("hello length"));
        }
        check_peer(me, now, &cert)?;
        let secret = fresh_secret(entropy);
        let mut nonce = [0u8; 32];
        entropy.fill_bytes(&mut nonce);
        let mut reply = hello_like(
            REPLY,
            &PublicKey::from(&secret),
            &nonce,
            &me.certificate.encode(),
        );
        let mut transcript = hello.to_vec();
        transcript.extend_from_slice(&reply);
        let signature = me
            .key
            .sign(&transcript_hash(RESPONDER_CONTEXT, &transcript));
        reply.extend_from_slice(&signature);
        transcript.extend_from_slice(&signature);
        let shared = Zeroizing::new(
            secret
                .diffie_hellman(&PublicKey::from(ephemeral))
                .to_bytes(),
        );
        Ok((
            Responder {
                peer_cert: cert,
                transcript,
                shared,
            },
            reply,
        ))
    }

    /// Takes the initiator's finish: checks its signature and returns the channel.
    pub fn finish(self, finish: &[u8]) -> Result<(Channel, Peer), HandshakeError> {
        if finish.len() != 69
            || &finish[..3] != MAGIC
            || finish[3] != VERSION
            || finish[4] != FINISH
        {
            return Err(HandshakeError::Malformed("not a finish message"));
        }
        let signature: [u8; 64] = finish[5..].try_into().expect("64 bytes");
        let own = transcript_hash(INITIATOR_CONTEXT, &self.transcript);
        if !self.peer_cert.device_key.verify(&own, &signature) {
            return Err(HandshakeError::BadSignature);
        }
        let (i_to_r, r_to_i) = derive_keys(&self.shared, &own);
        let peer = Peer {
            device: self.peer_cert.device(),
            user: self.peer_cert.user,
        };
        Ok((Channel::new(r_to_i, i_to_r), peer))
    }
}

/// An established channel: one key and counter per direction.
pub struct Channel {
    send: ChaCha20Poly1305,
    receive: ChaCha20Poly1305,
    sent: u64,
    opened: Option<u64>,
}

fn nonce(counter: u64) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::from(bytes)
}

impl Channel {
    fn new(send: Zeroizing<[u8; 32]>, receive: Zeroizing<[u8; 32]>) -> Channel {
        Channel {
            send: ChaCha20Poly1305::new(Key::from_slice(send.as_ref())),
            receive: ChaCha20Poly1305::new(Key::from_slice(receive.as_ref())),
            sent: 0,
            opened: None,
        }
    }

    /// Encrypts one record.
    pub fn seal(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, HandshakeError> {
        if plaintext.len() > RECORD_PLAINTEXT_MAX {
            return Err(HandshakeError::TooLarge(plaintext.len()));
        }
        let counter = self.sent;
        self.sent += 1;
        let header = counter.to_be_bytes();
        let sealed = self
            .send
            .encrypt(
                &nonce(counter),
                AeadPayload {
                    msg: plaintext,
                    aad: &header,
                },
            )
            .expect("ChaCha20-Poly1305 encryption of a bounded record cannot fail");
        let mut out = header.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Decrypts one record; refuses tampered, replayed and reordered ones.
    pub fn open(&mut self, record: &[u8]) -> Result<Vec<u8>, HandshakeError> {
        if record.len() < 8 + 16 {
            return Err(HandshakeError::Malformed("record too short"));
        }
        if record.len() > 8 + 16 + RECORD_PLAINTEXT_MAX {
            return Err(HandshakeError::TooLarge(record.len()));
        }
        let counter = u64::from_be_bytes(record[..8].try_into().expect("8 bytes"));
        if let Some(last) = self.opened {
            if counter <= last {
                return Err(HandshakeError::Replayed { got: counter, last });
            }
        }
        let plaintext = self
            .receive
            .decrypt(
                &nonce(counter),
                AeadPayload {
                    msg: &record[8..],
                    aad: &record[..8],
                },
            )
            .map_err(|_| HandshakeError::Tampered)?;
        self.opened = Some(counter);
        Ok(plaintext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::CountingEntropy as Counter;
    use std::collections::BTreeSet;

    const NOW: Instant = Instant(1_700_000_000_000_000);

    struct Device {
        key: DeviceKey,
        cert: DeviceCertificate,
    }

    fn root_key() -> DeviceKey {
        DeviceKey::from_seed([7; 32])
    }

    fn root() -> TrustRoot {
        TrustRoot {
            key: root_key().public(),
            domain: "example.org".into(),
        }
    }

    fn device(seed: u8, user: u128) -> Device {
        let key = DeviceKey::from_seed([seed; 32]);
        let now_s = NOW.as_micros() / 1_000_000;
        let cert = DeviceCertificate::issue(
            &root_key(),
            "example.org",
            u64::from(seed),
            key.public(),
            UserId(user),
            now_s - 10,
            now_s + 1000,
        );
        Device { key, cert }
    }

    fn identity<'a>(d: &'a Device, root: &'a TrustRoot, crl: Option<&'a Crl>) -> PeerIdentity<'a> {
        PeerIdentity {
            key: &d.key,
            certificate: &d.cert,
            root,
            crl,
        }
    }

    /// Each side's channel and the peer it verified.
    type Ends = ((Channel, Peer), (Channel, Peer));

    fn handshake(a: &PeerIdentity<'_>, b: &PeerIdentity<'_>) -> Result<Ends, HandshakeError> {
        let (initiator, hello) = Initiator::start(a, &mut Counter(10));
        let (responder, reply) = Responder::respond(b, NOW, &hello, &mut Counter(90))?;
        let (ca, peer_b, finish) = initiator.finish(a, NOW, &reply)?;
        let (cb, peer_a) = responder.finish(&finish)?;
        Ok(((ca, peer_b), (cb, peer_a)))
    }

    #[test]
    fn two_devices_agree_on_keys_and_learn_who_the_other_is() {
        let root = root();
        let (alice, bob) = (device(1, 100), device(2, 200));
        let ((mut ca, peer_b), (mut cb, peer_a)) =
            handshake(&identity(&alice, &root, None), &identity(&bob, &root, None)).unwrap();
        assert_eq!(peer_b.device, bob.key.device_id());
        assert_eq!(peer_a.user, UserId(100));
        let record = ca.seal(b"chunk 1").unwrap();
        assert_eq!(cb.open(&record).unwrap(), b"chunk 1");
        let back = cb.seal(b"ack").unwrap();
        assert_eq!(ca.open(&back).unwrap(), b"ack");
        // The plaintext does not appear in the record.
        assert!(!record.windows(7).any(|w| w == b"chunk 1"));
    }

    #[test]
    fn replayed_reordered_and_tampered_records_are_refused() {
        let root = root();
        let (alice, bob) = (device(1, 100), device(2, 200));
        let ((mut ca, _), (mut cb, _)) =
            handshake(&identity(&alice, &root, None), &identity(&bob, &root, None)).unwrap();
        let first = ca.seal(b"one").unwrap();
        let second = ca.seal(b"two").unwrap();
        assert_eq!(cb.open(&second).unwrap(), b"two");
        assert!(matches!(
            cb.open(&first),
            Err(HandshakeError::Replayed { got: 0, last: 1 })
        ));
        assert!(matches!(
            cb.open(&second),
            Err(HandshakeError::Replayed { .. })
        ));
        let mut third = ca.seal(b"three").unwrap();
        third[10] ^= 1;
        assert_eq!(cb.open(&third), Err(HandshakeError::Tampered));
        // A record sealed for the other direction does not open here.
        cb.seal(b"zero").unwrap();
        cb.seal(b"one").unwrap();
        let own = cb.seal(b"mine").unwrap(); // counter 2, above what cb opened
        let mut cb2 = cb;
        assert_eq!(cb2.open(&own), Err(HandshakeError::Tampered));
    }

    #[test]
    fn a_peer_revoked_in_the_cached_crl_is_refused_both_ways() {
        let root = root();
        let (alice, bob) = (device(1, 100), device(2, 200));
        let revoked: BTreeSet<DeviceId> = [alice.key.device_id()].into_iter().collect();
        let crl = Crl::issue(&root_key(), "example.org", 1, 0, revoked);
        // Bob holds the CRL: Alice's hello is refused.
        let refused = handshake(
            &identity(&alice, &root, None),
            &identity(&bob, &root, Some(&crl)),
        );
        assert!(matches!(refused, Err(HandshakeError::Revoked(d)) if d == alice.key.device_id()));
        // Alice is revoked but Bob initiates: Bob, holding the CRL, refuses her reply.
        let refused = handshake(
            &identity(&bob, &root, Some(&crl)),
            &identity(&alice, &root, None),
        );
        assert!(matches!(refused, Err(HandshakeError::Revoked(_))));
    }

    #[test]
    fn a_replayed_handshake_cannot_be_finished() {
        let root = root();
        let (alice, bob) = (device(1, 100), device(2, 200));
        let a = identity(&alice, &root, None);
        let b = identity(&bob, &root, None);
        let (initiator, hello) = Initiator::start(&a, &mut Counter(10));
        let (responder, reply) = Responder::respond(&b, NOW, &hello, &mut Counter(90)).unwrap();
        let (_, _, finish) = initiator.finish(&a, NOW, &reply).unwrap();
        responder.finish(&finish).unwrap();
        // An attacker replays Alice's hello and finish to Bob: Bob's new reply has a fresh
        // ephemeral key and nonce, so the old finish does not sign the new transcript.
        let (replayed, _) = Responder::respond(&b, NOW, &hello, &mut Counter(150)).unwrap();
        assert_eq!(
            replayed.finish(&finish).err(),
            Some(HandshakeError::BadSignature)
        );
    }

    #[test]
    fn foreign_forged_and_expired_certificates_are_refused() {
        let root = root();
        let bob = device(2, 200);
        let b = identity(&bob, &root, None);
        // Signed by another root.
        let mallory_key = DeviceKey::from_seed([3; 32]);
        let forged = Device {
            cert: DeviceCertificate::issue(
                &DeviceKey::from_seed([66; 32]),
                "example.org",
                1,
                mallory_key.public(),
                UserId(300),
                0,
                u64::MAX / 2,
            ),
            key: mallory_key,
        };
        let (_, hello) = Initiator::start(&identity(&forged, &root, None), &mut Counter(1));
        assert_eq!(
            Responder::respond(&b, NOW, &hello, &mut Counter(2)).err(),
            Some(HandshakeError::Certificate(CertificateError::BadSignature))
        );
        // Expired by the responder's clock.
        let alice = device(1, 100);
        let (_, hello) = Initiator::start(&identity(&alice, &root, None), &mut Counter(1));
        let late = Instant(NOW.as_micros() + 2_000_000_000);
        assert!(matches!(
            Responder::respond(&b, late, &hello, &mut Counter(2)),
            Err(HandshakeError::Certificate(
                CertificateError::Expired { .. }
            ))
        ));
        // A certificate shown by a device that does not hold its key cannot sign the reply.
        let (init, hello) = Initiator::start(&identity(&alice, &root, None), &mut Counter(1));
        let impostor = Device {
            key: DeviceKey::from_seed([4; 32]),
            cert: bob.cert.clone(),
        };
        let (_, reply) = Responder::respond(
            &identity(&impostor, &root, None),
            NOW,
            &hello,
            &mut Counter(2),
        )
        .unwrap();
        assert_eq!(
            init.finish(&identity(&alice, &root, None), NOW, &reply)
                .err(),
            Some(HandshakeError::BadSignature)
        );
    }

    #[test]
    fn malformed_messages_are_errors_never_panics() {
        let root = root();
        let bob = device(2, 200);
        let b = identity(&bob, &root, None);
        let (_, hello) = Initiator::start(&identity(&device(1, 100), &root, None), &mut Counter(1));
        for len in 0..hello.len() {
            assert!(Responder::respond(&b, NOW, &hello[..len], &mut Counter(2)).is_err());
        }
        let mut wrong_kind = hello.clone();
        wrong_kind[4] = REPLY;
        assert!(Responder::respond(&b, NOW, &wrong_kind, &mut Counter(2)).is_err());
        let mut long = hello.clone();
        long[69..71].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(Responder::respond(&b, NOW, &long, &mut Counter(2)).is_err());
    }

    /// RFC 5869, test case 1 (HKDF-SHA256), through the same HKDF the channel keys use.
    #[test]
    fn hkdf_sha256_matches_rfc_5869_test_case_1() {
        let ikm = [0x0b; 22];
        let salt: Vec<u8> = (0x00..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        let hk = Hkdf::<Sha256>::new(Some(&salt), &ikm);
        let mut okm = [0u8; 42];
        hk.expand(&info, &mut okm).unwrap();
        let expected =
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865";
        let hex = crate::hex::encode(&okm);
        assert_eq!(hex, expected);
    }

    /// RFC 7748 §6.1: the X25519 Diffie-Hellman test vector, through the same X25519 the
    /// handshake uses.
    #[test]
    fn x25519_matches_rfc_7748() {
        let unhex = |s: &str| -> [u8; 32] {
            let v: Vec<u8> = (0..32)
                .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            v.try_into().unwrap()
        };
        let alice = StaticSecret::from(unhex(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ));
        let bob = StaticSecret::from(unhex(
            "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
        ));
        assert_eq!(
            PublicKey::from(&alice).to_bytes(),
            unhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
        let shared = alice.diffie_hellman(&PublicKey::from(&bob)).to_bytes();
        assert_eq!(
            shared,
            unhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
        );
    }
}
