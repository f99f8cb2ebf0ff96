//! Files: a manifest plus sealed, content-defined chunks.
//!
//! A file is cut into chunks where its content says (FastCDC with a gear table keyed by the
//! file secret), so inserting a byte moves only the chunk around it, not every later block as
//! fixed-size blocks would. Each chunk is sealed on its own (AES-256-GCM) under a key derived
//! from the file secret and the chunk's plaintext BLAKE3 hash, and stored by the gateway under
//! an id derived the same way. The manifest — name, size, the secret and each chunk's plaintext
//! hash and length — travels inside the conversation's MLS messages, so only
//! members can read it.
//!
//! Why keys and ids come from the *content* under a *secret*:
//! - the same chunk sealed twice under one secret is the same ciphertext under the same id, so
//!   sending a file (or an edited version of it) again uploads only the chunks the gateway does
//!   not already hold;
//! - a device keeps one secret per conversation it sends files into ([`FileSecret`]), so the
//!   same file in two conversations gives unrelated ids and ciphertexts, and different chunk
//!   boundaries, so the gateway cannot match chunks or chunk lengths across conversations
//!   (each sealed chunk is also padded with Padmé, which leaks at most O(log log n) bits of its
//!   length). What still shows: an upload's total, within about 3 % of the file's size. And
//!   the boundaries are keyed only by fastcdc's 64-bit seed XORed into its public gear table:
//!   enough to make cuts differ, not a cryptographic keying;
//! - a receiver keeps a store of plaintext chunks by hash and fetches only the chunks it lacks.
//!
//! Nothing here does I/O: the node streams a file through [`stream_chunker`] and
//! [`ManifestBuilder`] in bounded memory; the simulator uses [`seal_file`] on bytes in memory.

mod chunking;
mod manifest;
mod message;
mod sealing;
mod secret;

#[cfg(test)]
pub(crate) mod tests;

pub use chunking::{chunk_ranges, stream_chunker, StreamChunker, CHUNKER_BLOCK_BYTES};
pub use manifest::{
    seal_file, ChunkEntry, FileId, FileName, FileNameError, Manifest, ManifestBuilder,
    ManifestDigest, ManifestError, MANIFEST_BYTES_MAX,
};
pub use message::{FileMessage, UploadId, FILE_MESSAGE_MAGIC};
pub use sealing::{
    open_chunk, padded_len, seal_chunk, seal_chunk_in_place, sealed_len, ChunkError, SealedChunk,
};
pub use secret::{ChunkId, ContentHash, FileSecret};

/// Smallest chunk the chunker cuts (the last chunk of a file may be shorter).
pub const CHUNK_BYTES_MIN: usize = 256 * 1024;
/// The chunk size the chunker aims at.
pub const CHUNK_BYTES_AVG: usize = 1024 * 1024;
/// Largest chunk the chunker cuts, and the largest a manifest may name.
pub const CHUNK_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Most chunks one manifest names, so that a manifest fits in one frame (36 bytes each).
pub const CHUNKS_MAX: usize = 16_384;
/// Largest file Sund moves today: about 8,000 chunks at the average size, half of
/// [`CHUNKS_MAX`]. Content that cuts far below the average (at worst every chunk at
/// [`CHUNK_BYTES_MIN`]: 32,768 chunks) is refused with `TooManyChunks`, not cut further.
pub const FILE_BYTES_MAX: u64 = 8 << 30;
/// Longest file name, in bytes of UTF-8.
pub const FILE_NAME_BYTES_MAX: usize = 255;
