// Checks for the `admin_request_decode` fuzz target, shared by
// `fuzz/fuzz_targets/admin_request_decode.rs` and `gateway/tests/corpus_replay.rs` through
// `include!`, so the committed corpus is replayed by `cargo test` with exactly the checks the
// fuzzer ran. Plain (non-doc) comments only: this file is spliced into other files. It names the
// gateway crate by path only (`sund_gateway::...`).
//
// A request on the running gateway's control socket comes from a local process: decoding must
// never panic, whatever decodes must survive encode → decode unchanged, and checking it (before
// anything changes) must never panic either.

/// `admin_request_decode`: arbitrary bytes to `control::decode_request`, then
/// `AdminRequest::command`.
#[allow(dead_code)]
pub fn check_admin_request_decode(data: &[u8]) {
    use sund_gateway::control::decode_request;
    match decode_request(data) {
        Ok(request) => {
            let again = serde_json::to_vec(&request).expect("a request encodes");
            assert_eq!(
                decode_request(&again).as_ref(),
                Ok(&request),
                "a request does not survive encode → decode"
            );
            match request.command() {
                Ok(_) => {
                    let _ = (request.verb(), request.subject(), request.writes());
                }
                Err(why) => assert!(!why.is_empty(), "a refusal must say why"),
            }
        }
        Err(why) => assert!(!why.is_empty(), "a refusal must say why"),
    }
}
