//! The gateway's chunk index: which sealed file chunks each conversation holds, who pays for
//! them, which uploads still need them, and when they go.
//!
//! Control plane only. The sealed bytes live in [`BLOBS_TABLE`] and never stay in memory: a
//! chunk's bytes pass through [`ChunkIndex::store_chunk`] once (as shared [`Bytes`], written in
//! the same batch as the index record that names them), and a fetch gets the blob's key and
//! the digest to check it against ([`ChunkIndex::admit_fetch`], [`verify_blob`]).
//!
//! Rules:
//! - Chunks belong to a conversation and to the user who uploaded them: a chunk stored in one
//!   conversation is invisible from every other (the router checks membership before asking),
//!   and no user can reference, pre-empt or overwrite another's chunks (every member knows the
//!   sender's secret from its manifests, so ids are predictable; honest users never share ids,
//!   since each device keys its own). The same id twice is two chunks.
//! - An upload lists its chunks first ([`ChunkIndex::open_upload`]). Chunks the conversation
//!   already holds are referenced, not uploaded again; the others are charged to the uploader's
//!   quota at once (reserved, so two concurrent uploads cannot both fit in the last gigabyte)
//!   and awaited. Opening the same upload again answers what is still missing: that is how an
//!   interrupted upload resumes.
//! - A chunk's bytes are accepted only while an open upload of that conversation awaits them,
//!   at exactly the length it declared; their BLAKE3 digest is recorded, and checked on every
//!   read, so damage at rest is caught here and the chunk is awaited again
//!   ([`ChunkIndex::damaged`]).
//! - An upload lives until every device that was a member when it opened has fetched all of
//!   it ([`ChunkIndex::fetched_all`]), or its retention passes. When no upload references a
//!   chunk any more its quota charge goes at once, and its record and blob go in later steps
//!   of at most [`CHUNK_DROP_STEP_BYTES`] ([`ChunkIndex::drop_step`]): deleting a gigabyte
//!   file's blobs in one commit held every message behind it for a third of a second. Until
//!   its step comes, a dropping chunk is kept as a record with no references (so a restart
//!   resumes the dropping), and an upload that lists it again takes it back without a byte
//!   moving.
//!
//! The gateway's [`super::transfers`] routes frames and chunk streams to it (see
//! ARCHITECTURE.md, "Files").

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;

use crate::codec::Reader;
use crate::env::{scan_all, StoreError, StoreRead, Table, WriteBatch};
pub use crate::files::UploadId;
use crate::files::{sealed_len, ChunkId, CHUNKS_MAX, CHUNK_BYTES_MAX};
use crate::ids::{ConversationId, DeviceId, UserId};
use crate::time::Instant;

/// Index records: key `conversation(16) ++ owner(16) ++ chunk id(32)`, value a
/// [`ChunkRecord`].
pub const CHUNKS_TABLE: Table = Table("file_chunks");
/// Sealed chunk bytes: the same key as [`CHUNKS_TABLE`], value the ciphertext.
pub const BLOBS_TABLE: Table = Table("file_blobs");
/// Open uploads: key `conversation(16) ++ upload id(16)`, value an [`Upload`].
pub const UPLOADS_TABLE: Table = Table("file_uploads");

/// Most sealed bytes one [`ChunkIndex::drop_step`] deletes (always at least one chunk), so a
/// commit that drops chunks stays as short as one that stores a few.
pub const CHUNK_DROP_STEP_BYTES: u64 = 4 << 20;

/// Limits of the chunk index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkLimits {
    /// Sealed bytes one user's uploads may hold at once (stored or awaited).
    pub quota_bytes_per_user: u64,
    /// How long an upload is kept for devices that have not fetched it.
    pub retention: Duration,
    /// Open uploads one user may have at once.
    pub uploads_per_user_max: usize,
}

impl Default for ChunkLimits {
    fn default() -> Self {
        ChunkLimits {
            quota_bytes_per_user: 10 << 30,
            retention: Duration::from_secs(30 * 24 * 3600),
            uploads_per_user_max: 64,
        }
    }
}

/// One chunk as an upload lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListedChunk {
    /// Its id.
    pub id: ChunkId,
    /// Its sealed length.
    pub sealed_len: u32,
}

/// An upload as its device opens it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadRequest<'a> {
    /// The conversation it goes to (the router checked the uploader is a member).
    pub conversation: ConversationId,
    /// Its id.
    pub upload: UploadId,
    /// The uploading user, charged for what is new.
    pub owner: UserId,
    /// Its distinct chunks.
    pub chunks: &'a [ListedChunk],
    /// The conversation's member devices now: the upload lives until each has fetched it.
    pub members: BTreeSet<DeviceId>,
}

/// What the index knows of one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRecord {
    /// Sealed length in bytes.
    pub sealed_len: u32,
    /// BLAKE3 of the stored bytes; `None` while awaited (never stored, or found damaged).
    pub digest: Option<[u8; 32]>,
    /// Open uploads that reference it.
    pub refs: u32,
}

/// An open upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upload {
    /// The uploading user.
    pub owner: UserId,
    /// Its distinct chunks, in the order listed.
    pub chunks: Vec<ChunkId>,
    /// The same ids, to look one up per arriving chunk (a search of `chunks` per chunk held
    /// the gateway's core for seconds on a file of tens of thousands of chunks). Not stored.
    listed: BTreeSet<ChunkId>,
    /// Member devices that have not fetched all of it yet.
    pub pending: BTreeSet<DeviceId>,
    /// When it goes whatever is still pending.
    pub expires: Instant,
}

/// Why the index refused a request; each says what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChunkRefusal {
    /// The upload would take its owner past the quota.
    #[error("this upload needs {needed} more bytes; {used} of your {quota} bytes are in use: wait until members have fetched earlier files, or delete some")]
    QuotaExceeded {
        /// Bytes the upload would add.
        needed: u64,
        /// Bytes already charged.
        used: u64,
        /// The quota.
        quota: u64,
    },
    /// Too many uploads open at once.
    #[error("you have {max} uploads open; wait until one completes")]
    TooManyUploads {
        /// The limit.
        max: usize,
    },
    /// An upload listed nothing, too many chunks, the same chunk twice, or an impossible length.
    #[error("the upload's chunk list is invalid: {0}")]
    BadList(&'static str),
    /// The upload id is already open with another list or owner.
    #[error("upload id already in use for another file: choose a new one")]
    UploadIdReused,
    /// No such open upload in this conversation.
    #[error("no such upload in this conversation (it completed or expired): open it again")]
    NoSuchUpload,
    /// The chunk is not one this upload awaits (not listed, or already stored).
    #[error("chunk {0} is not awaited by this upload")]
    NotAwaited(ChunkId),
    /// The bytes are not as long as the list declared.
    #[error("chunk {id} is {got} bytes, the upload declared {declared}")]
    WrongLength {
        /// The chunk.
        id: ChunkId,
        /// Declared length.
        declared: u32,
        /// Length received.
        got: usize,
    },
    /// The conversation does not hold the chunk (never uploaded, gone, or awaited again).
    #[error("chunk {0} is not available in this conversation; ask the sender to upload it again")]
    Unavailable(ChunkId),
}

/// What a fetch of one chunk reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FetchPlan {
    /// The blob's key in [`BLOBS_TABLE`].
    pub key: [u8; 64],
    /// Its sealed length.
    pub sealed_len: u32,
    /// The digest its bytes must have ([`verify_blob`]).
    pub digest: [u8; 32],
}

/// True if `bytes` read from the blob table are what was stored.
pub fn verify_blob(plan: &FetchPlan, bytes: &[u8]) -> bool {
    bytes.len() == plan.sealed_len as usize && *blake3::hash(bytes).as_bytes() == plan.digest
}

/// The largest sealed chunk: the largest chunk, padded and tagged.
fn sealed_len_max() -> u32 {
    u32::try_from(sealed_len(CHUNK_BYTES_MAX)).expect("a few MiB")
}

/// Where a chunk is indexed: its conversation, its owner, its id.
type ChunkAt = (ConversationId, UserId, ChunkId);

fn chunk_key(&(conversation, owner, id): &ChunkAt) -> [u8; 64] {
    let mut key = [0u8; 64];
    key[..16].copy_from_slice(&conversation.to_bytes());
    key[16..32].copy_from_slice(&owner.to_bytes());
    key[32..].copy_from_slice(&id.0);
    key
}

fn upload_key(conversation: ConversationId, upload: UploadId) -> Vec<u8> {
    let mut key = conversation.to_bytes().to_vec();
    key.extend_from_slice(&upload.0);
    key
}

/// The chunk index of one gateway.
#[derive(Clone, Debug, Default)]
pub struct ChunkIndex {
    limits: ChunkLimits,
    chunks: BTreeMap<ChunkAt, ChunkRecord>,
    uploads: BTreeMap<(ConversationId, UploadId), Upload>,
    /// Bytes charged to each user (stored and awaited chunks it owns); no zero entries.
    usage: BTreeMap<UserId, u64>,
    /// Open uploads of each user; no zero entries.
    uploads_open: BTreeMap<UserId, usize>,
    /// Open uploads by expiry, for housekeeping that looks only at what is due.
    expiries: BTreeSet<(Instant, ConversationId, UploadId)>,
    /// Stored chunks no upload references, whose record (kept with no references) and blob
    /// go in [`ChunkIndex::drop_step`]s; not in `chunks`, charged to nobody.
    dropping: BTreeMap<ChunkAt, ChunkRecord>,
}

impl ChunkIndex {
    /// An empty index.
    pub fn new(limits: ChunkLimits) -> ChunkIndex {
        ChunkIndex {
            limits,
            ..ChunkIndex::default()
        }
    }

    /// The index as the store holds it.
    pub fn recover(limits: ChunkLimits, store: &dyn StoreRead) -> Result<ChunkIndex, StoreError> {
        let mut index = ChunkIndex::new(limits);
        scan_all(store, CHUNKS_TABLE, |key, value| {
            let at = decode_chunk_key(key)?;
            let record = decode_chunk(value)?;
            if record.refs == 0 {
                // Dropped before the restart; its step had not come.
                index.dropping.insert(at, record);
            } else {
                *index.usage.entry(at.1).or_default() += u64::from(record.sealed_len);
                index.chunks.insert(at, record);
            }
            Ok(())
        })?;
        scan_all(store, UPLOADS_TABLE, |key, value| {
            let corrupt = |reason: &str| StoreError::Corrupt {
                table: UPLOADS_TABLE.0,
                reason: reason.to_string(),
            };
            if key.len() != 32 {
                return Err(corrupt("key is not conversation ++ upload id"));
            }
            let conversation = ConversationId::from_bytes(key[..16].try_into().expect("16"));
            let id = UploadId(key[16..].try_into().expect("16"));
            let upload = decode_upload(value).ok_or_else(|| corrupt("malformed upload"))?;
            index.expiries.insert((upload.expires, conversation, id));
            *index.uploads_open.entry(upload.owner).or_default() += 1;
            index.uploads.insert((conversation, id), upload);
            Ok(())
        })?;
        index.consistency().map_err(|reason| StoreError::Corrupt {
            table: CHUNKS_TABLE.0,
            reason,
        })?;
        Ok(index)
    }

    /// Opens (or reopens) an upload. Answers the chunks still awaited, in the order listed.
    pub fn open_upload(
        &mut self,
        now: Instant,
        request: UploadRequest<'_>,
        writes: &mut WriteBatch,
    ) -> Result<Vec<ChunkId>, ChunkRefusal> {
        let UploadRequest {
            conversation,
            upload,
            owner,
            chunks,
            members,
        } = request;
        if chunks.is_empty() || chunks.len() > CHUNKS_MAX {
            return Err(ChunkRefusal::BadList("it lists no chunks, or too many"));
        }
        let ids: Vec<ChunkId> = chunks.iter().map(|c| c.id).collect();
        if let Some(open) = self.uploads.get(&(conversation, upload)) {
            if open.owner != owner || open.chunks != ids {
                return Err(ChunkRefusal::UploadIdReused);
            }
            return Ok(self.awaited(conversation, owner, &ids));
        }
        if members.is_empty() {
            return Err(ChunkRefusal::BadList(
                "no member device of this gateway is there to fetch it (devices of other domains cannot fetch files yet)",
            ));
        }
        if ids.iter().collect::<BTreeSet<_>>().len() != ids.len() {
            return Err(ChunkRefusal::BadList("a chunk is listed twice"));
        }
        if chunks
            .iter()
            .any(|c| c.sealed_len == 0 || c.sealed_len > sealed_len_max())
        {
            return Err(ChunkRefusal::BadList(
                "a chunk's sealed length is impossible",
            ));
        }
        if chunks.iter().any(|c| {
            let at = (conversation, owner, c.id);
            self.chunks
                .get(&at)
                .or_else(|| self.dropping.get(&at))
                .is_some_and(|r| r.sealed_len != c.sealed_len)
        }) {
            return Err(ChunkRefusal::BadList(
                "a chunk's length differs from the one its id was listed with",
            ));
        }
        let open = self.uploads_open.get(&owner).copied().unwrap_or(0);
        if open >= self.limits.uploads_per_user_max {
            return Err(ChunkRefusal::TooManyUploads {
                max: self.limits.uploads_per_user_max,
            });
        }
        let needed: u64 = chunks
            .iter()
            .filter(|c| !self.chunks.contains_key(&(conversation, owner, c.id)))
            .map(|c| u64::from(c.sealed_len))
            .sum();
        let used = self.usage(owner);
        if used + needed > self.limits.quota_bytes_per_user {
            return Err(ChunkRefusal::QuotaExceeded {
                needed,
                used,
                quota: self.limits.quota_bytes_per_user,
            });
        }
        for listed in chunks {
            let at = (conversation, owner, listed.id);
            // A dropping chunk is taken back, bytes and all (charged again: it counted in
            // `needed`, not being in `chunks`).
            let dropping = &mut self.dropping;
            let record = self.chunks.entry(at).or_insert_with(|| {
                dropping.remove(&at).unwrap_or(ChunkRecord {
                    sealed_len: listed.sealed_len,
                    digest: None,
                    refs: 0,
                })
            });
            record.refs += 1;
            writes.put(CHUNKS_TABLE, chunk_key(&at).to_vec(), encode_chunk(record));
        }
        if needed > 0 {
            *self.usage.entry(owner).or_default() += needed;
        }
        *self.uploads_open.entry(owner).or_default() += 1;
        let expires = now + self.limits.retention;
        let record = Upload {
            owner,
            listed: ids.iter().copied().collect(),
            chunks: ids.clone(),
            pending: members,
            expires,
        };
        writes.put(
            UPLOADS_TABLE,
            upload_key(conversation, upload),
            encode_upload(&record),
        );
        self.uploads.insert((conversation, upload), record);
        self.expiries.insert((expires, conversation, upload));
        Ok(self.awaited(conversation, owner, &ids))
    }

    /// The chunks of `ids` that `conversation` does not hold yet from `owner`.
    pub fn awaited(
        &self,
        conversation: ConversationId,
        owner: UserId,
        ids: &[ChunkId],
    ) -> Vec<ChunkId> {
        ids.iter()
            .filter(|id| {
                self.chunks
                    .get(&(conversation, owner, **id))
                    .is_none_or(|r| r.digest.is_none())
            })
            .copied()
            .collect()
    }

    /// Takes the bytes of an awaited chunk of `owner`'s `upload`: the blob and its record go
    /// into `writes` together, so a crash keeps both or neither. True if they were stored;
    /// false for bytes of a chunk this upload lists that is stored already (another upload of
    /// the same owner sharing it stored it first, or a copy sent again after a lost
    /// acknowledgement): nothing is written and the stored bytes are never replaced, but the
    /// sender hears the chunk is durable.
    pub fn store_chunk(
        &mut self,
        conversation: ConversationId,
        owner: UserId,
        upload: UploadId,
        id: ChunkId,
        bytes: Bytes,
        writes: &mut WriteBatch,
    ) -> Result<bool, ChunkRefusal> {
        let listed = self
            .uploads
            .get(&(conversation, upload))
            .filter(|u| u.owner == owner)
            .ok_or(ChunkRefusal::NoSuchUpload)?
            .listed
            .contains(&id);
        let at = (conversation, owner, id);
        let record = self
            .chunks
            .get_mut(&at)
            .filter(|_| listed)
            .ok_or(ChunkRefusal::NotAwaited(id))?;
        if bytes.len() != record.sealed_len as usize {
            return Err(ChunkRefusal::WrongLength {
                id,
                declared: record.sealed_len,
                got: bytes.len(),
            });
        }
        if record.digest.is_some() {
            return Ok(false);
        }
        record.digest = Some(*blake3::hash(&bytes).as_bytes());
        let key = chunk_key(&at).to_vec();
        writes.put(CHUNKS_TABLE, key.clone(), encode_chunk(record));
        writes.put(BLOBS_TABLE, key, bytes);
        Ok(true)
    }

    /// Where to read a chunk of `owner`'s (the file's sender, named by its manifest's
    /// message) that a member asked for, and what its bytes must hash to.
    pub fn admit_fetch(
        &self,
        conversation: ConversationId,
        owner: UserId,
        id: ChunkId,
    ) -> Result<FetchPlan, ChunkRefusal> {
        let at = (conversation, owner, id);
        let record = self.chunks.get(&at).ok_or(ChunkRefusal::Unavailable(id))?;
        let digest = record.digest.ok_or(ChunkRefusal::Unavailable(id))?;
        Ok(FetchPlan {
            key: chunk_key(&at),
            sealed_len: record.sealed_len,
            digest,
        })
    }

    /// A read found the chunk's bytes damaged ([`verify_blob`] failed): it is awaited again
    /// (the uploader's next open of an upload that lists it answers it as missing), and the
    /// damaged bytes go.
    pub fn damaged(
        &mut self,
        conversation: ConversationId,
        owner: UserId,
        id: ChunkId,
        writes: &mut WriteBatch,
    ) {
        let at = (conversation, owner, id);
        if let Some(record) = self.chunks.get_mut(&at) {
            record.digest = None;
            let key = chunk_key(&at).to_vec();
            writes.put(CHUNKS_TABLE, key.clone(), encode_chunk(record));
            writes.delete(BLOBS_TABLE, key);
        }
    }

    /// `device` has every chunk of `upload`. When no member is left pending, the upload ends.
    pub fn fetched_all(
        &mut self,
        conversation: ConversationId,
        upload: UploadId,
        device: DeviceId,
        writes: &mut WriteBatch,
    ) {
        self.forget_pending(conversation, upload, device, writes);
    }

    /// `device` left `conversation`: no upload waits for it any more.
    pub fn member_removed(
        &mut self,
        conversation: ConversationId,
        device: DeviceId,
        writes: &mut WriteBatch,
    ) {
        let uploads: Vec<UploadId> = self
            .uploads
            .range((conversation, UploadId([0; 16]))..=(conversation, UploadId([0xff; 16])))
            .filter(|(_, u)| u.pending.contains(&device))
            .map(|(&(_, id), _)| id)
            .collect();
        for upload in uploads {
            self.forget_pending(conversation, upload, device, writes);
        }
    }

    fn forget_pending(
        &mut self,
        conversation: ConversationId,
        upload: UploadId,
        device: DeviceId,
        writes: &mut WriteBatch,
    ) {
        let Some(open) = self.uploads.get_mut(&(conversation, upload)) else {
            return;
        };
        if !open.pending.remove(&device) {
            return;
        }
        if open.pending.is_empty() {
            self.end_upload(conversation, upload, writes);
        } else {
            let record = encode_upload(open);
            writes.put(UPLOADS_TABLE, upload_key(conversation, upload), record);
        }
    }

    /// When the next upload expires, for the gateway's timer.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.expiries.first().map(|&(at, _, _)| at)
    }

    /// Ends every upload whose retention has passed; looks only at those due.
    pub fn handle_timeout(&mut self, now: Instant, writes: &mut WriteBatch) -> usize {
        let mut ended = 0;
        while let Some(&(at, conversation, upload)) = self.expiries.first() {
            if at > now {
                break;
            }
            self.end_upload(conversation, upload, writes);
            ended += 1;
        }
        ended
    }

    fn end_upload(
        &mut self,
        conversation: ConversationId,
        upload: UploadId,
        writes: &mut WriteBatch,
    ) {
        let open = self
            .uploads
            .remove(&(conversation, upload))
            .expect("only open uploads end");
        assert!(self.expiries.remove(&(open.expires, conversation, upload)));
        writes.delete(UPLOADS_TABLE, upload_key(conversation, upload));
        let owner = open.owner;
        let count = self.uploads_open.get_mut(&owner).expect("counted");
        *count -= 1;
        if *count == 0 {
            self.uploads_open.remove(&owner);
        }
        for id in &open.chunks {
            let at = (conversation, owner, *id);
            let record = self
                .chunks
                .get_mut(&at)
                .expect("an open upload's chunks are indexed");
            assert!(record.refs > 0, "a referenced chunk counts its references");
            record.refs -= 1;
            let key = chunk_key(&at).to_vec();
            if record.refs == 0 {
                let record = self.chunks.remove(&at).expect("present");
                let usage = self.usage.get_mut(&owner).expect("charged");
                *usage -= u64::from(record.sealed_len);
                if *usage == 0 {
                    self.usage.remove(&owner);
                }
                if record.digest.is_some() {
                    // Its blob goes in a later step; the record says so across a restart.
                    writes.put(CHUNKS_TABLE, key, encode_chunk(&record));
                    self.dropping.insert(at, record);
                } else {
                    // Never stored (or its damaged bytes went already): nothing to delete.
                    writes.delete(CHUNKS_TABLE, key);
                }
            } else {
                writes.put(CHUNKS_TABLE, key, encode_chunk(record));
            }
        }
    }

    /// Deletes the records and blobs of dropping chunks, at most [`CHUNK_DROP_STEP_BYTES`] of
    /// them (at least one chunk). Returns how many went.
    pub fn drop_step(&mut self, writes: &mut WriteBatch) -> usize {
        let mut bytes = 0u64;
        let mut dropped = 0;
        while let Some(entry) = self.dropping.first_entry() {
            let len = u64::from(entry.get().sealed_len);
            if dropped > 0 && bytes + len > CHUNK_DROP_STEP_BYTES {
                break;
            }
            let (at, _) = entry.remove_entry();
            let key = chunk_key(&at).to_vec();
            writes.delete(CHUNKS_TABLE, key.clone());
            writes.delete(BLOBS_TABLE, key);
            bytes += len;
            dropped += 1;
        }
        dropped
    }

    /// Chunks waiting for a [`ChunkIndex::drop_step`].
    pub fn dropping(&self) -> usize {
        self.dropping.len()
    }

    /// Bytes charged to `user`.
    pub fn usage(&self, user: UserId) -> u64 {
        self.usage.get(&user).copied().unwrap_or(0)
    }

    /// The record of `owner`'s chunk `id` in `conversation`, if indexed.
    pub fn chunk(
        &self,
        conversation: ConversationId,
        owner: UserId,
        id: ChunkId,
    ) -> Option<&ChunkRecord> {
        self.chunks.get(&(conversation, owner, id))
    }

    /// An open upload.
    pub fn upload(&self, conversation: ConversationId, upload: UploadId) -> Option<&Upload> {
        self.uploads.get(&(conversation, upload))
    }

    /// Chunks indexed, in every conversation.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// What must hold between the tables: every open upload's chunks are indexed, every
    /// chunk's reference count is the number of open uploads listing it (never zero: a chunk
    /// nothing references is gone), every user's usage is the sum of its chunks and its open
    /// uploads are counted, and every upload has an expiry and someone to wait for. Checked
    /// after recovery (a store that breaks it is corrupt) and in tests after every step.
    pub fn consistency(&self) -> Result<(), String> {
        let mut refs: BTreeMap<ChunkAt, u32> = BTreeMap::new();
        let mut open: BTreeMap<UserId, usize> = BTreeMap::new();
        for (&(conversation, id), upload) in &self.uploads {
            *open.entry(upload.owner).or_default() += 1;
            if upload.pending.is_empty() {
                return Err(format!("upload {id:?} waits for nobody"));
            }
            if !self.expiries.contains(&(upload.expires, conversation, id)) {
                return Err(format!("upload {id:?} has no expiry"));
            }
            for chunk in &upload.chunks {
                let at = (conversation, upload.owner, *chunk);
                if !self.chunks.contains_key(&at) {
                    return Err(format!(
                        "upload {id:?} lists {chunk:?}, which is not indexed"
                    ));
                }
                *refs.entry(at).or_default() += 1;
            }
        }
        let mut usage: BTreeMap<UserId, u64> = BTreeMap::new();
        for (at, record) in &self.chunks {
            let counted = refs.get(at).copied().unwrap_or(0);
            if counted == 0 || counted != record.refs {
                return Err(format!(
                    "{:?} counts {} references, {counted} uploads list it",
                    at.2, record.refs
                ));
            }
            *usage.entry(at.1).or_default() += u64::from(record.sealed_len);
        }
        if usage != self.usage || open != self.uploads_open {
            return Err("usage or open uploads do not add up".into());
        }
        if self.expiries.len() != self.uploads.len() {
            return Err("an expiry names no upload".into());
        }
        for (at, record) in &self.dropping {
            if record.refs != 0 || record.digest.is_none() || self.chunks.contains_key(at) {
                return Err(format!(
                    "dropping {:?} is referenced, was never stored, or is indexed too",
                    at.2
                ));
            }
        }
        Ok(())
    }
}

fn encode_chunk(record: &ChunkRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 1 + 32 + 4);
    out.extend_from_slice(&record.sealed_len.to_be_bytes());
    match record.digest {
        Some(digest) => {
            out.push(1);
            out.extend_from_slice(&digest);
        }
        None => out.push(0),
    }
    out.extend_from_slice(&record.refs.to_be_bytes());
    out
}

fn decode_chunk_key(key: &[u8]) -> Result<ChunkAt, StoreError> {
    if key.len() != 64 {
        return Err(StoreError::Corrupt {
            table: CHUNKS_TABLE.0,
            reason: "key is not conversation ++ owner ++ chunk id".into(),
        });
    }
    Ok((
        ConversationId::from_bytes(key[..16].try_into().expect("16")),
        UserId::from_bytes(key[16..32].try_into().expect("16")),
        ChunkId(key[32..].try_into().expect("32")),
    ))
}

fn decode_chunk(value: &[u8]) -> Result<ChunkRecord, StoreError> {
    let mut reader = Reader::new(value);
    let decoded = (|| {
        let sealed_len = reader.u32()?;
        let digest = match reader.u8()? {
            0 => None,
            1 => Some(reader.array()?),
            _ => return None,
        };
        let refs = reader.u32()?;
        (reader.remaining() == 0).then_some(ChunkRecord {
            sealed_len,
            digest,
            refs,
        })
    })();
    decoded.ok_or_else(|| StoreError::Corrupt {
        table: CHUNKS_TABLE.0,
        reason: "malformed chunk record".into(),
    })
}

fn encode_upload(upload: &Upload) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(16 + 8 + 8 + upload.chunks.len() * 32 + upload.pending.len() * 16);
    out.extend_from_slice(&upload.owner.to_bytes());
    out.extend_from_slice(&upload.expires.0.to_be_bytes());
    out.extend_from_slice(&(upload.chunks.len() as u32).to_be_bytes());
    for id in &upload.chunks {
        out.extend_from_slice(&id.0);
    }
    out.extend_from_slice(&(upload.pending.len() as u32).to_be_bytes());
    for device in &upload.pending {
        out.extend_from_slice(&device.to_bytes());
    }
    out
}

fn decode_upload(value: &[u8]) -> Option<Upload> {
    let mut reader = Reader::new(value);
    let owner = UserId::from_bytes(reader.array()?);
    let expires = Instant(reader.u64()?);
    let count = reader.u32()? as usize;
    if count > CHUNKS_MAX || reader.remaining() < count * 32 {
        return None;
    }
    let chunks = (0..count)
        .map(|_| reader.array().map(ChunkId))
        .collect::<Option<Vec<_>>>()?;
    let members = reader.u32()? as usize;
    if reader.remaining() != members * 16 {
        return None;
    }
    let pending = (0..members)
        .map(|_| reader.array().map(DeviceId::from_bytes))
        .collect::<Option<BTreeSet<_>>>()?;
    Some(Upload {
        owner,
        listed: chunks.iter().copied().collect(),
        chunks,
        pending,
        expires,
    })
}

#[cfg(test)]
mod tests;
