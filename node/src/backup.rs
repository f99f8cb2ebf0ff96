//! `sund backup` and `sund restore`: what a person would lose with a device, sealed under a
//! passphrase, and brought into a new device of the same user.
//!
//! What a backup holds: the user names the device knows (`contacts`), the users verified by
//! safety number (`verified`), the local names of DMs and rooms (`conversations`), and the files
//! the device received (their manifests, file keys included, and their plaintext chunks). All of
//! it is sealed ([`sund_runtime::sealed`]: Argon2id, ChaCha20-Poly1305) inside one file, so the
//! file says nothing without the passphrase, not even how many contacts it holds beyond its size.
//!
//! What it does not hold, on purpose: the device key, the MLS state, cursors, resume token and
//! outbox. A device restored with those would be a copy of the old one, which the gateway
//! refuses (its MLS state is behind, and using both would reuse encryption secrets). So a
//! restore goes into a *new* device of the same user, set up first as any new device is (`sund
//! pair accept` from another device, or `sund init --token` from the operator); that device
//! then joins DMs and rooms as new devices do, and the backup gives it back what only the old
//! device knew. The old device, if lost, should be revoked by the operator.
//!
//! A restore reads the backup twice with one key: the first pass checks every byte (a wrong
//! passphrase, a damaged or cut file, another user's backup) and changes nothing; the second
//! writes. Rows are keyed by what they hold, so running a restore again changes nothing twice.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sund_model::env::{scan_all, Entropy, Store, Table, WriteBatch};
use sund_model::files::{ContentHash, Manifest};
use sund_model::node::contact_book::ContactRecord;
use sund_model::node::files::{CHUNK_BYTES_TABLE, CHUNK_INDEX_TABLE, FILES_TABLE};
use sund_model::node::transfers::{OfferState, NODE_OFFERS_TABLE};
use sund_runtime::archive::{ArchiveReader, ArchiveWriter, Entry};
use sund_runtime::entropy::OsEntropy;
use sund_runtime::sealed::{Header, KdfParams, SealReader, SealWriter, HEADER_LEN};
use sund_runtime::store::RedbStore;

use crate::contact_files;
use crate::device::{conversation_names_in, Device};

/// The archive kind of a device backup.
const KIND: &str = "sund-device";
/// The first entry: who and what the backup is of.
const ABOUT: &str = "backup.toml";
/// The files of a data directory a backup carries.
const FILES: [&str; 3] = ["contacts", "verified", "conversations"];
/// The tables it carries: the files the device received whole (their offers and manifests),
/// and the chunks it holds.
const TABLES: [Table; 4] = [
    NODE_OFFERS_TABLE,
    FILES_TABLE,
    CHUNK_INDEX_TABLE,
    CHUNK_BYTES_TABLE,
];
/// Bytes of rows written per commit during a restore, so that memory stays bounded.
const RESTORE_BATCH_BYTES: usize = 32 << 20;

/// The first entry of a backup.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct About {
    /// The user the device belonged to.
    user: String,
    /// The device backed up, as `sund status` shows it.
    device: String,
    /// When, in seconds since 1970.
    written_unix: u64,
    /// The sund that wrote it.
    sund: String,
}

/// What a backup holds, counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contents {
    /// User names.
    pub names: usize,
    /// Verified users.
    pub verified: usize,
    /// Conversation names.
    pub conversations: usize,
    /// Files received.
    pub files: usize,
    /// Plaintext chunks of those files.
    pub chunks: usize,
    /// Bytes of those chunks.
    pub chunk_bytes: u64,
}

impl Contents {
    /// In words, for the user.
    pub fn words(&self) -> String {
        format!(
            "{} user name(s), {} verified user(s), {} conversation name(s), {} file(s) ({} chunk(s), {} bytes)",
            self.names, self.verified, self.conversations, self.files, self.chunks, self.chunk_bytes
        )
    }
}

/// What [`backup`] wrote.
#[derive(Clone, Debug)]
pub struct BackupDone {
    /// The user.
    pub user: String,
    /// What it holds.
    pub contents: Contents,
    /// Bytes of the backup file.
    pub bytes: u64,
}

/// What [`restore`] did.
#[derive(Clone, Debug)]
pub struct RestoreDone {
    /// The backup's device and when it was written.
    pub from_device: String,
    /// Seconds since 1970 when the backup was written.
    pub written_unix: u64,
    /// What the backup holds.
    pub contents: Contents,
    /// User names, verified users and conversation names that were new to this device.
    pub added_names: usize,
    /// See `added_names`.
    pub added_verified: usize,
    /// See `added_names`.
    pub added_conversations: usize,
    /// The backup is of this very device (restored into its own directory).
    pub same_device: bool,
}

fn open_store(data_dir: &Path) -> Result<RedbStore, String> {
    let path = data_dir.join("node.redb");
    RedbStore::open(&path)
        .and_then(|s| s.with_value_files(&data_dir.join("values"), &[CHUNK_BYTES_TABLE]))
        .map_err(|e| e.to_string())
}

/// Writes a backup of the device in `data_dir` to `dest` (a new file, owner-only), sealed
/// under `passphrase`. The device must not be running (its store is opened, so the copy is of
/// one moment).
pub fn backup(
    data_dir: &Path,
    dest: &Path,
    passphrase: &str,
    kdf: KdfParams,
) -> Result<BackupDone, String> {
    sund_runtime::sealed::check_passphrase(passphrase).map_err(|e| e.to_string())?;
    let device = Device::load(data_dir).map_err(|e| e.to_string())?;
    let user = device.user.as_ref().map(ToString::to_string).ok_or_else(|| {
        "this device was set up without a user (`sund init` without --user): a backup is restored into another device of the same user, so there is nothing to restore it into".to_string()
    })?;
    if dest.exists() {
        return Err(format!(
            "{} exists already: choose another name for the backup",
            dest.display()
        ));
    }
    let store = open_store(data_dir)?;
    // Written under a name of its own beside the destination, then linked to it (which,
    // unlike a rename, never replaces a file that appeared meanwhile): a backup that exists is
    // whole.
    let mut suffix = [0u8; 8];
    OsEntropy.fill_bytes(&mut suffix);
    let mut part = dest.as_os_str().to_owned();
    part.push(format!(".{}.part", sund_model::hex::encode(&suffix)));
    let part = PathBuf::from(part);
    let result = write_backup(&device, &user, &store, &part, passphrase, kdf);
    match result {
        Ok(contents) => {
            let bytes = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
            let linked = std::fs::hard_link(&part, dest);
            let _ = std::fs::remove_file(&part);
            linked.map_err(|e| format!("cannot name the backup {}: {e}", dest.display()))?;
            if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| format!("cannot sync {}: {e}", dir.display()))?;
            }
            Ok(BackupDone {
                user,
                contents,
                bytes,
            })
        }
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            Err(e)
        }
    }
}

fn write_backup(
    device: &Device,
    user: &str,
    store: &RedbStore,
    part: &Path,
    passphrase: &str,
    kdf: KdfParams,
) -> Result<Contents, String> {
    let failed = |e: std::io::Error| format!("cannot write {}: {e}", part.display());
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(part)
            .map_err(failed)?
    };
    let mut salt = [0u8; 16];
    let mut prefix = [0u8; 7];
    OsEntropy.fill_bytes(&mut salt);
    OsEntropy.fill_bytes(&mut prefix);
    let sealed = SealWriter::new(BufWriter::new(file), passphrase, kdf, salt, prefix)
        .map_err(|e| e.to_string())?;
    let mut archive = ArchiveWriter::start(sealed, KIND).map_err(failed)?;
    let about = About {
        user: user.to_string(),
        device: device.key.device_id().to_string(),
        written_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        sund: env!("CARGO_PKG_VERSION").to_string(),
    };
    let text = toml::to_string(&about).expect("about serialises");
    archive.file(ABOUT, text.as_bytes()).map_err(failed)?;
    let mut contents = Contents::default();
    for name in FILES {
        let path = device.data_dir.join(name);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        count_file(&mut contents, name, &bytes);
        archive.file(name, &bytes).map_err(failed)?;
    }
    // Only files received whole: one still arriving would be fetched again by a device that
    // is not (yet) a member of its conversation. Offers and manifests share their key
    // (conversation, digest); an offer's value ends with its state.
    let mut whole = std::collections::BTreeSet::new();
    scan_all(store, NODE_OFFERS_TABLE, |key, value| {
        if value.last() == Some(&(OfferState::Complete as u8)) {
            whole.insert(key.to_vec());
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    // Their chunks: (conversation, hash) for the index, the hash for the bytes.
    let mut indexed = std::collections::BTreeSet::new();
    let mut hashes = std::collections::BTreeSet::new();
    scan_all(store, FILES_TABLE, |key, value| {
        if whole.contains(key) {
            if let Ok(manifest) = Manifest::decode(value) {
                for chunk in &manifest.chunks {
                    indexed.insert([&key[..16], &chunk.hash.0[..]].concat());
                    hashes.insert(chunk.hash.0.to_vec());
                }
            }
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    for table in TABLES {
        let mut error = None;
        scan_all(store, table, |key, value| {
            let carried = if table == NODE_OFFERS_TABLE || table == FILES_TABLE {
                whole.contains(key)
            } else if table == CHUNK_INDEX_TABLE {
                indexed.contains(key)
            } else {
                hashes.contains(key)
            };
            if !carried {
                return Ok(());
            }
            count_row(&mut contents, table.0, value);
            if let Err(e) = archive.row(table.0, key, value) {
                error = Some(failed(e));
                return Err(sund_model::env::StoreError::Backend("write failed".into()));
            }
            Ok(())
        })
        .map_err(|e| error.take().unwrap_or_else(|| e.to_string()))?;
    }
    let sealed = archive.finish().map_err(failed)?;
    let file = sealed
        .finish()
        .map_err(failed)?
        .into_inner()
        .map_err(|e| failed(e.into_error()))?;
    file.sync_all().map_err(failed)?;
    Ok(contents)
}

fn count_file(contents: &mut Contents, name: &str, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    match name {
        "contacts" => contents.names = contact_files::addresses_in(&text).len(),
        "verified" => contents.verified = contact_files::verified_in(&text).len(),
        "conversations" => contents.conversations = conversation_names_in(&text).len(),
        _ => {}
    }
}

fn count_row(contents: &mut Contents, table: &str, value: &[u8]) {
    if table == FILES_TABLE.0 {
        contents.files += 1;
    } else if table == CHUNK_BYTES_TABLE.0 {
        contents.chunks += 1;
        contents.chunk_bytes += value.len() as u64;
    }
}

fn table_named(name: &str) -> Option<Table> {
    TABLES.into_iter().find(|t| t.0 == name)
}

/// Opens the backup at `file` with a key derived once, for each pass.
struct Opened {
    file: PathBuf,
    header: Header,
    key: zeroize::Zeroizing<[u8; 32]>,
}

impl Opened {
    fn new(file: &Path, passphrase: &str) -> Result<Opened, String> {
        let reader =
            File::open(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let mut header = Vec::with_capacity(HEADER_LEN);
        std::io::Read::read_to_end(
            &mut std::io::Read::take(reader, HEADER_LEN as u64),
            &mut header,
        )
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let header = if header.len() < HEADER_LEN {
            // Let the reader say whether it is cut short or not a backup at all.
            match SealReader::open(&header[..], passphrase) {
                Err(e) => return Err(format!("{}: {e}", file.display())),
                Ok(_) => unreachable!("a header shorter than its length does not open"),
            }
        } else {
            Header::decode(&header).map_err(|e| format!("{}: {e}", file.display()))?
        };
        let key = header.derive_key(passphrase);
        Ok(Opened {
            file: file.to_path_buf(),
            header,
            key,
        })
    }

    fn entries(&self) -> Result<ArchiveReader<SealReader<BufReader<File>>>, String> {
        let mut file = File::open(&self.file)
            .map_err(|e| format!("cannot read {}: {e}", self.file.display()))?;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(HEADER_LEN as u64))
            .map_err(|e| format!("cannot read {}: {e}", self.file.display()))?;
        let sealed = SealReader::with_key(BufReader::new(file), &self.header, &self.key)
            .map_err(|e| format!("{}: {e}", self.file.display()))?;
        ArchiveReader::open(sealed, KIND).map_err(|e| format!("{}: {e}", self.file.display()))
    }
}

/// What the checking pass learns of the rows, so that a restore writes only rows the device
/// will read back as its own recovery does (a row it cannot read would stop it from starting).
#[derive(Default)]
struct RowCheck {
    /// (conversation, digest) of each offer and of each manifest.
    offers: std::collections::BTreeSet<Vec<u8>>,
    manifests: std::collections::BTreeSet<Vec<u8>>,
}

impl RowCheck {
    /// Checks one row as the device's recovery reads it.
    fn check(&mut self, table: &str, key: &[u8], value: &[u8]) -> Result<(), String> {
        if table == NODE_OFFERS_TABLE.0 {
            // Key: conversation and digest; value: upload, sender, state (complete only).
            if key.len() != 48 || value.len() != 33 {
                return Err("a file offer of the wrong size".into());
            }
            if value[32] != OfferState::Complete as u8 {
                return Err("an offer of a file not received whole".into());
            }
            self.offers.insert(key.to_vec());
        } else if table == FILES_TABLE.0 {
            let manifest = Manifest::decode(value)
                .map_err(|e| format!("a file's manifest that does not decode ({e})"))?;
            if key.len() != 48 || manifest.digest().0[..] != key[16..] {
                return Err("a file's manifest under another file's key".into());
            }
            self.manifests.insert(key.to_vec());
        } else if table == CHUNK_INDEX_TABLE.0 && (key.len() != 48 || value.len() != 4) {
            return Err("a chunk index entry of the wrong size".into());
        } else if table == CHUNK_BYTES_TABLE.0
            && (key.len() != 32 || ContentHash::of(value).0[..] != key[..])
        {
            return Err("a file chunk whose bytes do not match their hash".into());
        }
        Ok(())
    }

    /// Offers and manifests go in pairs.
    fn check_whole(&self) -> Result<(), String> {
        if self.offers != self.manifests {
            return Err("files whose offer or manifest is missing".into());
        }
        Ok(())
    }
}

/// The backup's text files and what it holds, read in the checking pass.
struct Checked {
    about: About,
    files: BTreeMap<String, String>,
    contents: Contents,
}

fn check(opened: &Opened) -> Result<Checked, String> {
    let mut entries = opened.entries()?;
    let named = |e| format!("{}: {e}", opened.file.display());
    let malformed = |what: String| {
        format!(
            "{}: the backup's contents are malformed ({what}): it was not written by this sund, or it is damaged",
            opened.file.display()
        )
    };
    let about = match entries.next_entry().map_err(named)? {
        Some(Entry::File { name, bytes }) if name == ABOUT => {
            let text = String::from_utf8(bytes)
                .map_err(|_| malformed("its description is not UTF-8".into()))?;
            toml::from_str::<About>(&text)
                .map_err(|e| malformed(format!("its description: {e}")))?
        }
        _ => return Err(malformed("it does not start with its description".into())),
    };
    let mut files = BTreeMap::new();
    let mut contents = Contents::default();
    let mut rows = RowCheck::default();
    while let Some(entry) = entries.next_entry().map_err(named)? {
        match entry {
            Entry::File { name, bytes } => {
                if !FILES.contains(&name.as_str()) || files.contains_key(&name) {
                    return Err(malformed(format!(
                        "a file {name:?} a device backup does not carry"
                    )));
                }
                count_file(&mut contents, &name, &bytes);
                let text = String::from_utf8(bytes)
                    .map_err(|_| malformed(format!("file {name} is not UTF-8")))?;
                files.insert(name, text);
            }
            Entry::Row { table, key, value } => {
                if table_named(&table).is_none() {
                    return Err(malformed(format!(
                        "a row of table {table:?}, which a device backup does not carry"
                    )));
                }
                rows.check(&table, &key, &value).map_err(malformed)?;
                count_row(&mut contents, &table, &value);
            }
        }
    }
    rows.check_whole().map_err(malformed)?;
    Ok(Checked {
        about,
        files,
        contents,
    })
}

/// Restores the backup at `file` into the device set up in `data_dir` (a device of the same
/// user; it must not be running). Checks the whole backup before changing anything.
pub fn restore(data_dir: &Path, file: &Path, passphrase: &str) -> Result<RestoreDone, String> {
    let device = Device::load(data_dir).map_err(|e| {
        format!("{e}\nA backup is restored into a new device of the same user: set it up first (`sund pair accept CODE` with a code from another of your devices, or `sund init ... --user NAME --token TOKEN` with a token from the gateway's operator), then run `sund restore` again")
    })?;
    let opened = Opened::new(file, passphrase)?;
    let checked = check(&opened)?;
    let user = device
        .user
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    if checked.about.user != user {
        return Err(format!(
            "this backup is of user `{}`, and this device belongs to {}: restore it into a device set up for `{}`",
            checked.about.user,
            if user.is_empty() { "no user".to_string() } else { format!("`{user}`") },
            checked.about.user
        ));
    }
    // Rows first: a restore cut short by a full disk is run again, and writes the same keys.
    let mut store = open_store(data_dir)?;
    let mut entries = opened.entries()?;
    let mut batch = WriteBatch::default();
    let commit = |store: &mut RedbStore, batch: WriteBatch| {
        store.commit(batch).map_err(|e| {
            format!("{e}\nNothing is lost: run `sund restore` again once that is fixed (what was restored is kept and not written twice)")
        })
    };
    while let Some(entry) = entries
        .next_entry()
        .map_err(|e| format!("{}: {e}", file.display()))?
    {
        if let Entry::Row { table, key, value } = entry {
            let Some(table) = table_named(&table) else {
                // The file changed since the first pass read it.
                return Err(format!(
                    "{}: the backup changed while it was restored; nothing more was written, run `sund restore` again",
                    file.display()
                ));
            };
            batch.put(table, key, value);
            if batch.put_bytes() >= RESTORE_BATCH_BYTES {
                commit(&mut store, std::mem::take(&mut batch))?;
            }
        }
    }
    if !batch.is_empty() {
        commit(&mut store, batch)?;
    }
    drop(store);
    let text = |name: &str| checked.files.get(name).map(String::as_str).unwrap_or("");
    // Names and verified users this device does not know yet; what it knows wins.
    let known_names = contact_files::names(data_dir);
    let known_verified = contact_files::verified(data_dir);
    let mut records: Vec<ContactRecord> = contact_files::addresses_in(text("contacts"))
        .into_iter()
        .filter(|(user, _)| !known_names.contains_key(user))
        .map(|(user, address)| ContactRecord::Named {
            user,
            name: address.to_string(),
        })
        .filter(|r| r.check().is_ok())
        .collect();
    let added_names = records.len();
    let verified: Vec<ContactRecord> = contact_files::verified_in(text("verified"))
        .into_iter()
        .filter(|(user, _)| !known_verified.contains_key(user))
        .map(|(user, keys)| ContactRecord::Verified { user, keys })
        .filter(|r| r.check().is_ok())
        .collect();
    let added_verified = verified.len();
    records.extend(verified);
    contact_files::apply(data_dir, &records)
        .map_err(|(path, e)| format!("cannot write {}: {e}", path.display()))?;
    let mut names = device.conversation_names();
    let mut added_conversations = 0;
    for (id, name) in conversation_names_in(text("conversations")) {
        if names.contains_key(&id) || names.values().any(|n| *n == name) {
            continue;
        }
        names.insert(id, name);
        added_conversations += 1;
    }
    if added_conversations > 0 {
        device
            .set_conversation_names(&names)
            .map_err(|e| e.to_string())?;
    }
    Ok(RestoreDone {
        same_device: checked.about.device == device.key.device_id().to_string(),
        from_device: checked.about.device,
        written_unix: checked.about.written_unix,
        contents: checked.contents,
        added_names,
        added_verified,
        added_conversations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const PASS: &str = "correct horse battery staple";

    /// A sealed backup of `rows` (with its description first), checked as a restore would.
    fn checked(rows: &[(Table, Vec<u8>, Vec<u8>)]) -> Result<Checked, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.backup");
        let cheap = KdfParams {
            memory_kib: 8,
            passes: 1,
            lanes: 1,
        };
        let sealed = SealWriter::new(Vec::new(), PASS, cheap, [1; 16], [2; 7]).unwrap();
        let mut archive = ArchiveWriter::start(sealed, KIND).unwrap();
        let about = "user = \"alice\"\ndevice = \"dev:00\"\nwritten_unix = 1\nsund = \"0\"\n";
        archive.file(ABOUT, about.as_bytes()).unwrap();
        for (table, key, value) in rows {
            archive.row(table.0, key, value).unwrap();
        }
        let bytes = archive.finish().unwrap().finish().unwrap();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&bytes)
            .unwrap();
        check(&Opened::new(&path, PASS)?)
    }

    #[test]
    fn rows_the_device_could_not_read_back_are_refused_before_anything_is_written() {
        assert!(checked(&[]).is_ok());
        let offer = |state: u8| [vec![0; 32], vec![state]].concat();
        let refused = |rows: &[(Table, Vec<u8>, Vec<u8>)], why: &str| {
            let e = checked(rows).err().expect("refused");
            assert!(e.contains(why), "{e}");
        };
        refused(
            &[(FILES_TABLE, vec![0; 48], b"not a manifest".to_vec())],
            "manifest that does not decode",
        );
        refused(
            &[(
                NODE_OFFERS_TABLE,
                vec![0; 48],
                offer(OfferState::Complete as u8),
            )],
            "offer or manifest is missing",
        );
        refused(
            &[(
                NODE_OFFERS_TABLE,
                vec![0; 48],
                offer(OfferState::Fetching as u8),
            )],
            "not received whole",
        );
        refused(
            &[(CHUNK_BYTES_TABLE, vec![0; 32], b"bytes".to_vec())],
            "do not match their hash",
        );
        let bytes = b"a chunk".to_vec();
        assert!(checked(&[(CHUNK_BYTES_TABLE, ContentHash::of(&bytes).0.to_vec(), bytes)]).is_ok());
        refused(
            &[(CHUNK_INDEX_TABLE, vec![0; 47], vec![0; 4])],
            "index entry of the wrong size",
        );
    }
}
