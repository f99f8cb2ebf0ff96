//! The real binaries against what the simulator cannot see: file permissions, damaged and
//! truncated databases, a process whose store fails. Each test fails without its fix.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Starts `sund-gateway run` and waits (at most 20 s) for it to exit by itself; its stderr.
fn gateway_run_exits(data: &Path, port: u16) -> String {
    let child = Command::new(gateway_binary())
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sund-gateway starts");
    let mut guard = Guard(child);
    let started = Instant::now();
    loop {
        if let Some(status) = guard.0.try_wait().unwrap() {
            assert!(!status.success(), "the gateway should refuse to run");
            let mut stderr = String::new();
            use std::io::Read;
            guard
                .0
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            return stderr;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the gateway kept running on a data directory it must refuse"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Overwrites `len` bytes of `path` at `offset` with a fixed pseudo-random pattern.
fn scribble(path: &Path, offset: u64, len: usize) {
    use std::io::{Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let junk: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    file.write_all(&junk).unwrap();
}

#[test]
fn data_directories_and_secret_files_are_private_and_looser_ones_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let gw_dir = tmp.path().join("gateway");
    let gw = gw_dir.to_str().unwrap();
    let cert = run(&gateway_binary(), &["cert", "--data-dir", gw]);
    enrol(gw, "alice");
    assert_eq!(mode(&gw_dir), 0o700, "the gateway's data directory");
    assert_eq!(
        mode(&gw_dir.join("gateway.redb")),
        0o600,
        "the trust root's database"
    );
    assert_eq!(mode(&gw_dir.join("tls")), 0o700);
    assert_eq!(mode(&gw_dir.join("tls/key.der")), 0o600);

    chmod(&gw_dir, 0o755);
    let err = fails(
        &gateway_binary(),
        &["admin", "enrol-token", "bob", "--data-dir", gw],
    );
    assert!(err.contains("chmod 700"), "{err}");
    let err = gateway_run_exits(&gw_dir, free_udp_port());
    assert!(err.contains("chmod 700"), "{err}");
    chmod(&gw_dir, 0o700);
    chmod(&gw_dir.join("gateway.redb"), 0o644);
    let err = fails(
        &gateway_binary(),
        &["admin", "enrol-token", "bob", "--data-dir", gw],
    );
    assert!(err.contains("chmod 600"), "{err}");
    chmod(&gw_dir.join("gateway.redb"), 0o600);
    enrol(gw, "bob");

    let dev_dir = tmp.path().join("alice");
    let dev = dev_dir.to_str().unwrap();
    init_device(dev, "127.0.0.1:9", cert.trim(), None, None);
    assert_eq!(mode(&dev_dir), 0o700, "the device's data directory");
    assert_eq!(mode(&dev_dir.join("device.key")), 0o600);
    assert_eq!(mode(&dev_dir.join("node.toml")), 0o600);
    chmod(&dev_dir.join("node.toml"), 0o644);
    let err = fails(&sund(), &["status", "--data-dir", dev]);
    assert!(err.contains("chmod 600"), "{err}");
}

#[test]
fn a_damaged_or_truncated_gateway_database_is_refused_with_how_to_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let gw_dir = tmp.path().join("gateway");
    let gw = gw_dir.to_str().unwrap();
    run(&gateway_binary(), &["cert", "--data-dir", gw]);
    enrol(gw, "alice");
    let db = gw_dir.join("gateway.redb");
    let root = run(&gateway_binary(), &["admin", "crl", "--data-dir", gw]);

    // A page in use (the first pages hold the tables) overwritten.
    let copy = tmp.path().join("gateway.redb.good");
    std::fs::copy(&db, &copy).unwrap();
    scribble(&db, 4096, 4096);
    let err = fails(&gateway_binary(), &["admin", "crl", "--data-dir", gw]);
    assert!(
        err.contains("is damaged") && err.contains("backup"),
        "{err}"
    );
    let err = fails(
        &gateway_binary(),
        &["admin", "enrol-token", "bob", "--data-dir", gw],
    );
    assert!(
        err.contains("is damaged"),
        "no token under a new root: {err}"
    );
    let err = gateway_run_exits(&gw_dir, free_udp_port());
    assert!(err.contains("is damaged"), "{err}");

    // Truncated to nothing: never silently a new gateway with a new root.
    std::fs::write(&db, b"").unwrap();
    let err = fails(&gateway_binary(), &["admin", "crl", "--data-dir", gw]);
    assert!(err.contains("is empty"), "{err}");
    let err = gateway_run_exits(&gw_dir, free_udp_port());
    assert!(err.contains("is empty"), "{err}");

    // A whole database with nothing in it, where one existed (a disk that lost the writes
    // it had reported durable can leave redb at its empty first commit): never silently a new
    // gateway either.
    std::fs::remove_file(&db).unwrap();
    drop(sund_runtime::store::RedbStore::open(&db).unwrap());
    let err = fails(&gateway_binary(), &["admin", "crl", "--data-dir", gw]);
    assert!(
        err.contains("holds no data") && err.contains("backup"),
        "{err}"
    );
    let err = fails(
        &gateway_binary(),
        &["admin", "enrol-token", "bob", "--data-dir", gw],
    );
    assert!(err.contains("holds no data"), "{err}");
    let err = gateway_run_exits(&gw_dir, free_udp_port());
    assert!(err.contains("holds no data"), "{err}");

    // Restored from the copy, the same gateway again.
    std::fs::copy(&copy, &db).unwrap();
    assert_eq!(
        run(&gateway_binary(), &["admin", "crl", "--data-dir", gw]),
        root
    );
}

#[test]
fn a_truncated_device_database_is_refused_not_taken_for_a_new_device() {
    let tmp = tempfile::tempdir().unwrap();
    let gw_dir = tmp.path().join("gateway");
    let cert = run(
        &gateway_binary(),
        &["cert", "--data-dir", gw_dir.to_str().unwrap()],
    );
    let dev_dir = tmp.path().join("alice");
    let dev = dev_dir.to_str().unwrap();
    init_device(dev, "127.0.0.1:9", cert.trim(), None, None);
    // The device's first start creates its database; a later empty one is damage. Nothing
    // answers at port 9, so `status` fails (exit non-zero) and says so.
    let (out, err) = fails_with_output(&sund(), &["status", "--data-dir", dev]);
    assert!(out.contains("connection reconnecting"), "{out}");
    assert!(err.contains("cannot reach the gateway"), "{err}");
    let db = dev_dir.join("node.redb");
    assert!(db.exists());
    std::fs::write(&db, b"").unwrap();
    let err = fails(&sund(), &["status", "--data-dir", dev]);
    assert!(err.contains("is empty") && err.contains("backup"), "{err}");
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);
impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (run this test as root, as .ci/run does): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }
}
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system holding `path` with one file until it refuses more.
fn fill_disk(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let block = vec![0xa5u8; 64 * 1024];
    loop {
        match file.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    let _ = file.sync_all();
}

#[test]
#[ignore = "mounts a tmpfs, which needs root; .ci/run runs it"]
fn a_full_disk_stops_the_gateway_storing_not_listening_and_it_recovers_when_space_returns() {
    let tmp = tempfile::tempdir().unwrap();
    // The gateway's data directory is the small disk; its log is elsewhere.
    let disk = Tmpfs::mount(&tmp.path().join("gateway"), "8m");
    let gw_dir = disk.0.clone();
    let gw = gw_dir.to_str().unwrap();
    let port = free_udp_port();
    let addr = format!("127.0.0.1:{port}");
    let cert = run(&gateway_binary(), &["cert", "--data-dir", gw]);
    let cert = cert.trim();
    let a_dir = tmp.path().join("a");
    let b_dir = tmp.path().join("b");
    let (a, b) = (a_dir.to_str().unwrap(), b_dir.to_str().unwrap());
    two_devices_in_a_room(gw, &addr, cert, a, b);
    let mut gateway = Guard(start_gateway(&gw_dir, port));
    run(&sund(), &["send", "--data-dir", a, "room", "before"]);

    // The disk fills: the gateway stops storing, keeps running, and says why, to its operator
    // in its log and to the device in its close reason.
    fill_disk(&disk.0.join("filler"));
    let mut refused = None;
    for i in 1..=20 {
        let out = Command::new(sund())
            .args(["send", "--data-dir", a, "room", &format!("while-full-{i}")])
            .output()
            .unwrap();
        if !out.status.success() {
            refused = Some((i, String::from_utf8_lossy(&out.stderr).into_owned()));
            break;
        }
    }
    let (sent_while_full, err) = refused.expect("a full disk must stop the gateway acknowledging");
    assert!(
        err.contains("cannot store messages") && err.contains("disk may be full"),
        "the device says why: {err}"
    );
    assert!(err.contains("stays in this device's outbox"), "{err}");
    assert!(
        gateway.0.try_wait().unwrap().is_none(),
        "the gateway keeps running and retries its store"
    );
    // A second message queues behind the first: they must go out in the order sent.
    let queued = format!("while-full-{}", sent_while_full + 1);
    let err = fails(&sund(), &["send", "--data-dir", a, "room", &queued]);
    assert!(err.contains("stays in this device's outbox"), "{err}");
    let (status, err) = fails_with_output(&sund(), &["status", "--data-dir", a]);
    assert!(
        status.contains("outbox     2 message(s) waiting"),
        "{status}"
    );
    assert!(err.contains("cannot store messages"), "{err}");
    let log = std::fs::read_to_string(gw_dir.with_file_name("gateway.log")).unwrap();
    assert!(
        log.contains("the disk is full"),
        "the operator reads why in the log"
    );
    assert_eq!(
        log.matches("the store cannot commit").count(),
        1,
        "an outage is logged once, not on every retry"
    );

    // Space returns: the gateway serves again by itself, and the message that waited goes out
    // with the next.
    std::fs::remove_file(disk.0.join("filler")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(gw_dir.with_file_name("gateway.log")).unwrap();
        if log.contains("the store commits again") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway did not recover: {log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    run(&sund(), &["send", "--data-dir", a, "room", "after"]);
    let mut expected = vec!["before".to_string()];
    expected.extend((1..=sent_while_full + 1).map(|i| format!("while-full-{i}")));
    expected.push("after".into());
    let lines = follow(b, "room", expected.len(), Duration::from_secs(30));
    let bodies: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.rsplit_once(": ").map(|(_, body)| body))
        .collect();
    assert_eq!(
        bodies, expected,
        "nothing lost, nothing twice, in the order sent: {lines:#?}"
    );
    assert!(gateway.0.try_wait().unwrap().is_none());
    gateway.0.kill().unwrap();
}

/// A device whose own disk is full: `sund send` says the device stopped before it could save
/// the message, why, and that the message may already have reached the gateway (the node sends
/// before its outbox commit completes), so the user looks before sending it again. Found on the
/// driver layer (`cargo sim --drivers scenarios/full-disks.sund`), shown here on the binaries.
#[test]
#[ignore = "mounts a tmpfs, which needs root; .ci/run runs it"]
fn a_full_device_disk_stops_the_send_and_says_the_message_may_have_left() {
    let tmp = tempfile::tempdir().unwrap();
    let gw_dir = tmp.path().join("gateway");
    let gw = gw_dir.to_str().unwrap();
    let port = free_udp_port();
    let addr = format!("127.0.0.1:{port}");
    let cert = run(&gateway_binary(), &["cert", "--data-dir", gw]);
    let cert = cert.trim();
    // The sender's data directory is the small disk.
    let disk = Tmpfs::mount(&tmp.path().join("a"), "4m");
    let a_dir = disk.0.clone();
    let b_dir = tmp.path().join("b");
    let (a, b) = (a_dir.to_str().unwrap(), b_dir.to_str().unwrap());
    two_devices_in_a_room(gw, &addr, cert, a, b);
    let mut gateway = Guard(start_gateway(&gw_dir, port));
    run(&sund(), &["send", "--data-dir", a, "room", "before"]);

    fill_disk(&disk.0.join("filler"));
    let err = fails(&sund(), &["send", "--data-dir", a, "room", "while-full"]);
    assert!(
        err.contains("the disk is full"),
        "the device says why: {err}"
    );
    // Whether the outbox commit of this message still fit (redb writes into pages it already
    // has) or not, the user is told where the message stands and what to do.
    let saved = err.contains("it is saved in this device's outbox");
    let maybe_left = err.contains("may already have reached the gateway")
        && err.contains("before sending it again");
    assert!(saved || maybe_left, "and what to do: {err}");

    // Space returns: the device sends again; nothing came twice, and the order holds.
    std::fs::remove_file(disk.0.join("filler")).unwrap();
    run(&sund(), &["send", "--data-dir", a, "room", "after"]);
    // A message that may have left arrives at most once, in its place; a saved one exactly
    // once. (Waiting for three lines ends early when all three came.)
    let within = Duration::from_secs(if saved { 30 } else { 10 });
    let lines = follow(b, "room", 3, within);
    let bodies: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.rsplit_once(": ").map(|(_, body)| body))
        .collect();
    let all = ["before", "while-full", "after"];
    if saved {
        assert_eq!(bodies, all, "{lines:#?}");
    } else {
        assert!(bodies == all || bodies == ["before", "after"], "{lines:#?}");
    }
    gateway.0.kill().unwrap();
}

#[test]
fn a_device_acts_on_the_stateless_reset_of_a_restarted_gateway() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let gw_dir = tmp.path().join("gateway");
    let gw = gw_dir.to_str().unwrap();
    let port = free_udp_port();
    let addr = format!("127.0.0.1:{port}");
    let cert = run(&gateway_binary(), &["cert", "--data-dir", gw]);
    let dev_dir = tmp.path().join("a");
    let dev = dev_dir.to_str().unwrap();
    init_device(dev, &addr, cert.trim(), Some("a"), Some(&enrol(gw, "a")));
    let mut gateway = Guard(start_gateway(&gw_dir, port));
    let mut follower = Guard(
        Command::new(sund())
            .args(["follow", "--data-dir", dev])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, lines) = std::sync::mpsc::channel();
    let stderr = follower.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wait_for = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if line.contains(what) => return,
                Ok(line) => seen.push(line),
                Err(_) => panic!("never saw {what:?}; saw {seen:#?}"),
            }
        }
    };
    wait_for("status: connected");
    // A crash and an immediate restart on the same port: the device's next packet reaches a
    // process that does not know its connection, and the reset it gets back verifies (the
    // reset key survives restarts), so it reconnects without waiting out its idle timeout.
    gateway.0.kill().unwrap();
    gateway.0.wait().unwrap();
    gateway = Guard(start_gateway(&gw_dir, port));
    wait_for("the gateway no longer knows this connection");
    wait_for("status: connected");
    drop(gateway);
}
