//! Content-defined chunk boundaries (FastCDC 2020, normalisation level 1), keyed by the file
//! secret.

use core::ops::Range;

use fastcdc::v2020::{FastCDC, Normalization, StreamCDC};

use super::{FileSecret, CHUNK_BYTES_AVG, CHUNK_BYTES_MAX, CHUNK_BYTES_MIN};

const NORMALIZATION: Normalization = Normalization::Level1;

/// The chunks of `data` under `secret`, in order, covering it exactly (none for empty data).
/// The same bytes under the same secret always cut the same way, in memory or streamed.
pub fn chunk_ranges<'a>(
    secret: &FileSecret,
    data: &'a [u8],
) -> impl Iterator<Item = Range<usize>> + 'a {
    FastCDC::with_level_and_seed(
        data,
        CHUNK_BYTES_MIN,
        CHUNK_BYTES_AVG,
        CHUNK_BYTES_MAX,
        NORMALIZATION,
        secret.gear_seed(),
    )
    .map(|chunk| chunk.offset..chunk.offset + chunk.length)
}

/// A chunker that reads `source` as it goes, holding at most [`CHUNK_BYTES_MAX`] bytes: the
/// node streams files of any size through it. Cuts exactly where [`chunk_ranges`] would.
pub fn stream_chunker<R: std::io::Read>(secret: &FileSecret, source: R) -> StreamCDC<R> {
    StreamCDC::with_level_and_seed(
        source,
        CHUNK_BYTES_MIN,
        CHUNK_BYTES_AVG,
        CHUNK_BYTES_MAX,
        NORMALIZATION,
        secret.gear_seed(),
    )
}
