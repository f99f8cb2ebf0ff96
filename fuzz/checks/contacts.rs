// Checks for the `contact_records_decode` fuzz target, shared with `model/tests/corpus_replay.rs`
// through `include!`. Plain (non-doc) comments only: this file is spliced into other files.
//
// Contact-book records arrive from the user's other devices inside MLS messages and become
// lines of the device's files: decoding must never panic, whatever decodes must be canonical
// (encoding it again gives exactly the input, as one message), every name must be a user name
// and its user's, and every verification mark must hold 1 to KEYS_MAX keys.

/// `contact_records_decode`: arbitrary bytes to `contact_book::decode`.
#[allow(dead_code)]
pub fn check_contact_records_decode(data: &[u8]) {
    use sund_model::node::contact_book::{
        check_name, decode, encode, ContactBook, ContactRecord, KEYS_MAX, MESSAGE_BYTES_MAX,
        RECORDS_MAX,
    };
    match decode(data) {
        Ok(records) => {
            assert!(!records.is_empty() && records.len() <= RECORDS_MAX);
            assert!(data.len() <= MESSAGE_BYTES_MAX);
            for record in &records {
                match record {
                    ContactRecord::Named { user, name } => {
                        assert_eq!(check_name(*user, name), Ok(()), "a bad name decoded")
                    }
                    ContactRecord::Verified { keys, .. } => {
                        assert!(!keys.is_empty() && keys.len() <= KEYS_MAX)
                    }
                    ContactRecord::Unverified { .. } => {}
                }
            }
            assert_eq!(encode(&records), vec![data.to_vec()], "not canonical");
            let mut book = ContactBook::default();
            for record in &records {
                book.apply(record);
            }
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
}

/// `roster_decode`: arbitrary bytes to `told_names::decode_roster` (rosters of members'
/// addresses arrive from any member inside MLS messages and become rows of the device's
/// store): no panic, at most ROSTER_NAMES_MAX entries, a roster of valid addresses is
/// canonical, and only addresses that hash to a member's user id are learnt.
#[allow(dead_code)]
pub fn check_roster_decode(data: &[u8]) {
    use sund_model::node::told_names::{
        address_told, decode_roster, encode_roster, ToldNames, ROSTER_MAGIC, ROSTER_NAMES_MAX,
    };
    let mut body = ROSTER_MAGIC.to_vec();
    body.extend_from_slice(data);
    for bytes in [data, &body[..]] {
        let Some(decoded) = decode_roster(bytes) else {
            continue;
        };
        let Ok(entries) = decoded else {
            continue;
        };
        assert!(entries.len() <= ROSTER_NAMES_MAX);
        let addresses: Vec<_> = entries
            .iter()
            .filter_map(|e| address_told(e, |_| true))
            .collect();
        if addresses.len() == entries.len() {
            assert_eq!(&encode_roster(&addresses)[..], bytes, "not canonical");
        }
        // Only the first valid address's user is a member here.
        let member = addresses.first().map(|a| a.user());
        let mut told = ToldNames::default();
        let mut writes = sund_model::env::WriteBatch::default();
        told.learn(bytes, |u| Some(u) == member, &mut writes);
        assert!(told.all().len() <= 1);
        assert!(told.all().keys().all(|u| Some(*u) == member));
    }
}
