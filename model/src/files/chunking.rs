//! Content-defined chunk boundaries (FastCDC 2020, normalisation level 1), keyed by the file
//! secret.

use core::ops::Range;
use std::io::Read;

use bytes::Bytes;
use fastcdc::v2020::{FastCDC, Normalization};

use super::{FileSecret, CHUNK_BYTES_AVG, CHUNK_BYTES_MAX, CHUNK_BYTES_MIN};

const NORMALIZATION: Normalization = Normalization::Level1;

/// Bytes a [`StreamChunker`] reads at a time: two maximal chunks. The bytes it carries from
/// one block into the next (less than one maximal chunk) are copied once; a larger block
/// copies less but holds more memory while chunks of it wait to be hashed (with 16 MiB
/// blocks a 1 GiB send peaked at 63 MiB resident, with 8 MiB at 39 MiB, with fastcdc's
/// `StreamCDC` at 29 MiB).
pub const CHUNKER_BLOCK_BYTES: usize = 2 * CHUNK_BYTES_MAX;

fn chunker(gear_seed: u64, data: &[u8]) -> FastCDC<'_> {
    FastCDC::with_level_and_seed(
        data,
        CHUNK_BYTES_MIN,
        CHUNK_BYTES_AVG,
        CHUNK_BYTES_MAX,
        NORMALIZATION,
        gear_seed,
    )
}

/// The chunks of `data` under `secret`, in order, covering it exactly (none for empty data).
/// The same bytes under the same secret always cut the same way, in memory or streamed.
pub fn chunk_ranges<'a>(
    secret: &FileSecret,
    data: &'a [u8],
) -> impl Iterator<Item = Range<usize>> + 'a {
    chunker(secret.gear_seed(), data).map(|chunk| chunk.offset..chunk.offset + chunk.length)
}

/// A chunker that reads `source` as it goes, [`CHUNKER_BLOCK_BYTES`] at a time: the node
/// streams files of any size through it. Cuts exactly where [`chunk_ranges`] would.
pub fn stream_chunker<R: Read>(secret: &FileSecret, source: R) -> StreamChunker<R> {
    StreamChunker {
        gear_seed: secret.gear_seed(),
        source,
        block: Bytes::new(),
        at: 0,
        at_end: false,
        failed: false,
    }
}

/// Chunks of a stream, each a slice of the block it was read into (no copy per chunk): see
/// [`stream_chunker`]. A chunk keeps its block alive, so a caller holding `n` chunks holds at
/// most `n + 1` blocks.
///
/// Why not fastcdc's own `StreamCDC`: it copies every chunk out of its buffer and moves the
/// rest of the buffer forward after each one, which was a tenth of a sender's CPU.
pub struct StreamChunker<R> {
    /// The secret's chunker seed, derived once (the chunker keeps no copy of the secret).
    gear_seed: u64,
    source: R,
    /// The block being cut; `block[at..]` is not cut yet.
    block: Bytes,
    at: usize,
    /// The source has no more bytes after `block`.
    at_end: bool,
    /// A read failed: the stream is over.
    failed: bool,
}

impl<R: Read> StreamChunker<R> {
    /// The next cut of `block[at..]`, if it is final: the same as with every later byte of the
    /// stream in view. A cut depends only on the bytes from its chunk's start and on how many
    /// follow (up to [`CHUNK_BYTES_MAX`]), so it is final once a maximal chunk's worth is in
    /// view, or the stream has ended.
    fn cut(&self) -> Option<usize> {
        let remaining = self.block.len() - self.at;
        if remaining == 0 || (remaining < CHUNK_BYTES_MAX && !self.at_end) {
            return None;
        }
        let (_, end) = chunker(self.gear_seed, &self.block).cut(self.at, remaining);
        debug_assert!(end > self.at && end - self.at <= CHUNK_BYTES_MAX);
        Some(end)
    }

    /// Reads the next block: the bytes not cut yet, then as many more as fit.
    fn refill(&mut self) -> std::io::Result<()> {
        let mut block = Vec::with_capacity(CHUNKER_BLOCK_BYTES);
        block.extend_from_slice(&self.block[self.at..]);
        let want = (CHUNKER_BLOCK_BYTES - block.len()) as u64;
        // `read_to_end` fills spare capacity without zeroing it first, and stops at the limit
        // or at the end of the source.
        (&mut self.source).take(want).read_to_end(&mut block)?;
        self.at_end = block.len() < CHUNKER_BLOCK_BYTES;
        debug_assert!(
            block.capacity() == CHUNKER_BLOCK_BYTES,
            "the block never grows"
        );
        self.block = Bytes::from(block);
        self.at = 0;
        Ok(())
    }
}

impl<R: Read> Iterator for StreamChunker<R> {
    type Item = std::io::Result<Bytes>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let end = match self.cut() {
            Some(end) => end,
            None if self.at_end => return None,
            None => {
                if let Err(e) = self.refill() {
                    self.failed = true;
                    return Some(Err(e));
                }
                self.cut()?
            }
        };
        let chunk = self.block.slice(self.at..end);
        self.at = end;
        Some(Ok(chunk))
    }
}
