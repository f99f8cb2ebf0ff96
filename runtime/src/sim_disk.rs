//! A simulated machine's disk: redb's file in memory, with the failures real disks have.
//!
//! A [`SimulatedDisk`] is a handle the simulation keeps across the machine's restarts. It holds
//! the machine's database file as two images: what the running process sees (`current`) and what
//! survives a power cut (`durable`). A write reaches `current` at once and waits in a list of
//! unsynced writes; `sync_data` makes them durable, as fsync does. Three failures are switches:
//!
//! - **full** ([`SimulatedDisk::set_full`]): every commit with writes fails as a full disk makes
//!   redb fail, so the drivers' outage and recovery code runs for real;
//! - **power cut** ([`SimulatedDisk::power_cut`]): what was not synced survives only in part,
//!   512-byte sector by sector as the caller's coin says (a torn write), the old process's file
//!   handle goes dead, and the next open reads what survived;
//! - **lying fsync** ([`SimulatedDisk::set_lying`]): `sync_data` answers success and makes
//!   nothing durable, as a disk with a volatile write cache and no barriers does; a power cut
//!   then loses (in part) every commit since the disk began to lie.
//!
//! redb's commit protocol (checksummed pages, copy on write, a header that names the last
//! commit) must turn a torn last commit back into the one before it; the tests below check that
//! on the real redb, through the same [`crate::store::RedbStore`] the drivers use.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// The unit a power cut keeps or loses: a disk sector.
pub const SECTOR: usize = 512;

/// One write the disk has not synced yet.
#[derive(Clone, Debug)]
enum Unsynced {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct FileState {
    current: Vec<u8>,
    durable: Vec<u8>,
    unsynced: Vec<Unsynced>,
    lying: bool,
    /// Bumped by each power cut: a backend of an older generation belongs to a process that
    /// died with the power, and everything it tries fails.
    generation: u64,
    /// Writes and syncs left before the disk dies by itself ([`SimulatedDisk::fail_after`]).
    fuse: Option<u64>,
    /// Counters for reports and tests.
    syncs: u64,
    lied_syncs: u64,
}

/// A simulated machine's disk (see the module docs). Cloning gives another handle to the same
/// disk.
#[derive(Clone, Default)]
pub struct SimulatedDisk {
    full: Arc<AtomicBool>,
    file: Arc<Mutex<FileState>>,
}

impl fmt::Debug for SimulatedDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        f.debug_struct("SimulatedDisk")
            .field("full", &self.is_full())
            .field("len", &state.current.len())
            .field("unsynced", &state.unsynced.len())
            .field("lying", &state.lying)
            .finish()
    }
}

/// What a power cut did to the unsynced writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PowerCut {
    /// Sectors (and length changes) that were waiting for a sync.
    pub unsynced: usize,
    /// How many of them survived.
    pub kept: usize,
}

impl SimulatedDisk {
    fn state(&self) -> MutexGuard<'_, FileState> {
        // A panic while the lock was held already failed the run; the state is still whole.
        self.file.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fills (`true`) or frees (`false`) the disk.
    pub fn set_full(&self, full: bool) {
        self.full.store(full, Ordering::SeqCst);
    }

    /// True while the disk is full.
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::SeqCst)
    }

    /// Makes fsync lie (`true`: it succeeds and syncs nothing) or tell the truth again
    /// (`false`: the cache is flushed, so everything written is durable now).
    pub fn set_lying(&self, lying: bool) {
        let mut state = self.state();
        state.lying = lying;
        if !lying {
            flush(&mut state);
        }
    }

    /// True while fsync lies.
    pub fn is_lying(&self) -> bool {
        self.state().lying
    }

    /// True if the file was never written: opening it creates a new database.
    pub fn is_blank(&self) -> bool {
        self.state().current.is_empty()
    }

    /// How many syncs succeeded, and how many of them lied.
    pub fn syncs(&self) -> (u64, u64) {
        let state = self.state();
        (state.syncs, state.lied_syncs)
    }

    /// The power goes by itself after `ops` more writes, length changes or syncs: a power cut
    /// in the middle of a commit. Every later operation fails; [`SimulatedDisk::power_cut`] then
    /// says what survived.
    pub fn fail_after(&self, ops: u64) {
        self.state().fuse = Some(ops);
    }

    /// A handle for redb, for a process that opens the file now.
    pub fn backend(&self) -> SimulatedFile {
        SimulatedFile {
            file: self.file.clone(),
            generation: self.state().generation,
        }
    }

    /// The power goes: each unsynced sector (and length change) survives if `keep` says so,
    /// in the order they were written; the file reads what survived from now on, and the handle
    /// of the process that was running fails from now on.
    pub fn power_cut(&self, keep: &mut dyn FnMut() -> bool) -> PowerCut {
        let mut state = self.state();
        let mut image = std::mem::take(&mut state.durable);
        let mut cut = PowerCut::default();
        for write in std::mem::take(&mut state.unsynced) {
            match write {
                Unsynced::SetLen(len) => {
                    cut.unsynced += 1;
                    if keep() {
                        cut.kept += 1;
                        image.resize(to_usize(len), 0);
                    }
                }
                Unsynced::Write { offset, data } => {
                    let start = to_usize(offset);
                    for (i, sector) in data.chunks(SECTOR).enumerate() {
                        cut.unsynced += 1;
                        if keep() {
                            cut.kept += 1;
                            write_at(&mut image, start + i * SECTOR, sector);
                        }
                    }
                }
            }
        }
        state.current = image.clone();
        state.durable = image;
        state.generation += 1;
        state.fuse = None;
        cut
    }
}

/// Makes every unsynced write durable. It applies what waited rather than copying the whole
/// image: a commit writes a few pages.
fn flush(state: &mut FileState) {
    let FileState {
        durable, unsynced, ..
    } = state;
    for write in unsynced.drain(..) {
        match write {
            Unsynced::SetLen(len) => durable.resize(to_usize(len), 0),
            Unsynced::Write { offset, data } => write_at(durable, to_usize(offset), &data),
        }
    }
    debug_assert_eq!(
        state.durable.len(),
        state.current.len(),
        "a flush leaves nothing unsynced"
    );
}

/// Writes `data` at `at`, growing the image with zeros as a file grows.
fn write_at(image: &mut Vec<u8>, at: usize, data: &[u8]) {
    if image.len() < at + data.len() {
        image.resize(at + data.len(), 0);
    }
    image[at..at + data.len()].copy_from_slice(data);
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).expect("a simulated file fits in memory")
}

/// redb's view of a [`SimulatedDisk`]: one process's open file.
#[derive(Debug)]
pub struct SimulatedFile {
    file: Arc<Mutex<FileState>>,
    generation: u64,
}

impl SimulatedFile {
    fn live(&self) -> io::Result<MutexGuard<'_, FileState>> {
        let state = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if state.generation != self.generation || state.fuse == Some(0) {
            return Err(io::Error::other(
                "the simulated machine lost power; this file handle is gone",
            ));
        }
        Ok(state)
    }

    /// [`SimulatedFile::live`] for an operation that changes the disk: it may be the last.
    fn changing(&self) -> io::Result<MutexGuard<'_, FileState>> {
        let mut state = self.live()?;
        if let Some(left) = state.fuse.as_mut() {
            *left -= 1;
            if *left == 0 {
                return Err(io::Error::other("the simulated machine lost power"));
            }
        }
        Ok(state)
    }
}

impl redb::StorageBackend for SimulatedFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.live()?.current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let state = self.live()?;
        let start = to_usize(offset);
        let Some(bytes) = state.current.get(start..start + out.len()) else {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the simulated file",
            ));
        };
        out.copy_from_slice(bytes);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.changing()?;
        state.current.resize(to_usize(len), 0);
        state.unsynced.push(Unsynced::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.changing()?;
        state.syncs += 1;
        if state.lying {
            state.lied_syncs += 1;
            return Ok(());
        }
        flush(&mut state);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut state = self.changing()?;
        write_at(&mut state.current, to_usize(offset), data);
        state.unsynced.push(Unsynced::Write {
            offset,
            data: data.to_vec(),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use proptest::prelude::*;
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    use rand_chacha::ChaCha20Rng;
    use sund_model::env::{scan_all, Store, StoreError, StoreRead, Table, WriteBatch};

    use super::*;
    use crate::store::RedbStore;

    const ITEMS: Table = Table("items");
    const COUNT: Table = Table("count");

    fn open(disk: &SimulatedDisk) -> Result<RedbStore, StoreError> {
        RedbStore::open_with(Path::new("test.redb"), Some(disk.clone()))
    }

    /// Commit `k` writes item `k` (a few pages' worth, so commits span several sectors and
    /// pages) and sets the count to `k`.
    fn commit(store: &mut RedbStore, k: u64) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.put(ITEMS, k.to_be_bytes().to_vec(), vec![k as u8; 3000]);
        batch.put(COUNT, b"n".to_vec(), k.to_be_bytes().to_vec());
        store.commit(batch)
    }

    /// The store holds exactly commits 1..=n for some n, whole: that n.
    fn consistent_prefix(store: &RedbStore) -> u64 {
        let n = store
            .get(COUNT, b"n")
            .unwrap()
            .map_or(0, |v| u64::from_be_bytes(v.try_into().unwrap()));
        let mut seen = Vec::new();
        scan_all(store, ITEMS, |key, value| {
            let k = u64::from_be_bytes(key.try_into().unwrap());
            assert_eq!(value, vec![k as u8; 3000].as_slice(), "item {k} is whole");
            seen.push(k);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            (1..=n).collect::<Vec<_>>(),
            "items 1..={n} and nothing else"
        );
        n
    }

    #[test]
    fn a_clean_reopen_sees_every_commit() {
        let disk = SimulatedDisk::default();
        let mut store = open(&disk).unwrap();
        for k in 1..=5 {
            commit(&mut store, k).unwrap();
        }
        drop(store);
        assert_eq!(consistent_prefix(&open(&disk).unwrap()), 5);
    }

    #[test]
    fn a_power_cut_after_true_syncs_loses_nothing() {
        let disk = SimulatedDisk::default();
        let mut store = open(&disk).unwrap();
        for k in 1..=5 {
            commit(&mut store, k).unwrap();
        }
        let cut = disk.power_cut(&mut || false);
        assert_eq!(cut.unsynced, 0, "every commit synced before it returned");
        drop(store);
        assert_eq!(consistent_prefix(&open(&disk).unwrap()), 5);
    }

    #[test]
    fn the_dead_process_cannot_write_after_the_power_cut() {
        let disk = SimulatedDisk::default();
        let mut store = open(&disk).unwrap();
        commit(&mut store, 1).unwrap();
        disk.power_cut(&mut || true);
        assert!(commit(&mut store, 2).is_err(), "its file handle is gone");
        drop(store);
        assert_eq!(consistent_prefix(&open(&disk).unwrap()), 1);
    }

    #[test]
    fn a_lying_fsync_and_a_power_cut_lose_commits_reported_durable() {
        let disk = SimulatedDisk::default();
        let mut store = open(&disk).unwrap();
        commit(&mut store, 1).unwrap();
        disk.set_lying(true);
        for k in 2..=4 {
            commit(&mut store, k).unwrap();
        }
        assert!(disk.syncs().1 >= 3, "each commit's sync lied");
        disk.power_cut(&mut || false);
        drop(store);
        assert_eq!(
            consistent_prefix(&open(&disk).unwrap()),
            1,
            "commits 2..=4 returned success and are gone: the hazard the protocol must detect"
        );
    }

    #[test]
    fn an_honest_sync_after_lying_makes_everything_durable() {
        let disk = SimulatedDisk::default();
        let mut store = open(&disk).unwrap();
        disk.set_lying(true);
        commit(&mut store, 1).unwrap();
        commit(&mut store, 2).unwrap();
        disk.set_lying(false);
        commit(&mut store, 3).unwrap();
        disk.power_cut(&mut || false);
        drop(store);
        assert_eq!(consistent_prefix(&open(&disk).unwrap()), 3);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// A power cut in the middle of a commit, with any subset of its unsynced sectors
        /// surviving: redb reopens at the last commit that returned, or at the torn one whole
        /// if all of it survived; never damaged, never a mixture.
        #[test]
        fn a_torn_commit_reopens_at_a_whole_commit(
            done in 0u64..6,
            ops in 1u64..40,
            seed in any::<u64>(),
        ) {
            let disk = SimulatedDisk::default();
            let mut store = open(&disk).unwrap();
            for k in 1..=done {
                commit(&mut store, k).unwrap();
            }
            disk.fail_after(ops);
            let torn = commit(&mut store, done + 1);
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            disk.power_cut(&mut || rng.next_u32() & 1 == 1);
            drop(store);
            let reopened = open(&disk).unwrap();
            let n = consistent_prefix(&reopened);
            if torn.is_ok() {
                prop_assert_eq!(n, done + 1, "a commit that returned is durable");
            } else {
                prop_assert!(n == done || n == done + 1, "reopened at {n} after {done}");
            }
        }

        /// Fsync lies from commit `honest + 1` on, then the power goes with any subset of the
        /// unsynced sectors surviving: the store reopens at a whole commit or refuses to open
        /// as damaged, and never reads a mixture of commits. The whole commit may be older than
        /// the last honest one, down to the empty database: redb's two header slots were both
        /// rewritten while the disk lied (found here; this is why the gateway refuses an empty
        /// database in a data directory that served before).
        #[test]
        fn a_lying_fsync_reopens_whole_or_says_damaged(
            honest in 0u64..4,
            lied in 1u64..6,
            seed in any::<u64>(),
        ) {
            let disk = SimulatedDisk::default();
            let mut store = open(&disk).unwrap();
            for k in 1..=honest {
                commit(&mut store, k).unwrap();
            }
            disk.set_lying(true);
            for k in honest + 1..=honest + lied {
                commit(&mut store, k).unwrap();
            }
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            disk.power_cut(&mut || rng.next_u32() & 1 == 1);
            drop(store);
            match open(&disk) {
                Ok(reopened) => {
                    let n = consistent_prefix(&reopened);
                    prop_assert!(n <= honest + lied, "reopened at {n}");
                }
                Err(StoreError::Damaged(why)) => {
                    prop_assert!(why.contains("restore"), "the error says what to do: {why}");
                }
                Err(other) => prop_assert!(false, "neither whole nor damaged: {other}"),
            }
        }
    }
}
