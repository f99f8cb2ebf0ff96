//! `--metrics ADDR`: the running gateway's figures in Prometheus's text format at
//! `GET /metrics`, for a scraper on the operator's network.
//!
//! The figures are read at scrape time from where they are kept anyway: the state machine's
//! counters (`GatewayStats`, one per sub-machine, every field a counter), a few gauges of its
//! state (sessions open, conversations, CRL version), and the driver's stage histograms
//! (queueing, the machine, commit wait, fsync, commit size) as summaries. Nothing is counted
//! twice and nothing on the hot path changes. Names never carry user data: no device, user or
//! conversation appears in a label.
//!
//! The endpoint is deliberately small: one request per connection, at most 8 KiB of request
//! read within 5 s, `GET /metrics` (or `/`) answered, anything else 404 or 405, at most four
//! scrapes at once. Bind it to loopback or a monitoring network; it has no authentication.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sund_model::federation::{FederationStats, LinkReport};
use sund_model::gateway::{Gateway, GatewayStats};
use sund_model::time::Instant;
use sund_model::wire::payload::ErrorCode;
use sund_runtime::metrics::{Stages, Summary};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::driver::AdminClient;

const REQUEST_MAX: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const CONCURRENT_MAX: usize = 4;

/// What the gateway's state shows at a scrape, beside its counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Sessions open.
    pub sessions_open: usize,
    /// Conversations the gateway sequences.
    pub conversations: usize,
    /// The version of the CRL it serves.
    pub crl_version: u64,
    /// Devices whose KeyPackage pool is below the replenish threshold.
    pub key_package_pools_low: usize,
    /// Each federation link (its peer's domain is the operator's configuration, not user
    /// data, so it may label a series).
    pub links: Vec<LinkReport>,
    /// The federation machine's counters, if this gateway federates.
    pub federation: Option<FederationStats>,
}

impl Gauges {
    /// Reads them from the machine.
    pub fn of(gateway: &Gateway, now: Instant) -> Gauges {
        Gauges {
            sessions_open: gateway.session_count(),
            conversations: gateway.conversations().count(),
            crl_version: gateway.registration_authority().crl().version,
            key_package_pools_low: gateway.key_package_pools_low(),
            links: gateway
                .federation()
                .map(|f| f.links(now))
                .unwrap_or_default(),
            federation: gateway.federation().map(|f| f.stats()),
        }
    }
}

/// The metrics endpoint; dropping it stops serving.
pub struct MetricsEndpoint {
    /// The address it listens on.
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for MetricsEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Listens on `addr` and answers scrapes with what `admin` and `stages` show.
pub async fn listen(
    addr: SocketAddr,
    admin: AdminClient,
    stages: Arc<Stages>,
) -> std::io::Result<MetricsEndpoint> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let slots = Arc::new(Semaphore::new(CONCURRENT_MAX));
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue; // dropping the stream closes it: a scraper retries
            };
            let (admin, stages) = (admin.clone(), stages.clone());
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &admin, &stages)).await;
                drop(slot);
            });
        }
    });
    Ok(MetricsEndpoint { addr, task })
}

async fn answer(mut stream: TcpStream, admin: &AdminClient, stages: &Stages) {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < REQUEST_MAX {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let line = request.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (method, path) = (parts.next().unwrap_or_default(), parts.next());
    let (status, body) = match (method, path) {
        (b"GET", Some(b"/metrics" | b"/")) => {
            let now = admin
                .inspect(|gateway, now| (gateway.stats(), Gauges::of(gateway, now)))
                .await;
            let report = stages.report();
            ("200 OK", render(now.as_ref(), &report))
        }
        (b"GET", _) => ("404 Not Found", "GET /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", "GET /metrics\n".to_string()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The exposition: `now` is the machine's counters and gauges (`None` while the gateway cannot
/// serve: its store is out), `stages` the driver's histograms.
pub fn render(
    now: Option<&(GatewayStats, Gauges)>,
    stages: &sund_runtime::metrics::StageReport,
) -> String {
    let mut out = String::new();
    let up = u8::from(now.is_some());
    gauge(
        &mut out,
        "sund_gateway_up",
        "1 while the gateway serves; 0 while its store is out",
        up as u64,
    );
    if let Some((stats, gauges)) = now {
        gauge(
            &mut out,
            "sund_gateway_sessions_open",
            "sessions open now",
            gauges.sessions_open as u64,
        );
        gauge(
            &mut out,
            "sund_gateway_conversations",
            "conversations sequenced here",
            gauges.conversations as u64,
        );
        gauge(
            &mut out,
            "sund_gateway_crl_version",
            "version of the CRL served",
            gauges.crl_version,
        );
        gauge(
            &mut out,
            "sund_gateway_key_package_pools_low",
            "devices whose KeyPackage pool is below the replenish threshold",
            gauges.key_package_pools_low as u64,
        );
        let tree = serde_json::to_value(stats).expect("counters encode");
        let mut counters = Vec::new();
        flatten("sund_gateway", &tree, &mut counters);
        for (name, value) in counters {
            let _ = writeln!(out, "# TYPE {name}_total counter\n{name}_total {value}");
        }
        federation_lines(&mut out, gauges);
        let _ = writeln!(out, "# HELP sund_gateway_refusals_total errors and goodbyes sent, by code\n# TYPE sund_gateway_refusals_total counter");
        for slot in 1..=u16::from(u8::MAX) {
            let code = ErrorCode::from_u16(slot);
            if code == ErrorCode::Unknown {
                continue; // not a code
            }
            let _ = writeln!(
                out,
                "sund_gateway_refusals_total{{code=\"{}\"}} {}",
                code.name(),
                stats.refusals.get(code)
            );
        }
    }
    let seconds = [
        (
            "queued",
            "after the read, before the machine",
            &stages.queued,
        ),
        ("machine", "in the state machine", &stages.machine),
        ("commit_wait", "waiting for the commit", &stages.commit_wait),
        ("fsync", "the commit's fsync", &stages.fsync),
        ("release", "handing outputs to the writers", &stages.release),
    ];
    let _ = writeln!(out, "# HELP sund_gateway_stage_seconds where a message's time goes, by stage\n# TYPE sund_gateway_stage_seconds summary");
    for (stage, _, summary) in seconds {
        summary_lines(
            &mut out,
            "sund_gateway_stage_seconds",
            &format!("stage=\"{stage}\","),
            summary,
            1e-6,
        );
    }
    let _ = writeln!(out, "# HELP sund_gateway_commit_writes writes per group commit\n# TYPE sund_gateway_commit_writes summary");
    summary_lines(
        &mut out,
        "sund_gateway_commit_writes",
        "",
        &stages.commit_writes,
        1.0,
    );
    out
}

/// Per peer: whether its link is up, entries queued for it, numbered for it and taken from it;
/// and the federation machine's counters.
fn federation_lines(out: &mut String, gauges: &Gauges) {
    let Some(stats) = &gauges.federation else {
        return;
    };
    type Figure = fn(&LinkReport) -> u64;
    let per_peer: [(&str, &str, &str, Figure); 7] = [
        (
            "sund_gateway_federation_link_up",
            "gauge",
            "1 while the link to the peer is up",
            |l| u64::from(l.state == "up"),
        ),
        (
            "sund_gateway_federation_queued",
            "gauge",
            "entries queued for the peer, not yet acknowledged",
            |l| l.queued as u64,
        ),
        (
            "sund_gateway_federation_numbered_total",
            "counter",
            "entries numbered for the peer",
            |l| l.numbered,
        ),
        (
            "sund_gateway_federation_taken_total",
            "counter",
            "entries taken from the peer",
            |l| l.taken,
        ),
        (
            "sund_gateway_federation_peer_crl_version",
            "gauge",
            "version of the peer domain's CRL this gateway holds and enforces",
            |l| l.crl_held,
        ),
        (
            "sund_gateway_federation_relays_limited_total",
            "counter",
            "messages the peer relayed that this gateway refused by its limit per peer",
            |l| l.relays_limited,
        ),
        (
            "sund_gateway_federation_relays_past_hint_total",
            "counter",
            "of those, relays sent before the time an earlier refusal told (the link's reading was paused)",
            |l| l.relays_past_hint,
        ),
    ];
    for (name, kind, help, figure) in per_peer {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for link in &gauges.links {
            // Domains are letters, digits, dots and hyphens: nothing to escape.
            let _ = writeln!(out, "{name}{{peer=\"{}\"}} {}", link.domain, figure(link));
        }
    }
    for (name, value) in [
        ("links_up", stats.links_up),
        ("links_down", stats.links_down),
        ("handshakes_refused", stats.handshakes_refused),
        ("protocol_errors", stats.protocol_errors),
        ("resent", stats.resent),
        ("duplicates", stats.duplicates),
        ("gaps", stats.gaps),
        ("cursor_ahead", stats.cursor_ahead),
    ] {
        let _ = writeln!(
            out,
            "# TYPE sund_gateway_federation_{name}_total counter\nsund_gateway_federation_{name}_total {value}"
        );
    }
}

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

fn summary_lines(out: &mut String, name: &str, labels: &str, s: &Summary, scale: f64) {
    for (q, v) in [
        ("0.5", s.p50),
        ("0.9", s.p90),
        ("0.99", s.p99),
        ("1", s.max),
    ] {
        let _ = writeln!(
            out,
            "{name}{{{labels}quantile=\"{q}\"}} {}",
            v as f64 * scale
        );
    }
    let labels = labels.trim_end_matches(',');
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(
        out,
        "{name}_sum{braces} {}",
        (s.mean as f64) * (s.count as f64) * scale
    );
    let _ = writeln!(out, "{name}_count{braces} {}", s.count);
}

/// Every number in `value` under its path, joined by `_` (`delivery.sequenced` →
/// `sund_gateway_delivery_sequenced`), in the order the structs declare them.
fn flatten(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, u64)>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, inner) in map {
                flatten(&format!("{prefix}_{key}"), inner, out);
            }
        }
        serde_json::Value::Number(n) => {
            if let Some(n) = n.as_u64() {
                out.push((prefix.to_string(), n));
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A metric line's name: letters, digits and `_`, not starting with a digit.
    fn valid_name(name: &str) -> bool {
        !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    }

    #[test]
    fn the_exposition_names_every_counter_and_parses_as_prometheus_text() {
        let mut stats = GatewayStats::default();
        stats.delivery.sequenced = 42;
        stats.sessions.authenticated = 3;
        let gauges = Gauges {
            sessions_open: 2,
            conversations: 5,
            crl_version: 7,
            key_package_pools_low: 1,
            links: vec![LinkReport {
                domain: "b.example".into(),
                root_fingerprint: "00".repeat(16),
                dials: true,
                state: "up",
                numbered: 9,
                acknowledged: 7,
                queued: 2,
                taken: 4,
                failed_attempts: 0,
                silent_for: Duration::from_secs(1),
                crl_held: 3,
                peer_holds_crl: Some(0),
                relays_limited: 5,
                relays_admitted: 6,
                relays_past_hint: 2,
            }],
            federation: Some(FederationStats {
                links_up: 3,
                ..FederationStats::default()
            }),
        };
        let text = render(Some(&(stats, gauges)), &Default::default());
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').expect("name value");
            let name = series.split('{').next().unwrap();
            assert!(valid_name(name), "{line}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
        for expected in [
            "sund_gateway_up 1",
            "sund_gateway_sessions_open 2",
            "sund_gateway_crl_version 7",
            "sund_gateway_key_package_pools_low 1",
            "sund_gateway_delivery_replays_total 0",
            "sund_gateway_delivery_replayed_total 0",
            "sund_gateway_delivery_sequenced_total 42",
            "sund_gateway_sessions_authenticated_total 3",
            "sund_gateway_transfers_chunks_stored_total 0",
            "sund_gateway_refusals_total{code=\"rate_limited\"} 0",
            "sund_gateway_refusals_total{code=\"chunk_refused\"} 0",
            "sund_gateway_refusals_total{code=\"malformed_frame\"} 0",
            "sund_gateway_stage_seconds_count{stage=\"fsync\"} 0",
            "sund_gateway_commit_writes_count 0",
            "sund_gateway_federation_link_up{peer=\"b.example\"} 1",
            "sund_gateway_federation_queued{peer=\"b.example\"} 2",
            "sund_gateway_federation_numbered_total{peer=\"b.example\"} 9",
            "sund_gateway_federation_taken_total{peer=\"b.example\"} 4",
            "sund_gateway_federation_peer_crl_version{peer=\"b.example\"} 3",
            "sund_gateway_federation_relays_limited_total{peer=\"b.example\"} 5",
            "sund_gateway_federation_relays_past_hint_total{peer=\"b.example\"} 2",
            "sund_gateway_spanning_relays_past_hint_total 0",
            "sund_gateway_spanning_relays_limited_total 0",
            "sund_gateway_limits_peer_relays_limited_total 0",
            "sund_gateway_outgoing_link_entries_total 0",
            "sund_gateway_peer_crls_relays_refused_total 0",
            "sund_gateway_federation_links_up_total 3",
        ] {
            assert!(
                text.lines().any(|l| l == expected),
                "missing {expected}:\n{text}"
            );
        }
        // Every counter of every sub-machine appears, once.
        let names: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains("_total "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "a counter twice");
        assert!(names.len() > 30, "{names:?}");
    }

    #[test]
    fn a_gateway_whose_store_is_out_says_it_is_down() {
        let text = render(None, &Default::default());
        assert!(text.lines().any(|l| l == "sund_gateway_up 0"), "{text}");
        assert!(!text.contains("_total"), "{text}");
    }
}
