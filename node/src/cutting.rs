//! The manifest of a file on disk, for a device about to send it.
//!
//! A sender learns a file's chunks before it uploads them: the manifest names every chunk's
//! length and plaintext hash, and the gateway is asked which of those chunks it lacks. The
//! chunks are sealed later, one at a time, as the gateway takes them; this pass only cuts and
//! hashes, on two threads.

use std::path::Path;

use sund_model::files::{
    stream_chunker, ContentHash, FileName, FileSecret, Manifest, ManifestBuilder,
};

/// Chunks cut and not yet hashed, at most: the cutter runs this far ahead of the hasher (at
/// most [`CHUNK_BYTES_MAX`](sund_model::files::CHUNK_BYTES_MAX) bytes each, about a MiB on average).
const CUT_AHEAD: usize = 4;

/// The manifest of the file at `path`: one thread reads and cuts it while another hashes the
/// chunks already cut, so that the two halves of the work share the machine's cores. Memory
/// stays bounded by [`CUT_AHEAD`] chunks. `progress` hears the bytes hashed so far.
pub fn cut_and_hash(
    path: &Path,
    name: FileName,
    secret: FileSecret,
    mut progress: impl FnMut(u64),
) -> Result<Manifest, String> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let (chunks, cut) = std::sync::mpsc::sync_channel::<bytes::Bytes>(CUT_AHEAD);
    let gear = &secret;
    std::thread::scope(|scope| {
        let cutter = scope.spawn(move || {
            for chunk in stream_chunker(gear, file) {
                let chunk = chunk.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                if chunks.send(chunk).is_err() {
                    break; // the hasher refused a chunk and stopped
                }
            }
            Ok::<_, String>(())
        });
        let mut builder = ManifestBuilder::new(name, secret.clone());
        let mut done = 0u64;
        let mut noted = Ok(());
        for plain in cut {
            noted = builder.push_hashed(plain.len(), ContentHash::of(&plain));
            if noted.is_err() {
                break; // dropping `cut` stops the cutter
            }
            done += plain.len() as u64;
            progress(done);
        }
        let read = cutter.join().expect("the cutter does not panic");
        read?;
        noted.map_err(|e| e.to_string())?;
        Ok(builder.finish())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sund_model::files::seal_file;
    use sund_model::identity::DeviceKey;
    use sund_model::ids::ConversationId;
    use sund_model::testing::noise;

    fn secret() -> FileSecret {
        FileSecret::for_conversation(
            &DeviceKey::from_seed([3; 32]),
            ConversationId::from_name("cutting"),
        )
    }

    #[test]
    fn the_two_thread_pass_gives_the_manifest_sealing_in_memory_gives() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.pdf");
        let data = noise(7 << 20, 3);
        std::fs::write(&path, &data).unwrap();
        let name = FileName::new("report.pdf").unwrap();
        let mut heard = Vec::new();
        let manifest =
            cut_and_hash(&path, name.clone(), secret(), |done| heard.push(done)).unwrap();
        let (expected, _) = seal_file(name, secret(), &data).unwrap();
        assert!(
            expected.chunks.len() > 2,
            "the test file cuts into several chunks"
        );
        assert_eq!(manifest, expected);
        // Progress rises with each chunk and ends at the file's size.
        assert_eq!(heard.len(), expected.chunks.len());
        assert!(heard.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(heard.last().copied(), Some(data.len() as u64));
    }

    #[test]
    fn a_file_that_cannot_be_read_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone.bin");
        let error =
            cut_and_hash(&path, FileName::new("gone.bin").unwrap(), secret(), |_| {}).unwrap_err();
        assert!(
            error.starts_with("cannot read ") && error.contains("gone.bin"),
            "{error}"
        );
    }

    #[test]
    fn an_empty_file_has_an_empty_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty");
        std::fs::write(&path, b"").unwrap();
        let manifest =
            cut_and_hash(&path, FileName::new("empty").unwrap(), secret(), |_| {}).unwrap();
        assert_eq!((manifest.size, manifest.chunks.len()), (0, 0));
    }
}
