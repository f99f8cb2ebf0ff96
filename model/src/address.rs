//! Users' addresses: `name@domain`, as people type them and as every user id is derived.
//!
//! A user belongs to the domain whose gateway certified its devices (the certificate names the
//! domain). `alice@a.example` and `alice@b.example` are different people, so a [`UserId`] is
//! derived from the whole address ([`Address::user`]): every per-user table (KeyPackages,
//! contacts, presence, quotas, DMs) keys on it and no two domains' users can collide.
//!
//! A name without a domain means the domain of whoever reads it: [`Address::parse`] takes the
//! reader's own domain for it, so `sund dm bob` on a device of `a.example` means
//! `bob@a.example`. Domains are compared in lower case (DNS names are case-insensitive); names
//! are kept exactly as typed.

use core::fmt;

use crate::ids::UserId;
use crate::trust::valid_domain;

/// The domain of a gateway whose operator named none, and so of a user named without one
/// on a device that knows no other (a device set up without a token or pairing code).
pub const DEFAULT_DOMAIN: &str = "localhost";
/// Bytes of a user name at most (the part before `@`).
pub const NAME_BYTES_MAX: usize = 64;
/// Bytes of a whole address at most (`name@domain`), so that it fits a one-byte length.
pub const ADDRESS_BYTES_MAX: usize = 255;

/// A user's address: a name in a domain. Always valid once built (see [`Address::new`]).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Address {
    name: String,
    domain: String,
}

/// Why a text is not an address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// The name part is empty, too long, or holds spaces, control characters or `@`.
    #[error(
        "`{0}` is not a user name: use 1 to 64 bytes without spaces, control characters or `@`"
    )]
    Name(String),
    /// The domain part is not a lower-case DNS name.
    #[error(
        "`{0}` is not a domain name: use labels of letters, digits and hyphens between single dots (for example b.example)"
    )]
    Domain(String),
    /// The whole address is longer than [`ADDRESS_BYTES_MAX`].
    #[error("an address is at most 255 bytes; this one has {0}")]
    TooLong(usize),
    /// A whole address was needed and the text names no domain.
    #[error("`{0}` names no domain: write NAME@DOMAIN (for example {0}@b.example)")]
    NoDomain(String),
}

/// `text` with control characters escaped, for error messages that quote what was typed.
fn shown(text: &str) -> String {
    text.chars().take(80).flat_map(char::escape_debug).collect()
}

impl Address {
    /// The address of `name` in `domain`. The domain is taken in lower case.
    pub fn new(name: &str, domain: &str) -> Result<Address, AddressError> {
        if name.is_empty()
            || name.len() > NAME_BYTES_MAX
            || name
                .chars()
                .any(|c| c == '@' || c.is_whitespace() || c.is_control())
        {
            return Err(AddressError::Name(shown(name)));
        }
        let domain = domain.to_ascii_lowercase();
        if !valid_domain(&domain) {
            return Err(AddressError::Domain(shown(&domain)));
        }
        let len = name.len() + 1 + domain.len();
        if len > ADDRESS_BYTES_MAX {
            return Err(AddressError::TooLong(len));
        }
        Ok(Address {
            name: name.to_string(),
            domain,
        })
    }

    /// `name@domain`, or a bare `name` in `home` (the reader's own domain).
    pub fn parse(text: &str, home: &str) -> Result<Address, AddressError> {
        match text.split_once('@') {
            Some((name, domain)) => Address::new(name, domain),
            None => Address::new(text, home),
        }
    }

    /// `name@domain` only: for what must name its domain (records shared between devices,
    /// pairing codes).
    pub fn parse_full(text: &str) -> Result<Address, AddressError> {
        match text.split_once('@') {
            Some((name, domain)) => Address::new(name, domain),
            None => Err(AddressError::NoDomain(shown(text))),
        }
    }

    /// The name, before `@`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The domain, after `@`: the gateway that certifies this user's devices.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The user id every device and gateway derives from this address: the first 16 bytes of
    /// SHA-256 over a context string and `name@domain`. (A name holds no `@`, so the text is
    /// unambiguous.)
    pub fn user(&self) -> UserId {
        use sha2::{Digest, Sha256};
        let digest = Sha256::new()
            .chain_update(b"sund/user/v2")
            .chain_update(self.name.as_bytes())
            .chain_update(b"@")
            .chain_update(self.domain.as_bytes())
            .finalize();
        UserId::from_bytes(digest[..16].try_into().expect("16 of 32 bytes"))
    }

    /// How a reader in `home` writes it: the bare name for a user of its own domain, the whole
    /// address otherwise.
    pub fn shown_from(&self, home: &str) -> String {
        if self.domain == home {
            self.name.clone()
        } else {
            self.to_string()
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.domain)
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl UserId {
    /// The id of `name` in `domain` (see [`Address::user`]). Panics if either is invalid: for
    /// names a program chose (tests, the simulator, the demo); parse what people type with
    /// [`Address::parse`].
    pub fn of(name: &str, domain: &str) -> UserId {
        Address::new(name, domain)
            .unwrap_or_else(|e| panic!("a valid address: {e}"))
            .user()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_bare_name_is_in_the_readers_domain() {
        let bob = Address::parse("bob", "a.example").unwrap();
        assert_eq!(bob.to_string(), "bob@a.example");
        assert_eq!(bob, Address::parse("bob@a.example", "b.example").unwrap());
        assert_eq!(bob.shown_from("a.example"), "bob");
        assert_eq!(bob.shown_from("b.example"), "bob@a.example");
    }

    #[test]
    fn the_same_name_in_two_domains_is_two_users() {
        assert_ne!(
            UserId::of("alice", "a.example"),
            UserId::of("alice", "b.example")
        );
        assert_eq!(
            UserId::of("alice", "a.example"),
            Address::parse("alice@A.Example", "x").unwrap().user()
        );
        // Names are case-sensitive, as they always were.
        assert_ne!(
            UserId::of("alice", "a.example"),
            UserId::of("Alice", "a.example")
        );
    }

    #[test]
    fn bad_addresses_say_what_is_wrong() {
        let home = "a.example";
        assert_eq!(
            Address::parse("", home),
            Err(AddressError::Name(String::new()))
        );
        assert!(matches!(
            Address::parse("bo b", home),
            Err(AddressError::Name(_))
        ));
        assert!(matches!(
            Address::parse("bob@", home),
            Err(AddressError::Domain(_))
        ));
        assert!(matches!(
            Address::parse("bob@b_x", home),
            Err(AddressError::Domain(_))
        ));
        assert!(matches!(
            Address::parse("@b.example", home),
            Err(AddressError::Name(_))
        ));
        assert!(matches!(
            Address::parse("a@b@c", home),
            Err(AddressError::Domain(_))
        ));
        assert!(matches!(
            Address::parse(&"n".repeat(65), home),
            Err(AddressError::Name(_))
        ));
        assert!(matches!(
            Address::parse("bob@b..example", home),
            Err(AddressError::Domain(_))
        ));
        // 200 bytes of domain in labels of at most 63.
        let label = "d".repeat(50);
        let domain = [label.as_str(); 4].join(".")[..200].to_string();
        let long = format!("{}@{domain}", "n".repeat(64));
        assert_eq!(Address::parse_full(&long), Err(AddressError::TooLong(265)));
        assert_eq!(
            Address::parse_full("bob"),
            Err(AddressError::NoDomain("bob".into()))
        );
        let message = Address::parse("bob\u{7}", home).unwrap_err().to_string();
        assert!(message.contains("bob\\u{7}"), "{message}");
    }

    proptest! {
        /// An address written out parses back to itself, from any reader's domain.
        #[test]
        fn text_round_trips(name in "[a-zA-Z0-9._~-]{1,64}", domain in "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?){0,3}") {
            let address = Address::new(&name, &domain).unwrap();
            prop_assert_eq!(Address::parse_full(&address.to_string()).unwrap(), address.clone());
            prop_assert_eq!(Address::parse(&address.shown_from(&domain), &domain).unwrap(), address.clone());
            prop_assert_eq!(Address::parse(&address.shown_from("other.example"), "other.example").unwrap(), address);
        }

        /// Parsing never panics, and anything it takes is within the bounds.
        #[test]
        fn parsing_any_text_is_bounded(text in "\\PC{0,300}") {
            if let Ok(address) = Address::parse(&text, "home.example") {
                prop_assert!(address.to_string().len() <= ADDRESS_BYTES_MAX);
                prop_assert!(!address.name().contains('@'));
            }
        }
    }
}
