//! Pairing: a certified device vouches for a new device of the same user, the way linked
//! devices work in Signal, so that a person adds a laptop from their phone without asking the
//! gateway's operator for an enrolment token.
//!
//! 1. The existing device A draws a one-time secret and signs a vouch over it
//!    ([`vouch_message`]). The vouch goes to the gateway over A's authenticated session as soon
//!    as A reaches it (it waits durably in A's store while the gateway cannot be reached).
//! 2. A shows a [`PairingCode`] (a QR code and its text form): the secret, the fingerprint of
//!    A's device key, the gateway's address and transport pin, the trust root's fingerprint and
//!    the user's address. The code is the direct channel between the two devices.
//! 3. The new device B takes the code, pins the gateway and the root from it, and records A's
//!    fingerprint: trust on first use, unconfirmed. It registers with the secret as its token.
//! 4. The gateway accepts the registration only if A's vouch for the secret arrived, A is not
//!    revoked, and B claims A's user. It answers with B's certificate and A's. B checks that
//!    A's certificate has the fingerprint of the code and the same user: the pairing is
//!    confirmed. A hears that a device was linked if it is connected at that moment (the notice
//!    is not queued).
//!
//! A gateway that issued B's certificate but named the wrong voucher has already counted the
//! code as used, even though B refuses the certificate: B pins the gateway, so only a faulty or
//! compromised gateway does this, and B then shows the refusal.
//!
//! If the gateway cannot be reached when the code is shown or taken, both sides keep what they
//! need and the pairing completes once they reach it, within [`PAIRING_TTL`] of the vouch.

use crate::address::Address;
use crate::identity::DevicePublicKey;
use crate::ids::UserId;

use super::authority::EnrolmentToken;
use super::certificate::DeviceCertificate;
use super::TrustRoot;

pub use super::authority::PAIRING_TTL;

/// Longest user address a pairing code carries (`name@domain`).
pub const USER_NAME_BYTES_MAX: usize = crate::address::ADDRESS_BYTES_MAX;
/// Longest gateway address a pairing code carries (a DNS name and a port).
pub const GATEWAY_ADDRESS_BYTES_MAX: usize = 260;
/// Longest text form of a pairing code.
pub const PAIRING_CODE_TEXT_MAX: usize =
    16 + 4 * 33 + 65 + 2 * USER_NAME_BYTES_MAX + 1 + GATEWAY_ADDRESS_BYTES_MAX;

const TEXT_PREFIX: &str = "SUND-PAIR:1:";

/// What the existing device shows and the new device takes.
#[derive(Clone, PartialEq, Eq)]
pub struct PairingCode {
    /// The one-time secret the new device registers with.
    pub secret: [u8; 16],
    /// The first 16 bytes of the vouching device's public key.
    pub voucher: [u8; 16],
    /// The first 16 bytes of the trust root's public key.
    pub root_fingerprint: [u8; 16],
    /// SHA-256 of the gateway's transport certificate (what the new device pins).
    pub gateway_pin: [u8; 32],
    /// The user's address (both devices belong to it).
    pub user: Address,
    /// The gateway's address, `HOST:PORT`.
    pub gateway: String,
}

impl core::fmt::Debug for PairingCode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // The secret is a credential until used: never in logs.
        write!(f, "PairingCode({} at {})", self.user, self.gateway)
    }
}

/// Why a pairing code's text was not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PairingCodeError {
    /// It does not start like a pairing code.
    #[error("not a pairing code: it starts with `SUND-PAIR:1:`; copy the whole text `sund pair show` prints")]
    NotACode,
    /// It is longer than any pairing code.
    #[error("too long for a pairing code ({0} characters)")]
    TooLong(usize),
    /// A field is missing or not what it should be.
    #[error("the pairing code's {0} is damaged; copy the whole text again")]
    BadField(&'static str),
}

use crate::hex::encode_upper as hex_upper;

fn unhex(text: &str, field: &'static str) -> Result<Vec<u8>, PairingCodeError> {
    crate::hex::decode(text).ok_or(PairingCodeError::BadField(field))
}

fn unhex_array<const N: usize>(
    text: &str,
    field: &'static str,
) -> Result<[u8; N], PairingCodeError> {
    crate::hex::decode_array(text).ok_or(PairingCodeError::BadField(field))
}

impl PairingCode {
    /// The user both devices belong to.
    pub fn user(&self) -> UserId {
        self.user.user()
    }

    /// The enrolment token the new device registers with.
    pub fn enrolment(&self) -> EnrolmentToken {
        EnrolmentToken {
            user: self.user(),
            domain: self.user.domain().to_string(),
            secret: self.secret,
            root_fingerprint: self.root_fingerprint,
        }
    }

    /// True if `key` is the key of the device that showed the code.
    pub fn shown_by(&self, key: &DevicePublicKey) -> bool {
        key.0[..16] == self.voucher
    }

    /// `SUND-PAIR:1:SECRET:VOUCHER:ROOT:PIN:NAME:ADDRESS`, hex in capitals and the name as the
    /// hex of its UTF-8, so that a code with an IPv4 address or a host name fits a QR code's
    /// compact alphanumeric mode (an IPv6 address's brackets do not). The address comes last
    /// because an IPv6 address holds colons.
    pub fn to_text(&self) -> String {
        format!(
            "{TEXT_PREFIX}{}:{}:{}:{}:{}:{}",
            hex_upper(&self.secret),
            hex_upper(&self.voucher),
            hex_upper(&self.root_fingerprint),
            hex_upper(&self.gateway_pin),
            hex_upper(self.user.to_string().as_bytes()),
            self.gateway.to_ascii_uppercase(),
        )
    }

    /// Parses [`Self::to_text`]'s form, in either case, with surrounding space ignored.
    pub fn from_text(text: &str) -> Result<PairingCode, PairingCodeError> {
        let text = text.trim();
        if text.len() > PAIRING_CODE_TEXT_MAX {
            return Err(PairingCodeError::TooLong(text.len()));
        }
        let prefix = text
            .get(..TEXT_PREFIX.len())
            .ok_or(PairingCodeError::NotACode)?;
        if !prefix.eq_ignore_ascii_case(TEXT_PREFIX) {
            return Err(PairingCodeError::NotACode);
        }
        let mut fields = text[TEXT_PREFIX.len()..].splitn(6, ':');
        let mut next = |name| fields.next().ok_or(PairingCodeError::BadField(name));
        let secret = unhex_array(next("secret")?, "secret")?;
        let voucher = unhex_array(next("device fingerprint")?, "device fingerprint")?;
        let root_fingerprint = unhex_array(next("root fingerprint")?, "root fingerprint")?;
        let gateway_pin = unhex_array(next("gateway pin")?, "gateway pin")?;
        let name = unhex(next("user name")?, "user name")?;
        let gateway = next("gateway address")?.to_ascii_lowercase();
        if name.is_empty() || name.len() > USER_NAME_BYTES_MAX {
            return Err(PairingCodeError::BadField("user name"));
        }
        let user = String::from_utf8(name)
            .ok()
            .and_then(|name| Address::parse_full(&name).ok())
            .ok_or(PairingCodeError::BadField("user name"))?;
        if gateway.is_empty()
            || gateway.len() > GATEWAY_ADDRESS_BYTES_MAX
            || !gateway.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(PairingCodeError::BadField("gateway address"));
        }
        Ok(PairingCode {
            secret,
            voucher,
            root_fingerprint,
            gateway_pin,
            user,
            gateway,
        })
    }
}

/// The bytes a vouching device signs: it lets whoever holds `secret` register one device of
/// `user` until `expires_seconds` (Unix seconds).
pub fn vouch_message(user: UserId, secret: &[u8; 16], expires_seconds: u64) -> Vec<u8> {
    let mut out = b"sund/pair-vouch/v1".to_vec();
    out.extend_from_slice(&user.to_bytes());
    out.extend_from_slice(secret);
    out.extend_from_slice(&expires_seconds.to_be_bytes());
    out
}

/// Why the new device did not take the gateway's confirmation of a pairing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PairingError {
    /// The gateway named no vouching device.
    #[error("the gateway did not name the device that showed the pairing code")]
    NoVoucher,
    /// The vouching device's certificate did not check out.
    #[error("the vouching device's certificate was refused: {0}")]
    BadVoucher(String),
    /// The gateway names another device than the one whose code was taken.
    #[error("the gateway says another device vouched than the one whose code was scanned; this pairing is not trusted")]
    WrongVoucher,
}

/// Checks the certificate of the device that vouched for a pairing, as the gateway handed it
/// to the new device: issued by `root`, for `user`, and for the key whose fingerprint the code
/// holds. Validity periods are the gateway's to check.
pub fn confirm_voucher(
    code_voucher: &[u8; 16],
    user: UserId,
    root: &TrustRoot,
    encoded: Option<&[u8]>,
) -> Result<DeviceCertificate, PairingError> {
    let encoded = encoded.ok_or(PairingError::NoVoucher)?;
    let cert =
        DeviceCertificate::decode(encoded).map_err(|e| PairingError::BadVoucher(e.to_string()))?;
    cert.verify_issuer(root)
        .map_err(|e| PairingError::BadVoucher(e.to_string()))?;
    if cert.device_key.0[..16] != *code_voucher || cert.user != user {
        return Err(PairingError::WrongVoucher);
    }
    Ok(cert)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn code() -> PairingCode {
        PairingCode {
            secret: [0xab; 16],
            voucher: [1; 16],
            root_fingerprint: [2; 16],
            gateway_pin: [3; 32],
            user: Address::new("alice", "a.example").unwrap(),
            gateway: "[::1]:4433".into(),
        }
    }

    #[test]
    fn the_text_form_round_trips_in_either_case() {
        let code = code();
        let text = code.to_text();
        assert!(text.starts_with("SUND-PAIR:1:ABAB"));
        assert_eq!(PairingCode::from_text(&text), Ok(code.clone()));
        assert_eq!(
            PairingCode::from_text(&format!("  {}\n", text.to_lowercase())),
            Ok(code.clone())
        );
        assert_eq!(code.enrolment().user, UserId::of("alice", "a.example"));
        assert!(!format!("{code:?}").contains("171"), "no secret in logs");
        assert!(!format!("{code:?}").contains("ab"), "no secret in logs");
    }

    #[test]
    fn damaged_codes_say_what_is_wrong() {
        let text = code().to_text();
        assert_eq!(PairingCode::from_text(""), Err(PairingCodeError::NotACode));
        assert_eq!(
            PairingCode::from_text("sund-enrol:00:00:00"),
            Err(PairingCodeError::NotACode)
        );
        let short_secret = text.replacen("ABAB", "AB", 1);
        assert_eq!(
            PairingCode::from_text(&short_secret),
            Err(PairingCodeError::BadField("secret"))
        );
        let fields: Vec<&str> = text.splitn(8, ':').collect();
        let cut = fields[..7].join(":");
        assert_eq!(
            PairingCode::from_text(&cut),
            Err(PairingCodeError::BadField("gateway address"))
        );
        let long = format!("{text}{}", "1".repeat(PAIRING_CODE_TEXT_MAX));
        assert!(matches!(
            PairingCode::from_text(&long),
            Err(PairingCodeError::TooLong(_))
        ));
        let name_hex = crate::hex::encode_upper(b"alice@a.example");
        for bad in ["", "alice", "alice@", "@a.example"] {
            let other = text.replace(&name_hex, &crate::hex::encode_upper(bad.as_bytes()));
            assert_eq!(
                PairingCode::from_text(&other),
                Err(PairingCodeError::BadField("user name")),
                "{bad}"
            );
        }
    }

    proptest! {
        #[test]
        fn any_text_parses_or_is_refused_without_panicking(text in ".{0,600}") {
            let _ = PairingCode::from_text(&text);
        }

        #[test]
        fn any_code_round_trips(
            secret: [u8; 16],
            voucher: [u8; 16],
            pin: [u8; 32],
            name in "[a-zA-Z0-9éø._-]{1,20}",
            domain in "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\\.[a-z]{2,5})?",
            port: u16,
        ) {
            let code = PairingCode {
                secret,
                voucher,
                root_fingerprint: [9; 16],
                gateway_pin: pin,
                user: Address::new(&name, &domain).unwrap(),
                gateway: format!("gw.example.org:{port}"),
            };
            prop_assert_eq!(PairingCode::from_text(&code.to_text()), Ok(code));
        }
    }
}
