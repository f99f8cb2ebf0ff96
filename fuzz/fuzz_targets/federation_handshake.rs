//! `federation_handshake`: what any host that connects to a gateway's federation port can
//! send before it is authenticated — a gateway certificate and the three handshake messages —
//! reaches the decoders and the signature checks; none may panic, and no forged bytes may
//! complete a handshake.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../checks/federation.rs");

fuzz_target!(|data: &[u8]| check_federation_handshake(data));
