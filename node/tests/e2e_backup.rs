//! A device's backup on the real binaries, as a user types it: `sund backup` under a
//! passphrase, every way a restore can go wrong refused with nothing changed, and a restore
//! into a new device of the same user that gives back its names, verified users, conversation
//! names and the files it received (fetched again from its own store, byte for byte).

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;

fn write_secret(path: &str, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn as_args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The id of the first file `sund file list` shows.
fn first_file_id(dir: &str) -> String {
    let list = run(&sund(), &["file", "list", "--data-dir", dir]);
    list.split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("no file listed: {list}"))
        .to_string()
}

#[test]
fn a_backup_restored_into_a_new_device_gives_back_names_verified_users_and_files() {
    let tmp = tempfile::tempdir().unwrap();
    let path = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let gw_dir = tmp.path().join("gateway");
    let gw = gw_dir.to_str().unwrap();
    let port = free_udp_port();
    let cert = run(&gateway_binary(), &["cert", "--data-dir", gw]);
    let cert = cert.trim();
    let addr = format!("127.0.0.1:{port}");
    let (alice, bob) = (path("alice"), path("bob"));
    init_device(
        &alice,
        &addr,
        cert,
        Some("alice"),
        Some(&enrol(gw, "alice")),
    );
    init_device(&bob, &addr, cert, Some("bob"), Some(&enrol(gw, "bob")));
    let _gateway = Guard(start_gateway(&gw_dir, port));
    run(&sund(), &["status", "--data-dir", &bob]);
    run(&sund(), &["dm", "--data-dir", &alice, "bob"]);
    run(&sund(), &["contact", "--data-dir", &bob, "alice"]);
    run(
        &sund(),
        &[
            "room",
            "create",
            "--data-dir",
            &alice,
            "team",
            "--invite",
            "bob",
        ],
    );
    run(
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
    // Bob sends Alice a file; she fetches it.
    let report = tmp.path().join("report.txt");
    let body: Vec<u8> = (0..700_000u32)
        .flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes())
        .collect();
    std::fs::write(&report, &body).unwrap();
    run(
        &sund(),
        &[
            "file",
            "send",
            "--data-dir",
            &bob,
            "@alice",
            report.to_str().unwrap(),
        ],
    );
    run(&sund(), &["follow", "--data-dir", &alice, "--count", "1"]);
    let id = first_file_id(&alice);
    let first_out = path("first");
    std::fs::create_dir(&first_out).unwrap();
    run(
        &sund(),
        &[
            "file",
            "get",
            "--data-dir",
            &alice,
            &id,
            "--out",
            &first_out,
        ],
    );

    // The backup: a passphrase file readable by others is refused, as is a short passphrase
    // and (on no terminal) none at all.
    let pass = path("pass");
    let backup = path("alice.backup");
    std::fs::write(&pass, "correct horse battery staple\n").unwrap();
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o644)).unwrap();
    let backup_args = [
        "backup",
        "--data-dir",
        &alice,
        &backup,
        "--passphrase-file",
        &pass,
    ];
    let open = fails(&sund(), &backup_args);
    assert!(
        open.contains("chmod") || open.contains("other users"),
        "{open}"
    );
    let short = path("short");
    write_secret(&short, "hunter2\n");
    let weak = fails(
        &sund(),
        &[
            "backup",
            "--data-dir",
            &alice,
            &backup,
            "--passphrase-file",
            &short,
        ],
    );
    assert!(weak.contains("too short"), "{weak}");
    let none = fails(&sund(), &["backup", "--data-dir", &alice, &backup]);
    assert!(none.contains("no passphrase"), "{none}");
    assert!(!std::path::Path::new(&backup).exists(), "nothing written");

    write_secret(&pass, "correct horse battery staple\n");
    let said = run(&sund(), &backup_args);
    assert!(
        said.contains("backed up alice@localhost's")
            && said.contains("1 verified user(s)")
            && said.contains("1 file(s)"),
        "{said}"
    );
    let sealed = std::fs::read(&backup).unwrap();
    let mode = std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the backup is owner-only");
    assert!(sealed.starts_with(b"SUNDSEAL"));
    // Markers of 10 bytes or more: random bytes hold one by chance far less than once in a
    // billion backups of this size.
    let names =
        std::fs::read_to_string(std::path::Path::new(&alice).join("conversations")).unwrap();
    let mut markers: Vec<&[u8]> = vec![b"correct horse", b"report.txt", &body[1000..1032]];
    markers.extend(names.lines().map(str::as_bytes));
    assert!(markers.len() >= 5, "{names}");
    for plain in markers {
        assert!(
            !sealed.windows(plain.len()).any(|w| w == plain),
            "the backup shows {:?} in the clear",
            String::from_utf8_lossy(plain)
        );
    }
    let again = fails(&sund(), &backup_args);
    assert!(again.contains("exists already"), "{again}");

    // Alice's new device, set up with a token from the operator.
    let laptop = path("alice-laptop");
    let restore = |dir: &str, file: &str| {
        vec![
            "restore".to_string(),
            "--data-dir".into(),
            dir.into(),
            file.into(),
            "--passphrase-file".into(),
            pass.clone(),
        ]
    };
    // Before it is set up, the restore says what to do first.
    let unset = fails(&sund(), &as_args(&restore(&laptop, &backup)));
    assert!(unset.contains("set it up first"), "{unset}");
    init_device(
        &laptop,
        &addr,
        cert,
        Some("alice"),
        Some(&enrol(gw, "alice")),
    );
    // A wrong passphrase, a cut copy, a flipped byte and another user's device: each refused,
    // nothing changed.
    let wrong = path("wrong");
    write_secret(&wrong, "correct horse battery stapler\n");
    let refused = fails(
        &sund(),
        &[
            "restore",
            "--data-dir",
            &laptop,
            &backup,
            "--passphrase-file",
            &wrong,
        ],
    );
    assert!(refused.contains("wrong passphrase"), "{refused}");
    let cut = path("cut.backup");
    std::fs::write(&cut, &sealed[..sealed.len() - 100]).unwrap();
    let refused = fails(&sund(), &as_args(&restore(&laptop, &cut)));
    assert!(refused.contains("cut short"), "{refused}");
    let flipped = path("flipped.backup");
    let mut bytes = sealed.clone();
    let at = bytes.len() - 70_000;
    bytes[at] ^= 1;
    std::fs::write(&flipped, &bytes).unwrap();
    let refused = fails(&sund(), &as_args(&restore(&laptop, &flipped)));
    assert!(refused.contains("damaged"), "{refused}");
    let refused = fails(&sund(), &as_args(&restore(&bob, &backup)));
    assert!(
        refused.contains("this backup is of user `alice@localhost`")
            && refused.contains("`bob@localhost`"),
        "{refused}"
    );
    for name in ["contacts", "verified", "conversations"] {
        assert!(!std::path::Path::new(&laptop).join(name).exists(), "{name}");
    }

    // The restore.
    let said = run(&sund(), &as_args(&restore(&laptop, &backup)));
    assert!(
        said.contains(
            "new on this device: 1 user name(s), 1 verified user(s), 2 conversation name(s)"
        ),
        "{said}"
    );
    let contacts = std::fs::read_to_string(std::path::Path::new(&laptop).join("contacts")).unwrap();
    assert!(contacts.lines().any(|l| l == "bob@localhost"), "{contacts}");
    let conversations =
        std::fs::read_to_string(std::path::Path::new(&laptop).join("conversations")).unwrap();
    assert!(
        conversations.lines().any(|l| l.starts_with("team=")),
        "{conversations}"
    );
    let list = run(&sund(), &["file", "list", "--data-dir", &laptop]);
    assert!(list.contains(&id) && list.contains("report.txt"), "{list}");
    let out = path("restored");
    std::fs::create_dir(&out).unwrap();
    let got = run(
        &sund(),
        &["file", "get", "--data-dir", &laptop, &id, "--out", &out],
    );
    assert!(got.contains("saved"), "{got}");
    assert_eq!(
        std::fs::read(tmp.path().join("restored/report.txt")).unwrap(),
        body
    );
    // A second restore adds nothing and changes nothing.
    let said = run(&sund(), &as_args(&restore(&laptop, &backup)));
    assert!(
        said.contains(
            "new on this device: 0 user name(s), 0 verified user(s), 0 conversation name(s)"
        ),
        "{said}"
    );
}

#[test]
fn a_passphrase_typed_on_a_terminal_is_asked_twice_and_never_shown() {
    let tmp = tempfile::tempdir().unwrap();
    let path = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let cert = run(&gateway_binary(), &["cert", "--data-dir", &path("gw")]);
    let dir = path("alice");
    init_device(&dir, "127.0.0.1:9", cert.trim(), Some("alice"), None);
    run(&sund(), &["contact", "--data-dir", &dir, "bob"]);
    let sund = sund();
    let shell = |args: &str| {
        format!(
            "env -u SUND_BACKUP_PASSPHRASE {} {args}; echo EXIT=$?; sleep 60",
            sund.display()
        )
    };
    let secret = "typed on a terminal";
    // Asked twice, without echo; the backup is written.
    let backup = path("typed.backup");
    let term = Tmux::start(&shell(&format!("backup --data-dir {dir} {backup}")));
    term.wait_for("the first prompt", |s| {
        s.contains("passphrase for the backup:")
    });
    term.type_text(secret);
    term.key("Enter");
    term.wait_for("the second prompt", |s| {
        s.contains("the same passphrase again:")
    });
    term.type_text(secret);
    term.key("Enter");
    let screen = term.wait_for("the end", |s| s.contains("EXIT="));
    assert!(
        screen.contains("EXIT=0") && screen.contains("backed up alice@localhost's"),
        "{screen}"
    );
    assert!(
        !screen.contains(secret),
        "the passphrase was shown:\n{screen}"
    );
    drop(term);
    // Two different answers: nothing is written.
    let other = path("other.backup");
    let term = Tmux::start(&shell(&format!("backup --data-dir {dir} {other}")));
    term.wait_for("the first prompt", |s| {
        s.contains("passphrase for the backup:")
    });
    term.type_text(secret);
    term.key("Enter");
    term.wait_for("the second prompt", |s| {
        s.contains("the same passphrase again:")
    });
    term.type_text("typed on a terminal, but not the same");
    term.key("Enter");
    let screen = term.wait_for("the end", |s| s.contains("EXIT="));
    assert!(
        screen.contains("EXIT=1") && screen.contains("the two passphrases differ"),
        "{screen}"
    );
    assert!(!std::path::Path::new(&other).exists());
    drop(term);
    // A restore asks once; into the device it came from, it says so.
    let term = Tmux::start(&shell(&format!("restore --data-dir {dir} {backup}")));
    term.wait_for("the prompt", |s| s.contains("passphrase for the backup:"));
    term.type_text(secret);
    term.key("Enter");
    let screen = term.wait_for("the end", |s| s.contains("EXIT="));
    assert!(
        screen.contains("EXIT=0") && screen.contains("the backup is of this very device"),
        "{screen}"
    );
}
