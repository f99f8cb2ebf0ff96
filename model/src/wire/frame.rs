use bytes::{Bytes, BytesMut};

use super::{
    FrameHeader, Opcode, Payload, WireError, FLAG_SIGNED, HEADER_BYTES, PAYLOAD_BYTES_MAX,
};
use crate::ids::{ConversationId, DeviceId};

/// The header's routing fields, typed. Zero means "none" for each.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Routing {
    /// The conversation the frame belongs to.
    pub conversation: ConversationId,
    /// The device that originated the frame.
    pub sender: DeviceId,
    /// The authority-assigned sequence number.
    pub seq: u64,
    /// The MLS epoch.
    pub epoch: u64,
}

/// A whole decoded frame: routing, optional signature and a typed payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Routing fields from the header.
    pub routing: Routing,
    /// The signature, for frames that must verify on their own.
    pub signature: Option<[u8; 64]>,
    /// The payload; its type fixes the opcode.
    pub payload: Payload,
}

impl Frame {
    /// An unsigned frame.
    pub fn new(routing: Routing, payload: Payload) -> Frame {
        Frame {
            routing,
            signature: None,
            payload,
        }
    }

    /// The opcode, fixed by the payload type.
    pub fn opcode(&self) -> Opcode {
        self.payload.opcode()
    }

    /// Encodes header and payload into one buffer.
    ///
    /// Panics if the payload exceeds [`PAYLOAD_BYTES_MAX`]: callers bound what they put in
    /// (e.g. the node refuses oversized message bodies before they reach a frame).
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(HEADER_BYTES + 64);
        out.resize(HEADER_BYTES, 0);
        self.payload.encode(&mut out);
        let payload_len = out.len() - HEADER_BYTES;
        assert!(
            payload_len <= PAYLOAD_BYTES_MAX as usize,
            "frame payload over PAYLOAD_BYTES_MAX"
        );
        let (flags, signature) = match self.signature {
            Some(sig) => (FLAG_SIGNED, sig),
            None => (0, [0u8; 64]),
        };
        let header = FrameHeader::new(
            self.opcode(),
            flags,
            self.routing.conversation.0,
            self.routing.sender.0,
            self.routing.seq,
            self.routing.epoch,
            payload_len as u32,
            signature,
        );
        out[..HEADER_BYTES].copy_from_slice(&header.to_bytes());
        Bytes::from(out)
    }

    /// Decodes exactly one frame occupying all of `bytes`.
    pub fn decode(bytes: &[u8], payload_bytes_max: u32) -> Result<Frame, WireError> {
        let header = FrameHeader::parse(bytes, payload_bytes_max)?;
        let declared = header.payload_len();
        let body = &bytes[HEADER_BYTES..];
        if body.len() < declared as usize {
            return Err(WireError::TruncatedPayload {
                declared,
                got: body.len(),
            });
        }
        if body.len() > declared as usize {
            return Err(WireError::TrailingBytes {
                extra: body.len() - declared as usize,
            });
        }
        Frame::from_parts(header, body)
    }

    fn from_parts(header: &FrameHeader, body: &[u8]) -> Result<Frame, WireError> {
        debug_assert_eq!(body.len(), header.payload_len() as usize);
        let payload = Payload::decode(header.opcode(), body)?;
        let signature = (header.flags() & FLAG_SIGNED != 0).then(|| *header.signature());
        let routing = Routing {
            conversation: ConversationId(header.conversation_id()),
            sender: DeviceId(header.sender()),
            seq: header.seq(),
            epoch: header.epoch(),
        };
        Ok(Frame {
            routing,
            signature,
            payload,
        })
    }
}

/// Splits a byte stream (a QUIC stream, a TCP connection) into frames.
///
/// Push bytes as they arrive, then call [`FrameDecoder::next_frame`] until it returns `Ok(None)`.
/// A header error is fatal for the stream (it has lost sync); the caller closes it. Memory is
/// bounded by one header plus `payload_bytes_max`.
#[derive(Debug)]
pub struct FrameDecoder {
    buffer: BytesMut,
    payload_bytes_max: u32,
}

impl FrameDecoder {
    /// A decoder that refuses payloads larger than `payload_bytes_max`.
    pub fn new(payload_bytes_max: u32) -> FrameDecoder {
        FrameDecoder {
            buffer: BytesMut::new(),
            payload_bytes_max,
        }
    }

    /// Appends bytes received from the stream.
    pub fn push(&mut self, data: &[u8]) {
        self.buffer.extend_from_slice(data);
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// The next complete frame's bytes, header validated but payload not decoded (a driver that
    /// hands the bytes to a state machine, which decodes them itself). `Ok(None)` if more bytes
    /// are needed.
    pub fn next_frame_bytes(&mut self) -> Result<Option<Bytes>, WireError> {
        if self.buffer.len() < HEADER_BYTES {
            return Ok(None);
        }
        let header = FrameHeader::parse(&self.buffer, self.payload_bytes_max)?;
        let total = HEADER_BYTES + header.payload_len() as usize;
        if self.buffer.len() < total {
            return Ok(None);
        }
        Ok(Some(self.buffer.split_to(total).freeze()))
    }

    /// The next complete frame, decoded; `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        match self.next_frame_bytes()? {
            Some(bytes) => Frame::decode(&bytes, self.payload_bytes_max).map(Some),
            None => Ok(None),
        }
    }
}
