//! The file secret and what is derived from it: chunk keys, chunk ids and the chunker's seed.

use core::fmt;

use zeroize::Zeroizing;

use crate::env::Entropy;
use crate::hex;

const KEY_CONTEXT: &[u8] = b"sund/file/chunk-key/v1";
const ID_CONTEXT: &[u8] = b"sund/file/chunk-id/v1";
const GEAR_CONTEXT: &[u8] = b"sund/file/gear-seed/v1";

/// A BLAKE3 hash of plaintext: of one chunk, or of a whole file. Only members see these (they
/// travel inside manifests); the gateway never does.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContentHash(pub [u8; 32]);

impl ContentHash {
    /// The BLAKE3 hash of `bytes`.
    pub fn of(bytes: &[u8]) -> ContentHash {
        ContentHash(*blake3::hash(bytes).as_bytes())
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blake3:{}…", hex::encode(&self.0[..8]))
    }
}

/// What the gateway stores a sealed chunk under. Derived from the file secret and the chunk's
/// plaintext hash, so it says nothing about the content to anyone without the secret, and the
/// same chunk sealed under the same secret has the same id (and is stored once).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkId(pub [u8; 32]);

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "chunk:{}…", hex::encode(&self.0[..8]))
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The secret a device seals the files it sends into one conversation under. It keys the
/// chunker's boundaries, each chunk's key and each chunk's id; a manifest carries it to the
/// members. One per (device, conversation): re-sending into the conversation deduplicates,
/// and two conversations never share ids. Zeroized on drop; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct FileSecret(Zeroizing<[u8; 32]>);

impl FileSecret {
    /// A secret from its 32 bytes (as a manifest or the node's store holds it).
    pub fn from_bytes(bytes: [u8; 32]) -> FileSecret {
        FileSecret(Zeroizing::new(bytes))
    }

    /// A fresh secret from `entropy`.
    pub fn generate(entropy: &mut dyn Entropy) -> FileSecret {
        let mut bytes = Zeroizing::new([0u8; 32]);
        entropy.fill_bytes(&mut bytes[..]);
        FileSecret(bytes)
    }

    /// The secret device `key` seals the files it sends into `conversation` under: derived
    /// (BLAKE3 in key-derivation mode, its own context) so that it is the same on every send
    /// and needs no storage, and unrelated between conversations and devices.
    pub fn for_conversation(
        key: &crate::identity::DeviceKey,
        conversation: crate::ids::ConversationId,
    ) -> FileSecret {
        let mut hasher =
            blake3::Hasher::new_derive_key("sund 2026 file secret of a device in a conversation");
        hasher.update(key.seed());
        hasher.update(&conversation.to_bytes());
        FileSecret(Zeroizing::new(*hasher.finalize().as_bytes()))
    }

    /// The secret's bytes, for a manifest's encoding or the node's store.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key chunk `hash` is sealed under.
    pub(super) fn chunk_key(&self, hash: &ContentHash) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.derive(KEY_CONTEXT, &hash.0))
    }

    /// The id chunk `hash` is stored under when sealed under this secret.
    pub fn chunk_id(&self, hash: &ContentHash) -> ChunkId {
        ChunkId(self.derive(ID_CONTEXT, &hash.0))
    }

    /// The seed of the chunker's gear table: boundaries depend on the secret, so chunk lengths
    /// do not fingerprint a file across conversations. Never zero (zero means "unkeyed" to
    /// the chunker).
    pub fn gear_seed(&self) -> u64 {
        let bytes = self.derive(GEAR_CONTEXT, &[]);
        let seed = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        seed.max(1)
    }

    fn derive(&self, context: &[u8], input: &[u8]) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_keyed(&self.0);
        hasher.update(&(context.len() as u64).to_le_bytes());
        hasher.update(context);
        hasher.update(input);
        *hasher.finalize().as_bytes()
    }
}

impl fmt::Debug for FileSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FileSecret(..)")
    }
}
