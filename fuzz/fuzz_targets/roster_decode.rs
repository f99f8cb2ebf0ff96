//! `roster_decode`: rosters of members' addresses come from any member of a group inside an
//! MLS message and become rows of the device's store, so arbitrary bytes must never panic
//! `told_names::decode_roster`, a roster of valid addresses must be canonical, and only a
//! member's own address may be learnt.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../checks/contacts.rs");

fuzz_target!(|data: &[u8]| check_roster_decode(data));
