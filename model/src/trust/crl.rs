//! The certificate revocation list: the revoked devices of a domain under a version that only
//! grows, signed by the trust root.
//!
//! Encoding (big-endian):
//!
//! ```text
//! "SDR" | format 1 (u8) | version (u64) | issued at (u64, s) | domain length (u8) | domain
//!       | count (u32) | device ids (16 bytes each, strictly increasing) | signature (64)
//! ```
//!
//! Entries are device ids, not certificate serials: a revoked key stays revoked, whatever
//! certificate it shows. Strictly increasing order makes the encoding canonical. The signature
//! covers [`CRL_CONTEXT`] followed by every byte before it.

use std::collections::BTreeSet;

use crate::identity::DeviceKey;
use crate::ids::DeviceId;

use super::certificate::CertificateError;
use super::codec::{get_domain, put_domain};
use super::{valid_domain, TrustRoot};
use crate::codec::Reader;

const MAGIC: &[u8; 3] = b"SDR";
const FORMAT: u8 = 1;
const CRL_CONTEXT: &[u8] = b"sund/crl/v1";

/// Most revoked devices one CRL holds, so that it fits in one frame (16 bytes each, under the
/// 1 MiB payload limit).
pub const CRL_ENTRIES_MAX: usize = 60_000;

/// Why a CRL was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CrlError {
    /// The bytes are not a CRL of a format this build reads.
    #[error("malformed CRL: {0}")]
    Malformed(&'static str),
    /// Not signed by the trust root.
    #[error("the CRL is not signed by this domain's trust root")]
    BadSignature,
    /// For another domain.
    #[error("the CRL is for domain `{found}`, not `{expected}`")]
    ForeignDomain {
        /// The CRL's domain.
        found: String,
        /// The domain expected.
        expected: String,
    },
    /// Older than the CRL already held: a rollback attempt (or a stale copy).
    #[error("CRL version {offered} is older than version {held}, which this device holds")]
    Rollback {
        /// The version offered.
        offered: u64,
        /// The version held.
        held: u64,
    },
}

/// A signed CRL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Crl {
    /// Grows by one with each revocation; version 0 is the empty list of a new domain.
    pub version: u64,
    /// When it was issued, seconds of the model clock.
    pub issued_at_s: u64,
    /// The domain.
    pub domain: String,
    /// Revoked devices.
    pub revoked: BTreeSet<DeviceId>,
    /// The trust root's signature.
    pub signature: [u8; 64],
}

impl Crl {
    /// Signs a CRL. Panics if the domain is invalid or the list is longer than
    /// [`CRL_ENTRIES_MAX`] (the authority refuses a revocation beyond it).
    pub fn issue(
        root_key: &DeviceKey,
        domain: &str,
        version: u64,
        issued_at_s: u64,
        revoked: BTreeSet<DeviceId>,
    ) -> Crl {
        assert!(valid_domain(domain), "the authority's domain is checked");
        assert!(revoked.len() <= CRL_ENTRIES_MAX, "checked by the authority");
        let mut crl = Crl {
            version,
            issued_at_s,
            domain: domain.to_string(),
            revoked,
            signature: [0; 64],
        };
        let mut message = CRL_CONTEXT.to_vec();
        message.extend_from_slice(&crl.body());
        crl.signature = root_key.sign(&message);
        crl
    }

    fn body(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.domain.len() + 16 * self.revoked.len());
        out.extend_from_slice(MAGIC);
        out.push(FORMAT);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.issued_at_s.to_be_bytes());
        put_domain(&mut out, &self.domain);
        let count = u32::try_from(self.revoked.len()).expect("bounded by CRL_ENTRIES_MAX");
        out.extend_from_slice(&count.to_be_bytes());
        for device in &self.revoked {
            out.extend_from_slice(&device.to_bytes());
        }
        out
    }

    /// The wire and storage encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.body();
        out.extend_from_slice(&self.signature);
        out
    }

    /// Decodes a CRL (the signature is checked by [`Self::verify`]).
    pub fn decode(bytes: &[u8]) -> Result<Crl, CrlError> {
        let mut r = Reader::new(bytes);
        let truncated = CrlError::Malformed("truncated");
        if r.take(3).ok_or(truncated.clone())? != MAGIC {
            return Err(CrlError::Malformed("not a Sund CRL"));
        }
        if r.u8().ok_or(truncated.clone())? != FORMAT {
            return Err(CrlError::Malformed("unknown CRL format"));
        }
        let version = r.u64().ok_or(truncated.clone())?;
        let issued_at_s = r.u64().ok_or(truncated.clone())?;
        let domain = get_domain(&mut r).ok_or(CrlError::Malformed("bad or truncated domain"))?;
        let count = r.u32().ok_or(truncated.clone())? as usize;
        if count > CRL_ENTRIES_MAX {
            return Err(CrlError::Malformed("more entries than a CRL may hold"));
        }
        if r.remaining() != count * 16 + 64 {
            return Err(CrlError::Malformed("length does not match the entry count"));
        }
        let mut revoked = BTreeSet::new();
        let mut last: Option<DeviceId> = None;
        for _ in 0..count {
            let device = DeviceId::from_bytes(r.array().ok_or(truncated.clone())?);
            if last.is_some_and(|l| l >= device) {
                return Err(CrlError::Malformed(
                    "entries not in strictly increasing order",
                ));
            }
            last = Some(device);
            revoked.insert(device);
        }
        let signature = r.array().ok_or(truncated)?;
        Ok(Crl {
            version,
            issued_at_s,
            domain,
            revoked,
            signature,
        })
    }

    /// Checks the domain and the root's signature.
    pub fn verify(&self, root: &TrustRoot) -> Result<(), CrlError> {
        if self.domain != root.domain {
            return Err(CrlError::ForeignDomain {
                found: self.domain.clone(),
                expected: root.domain.clone(),
            });
        }
        let mut message = CRL_CONTEXT.to_vec();
        message.extend_from_slice(&self.body());
        if !root.key.verify(&message, &self.signature) {
            return Err(CrlError::BadSignature);
        }
        Ok(())
    }

    /// Verifies `offered` and accepts it in place of `held` only if it is not older: a device
    /// never goes back to a CRL that revokes less. An equal version is accepted (a resend).
    pub fn accept(held: Option<&Crl>, offered: &Crl, root: &TrustRoot) -> Result<(), CrlError> {
        offered.verify(root)?;
        match held {
            Some(held) if offered.version < held.version => Err(CrlError::Rollback {
                offered: offered.version,
                held: held.version,
            }),
            _ => Ok(()),
        }
    }

    /// `Err(Revoked)` if `device` is on the list.
    pub fn check(&self, device: DeviceId) -> Result<(), CertificateError> {
        if self.revoked.contains(&device) {
            Err(CertificateError::Revoked(device))
        } else {
            Ok(())
        }
    }
}

/// A short digest of the versions of other domains' CRLs (by domain), which a gateway's
/// heartbeat carries so that a device notices one it missed: the first 8 bytes of SHA-256 over
/// each domain and version in domain order, never 0; `None` when no list revokes anything
/// (version 0 is a new domain's empty list, which nobody needs to fetch).
pub fn versions_digest<'a>(crls: impl IntoIterator<Item = (&'a str, u64)>) -> Option<u64> {
    use sha2::Digest as _;
    let mut held: Vec<(&str, u64)> = crls.into_iter().filter(|(_, v)| *v > 0).collect();
    if held.is_empty() {
        return None;
    }
    held.sort_unstable();
    let mut hash = sha2::Sha256::new();
    for (domain, version) in held {
        hash.update((domain.len() as u64).to_be_bytes());
        hash.update(domain.as_bytes());
        hash.update(version.to_be_bytes());
    }
    let hash = hash.finalize();
    Some(u64::from_be_bytes(hash[..8].try_into().expect("32 bytes")).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_versions_digest_follows_every_domain_and_version_and_skips_empty_lists() {
        let a = versions_digest([("a.example", 2), ("b.example", 1)]);
        assert!(a.is_some());
        assert_eq!(a, versions_digest([("b.example", 1), ("a.example", 2)]));
        assert_ne!(a, versions_digest([("a.example", 3), ("b.example", 1)]));
        assert_ne!(a, versions_digest([("a.example", 2), ("c.example", 1)]));
        assert_eq!(
            versions_digest([("a.example", 2), ("c.example", 0)]),
            versions_digest([("a.example", 2)])
        );
        assert_eq!(versions_digest([("a.example", 0)]), None);
        assert_eq!(versions_digest([]), None);
    }

    fn root() -> (DeviceKey, TrustRoot) {
        let key = DeviceKey::from_seed([7; 32]);
        let root = TrustRoot {
            key: key.public(),
            domain: "example.org".into(),
        };
        (key, root)
    }

    fn crl(key: &DeviceKey, version: u64, revoked: &[u128]) -> Crl {
        let revoked = revoked.iter().map(|&d| DeviceId(d)).collect();
        Crl::issue(key, "example.org", version, 100, revoked)
    }

    #[test]
    fn a_crl_round_trips_verifies_and_lists_its_devices() {
        let (key, root) = root();
        let c = crl(&key, 3, &[5, 1, 9]);
        let back = Crl::decode(&c.encode()).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.verify(&root), Ok(()));
        assert_eq!(
            back.check(DeviceId(5)),
            Err(CertificateError::Revoked(DeviceId(5)))
        );
        assert_eq!(back.check(DeviceId(6)), Ok(()));
    }

    #[test]
    fn a_rollback_is_refused_and_a_resend_is_not() {
        let (key, root) = root();
        let v2 = crl(&key, 2, &[1]);
        let v3 = crl(&key, 3, &[1, 2]);
        assert_eq!(Crl::accept(Some(&v2), &v3, &root), Ok(()));
        assert_eq!(Crl::accept(Some(&v3), &v3, &root), Ok(()));
        assert_eq!(
            Crl::accept(Some(&v3), &v2, &root),
            Err(CrlError::Rollback {
                offered: 2,
                held: 3
            })
        );
        assert_eq!(Crl::accept(None, &v2, &root), Ok(()));
    }

    #[test]
    fn forged_foreign_and_tampered_crls_are_refused() {
        let (key, root) = root();
        let forged = crl(&DeviceKey::from_seed([8; 32]), 9, &[]);
        assert_eq!(forged.verify(&root), Err(CrlError::BadSignature));
        let foreign = Crl::issue(&key, "example.com", 1, 100, BTreeSet::new());
        assert!(matches!(
            foreign.verify(&root),
            Err(CrlError::ForeignDomain { .. })
        ));
        // Dropping a revoked device from a signed CRL breaks the signature.
        let mut shrunk = crl(&key, 4, &[1, 2]);
        shrunk.revoked.remove(&DeviceId(2));
        let back = Crl::decode(&shrunk.encode()).unwrap();
        assert_eq!(back.verify(&root), Err(CrlError::BadSignature));
    }

    #[test]
    fn malformed_crls_are_errors() {
        let (key, _) = root();
        let bytes = crl(&key, 1, &[1, 2]).encode();
        for len in 0..bytes.len() {
            assert!(Crl::decode(&bytes[..len]).is_err(), "{len}");
        }
        // Swap the two entries: no longer strictly increasing.
        let start = 3 + 1 + 8 + 8 + 1 + 11 + 4;
        let mut swapped = bytes.clone();
        swapped[start..start + 32].rotate_left(16);
        assert_eq!(
            Crl::decode(&swapped),
            Err(CrlError::Malformed(
                "entries not in strictly increasing order"
            ))
        );
        // A count beyond the limit is refused before any allocation.
        let mut huge = bytes.clone();
        huge[start - 4..start].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            Crl::decode(&huge),
            Err(CrlError::Malformed("more entries than a CRL may hold"))
        );
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Crl::decode(&bytes);
        }

        #[test]
        fn every_crl_round_trips(version: u64, devices in proptest::collection::btree_set(any::<u128>(), 0..50)) {
            let key = DeviceKey::from_seed([7; 32]);
            let c = Crl::issue(&key, "example.org", version, 5, devices.into_iter().map(DeviceId).collect());
            prop_assert_eq!(Crl::decode(&c.encode()).unwrap(), c);
        }
    }
}
