//! `admin_request_decode`: a request on the running gateway's control socket comes from a local
//! process, so arbitrary bytes must never panic its decoder or the check of the request.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../checks/admin.rs");

fuzz_target!(|data: &[u8]| check_admin_request_decode(data));
