//! `sund-gateway`: the Sund gateway server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use serde::Deserialize;
use std::sync::Arc;

use sund_gateway::admin::{AdminRequest, Printed};
use sund_gateway::control::{self, AskError};
use sund_gateway::driver::{self, GatewayOptions};
use sund_model::federation::handshake::PeerConfig;
use sund_model::gateway::limits::{Rate, RateLimits};
use sund_model::gateway::{AdminAnswer, AdminCommand, Gateway, GatewayConfig};
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
    /// heartbeat_interval_s, retention_days, mailbox_mib (0: no quota), drain_timeout_s,
    /// metrics, admin_web, log_format,
    /// and a `[limits]` table: sends_per_second, send_burst, conversations_per_hour,
    /// conversation_burst, invitations_per_hour, invitation_burst, registrations_per_hour,
    /// registration_burst, contact_requests_per_day,
    /// contact_request_burst, watchlists_per_hour, watchlist_burst, peer_relays_per_second
    /// (messages one federation peer may relay here), peer_relay_burst, 0 turning one off,
    /// send_refusals_max, watchlist_max, contacts_max, conversations_max;
    /// and a `[federation]` table: listen (UDP address for peer gateways) and
    /// `[[federation.peer]]` entries of domain, address (HOST:PORT) and root_fingerprint);
    /// command-line flags win.
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
    /// Serve Prometheus metrics at `http://ADDR/metrics` (no authentication: bind it to
    /// loopback or a monitoring network).
    #[arg(long, global = true)]
    metrics: Option<SocketAddr>,
    /// Serve the web admin page at `http://ADDR/` (devices, revocations, tokens, the CRL,
    /// conversations, health). Sign in with the token in `DATA_DIR/admin-web.token`; keep the
    /// address on loopback (reach it over SSH port forwarding).
    #[arg(long, global = true)]
    admin_web: Option<SocketAddr>,
    /// Seconds a drain (after SIGTERM or Ctrl-C) may take before the gateway exits without
    /// finishing it (default 10); a second signal exits at once. Devices resend whatever was
    /// not acknowledged, so an unfinished drain loses nothing.
    #[arg(long, global = true)]
    drain_timeout: Option<u64>,
    /// How log lines are written to stderr: `text` for people (the default), `json` for one
    /// JSON object per line for a log collector. `RUST_LOG` picks what is logged (default info).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Administer the gateway: through the running gateway on this data directory (its control
    /// socket `admin.sock`), or on the database of a stopped one.
    Admin {
        #[command(subcommand)]
        action: Admin,
    },
    /// Print the path of the gateway's TLS certificate (creating the identity if missing);
    /// give this file to `sund init --gateway-cert`.
    Cert,
    /// Print a completion script for a shell, e.g.
    /// `sund-gateway completions bash > ~/.local/share/bash-completion/completions/sund-gateway`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// The shape of log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
enum LogFormat {
    /// Lines for people (coloured on a terminal).
    Text,
    /// One JSON object per line.
    Json,
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
    Devices {
        /// One JSON document (an array of devices) instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a device (its id as `admin devices` prints it, or its key): it never opens a
    /// session again, and connected devices get the new CRL when the gateway runs.
    Revoke {
        /// Device id (`dev:` and 32 hex digits) or device key (64 hex digits).
        device: String,
    },
    /// Show this gateway's domain and trust-root fingerprint (give both to a peer's operator)
    /// and each federation link: up or down, entries numbered, acknowledged, queued, taken,
    /// and the version of the peer's CRL this gateway holds.
    Federation {
        /// One JSON document instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Print the current CRL: version, issue time and revoked devices.
    Crl {
        /// One JSON document instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Create a conversation (or add members to it).
    CreateConversation {
        /// The conversation's name; nodes use the same name.
        name: String,
        /// Member device keys.
        #[arg(long = "member", required = true)]
        members: Vec<String>,
    },
    /// Share a conversation homed here with devices of a federation peer's domain: this
    /// gateway sequences it, the peer's gateway relays their messages and serves them.
    ShareConversation {
        /// The conversation's name (made with `create-conversation`).
        name: String,
        /// The peer's domain, as in a `[[federation.peer]]` of this gateway's config (not
        /// `--domain`, which names this gateway's own).
        #[arg(long, value_name = "DOMAIN")]
        peer: String,
        /// Member device keys of that domain (each device's `sund init` prints its key).
        #[arg(long = "member", required = true)]
        members: Vec<String>,
    },
    /// Hand the authority of a conversation homed here over to a federation peer that keeps a
    /// copy of it (a member of its domain is in it): the conversation freezes here until the
    /// peer has taken it over; devices' sends meanwhile are refused and sent again by the
    /// devices. An MLS room or DM goes with its group state, and the peer becomes the
    /// group's external sender.
    Handover {
        /// The conversation: the name an operator gave it, or its id as `sund room` and
        /// `admin list` print it (`conv:` and 32 hex digits).
        name: String,
        /// The peer's domain, as in a `[[federation.peer]]` of this gateway's config.
        #[arg(long, value_name = "DOMAIN")]
        to: String,
    },
    /// List conversations and their heads, then users, their devices and KeyPackages left.
    List {
        /// One JSON document (`conversations`, `devices`) instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// List enrolment tokens and pairing codes: id, user, unused / used / expired, expiry
    /// (never the tokens themselves).
    Tokens {
        /// One JSON document (an array of tokens) instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Make an enrolment token or pairing code expire now, so no device registers with it.
    ExpireToken {
        /// Its id as `admin tokens` or `admin enrol-token` print it, or the whole token.
        token: String,
    },
    /// Back up the whole gateway (database, file chunks, TLS identity) into a new file, while it
    /// runs or stopped; the file is as secret as the data directory.
    Backup {
        /// The new file.
        file: PathBuf,
    },
    /// Make a new data directory (`--data-dir`, which must hold no database) from a backup.
    Restore {
        /// A file `admin backup` wrote.
        file: PathBuf,
    },
}

impl Admin {
    fn request(self) -> AdminRequest {
        match self {
            Admin::EnrolToken { user } => AdminRequest::EnrolToken { user },
            Admin::Devices { json } => AdminRequest::Devices { json },
            Admin::Revoke { device } => AdminRequest::Revoke { device },
            Admin::Crl { json } => AdminRequest::Crl { json },
            Admin::Federation { json } => AdminRequest::Federation { json },
            Admin::CreateConversation { name, members } => {
                AdminRequest::CreateConversation { name, members }
            }
            Admin::ShareConversation {
                name,
                peer,
                members,
            } => AdminRequest::ShareConversation {
                name,
                domain: peer,
                members,
            },
            Admin::Handover { name, to } => AdminRequest::Handover { name, to },
            Admin::List { json } => AdminRequest::List { json },
            Admin::Tokens { json } => AdminRequest::Tokens { json },
            Admin::ExpireToken { token } => AdminRequest::ExpireToken { token },
            Admin::Backup { file } => AdminRequest::Backup {
                // The gateway resolves it, perhaps in another working directory.
                file: std::path::absolute(&file)
                    .unwrap_or(file)
                    .to_string_lossy()
                    .into_owned(),
            },
            Admin::Restore { .. } => unreachable!("a restore is made offline, by `admin`"),
        }
    }
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
    /// Most MiB of messages kept for one device that has not read them (0: no quota).
    mailbox_mib: Option<u64>,
    drain_timeout_s: Option<u64>,
    metrics: Option<SocketAddr>,
    admin_web: Option<SocketAddr>,
    log_format: Option<LogFormat>,
    limits: Option<LimitsConfig>,
    federation: Option<FederationConfig>,
}

/// The `[federation]` table: where links from peer gateways are accepted, and each peer
/// (`[[federation.peer]]`: its domain, its address and its trust root's fingerprint, which
/// its operator reads from `sund-gateway admin federation`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FederationConfig {
    /// UDP address of the federation endpoint (a port of its own, beside `listen`).
    listen: SocketAddr,
    #[serde(default)]
    peer: Vec<PeerEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerEntry {
    domain: String,
    /// `HOST:PORT` of the peer's federation endpoint.
    address: String,
    /// 32 hex digits.
    root_fingerprint: String,
}

impl FederationConfig {
    /// Checks the table: what the gateway's config and driver take from it.
    fn take(
        &self,
        own_domain: &str,
    ) -> Result<(Vec<PeerConfig>, sund_gateway::federation::FederationOptions), String> {
        let mut peers = Vec::new();
        let mut addresses = std::collections::BTreeMap::new();
        for entry in &self.peer {
            if !valid_domain(&entry.domain) {
                return Err(format!("[[federation.peer]] domain `{}` is not a domain name: use labels of lower-case letters, digits and hyphens between single dots", entry.domain));
            }
            if entry.domain == own_domain {
                return Err(format!("[[federation.peer]] names this gateway's own domain `{own_domain}`: list the other gateways"));
            }
            let fingerprint = entry.root_fingerprint.trim().to_ascii_lowercase();
            if fingerprint.len() != 32 || !fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("[[federation.peer]] `{}`: root_fingerprint must be the 32 hex digits its operator reads from `sund-gateway admin federation`", entry.domain));
            }
            if entry
                .address
                .rsplit_once(':')
                .is_none_or(|(_, port)| port.parse::<u16>().is_err())
            {
                return Err(format!(
                    "[[federation.peer]] `{}`: address `{}` is not HOST:PORT",
                    entry.domain, entry.address
                ));
            }
            if addresses
                .insert(entry.domain.clone(), entry.address.clone())
                .is_some()
            {
                return Err(format!(
                    "[[federation.peer]] `{}` is listed twice",
                    entry.domain
                ));
            }
            peers.push(PeerConfig {
                domain: entry.domain.clone(),
                root_fingerprint: fingerprint,
            });
        }
        Ok((
            peers,
            sund_gateway::federation::FederationOptions {
                listen: self.listen,
                peers: addresses,
            },
        ))
    }
}

/// The `[limits]` table: rate limits per device and per user (0 turns one off). Devices
/// refused by a limit are told when to send again and do so by themselves.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitsConfig {
    sends_per_second: Option<u32>,
    send_burst: Option<u32>,
    conversations_per_hour: Option<u32>,
    conversation_burst: Option<u32>,
    invitations_per_hour: Option<u32>,
    invitation_burst: Option<u32>,
    registrations_per_hour: Option<u32>,
    registration_burst: Option<u32>,
    send_refusals_max: Option<u32>,
    contact_requests_per_day: Option<u32>,
    contact_request_burst: Option<u32>,
    watchlists_per_hour: Option<u32>,
    watchlist_burst: Option<u32>,
    peer_relays_per_second: Option<u32>,
    peer_relay_burst: Option<u32>,
    watchlist_max: Option<u32>,
    contacts_max: Option<u32>,
    conversations_max: Option<u32>,
}

impl LimitsConfig {
    /// The limits it names, the defaults for what it leaves out.
    fn apply(&self, limits: &mut RateLimits) {
        fn rate(
            default: Option<Rate>,
            count: Option<u32>,
            burst: Option<u32>,
            make: fn(u32, u32) -> Rate,
        ) -> Option<Rate> {
            match (count, default) {
                (Some(0), _) => None,
                (Some(count), _) => Some(make(count, burst.unwrap_or(count).max(1))),
                (None, Some(d)) => Some(make(d.count, burst.unwrap_or(d.burst).max(1))),
                (None, None) => None,
            }
        }
        limits.sends = rate(
            limits.sends,
            self.sends_per_second,
            self.send_burst,
            Rate::per_second,
        );
        limits.conversations = rate(
            limits.conversations,
            self.conversations_per_hour,
            self.conversation_burst,
            Rate::per_hour,
        );
        limits.invitations = rate(
            limits.invitations,
            self.invitations_per_hour,
            self.invitation_burst,
            Rate::per_hour,
        );
        limits.registrations = rate(
            limits.registrations,
            self.registrations_per_hour,
            self.registration_burst,
            Rate::per_hour,
        );
        limits.contact_requests = rate(
            limits.contact_requests,
            self.contact_requests_per_day,
            self.contact_request_burst,
            Rate::per_day,
        );
        limits.presence_subscriptions = rate(
            limits.presence_subscriptions,
            self.watchlists_per_hour,
            self.watchlist_burst,
            Rate::per_hour,
        );
        limits.peer_relays = rate(
            limits.peer_relays,
            self.peer_relays_per_second,
            self.peer_relay_burst,
            Rate::per_second,
        );
        if let Some(max) = self.send_refusals_max {
            limits.send_refusals_max = max.max(1);
        }
        if let Some(max) = self.watchlist_max {
            limits.watchlist_max = max;
        }
        if let Some(max) = self.contacts_max {
            limits.contacts_max = max;
        }
        if let Some(max) = self.conversations_max {
            limits.conversations_max = max;
        }
    }
}

fn main() -> ExitCode {
    sund_runtime::memory::one_malloc_arena();
    let cli = Cli::parse();
    if let Some(Command::Completions { shell }) = cli.command {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "sund-gateway", &mut script);
        use std::io::Write as _;
        let _ = std::io::stdout().write_all(&script);
        return ExitCode::SUCCESS;
    }
    let file = match read_config(cli.config.as_deref()) {
        Ok(file) => file,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(1);
        }
    };
    init_logs(
        cli.log_format
            .or(file.log_format)
            .unwrap_or(LogFormat::Text),
    );
    match run(cli, file) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            say_error(&message);
            ExitCode::from(1)
        }
    }
}

/// Whether logs are JSON lines: then the few lines written for a person on stderr (the
/// listening address, a fatal error) are log records too, so a collector reads one format.
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn json_logs() -> bool {
    JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed)
}

/// A fatal error: `error: …` on stderr, or an error record with `--log-format json`.
fn say_error(message: &str) {
    if json_logs() {
        tracing::error!(error = %message, "exiting");
    } else {
        eprintln!("error: {message}");
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default info), as lines or JSON objects.
fn init_logs(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => {
            JSON_LOGS.store(true, std::sync::atomic::Ordering::Relaxed);
            logs.json().with_current_span(false).init()
        }
    }
}

fn read_config(path: Option<&Path>) -> Result<FileConfig, String> {
    match path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
            toml::from_str::<FileConfig>(&text)
                .map_err(|e| format!("config file {}: {e}", path.display()))
        }
        None => Ok(FileConfig::default()),
    }
}

fn run(cli: Cli, file: FileConfig) -> Result<(), String> {
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
            "`{domain}` is not a domain name: use labels of lower-case letters, digits and hyphens between single dots"
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
    if let Some(mib) = file.mailbox_mib {
        config.mailbox_bytes_max = (mib > 0).then(|| mib.saturating_mul(1 << 20));
    }
    if let Some(limits) = &file.limits {
        limits.apply(&mut config.limits);
    }
    let federation = match &file.federation {
        Some(table) => {
            let (peers, options) = table.take(&config.domain)?;
            config.federation_peers = peers;
            Some(options)
        }
        None => None,
    };
    let endpoints = Endpoints {
        metrics: cli.metrics.or(file.metrics),
        admin_web: cli.admin_web.or(file.admin_web),
    };
    let drain_timeout = Duration::from_secs(
        cli.drain_timeout
            .or(file.drain_timeout_s)
            .unwrap_or(DRAIN_TIMEOUT_DEFAULT_S),
    );
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => serve(
            GatewayOptions {
                listen,
                environment: Arc::new(Production),
                data_dir,
                config,
                federation,
            },
            drain_timeout,
            endpoints,
        ),
        Command::Cert => {
            let dir = data_dir.join("tls");
            TlsIdentity::load_or_create(&dir).map_err(|e| e.to_string())?;
            println!("{}", dir.join("cert.der").display());
            Ok(())
        }
        Command::Admin { action } => admin(&data_dir, config, action),
        Command::Completions { .. } => unreachable!("printed before the configuration is read"),
    }
}

/// How long a drain may take unless `--drain-timeout` says otherwise (seconds).
const DRAIN_TIMEOUT_DEFAULT_S: u64 = 10;

/// The HTTP endpoints a running gateway may serve besides QUIC.
struct Endpoints {
    /// Prometheus metrics.
    metrics: Option<SocketAddr>,
    /// The web admin page.
    admin_web: Option<SocketAddr>,
}

fn serve(
    options: GatewayOptions,
    drain_timeout: Duration,
    endpoints: Endpoints,
) -> Result<(), String> {
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let data_dir = options.data_dir.clone();
    let socket = data_dir.join(control::SOCKET_NAME);
    runtime.block_on(async move {
        let mut handle = driver::start(options).await.map_err(|e| e.to_string())?;
        // The database is ours now: no other gateway serves this directory.
        let control = match control::listen(&data_dir, handle.admin_client()) {
            Ok(control) => Some(control),
            Err(e) => {
                tracing::warn!(
                    socket = %socket.display(),
                    error = %e,
                    "no control socket: `sund-gateway admin` works only while the gateway is stopped"
                );
                None
            }
        };
        let _metrics = match endpoints.metrics {
            Some(addr) => {
                let endpoint = sund_gateway::metrics::listen(
                    addr,
                    handle.admin_client(),
                    handle.stage_histograms(),
                )
                .await
                .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
                tracing::info!(addr = %endpoint.addr, "metrics at /metrics");
                Some(endpoint)
            }
            None => None,
        };
        let _admin_web = match endpoints.admin_web {
            Some(addr) => {
                let web =
                    sund_gateway::web::listen(addr, handle.admin_client(), &data_dir).await?;
                tracing::info!(
                    addr = %web.addr,
                    token_file = %web.token_file.display(),
                    "admin page at http://{}/ (sign in with the token in the token file)",
                    web.addr
                );
                Some(web)
            }
            None => None,
        };
        if !json_logs() {
            eprintln!(
                "sund-gateway listening on {} (certificate: pin it with `sund init --gateway-cert`)",
                handle.addr
            );
        }
        tokio::select! {
            _ = wait_for_signal() => {}
            error = handle.failed() => {
                return Err(format!("the gateway stopped: {error}"));
            }
        }
        drop(control);
        tracing::info!(
            drain_timeout_s = drain_timeout.as_secs(),
            "signal received: draining (a second signal stops at once)"
        );
        let stats = tokio::select! {
            stats = handle.shutdown() => stats.map_err(|e| e.to_string())?,
            _ = wait_for_signal() => {
                tracing::warn!("second signal: stopping without finishing the drain");
                exit_now("stopped by a second signal before the drain finished; devices resend what was not acknowledged");
            }
            _ = tokio::time::sleep(drain_timeout) => {
                tracing::error!(
                    drain_timeout_s = drain_timeout.as_secs(),
                    "the drain did not finish in time: stopping without it"
                );
                exit_now(&format!(
                    "the drain took longer than {} s (--drain-timeout): stopped without finishing it; devices resend what was not acknowledged",
                    drain_timeout.as_secs()
                ));
            }
        };
        tracing::info!(
            sequenced = stats.delivery.sequenced,
            deliveries = stats.delivery.deliveries,
            "stopped"
        );
        Ok(())
    })
}

/// Exits the process at once, without waiting for the runtime's tasks (a commit in flight is
/// either durable or not, as after a crash; what was not acknowledged is resent by devices).
fn exit_now(why: &str) -> ! {
    say_error(why);
    std::process::exit(1)
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

/// `sund-gateway admin …`: through the running gateway's control socket if one runs on this
/// data directory, else on its database directly.
fn admin(data_dir: &Path, config: GatewayConfig, action: Admin) -> Result<(), String> {
    if let Admin::Restore { file } = &action {
        let socket = data_dir.join(control::SOCKET_NAME);
        if !matches!(
            control::ask(&socket, &AdminRequest::Crl { json: false }),
            Err(AskError::NotRunning)
        ) {
            return Err(format!(
                "a gateway runs on {}: restore into a new data directory",
                data_dir.display()
            ));
        }
        let printed = sund_gateway::backup::restore(file, data_dir)?;
        print!("{}", printed.stdout);
        eprint!("{}", printed.stderr);
        return Ok(());
    }
    let request = action.request();
    request.command()?; // a mistyped request is refused before anything is opened
    let socket = data_dir.join(control::SOCKET_NAME);
    let printed = match control::ask(&socket, &request) {
        Ok(answer) => answer?,
        Err(AskError::Failed(why)) => return Err(why),
        Err(AskError::NotRunning) => offline(data_dir, config, &request)?,
    };
    print!("{}", printed.stdout);
    eprint!("{}", printed.stderr);
    Ok(())
}

/// Carries out `request` on a stopped gateway's database.
fn offline(
    data_dir: &Path,
    config: GatewayConfig,
    request: &AdminRequest,
) -> Result<Printed, String> {
    let path = data_dir.join("gateway.redb");
    let new = !path.exists();
    if new && !request.writes() {
        let hint = match request {
            AdminRequest::Federation { .. } => {
                "; a gateway makes its trust root at its first start: run it once, then ask again for the fingerprint a peer pins"
            }
            _ => "",
        };
        return Err(format!(
            "no gateway database at {}: nothing is registered there yet (pass the --data-dir the gateway runs with){hint}",
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
    if let AdminRequest::Backup { file } = request {
        return sund_gateway::backup::backup(&store.reader(), data_dir, Path::new(file));
    }
    let answer = match request.command()? {
        Some(command) => Some(run_admin(&mut gateway, &mut store, command)?),
        None => None,
    };
    let printed = request.render(&gateway, wall_clock(), answer)?;
    // What recovery itself wrote (nothing, for a healthy database) is committed too.
    while let Some(ready) = gateway.poll_ready() {
        ready.commit(&mut store).map_err(|e| e.to_string())?;
    }
    Ok(printed)
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
