//! `backup_decode`: a device backup comes from wherever its owner kept it, so arbitrary bytes
//! must never panic the sealed header, the segment reader or the entries' decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../checks/backup.rs");

fuzz_target!(|data: &[u8]| check_backup_decode(data));
