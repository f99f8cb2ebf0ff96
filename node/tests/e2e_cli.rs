//! The `sund` command line as a user types it, against a real gateway on loopback: what it
//! prints, what it keeps, and what it refuses.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;
use common::*;

/// A gateway with open enrolment and two devices, alice and bob, with a DM between them.
struct Dm {
    _tmp: tempfile::TempDir,
    _gateway: Guard,
    gw_dir: std::path::PathBuf,
    port: u16,
    alice: String,
    bob: String,
}

impl Dm {
    fn new() -> Dm {
        Dm::with_gateway_flags(&[])
    }

    fn with_gateway_flags(flags: &[&str]) -> Dm {
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
        let flags: Vec<&str> = ["--open-enrolment"].iter().chain(flags).copied().collect();
        let gateway = Guard(start_gateway_with(&gw_dir, port, &flags));
        // Bob's first start registers him and leaves KeyPackages for alice's DM.
        let status = run(&sund(), &["status", "--data-dir", &bob]);
        assert!(status.contains("connection connected"), "{status}");
        let dm = run(&sund(), &["dm", "--data-dir", &alice, "bob"]);
        assert!(dm.starts_with("dm @bob (conv:"), "{dm}");
        Dm {
            _tmp: tmp,
            _gateway: gateway,
            gw_dir,
            port,
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

#[test]
fn unknown_users_are_an_error_never_a_silent_success() {
    let dm = Dm::new();
    let err = fails(&sund(), &["dm", "--data-dir", &dm.alice, "nobody"]);
    assert!(
        err.contains("none is registered there") && err.contains("check the name"),
        "{err}"
    );
    let err = fails(
        &sund(),
        &["dm", "--data-dir", &dm.alice, "nobody@localhost"],
    );
    assert!(
        err.contains("none is registered there") && err.contains("check the name"),
        "{err}"
    );
    let err = fails(&sund(), &["dm", "--data-dir", &dm.alice, ""]);
    assert!(err.contains("is not a user name"), "{err}");
    // Another domain's user, on a gateway that federates with nobody: said plainly.
    let err = fails(&sund(), &["dm", "--data-dir", &dm.alice, "bob@b.example"]);
    assert!(
        err.contains("this gateway does not federate with b.example"),
        "{err}"
    );
    let err = fails(&sund(), &["dm", "--data-dir", &dm.alice, "bob@B_X"]);
    assert!(err.contains("`b_x` is not a domain name"), "{err}");
    let err = fails(&sund(), &["dm", "--data-dir", &dm.alice, "two words"]);
    assert!(err.contains("is not a user name"), "{err}");
    // A room with bob, then an invitation for a user who does not exist.
    let out = run(
        &sund(),
        &[
            "room",
            "create",
            "--data-dir",
            &dm.alice,
            "team",
            "--invite",
            "bob",
        ],
    );
    assert!(out.contains("team"), "{out}");
    let err = fails(
        &sund(),
        &[
            "room",
            "invite",
            "--data-dir",
            &dm.alice,
            "team",
            "nosuchuser",
        ],
    );
    assert!(
        err.contains("none is registered there") && err.contains("check the name"),
        "{err}"
    );
    let err = fails(
        &sund(),
        &[
            "room",
            "create",
            "--data-dir",
            &dm.alice,
            "ghosts",
            "--invite",
            "ghost",
        ],
    );
    assert!(
        err.contains("none is registered there") && err.contains("check the name"),
        "{err}"
    );
    // `@name` means the DM: never the operator-conversation path.
    let err = fails(
        &sund(),
        &["send", "--data-dir", &dm.alice, "@nobody", "hello?"],
    );
    assert!(err.contains("start one with `sund dm nobody`"), "{err}");
    assert!(
        !err.contains("admin"),
        "no operator command is suggested: {err}"
    );
    // The DM with bob still works after all that.
    dm.send("still here");
    let got = follow(&dm.bob, "@bob", 1, Duration::from_secs(30));
    assert!(got[0].ends_with(": still here"), "{got:#?}");
}

#[test]
fn init_checks_the_certificate_and_takes_host_names() {
    let tmp = tempfile::tempdir().unwrap();
    let gw_dir = tmp.path().join("gateway");
    let gw = gw_dir.to_str().unwrap();
    let cert = run(&gateway_binary(), &["cert", "--data-dir", gw]);
    let garbage = tmp.path().join("garbage.der");
    std::fs::write(&garbage, b"this is not a certificate").unwrap();
    let dev = tmp.path().join("alice");
    let dev = dev.to_str().unwrap();
    let err = fails(
        &sund(),
        &[
            "init",
            "--data-dir",
            dev,
            "--gateway",
            "127.0.0.1:4433",
            "--gateway-cert",
            garbage.to_str().unwrap(),
            "--user",
            "alice",
        ],
    );
    assert!(err.contains("not a DER X.509 certificate"), "{err}");
    assert!(
        err.contains("sund-gateway cert"),
        "says where the right file is: {err}"
    );
    assert!(
        !Path::new(dev).join("node.toml").exists(),
        "nothing half-made is left"
    );
    let err = fails(
        &sund(),
        &[
            "init",
            "--data-dir",
            dev,
            "--gateway",
            "no-port-here",
            "--gateway-cert",
            cert.trim(),
            "--user",
            "alice",
        ],
    );
    assert!(err.contains("is not HOST:PORT"), "{err}");
    // A host name works as the pairing codes' addresses do, and the device connects by it.
    let port = free_udp_port();
    init_device(
        dev,
        &format!("localhost:{port}"),
        cert.trim(),
        Some("alice"),
        None,
    );
    let _gateway = Guard(start_gateway_with(&gw_dir, port, &["--open-enrolment"]));
    let status = run(&sund(), &["status", "--data-dir", dev]);
    assert!(
        status.contains(&format!("localhost:{port}"))
            || status.contains(&format!("127.0.0.1:{port}")),
        "{status}"
    );
    assert!(status.contains("connection connected"), "{status}");
}

#[test]
fn a_wrong_pin_is_named_and_status_fails_when_the_gateway_is_not_reached() {
    let tmp = tempfile::tempdir().unwrap();
    let gw_dir = tmp.path().join("gateway");
    let gw = gw_dir.to_str().unwrap();
    run(&gateway_binary(), &["cert", "--data-dir", gw]);
    // Another gateway's certificate: a device pinned to it must not talk to this one.
    let other = tmp.path().join("other");
    let other_cert = run(
        &gateway_binary(),
        &["cert", "--data-dir", other.to_str().unwrap()],
    );
    let port = free_udp_port();
    let dev = tmp.path().join("alice");
    let dev = dev.to_str().unwrap();
    init_device(
        dev,
        &format!("127.0.0.1:{port}"),
        other_cert.trim(),
        Some("alice"),
        None,
    );
    // Nothing runs yet: status exits non-zero and says it cannot reach the gateway.
    let (out, err) = fails_with_output(&sund(), &["status", "--data-dir", dev]);
    assert!(out.contains("connection reconnecting"), "{out}");
    assert!(err.contains("cannot reach the gateway"), "{err}");
    let _gateway = Guard(start_gateway_with(&gw_dir, port, &["--open-enrolment"]));
    let (_, err) = fails_with_output(&sund(), &["status", "--data-dir", dev]);
    assert!(
        err.contains("is not the gateway this device pinned"),
        "the pin mismatch is named, not taken for a gateway that is down: {err}"
    );
    assert!(!err.contains("is the gateway running"), "{err}");
}

#[test]
fn flags_after_run_work_and_a_forged_token_is_named_as_unknown() {
    let tmp = tempfile::tempdir().unwrap();
    let gw_dir = tmp.path().join("gateway");
    let gw = gw_dir.to_str().unwrap();
    let cert = run(&gateway_binary(), &["cert", "--data-dir", gw]);
    let token = enrol(gw, "alice");
    // The token's secret changed: well formed, but not one the gateway issued.
    let mut parts: Vec<String> = token.trim().split(':').map(str::to_string).collect();
    assert_eq!(parts.len(), 5, "{token}");
    assert_eq!(
        parts[4], "localhost",
        "the token names the gateway's domain"
    );
    parts[2] = parts[2].chars().rev().collect();
    let forged = parts.join(":");
    let port = free_udp_port();
    let addr = format!("127.0.0.1:{port}");
    let dev = tmp.path().join("alice");
    let dev = dev.to_str().unwrap();
    init_device(dev, &addr, cert.trim(), Some("alice"), Some(&forged));
    // `run` then its flags, as users type it.
    let log = std::fs::File::create(tmp.path().join("gateway.log")).unwrap();
    let _gateway = Guard(
        Command::new(gateway_binary())
            .args(["run", "--listen", &addr, "--data-dir", gw])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let err = fails(&sund(), &["status", "--data-dir", dev]);
    assert!(err.contains("unknown enrolment token"), "{err}");
    assert!(!err.contains("needs an enrolment token"), "{err}");
    // The operator sees the refusal once per burst, with the peer's address and the code,
    // never the token.
    let log = std::fs::read_to_string(tmp.path().join("gateway.log")).unwrap();
    let refusal = log
        .lines()
        .find(|l| l.contains("session refused"))
        .unwrap_or_else(|| panic!("no refusal logged:\n{log}"));
    assert!(
        refusal.contains("127.0.0.1") && refusal.contains("EnrolmentTokenInvalid"),
        "{refusal}"
    );
    assert!(!log.contains(&parts[2]), "the log holds no token secret");
    // `run --open-enrolment` is accepted after `run` as well as before it.
    let out = Command::new(gateway_binary())
        .args(["run", "--open-enrolment", "--help"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The help says what the gateway sees: ciphertext only.
    let help = run(&gateway_binary(), &["--help"]);
    assert!(help.contains("end-to-end encrypted"), "{help}");
    assert!(!help.contains("until MLS"), "{help}");
}

#[test]
fn a_command_while_follow_runs_says_what_holds_the_device_and_what_to_do() {
    let dm = Dm::new();
    let mut follow = Guard(
        Command::new(sund())
            .args(["follow", "--data-dir", &dm.bob])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Give follow time to open the database (a command racing its start would hold it first).
    std::thread::sleep(Duration::from_millis(1500));
    assert!(follow.0.try_wait().unwrap().is_none(), "follow runs");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let err = loop {
        let out = Command::new(sund())
            .args(["send", "--data-dir", &dm.bob, "@alice", "while following"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() && err.contains("in use") {
            break err;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "follow never held the device: {err}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(err.contains("such as a running `sund follow`"), "{err}");
    assert!(err.contains("Stop the other one"), "{err}");
    let _ = follow.0.kill();
}

#[test]
fn a_copied_data_directory_is_caught_and_the_stale_copy_says_what_to_do() {
    let dm = Dm::new();
    dm.send("before the copy");
    // A backup of alice's device, restored later beside it (or a clone).
    let copy = format!("{}-copy", dm.alice);
    let status = Command::new("cp")
        .args(["-a", &dm.alice, &copy])
        .status()
        .unwrap();
    assert!(status.success());
    // The original goes on using the gateway; then the copy starts.
    dm.send("after the copy");
    let (_, err) = fails_with_output(
        &sund(),
        &["send", "--data-dir", &copy, "@bob", "from the copy"],
    );
    assert!(err.contains("another copy of this device's data"), "{err}");
    assert!(err.contains("set it up as a new device"), "{err}");
    // It stays refused without asking the gateway again, and says so in status.
    let (_, err) = fails_with_output(&sund(), &["status", "--data-dir", &copy]);
    assert!(err.contains("another copy of this device's data"), "{err}");
    // Bob read the original's two messages and nothing of the copy, and decrypted all.
    let got = follow(&dm.bob, "@bob", 2, Duration::from_secs(30));
    assert!(got[0].ends_with(": before the copy"), "{got:#?}");
    assert!(got[1].ends_with(": after the copy"), "{got:#?}");
    dm.send("still the original");
    let got = follow(&dm.bob, "@bob", 1, Duration::from_secs(30));
    assert!(got[0].ends_with(": still the original"), "{got:#?}");
}

#[test]
fn a_paired_device_is_added_to_its_users_conversations() {
    let dm = Dm::new();
    let out = run(
        &sund(),
        &[
            "room",
            "create",
            "--data-dir",
            &dm.alice,
            "team",
            "--invite",
            "bob",
        ],
    );
    assert!(out.contains("team"), "{out}");
    // Alice shows a code on her device and her new phone takes it.
    let phone = format!("{}-phone", dm.alice);
    let said = pair(&dm.alice, &phone);
    assert!(said.iter().any(|l| l == "  @bob: added"), "{said:#?}");
    assert!(said.iter().any(|l| l == "  team: added"), "{said:#?}");
    // Bob writes in both; the phone reads both.
    run(
        &sund(),
        &["send", "--data-dir", &dm.bob, "@alice", "hello both of you"],
    );
    let got = follow(&phone, "@alice", 1, Duration::from_secs(30));
    assert!(got[0].ends_with(": hello both of you"), "{got:#?}");
}

#[test]
fn a_receiver_reads_the_senders_name_from_the_group_and_names_the_dm_once() {
    let dm = Dm::new();
    dm.send("who am I?");
    // Bob never named alice, but her device tells her address in its leaf of the DM's
    // tree, which bob's device checks against her user id: her name, not the id's hash.
    let out = Command::new(sund())
        .args(["follow", "--data-dir", &dm.bob, "--count", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains(" from alice ("), "{stdout}");
    assert!(!stdout.contains("from user:"), "{stdout}");
    assert!(!stderr.contains("is not named on this device"), "{stderr}");
    // The DM came unnamed; the roster says with whom, and how to name it.
    assert!(
        stderr.contains("is your DM with alice: `sund contact alice` names them and the DM"),
        "{stderr}"
    );
    // Unnamed, it is listed as `send` takes it anyway: `@` and her address.
    let listed = run(&sund(), &["devices", "--data-dir", &dm.bob]);
    assert!(listed.contains("dm @alice (conv:"), "{listed}");
    assert!(!listed.contains("(unnamed DM)"), "{listed}");
    // Naming her still names the DM, so that bob can write to it by name.
    let named = run(&sund(), &["contact", "--data-dir", &dm.bob, "alice"]);
    assert!(named.contains("your DM with them is @alice"), "{named}");
    dm.send("now you know");
    let got = follow(&dm.bob, "@alice", 1, Duration::from_secs(30));
    assert!(got[0].starts_with("@alice seq "), "{got:#?}");
    assert!(got[0].contains(" from alice ("), "{got:#?}");
    // And bob writes to her by that name.
    let out = run(
        &sund(),
        &["send", "--data-dir", &dm.bob, "@alice", "hi alice"],
    );
    assert!(out.starts_with("sent to @alice: seq "), "{out}");
}

#[test]
fn scripts_read_follow_devices_and_the_gateways_logs_as_json() {
    let dm = Dm::with_gateway_flags(&["--log-format", "json"]);
    dm.send("a \"quoted\"\nsecond line");
    let out = Command::new(sund())
        .args([
            "follow",
            "--data-dir",
            &dm.bob,
            "--count",
            "1",
            "--conversation",
            "@alice",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let records: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let message = records
        .iter()
        .find(|r| r["event"] == "message")
        .unwrap_or_else(|| panic!("a message record: {stdout}"));
    assert_eq!(message["text"], "a \"quoted\"\nsecond line", "{stdout}");
    assert_eq!(message["conversation"], "@alice", "{stdout}");
    assert!(message["seq"].as_u64().is_some_and(|s| s > 0), "{stdout}");
    assert!(
        message["sender"].as_str().unwrap().starts_with("dev:"),
        "{stdout}"
    );
    assert!(
        records
            .iter()
            .any(|r| r["event"] == "status" && r["connection"] == "connected"),
        "{stdout}"
    );
    // The message was taken once its record was written.
    let status = run(&sund(), &["status", "--data-dir", &dm.bob, "--json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["unread"], 0, "{status}");

    let devices = run(&sund(), &["devices", "--data-dir", &dm.alice, "--json"]);
    let groups: serde_json::Value = serde_json::from_str(&devices).unwrap();
    let groups = groups.as_array().unwrap();
    assert_eq!(groups.len(), 1, "{devices}");
    assert_eq!(groups[0]["name"], "@bob", "{devices}");
    assert_eq!(groups[0]["kind"], "dm", "{devices}");
    assert_eq!(groups[0]["state"], "in_sync", "{devices}");
    let members = groups[0]["members"].as_array().unwrap();
    assert_eq!(members.len(), 2, "{devices}");
    assert!(
        members
            .iter()
            .any(|m| m["user"] == "bob" && m["this_device"] == false),
        "{devices}"
    );
    assert!(
        members.iter().any(|m| m["this_device"] == true),
        "{devices}"
    );

    // Every line the gateway wrote is a JSON log record, and none holds the message.
    let log = std::fs::read_to_string(dm._tmp.path().join("gateway.log")).unwrap();
    assert!(log.lines().count() > 1, "{log}");
    for line in log.lines() {
        let record: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(record["level"].is_string(), "{line}");
    }
    assert!(!log.contains("quoted"), "{log}");
}

#[test]
fn chat_in_a_real_terminal_sends_receives_and_rides_out_a_gateway_restart() {
    let mut dm = Dm::new();
    dm.send("first from alice");
    let chat = Tmux::start(&format!(
        "'{}' chat --data-dir '{}'; sleep 30",
        sund().display(),
        dm.bob
    ));
    chat.wait_for("alice's message and the connection", |s| {
        s.contains("first from alice") && s.contains("connected")
    });
    chat.type_text("hello from the chat");
    chat.key("Enter");
    // Alice's device reads her own first message too, then bob's.
    let got = follow(&dm.alice, "@bob", 2, Duration::from_secs(30));
    assert!(got[1].ends_with(": hello from the chat"), "{got:#?}");
    chat.wait_for("the gateway's acknowledgement", |s| {
        s.contains("me: hello from the chat") && !s.contains("… me:")
    });

    // The gateway stops: the status bar says so; it comes back, and so does the chat.
    kill_gateway(&mut dm);
    chat.wait_for("the reconnecting status", |s| s.contains("reconnecting"));
    dm._gateway = Guard(start_gateway_with(
        &dm.gw_dir,
        dm.port,
        &["--open-enrolment"],
    ));
    dm.send("after the restart");
    let screen = chat.wait_for("the message sent after the restart", |s| {
        s.contains("after the restart") && s.contains("connected")
    });
    assert!(!screen.contains("panicked"), "{screen}");

    // Esc leaves, and what was shown counts as read.
    chat.key("Escape");
    let screen = chat.wait_for("the chat to exit", |s| !s.contains("┌ chats"));
    assert!(!screen.contains("error"), "{screen}");
    let status = run(&sund(), &["status", "--data-dir", &dm.bob, "--json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["unread"], 0, "{status}");
    assert_eq!(status["outbox"], 0, "{status}");
    drop(chat);
}

/// Stops the DM's gateway at once (SIGKILL: the devices are not told).
fn kill_gateway(dm: &mut Dm) {
    let _ = dm._gateway.0.kill();
    let _ = dm._gateway.0.wait();
}

/// A gateway limits how many devices register from one network address: a third device set
/// up from loopback within the hour is refused and told the limit and when to try again;
/// devices registered before go on working.
#[test]
fn registrations_from_one_address_are_limited_and_the_user_is_told_when_to_try_again() {
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        "[limits]\nregistrations_per_hour = 1\nregistration_burst = 2\n",
    )
    .unwrap();
    let dm = Dm::with_gateway_flags(&["--config", config.to_str().unwrap()]);
    let carol = dm.gw_dir.parent().unwrap().join("carol");
    let carol = carol.to_str().unwrap();
    let addr = format!("127.0.0.1:{}", dm.port);
    let cert = run(
        &gateway_binary(),
        &["cert", "--data-dir", dm.gw_dir.to_str().unwrap()],
    );
    init_device(carol, &addr, cert.trim(), Some("carol"), None);
    let (stdout, stderr) = fails_with_output(&sund(), &["status", "--data-dir", carol]);
    assert!(
        stderr.contains("too many devices registered from this network address: at most 1 per hour (bursts of 2); try again in"),
        "{stdout}\n{stderr}"
    );
    // Alice and Bob, registered already, are not affected.
    dm.send("still talking");
}

/// A flood of sends against a gateway configured with a low per-device limit: the gateway
/// refuses what is past it with `sends_limited` and a retry hint, the device says so once per
/// pause and sends again by itself, and every message arrives once, in the order it was typed.
#[test]
fn a_flood_of_sends_is_paced_by_the_gateway_and_nothing_is_lost_or_reordered() {
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("gateway.toml");
    std::fs::write(&config, "[limits]\nsends_per_second = 5\nsend_burst = 4\n").unwrap();
    let dm = Dm::with_gateway_flags(&["--config", config.to_str().unwrap()]);
    let lines: Vec<String> = (1..=24).map(|i| format!("flood {i:02}")).collect();
    let mut child = Command::new(sund())
        .args(["send", "--data-dir", &dm.alice, "@bob", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        for line in &lines {
            writeln!(stdin, "{line}").unwrap();
        }
        writeln!(stdin).unwrap(); // blank lines are skipped
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let acknowledged: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("sent to @bob: seq "))
        .collect();
    assert_eq!(acknowledged.len(), lines.len(), "{stdout}");
    assert!(
        stderr.contains("the gateway is pacing this device (sends_limited)")
            && stderr.contains("sending again in"),
        "the user is told which limit and for how long: {stderr}"
    );
    assert!(
        stderr.contains("at most 5 per second (bursts of 4)"),
        "{stderr}"
    );
    let read = follow(&dm.bob, "@alice", lines.len(), Duration::from_secs(30));
    let texts: Vec<&str> = read
        .iter()
        .filter_map(|l| l.split_once(": ").map(|(_, text)| text))
        .collect();
    let expected: Vec<&str> = lines.iter().map(String::as_str).collect();
    assert_eq!(texts, expected, "once each and in order: {read:?}");
    // The refusals are counted by code, and a blank input is an error that says so.
    let (_, err) = fails_with_output(&sund(), &["send", "--data-dir", &dm.alice, "@bob"]);
    assert!(
        err.contains("`-` to send each line of standard input"),
        "{err}"
    );
}

#[test]
fn a_send_while_a_proposed_removal_waits_for_its_commit_is_saved_once_it_is_committed() {
    let dm = Dm::new();
    let gw = dm.gw_dir.to_str().unwrap();
    let cert = run(&gateway_binary(), &["cert", "--data-dir", gw]);
    let carol = dm._tmp.path().join("carol").to_str().unwrap().to_string();
    let addr = format!("127.0.0.1:{}", dm.port);
    init_device(&carol, &addr, cert.trim(), Some("carol"), None);
    let status = run(&sund(), &["status", "--data-dir", &carol]);
    let carol_id = status
        .split_whitespace()
        .find(|w| w.starts_with("dev:"))
        .expect("status names the device")
        .to_string();
    let made = run(
        &sund(),
        &[
            "room",
            "create",
            "--data-dir",
            &dm.alice,
            "team",
            "--invite",
            "bob",
            "--invite",
            "carol",
        ],
    );
    let room = conversation_in(&made);
    // The operator revokes carol's device: the gateway proposes her removal, which alice's
    // device (the member chosen to commit it, the lowest leaf) would commit, but it is not
    // running.
    let revoked = run(
        &gateway_binary(),
        &["admin", "revoke", &carol_id, "--data-dir", gw],
    );
    assert!(revoked.contains("CRL version 1"), "{revoked}");
    // Bob's sends join the room (by its id, before his device ever opened it: never in
    // plaintext) and take the proposal in. A message cannot be encrypted while the removal
    // waits (MLS takes no message then): the send waits, bob's device steps in 10 s after it
    // first saw the proposal, and the message goes out, where it used to be refused at once.
    // Whether the first send or the second meets the proposal depends on when it arrives, so
    // both are judged together.
    let mut hinted = false;
    for text in ["one", "two"] {
        let out = Command::new(sund())
            .args(["send", "--data-dir", &dm.bob, &room, text])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}: {stdout}{stderr}");
        assert!(stdout.contains("seq"), "{stdout}");
        hinted |= stderr.contains("waits for a member to commit a change its gateway proposed");
    }
    assert!(hinted, "one of the sends waited for the removal's commit");
    let listed = run(&sund(), &["devices", "--data-dir", &dm.bob]);
    assert!(
        !listed.contains(&carol_id),
        "carol's device is out: {listed}"
    );
}
