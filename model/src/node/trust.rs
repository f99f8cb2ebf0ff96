//! The node's side of trust: registration, the certificate it keeps, renewal before expiry,
//! pairing (the vouch it signs for a code it shows, the check of the voucher when it took a
//! code), and the newest CRL.

use std::time::Duration;

use super::events::{NodeEvent, PairingOffer};
use super::{NodeConfig, NodeFx};
use crate::env::{Entropy, StoreError, StoreRead};
use crate::identity::DevicePublicKey;
use crate::time::Instant;
use crate::trust::pairing::{confirm_voucher, vouch_message, PAIRING_TTL};
use crate::trust::{
    register_message, DeviceCertificate, PendingVouch, TrustHolder, TrustRoot, RENEWAL_WINDOW,
};
use crate::wire::payload::{
    Certificate as CertificatePayload, DeviceLinked, ErrorCode, ErrorReport, PairVouch, Register,
    RenewCertificate,
};
use crate::wire::Payload;

/// How often a device whose certificate is due for renewal asks again within one session.
const RENEWAL_RETRY_INTERVAL: Duration = Duration::from_secs(3600);

/// What became of a CRL from the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrlOutcome {
    /// Kept: newer than the one held. `revoked`: it lists this device.
    Updated {
        /// This device is revoked.
        revoked: bool,
    },
    /// Another domain's, newer than the one held for it: kept.
    PeerUpdated,
    /// Not kept (not newer, or refused).
    Unchanged,
}

/// Certificate, pinned root, CRL, pending vouch. See the module docs.
#[derive(Clone, Debug)]
pub struct NodeTrust {
    holder: TrustHolder,
    /// When this session last asked to renew the certificate (in memory).
    renewal_asked: Option<Instant>,
}

impl NodeTrust {
    /// Reads the trust state back.
    pub fn recover(store: &dyn StoreRead) -> Result<NodeTrust, StoreError> {
        Ok(NodeTrust {
            holder: TrustHolder::recover(store)?,
            renewal_asked: None,
        })
    }

    /// Certificate, pinned root, CRL.
    pub fn holder(&self) -> &TrustHolder {
        &self.holder
    }

    /// See [`NodeTrust::holder`].
    pub fn holder_mut(&mut self) -> &mut TrustHolder {
        &mut self.holder
    }

    /// The certificate's bytes for a `Hello`, if the device has one.
    pub fn hello_certificate(&self) -> Option<Vec<u8>> {
        self.holder.certificate().map(DeviceCertificate::encode)
    }

    /// `Register`: a certificate for this key and user, with the enrolment token if the device
    /// has one.
    pub fn register(&self, config: &NodeConfig) -> Payload {
        let key = config.key.public();
        let user = config.certificate_user();
        let token = config.enrolment.as_ref().map_or([0; 16], |t| t.secret);
        let proof = config.key.sign(&register_message(&token, &key, user));
        Payload::Register(Register {
            device_key: key.0,
            user: user.to_bytes(),
            token,
            proof,
        })
    }

    /// The gateway issued our certificate. A paired device first checks that the gateway names
    /// the device whose code it took as the voucher. True if the certificate was taken.
    pub fn on_certificate(
        &mut self,
        config: &NodeConfig,
        answer: &CertificatePayload,
        fx: &mut NodeFx,
    ) -> bool {
        let mut voucher = None;
        if let Some(fingerprint) = config.pairing_voucher {
            let root = DeviceCertificate::decode(&answer.certificate).map(|cert| TrustRoot {
                key: DevicePublicKey(answer.root_key),
                domain: cert.domain,
            });
            let confirmed = match root {
                Ok(root) => confirm_voucher(
                    &fingerprint,
                    config.certificate_user(),
                    &root,
                    answer.voucher.as_deref().map(|v| &v[..]),
                )
                .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match confirmed {
                Ok(cert) => voucher = Some(cert),
                Err(message) => {
                    fx.event(NodeEvent::Refused {
                        code: ErrorCode::CertificateInvalid,
                        message,
                    });
                    return false;
                }
            }
        }
        if !self.take_certificate(config, answer, fx) {
            return false;
        }
        if let Some(voucher) = voucher {
            self.holder.record_pairing(&voucher, fx.writes());
            fx.event(NodeEvent::Paired {
                voucher: voucher.device(),
            });
        }
        true
    }

    /// Keeps a certificate the gateway issued (at registration or renewal) if it checks out
    /// against the pinned root, this key and user: then `Registered`, else `Refused`.
    fn take_certificate(
        &mut self,
        config: &NodeConfig,
        answer: &CertificatePayload,
        fx: &mut NodeFx,
    ) -> bool {
        let accepted = self
            .holder
            .accept_certificate(
                &answer.certificate,
                answer.root_key,
                config.key.public(),
                config.certificate_user(),
                config.enrolment.as_ref(),
                fx.writes(),
            )
            .map(|cert| cert.serial);
        match accepted {
            Ok(serial) => {
                fx.event(NodeEvent::Registered { serial });
                true
            }
            Err(e) => {
                fx.event(NodeEvent::Refused {
                    code: ErrorCode::CertificateInvalid,
                    message: e.to_string(),
                });
                false
            }
        }
    }

    /// The gateway answered a renewal: keep the certificate if it is a newer one for this key
    /// and user under the pinned root. True if taken.
    pub fn on_renewed(
        &mut self,
        config: &NodeConfig,
        answer: &CertificatePayload,
        fx: &mut NodeFx,
    ) -> bool {
        let held = self.holder.certificate().map(|c| c.serial);
        let fresh = DeviceCertificate::decode(&answer.certificate)
            .is_ok_and(|c| held.is_some_and(|h| c.serial > h));
        fresh && self.take_certificate(config, answer, fx)
    }

    /// The gateway refused the certificate: register again on the next connection.
    pub fn forget_certificate(&mut self, fx: &mut NodeFx) {
        self.holder.forget_certificate(fx.writes());
    }

    /// A new session opened: renewal may be asked again.
    pub fn session_opened(&mut self) {
        self.renewal_asked = None;
    }

    /// `RenewCertificate` once this certificate is within `RENEWAL_WINDOW` of expiry: at each
    /// session open, and on heartbeats (at most hourly) for sessions that stay up for weeks.
    pub fn renewal_due(&mut self, now: Instant) -> Option<Payload> {
        let renew_from = self
            .holder
            .certificate()
            .map(|c| c.not_after_s.saturating_sub(RENEWAL_WINDOW.as_secs()));
        let due = renew_from.is_some_and(|from| now.as_micros() / 1_000_000 >= from);
        let asked_lately = self
            .renewal_asked
            .is_some_and(|at| now < at + RENEWAL_RETRY_INTERVAL);
        if !due || asked_lately {
            return None;
        }
        self.renewal_asked = Some(now);
        Some(Payload::RenewCertificate(RenewCertificate {}))
    }

    /// A CRL from the gateway (pushed on revocation, or answering our fetch): this domain's,
    /// or another domain's that the gateway holds (checked against the root this device's root
    /// vouched for that domain).
    pub fn on_crl(
        &mut self,
        device: crate::ids::DeviceId,
        crl: &[u8],
        fx: &mut NodeFx,
    ) -> CrlOutcome {
        let own = self.holder.root().map(|r| r.domain.clone());
        if let Ok(decoded) = crate::trust::Crl::decode(crl) {
            if own.is_some_and(|own| own != decoded.domain) {
                let domain = decoded.domain.clone();
                return match self.holder.accept_peer_crl(decoded, crl, fx.writes()) {
                    Ok(true) => {
                        let version = self.holder.peer_crl(&domain).map_or(0, |c| c.version);
                        fx.event(NodeEvent::PeerCrlUpdated { domain, version });
                        CrlOutcome::PeerUpdated
                    }
                    Ok(false) => CrlOutcome::Unchanged,
                    Err(e) => {
                        fx.event(NodeEvent::CrlRefused {
                            reason: format!("{domain}'s CRL: {e}"),
                        });
                        CrlOutcome::Unchanged
                    }
                };
            }
        }
        match self.holder.accept_crl(crl, fx.writes()) {
            Ok(true) => {
                let version = self.holder.crl_version();
                fx.event(NodeEvent::CrlUpdated { version });
                CrlOutcome::Updated {
                    revoked: self.holder.is_revoked(device),
                }
            }
            Ok(false) => CrlOutcome::Unchanged,
            Err(e) => {
                fx.event(NodeEvent::CrlRefused {
                    reason: e.to_string(),
                });
                CrlOutcome::Unchanged
            }
        }
    }

    /// Makes a pairing code's secret and this device's signed vouch for it, valid for
    /// [`PAIRING_TTL`] from `now`; the vouch waits durably until the gateway has it.
    pub fn offer_pairing(
        &mut self,
        config: &NodeConfig,
        now: Instant,
        entropy: &mut dyn Entropy,
        fx: &mut NodeFx,
    ) -> PairingOffer {
        let mut secret = [0u8; 16];
        entropy.fill_bytes(&mut secret);
        let expires = (now + PAIRING_TTL).as_micros() / 1_000_000;
        let user = config.certificate_user();
        let signature = config.key.sign(&vouch_message(user, &secret, expires));
        let vouch = PendingVouch {
            secret,
            expires,
            signature,
        };
        self.holder.set_pending_vouch(vouch, fx.writes());
        PairingOffer { secret, expires }
    }

    /// The vouch still waiting for the gateway, to send on an open session; one that expired
    /// unsent is dropped and reported.
    pub fn pending_vouch(&mut self, now: Instant, fx: &mut NodeFx) -> Option<Payload> {
        let vouch = self.holder.pending_vouch().copied()?;
        if vouch.expires <= now.as_micros() / 1_000_000 {
            self.holder.take_pending_vouch(&vouch.secret, fx.writes());
            fx.event(NodeEvent::PairingRefused {
                reason: "the pairing code expired before this device reached the gateway; show a new one".into(),
            });
            return None;
        }
        Some(Payload::PairVouch(PairVouch {
            secret: vouch.secret,
            expires: vouch.expires,
            signature: vouch.signature,
        }))
    }

    /// The gateway holds our vouch: the code works now.
    pub fn on_vouched(&mut self, secret: &[u8; 16], fx: &mut NodeFx) {
        if let Some(vouch) = self.holder.take_pending_vouch(secret, fx.writes()) {
            fx.event(NodeEvent::PairingReady {
                expires: vouch.expires,
            });
        }
    }

    /// The gateway refused a vouch. The refusal names the vouch by its signature's first half:
    /// an old refusal must not drop a newer code.
    pub fn on_vouch_refused(&mut self, report: ErrorReport, fx: &mut NodeFx) {
        let named = |v: &PendingVouch| report.msg_id.is_some_and(|id| id == v.signature[..16]);
        if let Some(vouch) = self.holder.pending_vouch().copied().filter(named) {
            self.holder.take_pending_vouch(&vouch.secret, fx.writes());
            fx.event(NodeEvent::PairingRefused {
                reason: report.message,
            });
        }
    }

    /// A new device of this user registered with our pairing code.
    pub fn on_device_linked(&self, config: &NodeConfig, linked: &DeviceLinked, fx: &mut NodeFx) {
        let Ok(cert) = DeviceCertificate::decode(&linked.certificate) else {
            return;
        };
        let from_root = self
            .holder
            .root()
            .is_some_and(|r| cert.verify_issuer(r).is_ok());
        if from_root && cert.user == config.certificate_user() {
            fx.event(NodeEvent::DeviceLinked {
                device: cert.device(),
            });
        }
    }
}
