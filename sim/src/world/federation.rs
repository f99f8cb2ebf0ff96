//! Federation links between simulated gateways (issue 15, the link layer) and the
//! `federation-links` invariant.
//!
//! - `federate A B` gives both gateways a domain of their own (`a.example` from the name) and
//!   makes each a configured peer of the other, pinning the other's trust root by fingerprint
//!   (the world learns each root before the run by starting the gateway once on a scratch
//!   disk from the same entropy: the root is the first thing a new gateway draws).
//! - The links are ordinary simulated connections: the dialing gateway's `Connect` opens one
//!   through the network model (its latency, loss, duplication, reordering, partitions and
//!   holds apply), the other gateway accepts it, and crashes close it.
//! - `relay A to B` queues one entry for B at A (`Gateway::federation_enqueue`), its body a
//!   text naming the pair and a counter.
//!
//! **Checked** (`federation-links`): every entry a gateway hands on as received from a peer
//! carries the next number after the last one it handed on from that peer (none skipped, none
//! twice, across crashes of either side), and the body queued under that number at the
//! sender (a number is queued again only if its first entry was lost in a crash before its
//! write was durable, which is also before it could be sent). After heal, every link is up and
//! every outbox is empty: each entry queued durably was taken by its peer.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use sund_model::federation::entry::ENTRY_VERSION;
use sund_model::federation::handshake::PeerConfig;
use sund_model::federation::{FederationInput, FederationOutput};
use sund_model::gateway::{Gateway, GatewayConfig, GatewayInput, SpanningStats};
use sund_model::ids::ConnectionId;
use sund_model::time::Instant;

use super::{EventKind, Machine, World};
use crate::disk::SimDisk;
use crate::network::ActorIndex;
use crate::scenario::{Invariant, Scenario};
use crate::trace::Record;

/// What the world knows of its federation links.
#[derive(Debug, Default)]
pub(super) struct FederationWatch {
    /// Connections between two gateways.
    conns: BTreeSet<u64>,
    /// Each federated gateway's domain, and back.
    domain_of: BTreeMap<ActorIndex, String>,
    gateway_of: BTreeMap<String, ActorIndex>,
    /// Per (sender, receiver): the body queued under each number, as last queued.
    queued: BTreeMap<(ActorIndex, ActorIndex), BTreeMap<u64, Bytes>>,
    /// Per (sender, receiver): the last number the receiver handed on.
    received: BTreeMap<(ActorIndex, ActorIndex), u64>,
    /// Per (sender, receiver): the body handed on under each number.
    taken: BTreeMap<(ActorIndex, ActorIndex), BTreeMap<u64, Bytes>>,
    /// Entries queued by `relay` actions so far (the counter in their bodies).
    relayed: u64,
}

/// The domain a federated gateway gets from its name: lower case, anything but letters and
/// digits as `-`, then `.example`.
fn domain_for(name: &str) -> String {
    let label: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    format!("{label}.example")
}

/// The domain of the gateway named `gateway`: its own if it federates, else the default one
/// (`localhost`, as a gateway whose operator named none).
pub fn domain_of(scenario: &Scenario, gateway: &str) -> String {
    let federated = scenario
        .federations
        .iter()
        .any(|(a, b)| a == gateway || b == gateway);
    if federated {
        domain_for(gateway)
    } else {
        sund_model::address::DEFAULT_DOMAIN.to_string()
    }
}

/// The id of the scenario's user `name` (`name@` its home gateway's domain; the default
/// domain for a name the scenario does not declare).
pub(super) fn user_id(scenario: &Scenario, name: &str) -> sund_model::ids::UserId {
    let domain = scenario
        .users
        .iter()
        .find(|u| u.name == name)
        .map_or(sund_model::address::DEFAULT_DOMAIN.to_string(), |u| {
            domain_of(scenario, &u.gateway)
        });
    sund_model::ids::UserId::of(name, &domain)
}

/// Gives the gateways of `scenario.federations` their domains and peers. `gateways` maps each
/// gateway's name to its actor, its configuration and the entropy of its first start.
pub(super) fn configure(
    scenario: &Scenario,
    gateways: &mut [(String, ActorIndex, &mut GatewayConfig, crate::rng::SimRng)],
) -> FederationWatch {
    let mut watch = FederationWatch::default();
    if scenario.federations.is_empty() {
        return watch;
    }
    let federated: BTreeSet<&String> = scenario
        .federations
        .iter()
        .flat_map(|(a, b)| [a, b])
        .collect();
    // Each federated gateway's domain, and its root's fingerprint from a scratch start.
    let mut peers: BTreeMap<String, PeerConfig> = BTreeMap::new();
    for (name, index, config, entropy) in gateways.iter_mut() {
        if !federated.contains(name) {
            continue;
        }
        let domain = domain_for(name);
        config.domain = domain.clone();
        let scratch = Gateway::recover(
            (**config).clone(),
            Instant(0),
            &SimDisk::default(),
            Box::new(entropy.clone()),
        )
        .expect("a scratch disk reads");
        peers.insert(
            name.clone(),
            PeerConfig {
                domain: domain.clone(),
                root_fingerprint: scratch.trust_root().fingerprint(),
            },
        );
        watch.domain_of.insert(*index, domain.clone());
        watch.gateway_of.insert(domain, *index);
    }
    for (name, _, config, _) in gateways.iter_mut() {
        for (a, b) in &scenario.federations {
            let other = if a == name {
                b
            } else if b == name {
                a
            } else {
                continue;
            };
            config.federation_peers.push(peers[other].clone());
        }
    }
    watch
}

impl FederationWatch {
    /// The federated gateway of a domain.
    pub(super) fn gateway_of(&self, domain: &str) -> Option<ActorIndex> {
        self.gateway_of.get(domain).copied()
    }

    /// The domain of a federated gateway.
    pub(super) fn domain(&self, gateway: ActorIndex) -> Option<String> {
        self.domain_of.get(&gateway).cloned()
    }
}

impl World {
    /// The conversations spanning domains, summed over the gateways up at the end (each
    /// counts from its last start); `None` if nothing was relayed or fanned out.
    pub(super) fn spanning_report(&self) -> Option<SpanningStats> {
        let mut sum = SpanningStats::default();
        for &g in &self.gateways {
            if let Machine::Gateway(Some(g), _) = &self.actors[g as usize].machine {
                let s = g.stats().spanning;
                sum.relayed += s.relayed;
                sum.relays_taken += s.relays_taken;
                sum.relays_refused += s.relays_refused;
                sum.relays_limited += s.relays_limited;
                sum.fanned_out += s.fanned_out;
                sum.commits_relayed += s.commits_relayed;
                sum.welcomes_sent += s.welcomes_sent;
                sum.removals_sent += s.removals_sent;
                sum.answers_passed += s.answers_passed;
                sum.entries_malformed += s.entries_malformed;
                sum.entries_refused += s.entries_refused;
            }
        }
        (sum.relayed + sum.fanned_out > 0).then_some(sum)
    }

    /// True if `conn` links two gateways.
    pub(super) fn is_federation_conn(&self, conn: u64) -> bool {
        self.federation.conns.contains(&conn)
    }

    /// A federation output of `gateway`.
    pub(super) fn federation_output(&mut self, gateway: ActorIndex, output: FederationOutput) {
        match output {
            FederationOutput::Connect { peer } => {
                let Some(&target) = self.federation.gateway_of.get(&peer) else {
                    return;
                };
                let target_up = self.actors[target as usize].up;
                let incarnation = self.actors[gateway as usize].incarnation;
                match self.network.connect(self.now, gateway, target, target_up) {
                    Ok((conn, accept_at, connected_at)) => {
                        self.federation.conns.insert(conn);
                        self.push(
                            accept_at,
                            EventKind::LinkAccept {
                                gateway: target,
                                conn,
                            },
                        );
                        self.push(
                            connected_at,
                            EventKind::LinkConnectDone {
                                gateway,
                                incarnation,
                                peer: target,
                                conn: Some(conn),
                            },
                        );
                    }
                    Err(fail_at) => self.push(
                        fail_at,
                        EventKind::LinkConnectDone {
                            gateway,
                            incarnation,
                            peer: target,
                            conn: None,
                        },
                    ),
                }
            }
            FederationOutput::Send(conn, frame) => self.transmit(gateway, conn.0, frame),
            FederationOutput::Close(conn) => self.close(gateway, conn.0),
            FederationOutput::Received { peer, seq, body } => {
                let Some(&from) = self.federation.gateway_of.get(&peer) else {
                    return;
                };
                self.link_received(from, gateway, seq, &body);
            }
            FederationOutput::LinkUp { .. } => {
                *self.faults.entry("link-up").or_default() += 1;
            }
            FederationOutput::LinkDown { peer, reason, .. } => {
                *self.faults.entry("link-down").or_default() += 1;
                self.note(|w| {
                    format!(
                        "{}'s link to {peer} went down: {reason}",
                        w.actors[gateway as usize].name
                    )
                });
            }
            FederationOutput::Refused { reason, .. } => {
                *self.faults.entry("link-refused").or_default() += 1;
                self.note(|w| {
                    format!(
                        "{} refused a link: {reason}",
                        w.actors[gateway as usize].name
                    )
                });
            }
            FederationOutput::HistoryBehind { peer, peer_cursor } => {
                *self.faults.entry("link-history-behind").or_default() += 1;
                self.note(|w| {
                    format!(
                        "{}: {peer} had taken entries up to {peer_cursor}, past this gateway's last",
                        w.actors[gateway as usize].name
                    )
                });
            }
        }
    }

    fn link_received(&mut self, from: ActorIndex, to: ActorIndex, seq: u64, body: &[u8]) {
        *self.faults.entry("link-entries").or_default() += 1;
        if !self
            .scenario
            .invariants
            .contains(&Invariant::FederationLinks)
        {
            return;
        }
        self.federation
            .taken
            .entry((from, to))
            .or_default()
            .insert(seq, Bytes::copy_from_slice(body));
        let last = self.federation.received.entry((from, to)).or_default();
        let expected = *last + 1;
        *last = seq;
        let queued = self
            .federation
            .queued
            .get(&(from, to))
            .and_then(|q| q.get(&seq))
            .cloned();
        let names = |w: &World| {
            (
                w.actors[from as usize].name.clone(),
                w.actors[to as usize].name.clone(),
            )
        };
        let detail = if seq != expected {
            let (f, t) = names(self);
            Some(format!(
                "{t} handed on entry {seq} from {f}, but the next was {expected} (an entry skipped or taken twice)"
            ))
        } else if queued.is_none() && body.first() == Some(&ENTRY_VERSION) {
            // An entry the gateway queued itself (a conversation spanning domains): its
            // number is checked, its body is the spanning invariants' business.
            None
        } else if queued.as_deref() != Some(body) {
            let (f, t) = names(self);
            Some(format!(
                "{t} handed on entry {seq} from {f} with a body {f} did not queue under that number"
            ))
        } else {
            None
        };
        if let Some(detail) = detail {
            self.checker
                .fail_safety(Invariant::FederationLinks, self.now, detail);
        }
    }

    /// `relay FROM to TO`: one entry queued at `from` for `to`.
    pub(super) fn relay(&mut self, from: ActorIndex, to: ActorIndex) {
        let Some(domain) = self.federation.domain_of.get(&to).cloned() else {
            return;
        };
        self.federation.relayed += 1;
        let body = Bytes::from(format!(
            "{} -> {} #{}",
            self.actors[from as usize].name, self.actors[to as usize].name, self.federation.relayed
        ));
        let mut queued = None;
        let entry = body.clone();
        self.with_gateway(from, |g, now| {
            queued = g.federation_enqueue(now, &domain, entry).ok();
        });
        if let Some(seq) = queued {
            self.federation
                .queued
                .entry((from, to))
                .or_default()
                .insert(seq, body);
        }
    }

    /// `gateway` (re)started: entries it had queued whose writes did not become durable are
    /// gone with the crash (their numbers will be given again), so nobody is owed them.
    pub(super) fn federation_restarted(&mut self, gateway: ActorIndex) {
        let Machine::Gateway(Some(g), _) = &self.actors[gateway as usize].machine else {
            return;
        };
        let Some(federation) = g.federation() else {
            return;
        };
        for (&(from, to), queued) in self.federation.queued.iter_mut() {
            if from != gateway {
                continue;
            }
            let Some(domain) = self.federation.domain_of.get(&to) else {
                continue;
            };
            let durable = federation.numbered(domain);
            queued.retain(|&seq, _| seq <= durable);
        }
    }

    /// Once converged: an entry queued durably whose number the peer took with another body
    /// was lost (the peer will never take that number again).
    pub(super) fn federation_lost(&self) -> Option<String> {
        if !self
            .scenario
            .invariants
            .contains(&Invariant::FederationLinks)
        {
            return None;
        }
        for (&(from, to), queued) in &self.federation.queued {
            let taken = self.federation.taken.get(&(from, to));
            for (seq, body) in queued {
                if taken.and_then(|t| t.get(seq)) != Some(body) {
                    return Some(format!(
                        "entry {seq} that {} queued for {} (`{}`) never reached it: the peer took {} under that number",
                        self.actors[from as usize].name,
                        self.actors[to as usize].name,
                        String::from_utf8_lossy(body),
                        match taken.and_then(|t| t.get(seq)) {
                            Some(other) => format!("`{}`", String::from_utf8_lossy(other)),
                            None => "nothing".to_string(),
                        }
                    ));
                }
            }
        }
        None
    }

    /// A dial of `gateway` to `peer` finished (`conn` open) or failed.
    pub(super) fn link_connect_done(
        &mut self,
        gateway: ActorIndex,
        incarnation: u32,
        peer: ActorIndex,
        conn: Option<u64>,
    ) {
        let actor = &self.actors[gateway as usize];
        if !actor.up || actor.incarnation != incarnation {
            return;
        }
        let Some(domain) = self.federation.domain_of.get(&peer).cloned() else {
            return;
        };
        self.trace.record(
            Record::Connection,
            self.now,
            gateway,
            &conn.unwrap_or(0).to_le_bytes(),
        );
        let input = match conn {
            Some(c) if self.network.is_open(c) => FederationInput::Connected {
                peer: domain,
                conn: ConnectionId(c),
                binding: channel_binding(c),
            },
            _ => FederationInput::ConnectFailed { peer: domain },
        };
        self.with_gateway(gateway, |g, now| {
            g.handle(now, GatewayInput::Federation(input));
        });
    }

    /// A gateway accepts a link connection from a peer gateway.
    ///
    /// (The connection's channel binding is [`channel_binding`] of its id at both ends.)
    pub(super) fn link_accept(&mut self, gateway: ActorIndex, conn: u64) {
        if !self.actors[gateway as usize].up || !self.network.is_open(conn) {
            return;
        }
        self.trace
            .record(Record::Connection, self.now, gateway, &conn.to_le_bytes());
        self.note(|w| {
            format!(
                "{} accepts link conn {conn}",
                w.actors[gateway as usize].name
            )
        });
        self.with_gateway(gateway, |g, now| {
            g.handle(
                now,
                GatewayInput::Federation(FederationInput::Accepted(
                    ConnectionId(conn),
                    channel_binding(conn),
                )),
            );
        });
    }

    /// After heal: why a link is not up or an outbox not empty.
    pub(super) fn federation_not_converged(&self) -> Option<String> {
        if !self
            .scenario
            .invariants
            .contains(&Invariant::FederationLinks)
        {
            return None;
        }
        let gateway_named = |name: &str| {
            self.federation
                .domain_of
                .keys()
                .copied()
                .find(|&g| self.actors[g as usize].name == name)
        };
        for (a, b) in &self.scenario.federations {
            let (Some(a), Some(b)) = (gateway_named(a), gateway_named(b)) else {
                continue;
            };
            for (gateway, peer) in [(a, b), (b, a)] {
                let name = &self.actors[gateway as usize].name;
                let Machine::Gateway(Some(g), _) = &self.actors[gateway as usize].machine else {
                    return Some(format!("{name} is down"));
                };
                let Some(federation) = g.federation() else {
                    continue;
                };
                let domain = &self.federation.domain_of[&peer];
                if !federation.is_up(domain) {
                    return Some(format!("{name}'s link to {domain} is not up"));
                }
                let queued = federation.queued(domain);
                if queued > 0 {
                    return Some(format!(
                        "{name} still has {queued} entries queued for {domain}"
                    ));
                }
            }
        }
        None
    }
}

/// A simulated link connection's channel binding: the same at both ends and unique to the
/// connection, as a TLS exporter is (the simulator has no host in between to model).
fn channel_binding(conn: u64) -> sund_model::federation::handshake::ChannelBinding {
    let mut binding = [0u8; 32];
    for part in binding.chunks_mut(8) {
        part.copy_from_slice(&conn.to_le_bytes());
    }
    binding
}
