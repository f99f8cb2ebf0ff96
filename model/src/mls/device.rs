//! A device's MLS state inside the node machine: its provider, its signing key, and the
//! KeyPackage pool it keeps topped up at the gateway.
//!
//! The signing key's private half lives in the MLS storage (openmls's own record), its public
//! half under [`SIGNER_KEY`] in the node's session table, so that a restart finds it again. Every
//! write an operation makes is handed to the node's write batch before any frame that depends on
//! it leaves: a KeyPackage is never uploaded before its private keys are durable, or a Welcome to
//! it could not be opened after a crash.

use bytes::Bytes;
use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::types::SignatureScheme;
use openmls_traits::OpenMlsProvider as _;

use super::key_packages::{self, KeyPackageError};
use super::verified::VerifiedSignatures;
use super::{LifetimePolicy, MlsProvider, MlsStorage, Randomness};
use crate::env::{Entropy, StoreError, StoreRead, Table, WriteBatch};
use crate::identity::DeviceKey;
use crate::ids::{DeviceId, UserId};
use crate::time::Instant;
use crate::trust::credential::{credential_identity, domain_of_identity, verify_identity};
use crate::trust::peer_roots::PeerRoots;
use crate::trust::{Crl, DeviceCertificate, TrustRoot};

/// Key of the signing key's public half in the node's session table.
pub const SIGNER_KEY: &[u8] = b"mls_signer";

/// How a device runs MLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceMlsConfig {
    /// Fresh or derived HPKE ephemeral keys (production or simulation).
    pub randomness: Randomness,
    /// Lifetimes of KeyPackages.
    pub lifetime: LifetimePolicy,
    /// How many one-time KeyPackages an upload tops the pool up to.
    pub pool_target: usize,
    /// Simulation of large rooms only: decrypt an application message only if this device is
    /// among about this many members drawn for it (by the message's conversation and seq); the
    /// others skip it, which MLS allows (a later message ratchets forward). `None`: decrypt all.
    pub decrypt_sample: Option<u32>,
    /// Signatures and credentials already verified (see [`VerifiedSignatures`]): `None` in
    /// production; a simulation shares one memo among all its devices.
    pub verified: Option<VerifiedSignatures>,
}

impl Default for DeviceMlsConfig {
    fn default() -> Self {
        DeviceMlsConfig {
            randomness: Randomness::Production,
            lifetime: LifetimePolicy::default(),
            pool_target: 20,
            decrypt_sample: None,
            verified: None,
        }
    }
}

/// A deterministic generator seeded once from another entropy: SHA-256 over a 256-bit seed and a
/// counter. It gives the MLS provider its own stream, so that openmls's draws do not interleave
/// with the node's; seeded from the OS in production, from the simulation's seed otherwise.
pub struct SeededStream {
    seed: zeroize::Zeroizing<[u8; 32]>,
    counter: u64,
}

impl SeededStream {
    /// A stream seeded with 32 bytes from `from`.
    pub fn new(from: &mut dyn Entropy) -> SeededStream {
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        from.fill_bytes(seed.as_mut_slice());
        SeededStream { seed, counter: 0 }
    }
}

impl Entropy for SeededStream {
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        use sha2::{Digest, Sha256};
        for chunk in dest.chunks_mut(32) {
            let block = Sha256::new()
                .chain_update(b"sund/mls-stream/v1")
                .chain_update(self.seed.as_slice())
                .chain_update(self.counter.to_be_bytes())
                .finalize();
            self.counter += 1;
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
    }
}

/// The MLS side of one device.
pub struct DeviceMls {
    config: DeviceMlsConfig,
    device: DeviceId,
    provider: MlsProvider,
    signer: SignatureKeyPair,
    upload_pending: bool,
    /// The credential identity (see `trust::credential`): the device id alone until the device
    /// has a certificate.
    identity: Vec<u8>,
    /// The trust root and CRL members' credentials are checked against (`None`: no root pinned
    /// yet, nothing can be checked).
    trust: Option<(TrustRoot, Option<Crl>)>,
    /// Other domains' roots, as the own root vouched for them: members certified by one of
    /// them are checked against it (no CRL of theirs is held yet).
    peer_roots: Option<PeerRoots>,
    /// Other domains' CRLs, by domain: a member one of them revokes is refused as its own
    /// domain's revoked devices are.
    peer_crls: std::collections::BTreeMap<String, Crl>,
}

impl core::fmt::Debug for DeviceMls {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DeviceMls")
            .field("device", &self.device)
            .field("upload_pending", &self.upload_pending)
            .finish_non_exhaustive()
    }
}

fn corrupt(table: Table, reason: &str) -> StoreError {
    StoreError::Corrupt {
        table: table.0,
        reason: reason.to_string(),
    }
}

impl DeviceMls {
    /// Loads the device's MLS state from `store` (creating a signing key for a new device, whose
    /// writes go into `writes`). `session_table` is the node's table holding [`SIGNER_KEY`].
    pub fn recover(
        config: DeviceMlsConfig,
        device: DeviceId,
        entropy: &mut dyn Entropy,
        store: &dyn StoreRead,
        session_table: Table,
        writes: &mut WriteBatch,
    ) -> Result<DeviceMls, StoreError> {
        let storage = MlsStorage::recover(store)?;
        let provider = MlsProvider::new(
            Box::new(SeededStream::new(entropy)),
            config.randomness,
            storage,
        )
        .with_verified(config.verified.clone());
        let transaction = provider.transaction();
        let signer = match store.get(session_table, SIGNER_KEY)? {
            Some(public) => {
                SignatureKeyPair::read(provider.storage(), &public, SignatureScheme::ED25519)
                    .ok_or_else(|| {
                        corrupt(
                            super::MLS_TABLE,
                            "the MLS signing key named in the session table is missing",
                        )
                    })?
            }
            None => {
                let signer = provider
                    .new_signer()
                    .map_err(|e| StoreError::Backend(format!("MLS signing key: {e}")))?;
                key_packages::store_signer(&provider, &signer).map_err(StoreError::Backend)?;
                writes.put(session_table, SIGNER_KEY.to_vec(), signer.public().to_vec());
                signer
            }
        };
        transaction.commit(writes);
        Ok(DeviceMls {
            config,
            device,
            provider,
            signer,
            upload_pending: false,
            identity: device.to_bytes().to_vec(),
            trust: None,
            peer_roots: None,
            peer_crls: std::collections::BTreeMap::new(),
        })
    }

    /// Binds this device's MLS credential to its certificate: KeyPackages and groups made from
    /// now on carry the binding.
    pub fn bind_certificate(&mut self, key: &DeviceKey, certificate: &DeviceCertificate) {
        self.identity = credential_identity(key, certificate, self.signer.public());
    }

    /// The root and CRL the credentials of other members are checked against.
    pub fn set_trust(&mut self, root: TrustRoot, crl: Option<Crl>) {
        self.trust = Some((root, crl));
    }

    /// Other domains' roots (already checked against the own root by the caller).
    pub fn set_peer_roots(&mut self, roots: PeerRoots) {
        self.peer_roots = Some(roots);
    }

    /// Other domains' CRLs (each already checked against its domain's root by the caller).
    pub fn set_peer_crls(&mut self, crls: std::collections::BTreeMap<String, Crl>) {
        self.peer_crls = crls;
    }

    /// This device's credential identity.
    pub fn identity(&self) -> &[u8] {
        &self.identity
    }

    /// Checks another member's credential identity and MLS signature key: `Ok(Some(user))` for
    /// a certified, unrevoked device bound to that key, `Ok(None)` if this device has no root
    /// to check against yet.
    pub fn verify_member(
        &self,
        identity: &[u8],
        signature_key: &[u8],
    ) -> Result<Option<UserId>, String> {
        let Some((root, crl)) = &self.trust else {
            return Ok(None);
        };
        match self.peer_root_for(identity, root)? {
            Some(peer) => {
                let peer_crl = self.peer_crls.get(&peer.domain);
                self.check_credential(identity, signature_key, &peer, peer_crl)
            }
            None => self.check_credential(identity, signature_key, root, crl.as_ref()),
        }
        .map(|(_, u)| Some(u))
    }

    /// True if this device can check members certified by `domain`: its own, or one whose
    /// root its own root vouched for (or no root is pinned yet, when nothing is checked).
    pub fn vouches_for(&self, domain: &str) -> bool {
        let Some((own, _)) = &self.trust else {
            return true;
        };
        own.domain == domain
            || self
                .peer_roots
                .as_ref()
                .is_some_and(|p| p.roots.contains_key(domain))
    }

    /// The domain certifying `identity`, if it is one this device cannot vouch for (see
    /// [`DeviceMls::vouches_for`]), so that the credential cannot be checked now.
    pub fn unvouched_domain(&self, identity: &[u8]) -> Option<String> {
        domain_of_identity(identity).filter(|domain| !self.vouches_for(domain))
    }

    /// For a credential certified by another domain than `own`'s: that domain's root as the
    /// own root vouched for it, or why it cannot be checked. `None` for the own domain's (and
    /// whenever no peer roots are held: the own root's check then says what is wrong).
    fn peer_root_for(&self, identity: &[u8], own: &TrustRoot) -> Result<Option<TrustRoot>, String> {
        let Some(peers) = &self.peer_roots else {
            return Ok(None);
        };
        match domain_of_identity(identity) {
            Some(domain) if domain != own.domain => {
                peers.root_of(&domain).map(Some).ok_or_else(|| {
                    format!(
                    "the credential is certified by {domain}, a domain this device's gateway does \
                     not federate with"
                )
                })
            }
            _ => Ok(None),
        }
    }

    /// As [`DeviceMls::verify_member`], but a revoked certificate passes: the check a joining
    /// device makes of the members its Welcome lists. A device revoked after it joined stays
    /// in the group's tree until a member commits the removal the gateway proposes for it (and
    /// it can open no session meanwhile), so refusing such a Welcome would keep the joiner out
    /// for good while the group is already removing that device.
    pub fn verify_member_at_join(
        &self,
        identity: &[u8],
        signature_key: &[u8],
    ) -> Result<Option<UserId>, String> {
        let Some((root, _)) = &self.trust else {
            return Ok(None);
        };
        let peer = self.peer_root_for(identity, root)?;
        self.check_credential(identity, signature_key, peer.as_ref().unwrap_or(root), None)
            .map(|(_, u)| Some(u))
    }

    /// [`verify_identity`], through the configured memo if there is one.
    fn check_credential(
        &self,
        identity: &[u8],
        signature_key: &[u8],
        root: &TrustRoot,
        crl: Option<&Crl>,
    ) -> Result<(DeviceId, UserId), String> {
        match &self.config.verified {
            Some(memo) => memo.credential(identity, signature_key, root, crl),
            None => verify_identity(identity, signature_key, root, crl),
        }
    }

    /// The provider (for MLS operations).
    pub fn provider(&self) -> &MlsProvider {
        &self.provider
    }

    /// The signing key (for group operations).
    pub fn signer(&self) -> &SignatureKeyPair {
        &self.signer
    }

    /// See [`DeviceMlsConfig::decrypt_sample`].
    pub fn decrypt_sample(&self) -> Option<u32> {
        self.config.decrypt_sample
    }

    /// How this device sets lifetimes (for the leaf of a group it creates).
    pub fn lifetime_policy(&self) -> LifetimePolicy {
        self.config.lifetime
    }

    /// The signing key's public half.
    pub fn signature_key(&self) -> &[u8] {
        self.signer.public()
    }

    /// The gateway said how many packages are left. Returns the packages to upload (and a new
    /// last-resort package if there is none), their private keys' writes added to `writes`; or
    /// `None` if the pool is full enough or an upload is already under way.
    #[allow(clippy::type_complexity)]
    pub fn on_count(
        &mut self,
        now: Instant,
        remaining: usize,
        has_last_resort: bool,
        replenish_below: usize,
        writes: &mut WriteBatch,
    ) -> Result<Option<(Vec<Bytes>, Option<Bytes>)>, KeyPackageError> {
        self.upload_pending = false;
        if remaining >= replenish_below && has_last_resort {
            return Ok(None);
        }
        let missing = self.config.pool_target.saturating_sub(remaining);
        if missing == 0 && has_last_resort {
            return Ok(None);
        }
        let transaction = self.provider.transaction();
        let result = key_packages::generate(
            &self.provider,
            &self.signer,
            &self.identity,
            self.config.lifetime,
            now,
            missing,
            !has_last_resort,
        );
        let packages = result?;
        transaction.commit(writes);
        self.upload_pending = true;
        Ok(Some(packages))
    }

    /// An upload was refused or the connection dropped: the next count decides again.
    pub fn upload_abandoned(&mut self) {
        self.upload_pending = false;
    }

    /// True while an upload waits for the gateway's count.
    pub fn upload_pending(&self) -> bool {
        self.upload_pending
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::env::MemStore;
    use crate::testing::TestEntropy;
    use crate::trust::peer_roots::PeerRoots;

    const TABLE: Table = Table("session");

    fn root(seed: u8, domain: &str) -> (DeviceKey, TrustRoot) {
        let key = DeviceKey::from_seed([seed; 32]);
        let root = TrustRoot {
            key: key.public(),
            domain: domain.into(),
        };
        (key, root)
    }

    /// The credential identity of a device of `domain` certified by `root_key`, for MLS key
    /// `[7; 32]`.
    fn credential(root_key: &DeviceKey, domain: &str, seed: u8) -> Vec<u8> {
        let key = DeviceKey::from_seed([seed; 32]);
        let user = UserId::of("bob", domain);
        let cert =
            DeviceCertificate::issue(root_key, domain, 1, key.public(), user, 0, 4_000_000_000);
        credential_identity(&key, &cert, &[7; 32])
    }

    fn device() -> DeviceMls {
        let mut writes = WriteBatch::default();
        DeviceMls::recover(
            DeviceMlsConfig::default(),
            DeviceId(1),
            &mut TestEntropy(1),
            &MemStore::default(),
            TABLE,
            &mut writes,
        )
        .unwrap()
    }

    #[test]
    fn another_domains_member_is_checked_against_the_root_the_own_root_vouched_for() {
        let (a_key, a_root) = root(1, "a.example");
        let (b_key, b_root) = root(2, "b.example");
        let (_, c_root) = root(3, "c.example");
        let mut mls = device();
        mls.set_trust(a_root.clone(), None);
        let bob = credential(&b_key, "b.example", 20);
        // Without peer roots, a certificate of b.example is not this domain's.
        assert!(mls.verify_member(&bob, &[7; 32]).is_err());
        let vouched = |roots: &[&TrustRoot]| {
            let roots: BTreeMap<_, _> = roots.iter().map(|r| (r.domain.clone(), r.key)).collect();
            a_key_vouches(&a_key, roots)
        };
        mls.set_peer_roots(vouched(&[&b_root, &c_root]));
        assert_eq!(
            mls.verify_member(&bob, &[7; 32]),
            Ok(Some(UserId::of("bob", "b.example")))
        );
        assert!(mls.verify_member_at_join(&bob, &[7; 32]).is_ok());
        // The binding to the MLS key still counts.
        assert!(mls.verify_member(&bob, &[8; 32]).is_err());
        // A b.example certificate signed by another key than b.example's vouched root.
        let (mallory, _) = root(9, "b.example");
        let forged = credential(&mallory, "b.example", 21);
        assert!(mls.verify_member(&forged, &[7; 32]).is_err());
        // A domain the own root did not vouch for.
        let (d_key, _) = root(4, "d.example");
        let dave = credential(&d_key, "d.example", 22);
        let refused = mls.verify_member(&dave, &[7; 32]).unwrap_err();
        assert!(refused.contains("d.example"), "{refused}");
        // The own domain's members are checked as before, with its CRL.
        let carol = credential(&a_key, "a.example", 23);
        assert!(mls.verify_member(&carol, &[7; 32]).is_ok());
    }

    #[test]
    fn another_domains_member_it_revoked_is_refused_once_its_crl_is_held() {
        let (a_key, a_root) = root(1, "a.example");
        let (b_key, b_root) = root(2, "b.example");
        let mut mls = device();
        mls.set_trust(a_root, None);
        mls.set_peer_roots(a_key_vouches(
            &a_key,
            BTreeMap::from([(b_root.domain.clone(), b_root.key)]),
        ));
        let bob = credential(&b_key, "b.example", 20);
        let bob_device = DeviceKey::from_seed([20; 32]).device_id();
        assert!(mls.verify_member(&bob, &[7; 32]).is_ok());
        // b.example revokes bob's device; a CRL of another domain revokes nothing here.
        let revoking = Crl::issue(
            &b_key,
            "b.example",
            1,
            0,
            std::collections::BTreeSet::from([bob_device]),
        );
        mls.set_peer_crls(BTreeMap::from([(
            "c.example".to_string(),
            revoking.clone(),
        )]));
        assert!(mls.verify_member(&bob, &[7; 32]).is_ok());
        mls.set_peer_crls(BTreeMap::from([("b.example".to_string(), revoking)]));
        let refused = mls.verify_member(&bob, &[7; 32]).unwrap_err();
        assert!(refused.contains("revoked"), "{refused}");
        // A joiner still takes a Welcome listing it (the group is removing it).
        assert!(mls.verify_member_at_join(&bob, &[7; 32]).is_ok());
    }

    fn a_key_vouches(
        key: &DeviceKey,
        roots: BTreeMap<String, crate::identity::DevicePublicKey>,
    ) -> PeerRoots {
        PeerRoots::issue(key, "a.example", roots)
    }
}
