//! Simulator throughput (events per second) and the sequencer alone (messages per second).

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sund_model::gateway::sequencer::ConversationLog;
use sund_model::ids::{ConversationId, DeviceId, MsgId};
use sund_model::time::Instant;
use sund_sim::scenario;
use sund_sim::world::{Outcome, World};

/// A disconnect storm over 16 devices: every frame, timer and commit path is exercised.
const STORM: &str = "
duration 20s
liveness within 30s
gateway gw
users dev count 8 devices 2
conversation all members dev*
network latency 1ms..8ms loss 0.5% duplicate 0.5% reorder 1%
send all from all-devices every 100ms
every 5ms start 1s disconnect random-device
";

/// Many quiet devices: timers and heartbeats dominate.
const CROWD: &str = "
duration 30s
liveness within 30s
gateway gw
users dev count 2000 devices 1
conversation lobby members dev*
send lobby from dev0/0 every 1s
";

fn simulator(c: &mut Criterion) {
    let mut group = c.benchmark_group("sim");
    group.sample_size(10);
    for (name, text) in [
        ("disconnect_storm_16_devices", STORM),
        ("crowd_2000_devices", CROWD),
    ] {
        let s = scenario::parse(name, text).unwrap();
        let events = World::new(s.clone(), 1).unwrap().run().events;
        group.throughput(Throughput::Elements(events));
        group.bench_function(name, |b| {
            b.iter(|| {
                let report = World::new(s.clone(), 1).unwrap().run();
                assert_eq!(report.outcome, Outcome::Passed);
                report.events
            })
        });
    }
    group.finish();
}

fn sequencer(c: &mut Criterion) {
    let mut group = c.benchmark_group("sequencer");
    let n = 100_000u64;
    group.throughput(Throughput::Elements(n));
    let body = Bytes::from(vec![0u8; 200]);
    group.bench_function("append_100k_in_memory", |b| {
        b.iter(|| {
            let mut log = ConversationLog::new(ConversationId(1), [DeviceId(1), DeviceId(2)]);
            for i in 0..n {
                black_box(
                    log.append(
                        Instant(i),
                        DeviceId(1 + (i & 1) as u128),
                        MsgId(u128::from(i)),
                        body.clone(),
                    )
                    .unwrap(),
                );
            }
            log.head()
        })
    });
    group.finish();
}

criterion_group!(benches, simulator, sequencer);
criterion_main!(benches);
