// Checks for the `backup_decode` fuzz target, shared by `fuzz/fuzz_targets/backup_decode.rs`
// and `runtime/tests/corpus_replay.rs` through `include!`, so the committed corpus is replayed
// by `cargo test` with exactly the checks the fuzzer ran. Plain (non-doc) comments only: this
// file is spliced into other files. It names the runtime crate by path only.
//
// A backup file comes from wherever the user keeps it: its header, its sealed segments and the
// entries inside must never panic their readers, allocate what a length only claims, or yield a
// name that leaves the directory it is restored into. The sealed layer is driven with a fixed
// header of the cheapest settings and a key derived once from a fixed passphrase, so that its
// segment logic sees arbitrary bytes, and seeds sealed under that passphrase open.

/// The passphrase the fuzz target's sealed seeds are written under.
#[allow(dead_code)]
pub const BACKUP_FUZZ_PASSPHRASE: &str = "fuzzing passphrase";

/// The header the fuzz target reads segments under: the cheapest settings a reader accepts.
#[allow(dead_code)]
pub fn backup_fuzz_header() -> sund_runtime::sealed::Header {
    sund_runtime::sealed::Header {
        kdf: sund_runtime::sealed::KdfParams {
            memory_kib: 8,
            passes: 1,
            lanes: 1,
        },
        salt: [0; 16],
        nonce_prefix: [0; 7],
        key_check: [0; 16],
    }
}

/// `backup_decode`: arbitrary bytes as a sealed header, as sealed segments under a fixed key,
/// and as the entries of a device backup.
#[allow(dead_code)]
pub fn check_backup_decode(data: &[u8]) {
    use std::io::Read;
    use sund_runtime::sealed::{Header, SealReader, HEADER_LEN};

    if let Ok(header) = Header::decode(data) {
        assert!(header.kdf.check().is_ok(), "a decoded header has bounded settings");
        assert_eq!(&header.encode()[..], &data[..HEADER_LEN], "header round trip");
    }
    static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(|| *backup_fuzz_header().derive_key(BACKUP_FUZZ_PASSPHRASE));
    let header = backup_fuzz_header().with_key_check(key);
    if let Ok(mut reader) = SealReader::with_key(data, &header, key) {
        let mut plain = Vec::new();
        if reader.read_to_end(&mut plain).is_ok() {
            check_backup_entries(&plain);
        }
    }
    check_backup_entries(data);
}

/// The entries of a device backup: never a panic or a name that leaves its directory, and a
/// whole archive survives being written again.
#[allow(dead_code)]
pub fn check_backup_entries(data: &[u8]) {
    use sund_runtime::archive::{is_plain_name, ArchiveReader, ArchiveWriter, Entry};
    let Ok(mut entries) = ArchiveReader::open(data, "sund-device") else {
        return;
    };
    let mut read = Vec::new();
    loop {
        match entries.next_entry() {
            Ok(Some(entry)) => {
                if let Entry::File { name, .. } = &entry {
                    assert!(is_plain_name(name), "a file name that leaves its directory");
                }
                read.push(entry);
            }
            Ok(None) => break,
            Err(e) => {
                assert!(!e.to_string().is_empty(), "a refusal must say why");
                return;
            }
        }
    }
    // A whole archive survives being written again.
    let mut writer = ArchiveWriter::start(Vec::new(), "sund-device").expect("to memory");
    for entry in &read {
        match entry {
            Entry::File { name, bytes } => writer.file(name, bytes).expect("to memory"),
            Entry::Row { table, key, value } => writer.row(table, key, value).expect("to memory"),
        }
    }
    let again = writer.finish().expect("to memory");
    let mut reread = ArchiveReader::open(&again[..], "sund-device").expect("written just now");
    for entry in &read {
        assert_eq!(reread.next_entry().expect("written just now").as_ref(), Some(entry));
    }
    assert!(matches!(reread.next_entry(), Ok(None)));
}
