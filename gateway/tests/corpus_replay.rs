//! Replays the committed fuzz corpus of the control socket's request decoder
//! (`corpus/admin_request_decode`) with the checks its fuzz target runs (`fuzz/checks/admin.rs`):
//! no panic, whatever decodes survives encode → decode, and checking it never panics.

include!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../fuzz/checks/admin.rs"
));

include!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../fuzz/checks/replay.rs"
));

#[test]
fn admin_request_decode_corpus() {
    replay("admin_request_decode", check_admin_request_decode);
}
