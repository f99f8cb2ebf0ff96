//! Seeded randomness and a simulated clock for the QUIC and TLS stacks, so that a simulation of
//! the real drivers repeats bit for bit: the same seed puts the same bytes in every datagram.
//!
//! quinn and rustls each draw from the operating system in a few places and read the wall clock
//! in a few others. In production that is what they must do. In a [`crate::environment::Simulated`]
//! machine every one of those places takes what this module gives instead:
//!
//! | what | production | here |
//! | --- | --- | --- |
//! | TLS randoms, session ids, ticket nonces (`CryptoProvider::secure_random`) | ring, OS | ChaCha20 stream |
//! | TLS key exchange | ring's X25519, OS | X25519 with a secret from a ChaCha20 stream |
//! | TLS's wall clock (ticket ages) | `SystemTime::now` | the driver clock |
//! | quinn's connection ids, and the id a client's first packet goes to | `rand::rng()` | ChaCha20 stream |
//! | quinn's handshake-token key | `rand::rng()` | derived from the seed |
//! | quinn's token timestamps | `SystemTime::now` | the driver clock |
//! | quinn's client reset key | `rand::rng()` | derived from the seed |
//! | quinn's own rng (packet numbers skipped, padding, grease) | OS | `EndpointConfig::rng_seed` |
//!
//! Nothing here is for production: a seeded stack is only as secret as its seed.

use std::hash::Hasher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quinn_proto::{ConnectionId, ConnectionIdGenerator, InvalidCid};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rustls::crypto::{
    ActiveKeyExchange, CryptoProvider, GetRandomFailed, SecureRandom, SharedSecret,
    SupportedKxGroup,
};
use rustls::pki_types::UnixTime;
use rustls::{NamedGroup, ProtocolVersion};
use sha2::Digest;

use crate::clock::DriverClock;

/// Derives an independent 32-byte seed for one use (`label`) from an endpoint's seed.
pub fn derive(seed: &[u8; 32], label: &str) -> [u8; 32] {
    sha2::Sha256::new()
        .chain_update(b"sund/seeded-stack/v1/")
        .chain_update(label.as_bytes())
        .chain_update(seed)
        .finalize()
        .into()
}

/// A ChaCha20 stream shared by whoever holds a clone.
#[derive(Clone)]
struct SharedStream(Arc<Mutex<ChaCha20Rng>>);

impl SharedStream {
    fn new(seed: [u8; 32]) -> SharedStream {
        SharedStream(Arc::new(Mutex::new(ChaCha20Rng::from_seed(seed))))
    }

    fn fill(&self, dest: &mut [u8]) {
        self.0
            .lock()
            .expect("a seeded stream's lock is never poisoned: fill cannot panic")
            .fill_bytes(dest);
    }
}

impl std::fmt::Debug for SharedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedStream")
    }
}

/// rustls's source of randoms (client and server randoms, session ids, ticket nonces).
#[derive(Debug)]
struct SeededRandom(SharedStream);

impl SecureRandom for SeededRandom {
    fn fill(&self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
        self.0.fill(buf);
        Ok(())
    }
}

/// X25519 (RFC 7748) whose ephemeral secrets come from a seeded stream.
#[derive(Debug)]
struct SeededX25519(SharedStream);

impl SupportedKxGroup for SeededX25519 {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, rustls::Error> {
        let mut secret = [0u8; 32];
        self.0.fill(&mut secret);
        let secret = x25519_dalek::StaticSecret::from(secret);
        let public = x25519_dalek::PublicKey::from(&secret);
        Ok(Box::new(X25519Exchange { secret, public }))
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519
    }

    fn usable_for_version(&self, version: ProtocolVersion) -> bool {
        version == ProtocolVersion::TLSv1_3
    }
}

/// One X25519 exchange in progress: our secret and the public key we sent.
struct X25519Exchange {
    secret: x25519_dalek::StaticSecret,
    public: x25519_dalek::PublicKey,
}

impl ActiveKeyExchange for X25519Exchange {
    fn complete(self: Box<Self>, peer_pub_key: &[u8]) -> Result<SharedSecret, rustls::Error> {
        let peer: [u8; 32] = peer_pub_key
            .try_into()
            .map_err(|_| rustls::Error::from(rustls::PeerMisbehaved::InvalidKeyShare))?;
        let shared = self
            .secret
            .diffie_hellman(&x25519_dalek::PublicKey::from(peer));
        // A low-order peer key gives the all-zero secret (RFC 7748 section 6.1): refuse it.
        if !shared.was_contributory() {
            return Err(rustls::PeerMisbehaved::InvalidKeyShare.into());
        }
        Ok(SharedSecret::from(&shared.as_bytes()[..]))
    }

    fn pub_key(&self) -> &[u8] {
        self.public.as_bytes()
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

/// ring's TLS 1.3 provider with its randomness and key exchange drawn from `seed`.
///
/// rustls keeps both as `&'static` references, so each call leaks two small objects: one per
/// endpoint a simulated driver creates, never per connection.
pub fn tls_provider(seed: &[u8; 32]) -> CryptoProvider {
    let random: &'static SeededRandom = Box::leak(Box::new(SeededRandom(SharedStream::new(
        derive(seed, "tls-random"),
    ))));
    let x25519: &'static SeededX25519 = Box::leak(Box::new(SeededX25519(SharedStream::new(
        derive(seed, "tls-x25519"),
    ))));
    CryptoProvider {
        kx_groups: vec![x25519],
        secure_random: random,
        ..rustls::crypto::ring::default_provider()
    }
}

/// The wall clock rustls and quinn read, from a driver clock (whose model instants count
/// microseconds since the Unix epoch).
#[derive(Clone, Copy, Debug)]
pub struct ClockTime(pub DriverClock);

impl ClockTime {
    fn since_epoch(&self) -> Duration {
        Duration::from_micros(self.0.now().0)
    }
}

impl rustls::time_provider::TimeProvider for ClockTime {
    fn current_time(&self) -> Option<UnixTime> {
        Some(UnixTime::since_unix_epoch(self.since_epoch()))
    }
}

impl quinn_proto::TimeSource for ClockTime {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + self.since_epoch()
    }
}

/// Length of the id a client addresses its first packets to (RFC 9000 asks for at least 8
/// unpredictable bytes).
const INITIAL_CID_LEN: usize = 16;

/// The ids a simulated client addresses its first packets to, from a stream seeded by `seed`.
pub fn initial_connection_ids(seed: &[u8; 32]) -> Arc<dyn Fn() -> ConnectionId + Send + Sync> {
    let stream = SharedStream::new(derive(seed, "quic-initial-ids"));
    Arc::new(move || {
        let mut bytes = [0u8; INITIAL_CID_LEN];
        stream.fill(&mut bytes);
        ConnectionId::new(&bytes)
    })
}

/// Length of the nonce in a [`SeededConnectionIds`] id.
const CID_NONCE_LEN: usize = 4;
/// Length of the keyed check value after the nonce.
const CID_CHECK_LEN: usize = 4;

/// quinn's connection ids from a seeded stream: a random nonce and a keyed check value, like
/// quinn's own `HashedConnectionIdGenerator`, so that a server still tells its own ids (from
/// before a restart, with the same key) from garbage.
pub struct SeededConnectionIds {
    key: u64,
    stream: ChaCha20Rng,
}

impl SeededConnectionIds {
    /// Ids checked with `key`, nonces drawn from `seed`.
    pub fn new(key: u64, seed: [u8; 32]) -> SeededConnectionIds {
        SeededConnectionIds {
            key,
            stream: ChaCha20Rng::from_seed(seed),
        }
    }

    fn check_value(&self, nonce: &[u8]) -> [u8; CID_CHECK_LEN] {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        hasher.write_u64(self.key);
        hasher.write(nonce);
        let hash = hasher.finish().to_le_bytes();
        let mut check = [0u8; CID_CHECK_LEN];
        check.copy_from_slice(&hash[..CID_CHECK_LEN]);
        check
    }
}

impl ConnectionIdGenerator for SeededConnectionIds {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut bytes = [0u8; CID_NONCE_LEN + CID_CHECK_LEN];
        self.stream.fill_bytes(&mut bytes[..CID_NONCE_LEN]);
        let check = self.check_value(&bytes[..CID_NONCE_LEN]);
        bytes[CID_NONCE_LEN..].copy_from_slice(&check);
        ConnectionId::new(&bytes)
    }

    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        let (nonce, check) = cid.split_at(CID_NONCE_LEN);
        if check == self.check_value(nonce) {
            Ok(())
        } else {
            Err(InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        CID_NONCE_LEN + CID_CHECK_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake_keys(seed: [u8; 32]) -> (Vec<u8>, Vec<u8>) {
        let provider = tls_provider(&seed);
        let group = provider.kx_groups[0];
        let a = group.start().unwrap();
        let b = group.start().unwrap();
        let (a_pub, b_pub) = (a.pub_key().to_vec(), b.pub_key().to_vec());
        let ab = a.complete(&b_pub).unwrap();
        let ba = b.complete(&a_pub).unwrap();
        assert_eq!(ab.secret_bytes(), ba.secret_bytes(), "both sides agree");
        (a_pub, ab.secret_bytes().to_vec())
    }

    #[test]
    fn the_same_seed_gives_the_same_key_shares_and_secrets() {
        assert_eq!(handshake_keys([1; 32]), handshake_keys([1; 32]));
        assert_ne!(handshake_keys([1; 32]).0, handshake_keys([2; 32]).0);
    }

    #[test]
    fn a_low_order_or_malformed_peer_key_is_refused() {
        let provider = tls_provider(&[3; 32]);
        let exchange = provider.kx_groups[0].start().unwrap();
        assert!(exchange.complete(&[0u8; 32]).is_err(), "all-zero point");
        let exchange = provider.kx_groups[0].start().unwrap();
        assert!(exchange.complete(&[9u8; 31]).is_err(), "wrong length");
    }

    #[test]
    fn the_randoms_repeat_from_the_seed() {
        let draw = |seed| {
            let provider = tls_provider(&seed);
            let mut out = [0u8; 48];
            provider.secure_random.fill(&mut out).unwrap();
            out
        };
        assert_eq!(draw([4; 32]), draw([4; 32]));
        assert_ne!(draw([4; 32]), draw([5; 32]));
    }

    #[test]
    fn connection_ids_repeat_and_validate_only_with_their_key() {
        let mut a = SeededConnectionIds::new(77, [6; 32]);
        let mut b = SeededConnectionIds::new(77, [6; 32]);
        let ids: Vec<ConnectionId> = (0..4).map(|_| a.generate_cid()).collect();
        assert_eq!(ids, (0..4).map(|_| b.generate_cid()).collect::<Vec<_>>());
        assert!(ids.iter().all(|id| a.validate(id).is_ok()));
        let other = SeededConnectionIds::new(78, [6; 32]);
        assert!(ids.iter().filter(|id| other.validate(id).is_ok()).count() < 2);
        assert_ne!(ids[0], ids[1]);
    }
}
