//! What `sund` shows a person: help text and errors, pinned as snapshots.

use std::process::Command;

fn sund(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sund"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_lists_the_commands_and_says_what_is_encrypted() {
    let (code, stdout, _) = sund(&["--help"]);
    assert_eq!(code, 0);
    insta::assert_snapshot!(stdout);
}

#[test]
fn send_without_a_message_says_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let (code, _, stderr) = sund(&["send", "--data-dir", dir.to_str().unwrap(), "room"]);
    assert_eq!(code, 1);
    insta::assert_snapshot!(stderr, @"error: nothing to send: give the message after the conversation name (or `-` to send each line of standard input)");
}

#[test]
fn init_with_a_missing_certificate_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let (code, _, stderr) = sund(&[
        "init",
        "--data-dir",
        dir.to_str().unwrap(),
        "--gateway",
        "127.0.0.1:4433",
        "--gateway-cert",
        "/nonexistent/cert.der",
    ]);
    assert_eq!(code, 1);
    insta::assert_snapshot!(stderr, @"error: /nonexistent/cert.der: No such file or directory (os error 2)");
}

#[test]
fn pair_accept_with_something_else_than_a_code_says_what_to_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let (code, _, stderr) = sund(&[
        "pair",
        "accept",
        "--data-dir",
        dir.to_str().unwrap(),
        "sund-enrol:00:00:00",
    ]);
    assert_eq!(code, 1);
    insta::assert_snapshot!(stderr, @"error: not a pairing code: it starts with `SUND-PAIR:1:`; copy the whole text `sund pair show` prints");
    assert!(!dir.exists(), "nothing is set up from a bad code");
}

#[test]
fn pair_show_without_a_device_says_how_to_create_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let (code, _, stderr) = sund(&["pair", "show", "--data-dir", dir.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("run `sund init"), "{stderr}");
}

#[test]
fn completions_cover_the_commands_and_their_flags() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, stdout, stderr) = sund(&["completions", shell]);
        assert_eq!(code, 0, "{stderr}");
        for word in ["follow", "devices", "data-dir", "json", "fetch-into"] {
            assert!(stdout.contains(word), "{shell} lacks {word}");
        }
    }
    let (code, _, stderr) = sund(&["completions", "tcsh"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("possible values: bash"), "{stderr}");
}

#[test]
fn chat_outside_a_terminal_says_what_to_use_instead() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, _, stderr) = sund(&["chat", "--data-dir", tmp.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    insta::assert_snapshot!(stderr, @"error: `sund chat` needs a terminal; in scripts use `sund follow --json` and `sund send`");
}

#[test]
fn backup_and_restore_say_where_the_passphrase_comes_from_and_what_a_file_is_not() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let dir = dir.to_str().unwrap();
    let (code, _, stderr) = sund(&["backup", "--data-dir", dir, "x.backup"]);
    assert_eq!(code, 1);
    insta::assert_snapshot!(stderr, @"error: no passphrase for the backup: give --passphrase-file FILE (owner-only, the passphrase on its first line), set SUND_BACKUP_PASSPHRASE, or run this on a terminal to type it");
    let pass = tmp.path().join("pass");
    std::fs::write(&pass, "a long enough passphrase\n").unwrap();
    let not_a_backup = tmp.path().join("notes.txt");
    std::fs::write(&not_a_backup, "shopping list").unwrap();
    let (code, _, stderr) = sund(&[
        "restore",
        "--data-dir",
        dir,
        not_a_backup.to_str().unwrap(),
        "--passphrase-file",
        pass.to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    // The passphrase file is checked before anything else: it was left readable by others.
    assert!(stderr.contains("pass"), "{stderr}");
    assert!(
        stderr.contains("0o644") || stderr.contains("644"),
        "{stderr}"
    );
}

fn sund_with(env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sund"))
        .env_remove("SUND_DATA_DIR")
        .envs(env.iter().copied())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_settings_file_gives_defaults_that_the_environment_and_flags_override() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("config.toml");
    let from_file = tmp.path().join("from-file");
    std::fs::write(
        &file,
        format!(
            "data_dir = {:?}\nlog = \"info\"\n",
            from_file.to_str().unwrap()
        ),
    )
    .unwrap();
    let config = ("SUND_CONFIG", file.to_str().unwrap());
    // The file's data_dir is where commands look.
    let (code, _, stderr) = sund_with(&[config], &["devices"]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains(&format!("no device in {}", from_file.display())),
        "{stderr}"
    );
    // SUND_DATA_DIR wins over it, and a flag over both.
    let (_, _, stderr) = sund_with(&[config, ("SUND_DATA_DIR", "/nowhere/env")], &["devices"]);
    assert!(stderr.contains("no device in /nowhere/env"), "{stderr}");
    let (_, _, stderr) = sund_with(
        &[config, ("SUND_DATA_DIR", "/nowhere/env")],
        &["devices", "--data-dir", "/nowhere/flag"],
    );
    assert!(stderr.contains("no device in /nowhere/flag"), "{stderr}");
    // `sund settings` says where each comes from.
    let (code, stdout, _) = sund_with(&[config, ("RUST_LOG", "debug")], &["settings"]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("(from the settings file)")
            && stdout.contains("log = \"debug\"   (from RUST_LOG)"),
        "{stdout}"
    );
    // A mistake in the file stops every command with the file, the key and the way out.
    std::fs::write(&file, "dat_dir = \"/x\"\n").unwrap();
    let (code, _, stderr) = sund_with(&[config], &["devices"]);
    assert_eq!(code, 1);
    let stderr = stderr.replace(file.to_str().unwrap(), "FILE");
    insta::assert_snapshot!(stderr, @r#"error: settings file FILE: unknown field `dat_dir`, expected one of `data_dir`, `log`, `fetch_into`; fix it, or set SUND_CONFIG="" to read none"#);
    let (code, stdout, _) = sund_with(&[("SUND_CONFIG", "")], &["settings"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("settings file: none"), "{stdout}");
}
