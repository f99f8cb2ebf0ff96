//! Gateway certificates: the key a gateway authenticates its federation links with, bound to
//! its domain for a validity period and signed by the domain's trust root. The root key signs
//! only certificates; the link key is what is used on every connection, so it can be replaced
//! without asking the peers' operators to pin anything new (they pin the root).
//!
//! Encoding (big-endian, 94 to 346 bytes):
//!
//! ```text
//! "SGC" | format 1 (u8) | serial (u64) | link key (32) | not before (u64, s)
//!       | not after (u64, s) | domain length (u8) | domain | signature (64)
//! ```
//!
//! The signature is Ed25519 by the trust root over [`GATEWAY_CERTIFICATE_CONTEXT`] followed by
//! every byte before the signature. Its context differs from a device certificate's, so no
//! signature of one kind can pass for the other.

use crate::codec::Reader;
use crate::identity::{DeviceKey, DevicePublicKey};
use crate::time::Instant;
use crate::trust::codec::{get_domain, put_domain};
use crate::trust::{check_validity, valid_domain, CertificateError, TrustRoot};

const MAGIC: &[u8; 3] = b"SGC";
const FORMAT: u8 = 1;
/// Domain separator of gateway certificate signatures.
pub const GATEWAY_CERTIFICATE_CONTEXT: &[u8] = b"sund/gateway-certificate/v1";
/// Longest encoding (a domain of 253 bytes).
pub const GATEWAY_CERTIFICATE_BYTES_MAX: usize = 3 + 1 + 8 + 32 + 8 + 8 + 1 + 253 + 64;

/// A gateway's federation link key, certified by its domain's trust root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayCertificate {
    /// Unique per issuing root.
    pub serial: u64,
    /// The certified link key.
    pub link_key: DevicePublicKey,
    /// Start of validity, seconds of the model clock.
    pub not_before_s: u64,
    /// End of validity (exclusive), seconds of the model clock.
    pub not_after_s: u64,
    /// The gateway's domain.
    pub domain: String,
    /// The trust root's signature.
    pub signature: [u8; 64],
}

impl GatewayCertificate {
    /// Issues a certificate signed by `root_key`. Panics if `domain` is not a valid domain or
    /// the period is empty (the caller configures both).
    pub fn issue(
        root_key: &DeviceKey,
        domain: &str,
        serial: u64,
        link_key: DevicePublicKey,
        not_before_s: u64,
        not_after_s: u64,
    ) -> GatewayCertificate {
        assert!(valid_domain(domain), "the gateway's domain is checked");
        assert!(not_before_s < not_after_s, "a validity period is not empty");
        let mut cert = GatewayCertificate {
            serial,
            link_key,
            not_before_s,
            not_after_s,
            domain: domain.to_string(),
            signature: [0; 64],
        };
        cert.signature = root_key.sign(&cert.signed_message());
        cert
    }

    fn body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(GATEWAY_CERTIFICATE_BYTES_MAX);
        out.extend_from_slice(MAGIC);
        out.push(FORMAT);
        out.extend_from_slice(&self.serial.to_be_bytes());
        out.extend_from_slice(&self.link_key.0);
        out.extend_from_slice(&self.not_before_s.to_be_bytes());
        out.extend_from_slice(&self.not_after_s.to_be_bytes());
        put_domain(&mut out, &self.domain);
        out
    }

    fn signed_message(&self) -> Vec<u8> {
        let mut message = GATEWAY_CERTIFICATE_CONTEXT.to_vec();
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
    pub fn decode(bytes: &[u8]) -> Result<GatewayCertificate, CertificateError> {
        if bytes.len() > GATEWAY_CERTIFICATE_BYTES_MAX {
            return Err(CertificateError::Malformed(
                "longer than any gateway certificate",
            ));
        }
        let mut r = Reader::new(bytes);
        let truncated = CertificateError::Malformed("truncated");
        if r.take(3).ok_or(truncated.clone())? != MAGIC {
            return Err(CertificateError::Malformed(
                "not a Sund gateway certificate",
            ));
        }
        if r.u8().ok_or(truncated.clone())? != FORMAT {
            return Err(CertificateError::Malformed("unknown certificate format"));
        }
        let serial = r.u64().ok_or(truncated.clone())?;
        let link_key = DevicePublicKey(r.array().ok_or(truncated.clone())?);
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
        Ok(GatewayCertificate {
            serial,
            link_key,
            not_before_s,
            not_after_s,
            domain,
            signature,
        })
    }

    /// Checks the domain, the root's signature and the validity at `now`.
    pub fn verify(&self, root: &TrustRoot, now: Instant) -> Result<(), CertificateError> {
        if self.domain != root.domain {
            return Err(CertificateError::ForeignDomain {
                found: self.domain.clone(),
                expected: root.domain.clone(),
            });
        }
        if !root.key.verify(&self.signed_message(), &self.signature) {
            return Err(CertificateError::BadSignature);
        }
        check_validity(self.not_before_s, self.not_after_s, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::DeviceCertificate;
    use proptest::prelude::*;

    fn root(domain: &str, seed: u8) -> (DeviceKey, TrustRoot) {
        let key = DeviceKey::from_seed([seed; 32]);
        let root = TrustRoot {
            key: key.public(),
            domain: domain.into(),
        };
        (key, root)
    }

    fn at(s: u64) -> Instant {
        Instant(s * 1_000_000)
    }

    #[test]
    fn a_certificate_verifies_under_its_root_only_within_its_period() {
        let (root_key, a) = root("a.example", 1);
        let link = DeviceKey::from_seed([9; 32]).public();
        let cert = GatewayCertificate::issue(&root_key, "a.example", 7, link, 100, 200);
        let decoded = GatewayCertificate::decode(&cert.encode()).unwrap();
        assert_eq!(decoded, cert);
        assert_eq!(decoded.verify(&a, at(150)), Ok(()));
        assert!(matches!(
            decoded.verify(&a, at(200)),
            Err(CertificateError::Expired { .. })
        ));
        assert!(matches!(
            decoded.verify(&a, at(99)),
            Err(CertificateError::NotYetValid { .. })
        ));
        let (_, other_root) = root("a.example", 2);
        assert_eq!(
            decoded.verify(&other_root, at(150)),
            Err(CertificateError::BadSignature)
        );
        let (_, b) = root("b.example", 1);
        assert!(matches!(
            decoded.verify(&b, at(150)),
            Err(CertificateError::ForeignDomain { .. })
        ));
        let mut altered = cert.clone();
        altered.link_key = DeviceKey::from_seed([8; 32]).public();
        assert_eq!(
            altered.verify(&a, at(150)),
            Err(CertificateError::BadSignature)
        );
    }

    #[test]
    fn a_device_certificate_signature_never_passes_for_a_gateway_one() {
        // Same root, same key bytes where the layouts overlap: the contexts differ.
        let (root_key, a) = root("a.example", 1);
        let key = DeviceKey::from_seed([9; 32]).public();
        let device = DeviceCertificate::issue(
            &root_key,
            "a.example",
            7,
            key,
            crate::ids::UserId::of("x", "localhost"),
            100,
            200,
        );
        let forged = GatewayCertificate {
            serial: 7,
            link_key: key,
            not_before_s: 100,
            not_after_s: 200,
            domain: "a.example".into(),
            signature: device.signature,
        };
        assert_eq!(
            forged.verify(&a, at(150)),
            Err(CertificateError::BadSignature)
        );
        assert!(GatewayCertificate::decode(&device.encode()).is_err());
    }

    #[test]
    fn malformed_encodings_are_refused_with_a_reason() {
        let (root_key, _) = root("a.example", 1);
        let link = DeviceKey::from_seed([9; 32]).public();
        let bytes = GatewayCertificate::issue(&root_key, "a.example", 1, link, 1, 2).encode();
        for cut in 0..bytes.len() {
            assert!(
                GatewayCertificate::decode(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            GatewayCertificate::decode(&long),
            Err(CertificateError::Malformed("trailing bytes"))
        );
        let mut upper = bytes.clone();
        upper[3 + 1 + 8 + 32 + 16 + 1] = b'A';
        assert!(
            GatewayCertificate::decode(&upper).is_err(),
            "not a valid domain"
        );
        assert!(GatewayCertificate::decode(&vec![0; 4096]).is_err());
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_are_refused_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = GatewayCertificate::decode(&bytes);
        }

        #[test]
        fn every_issued_certificate_round_trips(serial in any::<u64>(), from in 0u64..1 << 40, span in 1u64..1 << 30, label in "[a-z0-9]{1,20}") {
            let domain = format!("{label}.example");
            let (root_key, root) = root(&domain, 3);
            let link = DeviceKey::from_seed([4; 32]).public();
            let cert = GatewayCertificate::issue(&root_key, &domain, serial, link, from, from + span);
            let decoded = GatewayCertificate::decode(&cert.encode()).unwrap();
            prop_assert_eq!(&decoded, &cert);
            prop_assert_eq!(decoded.verify(&root, at(from)), Ok(()));
        }
    }
}
