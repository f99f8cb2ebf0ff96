//! Revocation in the simulator: the `revoke` action, the safety invariant
//! `revoked-never-authenticates`, the liveness invariant `crl-converge`, and the propagation
//! figures a run reports.
//!
//! - `revoke DEVICE` asks the device's home gateway to revoke it (`GatewayInput::RevokeDevice`),
//!   if that gateway is up; a revocation counts from the moment the gateway made its new CRL.
//! - `revoked-never-authenticates` fails if a gateway sends `HelloOk` to a device it has
//!   revoked (checked on every frame a gateway releases).
//! - `crl-converge` (liveness, with `converge`): every device that is not revoked holds its
//!   gateway's current CRL, every gateway holds the current CRL of each domain it federates
//!   with (pushed over the link, repaired through heartbeats), and no MLS group at any gateway
//!   still lists a revoked device. Revoked devices are left out of the other convergence
//!   checks: they will never read again.
//! - A gateway that refuses a peer's CRL is noted in the trace and counted as the fault
//!   `peer-crl-refused` (every root in a simulated world is pinned right, so it never should).

use std::collections::BTreeMap;

use sund_model::gateway::peer_crls::{PeerCrlEvent, PeerCrlTaken};
use sund_model::gateway::{AdminAnswer, AdminCommand, GatewayInput};
use sund_model::ids::DeviceId;
use sund_model::trust::handshake::{Initiator, Responder};
use sund_model::wire::Opcode;

use super::{Machine, World};
use crate::network::ActorIndex;
use crate::rng::SimRng;
use crate::scenario::{Invariant, Target};

/// How far revocations got, for the run report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CrlReport {
    /// Devices revoked.
    pub revoked: u64,
    /// The newest CRL version any gateway issued.
    pub version: u64,
    /// Devices (not revoked) holding their own gateway's newest version at the end.
    pub holders: u64,
    /// Devices not revoked whose gateway revoked a device.
    pub devices: u64,
    /// From its gateway's last revocation to the last device taking that CRL, microseconds
    /// (`None` if some device never took it).
    pub slowest_us: Option<u64>,
    /// Half of the devices that took the newest CRL had it within this, microseconds.
    pub median_us: u64,
    /// 99 % of them had it within this, microseconds.
    pub p99_us: u64,
    /// Device-to-device handshakes from revoked devices refused by a CRL (each device that takes
    /// a CRL is tried by every revoked device at once).
    pub handshakes_refused: u64,
    /// Federated gateways that should hold a peer domain's CRL, counted per (gateway, peer
    /// domain that revoked a device).
    pub peer_links: u64,
    /// Of those, how many hold its newest version at the end.
    pub peer_holding: u64,
    /// From a domain's last revocation to the last peer gateway taking its CRL, microseconds
    /// (`None` if some peer never took it).
    pub peer_slowest_us: Option<u64>,
}

/// What the world remembers of revocations.
#[derive(Debug, Default)]
pub(super) struct Revocations {
    /// Revoked devices and when their gateway's revocation became durable.
    revoked: BTreeMap<DeviceId, u64>,
    /// The next admin request id.
    next_request: u64,
    /// When the newest CRL version was issued.
    latest: Option<(u64, u64)>,
    /// Per device: the newest CRL version it took, and when.
    held: BTreeMap<ActorIndex, (u64, u64)>,
    /// Device-to-device handshakes tried by revoked devices.
    handshakes: u64,
    /// Those refused because the responder's CRL lists the initiator.
    refused: u64,
    /// Per gateway that revoked: its newest CRL version and when it issued it.
    issued: BTreeMap<ActorIndex, (u64, u64)>,
    /// Per (gateway, peer domain): the newest version of the peer's CRL it took, and when.
    peer_taken: BTreeMap<(ActorIndex, String), (u64, u64)>,
}

impl World {
    /// The `revoke` action.
    pub(super) fn revoke_action(&mut self, target: &Target) {
        for x in self.resolve(target) {
            let device = self.actors[x as usize].device;
            let home = self.actors[x as usize].home;
            self.revocations.next_request += 1;
            let request = self.revocations.next_request;
            self.with_gateway(home, |g, now| {
                let command = AdminCommand::RevokeDevice(device);
                g.handle(now, GatewayInput::Admin { request, command })
            });
        }
    }

    /// A gateway answered an admin request. A revocation counts from its answer, which the
    /// gateway releases only once the revocation is durable (as the operator's `revoke`
    /// command returns only then); a gateway that crashes before never answers, and the
    /// device was never revoked. A device that never registered cannot be revoked.
    pub(super) fn on_admin_answer(&mut self, gateway: ActorIndex, answer: &AdminAnswer) {
        if let AdminAnswer::HandoverRefused { why, .. } = answer {
            self.handover_refused(why);
        }
        if let AdminAnswer::Revoked {
            device,
            crl_version,
            already: false,
        } = *answer
        {
            self.revocations.revoked.insert(device, self.now);
            self.revocations
                .issued
                .insert(gateway, (crl_version, self.now));
            if self.revocations.latest.is_none_or(|(v, _)| v < crl_version) {
                self.revocations.latest = Some((crl_version, self.now));
            }
        }
    }

    /// A gateway took or refused a peer domain's CRL.
    pub(super) fn on_peer_crl(&mut self, gateway: ActorIndex, event: &PeerCrlEvent) {
        match &event.outcome {
            PeerCrlTaken::Taken { version, .. } => {
                self.revocations
                    .peer_taken
                    .insert((gateway, event.peer.clone()), (*version, self.now));
            }
            PeerCrlTaken::Refused(why) => {
                *self.faults.entry("peer-crl-refused").or_default() += 1;
                let (peer, why) = (event.peer.clone(), why.clone());
                self.note(|w| {
                    format!(
                        "{} refused {peer}'s CRL: {why}",
                        w.actors[gateway as usize].name
                    )
                });
            }
            PeerCrlTaken::Stale { .. } => {}
        }
    }

    /// Each federated gateway with the peer domains whose CRL it should hold: (gateway, peer
    /// gateway, peer domain), in the order the scenario federates them.
    fn peer_crl_pairs(&self) -> Vec<(ActorIndex, ActorIndex, String)> {
        let named = |name: &str| {
            self.gateways
                .iter()
                .copied()
                .find(|&g| self.actors[g as usize].name == name)
        };
        let mut pairs = Vec::new();
        for (a, b) in &self.scenario.federations {
            let (Some(a), Some(b)) = (named(a), named(b)) else {
                continue;
            };
            for (gateway, peer) in [(a, b), (b, a)] {
                if let Some(domain) = self.federation.domain(peer) {
                    pairs.push((gateway, peer, domain));
                }
            }
        }
        pairs
    }

    fn crl_version_at(&self, gateway: ActorIndex) -> u64 {
        match &self.actors[gateway as usize].machine {
            Machine::Gateway(Some(g), _) => g.registration_authority().crl().version,
            _ => 0,
        }
    }

    /// True if `a`'s device was revoked.
    pub(super) fn is_revoked(&self, a: ActorIndex) -> bool {
        self.revocations
            .revoked
            .contains_key(&self.actors[a as usize].device)
    }

    /// A device took CRL `version`: from now on it must refuse a device-to-device handshake
    /// from every device that CRL revokes. Each revoked device tries one at once (in memory,
    /// with both nodes' real trust state); one that succeeds breaks
    /// `revoked-never-authenticates`.
    pub(super) fn on_crl_taken(&mut self, a: ActorIndex, version: u64) {
        self.revocations.held.insert(a, (version, self.now));
        let revoked: Vec<ActorIndex> = self
            .devices
            .iter()
            .copied()
            .filter(|&d| d != a && self.is_revoked(d))
            .collect();
        for d in revoked {
            self.revocations.handshakes += 1;
            let mut rng = SimRng::from_seed(self.seed).with_stream(self.revocations.handshakes);
            let (Some(initiator), Some(responder)) = (self.node(d), self.node(a)) else {
                continue;
            };
            let (Some(me), Some(them)) = (initiator.peer_identity(), responder.peer_identity())
            else {
                continue;
            };
            let listed = them
                .crl
                .is_some_and(|crl| crl.revoked.contains(&self.actors[d as usize].device));
            let (_, hello) = Initiator::start(&me, &mut rng);
            let accepted = Responder::respond(&them, self.local_now(a), &hello, &mut rng).is_ok();
            if listed && !accepted {
                self.revocations.refused += 1;
            }
            if listed && accepted {
                let detail = format!(
                    "{} accepted a handshake from {}, which its CRL version {version} revokes",
                    self.actors[a as usize].name, self.actors[d as usize].name
                );
                self.checker
                    .fail_safety(Invariant::RevokedNeverAuthenticates, self.now, detail);
            }
        }
    }

    /// Checks a frame a gateway releases on `conn`: a `HelloOk` to a revoked device breaks
    /// `revoked-never-authenticates`.
    pub(super) fn check_released_frame(&mut self, gateway: ActorIndex, conn: u64, frame: &[u8]) {
        if self.revocations.revoked.is_empty() || frame.len() < 8 {
            return;
        }
        if u16::from_be_bytes([frame[6], frame[7]]) != Opcode::HelloOk.to_u16() {
            return;
        }
        let Some(peer) = self.network.peer_of(conn, gateway) else {
            return;
        };
        let device = self.actors[peer as usize].device;
        if let Some(&at) = self.revocations.revoked.get(&device) {
            let who = self.actors[peer as usize].name.clone();
            self.checker.fail_safety(
                Invariant::RevokedNeverAuthenticates,
                self.now,
                format!(
                    "{who} completed a session at {} although its gateway revoked it at {at} µs",
                    self.actors[gateway as usize].name
                ),
            );
        }
    }

    /// Why revocations have not converged: a device without its gateway's CRL, or a group that
    /// still lists a revoked device.
    pub(super) fn crl_not_converged(&self) -> Option<String> {
        if !self.scenario.invariants.contains(&Invariant::CrlConverge) {
            return None;
        }
        for &d in &self.devices {
            if self.is_revoked(d) {
                continue;
            }
            let actor = &self.actors[d as usize];
            let want = self.crl_version_at(actor.home);
            let Some(node) = self.node(d) else {
                return Some(format!("{} is down", actor.name));
            };
            let have = node.trust().crl_version();
            if have != want {
                return Some(format!(
                    "{} holds CRL version {have}, its gateway is at {want}",
                    actor.name
                ));
            }
        }
        // Every device holds each peer domain's CRL its gateway federates with (pushed when
        // the gateway took it, or asked for when a heartbeat's digest differed).
        for &d in &self.devices {
            if self.is_revoked(d) {
                continue;
            }
            let actor = &self.actors[d as usize];
            for (_, peer, domain) in self
                .peer_crl_pairs()
                .into_iter()
                .filter(|(g, _, _)| *g == actor.home)
            {
                let want = self.crl_version_at(peer);
                if want == 0 {
                    continue;
                }
                let Some(node) = self.node(d) else {
                    return Some(format!("{} is down", actor.name));
                };
                let have = node.trust().peer_crl(&domain).map_or(0, |c| c.version);
                if have != want {
                    return Some(format!(
                        "{} holds {domain}'s CRL version {have}, {domain} is at {want}",
                        actor.name
                    ));
                }
            }
        }
        for (gateway, peer, domain) in self.peer_crl_pairs() {
            let want = self.crl_version_at(peer);
            if want == 0 {
                continue; // nothing revoked there
            }
            let name = &self.actors[gateway as usize].name;
            let Machine::Gateway(Some(g), _) = &self.actors[gateway as usize].machine else {
                return Some(format!("{name} is down"));
            };
            let have = g.peer_crls().version(&domain);
            if have != want {
                return Some(format!(
                    "{name} holds {domain}'s CRL version {have}, {domain} is at {want}"
                ));
            }
        }
        for c in &self.conversations {
            let Machine::Gateway(Some(g), _) = &self.actors[c.gateway as usize].machine else {
                continue;
            };
            if let Some(group) = g.group(c.id) {
                // A group whose last device able to commit left or was revoked is over: the
                // gateway removed every device with it, so none is listed here either.
                if let Some(device) = group
                    .devices()
                    .keys()
                    .find(|d| self.revocations.revoked.contains_key(d))
                {
                    return Some(format!("{} still lists revoked device {device}", c.id));
                }
            }
        }
        None
    }

    /// The revocation figures of this run.
    pub(super) fn crl_report(&self) -> Option<CrlReport> {
        let (version, _) = self.revocations.latest?;
        let mut report = CrlReport {
            revoked: self.revocations.revoked.len() as u64,
            version,
            handshakes_refused: self.revocations.refused,
            ..CrlReport::default()
        };
        let mut delays = Vec::new();
        for &d in &self.devices {
            if self.is_revoked(d) {
                continue;
            }
            // Each device holds its own gateway's CRL: counted where that gateway revoked.
            let home = self.actors[d as usize].home;
            let Some(&(want, issued_at)) = self.revocations.issued.get(&home) else {
                continue;
            };
            report.devices += 1;
            if let Some(&(v, at)) = self.revocations.held.get(&d) {
                if v >= want {
                    report.holders += 1;
                    delays.push(at.saturating_sub(issued_at));
                }
            }
        }
        delays.sort_unstable();
        let at = |q: f64| {
            let i = ((delays.len() as f64 * q).ceil() as usize).saturating_sub(1);
            delays.get(i).copied().unwrap_or(0)
        };
        report.median_us = at(0.5);
        report.p99_us = at(0.99);
        report.slowest_us = (report.holders == report.devices).then(|| at(1.0));
        let mut slowest = 0;
        for (gateway, peer, domain) in self.peer_crl_pairs() {
            let Some(&(version, issued_at)) = self.revocations.issued.get(&peer) else {
                continue;
            };
            report.peer_links += 1;
            if let Some(&(v, at)) = self.revocations.peer_taken.get(&(gateway, domain)) {
                if v >= version {
                    report.peer_holding += 1;
                    slowest = slowest.max(at.saturating_sub(issued_at));
                }
            }
        }
        report.peer_slowest_us = (report.peer_holding == report.peer_links).then_some(slowest);
        Some(report)
    }
}
