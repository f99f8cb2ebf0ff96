//! The simulated disk: ordered tables, atomic commits, and crashes that lose what was not
//! committed.
//!
//! Fidelity: a commit is all-or-nothing and, once its latency has passed, durable; a crash loses
//! every batch still in flight (the world holds in-flight batches, not the disk). Not modelled:
//! torn writes, bit rot, a full disk, fsync lies. Reads see committed data only.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use sund_model::env::{CommitReceipt, Store, StoreError, StoreRead, Table, WriteBatch, WriteOp};

/// The committed contents of one actor's disk.
#[derive(Clone, Debug, Default)]
pub struct SimDisk {
    tables: BTreeMap<&'static str, BTreeMap<Vec<u8>, Vec<u8>>>,
    commits: u64,
}

impl SimDisk {
    /// Committed batches so far.
    pub fn commits(&self) -> u64 {
        self.commits
    }

    /// Number of records in a table.
    pub fn table_len(&self, table: Table) -> usize {
        self.tables.get(table.0).map_or(0, BTreeMap::len)
    }
}

impl StoreRead for SimDisk {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tables.get(table.0).and_then(|t| t.get(key)).cloned())
    }

    fn scan_from(
        &self,
        table: Table,
        start: &[u8],
        visit: &mut dyn FnMut(&[u8], &[u8]) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        let Some(t) = self.tables.get(table.0) else {
            return Ok(());
        };
        for (k, v) in t.range(start.to_vec()..) {
            if visit(k, v).is_break() {
                break;
            }
        }
        Ok(())
    }
}

impl Store for SimDisk {
    fn commit(&mut self, batch: WriteBatch) -> Result<CommitReceipt, StoreError> {
        for op in batch.ops() {
            match op {
                WriteOp::Put { table, key, value } => {
                    self.tables
                        .entry(table.0)
                        .or_default()
                        .insert(key.clone(), value.clone());
                }
                WriteOp::Delete { table, key } => {
                    if let Some(t) = self.tables.get_mut(table.0) {
                        t.remove(key);
                    }
                }
            }
        }
        self.commits += 1;
        Ok(CommitReceipt::after_durable_commit())
    }
}
