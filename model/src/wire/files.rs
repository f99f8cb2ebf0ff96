//! Payloads of file transfers (opcodes `0x05xx`).
//!
//! Two planes (see ARCHITECTURE.md, "Files"):
//! - the *control plane* travels in the message stream like every other frame: open an upload
//!   and hear which chunks the gateway still lacks ([`UploadOpen`], [`UploadStatus`]), hear that
//!   a chunk is durable ([`ChunkAck`]), ask for chunks ([`ChunkRequest`]), say a file is
//!   fetched ([`FileFetched`]), hear which asked-for chunks cannot come
//!   ([`ChunksUnavailable`]);
//! - *chunk bytes* travel on QUIC streams of their own, one chunk per stream, so that a large
//!   file never queues in front of messages: a frame whose payload is a [`ChunkHead`] (bounded
//!   like any frame), then exactly `len` bytes of sealed chunk. The bytes are not CBOR and not
//!   part of the frame, so a 4 MiB chunk needs no larger frame limit, and a receiver knows the
//!   length it commits to reading before it reads it ([`ChunkHead::check_len`]).
//!
//! The same head and bytes will serve a direct device-to-device path later: whoever holds a
//! chunk can answer a request with it.
//!
//! Routing: every file frame names its conversation in the header.

use minicbor::{Decode, Encode};

use crate::files::{sealed_len, ChunkId, CHUNKS_MAX, CHUNK_BYTES_MAX};

/// Most chunk ids one [`ChunkRequest`] may name (a receiver asks again for more).
pub const CHUNK_REQUEST_IDS_MAX: usize = 256;

/// The largest sealed chunk a chunk stream may carry: the largest chunk, padded and tagged.
pub fn sealed_chunk_bytes_max() -> u32 {
    u32::try_from(sealed_len(CHUNK_BYTES_MAX)).expect("a few MiB fits in u32")
}

/// One chunk as an upload lists it: its id and its sealed length.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct ListedChunkWire {
    /// The chunk id (see `files::ChunkId`).
    #[n(0)]
    #[cbor(with = "minicbor::bytes")]
    pub id: [u8; 32],
    /// Its sealed length in bytes.
    #[n(1)]
    pub len: u32,
}

/// Node → gateway: open (or reopen, to resume) an upload into the header's conversation. The
/// gateway answers [`UploadStatus`] with what it still lacks.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct UploadOpen {
    /// The upload's id, random, chosen by the uploading device and kept until it completes.
    #[n(0)]
    #[cbor(with = "minicbor::bytes")]
    pub upload: [u8; 16],
    /// The file's distinct chunks (at most `files::CHUNKS_MAX`).
    #[n(1)]
    pub chunks: Vec<ListedChunkWire>,
}

/// Gateway → node: the chunks an upload still lacks, in the order listed. Empty: every chunk
/// is durable here, and the manifest may be sent.
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct UploadStatus {
    /// The upload.
    #[n(0)]
    #[cbor(with = "minicbor::bytes")]
    pub upload: [u8; 16],
    /// Ids still awaited.
    #[n(1)]
    pub missing: Vec<minicbor::bytes::ByteArray<32>>,
}

/// The frame that opens a chunk stream; exactly `len` bytes of sealed chunk follow it.
///
/// Node → gateway, the chunk belongs to `upload`; gateway → node, it answers a
/// [`ChunkRequest`] for `upload`.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct ChunkHead {
    /// The upload the chunk belongs to.
    #[n(0)]
    #[cbor(with = "minicbor::bytes")]
    pub upload: [u8; 16],
    /// The chunk id.
    #[n(1)]
    #[cbor(with = "minicbor::bytes")]
    pub id: [u8; 32],
    /// Sealed bytes that follow the frame.
    #[n(2)]
    pub len: u32,
}

impl ChunkHead {
    /// The id, typed.
    pub fn chunk_id(&self) -> ChunkId {
        ChunkId(self.id)
    }

    /// Checks that `len` is a length a sealed chunk can have, before any of it is read.
    pub fn check_len(&self) -> Result<(), super::WireError> {
        let max = sealed_chunk_bytes_max();
        if self.len == 0 || self.len > max {
            return Err(super::WireError::BytesTooLong {
                field: "chunk.len",
                len: self.len as usize,
                max: max as usize,
            });
        }
        Ok(())
    }
}

/// Gateway → node: the chunk `id` of `upload` is durable here (released by its commit).
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct ChunkAck {
    /// The upload.
    #[n(0)]
    #[cbor(with = "minicbor::bytes")]
    pub upload: [u8; 16],
    /// The chunk now stored.
    #[n(1)]
    #[cbor(with = "minicbor::bytes")]
    pub id: [u8; 32],
}

/// Node → gateway: send me these chunks of `upload` (each comes back on a chunk stream, or as
/// an `Error` with code `ChunkUnavailable` naming it).
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct ChunkRequest {
    /// The upload the manifest named.
    #[n(0)]
    #[cbor(with = "minicbor::bytes")]
    pub upload: [u8; 16],
    /// The ids wanted (at most [`CHUNK_REQUEST_IDS_MAX`]).
    #[n(1)]
    pub ids: Vec<minicbor::bytes::ByteArray<32>>,
}

/// Gateway → node: chunks of a [`ChunkRequest`] the gateway cannot send: never stored, gone
/// with their upload, or found damaged at rest (then the uploader is asked for them again, and
/// a later request may succeed).
#[derive(Encode, Decode, Clone, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct ChunksUnavailable {
    /// The upload the request named.
    #[n(0)]
    #[cbor(with = "minicbor::bytes")]
    pub upload: [u8; 16],
    /// The ids it cannot send (at most [`CHUNK_REQUEST_IDS_MAX`]).
    #[n(1)]
    pub ids: Vec<minicbor::bytes::ByteArray<32>>,
}

/// Node → gateway: this device holds every chunk of `upload` (verified); the gateway may drop
/// them once every member device has said so.
#[derive(Encode, Decode, Clone, Copy, Debug, PartialEq, Eq)]
#[cbor(map)]
pub struct FileFetched {
    /// The upload.
    #[n(0)]
    #[cbor(with = "minicbor::bytes")]
    pub upload: [u8; 16],
}

/// Most chunks one [`UploadOpen`] or [`UploadStatus`] lists.
pub const UPLOAD_CHUNKS_MAX: usize = CHUNKS_MAX;
