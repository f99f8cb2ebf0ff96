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
fn the_handover_example_runs_and_reports_its_handover() {
    let out = sim(&["tests/dsl/federation-handover.sund"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains(" handovers 1/1 frozen max "), "{stdout}");
}

// ---- swarms, shrinking and traces, as the README shows them ----

/// Runs the command in a scratch directory of its own, where it writes `target/swarm/` and
/// `target/shrunk/`.
fn sim_in(dir: &str, args: &[&str]) -> (Output, PathBuf) {
    let cwd = std::env::temp_dir().join(format!("sund-sim-cli-{}-{dir}", std::process::id()));
    std::fs::create_dir_all(&cwd).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sund-sim"))
        .args(args)
        .current_dir(&cwd)
        .output()
        .unwrap();
    (out, cwd)
}

fn planted_example(bug: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/planted/{bug}.sund"))
}

#[test]
fn a_swarm_reports_what_it_covered() {
    let (out, _) = sim_in("swarm", &["--swarm", "3"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("swarm: 3 seeds ("), "{stdout}");
    assert!(stdout.contains("distinct fault mixes"), "{stdout}");
    assert!(
        stdout.contains("swarm: seeds per fault kind: loss "),
        "{stdout}"
    );
    assert!(stdout.contains("sim: 3 passed, 0 failed"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("[1/3] swarm seed 1 ("), "{stderr}");
}

#[test]
fn a_failing_swarm_seed_writes_its_scenario_and_the_command_that_replays_it() {
    // Swarm seed 2 finds this planted bug (sim/tests/planted/resume-off-by-one.sund).
    let (out, cwd) = sim_in(
        "swarm-fail",
        &[
            "--swarm",
            "1",
            "--first-seed",
            "2",
            "--plant",
            "resume-off-by-one",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("replay: cargo sim target/swarm/swarm-2.sund --seed 2"),
        "{stderr}"
    );
    assert!(
        stderr.contains("swarm seed 2: scenario written to target/swarm/swarm-2.sund"),
        "{stderr}"
    );
    let written = std::fs::read_to_string(cwd.join("target/swarm/swarm-2.sund")).unwrap();
    assert!(written.contains("seed 2\n") && written.contains("plant resume-off-by-one"));
    // The written file alone replays the failure.
    let (again, _) = sim_in("swarm-fail", &["target/swarm/swarm-2.sund"]);
    assert_eq!(again.status.code(), Some(1));
}

#[test]
fn shrink_writes_a_smaller_scenario_that_still_fails_and_refuses_a_passing_one() {
    let example = planted_example("resume-off-by-one");
    let (out, cwd) = sim_in("shrink", &[example.to_str().unwrap(), "--shrink"]);
    assert_eq!(out.status.code(), Some(1), "a failure was found and kept");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("shrunk: `converge` still fails with"),
        "{stdout}"
    );
    assert!(
        stdout.contains("replay: cargo sim target/shrunk/resume-off-by-one-shrunk.sund"),
        "{stdout}"
    );
    let shrunk =
        std::fs::read_to_string(cwd.join("target/shrunk/resume-off-by-one-shrunk.sund")).unwrap();
    assert!(shrunk.contains("plant resume-off-by-one"), "{shrunk}");
    let passing =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios/steady-delivery.sund");
    let (passes, _) = sim_in("shrink", &[passing.to_str().unwrap(), "--shrink"]);
    assert_eq!(passes.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&passes.stderr).contains("passes: there is no failure to shrink")
    );
}

#[test]
fn trace_prints_the_last_events_before_a_failure() {
    let example = planted_example("gateway-ack-before-commit");
    let out = sim(&[example.to_str().unwrap(), "--trace", "25"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the last 25 events up to the failure (--trace):"),
        "{stderr}"
    );
    assert!(stderr.contains("u0/0 sends on conn"), "{stderr}");
}
