//! `cargo sim`: runs scenario files through the deterministic simulator.
//!
//! Exit codes: 0 every run passed; 1 an invariant failed (or a determinism check found two
//! different traces); 2 bad usage or a bad scenario file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use sund_sim::runner::{self, Options, RunError, SwarmOptions};
use sund_sim::scenario::parse_duration;
use sund_sim::swarm::Family;

/// mimalloc instead of the system allocator: a large room's run spent a fifth of its time in
/// glibc's `malloc` and `free` (benches/README.md). Allocation addresses never enter a run,
/// so the trace hash is the same with either.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process. Where the kernel gives them to every
/// mapping (`always`), mimalloc's large reserved regions were backed by 2 MiB pages, and the
/// kernel spent a tenth of a large room's run clearing them: more than mimalloc saved.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

const USAGE: &str = "\
usage: cargo sim [SCENARIO...] [--seed N | --seeds A..B] [--check-determinism] [--json] [--trace N] [--progress] [--list]
       cargo sim SCENARIO [--seed N] --shrink
       cargo sim --drivers [SCENARIO...] [--seed N] [--check-determinism] [--json] [--plant BUG]
       cargo sim --swarm N [--family NAME] [--first-seed S] [--time-budget T] [--check-determinism] [--json]
       cargo sim --hunt-planted

Runs scenario files (default: every *.sund file in scenarios/) in the deterministic simulator.
With --swarm, each seed draws its own scenario (topology, workload, fault mix and rates).

  SCENARIO              a scenario file or a directory of them
  --seed N              run with seed N instead of the scenario's `seed` line
  --seeds A..B          run every seed from A to B inclusive (a sweep), with a progress line
  --check-determinism   run each (scenario, seed) twice and fail if the trace hashes differ
  --json                print one JSON object per run on stdout
  --plant BUG           plant a known protocol bug in every gateway and device, to show
                        that runs find it: gateway-ack-before-commit, dedup-forgets,
                        node-ack-before-durable, resume-off-by-one, send-limit-ignored,
                        presence-ignores-invisible, invitation-limit-ignored,
                        handover-keeps-sequencing, peer-crl-ignored, peer-limit-ignored,
                        blocks-ignored
  --trace N             print each run's last N events in words, under its failure if it fails (frames with
                        their opcode, conversation and seq; commits; faults; application events)
  --progress            print on stderr how far each run got (virtual time, events, wall
                        time) every 16,777,216 events: a sign of life from long runs
  --list                list the scenarios and exit
  --shrink              reduce a failing scenario (one file, its seed or --seed) to a smaller
                        one that breaks the same invariant; written to target/shrunk/
  --swarm N             run N swarm seeds; a failing seed's scenario is written to
                        target/swarm/swarm-SEED.sund and its replay command printed
  --family NAME         what the swarm draws: plain, mls, trust or mixed (default mixed)
  --first-seed S        the swarm's first seed (default 1)
  --time-budget T       start no swarm seed after T of wall time (e.g. 10m)
  --keep                write every swarm seed's scenario to target/swarm/, passing or not
  --hunt-planted        for each bug --plant knows: a swarm from seed 1 until a seed finds
                        it, then the shrinker; fails unless every bug is found and shrunk to
                        a few lines that break the same invariant, and pass without the bug
  --drivers             run the scenarios on the production gateway and node drivers (tokio,
                        quinn, rustls, redb) under turmoil instead, bit for bit from the seed;
                        see `cargo sim --drivers --help`
  -h, --help            this text

Exit status: 0 all passed, 1 an invariant failed, 2 bad usage or a bad scenario file.";

fn main() -> ExitCode {
    no_transparent_huge_pages();
    if std::env::args().any(|a| a == "--drivers") {
        return run_drivers();
    }
    on_one_thread(|| runner::exit_code(real_main(), USAGE))
}

/// Stack of the thread the simulator runs on (as much as a main thread's, and more).
const STACK_BYTES: usize = 64 << 20;

/// Runs `run` as the only thread of a rayon pool. openmls encrypts and decrypts tree paths
/// with rayon's parallel iterators: called from outside any pool, they hand the work to a
/// global pool of one thread per core, whose threads then spin waiting for more (a thirtieth
/// of a large room's run, and the other core taken from whatever else runs there). Inside a
/// one-thread pool they run inline, on the simulation's own thread.
fn on_one_thread<R: Send>(run: impl FnOnce() -> R + Send) -> R {
    match rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .stack_size(STACK_BYTES)
        .thread_name(|_| "sund-sim".into())
        .build()
    {
        Ok(pool) => pool.install(run),
        Err(_) => run(),
    }
}

fn real_main() -> Result<ExitCode, RunError> {
    let mut options = Options::default();
    let mut paths: Vec<PathBuf> = Vec::new();
    let mut list = false;
    let mut shrink = false;
    let mut keep = false;
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
                let seed = runner::whole_number("--seed", args.next())?;
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
            "--progress" => options.progress = true,
            "--plant" => options.plant = Some(runner::planted_bug(args.next())?),
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
            "--shrink" => shrink = true,
            "--hunt-planted" => return Ok(hunt_planted()),
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
                    plant: None,
                    keep: false,
                });
            }
            "--keep" => keep = true,
            "--family" => family = runner::family(args.next())?,
            "--first-seed" => first_seed = runner::whole_number("--first-seed", args.next())?,
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
        swarm.plant = options.plant;
        swarm.keep = keep;
        return run_swarm(&swarm);
    }
    if keep {
        return Err(RunError::Usage(
            "--keep writes swarm seeds' scenarios: use it with --swarm".into(),
        ));
    }
    if shrink {
        return run_shrink(&paths, &options);
    }
    if paths.is_empty() {
        paths.push(runner::default_scenarios_dir());
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

/// Most runs one shrink may spend.
const SHRINK_RUNS_MAX: u64 = 3_000;

/// `--hunt-planted`: every planted bug found by a swarm and shrunk (see
/// `sund_sim::planted_hunt`), one line each.
fn hunt_planted() -> ExitCode {
    let mut failed = 0;
    for &(name, bug) in sund_model::planted::PlantedBug::ALL {
        match sund_sim::planted_hunt::hunt(name, bug) {
            Ok(found) => println!("{found}"),
            Err(why) => {
                failed += 1;
                println!("FAIL {why}");
            }
        }
    }
    let total = sund_model::planted::PlantedBug::ALL.len();
    println!("planted: {} passed, {failed} failed", total - failed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn run_shrink(paths: &[PathBuf], options: &Options) -> Result<ExitCode, RunError> {
    let [path] = paths else {
        return Err(RunError::Usage(
            "--shrink takes exactly one scenario file".into(),
        ));
    };
    if options.seeds.is_some_and(|(a, b)| a != b) {
        return Err(RunError::Usage(
            "--shrink takes one seed (--seed N), not a range".into(),
        ));
    }
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path) // deterministic: read before any run starts
        .map_err(|e| RunError::Scenario(format!("cannot read {file}: {e}")))?;
    let mut text = text;
    if let Some(bug) = options.plant {
        text.push_str(&format!("plant {bug}\n"));
    }
    let scenario =
        sund_sim::scenario::parse(&file, &text).map_err(|e| RunError::Scenario(e.to_string()))?;
    let seed = options.seeds.map_or(scenario.seed, |(a, _)| a);
    eprintln!("shrinking {file} with seed {seed} (at most {SHRINK_RUNS_MAX} runs)");
    let shrunk =
        sund_sim::shrink::shrink(&file, &text, seed, SHRINK_RUNS_MAX, &mut |left, runs| {
            eprintln!("  {left} statements still fail ({runs} runs)");
        });
    let shrunk = match shrunk {
        Ok(s) => s,
        Err(sund_sim::shrink::ShrinkError::Passes { file, seed }) => {
            eprintln!("{file} with seed {seed} passes: there is no failure to shrink");
            return Ok(ExitCode::from(2));
        }
        Err(e) => return Err(RunError::Scenario(e.to_string())),
    };
    let stem = path
        .file_stem()
        .map_or("scenario".into(), |s| s.to_string_lossy().into_owned());
    let out = format!("{SHRUNK_DIR}/{stem}-shrunk.sund");
    let written = std::fs::create_dir_all(SHRUNK_DIR) // deterministic: after the runs, for replay
        .and_then(|()| std::fs::write(&out, &shrunk.text)); // deterministic: never read by a run
    print!("{}", shrunk.text);
    match written {
        Ok(()) => println!(
            "shrunk: `{}` still fails with {} of {} statements ({} runs{}); written to {out}\n  replay: cargo sim {out}",
            shrunk.invariant.name(),
            shrunk.statements_after,
            shrunk.statements_before,
            shrunk.runs,
            if shrunk.budget_spent { ", budget spent" } else { "" }
        ),
        Err(e) => println!("shrunk, but cannot write {out}: {e}"),
    }
    Ok(ExitCode::from(1))
}

/// Where a shrunk scenario is written.
const SHRUNK_DIR: &str = "target/shrunk";

/// Where a failing swarm seed's scenario is written.
const SWARM_DIR: &str = "target/swarm";

fn run_swarm(options: &SwarmOptions) -> Result<ExitCode, RunError> {
    let result = runner::run_swarm(options, &mut std::io::stdout(), &mut std::io::stderr())?;
    for (file, generated) in result.kept.iter().chain(&result.failures) {
        let written = std::fs::create_dir_all(&options.out_dir) // deterministic: after the runs
            .and_then(|()| std::fs::write(file, &generated.text)); // deterministic: never read by a run
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
/// `--drivers`: the driver layer is its own binary (it links the production drivers, which
/// the model simulator must not), built and run by cargo with the same arguments.
fn run_drivers() -> ExitCode {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()); // deterministic: before any run
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let status = std::process::Command::new(cargo) // deterministic: a separate process, before any run here
        .args(["run", "--release", "--quiet", "--manifest-path"])
        .arg(&manifest)
        .args(["-p", "sund-sim-drivers", "--bin", "sund-sim-drivers", "--"])
        .args(std::env::args().skip(1).filter(|a| a != "--drivers"))
        .status();
    match status {
        Ok(status) => match status.code() {
            Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            None => ExitCode::from(1),
        },
        Err(e) => {
            eprintln!("error: cannot start cargo to build and run the driver layer: {e}");
            ExitCode::from(2)
        }
    }
}
