//! `federation_entry_decode`: the body of every entry a peer gateway sends on a federation
//! link (relayed messages, sequenced messages, answers, opens) reaches this decoder; it may not
//! panic, and what decodes survives encode → decode unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../checks/federation.rs");

fuzz_target!(|data: &[u8]| check_federation_entry_decode(data));
