use zerocopy::byteorder::big_endian::{U128, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{Opcode, WireError, FLAGS_KNOWN, PAYLOAD_BYTES_MAX};

/// Size of every frame header in bytes.
pub const HEADER_BYTES: usize = 128;
/// "SUND" read as a big-endian u32.
pub const MAGIC: u32 = 0x5355_4E44;
/// The protocol version this build speaks.
pub const VERSION: u8 = 1;

/// The 128-byte frame header exactly as it lies on the wire (big-endian, unaligned).
///
/// Read it in place with [`FrameHeader::parse`], which validates before it hands out a reference;
/// the byte table is in the [`crate::wire`] module documentation.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, PartialEq, Eq)]
#[repr(C)]
pub struct FrameHeader {
    magic: U32,
    version: u8,
    flags: u8,
    opcode: U16,
    payload_len: U32,
    reserved: U32,
    conversation_id: U128,
    sender: U128,
    seq: U64,
    epoch: U64,
    signature: [u8; 64],
}

const _: () = assert!(core::mem::size_of::<FrameHeader>() == HEADER_BYTES);

impl FrameHeader {
    /// A header for `opcode` with the given routing fields and payload length; no signature.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        opcode: Opcode,
        flags: u8,
        conversation_id: u128,
        sender: u128,
        seq: u64,
        epoch: u64,
        payload_len: u32,
        signature: [u8; 64],
    ) -> FrameHeader {
        assert!(flags & !FLAGS_KNOWN == 0, "unknown flag bits");
        assert!(payload_len <= PAYLOAD_BYTES_MAX, "payload over the limit");
        FrameHeader {
            magic: U32::new(MAGIC),
            version: VERSION,
            flags,
            opcode: U16::new(opcode.to_u16()),
            payload_len: U32::new(payload_len),
            reserved: U32::new(0),
            conversation_id: U128::new(conversation_id),
            sender: U128::new(sender),
            seq: U64::new(seq),
            epoch: U64::new(epoch),
            signature,
        }
    }

    /// Validates the first 128 bytes of `bytes` and returns the header in place (no copy).
    ///
    /// Checks, in order: length, magic, version, flags, reserved word, opcode, payload length
    /// against `payload_bytes_max`. Does not look at the payload.
    pub fn parse(bytes: &[u8], payload_bytes_max: u32) -> Result<&FrameHeader, WireError> {
        let Ok((header, _rest)) = FrameHeader::ref_from_prefix(bytes) else {
            return Err(WireError::TruncatedHeader {
                got: bytes.len(),
                needed: HEADER_BYTES,
            });
        };
        header.validate(payload_bytes_max)?;
        Ok(header)
    }

    fn validate(&self, payload_bytes_max: u32) -> Result<(), WireError> {
        let magic = self.magic.get();
        if magic != MAGIC {
            return Err(WireError::BadMagic { found: magic });
        }
        if self.version != VERSION {
            return Err(WireError::UnsupportedVersion {
                found: self.version,
                supported: VERSION,
            });
        }
        if self.flags & !FLAGS_KNOWN != 0 {
            return Err(WireError::UnknownFlags {
                found: self.flags,
                known: FLAGS_KNOWN,
            });
        }
        let reserved = self.reserved.get();
        if reserved != 0 {
            return Err(WireError::ReservedNotZero { found: reserved });
        }
        Opcode::from_u16(self.opcode.get())?;
        let declared = self.payload_len.get();
        let max = payload_bytes_max.min(PAYLOAD_BYTES_MAX);
        if declared > max {
            return Err(WireError::PayloadTooLarge { declared, max });
        }
        Ok(())
    }

    /// The opcode. Only valid headers exist outside this module, so this cannot fail.
    pub fn opcode(&self) -> Opcode {
        Opcode::from_u16(self.opcode.get()).expect("validated header has a known opcode")
    }

    /// Flag bits.
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// Payload length in bytes.
    pub fn payload_len(&self) -> u32 {
        self.payload_len.get()
    }

    /// Routing: conversation id (0 if none).
    pub fn conversation_id(&self) -> u128 {
        self.conversation_id.get()
    }

    /// Routing: originating device (0 if none).
    pub fn sender(&self) -> u128 {
        self.sender.get()
    }

    /// Routing: sequence number (0 if none).
    pub fn seq(&self) -> u64 {
        self.seq.get()
    }

    /// Routing: MLS epoch (0 if none).
    pub fn epoch(&self) -> u64 {
        self.epoch.get()
    }

    /// The signature field.
    pub fn signature(&self) -> &[u8; 64] {
        &self.signature
    }

    /// The header's 128 wire bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out.copy_from_slice(self.as_bytes());
        out
    }
}

impl core::fmt::Debug for FrameHeader {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FrameHeader")
            .field("magic", &format_args!("{:#010x}", self.magic.get()))
            .field("version", &self.version)
            .field("flags", &self.flags)
            .field("opcode", &Opcode::from_u16(self.opcode.get()))
            .field("payload_len", &self.payload_len.get())
            .field(
                "conversation_id",
                &format_args!("{:#x}", self.conversation_id.get()),
            )
            .field("sender", &format_args!("{:#x}", self.sender.get()))
            .field("seq", &self.seq.get())
            .field("epoch", &self.epoch.get())
            .finish_non_exhaustive()
    }
}
