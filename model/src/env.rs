//! The environment a state machine lives in: clock, entropy, store.
//!
//! These are the doors between the model and the world. The simulator implements them with
//! virtual time, a seeded ChaCha20 stream and a crashable disk; the drivers (`sund-runtime`)
//! with tokio's clock, OS entropy (or a seeded stream) and redb. The network is not a trait of
//! the model: machines take frames as inputs and hand frames out as outputs, and the simulator's
//! network model or the runtime's QUIC sessions carry them.
//!
//! The persist-then-speak rule (raft's `Ready`): a state machine hands its writes and its outputs
//! out together as a [`Ready`]. The driver commits the writes, and only the [`CommitReceipt`] of
//! that commit releases the outputs. Outputs of a `Ready` may depend on any write handed out
//! earlier, so a driver releases `Ready`s strictly in order, each after its own commit and all
//! earlier ones, even when its own batch is empty.

use core::fmt;
use core::ops::ControlFlow;
use std::collections::BTreeMap;

use bytes::Bytes;

use crate::time::Instant;

/// Reads the driver's clock. State machines get `now` as an argument; drivers use this.
pub trait Clock {
    /// The current instant on this actor's clock (which may be skewed in simulation).
    fn now(&self) -> Instant;
}

/// Cryptographic-quality random bytes: OS entropy in production, a seeded stream in simulation.
pub trait Entropy {
    /// Fills `dest` with random bytes.
    fn fill_bytes(&mut self, dest: &mut [u8]);

    /// A random `u64`.
    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }

    /// A uniformly random `u64` in `0..=max` (Lemire's widening multiply; bias below 2^-64).
    fn below_inclusive(&mut self, max: u64) -> u64 {
        if max == u64::MAX {
            return self.next_u64();
        }
        ((u128::from(self.next_u64()) * (u128::from(max) + 1)) >> 64) as u64
    }
}

/// A named, ordered key-value table. Keys order bytewise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Table(pub &'static str);

/// One write of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOp {
    /// Insert or replace.
    Put {
        /// Table written.
        table: Table,
        /// Key.
        key: Vec<u8>,
        /// Value (shared, not copied, with whoever else holds it: the MLS storage keeps the
        /// same bytes in memory that the store keeps).
        value: Bytes,
    },
    /// Remove if present.
    Delete {
        /// Table written.
        table: Table,
        /// Key.
        key: Vec<u8>,
    },
}

/// Writes committed atomically: after a crash either all of them are on disk or none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    ops: Vec<WriteOp>,
}

impl WriteBatch {
    /// Adds a put.
    pub fn put(&mut self, table: Table, key: Vec<u8>, value: impl Into<Bytes>) {
        self.ops.push(WriteOp::Put {
            table,
            key,
            value: value.into(),
        });
    }

    /// Adds a delete.
    pub fn delete(&mut self, table: Table, key: Vec<u8>) {
        self.ops.push(WriteOp::Delete { table, key });
    }

    /// True if nothing is written.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Number of writes.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Bytes of the values put (what a commit of this batch writes, keys and deletes aside).
    pub fn put_bytes(&self) -> usize {
        self.ops
            .iter()
            .map(|op| match op {
                WriteOp::Put { value, .. } => value.len(),
                WriteOp::Delete { .. } => 0,
            })
            .sum()
    }

    /// The writes in order.
    pub fn ops(&self) -> &[WriteOp] {
        &self.ops
    }

    /// Takes the writes out, leaving the batch empty.
    pub fn take(&mut self) -> WriteBatch {
        WriteBatch {
            ops: core::mem::take(&mut self.ops),
        }
    }
}

/// A store failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Stored bytes do not decode: the data directory is damaged or from another version.
    #[error("stored record in table {table} is corrupt: {reason}; restore the data directory from a backup")]
    Corrupt {
        /// Table holding the record.
        table: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// The backend failed (I/O error, full disk).
    #[error("storage backend failed: {0}")]
    Backend(String),
    /// The store cannot be used as it is (another process holds it, other users can read it);
    /// the message says what to do.
    #[error("{0}")]
    Refused(String),
    /// The store as a whole is damaged (a page fails its checksum, the file is empty); the
    /// message names the file and what to do.
    #[error("{0}")]
    Damaged(String),
}

/// Proof that a batch was committed: only [`commit_durably`] makes one, after a [`Store`]
/// reported the batch durable. It is what releases outputs held for the batch.
#[derive(Debug)]
pub struct CommitReceipt {
    _private: (),
}

/// Commits `batch` into `store` and returns the receipt that releases the outputs held for it.
pub fn commit_durably(
    store: &mut (impl Store + ?Sized),
    batch: WriteBatch,
) -> Result<CommitReceipt, StoreError> {
    store.commit(batch)?;
    Ok(CommitReceipt { _private: () })
}

/// A visitor of `(key, value)` records in key order; it breaks to stop the scan.
pub type Visit<'a> = dyn FnMut(&[u8], &[u8]) -> ControlFlow<()> + 'a;

/// Read access to committed data, used when a state machine recovers after a restart.
pub trait StoreRead {
    /// The value under `key`, if any.
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Visits entries with `start <= key` in key order until `visit` breaks.
    fn scan_from(
        &self,
        table: Table,
        start: &[u8],
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError>;
}

/// Ordered tables with atomic batched commits, synchronous like redb.
///
/// The contract is kept small so that a replicated log (per-subject sequence numbers and
/// expected-last-sequence writes, as NATS JetStream offers) can back it later.
pub trait Store: StoreRead {
    /// Commits `batch` atomically and durably: it returns only once the batch would survive a
    /// crash. Outputs are released through [`commit_durably`], which calls this.
    fn commit(&mut self, batch: WriteBatch) -> Result<(), StoreError>;
}

/// Writes to commit and the outputs they release, handed out by a state machine together.
///
/// Most outputs are *held*: they may leave only after the writes are durable (persist, then
/// speak). A state machine may also mark outputs *eager* when they do not depend on any write of
/// this or an earlier batch, such as a node transmitting a message whose outbox entry is being
/// written in the same batch: the gateway deduplicates by message id, so sending it before the
/// outbox commit risks nothing, and it takes one fsync off the path of every message. A driver
/// takes eager outputs with [`Ready::take_eager`] and releases them at once (they may overtake
/// held outputs); if it does not, [`Ready::split`] holds them with the rest, ahead of the others.
#[must_use = "a Ready must be committed and its outputs released"]
pub struct Ready<O> {
    /// The writes to commit before any held output may leave.
    writes: WriteBatch,
    outputs: Vec<O>,
    eager: Vec<O>,
}

impl<O> Ready<O> {
    /// Built by state machines from their pending writes and (held) outputs.
    pub fn new(writes: WriteBatch, outputs: Vec<O>) -> Ready<O> {
        Ready {
            writes,
            outputs,
            eager: Vec::new(),
        }
    }

    /// Like [`Ready::new`], with outputs that may leave before the commit.
    pub fn with_eager(writes: WriteBatch, outputs: Vec<O>, eager: Vec<O>) -> Ready<O> {
        Ready {
            writes,
            outputs,
            eager,
        }
    }

    /// The writes to commit before any held output may leave.
    pub fn writes(&self) -> &WriteBatch {
        &self.writes
    }

    /// Takes the outputs that may leave now, before the commit (in the order produced).
    pub fn take_eager(&mut self) -> Vec<O> {
        std::mem::take(&mut self.eager)
    }

    /// Appends `later` to this batch (group commit): its writes after ours, its outputs after
    /// ours, so order and the persist-then-speak rule are both kept.
    pub fn merge(&mut self, later: Ready<O>) {
        self.writes.ops.extend(later.writes.ops);
        self.outputs.extend(later.outputs);
        self.eager.extend(later.eager);
    }

    /// Turns each output into a driver's own type, keeping the writes (drivers add their own
    /// outputs, such as replies to local callers, that must also wait for the commit).
    pub fn map<P>(self, mut f: impl FnMut(O) -> P) -> Ready<P> {
        Ready {
            writes: self.writes,
            outputs: self.outputs.into_iter().map(&mut f).collect(),
            eager: self.eager.into_iter().map(&mut f).collect(),
        }
    }

    /// Adds an output released with this batch's commit, after the ones already held.
    pub fn push_output(&mut self, output: O) {
        self.outputs.push(output);
    }

    /// Splits into the writes and the outputs held back until the commit succeeds.
    pub fn split(self) -> (WriteBatch, HeldOutputs<O>) {
        let mut held = self.eager;
        held.extend(self.outputs);
        (self.writes, HeldOutputs(held))
    }

    /// Commits the writes into `store` and returns the outputs (the synchronous path).
    pub fn commit(self, store: &mut dyn Store) -> Result<Vec<O>, StoreError> {
        let (writes, held) = self.split();
        let receipt = commit_durably(store, writes)?;
        Ok(held.release(receipt))
    }
}

impl<O: fmt::Debug> fmt::Debug for Ready<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ready")
            .field("writes", &self.writes.len())
            .field("outputs", &self.outputs)
            .field("eager", &self.eager)
            .finish()
    }
}

/// Outputs waiting for their commit.
#[derive(Debug)]
pub struct HeldOutputs<O>(Vec<O>);

impl<O> HeldOutputs<O> {
    /// The outputs, released by the receipt of the commit that carried their writes.
    pub fn release(self, _receipt: CommitReceipt) -> Vec<O> {
        self.0
    }

    /// Number of outputs held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if nothing is held.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// An in-memory [`Store`]: ordered tables in `BTreeMap`s, each commit applied whole.
///
/// The simulator's disk model keeps its committed state here (latency and crashes are the
/// world's business), and tests use it wherever a store is needed.
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    tables: BTreeMap<&'static str, BTreeMap<Vec<u8>, Bytes>>,
    commits: u64,
}

impl MemStore {
    /// Committed batches so far.
    pub fn commits(&self) -> u64 {
        self.commits
    }

    /// Number of records in a table.
    pub fn table_len(&self, table: Table) -> usize {
        self.tables.get(table.0).map_or(0, BTreeMap::len)
    }

    /// Every record as (table, key, value), for tests that search what a store holds.
    pub fn records(&self) -> impl Iterator<Item = (&'static str, &[u8], &[u8])> + '_ {
        self.tables.iter().flat_map(|(table, records)| {
            records
                .iter()
                .map(move |(k, v)| (*table, k.as_slice(), &v[..]))
        })
    }
}

impl StoreRead for MemStore {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tables
            .get(table.0)
            .and_then(|t| t.get(key))
            .map(|v| v.to_vec()))
    }

    fn scan_from(
        &self,
        table: Table,
        start: &[u8],
        visit: &mut Visit<'_>,
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

impl Store for MemStore {
    fn commit(&mut self, batch: WriteBatch) -> Result<(), StoreError> {
        for op in batch.ops {
            match op {
                WriteOp::Put { table, key, value } => {
                    self.tables.entry(table.0).or_default().insert(key, value);
                }
                WriteOp::Delete { table, key } => {
                    if let Some(t) = self.tables.get_mut(table.0) {
                        t.remove(&key);
                    }
                }
            }
        }
        self.commits += 1;
        Ok(())
    }
}

/// Visits every record of `table` in key order; the first error from `visit` stops the scan and
/// is returned. Recovery code uses it to read tables back without boilerplate.
pub fn scan_all(
    store: &dyn StoreRead,
    table: Table,
    mut visit: impl FnMut(&[u8], &[u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut result = Ok(());
    store.scan_from(table, &[], &mut |key, value| match visit(key, value) {
        Ok(()) => ControlFlow::Continue(()),
        Err(e) => {
            result = Err(e);
            ControlFlow::Break(())
        }
    })?;
    result
}

/// Entropy for unit tests: a byte counter starting after the given byte, so that each test's
/// keys and nonces are fixed and distinct streams differ by their start.
#[cfg(test)]
pub(crate) struct CountingEntropy(pub u8);

#[cfg(test)]
impl Entropy for CountingEntropy {
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for b in dest {
            self.0 = self.0.wrapping_add(1);
            *b = self.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Table = Table("t");

    fn batch(key: u8) -> WriteBatch {
        let mut writes = WriteBatch::default();
        writes.put(T, vec![key], vec![key]);
        writes
    }

    #[test]
    fn merged_batches_keep_writes_held_and_eager_outputs_in_order() {
        let mut first = Ready::with_eager(batch(1), vec!["held 1"], vec!["eager 1"]);
        first.merge(Ready::with_eager(batch(2), vec!["held 2"], vec!["eager 2"]));
        assert_eq!(first.writes().len(), 2);
        assert_eq!(first.take_eager(), vec!["eager 1", "eager 2"]);
        assert!(first.take_eager().is_empty(), "taken once");
        let mut store = MemStore::default();
        assert_eq!(first.commit(&mut store).unwrap(), vec!["held 1", "held 2"]);
    }

    #[test]
    fn eager_outputs_a_driver_does_not_take_wait_for_the_commit_ahead_of_the_rest() {
        let ready = Ready::with_eager(batch(1), vec!["held"], vec!["eager"]);
        let (writes, held) = ready.split();
        assert_eq!(writes.len(), 1);
        assert_eq!(held.len(), 2);
        let receipt = commit_durably(&mut MemStore::default(), writes).unwrap();
        assert_eq!(held.release(receipt), vec!["eager", "held"]);
    }

    #[test]
    fn map_converts_held_and_eager_outputs() {
        let mut ready = Ready::with_eager(batch(1), vec![1], vec![2]).map(|n| n * 10);
        assert_eq!(ready.take_eager(), vec![20]);
        ready.push_output(5);
        assert_eq!(ready.commit(&mut MemStore::default()).unwrap(), vec![10, 5]);
    }
}
