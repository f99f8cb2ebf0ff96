//! MLS credentials bound to device certificates.
//!
//! A Sund device's MLS credential is a basic credential whose identity is
//!
//! ```text
//! device id (16) | certificate length (u16) | device certificate | binding signature (64)
//! ```
//!
//! where the binding signature is the device key's Ed25519 signature over
//! [`BINDING_CONTEXT`] followed by the device's MLS signature public key. A member that sees a
//! device join (in a commit, or in the group it joins) checks the certificate against its pinned
//! trust root and CRL, and the binding against the leaf's signature key: the gateway cannot slip
//! in a device its own authority never certified for that user, nor reuse one device's
//! certificate for another MLS key. The first 16 bytes alone name the device, so code that only
//! needs the id reads them without parsing the rest.

use crate::identity::DeviceKey;
use crate::ids::{DeviceId, UserId};

use super::certificate::DeviceCertificate;
use super::crl::Crl;
use super::TrustRoot;

/// Domain separator of the binding signature.
pub const BINDING_CONTEXT: &[u8] = b"sund/mls-credential/v1";

fn binding_message(mls_signature_key: &[u8]) -> Vec<u8> {
    let mut message = BINDING_CONTEXT.to_vec();
    message.extend_from_slice(mls_signature_key);
    message
}

/// The credential identity of a certified device whose MLS signature public key is
/// `mls_signature_key`.
pub fn credential_identity(
    key: &DeviceKey,
    certificate: &DeviceCertificate,
    mls_signature_key: &[u8],
) -> Vec<u8> {
    let cert = certificate.encode();
    let mut out = Vec::with_capacity(16 + 2 + cert.len() + 64);
    out.extend_from_slice(&key.device_id().to_bytes());
    let len = u16::try_from(cert.len()).expect("certificates are at most 408 bytes");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&cert);
    out.extend_from_slice(&key.sign(&binding_message(mls_signature_key)));
    out
}

/// The device a credential identity names (its first 16 bytes).
pub fn device_of_identity(identity: &[u8]) -> Option<DeviceId> {
    let id: [u8; 16] = identity.get(..16)?.try_into().ok()?;
    Some(DeviceId::from_bytes(id))
}

/// The certificate in a credential identity, without checking it: for a member of a group,
/// whose credential was checked (`verify_identity`) when it joined. `None` for an identity
/// without a certificate or one whose certificate names another device.
pub fn certificate_of_identity(identity: &[u8]) -> Option<DeviceCertificate> {
    let device = device_of_identity(identity)?;
    let len = identity
        .get(16..18)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))?;
    let cert = DeviceCertificate::decode(identity.get(18..18 + len)?).ok()?;
    (cert.device() == device).then_some(cert)
}

/// The device key in a credential identity's certificate, without checking it (see
/// [`certificate_of_identity`]).
pub fn device_key_of_identity(identity: &[u8]) -> Option<crate::identity::DevicePublicKey> {
    certificate_of_identity(identity).map(|cert| cert.device_key)
}

/// The domain in a credential identity's certificate, without checking it: which root to
/// check the credential against. `None` for an identity without a certificate.
pub fn domain_of_identity(identity: &[u8]) -> Option<String> {
    let len = identity
        .get(16..18)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))?;
    let cert = DeviceCertificate::decode(identity.get(18..18 + len)?).ok()?;
    Some(cert.domain)
}

/// Checks a credential identity seen in a group: a certificate for the named device from
/// `root`, not revoked in `crl`, whose key signed the binding to `mls_signature_key`. Returns
/// the device and its user. The validity period is the gateway's to check, at every session:
/// a member whose certificate expired is removed by being refused sessions, not by members
/// whose clocks may disagree.
pub fn verify_identity(
    identity: &[u8],
    mls_signature_key: &[u8],
    root: &TrustRoot,
    crl: Option<&Crl>,
) -> Result<(DeviceId, UserId), String> {
    let device = device_of_identity(identity).ok_or("the credential names no device")?;
    let len = identity
        .get(16..18)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        .ok_or(format!("the credential of {device} carries no certificate"))?;
    let cert_bytes = identity
        .get(18..18 + len)
        .ok_or(format!("the credential of {device} is truncated"))?;
    let signature: [u8; 64] = identity
        .get(18 + len..)
        .and_then(|s| s.try_into().ok())
        .ok_or(format!(
            "the credential of {device} has no binding signature"
        ))?;
    let cert = DeviceCertificate::decode(cert_bytes)
        .map_err(|e| format!("the certificate of {device}: {e}"))?;
    if cert.device() != device {
        return Err(format!(
            "the credential of {device} carries another device's certificate"
        ));
    }
    cert.verify_issuer(root)
        .map_err(|e| format!("the certificate of {device}: {e}"))?;
    if crl.is_some_and(|c| c.revoked.contains(&device)) {
        return Err(format!("{device} is revoked"));
    }
    if !cert
        .device_key
        .verify(&binding_message(mls_signature_key), &signature)
    {
        return Err(format!(
            "the MLS key of {device} is not bound to its certificate"
        ));
    }
    Ok((device, cert.user))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Instant;

    const NOW: Instant = Instant(1_700_000_000_000_000);

    fn setup() -> (DeviceKey, DeviceCertificate, TrustRoot) {
        let root_key = DeviceKey::from_seed([7; 32]);
        let key = DeviceKey::from_seed([1; 32]);
        let now_s = NOW.as_micros() / 1_000_000;
        let cert = DeviceCertificate::issue(
            &root_key,
            "example.org",
            1,
            key.public(),
            UserId(5),
            now_s - 1,
            now_s + 100,
        );
        let root = TrustRoot {
            key: root_key.public(),
            domain: "example.org".into(),
        };
        (key, cert, root)
    }

    #[test]
    fn a_bound_credential_verifies_and_names_device_and_user() {
        let (key, cert, root) = setup();
        let identity = credential_identity(&key, &cert, b"mls-key");
        assert_eq!(device_of_identity(&identity), Some(key.device_id()));
        assert_eq!(
            verify_identity(&identity, b"mls-key", &root, None),
            Ok((key.device_id(), UserId(5)))
        );
    }

    #[test]
    fn another_mls_key_a_revoked_device_a_foreign_root_and_truncation_are_refused() {
        let (key, cert, root) = setup();
        let identity = credential_identity(&key, &cert, b"mls-key");
        assert!(verify_identity(&identity, b"other-key", &root, None).is_err());
        let crl = Crl::issue(
            &DeviceKey::from_seed([7; 32]),
            "example.org",
            1,
            0,
            [key.device_id()].into_iter().collect(),
        );
        assert!(verify_identity(&identity, b"mls-key", &root, Some(&crl))
            .unwrap_err()
            .contains("revoked"));
        let foreign = TrustRoot {
            key: DeviceKey::from_seed([8; 32]).public(),
            ..root.clone()
        };
        assert!(verify_identity(&identity, b"mls-key", &foreign, None).is_err());
        for len in 0..identity.len() {
            assert!(verify_identity(&identity[..len], b"mls-key", &root, None).is_err());
        }
        // An unbound credential (only the device id) is refused.
        assert!(verify_identity(&identity[..16], b"mls-key", &root, None).is_err());
        // Someone else's certificate under our device id.
        let mut swapped = identity.clone();
        swapped[..16].copy_from_slice(&DeviceId(9).to_bytes());
        assert!(verify_identity(&swapped, b"mls-key", &root, None).is_err());
    }
}
