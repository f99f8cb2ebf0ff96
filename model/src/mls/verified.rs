//! Signatures and credentials already verified, remembered so that the same check is not
//! made again: a simulation shares one memo among all its devices.
//!
//! Every member of a group verifies the same signatures: the committer's signature on each
//! commit, each added device's KeyPackage and leaf node, each member's certificate and MLS key
//! binding (two Ed25519 verifications, about 100 µs, per device a member sees). A simulated
//! 1,000-device room repeats each of these checks at every member, in one process: building
//! the room cost a million credential checks and as many KeyPackage checks, a third of the
//! run. The checks are pure functions of the bytes checked, so a check that passed once
//! passes again for the same bytes; the memo keeps the SHA-256 digest of everything a check
//! read (the key, the message, the signature; for a credential also the trust root) and
//! answers a repeat from it. Only checks that passed are kept: a failing one is made in full
//! each time, and revocation (which changes) is checked every time.
//!
//! The same memo keeps hashes (`OpenMlsCrypto::hash`): every member computes the tree hash of
//! the same tree at every commit, and a commit changes only the nodes on one path, so almost
//! every node's hash input was hashed before, by this member or another one. At 700 members
//! SHA-256 was a fifth of the run. The memo's key is the whole input (compared byte for byte,
//! never by a digest of it), so an answer is always what hashing would give.
//!
//! And it keeps one copy of each stored ratchet tree that several devices hold byte for byte
//! ([`VerifiedSignatures::share`]): every member of a group stores the same public tree after
//! each commit, half a megabyte at 1,000 members.
//!
//! Production devices run without a memo (`DeviceMlsConfig::verified` is `None`): one device
//! rarely sees the same signature twice. Under simulation, sharing changes no result (the
//! trace hash stays the same with or without it), only the time spent.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use rustc_hash::FxBuildHasher;

use sha2::{Digest, Sha256};

use crate::ids::{DeviceId, UserId};
use crate::trust::credential::verify_identity;
use crate::trust::{Crl, TrustRoot};

/// Most digests of each kind kept; the memo starts again when one is full (some 100 bytes
/// per entry, so at most a few hundred megabytes for a whole simulation).
pub const VERIFIED_MAX: usize = 2_000_000;

/// Longest input whose hash is remembered: a node of the ratchet tree is a few hundred bytes;
/// longer inputs (transcripts, whole messages) are rarely hashed twice.
pub const DIGEST_INPUT_MAX: usize = 4096;

/// Most bytes of hash inputs kept; the hash memo starts again when they pass it. Small, so
/// that a lookup finds its entry in the processor's cache: with 32 MiB, the lookups missed it
/// and cost as much as the hashing they replaced.
pub const DIGEST_BYTES_MAX: usize = 4 << 20;

/// Hash input → output for one algorithm, hashed with FxHash: a lookup must cost less than
/// hashing the input with SHA-256 would.
type Digests = HashMap<Box<[u8]>, Box<[u8]>, FxBuildHasher>; // deterministic: looked up only, never iterated

/// How many values [`VerifiedSignatures::share`] adds between two sweeps of those no device
/// holds any more.
pub const SHARED_SWEEP: u64 = 64;

#[derive(Default)]
struct Memo {
    signatures: BTreeSet<[u8; 32]>,
    credentials: BTreeMap<[u8; 32], (DeviceId, UserId)>,
    /// Hash input → output, one map per hash algorithm (by its code). Looked up only, never
    /// iterated, so the map's order cannot reach a run.
    digests: BTreeMap<u8, Digests>,
    /// Bytes of inputs and outputs in `digests`.
    digest_bytes: usize,
    /// Stored values shared among devices, by [`shared_key`].
    shared: BTreeMap<SharedKey, Bytes>,
    /// Values added to `shared`, to sweep it every [`SHARED_SWEEP`].
    shared_added: u64,
    hits: u64,
}

/// A memo of verified signatures and credentials, cheap to clone: clones share it.
#[derive(Clone, Default)]
pub struct VerifiedSignatures(Arc<Mutex<Memo>>);

impl core::fmt::Debug for VerifiedSignatures {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let memo = self.memo();
        f.debug_struct("VerifiedSignatures")
            .field("signatures", &memo.signatures.len())
            .field("credentials", &memo.credentials.len())
            .finish()
    }
}

/// Two configurations are equal if they share the same memo.
impl PartialEq for VerifiedSignatures {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for VerifiedSignatures {}

/// What finds a shared value's candidate copy: its length and its last bytes. A stored tree
/// ends with its tree hash, so two trees that differ differ there; the candidate is compared
/// in full before it is shared, so the key need not be a digest of the whole value (a BLAKE3
/// key cost no measurable time either, but read every value twice).
type SharedKey = (usize, [u8; SHARED_KEY_TAIL]);

/// Bytes at the end of a value in its [`SharedKey`].
const SHARED_KEY_TAIL: usize = 48;

fn shared_key(value: &[u8]) -> SharedKey {
    let mut tail = [0u8; SHARED_KEY_TAIL];
    let last = &value[value.len().saturating_sub(SHARED_KEY_TAIL)..];
    tail[..last.len()].copy_from_slice(last);
    (value.len(), tail)
}

/// SHA-256 over a context string and each part, every part length-prefixed so that no two
/// lists of parts share an encoding.
fn digest(context: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(context);
    for part in parts {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hash.finalize().into()
}

impl VerifiedSignatures {
    fn memo(&self) -> MutexGuard<'_, Memo> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `signature` over `message` verifies under `public_key` (of the scheme named by
    /// `scheme`): from the memo if these exact bytes verified before, else by `verify`, whose
    /// success is remembered.
    pub fn signature(
        &self,
        scheme: u16,
        public_key: &[u8],
        message: &[u8],
        signature: &[u8],
        verify: impl FnOnce() -> bool,
    ) -> bool {
        let key = digest(
            b"sund/verified-signature/v1",
            &[&scheme.to_be_bytes(), public_key, message, signature],
        );
        {
            let mut memo = self.memo();
            if memo.signatures.contains(&key) {
                memo.hits += 1;
                return true;
            }
        }
        // Verified outside the lock: openmls may verify on several threads at once.
        if !verify() {
            return false;
        }
        let mut memo = self.memo();
        if memo.signatures.len() >= VERIFIED_MAX {
            memo.signatures.clear();
        }
        memo.signatures.insert(key);
        true
    }

    /// As [`verify_identity`]: the device and user a credential identity names, if its
    /// certificate is from `root`, its device is not revoked in `crl`, and its key signed the
    /// binding to `mls_signature_key`. Revocation is checked every time; the rest is
    /// remembered once it passed, for these exact bytes under this root.
    pub fn credential(
        &self,
        identity: &[u8],
        mls_signature_key: &[u8],
        root: &TrustRoot,
        crl: Option<&Crl>,
    ) -> Result<(DeviceId, UserId), String> {
        let key = digest(
            b"sund/verified-credential/v1",
            &[
                &root.key.0,
                root.domain.as_bytes(),
                identity,
                mls_signature_key,
            ],
        );
        let known = {
            let mut memo = self.memo();
            let known = memo.credentials.get(&key).copied();
            memo.hits += u64::from(known.is_some());
            known
        };
        if let Some((device, user)) = known {
            // Every other check passed for these bytes: revocation is the only one left that
            // can fail, and it is the one verify_identity reports first after them.
            if crl.is_some_and(|c| c.revoked.contains(&device)) {
                return Err(format!("{device} is revoked"));
            }
            return Ok((device, user));
        }
        let verified = verify_identity(identity, mls_signature_key, root, crl)?;
        let mut memo = self.memo();
        if memo.credentials.len() >= VERIFIED_MAX {
            memo.credentials.clear();
        }
        memo.credentials.insert(key, verified);
        Ok(verified)
    }

    /// The hash of `input` under algorithm `algorithm` (any code that names it): from the memo
    /// if this exact input was hashed before, else by `hash`, whose success is remembered
    /// (inputs longer than [`DIGEST_INPUT_MAX`] are not).
    pub fn digest<E>(
        &self,
        algorithm: u8,
        input: &[u8],
        hash: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<Vec<u8>, E> {
        if input.len() > DIGEST_INPUT_MAX {
            return hash();
        }
        {
            let mut memo = self.memo();
            let known = memo
                .digests
                .get(&algorithm)
                .and_then(|digests| digests.get(input))
                .map(|digest| digest.to_vec());
            if let Some(digest) = known {
                memo.hits += 1;
                return Ok(digest);
            }
        }
        let digest = hash()?;
        let mut memo = self.memo();
        if memo.digest_bytes >= DIGEST_BYTES_MAX {
            memo.digests.clear();
            memo.digest_bytes = 0;
        }
        memo.digest_bytes += input.len() + digest.len();
        memo.digests
            .entry(algorithm)
            .or_default()
            .insert(input.into(), digest.as_slice().into());
        Ok(digest)
    }

    /// `value` as shared bytes: the copy already held if some device stored these exact bytes
    /// and still holds them, else `value` itself, which later devices will share.
    pub fn share(&self, value: Vec<u8>) -> Bytes {
        let key = shared_key(&value);
        let mut memo = self.memo();
        if let Some(held) = memo.shared.get(&key) {
            // Compared in full: the key only finds the candidate.
            if held[..] == value[..] {
                let held = held.clone();
                memo.hits += 1;
                return held;
            }
            return Bytes::from(value);
        }
        memo.shared_added += 1;
        if memo.shared_added % SHARED_SWEEP == 0 {
            // A value only the memo holds is held by no device any more.
            memo.shared.retain(|_, held| !held.is_unique());
        }
        let value = Bytes::from(value);
        memo.shared.insert(key, value.clone());
        value
    }

    /// How many values the memo holds for sharing (for tests).
    pub fn shared_len(&self) -> usize {
        self.memo().shared.len()
    }

    /// How many checks and hashes the memo answered.
    pub fn hits(&self) -> u64 {
        self.memo().hits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::DeviceKey;
    use crate::trust::credential::credential_identity;
    use crate::trust::DeviceCertificate;

    const DOMAIN: &str = "example.org";

    /// A root and a certified device's identity for MLS key `[7; 32]`.
    fn world() -> (TrustRoot, DeviceId, Vec<u8>) {
        let root_key = DeviceKey::from_seed([70; 32]);
        let key = DeviceKey::from_seed([1; 32]);
        let cert = DeviceCertificate::issue(
            &root_key,
            DOMAIN,
            1,
            key.public(),
            UserId(5),
            0,
            4_000_000_000,
        );
        let root = TrustRoot {
            key: root_key.public(),
            domain: DOMAIN.into(),
        };
        (
            root,
            key.device_id(),
            credential_identity(&key, &cert, &[7; 32]),
        )
    }

    #[test]
    fn a_remembered_credential_gives_what_a_full_check_gives() {
        let (root, device, identity) = world();
        let memo = VerifiedSignatures::default();
        let full = verify_identity(&identity, &[7; 32], &root, None);
        assert_eq!(full, Ok((device, UserId(5))));
        assert_eq!(memo.credential(&identity, &[7; 32], &root, None), full);
        assert_eq!(memo.hits(), 0);
        // A clone shares the memo.
        assert_eq!(
            memo.clone().credential(&identity, &[7; 32], &root, None),
            full
        );
        assert_eq!(memo.hits(), 1);
        // Revocation is checked at every hit, with verify_identity's words.
        let crl = Crl::issue(
            &DeviceKey::from_seed([70; 32]),
            DOMAIN,
            2,
            0,
            [device].into_iter().collect(),
        );
        assert_eq!(
            memo.credential(&identity, &[7; 32], &root, Some(&crl)),
            verify_identity(&identity, &[7; 32], &root, Some(&crl))
        );
        assert!(memo
            .credential(&identity, &[7; 32], &root, Some(&crl))
            .is_err());
        assert_eq!(memo.hits(), 3);
    }

    #[test]
    fn other_bytes_are_checked_in_full_and_failures_are_not_remembered() {
        let (root, _, identity) = world();
        let memo = VerifiedSignatures::default();
        memo.credential(&identity, &[7; 32], &root, None).unwrap();
        // The binding covers the MLS key: another key fails although the device is known.
        let err = memo
            .credential(&identity, &[8; 32], &root, None)
            .unwrap_err();
        assert!(err.contains("not bound"), "{err}");
        let mut tampered = identity.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(memo.credential(&tampered, &[7; 32], &root, None).is_err());
        assert!(memo.credential(&tampered, &[7; 32], &root, None).is_err());
        // Another root does not share the first one's answers.
        let other = TrustRoot {
            key: DeviceKey::from_seed([42; 32]).public(),
            domain: root.domain.clone(),
        };
        assert!(memo.credential(&identity, &[7; 32], &other, None).is_err());
        assert_eq!(memo.hits(), 0);
    }

    #[test]
    fn a_remembered_hash_is_the_hash_of_exactly_those_bytes_under_that_algorithm() {
        let memo = VerifiedSignatures::default();
        let sha256 = |input: &[u8]| Ok::<_, ()>(Sha256::digest(input).to_vec());
        let mut calls = 0;
        let mut hash = |algorithm: u8, input: &[u8]| {
            memo.digest(algorithm, input, || {
                calls += 1;
                sha256(input)
            })
            .unwrap()
        };
        assert_eq!(hash(4, b"node"), sha256(b"node").unwrap());
        assert_eq!(hash(4, b"node"), sha256(b"node").unwrap());
        // Another input, a prefix of one, or another algorithm is hashed anew.
        assert_eq!(hash(4, b"nodf"), sha256(b"nodf").unwrap());
        assert_eq!(hash(4, b"nod"), sha256(b"nod").unwrap());
        hash(6, b"node");
        assert_eq!(calls, 4);
        // A failure is not remembered; a long input is hashed every time.
        assert_eq!(
            memo.digest(4, b"fails", || Err::<Vec<u8>, _>("no")),
            Err("no")
        );
        assert_eq!(
            memo.digest(4, b"fails", || Err::<Vec<u8>, _>("no")),
            Err("no")
        );
        let long = vec![1u8; DIGEST_INPUT_MAX + 1];
        let mut long_calls = 0;
        for _ in 0..2 {
            memo.digest(4, &long, || {
                long_calls += 1;
                sha256(&long)
            })
            .unwrap();
        }
        assert_eq!(long_calls, 2);
        assert_eq!(memo.hits(), 1);
    }

    #[test]
    fn equal_values_share_one_copy_until_no_device_holds_it() {
        let memo = VerifiedSignatures::default();
        let first = memo.share(vec![7; 1000]);
        let second = memo.share(vec![7; 1000]);
        assert_eq!(first, second);
        assert_eq!(first.as_ptr(), second.as_ptr(), "one copy");
        let other = memo.share(vec![8; 1000]);
        assert_ne!(first.as_ptr(), other.as_ptr());
        // Same length and ending, other bytes: never taken for the held copy.
        let mut differs = vec![7; 1000];
        differs[0] = 9;
        let differs = memo.share(differs);
        assert_eq!(differs[0], 9);
        assert_ne!(first.as_ptr(), differs.as_ptr());
        assert_eq!(memo.hits(), 1);
        // Once no device holds a value, a sweep forgets it.
        drop((first, second, other, differs));
        let mut kept = Vec::new();
        for i in 0..SHARED_SWEEP {
            kept.push(memo.share(i.to_be_bytes().to_vec()));
        }
        assert_eq!(memo.shared_len(), kept.len(), "only the values still held");
        let again = memo.share(vec![7; 1000]);
        assert_eq!(&again[..], &[7; 1000][..]);
    }

    #[test]
    fn a_signature_is_verified_once_and_a_bad_one_every_time() {
        let memo = VerifiedSignatures::default();
        let mut calls = 0;
        for _ in 0..3 {
            assert!(memo.signature(1, b"pk", b"message", b"sig", || {
                calls += 1;
                true
            }));
        }
        assert_eq!(calls, 1);
        for _ in 0..3 {
            assert!(!memo.signature(1, b"pk", b"message", b"bad", || {
                calls += 1;
                false
            }));
        }
        assert_eq!(calls, 4);
        // Any other byte (scheme, key, message, signature) is a different check.
        let mut other = 0;
        for (scheme, pk, msg, sig) in [
            (2u16, &b"pk"[..], &b"message"[..], &b"sig"[..]),
            (1, b"pK", b"message", b"sig"),
            (1, b"pk", b"messagf", b"sig"),
            (1, b"pk", b"message", b"sih"),
            (1, b"pkm", b"essage", b"sig"),
        ] {
            memo.signature(scheme, pk, msg, sig, || {
                other += 1;
                true
            });
        }
        assert_eq!(other, 5);
    }
}
