//! The openmls provider of one device: [`SundCrypto`], randomness from the injected entropy and
//! [`MlsStorage`] on the store trait.
//!
//! Every random byte openmls uses comes from the [`Entropy`] the provider was built with, so a
//! simulation run seeded the same way produces the same MLS bytes. All writes openmls makes during
//! one operation stay buffered in the storage until [`MlsProvider::take_writes`] moves them into
//! the caller's [`WriteBatch`], so one MLS operation is one store commit (crash consistency).

use std::sync::{Arc, Mutex};

use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::random::OpenMlsRand;
use openmls_traits::types::{CryptoError, SignatureScheme};
use openmls_traits::OpenMlsProvider;
use zeroize::Zeroizing;

use super::crypto::{EphemeralKeys, SharedEntropy, SundCrypto};
use super::storage::MlsStorage;
use crate::env::{Entropy, WriteBatch};

/// How HPKE ephemeral keys are chosen (see [`super::crypto`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Randomness {
    /// Fresh entropy for every seal: production, where the entropy is the operating system's.
    Production,
    /// Keys derived from a per-device secret and each seal's inputs, so that openmls's parallel
    /// path encryption gives the same bytes in every run: simulation.
    Simulation,
}

/// openmls randomness drawn from the injected entropy.
pub struct EntropyRand(SharedEntropy);

/// The injected entropy could not be reached (its lock was poisoned by a panic elsewhere).
#[derive(Debug, thiserror::Error)]
#[error("the entropy source is unavailable after a panic")]
pub struct RandError;

impl OpenMlsRand for EntropyRand {
    type Error = RandError;

    fn random_array<const N: usize>(&self) -> Result<[u8; N], Self::Error> {
        let mut out = [0u8; N];
        self.0.lock().map_err(|_| RandError)?.fill_bytes(&mut out);
        Ok(out)
    }

    fn random_vec(&self, len: usize) -> Result<Vec<u8>, Self::Error> {
        let mut out = vec![0u8; len];
        self.0.lock().map_err(|_| RandError)?.fill_bytes(&mut out);
        Ok(out)
    }
}

/// Everything openmls needs for one device.
pub struct MlsProvider {
    crypto: SundCrypto,
    rand: EntropyRand,
    storage: MlsStorage,
}

impl MlsProvider {
    /// A provider drawing from `entropy`, keeping its state in `storage` (empty for a new device,
    /// [`MlsStorage::recover`]ed after a restart).
    pub fn new(
        entropy: Box<dyn Entropy + Send>,
        randomness: Randomness,
        storage: MlsStorage,
    ) -> MlsProvider {
        let shared: SharedEntropy = Arc::new(Mutex::new(entropy));
        let ephemeral = match randomness {
            Randomness::Production => EphemeralKeys::Fresh,
            Randomness::Simulation => {
                let mut secret = Zeroizing::new([0u8; 32]);
                shared
                    .lock()
                    .expect("a new lock is not poisoned")
                    .fill_bytes(secret.as_mut_slice());
                EphemeralKeys::Derived(secret)
            }
        };
        MlsProvider {
            crypto: SundCrypto::new(shared.clone(), ephemeral),
            rand: EntropyRand(shared),
            storage,
        }
    }

    /// A new MLS signing key from the entropy. The device key that authenticates sessions is kept
    /// apart from it, so that neither protocol ever signs the other's messages.
    pub fn new_signer(&self) -> Result<SignatureKeyPair, CryptoError> {
        let (private, public) = self.crypto.signature_key_gen(SignatureScheme::ED25519)?;
        Ok(SignatureKeyPair::from_raw(
            SignatureScheme::ED25519,
            private,
            public,
        ))
    }

    /// Moves every storage write since the last call into `batch`, to be committed as one unit.
    pub fn take_writes(&self, batch: &mut WriteBatch) {
        self.storage.take_writes(batch);
    }

    /// Forgets the writes of a failed operation, restoring the state of the last `take_writes`.
    pub fn discard_writes(&self) {
        self.storage.discard_writes();
    }
}

impl OpenMlsProvider for MlsProvider {
    type CryptoProvider = SundCrypto;
    type RandProvider = EntropyRand;
    type StorageProvider = MlsStorage;

    fn storage(&self) -> &MlsStorage {
        &self.storage
    }

    fn crypto(&self) -> &SundCrypto {
        &self.crypto
    }

    fn rand(&self) -> &EntropyRand {
        &self.rand
    }
}
