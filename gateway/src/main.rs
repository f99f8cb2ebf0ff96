//! `sund-gateway`: the Sund gateway server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Deserialize;
use std::sync::Arc;

use sund_gateway::driver::{self, GatewayOptions};
use sund_model::gateway::{AdminAnswer, AdminCommand, Gateway, GatewayConfig};
use sund_model::identity::DevicePublicKey;
use sund_model::ids::{ConversationId, DeviceId, UserId};
use sund_model::time::format_utc;
use sund_model::trust::{valid_domain, RegistrationAuthority};
use sund_runtime::clock::wall_clock;
use sund_runtime::entropy::OsEntropy;
use sund_runtime::environment::Production;
use sund_runtime::store::RedbStore;
use sund_runtime::tls::TlsIdentity;

/// The Sund gateway: enrols devices, authenticates them, orders and stores each conversation's
/// messages, and delivers them with resume and replay. Messages of DMs and rooms are
/// end-to-end encrypted (MLS): the gateway stores and forwards ciphertext and never logs
/// message content.
#[derive(Parser)]
#[command(name = "sund-gateway", version)]
struct Cli {
    /// UDP address to listen on.
    #[arg(long, global = true)]
    listen: Option<SocketAddr>,
    /// Directory holding the database and the TLS identity.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// TOML configuration file (keys: listen, data_dir, domain, open_enrolment,
    /// heartbeat_interval_s, retention_days); command-line flags win over it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Certify any device that registers without an enrolment token (for local use; otherwise
    /// hand out tokens with `admin enrol-token USER`).
    #[arg(long, global = true)]
    open_enrolment: bool,
    /// The domain this gateway certifies devices for (fixed when its trust root is created at
    /// first start; default `localhost`).
    #[arg(long, global = true)]
    domain: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Edit the gateway's database while it is stopped.
    Admin {
        #[command(subcommand)]
        action: Admin,
    },
    /// Print the path of the gateway's TLS certificate (creating the identity if missing);
    /// give this file to `sund init --gateway-cert`.
    Cert,
}

#[derive(Subcommand)]
enum Admin {
    /// Issue a one-time enrolment token for a new device of USER; give it to
    /// `sund init --user USER --token TOKEN`. It expires after 7 days.
    EnrolToken {
        /// The user name (as the device's `--user`).
        user: String,
    },
    /// List registered devices: id, user, certificate serial and validity, revoked or not.
    Devices,
    /// Revoke a device (its id as `admin devices` prints it, or its key): it never opens a
    /// session again, and connected devices get the new CRL when the gateway runs.
    Revoke {
        /// Device id (`dev:` and 32 hex digits) or device key (64 hex digits).
        device: String,
    },
    /// Print the current CRL: version, issue time and revoked devices.
    Crl,
    /// Create a conversation (or add members to it).
    CreateConversation {
        /// The conversation's name; nodes use the same name.
        name: String,
        /// Member device keys.
        #[arg(long = "member", required = true)]
        members: Vec<String>,
    },
    /// List conversations and their heads, then users, their devices and KeyPackages left.
    List,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    open_enrolment: Option<bool>,
    domain: Option<String>,
    heartbeat_interval_s: Option<u64>,
    retention_days: Option<u64>,
}

fn main() -> ExitCode {
    sund_runtime::memory::one_malloc_arena();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let file = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
            toml::from_str::<FileConfig>(&text)
                .map_err(|e| format!("config file {}: {e}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let data_dir = cli
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from("sund-data"));
    let listen = cli
        .listen
        .or(file.listen)
        .unwrap_or_else(|| "0.0.0.0:4433".parse().expect("valid"));
    let domain = cli
        .domain
        .or(file.domain)
        .unwrap_or_else(|| "localhost".into());
    if !valid_domain(&domain) {
        return Err(format!(
            "`{domain}` is not a domain name: use lower-case letters, digits, dots and hyphens"
        ));
    }
    let mut config = GatewayConfig {
        open_enrolment: cli.open_enrolment || file.open_enrolment.unwrap_or(false),
        domain,
        ..GatewayConfig::default()
    };
    if let Some(s) = file.heartbeat_interval_s {
        config.heartbeat_interval = Duration::from_secs(s.max(1));
        config.session_idle_timeout = config.heartbeat_interval * 3;
    }
    if let Some(days) = file.retention_days {
        config.retention_max = Duration::from_secs(days * 24 * 3600);
    }
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => serve(GatewayOptions {
            listen,
            environment: Arc::new(Production),
            data_dir,
            config,
        }),
        Command::Cert => {
            let dir = data_dir.join("tls");
            TlsIdentity::load_or_create(&dir).map_err(|e| e.to_string())?;
            println!("{}", dir.join("cert.der").display());
            Ok(())
        }
        Command::Admin { action } => admin(&data_dir, config, action),
    }
}

fn serve(options: GatewayOptions) -> Result<(), String> {
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime.block_on(async move {
        let mut handle = driver::start(options).await.map_err(|e| e.to_string())?;
        eprintln!(
            "sund-gateway listening on {} (certificate: pin it with `sund init --gateway-cert`)",
            handle.addr
        );
        tokio::select! {
            _ = wait_for_signal() => {}
            error = handle.failed() => {
                return Err(format!("the gateway stopped: {error}"));
            }
        }
        tracing::info!("signal received: draining");
        let stats = handle.shutdown().await.map_err(|e| e.to_string())?;
        tracing::info!(
            sequenced = stats.delivery.sequenced,
            deliveries = stats.delivery.deliveries,
            "stopped"
        );
        Ok(())
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

fn parse_key(text: &str) -> Result<DevicePublicKey, String> {
    DevicePublicKey::from_hex(text).ok_or_else(|| {
        format!("`{text}` is not a device key: expected 64 hex digits as `sund init` prints them")
    })
}

/// A device named by its id (`dev:` and 32 hex digits, or the 32 digits) or by its key.
fn parse_device(text: &str) -> Result<DeviceId, String> {
    let text = text.trim();
    if let Some(key) = DevicePublicKey::from_hex(text) {
        return Ok(key.device_id());
    }
    let hex = text.strip_prefix("dev:").unwrap_or(text);
    match (hex.len(), u128::from_str_radix(hex, 16)) {
        (32, Ok(id)) => Ok(DeviceId(id)),
        _ => Err(format!(
            "`{text}` is not a device: give its id as `admin devices` prints it (dev: and 32 hex digits) or its key (64 hex digits)"
        )),
    }
}

fn admin(data_dir: &Path, config: GatewayConfig, action: Admin) -> Result<(), String> {
    let path = data_dir.join("gateway.redb");
    let writes = matches!(
        action,
        Admin::EnrolToken { .. } | Admin::Revoke { .. } | Admin::CreateConversation { .. }
    );
    let new = !path.exists();
    if new && !writes {
        return Err(format!(
            "no gateway database at {}: nothing is registered there yet (pass the --data-dir the gateway runs with)",
            path.display()
        ));
    }
    sund_runtime::files::private_dir(data_dir).map_err(|e| e.to_string())?;
    let mut store = sund_gateway::driver::open_store(&path, None).map_err(|e| e.to_string())?;
    let empty = store.is_empty().map_err(|e| e.to_string())?;
    if empty && !store.was_created() {
        return Err(sund_gateway::driver::empty_database(&path));
    }
    if !empty
        && RegistrationAuthority::recover(&store)
            .map_err(|e| e.to_string())?
            .is_none()
    {
        return Err(format!(
            "{} holds no trust root: it is damaged or not a gateway database; restore the data directory from a backup",
            path.display()
        ));
    }
    let now = wall_clock();
    let mut gateway =
        Gateway::recover(config, now, &store, Box::new(OsEntropy)).map_err(|e| e.to_string())?;
    if new {
        let root = gateway.trust_root();
        eprintln!(
            "created a new gateway in {}: trust root {} of {}",
            data_dir.display(),
            root.fingerprint(),
            root.domain
        );
    }
    match action {
        Admin::EnrolToken { user } => {
            let command = AdminCommand::IssueEnrolmentToken(UserId::from_name(&user));
            let AdminAnswer::EnrolmentToken(token) = run_admin(&mut gateway, &mut store, command)?
            else {
                return Err("the gateway issued no token".into());
            };
            let root = gateway.trust_root();
            println!("{}", token.to_text());
            eprintln!(
                "one device of `{user}` can register with this token within 7 days; root {} of {}",
                root.fingerprint(),
                root.domain
            );
        }
        Admin::Devices => {
            let authority = gateway.registration_authority();
            let crl = authority.crl();
            let mut any = false;
            for cert in authority.certificates() {
                any = true;
                let state = if crl.revoked.contains(&cert.device()) {
                    "revoked"
                } else if now.as_micros() / 1_000_000 >= cert.not_after_s {
                    "expired"
                } else {
                    "valid"
                };
                println!(
                    "{} {} serial {} valid from {} until {} {state}",
                    cert.device(),
                    cert.user,
                    cert.serial,
                    format_utc(cert.not_before_s),
                    format_utc(cert.not_after_s)
                );
            }
            if !any {
                println!("no devices registered yet");
            }
        }
        Admin::Revoke { device } => {
            let device = parse_device(&device)?;
            match run_admin(&mut gateway, &mut store, AdminCommand::RevokeDevice(device))? {
                AdminAnswer::Revoked {
                    crl_version,
                    already: false,
                    ..
                } => println!("revoked {device}: CRL version {crl_version}"),
                AdminAnswer::Revoked { crl_version, .. } => {
                    println!("{device} was already revoked (CRL version {crl_version})")
                }
                _ => {
                    return Err(format!(
                        "device {device} has no certificate from this gateway; `sund-gateway admin devices` lists those it has"
                    ))
                }
            }
        }
        Admin::Crl => {
            let crl = gateway.registration_authority().crl();
            println!(
                "CRL version {} issued at {} for {}: {} revoked",
                crl.version,
                format_utc(crl.issued_at_s),
                crl.domain,
                crl.revoked.len()
            );
            for device in &crl.revoked {
                println!("{device}");
            }
        }
        Admin::CreateConversation { name, members } => {
            let keys = members
                .iter()
                .map(|m| parse_key(m))
                .collect::<Result<Vec<_>, _>>()?;
            let id = ConversationId::from_name(&name);
            let devices = keys.iter().map(|k| k.device_id()).collect();
            let command = AdminCommand::CreateConversation(id, devices);
            if let AdminAnswer::ConversationCreated { members, .. } =
                run_admin(&mut gateway, &mut store, command)?
            {
                println!("conversation `{name}` ({id}) has {members} member devices");
            }
        }
        Admin::List => {
            for log in gateway.conversations() {
                println!(
                    "{} head {} retained {} members {}",
                    log.id(),
                    log.head(),
                    log.retained(),
                    log.members().len()
                );
            }
            for user in gateway.users() {
                for device in gateway.devices_of(user) {
                    println!(
                        "{user} device {device} key_packages {}",
                        gateway.key_packages_left(device)
                    );
                }
            }
        }
    }
    // What recovery itself wrote (nothing, for a healthy database) is committed too.
    while let Some(ready) = gateway.poll_ready() {
        ready.commit(&mut store).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Runs one admin command through the state machine and returns its answer once the commit
/// that makes it true is durable (nothing is printed before that).
fn run_admin(
    gateway: &mut Gateway,
    store: &mut RedbStore,
    command: AdminCommand,
) -> Result<AdminAnswer, String> {
    let (answer, _) = gateway
        .run_admin(wall_clock(), command, store)
        .map_err(|e| e.to_string())?;
    Ok(answer)
}
