//! Planted bugs: the simulator finds each known protocol bug it can plant, and shrinks the
//! failure to a scenario of a few lines.
//!
//! Two tests. The fast one replays the shrunk scenarios committed in `tests/planted/`: each
//! must still break its invariant with its bug planted, and pass without it (so the failure is
//! the bug's, not the scenario's). The slow one (ignored here; CI runs it in release) does the
//! whole job again from nothing: a swarm from seed 1 until the first failure, then the shrinker.

use std::path::Path;

use sund_model::planted::PlantedBug;
use sund_sim::planted_hunt::{self, statements, without_plant, SHRUNK_STATEMENTS_MAX};
use sund_sim::scenario::Invariant;

/// The invariant each planted bug breaks in its committed example.
const EXPECTED: &[(&str, &str)] = &[
    ("gateway-ack-before-commit", "no-loss"),
    ("dedup-forgets", "no-loss"),
    ("node-ack-before-durable", "no-loss"),
    ("resume-off-by-one", "converge"),
    ("send-limit-ignored", "rate-limits"),
    ("presence-ignores-invisible", "presence-privacy"),
    ("invitation-limit-ignored", "rate-limits"),
    ("handover-keeps-sequencing", "single-authority"),
    ("peer-crl-ignored", "converge"),
    ("peer-limit-ignored", "peer-limit"),
    ("blocks-ignored", "blocks-hold"),
];

fn broken(file: &str, text: &str) -> Option<Invariant> {
    planted_hunt::broken(file, text).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_committed_shrunk_example_fails_with_its_bug_and_passes_without_it() {
    assert_eq!(EXPECTED.len(), PlantedBug::ALL.len(), "one example per bug");
    for &(bug, invariant) in EXPECTED {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/planted/{bug}.sund"));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(&format!("plant {bug}")), "{bug}: plants it");
        assert!(
            statements(&text) <= SHRUNK_STATEMENTS_MAX,
            "{bug}: {} statements",
            statements(&text)
        );
        let file = path.display().to_string();
        assert_eq!(
            broken(&file, &text).map(Invariant::name),
            Some(invariant),
            "{bug}: breaks its invariant"
        );
        assert_eq!(
            broken(&file, &without_plant(&text)),
            None,
            "{bug}: the same scenario without the bug passes"
        );
    }
}

/// Find and shrink, from nothing, for every planted bug. Slow in a debug build (a few hundred
/// runs per shrink); CI runs the same hunt from its release build (`cargo sim --hunt-planted`).
#[test]
#[ignore = "slow in a debug build: CI runs `cargo sim --hunt-planted` in release"]
fn a_swarm_finds_every_planted_bug_and_the_shrinker_reduces_it_to_a_few_lines() {
    for &(name, bug) in PlantedBug::ALL {
        let found = planted_hunt::hunt(name, bug).unwrap_or_else(|e| panic!("{e}"));
        println!("{found}");
    }
}
