//! `pairing_code_parse`: a pairing code arrives from a QR code or a paste on a new device, so
//! `PairingCode::from_text` must refuse anything that is not a code without panicking, and a
//! code that parses must print and parse back to the same code.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../checks/trust.rs");

fuzz_target!(|data: &[u8]| check_pairing_code_parse(data));
