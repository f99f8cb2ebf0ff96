//! `certificate_decode`: a device certificate arrives from a peer (at hello, in a registration
//! reply) or from disk and reaches `DeviceCertificate::decode` before any signature check, so
//! arbitrary bytes there must never panic, and whatever decodes must re-encode to exactly the
//! same bytes (the encoding is signed byte for byte, so it must be canonical).
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../checks/trust.rs");

fuzz_target!(|data: &[u8]| check_certificate_decode(data));
