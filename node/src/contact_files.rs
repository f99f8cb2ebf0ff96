//! The contact book in a device's data directory: file `contacts` (the users' addresses the
//! device knows, `name@domain`, one per line) and file `verified` (per line a verified user's id and the device keys
//! compared, in hex), and the records that keep them the same on every device of the user
//! (`sund_model::node::contact_book`, carried in the group of the user's own devices).
//!
//! Both the commands (a name learnt, a user verified) and the running node (records from the
//! user's other devices) write here; each write replaces the file whole (a new file renamed
//! over the old), so a crash leaves one version or the other.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use sund_model::address::Address;
use sund_model::identity::DevicePublicKey;
use sund_model::ids::UserId;
use sund_model::node::contact_book::{ContactBook, ContactRecord};
use sund_runtime::tls::write_private;

/// Records made on this device that have not reached the group of its user's devices yet
/// (the group was not ready): file `contacts.outgoing`, the encoded messages in hex, one per
/// line. Shared the next time a command shares records.
const OUTGOING: &str = "contacts.outgoing";

fn replace(dir: &Path, name: &str, text: &str) -> std::io::Result<()> {
    let new = dir.join(format!("{name}.new"));
    write_private(&new, text.as_bytes())?;
    std::fs::rename(&new, dir.join(name))
}

/// The users this device knows by address, by id (file `contacts`; lines that are not whole
/// addresses are skipped).
pub fn addresses(dir: &Path) -> BTreeMap<UserId, Address> {
    addresses_in(&std::fs::read_to_string(dir.join("contacts")).unwrap_or_default())
}

/// The addresses a `contacts` file's text holds (`name@domain`, one per line), by id.
pub fn addresses_in(text: &str) -> BTreeMap<UserId, Address> {
    text.lines()
        .map(str::trim)
        .filter_map(|line| Address::parse_full(line).ok())
        .map(|address| (address.user(), address))
        .collect()
}

/// The addresses as the contact book holds them (written out whole), by id.
pub fn names(dir: &Path) -> BTreeMap<UserId, String> {
    addresses(dir)
        .into_iter()
        .map(|(user, address)| (user, address.to_string()))
        .collect()
}

/// The users marked verified and their device keys then (file `verified`).
pub fn verified(dir: &Path) -> BTreeMap<UserId, BTreeSet<DevicePublicKey>> {
    verified_in(&std::fs::read_to_string(dir.join("verified")).unwrap_or_default())
}

/// The verified users a `verified` file's text holds.
pub fn verified_in(text: &str) -> BTreeMap<UserId, BTreeSet<DevicePublicKey>> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let user = sund_model::hex::decode_array::<16>(words.next()?)?;
            let keys: Option<BTreeSet<DevicePublicKey>> = words
                .map(|w| sund_model::hex::decode_array::<32>(w).map(DevicePublicKey))
                .collect();
            Some((UserId::from_bytes(user), keys?))
        })
        .collect()
}

/// The book as the two files hold it.
pub fn book(dir: &Path) -> ContactBook {
    ContactBook {
        names: names(dir),
        verified: verified(dir),
    }
}

fn write_names(dir: &Path, names: &BTreeMap<UserId, String>) -> std::io::Result<()> {
    let text: String = names.values().map(|n| format!("{n}\n")).collect();
    replace(dir, "contacts", &text)
}

fn write_verified(
    dir: &Path,
    verified: &BTreeMap<UserId, BTreeSet<DevicePublicKey>>,
) -> std::io::Result<()> {
    let text: String = verified
        .iter()
        .map(|(user, keys)| {
            let mut line = sund_model::hex::encode(&user.to_bytes());
            for key in keys {
                line.push(' ');
                line.push_str(&sund_model::hex::encode(&key.0));
            }
            line.push('\n');
            line
        })
        .collect();
    replace(dir, "verified", &text)
}

/// Applies records to the files; how many changed the book. Only the files that changed are
/// written.
pub fn apply(dir: &Path, records: &[ContactRecord]) -> Result<usize, (PathBuf, std::io::Error)> {
    let mut book = book(dir);
    let before = book.clone();
    let changed = records.iter().filter(|r| book.apply(r)).count();
    if book.names != before.names {
        write_names(dir, &book.names).map_err(|e| (dir.join("contacts"), e))?;
    }
    if book.verified != before.verified {
        write_verified(dir, &book.verified).map_err(|e| (dir.join("verified"), e))?;
    }
    Ok(changed)
}

/// Messages waiting to be shared (see [`OUTGOING`]); a line that is not a contact-book
/// message (the file was damaged or edited) is left out, not sent.
pub fn outgoing(dir: &Path) -> Vec<Vec<u8>> {
    let text = std::fs::read_to_string(dir.join(OUTGOING)).unwrap_or_default();
    text.lines()
        .filter_map(|l| sund_model::hex::decode(l.trim()))
        .filter(|m| sund_model::node::contact_book::decode(m).is_ok())
        .collect()
}

/// Replaces the messages waiting to be shared (none: the file goes).
pub fn set_outgoing(dir: &Path, messages: &[Vec<u8>]) -> Result<(), (PathBuf, std::io::Error)> {
    let path = dir.join(OUTGOING);
    if messages.is_empty() {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err((path, e)),
            _ => Ok(()),
        };
    }
    let text: String = messages
        .iter()
        .map(|m| format!("{}\n", sund_model::hex::encode(m)))
        .collect();
    replace(dir, OUTGOING, &text).map_err(|e| (path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_from_another_device_land_in_the_files_once() {
        let dir = tempfile::tempdir().unwrap();
        let bob = UserId::of("bob", "a.example");
        let keys: BTreeSet<_> = [DevicePublicKey([3; 32])].into();
        let records = [
            ContactRecord::Named {
                user: bob,
                name: "bob@a.example".into(),
            },
            ContactRecord::Verified {
                user: bob,
                keys: keys.clone(),
            },
        ];
        assert_eq!(apply(dir.path(), &records).unwrap(), 2);
        assert_eq!(
            apply(dir.path(), &records).unwrap(),
            0,
            "applied again: no change"
        );
        assert_eq!(
            names(dir.path()).get(&bob).map(String::as_str),
            Some("bob@a.example")
        );
        assert_eq!(verified(dir.path()).get(&bob), Some(&keys));
        apply(dir.path(), &[ContactRecord::Unverified { user: bob }]).unwrap();
        assert!(verified(dir.path()).is_empty());
        assert_eq!(names(dir.path()).len(), 1, "names stay");
        // A line that is not a whole address (a bare name, as older builds wrote) is skipped.
        let text = std::fs::read_to_string(dir.path().join("contacts")).unwrap();
        std::fs::write(dir.path().join("contacts"), format!("carol\n{text}")).unwrap();
        assert_eq!(names(dir.path()).len(), 1);
    }

    #[test]
    fn outgoing_messages_survive_and_go() {
        let dir = tempfile::tempdir().unwrap();
        assert!(outgoing(dir.path()).is_empty());
        let messages = sund_model::node::contact_book::encode(&[ContactRecord::Named {
            user: UserId::of("bob", "a.example"),
            name: "bob@a.example".into(),
        }]);
        set_outgoing(dir.path(), &messages).unwrap();
        assert_eq!(outgoing(dir.path()), messages);
        // A damaged file: what is not a contact-book message is not sent.
        let text = std::fs::read_to_string(dir.path().join(OUTGOING)).unwrap();
        std::fs::write(dir.path().join(OUTGOING), format!("zz\n00ff\n{text}")).unwrap();
        assert_eq!(outgoing(dir.path()), messages);
        set_outgoing(dir.path(), &[]).unwrap();
        assert!(outgoing(dir.path()).is_empty());
        set_outgoing(dir.path(), &[]).unwrap();
    }
}
