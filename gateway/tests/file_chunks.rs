//! File chunks through the real gateway driver on loopback: uploaded on QUIC streams of their
//! own and acknowledged once durable, served to a member on streams of their own, refused
//! before reading when their head is impossible, and never served when damaged at rest.

mod common;

use std::time::Duration;

use bytes::Bytes;

use common::{gateway, logged_in, Frames};

use sund_model::files::{open_chunk, seal_file, FileName, FileSecret};
use sund_model::gateway::files::BLOBS_TABLE;
use sund_model::gateway::AdminCommand;
use sund_model::identity::DeviceKey;
use sund_model::ids::{ConversationId, UserId};
use sund_model::testing::TestDevice;
use sund_model::wire::files::sealed_chunk_bytes_max;
use sund_model::wire::payload::{ChunkHead, ChunkRequest, ErrorCode, ListedChunkWire, UploadOpen};
use sund_model::wire::{Frame, Payload, Routing};
use sund_runtime::chunk_stream::{read_chunk_stream, write_chunk_stream};

const CONV: ConversationId = ConversationId(0x5eed);
const UPLOAD: [u8; 16] = [0x42; 16];

fn device(seed: u8) -> TestDevice {
    let key = DeviceKey::from_seed([seed; 32]);
    TestDevice {
        user: UserId(key.device_id().0),
        key,
    }
}

fn noise(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

fn in_conv() -> Routing {
    Routing {
        conversation: CONV,
        ..Routing::default()
    }
}

fn encode(payload: Payload) -> Vec<u8> {
    Frame::new(in_conv(), payload).encode().to_vec()
}

fn head(id: [u8; 32], len: u32) -> Vec<u8> {
    encode(Payload::Chunk(ChunkHead {
        upload: UPLOAD,
        id,
        len,
    }))
}

#[tokio::test]
async fn chunks_move_on_streams_of_their_own_and_damage_at_rest_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path(), Duration::from_secs(10)).await;
    let (alice, bob) = (device(1), device(2));
    let (a_conn, mut a_send, a_recv) = logged_in(&gw, &alice).await;
    let mut a_frames = Frames::new(a_recv);
    let (b_conn, mut b_send, b_recv) = logged_in(&gw, &bob).await;
    let b_frames = Frames::new(b_recv);
    let members = vec![alice.key.device_id(), bob.key.device_id()];
    gw.admin(AdminCommand::CreateConversation(CONV, members))
        .await
        .unwrap();

    // Alice lists her file's chunks and hears that all are missing.
    let data = noise(3 << 20);
    let secret = FileSecret::from_bytes([5; 32]);
    let (manifest, sealed) = seal_file(FileName::new("a.bin").unwrap(), secret, &data).unwrap();
    assert!(sealed.len() >= 2);
    let open = UploadOpen {
        upload: UPLOAD,
        chunks: sealed
            .iter()
            .map(|c| ListedChunkWire {
                id: c.id.0,
                len: c.ciphertext.len() as u32,
            })
            .collect(),
    };
    a_send
        .write_all(&encode(Payload::UploadOpen(open.clone())))
        .await
        .unwrap();
    let Payload::UploadStatus(status) = a_frames.next_answer().await else {
        panic!("an upload status")
    };
    assert_eq!(status.missing.len(), sealed.len());

    // A head that announces an impossible length is refused before its bytes are read.
    write_chunk_stream(
        &a_conn,
        &head([1; 32], sealed_chunk_bytes_max() + 1),
        Bytes::new(),
    )
    .await
    .unwrap();
    let Payload::Error(error) = a_frames.next_answer().await else {
        panic!("an error")
    };
    assert_eq!(ErrorCode::from_u16(error.code), ErrorCode::ChunkRefused);
    assert!(error.message.contains("chunk.len"), "{}", error.message);

    // Every chunk on its own stream, each acknowledged.
    for chunk in &sealed {
        let h = head(chunk.id.0, chunk.ciphertext.len() as u32);
        write_chunk_stream(&a_conn, &h, Bytes::from(chunk.ciphertext.clone()))
            .await
            .unwrap();
    }
    let mut acked = Vec::new();
    while acked.len() < sealed.len() {
        match a_frames.next_answer().await {
            Payload::ChunkAck(ack) => acked.push(ack.id),
            other => panic!("expected acknowledgements, got {other:?}"),
        }
    }
    acked.sort();
    let mut ids: Vec<[u8; 32]> = sealed.iter().map(|c| c.id.0).collect();
    ids.sort();
    assert_eq!(acked, ids);

    // Bob asks for them all; each comes on a stream of its own and opens.
    let request = ChunkRequest {
        upload: UPLOAD,
        ids: sealed.iter().map(|c| c.id.0.into()).collect(),
    };
    b_send
        .write_all(&encode(Payload::ChunkRequest(request.clone())))
        .await
        .unwrap();
    let mut plain = vec![Vec::new(); sealed.len()];
    for _ in 0..sealed.len() {
        let mut recv = b_conn.accept_uni().await.unwrap();
        let stream = read_chunk_stream(&mut recv).await.unwrap();
        let head = Frame::decode(&stream.head, 4096).unwrap();
        let Payload::Chunk(h) = head.payload else {
            panic!("a chunk head")
        };
        let index = sealed.iter().position(|c| c.id.0 == h.id).unwrap();
        assert_eq!(stream.body, sealed[index].ciphertext);
        plain[index] = open_chunk(
            &manifest.secret,
            &manifest.chunks[index],
            stream.body.to_vec(),
        )
        .unwrap();
    }
    assert_eq!(plain.concat(), data);
    drop((a_send, b_send, a_frames, b_frames, a_conn, b_conn));
    let stats = gw.shutdown().await.unwrap();
    assert_eq!(stats.transfers.chunks_stored, sealed.len() as u64);
    assert_eq!(stats.transfers.chunks_served, sealed.len() as u64);

    // One bit of one stored chunk flips on disk while the gateway is down: chunks live in
    // files of their own beside the database.
    {
        let blobs = dir.path().join("gw/values").join(BLOBS_TABLE.0);
        let fan = std::fs::read_dir(&blobs)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let file = std::fs::read_dir(&fan)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut blob = std::fs::read(&file).unwrap();
        blob[1000] ^= 0x10;
        std::fs::write(&file, blob).unwrap();
    }
    let gw = gateway(dir.path(), Duration::from_secs(10)).await;
    let (_a_conn, _a_send, a_recv) = logged_in(&gw, &alice).await;
    let mut a_frames = Frames::new(a_recv);
    let (b_conn, mut b_send, b_recv) = logged_in(&gw, &bob).await;
    let mut b_frames = Frames::new(b_recv);
    b_send
        .write_all(&encode(Payload::ChunkRequest(request)))
        .await
        .unwrap();
    // The damaged chunk is not sent: Bob hears it is unavailable, Alice that it is missing.
    let Payload::ChunksUnavailable(unavailable) = b_frames.next_answer().await else {
        panic!("chunks unavailable")
    };
    assert_eq!(unavailable.ids.len(), 1);
    let Payload::UploadStatus(status) = a_frames.next_answer().await else {
        panic!("an upload status")
    };
    assert_eq!(status.missing, unavailable.ids);
    // Every other chunk arrives whole.
    for _ in 1..sealed.len() {
        let mut recv = b_conn.accept_uni().await.unwrap();
        let stream = read_chunk_stream(&mut recv).await.unwrap();
        let Payload::Chunk(h) = Frame::decode(&stream.head, 4096).unwrap().payload else {
            panic!("a chunk head")
        };
        assert_ne!(h.id, *unavailable.ids[0]);
    }
    let stats = gw.shutdown().await.unwrap();
    assert_eq!(stats.transfers.chunks_damaged, 1);
}
