//! Replays the committed fuzz corpora `corpus/scenario_parse` and `corpus/gateway_inputs` through
//! `sund_sim::fuzzing`, the very harnesses the `scenario_parse` and `gateway_inputs` fuzz targets
//! call: the parser must not panic, and the gateway must keep its invariants (frames it sends
//! decode, heads never go back, recovery from the committed disk matches the live state).

use std::fs;
use std::path::PathBuf;

/// Runs `check` on every file of `corpus/<target>`, which must not be empty.
fn replay(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../corpus")
        .join(target);
    let mut paths: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read corpus {}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus dir entry").path())
        .filter(|path| path.is_file())
        .collect();
    paths.sort();
    assert!(
        !paths.is_empty(),
        "corpus {} is empty: the replay would prove nothing",
        dir.display()
    );
    for path in &paths {
        let data = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let result = std::panic::catch_unwind(|| check(&data));
        if let Err(panic) = result {
            eprintln!("corpus input {} failed", path.display());
            std::panic::resume_unwind(panic);
        }
    }
    println!("{target}: replayed {} corpus inputs", paths.len());
}

#[test]
fn scenario_parse_corpus() {
    replay("scenario_parse", sund_sim::fuzzing::run_scenario_parse);
}

#[test]
fn gateway_inputs_corpus() {
    replay("gateway_inputs", sund_sim::fuzzing::run_gateway_ops);
}
