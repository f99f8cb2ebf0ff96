//! What the end-to-end tests of the real binaries share: the binaries, running them, a gateway
//! process, device set-up.

#![allow(dead_code)] // each test file uses a part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub fn sund() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sund"))
}

/// `sund-gateway` sits beside `sund` in the target directory. `cargo test` builds only the
/// binaries of the package under test, so build the workspace's binaries (same features as this
/// build, so the artifacts are shared and only the link is new) if it is not there yet.
pub fn gateway_binary() -> PathBuf {
    let path = sund().with_file_name(format!("sund-gateway{}", std::env::consts::EXE_SUFFIX));
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--workspace", "--bins"])
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building sund-gateway failed");
    }
    path
}

pub fn run(bin: &Path, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).output().expect("binary runs");
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// A loopback UDP port free now, for a gateway to listen on. Chosen below the kernel's
/// ephemeral range (32768 and up on Linux), which is where every client socket's port comes
/// from (each `sund` command binds one): a port from that range could be taken by a client
/// between the test choosing it and its gateway binding it, or while a killed gateway is down
/// before its restart. Each process starts at its own offset and never hands a port out twice.
pub fn free_udp_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(LOW + (start + n) % SPAN).expect("below 32000");
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free UDP port between {LOW} and {}", LOW + SPAN);
}

/// Starts the gateway with debug logging appended to `DATA/../gateway.log`.
pub fn start_gateway(data: &Path, port: u16) -> Child {
    start_gateway_with(data, port, &[])
}

pub fn start_gateway_with(data: &Path, port: u16, extra: &[&str]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data.with_file_name("gateway.log"))
        .unwrap();
    Command::new(gateway_binary())
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .args(extra)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("sund-gateway starts")
}

/// `sund init` of a device in `dir` for the gateway at `addr` (certificate file `cert`), with a
/// user and an enrolment token if given; what it printed.
pub fn init_device(
    dir: &str,
    addr: &str,
    cert: &str,
    user: Option<&str>,
    token: Option<&str>,
) -> String {
    let mut args = vec![
        "init",
        "--data-dir",
        dir,
        "--gateway",
        addr,
        "--gateway-cert",
        cert,
    ];
    if let Some(user) = user {
        args.extend(["--user", user]);
    }
    if let Some(token) = token {
        args.extend(["--token", token]);
    }
    run(&sund(), &args)
}

/// A one-time enrolment token for a device of `user` (from the running gateway, or the stopped
/// gateway's database).
pub fn enrol(gateway_dir: &str, user: &str) -> String {
    run(
        &gateway_binary(),
        &["admin", "enrol-token", user, "--data-dir", gateway_dir],
    )
    .trim()
    .to_string()
}

pub fn device_key(init_output: &str) -> String {
    init_output
        .lines()
        .find_map(|l| l.strip_prefix("device key: "))
        .expect("sund init prints the device key")
        .to_string()
}

/// Kills the child on drop so a failing test leaves no process behind.
pub struct Guard(pub Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `sund follow --count COUNT --conversation CONV` for the device in `dir` until it exits
/// (or `within` passes, then it is killed); every line it printed to stdout.
pub fn follow(dir: &str, conv: &str, count: usize, within: std::time::Duration) -> Vec<String> {
    use std::io::Read;
    let mut child = Guard(
        Command::new(sund())
            .args([
                "follow",
                "--data-dir",
                dir,
                "--count",
                &count.to_string(),
                "--conversation",
                conv,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("sund follow starts"),
    );
    let deadline = std::time::Instant::now() + within;
    while child.0.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.0.kill();
    let mut out = String::new();
    child
        .0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    out.lines().map(str::to_string).collect()
}

/// Runs a binary that must fail; its stdout and its stderr.
pub fn fails_with_output(bin: &Path, args: &[&str]) -> (String, String) {
    let out = Command::new(bin).args(args).output().expect("binary runs");
    assert!(
        !out.status.success(),
        "{} {args:?} should have failed: {}",
        bin.display(),
        String::from_utf8_lossy(&out.stdout)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a binary that must fail; its stderr.
pub fn fails(bin: &Path, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).output().expect("binary runs");
    assert!(
        !out.status.success(),
        "{} {args:?} should have failed: {}",
        bin.display(),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Devices `a` and `b` (users `a` and `b`), enrolled with tokens at the gateway in `gw`, and
/// a conversation `room` of the two.
pub fn two_devices_in_a_room(gw: &str, addr: &str, cert: &str, a: &str, b: &str) {
    let key_a = device_key(&init_device(
        a,
        addr,
        cert,
        Some("a"),
        Some(&enrol(gw, "a")),
    ));
    let key_b = device_key(&init_device(
        b,
        addr,
        cert,
        Some("b"),
        Some(&enrol(gw, "b")),
    ));
    let room = [
        "admin",
        "create-conversation",
        "room",
        "--member",
        &key_a,
        "--member",
        &key_b,
    ];
    let mut args = room.to_vec();
    args.extend(["--data-dir", gw]);
    run(&gateway_binary(), &args);
}

/// A loopback TCP address nobody listens on now (for `--metrics`, `--admin-web`).
pub fn free_tcp_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// A gateway data directory (not started) and devices `a` and `b` enrolled in its plain
/// conversation `room`, all in a temporary directory.
pub struct RoomOfTwo {
    pub tmp: tempfile::TempDir,
    pub gw_dir: PathBuf,
    pub port: u16,
    pub a: String,
    pub b: String,
}

impl RoomOfTwo {
    pub fn new() -> RoomOfTwo {
        let tmp = tempfile::tempdir().unwrap();
        let gw_dir = tmp.path().join("gateway");
        let gw = gw_dir.to_str().unwrap();
        let port = free_udp_port();
        let cert = run(&gateway_binary(), &["cert", "--data-dir", gw]);
        let addr = format!("127.0.0.1:{port}");
        let a = tmp.path().join("a").to_str().unwrap().to_string();
        let b = tmp.path().join("b").to_str().unwrap().to_string();
        two_devices_in_a_room(gw, &addr, cert.trim(), &a, &b);
        RoomOfTwo {
            tmp,
            gw_dir,
            port,
            a,
            b,
        }
    }

    /// The gateway's data directory as an argument.
    pub fn gw(&self) -> &str {
        self.gw_dir.to_str().unwrap()
    }
}

/// A terminal (a tmux session on a server of its own) that a test types into and reads.
pub struct Tmux {
    socket: String,
}

impl Tmux {
    pub fn start(command: &str) -> Tmux {
        let socket = format!("sund-test-{}-{}", std::process::id(), rand_suffix());
        let tmux = Tmux { socket };
        let status = Command::new("tmux")
            .args([
                "-L",
                &tmux.socket,
                "new-session",
                "-d",
                "-s",
                "t",
                "-x",
                "100",
                "-y",
                "30",
            ])
            .arg(command)
            .status()
            .expect("tmux runs (CI installs it: apt-get install tmux)");
        assert!(status.success());
        tmux
    }

    pub fn tmux(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .unwrap()
    }

    pub fn screen(&self) -> String {
        String::from_utf8_lossy(&self.tmux(&["capture-pane", "-p", "-t", "t"]).stdout).into_owned()
    }

    pub fn type_text(&self, text: &str) {
        assert!(self
            .tmux(&["send-keys", "-t", "t", "-l", text])
            .status
            .success());
    }

    pub fn key(&self, key: &str) {
        assert!(self.tmux(&["send-keys", "-t", "t", key]).status.success());
    }

    /// The screen once `done` holds for it, or a panic showing it.
    pub fn wait_for(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let screen = self.screen();
            if done(&screen) {
                return screen;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "waiting for {what}; the screen:\n{screen}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-server"]);
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Pairs a new device with `dir`'s user: `pair show` on `dir`, `pair accept` on `new`; what
/// `pair show` said.
pub fn pair(dir: &str, new: &str) -> Vec<String> {
    let show = std::process::Command::new(sund())
        .args(["pair", "show", "--data-dir", dir, "--wait", "60"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut show = Guard(show);
    let stdout = show.0.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let code = loop {
        let line = lines
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("a pairing code");
        if line.starts_with("SUND-PAIR:") {
            break line;
        }
    };
    run(&sund(), &["pair", "accept", "--data-dir", new, &code]);
    let mut said = Vec::new();
    while let Ok(line) = lines.recv_timeout(std::time::Duration::from_secs(90)) {
        said.push(line);
    }
    assert!(show.0.wait().unwrap().success(), "{said:#?}");
    said
}

/// The `conv:…` id a command printed in parentheses (`room create`, `devices`).
pub fn conversation_in(out: &str) -> String {
    let start = out.find("(conv:").expect("the room's id is printed") + 1;
    let end = start + out[start..].find(')').unwrap();
    out[start..end].to_string()
}
