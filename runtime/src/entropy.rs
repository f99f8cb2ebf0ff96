//! Production entropy: the operating system's generator.

use sund_model::env::Entropy;

/// [`Entropy`] from the OS (`getrandom`).
#[derive(Clone, Copy, Debug, Default)]
pub struct OsEntropy;

impl Entropy for OsEntropy {
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        getrandom::fill(dest).expect("the operating system's random generator is available");
    }
}

/// [`Entropy`] from a ChaCha20 stream with a fixed seed: only for simulation of the real drivers
/// (turmoil), where runs must repeat.
#[derive(Clone, Debug)]
pub struct SeededEntropy(rand_chacha::ChaCha20Rng);

impl SeededEntropy {
    /// A stream keyed by `seed`.
    pub fn new(seed: [u8; 32]) -> SeededEntropy {
        use rand_chacha::rand_core::SeedableRng;
        SeededEntropy(rand_chacha::ChaCha20Rng::from_seed(seed))
    }
}

impl Entropy for SeededEntropy {
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        use rand_chacha::rand_core::RngCore;
        self.0.fill_bytes(dest);
    }
}

/// Which entropy a driver uses.
#[derive(Clone, Copy, Debug, Default)]
pub enum EntropySource {
    /// The operating system (production).
    #[default]
    Os,
    /// A seeded stream (simulation).
    Seeded([u8; 32]),
}

impl EntropySource {
    /// A boxed entropy source for a state machine.
    pub fn boxed(self) -> Box<dyn Entropy + Send> {
        match self {
            EntropySource::Os => Box::new(OsEntropy),
            EntropySource::Seeded(seed) => Box::new(SeededEntropy::new(seed)),
        }
    }
}
