//! Replays the committed fuzz corpora `corpus/scenario_parse` and `corpus/gateway_inputs` through
//! `sund_sim::fuzzing`, the very harnesses the `scenario_parse` and `gateway_inputs` fuzz targets
//! call: the parser must not panic, and the gateway must keep its invariants (frames it sends
//! decode, heads never go back, recovery from the committed disk matches the live state).

include!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../fuzz/checks/replay.rs"
));

#[test]
fn scenario_parse_corpus() {
    replay("scenario_parse", sund_sim::fuzzing::run_scenario_parse);
}

#[test]
fn gateway_inputs_corpus() {
    replay("gateway_inputs", sund_sim::fuzzing::run_gateway_ops);
}
