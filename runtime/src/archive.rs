//! The entries of a backup stream: named files and store rows, streamed one at a time (inside a
//! [`crate::sealed`] stream for `sund backup`).
//!
//! ```text
//! start  0x00 | format u8 = 1 | kind length u8 | kind          ("sund-device")
//! file   0x01 | name length u8 | name | length u32 | bytes
//! row    0x02 | table length u8 | table | key length u16 | key | value length u32 | value
//! end    0xFF | entries u64                                     (files and rows before it)
//! ```
//!
//! Every length is bounded before anything is allocated; names and tables are checked so that a
//! name can never leave the directory it is restored into. A stream without its end entry, or
//! with bytes after it, is refused: whoever reads to the end has every entry that was written.

use std::io::{self, Read, Write};

use crate::sealed::SealError;

/// The format this code writes and reads.
pub const FORMAT: u8 = 1;
/// The largest file an archive carries.
pub const MAX_FILE_BYTES: u32 = 64 << 20;
/// The largest row value (a file chunk is at most 4 MiB).
pub const MAX_VALUE_BYTES: u32 = 16 << 20;
/// The longest row key.
pub const MAX_KEY_BYTES: u16 = 4096;

const START: u8 = 0x00;
const FILE: u8 = 0x01;
const ROW: u8 = 0x02;
const END: u8 = 0xFF;

/// One entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A file of a data directory, by its name there (no directories).
    File {
        /// Its name.
        name: String,
        /// Its bytes.
        bytes: Vec<u8>,
    },
    /// A row of a store table.
    Row {
        /// The table's name.
        table: String,
        /// The row's key.
        key: Vec<u8>,
        /// The row's value.
        value: Vec<u8>,
    },
}

/// Why an archive could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The stream underneath failed (a wrong passphrase, damage, a cut, a read error).
    #[error("{0}")]
    Read(#[from] SealError),
    /// The entries are not as this format says.
    #[error("the backup's contents are malformed ({0}): it was not written by this sund, or it is damaged")]
    Malformed(String),
    /// An archive of another kind (for example a gateway's).
    #[error("this is a backup of {found}, not of {expected}")]
    Kind {
        /// The kind asked for.
        expected: String,
        /// The kind it holds.
        found: String,
    },
}

impl From<io::Error> for ArchiveError {
    fn from(e: io::Error) -> ArchiveError {
        ArchiveError::Read(SealError::from_io(e))
    }
}

fn malformed(what: impl Into<String>) -> ArchiveError {
    ArchiveError::Malformed(what.into())
}

/// True if `name` is a plain file name: not empty, no separator, not `.` or `..`, no control
/// characters, at most 255 bytes.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == '\\' || c.is_control())
}

fn is_table_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Writes entries into `inner`.
pub struct ArchiveWriter<W: Write> {
    inner: W,
    entries: u64,
}

impl<W: Write> ArchiveWriter<W> {
    /// Starts an archive of `kind`.
    pub fn start(mut inner: W, kind: &str) -> io::Result<ArchiveWriter<W>> {
        assert!(is_plain_name(kind), "an archive kind is a plain name");
        inner.write_all(&[START, FORMAT, kind.len() as u8])?;
        inner.write_all(kind.as_bytes())?;
        Ok(ArchiveWriter { inner, entries: 0 })
    }

    /// Adds a file. Panics on a name or size the format does not allow (the caller's bug).
    pub fn file(&mut self, name: &str, bytes: &[u8]) -> io::Result<()> {
        assert!(is_plain_name(name), "file names in an archive are plain");
        let length = u32::try_from(bytes.len())
            .ok()
            .filter(|&n| n <= MAX_FILE_BYTES)
            .ok_or_else(|| io::Error::other(format!("{name} is larger than a backup carries")))?;
        self.inner.write_all(&[FILE, name.len() as u8])?;
        self.inner.write_all(name.as_bytes())?;
        self.inner.write_all(&length.to_be_bytes())?;
        self.inner.write_all(bytes)?;
        self.entries += 1;
        Ok(())
    }

    /// Adds a row.
    pub fn row(&mut self, table: &str, key: &[u8], value: &[u8]) -> io::Result<()> {
        assert!(is_table_name(table), "table names are lower-case words");
        let key_length = u16::try_from(key.len())
            .ok()
            .filter(|&n| n <= MAX_KEY_BYTES)
            .ok_or_else(|| io::Error::other(format!("a key of {table} is too long")))?;
        let value_length = u32::try_from(value.len())
            .ok()
            .filter(|&n| n <= MAX_VALUE_BYTES)
            .ok_or_else(|| io::Error::other(format!("a value of {table} is too large")))?;
        self.inner.write_all(&[ROW, table.len() as u8])?;
        self.inner.write_all(table.as_bytes())?;
        self.inner.write_all(&key_length.to_be_bytes())?;
        self.inner.write_all(key)?;
        self.inner.write_all(&value_length.to_be_bytes())?;
        self.inner.write_all(value)?;
        self.entries += 1;
        Ok(())
    }

    /// Writes the end entry and hands back the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.inner.write_all(&[END])?;
        self.inner.write_all(&self.entries.to_be_bytes())?;
        Ok(self.inner)
    }
}

/// Reads entries from `inner`.
pub struct ArchiveReader<R: Read> {
    inner: R,
    entries: u64,
    ended: bool,
}

impl<R: Read> ArchiveReader<R> {
    /// Reads the start entry, refusing another kind than `kind`.
    pub fn open(mut inner: R, kind: &str) -> Result<ArchiveReader<R>, ArchiveError> {
        let mut head = [0u8; 3];
        read_exact(&mut inner, &mut head, "the start")?;
        if head[0] != START {
            return Err(malformed("no start entry"));
        }
        if head[1] != FORMAT {
            return Err(malformed(format!(
                "format {}, this sund reads format {FORMAT}: update sund",
                head[1]
            )));
        }
        let found = read_text(&mut inner, head[2] as usize, "the kind")?;
        if found != kind {
            return Err(ArchiveError::Kind {
                expected: kind.into(),
                found,
            });
        }
        Ok(ArchiveReader {
            inner,
            entries: 0,
            ended: false,
        })
    }

    /// The next entry, or `None` after the end entry (checked against the entries read, and
    /// with nothing after it).
    pub fn next_entry(&mut self) -> Result<Option<Entry>, ArchiveError> {
        if self.ended {
            return Ok(None);
        }
        let mut tag = [0u8; 1];
        if read_some(&mut self.inner, &mut tag)? == 0 {
            return Err(malformed("it stops without its end entry"));
        }
        let entry = match tag[0] {
            FILE => {
                let length = read_u8(&mut self.inner)? as usize;
                let name = read_text(&mut self.inner, length, "a file name")?;
                if !is_plain_name(&name) {
                    return Err(malformed(format!("a file named {name:?}")));
                }
                let length = read_u32(&mut self.inner)?;
                if length > MAX_FILE_BYTES {
                    return Err(malformed(format!("a file of {length} bytes")));
                }
                let bytes = read_bytes(&mut self.inner, length as usize, "a file")?;
                Entry::File { name, bytes }
            }
            ROW => {
                let length = read_u8(&mut self.inner)? as usize;
                let table = read_text(&mut self.inner, length, "a table name")?;
                if !is_table_name(&table) {
                    return Err(malformed(format!("a table named {table:?}")));
                }
                let mut key_length = [0u8; 2];
                read_exact(&mut self.inner, &mut key_length, "a key length")?;
                let key_length = u16::from_be_bytes(key_length);
                if key_length > MAX_KEY_BYTES {
                    return Err(malformed(format!("a key of {key_length} bytes")));
                }
                let key = read_bytes(&mut self.inner, key_length as usize, "a key")?;
                let value_length = read_u32(&mut self.inner)?;
                if value_length > MAX_VALUE_BYTES {
                    return Err(malformed(format!("a value of {value_length} bytes")));
                }
                let value = read_bytes(&mut self.inner, value_length as usize, "a value")?;
                Entry::Row { table, key, value }
            }
            END => {
                let mut count = [0u8; 8];
                read_exact(&mut self.inner, &mut count, "the end entry")?;
                let count = u64::from_be_bytes(count);
                if count != self.entries {
                    return Err(malformed(format!(
                        "it says {count} entries, {} were read",
                        self.entries
                    )));
                }
                if read_some(&mut self.inner, &mut tag)? != 0 {
                    return Err(malformed("bytes after the end entry"));
                }
                self.ended = true;
                return Ok(None);
            }
            other => return Err(malformed(format!("an entry of kind {other:#04x}"))),
        };
        self.entries += 1;
        Ok(Some(entry))
    }
}

fn read_some(inner: &mut impl Read, out: &mut [u8]) -> Result<usize, ArchiveError> {
    loop {
        match inner.read(out) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn read_exact(inner: &mut impl Read, out: &mut [u8], what: &str) -> Result<(), ArchiveError> {
    match inner.read_exact(out) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            Err(malformed(format!("it stops inside {what}")))
        }
        Err(e) => Err(e.into()),
    }
}

fn read_u8(inner: &mut impl Read) -> Result<u8, ArchiveError> {
    let mut byte = [0u8; 1];
    read_exact(inner, &mut byte, "an entry")?;
    Ok(byte[0])
}

fn read_u32(inner: &mut impl Read) -> Result<u32, ArchiveError> {
    let mut word = [0u8; 4];
    read_exact(inner, &mut word, "a length")?;
    Ok(u32::from_be_bytes(word))
}

/// Reads `length` bytes, growing the buffer as they arrive (a stream that lies about a length
/// costs what it holds, not what it claims).
fn read_bytes(inner: &mut impl Read, length: usize, what: &str) -> Result<Vec<u8>, ArchiveError> {
    let mut out = Vec::with_capacity(length.min(64 * 1024));
    let got = inner.take(length as u64).read_to_end(&mut out)?;
    if got < length {
        return Err(malformed(format!("it stops inside {what}")));
    }
    Ok(out)
}

fn read_text(inner: &mut impl Read, length: usize, what: &str) -> Result<String, ArchiveError> {
    String::from_utf8(read_bytes(inner, length, what)?)
        .map_err(|_| malformed(format!("{what} that is not UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn write(entries: &[Entry]) -> Vec<u8> {
        let mut writer = ArchiveWriter::start(Vec::new(), "sund-device").unwrap();
        for entry in entries {
            match entry {
                Entry::File { name, bytes } => writer.file(name, bytes).unwrap(),
                Entry::Row { table, key, value } => writer.row(table, key, value).unwrap(),
            }
        }
        writer.finish().unwrap()
    }

    fn read(bytes: &[u8]) -> Result<Vec<Entry>, ArchiveError> {
        let mut reader = ArchiveReader::open(bytes, "sund-device")?;
        let mut out = Vec::new();
        while let Some(entry) = reader.next_entry()? {
            out.push(entry);
        }
        Ok(out)
    }

    fn sample() -> Vec<Entry> {
        vec![
            Entry::File {
                name: "contacts".into(),
                bytes: b"alice\nbob\n".to_vec(),
            },
            Entry::Row {
                table: "files".into(),
                key: vec![1; 48],
                value: vec![2; 300],
            },
        ]
    }

    #[test]
    fn entries_come_back_in_order() {
        assert_eq!(read(&write(&sample())).unwrap(), sample());
        assert_eq!(read(&write(&[])).unwrap(), vec![]);
    }

    #[test]
    fn a_stream_cut_anywhere_is_refused() {
        let bytes = write(&sample());
        for cut in 0..bytes.len() {
            assert!(read(&bytes[..cut]).is_err(), "cut at {cut} was read whole");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(read(&longer), Err(ArchiveError::Malformed(_))));
    }

    #[test]
    fn names_that_leave_the_directory_are_refused() {
        for name in ["../device.key", "..", "a/b", "", "a\u{7}"] {
            let mut bytes = write(&[]);
            bytes.truncate(bytes.len() - 9);
            bytes.extend_from_slice(&[FILE, name.len() as u8]);
            bytes.extend_from_slice(name.as_bytes());
            bytes.extend_from_slice(&0u32.to_be_bytes());
            bytes.extend_from_slice(&[END]);
            bytes.extend_from_slice(&1u64.to_be_bytes());
            assert!(
                matches!(read(&bytes), Err(ArchiveError::Malformed(_))),
                "{name:?}"
            );
        }
    }

    #[test]
    fn another_kind_is_named() {
        let mut writer = ArchiveWriter::start(Vec::new(), "sund-gateway").unwrap();
        writer.file("x", b"").unwrap();
        let bytes = writer.finish().unwrap();
        assert!(matches!(
            read(&bytes),
            Err(ArchiveError::Kind { found, .. }) if found == "sund-gateway"
        ));
    }

    #[test]
    fn a_claimed_length_costs_only_what_is_there() {
        let mut bytes = write(&[]);
        bytes.truncate(bytes.len() - 9);
        bytes.extend_from_slice(&[FILE, 1, b'x']);
        bytes.extend_from_slice(&MAX_FILE_BYTES.to_be_bytes());
        assert!(
            matches!(read(&bytes), Err(ArchiveError::Malformed(m)) if m.contains("inside a file"))
        );
    }

    fn entry() -> impl Strategy<Value = Entry> {
        prop_oneof![
            (
                "[a-z.]{1,20}",
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_filter("plain", |(n, _)| is_plain_name(n))
                .prop_map(|(name, bytes)| Entry::File { name, bytes }),
            (
                "[a-z_]{1,20}",
                proptest::collection::vec(any::<u8>(), 0..60),
                proptest::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(table, key, value)| Entry::Row { table, key, value }),
        ]
    }

    proptest! {
        #[test]
        fn any_entries_come_back(entries in proptest::collection::vec(entry(), 0..12)) {
            prop_assert_eq!(read(&write(&entries)).unwrap(), entries);
        }

        #[test]
        fn any_bytes_are_read_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = read(&bytes);
        }
    }
}
