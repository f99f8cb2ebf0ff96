//! The gate `scripts/mutants.sh` puts every mutant of the delivery-critical model code
//! through: every scenario in `scenarios/` with its own seed, then a 300-seed swarm. A mutant
//! that passes all of it survives, and is either a gap in the simulator (add the scenario or
//! the assertion that kills it) or an equivalent change (say why in SIMULATION.md).
//!
//! Ignored in ordinary test runs: it takes about a minute in a release build and several in a
//! debug one. Run it with `cargo test --release -p sund-sim --test mutation_gate -- --ignored`.

use std::path::Path;

use sund_sim::scenario;
use sund_sim::swarm::{self, Family};
use sund_sim::world::{Outcome, World};

const SWARM_SEEDS: u64 = 300;

fn outcome(file: &str, text: &str, seed: Option<u64>) -> Outcome {
    let s = scenario::parse(file, text).unwrap_or_else(|e| panic!("{e}"));
    let seed = seed.unwrap_or(s.seed);
    World::new(s, seed)
        .unwrap_or_else(|e| panic!("{e}"))
        .run()
        .outcome
}

#[test]
#[ignore = "the mutation gate: about a minute in release (scripts/mutants.sh runs it)"]
fn every_scenario_and_a_swarm_pass() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sund"))
        .collect();
    files.sort();
    assert!(files.len() >= 15, "the scenarios are there");
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let file = path.display().to_string();
        let result = outcome(&file, &text, None);
        assert_eq!(result, Outcome::Passed, "{file}");
    }
    for seed in 1..=SWARM_SEEDS {
        let g = swarm::generate(seed, Family::Mixed);
        let result = outcome(&g.name(), &g.text, Some(seed));
        assert_eq!(result, Outcome::Passed, "swarm seed {seed}:\n{}", g.text);
    }
}
