//! Operating a gateway, end to end with the real binaries.
//!
//! Backup and restore: a backup taken while a device keeps sending holds every message
//! acknowledged before it began, and a gateway restored from it into a new data directory serves
//! them to a device that never read them (its TLS identity restored too, so the devices' pinned
//! certificate still holds). Metrics: a scraper reads the running gateway's counters.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;
use common::*;

#[test]
fn a_backup_taken_under_load_restores_every_message_acknowledged_before_it() {
    let tmp = tempfile::tempdir().unwrap();
    let gw_dir = tmp.path().join("gateway");
    let gw = gw_dir.to_str().unwrap();
    let port = free_udp_port();
    let cert = run(&gateway_binary(), &["cert", "--data-dir", gw]);
    let addr = format!("127.0.0.1:{port}");
    let a_dir = tmp.path().join("a");
    let b_dir = tmp.path().join("b");
    let (a, b) = (
        a_dir.to_str().unwrap().to_string(),
        b_dir.to_str().unwrap().to_string(),
    );
    two_devices_in_a_room(gw, &addr, cert.trim(), &a, &b);
    let mut gateway = Guard(start_gateway(&gw_dir, port));

    // a sends 16 messages, one after another, while the backup is taken.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let sender = {
        let acked = acked.clone();
        let a = a.clone();
        std::thread::spawn(move || {
            for i in 1..=16 {
                let out = run(
                    &sund(),
                    &["send", "--data-dir", &a, "room", &format!("message-{i}")],
                );
                acked.lock().unwrap().push(out.trim().to_string());
            }
        })
    };
    while acked.lock().unwrap().len() < 4 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = acked.lock().unwrap().len();
    let backup = tmp.path().join("gateway.backup");
    let out = run(
        &gateway_binary(),
        &[
            "admin",
            "backup",
            backup.to_str().unwrap(),
            "--data-dir",
            gw,
        ],
    );
    assert!(out.starts_with("backed up "), "{out}");
    sender.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    let expected: Vec<String> = (1..=16).map(|i| format!("sent to room: seq {i}")).collect();
    assert_eq!(acked, expected, "the backup did not disturb the sends");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&backup).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "a backup holds keys: owner only");
    }
    // A backup never overwrites: the second one to the same name is refused.
    let err = fails(
        &gateway_binary(),
        &[
            "admin",
            "backup",
            backup.to_str().unwrap(),
            "--data-dir",
            gw,
        ],
    );
    assert!(err.contains("exists already"), "{err}");

    // The gateway's machine is lost; a new data directory is made from the backup.
    gateway.0.kill().unwrap();
    gateway.0.wait().unwrap();
    let restored = tmp.path().join("restored");
    let r = restored.to_str().unwrap();
    let err = restore_fails(&backup, &gw_dir);
    assert!(err.contains("holds a gateway database already"), "{err}");
    let out = run(
        &gateway_binary(),
        &[
            "admin",
            "restore",
            backup.to_str().unwrap(),
            "--data-dir",
            r,
        ],
    );
    assert!(out.starts_with("restored "), "{out}");
    assert_eq!(
        std::fs::read(restored.join("tls/cert.der")).unwrap(),
        std::fs::read(gw_dir.join("tls/cert.der")).unwrap(),
        "the devices' pinned certificate is the restored gateway's"
    );
    // A truncated copy of the backup is refused before anything is written.
    let truncated = tmp.path().join("truncated.backup");
    let bytes = std::fs::read(&backup).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    owner_only(&truncated);
    let elsewhere = tmp.path().join("elsewhere");
    let err = restore_fails(&truncated, &elsewhere);
    assert!(err.contains("is not a gateway backup"), "{err}");
    assert!(!elsewhere.join("gateway.redb").exists());
    let devices = run(&gateway_binary(), &["admin", "devices", "--data-dir", r]);
    assert!(
        devices.contains(" valid"),
        "the sender's certificate came back: {devices}"
    );
    let _gateway = Guard(start_gateway(&restored, port));

    // b never read the room: it gets every message acknowledged before the backup began, in
    // order, once each.
    let lines = follow(&b, "room", before, Duration::from_secs(60));
    assert_eq!(lines.len(), before, "{lines:#?}");
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        assert!(
            line.contains(&format!(" seq {n} from ")) && line.ends_with(&format!(": message-{n}")),
            "line {n}: {line}"
        );
    }
    let status = Command::new(sund())
        .args(["status", "--data-dir", &b])
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    assert!(Path::new(&backup).exists());
}

/// `sund-gateway admin restore FILE --data-dir DIR`, which must fail: what it said.
fn restore_fails(file: &Path, dir: &Path) -> String {
    fails(
        &gateway_binary(),
        &[
            "admin",
            "restore",
            file.to_str().unwrap(),
            "--data-dir",
            dir.to_str().unwrap(),
        ],
    )
}

/// Mode 0600, as a backup is written (a restore reads only such files).
fn owner_only(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn restoring_something_that_is_not_a_backup_says_so_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let bogus = tmp.path().join("notes.txt");
    std::fs::write(&bogus, "not a database").unwrap();
    owner_only(&bogus);
    let target = tmp.path().join("new");
    let err = restore_fails(&bogus, &target);
    assert!(err.contains("is not a gateway backup"), "{err}");
    assert!(!target.join("gateway.redb").exists());
    // A file that is not there is said to be missing, and is not created.
    let missing = tmp.path().join("missing.backup");
    let err = restore_fails(&missing, &target);
    assert!(err.contains("is not a file"), "{err}");
    assert!(!missing.exists());
    // A directory holding anything (a TLS identity made by `cert`) is not overwritten.
    let used = tmp.path().join("used");
    run(
        &gateway_binary(),
        &["cert", "--data-dir", used.to_str().unwrap()],
    );
    let err = restore_fails(&bogus, &used);
    assert!(err.contains("is not empty"), "{err}");
}

/// `GET PATH` (or another method) on the metrics endpoint: the status line and the body.
fn scrape(addr: &str, method: &str, path: &str) -> (String, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// The value of the series named exactly `series` in an exposition.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

#[test]
fn a_scraper_reads_the_running_gateways_counters() {
    let room = RoomOfTwo::new();
    let a = room.a.as_str();
    let metrics = free_tcp_addr();
    let _gateway = Guard(start_gateway_with(
        &room.gw_dir,
        room.port,
        &["--metrics", &metrics],
    ));
    for i in 1..=3 {
        run(
            &sund(),
            &["send", "--data-dir", a, "room", &format!("m{i}")],
        );
    }
    let (status, text) = scrape(&metrics, "GET", "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(value(&text, "sund_gateway_up"), 1.0);
    assert_eq!(value(&text, "sund_gateway_delivery_sequenced_total"), 3.0);
    // Each send is a session of its own: opened with a proof or resumed with a token.
    assert!(
        value(&text, "sund_gateway_sessions_authenticated_total")
            + value(&text, "sund_gateway_sessions_resumed_total")
            >= 3.0
    );
    assert_eq!(
        value(&text, "sund_gateway_registry_registrations_total"),
        1.0
    );
    assert_eq!(value(&text, "sund_gateway_conversations"), 1.0);
    assert!(value(&text, "sund_gateway_stage_seconds_count{stage=\"fsync\"}") >= 3.0);
    assert!(text.contains("# TYPE sund_gateway_refusals_total counter"));
    // No user data in the exposition: no device, user or conversation ids.
    for leak in ["dev:", "user:", "conv:"] {
        assert!(!text.contains(leak), "`{leak}` in the metrics:\n{text}");
    }
    assert_eq!(
        scrape(&metrics, "GET", "/elsewhere").0,
        "HTTP/1.1 404 Not Found"
    );
    assert_eq!(
        scrape(&metrics, "POST", "/metrics").0,
        "HTTP/1.1 405 Method Not Allowed"
    );
}
