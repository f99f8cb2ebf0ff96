//! A bounded big-endian reader and writer shared by the certificate and CRL encodings.

/// Reads fixed-size fields from a byte slice; every read checks the remaining length.
pub(super) struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes }
    }

    /// The next `n` bytes, or `None` if fewer remain.
    pub(super) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }

    pub(super) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).map(|b| b.try_into().expect("took N bytes"))
    }

    pub(super) fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    pub(super) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    pub(super) fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    /// Bytes left.
    pub(super) fn remaining(&self) -> usize {
        self.bytes.len()
    }
}

/// Appends a domain as one length byte and its bytes (the caller checked `valid_domain`).
pub(super) fn put_domain(out: &mut Vec<u8>, domain: &str) {
    let len = u8::try_from(domain.len()).expect("a valid domain is at most 253 bytes");
    out.push(len);
    out.extend_from_slice(domain.as_bytes());
}

/// Reads a domain written by [`put_domain`]; `None` if truncated or not a valid domain.
pub(super) fn get_domain(reader: &mut Reader<'_>) -> Option<String> {
    let len = usize::from(reader.u8()?);
    let bytes = reader.take(len)?;
    let domain = core::str::from_utf8(bytes).ok()?;
    super::valid_domain(domain).then(|| domain.to_string())
}
