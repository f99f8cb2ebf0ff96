//! Contacts, presence and blocking as a user types them, against a real gateway on loopback:
//! a request and its acceptance, presence online then only "recently" after the device went
//! away without saying so (its lease lapsed) and at once after a `follow` stopped by SIGTERM,
//! invisible mode, a block that stops a DM and hides
//! the blocked user's messages in `follow` and `chat`, presence in `chat`, and safety numbers.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

/// Runs `sund ARGS` until its output contains `want` (the gateway's view changes on its own
/// time), returning that output.
fn until(args: &[&str], want: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let out = Command::new(sund()).args(args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if out.status.success() && text.contains(want) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "`sund {}` never said `{want}`; last: {text}",
            args.join(" ")
        );
        // Each `sund presence` sends a watchlist, which the gateway limits (bursts of 20).
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// A gateway on loopback with open enrolment and a device for each user; every device but
/// the first has registered (and left KeyPackages).
struct World {
    // Dropped in this order: the gateway stops before its directory goes.
    _gateway: Guard,
    _tmp: tempfile::TempDir,
    dirs: Vec<String>,
}

impl World {
    fn new(users: &[&str]) -> World {
        let tmp = tempfile::tempdir().unwrap();
        let gw_dir = tmp.path().join("gateway");
        let port = free_udp_port();
        let cert = run(
            &gateway_binary(),
            &["cert", "--data-dir", gw_dir.to_str().unwrap()],
        );
        let addr = format!("127.0.0.1:{port}");
        let dirs: Vec<String> = users
            .iter()
            .map(|user| tmp.path().join(user).to_str().unwrap().to_string())
            .collect();
        for (dir, user) in dirs.iter().zip(users) {
            init_device(dir, &addr, cert.trim(), Some(user), None);
        }
        let gateway = Guard(start_gateway_with(&gw_dir, port, &["--open-enrolment"]));
        for dir in &dirs[1..] {
            let status = run(&sund(), &["status", "--data-dir", dir]);
            assert!(status.contains("connection connected"), "{status}");
        }
        World {
            _tmp: tmp,
            _gateway: gateway,
            dirs,
        }
    }
}

/// A device kept online by a running `sund follow`.
fn online(dir: &str) -> Guard {
    let guard = Guard(
        Command::new(sund())
            .args(["follow", "--data-dir", dir])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(1500));
    guard
}

#[test]
fn contacts_see_each_other_online_then_recently_invisible_hides_and_a_block_stops_a_dm() {
    let world = World::new(&["alice", "bob", "carol"]);
    let [alice, bob, carol] = [0, 1, 2].map(|i| world.dirs[i].clone());

    // A request, seen by bob, accepted by bob.
    let out = run(&sund(), &["contacts", "add", "--data-dir", &alice, "bob"]);
    assert!(out.contains("asked bob to be contacts"), "{out}");
    // Bob's device does not know alice's name yet (names travel only as hashes): it shows her
    // id, which bob may accept by.
    let out = run(&sund(), &["contacts", "list", "--data-dir", &bob]);
    let id = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("asked you (accept with `sund contacts add NAME`, or the id shown): ")
        })
        .unwrap_or_else(|| panic!("a request listed: {out}"))
        .to_string();
    assert!(id.starts_with("user:") && id.len() == 37, "{out}");
    let out = run(&sund(), &["contacts", "add", "--data-dir", &bob, &id]);
    assert!(out.contains("and you are contacts"), "{out}");
    run(&sund(), &["contact", "--data-dir", &bob, "alice"]);
    let out = run(&sund(), &["contacts", "list", "--data-dir", &alice]);
    assert!(out.contains("contacts: bob"), "{out}");

    // Bob online, then gone without a word: only a coarse "recently", never a time.
    let mut bob_running = online(&bob);
    let out = until(
        &["presence", "--data-dir", &alice],
        "bob: online",
        Duration::from_secs(20),
    );
    assert!(out.contains("bob: online"), "{out}");
    let _ = bob_running.0.kill();
    let out = until(
        &["presence", "--data-dir", &alice, "bob"],
        "bob: last seen recently",
        Duration::from_secs(60),
    );
    assert!(out.contains("bob: last seen recently"), "{out}");

    // A `follow` stopped by a supervisor (SIGTERM, as `kill` or `systemctl stop` sends) says
    // goodbye like Ctrl-C: it exits cleanly, and alice sees bob go long before his session's
    // 15 s lease would lapse.
    let mut bob_running = online(&bob);
    until(
        &["presence", "--data-dir", &alice, "bob"],
        "bob: online",
        Duration::from_secs(20),
    );
    let stopped = Command::new("kill")
        .args(["-TERM", &bob_running.0.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let status = bob_running.0.wait().unwrap();
    assert!(status.success(), "follow after SIGTERM: {status}");
    let out = until(
        &["presence", "--data-dir", &alice, "bob"],
        "bob: last seen recently",
        Duration::from_secs(8),
    );
    assert!(out.contains("bob: last seen recently"), "{out}");

    // Invisible: bob works on, but appears offline to alice.
    let out = run(&sund(), &["presence", "--data-dir", &bob, "--invisible"]);
    assert!(out.contains("you appear offline to everyone"), "{out}");
    let bob_running = online(&bob);
    let out = run(&sund(), &["presence", "--data-dir", &alice, "bob"]);
    assert!(out.contains("bob: unknown"), "{out}");
    drop(bob_running);
    let out = run(&sund(), &["presence", "--data-dir", &bob, "--visible"]);
    assert!(out.contains("your contacts see you online again"), "{out}");

    // A stranger's presence is unknown, whatever it is.
    let out = run(&sund(), &["presence", "--data-dir", &alice, "carol"]);
    assert!(out.contains("carol: unknown"), "{out}");

    // A room bob shares with alice and carol, made before carol blocks alice.
    let out = run(
        &sund(),
        &[
            "room",
            "create",
            "--data-dir",
            &bob,
            "team",
            "--invite",
            "alice",
            "--invite",
            "carol",
        ],
    );
    let room = out
        .split_whitespace()
        .find(|w| w.starts_with("(conv:") || w.starts_with("conv:"))
        .map(|w| w.trim_matches(|c| c == '(' || c == ')' || c == ','))
        .unwrap_or_else(|| panic!("a room id: {out}"))
        .to_string();

    // Carol blocks alice: alice cannot start a DM with her; bob still can.
    let out = run(
        &sund(),
        &["contacts", "block", "--data-dir", &carol, "alice"],
    );
    assert!(out.contains("blocked alice"), "{out}");
    let err = fails(&sund(), &["dm", "--data-dir", &alice, "carol"]);
    assert!(
        err.contains("or they do not accept invitations from you"),
        "{err}"
    );
    let out = run(&sund(), &["dm", "--data-dir", &bob, "carol"]);
    assert!(out.starts_with("dm @carol (conv:"), "{out}");
    let out = run(&sund(), &["contacts", "list", "--data-dir", &carol]);
    assert!(out.contains("blocked: alice"), "{out}");

    // In the room they still share, carol's device hides what alice writes.
    let out = run(
        &sund(),
        &["send", "--data-dir", &alice, &room, "from alice"],
    );
    assert!(out.contains("sent to"), "{out}");
    let out = run(&sund(), &["send", "--data-dir", &bob, "team", "from bob"]);
    assert!(out.contains("sent to"), "{out}");
    let got = follow(&carol, &room, 1, Duration::from_secs(30));
    assert!(got.iter().any(|l| l.ends_with(": from bob")), "{got:#?}");
    assert!(!got.iter().any(|l| l.contains("from alice")), "{got:#?}");
    let got = follow(&bob, "team", 2, Duration::from_secs(30));
    assert!(
        got.iter().any(|l| l.ends_with(": from alice")),
        "bob sees it: {got:#?}"
    );

    // So does carol's `sund chat`, saying once that it hid something.
    run(
        &sund(),
        &["send", "--data-dir", &alice, &room, "alice again"],
    );
    run(&sund(), &["send", "--data-dir", &bob, "team", "bob again"]);
    let chat = Tmux::start(&format!(
        "'{}' chat --data-dir '{}'; sleep 30",
        sund().display(),
        carol
    ));
    chat.wait_for("the notice", |s| {
        s.contains("a message from a user you blocked is hidden")
    });
    // Carol is in a DM with bob and in the room: Tab moves between them until the room shows.
    let screen = chat.wait_for("bob's message in the room", |s| {
        let found = s.contains("bob again");
        if !found {
            chat.key("Tab");
        }
        found
    });
    assert!(!screen.contains("alice again"), "{screen}");
    chat.key("Escape");
    drop(chat);

    // Bob's chat watches his contacts: alice shows as online.
    let alice_running = online(&alice);
    let chat = Tmux::start(&format!(
        "'{}' chat --data-dir '{}'; sleep 30",
        sund().display(),
        bob
    ));
    chat.wait_for("alice's presence", |s| s.contains("alice is online"));
    chat.key("Escape");
    drop(chat);
    drop(alice_running);

    // Bad input is named.
    let err = fails(&sund(), &["contacts", "add", "--data-dir", &alice, "alice"]);
    assert!(err.contains("this device's own user"), "{err}");
    let err = fails(
        &sund(),
        &["contacts", "add", "--data-dir", &alice, "two words"],
    );
    assert!(err.contains("is not a user name"), "{err}");
}

/// Signal-style safety numbers: both sides of a DM see the same 60 digits; typing the other
/// side's number in marks the user verified (and `contacts list` says so); a wrong number is
/// refused and marks nothing.
#[test]
fn both_sides_of_a_dm_see_the_same_safety_number_and_a_match_marks_the_contact_verified() {
    let world = World::new(&["alice", "bob"]);
    let [alice, bob] = [0, 1].map(|i| world.dirs[i].clone());

    let err = fails(
        &sund(),
        &["contacts", "verify", "--data-dir", &alice, "bob"],
    );
    assert!(err.contains("not in a DM with bob yet"), "{err}");
    let dm = run(&sund(), &["dm", "--data-dir", &alice, "bob"]);
    assert!(dm.starts_with("dm @bob (conv:"), "{dm}");
    for d in [&alice, &bob] {
        run(
            &sund(),
            &[
                "contacts",
                "add",
                "--data-dir",
                d,
                if d == &alice { "bob" } else { "alice" },
            ],
        );
    }

    let number = |out: &str| -> String {
        let lines: Vec<&str> = out
            .lines()
            .skip_while(|l| !l.starts_with("safety number with"))
            .skip(1)
            .take(3)
            .map(str::trim)
            .collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines.iter().all(|l| l.len() == 23), "{out}");
        lines.join(" ")
    };
    let at_alice = run(
        &sund(),
        &["contacts", "verify", "--data-dir", &alice, "bob"],
    );
    assert!(
        at_alice.contains("your 1 device and their 1 device in your DM")
            && at_alice.contains("bob: not verified")
            && at_alice.contains("sund contacts verify bob --matches"),
        "{at_alice}"
    );
    let at_bob = run(
        &sund(),
        &["contacts", "verify", "--data-dir", &bob, "alice"],
    );
    assert_eq!(number(&at_alice), number(&at_bob), "{at_alice}\n{at_bob}");

    // A number that differs (one digit) is refused and marks nothing.
    let shown = number(&at_bob);
    let last = shown.chars().last().unwrap();
    let wrong = format!(
        "{}{}",
        &shown[..shown.len() - 1],
        if last == '0' { '1' } else { '0' }
    );
    let err = fails(
        &sund(),
        &[
            "contacts",
            "verify",
            "--data-dir",
            &alice,
            "bob",
            "--compare",
            &wrong,
        ],
    );
    assert!(err.contains("the numbers differ"), "{err}");
    let list = run(&sund(), &["contacts", "list", "--data-dir", &alice]);
    assert!(list.contains("contacts: bob\n"), "{list}");

    // Bob's number typed in on alice's device marks bob verified.
    let out = run(
        &sund(),
        &[
            "contacts",
            "verify",
            "--data-dir",
            &alice,
            "bob",
            "--compare",
            &shown,
        ],
    );
    assert!(out.contains("bob is verified"), "{out}");
    let list = run(&sund(), &["contacts", "list", "--data-dir", &alice]);
    assert!(list.contains("contacts: bob (verified)"), "{list}");
    let json = run(
        &sund(),
        &["contacts", "list", "--data-dir", &alice, "--json"],
    );
    assert!(
        json.contains(r#""verification":{"bob":"verified"}"#),
        "{json}"
    );
    let out = run(
        &sund(),
        &[
            "contacts",
            "verify",
            "--data-dir",
            &alice,
            "bob",
            "--forget",
        ],
    );
    assert!(out.contains("not marked verified any more"), "{out}");
    let list = run(&sund(), &["contacts", "list", "--data-dir", &alice]);
    assert!(list.contains("contacts: bob\n"), "{list}");
    let err = fails(
        &sund(),
        &[
            "contacts",
            "verify",
            "--data-dir",
            &alice,
            "bob",
            "--compare",
            "12345",
        ],
    );
    assert!(err.contains("is not a safety number"), "{err}");
}

#[test]
fn a_users_devices_share_names_and_verification_marks_end_to_end() {
    let world = World::new(&["alice", "bob", "carol"]);
    let [alice, bob, carol] = [0, 1, 2].map(|i| world.dirs[i].clone());
    run(&sund(), &["dm", "--data-dir", &alice, "bob"]);
    run(&sund(), &["contacts", "add", "--data-dir", &alice, "bob"]);
    run(&sund(), &["contacts", "add", "--data-dir", &bob, "alice"]);
    run(&sund(), &["contacts", "add", "--data-dir", &carol, "alice"]);
    let out = run(
        &sund(),
        &[
            "contacts",
            "verify",
            "--data-dir",
            &alice,
            "bob",
            "--matches",
        ],
    );
    assert!(out.contains("bob is verified"), "{out}");
    assert!(!out.contains("not shared"), "{out}");

    // A new device of alice gets the book from the device that brought it in.
    let phone = format!("{alice}-phone");
    let said = pair(&alice, &phone);
    assert!(
        said.iter()
            .any(|l| l.contains("the contact book (1 name(s), 1 verified user(s)) is on its way")),
        "{said:#?}"
    );
    // Named and verified there too (carol, who asked alice, is known to neither by name).
    let out = until(
        &["contacts", "list", "--data-dir", &phone],
        "contacts: bob (verified)",
        Duration::from_secs(30),
    );
    assert!(
        out.contains("asked you (accept with `sund contacts add NAME`, or the id shown): user:"),
        "{out}"
    );

    // What the phone learns and undoes, the laptop learns: carol's name, bob unverified.
    run(&sund(), &["contacts", "add", "--data-dir", &phone, "carol"]);
    let out = run(
        &sund(),
        &[
            "contacts",
            "verify",
            "--data-dir",
            &phone,
            "bob",
            "--forget",
        ],
    );
    assert!(out.contains("not marked verified any more"), "{out}");
    let out = until(
        &["contacts", "list", "--data-dir", &alice],
        // (Listed in the order of user ids.)
        "contacts: carol, bob\n",
        Duration::from_secs(30),
    );
    assert!(!out.contains("verified"), "{out}");

    // The group is listed for what it is, and takes no messages typed by hand.
    let listing = run(&sund(), &["devices", "--data-dir", &alice, "--json"]);
    let groups: serde_json::Value = serde_json::from_str(&listing).unwrap();
    let own = groups
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["kind"] == "own")
        .unwrap_or_else(|| panic!("the group of alice's devices is listed: {listing}"));
    assert_eq!(own["members"].as_array().unwrap().len(), 2, "{listing}");
    let id = own["conversation_id"].as_str().unwrap().to_string();
    let err = fails(&sund(), &["send", "--data-dir", &alice, &id, "hello me"]);
    assert!(err.contains("the group of your own devices"), "{err}");

    // The gateway held none of it in plaintext: no name in its database.
    let gateway_db = std::path::Path::new(&alice)
        .parent()
        .unwrap()
        .join("gateway");
    for entry in std::fs::read_dir(&gateway_db).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap_or_default();
        assert!(
            !bytes.windows(5).any(|w| w == b"carol"),
            "a name in the gateway's files"
        );
    }
}
