//! The driver layer's own tests: a scenario runs on the real drivers and passes, repeats bit
//! for bit from its seed, changes with another seed, finds a planted gateway bug, and refuses
//! what it cannot express with reasons.

use sund_sim::scenario::{self, Scenario};
use sund_sim_drivers::plan::plan;
use sund_sim_drivers::run::{run, RunReport};

/// Every fault the driver layer carries out (`scenarios/driver-faults.sund`).
const FAULTS: &str = include_str!("../../scenarios/driver-faults.sund");

fn parsed(text: &str) -> Scenario {
    scenario::parse("driver-faults.sund", text).expect("the scenario parses")
}

fn run_with(scenario: &Scenario, seed: u64) -> RunReport {
    let planned = plan(scenario).expect("the drivers can run it");
    run(scenario, planned, seed).expect("the run starts")
}

#[test]
fn every_fault_on_the_real_drivers_loses_and_repeats_nothing() {
    let scenario = parsed(FAULTS);
    let report = run_with(&scenario, 4);
    assert!(
        report.violation.is_none(),
        "no invariant broken: {:?}",
        report.violation
    );
    assert!(report.offered > 100, "the applications sent: {report:?}");
    assert!(report.restarts >= 2, "the gateway and alice/0 restarted");
    assert!(report.recovery.is_some(), "the run converged after heal");
    // Every member has every message of its conversations once: the room has 4 members, the
    // DM 3 (alice/0 and bob's device, and bob is the DM's sender too).
    assert!(report.delivered >= report.offered, "{report:?}");
    assert!(report.packets.lost > 0, "1 % of datagrams were lost");
}

#[test]
fn the_same_seed_gives_the_same_datagrams_and_another_seed_others() {
    let scenario = parsed(FAULTS);
    let first = run_with(&scenario, 4);
    let again = run_with(&scenario, 4);
    assert_eq!(first.trace_hash, again.trace_hash);
    assert_eq!(first.packets, again.packets);
    let other = run_with(&scenario, 5);
    assert_ne!(first.trace_hash, other.trace_hash);
    assert_ne!(first.packets.hash, other.packets.hash);
}

#[test]
fn a_planted_dedup_bug_in_the_gateway_driver_is_found() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scenarios/partition-heal.sund"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let mut scenario = scenario::parse(path, &text).unwrap();
    scenario.planted = sund_model::planted::PlantedBug::parse("dedup-forgets");
    let report = run_with(&scenario, scenario.seed);
    let violation = report.violation.expect("the planted bug is found");
    assert_eq!(violation.invariant.name(), "no-duplicate");
    assert!(
        violation.detail.contains("sequenced one message twice"),
        "{}",
        violation.detail
    );
}

#[test]
fn what_the_drivers_cannot_express_is_refused_with_every_reason() {
    let text = "\
duration 10s
gateway gw
gateway gw2
user alice devices 2 gateway gw
conversation room gateway gw kind room members alice
at 3s drift alice +100ppm
at 2s stall-disk gw
check no-loss epoch-agreement
";
    let scenario = scenario::parse("x.sund", text).unwrap();
    let reasons = plan(&scenario).expect_err("refused");
    let all = reasons.join("\n");
    for expected in [
        "2 gateways",
        "`drift`",
        "MLS group",
        "`stall-disk`",
        "epoch-agreement",
    ] {
        assert!(all.contains(expected), "`{expected}` in:\n{all}");
    }
}

/// Regression: a gateway that recovered from a full disk drew its entropy stream again from
/// the start and issued a resume token it had issued before (the session table's invariant
/// panicked). And a node whose disk fills stops, may already have sent the message it could not
/// save, and starts again when space returns.
#[test]
fn full_disks_on_the_gateway_and_devices_lose_nothing() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../scenarios/full-disks.sund");
    let text = std::fs::read_to_string(path).unwrap();
    let scenario = scenario::parse(path, &text).unwrap();
    let report = run_with(&scenario, scenario.seed);
    assert!(report.violation.is_none(), "{:?}", report.violation);
    assert!(
        report.restarts >= 2,
        "stopped devices started again: {report:?}"
    );
    assert!(report.recovery.is_some());
}
