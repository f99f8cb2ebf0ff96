//! End to end with the real binaries on loopback: `sund-gateway` with a temporary data
//! directory, two `sund` devices, messages exchanged, the gateway killed with SIGKILL and
//! restarted; nothing acknowledged may be lost and nothing delivered twice.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;
use common::*;

// ---- the test ----

#[test]
fn a_gateway_killed_mid_conversation_loses_nothing_acknowledged_and_duplicates_nothing() {
    restart_mid_conversation(Stop::Kill);
}

#[test]
fn a_gateway_restarted_with_sigterm_mid_conversation_loses_nothing_and_its_devices_wait_as_told() {
    restart_mid_conversation(Stop::Term);
}

/// How the gateway is stopped in the middle of a conversation.
#[derive(Clone, Copy, PartialEq)]
enum Stop {
    /// SIGKILL: no drain, no goodbye.
    Kill,
    /// SIGTERM: a drain, and a goodbye telling each device to come back in 2 s or more.
    Term,
}

/// Two devices in a room; b follows while a sends five messages, the gateway is stopped and
/// started again, a sends five more: b prints the ten in order, once each.
fn restart_mid_conversation(stop: Stop) {
    let tmp = tempfile::tempdir().unwrap();
    let gw_dir = tmp.path().join("gateway");
    let gw = gw_dir.to_str().unwrap();
    let port = free_udp_port();
    let cert = run(&gateway_binary(), &["cert", "--data-dir", gw]);
    let cert = cert.trim();
    let addr = format!("127.0.0.1:{port}");
    let a_dir = tmp.path().join("a");
    let b_dir = tmp.path().join("b");
    let (a, b) = (a_dir.to_str().unwrap(), b_dir.to_str().unwrap());
    two_devices_in_a_room(gw, &addr, cert, a, b);

    let mut gateway = Guard(start_gateway(&gw_dir, port));
    // b follows in the background and reports each line it prints.
    let mut follower = Guard(
        Command::new(sund())
            .args([
                "follow",
                "--data-dir",
                b,
                "--count",
                "10",
                "--conversation",
                "room",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (tx, lines) = mpsc::channel();
    let stdout = follower.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });

    let mut acknowledged = Vec::new();
    for i in 1..=5 {
        let out = run(
            &sund(),
            &["send", "--data-dir", a, "room", &format!("message-{i}")],
        );
        acknowledged.push(out.trim().to_string());
    }
    let mut received = Vec::new();
    if stop == Stop::Term {
        // b must be connected when the gateway stops, to hear its goodbye: it has the first
        // five messages.
        while received.len() < 5 {
            match lines.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => received.push(line),
                Err(_) => panic!("b got {} of 5 messages: {received:#?}", received.len()),
            }
        }
    }
    let stopped_at = Instant::now();
    match stop {
        Stop::Kill => {
            gateway.0.kill().unwrap();
            gateway.0.wait().unwrap();
        }
        Stop::Term => {
            run(
                Path::new("/bin/kill"),
                &["-TERM", &gateway.0.id().to_string()],
            );
            let exit = gateway.0.wait().unwrap();
            assert!(exit.success(), "a drained gateway exits 0: {exit:?}");
        }
    }
    gateway = Guard(start_gateway(&gw_dir, port));
    for i in 6..=10 {
        let out = run(
            &sund(),
            &["send", "--data-dir", a, "room", &format!("message-{i}")],
        );
        acknowledged.push(out.trim().to_string());
    }
    let expected_acks: Vec<String> = (1..=10).map(|i| format!("sent to room: seq {i}")).collect();
    assert_eq!(
        acknowledged, expected_acks,
        "each send is acknowledged with the next seq"
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    while received.len() < 10 {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => received.push(line),
            Err(_) => panic!(
                "only {} of 10 messages arrived: {received:#?}",
                received.len()
            ),
        }
        if received.len() == 6 && stop == Stop::Term {
            // b heard the goodbye before the restart, so it came back no sooner than the 2 s
            // the gateway asked for (and message 6 reached it only then).
            assert!(
                stopped_at.elapsed() >= Duration::from_secs(2),
                "b reconnected {:?} after the goodbye, before the gateway's hint",
                stopped_at.elapsed()
            );
        }
    }
    for (i, line) in received.iter().enumerate() {
        let n = i + 1;
        assert!(
            line.contains(&format!(" seq {n} from ")),
            "line {n} out of order: {line}"
        );
        assert!(
            line.ends_with(&format!(": message-{n}")),
            "line {n} has the wrong body: {line}"
        );
    }
    let status = follower.0.wait().unwrap();
    assert!(status.success(), "follow exits 0 after --count messages");
    drop(gateway);
    // Logs never hold message content, even at debug level.
    let log = std::fs::read_to_string(gw_dir.with_file_name("gateway.log")).unwrap();
    assert!(log.contains("gateway listening"), "the log was captured");
    assert!(
        !log.contains("message-"),
        "a message body leaked into the gateway's log"
    );
}

#[test]
fn a_device_the_gateway_does_not_know_is_refused_with_a_useful_error() {
    let tmp = tempfile::tempdir().unwrap();
    let gw_dir = tmp.path().join("gateway");
    let gw = gw_dir.to_str().unwrap();
    let port = free_udp_port();
    let cert = run(&gateway_binary(), &["cert", "--data-dir", gw]);
    let addr = format!("127.0.0.1:{port}");
    let d = tmp.path().join("stranger");
    init_device(d.to_str().unwrap(), &addr, cert.trim(), None, None);
    let _gateway = Guard(start_gateway(&gw_dir, port));
    let out = Command::new(sund())
        .args(["send", "--data-dir", d.to_str().unwrap(), "room", "hello?"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("needs an enrolment token")
            && stderr.contains("sund-gateway admin enrol-token"),
        "{stderr}"
    );
}

#[test]
fn an_enrolment_token_enrols_one_device_and_a_device_revoked_on_the_running_gateway_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let gw_dir = tmp.path().join("gateway");
    let gw = gw_dir.to_str().unwrap();
    let port = free_udp_port();
    let cert = run(&gateway_binary(), &["cert", "--data-dir", gw]);
    let addr = format!("127.0.0.1:{port}");
    let token = enrol(gw, "alice");
    let init = |name: &str| {
        let d = tmp.path().join(name);
        init_device(
            d.to_str().unwrap(),
            &addr,
            cert.trim(),
            Some("alice"),
            Some(&token),
        );
        d
    };
    let laptop = init("laptop");
    let phone = init("phone");
    let mut gateway = Guard(start_gateway(&gw_dir, port));
    let status = |d: &Path| {
        Command::new(sund())
            .args(["status", "--data-dir", d.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = status(&laptop);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = status(&phone);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already used"), "{stderr}");

    // The operator works on the running gateway, through its control socket: only the
    // gateway's user may open it.
    let socket = gw_dir.join("admin.sock");
    {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let meta = std::fs::metadata(&socket).expect("the running gateway has a control socket");
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
    let devices = run(&gateway_binary(), &["admin", "devices", "--data-dir", gw]);
    let laptop_id = devices
        .split_whitespace()
        .find(|w| w.starts_with("dev:"))
        .expect("admin devices lists the laptop")
        .to_string();
    assert!(devices.contains("valid"), "{devices}");
    // A token issued while the gateway runs is stored before it is printed: it works at once.
    let token = enrol(gw, "alice");
    let tablet = tmp.path().join("tablet");
    init_device(
        tablet.to_str().unwrap(),
        &addr,
        cert.trim(),
        Some("alice"),
        Some(&token),
    );
    let out = status(&tablet);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revoked = run(
        &gateway_binary(),
        &["admin", "revoke", &laptop_id, "--data-dir", gw],
    );
    assert!(revoked.contains("CRL version 1"), "{revoked}");
    // Revoking it again says so, and the CRL does not grow.
    let again = run(
        &gateway_binary(),
        &["admin", "revoke", &laptop_id, "--data-dir", gw],
    );
    assert!(
        again.contains("was already revoked (CRL version 1)"),
        "{again}"
    );
    // The running gateway refuses the laptop at once, without a restart.
    let out = status(&laptop);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("revoked"), "{stderr}");
    // Scripts read the same in JSON: the laptop refused, the tablet connected and registered.
    let json_status = |d: &Path| {
        let out = Command::new(sund())
            .args(["status", "--json", "--data-dir", d.to_str().unwrap()])
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("status --json printed no JSON ({e}): {out:?}"));
        (out.status.success(), report)
    };
    let (ok, report) = json_status(&laptop);
    assert!(!ok);
    assert_eq!(report["connection"], "refused", "{report}");
    assert!(
        report["problem"].as_str().unwrap().contains("revoked"),
        "{report}"
    );
    assert_eq!(report["device"], laptop_id.as_str(), "{report}");
    let (ok, report) = json_status(&tablet);
    assert!(ok, "{report}");
    assert_eq!(report["connection"], "connected", "{report}");
    assert_eq!(report["problem"], serde_json::Value::Null, "{report}");
    // What it holds now: the CRL comes with its first heartbeat, not with the session.
    assert!(report["crl_version"].is_u64(), "{report}");
    assert_eq!(
        report["certificate"]["user"],
        revoked_user(&devices, &laptop_id),
        "{report}"
    );
    // Scripts read the listings as JSON.
    let json = |args: &[&str]| -> serde_json::Value {
        let out = run(&gateway_binary(), args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    };
    let listed = json(&["admin", "devices", "--json", "--data-dir", gw]);
    let laptop_entry = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == laptop_id.as_str())
        .expect("the laptop is listed");
    assert_eq!(laptop_entry["state"], "revoked", "{listed}");
    let crl = json(&["admin", "crl", "--json", "--data-dir", gw]);
    assert_eq!(crl["version"], 1, "{crl}");
    assert_eq!(crl["revoked"][0], laptop_id.as_str(), "{crl}");
    let list = json(&["admin", "list", "--json", "--data-dir", gw]);
    assert!(list["devices"].as_array().unwrap().len() >= 2, "{list}");
    // A mistyped request is refused with what to type instead, and changes nothing.
    let err = fails(
        &gateway_binary(),
        &["admin", "revoke", "laptop", "--data-dir", gw],
    );
    assert!(err.contains("admin devices"), "{err}");
    // A request that is not JSON, written straight to the socket, gets an answer and is logged.
    {
        use std::io::{Read, Write};
        let mut raw = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        raw.write_all(b"\xff revoke everything").unwrap();
        raw.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        raw.read_to_string(&mut answer).unwrap();
        assert!(answer.contains("same version"), "{answer}");
    }
    let log = std::fs::read_to_string(tmp.path().join("gateway.log")).unwrap();
    let audit: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("sund_gateway::audit"))
        .collect();
    assert!(
        audit.iter().any(|l| l.contains("request=\"revoke\"")
            && l.contains(&laptop_id)
            && l.contains("uid=")),
        "{audit:#?}"
    );
    assert!(
        audit.iter().any(|l| l.contains("request=\"enrol-token\"")),
        "{audit:#?}"
    );
    assert!(
        !log.contains(token.trim()),
        "the audit log holds an enrolment token"
    );

    // Killed, the gateway leaves its socket behind: admin commands then open the database.
    gateway.0.kill().unwrap();
    gateway.0.wait().unwrap();
    assert!(socket.exists());
    let crl = run(&gateway_binary(), &["admin", "crl", "--data-dir", gw]);
    assert!(crl.contains(&laptop_id), "{crl}");
    // A gateway started again replaces the stale socket and still refuses the laptop.
    let mut gateway = Guard(start_gateway(&gw_dir, port));
    let out = status(&laptop);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("revoked"), "{stderr}");
    let crl = run(&gateway_binary(), &["admin", "crl", "--data-dir", gw]);
    assert!(crl.contains("CRL version 1"), "{crl}");
    // SIGTERM drains and stops: exit status 0, and the socket goes with the gateway.
    let pid = gateway.0.id().to_string();
    run(Path::new("/bin/kill"), &["-TERM", &pid]);
    let exit = gateway.0.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(!socket.exists(), "the control socket outlived its gateway");
    let log = std::fs::read_to_string(tmp.path().join("gateway.log")).unwrap();
    assert!(log.contains("draining"), "{log}");
}

/// The user column of `admin devices` for `device`.
fn revoked_user(devices: &str, device: &str) -> String {
    devices
        .lines()
        .find(|l| l.starts_with(device))
        .and_then(|l| l.split_whitespace().nth(1))
        .expect("the device is listed")
        .to_string()
}

#[test]
fn a_message_to_a_conversation_nobody_created_says_how_to_create_it() {
    let tmp = tempfile::tempdir().unwrap();
    let gw_dir = tmp.path().join("gateway");
    let gw = gw_dir.to_str().unwrap();
    let port = free_udp_port();
    let cert = run(&gateway_binary(), &["cert", "--data-dir", gw]);
    let addr = format!("127.0.0.1:{port}");
    let d = tmp.path().join("alice");
    let token = enrol(gw, "alice");
    let init = init_device(
        d.to_str().unwrap(),
        &addr,
        cert.trim(),
        Some("alice"),
        Some(&token),
    );
    let _ = device_key(&init);
    let _gateway = Guard(start_gateway(&gw_dir, port));
    let out = Command::new(sund())
        .args([
            "send",
            "--data-dir",
            d.to_str().unwrap(),
            "nowhere",
            "hello?",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no conversation `nowhere`")
            && stderr.contains("sund-gateway admin create-conversation nowhere"),
        "{stderr}"
    );
}

#[test]
fn commands_without_a_device_say_how_to_create_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nothing-here");
    let out = Command::new(sund())
        .args(["status", "--data-dir", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("run `sund init --data-dir"), "{stderr}");
}

#[test]
fn an_encrypted_dm_between_real_binaries_leaves_only_ciphertext_at_the_gateway() {
    let tmp = tempfile::tempdir().unwrap();
    let gw_dir = tmp.path().join("gateway");
    let gw = gw_dir.to_str().unwrap();
    let port = free_udp_port();
    let cert = run(&gateway_binary(), &["cert", "--data-dir", gw]);
    let cert = cert.trim();
    let addr = format!("127.0.0.1:{port}");
    let a_dir = tmp.path().join("alice");
    let b_dir = tmp.path().join("bob");
    let (a, b) = (a_dir.to_str().unwrap(), b_dir.to_str().unwrap());
    for (dir, user) in [(a, "alice"), (b, "bob")] {
        init_device(dir, &addr, cert, Some(user), None);
    }
    let gateway = Guard(start_gateway_with(&gw_dir, port, &["--open-enrolment"]));
    // Bob follows; his node connects and uploads KeyPackages.
    let mut follower = Guard(
        Command::new(sund())
            .args(["follow", "--data-dir", b, "--count", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, lines) = mpsc::channel();
    let stdout = follower.0.stdout.take().unwrap();
    let stderr = follower.0.stderr.take().unwrap();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(format!("out: {line}"));
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("err: {line}"));
        }
    });
    let wait_for = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if line.contains(what) => return line,
                Ok(line) => seen.push(line),
                Err(_) => panic!("bob never printed {what:?}; he printed {seen:#?}"),
            }
        }
    };
    wait_for("status: connected");
    std::thread::sleep(Duration::from_millis(500));

    let dm = run(&sund(), &["dm", "--data-dir", a, "bob"]);
    assert!(dm.starts_with("dm @bob (conv:"), "{dm}");
    assert!(
        dm.contains("  bob: dev:"),
        "bob's device is in the DM: {dm}"
    );
    let sent = run(
        &sund(),
        &["send", "--data-dir", a, "@bob", "MARKER-e2e a secret"],
    );
    // Seq 1 is the commit making the DM, seq 2 the roster telling bob alice's address.
    assert_eq!(sent.trim(), "sent to @bob: seq 3");
    wait_for("joined dm");
    let line = wait_for("MARKER-e2e");
    assert!(line.ends_with(": MARKER-e2e a secret"), "{line}");
    assert!(
        line.contains(" from alice ("),
        "bob reads alice's name: {line}"
    );
    assert!(follower.0.wait().unwrap().success());
    let devices = run(&sund(), &["devices", "--data-dir", a]);
    assert!(devices.contains("epoch 1, in sync"), "{devices}");
    drop(gateway);

    // What the gateway stored: the DM's ciphertext, never its text.
    let db = std::fs::read(gw_dir.join("gateway.redb")).unwrap();
    assert!(
        !db.windows(10).any(|w| w == b"MARKER-e2e"),
        "plaintext in gateway.redb"
    );
    let log = std::fs::read_to_string(gw_dir.with_file_name("gateway.log")).unwrap();
    assert!(
        !log.contains("MARKER-e2e"),
        "plaintext in the gateway's log"
    );
}

#[test]
fn a_device_paired_from_another_registers_without_a_token_and_the_code_works_once() {
    let tmp = tempfile::tempdir().unwrap();
    let gw_dir = tmp.path().join("gateway");
    let gw = gw_dir.to_str().unwrap();
    let port = free_udp_port();
    let cert = run(&gateway_binary(), &["cert", "--data-dir", gw]);
    let addr = format!("127.0.0.1:{port}");
    let token = enrol(gw, "alice");
    let laptop = tmp.path().join("laptop");
    let laptop = laptop.to_str().unwrap();
    init_device(laptop, &addr, cert.trim(), Some("alice"), Some(&token));
    let _gateway = Guard(start_gateway(&gw_dir, port));
    run(&sund(), &["status", "--data-dir", laptop]);

    // The laptop shows a code (QR and text) and waits for the new device.
    let mut show = Guard(
        Command::new(sund())
            .args(["pair", "show", "--data-dir", laptop, "--wait", "60"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = show.0.stdout.take().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut printed = Vec::new();
    let code = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no pairing code printed: {printed:?}"));
        printed.push(line.clone());
        if line.starts_with("SUND-PAIR:") {
            break line;
        }
    };
    assert!(
        !printed.iter().any(|l| l.contains('█') || l.contains('▀')),
        "a QR code is for a terminal, not a pipe: {printed:?}"
    );

    // The phone takes it: registered, confirmed, connected, without an operator token.
    let phone = tmp.path().join("phone");
    let phone = phone.to_str().unwrap();
    let accepted = run(&sund(), &["pair", "accept", "--data-dir", phone, &code]);
    assert!(
        accepted.contains("paired: the gateway confirmed"),
        "{accepted}"
    );
    assert!(
        accepted.contains("connected to the gateway as a device of alice"),
        "{accepted}"
    );
    let linked = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .expect("pair show reports the new device");
        if line.contains("is now linked") {
            break line;
        }
    };
    assert!(linked.contains("to alice"), "{linked}");
    assert!(show.0.wait().unwrap().success());
    let status = run(&sund(), &["status", "--data-dir", phone]);
    assert!(status.contains("confirmed by the gateway"), "{status}");

    // The code enrols one device only, and a damaged code says what is wrong.
    let tablet = tmp.path().join("tablet");
    let out = Command::new(sund())
        .args([
            "pair",
            "accept",
            "--data-dir",
            tablet.to_str().unwrap(),
            &code,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already used"), "{stderr}");
    assert!(
        !tablet.exists(),
        "a refused pairing leaves no dead device directory behind"
    );
    let out = Command::new(sund())
        .args([
            "pair",
            "accept",
            "--data-dir",
            tablet.to_str().unwrap(),
            "SUND-PAIR:1:00",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("secret is damaged"), "{stderr}");
}
