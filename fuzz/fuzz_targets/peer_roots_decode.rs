//! `peer_roots_decode`: the set of peer roots a gateway vouches for reaches a device in its
//! `HelloOk` and is read back from the device's store, and reaches `PeerRoots::decode` before
//! its signature is checked, so arbitrary bytes there must never panic (nor allocate for a
//! count the input cannot hold), and whatever decodes must re-encode to exactly the same bytes
//! (signed byte for byte: domains strictly increasing).
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../checks/trust.rs");

fuzz_target!(|data: &[u8]| check_peer_roots_decode(data));
