//! Members' names, told inside the group.
//!
//! A device's certificate names its user by id and domain, never by the name people type
//! (`alice@a.example`): gateways hold user ids, not names. So a member someone else added used
//! to show as a bare user id to everyone who had not named that user in their own contact
//! book — every member of another domain, in particular.
//!
//! A user id is a hash of the address ([`Address::user`]), so an address is self-certifying:
//! whoever tells it, it can be checked against the id, and a wrong one is simply not the
//! user's. A member that adds users to a group (the `sund` CLI, after its commit) tells the
//! group, in one end-to-end-encrypted application message, a **roster**: the addresses it knows
//! of the group's members, its own included. Every member's node reads rosters as they are
//! delivered and keeps each address that hashes to the user id of a member of that group at
//! that moment ([`TOLD_NAMES_TABLE`]); the gateway sees only ciphertext. The message is still
//! delivered to the application, which does not show it.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::address::Address;
use crate::env::{scan_all, StoreError, StoreRead, Table, WriteBatch};
use crate::ids::UserId;

/// First bytes of a roster message (and its version).
pub const ROSTER_MAGIC: &[u8; 8] = b"sundnm01";

/// Most addresses in one roster (a larger group's roster names the first ones, by user id).
pub const ROSTER_NAMES_MAX: usize = 1_024;

/// Table of told addresses: key user id (16), value the address as text.
pub const TOLD_NAMES_TABLE: Table = Table("node_told_names");

/// Why a roster could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RosterError {
    /// Shorter than its header or an entry says.
    #[error("the roster is truncated")]
    Truncated,
    /// More entries than [`ROSTER_NAMES_MAX`].
    #[error("the roster names {0} users; at most {ROSTER_NAMES_MAX}")]
    TooMany(usize),
    /// Bytes after the last entry.
    #[error("the roster has bytes after its last entry")]
    Trailing,
}

/// A roster message naming `addresses` (at most [`ROSTER_NAMES_MAX`]: the rest are left out).
pub fn encode_roster<'a>(addresses: impl IntoIterator<Item = &'a Address>) -> Bytes {
    let mut out = ROSTER_MAGIC.to_vec();
    let texts: Vec<String> = addresses
        .into_iter()
        .take(ROSTER_NAMES_MAX)
        .map(ToString::to_string)
        .collect();
    let count = u16::try_from(texts.len()).expect("at most ROSTER_NAMES_MAX");
    out.extend_from_slice(&count.to_be_bytes());
    for text in &texts {
        // Addresses are at most `address::ADDRESS_BYTES_MAX` (< 256) bytes.
        let len = u8::try_from(text.len()).expect("an address fits in 255 bytes");
        out.push(len);
        out.extend_from_slice(text.as_bytes());
    }
    Bytes::from(out)
}

/// Whether `body` is a roster message.
pub fn is_roster(body: &[u8]) -> bool {
    body.starts_with(ROSTER_MAGIC)
}

/// The entries of a roster message, as told (each still to be checked: see
/// [`address_told`]); `None` if `body` is not a roster.
pub fn decode_roster(body: &[u8]) -> Option<Result<Vec<&[u8]>, RosterError>> {
    let rest = body.strip_prefix(ROSTER_MAGIC.as_slice())?;
    Some(decode_entries(rest))
}

fn decode_entries(rest: &[u8]) -> Result<Vec<&[u8]>, RosterError> {
    let (count, mut rest) = rest
        .split_first_chunk::<2>()
        .ok_or(RosterError::Truncated)?;
    let count = usize::from(u16::from_be_bytes(*count));
    if count > ROSTER_NAMES_MAX {
        return Err(RosterError::TooMany(count));
    }
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let (&len, tail) = rest.split_first().ok_or(RosterError::Truncated)?;
        let len = usize::from(len);
        if tail.len() < len {
            return Err(RosterError::Truncated);
        }
        let (entry, tail) = tail.split_at(len);
        entries.push(entry);
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(RosterError::Trailing);
    }
    Ok(entries)
}

/// `told` as an address, if it is written as addresses always are (domain in lower case) and
/// is one of `members`' (its hash is their user id).
pub fn address_told(told: &[u8], is_member: impl Fn(UserId) -> bool) -> Option<Address> {
    let text = core::str::from_utf8(told).ok()?;
    let address = Address::parse_full(text).ok()?;
    (address.to_string() == text && is_member(address.user())).then_some(address)
}

/// The addresses this device was told, by user.
#[derive(Clone, Debug, Default)]
pub struct ToldNames {
    names: BTreeMap<UserId, Address>,
}

fn corrupt(reason: &str) -> StoreError {
    StoreError::Corrupt {
        table: TOLD_NAMES_TABLE.0,
        reason: reason.into(),
    }
}

impl ToldNames {
    /// Reads back what the device was told.
    pub fn recover(store: &dyn StoreRead) -> Result<ToldNames, StoreError> {
        let mut names = BTreeMap::new();
        scan_all(store, TOLD_NAMES_TABLE, |key, value| {
            let user = UserId::from_bytes(key.try_into().map_err(|_| corrupt("key length"))?);
            let address = address_told(value, |u| u == user)
                .ok_or_else(|| corrupt("an address that is not its user's"))?;
            names.insert(user, address);
            Ok(())
        })?;
        Ok(ToldNames { names })
    }

    /// Takes the addresses of a roster delivered in a group whose member users are
    /// `is_member`; returns how many were new. Entries that are not a member's address are
    /// ignored, as is a roster that does not decode.
    pub fn learn(
        &mut self,
        body: &[u8],
        is_member: impl Fn(UserId) -> bool,
        writes: &mut WriteBatch,
    ) -> usize {
        let Some(Ok(entries)) = decode_roster(body) else {
            return 0;
        };
        let mut new = 0;
        for entry in entries {
            let Some(address) = address_told(entry, &is_member) else {
                continue;
            };
            let user = address.user();
            if self.names.get(&user) == Some(&address) {
                continue;
            }
            writes.put(
                TOLD_NAMES_TABLE,
                user.to_bytes().to_vec(),
                address.to_string().into_bytes(),
            );
            self.names.insert(user, address);
            new += 1;
        }
        new
    }

    /// The address told for `user`, if any.
    pub fn get(&self, user: UserId) -> Option<&Address> {
        self.names.get(&user)
    }

    /// Every address told, by user.
    pub fn all(&self) -> &BTreeMap<UserId, Address> {
        &self.names
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::env::{MemStore, Store as _};

    fn address(name: &str, domain: &str) -> Address {
        Address::new(name, domain).unwrap()
    }

    #[test]
    fn a_roster_is_read_back_entry_by_entry() {
        let told = [address("alice", "a.example"), address("bob", "b.example")];
        let body = encode_roster(&told);
        assert!(is_roster(&body));
        let entries = decode_roster(&body).unwrap().unwrap();
        assert_eq!(entries, [&b"alice@a.example"[..], &b"bob@b.example"[..]]);
        assert_eq!(decode_roster(b"hello"), None);
        assert_eq!(
            decode_roster(b"sundnm01\x00\x01\x05ab"),
            Some(Err(RosterError::Truncated))
        );
        assert_eq!(
            decode_roster(b"sundnm01\x00\x00x"),
            Some(Err(RosterError::Trailing))
        );
        assert_eq!(
            decode_roster(b"sundnm01\x04\x01"),
            Some(Err(RosterError::TooMany(1025)))
        );
    }

    #[test]
    fn only_a_members_address_written_as_addresses_are_is_taken() {
        let alice = address("alice", "a.example");
        let members = [alice.user()];
        let is_member = |u: UserId| members.contains(&u);
        assert_eq!(address_told(b"alice@a.example", is_member), Some(alice));
        // Another user's (not a member), the name in another domain, a domain in capitals,
        // no domain, bytes that are not UTF-8, nothing.
        for told in [
            &b"bob@a.example"[..],
            b"alice@b.example",
            b"alice@A.example",
            b"alice",
            b"\xffalice@a.example",
            b"",
        ] {
            assert_eq!(address_told(told, is_member), None, "{told:?}");
        }
    }

    #[test]
    fn what_is_learnt_survives_a_restart_and_a_non_member_is_not_learnt() {
        let alice = address("alice", "a.example");
        let carol = address("carol", "c.example");
        let mut store = MemStore::default();
        let mut names = ToldNames::default();
        let mut writes = WriteBatch::default();
        let body = encode_roster([&alice, &carol]);
        let learnt = names.learn(&body, |u| u == alice.user(), &mut writes);
        assert_eq!(learnt, 1);
        assert_eq!(names.learn(&body, |u| u == alice.user(), &mut writes), 0);
        store.commit(writes).unwrap();
        let back = ToldNames::recover(&store).unwrap();
        assert_eq!(back.get(alice.user()), Some(&alice));
        assert_eq!(back.get(carol.user()), None);
        assert_eq!(back.all().len(), 1);
    }

    #[test]
    fn a_stored_address_that_is_not_its_users_is_refused_at_recovery() {
        let mut store = MemStore::default();
        let mut writes = WriteBatch::default();
        writes.put(
            TOLD_NAMES_TABLE,
            address("alice", "a.example").user().to_bytes().to_vec(),
            b"mallory@a.example".to_vec(),
        );
        store.commit(writes).unwrap();
        assert!(matches!(
            ToldNames::recover(&store),
            Err(StoreError::Corrupt {
                table: "node_told_names",
                ..
            })
        ));
    }

    proptest! {
        #[test]
        fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut body = ROSTER_MAGIC.to_vec();
            body.extend_from_slice(&bytes);
            let _ = decode_roster(&body);
            let _ = decode_roster(&bytes);
        }

        #[test]
        fn rosters_round_trip(names in proptest::collection::vec("[a-z][a-z0-9_-]{0,20}", 0..40)) {
            let told: Vec<Address> = names.iter().map(|n| address(n, "a.example")).collect();
            let body = encode_roster(&told);
            let entries = decode_roster(&body).unwrap().unwrap();
            let back: Vec<Address> = entries
                .iter()
                .map(|e| address_told(e, |_| true).unwrap())
                .collect();
            prop_assert_eq!(back, told);
        }
    }
}
