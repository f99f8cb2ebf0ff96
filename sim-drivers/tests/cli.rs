//! `cargo sim --drivers` as a user meets it: what it says about a file it cannot run, a bad
//! option, a passing run's line and its JSON.

use std::process::{Command, Output};

fn drivers(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sund-sim-drivers"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .unwrap()
}

#[test]
fn a_named_file_the_drivers_cannot_run_exits_2_with_every_reason() {
    let out = drivers(&["scenarios/multi-device-churn.sund"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    insta::assert_snapshot!(stderr);
}

#[test]
fn an_unknown_option_exits_2_and_says_which_options_there_are() {
    let out = drivers(&["--shrink"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`--shrink` is not an option of the driver layer (it takes --seed, --check-determinism, --json, --plant, --swarm, --first-seed, --family)"),
        "{stderr}"
    );
    let out = drivers(&["--plant", "no-such-bug"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown planted bug `no-such-bug`"));
}

#[test]
fn a_passing_run_prints_its_trace_and_json_names_its_layer() {
    let out = drivers(&["scenarios/retention-expiry.sund", "--seed", "2"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("ok retention-expiry seed 2 trace "),
        "{stdout}"
    );
    let out = drivers(&["scenarios/retention-expiry.sund", "--seed", "2", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["layer"], "drivers");
    assert_eq!(json["result"], "pass");
    assert!(json["datagrams"].as_u64().unwrap() > 1000);
    assert!(stdout.contains(json["trace_hash"].as_str().unwrap()));
}

#[test]
fn a_planted_bug_fails_with_a_replay_line() {
    let out = drivers(&[
        "scenarios/partition-heal.sund",
        "--plant",
        "resume-off-by-one",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("liveness invariant `converge` violated"),
        "{stdout}"
    );
    assert!(
        stdout.contains("replay: cargo sim --drivers scenarios/partition-heal.sund --seed 3"),
        "{stdout}"
    );
}
