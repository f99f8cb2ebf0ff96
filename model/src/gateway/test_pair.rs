//! Tests: two federating gateways, a.example (0) and b.example (1), each pinning the other's
//! real root, links taken to be up, and the entries each queues for the other handed on by
//! hand ([`Pair::settle`]). Shared by the tests of the sub-machines that talk across domains.

use std::collections::BTreeSet;

use super::{AdminAnswer, AdminCommand, Gateway, GatewayConfig, GatewayInput, GatewayOutput};
use crate::env::MemStore;
use crate::federation::entry::Entry;
use crate::federation::handshake::PeerConfig;
use crate::federation::link::FEDERATION_OUTBOX_TABLE;
use crate::federation::FederationInput;
use crate::ids::{ConnectionId, DeviceId, UserId};
use crate::testing::{drain_gateway, TestDevice, TestEntropy};
use crate::time::Instant;
use crate::wire::payload::{FederationAck, HelloOk};
use crate::wire::{Frame, Payload, Routing};

pub(crate) const NOW: Instant = Instant(1_000_000_000);
pub(crate) const DOMAINS: [&str; 2] = ["a.example", "b.example"];

pub(crate) struct Pair {
    /// a.example and b.example, with their stores.
    pub(crate) gateways: Vec<(Gateway, MemStore)>,
    /// Outbox rows handed on already, by (gateway, key).
    pub(crate) handed: BTreeSet<(usize, Vec<u8>)>,
    /// What each gateway released while [`Pair::settle`] handed it entries, in order.
    pub(crate) released: [Vec<GatewayOutput>; 2],
    /// Rewrites each entry before it is handed on (a peer that says less, or lies).
    pub(crate) rewrite: Option<fn(Entry) -> Entry>,
    /// Request ids a test has handed out (for requests that must each have their own).
    pub(crate) requests: u64,
}

fn config(i: usize, peers: Vec<PeerConfig>) -> GatewayConfig {
    GatewayConfig {
        domain: DOMAINS[i].into(),
        open_enrolment: true,
        federation_peers: peers,
        ..GatewayConfig::default()
    }
}

impl Pair {
    pub(crate) fn new() -> Pair {
        // The same entropy makes the same root: learn each one's fingerprint first.
        let fingerprints: Vec<String> = (0..2)
            .map(|i| {
                Gateway::new(config(i, vec![]), NOW, Box::new(TestEntropy(20 + i as u64)))
                    .trust_root()
                    .fingerprint()
            })
            .collect();
        let mut gateways: Vec<(Gateway, MemStore)> = (0..2)
            .map(|i| {
                let peer = PeerConfig {
                    domain: DOMAINS[1 - i].into(),
                    root_fingerprint: fingerprints[1 - i].clone(),
                };
                let mut g = Gateway::new(
                    config(i, vec![peer]),
                    NOW,
                    Box::new(TestEntropy(20 + i as u64)),
                );
                let mut store = MemStore::default();
                drain_gateway(&mut g, &mut store);
                (g, store)
            })
            .collect();
        let keys: Vec<_> = gateways
            .iter()
            .map(|(g, _)| g.federation().unwrap().link_key())
            .collect();
        let roots: Vec<_> = gateways.iter().map(|(g, _)| g.trust_root().key).collect();
        for (i, (g, _)) in gateways.iter_mut().enumerate() {
            let f = g.federation.as_mut().unwrap();
            f.assume_peer_key(DOMAINS[1 - i], keys[1 - i]);
            f.assume_peer_root(DOMAINS[1 - i], roots[1 - i]);
        }
        Pair {
            gateways,
            handed: BTreeSet::new(),
            released: [Vec::new(), Vec::new()],
            rewrite: None,
            requests: 0,
        }
    }

    /// Registers a device at gateway `at`.
    pub(crate) fn register(&mut self, at: usize, seed: u8) -> DeviceId {
        let device = TestDevice::new([seed; 32], UserId::from_bytes([seed; 16]));
        let (g, store) = &mut self.gateways[at];
        let conn = ConnectionId(u64::from(seed));
        g.handle(NOW, GatewayInput::Accepted(conn));
        g.handle(NOW, GatewayInput::Frame(conn, device.register([0; 16])));
        drain_gateway(g, store);
        device.id()
    }

    pub(crate) fn admin(&mut self, at: usize, command: AdminCommand) -> AdminAnswer {
        let (g, store) = &mut self.gateways[at];
        g.run_admin(NOW, command, store).unwrap().0
    }

    /// Hands every outbox entry not handed on yet to the other gateway; returns the
    /// entries handed on.
    pub(crate) fn settle(&mut self) -> Vec<Entry> {
        let mut handed = Vec::new();
        for (from, domain) in DOMAINS.iter().enumerate() {
            let rows: Vec<(Vec<u8>, Vec<u8>)> = self.gateways[from]
                .1
                .records()
                .filter(|(t, k, _)| {
                    *t == FEDERATION_OUTBOX_TABLE.0 && !self.handed.contains(&(from, k.to_vec()))
                })
                .map(|(_, k, v)| (k.to_vec(), v.to_vec()))
                .collect();
            for (key, value) in rows {
                self.handed.insert((from, key));
                let mut entry = Entry::decode(&value).unwrap();
                if let Some(rewrite) = self.rewrite {
                    // Only other entries than sequenced ones are rewritten: the signature
                    // still holds.
                    entry = match entry {
                        Entry::Bundle { entries, signature } => Entry::Bundle {
                            entries: entries.into_iter().map(rewrite).collect(),
                            signature,
                        },
                        other => rewrite(other),
                    };
                }
                let (g, store) = &mut self.gateways[1 - from];
                g.handle_entry(NOW, domain, entry.clone());
                let released = drain_gateway(g, store);
                self.released[1 - from].extend(released);
                handed.push(entry);
            }
        }
        handed
    }

    /// A heartbeat from the other gateway arrives at `at`, saying it holds `crl` of
    /// `at`'s CRL.
    pub(crate) fn heartbeat(&mut self, at: usize, crl: u64) {
        let (g, store) = &mut self.gateways[at];
        let ack = FederationAck {
            gap: None,
            crl: Some(crl),
        };
        let frame = Frame::new(Routing::default(), Payload::FederationAck(ack)).encode();
        let conn = ConnectionId(u64::MAX - 1); // the assumed link's
        g.handle(
            NOW,
            GatewayInput::Federation(FederationInput::Frame(conn, frame)),
        );
        drain_gateway(g, store);
    }

    /// Registers a device for `user` at gateway `at` and opens its session there: its
    /// connection and id.
    pub(crate) fn open_session(
        &mut self,
        at: usize,
        seed: u8,
        user: UserId,
    ) -> (ConnectionId, DeviceId) {
        let (conn, device, _) = self.open_session_ok(at, seed, user);
        (conn, device)
    }

    /// [`Pair::open_session`], with the gateway's `HelloOk`.
    pub(crate) fn open_session_ok(
        &mut self,
        at: usize,
        seed: u8,
        user: UserId,
    ) -> (ConnectionId, DeviceId, HelloOk) {
        let device = TestDevice::new([seed; 32], user);
        let (g, store) = &mut self.gateways[at];
        let conn = ConnectionId(1000 + u64::from(seed));
        g.handle(NOW, GatewayInput::Accepted(conn));
        g.handle(NOW, GatewayInput::Frame(conn, device.register([0; 16])));
        let certificate = frames(&drain_gateway(g, store), conn)
            .into_iter()
            .find_map(|p| match p {
                Payload::Certificate(c) => Some(Vec::<u8>::from(c.certificate)),
                _ => None,
            })
            .expect("registered under open enrolment");
        g.handle(NOW, GatewayInput::Closed(conn));
        g.handle(NOW, GatewayInput::Accepted(conn));
        let hello = device.hello(Some(certificate), vec![], None, Some(user));
        g.handle(NOW, GatewayInput::Frame(conn, hello));
        let nonce = frames(&drain_gateway(g, store), conn)
            .into_iter()
            .find_map(|p| match p {
                Payload::Challenge(c) => Some(c.nonce),
                _ => None,
            })
            .expect("challenged");
        g.handle(NOW, GatewayInput::Frame(conn, device.proof(&nonce)));
        let opened = frames(&drain_gateway(g, store), conn);
        let ok = opened
            .into_iter()
            .find_map(|p| match p {
                Payload::HelloOk(ok) => Some(ok),
                _ => None,
            })
            .expect("session open");
        (conn, device.id(), ok)
    }
}

/// The payloads of the frames sent on `conn` among `outputs`, in order.
pub(crate) fn frames(outputs: &[GatewayOutput], conn: ConnectionId) -> Vec<Payload> {
    outputs
        .iter()
        .filter_map(|o| match o {
            GatewayOutput::Send(c, bytes) if *c == conn => Some(
                Frame::decode(bytes, u32::MAX)
                    .expect("the gateway's frames decode")
                    .payload,
            ),
            _ => None,
        })
        .collect()
}
