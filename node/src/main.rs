//! `sund`: the Sund command-line client.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{CommandFactory, Parser, Subcommand};
use sund_model::ids::{ConversationId, MsgId};
use sund_model::mls::device_groups::GroupError;
use sund_model::node::{ConnectionStatus, NodeEvent, SendError};
use sund_model::wire::payload::{ContactAction, ErrorCode};
use sund_node::device::Device;
use sund_node::display;
use sund_node::driver::{self, NodeError, NodeHandle};

/// `println!` that never panics: when whoever reads our output has gone (`sund dm bob | head
/// -1`), the command still finishes its work and the rest of its output is dropped.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` that never panics (see `say!`).
macro_rules! esay {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod blocked;
mod chat;
mod contact_commands;
mod contact_sync;
#[cfg(feature = "demo")]
mod demo;
mod file_commands;
mod follow;
mod group_commands;
mod pair;

/// Sund: end-to-end encrypted messages between devices through a gateway. DMs and rooms are MLS
/// groups: the gateway orders and stores their ciphertext only. (Conversations an operator
/// creates with `sund-gateway admin create-conversation` are not encrypted end to end.)
#[derive(Parser)]
#[command(name = "sund", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum RoomCommand {
    /// Create a room (you own it), inviting users.
    Create {
        /// The device's data directory.
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// A local name for the room.
        name: String,
        /// Users to invite.
        #[arg(long = "invite")]
        invite: Vec<String>,
    },
    /// Invite users (all their devices) to a room (owners and admins).
    Invite {
        /// The device's data directory.
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// The room's name.
        name: String,
        /// Users to invite.
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Remove a user (all their devices) from a room (owners, and admins for members).
    Remove {
        /// The device's data directory.
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// The room's name.
        name: String,
        /// The user to remove.
        user: String,
    },
    /// Make a user admin or member of a room you own.
    Role {
        /// The device's data directory.
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// The room's name.
        name: String,
        /// The user.
        user: String,
        /// admin, member or owner.
        role: String,
    },
    /// Leave a room or DM (the gateway proposes your removal and a member commits it).
    Leave {
        /// The device's data directory.
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// The room's name.
        name: String,
    },
    /// Give a room this device joined (shown by `sund devices` as conv:…) a local name.
    Name {
        /// The device's data directory.
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// The room's id, as `sund devices` prints it.
        id: String,
        /// The name to use.
        name: String,
    },
}

#[derive(Subcommand)]
enum FileCommand {
    /// Send a file into a DM or room: only the parts the gateway does not hold yet move, and
    /// an interrupted send goes on where it stopped.
    Send {
        /// The device's data directory.
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// The conversation's name (`@user` for a DM).
        conversation: String,
        /// The file.
        path: PathBuf,
    },
    /// List the files this device knows, with their ids.
    List {
        /// The device's data directory.
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// Only the files of this conversation.
        conversation: Option<String>,
    },
    /// Fetch a file (only the parts this device lacks) and save it under its own name.
    Get {
        /// The device's data directory.
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// The file's id, as `sund file list` or `sund follow` shows it.
        id: String,
        /// Where to save it.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum ContactsCommand {
    /// Ask a user to be contacts, or accept their request (contacts see each other's
    /// presence).
    Add {
        /// The device's data directory.
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// The user: NAME (of this device's domain) or NAME@DOMAIN.
        name: String,
    },
    /// Stop being contacts, or withdraw or decline a request.
    Remove {
        /// The device's data directory.
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// The user: NAME (of this device's domain) or NAME@DOMAIN.
        name: String,
    },
    /// Block a user: no presence either way, no DM with you, no invitation of you to a room.
    Block {
        /// The device's data directory.
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// The user: NAME (of this device's domain) or NAME@DOMAIN.
        name: String,
    },
    /// Unblock a user.
    Unblock {
        /// The device's data directory.
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// The user: NAME (of this device's domain) or NAME@DOMAIN.
        name: String,
    },
    /// Show the safety number of your DM with a user, to compare with theirs in person or
    /// over a call you trust, and mark them verified when it matches.
    Verify {
        /// The device's data directory.
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// The user: NAME (of this device's domain) or NAME@DOMAIN.
        name: String,
        /// The numbers match (you compared them): mark the user verified.
        #[arg(long, conflicts_with_all = ["compare", "forget"])]
        matches: bool,
        /// The number their device shows, typed in (spaces allowed): marked verified if equal.
        #[arg(long, value_name = "NUMBER", conflicts_with = "forget")]
        compare: Option<String>,
        /// Forget that the user was verified.
        #[arg(long)]
        forget: bool,
    },
    /// Show your contacts, requests to and from you, blocks, and whether you are invisible.
    List {
        /// The device's data directory.
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// One JSON object instead of lines.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PairCommand {
    /// On a device you already use: print a one-time code (QR and text) that links a new
    /// device to your user, and wait until the new device takes it.
    Show {
        /// The device's data directory.
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// How long to wait for the new device, in seconds (0: only print the code).
        #[arg(long, default_value_t = 600)]
        wait: u64,
        /// Print only the text form, no QR code.
        #[arg(long)]
        no_qr: bool,
    },
    /// On the new device: set it up from the code `sund pair show` printed on your other
    /// device, and register it with the gateway.
    Accept {
        /// The new device's data directory (must not hold a device yet).
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// The pairing code (`SUND-PAIR:1:...`).
        code: String,
        /// How long to wait for the gateway, in seconds.
        #[arg(long, default_value_t = 30)]
        wait: u64,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Run a gateway and three devices on loopback and show messages flowing, a gateway restart
    /// included (everything in a temporary directory).
    Demo,
    /// Set up a device: a new key, the gateway's address and its pinned certificate.
    Init {
        /// The device's data directory.
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// The gateway's UDP address, HOST:PORT (an IP address or a name).
        #[arg(long)]
        gateway: String,
        /// The gateway's certificate file (`sund-gateway cert` prints its path).
        #[arg(long)]
        gateway_cert: PathBuf,
        /// The user this device belongs to (give all of a person's devices the same name):
        /// NAME, in the token's domain (without a token: localhost), or NAME@DOMAIN.
        #[arg(long)]
        user: Option<String>,
        /// The one-time enrolment token from the gateway's operator
        /// (`sund-gateway admin enrol-token USER`); the device registers with it at its first
        /// connection. Not needed with a gateway running `--open-enrolment`.
        #[arg(long)]
        token: Option<String>,
    },
    /// Link a new device to your user from a device you already use (no operator token needed).
    Pair {
        #[command(subcommand)]
        command: PairCommand,
    },
    /// Start a DM with a user (all of their devices and your other devices join it).
    Dm {
        /// The device's data directory.
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// The other person: NAME (a user of this device's domain) or NAME@DOMAIN.
        user: String,
    },
    /// Create rooms, invite and remove people.
    Room {
        #[command(subcommand)]
        command: RoomCommand,
    },
    /// Send, list and fetch files in DMs and rooms.
    File {
        #[command(subcommand)]
        command: FileCommand,
    },
    /// Show the DMs and rooms of this device: their members' devices, epoch and state.
    Devices {
        /// The device's data directory.
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// One JSON document (an array of conversations and their member devices).
        #[arg(long)]
        json: bool,
    },
    /// Send a message (encrypted in a DM or room) and wait until the gateway acknowledges it.
    ///
    /// With `-` as the message, each line of standard input is sent as its own message, in
    /// order. A gateway that paces this device (too many messages at once) says so; the rest
    /// goes out by itself after the pause.
    Send {
        /// The device's data directory.
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// The conversation's name.
        conversation: String,
        /// The message (`-`: one message per line of standard input).
        message: Vec<String>,
    },
    /// Print messages as they arrive; keeps going across gateway restarts.
    Follow {
        /// The device's data directory.
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// Stop after this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// Conversation names to print instead of ids (names used with `sund send` are known).
        #[arg(long = "conversation")]
        conversations: Vec<String>,
        /// Fetch every file offered from now on and save it into this directory (a file of that
        /// name there is kept, and the new one waits for `sund file get ID --out OTHER`).
        #[arg(long, value_name = "DIR")]
        fetch_into: Option<PathBuf>,
        /// One JSON object per line for each event (messages, files, status, group changes),
        /// all on stdout, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Chat in the terminal: your DMs and rooms, their messages, an input line and a status
    /// bar (connection, messages waiting, epoch). Tab switches, Enter sends, `/dm USER` starts a
    /// DM, Esc leaves. Keeps going across gateway restarts.
    Chat {
        /// The device's data directory.
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
    },
    /// Name a user on this device: what they write shows NAME instead of `user:…`, and the DM
    /// with them is `@NAME` (user names travel only as hashes).
    Contact {
        /// The device's data directory.
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// The user: NAME, as their own devices were set up with (`--user`), in this device's
        /// domain, or NAME@DOMAIN.
        name: String,
    },
    /// Contacts: people who added each other see each other's presence.
    Contacts {
        #[command(subcommand)]
        command: ContactsCommand,
    },
    /// Show whether your contacts (or the users named) are online, or when they were last
    /// seen, in coarse steps only; or become invisible (offline to everyone) or visible again.
    Presence {
        /// The device's data directory.
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// Users to show (default: all your contacts).
        users: Vec<String>,
        /// Appear offline to everyone, while this device works as usual.
        #[arg(long, conflicts_with = "visible")]
        invisible: bool,
        /// Show your presence to your contacts again.
        #[arg(long)]
        visible: bool,
    },
    /// Show the device, its gateway, its outbox, and whether the gateway can be reached.
    Status {
        /// The device's data directory.
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// Print one JSON object (device, connection, problem, outbox, unread, certificate,
        /// root, CRL version, pairing) instead of lines, for scripts and monitoring.
        #[arg(long)]
        json: bool,
    },
    /// Back up what you would lose with this device (user names, verified users, conversation
    /// names, files received) into one file sealed under a passphrase.
    ///
    /// Not the device itself: its key and encryption state stay out (a copy of them would be
    /// refused). Restore the backup into a new device of the same user with `sund restore`.
    Backup {
        /// The device's data directory (the device must not be running).
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// The backup file to write (must not exist).
        file: PathBuf,
        /// Read the passphrase from the first line of this file (owner-only) instead of the
        /// terminal or SUND_BACKUP_PASSPHRASE.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
    /// Restore a backup (`sund backup`) into this device: a new device of the same user, set up
    /// first with `sund pair accept` or `sund init --token`. Checks the whole backup before
    /// changing anything; what this device knows already is kept.
    Restore {
        /// The new device's data directory (the device must not be running).
        #[arg(long, env = "SUND_DATA_DIR", default_value = "sund-device")]
        data_dir: PathBuf,
        /// The backup file.
        file: PathBuf,
        /// Read the passphrase from the first line of this file (owner-only) instead of the
        /// terminal or SUND_BACKUP_PASSPHRASE.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
    /// Show the settings file (`$SUND_CONFIG`, else `~/.config/sund/config.toml`) and where each
    /// setting comes from: a flag, the environment, that file or the default.
    ///
    /// The file may set `data_dir` (instead of --data-dir), `log` (instead of RUST_LOG) and
    /// `fetch_into` (where `sund follow` saves offered files); paths are absolute or `~/...`.
    Settings,
    /// Print a completion script for a shell, e.g.
    /// `sund completions bash > ~/.local/share/bash-completion/completions/sund`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    sund_runtime::memory::one_malloc_arena();
    let settings = match sund_node::settings::load() {
        Ok(settings) => settings,
        Err(e) => {
            esay!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let sources = SettingSources::from_environment();
    let (settings_file, settings) = match settings {
        Some((path, settings)) => (Some(path), settings),
        None => (None, Default::default()),
    };
    if std::env::var_os("SUND_DATA_DIR").is_none() {
        if let Some(dir) = &settings.data_dir {
            // Before any thread starts: the data-dir arguments read it as their default.
            std::env::set_var("SUND_DATA_DIR", dir);
        }
    }
    let log = settings.log.clone().unwrap_or_else(|| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| log.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if let Command::Settings = cli.command {
        sources.print(settings_file.as_deref(), &settings);
        return ExitCode::SUCCESS;
    }
    if let Command::Completions { shell } = cli.command {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "sund", &mut script);
        let _ = std::io::stdout().write_all(&script);
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            esay!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli.command, settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            esay!("error: {message}");
            ExitCode::from(1)
        }
    }
}

/// Where the data directory and the log filter come from, for `sund settings`: noted before
/// the settings file's values are put in place.
struct SettingSources {
    data_dir_env: Option<String>,
    log_env: Option<String>,
}

impl SettingSources {
    fn from_environment() -> SettingSources {
        let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        SettingSources {
            data_dir_env: var("SUND_DATA_DIR"),
            log_env: var("RUST_LOG"),
        }
    }

    fn print(&self, file: Option<&Path>, settings: &sund_node::settings::Settings) {
        match (file, sund_node::settings::location()) {
            (Some(path), _) => say!("settings file: {}", path.display()),
            (None, Some((path, _))) => say!(
                "settings file: {} (there is none; every setting has its default)",
                path.display()
            ),
            (None, None) => {
                say!("settings file: none (SUND_CONFIG is empty, or no home directory is known)")
            }
        }
        let from_file = |value: Option<String>| value.map(|v| (v, "the settings file"));
        let show = |key: &str,
                    env: Option<(String, &str)>,
                    file: Option<(String, &str)>,
                    default: &str| {
            match env.or(file) {
                Some((value, source)) => say!("{key} = {value:?}   (from {source})"),
                None => say!("{key} = {default}   (default)"),
            }
        };
        show(
            "data_dir",
            self.data_dir_env.clone().map(|v| (v, "SUND_DATA_DIR")),
            from_file(settings.data_dir.as_ref().map(|p| p.display().to_string())),
            "\"sund-device\" in the current directory",
        );
        show(
            "log",
            self.log_env.clone().map(|v| (v, "RUST_LOG")),
            from_file(settings.log.clone()),
            "\"warn\"",
        );
        show(
            "fetch_into",
            None,
            from_file(
                settings
                    .fetch_into
                    .as_ref()
                    .map(|p| p.display().to_string()),
            ),
            "not set (`sund follow` fetches files only with --fetch-into)",
        );
        say!("a flag given to a command wins over all of these");
    }
}

/// The passphrase of a backup: from `--passphrase-file`, else `SUND_BACKUP_PASSPHRASE`, else
/// typed on the terminal without echo (twice for a new backup).
fn backup_passphrase(file: Option<&Path>, new: bool) -> Result<zeroize::Zeroizing<String>, String> {
    if let Some(path) = file {
        sund_runtime::files::check_private(path, 0o600).map_err(|e| e.to_string())?;
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the passphrase from {}: {e}", path.display()))?,
        );
        let line = text.lines().next().unwrap_or("");
        return Ok(zeroize::Zeroizing::new(line.to_string()));
    }
    if let Ok(passphrase) = std::env::var("SUND_BACKUP_PASSPHRASE") {
        return Ok(zeroize::Zeroizing::new(passphrase));
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        return Err("no passphrase for the backup: give --passphrase-file FILE (owner-only, the passphrase on its first line), set SUND_BACKUP_PASSPHRASE, or run this on a terminal to type it".into());
    }
    let typed = |prompt: &str| {
        rpassword::prompt_password(prompt)
            .map(zeroize::Zeroizing::new)
            .map_err(|e| format!("cannot read the passphrase from the terminal: {e}"))
    };
    let first = typed("passphrase for the backup: ")?;
    if new {
        sund_runtime::sealed::check_passphrase(&first).map_err(|e| e.to_string())?;
        if *typed("the same passphrase again: ")? != *first {
            return Err(
                "the two passphrases differ: nothing was written; run `sund backup` again".into(),
            );
        }
    }
    Ok(first)
}

/// `sund backup FILE`.
fn backup_command(
    data_dir: &Path,
    file: &Path,
    passphrase_file: Option<&Path>,
) -> Result<(), String> {
    let passphrase = backup_passphrase(passphrase_file, true)?;
    let done = sund_node::backup::backup(
        data_dir,
        file,
        &passphrase,
        sund_runtime::sealed::KdfParams::BACKUP,
    )?;
    say!(
        "backed up {}'s {} to {} ({} bytes, sealed under your passphrase)",
        done.user,
        done.contents.words(),
        file.display(),
        done.bytes
    );
    say!("keep the passphrase: without it nobody, you included, can open the backup");
    say!("to restore: set up a new device of {} (`sund pair accept` or `sund init --token`), then `sund restore {} --data-dir NEW`", done.user, file.display());
    Ok(())
}

/// `sund restore FILE`.
fn restore_command(
    data_dir: &Path,
    file: &Path,
    passphrase_file: Option<&Path>,
) -> Result<(), String> {
    let passphrase = backup_passphrase(passphrase_file, false)?;
    let done = sund_node::backup::restore(data_dir, file, &passphrase)?;
    let age = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs().saturating_sub(done.written_unix))
        .unwrap_or(0);
    say!(
        "restored the backup of device {} (written {} ago) into {}: it holds {}",
        done.from_device,
        display::coarse_duration(age),
        data_dir.display(),
        done.contents.words()
    );
    say!(
        "new on this device: {} user name(s), {} verified user(s), {} conversation name(s); the files are listed by `sund file list`",
        done.added_names,
        done.added_verified,
        done.added_conversations
    );
    if done.same_device {
        say!("the backup is of this very device: what it lacked of it is back");
    } else {
        say!("this device joins DMs and rooms as a new device: `sund pair show` on another of your devices adds it to yours; if the old device is lost, ask the operator to revoke it (`sund-gateway admin revoke`)");
    }
    Ok(())
}

/// What a revoked device's commands say.
pub(crate) const REVOKED: &str = "this device was revoked by the gateway's operator and cannot connect again; set up a new device (`sund init` in a new directory) with a new enrolment token";

async fn run(command: Command, settings: sund_node::settings::Settings) -> Result<(), String> {
    match command {
        #[cfg(feature = "demo")]
        Command::Demo => demo::run().await,
        #[cfg(not(feature = "demo"))]
        Command::Demo => Err("this `sund` was built without the demo; build it with the default features (`cargo run -p sund-node --bin sund -- demo`)".into()),
        Command::Init {
            data_dir,
            gateway,
            gateway_cert,
            user,
            token,
        } => {
            let device = Device::init(
                &data_dir,
                &gateway,
                &gateway_cert,
                user.as_deref(),
                token.as_deref(),
            )
            .map_err(|e| e.to_string())?;
            let key = device.key.public().to_hex();
            match &device.user {
                Some(user) => say!(
                    "device {} of {user} ready in {}",
                    device.key.device_id(),
                    data_dir.display()
                ),
                None => say!(
                    "device {} ready in {}",
                    device.key.device_id(),
                    data_dir.display()
                ),
            }
            say!("device key: {key}");
            if device.enrolment.is_some() {
                say!("it registers with its enrolment token when it first connects");
            } else {
                say!(
                    "without --token it can register only with a gateway running --open-enrolment;"
                );
                say!("otherwise, on the gateway host: sund-gateway admin enrol-token USER, then rerun init with --token");
            }
            Ok(())
        }
        Command::Send {
            data_dir,
            conversation,
            message,
        } => send(&data_dir, &conversation, &message).await,
        Command::Backup {
            data_dir,
            file,
            passphrase_file,
        } => backup_command(&data_dir, &file, passphrase_file.as_deref()),
        Command::Restore {
            data_dir,
            file,
            passphrase_file,
        } => restore_command(&data_dir, &file, passphrase_file.as_deref()),
        Command::Follow {
            data_dir,
            count,
            conversations,
            fetch_into,
            json,
        } => {
            let fetch_into = fetch_into.or(settings.fetch_into);
            follow::follow(&data_dir, count, &conversations, fetch_into.as_deref(), json).await
        }
        Command::Status { data_dir, json } => status(&data_dir, json).await,
        Command::Chat { data_dir } => chat::chat(&data_dir).await,
        Command::Completions { .. } | Command::Settings => {
            unreachable!("printed before the runtime starts")
        }
        Command::Contact { data_dir, name } => group_commands::contact(&data_dir, &name),
        Command::Contacts { command } => match command {
            ContactsCommand::Add { data_dir, name } => {
                contact_commands::change(&data_dir, &name, ContactAction::Add).await
            }
            ContactsCommand::Remove { data_dir, name } => {
                contact_commands::change(&data_dir, &name, ContactAction::Remove).await
            }
            ContactsCommand::Block { data_dir, name } => {
                contact_commands::change(&data_dir, &name, ContactAction::Block).await
            }
            ContactsCommand::Unblock { data_dir, name } => {
                contact_commands::change(&data_dir, &name, ContactAction::Unblock).await
            }
            ContactsCommand::List { data_dir, json } => {
                contact_commands::list(&data_dir, json).await
            }
            ContactsCommand::Verify {
                data_dir,
                name,
                matches,
                compare,
                forget,
            } => {
                use contact_commands::VerifyAction;
                let action = match (matches, compare, forget) {
                    (true, _, _) => VerifyAction::Matches,
                    (_, Some(number), _) => VerifyAction::Compare(number),
                    (_, _, true) => VerifyAction::Forget,
                    _ => VerifyAction::Show,
                };
                contact_commands::verify(&data_dir, &name, action).await
            }
        },
        Command::Presence {
            data_dir,
            users,
            invisible,
            visible,
        } => {
            let visibility = match (invisible, visible) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            };
            contact_commands::presence(&data_dir, &users, visibility).await
        }
        Command::Dm { data_dir, user } => group_commands::dm(&data_dir, &user).await,
        Command::Room { command } => group_commands::room(command).await,
        Command::Devices { data_dir, json } => group_commands::devices(&data_dir, json).await,
        Command::File {
            command:
                FileCommand::Send {
                    data_dir,
                    conversation,
                    path,
                },
        } => file_commands::send(&data_dir, &conversation, &path).await,
        Command::File {
            command:
                FileCommand::List {
                    data_dir,
                    conversation,
                },
        } => file_commands::list(&data_dir, conversation.as_deref()).await,
        Command::File {
            command: FileCommand::Get { data_dir, id, out },
        } => file_commands::get(&data_dir, &id, &out).await,
        Command::Pair {
            command:
                PairCommand::Show {
                    data_dir,
                    wait,
                    no_qr,
                },
        } => pair::show(&data_dir, Duration::from_secs(wait), !no_qr).await,
        Command::Pair {
            command:
                PairCommand::Accept {
                    data_dir,
                    code,
                    wait,
                },
        } => pair::accept(&data_dir, &code, Duration::from_secs(wait)).await,
    }
}

fn load(data_dir: &Path) -> Result<Device, String> {
    Device::load(data_dir).map_err(|e| e.to_string())
}

/// The messages `sund send` was given: the words after the conversation as one message, or
/// with `-` each non-empty line of standard input as its own message, in order.
fn messages_to_send(words: &[String]) -> Result<Vec<String>, String> {
    if words.len() == 1 && words[0] == "-" {
        let mut lines = Vec::new();
        for line in std::io::stdin().lines() {
            let line = line.map_err(|e| format!("cannot read standard input: {e}"))?;
            if !line.trim().is_empty() {
                lines.push(line);
            }
        }
        if lines.is_empty() {
            return Err("nothing to send: standard input had no lines".into());
        }
        return Ok(lines);
    }
    let message = words.join(" ");
    if message.is_empty() {
        return Err("nothing to send: give the message after the conversation name (or `-` to send each line of standard input)".into());
    }
    Ok(vec![message])
}

/// True if this device is in a DM or room of that id (joined, or joining).
async fn is_group(node: &NodeHandle, id: ConversationId) -> bool {
    node.groups()
        .await
        .is_ok_and(|groups| groups.iter().any(|g| g.conversation == id))
}

/// How long `sund send` waits for the gateway's next acknowledgement.
const ACK_WAIT: Duration = Duration::from_secs(15);

/// Saves `body` in the outbox as [`NodeHandle::send`] does, but while a change the gateway
/// proposed waits for a member's commit (MLS takes no message until then, and this device
/// commits it itself as soon as it can), tries again for up to [`ACK_WAIT`] instead of
/// refusing at once. Events meanwhile stay queued for the caller.
async fn send_when_no_proposal_waits(
    node: &NodeHandle,
    id: ConversationId,
    conversation: &str,
    body: Bytes,
) -> Result<Result<MsgId, SendError>, NodeError> {
    let started = tokio::time::Instant::now();
    let mut told = false;
    loop {
        let result = node.send(id, body.clone()).await?;
        let pending = matches!(
            result,
            Err(SendError::Group(GroupError::ProposalPending(_)))
        );
        if !pending || started.elapsed() >= ACK_WAIT {
            return Ok(result);
        }
        if !told && started.elapsed() >= Duration::from_secs(1) {
            told = true;
            esay!(
                "`{conversation}` waits for a member to commit a change its gateway proposed (a removal, or its new home); the message is saved once that is done (up to 15 s)…"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn send(data_dir: &Path, conversation: &str, words: &[String]) -> Result<(), String> {
    let messages = messages_to_send(words)?;
    let device = load(data_dir)?;
    let id = device.resolve_conversation(conversation);
    device.check_not_own_group(id)?;
    let mut node = driver::start(device.options())
        .await
        .map_err(|e| e.to_string())?;
    if node.status().await.is_ok_and(|s| s.state_copied) {
        let _ = node.stop().await;
        return Err(stale_copy());
    }
    if let Some(user) = conversation.strip_prefix('@') {
        // A DM is an MLS group: never send its messages down the operator-conversation path.
        // One started by the other user joins from its Welcome once this device connects.
        if let Err(e) = group_commands::await_membership(&mut node, id).await {
            let _ = node.stop().await;
            if e.contains("is not a conversation this device is in") {
                return Err(format!(
                    "this device has no DM with `{user}` yet: start one with `sund dm {user}`"
                ));
            }
            return Err(e);
        }
    } else if conversation.starts_with("conv:") && !is_group(&node, id).await {
        // An id this device knows no DM or room by may be a room it was invited to while it
        // was not running: its Welcome waits at the gateway. Never send such a room's message
        // down the operator-conversation path, where the gateway would read it in plaintext.
        match group_commands::membership(&mut node, id).await {
            Ok(()) => {}
            // Connected, and invited to nothing by that id: a conversation an operator made.
            Err(group_commands::NotMember::NotInvited(_)) => {}
            Err(group_commands::NotMember::Unreachable(_)) => {
                let _ = node.stop().await;
                return Err(format!(
                    "cannot tell whether `{conversation}` is a room this device was invited to (its invitation would wait at the gateway, which cannot be reached: `sund status` says why), so nothing was sent: its messages must be encrypted; send it again once the gateway answers"
                ));
            }
            Err(group_commands::NotMember::Failed(e)) => {
                let _ = node.stop().await;
                return Err(e);
            }
        }
    }
    // Every message is saved in the outbox, in order, before any acknowledgement is awaited:
    // the gateway sequences them in this order (sender order).
    let mut waiting = std::collections::VecDeque::new();
    for message in messages {
        match send_when_no_proposal_waits(&node, id, conversation, Bytes::from(message)).await {
            Ok(Ok(msg_id)) => waiting.push_back(msg_id),
            Ok(Err(e)) => {
                let _ = node.stop().await;
                let saved = match waiting.len() {
                    0 => String::new(),
                    n => format!(" ({n} earlier message(s) are saved and go out with the next `sund send` or `sund follow`)"),
                };
                if matches!(e, SendError::Group(GroupError::ProposalPending(_))) {
                    return Err(format!(
                        "cannot send to `{conversation}` yet: it waits for a member to commit a change its gateway proposed (a removal, or its new home), and none has within 15 s. The member chosen to commit it may be away; each other member steps in 10 s after the one before it (counted from when its device first saw the change, across runs). The message was not saved: send it again in a little while{saved}"
                    ));
                }
                return Err(format!("cannot send to `{conversation}`: {e}{saved}"));
            }
            Err(_) => {
                // The node stopped before the message was saved (its store failed: a full
                // disk). It may have left already: the node sends before its outbox commit
                // completes.
                let why = why_stopped(node).await;
                return Err(format!(
                    "this device stopped before it could save the message ({why}); the message may already have reached the gateway, so look at `{conversation}` with `sund follow` before sending it again"
                ));
            }
        }
    }
    let deadline = tokio::time::sleep(ACK_WAIT);
    tokio::pin!(deadline);
    let still_waiting = tokio::time::sleep(Duration::from_secs(3));
    tokio::pin!(still_waiting);
    let mut told = false;
    while !waiting.is_empty() {
        tokio::select! {
            _ = &mut still_waiting, if !told => {
                told = true;
                esay!("waiting for the gateway at {} to acknowledge (up to 15 s)…", device.gateway);
            }
            _ = &mut deadline => {
                let why = match node.status().await.ok().and_then(|s| s.last_problem) {
                    Some(problem) => format!(" ({problem})"),
                    None => String::new(),
                };
                let _ = node.stop().await;
                let what = match waiting.len() {
                    1 => "the message stays in this device's outbox and goes".to_string(),
                    n => format!("{n} messages stay in this device's outbox and go"),
                };
                return Err(format!("the gateway at {} did not acknowledge within 15 s{why}; {what} out with the next `sund send` or `sund follow`", device.gateway));
            }
            event = node.events.recv() => match event {
                Some(NodeEvent::Accepted { msg_id: m, seq, .. }) if waiting.contains(&m) => {
                    waiting.retain(|w| *w != m);
                    say!("sent to {conversation}: seq {seq}");
                    deadline.as_mut().reset(tokio::time::Instant::now() + ACK_WAIT);
                }
                Some(NodeEvent::Throttled { code, retry_after, message }) => {
                    // The node holds what waits and sends it again after the pause by itself.
                    esay!(
                        "the gateway is pacing this device ({}): {message}; sending again in {:.1} s",
                        code.name(),
                        retry_after.as_secs_f64()
                    );
                    deadline.as_mut().reset(tokio::time::Instant::now() + retry_after + ACK_WAIT);
                }
                Some(NodeEvent::Rejected { msg_id: m, code }) if waiting.contains(&m) => {
                    let _ = node.stop().await;
                    let hint = match code {
                        ErrorCode::UnknownConversation => format!(
                            "the gateway has no conversation `{conversation}`; its operator creates one with `sund-gateway admin create-conversation {conversation} --member KEY ...` (each device's key is printed by `sund init`)"
                        ),
                        ErrorCode::NotMember => format!(
                            "this device is not a member of `{conversation}`; the gateway's operator adds it with `sund-gateway admin create-conversation {conversation} --member {}`",
                            device.key.public().to_hex()
                        ),
                        _ => format!("is this device a member of `{conversation}`?"),
                    };
                    return Err(format!("the gateway refused the message ({code:?}): {hint}"));
                }
                Some(NodeEvent::Refused { message, .. }) => {
                    let _ = node.stop().await;
                    return Err(format!("the gateway refused this device: {message}"));
                }
                Some(NodeEvent::Revoked) => {
                    let _ = node.stop().await;
                    return Err(REVOKED.into());
                }
                Some(_) => {}
                None => {
                    // The messages are saved (each send returned): they wait in the outbox.
                    let why = why_stopped(node).await;
                    let (what, it) = match waiting.len() {
                        1 => ("the message".to_string(), "it is"),
                        n => (format!("{n} messages"), "they are"),
                    };
                    return Err(format!("this device stopped ({why}) before the gateway acknowledged {what}; {it} saved in this device's outbox and go{} out with the next `sund send` or `sund follow` once the device can write to its data directory again", if it == "it is" { "es" } else { "" }));
                }
            }
        }
    }
    node.stop().await.map_err(|e| e.to_string())
}

/// Why a node stopped, in words, from its core's result (a failed store says which and why).
pub(crate) async fn why_stopped(node: driver::NodeHandle) -> String {
    match node.stop().await {
        Err(e) => e.to_string(),
        Ok(()) => "it stopped".to_string(),
    }
}

/// What a command on a stale copy of a device (see `Node::state_copied`) says.
pub(crate) fn stale_copy() -> String {
    format!(
        "this copy of the device cannot be used: {}",
        sund_model::node::STATE_COPIED
    )
}

fn describe(status: ConnectionStatus) -> String {
    match status {
        ConnectionStatus::Connected => "connected".into(),
        ConnectionStatus::Reconnecting { attempt } => format!("reconnecting (attempt {attempt})"),
        ConnectionStatus::Offline => "offline".into(),
    }
}

/// What `sund status --json` prints: one JSON object, for scripts and monitoring.
#[derive(serde::Serialize)]
struct StatusReport {
    /// `dev:` and 32 hex digits.
    device: String,
    /// 64 hex digits.
    device_key: String,
    /// The gateway's address as configured.
    gateway: String,
    /// `connected`, `reconnecting`, `offline` or `refused`.
    connection: &'static str,
    /// While reconnecting: failed attempts so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    reconnect_attempt: Option<u32>,
    /// Why the device is not connected, in words that say what to do.
    problem: Option<String>,
    /// The user this device belongs to (`name@domain`), if set up for one.
    user: Option<String>,
    /// Messages waiting for the gateway's acknowledgement.
    outbox: usize,
    /// Messages delivered that `sund follow` has not printed yet.
    unread: usize,
    /// The user and serial of this device's certificate, once registered.
    certificate: Option<CertificateReport>,
    /// The trust root this device pinned.
    root: Option<RootReport>,
    /// The version of the CRL it holds.
    crl_version: u64,
    /// Other domains' roots this device's root vouches for (members of those domains are
    /// checked against them); absent when there are none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    peers: Vec<RootReport>,
    /// The device that vouched for this one, once the gateway confirmed the pairing.
    paired_with: Option<String>,
    /// Set up from a pairing code the gateway has not confirmed yet: the voucher's key prefix.
    pairing_unconfirmed: Option<String>,
}

#[derive(serde::Serialize)]
struct CertificateReport {
    user: String,
    serial: u64,
}

#[derive(serde::Serialize)]
struct RootReport {
    fingerprint: String,
    domain: String,
    /// For another domain's root: the version of that domain's CRL this device holds, if it
    /// holds one (its gateway passes on what that domain revokes).
    #[serde(skip_serializing_if = "Option::is_none")]
    crl_version: Option<u64>,
    /// And how many devices it revokes.
    #[serde(skip_serializing_if = "Option::is_none")]
    revoked: Option<usize>,
}

async fn status(data_dir: &Path, json: bool) -> Result<(), String> {
    let device = load(data_dir)?;
    let mut report = StatusReport {
        device: device.key.device_id().to_string(),
        device_key: device.key.public().to_hex(),
        user: device.user.as_ref().map(ToString::to_string),
        gateway: device.gateway.to_string(),
        connection: "offline",
        reconnect_attempt: None,
        problem: None,
        outbox: 0,
        unread: 0,
        certificate: None,
        root: None,
        crl_version: 0,
        peers: Vec::new(),
        paired_with: None,
        pairing_unconfirmed: device
            .pairing
            .as_ref()
            .map(|code| sund_model::hex::encode(&code.voucher)),
    };
    if !json {
        say!("device     {}", report.device);
        say!("device key {}", report.device_key);
        if let Some(user) = &report.user {
            say!("user       {user}");
        }
        say!("gateway    {}", report.gateway);
    }
    let mut node = driver::start(device.options())
        .await
        .map_err(|e| e.to_string())?;
    let deadline = tokio::time::sleep(Duration::from_secs(6));
    tokio::pin!(deadline);
    let mut refused = None;
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            event = node.events.recv() => match event {
                Some(NodeEvent::Status(ConnectionStatus::Connected)) => break,
                Some(NodeEvent::Refused { message, .. }) => { refused = Some(message); break; }
                Some(NodeEvent::Revoked) => { refused = Some(REVOKED.into()); break; }
                Some(_) => {}
                None => break,
            }
        }
    }
    let snapshot = node.status().await.map_err(|e| e.to_string())?;
    report.outbox = snapshot.outbox;
    report.unread = snapshot.unread;
    report.crl_version = snapshot.crl_version;
    report.peers = snapshot
        .peer_roots
        .iter()
        .map(|root| {
            let crl = snapshot
                .peer_crls
                .iter()
                .find(|(d, _, _)| *d == root.domain);
            RootReport {
                fingerprint: root.fingerprint(),
                domain: root.domain.clone(),
                crl_version: crl.map(|c| c.1),
                revoked: crl.map(|c| c.2),
            }
        })
        .collect();
    if let (Some((user, serial)), Some(root)) = (&snapshot.certificate, &snapshot.root) {
        report.certificate = Some(CertificateReport {
            user: user.to_string(),
            serial: *serial,
        });
        report.root = Some(RootReport {
            fingerprint: root.fingerprint(),
            domain: root.domain.clone(),
            crl_version: None,
            revoked: None,
        });
    }
    if let Some(voucher) = snapshot.paired_with {
        report.paired_with = Some(voucher.to_string());
        report.pairing_unconfirmed = None;
    }
    // A device set up without a token for a bare name took the default domain: if its
    // gateway certifies another, its user id is not the one its user's address names.
    let misnamed = match (&device.user, &snapshot.root) {
        (Some(user), Some(root)) if user.domain() != root.domain => Some(format!(
            "this device was set up as {user}, but its gateway certifies users of {}: set it up again with `sund init --user {}@{}` (in a new data directory)",
            root.domain,
            user.name(),
            root.domain
        )),
        _ => None,
    };
    let failure = match (snapshot.connection, refused) {
        (_, _) if misnamed.is_some() => misnamed,
        (_, Some(message)) => {
            report.connection = "refused";
            Some(format!("the gateway refused this device: {message}"))
        }
        (ConnectionStatus::Connected, _) => {
            report.connection = "connected";
            None
        }
        (other, _) => {
            if let ConnectionStatus::Reconnecting { attempt } = other {
                report.connection = "reconnecting";
                report.reconnect_attempt = Some(attempt);
            }
            Some(if snapshot.state_copied {
                stale_copy()
            } else {
                match &snapshot.last_problem {
                    Some(problem) => format!("cannot reach the gateway: {problem}"),
                    None => format!(
                        "cannot reach the gateway at {}: is it running?",
                        device.gateway
                    ),
                }
            })
        }
    };
    report.problem = failure.clone();
    if json {
        let text = serde_json::to_string_pretty(&report).expect("a status report encodes");
        say!("{text}");
    } else {
        say!("outbox     {} message(s) waiting", report.outbox);
        if report.unread > 0 {
            say!(
                "unread     {} message(s) not shown yet: `sund follow` prints them",
                report.unread
            );
        }
        match (&report.certificate, &report.root) {
            (Some(cert), Some(root)) => say!(
                "trust      certificate {} from root {} ({}), CRL version {}",
                cert.serial,
                root.fingerprint,
                root.domain,
                report.crl_version
            ),
            _ => say!("trust      not registered yet"),
        }
        if !report.peers.is_empty() {
            let peers: Vec<String> = report
                .peers
                .iter()
                .map(|p| match (p.crl_version, p.revoked) {
                    (Some(version), Some(revoked)) => format!(
                        "{} (root {}, CRL version {version}, {revoked} revoked)",
                        p.domain, p.fingerprint
                    ),
                    _ => format!("{} (root {})", p.domain, p.fingerprint),
                })
                .collect();
            say!(
                "peers      {}: their members are checked against these roots, which this domain's root vouches for",
                peers.join(", ")
            );
        }
        match (&report.paired_with, &report.pairing_unconfirmed) {
            (Some(voucher), _) => {
                say!("paired     with device {voucher}, confirmed by the gateway")
            }
            (None, Some(prefix)) => say!(
                "paired     with the device whose key starts {prefix}: trusted on first use, not yet confirmed by the gateway"
            ),
            (None, None) => {}
        }
        match report.connection {
            "refused" => say!("connection refused"),
            "connected" => say!("connection connected"),
            _ => say!("connection {}", describe(snapshot.connection)),
        }
    }
    match failure {
        Some(why) => {
            let _ = node.stop().await;
            Err(why)
        }
        None => node.stop().await.map_err(|e| e.to_string()),
    }
}
