//! Backup and restore of a running gateway, end to end with the real binaries: a backup taken
//! while a device keeps sending holds every message acknowledged before it began, and a
//! gateway restored from it into a new data directory serves them to a device that never
//! read them (its TLS identity restored too, so the devices' pinned certificate still holds).

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
    let err = fails(
        &gateway_binary(),
        &[
            "admin",
            "restore",
            backup.to_str().unwrap(),
            "--data-dir",
            gw,
        ],
    );
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

#[test]
fn restoring_something_that_is_not_a_backup_says_so_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let bogus = tmp.path().join("notes.txt");
    std::fs::write(&bogus, "not a database").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bogus, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let target = tmp.path().join("new");
    let err = fails(
        &gateway_binary(),
        &[
            "admin",
            "restore",
            bogus.to_str().unwrap(),
            "--data-dir",
            target.to_str().unwrap(),
        ],
    );
    assert!(err.contains("is not a gateway backup"), "{err}");
    assert!(!target.join("gateway.redb").exists());
    // A file that is not there is said to be missing, and is not created.
    let missing = tmp.path().join("missing.backup");
    let err = fails(
        &gateway_binary(),
        &[
            "admin",
            "restore",
            missing.to_str().unwrap(),
            "--data-dir",
            target.to_str().unwrap(),
        ],
    );
    assert!(err.contains("is not a file"), "{err}");
    assert!(!missing.exists());
}
