//! A consistent copy of a running store in one file: every table of one redb read transaction
//! (a snapshot; commits go on meanwhile), with the values kept in files of their own
//! ([`crate::value_files`]) copied inline, so that the backup is a single redb database that
//! [`crate::store::RedbStore`] opens as it is. Written beside its name, synced, then renamed:
//! a backup that exists is whole.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, TableDefinition, TableHandle};
use sund_model::env::{StoreError, Table};

use crate::store::RedbReader;

/// Values copied per write transaction of the backup, so that its memory stays bounded
/// whatever the store's size.
const TRANSACTION_BYTES: u64 = 64 << 20;

/// What a backup copied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackupSummary {
    /// Tables copied.
    pub tables: usize,
    /// Records copied.
    pub records: u64,
    /// Bytes of keys and values copied.
    pub bytes: u64,
    /// Records whose value file was gone when the copy reached it (dropped by a commit after
    /// the snapshot): left out of the backup.
    pub values_gone: u64,
}

fn failed(what: &str, path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("{what} {}: {e}", path.display()))
}

impl RedbReader {
    /// Copies the database as of now into a new file `dest` (mode 0600), with `extra` records
    /// added (`table`, `key`, `value`: what else a restore needs, such as a TLS identity).
    /// Refuses to overwrite an existing file.
    pub fn backup_to(
        &self,
        dest: &Path,
        extra: &[(Table, Vec<u8>, Vec<u8>)],
    ) -> Result<BackupSummary, StoreError> {
        if dest.exists() {
            return Err(StoreError::Refused(format!(
                "{} exists already: choose another name for the backup",
                dest.display()
            )));
        }
        let mut part = dest.as_os_str().to_owned();
        part.push(".part");
        let part = PathBuf::from(part);
        let _ = std::fs::remove_file(&part);
        let result = self.copy_into(&part, extra);
        match result {
            Ok(summary) => {
                std::fs::rename(&part, dest).map_err(|e| failed("cannot name", dest, e))?;
                if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::File::open(dir)
                        .and_then(|d| d.sync_all())
                        .map_err(|e| failed("cannot sync", dir, e))?;
                }
                Ok(summary)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                Err(e)
            }
        }
    }

    fn copy_into(
        &self,
        part: &Path,
        extra: &[(Table, Vec<u8>, Vec<u8>)],
    ) -> Result<BackupSummary, StoreError> {
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(part)
                .map_err(|e| failed("cannot create", part, e))?;
        }
        let out = Database::create(part).map_err(|e| failed("cannot create", part, e))?;
        let snapshot = self
            .database()
            .begin_read()
            .map_err(|e| failed("cannot read", part, e))?;
        let mut summary = BackupSummary::default();
        let names: Vec<String> = snapshot
            .list_tables()
            .map_err(|e| failed("cannot list the tables for", part, e))?
            .map(|t| t.name().to_string())
            .collect();
        let mut txn = out
            .begin_write()
            .map_err(|e| failed("cannot write", part, e))?;
        let mut pending = 0u64;
        for name in &names {
            let definition = TableDefinition::<&[u8], &[u8]>::new(name);
            let source = snapshot
                .open_table(definition)
                .map_err(|e| failed("cannot read a table for", part, e))?;
            let in_files = self
                .values()
                .and_then(|v| v.held_table(name).map(|t| (v, t)));
            summary.tables += 1;
            let mut start: Option<Vec<u8>> = None;
            loop {
                // One write transaction per TRANSACTION_BYTES: reopen the range after each.
                let mut range = match &start {
                    None => source.range::<&[u8]>(..),
                    Some(after) => source.range::<&[u8]>(after.as_slice()..),
                }
                .map_err(|e| failed("cannot read", part, e))?;
                if start.is_some() {
                    range.next(); // `after` itself was copied
                }
                let mut table = txn
                    .open_table(definition)
                    .map_err(|e| failed("cannot write", part, e))?;
                let mut full = false;
                for entry in range {
                    let (key, record) = entry.map_err(|e| failed("cannot read", part, e))?;
                    let value = match &in_files {
                        Some((values, table)) => {
                            match values.resolve(*table, key.value(), record.value())? {
                                Some(value) => value,
                                None => {
                                    summary.values_gone += 1;
                                    continue;
                                }
                            }
                        }
                        None => record.value().to_vec(),
                    };
                    table
                        .insert(key.value(), value.as_slice())
                        .map_err(|e| failed("cannot write", part, e))?;
                    let size = (key.value().len() + value.len()) as u64;
                    summary.records += 1;
                    summary.bytes += size;
                    pending += size;
                    if pending >= TRANSACTION_BYTES {
                        start = Some(key.value().to_vec());
                        full = true;
                        break;
                    }
                }
                drop(table);
                if !full {
                    break;
                }
                txn.commit().map_err(|e| failed("cannot write", part, e))?;
                txn = out
                    .begin_write()
                    .map_err(|e| failed("cannot write", part, e))?;
                pending = 0;
            }
        }
        for (table, key, value) in extra {
            let mut t = txn
                .open_table(TableDefinition::<&[u8], &[u8]>::new(table.0))
                .map_err(|e| failed("cannot write", part, e))?;
            t.insert(key.as_slice(), value.as_slice())
                .map_err(|e| failed("cannot write", part, e))?;
        }
        txn.commit().map_err(|e| failed("cannot write", part, e))?;
        drop(out);
        std::fs::File::open(part)
            .and_then(|f| f.sync_all())
            .map_err(|e| failed("cannot sync", part, e))?;
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;
    use sund_model::env::{Store, StoreRead, WriteBatch};

    const BIG: Table = Table("big");
    const SMALL: Table = Table("small");
    const EXTRA: Table = Table("extra");

    fn collect(store: &dyn StoreRead, table: Table) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut all = Vec::new();
        store
            .scan_from(table, &[], &mut |k, v| {
                all.push((k.to_vec(), v.to_vec()));
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
        all
    }

    #[test]
    fn a_backup_is_one_database_with_every_record_and_file_value_inline() {
        let tmp = tempfile::tempdir().unwrap();
        let mut store = RedbStore::open(&tmp.path().join("db.redb"))
            .unwrap()
            .with_value_files(&tmp.path().join("values"), &[BIG])
            .unwrap();
        let mut batch = WriteBatch::default();
        for i in 0..300u32 {
            // Big values add up past one backup transaction (64 MiB) to cross its boundary.
            batch.put(
                BIG,
                i.to_be_bytes().to_vec(),
                vec![i as u8; 256 * 1024 + i as usize],
            );
            batch.put(
                SMALL,
                i.to_be_bytes().to_vec(),
                format!("small {i}").into_bytes(),
            );
        }
        store.commit(batch).unwrap();
        // One value's file goes missing, as if a commit after the snapshot dropped it.
        let gone = tmp.path().join("values/big/00/00000007");
        std::fs::remove_file(&gone).unwrap();

        let dest = tmp.path().join("backup.redb");
        let extra = vec![(EXTRA, b"k".to_vec(), b"v".to_vec())];
        let summary = store.reader().backup_to(&dest, &extra).unwrap();
        assert_eq!(summary.tables, 2);
        assert_eq!(summary.values_gone, 1);
        assert_eq!(summary.records, 599);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dest).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!tmp.path().join("backup.redb.part").exists());

        // Opened as it is, without value files: every value reads back inline.
        let backup = RedbStore::open(&dest).unwrap();
        let big = collect(&store, BIG);
        assert_eq!(big.len(), 299);
        assert_eq!(collect(&backup, BIG), big);
        assert_eq!(collect(&backup, SMALL), collect(&store, SMALL));
        assert_eq!(backup.get(EXTRA, b"k").unwrap(), Some(b"v".to_vec()));

        // A backup never overwrites a file.
        let err = store.reader().backup_to(&dest, &[]).unwrap_err();
        assert!(err.to_string().contains("exists already"), "{err}");
    }
}
