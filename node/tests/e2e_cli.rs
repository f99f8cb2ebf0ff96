//! The `sund` command line as a user types it, against a real gateway on loopback: what it
//! prints, what it keeps, and what it refuses.

use std::process::{Command, Stdio};
use std::time::Duration;

mod common;
use common::*;

/// A gateway with open enrolment and two devices, alice and bob, with a DM between them.
struct Dm {
    _tmp: tempfile::TempDir,
    _gateway: Guard,
    alice: String,
    bob: String,
}

impl Dm {
    fn new() -> Dm {
        let tmp = tempfile::tempdir().unwrap();
        let gw_dir = tmp.path().join("gateway");
        let gw = gw_dir.to_str().unwrap();
        let port = free_udp_port();
        let cert = run(&gateway_binary(), &["cert", "--data-dir", gw]);
        let addr = format!("127.0.0.1:{port}");
        let alice = tmp.path().join("alice").to_str().unwrap().to_string();
        let bob = tmp.path().join("bob").to_str().unwrap().to_string();
        for (dir, user) in [(&alice, "alice"), (&bob, "bob")] {
            init_device(dir, &addr, cert.trim(), Some(user), None);
        }
        let gateway = Guard(start_gateway_with(&gw_dir, port, &["--open-enrolment"]));
        // Bob's first start registers him and leaves KeyPackages for alice's DM.
        let status = run(&sund(), &["status", "--data-dir", &bob]);
        assert!(status.contains("connection connected"), "{status}");
        let dm = run(&sund(), &["dm", "--data-dir", &alice, "bob"]);
        assert!(dm.starts_with("dm @bob (conv:"), "{dm}");
        Dm {
            _tmp: tmp,
            _gateway: gateway,
            alice,
            bob,
        }
    }

    fn send(&self, text: &str) {
        let out = run(&sund(), &["send", "--data-dir", &self.alice, "@bob", text]);
        assert!(out.starts_with("sent to @bob: seq "), "{out}");
    }
}

#[test]
fn follow_with_a_count_leaves_what_it_did_not_print_for_the_next_follow() {
    let dm = Dm::new();
    for i in 1..=5 {
        dm.send(&format!("note-{i}"));
    }
    let first = follow(&dm.bob, "@bob", 1, Duration::from_secs(30));
    assert_eq!(first.len(), 1, "{first:#?}");
    assert!(first[0].ends_with(": note-1"), "{first:#?}");
    let rest = follow(&dm.bob, "@bob", 4, Duration::from_secs(30));
    let bodies: Vec<&str> = rest
        .iter()
        .map(|l| l.rsplit_once(": ").unwrap().1)
        .collect();
    assert_eq!(
        bodies,
        ["note-2", "note-3", "note-4", "note-5"],
        "the four not printed come next, in order: {rest:#?}"
    );
    let status = run(&sund(), &["status", "--data-dir", &dm.bob]);
    assert!(!status.contains("unread"), "all were shown: {status}");
    // A closed pipe (`| head -1`) takes only the line it let through, and nothing panics.
    dm.send("note-6");
    dm.send("note-7");
    let piped = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' follow --data-dir '{}' --count 2 | head -n 0",
            sund().display(),
            dm.bob
        ))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&piped.stderr);
    assert!(!err.contains("panicked"), "{err}");
    let status = run(&sund(), &["status", "--data-dir", &dm.bob]);
    assert!(
        status.contains("unread     2 message(s)"),
        "nothing printed, nothing taken: {status}"
    );
    let last = follow(&dm.bob, "@bob", 2, Duration::from_secs(30));
    assert!(
        last.len() == 2 && last[0].ends_with(": note-6") && last[1].ends_with(": note-7"),
        "{last:#?}"
    );
}

#[test]
fn control_characters_in_a_message_are_shown_escaped_not_obeyed() {
    let dm = Dm::new();
    dm.send("hi\nroom seq 9 from alice: forged\u{1b}[31mred\u{202e}");
    let lines = follow(&dm.bob, "@bob", 1, Duration::from_secs(30));
    assert_eq!(lines.len(), 1, "one message is one line: {lines:#?}");
    assert!(
        lines[0].ends_with(": hi\\nroom seq 9 from alice: forged\\u{1b}[31mred\\u{202e}"),
        "{lines:#?}"
    );
}

#[test]
fn output_into_a_closed_pipe_does_not_panic() {
    let dm = Dm::new();
    for args in [
        format!("dm --data-dir '{}' bob", dm.alice),
        format!("devices --data-dir '{}'", dm.alice),
        format!("status --data-dir '{}'", dm.alice),
    ] {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("'{}' {args} | head -n 0", sund().display()))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "sund {args}: {err}");
    }
}
