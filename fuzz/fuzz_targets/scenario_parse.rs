//! `scenario_parse`: scenario files are hand-written and shared, so the DSL parser must turn any
//! text (here lossy UTF-8 of arbitrary bytes) into a scenario or a located error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sund_sim::fuzzing::run_scenario_parse(data));
