//! The registration authority of a gateway's domain: trust root, enrolment tokens, certificates
//! issued, and the CRL.
//!
//! Stored in three tables (all writes go through the caller's [`WriteBatch`], so an issued
//! certificate and the consumed token land in one commit):
//!
//! - [`AUTHORITY_TABLE`]: `root_seed` (the root's 32-byte Ed25519 seed), `domain`,
//!   `next_serial` (u64), `crl` (the encoded current CRL);
//! - [`ENROLMENT_TOKENS_TABLE`]: key = token secret (16), value = user (16) | expires (u64 µs) |
//!   used (u8) [| voucher device id (16), for a pairing code an existing device vouched for];
//!   a used token is kept until it expires, so a second use gets its own error;
//! - [`CERTIFICATES_TABLE`]: key = device id (16), value = the device's latest certificate.
//!
//! Backing up the gateway's data directory backs up the root. Losing the root means every device
//! must enrol again; rotating it is the same operation (a new data directory, new tokens).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::env::{scan_all, Entropy, StoreError, StoreRead, Table, WriteBatch};
use crate::identity::{DeviceKey, DevicePublicKey};
use crate::ids::{DeviceId, UserId};
use crate::time::Instant;

use super::certificate::{register_message, CertificateError, DeviceCertificate};
use super::crl::{Crl, CRL_ENTRIES_MAX};
use super::{valid_domain, TrustRoot};

/// The root key, domain, serial counter and current CRL.
pub const AUTHORITY_TABLE: Table = Table("authority");
/// Enrolment tokens issued and not yet expired.
pub const ENROLMENT_TOKENS_TABLE: Table = Table("enrolment_tokens");
/// The latest certificate of each registered device.
pub const CERTIFICATES_TABLE: Table = Table("certificates");

/// How long an enrolment token can be used.
pub const ENROLMENT_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a certificate is valid. A device renews its certificate over its session once it
/// is within [`RENEWAL_WINDOW`] of expiry; one that expired anyway registers again with a new
/// token (or pairing code).
pub const CERTIFICATE_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long a gateway's federation link certificate is valid; the gateway issues itself a new
/// one at start once less than a month is left.
pub const GATEWAY_LINK_VALIDITY: core::time::Duration =
    core::time::Duration::from_secs(365 * 24 * 3600);

/// How close to expiry a certificate is renewed: the device asks at each session open from
/// then on, and the gateway renews only then (earlier requests get the current certificate).
pub const RENEWAL_WINDOW: Duration = Duration::from_secs(30 * 24 * 3600);

/// How long a pairing code an existing device shows can be used (from when it was shown).
pub const PAIRING_TTL: Duration = Duration::from_secs(10 * 60);

/// Most unused, unexpired pairing codes one device may have vouched for at once.
pub const VOUCHES_PER_DEVICE_MAX: usize = 4;

/// How far back a certificate's validity starts before its issue.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(3600);

const ROOT_SEED_KEY: &[u8] = b"root_seed";
const DOMAIN_KEY: &[u8] = b"domain";
const NEXT_SERIAL_KEY: &[u8] = b"next_serial";
const CRL_KEY: &[u8] = b"crl";

/// A one-time enrolment token: what an operator hands to a user so that one new device of that
/// user can register. Its text form also pins the trust root, so the device can check that the
/// gateway it registers with is the one the operator meant.
#[derive(Clone, PartialEq, Eq)]
pub struct EnrolmentToken {
    /// The user the device will belong to.
    pub user: UserId,
    /// The domain whose gateway issued it (the user's domain): with it a device checks the
    /// user's name against `user` before it registers.
    pub domain: String,
    /// The one-time secret.
    pub secret: [u8; 16],
    /// The first 16 bytes of the trust root's public key.
    pub root_fingerprint: [u8; 16],
}

impl core::fmt::Debug for EnrolmentToken {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // The secret is a credential: never in logs.
        write!(f, "EnrolmentToken({})", self.user)
    }
}

use crate::hex::{decode_array as unhex16, encode as hex};

/// The public name of a token or pairing code: 8 bytes of SHA-256 over its secret, so an
/// operator can list and expire tokens without the listing holding a credential.
pub fn token_id(secret: &[u8; 16]) -> [u8; 8] {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"sund/token-id/v1")
        .chain_update(secret)
        .finalize();
    digest[..8].try_into().expect("8 of 32 bytes")
}

/// A token as an operator may see it: never its secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenSummary {
    /// [`token_id`] of its secret.
    pub id: [u8; 8],
    /// The user it enrols a device for.
    pub user: UserId,
    /// When it stops working.
    pub expires: Instant,
    /// Whether a device registered with it, and which when known.
    pub used: Option<Option<DeviceId>>,
    /// For a pairing code: the device that vouched for it.
    pub voucher: Option<DeviceId>,
}

impl EnrolmentToken {
    /// Its public name ([`token_id`]).
    pub fn id(&self) -> [u8; 8] {
        token_id(&self.secret)
    }

    /// `sund-enrol:<user>:<secret>:<root fingerprint>:<domain>`, the first three 32 hex
    /// digits each.
    pub fn to_text(&self) -> String {
        format!(
            "sund-enrol:{}:{}:{}:{}",
            hex(&self.user.to_bytes()),
            hex(&self.secret),
            hex(&self.root_fingerprint),
            self.domain
        )
    }

    /// Whether the token is for `name` of its domain.
    pub fn is_for(&self, name: &str) -> bool {
        crate::address::Address::new(name, &self.domain).is_ok_and(|a| a.user() == self.user)
    }

    /// Parses [`Self::to_text`]'s form; `None` if it is not one.
    pub fn from_text(text: &str) -> Option<EnrolmentToken> {
        let mut parts = text.trim().split(':');
        if parts.next()? != "sund-enrol" {
            return None;
        }
        let user = UserId::from_bytes(unhex16(parts.next()?)?);
        let secret = unhex16(parts.next()?)?;
        let root_fingerprint = unhex16(parts.next()?)?;
        let domain = parts.next().filter(|d| valid_domain(d))?.to_string();
        parts.next().is_none().then_some(EnrolmentToken {
            user,
            domain,
            secret,
            root_fingerprint,
        })
    }

    /// True if `root` is the root this token pins.
    pub fn pins(&self, root: &TrustRoot) -> bool {
        root.key.0[..16] == self.root_fingerprint
    }
}

/// Why a registration or revocation was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistrationError {
    /// No such token (mistyped, or from another gateway).
    #[error("unknown enrolment token; ask the operator for a new one (`sund-gateway admin enrol-token USER`)")]
    TokenUnknown,
    /// The token was already used by a device.
    #[error("this enrolment token was already used; each token enrols one device")]
    TokenUsed,
    /// The token is too old.
    #[error("this enrolment token expired; ask the operator for a new one")]
    TokenExpired,
    /// The request names another user than the token.
    #[error("this enrolment token is for user {token}, not {claimed}")]
    TokenForAnotherUser {
        /// The token's user.
        token: UserId,
        /// The user claimed.
        claimed: UserId,
    },
    /// The registration proof does not verify against the device key.
    #[error("the registration proof does not verify against the device key")]
    BadProof,
    /// The device is revoked and cannot register again.
    #[error("device {0} is revoked")]
    Revoked(DeviceId),
    /// The CRL is full.
    #[error("the CRL holds {CRL_ENTRIES_MAX} devices, its limit")]
    CrlFull,
    /// The device key is already certified for another user.
    #[error("this device is already registered to user {bound}")]
    BoundToAnotherUser {
        /// The user of its existing certificate.
        bound: UserId,
    },
    /// The device was never registered here.
    #[error("device {0} has no certificate from this gateway")]
    UnknownDevice(DeviceId),
    /// The device that vouched for this pairing code was revoked since.
    #[error("the device that showed this pairing code ({0}) was revoked; pair with another device of yours")]
    VoucherRevoked(DeviceId),
    /// A vouch names a secret already in use (a new pairing code is needed).
    #[error("this pairing secret is already in use; show a new pairing code")]
    SecretTaken,
    /// The device already has [`VOUCHES_PER_DEVICE_MAX`] unused pairing codes.
    #[error("this device already has {VOUCHES_PER_DEVICE_MAX} unused pairing codes; use one or wait ten minutes")]
    TooManyVouches,
}

#[derive(Clone, Copy, Debug)]
struct TokenRecord {
    user: UserId,
    expires: Instant,
    used: Used,
    /// For a pairing code: the existing device of `user` that vouched for it.
    voucher: Option<DeviceId>,
}

/// Whether a token enrolled a device, and which.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Used {
    No,
    /// Used by a device the record does not name (written before records named it).
    ByUnknown,
    /// Used by this device: the same device registering again with it (its answer was lost on
    /// the way) gets its certificate again.
    By(DeviceId),
}

impl TokenRecord {
    /// `user (16) · expires (8) · used flag (1) · voucher (16, optional) · used by (16, when
    /// the flag is 2)`. Flags 0 and 1 are the older unused and used.
    fn encode(&self) -> Vec<u8> {
        let mut out = self.user.to_bytes().to_vec();
        out.extend_from_slice(&self.expires.as_micros().to_be_bytes());
        out.push(match self.used {
            Used::No => 0,
            Used::ByUnknown => 1,
            Used::By(_) => 2,
        });
        if let Some(voucher) = self.voucher {
            out.extend_from_slice(&voucher.to_bytes());
        }
        if let Used::By(device) = self.used {
            out.extend_from_slice(&device.to_bytes());
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<TokenRecord> {
        let id = |at: usize| -> Option<DeviceId> {
            Some(DeviceId::from_bytes(
                bytes.get(at..at + 16)?.try_into().ok()?,
            ))
        };
        let (used, voucher) = match (*bytes.get(24)?, bytes.len()) {
            (0, 25) => (Used::No, None),
            (0, 41) => (Used::No, Some(id(25)?)),
            (1, 25) => (Used::ByUnknown, None),
            (1, 41) => (Used::ByUnknown, Some(id(25)?)),
            (2, 41) => (Used::By(id(25)?), None),
            (2, 57) => (Used::By(id(41)?), Some(id(25)?)),
            _ => return None,
        };
        Some(TokenRecord {
            voucher,
            user: UserId::from_bytes(bytes[..16].try_into().ok()?),
            expires: Instant(u64::from_be_bytes(bytes[16..24].try_into().ok()?)),
            used,
        })
    }
}

/// The gateway's registration authority.
pub struct RegistrationAuthority {
    root_key: DeviceKey,
    root: TrustRoot,
    next_serial: u64,
    tokens: BTreeMap<[u8; 16], TokenRecord>,
    certificates: BTreeMap<DeviceId, DeviceCertificate>,
    crl: Crl,
}

fn seconds(at: Instant) -> u64 {
    at.as_micros() / 1_000_000
}

impl RegistrationAuthority {
    /// A new authority for `domain`: a fresh root key from `entropy` and an empty CRL
    /// (version 0). Its records go into `writes`. Panics on an invalid domain (the gateway's
    /// configuration checks it first: see [`super::valid_domain`]).
    pub fn create(
        domain: &str,
        now: Instant,
        entropy: &mut dyn Entropy,
        writes: &mut WriteBatch,
    ) -> RegistrationAuthority {
        assert!(valid_domain(domain), "checked by the configuration");
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        entropy.fill_bytes(seed.as_mut());
        let root_key = DeviceKey::from_seed(*seed);
        let crl = Crl::issue(&root_key, domain, 0, seconds(now), BTreeSet::new());
        writes.put(AUTHORITY_TABLE, ROOT_SEED_KEY.to_vec(), seed.to_vec());
        writes.put(
            AUTHORITY_TABLE,
            DOMAIN_KEY.to_vec(),
            domain.as_bytes().to_vec(),
        );
        writes.put(
            AUTHORITY_TABLE,
            NEXT_SERIAL_KEY.to_vec(),
            1u64.to_be_bytes().to_vec(),
        );
        writes.put(AUTHORITY_TABLE, CRL_KEY.to_vec(), crl.encode());
        RegistrationAuthority {
            root: TrustRoot {
                key: root_key.public(),
                domain: domain.to_string(),
            },
            root_key,
            next_serial: 1,
            tokens: BTreeMap::new(),
            certificates: BTreeMap::new(),
            crl,
        }
    }

    /// Reads the authority back; `None` if this store never had one (first start).
    pub fn recover(store: &dyn StoreRead) -> Result<Option<RegistrationAuthority>, StoreError> {
        let corrupt = |table: Table, reason: String| StoreError::Corrupt {
            table: table.0,
            reason,
        };
        let mut fields: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        scan_all(store, AUTHORITY_TABLE, |key, value| {
            fields.insert(key.to_vec(), value.to_vec());
            Ok(())
        })?;
        let Some(seed) = fields.get(ROOT_SEED_KEY) else {
            return Ok(None);
        };
        let seed: [u8; 32] = seed
            .as_slice()
            .try_into()
            .map_err(|_| corrupt(AUTHORITY_TABLE, "root seed is not 32 bytes".into()))?;
        let root_key = DeviceKey::from_seed(seed);
        let domain = fields
            .get(DOMAIN_KEY)
            .and_then(|d| String::from_utf8(d.clone()).ok())
            .filter(|d| valid_domain(d))
            .ok_or_else(|| corrupt(AUTHORITY_TABLE, "missing or invalid domain".into()))?;
        let next_serial = fields
            .get(NEXT_SERIAL_KEY)
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| corrupt(AUTHORITY_TABLE, "missing or invalid serial".into()))?;
        let root = TrustRoot {
            key: root_key.public(),
            domain,
        };
        let crl = fields
            .get(CRL_KEY)
            .and_then(|b| Crl::decode(b).ok())
            .filter(|c| c.verify(&root).is_ok())
            .ok_or_else(|| corrupt(AUTHORITY_TABLE, "missing or invalid CRL".into()))?;
        let mut tokens = BTreeMap::new();
        scan_all(store, ENROLMENT_TOKENS_TABLE, |key, value| {
            let secret: [u8; 16] = key
                .try_into()
                .map_err(|_| corrupt(ENROLMENT_TOKENS_TABLE, "token key is not 16 bytes".into()))?;
            let record = TokenRecord::decode(value)
                .ok_or_else(|| corrupt(ENROLMENT_TOKENS_TABLE, "bad token record".into()))?;
            tokens.insert(secret, record);
            Ok(())
        })?;
        let mut certificates = BTreeMap::new();
        scan_all(store, CERTIFICATES_TABLE, |_, value| {
            let cert = DeviceCertificate::decode(value)
                .map_err(|e| corrupt(CERTIFICATES_TABLE, e.to_string()))?;
            certificates.insert(cert.device(), cert);
            Ok(())
        })?;
        Ok(Some(RegistrationAuthority {
            root_key,
            root,
            next_serial,
            tokens,
            certificates,
            crl,
        }))
    }

    /// Certifies `link_key` as this domain's gateway link key (federation) from an hour before
    /// `now` for [`GATEWAY_LINK_VALIDITY`].
    pub fn issue_gateway_certificate(
        &self,
        link_key: crate::identity::DevicePublicKey,
        now: Instant,
    ) -> crate::federation::certificate::GatewayCertificate {
        let from = seconds(now).saturating_sub(3_600);
        crate::federation::certificate::GatewayCertificate::issue(
            &self.root_key,
            &self.root.domain,
            seconds(now),
            link_key,
            from,
            from + GATEWAY_LINK_VALIDITY.as_secs(),
        )
    }

    /// Vouches for the roots of peer domains to this domain's devices: the set signed by
    /// this domain's root.
    pub fn vouch_peer_roots(
        &self,
        roots: BTreeMap<String, DevicePublicKey>,
    ) -> super::peer_roots::PeerRoots {
        super::peer_roots::PeerRoots::issue(&self.root_key, &self.root.domain, roots)
    }

    /// The trust root devices pin.
    pub fn root(&self) -> &TrustRoot {
        &self.root
    }

    /// The current CRL.
    pub fn crl(&self) -> &Crl {
        &self.crl
    }

    /// The latest certificate of every registered device, by device id.
    pub fn certificates(&self) -> impl Iterator<Item = &DeviceCertificate> + '_ {
        self.certificates.values()
    }

    /// The latest certificate of `device`, which must be registered here and not revoked
    /// (who may vouch or renew).
    fn unrevoked_certificate(
        &self,
        device: DeviceId,
    ) -> Result<&DeviceCertificate, RegistrationError> {
        if self.crl.revoked.contains(&device) {
            return Err(RegistrationError::Revoked(device));
        }
        self.certificates
            .get(&device)
            .ok_or(RegistrationError::UnknownDevice(device))
    }

    /// The latest certificate of `device`, if it registered here.
    pub fn certificate_of(&self, device: DeviceId) -> Option<&DeviceCertificate> {
        self.certificates.get(&device)
    }

    /// Issues a one-time token for one new device of `user`.
    pub fn issue_token(
        &mut self,
        now: Instant,
        user: UserId,
        entropy: &mut dyn Entropy,
        writes: &mut WriteBatch,
    ) -> EnrolmentToken {
        let mut secret = [0u8; 16];
        entropy.fill_bytes(&mut secret);
        let record = TokenRecord {
            user,
            expires: now + ENROLMENT_TOKEN_TTL,
            used: Used::No,
            voucher: None,
        };
        writes.put(ENROLMENT_TOKENS_TABLE, secret.to_vec(), record.encode());
        self.tokens.insert(secret, record);
        EnrolmentToken {
            user,
            domain: self.root.domain.clone(),
            secret,
            root_fingerprint: self.root.key.0[..16].try_into().expect("16 of 32 bytes"),
        }
    }

    /// Accepts `voucher`'s vouch for a pairing code: whoever presents `secret` before
    /// `expires` (at most [`PAIRING_TTL`] from now) may register one device for the voucher's
    /// user. The caller has checked the vouch's signature by the voucher's key. Accepting the
    /// same vouch twice (a resend) is not an error.
    pub fn accept_vouch(
        &mut self,
        now: Instant,
        voucher: DeviceId,
        secret: [u8; 16],
        expires: Instant,
        writes: &mut WriteBatch,
    ) -> Result<UserId, RegistrationError> {
        let user = self.unrevoked_certificate(voucher)?.user;
        if secret == [0; 16] {
            return Err(RegistrationError::TokenUnknown);
        }
        if let Some(held) = self.tokens.get(&secret) {
            return if held.voucher == Some(voucher) {
                Ok(user)
            } else {
                Err(RegistrationError::SecretTaken)
            };
        }
        let expires = expires.min(now + PAIRING_TTL);
        if expires <= now {
            return Err(RegistrationError::TokenExpired);
        }
        let live = self
            .tokens
            .values()
            .filter(|t| t.voucher == Some(voucher) && t.used == Used::No && now < t.expires)
            .count();
        if live >= VOUCHES_PER_DEVICE_MAX {
            return Err(RegistrationError::TooManyVouches);
        }
        let record = TokenRecord {
            user,
            expires,
            used: Used::No,
            voucher: Some(voucher),
        };
        writes.put(ENROLMENT_TOKENS_TABLE, secret.to_vec(), record.encode());
        self.tokens.insert(secret, record);
        Ok(user)
    }

    /// True if `device` already registered with the token `secret`: registering again gets the
    /// same certificate, and is not a new enrolment.
    pub fn enrolled_with(&self, secret: &[u8; 16], device: DeviceId) -> bool {
        self.tokens
            .get(secret)
            .is_some_and(|t| t.used == Used::By(device))
    }

    /// The certificate of the device that vouched for the pairing code with `secret`, if it was
    /// one (the gateway hands it to the new device, which checks it against the code).
    pub fn voucher_certificate(&self, secret: &[u8; 16]) -> Option<&DeviceCertificate> {
        let voucher = self.tokens.get(secret)?.voucher?;
        self.certificates.get(&voucher)
    }

    /// Registers `device_key` for `user`: checks the proof of possession and, unless `open`
    /// (open enrolment, for local use) and the device shows no token (all zeros), the one-time
    /// token, which is consumed. A token shown is checked even under open enrolment, so that a
    /// pairing code's voucher is known: a code whose vouch has not arrived yet is unknown (the
    /// device tries again) rather than taken as an open registration without its voucher.
    /// Returns the new certificate.
    #[allow(clippy::too_many_arguments)]
    pub fn register(
        &mut self,
        now: Instant,
        device_key: DevicePublicKey,
        user: UserId,
        token: [u8; 16],
        proof: &[u8; 64],
        open: bool,
        writes: &mut WriteBatch,
    ) -> Result<DeviceCertificate, RegistrationError> {
        if !device_key.verify(&register_message(&token, &device_key, user), proof) {
            return Err(RegistrationError::BadProof);
        }
        let device = device_key.device_id();
        if self.crl.revoked.contains(&device) {
            return Err(RegistrationError::Revoked(device));
        }
        if let Some(existing) = self.certificates.get(&device) {
            if existing.user != user {
                return Err(RegistrationError::BoundToAnotherUser {
                    bound: existing.user,
                });
            }
        }
        if !open || token != [0; 16] {
            let record = self
                .tokens
                .get_mut(&token)
                .ok_or(RegistrationError::TokenUnknown)?;
            match record.used {
                Used::No => {}
                // The same device again (proved by its key above): its certificate reply was
                // lost, or it crashed before keeping it. Registration is idempotent for it.
                Used::By(by) if by == device => {
                    if let Some(cert) = self.certificates.get(&device) {
                        return Ok(cert.clone());
                    }
                    return Err(RegistrationError::TokenUsed);
                }
                Used::By(_) | Used::ByUnknown => return Err(RegistrationError::TokenUsed),
            }
            if now >= record.expires {
                return Err(RegistrationError::TokenExpired);
            }
            if record.user != user {
                return Err(RegistrationError::TokenForAnotherUser {
                    token: record.user,
                    claimed: user,
                });
            }
            if let Some(voucher) = record.voucher.filter(|v| self.crl.revoked.contains(v)) {
                return Err(RegistrationError::VoucherRevoked(voucher));
            }
            record.used = Used::By(device);
            writes.put(ENROLMENT_TOKENS_TABLE, token.to_vec(), record.encode());
        }
        Ok(self.certify(now, device_key, user, writes))
    }

    /// Renews the certificate of `device`, whose session showed a valid one: a new serial and
    /// validity for the same key and user, if the current one is within [`RENEWAL_WINDOW`] of
    /// expiry; else the current certificate unchanged.
    pub fn renew(
        &mut self,
        now: Instant,
        device: DeviceId,
        writes: &mut WriteBatch,
    ) -> Result<DeviceCertificate, RegistrationError> {
        let current = self.unrevoked_certificate(device)?;
        if current.not_after_s > seconds(now) + RENEWAL_WINDOW.as_secs() {
            return Ok(current.clone());
        }
        let (key, user) = (current.device_key, current.user);
        Ok(self.certify(now, key, user, writes))
    }

    /// Issues and records a certificate under the next serial.
    fn certify(
        &mut self,
        now: Instant,
        device_key: DevicePublicKey,
        user: UserId,
        writes: &mut WriteBatch,
    ) -> DeviceCertificate {
        let device = device_key.device_id();
        let serial = self.next_serial;
        self.next_serial += 1;
        writes.put(
            AUTHORITY_TABLE,
            NEXT_SERIAL_KEY.to_vec(),
            self.next_serial.to_be_bytes().to_vec(),
        );
        // Backdated, so that a gateway whose clock runs ahead of another check's does not
        // hand out certificates that are not yet valid there.
        let not_before = seconds(now).saturating_sub(CLOCK_SKEW_ALLOWANCE.as_secs());
        let cert = DeviceCertificate::issue(
            &self.root_key,
            &self.root.domain,
            serial,
            device_key,
            user,
            not_before,
            not_before + CERTIFICATE_VALIDITY.as_secs(),
        );
        writes.put(
            CERTIFICATES_TABLE,
            device.to_bytes().to_vec(),
            cert.encode(),
        );
        self.certificates.insert(device, cert.clone());
        cert
    }

    /// Revokes `device`: a new CRL version that lists it. Revoking a revoked device changes
    /// nothing and returns the current CRL.
    pub fn revoke(
        &mut self,
        now: Instant,
        device: DeviceId,
        writes: &mut WriteBatch,
    ) -> Result<&Crl, RegistrationError> {
        if self.crl.revoked.contains(&device) {
            return Ok(&self.crl);
        }
        if !self.certificates.contains_key(&device) {
            return Err(RegistrationError::UnknownDevice(device));
        }
        if self.crl.revoked.len() >= CRL_ENTRIES_MAX {
            return Err(RegistrationError::CrlFull);
        }
        let mut revoked = self.crl.revoked.clone();
        revoked.insert(device);
        self.crl = Crl::issue(
            &self.root_key,
            &self.root.domain,
            self.crl.version + 1,
            seconds(now),
            revoked,
        );
        writes.put(AUTHORITY_TABLE, CRL_KEY.to_vec(), self.crl.encode());
        Ok(&self.crl)
    }

    /// Checks a certificate presented for a session by the holder of `device_key`: the root's
    /// signature, domain, validity at `now`, that it certifies this key, and the CRL.
    pub fn check(
        &self,
        now: Instant,
        certificate: &[u8],
        device_key: &DevicePublicKey,
    ) -> Result<DeviceCertificate, CertificateError> {
        let cert = DeviceCertificate::decode(certificate)?;
        // A certificate identical to the one this authority issued for the device needs no
        // signature check (it was made here; two Ed25519 verifications per reconnect were
        // half the simulator's time in a disconnect storm). Any other is checked in full.
        if self.certificates.get(&cert.device()) == Some(&cert) {
            cert.verify_validity(now)?;
        } else {
            cert.verify(&self.root, now)?;
        }
        if cert.device_key != *device_key {
            return Err(CertificateError::KeyMismatch);
        }
        self.crl.check(cert.device())?;
        Ok(cert)
    }

    /// The tokens and pairing codes held (unexpired, or expired and not yet forgotten), in
    /// the order of their ids.
    pub fn tokens(&self) -> Vec<TokenSummary> {
        let mut out: Vec<TokenSummary> = self
            .tokens
            .iter()
            .map(|(secret, r)| TokenSummary {
                id: token_id(secret),
                user: r.user,
                expires: r.expires,
                used: match r.used {
                    Used::No => None,
                    Used::ByUnknown => Some(None),
                    Used::By(device) => Some(Some(device)),
                },
                voucher: r.voucher,
            })
            .collect();
        out.sort_by_key(|t| t.id);
        out
    }

    /// Makes the token named `id` expire now, so no device registers with it any more (a used
    /// token keeps enrolling nothing new either way). Returns it as it was, or `None` if no
    /// token has that id.
    pub fn expire_token(
        &mut self,
        now: Instant,
        id: [u8; 8],
        writes: &mut WriteBatch,
    ) -> Option<TokenSummary> {
        let before = self.tokens().into_iter().find(|t| t.id == id)?;
        let (secret, record) = self
            .tokens
            .iter_mut()
            .find(|(secret, _)| token_id(secret) == id)
            .expect("listed above");
        if record.expires > now {
            record.expires = now;
            writes.put(ENROLMENT_TOKENS_TABLE, secret.to_vec(), record.encode());
        }
        Some(before)
    }

    /// Forgets tokens past their expiry (used or not). Returns how many.
    pub fn expire_tokens(&mut self, now: Instant, writes: &mut WriteBatch) -> usize {
        let expired: Vec<[u8; 16]> = self
            .tokens
            .iter()
            .filter(|(_, r)| now >= r.expires)
            .map(|(s, _)| *s)
            .collect();
        for secret in &expired {
            self.tokens.remove(secret);
            writes.delete(ENROLMENT_TOKENS_TABLE, secret.to_vec());
        }
        expired.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::CountingEntropy as Counter;
    use crate::env::{MemStore, Store};

    const NOW: Instant = Instant(1_700_000_000_000_000);

    fn authority() -> (RegistrationAuthority, MemStore) {
        let mut writes = WriteBatch::default();
        let ra = RegistrationAuthority::create("example.org", NOW, &mut Counter(0), &mut writes);
        let mut store = MemStore::default();
        store.commit(writes).unwrap();
        (ra, store)
    }

    fn register(
        ra: &mut RegistrationAuthority,
        device: &DeviceKey,
        user: UserId,
        token: &EnrolmentToken,
    ) -> Result<DeviceCertificate, RegistrationError> {
        let proof = device.sign(&register_message(&token.secret, &device.public(), user));
        ra.register(
            NOW,
            device.public(),
            user,
            token.secret,
            &proof,
            false,
            &mut WriteBatch::default(),
        )
    }

    #[test]
    fn under_open_enrolment_a_token_shown_is_still_checked() {
        // Found by the end-to-end contacts test under load: a new device took a pairing code
        // before the other device's vouch reached the gateway, was registered openly without
        // its voucher, and then (rightly) refused its own certificate. An unknown token is now
        // unknown whatever the mode, and the new device tries again until the vouch is there.
        let (mut ra, _) = authority();
        let device = DeviceKey::from_seed([2; 32]);
        let open = |ra: &mut RegistrationAuthority, token: [u8; 16]| {
            let proof = device.sign(&register_message(&token, &device.public(), UserId(1)));
            ra.register(
                NOW,
                device.public(),
                UserId(1),
                token,
                &proof,
                true,
                &mut WriteBatch::default(),
            )
        };
        assert_eq!(
            open(&mut ra, [7; 16]).unwrap_err(),
            RegistrationError::TokenUnknown
        );
        // No token at all: the open registration it always was.
        assert!(open(&mut ra, [0; 16]).is_ok());
    }

    #[test]
    fn the_same_device_registering_again_with_its_token_gets_its_certificate_again() {
        // Found by `cargo sim --drivers --swarm` (seed 4): the certificate answer was lost on a
        // lossy link, and every retry was refused as `token used`: the device was locked out.
        let (mut ra, _) = authority();
        let token = ra.issue_token(NOW, UserId(1), &mut Counter(50), &mut WriteBatch::default());
        let device = DeviceKey::from_seed([1; 32]);
        let first = register(&mut ra, &device, UserId(1), &token).unwrap();
        assert!(ra.enrolled_with(&token.secret, device.device_id()));
        let again = register(&mut ra, &device, UserId(1), &token).unwrap();
        assert_eq!(again, first, "the same certificate, not a new one");
        let other = DeviceKey::from_seed([2; 32]);
        assert!(!ra.enrolled_with(&token.secret, other.device_id()));
        assert_eq!(
            register(&mut ra, &other, UserId(1), &token),
            Err(RegistrationError::TokenUsed)
        );
    }

    #[test]
    fn token_records_round_trip_and_older_records_still_read() {
        let device = DeviceId(7);
        let voucher = DeviceId(8);
        for used in [Used::No, Used::ByUnknown, Used::By(device)] {
            for voucher in [None, Some(voucher)] {
                let record = TokenRecord {
                    user: UserId(3),
                    expires: Instant(99),
                    used,
                    voucher,
                };
                let back = TokenRecord::decode(&record.encode()).unwrap();
                assert_eq!((back.used, back.voucher), (used, voucher));
                assert_eq!((back.user, back.expires), (UserId(3), Instant(99)));
            }
        }
        // A used record as written before records named the device: flag 1, 25 bytes.
        let mut old = UserId(3).to_bytes().to_vec();
        old.extend_from_slice(&99u64.to_be_bytes());
        old.push(1);
        assert_eq!(TokenRecord::decode(&old).unwrap().used, Used::ByUnknown);
        // Malformed: an unknown flag, a flag with the wrong length, too short.
        old[24] = 3;
        assert!(TokenRecord::decode(&old).is_none());
        old[24] = 2;
        assert!(TokenRecord::decode(&old).is_none());
        assert!(TokenRecord::decode(&old[..10]).is_none());
    }

    #[test]
    fn a_token_enrols_one_device_whose_certificate_then_checks() {
        let (mut ra, _) = authority();
        let token = ra.issue_token(NOW, UserId(1), &mut Counter(50), &mut WriteBatch::default());
        assert!(token.pins(ra.root()));
        assert_eq!(
            EnrolmentToken::from_text(&token.to_text()),
            Some(token.clone())
        );
        let device = DeviceKey::from_seed([1; 32]);
        let cert = register(&mut ra, &device, UserId(1), &token).unwrap();
        assert_eq!(cert.user, UserId(1));
        assert_eq!(
            ra.check(NOW, &cert.encode(), &device.public()).unwrap(),
            cert
        );
        let other = DeviceKey::from_seed([2; 32]);
        assert_eq!(
            register(&mut ra, &other, UserId(1), &token),
            Err(RegistrationError::TokenUsed)
        );
        assert_eq!(
            ra.check(NOW, &cert.encode(), &other.public()),
            Err(CertificateError::KeyMismatch)
        );
    }

    /// The authority skips the signature check only for the very certificate it issued; one
    /// that differs anywhere (a forged field, a forged signature) is checked in full, and the
    /// validity period and the CRL are checked either way.
    #[test]
    fn only_the_certificate_issued_here_skips_its_signature_check() {
        let (mut ra, _) = authority();
        let token = ra.issue_token(NOW, UserId(1), &mut Counter(50), &mut WriteBatch::default());
        let device = DeviceKey::from_seed([1; 32]);
        let cert = register(&mut ra, &device, UserId(1), &token).unwrap();
        assert_eq!(
            ra.check(NOW, &cert.encode(), &device.public()),
            Ok(cert.clone())
        );
        let mut longer = cert.clone();
        longer.not_after_s += 3600;
        assert_eq!(
            ra.check(NOW, &longer.encode(), &device.public()),
            Err(CertificateError::BadSignature)
        );
        let mut forged = cert.clone();
        forged.signature[0] ^= 1;
        assert_eq!(
            ra.check(NOW, &forged.encode(), &device.public()),
            Err(CertificateError::BadSignature)
        );
        let late = Instant((cert.not_after_s + 1) * 1_000_000);
        assert!(matches!(
            ra.check(late, &cert.encode(), &device.public()),
            Err(CertificateError::Expired { .. })
        ));
    }

    #[test]
    fn unknown_expired_and_misdirected_tokens_and_bad_proofs_are_refused() {
        let (mut ra, _) = authority();
        let device = DeviceKey::from_seed([1; 32]);
        let token = ra.issue_token(NOW, UserId(1), &mut Counter(50), &mut WriteBatch::default());
        let mut unknown = token.clone();
        unknown.secret[0] ^= 1;
        assert_eq!(
            register(&mut ra, &device, UserId(1), &unknown),
            Err(RegistrationError::TokenUnknown)
        );
        assert!(matches!(
            register(&mut ra, &device, UserId(2), &token),
            Err(RegistrationError::TokenForAnotherUser { .. })
        ));
        let proof = DeviceKey::from_seed([9; 32]).sign(&register_message(
            &token.secret,
            &device.public(),
            UserId(1),
        ));
        assert_eq!(
            ra.register(
                NOW,
                device.public(),
                UserId(1),
                token.secret,
                &proof,
                false,
                &mut WriteBatch::default()
            ),
            Err(RegistrationError::BadProof)
        );
        let late = NOW + ENROLMENT_TOKEN_TTL;
        let proof = device.sign(&register_message(
            &token.secret,
            &device.public(),
            UserId(1),
        ));
        assert_eq!(
            ra.register(
                late,
                device.public(),
                UserId(1),
                token.secret,
                &proof,
                false,
                &mut WriteBatch::default()
            ),
            Err(RegistrationError::TokenExpired)
        );
        assert_eq!(ra.expire_tokens(late, &mut WriteBatch::default()), 1);
    }

    #[test]
    fn revocation_grows_the_crl_and_refuses_the_device() {
        let (mut ra, _) = authority();
        let device = DeviceKey::from_seed([1; 32]);
        let token = ra.issue_token(NOW, UserId(1), &mut Counter(50), &mut WriteBatch::default());
        let cert = register(&mut ra, &device, UserId(1), &token).unwrap();
        assert_eq!(ra.crl().version, 0);
        let version = ra
            .revoke(NOW, device.device_id(), &mut WriteBatch::default())
            .unwrap()
            .version;
        assert_eq!(version, 1);
        assert_eq!(
            ra.revoke(NOW, device.device_id(), &mut WriteBatch::default())
                .unwrap()
                .version,
            1,
            "revoking twice changes nothing"
        );
        assert_eq!(
            ra.check(NOW, &cert.encode(), &device.public()),
            Err(CertificateError::Revoked(device.device_id()))
        );
        let token = ra.issue_token(NOW, UserId(1), &mut Counter(80), &mut WriteBatch::default());
        assert_eq!(
            register(&mut ra, &device, UserId(1), &token),
            Err(RegistrationError::Revoked(device.device_id()))
        );
        assert_eq!(
            ra.revoke(NOW, DeviceId(77), &mut WriteBatch::default())
                .unwrap_err(),
            RegistrationError::UnknownDevice(DeviceId(77))
        );
    }

    #[test]
    fn the_authority_survives_a_restart() {
        let (mut ra, mut store) = authority();
        let mut writes = WriteBatch::default();
        let token = ra.issue_token(NOW, UserId(1), &mut Counter(50), &mut writes);
        let spare = ra.issue_token(NOW, UserId(1), &mut Counter(90), &mut writes);
        let device = DeviceKey::from_seed([1; 32]);
        let proof = device.sign(&register_message(
            &token.secret,
            &device.public(),
            UserId(1),
        ));
        ra.register(
            NOW,
            device.public(),
            UserId(1),
            token.secret,
            &proof,
            false,
            &mut writes,
        )
        .unwrap();
        ra.revoke(NOW, device.device_id(), &mut writes).unwrap();
        store.commit(writes).unwrap();

        let mut back = RegistrationAuthority::recover(&store).unwrap().unwrap();
        assert_eq!(back.root(), ra.root());
        assert_eq!(back.crl(), ra.crl());
        assert_eq!(back.certificates().count(), 1);
        let second = DeviceKey::from_seed([2; 32]);
        assert_eq!(
            register(&mut back, &second, UserId(1), &token),
            Err(RegistrationError::TokenUsed),
            "used tokens stay used"
        );
        assert_eq!(
            register(&mut back, &device, UserId(1), &spare),
            Err(RegistrationError::Revoked(device.device_id())),
            "revocations survive"
        );
        let cert = register(&mut back, &second, UserId(1), &spare).unwrap();
        assert_eq!(cert.serial, 2, "serials keep growing");
        assert!(RegistrationAuthority::recover(&MemStore::default())
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_token_listed_by_id_expires_at_once_and_its_expiry_is_stored() {
        let (mut ra, mut store) = authority();
        let mut writes = WriteBatch::default();
        let alice = UserId::of("alice", "localhost");
        let token = ra.issue_token(NOW, alice, &mut Counter(7), &mut writes);
        store.commit(writes).unwrap();
        let listed = ra.tokens();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, token.id());
        assert_eq!((listed[0].user, listed[0].used), (alice, None));
        assert_eq!(listed[0].expires, NOW + ENROLMENT_TOKEN_TTL);
        assert!(ra
            .expire_token(NOW, [0; 8], &mut WriteBatch::default())
            .is_none());
        let mut writes = WriteBatch::default();
        let later = Instant(NOW.0 + 5_000_000);
        assert_eq!(
            ra.expire_token(later, token.id(), &mut writes),
            Some(listed[0])
        );
        store.commit(writes).unwrap();
        assert_eq!(ra.tokens()[0].expires, later);
        let device = DeviceKey::from_seed([9; 32]);
        let proof = device.sign(&register_message(&token.secret, &device.public(), alice));
        let refused = ra.register(
            later,
            device.public(),
            alice,
            token.secret,
            &proof,
            false,
            &mut WriteBatch::default(),
        );
        assert_eq!(refused.err(), Some(RegistrationError::TokenExpired));
        // The expiry survives a restart.
        let recovered = RegistrationAuthority::recover(&store).unwrap().unwrap();
        assert_eq!(recovered.tokens()[0].expires, later);
    }

    #[test]
    fn a_token_never_prints_its_secret() {
        let token = EnrolmentToken {
            user: UserId::of("alice", "a.example"),
            domain: "a.example".into(),
            secret: [0xab; 16],
            root_fingerprint: [0; 16],
        };
        assert!(!format!("{token:?}").contains("abab"));
        let text = token.to_text();
        assert!(text.ends_with(":a.example"), "{text}");
        assert_eq!(EnrolmentToken::from_text(&text), Some(token.clone()));
        assert!(token.is_for("alice") && !token.is_for("bob") && !token.is_for("al ice"));
        let without_domain = text.trim_end_matches(":a.example");
        let bad_domain = text.replace("a.example", "A_B");
        for bad in [
            "",
            "sund-enrol:",
            "sund-enrol:00:00:00",
            "other:0:0:0",
            without_domain,
            &bad_domain,
        ] {
            assert!(EnrolmentToken::from_text(bad).is_none(), "{bad}");
        }
    }
}
