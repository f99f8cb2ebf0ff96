//! Replays the committed fuzz corpus of the backup readers (`corpus/backup_decode`) with the
//! checks its fuzz target runs (`fuzz/checks/backup.rs`): no panic, no name that leaves its
//! directory, and whatever decodes whole survives being written again.

include!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../fuzz/checks/backup.rs"
));

include!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../fuzz/checks/replay.rs"
));

#[test]
fn backup_decode_corpus() {
    replay("backup_decode", check_backup_decode);
}

/// Writes the seeds of `corpus/backup_decode`: archives, and archives sealed as the fuzz target
/// reads them (`cargo test -p sund-runtime --test corpus_replay -- --ignored`).
#[test]
#[ignore = "writes the seed corpus"]
fn write_backup_seeds() {
    use std::io::Write;
    use sund_runtime::archive::ArchiveWriter;
    use sund_runtime::sealed::{SealWriter, HEADER_LEN};
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../corpus/backup_decode");
    std::fs::create_dir_all(&dir).unwrap();
    let archive = |rows: usize, big: usize| {
        let mut w = ArchiveWriter::start(Vec::new(), "sund-device").unwrap();
        w.file("backup.toml", b"user = \"alice\"\n").unwrap();
        w.file("contacts", b"bob\ncarol\n").unwrap();
        for i in 0..rows {
            w.row("file_chunk_bytes", &[i as u8; 32], &vec![i as u8; big])
                .unwrap();
        }
        w.finish().unwrap()
    };
    let header = backup_fuzz_header();
    for (name, plain) in [
        ("archive-empty", archive(0, 0)),
        ("archive-rows", archive(3, 40)),
        ("archive-segments", archive(2, 70_000)),
    ] {
        std::fs::write(dir.join(name), &plain).unwrap();
        let mut sealed = SealWriter::new(
            Vec::new(),
            BACKUP_FUZZ_PASSPHRASE,
            header.kdf,
            header.salt,
            header.nonce_prefix,
        )
        .unwrap();
        sealed.write_all(&plain).unwrap();
        let sealed = sealed.finish().unwrap();
        std::fs::write(
            dir.join(format!("sealed-header-{name}")),
            &sealed[..HEADER_LEN],
        )
        .unwrap();
        std::fs::write(dir.join(format!("sealed-{name}")), &sealed[HEADER_LEN..]).unwrap();
    }
}
