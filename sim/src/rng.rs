//! The one source of randomness in a run: ChaCha20 seeded from the run's `u64` seed.
//!
//! Every stream (network, disk, workload, faults, each actor's entropy) is derived from the root
//! in a fixed order, so adding draws to one stream never shifts another.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sund_model::env::Entropy;

/// A deterministic random stream.
#[derive(Clone, Debug)]
pub struct SimRng {
    inner: ChaCha20Rng,
}

impl SimRng {
    /// The root stream of a run.
    pub fn from_seed(seed: u64) -> SimRng {
        SimRng {
            inner: ChaCha20Rng::seed_from_u64(seed),
        }
    }

    /// A child stream: a fresh ChaCha20 key drawn from this stream.
    pub fn derive(&mut self) -> SimRng {
        let mut key = [0u8; 32];
        self.inner.fill_bytes(&mut key);
        SimRng {
            inner: ChaCha20Rng::from_seed(key),
        }
    }

    /// The same key on another ChaCha stream number: used for an actor's next incarnation.
    pub fn with_stream(&self, stream: u64) -> SimRng {
        let mut inner = self.inner.clone();
        inner.set_stream(stream);
        inner.set_word_pos(0);
        SimRng { inner }
    }

    /// A uniform `u64`.
    pub fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }

    /// True with probability `p` (clamped to 0..=1).
    pub fn chance(&mut self, p: f64) -> bool {
        if p <= 0.0 {
            return false;
        }
        if p >= 1.0 {
            return true;
        }
        // 53 random bits give a uniform f64 in [0, 1).
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        unit < p
    }

    /// A uniform value in `lo..=hi`.
    pub fn range_inclusive(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo <= hi, "empty range");
        lo + self.below_inclusive(hi - lo)
    }

    /// A uniform index below `len` (which must be positive).
    pub fn index(&mut self, len: usize) -> usize {
        assert!(len > 0, "index into an empty set");
        self.below_inclusive(len as u64 - 1) as usize
    }
}

impl Entropy for SimRng {
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.inner.fill_bytes(dest);
    }

    fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_seed_gives_one_stream() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut r = SimRng::from_seed(7);
                move |_| r.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..4)
            .map({
                let mut r = SimRng::from_seed(7);
                move |_| r.next_u64()
            })
            .collect();
        let c = SimRng::from_seed(8).next_u64();
        assert_eq!(a, b);
        assert_ne!(a[0], c);
    }

    #[test]
    fn incarnation_streams_differ_but_repeat() {
        let mut root = SimRng::from_seed(1);
        let actor = root.derive();
        let mut first = actor.with_stream(1);
        let mut again = actor.with_stream(1);
        let mut second = actor.with_stream(2);
        let x = first.next_u64();
        assert_eq!(x, again.next_u64());
        assert_ne!(x, second.next_u64());
    }

    #[test]
    fn chance_hits_its_rate() {
        let mut r = SimRng::from_seed(3);
        let hits = (0..100_000).filter(|_| r.chance(0.25)).count();
        assert!((24_000..26_000).contains(&hits), "{hits}");
    }
}
