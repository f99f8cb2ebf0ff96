//! Federation links between two real gateways on loopback, as their operators set them up:
//! each reads its own domain and trust-root fingerprint from `admin federation`, pins the
//! other's in its config file, and the link comes up over QUIC, mutually authenticated. It comes
//! back after the peer is killed with SIGKILL and restarted, and an impostor at the peer's
//! address (the right domain, another root) is refused and never counts as up. A room homed at
//! one gateway and shared with the other's users carries messages both ways, through a SIGKILL
//! of the member gateway, in order and once each.

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

/// The first start of a gateway with this config: it makes its trust root and TLS identity;
/// its operator reads the root's fingerprint from `admin federation`.
fn first_start(config: &Path) -> String {
    let dir = config.parent().unwrap();
    let name = config.file_stem().unwrap().to_str().unwrap();
    let gateway = start(config, &dir.join(format!("{name}.log")));
    wait_for_socket(&dir.join(name).join("admin.sock"));
    let print = fingerprint(config);
    terminate(gateway);
    print
}

/// Sends `text` to `conv` from the device in `dir`; what `sund send` printed.
fn send(dir: &Path, conv: &str, text: &str) -> String {
    run(
        &sund(),
        &["send", "--data-dir", dir.to_str().unwrap(), conv, text],
    )
}

#[test]
fn a_room_homed_at_one_gateway_spans_two_domains_survives_a_sigkill_of_the_other_and_is_handed_over(
) {
    let tmp = tempfile::tempdir().unwrap();
    let at = |name: &str| tmp.path().join(name);
    let path = |name: &str| at(name).to_str().unwrap().to_string();
    let Federated { a, b, keys, .. } = federated(tmp.path(), "");
    wait_for_link(&at("a.toml"), "b.example", "up", Duration::from_secs(30));
    let a_config = at("a.toml");
    let a_config = a_config.to_str().unwrap();
    // a.example's operator makes the room, homed there, and shares it with bob's device.
    share_room(a_config, &keys);
    // A domain that is no peer, and a conversation that is not there, are refused in words.
    let stranger = fails(
        &gateway_binary(),
        &[
            "admin",
            "share-conversation",
            "room",
            "--peer",
            "c.example",
            "--member",
            &keys[1],
            "--config",
            a_config,
        ],
    );
    assert!(
        stranger.contains("not a federation peer") && stranger.contains("[[federation.peer]]"),
        "{stranger}"
    );

    // bob writes through his own gateway, which relays to the room's authority.
    let sent = send(&at("bob"), "room", "hello from b.example");
    assert!(sent.contains("seq 1"), "{sent}");
    let got = follow(&path("alice"), "room", 1, Duration::from_secs(30));
    assert!(
        got.iter().any(|l| l.contains("hello from b.example")),
        "{got:?}"
    );
    // Each operator sees the room's home in `admin list`.
    let b_config = at("b.toml");
    let listed = run(
        &gateway_binary(),
        &["admin", "list", "--config", b_config.to_str().unwrap()],
    );
    assert!(
        listed.contains("head 1") && listed.contains("homed at a.example"),
        "{listed}"
    );
    let listed = run(&gateway_binary(), &["admin", "list", "--config", a_config]);
    assert!(
        listed.contains("head 1") && listed.contains("shared with b.example (1 devices)"),
        "{listed}"
    );
    let sent = send(&at("alice"), "room", "hello from a.example");
    assert!(sent.contains("seq 2"), "{sent}");
    let got = follow(&path("bob"), "room", 2, Duration::from_secs(30));
    let texts: Vec<&String> = got.iter().filter(|l| l.contains("hello from")).collect();
    assert_eq!(texts.len(), 2, "{got:?}");
    assert!(
        texts[0].contains("b.example") && texts[1].contains("a.example"),
        "{got:?}"
    );

    // b.example is killed without a word; alice goes on writing. What a.example sequenced
    // meanwhile waits in its link's durable outbox and reaches bob after b.example is back.
    let mut b = b;
    b.0.kill().unwrap();
    b.0.wait().unwrap();
    drop(b);
    for n in 3..=5 {
        let sent = send(
            &at("alice"),
            "room",
            &format!("while b.example was down #{n}"),
        );
        assert!(sent.contains(&format!("seq {n}")), "{sent}");
    }
    let b = start(&at("b.toml"), &at("b.log"));
    wait_for_link(&at("b.toml"), "a.example", "up", Duration::from_secs(60));
    let got = follow(&path("bob"), "room", 3, Duration::from_secs(30));
    let texts: Vec<&String> = got
        .iter()
        .filter(|l| l.contains("while b.example"))
        .collect();
    assert_eq!(texts.len(), 3, "{got:?}");
    for (i, line) in texts.iter().enumerate() {
        assert!(line.contains(&format!("#{}", i + 3)), "in order: {got:?}");
    }
    let sent = send(&at("bob"), "room", "back again");
    assert!(sent.contains("seq 6"), "{sent}");
    // alice reads her own messages 2..=5 too, then bob's.
    let got = follow(&path("alice"), "room", 5, Duration::from_secs(30));
    assert!(
        got.len() == 5 && got[4].contains("seq 6") && got[4].contains("back again"),
        "{got:?}"
    );

    // a.example's operator hands the room over to b.example while both run: it freezes at
    // seq 6 and b.example sequences it from seq 7 on.
    let handover = |to: &str| {
        std::process::Command::new(gateway_binary())
            .args([
                "admin", "handover", "room", "--to", to, "--config", a_config,
            ])
            .output()
            .unwrap()
    };
    let refused = handover("c.example");
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("not handed over") && why.contains("c.example keeps no copy"),
        "{why}"
    );
    let started = run(
        &gateway_binary(),
        &[
            "admin",
            "handover",
            "room",
            "--to",
            "b.example",
            "--config",
            a_config,
        ],
    );
    assert!(
        started.contains("frozen at seq 6 and handed over to b.example"),
        "{started}"
    );
    let b_config = b_config.to_str().unwrap();
    let started = Instant::now();
    loop {
        let listed = run(&gateway_binary(), &["admin", "list", "--config", a_config]);
        if listed.contains("homed at b.example") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a.example still lists: {listed}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let listed = run(&gateway_binary(), &["admin", "list", "--config", b_config]);
    assert!(
        listed.contains("head 6") && listed.contains("shared with a.example (1 devices)"),
        "{listed}"
    );
    // alice writes through her gateway, now a member gateway that relays to b.example; bob
    // reads it from b.example's own log, and alice hers from a.example's copy.
    let sent = send(&at("alice"), "room", "after the handover");
    assert!(sent.contains("seq 7"), "{sent}");
    let sent = send(&at("bob"), "room", "bob after the handover");
    assert!(sent.contains("seq 8"), "{sent}");
    // (bob had not read his own "back again" yet.)
    let got = follow(&path("bob"), "room", 3, Duration::from_secs(30));
    assert!(
        got.len() == 3
            && got[0].contains("seq 6")
            && got[1].contains("seq 7")
            && got[1].contains("after the handover")
            && got[2].contains("seq 8"),
        "{got:?}"
    );
    let got = follow(&path("alice"), "room", 2, Duration::from_secs(30));
    assert!(
        got.len() == 2 && got[0].contains("seq 7") && got[1].contains("bob after the handover"),
        "{got:?}"
    );
    // The old authority's log says where the room went, and how long it was frozen.
    let a_log = std::fs::read_to_string(at("a.log")).unwrap();
    assert!(a_log.contains("handover done"), "{a_log}");

    // a.example revokes alice's device. Its new CRL travels to b.example over the link (the
    // room's authority now), which shows it in `admin federation`, logs it, and refuses to
    // share the room with that device again.
    let revoked = run(
        &gateway_binary(),
        &["admin", "revoke", &keys[0], "--config", a_config],
    );
    assert!(revoked.contains("CRL version 1"), "{revoked}");
    let started = Instant::now();
    loop {
        let status = admin_federation(&at("b.toml"));
        if status.contains("its CRL version 1 (1 revoked)") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "b.example holds no newer CRL of a.example: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let refused = fails(
        &gateway_binary(),
        &[
            "admin",
            "share-conversation",
            "room",
            "--peer",
            "a.example",
            "--member",
            &keys[0],
            "--config",
            b_config,
        ],
    );
    assert!(refused.contains("was revoked by a.example"), "{refused}");
    let b_log = std::fs::read_to_string(at("b.log")).unwrap();
    assert!(b_log.contains("took a.example's CRL"), "{b_log}");
    // The room homed here drops the revoked device from its members of a.example (a plain
    // conversation has no commit to remove it): a.example had no other, so the room is no
    // longer shared with it, and nothing is kept for the device.
    let listed = run(&gateway_binary(), &["admin", "list", "--config", b_config]);
    assert!(
        listed.contains(" members 1") && !listed.contains("shared with a.example"),
        "{listed}"
    );
    // bob's device, at b.example, holds a.example's CRL too: its gateway passes it on (at its
    // next session: the digest in `HelloOk` differs from the device's), and its MLS layer
    // refuses a commit adding the revoked device.
    let started = Instant::now();
    loop {
        let status = run(&sund(), &["status", "--data-dir", &path("bob")]);
        if status.contains("a.example (root ") && status.contains("CRL version 1, 1 revoked)") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "bob's device holds no CRL of a.example: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Neither gateway's log holds a message's text.
    let logs = a_log + &std::fs::read_to_string(at("b.log")).unwrap();
    assert!(
        !logs.contains("hello from")
            && !logs.contains("back again")
            && !logs.contains("after the handover")
    );
    terminate(b);
    terminate(a);
}

/// Two gateways as their operators link them: a.example and b.example, each pinning the
/// other's root, `a_extra` appended to a.example's config file; alice enrolled at a.example
/// and bob at b.example (their data in `dir/alice` and `dir/bob`); both gateways running (logs
/// in `dir/a.log` and `dir/b.log`) and their link up.
fn federated(dir: &Path, a_extra: &str) -> Federated {
    let at = |name: &str| dir.join(name);
    let (a_port, b_port) = (free_udp_port(), free_udp_port());
    let (a_link, b_link) = (free_udp_port(), free_udp_port());
    config_file(&at("a.toml"), &at("a"), "a.example", a_port, None);
    config_file(&at("b.toml"), &at("b"), "b.example", b_port, None);
    let (fa, fb) = (first_start(&at("a.toml")), first_start(&at("b.toml")));
    config_file(
        &at("a.toml"),
        &at("a"),
        "a.example",
        a_port,
        Some((a_link, "b.example", b_link, &fb)),
    );
    let mut text = std::fs::read_to_string(at("a.toml")).unwrap();
    text.push_str(a_extra);
    std::fs::write(at("a.toml"), text).unwrap();
    config_file(
        &at("b.toml"),
        &at("b"),
        "b.example",
        b_port,
        Some((b_link, "a.example", a_link, &fa)),
    );
    let path = |name: &str| at(name).to_str().unwrap().to_string();
    let mut keys = Vec::new();
    for (user, gw, port) in [("alice", "a", a_port), ("bob", "b", b_port)] {
        let cert = run(&gateway_binary(), &["cert", "--data-dir", &path(gw)]);
        let token = enrol(&path(gw), user);
        let init = init_device(
            &path(user),
            &format!("127.0.0.1:{port}"),
            cert.trim(),
            Some(user),
            Some(&token),
        );
        keys.push(device_key(&init));
    }
    let a = start(&at("a.toml"), &at("a.log"));
    let b = start(&at("b.toml"), &at("b.log"));
    wait_for_link(&at("a.toml"), "b.example", "up", Duration::from_secs(30));
    Federated { a, b, keys, a_port }
}

/// What [`federated`] started.
struct Federated {
    a: Guard,
    b: Guard,
    /// alice's and bob's device keys.
    keys: Vec<String>,
    /// a.example's device port.
    a_port: u16,
}

/// More users of a.example (after [`federated`]), each with a device enrolled by token, its
/// data in `dir/USER`.
fn more_users_of_a(dir: &Path, a_port: u16, users: &[&str]) {
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let cert = run(&gateway_binary(), &["cert", "--data-dir", &path("a")]);
    for user in users {
        let token = enrol(&path("a"), user);
        init_device(
            &path(user),
            &format!("127.0.0.1:{a_port}"),
            cert.trim(),
            Some(user),
            Some(&token),
        );
    }
}

/// Each device in `dir/WHO` comes online once (and uploads its KeyPackages).
fn online(dir: &Path, who: &[&str]) {
    for name in who {
        let data = dir.join(name);
        run(&sund(), &["status", "--data-dir", data.to_str().unwrap()]);
    }
}

/// alice makes `team`, homed at a.example, inviting bob of b.example; its `conv:…` id.
fn alice_makes_team_with_bob(dir: &Path) -> String {
    let alice = dir.join("alice");
    let made = run(
        &sund(),
        &[
            "room",
            "create",
            "--data-dir",
            alice.to_str().unwrap(),
            "team",
            "--invite",
            "bob@b.example",
        ],
    );
    conversation_in(&made)
}

/// a.example's operator makes `room`, homed there, with alice's device, and shares it with
/// bob's device of b.example.
fn share_room(a_config: &str, keys: &[String]) {
    run(
        &gateway_binary(),
        &[
            "admin",
            "create-conversation",
            "room",
            "--member",
            &keys[0],
            "--config",
            a_config,
        ],
    );
    let shared = run(
        &gateway_binary(),
        &[
            "admin",
            "share-conversation",
            "room",
            "--peer",
            "b.example",
            "--member",
            &keys[1],
            "--config",
            a_config,
        ],
    );
    assert!(
        shared.contains("shared with 1 member devices of b.example"),
        "{shared}"
    );
}

/// b.example relays more than a.example takes from it: a.example's limit per peer refuses the
/// excess with `peer_limited` and a time for each, bob's device holds the room and sends again
/// by itself, and every message arrives once and in the order typed; a.example's operator
/// reads one warning naming the peer and the setting.
#[test]
fn a_peer_past_its_relay_limit_is_refused_for_a_while_and_nothing_is_lost_or_reordered() {
    let tmp = tempfile::tempdir().unwrap();
    let at = |name: &str| tmp.path().join(name);
    let path = |name: &str| at(name).to_str().unwrap().to_string();
    let Federated { a, b, keys, .. } = federated(
        tmp.path(),
        "\n[limits]\npeer_relays_per_second = 2\npeer_relay_burst = 3\n",
    );
    let a_config = path("a.toml");
    share_room(&a_config, &keys);
    let lines: Vec<String> = (1..=12).map(|i| format!("relayed {i:02}")).collect();
    let mut child = std::process::Command::new(sund())
        .args(["send", "--data-dir", &path("bob"), "room", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        for line in &lines {
            writeln!(stdin, "{line}").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let acknowledged = stdout
        .lines()
        .filter(|l| l.starts_with("sent to room: seq "))
        .count();
    assert_eq!(acknowledged, lines.len(), "{stdout}\n{stderr}");
    let read = follow(&path("alice"), "room", lines.len(), Duration::from_secs(60));
    let texts: Vec<&str> = read
        .iter()
        .filter_map(|l| l.split_once(": ").map(|(_, text)| text))
        .collect();
    assert_eq!(texts, lines, "once each, in the order typed: {read:?}");
    // The operator sees which peer was held back, and by which setting.
    let status = admin_federation(&at("a.toml"));
    assert!(
        status.contains("of its relays refused by [limits] peer_relays_per_second"),
        "{status}"
    );
    terminate(a);
    terminate(b);
    let log = std::fs::read_to_string(at("a.log")).unwrap();
    let warnings = log
        .lines()
        .filter(|l| l.contains("b.example relays more than 2 per second"))
        .count();
    assert_eq!(
        warnings, 1,
        "told once, naming the peer and its limit:\n{log}"
    );
    assert!(log.contains("peer_relays_per_second"), "{log}");
}

/// Users are `name@domain` as people type them on two real gateways: bob of b.example is
/// shown as such, `alice` on his device is alice@b.example (another person than alice of
/// a.example), a DM with a user of a.example is refused in words that say what is not built,
/// b.example's operator cannot enrol a.example's users, and a token of b.example does not set
/// up a device of a.example.
#[test]
fn users_are_named_by_address_and_each_domain_enrols_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let at = |name: &str| tmp.path().join(name);
    let path = |name: &str| at(name).to_str().unwrap().to_string();
    let Federated { a, b, .. } = federated(tmp.path(), "");
    let status = run(&sund(), &["status", "--data-dir", &path("bob")]);
    assert!(status.contains("user       bob@b.example"), "{status}");
    let status = run(&sund(), &["status", "--data-dir", &path("alice")]);
    assert!(status.contains("user       alice@a.example"), "{status}");
    // Each device holds the other domain's root, vouched for by its own domain's root: the
    // one its gateway's handshake proved against the pinned fingerprint.
    let b_fingerprint = fingerprint(&at("b.toml"));
    assert!(
        status.contains(&format!("peers      b.example (root {b_fingerprint})")),
        "{status}"
    );
    let json = run(&sund(), &["status", "--json", "--data-dir", &path("bob")]);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["peers"][0]["domain"], "a.example", "{json}");

    // The same name in two domains is two users.
    let there = run(
        &sund(),
        &["contact", "--data-dir", &path("bob"), "alice@a.example"],
    );
    let here = run(&sund(), &["contact", "--data-dir", &path("bob"), "alice"]);
    let id = |said: &str| {
        said.split(" = ")
            .nth(1)
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap()
            .trim()
            .to_string()
    };
    assert!(there.starts_with("alice@a.example = user:"), "{there}");
    assert!(here.starts_with("alice@b.example = user:"), "{here}");
    assert_ne!(id(&there), id(&here));

    // A DM across the two domains, end to end encrypted: bob's gateway asks a.example's for
    // alice's KeyPackages, bob's device checks them against a.example's root (which
    // b.example's root vouched for), b.example sequences the DM and sends alice's gateway the
    // Welcome, and alice's device joins from it there.
    let dm = run(
        &sund(),
        &["dm", "--data-dir", &path("bob"), "alice@a.example"],
    );
    assert!(dm.starts_with("dm @alice@a.example (conv:"), "{dm}");
    assert!(
        !dm.contains("has no device"),
        "alice's device was added: {dm}"
    );
    let sent = send(&at("bob"), "@alice@a.example", "hello from b.example");
    assert!(sent.contains("seq"), "{sent}");
    let read = follow(&path("alice"), "@bob@b.example", 1, Duration::from_secs(60));
    assert!(
        read.iter().any(|l| l.ends_with("hello from b.example")),
        "{read:?}"
    );
    // Naming him on her device names their DM too, across domains as at home.
    let named = run(
        &sund(),
        &["contact", "--data-dir", &path("alice"), "bob@b.example"],
    );
    assert!(
        named.contains("your DM with them is @bob@b.example (conv:"),
        "{named}"
    );
    // Her answer goes through her gateway to the DM's home, and back to bob's.
    let sent = send(&at("alice"), "@bob@b.example", "hello from a.example");
    assert!(sent.contains("seq"), "{sent}");
    let read = follow(&path("bob"), "@alice@a.example", 2, Duration::from_secs(60));
    assert!(
        read.iter().any(|l| l.ends_with("hello from a.example")),
        "{read:?}"
    );
    // A new device of alice's joins the DM when she pairs it, after bob's roster went by:
    // alice's device tells the names again as it adds the phone, so the phone shows bob by
    // his address, not by a user id.
    let said = pair(&path("alice"), &path("alice-phone"));
    assert!(said.iter().any(|l| l.ends_with(": added")), "{said:#?}");
    let sent = send(&at("bob"), "@alice@a.example", "hello, new phone");
    assert!(sent.contains("seq"), "{sent}");
    let read = follow(
        &path("alice-phone"),
        "@bob@b.example",
        1,
        Duration::from_secs(60),
    );
    assert!(
        read.iter()
            .any(|l| l.contains("bob@b.example (") && l.ends_with("hello, new phone")),
        "{read:?}"
    );
    // Contacts span domains: bob asks alice, her gateway learns of it over the link and she
    // sees his request by name; she accepts, and each sees the other as a contact, and his
    // presence as his gateway tells hers (he has no session open: last seen recently).
    let asked = run(
        &sund(),
        &[
            "contacts",
            "add",
            "--data-dir",
            &path("bob"),
            "alice@a.example",
        ],
    );
    assert!(
        asked.contains("asked alice@a.example to be contacts")
            && asked.contains("accept with `sund contacts add bob@b.example`"),
        "{asked}"
    );
    let listed = contacts_until(
        &path("alice"),
        "asked you (accept with `sund contacts add NAME`, or the id shown): bob@b.example",
    );
    assert!(listed.contains("contacts: none"), "{listed}");
    let accepted = run(
        &sund(),
        &[
            "contacts",
            "add",
            "--data-dir",
            &path("alice"),
            "bob@b.example",
        ],
    );
    assert!(
        accepted.contains(
            "bob@b.example and you are contacts: you see each other's presence (`sund presence`)"
        ),
        "{accepted}"
    );
    contacts_until(&path("bob"), "contacts: alice@a.example");
    let presence = run(&sund(), &["presence", "--data-dir", &path("alice")]);
    assert!(
        presence.contains("bob@b.example: last seen recently"),
        "{presence}"
    );
    // A block crosses as a withdrawn add, nothing more: alice sees bob's add gone.
    let blocked = run(
        &sund(),
        &[
            "contacts",
            "block",
            "--data-dir",
            &path("bob"),
            "alice@a.example",
        ],
    );
    assert!(blocked.contains("blocked alice@a.example"), "{blocked}");
    let listed = contacts_until(&path("alice"), "you asked: bob@b.example");
    assert!(listed.contains("contacts: none"), "{listed}");
    let presence = run(
        &sund(),
        &["presence", "--data-dir", &path("alice"), "bob@b.example"],
    );
    assert!(presence.contains("bob@b.example: unknown ("), "{presence}");
    // Nor can she invite him: his gateway offers her none of his devices, and says why in
    // words that neither name the block nor send her looking for a typo.
    let refused = fails(
        &sund(),
        &[
            "room",
            "create",
            "--data-dir",
            &path("alice"),
            "after-the-block",
            "--invite",
            "bob@b.example",
        ],
    );
    assert!(
        refused.contains("no device of `bob@b.example` was offered by the gateway of b.example")
            && refused.contains("or they do not accept invitations from you"),
        "{refused}"
    );
    // A domain neither gateway federates with is refused by the gateway, in words.
    let refused = fails(
        &sund(),
        &[
            "contacts",
            "add",
            "--data-dir",
            &path("bob"),
            "carol@c.example",
        ],
    );
    assert!(
        refused.contains("unknown_domain")
            && refused.contains("this gateway does not federate with c.example"),
        "{refused}"
    );
    let refused = fails(
        &gateway_binary(),
        &[
            "admin",
            "enrol-token",
            "carol@a.example",
            "--config",
            &path("b.toml"),
        ],
    );
    assert!(
        refused.contains(
            "carol@a.example is a user of a.example, and this gateway enrols users of b.example"
        ),
        "{refused}"
    );
    let token = run(
        &gateway_binary(),
        &["admin", "enrol-token", "carol", "--config", &path("b.toml")],
    );
    assert!(token.trim().ends_with(":b.example"), "{token}");
    let cert = run(&gateway_binary(), &["cert", "--data-dir", &path("a")]);
    let refused = fails(
        &sund(),
        &[
            "init",
            "--data-dir",
            &path("carol"),
            "--gateway",
            "127.0.0.1:1",
            "--gateway-cert",
            cert.trim(),
            "--user",
            "carol@a.example",
            "--token",
            token.trim(),
        ],
    );
    assert!(
        refused.contains("this token is for a user of b.example, not of a.example"),
        "{refused}"
    );
    assert!(!at("carol").join("node.toml").exists(), "nothing set up");
    terminate(b);
    terminate(a);
}

/// alice and bob start their DM in the same moment, each through their own gateway. A DM's id
/// follows from its two users, so each gateway would make it: they agree instead (a.example,
/// which sorts first, makes it; b.example's device joins from the Welcome), and the two see
/// one DM, with messages both ways.
#[test]
fn a_dm_started_from_both_domains_at_once_is_one_dm() {
    use std::process::{Command, Output, Stdio};
    let tmp = tempfile::tempdir().unwrap();
    let at = |name: &str| tmp.path().join(name);
    let path = |name: &str| at(name).to_str().unwrap().to_string();
    let Federated { a, b, .. } = federated(tmp.path(), "");
    let start_dm = |who: &str, with: &str| {
        Command::new(sund())
            .args(["dm", "--data-dir", &path(who), with])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let from_alice = start_dm("alice", "bob@b.example");
    let from_bob = start_dm("bob", "alice@a.example");
    let (alice, bob) = (
        from_alice.wait_with_output().unwrap(),
        from_bob.wait_with_output().unwrap(),
    );
    let said = |out: &Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let (alice, bob) = (said(&alice), said(&bob));
    assert!(alice.starts_with("dm @bob@b.example (conv:"), "{alice}");
    assert!(bob.starts_with("dm @alice@a.example (conv:"), "{bob}");
    assert_eq!(conversation_in(&alice), conversation_in(&bob), "one DM");
    let sent = send(&at("alice"), "@bob@b.example", "first from a.example");
    assert!(sent.contains("seq"), "{sent}");
    let sent = send(&at("bob"), "@alice@a.example", "first from b.example");
    assert!(sent.contains("seq"), "{sent}");
    for (reader, dm, from) in [
        ("alice", "@bob@b.example", "first from b.example"),
        ("bob", "@alice@a.example", "first from a.example"),
    ] {
        let read = follow(&path(reader), dm, 2, Duration::from_secs(60));
        assert!(read.iter().any(|l| l.ends_with(from)), "{reader}: {read:?}");
    }
    terminate(b);
    terminate(a);
}

/// The conversation id `sund room create` printed (`room NAME (conv:…) …`).
/// `sund contacts list` on `dir` until its output holds `line` (what a peer gateway tells
/// arrives over the link a moment later); the last output.
fn contacts_until(dir: &str, line: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let listed = run(&sund(), &["contacts", "list", "--data-dir", dir]);
        if listed.lines().any(|l| l == line) {
            return listed;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no `{line}` within 30 s: {listed}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn members_of_both_domains_change_a_room_that_spans_them() {
    let tmp = tempfile::tempdir().unwrap();
    let at = |name: &str| tmp.path().join(name);
    let path = |name: &str| at(name).to_str().unwrap().to_string();
    let Federated { a, b, a_port, .. } = federated(tmp.path(), "");
    // carol, a second user of a.example.
    more_users_of_a(tmp.path(), a_port, &["carol"]);
    online(tmp.path(), &["alice", "bob", "carol"]);
    // bob makes a room at b.example with alice of a.example, and makes her an admin.
    let made = run(
        &sund(),
        &[
            "room",
            "create",
            "--data-dir",
            &path("bob"),
            "team",
            "--invite",
            "alice@a.example",
        ],
    );
    let conv = conversation_in(&made);
    for who in ["alice", "carol"] {
        run(
            &sund(),
            &["room", "name", "--data-dir", &path(who), &conv, "team"],
        );
    }
    let role = run(
        &sund(),
        &[
            "room",
            "role",
            "--data-dir",
            &path("bob"),
            "team",
            "alice@a.example",
            "admin",
        ],
    );
    assert!(role.contains("is now admin of team"), "{role}");
    // alice invites carol: her commit goes through a.example, which vouches for carol's
    // device, to the room's home at b.example, which sends the Welcome back to a.example.
    let invited = run(
        &sund(),
        &[
            "room",
            "invite",
            "--data-dir",
            &path("alice"),
            "team",
            "carol",
        ],
    );
    assert!(invited.contains("carol"), "{invited}");
    assert!(!invited.contains("has no device"), "{invited}");
    let sent = send(&at("bob"), "team", "hello team");
    assert!(sent.contains("seq"), "{sent}");
    let read = follow(&path("carol"), "team", 1, Duration::from_secs(60));
    // carol never named bob: his name comes from his leaf in the room's tree.
    assert!(
        read.iter()
            .any(|l| l.contains("bob@b.example") && l.ends_with("hello team")),
        "carol joined from the Welcome and reads bob, named: {read:?}"
    );
    let sent = send(&at("carol"), "team", "hi from carol");
    assert!(sent.contains("seq"), "{sent}");
    let read = follow(&path("bob"), "team", 2, Duration::from_secs(60));
    assert!(
        read.iter()
            .any(|l| l.contains("carol@a.example") && l.ends_with("hi from carol")),
        "bob, who never named carol, reads her name: {read:?}"
    );
    let listed = run(&sund(), &["devices", "--data-dir", &path("bob")]);
    assert!(listed.contains("  carol@a.example: "), "{listed}");
    // carol leaves: asked through a.example, proposed at b.example, committed by a member.
    let left = run(
        &sund(),
        &["room", "leave", "--data-dir", &path("carol"), "team"],
    );
    assert!(left.contains("this device left team"), "{left}");
    // bob removes alice, a member of another domain.
    let removed = run(
        &sund(),
        &[
            "room",
            "remove",
            "--data-dir",
            &path("bob"),
            "team",
            "alice@a.example",
        ],
    );
    assert!(
        !removed.contains("alice"),
        "alice is no longer listed: {removed}"
    );
    assert!(!removed.contains("carol"), "nor carol: {removed}");
    terminate(b);
    terminate(a);
}

/// An admin of another domain runs a room homed at a.example: bob of b.example, made an admin
/// by alice, invites carol of a.example through his own gateway, which relays the commit to the
/// room's home; the home charges his invitations to its `[limits]` as it does its own users',
/// so his second invitation within the hour is refused there, and his terminal says which
/// domain counts and that the change waits; carol reads bob.
#[test]
fn an_admin_of_another_domain_is_held_to_the_homes_invitation_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let at = |name: &str| tmp.path().join(name);
    let path = |name: &str| at(name).to_str().unwrap().to_string();
    let Federated { a, b, a_port, .. } = federated(
        tmp.path(),
        "\n[limits]\ninvitations_per_hour = 60\ninvitation_burst = 1\n",
    );
    more_users_of_a(tmp.path(), a_port, &["carol", "dave"]);
    online(tmp.path(), &["alice", "bob", "carol", "dave"]);
    let conv = alice_makes_team_with_bob(tmp.path());
    let role = run(
        &sund(),
        &[
            "room",
            "role",
            "--data-dir",
            &path("alice"),
            "team",
            "bob@b.example",
            "admin",
        ],
    );
    assert!(role.contains("is now admin of team"), "{role}");
    for who in ["bob", "carol"] {
        run(
            &sund(),
            &["room", "name", "--data-dir", &path(who), &conv, "team"],
        );
    }
    // bob's first invitation is within the burst.
    let invited = run(
        &sund(),
        &[
            "room",
            "invite",
            "--data-dir",
            &path("bob"),
            "team",
            "carol@a.example",
        ],
    );
    assert!(invited.contains("carol@a.example"), "{invited}");
    // The second is past the limit at a.example, which counts bob's invitations there.
    let (stdout, stderr) = fails_with_output(
        &sund(),
        &[
            "room",
            "invite",
            "--data-dir",
            &path("bob"),
            "team",
            "dave@a.example",
        ],
    );
    assert!(
        stderr.contains("the gateway is pacing this user (invitations_limited)")
            && stderr.contains(
                "too many invitations from this user into conversations homed at a.example"
            )
            && stderr.contains("the change stays queued"),
        "{stdout}\n{stderr}"
    );
    let listed = run(&sund(), &["devices", "--data-dir", &path("bob")]);
    assert!(listed.contains("  carol@a.example: "), "{listed}");
    assert!(!listed.contains("dave"), "{listed}");
    let sent = send(&at("bob"), "team", "hello from b.example");
    assert!(sent.contains("seq"), "{sent}");
    let read = follow(&path("carol"), "team", 1, Duration::from_secs(60));
    assert!(
        read.iter()
            .any(|l| l.contains("bob@b.example") && l.ends_with("hello from b.example")),
        "{read:?}"
    );
    terminate(b);
    terminate(a);
}

/// An MLS room made at a.example with bob of b.example is handed over to b.example by its
/// operator while both gateways run: the room's group state goes with it, a.example's last
/// proposal names b.example's key as the group's external sender, alice's device commits it
/// (relayed through a.example, which now relays), and messages and membership changes go on
/// at the new authority.
#[test]
fn an_mls_room_is_handed_over_to_the_other_domain_with_its_group() {
    let tmp = tempfile::tempdir().unwrap();
    let at = |name: &str| tmp.path().join(name);
    let path = |name: &str| at(name).to_str().unwrap().to_string();
    let Federated { a, b, .. } = federated(tmp.path(), "");
    online(tmp.path(), &["alice", "bob"]);
    let conv = alice_makes_team_with_bob(tmp.path());
    run(
        &sund(),
        &["room", "name", "--data-dir", &path("bob"), &conv, "team"],
    );
    let sent = send(&at("alice"), "team", "before the handover");
    assert!(sent.contains("seq"), "{sent}");
    let read = follow(&path("bob"), "team", 1, Duration::from_secs(60));
    assert!(
        read.iter().any(|l| l.ends_with("before the handover")),
        "{read:?}"
    );
    // a.example's operator hands the room over by its id. b.example told a.example its
    // MLS key once their link first came up; until then the handover is refused in words.
    let a_config = path("a.toml");
    let started = Instant::now();
    loop {
        let out = std::process::Command::new(gateway_binary())
            .args([
                "admin",
                "handover",
                &conv,
                "--to",
                "b.example",
                "--config",
                &a_config,
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            assert!(stdout.contains("handed over to b.example"), "{stdout}");
            break;
        }
        assert!(
            stderr.contains("has not told this gateway the key"),
            "{stderr}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "still refused: {stderr}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let started = Instant::now();
    loop {
        let listed = run(&gateway_binary(), &["admin", "list", "--config", &a_config]);
        if listed.contains("homed at b.example") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a.example still lists: {listed}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // alice's device (the group's first leaf) commits the proposal naming b.example's key,
    // then sends; both go through a.example to the new authority.
    let sent = send(&at("alice"), "team", "after the handover");
    assert!(sent.contains("seq"), "{sent}");
    let read = follow(&path("bob"), "team", 1, Duration::from_secs(60));
    assert!(
        read.iter().any(|l| l.ends_with("after the handover")),
        "{read:?}"
    );
    let sent = send(&at("bob"), "team", "bob at the new home");
    assert!(sent.contains("seq"), "{sent}");
    // alice reads her own two messages, then bob's.
    let read = follow(&path("alice"), "team", 3, Duration::from_secs(60));
    assert!(
        read.iter().any(|l| l.ends_with("bob at the new home")),
        "{read:?}"
    );
    // The owner's role came with the group: alice, at a.example, still removes bob.
    let removed = run(
        &sund(),
        &[
            "room",
            "remove",
            "--data-dir",
            &path("alice"),
            "team",
            "bob@b.example",
        ],
    );
    assert!(
        !removed.contains("bob"),
        "bob is no longer listed: {removed}"
    );
    let b_log = std::fs::read_to_string(at("b.log")).unwrap();
    assert!(!b_log.contains("panicked"), "{b_log}");
    terminate(b);
    terminate(a);
}

/// What cannot reach the other domain (yet) is said plainly. An invitation of a user of a
/// domain whose gateway is down says so, in the words of alice's own gateway, instead of
/// leaving her to wonder whether her gateway is reachable; the change stays queued and is
/// made once b.example is back. And files, which do not cross domains yet, say so at both
/// ends.
#[test]
fn what_does_not_reach_the_other_domain_yet_is_said_plainly() {
    let tmp = tempfile::tempdir().unwrap();
    let at = |name: &str| tmp.path().join(name);
    let path = |name: &str| at(name).to_str().unwrap().to_string();
    let Federated { a, b, a_port, .. } = federated(tmp.path(), "");
    more_users_of_a(tmp.path(), a_port, &["carol"]);
    online(tmp.path(), &["alice", "bob", "carol"]);
    terminate(b);
    wait_for_link(&at("a.toml"), "b.example", "down", Duration::from_secs(30));
    let (_, stderr) = fails_with_output(
        &sund(),
        &[
            "room",
            "create",
            "--data-dir",
            &path("alice"),
            "team",
            "--invite",
            "bob@b.example",
        ],
    );
    assert!(
        stderr.contains(
            "the change waits (peer_unreachable): the gateway of b.example is not reachable now"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("it stays queued and goes on with the next `sund` command (the gateway of b.example is not reachable now"),
        "{stderr}"
    );
    assert!(!stderr.contains("is the gateway reachable?"), "{stderr}");
    // b.example comes back; alice's device, running again, carries the queued invitation out.
    let b = start(&at("b.toml"), &at("b.log"));
    wait_for_link(&at("a.toml"), "b.example", "up", Duration::from_secs(30));
    // (`sund devices` only reads; `follow` keeps the device at work until it is stopped.)
    let out = std::process::Command::new("timeout")
        .args(["10"])
        .arg(sund())
        .args(["follow", "--data-dir", &path("alice")])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("added bob@b.example"), "{said}");
    let listed = run(&sund(), &["devices", "--data-dir", &path("alice")]);
    assert!(listed.contains("bob@b.example: dev:"), "{listed}");

    // Files do not cross domains yet, and each end says so before anything moves: a file
    // for a room whose every other member is abroad is not sent at all; with carol of
    // a.example in it, it goes to her and alice is told bob cannot fetch it; bob is told why
    // he cannot, instead of "ask the sender to send it again".
    let file = at("notes.txt");
    std::fs::write(&file, b"for the team").unwrap();
    let file = file.to_str().unwrap();
    let refused = fails(
        &sund(),
        &["file", "send", "--data-dir", &path("alice"), "team", file],
    );
    assert!(
        refused.contains(
            "every other member of `team` is of another domain (bob@b.example): nothing was sent"
        ),
        "{refused}"
    );
    run(
        &sund(),
        &[
            "room",
            "invite",
            "--data-dir",
            &path("alice"),
            "team",
            "carol",
        ],
    );
    let out = std::process::Command::new(sund())
        .args(["file", "send", "--data-dir", &path("alice"), "team", file])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("bob@b.example will see that notes.txt was sent but cannot fetch it"),
        "{stderr}"
    );
    let team = listed
        .lines()
        .find(|l| l.starts_with("room team "))
        .map(conversation_in)
        .unwrap_or_else(|| panic!("{listed}"));
    let read = follow(&path("bob"), &team, 1, Duration::from_secs(60));
    let offer = read
        .iter()
        .find(|l| l.contains("sent a file: notes.txt"))
        .unwrap_or_else(|| panic!("{read:?}"));
    let id = offer.rsplit(' ').next().unwrap().to_string();
    let out_dir = at("bob-files");
    std::fs::create_dir(&out_dir).unwrap();
    let refused = fails(
        &sund(),
        &[
            "file",
            "get",
            "--data-dir",
            &path("bob"),
            &id,
            "--out",
            out_dir.to_str().unwrap(),
        ],
    );
    assert!(
        refused.contains("notes.txt was sent by alice@a.example, of another domain, and files do not cross domains yet"),
        "{refused}"
    );
    // Its operator drops b.example from a.example's config while `team` spans it: the gateway
    // starts, and says at once (and in `admin list`) what that cuts off.
    terminate(a);
    config_file(&at("a.toml"), &at("a"), "a.example", a_port, None);
    let a = start(&at("a.toml"), &at("a2.log"));
    let warned = |log: &str| {
        log.contains("conversations here span a domain this gateway does not federate with")
            && log.contains("domain=b.example")
    };
    let started = Instant::now();
    let mut log = String::new();
    while !warned(&log) && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
        log = std::fs::read_to_string(at("a2.log")).unwrap_or_default();
    }
    assert!(warned(&log), "{log}");
    // (Asked again while the starting gateway's control socket is not up yet.)
    let started = Instant::now();
    let listed = loop {
        let out = std::process::Command::new(gateway_binary())
            .args(["admin", "list", "--config", &path("a.toml")])
            .output()
            .unwrap();
        if out.status.success() || started.elapsed() > Duration::from_secs(10) {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        listed.contains("shared with b.example (1 devices) [not a peer in this gateway's config: nothing reaches it]"),
        "{listed}"
    );
    terminate(b);
    terminate(a);
}
