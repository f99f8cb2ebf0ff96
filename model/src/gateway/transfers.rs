//! File transfers at the gateway: the wire side of the chunk index ([`super::files`]).
//!
//! The router has checked the session; this sub-machine checks that the device is a member of
//! the conversation, turns frames into index operations, and answers. Chunk bytes never stay
//! here: an upload's bytes go into the store in the batch of their index record, and a fetch
//! becomes a [`GatewayOutput::ServeChunk`] that the driver serves from the store (checking
//! the blob's digest first, and reporting damage back with [`Transfers::damaged`]).

use std::collections::BTreeSet;

use bytes::Bytes;

use super::files::{
    verify_blob, ChunkIndex, ChunkLimits, ChunkRefusal, FetchPlan, ListedChunk, UploadId,
    BLOBS_TABLE,
};
use super::{Fx, GatewayOutput, Refusal};
use crate::env::{StoreError, StoreRead};
use crate::files::ChunkId;
use crate::ids::{ConnectionId, ConversationId, DeviceId, MsgId, UserId};
use crate::time::Instant;
use crate::wire::payload::{
    ChunkAck, ChunkHead, ChunkRequest, ChunksUnavailable, ErrorCode, FileFetched, UploadOpen,
    UploadStatus,
};
use crate::wire::{Payload, Routing};

/// Counters of file transfers.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TransferStats {
    /// Uploads opened (a reopen to resume is not counted again).
    pub uploads_opened: u64,
    /// Chunks stored.
    pub chunks_stored: u64,
    /// Sealed bytes stored.
    pub bytes_stored: u64,
    /// Chunks received that were stored already (acknowledged, not written again).
    pub chunks_duplicate: u64,
    /// Chunks handed to the driver to serve.
    pub chunks_served: u64,
    /// Asked-for chunks that could not be served.
    pub chunks_unavailable: u64,
    /// Chunks found damaged at rest when read.
    pub chunks_damaged: u64,
    /// Uploads ended (fetched by every member, or expired).
    pub uploads_ended: u64,
    /// Chunks deleted (record and blob) after no upload referenced them.
    pub chunks_dropped: u64,
}

/// A chunk the driver is to read from the store and send on a chunk stream of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkToServe {
    /// The connection that asked.
    pub conn: ConnectionId,
    /// The conversation (the chunk stream's routing).
    pub conversation: ConversationId,
    /// The upload the request named.
    pub upload: UploadId,
    /// Whose chunk it is (for [`Transfers::damaged`]).
    pub owner: UserId,
    /// The chunk.
    pub id: ChunkId,
    /// Where its bytes are and what they must hash to.
    pub plan: FetchPlan,
}

impl ChunkToServe {
    /// The frame that opens the chunk stream; the blob's bytes follow it.
    pub fn head(&self) -> Bytes {
        let routing = Routing {
            conversation: self.conversation,
            ..Routing::default()
        };
        let head = ChunkHead {
            upload: self.upload.0,
            id: self.id.0,
            len: self.plan.sealed_len,
        };
        crate::wire::Frame::new(routing, Payload::Chunk(head)).encode()
    }
}

/// Reads a chunk to serve from the store and checks it against its digest: the sealed bytes,
/// or `None` if they are missing or damaged (report it with [`super::GatewayInput::ChunkDamaged`]).
/// Every driver serves chunks through this, the simulator's included.
pub fn read_chunk(
    store: &dyn StoreRead,
    serve: &ChunkToServe,
) -> Result<Option<Vec<u8>>, StoreError> {
    let bytes = store.get(BLOBS_TABLE, &serve.plan.key)?;
    Ok(bytes.filter(|b| verify_blob(&serve.plan, b)))
}

/// The file-transfer sub-machine.
#[derive(Debug, Default)]
pub struct Transfers {
    index: ChunkIndex,
    stats: TransferStats,
}

fn in_conv(conversation: ConversationId) -> Routing {
    Routing {
        conversation,
        ..Routing::default()
    }
}

/// The error the device hears for an index refusal; its `msg_id` names the upload, so that a
/// device with several uploads open knows which one failed.
fn refusal(conversation: ConversationId, upload: UploadId, refused: ChunkRefusal) -> Refusal {
    let code = match refused {
        ChunkRefusal::QuotaExceeded { .. } => ErrorCode::QuotaExceeded,
        ChunkRefusal::TooManyUploads { .. }
        | ChunkRefusal::BadList(_)
        | ChunkRefusal::UploadIdReused => ErrorCode::UploadRefused,
        ChunkRefusal::NoSuchUpload => ErrorCode::NoSuchUpload,
        ChunkRefusal::NotAwaited(_) | ChunkRefusal::WrongLength { .. } => ErrorCode::ChunkRefused,
        ChunkRefusal::Unavailable(_) => ErrorCode::ChunkRefused,
    };
    Refusal::error(code, refused.to_string())
        .in_conversation(in_conv(conversation))
        .about(MsgId::from_bytes(upload.0))
}

/// The member check every file operation starts with: the conversation's members are those
/// who may send in it (its log's members, kept in step with the MLS group's).
/// A refusal names the upload it is about, so that the device ends that transfer (a device
/// removed from the conversation would otherwise ask again at every heartbeat).
fn member_of(
    members: Option<&BTreeSet<DeviceId>>,
    conversation: ConversationId,
    device: DeviceId,
    upload: UploadId,
) -> Result<&BTreeSet<DeviceId>, Refusal> {
    match members {
        Some(m) if m.contains(&device) => Ok(m),
        Some(_) => Err(Refusal::error(
            ErrorCode::NotMember,
            "this device is not a member of that conversation",
        )
        .in_conversation(in_conv(conversation))
        .about(MsgId::from_bytes(upload.0))),
        None => Err(Refusal::error(
            ErrorCode::UnknownConversation,
            "no such conversation here: files go into a DM or a room you are in",
        )
        .in_conversation(in_conv(conversation))
        .about(MsgId::from_bytes(upload.0))),
    }
}

impl Transfers {
    /// No transfers yet.
    pub fn new(limits: ChunkLimits) -> Transfers {
        Transfers {
            index: ChunkIndex::new(limits),
            stats: TransferStats::default(),
        }
    }

    /// Rebuilds the index from committed storage.
    pub fn recover(limits: ChunkLimits, store: &dyn StoreRead) -> Result<Transfers, StoreError> {
        Ok(Transfers {
            index: ChunkIndex::recover(limits, store)?,
            stats: TransferStats::default(),
        })
    }

    /// The chunk index (for tests and the simulator's invariants).
    pub fn index(&self) -> &ChunkIndex {
        &self.index
    }

    /// Counters.
    pub fn stats(&self) -> &TransferStats {
        &self.stats
    }

    /// `UploadOpen`: opens or resumes an upload; answers `UploadStatus` with what is missing.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        &mut self,
        now: Instant,
        conn: ConnectionId,
        device: DeviceId,
        owner: UserId,
        conversation: ConversationId,
        members: Option<&BTreeSet<DeviceId>>,
        open: UploadOpen,
        fx: &mut Fx,
    ) -> Result<(), Refusal> {
        let upload = UploadId(open.upload);
        let members = member_of(members, conversation, device, upload)?;
        let chunks: Vec<ListedChunk> = open
            .chunks
            .iter()
            .map(|c| ListedChunk {
                id: ChunkId(c.id),
                sealed_len: c.len,
            })
            .collect();
        // Every member device but the uploading one fetches it (the sender's other devices
        // included: they show the file too).
        let members: BTreeSet<DeviceId> =
            members.iter().copied().filter(|d| *d != device).collect();
        let reopened = self.index.upload(conversation, upload).is_some();
        let request = super::files::UploadRequest {
            conversation,
            upload,
            owner,
            chunks: &chunks,
            members,
        };
        let missing = self
            .index
            .open_upload(now, request, fx.writes())
            .map_err(|r| refusal(conversation, upload, r))?;
        if !reopened {
            self.stats.uploads_opened += 1;
        }
        let status = UploadStatus {
            upload: upload.0,
            missing: missing.into_iter().map(|id| id.0.into()).collect(),
        };
        fx.send(conn, in_conv(conversation), Payload::UploadStatus(status));
        Ok(())
    }

    /// The bytes of one chunk arrived on a chunk stream: stored with their record, and
    /// acknowledged once durable.
    #[allow(clippy::too_many_arguments)]
    pub fn chunk(
        &mut self,
        conn: ConnectionId,
        device: DeviceId,
        owner: UserId,
        conversation: ConversationId,
        members: Option<&BTreeSet<DeviceId>>,
        head: ChunkHead,
        body: Bytes,
        fx: &mut Fx,
    ) -> Result<(), Refusal> {
        member_of(members, conversation, device, UploadId(head.upload))?;
        head.check_len().map_err(|e| {
            Refusal::error(ErrorCode::ChunkRefused, e.to_string())
                .in_conversation(in_conv(conversation))
        })?;
        let len = body.len() as u64;
        if len != u64::from(head.len) {
            // The driver reads exactly `head.len` bytes, or none when the head is refused
            // before reading (it cannot know membership); anything else is refused, and
            // nothing of it is kept.
            return Err(Refusal::error(
                ErrorCode::ChunkRefused,
                format!(
                    "the chunk stream carried {len} bytes after a head that announced {}",
                    head.len
                ),
            )
            .in_conversation(in_conv(conversation)));
        }
        let upload = UploadId(head.upload);
        let id = head.chunk_id();
        let stored = self
            .index
            .store_chunk(conversation, owner, upload, id, body, fx.writes())
            .map_err(|r| refusal(conversation, upload, r))?;
        if stored {
            self.stats.chunks_stored += 1;
            self.stats.bytes_stored += len;
        } else {
            self.stats.chunks_duplicate += 1;
        }
        let ack = ChunkAck {
            upload: upload.0,
            id: id.0,
        };
        fx.send(conn, in_conv(conversation), Payload::ChunkAck(ack));
        Ok(())
    }

    /// `ChunkRequest`: each chunk the conversation holds is served by the driver after the
    /// batch commits; the others are answered `ChunksUnavailable`.
    #[allow(clippy::too_many_arguments)]
    pub fn request(
        &mut self,
        conn: ConnectionId,
        device: DeviceId,
        conversation: ConversationId,
        members: Option<&BTreeSet<DeviceId>>,
        request: ChunkRequest,
        fx: &mut Fx,
    ) -> Result<(), Refusal> {
        let upload = UploadId(request.upload);
        member_of(members, conversation, device, upload)?;
        let Some(open) = self.index.upload(conversation, upload) else {
            return Err(refusal(conversation, upload, ChunkRefusal::NoSuchUpload));
        };
        let owner = open.owner;
        let mut unavailable = Vec::new();
        for id in request.ids.iter().map(|id| ChunkId(**id)) {
            // Any chunk of the upload's owner in this conversation: a member can read every
            // manifest of the owner's there anyway. Other owners and conversations stay out
            // of reach, since the key names both.
            match self.index.admit_fetch(conversation, owner, id) {
                Ok(plan) => {
                    self.stats.chunks_served += 1;
                    fx.hold(GatewayOutput::ServeChunk(ChunkToServe {
                        conn,
                        conversation,
                        upload,
                        owner,
                        id,
                        plan,
                    }));
                }
                Err(_) => unavailable.push(id),
            }
        }
        if !unavailable.is_empty() {
            self.stats.chunks_unavailable += unavailable.len() as u64;
            let answer = ChunksUnavailable {
                upload: upload.0,
                ids: unavailable.into_iter().map(|id| id.0.into()).collect(),
            };
            fx.send(
                conn,
                in_conv(conversation),
                Payload::ChunksUnavailable(answer),
            );
        }
        Ok(())
    }

    /// `FileFetched`: the device holds the whole file; the upload ends when no member is left
    /// to fetch it.
    pub fn fetched(
        &mut self,
        conversation: ConversationId,
        device: DeviceId,
        fetched: FileFetched,
        fx: &mut Fx,
    ) {
        let upload = UploadId(fetched.upload);
        let was_open = self.index.upload(conversation, upload).is_some();
        self.index
            .fetched_all(conversation, upload, device, fx.writes());
        if was_open && self.index.upload(conversation, upload).is_none() {
            self.stats.uploads_ended += 1;
        }
    }

    /// The driver found a served chunk's bytes damaged at rest: the chunk is awaited again,
    /// the asker hears it is unavailable, and the uploader's open sessions hear what the
    /// upload lacks now (so a device that still has the file uploads it again).
    pub fn damaged(
        &mut self,
        serve: &ChunkToServe,
        uploader_sessions: &[ConnectionId],
        fx: &mut Fx,
    ) {
        self.stats.chunks_damaged += 1;
        let conversation = serve.conversation;
        self.index
            .damaged(conversation, serve.owner, serve.id, fx.writes());
        let answer = ChunksUnavailable {
            upload: serve.upload.0,
            ids: vec![serve.id.0.into()],
        };
        fx.send(
            serve.conn,
            in_conv(conversation),
            Payload::ChunksUnavailable(answer),
        );
        if let Some(open) = self.index.upload(conversation, serve.upload) {
            let missing = self.index.awaited(conversation, open.owner, &open.chunks);
            let status = UploadStatus {
                upload: serve.upload.0,
                missing: missing.into_iter().map(|id| id.0.into()).collect(),
            };
            for &conn in uploader_sessions {
                fx.send(
                    conn,
                    in_conv(conversation),
                    Payload::UploadStatus(status.clone()),
                );
            }
        }
    }

    /// `device` left `conversation`: no upload waits for it.
    pub fn member_removed(&mut self, conversation: ConversationId, device: DeviceId, fx: &mut Fx) {
        self.index.member_removed(conversation, device, fx.writes());
    }

    /// One step deleting chunks no upload references ([`ChunkIndex::drop_step`]).
    pub fn drop_step(&mut self, fx: &mut Fx) {
        let dropped = self.index.drop_step(fx.writes());
        self.stats.chunks_dropped += dropped as u64;
    }

    /// When the next upload's retention passes.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.index.next_expiry()
    }

    /// Ends every upload whose retention has passed.
    pub fn expire(&mut self, now: Instant, fx: &mut Fx) {
        let ended = self.index.handle_timeout(now, fx.writes());
        self.stats.uploads_ended += ended as u64;
    }
}
