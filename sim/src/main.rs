//! `cargo sim`: runs scenario files through the deterministic simulator.
//!
//! Exit codes: 0 every run passed; 1 an invariant failed (or a determinism check found two
//! different traces); 2 bad usage or a bad scenario file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use sund_sim::runner::{self, Options, RunError};

const USAGE: &str = "\
usage: cargo sim [SCENARIO...] [--seed N | --seeds A..B] [--check-determinism] [--json] [--list]

Runs scenario files (default: every *.sund file in scenarios/) in the deterministic simulator.

  SCENARIO              a scenario file or a directory of them
  --seed N              run with seed N instead of the scenario's `seed` line
  --seeds A..B          run every seed from A to B inclusive (a sweep), with a progress line
  --check-determinism   run each (scenario, seed) twice and fail if the trace hashes differ
  --json                print one JSON object per run on stdout
  --list                list the scenarios and exit
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
            "--list" => list = true,
            flag if flag.starts_with('-') => {
                return Err(RunError::Usage(format!("unknown option `{flag}`")))
            }
            path => paths.push(PathBuf::from(path)),
        }
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

/// `scenarios/` under the current directory, else the one in the source tree.
fn default_scenarios_dir() -> PathBuf {
    let here = Path::new("scenarios");
    if here.is_dir() {
        return here.to_path_buf();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
}
