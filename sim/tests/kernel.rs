//! The simulator's kernel on its own: determinism, partitions, crashes, fault rates.

use bytes::Bytes;
use sund_sim::network::{LinkProfile, Network};
use sund_sim::rng::SimRng;
use sund_sim::scenario;
use sund_sim::world::{Outcome, RunReport, World};

// ---- helpers ----

fn run(text: &str, seed: u64) -> RunReport {
    let s = scenario::parse("test.sund", text).unwrap();
    World::new(s, seed).unwrap().run()
}

const SMALL: &str = "
duration 20s
liveness within 30s
gateway gw
user a devices 2
user b devices 1
conversation c members a b
network latency 1ms..10ms loss 2% duplicate 2% reorder 5%
send c from all-devices every 200ms
every 3s start 1s disconnect random-device
";

fn network(profile: LinkProfile) -> Network {
    Network::new(SimRng::from_seed(99), profile)
}

// ---- tests ----

#[test]
fn the_same_seed_gives_the_same_trace() {
    let first = run(SMALL, 42);
    let second = run(SMALL, 42);
    assert_eq!(first.outcome, Outcome::Passed);
    assert_eq!(first.trace_hash, second.trace_hash);
    assert_eq!(first.events, second.events);
    assert_eq!(first.app, second.app);
}

/// `--progress` sees the run and changes nothing: one call per `every` events, with the
/// virtual time never going back, and the same trace as a run without it.
#[test]
fn progress_reports_come_every_so_many_events_and_change_nothing() {
    use std::cell::RefCell;
    use std::rc::Rc;
    let plain = run(SMALL, 42);
    let calls: Rc<RefCell<Vec<(u64, u64)>>> = Rc::default();
    let mut world = World::new(scenario::parse("test.sund", SMALL).unwrap(), 42).unwrap();
    let seen = calls.clone();
    world.report_progress(500, move |now_us, events| {
        seen.borrow_mut().push((now_us, events))
    });
    let watched = world.run();
    assert_eq!(watched.trace_hash, plain.trace_hash);
    assert_eq!(watched.events, plain.events);
    let calls = calls.borrow();
    assert_eq!(
        calls.len() as u64,
        plain.events / 500,
        "one report per 500 events"
    );
    assert!(calls
        .iter()
        .enumerate()
        .all(|(i, &(_, events))| events == 500 * (i as u64 + 1)));
    assert!(
        calls.windows(2).all(|w| w[0].0 <= w[1].0),
        "virtual time never goes back"
    );
    assert!(calls.last().unwrap().0 <= plain.sim_time_ms * 1000);
}

#[test]
fn another_seed_gives_another_trace() {
    let a = run(SMALL, 1);
    let b = run(SMALL, 2);
    assert_ne!(a.trace_hash, b.trace_hash);
    assert_eq!(a.outcome, Outcome::Passed);
    assert_eq!(b.outcome, Outcome::Passed);
}

#[test]
fn a_partition_drops_traffic_and_heal_restores_it() {
    let mut net = network(LinkProfile::default());
    let (conn, _, _) = net.connect(0, 1, 0, true).unwrap();
    assert_eq!(net.send(0, conn, 1, Bytes::from_static(b"x")).len(), 1);
    net.partition(0, 1);
    for _ in 0..100 {
        assert!(net.send(0, conn, 1, Bytes::from_static(b"x")).is_empty());
    }
    assert_eq!(net.stats().cut, 100);
    assert!(
        net.connect(0, 1, 0, true).is_err(),
        "no new connection across a cut"
    );
    net.heal(0, 1);
    assert_eq!(net.send(0, conn, 1, Bytes::from_static(b"x")).len(), 1);
}

#[test]
fn hold_queues_and_release_delivers_in_order() {
    let mut net = network(LinkProfile::default());
    let (conn, _, _) = net.connect(0, 1, 0, true).unwrap();
    net.hold(1, 0);
    for i in 0..10u8 {
        assert!(net.send(0, conn, 1, Bytes::from(vec![i])).is_empty());
    }
    let released = net.release(1_000_000, 0, 1);
    assert_eq!(released.len(), 10);
    let mut order: Vec<(u64, u8)> = released.iter().map(|(at, a)| (*at, a.frame[0])).collect();
    order.sort();
    assert_eq!(
        order.iter().map(|(_, b)| *b).collect::<Vec<_>>(),
        (0..10).collect::<Vec<u8>>()
    );
}

#[test]
fn duplication_and_reordering_happen_at_the_configured_rates() {
    let profile = LinkProfile {
        latency_us_min: 1_000,
        latency_us_max: 50_000,
        loss: 0.1,
        duplicate: 0.05,
        reorder: 0.2,
        bandwidth_bps: 0,
    };
    let mut net = network(profile);
    let (conn, _, _) = net.connect(0, 1, 0, true).unwrap();
    let n = 100_000;
    let mut arrivals = Vec::new();
    for i in 0..n {
        for (at, a) in net.send(i * 100, conn, 1, Bytes::from(i.to_be_bytes().to_vec())) {
            arrivals.push((at, a.frame));
        }
    }
    let s = net.stats().clone();
    let rate = |x: u64| x as f64 / n as f64;
    assert!(
        (0.09..0.11).contains(&rate(s.lost)),
        "loss {}",
        rate(s.lost)
    );
    let kept = n - s.lost;
    let dup_rate = s.duplicated as f64 / kept as f64;
    assert!((0.045..0.055).contains(&dup_rate), "duplication {dup_rate}");
    let reorder_rate = s.reordered as f64 / (kept + s.duplicated) as f64;
    assert!(
        (0.19..0.21).contains(&reorder_rate),
        "reordering {reorder_rate}"
    );
    // Frames really do overtake each other.
    arrivals.sort_by_key(|(at, _)| *at);
    let overtaken = arrivals.windows(2).filter(|w| w[0].1 > w[1].1).count();
    assert!(overtaken > 1000, "only {overtaken} inversions");
}

#[test]
fn without_reordering_a_connection_is_fifo() {
    let profile = LinkProfile {
        latency_us_min: 1_000,
        latency_us_max: 90_000,
        ..LinkProfile::default()
    };
    let mut net = network(profile);
    let (conn, _, _) = net.connect(0, 1, 0, true).unwrap();
    let mut arrivals = Vec::new();
    for i in 0..10_000u64 {
        for (at, a) in net.send(i * 10, conn, 1, Bytes::from(i.to_be_bytes().to_vec())) {
            arrivals.push((at, a.frame));
        }
    }
    arrivals.sort_by_key(|(at, _)| *at); // stable: ties keep send order
    assert!(arrivals.windows(2).all(|w| w[0].1 < w[1].1));
}

#[test]
fn a_crash_loses_uncommitted_writes_and_keeps_committed_ones() {
    // Commits take 300ms, so each crash catches sequenced-but-uncommitted messages. The checker
    // proves nothing acknowledged was lost; the report proves something uncommitted was.
    let text = "
duration 30s
liveness within 60s
gateway gw
disk gw commit 300ms
user a devices 2
user b devices 2
conversation c members a b
send c from all-devices every 50ms
every 2s start 1s crash gw
every 2s start 1500ms restart gw
";
    let report = run(text, 3);
    assert_eq!(report.outcome, Outcome::Passed, "{:?}", report.outcome);
    assert!(
        report.lost_uncommitted > 0,
        "no crash caught an uncommitted batch"
    );
    assert!(report.app.accepted > 100);
    assert_eq!(report.faults.get("crash"), Some(&15));
}

#[test]
fn clock_skew_does_not_break_delivery() {
    let text = "
duration 20s
gateway gw
user a devices 2
user b devices 1
conversation c members a b
skew a/0 +5s
skew a/1 -3s
send c from all-devices every 100ms
";
    assert_eq!(run(text, 8).outcome, Outcome::Passed);
}

#[test]
fn a_device_away_longer_than_retention_is_told_what_expired() {
    let text = "
duration 30s
liveness within 30s
gateway gw
config retention 5s
user a devices 2
conversation c members a
send c from a/0 every 100ms
at 2s partition a/1 gw
at 20s heal a/1 gw
";
    let report = run(text, 5);
    assert_eq!(report.outcome, Outcome::Passed, "{:?}", report.outcome);
    assert!(report.app.expired > 50, "expired {}", report.app.expired);
    assert_eq!(
        report.app.delivered + report.app.expired,
        2 * report.app.accepted
    );
}

#[test]
fn a_panic_ends_its_run_as_a_failure_at_its_time_and_repeats() {
    let run_planted = || {
        let s = scenario::parse("test.sund", SMALL).unwrap();
        let mut world = World::new(s, 42).unwrap();
        world.plant_panic(2_500_000);
        world.run()
    };
    let report = run_planted();
    let Outcome::Safety(v) = &report.outcome else {
        panic!("expected a failure, got {:?}", report.outcome)
    };
    assert_eq!(v.invariant.name(), "no-panic");
    assert_eq!(v.at_us, 2_500_000);
    assert!(v.detail.contains("planted by a test"), "{}", v.detail);
    assert!(report.app.delivered > 0, "what came before is reported");
    assert_eq!(run_planted().trace_hash, report.trace_hash);
    assert_ne!(run(SMALL, 42).trace_hash, report.trace_hash);
}

// ---- harsher faults ----

#[test]
fn a_one_way_block_drops_one_direction_only_and_no_connection_opens_across_it() {
    let mut net = network(LinkProfile::default());
    let (conn, _, _) = net.connect(0, 1, 0, true).unwrap();
    net.block(1, 0);
    assert!(net.send(0, conn, 1, Bytes::from_static(b"up")).is_empty());
    assert_eq!(net.send(0, conn, 0, Bytes::from_static(b"down")).len(), 1);
    assert!(
        net.connect(0, 1, 0, true).is_err(),
        "a connection needs both ways"
    );
    net.unblock(1, 0);
    assert_eq!(net.send(0, conn, 1, Bytes::from_static(b"up")).len(), 1);
}

#[test]
fn a_link_with_a_bandwidth_sends_frames_one_after_another_by_their_size() {
    let profile = LinkProfile {
        latency_us_min: 1_000,
        latency_us_max: 1_000,
        bandwidth_bps: 80_000, // 10 bytes per millisecond
        ..LinkProfile::default()
    };
    let mut net = network(profile);
    let (conn, _, _) = net.connect(0, 1, 0, true).unwrap();
    let start = 10_000_000;
    let arrivals: Vec<u64> = (0..5)
        .map(|_| net.send(start, conn, 1, Bytes::from(vec![0u8; 100]))[0].0)
        .collect();
    // 100 bytes take 10 ms to leave, then 1 ms on the wire; the next waits for the first.
    let expected: Vec<u64> = (1..=5).map(|i| start + i * 10_000 + 1_000).collect();
    assert_eq!(arrivals, expected);
    // The other direction has its own queue.
    let back = net.send(start, conn, 0, Bytes::from(vec![0u8; 100]))[0].0;
    assert_eq!(back, start + 10_000 + 1_000);
}

fn logged(text: &str, seed: u64) -> RunReport {
    let s = scenario::parse("test.sund", text).unwrap();
    let mut world = World::new(s, seed).unwrap();
    world.keep_event_log(1_000_000);
    world.run()
}

fn seconds_of(line: &str) -> f64 {
    line.split_whitespace()
        .next()
        .and_then(|t| t.strip_suffix('s'))
        .and_then(|t| t.parse().ok())
        .expect("every line starts with its time")
}

const TWO_DEVICES: &str = "
duration 12s
gateway gw
user a
user b
conversation c members a b
send c from all-devices every 100ms
";

#[test]
fn a_stalled_disk_completes_no_commit_until_it_resumes_and_nothing_is_lost() {
    let text = format!("{TWO_DEVICES}at 3s stall-disk gw\nat 6s resume-disk gw\n");
    let report = logged(&text, 5);
    assert_eq!(report.outcome, Outcome::Passed, "{:?}", report.outcome);
    let gateway_commits: Vec<f64> = report
        .event_log
        .iter()
        .filter(|l| l.contains(" gw commit of "))
        .map(|l| seconds_of(l))
        .collect();
    assert!(gateway_commits.iter().any(|&t| t < 3.0));
    assert!(
        !gateway_commits.iter().any(|&t| (3.0..6.0).contains(&t)),
        "nothing completes while stalled"
    );
    assert!(
        gateway_commits.contains(&6.0),
        "what waited completes at once"
    );
    assert_eq!(
        report.app.delivered,
        2 * report.offered,
        "everything reaches the other device"
    );
}

#[test]
fn a_full_disk_stops_its_actor_and_freeing_it_starts_it_again_from_what_is_durable() {
    let text = format!("{TWO_DEVICES}at 3s fill-disk gw\nat 6s free-disk gw\nat 4s fill-disk a\nat 8s free-disk a\n");
    let report = logged(&text, 5);
    assert_eq!(report.outcome, Outcome::Passed, "{:?}", report.outcome);
    assert_eq!(
        report.faults.get("storage-failed"),
        Some(&2),
        "{:?}",
        report.faults
    );
    let failed: Vec<&String> = report
        .event_log
        .iter()
        .filter(|l| l.contains("its disk is full"))
        .collect();
    assert_eq!(failed.len(), 2);
    assert!(failed[0].contains("gw's commit failed") && seconds_of(failed[0]) >= 3.0);
    assert!(failed[1].contains("a/0's commit failed") && seconds_of(failed[1]) >= 4.0);
    // Whatever was acknowledged survived: every accepted message reached the other device.
    assert!(report.app.accepted > 0);
    assert!(report.app.delivered >= report.app.accepted);
}

#[test]
fn drifting_and_jumping_clocks_do_not_break_delivery() {
    let text = format!(
        "{TWO_DEVICES}at 0s drift a +50000ppm\nat 0s drift gw -20000ppm\nat 4s clock b -3s\nat 4s crash b\nat 5s restart b\nat 7s drift a 0ppm\n"
    );
    let report = run(&text, 9);
    assert_eq!(report.outcome, Outcome::Passed, "{:?}", report.outcome);
    assert_eq!(report.faults.get("drift"), Some(&3));
}
