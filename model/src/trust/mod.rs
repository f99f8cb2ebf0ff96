//! Identity and trust: the gateway is the registration authority of its domain.
//!
//! - A **trust root** (an Ed25519 key named by its domain) signs every device certificate and
//!   every CRL of the domain. The gateway creates it on first start and keeps it in its store.
//! - A **device certificate** ([`DeviceCertificate`]) binds a device key to a user and a domain
//!   for a validity period, under a serial number.
//! - A **CRL** ([`Crl`]) lists revoked devices under a version that only grows; a holder refuses
//!   any CRL older than the one it has.
//! - The **registration authority** ([`RegistrationAuthority`]) issues one-time enrolment tokens,
//!   exchanges a token and a proof of key possession for a certificate, and revokes devices.
//! - **Pairing** ([`pairing`]): a certified device vouches for a new device of its user, whose
//!   pairing code then serves as its enrolment token.
//!
//! Both encodings are compact, versioned binary (not CBOR): they are signed byte for byte, so
//! exactly one encoding of each value must exist. Decoders bound every length and never panic.

mod authority;
mod certificate;
pub(crate) mod codec;
pub mod credential;
mod crl;
pub mod handshake;
mod holder;
pub mod pairing;
pub mod peer_roots;
pub mod safety_number;

pub use authority::{token_id, TokenSummary};
pub use authority::{
    EnrolmentToken, RegistrationAuthority, RegistrationError, AUTHORITY_TABLE, CERTIFICATES_TABLE,
    CERTIFICATE_VALIDITY, CLOCK_SKEW_ALLOWANCE, ENROLMENT_TOKENS_TABLE, ENROLMENT_TOKEN_TTL,
    PAIRING_TTL, RENEWAL_WINDOW, VOUCHES_PER_DEVICE_MAX,
};
pub(crate) use certificate::check_validity;
pub use certificate::{register_message, CertificateError, DeviceCertificate};
pub use crl::{versions_digest, Crl, CrlError, CRL_ENTRIES_MAX};
pub use holder::{HolderError, PendingVouch, TrustHolder, NODE_PEER_CRLS_TABLE, NODE_TRUST_TABLE};

use crate::identity::DevicePublicKey;

/// Longest domain name (DNS limit).
pub const DOMAIN_BYTES_MAX: usize = 253;

/// A domain's trust root as devices know it: the public key that signs its certificates and
/// CRLs, and the domain it speaks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustRoot {
    /// The root's Ed25519 public key.
    pub key: DevicePublicKey,
    /// The domain, e.g. `example.org`.
    pub domain: String,
}

impl TrustRoot {
    /// The first 16 bytes of the key in hex: what people compare when they pin a root.
    pub fn fingerprint(&self) -> String {
        self.key.to_hex()[..32].to_string()
    }
}

/// True if `domain` is a plausible domain name: 1..=253 bytes of dot-separated labels, each
/// 1..=63 lower-case letters, digits and hyphens, neither starting nor ending with a hyphen
/// (so `b..example`, `.b.example` and `-b.example` are not). Certificates and CRLs carry only
/// such names.
pub fn valid_domain(domain: &str) -> bool {
    !domain.is_empty()
        && domain.len() <= DOMAIN_BYTES_MAX
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_are_lower_case_dns_names() {
        assert!(valid_domain("example.org"));
        assert!(valid_domain("sund-1.local"));
        for bad in [
            "",
            "Example.org",
            "a b",
            "ex/ample",
            "é.org",
            "b..example",
            ".b.example",
            "b.example.",
            "-b.example",
            "b-.example",
        ] {
            assert!(!valid_domain(bad), "{bad}");
        }
        let label = "a".repeat(63);
        assert!(valid_domain(&label));
        assert!(
            !valid_domain(&"a".repeat(64)),
            "a label is at most 63 bytes"
        );
        let long = [label.as_str(); 4].join(".")[..253].to_string();
        assert!(valid_domain(&long));
        assert!(!valid_domain(&format!("{long}a")));
    }
}
