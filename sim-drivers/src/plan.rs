//! What a scenario becomes on the real drivers: one turmoil host per gateway and device, and
//! the faults turmoil and the socket adapter can inject. Gateways that `federate` get their
//! domains and each other as peers, pinned by trust-root fingerprint, as on the model layer;
//! a conversation with members at other gateways is homed at its own and shared with theirs.
//! A scenario that asks for something the driver layer cannot do is refused with every
//! reason, never run half-way.

use std::time::Duration;

use sha2::Digest;
use sund_model::address::Address;
use sund_model::gateway::GatewayConfig;
use sund_model::identity::DeviceKey;
use sund_model::ids::{ConversationId, DeviceId};
use sund_model::node::NodeConfig;
use sund_model::planted::PlantedBug;
use sund_node::driver::NodeTimers;
use sund_sim::network::LinkProfile;
use sund_sim::scenario::{Action, Invariant, ProfilePatch, Scenario, Scheduled, Target};
use sund_sim::world::domain_of;

/// Most devices a driver-layer run takes: each is a real QUIC endpoint, TLS stack and redb file.
pub const DEVICES_MAX: usize = 32;

/// One simulated gateway: a `sund-gateway` driver on a turmoil host of its own.
#[derive(Clone, Debug)]
pub struct GatewayPlan {
    /// As the DSL names it, and its turmoil host name.
    pub host: String,
    /// Its domain (`gwa.example` for a gateway that federates, else the default one).
    pub domain: String,
    /// The gateways it federates with (indices into [`Plan::gateways`]).
    pub peers: Vec<usize>,
}

/// One simulated device: a `sund-node` driver on a turmoil host of its own.
#[derive(Clone, Debug)]
pub struct DevicePlan {
    /// As the DSL names it (`alice/0`).
    pub name: String,
    /// Its turmoil host name (`alice-0`).
    pub host: String,
    /// Its user (at its home gateway's domain).
    pub user: Address,
    /// Its home gateway (index into [`Plan::gateways`]).
    pub home: usize,
    /// Its key (from the scenario's names, so every run of a scenario has the same devices).
    pub key: DeviceKey,
}

impl DevicePlan {
    /// The device's id.
    pub fn id(&self) -> DeviceId {
        self.key.device_id()
    }
}

/// A plain conversation the operator creates before the run (at its home gateway, shared with
/// each other domain that has members in it).
#[derive(Clone, Debug)]
pub struct ConversationPlan {
    /// DSL name.
    pub name: String,
    /// Its id.
    pub id: ConversationId,
    /// The gateway that sequences it first (index into [`Plan::gateways`]).
    pub home: usize,
    /// Member devices (indices into [`Plan::devices`]).
    pub members: Vec<usize>,
}

/// One `send` statement for one device.
#[derive(Clone, Debug)]
pub struct SendPlan {
    /// Which device sends.
    pub device: usize,
    /// Into which conversation (index into [`Plan::conversations`]).
    pub conversation: usize,
    /// One send per period.
    pub period: Duration,
    /// Body size in bytes.
    pub size: usize,
    /// No send before this.
    pub start: Duration,
    /// No send at or after this.
    pub stop: Duration,
}

/// A scenario the drivers can run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Every gateway, in declaration order.
    pub gateways: Vec<GatewayPlan>,
    /// Every device, in declaration order.
    pub devices: Vec<DevicePlan>,
    /// Every conversation.
    pub conversations: Vec<ConversationPlan>,
    /// Every device's sends.
    pub sends: Vec<SendPlan>,
    /// The default link profile (latency range, datagram loss and duplication).
    pub network: LinkProfile,
    /// `link` statements: the pairs of hosts that talk (a device and its gateway, two
    /// federated gateways) whose link they change, and the change. (A device talks to its
    /// gateway only, so a link between two sets of devices carries nothing.)
    pub links: Vec<(Vec<(String, String)>, ProfilePatch)>,
    /// `skew` statements: a clock offset in microseconds per host.
    pub skews: Vec<(String, i64)>,
    /// The timed actions, each checked to be one the drivers can do.
    pub schedule: Vec<Scheduled>,
    /// The gateway drivers' configuration: the scenario's `config` lines and planted bug (each
    /// gateway adds its domain and peers).
    pub gateway_config: GatewayConfig,
    /// The node drivers' timers, from the scenario's `config` lines.
    pub node_timers: NodeTimers,
    /// The scenario sets a retention limit: gaps the gateway reports are policy, not loss.
    pub gaps_allowed: bool,
    /// What the driver layer does differently from the model layer for this scenario (printed
    /// with the report; never something that would weaken an invariant).
    pub approximations: Vec<String>,
}

/// Invariants the driver layer checks (the others need MLS or trust, which it does not run).
const CHECKED: &[Invariant] = &[
    Invariant::NoLoss,
    Invariant::NoDuplicate,
    Invariant::Order,
    Invariant::Converge,
    Invariant::SenderOrder,
    Invariant::NoPanic,
    Invariant::SingleAuthority,
];

/// A stable 32-byte seed from words: device keys come from the scenario's names.
fn seed_of(parts: &[&str]) -> [u8; 32] {
    let mut hasher = sha2::Sha256::new();
    hasher.update(b"sund/sim-drivers/v1");
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.finalize().into()
}

/// Maps `scenario` onto the drivers, or says everything that stops it.
pub fn plan(scenario: &Scenario) -> Result<Plan, Vec<String>> {
    let mut why_not = Vec::new();
    let gateways: Vec<GatewayPlan> = scenario
        .gateways
        .iter()
        .map(|name| GatewayPlan {
            host: name.clone(),
            domain: domain_of(scenario, name),
            peers: scenario
                .federations
                .iter()
                .filter_map(|(a, b)| match () {
                    () if a == name => Some(b),
                    () if b == name => Some(a),
                    () => None,
                })
                .filter_map(|other| scenario.gateways.iter().position(|g| g == other))
                .collect(),
        })
        .collect();
    let home_of = |gateway: &str| {
        scenario
            .gateways
            .iter()
            .position(|g| g == gateway)
            .expect("the parser resolved every gateway name")
    };
    let devices: Vec<DevicePlan> = scenario
        .users
        .iter()
        .flat_map(|user| {
            let home = home_of(&user.gateway);
            let domain = gateways[home].domain.clone();
            (0..user.devices).map(move |d| DevicePlan {
                name: format!("{}/{d}", user.name),
                host: format!("{}-{d}", user.name),
                user: Address::new(&user.name, &domain)
                    .expect("the DSL's user names are addresses' names"),
                home,
                key: DeviceKey::from_seed(seed_of(&["device", &user.name, &d.to_string()])),
            })
        })
        .collect();
    if devices.len() > DEVICES_MAX {
        why_not.push(format!(
            "{} devices: the driver layer runs at most {DEVICES_MAX} (each is a real QUIC endpoint, TLS stack and redb file)",
            devices.len()
        ));
    }
    let mut conversations = Vec::new();
    for conv in &scenario.conversations {
        if conv.kind.is_some() {
            why_not.push(format!(
                "conversation {} is an MLS group: the driver layer runs plain conversations only",
                conv.name
            ));
        }
        let mut members: Vec<usize> = conv
            .members
            .iter()
            .flat_map(|t| resolve(scenario, &devices, t))
            .collect();
        members.sort_unstable();
        members.dedup();
        conversations.push(ConversationPlan {
            name: conv.name.clone(),
            id: ConversationId::from_name(&conv.name),
            home: home_of(&conv.gateway),
            members,
        });
    }
    let profile = scenario.network;
    if profile.bandwidth_bps != 0 {
        why_not.push("a bandwidth limit: turmoil's links have none".into());
    }
    if scenario
        .links
        .iter()
        .any(|(_, _, patch)| patch.bandwidth_bps.is_some())
    {
        why_not.push("a bandwidth limit on a link: turmoil's links have none".into());
    }
    if scenario.users.iter().any(|u| u.address.is_some()) {
        why_not.push(
            "devices sharing a network address (`address`): each turmoil host has its own".into(),
        );
    }
    if scenario.planted == Some(PlantedBug::NodeAckBeforeDurable) {
        why_not.push(
            "`plant node-ack-before-durable`: the node driver takes no model configuration".into(),
        );
    }
    for invariant in &scenario.invariants {
        if *invariant == Invariant::FederationLinks {
            why_not.push(
                "invariant `federation-links` checks the test entries `relay` queues inside the gateways' machines, which the drivers do not expose".into(),
            );
        } else if !CHECKED.contains(invariant) {
            why_not.push(format!(
                "invariant `{}` needs MLS or trust state the driver layer does not run",
                invariant.name()
            ));
        }
    }
    for scheduled in &scenario.schedule {
        if let Err(reason) = supported(&scheduled.action) {
            why_not.push(format!(
                "line {}: `{}` {reason}",
                scheduled.span.line,
                scheduled.action.keyword()
            ));
        }
    }
    let mut sends = Vec::new();
    for workload in &scenario.workloads {
        let Some(conversation) = conversations
            .iter()
            .position(|c| c.name == workload.conversation)
        else {
            continue; // the parser resolved it; unreachable for a parsed scenario
        };
        // As on the model layer, only members send (`from all-devices` into a conversation
        // of some of them).
        let members = &conversations[conversation].members;
        for device in resolve(scenario, &devices, &workload.from) {
            if !members.contains(&device) {
                continue;
            }
            sends.push(SendPlan {
                device,
                conversation,
                period: workload.period,
                size: workload.size,
                start: workload.start,
                stop: workload.stop.min(scenario.duration),
            });
        }
    }
    if !why_not.is_empty() {
        return Err(why_not);
    }
    let mut gateway_config = GatewayConfig {
        planted: scenario.planted,
        ..GatewayConfig::default()
    };
    let mut node_config = NodeConfig::new(DeviceKey::from_seed([0; 32]));
    scenario
        .tunables
        .apply(&mut gateway_config, &mut node_config);
    let links = scenario
        .links
        .iter()
        .map(|(a, b, patch)| (link_pairs(scenario, &gateways, &devices, a, b), *patch))
        .collect();
    let skews = scenario
        .skews
        .iter()
        .flat_map(|(target, offset)| {
            static_hosts(scenario, &gateways, &devices, target)
                .into_iter()
                .map(move |host| (host, *offset))
        })
        .collect();
    let mut approximations = Vec::new();
    if scenario.invariants.contains(&Invariant::SingleAuthority) {
        approximations.push(
            "`single-authority`: read from each running gateway's machine every millisecond (the model layer checks after every step); a seq given twice would reach members as two messages at one seq (`order`, `no-duplicate`)".to_string(),
        );
    }
    if !scenario.disks.is_empty() {
        approximations.push(
            "`disk … commit`: the drivers commit to real redb files; their latency is redb's"
                .to_string(),
        );
    }
    let patches =
        scenario
            .links
            .iter()
            .map(|(_, _, p)| *p)
            .chain(scenario.schedule.iter().filter_map(|s| match &s.action {
                Action::Network(p) | Action::Link(_, _, p) => Some(*p),
                _ => None,
            }));
    let (mut reorders, mut loses) = (
        profile.reorder > 0.0,
        profile.loss > 0.0 || profile.duplicate > 0.0,
    );
    for patch in patches {
        reorders |= patch.reorder.is_some_and(|r| r > 0.0);
        loses |= patch.loss.is_some_and(|l| l > 0.0) || patch.duplicate.is_some_and(|d| d > 0.0);
    }
    if reorders {
        approximations.push(
            "reorder: datagrams reorder through turmoil's random latencies; QUIC streams deliver frames in order".to_string(),
        );
    }
    if loses {
        approximations.push(
            "loss and duplication apply to UDP datagrams, which QUIC retransmits and deduplicates, not to Sund frames".to_string(),
        );
    }
    if !scenario.skews.is_empty()
        || scenario
            .schedule
            .iter()
            .any(|s| matches!(s.action, Action::ClockJump(..)))
    {
        approximations.push(
            "`skew` and `clock`: a host's driver clock starts offset (a jump is read at its next start, as on the model layer); its timers run on turmoil's one clock".to_string(),
        );
    }
    Ok(Plan {
        gateways,
        devices,
        conversations,
        sends,
        network: profile,
        links,
        skews,
        schedule: scenario.schedule.clone(),
        gateway_config,
        node_timers: NodeTimers::of(&node_config),
        gaps_allowed: scenario.tunables.retention.is_some() || scenario.tunables.mailbox.is_some(),
        approximations,
    })
}

/// Whether the drivers can carry out `action`.
fn supported(action: &Action) -> Result<(), &'static str> {
    match action {
        Action::Partition(..)
        | Action::Heal(..)
        | Action::HealAll
        | Action::Isolate(_)
        | Action::Rejoin(_)
        | Action::Hold(..)
        | Action::Release(..)
        | Action::Block(..)
        | Action::Unblock(..)
        | Action::Disconnect(_)
        | Action::Crash(_)
        | Action::Restart(_)
        | Action::FillDisk(_)
        | Action::FreeDisk(_)
        | Action::LieDisk(_)
        | Action::HonestDisk(_)
        | Action::Drain(_) => Ok(()),
        Action::Network(patch) | Action::Link(_, _, patch) if patch.bandwidth_bps.is_some() => {
            Err("sets a bandwidth: turmoil's links have none")
        }
        Action::Network(_) | Action::Link(..) | Action::ClockJump(..) => Ok(()),
        Action::Handover(..) => Ok(()),
        Action::Revoke(_) => Err("needs trust state the driver layer's checker does not follow"),
        Action::Relay(..) => {
            Err("queues a test entry inside the gateway's machine, which the drivers do not expose")
        }
        Action::Contact(..) | Action::Invisible(..) | Action::Watch(..) => {
            Err("needs contacts and presence in the drivers' plan")
        }
        Action::Commit(..) | Action::SendFile { .. } => Err("needs MLS"),
        Action::StallDisk(_) | Action::ResumeDisk(_) => {
            Err("needs a slow disk: simulated drivers commit inline, on turmoil's one thread")
        }
        Action::Drift(..) => Err("needs a clock that runs at another rate: tokio's runs at one"),
    }
}

/// The pairs of hosts that talk (a device and its home gateway, two gateways that federate)
/// whose link a `link A B` names, each pair once with its names in order.
pub fn link_pairs(
    scenario: &Scenario,
    gateways: &[GatewayPlan],
    devices: &[DevicePlan],
    a: &Target,
    b: &Target,
) -> Vec<(String, String)> {
    let (xs, ys) = (
        static_hosts(scenario, gateways, devices, a),
        static_hosts(scenario, gateways, devices, b),
    );
    let talking = talking_pairs(gateways, devices);
    let mut out: Vec<(String, String)> = xs
        .iter()
        .flat_map(|x| ys.iter().map(move |y| ordered(x, y)))
        .filter(|pair| talking.contains(pair))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Every pair of hosts that talk: each device with its home gateway, each two gateways that
/// federate.
pub fn talking_pairs(gateways: &[GatewayPlan], devices: &[DevicePlan]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = devices
        .iter()
        .map(|d| ordered(&d.host, &gateways[d.home].host))
        .collect();
    for g in gateways {
        for &peer in &g.peers {
            out.push(ordered(&g.host, &gateways[peer].host));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// A pair of host names, the smaller first.
pub fn ordered(x: &str, y: &str) -> (String, String) {
    if x <= y {
        (x.to_string(), y.to_string())
    } else {
        (y.to_string(), x.to_string())
    }
}

/// The turmoil hosts a target names, without random draws (for statements read once).
pub fn static_hosts(
    scenario: &Scenario,
    gateways: &[GatewayPlan],
    devices: &[DevicePlan],
    target: &Target,
) -> Vec<String> {
    match target {
        Target::Gateway(name) => vec![name.clone()],
        Target::AllGateways => gateways.iter().map(|g| g.host.clone()).collect(),
        Target::RandomGateway => Vec::new(),
        other => resolve(scenario, devices, other)
            .into_iter()
            .map(|i| devices[i].host.clone())
            .collect(),
    }
}

/// The devices a target names (gateways and random targets name none here).
pub fn resolve(scenario: &Scenario, devices: &[DevicePlan], target: &Target) -> Vec<usize> {
    let of_user = |user: &str| -> Vec<usize> {
        devices
            .iter()
            .enumerate()
            .filter(|(_, d)| d.name.rsplit_once('/').map(|(u, _)| u) == Some(user))
            .map(|(i, _)| i)
            .collect()
    };
    match target {
        Target::User(user) => of_user(user),
        Target::Device(user, n) => of_user(user)
            .get(*n as usize)
            .copied()
            .into_iter()
            .collect(),
        Target::UserGlob(prefix) => scenario
            .users
            .iter()
            .filter(|u| u.name.starts_with(prefix.as_str()))
            .flat_map(|u| of_user(&u.name))
            .collect(),
        Target::AllDevices => (0..devices.len()).collect(),
        Target::Gateway(_) | Target::AllGateways | Target::RandomDevice | Target::RandomGateway => {
            Vec::new()
        }
    }
}
