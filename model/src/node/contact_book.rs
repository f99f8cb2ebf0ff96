//! A user's contact book as its devices share it: the names the user knows people by and the
//! users it verified (safety numbers compared), carried as MLS application messages in the
//! group of the user's own devices ([`super::own_id`], `GroupKind::Own`), so the gateway sees
//! ciphertext only.
//!
//! Each message holds records; a record sets one fact about one user. Every device applies the
//! records in the group's order (the gateway sequences the group like any conversation), so
//! every device that applied the same messages holds the same book: no merge rule beyond "the
//! later record wins" is needed. A device that joins later gets the whole book as records from
//! the device that brought it in ([`ContactBook::records`]).
//!
//! Names only grow (a name is the user's own address, `name@domain`, whose
//! [`Address::user`] is the record's user, so a record cannot name a user falsely). A verification mark is set with the device keys compared
//! (`Verified`) and taken away by `Unverified`.
//!
//! ```text
//! message  = "sundcb02" | count(2, big-endian, 1..=RECORDS_MAX) | record*
//! record   = tag(1) | user(16) | fields
//!   tag 1  Named       len(1, 3..=255) | address (UTF-8 `name@domain`, see `crate::address`)
//!   tag 2  Verified    count(1, 1..=KEYS_MAX) | key(32)*  (strictly increasing)
//!   tag 3  Unverified
//! ```

use std::collections::{BTreeMap, BTreeSet};

use crate::address::Address;
use crate::identity::DevicePublicKey;
use crate::ids::UserId;

/// First bytes of every contact-book message (and its version).
pub const MAGIC: &[u8; 8] = b"sundcb02";
/// Records in one message at most.
pub const RECORDS_MAX: usize = 256;
/// Device keys in one verification mark at most (a user with more devices is not verified).
pub const KEYS_MAX: usize = 64;
/// Bytes of a name record's address at most.
pub const NAME_BYTES_MAX: usize = crate::address::ADDRESS_BYTES_MAX;
/// Bytes of one message at most: records are split into messages below this.
pub const MESSAGE_BYTES_MAX: usize = 64 * 1024;

const TAG_NAMED: u8 = 1;
const TAG_VERIFIED: u8 = 2;
const TAG_UNVERIFIED: u8 = 3;

/// One fact about one user in the contact book.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContactRecord {
    /// The user's address (`name@domain` whose [`Address::user`] is `user`).
    Named {
        /// The user.
        user: UserId,
        /// Their address, written out whole.
        name: String,
    },
    /// The user was verified with these device keys (their devices then).
    Verified {
        /// The user.
        user: UserId,
        /// The device keys compared.
        keys: BTreeSet<DevicePublicKey>,
    },
    /// The user's verification mark was taken away.
    Unverified {
        /// The user.
        user: UserId,
    },
}

impl ContactRecord {
    /// The user the record is about.
    pub fn user(&self) -> UserId {
        match self {
            ContactRecord::Named { user, .. }
            | ContactRecord::Verified { user, .. }
            | ContactRecord::Unverified { user } => *user,
        }
    }

    fn encoded_len(&self) -> usize {
        1 + 16
            + match self {
                ContactRecord::Named { name, .. } => 1 + name.len(),
                ContactRecord::Verified { keys, .. } => 1 + 32 * keys.len(),
                ContactRecord::Unverified { .. } => 0,
            }
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        let (tag, user) = match self {
            ContactRecord::Named { user, .. } => (TAG_NAMED, user),
            ContactRecord::Verified { user, .. } => (TAG_VERIFIED, user),
            ContactRecord::Unverified { user } => (TAG_UNVERIFIED, user),
        };
        out.push(tag);
        out.extend_from_slice(&user.to_bytes());
        match self {
            ContactRecord::Named { name, .. } => {
                out.push(name.len() as u8);
                out.extend_from_slice(name.as_bytes());
            }
            ContactRecord::Verified { keys, .. } => {
                out.push(keys.len() as u8);
                for key in keys {
                    out.extend_from_slice(&key.0);
                }
            }
            ContactRecord::Unverified { .. } => {}
        }
    }

    /// Whether the record can be encoded (and so would decode): a valid name that is the
    /// user's, between 1 and [`KEYS_MAX`] keys.
    pub fn check(&self) -> Result<(), ContactBookError> {
        match self {
            ContactRecord::Named { user, name } => check_name(*user, name),
            ContactRecord::Verified { keys, .. } if keys.is_empty() || keys.len() > KEYS_MAX => {
                Err(ContactBookError::Keys(keys.len()))
            }
            _ => Ok(()),
        }
    }
}

/// Whether `name` is a whole address (`name@domain`, see [`crate::address`]) written as it
/// always is (domain in lower case, so a user has one name) and `user`'s.
pub fn check_name(user: UserId, name: &str) -> Result<(), ContactBookError> {
    let address = Address::parse_full(name).map_err(|_| ContactBookError::BadName)?;
    if address.to_string() != name {
        return Err(ContactBookError::BadName);
    }
    if address.user() != user {
        return Err(ContactBookError::NameOfAnother(user));
    }
    Ok(())
}

/// Why a contact-book message could not be read (or a record not written).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ContactBookError {
    /// Not a contact-book message of this version.
    #[error("not a contact-book message (or one from a newer version of sund)")]
    Magic,
    /// Longer than [`MESSAGE_BYTES_MAX`].
    #[error("a message of {0} bytes (at most {MESSAGE_BYTES_MAX})")]
    TooLong(usize),
    /// The message ends inside a record.
    #[error("the message is cut short")]
    Truncated,
    /// Bytes after the last record.
    #[error("{0} bytes after the last record")]
    Trailing(usize),
    /// No records, or more than [`RECORDS_MAX`].
    #[error("{0} records in one message (1 to {RECORDS_MAX})")]
    Count(usize),
    /// A record of a kind this version does not know.
    #[error("unknown record kind {0}")]
    Tag(u8),
    /// A name that is not a user name.
    #[error("a name that is not a user's address (NAME@DOMAIN, at most {NAME_BYTES_MAX} bytes)")]
    BadName,
    /// A name that is not the named user's.
    #[error("a name that is not the name of {0}")]
    NameOfAnother(UserId),
    /// A verification mark with no keys or too many.
    #[error("a verification mark with {0} device keys (1 to {KEYS_MAX})")]
    Keys(usize),
    /// A verification mark's keys out of order or repeated.
    #[error("a verification mark's keys are not in increasing order")]
    KeyOrder,
}

/// Encodes records as messages of at most [`RECORDS_MAX`] records and [`MESSAGE_BYTES_MAX`]
/// bytes, in order. Invalid records are a programming error (check them first).
pub fn encode(records: &[ContactRecord]) -> Vec<Vec<u8>> {
    let mut messages = Vec::new();
    let mut current: Vec<&ContactRecord> = Vec::new();
    let mut bytes = MAGIC.len() + 2;
    for record in records {
        assert!(record.check().is_ok(), "encoding an invalid contact record");
        let len = record.encoded_len();
        if !current.is_empty() && (current.len() == RECORDS_MAX || bytes + len > MESSAGE_BYTES_MAX)
        {
            messages.push(encode_one(&current));
            current.clear();
            bytes = MAGIC.len() + 2;
        }
        current.push(record);
        bytes += len;
    }
    if !current.is_empty() {
        messages.push(encode_one(&current));
    }
    messages
}

fn encode_one(records: &[&ContactRecord]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MESSAGE_BYTES_MAX.min(4096));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(records.len() as u16).to_be_bytes());
    for record in records {
        record.encode_into(&mut out);
    }
    debug_assert!(out.len() <= MESSAGE_BYTES_MAX);
    out
}

/// Reads one message's records. Never panics; bounded by the message's length.
pub fn decode(message: &[u8]) -> Result<Vec<ContactRecord>, ContactBookError> {
    if message.len() > MESSAGE_BYTES_MAX {
        return Err(ContactBookError::TooLong(message.len()));
    }
    let rest = message
        .strip_prefix(MAGIC.as_slice())
        .ok_or(ContactBookError::Magic)?;
    let (count, mut rest) = rest
        .split_first_chunk::<2>()
        .ok_or(ContactBookError::Truncated)?;
    let count = u16::from_be_bytes(*count) as usize;
    if count == 0 || count > RECORDS_MAX {
        return Err(ContactBookError::Count(count));
    }
    let mut records = Vec::with_capacity(count);
    for _ in 0..count {
        let (&tag, after) = rest.split_first().ok_or(ContactBookError::Truncated)?;
        let (user, after) = after
            .split_first_chunk::<16>()
            .ok_or(ContactBookError::Truncated)?;
        let user = UserId::from_bytes(*user);
        rest = after;
        let record = match tag {
            TAG_NAMED => {
                let (&len, after) = rest.split_first().ok_or(ContactBookError::Truncated)?;
                let len = len as usize;
                if len > after.len() {
                    return Err(ContactBookError::Truncated);
                }
                let (name, after) = after.split_at(len);
                rest = after;
                let name = core::str::from_utf8(name).map_err(|_| ContactBookError::BadName)?;
                check_name(user, name)?;
                ContactRecord::Named {
                    user,
                    name: name.to_string(),
                }
            }
            TAG_VERIFIED => {
                let (&n, after) = rest.split_first().ok_or(ContactBookError::Truncated)?;
                let n = n as usize;
                if n == 0 || n > KEYS_MAX {
                    return Err(ContactBookError::Keys(n));
                }
                if n * 32 > after.len() {
                    return Err(ContactBookError::Truncated);
                }
                let (raw, after) = after.split_at(n * 32);
                rest = after;
                let mut keys = BTreeSet::new();
                let mut last: Option<[u8; 32]> = None;
                for chunk in raw.chunks_exact(32) {
                    let key: [u8; 32] = chunk.try_into().expect("chunks of 32");
                    if last.is_some_and(|l| l >= key) {
                        return Err(ContactBookError::KeyOrder);
                    }
                    last = Some(key);
                    keys.insert(DevicePublicKey(key));
                }
                ContactRecord::Verified { user, keys }
            }
            TAG_UNVERIFIED => ContactRecord::Unverified { user },
            other => return Err(ContactBookError::Tag(other)),
        };
        records.push(record);
    }
    if !rest.is_empty() {
        return Err(ContactBookError::Trailing(rest.len()));
    }
    Ok(records)
}

/// What one device knows of its user's contact book.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContactBook {
    /// Names, by user.
    pub names: BTreeMap<UserId, String>,
    /// Verified users and the device keys compared.
    pub verified: BTreeMap<UserId, BTreeSet<DevicePublicKey>>,
}

impl ContactBook {
    /// Applies one record; true if the book changed.
    pub fn apply(&mut self, record: &ContactRecord) -> bool {
        match record {
            ContactRecord::Named { user, name } => {
                debug_assert!(check_name(*user, name).is_ok());
                self.names.insert(*user, name.clone()).is_none()
            }
            ContactRecord::Verified { user, keys } => {
                self.verified.insert(*user, keys.clone()).as_ref() != Some(keys)
            }
            ContactRecord::Unverified { user } => self.verified.remove(user).is_some(),
        }
    }

    /// The whole book as records (names, then marks), for a device that knows none of it.
    /// Names that are not valid user names of their users, and marks with no keys or too
    /// many, cannot travel and are left out.
    pub fn records(&self) -> Vec<ContactRecord> {
        let names = self.names.iter().map(|(user, name)| ContactRecord::Named {
            user: *user,
            name: name.clone(),
        });
        let marks = self
            .verified
            .iter()
            .map(|(user, keys)| ContactRecord::Verified {
                user: *user,
                keys: keys.clone(),
            });
        names.chain(marks).filter(|r| r.check().is_ok()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn named(name: &str) -> ContactRecord {
        let address = Address::parse(name, "a.example").unwrap();
        ContactRecord::Named {
            user: address.user(),
            name: address.to_string(),
        }
    }

    fn user(name: &str) -> UserId {
        UserId::of(name, "a.example")
    }

    fn arb_record() -> impl Strategy<Value = ContactRecord> {
        prop_oneof![
            "[a-z0-9._-]{1,64}(@[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?){0,2})?".prop_map(|n| named(&n)),
            (
                any::<[u8; 16]>(),
                proptest::collection::btree_set(any::<[u8; 32]>(), 1..=KEYS_MAX)
            )
                .prop_map(|(u, keys)| ContactRecord::Verified {
                    user: UserId::from_bytes(u),
                    keys: keys.into_iter().map(DevicePublicKey).collect(),
                }),
            any::<[u8; 16]>().prop_map(|u| ContactRecord::Unverified {
                user: UserId::from_bytes(u)
            }),
        ]
    }

    proptest! {
        #[test]
        fn records_survive_encoding_in_order(records in proptest::collection::vec(arb_record(), 0..600)) {
            let messages = encode(&records);
            let mut back = Vec::new();
            for m in &messages {
                prop_assert!(m.len() <= MESSAGE_BYTES_MAX);
                back.extend(decode(m).unwrap());
            }
            prop_assert_eq!(back, records);
        }

        #[test]
        fn a_book_rebuilt_from_its_records_is_the_same_book(records in proptest::collection::vec(arb_record(), 0..200)) {
            let mut book = ContactBook::default();
            for r in &records {
                book.apply(r);
            }
            let mut copy = ContactBook::default();
            for r in book.records() {
                copy.apply(&r);
            }
            prop_assert_eq!(copy, book);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut message = MAGIC.to_vec();
            message.extend(bytes);
            let _ = decode(&message);
        }
    }

    #[test]
    fn a_name_that_is_not_the_users_is_refused() {
        let mut message = encode(&[named("bob")]).remove(0);
        // Same length, another user's id in the record.
        message[MAGIC.len() + 3..MAGIC.len() + 19].copy_from_slice(&user("eve").to_bytes());
        assert_eq!(
            decode(&message),
            Err(ContactBookError::NameOfAnother(user("eve")))
        );
    }

    #[test]
    fn a_name_without_its_domain_is_refused() {
        let mut message = encode(&[named("bob")]).remove(0);
        // `bob@a.example` cut to `bob`: the length byte and the bytes after it.
        let at = MAGIC.len() + 2 + 1 + 16;
        message[at] = 3;
        message.truncate(at + 4);
        assert_eq!(decode(&message), Err(ContactBookError::BadName));
        // The right user, its domain written in capitals: one user, one way to write it.
        let upper = ContactRecord::Named {
            user: UserId::of("bob", "a.example"),
            name: "bob@A.example".into(),
        };
        assert_eq!(upper.check(), Err(ContactBookError::BadName));
    }

    #[test]
    fn truncated_and_trailing_messages_are_refused() {
        let message = encode(&[
            named("bob"),
            ContactRecord::Unverified {
                user: user("carol"),
            },
        ])
        .remove(0);
        for cut in 0..message.len() {
            assert!(decode(&message[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = message.clone();
        longer.push(0);
        assert_eq!(decode(&longer), Err(ContactBookError::Trailing(1)));
        let mut other = message;
        other[MAGIC.len() + 2] = 9;
        assert_eq!(decode(&other), Err(ContactBookError::Tag(9)));
    }

    #[test]
    fn the_later_record_wins() {
        let bob = user("bob");
        let keys: BTreeSet<_> = [DevicePublicKey([1; 32])].into();
        let mut book = ContactBook::default();
        assert!(book.apply(&ContactRecord::Verified {
            user: bob,
            keys: keys.clone()
        }));
        assert!(!book.apply(&ContactRecord::Verified { user: bob, keys }));
        assert!(book.apply(&ContactRecord::Unverified { user: bob }));
        assert!(book.verified.is_empty());
        assert!(!book.apply(&ContactRecord::Unverified { user: bob }));
    }

    #[test]
    fn wire_format_snapshot() {
        let records = [
            named("bob"),
            ContactRecord::Verified {
                user: user("bob"),
                keys: [DevicePublicKey([7; 32])].into(),
            },
            ContactRecord::Unverified {
                user: user("carol"),
            },
        ];
        insta::assert_snapshot!(crate::hex::encode(&encode(&records)[0]));
    }
}
