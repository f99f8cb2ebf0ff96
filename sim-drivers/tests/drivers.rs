//! The driver layer's own tests: a scenario runs on the real drivers and passes, repeats bit
//! for bit from its seed, changes with another seed, finds a planted gateway bug, two real
//! gateways federate through a partition, a crash and handovers, and what the layer cannot
//! express is refused with reasons.

use sund_model::planted::PlantedBug;
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

/// Two real gateways of two domains, linked over QUIC: a room homed at one and a DM at the
/// other, each with members at both, handed over while the link between the gateways is cut
/// and while the new authority's peer crashes.
const TWO_DOMAINS: &str = "\
name two-domains
duration 30s
liveness within 30s
gateway gwa
gateway gwb
federate gwa gwb
user alice devices 2 gateway gwa
user bob gateway gwb
user carol gateway gwb
conversation room gateway gwa members alice bob carol
conversation dm gateway gwb members alice/0 bob
network latency 2ms..20ms loss 2% duplicate 1%
send room from all-devices every 500ms start 1s
send dm from all-devices every 700ms start 1s
# The room moves to gwb while the gateways cannot reach each other: it stays frozen, and
# moves once the link is back.
at 5s handover room to gwb
at 5001ms partition gwa gwb
at 12s heal gwa gwb
# The DM moves to gwa, whose peer (the old authority) crashes as it hands over.
at 15s handover dm to gwa
at 15005ms crash gwb
at 18s restart gwb
# And the room back to gwa.
at 22s handover room to gwa
every 4s start 2s disconnect random-device
check no-loss no-duplicate order converge sender-order single-authority
";

#[test]
fn two_real_gateways_federate_through_a_partition_a_crash_and_handovers() {
    let scenario = scenario::parse("two-domains.sund", TWO_DOMAINS).unwrap();
    let report = run_with(&scenario, 3);
    assert!(report.violation.is_none(), "{:?}", report.violation);
    assert_eq!(report.handovers.asked, 3, "{report:?}");
    assert!(report.handovers.started >= 2, "{report:?}");
    assert!(report.restarts >= 1, "gwb restarted: {report:?}");
    assert!(report.recovery.is_some(), "converged after heal");
    // Every member has every message: the room's 4 member devices and the DM's 2 each
    // deliver what was sent into their conversations (their own sends too).
    assert!(report.delivered >= 2 * report.offered, "{report:?}");
    let again = run_with(&scenario, 3);
    assert_eq!(
        report.trace_hash, again.trace_hash,
        "the same datagrams again"
    );
}

/// The model's planted handover bug (the old authority goes on sequencing) is found on the
/// real gateways by `single-authority`, read from their running machines.
#[test]
fn a_gateway_that_keeps_sequencing_after_its_handover_is_found() {
    let mut scenario = scenario::parse("two-domains.sund", TWO_DOMAINS).unwrap();
    scenario.planted = Some(PlantedBug::HandoverKeepsSequencing);
    let report = run_with(&scenario, 3);
    let violation = report.violation.expect("the planted bug is found");
    assert_eq!(violation.invariant.name(), "single-authority");
    assert!(
        violation.detail.contains("sequence room"),
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
federate gw gw2
user alice devices 2 gateway gw
conversation room gateway gw kind room members alice
at 3s drift alice +100ppm
at 2s stall-disk gw
at 4s relay gw to gw2
check no-loss epoch-agreement
";
    let scenario = scenario::parse("x.sund", text).unwrap();
    let reasons = plan(&scenario).expect_err("refused");
    let all = reasons.join("\n");
    for expected in [
        "`relay`",
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
