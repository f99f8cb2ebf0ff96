//! Large values in files of their own beside the database: file chunks.
//!
//! A file chunk is up to a few MiB; a gigabyte is a thousand of them. Kept as redb values,
//! every chunk was copied into the B-tree's pages, checksummed, written with the transaction
//! and read back through redb's page cache, and a commit holding one made every small record
//! committed with it wait for its megabyte. A table named here keeps in redb only a
//! *reference* (a tag and the value's length); the bytes go to a file named after the table
//! and key, written before the transaction that refers to it commits and removed after the
//! transaction that drops the reference:
//!
//! - **put**: the bytes go to `KEY.tmp` (around the page cache, [`crate::direct_io`]), are
//!   synced, renamed to `KEY` and the directory synced, all before the redb transaction
//!   commits, so a committed reference always has its file;
//! - **delete**: the reference goes with the transaction; the file after it has committed;
//! - a crash between the two leaves a file no reference names: [`ValueFiles::sweep`] removes
//!   such files (and `*.tmp` left by a crash mid-write) when the store opens.
//!
//! A file that is missing or of the wrong length when read (removed or truncated by hand, a
//! damaged disk) reads as no value, with a warning: the machines above verify every chunk's
//! digest and fetch a missing one again, as they do for a damaged one.
//!
//! Layout: `ROOT/TABLE/AB/ABCDEF…` where `ABCDEF…` is the key in hex and `AB` its first byte,
//! so that no directory grows past a few thousand entries for a gateway holding millions.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use sund_model::env::{StoreError, Table, WriteBatch, WriteOp};

use crate::direct_io::{self, DirectFile};
use sund_model::hex;

/// The tag that starts a reference record: what a table in files keeps in redb.
const REFERENCE_TAG: &[u8; 8] = b"\0sundref";
/// A reference record: the tag, then the value's length (u64, little-endian).
const REFERENCE_LEN: usize = 16;
/// Most bytes a value's file is read for, whatever its reference says (a damaged reference
/// must not make a read allocate gigabytes): file chunks are at most a few MiB.
const VALUE_BYTES_MAX: usize = 64 << 20;

/// Value files one commit writes at once, each on a thread of its own.
const WRITERS_MAX: usize = 4;

/// Where the values of some tables live as files, and how they get there.
#[derive(Debug)]
pub struct ValueFiles {
    root: PathBuf,
    tables: Vec<Table>,
}

/// What a commit does to the files of one batch, decided before its transaction.
#[derive(Default)]
pub(crate) struct FilePlan {
    /// Files to remove once the transaction has committed.
    removals: Vec<PathBuf>,
}

impl FilePlan {
    /// Removes the files of dropped references; the transaction that dropped them committed.
    /// A file that cannot be removed now is swept at the next open.
    pub(crate) fn after_commit(self) {
        for path in self.removals {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(path = %path.display(), error = %e,
                    "a dropped value's file could not be removed; it is removed at the next start"),
            }
        }
    }
}

fn io_failure(path: &Path, e: io::Error) -> StoreError {
    if e.kind() == io::ErrorKind::StorageFull {
        StoreError::Backend(format!(
            "the disk is full ({e}) writing {}: free some space",
            path.display()
        ))
    } else {
        StoreError::Backend(format!("cannot write {}: {e}", path.display()))
    }
}

impl ValueFiles {
    /// Keeps the values of `tables` under `root` (created owner-only if missing).
    pub fn new(root: &Path, tables: &[Table]) -> Result<ValueFiles, StoreError> {
        crate::files::private_dir(root).map_err(|e| StoreError::Refused(e.to_string()))?;
        Ok(ValueFiles {
            root: root.to_path_buf(),
            tables: tables.to_vec(),
        })
    }

    /// True if `table`'s values live in files.
    pub fn holds(&self, table: Table) -> bool {
        self.tables.contains(&table)
    }

    /// The table named `name`, if its values live in files.
    pub(crate) fn held_table(&self, name: &str) -> Option<Table> {
        self.tables.iter().copied().find(|t| t.0 == name)
    }

    fn path(&self, table: Table, key: &[u8]) -> PathBuf {
        let name = if key.is_empty() {
            // An empty key still needs a name; hex of nothing is "".
            "_".to_string()
        } else {
            hex::encode(key)
        };
        let fan = name.get(..2).unwrap_or("_").to_string();
        self.root.join(table.0).join(fan).join(name)
    }

    /// The reference record that stands in redb for a value of `len` bytes.
    pub(crate) fn reference(len: usize) -> [u8; REFERENCE_LEN] {
        let mut record = [0u8; REFERENCE_LEN];
        record[..8].copy_from_slice(REFERENCE_TAG);
        record[8..].copy_from_slice(&(len as u64).to_le_bytes());
        record
    }

    /// The length a reference record names, or `None` if `record` is a value kept in redb
    /// itself (written before its table moved to files).
    fn referenced_len(record: &[u8]) -> Option<u64> {
        if record.len() != REFERENCE_LEN || &record[..8] != REFERENCE_TAG {
            return None;
        }
        Some(u64::from_le_bytes(record[8..].try_into().ok()?))
    }

    /// Writes every value `batch` leaves in a table kept in files, durably, and lists the
    /// files its deletes drop (removed by [`FilePlan::after_commit`]). Only the last write to
    /// each key counts: that is what the transaction leaves.
    pub(crate) fn prepare(&self, batch: &WriteBatch) -> Result<FilePlan, StoreError> {
        let mut last: BTreeMap<(&'static str, &[u8]), Option<&[u8]>> = BTreeMap::new();
        for op in batch.ops() {
            match op {
                WriteOp::Put { table, key, value } if self.holds(*table) => {
                    last.insert((table.0, key), Some(&value[..]));
                }
                WriteOp::Delete { table, key } if self.holds(*table) => {
                    last.insert((table.0, key), None);
                }
                _ => {}
            }
        }
        let mut plan = FilePlan::default();
        let mut dirs = BTreeSet::new();
        let mut writes = Vec::new();
        for ((table, key), value) in last {
            let path = self.path(Table(table), key);
            match value {
                Some(bytes) => {
                    self.make_dir(&path, &mut dirs)?;
                    writes.push((path, bytes));
                }
                None => plan.removals.push(path),
            }
        }
        // Several files at once: each waits for its own sync, and the file system commits
        // syncs that wait together in one go (a merged batch of file chunks took one disk
        // round trip per chunk, one after the other).
        for group in writes.chunks(WRITERS_MAX) {
            if let [(path, bytes)] = group {
                Self::write(path, bytes)?;
                continue;
            }
            std::thread::scope(|scope| {
                let writers: Vec<_> = group
                    .iter()
                    .map(|(path, bytes)| scope.spawn(move || Self::write(path, bytes)))
                    .collect();
                writers
                    .into_iter()
                    .map(|w| w.join().expect("a value file's writer does not panic"))
                    .collect::<Result<Vec<()>, StoreError>>()
            })?;
        }
        for (path, _) in &writes {
            dirs.insert(path.parent().expect("a value file has a directory").into());
        }
        for dir in dirs {
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_failure(&dir, e))?;
        }
        Ok(plan)
    }

    /// Creates the directory of `path` if it is missing; notes the directories whose entries
    /// changed (synced once for the batch).
    fn make_dir(&self, path: &Path, dirs: &mut BTreeSet<PathBuf>) -> Result<(), StoreError> {
        let dir = path.parent().expect("a value file has a directory");
        if !dir.exists() {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::DirBuilderExt;
                builder.mode(0o700);
            }
            builder.create(dir).map_err(|e| io_failure(dir, e))?;
            // The new directory's own entry, in its parent (and the table's, in the root).
            let mut up = dir.parent();
            while let Some(parent) = up {
                dirs.insert(parent.to_path_buf());
                if parent == self.root {
                    break;
                }
                up = parent.parent();
            }
        }
        Ok(())
    }

    /// Writes `bytes` to `path` (whose directory exists) through a synced temporary file.
    fn write(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let temp = path.with_extension("tmp");
        // Around the page cache (see `direct_io`): chunks are written once and read rarely.
        let written = (|| {
            let mut file = DirectFile::create(&temp, true)?;
            file.write_all(bytes)?;
            file.finish()?;
            std::fs::rename(&temp, path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(io_failure(path, e));
        }
        Ok(())
    }

    /// The value `record` (read from `table` at `key`) stands for: the file's bytes if it is
    /// a reference, `record` itself if it is a value kept in redb.
    pub(crate) fn resolve(
        &self,
        table: Table,
        key: &[u8],
        record: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(len) = Self::referenced_len(record) else {
            return Ok(Some(record.to_vec()));
        };
        let path = self.path(table, key);
        let want = usize::try_from(len)
            .unwrap_or(usize::MAX)
            .min(VALUE_BYTES_MAX);
        match direct_io::read_file(&path, want) {
            Ok(bytes) => Ok(self.checked_len(&path, bytes, len)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Removed by hand, or dropped by a commit after this read's snapshot.
                tracing::debug!(path = %path.display(), "a value's file is gone");
                Ok(None)
            }
            Err(e) => Err(StoreError::Backend(format!(
                "cannot read {}: {e}",
                path.display()
            ))),
        }
    }

    /// `bytes` if the file had the length its reference names; else none, with a warning.
    fn checked_len(&self, path: &Path, bytes: Vec<u8>, len: u64) -> Option<Vec<u8>> {
        if bytes.len() as u64 != len {
            tracing::warn!(path = %path.display(), want = len, found = bytes.len(),
                "a value's file has the wrong length (damaged or changed by hand): read as missing");
            return None;
        }
        Some(bytes)
    }

    /// Removes the files no reference names (a crash between a file's write and its
    /// transaction, or between a transaction and its file's removal) and temporary files;
    /// `referenced(table, key)` says whether redb names a key. Returns how many it removed.
    pub fn sweep(
        &self,
        mut referenced: impl FnMut(Table, &[u8]) -> Result<bool, StoreError>,
    ) -> Result<usize, StoreError> {
        let mut removed = 0;
        for table in &self.tables {
            let dir = self.root.join(table.0);
            for fan in read_dir_or_empty(&dir)? {
                if !fan.is_dir() {
                    continue; // nothing this store wrote
                }
                for file in read_dir_or_empty(&fan)? {
                    let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    let key = if name == "_" {
                        Some(Vec::new())
                    } else {
                        hex::decode(name)
                    };
                    let keep = match key {
                        Some(key) => referenced(*table, &key)?,
                        None => false, // `*.tmp`, or nothing this store wrote
                    };
                    if !keep {
                        std::fs::remove_file(&file).map_err(|e| {
                            StoreError::Backend(format!("cannot remove {}: {e}", file.display()))
                        })?;
                        removed += 1;
                    }
                }
            }
        }
        Ok(removed)
    }
}

fn read_dir_or_empty(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Backend(format!("cannot list {}: {e}", dir.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(StoreError::Backend(format!(
            "cannot list {}: {e}",
            dir.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;
    use sund_model::env::{Store, StoreRead};

    const BIG: Table = Table("big");
    const SMALL: Table = Table("small");

    fn open(dir: &Path) -> RedbStore {
        RedbStore::open(&dir.join("db.redb"))
            .unwrap()
            .with_value_files(&dir.join("values"), &[BIG])
            .unwrap()
    }

    fn files_under(dir: &Path) -> Vec<String> {
        let mut found = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    found.push(p.file_name().unwrap().to_str().unwrap().to_string());
                }
            }
        }
        found.sort();
        found
    }

    fn commit(store: &mut RedbStore, f: impl FnOnce(&mut WriteBatch)) {
        let mut batch = WriteBatch::default();
        f(&mut batch);
        store.commit(batch).unwrap();
    }

    #[test]
    fn values_of_a_table_in_files_live_in_files_and_redb_keeps_a_reference() {
        let tmp = tempfile::tempdir().unwrap();
        let mut store = open(tmp.path());
        let chunk = vec![7u8; 300_000];
        commit(&mut store, |b| {
            b.put(BIG, vec![0xab, 0x01], chunk.clone());
            b.put(SMALL, b"k".to_vec(), b"v".to_vec());
        });
        assert_eq!(store.get(BIG, &[0xab, 0x01]).unwrap(), Some(chunk.clone()));
        assert_eq!(
            store.reader().get(BIG, &[0xab, 0x01]).unwrap(),
            Some(chunk.clone())
        );
        assert_eq!(store.get(SMALL, b"k").unwrap(), Some(b"v".to_vec()));
        let file = tmp.path().join("values/big/ab/ab01");
        assert_eq!(std::fs::read(&file).unwrap(), chunk);
        let record = super::super::store::tests_raw_get(&store, BIG, &[0xab, 0x01]);
        assert_eq!(record.len(), REFERENCE_LEN, "redb holds the reference only");
        assert_eq!(files_under(&tmp.path().join("values")), vec!["ab01"]);
        let mut scanned = Vec::new();
        store
            .scan_from(BIG, b"", &mut |k, v| {
                scanned.push((k.to_vec(), v.len()));
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(scanned, vec![(vec![0xab, 0x01], 300_000)]);

        commit(&mut store, |b| b.delete(BIG, vec![0xab, 0x01]));
        assert_eq!(store.get(BIG, &[0xab, 0x01]).unwrap(), None);
        assert!(files_under(&tmp.path().join("values")).is_empty());
    }

    #[test]
    fn the_last_write_to_a_key_in_a_batch_decides_its_file() {
        let tmp = tempfile::tempdir().unwrap();
        let mut store = open(tmp.path());
        commit(&mut store, |b| {
            b.put(BIG, vec![1], vec![1; 10]);
            b.delete(BIG, vec![1]);
            b.delete(BIG, vec![2]);
            b.put(BIG, vec![2], vec![2; 20]);
            b.put(BIG, vec![3], vec![3; 30]);
            b.put(BIG, vec![3], vec![4; 40]);
        });
        assert_eq!(store.get(BIG, &[1]).unwrap(), None);
        assert_eq!(store.get(BIG, &[2]).unwrap(), Some(vec![2; 20]));
        assert_eq!(store.get(BIG, &[3]).unwrap(), Some(vec![4; 40]));
        assert_eq!(files_under(&tmp.path().join("values")), vec!["02", "03"]);
        // An empty key and an empty value have files too.
        commit(&mut store, |b| b.put(BIG, Vec::new(), Vec::<u8>::new()));
        assert_eq!(store.get(BIG, &[]).unwrap(), Some(Vec::new()));
    }

    /// A batch of many values is written several files at a time: every one lands whole
    /// under its own name, in new and existing directories; one that cannot be written fails
    /// the commit with its path named, and no record names a file that is not there.
    #[test]
    fn many_values_in_one_batch_are_written_in_parallel_each_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let mut store = open(tmp.path());
        let value = |i: u8| vec![i; 5_000 + usize::from(i) * 4_099];
        let count = 3 * WRITERS_MAX as u8 + 1;
        commit(&mut store, |b| {
            for i in 0..count {
                b.put(BIG, vec![i % 3, i], value(i));
            }
        });
        for i in 0..count {
            assert_eq!(store.get(BIG, &[i % 3, i]).unwrap(), Some(value(i)), "{i}");
        }
        assert_eq!(
            files_under(&tmp.path().join("values")).len(),
            usize::from(count)
        );
        // A directory standing where one value's file must go: that commit fails, naming
        // it, and the values already committed still read.
        let blocked = tmp.path().join("values/big/07/07ff");
        std::fs::create_dir_all(blocked.join("x")).unwrap();
        let mut batch = WriteBatch::default();
        for i in 0..count {
            batch.put(BIG, vec![7, 0xff - i], value(i));
        }
        let error = store.commit(batch).unwrap_err().to_string();
        assert!(error.contains("07ff"), "{error}");
        assert_eq!(store.get(BIG, &[7, 0xff]).unwrap(), None);
        assert_eq!(store.get(BIG, &[1, 1]).unwrap(), Some(value(1)));
    }

    #[test]
    fn opening_sweeps_files_a_crash_left_without_a_record() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let mut store = open(tmp.path());
            commit(&mut store, |b| b.put(BIG, vec![0xaa], vec![1; 100]));
        }
        let fan = tmp.path().join("values/big/aa");
        // A write whose transaction never committed, a crash mid-write, a delete whose file
        // removal never ran (its record is gone), and a stray name.
        std::fs::write(fan.join("aabb"), [9; 5]).unwrap();
        std::fs::write(fan.join("aacc.tmp"), [9; 5]).unwrap();
        std::fs::write(fan.join("not hex"), [9; 5]).unwrap();
        let store = open(tmp.path());
        assert_eq!(files_under(&tmp.path().join("values")), vec!["aa"]);
        assert_eq!(store.get(BIG, &[0xaa]).unwrap(), Some(vec![1; 100]));
    }

    #[test]
    fn a_missing_or_truncated_file_reads_as_no_value() {
        let tmp = tempfile::tempdir().unwrap();
        let mut store = open(tmp.path());
        commit(&mut store, |b| {
            b.put(BIG, vec![0x10], vec![1; 100]);
            b.put(BIG, vec![0x20], vec![2; 100]);
        });
        std::fs::remove_file(tmp.path().join("values/big/10/10")).unwrap();
        std::fs::write(tmp.path().join("values/big/20/20"), [2; 99]).unwrap();
        assert_eq!(store.get(BIG, &[0x10]).unwrap(), None);
        assert_eq!(store.get(BIG, &[0x20]).unwrap(), None);
    }

    #[test]
    fn values_written_into_the_database_before_the_table_moved_to_files_still_read() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let mut plain = RedbStore::open(&tmp.path().join("db.redb")).unwrap();
            commit(&mut plain, |b| b.put(BIG, vec![5], vec![5; 64]));
        }
        let mut store = open(tmp.path());
        assert_eq!(store.get(BIG, &[5]).unwrap(), Some(vec![5; 64]));
        commit(&mut store, |b| b.delete(BIG, vec![5]));
        assert_eq!(store.get(BIG, &[5]).unwrap(), None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// Batches of puts and deletes over a few keys, some reopening the store between them
        /// (which sweeps), and some files left behind as a crash would leave them: the store
        /// with values in files reads like an in-memory store given the same batches, and every
        /// file on disk is one a record names.
        #[test]
        fn a_store_with_values_in_files_reads_like_one_without(
            steps in proptest::collection::vec(
                (
                    proptest::collection::vec((0u8..6, proptest::option::of(0usize..3000)), 1..6),
                    0u8..4,
                ),
                1..12,
            )
        ) {
            use sund_model::env::MemStore;
            let tmp = tempfile::tempdir().unwrap();
            let mut store = open(tmp.path());
            let mut model = MemStore::default();
            for (ops, after) in steps {
                let mut batch = WriteBatch::default();
                for (key, value) in ops {
                    match value {
                        Some(len) => batch.put(BIG, vec![key], vec![key ^ len as u8; len]),
                        None => batch.delete(BIG, vec![key]),
                    }
                }
                model.commit(batch.clone()).unwrap();
                store.commit(batch).unwrap();
                match after {
                    0 => {
                        drop(store);
                        store = open(tmp.path());
                    }
                    1 => {
                        // A crash between a file's write and its transaction: the next open
                        // sweeps it.
                        let dir = tmp.path().join("values/big/ff");
                        std::fs::create_dir_all(&dir).unwrap();
                        std::fs::write(dir.join("ff"), [1, 2, 3]).unwrap();
                        std::fs::write(dir.join("ff.tmp"), [1]).unwrap();
                        drop(store);
                        store = open(tmp.path());
                    }
                    _ => {}
                }
                for key in 0u8..6 {
                    proptest::prop_assert_eq!(
                        store.get(BIG, &[key]).unwrap(),
                        model.get(BIG, &[key]).unwrap()
                    );
                }
                let held: Vec<String> = (0u8..6)
                    .filter(|k| model.get(BIG, &[*k]).unwrap().is_some())
                    .map(|k| hex::encode(&[k]))
                    .collect();
                proptest::prop_assert_eq!(files_under(&tmp.path().join("values")), held);
            }
        }
    }

    #[cfg(unix)]
    #[test]
    fn value_files_are_private_to_their_owner() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let mut store = open(tmp.path());
        commit(&mut store, |b| b.put(BIG, vec![0x42], vec![1; 10]));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&tmp.path().join("values")), 0o700);
        assert_eq!(mode(&tmp.path().join("values/big/42")), 0o700);
        assert_eq!(mode(&tmp.path().join("values/big/42/42")), 0o600);
    }
}
