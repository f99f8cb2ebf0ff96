//! `manifest_decode`: a file manifest comes from another member inside an MLS message and names
//! a path on the receiver's disk, so arbitrary bytes must never panic `Manifest::decode`, and
//! whatever decodes must be canonical, name one safe path component and add up to its size.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../checks/files.rs");

fuzz_target!(|data: &[u8]| check_manifest_decode(data));
