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
    let user = device.user.clone().ok_or_else(|| {
        "this device was set up without a user (`sund init` without --user): a backup is restored into another device of the same user, so there is nothing to restore it into".to_string()
    })?;
    if dest.exists() {
        return Err(format!(
            "{} exists already: choose another name for the backup",
            dest.display()
        ));
    }
    let store = open_store(data_dir)?;
    let mut part = dest.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    let _ = std::fs::remove_file(&part);
    let result = write_backup(&device, &user, &store, &part, passphrase, kdf);
    match result {
        Ok(contents) => {
            let bytes = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
            std::fs::rename(&part, dest)
                .map_err(|e| format!("cannot name the backup {}: {e}", dest.display()))?;
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
    for table in TABLES {
        let mut error = None;
        let keyed_by_file = table == NODE_OFFERS_TABLE || table == FILES_TABLE;
        scan_all(store, table, |key, value| {
            if keyed_by_file && !whole.contains(key) {
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
        "contacts" => contents.names = contact_files::names_in(&text).len(),
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
            Entry::Row { table, value, .. } => {
                if table_named(&table).is_none() {
                    return Err(malformed(format!(
                        "a row of table {table:?}, which a device backup does not carry"
                    )));
                }
                count_row(&mut contents, &table, &value);
            }
        }
    }
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
    let user = device.user.as_deref().unwrap_or("");
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
            let table = table_named(&table).expect("checked in the first pass");
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
    let mut records: Vec<ContactRecord> = contact_files::names_in(text("contacts"))
        .into_iter()
        .filter(|(user, _)| !known_names.contains_key(user))
        .map(|(user, name)| ContactRecord::Named { user, name })
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
    let known = device.conversation_names();
    let mut added_conversations = 0;
    for (id, name) in conversation_names_in(text("conversations")) {
        if known.contains_key(&id) || known.values().any(|n| *n == name) {
            continue;
        }
        device
            .name_conversation(&name, id)
            .map_err(|e| e.to_string())?;
        added_conversations += 1;
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
