//! Where a driver's time goes: histograms of each stage a message passes (queued after the read,
//! the state machine, waiting for the commit, the fsync itself, handing outputs to the writers),
//! and of commit sizes. Cheap enough for the hot path (a few atomic adds per record), shared
//! between the core task and the commit thread, read as a [`StageReport`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Values below this have a bucket each; above, four buckets per power of two.
const LINEAR: u64 = 16;
/// Buckets: 16 linear, then 4 per power of two up to 2^63.
const BUCKETS: usize = 16 + 4 * 60;

/// A histogram of `u64` values (microseconds, or counts) with about 19 % bucket width.
#[derive(Debug)]
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum: AtomicU64,
    max: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }
}

fn bucket(value: u64) -> usize {
    if value < LINEAR {
        return value as usize;
    }
    let power = 63 - u64::from(value.leading_zeros()); // >= 4
    let quarter = (value >> (power - 2)) & 3;
    let index = 16 + 4 * (power - 4) + quarter;
    (index as usize).min(BUCKETS - 1)
}

/// The smallest value a bucket holds.
fn bucket_floor(index: usize) -> u64 {
    if index < LINEAR as usize {
        return index as u64;
    }
    let power = (index as u64 - 16) / 4 + 4;
    let quarter = (index as u64 - 16) % 4;
    (4 + quarter) << (power - 2)
}

impl Histogram {
    /// Records one value.
    pub fn record(&self, value: u64) {
        self.buckets[bucket(value)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
        self.max.fetch_max(value, Ordering::Relaxed);
    }

    /// Forgets what was recorded (values recorded meanwhile may land on either side).
    pub fn reset(&self) {
        for bucket in self.buckets.iter() {
            bucket.store(0, Ordering::Relaxed);
        }
        self.count.store(0, Ordering::Relaxed);
        self.sum.store(0, Ordering::Relaxed);
        self.max.store(0, Ordering::Relaxed);
    }

    /// Records a duration in microseconds.
    pub fn record_duration(&self, duration: Duration) {
        self.record(u64::try_from(duration.as_micros()).unwrap_or(u64::MAX));
    }

    /// Quantiles of what was recorded so far (each a bucket's lower bound, the maximum exact).
    pub fn summary(&self) -> Summary {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let count: u64 = counts.iter().sum();
        let at = |q: f64| {
            if count == 0 {
                return 0;
            }
            let rank = ((count - 1) as f64 * q) as u64;
            let mut seen = 0;
            for (index, n) in counts.iter().enumerate() {
                seen += n;
                if seen > rank {
                    return bucket_floor(index);
                }
            }
            bucket_floor(BUCKETS - 1)
        };
        Summary {
            count,
            mean: self
                .sum
                .load(Ordering::Relaxed)
                .checked_div(count)
                .unwrap_or(0),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: self.max.load(Ordering::Relaxed),
        }
    }
}

/// Quantiles of a histogram.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Values recorded.
    pub count: u64,
    /// Their mean.
    pub mean: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// The largest.
    pub max: u64,
}

impl core::fmt::Display for Summary {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "p50 {} p90 {} p99 {} max {} (n {})",
            self.p50, self.p90, self.p99, self.max, self.count
        )
    }
}

/// The stages of a driver's core, in microseconds (and commit sizes in writes).
#[derive(Debug, Default)]
pub struct Stages {
    /// From a session's read of frames until the core takes them.
    pub queued: Histogram,
    /// The state machine's work for one round of inputs (or one timeout).
    pub machine: Histogram,
    /// From handing a round's writes to the committer until its outputs come back.
    pub commit_wait: Histogram,
    /// One store commit (the fsync), on the commit thread.
    pub fsync: Histogram,
    /// Writes per store commit.
    pub commit_writes: Histogram,
    /// Handing a commit's released outputs to the session writers.
    pub release: Histogram,
}

/// A snapshot of [`Stages`].
#[derive(Clone, Copy, Debug, Default)]
pub struct StageReport {
    /// See [`Stages::queued`].
    pub queued: Summary,
    /// See [`Stages::machine`].
    pub machine: Summary,
    /// See [`Stages::commit_wait`].
    pub commit_wait: Summary,
    /// See [`Stages::fsync`].
    pub fsync: Summary,
    /// See [`Stages::commit_writes`].
    pub commit_writes: Summary,
    /// See [`Stages::release`].
    pub release: Summary,
}

impl Stages {
    /// Starts every stage afresh, so that a report covers only what came after (a warmed-up
    /// steady state, say).
    pub fn reset(&self) {
        for h in [
            &self.queued,
            &self.machine,
            &self.commit_wait,
            &self.fsync,
            &self.commit_writes,
            &self.release,
        ] {
            h.reset();
        }
    }

    /// Quantiles of every stage.
    pub fn report(&self) -> StageReport {
        StageReport {
            queued: self.queued.summary(),
            machine: self.machine.summary(),
            commit_wait: self.commit_wait.summary(),
            fsync: self.fsync.summary(),
            commit_writes: self.commit_writes.summary(),
            release: self.release.summary(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order_with_bounded_width() {
        let mut last = 0;
        for value in (0..10_000u64).chain([1 << 20, (1 << 40) + 7, u64::MAX]) {
            let index = bucket(value);
            assert!(index >= last, "buckets grow with the value");
            last = index;
            let floor = bucket_floor(index);
            assert!(floor <= value, "{value} in a bucket starting at {floor}");
            assert!(value - floor <= value / 4 + 1, "bucket of {value} too wide");
        }
    }

    #[test]
    fn quantiles_come_from_what_was_recorded() {
        let h = Histogram::default();
        for v in 1..=100u64 {
            h.record(v);
        }
        let s = h.summary();
        assert_eq!(s.count, 100);
        assert_eq!(s.max, 100);
        assert_eq!(s.mean, 50);
        assert!((40..=50).contains(&s.p50), "{s}");
        assert!((80..=90).contains(&s.p90), "{s}");
        assert!((88..=99).contains(&s.p99), "{s}");
        assert_eq!(Histogram::default().summary(), Summary::default());
    }

    #[test]
    fn a_reset_forgets_what_came_before() {
        let stages = Stages::default();
        stages.fsync.record(5_000);
        stages.queued.record(7);
        stages.reset();
        assert_eq!(stages.report().fsync, Summary::default());
        assert_eq!(stages.report().queued, Summary::default());
        stages.fsync.record(300);
        assert_eq!(stages.report().fsync.max, 300);
        assert_eq!(stages.report().fsync.count, 1);
    }
}
