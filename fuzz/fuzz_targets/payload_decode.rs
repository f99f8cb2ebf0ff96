//! `payload_decode`: the CBOR payload decoders behind every opcode, reached without first having
//! to forge a valid 128-byte header, so the fuzzer spends its time inside minicbor and the
//! payload limits. Must never panic; whatever decodes must round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../checks/wire.rs");

fuzz_target!(|data: &[u8]| check_payload_decode(data));
