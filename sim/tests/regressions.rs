//! Seeds that once broke a run, replayed forever (see SIMULATION.md, "Regression seeds").

use sund_sim::scenario::parse;
use sund_sim::world::{Outcome, World};

fn run(file: &str, seed: u64) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let scenario = parse(file, &text).unwrap_or_else(|e| panic!("{e}"));
    let report = World::new(scenario, seed).unwrap().run();
    assert!(
        matches!(report.outcome, Outcome::Passed),
        "{file} seed {seed}: {:?}",
        report.outcome
    );
}

/// A device crashed after asking for a DM and before the DM's first commit: its group entry
/// was on disk without an MLS group, and recovery refused the store as corrupt.
#[test]
fn dm_1k_with_reloads_seed_5_recovers_a_dm_not_yet_created() {
    run("../scenarios/dm-1k-with-reloads.sund", 5);
}
