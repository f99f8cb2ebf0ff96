//! Replays the committed fuzz corpora of the wire targets (`corpus/frame_decode`,
//! `corpus/payload_decode`, `corpus/stream_decode`) and the trust targets
//! (`corpus/certificate_decode`, `corpus/crl_decode`, `corpus/peer_roots_decode`) and the file manifest
//! (`corpus/manifest_decode`), the contact records and rosters (`corpus/roster_decode`), the federation handshake
//! (`corpus/federation_handshake`) and link entries (`corpus/federation_entry_decode`) with the same checks the fuzz targets run:
//! no panic, every frame or payload that decodes survives encode → decode unchanged, and every
//! certificate or CRL that decodes re-encodes to exactly its input.
//!
//! The checks live in `fuzz/checks/wire.rs` and `fuzz/checks/trust.rs` and are spliced in here
//! and into the fuzz targets, so the two cannot drift apart. To grow the corpora, see
//! `fuzz/README.md`.

include!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../fuzz/checks/wire.rs"
));
include!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../fuzz/checks/trust.rs"
));

include!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../fuzz/checks/files.rs"
));

include!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../fuzz/checks/contacts.rs"
));

include!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../fuzz/checks/federation.rs"
));

include!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../fuzz/checks/replay.rs"
));

#[test]
fn federation_entry_decode_corpus() {
    replay("federation_entry_decode", check_federation_entry_decode);
}

#[test]
fn federation_handshake_corpus() {
    replay("federation_handshake", check_federation_handshake);
}

#[test]
fn contact_records_decode_corpus() {
    replay("contact_records_decode", check_contact_records_decode);
}

#[test]
fn roster_decode_corpus() {
    replay("roster_decode", check_roster_decode);
}

#[test]
fn frame_decode_corpus() {
    replay("frame_decode", check_frame_decode);
}

#[test]
fn payload_decode_corpus() {
    replay("payload_decode", check_payload_decode);
}

#[test]
fn stream_decode_corpus() {
    replay("stream_decode", check_stream_decode);
}

#[test]
fn certificate_decode_corpus() {
    replay("certificate_decode", check_certificate_decode);
}

#[test]
fn crl_decode_corpus() {
    replay("crl_decode", check_crl_decode);
}

#[test]
fn peer_roots_decode_corpus() {
    replay("peer_roots_decode", check_peer_roots_decode);
}

#[test]
fn pairing_code_parse_corpus() {
    replay("pairing_code_parse", check_pairing_code_parse);
}

#[test]
fn manifest_decode_corpus() {
    replay("manifest_decode", check_manifest_decode);
}
