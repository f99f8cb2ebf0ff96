//! Reading and writing whole files around the page cache (`O_DIRECT`), for bytes that are
//! written once and read back rarely: the gateway's chunks, a device's chunk store, a file
//! being saved.
//!
//! Why: on the machines measured (benches/README.md, "Files"), copying a gigabyte into page
//! cache pages the kernel must first claim, and writing those pages back at the sync, cost
//! several CPU-seconds per gigabyte in the writing process, more than the transfer's
//! encryption. Straight to the disk, a write pays for the transfer alone, and a file moved
//! through a gateway no longer pushes everything else out of its cache.
//!
//! Direct I/O wants the buffer, the offset and the length aligned to the disk's blocks: bytes
//! go through an aligned staging buffer, whole blocks at a time; the last block is padded with
//! zeros and the file cut back to its length before the sync. A file system that does no
//! direct I/O (`EINVAL`: tmpfs on older kernels, some network file systems) gets the same
//! calls through the page cache, so callers need not care.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The alignment direct I/O gets: a page, which covers every disk's logical block size.
pub const ALIGN: usize = 4096;

/// Bytes staged before each direct write: large enough that a write costs little more than
/// its transfer.
const STAGE_BYTES: usize = 1 << 20;

/// `options` with direct I/O asked for (on Linux; elsewhere unchanged).
fn direct(options: &mut OpenOptions) -> &mut OpenOptions {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_DIRECT);
    }
    options
}

fn no_direct_io(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

/// An aligned buffer of `len` bytes inside a vector: the vector and where the buffer starts.
fn aligned(len: usize) -> (Vec<u8>, usize) {
    let buffer = vec![0u8; len + ALIGN];
    let start = buffer.as_ptr().align_offset(ALIGN);
    (buffer, start)
}

/// Reads the file at `path`, expected to hold `len` bytes (at most one block more is read,
/// so a longer file shows as longer). Direct where the file system allows it.
pub fn read_file(path: &Path, len: usize) -> io::Result<Vec<u8>> {
    let mut file = match direct(OpenOptions::new().read(true)).open(path) {
        Ok(file) => file,
        Err(e) if no_direct_io(&e) => return read_buffered(path, len),
        Err(e) => return Err(e),
    };
    let padded = len.div_ceil(ALIGN) * ALIGN + ALIGN;
    let (mut buffer, start) = aligned(padded);
    let mut filled = 0;
    loop {
        // Whole blocks each time; only the read at the end of the file stops short.
        let n = match file.read(&mut buffer[start + filled..start + padded]) {
            Ok(n) => n,
            Err(e) if no_direct_io(&e) && filled == 0 => return read_buffered(path, len),
            Err(e) => return Err(e),
        };
        filled += n;
        if n == 0 || filled % ALIGN != 0 || filled >= padded {
            break;
        }
    }
    buffer.truncate(start + filled);
    buffer.drain(..start);
    Ok(buffer)
}

fn read_buffered(path: &Path, len: usize) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(len);
    File::open(path)?
        .take(len as u64 + ALIGN as u64)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// A new file written front to back, around the page cache where the file system allows.
/// [`DirectFile::finish`] writes what is staged and syncs; dropped unfinished, the file holds
/// only the whole megabytes written so far.
pub struct DirectFile {
    path: PathBuf,
    file: File,
    /// False once the file system refused direct I/O: writes go through the page cache.
    direct: bool,
    buffer: Vec<u8>,
    start: usize,
    /// Bytes staged in `buffer[start..]`.
    staged: usize,
    /// Bytes written to the file.
    written: u64,
}

impl DirectFile {
    /// Creates (or truncates) the file at `path`, owner-only on Unix when `private`.
    pub fn create(path: &Path, private: bool) -> io::Result<DirectFile> {
        let mut options = OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if private {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        #[cfg(not(unix))]
        let _ = private;
        let (file, direct) = match direct(&mut options.clone()).open(path) {
            Ok(file) => (file, true),
            Err(e) if no_direct_io(&e) => (options.open(path)?, false),
            Err(e) => return Err(e),
        };
        // Filled as bytes come, never zeroed first (a megabyte per file otherwise); the
        // capacity is never exceeded, so the buffer never moves off its alignment.
        let mut buffer: Vec<u8> = Vec::with_capacity(STAGE_BYTES + ALIGN);
        let start = buffer.as_ptr().align_offset(ALIGN);
        buffer.resize(start, 0);
        Ok(DirectFile {
            path: path.to_path_buf(),
            file,
            direct,
            buffer,
            start,
            staged: 0,
            written: 0,
        })
    }

    /// Appends `bytes`.
    pub fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let take = (STAGE_BYTES - self.staged).min(bytes.len());
            debug_assert_eq!(self.buffer.len(), self.start + self.staged);
            self.buffer.extend_from_slice(&bytes[..take]);
            self.staged += take;
            bytes = &bytes[take..];
            if self.staged == STAGE_BYTES {
                self.write_staged(STAGE_BYTES)?;
            }
        }
        Ok(())
    }

    /// Bytes appended so far.
    pub fn len(&self) -> u64 {
        self.written + self.staged as u64
    }

    /// True before anything is appended.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes the whole blocks appended so far durable (the partial last block waits for
    /// [`DirectFile::finish`]).
    pub fn sync_data(&mut self) -> io::Result<()> {
        let whole = self.staged / ALIGN * ALIGN;
        if whole > 0 {
            self.write_staged(whole)?;
        }
        self.file.sync_data()
    }

    /// Writes the rest, cuts the file to its length and syncs it, size and all.
    pub fn finish(mut self) -> io::Result<()> {
        let len = self.len();
        let padded = self.staged.div_ceil(ALIGN) * ALIGN;
        if padded > 0 {
            self.buffer.resize(self.start + padded, 0);
            self.write_staged(padded)?;
        }
        self.file.set_len(len)?;
        self.file.sync_all()
    }

    /// Writes the first `n` staged bytes (whole blocks, or the padded last one) and keeps the
    /// rest staged.
    fn write_staged(&mut self, n: usize) -> io::Result<()> {
        debug_assert_eq!(n % ALIGN, 0);
        assert!(
            self.buffer.capacity() >= self.start + STAGE_BYTES
                && self.buffer.as_ptr().align_offset(ALIGN) == self.start,
            "the staging buffer stays where it was aligned"
        );
        let block = &self.buffer[self.start..self.start + n];
        let done = match self.file.write(block) {
            Ok(done) => done,
            Err(e) if self.direct && no_direct_io(&e) => 0,
            Err(e) => return Err(e),
        };
        if done != n {
            // Refused at the write though accepted at the open, or short (which would leave
            // the next write unaligned): the rest goes through the page cache.
            if self.direct {
                self.file = OpenOptions::new().write(true).open(&self.path)?;
                self.file
                    .seek(SeekFrom::Start(self.written + done as u64))?;
                self.direct = false;
            }
            self.file.write_all(&block[done..])?;
        }
        self.written += n as u64;
        let keep = self.staged.saturating_sub(n);
        let from = self.start + n;
        self.buffer.copy_within(from..from + keep, self.start);
        self.buffer.truncate(self.start + keep);
        self.staged = keep;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn files_of_any_length_round_trip_and_syncs_in_between_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        for len in [
            0,
            1,
            ALIGN - 1,
            ALIGN,
            ALIGN + 1,
            STAGE_BYTES + 3 * ALIGN + 17,
        ] {
            let data = noise(len);
            let path = dir.path().join(format!("f{len}"));
            let mut file = DirectFile::create(&path, true).unwrap();
            for (i, piece) in data.chunks(100_003).enumerate() {
                file.write_all(piece).unwrap();
                if i % 3 == 1 {
                    file.sync_data().unwrap();
                }
            }
            assert_eq!(file.len(), len as u64);
            file.finish().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), data, "{len} bytes");
            assert_eq!(read_file(&path, len).unwrap(), data, "{len} bytes");
        }
    }

    #[test]
    fn a_read_shows_a_file_longer_or_shorter_than_expected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, noise(10_000)).unwrap();
        assert_eq!(read_file(&path, 9_000).unwrap().len(), 10_000);
        assert_eq!(read_file(&path, 20_000).unwrap().len(), 10_000);
        assert_eq!(
            read_file(&dir.path().join("none"), 1).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    /// tmpfs did no direct I/O before Linux 6.6: the same calls work either way.
    #[test]
    fn files_on_tmpfs_round_trip_whether_or_not_it_does_direct_io() {
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
            return; // no tmpfs here
        };
        let data = noise(STAGE_BYTES + 5);
        let path = dir.path().join("f");
        let mut file = DirectFile::create(&path, true).unwrap();
        file.write_all(&data).unwrap();
        file.finish().unwrap();
        assert_eq!(read_file(&path, data.len()).unwrap(), data);
    }

    #[cfg(unix)]
    #[test]
    fn a_private_file_is_the_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        DirectFile::create(&path, true).unwrap().finish().unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
