//! Swarm runs: one seed draws a whole scenario — topology, workload and fault mix, with their
//! rates — so that different seeds explore very different worlds (swarm testing, as
//! TigerBeetle's VOPR does it).
//!
//! The generator writes ordinary DSL text, which is then parsed like any file in `scenarios/`.
//! A failing swarm seed is therefore replayed, shared and shrunk as a plain `.sund` file; nothing
//! about a run depends on the generator once its text exists.
//!
//! Each fault kind is switched on or off per seed (most seeds run a few kinds at high rates
//! rather than every kind at low ones, which is what lets a swarm reach states a uniform mix
//! never does). [`Generated::mix`] names the kinds a seed switched on; a swarm reports how many
//! distinct mixes it covered.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::rng::SimRng;

/// ChaCha stream of the generator: independent of every stream a run draws from its seed.
const GENERATOR_STREAM: u64 = 0x0053_5741_524d;
/// The stream floods are drawn from (see `draw_flood`).
const FLOOD_STREAM: u64 = 0x0046_4c4f_4f44;
/// The stream contacts and presence are drawn from (see `draw_presence`).
const PRESENCE_STREAM: u64 = 0x0050_5245_5345;
/// The stream the group of a user's own devices is drawn from (see `draw_own_group`).
const OWN_STREAM: u64 = 0x004f_574e_4752;
/// The stream federation links are drawn from (see `draw_federation`).
const FEDERATION_STREAM: u64 = 0x0046_4544_4552;
/// The stream presence across domains is drawn from (see `draw_presence_abroad`).
const PRESENCE_ABROAD_STREAM: u64 = 0x0050_5241_4252;
/// The stream invitation limits are drawn from (see `draw_invitation_limit`).
const INVITATION_STREAM: u64 = 0x0049_4e56_4954;
/// The stream graceful drains of the gateway are drawn from (see `draw_drain`).
const DRAIN_STREAM: u64 = 0x0044_5241_494e;
/// The stream of [`draw_admins_abroad`].
const ADMINS_STREAM: u64 = 0x0041_444d_494e;
/// The stream of [`draw_blocks`].
const BLOCKS_STREAM: u64 = 0x0042_4c4f_434b;

/// What kind of world a swarm seed builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    /// Plain conversations the operator creates: delivery, resume, redelivery, dedup.
    Plain,
    /// MLS rooms and DMs with membership churn, key updates and leaves.
    Mls,
    /// Revocations (certificates, CRL propagation) in plain conversations and rooms.
    Trust,
    /// Any of the above, and their combinations, drawn per seed.
    Mixed,
}

impl Family {
    /// Every family with its command-line name.
    pub const ALL: &'static [(&'static str, Family)] = &[
        ("plain", Family::Plain),
        ("mls", Family::Mls),
        ("trust", Family::Trust),
        ("mixed", Family::Mixed),
    ];

    /// Looks a family up by its command-line name.
    pub fn parse(name: &str) -> Option<Family> {
        Family::ALL
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| *f)
    }

    /// The command-line name.
    pub fn name(self) -> &'static str {
        Family::ALL
            .iter()
            .find(|(_, f)| *f == self)
            .expect("every family is named")
            .0
    }
}

/// A scenario drawn from one swarm seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generated {
    /// The seed: it drew the scenario and is the scenario's own `seed` line.
    pub seed: u64,
    /// The family it was drawn from (for `Mixed`, the family the seed drew).
    pub family: Family,
    /// The scenario, as DSL text.
    pub text: String,
    /// The fault kinds switched on (the seed's fault mix).
    pub mix: BTreeSet<&'static str>,
}

impl Generated {
    /// The scenario's name (and file stem when written out).
    pub fn name(&self) -> String {
        format!("swarm-{}", self.seed)
    }
}

/// Every fault kind a swarm can switch on, for coverage reports.
pub const FAULT_KINDS: &[&str] = &[
    "loss",
    "duplicate",
    "reorder",
    "slow-links",
    "link-fault",
    "skew",
    "device-disk",
    "gateway-disk",
    "partition",
    "isolate",
    "hold",
    "disconnect",
    "crash-device",
    "crash-gateway",
    "small-window",
    "fast-timers",
    "mls-churn",
    "revoke",
    "disk-stall",
    "disk-full",
    "one-way",
    "clock-drift",
    "clock-jump",
    "bandwidth",
    "lying-disk",
    "files",
    "flood",
    "presence",
    "own-devices",
    "invitation-limit",
    "federation",
    "spanning",
    "handover",
    "peer-limit",
    "drain",
    "mls-spanning",
    "mls-handover",
    "presence-abroad",
    "admins-abroad",
    "blocks",
];

struct Draw {
    rng: SimRng,
}

impl Draw {
    fn chance(&mut self, p: f64) -> bool {
        self.rng.chance(p)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        self.rng.range_inclusive(lo, hi)
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.rng.index(items.len())]
    }
    /// A probability in percent with one decimal, between `lo` and `hi` percent.
    fn percent(&mut self, lo: f64, hi: f64) -> String {
        let tenths = self.range((lo * 10.0) as u64, (hi * 10.0) as u64);
        format!("{}.{}%", tenths / 10, tenths % 10)
    }
}

/// A user of the generated topology.
struct User {
    name: String,
    devices: u64,
}

/// A conversation of the generated topology.
struct Conv {
    name: String,
    mls: bool,
    /// Indexes into the users.
    members: Vec<usize>,
}

/// Draws the scenario of one swarm seed.
pub fn generate(seed: u64, family: Family) -> Generated {
    let mut d = Draw {
        rng: SimRng::from_seed(seed).with_stream(GENERATOR_STREAM),
    };
    let family = match family {
        Family::Mixed => *d.pick(&[Family::Plain, Family::Mls, Family::Trust]),
        f => f,
    };
    let mut mix = BTreeSet::new();
    let mut out = String::new();
    let duration_s = d.range(8, 25);
    let _ = writeln!(
        out,
        "# Drawn by `cargo sim --swarm` from seed {seed} (family {}).",
        family.name()
    );
    let _ = writeln!(out, "name swarm-{seed}");
    let _ = writeln!(out, "seed {seed}");
    let _ = writeln!(out, "duration {duration_s}s");
    let _ = writeln!(out, "liveness within 90s");
    let _ = writeln!(out);
    let _ = writeln!(out, "gateway gw");
    // Drawn first, from its own stream: with links, the other gateways are declared now and
    // every user and conversation names its gateway; nothing else the seed draws changes.
    let federation = draw_federation(seed, family, duration_s);
    let home = if federation.is_some() {
        " gateway gw"
    } else {
        ""
    };
    if let Some(links) = &federation {
        for g in &links.gateways {
            let _ = writeln!(out, "gateway {g}");
        }
    }

    // Topology. MLS groups are costly to simulate (every commit is real HPKE and signatures),
    // so MLS worlds are smaller.
    let (users_max, devices_max) = match family {
        Family::Plain => (6, 3),
        Family::Mls | Family::Trust | Family::Mixed => (4, 2),
    };
    let users: Vec<User> = (0..d.range(2, users_max))
        .map(|i| User {
            name: format!("u{i}"),
            devices: d.range(1, devices_max),
        })
        .collect();
    for u in &users {
        let _ = writeln!(out, "user {} devices {}{home}", u.name, u.devices);
    }
    let mut convs: Vec<Conv> = Vec::new();
    let plain_count = match family {
        Family::Plain => d.range(1, 3),
        _ => d.range(0, 1),
    };
    let mls_count = match family {
        Family::Plain => 0,
        Family::Mls => d.range(1, 2),
        _ => d.range(0, 1),
    };
    let mls_count = if plain_count + mls_count == 0 {
        1
    } else {
        mls_count
    };
    for i in 0..plain_count {
        let members = some_users(&mut d, users.len());
        convs.push(Conv {
            name: format!("c{i}"),
            mls: false,
            members,
        });
    }
    for i in 0..mls_count {
        let dm = d.chance(0.4);
        let members = if dm {
            let a = d.rng.index(users.len());
            let b = (a + 1 + d.rng.index(users.len() - 1)) % users.len();
            vec![a, b]
        } else {
            some_users(&mut d, users.len())
        };
        convs.push(Conv {
            name: format!("{}{i}", if dm { "dm" } else { "room" }),
            mls: true,
            members,
        });
    }
    for c in &convs {
        let members: Vec<&str> = c.members.iter().map(|&u| users[u].name.as_str()).collect();
        let kind = match (c.mls, c.name.starts_with("dm")) {
            (false, _) => "",
            (true, true) => " kind dm",
            (true, false) => " kind room",
        };
        let _ = writeln!(
            out,
            "conversation {}{home}{kind} members {}",
            c.name,
            members.join(" ")
        );
    }
    let _ = writeln!(out);

    // Network, disks, clocks, tunables.
    let mut network = String::new();
    let slow = d.chance(0.25);
    if slow {
        mix.insert("slow-links");
        let lo = d.range(5, 40);
        let _ = write!(network, " latency {lo}ms..{}ms", lo + d.range(10, 150));
    } else {
        let lo = d.range(1, 5);
        let _ = write!(network, " latency {lo}ms..{}ms", lo + d.range(0, 20));
    }
    if d.chance(0.5) {
        mix.insert("loss");
        let p = if d.chance(0.3) {
            d.percent(5.0, 20.0)
        } else {
            d.percent(0.1, 3.0)
        };
        let _ = write!(network, " loss {p}");
    }
    if d.chance(0.4) {
        mix.insert("duplicate");
        let p = d.percent(0.1, 5.0);
        let _ = write!(network, " duplicate {p}");
    }
    if d.chance(0.4) {
        mix.insert("reorder");
        let p = d.percent(0.5, 10.0);
        let _ = write!(network, " reorder {p}");
    }
    let _ = writeln!(out, "network{network}");
    if d.chance(0.6) {
        mix.insert("gateway-disk");
        let ms = *d.pick(&[0u64, 2, 5, 20, 50]);
        let _ = writeln!(out, "disk gw commit {ms}ms");
    }
    // Devices commit in 0 ms unless told otherwise, which hides every bug of acknowledging
    // before a write is durable: most seeds give some devices a real commit latency.
    if d.chance(0.7) {
        mix.insert("device-disk");
        for u in &users {
            if d.chance(0.7) {
                let ms = *d.pick(&[1u64, 2, 5, 10, 30]);
                let _ = writeln!(out, "disk {} commit {ms}ms", u.name);
            }
        }
    }
    if d.chance(0.3) {
        mix.insert("skew");
        for u in &users {
            if d.chance(0.5) {
                let sign = if d.chance(0.5) { '+' } else { '-' };
                let ms = d.range(1, 2_000);
                let _ = writeln!(out, "skew {}/0 {sign}{ms}ms", u.name);
            }
        }
    }
    let small_window = d.chance(0.25);
    if small_window {
        mix.insert("small-window");
        let _ = writeln!(out, "config window {}", d.range(1, 4));
    }
    if d.chance(0.25) {
        mix.insert("fast-timers");
        let _ = writeln!(out, "config resend-after {}ms", d.range(200, 1_500));
        let _ = writeln!(out, "config redeliver-after {}ms", d.range(200, 1_500));
    }
    let _ = writeln!(out);

    // Workload: every conversation carries traffic from some of its members.
    for c in &convs {
        let senders = 1 + d.rng.index(c.members.len());
        for &u in c.members.iter().take(senders) {
            let user = &users[u];
            let from = if user.devices > 1 && d.chance(0.5) {
                format!("{}/{}", user.name, d.range(0, user.devices - 1))
            } else {
                user.name.clone()
            };
            // A small window or slow links bound a device's delivery rate (a window per round
            // trip, and a lost frame stalls it until redelivery): faster workloads than this
            // cannot converge within the liveness bound however correct the protocol is. Every
            // member receives what all the conversation's senders send, so the bound is on
            // their sum (swarm seed 21453: five senders at 250 ms–1 s each into a window of 1).
            let period = if c.mls {
                d.range(150, 1_000)
            } else if small_window || slow {
                d.range(250, 1_000) * senders as u64
            } else {
                d.range(30, 600)
            };
            let _ = writeln!(out, "send {} from {from} every {period}ms", c.name);
        }
    }
    let _ = writeln!(out);

    // Faults over time: each kind on or off for this seed, then a few episodes of it.
    let end_ms = duration_s * 1_000;
    let episode = |d: &mut Draw, longest_ms: u64| -> (u64, u64) {
        let start = d.range(500, end_ms.saturating_sub(1_000).max(600));
        let stop = (start + d.range(100, longest_ms)).min(end_ms - 100);
        (start, stop.max(start + 1))
    };
    let any_device = |d: &mut Draw| -> String {
        let u = &users[d.rng.index(users.len())];
        format!("{}/{}", u.name, d.range(0, u.devices - 1))
    };
    let any_user_or_device = |d: &mut Draw| -> String {
        if d.chance(0.5) {
            users[d.rng.index(users.len())].name.clone()
        } else {
            any_device(d)
        }
    };
    if d.chance(0.4) {
        mix.insert("partition");
        for _ in 0..d.range(1, 4) {
            let target = any_user_or_device(&mut d);
            let (a, b) = episode(&mut d, 8_000);
            let _ = writeln!(out, "at {a}ms partition {target} gw");
            let _ = writeln!(out, "at {b}ms heal {target} gw");
        }
    }
    if d.chance(0.2) {
        mix.insert("isolate");
        let (a, b) = episode(&mut d, 5_000);
        let _ = writeln!(out, "at {a}ms isolate gw");
        let _ = writeln!(out, "at {b}ms rejoin gw");
    }
    if d.chance(0.3) {
        mix.insert("hold");
        for _ in 0..d.range(1, 3) {
            let target = any_user_or_device(&mut d);
            let (a, b) = episode(&mut d, 4_000);
            let _ = writeln!(out, "at {a}ms hold {target} gw");
            let _ = writeln!(out, "at {b}ms release {target} gw");
        }
    }
    if d.chance(0.4) {
        mix.insert("disconnect");
        let period = *d.pick(&[20u64, 100, 500, 2_000]);
        let _ = writeln!(
            out,
            "every {period}ms start 1s jitter {period}ms disconnect random-device"
        );
    }
    if d.chance(0.35) {
        mix.insert("crash-device");
        for _ in 0..d.range(1, 4) {
            let target = any_device(&mut d);
            let (a, b) = episode(&mut d, 3_000);
            let _ = writeln!(out, "at {a}ms crash {target}");
            let _ = writeln!(out, "at {b}ms restart {target}");
        }
    }
    if d.chance(0.3) {
        mix.insert("crash-gateway");
        for _ in 0..d.range(1, 3) {
            let (a, b) = episode(&mut d, 2_000);
            let _ = writeln!(out, "at {a}ms crash gw");
            let _ = writeln!(out, "at {b}ms restart gw");
        }
    }
    if d.chance(0.25) {
        mix.insert("link-fault");
        let target = any_user_or_device(&mut d);
        let (a, b) = episode(&mut d, 6_000);
        let p = d.percent(20.0, 60.0);
        let _ = writeln!(out, "at {a}ms link {target} gw loss {p}");
        let _ = writeln!(out, "at {b}ms link {target} gw loss 0%");
    }
    if d.chance(0.25) {
        mix.insert("disk-stall");
        for _ in 0..d.range(1, 3) {
            let target = if d.chance(0.4) {
                "gw".to_string()
            } else {
                any_device(&mut d)
            };
            let (a, b) = episode(&mut d, 4_000);
            let _ = writeln!(out, "at {a}ms stall-disk {target}");
            let _ = writeln!(out, "at {b}ms resume-disk {target}");
        }
    }
    if d.chance(0.2) {
        mix.insert("disk-full");
        for _ in 0..d.range(1, 2) {
            let target = if d.chance(0.4) {
                "gw".to_string()
            } else {
                any_device(&mut d)
            };
            let (a, b) = episode(&mut d, 4_000);
            let _ = writeln!(out, "at {a}ms fill-disk {target}");
            let _ = writeln!(out, "at {b}ms free-disk {target}");
        }
    }
    if d.chance(0.25) {
        mix.insert("one-way");
        for _ in 0..d.range(1, 3) {
            let target = any_user_or_device(&mut d);
            let (a, b) = episode(&mut d, 6_000);
            let (from, to) = if d.chance(0.5) {
                (target.as_str(), "gw")
            } else {
                ("gw", target.as_str())
            };
            let _ = writeln!(out, "at {a}ms block {from} {to}");
            let _ = writeln!(out, "at {b}ms unblock {from} {to}");
        }
    }
    if d.chance(0.2) {
        mix.insert("clock-drift");
        for u in &users {
            if d.chance(0.5) {
                let sign = if d.chance(0.5) { '+' } else { '-' };
                let _ = writeln!(out, "at 0s drift {} {sign}{}ppm", u.name, d.range(1, 2_000));
            }
        }
    }
    if d.chance(0.2) {
        mix.insert("clock-jump");
        // A jump shows when the process next starts: each comes with a restart.
        for _ in 0..d.range(1, 2) {
            let target = if d.chance(0.3) {
                "gw".to_string()
            } else {
                any_device(&mut d)
            };
            let (a, b) = episode(&mut d, 2_000);
            let sign = if d.chance(0.5) { '+' } else { '-' };
            let _ = writeln!(out, "at {a}ms clock {target} {sign}{}ms", d.range(1, 5_000));
            let _ = writeln!(out, "at {a}ms crash {target}");
            let _ = writeln!(out, "at {b}ms restart {target}");
        }
    }
    if d.chance(0.15) {
        mix.insert("bandwidth");
        let target = any_user_or_device(&mut d);
        // 64 kbit/s was drawn too, and a busy seed could not catch up within its liveness
        // bound after heal (plain seeds 199, 1607, 3757): a workload too big for the link, not
        // a protocol failure. One draw either way, so later draws are unchanged.
        let kbit = *d.pick(&[256u64, 1_000, 4_000]);
        let _ = writeln!(out, "link {target} gw bandwidth {kbit}kbit");
    }
    let mls_convs: Vec<&Conv> = convs.iter().filter(|c| c.mls).collect();
    let mut readds = false;
    // (blocker, blocked): a member and the user who removes and adds members back.
    let mut block_pairs: Vec<(String, String)> = Vec::new();
    if !mls_convs.is_empty() && d.chance(0.7) {
        mix.insert("mls-churn");
        for c in &mls_convs {
            let owner = &users[c.members[0]].name;
            let period = d.range(2, 6);
            let _ = writeln!(
                out,
                "every {period}s start 2s commit {} from random-device update",
                c.name
            );
            if d.chance(0.6) {
                let period = d.range(3, 8);
                let _ = writeln!(
                    out,
                    "every {period}s start 3s commit {} from {owner}/0 remove",
                    c.name
                );
                let _ = writeln!(
                    out,
                    "every {period}s start {}s commit {} from {owner}/0 add",
                    3 + d.range(1, 2),
                    c.name
                );
                readds = true;
                // In a room (in a DM, blocking the other user ends it for good).
                for &m in c.members[1..].iter().filter(|_| c.name.starts_with("room")) {
                    block_pairs.push((users[m].name.clone(), owner.clone()));
                }
            }
            if d.chance(0.3) {
                let leaver = &users[*c.members.last().expect("two members")];
                let period = d.range(5, 12);
                let _ = writeln!(
                    out,
                    "every {period}s start 4s commit {} from {}/0 leave",
                    c.name, leaver.name
                );
            }
        }
    }
    let revokes = family == Family::Trust;
    if revokes {
        mix.insert("revoke");
        for _ in 0..d.range(1, 2) {
            let target = any_device(&mut d);
            let at = d.range(2_000, end_ms - 1_000);
            let _ = writeln!(out, "at {at}ms revoke {target}");
        }
    }
    // Drawn last, so that every earlier draw of a seed stays as it was before this fault kind
    // existed. Plain conversations only: a lost MLS commit is not handled yet.
    if family == Family::Plain && d.chance(0.15) {
        mix.insert("lying-disk");
        let (a, b) = episode(&mut d, 8_000);
        let crash = d.range(a, b);
        let down = d.range(100, 3_000);
        let _ = writeln!(out, "at {a}ms lie-disk gw");
        let _ = writeln!(out, "at {crash}ms crash gw");
        let _ = writeln!(out, "at {}ms restart gw", crash + down);
        let _ = writeln!(out, "at {b}ms honest-disk gw");
    }
    // Files, drawn after everything else for the same reason: into an MLS conversation (a
    // file's manifest is an MLS message), a few hundred kB to a few MB, sometimes an edit of
    // the one before so that deduplication is exercised under the faults drawn above.
    let files = !mls_convs.is_empty() && d.chance(0.3);
    if files {
        mix.insert("files");
        let mut previous: Option<String> = None;
        let mut at = 0;
        for i in 0..d.range(1, 3) {
            let c = d.pick(&mls_convs);
            let sender = &users[*d.pick(&c.members)].name;
            // In order, so that an edit comes after the file it edits.
            at = d.range(at + 1_000, (at + 1_000).max(end_ms * 2 / 3));
            let size = d.range(50_000, 4_000_000);
            let like = match &previous {
                Some(p) if d.chance(0.5) => format!(" like {p}"),
                _ => String::new(),
            };
            let name = format!("f{i}");
            let _ = writeln!(
                out,
                "at {at}ms send-file {} from {sender} size {size} name {name}{like}",
                c.name
            );
            previous = Some(name);
        }
    }
    let flood = draw_flood(seed, duration_s, &users, &convs, &mix, &mut out);
    if flood {
        mix.insert("flood");
    }
    let presence = draw_presence(seed, family, duration_s, &users, &mix, &mut out);
    if presence {
        mix.insert("presence");
    }
    let own = draw_own_group(seed, family, duration_s, &users, home, &mut out);
    if own {
        mix.insert("own-devices");
    }
    if let Some(links) = &federation {
        mix.insert("federation");
        if links.spanning {
            mix.insert("spanning");
        }
        if links.handovers {
            mix.insert("handover");
        }
        if links.peer_limit {
            mix.insert("peer-limit");
        }
        if links.mls_spanning {
            mix.insert("mls-spanning");
        }
        if links.mls_handovers {
            mix.insert("mls-handover");
        }
        out.push_str(&links.text);
        if presence && draw_presence_abroad(seed, duration_s, &links.foreign_users, &mut out) {
            mix.insert("presence-abroad");
        }
    }
    let room_abroad = federation
        .as_ref()
        .map_or(&[][..], |f| &f.mls_room_abroad[..]);
    let admin_abroad = draw_admins_abroad(seed, duration_s, room_abroad, &mut out);
    let admins_abroad = admin_abroad.is_some();
    if let Some(admin) = admin_abroad {
        mix.insert("admins-abroad");
        for member in room_abroad.iter().filter(|m| **m != admin) {
            block_pairs.push((member.clone(), admin.clone()));
        }
    }
    // With admins abroad, the room's creation invites its other members at once.
    let spanning_invites = if admins_abroad {
        room_abroad.len() as u64
    } else {
        0
    };
    let invitation_limit = (readds || admins_abroad)
        && draw_invitation_limit(seed, &convs, spanning_invites, &mut out);
    if invitation_limit {
        mix.insert("invitation-limit");
    }
    if draw_drain(seed, duration_s, &mut out) {
        mix.insert("drain");
    }
    let blocks = draw_blocks(seed, duration_s, &block_pairs, &mut out);
    if blocks {
        mix.insert("blocks");
    }
    let _ = writeln!(out);
    let mut checks = vec!["no-loss", "no-duplicate", "order", "converge"];
    let mls_spanning = federation.as_ref().is_some_and(|f| f.mls_spanning);
    if !mls_convs.is_empty() || own || mls_spanning {
        checks.extend(["epoch-agreement", "decrypt"]);
    }
    if files {
        checks.push("files");
    }
    if revokes {
        checks.extend(["revoked-never-authenticates", "crl-converge"]);
    }
    if flood || invitation_limit {
        checks.push("rate-limits");
    }
    if presence {
        checks.extend(["presence-privacy", "contacts-converge"]);
    }
    if blocks {
        checks.push("blocks-hold");
    }
    if federation.is_some() {
        checks.push("federation-links");
    }
    if federation.as_ref().is_some_and(|f| f.handovers) {
        checks.push("single-authority");
    }
    if federation.as_ref().is_some_and(|f| f.peer_limit) {
        checks.push("peer-limit");
    }
    let _ = writeln!(out, "check {}", checks.join(" "));
    debug_assert!(mix.iter().all(|k| FAULT_KINDS.contains(k)));
    Generated {
        seed,
        family,
        text: out,
        mix,
    }
}

/// Draws, from a stream of its own (so the rest of a seed's scenario is what it was before
/// floods existed), whether one device floods a plain conversation against a per-device send
/// limit, and writes the limit and the flood. The limit (100–200 messages a second) is above
/// what the ordinary workload sends; the flood (one message a millisecond for 1–2 s) is far
/// above it. Not drawn where the gateway's acknowledgements may lag their admission by more
/// than the `rate-limits` check allows (stalled disks, clock jumps), nor where slow
/// links or a small window keep a flood's backlog from draining within the liveness bound.
fn draw_flood(
    seed: u64,
    duration_s: u64,
    users: &[User],
    convs: &[Conv],
    mix: &BTreeSet<&'static str>,
    out: &mut String,
) -> bool {
    let mut d = Draw {
        rng: SimRng::from_seed(seed).with_stream(FLOOD_STREAM),
    };
    let unsuited = [
        "slow-links",
        "bandwidth",
        "small-window",
        "clock-jump",
        "disk-stall",
    ];
    let plain: Vec<&Conv> = convs.iter().filter(|c| !c.mls).collect();
    if !d.chance(0.3) || plain.is_empty() || unsuited.iter().any(|k| mix.contains(k)) {
        return false;
    }
    let conv = *d.pick(&plain);
    let flooder = &users[*d.pick(&conv.members)];
    let rate = d.range(100, 200);
    let burst = d.range(20, 100);
    let start_ms = d.range(500, (duration_s * 1_000 / 2).max(600));
    let stop_ms = start_ms + d.range(1_000, 2_000);
    let _ = writeln!(out, "config send-limit {rate} burst {burst}");
    let _ = writeln!(
        out,
        "send {} from {}/0 every 1ms start {start_ms}ms stop {stop_ms}ms",
        conv.name, flooder.name
    );
    true
}

/// Federation links a seed draws: the extra gateways to declare, and the rest of its lines.
struct FederationDraw {
    gateways: Vec<&'static str>,
    text: String,
    /// A plain conversation spans the domains.
    spanning: bool,
    /// Its authority is handed over while it runs.
    handovers: bool,
    /// The gateways limit what each peer relays (tight enough for a backlog to meet it).
    peer_limit: bool,
    /// An MLS DM or room spans the domains (`mspan0`), changed by members of every domain.
    mls_spanning: bool,
    /// Its authority is handed over while it runs.
    mls_handovers: bool,
    /// The users homed at the other gateways (`span0`'s members there).
    foreign_users: Vec<String>,
    /// If `mspan0` is a room: its members' users homed at the other gateways.
    mls_room_abroad: Vec<String>,
}

/// Draws, from a stream of its own, whether `gw` federates with one or two more gateways
/// (MLS and trust families: the plain family is also the drivers' swarm, whose gateway driver
/// carries no links yet): every pair linked, entries relayed both ways every 20–300 ms, and
/// link faults — a cut between two gateways, a crash of a peer gateway, resets of its links.
/// Checked by `federation-links`. Half of those worlds also get a plain conversation spanning
/// the domains (`span0`): one or two users homed at the other gateways with `u0` of `gw`,
/// homed at any of the gateways, each member sending into it; and half of those hand its
/// authority over one to three times, to gateways that keep a copy (checked by
/// `single-authority` too).
fn draw_federation(seed: u64, family: Family, duration_s: u64) -> Option<FederationDraw> {
    let mut d = Draw {
        rng: SimRng::from_seed(seed).with_stream(FEDERATION_STREAM),
    };
    if family == Family::Plain || !d.chance(0.2) {
        return None;
    }
    let gateways: Vec<&'static str> = if d.chance(0.5) {
        vec!["gwx"]
    } else {
        vec!["gwx", "gwy"]
    };
    let all: Vec<&str> = std::iter::once("gw")
        .chain(gateways.iter().copied())
        .collect();
    let mut text = String::new();
    let end_ms = duration_s * 1_000;
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            let _ = writeln!(text, "federate {a} {b}");
            for (from, to) in [(a, b), (b, a)] {
                let _ = writeln!(
                    text,
                    "every {}ms stop {end_ms}ms relay {from} to {to}",
                    d.range(20, 300)
                );
            }
        }
    }
    let peer = *d.pick(&gateways);
    if d.chance(0.5) {
        let a = d.range(500, end_ms * 2 / 3);
        let b = d.range(a + 100, end_ms);
        let _ = writeln!(text, "at {a}ms partition gw {peer}");
        let _ = writeln!(text, "at {b}ms heal gw {peer}");
    }
    if d.chance(0.5) {
        let a = d.range(500, end_ms * 2 / 3);
        let b = d.range(a + 100, end_ms);
        let _ = writeln!(text, "at {a}ms crash {peer}");
        let _ = writeln!(text, "at {b}ms restart {peer}");
    }
    if d.chance(0.5) {
        let _ = writeln!(text, "disk {peer} commit {}ms", d.range(1, 30));
    }
    if d.chance(0.3) {
        let _ = writeln!(
            text,
            "every {}ms start 1s disconnect {peer}",
            d.range(500, 5_000)
        );
    }
    let spanning = d.chance(0.5);
    // The gateways that keep a copy of `span0`: `gw` (u0's), the others' and its home.
    let mut member_gateways: Vec<&str> = vec!["gw"];
    let mut foreign_users = Vec::new();
    if spanning {
        let mut members = vec!["u0".to_string()];
        for i in 0..d.range(1, 2) {
            let name = format!("f{i}");
            let devices = d.range(1, 2);
            let gateway = *d.pick(&gateways);
            let _ = writeln!(text, "user {name} devices {devices} gateway {gateway}");
            member_gateways.push(gateway);
            foreign_users.push(name.clone());
            members.push(name);
        }
        let home = *d.pick(&all);
        let _ = writeln!(
            text,
            "conversation span0 gateway {home} members {}",
            members.join(" ")
        );
        for member in &members {
            let _ = writeln!(
                text,
                "send span0 from {member} every {}ms",
                d.range(200, 1_000)
            );
        }
        member_gateways.push(home);
    }
    let handovers = spanning && d.chance(0.5);
    if handovers {
        // Each to another gateway than the one the last handed it to (or its home).
        let mut authority = *member_gateways.last().expect("the home");
        let mut at = 0;
        for _ in 0..d.range(1, 3) {
            let others: Vec<&str> = member_gateways
                .iter()
                .copied()
                .filter(|g| *g != authority)
                .collect();
            if others.is_empty() {
                break;
            }
            authority = *d.pick(&others);
            at = d.range(at.max(500), end_ms * 3 / 4);
            let _ = writeln!(text, "at {at}ms handover span0 to {authority}");
        }
    }
    // Drawn last, so that what each seed drew before the limit existed stays as it was.
    // Above what the members send (at most about 20 a second in all), below what a backlog
    // after a cut or a crash brings at once.
    let peer_limit = spanning && d.chance(0.4);
    if peer_limit {
        let _ = writeln!(
            text,
            "config peer-limit {} burst {}",
            d.range(25, 50),
            d.range(4, 20)
        );
    }
    let mls_spanning = d.chance(0.5);
    let mut mls_room_abroad = Vec::new();
    let mls_handovers =
        mls_spanning && draw_mls_spanning(&mut d, &all, end_ms, &mut text, &mut mls_room_abroad);
    Some(FederationDraw {
        gateways,
        text,
        spanning,
        handovers,
        peer_limit,
        mls_spanning,
        mls_handovers,
        foreign_users,
        mls_room_abroad,
    })
}

/// In a world that draws presence and has users homed at other gateways, draws contacts
/// and watches across the domains, from a stream of its own: `u0` and each foreign user add
/// each other and watch everyone, and perhaps a foreign user hides for a while, or one side
/// blocks the other (and perhaps ends it), so that each gateway decides its own user's part
/// of the rule while the links are cut and the gateways crash.
fn draw_presence_abroad(seed: u64, duration_s: u64, foreign: &[String], out: &mut String) -> bool {
    if foreign.is_empty() {
        return false;
    }
    let mut d = Draw {
        rng: SimRng::from_seed(seed).with_stream(PRESENCE_ABROAD_STREAM),
    };
    let end_ms = duration_s * 1_000;
    let added = d.range(200, end_ms / 3);
    for f in foreign {
        let _ = writeln!(out, "at {added}ms contact add u0 {f}");
        let later = d.range(added, end_ms / 2);
        let _ = writeln!(out, "at {later}ms contact add {f} u0");
    }
    for who in std::iter::once("u0").chain(foreign.iter().map(String::as_str)) {
        let at = d.range(added, end_ms / 2);
        let _ = writeln!(out, "at {at}ms watch {who} all-devices");
    }
    let f = d.pick(foreign).clone();
    if d.chance(0.4) {
        draw_hiding(&mut d, &f, added, end_ms, out);
    }
    if d.chance(0.4) {
        let (a, b) = if d.chance(0.5) {
            ("u0", f.as_str())
        } else {
            (f.as_str(), "u0")
        };
        draw_block(&mut d, a, b, added, end_ms, out);
    }
    true
}

/// An MLS DM or room spanning the domains (`mspan0`, drawn after everything else of the
/// federation stream, so that what seeds drew before it stays as it was): its creator homed at
/// its gateway, one or two members homed at others (their devices join through their own
/// gateway), each sending into it; every member refreshes its keys now and then through its
/// own gateway; in a room the creator removes a random member (often another domain's) and
/// adds the missing ones back, and another domain's member may leave; in a DM the other user
/// may start it too, at once or a moment later. Last, in half the draws, its authority is
/// handed over once or twice to a member's gateway (returns true then).
fn draw_mls_spanning(
    d: &mut Draw,
    all: &[&str],
    end_ms: u64,
    text: &mut String,
    room_abroad: &mut Vec<String>,
) -> bool {
    let home = *d.pick(all);
    let _ = writeln!(text, "user mh devices {} gateway {home}", d.range(1, 2));
    let mut members = vec!["mh".to_string()];
    let dm = d.chance(0.3);
    let others = if dm { 1 } else { d.range(1, 2) };
    let abroad: Vec<&str> = all.iter().copied().filter(|g| *g != home).collect();
    let mut member_gateways = vec![home.to_string()];
    for i in 0..others {
        let name = format!("m{i}");
        let gateway = *d.pick(&abroad);
        member_gateways.push(gateway.to_string());
        let _ = writeln!(
            text,
            "user {name} devices {} gateway {gateway}",
            d.range(1, 2)
        );
        members.push(name);
    }
    if !dm {
        room_abroad.extend(members[1..].iter().cloned());
    }
    let kind = if dm { "dm" } else { "room" };
    let _ = writeln!(
        text,
        "conversation mspan0 gateway {home} kind {kind} members {}",
        members.join(" ")
    );
    for member in &members {
        let _ = writeln!(
            text,
            "send mspan0 from {member} every {}ms start 2s",
            d.range(300, 1_500)
        );
        if d.chance(0.6) {
            let _ = writeln!(
                text,
                "every {}ms start {}ms commit mspan0 from {member} update",
                d.range(3_000, 12_000),
                d.range(3_000, 8_000)
            );
        }
    }
    if !dm && d.chance(0.6) {
        let every = d.range(8_000, 20_000);
        let start = d.range(5_000, 10_000);
        let _ = writeln!(
            text,
            "every {every}ms start {start}ms commit mspan0 from mh/0 remove"
        );
        let _ = writeln!(
            text,
            "every {every}ms start {}ms commit mspan0 from mh/0 add",
            start + every / 2
        );
    }
    if !dm && d.chance(0.3) {
        let _ = writeln!(
            text,
            "at {}ms commit mspan0 from m0/0 leave",
            d.range(4_000, end_ms * 2 / 3)
        );
    }
    if dm && d.chance(0.5) {
        // m0 starts the DM too, as mh does (at 1 s) or a moment later: one DM results.
        let _ = writeln!(
            text,
            "at {}ms commit mspan0 from m0 start",
            1_000 + d.range(0, 400)
        );
    }
    // Drawn last, so that what each seed drew before MLS handovers existed stays as it was.
    if !d.chance(0.5) {
        return false;
    }
    // Each to another member's gateway than the one the last handed it to (or its home);
    // the old authority refuses one that comes before a commit took the last one's key.
    let mut authority = home.to_string();
    let mut at = 0;
    let mut drawn = false;
    for _ in 0..d.range(1, 2) {
        let others: Vec<&String> = member_gateways
            .iter()
            .filter(|g| **g != authority)
            .collect();
        if others.is_empty() {
            break;
        }
        authority = (*d.pick(&others)).clone();
        at = d.range(at.max(3_000), end_ms * 3 / 4);
        let _ = writeln!(text, "at {at}ms handover mspan0 to {authority}");
        drawn = true;
    }
    drawn
}

/// In a world whose MLS room spans the domains (`mspan0`, homed at `mh`'s gateway), draws
/// from a stream of its own whether `mh/0` makes a member of another domain an admin, who
/// then removes members and adds them back from its own domain: commits relayed to the home that bring users in
/// and take devices out, checked there against roles, blocks and (when drawn) the
/// invitation limit, which charges the relayed sender's user at the home.
fn draw_admins_abroad(
    seed: u64,
    duration_s: u64,
    room_abroad: &[String],
    out: &mut String,
) -> Option<String> {
    let mut d = Draw {
        rng: SimRng::from_seed(seed).with_stream(ADMINS_STREAM),
    };
    if room_abroad.is_empty() || !d.chance(0.5) {
        return None;
    }
    let end_ms = duration_s * 1_000;
    // One admin abroad, who removes members and adds them back (an admin may remove members
    // only, never the owner or another admin).
    let admin = d.pick(room_abroad).clone();
    let _ = writeln!(
        out,
        "at {}ms commit mspan0 from mh/0 admin {admin}",
        d.range(2_500, 4_000)
    );
    let every = d.range(2_000, 12_000);
    let start = d.range(5_000, (end_ms / 2).max(5_001));
    let _ = writeln!(
        out,
        "every {every}ms start {start}ms commit mspan0 from {admin}/0 remove"
    );
    let _ = writeln!(
        out,
        "every {every}ms start {}ms commit mspan0 from {admin}/0 add",
        start + every / 2
    );
    Some(admin)
}

/// Draws, from a stream of its own (so the rest of a seed's scenario is what it was before
/// blocks were drawn), whether a member of a room whose owner or admin removes members and
/// adds them back blocks that user at some moment, and in half the draws unblocks them later:
/// the adds of the blocker then fail (their KeyPackages are withheld, a commit made with
/// packages fetched just before is refused), and succeed again after the unblock. Checked by
/// `blocks-hold`; `pairs` are the (blocker, blocked) users to draw from.
fn draw_blocks(seed: u64, duration_s: u64, pairs: &[(String, String)], out: &mut String) -> bool {
    let mut d = Draw {
        rng: SimRng::from_seed(seed).with_stream(BLOCKS_STREAM),
    };
    if pairs.is_empty() || !d.chance(0.5) {
        return false;
    }
    let end_ms = duration_s * 1_000;
    let (blocker, blocked) = d.pick(pairs);
    let at = d.range(3_000, (end_ms * 2 / 3).max(3_001));
    let _ = writeln!(out, "at {at}ms contact block {blocker} {blocked}");
    if d.chance(0.5) {
        let back = d.range(at + 1_000, end_ms.saturating_sub(1_000).max(at + 1_001));
        let _ = writeln!(out, "at {back}ms contact unblock {blocker} {blocked}");
    }
    true
}

/// Draws, from a stream of its own (so the rest of a seed's scenario is what it was before
/// drains existed), whether the home gateway is drained as on SIGTERM once or twice (new
/// connections refused, every session told goodbye with a retry hint, the commits in flight
/// finished) and started again 0.2–4 s later: what an operator's restart does, beside the
/// crashes other streams draw.
fn draw_drain(seed: u64, duration_s: u64, out: &mut String) -> bool {
    let mut d = Draw {
        rng: SimRng::from_seed(seed).with_stream(DRAIN_STREAM),
    };
    if !d.chance(0.15) {
        return false;
    }
    let end_ms = duration_s * 1_000;
    let mut from = 500;
    let mut drawn = false;
    for _ in 0..d.range(1, 2) {
        if from + 300 >= end_ms {
            break;
        }
        let at = d.range(from, (from + end_ms) / 2);
        let back = at + d.range(200, 4_000);
        let _ = writeln!(out, "at {at}ms drain gw");
        let _ = writeln!(out, "at {back}ms restart gw");
        drawn = true;
        from = back + 100;
    }
    drawn
}

/// Draws, from a stream of its own (so the rest of a seed's scenario is what it was before),
/// whether a seed whose room owners remove and re-add members also runs under a small
/// invitation limit, which the re-adds soon exceed (one user every 6–15 s). The burst is what
/// the busiest creator invites when the conversations are made, plus up to two, so that
/// creation is never refused for good. Checked by `rate-limits`.
fn draw_invitation_limit(
    seed: u64,
    convs: &[Conv],
    spanning_invites: u64,
    out: &mut String,
) -> bool {
    let mut d = Draw {
        rng: SimRng::from_seed(seed).with_stream(INVITATION_STREAM),
    };
    if !d.chance(0.5) {
        return false;
    }
    let mut at_creation: BTreeMap<usize, u64> = BTreeMap::new();
    for c in convs.iter().filter(|c| c.mls) {
        *at_creation.entry(c.members[0]).or_default() += c.members.len() as u64 - 1;
    }
    let busiest = at_creation
        .values()
        .copied()
        .max()
        .unwrap_or(0)
        .max(spanning_invites);
    let burst = busiest.max(1) + d.range(0, 2);
    let per_hour = 3_600 / d.range(6, 15);
    let _ = writeln!(out, "config invitation-limit {per_hour} burst {burst}");
    true
}

/// Draws, from a stream of its own (so the rest of a seed's scenario is what it was before),
/// whether a user with several devices keeps the group of its own devices (`kind own`, where
/// `sund` keeps the contact book), its devices writing into it (as contact records go) and
/// updating its keys. Only in the MLS and trust families (the plain family is also what the
/// drivers' swarm runs, and they run no MLS).
fn draw_own_group(
    seed: u64,
    family: Family,
    duration_s: u64,
    users: &[User],
    home: &str,
    out: &mut String,
) -> bool {
    let mut d = Draw {
        rng: SimRng::from_seed(seed).with_stream(OWN_STREAM),
    };
    let several: Vec<&User> = users.iter().filter(|u| u.devices >= 2).collect();
    if family == Family::Plain || several.is_empty() || !d.chance(0.3) {
        return false;
    }
    let user = &d.pick(&several).name;
    let _ = writeln!(out, "conversation own0{home} kind own members {user}");
    let period = d.range(400, 1_500);
    let stop_ms = duration_s * 1_000;
    let _ = writeln!(
        out,
        "send own0 from {user} every {period}ms stop {stop_ms}ms"
    );
    let update = d.range(2, 6);
    let _ = writeln!(
        out,
        "every {update}s start 2s commit own0 from random-device update"
    );
    true
}

/// Draws, from a stream of its own (so the rest of a seed's scenario is what it was before),
/// whether some users become contacts and watch everyone's presence, with a user hiding for a
/// while and a block (and perhaps its end) among them, checked by `presence-privacy` and
/// `contacts-converge`. Only in
/// the MLS and trust families, whose devices already name their users (the plain family is
/// also what the drivers' swarm runs, and the drivers' plan has no contacts yet); never with a
/// lying disk, whose lost commits the world's ledger of answered changes cannot see.
fn draw_presence(
    seed: u64,
    family: Family,
    duration_s: u64,
    users: &[User],
    mix: &BTreeSet<&'static str>,
    out: &mut String,
) -> bool {
    let mut d = Draw {
        rng: SimRng::from_seed(seed).with_stream(PRESENCE_STREAM),
    };
    if family == Family::Plain || !d.chance(0.3) || mix.contains("lying-disk") {
        return false;
    }
    let end_ms = duration_s * 1_000;
    let chosen = some_users(&mut d, users.len());
    let added = d.range(200, end_ms / 3);
    for &a in &chosen {
        for &b in &chosen {
            if a != b {
                let _ = writeln!(
                    out,
                    "at {added}ms contact add {} {}",
                    users[a].name, users[b].name
                );
            }
        }
    }
    for &a in &chosen {
        let at = d.range(added, end_ms / 2);
        let _ = writeln!(out, "at {at}ms watch {} all-devices", users[a].name);
    }
    if d.chance(0.5) {
        let who = &users[*d.pick(&chosen)].name;
        draw_hiding(&mut d, who, added, end_ms, out);
    }
    if d.chance(0.4) {
        draw_block(
            &mut d,
            &users[chosen[0]].name,
            &users[chosen[1]].name,
            added,
            end_ms,
            out,
        );
    }
    true
}

/// `who` hides from `added` on, and perhaps shows again before the end.
fn draw_hiding(d: &mut Draw, who: &str, added: u64, end_ms: u64, out: &mut String) {
    let on = d.range(added, end_ms * 2 / 3);
    let _ = writeln!(out, "at {on}ms invisible on {who}");
    if d.chance(0.5) {
        let off = d.range(on, end_ms - 100);
        let _ = writeln!(out, "at {off}ms invisible off {who}");
    }
}

/// `a` blocks `b` from `added` on, and perhaps unblocks and adds them again before the end.
fn draw_block(d: &mut Draw, a: &str, b: &str, added: u64, end_ms: u64, out: &mut String) {
    let at = d.range(added, end_ms * 2 / 3);
    let _ = writeln!(out, "at {at}ms contact block {a} {b}");
    if d.chance(0.5) {
        let later = d.range(at, end_ms - 100);
        let _ = writeln!(out, "at {later}ms contact unblock {a} {b}");
        let _ = writeln!(out, "at {later}ms contact add {a} {b}");
    }
}

/// Indexes of at least two distinct users (all of them when there are two).
fn some_users(d: &mut Draw, users: usize) -> Vec<usize> {
    let want = d.range(2, users as u64) as usize;
    let mut all: Vec<usize> = (0..users).collect();
    // A partial Fisher–Yates shuffle from the generator's stream.
    for i in 0..want {
        let j = i + d.rng.index(users - i);
        all.swap(i, j);
    }
    let mut chosen = all[..want].to_vec();
    chosen.sort_unstable();
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario;

    #[test]
    fn every_family_draws_scenarios_that_parse() {
        for &(_, family) in Family::ALL {
            for seed in 0..200 {
                let g = generate(seed, family);
                let parsed = scenario::parse(&g.name(), &g.text);
                assert!(parsed.is_ok(), "{}\n{}", parsed.unwrap_err(), g.text);
                assert_eq!(parsed.unwrap().seed, seed);
            }
        }
    }

    #[test]
    fn one_seed_draws_one_scenario_and_seeds_differ() {
        assert_eq!(generate(7, Family::Mixed), generate(7, Family::Mixed));
        assert_ne!(
            generate(7, Family::Mixed).text,
            generate(8, Family::Mixed).text
        );
    }

    #[test]
    fn a_swarm_covers_many_fault_mixes() {
        let mixes: BTreeSet<_> = (0..200).map(|s| generate(s, Family::Mixed).mix).collect();
        assert!(mixes.len() > 150, "only {} distinct mixes", mixes.len());
        let kinds: BTreeSet<_> = (0..200)
            .flat_map(|s| generate(s, Family::Mixed).mix)
            .collect();
        assert_eq!(kinds.len(), FAULT_KINDS.len(), "every kind is drawn");
    }
}
