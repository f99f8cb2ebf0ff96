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
