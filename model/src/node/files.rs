//! A device's files: its content-addressed store of plaintext chunks, the files it is
//! receiving with their per-chunk progress, and the receipts it signs when a file is complete.
//!
//! Rules:
//! - Chunks are stored by the BLAKE3 of their plaintext, once, whatever file or conversation
//!   brought them. Offering a manifest answers only the chunks this device does not hold *in
//!   that conversation*, so a file it already has there, or an edited version of one, moves
//!   almost nothing. Chunks held from other conversations are fetched again (their bytes are
//!   still stored once): otherwise any member could learn whether this device holds some
//!   content from elsewhere, by sending a manifest of guessed hashes and watching for the
//!   receipt. (Chunks cut under another sender's secret rarely match anyway.)
//! - Every chunk is verified before it is kept ([`crate::files::open_chunk`]: length, tag,
//!   padding, hash). A chunk that fails is not kept and stays needed: the driver fetches it
//!   again (and reports it, so the gateway can check its copy).
//! - Progress is durable per chunk: the chunk and its index record go into one batch, so a
//!   crash resumes at a chunk boundary, never inside one and never fetching a kept chunk again.
//! - A file is complete when every chunk is held; the driver then assembles it
//!   ([`assemble`], which checks every chunk read back against its hash, so a damaged store
//!   never yields a wrong file) and the device signs a [`Receipt`] over the manifest digest for
//!   the sender to show.
//!
//! The plaintext lives in [`CHUNK_BYTES_TABLE`]; in memory only an index of hashes and lengths,
//! so a device's memory does not grow with what it holds. Not routed yet (issue 16, next step).

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::codec::Reader;
use crate::env::{scan_all, StoreError, StoreRead, Table, WriteBatch};
use crate::files::{open_chunk, ChunkError, ChunkId, ContentHash, Manifest, ManifestDigest};
use crate::identity::{DeviceKey, DevicePublicKey};
use crate::ids::{ConversationId, DeviceId};

/// Which plaintext chunks the device holds for each conversation: key `conversation(16) ++
/// hash(32)`, value the length (u32).
pub const CHUNK_INDEX_TABLE: Table = Table("file_chunk_index");
/// The plaintext chunks: key the chunk's hash (32), value its bytes (once, whichever
/// conversations hold it).
pub const CHUNK_BYTES_TABLE: Table = Table("file_chunk_bytes");
/// Files received or being received: key `conversation(16) ++ manifest digest(32)`, value
/// the manifest.
pub const FILES_TABLE: Table = Table("files");

const RECEIPT_CONTEXT: &[u8] = b"sund/file-receipt/v1";

/// A file the device knows of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRecord {
    /// The conversation it came in.
    pub conversation: ConversationId,
    /// Its manifest.
    pub manifest: Manifest,
}

/// What to fetch for a file: its chunks this device lacks, each once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Needed {
    /// The file.
    pub digest: ManifestDigest,
    /// `(chunk index in the manifest, gateway id)` of each chunk to fetch, the first index of
    /// a chunk that occurs more than once.
    pub chunks: Vec<(usize, ChunkId)>,
    /// Plaintext bytes still to fetch.
    pub bytes: u64,
    /// Plaintext bytes of the file already held (a chunk that occurs twice counts twice).
    pub held_bytes: u64,
}

/// What a verified chunk changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkProgress {
    /// Kept; this many distinct chunks of the file are still needed.
    Kept {
        /// Chunks still needed.
        remaining: usize,
    },
    /// Already held (a copy fetched twice, or another file brought it): nothing written.
    AlreadyHeld,
}

/// Why an arriving chunk was not kept.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReceiveError {
    /// No such file.
    #[error("no file {0:?} is being received")]
    UnknownFile(ManifestDigest),
    /// The manifest has no chunk at that index.
    #[error("the file has no chunk {index}")]
    NoSuchChunk {
        /// The index asked for.
        index: usize,
    },
    /// The chunk failed verification; it stays needed.
    #[error(transparent)]
    Chunk(#[from] ChunkError),
}

/// A device's signed statement that it holds a file, complete and verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The file.
    pub digest: ManifestDigest,
    /// The device that holds it.
    pub device: DeviceId,
    /// Its signature over [`RECEIPT_CONTEXT`] and the digest.
    pub signature: [u8; 64],
}

impl Receipt {
    /// `key`'s receipt for `digest`.
    pub fn sign(key: &DeviceKey, digest: ManifestDigest) -> Receipt {
        Receipt {
            digest,
            device: key.device_id(),
            signature: key.sign(&receipt_message(&digest)),
        }
    }

    /// True if `public` (the device's key, from its certificate) signed this receipt.
    pub fn verify(&self, public: &DevicePublicKey) -> bool {
        public.device_id() == self.device
            && public.verify(&receipt_message(&self.digest), &self.signature)
    }
}

/// The first bytes of a receipt message body (format 1); NUL first, as a file message's, so
/// no typed text starts with it.
pub const RECEIPT_MESSAGE_MAGIC: &[u8; 4] = b"\0SR\x01";
/// A receipt message body's length: magic, digest, device, signature.
pub const RECEIPT_MESSAGE_BYTES: usize = 4 + 32 + 16 + 64;

impl Receipt {
    /// The message body that carries this receipt into the file's conversation (encrypted
    /// by MLS like any message, so only members read it).
    pub fn encode_message(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RECEIPT_MESSAGE_BYTES);
        out.extend_from_slice(RECEIPT_MESSAGE_MAGIC);
        out.extend_from_slice(&self.digest.0);
        out.extend_from_slice(&self.device.to_bytes());
        out.extend_from_slice(&self.signature);
        debug_assert_eq!(out.len(), RECEIPT_MESSAGE_BYTES);
        out
    }

    /// `None` for a body that is not a receipt; `Some(None)` for one of the wrong length.
    pub fn decode_message(body: &[u8]) -> Option<Option<Receipt>> {
        let rest = body.strip_prefix(RECEIPT_MESSAGE_MAGIC)?;
        let mut reader = Reader::new(rest);
        let (Some(digest), Some(device), Some(signature), 0) = (
            reader.array(),
            reader.array(),
            reader.array(),
            reader.remaining(),
        ) else {
            return Some(None);
        };
        Some(Some(Receipt {
            digest: ManifestDigest(digest),
            device: DeviceId::from_bytes(device),
            signature,
        }))
    }
}

fn receipt_message(digest: &ManifestDigest) -> Vec<u8> {
    let mut message = RECEIPT_CONTEXT.to_vec();
    message.extend_from_slice(&digest.0);
    message
}

/// A file's place: the conversation it came in and its manifest digest.
pub type FileAt = (ConversationId, ManifestDigest);

/// A file being received or received, with the chunks it still lacks.
///
/// The three views of what it lacks are kept in step, so that every chunk's arrival costs a
/// few map operations whatever the file's size: deriving ids or walking the manifest per
/// arrival made a 4 GiB fetch cost a third more CPU than four 1 GiB ones.
#[derive(Clone, Debug, Default)]
struct Lacking {
    /// Distinct chunk hashes of the file not held in its conversation yet → the first index
    /// of each in the manifest.
    by_hash: BTreeMap<ContentHash, usize>,
    /// The same chunks by that index, with their gateway ids: what to fetch, in file order.
    by_index: BTreeMap<usize, ChunkId>,
    /// The same chunks by gateway id → index, for arrivals.
    by_id: BTreeMap<ChunkId, usize>,
    /// Their plaintext bytes (each distinct chunk once).
    bytes: u64,
}

impl Lacking {
    fn add(&mut self, manifest: &Manifest, index: usize) {
        let entry = &manifest.chunks[index];
        if self.by_hash.contains_key(&entry.hash) {
            return;
        }
        let id = manifest.chunk_id(index);
        self.by_hash.insert(entry.hash, index);
        self.by_index.insert(index, id);
        self.by_id.insert(id, index);
        self.bytes += u64::from(entry.len);
    }

    /// Removes chunk `hash`, if lacking.
    fn remove(&mut self, manifest: &Manifest, hash: &ContentHash) {
        if let Some(index) = self.by_hash.remove(hash) {
            let id = self.by_index.remove(&index).expect("kept in step");
            self.by_id.remove(&id);
            self.bytes -= u64::from(manifest.chunks[index].len);
        }
    }

    fn assert_in_step(&self) {
        debug_assert!(
            self.by_hash.len() == self.by_index.len() && self.by_index.len() == self.by_id.len(),
            "the views of a file's lacking chunks are kept in step"
        );
    }
}

#[derive(Clone, Debug)]
struct Receiving {
    record: FileRecord,
    /// What it lacks in its conversation.
    lacking: Lacking,
}

/// A device's files and its chunk store.
#[derive(Clone, Debug, Default)]
pub struct DeviceFiles {
    /// Held chunks per conversation: (conversation, hash) → plaintext length.
    held: BTreeMap<(ConversationId, ContentHash), u32>,
    /// Every file known, complete or not.
    files: BTreeMap<FileAt, Receiving>,
}

impl DeviceFiles {
    /// An empty store.
    pub fn new() -> DeviceFiles {
        DeviceFiles::default()
    }

    /// The store as the device's database holds it (reads the index and the manifests, not
    /// the chunk bytes).
    pub fn recover(store: &dyn StoreRead) -> Result<DeviceFiles, StoreError> {
        let mut files = DeviceFiles::new();
        scan_all(store, CHUNK_INDEX_TABLE, |key, value| {
            let corrupt = || StoreError::Corrupt {
                table: CHUNK_INDEX_TABLE.0,
                reason: "not a conversation, chunk hash and length".into(),
            };
            let mut reader = Reader::new(key);
            let conversation = reader.array().map(ConversationId::from_bytes);
            let hash = reader.array().map(ContentHash);
            let len = value.try_into().ok().map(u32::from_be_bytes);
            let (Some(conversation), Some(hash), Some(len), 0) =
                (conversation, hash, len, reader.remaining())
            else {
                return Err(corrupt());
            };
            files.held.insert((conversation, hash), len);
            Ok(())
        })?;
        scan_all(store, FILES_TABLE, |key, value| {
            let corrupt = |reason: String| StoreError::Corrupt {
                table: FILES_TABLE.0,
                reason,
            };
            let mut reader = Reader::new(key);
            let conversation = reader.array().map(ConversationId::from_bytes);
            let digest = reader.array().map(ManifestDigest);
            let (Some(conversation), Some(digest), 0) = (conversation, digest, reader.remaining())
            else {
                return Err(corrupt("key is not a conversation and a digest".into()));
            };
            let manifest = Manifest::decode(value).map_err(|e| corrupt(e.to_string()))?;
            if manifest.digest() != digest {
                return Err(corrupt("the manifest does not match its key".into()));
            }
            files.insert(conversation, manifest);
            Ok(())
        })?;
        Ok(files)
    }

    fn insert(&mut self, conversation: ConversationId, manifest: Manifest) -> FileAt {
        let at = (conversation, manifest.digest());
        let mut lacking = Lacking::default();
        for (index, chunk) in manifest.chunks.iter().enumerate() {
            if !self.held.contains_key(&(conversation, chunk.hash)) {
                lacking.add(&manifest, index);
            }
        }
        lacking.assert_in_step();
        let record = FileRecord {
            conversation,
            manifest,
        };
        self.files.insert(at, Receiving { record, lacking });
        at
    }

    /// A manifest arrived in `conversation`: remember the file and answer what to fetch.
    /// Offering a known file again answers what it still needs (how a receiver resumes).
    pub fn offer(
        &mut self,
        conversation: ConversationId,
        manifest: Manifest,
        writes: &mut WriteBatch,
    ) -> Needed {
        let digest = manifest.digest();
        if !self.files.contains_key(&(conversation, digest)) {
            let mut key = conversation.to_bytes().to_vec();
            key.extend_from_slice(&digest.0);
            writes.put(FILES_TABLE, key, manifest.encode());
            self.insert(conversation, manifest);
        }
        self.needed(conversation, digest).expect("just recorded")
    }

    /// What file `digest` of `conversation` still needs, or `None` for an unknown file. Walks
    /// the manifest: per arrival, use [`DeviceFiles::lacking`], [`DeviceFiles::lacking_index`]
    /// and [`DeviceFiles::lacking_bytes`] instead.
    pub fn needed(&self, conversation: ConversationId, digest: ManifestDigest) -> Option<Needed> {
        let receiving = self.files.get(&(conversation, digest))?;
        let manifest = &receiving.record.manifest;
        let lacking = &receiving.lacking;
        let held_bytes = manifest
            .chunks
            .iter()
            .filter(|c| !lacking.by_hash.contains_key(&c.hash))
            .map(|c| u64::from(c.len))
            .sum();
        Some(Needed {
            digest,
            chunks: lacking.by_index.iter().map(|(&i, &id)| (i, id)).collect(),
            bytes: lacking.bytes,
            held_bytes,
        })
    }

    /// The chunks file `digest` of `conversation` lacks, in file order: `(first index, gateway
    /// id)`, as in [`Needed::chunks`], without building the list.
    pub fn lacking(
        &self,
        conversation: ConversationId,
        digest: ManifestDigest,
    ) -> impl Iterator<Item = (usize, ChunkId)> + '_ {
        self.files
            .get(&(conversation, digest))
            .into_iter()
            .flat_map(|r| r.lacking.by_index.iter().map(|(&i, &id)| (i, id)))
    }

    /// The index of chunk `id` of file `digest` in `conversation`, if the file lacks it.
    pub fn lacking_index(
        &self,
        conversation: ConversationId,
        digest: ManifestDigest,
        id: ChunkId,
    ) -> Option<usize> {
        self.files
            .get(&(conversation, digest))?
            .lacking
            .by_id
            .get(&id)
            .copied()
    }

    /// Plaintext bytes file `digest` of `conversation` still lacks ([`Needed::bytes`]), or
    /// `None` for an unknown file.
    pub fn lacking_bytes(
        &self,
        conversation: ConversationId,
        digest: ManifestDigest,
    ) -> Option<u64> {
        self.files
            .get(&(conversation, digest))
            .map(|r| r.lacking.bytes)
    }

    /// Chunk `index` of file `digest` in `conversation` arrived sealed: verify it and keep its
    /// plaintext, durably in `writes` with its index record.
    pub fn chunk_arrived(
        &mut self,
        conversation: ConversationId,
        digest: ManifestDigest,
        index: usize,
        ciphertext: Vec<u8>,
        writes: &mut WriteBatch,
    ) -> Result<ChunkProgress, ReceiveError> {
        let at = (conversation, digest);
        let receiving = self
            .files
            .get(&at)
            .ok_or(ReceiveError::UnknownFile(digest))?;
        let manifest = &receiving.record.manifest;
        let entry = *manifest
            .chunks
            .get(index)
            .ok_or(ReceiveError::NoSuchChunk { index })?;
        if self.held.contains_key(&(conversation, entry.hash)) {
            return Ok(ChunkProgress::AlreadyHeld);
        }
        let plain = open_chunk(&manifest.secret, &entry, ciphertext)?;
        debug_assert_eq!(plain.len(), entry.len as usize);
        writes.put(CHUNK_BYTES_TABLE, entry.hash.0.to_vec(), Bytes::from(plain));
        let mut key = conversation.to_bytes().to_vec();
        key.extend_from_slice(&entry.hash.0);
        writes.put(CHUNK_INDEX_TABLE, key, entry.len.to_be_bytes().to_vec());
        self.held.insert((conversation, entry.hash), entry.len);
        // Every file of the conversation that lacked it has it now.
        let digests =
            (conversation, ManifestDigest([0; 32]))..=(conversation, ManifestDigest([0xff; 32]));
        for (_, other) in self.files.range_mut(digests) {
            other.lacking.remove(&other.record.manifest, &entry.hash);
            other.lacking.assert_in_step();
        }
        let remaining = self.files[&at].lacking.by_hash.len();
        Ok(ChunkProgress::Kept { remaining })
    }

    /// The device's copy of chunk `hash` turned out missing or damaged (found while saving a
    /// file): it is no longer held in any conversation, its bytes and index records go in
    /// `writes`, and every file that has it lacks it again, so fetching such a file asks for
    /// it anew instead of promising a chunk that is not there. Returns those files.
    pub fn chunk_lost(&mut self, hash: ContentHash, writes: &mut WriteBatch) -> Vec<FileAt> {
        let conversations: Vec<ConversationId> = self
            .held
            .keys()
            .filter(|(_, h)| *h == hash)
            .map(|&(c, _)| c)
            .collect();
        for conversation in &conversations {
            self.held.remove(&(*conversation, hash));
            let mut key = conversation.to_bytes().to_vec();
            key.extend_from_slice(&hash.0);
            writes.delete(CHUNK_INDEX_TABLE, key);
        }
        writes.delete(CHUNK_BYTES_TABLE, hash.0.to_vec());
        let mut lacking = Vec::new();
        for (at, receiving) in &mut self.files {
            let manifest = &receiving.record.manifest;
            if let Some(index) = manifest.chunks.iter().position(|c| c.hash == hash) {
                receiving.lacking.add(manifest, index);
                receiving.lacking.assert_in_step();
                lacking.push(*at);
            }
        }
        lacking
    }

    /// True if chunk `hash` is held in `conversation` (its bytes should be in the store).
    pub fn holds(&self, conversation: ConversationId, hash: &ContentHash) -> bool {
        self.held.contains_key(&(conversation, *hash))
    }

    /// True when every chunk of file `digest` in `conversation` is held.
    pub fn is_complete(&self, conversation: ConversationId, digest: ManifestDigest) -> bool {
        self.files
            .get(&(conversation, digest))
            .is_some_and(|r| r.lacking.by_hash.is_empty())
    }

    /// A file known to this device.
    pub fn file(
        &self,
        conversation: ConversationId,
        digest: ManifestDigest,
    ) -> Option<&FileRecord> {
        self.files.get(&(conversation, digest)).map(|r| &r.record)
    }

    /// Every file known, by conversation and digest.
    pub fn files(&self) -> impl Iterator<Item = &FileRecord> {
        self.files.values().map(|r| &r.record)
    }

    /// Distinct chunks held (per conversation), and their plaintext bytes.
    pub fn held(&self) -> (usize, u64) {
        (
            self.held.len(),
            self.held.values().map(|&len| u64::from(len)).sum(),
        )
    }
}

/// Why a complete file could not be assembled; nothing should be saved.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AssemblyError {
    /// A chunk the index says is held is not in the store (or has another length).
    #[error("chunk {index} of the file was missing from this device's store")]
    MissingChunk {
        /// Its index.
        index: usize,
    },
    /// A chunk read back from the store does not hash to what the manifest names.
    #[error("chunk {index} of the file was damaged in this device's store")]
    Damaged {
        /// Its index.
        index: usize,
    },
}

/// Writes file `manifest` to `sink` chunk by chunk, reading each chunk with `chunk` (from the
/// device's store) and checking it against its hash. The caller writes to a temporary file
/// and renames it only on `Ok`, so no half-written or wrong file is left.
pub fn assemble(
    manifest: &Manifest,
    mut chunk: impl FnMut(&ContentHash) -> Option<Vec<u8>>,
    mut sink: impl FnMut(&[u8]),
) -> Result<(), AssemblyError> {
    for (index, entry) in manifest.chunks.iter().enumerate() {
        let bytes = chunk(&entry.hash)
            .filter(|b| b.len() == entry.len as usize)
            .ok_or(AssemblyError::MissingChunk { index })?;
        if ContentHash::of(&bytes) != entry.hash {
            return Err(AssemblyError::Damaged { index });
        }
        sink(&bytes);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::{MemStore, Store};
    use crate::files::tests::noise;
    use crate::files::{seal_file, FileName, FileSecret, SealedChunk};
    use std::collections::BTreeSet;

    const CONV: ConversationId = ConversationId(3);

    fn sealed(data: &[u8], secret: u8) -> (Manifest, Vec<SealedChunk>) {
        seal_file(
            FileName::new("f.bin").unwrap(),
            FileSecret::from_bytes([secret; 32]),
            data,
        )
        .unwrap()
    }

    fn commit(store: &mut MemStore, f: impl FnOnce(&mut WriteBatch)) {
        let mut writes = WriteBatch::default();
        f(&mut writes);
        store.commit(writes).unwrap();
    }

    fn assembled(
        files: &DeviceFiles,
        store: &MemStore,
        manifest: &Manifest,
    ) -> Result<Vec<u8>, AssemblyError> {
        let mut out = Vec::new();
        assemble(
            manifest,
            |hash| store.get(CHUNK_BYTES_TABLE, &hash.0).unwrap(),
            |bytes| out.extend_from_slice(bytes),
        )?;
        assert!(files.is_complete(CONV, manifest.digest()));
        Ok(out)
    }

    #[test]
    fn a_receive_interrupted_by_a_crash_resumes_at_a_chunk_boundary() {
        let data = noise(5 << 20, 1);
        let (manifest, chunks) = sealed(&data, 1);
        assert!(chunks.len() >= 3);
        let mut store = MemStore::default();
        let mut files = DeviceFiles::new();
        let digest = manifest.digest();
        let mut needed = None;
        commit(&mut store, |w| {
            needed = Some(files.offer(CONV, manifest.clone(), w))
        });
        assert_eq!(needed.unwrap().chunks.len(), chunks.len());
        commit(&mut store, |w| {
            files
                .chunk_arrived(CONV, digest, 0, chunks[0].ciphertext.clone(), w)
                .unwrap();
        });
        // The device crashes; it recovers what was committed.
        let mut files = DeviceFiles::recover(&store).unwrap();
        let needed = files.needed(CONV, digest).unwrap();
        assert_eq!(
            needed.chunks.len(),
            chunks.len() - 1,
            "chunk 0 is not fetched again"
        );
        assert_eq!(needed.held_bytes, u64::from(manifest.chunks[0].len));
        for (index, _) in needed.chunks {
            commit(&mut store, |w| {
                files
                    .chunk_arrived(CONV, digest, index, chunks[index].ciphertext.clone(), w)
                    .unwrap();
            });
        }
        assert_eq!(assembled(&files, &store, &manifest).unwrap(), data);
    }

    #[test]
    fn a_file_already_held_or_an_edited_one_fetches_almost_nothing() {
        let data = noise(6 << 20, 2);
        let (first, chunks) = sealed(&data, 4);
        let mut store = MemStore::default();
        let mut files = DeviceFiles::new();
        commit(&mut store, |w| {
            files.offer(CONV, first.clone(), w);
            for (i, chunk) in chunks.iter().enumerate() {
                files
                    .chunk_arrived(CONV, first.digest(), i, chunk.ciphertext.clone(), w)
                    .unwrap();
            }
        });
        // The same bytes under another name: nothing to fetch.
        let mut renamed = first.clone();
        renamed.name = FileName::new("copy.bin").unwrap();
        let mut needed = None;
        commit(&mut store, |w| {
            needed = Some(files.offer(CONV, renamed.clone(), w))
        });
        assert_eq!(needed.unwrap().bytes, 0);
        // An edit in the middle: only the chunk around it.
        let mut edited = data.clone();
        edited[3 << 20] ^= 0xff;
        let (second, _) = sealed(&edited, 4);
        let mut needed = None;
        commit(&mut store, |w| needed = Some(files.offer(CONV, second, w)));
        let needed = needed.unwrap();
        assert_eq!(needed.chunks.len(), 1);
        assert!(needed.bytes <= crate::files::CHUNK_BYTES_MAX as u64);
        assert!(needed.held_bytes >= (6 << 20) - needed.bytes);
    }

    /// A member of another conversation must not learn, from a manifest of guessed hashes and
    /// an instant receipt, that this device holds some content: held chunks count only in the
    /// conversation that brought them. Within one, two files share what either brought.
    #[test]
    fn held_chunks_count_only_in_their_own_conversation() {
        const ELSEWHERE: ConversationId = ConversationId(4);
        let (manifest, chunks) = sealed(&noise(2_000, 9), 8);
        let mut files = DeviceFiles::new();
        let mut writes = WriteBatch::default();
        files.offer(CONV, manifest.clone(), &mut writes);
        let digest = manifest.digest();
        files
            .chunk_arrived(CONV, digest, 0, chunks[0].ciphertext.clone(), &mut writes)
            .unwrap();
        assert!(files.is_complete(CONV, digest));
        let probe = files.offer(ELSEWHERE, manifest.clone(), &mut writes);
        assert_eq!(
            probe.chunks.len(),
            1,
            "fetched again, so nothing completes at once"
        );
        assert!(!files.is_complete(ELSEWHERE, digest));
        // Another file of the same conversation listing the same chunk: held already.
        let mut renamed = manifest.clone();
        renamed.name = FileName::new("again.bin").unwrap();
        assert_eq!(files.offer(CONV, renamed.clone(), &mut writes).bytes, 0);
        assert!(files.is_complete(CONV, renamed.digest()));
        // And a chunk that arrives for one file completes every file of the conversation
        // that lacked it.
        let mut both = DeviceFiles::new();
        both.offer(ELSEWHERE, manifest.clone(), &mut writes);
        both.offer(ELSEWHERE, renamed.clone(), &mut writes);
        assert_eq!(
            both.chunk_arrived(
                ELSEWHERE,
                digest,
                0,
                chunks[0].ciphertext.clone(),
                &mut writes
            ),
            Ok(ChunkProgress::Kept { remaining: 0 })
        );
        assert!(both.is_complete(ELSEWHERE, renamed.digest()));
    }

    #[test]
    fn a_bad_chunk_is_not_kept_and_stays_needed() {
        let (manifest, chunks) = sealed(&noise(1_000, 3), 5);
        let mut files = DeviceFiles::new();
        let mut writes = WriteBatch::default();
        files.offer(CONV, manifest.clone(), &mut writes);
        let mut bad = chunks[0].ciphertext.clone();
        bad[7] ^= 1;
        let mut writes = WriteBatch::default();
        let err = files
            .chunk_arrived(CONV, manifest.digest(), 0, bad, &mut writes)
            .unwrap_err();
        assert!(matches!(
            err,
            ReceiveError::Chunk(ChunkError::Tampered { .. })
        ));
        assert!(writes.is_empty(), "nothing of it is kept");
        assert_eq!(
            files.needed(CONV, manifest.digest()).unwrap().chunks.len(),
            1
        );
        assert!(matches!(
            files.chunk_arrived(
                CONV,
                manifest.digest(),
                9,
                chunks[0].ciphertext.clone(),
                &mut writes
            ),
            Err(ReceiveError::NoSuchChunk { index: 9 })
        ));
        assert_eq!(
            files.chunk_arrived(
                CONV,
                manifest.digest(),
                0,
                chunks[0].ciphertext.clone(),
                &mut writes
            ),
            Ok(ChunkProgress::Kept { remaining: 0 })
        );
        assert_eq!(
            files.chunk_arrived(
                CONV,
                manifest.digest(),
                0,
                chunks[0].ciphertext.clone(),
                &mut writes
            ),
            Ok(ChunkProgress::AlreadyHeld)
        );
    }

    #[test]
    fn assembly_refuses_a_missing_or_damaged_chunk() {
        let data = noise(2_000, 6);
        let (manifest, chunks) = sealed(&data, 7);
        let mut store = MemStore::default();
        let mut files = DeviceFiles::new();
        commit(&mut store, |w| {
            files.offer(CONV, manifest.clone(), w);
        });
        assert_eq!(
            assemble(&manifest, |_| None, |_| {}),
            Err(AssemblyError::MissingChunk { index: 0 })
        );
        commit(&mut store, |w| {
            files
                .chunk_arrived(CONV, manifest.digest(), 0, chunks[0].ciphertext.clone(), w)
                .unwrap();
        });
        let damaged = |_: &ContentHash| {
            let mut bytes = store
                .get(CHUNK_BYTES_TABLE, &manifest.chunks[0].hash.0)
                .unwrap()?;
            bytes[100] ^= 1;
            Some(bytes)
        };
        assert_eq!(
            assemble(&manifest, damaged, |_| {}),
            Err(AssemblyError::Damaged { index: 0 })
        );
        assert_eq!(assembled(&files, &store, &manifest).unwrap(), data);
    }

    /// A chunk found damaged on this device's disk is dropped everywhere it was held, durably:
    /// each file that has it lacks it again (even after a restart) and names it to fetch, and
    /// when it arrives again the file is whole.
    #[test]
    fn a_lost_chunk_is_dropped_and_fetched_again_in_every_file_that_has_it() {
        const ELSEWHERE: ConversationId = ConversationId(4);
        let data = noise(3 << 20, 11);
        let (manifest, chunks) = sealed(&data, 12);
        let digest = manifest.digest();
        assert!(chunks.len() >= 2);
        let mut store = MemStore::default();
        let mut files = DeviceFiles::new();
        commit(&mut store, |w| {
            for conversation in [CONV, ELSEWHERE] {
                files.offer(conversation, manifest.clone(), w);
                for (i, chunk) in chunks.iter().enumerate() {
                    files
                        .chunk_arrived(conversation, digest, i, chunk.ciphertext.clone(), w)
                        .unwrap();
                }
            }
        });
        assert!(files.is_complete(CONV, digest) && files.is_complete(ELSEWHERE, digest));
        let lost = manifest.chunks[1].hash;
        assert!(files.holds(CONV, &lost));
        let mut lacking = Vec::new();
        commit(&mut store, |w| lacking = files.chunk_lost(lost, w));
        assert_eq!(lacking, vec![(CONV, digest), (ELSEWHERE, digest)]);
        assert_eq!(store.get(CHUNK_BYTES_TABLE, &lost.0).unwrap(), None);
        // Durable: a restart does not believe in it again.
        let mut files = DeviceFiles::recover(&store).unwrap();
        for conversation in [CONV, ELSEWHERE] {
            assert!(!files.is_complete(conversation, digest));
            assert!(!files.holds(conversation, &lost));
            let needed = files.needed(conversation, digest).unwrap();
            assert_eq!(needed.chunks, vec![(1, manifest.chunk_id(1))]);
            assert_eq!(needed.bytes, u64::from(manifest.chunks[1].len));
        }
        commit(&mut store, |w| {
            files
                .chunk_arrived(CONV, digest, 1, chunks[1].ciphertext.clone(), w)
                .unwrap();
        });
        assert_eq!(assembled(&files, &store, &manifest).unwrap(), data);
    }

    /// What the transfers ask per arrival (`lacking`, `lacking_index`, `lacking_bytes`, kept
    /// in step instead of walking the manifest) always agrees with `needed`, which walks it:
    /// through arrivals in any order, a chunk that occurs twice in a file, a second file of
    /// the conversation sharing chunks, a lost chunk and a restart.
    #[test]
    fn the_views_for_each_arrival_agree_with_what_a_walk_of_the_manifest_finds() {
        // The same noise twice: its chunks repeat in the second half.
        let half = noise(5 << 20, 21);
        let data = [half.clone(), half].concat();
        let (manifest, chunks) = sealed(&data, 22);
        let digest = manifest.digest();
        let distinct: BTreeSet<ContentHash> = manifest.chunks.iter().map(|c| c.hash).collect();
        assert!(distinct.len() < manifest.chunks.len(), "some chunk repeats");
        // A second file sharing a prefix with the first.
        let (other, _) = sealed(&data[..3 << 20], 22);
        let check = |files: &DeviceFiles| {
            for (m, d) in [(&manifest, digest), (&other, other.digest())] {
                let needed = files.needed(CONV, d).unwrap();
                let lacking: Vec<_> = files.lacking(CONV, d).collect();
                assert_eq!(lacking, needed.chunks);
                assert_eq!(files.lacking_bytes(CONV, d), Some(needed.bytes));
                for (index, entry) in m.chunks.iter().enumerate() {
                    let id = m.chunk_id(index);
                    let first = m.chunks.iter().position(|c| c.hash == entry.hash).unwrap();
                    let expected = (!files.holds(CONV, &entry.hash)).then_some(first);
                    assert_eq!(files.lacking_index(CONV, d, id), expected);
                }
            }
        };
        let mut store = MemStore::default();
        let mut files = DeviceFiles::new();
        commit(&mut store, |w| {
            files.offer(CONV, manifest.clone(), w);
            files.offer(CONV, other.clone(), w);
        });
        check(&files);
        assert_eq!(files.lacking_bytes(CONV, ManifestDigest([9; 32])), None);
        // Arrivals in a scrambled order, each index (repeats too).
        let n = chunks.len();
        let order = (0..n)
            .rev()
            .filter(|i| i % 2 == 1)
            .chain((0..n).filter(|i| i % 2 == 0));
        for (step, index) in order.enumerate() {
            commit(&mut store, |w| {
                files
                    .chunk_arrived(CONV, digest, index, chunks[index].ciphertext.clone(), w)
                    .unwrap();
            });
            check(&files);
            if step == n / 2 {
                files = DeviceFiles::recover(&store).unwrap();
                check(&files);
            }
        }
        assert!(files.is_complete(CONV, digest));
        // The prefix's last chunk is cut where the prefix ends, so it is not the first file's.
        let last = other.chunks.len() - 1;
        assert_eq!(
            files.lacking(CONV, other.digest()).collect::<Vec<_>>(),
            vec![(last, other.chunk_id(last))]
        );
        // A lost chunk is lacking again, at its first index, in both files.
        commit(&mut store, |w| {
            files.chunk_lost(manifest.chunks[0].hash, w);
        });
        check(&files);
        assert_eq!(
            files.lacking(CONV, digest).collect::<Vec<_>>(),
            vec![(0, manifest.chunk_id(0))]
        );
    }

    #[test]
    fn a_receipt_message_round_trips_and_refuses_other_lengths() {
        let key = DeviceKey::from_seed([3; 32]);
        let receipt = Receipt::sign(&key, ManifestDigest([7; 32]));
        let body = receipt.encode_message();
        assert_eq!(body.len(), RECEIPT_MESSAGE_BYTES);
        assert_eq!(Receipt::decode_message(&body), Some(Some(receipt)));
        assert_eq!(Receipt::decode_message(&body[..body.len() - 1]), Some(None));
        let mut longer = body.clone();
        longer.push(0);
        assert_eq!(Receipt::decode_message(&longer), Some(None));
        assert_eq!(Receipt::decode_message(b"hello"), None);
        assert_eq!(Receipt::decode_message(b"\0SF\x01 a file"), None);
    }

    #[test]
    fn a_receipt_verifies_only_for_its_device_and_file() {
        let key = DeviceKey::from_seed([1; 32]);
        let other = DeviceKey::from_seed([2; 32]);
        let digest = ManifestDigest([9; 32]);
        let receipt = Receipt::sign(&key, digest);
        assert!(receipt.verify(&key.public()));
        assert!(!receipt.verify(&other.public()));
        let mut forged = receipt.clone();
        forged.digest = ManifestDigest([8; 32]);
        assert!(!forged.verify(&key.public()));
    }

    #[test]
    fn recovery_refuses_a_corrupt_index_with_the_table_named() {
        let mut store = MemStore::default();
        commit(&mut store, |w| {
            w.put(CHUNK_INDEX_TABLE, vec![1; 32], vec![1, 2])
        });
        let err = DeviceFiles::recover(&store).unwrap_err();
        assert!(err.to_string().contains("file_chunk_index"), "{err}");
    }
}
