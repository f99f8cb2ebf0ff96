//! `cargo sim`: runs scenario files through the deterministic simulator.
//!
//! Exit codes: 0 every run passed; 1 an invariant failed (or a determinism check found two
//! different traces); 2 bad usage or a bad scenario file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use sund_sim::runner::{self, Options, RunError, SwarmOptions};
use sund_sim::scenario::parse_duration;
use sund_sim::swarm::Family;

const USAGE: &str = "\
usage: cargo sim [SCENARIO...] [--seed N | --seeds A..B] [--check-determinism] [--json] [--trace N] [--list]
       cargo sim --swarm N [--family NAME] [--first-seed S] [--time-budget T] [--check-determinism] [--json]

Runs scenario files (default: every *.sund file in scenarios/) in the deterministic simulator.
With --swarm, each seed draws its own scenario (topology, workload, fault mix and rates).

  SCENARIO              a scenario file or a directory of them
  --seed N              run with seed N instead of the scenario's `seed` line
  --seeds A..B          run every seed from A to B inclusive (a sweep), with a progress line
  --check-determinism   run each (scenario, seed) twice and fail if the trace hashes differ
  --json                print one JSON object per run on stdout
  --trace N             for a failing run, print its last N events in words (frames with
                        their opcode, conversation and seq; commits; faults; application events)
  --list                list the scenarios and exit
  --swarm N             run N swarm seeds; a failing seed's scenario is written to
                        target/swarm/swarm-SEED.sund and its replay command printed
  --family NAME         what the swarm draws: plain, mls, trust or mixed (default mixed)
  --first-seed S        the swarm's first seed (default 1)
  --time-budget T       start no swarm seed after T of wall time (e.g. 10m)
  -h, --help            this text

Exit status: 0 all passed, 1 an invariant failed, 2 bad usage or a bad scenario file.";

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(RunError::Usage(message)) => {
            eprintln!("error: {message}\n\n{USAGE}");
            ExitCode::from(2)
        }
        Err(RunError::Scenario(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> Result<ExitCode, RunError> {
    let mut options = Options::default();
    let mut paths: Vec<PathBuf> = Vec::new();
    let mut list = false;
    let mut swarm: Option<SwarmOptions> = None;
    let mut family = Family::Mixed;
    let mut first_seed = 1;
    let mut time_budget = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(ExitCode::SUCCESS);
            }
            "--seed" => {
                let value = args
                    .next()
                    .ok_or_else(|| RunError::Usage("--seed needs a number".into()))?;
                let seed = value.parse().map_err(|_| {
                    RunError::Usage(format!("--seed needs a whole number, got `{value}`"))
                })?;
                options.seeds = Some((seed, seed));
            }
            "--seeds" => {
                let value = args
                    .next()
                    .ok_or_else(|| RunError::Usage("--seeds needs a range like 1..100".into()))?;
                options.seeds = Some(runner::parse_seed_range(&value)?);
                options.sweep = true;
            }
            "--check-determinism" => options.check_determinism = true,
            "--json" => options.json = true,
            "--trace" => {
                let value = args.next().ok_or_else(|| {
                    RunError::Usage("--trace needs a number of events to show".into())
                })?;
                let lines: usize = value.parse().map_err(|_| {
                    RunError::Usage(format!("--trace needs a whole number, got `{value}`"))
                })?;
                options.trace = Some(lines);
            }
            "--list" => list = true,
            "--swarm" => {
                let value = args
                    .next()
                    .ok_or_else(|| RunError::Usage("--swarm needs a number of seeds".into()))?;
                let count = value.parse().map_err(|_| {
                    RunError::Usage(format!("--swarm needs a whole number, got `{value}`"))
                })?;
                swarm = Some(SwarmOptions {
                    count,
                    first_seed: 1,
                    family: Family::Mixed,
                    time_budget: None,
                    out_dir: SWARM_DIR.into(),
                    json: false,
                    check_determinism: false,
                    trace: None,
                });
            }
            "--family" => {
                let value = args
                    .next()
                    .ok_or_else(|| RunError::Usage("--family needs a name".into()))?;
                family = Family::parse(&value).ok_or_else(|| {
                    RunError::Usage(format!(
                        "unknown family `{value}`: use plain, mls, trust or mixed"
                    ))
                })?;
            }
            "--first-seed" => {
                let value = args
                    .next()
                    .ok_or_else(|| RunError::Usage("--first-seed needs a number".into()))?;
                first_seed = value.parse().map_err(|_| {
                    RunError::Usage(format!("--first-seed needs a whole number, got `{value}`"))
                })?;
            }
            "--time-budget" => {
                let value = args
                    .next()
                    .ok_or_else(|| RunError::Usage("--time-budget needs a time like 10m".into()))?;
                time_budget = Some(parse_duration(&value).ok_or_else(|| {
                    RunError::Usage(format!(
                        "--time-budget needs a time like 10m, got `{value}`"
                    ))
                })?);
            }
            flag if flag.starts_with('-') => {
                return Err(RunError::Usage(format!("unknown option `{flag}`")))
            }
            path => paths.push(PathBuf::from(path)),
        }
    }
    if let Some(mut swarm) = swarm {
        if !paths.is_empty() || options.seeds.is_some() || list {
            return Err(RunError::Usage(
                "--swarm draws its own scenarios: give no scenario files, --seed(s) or --list (use --first-seed)".into(),
            ));
        }
        swarm.family = family;
        swarm.first_seed = first_seed;
        swarm.time_budget = time_budget;
        swarm.json = options.json;
        swarm.check_determinism = options.check_determinism;
        swarm.trace = options.trace;
        return run_swarm(&swarm);
    }
    if paths.is_empty() {
        paths.push(default_scenarios_dir());
    }
    let files = runner::collect_files(&paths)?;
    let scenarios = files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f) // deterministic: read before any run starts
                .map_err(|e| RunError::Scenario(format!("cannot read {}: {e}", f.display())))?;
            Ok((f.display().to_string(), text))
        })
        .collect::<Result<Vec<_>, RunError>>()?;
    if list {
        for line in runner::list(&scenarios)? {
            println!("{line}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let summary = runner::run_all(
        &scenarios,
        &options,
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    )?;
    Ok(if summary.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Where a failing swarm seed's scenario is written.
const SWARM_DIR: &str = "target/swarm";

fn run_swarm(options: &SwarmOptions) -> Result<ExitCode, RunError> {
    let result = runner::run_swarm(options, &mut std::io::stdout(), &mut std::io::stderr())?;
    for (file, generated) in &result.failures {
        // deterministic: written after the runs, for replay; never read by a run
        let written = std::fs::create_dir_all(&options.out_dir)
            .and_then(|()| std::fs::write(file, &generated.text));
        match written {
            Ok(()) => eprintln!("swarm seed {}: scenario written to {file}", generated.seed),
            Err(e) => eprintln!(
                "swarm seed {}: cannot write {file} ({e}); the scenario is:\n{}",
                generated.seed, generated.text
            ),
        }
    }
    Ok(if result.summary.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `scenarios/` under the current directory, else the one in the source tree.
fn default_scenarios_dir() -> PathBuf {
    let here = Path::new("scenarios");
    if here.is_dir() {
        return here.to_path_buf();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
}
