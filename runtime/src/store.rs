//! The production [`Store`]: redb, one write transaction per commit.
//!
//! Each model [`Table`] is a redb table of byte keys and byte values. A commit is one write
//! transaction with `Durability::Immediate` (fsync before `commit` returns), so a [`CommitReceipt`]
//! really means durable. Drivers merge the `Ready`s of a batch of inputs into one commit (group
//! commit) to pay the fsync once per batch.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use redb::{Database, ReadableDatabase, TableDefinition, TableError};
use sund_model::env::{Store, StoreError, StoreRead, Table, Visit, WriteBatch, WriteOp};

use crate::sim_disk::SimulatedDisk;
use crate::value_files::ValueFiles;

/// Memory redb may keep as its page cache. Its default (1 GiB) let a device or gateway that
/// moved a large file grow to over 1.5 GiB of memory (the file's pages stayed cached); what
/// the machines read back often (recent log entries, cursors, index records) fits many times
/// in this.
pub const CACHE_BYTES: usize = 32 << 20;

/// A redb database file holding a state machine's tables.
pub struct RedbStore {
    db: Arc<Database>,
    /// A simulated disk ([`crate::environment::Simulated::with_disk`]); never in production.
    disk: Option<SimulatedDisk>,
    /// The file did not exist (or was blank) before this open made it.
    created: bool,
    /// Tables whose values live in files of their own ([`RedbStore::with_value_files`]).
    values: Option<Arc<ValueFiles>>,
}

/// What a redb failure means for the machine above: a damaged file (stop; restore from a
/// backup), or a failure of the disk that may pass (a full disk).
fn backend(e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        redb::Error::Corrupted(what) => StoreError::Damaged(format!(
            "the database is damaged ({what}); keep a copy of it for inspection and restore the data directory from a backup"
        )),
        redb::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => {
            StoreError::Backend(format!("the disk is full ({io}): free some space"))
        }
        other => StoreError::Backend(other.to_string()),
    }
}

fn definition(table: Table) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
    TableDefinition::new(table.0)
}

impl RedbStore {
    /// Opens the database at `path`, creating it (owner-only) if missing.
    ///
    /// An existing file is checked whole before it is used (every page against its checksum),
    /// and refused if it is empty (a file truncated by accident must not silently become a new
    /// database) or damaged; the error says to restore the data directory from a backup. The
    /// file must not be accessible to other users (see [`crate::files`]).
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        RedbStore::open_with(path, None)
    }

    /// [`RedbStore::open`], or with `disk` the same database on a simulated disk (the file at
    /// `path` is not touched then; the path only names the database in errors).
    pub fn open_with(path: &Path, disk: Option<SimulatedDisk>) -> Result<RedbStore, StoreError> {
        let mut builder = Database::builder();
        builder.set_check_integrity_on_open(true);
        builder.set_cache_size(CACHE_BYTES);
        if let Some(disk) = disk {
            let created = disk.is_blank();
            let db = builder
                .create_with_backend(disk.backend())
                .map_err(|e| open_error(path, e))?;
            return Ok(RedbStore {
                db: Arc::new(db),
                disk: Some(disk),
                created,
                values: None,
            });
        }
        let existed = path.exists();
        if existed {
            let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            if len == 0 {
                return Err(StoreError::Damaged(format!(
                    "{} is empty: the database was truncated or never written. Restore the data directory from a backup; only if nothing of it is worth keeping, delete the file to start anew",
                    path.display()
                )));
            }
        }
        crate::files::private_file(path).map_err(|e| StoreError::Refused(e.to_string()))?;
        let opened = if existed {
            builder.open(path)
        } else {
            builder.create(path)
        };
        let db = opened.map_err(|e| open_error(path, e))?;
        Ok(RedbStore {
            db: Arc::new(db),
            disk: None,
            created: !existed,
            values: None,
        })
    }

    /// [`RedbStore::open`], waiting up to `patience` while another process holds the database
    /// (such as a short `sund-gateway admin` command that found the control socket of a
    /// gateway that was restarting and opened the database itself) instead of failing at once.
    /// Any other error, or one that lasts, is returned as it is.
    pub fn open_patiently(path: &Path, patience: Duration) -> Result<RedbStore, StoreError> {
        let started = std::time::Instant::now();
        loop {
            match RedbStore::open(path) {
                Err(StoreError::Refused(why))
                    if why == in_use(path) && started.elapsed() < patience =>
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    /// Keeps the values of `tables` in files under `root` instead of in the database (see
    /// [`crate::value_files`]): for large values such as file chunks. Removes the files a
    /// crash left without a reference. On a simulated disk the values stay in the database
    /// (the simulated disk models one file), and this does nothing.
    pub fn with_value_files(
        mut self,
        root: &Path,
        tables: &[Table],
    ) -> Result<RedbStore, StoreError> {
        if self.disk.is_some() {
            return Ok(self);
        }
        let values = ValueFiles::new(root, tables)?;
        let removed = values.sweep(|table, key| Ok(raw_get(&self.db, table, key)?.is_some()))?;
        if removed > 0 {
            tracing::info!(
                removed,
                dir = %root.display(),
                "removed value files left without a record by an interrupted commit"
            );
        }
        self.values = Some(Arc::new(values));
        Ok(self)
    }

    /// True if this open created the database (its file did not exist): an empty database
    /// that was not just created lost its data, or was never committed to.
    pub fn was_created(&self) -> bool {
        self.created
    }

    /// A handle that reads the same database from other threads while this store commits
    /// (redb's readers see the last committed state): a driver serves file chunks through
    /// it without waiting for the commit thread.
    pub fn reader(&self) -> RedbReader {
        RedbReader {
            db: self.db.clone(),
            values: self.values.clone(),
        }
    }

    /// True if the database holds no table yet (created, never committed to).
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let mut tables = txn.list_tables().map_err(backend)?;
        Ok(tables.next().is_none())
    }
}

/// Reads a [`RedbStore`]'s database from another thread ([`RedbStore::reader`]).
#[derive(Clone)]
pub struct RedbReader {
    db: Arc<Database>,
    values: Option<Arc<ValueFiles>>,
}

impl RedbReader {
    /// The database, for whole-store work such as [`crate::backup`].
    pub(crate) fn database(&self) -> &Database {
        &self.db
    }

    /// Where values of some tables live as files, if anywhere.
    pub(crate) fn values(&self) -> Option<&ValueFiles> {
        self.values.as_deref()
    }
}

impl StoreRead for RedbReader {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        get(&self.db, self.values.as_deref(), table, key)
    }

    fn scan_from(
        &self,
        table: Table,
        start: &[u8],
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        scan_from(&self.db, self.values.as_deref(), table, start, visit)
    }
}

impl StoreRead for RedbStore {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        get(&self.db, self.values.as_deref(), table, key)
    }

    fn scan_from(
        &self,
        table: Table,
        start: &[u8],
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        scan_from(&self.db, self.values.as_deref(), table, start, visit)
    }
}

fn get(
    db: &Database,
    values: Option<&ValueFiles>,
    table: Table,
    key: &[u8],
) -> Result<Option<Vec<u8>>, StoreError> {
    let record = raw_get(db, table, key)?;
    match (record, values) {
        (Some(record), Some(values)) if values.holds(table) => values.resolve(table, key, &record),
        (record, _) => Ok(record),
    }
}

/// The record redb holds for `key` (for a table in files, the reference).
fn raw_get(db: &Database, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
    let txn = db.begin_read().map_err(backend)?;
    let t = match txn.open_table(definition(table)) {
        Ok(t) => t,
        Err(TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(backend(e)),
    };
    Ok(t.get(key).map_err(backend)?.map(|v| v.value().to_vec()))
}

fn scan_from(
    db: &Database,
    values: Option<&ValueFiles>,
    table: Table,
    start: &[u8],
    visit: &mut Visit<'_>,
) -> Result<(), StoreError> {
    let txn = db.begin_read().map_err(backend)?;
    let t = match txn.open_table(definition(table)) {
        Ok(t) => t,
        Err(TableError::TableDoesNotExist(_)) => return Ok(()),
        Err(e) => return Err(backend(e)),
    };
    for entry in t.range::<&[u8]>(start..).map_err(backend)? {
        let (k, v) = entry.map_err(backend)?;
        let flow = match values.filter(|v| v.holds(table)) {
            Some(values) => match values.resolve(table, k.value(), v.value())? {
                Some(value) => visit(k.value(), &value),
                None => ControlFlow::Continue(()),
            },
            None => visit(k.value(), v.value()),
        };
        if let ControlFlow::Break(()) = flow {
            break;
        }
    }
    Ok(())
}

impl Store for RedbStore {
    fn commit(&mut self, batch: WriteBatch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        if self.disk.as_ref().is_some_and(SimulatedDisk::is_full) {
            return Err(StoreError::Backend(
                "the disk is full (No space left on device, simulated): free some space".into(),
            ));
        }
        // Open each table once per transaction (opening is not free), applying its writes in
        // batch order; writes to different tables commute within one transaction.
        let mut by_table: BTreeMap<&'static str, Vec<&WriteOp>> = BTreeMap::new();
        for op in batch.ops() {
            let table = match op {
                WriteOp::Put { table, .. } | WriteOp::Delete { table, .. } => table.0,
            };
            by_table.entry(table).or_default().push(op);
        }
        // Values kept in files are written (and synced) before the transaction that refers to
        // them; files of dropped references go after it.
        let files = match &self.values {
            Some(values) => Some(values.prepare(&batch)?),
            None => None,
        };
        let txn = self.db.begin_write().map_err(backend)?;
        for (name, ops) in by_table {
            let in_files = self.values.as_ref().is_some_and(|v| v.holds(Table(name)));
            let mut t = txn.open_table(definition(Table(name))).map_err(backend)?;
            for op in ops {
                match op {
                    WriteOp::Put { key, value, .. } if in_files => {
                        let reference = ValueFiles::reference(value.len());
                        t.insert(key.as_slice(), &reference[..]).map_err(backend)?;
                    }
                    WriteOp::Put { key, value, .. } => {
                        t.insert(key.as_slice(), &value[..]).map_err(backend)?;
                    }
                    WriteOp::Delete { key, .. } => {
                        t.remove(key.as_slice()).map_err(backend)?;
                    }
                }
            }
        }
        txn.commit().map_err(backend)?;
        if let Some(files) = files {
            files.after_commit();
        }
        Ok(())
    }
}

/// The raw record redb holds (a reference, for a table in files): for tests of
/// [`crate::value_files`].
#[cfg(test)]
pub(crate) fn tests_raw_get(store: &RedbStore, table: Table, key: &[u8]) -> Vec<u8> {
    raw_get(&store.db, table, key).unwrap().unwrap()
}

/// What a failed open means: another process has the file, the disk failed, or the file is
/// damaged (restore it).
fn open_error(path: &Path, e: redb::DatabaseError) -> StoreError {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Refused(in_use(path)),
        redb::DatabaseError::Storage(redb::StorageError::Io(io)) => {
            StoreError::Backend(format!("cannot open {}: {io}", path.display()))
        }
        other => StoreError::Damaged(format!(
            "{} is damaged ({other}). Keep a copy of it for inspection and restore the data directory from a backup",
            path.display()
        )),
    }
}

/// Words for a database another process holds open: which process that likely is, and what to
/// do (one process at a time opens a data directory).
fn in_use(path: &Path) -> String {
    match path.file_name().and_then(|n| n.to_str()) {
        Some("node.redb") => format!(
            "this device ({}) is in use by another `sund` process, such as a running `sund follow`: one command at a time uses a device. Stop the other one (Ctrl-C), run this, then start it again; `sund follow` prints what arrived meanwhile",
            path.parent().unwrap_or(path).display()
        ),
        Some("gateway.redb") => format!(
            "{} is in use by another process, such as a running gateway whose control socket (admin.sock beside it) is missing: `sund-gateway admin` reaches a running gateway through that socket, or edits the database of a stopped one",
            path.display()
        ),
        _ => format!("{} is in use by another process: stop it first", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Table = Table("t");

    #[test]
    fn a_patient_open_waits_for_a_short_holder_and_not_for_ever() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let held = RedbStore::open(&path).unwrap();
        let refused = RedbStore::open_patiently(&path, Duration::ZERO)
            .err()
            .unwrap();
        assert!(refused.to_string().contains("in use"), "{refused}");
        let holder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(held);
        });
        RedbStore::open_patiently(&path, Duration::from_secs(10)).unwrap();
        holder.join().unwrap();
    }

    #[test]
    fn committed_writes_survive_reopening_and_scan_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        {
            let mut store = RedbStore::open(&path).unwrap();
            let mut batch = WriteBatch::default();
            batch.put(T, b"b".to_vec(), b"2".to_vec());
            batch.put(T, b"a".to_vec(), b"1".to_vec());
            batch.put(T, b"c".to_vec(), b"3".to_vec());
            batch.delete(T, b"c".to_vec());
            store.commit(batch).unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.get(T, b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(store.get(T, b"c").unwrap(), None);
        assert_eq!(store.get(Table("missing"), b"a").unwrap(), None);
        let mut seen = Vec::new();
        store
            .scan_from(T, b"", &mut |k, v| {
                seen.push((k.to_vec(), v.to_vec()));
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(
            seen,
            vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"2".to_vec())
            ]
        );
    }

    #[test]
    fn writes_to_one_key_apply_in_batch_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = RedbStore::open(&dir.path().join("db.redb")).unwrap();
        let mut batch = WriteBatch::default();
        batch.put(T, b"k".to_vec(), b"1".to_vec());
        batch.put(Table("other"), b"x".to_vec(), b"y".to_vec());
        batch.delete(T, b"k".to_vec());
        batch.put(T, b"j".to_vec(), b"1".to_vec());
        batch.delete(T, b"j".to_vec());
        batch.put(T, b"j".to_vec(), b"2".to_vec());
        store.commit(batch).unwrap();
        assert_eq!(store.get(T, b"k").unwrap(), None);
        assert_eq!(store.get(T, b"j").unwrap(), Some(b"2".to_vec()));
        assert_eq!(
            store.get(Table("other"), b"x").unwrap(),
            Some(b"y".to_vec())
        );
    }

    #[test]
    fn a_second_process_cannot_open_the_same_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let _first = RedbStore::open(&path).unwrap();
        let second = RedbStore::open(&path);
        assert!(second.is_err(), "redb locks its file");
    }
}
