//! What a device holds of its domain's trust: its own certificate, the trust root it pinned, and
//! the newest CRL it has seen, kept durably in [`NODE_TRUST_TABLE`]; and of other domains',
//! the roots its own root vouched for and each one's newest CRL ([`NODE_PEER_CRLS_TABLE`]).
//!
//! The root is pinned by the enrolment token's fingerprint when the device registers with one,
//! and on first use otherwise (open enrolment, for local use). A CRL is accepted only if the
//! pinned root signed it and it is not older than the one held; another domain's, only if the
//! root the pinned root vouched for that domain signed it, and likewise not older.

use std::collections::BTreeMap;

use crate::env::{scan_all, StoreError, StoreRead, Table, WriteBatch};
use crate::identity::DevicePublicKey;
use crate::ids::{DeviceId, UserId};

use super::authority::EnrolmentToken;
use super::certificate::DeviceCertificate;
use super::crl::{Crl, CrlError};
use super::{valid_domain, TrustRoot};

/// A device's certificate, pinned root and CRL: keys `certificate`, `root` (key 32 | domain),
/// `crl`; for pairing, `pending_vouch` (see [`PendingVouch`]) and `paired_with` (the
/// certificate of the device whose pairing code this device took, once the gateway confirmed
/// it).
pub const NODE_TRUST_TABLE: Table = Table("node_trust");

/// Other domains' newest CRLs a device holds: key the domain, value the encoded CRL.
pub const NODE_PEER_CRLS_TABLE: Table = Table("node_peer_crls");

const CERTIFICATE_KEY: &[u8] = b"certificate";
const ROOT_KEY: &[u8] = b"root";
const CRL_KEY: &[u8] = b"crl";
const PENDING_VOUCH_KEY: &[u8] = b"pending_vouch";
const PAIRED_WITH_KEY: &[u8] = b"paired_with";
const PEER_ROOTS_KEY: &[u8] = b"peer_roots";

/// A vouch for this device's pairing code that the gateway has not confirmed yet: stored as
/// secret (16) | expires (u64, Unix seconds) | signature (64).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PendingVouch {
    /// The code's one-time secret.
    pub secret: [u8; 16],
    /// Unix seconds after which the gateway refuses the code.
    pub expires: u64,
    /// The device key's signature over `pairing::vouch_message`.
    pub signature: [u8; 64],
}

impl core::fmt::Debug for PendingVouch {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "PendingVouch(expires {})", self.expires)
    }
}

impl PendingVouch {
    fn encode(&self) -> Vec<u8> {
        let mut out = self.secret.to_vec();
        out.extend_from_slice(&self.expires.to_be_bytes());
        out.extend_from_slice(&self.signature);
        out
    }

    fn decode(bytes: &[u8]) -> Option<PendingVouch> {
        if bytes.len() != 88 {
            return None;
        }
        Some(PendingVouch {
            secret: bytes[..16].try_into().ok()?,
            expires: u64::from_be_bytes(bytes[16..24].try_into().ok()?),
            signature: bytes[24..].try_into().ok()?,
        })
    }
}

/// Why a certificate from the gateway was not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HolderError {
    /// The certificate or root did not check out.
    #[error("the gateway's certificate was refused: {0}")]
    Certificate(String),
    /// The gateway's root is not the one the enrolment token pins (or the one pinned before).
    #[error("the gateway's trust root {found} is not the pinned root {pinned}; this is not the gateway the token came from")]
    WrongRoot {
        /// Fingerprint offered.
        found: String,
        /// Fingerprint expected.
        pinned: String,
    },
}

/// A device's trust state.
#[derive(Clone, Debug, Default)]
pub struct TrustHolder {
    certificate: Option<DeviceCertificate>,
    root: Option<TrustRoot>,
    crl: Option<Crl>,
    pending_vouch: Option<PendingVouch>,
    paired_with: Option<DeviceCertificate>,
    /// Other domains' roots, as the pinned root vouched for them (checked when taken).
    peer_roots: Option<super::peer_roots::PeerRoots>,
    /// Other domains' newest CRLs, by domain (each checked against its vouched root).
    peer_crls: BTreeMap<String, Crl>,
}

impl TrustHolder {
    /// Reads the state back after a restart.
    pub fn recover(store: &dyn StoreRead) -> Result<TrustHolder, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            table: NODE_TRUST_TABLE.0,
            reason,
        };
        let root = match store.get(NODE_TRUST_TABLE, ROOT_KEY)? {
            Some(bytes) => Some(decode_root(&bytes).ok_or_else(|| corrupt("bad root".into()))?),
            None => None,
        };
        let certificate = match store.get(NODE_TRUST_TABLE, CERTIFICATE_KEY)? {
            Some(bytes) => {
                Some(DeviceCertificate::decode(&bytes).map_err(|e| corrupt(e.to_string()))?)
            }
            None => None,
        };
        let crl = match store.get(NODE_TRUST_TABLE, CRL_KEY)? {
            Some(bytes) => Some(Crl::decode(&bytes).map_err(|e| corrupt(e.to_string()))?),
            None => None,
        };
        let pending_vouch = match store.get(NODE_TRUST_TABLE, PENDING_VOUCH_KEY)? {
            Some(bytes) => Some(
                PendingVouch::decode(&bytes).ok_or_else(|| corrupt("bad pending vouch".into()))?,
            ),
            None => None,
        };
        let paired_with = match store.get(NODE_TRUST_TABLE, PAIRED_WITH_KEY)? {
            Some(bytes) => {
                Some(DeviceCertificate::decode(&bytes).map_err(|e| corrupt(e.to_string()))?)
            }
            None => None,
        };
        let peer_roots = match store.get(NODE_TRUST_TABLE, PEER_ROOTS_KEY)? {
            Some(bytes) => Some(
                super::peer_roots::PeerRoots::decode(&bytes).map_err(|e| corrupt(e.to_string()))?,
            ),
            None => None,
        };
        let mut peer_crls = BTreeMap::new();
        scan_all(store, NODE_PEER_CRLS_TABLE, |key, value| {
            let crl = Crl::decode(value).map_err(|e| StoreError::Corrupt {
                table: NODE_PEER_CRLS_TABLE.0,
                reason: e.to_string(),
            })?;
            if crl.domain.as_bytes() != key {
                return Err(StoreError::Corrupt {
                    table: NODE_PEER_CRLS_TABLE.0,
                    reason: format!("a CRL of {} kept under another domain", crl.domain),
                });
            }
            peer_crls.insert(crl.domain.clone(), crl);
            Ok(())
        })?;
        Ok(TrustHolder {
            certificate,
            root,
            crl,
            pending_vouch,
            paired_with,
            peer_roots,
            peer_crls,
        })
    }

    /// Another domain's newest CRL this device holds.
    pub fn peer_crl(&self, domain: &str) -> Option<&Crl> {
        self.peer_crls.get(domain)
    }

    /// Every other domain's CRL held, by domain.
    pub fn peer_crls(&self) -> &BTreeMap<String, Crl> {
        &self.peer_crls
    }

    /// The digest of the other domains' CRL versions held ([`super::versions_digest`]), to
    /// compare with the one the gateway's heartbeat carries.
    pub fn peer_crls_digest(&self) -> Option<u64> {
        super::versions_digest(self.peer_crls.iter().map(|(d, c)| (d.as_str(), c.version)))
    }

    /// Takes another domain's CRL (`crl`, decoded from `encoded`): `Ok(true)` if it is newer
    /// than the one held for that domain (kept in `writes`), `Ok(false)` for a resend; refused
    /// if the pinned root has not vouched for that domain's root, if that root did not sign
    /// it, or if it is older than the one held (a rollback is never taken).
    pub fn accept_peer_crl(
        &mut self,
        crl: Crl,
        encoded: &[u8],
        writes: &mut WriteBatch,
    ) -> Result<bool, CrlError> {
        let Some(root) = self
            .peer_roots
            .as_ref()
            .and_then(|roots| roots.root_of(&crl.domain))
        else {
            return Err(CrlError::Malformed(
                "a CRL of a domain whose root this device's gateway has not vouched for",
            ));
        };
        let held = self.peer_crls.get(&crl.domain);
        Crl::accept(held, &crl, &root)?;
        if held.is_some_and(|held| held.version == crl.version) {
            return Ok(false);
        }
        writes.put(
            NODE_PEER_CRLS_TABLE,
            crl.domain.as_bytes().to_vec(),
            encoded.to_vec(),
        );
        self.peer_crls.insert(crl.domain.clone(), crl);
        Ok(true)
    }

    /// The device's certificate, if it registered.
    pub fn certificate(&self) -> Option<&DeviceCertificate> {
        self.certificate.as_ref()
    }

    /// The vouch for this device's pairing code that the gateway has not confirmed yet.
    pub fn pending_vouch(&self) -> Option<&PendingVouch> {
        self.pending_vouch.as_ref()
    }

    /// Keeps a vouch until the gateway confirms it (replacing an earlier one).
    pub fn set_pending_vouch(&mut self, vouch: PendingVouch, writes: &mut WriteBatch) {
        writes.put(NODE_TRUST_TABLE, PENDING_VOUCH_KEY.to_vec(), vouch.encode());
        self.pending_vouch = Some(vouch);
    }

    /// Drops the pending vouch for `secret` (confirmed or refused); returns it.
    pub fn take_pending_vouch(
        &mut self,
        secret: &[u8; 16],
        writes: &mut WriteBatch,
    ) -> Option<PendingVouch> {
        if self.pending_vouch.is_some_and(|v| v.secret == *secret) {
            writes.delete(NODE_TRUST_TABLE, PENDING_VOUCH_KEY.to_vec());
            return self.pending_vouch.take();
        }
        None
    }

    /// The device whose pairing code this device took, once the gateway confirmed it.
    pub fn paired_with(&self) -> Option<&DeviceCertificate> {
        self.paired_with.as_ref()
    }

    /// Records the confirmed voucher of this device's pairing.
    pub fn record_pairing(&mut self, voucher: &DeviceCertificate, writes: &mut WriteBatch) {
        writes.put(NODE_TRUST_TABLE, PAIRED_WITH_KEY.to_vec(), voucher.encode());
        self.paired_with = Some(voucher.clone());
    }

    /// Other domains' roots as the pinned root vouches for them, if the gateway said any.
    pub fn peer_roots(&self) -> Option<&super::peer_roots::PeerRoots> {
        self.peer_roots.as_ref()
    }

    /// Takes the gateway's set of peer roots (`encoded`) if the pinned root signed it:
    /// `Ok(true)` if it differs from the set held (kept in `writes`), `Ok(false)` if the same.
    /// Refused without a pinned root, or if its issuer or signature is not the root's.
    pub fn accept_peer_roots(
        &mut self,
        encoded: &[u8],
        writes: &mut WriteBatch,
    ) -> Result<bool, super::peer_roots::PeerRootsError> {
        use super::peer_roots::{PeerRoots, PeerRootsError};
        let set = PeerRoots::decode(encoded)?;
        let Some(root) = &self.root else {
            return Err(PeerRootsError::Malformed(
                "no root pinned to check it against",
            ));
        };
        set.verify(root)?;
        if self.peer_roots.as_ref() == Some(&set) {
            return Ok(false);
        }
        writes.put(NODE_TRUST_TABLE, PEER_ROOTS_KEY.to_vec(), set.encode());
        self.peer_roots = Some(set);
        Ok(true)
    }

    /// The pinned trust root.
    pub fn root(&self) -> Option<&TrustRoot> {
        self.root.as_ref()
    }

    /// The newest CRL held.
    pub fn crl(&self) -> Option<&Crl> {
        self.crl.as_ref()
    }

    /// The version of the CRL held (0 if none).
    pub fn crl_version(&self) -> u64 {
        self.crl.as_ref().map_or(0, |c| c.version)
    }

    /// True if the held CRL revokes `device`.
    pub fn is_revoked(&self, device: DeviceId) -> bool {
        self.crl
            .as_ref()
            .is_some_and(|c| c.revoked.contains(&device))
    }

    /// Takes the certificate the gateway issued for `key` and `user`, signed by `root_key`,
    /// after checking it and the root against the token's pin or the root pinned before.
    #[allow(clippy::too_many_arguments)]
    pub fn accept_certificate(
        &mut self,
        encoded: &[u8],
        root_key: [u8; 32],
        key: DevicePublicKey,
        user: UserId,
        token: Option<&EnrolmentToken>,
        writes: &mut WriteBatch,
    ) -> Result<&DeviceCertificate, HolderError> {
        let cert = DeviceCertificate::decode(encoded)
            .map_err(|e| HolderError::Certificate(e.to_string()))?;
        let offered = TrustRoot {
            key: DevicePublicKey(root_key),
            domain: cert.domain.clone(),
        };
        let pinned = match (&self.root, token) {
            (Some(root), _) => Some(root.fingerprint()),
            (None, Some(token)) => Some(crate::hex::encode(&token.root_fingerprint)),
            (None, None) => None,
        };
        if let Some(pinned) = pinned {
            if pinned != offered.fingerprint() || self.root.as_ref().is_some_and(|r| *r != offered)
            {
                return Err(HolderError::WrongRoot {
                    found: offered.fingerprint(),
                    pinned,
                });
            }
        }
        // The validity period is the gateway's to check against its clock; a device whose clock
        // is off must still be able to take its certificate.
        cert.verify_issuer(&offered)
            .map_err(|e| HolderError::Certificate(e.to_string()))?;
        if cert.device_key != key || cert.user != user {
            return Err(HolderError::Certificate(
                "it certifies another key or user".into(),
            ));
        }
        writes.put(NODE_TRUST_TABLE, ROOT_KEY.to_vec(), encode_root(&offered));
        writes.put(NODE_TRUST_TABLE, CERTIFICATE_KEY.to_vec(), encoded.to_vec());
        self.root = Some(offered);
        Ok(self.certificate.insert(cert))
    }

    /// Drops the certificate (expired or refused): the device registers again.
    pub fn forget_certificate(&mut self, writes: &mut WriteBatch) {
        if self.certificate.take().is_some() {
            writes.delete(NODE_TRUST_TABLE, CERTIFICATE_KEY.to_vec());
        }
    }

    /// Takes a CRL from the gateway: `Ok(true)` if it is newer than the one held, `Ok(false)` for
    /// a resend, an error for a forged, foreign or older one (a rollback is never taken).
    pub fn accept_crl(
        &mut self,
        encoded: &[u8],
        writes: &mut WriteBatch,
    ) -> Result<bool, CrlError> {
        let Some(root) = &self.root else {
            return Err(CrlError::Malformed("no trust root pinned yet"));
        };
        let crl = Crl::decode(encoded)?;
        Crl::accept(self.crl.as_ref(), &crl, root)?;
        if self
            .crl
            .as_ref()
            .is_some_and(|held| held.version == crl.version)
        {
            return Ok(false);
        }
        writes.put(NODE_TRUST_TABLE, CRL_KEY.to_vec(), encoded.to_vec());
        self.crl = Some(crl);
        Ok(true)
    }
}

fn encode_root(root: &TrustRoot) -> Vec<u8> {
    let mut out = root.key.0.to_vec();
    out.extend_from_slice(root.domain.as_bytes());
    out
}

fn decode_root(bytes: &[u8]) -> Option<TrustRoot> {
    if bytes.len() < 33 {
        return None;
    }
    let key = DevicePublicKey(bytes[..32].try_into().ok()?);
    let domain = core::str::from_utf8(&bytes[32..]).ok()?;
    valid_domain(domain).then(|| TrustRoot {
        key,
        domain: domain.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{MemStore, Store};
    use crate::identity::DeviceKey;
    use crate::time::Instant;
    use std::collections::BTreeSet;

    const NOW: Instant = Instant(1_700_000_000_000_000);

    fn root_key() -> DeviceKey {
        DeviceKey::from_seed([7; 32])
    }

    fn cert_for(device: &DeviceKey, user: UserId) -> Vec<u8> {
        DeviceCertificate::issue(
            &root_key(),
            "example.org",
            1,
            device.public(),
            user,
            NOW.as_micros() / 1_000_000,
            NOW.as_micros() / 1_000_000 + 100,
        )
        .encode()
    }

    fn crl(version: u64, revoked: &[u128]) -> Vec<u8> {
        let set: BTreeSet<DeviceId> = revoked.iter().map(|&d| DeviceId(d)).collect();
        Crl::issue(&root_key(), "example.org", version, 1, set).encode()
    }

    #[test]
    fn a_certificate_pins_the_root_and_crls_only_move_forward() {
        let device = DeviceKey::from_seed([1; 32]);
        let mut holder = TrustHolder::default();
        let mut writes = WriteBatch::default();
        assert!(
            holder.accept_crl(&crl(1, &[]), &mut writes).is_err(),
            "no root yet"
        );
        holder
            .accept_certificate(
                &cert_for(&device, UserId(3)),
                root_key().public().0,
                device.public(),
                UserId(3),
                None,
                &mut writes,
            )
            .unwrap();
        assert_eq!(holder.accept_crl(&crl(2, &[5]), &mut writes), Ok(true));
        assert_eq!(holder.accept_crl(&crl(2, &[5]), &mut writes), Ok(false));
        assert!(matches!(
            holder.accept_crl(&crl(1, &[]), &mut writes),
            Err(CrlError::Rollback { .. })
        ));
        assert!(holder.is_revoked(DeviceId(5)));

        let mut store = MemStore::default();
        store.commit(writes).unwrap();
        let back = TrustHolder::recover(&store).unwrap();
        assert_eq!(back.crl_version(), 2);
        assert_eq!(back.root(), holder.root());
        assert_eq!(back.certificate(), holder.certificate());
    }

    #[test]
    fn another_domains_crl_is_taken_only_under_its_vouched_root_and_only_forward() {
        use crate::trust::peer_roots::PeerRoots;
        let device = DeviceKey::from_seed([1; 32]);
        let peer_key = DeviceKey::from_seed([8; 32]);
        let peer_crl = |key: &DeviceKey, version: u64, revoked: &[u128]| {
            let set: BTreeSet<DeviceId> = revoked.iter().map(|&d| DeviceId(d)).collect();
            let crl = Crl::issue(key, "b.example", version, 1, set);
            let encoded = crl.encode();
            (crl, encoded)
        };
        let mut holder = TrustHolder::default();
        let mut writes = WriteBatch::default();
        holder
            .accept_certificate(
                &cert_for(&device, UserId(3)),
                root_key().public().0,
                device.public(),
                UserId(3),
                None,
                &mut writes,
            )
            .unwrap();
        let (crl2, bytes2) = peer_crl(&peer_key, 2, &[9]);
        // No vouched root for b.example yet: refused.
        assert!(holder
            .accept_peer_crl(crl2.clone(), &bytes2, &mut writes)
            .is_err());
        let roots = PeerRoots::issue(
            &root_key(),
            "example.org",
            std::collections::BTreeMap::from([("b.example".to_string(), peer_key.public())]),
        );
        holder
            .accept_peer_roots(&roots.encode(), &mut writes)
            .unwrap();
        assert_eq!(holder.peer_crls_digest(), None);
        // Signed by another key than the vouched root: refused.
        let (forged, forged_bytes) = peer_crl(&DeviceKey::from_seed([9; 32]), 5, &[1]);
        assert!(matches!(
            holder.accept_peer_crl(forged, &forged_bytes, &mut writes),
            Err(CrlError::BadSignature)
        ));
        assert_eq!(
            holder.accept_peer_crl(crl2.clone(), &bytes2, &mut writes),
            Ok(true)
        );
        assert_eq!(
            holder.accept_peer_crl(crl2, &bytes2, &mut writes),
            Ok(false)
        );
        let (crl1, bytes1) = peer_crl(&peer_key, 1, &[]);
        assert!(matches!(
            holder.accept_peer_crl(crl1, &bytes1, &mut writes),
            Err(CrlError::Rollback { .. })
        ));
        assert!(holder
            .peer_crl("b.example")
            .is_some_and(|c| c.revoked.contains(&DeviceId(9))));
        assert_eq!(
            holder.peer_crls_digest(),
            crate::trust::versions_digest([("b.example", 2)])
        );
        // The own domain's CRL is untouched, and it all survives a restart.
        assert_eq!(holder.crl_version(), 0);
        let mut store = MemStore::default();
        store.commit(writes).unwrap();
        let back = TrustHolder::recover(&store).unwrap();
        assert_eq!(back.peer_crls(), holder.peer_crls());
    }

    #[test]
    fn a_root_other_than_the_pinned_one_is_refused() {
        let device = DeviceKey::from_seed([1; 32]);
        let token = EnrolmentToken {
            user: UserId(3),
            domain: "localhost".into(),
            secret: [0; 16],
            root_fingerprint: [0xee; 16],
        };
        let mut holder = TrustHolder::default();
        let refused = holder.accept_certificate(
            &cert_for(&device, UserId(3)),
            root_key().public().0,
            device.public(),
            UserId(3),
            Some(&token),
            &mut WriteBatch::default(),
        );
        assert!(matches!(refused, Err(HolderError::WrongRoot { .. })));
        let someone_else = DeviceKey::from_seed([2; 32]);
        let refused = holder.accept_certificate(
            &cert_for(&someone_else, UserId(3)),
            root_key().public().0,
            device.public(),
            UserId(3),
            None,
            &mut WriteBatch::default(),
        );
        assert!(matches!(refused, Err(HolderError::Certificate(_))));
    }
}
