//! Nodes and a gateway wired together frame by frame: devices keep their KeyPackage pools topped
//! up at the gateway, fetches drain them, the owners replenish, and a device's MLS identity and
//! package keys survive its restart.

use std::collections::BTreeMap;

use openmls_traits::OpenMlsProvider as _;
use sund_model::env::{Entropy, MemStore};
use sund_model::gateway::{Gateway, GatewayConfig, GatewayInput, GatewayOutput};
use sund_model::identity::DeviceKey;
use sund_model::ids::{ConnectionId, DeviceId, UserId};
use sund_model::mls::device::DeviceMlsConfig;
use sund_model::mls::{key_packages, LifetimePolicy, Randomness};
use sund_model::node::{Node, NodeConfig, NodeInput, NodeOutput};
use sund_model::time::Instant;
use sund_model::wire::payload::{KeyPackageFetch, KeyPackages};
use sund_model::wire::{Frame, Payload, Routing, PAYLOAD_BYTES_MAX};

struct Counter(u64);
impl Entropy for Counter {
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

fn mls_config() -> DeviceMlsConfig {
    DeviceMlsConfig {
        randomness: Randomness::Simulation,
        lifetime: LifetimePolicy::Unbounded,
        pool_target: 12,
    }
}

fn node_config(seed: u8, user: &str) -> NodeConfig {
    let mut config = NodeConfig::new(DeviceKey::from_seed([seed; 32]));
    config.user = Some(UserId::from_name(user));
    config.mls = Some(mls_config());
    config
}

/// One gateway, some nodes, each node on its own connection; frames move until nothing moves.
struct Net {
    now: Instant,
    gateway: Gateway,
    gateway_store: MemStore,
    nodes: BTreeMap<u64, (Node, MemStore)>,
    /// Frames the gateway sent to each connection, decoded, for the test to inspect.
    seen: BTreeMap<u64, Vec<Frame>>,
}

impl Net {
    fn new() -> Net {
        let config = GatewayConfig {
            open_enrolment: true,
            ..GatewayConfig::default()
        };
        Net {
            now: Instant(1_000_000),
            gateway: Gateway::new(config, Instant(1_000_000), Box::new(Counter(77))),
            gateway_store: MemStore::default(),
            nodes: BTreeMap::new(),
            seen: BTreeMap::new(),
        }
    }

    fn add(&mut self, conn: u64, config: NodeConfig) {
        let store = MemStore::default();
        let node = Node::recover(config, Box::new(Counter(conn)), self.now, &store).unwrap();
        self.nodes.insert(conn, (node, store));
        self.settle();
    }

    /// Restarts a node from its store alone.
    fn restart(&mut self, conn: u64, config: NodeConfig) {
        let (_, store) = self.nodes.remove(&conn).unwrap();
        self.gateway
            .handle(self.now, GatewayInput::Closed(ConnectionId(conn)));
        let node = Node::recover(config, Box::new(Counter(conn + 100)), self.now, &store).unwrap();
        self.nodes.insert(conn, (node, store));
        self.settle();
    }

    /// Delivers everything until quiet; every Ready is committed before its outputs move.
    fn settle(&mut self) {
        for _ in 0..1000 {
            let mut moved = false;
            let conns: Vec<u64> = self.nodes.keys().copied().collect();
            for conn in conns {
                let (node, store) = self.nodes.get_mut(&conn).unwrap();
                node.handle_timeout(self.now);
                let mut outputs = Vec::new();
                while let Some(mut ready) = node.poll_ready() {
                    outputs.extend(ready.take_eager());
                    outputs.extend(ready.commit(store).unwrap());
                }
                for output in outputs {
                    moved = true;
                    match output {
                        NodeOutput::Connect => {
                            node.handle(self.now, NodeInput::Connected(ConnectionId(conn)));
                            self.gateway
                                .handle(self.now, GatewayInput::Accepted(ConnectionId(conn)));
                        }
                        NodeOutput::Send(_, bytes) => self
                            .gateway
                            .handle(self.now, GatewayInput::Frame(ConnectionId(conn), bytes)),
                        NodeOutput::Close(_) | NodeOutput::Event(_) => {}
                    }
                }
            }
            let mut outputs = Vec::new();
            while let Some(ready) = self.gateway.poll_ready() {
                outputs.extend(ready.commit(&mut self.gateway_store).unwrap());
            }
            for output in outputs {
                if let GatewayOutput::Send(conn, bytes) = output {
                    moved = true;
                    self.seen
                        .entry(conn.0)
                        .or_default()
                        .push(Frame::decode(&bytes, PAYLOAD_BYTES_MAX).unwrap());
                    if let Some((node, _)) = self.nodes.get_mut(&conn.0) {
                        node.handle(self.now, NodeInput::Frame(conn, bytes));
                    }
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the network did not settle");
    }

    fn device(&self, conn: u64) -> DeviceId {
        DeviceKey::from_seed([conn as u8; 32]).device_id()
    }

    /// `conn` fetches packages of `user` through the gateway; returns the answer.
    fn fetch(&mut self, conn: u64, user: &str) -> KeyPackages {
        let fetch = KeyPackageFetch {
            users: vec![UserId::from_name(user).to_bytes().into()],
        };
        let bytes = Frame::new(Routing::default(), Payload::KeyPackageFetch(fetch)).encode();
        self.gateway
            .handle(self.now, GatewayInput::Frame(ConnectionId(conn), bytes));
        self.settle();
        self.seen[&conn]
            .iter()
            .rev()
            .find_map(|f| match &f.payload {
                Payload::KeyPackages(k) => Some(k.clone()),
                _ => None,
            })
            .expect("an answer")
    }
}

#[test]
fn devices_fill_their_pools_on_connect_and_refill_when_fetches_drain_them() {
    let mut net = Net::new();
    net.add(1, node_config(1, "alice"));
    net.add(2, node_config(2, "bob"));
    for conn in [1, 2] {
        assert_eq!(net.gateway.key_packages_left(net.device(conn)), 12);
        let node = &net.nodes[&conn].0;
        assert_eq!(node.stats().key_packages_uploaded, 12);
        assert!(
            !node.mls().unwrap().upload_pending(),
            "the count answered the upload"
        );
    }
    // Alice fetches Bob's packages until his pool runs below the threshold (10), and Bob tops
    // it up again on the count the gateway pushes.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let answer = net.fetch(1, "bob");
        assert_eq!(answer.found.len(), 1);
        assert!(!answer.found[0].last_resort);
        let package = answer.found[0].package.to_vec();
        assert!(!seen.contains(&package), "never the same package twice");
        // The package Bob made verifies as Bob's at the gateway's check.
        let crypto = openmls_rust_crypto::RustCrypto::default();
        assert!(key_packages::check(&crypto, &package, net.device(2)).is_ok());
        seen.push(package);
    }
    assert_eq!(
        net.gateway.key_packages_left(net.device(2)),
        12,
        "9 left was below 10: Bob topped up to his target"
    );
    assert_eq!(net.nodes[&2].0.stats().key_packages_uploaded, 15);
    assert_eq!(
        net.gateway.key_packages_left(net.device(1)),
        12,
        "Alice's pool untouched"
    );
}

#[test]
fn a_restarted_device_keeps_its_signing_key_and_package_keys() {
    let mut net = Net::new();
    net.add(2, node_config(2, "bob"));
    let before = net.nodes[&2].0.mls().unwrap().signature_key().to_vec();
    let records = net.nodes[&2].0.mls().unwrap().provider().storage().len();
    assert!(records > 12, "signer and one record per package: {records}");
    net.restart(2, node_config(2, "bob"));
    let mls = net.nodes[&2].0.mls().unwrap();
    assert_eq!(mls.signature_key(), before.as_slice());
    assert_eq!(
        mls.provider().storage().len(),
        records,
        "every private key came back from the store, and the full pool caused no new upload"
    );
    assert_eq!(net.gateway.key_packages_left(net.device(2)), 12);
}

#[test]
fn devices_without_mls_ignore_counts_and_upload_nothing() {
    let mut net = Net::new();
    let mut plain = NodeConfig::new(DeviceKey::from_seed([3; 32]));
    plain.user = Some(UserId::from_name("carol"));
    net.add(3, plain);
    assert_eq!(net.gateway.key_packages_left(net.device(3)), 0);
    assert!(net.nodes[&3].0.mls().is_none());
}
