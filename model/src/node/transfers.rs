//! The device's file transfers: files it uploads and files it fetches, each resumable at a
//! chunk boundary.
//!
//! Sending: the application cuts and seals the file (streamed, `files::ManifestBuilder`) and
//! hands the manifest over ([`NodeTransfers::start_upload`]); the upload is durable from then
//! on. On every session the device opens it (`UploadOpen`); the gateway answers what it lacks;
//! the device asks the driver to send those chunks, [`UPLOAD_WINDOW`] at a time
//! ([`ChunkToSend`]: the driver reads the file's bytes at the chunk's offset and seals them
//! again, which gives the same ciphertext); each `ChunkAck` lets the next go. When nothing is
//! missing, the file message (manifest and upload id) goes into the conversation as an MLS
//! message, and the upload record goes.
//!
//! Receiving: a file message that arrives is offered to the chunk store (`files::DeviceFiles`),
//! which answers what this device lacks; the application decides to fetch it
//! ([`NodeTransfers::fetch`], durable). The device asks for missing chunks, [`FETCH_WINDOW`] at
//! a time; each arriving chunk is verified and kept with its index record in one batch; when
//! all are held the gateway hears `FileFetched` and the application `FileComplete`.
//! Chunks the gateway cannot serve, or that fail verification, are asked for again at the next
//! heartbeat or session; a chunk that fails verification [`CHUNK_FAILURES_MAX`] times ends the
//! fetch (the sender's copy is bad).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;

use super::files::{ChunkProgress, DeviceFiles, ReceiveError};
use super::{NodeEvent, NodeFx, NodeOutput};
use crate::codec::Reader;
use crate::env::{scan_all, StoreError, StoreRead, Table};
use crate::files::{sealed_len, ChunkId, FileMessage, Manifest, ManifestDigest, UploadId};
use crate::ids::{ConnectionId, ConversationId, DeviceId};
use crate::time::Instant;
use crate::wire::payload::{
    ChunkAck, ChunkRequest, ChunksUnavailable, ErrorCode, FileFetched, ListedChunkWire, UploadOpen,
    UploadStatus, CHUNK_REQUEST_IDS_MAX,
};
use crate::wire::{Payload, Routing};

/// Uploads not finished: key the upload id, value `conversation(16) ++ source_len u16 ++
/// source ++ manifest`.
pub const NODE_UPLOADS_TABLE: Table = Table("node_uploads");
/// Files offered to this device: key `conversation(16) ++ digest(32)`, value `upload(16) ++
/// sender(16) ++ state u8` (0 offered, 1 fetching, 2 complete, 3 failed).
pub const NODE_OFFERS_TABLE: Table = Table("node_file_offers");

/// Files this device sent: key `conversation(16) ++ digest(32)`, value `size u64 ++ name`.
pub const NODE_SENT_FILES_TABLE: Table = Table("node_sent_files");
/// Receipts for files this device sent: key `conversation(16) ++ digest(32) ++ device(16)`,
/// value `verified u8` (1: the device's signature checked against its certificate's key).
pub const NODE_FILE_RECEIPTS_TABLE: Table = Table("node_file_receipts");
/// Receipts this device owes that could not be sent with the completion (the group could not
/// take a message then): key `conversation(16) ++ digest(32)`, value empty. Sent at a later
/// heartbeat, even after a restart.
pub const NODE_RECEIPTS_OWED_TABLE: Table = Table("node_receipts_owed");
/// Receipts one sent file keeps (a room's member devices, generously).
pub const RECEIPTS_PER_FILE_MAX: usize = 4096;

/// Why a fetch ends when this device is removed from the file's conversation.
pub const FILE_REMOVED: &str = "this device was removed from the conversation before the file arrived: ask to be added again and for the file to be sent again";

/// Why a fetch ends when the gateway no longer holds the file's chunks.
pub const FILE_GONE: &str = "the gateway no longer holds this file (it let it go once every member had it, its retention passed, or this device left the conversation meanwhile): ask the sender to send it again";

/// Chunks one upload has in flight at once (the gateway grants four chunk streams).
pub const UPLOAD_WINDOW: usize = 4;
/// Chunks one fetch has asked for and not received at once.
pub const FETCH_WINDOW: usize = 8;
/// Verification failures of one chunk after which its fetch ends.
pub const CHUNK_FAILURES_MAX: u32 = 3;
/// Longest source description an upload keeps (a path, for the driver).
pub const SOURCE_BYTES_MAX: usize = 4096;

/// A chunk the driver is to send on a chunk stream of its own: it reads `len` bytes of the
/// file at `offset`, seals them (`files::seal_chunk` with the manifest's secret), checks the
/// id, and writes the stream (`wire::payload::ChunkHead`, then the sealed bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkToSend {
    /// The session's connection.
    pub conn: ConnectionId,
    /// The conversation.
    pub conversation: ConversationId,
    /// The upload.
    pub upload: UploadId,
    /// Where the file is, as the application described it at the start.
    pub source: Bytes,
    /// The file's manifest (the secret inside is never printed).
    pub manifest: Arc<Manifest>,
    /// The chunk's index in the manifest.
    pub index: usize,
    /// Its id.
    pub id: ChunkId,
    /// Its plaintext offset in the file.
    pub offset: u64,
}

/// A file offered to this device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    /// The upload that holds its chunks.
    pub upload: UploadId,
    /// Who sent it.
    pub sender: DeviceId,
    /// Where it stands.
    pub state: OfferState,
}

/// Where an offered file stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OfferState {
    /// Known, not asked for.
    Offered = 0,
    /// Being fetched.
    Fetching = 1,
    /// Every chunk held and verified.
    Complete = 2,
    /// Given up: a chunk never verified.
    Failed = 3,
}

/// A file this device sent, and who said they hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentFile {
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Devices that sent a receipt: true if its signature verified against the device's
    /// certificate key.
    pub receipts: BTreeMap<DeviceId, bool>,
}

/// What ended an upload early.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadFailed {
    /// The conversation.
    pub conversation: ConversationId,
    /// The upload.
    pub upload: UploadId,
}

struct Outgoing {
    conversation: ConversationId,
    source: Bytes,
    manifest: Arc<Manifest>,
    /// Distinct chunks: id → (first index, sealed length), in listing order below.
    chunks: Vec<(ChunkId, usize, u32)>,
    /// Where each id is in `chunks`.
    position: BTreeMap<ChunkId, usize>,
    /// Where each chunk of the manifest starts in the file, by index.
    offsets: Vec<u64>,
    /// What the gateway lacks, once it said; `None` before its answer in this session.
    missing: Option<BTreeSet<ChunkId>>,
    /// Sealed bytes of `missing`.
    missing_bytes: u64,
    in_flight: BTreeSet<ChunkId>,
    /// Every entry of `chunks` before this one is either not missing or in flight, so
    /// [`NodeTransfers::pump_upload`] starts here instead of at the first chunk each time (it
    /// ran once per acknowledgement, so that walk grew with the square of a file's size).
    /// Back to 0 whenever `missing` or `in_flight` change other than by a send or an
    /// acknowledgement.
    cursor: usize,
    /// When it last opened or heard of a chunk.
    progress_at: Instant,
}

impl Outgoing {
    /// Tells the application how many sealed bytes of the upload the gateway still lacks.
    fn tell_progress(&self, upload: UploadId, fx: &mut NodeFx) {
        fx.event(NodeEvent::UploadProgress {
            conversation: self.conversation,
            upload,
            remaining_bytes: self.missing_bytes,
        });
    }
}

#[derive(Default)]
struct Fetching {
    /// Asked for, not arrived.
    asked: BTreeSet<ChunkId>,
    /// The gateway could not serve them: asked again at the next heartbeat or session.
    held_back: BTreeSet<ChunkId>,
    /// Verification failures per chunk.
    failures: BTreeMap<ChunkId, u32>,
    /// When it last asked or received.
    progress_at: Instant,
}

/// The transfers sub-machine.
#[derive(Default)]
pub struct NodeTransfers {
    uploads: BTreeMap<UploadId, Outgoing>,
    offers: BTreeMap<(ConversationId, ManifestDigest), Offer>,
    /// The offer each (conversation, upload) names, for chunk arrivals.
    by_upload: BTreeMap<(ConversationId, UploadId), ManifestDigest>,
    fetching: BTreeMap<(ConversationId, ManifestDigest), Fetching>,
    sent: BTreeMap<(ConversationId, ManifestDigest), SentFile>,
    /// Files completed here whose receipt is still to be sent (the node sends it in the same
    /// batch as the completion, or at a later heartbeat if the group cannot take a message;
    /// those wait in [`NODE_RECEIPTS_OWED_TABLE`] too).
    receipts_owed: Vec<(ConversationId, ManifestDigest)>,
    /// The owed receipts that are in [`NODE_RECEIPTS_OWED_TABLE`].
    receipts_owed_on_disk: BTreeSet<(ConversationId, ManifestDigest)>,
}

fn sent_key(conversation: ConversationId, digest: ManifestDigest) -> Vec<u8> {
    let mut key = conversation.to_bytes().to_vec();
    key.extend_from_slice(&digest.0);
    key
}

fn in_conv(conversation: ConversationId) -> Routing {
    Routing {
        conversation,
        ..Routing::default()
    }
}

fn distinct_chunks(manifest: &Manifest) -> Vec<(ChunkId, usize, u32)> {
    let mut seen = BTreeSet::new();
    manifest
        .chunks
        .iter()
        .enumerate()
        .filter(|(_, c)| seen.insert(c.hash))
        .map(|(index, c)| {
            let sealed = u32::try_from(sealed_len(c.len as usize)).expect("a few MiB");
            (manifest.chunk_id(index), index, sealed)
        })
        .collect()
}

fn offer_key(conversation: ConversationId, digest: ManifestDigest) -> Vec<u8> {
    let mut key = conversation.to_bytes().to_vec();
    key.extend_from_slice(&digest.0);
    key
}

fn encode_offer(offer: &Offer) -> Vec<u8> {
    let mut value = offer.upload.0.to_vec();
    value.extend_from_slice(&offer.sender.to_bytes());
    value.push(offer.state as u8);
    value
}

impl NodeTransfers {
    /// Uploads and offers from committed storage.
    pub fn recover(store: &dyn StoreRead) -> Result<NodeTransfers, StoreError> {
        let mut transfers = NodeTransfers::default();
        scan_all(store, NODE_UPLOADS_TABLE, |key, value| {
            let corrupt = |reason: &str| StoreError::Corrupt {
                table: NODE_UPLOADS_TABLE.0,
                reason: reason.into(),
            };
            let upload = UploadId(key.try_into().map_err(|_| corrupt("key is not an id"))?);
            let mut reader = Reader::new(value);
            let conversation = reader
                .array()
                .map(ConversationId::from_bytes)
                .ok_or_else(|| corrupt("no conversation"))?;
            let source_len = reader
                .array::<2>()
                .map(u16::from_be_bytes)
                .ok_or_else(|| corrupt("no source"))?;
            let source = reader
                .take(usize::from(source_len))
                .ok_or_else(|| corrupt("source cut short"))?;
            let source = Bytes::copy_from_slice(source);
            let rest = reader.take(reader.remaining()).unwrap_or_default();
            let manifest = Manifest::decode(rest).map_err(|e| StoreError::Corrupt {
                table: NODE_UPLOADS_TABLE.0,
                reason: e.to_string(),
            })?;
            transfers.insert_upload(upload, conversation, source, manifest);
            Ok(())
        })?;
        scan_all(store, NODE_OFFERS_TABLE, |key, value| {
            let corrupt = || StoreError::Corrupt {
                table: NODE_OFFERS_TABLE.0,
                reason: "not a conversation, digest, upload, sender and state".into(),
            };
            let mut k = Reader::new(key);
            let mut v = Reader::new(value);
            let (Some(conv), Some(digest), 0) = (k.array(), k.array(), k.remaining()) else {
                return Err(corrupt());
            };
            let (Some(upload), Some(sender), Some(state), 0) =
                (v.array(), v.array(), v.u8(), v.remaining())
            else {
                return Err(corrupt());
            };
            let state = match state {
                0 => OfferState::Offered,
                1 => OfferState::Fetching,
                2 => OfferState::Complete,
                3 => OfferState::Failed,
                _ => return Err(corrupt()),
            };
            let (conv, digest) = (ConversationId::from_bytes(conv), ManifestDigest(digest));
            let offer = Offer {
                upload: UploadId(upload),
                sender: DeviceId::from_bytes(sender),
                state,
            };
            transfers.by_upload.insert((conv, offer.upload), digest);
            if state == OfferState::Fetching {
                transfers
                    .fetching
                    .insert((conv, digest), Fetching::default());
            }
            transfers.offers.insert((conv, digest), offer);
            Ok(())
        })?;
        scan_all(store, NODE_SENT_FILES_TABLE, |key, value| {
            let corrupt = || StoreError::Corrupt {
                table: NODE_SENT_FILES_TABLE.0,
                reason: "not a conversation, digest, size and name".into(),
            };
            let mut k = Reader::new(key);
            let (Some(conv), Some(digest), 0) = (k.array(), k.array(), k.remaining()) else {
                return Err(corrupt());
            };
            let mut v = Reader::new(value);
            let size = v.array().map(u64::from_be_bytes).ok_or_else(corrupt)?;
            let name = v.take(v.remaining()).unwrap_or_default();
            let name = String::from_utf8(name.to_vec()).map_err(|_| corrupt())?;
            let file = SentFile {
                name,
                size,
                receipts: BTreeMap::new(),
            };
            let at = (ConversationId::from_bytes(conv), ManifestDigest(digest));
            transfers.sent.insert(at, file);
            Ok(())
        })?;
        scan_all(store, NODE_FILE_RECEIPTS_TABLE, |key, value| {
            let corrupt = || StoreError::Corrupt {
                table: NODE_FILE_RECEIPTS_TABLE.0,
                reason: "not a sent file's receipt".into(),
            };
            let mut k = Reader::new(key);
            let (Some(conv), Some(digest), Some(device), 0) =
                (k.array(), k.array(), k.array(), k.remaining())
            else {
                return Err(corrupt());
            };
            let verified = match value {
                [0] => false,
                [1] => true,
                _ => return Err(corrupt()),
            };
            let at = (ConversationId::from_bytes(conv), ManifestDigest(digest));
            let file = transfers.sent.get_mut(&at).ok_or_else(corrupt)?;
            file.receipts.insert(DeviceId::from_bytes(device), verified);
            Ok(())
        })?;
        scan_all(store, NODE_RECEIPTS_OWED_TABLE, |key, value| {
            let mut k = Reader::new(key);
            let (Some(conv), Some(digest), 0, true) =
                (k.array(), k.array(), k.remaining(), value.is_empty())
            else {
                return Err(StoreError::Corrupt {
                    table: NODE_RECEIPTS_OWED_TABLE.0,
                    reason: "not a conversation and a file digest".into(),
                });
            };
            let owed = (ConversationId::from_bytes(conv), ManifestDigest(digest));
            transfers.receipts_owed.push(owed);
            transfers.receipts_owed_on_disk.insert(owed);
            Ok(())
        })?;
        Ok(transfers)
    }

    /// Files this device sent, with their receipts.
    pub fn sent_files(
        &self,
    ) -> impl Iterator<Item = (ConversationId, ManifestDigest, &SentFile)> + '_ {
        self.sent.iter().map(|(&(c, d), f)| (c, d, f))
    }

    /// A file's message went into the outbox: it is remembered as sent, for its receipts.
    pub fn file_sent(
        &mut self,
        conversation: ConversationId,
        manifest: &Manifest,
        fx: &mut NodeFx,
    ) {
        let at = (conversation, manifest.digest());
        if self.sent.contains_key(&at) {
            return; // the same file again: its receipts so far stand
        }
        let name = manifest.name.as_str().to_string();
        let mut value = manifest.size.to_be_bytes().to_vec();
        value.extend_from_slice(name.as_bytes());
        fx.put(NODE_SENT_FILES_TABLE, sent_key(at.0, at.1), value);
        self.sent.insert(
            at,
            SentFile {
                name,
                size: manifest.size,
                receipts: BTreeMap::new(),
            },
        );
    }

    /// A receipt for a file this device sent: kept (once per device; a verified one replaces
    /// an unverified one) and true if it is news. Receipts for other files are not kept.
    pub fn receipt(
        &mut self,
        conversation: ConversationId,
        digest: ManifestDigest,
        device: DeviceId,
        verified: bool,
        fx: &mut NodeFx,
    ) -> bool {
        let Some(file) = self.sent.get_mut(&(conversation, digest)) else {
            return false;
        };
        let known = file.receipts.get(&device).copied();
        if known == Some(true) || known == Some(verified) {
            return false;
        }
        if known.is_none() && file.receipts.len() >= RECEIPTS_PER_FILE_MAX {
            return false;
        }
        file.receipts.insert(device, verified);
        let mut key = sent_key(conversation, digest);
        key.extend_from_slice(&device.to_bytes());
        fx.put(NODE_FILE_RECEIPTS_TABLE, key, vec![u8::from(verified)]);
        true
    }

    /// Files completed here whose receipts are to be sent now.
    pub fn take_receipts_owed(&mut self) -> Vec<(ConversationId, ManifestDigest)> {
        std::mem::take(&mut self.receipts_owed)
    }

    /// A receipt that could not be sent now: kept on disk and tried again at the next
    /// heartbeat.
    pub fn receipt_waits(
        &mut self,
        conversation: ConversationId,
        digest: ManifestDigest,
        fx: &mut NodeFx,
    ) {
        if self.receipts_owed_on_disk.insert((conversation, digest)) {
            fx.put(
                NODE_RECEIPTS_OWED_TABLE,
                sent_key(conversation, digest),
                Vec::new(),
            );
        }
        self.receipts_owed.push((conversation, digest));
    }

    /// A receipt owed went out (or never can): it is owed no more.
    pub fn receipt_settled(
        &mut self,
        conversation: ConversationId,
        digest: ManifestDigest,
        fx: &mut NodeFx,
    ) {
        if self.receipts_owed_on_disk.remove(&(conversation, digest)) {
            fx.delete(NODE_RECEIPTS_OWED_TABLE, sent_key(conversation, digest));
        }
    }

    fn insert_upload(
        &mut self,
        upload: UploadId,
        conversation: ConversationId,
        source: Bytes,
        manifest: Manifest,
    ) {
        let chunks = distinct_chunks(&manifest);
        let position = chunks
            .iter()
            .enumerate()
            .map(|(at, &(id, _, _))| (id, at))
            .collect();
        let offsets = manifest
            .chunks
            .iter()
            .scan(0u64, |at, c| {
                let here = *at;
                *at += u64::from(c.len);
                Some(here)
            })
            .collect();
        self.uploads.insert(
            upload,
            Outgoing {
                conversation,
                source,
                manifest: Arc::new(manifest),
                chunks,
                position,
                offsets,
                missing: None,
                missing_bytes: 0,
                in_flight: BTreeSet::new(),
                cursor: 0,
                progress_at: Instant::default(),
            },
        );
    }

    /// Sealed bytes of upload `upload` the gateway lacks, once it said (`None` before).
    pub fn upload_missing_bytes(&self, upload: UploadId) -> Option<u64> {
        let outgoing = self.uploads.get(&upload)?;
        outgoing.missing.as_ref()?;
        Some(outgoing.missing_bytes)
    }

    /// Every file offered to this device, by conversation and digest.
    pub fn offers(&self) -> impl Iterator<Item = (ConversationId, ManifestDigest, &Offer)> + '_ {
        self.offers.iter().map(|(&(c, d), o)| (c, d, o))
    }

    /// The unfinished upload of file `digest` into `conversation`, if any.
    pub fn upload_of(
        &self,
        conversation: ConversationId,
        digest: ManifestDigest,
    ) -> Option<UploadId> {
        self.uploads
            .iter()
            .find(|(_, u)| u.conversation == conversation && u.manifest.digest() == digest)
            .map(|(&id, _)| id)
    }

    /// Uploads not finished, with their conversations.
    pub fn uploads(&self) -> impl Iterator<Item = (UploadId, ConversationId)> + '_ {
        self.uploads.iter().map(|(&id, u)| (id, u.conversation))
    }

    /// A file offered to this device.
    pub fn offer_of(&self, conversation: ConversationId, digest: ManifestDigest) -> Option<&Offer> {
        self.offers.get(&(conversation, digest))
    }

    /// Starts uploading `manifest` into `conversation` (durably), and opens it at once on an
    /// open session.
    #[allow(clippy::too_many_arguments)]
    pub fn start_upload(
        &mut self,
        now: Instant,
        conn: Option<ConnectionId>,
        conversation: ConversationId,
        upload: UploadId,
        manifest: Manifest,
        source: Bytes,
        fx: &mut NodeFx,
    ) {
        assert!(
            source.len() <= SOURCE_BYTES_MAX,
            "the caller bounds the source"
        );
        let mut value = conversation.to_bytes().to_vec();
        value.extend_from_slice(&(source.len() as u16).to_be_bytes());
        value.extend_from_slice(&source);
        value.extend_from_slice(&manifest.encode());
        fx.put(NODE_UPLOADS_TABLE, upload.0.to_vec(), value);
        self.insert_upload(upload, conversation, source, manifest);
        if let Some(conn) = conn {
            self.open(now, conn, upload, fx);
        }
    }

    fn open(&mut self, now: Instant, conn: ConnectionId, upload: UploadId, fx: &mut NodeFx) {
        let Some(outgoing) = self.uploads.get_mut(&upload) else {
            return;
        };
        outgoing.progress_at = now;
        outgoing.missing = None;
        outgoing.missing_bytes = 0;
        outgoing.in_flight.clear();
        outgoing.cursor = 0;
        let open = UploadOpen {
            upload: upload.0,
            chunks: outgoing
                .chunks
                .iter()
                .map(|&(id, _, len)| ListedChunkWire { id: id.0, len })
                .collect(),
        };
        fx.send(
            conn,
            in_conv(outgoing.conversation),
            Payload::UploadOpen(open),
        );
    }

    /// A session opened: every upload is opened again (the gateway answers what it still
    /// lacks) and every fetch asks again for what it lacks.
    pub fn session_opened(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        files: &DeviceFiles,
        fx: &mut NodeFx,
    ) {
        let uploads: Vec<UploadId> = self.uploads.keys().copied().collect();
        for upload in uploads {
            self.open(now, conn, upload, fx);
        }
        for fetching in self.fetching.values_mut() {
            fetching.asked.clear();
            fetching.held_back.clear();
        }
        self.pump_fetches(now, conn, files, fx);
    }

    /// The heartbeat: chunks the gateway could not serve earlier are asked for again (it may
    /// have them now: an uploader sent a damaged one again); a transfer with chunks in flight
    /// and no progress for `stall` asks again (an upload is opened again and hears what is
    /// missing; a fetch asks again for what it asked and did not get).
    ///
    /// Returns the messages of uploads the gateway holds whole whose message could not be
    /// sent earlier (a removal waiting for its commit, a full outbox), to be sent again now.
    pub fn retry(
        &mut self,
        now: Instant,
        stall: core::time::Duration,
        conn: ConnectionId,
        files: &DeviceFiles,
        fx: &mut NodeFx,
    ) -> Vec<(ConversationId, FileMessage)> {
        let waiting: Vec<(ConversationId, FileMessage)> = self
            .uploads
            .iter()
            .filter(|(_, u)| u.missing.as_ref().is_some_and(BTreeSet::is_empty))
            .map(|(&upload, u)| {
                let manifest = Manifest::clone(&u.manifest);
                (u.conversation, FileMessage { upload, manifest })
            })
            .collect();
        let stalled: Vec<UploadId> = self
            .uploads
            .iter()
            .filter(|(_, u)| {
                (u.missing.is_none() || !u.in_flight.is_empty()) && now >= u.progress_at + stall
            })
            .map(|(&id, _)| id)
            .collect();
        for upload in stalled {
            self.open(now, conn, upload, fx);
        }
        let mut any = false;
        for fetching in self.fetching.values_mut() {
            any |= !fetching.held_back.is_empty();
            fetching.held_back.clear();
            if !fetching.asked.is_empty() && now >= fetching.progress_at + stall {
                fetching.asked.clear();
                any = true;
            }
        }
        if any {
            self.pump_fetches(now, conn, files, fx);
        }
        waiting
    }

    /// `UploadStatus`: what the gateway lacks. Returns the file message to send when it lacks
    /// nothing (the upload is then over).
    pub fn on_status(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        status: UploadStatus,
        fx: &mut NodeFx,
    ) -> Option<(ConversationId, FileMessage)> {
        let upload = UploadId(status.upload);
        let outgoing = self.uploads.get_mut(&upload)?;
        outgoing.progress_at = now;
        let missing: BTreeSet<ChunkId> = status.missing.iter().map(|id| ChunkId(**id)).collect();
        outgoing.in_flight.retain(|id| missing.contains(id));
        outgoing.missing_bytes = outgoing
            .chunks
            .iter()
            .filter(|(c, _, _)| missing.contains(c))
            .map(|&(_, _, len)| u64::from(len))
            .sum();
        outgoing.missing = Some(missing);
        outgoing.cursor = 0;
        outgoing.tell_progress(upload, fx);
        self.pump_upload(conn, upload, fx)
    }

    /// `ChunkAck`: a chunk is durable at the gateway.
    pub fn on_ack(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        ack: ChunkAck,
        fx: &mut NodeFx,
    ) -> Option<(ConversationId, FileMessage)> {
        let upload = UploadId(ack.upload);
        let outgoing = self.uploads.get_mut(&upload)?;
        outgoing.progress_at = now;
        let id = ChunkId(ack.id);
        outgoing.in_flight.remove(&id);
        if let Some(missing) = &mut outgoing.missing {
            if missing.remove(&id) {
                // An id the gateway named that is not this file's counted for nothing.
                if let Some(&at) = outgoing.position.get(&id) {
                    outgoing.missing_bytes -= u64::from(outgoing.chunks[at].2);
                }
                outgoing.tell_progress(upload, fx);
            }
        }
        self.pump_upload(conn, upload, fx)
    }

    fn pump_upload(
        &mut self,
        conn: ConnectionId,
        upload: UploadId,
        fx: &mut NodeFx,
    ) -> Option<(ConversationId, FileMessage)> {
        let outgoing = self.uploads.get_mut(&upload)?;
        let missing = outgoing.missing.as_ref()?;
        if missing.is_empty() {
            // The upload stays (durably) until its message is in the outbox: the caller ends
            // it with `upload_finished`, or leaves it for `retry` when the group cannot take
            // a message at the moment.
            let manifest = Manifest::clone(&outgoing.manifest);
            return Some((outgoing.conversation, FileMessage { upload, manifest }));
        }
        while let Some(&(id, index, _)) = outgoing.chunks.get(outgoing.cursor) {
            if outgoing.in_flight.len() >= UPLOAD_WINDOW {
                break;
            }
            outgoing.cursor += 1;
            if !missing.contains(&id) || outgoing.in_flight.contains(&id) {
                continue;
            }
            outgoing.in_flight.insert(id);
            fx.hold(NodeOutput::SendChunk(ChunkToSend {
                conn,
                conversation: outgoing.conversation,
                upload,
                source: outgoing.source.clone(),
                manifest: outgoing.manifest.clone(),
                index,
                id,
                offset: outgoing.offsets[index],
            }));
        }
        None
    }

    /// Upload `upload`'s message is in the outbox (or could never be): the upload is over.
    pub fn upload_finished(&mut self, upload: UploadId, fx: &mut NodeFx) {
        if self.uploads.remove(&upload).is_some() {
            fx.delete(NODE_UPLOADS_TABLE, upload.0.to_vec());
        }
    }

    /// The gateway refused upload `upload` (quota, a bad list): it ends here.
    pub fn upload_refused(&mut self, upload: UploadId, fx: &mut NodeFx) -> Option<UploadFailed> {
        let outgoing = self.uploads.remove(&upload)?;
        fx.delete(NODE_UPLOADS_TABLE, upload.0.to_vec());
        Some(UploadFailed {
            conversation: outgoing.conversation,
            upload,
        })
    }

    /// The gateway no longer has upload `upload`. Ours: it expired while chunks were still
    /// coming, so it is opened again. One we fetch from: the gateway let its chunks go (every
    /// member it still counts fetched them, retention passed, or this device was removed from
    /// the conversation meanwhile), so the fetch ends, and says what to do, instead of asking
    /// for ever.
    pub fn upload_gone(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        conversation: ConversationId,
        upload: UploadId,
        fx: &mut NodeFx,
    ) {
        if self.uploads.contains_key(&upload) {
            self.open(now, conn, upload, fx);
            return;
        }
        let Some(&digest) = self.by_upload.get(&(conversation, upload)) else {
            return;
        };
        let open = self
            .offers
            .get(&(conversation, digest))
            .is_some_and(|o| matches!(o.state, OfferState::Offered | OfferState::Fetching));
        if open {
            self.set_state(conversation, digest, OfferState::Failed, fx);
            fx.event(NodeEvent::FileFailed {
                conversation,
                digest,
                reason: FILE_GONE.to_string(),
            });
        }
    }

    /// Whether `upload` is one of this device's uploads or fetches in `conversation` (so that
    /// a refusal naming it is about a file, not a message).
    pub fn knows_upload(&self, conversation: ConversationId, upload: UploadId) -> bool {
        self.uploads
            .get(&upload)
            .is_some_and(|u| u.conversation == conversation)
            || self.by_upload.contains_key(&(conversation, upload))
    }

    /// This device was removed from `conversation`: its uploads and fetches there end (the
    /// gateway no longer takes or serves its chunks), each with its reason, rather than
    /// asking for ever.
    pub fn conversation_left(&mut self, conversation: ConversationId, fx: &mut NodeFx) {
        let uploads: Vec<UploadId> = self
            .uploads
            .iter()
            .filter(|(_, u)| u.conversation == conversation)
            .map(|(&id, _)| id)
            .collect();
        for upload in uploads {
            self.upload_finished(upload, fx);
            fx.event(NodeEvent::FileSendFailed {
                conversation,
                upload,
                code: ErrorCode::NotMember,
                message: "this device was removed from the conversation before the file was sent: it was not sent".to_string(),
            });
        }
        let open: Vec<ManifestDigest> = self
            .offers
            .range((conversation, ManifestDigest([0; 32]))..)
            .take_while(|((c, _), _)| *c == conversation)
            .filter(|(_, o)| matches!(o.state, OfferState::Offered | OfferState::Fetching))
            .map(|((_, d), _)| *d)
            .collect();
        for digest in open {
            self.set_state(conversation, digest, OfferState::Failed, fx);
            fx.event(NodeEvent::FileFailed {
                conversation,
                digest,
                reason: FILE_REMOVED.to_string(),
            });
        }
    }

    /// A file message arrived in `conversation` from `sender`: the chunk store remembers the
    /// file; the application hears of it.
    pub fn offered(
        &mut self,
        conn: Option<ConnectionId>,
        conversation: ConversationId,
        sender: DeviceId,
        message: FileMessage,
        files: &mut DeviceFiles,
        fx: &mut NodeFx,
    ) {
        let FileMessage { upload, manifest } = message;
        let (name, size) = (manifest.name.as_str().to_string(), manifest.size);
        let needed = files.offer(conversation, manifest, fx.writes());
        let digest = needed.digest;
        let at = (conversation, digest);
        match self.offers.entry(at) {
            std::collections::btree_map::Entry::Vacant(slot) => {
                let offer = Offer {
                    upload,
                    sender,
                    state: OfferState::Offered,
                };
                fx.put(
                    NODE_OFFERS_TABLE,
                    offer_key(conversation, digest),
                    encode_offer(&offer),
                );
                slot.insert(offer);
                self.by_upload.insert((conversation, upload), digest);
            }
            // The same file sent again, under a new upload: fetches name the new one, and
            // a device that holds the file already says so at once, so that the gateway
            // does not keep the new upload's chunks for it.
            std::collections::btree_map::Entry::Occupied(mut slot) => {
                let offer = slot.get_mut();
                if offer.upload != upload {
                    self.by_upload.remove(&(conversation, offer.upload));
                    offer.upload = upload;
                    fx.put(
                        NODE_OFFERS_TABLE,
                        offer_key(conversation, digest),
                        encode_offer(offer),
                    );
                    self.by_upload.insert((conversation, upload), digest);
                    if let (OfferState::Complete, Some(conn)) = (offer.state, conn) {
                        let fetched = FileFetched { upload: upload.0 };
                        fx.send(conn, in_conv(conversation), Payload::FileFetched(fetched));
                    }
                }
            }
        }
        fx.event(NodeEvent::FileOffered {
            conversation,
            sender,
            digest,
            name,
            size,
            missing_bytes: needed.bytes,
        });
    }

    fn set_state(
        &mut self,
        conversation: ConversationId,
        digest: ManifestDigest,
        state: OfferState,
        fx: &mut NodeFx,
    ) {
        if let Some(offer) = self.offers.get_mut(&(conversation, digest)) {
            offer.state = state;
            let value = encode_offer(offer);
            fx.put(NODE_OFFERS_TABLE, offer_key(conversation, digest), value);
        }
        if state != OfferState::Fetching {
            self.fetching.remove(&(conversation, digest));
        }
    }

    /// These files lack a chunk again (the device's copy was lost): those that were complete
    /// go back to offered, to be fetched again.
    pub fn files_incomplete(
        &mut self,
        files: &[(ConversationId, ManifestDigest)],
        fx: &mut NodeFx,
    ) {
        for &(conversation, digest) in files {
            let complete = self
                .offers
                .get(&(conversation, digest))
                .is_some_and(|o| o.state == OfferState::Complete);
            if complete {
                self.set_state(conversation, digest, OfferState::Offered, fx);
            }
        }
    }

    /// The application asks for file `digest` of `conversation`. False for a file never
    /// offered here.
    pub fn fetch(
        &mut self,
        now: Instant,
        conn: Option<ConnectionId>,
        conversation: ConversationId,
        digest: ManifestDigest,
        files: &DeviceFiles,
        fx: &mut NodeFx,
    ) -> bool {
        let Some(offer) = self.offers.get(&(conversation, digest)) else {
            return false;
        };
        if matches!(offer.state, OfferState::Offered | OfferState::Failed) {
            self.set_state(conversation, digest, OfferState::Fetching, fx);
            self.fetching
                .insert((conversation, digest), Fetching::default());
        }
        if let Some(conn) = conn {
            self.pump_fetches(now, conn, files, fx);
        }
        true
    }

    /// Asks for what each fetch lacks and has not asked for, within its window; finishes the
    /// fetches that lack nothing.
    pub fn pump_fetches(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        files: &DeviceFiles,
        fx: &mut NodeFx,
    ) {
        let keys: Vec<(ConversationId, ManifestDigest)> = self.fetching.keys().copied().collect();
        for (conversation, digest) in keys {
            if files.file(conversation, digest).is_none() {
                continue;
            }
            if files.lacking(conversation, digest).next().is_none() {
                self.finish(conn, conversation, digest, fx);
                continue;
            }
            let upload = self.offers[&(conversation, digest)].upload;
            let fetching = self
                .fetching
                .get_mut(&(conversation, digest))
                .expect("listed");
            let room = FETCH_WINDOW.saturating_sub(fetching.asked.len());
            // The first chunks lacking are the ones asked for already, at most a window of
            // them, so this looks at a few dozen entries whatever the file's size.
            let ids: Vec<ChunkId> = files
                .lacking(conversation, digest)
                .map(|(_, id)| id)
                .filter(|id| !fetching.asked.contains(id) && !fetching.held_back.contains(id))
                .take(room.min(CHUNK_REQUEST_IDS_MAX))
                .collect();
            if ids.is_empty() {
                continue;
            }
            fetching.asked.extend(ids.iter().copied());
            fetching.progress_at = now;
            let request = ChunkRequest {
                upload: upload.0,
                ids: ids.iter().map(|id| id.0.into()).collect(),
            };
            fx.send(conn, in_conv(conversation), Payload::ChunkRequest(request));
        }
    }

    fn finish(
        &mut self,
        conn: ConnectionId,
        conversation: ConversationId,
        digest: ManifestDigest,
        fx: &mut NodeFx,
    ) {
        let upload = self.offers[&(conversation, digest)].upload;
        self.set_state(conversation, digest, OfferState::Complete, fx);
        let fetched = FileFetched { upload: upload.0 };
        fx.send(conn, in_conv(conversation), Payload::FileFetched(fetched));
        fx.event(NodeEvent::FileComplete {
            conversation,
            digest,
        });
        self.receipts_owed.push((conversation, digest));
    }

    /// A chunk stream arrived: verified and kept, or counted as a failure and asked for again.
    #[allow(clippy::too_many_arguments)]
    pub fn on_chunk(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        conversation: ConversationId,
        upload: UploadId,
        id: ChunkId,
        body: Bytes,
        files: &mut DeviceFiles,
        fx: &mut NodeFx,
    ) {
        let Some(&digest) = self.by_upload.get(&(conversation, upload)) else {
            return; // not a file this device knows: nothing asked for it
        };
        let Some(fetching) = self.fetching.get_mut(&(conversation, digest)) else {
            return; // a late copy for a fetch that is over
        };
        fetching.asked.remove(&id);
        fetching.progress_at = now;
        let Some(index) = files.lacking_index(conversation, digest, id) else {
            return; // already held
        };
        match files.chunk_arrived(conversation, digest, index, Vec::from(body), fx.writes()) {
            Ok(ChunkProgress::Kept { .. } | ChunkProgress::AlreadyHeld) => {
                let remaining = files.lacking_bytes(conversation, digest).unwrap_or(0);
                fx.event(NodeEvent::FileProgress {
                    conversation,
                    digest,
                    remaining_bytes: remaining,
                });
            }
            Err(error) => {
                let failures = fetching.failures.entry(id).or_default();
                *failures += 1;
                if *failures >= CHUNK_FAILURES_MAX || !matches!(error, ReceiveError::Chunk(_)) {
                    self.set_state(conversation, digest, OfferState::Failed, fx);
                    fx.event(NodeEvent::FileFailed {
                        conversation,
                        digest,
                        reason: format!(
                            "chunk {index} does not match the file's manifest ({error}); the sender's copy may be damaged: ask them to send the file again"
                        ),
                    });
                    return;
                }
            }
        }
        self.pump_fetches(now, conn, files, fx);
    }

    /// `ChunksUnavailable`: these are asked for again at the next heartbeat or session.
    pub fn on_unavailable(&mut self, conversation: ConversationId, answer: ChunksUnavailable) {
        let upload = UploadId(answer.upload);
        let Some(&digest) = self.by_upload.get(&(conversation, upload)) else {
            return;
        };
        if let Some(fetching) = self.fetching.get_mut(&(conversation, digest)) {
            for id in &answer.ids {
                fetching.asked.remove(&ChunkId(**id));
                fetching.held_back.insert(ChunkId(**id));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::MemStore;
    use crate::files::{seal_file, FileName, FileSecret};
    use crate::testing::noise;

    const CONN: ConnectionId = ConnectionId(1);
    const CONV: ConversationId = ConversationId(3);
    const UPLOAD: UploadId = UploadId([7; 16]);

    /// The chunks the step asked to send, and the progress it told.
    fn outputs(fx: &mut NodeFx) -> (Vec<ChunkId>, Vec<u64>) {
        let Some(ready) = fx.take_ready() else {
            return (Vec::new(), Vec::new());
        };
        let (mut sent, mut told) = (Vec::new(), Vec::new());
        for output in ready.commit(&mut MemStore::default()).unwrap() {
            match output {
                NodeOutput::SendChunk(chunk) => sent.push(chunk.id),
                NodeOutput::Event(NodeEvent::UploadProgress {
                    remaining_bytes, ..
                }) => told.push(remaining_bytes),
                _ => {}
            }
        }
        (sent, told)
    }

    fn status(missing: &[ChunkId]) -> UploadStatus {
        UploadStatus {
            upload: UPLOAD.0,
            missing: missing.iter().map(|id| id.0.into()).collect(),
        }
    }

    fn ack(id: ChunkId) -> ChunkAck {
        ChunkAck {
            upload: UPLOAD.0,
            id: id.0,
        }
    }

    /// The upload pump starts where it stopped instead of at the first chunk (it runs once per
    /// acknowledgement), and starts again from the first chunk whenever the gateway says anew
    /// what it lacks: a chunk the gateway found damaged after acknowledging it is sent again.
    /// Progress is the sum a walk of the chunks gives, at every step.
    #[test]
    fn the_upload_pump_resumes_where_it_stopped_and_rewinds_when_the_gateway_says_anew() {
        let data = noise(12 << 20, 31);
        let (manifest, sealed) = seal_file(
            FileName::new("f.bin").unwrap(),
            FileSecret::from_bytes([5; 32]),
            &data,
        )
        .unwrap();
        let ids: Vec<ChunkId> = sealed.iter().map(|c| c.id).collect();
        let len_of = |id: ChunkId| {
            let c = sealed.iter().find(|c| c.id == id).unwrap();
            c.ciphertext.len() as u64
        };
        assert!(ids.len() > 2 * UPLOAD_WINDOW, "{} chunks", ids.len());
        let now = Instant::default();
        let mut transfers = NodeTransfers::default();
        let mut fx = NodeFx::default();
        transfers.start_upload(
            now,
            Some(CONN),
            CONV,
            UPLOAD,
            manifest,
            Bytes::from_static(b"f.bin"),
            &mut fx,
        );
        outputs(&mut fx);

        // The gateway lacks all of them: the first window goes.
        transfers.on_status(now, CONN, status(&ids), &mut fx);
        let (sent, told) = outputs(&mut fx);
        assert_eq!(sent, ids[..UPLOAD_WINDOW]);
        assert_eq!(told, vec![ids.iter().map(|&id| len_of(id)).sum::<u64>()]);

        // Acknowledgements in another order: each lets the next chunk go, in file order.
        let mut remaining: u64 = ids.iter().map(|&id| len_of(id)).sum();
        for (next, &id) in (UPLOAD_WINDOW..).zip(ids[..UPLOAD_WINDOW].iter().rev()) {
            assert_eq!(transfers.on_ack(now, CONN, ack(id), &mut fx), None);
            remaining -= len_of(id);
            let (sent, told) = outputs(&mut fx);
            assert_eq!(sent, vec![ids[next]]);
            assert_eq!(told, vec![remaining]);
            assert_eq!(transfers.upload_missing_bytes(UPLOAD), Some(remaining));
        }

        // Chunks 4 to 7 are in flight. The gateway found chunk 1 damaged, and holds chunk 4
        // (its acknowledgement was lost): it lacks chunk 1 again, and 5 on.
        let mut lacking = vec![ids[1]];
        lacking.extend_from_slice(&ids[UPLOAD_WINDOW + 1..]);
        transfers.on_status(now, CONN, status(&lacking), &mut fx);
        let (sent, told) = outputs(&mut fx);
        assert_eq!(
            sent,
            vec![ids[1]],
            "sent again in the one free place of the window"
        );
        assert_eq!(
            told,
            vec![lacking.iter().map(|&id| len_of(id)).sum::<u64>()]
        );

        // Everything acknowledged (a duplicate and a stranger's id among them): the upload
        // hands over its message once the gateway lacks nothing.
        let mut message = None;
        for &id in lacking.iter().chain([&ids[1], &ChunkId([0xee; 32])]) {
            if let Some(m) = transfers.on_ack(now, CONN, ack(id), &mut fx) {
                message = Some(m);
            }
            outputs(&mut fx);
        }
        assert_eq!(transfers.upload_missing_bytes(UPLOAD), Some(0));
        let (conversation, message) = message.expect("the upload is whole");
        assert_eq!((conversation, message.upload), (CONV, UPLOAD));
    }
}
