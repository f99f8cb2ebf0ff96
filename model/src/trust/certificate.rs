//! Device certificates: a device key bound to a user and a domain for a validity period, signed
//! by the domain's trust root.
//!
//! Encoding (big-endian, 156 to 408 bytes):
//!
//! ```text
//! "SDC" | format 1 (u8) | serial (u64) | device key (32) | user (16)
//!       | not before (u64, s) | not after (u64, s) | domain length (u8) | domain | signature (64)
//! ```
//!
//! The signature is Ed25519 by the trust root over [`CERTIFICATE_CONTEXT`] followed by every
//! byte before the signature. Times are seconds of the model clock, which production drivers
//! start at the Unix epoch.

use crate::identity::{DeviceKey, DevicePublicKey};
use crate::ids::{DeviceId, UserId};
use crate::time::Instant;

use super::codec::{get_domain, put_domain};
use super::{valid_domain, TrustRoot};
use crate::codec::Reader;

const MAGIC: &[u8; 3] = b"SDC";
const FORMAT: u8 = 1;
/// Domain separator of certificate signatures.
const CERTIFICATE_CONTEXT: &[u8] = b"sund/device-certificate/v1";
/// Domain separator of registration proofs.
const REGISTER_CONTEXT: &[u8] = b"sund/register/v1";

/// Why a certificate was refused. Each reason has its own error code on the wire.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CertificateError {
    /// The bytes are not a certificate of a format this build reads.
    #[error("malformed certificate: {0}")]
    Malformed(&'static str),
    /// The signature is not the trust root's (forged or altered).
    #[error("the certificate is not signed by this domain's trust root")]
    BadSignature,
    /// Issued for another domain.
    #[error("the certificate is for domain `{found}`, not `{expected}`")]
    ForeignDomain {
        /// The certificate's domain.
        found: String,
        /// The domain checked against.
        expected: String,
    },
    /// Its validity ended.
    #[error("the certificate expired at {not_after} s (now {now} s); register the device again")]
    Expired {
        /// End of validity, seconds.
        not_after: u64,
        /// Now, seconds.
        now: u64,
    },
    /// Its validity has not begun (or the clocks disagree).
    #[error("the certificate is valid only from {not_before} s (now {now} s); check the clock")]
    NotYetValid {
        /// Start of validity, seconds.
        not_before: u64,
        /// Now, seconds.
        now: u64,
    },
    /// Its device is on the CRL.
    #[error("device {0} is revoked")]
    Revoked(DeviceId),
    /// The certificate names another key than the one presented.
    #[error("the certificate is for another device key")]
    KeyMismatch,
}

/// A device certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceCertificate {
    /// Unique per issuing root; grows with each certificate issued.
    pub serial: u64,
    /// The certified device key.
    pub device_key: DevicePublicKey,
    /// The user the device belongs to.
    pub user: UserId,
    /// Start of validity, seconds of the model clock.
    pub not_before_s: u64,
    /// End of validity (exclusive), seconds of the model clock.
    pub not_after_s: u64,
    /// The issuing domain.
    pub domain: String,
    /// The trust root's signature.
    pub signature: [u8; 64],
}

impl DeviceCertificate {
    /// Issues a certificate signed by `root_key`. Panics if `domain` is not a valid domain (the
    /// authority checks it when it is configured).
    pub fn issue(
        root_key: &DeviceKey,
        domain: &str,
        serial: u64,
        device_key: DevicePublicKey,
        user: UserId,
        not_before_s: u64,
        not_after_s: u64,
    ) -> DeviceCertificate {
        assert!(valid_domain(domain), "the authority's domain is checked");
        let mut cert = DeviceCertificate {
            serial,
            device_key,
            user,
            not_before_s,
            not_after_s,
            domain: domain.to_string(),
            signature: [0; 64],
        };
        cert.signature = root_key.sign(&cert.signed_message());
        cert
    }

    /// The device id of the certified key.
    pub fn device(&self) -> DeviceId {
        self.device_key.device_id()
    }

    fn body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96 + self.domain.len());
        out.extend_from_slice(MAGIC);
        out.push(FORMAT);
        out.extend_from_slice(&self.serial.to_be_bytes());
        out.extend_from_slice(&self.device_key.0);
        out.extend_from_slice(&self.user.to_bytes());
        out.extend_from_slice(&self.not_before_s.to_be_bytes());
        out.extend_from_slice(&self.not_after_s.to_be_bytes());
        put_domain(&mut out, &self.domain);
        out
    }

    fn signed_message(&self) -> Vec<u8> {
        let mut message = CERTIFICATE_CONTEXT.to_vec();
        message.extend_from_slice(&self.body());
        message
    }

    /// The wire and storage encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.body();
        out.extend_from_slice(&self.signature);
        out
    }

    /// Decodes a certificate (the signature is not checked here: see [`Self::verify`]).
    pub fn decode(bytes: &[u8]) -> Result<DeviceCertificate, CertificateError> {
        let mut r = Reader::new(bytes);
        let truncated = CertificateError::Malformed("truncated");
        if r.take(3).ok_or(truncated.clone())? != MAGIC {
            return Err(CertificateError::Malformed("not a Sund device certificate"));
        }
        if r.u8().ok_or(truncated.clone())? != FORMAT {
            return Err(CertificateError::Malformed("unknown certificate format"));
        }
        let serial = r.u64().ok_or(truncated.clone())?;
        let device_key = DevicePublicKey(r.array().ok_or(truncated.clone())?);
        let user = UserId::from_bytes(r.array().ok_or(truncated.clone())?);
        let not_before_s = r.u64().ok_or(truncated.clone())?;
        let not_after_s = r.u64().ok_or(truncated.clone())?;
        let domain =
            get_domain(&mut r).ok_or(CertificateError::Malformed("bad or truncated domain"))?;
        let signature = r.array().ok_or(truncated)?;
        if r.remaining() != 0 {
            return Err(CertificateError::Malformed("trailing bytes"));
        }
        if not_after_s <= not_before_s {
            return Err(CertificateError::Malformed("empty validity period"));
        }
        Ok(DeviceCertificate {
            serial,
            device_key,
            user,
            not_before_s,
            not_after_s,
            domain,
            signature,
        })
    }

    /// Checks the domain and the root's signature, not the validity period: what a device checks
    /// of the certificate it was just issued, whatever its own clock says.
    pub fn verify_issuer(&self, root: &TrustRoot) -> Result<(), CertificateError> {
        if self.domain != root.domain {
            return Err(CertificateError::ForeignDomain {
                found: self.domain.clone(),
                expected: root.domain.clone(),
            });
        }
        if !root.key.verify(&self.signed_message(), &self.signature) {
            return Err(CertificateError::BadSignature);
        }
        Ok(())
    }

    /// Checks the signature against `root`, the domain, and the validity at `now`. Revocation is
    /// the CRL's business ([`super::Crl::check`]).
    pub fn verify(&self, root: &TrustRoot, now: Instant) -> Result<(), CertificateError> {
        self.verify_issuer(root)?;
        self.verify_validity(now)
    }

    /// Checks only the validity period at `now`: for a certificate whose signature is known
    /// good (its issuer holds the very same one).
    pub fn verify_validity(&self, now: Instant) -> Result<(), CertificateError> {
        check_validity(self.not_before_s, self.not_after_s, now)
    }
}

/// Checks a validity period `[not_before_s, not_after_s)` (seconds of the model clock) at
/// `now`: shared by device and gateway certificates.
pub(crate) fn check_validity(
    not_before_s: u64,
    not_after_s: u64,
    now: Instant,
) -> Result<(), CertificateError> {
    let now_s = now.as_micros() / 1_000_000;
    if now_s < not_before_s {
        return Err(CertificateError::NotYetValid {
            not_before: not_before_s,
            now: now_s,
        });
    }
    if now_s >= not_after_s {
        return Err(CertificateError::Expired {
            not_after: not_after_s,
            now: now_s,
        });
    }
    Ok(())
}

/// What a device signs to register: proof that it holds the key it asks a certificate for,
/// bound to the one-time token and the user, so a recorded request cannot enrol another key.
pub fn register_message(token: &[u8; 16], device_key: &DevicePublicKey, user: UserId) -> Vec<u8> {
    let mut message = REGISTER_CONTEXT.to_vec();
    message.extend_from_slice(token);
    message.extend_from_slice(&device_key.0);
    message.extend_from_slice(&user.to_bytes());
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn root() -> (DeviceKey, TrustRoot) {
        let key = DeviceKey::from_seed([7; 32]);
        let root = TrustRoot {
            key: key.public(),
            domain: "example.org".into(),
        };
        (key, root)
    }

    fn cert(root_key: &DeviceKey) -> DeviceCertificate {
        DeviceCertificate::issue(
            root_key,
            "example.org",
            42,
            DeviceKey::from_seed([1; 32]).public(),
            UserId(9),
            1_000,
            2_000,
        )
    }

    fn at(seconds: u64) -> Instant {
        Instant(seconds * 1_000_000)
    }

    #[test]
    fn a_certificate_round_trips_and_verifies_within_its_validity() {
        let (key, root) = root();
        let c = cert(&key);
        let bytes = c.encode();
        assert_eq!(bytes.len(), 3 + 1 + 8 + 32 + 16 + 8 + 8 + 1 + 11 + 64);
        let back = DeviceCertificate::decode(&bytes).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.verify(&root, at(1_000)), Ok(()));
        assert_eq!(back.verify(&root, at(1_999)), Ok(()));
    }

    #[test]
    fn expired_not_yet_valid_foreign_and_tampered_certificates_are_refused() {
        let (key, root) = root();
        let c = cert(&key);
        assert!(matches!(
            c.verify(&root, at(2_000)),
            Err(CertificateError::Expired { .. })
        ));
        assert!(matches!(
            c.verify(&root, at(999)),
            Err(CertificateError::NotYetValid { .. })
        ));
        let foreign = TrustRoot {
            domain: "example.com".into(),
            ..root.clone()
        };
        assert!(matches!(
            c.verify(&foreign, at(1_500)),
            Err(CertificateError::ForeignDomain { .. })
        ));
        let other_root = TrustRoot {
            key: DeviceKey::from_seed([8; 32]).public(),
            domain: "example.org".into(),
        };
        assert_eq!(
            c.verify(&other_root, at(1_500)),
            Err(CertificateError::BadSignature)
        );
        // Flip each byte of the signed part: never valid.
        let bytes = c.encode();
        for i in 4..bytes.len() - 64 {
            let mut tampered = bytes.clone();
            tampered[i] ^= 0x01;
            if let Ok(t) = DeviceCertificate::decode(&tampered) {
                assert!(t.verify(&root, at(1_500)).is_err(), "byte {i}");
            }
        }
        let mut tampered = bytes.clone();
        tampered[bytes.len() - 1] ^= 0x80;
        let t = DeviceCertificate::decode(&tampered).unwrap();
        assert_eq!(
            t.verify(&root, at(1_500)),
            Err(CertificateError::BadSignature)
        );
    }

    #[test]
    fn malformed_certificates_are_errors() {
        let (key, _) = root();
        let bytes = cert(&key).encode();
        for len in 0..bytes.len() {
            assert!(DeviceCertificate::decode(&bytes[..len]).is_err(), "{len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(DeviceCertificate::decode(&longer).is_err());
        let mut format = bytes.clone();
        format[3] = 2;
        assert_eq!(
            DeviceCertificate::decode(&format),
            Err(CertificateError::Malformed("unknown certificate format"))
        );
    }

    #[test]
    fn the_registration_proof_binds_token_key_and_user() {
        let device = DeviceKey::from_seed([1; 32]);
        let message = register_message(&[3; 16], &device.public(), UserId(9));
        let signature = device.sign(&message);
        assert!(device.public().verify(&message, &signature));
        let other_user = register_message(&[3; 16], &device.public(), UserId(10));
        assert!(!device.public().verify(&other_user, &signature));
        let other_token = register_message(&[4; 16], &device.public(), UserId(9));
        assert!(!device.public().verify(&other_token, &signature));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = DeviceCertificate::decode(&bytes);
        }

        #[test]
        fn every_certificate_round_trips(serial: u64, user: u128, start in 0u64..1 << 40, len in 1u64..1 << 30, domain in "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?){0,4}") {
            let key = DeviceKey::from_seed([7; 32]);
            let c = DeviceCertificate::issue(&key, &domain, serial, DeviceKey::from_seed([2; 32]).public(), UserId(user), start, start + len);
            prop_assert_eq!(DeviceCertificate::decode(&c.encode()).unwrap(), c);
        }
    }
}
