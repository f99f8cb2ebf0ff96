//! Trust across domains (issue 15, step 4): the revocation lists of the domains this gateway
//! federates with, so that a device its own domain revoked cannot send through this gateway
//! either, nor be added to a conversation here.
//!
//! - **Pushed on change.** When this gateway revokes a device, its new CRL goes to every peer
//!   as an [`Entry::Revocations`] on the link's durable outbox, behind every entry queued
//!   before it: a message the device sent before its revocation still reaches the authority
//!   first, and none after it can follow.
//! - **Version in heartbeats.** Each link's heartbeat carries the version of the peer's CRL
//!   this gateway holds (`FederationAck::crl`); a gateway that sees a peer holding an older
//!   version of its own CRL queues it again, once per version while the link stays up. That
//!   repairs a peer that lost its data, a peer configured after the revocation, and a CRL
//!   refused on the way (each counted).
//! - **Checked.** A CRL is taken only from the domain it names, signed by a root whose
//!   fingerprint this gateway pins for that peer, and only if its version is newer than the
//!   one held; it is kept durably (table [`PEER_CRLS_TABLE`]) and survives restarts.
//!
//! - **Passed on to devices.** A peer CRL taken goes to every open device session (a `Crl`
//!   frame: the device tells it from its own domain's by the domain it names, and checks it
//!   against the root its own root vouched for that domain), and `HelloOk` and each
//!   heartbeat answer carry the digest of the peer CRLs held
//!   ([`crate::trust::versions_digest`]), so a device that was away, or missed one, asks for
//!   them all (`CrlFetch` with `peers`). Members then refuse commits adding a device its own domain revoked, whatever
//!   the gateway lets through.
//!
//! What a held CRL refuses: a relayed message from a revoked device of that domain (answered
//! `device_revoked`), and an operator sharing a conversation with one.

use std::collections::BTreeMap;

use crate::env::{StoreError, StoreRead, Table, WriteBatch};
use crate::federation::entry::Entry;
use crate::identity::DevicePublicKey;
use crate::ids::{ConnectionId, DeviceId};
use crate::time::Instant;
use crate::trust::{Crl, CrlError, TrustRoot};

use super::{Gateway, GatewayOutput};

/// Peer domains' CRLs: key the domain's bytes, value the encoded CRL.
pub const PEER_CRLS_TABLE: Table = Table("federation_crls");

/// Counters of the CRLs exchanged with peers (in `GatewayStats`, on `/metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PeerCrlStats {
    /// Peer CRLs taken (a newer version than the one held).
    pub taken: u64,
    /// Peer CRLs not newer than the one held (a copy, or one that overtook an older push).
    pub stale: u64,
    /// Peer CRLs refused: malformed, for another domain, or not signed by the pinned root.
    pub refused: u64,
    /// This gateway's CRL queued for peers (one per peer per push).
    pub pushed: u64,
    /// Relayed messages refused because their sender's domain revoked it.
    pub relays_refused: u64,
}

/// What became of a peer's CRL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerCrlTaken {
    /// Newer than the one held: taken, with how many devices it revokes.
    Taken {
        /// Its version.
        version: u64,
        /// Devices it revokes.
        revoked: usize,
    },
    /// Not newer than the version held: nothing changed.
    Stale {
        /// The version offered.
        offered: u64,
        /// The version held.
        held: u64,
    },
    /// Refused, in words for the operator.
    Refused(String),
}

/// For the operator: a peer's CRL was taken or refused (drivers log it; a copy of a version
/// held already is only counted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCrlEvent {
    /// The peer that sent it.
    pub peer: String,
    /// What became of it.
    pub outcome: PeerCrlTaken,
}

/// The peer domains' CRLs this gateway holds.
#[derive(Debug, Default)]
pub struct PeerCrls {
    held: BTreeMap<String, Crl>,
    stats: PeerCrlStats,
}

impl PeerCrls {
    /// Reads the CRLs kept in `store`. A row that does not read back as a CRL of its domain
    /// is damage, not something to skip: skipping it would let revoked devices through.
    pub fn recover(store: &dyn StoreRead) -> Result<PeerCrls, StoreError> {
        let mut held = BTreeMap::new();
        let mut damaged = None;
        store.scan_from(PEER_CRLS_TABLE, &[], &mut |key, value| {
            let crl = Crl::decode(value).ok();
            match (std::str::from_utf8(key), crl) {
                (Ok(domain), Some(crl)) if crl.domain == domain => {
                    held.insert(domain.to_string(), crl);
                }
                _ => damaged = Some("a peer domain's CRL does not read back"),
            }
            core::ops::ControlFlow::Continue(())
        })?;
        if let Some(what) = damaged {
            return Err(StoreError::Damaged(what.into()));
        }
        Ok(PeerCrls {
            held,
            stats: PeerCrlStats::default(),
        })
    }

    /// `peer` sent its CRL `bytes` with its root key `root`; `pinned` says whether that key's
    /// fingerprint is the one configured for `peer`. Takes it if it checks out and is newer.
    pub fn take(
        &mut self,
        peer: &str,
        root: DevicePublicKey,
        pinned: bool,
        bytes: &[u8],
        writes: &mut WriteBatch,
    ) -> PeerCrlTaken {
        let refused = |stats: &mut PeerCrlStats, why: String| {
            stats.refused += 1;
            PeerCrlTaken::Refused(why)
        };
        if !pinned {
            return refused(
                &mut self.stats,
                format!("its root key is not the one pinned for {peer}"),
            );
        }
        let crl = match Crl::decode(bytes) {
            Ok(crl) => crl,
            Err(error) => return refused(&mut self.stats, error.to_string()),
        };
        let root = TrustRoot {
            key: root,
            domain: peer.to_string(),
        };
        if let Err(error) = crl.verify(&root) {
            let why = match error {
                CrlError::ForeignDomain { found, .. } => format!("it is {found}'s, not {peer}'s"),
                other => other.to_string(),
            };
            return refused(&mut self.stats, why);
        }
        let held = self.version(peer);
        if crl.version <= held && self.held.contains_key(peer) {
            self.stats.stale += 1;
            return PeerCrlTaken::Stale {
                offered: crl.version,
                held,
            };
        }
        self.stats.taken += 1;
        writes.put(PEER_CRLS_TABLE, peer.as_bytes().to_vec(), bytes.to_vec());
        let taken = PeerCrlTaken::Taken {
            version: crl.version,
            revoked: crl.revoked.len(),
        };
        self.held.insert(peer.to_string(), crl);
        taken
    }

    /// `domain`'s CRL, if one is held here.
    pub fn crl(&self, domain: &str) -> Option<&Crl> {
        self.held.get(domain)
    }

    /// True if `domain`'s CRL, as held here, revokes `device`.
    pub fn revokes(&self, domain: &str, device: DeviceId) -> bool {
        self.crl(domain)
            .is_some_and(|crl| crl.revoked.contains(&device))
    }

    /// The version of `domain`'s CRL held here (0 if none: a new domain's list is empty).
    pub fn version(&self, domain: &str) -> u64 {
        self.crl(domain).map_or(0, |crl| crl.version)
    }

    /// Every CRL held, by domain.
    pub fn held(&self) -> impl Iterator<Item = (&str, &Crl)> {
        self.held.iter().map(|(d, c)| (d.as_str(), c))
    }

    /// The digest of the versions held (`None` if none revokes anything), which every
    /// heartbeat answer to a device carries.
    pub fn digest(&self) -> Option<u64> {
        crate::trust::versions_digest(self.held().map(|(domain, crl)| (domain, crl.version)))
    }

    /// The counters.
    pub fn stats(&self) -> PeerCrlStats {
        self.stats
    }

    /// Counts this gateway's CRL queued for a peer.
    pub(super) fn count_pushed(&mut self) {
        self.stats.pushed += 1;
    }

    /// Counts a relayed message refused because its domain revoked its sender.
    pub(super) fn count_relay_refused(&mut self) {
        self.stats.relays_refused += 1;
    }
}

impl Gateway {
    /// Queues this gateway's current CRL for `peers`, behind what is queued for them already.
    pub(super) fn push_crl(&mut self, peers: &[String]) {
        if self.federation.is_none() {
            return;
        }
        let crl = self.registry.crl();
        let version = crl.version;
        let entry = Entry::Revocations {
            root: self.registry.trust_root().key,
            crl: crl.encode().into(),
        };
        for peer in peers {
            // Only configured peers are named; a CRL fits an entry by its bound.
            if self.send_entry(peer, &entry).is_ok() {
                self.peer_crls.count_pushed();
                if let Some(federation) = &mut self.federation {
                    federation.crl_queued(peer, version);
                }
            }
        }
    }

    /// Queues this gateway's CRL again for every peer whose heartbeat shows an older version.
    pub(super) fn push_crl_where_behind(&mut self) {
        let Some(federation) = &self.federation else {
            return;
        };
        let behind = federation.crl_behind(self.registry.crl().version);
        if !behind.is_empty() {
            self.push_crl(&behind);
        }
    }

    /// `peer` sent its CRL.
    pub(super) fn on_peer_crl(
        &mut self,
        now: Instant,
        peer: &str,
        root: DevicePublicKey,
        crl: &[u8],
    ) {
        let Some(federation) = &mut self.federation else {
            return;
        };
        // Planted by the simulator only: never in a real gateway.
        let planted = self.config.planted == Some(crate::planted::PlantedBug::PeerCrlIgnored);
        let pinned = federation.pins_root(peer, root) && !planted;
        let outcome = self
            .peer_crls
            .take(peer, root, pinned, crl, self.fx.writes());
        let taken = matches!(outcome, PeerCrlTaken::Taken { .. });
        if let PeerCrlTaken::Taken { version, .. } = outcome {
            federation.set_crl_held(peer, version);
        }
        if !matches!(outcome, PeerCrlTaken::Stale { .. }) {
            self.fx.hold(GatewayOutput::PeerCrl(PeerCrlEvent {
                peer: peer.to_string(),
                outcome,
            }));
        }
        if taken {
            // Every device here hears of it, and the MLS conversations homed here drop the
            // devices it revokes.
            if let Some(crl) = self.peer_crls.crl(peer).map(Crl::encode) {
                for conn in self.sessions.open_connections() {
                    self.send_crl_frame(conn, crl.clone());
                }
            }
            self.remove_revoked_abroad(now, peer);
        }
    }

    /// Every peer CRL held that revokes anything, to a device that asked (its digest differs
    /// from the heartbeat's).
    pub(super) fn send_peer_crls(&mut self, conn: ConnectionId) {
        let crls: Vec<Vec<u8>> = self
            .peer_crls
            .held()
            .filter(|(_, crl)| crl.version > 0)
            .map(|(_, crl)| crl.encode())
            .collect();
        for crl in crls {
            self.send_crl_frame(conn, crl);
        }
    }

    fn send_crl_frame(&mut self, conn: ConnectionId, crl: Vec<u8>) {
        let payload = crate::wire::Payload::Crl(crate::wire::payload::Crl { crl: crl.into() });
        self.fx.send(conn, crate::wire::Routing::default(), payload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{MemStore, Store};
    use crate::identity::DeviceKey;
    use std::collections::BTreeSet;

    fn crl(root: &DeviceKey, domain: &str, version: u64, revoked: &[u128]) -> Vec<u8> {
        let revoked: BTreeSet<DeviceId> = revoked.iter().map(|&d| DeviceId(d)).collect();
        Crl::issue(root, domain, version, 0, revoked).encode()
    }

    #[test]
    fn a_newer_signed_crl_is_taken_and_survives_a_restart() {
        let root = DeviceKey::from_seed([4; 32]);
        let mut crls = PeerCrls::default();
        let mut writes = WriteBatch::default();
        let bytes = crl(&root, "b.example", 2, &[7, 9]);
        let taken = crls.take("b.example", root.public(), true, &bytes, &mut writes);
        assert_eq!(
            taken,
            PeerCrlTaken::Taken {
                version: 2,
                revoked: 2
            }
        );
        assert!(crls.revokes("b.example", DeviceId(7)));
        assert!(!crls.revokes("b.example", DeviceId(8)));
        assert!(!crls.revokes("c.example", DeviceId(7)));
        let mut store = MemStore::default();
        store.commit(writes).unwrap();
        let recovered = PeerCrls::recover(&store).unwrap();
        assert!(recovered.revokes("b.example", DeviceId(9)));
        assert_eq!(recovered.version("b.example"), 2);
    }

    #[test]
    fn an_older_or_equal_version_changes_nothing() {
        let root = DeviceKey::from_seed([4; 32]);
        let mut crls = PeerCrls::default();
        let mut writes = WriteBatch::default();
        let newer = crl(&root, "b.example", 3, &[7]);
        let older = crl(&root, "b.example", 2, &[]);
        crls.take("b.example", root.public(), true, &newer, &mut writes);
        for bytes in [&older, &newer] {
            let mut writes = WriteBatch::default();
            assert!(matches!(
                crls.take("b.example", root.public(), true, bytes, &mut writes),
                PeerCrlTaken::Stale { held: 3, .. }
            ));
            assert!(writes.is_empty(), "a stale CRL writes nothing");
        }
        assert!(crls.revokes("b.example", DeviceId(7)));
        assert_eq!(crls.stats().stale, 2);
    }

    #[test]
    fn a_crl_not_signed_by_the_pinned_root_or_for_another_domain_is_refused() {
        let root = DeviceKey::from_seed([4; 32]);
        let other = DeviceKey::from_seed([5; 32]);
        let mut crls = PeerCrls::default();
        let mut writes = WriteBatch::default();
        let bytes = crl(&root, "b.example", 1, &[7]);
        // The key is not the pinned one.
        assert!(matches!(
            crls.take("b.example", root.public(), false, &bytes, &mut writes),
            PeerCrlTaken::Refused(why) if why.contains("pinned")
        ));
        // Signed by another key than the root it comes with.
        assert!(matches!(
            crls.take("b.example", other.public(), true, &bytes, &mut writes),
            PeerCrlTaken::Refused(_)
        ));
        // b.example passing on c.example's list.
        let foreign = crl(&root, "c.example", 1, &[7]);
        assert!(matches!(
            crls.take("b.example", root.public(), true, &foreign, &mut writes),
            PeerCrlTaken::Refused(why) if why.contains("c.example")
        ));
        assert!(matches!(
            crls.take("b.example", root.public(), true, b"not a crl", &mut writes),
            PeerCrlTaken::Refused(_)
        ));
        assert!(writes.is_empty());
        assert!(!crls.revokes("b.example", DeviceId(7)));
        assert_eq!(crls.stats().refused, 4);
    }

    /// Two federating gateways, a.example (0) and b.example (1), each pinning the other's
    /// real root, with a conversation homed at a.example shared with two devices of b.example.
    mod federated {
        use super::super::*;
        use crate::federation::entry::Outcome;
        use crate::federation::link::FEDERATION_OUTBOX_TABLE;
        use crate::gateway::test_pair::{Pair, DOMAINS, NOW};
        use crate::gateway::{AdminAnswer, AdminCommand};
        use crate::ids::{ConversationId, MsgId};
        use crate::testing::drain_gateway;
        use crate::testing::TestEntropy;
        use crate::wire::payload::ErrorCode;
        use crate::wire::Payload;
        use bytes::Bytes;
        use std::collections::BTreeSet;

        const CONV: ConversationId = ConversationId(0xC0);

        impl Pair {
            /// b.example's device `sender` sends `msg`, relayed to a.example: its answer.
            fn relay(&mut self, sender: DeviceId, msg: u128) -> Outcome {
                let (g, store) = &mut self.gateways[0];
                g.handle_entry(
                    NOW,
                    DOMAINS[1],
                    Entry::Relay {
                        conversation: CONV,
                        sender,
                        msg_id: MsgId(msg),
                        after: None,
                        body: Bytes::from_static(b"ciphertext"),
                        welcome: None,
                        vouched: Vec::new(),
                    },
                );
                drain_gateway(g, store);
                crate::testing::queued_entries(store)
                    .into_iter()
                    .filter_map(|entry| match entry {
                        Entry::Answer { outcome, .. } => Some(outcome),
                        _ => None,
                    })
                    .last()
                    .expect("an answer")
            }
        }

        #[test]
        fn a_device_hears_its_peers_roots_vouched_for_by_its_own_root() {
            use crate::trust::peer_roots::PeerRoots;
            let mut w = Pair::new();
            let (_, _, ok) = w.open_session_ok(0, 40, crate::ids::UserId(40));
            let set = PeerRoots::decode(&ok.peer_roots.expect("a peer root is known")).unwrap();
            let a = &w.gateways[0].0;
            assert_eq!(set.verify(a.trust_root()), Ok(()));
            let b_root = w.gateways[1].0.trust_root().clone();
            assert_eq!(set.root_of(DOMAINS[1]), Some(b_root.clone()));
            assert_eq!(set.roots.len(), 1);
            // b.example's devices hear a.example's root, vouched for by b.example's.
            let (_, _, ok) = w.open_session_ok(1, 41, crate::ids::UserId(41));
            let set = PeerRoots::decode(&ok.peer_roots.unwrap()).unwrap();
            assert_eq!(set.verify(&b_root), Ok(()));
            assert!(set.verify(w.gateways[0].0.trust_root()).is_err());
        }

        #[test]
        fn a_device_revoked_by_its_domain_sends_through_no_gateway_and_is_not_added_again() {
            let mut w = Pair::new();
            let revoked = w.register(1, 31);
            let kept = w.register(1, 32);
            w.admin(
                0,
                AdminCommand::CreateConversation(CONV, vec![DeviceId(0xA1)]),
            );
            let share = |members| AdminCommand::ShareConversation {
                conversation: CONV,
                domain: DOMAINS[1].into(),
                members,
            };
            w.admin(0, share(vec![revoked, kept]));
            w.settle();
            // Sent before the revocation: sequenced.
            assert_eq!(w.relay(revoked, 1), Outcome::Sequenced(1));
            let answer = w.admin(1, AdminCommand::RevokeDevice(revoked));
            assert!(matches!(
                answer,
                AdminAnswer::Revoked { crl_version: 1, .. }
            ));
            let handed = w.settle();
            assert!(handed
                .iter()
                .any(|e| matches!(e, Entry::Revocations { .. })));
            let a = &w.gateways[0].0;
            assert!(a.peer_crls().revokes(DOMAINS[1], revoked));
            assert_eq!(a.peer_crls().version(DOMAINS[1]), 1);
            assert_eq!(a.stats().peer_crls.taken, 1);
            // No member list names it any more: not the home's list of b.example's members,
            // nor b.example's replica (where its cursor would have kept every message).
            let home = a.spanning.home(CONV).expect("homed at a.example");
            assert_eq!(
                home.members[DOMAINS[1]].iter().copied().collect::<Vec<_>>(),
                vec![kept]
            );
            assert_eq!(a.spanning_stats.revoked_unshared, 1);
            let b = &w.gateways[1].0;
            let replica = b.delivery.log(CONV).expect("b.example keeps a replica");
            assert!(!replica.is_member(revoked) && replica.is_member(kept));
            assert_eq!(b.delivery.stats().revoked_left, 1);
            match w.relay(revoked, 2) {
                Outcome::Refused { code, message, .. } => {
                    assert_eq!(code, ErrorCode::DeviceRevoked);
                    assert!(message.contains("revoked by b.example"), "{message}");
                }
                other => panic!("a revoked device's message was {other:?}"),
            }
            assert_eq!(w.relay(kept, 3), Outcome::Sequenced(2));
            assert_eq!(w.gateways[0].0.stats().peer_crls.relays_refused, 1);
            match w.admin(0, share(vec![kept, revoked])) {
                AdminAnswer::ShareRefused { why, .. } => {
                    assert!(why.contains("revoked by b.example"), "{why}");
                }
                other => panic!("sharing with a revoked device: {other:?}"),
            }
            // Kept across a restart of a.example.
            let (_, store) = &w.gateways[0];
            let config = w.gateways[0].0.config.clone();
            let again = Gateway::recover(config, NOW, store, Box::new(TestEntropy(99))).unwrap();
            assert!(again.peer_crls().revokes(DOMAINS[1], revoked));
        }

        /// What gateway `at` answers on `conn` to `payload`.
        fn ask(w: &mut Pair, at: usize, conn: ConnectionId, payload: Payload) -> Vec<Payload> {
            use crate::gateway::GatewayInput;
            let (g, store) = &mut w.gateways[at];
            let frame = crate::wire::Frame::new(crate::wire::Routing::default(), payload);
            g.handle(NOW, GatewayInput::Frame(conn, frame.encode()));
            crate::gateway::test_pair::frames(&drain_gateway(g, store), conn)
        }

        fn crls_in(payloads: &[Payload]) -> Vec<Crl> {
            payloads
                .iter()
                .filter_map(|p| match p {
                    Payload::Crl(c) => Some(Crl::decode(&c.crl).unwrap()),
                    _ => None,
                })
                .collect()
        }

        #[test]
        fn a_peer_crl_reaches_the_devices_here_when_taken_and_when_asked() {
            use crate::wire::payload::{CrlFetch, Heartbeat};
            let mut w = Pair::new();
            let (conn, _, _) = w.open_session_ok(0, 40, crate::ids::UserId(40));
            let beat = Payload::Heartbeat(Heartbeat {
                nonce: 1,
                crl_version: None,
                presence: None,
                peer_roots: None,
                peer_crls: None,
                contacts: None,
            });
            let digest_of = |answer: &[Payload]| {
                answer.iter().find_map(|p| match p {
                    Payload::HeartbeatAck(ack) => Some(ack.peer_crls),
                    _ => None,
                })
            };
            // Nothing revoked abroad: no digest.
            assert_eq!(digest_of(&ask(&mut w, 0, conn, beat.clone())), Some(None));
            let revoked = w.register(1, 31);
            w.admin(1, AdminCommand::RevokeDevice(revoked));
            w.settle();
            // Pushed to the open session as a.example took it.
            let pushed = crls_in(&crate::gateway::test_pair::frames(&w.released[0], conn));
            assert_eq!(pushed.len(), 1, "{pushed:?}");
            assert_eq!(pushed[0].domain, DOMAINS[1]);
            assert!(pushed[0].revoked.contains(&revoked));
            // The heartbeat answer names the versions held, so a device that missed it asks.
            let want = crate::trust::versions_digest([(DOMAINS[1], 1)]);
            assert_eq!(digest_of(&ask(&mut w, 0, conn, beat)), Some(want));
            let fetch = Payload::CrlFetch(CrlFetch {
                have_version: 0,
                peers: Some(true),
            });
            let again = crls_in(&ask(&mut w, 0, conn, fetch));
            assert_eq!(again, pushed);
        }

        #[test]
        fn a_peer_whose_heartbeat_shows_an_older_crl_gets_it_again_once_per_link() {
            let mut w = Pair::new();
            let device = w.register(1, 31);
            w.admin(1, AdminCommand::RevokeDevice(device));
            assert_eq!(w.gateways[1].0.stats().peer_crls.pushed, 1);
            // The entry is lost with a.example's data: a.example says it holds version 0.
            w.handed.extend(
                w.gateways[1]
                    .1
                    .records()
                    .filter(|(t, _, _)| *t == FEDERATION_OUTBOX_TABLE.0)
                    .map(|(_, k, _)| (1, k.to_vec()))
                    .collect::<Vec<_>>(),
            );
            // While the link that carried it stays up, it is taken to be on its way.
            w.heartbeat(1, 0);
            assert_eq!(w.gateways[1].0.stats().peer_crls.pushed, 1, "on its way");
            // a.example comes back (its data restored) and still holds version 0.
            let key = w.gateways[0].0.federation().unwrap().link_key();
            let f = w.gateways[1].0.federation.as_mut().unwrap();
            f.assume_peer_key(DOMAINS[0], key);
            w.heartbeat(1, 0);
            assert_eq!(w.gateways[1].0.stats().peer_crls.pushed, 2, "queued again");
            w.heartbeat(1, 0);
            assert_eq!(w.gateways[1].0.stats().peer_crls.pushed, 2, "once per link");
            w.settle();
            assert!(w.gateways[0].0.peer_crls().revokes(DOMAINS[1], device));
            // Holding the current version: nothing more is queued.
            w.heartbeat(1, 1);
            assert_eq!(w.gateways[1].0.stats().peer_crls.pushed, 2);
        }

        #[test]
        fn a_crl_from_a_peer_about_another_domain_is_refused_and_reported() {
            let mut w = Pair::new();
            let root = w.gateways[1].0.trust_root().key;
            let other = crate::identity::DeviceKey::from_seed([9; 32]);
            let forged = Crl::issue(&other, "b.example", 5, 0, BTreeSet::from([DeviceId(7)]));
            let (g, store) = &mut w.gateways[0];
            g.handle_entry(
                NOW,
                DOMAINS[1],
                Entry::Revocations {
                    root,
                    crl: forged.encode().into(),
                },
            );
            let out = drain_gateway(g, store);
            assert!(out.iter().any(|o| matches!(
                o,
                GatewayOutput::PeerCrl(PeerCrlEvent {
                    outcome: PeerCrlTaken::Refused(_),
                    ..
                })
            )));
            assert!(!g.peer_crls().revokes(DOMAINS[1], DeviceId(7)));
        }
    }

    #[test]
    fn a_damaged_row_is_reported_not_skipped() {
        let mut store = MemStore::default();
        let mut writes = WriteBatch::default();
        writes.put(PEER_CRLS_TABLE, b"b.example".to_vec(), b"garbage".to_vec());
        store.commit(writes).unwrap();
        assert!(matches!(
            PeerCrls::recover(&store),
            Err(StoreError::Damaged(_))
        ));
    }
}
