//! `gateway_inputs`: the gateway is the one state machine that faces untrusted peers. This drives
//! it with arbitrary sequences of connections, raw and well-formed frames, admin commands and time
//! steps, committing every `Ready` to a simulated disk, and checks its invariants (every frame it
//! sends decodes, heads never go back, recovery from disk matches the live state). The
//! interpreter lives in `sund_sim::fuzzing` so `sim/tests/corpus_replay.rs` replays the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sund_sim::fuzzing::run_gateway_ops(data));
