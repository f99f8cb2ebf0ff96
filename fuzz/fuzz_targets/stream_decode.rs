//! `stream_decode`: `FrameDecoder` reassembles frames from a byte stream split at arbitrary
//! points (first input byte = chunk size). It must never panic, never lose or invent bytes, and
//! agree with `Frame::decode` on every frame it returns.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("../checks/wire.rs");

fuzz_target!(|data: &[u8]| check_stream_decode(data));
