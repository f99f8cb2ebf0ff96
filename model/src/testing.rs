//! What tests, fuzz harnesses and benchmarks share to play the other side of a machine
//! (feature `testing`): the device side of the session handshake without a `Node`, the
//! drain-and-commit loop, and a deterministic entropy.
//!
//! Everything here is ordinary protocol (the same frames a node sends); it exists once so that
//! the model's tests, the simulator's fuzz harness and the benchmarks cannot drift apart.

use bytes::Bytes;

use crate::env::{Entropy, Store};
use crate::gateway::{Gateway, GatewayOutput};
use crate::identity::{session_proof_message, DeviceKey};
use crate::ids::{DeviceId, UserId};
use crate::node::{Node, NodeOutput};
use crate::trust::register_message;
use crate::wire::payload::{Cursor, Hello, Proof, Register};
use crate::wire::{Frame, Payload, Routing};

/// The device side of registration and of the session handshake, as frames.
#[derive(Clone, Debug)]
pub struct TestDevice {
    /// The device key.
    pub key: DeviceKey,
    /// The user it registers for.
    pub user: UserId,
}

impl TestDevice {
    /// A device with the key made from `seed`, registering for `user`.
    pub fn new(seed: [u8; 32], user: UserId) -> TestDevice {
        TestDevice {
            key: DeviceKey::from_seed(seed),
            user,
        }
    }

    /// The device id (from the key).
    pub fn id(&self) -> DeviceId {
        self.key.device_id()
    }

    /// `Register` with the enrolment token's secret (zeros under open enrolment).
    pub fn register(&self, token: [u8; 16]) -> Bytes {
        let key = self.key.public();
        let register = Register {
            device_key: key.0,
            user: self.user.to_bytes(),
            token,
            proof: self.key.sign(&register_message(&token, &key, self.user)),
        };
        Frame::new(self.routing(), Payload::Register(register)).encode()
    }

    /// `Hello` showing `certificate`, presenting `cursors` and a resume token, naming `user`.
    pub fn hello(
        &self,
        certificate: Option<Vec<u8>>,
        cursors: Vec<Cursor>,
        resume_token: Option<[u8; 32]>,
        user: Option<UserId>,
    ) -> Bytes {
        let hello = Hello {
            cursors,
            device_key: self.key.public().0,
            resume_token,
            user: user.map(UserId::to_bytes),
            certificate: certificate.map(Into::into),
            generation: None,
        };
        Frame::new(self.routing(), Payload::Hello(hello)).encode()
    }

    /// `Proof` answering the challenge `nonce`.
    pub fn proof(&self, nonce: &[u8; 32]) -> Bytes {
        let signature = self.key.sign(&session_proof_message(nonce, self.id()));
        Frame::new(Routing::default(), Payload::Proof(Proof { signature })).encode()
    }

    fn routing(&self) -> Routing {
        Routing {
            sender: self.id(),
            ..Routing::default()
        }
    }
}

/// Commits every `Ready` the gateway has into `store`; returns what the commits released.
pub fn drain_gateway(gateway: &mut Gateway, store: &mut dyn Store) -> Vec<GatewayOutput> {
    let mut outputs = Vec::new();
    while let Some(ready) = gateway.poll_ready() {
        outputs.extend(ready.commit(store).expect("the test store commits"));
    }
    outputs
}

/// Commits every `Ready` the node has into `store`; returns its eager outputs, then what the
/// commits released, in the order a driver carries them out.
pub fn drain_node(node: &mut Node, store: &mut dyn Store) -> Vec<NodeOutput> {
    let mut outputs = Vec::new();
    while let Some(mut ready) = node.poll_ready() {
        outputs.extend(ready.take_eager());
        outputs.extend(ready.commit(store).expect("the test store commits"));
    }
    outputs
}

/// Deterministic pseudo-random bytes (xorshift64) for file contents in tests: no entropy
/// source needed, and distinct seeds give unrelated bytes that cut into unrelated chunks.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// A deterministic stand-in for entropy (a linear congruential generator): enough for nonces,
/// tokens and keys in tests; distinct starting values give distinct streams.
#[derive(Clone, Debug)]
pub struct TestEntropy(pub u64);

impl Entropy for TestEntropy {
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for b in dest {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (self.0 >> 56) as u8;
        }
    }
}

/// Every entry queued in `store`'s federation outboxes, in the store's key order (peer, then
/// number), the entries of each bundle in order.
pub fn queued_entries(store: &crate::env::MemStore) -> Vec<crate::federation::entry::Entry> {
    use crate::federation::entry::Entry;
    store
        .records()
        .filter(|(table, _, _)| *table == crate::federation::link::FEDERATION_OUTBOX_TABLE.0)
        .flat_map(|(_, _, value)| {
            Entry::decode(value)
                .expect("the gateway queues entries")
                .into_entries()
        })
        .collect()
}
