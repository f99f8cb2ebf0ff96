//! Replays the committed fuzz corpora of the wire targets (`corpus/frame_decode`,
//! `corpus/payload_decode`, `corpus/stream_decode`) and the trust targets
//! (`corpus/certificate_decode`, `corpus/crl_decode`) with the same checks the fuzz targets run:
//! no panic, every frame or payload that decodes survives encode → decode unchanged, and every
//! certificate or CRL that decodes re-encodes to exactly its input.
//!
//! The checks live in `fuzz/checks/wire.rs` and `fuzz/checks/trust.rs` and are spliced in here
//! and into the fuzz targets, so the two cannot drift apart. To grow the corpora, see
//! `fuzz/README.md`.

use std::fs;
use std::path::PathBuf;

include!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../fuzz/checks/wire.rs"
));
include!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../fuzz/checks/trust.rs"
));

/// Runs `check` on every file of `corpus/<target>`, which must not be empty.
fn replay(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../corpus")
        .join(target);
    let mut paths: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read corpus {}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus dir entry").path())
        .filter(|path| path.is_file())
        .collect();
    paths.sort();
    assert!(
        !paths.is_empty(),
        "corpus {} is empty: the replay would prove nothing",
        dir.display()
    );
    for path in &paths {
        let data = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let result = std::panic::catch_unwind(|| check(&data));
        if let Err(panic) = result {
            eprintln!("corpus input {} failed", path.display());
            std::panic::resume_unwind(panic);
        }
    }
    println!("{target}: replayed {} corpus inputs", paths.len());
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
fn pairing_code_parse_corpus() {
    replay("pairing_code_parse", check_pairing_code_parse);
}
