//! The openmls provider of one device: [`SundCrypto`], randomness from the injected entropy and
//! [`MlsStorage`] on the store trait.
//!
//! Every random byte openmls uses comes from the [`Entropy`] the provider was built with, so a
//! simulation run seeded the same way produces the same MLS bytes. All writes openmls makes during
//! one operation stay buffered in the storage until the operation's [`MlsTransaction`] moves them
//! into the caller's [`WriteBatch`] (or discards them when it drops uncommitted), so one MLS
//! operation is one store commit (crash consistency).

use std::sync::{Arc, Mutex};

use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::random::OpenMlsRand;
use openmls_traits::types::{CryptoError, SignatureScheme};
use openmls_traits::OpenMlsProvider;
use zeroize::Zeroizing;

use super::crypto::{EphemeralKeys, SharedEntropy, SundCrypto};
use super::storage::MlsStorage;
use super::verified::VerifiedSignatures;
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

    /// Answers repeated signature checks and hashes from `memo`, and shares ratchet trees
    /// through it (see [`super::verified`]).
    pub fn with_verified(mut self, memo: Option<VerifiedSignatures>) -> MlsProvider {
        self.storage.share_trees(memo.clone());
        self.crypto.set_verified(memo);
        self
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

    /// Starts one MLS operation: its storage writes are discarded when the returned guard
    /// drops, unless [`MlsTransaction::commit`] moves them into the caller's batch first. No
    /// writes of an earlier operation may still wait (a missed commit or discard would leak
    /// half-finished writes into this one).
    pub fn transaction(&self) -> MlsTransaction<'_> {
        debug_assert!(
            !self.storage.has_pending(),
            "an earlier MLS operation left its writes neither committed nor discarded"
        );
        self.adopt_pending()
    }

    /// A transaction holding whatever writes openmls made since the last commit or discard:
    /// for tests and benchmarks that drive openmls directly and collect its writes afterwards.
    pub fn adopt_pending(&self) -> MlsTransaction<'_> {
        MlsTransaction {
            storage: &self.storage,
            committed: false,
        }
    }
}

/// One MLS operation's storage writes: discarded on drop unless committed (see
/// [`MlsProvider::transaction`]).
#[must_use = "an MLS transaction discards its writes unless committed"]
pub struct MlsTransaction<'a> {
    storage: &'a MlsStorage,
    committed: bool,
}

impl MlsTransaction<'_> {
    /// Moves the operation's writes into `batch`, to be committed with what depends on them.
    pub fn commit(mut self, batch: &mut WriteBatch) {
        self.storage.take_writes(batch);
        self.committed = true;
    }
}

impl Drop for MlsTransaction<'_> {
    fn drop(&mut self) {
        if !self.committed {
            self.storage.discard_writes();
        }
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
