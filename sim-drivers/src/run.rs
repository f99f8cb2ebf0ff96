//! One run of a [`Plan`] on the production drivers under turmoil.
//!
//! Every gateway and every device are turmoil hosts running the real `sund-gateway` and
//! `sund-node` drivers (tokio, quinn, rustls, redb on a [`SimulatedDisk`]). Gateways that
//! federate listen for each other on a second port and link over real QUIC, as on loopback;
//! `handover` goes to the conversation's authority as `sund-gateway admin handover` does, and
//! `single-authority` is checked on what each running gateway's machine says it sequences,
//! read every millisecond. Each device's
//! host is also its application: it sends on the scenario's schedule and takes what it is
//! delivered, and reports both to the same invariant checker the model layer uses. The control
//! loop steps turmoil one millisecond at a time and carries out the scenario's faults between
//! steps: crash and restart (turmoil `crash` and `bounce`; a crash cuts the host's power first,
//! so redb's unsynced writes survive only in part and its clean close never runs), partitions,
//! one-way cuts, holds,
//! and disconnects (the node's own reconnect). After the safety phase it heals everything and
//! probes every 100 ms until every member has everything acknowledged, as the model layer does.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::Digest;
use sund_gateway::driver::{self as gateway_driver, AdminClient, GatewayOptions};
use sund_gateway::federation::FederationOptions;
use sund_model::federation::handshake::PeerConfig;
use sund_model::gateway::{AdminAnswer, AdminCommand, Gateway, GatewayConfig};
use sund_model::ids::{ConversationId, DeviceId, MsgId};
use sund_model::node::{ConnectionStatus, NodeEvent};
use sund_model::time::Instant;
use sund_model::trust::EnrolmentToken;
use sund_node::driver::{self as node_driver, NodeHandle, NodeOptions};
use sund_runtime::entropy::SeededEntropy;
use sund_runtime::environment::Simulated;
use sund_runtime::sim_disk::SimulatedDisk;
use sund_runtime::store::RedbStore;
use sund_runtime::tls::{certificate_pin, TlsIdentity};
use sund_runtime::turmoil::{
    DatagramFaults, PacketTrace, PacketTraceSummary, SocketFaults, TurmoilUdp,
};
use sund_sim::checker::{Checker, Phase, Violation};
use sund_sim::network::LinkProfile;
use sund_sim::scenario::{Action, Invariant, Scenario, Target, Timing};

use crate::plan::{link_pairs, resolve, talking_pairs, Plan};

/// The gateways' UDP port for devices.
const PORT: u16 = 4433;
/// The gateways' UDP port for each other (federation links).
const FEDERATION_PORT: u16 = 4434;
/// Model clocks read this at the start of a run (a simulation never reads the real time).
const EPOCH: Instant = Instant(1_700_000_000_000_000);
/// One turmoil step.
const TICK: Duration = Duration::from_millis(1);
/// How often the liveness phase asks whether the run has converged.
const PROBE: Duration = Duration::from_millis(100);
/// How often a device's application looks at its schedule.
const APP_TICK: Duration = Duration::from_millis(5);

/// What one run did.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// The first broken invariant, if any.
    pub violation: Option<Violation>,
    /// SHA-256 over every datagram (the packet trace) and every application event, in order.
    pub trace_hash: [u8; 32],
    /// The datagrams.
    pub packets: PacketTraceSummary,
    /// Simulated time when the run ended.
    pub sim_time: Duration,
    /// Time from the heal to convergence (liveness phase), if it converged.
    pub recovery: Option<Duration>,
    /// Application sends the nodes took.
    pub offered: u64,
    /// Acknowledgements the applications heard.
    pub accepted: u64,
    /// Deliveries the applications heard (replays after a restart included).
    pub delivered: u64,
    /// Deliveries heard again after a device restarted (not yet durably taken before).
    pub replayed: u64,
    /// Sends a node refused at once (its outbox full).
    pub refused: u64,
    /// Reconnect attempts the nodes reported.
    pub reconnects: u64,
    /// Host starts after the first (restarts after crashes).
    pub restarts: u64,
    /// `handover` actions: how they went.
    pub handovers: HandoverCounts,
}

/// What became of the scenario's `handover` actions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandoverCounts {
    /// Asked of the gateway that sequenced the conversation then.
    pub asked: u64,
    /// Not asked: no running gateway sequenced the conversation then (it was being handed
    /// over, or its authority was down), as an operator would be told.
    pub skipped: u64,
    /// Begun: the authority froze the conversation and sent it to the new one.
    pub started: u64,
    /// Refused by the authority (a link down, a member gateway behind, homed there already).
    pub refused: u64,
}

impl RunReport {
    /// The trace hash as `cargo sim` prints it: the first 128 bits in hex.
    pub fn short_hash(&self) -> String {
        self.trace_hash[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// Everything the hosts and the control loop share (turmoil runs every host on this thread).
struct Shared {
    checker: Checker,
    /// Past the safety phase: applications stop sending.
    liveness: bool,
    /// Per send plan: when its next send is due.
    next_send: Vec<Duration>,
    /// How many sends each device made (numbers its bodies).
    made: Vec<u64>,
    /// SHA-256 of every sent body, to check what is delivered is what was sent.
    bodies: BTreeMap<(DeviceId, MsgId), [u8; 32]>,
    /// Bodies of sends whose outcome the application never learned: the node stopped (its disk
    /// filled) before the message was saved, and it may have left already (a node sends before
    /// its outbox commit completes). Their delivery is allowed, not required.
    unknown_outcome: BTreeSet<[u8; 32]>,
    /// Sends not yet acknowledged to their device.
    unacknowledged: BTreeSet<(ConversationId, DeviceId, MsgId)>,
    /// Device and conversation pairs whose next delivery may replay (the device restarted).
    may_replay: BTreeSet<(usize, ConversationId)>,
    /// Host starts so far, per device.
    starts: Vec<u32>,
    /// Host starts so far, per gateway.
    gateway_starts: Vec<u32>,
    /// Per gateway: the conversations its machine sequenced at its last reading (none while
    /// it is down), for `single-authority` and to find where a `handover` goes.
    sequencing: Vec<BTreeSet<ConversationId>>,
    /// Per gateway: admin commands waiting for its host to carry them out.
    admin_queue: Vec<Vec<AdminCommand>>,
    /// Per gateway: the conversations it has heard of (its own, and those another gateway
    /// shared with it once the share arrived). With several gateways a device sends into a
    /// conversation only once its gateway has it, as a user learns of one only from there;
    /// before, its gateway would rightly answer that it knows no such conversation.
    known: Vec<BTreeSet<ConversationId>>,
    /// Disconnects asked for and not yet carried out, per device.
    disconnects: Vec<u32>,
    /// SHA-256 over the application events.
    events: sha2::Sha256,
    /// The link profile of every link (a device with its gateway, two federated gateways)
    /// that no `link` changed.
    default_profile: LinkProfile,
    /// Links a `link` statement or action changed, by pair of hosts (in order).
    link_profiles: BTreeMap<(String, String), LinkProfile>,
    /// Hosts whose driver stopped because their disk is full; `free-disk` starts them again.
    stopped: BTreeSet<String>,
    /// Each device's last connection status, in words (for a liveness failure's detail).
    status: Vec<String>,
    /// Each host's clock offset (µs; `skew`, and `clock` jumps, read when the host starts).
    clock_offsets: BTreeMap<String, i64>,
    report: RunReport,
}

fn now_us() -> u64 {
    turmoil::sim_elapsed().unwrap_or_default().as_micros() as u64
}

fn hash_body(body: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(body).into()
}

/// A 32-byte seed for one use, from the run's seed.
fn stream_seed(seed: u64, label: &str, n: u64) -> [u8; 32] {
    sha2::Sha256::new()
        .chain_update(b"sund/sim-drivers/stream/")
        .chain_update(label.as_bytes())
        .chain_update(seed.to_le_bytes())
        .chain_update(n.to_le_bytes())
        .finalize()
        .into()
}

fn seed_u64(seed: [u8; 32]) -> u64 {
    u64::from_le_bytes(seed[..8].try_into().expect("8 bytes"))
}

/// What is fixed for a run: the plan, the seed, where the data lives.
struct World {
    plan: Plan,
    seed: u64,
    root: PathBuf,
    /// Each gateway's TLS certificate pin, which its devices check.
    pins: Vec<[u8; 32]>,
    /// Each gateway's configuration: the plan's, with its domain and federation peers.
    configs: Vec<GatewayConfig>,
    /// Each device's enrolment token, from its home gateway.
    tokens: Vec<EnrolmentToken>,
    /// What each host's sockets do to the datagrams they send, per destination (a gateway's
    /// two sockets share one: they send to different hosts).
    faults: BTreeMap<String, SocketFaults>,
    /// Each host's disk (`fill-disk`, `free-disk`), by host name.
    disks: BTreeMap<String, SimulatedDisk>,
    packets: PacketTrace,
    shared: RefCell<Shared>,
    /// `drain`, per gateway: wakes its running host, which shuts its driver down as SIGTERM
    /// does.
    drain: Vec<tokio::sync::Notify>,
}

/// The seed of one gateway's TLS identity or first entropy: the first gateway keeps the
/// numbers a single-gateway run always had.
fn gateway_seed(base: u8, gateway: usize) -> [u8; 32] {
    let mut seed = [base; 32];
    seed[0] = seed[0].wrapping_add(gateway as u8);
    seed
}

/// The conversations each gateway has before the run: with one gateway, all of them; with
/// several, each its own (the shared ones arrive over the links; see [`Shared::known`]).
fn plan_known(plan: &Plan) -> Vec<BTreeSet<ConversationId>> {
    plan.gateways
        .iter()
        .enumerate()
        .map(|(g, _)| {
            plan.conversations
                .iter()
                .filter(|c| plan.gateways.len() == 1 || c.home == g)
                .map(|c| c.id)
                .collect()
        })
        .collect()
}

/// Prepares each gateway's data directory as its operator would before the run: a TLS
/// identity (seeded, so handshakes repeat), one enrolment token per device of its domain, the
/// conversations homed there, shared with the domains of their other members. Returns each
/// gateway's pin and configuration, and each device's token.
#[allow(clippy::type_complexity)]
fn prepare_gateways(
    root: &Path,
    disks: &BTreeMap<String, SimulatedDisk>,
    plan: &Plan,
) -> Result<(Vec<[u8; 32]>, Vec<GatewayConfig>, Vec<EnrolmentToken>), String> {
    let mut pins = Vec::new();
    let mut configs = Vec::new();
    let mut tokens: Vec<Option<EnrolmentToken>> = vec![None; plan.devices.len()];
    let mut stores = Vec::new();
    let mut fingerprints = Vec::new();
    // First each gateway's root and tokens, with its domain; then, knowing every root, the
    // peers of each and the conversations (a share needs its peer configured).
    for (g, gateway_plan) in plan.gateways.iter().enumerate() {
        let dir = root.join(&gateway_plan.host);
        let identity = TlsIdentity::from_seed(gateway_seed(7, g)).map_err(|e| e.to_string())?;
        identity.save(&dir.join("tls")).map_err(|e| e.to_string())?;
        pins.push(certificate_pin(&identity.cert));
        let mut store = RedbStore::open_with(
            &dir.join("gateway.redb"),
            Some(disks[&gateway_plan.host].clone()),
        )
        .map_err(|e| e.to_string())?;
        let config = GatewayConfig {
            domain: gateway_plan.domain.clone(),
            ..plan.gateway_config.clone()
        };
        let mut gateway = Gateway::new(
            config.clone(),
            EPOCH,
            Box::new(SeededEntropy::new(gateway_seed(9, g))),
        );
        fingerprints.push(gateway.trust_root().fingerprint());
        for (i, device) in plan.devices.iter().enumerate() {
            if device.home != g {
                continue;
            }
            let command = AdminCommand::IssueEnrolmentToken(device.user.to_string());
            match gateway.run_admin(EPOCH, command, &mut store) {
                Ok((AdminAnswer::EnrolmentToken(token, _), _)) => tokens[i] = Some(token),
                other => return Err(format!("issuing a token for {}: {other:?}", device.name)),
            }
        }
        configs.push(config);
        stores.push(store);
    }
    for (g, gateway_plan) in plan.gateways.iter().enumerate() {
        configs[g].federation_peers = gateway_plan
            .peers
            .iter()
            .map(|&p| PeerConfig {
                domain: plan.gateways[p].domain.clone(),
                root_fingerprint: fingerprints[p].clone(),
            })
            .collect();
        let store = &mut stores[g];
        let mut gateway = Gateway::recover(
            configs[g].clone(),
            EPOCH,
            store,
            Box::new(SeededEntropy::new(gateway_seed(10, g))),
        )
        .map_err(|e| format!("{}: {e}", gateway_plan.host))?;
        for conv in plan.conversations.iter().filter(|c| c.home == g) {
            let mut local = Vec::new();
            let mut foreign: BTreeMap<String, Vec<DeviceId>> = BTreeMap::new();
            for &m in &conv.members {
                let device = &plan.devices[m];
                if device.home != g && gateway_plan.peers.contains(&device.home) {
                    foreign
                        .entry(plan.gateways[device.home].domain.clone())
                        .or_default()
                        .push(device.id());
                } else {
                    local.push(device.id());
                }
            }
            let command = AdminCommand::CreateConversation(conv.id, local);
            gateway
                .run_admin(EPOCH, command, store)
                .map_err(|e| format!("creating {}: {e:?}", conv.name))?;
            for (domain, members) in foreign {
                let command = AdminCommand::ShareConversation {
                    conversation: conv.id,
                    domain: domain.clone(),
                    members,
                };
                match gateway.run_admin(EPOCH, command, store) {
                    Ok((AdminAnswer::ShareRefused { why, .. }, _)) => {
                        return Err(format!("sharing {} with {domain}: {why}", conv.name))
                    }
                    Ok(_) => {}
                    Err(e) => return Err(format!("sharing {} with {domain}: {e:?}", conv.name)),
                }
            }
        }
    }
    let tokens = tokens
        .into_iter()
        .map(|t| t.expect("every device has a home gateway, which issued its token"))
        .collect();
    Ok((pins, configs, tokens))
}

/// Runs `scenario` (already planned as `plan`) with `seed`.
pub fn run(scenario: &Scenario, plan: Plan, seed: u64) -> Result<RunReport, String> {
    let tmp = data_dir().map_err(|e| format!("a temporary directory: {e}"))?;
    let root = tmp.path().to_path_buf();
    let hosts: Vec<String> = plan
        .gateways
        .iter()
        .map(|g| g.host.clone())
        .chain(plan.devices.iter().map(|d| d.host.clone()))
        .collect();
    let disks: BTreeMap<String, SimulatedDisk> = hosts
        .iter()
        .map(|host| (host.clone(), SimulatedDisk::default()))
        .collect();
    let faults: BTreeMap<String, SocketFaults> = hosts
        .iter()
        .map(|host| (host.clone(), SocketFaults::default()))
        .collect();
    let (pins, configs, tokens) = prepare_gateways(&root, &disks, &plan)?;
    let gateways = plan.gateways.len();
    let mut rng = ChaCha20Rng::from_seed(stream_seed(seed, "workload", 0));
    let next_send = plan
        .sends
        .iter()
        .map(|s| {
            let period = s.period.as_micros().max(1) as u64;
            s.start + Duration::from_micros(rng.next_u64() % period)
        })
        .collect();
    let devices = plan.devices.len();
    let shared = Shared {
        checker: Checker::new(scenario.invariants.clone(), plan.gaps_allowed),
        liveness: false,
        next_send,
        made: vec![0; devices],
        bodies: BTreeMap::new(),
        unknown_outcome: BTreeSet::new(),
        unacknowledged: BTreeSet::new(),
        may_replay: BTreeSet::new(),
        starts: vec![0; devices],
        gateway_starts: vec![0; gateways],
        sequencing: vec![BTreeSet::new(); gateways],
        admin_queue: vec![Vec::new(); gateways],
        known: plan_known(&plan),
        disconnects: vec![0; devices],
        events: sha2::Sha256::new(),
        default_profile: plan.network,
        link_profiles: BTreeMap::new(),
        status: vec!["never connected".to_string(); devices],
        stopped: BTreeSet::new(),
        clock_offsets: plan.skews.iter().cloned().collect(),
        report: RunReport {
            violation: None,
            trace_hash: [0; 32],
            packets: PacketTrace::new().summary(),
            sim_time: Duration::ZERO,
            recovery: None,
            offered: 0,
            accepted: 0,
            delivered: 0,
            replayed: 0,
            refused: 0,
            reconnects: 0,
            restarts: 0,
            handovers: HandoverCounts::default(),
        },
    };
    let world = Rc::new(World {
        faults,
        disks,
        plan,
        seed,
        root,
        pins,
        configs,
        tokens,
        packets: PacketTrace::new(),
        shared: RefCell::new(shared),
        drain: (0..gateways).map(|_| tokio::sync::Notify::new()).collect(),
    });
    let end = scenario.duration + scenario.liveness;
    let mut sim = turmoil::Builder::new()
        .simulation_duration(end + Duration::from_secs(10))
        .tick_duration(TICK)
        .min_message_latency(Duration::from_micros(world.plan.network.latency_us_min))
        .max_message_latency(Duration::from_micros(world.plan.network.latency_us_max))
        .rng_seed(seed)
        .build();
    for index in 0..gateways {
        add_gateway(&mut sim, &world, index);
    }
    for index in 0..devices {
        add_device(&mut sim, &world, index);
    }
    {
        let mut shared = world.shared.borrow_mut();
        for (changed, patch) in &world.plan.links {
            for pair in changed {
                let current = shared.profile(pair);
                shared
                    .link_profiles
                    .insert(pair.clone(), patch.apply(current));
            }
        }
    }
    apply_profiles(&sim, &world);
    control(&mut sim, scenario, &world, end);
    let mut shared = world.shared.borrow_mut();
    let packets = world.packets.summary();
    let events: [u8; 32] = shared.events.clone().finalize().into();
    let mut report = shared.report.clone();
    report.violation = shared.checker.violation().cloned();
    report.packets = packets;
    report.trace_hash = sha2::Sha256::new()
        .chain_update(packets.hash)
        .chain_update(events)
        .finalize()
        .into();
    shared.report = report.clone();
    drop(shared);
    drop(sim);
    Ok(report)
}

/// Where the run's files live (the gateway's TLS identity; redb's databases are on each host's
/// [`SimulatedDisk`], in memory): a fresh directory in memory-backed `/dev/shm` where there is
/// one and `TMPDIR` does not say otherwise, else in the temporary directory.
fn data_dir() -> std::io::Result<tempfile::TempDir> {
    let builder = tempfile::Builder::new().prefix("sund-sim-drivers-").clone();
    let shm = Path::new("/dev/shm");
    // deterministic: the run's files live here; their bytes never enter the trace hash
    if std::env::var_os("TMPDIR").is_none() && shm.is_dir() {
        if let Ok(dir) = builder.tempdir_in(shm) {
            return Ok(dir);
        }
    }
    builder.tempdir()
}

impl World {
    /// What a host's clock reads as it starts: the simulated time, moved by its offset.
    fn origin(&self, host: &str) -> Instant {
        let offset = self
            .shared
            .borrow()
            .clock_offsets
            .get(host)
            .copied()
            .unwrap_or(0);
        let now = EPOCH.0 + turmoil::sim_elapsed().unwrap_or_default().as_micros() as u64;
        Instant(now.saturating_add_signed(offset))
    }
}

impl World {
    /// A host's driver ended with `error`. On a full disk that is what the drivers do (the node
    /// stops; a gateway that cannot even start stays down): the host waits, stopped, until
    /// `free-disk` starts it again. Anything else is a failure of the run.
    async fn stopped_or_failed(&self, host: &str, error: String) -> turmoil::Result {
        if !self.disks[host].is_full() {
            return Err(error.into());
        }
        self.shared.borrow_mut().stopped.insert(host.to_string());
        std::future::pending::<()>().await;
        Ok(())
    }
}

impl Shared {
    /// The profile of the link between two hosts (in order).
    fn profile(&self, pair: &(String, String)) -> LinkProfile {
        self.link_profiles
            .get(pair)
            .copied()
            .unwrap_or(self.default_profile)
    }
}

/// Gives every link between hosts that talk (a device and its gateway, two federated
/// gateways) its current profile: datagram faults in both ends' sockets, latency in turmoil.
fn apply_profiles(sim: &turmoil::Sim<'_>, world: &World) {
    let shared = world.shared.borrow();
    for pair in talking_pairs(&world.plan.gateways, &world.plan.devices) {
        let profile = shared.profile(&pair);
        let faults = DatagramFaults {
            loss: profile.loss,
            duplicate: profile.duplicate,
        };
        let (x, y) = (pair.0.as_str(), pair.1.as_str());
        world.faults[x].set_to(sim.lookup(y), faults);
        world.faults[y].set_to(sim.lookup(x), faults);
        sim.set_link_latency(x, y, Duration::from_micros(profile.latency_us_min));
        sim.set_link_max_message_latency(x, y, Duration::from_micros(profile.latency_us_max));
    }
}

fn add_gateway(sim: &mut turmoil::Sim<'_>, world: &Rc<World>, index: usize) {
    let w = world.clone();
    sim.host(world.plan.gateways[index].host.as_str(), move || {
        let w = w.clone();
        async move {
            let host = w.plan.gateways[index].host.as_str();
            let start = {
                let mut shared = w.shared.borrow_mut();
                shared.gateway_starts[index] += 1;
                if shared.gateway_starts[index] > 1 {
                    shared.report.restarts += 1;
                }
                shared.gateway_starts[index]
            };
            // The first gateway's streams keep the names a single-gateway run always had.
            let label = match index {
                0 => "gateway".to_string(),
                n => format!("gateway/{n}"),
            };
            let socket_seed = seed_u64(stream_seed(
                w.seed,
                &format!("{label}-socket"),
                start.into(),
            ));
            let socket = TurmoilUdp::bind_traced(
                PORT,
                w.faults[host].clone(),
                socket_seed,
                Some(w.packets.clone()),
            )
            .await;
            let origin = w.origin(host);
            let mut environment =
                Simulated::new(socket, stream_seed(w.seed, &label, start.into()), origin)
                    .with_disk(w.disks[host].clone());
            let peers = &w.plan.gateways[index].peers;
            let federation = if peers.is_empty() {
                None
            } else {
                let seed = seed_u64(stream_seed(w.seed, &format!("{label}-links"), start.into()));
                let socket = TurmoilUdp::bind_traced(
                    FEDERATION_PORT,
                    w.faults[host].clone(),
                    seed,
                    Some(w.packets.clone()),
                )
                .await;
                environment = environment.with_socket(FEDERATION_PORT, socket);
                Some(FederationOptions {
                    listen: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), FEDERATION_PORT),
                    peers: peers
                        .iter()
                        .map(|&p| {
                            let peer = &w.plan.gateways[p];
                            let ip = turmoil::lookup(peer.host.as_str());
                            (peer.domain.clone(), format!("{ip}:{FEDERATION_PORT}"))
                        })
                        .collect(),
                })
            };
            let options = GatewayOptions {
                listen: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), PORT),
                environment: Arc::new(environment),
                data_dir: w.root.join(host),
                config: w.configs[index].clone(),
                federation,
            };
            let error = match gateway_driver::start(options).await {
                // A full disk makes the gateway refuse sessions until it can commit again (it
                // probes by itself); only a failure it cannot live through ends the driver.
                Ok(mut gateway) => {
                    let drain = w.drain[index].notified();
                    let operator = operate(&w, index, gateway.admin_client());
                    let failed = tokio::select! {
                        error = gateway.failed() => Some(error.to_string()),
                        () = drain => None,
                        () = operator => unreachable!("the operator never stops"),
                    };
                    // Down or draining: it sequences nothing.
                    w.shared.borrow_mut().sequencing[index].clear();
                    match failed {
                        Some(error) => error,
                        None => {
                            // `drain`: what SIGTERM does (goodbyes with the retry hint, commits
                            // finished, the endpoint closed); the host then idles until
                            // `restart` bounces it.
                            if let Err(e) = gateway.shutdown().await {
                                return Err(format!("the gateway's drain failed: {e}").into());
                            }
                            std::future::pending::<()>().await;
                            unreachable!("pending never completes")
                        }
                    }
                }
                Err(e) => format!("the gateway driver did not start: {e}"),
            };
            w.stopped_or_failed(host, error).await
        }
    });
}

/// The operator at a running gateway: carries out the admin commands the scenario asks of it
/// (`handover`), as `sund-gateway admin` does through the control socket, and reads every
/// millisecond which conversations its machine sequences, checking `single-authority`.
async fn operate(w: &Rc<World>, index: usize, admin: AdminClient) {
    if w.plan.gateways.len() == 1 {
        // One gateway: nothing to hand over, no other to sequence at once.
        return std::future::pending().await;
    }
    let ids: Vec<ConversationId> = w.plan.conversations.iter().map(|c| c.id).collect();
    let mut tick = tokio::time::interval(TICK);
    loop {
        tick.tick().await;
        let commands = std::mem::take(&mut w.shared.borrow_mut().admin_queue[index]);
        for command in commands {
            let (w, admin) = (w.clone(), admin.clone());
            tokio::task::spawn_local(async move {
                let answer = admin.admin(command).await;
                let mut shared = w.shared.borrow_mut();
                match answer {
                    Some(AdminAnswer::HandoverStarted { .. }) => {
                        shared.report.handovers.started += 1
                    }
                    Some(AdminAnswer::HandoverRefused { .. }) | None => {
                        shared.report.handovers.refused += 1
                    }
                    Some(_) => {}
                }
            });
        }
        let ids = ids.clone();
        let Some((sequenced, known)) = admin
            .inspect(move |gateway, _| {
                let sequenced = ids
                    .iter()
                    .copied()
                    .filter(|&id| gateway.sequences(id))
                    .collect::<BTreeSet<_>>();
                let known = ids
                    .into_iter()
                    .filter(|&id| gateway.log(id).is_some())
                    .collect::<BTreeSet<_>>();
                (sequenced, known)
            })
            .await
        else {
            continue; // stopping, or its store is out: the select above ends
        };
        let mut shared = w.shared.borrow_mut();
        let shared = &mut *shared;
        shared.known[index].extend(known);
        for &conv in &sequenced {
            let others: Vec<&str> = shared
                .sequencing
                .iter()
                .enumerate()
                .filter(|&(g, set)| g != index && set.contains(&conv))
                .map(|(g, _)| w.plan.gateways[g].host.as_str())
                .collect();
            if let Some(other) = others.first() {
                let name = w
                    .plan
                    .conversations
                    .iter()
                    .find(|c| c.id == conv)
                    .map_or("?", |c| c.name.as_str());
                shared.checker.fail_safety(
                    Invariant::SingleAuthority,
                    now_us(),
                    format!(
                        "{} and {other} sequence {name} ({conv}) at once",
                        w.plan.gateways[index].host
                    ),
                );
            }
        }
        shared.sequencing[index] = sequenced;
    }
}

fn add_device(sim: &mut turmoil::Sim<'_>, world: &Rc<World>, index: usize) {
    let w = world.clone();
    let host = world.plan.devices[index].host.clone();
    sim.host(host.as_str(), move || {
        let w = w.clone();
        async move { device_main(&w, index).await }
    });
}

/// A device's host: its node driver and its application.
async fn device_main(w: &World, index: usize) -> turmoil::Result {
    let device = &w.plan.devices[index];
    let start = {
        let mut shared = w.shared.borrow_mut();
        shared.starts[index] += 1;
        if shared.starts[index] > 1 {
            shared.report.restarts += 1;
            // What the application had not durably taken comes again.
            for conv in &w.plan.conversations {
                if conv.members.contains(&index) {
                    shared.may_replay.insert((index, conv.id));
                }
            }
        }
        shared.starts[index]
    };
    let label = format!("device/{}", device.name);
    let socket_seed = seed_u64(stream_seed(
        w.seed,
        &format!("{label}/socket"),
        start.into(),
    ));
    let socket = TurmoilUdp::bind_traced(
        0,
        w.faults[&device.host].clone(),
        socket_seed,
        Some(w.packets.clone()),
    )
    .await;
    let origin = w.origin(&device.host);
    let environment = Simulated::new(socket, stream_seed(w.seed, &label, start.into()), origin)
        .with_disk(w.disks[&device.host].clone());
    let options = NodeOptions {
        data_dir: w.root.join(&device.host),
        gateway: SocketAddr::new(
            turmoil::lookup(w.plan.gateways[device.home].host.as_str()),
            PORT,
        ),
        gateway_pin: w.pins[device.home],
        key: device.key.clone(),
        environment: Arc::new(environment),
        user: Some(device.user.user()),
        mls: None,
        enrolment: Some(w.tokens[index].clone()),
        pairing_voucher: None,
        hold_until_taken: true,
        timers: Some(w.plan.node_timers),
    };
    let mut node = match node_driver::start(options).await {
        Ok(node) => node,
        Err(e) => {
            let error = format!("{}: the node driver did not start: {e}", device.name);
            return w.stopped_or_failed(&device.host, error).await;
        }
    };
    let mut tick = tokio::time::interval(APP_TICK);
    loop {
        tokio::select! {
            biased;
            event = node.events.recv() => {
                let Some(event) = event else {
                    // The node stops when its store fails (a full disk), as `sund` does.
                    let error = format!("{}: the node driver stopped", device.name);
                    return w.stopped_or_failed(&device.host, error).await;
                };
                if let Err(e) = on_event(w, index, &node, event).await {
                    return w.stopped_or_failed(&device.host, e.to_string()).await;
                }
            }
            _ = tick.tick() => {
                if let Err(e) = act(w, index, &node).await {
                    return w.stopped_or_failed(&device.host, e.to_string()).await;
                }
            }
        }
    }
}

/// The application hears `event`.
async fn on_event(w: &World, index: usize, node: &NodeHandle, event: NodeEvent) -> turmoil::Result {
    let device = &w.plan.devices[index];
    let who = device.name.as_str();
    let at = now_us();
    let actor = index as u32;
    let take = {
        let mut shared = w.shared.borrow_mut();
        let shared = &mut *shared;
        match event {
            NodeEvent::Delivered {
                conversation,
                seq,
                sender,
                msg_id,
                body,
            } => {
                shared.report.delivered += 1;
                if shared.may_replay.remove(&(index, conversation))
                    && seq <= shared.checker.delivered_upto(actor, conversation)
                {
                    shared.report.replayed += 1;
                    shared
                        .checker
                        .on_replay_after_restart(actor, conversation, seq);
                }
                shared
                    .checker
                    .on_delivered(at, actor, who, conversation, seq, sender, msg_id);
                match shared.bodies.get(&(sender, msg_id)) {
                    Some(sent) if *sent != hash_body(&body) => shared.checker.fail_safety(
                        Invariant::NoLoss,
                        at,
                        format!("{who}: seq {seq} of {conversation} ({msg_id} from {sender}) arrived with other bytes than were sent"),
                    ),
                    Some(_) => {}
                    None if shared.unknown_outcome.remove(&hash_body(&body)) => {
                        shared.bodies.insert((sender, msg_id), hash_body(&body));
                    }
                    None => shared.checker.fail_safety(
                        Invariant::NoDuplicate,
                        at,
                        format!("{who}: seq {seq} of {conversation} is {msg_id} from {sender}, which no application sent"),
                    ),
                }
                shared
                    .events
                    .update(format!("{at} {who} delivered {conversation} {seq}|").as_bytes());
                Some((conversation, seq))
            }
            NodeEvent::Accepted {
                conversation,
                msg_id,
                seq,
            } => {
                shared.report.accepted += 1;
                let id = device.id();
                shared
                    .checker
                    .on_accepted(at, who, conversation, id, msg_id, seq);
                shared.unacknowledged.remove(&(conversation, id, msg_id));
                shared
                    .events
                    .update(format!("{at} {who} accepted {conversation} {seq}|").as_bytes());
                None
            }
            NodeEvent::Rejected { msg_id, code } => {
                // A member's message to a plain conversation has no reason to be refused.
                shared.checker.fail_safety(
                    Invariant::NoLoss,
                    at,
                    format!("{who}: the gateway refused {msg_id} ({code:?}), which the application had sent"),
                );
                None
            }
            NodeEvent::Gap {
                conversation,
                from,
                to,
            } => {
                shared
                    .checker
                    .on_gap(at, actor, who, conversation, from, to);
                None
            }
            NodeEvent::HistoryLost {
                conversation,
                from,
                to,
            } => {
                shared
                    .checker
                    .on_history_lost(at, actor, who, conversation, from, to);
                None
            }
            NodeEvent::HistoryDiverged { conversation, upto } => {
                shared
                    .checker
                    .on_history_diverged(at, actor, who, conversation, upto);
                None
            }
            NodeEvent::Status(status) => {
                if let ConnectionStatus::Reconnecting { .. } = status {
                    shared.report.reconnects += 1;
                }
                shared.status[index] = match status {
                    ConnectionStatus::Connected => {
                        format!("connected since {:.3}s", at as f64 / 1e6)
                    }
                    ConnectionStatus::Reconnecting { attempt } => {
                        format!(
                            "reconnecting since {:.3}s (attempt {attempt})",
                            at as f64 / 1e6
                        )
                    }
                    ConnectionStatus::Offline => format!("offline since {:.3}s", at as f64 / 1e6),
                };
                None
            }
            NodeEvent::Refused { code, message } => {
                shared.status[index] = format!(
                    "refused by the gateway at {:.3}s ({code:?}: {message})",
                    at as f64 / 1e6
                );
                None
            }
            _ => None,
        }
    };
    if let Some((conversation, seq)) = take {
        node.taken(conversation, seq)
            .await
            .map_err(|e| format!("{who}: {e}"))?;
    }
    Ok(())
}

/// The application's turn: carry out an asked-for disconnect, and the sends that are due.
async fn act(w: &World, index: usize, node: &NodeHandle) -> turmoil::Result {
    let device = &w.plan.devices[index];
    let now = turmoil::sim_elapsed().unwrap_or_default();
    let (disconnect, due) = {
        let mut shared = w.shared.borrow_mut();
        let disconnect = std::mem::take(&mut shared.disconnects[index]) > 0;
        let mut due = Vec::new();
        if !shared.liveness {
            for (n, send) in w.plan.sends.iter().enumerate() {
                if send.device != index || shared.next_send[n] > now {
                    continue;
                }
                let conversation = w.plan.conversations[send.conversation].id;
                if now < send.stop && shared.known[device.home].contains(&conversation) {
                    shared.made[index] += 1;
                    let mut body = format!("{}#{}", device.name, shared.made[index]).into_bytes();
                    if body.len() < send.size {
                        body.resize(send.size, b'.');
                    }
                    due.push((
                        w.plan.conversations[send.conversation].id,
                        Bytes::from(body),
                    ));
                }
                // A device that was down skips the turns it missed.
                while shared.next_send[n] <= now {
                    shared.next_send[n] += send.period;
                }
            }
        }
        (disconnect, due)
    };
    if disconnect {
        node.reconnect()
            .await
            .map_err(|e| format!("{}: {e}", device.name))?;
    }
    for (conversation, body) in due {
        let digest = hash_body(&body);
        match node.send(conversation, body).await {
            Ok(Ok(msg_id)) => {
                let mut shared = w.shared.borrow_mut();
                let id = device.id();
                shared.checker.on_sent(conversation, id, msg_id);
                shared.bodies.insert((id, msg_id), digest);
                shared.unacknowledged.insert((conversation, id, msg_id));
                shared.report.offered += 1;
            }
            Ok(Err(_)) => w.shared.borrow_mut().report.refused += 1,
            Err(e) => {
                w.shared.borrow_mut().unknown_outcome.insert(digest);
                return Err(format!("{}: {e}", device.name).into());
            }
        }
    }
    Ok(())
}

/// The fault side of the run: expands the schedule, steps turmoil, carries out each action at
/// its time, heals at the end of the safety phase and probes for convergence.
fn control(sim: &mut turmoil::Sim<'_>, scenario: &Scenario, world: &World, end: Duration) {
    let plan = &world.plan;
    let mut faults_rng = ChaCha20Rng::from_seed(stream_seed(world.seed, "faults", 0));
    let mut actions: Vec<(Duration, usize, Action)> = Vec::new();
    for (n, scheduled) in plan.schedule.iter().enumerate() {
        match scheduled.timing {
            Timing::At(at) => actions.push((at, n, scheduled.action.clone())),
            Timing::Every {
                period,
                start,
                stop,
                jitter,
            } => {
                let mut at = start;
                while at < stop.min(scenario.duration) && !period.is_zero() {
                    let delay = match jitter.as_micros() as u64 {
                        0 => 0,
                        j => faults_rng.next_u64() % j,
                    };
                    actions.push((
                        at + Duration::from_micros(delay),
                        n,
                        scheduled.action.clone(),
                    ));
                    at += period;
                }
            }
        }
    }
    actions.sort_by_key(|(at, n, _)| (*at, *n));
    let mut actions = actions.into_iter().peekable();
    let mut faults = Faults::default();
    let mut next_probe = scenario.duration;
    loop {
        if let Err(e) = sim.step() {
            let at = now_of(sim);
            world.shared.borrow_mut().checker.fail_safety(
                Invariant::NoPanic,
                at,
                format!("a driver failed: {e}"),
            );
            break;
        }
        let now = sim.elapsed();
        while let Some((at, _, _)) = actions.peek() {
            if *at > now || now >= scenario.duration {
                break;
            }
            let (_, _, action) = actions.next().expect("peeked");
            faults.apply(sim, scenario, world, &action, &mut faults_rng);
        }
        if world.shared.borrow().checker.violation().is_some() {
            break;
        }
        if now >= scenario.duration && !world.shared.borrow().liveness {
            world.shared.borrow_mut().liveness = true;
            faults.heal_all(sim, world);
        }
        if now >= next_probe {
            next_probe += PROBE;
            match missing(world) {
                None => {
                    let mut shared = world.shared.borrow_mut();
                    shared.report.recovery = Some(now.saturating_sub(scenario.duration));
                    // A device holding a message the gateway lost, at a seq that now holds
                    // another, must have been told by now.
                    let name = |a: u32| world.plan.devices[a as usize].name.clone();
                    if let Some(fork) = shared.checker.silent_fork(&name) {
                        shared
                            .checker
                            .fail_safety(Invariant::NoLoss, now.as_micros() as u64, fork);
                    }
                    break;
                }
                Some(what) if now >= end => {
                    world
                        .shared
                        .borrow_mut()
                        .checker
                        .fail_liveness(now.as_micros() as u64, what);
                    break;
                }
                Some(_) => {}
            }
        }
    }
    world.shared.borrow_mut().report.sim_time = sim.elapsed();
}

fn now_of(sim: &turmoil::Sim<'_>) -> u64 {
    sim.elapsed().as_micros() as u64
}

/// What stops the run from having converged, in words (`None`: converged).
fn missing(world: &World) -> Option<String> {
    let shared = world.shared.borrow();
    if let Some((conv, device, msg_id)) = shared.unacknowledged.iter().next() {
        let index = world.plan.devices.iter().position(|d| d.id() == *device);
        let name = index.map_or("?", |i| world.plan.devices[i].name.as_str());
        let status = index.map_or("?", |i| shared.status[i].as_str());
        return Some(format!(
            "{name}'s {msg_id} to {conv} was never acknowledged ({} sends wait; {name} is {status})",
            shared.unacknowledged.len()
        ));
    }
    let mut heads: BTreeMap<ConversationId, u64> = BTreeMap::new();
    for (conv, seq) in shared.checker.accepted() {
        let head = heads.entry(conv).or_default();
        *head = (*head).max(seq);
    }
    for conv in &world.plan.conversations {
        let head = heads.get(&conv.id).copied().unwrap_or(0);
        for &member in &conv.members {
            let upto = shared.checker.delivered_upto(member as u32, conv.id);
            if upto < head {
                return Some(format!(
                    "{} has delivered {} up to seq {upto} of {head} (it is {})",
                    world.plan.devices[member].name, conv.name, shared.status[member]
                ));
            }
        }
    }
    None
}

/// The faults in force, so that the heal at the end of the safety phase undoes each.
#[derive(Default)]
struct Faults {
    cut: BTreeSet<(String, String)>,
    blocked: BTreeSet<(String, String)>,
    held: BTreeSet<(String, String)>,
    crashed: BTreeSet<String>,
    /// Power cuts so far: each draws its torn sectors from a stream of its own.
    power_cuts: u64,
}

impl Faults {
    /// Turmoil hosts a target names; random targets draw from the fault stream.
    fn hosts(
        scenario: &Scenario,
        world: &World,
        target: &Target,
        rng: &mut ChaCha20Rng,
    ) -> Vec<String> {
        let plan = &world.plan;
        match target {
            Target::Gateway(name) => vec![name.clone()],
            Target::AllGateways => plan.gateways.iter().map(|g| g.host.clone()).collect(),
            Target::RandomGateway => {
                let n = plan.gateways.len() as u64;
                vec![plan.gateways[(rng.next_u64() % n) as usize].host.clone()]
            }
            Target::RandomDevice => {
                let n = plan.devices.len() as u64;
                vec![plan.devices[(rng.next_u64() % n) as usize].host.clone()]
            }
            other => resolve(scenario, &plan.devices, other)
                .into_iter()
                .map(|i| plan.devices[i].host.clone())
                .collect(),
        }
    }

    fn all_hosts(world: &World) -> Vec<String> {
        let mut hosts: Vec<String> = world.plan.gateways.iter().map(|g| g.host.clone()).collect();
        hosts.extend(world.plan.devices.iter().map(|d| d.host.clone()));
        hosts
    }

    fn pairs(a: &[String], b: &[String]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for x in a {
            for y in b {
                if x != y {
                    let pair = if x < y { (x, y) } else { (y, x) };
                    out.push((pair.0.clone(), pair.1.clone()));
                }
            }
        }
        out
    }

    fn apply(
        &mut self,
        sim: &mut turmoil::Sim<'_>,
        scenario: &Scenario,
        world: &World,
        action: &Action,
        rng: &mut ChaCha20Rng,
    ) {
        let mut hosts = |t: &Target| Faults::hosts(scenario, world, t, rng);
        match action {
            Action::Partition(a, b) => {
                for (x, y) in Faults::pairs(&hosts(a), &hosts(b)) {
                    sim.partition(x.as_str(), y.as_str());
                    self.cut.insert((x, y));
                }
            }
            Action::Heal(a, b) => {
                for (x, y) in Faults::pairs(&hosts(a), &hosts(b)) {
                    if self.cut.remove(&(x.clone(), y.clone())) {
                        sim.repair(x.as_str(), y.as_str());
                    }
                }
            }
            Action::Isolate(a) => {
                for (x, y) in Faults::pairs(&hosts(a), &Faults::all_hosts(world)) {
                    sim.partition(x.as_str(), y.as_str());
                    self.cut.insert((x, y));
                }
            }
            Action::Rejoin(a) => {
                for (x, y) in Faults::pairs(&hosts(a), &Faults::all_hosts(world)) {
                    if self.cut.remove(&(x.clone(), y.clone())) {
                        sim.repair(x.as_str(), y.as_str());
                    }
                }
            }
            Action::Hold(a, b) => {
                for (x, y) in Faults::pairs(&hosts(a), &hosts(b)) {
                    sim.hold(x.as_str(), y.as_str());
                    self.held.insert((x, y));
                }
            }
            Action::Release(a, b) => {
                for (x, y) in Faults::pairs(&hosts(a), &hosts(b)) {
                    if self.held.remove(&(x.clone(), y.clone())) {
                        sim.release(x.as_str(), y.as_str());
                    }
                }
            }
            Action::Block(a, b) => {
                let (from, to) = (hosts(a), hosts(b));
                for x in &from {
                    for y in to.iter().filter(|y| *y != x) {
                        sim.partition_oneway(x.as_str(), y.as_str());
                        self.blocked.insert((x.clone(), y.clone()));
                    }
                }
            }
            Action::Unblock(a, b) => {
                let (from, to) = (hosts(a), hosts(b));
                for x in &from {
                    for y in to.iter().filter(|y| *y != x) {
                        if self.blocked.remove(&(x.clone(), y.clone())) {
                            sim.repair_oneway(x.as_str(), y.as_str());
                        }
                    }
                }
            }
            Action::Disconnect(a) => {
                let named = hosts(a);
                let mut shared = world.shared.borrow_mut();
                // A gateway named: every device it serves.
                for (i, device) in world.plan.devices.iter().enumerate() {
                    let home = &world.plan.gateways[device.home].host;
                    if named.contains(home) || named.contains(&device.host) {
                        shared.disconnects[i] += 1;
                    }
                }
            }
            Action::Crash(a) => {
                for host in hosts(a) {
                    if self.crashed.insert(host.clone()) {
                        // The power goes before the process does, so nothing it does on the way
                        // down (redb's clean close) reaches the disk; what it wrote and did not
                        // sync survives sector by sector, as a coin says.
                        // A disk that lies keeps nothing of what it only cached (the model
                        // layer's `lie-disk`: back to what was durable when it began to lie).
                        self.power_cuts += 1;
                        let mut coin = ChaCha20Rng::from_seed(stream_seed(
                            world.seed,
                            "power-cut",
                            self.power_cuts,
                        ));
                        let disk = &world.disks[&host];
                        let lying = disk.is_lying();
                        let cut = disk.power_cut(&mut || !lying && coin.next_u64() & 1 == 1);
                        sim.crash(host.as_str());
                        let gateway = world.plan.gateways.iter().position(|g| g.host == host);
                        if let Some(g) = gateway {
                            world.shared.borrow_mut().sequencing[g].clear();
                        }
                        if let (Some(g), true) = (gateway, lying && cut.unsynced > 0) {
                            let heads = recovered_heads(world, g, disk);
                            world
                                .shared
                                .borrow_mut()
                                .checker
                                .on_gateway_lost_writes(&heads, &BTreeMap::new());
                        }
                        // A crash ends a stopped driver too; the restart starts it.
                        world.shared.borrow_mut().stopped.remove(&host);
                    }
                }
            }
            Action::Restart(a) => {
                for host in hosts(a) {
                    if self.crashed.remove(&host) {
                        sim.bounce(host.as_str());
                    }
                }
            }
            Action::Drain(a) => {
                for host in hosts(a) {
                    // Only a running gateway drains (a waiter exists only while it runs); it
                    // counts as down until `restart`, as after a crash, but its disk keeps
                    // everything: the driver finished its commits before it stopped.
                    let gateway = world.plan.gateways.iter().position(|g| g.host == host);
                    if let Some(g) = gateway {
                        if self.crashed.insert(host) {
                            world.drain[g].notify_waiters();
                        }
                    }
                }
            }
            Action::Network(patch) => {
                {
                    let mut shared = world.shared.borrow_mut();
                    shared.default_profile = patch.apply(shared.default_profile);
                }
                apply_profiles(sim, world);
            }
            Action::Link(a, b, patch) => {
                {
                    let mut shared = world.shared.borrow_mut();
                    for pair in
                        link_pairs(scenario, &world.plan.gateways, &world.plan.devices, a, b)
                    {
                        let current = shared.profile(&pair);
                        shared.link_profiles.insert(pair, patch.apply(current));
                    }
                }
                apply_profiles(sim, world);
            }
            Action::ClockJump(a, by) => {
                let named = hosts(a);
                let mut shared = world.shared.borrow_mut();
                for host in named {
                    *shared.clock_offsets.entry(host).or_default() += by;
                }
            }
            Action::FillDisk(a) => {
                for host in hosts(a) {
                    world.disks[&host].set_full(true);
                }
            }
            Action::FreeDisk(a) => {
                for host in hosts(a) {
                    world.disks[&host].set_full(false);
                    self.start_if_stopped(sim, world, &host);
                }
            }
            Action::LieDisk(a) | Action::HonestDisk(a) => {
                let lying = matches!(action, Action::LieDisk(_));
                for host in hosts(a) {
                    world.disks[&host].set_lying(lying);
                }
            }
            Action::HealAll => self.heal_all(sim, world),
            Action::Handover(conversation, to) => handover(world, conversation, to),
            // The plan refused every other action.
            other => unreachable!("the plan admits no `{}`", other.keyword()),
        }
    }

    /// A host whose driver stopped on a full disk starts again (unless it is crashed: its
    /// restart will start it).
    fn start_if_stopped(&self, sim: &mut turmoil::Sim<'_>, world: &World, host: &str) {
        let stopped = world.shared.borrow_mut().stopped.remove(host);
        if stopped && !self.crashed.contains(host) {
            sim.bounce(host);
        }
    }

    /// As the model layer heals: cuts, one-way cuts and holds undone, link profiles back to
    /// the default one and no datagram loss or duplication anywhere, disks freed, crashed and
    /// stopped hosts restarted.
    fn heal_all(&mut self, sim: &mut turmoil::Sim<'_>, world: &World) {
        for (host, disk) in &world.disks {
            disk.set_full(false);
            disk.set_lying(false);
            self.start_if_stopped(sim, world, host);
        }
        {
            let mut shared = world.shared.borrow_mut();
            shared.link_profiles.clear();
            shared.default_profile.loss = 0.0;
            shared.default_profile.duplicate = 0.0;
            shared.default_profile.reorder = 0.0;
        }
        apply_profiles(sim, world);
        for (x, y) in std::mem::take(&mut self.cut) {
            sim.repair(x.as_str(), y.as_str());
        }
        for (x, y) in std::mem::take(&mut self.blocked) {
            sim.repair_oneway(x.as_str(), y.as_str());
        }
        for (x, y) in std::mem::take(&mut self.held) {
            sim.release(x.as_str(), y.as_str());
        }
        for host in std::mem::take(&mut self.crashed) {
            sim.bounce(host.as_str());
        }
    }
}

/// The conversations' heads in what a crashed gateway's disk kept: its database opened and
/// its state machine recovered from it, as the gateway will at its restart, for the checker.
fn recovered_heads(
    world: &World,
    gateway: usize,
    disk: &SimulatedDisk,
) -> BTreeMap<ConversationId, u64> {
    let path = world
        .root
        .join(&world.plan.gateways[gateway].host)
        .join("gateway.redb");
    let store = RedbStore::open_with(&path, Some(disk.clone()))
        .expect("the gateway's disk after a power cut of a lying disk opens");
    let gateway = Gateway::recover(
        world.configs[gateway].clone(),
        EPOCH,
        &store,
        Box::new(SeededEntropy::new([0; 32])),
    )
    .expect("the gateway's state recovers");
    gateway
        .conversations()
        .map(|c| (c.id(), c.head()))
        .collect()
}

/// `handover CONV to GATEWAY`: what an operator types at the conversation's authority, the
/// gateway whose machine sequenced it at its last reading. If none did (it is being handed
/// over, or its authority is down), the action is skipped and counted, as on the model layer.
fn handover(world: &World, conversation: &str, to: &str) {
    let plan = &world.plan;
    let (Some(conv), Some(to)) = (
        plan.conversations.iter().find(|c| c.name == conversation),
        plan.gateways.iter().find(|g| g.host == to),
    ) else {
        return; // the parser resolved both names
    };
    let mut shared = world.shared.borrow_mut();
    let authority = shared
        .sequencing
        .iter()
        .position(|set| set.contains(&conv.id));
    match authority {
        None => shared.report.handovers.skipped += 1,
        Some(g) => {
            shared.report.handovers.asked += 1;
            shared.admin_queue[g].push(AdminCommand::Handover {
                conversation: conv.id,
                to: to.domain.clone(),
            });
        }
    }
}

/// How a report's result reads in one word, as `cargo sim --json` writes it.
pub fn result_word(report: &RunReport) -> &'static str {
    match &report.violation {
        None => "pass",
        Some(v) if v.phase == Phase::Liveness => "liveness_violation",
        Some(_) => "safety_violation",
    }
}
