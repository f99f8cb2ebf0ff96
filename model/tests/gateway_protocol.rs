//! The gateway state machine driven through its public protocol: what it answers, what it
//! refuses, and that nothing leaves before its commit.

use std::time::Duration;

use bytes::Bytes;
use sund_model::env::{MemStore, Store};
use sund_model::gateway::{Gateway, GatewayConfig, GatewayInput, GatewayOutput};
use sund_model::ids::{ConnectionId, ConversationId, DeviceId};
use sund_model::time::Instant;
use sund_model::wire::payload::*;
use sund_model::wire::{Frame, Payload, Routing, PAYLOAD_BYTES_MAX};

// ---- helpers ----

const CONV: ConversationId = ConversationId(77);
const ALICE: DeviceId = DeviceId(1);
const BOB: DeviceId = DeviceId(2);
const MALLORY: DeviceId = DeviceId(3);

struct Harness {
    gateway: Gateway,
    store: MemStore,
    now: Instant,
}

impl Harness {
    fn new() -> Harness {
        let mut h = Harness {
            gateway: Gateway::new(GatewayConfig::default(), Instant(0)),
            store: MemStore::default(),
            now: Instant(0),
        };
        h.input(GatewayInput::CreateConversation(CONV, vec![ALICE, BOB]));
        h
    }

    /// Feeds an input, commits every Ready, returns the released outputs.
    fn input(&mut self, input: GatewayInput) -> Vec<GatewayOutput> {
        self.gateway.handle(self.now, input);
        self.drain()
    }

    fn drain(&mut self) -> Vec<GatewayOutput> {
        let mut out = Vec::new();
        while let Some(ready) = self.gateway.poll_ready() {
            out.extend(ready.commit(&mut self.store).unwrap());
        }
        out
    }

    fn frame(&mut self, conn: u64, routing: Routing, payload: Payload) -> Vec<GatewayOutput> {
        self.input(GatewayInput::Frame(
            ConnectionId(conn),
            Frame::new(routing, payload).encode(),
        ))
    }

    fn connect(&mut self, conn: u64, device: DeviceId) -> Vec<GatewayOutput> {
        self.input(GatewayInput::Accepted(ConnectionId(conn)));
        self.frame(
            conn,
            Routing {
                sender: device,
                ..Routing::default()
            },
            Payload::Hello(Hello { cursors: vec![] }),
        )
    }

    fn send(&mut self, conn: u64, device: DeviceId, msg_id: u8, body: &[u8]) -> Vec<GatewayOutput> {
        let routing = Routing {
            conversation: CONV,
            sender: device,
            ..Routing::default()
        };
        self.frame(
            conn,
            routing,
            Payload::Send(Send {
                msg_id: [msg_id; 16],
                body: body.to_vec(),
            }),
        )
    }
}

fn frames_to(outputs: &[GatewayOutput], conn: u64) -> Vec<Frame> {
    outputs
        .iter()
        .filter_map(|o| match o {
            GatewayOutput::Send(c, bytes) if c.0 == conn => {
                Some(Frame::decode(bytes, PAYLOAD_BYTES_MAX).unwrap())
            }
            _ => None,
        })
        .collect()
}

fn closed(outputs: &[GatewayOutput], conn: u64) -> bool {
    outputs
        .iter()
        .any(|o| *o == GatewayOutput::Close(ConnectionId(conn)))
}

fn goodbye_code(outputs: &[GatewayOutput], conn: u64) -> Option<ErrorCode> {
    frames_to(outputs, conn)
        .into_iter()
        .find_map(|f| match f.payload {
            Payload::Goodbye(g) => Some(ErrorCode::from_u16(g.code)),
            _ => None,
        })
}

// ---- tests ----

#[test]
fn hello_opens_a_session_with_the_heartbeat_interval() {
    let mut h = Harness::new();
    let out = h.connect(1, ALICE);
    let frames = frames_to(&out, 1);
    assert_eq!(frames.len(), 1);
    assert_eq!(
        frames[0].payload,
        Payload::HelloOk(HelloOk {
            heartbeat_interval_ms: 5000
        })
    );
}

#[test]
fn a_message_is_acknowledged_only_in_the_ready_that_persists_it() {
    let mut h = Harness::new();
    h.connect(1, ALICE);
    h.connect(2, BOB);
    let routing = Routing {
        conversation: CONV,
        sender: ALICE,
        ..Routing::default()
    };
    let frame = Frame::new(
        routing,
        Payload::Send(Send {
            msg_id: [9; 16],
            body: b"hi".to_vec(),
        }),
    )
    .encode();
    h.gateway
        .handle(h.now, GatewayInput::Frame(ConnectionId(1), frame));
    let ready = h
        .gateway
        .poll_ready()
        .expect("a ready with the write and the ack");
    assert!(
        !ready.writes.is_empty(),
        "the log entry is written in the same batch as the ack"
    );
    let outputs = ready.commit(&mut h.store).unwrap();
    let acks = frames_to(&outputs, 1);
    assert!(matches!(acks[0].payload, Payload::SendAck(a) if a.msg_id == [9; 16]));
    assert_eq!(acks[0].routing.seq, 1);
    let delivered = frames_to(&outputs, 2);
    assert!(matches!(&delivered[0].payload, Payload::Deliver(d) if d.body == b"hi"));
    assert_eq!(delivered[0].routing.sender, ALICE);
}

#[test]
fn a_retried_send_gets_the_original_seq_and_is_not_sequenced_again() {
    let mut h = Harness::new();
    h.connect(1, ALICE);
    h.send(1, ALICE, 1, b"a");
    h.send(1, ALICE, 2, b"b");
    let out = h.send(1, ALICE, 1, b"a");
    let ack = &frames_to(&out, 1)[0];
    assert_eq!(ack.routing.seq, 1);
    assert_eq!(h.gateway.conversation_head(CONV), Some(2));
    assert_eq!(h.gateway.stats().duplicates, 1);
}

#[test]
fn a_non_member_is_refused_with_the_message_id() {
    let mut h = Harness::new();
    h.connect(1, MALLORY);
    let out = h.send(1, MALLORY, 5, b"spam");
    let Payload::Error(report) = &frames_to(&out, 1)[0].payload else {
        panic!("expected an error")
    };
    assert_eq!(ErrorCode::from_u16(report.code), ErrorCode::NotMember);
    assert_eq!(report.msg_id, Some([5; 16]));
    assert_eq!(h.gateway.conversation_head(CONV), Some(0));
}

#[test]
fn frames_before_hello_close_the_connection() {
    let mut h = Harness::new();
    h.input(GatewayInput::Accepted(ConnectionId(1)));
    let out = h.send(1, ALICE, 1, b"early");
    assert_eq!(goodbye_code(&out, 1), Some(ErrorCode::NotAuthenticated));
    assert!(closed(&out, 1));
    assert_eq!(h.gateway.conversation_head(CONV), Some(0));
}

#[test]
fn malformed_and_oversized_frames_close_only_their_own_session() {
    let mut h = Harness::new();
    h.connect(1, ALICE);
    h.connect(2, BOB);
    h.connect(3, MALLORY);
    let out = h.input(GatewayInput::Frame(
        ConnectionId(2),
        Bytes::from_static(b"not a sund frame at all"),
    ));
    assert_eq!(goodbye_code(&out, 2), Some(ErrorCode::MalformedFrame));
    assert!(closed(&out, 2));

    let mut unknown = Frame::new(
        Routing::default(),
        Payload::Heartbeat(Heartbeat { nonce: 1 }),
    )
    .encode()
    .to_vec();
    unknown[6..8].copy_from_slice(&0x7777u16.to_be_bytes());
    let out = h.input(GatewayInput::Frame(ConnectionId(3), Bytes::from(unknown)));
    assert_eq!(goodbye_code(&out, 3), Some(ErrorCode::MalformedFrame));

    let mut oversized = Frame::new(
        Routing::default(),
        Payload::Heartbeat(Heartbeat { nonce: 1 }),
    )
    .encode()
    .to_vec();
    oversized[8..12].copy_from_slice(&(PAYLOAD_BYTES_MAX + 1).to_be_bytes());
    h.connect(4, MALLORY);
    let out = h.input(GatewayInput::Frame(ConnectionId(4), Bytes::from(oversized)));
    assert_eq!(goodbye_code(&out, 4), Some(ErrorCode::MalformedFrame));

    // Alice's session is untouched.
    let out = h.send(1, ALICE, 1, b"still here");
    assert!(matches!(frames_to(&out, 1)[0].payload, Payload::SendAck(_)));
    assert_eq!(h.gateway.stats().malformed, 3);
}

#[test]
fn a_silent_session_is_closed_after_the_idle_timeout() {
    let mut h = Harness::new();
    h.connect(1, ALICE);
    h.now = h.now + Duration::from_secs(16);
    h.gateway.handle_timeout(h.now);
    let out = h.drain();
    assert_eq!(goodbye_code(&out, 1), Some(ErrorCode::HeartbeatTimeout));
    assert_eq!(h.gateway.session_count(), 0);
}

#[test]
fn a_heartbeat_is_answered_with_its_nonce() {
    let mut h = Harness::new();
    h.connect(1, ALICE);
    let out = h.frame(
        1,
        Routing::default(),
        Payload::Heartbeat(Heartbeat { nonce: 41 }),
    );
    assert_eq!(
        frames_to(&out, 1)[0].payload,
        Payload::HeartbeatAck(Heartbeat { nonce: 41 })
    );
}

#[test]
fn a_new_session_replaces_the_old_one_of_the_same_device() {
    let mut h = Harness::new();
    h.connect(1, ALICE);
    let out = h.connect(2, ALICE);
    assert_eq!(goodbye_code(&out, 1), Some(ErrorCode::SessionReplaced));
    assert!(closed(&out, 1));
}

#[test]
fn resume_replays_everything_after_the_presented_cursor_in_order() {
    let mut h = Harness::new();
    h.connect(1, ALICE);
    for i in 1..=5 {
        h.send(1, ALICE, i, &[i]);
    }
    h.input(GatewayInput::Accepted(ConnectionId(2)));
    let hello = Hello {
        cursors: vec![Cursor::new(CONV, 2)],
    };
    let out = h.frame(
        2,
        Routing {
            sender: BOB,
            ..Routing::default()
        },
        Payload::Hello(hello),
    );
    let seqs: Vec<u64> = frames_to(&out, 2)
        .iter()
        .filter(|f| matches!(f.payload, Payload::Deliver(_)))
        .map(|f| f.routing.seq)
        .collect();
    assert_eq!(seqs, vec![3, 4, 5]);
}

#[test]
fn a_stalled_cursor_is_redelivered_and_a_replay_request_rewinds() {
    let mut h = Harness::new();
    h.connect(1, ALICE);
    h.connect(2, BOB);
    h.send(1, ALICE, 1, b"x");
    h.send(1, ALICE, 2, b"y");
    // Bob acknowledges nothing: after redeliver_after the window rewinds.
    h.now = h.now + Duration::from_secs(3);
    h.frame(
        2,
        Routing::default(),
        Payload::Heartbeat(Heartbeat { nonce: 1 }),
    );
    h.gateway.handle_timeout(h.now);
    let out = h.drain();
    let seqs: Vec<u64> = frames_to(&out, 2).iter().map(|f| f.routing.seq).collect();
    assert_eq!(seqs, vec![1, 2]);
    // Bob acknowledges 1, then asks for 2 again.
    h.frame(
        2,
        Routing {
            conversation: CONV,
            seq: 1,
            ..Routing::default()
        },
        Payload::Ack(Ack {}),
    );
    let out = h.frame(
        2,
        Routing {
            conversation: CONV,
            ..Routing::default()
        },
        Payload::ReplayRequest(ReplayRequest { from_seq: 2 }),
    );
    let seqs: Vec<u64> = frames_to(&out, 2).iter().map(|f| f.routing.seq).collect();
    assert_eq!(seqs, vec![2]);
    assert_eq!(h.gateway.cursor(BOB, CONV), 1);
}

#[test]
fn recovery_restores_log_members_and_cursors_from_the_store() {
    let mut h = Harness::new();
    h.connect(1, ALICE);
    h.connect(2, BOB);
    h.send(1, ALICE, 1, b"one");
    h.send(1, ALICE, 2, b"two");
    h.frame(
        2,
        Routing {
            conversation: CONV,
            seq: 2,
            ..Routing::default()
        },
        Payload::Ack(Ack {}),
    );
    let recovered = Gateway::recover(GatewayConfig::default(), h.now, &h.store).unwrap();
    assert_eq!(recovered.conversation_head(CONV), Some(2));
    assert_eq!(recovered.cursor(BOB, CONV), 2);
    let log = recovered.conversations().next().unwrap();
    assert!(log.is_member(ALICE) && log.is_member(BOB) && !log.is_member(MALLORY));
    assert_eq!(&log.get(2).unwrap().body[..], b"two");
}

#[test]
fn a_corrupt_store_is_an_error_on_recovery() {
    let mut store = MemStore::default();
    let mut batch = sund_model::env::WriteBatch::default();
    batch.put(sund_model::sequencer::LOG_TABLE, vec![1, 2, 3], vec![4]);
    store.commit(batch).unwrap();
    let err = Gateway::recover(GatewayConfig::default(), Instant(0), &store).unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
}

/// Regression (found by the `gateway_inputs` fuzz target): a second `Hello` on an open session
/// re-homed the connection to another device, so a later session of the first device sent a
/// `Goodbye` on a connection the gateway had already closed.
#[test]
fn a_second_hello_on_an_open_session_is_refused() {
    let mut h = Harness::new();
    h.connect(1, ALICE);
    let out = h.frame(
        1,
        Routing {
            sender: BOB,
            ..Routing::default()
        },
        Payload::Hello(Hello { cursors: vec![] }),
    );
    let Payload::Error(report) = &frames_to(&out, 1)[0].payload else {
        panic!("expected an error")
    };
    assert_eq!(
        ErrorCode::from_u16(report.code),
        ErrorCode::UnexpectedOpcode
    );
    h.input(GatewayInput::Closed(ConnectionId(1)));
    // Bob connects for real; nothing is sent to the closed connection 1.
    let out = h.connect(2, BOB);
    assert!(frames_to(&out, 1).is_empty());
    assert!(!closed(&out, 1));
}

#[test]
fn acknowledged_messages_are_collected_and_the_head_survives_recovery() {
    let mut h = Harness::new();
    h.connect(1, ALICE);
    h.connect(2, BOB);
    for i in 1..=4 {
        h.send(1, ALICE, i, &[i]);
    }
    for conn in [1, 2] {
        h.frame(
            conn,
            Routing {
                conversation: CONV,
                seq: 4,
                ..Routing::default()
            },
            Payload::Ack(Ack {}),
        );
    }
    h.now = h.now + Duration::from_secs(1);
    h.gateway.handle_timeout(h.now);
    h.drain();
    assert_eq!(h.gateway.stats().gc_dropped, 4);
    let log = h.gateway.conversations().next().unwrap();
    assert_eq!((log.first_seq(), log.head(), log.retained()), (5, 4, 0));
    let recovered = Gateway::recover(GatewayConfig::default(), h.now, &h.store).unwrap();
    assert_eq!(
        recovered.conversation_head(CONV),
        Some(4),
        "an empty log still knows its head"
    );
    // A retry of a collected message still gets its original seq.
    let out = h.send(1, ALICE, 2, &[2]);
    assert_eq!(frames_to(&out, 1)[0].routing.seq, 2);
}

#[test]
fn a_resume_from_before_the_retained_log_gets_replay_window_exceeded() {
    let mut h = Harness::new();
    h.gateway = Gateway::new(
        GatewayConfig {
            retention_max: Duration::from_secs(10),
            ..GatewayConfig::default()
        },
        h.now,
    );
    h.input(GatewayInput::CreateConversation(CONV, vec![ALICE, BOB]));
    h.connect(1, ALICE);
    for i in 1..=3 {
        h.send(1, ALICE, i, &[i]);
    }
    h.now = h.now + Duration::from_secs(11);
    h.send(1, ALICE, 4, &[4]);
    h.gateway.handle_timeout(h.now);
    h.drain();
    // Bob was never online: 1..=3 expired unacknowledged.
    let out = h.connect(2, BOB);
    let frames = frames_to(&out, 2);
    let Payload::Error(report) = &frames[1].payload else {
        panic!("expected an error, got {frames:?}")
    };
    assert_eq!(
        ErrorCode::from_u16(report.code),
        ErrorCode::ReplayWindowExceeded
    );
    assert_eq!(
        (frames[1].routing.conversation, frames[1].routing.seq),
        (CONV, 4)
    );
    assert!(matches!(frames[2].payload, Payload::Deliver(_)));
    assert_eq!(frames[2].routing.seq, 4);
    assert_eq!(h.gateway.stats().replay_window_exceeded, 1);
}
