//! `crl_decode`: a CRL is pushed by the gateway, fetched on request or read from disk, and
//! reaches `Crl::decode` before its signature is checked, so arbitrary bytes there must never
//! panic (nor allocate for a count the input cannot hold), and whatever decodes must re-encode
//! to exactly the same bytes (signed byte for byte: entries strictly increasing).
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../checks/trust.rs");

fuzz_target!(|data: &[u8]| check_crl_decode(data));
