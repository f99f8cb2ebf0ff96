//! The wire format: a fixed 128-byte big-endian header, then a CBOR payload.
//!
//! ```text
//! offset size field            notes
//!      0    4 magic            0x53554E44 ("SUND")
//!      4    1 version          1
//!      5    1 flags            bit 0: SIGNED (signature field is meaningful); other bits must be 0
//!      6    2 opcode           see `Opcode`; unknown opcodes are rejected
//!      8    4 payload_len      bytes of CBOR payload after the header, <= payload_bytes_max
//!     12    4 reserved         must be 0 (room for a later version)
//!     16   16 conversation_id  routing: the conversation a frame belongs to, 0 if none
//!     32   16 sender           routing: the device that originated the frame, 0 if none
//!     48    8 seq              the authority-assigned sequence number, 0 if none
//!     56    8 epoch            the MLS epoch the frame belongs to, 0 if none
//!     64   64 signature        Ed25519 signature where a frame must verify on its own, else 0
//! ```
//!
//! Decoding validates magic, version, flags, reserved bits, opcode and length before it looks at
//! the payload and never panics; each rejection has its own [`WireError`] variant.

mod error;
pub mod files;
mod frame;
mod header;
mod opcode;
pub mod payload;
pub mod presence;

pub use error::WireError;
pub use frame::{Frame, FrameDecoder, Routing};
pub use header::{FrameHeader, HEADER_BYTES, MAGIC, VERSION};
pub use opcode::Opcode;
pub use payload::Payload;

/// The largest payload any frame may carry (1 MiB). Connections may set a lower limit.
pub const PAYLOAD_BYTES_MAX: u32 = 1 << 20;

/// Header flag: the 64-byte signature field carries a signature over the frame.
pub const FLAG_SIGNED: u8 = 0b0000_0001;

/// Every flag bit this version understands; frames with other bits set are rejected.
pub const FLAGS_KNOWN: u8 = FLAG_SIGNED;
