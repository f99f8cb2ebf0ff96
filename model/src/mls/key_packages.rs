//! KeyPackages of Sund devices: how a device makes them and how the gateway checks them.
//!
//! A device's MLS credential is a basic credential whose identity starts with its 16-byte device
//! id, so the gateway can check that an uploaded package belongs to the device that uploads it;
//! the rest binds the credential to the device's certificate (`trust::credential`), which
//! members check.

use bytes::Bytes;
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::{
    BasicCredential, Credential, CredentialWithKey, KeyPackage, KeyPackageIn, ProtocolVersion,
};
use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::crypto::OpenMlsCrypto;
use openmls_traits::OpenMlsProvider as _;

use super::{capabilities, lifetime, LifetimePolicy, MlsProvider, CIPHERSUITE};
use crate::gateway::key_packages::PackageKind;
use crate::ids::DeviceId;
use crate::time::Instant;

/// A device's MLS credential: a basic credential with the device's credential identity (its
/// device id, then its certificate binding when it has one; see `trust::credential`).
pub fn credential_for(identity: &[u8]) -> Credential {
    BasicCredential::new(identity.to_vec()).into()
}

/// The credential and signature key a device uses in every group.
pub fn credential_with_key(identity: &[u8], signer: &SignatureKeyPair) -> CredentialWithKey {
    CredentialWithKey {
        credential: credential_for(identity),
        signature_key: signer.public().into(),
    }
}

/// Why a device could not make a KeyPackage.
#[derive(Debug, thiserror::Error)]
#[error("cannot create a KeyPackage: {0}")]
pub struct KeyPackageError(String);

/// Makes `count` one-time KeyPackages (and a last-resort one if asked), TLS-encoded for upload.
/// Their private keys go into the provider's storage: the caller commits its writes.
pub fn generate(
    provider: &MlsProvider,
    signer: &SignatureKeyPair,
    identity: &[u8],
    policy: LifetimePolicy,
    now: Instant,
    count: usize,
    last_resort: bool,
) -> Result<(Vec<Bytes>, Option<Bytes>), KeyPackageError> {
    let make = |mark: bool| -> Result<Bytes, KeyPackageError> {
        let mut builder = KeyPackage::builder()
            .key_package_lifetime(lifetime(policy, now))
            .leaf_node_capabilities(capabilities());
        if mark {
            builder = builder.mark_as_last_resort();
        }
        let bundle = builder
            .build(
                CIPHERSUITE,
                provider,
                signer,
                credential_with_key(identity, signer),
            )
            .map_err(|e| KeyPackageError(e.to_string()))?;
        let bytes = bundle
            .key_package()
            .tls_serialize_detached()
            .map_err(|e| KeyPackageError(e.to_string()))?;
        Ok(Bytes::from(bytes))
    };
    let packages = (0..count)
        .map(|_| make(false))
        .collect::<Result<Vec<_>, _>>()?;
    let last = if last_resort { Some(make(true)?) } else { None };
    Ok((packages, last))
}

/// The gateway's check of an uploaded package: well formed, correctly signed, Sund's
/// ciphersuite, and the uploader's own credential. Returns whether it is a last-resort package.
///
/// openmls also checks the lifetime against the wall clock here; packages made under
/// [`LifetimePolicy::Unbounded`] (simulation) always pass.
pub fn check(
    crypto: &impl OpenMlsCrypto,
    bytes: &[u8],
    uploader: DeviceId,
) -> Result<PackageKind, String> {
    let package = KeyPackageIn::tls_deserialize_exact(bytes)
        .map_err(|e| format!("not a TLS-encoded KeyPackage: {e}"))?
        .validate(crypto, ProtocolVersion::Mls10)
        .map_err(|e| format!("KeyPackage does not verify: {e}"))?;
    if package.ciphersuite() != CIPHERSUITE {
        return Err(format!(
            "ciphersuite {:?}; Sund uses {CIPHERSUITE:?}",
            package.ciphersuite()
        ));
    }
    let credential = BasicCredential::try_from(package.leaf_node().credential().clone())
        .map_err(|_| "the credential is not a basic credential".to_string())?;
    if crate::trust::credential::device_of_identity(credential.identity()) != Some(uploader) {
        return Err("the credential names another device".to_string());
    }
    Ok(if package.last_resort() {
        PackageKind::LastResort
    } else {
        PackageKind::OneTime
    })
}

/// The provider's storage must hold the signer so that openmls finds it after a restart.
pub fn store_signer(provider: &MlsProvider, signer: &SignatureKeyPair) -> Result<(), String> {
    signer.store(provider.storage()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::Entropy;
    use crate::mls::{MlsStorage, Randomness};

    struct Counter(u8);
    impl Entropy for Counter {
        fn fill_bytes(&mut self, dest: &mut [u8]) {
            for b in dest {
                self.0 = self.0.wrapping_add(7);
                *b = self.0;
            }
        }
    }

    fn provider() -> MlsProvider {
        MlsProvider::new(
            Box::new(Counter(3)),
            Randomness::Simulation,
            MlsStorage::new(),
        )
    }

    #[test]
    fn generated_packages_pass_the_gateway_check_for_their_device_only() {
        let p = provider();
        let signer = p.new_signer().unwrap();
        let (packages, last) = generate(
            &p,
            &signer,
            &DeviceId(5).to_bytes(),
            LifetimePolicy::Unbounded,
            Instant(0),
            2,
            true,
        )
        .unwrap();
        assert_eq!(packages.len(), 2);
        for package in &packages {
            assert_eq!(
                check(p.crypto(), package, DeviceId(5)),
                Ok(PackageKind::OneTime)
            );
            let other = check(p.crypto(), package, DeviceId(6)).unwrap_err();
            assert!(other.contains("another device"), "{other}");
        }
        let last = last.unwrap();
        assert_eq!(
            check(p.crypto(), &last, DeviceId(5)),
            Ok(PackageKind::LastResort)
        );
    }

    #[test]
    fn tampered_and_garbage_packages_are_refused_with_a_reason() {
        let p = provider();
        let signer = p.new_signer().unwrap();
        let (packages, _) = generate(
            &p,
            &signer,
            &DeviceId(5).to_bytes(),
            LifetimePolicy::Unbounded,
            Instant(0),
            1,
            false,
        )
        .unwrap();
        let mut tampered = packages[0].to_vec();
        let at = tampered.len() / 2;
        tampered[at] ^= 1;
        assert!(check(p.crypto(), &tampered, DeviceId(5)).is_err());
        let garbage = check(p.crypto(), b"not a key package", DeviceId(5)).unwrap_err();
        assert!(
            garbage.contains("not a TLS-encoded KeyPackage"),
            "{garbage}"
        );
        assert!(check(p.crypto(), &[], DeviceId(5)).is_err());
    }

    #[test]
    fn an_expired_package_is_refused() {
        let p = provider();
        let signer = p.new_signer().unwrap();
        // Made in 2001 with a validity of one day.
        let policy = LifetimePolicy::FromClock {
            validity: std::time::Duration::from_secs(86_400),
        };
        let (packages, _) = generate(
            &p,
            &signer,
            &DeviceId(5).to_bytes(),
            policy,
            Instant(1_000_000_000_000_000),
            1,
            false,
        )
        .unwrap();
        assert!(check(p.crypto(), &packages[0], DeviceId(5)).is_err());
    }
}
