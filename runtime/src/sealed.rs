//! A stream sealed under a passphrase, for backups that leave the machine (`sund backup`).
//!
//! ```text
//! header   "SUNDSEAL" | format u8 = 1 | memory KiB u32 | passes u32 | lanes u32 | salt [16]
//!          | nonce prefix [7] | key check [16]                 (60 bytes, big-endian numbers)
//! segment  ChaCha20-Poly1305 of up to 64 KiB of the plaintext, with its 16-byte tag
//! ```
//!
//! The key check is the tag of an empty message under the key, with a nonce no segment uses
//! (counter `u32::MAX`, flag 2) and the header's fields as associated data: a reader tells a
//! wrong passphrase from a damaged file by it, before it opens any segment.
//!
//! The key is Argon2id of the passphrase and the salt with the header's cost settings, so a
//! stolen backup costs an attacker that much memory and time per guess. Segments follow the
//! STREAM construction: the nonce of segment `i` is `prefix | i (u32) | last (u8)`, and every
//! segment authenticates the whole header. So a segment cannot be moved, dropped, repeated or
//! swapped in from another backup, the header cannot be altered, and a file cut short is told
//! apart from a damaged one: every segment but the last is exactly 64 KiB of plaintext, and only
//! the last carries the flag. Decoding bounds the cost settings before deriving anything, so a
//! crafted header cannot make a reader allocate gigabytes.

use std::io::{self, Read, Write};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use zeroize::Zeroizing;

/// The first bytes of every sealed file.
pub const MAGIC: &[u8; 8] = b"SUNDSEAL";
/// The format this code writes and reads.
pub const FORMAT: u8 = 1;
/// Bytes of the header's fields (what every segment authenticates).
const FIELDS_LEN: usize = 8 + 1 + 4 + 4 + 4 + 16 + 7;
/// Bytes of the header: its fields and the key check.
pub const HEADER_LEN: usize = FIELDS_LEN + TAG;
/// Plaintext bytes in every segment but the last.
pub const SEGMENT: usize = 64 * 1024;
/// Bytes a segment's tag adds.
const TAG: usize = 16;
/// The fewest characters a passphrase may have: a backup is only as strong as it.
pub const MIN_PASSPHRASE_CHARS: usize = 12;

/// Argon2id's cost settings, kept in the header so that a reader uses the writer's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes over the memory.
    pub passes: u32,
    /// Parallel lanes.
    pub lanes: u32,
}

impl KdfParams {
    /// What backups are written with: 64 MiB, three passes, one lane (RFC 9106's second
    /// recommended option), about half a second on a laptop.
    pub const BACKUP: KdfParams = KdfParams {
        memory_kib: 64 * 1024,
        passes: 3,
        lanes: 1,
    };
    /// The most memory a reader spends on a header's word (256 MiB, four times what backups
    /// use): a file someone hands over cannot make opening it take much more than usual.
    pub const MAX_MEMORY_KIB: u32 = 1 << 18;
    /// The most passes a reader makes.
    pub const MAX_PASSES: u32 = 8;
    /// The most lanes a reader runs.
    pub const MAX_LANES: u32 = 8;

    /// Why these settings are refused by a reader, if they are.
    pub fn check(&self) -> Result<(), String> {
        if self.lanes == 0 || self.lanes > Self::MAX_LANES {
            return Err(format!("{} lanes (1 to {})", self.lanes, Self::MAX_LANES));
        }
        if self.passes == 0 || self.passes > Self::MAX_PASSES {
            return Err(format!(
                "{} passes (1 to {})",
                self.passes,
                Self::MAX_PASSES
            ));
        }
        if self.memory_kib < 8 * self.lanes || self.memory_kib > Self::MAX_MEMORY_KIB {
            return Err(format!(
                "{} KiB of memory ({} to {})",
                self.memory_kib,
                8 * self.lanes,
                Self::MAX_MEMORY_KIB
            ));
        }
        Ok(())
    }
}

/// Why a sealed stream could not be written or read, in words for the user.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The passphrase is too short to protect anything.
    #[error("the passphrase is too short: use at least {MIN_PASSPHRASE_CHARS} characters (a few random words are easy to type and hard to guess)")]
    WeakPassphrase,
    /// The bytes do not start with a sealed header.
    #[error("not a Sund backup: it does not start with Sund's backup header")]
    NotSealed,
    /// A format this code does not know.
    #[error("a backup of format {0}, newer than this sund reads (format {FORMAT}): update sund")]
    Format(u8),
    /// Cost settings out of bounds.
    #[error("the backup's header asks for {0}, more than any Sund writes: the file is damaged or not from Sund")]
    Params(String),
    /// The key does not match the header's key check: the passphrase is wrong (or the header's
    /// check was altered).
    #[error("wrong passphrase: nothing was read")]
    WrongPassphrase,
    /// A later segment fails its check.
    #[error("the backup is damaged: the part at byte {offset} fails its authentication check (altered or corrupted since it was written); use another copy")]
    Damaged {
        /// Where the damaged segment starts in the file.
        offset: u64,
    },
    /// The last part of the file fails its check: cut inside a segment, or damaged.
    #[error("the backup's last part, at byte {offset}, fails its authentication check: the file was cut short (it is {bytes} bytes long) or damaged; use a whole copy")]
    DamagedEnd {
        /// Where that part starts in the file.
        offset: u64,
        /// Bytes the file holds.
        bytes: u64,
    },
    /// The file stops before its last segment.
    #[error("the backup ends early, after {bytes} bytes: it was cut short (copied while still being written, or a full disk); use a whole copy")]
    Truncated {
        /// Bytes the file holds.
        bytes: u64,
    },
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl SealError {
    /// The `SealError` an `io::Error` from [`SealReader`] carries, or the error itself.
    pub fn from_io(e: io::Error) -> SealError {
        if e.get_ref().is_some_and(|inner| inner.is::<SealError>()) {
            let inner = e.into_inner().expect("checked");
            return *inner.downcast::<SealError>().expect("checked");
        }
        SealError::Io(e)
    }

    fn into_io(self) -> io::Error {
        match self {
            SealError::Io(e) => e,
            other => io::Error::other(other),
        }
    }
}

/// A sealed file's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Argon2id's settings.
    pub kdf: KdfParams,
    /// Argon2id's salt.
    pub salt: [u8; 16],
    /// The first seven bytes of every segment's nonce.
    pub nonce_prefix: [u8; 7],
    /// The tag that shows a key is the right one ([`Header::with_key_check`]).
    pub key_check: [u8; 16],
}

impl Header {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..FIELDS_LEN].copy_from_slice(&self.fields());
        out[FIELDS_LEN..].copy_from_slice(&self.key_check);
        out
    }

    /// The header's fields, without the key check: what every segment authenticates.
    fn fields(&self) -> [u8; FIELDS_LEN] {
        let mut out = [0u8; FIELDS_LEN];
        out[..8].copy_from_slice(MAGIC);
        out[8] = FORMAT;
        out[9..13].copy_from_slice(&self.kdf.memory_kib.to_be_bytes());
        out[13..17].copy_from_slice(&self.kdf.passes.to_be_bytes());
        out[17..21].copy_from_slice(&self.kdf.lanes.to_be_bytes());
        out[21..37].copy_from_slice(&self.salt);
        out[37..44].copy_from_slice(&self.nonce_prefix);
        out
    }

    /// Reads a header, refusing anything but this format with bounded settings.
    pub fn decode(bytes: &[u8]) -> Result<Header, SealError> {
        if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
            return Err(SealError::NotSealed);
        }
        if bytes[8] != FORMAT {
            return Err(SealError::Format(bytes[8]));
        }
        let word = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let kdf = KdfParams {
            memory_kib: word(9),
            passes: word(13),
            lanes: word(17),
        };
        kdf.check().map_err(SealError::Params)?;
        Ok(Header {
            kdf,
            salt: bytes[21..37].try_into().expect("16 bytes"),
            nonce_prefix: bytes[37..44].try_into().expect("7 bytes"),
            key_check: bytes[FIELDS_LEN..HEADER_LEN].try_into().expect("16 bytes"),
        })
    }

    /// The tag a reader checks a key against (nonce counter `u32::MAX` and flag 2, which no
    /// segment uses).
    fn check_for(&self, key: &[u8; 32]) -> [u8; 16] {
        let tag = ChaCha20Poly1305::new(Key::from_slice(key))
            .encrypt(
                &nonce_with(&self.nonce_prefix, u32::MAX, 2),
                Payload {
                    msg: &[],
                    aad: &self.fields(),
                },
            )
            .expect("an empty message seals");
        tag.try_into().expect("a bare tag is 16 bytes")
    }

    /// This header with the key check for `key`.
    pub fn with_key_check(mut self, key: &[u8; 32]) -> Header {
        self.key_check = self.check_for(key);
        self
    }

    /// True if `key` is the one the header was sealed under.
    pub fn key_matches(&self, key: &[u8; 32]) -> bool {
        // Not secret-dependent timing that matters: the tag is public, the key is what is
        // being guessed, and a guess costs an Argon2 derivation first.
        self.check_for(key) == self.key_check
    }

    /// The key Argon2id derives from `passphrase` under this header (memory and time as its
    /// settings say).
    pub fn derive_key(&self, passphrase: &str) -> Zeroizing<[u8; 32]> {
        let params = argon2::Params::new(
            self.kdf.memory_kib,
            self.kdf.passes,
            self.kdf.lanes,
            Some(32),
        )
        .expect("settings checked by KdfParams::check");
        let blocks = params.block_count();
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut key = Zeroizing::new([0u8; 32]);
        // Argon2's memory, from which the key could be computed again, is wiped after use.
        let mut memory = Zeroizing::new(vec![argon2::Block::default(); blocks]);
        argon
            .hash_password_into_with_memory(
                passphrase.as_bytes(),
                &self.salt,
                key.as_mut(),
                &mut memory[..],
            )
            .expect("a 32-byte output, a 16-byte salt and its own block count are within Argon2's limits");
        key
    }
}

/// Checks a passphrase for a new backup.
pub fn check_passphrase(passphrase: &str) -> Result<(), SealError> {
    if passphrase.chars().count() < MIN_PASSPHRASE_CHARS {
        return Err(SealError::WeakPassphrase);
    }
    Ok(())
}

fn nonce(prefix: &[u8; 7], counter: u32, last: bool) -> Nonce {
    nonce_with(prefix, counter, u8::from(last))
}

fn nonce_with(prefix: &[u8; 7], counter: u32, flag: u8) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[..7].copy_from_slice(prefix);
    bytes[7..11].copy_from_slice(&counter.to_be_bytes());
    bytes[11] = flag;
    Nonce::from(bytes)
}

/// Seals what is written to it into `inner`, a segment at a time: memory stays at one segment
/// whatever the size. [`SealWriter::finish`] writes the last segment; a writer dropped without
/// it leaves a file that readers call cut short.
pub struct SealWriter<W: Write> {
    inner: W,
    cipher: ChaCha20Poly1305,
    fields: [u8; FIELDS_LEN],
    prefix: [u8; 7],
    counter: u32,
    buffer: Zeroizing<Vec<u8>>,
    /// A write failed: nothing more is sealed (a retry could reuse a nonce).
    failed: bool,
}

impl<W: Write> SealWriter<W> {
    /// Writes the header and derives the key. `salt` and `nonce_prefix` must be fresh random
    /// bytes for every file.
    pub fn new(
        mut inner: W,
        passphrase: &str,
        kdf: KdfParams,
        salt: [u8; 16],
        nonce_prefix: [u8; 7],
    ) -> Result<SealWriter<W>, SealError> {
        check_passphrase(passphrase)?;
        kdf.check().map_err(SealError::Params)?;
        let header = Header {
            kdf,
            salt,
            nonce_prefix,
            key_check: [0; 16],
        };
        let key = header.derive_key(passphrase);
        let header = header.with_key_check(&key);
        inner.write_all(&header.encode())?;
        Ok(SealWriter {
            inner,
            cipher: ChaCha20Poly1305::new(Key::from_slice(key.as_ref())),
            fields: header.fields(),
            prefix: nonce_prefix,
            counter: 0,
            buffer: Zeroizing::new(Vec::with_capacity(SEGMENT)),
            failed: false,
        })
    }

    fn seal_segment(&mut self, last: bool) -> io::Result<()> {
        if self.failed {
            return Err(io::Error::other(
                "an earlier write of this sealed file failed",
            ));
        }
        // The counter is checked before it is used: `u32::MAX` belongs to the key check.
        if self.counter == u32::MAX {
            self.failed = true;
            return Err(io::Error::other("a sealed file holds at most 256 TiB"));
        }
        debug_assert!(self.buffer.len() <= SEGMENT);
        debug_assert!(
            last || self.buffer.len() == SEGMENT,
            "only the last is short"
        );
        let sealed = self
            .cipher
            .encrypt(
                &nonce(&self.prefix, self.counter, last),
                Payload {
                    msg: &self.buffer,
                    aad: &self.fields,
                },
            )
            .map_err(|_| io::Error::other("sealing a segment failed"));
        self.counter += 1;
        let written = sealed.and_then(|sealed| self.inner.write_all(&sealed));
        if written.is_err() {
            self.failed = true;
        }
        written?;
        self.buffer.clear();
        Ok(())
    }

    /// Seals the last segment and hands back the inner writer, flushed.
    pub fn finish(mut self) -> io::Result<W> {
        self.seal_segment(true)?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for SealWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        // A full buffer is sealed only once more data comes: the last segment is the one
        // `finish` seals, so it is empty only for an empty stream.
        if self.buffer.len() == SEGMENT {
            self.seal_segment(false)?;
        }
        let take = data.len().min(SEGMENT - self.buffer.len());
        self.buffer.extend_from_slice(&data[..take]);
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Opens a sealed stream, a segment at a time; its `Read` errors carry a [`SealError`]
/// ([`SealError::from_io`]). The end of the plaintext is reported only after the last segment
/// opened, so whoever reads to the end has read everything that was sealed.
pub struct SealReader<R: Read> {
    inner: R,
    cipher: ChaCha20Poly1305,
    fields: [u8; FIELDS_LEN],
    prefix: [u8; 7],
    counter: u32,
    /// Ciphertext read but not yet opened (at most a segment and one byte past it).
    raw: Vec<u8>,
    /// Bytes of the file consumed before `raw`.
    offset: u64,
    plain: Zeroizing<Vec<u8>>,
    at: usize,
    done: bool,
}

impl<R: Read> SealReader<R> {
    /// Reads the header, derives the key from `passphrase`, checks it against the header's key
    /// check (a wrong passphrase is told at once, apart from damage) and opens the first
    /// segment.
    pub fn open(mut inner: R, passphrase: &str) -> Result<SealReader<R>, SealError> {
        let mut header = [0u8; HEADER_LEN];
        let (got, failed) = read_full(&mut inner, &mut header);
        if let Some(e) = failed {
            return Err(e.into());
        }
        if got < HEADER_LEN {
            return Err(if got > 0 && header[..got.min(8)] == MAGIC[..got.min(8)] {
                SealError::Truncated { bytes: got as u64 }
            } else {
                SealError::NotSealed
            });
        }
        let decoded = Header::decode(&header)?;
        let key = decoded.derive_key(passphrase);
        SealReader::with_key(inner, &decoded, &key)
    }

    /// Opens a stream whose header was read already, with the key derived from it: for
    /// readers that derived the key once (and the fuzz target, which cannot afford Argon2).
    pub fn with_key(inner: R, header: &Header, key: &[u8; 32]) -> Result<SealReader<R>, SealError> {
        if !header.key_matches(key) {
            return Err(SealError::WrongPassphrase);
        }
        let mut reader = SealReader {
            inner,
            cipher: ChaCha20Poly1305::new(Key::from_slice(key)),
            fields: header.fields(),
            prefix: header.nonce_prefix,
            counter: 0,
            raw: Vec::with_capacity(SEGMENT + TAG + 1),
            offset: HEADER_LEN as u64,
            plain: Zeroizing::new(Vec::with_capacity(SEGMENT)),
            at: 0,
            done: false,
        };
        reader.next_segment()?;
        Ok(reader)
    }

    /// Opens the next segment into `plain`.
    fn next_segment(&mut self) -> Result<(), SealError> {
        debug_assert!(!self.done);
        // One byte past a full segment tells whether this one is the last.
        let want = SEGMENT + TAG + 1;
        let had = self.raw.len();
        self.raw.resize(want, 0);
        let (got, failed) = read_full(&mut self.inner, &mut self.raw[had..]);
        // Whatever happened, `raw` holds only what was read, so a read tried again goes on
        // where this one stopped.
        self.raw.truncate(had + got);
        if let Some(e) = failed {
            return Err(e.into());
        }
        let last = self.raw.len() <= SEGMENT + TAG;
        let length = self.raw.len().min(SEGMENT + TAG);
        let end = self.offset + self.raw.len() as u64;
        if length < TAG {
            return Err(SealError::Truncated { bytes: end });
        }
        let open = |last: bool| {
            self.cipher.decrypt(
                &nonce(&self.prefix, self.counter, last),
                Payload {
                    msg: &self.raw[..length],
                    aad: &self.fields,
                },
            )
        };
        let plain = match open(last) {
            Ok(plain) => plain,
            Err(_) => {
                // The key is right (checked against the header): this is damage or a cut.
                return Err(if last && length == SEGMENT + TAG && open(false).is_ok() {
                    SealError::Truncated { bytes: end }
                } else if last {
                    SealError::DamagedEnd {
                        offset: self.offset,
                        bytes: end,
                    }
                } else {
                    SealError::Damaged {
                        offset: self.offset,
                    }
                });
            }
        };
        debug_assert!(last || plain.len() == SEGMENT);
        self.plain = Zeroizing::new(plain);
        self.at = 0;
        self.raw.drain(..length);
        self.offset += length as u64;
        self.counter = self.counter.checked_add(1).ok_or(SealError::Damaged {
            offset: self.offset,
        })?;
        self.done = last;
        Ok(())
    }
}

impl<R: Read> Read for SealReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.plain.len() {
            if self.done || out.is_empty() {
                return Ok(0);
            }
            self.next_segment().map_err(SealError::into_io)?;
        }
        let n = out.len().min(self.plain.len() - self.at);
        out[..n].copy_from_slice(&self.plain[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Reads until `out` is full, the stream ends or a read fails: the bytes read, and the
/// failure if there was one.
fn read_full(inner: &mut impl Read, out: &mut [u8]) -> (usize, Option<io::Error>) {
    let mut got = 0;
    while got < out.len() {
        match inner.read(&mut out[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (got, Some(e)),
        }
    }
    (got, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Cheap settings: the tests are about the format, not Argon2's cost.
    const FAST: KdfParams = KdfParams {
        memory_kib: 64,
        passes: 1,
        lanes: 1,
    };
    const PASS: &str = "correct horse battery staple";

    fn seal(plain: &[u8]) -> Vec<u8> {
        let mut writer = SealWriter::new(Vec::new(), PASS, FAST, [7; 16], [9; 7]).unwrap();
        // Odd-sized writes, to cross segment boundaries inside one call.
        for part in plain.chunks(10_007) {
            writer.write_all(part).unwrap();
        }
        writer.finish().unwrap()
    }

    fn open(sealed: &[u8], passphrase: &str) -> Result<Vec<u8>, SealError> {
        let mut reader = SealReader::open(sealed, passphrase)?;
        let mut out = Vec::new();
        reader.read_to_end(&mut out).map_err(SealError::from_io)?;
        Ok(out)
    }

    #[test]
    fn sizes_around_segment_boundaries_come_back_whole() {
        for len in [
            0,
            1,
            SEGMENT - 1,
            SEGMENT,
            SEGMENT + 1,
            3 * SEGMENT,
            3 * SEGMENT + 5,
        ] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let sealed = seal(&plain);
            let segments = len.div_ceil(SEGMENT).max(1);
            assert_eq!(
                sealed.len(),
                HEADER_LEN + len + segments * TAG,
                "length {len}"
            );
            assert_eq!(open(&sealed, PASS).unwrap(), plain, "length {len}");
        }
    }

    #[test]
    fn a_small_file_cut_or_grown_is_told_as_damaged_not_as_a_wrong_passphrase() {
        let sealed = seal(b"a few contact names");
        for damaged in [
            sealed[..sealed.len() - 1].to_vec(),
            [sealed.clone(), vec![0]].concat(),
            {
                let mut flipped = sealed.clone();
                flipped[HEADER_LEN + 3] ^= 4;
                flipped
            },
        ] {
            assert!(
                matches!(open(&damaged, PASS), Err(SealError::DamagedEnd { .. })),
                "{:?}",
                open(&damaged, PASS).err()
            );
        }
        let mut check = sealed.clone();
        check[HEADER_LEN - 1] ^= 1;
        assert!(matches!(
            open(&check, PASS),
            Err(SealError::WrongPassphrase)
        ));
    }

    #[test]
    fn a_read_that_fails_can_be_tried_again_where_it_stopped() {
        struct Flaky<'a> {
            bytes: &'a [u8],
            at: usize,
            fail_at: Option<usize>,
        }
        impl Read for Flaky<'_> {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                if let Some(f) = self.fail_at {
                    if self.at >= f {
                        self.fail_at = None;
                        return Err(io::Error::other("a flaky disk"));
                    }
                }
                let end = (self.at + out.len().min(1000)).min(self.bytes.len());
                let n = end - self.at;
                out[..n].copy_from_slice(&self.bytes[self.at..end]);
                self.at = end;
                Ok(n)
            }
        }
        let plain: Vec<u8> = (0..3 * SEGMENT).map(|i| (i % 7) as u8).collect();
        let sealed = seal(&plain);
        let flaky = Flaky {
            bytes: &sealed,
            at: 0,
            fail_at: Some(HEADER_LEN + SEGMENT + 5_000),
        };
        let mut reader = SealReader::open(flaky, PASS).unwrap();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 10_000];
        let mut failures = 0;
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(_) => failures += 1,
            }
        }
        assert_eq!(failures, 1);
        assert_eq!(out, plain);
    }

    #[test]
    fn a_wrong_passphrase_is_told_before_anything_is_read() {
        let sealed = seal(b"secret");
        assert!(matches!(
            open(&sealed, "correct horse battery stapler"),
            Err(SealError::WrongPassphrase)
        ));
    }

    #[test]
    fn a_file_cut_anywhere_is_refused_as_cut_short_or_damaged_never_read_as_whole() {
        let plain: Vec<u8> = (0..2 * SEGMENT + 100).map(|i| i as u8).collect();
        let sealed = seal(&plain);
        let boundaries = [HEADER_LEN + SEGMENT + TAG, HEADER_LEN + 2 * (SEGMENT + TAG)];
        for cut in (0..sealed.len()).step_by(997).chain(boundaries) {
            match open(&sealed[..cut], PASS) {
                Ok(_) => panic!("a file cut at {cut} was read as whole"),
                Err(SealError::Truncated { bytes } | SealError::DamagedEnd { bytes, .. }) => {
                    assert_eq!(bytes, cut as u64)
                }
                Err(SealError::NotSealed) => assert_eq!(cut, 0),
                Err(other) => panic!("cut at {cut}: {other}"),
            }
        }
        for cut in boundaries {
            assert!(matches!(
                open(&sealed[..cut], PASS),
                Err(SealError::Truncated { bytes }) if bytes == cut as u64
            ));
        }
    }

    #[test]
    fn a_flipped_bit_anywhere_is_refused() {
        let plain: Vec<u8> = (0..SEGMENT + 100).map(|i| i as u8).collect();
        let sealed = seal(&plain);
        for at in (0..sealed.len())
            .step_by(4099)
            .chain([HEADER_LEN + SEGMENT + TAG + 3])
        {
            let mut damaged = sealed.clone();
            damaged[at] ^= 0x10;
            let result = open(&damaged, PASS);
            assert!(result.is_err(), "a flip at {at} went unnoticed");
            if at >= HEADER_LEN + SEGMENT + TAG {
                assert!(
                    matches!(result, Err(SealError::DamagedEnd { offset, .. }) if offset == (HEADER_LEN + SEGMENT + TAG) as u64),
                    "flip at {at}: {:?}",
                    result.err()
                );
            }
        }
    }

    #[test]
    fn segments_cannot_be_swapped_or_dropped() {
        let plain: Vec<u8> = (0..3 * SEGMENT).map(|i| (i / SEGMENT) as u8).collect();
        let sealed = seal(&plain);
        let seg = SEGMENT + TAG;
        let body = &sealed[HEADER_LEN..];
        let mut swapped = sealed[..HEADER_LEN].to_vec();
        swapped.extend_from_slice(&body[seg..2 * seg]);
        swapped.extend_from_slice(&body[..seg]);
        swapped.extend_from_slice(&body[2 * seg..]);
        assert!(matches!(
            open(&swapped, PASS),
            Err(SealError::Damaged { offset }) if offset == HEADER_LEN as u64
        ));
        let mut dropped = sealed[..HEADER_LEN].to_vec();
        dropped.extend_from_slice(&body[..seg]);
        dropped.extend_from_slice(&body[2 * seg..]);
        assert!(matches!(
            open(&dropped, PASS),
            Err(SealError::DamagedEnd { .. })
        ));
        let mut middle = sealed.clone();
        middle[HEADER_LEN + seg + 100] ^= 1;
        assert!(matches!(
            open(&middle, PASS),
            Err(SealError::Damaged { offset }) if offset == (HEADER_LEN + seg) as u64
        ));
    }

    #[test]
    fn headers_out_of_bounds_are_refused_before_any_work() {
        let sealed = seal(b"x");
        let mut greedy = sealed.clone();
        greedy[9..13].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(open(&greedy, PASS), Err(SealError::Params(_))));
        let mut newer = sealed.clone();
        newer[8] = 2;
        assert!(matches!(open(&newer, PASS), Err(SealError::Format(2))));
        assert!(matches!(
            open(b"PK\x03\x04 a zip", PASS),
            Err(SealError::NotSealed)
        ));
        assert!(matches!(
            SealWriter::new(Vec::new(), "short", FAST, [0; 16], [0; 7]),
            Err(SealError::WeakPassphrase)
        ));
    }

    #[test]
    fn the_backup_settings_are_within_what_readers_accept() {
        KdfParams::BACKUP.check().unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn any_plaintext_comes_back(plain in proptest::collection::vec(any::<u8>(), 0..200_000)) {
            prop_assert_eq!(open(&seal(&plain), PASS).unwrap(), plain);
        }

        #[test]
        fn any_header_bytes_decode_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(header) = Header::decode(&bytes) {
                prop_assert!(header.kdf.check().is_ok());
                prop_assert_eq!(&header.encode()[..], &bytes[..HEADER_LEN]);
            }
        }
    }
}
