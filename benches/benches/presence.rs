//! Presence at the gateway (issue 19), on the gateway state machine with an in-memory store:
//! - heartbeats of 100,000 open sessions whose users have contacts (circles of four) and
//!   watch them (the lease is the session, renewed by each frame), in heartbeats per second,
//!   and the memory each session costs the gateway (RSS grown while opening them, divided by
//!   the sessions: every sub-machine's state, the in-memory store's records included);
//! - the fan-out of one presence change to 1,000 watchers: a user toggles invisibility, and
//!   each toggle tells 1,000 watching sessions (1,000 frames encoded and released).
//!
//! `SUND_PRESENCE_SESSIONS` sets the session count (default 100,000).

use std::hint::black_box;
use std::time::{Duration, Instant as WallInstant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sund_model::env::MemStore;
use sund_model::gateway::{Gateway, GatewayConfig, GatewayInput, GatewayOutput};
use sund_model::ids::{ConnectionId, UserId};
use sund_model::testing::{drain_gateway, TestDevice, TestEntropy};
use sund_model::time::Instant;
use sund_model::wire::payload::{
    ContactAction, ContactChange, Heartbeat, PresenceSubscribe, PresenceUpdate,
};
use sund_model::wire::{Frame, Payload, Routing, PAYLOAD_BYTES_MAX};

struct Bench {
    gateway: Gateway,
    store: MemStore,
    now: Instant,
}

impl Bench {
    fn new() -> Bench {
        let config = GatewayConfig {
            open_enrolment: true,
            // A session is heard at least every heartbeat; the bench's clock barely moves.
            ..GatewayConfig::default()
        };
        let mut config = config;
        config.limits.contact_requests = None;
        config.limits.presence_subscriptions = None;
        Bench {
            gateway: Gateway::new(config, Instant(1), Box::new(TestEntropy(7))),
            store: MemStore::default(),
            now: Instant(1),
        }
    }

    fn input(&mut self, input: GatewayInput) -> Vec<GatewayOutput> {
        self.gateway.handle(self.now, input);
        drain_gateway(&mut self.gateway, &mut self.store)
    }

    fn frame(&mut self, conn: u64, routing: Routing, payload: Payload) -> Vec<GatewayOutput> {
        let bytes = Frame::new(routing, payload).encode();
        self.input(GatewayInput::Frame(ConnectionId(conn), bytes))
    }

    /// Registers `device` and opens its session on `conn`.
    fn open(&mut self, conn: u64, device: &TestDevice) {
        let reg = conn + (1 << 40);
        self.input(GatewayInput::Accepted(ConnectionId(reg)));
        let out = self.input(GatewayInput::Frame(
            ConnectionId(reg),
            device.register([0; 16]),
        ));
        let certificate = first_payload(&out, reg)
            .and_then(|p| match p {
                Payload::Certificate(c) => Some(Vec::from(c.certificate)),
                _ => None,
            })
            .expect("a certificate");
        self.input(GatewayInput::Closed(ConnectionId(reg)));
        self.input(GatewayInput::Accepted(ConnectionId(conn)));
        let hello = device.hello(Some(certificate), vec![], None, Some(device.user));
        let out = self.input(GatewayInput::Frame(ConnectionId(conn), hello));
        let Some(Payload::Challenge(challenge)) = first_payload(&out, conn) else {
            panic!("a challenge")
        };
        self.input(GatewayInput::Frame(
            ConnectionId(conn),
            device.proof(&challenge.nonce),
        ));
    }
}

fn first_payload(out: &[GatewayOutput], conn: u64) -> Option<Payload> {
    out.iter().find_map(|o| match o {
        GatewayOutput::Send(c, bytes) if c.0 == conn => Frame::decode(bytes, PAYLOAD_BYTES_MAX)
            .ok()
            .map(|f| f.payload),
        _ => None,
    })
}

fn device(n: u64) -> TestDevice {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&n.to_le_bytes());
    seed[31] = 0x5e;
    TestDevice::new(seed, UserId::of(&format!("user{n}"), "localhost"))
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn add(bench: &mut Bench, conn: u64, other: UserId) {
    let change = ContactChange {
        user: other.to_bytes().into(),
        action: ContactAction::Add as u8,
        domain: None,
    };
    let routing = Routing {
        seq: 1 << 63 | 1,
        ..Routing::default()
    };
    bench.frame(conn, routing, Payload::ContactChange(change));
}

fn watch(bench: &mut Bench, conn: u64, users: &[UserId]) {
    let subscribe = PresenceSubscribe {
        users: users.iter().map(|u| u.to_bytes().into()).collect(),
    };
    let routing = Routing {
        seq: 1 << 63 | 2,
        ..Routing::default()
    };
    bench.frame(conn, routing, Payload::PresenceSubscribe(subscribe));
}

fn heartbeats(c: &mut Criterion) {
    let sessions: u64 = std::env::var("SUND_PRESENCE_SESSIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let circle = 4;
    let mut bench = Bench::new();
    let devices: Vec<TestDevice> = (0..sessions).map(device).collect();
    let before = rss_bytes();
    let started = WallInstant::now();
    for (n, d) in devices.iter().enumerate() {
        bench.open(n as u64 + 1, d);
    }
    let opened = started.elapsed();
    let after_open = rss_bytes();
    for n in 0..sessions {
        let base = n / circle * circle;
        let circle_users: Vec<UserId> = (base..(base + circle).min(sessions))
            .filter(|m| *m != n)
            .map(|m| devices[m as usize].user)
            .collect();
        for other in &circle_users {
            add(&mut bench, n + 1, *other);
        }
    }
    for n in 0..sessions {
        let base = n / circle * circle;
        let circle_users: Vec<UserId> = (base..(base + circle).min(sessions))
            .filter(|m| *m != n)
            .map(|m| devices[m as usize].user)
            .collect();
        watch(&mut bench, n + 1, &circle_users);
    }
    let after_watch = rss_bytes();
    let (watches, entries) = bench.gateway.presence().watchlists();
    eprintln!(
        "presence: {sessions} sessions opened in {:.1} s; RSS +{:.0} B per session opened, +{:.0} B per session for contacts and watchlists ({watches} watchlists, {entries} entries, {} users online)",
        opened.as_secs_f64(),
        after_open.saturating_sub(before) as f64 / sessions as f64,
        after_watch.saturating_sub(after_open) as f64 / sessions as f64,
        bench.gateway.presence().online_users(),
    );
    let beats: Vec<(ConnectionId, Bytes)> = (0..sessions)
        .map(|n| {
            let beat = Heartbeat {
                nonce: n,
                crl_version: None,
                presence: None,
                peer_roots: None,
                peer_crls: None,
                contacts: None,
            };
            (
                ConnectionId(n + 1),
                Frame::new(Routing::default(), Payload::Heartbeat(beat)).encode(),
            )
        })
        .collect();
    let mut group = c.benchmark_group("presence");
    group.sample_size(10);
    group.throughput(Throughput::Elements(sessions));
    group.bench_function(format!("heartbeats_{sessions}_sessions"), |b| {
        b.iter(|| {
            bench.now = Instant(bench.now.0 + 1_000);
            let mut answers = 0usize;
            for (conn, bytes) in &beats {
                bench
                    .gateway
                    .handle(bench.now, GatewayInput::Frame(*conn, bytes.clone()));
                answers += drain_gateway(&mut bench.gateway, &mut bench.store).len();
            }
            black_box(answers)
        })
    });
    group.finish();
}

fn fan_out(c: &mut Criterion) {
    let watchers = 1_000u64;
    let mut bench = Bench::new();
    let target = device(1_000_000);
    bench.open(1, &target);
    for n in 0..watchers {
        let d = device(n);
        let conn = n + 2;
        bench.open(conn, &d);
        add(&mut bench, conn, target.user);
        add(&mut bench, 1, d.user);
        watch(&mut bench, conn, &[target.user]);
    }
    let mut group = c.benchmark_group("presence");
    group.throughput(Throughput::Elements(watchers));
    group.measurement_time(Duration::from_secs(8));
    let mut invisible = false;
    group.bench_function("fan_out_one_change_to_1000_watchers", |b| {
        b.iter(|| {
            invisible = !invisible;
            let out = bench.frame(
                1,
                Routing {
                    seq: 1 << 63 | 3,
                    ..Routing::default()
                },
                Payload::PresenceUpdate(PresenceUpdate { invisible }),
            );
            assert_eq!(
                out.len() as u64,
                watchers + 1,
                "each watcher told, and the answer"
            );
            black_box(out.len())
        })
    });
    group.finish();
}

criterion_group!(benches, fan_out, heartbeats);
criterion_main!(benches);
