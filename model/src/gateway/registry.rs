//! The registry: the gateway as registration authority of its domain, and which user each
//! device belongs to.
//!
//! It wraps the [`RegistrationAuthority`] (trust root, enrolment tokens, certificates, CRL) with
//! the protocol around it: `Register` before any session, the certificate check of every
//! `Hello`, pairing vouches, renewal over a session, revocation, the CRL and trust root asked
//! for by devices. Devices are bound to the user their certificate names at their first session.

use std::collections::{BTreeMap, BTreeSet};

use super::session::Sessions;
use super::{Fx, Refusal};
use crate::env::{scan_all, Entropy, StoreError, StoreRead, Table, WriteBatch};
use crate::identity::DevicePublicKey;
use crate::ids::{ConnectionId, DeviceId, MsgId, UserId};
use crate::time::Instant;
use crate::trust::pairing::vouch_message;
use crate::trust::{
    CertificateError, Crl, EnrolmentToken, RegistrationAuthority, RegistrationError, TrustRoot,
};
use crate::wire::payload::{
    Certificate as CertificatePayload, Crl as CrlPayload, DeviceLinked, ErrorCode, PairVouch,
    PairVouched, Payload, Register, TrustRoot as TrustRootPayload,
};
use crate::wire::Routing;

/// Table binding devices to users: key `user(16) ++ device(16)`, empty value.
pub const USERS_TABLE: Table = Table("user_devices");

/// Counters of the registry.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RegistryStats {
    /// Certificates issued at registration.
    pub registrations: u64,
    /// Devices registered with a pairing code another device vouched for.
    pub pairings: u64,
    /// Certificates renewed before expiry.
    pub renewals: u64,
    /// Devices revoked.
    pub revocations: u64,
    /// CRL frames sent (answers and pushes).
    pub crls_sent: u64,
}

/// The registration authority and the user bindings. See the module docs.
pub struct Registry {
    domain: String,
    open_enrolment: bool,
    /// Created with the gateway (a new root), then kept in the store.
    authority: RegistrationAuthority,
    users: BTreeMap<UserId, BTreeSet<DeviceId>>,
    device_users: BTreeMap<DeviceId, UserId>,
    stats: RegistryStats,
}

impl core::fmt::Debug for Registry {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Registry")
            .field("domain", &self.domain)
            .field("devices", &self.device_users.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// A new registry for `domain`: a new trust root, whose records go into `writes`.
    pub fn new(
        domain: String,
        open_enrolment: bool,
        now: Instant,
        entropy: &mut dyn Entropy,
        writes: &mut WriteBatch,
    ) -> Registry {
        let authority = RegistrationAuthority::create(&domain, now, entropy, writes);
        Registry::with_authority(domain, open_enrolment, authority)
    }

    fn with_authority(
        domain: String,
        open_enrolment: bool,
        authority: RegistrationAuthority,
    ) -> Registry {
        Registry {
            domain,
            open_enrolment,
            authority,
            users: BTreeMap::new(),
            device_users: BTreeMap::new(),
            stats: RegistryStats::default(),
        }
    }

    /// Reads the authority and the user bindings back; a store that never held an authority
    /// (a gateway that stopped before its first commit) gets a new one, its records in
    /// `writes`.
    pub fn recover(
        domain: String,
        open_enrolment: bool,
        now: Instant,
        store: &dyn StoreRead,
        entropy: &mut dyn Entropy,
        writes: &mut WriteBatch,
    ) -> Result<Registry, StoreError> {
        let mut registry = match RegistrationAuthority::recover(store)? {
            Some(authority) => Registry::with_authority(domain, open_enrolment, authority),
            None => Registry::new(domain, open_enrolment, now, entropy, writes),
        };
        scan_all(store, USERS_TABLE, |key, _| {
            let (user, device) = super::sequencer::split_pair_key(USERS_TABLE, key)?;
            registry.bind_in_memory(UserId(user), DeviceId(device));
            Ok(())
        })?;
        Ok(registry)
    }

    // ---- getters ----

    /// The registration authority (admin listings).
    pub fn authority(&self) -> &RegistrationAuthority {
        &self.authority
    }

    /// The current CRL.
    pub fn crl(&self) -> &Crl {
        self.authority.crl()
    }

    /// The user `device` is bound to.
    pub fn user_of(&self, device: DeviceId) -> Option<UserId> {
        self.device_users.get(&device).copied()
    }

    /// Every user a device is bound to, in id order.
    pub fn users(&self) -> impl Iterator<Item = UserId> + '_ {
        self.users.keys().copied()
    }

    /// The devices bound to `user`.
    pub fn devices_of(&self, user: UserId) -> impl Iterator<Item = DeviceId> + '_ {
        self.users.get(&user).into_iter().flatten().copied()
    }

    /// Counters.
    pub fn stats(&self) -> &RegistryStats {
        &self.stats
    }

    /// The trust root devices pin.
    pub fn trust_root(&self) -> &TrustRoot {
        self.authority.root()
    }

    // ---- bindings ----

    fn bind_in_memory(&mut self, user: UserId, device: DeviceId) {
        self.users.entry(user).or_default().insert(device);
        self.device_users.insert(device, user);
    }

    /// Binds a device that proved its key to the user its certificate names, at its first
    /// session; refuses a device bound to another user.
    pub fn bind_at_session(
        &mut self,
        device: DeviceId,
        user: Option<UserId>,
        writes: &mut WriteBatch,
    ) -> Result<(), Refusal> {
        let Some(user) = user else {
            return Ok(());
        };
        match self.device_users.get(&device) {
            // Checked only now that the device proved its key, so the binding is not revealed
            // to whoever merely claims a device id.
            Some(bound) if *bound != user => Err(Refusal::goodbye(
                ErrorCode::UserMismatch,
                format!("this device belongs to {bound}, not {user}"),
            )),
            Some(_) => Ok(()),
            None => {
                self.bind_in_memory(user, device);
                let mut key = user.to_bytes().to_vec();
                key.extend_from_slice(&device.to_bytes());
                writes.put(USERS_TABLE, key, Vec::new());
                Ok(())
            }
        }
    }

    // ---- the protocol ----

    /// Checks the certificate a `Hello` shows for `key`; returns the user it names.
    pub fn check_hello(
        &self,
        now: Instant,
        key: &DevicePublicKey,
        certificate: Option<&[u8]>,
        claimed: Option<UserId>,
    ) -> Result<UserId, Refusal> {
        let Some(certificate) = certificate else {
            return Err(Refusal::goodbye(
                ErrorCode::CertificateRequired,
                "a session needs a device certificate: register this device first",
            ));
        };
        let cert = self
            .authority
            .check(now, certificate, key)
            .map_err(|e| Refusal::goodbye(certificate_error_code(&e), e.to_string()))?;
        if let Some(claimed) = claimed {
            if claimed != cert.user {
                return Err(Refusal::goodbye(
                    ErrorCode::UserMismatch,
                    format!(
                        "this device's certificate is for {}, not {claimed}",
                        cert.user
                    ),
                ));
            }
        }
        Ok(cert.user)
    }

    /// A device asks for a certificate (before any session).
    #[allow(clippy::too_many_arguments)]
    pub fn register(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        sender: DeviceId,
        register: Register,
        sessions: &Sessions,
        fx: &mut Fx,
    ) -> Result<(), Refusal> {
        let key = DevicePublicKey(register.device_key);
        if key.device_id() != sender {
            return Err(Refusal::goodbye(
                ErrorCode::AuthenticationFailed,
                "the sender device id does not match the device key",
            ));
        }
        let open = self.open_enrolment;
        if !open && register.token == [0; 16] {
            return Err(Refusal::goodbye(
                ErrorCode::EnrolmentTokenInvalid,
                "this gateway needs an enrolment token to register a device: its operator issues one with `sund-gateway admin enrol-token USER`, given to `sund init --user USER --token TOKEN`",
            ));
        }
        let user = UserId::from_bytes(register.user);
        let again = self.authority.enrolled_with(&register.token, sender);
        let cert = self
            .authority
            .register(
                now,
                key,
                user,
                register.token,
                &register.proof,
                open,
                fx.writes(),
            )
            .map_err(|e| Refusal::goodbye(registration_error_code(&e), e.to_string()))?;
        if !again {
            self.stats.registrations += 1;
        }
        let authority = &self.authority;
        let voucher = authority.voucher_certificate(&register.token).cloned();
        let answer = CertificatePayload {
            certificate: cert.encode().into(),
            root_key: authority.root().key.0,
            voucher: voucher.as_ref().map(|v| v.encode().into()),
        };
        fx.send(conn, Routing::default(), Payload::Certificate(answer));
        if let Some(voucher) = voucher.filter(|_| !again) {
            self.stats.pairings += 1;
            if let Some(voucher_conn) = sessions.online(voucher.device()) {
                let linked = DeviceLinked {
                    certificate: cert.encode().into(),
                };
                fx.send(
                    voucher_conn,
                    Routing::default(),
                    Payload::DeviceLinked(linked),
                );
            }
        }
        Ok(())
    }

    /// A device vouches for a pairing code: checked against its certified key, then kept by the
    /// authority until the new device registers with it or it expires.
    pub fn vouch(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        device: DeviceId,
        vouch: PairVouch,
        fx: &mut Fx,
    ) -> Result<(), Refusal> {
        let authority = &mut self.authority;
        let Some(voucher) = authority.certificate_of(device).cloned() else {
            return Err(Refusal::error(
                ErrorCode::PairingRefused,
                "this device has no certificate from this gateway",
            ));
        };
        // The refusal names the vouch by its signature's first half (not by its secret).
        let vouch_id = MsgId::from_bytes(vouch.signature[..16].try_into().expect("16 of 64"));
        let message = vouch_message(voucher.user, &vouch.secret, vouch.expires);
        if !voucher.device_key.verify(&message, &vouch.signature) {
            return Err(Refusal::error(
                ErrorCode::PairingRefused,
                "the vouch's signature does not verify against this device's key",
            )
            .about(vouch_id));
        }
        let expires = Instant(vouch.expires.saturating_mul(1_000_000));
        authority
            .accept_vouch(now, device, vouch.secret, expires, fx.writes())
            .map_err(|e| {
                Refusal::error(ErrorCode::PairingRefused, e.to_string()).about(vouch_id)
            })?;
        let answer = PairVouched {
            secret: vouch.secret,
        };
        fx.send(conn, Routing::default(), Payload::PairVouched(answer));
        Ok(())
    }

    /// A device renews its certificate over its session (see `trust::RENEWAL_WINDOW`).
    pub fn renew(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        device: DeviceId,
        fx: &mut Fx,
    ) -> Result<(), Refusal> {
        let authority = &mut self.authority;
        let before = authority.certificate_of(device).map(|c| c.serial);
        let cert = authority
            .renew(now, device, fx.writes())
            .map_err(|e| Refusal::error(registration_error_code(&e), e.to_string()))?;
        let answer = CertificatePayload {
            certificate: cert.encode().into(),
            root_key: authority.root().key.0,
            voucher: None,
        };
        if Some(cert.serial) != before {
            self.stats.renewals += 1;
        }
        fx.send(conn, Routing::default(), Payload::Certificate(answer));
        Ok(())
    }

    /// Answers a device that asks for the trust root.
    pub fn send_trust_root(&self, conn: ConnectionId, fx: &mut Fx) {
        let root = self.trust_root().clone();
        let answer = TrustRootPayload {
            key: root.key.0,
            domain: root.domain,
        };
        fx.send(conn, Routing::default(), Payload::TrustRoot(answer));
    }

    /// Sends the CRL to `conn` if it is newer than `have_version`.
    pub fn send_crl_if_newer(&mut self, conn: ConnectionId, have_version: u64, fx: &mut Fx) {
        if self.authority.crl().version > have_version {
            self.send_crl(conn, fx);
        }
    }

    /// Sends the current CRL to `conn`.
    pub fn send_crl(&mut self, conn: ConnectionId, fx: &mut Fx) {
        let crl = self.authority.crl().encode();
        self.stats.crls_sent += 1;
        fx.send(
            conn,
            Routing::default(),
            Payload::Crl(CrlPayload { crl: crl.into() }),
        );
    }

    /// Revokes `device`; true if this revoked it (false if it was revoked already or never
    /// registered here).
    pub fn revoke(&mut self, now: Instant, device: DeviceId, writes: &mut WriteBatch) -> bool {
        let authority = &mut self.authority;
        let before = authority.crl().version;
        match authority.revoke(now, device, writes).map(|crl| crl.version) {
            Ok(version) if version > before => {
                self.stats.revocations += 1;
                true
            }
            Ok(_) | Err(_) => false,
        }
    }

    /// Admin: a one-time token that lets one new device of `user` register.
    pub fn issue_enrolment_token(
        &mut self,
        now: Instant,
        user: UserId,
        entropy: &mut dyn Entropy,
        writes: &mut WriteBatch,
    ) -> EnrolmentToken {
        self.authority.issue_token(now, user, entropy, writes)
    }

    /// Makes a token expire now (see [`RegistrationAuthority::expire_token`]).
    pub fn expire_token(
        &mut self,
        now: Instant,
        id: [u8; 8],
        writes: &mut WriteBatch,
    ) -> Option<crate::trust::TokenSummary> {
        self.authority.expire_token(now, id, writes)
    }
}

/// The error code of a refused certificate.
fn certificate_error_code(error: &CertificateError) -> ErrorCode {
    match error {
        CertificateError::Malformed(_)
        | CertificateError::BadSignature
        | CertificateError::KeyMismatch => ErrorCode::CertificateInvalid,
        CertificateError::ForeignDomain { .. } => ErrorCode::ForeignDomain,
        CertificateError::Expired { .. } => ErrorCode::CertificateExpired,
        CertificateError::NotYetValid { .. } => ErrorCode::CertificateNotYetValid,
        CertificateError::Revoked(_) => ErrorCode::DeviceRevoked,
    }
}

/// The error code of a refused registration.
fn registration_error_code(error: &RegistrationError) -> ErrorCode {
    match error {
        RegistrationError::TokenUnknown | RegistrationError::TokenForAnotherUser { .. } => {
            ErrorCode::EnrolmentTokenInvalid
        }
        RegistrationError::TokenUsed => ErrorCode::EnrolmentTokenUsed,
        RegistrationError::TokenExpired => ErrorCode::EnrolmentTokenExpired,
        RegistrationError::BadProof => ErrorCode::AuthenticationFailed,
        RegistrationError::Revoked(_) => ErrorCode::DeviceRevoked,
        RegistrationError::BoundToAnotherUser { .. } => ErrorCode::UserMismatch,
        RegistrationError::CrlFull | RegistrationError::UnknownDevice(_) => ErrorCode::Forbidden,
        RegistrationError::VoucherRevoked(_)
        | RegistrationError::SecretTaken
        | RegistrationError::TooManyVouches => ErrorCode::PairingRefused,
    }
}
