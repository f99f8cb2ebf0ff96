//! Domain fields shared by the certificate and CRL encodings (on the crate's bounded reader).

use crate::codec::Reader;

/// Appends a domain as one length byte and its bytes (the caller checked `valid_domain`).
pub(crate) fn put_domain(out: &mut Vec<u8>, domain: &str) {
    let len = u8::try_from(domain.len()).expect("a valid domain is at most 253 bytes");
    out.push(len);
    out.extend_from_slice(domain.as_bytes());
}

/// Reads a domain written by [`put_domain`]; `None` if truncated or not a valid domain.
pub(crate) fn get_domain(reader: &mut Reader<'_>) -> Option<String> {
    let len = usize::from(reader.u8()?);
    let bytes = reader.take(len)?;
    let domain = core::str::from_utf8(bytes).ok()?;
    super::valid_domain(domain).then(|| domain.to_string())
}
