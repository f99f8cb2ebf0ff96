//! Safety numbers: what two users compare, in person or over a channel they already trust, to
//! know that the devices in their conversation are each other's and not ones a gateway
//! certified in their name (the gateway runs the trust root, so certificates alone cannot
//! prove that). Signal's safety numbers, for users with several devices each.
//!
//! Each user's half is 30 digits from an iterated SHA-256 over a version, the user id and the
//! user's device keys in sorted order; iterated [`ITERATIONS`] times, as Signal does, so that
//! each try at keys whose half matches a given one costs that many hashes. The number is the two
//! halves, the smaller first, so that both users see the same 60 digits. A device added,
//! removed or replaced changes its user's half.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::identity::DevicePublicKey;
use crate::ids::UserId;

/// Hash iterations per half (Signal's figure).
pub const ITERATIONS: u32 = 5_200;

/// Digits in a whole safety number.
pub const DIGITS: usize = 60;

const VERSION: &[u8] = b"sund safety number v1";

/// Sixty digits two users compare (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SafetyNumber([u8; DIGITS]);

impl SafetyNumber {
    /// The safety number of users `a` and `b` with these devices each (in any order; the same
    /// whichever user is `a`).
    pub fn of(
        a: UserId,
        a_keys: &[DevicePublicKey],
        b: UserId,
        b_keys: &[DevicePublicKey],
    ) -> Self {
        let (first, second) = {
            let (x, y) = (half(a, a_keys), half(b, b_keys));
            if x <= y {
                (x, y)
            } else {
                (y, x)
            }
        };
        let mut digits = [0u8; DIGITS];
        digits[..DIGITS / 2].copy_from_slice(&first);
        digits[DIGITS / 2..].copy_from_slice(&second);
        SafetyNumber(digits)
    }

    /// Reads a safety number as a person types it: 60 digits, with any spaces or line breaks
    /// between them. `None` for anything else.
    pub fn parse(text: &str) -> Option<SafetyNumber> {
        let mut digits = [0u8; DIGITS];
        let mut n = 0;
        for c in text.chars() {
            if c.is_whitespace() {
                continue;
            }
            let d = c.to_digit(10)?;
            *digits.get_mut(n)? = u8::try_from(d).expect("a digit");
            n += 1;
        }
        (n == DIGITS).then_some(SafetyNumber(digits))
    }

    /// The number as three lines of four groups of five digits (how it is shown).
    pub fn lines(&self) -> [String; 3] {
        let group = |g: usize| -> String {
            self.0[g * 5..g * 5 + 5]
                .iter()
                .map(|d| char::from(b'0' + d))
                .collect()
        };
        let line = |l: usize| {
            (0..4)
                .map(|g| group(l * 4 + g))
                .collect::<Vec<_>>()
                .join(" ")
        };
        [line(0), line(1), line(2)]
    }
}

impl fmt::Display for SafetyNumber {
    /// The twelve groups of five on one line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.lines().join(" "))
    }
}

impl fmt::Debug for SafetyNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SafetyNumber({self})")
    }
}

/// One user's 30 digits.
fn half(user: UserId, keys: &[DevicePublicKey]) -> [u8; DIGITS / 2] {
    let mut keys: Vec<[u8; 32]> = keys.iter().map(|k| k.0).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut input = Vec::with_capacity(VERSION.len() + 16 + 4 + keys.len() * 32);
    input.extend_from_slice(VERSION);
    input.extend_from_slice(&user.to_bytes());
    input.extend_from_slice(&u32::try_from(keys.len()).unwrap_or(u32::MAX).to_be_bytes());
    for key in &keys {
        input.extend_from_slice(key);
    }
    let mut digest: [u8; 32] = Sha256::digest(&input).into();
    for _ in 1..ITERATIONS {
        digest = Sha256::new()
            .chain_update(digest)
            .chain_update(&input)
            .finalize()
            .into();
    }
    // Six groups of five digits, each from five bytes of the digest (2^40 is far above 10^5,
    // so the remainder is as good as uniform).
    let mut digits = [0u8; DIGITS / 2];
    for (group, bytes) in digest.chunks_exact(5).take(6).enumerate() {
        let mut value = bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)) % 100_000;
        for i in (0..5).rev() {
            digits[group * 5 + i] = u8::try_from(value % 10).expect("a digit");
            value /= 10;
        }
    }
    digits
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(seed: u8) -> DevicePublicKey {
        DevicePublicKey([seed; 32])
    }

    fn alice() -> UserId {
        UserId::of("alice", "localhost")
    }

    fn bob() -> UserId {
        UserId::of("bob", "localhost")
    }

    #[test]
    fn both_users_see_the_same_number_whatever_the_order_of_devices() {
        let one = SafetyNumber::of(alice(), &[key(1), key(2)], bob(), &[key(3)]);
        let other = SafetyNumber::of(bob(), &[key(3)], alice(), &[key(2), key(1)]);
        assert_eq!(one, other);
        assert_eq!(
            one.to_string().len(),
            DIGITS + 11,
            "twelve groups, eleven spaces"
        );
        assert!(one.lines().iter().all(|l| l.len() == 23));
    }

    #[test]
    fn a_device_added_or_replaced_changes_the_number() {
        let before = SafetyNumber::of(alice(), &[key(1)], bob(), &[key(3)]);
        let added = SafetyNumber::of(alice(), &[key(1)], bob(), &[key(3), key(4)]);
        let replaced = SafetyNumber::of(alice(), &[key(1)], bob(), &[key(4)]);
        let other_user = SafetyNumber::of(
            alice(),
            &[key(1)],
            UserId::of("eve", "localhost"),
            &[key(3)],
        );
        assert_ne!(before, added);
        assert_ne!(before, replaced);
        assert_ne!(before, other_user, "the user id is part of each half");
        // Only the half of the user whose devices changed moves.
        let halves = |n: SafetyNumber| {
            let s = n.to_string().replace(' ', "");
            (s[..30].to_string(), s[30..].to_string())
        };
        let (a, b) = halves(before);
        let (c, d) = halves(added);
        assert!(a == c || a == d || b == c || b == d);
    }

    #[test]
    fn the_number_is_stable_across_versions() {
        // A change here changes every user's safety number: only with a new VERSION. The
        // figures were computed apart from this code, with Python's hashlib, from the
        // algorithm in the module docs.
        // The users are fixed ids (those of `alice` and `bob` before ids were derived from
        // whole addresses), so that the figures stay apart from how ids are derived.
        let alice = UserId(0x8024d8142b555b76cf115033997c3930);
        let bob = UserId(0x5dfcf9947fdce3be4767e9b8f6698fb5);
        let n = SafetyNumber::of(alice, &[key(1)], bob, &[key(2)]);
        assert_eq!(
            n.lines(),
            [
                "00755 44685 51344 91266",
                "79350 73039 03383 69313",
                "19728 96841 78948 49766"
            ]
        );
    }

    #[test]
    fn typed_numbers_are_read_with_any_spacing() {
        let n = SafetyNumber::of(alice(), &[key(1)], bob(), &[key(2)]);
        let typed = n.lines().join("\n  ");
        assert_eq!(SafetyNumber::parse(&typed), Some(n));
        assert_eq!(SafetyNumber::parse(&n.to_string()[..40]), None, "too short");
        assert_eq!(SafetyNumber::parse(&format!("{n}1")), None, "too long");
        assert_eq!(SafetyNumber::parse(&n.to_string().replace('1', "l")), None);
    }

    proptest! {
        #[test]
        fn parsing_never_panics(text in ".{0,200}") {
            let _ = SafetyNumber::parse(&text);
        }
    }
}
