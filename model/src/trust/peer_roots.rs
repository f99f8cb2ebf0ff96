//! The trust roots of the domains a gateway federates with, as its own root vouches for them to
//! its devices (issue 15, step 4).
//!
//! A device pins one root, its own domain's. A member of a conversation spanning domains meets
//! devices certified by other roots: to check their credentials it needs those roots, and it
//! must not take them from whoever hands them over. The gateway's operator pins each peer's
//! root by fingerprint; the gateway learns the key in the link's handshake, which checks it
//! against that fingerprint, and signs the set with its own root (a cross-certification, as a
//! PKI's bridge does). Devices check that signature against the root they pinned at
//! enrolment, so a gateway that is not their domain's cannot add a root, and only the domain's
//! own operator decides whom its devices trust.
//!
//! Encoding (signed byte for byte, so exactly one encoding of each set):
//!
//! ```text
//! "SPR" 1 | own domain length (u8) | own domain | count (u8)
//!   | count × (domain length (u8) | domain | root key (32))   domains strictly increasing
//!   | signature (64) by the own root over everything before it
//! ```

use std::collections::BTreeMap;

use crate::codec::Reader;
use crate::identity::{DeviceKey, DevicePublicKey};

use super::{valid_domain, TrustRoot};

/// The most peer roots one set carries (as many domains as a handover names).
pub const PEER_ROOTS_MAX: usize = 64;
/// The longest encoded set: the magic, two counts, every domain at its longest with its key,
/// and the signature.
pub const PEER_ROOTS_BYTES_MAX: usize =
    4 + 2 + (1 + 253) * (PEER_ROOTS_MAX + 1) + 32 * PEER_ROOTS_MAX + 64;

const MAGIC: &[u8; 4] = b"SPR\x01";

/// Why a set of peer roots is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerRootsError {
    /// Not this format, or its fields do not add up.
    #[error("not a set of peer roots: {0}")]
    Malformed(&'static str),
    /// Issued for another domain than the device's.
    #[error("a set of peer roots issued by {found}, not by {expected}")]
    OtherIssuer {
        /// The domain that issued it.
        found: String,
        /// The device's domain.
        expected: String,
    },
    /// The signature is not the device's root's.
    #[error("the set of peer roots is not signed by this domain's root")]
    BadSignature,
}

/// The peer roots a domain's root vouches for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerRoots {
    /// The issuing domain (its root signed the set).
    pub issuer: String,
    /// Each peer domain's root key (never the issuer's own domain).
    pub roots: BTreeMap<String, DevicePublicKey>,
    /// The issuer's root's signature over the encoding before it.
    pub signature: [u8; 64],
}

impl PeerRoots {
    /// Signs `roots` with the root of `issuer` (at most [`PEER_ROOTS_MAX`], valid domains,
    /// not `issuer` itself: the caller's configuration guarantees it).
    pub fn issue(
        root: &DeviceKey,
        issuer: &str,
        roots: BTreeMap<String, DevicePublicKey>,
    ) -> PeerRoots {
        assert!(
            roots.len() <= PEER_ROOTS_MAX,
            "bounded by the configuration"
        );
        assert!(
            roots.keys().all(|d| valid_domain(d) && d != issuer),
            "peer domains are checked when configured"
        );
        let signature = root.sign(&signed_part(issuer, &roots));
        PeerRoots {
            issuer: issuer.to_string(),
            roots,
            signature,
        }
    }

    /// Checks the set against the device's own root: issued by its domain, signed by its key.
    pub fn verify(&self, own: &TrustRoot) -> Result<(), PeerRootsError> {
        if self.issuer != own.domain {
            return Err(PeerRootsError::OtherIssuer {
                found: self.issuer.clone(),
                expected: own.domain.clone(),
            });
        }
        if !own
            .key
            .verify(&signed_part(&self.issuer, &self.roots), &self.signature)
        {
            return Err(PeerRootsError::BadSignature);
        }
        Ok(())
    }

    /// The root of `domain` as this set vouches for it.
    pub fn root_of(&self, domain: &str) -> Option<TrustRoot> {
        self.roots.get(domain).map(|key| TrustRoot {
            key: *key,
            domain: domain.to_string(),
        })
    }

    /// A short digest of the set (the first 8 bytes of the SHA-256 of its encoding), which a
    /// gateway's heartbeat carries so that a device notices a set it missed; never 0.
    pub fn digest(&self) -> u64 {
        use sha2::Digest as _;
        let hash = sha2::Sha256::digest(self.encode());
        u64::from_be_bytes(hash[..8].try_into().expect("32 bytes")).max(1)
    }

    /// The encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = signed_part(&self.issuer, &self.roots);
        out.extend_from_slice(&self.signature);
        out
    }

    /// Reads a set; never panics, allocates only what the input holds. The signature is not
    /// checked here ([`PeerRoots::verify`] does).
    pub fn decode(bytes: &[u8]) -> Result<PeerRoots, PeerRootsError> {
        let mut r = Reader::new(bytes);
        if r.take(MAGIC.len()) != Some(MAGIC.as_slice()) {
            return Err(PeerRootsError::Malformed("no magic"));
        }
        let issuer = domain(&mut r)?;
        let count = usize::from(r.u8().ok_or(PeerRootsError::Malformed("truncated"))?);
        if count > PEER_ROOTS_MAX {
            return Err(PeerRootsError::Malformed("too many roots"));
        }
        let mut roots = BTreeMap::new();
        let mut last: Option<String> = None;
        for _ in 0..count {
            let peer = domain(&mut r)?;
            if last.as_ref().is_some_and(|l| *l >= peer) {
                return Err(PeerRootsError::Malformed("domains out of order"));
            }
            if peer == issuer {
                return Err(PeerRootsError::Malformed("the issuer's own domain"));
            }
            let key = DevicePublicKey(
                r.array::<32>()
                    .ok_or(PeerRootsError::Malformed("truncated"))?,
            );
            last = Some(peer.clone());
            roots.insert(peer, key);
        }
        let signature = r
            .array::<64>()
            .ok_or(PeerRootsError::Malformed("truncated"))?;
        if r.remaining() != 0 {
            return Err(PeerRootsError::Malformed("trailing bytes"));
        }
        Ok(PeerRoots {
            issuer,
            roots,
            signature,
        })
    }
}

/// Everything the signature covers.
fn signed_part(issuer: &str, roots: &BTreeMap<String, DevicePublicKey>) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    put_domain(&mut out, issuer);
    out.push(roots.len() as u8);
    for (peer, key) in roots {
        put_domain(&mut out, peer);
        out.extend_from_slice(&key.0);
    }
    out
}

fn put_domain(out: &mut Vec<u8>, domain: &str) {
    debug_assert!(valid_domain(domain), "checked by the caller");
    out.push(domain.len() as u8);
    out.extend_from_slice(domain.as_bytes());
}

fn domain(r: &mut Reader<'_>) -> Result<String, PeerRootsError> {
    let len = usize::from(r.u8().ok_or(PeerRootsError::Malformed("truncated"))?);
    let bytes = r.take(len).ok_or(PeerRootsError::Malformed("truncated"))?;
    let domain = core::str::from_utf8(bytes)
        .ok()
        .filter(|d| valid_domain(d))
        .ok_or(PeerRootsError::Malformed("not a domain name"))?;
    Ok(domain.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn own() -> (DeviceKey, TrustRoot) {
        let key = DeviceKey::from_seed([1; 32]);
        let root = TrustRoot {
            key: key.public(),
            domain: "a.example".into(),
        };
        (key, root)
    }

    fn peers() -> BTreeMap<String, DevicePublicKey> {
        BTreeMap::from([
            ("b.example".into(), DeviceKey::from_seed([2; 32]).public()),
            ("c.example".into(), DeviceKey::from_seed([3; 32]).public()),
        ])
    }

    #[test]
    fn a_set_signed_by_the_own_root_verifies_and_names_each_peer_root() {
        let (key, root) = own();
        let set = PeerRoots::issue(&key, "a.example", peers());
        assert_eq!(set.verify(&root), Ok(()));
        let b = set.root_of("b.example").unwrap();
        assert_eq!(b.key, DeviceKey::from_seed([2; 32]).public());
        assert_eq!(b.domain, "b.example");
        assert!(set.root_of("d.example").is_none());
        assert_eq!(PeerRoots::decode(&set.encode()), Ok(set));
    }

    #[test]
    fn a_set_from_another_root_or_domain_or_changed_after_signing_is_refused() {
        let (key, root) = own();
        let mallory = DeviceKey::from_seed([9; 32]);
        let forged = PeerRoots::issue(&mallory, "a.example", peers());
        assert_eq!(forged.verify(&root), Err(PeerRootsError::BadSignature));
        let other = PeerRoots::issue(&key, "z.example", peers());
        assert!(matches!(
            other.verify(&root),
            Err(PeerRootsError::OtherIssuer { .. })
        ));
        // A root swapped in after signing.
        let mut swapped = PeerRoots::issue(&key, "a.example", peers());
        swapped.roots.insert("b.example".into(), mallory.public());
        assert_eq!(swapped.verify(&root), Err(PeerRootsError::BadSignature));
        // One added.
        let mut added = PeerRoots::issue(&key, "a.example", peers());
        added.roots.insert("m.example".into(), mallory.public());
        assert_eq!(added.verify(&root), Err(PeerRootsError::BadSignature));
    }

    #[test]
    fn the_decoder_refuses_what_has_no_single_encoding() {
        let (key, _) = own();
        let bytes = PeerRoots::issue(&key, "a.example", peers()).encode();
        // Swap the two entries: out of order.
        let first = 4 + 1 + 9 + 1;
        let entry = 1 + 9 + 32;
        let mut swapped = bytes.clone();
        swapped[first..first + entry].copy_from_slice(&bytes[first + entry..first + 2 * entry]);
        swapped[first + entry..first + 2 * entry].copy_from_slice(&bytes[first..first + entry]);
        assert_eq!(
            PeerRoots::decode(&swapped),
            Err(PeerRootsError::Malformed("domains out of order"))
        );
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(PeerRoots::decode(&longer).is_err());
        for cut in 0..bytes.len() {
            assert!(
                PeerRoots::decode(&bytes[..cut]).is_err(),
                "a prefix of {cut}"
            );
        }
        let mut too_many = MAGIC.to_vec();
        put_domain(&mut too_many, "a.example");
        too_many.push(PEER_ROOTS_MAX as u8 + 1);
        assert_eq!(
            PeerRoots::decode(&too_many),
            Err(PeerRootsError::Malformed("too many roots"))
        );
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_are_refused_and_what_decodes_encodes_back(
            bytes in proptest::collection::vec(any::<u8>(), 0..400)
        ) {
            if let Ok(set) = PeerRoots::decode(&bytes) {
                prop_assert_eq!(set.encode(), bytes);
            }
        }

        #[test]
        fn every_set_reads_back_as_itself(
            domains in proptest::collection::btree_set("[a-z]{1,12}\\.example", 0..8),
            seed in any::<u8>(),
        ) {
            let (key, root) = own();
            let roots: BTreeMap<String, DevicePublicKey> = domains
                .into_iter()
                .filter(|d| d != "a.example")
                .map(|d| (d, DeviceKey::from_seed([seed; 32]).public()))
                .collect();
            let set = PeerRoots::issue(&key, "a.example", roots);
            let read = PeerRoots::decode(&set.encode()).unwrap();
            prop_assert_eq!(read.verify(&root), Ok(()));
            prop_assert_eq!(read, set);
        }
    }
}
