//! File transfers through the real gateway machine, with real MLS rooms for membership: an
//! upload opened, resumed and completed; chunks served only to members and checked at rest;
//! uploads ended when every member has fetched them; and every refusal with its own code.
//!
//! The devices here speak the file opcodes by hand (the node's side comes in a later step); the
//! `Net` harness serves chunks from the gateway's store as a driver does.

mod support;

use bytes::Bytes;
use sund_model::env::{Store, StoreRead, WriteBatch};
use sund_model::files::{
    open_chunk, seal_file, FileName, FileSecret, Manifest, ManifestDigest, SealedChunk,
};
use sund_model::gateway::files::{ChunkLimits, BLOBS_TABLE};
use sund_model::gateway::{Gateway, GatewayConfig, GatewayInput};
use sund_model::ids::{ConnectionId, ConversationId, UserId};
use sund_model::node::files::{assemble, CHUNK_BYTES_TABLE};
use sund_model::node::NodeEvent;
use sund_model::wire::payload::{
    ChunkHead, ChunkRequest, ErrorCode, FileFetched, ListedChunkWire, UploadOpen,
};
use sund_model::wire::{Frame, Payload, Routing};
use support::{node_config, Counter, Net};

const UPLOAD: [u8; 16] = [0x55; 16];

fn user(name: &str) -> UserId {
    UserId::of(name, "localhost")
}

/// Bytes that do not repeat (so that the chunker cuts them as it would a real file).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// Alice (1) owns a room with Bob's phone (2) and laptop (3); Carol (4) is registered but not
/// in it.
fn room(net: &mut Net) -> ConversationId {
    net.add(1, node_config(1, "alice"));
    net.add(2, node_config(2, "bob"));
    net.add(3, node_config(3, "bob"));
    net.add(4, node_config(4, "carol"));
    let now = net.now;
    let room = net
        .node(1)
        .create_room(now, &[user("bob")])
        .expect("a room");
    net.settle();
    assert_eq!(net.gateway.group(room).unwrap().devices().len(), 3);
    room
}

fn file(len: usize) -> (Manifest, Vec<SealedChunk>) {
    let secret = FileSecret::from_bytes([9; 32]);
    seal_file(FileName::new("report.pdf").unwrap(), secret, &noise(len, 7)).unwrap()
}

fn listed(chunks: &[SealedChunk]) -> Vec<ListedChunkWire> {
    chunks
        .iter()
        .map(|c| ListedChunkWire {
            id: c.id.0,
            len: c.ciphertext.len() as u32,
        })
        .collect()
}

fn in_conv(conv: ConversationId) -> Routing {
    Routing {
        conversation: conv,
        ..Routing::default()
    }
}

/// A frame from `conn`'s session, as its message stream carries it.
fn frame(net: &mut Net, conn: u64, conv: ConversationId, payload: Payload) {
    let bytes = Frame::new(in_conv(conv), payload).encode();
    let now = net.now;
    net.gateway
        .handle(now, GatewayInput::Frame(ConnectionId(conn), bytes));
    net.settle();
}

/// A chunk stream from `conn`: the head frame, then the bytes.
fn chunk_stream(net: &mut Net, conn: u64, conv: ConversationId, id: [u8; 32], body: &[u8]) {
    let head = ChunkHead {
        upload: UPLOAD,
        id,
        len: body.len() as u32,
    };
    let head = Frame::new(in_conv(conv), Payload::Chunk(head)).encode();
    let now = net.now;
    net.gateway.handle(
        now,
        GatewayInput::Chunk {
            conn: ConnectionId(conn),
            head,
            body: Bytes::copy_from_slice(body),
        },
    );
    net.settle();
}

fn take_seen(net: &mut Net, conn: u64) -> Vec<Payload> {
    net.seen
        .remove(&conn)
        .unwrap_or_default()
        .into_iter()
        .map(|f| f.payload)
        .collect()
}

/// The `missing` of the last `UploadStatus` `conn` heard.
fn missing(seen: &[Payload]) -> Vec<[u8; 32]> {
    seen.iter()
        .rev()
        .find_map(|p| match p {
            Payload::UploadStatus(s) => Some(s.missing.iter().map(|id| **id).collect()),
            _ => None,
        })
        .expect("an upload status")
}

fn errors(seen: &[Payload]) -> Vec<(ErrorCode, String)> {
    seen.iter()
        .filter_map(|p| match p {
            Payload::Error(e) => Some((ErrorCode::from_u16(e.code), e.message.clone())),
            _ => None,
        })
        .collect()
}

fn open_upload(net: &mut Net, conv: ConversationId, chunks: &[SealedChunk]) -> Vec<[u8; 32]> {
    let open = UploadOpen {
        upload: UPLOAD,
        chunks: listed(chunks),
    };
    frame(net, 1, conv, Payload::UploadOpen(open));
    missing(&take_seen(net, 1))
}

fn request(net: &mut Net, conn: u64, conv: ConversationId, ids: &[[u8; 32]]) -> Vec<Payload> {
    let request = ChunkRequest {
        upload: UPLOAD,
        ids: ids.iter().map(|id| (*id).into()).collect(),
    };
    frame(net, conn, conv, Payload::ChunkRequest(request));
    take_seen(net, conn)
}

#[test]
fn an_upload_resumes_with_what_is_missing_and_members_fetch_exactly_the_sealed_bytes() {
    let mut net = Net::new();
    let conv = room(&mut net);
    let (manifest, sealed) = file(3 << 20);
    assert!(sealed.len() >= 2, "a file of several chunks");
    let ids: Vec<[u8; 32]> = sealed.iter().map(|c| c.id.0).collect();

    assert_eq!(
        open_upload(&mut net, conv, &sealed),
        ids,
        "nothing stored yet"
    );
    // The first chunk arrives and is acknowledged; the uploader is cut off.
    chunk_stream(&mut net, 1, conv, ids[0], &sealed[0].ciphertext);
    let acks: Vec<[u8; 32]> = take_seen(&mut net, 1)
        .iter()
        .filter_map(|p| match p {
            Payload::ChunkAck(a) => Some(a.id),
            _ => None,
        })
        .collect();
    assert_eq!(acks, vec![ids[0]]);
    // It reopens the upload and hears only what is missing, even after the gateway restarts.
    net.gateway = Gateway::recover(
        GatewayConfig {
            open_enrolment: true,
            ..GatewayConfig::default()
        },
        net.now,
        &net.gateway_store,
        Box::new(Counter(5)),
    )
    .unwrap();
    for conn in 1..=4 {
        let config = node_config(
            conn as u8,
            ["alice", "bob", "bob", "carol"][conn as usize - 1],
        );
        net.restart(conn, config);
    }
    assert_eq!(open_upload(&mut net, conv, &sealed), ids[1..].to_vec());
    for chunk in &sealed[1..] {
        chunk_stream(&mut net, 1, conv, chunk.id.0, &chunk.ciphertext);
    }
    assert!(open_upload(&mut net, conv, &sealed).is_empty());
    // Counters count since the start; reopening to resume is not a new upload.
    assert_eq!(net.gateway.stats().transfers.uploads_opened, 0);

    // Bob's phone fetches every chunk, gets the very bytes, and opens them.
    let answers = request(&mut net, 2, conv, &ids);
    assert!(errors(&answers).is_empty(), "{:?}", errors(&answers));
    let served = net.chunks.remove(&2).unwrap();
    assert_eq!(served.len(), sealed.len());
    let mut plain = Vec::new();
    for ((head, bytes), (entry, chunk)) in
        served.into_iter().zip(manifest.chunks.iter().zip(&sealed))
    {
        let Payload::Chunk(h) = head.payload else {
            panic!("a chunk stream opens with a chunk head")
        };
        assert_eq!((h.id, h.len as usize), (chunk.id.0, bytes.len()));
        assert_eq!(head.routing.conversation, conv);
        plain.extend(open_chunk(&manifest.secret, entry, bytes).unwrap());
    }
    assert_eq!(plain, noise(3 << 20, 7));
}

#[test]
fn outsiders_cannot_upload_fetch_or_reach_another_conversation() {
    let mut net = Net::new();
    let conv = room(&mut net);
    let (_, sealed) = file(100_000);
    open_upload(&mut net, conv, &sealed);
    chunk_stream(&mut net, 1, conv, sealed[0].id.0, &sealed[0].ciphertext);
    let id = sealed[0].id.0;

    // Carol is not a member: she can neither fetch nor upload nor open an upload there.
    let seen = request(&mut net, 4, conv, &[id]);
    assert_eq!(errors(&seen)[0].0, ErrorCode::NotMember);
    assert!(!net.chunks.contains_key(&4));
    chunk_stream(&mut net, 4, conv, id, &sealed[0].ciphertext);
    let open = UploadOpen {
        upload: [1; 16],
        chunks: listed(&sealed),
    };
    frame(&mut net, 4, conv, Payload::UploadOpen(open));
    let codes: Vec<ErrorCode> = errors(&take_seen(&mut net, 4))
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(codes, vec![ErrorCode::NotMember, ErrorCode::NotMember]);

    // Asking in a conversation that does not exist names that.
    let seen = request(&mut net, 2, ConversationId(999), &[id]);
    assert_eq!(errors(&seen)[0].0, ErrorCode::UnknownConversation);
    // A chunk nobody uploaded is unavailable, and said so by id.
    let seen = request(&mut net, 2, conv, &[[7; 32]]);
    let unavailable: Vec<[u8; 32]> = seen
        .iter()
        .find_map(|p| match p {
            Payload::ChunksUnavailable(u) => Some(u.ids.iter().map(|i| **i).collect()),
            _ => None,
        })
        .unwrap();
    assert_eq!(unavailable, vec![[7; 32]]);
    // An upload id that is not open is its own error.
    let request_other = ChunkRequest {
        upload: [2; 16],
        ids: vec![id.into()],
    };
    frame(&mut net, 2, conv, Payload::ChunkRequest(request_other));
    assert_eq!(
        errors(&take_seen(&mut net, 2))[0].0,
        ErrorCode::NoSuchUpload
    );
}

#[test]
fn chunk_bytes_are_refused_unless_awaited_at_their_declared_length_on_their_own_stream() {
    let mut net = Net::new();
    let conv = room(&mut net);
    let (_, sealed) = file(100_000);
    open_upload(&mut net, conv, &sealed);
    let id = sealed[0].id.0;
    let good = &sealed[0].ciphertext;

    chunk_stream(&mut net, 1, conv, id, &good[1..]);
    chunk_stream(&mut net, 1, conv, [3; 32], good);
    let codes: Vec<ErrorCode> = errors(&take_seen(&mut net, 1))
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(
        codes,
        vec![ErrorCode::ChunkRefused, ErrorCode::ChunkRefused]
    );

    // A head whose length disagrees with the bytes the driver read is refused too.
    let head = ChunkHead {
        upload: UPLOAD,
        id,
        len: good.len() as u32 + 1,
    };
    let now = net.now;
    net.gateway.handle(
        now,
        GatewayInput::Chunk {
            conn: ConnectionId(1),
            head: Frame::new(in_conv(conv), Payload::Chunk(head)).encode(),
            body: Bytes::copy_from_slice(good),
        },
    );
    net.settle();
    // A chunk head in the message stream is the wrong stream.
    frame(&mut net, 1, conv, Payload::Chunk(head));
    let codes: Vec<ErrorCode> = errors(&take_seen(&mut net, 1))
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(
        codes,
        vec![ErrorCode::ChunkRefused, ErrorCode::UnexpectedOpcode]
    );
    // Nothing of it was stored; the right bytes are stored once, and a copy sent again is
    // acknowledged without being written.
    chunk_stream(&mut net, 1, conv, id, good);
    chunk_stream(&mut net, 1, conv, id, good);
    let seen = take_seen(&mut net, 1);
    let acks = seen
        .iter()
        .filter(|p| matches!(p, Payload::ChunkAck(_)))
        .count();
    assert_eq!(acks, 2);
    assert!(errors(&seen).is_empty());
    let stats = net.gateway.stats().transfers;
    assert_eq!((stats.chunks_stored, stats.chunks_duplicate), (1, 1));

    // A chunk stream before a session ends the connection.
    let now = net.now;
    net.gateway
        .handle(now, GatewayInput::Accepted(ConnectionId(9)));
    net.gateway.handle(
        now,
        GatewayInput::Chunk {
            conn: ConnectionId(9),
            head: Frame::new(in_conv(conv), Payload::Chunk(head)).encode(),
            body: Bytes::copy_from_slice(good),
        },
    );
    net.settle();
    let seen = take_seen(&mut net, 9);
    assert!(
        matches!(&seen[0], Payload::Goodbye(g) if g.code == ErrorCode::NotAuthenticated as u16)
    );
}

#[test]
fn a_chunk_damaged_at_rest_is_not_served_and_the_uploader_is_asked_for_it_again() {
    let mut net = Net::new();
    let conv = room(&mut net);
    let (manifest, sealed) = file(100_000);
    open_upload(&mut net, conv, &sealed);
    let chunk = &sealed[0];
    chunk_stream(&mut net, 1, conv, chunk.id.0, &chunk.ciphertext);
    take_seen(&mut net, 1);

    // One bit flips in the stored blob.
    let (key, mut blob) = net
        .gateway_store
        .records()
        .find(|(table, _, _)| *table == BLOBS_TABLE.0)
        .map(|(_, k, v)| (k.to_vec(), v.to_vec()))
        .unwrap();
    blob[100] ^= 1;
    let mut batch = WriteBatch::default();
    batch.put(BLOBS_TABLE, key, blob);
    net.gateway_store.commit(batch).unwrap();

    let seen = request(&mut net, 2, conv, &[chunk.id.0]);
    assert!(!net.chunks.contains_key(&2), "damaged bytes are never sent");
    assert!(seen
        .iter()
        .any(|p| matches!(p, Payload::ChunksUnavailable(u) if *u.ids[0] == chunk.id.0)));
    assert_eq!(net.gateway.stats().transfers.chunks_damaged, 1);
    // Alice's session hears the upload lacks it again, and sends it again.
    assert_eq!(missing(&take_seen(&mut net, 1)), vec![chunk.id.0]);
    chunk_stream(&mut net, 1, conv, chunk.id.0, &chunk.ciphertext);
    request(&mut net, 2, conv, &[chunk.id.0]);
    let (_, bytes) = net.chunks.remove(&2).unwrap().remove(0);
    assert!(open_chunk(&manifest.secret, &manifest.chunks[0], bytes).is_ok());
}

#[test]
fn an_upload_ends_when_every_member_device_has_it_and_frees_its_quota() {
    let mut net = Net::new();
    let conv = room(&mut net);
    let (_, sealed) = file(100_000);
    open_upload(&mut net, conv, &sealed);
    chunk_stream(&mut net, 1, conv, sealed[0].id.0, &sealed[0].ciphertext);
    let alice = user("alice");
    assert!(net.gateway.chunk_index().usage(alice) > 0);

    let fetched = Payload::FileFetched(FileFetched { upload: UPLOAD });
    frame(&mut net, 2, conv, fetched.clone());
    assert!(net
        .gateway
        .chunk_index()
        .upload(conv, sund_model::gateway::files::UploadId(UPLOAD))
        .is_some());
    // Bob's laptop leaves the room instead of fetching: nobody is left to wait for.
    let now = net.now;
    net.node(3).leave(now, conv).unwrap();
    net.settle();
    assert!(!net
        .gateway
        .group(conv)
        .unwrap()
        .devices()
        .contains_key(&net.device(3)));
    assert!(net
        .gateway
        .chunk_index()
        .upload(conv, sund_model::gateway::files::UploadId(UPLOAD))
        .is_none());
    assert_eq!(net.gateway.chunk_index().usage(alice), 0);
    assert_eq!(net.gateway.chunk_index().chunk_count(), 0);
    // The bytes go in steps of the gateway's chunk-drop timer, not all in the commit that
    // ended the upload (a big file's would hold every message behind it).
    let dropping = net.gateway.chunk_index().dropping();
    assert!(dropping > 0);
    assert_eq!(net.gateway_store.table_len(BLOBS_TABLE), dropping);
    net.run_gateway_timers_while(|gateway| gateway.chunk_index().dropping() > 0);
    assert_eq!(
        net.gateway.stats().transfers.chunks_dropped,
        dropping as u64
    );
    assert_eq!(
        net.gateway_store.table_len(BLOBS_TABLE),
        0,
        "the bytes are gone"
    );
    net.gateway.chunk_index().consistency().unwrap();
}

#[test]
fn an_upload_over_the_quota_is_refused_with_what_is_in_use() {
    let mut net = Net::with_config(GatewayConfig {
        open_enrolment: true,
        files: ChunkLimits {
            quota_bytes_per_user: 150_000,
            ..ChunkLimits::default()
        },
        ..GatewayConfig::default()
    });
    let conv = room(&mut net);
    let (_, sealed) = file(100_000);
    open_upload(&mut net, conv, &sealed);
    let other = seal_file(
        FileName::new("other.bin").unwrap(),
        FileSecret::from_bytes([8; 32]),
        &noise(100_000, 3),
    )
    .unwrap()
    .1;
    let open = UploadOpen {
        upload: [6; 16],
        chunks: listed(&other),
    };
    frame(&mut net, 1, conv, Payload::UploadOpen(open));
    let errors = errors(&take_seen(&mut net, 1));
    assert_eq!(errors[0].0, ErrorCode::QuotaExceeded);
    assert!(
        errors[0].1.contains("of your 150000 bytes are in use"),
        "{}",
        errors[0].1
    );
}

fn file_events(net: &Net, conn: u64) -> Vec<&NodeEvent> {
    net.events
        .get(&conn)
        .map(|events| {
            events
                .iter()
                .filter(|e| {
                    matches!(
                        e,
                        NodeEvent::FileOffered { .. }
                            | NodeEvent::FileComplete { .. }
                            | NodeEvent::FileFailed { .. }
                            | NodeEvent::FileSent { .. }
                            | NodeEvent::FileSendFailed { .. }
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The file `conn` holds, read back from its store as the driver assembles it.
fn assembled(net: &Net, conn: u64, conv: ConversationId, digest: ManifestDigest) -> Vec<u8> {
    let (node, store) = &net.nodes[&conn];
    let manifest = &node.files().file(conv, digest).unwrap().manifest;
    let mut out = Vec::new();
    assemble(
        manifest,
        |hash| store.get(CHUNK_BYTES_TABLE, &hash.0).unwrap(),
        |bytes| out.extend_from_slice(bytes),
    )
    .unwrap();
    out
}

#[test]
fn a_file_sent_from_one_device_is_fetched_by_the_others_each_chunk_once_and_resumes_after_restarts()
{
    let mut net = Net::new();
    let conv = room(&mut net);
    let data = noise(5 << 20, 11);
    let secret = FileSecret::from_bytes([4; 32]);
    let (manifest, sealed) = seal_file(FileName::new("talk.mp4").unwrap(), secret, &data).unwrap();
    let digest = manifest.digest();
    let source = Bytes::from_static(b"/home/alice/talk.mp4");
    net.sources.insert(source.clone(), data.clone());

    let now = net.now;
    net.node(1).send_file(now, conv, manifest, source).unwrap();
    net.settle();
    assert_eq!(
        net.chunks_sent[&1],
        sealed.len(),
        "each chunk uploaded once"
    );
    assert!(
        matches!(file_events(&net, 1)[..], [NodeEvent::FileSent { .. }]),
        "{:?}",
        file_events(&net, 1)
    );
    assert!(
        net.node(1).transfers().uploads().next().is_none(),
        "the upload is over"
    );
    for conn in [2, 3] {
        match file_events(&net, conn)[..] {
            [NodeEvent::FileOffered {
                digest: d,
                name,
                size,
                missing_bytes,
                ..
            }] => {
                assert_eq!(
                    (*d, name.as_str(), *size),
                    (digest, "talk.mp4", data.len() as u64)
                );
                assert_eq!(*missing_bytes, data.len() as u64);
            }
            ref other => panic!("{other:?}"),
        }
    }
    // Carol, outside the room, hears nothing.
    assert!(file_events(&net, 4).is_empty());

    // Bob's phone fetches it; it restarts after the first batch of chunks and goes on.
    let now = net.now;
    assert!(net.node(2).fetch_file(now, conv, digest));
    net.step();
    net.step();
    net.restart(2, node_config(2, "bob"));
    net.settle();
    assert!(matches!(
        file_events(&net, 2).last(),
        Some(NodeEvent::FileComplete { .. })
    ));
    assert_eq!(assembled(&net, 2, conv, digest), data);
    assert_eq!(net.chunks[&2].len(), sealed.len(), "no chunk served twice");

    // A chunk of Bob's copy rots on his phone's disk; saving the file finds it, and the node
    // drops it: the file lacks that chunk again, and fetching it moves that chunk alone.
    let lost = net
        .node(2)
        .files()
        .file(conv, digest)
        .unwrap()
        .manifest
        .chunks[1]
        .hash;
    let now = net.now;
    assert_eq!(net.node(2).chunk_lost(now, lost), vec![(conv, digest)]);
    net.settle();
    assert!(!net.node(2).files().is_complete(conv, digest));
    assert_eq!(net.node(2).stats().chunks_lost, 1);
    assert!(net.node(2).fetch_file(now, conv, digest));
    net.settle();
    assert_eq!(assembled(&net, 2, conv, digest), data);
    assert_eq!(
        net.chunks[&2].len(),
        sealed.len() + 1,
        "the lost chunk alone is served again"
    );

    // The laptop too; then the gateway lets the upload go.
    let now = net.now;
    assert!(net.node(3).fetch_file(now, conv, digest));
    net.settle();
    assert_eq!(assembled(&net, 3, conv, digest), data);
    assert_eq!(net.gateway.chunk_index().chunk_count(), 0);
    assert_eq!(net.gateway.chunk_index().usage(user("alice")), 0);
}

#[test]
fn an_upload_interrupted_by_restarts_sends_only_what_the_gateway_lacks() {
    let mut net = Net::new();
    let conv = room(&mut net);
    let data = noise(5 << 20, 12);
    let (manifest, sealed) = seal_file(
        FileName::new("big.iso").unwrap(),
        FileSecret::from_bytes([6; 32]),
        &data,
    )
    .unwrap();
    let source = Bytes::from_static(b"big.iso");
    net.sources.insert(source.clone(), data.clone());
    let now = net.now;
    net.node(1).send_file(now, conv, manifest, source).unwrap();
    // Two rounds (open, then the first window of chunks), then Alice's device restarts: its
    // upload is durable and reopens.
    net.step();
    net.step();
    let sent_before = net.chunks_sent.get(&1).copied().unwrap_or(0);
    assert!(
        sent_before < sealed.len(),
        "interrupted part way: {sent_before} of {}",
        sealed.len()
    );
    net.restart(1, node_config(1, "alice"));
    net.settle();
    assert_eq!(
        net.chunks_sent[&1],
        sealed.len(),
        "what was acknowledged before the restart is not sent again"
    );
    assert!(file_events(&net, 1)
        .iter()
        .any(|e| matches!(e, NodeEvent::FileSent { .. })));
    assert!(file_events(&net, 2)
        .iter()
        .any(|e| matches!(e, NodeEvent::FileOffered { .. })));
}

#[test]
fn a_second_file_sharing_most_chunks_moves_only_the_new_ones_both_ways() {
    let mut net = Net::new();
    let conv = room(&mut net);
    let secret = [7; 32];
    let first = noise(4 << 20, 13);
    let mut second = first.clone();
    second.splice(
        2_000_000..2_000_000,
        b"an edit in the middle".iter().copied(),
    );
    let send = |net: &mut Net, name: &str, data: &[u8]| {
        let (manifest, _) = seal_file(
            FileName::new(name).unwrap(),
            FileSecret::from_bytes(secret),
            data,
        )
        .unwrap();
        let digest = manifest.digest();
        let source = Bytes::copy_from_slice(name.as_bytes());
        net.sources.insert(source.clone(), data.to_vec());
        let now = net.now;
        net.node(1).send_file(now, conv, manifest, source).unwrap();
        net.settle();
        let now = net.now;
        assert!(net.node(2).fetch_file(now, conv, digest));
        net.settle();
        digest
    };
    let d1 = send(&mut net, "v1.bin", &first);
    let (up1, down1) = (net.chunks_sent[&1], net.chunks[&2].len());
    let d2 = send(&mut net, "v2.bin", &second);
    let (up2, down2) = (net.chunks_sent[&1] - up1, net.chunks[&2].len() - down1);
    assert!(
        up2 <= 2 && down2 <= 2,
        "an edit moves the chunks around it: {up2} up, {down2} down of {up1}"
    );
    assert_eq!(assembled(&net, 2, conv, d1), first);
    assert_eq!(assembled(&net, 2, conv, d2), second);
}

#[test]
fn the_same_file_sent_again_moves_nothing_down_and_is_not_kept_for_devices_that_hold_it() {
    let mut net = Net::new();
    let conv = room(&mut net);
    let data = noise(3 << 20, 14);
    let source = Bytes::from_static(b"same.bin");
    net.sources.insert(source.clone(), data.clone());
    let send = |net: &mut Net| {
        let (manifest, _) = seal_file(
            FileName::new("same.bin").unwrap(),
            FileSecret::from_bytes([8; 32]),
            &data,
        )
        .unwrap();
        let digest = manifest.digest();
        let now = net.now;
        net.node(1)
            .send_file(now, conv, manifest, source.clone())
            .unwrap();
        net.settle();
        digest
    };
    let digest = send(&mut net);
    for conn in [2, 3] {
        let now = net.now;
        assert!(net.node(conn).fetch_file(now, conv, digest));
    }
    net.settle();
    assert_eq!(net.gateway.chunk_index().chunk_count(), 0);
    let served = net.chunks[&2].len() + net.chunks[&3].len();

    assert_eq!(send(&mut net), digest);
    assert_eq!(
        net.chunks[&2].len() + net.chunks[&3].len(),
        served,
        "nothing fetched again"
    );
    assert_eq!(
        net.gateway.chunk_index().chunk_count(),
        0,
        "both of Bob's devices said at once that they hold it"
    );
    assert_eq!(net.gateway.chunk_index().usage(user("alice")), 0);
}

#[test]
fn a_chunk_lost_on_the_way_is_asked_for_again_once_the_fetch_stalls() {
    let mut net = Net::new();
    let conv = room(&mut net);
    let data = noise(3 << 20, 15);
    let (manifest, _) = seal_file(
        FileName::new("lossy.bin").unwrap(),
        FileSecret::from_bytes([9; 32]),
        &data,
    )
    .unwrap();
    let digest = manifest.digest();
    let source = Bytes::from_static(b"lossy.bin");
    net.sources.insert(source.clone(), data.clone());
    let now = net.now;
    net.node(1).send_file(now, conv, manifest, source).unwrap();
    net.settle();
    net.lose_served = 1;
    let now = net.now;
    assert!(net.node(2).fetch_file(now, conv, digest));
    net.settle();
    assert!(
        !net.node(2).files().is_complete(conv, digest),
        "one chunk never came"
    );
    // Heartbeats go on; once nothing has moved for the stall time, the fetch asks again.
    for _ in 0..40 {
        net.now = net.now + std::time::Duration::from_secs(1);
        net.settle();
    }
    assert!(net.node(2).files().is_complete(conv, digest));
    assert_eq!(assembled(&net, 2, conv, digest), data);
}

/// Sends a file from Alice's device (1) and returns its digest, with nobody fetching yet.
fn send_from_alice(net: &mut Net, conv: ConversationId, name: &str, seed: u64) -> ManifestDigest {
    let data = noise(1 << 20, seed);
    let (manifest, _) = seal_file(
        FileName::new(name).unwrap(),
        FileSecret::from_bytes([3; 32]),
        &data,
    )
    .unwrap();
    let digest = manifest.digest();
    let source = Bytes::copy_from_slice(name.as_bytes());
    net.sources.insert(source.clone(), data);
    let now = net.now;
    net.node(1).send_file(now, conv, manifest, source).unwrap();
    net.settle();
    digest
}

/// Refusals the gateway sent to `conn` (each a question it would not answer).
fn refusals(net: &Net, conn: u64) -> usize {
    net.seen.get(&conn).map_or(0, |frames| {
        frames
            .iter()
            .filter(|f| matches!(f.payload, Payload::Error(_)))
            .count()
    })
}

/// A device removed from the room before it fetched a file hears that its fetch ended, and
/// why, instead of asking a gateway that no longer serves it at every heartbeat.
#[test]
fn a_device_removed_before_it_fetched_a_file_is_told_and_stops_asking() {
    let mut net = Net::new();
    let conv = room(&mut net);
    let digest = send_from_alice(&mut net, conv, "plans.pdf", 21);
    // Alice removes Bob's laptop before it asks for the file.
    let laptop = net.device(3);
    let now = net.now;
    net.node(1)
        .change_group(
            now,
            conv,
            sund_model::mls::device_groups::Intent::RemoveDevice(laptop.to_bytes().into()),
        )
        .unwrap();
    net.settle();
    let failed: Vec<&String> = file_events(&net, 3)
        .into_iter()
        .filter_map(|e| match e {
            NodeEvent::FileFailed { reason, .. } => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(
        failed,
        [&sund_model::node::transfers::FILE_REMOVED.to_string()]
    );
    // Asked again by its user, it asks the gateway once, is refused, and ends again.
    let now = net.now;
    assert!(net.node(3).fetch_file(now, conv, digest));
    net.settle();
    let failures = file_events(&net, 3)
        .iter()
        .filter(|e| matches!(e, NodeEvent::FileFailed { .. }))
        .count();
    assert_eq!(failures, 2);
    let refused = refusals(&net, 3);
    for _ in 0..70 {
        net.now = net.now + std::time::Duration::from_secs(1);
        net.settle();
    }
    assert_eq!(refusals(&net, 3), refused, "no more asking");
}

/// A file kept past its retention is let go by the gateway; a member that asks for it after
/// that is told it is gone and what to do, once, rather than asking for ever.
#[test]
fn a_file_the_gateway_let_go_ends_the_fetch_with_what_to_do() {
    let mut net = Net::with_config(GatewayConfig {
        open_enrolment: true,
        files: ChunkLimits {
            retention: std::time::Duration::from_secs(60),
            ..ChunkLimits::default()
        },
        ..GatewayConfig::default()
    });
    let conv = room(&mut net);
    let digest = send_from_alice(&mut net, conv, "old.bin", 22);
    for _ in 0..90 {
        net.now = net.now + std::time::Duration::from_secs(1);
        let now = net.now;
        net.gateway.handle_timeout(now);
        net.settle();
    }
    assert_eq!(
        net.gateway.chunk_index().chunk_count(),
        0,
        "retention passed"
    );
    let now = net.now;
    assert!(net.node(2).fetch_file(now, conv, digest));
    net.settle();
    let failed: Vec<&String> = file_events(&net, 2)
        .into_iter()
        .filter_map(|e| match e {
            NodeEvent::FileFailed { reason, .. } => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(
        failed,
        [&sund_model::node::transfers::FILE_GONE.to_string()]
    );
    assert!(failed[0].contains("ask the sender to send it again"));
    // Sent again, the file is offered again and this time arrives.
    let again = send_from_alice(&mut net, conv, "old.bin", 22);
    assert_eq!(again, digest);
    let now = net.now;
    assert!(net.node(2).fetch_file(now, conv, digest));
    net.settle();
    assert!(net.node(2).files().is_complete(conv, digest));
}

fn receipts_heard(net: &Net, conn: u64) -> Vec<(sund_model::ids::DeviceId, bool)> {
    net.events
        .get(&conn)
        .map(|events| {
            events
                .iter()
                .filter_map(|e| match e {
                    NodeEvent::FileReceipt {
                        device, verified, ..
                    } => Some((*device, *verified)),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Each device that completes a file signs a receipt with its device key; the sender checks
/// it against the key in the device's certificate and keeps who holds the file, across a
/// restart. A receipt signed by another key, or naming another device, is refused.
#[test]
fn receivers_sign_receipts_that_the_sender_verifies_and_keeps() {
    let mut net = Net::new();
    let conv = room(&mut net);
    let digest = send_from_alice(&mut net, conv, "minutes.txt", 23);
    for conn in [2, 3] {
        let now = net.now;
        assert!(net.node(conn).fetch_file(now, conv, digest));
    }
    net.settle();
    let mut heard = receipts_heard(&net, 1);
    heard.sort();
    let mut want = vec![(net.device(2), true), (net.device(3), true)];
    want.sort();
    assert_eq!(heard, want, "both of Bob's devices, verified");
    assert!(
        receipts_heard(&net, 2).is_empty(),
        "only the sender keeps receipts"
    );

    // Bob's laptop forges its phone's receipt, then signs one with a key that is not its own.
    let phone = net.device(2);
    let forged = sund_model::node::files::Receipt {
        digest,
        device: phone,
        signature: [7; 64],
    };
    let now = net.now;
    net.node(3)
        .send(now, conv, Bytes::from(forged.encode_message()))
        .unwrap();
    let stranger = sund_model::identity::DeviceKey::from_seed([42; 32]);
    let mut wrong_key = sund_model::node::files::Receipt::sign(&stranger, digest);
    wrong_key.device = net.device(3);
    let now = net.now;
    net.node(3)
        .send(now, conv, Bytes::from(wrong_key.encode_message()))
        .unwrap();
    net.settle();
    assert_eq!(receipts_heard(&net, 1).len(), 2, "nothing new");
    assert_eq!(net.node(1).stats().receipts_refused, 2);

    // The sender restarts: what it learnt is on its disk.
    net.restart(1, node_config(1, "alice"));
    let sent: Vec<_> = net.node(1).transfers().sent_files().collect();
    assert_eq!(sent.len(), 1);
    let (c, d, file) = sent[0];
    assert_eq!((c, d, file.name.as_str()), (conv, digest, "minutes.txt"));
    assert_eq!(file.receipts.len(), 2);
    assert!(file.receipts.values().all(|&verified| verified));
}

/// A receipt the group cannot take when the file completes (here a full outbox) waits on the
/// device's disk: after a restart it is still owed, and sent once the group takes messages.
#[test]
fn a_receipt_that_must_wait_survives_a_restart() {
    let mut net = Net::new();
    let conv = room(&mut net);
    let digest = send_from_alice(&mut net, conv, "plans.pdf", 24);
    // Bob's phone comes back with an outbox of one message, and fills it: the message's frame
    // is lost on the way, so it stays unacknowledged (time does not move here to resend it).
    let mut small = node_config(2, "bob");
    small.outbox_len_max = 1;
    net.restart(2, small);
    let now = net.now;
    net.node(2)
        .send(now, conv, Bytes::from_static(b"on my way"))
        .unwrap();
    net.commit_and_lose_outputs(2);
    let now = net.now;
    assert!(net.node(2).fetch_file(now, conv, digest));
    net.settle();
    assert!(net.node(2).files().is_complete(conv, digest));
    assert!(
        receipts_heard(&net, 1).is_empty(),
        "the phone could not send it"
    );
    assert_eq!(
        net.nodes[&2]
            .1
            .table_len(sund_model::node::transfers::NODE_RECEIPTS_OWED_TABLE),
        1,
        "owed, on disk"
    );
    // A restart with room in the outbox: the receipt goes out, and is owed no more.
    net.restart(2, node_config(2, "bob"));
    net.settle();
    assert_eq!(receipts_heard(&net, 1), vec![(net.device(2), true)]);
    assert_eq!(
        net.nodes[&2]
            .1
            .table_len(sund_model::node::transfers::NODE_RECEIPTS_OWED_TABLE),
        0
    );
    assert_eq!(net.node(2).stats().receipts_sent, 1);
}
