//! The manifest: what a file is (name, size), how to open it (the secret),
//! and its chunks in order. Members receive it inside the conversation's MLS messages.
//!
//! Encoding (big-endian, canonical: one encoding per manifest, so a receipt can sign its
//! digest):
//!
//! ```text
//! "SDF" | format 1 (u8) | size (u64) | secret (32)
//!       | name length (u8) | name (UTF-8) | count (u32) | chunks: hash (32) + length (u32) each
//! ```

use core::fmt;

use crate::codec::Reader;
use crate::hex;

use super::{
    seal_chunk, ChunkId, ContentHash, FileSecret, SealedChunk, CHUNKS_MAX, CHUNK_BYTES_MAX,
    FILE_BYTES_MAX, FILE_NAME_BYTES_MAX,
};

const MAGIC: &[u8; 3] = b"SDF";
const FORMAT: u8 = 1;
const HEAD_BYTES: usize = 3 + 1 + 8 + 32 + 1;
const ENTRY_BYTES: usize = 32 + 4;

/// Longest encoded manifest: a name of the longest kind and [`CHUNKS_MAX`] chunks.
pub const MANIFEST_BYTES_MAX: usize =
    HEAD_BYTES + FILE_NAME_BYTES_MAX + 4 + CHUNKS_MAX * ENTRY_BYTES;

/// One chunk of a file as its manifest names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkEntry {
    /// BLAKE3 of the chunk's plaintext: what a receiver's chunk store looks it up by.
    pub hash: ContentHash,
    /// Plaintext length in bytes.
    pub len: u32,
}

/// Why a file name was refused: a received name becomes a path on the receiver's disk, so it
/// must name one file in the directory it is saved to and nothing else.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FileNameError {
    /// Empty.
    #[error("a file name cannot be empty")]
    Empty,
    /// Longer than [`FILE_NAME_BYTES_MAX`].
    #[error("the file name is {len} bytes; at most {max} are allowed: rename the file")]
    TooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// `.` or `..`.
    #[error("`{0}` is not a file name")]
    Dots(String),
    /// Holds `/` or `\`: a path, which could write outside the directory it is saved to.
    #[error("the file name `{0}` holds a path separator: send the file itself, not a path")]
    Separator(String),
    /// Holds a control character (NUL, newline, escape...) or an invisible formatting one
    /// (a bidirectional override that makes `invoice\u{202E}fdp.exe` read as `invoiceexe.pdf`,
    /// a zero-width space, a line separator).
    #[error("the file name holds a control or invisible formatting character (U+{0:04X}): rename the file")]
    Control(u32),
    /// A character or a form Windows refuses or reads as something else (`:` names an
    /// alternate data stream, `CON` a device, a trailing dot or space is dropped).
    #[error("`{0}` is not a file name every system accepts (no `:*?\"<>|`, no trailing dot or space, not a device name such as CON or LPT1): rename the file")]
    NotPortable(String),
}

/// Invisible formatting characters (Unicode Cf, Zl and Zp) that can disguise a name.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{E0001}'
            | '\u{E0020}'..='\u{E007F}'
    )
}

/// Names Windows reserves for devices, with or without an extension.
fn is_device_name(name: &str) -> bool {
    let stem = name.split('.').next().unwrap_or(name).to_ascii_uppercase();
    matches!(stem.as_str(), "CON" | "PRN" | "AUX" | "NUL")
        || ((stem.starts_with("COM") || stem.starts_with("LPT"))
            && stem.len() == 4
            && stem.as_bytes()[3].is_ascii_digit())
}

/// A file's name: one path component, safe to join to a directory on any platform Sund runs
/// on.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileName(String);

impl FileName {
    /// Checks `name`.
    pub fn new(name: &str) -> Result<FileName, FileNameError> {
        if name.is_empty() {
            return Err(FileNameError::Empty);
        }
        if name.len() > FILE_NAME_BYTES_MAX {
            return Err(FileNameError::TooLong {
                len: name.len(),
                max: FILE_NAME_BYTES_MAX,
            });
        }
        if name == "." || name == ".." {
            return Err(FileNameError::Dots(name.to_string()));
        }
        if name.contains(['/', '\\']) {
            return Err(FileNameError::Separator(name.to_string()));
        }
        if let Some(c) = name.chars().find(|&c| c.is_control() || is_invisible(c)) {
            return Err(FileNameError::Control(u32::from(c)));
        }
        if name.contains([':', '*', '?', '"', '<', '>', '|'])
            || name.ends_with(['.', ' '])
            || is_device_name(name)
        {
            return Err(FileNameError::NotPortable(name.to_string()));
        }
        Ok(FileName(name.to_string()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for FileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for FileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a manifest could not be made or was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Not a manifest of a format this build reads, or cut short.
    #[error("malformed file manifest: {0}")]
    Malformed(&'static str),
    /// Longer than any manifest can be.
    #[error("the file manifest is {len} bytes; at most {max} are allowed")]
    TooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The name is not a safe file name.
    #[error("the file manifest names an unsafe file: {0}")]
    Name(#[from] FileNameError),
    /// The file is larger than Sund moves.
    #[error("the file is {size} bytes; Sund moves files up to {max} bytes today: split it or compress it")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// More chunks than a manifest holds.
    #[error("the file cuts into more than {max} chunks; send a smaller file")]
    TooManyChunks {
        /// The limit.
        max: usize,
    },
    /// A chunk of length zero or longer than [`CHUNK_BYTES_MAX`].
    #[error("chunk {index} is {len} bytes; chunks are 1 to {max} bytes")]
    ChunkLength {
        /// Its index.
        index: usize,
        /// Its length.
        len: u32,
        /// The limit.
        max: usize,
    },
    /// The same chunk hash listed with two lengths: one of them is a lie, and the file could
    /// never be assembled.
    #[error(
        "chunk {index} repeats an earlier chunk's hash with another length: the manifest lies"
    )]
    InconsistentChunk {
        /// The later index.
        index: usize,
    },
    /// The chunks do not add up to the size the manifest states.
    #[error("the manifest says the file is {stated} bytes, its chunks add up to {sum}: it lies about the size")]
    SizeMismatch {
        /// The stated size.
        stated: u64,
        /// The chunks' sum.
        sum: u64,
    },
}

/// The BLAKE3 hash of a manifest's encoding: what a receipt signs, and where [`FileId`] comes
/// from.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ManifestDigest(pub [u8; 32]);

impl fmt::Debug for ManifestDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "manifest:{}…", hex::encode(&self.0[..8]))
    }
}

/// A file's handle for people (`sund file get ID`): the first 8 bytes of its manifest digest.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileId(pub [u8; 8]);

impl FileId {
    /// Reads the 16 hex digits [`FileId`] prints as.
    pub fn parse(text: &str) -> Option<FileId> {
        hex::decode_array(text).map(FileId)
    }
}

impl fmt::Debug for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0))
    }
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A file's manifest. Built by [`ManifestBuilder`] (or [`seal_file`]); received with
/// [`Manifest::decode`], which checks every bound and that the chunks add up to the size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// The name to save it under.
    pub name: FileName,
    /// Its length in bytes.
    pub size: u64,
    /// The secret its chunks are sealed under.
    pub secret: FileSecret,
    /// Its chunks in order.
    pub chunks: Vec<ChunkEntry>,
}

impl Manifest {
    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let name = self.name.as_str().as_bytes();
        let mut out =
            Vec::with_capacity(HEAD_BYTES + name.len() + 4 + self.chunks.len() * ENTRY_BYTES);
        out.extend_from_slice(MAGIC);
        out.push(FORMAT);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(self.secret.as_bytes());
        out.push(u8::try_from(name.len()).expect("a FileName is at most 255 bytes"));
        out.extend_from_slice(name);
        let count = u32::try_from(self.chunks.len()).expect("at most CHUNKS_MAX chunks");
        out.extend_from_slice(&count.to_be_bytes());
        for chunk in &self.chunks {
            out.extend_from_slice(&chunk.hash.0);
            out.extend_from_slice(&chunk.len.to_be_bytes());
        }
        out
    }

    /// Decodes and checks a manifest received from a member.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MANIFEST_BYTES_MAX {
            return Err(ManifestError::TooLong {
                len: bytes.len(),
                max: MANIFEST_BYTES_MAX,
            });
        }
        let truncated = ManifestError::Malformed("truncated");
        let mut reader = Reader::new(bytes);
        if reader.take(3) != Some(&MAGIC[..]) {
            return Err(ManifestError::Malformed("not a Sund file manifest"));
        }
        if reader.u8() != Some(FORMAT) {
            return Err(ManifestError::Malformed("unknown format: upgrade Sund"));
        }
        let size = reader.u64().ok_or(truncated.clone())?;
        let secret = FileSecret::from_bytes(reader.array().ok_or(truncated.clone())?);
        let name_len = usize::from(reader.u8().ok_or(truncated.clone())?);
        let name = reader.take(name_len).ok_or(truncated.clone())?;
        let name = core::str::from_utf8(name)
            .map_err(|_| ManifestError::Malformed("the file name is not UTF-8"))?;
        let name = FileName::new(name)?;
        let count = reader.u32().ok_or(truncated.clone())? as usize;
        if count > CHUNKS_MAX {
            return Err(ManifestError::TooManyChunks { max: CHUNKS_MAX });
        }
        if reader.remaining() != count * ENTRY_BYTES {
            return Err(ManifestError::Malformed(
                "the chunk list is not as long as its count says",
            ));
        }
        let mut chunks = Vec::with_capacity(count);
        for _ in 0..count {
            let hash = ContentHash(reader.array().ok_or(truncated.clone())?);
            let len = reader.u32().ok_or(truncated.clone())?;
            chunks.push(ChunkEntry { hash, len });
        }
        debug_assert_eq!(reader.remaining(), 0);
        let manifest = Manifest {
            name,
            size,
            secret,
            chunks,
        };
        manifest.check()?;
        Ok(manifest)
    }

    /// Checks the bounds and that the chunks add up to the size.
    fn check(&self) -> Result<(), ManifestError> {
        if self.size > FILE_BYTES_MAX {
            return Err(ManifestError::TooLarge {
                size: self.size,
                max: FILE_BYTES_MAX,
            });
        }
        if self.chunks.len() > CHUNKS_MAX {
            return Err(ManifestError::TooManyChunks { max: CHUNKS_MAX });
        }
        let mut sum = 0u64;
        let mut lengths = std::collections::BTreeMap::new();
        for (index, chunk) in self.chunks.iter().enumerate() {
            if *lengths.entry(chunk.hash).or_insert(chunk.len) != chunk.len {
                return Err(ManifestError::InconsistentChunk { index });
            }
            if chunk.len == 0 || chunk.len as usize > CHUNK_BYTES_MAX {
                return Err(ManifestError::ChunkLength {
                    index,
                    len: chunk.len,
                    max: CHUNK_BYTES_MAX,
                });
            }
            sum += u64::from(chunk.len);
        }
        if sum != self.size {
            return Err(ManifestError::SizeMismatch {
                stated: self.size,
                sum,
            });
        }
        Ok(())
    }

    /// The digest of the encoding.
    pub fn digest(&self) -> ManifestDigest {
        ManifestDigest(*blake3::hash(&self.encode()).as_bytes())
    }

    /// The handle people use for it.
    pub fn id(&self) -> FileId {
        FileId(self.digest().0[..8].try_into().expect("8 bytes"))
    }

    /// The id the gateway stores chunk `index` under.
    pub fn chunk_id(&self, index: usize) -> ChunkId {
        self.secret.chunk_id(&self.chunks[index].hash)
    }

    /// Bytes the gateway stores for this file: each distinct chunk once, sealed.
    pub fn sealed_bytes(&self) -> u64 {
        let mut ids: Vec<(ChunkId, u32)> = (0..self.chunks.len())
            .map(|i| (self.chunk_id(i), self.chunks[i].len))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.iter()
            .map(|&(_, len)| super::sealed_len(len as usize) as u64)
            .sum()
    }
}

/// Builds a manifest while a file streams through, one chunk at a time, so that a file of any
/// size needs memory for one chunk only.
#[derive(Debug)]
pub struct ManifestBuilder {
    name: FileName,
    secret: FileSecret,
    size: u64,
    chunks: Vec<ChunkEntry>,
}

impl ManifestBuilder {
    /// A builder for a file called `name`, sealed under `secret`.
    pub fn new(name: FileName, secret: FileSecret) -> ManifestBuilder {
        ManifestBuilder {
            name,
            secret,
            size: 0,
            chunks: Vec::new(),
        }
    }

    /// Seals the next chunk (as the chunker cut it) and notes it in the manifest.
    pub fn push(&mut self, plain: &[u8]) -> Result<SealedChunk, ManifestError> {
        let size = self.size_with(plain.len())?;
        let (entry, sealed) = seal_chunk(&self.secret, plain);
        self.size = size;
        self.chunks.push(entry);
        Ok(sealed)
    }

    /// Notes the next chunk by its length and plaintext hash ([`ContentHash::of`]) without
    /// sealing it. The manifest needs only these: a sender that seals each chunk again as it
    /// uploads it hashes the chunks elsewhere (another thread, while the next is cut) and
    /// notes them here in file order.
    pub fn push_hashed(&mut self, len: usize, hash: ContentHash) -> Result<(), ManifestError> {
        let size = self.size_with(len)?;
        let len = u32::try_from(len).expect("checked against CHUNK_BYTES_MAX");
        self.size = size;
        self.chunks.push(ChunkEntry { hash, len });
        Ok(())
    }

    /// The file's size with one more chunk of `len` bytes, if the manifest can take it.
    fn size_with(&self, len: usize) -> Result<u64, ManifestError> {
        assert!(len > 0, "the chunker never cuts an empty chunk");
        if len > CHUNK_BYTES_MAX {
            return Err(ManifestError::ChunkLength {
                index: self.chunks.len(),
                len: u32::try_from(len).unwrap_or(u32::MAX),
                max: CHUNK_BYTES_MAX,
            });
        }
        if self.chunks.len() == CHUNKS_MAX {
            return Err(ManifestError::TooManyChunks { max: CHUNKS_MAX });
        }
        let size = self.size + len as u64;
        if size > FILE_BYTES_MAX {
            return Err(ManifestError::TooLarge {
                size,
                max: FILE_BYTES_MAX,
            });
        }
        Ok(size)
    }

    /// The manifest of everything pushed.
    pub fn finish(self) -> Manifest {
        let manifest = Manifest {
            name: self.name,
            size: self.size,
            secret: self.secret,
            chunks: self.chunks,
        };
        debug_assert_eq!(manifest.check(), Ok(()));
        manifest
    }
}

/// Cuts and seals `data` in memory: the manifest and every chunk in order (a chunk that
/// occurs twice is sealed twice, to the same id).
pub fn seal_file(
    name: FileName,
    secret: FileSecret,
    data: &[u8],
) -> Result<(Manifest, Vec<SealedChunk>), ManifestError> {
    if data.len() as u64 > FILE_BYTES_MAX {
        return Err(ManifestError::TooLarge {
            size: data.len() as u64,
            max: FILE_BYTES_MAX,
        });
    }
    let ranges: Vec<_> = super::chunk_ranges(&secret, data).collect();
    let mut builder = ManifestBuilder::new(name, secret);
    let mut sealed = Vec::with_capacity(ranges.len());
    for range in ranges {
        sealed.push(builder.push(&data[range])?);
    }
    Ok((builder.finish(), sealed))
}
