//! The simulated network: connections between nodes and gateways carrying whole frames.
//!
//! Fidelity: each frame is one unit (as a QUIC stream frame carrying a Sund frame would be).
//! Per link: latency uniform in `latency_min..=latency_max`, loss, duplication and reordering
//! probabilities. Without reordering a connection is FIFO per direction. This is harsher than
//! QUIC, which retransmits inside a connection: here a lost frame is gone and the protocol must
//! recover it (resend, redelivery, replay). Partitions (`partition`/`heal`) drop frames on a cut
//! pair, also frames already in flight; `hold`/`release` queue them instead. A connection attempt
//! across a cut or to a crashed gateway fails after `connect_timeout`. `block` cuts one direction
//! only (frames from A to B are dropped, B to A flow; a connection needs both). A link may have
//! a bandwidth: its frames then leave one after another, each taking its size over the rate,
//! before their latency (a queue per direction, without limit or loss). Not modelled:
//! congestion control, MTU, the QUIC handshake's own packets.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use crate::rng::SimRng;

/// An actor's index in the world; gateways and nodes share the numbering.
pub type ActorIndex = u32;

/// Latency and fault probabilities of a link.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkProfile {
    /// Fastest one-way latency, microseconds.
    pub latency_us_min: u64,
    /// Slowest one-way latency, microseconds.
    pub latency_us_max: u64,
    /// Probability a frame is lost.
    pub loss: f64,
    /// Probability a frame is delivered twice.
    pub duplicate: f64,
    /// Probability a frame may overtake earlier ones.
    pub reorder: f64,
    /// Bits per second a direction of the link carries; 0: no limit.
    pub bandwidth_bps: u64,
}

impl Default for LinkProfile {
    fn default() -> Self {
        LinkProfile {
            latency_us_min: 1_000,
            latency_us_max: 5_000,
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            bandwidth_bps: 0,
        }
    }
}

/// A frame on its way.
#[derive(Clone, Debug)]
pub struct Arrival {
    /// Connection it travels on.
    pub conn: u64,
    /// Receiving actor.
    pub to: ActorIndex,
    /// The encoded frame.
    pub frame: Bytes,
}

/// Counters the kernel tests and the run report read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames handed to the network.
    pub sent: u64,
    /// Frames lost to the loss probability.
    pub lost: u64,
    /// Frames dropped by a partition.
    pub cut: u64,
    /// Extra copies made.
    pub duplicated: u64,
    /// Frames allowed to overtake.
    pub reordered: u64,
    /// Frames queued by `hold`.
    pub held: u64,
    /// Connections opened.
    pub connections: u64,
}

#[derive(Clone, Debug)]
struct Conn {
    node: ActorIndex,
    gateway: ActorIndex,
    open: bool,
    /// Latest scheduled arrival per direction (0: to gateway, 1: to node), for FIFO order.
    last_arrival_us: [u64; 2],
}

/// The network of one run.
#[derive(Debug)]
pub struct Network {
    rng: SimRng,
    default_profile: LinkProfile,
    pair_profiles: BTreeMap<(ActorIndex, ActorIndex), LinkProfile>,
    cut: BTreeSet<(ActorIndex, ActorIndex)>,
    /// One-way cuts: frames from the first to the second are dropped.
    blocked: BTreeSet<(ActorIndex, ActorIndex)>,
    /// Per direction of a link with a bandwidth: when its last queued frame has left.
    busy_until_us: BTreeMap<(ActorIndex, ActorIndex), u64>,
    isolated: BTreeSet<ActorIndex>,
    holding: BTreeSet<(ActorIndex, ActorIndex)>,
    held: BTreeMap<(ActorIndex, ActorIndex), Vec<Arrival>>,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    /// How long a connection attempt takes to fail.
    pub connect_timeout_us: u64,
    stats: NetStats,
}

fn pair(a: ActorIndex, b: ActorIndex) -> (ActorIndex, ActorIndex) {
    (a.min(b), a.max(b))
}

impl Network {
    /// A network drawing from `rng` with `profile` on every link.
    pub fn new(rng: SimRng, profile: LinkProfile) -> Network {
        Network {
            rng,
            default_profile: profile,
            pair_profiles: BTreeMap::new(),
            cut: BTreeSet::new(),
            blocked: BTreeSet::new(),
            busy_until_us: BTreeMap::new(),
            isolated: BTreeSet::new(),
            holding: BTreeSet::new(),
            held: BTreeMap::new(),
            conns: BTreeMap::new(),
            next_conn: 1,
            connect_timeout_us: 1_000_000,
            stats: NetStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> &NetStats {
        &self.stats
    }

    /// The profile in force on every link without an override.
    pub fn default_profile(&self) -> LinkProfile {
        self.default_profile
    }

    /// Replaces the default profile.
    pub fn set_default_profile(&mut self, profile: LinkProfile) {
        self.default_profile = profile;
    }

    /// Sets the profile of one pair.
    pub fn set_pair_profile(&mut self, a: ActorIndex, b: ActorIndex, profile: LinkProfile) {
        self.pair_profiles.insert(pair(a, b), profile);
    }

    /// The profile of a pair.
    pub fn profile(&self, a: ActorIndex, b: ActorIndex) -> LinkProfile {
        self.pair_profiles
            .get(&pair(a, b))
            .copied()
            .unwrap_or(self.default_profile)
    }

    /// Cuts a pair: frames between them are dropped until `heal`.
    pub fn partition(&mut self, a: ActorIndex, b: ActorIndex) {
        self.cut.insert(pair(a, b));
    }

    /// Restores a cut pair.
    pub fn heal(&mut self, a: ActorIndex, b: ActorIndex) {
        self.cut.remove(&pair(a, b));
    }

    /// Cuts one direction: frames from `from` to `to` are dropped until `unblock`.
    pub fn block(&mut self, from: ActorIndex, to: ActorIndex) {
        self.blocked.insert((from, to));
    }

    /// Restores a blocked direction.
    pub fn unblock(&mut self, from: ActorIndex, to: ActorIndex) {
        self.blocked.remove(&(from, to));
    }

    /// Cuts an actor from everyone.
    pub fn isolate(&mut self, a: ActorIndex) {
        self.isolated.insert(a);
    }

    /// Undoes `isolate`.
    pub fn rejoin(&mut self, a: ActorIndex) {
        self.isolated.remove(&a);
    }

    /// Heals every cut and restores every link profile to the default with no faults.
    pub fn heal_all(&mut self) {
        self.cut.clear();
        self.blocked.clear();
        self.isolated.clear();
        self.pair_profiles.clear();
        self.default_profile.loss = 0.0;
        self.default_profile.duplicate = 0.0;
        self.default_profile.reorder = 0.0;
    }

    /// True if frames between `a` and `b` are dropped in either direction (no connection can
    /// open across it).
    pub fn is_cut(&self, a: ActorIndex, b: ActorIndex) -> bool {
        self.drops(a, b) || self.drops(b, a)
    }

    /// True if frames from `from` to `to` are dropped.
    pub fn drops(&self, from: ActorIndex, to: ActorIndex) -> bool {
        self.isolated.contains(&from)
            || self.isolated.contains(&to)
            || self.cut.contains(&pair(from, to))
            || self.blocked.contains(&(from, to))
    }

    /// Queues frames between a pair until `release`.
    pub fn hold(&mut self, a: ActorIndex, b: ActorIndex) {
        self.holding.insert(pair(a, b));
    }

    /// Sends everything held between a pair, with fresh latencies.
    pub fn release(&mut self, now_us: u64, a: ActorIndex, b: ActorIndex) -> Vec<(u64, Arrival)> {
        self.holding.remove(&pair(a, b));
        let held = self.held.remove(&pair(a, b)).unwrap_or_default();
        let mut out = Vec::new();
        for arrival in held {
            let from = self.peer_of(arrival.conn, arrival.to).unwrap_or(arrival.to);
            self.schedule(now_us, from, arrival, &mut out);
        }
        out
    }

    /// Pairs currently held, for `heal all`.
    pub fn held_pairs(&self) -> Vec<(ActorIndex, ActorIndex)> {
        self.holding.iter().copied().collect()
    }

    /// A connection attempt from `node` to `gateway`. Returns the new connection and the arrival
    /// times of the gateway's `Accepted` and the node's `Connected`, or `None` and the time the
    /// attempt fails.
    pub fn connect(
        &mut self,
        now_us: u64,
        node: ActorIndex,
        gateway: ActorIndex,
        gateway_up: bool,
    ) -> Result<(u64, u64, u64), u64> {
        if !gateway_up || self.is_cut(node, gateway) {
            return Err(now_us + self.connect_timeout_us);
        }
        let id = self.next_conn;
        self.next_conn += 1;
        self.stats.connections += 1;
        let accept_at = now_us + self.latency(node, gateway);
        let connected_at = accept_at + self.latency(node, gateway);
        self.conns.insert(
            id,
            Conn {
                node,
                gateway,
                open: true,
                last_arrival_us: [accept_at, connected_at],
            },
        );
        Ok((id, accept_at, connected_at))
    }

    /// True while a connection is open.
    pub fn is_open(&self, conn: u64) -> bool {
        self.conns.get(&conn).is_some_and(|c| c.open)
    }

    /// The other end of a connection, seen from `me`.
    pub fn peer_of(&self, conn: u64, me: ActorIndex) -> Option<ActorIndex> {
        let c = self.conns.get(&conn)?;
        Some(if c.node == me { c.gateway } else { c.node })
    }

    /// The node and gateway ends of a connection.
    pub fn ends(&self, conn: u64) -> Option<(ActorIndex, ActorIndex)> {
        self.conns.get(&conn).map(|c| (c.node, c.gateway))
    }

    /// Closes a connection; returns the peer and when it hears of it, unless it cannot hear.
    pub fn close(&mut self, now_us: u64, conn: u64, by: ActorIndex) -> Option<(ActorIndex, u64)> {
        let c = self.conns.get_mut(&conn)?;
        if !c.open {
            return None;
        }
        c.open = false;
        let peer = if c.node == by { c.gateway } else { c.node };
        if self.drops(by, peer) {
            return None;
        }
        Some((peer, now_us + self.latency(by, peer)))
    }

    /// Marks a connection dead without telling anyone (the actor at one end crashed).
    pub fn kill(&mut self, conn: u64) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.open = false;
        }
    }

    /// Open connections with `actor` at one end, in id order.
    pub fn connections_of(&self, actor: ActorIndex) -> Vec<u64> {
        self.conns
            .iter()
            .filter(|(_, c)| c.open && (c.node == actor || c.gateway == actor))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Forgets closed connections (bounded memory over long runs).
    pub fn collect_closed(&mut self) {
        self.conns.retain(|_, c| c.open);
    }

    /// Sends a frame from `from` on `conn`; returns the arrivals to schedule (none, one or two).
    pub fn send(
        &mut self,
        now_us: u64,
        conn: u64,
        from: ActorIndex,
        frame: Bytes,
    ) -> Vec<(u64, Arrival)> {
        let mut out = Vec::new();
        let Some(c) = self.conns.get(&conn) else {
            return out;
        };
        if !c.open {
            return out;
        }
        let to = if c.node == from { c.gateway } else { c.node };
        self.stats.sent += 1;
        let arrival = Arrival { conn, to, frame };
        if self.holding.contains(&pair(from, to)) {
            self.stats.held += 1;
            self.held.entry(pair(from, to)).or_default().push(arrival);
            return out;
        }
        if self.drops(from, to) {
            self.stats.cut += 1;
            return out;
        }
        let profile = self.profile(from, to);
        if self.rng.chance(profile.loss) {
            self.stats.lost += 1;
            return out;
        }
        if self.rng.chance(profile.duplicate) {
            self.stats.duplicated += 1;
            self.schedule(now_us, from, arrival.clone(), &mut out);
        }
        self.schedule(now_us, from, arrival, &mut out);
        out
    }

    fn schedule(
        &mut self,
        now_us: u64,
        from: ActorIndex,
        arrival: Arrival,
        out: &mut Vec<(u64, Arrival)>,
    ) {
        let to = arrival.to;
        let profile = self.profile(from, to);
        let mut departs = now_us;
        if profile.bandwidth_bps > 0 {
            // One frame after another: each takes its size over the rate to leave.
            let bits = arrival.frame.len() as u64 * 8;
            let transmit_us = (bits * 1_000_000).div_ceil(profile.bandwidth_bps);
            let free = self.busy_until_us.get(&(from, to)).copied().unwrap_or(0);
            departs = now_us.max(free) + transmit_us;
            self.busy_until_us.insert((from, to), departs);
        }
        let mut at = departs + self.latency(from, to);
        let reorder = self.rng.chance(profile.reorder);
        let Some(c) = self.conns.get_mut(&arrival.conn) else {
            return;
        };
        let direction = usize::from(to == c.node);
        if reorder {
            self.stats.reordered += 1;
        } else {
            at = at.max(c.last_arrival_us[direction]);
            c.last_arrival_us[direction] = at;
        }
        out.push((at, arrival));
    }

    fn latency(&mut self, a: ActorIndex, b: ActorIndex) -> u64 {
        let p = self.profile(a, b);
        self.rng
            .range_inclusive(p.latency_us_min, p.latency_us_max.max(p.latency_us_min))
    }
}
