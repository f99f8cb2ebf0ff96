//! The gateway's runs (each start from the store is a new one), which run began sequencing
//! where in each conversation, and in which run each device last opened a session: knowledge
//! that tells what a device read apart from what the log holds now, across any number of
//! restarts.
//!
//! Why: a disk whose fsync lies loses commits it reported durable. A device may have read
//! messages the gateway then lost and gave to other messages, and the gateway may restart
//! again (honestly) before the device comes back. The device read nothing sequenced in a run
//! after the run of its last session, so any message of such a run at a seq it says it read
//! is one where its history and the log's differ.
//!
//! The run of a device's last session travels with the device, not in the gateway's store: a
//! session the lying disk forgot may still have read messages that were durable before the
//! disk began to lie, and those the device did read as the log holds them. So each resume
//! token starts with the run that issued it and that run's nonce (a random number drawn at
//! each start), which the device presents at its next `Hello` (the node keeps its last token
//! until a new one replaces it, even one the gateway no longer knows). A token of a run whose
//! nonce is not the recorded one comes from a run the disk lost whole, whose number was used
//! again: the device read nothing of the run that now has that number.
//!
//! Records:
//! - `runs`: key `run(8)`, value its nonce (8); written with the first record a run makes
//!   (its first token or message), so a run that wrote nothing leaves its number to the next.
//! - `run_starts`: key `conversation(16) ++ run(8)`, value the first seq that run sequenced
//!   in the conversation (8). Placeholders of lost seqs and copies of another gateway's log
//!   do not count: they are not new messages of this gateway. A record goes once the log's
//!   retained entries all come after the next one.

use std::collections::BTreeMap;

use crate::env::{scan_all, StoreError, StoreRead, Table, WriteBatch};
use crate::ids::ConversationId;

/// Table of the gateway's runs and their nonces (see the module docs).
pub const RUNS_TABLE: Table = Table("runs");
/// Table of the first seq each run sequenced in each conversation (see the module docs).
pub const RUN_STARTS_TABLE: Table = Table("run_starts");

/// Bytes at the start of a resume token that name the run that issued it.
pub const TOKEN_STAMP_BYTES: usize = 16;

/// The runs' records, in memory as in the store.
#[derive(Debug)]
pub struct Runs {
    /// This run's number: one more than the last run that wrote a record.
    current: u64,
    /// This run's nonce.
    nonce: u64,
    /// Whether this run's record is in the store yet (it goes with the first other record).
    written: bool,
    /// Each run's nonce.
    nonces: BTreeMap<u64, u64>,
    /// Per conversation, each run that sequenced there, with the first seq it gave.
    starts: BTreeMap<ConversationId, BTreeMap<u64, u64>>,
}

impl Default for Runs {
    /// The first run of an empty store (nonce 0 until [`Runs::start`] draws one).
    fn default() -> Runs {
        Runs {
            current: 1,
            nonce: 0,
            written: false,
            nonces: BTreeMap::new(),
            starts: BTreeMap::new(),
        }
    }
}

fn corrupt(table: Table, reason: String) -> StoreError {
    StoreError::Corrupt {
        table: table.0,
        reason,
    }
}

fn u64_at(table: Table, bytes: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = bytes
        .try_into()
        .map_err(|_| corrupt(table, format!("{} bytes, want 8", bytes.len())))?;
    Ok(u64::from_be_bytes(bytes))
}

fn start_key(conv: ConversationId, run: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(24);
    key.extend_from_slice(&conv.0.to_be_bytes());
    key.extend_from_slice(&run.to_be_bytes());
    key
}

impl Runs {
    /// Reads the records back; the run that starts now is one after the last that wrote.
    pub fn recover(store: &dyn StoreRead) -> Result<Runs, StoreError> {
        let mut runs = Runs::default();
        scan_all(store, RUNS_TABLE, |key, value| {
            let run = u64_at(RUNS_TABLE, key)?;
            let nonce = u64_at(RUNS_TABLE, value)?;
            runs.nonces.insert(run, nonce);
            Ok(())
        })?;
        scan_all(store, RUN_STARTS_TABLE, |key, value| {
            if key.len() != 24 {
                return Err(corrupt(
                    RUN_STARTS_TABLE,
                    format!("key of {} bytes, want 24", key.len()),
                ));
            }
            let conv = ConversationId(u128::from_be_bytes(key[..16].try_into().expect("16")));
            let run = u64_at(RUN_STARTS_TABLE, &key[16..])?;
            let seq = u64_at(RUN_STARTS_TABLE, value)?;
            runs.starts.entry(conv).or_default().insert(run, seq);
            Ok(())
        })?;
        let last = runs.nonces.keys().next_back().copied().unwrap_or(0);
        let newest = runs
            .starts
            .values()
            .flat_map(|s| s.keys())
            .copied()
            .max()
            .unwrap_or(0);
        if newest > last {
            return Err(corrupt(
                RUN_STARTS_TABLE,
                format!("a record of run {newest}, after the last run {last}"),
            ));
        }
        runs.current = last + 1;
        Ok(runs)
    }

    /// A new run begins with this nonce (drawn from the gateway's entropy).
    pub fn start(&mut self, nonce: u64) {
        debug_assert!(!self.written, "a run starts before it writes");
        self.nonce = nonce;
    }

    /// This run's number.
    pub fn current(&self) -> u64 {
        self.current
    }

    fn write_current(&mut self, writes: &mut WriteBatch) {
        if !self.written {
            writes.put(
                RUNS_TABLE,
                self.current.to_be_bytes().to_vec(),
                self.nonce.to_be_bytes().to_vec(),
            );
            self.nonces.insert(self.current, self.nonce);
            self.written = true;
        }
    }

    /// The start of a resume token this run issues (its number and nonce), with the run's
    /// record if it is not written yet.
    pub fn token_stamp(&mut self, writes: &mut WriteBatch) -> [u8; TOKEN_STAMP_BYTES] {
        self.write_current(writes);
        let mut stamp = [0u8; TOKEN_STAMP_BYTES];
        stamp[..8].copy_from_slice(&self.current.to_be_bytes());
        stamp[8..].copy_from_slice(&self.nonce.to_be_bytes());
        stamp
    }

    /// The last run whose messages a device presenting `token` (the one its last session got,
    /// if any) may have read: `None` if that session was in this run. A device without a
    /// token, or with one no run of this store issued, may have read nothing sequenced in
    /// any run this store remembers (0).
    pub fn last_read_run(&self, token: Option<&[u8; 32]>) -> Option<u64> {
        let Some(token) = token else {
            return Some(0);
        };
        let run = u64::from_be_bytes(token[..8].try_into().expect("8 bytes"));
        let nonce = u64::from_be_bytes(token[8..16].try_into().expect("8 bytes"));
        if run == self.current && nonce == self.nonce {
            return None;
        }
        if run > self.current {
            return Some(0);
        }
        match self.nonces.get(&run) {
            Some(&recorded) if recorded == nonce => Some(run),
            // A run the disk lost whole, whose number another run took since.
            _ => Some(run.saturating_sub(1)),
        }
    }

    /// This gateway sequenced a new message at `seq` in `conv` (not a placeholder, not a
    /// copy of another gateway's log): the first one of this run there is recorded.
    pub fn sequenced(&mut self, conv: ConversationId, seq: u64, writes: &mut WriteBatch) {
        let starts = self.starts.entry(conv).or_default();
        if let Some((&run, &first)) = starts.last_key_value() {
            if run == self.current {
                debug_assert!(first <= seq, "seqs rise within a run");
                return;
            }
            debug_assert!(first < seq, "a later run sequences after an earlier one");
        }
        starts.insert(self.current, seq);
        writes.put(
            RUN_STARTS_TABLE,
            start_key(conv, self.current),
            seq.to_be_bytes().to_vec(),
        );
        self.write_current(writes);
    }

    /// The first seq of `conv` this gateway sequenced in a run after `run`, if any: a device
    /// that read nothing after `run` cannot have read a message sequenced from there on.
    pub fn first_seq_after(&self, conv: ConversationId, run: u64) -> Option<u64> {
        let starts = self.starts.get(&conv)?;
        starts.range(run + 1..).next().map(|(_, &seq)| seq)
    }

    /// `conv` retains nothing before `first_seq` any more: the records that only told about
    /// seqs before it go (the newest stays).
    pub fn collected(&mut self, conv: ConversationId, first_seq: u64, writes: &mut WriteBatch) {
        let Some(starts) = self.starts.get_mut(&conv) else {
            return;
        };
        loop {
            let mut records = starts.iter();
            let (Some((&run, _)), Some((_, &next))) = (records.next(), records.next()) else {
                break;
            };
            if next > first_seq {
                break;
            }
            starts.remove(&run);
            writes.delete(RUN_STARTS_TABLE, start_key(conv, run));
        }
    }

    /// Records kept for `conv` (for tests and the bound on their number).
    #[cfg(test)]
    pub fn starts(&self, conv: ConversationId) -> Vec<(u64, u64)> {
        self.starts
            .get(&conv)
            .map(|s| s.iter().map(|(&r, &q)| (r, q)).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{MemStore, Store};

    const CONV: ConversationId = ConversationId(7);

    /// Commits `writes` and starts the next run from the store, with `nonce`.
    fn restart(store: &mut MemStore, writes: WriteBatch, nonce: u64) -> Runs {
        store.commit(writes).expect("commits");
        let mut runs = Runs::recover(store).expect("recovers");
        runs.start(nonce);
        runs
    }

    fn token(stamp: [u8; TOKEN_STAMP_BYTES]) -> [u8; 32] {
        let mut token = [0xAB; 32];
        token[..TOKEN_STAMP_BYTES].copy_from_slice(&stamp);
        token
    }

    #[test]
    fn a_run_that_wrote_nothing_leaves_its_number_to_the_next() {
        let mut store = MemStore::default();
        let runs = restart(&mut store, WriteBatch::default(), 11);
        assert_eq!(runs.current(), 1);
        let mut runs = restart(&mut store, WriteBatch::default(), 12);
        assert_eq!(runs.current(), 1);
        let mut writes = WriteBatch::default();
        let first = token(runs.token_stamp(&mut writes));
        assert_eq!(runs.last_read_run(Some(&first)), None, "this run's session");
        assert_eq!(runs.last_read_run(None), Some(0));
        let runs = restart(&mut store, writes, 13);
        assert_eq!(runs.current(), 2);
        assert_eq!(runs.last_read_run(Some(&first)), Some(1));
    }

    #[test]
    fn a_token_of_a_run_the_disk_lost_whole_reads_as_the_run_before() {
        let mut store = MemStore::default();
        let mut runs = restart(&mut store, WriteBatch::default(), 11);
        let mut writes = WriteBatch::default();
        let kept = token(runs.token_stamp(&mut writes));
        // Run 2 issues a token, and its disk loses every write of it.
        let mut runs = restart(&mut store, writes, 12);
        let lost = token(runs.token_stamp(&mut WriteBatch::default()));
        // The next run takes number 2 again, with another nonce.
        let mut runs = restart(&mut store, WriteBatch::default(), 13);
        assert_eq!(runs.current(), 2);
        assert_eq!(runs.last_read_run(Some(&lost)), Some(1));
        assert_eq!(runs.last_read_run(Some(&kept)), Some(1));
        let mine = token(runs.token_stamp(&mut WriteBatch::default()));
        assert_eq!(runs.last_read_run(Some(&mine)), None);
        // A token from another store, or from before tokens were stamped.
        assert_eq!(runs.last_read_run(Some(&[0xFF; 32])), Some(0));
    }

    #[test]
    fn a_device_is_compared_with_what_runs_after_its_last_session_sequenced() {
        let mut store = MemStore::default();
        let mut runs = restart(&mut store, WriteBatch::default(), 11);
        let mut writes = WriteBatch::default();
        let device = token(runs.token_stamp(&mut writes));
        runs.sequenced(CONV, 1, &mut writes);
        runs.sequenced(CONV, 2, &mut writes);
        assert_eq!(runs.first_seq_after(CONV, 0), Some(1));
        assert_eq!(runs.first_seq_after(CONV, 1), None);
        // Run 2 sequences from 2 (its disk lost seq 2 of run 1), run 3 from 5.
        let mut runs = restart(&mut store, writes, 12);
        let mut writes = WriteBatch::default();
        runs.sequenced(CONV, 2, &mut writes);
        let mut runs = restart(&mut store, writes, 13);
        let mut writes = WriteBatch::default();
        runs.sequenced(CONV, 5, &mut writes);
        assert_eq!(runs.first_seq_after(CONV, 1), Some(2));
        assert_eq!(runs.first_seq_after(CONV, 2), Some(5));
        // The device comes back in run 3, after its session of run 1.
        let since = runs.last_read_run(Some(&device)).expect("an earlier run");
        assert_eq!(runs.first_seq_after(CONV, since), Some(2));
        let runs = restart(&mut store, writes, 14);
        assert_eq!(runs.current(), 4);
        assert_eq!(runs.starts(CONV), vec![(1, 1), (2, 2), (3, 5)]);
    }

    #[test]
    fn records_go_once_the_log_keeps_nothing_they_tell_of() {
        let mut store = MemStore::default();
        let mut runs = restart(&mut store, WriteBatch::default(), 1);
        let mut writes = WriteBatch::default();
        runs.sequenced(CONV, 1, &mut writes);
        let mut runs = restart(&mut store, writes, 2);
        let mut writes = WriteBatch::default();
        runs.sequenced(CONV, 10, &mut writes);
        let mut runs = restart(&mut store, writes, 3);
        let mut writes = WriteBatch::default();
        runs.sequenced(CONV, 20, &mut writes);
        runs.collected(CONV, 9, &mut writes);
        assert_eq!(runs.starts(CONV), vec![(1, 1), (2, 10), (3, 20)]);
        runs.collected(CONV, 10, &mut writes);
        assert_eq!(runs.starts(CONV), vec![(2, 10), (3, 20)]);
        runs.collected(CONV, 50, &mut writes);
        assert_eq!(runs.starts(CONV), vec![(3, 20)]);
        let runs = restart(&mut store, writes, 4);
        assert_eq!(runs.starts(CONV), vec![(3, 20)]);
        assert_eq!(runs.first_seq_after(CONV, 0), Some(20));
    }

    #[test]
    fn damaged_records_are_refused() {
        let mut store = MemStore::default();
        let mut writes = WriteBatch::default();
        writes.put(RUNS_TABLE, 1u64.to_be_bytes().to_vec(), vec![0; 8]);
        writes.put(RUN_STARTS_TABLE, vec![1; 23], vec![0; 8]);
        store.commit(writes).expect("commits");
        assert!(matches!(
            Runs::recover(&store),
            Err(StoreError::Corrupt {
                table: "run_starts",
                ..
            })
        ));
        let mut store = MemStore::default();
        let mut writes = WriteBatch::default();
        writes.put(RUNS_TABLE, 1u64.to_be_bytes().to_vec(), vec![0; 7]);
        store.commit(writes).expect("commits");
        assert!(matches!(
            Runs::recover(&store),
            Err(StoreError::Corrupt { table: "runs", .. })
        ));
        let mut store = MemStore::default();
        let mut writes = WriteBatch::default();
        writes.put(RUNS_TABLE, 1u64.to_be_bytes().to_vec(), vec![0; 8]);
        writes.put(
            RUN_STARTS_TABLE,
            start_key(CONV, 2),
            5u64.to_be_bytes().to_vec(),
        );
        store.commit(writes).expect("commits");
        assert!(matches!(
            Runs::recover(&store),
            Err(StoreError::Corrupt {
                table: "run_starts",
                ..
            })
        ));
    }
}
