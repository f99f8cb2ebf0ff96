//! Federation links between two real gateways on loopback, as their operators set them up:
//! each reads its own domain and trust-root fingerprint from `admin federation`, pins the
//! other's in its config file, and the link comes up over QUIC, mutually authenticated. It comes
//! back after the peer is killed with SIGKILL and restarted, and an impostor at the peer's
//! address (the right domain, another root) is refused and never counts as up.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

fn admin_federation(config: &Path) -> String {
    run(
        &gateway_binary(),
        &["admin", "federation", "--config", config.to_str().unwrap()],
    )
}

/// The fingerprint `admin federation` prints for this gateway.
fn fingerprint(config: &Path) -> String {
    let out = admin_federation(config);
    out.lines()
        .find_map(|l| l.split("trust root ").nth(1))
        .unwrap_or_else(|| panic!("no fingerprint in {out}"))
        .trim()
        .to_string()
}

/// Waits until `admin federation` shows the link to `peer` in `state`.
fn wait_for_link(config: &Path, peer: &str, state: &str, within: Duration) -> String {
    let started = Instant::now();
    loop {
        // A gateway restarting may not answer yet (its socket gone or stale): ask again.
        let asked = std::process::Command::new(gateway_binary())
            .args(["admin", "federation", "--config", config.to_str().unwrap()])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&asked.stdout).into_owned();
        if asked.status.success()
            && out.lines().any(|l| {
                l.starts_with(&format!("peer {peer} ")) && l.contains(&format!("  {state}"))
            })
        {
            return out;
        }
        if started.elapsed() >= within {
            let dir = config.parent().unwrap();
            let logs: String = ["a.log", "b.log", "c.log"]
                .iter()
                .map(|l| {
                    format!(
                        "--- {l}\n{}",
                        std::fs::read_to_string(dir.join(l)).unwrap_or_default()
                    )
                })
                .collect();
            panic!("the link to {peer} is not {state} after {within:?}:\n{out}\n{logs}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn config_file(
    path: &Path,
    dir: &Path,
    domain: &str,
    port: u16,
    federation: Option<(u16, &str, u16, &str)>,
) {
    let mut text = format!(
        "domain = {domain:?}\ndata_dir = {:?}\nlisten = \"127.0.0.1:{port}\"\n",
        dir.to_str().unwrap()
    );
    if let Some((listen, peer, peer_port, fingerprint)) = federation {
        text.push_str(&format!(
            "\n[federation]\nlisten = \"127.0.0.1:{listen}\"\n\n[[federation.peer]]\ndomain = {peer:?}\naddress = \"127.0.0.1:{peer_port}\"\nroot_fingerprint = {fingerprint:?}\n"
        ));
    }
    std::fs::write(path, text).unwrap();
}

fn start(config: &Path, log: &Path) -> Guard {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Guard(
        std::process::Command::new(gateway_binary())
            .args(["run", "--config", config.to_str().unwrap()])
            .env(
                "RUST_LOG",
                "info,sund_gateway::federation=debug,sund_gateway::driver=debug",
            )
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

fn terminate(mut gateway: Guard) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &gateway.0.id().to_string()])
        .status();
    let _ = gateway.0.wait();
}

#[test]
fn two_gateways_link_authenticated_come_back_after_sigkill_and_refuse_an_impostor() {
    let tmp = tempfile::tempdir().unwrap();
    let at = |name: &str| tmp.path().join(name);
    let (a_port, b_port, c_port) = (free_udp_port(), free_udp_port(), free_udp_port());
    let (a_link, b_link) = (free_udp_port(), free_udp_port());
    // First start: each gateway makes its trust root; its operator reads the fingerprint.
    config_file(&at("a.toml"), &at("a"), "a.example", a_port, None);
    config_file(&at("b.toml"), &at("b"), "b.example", b_port, None);
    config_file(&at("c.toml"), &at("c"), "b.example", c_port, None);
    // Before its first start a gateway has no root to show, and says how to get one.
    let before = admin_federation_stderr(&at("a.toml"));
    assert!(before.contains("run it once"), "{before}");
    let (mut fa, mut fb, mut fc) = (String::new(), String::new(), String::new());
    for (config, print) in [
        ("a.toml", &mut fa),
        ("b.toml", &mut fb),
        ("c.toml", &mut fc),
    ] {
        let log = at(&config.replace(".toml", ".log"));
        let gateway = start(&at(config), &log);
        // Asked once its control socket is there: an admin command that finds none opens the
        // database itself, which a gateway still starting may hold or not yet have made.
        let dir = at(&config.replace(".toml", ""));
        wait_for_socket(&dir.join("admin.sock"));
        let out = admin_federation(&at(config));
        let stderr = admin_federation_stderr(&at(config));
        assert!(stderr.contains("federates with no one"), "{stderr}");
        *print = out
            .lines()
            .find_map(|l| l.split("trust root ").nth(1))
            .unwrap()
            .trim()
            .to_string();
        terminate(gateway);
    }
    assert_eq!(fa, fingerprint(&at("a.toml")), "offline, the same root");
    assert_ne!(fb, fc, "the impostor has a root of its own");

    // Each pins the other.
    config_file(
        &at("a.toml"),
        &at("a"),
        "a.example",
        a_port,
        Some((a_link, "b.example", b_link, &fb)),
    );
    config_file(
        &at("b.toml"),
        &at("b"),
        "b.example",
        b_port,
        Some((b_link, "a.example", a_link, &fa)),
    );
    let metrics = free_tcp_addr();
    let mut text = std::fs::read_to_string(at("a.toml")).unwrap();
    text = text.replacen(
        "\n[federation]",
        &format!("metrics = {metrics:?}\n\n[federation]"),
        1,
    );
    std::fs::write(at("a.toml"), text).unwrap();
    let a = start(&at("a.toml"), &at("a.log"));
    let b = start(&at("b.toml"), &at("b.log"));
    wait_for_socket(&at("a").join("admin.sock"));
    wait_for_socket(&at("b").join("admin.sock"));
    let up = wait_for_link(&at("a.toml"), "b.example", "up", Duration::from_secs(30));
    assert!(
        up.contains("(this gateway dials)"),
        "a.example sorts first: {up}"
    );
    let up_b = wait_for_link(&at("b.toml"), "a.example", "up", Duration::from_secs(30));
    assert!(up_b.contains("(the peer dials)"), "{up_b}");
    // A scraper sees the link per peer.
    let figures = scrape(&metrics);
    for expected in [
        "sund_gateway_federation_link_up{peer=\"b.example\"} 1",
        "sund_gateway_federation_queued{peer=\"b.example\"} 0",
        "sund_gateway_federation_links_up_total 1",
        "sund_gateway_federation_handshakes_refused_total 0",
    ] {
        assert!(
            figures.lines().any(|l| l == expected),
            "no {expected} in:\n{figures}"
        );
    }

    // B is killed without a word and comes back on the same ports: the link is up again.
    let mut b = b;
    b.0.kill().unwrap();
    b.0.wait().unwrap();
    drop(b);
    // Its control socket is left behind: the admin commands below find it dead and open the
    // database themselves while the new gateway starts, which waits for them (it failed to
    // start here before it did).
    let b = start(&at("b.toml"), &at("b.log"));
    wait_for_link(&at("b.toml"), "a.example", "up", Duration::from_secs(60));
    wait_for_link(&at("a.toml"), "b.example", "up", Duration::from_secs(30));

    // An impostor answers at B's federation address: the right domain, another root.
    terminate(b);
    config_file(
        &at("c.toml"),
        &at("c"),
        "b.example",
        c_port,
        Some((b_link, "a.example", a_link, &fa)),
    );
    let c = start(&at("c.toml"), &at("c.log"));
    wait_for_socket(&at("c").join("admin.sock"));
    let started = Instant::now();
    let a_log = loop {
        let log = std::fs::read_to_string(at("a.log")).unwrap();
        if log.contains("federation connection refused") && log.contains(&fc) {
            break log;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "a.example never refused the impostor:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(a_log.contains(&fb), "the refusal names the pinned root too");
    let figures = scrape(&metrics);
    assert!(
        figures.lines().any(
            |l| l.starts_with("sund_gateway_federation_handshakes_refused_total ")
                && !l.ends_with(" 0")
        ),
        "{figures}"
    );
    let status = admin_federation(&at("a.toml"));
    assert!(
        !status
            .lines()
            .any(|l| l.starts_with("peer b.example") && l.contains("  up")),
        "{status}"
    );
    terminate(c);
    terminate(a);
}

/// The metrics endpoint's exposition.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
        .split_once("\r\n\r\n")
        .expect("an HTTP answer")
        .1
        .to_string()
}

fn wait_for_socket(path: &Path) {
    let started = Instant::now();
    while !path.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn admin_federation_stderr(config: &Path) -> String {
    let out = std::process::Command::new(gateway_binary())
        .args(["admin", "federation", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}
