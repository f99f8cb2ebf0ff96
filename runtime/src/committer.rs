//! Pipelined group commit: the store's fsync runs on its own thread while the core keeps working.
//!
//! A driver's core hands each [`Ready`] to a [`Committer`] instead of committing it in place. In
//! [`CommitMode::Pipelined`] a dedicated thread owns the store: it takes the jobs already queued
//! (up to [`MERGE_BYTES_MAX`] of values, so that a file's chunks cannot make the commit that a
//! message waits for long), merges them into one write transaction (group commit), waits for
//! the fsync, and sends the released outputs back in submission order. Meanwhile the core goes on reading frames and
//! feeding the state machine, so the next batch builds up during the current fsync instead of
//! after it. Outputs still leave only after the commit that carried their writes (the receipt is
//! taken on the commit thread), and jobs complete in the order they were submitted, so the
//! persist-then-speak rule and output order are both kept.
//!
//! [`CommitMode::Inline`] commits on the caller's thread before `submit` returns. Simulations of
//! the drivers (turmoil) use it: a real thread would make their timelines depend on the OS
//! scheduler.

use std::collections::VecDeque;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crate::metrics::Stages;

use sund_model::env::{Ready, Store, StoreError};
use tokio::sync::mpsc;

/// Most jobs (one per core round) waiting for or inside a commit before the core stops reading
/// new input; this is the pipeline's backpressure.
pub const IN_FLIGHT_MAX: usize = 64;

/// Where a driver's commits run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CommitMode {
    /// On a dedicated thread, overlapping the core's work (production).
    #[default]
    Pipelined,
    /// On the core's own thread, before `submit` returns (deterministic driver simulations).
    Inline,
}

/// Runs a driver's commits and gives back, in order, the outputs each commit released.
pub struct Committer<O> {
    inner: Inner<O>,
    in_flight: usize,
    stages: Arc<Stages>,
    /// When each job in flight was submitted (for the commit-wait histogram).
    submitted: VecDeque<Instant>,
}

enum Inner<O> {
    Pipelined {
        jobs: Option<std_mpsc::Sender<Ready<O>>>,
        done: mpsc::UnboundedReceiver<Result<Vec<O>, StoreError>>,
        thread: Option<JoinHandle<()>>,
    },
    Inline {
        store: Box<dyn Store + Send>,
        done: VecDeque<Result<Vec<O>, StoreError>>,
    },
}

/// Most bytes the commit thread merges into one commit, beyond its first job. Without a bound,
/// a file upload's chunks queued behind a commit all went into the next one, and a message that
/// arrived meanwhile waited for all of it. With 1 MiB (until 2026-12-07) each commit held one
/// chunk and a transfer moved one chunk per disk round trip; with 8 MiB, and the chunks' files
/// written several at a time, a 1 GiB fetch went from 250-265 to 325-340 MiB/s on this VM while
/// messages beside it kept a p99 of 10-13 ms (`scripts/file-bench.sh`).
pub const MERGE_BYTES_MAX: usize = 8 << 20;

/// A commit at least this slow is described in a debug line (writes, deletes, bytes put).
const SLOW_COMMIT: std::time::Duration = std::time::Duration::from_millis(20);

/// Commits `ready` into `store`, timing the commit and counting its writes.
fn commit_timed<O>(
    ready: Ready<O>,
    store: &mut dyn Store,
    stages: &Stages,
) -> Result<Vec<O>, StoreError> {
    let writes = ready.writes().len() as u64;
    // What a slow commit held, for the debug line below (counted only when it may be printed).
    let slow_summary = tracing::enabled!(tracing::Level::DEBUG).then(|| {
        let batch = ready.writes();
        let deletes = batch
            .ops()
            .iter()
            .filter(|op| matches!(op, sund_model::env::WriteOp::Delete { .. }))
            .count();
        (deletes, batch.put_bytes())
    });
    let started = Instant::now();
    let result = ready.commit(store);
    if writes > 0 {
        let took = started.elapsed();
        stages.fsync.record_duration(took);
        stages.commit_writes.record(writes);
        if let Some((deletes, bytes)) = slow_summary.filter(|_| took >= SLOW_COMMIT) {
            tracing::debug!(
                took_ms = took.as_millis() as u64,
                writes,
                deletes,
                put_bytes = bytes,
                "slow commit"
            );
        }
    }
    result
}

impl<O: Send + 'static> Committer<O> {
    /// Takes ownership of `store`; in pipelined mode starts the commit thread.
    pub fn new(mode: CommitMode, store: impl Store + Send + 'static, name: &str) -> Committer<O> {
        Committer::with_stages(mode, store, name, Arc::default())
    }

    /// Like [`Committer::new`], recording commit times and sizes in `stages`.
    pub fn with_stages(
        mode: CommitMode,
        store: impl Store + Send + 'static,
        name: &str,
        stages: Arc<Stages>,
    ) -> Committer<O> {
        let inner = match mode {
            CommitMode::Inline => Inner::Inline {
                store: Box::new(store),
                done: VecDeque::new(),
            },
            CommitMode::Pipelined => {
                let (jobs_tx, jobs_rx) = std_mpsc::channel::<Ready<O>>();
                let (done_tx, done_rx) = mpsc::unbounded_channel();
                let thread_stages = stages.clone();
                let thread = std::thread::Builder::new()
                    .name(format!("{name}-commit"))
                    .spawn(move || commit_thread(store, jobs_rx, done_tx, &thread_stages))
                    .expect("spawning the commit thread");
                Inner::Pipelined {
                    jobs: Some(jobs_tx),
                    done: done_rx,
                    thread: Some(thread),
                }
            }
        };
        Committer {
            inner,
            in_flight: 0,
            stages,
            submitted: VecDeque::new(),
        }
    }

    /// Queues `ready` for commit. Its outputs come back from [`Committer::completed`].
    pub fn submit(&mut self, ready: Ready<O>) {
        self.in_flight += 1;
        self.submitted.push_back(Instant::now());
        match &mut self.inner {
            Inner::Inline { store, done } => {
                done.push_back(commit_timed(ready, store.as_mut(), &self.stages))
            }
            Inner::Pipelined { jobs, done: _, .. } => {
                let sent = jobs.as_ref().map(|jobs| jobs.send(ready));
                // The thread only stops when `jobs` closes or after a failed commit, which it
                // reports first; a lost job is then reported by `completed` as a backend error.
                if !matches!(sent, Some(Ok(()))) {
                    self.in_flight -= 1;
                    self.submitted.pop_back();
                    if let Inner::Pipelined { jobs, .. } = &mut self.inner {
                        *jobs = None;
                    }
                }
            }
        }
    }

    /// True while no more input should be read: too many commits are waiting.
    pub fn is_saturated(&self) -> bool {
        self.in_flight >= IN_FLIGHT_MAX
    }

    /// True if some submitted job has not been handed back yet.
    pub fn is_busy(&self) -> bool {
        self.in_flight > 0
    }

    /// Waits for the next finished commit and returns the outputs it released, in submission
    /// order. Never resolves while nothing is in flight (so it can sit in a `select!`).
    pub async fn completed(&mut self) -> Result<Vec<O>, StoreError> {
        if self.in_flight == 0 {
            std::future::pending::<()>().await;
        }
        let result = match &mut self.inner {
            Inner::Inline { done, .. } => done.pop_front().unwrap_or_else(|| Ok(Vec::new())),
            Inner::Pipelined { done, .. } => done.recv().await.unwrap_or_else(|| {
                Err(StoreError::Backend(
                    "the commit thread stopped unexpectedly".to_string(),
                ))
            }),
        };
        self.in_flight -= 1;
        if let Some(at) = self.submitted.pop_front() {
            self.stages.commit_wait.record_duration(at.elapsed());
        }
        result
    }

    /// Waits for every job still in flight and returns their outputs in order, then stops the
    /// commit thread.
    pub async fn finish(mut self) -> Result<Vec<O>, StoreError> {
        let mut outputs = Vec::new();
        while self.in_flight > 0 {
            outputs.extend(self.completed().await?);
        }
        if let Inner::Pipelined { jobs, thread, .. } = &mut self.inner {
            *jobs = None;
            if let Some(thread) = thread.take() {
                let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            }
        }
        Ok(outputs)
    }
}

/// The commit thread: merge whatever is queued, commit once, hand the outputs back, repeat.
fn commit_thread<O>(
    mut store: impl Store,
    jobs: std_mpsc::Receiver<Ready<O>>,
    done: mpsc::UnboundedSender<Result<Vec<O>, StoreError>>,
    stages: &Stages,
) {
    // A job taken from the queue that did not fit the previous commit.
    let mut carried: Option<Ready<O>> = None;
    while let Some(first) = carried.take().or_else(|| jobs.recv().ok()) {
        let mut bytes = first.writes().put_bytes();
        let mut merged = first;
        let mut count = 1;
        while let Ok(more) = jobs.try_recv() {
            let more_bytes = more.writes().put_bytes();
            if bytes + more_bytes > MERGE_BYTES_MAX {
                carried = Some(more);
                break;
            }
            bytes += more_bytes;
            merged.merge(more);
            count += 1;
        }
        // A panic inside the store (redb on a damaged page) must not leave a gateway that
        // accepts connections it can never commit for: it is reported like any failure, and the
        // driver stops.
        let committed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            commit_timed(merged, &mut store, stages)
        }))
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".into());
            Err(StoreError::Damaged(format!(
                "the store panicked while committing ({what}); its file may be damaged: stop, check it, restore the data directory from a backup if needed"
            )))
        });
        match committed {
            Ok(outputs) => {
                // One message per job keeps the core's in-flight count exact; the merged outputs
                // ride on the first, the rest are empty.
                if done.send(Ok(outputs)).is_err() {
                    return;
                }
                for _ in 1..count {
                    if done.send(Ok(Vec::new())).is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                // Close the store before saying so: whoever learns of the failure may reopen it.
                drop(store);
                let _ = done.send(Err(e));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sund_model::env::{MemStore, Table, WriteBatch};

    const T: Table = Table("t");

    fn ready(key: u8, output: u32) -> Ready<u32> {
        let mut writes = WriteBatch::default();
        writes.put(T, vec![key], vec![key]);
        Ready::new(writes, vec![output])
    }

    async fn outputs_in_order(mode: CommitMode) {
        let mut committer = Committer::new(mode, MemStore::default(), "test");
        assert!(!committer.is_busy());
        for i in 0..200u32 {
            committer.submit(ready(i as u8, i));
        }
        let mut seen = Vec::new();
        while committer.is_busy() && seen.len() < 100 {
            seen.extend(committer.completed().await.unwrap());
        }
        for i in 200..300u32 {
            committer.submit(ready(i as u8, i));
        }
        seen.extend(committer.finish().await.unwrap());
        assert_eq!(seen, (0..300).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn pipelined_outputs_come_back_in_submission_order() {
        outputs_in_order(CommitMode::Pipelined).await;
    }

    #[tokio::test]
    async fn inline_outputs_come_back_in_submission_order() {
        outputs_in_order(CommitMode::Inline).await;
    }

    #[tokio::test]
    async fn saturation_is_reported_and_clears() {
        let mut committer = Committer::new(CommitMode::Inline, MemStore::default(), "test");
        for i in 0..IN_FLIGHT_MAX as u32 {
            assert!(!committer.is_saturated());
            committer.submit(ready(0, i));
        }
        assert!(committer.is_saturated());
        committer.completed().await.unwrap();
        assert!(!committer.is_saturated());
    }

    /// Test stores hold nothing to read: only their commits matter.
    macro_rules! nothing_to_read {
        ($store:ty) => {
            impl sund_model::env::StoreRead for $store {
                fn get(&self, _: Table, _: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
                    Ok(None)
                }
                fn scan_from(
                    &self,
                    _: Table,
                    _: &[u8],
                    _: &mut sund_model::env::Visit<'_>,
                ) -> Result<(), StoreError> {
                    Ok(())
                }
            }
        };
    }

    /// A store whose commits fail: the failure reaches the core instead of being swallowed.
    struct Failing;
    nothing_to_read!(Failing);
    impl Store for Failing {
        fn commit(&mut self, _: WriteBatch) -> Result<(), StoreError> {
            Err(StoreError::Backend("disk full".into()))
        }
    }

    /// A store that panics inside its commit (as redb may on a damaged page).
    struct Panicking;
    nothing_to_read!(Panicking);
    impl Store for Panicking {
        fn commit(&mut self, _: WriteBatch) -> Result<(), StoreError> {
            panic!("page 12 fails its checksum")
        }
    }

    #[tokio::test]
    async fn a_panic_inside_the_store_is_reported_as_a_failure_not_a_silent_stop() {
        let mut committer = Committer::new(CommitMode::Pipelined, Panicking, "test");
        committer.submit(ready(1, 1));
        let err = committer.completed().await.unwrap_err().to_string();
        assert!(
            err.contains("panicked") && err.contains("page 12 fails its checksum"),
            "{err}"
        );
    }

    /// A store that records the bytes put by each commit, and whose commits wait while the
    /// test holds `gate`.
    struct Gated {
        gate: Arc<std::sync::Mutex<()>>,
        commits: Arc<std::sync::Mutex<Vec<usize>>>,
    }
    nothing_to_read!(Gated);
    impl Store for Gated {
        fn commit(&mut self, batch: WriteBatch) -> Result<(), StoreError> {
            let _open = self.gate.lock().unwrap();
            self.commits.lock().unwrap().push(batch.put_bytes());
            Ok(())
        }
    }

    #[tokio::test]
    async fn big_jobs_queued_behind_a_commit_are_not_all_merged_into_the_next() {
        let gate = Arc::new(std::sync::Mutex::new(()));
        let commits = Arc::new(std::sync::Mutex::new(Vec::new()));
        let store = Gated {
            gate: gate.clone(),
            commits: commits.clone(),
        };
        let mut committer = Committer::new(CommitMode::Pipelined, store, "test");
        let held = gate.lock().unwrap();
        committer.submit(ready(0, 0));
        // Three commits' worth of file chunks of 600 KiB queue up while the first waits.
        const CHUNK: usize = 600 << 10;
        let chunks = 3 * (MERGE_BYTES_MAX / CHUNK) as u32 + 1;
        for i in 1..=chunks {
            let mut writes = WriteBatch::default();
            writes.put(T, i.to_be_bytes().to_vec(), vec![0u8; CHUNK]);
            committer.submit(Ready::new(writes, vec![i]));
        }
        drop(held);
        let outputs = committer.finish().await.unwrap();
        assert_eq!(outputs, (0..=chunks).collect::<Vec<_>>(), "still in order");
        let commits = commits.lock().unwrap().clone();
        assert!(commits.len() >= 4, "not all in one commit: {commits:?}");
        assert!(
            commits.iter().all(|&bytes| bytes <= MERGE_BYTES_MAX),
            "no commit holds more than the bound: {commits:?}"
        );
        assert!(
            commits.iter().skip(1).any(|&bytes| bytes > CHUNK),
            "chunks queued together share a commit: {commits:?}"
        );
        assert_eq!(commits.iter().sum::<usize>(), 1 + chunks as usize * CHUNK);
    }

    #[tokio::test]
    async fn a_failed_commit_releases_nothing_and_reports_the_error() {
        for mode in [CommitMode::Pipelined, CommitMode::Inline] {
            let mut committer = Committer::new(mode, Failing, "test");
            committer.submit(ready(1, 1));
            let err = committer.completed().await.unwrap_err();
            assert!(err.to_string().contains("disk full"), "{mode:?}: {err}");
        }
    }
}
