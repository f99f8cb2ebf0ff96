//! Hexadecimal text for ids, keys and fingerprints: one encoder and one bounded decoder for the
//! whole project.

/// Lower-case hex of `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    encode_with(bytes, b"0123456789abcdef")
}

/// Upper-case hex of `bytes` (QR alphanumeric mode has no lower-case letters).
pub fn encode_upper(bytes: &[u8]) -> String {
    encode_with(bytes, b"0123456789ABCDEF")
}

fn encode_with(bytes: &[u8], digits: &[u8; 16]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(digits[usize::from(b >> 4)]));
        out.push(char::from(digits[usize::from(b & 0x0f)]));
    }
    out
}

/// The bytes of `text` (either case), or `None` if it is not an even number of hex digits.
pub fn decode(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    text.as_bytes()
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// Exactly `N` bytes from `text`, or `None`.
pub fn decode_array<const N: usize>(text: &str) -> Option<[u8; N]> {
    decode(text)?.try_into().ok()
}

fn digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_in_either_case_and_refuses_what_is_not_hex() {
        let bytes = [0x00, 0x7f, 0xab, 0xff];
        assert_eq!(encode(&bytes), "007fabff");
        assert_eq!(encode_upper(&bytes), "007FABFF");
        assert_eq!(decode("007FabFF"), Some(bytes.to_vec()));
        assert_eq!(decode_array::<4>("007fabff"), Some(bytes));
        assert_eq!(decode_array::<3>("007fabff"), None);
        assert_eq!(decode("abc"), None, "odd length");
        assert_eq!(decode("zz"), None, "not a digit");
        assert_eq!(decode("é1"), None, "multi-byte characters");
    }
}
