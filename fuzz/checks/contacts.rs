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
