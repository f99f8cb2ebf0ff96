//! The production [`Store`]: redb, one write transaction per commit.
//!
//! Each model [`Table`] is a redb table of byte keys and byte values. A commit is one write
//! transaction with `Durability::Immediate` (fsync before `commit` returns), so a [`CommitReceipt`]
//! really means durable. Drivers merge the `Ready`s of a batch of inputs into one commit (group
//! commit) to pay the fsync once per batch.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;

use redb::{Database, ReadableDatabase, TableDefinition, TableError};
use sund_model::env::{Store, StoreError, StoreRead, Table, Visit, WriteBatch, WriteOp};

/// A redb database file holding a state machine's tables.
pub struct RedbStore {
    db: Database,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn definition(table: Table) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
    TableDefinition::new(table.0)
}

impl RedbStore {
    /// Opens the database at `path`, creating it if missing.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let db = Database::create(path).map_err(|e| {
            StoreError::Backend(format!(
                "cannot open database {}: {e}; is another process using it?",
                path.display()
            ))
        })?;
        Ok(RedbStore { db })
    }
}

impl StoreRead for RedbStore {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let t = match txn.open_table(definition(table)) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(backend(e)),
        };
        Ok(t.get(key).map_err(backend)?.map(|v| v.value().to_vec()))
    }

    fn scan_from(
        &self,
        table: Table,
        start: &[u8],
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_read().map_err(backend)?;
        let t = match txn.open_table(definition(table)) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(backend(e)),
        };
        for entry in t.range::<&[u8]>(start..).map_err(backend)? {
            let (k, v) = entry.map_err(backend)?;
            if let ControlFlow::Break(()) = visit(k.value(), v.value()) {
                break;
            }
        }
        Ok(())
    }
}

impl Store for RedbStore {
    fn commit(&mut self, batch: WriteBatch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
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
        let txn = self.db.begin_write().map_err(backend)?;
        for (name, ops) in by_table {
            let mut t = txn.open_table(definition(Table(name))).map_err(backend)?;
            for op in ops {
                match op {
                    WriteOp::Put { key, value, .. } => {
                        t.insert(key.as_slice(), value.as_slice())
                            .map_err(backend)?;
                    }
                    WriteOp::Delete { key, .. } => {
                        t.remove(key.as_slice()).map_err(backend)?;
                    }
                }
            }
        }
        txn.commit().map_err(backend)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Table = Table("t");

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
