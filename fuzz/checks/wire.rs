// Checks for the wire-format fuzz targets, shared by `fuzz/fuzz_targets/{frame,payload,stream}_decode.rs`
// and `model/tests/corpus_replay.rs` through `include!`, so the committed corpora are replayed by
// `cargo test` with exactly the checks the fuzzer ran. Plain (non-doc) comments only: this file is
// spliced into other files. It names the model crate by path only (`sund_model::...`).

/// Decode, re-encode, decode again: the frame must come back equal, and its encoding must be a
/// fixed point (encoding the re-decoded frame gives the same bytes).
#[allow(dead_code)]
fn check_frame_round_trip(frame: &sund_model::wire::Frame) {
    use sund_model::wire::{Frame, PAYLOAD_BYTES_MAX};
    let encoded = frame.encode();
    let again = Frame::decode(&encoded, PAYLOAD_BYTES_MAX)
        .unwrap_or_else(|e| panic!("re-encoded frame does not decode: {e}; frame {frame:?}"));
    assert_eq!(&again, frame, "frame changed in a round trip");
    assert_eq!(again.encode(), encoded, "encoding is not stable");
}

/// `frame_decode`: arbitrary bytes as one whole frame.
#[allow(dead_code)]
pub fn check_frame_decode(data: &[u8]) {
    use sund_model::wire::{Frame, FrameHeader, HEADER_BYTES, PAYLOAD_BYTES_MAX};
    if let Ok(header) = FrameHeader::parse(data, PAYLOAD_BYTES_MAX) {
        assert!(data.len() >= HEADER_BYTES);
        assert!(header.payload_len() <= PAYLOAD_BYTES_MAX);
        assert_eq!(
            header.to_bytes()[..],
            data[..HEADER_BYTES],
            "header bytes changed"
        );
        let _ = format!("{header:?}");
    }
    match Frame::decode(data, PAYLOAD_BYTES_MAX) {
        Ok(frame) => check_frame_round_trip(&frame),
        Err(error) => {
            let _ = error.to_string();
        }
    }
}

/// `payload_decode`: two bytes pick an opcode from `Opcode::ALL`, the rest is its CBOR payload.
#[allow(dead_code)]
pub fn check_payload_decode(data: &[u8]) {
    use sund_model::wire::{Opcode, Payload};
    if data.len() < 2 {
        return;
    }
    let index = usize::from(u16::from_be_bytes([data[0], data[1]])) % Opcode::ALL.len();
    let opcode = Opcode::ALL[index];
    let rest = &data[2..];
    match Payload::decode(opcode, rest) {
        Ok(payload) => {
            assert_eq!(
                payload.opcode(),
                opcode,
                "payload decoded under another opcode"
            );
            let mut encoded = Vec::new();
            payload.encode(&mut encoded);
            let again = Payload::decode(opcode, &encoded).unwrap_or_else(|e| {
                panic!("re-encoded payload does not decode: {e}; payload {payload:?}")
            });
            assert_eq!(again, payload, "payload changed in a round trip");
            let mut encoded_again = Vec::new();
            again.encode(&mut encoded_again);
            assert_eq!(encoded_again, encoded, "payload encoding is not stable");
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
}

/// `stream_decode`: the first byte is a chunk size (at least 1); the rest is pushed chunk by chunk
/// into a `FrameDecoder`, draining `next_frame` after each push and stopping at the first error.
/// Each frame must equal `Frame::decode` of exactly the bytes it consumed, and round-trip.
#[allow(dead_code)]
pub fn check_stream_decode(data: &[u8]) {
    use sund_model::wire::{Frame, FrameDecoder, PAYLOAD_BYTES_MAX};
    let Some((&size, stream)) = data.split_first() else {
        return;
    };
    let size = usize::from(size).max(1);
    let mut decoder = FrameDecoder::new(PAYLOAD_BYTES_MAX);
    let mut pushed = 0usize;
    let mut consumed = 0usize;
    for chunk in stream.chunks(size) {
        decoder.push(chunk);
        pushed += chunk.len();
        assert_eq!(
            decoder.buffered(),
            pushed - consumed,
            "decoder lost or invented bytes"
        );
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    let start = consumed;
                    consumed = pushed - decoder.buffered();
                    assert!(consumed > start, "a frame consumed no bytes");
                    let whole = Frame::decode(&stream[start..consumed], PAYLOAD_BYTES_MAX)
                        .unwrap_or_else(|e| {
                            panic!("stream frame does not decode on its own: {e}; {frame:?}")
                        });
                    assert_eq!(whole, frame, "stream and whole-frame decoding disagree");
                    check_frame_round_trip(&frame);
                }
                Ok(None) => {
                    assert_eq!(
                        decoder.buffered(),
                        pushed - consumed,
                        "decoder consumed bytes without returning a frame"
                    );
                    break;
                }
                Err(error) => {
                    let _ = error.to_string();
                    return;
                }
            }
        }
    }
}
