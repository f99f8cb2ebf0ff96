//! Files in the simulated world: the `send-file` action, chunk streams on the simulated
//! network, the gateway's chunks served from its simulated disk, and the `files` invariant.
//!
//! Fidelity: a chunk stream travels as one unit on its connection, in order with the frames
//! around it (QUIC gives each stream its own flow, so a real chunk never delays a message; here
//! it does, by its size over the link's bandwidth when one is set). It is lost, duplicated or
//! cut like any frame, and a lost one is recovered by the protocol (the stall timer asks
//! again), not by retransmission. File contents come from the seed and the file's name; every
//! member device fetches every file offered to it (`fetch_file` at once), as `sund follow`
//! with auto-fetch would.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use sund_model::files::{seal_chunk, seal_file, FileName, FileSecret, ManifestDigest, UploadId};
use sund_model::gateway::transfers::read_chunk;
use sund_model::gateway::{ChunkToServe, GatewayInput};
use sund_model::ids::{ConnectionId, ConversationId};
use sund_model::node::files::{assemble, CHUNK_BYTES_TABLE};
use sund_model::node::transfers::{ChunkToSend, OfferState, FILE_GONE, FILE_REMOVED};
use sund_model::node::NodeEvent;
use sund_model::wire::payload::ChunkHead;
use sund_model::wire::{Frame, Payload, Routing};

use super::{Machine, World};
use crate::network::ActorIndex;
use crate::rng::SimRng;
use crate::scenario::{Invariant, Target};

/// What a chunk stream starts with on the simulated network (a frame starts with `SUND`).
const CHUNK_STREAM_TAG: &[u8; 4] = b"SCHK";

/// A chunk stream as one unit: the tag, the head frame's length, the head, the sealed bytes.
fn encode_chunk_stream(head: &[u8], body: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(8 + head.len() + body.len());
    out.extend_from_slice(CHUNK_STREAM_TAG);
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(head);
    out.extend_from_slice(body);
    Bytes::from(out)
}

/// The head and the bytes of a chunk stream, or `None` for a frame.
pub(super) fn decode_chunk_stream(unit: &Bytes) -> Option<(Bytes, Bytes)> {
    let rest = unit.strip_prefix(CHUNK_STREAM_TAG)?;
    let (len, _) = rest.split_first_chunk::<4>()?;
    let len = u32::from_le_bytes(*len) as usize;
    let head_start: usize = 8;
    let body_start = head_start.checked_add(len)?;
    (body_start <= unit.len())
        .then(|| (unit.slice(head_start..body_start), unit.slice(body_start..)))
}

/// A file some device sent, as the world must see it arrive.
struct SentFile {
    name: String,
    sender: ActorIndex,
    /// Devices that were in the sender's view of the group when it sent, with how often each
    /// had been removed from the conversation by then.
    members: BTreeMap<ActorIndex, u32>,
    /// Its upload, if the sender took the file.
    upload: Option<UploadId>,
    /// The sender put the file's message in its outbox (`FileSent`).
    message_sent: bool,
    /// How often the sender had been removed from the conversation when it sent.
    sender_removals: u32,
    /// The sender was told the file could not be sent (it is then owed to nobody).
    failed: bool,
}

/// What the world knows of files.
#[derive(Default)]
pub(super) struct SimFiles {
    /// File contents by name.
    contents: BTreeMap<String, Vec<u8>>,
    /// Files sent, by conversation and digest.
    sent: BTreeMap<(ConversationId, ManifestDigest), SentFile>,
    /// How often each device completed each file.
    completed: BTreeMap<(ActorIndex, ConversationId, ManifestDigest), u32>,
    /// Fetches a device ended because it was removed or the gateway let the chunks go.
    gone: BTreeSet<(ActorIndex, ConversationId, ManifestDigest)>,
    /// Which file each upload carries.
    uploads: BTreeMap<UploadId, (ConversationId, ManifestDigest)>,
    /// How often each device heard it was removed from each conversation.
    removals: BTreeMap<(ActorIndex, ConversationId), u32>,
    /// Chunk streams devices sent, and their sealed bytes.
    chunks_up: u64,
    bytes_up: u64,
    /// Chunk streams gateways served, and their sealed bytes.
    chunks_down: u64,
    bytes_down: u64,
}

/// How files fared in a run, for its report (`None` there when no file was sent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FilesReport {
    /// Files sent (one per sending device and `send-file`).
    pub sent: u64,
    /// Member devices that completed a file, counted once per device and file.
    pub completed: u64,
    /// Chunk streams devices sent to gateways.
    pub chunks_up: u64,
    /// Their sealed bytes.
    pub bytes_up: u64,
    /// Chunk streams gateways served to devices.
    pub chunks_down: u64,
    /// Their sealed bytes.
    pub bytes_down: u64,
    /// Plaintext bytes of the files completed (what moving every chunk would cost).
    pub bytes_completed: u64,
}

/// Bytes for file `name` of a run with `seed`: the same in every run with that seed.
fn contents(seed: u64, name: &str, size: usize) -> Vec<u8> {
    let stream = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut rng = SimRng::from_seed(seed).with_stream(stream);
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(size);
    out
}

/// The secret a simulated device seals its files into `conversation` under (the CLI derives
/// one from the device key; a simulated device's key is not at hand, its id and the seed are).
fn secret(
    seed: u64,
    device: sund_model::ids::DeviceId,
    conversation: ConversationId,
) -> FileSecret {
    let mut hasher = blake3::Hasher::new_derive_key("sund sim file secret");
    hasher.update(&seed.to_le_bytes());
    hasher.update(&device.to_bytes());
    hasher.update(&conversation.to_bytes());
    FileSecret::from_bytes(*hasher.finalize().as_bytes())
}

impl World {
    /// `send-file CONV from WHO size N name NAME [like OTHER]`.
    pub(super) fn send_file_action(
        &mut self,
        conv: &str,
        who: &Target,
        size: usize,
        name: &str,
        like: Option<&str>,
    ) {
        let index = self.conversation_ids[conv];
        let id = self.conversations[index].id;
        let data = match like.and_then(|l| self.files.contents.get(l)) {
            Some(base) => {
                // An edit: a few bytes inserted in the middle of the earlier file.
                let mut edited = base.clone();
                let at = edited.len() / 2;
                edited.splice(at..at, name.bytes());
                edited
            }
            None => contents(self.seed, name, size),
        };
        self.files.contents.insert(name.to_string(), data.clone());
        let file_name = FileName::new(name).expect("scenario names are safe file names");
        for device in self.resolve(who) {
            if !self.sends_to(index, device) {
                continue;
            }
            let me = self.actors[device as usize].device;
            let secret = secret(self.seed, me, id);
            let (manifest, _) =
                seal_file(file_name.clone(), secret, &data).expect("simulated files fit");
            let digest = manifest.digest();
            let view: BTreeSet<_> = self
                .node(device)
                .and_then(|n| n.groups())
                .map(|g| g.mls_members(id).into_iter().collect())
                .unwrap_or_default();
            let members = self
                .devices
                .iter()
                .copied()
                .filter(|&d| d != device && view.contains(&self.actors[d as usize].device))
                .map(|d| {
                    let removals = self.files.removals.get(&(d, id)).copied().unwrap_or(0);
                    (d, removals)
                })
                .collect();
            self.files.sent.entry((id, digest)).or_insert(SentFile {
                name: name.to_string(),
                sender: device,
                members,
                sender_removals: self.files.removals.get(&(device, id)).copied().unwrap_or(0),
                upload: None,
                message_sent: false,
                failed: false,
            });
            *self.faults.entry("files-sent").or_default() += 1;
            let source = Bytes::copy_from_slice(name.as_bytes());
            let mut upload = None;
            self.with_node(device, |n, now| {
                upload = n.send_file(now, id, manifest, source).ok();
            });
            if let Some(upload) = upload {
                self.files.uploads.insert(upload, (id, digest));
            }
            if let Some(sent) = self.files.sent.get_mut(&(id, digest)) {
                sent.upload = upload;
                sent.failed = upload.is_none();
            }
        }
    }

    /// A node's `SendChunk`: the bytes read from the file's contents, sealed, checked, and
    /// sent as a chunk stream on the node's connection.
    pub(super) fn send_chunk(&mut self, a: ActorIndex, chunk: ChunkToSend) {
        let name = String::from_utf8_lossy(&chunk.source).into_owned();
        let data = &self.files.contents[&name];
        let entry = chunk.manifest.chunks[chunk.index];
        let start = chunk.offset as usize;
        let plain = &data[start..start + entry.len as usize];
        let (_, sealed) = seal_chunk(&chunk.manifest.secret, plain);
        assert_eq!(sealed.id, chunk.id, "a simulated file never changes");
        let head = ChunkHead {
            upload: chunk.upload.0,
            id: chunk.id.0,
            len: sealed.ciphertext.len() as u32,
        };
        let routing = Routing {
            conversation: chunk.conversation,
            ..Routing::default()
        };
        let head = Frame::new(routing, Payload::Chunk(head)).encode();
        self.files.chunks_up += 1;
        self.files.bytes_up += sealed.ciphertext.len() as u64;
        let unit = encode_chunk_stream(&head, &sealed.ciphertext);
        self.transmit(a, chunk.conn.0, unit);
    }

    /// A gateway's `ServeChunk`: read from its disk and checked, as the driver does.
    pub(super) fn serve_chunk(&mut self, a: ActorIndex, serve: ChunkToServe) {
        let read = read_chunk(&self.actors[a as usize].disk, &serve)
            .expect("the simulated disk reads what it holds");
        match read {
            Some(bytes) => {
                self.files.chunks_down += 1;
                self.files.bytes_down += bytes.len() as u64;
                let unit = encode_chunk_stream(&serve.head(), &bytes);
                self.transmit(a, serve.conn.0, unit);
            }
            None => self.with_gateway(a, |g, now| g.handle(now, GatewayInput::ChunkDamaged(serve))),
        }
    }

    /// A chunk stream arrived at `to`.
    pub(super) fn chunk_arrived(&mut self, to: ActorIndex, conn: ConnectionId, unit: &Bytes) {
        let Some((head, body)) = decode_chunk_stream(unit) else {
            return;
        };
        if self.is_gateway(to) {
            self.with_gateway(to, |g, now| {
                g.handle(now, GatewayInput::Chunk { conn, head, body })
            });
        } else {
            self.with_node(to, |n, now| {
                n.handle(now, sund_model::node::NodeInput::Chunk { conn, head, body })
            });
        }
    }

    /// What a device's file events mean here: every offered file is fetched at once; every
    /// completed one is read back from the device's disk and compared with what was sent.
    pub(super) fn file_event(&mut self, a: ActorIndex, event: &NodeEvent) {
        match event {
            NodeEvent::FileOffered {
                conversation,
                digest,
                ..
            } => {
                let (conversation, digest) = (*conversation, *digest);
                self.with_node(a, |n, now| {
                    n.fetch_file(now, conversation, digest);
                });
            }
            NodeEvent::FileComplete {
                conversation,
                digest,
            } => {
                let key = (a, *conversation, *digest);
                let times = self.files.completed.entry(key).or_default();
                *times += 1;
                let times = *times;
                let who = self.actors[a as usize].name.clone();
                if times > 1 {
                    self.fail_files(format!(
                        "{who} completed file {digest:?} of {conversation} {times} times"
                    ));
                    return;
                }
                if let Err(why) = self.verify_file(a, *conversation, *digest) {
                    self.fail_files(format!("{who}: {why}"));
                }
            }
            NodeEvent::FileSent { upload, .. } => {
                if let Some(key) = self.files.uploads.get(upload) {
                    if let Some(sent) = self.files.sent.get_mut(key) {
                        sent.message_sent = true;
                    }
                }
            }
            NodeEvent::FileSendFailed { upload, .. } => {
                *self.faults.entry("file-send-failed").or_default() += 1;
                if let Some(key) = self.files.uploads.get(upload) {
                    if let Some(sent) = self.files.sent.get_mut(key) {
                        sent.failed = true;
                    }
                }
            }
            // A removal as the removed device hears it, or as any member applies it (a
            // device re-added at once may never hear of its removal: the Welcome overtakes
            // the notice). Counted more than once per removal; only growth matters.
            NodeEvent::RemovedFrom { conversation, .. } => {
                *self.files.removals.entry((a, *conversation)).or_default() += 1;
            }
            NodeEvent::GroupChanged {
                conversation,
                removed,
                ..
            } => {
                for device in removed {
                    let actor = self
                        .devices
                        .iter()
                        .copied()
                        .find(|&d| self.actors[d as usize].device == *device);
                    if let Some(d) = actor {
                        *self.files.removals.entry((d, *conversation)).or_default() += 1;
                    }
                }
            }
            // Ends a removed device may meet; whether it was removed is judged at the end.
            NodeEvent::FileFailed {
                conversation,
                digest,
                reason,
            } if reason == FILE_GONE || reason == FILE_REMOVED => {
                self.files.gone.insert((a, *conversation, *digest));
            }
            NodeEvent::FileFailed {
                conversation,
                digest,
                reason,
            } => {
                let who = self.actors[a as usize].name.clone();
                self.fail_files(format!(
                    "{who} gave up file {digest:?} of {conversation}: {reason}"
                ));
            }
            _ => {}
        }
    }

    fn fail_files(&mut self, detail: String) {
        if self.scenario.invariants.contains(&Invariant::Files) {
            let now = self.now;
            self.checker.fail_safety(Invariant::Files, now, detail);
        }
    }

    /// The file as device `a` holds it, assembled from its disk, against what was sent.
    fn verify_file(
        &self,
        a: ActorIndex,
        conversation: ConversationId,
        digest: ManifestDigest,
    ) -> Result<(), String> {
        let sent = self
            .files
            .sent
            .get(&(conversation, digest))
            .ok_or_else(|| format!("completed a file nobody sent ({digest:?})"))?;
        let Machine::Node(Some(n), _) = &self.actors[a as usize].machine else {
            return Err("completed a file while down".into());
        };
        let record = n
            .files()
            .file(conversation, digest)
            .ok_or("completed a file it does not know")?;
        let disk = &self.actors[a as usize].disk;
        let mut out = Vec::with_capacity(record.manifest.size as usize);
        assemble(
            &record.manifest,
            |hash| {
                sund_model::env::StoreRead::get(disk, CHUNK_BYTES_TABLE, &hash.0)
                    .ok()
                    .flatten()
            },
            |bytes| out.extend_from_slice(bytes),
        )
        .map_err(|e| format!("file {} does not assemble: {e}", sent.name))?;
        if out != self.files.contents[&sent.name] {
            return Err(format!("file {} assembled to other bytes", sent.name));
        }
        Ok(())
    }

    /// Device `a` started again after a crash or a full disk: a file it was sending whose
    /// upload did not reach its disk was lost with the crash, as a message not yet in the
    /// outbox is (the user saw `sund file send` fail). What did reach it goes on. And a file
    /// offered to it that it had not asked for yet is fetched now: its fetch was lost in the
    /// crash (asked for as the offer arrived, not yet durable), and `sund follow
    /// --fetch-into` fetches it again as the message carrying it comes again (it is taken
    /// only after the fetch is asked for). Found by swarm seed 5110 of the mls family: a
    /// device that crashed 1 ms after an offer never fetched that file.
    pub(super) fn files_after_restart(&mut self, a: ActorIndex) {
        let Machine::Node(Some(n), _) = &self.actors[a as usize].machine else {
            return;
        };
        let unasked: Vec<(ConversationId, ManifestDigest)> = n
            .transfers()
            .offers()
            .filter(|(_, _, offer)| offer.state == OfferState::Offered)
            .map(|(c, d, _)| (c, d))
            .collect();
        if !unasked.is_empty() {
            *self.faults.entry("file-fetch-lost-in-crash").or_default() += unasked.len() as u64;
        }
        for (conversation, digest) in unasked {
            self.with_node(a, |n, now| {
                n.fetch_file(now, conversation, digest);
            });
        }
        let Machine::Node(Some(n), _) = &self.actors[a as usize].machine else {
            return;
        };
        let held: BTreeSet<UploadId> = n.transfers().uploads().map(|(u, _)| u).collect();
        let mut lost = 0;
        for sent in self.files.sent.values_mut() {
            let pending = sent.sender == a && !sent.failed && !sent.message_sent;
            if pending && !sent.upload.is_some_and(|u| held.contains(&u)) {
                sent.failed = true;
                lost += 1;
            }
        }
        if lost > 0 {
            *self.faults.entry("file-send-lost-in-crash").or_default() += lost;
        }
    }

    /// Why the sender of a file does not show member `m`'s verified receipt, if it does not.
    fn receipt_missing(
        &self,
        sent: &SentFile,
        conversation: ConversationId,
        digest: ManifestDigest,
        m: ActorIndex,
    ) -> Option<String> {
        let sender = &self.actors[sent.sender as usize];
        let Machine::Node(Some(n), _) = &sender.machine else {
            return Some(format!("{} is down", sender.name));
        };
        let device = self.actors[m as usize].device;
        let receipt = n
            .transfers()
            .sent_files()
            .find(|&(c, d, _)| c == conversation && d == digest)
            .and_then(|(_, _, f)| f.receipts.get(&device).copied());
        let member = &self.actors[m as usize].name;
        match receipt {
            Some(true) => None,
            Some(false) => Some(format!(
                "{} holds an unverified receipt from {member} for file {}",
                sender.name, sent.name
            )),
            None => Some(format!(
                "{} has no receipt from {member} for file {}",
                sender.name, sent.name
            )),
        }
    }

    /// The run's file figures, if any file was sent.
    pub(super) fn files_report(&self) -> Option<FilesReport> {
        if self.files.sent.is_empty() {
            return None;
        }
        let bytes_completed = self
            .files
            .completed
            .keys()
            .filter_map(|(_, c, d)| self.files.sent.get(&(*c, *d)))
            .map(|sent| self.files.contents[&sent.name].len() as u64)
            .sum();
        Some(FilesReport {
            sent: self.files.sent.len() as u64,
            completed: self.files.completed.len() as u64,
            chunks_up: self.files.chunks_up,
            bytes_up: self.files.bytes_up,
            chunks_down: self.files.chunks_down,
            bytes_down: self.files.bytes_down,
            bytes_completed,
        })
    }

    /// Liveness: every device that was a member when a file was sent, has not been removed
    /// since (a removed device may have lost its claim on the chunks, even if added again), is
    /// a member still and is not revoked, holds the file complete.
    pub(super) fn files_not_converged(&self) -> Option<String> {
        if !self.scenario.invariants.contains(&Invariant::Files) {
            return None;
        }
        for (&(conversation, digest), sent) in &self.files.sent {
            // A revoked or removed sender's file is owed to nobody: revocation or removal ends
            // what it was doing, an upload or a message still in its outbox among it (as for
            // any message of a removed device).
            let sender_removed = self
                .files
                .removals
                .get(&(sent.sender, conversation))
                .copied()
                .unwrap_or(0)
                > sent.sender_removals;
            if sent.failed || sender_removed || self.is_revoked(sent.sender) {
                continue;
            }
            let Some(c) = self.conversations.iter().find(|c| c.id == conversation) else {
                continue;
            };
            let Machine::Gateway(Some(g), _) = &self.actors[c.gateway as usize].machine else {
                return Some(format!("{} is down", self.actors[c.gateway as usize].name));
            };
            let now_members: BTreeSet<_> = g
                .group(conversation)
                .map(|group| group.devices().keys().copied().collect())
                .unwrap_or_default();
            for (&m, &removals) in &sent.members {
                let removed_since = self
                    .files
                    .removals
                    .get(&(m, conversation))
                    .copied()
                    .unwrap_or(0)
                    > removals;
                if removed_since
                    || self.is_revoked(m)
                    || !now_members.contains(&self.actors[m as usize].device)
                {
                    continue;
                }
                if self
                    .files
                    .completed
                    .contains_key(&(m, conversation, digest))
                {
                    // ... and the sender holds its verified receipt.
                    if let Some(why) = self.receipt_missing(sent, conversation, digest, m) {
                        return Some(why);
                    }
                    continue;
                }
                if self.files.gone.contains(&(m, conversation, digest)) {
                    return Some(format!(
                        "{} was told file {} sent by {} is gone, though it stayed a member",
                        self.actors[m as usize].name,
                        sent.name,
                        self.actors[sent.sender as usize].name
                    ));
                }
                return Some(format!(
                    "{} has not completed file {} sent by {}",
                    self.actors[m as usize].name, sent.name, self.actors[sent.sender as usize].name
                ));
            }
        }
        None
    }
}
