//! `cargo sim --drivers`: scenario files on the production drivers under turmoil.
//!
//! Exit codes as `cargo sim`: 0 every run passed (scenarios the drivers cannot express are
//! listed as skipped, with the reasons); 1 an invariant failed or a determinism check saw two
//! different traces; 2 bad usage or a bad scenario file, or a file given by name that the
//! drivers cannot run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use sund_model::planted::PlantedBug;
use sund_sim::runner::{self, collect_files, RunError};
use sund_sim::scenario::{self, Scenario};
use sund_sim::swarm::{generate, Family};
use sund_sim_drivers::plan::plan;
use sund_sim_drivers::run::{result_word, run, HandoverCounts, RunReport};

const USAGE: &str = "\
usage: cargo sim --drivers [SCENARIO...] [--seed N] [--check-determinism] [--json] [--plant BUG]
       cargo sim --drivers --swarm N [--first-seed S] [--family plain|mixed] [--check-determinism]

Runs scenario files (default: every *.sund file in scenarios/) on the production gateway and
node drivers (tokio, quinn, rustls, redb) inside turmoil's simulated network and clock, with the
simulator's invariant checker. A scenario the drivers cannot express (MLS groups, revocations,
a slow disk, clock drift, bandwidth limits, more than 32 devices) is skipped with its reasons;
naming such a file is an error. Gateways that federate link over real QUIC, and `handover`
goes to the conversation's authority as `sund-gateway admin handover` does.

  SCENARIO              a scenario file or a directory of them
  --seed N              run with seed N instead of the scenario's `seed` line
  --check-determinism   run each scenario twice and fail if the trace hashes differ (every
                        datagram and every application event, byte for byte)
  --json                print one JSON object per run on stdout
  --swarm N             N seeds of the model layer's swarm generator (default family plain):
                        each seed's world runs here if the drivers can express it; a failing
                        seed's scenario is written to target/swarm-drivers/
  --first-seed S        the swarm's first seed (default 1)
  --family NAME         what the swarm draws (plain, mls, trust, mixed)
  --plant BUG           plant a known gateway bug through the gateway driver's configuration,
                        to show this layer finds it: gateway-ack-before-commit, dedup-forgets,
                        resume-off-by-one
  -h, --help            this text

Exit status: 0 all passed, 1 an invariant failed, 2 bad usage or a bad scenario file.";

struct Options {
    seed: Option<u64>,
    swarm: Option<u64>,
    first_seed: u64,
    family: Family,
    plant: Option<PlantedBug>,
    check_determinism: bool,
    json: bool,
}

fn main() -> ExitCode {
    runner::exit_code(real_main(), USAGE)
}

fn real_main() -> Result<ExitCode, RunError> {
    // The drivers' own log lines, for a failing seed: `SUND_LOG=debug cargo sim --drivers …`.
    if let Ok(filter) = std::env::var("SUND_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_timer(SimulatedTime)
            .with_writer(std::io::stderr)
            .init();
    }
    let mut options = Options {
        seed: None,
        swarm: None,
        first_seed: 1,
        family: Family::Plain,
        plant: None,
        check_determinism: false,
        json: false,
    };
    let mut paths = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(ExitCode::SUCCESS);
            }
            "--drivers" => {} // as forwarded by `cargo sim --drivers`
            "--seed" => options.seed = Some(runner::whole_number("--seed", args.next())?),
            "--check-determinism" => options.check_determinism = true,
            "--json" => options.json = true,
            "--swarm" => options.swarm = Some(runner::whole_number("--swarm", args.next())?),
            "--first-seed" => {
                options.first_seed = runner::whole_number("--first-seed", args.next())?;
            }
            "--family" => options.family = runner::family(args.next())?,
            "--plant" => options.plant = Some(runner::planted_bug(args.next())?),
            flag if flag.starts_with('-') => {
                return Err(RunError::Usage(format!(
                    "`{flag}` is not an option of the driver layer (it takes --seed, --check-determinism, --json, --plant, --swarm, --first-seed, --family)"
                )))
            }
            path => paths.push(PathBuf::from(path)),
        }
    }
    if let Some(count) = options.swarm {
        if !paths.is_empty() || options.seed.is_some() {
            return Err(RunError::Usage(
                "--swarm draws its own scenarios: give no scenario files or --seed (use --first-seed)".into(),
            ));
        }
        return run_swarm(count, &options);
    }
    let named = !paths.is_empty();
    if paths.is_empty() {
        paths.push(runner::default_scenarios_dir());
    }
    let named_files = named && paths.iter().all(|p| p.is_file());
    let files = collect_files(&paths)?;
    let mut failed = false;
    let mut ran = 0;
    for file in files {
        let shown = file.display().to_string();
        let text =
            std::fs::read_to_string(&file) // deterministic: read before its run starts
                .map_err(|e| RunError::Scenario(format!("cannot read {shown}: {e}")))?;
        let mut scenario =
            scenario::parse(&shown, &text).map_err(|e| RunError::Scenario(e.to_string()))?;
        if options.plant.is_some() {
            scenario.planted = options.plant;
        }
        let planned = match plan(&scenario) {
            Ok(planned) => planned,
            Err(reasons) if named_files => {
                return Err(RunError::Scenario(format!(
                    "{shown} cannot run on the drivers:\n  - {}",
                    reasons.join("\n  - ")
                )))
            }
            Err(reasons) => {
                eprintln!("skip {}: {}", scenario.name, reasons.join("; "));
                continue;
            }
        };
        for note in &planned.approximations {
            eprintln!("note {}: {note}", scenario.name);
        }
        let seed = options.seed.unwrap_or(scenario.seed);
        let started = Instant::now(); // deterministic: wall time for the report only
        let report = run(&scenario, planned.clone(), seed).map_err(RunError::Scenario)?;
        let wall = started.elapsed();
        ran += 1;
        let deterministic = if options.check_determinism {
            let again = run(&scenario, planned, seed).map_err(RunError::Scenario)?;
            Some(again.trace_hash == report.trace_hash)
        } else {
            None
        };
        failed |= report.violation.is_some() || deterministic == Some(false);
        print_report(
            &scenario,
            &shown,
            seed,
            &report,
            wall,
            deterministic,
            &options,
        );
    }
    if ran == 0 {
        eprintln!("no scenario here can run on the drivers (see the skip lines)");
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Where a failing swarm seed's scenario is written.
const SWARM_DIR: &str = "target/swarm-drivers";

/// `--swarm N`: the model layer's swarm generator draws each seed's world; the seeds whose
/// worlds the drivers can express run here (the others are counted, with the first reason).
fn run_swarm(count: u64, options: &Options) -> Result<ExitCode, RunError> {
    let mut passed = 0u64;
    let mut failed = 0u64;
    let mut skipped: std::collections::BTreeMap<String, u64> = Default::default();
    let mut skipped_seeds = 0u64;
    for seed in options.first_seed..options.first_seed.saturating_add(count) {
        let generated = generate(seed, options.family);
        let name = generated.name();
        let file = format!("{SWARM_DIR}/{name}.sund");
        let mut scenario = scenario::parse(&file, &generated.text)
            .map_err(|e| RunError::Scenario(format!("the swarm drew a bad scenario: {e}")))?;
        if options.plant.is_some() {
            scenario.planted = options.plant;
        }
        let planned = match plan(&scenario) {
            Ok(planned) => planned,
            Err(reasons) => {
                // Counted by kind: "line 23: `fill-disk` needs …" counts as "`fill-disk` needs …".
                for reason in reasons
                    .iter()
                    .map(|r| {
                        let kind = r.strip_prefix("line ").map_or(r.as_str(), |rest| {
                            rest.split_once(": ").map_or(rest, |(_, kind)| kind)
                        });
                        kind.to_string()
                    })
                    .collect::<std::collections::BTreeSet<_>>()
                {
                    *skipped.entry(reason).or_default() += 1;
                }
                skipped_seeds += 1;
                continue;
            }
        };
        let started = Instant::now(); // deterministic: wall time for the report only
        let report = run(&scenario, planned.clone(), seed).map_err(RunError::Scenario)?;
        let wall = started.elapsed();
        let deterministic = if options.check_determinism {
            let again = run(&scenario, planned, seed).map_err(RunError::Scenario)?;
            Some(again.trace_hash == report.trace_hash)
        } else {
            None
        };
        if report.violation.is_some() || deterministic == Some(false) {
            failed += 1;
            // deterministic: written after the run, for the user to replay
            std::fs::create_dir_all(SWARM_DIR)
                .and_then(|_| std::fs::write(&file, &generated.text))
                .map_err(|e| RunError::Scenario(format!("cannot write {file}: {e}")))?;
        } else {
            passed += 1;
        }
        print_report(
            &scenario,
            &file,
            seed,
            &report,
            wall,
            deterministic,
            options,
        );
    }
    println!(
        "swarm: {passed} passed, {failed} failed, {skipped_seeds} drawn worlds the drivers cannot express"
    );
    for (reason, n) in &skipped {
        println!("  {n:>5} seeds need: {reason}");
    }
    Ok(if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_report(
    scenario: &Scenario,
    file: &str,
    seed: u64,
    report: &RunReport,
    wall: std::time::Duration,
    deterministic: Option<bool>,
    options: &Options,
) {
    let replay = format!("cargo sim --drivers {file} --seed {seed}");
    if options.json {
        let (invariant, detail) = match &report.violation {
            Some(v) => (Some(v.invariant.name()), Some(v.detail.clone())),
            None => (None, None),
        };
        let result = if deterministic == Some(false) {
            "nondeterministic"
        } else {
            result_word(report)
        };
        let json = serde_json::json!({
            "layer": "drivers",
            "scenario": scenario.name,
            "file": file,
            "seed": seed,
            "trace_hash": report.short_hash(),
            "packet_hash": report.packets.short_hash(),
            "datagrams": report.packets.datagrams,
            "datagram_bytes": report.packets.bytes,
            "datagrams_lost": report.packets.lost,
            "sim_time_ms": report.sim_time.as_millis() as u64,
            "wall_ms": wall.as_millis() as u64,
            "recovery_ms": report.recovery.map(|r| r.as_millis() as u64),
            "result": result,
            "violated_invariant": invariant,
            "detail": detail,
            "deterministic": deterministic,
            "offered": report.offered,
            "accepted": report.accepted,
            "delivered": report.delivered,
            "replayed": report.replayed,
            "refused": report.refused,
            "reconnects": report.reconnects,
            "restarts": report.restarts,
            "handovers": {
                "asked": report.handovers.asked,
                "skipped": report.handovers.skipped,
                "started": report.handovers.started,
                "refused": report.handovers.refused,
            },
        });
        println!("{json}");
        return;
    }
    match &report.violation {
        None if deterministic == Some(false) => {
            println!(
                "FAILED {file} seed {seed}: two runs gave different traces (first {})\n  replay: {replay} --check-determinism",
                report.short_hash()
            );
        }
        None => println!(
            "ok {} seed {seed} trace {} datagrams {} ({} lost) sim {:.1}s wall {:.1}s offered {} delivered {} (replayed {}) restarts {}{} recovery {}{}",
            scenario.name,
            report.short_hash(),
            report.packets.datagrams,
            report.packets.lost,
            report.sim_time.as_secs_f64(),
            wall.as_secs_f64(),
            report.offered,
            report.delivered,
            report.replayed,
            report.restarts,
            handovers(&report.handovers),
            report
                .recovery
                .map_or("-".to_string(), |r| format!("{}ms", r.as_millis())),
            if deterministic == Some(true) {
                " deterministic"
            } else {
                ""
            },
        ),
        Some(v) => {
            let phase = match v.phase {
                sund_sim::checker::Phase::Safety => "safety",
                sund_sim::checker::Phase::Liveness => "liveness",
            };
            println!(
                "FAILED {file} seed {seed}: {phase} invariant `{}` violated at t={:.6}s: {}\n  replay: {replay}",
                v.invariant.name(),
                v.at_us as f64 / 1e6,
                v.detail
            );
        }
    }
}

/// The `handover` actions of a run, for its `ok` line (empty if it had none).
fn handovers(h: &HandoverCounts) -> String {
    if h.asked + h.skipped == 0 {
        return String::new();
    }
    format!(
        " handovers {} asked ({} begun, {} refused) {} skipped",
        h.asked, h.started, h.refused, h.skipped
    )
}

/// Log lines stamped with turmoil's simulated time (the wall clock says nothing of a run).
struct SimulatedTime;

impl tracing_subscriber::fmt::time::FormatTime for SimulatedTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        match turmoil::sim_elapsed() {
            Some(t) => write!(w, "{:>10.6}s", t.as_secs_f64()),
            None => write!(w, "{:>11}", "-"),
        }
    }
}
