//! `contact_records_decode`: contact-book records come from the user's other devices inside an
//! MLS message and become lines of the device's files, so arbitrary bytes must never panic
//! `contact_book::decode`, and whatever decodes must be canonical and hold only valid names
//! and marks.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../checks/contacts.rs");

fuzz_target!(|data: &[u8]| check_contact_records_decode(data));
