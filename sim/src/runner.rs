//! Runs scenarios for the `cargo sim` command: seeds, sweeps, determinism checks, reports.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;

use serde::Serialize;

use crate::scenario::{self, Scenario};
use crate::swarm::{self, Family, Generated};
use crate::world::{Outcome, RunReport, World};
use sund_model::planted::PlantedBug;

/// What the command line asked for.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Seeds to run (inclusive); `None` uses each scenario's own seed.
    pub seeds: Option<(u64, u64)>,
    /// Print a progress line per run (sweeps).
    pub sweep: bool,
    /// Run everything twice and compare trace hashes.
    pub check_determinism: bool,
    /// One JSON object per run on stdout.
    pub json: bool,
    /// Keep the newest this many events of each run in words, printed if it fails.
    pub trace: Option<usize>,
    /// Plant this bug in every run (as the scenario statement `plant NAME` does).
    pub plant: Option<PlantedBug>,
    /// Print on stderr how far each run got, every [`crate::world::PROGRESS_EVENTS`] events.
    pub progress: bool,
}

/// Errors that end the command with exit code 2.
#[derive(Debug)]
pub enum RunError {
    /// The command line is wrong.
    Usage(String),
    /// A scenario file is unreadable, malformed or needs an unbuilt feature.
    Scenario(String),
}

/// Totals of a command.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Runs that passed.
    pub passed: u64,
    /// Runs that failed.
    pub failed: u64,
}

/// One line of `--json` output.
#[derive(Serialize)]
struct JsonRun<'a> {
    scenario: &'a str,
    file: &'a str,
    seed: u64,
    trace_hash: &'a str,
    events: u64,
    sim_time_ms: u64,
    wall_ms: u64,
    /// Events processed per second of wall time (the kernel's speed on this scenario).
    events_per_s: u64,
    /// Time from the heal at the end of the safety phase to convergence (100 ms steps).
    recovery_ms: Option<u64>,
    result: &'a str,
    violated_invariant: Option<&'a str>,
    detail: Option<&'a str>,
    deterministic: Option<bool>,
    offered: u64,
    accepted: u64,
    delivered: u64,
    expired: u64,
    /// Acknowledged messages a gateway lost with writes its disk reported durable (`lie-disk`).
    lost_by_disk: u64,
    /// Seqs devices were told a gateway lost.
    told_lost: u64,
    frames_sent: u64,
    frames_lost: u64,
    frames_duplicated: u64,
    frames_reordered: u64,
    connections: u64,
    lost_uncommitted: u64,
    commits_applied: u64,
    joins: u64,
    removals: u64,
    undecryptable: u64,
    faults: &'a BTreeMap<&'static str, u64>,
    /// Conversations spanning domains, summed over the gateways up at the end (each from its
    /// last start): messages relayed to an authority, and sequenced messages sent to member
    /// gateways.
    spanning_relayed: Option<u64>,
    spanning_fanned_out: Option<u64>,
    /// Relays an authority refused by its limit per peer (`peer_limited`).
    spanning_relays_limited: Option<u64>,
    /// MLS conversations across domains: Welcomes sent to other domains' gateways, commits
    /// relayed from them and sequenced, removals of their devices told to them.
    spanning_welcomes_abroad: Option<u64>,
    spanning_commits_relayed: Option<u64>,
    spanning_removals_abroad: Option<u64>,
    /// Authority handovers: asked of an authority, done, declined, and the longest and median
    /// time a conversation was frozen (as its old authority timed it).
    handovers_asked: Option<u64>,
    handovers_done: Option<u64>,
    handovers_declined: Option<u64>,
    handover_frozen_max_ms: Option<f64>,
    handover_frozen_median_ms: Option<f64>,
    /// Revocations: newest CRL version, devices revoked, devices holding it, and the time
    /// from the last revocation until the last device took its CRL.
    crl_version: Option<u64>,
    crl_revoked: Option<u64>,
    crl_holders: Option<u64>,
    crl_slowest_ms: Option<f64>,
    crl_median_ms: Option<f64>,
    crl_p99_ms: Option<f64>,
    /// Federated revocations: (gateway, peer domain that revoked) pairs, how many hold the
    /// peer's newest CRL at the end, and the time until the last took it.
    crl_peer_links: Option<u64>,
    crl_peer_holding: Option<u64>,
    crl_peer_slowest_ms: Option<f64>,
    /// Files: sent, completed by member devices, chunk streams and sealed bytes each way, and
    /// the plaintext bytes completed (so `bytes_down / files_bytes_completed` shows what
    /// deduplication saved).
    files_sent: Option<u64>,
    files_completed: Option<u64>,
    files_chunks_up: Option<u64>,
    files_bytes_up: Option<u64>,
    files_chunks_down: Option<u64>,
    files_bytes_down: Option<u64>,
    files_bytes_completed: Option<u64>,
    /// Drains (`drain GATEWAY`): signal to stop, and the devices' reconnects after it (first
    /// accepted connection per device, from the signal; the most in any 100 ms).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    drains: Vec<JsonDrain<'a>>,
}

/// One drain in `--json` output.
#[derive(Serialize)]
struct JsonDrain<'a> {
    gateway: &'a str,
    sessions: u64,
    stopped_after_ms: Option<f64>,
    refused: u64,
    reconnected: u64,
    reconnect_p50_ms: f64,
    reconnect_p99_ms: f64,
    reconnect_max_ms: f64,
    peak_per_100ms: u64,
    /// It stopped at the drain timeout, not having finished.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    timed_out: bool,
}

/// Parses `A..B` (inclusive).
pub fn parse_seed_range(text: &str) -> Result<(u64, u64), RunError> {
    let bad = || RunError::Usage(format!("--seeds needs a range like 1..100, got `{text}`"));
    let (a, b) = text.split_once("..").ok_or_else(bad)?;
    let a: u64 = a.parse().map_err(|_| bad())?;
    let b: u64 = b.parse().map_err(|_| bad())?;
    if a > b {
        return Err(bad());
    }
    Ok((a, b))
}

/// The process exit code of a command's result: errors are printed here, usage errors with
/// the command's `usage` text (shared by `cargo sim` and `cargo sim --drivers`).
pub fn exit_code(
    result: Result<std::process::ExitCode, RunError>,
    usage: &str,
) -> std::process::ExitCode {
    match result {
        Ok(code) => code,
        Err(RunError::Usage(message)) => {
            eprintln!("error: {message}\n\n{usage}");
            std::process::ExitCode::from(2)
        }
        Err(RunError::Scenario(message)) => {
            eprintln!("error: {message}");
            std::process::ExitCode::from(2)
        }
    }
}

/// The whole number after `flag` on the command line.
pub fn whole_number(flag: &str, value: Option<String>) -> Result<u64, RunError> {
    let value = value.ok_or_else(|| RunError::Usage(format!("{flag} needs a number")))?;
    value
        .parse()
        .map_err(|_| RunError::Usage(format!("{flag} needs a whole number, got `{value}`")))
}

/// The swarm family after `--family`.
pub fn family(value: Option<String>) -> Result<crate::swarm::Family, RunError> {
    let value = value.ok_or_else(|| RunError::Usage("--family needs a name".into()))?;
    crate::swarm::Family::parse(&value).ok_or_else(|| {
        RunError::Usage(format!(
            "unknown family `{value}`: use plain, mls, trust or mixed"
        ))
    })
}

/// The planted bug after `--plant`.
pub fn planted_bug(value: Option<String>) -> Result<sund_model::planted::PlantedBug, RunError> {
    use sund_model::planted::PlantedBug;
    let value = value.ok_or_else(|| RunError::Usage("--plant needs a bug's name".into()))?;
    PlantedBug::parse(&value).ok_or_else(|| {
        let known: Vec<&str> = PlantedBug::ALL.iter().map(|(n, _)| *n).collect();
        RunError::Usage(format!(
            "unknown planted bug `{value}`: use one of {}",
            known.join(", ")
        ))
    })
}

/// `scenarios/` here, else the repository's (a command run from another folder).
pub fn default_scenarios_dir() -> PathBuf {
    let here = std::path::Path::new("scenarios");
    if here.is_dir() {
        return here.to_path_buf();
    }
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
}

/// Expands directories into their `*.sund` files, sorted by name.
pub fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, RunError> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let listing = std::fs::read_dir(path); // deterministic: sorted below
            let entries = listing.map_err(|e| {
                RunError::Scenario(format!("cannot read directory {}: {e}", path.display()))
            })?;
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "sund"))
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(RunError::Scenario(format!(
                    "no *.sund scenario files in {}",
                    path.display()
                )));
            }
            files.extend(found);
        } else if path.is_file() {
            files.push(path.clone());
        } else {
            return Err(RunError::Scenario(format!(
                "no such scenario file or directory: {}",
                path.display()
            )));
        }
    }
    Ok(files)
}

fn parse_all(scenarios: &[(String, String)]) -> Result<Vec<Scenario>, RunError> {
    scenarios
        .iter()
        .map(|(file, text)| {
            scenario::parse(file, text).map_err(|e| RunError::Scenario(e.to_string()))
        })
        .collect()
}

/// `--list`: name, file, default seed and the first comment line of each scenario.
pub fn list(scenarios: &[(String, String)]) -> Result<Vec<String>, RunError> {
    let parsed = parse_all(scenarios)?;
    Ok(parsed
        .iter()
        .zip(scenarios)
        .map(|(s, (_, text))| {
            let about = text
                .lines()
                .find_map(|l| l.trim().strip_prefix('#').map(str::trim))
                .unwrap_or("");
            format!("{:<28} {:<44} seed {:<6} {}", s.name, s.file, s.seed, about)
        })
        .collect())
}

fn run_once(
    scenario: &Scenario,
    seed: u64,
    trace: Option<usize>,
    progress: bool,
) -> Result<(RunReport, u64), RunError> {
    let started = std::time::Instant::now(); // deterministic: reported only, never enters a run
    let mut world =
        World::new(scenario.clone(), seed).map_err(|e| RunError::Scenario(e.to_string()))?;
    if let Some(lines) = trace {
        world.keep_event_log(lines);
    }
    if progress {
        let name = scenario.name.clone();
        let duration = scenario.duration.as_secs_f64();
        world.report_progress(crate::world::PROGRESS_EVENTS, move |now_us, events| {
            // Deterministic: the wall time is printed only, it never enters the run.
            eprintln!(
                "{name} seed {seed}: {:.1} of {duration:.0} simulated seconds, {events} events, {:.1} s of wall time",
                now_us as f64 / 1e6,
                started.elapsed().as_secs_f64(),
            );
        });
    }
    let report = world.run();
    Ok((report, started.elapsed().as_millis() as u64))
}

/// With `check`, runs the scenario again with the same seed: whether the trace repeated, and
/// the report line if it did not.
fn check_again(
    scenario: &Scenario,
    seed: u64,
    report: &RunReport,
    check: bool,
) -> Result<(Option<bool>, Option<String>), RunError> {
    if !check {
        return Ok((None, None));
    }
    let (again, _) = run_once(scenario, seed, None, false)?;
    let same = again.trace_hash == report.trace_hash && again.events == report.events;
    let text = (!same).then(|| {
        format!(
            "NONDETERMINISTIC: trace {} ({} events) then {} ({} events)",
            report.trace_hash, report.events, again.trace_hash, again.events
        )
    });
    Ok((Some(same), text))
}

/// Runs every scenario for every requested seed and writes reports.
pub fn run_all(
    scenarios: &[(String, String)],
    options: &Options,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Summary, RunError> {
    let mut parsed = parse_all(scenarios)?;
    if let Some(bug) = options.plant {
        for s in &mut parsed {
            s.planted = Some(bug);
        }
    }
    // Refuse scenarios this build cannot run before running any.
    for s in &parsed {
        World::new(s.clone(), s.seed).map_err(|e| RunError::Scenario(e.to_string()))?;
    }
    let mut summary = Summary::default();
    let total: u64 = parsed.len() as u64 * options.seeds.map_or(1, |(a, b)| b - a + 1);
    let mut done = 0;
    for s in &parsed {
        let (first, last) = options.seeds.unwrap_or((s.seed, s.seed));
        for seed in first..=last {
            let (report, wall_ms) = run_once(s, seed, options.trace, options.progress)?;
            let (deterministic, outcome_text) =
                check_again(s, seed, &report, options.check_determinism)?;
            let passed = report.outcome == Outcome::Passed && deterministic != Some(false);
            if passed {
                summary.passed += 1;
            } else {
                summary.failed += 1;
            }
            done += 1;
            write_report(
                out,
                err,
                &report,
                wall_ms,
                deterministic,
                outcome_text.as_deref(),
                options.json,
            )
            .map_err(|e| RunError::Scenario(format!("cannot write output: {e}")))?;
            if options.sweep {
                let _ = writeln!(
                    err,
                    "[{done}/{total}] {} seed {seed}: {}",
                    s.name,
                    if passed { "ok" } else { "FAILED" }
                );
            }
        }
    }
    if !options.json {
        let _ = writeln!(
            out,
            "sim: {} passed, {} failed",
            summary.passed, summary.failed
        );
    }
    Ok(summary)
}

fn write_report(
    out: &mut dyn Write,
    err: &mut dyn Write,
    r: &RunReport,
    wall_ms: u64,
    deterministic: Option<bool>,
    nondeterminism: Option<&str>,
    json: bool,
) -> std::io::Result<()> {
    let (result, violation) = match &r.outcome {
        Outcome::Passed if nondeterminism.is_some() => ("nondeterministic", None),
        Outcome::Passed => ("pass", None),
        Outcome::Safety(v) => ("safety_violation", Some(v)),
        Outcome::Liveness(v) => ("liveness_violation", Some(v)),
    };
    let replay = format!("cargo sim {} --seed {}", r.file, r.seed);
    if json {
        let line = JsonRun {
            scenario: &r.scenario,
            file: &r.file,
            seed: r.seed,
            trace_hash: &r.trace_hash,
            events: r.events,
            sim_time_ms: r.sim_time_ms,
            wall_ms,
            events_per_s: (r.events * 1000)
                .checked_div(wall_ms)
                .unwrap_or(r.events * 1000),
            recovery_ms: r.recovery_ms,
            result,
            violated_invariant: violation.map(|v| v.invariant.name()),
            detail: violation.map(|v| v.detail.as_str()).or(nondeterminism),
            deterministic,
            offered: r.offered,
            accepted: r.app.accepted,
            delivered: r.app.delivered,
            expired: r.app.expired,
            lost_by_disk: r.app.lost_by_disk,
            told_lost: r.app.told_lost,
            frames_sent: r.net.sent,
            frames_lost: r.net.lost,
            frames_duplicated: r.net.duplicated,
            frames_reordered: r.net.reordered,
            connections: r.net.connections,
            lost_uncommitted: r.lost_uncommitted,
            commits_applied: r.app.commits_applied,
            joins: r.app.joins,
            removals: r.app.removals,
            undecryptable: r.app.undecryptable,
            faults: &r.faults,
            spanning_relayed: r.spanning.map(|s| s.relayed),
            spanning_fanned_out: r.spanning.map(|s| s.fanned_out),
            spanning_relays_limited: r.spanning.map(|s| s.relays_limited),
            spanning_welcomes_abroad: r.spanning.map(|s| s.welcomes_sent),
            spanning_commits_relayed: r.spanning.map(|s| s.commits_relayed),
            spanning_removals_abroad: r.spanning.map(|s| s.removals_sent),
            handovers_asked: r.handovers.as_ref().map(|h| h.asked),
            handovers_done: r.handovers.as_ref().map(|h| h.done),
            handovers_declined: r.handovers.as_ref().map(|h| h.declined),
            handover_frozen_max_ms: r
                .handovers
                .as_ref()
                .and_then(|h| h.frozen_max_us)
                .map(|us| us as f64 / 1000.0),
            handover_frozen_median_ms: r
                .handovers
                .as_ref()
                .and_then(|h| h.frozen_median_us)
                .map(|us| us as f64 / 1000.0),
            crl_version: r.crl.as_ref().map(|c| c.version),
            crl_revoked: r.crl.as_ref().map(|c| c.revoked),
            crl_holders: r.crl.as_ref().map(|c| c.holders),
            crl_slowest_ms: r
                .crl
                .as_ref()
                .and_then(|c| c.slowest_us)
                .map(|us| us as f64 / 1000.0),
            crl_median_ms: r.crl.as_ref().map(|c| c.median_us as f64 / 1000.0),
            crl_p99_ms: r.crl.as_ref().map(|c| c.p99_us as f64 / 1000.0),
            crl_peer_links: r.crl.as_ref().map(|c| c.peer_links).filter(|&n| n > 0),
            crl_peer_holding: r
                .crl
                .as_ref()
                .filter(|c| c.peer_links > 0)
                .map(|c| c.peer_holding),
            crl_peer_slowest_ms: r
                .crl
                .as_ref()
                .and_then(|c| c.peer_slowest_us.filter(|_| c.peer_links > 0))
                .map(|us| us as f64 / 1000.0),
            files_sent: r.files.as_ref().map(|f| f.sent),
            files_completed: r.files.as_ref().map(|f| f.completed),
            files_chunks_up: r.files.as_ref().map(|f| f.chunks_up),
            files_bytes_up: r.files.as_ref().map(|f| f.bytes_up),
            files_chunks_down: r.files.as_ref().map(|f| f.chunks_down),
            files_bytes_down: r.files.as_ref().map(|f| f.bytes_down),
            files_bytes_completed: r.files.as_ref().map(|f| f.bytes_completed),
            drains: r
                .drains
                .iter()
                .map(|d| JsonDrain {
                    gateway: &d.gateway,
                    sessions: d.sessions,
                    stopped_after_ms: d.stopped_after_us.map(|us| us as f64 / 1000.0),
                    refused: d.refused,
                    reconnected: d.reconnected,
                    reconnect_p50_ms: d.reconnect_p50_us as f64 / 1000.0,
                    reconnect_p99_ms: d.reconnect_p99_us as f64 / 1000.0,
                    reconnect_max_ms: d.reconnect_max_us as f64 / 1000.0,
                    peak_per_100ms: d.peak_per_100ms,
                    timed_out: d.timed_out,
                })
                .collect(),
        };
        writeln!(
            out,
            "{}",
            serde_json::to_string(&line).expect("report serialises")
        )?;
    } else {
        let status = match result {
            "pass" => "ok  ",
            _ => "FAIL",
        };
        writeln!(
            out,
            "{status} {:<28} seed {:<6} trace {} events {:>10} sim {:>8.1}s wall {:>7.2}s delivered {} accepted {}{}{}{}{}{}{}{}{}",
            r.scenario,
            r.seed,
            r.trace_hash,
            r.events,
            r.sim_time_ms as f64 / 1000.0,
            wall_ms as f64 / 1000.0,
            r.app.delivered,
            r.app.accepted,
            if r.app.joins + r.app.commits_applied > 0 {
                format!(
                    " mls commits-applied {} joins {} removals {}",
                    r.app.commits_applied, r.app.joins, r.app.removals
                )
            } else {
                String::new()
            },
            match &r.crl {
                Some(c) => format!(
                    " crl v{} revoked {} held-by {}/{}{} (p50 {:.1}ms p99 {:.1}ms) peer-refused {}{}",
                    c.version,
                    c.revoked,
                    c.holders,
                    c.devices,
                    c.slowest_us
                        .map(|us| format!(" in {:.1}ms", us as f64 / 1000.0))
                        .unwrap_or_default(),
                    c.median_us as f64 / 1000.0,
                    c.p99_us as f64 / 1000.0,
                    c.handshakes_refused,
                    if c.peer_links > 0 {
                        format!(
                            " peer-gateways {}/{}{}",
                            c.peer_holding,
                            c.peer_links,
                            c.peer_slowest_us
                                .map(|us| format!(" in {:.1}ms", us as f64 / 1000.0))
                                .unwrap_or_default()
                        )
                    } else {
                        String::new()
                    }
                ),
                None => String::new(),
            },
            match &r.files {
                Some(f) => format!(
                    " files sent {} completed {} chunks up {} down {} ({:.1} of {:.1} MB)",
                    f.sent,
                    f.completed,
                    f.chunks_up,
                    f.chunks_down,
                    f.bytes_down as f64 / 1e6,
                    f.bytes_completed as f64 / 1e6
                ),
                None => String::new(),
            },
            r.drains
                .iter()
                .map(|d| format!(
                    " drain {} {} sessions stopped {}{} back {}/{} p50 {:.2}s p99 {:.2}s peak {}/100ms",
                    d.gateway,
                    d.sessions,
                    d.stopped_after_us
                        .map_or("never".to_string(), |us| format!("{:.1}ms", us as f64 / 1000.0)),
                    if d.timed_out { " (timed out)" } else { "" },
                    d.reconnected,
                    d.sessions,
                    d.reconnect_p50_us as f64 / 1e6,
                    d.reconnect_p99_us as f64 / 1e6,
                    d.peak_per_100ms
                ))
                .collect::<String>(),
            r.spanning
                .map(|s| {
                    let limited = if s.relays_past_hint > 0 {
                        format!(
                            " peer-limited {} past-hint {}",
                            s.relays_limited, s.relays_past_hint
                        )
                    } else if s.relays_limited > 0 {
                        format!(" peer-limited {}", s.relays_limited)
                    } else {
                        String::new()
                    };
                    let mls = if s.welcomes_sent + s.commits_relayed + s.removals_sent > 0 {
                        format!(
                            " welcomes-abroad {} commits-relayed {} removals-abroad {}",
                            s.welcomes_sent, s.commits_relayed, s.removals_sent
                        )
                    } else {
                        String::new()
                    };
                    format!(
                        " spanning relayed {} fanned-out {}{mls}{limited}",
                        s.relayed, s.fanned_out
                    )
                })
                .unwrap_or_default(),
            r.handovers
                .as_ref()
                .map(|h| format!(
                    " handovers {}/{}{}{}",
                    h.done,
                    h.asked,
                    h.frozen_max_us
                        .map(|us| format!(" frozen max {:.1}ms", us as f64 / 1000.0))
                        .unwrap_or_default(),
                    if h.declined + h.skipped + h.refused > 0 {
                        format!(
                            " (declined {} refused {} skipped {})",
                            h.declined, h.refused, h.skipped
                        )
                    } else {
                        String::new()
                    }
                ))
                .unwrap_or_default(),
            r.recovery_ms
                .map(|ms| format!(" recovered {:.1}s", ms as f64 / 1000.0))
                .unwrap_or_default(),
            if deterministic == Some(true) { " (deterministic)" } else { "" },
        )?;
    }
    if let Some(v) = violation {
        let phase = if matches!(r.outcome, Outcome::Liveness(_)) {
            "liveness"
        } else {
            "safety"
        };
        writeln!(
            err,
            "FAILED {} seed {}: {phase} invariant `{}` violated at t={:.6}s: {}",
            r.file,
            r.seed,
            v.invariant.name(),
            v.at_us as f64 / 1e6,
            v.detail
        )?;
        writeln!(err, "  replay: {replay}")?;
    }
    if !r.event_log.is_empty() {
        let upto = if violation.is_some() {
            "up to the failure"
        } else {
            "of the run"
        };
        writeln!(
            err,
            "  the last {} events {upto} (--trace):",
            r.event_log.len()
        )?;
        for line in &r.event_log {
            writeln!(err, "    {line}")?;
        }
    }
    if let Some(text) = nondeterminism {
        writeln!(err, "FAILED {} seed {}: {text}", r.file, r.seed)?;
        writeln!(err, "  replay: {replay} --check-determinism")?;
    }
    Ok(())
}

/// What `cargo sim --swarm` was asked for.
#[derive(Clone, Debug)]
pub struct SwarmOptions {
    /// How many seeds.
    pub count: u64,
    /// The first seed; the swarm runs `first_seed .. first_seed + count`.
    pub first_seed: u64,
    /// The family the seeds draw from.
    pub family: Family,
    /// Start no seed after this much wall time (the seeds not started are reported).
    pub time_budget: Option<std::time::Duration>,
    /// Where a failing seed's scenario is said to be written (the command writes it there).
    pub out_dir: String,
    /// One JSON object per run on stdout.
    pub json: bool,
    /// Run each seed twice and compare trace hashes.
    pub check_determinism: bool,
    /// As [`Options::trace`].
    pub trace: Option<usize>,
    /// As [`Options::plant`]: written into each drawn scenario as `plant NAME`.
    pub plant: Option<PlantedBug>,
    /// Keep every seed's scenario, passing or not (`--keep`), to read or rerun a world that
    /// passed but looks odd (a slow recovery, say).
    pub keep: bool,
}

/// What a swarm covered and found.
#[derive(Clone, Debug, Default)]
pub struct SwarmSummary {
    /// Runs passed and failed.
    pub summary: Summary,
    /// The scenarios of the failing seeds, for the command to write out.
    pub failures: Vec<(String, Generated)>,
    /// Passing seeds' scenarios to write as well (with [`SwarmOptions::keep`]).
    pub kept: Vec<(String, Generated)>,
    /// Seeds run per family.
    pub families: BTreeMap<&'static str, u64>,
    /// Seeds that switched each fault kind on.
    pub kinds: BTreeMap<&'static str, u64>,
    /// Distinct fault mixes (sets of kinds switched on).
    pub mixes: BTreeSet<BTreeSet<&'static str>>,
    /// Events processed by every run.
    pub events: u64,
    /// Seeds not started because the time budget ran out.
    pub skipped: u64,
    /// Each passing seed's recovery time after heal, milliseconds, with its seed.
    pub recoveries: Vec<(u64, u64)>,
}

/// Runs a swarm: each seed draws its own scenario ([`crate::swarm`]) and runs it.
pub fn run_swarm(
    options: &SwarmOptions,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<SwarmSummary, RunError> {
    let started = std::time::Instant::now(); // deterministic: the time budget only decides which seeds start
    let mut s = SwarmSummary::default();
    let last = options.first_seed.saturating_add(options.count);
    for (done, seed) in (options.first_seed..last).enumerate() {
        if options
            .time_budget
            .is_some_and(|budget| started.elapsed() >= budget)
        {
            s.skipped = last - seed;
            break;
        }
        let mut generated = swarm::generate(seed, options.family);
        if let Some(bug) = options.plant {
            generated.text.push_str(&format!("plant {bug}\n"));
        }
        let file = format!("{}/{}.sund", options.out_dir, generated.name());
        let scenario = scenario::parse(&file, &generated.text).map_err(|e| {
            RunError::Scenario(format!(
                "the swarm generator drew a scenario that does not parse ({e}):\n{}",
                generated.text
            ))
        })?;
        let (report, wall_ms) = run_once(&scenario, seed, options.trace, false)?;
        let (deterministic, nondeterminism) =
            check_again(&scenario, seed, &report, options.check_determinism)?;
        let passed = report.outcome == Outcome::Passed && deterministic != Some(false);
        s.events += report.events;
        if let Some(ms) = report.recovery_ms {
            s.recoveries.push((ms, seed));
        }
        *s.families.entry(generated.family.name()).or_default() += 1;
        for kind in &generated.mix {
            *s.kinds.entry(kind).or_default() += 1;
        }
        s.mixes.insert(generated.mix.clone());
        write_report(
            out,
            err,
            &report,
            wall_ms,
            deterministic,
            nondeterminism.as_deref(),
            options.json,
        )
        .map_err(|e| RunError::Scenario(format!("cannot write output: {e}")))?;
        let mix: Vec<&str> = generated.mix.iter().copied().collect();
        let _ = writeln!(
            err,
            "[{}/{}] swarm seed {seed} ({}: {}): {}",
            done + 1,
            options.count,
            generated.family.name(),
            if mix.is_empty() {
                "no faults".to_string()
            } else {
                mix.join(" ")
            },
            if passed { "ok" } else { "FAILED" }
        );
        if passed {
            s.summary.passed += 1;
            if options.keep {
                s.kept.push((file, generated));
            }
        } else {
            s.summary.failed += 1;
            s.failures.push((file, generated));
        }
    }
    if !options.json {
        let families: Vec<String> = s.families.iter().map(|(f, n)| format!("{f} {n}")).collect();
        let kinds: Vec<String> = swarm::FAULT_KINDS
            .iter()
            .map(|k| format!("{k} {}", s.kinds.get(k).copied().unwrap_or(0)))
            .collect();
        let _ = writeln!(
            out,
            "swarm: {} seeds ({}), {} distinct fault mixes, {} events{}",
            s.summary.passed + s.summary.failed,
            families.join(", "),
            s.mixes.len(),
            s.events,
            if s.skipped > 0 {
                format!(", {} seeds not started (time budget)", s.skipped)
            } else {
                String::new()
            }
        );
        let _ = writeln!(out, "swarm: seeds per fault kind: {}", kinds.join(", "));
        let mut recoveries = s.recoveries.clone();
        recoveries.sort_unstable();
        if let Some(&(slowest, seed)) = recoveries.last() {
            let at = |q: f64| recoveries[((recoveries.len() - 1) as f64 * q) as usize].0;
            let _ = writeln!(
                out,
                "swarm: recovery after heal: p50 {} ms, p90 {} ms, p99 {} ms, slowest {slowest} ms (seed {seed})",
                at(0.5),
                at(0.9),
                at(0.99)
            );
        }
        let _ = writeln!(
            out,
            "sim: {} passed, {} failed",
            s.summary.passed, s.summary.failed
        );
    }
    Ok(s)
}
