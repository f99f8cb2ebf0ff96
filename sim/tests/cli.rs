//! The `cargo sim` command as a user meets it: exit codes, output formats, replay lines.

use std::path::PathBuf;
use std::process::{Command, Output};

// ---- helpers ----

fn sim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sund-sim"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap()
}

fn scratch(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sund-sim-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const TINY: &str = "duration 5s\ngateway gw\nuser a devices 2\nconversation c members a\nsend c from a every 100ms\n";

// ---- tests ----

#[test]
fn a_malformed_scenario_exits_2_with_file_line_and_column() {
    let path = scratch(
        "broken.sund",
        "duration 5s\ngateway gw\nuser a devices two\n",
    );
    let out = sim(&[path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("broken.sund:3:16: expected a device count (a whole number), found `two`"),
        "{stderr}"
    );
}

#[test]
fn bad_usage_exits_2() {
    assert_eq!(sim(&["--seeds", "9..1"]).status.code(), Some(2));
    assert_eq!(sim(&["--frobnicate"]).status.code(), Some(2));
    assert_eq!(sim(&["no/such/file.sund"]).status.code(), Some(2));
}

#[test]
fn json_output_has_one_parsable_object_per_run() {
    let path = scratch("tiny.sund", TINY);
    let out = sim(&[
        path.to_str().unwrap(),
        "--seeds",
        "1..3",
        "--json",
        "--check-determinism",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let runs: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(runs.len(), 3);
    for (i, run) in runs.iter().enumerate() {
        assert_eq!(run["seed"], i as u64 + 1);
        assert_eq!(run["result"], "pass");
        assert_eq!(run["deterministic"], true);
        assert_eq!(run["trace_hash"].as_str().unwrap().len(), 32);
        for key in [
            "scenario",
            "events",
            "sim_time_ms",
            "wall_ms",
            "violated_invariant",
        ] {
            assert!(run.get(key).is_some(), "missing {key}");
        }
    }
    assert_ne!(runs[0]["trace_hash"], runs[1]["trace_hash"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("[3/3] tiny seed 3: ok"),
        "sweeps print progress: {stderr}"
    );
}

#[test]
fn a_violated_invariant_exits_1_and_prints_the_replay_command() {
    // Frames take 200ms or more, and the liveness bound is 100ms: it cannot converge.
    let text = "duration 2s\nliveness within 100ms\ngateway gw\nuser a devices 2\nconversation c members a\nnetwork latency 200ms..300ms\nsend c from a every 10ms\n";
    let path = scratch("slow.sund", text);
    let out = sim(&[path.to_str().unwrap(), "--seed", "77"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("liveness invariant `converge` violated"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("replay: cargo sim {} --seed 77", path.display())),
        "{stderr}"
    );
}

#[test]
fn list_names_every_scenario() {
    let out = sim(&["--list", "../scenarios"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("steady-delivery"), "{stdout}");
}

#[test]
fn a_scenario_needing_a_later_feature_exits_2_and_says_so() {
    let out = sim(&["tests/dsl/federation-handover.sund"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("federation-handover.sund:10:1: action `handover` is part of the DSL"),
        "{stderr}"
    );
}
