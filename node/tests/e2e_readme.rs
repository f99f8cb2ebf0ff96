//! The README's "Running a gateway and devices by hand" block, run as written (on a free port,
//! with the binaries this build made): every flow the README shows a newcomer must work.

use std::process::Command;

mod common;
use common::*;

/// The shell block under the README's by-hand heading.
fn by_hand_block() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let heading = "## Running a gateway and devices by hand";
    let after = &readme[readme.find(heading).expect("the by-hand heading") + heading.len()..];
    let start = after.find("```sh\n").expect("a sh block") + "```sh\n".len();
    let end = after[start..].find("```").expect("the block ends");
    after[start..start + end].to_string()
}

#[test]
fn the_readme_by_hand_flow_runs_top_to_bottom() {
    let block = by_hand_block();
    let port = free_udp_port().to_string();
    let mut script = String::from("set -euo pipefail\n");
    for line in block.lines() {
        if line.trim_start().starts_with("cargo build") {
            continue; // this test's build made the binaries
        }
        let line = if line.starts_with("G=") {
            format!("G={}; S={}", gateway_binary().display(), sund().display())
        } else {
            line.replace("4433", &port)
        };
        script.push_str(&line);
        script.push('\n');
    }
    assert!(script.contains("room leave") && script.contains("admin revoke"));
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new("timeout")
        .args(["300", "bash", "-c", &script])
        .current_dir(tmp.path())
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let log = std::fs::read_to_string(tmp.path().join("gw.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "the README flow failed ({:?})\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- gateway log\n{log}",
        out.status
    );
    // What each step promises, as a reader would check it.
    for expected in [
        "connection connected",
        "sent to @bob: seq ",
        ": hello bob",
        "sent photo.bin (2.9 MiB) to @bob",
        "saved received/photo.bin (2.9 MiB)",
        "your DM with them is @alice",
        "bob is now admin of team",
        "this device left conv:",
        "paired: the gateway confirmed",
        "revoked dev:",
        "the laptop is refused now",
        "backed up alice@localhost's",
        "restored the backup of device dev:",
        "backed up ",
        "CRL version 1 issued",
    ] {
        assert!(stdout.contains(expected), "missing `{expected}`:\n{stdout}");
    }
    // The revocation went through the running gateway: the laptop heard it was revoked, and
    // the gateway logged who asked.
    assert!(stderr.contains("revoked"), "{stderr}");
    assert!(
        log.contains("sund_gateway::audit") && log.contains("request=\"revoke\""),
        "no audit line for the revocation:\n{log}"
    );
    // Validity as dates people read, connection states in words (not Rust's debug form).
    assert!(stdout.contains(" UTC until 20"), "{stdout}");
    for debug in ["Reconnecting {", "Some(", "Connected)"] {
        assert!(
            !stdout.contains(debug) && !stderr.contains(debug),
            "`{debug}` printed"
        );
    }
}
