// Checks for the file fuzz targets, shared by `fuzz/fuzz_targets/manifest_decode.rs` and
// `model/tests/corpus_replay.rs` through `include!`, so the committed corpus is replayed by
// `cargo test` with exactly the checks the fuzzer ran. Plain (non-doc) comments only: this file is
// spliced into other files. It names the model crate by path only (`sund_model::...`).
//
// A manifest arrives from another member inside an MLS message, and its name becomes a path on
// the receiver's disk: decoding must never panic, whatever decodes must be canonical (a receipt
// signs its digest), its name must be one safe path component, and its chunks must add up to
// its size within the limits.

/// `manifest_decode`: arbitrary bytes to `Manifest::decode`.
#[allow(dead_code)]
pub fn check_manifest_decode(data: &[u8]) {
    use sund_model::files::{FileName, Manifest, CHUNKS_MAX, CHUNK_BYTES_MAX, FILE_BYTES_MAX};
    match Manifest::decode(data) {
        Ok(manifest) => {
            assert_eq!(
                manifest.encode(),
                data,
                "manifest encoding is not canonical: {manifest:?}"
            );
            let name = manifest.name.as_str();
            assert_eq!(
                FileName::new(name).as_ref().map(FileName::as_str),
                Ok(name),
                "an unsafe name decoded"
            );
            assert!(!name.contains(['/', '\\']) && name != "." && name != "..");
            assert!(manifest.size <= FILE_BYTES_MAX);
            assert!(manifest.chunks.len() <= CHUNKS_MAX);
            let sum: u64 = manifest.chunks.iter().map(|c| u64::from(c.len)).sum();
            assert_eq!(sum, manifest.size, "chunks do not add up to the size");
            assert!(manifest
                .chunks
                .iter()
                .all(|c| c.len >= 1 && c.len as usize <= CHUNK_BYTES_MAX));
            let _ = (manifest.id(), manifest.sealed_bytes());
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
}
