use super::Opcode;

/// Why a frame or payload was rejected. Each variant names what was wrong and what to check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer bytes than a header: the peer sent a truncated frame.
    #[error(
        "frame truncated: got {got} bytes, a header needs {needed}; the sender cut the frame short"
    )]
    TruncatedHeader {
        /// Bytes available.
        got: usize,
        /// Bytes a header needs.
        needed: usize,
    },
    /// The header promised more payload than arrived.
    #[error("payload truncated: header says {declared} bytes, only {got} arrived")]
    TruncatedPayload {
        /// Payload length in the header.
        declared: u32,
        /// Bytes that followed the header.
        got: usize,
    },
    /// More bytes than header plus payload: frames must be exactly delimited.
    #[error(
        "{extra} unexpected bytes after the payload; frames must be exactly header + payload_len"
    )]
    TrailingBytes {
        /// Bytes beyond the declared payload.
        extra: usize,
    },
    /// The first four bytes are not "SUND": not a Sund peer, or a desynchronised stream.
    #[error("bad magic {found:#010x}, expected 0x53554E44 (\"SUND\"); the peer does not speak Sund or the stream lost sync")]
    BadMagic {
        /// The magic found.
        found: u32,
    },
    /// A protocol version this build does not speak.
    #[error("unsupported protocol version {found}; this build speaks version {supported}: upgrade the older side")]
    UnsupportedVersion {
        /// Version in the header.
        found: u8,
        /// Version this build speaks.
        supported: u8,
    },
    /// Flag bits this version does not define.
    #[error("unknown flag bits {found:#04x}; this version defines only {known:#04x}")]
    UnknownFlags {
        /// Flags in the header.
        found: u8,
        /// Flags this version knows.
        known: u8,
    },
    /// The reserved header word was not zero.
    #[error("reserved header bytes are {found:#010x}, must be zero in version 1")]
    ReservedNotZero {
        /// The reserved word.
        found: u32,
    },
    /// An opcode this version does not define.
    #[error("unknown opcode {found:#06x}; the peer speaks a newer or different protocol")]
    UnknownOpcode {
        /// Opcode in the header.
        found: u16,
    },
    /// The payload length exceeds the limit.
    #[error("payload of {declared} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge {
        /// Payload length in the header.
        declared: u32,
        /// The limit in force.
        max: u32,
    },
    /// The opcode is reserved for a feature whose payload this version does not define yet.
    #[error("opcode {0:?} is reserved; its payload is not defined in this version")]
    PayloadNotDefined(Opcode),
    /// The CBOR payload did not decode as the opcode's payload type.
    #[error("malformed {opcode:?} payload: {reason}")]
    MalformedPayload {
        /// The opcode whose payload failed.
        opcode: Opcode,
        /// What the CBOR decoder reported.
        reason: String,
    },
    /// A byte string in the payload is longer than its named maximum.
    #[error("{field} is {len} bytes, more than the maximum of {max}")]
    BytesTooLong {
        /// Which field.
        field: &'static str,
        /// Bytes found.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// A list in the payload is longer than its named maximum.
    #[error("{field} holds {len} entries, more than the maximum of {max}")]
    ListTooLong {
        /// Which field.
        field: &'static str,
        /// Entries found.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// A frame's payload type did not match its opcode (a bug in the sender).
    #[error("payload is {payload:?} but header opcode is {opcode:?}")]
    OpcodeMismatch {
        /// Opcode in the header.
        opcode: Opcode,
        /// Opcode the payload belongs to.
        payload: Opcode,
    },
}
