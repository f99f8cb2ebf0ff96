//! Files between the real binaries on loopback, as a user types the commands: a 100 MB file
//! sent while the sender, the receiver and the gateway are each killed with SIGKILL part way;
//! every transfer resumes where it stopped and arrives whole and verified; the same file sent
//! again moves nothing; and no half-written file is ever left under the real name.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

/// Bytes that do not repeat, fast to make.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Starts `sund ARGS` and waits until a line of its stderr contains `until`; the child, still
/// running (or exited, if it ended first: then the test fails with what it said).
fn run_until(args: &[&str], until: &str) -> Child {
    let mut child = Command::new(sund())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains(until) => return child,
            Ok(line) => seen.push(line),
            Err(_) => panic!("`sund {args:?}` never printed {until:?}; it said {seen:?}"),
        }
    }
}

fn sigkill(child: &mut Child) {
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
}

/// The id `sund follow` announces for the next file that arrives at `dir`.
fn next_file_id(dir: &str) -> String {
    let out = run(&sund(), &["follow", "--data-dir", dir, "--count", "1"]);
    out.lines()
        .find_map(|l| l.split("sund file get ").nth(1))
        .unwrap_or_else(|| panic!("follow announced no file: {out}"))
        .trim()
        .to_string()
}

/// The id of the next file named `name` that `sund follow` announces on `dir`, past other
/// files' announcements (a sender killed just after it announced a file announces it again
/// when run again, which a loaded machine makes likely).
fn next_file_id_of(dir: &str, name: &str) -> String {
    for _ in 0..4 {
        let out = run(&sund(), &["follow", "--data-dir", dir, "--count", "1"]);
        if let Some(id) = out
            .lines()
            .filter(|l| l.contains(name))
            .find_map(|l| l.split("sund file get ").nth(1))
        {
            return id.trim().to_string();
        }
    }
    panic!("follow announced no file named {name}");
}

fn same_file(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

/// The files of a device's chunk store (`DATA_DIR/values/file_chunk_bytes/AB/ABCD…`).
fn chunk_files(data_dir: &Path) -> std::collections::BTreeSet<std::path::PathBuf> {
    let root = data_dir.join("values").join("file_chunk_bytes");
    let mut files = std::collections::BTreeSet::new();
    for fan in std::fs::read_dir(root).unwrap() {
        for file in std::fs::read_dir(fan.unwrap().path()).unwrap() {
            files.insert(file.unwrap().path());
        }
    }
    files
}

#[test]
fn files_resume_after_sigkills_of_sender_receiver_and_gateway_and_arrive_whole() {
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
    init_device(a, &addr, cert, Some("alice"), Some(&enrol(gw, "alice")));
    init_device(b, &addr, cert, Some("bob"), Some(&enrol(gw, "bob")));
    let mut gateway = Guard(start_gateway(&gw_dir, port));
    run(&sund(), &["status", "--data-dir", b]);
    run(&sund(), &["dm", "--data-dir", a, "bob"]);

    let big = tmp.path().join("big.bin");
    std::fs::write(&big, noise(100_000_000, 1)).unwrap();
    let big_path = big.to_str().unwrap();
    let out_dir = tmp.path().join("received");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.to_str().unwrap();

    // The sender is killed a quarter of the way; sending again goes on from there.
    let send = ["file", "send", "--data-dir", a, "@bob", big_path];
    sigkill(&mut run_until(&send, "sending big.bin: 25 %"));
    let sent = run(&sund(), &send);
    // On a loaded machine the kill can land after the last chunk went (the progress line is
    // read late): then the gateway holds it all and nothing moves, which is right too.
    assert!(
        sent.contains("sent big.bin")
            && (sent.contains("was at the gateway already")
                || sent.contains("the gateway held all of it already")),
        "{sent}"
    );

    // The receiver is killed half way; nothing appears under the file's name until it is
    // whole; getting it again goes on from there.
    let id = next_file_id(b);
    let get = ["file", "get", "--data-dir", b, id.as_str(), "--out", out];
    sigkill(&mut run_until(&get, "getting big.bin: 50 %"));
    assert!(!out_dir.join("big.bin").exists(), "no half-written file");
    let got = run(&sund(), &get);
    assert!(got.contains("saved"), "{got}");
    assert!(same_file(&big, &out_dir.join("big.bin")));
    // The killed get was saving as the chunks arrived, into a hidden file beside; the get that
    // finished took it over, so nothing hidden is left.
    let left: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left, vec!["big.bin"], "no temporary file left behind");
    let list = run(&sund(), &["file", "list", "--data-dir", b]);
    assert!(list.contains(&id) && list.contains("complete"), "{list}");
    // Bob's device signed a receipt; Alice's `follow` hears it, checks it against Bob's
    // certificate key, and `file list` shows who holds the file.
    let follow = ["follow", "--data-dir", a];
    sigkill(&mut run_until(&follow, "delivered to bob"));
    let list = run(&sund(), &["file", "list", "--data-dir", a]);
    assert!(
        list.contains(&id) && list.contains("sent by this device"),
        "{list}"
    );
    assert!(
        list.contains("delivered to bob (dev:") && list.contains(", verified"),
        "{list}"
    );

    // The gateway is killed while a second file goes up; the sender waits, reconnects to the
    // restarted gateway and finishes.
    let second = tmp.path().join("second.bin");
    std::fs::write(&second, noise(40_000_000, 2)).unwrap();
    let second_path = second.to_str().unwrap();
    let send_second = ["file", "send", "--data-dir", a, "@bob", second_path];
    let mut sender = run_until(&send_second, "sending second.bin: 25 %");
    sigkill(&mut gateway.0);
    gateway = Guard(start_gateway(&gw_dir, port));
    let status = sender.wait().unwrap();
    assert!(
        status.success(),
        "the send finished after the gateway came back"
    );

    // The same file again, before Bob fetched it: nothing moves up.
    let again = run(&sund(), &send_second);
    assert!(
        again.contains("the gateway held all of it already, so nothing moved"),
        "{again}"
    );
    let id = next_file_id_of(b, "second.bin");
    let id_again = next_file_id_of(b, "second.bin");
    assert_eq!(id, id_again, "the same file has the same id");
    let before = chunk_files(&b_dir);
    let get_second = ["file", "get", "--data-dir", b, &id, "--out", out];
    let got = run(&sund(), &get_second);
    assert!(got.contains("saved"), "{got}");
    assert!(same_file(&second, &out_dir.join("second.bin")));
    // Getting it a second time refuses to overwrite what is there.
    let refused = fails(&sund(), &get_second);
    assert!(refused.contains("exists already"), "{refused}");

    // A bit of Bob's stored copy rots. Saving the file again finds it, drops that chunk and
    // fetches it again; the gateway let the file go once Bob had it, so the get says what to
    // do, and leaves nothing behind. Once Alice sends it again, the get moves that one chunk.
    let second_chunks: Vec<_> = chunk_files(&b_dir).difference(&before).cloned().collect();
    assert!(second_chunks.len() > 10, "{}", second_chunks.len());
    let rotten = &second_chunks[second_chunks.len() / 2];
    let mut bytes = std::fs::read(rotten).unwrap();
    bytes[1_000] ^= 0x10;
    std::fs::write(rotten, bytes).unwrap();
    std::fs::remove_file(out_dir.join("second.bin")).unwrap();
    let failed = fails(&sund(), &get_second);
    assert!(
        failed.contains("was damaged in this device's store: fetching it again"),
        "{failed}"
    );
    assert!(
        failed.contains("the gateway no longer holds this file")
            && failed.contains("ask the sender to send it again"),
        "{failed}"
    );
    assert!(!out_dir.join("second.bin").exists(), "no wrong file saved");
    let list = run(&sund(), &["file", "list", "--data-dir", b]);
    let line = list.lines().find(|l| l.contains(&id)).unwrap_or_default();
    assert!(!line.is_empty() && !line.contains("complete"), "{list}");
    run(&sund(), &send_second);
    assert_eq!(next_file_id_of(b, "second.bin"), id);
    let got = run(&sund(), &get_second);
    assert!(got.contains("saved"), "{got}");
    assert!(same_file(&second, &out_dir.join("second.bin")));

    // `follow --fetch-into` fetches what is offered and saves it, announcing each.
    let third = tmp.path().join("notes.txt");
    std::fs::write(&third, noise(300_000, 3)).unwrap();
    run(
        &sund(),
        &[
            "file",
            "send",
            "--data-dir",
            a,
            "@bob",
            third.to_str().unwrap(),
        ],
    );
    let inbox = tmp.path().join("inbox");
    std::fs::create_dir(&inbox).unwrap();
    let follow = [
        "follow",
        "--data-dir",
        b,
        "--fetch-into",
        inbox.to_str().unwrap(),
    ];
    sigkill(&mut run_until(&follow, "saved"));
    assert!(same_file(&third, &inbox.join("notes.txt")));
    let missing = fails(
        &sund(),
        &[
            "follow",
            "--data-dir",
            b,
            "--fetch-into",
            "/nonexistent/dir",
        ],
    );
    assert!(missing.contains("is not a directory"), "{missing}");
    drop(gateway);
}
