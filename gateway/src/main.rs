//! `sund-gateway`: the Sund gateway server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Deserialize;
use sund_gateway::committer::CommitMode;
use sund_gateway::driver::{self, wall_clock, GatewayOptions};
use sund_gateway::entropy::{EntropySource, OsEntropy};
use sund_gateway::quic::Socket;
use sund_gateway::store::RedbStore;
use sund_model::gateway::{Gateway, GatewayConfig, GatewayInput};
use sund_model::identity::DevicePublicKey;
use sund_model::ids::{ConversationId, DeviceId, UserId};
use sund_model::trust::valid_domain;

/// The Sund gateway: authenticates devices, orders and stores each conversation's messages,
/// and delivers them with resume and replay. Message bodies are opaque to it (until the MLS
/// work lands they are plaintext bytes chosen by the sender; the gateway never logs them).
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
    #[arg(long)]
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
            socket: Socket::Bind(listen),
            entropy: EntropySource::Os,
            clock: None,
            data_dir,
            config,
            commit: CommitMode::Pipelined,
        }),
        Command::Cert => {
            let dir = data_dir.join("tls");
            sund_gateway::quic::TlsIdentity::load_or_create(&dir).map_err(|e| e.to_string())?;
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
        let handle = driver::start(options).await.map_err(|e| e.to_string())?;
        eprintln!(
            "sund-gateway listening on {} (certificate: pin it with `sund init --gateway-cert`)",
            handle.addr
        );
        wait_for_signal().await;
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
    std::fs::create_dir_all(data_dir)
        .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
    let path = data_dir.join("gateway.redb");
    let mut store = RedbStore::open(&path).map_err(|e| {
        format!("{e}\nadmin commands edit the database directly: stop the gateway first")
    })?;
    let mut gateway = Gateway::recover(config, wall_clock(), &store, Box::new(OsEntropy))
        .map_err(|e| e.to_string())?;
    let now = wall_clock();
    match action {
        Admin::EnrolToken { user } => {
            let token = gateway.issue_enrolment_token(now, UserId::from_name(&user));
            let root = gateway.trust_root(now);
            println!("{}", token.to_text());
            eprintln!(
                "one device of `{user}` can register with this token within 7 days; root {} of {}",
                root.fingerprint(),
                root.domain
            );
        }
        Admin::Devices => {
            let Some(authority) = gateway.registration_authority() else {
                println!("no devices registered yet");
                return Ok(());
            };
            let crl = authority.crl();
            for cert in authority.certificates() {
                let state = if crl.revoked.contains(&cert.device()) {
                    "revoked"
                } else if now.as_micros() / 1_000_000 >= cert.not_after_s {
                    "expired"
                } else {
                    "valid"
                };
                println!(
                    "{} {} serial {} valid {}..{} {state}",
                    cert.device(),
                    cert.user,
                    cert.serial,
                    cert.not_before_s,
                    cert.not_after_s
                );
            }
        }
        Admin::Revoke { device } => {
            let device = parse_device(&device)?;
            let known = gateway
                .registration_authority()
                .is_some_and(|a| a.certificates().any(|c| c.device() == device));
            if !known {
                return Err(format!(
                    "device {device} has no certificate from this gateway; `sund-gateway admin devices` lists those it has"
                ));
            }
            gateway.handle(now, GatewayInput::RevokeDevice(device));
            let version = gateway
                .registration_authority()
                .map_or(0, |a| a.crl().version);
            println!("revoked {device}: CRL version {version}");
        }
        Admin::Crl => {
            let Some(authority) = gateway.registration_authority() else {
                println!("no CRL yet: the gateway has not created its trust root");
                return Ok(());
            };
            let crl = authority.crl();
            println!(
                "CRL version {} issued at {} s for {}: {} revoked",
                crl.version,
                crl.issued_at_s,
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
            gateway.handle(
                now,
                GatewayInput::CreateConversation(id, keys.iter().map(|k| k.device_id()).collect()),
            );
            println!(
                "conversation `{name}` ({id}) has {} member devices",
                gateway
                    .conversations()
                    .find(|c| c.id() == id)
                    .map_or(0, |c| c.members().len())
            );
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
    while let Some(ready) = gateway.poll_ready() {
        ready.commit(&mut store).map_err(|e| e.to_string())?;
    }
    Ok(())
}
