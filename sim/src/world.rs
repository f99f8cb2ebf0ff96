//! The world: actors, the event queue and the run loop of one scenario and one seed.
//!
//! Run loop contract:
//! 1. Pop the earliest event (ties in insertion order); advance virtual time to it.
//! 2. Hand it to its actor as a state machine input (on the actor's skewed clock), or carry out
//!    a fault or workload step.
//! 3. Drain the actor's `poll_ready`: each `Ready`'s writes go to the disk model, which commits
//!    them after the configured latency, in order; only then are its held outputs carried out
//!    (frames to the network, application events to the checker and the trace). Eager outputs (a
//!    node's message transmissions) go out at once, ahead of the commit.
//! 4. Re-read the actor's `poll_timeout` and schedule a wake-up.
//! 5. Check safety invariants (the checker raises on the event that breaks one).
//!
//! At `duration` the world heals every fault (cuts, holds, link faults, crashed actors) and
//! probes for convergence every 100 ms of virtual time until the liveness bound.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use sund_model::env::{HeldOutputs, WriteBatch};
use sund_model::federation::FederationInput;
use sund_model::gateway::limits::SourceAddress;
use sund_model::gateway::{
    AdminCommand, Gateway, GatewayConfig, GatewayInput, GatewayOutput, HistoryKind,
};
use sund_model::identity::DeviceKey;
use sund_model::ids::{ConnectionId, ConversationId, DeviceId};
use sund_model::mls::verified::VerifiedSignatures;
use sund_model::node::{ConnectionStatus, Node, NodeConfig, NodeEvent, NodeInput, NodeOutput};
use sund_model::time::Instant;

use crate::checker::{Checker, CheckerStats, Phase, Violation};
use crate::disk::SimDisk;
use crate::event_log::{describe_frame, EventLog};
use crate::event_queue::EventQueue;
use crate::network::{ActorIndex, Arrival, NetStats, Network};
use crate::rng::SimRng;
use crate::scenario::{Action, Invariant, Scenario, Target, Timing};
use crate::trace::{Record, TraceHash};

mod blocks;
mod drain;
mod federation;
mod files;
mod handover;
mod limits;
mod peer_limit;
pub use files::FilesReport;
mod mls_groups;
mod presence;
mod read_pause;
mod trust;
pub use drain::DrainReport;
pub use federation::domain_of;
use mls_groups::SimConversation;
pub use trust::CrlReport;

/// Most events one run may process; a run that needs more is reported as exhausted.
pub const EVENTS_MAX: u64 = 2_000_000_000;
/// Interval of the convergence probe in the liveness phase.
pub const PROBE_INTERVAL_US: u64 = 100_000;

/// Why a scenario cannot run in this build.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct SetupError {
    /// Scenario file.
    pub file: String,
    /// Line of the offending statement.
    pub line: usize,
    /// Column.
    pub column: usize,
    /// What is missing.
    pub message: String,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every checked invariant held and the system converged.
    Passed,
    /// A safety invariant broke during the run.
    Safety(Violation),
    /// The system did not converge within the liveness bound after heal.
    Liveness(Violation),
}

/// Everything a run reports.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// Scenario name.
    pub scenario: String,
    /// Scenario file.
    pub file: String,
    /// The seed.
    pub seed: u64,
    /// Trace hash (hex).
    pub trace_hash: String,
    /// Events processed.
    pub events: u64,
    /// Virtual time at the end, milliseconds.
    pub sim_time_ms: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// What applications saw.
    pub app: CheckerStats,
    /// Network counters.
    pub net: NetStats,
    /// Faults injected by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// Messages the workload offered.
    pub offered: u64,
    /// Messages gateways had sequenced in memory but not yet committed when they crashed.
    pub lost_uncommitted: u64,
    /// How far revocations got (`None`: nothing was revoked).
    pub crl: Option<CrlReport>,
    /// The last events in words, if the run kept a log ([`World::keep_event_log`]).
    pub event_log: Vec<String>,
    /// How long after the heal at the end of the safety phase everything had converged, to the
    /// probe's 100 ms (`None`: it did not, or the scenario does not check convergence).
    pub recovery_ms: Option<u64>,
    /// How files fared (`None`: no file was sent).
    pub files: Option<FilesReport>,
    /// Each `drain`: how long it took and how the devices came back.
    pub drains: Vec<DrainReport>,
    /// Conversations spanning domains (`None`: none relayed or fanned out anything).
    pub spanning: Option<sund_model::gateway::SpanningStats>,
    /// Authority handovers (`None`: the scenario hands nothing over).
    pub handovers: Option<handover::HandoverReport>,
}

#[derive(Clone, Debug)]
enum EventKind {
    Arrive(Arrival),
    Accept {
        gateway: ActorIndex,
        conn: u64,
    },
    ConnectDone {
        node: ActorIndex,
        incarnation: u32,
        conn: Option<u64>,
    },
    Closed {
        actor: ActorIndex,
        incarnation: u32,
        conn: u64,
    },
    Wake {
        actor: ActorIndex,
        incarnation: u32,
    },
    CommitDone {
        actor: ActorIndex,
        incarnation: u32,
    },
    Action {
        index: usize,
        nominal: u64,
    },
    Send {
        workload: usize,
        device: ActorIndex,
    },
    /// The first member device of an MLS conversation creates it.
    CreateGroup {
        conversation: usize,
    },
    EndOfWorkload,
    Probe,
    /// A panic planted by a test (see `World::plant_panic`).
    PlantedPanic,
    /// A drain's time is up (see `world/drain.rs`).
    DrainTimeout {
        gateway: ActorIndex,
        incarnation: u32,
    },
    /// A draining gateway closes a connection once its goodbye has arrived.
    GracefulClose {
        gateway: ActorIndex,
        incarnation: u32,
        conn: u64,
    },
    /// A gateway accepts a federation link from a peer gateway (see `world/federation.rs`).
    LinkAccept {
        gateway: ActorIndex,
        conn: u64,
    },
    /// A gateway's dial of a federation peer finished (`conn`) or failed.
    LinkConnectDone {
        gateway: ActorIndex,
        incarnation: u32,
        peer: ActorIndex,
        conn: Option<u64>,
    },
    /// A gateway's pause of reading a connection may be over (see `world/read_pause.rs`).
    ResumeReading {
        conn: u64,
    },
}

// Both configs stay inline, one per actor: a node's is large too (boxing the gateway's alone
// leaves the node's the larger by as much), and an actor's machine is reached in every step.
#[allow(clippy::large_enum_variant)]
enum Machine {
    Gateway(Option<Box<Gateway>>, GatewayConfig),
    Node(Option<Box<Node>>, NodeConfig),
}

enum HeldKind {
    Gateway(HeldOutputs<GatewayOutput>),
    Node(HeldOutputs<NodeOutput>),
}

struct PendingCommit {
    done_at: u64,
    writes: WriteBatch,
    held: HeldKind,
}

struct Actor {
    name: String,
    machine: Machine,
    disk: SimDisk,
    pending: VecDeque<PendingCommit>,
    incarnation: u32,
    up: bool,
    skew_us: i64,
    commit_latency_us: u64,
    wake_at: Option<u64>,
    entropy_base: SimRng,
    /// Gateways: connections cut by the last crash, each with the actor at its other end and
    /// that actor's incarnation then, reset to it on restart. Kept here, not looked up in the
    /// network at restart: the network forgets dead connections whenever it collects closed
    /// ones (a `disconnect` while the gateway is down), and the devices on them would then
    /// wait out their idle timeout.
    killed_conns: Vec<(u64, ActorIndex, u32)>,
    /// Gateways: conversation heads in memory at the last crash.
    heads_at_crash: BTreeMap<ConversationId, u64>,
    /// Disk faults: commits wait while stalled; a commit with writes fails while full.
    disk_stalled: bool,
    disk_full: bool,
    /// Stopped by a commit that failed on a full disk; starts again at `free-disk`.
    stopped_by_full_disk: bool,
    /// While the disk lies about fsync (`lie-disk`): what is really durable, as it was when
    /// the disk began to lie. A crash goes back to it.
    durable_while_lying: Option<SimDisk>,
    /// The last crash lost commits the disk had reported durable.
    lost_writes: bool,
    /// Clock rate error, parts per million, counted from `drift_since_us` (virtual time); what
    /// earlier rates added is folded into `skew_us`.
    drift_ppm: i64,
    drift_since_us: u64,
    /// A wall-clock jump the process reads at its next start.
    pending_jump_us: i64,
    /// Nodes: their home gateway and connection in progress.
    home: ActorIndex,
    connecting: Option<u64>,
    device: DeviceId,
}

/// What [`World::report_progress`] calls: virtual time (µs), events so far.
type ProgressReport = Box<dyn FnMut(u64, u64)>;

/// How many events pass between two progress lines of `cargo sim --progress`: about a minute
/// of a 1,000-member room's run, about fifteen seconds at chaos-10k's pace.
pub const PROGRESS_EVENTS: u64 = 1 << 24;

/// One run of one scenario with one seed.
pub struct World {
    scenario: Scenario,
    seed: u64,
    now: u64,
    queue: EventQueue<EventKind>,
    actors: Vec<Actor>,
    gateways: Vec<ActorIndex>,
    devices: Vec<ActorIndex>,
    user_devices: BTreeMap<String, Vec<ActorIndex>>,
    conversations: Vec<SimConversation>,
    conversation_ids: BTreeMap<String, usize>,
    network: Network,
    fault_rng: SimRng,
    workload_rng: SimRng,
    checker: Checker,
    trace: TraceHash,
    events: u64,
    end_us: u64,
    duration_us: u64,
    healing: bool,
    outcome: Option<Outcome>,
    faults: BTreeMap<&'static str, u64>,
    offered: u64,
    sent_counter: u64,
    lost_uncommitted: u64,
    revocations: trust::Revocations,
    drains: drain::Drains,
    limit_watch: limits::LimitWatch,
    peer_limit_watch: peer_limit::PeerLimitWatch,
    /// Devices whose user's `address` they share (the others each have their own; see
    /// [`World::address_of`]).
    shared_addresses: BTreeMap<ActorIndex, core::net::Ipv4Addr>,
    /// Connections a gateway stopped reading for a while.
    read_pauses: read_pause::ReadPauses,
    presence_watch: presence::PresenceWatch,
    federation: federation::FederationWatch,
    handovers: handover::HandoverWatch,
    /// The newest events in words, when `--trace` asked for them.
    event_log: Option<EventLog>,
    /// Told the virtual time and the events so far every so many events (`cargo sim
    /// --progress`); it sees the run, never changes it.
    progress: Option<(u64, ProgressReport)>,
    /// When the liveness probe found everything converged.
    recovered_at: Option<u64>,
    /// Each running device's outbox length just after the heal, so that a liveness failure
    /// says whether an outbox stalled or was still draining (two different failures).
    outbox_at_heal: BTreeMap<ActorIndex, usize>,
    /// Files sent and how they arrived.
    files: files::SimFiles,
}

/// True if the scenario changes contacts or watches presence: then each device names its user
/// (plain scenarios otherwise leave devices their own users, and their traces unchanged).
fn uses_contacts(scenario: &Scenario) -> bool {
    scenario.schedule.iter().any(|s| {
        matches!(
            s.action,
            Action::Contact(..) | Action::Invisible(..) | Action::Watch(..)
        )
    })
}

/// What a clock `ppm` parts per million off adds over `elapsed_us` (signed, truncated).
fn drift_us(ppm: i64, elapsed_us: u64) -> i64 {
    if ppm == 0 {
        return 0;
    }
    ((ppm as i128 * elapsed_us as i128) / 1_000_000) as i64
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl World {
    /// Builds the world for `scenario` and `seed`, or says why this build cannot run it.
    pub fn new(scenario: Scenario, seed: u64) -> Result<World, SetupError> {
        Self::check_supported(&scenario)?;
        let mut root = SimRng::from_seed(seed);
        let network_rng = root.derive();
        let fault_rng = root.derive();
        let workload_rng = root.derive();
        let mut actor_rng = root.derive();

        let t = &scenario.tunables;
        // Simulated gateways admit any device that proves its key.
        let mut gateway_config = GatewayConfig {
            open_enrolment: true,
            ..GatewayConfig::default()
        };
        let mut node_template = NodeConfig::new(DeviceKey::from_seed([0; 32]));
        gateway_config.planted = scenario.planted;
        node_template.planted = scenario.planted;
        t.apply(&mut gateway_config, &mut node_template);

        let mut actors = Vec::new();
        let mut gateways = Vec::new();
        let mut gateway_index = BTreeMap::new();
        for name in &scenario.gateways {
            let index = actors.len() as ActorIndex;
            gateway_index.insert(name.clone(), index);
            gateways.push(index);
            actors.push(Actor {
                name: name.clone(),
                machine: Machine::Gateway(None, gateway_config.clone()),
                disk: SimDisk::default(),
                pending: VecDeque::new(),
                incarnation: 0,
                up: false,
                skew_us: 0,
                commit_latency_us: 1_000,
                disk_stalled: false,
                disk_full: false,
                stopped_by_full_disk: false,
                durable_while_lying: None,
                lost_writes: false,
                drift_ppm: 0,
                drift_since_us: 0,
                pending_jump_us: 0,
                wake_at: None,
                entropy_base: actor_rng.derive(),
                killed_conns: Vec::new(),
                heads_at_crash: BTreeMap::new(),
                home: index,
                connecting: None,
                device: DeviceId(0),
            });
        }
        let mut devices = Vec::new();
        let mut user_devices = BTreeMap::new();
        let mut shared_addresses = BTreeMap::new();
        // One memo of verified signatures for every device of this run (see
        // sund_model::mls::verified): the same check answers the same everywhere.
        let verified = VerifiedSignatures::default();
        for user in scenario.users.iter() {
            let mut mine = Vec::new();
            for d in 0..user.devices {
                let index = actors.len() as ActorIndex;
                let entropy_base = actor_rng.derive();
                // Stream 0 of the actor's key makes its device key; incarnations use 1, 2, ...
                let key = DeviceKey::generate(&mut entropy_base.with_stream(0));
                let device = key.device_id();
                let mut config = NodeConfig {
                    key,
                    device,
                    ..node_template.clone()
                };
                if mls_groups::uses_mls(&scenario) {
                    let id = federation::user_id(&scenario, &user.name);
                    mls_groups::enable_mls(&mut config, id, &scenario.tunables, &verified);
                } else if uses_contacts(&scenario) {
                    // Contacts are between users: each device names its user.
                    config.user = Some(federation::user_id(&scenario, &user.name));
                }
                actors.push(Actor {
                    name: format!("{}/{}", user.name, d),
                    machine: Machine::Node(None, config),
                    disk: SimDisk::default(),
                    pending: VecDeque::new(),
                    incarnation: 0,
                    up: false,
                    skew_us: 0,
                    commit_latency_us: 0,
                    disk_stalled: false,
                    disk_full: false,
                    stopped_by_full_disk: false,
                    durable_while_lying: None,
                    lost_writes: false,
                    drift_ppm: 0,
                    drift_since_us: 0,
                    pending_jump_us: 0,
                    wake_at: None,
                    entropy_base,
                    killed_conns: Vec::new(),
                    heads_at_crash: BTreeMap::new(),
                    home: gateway_index[&user.gateway],
                    connecting: None,
                    device,
                });
                mine.push(index);
                devices.push(index);
                if let Some(address) = user.address {
                    shared_addresses.insert(index, address);
                }
            }
            user_devices.insert(user.name.clone(), mine);
        }

        let federation = {
            let mut gateways: Vec<_> = actors
                .iter_mut()
                .enumerate()
                .filter_map(|(i, actor)| match &mut actor.machine {
                    Machine::Gateway(_, config) => Some((
                        actor.name.clone(),
                        i as ActorIndex,
                        config,
                        // The entropy of the gateway's first start (incarnation 1).
                        actor.entropy_base.with_stream(1),
                    )),
                    Machine::Node(..) => None,
                })
                .collect();
            federation::configure(&scenario, &mut gateways)
        };

        let duration_us = us(scenario.duration);
        let end_us = duration_us.saturating_add(us(scenario.liveness));
        let mut world = World {
            checker: Checker::new(
                scenario.invariants.clone(),
                scenario.tunables.retention.is_some() || scenario.tunables.mailbox.is_some(),
            ),
            seed,
            now: 0,
            queue: EventQueue::default(),
            actors,
            gateways,
            devices,
            user_devices,
            conversations: Vec::new(),
            conversation_ids: BTreeMap::new(),
            network: Network::new(network_rng, scenario.network),
            fault_rng,
            workload_rng,
            trace: TraceHash::default(),
            events: 0,
            end_us,
            duration_us,
            healing: false,
            outcome: None,
            faults: BTreeMap::new(),
            offered: 0,
            sent_counter: 0,
            lost_uncommitted: 0,
            revocations: trust::Revocations::default(),
            drains: drain::Drains::default(),
            peer_limit_watch: peer_limit::PeerLimitWatch::default(),
            limit_watch: limits::LimitWatch::new(
                scenario.tunables.send_rate(),
                scenario.tunables.registration_rate(),
            )
            .with_invitations(scenario.tunables.invitation_rate()),
            shared_addresses,
            read_pauses: read_pause::ReadPauses::default(),
            presence_watch: presence::PresenceWatch::new(uses_contacts(&scenario)),
            federation,
            handovers: handover::HandoverWatch::default(),
            event_log: None,
            progress: None,
            recovered_at: None,
            outbox_at_heal: BTreeMap::new(),
            files: files::SimFiles::default(),
            scenario,
        };
        world.setup();
        Ok(world)
    }

    fn check_supported(scenario: &Scenario) -> Result<(), SetupError> {
        let unsupported = |span: crate::scenario::Span, message: String| SetupError {
            file: scenario.file.clone(),
            line: span.line,
            column: span.column,
            message,
        };
        if let Some(inv) = scenario.invariants.iter().find(|i| !i.implemented()) {
            return Err(unsupported(
                crate::scenario::Span { line: 1, column: 1 },
                format!(
                    "invariant `{}` is part of the DSL but this build cannot check it yet",
                    inv.name()
                ),
            ));
        }
        Ok(())
    }

    fn push(&mut self, at: u64, kind: EventKind) {
        self.queue.push(at, kind);
    }

    fn setup(&mut self) {
        // Disk latencies and skews.
        for (target, latency) in self.scenario.disks.clone() {
            for a in self.resolve(&target) {
                self.actors[a as usize].commit_latency_us = us(latency);
            }
        }
        for (target, skew) in self.scenario.skews.clone() {
            for a in self.resolve(&target) {
                self.actors[a as usize].skew_us = skew;
            }
        }
        for (a, b, patch) in self.scenario.links.clone() {
            for x in self.resolve(&a) {
                for y in self.resolve(&b) {
                    if x != y {
                        let p = patch.apply(self.network.profile(x, y));
                        self.network.set_pair_profile(x, y, p);
                    }
                }
            }
        }
        // Start gateways, then create conversations, then start nodes.
        for g in self.gateways.clone() {
            self.start_actor(g);
        }
        for (number, decl) in self.scenario.conversations.clone().into_iter().enumerate() {
            let id = ConversationId((0xC0u128 << 120) | (number as u128 + 1));
            let gateway = self.gateways[self
                .scenario
                .gateways
                .iter()
                .position(|g| *g == decl.gateway)
                .expect("resolved")];
            let mut members: Vec<ActorIndex> =
                decl.members.iter().flat_map(|t| self.resolve(t)).collect();
            members.sort_unstable();
            members.dedup();
            if decl.kind.is_some() {
                // The creator (the first member) is one of the conversation's gateway: an MLS
                // conversation is sequenced where it was made.
                if let Some(at) = members
                    .iter()
                    .position(|&m| self.actors[m as usize].home == gateway)
                {
                    let creator = members.remove(at);
                    members.insert(0, creator);
                }
            }
            let devices: Vec<DeviceId> = members
                .iter()
                .map(|&m| self.actors[m as usize].device)
                .collect();
            let index = self.conversations.len();
            self.conversation_ids.insert(decl.name.clone(), index);
            self.conversations.push(SimConversation {
                id: if decl.kind.is_some() {
                    ConversationId(0) // named by its creator
                } else {
                    id
                },
                gateway,
                members,
                kind: decl.kind,
            });
            match decl.kind {
                None => {
                    // Members homed at other gateways: the conversation is homed here and
                    // shared with each of their gateways (federation peers of this one).
                    let mut foreign: BTreeMap<String, Vec<DeviceId>> = BTreeMap::new();
                    let mut local = Vec::new();
                    for &m in &self.conversations[index].members {
                        let home = self.actors[m as usize].home;
                        let device = self.actors[m as usize].device;
                        match self.federation.domain(home) {
                            Some(domain) if home != gateway => {
                                foreign.entry(domain).or_default().push(device);
                            }
                            _ => local.push(device),
                        }
                    }
                    debug_assert_eq!(
                        local.len() + foreign.values().map(Vec::len).sum::<usize>(),
                        devices.len()
                    );
                    self.with_gateway(gateway, |g, now| {
                        let command = AdminCommand::CreateConversation(id, local);
                        g.handle(
                            now,
                            GatewayInput::Admin {
                                request: 0,
                                command,
                            },
                        );
                        for (domain, members) in foreign {
                            let command = AdminCommand::ShareConversation {
                                conversation: id,
                                domain,
                                members,
                            };
                            g.handle(
                                now,
                                GatewayInput::Admin {
                                    request: 0,
                                    command,
                                },
                            );
                        }
                    })
                }
                Some(_) => self.push(
                    mls_groups::CREATE_AT_US,
                    EventKind::CreateGroup {
                        conversation: index,
                    },
                ),
            }
        }
        for d in self.devices.clone() {
            self.start_actor(d);
        }
        // Workloads: each sender starts at a random phase within its period.
        for (index, w) in self.scenario.workloads.clone().into_iter().enumerate() {
            let period = us(w.period);
            for device in self.resolve(&w.from) {
                self.limit_watch.plan(device, period);
                let phase = self
                    .workload_rng
                    .range_inclusive(0, period.saturating_sub(1));
                self.push(
                    us(w.start).saturating_add(phase),
                    EventKind::Send {
                        workload: index,
                        device,
                    },
                );
            }
        }
        for (index, s) in self.scenario.schedule.clone().into_iter().enumerate() {
            let at = match s.timing {
                Timing::At(t) => us(t),
                Timing::Every { start, .. } => us(start),
            };
            if at < self.duration_us {
                let actual = at + self.jitter(&s.timing);
                self.push(actual, EventKind::Action { index, nominal: at });
            }
        }
        self.push(self.duration_us, EventKind::EndOfWorkload);
    }

    /// Resolves a target to actors (random targets draw from the fault stream).
    fn resolve(&mut self, target: &Target) -> Vec<ActorIndex> {
        match target {
            Target::Gateway(name) => {
                let i = self
                    .scenario
                    .gateways
                    .iter()
                    .position(|g| g == name)
                    .expect("resolved at parse");
                vec![self.gateways[i]]
            }
            Target::User(name) => self.user_devices[name].clone(),
            Target::Device(user, i) => vec![self.user_devices[user][*i as usize]],
            Target::UserGlob(prefix) => self
                .user_devices
                .iter()
                .filter(|(u, _)| u.starts_with(prefix.as_str()))
                .flat_map(|(_, d)| d.iter().copied())
                .collect(),
            Target::AllDevices => self.devices.clone(),
            Target::AllGateways => self.gateways.clone(),
            Target::RandomDevice => {
                let i = self.fault_rng.index(self.devices.len());
                vec![self.devices[i]]
            }
            Target::RandomGateway => {
                let i = self.fault_rng.index(self.gateways.len());
                vec![self.gateways[i]]
            }
        }
    }

    fn local_now(&self, actor: ActorIndex) -> Instant {
        Instant(self.local_at(actor, self.now))
    }

    /// The actor's clock at virtual time `t`: its offset, plus what its rate error added
    /// since the rate was set.
    fn local_at(&self, actor: ActorIndex, t: u64) -> u64 {
        let a = &self.actors[actor as usize];
        (t as i64)
            .saturating_add(a.skew_us)
            .saturating_add(drift_us(a.drift_ppm, t.saturating_sub(a.drift_since_us)))
            .max(0) as u64
    }

    /// The earliest virtual time at which the actor's clock reads `local` (never before now).
    fn virtual_at(&self, actor: ActorIndex, local: u64) -> u64 {
        let a = &self.actors[actor as usize];
        let since = a.drift_since_us;
        // Invert t + skew + ppm * (t - since) / 1e6, then step to the first tick that reaches it.
        let base = (local as i64).saturating_sub(a.skew_us) as i128 - since as i128;
        let guess = since as i128 + base * 1_000_000 / (1_000_000 + a.drift_ppm as i128);
        let mut t = guess.clamp(self.now as i128, u64::MAX as i128) as u64;
        while self.local_at(actor, t) < local {
            t += 1;
        }
        while t > self.now && self.local_at(actor, t - 1) >= local {
            t -= 1;
        }
        t
    }

    // ------------------------------------------------------------ actor life cycle

    fn start_actor(&mut self, a: ActorIndex) {
        // A process reads the wall clock when it starts: a jump made while it ran (or was
        // down) shows now, and its monotonic time goes on from there.
        let jump = std::mem::take(&mut self.actors[a as usize].pending_jump_us);
        self.actors[a as usize].skew_us += jump;
        let now = self.local_now(a);
        let actor = &mut self.actors[a as usize];
        debug_assert!(!actor.up, "starting an actor that is up");
        actor.incarnation += 1;
        actor.up = true;
        actor.wake_at = None;
        actor.connecting = None;
        let entropy = actor.entropy_base.with_stream(u64::from(actor.incarnation));
        let mut recovered_heads = None;
        match &mut actor.machine {
            Machine::Gateway(slot, config) => {
                let g = Gateway::recover(config.clone(), now, &actor.disk, Box::new(entropy))
                    .expect("the simulated disk holds what the gateway wrote");
                // Replicas of conversations homed elsewhere lag their authority by design, and
                // so does a conversation this gateway is handing over.
                recovered_heads = Some(g.sequenced_heads().collect::<BTreeMap<_, _>>());
                *slot = Some(Box::new(g));
            }
            Machine::Node(slot, config) => {
                let n = Node::recover(config.clone(), Box::new(entropy), now, &actor.disk)
                    .expect("the simulated disk holds what the node wrote");
                *slot = Some(Box::new(n));
            }
        }

        if recovered_heads.is_some() {
            self.limit_watch.gateway_started();
        }
        if let Some(heads) = recovered_heads {
            if actor.incarnation > 1 {
                let crash_heads = std::mem::take(&mut actor.heads_at_crash);
                let lost_writes = std::mem::take(&mut actor.lost_writes);
                if !lost_writes {
                    for (conv, before) in &crash_heads {
                        let after = heads.get(conv).copied().unwrap_or(0);
                        self.lost_uncommitted += before.saturating_sub(after);
                    }
                }
                let name = actor.name.clone();
                if lost_writes {
                    self.checker.on_gateway_lost_writes(&heads, &crash_heads);
                }
                self.checker.on_gateway_recovered(self.now, &name, &heads);
            }
            // Nodes still talking on connections the crash cut learn of it from their next
            // packet (a QUIC stateless reset): tell them after one latency.
            for (conn, node, incarnation) in
                std::mem::take(&mut self.actors[a as usize].killed_conns)
            {
                // The other end: a device, or a peer gateway on a federation link; one that
                // restarted since holds no such connection any more.
                let peer = &self.actors[node as usize];
                if peer.up && peer.incarnation == incarnation && !self.network.drops(a, node) {
                    let at = self.now + self.network.default_profile().latency_us_max;
                    self.push(
                        at,
                        EventKind::Closed {
                            actor: node,
                            incarnation,
                            conn,
                        },
                    );
                }
            }
        }
        if self.is_gateway(a) {
            self.federation_restarted(a);
        }
        if !self.is_gateway(a) && self.actors[a as usize].incarnation > 1 {
            self.files_after_restart(a);
            self.recreate_lost_groups(a);
        }
        self.after_step(a);
    }

    fn crash_actor(&mut self, a: ActorIndex) {
        if !self.actors[a as usize].up {
            return;
        }
        let conns = self.network.connections_of(a);
        let mut killed = Vec::with_capacity(conns.len());
        for &conn in &conns {
            if let Some((dialer, acceptor)) = self.network.ends(conn) {
                let peer = if dialer == a { acceptor } else { dialer };
                killed.push((conn, peer, self.actors[peer as usize].incarnation));
            }
            self.network.kill(conn);
        }
        // A crash ends a drain: the gateway that starts again accepts connections.
        self.drains.crashed(a);
        let actor = &mut self.actors[a as usize];
        actor.up = false;
        actor.pending.clear(); // uncommitted writes and the outputs they held are lost
        if let Some(durable) = &actor.durable_while_lying {
            // The volatile cache goes with the power: every commit since the disk began to
            // lie is lost, though each was reported durable.
            if durable.commits() != actor.disk.commits() {
                actor.lost_writes = true;
                actor.disk = durable.clone();
            }
        }
        actor.wake_at = None;
        actor.connecting = None;
        match &mut actor.machine {
            Machine::Gateway(slot, _) => {
                if let Some(g) = slot.take() {
                    actor.heads_at_crash = g.sequenced_heads().collect();
                }
                actor.killed_conns = killed;
            }
            Machine::Node(slot, _) => *slot = None,
        }
    }

    /// A commit failed on a full disk: nothing it held is released. The actor stops as a real
    /// driver does (it drops its machine and closes its connections, so peers hear at once)
    /// and starts again from what is durable when the disk is freed.
    fn storage_failed(&mut self, a: ActorIndex) {
        self.trace
            .record(Record::Fault, self.now, a, b"storage-failed");
        self.note(|w| {
            format!(
                "{}'s commit failed: its disk is full; it stops until the disk is freed",
                w.actors[a as usize].name
            )
        });
        *self.faults.entry("storage-failed").or_default() += 1;
        for conn in self.network.connections_of(a) {
            self.close(a, conn);
        }
        self.network.collect_closed();
        self.crash_actor(a);
        self.actors[a as usize].stopped_by_full_disk = true;
    }

    /// A stalled disk resumes: what waited completes now (in order, behind nothing).
    fn resume_disk(&mut self, a: ActorIndex) {
        let actor = &mut self.actors[a as usize];
        if !actor.disk_stalled {
            return;
        }
        actor.disk_stalled = false;
        if actor.up && !actor.pending.is_empty() {
            let incarnation = actor.incarnation;
            self.push(
                self.now,
                EventKind::CommitDone {
                    actor: a,
                    incarnation,
                },
            );
        } else {
            // A drain that waited only for the disk (nothing pending) can stop now; with
            // commits pending it stops when they are done.
            self.finish_drain_if_done(a);
        }
    }

    /// A full disk has room again: an actor it stopped starts from what is durable.
    fn free_disk(&mut self, a: ActorIndex) {
        let actor = &mut self.actors[a as usize];
        actor.disk_full = false;
        if std::mem::take(&mut actor.stopped_by_full_disk) && !actor.up {
            self.start_actor(a);
        }
    }

    fn with_gateway(&mut self, a: ActorIndex, f: impl FnOnce(&mut Gateway, Instant)) {
        let now = self.local_now(a);
        if let Machine::Gateway(Some(g), _) = &mut self.actors[a as usize].machine {
            f(g, now);
        } else {
            return;
        }
        self.after_step(a);
    }

    fn with_node(&mut self, a: ActorIndex, f: impl FnOnce(&mut Node, Instant)) {
        let now = self.local_now(a);
        if let Machine::Node(Some(n), _) = &mut self.actors[a as usize].machine {
            f(n, now);
        } else {
            return;
        }
        self.after_step(a);
    }

    /// Drains the actor's ready batches into the commit pipeline and reschedules its wake-up.
    fn after_step(&mut self, a: ActorIndex) {
        if matches!(
            self.actors[a as usize].machine,
            Machine::Gateway(Some(_), _)
        ) {
            self.follow_group_homes(a);
            self.check_single_authority(a);
            self.check_peer_limit(a);
        }
        loop {
            let actor = &mut self.actors[a as usize];
            let mut eager = Vec::new();
            let mut gateway_eager = Vec::new();
            let (writes, held) = match &mut actor.machine {
                Machine::Gateway(Some(g), _) => match g.poll_ready() {
                    Some(mut r) => {
                        gateway_eager = r.take_eager();
                        let (w, h) = r.split();
                        (w, HeldKind::Gateway(h))
                    }
                    None => break,
                },
                Machine::Node(Some(n), _) => match n.poll_ready() {
                    Some(mut r) => {
                        eager = r.take_eager();
                        let (w, h) = r.split();
                        (w, HeldKind::Node(h))
                    }
                    None => break,
                },
                _ => break,
            };
            if matches!(held, HeldKind::Gateway(_)) {
                self.check_blocks_hold(a, &writes);
            }
            // Eager outputs leave now, ahead of the commit that holds the rest.
            for output in eager {
                self.node_output(a, output);
            }
            for output in gateway_eager {
                self.gateway_output(a, output);
            }
            let actor = &mut self.actors[a as usize];
            // Group commit: a batch is durable `commit_latency` after it is handed over, but
            // never before the batches handed over earlier (commits complete in order).
            let last = actor
                .pending
                .back()
                .map_or(self.now, |p| p.done_at.max(self.now));
            let done_at = if writes.is_empty() {
                last
            } else {
                last.max(self.now + actor.commit_latency_us)
            };
            if done_at == self.now && actor.pending.is_empty() && !actor.disk_stalled {
                self.commit_and_release(a, writes, held);
            } else {
                actor.pending.push_back(PendingCommit {
                    done_at,
                    writes,
                    held,
                });
                let incarnation = actor.incarnation;
                self.push(
                    done_at,
                    EventKind::CommitDone {
                        actor: a,
                        incarnation,
                    },
                );
            }
        }
        let actor = &self.actors[a as usize];
        if !actor.up {
            return;
        }
        let deadline = match &actor.machine {
            Machine::Gateway(Some(g), _) => Some(g.poll_timeout()),
            Machine::Node(Some(n), _) => n.poll_timeout(),
            _ => None,
        };
        if let Some(local) = deadline {
            let at = if actor.drift_ppm == 0 {
                ((local.0 as i64).saturating_sub(actor.skew_us).max(0) as u64).max(self.now)
            } else {
                self.virtual_at(a, local.0)
            };
            let actor = &self.actors[a as usize];
            if actor.wake_at.is_none_or(|w| at < w) {
                let incarnation = actor.incarnation;
                self.actors[a as usize].wake_at = Some(at);
                self.push(
                    at,
                    EventKind::Wake {
                        actor: a,
                        incarnation,
                    },
                );
            }
        }
    }

    fn commit_and_release(&mut self, a: ActorIndex, writes: WriteBatch, held: HeldKind) {
        if self.actors[a as usize].disk_full && !writes.is_empty() {
            self.storage_failed(a);
            return;
        }
        let ops = writes.len() as u32;
        // The delivery cursors this batch makes durable, checked once its events are out.
        let cursors: Vec<(ConversationId, u64)> = match held {
            HeldKind::Node(_) => writes
                .ops()
                .iter()
                .filter_map(|op| match op {
                    sund_model::env::WriteOp::Put { table, key, value }
                        if *table == sund_model::node::NODE_CURSORS_TABLE =>
                    {
                        Some((
                            ConversationId::from_bytes(key.as_slice().try_into().ok()?),
                            // The seq leads the value; the id of the message read there
                            // may follow.
                            u64::from_be_bytes(value.get(..8)?.try_into().ok()?),
                        ))
                    }
                    _ => None,
                })
                .collect(),
            HeldKind::Gateway(_) => Vec::new(),
        };
        // The presence states this batch tells other domains' gateways, checked once the
        // batch's answers are out (the ledger then holds what the batch decided on).
        let told_abroad = match held {
            HeldKind::Gateway(_) if self.checks_presence() => presence::told_abroad(&writes),
            _ => Vec::new(),
        };
        let receipt = sund_model::env::commit_durably(&mut self.actors[a as usize].disk, writes)
            .expect("the simulated disk accepts every batch");
        if ops > 0 {
            self.trace
                .record(Record::Commit, self.now, a, &ops.to_le_bytes());
            self.note(|w| {
                format!(
                    "{} commit of {ops} writes durable",
                    w.actors[a as usize].name
                )
            });
        }
        match held {
            HeldKind::Gateway(h) => {
                for output in h.release(receipt) {
                    self.gateway_output(a, output);
                }
                self.check_told_abroad(a, told_abroad);
            }
            HeldKind::Node(h) => {
                for output in h.release(receipt) {
                    self.node_output(a, output);
                }
                let name = self.actors[a as usize].name.clone();
                for (conv, cursor) in cursors {
                    self.checker
                        .on_cursor_committed(self.now, a, &name, conv, cursor);
                }
            }
        }
    }

    fn gateway_output(&mut self, a: ActorIndex, output: GatewayOutput) {
        match output {
            GatewayOutput::Federation(output) => self.federation_output(a, output),
            GatewayOutput::Send(conn, frame) if self.is_federation_conn(conn.0) => {
                self.transmit(a, conn.0, frame)
            }
            GatewayOutput::Send(conn, frame) => {
                self.check_released_frame(a, conn.0, &frame);
                self.check_rate_limit(a, conn.0, &frame);
                self.check_presence(a, conn.0, &frame);
                self.transmit(a, conn.0, frame)
            }
            GatewayOutput::Close(conn)
                if self.drains.is_draining(a) || self.drains.awaits_arrival(conn.0) =>
            {
                self.close_after_goodbye(a, conn.0)
            }
            GatewayOutput::Close(conn) => self.close(a, conn.0),
            GatewayOutput::PauseReading(conn, pause) => self.pause_reading(conn.0, us(pause)),
            GatewayOutput::Admin { answer, .. } => self.on_admin_answer(a, &answer),
            GatewayOutput::ServeChunk(serve) => self.serve_chunk(a, serve),
            GatewayOutput::HandedOver(done) => self.handed_over(a, done),
            GatewayOutput::PeerCrl(event) => self.on_peer_crl(a, &event),
            GatewayOutput::PeerLimited { .. } => {
                *self.faults.entry("peer-limited").or_default() += 1;
            }
            GatewayOutput::PeerIgnoresHints { .. } => {
                *self.faults.entry("peer-ignores-hints").or_default() += 1;
            }
            GatewayOutput::HistoryLost(lost) => {
                *self.faults.entry("history-lost-detected").or_default() += 1;
                self.note(|w| {
                    let device = w
                        .actors
                        .iter()
                        .find(|x| x.device == lost.device && matches!(x.machine, Machine::Node(..)))
                        .map_or_else(|| lost.device.to_string(), |x| x.name.clone());
                    let what = match lost.kind {
                        HistoryKind::Lost => "lost: it had read them",
                        HistoryKind::Diverged => {
                            "diverged: it read other messages there than the gateway holds, and is told"
                        }
                    };
                    format!(
                        "{} found seqs {}..={} of {} {what} (the cursor of {device})",
                        w.actors[a as usize].name, lost.from, lost.to, lost.conversation
                    )
                });
            }
        }
    }

    fn node_output(&mut self, a: ActorIndex, output: NodeOutput) {
        match output {
            NodeOutput::Connect => {
                let home = self.actors[a as usize].home;
                let gateway_up = self.actors[home as usize].up;
                let incarnation = self.actors[a as usize].incarnation;
                match self.network.connect(self.now, a, home, gateway_up) {
                    Ok((conn, accept_at, connected_at)) => {
                        self.actors[a as usize].connecting = Some(conn);
                        self.push(
                            accept_at,
                            EventKind::Accept {
                                gateway: home,
                                conn,
                            },
                        );
                        self.push(
                            connected_at,
                            EventKind::ConnectDone {
                                node: a,
                                incarnation,
                                conn: Some(conn),
                            },
                        );
                    }
                    Err(fail_at) => {
                        self.push(
                            fail_at,
                            EventKind::ConnectDone {
                                node: a,
                                incarnation,
                                conn: None,
                            },
                        );
                    }
                }
            }
            NodeOutput::Send(conn, frame) => {
                self.note_social_request(a, conn.0, &frame);
                self.transmit(a, conn.0, frame)
            }
            NodeOutput::Close(conn) => self.close(a, conn.0),
            NodeOutput::SendChunk(chunk) => self.send_chunk(a, chunk),
            NodeOutput::Event(event) => self.app_event(a, event),
        }
    }

    fn transmit(&mut self, from: ActorIndex, conn: u64, frame: Bytes) {
        self.note(|w| {
            format!(
                "{} sends on conn {conn}: {}",
                w.actors[from as usize].name,
                w.describe(&frame)
            )
        });
        // A gateway closes a connection right after its goodbye; the close waits until the
        // goodbye has arrived, as the driver's does (it flushes the stream before closing), so
        // the device hears why and how long to wait.
        let goodbye = frame.len() >= 8
            && u16::from_be_bytes([frame[6], frame[7]])
                == sund_model::wire::Opcode::Goodbye.to_u16()
            && matches!(self.actors[from as usize].machine, Machine::Gateway(..));
        let draining = self.drains.is_draining(from);
        for (at, arrival) in self.network.send(self.now, conn, from, frame) {
            if draining || goodbye {
                self.drains.sent(conn, at);
            }
            self.push(at, EventKind::Arrive(arrival));
        }
    }

    fn close(&mut self, by: ActorIndex, conn: u64) {
        if let Some((peer, at)) = self.network.close(self.now, conn, by) {
            let incarnation = self.actors[peer as usize].incarnation;
            self.push(
                at,
                EventKind::Closed {
                    actor: peer,
                    incarnation,
                    conn,
                },
            );
        }
    }

    fn app_event(&mut self, a: ActorIndex, event: NodeEvent) {
        let name = &self.actors[a as usize].name;
        let device = self.actors[a as usize].device;
        let mut record = Vec::with_capacity(64);
        match &event {
            NodeEvent::Delivered {
                conversation,
                seq,
                sender,
                msg_id,
                body,
            } => {
                record.push(1);
                record.extend_from_slice(&conversation.to_bytes());
                record.extend_from_slice(&seq.to_le_bytes());
                record.extend_from_slice(&msg_id.to_bytes());
                record.extend_from_slice(body);
                self.checker
                    .on_delivered(self.now, a, name, *conversation, *seq, *sender, *msg_id);
            }
            NodeEvent::Accepted {
                conversation,
                msg_id,
                seq,
            } => {
                record.push(2);
                record.extend_from_slice(&conversation.to_bytes());
                record.extend_from_slice(&seq.to_le_bytes());
                record.extend_from_slice(&msg_id.to_bytes());
                self.checker
                    .on_accepted(self.now, name, *conversation, device, *msg_id, *seq);
            }
            NodeEvent::Throttled { code, .. } => {
                record.push(27);
                record.extend_from_slice(&(*code as u16).to_le_bytes());
                *self.faults.entry("throttled").or_default() += 1;
                if self.scenario.invariants.contains(&Invariant::Unthrottled)
                    && self.limit_watch.ordinary(a)
                {
                    let detail = format!(
                        "{name} was throttled ({code:?}) although it sends at most half the limit's rate"
                    );
                    self.checker
                        .fail_safety(Invariant::Unthrottled, self.now, detail);
                }
            }
            NodeEvent::Rejected { msg_id, code } => {
                record.push(3);
                record.extend_from_slice(&msg_id.to_bytes());
                record.extend_from_slice(&(*code as u16).to_le_bytes());
                if *code == sund_model::wire::payload::ErrorCode::Forbidden {
                    self.retry_refused_creation(a);
                }
            }
            NodeEvent::Gap {
                conversation,
                from,
                to,
            } => {
                record.push(5);
                record.extend_from_slice(&conversation.to_bytes());
                record.extend_from_slice(&from.to_le_bytes());
                record.extend_from_slice(&to.to_le_bytes());
                self.checker
                    .on_gap(self.now, a, name, *conversation, *from, *to);
            }
            NodeEvent::HistoryLost {
                conversation,
                from,
                to,
            } => {
                record.push(22);
                record.extend_from_slice(&conversation.to_bytes());
                record.extend_from_slice(&from.to_le_bytes());
                record.extend_from_slice(&to.to_le_bytes());
                self.checker
                    .on_history_lost(self.now, a, name, *conversation, *from, *to);
            }
            NodeEvent::HistoryDiverged { conversation, upto } => {
                record.push(23);
                record.extend_from_slice(&conversation.to_bytes());
                record.extend_from_slice(&upto.to_le_bytes());
                self.checker
                    .on_history_diverged(self.now, a, name, *conversation, *upto);
            }
            NodeEvent::Contacts { contacts, .. } => {
                record.push(28);
                for list in [
                    &contacts.contacts,
                    &contacts.incoming,
                    &contacts.outgoing,
                    &contacts.blocked,
                ] {
                    record.extend_from_slice(&(list.len() as u32).to_le_bytes());
                }
                record.push(u8::from(contacts.invisible));
            }
            NodeEvent::Presence { user, seen } => {
                record.push(29);
                record.extend_from_slice(&user.to_bytes());
                record.push(*seen as u8);
            }
            NodeEvent::ContactsRefused { code, .. } => {
                record.push(30);
                record.extend_from_slice(&(*code as u16).to_le_bytes());
            }
            NodeEvent::Refused { code, .. } => {
                record.push(6);
                record.extend_from_slice(&(*code as u16).to_le_bytes());
                if *code == sund_model::wire::payload::ErrorCode::RegistrationsLimited {
                    *self.faults.entry("registrations_limited").or_default() += 1;
                }
            }
            NodeEvent::Status(status) => {
                record.push(4);
                match status {
                    ConnectionStatus::Connected => record.push(0),
                    ConnectionStatus::Reconnecting { attempt } => {
                        record.push(1);
                        record.extend_from_slice(&attempt.to_le_bytes());
                    }
                    ConnectionStatus::Offline => record.push(2),
                }
            }
            NodeEvent::GroupChanged {
                conversation,
                seq,
                sender,
                msg_id,
                epoch,
                removed,
                ..
            } => {
                record.push(7);
                record.extend_from_slice(&conversation.to_bytes());
                record.extend_from_slice(&seq.to_le_bytes());
                record.extend_from_slice(&epoch.to_le_bytes());
                self.checker.on_commit_applied();
                self.checker.on_group_changed(*conversation, *seq, removed);
                self.checker
                    .on_delivered(self.now, a, name, *conversation, *seq, *sender, *msg_id);
            }
            NodeEvent::Joined {
                conversation, seq, ..
            } => {
                record.push(8);
                record.extend_from_slice(&conversation.to_bytes());
                record.extend_from_slice(&seq.to_le_bytes());
                self.checker.on_joined(a, *conversation, *seq);
            }
            NodeEvent::RemovedFrom { conversation, seq } => {
                self.checker
                    .on_removed(self.now, a, device, name, *conversation, *seq);
                record.push(9);
                record.extend_from_slice(&conversation.to_bytes());
                record.extend_from_slice(&seq.to_le_bytes());
            }
            NodeEvent::Undecryptable {
                conversation,
                seq,
                reason,
                ..
            } => {
                record.push(10);
                record.extend_from_slice(&conversation.to_bytes());
                record.extend_from_slice(&seq.to_le_bytes());
                self.checker
                    .on_undecryptable(self.now, a, name, *conversation, *seq, reason);
            }
            NodeEvent::ExternalSenderProposed {
                conversation,
                seq,
                msg_id,
            } => {
                record.push(33);
                record.extend_from_slice(&conversation.to_bytes());
                record.extend_from_slice(&seq.to_le_bytes());
                let sender = sund_model::gateway::sequencer::AUTHORITY_SENDER;
                self.checker
                    .on_delivered(self.now, a, name, *conversation, *seq, sender, *msg_id);
            }
            NodeEvent::RemovalProposed {
                conversation,
                seq,
                msg_id,
                device,
            } => {
                record.push(13);
                record.extend_from_slice(&conversation.to_bytes());
                record.extend_from_slice(&seq.to_le_bytes());
                record.extend_from_slice(&device.to_bytes());
                let sender = sund_model::gateway::sequencer::AUTHORITY_SENDER;
                self.checker
                    .on_delivered(self.now, a, name, *conversation, *seq, sender, *msg_id);
            }
            NodeEvent::Skipped {
                conversation,
                seq,
                sender,
                msg_id,
            } => {
                record.push(12);
                record.extend_from_slice(&conversation.to_bytes());
                record.extend_from_slice(&seq.to_le_bytes());
                self.checker.on_skipped();
                self.checker
                    .on_delivered(self.now, a, name, *conversation, *seq, *sender, *msg_id);
            }
            NodeEvent::GroupChangeRefused {
                conversation, code, ..
            } => {
                record.push(11);
                record.extend_from_slice(&conversation.to_bytes());
                record.extend_from_slice(&(*code as u16).to_le_bytes());
                if *code == sund_model::wire::payload::ErrorCode::UnknownUser {
                    self.retry_unknown_user(a, *conversation);
                }
            }
            NodeEvent::FileOffered {
                conversation,
                digest,
                ..
            }
            | NodeEvent::FileProgress {
                conversation,
                digest,
                ..
            }
            | NodeEvent::FileComplete {
                conversation,
                digest,
            }
            | NodeEvent::FileFailed {
                conversation,
                digest,
                ..
            } => {
                record.push(24);
                record.extend_from_slice(&conversation.to_bytes());
                record.extend_from_slice(&digest.0);
            }
            NodeEvent::FileSent {
                conversation,
                upload,
                ..
            }
            | NodeEvent::UploadProgress {
                conversation,
                upload,
                ..
            }
            | NodeEvent::FileSendFailed {
                conversation,
                upload,
                ..
            } => {
                record.push(25);
                record.extend_from_slice(&conversation.to_bytes());
                record.extend_from_slice(&upload.0);
            }
            NodeEvent::FileReceipt {
                conversation,
                digest,
                device,
                verified,
            } => {
                record.push(26);
                record.extend_from_slice(&conversation.to_bytes());
                record.extend_from_slice(&digest.0);
                record.extend_from_slice(&device.to_bytes());
                record.push(u8::from(*verified));
            }
            NodeEvent::Registered { serial } => {
                record.push(14);
                record.extend_from_slice(&serial.to_le_bytes());
                *self.faults.entry("registered").or_default() += 1;
                if self.scenario.invariants.contains(&Invariant::Limits) {
                    let address = self.address_of(a);
                    if let Some(detail) = self.limit_watch.registered(self.now, address) {
                        self.checker
                            .fail_safety(Invariant::Limits, self.now, detail);
                    }
                }
            }
            NodeEvent::CrlUpdated { version } => {
                record.push(15);
                record.extend_from_slice(&version.to_le_bytes());
                self.on_crl_taken(a, *version);
            }
            NodeEvent::PeerCrlUpdated { version, .. } => {
                record.push(34);
                record.extend_from_slice(&version.to_le_bytes());
            }
            NodeEvent::CrlRefused { .. } => record.push(16),
            NodeEvent::JoinWaiting { .. } => {
                // Its gateway has not met the certifying domain's yet: the Welcome comes again.
                record.push(32);
                *self.faults.entry("join-waiting").or_default() += 1;
            }
            NodeEvent::PeerRootsRefused { .. } => {
                // Every simulated gateway signs with its devices' own root: a refusal is a bug.
                record.push(31);
                *self.faults.entry("peer-roots-refused").or_default() += 1;
            }
            NodeEvent::Revoked => record.push(17),
            NodeEvent::Paired { voucher } => {
                record.push(18);
                record.extend_from_slice(&voucher.to_bytes());
            }
            NodeEvent::PairingReady { expires } => {
                record.push(19);
                record.extend_from_slice(&expires.to_le_bytes());
            }
            NodeEvent::PairingRefused { .. } => record.push(20),
            NodeEvent::GroupChangeDelayed {
                conversation, code, ..
            } => {
                // Another domain's gateway could not be asked for KeyPackages now: the device
                // asks again by itself.
                record.push(33);
                record.extend_from_slice(&conversation.to_bytes());
                record.extend_from_slice(&(*code as u16).to_le_bytes());
                *self.faults.entry("change-delayed").or_default() += 1;
            }
            NodeEvent::DeviceLinked { device } => {
                record.push(21);
                record.extend_from_slice(&device.to_bytes());
            }
        }
        self.trace.record(Record::AppEvent, self.now, a, &record);
        self.file_event(a, &event);
        self.note(|w| {
            let name = &w.actors[a as usize].name;
            match &event {
                // Bodies stay out of the log: their size says enough.
                NodeEvent::Delivered {
                    conversation,
                    seq,
                    body,
                    ..
                } => format!(
                    "{name} tells its application Delivered {conversation} seq {seq} ({} bytes)",
                    body.len()
                ),
                other => format!("{name} tells its application {other:?}"),
            }
        });
    }

    // ------------------------------------------------------------ events

    fn dispatch(&mut self, kind: EventKind) {
        match kind {
            EventKind::PlantedPanic => panic!("planted by a test"),
            EventKind::Arrive(arrival) => self.arrive(arrival, false),
            EventKind::LinkAccept { gateway, conn } => self.link_accept(gateway, conn),
            EventKind::LinkConnectDone {
                gateway,
                incarnation,
                peer,
                conn,
            } => self.link_connect_done(gateway, incarnation, peer, conn),
            EventKind::Accept { gateway, conn } => {
                if !self.actors[gateway as usize].up || !self.network.is_open(conn) {
                    return;
                }
                if self.drains.is_draining(gateway) {
                    self.refuse_while_draining(gateway, conn);
                    return;
                }
                self.on_accept(gateway, conn);
                self.trace
                    .record(Record::Connection, self.now, gateway, &conn.to_le_bytes());
                self.note(|w| format!("{} accepts conn {conn}", w.actors[gateway as usize].name));
                let source = self
                    .network
                    .peer_of(conn, gateway)
                    .map(|node| SourceAddress::of(core::net::IpAddr::V4(self.address_of(node))));
                self.with_gateway(gateway, |g, now| match source {
                    Some(source) => {
                        g.handle(now, GatewayInput::AcceptedFrom(ConnectionId(conn), source))
                    }
                    None => g.handle(now, GatewayInput::Accepted(ConnectionId(conn))),
                });
            }
            EventKind::ConnectDone {
                node,
                incarnation,
                conn,
            } => {
                let actor = &self.actors[node as usize];
                if !actor.up || actor.incarnation != incarnation {
                    return;
                }
                self.actors[node as usize].connecting = None;
                let input = match conn {
                    Some(c) if self.network.is_open(c) => NodeInput::Connected(ConnectionId(c)),
                    _ => NodeInput::ConnectFailed,
                };
                self.trace.record(
                    Record::Connection,
                    self.now,
                    node,
                    &conn.unwrap_or(0).to_le_bytes(),
                );
                self.note(|w| match conn {
                    Some(c) => format!("{} connected on conn {c}", w.actors[node as usize].name),
                    None => format!(
                        "{}'s connection attempt failed",
                        w.actors[node as usize].name
                    ),
                });
                self.with_node(node, |n, now| n.handle(now, input));
            }
            EventKind::Closed {
                actor,
                incarnation,
                conn,
            } => {
                let a = &self.actors[actor as usize];
                if !a.up || a.incarnation != incarnation {
                    return;
                }
                self.trace
                    .record(Record::Connection, self.now, actor, &conn.to_le_bytes());
                self.note(|w| {
                    format!("{} hears conn {conn} closed", w.actors[actor as usize].name)
                });
                let c = ConnectionId(conn);
                if self.is_gateway(actor) && self.is_federation_conn(conn) {
                    self.with_gateway(actor, |g, now| {
                        g.handle(now, GatewayInput::Federation(FederationInput::Closed(c)))
                    });
                } else if self.is_gateway(actor) {
                    self.with_gateway(actor, |g, now| g.handle(now, GatewayInput::Closed(c)));
                } else {
                    self.with_node(actor, |n, now| n.handle(now, NodeInput::Closed(c)));
                }
            }
            EventKind::Wake { actor, incarnation } => {
                let a = &mut self.actors[actor as usize];
                if !a.up || a.incarnation != incarnation || a.wake_at != Some(self.now) {
                    return;
                }
                a.wake_at = None;
                self.trace.record(Record::Timer, self.now, actor, &[]);
                if self.is_gateway(actor) {
                    self.with_gateway(actor, |g, now| g.handle_timeout(now));
                } else {
                    self.with_node(actor, |n, now| n.handle_timeout(now));
                }
            }
            EventKind::CommitDone { actor, incarnation } => {
                if !self.actors[actor as usize].up
                    || self.actors[actor as usize].incarnation != incarnation
                    || self.actors[actor as usize].disk_stalled
                {
                    return; // a stalled disk completes what waits when it resumes
                }
                while let Some(front) = self.actors[actor as usize].pending.front() {
                    if front.done_at > self.now {
                        break;
                    }
                    let p = self.actors[actor as usize]
                        .pending
                        .pop_front()
                        .expect("front exists");
                    self.commit_and_release(actor, p.writes, p.held);
                }
                self.finish_drain_if_done(actor);
            }
            EventKind::Action { index, nominal } => self.run_action(index, nominal),
            EventKind::Send { workload, device } => self.workload_send(workload, device),
            EventKind::CreateGroup { conversation } => self.create_group(conversation),
            EventKind::EndOfWorkload => self.begin_liveness(),
            EventKind::Probe => self.probe(),
            EventKind::GracefulClose {
                gateway,
                incarnation,
                conn,
            } => self.graceful_close(gateway, incarnation, conn),
            EventKind::DrainTimeout {
                gateway,
                incarnation,
            } => self.drain_timeout(gateway, incarnation),
            EventKind::ResumeReading { conn } => self.resume_reading(conn),
        }
    }

    /// A frame or chunk stream arriving at an actor.
    /// `held`: it had arrived at a gateway that was not reading the connection (a read pause),
    /// so a link cut since does not lose it.
    fn arrive(&mut self, arrival: Arrival, held: bool) {
        let to = arrival.to;
        if !self.actors[to as usize].up || !self.network.is_open(arrival.conn) {
            return;
        }
        let from = self.network.peer_of(arrival.conn, to).unwrap_or(to);
        if !held && self.network.drops(from, to) {
            return; // in flight when the link was cut
        }
        let arrival = if self.is_gateway(to) && !arrival.frame.starts_with(b"SCHK") {
            let Some(arrival) = self.hold_if_paused(arrival) else {
                return; // read when the pause ends
            };
            arrival
        } else {
            arrival
        };
        self.read_arrival(arrival, from);
    }

    /// A frame or chunk stream read by its receiver.
    fn read_arrival(&mut self, arrival: Arrival, from: ActorIndex) {
        let to = arrival.to;
        let mut data = Vec::with_capacity(8 + arrival.frame.len());
        data.extend_from_slice(&arrival.conn.to_le_bytes());
        data.extend_from_slice(&arrival.frame);
        self.trace.record(Record::Frame, self.now, to, &data);
        self.note(|w| {
            format!(
                "{} <- {} conn {}: {}",
                w.actors[to as usize].name,
                w.actors[from as usize].name,
                arrival.conn,
                w.describe(&arrival.frame)
            )
        });
        let conn = ConnectionId(arrival.conn);
        let frame = arrival.frame;
        if frame.starts_with(b"SCHK") {
            self.chunk_arrived(to, conn, &frame);
        } else if self.is_gateway(to) && self.is_federation_conn(conn.0) {
            let commits = self.relayed_commits_arriving(to, &frame);
            self.with_gateway(to, |g, now| {
                g.handle(
                    now,
                    GatewayInput::Federation(FederationInput::Frame(conn, frame)),
                )
            });
            for commit in commits {
                self.check_invitations(to, commit);
            }
        } else if self.is_gateway(to) {
            let commit = self.commit_arriving(to, conn.0, &frame);
            self.with_gateway(to, |g, now| g.handle(now, GatewayInput::Frame(conn, frame)));
            if let Some(commit) = commit {
                self.check_invitations(to, commit);
            }
        } else {
            self.with_node(to, |n, now| n.handle(now, NodeInput::Frame(conn, frame)));
        }
    }

    fn is_gateway(&self, a: ActorIndex) -> bool {
        matches!(self.actors[a as usize].machine, Machine::Gateway(..))
    }

    fn workload_send(&mut self, index: usize, device: ActorIndex) {
        if self.healing {
            return;
        }
        let w = &self.scenario.workloads[index];
        let period = us(w.period);
        let stop = us(w.stop).min(self.duration_us);
        let size = w.size;
        let conv_index = self.conversation_ids[&w.conversation];
        let conv = self.conversations[conv_index].id;
        let member = self.sends_to(conv_index, device);
        if self.actors[device as usize].up && member {
            self.sent_counter += 1;
            let mut body = format!("m{}:{}:", device, self.sent_counter).into_bytes();
            let mut fill = vec![0u8; size.saturating_sub(body.len())];
            sund_model::env::Entropy::fill_bytes(&mut self.workload_rng, &mut fill);
            body.extend_from_slice(&fill);
            body.truncate(size.max(1));
            let mut sent = None;
            self.with_node(device, |n, now| {
                sent = n.send(now, conv, Bytes::from(body)).ok();
            });
            if let Some(msg_id) = sent {
                self.offered += 1;
                let id = self.actors[device as usize].device;
                self.checker.on_sent(conv, id, msg_id);
            }
        }
        let next = self.now + period;
        if next < stop {
            self.push(
                next,
                EventKind::Send {
                    workload: index,
                    device,
                },
            );
        }
    }

    /// A random delay below the timing's jitter, from the fault stream.
    fn jitter(&mut self, timing: &Timing) -> u64 {
        match timing {
            Timing::Every { jitter, .. } if !jitter.is_zero() => {
                self.fault_rng.range_inclusive(0, us(*jitter) - 1)
            }
            _ => 0,
        }
    }

    fn run_action(&mut self, index: usize, nominal: u64) {
        if self.healing {
            return;
        }
        let scheduled = self.scenario.schedule[index].clone();
        // The action is named by its place in the schedule (the scenario file fixes its
        // content) and its keyword: explicit bytes, whatever its Debug form says.
        let mut record = (index as u32).to_le_bytes().to_vec();
        record.extend_from_slice(scheduled.action.keyword().as_bytes());
        self.trace
            .record(Record::Fault, self.now, u32::MAX, &record);
        self.note(|_| format!("fault/action: {:?}", scheduled.action));
        *self.faults.entry(scheduled.action.keyword()).or_default() += 1;
        self.apply(&scheduled.action);
        if let Timing::Every { period, stop, .. } = scheduled.timing {
            let next = nominal + us(period);
            if next < us(stop).min(self.duration_us) {
                let actual = next + self.jitter(&scheduled.timing);
                self.push(
                    actual,
                    EventKind::Action {
                        index,
                        nominal: next,
                    },
                );
            }
        }
    }

    fn pairs(&mut self, a: &Target, b: &Target) -> Vec<(ActorIndex, ActorIndex)> {
        let xs = self.resolve(a);
        let ys = self.resolve(b);
        let mut out = Vec::new();
        for &x in &xs {
            for &y in &ys {
                if x != y {
                    out.push((x, y));
                }
            }
        }
        out
    }

    fn apply(&mut self, action: &Action) {
        match action {
            Action::Partition(a, b) => {
                for (x, y) in self.pairs(a, b) {
                    self.network.partition(x, y);
                }
            }
            Action::Heal(a, b) => {
                for (x, y) in self.pairs(a, b) {
                    self.network.heal(x, y);
                }
            }
            Action::HealAll => self.heal_all(),
            Action::Isolate(t) => {
                for x in self.resolve(t) {
                    self.network.isolate(x);
                }
            }
            Action::Rejoin(t) => {
                for x in self.resolve(t) {
                    self.network.rejoin(x);
                }
            }
            Action::Hold(a, b) => {
                for (x, y) in self.pairs(a, b) {
                    self.network.hold(x, y);
                }
            }
            Action::Release(a, b) => {
                for (x, y) in self.pairs(a, b) {
                    for (at, arrival) in self.network.release(self.now, x, y) {
                        self.push(at, EventKind::Arrive(arrival));
                    }
                }
            }
            Action::Disconnect(t) => {
                for x in self.resolve(t) {
                    for conn in self.network.connections_of(x) {
                        // A reset: both ends hear of it.
                        let incarnation = self.actors[x as usize].incarnation;
                        self.push(
                            self.now,
                            EventKind::Closed {
                                actor: x,
                                incarnation,
                                conn,
                            },
                        );
                        self.close(x, conn);
                    }
                }
                self.network.collect_closed();
            }
            Action::Crash(t) => {
                for x in self.resolve(t) {
                    self.crash_actor(x);
                }
            }
            Action::Restart(t) => {
                for x in self.resolve(t) {
                    if !self.actors[x as usize].up {
                        self.start_actor(x);
                    } else if self.drains.is_draining(x) {
                        self.drains.restart_when_stopped(x);
                    }
                }
            }
            Action::Drain(t) => {
                for x in self.resolve(t) {
                    if self.is_gateway(x) {
                        self.drain_action(x);
                    }
                }
            }
            Action::Network(patch) => {
                let p = patch.apply(self.network.default_profile());
                self.network.set_default_profile(p);
            }
            Action::Link(a, b, patch) => {
                for (x, y) in self.pairs(a, b) {
                    let p = patch.apply(self.network.profile(x, y));
                    self.network.set_pair_profile(x, y, p);
                }
            }
            Action::Commit(conv, who, kind) => self.commit_action(conv, who, kind.clone()),
            Action::SendFile {
                conversation,
                from,
                size,
                name,
                like,
            } => self.send_file_action(conversation, from, *size, name, like.as_deref()),
            Action::Block(a, b) => {
                for x in self.resolve(a) {
                    for y in self.resolve(b) {
                        self.network.block(x, y);
                    }
                }
            }
            Action::Unblock(a, b) => {
                for x in self.resolve(a) {
                    for y in self.resolve(b) {
                        self.network.unblock(x, y);
                    }
                }
            }
            Action::StallDisk(t) => {
                for x in self.resolve(t) {
                    self.actors[x as usize].disk_stalled = true;
                }
            }
            Action::ResumeDisk(t) => {
                for x in self.resolve(t) {
                    self.resume_disk(x);
                }
            }
            Action::FillDisk(t) => {
                for x in self.resolve(t) {
                    self.actors[x as usize].disk_full = true;
                }
            }
            Action::FreeDisk(t) => {
                for x in self.resolve(t) {
                    self.free_disk(x);
                }
            }
            Action::LieDisk(t) => {
                for x in self.resolve(t) {
                    let actor = &mut self.actors[x as usize];
                    if actor.durable_while_lying.is_none() {
                        actor.durable_while_lying = Some(actor.disk.clone());
                    }
                }
            }
            Action::HonestDisk(t) => {
                for x in self.resolve(t) {
                    self.actors[x as usize].durable_while_lying = None;
                }
            }
            Action::ClockJump(t, jump) => {
                for x in self.resolve(t) {
                    self.actors[x as usize].pending_jump_us += jump;
                }
            }
            Action::Drift(t, ppm) => {
                for x in self.resolve(t) {
                    let now = self.now;
                    let a = &mut self.actors[x as usize];
                    // Fold what the old rate added into the offset: the clock stays continuous.
                    a.skew_us += drift_us(a.drift_ppm, now.saturating_sub(a.drift_since_us));
                    a.drift_since_us = now;
                    a.drift_ppm = *ppm;
                }
            }
            Action::Revoke(t) => self.revoke_action(t),
            Action::Contact(from, to, action) => {
                let users = self.users_with_domains(to);
                for d in self.resolve(from) {
                    let own = self.federation.domain(self.actors[d as usize].home);
                    for (user, domain) in &users {
                        // A user of another domain is named with it, as `sund` does.
                        let abroad = domain.clone().filter(|_| *domain != own);
                        self.with_node(d, |n, now| {
                            n.change_contact_abroad(now, *user, abroad, *action);
                        });
                    }
                }
            }
            Action::Invisible(t, on) => {
                for d in self.resolve(t) {
                    self.with_node(d, |n, now| {
                        n.set_invisible(now, *on);
                    });
                }
            }
            Action::Watch(from, to) => {
                let users = self.users_of(to);
                for d in self.resolve(from) {
                    let users = users.clone();
                    self.with_node(d, |n, now| n.watch(now, users));
                }
            }
            Action::Handover(conversation, to) => self.handover_action(conversation, to),
            Action::Relay(from, to) => {
                let from = self.resolve(&Target::Gateway(from.clone()));
                let to = self.resolve(&Target::Gateway(to.clone()));
                if let (Some(&from), Some(&to)) = (from.first(), to.first()) {
                    self.relay(from, to);
                }
            }
        }
    }

    /// The distinct users of a target's devices, in id order.
    /// [`World::users_of`], each with its home gateway's domain (`None` for a gateway that
    /// federates with no one).
    fn users_with_domains(
        &mut self,
        target: &Target,
    ) -> Vec<(sund_model::ids::UserId, Option<String>)> {
        let mut users: Vec<(sund_model::ids::UserId, Option<String>)> = self
            .resolve(target)
            .into_iter()
            .filter_map(|d| match &self.actors[d as usize].machine {
                Machine::Node(_, config) => Some((
                    config.certificate_user(),
                    self.federation.domain(self.actors[d as usize].home),
                )),
                Machine::Gateway(..) => None,
            })
            .collect();
        users.sort_unstable();
        users.dedup();
        users
    }

    fn users_of(&mut self, target: &Target) -> Vec<sund_model::ids::UserId> {
        let mut users: Vec<sund_model::ids::UserId> = self
            .resolve(target)
            .into_iter()
            .filter_map(|d| match &self.actors[d as usize].machine {
                Machine::Node(_, config) => Some(config.certificate_user()),
                Machine::Gateway(..) => None,
            })
            .collect();
        users.sort_unstable();
        users.dedup();
        users
    }

    fn heal_all(&mut self) {
        self.network.heal_all();
        for a in 0..self.actors.len() as ActorIndex {
            self.resume_disk(a);
            self.free_disk(a);
            // A lying disk's cache is flushed: what was committed is durable from now on.
            self.actors[a as usize].durable_while_lying = None;
        }
        for (x, y) in self.network.held_pairs() {
            for (at, arrival) in self.network.release(self.now, x, y) {
                self.push(at, EventKind::Arrive(arrival));
            }
        }
        for a in 0..self.actors.len() as ActorIndex {
            if !self.actors[a as usize].up {
                self.start_actor(a);
            }
        }
    }

    fn begin_liveness(&mut self) {
        if !self.scenario.invariants.contains(&Invariant::Converge) {
            self.outcome = Some(Outcome::Passed);
            return;
        }
        self.healing = true;
        self.trace.record(
            Record::Fault,
            self.now,
            u32::MAX,
            b"heal all (liveness phase)",
        );
        self.heal_all();
        for &d in &self.devices {
            if let Machine::Node(Some(n), _) = &self.actors[d as usize].machine {
                self.outbox_at_heal.insert(d, n.outbox_len());
            }
        }
        self.push(self.now + PROBE_INTERVAL_US, EventKind::Probe);
    }

    /// Why the system has not converged yet, or `None` if it has.
    fn not_converged(&self) -> Option<String> {
        for c in &self.conversations {
            let (conv, gateway) = (&c.id, &c.gateway);
            let Machine::Gateway(Some(g), _) = &self.actors[*gateway as usize].machine else {
                return Some(format!("{} is down", self.actors[*gateway as usize].name));
            };
            if c.kind.is_some() {
                if let Some(why) = self.group_not_converged(c, g) {
                    return Some(why);
                }
                continue;
            }
            let members = &c.members;
            let head = g.conversation_head(*conv).unwrap_or(0);
            if let Some((_, seq)) = self
                .checker
                .accepted()
                .find(|(c, s)| c == conv && *s > head)
            {
                return Some(format!(
                    "{conv}: seq {seq} was acknowledged but the head is {head}"
                ));
            }
            for &m in members {
                if self.is_revoked(m) {
                    continue; // it will never read again
                }
                let upto = self.checker.delivered_upto(m, *conv);
                if upto != head {
                    return Some(format!(
                        "{} has delivered {conv} up to seq {upto} of {head}",
                        self.actors[m as usize].name
                    ));
                }
                // A divergence notice on its way is heard before the run can end (the
                // silent-fork check then counts it as told).
                if g.divergence_waiting(self.actors[m as usize].device, *conv) {
                    return Some(format!(
                        "{} has not acknowledged the notice that its history of {conv} diverged",
                        self.actors[m as usize].name
                    ));
                }
            }
        }
        for &d in &self.devices {
            if self.is_revoked(d) {
                continue;
            }
            if let Machine::Node(Some(n), _) = &self.actors[d as usize].machine {
                let left = n.outbox_len();
                if left > 0 {
                    let progress = match self.outbox_at_heal.get(&d) {
                        Some(&at_heal) if left < at_heal => {
                            format!(
                                " ({} acknowledged since heal: still draining)",
                                at_heal - left
                            )
                        }
                        Some(_) => " (none acknowledged since heal: stalled)".to_string(),
                        None => String::new(),
                    };
                    return Some(format!(
                        "{} still has {left} unacknowledged messages in its outbox{progress}",
                        self.actors[d as usize].name,
                    ));
                }
            }
        }
        self.crl_not_converged()
            .or_else(|| self.files_not_converged())
            .or_else(|| self.presence_not_converged())
            .or_else(|| self.contacts_not_converged())
            .or_else(|| self.federation_not_converged())
    }

    /// The run's end: a device holding a message the gateway lost, at a seq that now holds
    /// another, must have been told (the checker can only know once every device is back).
    fn silent_fork(&self) -> Option<Violation> {
        let name = |a: ActorIndex| self.actors[a as usize].name.clone();
        let fork = self.checker.silent_fork(&name).map(|detail| Violation {
            invariant: Invariant::NoLoss,
            phase: Phase::Safety,
            at_us: self.now,
            detail,
        });
        let fork = fork.filter(|_| self.scenario.invariants.contains(&Invariant::NoLoss));
        fork.or_else(|| {
            self.federation_lost().map(|detail| Violation {
                invariant: Invariant::FederationLinks,
                phase: Phase::Safety,
                at_us: self.now,
                detail,
            })
        })
        .or_else(|| {
            self.seq_assigned_twice().map(|detail| Violation {
                invariant: Invariant::SingleAuthority,
                phase: Phase::Safety,
                at_us: self.now,
                detail,
            })
        })
    }

    fn probe(&mut self) {
        match self.not_converged() {
            None => {
                self.recovered_at = Some(self.now);
                self.outcome = Some(match self.silent_fork() {
                    Some(v) => Outcome::Safety(v),
                    None => Outcome::Passed,
                });
            }
            Some(why) => {
                if self.now + PROBE_INTERVAL_US > self.end_us {
                    let bound = self.scenario.liveness;
                    self.checker.fail_liveness(
                        self.now,
                        format!("not converged {bound:?} after heal: {why}"),
                    );
                } else {
                    self.push(self.now + PROBE_INTERVAL_US, EventKind::Probe);
                }
            }
        }
    }

    /// Test support: the run panics at `at_us`, as a bug in an actor would, to show that a
    /// panic is reported as a failure of that run rather than the end of the process.
    pub fn plant_panic(&mut self, at_us: u64) {
        self.push(at_us, EventKind::PlantedPanic);
    }

    /// Keeps the newest `lines` events in words, reported in [`RunReport::event_log`]
    /// (`cargo sim --trace`). Changes nothing else about the run, its hash included.
    pub fn keep_event_log(&mut self, lines: usize) {
        self.event_log = Some(EventLog::new(lines));
    }

    /// Calls `report` with the virtual time (µs) and the events so far every `every` events
    /// (at least one), so that a run of an hour shows how far it got (`cargo sim --progress`,
    /// every [`PROGRESS_EVENTS`]). Changes nothing about the run, its hash included.
    pub fn report_progress(&mut self, every: u64, report: impl FnMut(u64, u64) + 'static) {
        self.progress = Some((every.max(1), Box::new(report)));
    }

    /// Adds a line to the event log, if one is kept (the text is made only then).
    fn note(&mut self, what: impl FnOnce(&World) -> String) {
        if self.event_log.is_some() {
            let line = format!("{:>11.6}s {}", self.now as f64 / 1e6, what(self));
            if let Some(log) = &mut self.event_log {
                log.push(line);
            }
        }
    }

    /// A frame in words, senders by actor name.
    fn describe(&self, frame: &[u8]) -> String {
        describe_frame(frame, &|d| {
            self.actors
                .iter()
                .find(|a| a.device == d && matches!(a.machine, Machine::Node(..)))
                .map(|a| a.name.clone())
        })
    }

    /// Runs to the end and reports. A panic inside any actor (or a batch the simulated disk
    /// refuses) ends the run as a `no-panic` failure at the time it happened, so that it is
    /// reported with its seed and replay line like any other, and a sweep goes on.
    pub fn run(mut self) -> RunReport {
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_events()));
        if let Err(panic) = ran {
            // The world may be half-way through an event: only the clock, the counters and
            // the trace so far are read from here on.
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            self.trace
                .record(Record::Panic, self.now, 0, what.as_bytes());
            self.outcome = Some(Outcome::Safety(Violation {
                invariant: Invariant::NoPanic,
                phase: Phase::Safety,
                at_us: self.now,
                detail: format!(
                    "panicked at event {} (the panic's location is printed above): {what}",
                    self.events
                ),
            }));
        }
        self.report()
    }

    fn run_events(&mut self) {
        while self.outcome.is_none() {
            let Some((at, kind)) = self.queue.pop() else {
                // Nothing left to do: converged or stuck; let the probe logic decide.
                self.probe_final();
                break;
            };
            debug_assert!(at >= self.now, "time never goes backwards");
            self.now = at;
            self.events += 1;
            if let Some((every, report)) = &mut self.progress {
                if self.events % *every == 0 {
                    report(self.now, self.events);
                }
            }
            self.dispatch(kind);
            if let Some(v) = self.checker.violation() {
                self.outcome = Some(match v.phase {
                    Phase::Liveness => Outcome::Liveness(v.clone()),
                    Phase::Safety => Outcome::Safety(v.clone()),
                });
            }
            if self.events >= EVENTS_MAX {
                self.checker
                    .fail_liveness(self.now, format!("event budget of {EVENTS_MAX} exhausted"));
                self.outcome = self.checker.violation().cloned().map(Outcome::Liveness);
            }
        }
    }

    fn report(self) -> RunReport {
        let trace_hash = self.trace.hex();
        let crl = self.crl_report();
        let files = self.files_report();
        let drains = self.drain_reports();
        let spanning = self.spanning_report();
        let handovers = self.handover_report();
        RunReport {
            spanning,
            handovers,
            files,
            drains,
            scenario: self.scenario.name.clone(),
            file: self.scenario.file.clone(),
            seed: self.seed,
            trace_hash,
            events: self.events,
            sim_time_ms: self.now / 1000,
            outcome: self.outcome.unwrap_or(Outcome::Passed),
            app: self.checker.stats().clone(),
            net: self.network.stats().clone(),
            faults: self.faults,
            offered: self.offered,
            lost_uncommitted: self.lost_uncommitted,
            crl,
            event_log: self.event_log.map(EventLog::into_lines).unwrap_or_default(),
            recovery_ms: self
                .recovered_at
                .map(|t| t.saturating_sub(self.duration_us) / 1000),
        }
    }

    fn probe_final(&mut self) {
        self.outcome = Some(match self.not_converged() {
            None => match self.silent_fork() {
                Some(v) => Outcome::Safety(v),
                None => Outcome::Passed,
            },
            Some(why) => Outcome::Liveness(Violation {
                invariant: Invariant::Converge,
                phase: Phase::Liveness,
                at_us: self.now,
                detail: format!("no events left and not converged: {why}"),
            }),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world() -> World {
        let text = "duration 1s\ngateway gw\nuser a\nconversation c members a\n";
        World::new(crate::scenario::parse("t.sund", text).unwrap(), 1).unwrap()
    }

    /// A wake-up is scheduled at the first virtual time the actor's own clock reaches its
    /// deadline, whatever the clock's offset and rate.
    #[test]
    fn a_drifting_clock_wakes_at_the_first_moment_it_reads_its_deadline() {
        let mut w = world();
        let a = w.devices[0];
        for (ppm, skew) in [
            (50_000, 0),
            (-30_000, 2_000_000),
            (1, -500_000),
            (-100_000, 0),
        ] {
            w.actors[a as usize].drift_ppm = ppm;
            w.actors[a as usize].skew_us = skew;
            w.actors[a as usize].drift_since_us = 1_000;
            w.now = 5_000;
            for deadline in [3_000_000u64, 7_777_777, 60_000_001] {
                let at = w.virtual_at(a, deadline);
                assert!(w.local_at(a, at) >= deadline, "{ppm} ppm: late enough");
                assert!(
                    at == w.now || w.local_at(a, at - 1) < deadline,
                    "{ppm} ppm: not later than needed"
                );
            }
            // The clock runs at its rate.
            let elapsed = w.local_at(a, 3_001_000) - w.local_at(a, 2_001_000);
            assert_eq!(elapsed as i64, 1_000_000 + ppm);
        }
    }

    #[test]
    fn a_clock_jump_shows_only_when_the_process_next_starts() {
        let mut w = world();
        let a = w.devices[0];
        w.now = 10_000_000;
        let before = w.local_now(a).0;
        w.apply(&Action::ClockJump(
            Target::Device("a".into(), 0),
            -3_000_000,
        ));
        assert_eq!(w.local_now(a).0, before, "a running process keeps its time");
        w.crash_actor(a);
        w.start_actor(a);
        assert_eq!(w.local_now(a).0 as i64, before as i64 - 3_000_000);
    }
}
