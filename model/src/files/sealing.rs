//! Sealing one chunk: Padmé padding, then AES-256-GCM under the chunk's own key.
//!
//! The key is derived from the file secret and the chunk's plaintext hash, so it seals exactly
//! one plaintext and a fixed nonce is safe (deterministic encryption is what lets the same
//! chunk deduplicate). The chunk id is the associated data: a sealed chunk opens only under
//! the id it was stored as.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use super::{ChunkEntry, ChunkId, ContentHash, FileSecret};

/// Bytes the AEAD tag adds.
const TAG_BYTES: usize = 16;
/// The byte that ends a chunk's plaintext before its zero padding (ISO/IEC 7816-4).
const PAD_MARK: u8 = 0x80;

/// A chunk as the gateway stores it: its id and its ciphertext.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedChunk {
    /// What the gateway stores it under.
    pub id: ChunkId,
    /// Padded plaintext, encrypted, with its tag.
    pub ciphertext: Vec<u8>,
}

impl core::fmt::Debug for SealedChunk {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "SealedChunk({:?}, {} bytes)",
            self.id,
            self.ciphertext.len()
        )
    }
}

/// Why a sealed chunk did not open to what its manifest entry promised.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// The ciphertext is not as long as the entry's length seals to: cut short or padded out
    /// in flight or at rest.
    #[error("chunk {id} is {got} bytes, its manifest says it seals to {expected}: it was cut or altered; fetch it again")]
    WrongLength {
        /// The chunk.
        id: ChunkId,
        /// Length the manifest implies.
        expected: usize,
        /// Length received.
        got: usize,
    },
    /// The AEAD tag does not verify: altered in flight or at rest, or sealed under another id.
    #[error("chunk {id} failed authentication: it was altered in flight or on the gateway; fetch it again")]
    Tampered {
        /// The chunk.
        id: ChunkId,
    },
    /// Opened, but the plaintext is not what the manifest names (a member sealed other bytes
    /// under this id, or broke the padding).
    #[error("chunk {id} decrypts to other content than its manifest names: the sender's manifest lies about it")]
    WrongContent {
        /// The chunk.
        id: ChunkId,
    },
}

/// Padmé (Nikitin et al., PETS 2019): `len` rounded up so that it leaks O(log log len) bits,
/// at most 12 % more bytes (about 3 % at a megabyte).
fn padme(len: u64) -> u64 {
    if len < 2 {
        return len;
    }
    let exponent = 63 - u64::from(len.leading_zeros()); // floor(log2 len)
    let exponent_bits = 64 - u64::from(exponent.leading_zeros()); // floor(log2 exponent) + 1
    let low_bits = exponent - exponent_bits;
    let mask = (1u64 << low_bits) - 1;
    (len + mask) & !mask
}

/// The padded plaintext length of a `len`-byte chunk: Padmé of `len` plus the pad mark.
pub fn padded_len(len: usize) -> usize {
    usize::try_from(padme(len as u64 + 1)).expect("chunk lengths are small")
}

/// The sealed length of a `len`-byte chunk: what the gateway stores and moves.
pub fn sealed_len(len: usize) -> usize {
    padded_len(len) + TAG_BYTES
}

fn key(secret: &FileSecret, hash: &ContentHash) -> LessSafeKey {
    let bytes = secret.chunk_key(hash);
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &bytes[..]).expect("a 32-byte key"))
}

/// Seals `plain` under `secret`: its manifest entry and what the gateway stores.
pub fn seal_chunk(secret: &FileSecret, plain: &[u8]) -> (ChunkEntry, SealedChunk) {
    let mut buffer = Vec::with_capacity(sealed_len(plain.len()));
    buffer.extend_from_slice(plain);
    seal_chunk_in_place(secret, buffer)
}

/// Seals the chunk `buffer` holds, in place: the same as [`seal_chunk`] without copying the
/// plaintext (a buffer with [`sealed_len`] of capacity is never reallocated).
pub fn seal_chunk_in_place(secret: &FileSecret, mut buffer: Vec<u8>) -> (ChunkEntry, SealedChunk) {
    let plain_len = buffer.len();
    let len = u32::try_from(plain_len).expect("a chunk is at most a few MiB");
    let hash = ContentHash::of(&buffer);
    let id = secret.chunk_id(&hash);
    let padded = padded_len(plain_len);
    buffer.reserve_exact(padded + TAG_BYTES - plain_len);
    buffer.push(PAD_MARK);
    buffer.resize(padded, 0);
    key(secret, &hash)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(&id.0),
            &mut buffer,
        )
        .expect("a chunk is far below AES-GCM's length limit");
    debug_assert_eq!(buffer.len(), sealed_len(plain_len));
    let entry = ChunkEntry { hash, len };
    (
        entry,
        SealedChunk {
            id,
            ciphertext: buffer,
        },
    )
}

/// Opens a sealed chunk that `entry` of a manifest sealed under `secret` names, in place.
/// Checks the length, the tag, the padding and the plaintext hash.
pub fn open_chunk(
    secret: &FileSecret,
    entry: &ChunkEntry,
    mut ciphertext: Vec<u8>,
) -> Result<Vec<u8>, ChunkError> {
    let id = secret.chunk_id(&entry.hash);
    let len = entry.len as usize;
    let expected = sealed_len(len);
    if ciphertext.len() != expected {
        return Err(ChunkError::WrongLength {
            id,
            expected,
            got: ciphertext.len(),
        });
    }
    let plain_len = key(secret, &entry.hash)
        .open_in_place(
            Nonce::assume_unique_for_key([0; 12]),
            Aad::from(&id.0),
            &mut ciphertext,
        )
        .map_err(|_| ChunkError::Tampered { id })?
        .len();
    debug_assert_eq!(plain_len, padded_len(len));
    let padding_ok =
        ciphertext[len] == PAD_MARK && ciphertext[len + 1..plain_len].iter().all(|&b| b == 0);
    ciphertext.truncate(len);
    if !padding_ok || ContentHash::of(&ciphertext) != entry.hash {
        return Err(ChunkError::WrongContent { id });
    }
    Ok(ciphertext)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padme_matches_the_papers_examples_and_never_shrinks() {
        // E = floor(log2 L), S = floor(log2 E) + 1, round up to a multiple of 2^(E - S).
        assert_eq!(padme(0), 0);
        assert_eq!(padme(1), 1);
        assert_eq!(padme(9), 10); // E 3, S 2: multiples of 2
        assert_eq!(padme(1_000_000), 1_015_808); // E 19, S 5: multiples of 2^14
        for len in (0..5_000u64).chain([(1 << 20) - 1, 1 << 20, 4 << 20]) {
            let padded = padme(len);
            assert!(padded >= len);
            assert!(
                padded as f64 <= len as f64 * 1.12 + 1.0,
                "{len} -> {padded}"
            );
        }
    }
}
