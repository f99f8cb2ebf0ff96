//! `frame_decode`: every frame a peer sends reaches `FrameHeader::parse` and `Frame::decode`
//! first, so arbitrary bytes there must never panic, and whatever decodes must survive
//! encode → decode unchanged (the gateway re-encodes what it relays).
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../checks/wire.rs");

fuzz_target!(|data: &[u8]| check_frame_decode(data));
