//! The node state machine driven through its public protocol: outbox, cursors, gap repair,
//! reconnect with backoff.

use std::time::Duration;

use bytes::Bytes;
use sund_model::env::MemStore;
use sund_model::identity::{session_proof_message, DeviceKey};
use sund_model::ids::{ConnectionId, ConversationId, DeviceId, MsgId};
use sund_model::node::{
    ConnectionStatus, Node, NodeConfig, NodeEvent, NodeInput, NodeOutput, SendError,
};
use sund_model::time::Instant;
use sund_model::trust::DeviceCertificate;
use sund_model::wire::payload::*;
use sund_model::wire::{Frame, Payload, Routing, PAYLOAD_BYTES_MAX};

// ---- helpers ----

const CONV: ConversationId = ConversationId(77);
const PEER: DeviceId = DeviceId(2);

fn my_key() -> DeviceKey {
    DeviceKey::from_seed([42; 32])
}

fn config() -> NodeConfig {
    NodeConfig::new(my_key())
}

mod support;
use support::Counter;

struct Harness {
    node: Node,
    store: MemStore,
    now: Instant,
}

impl Harness {
    fn new() -> Harness {
        Harness::with_entropy(1)
    }

    /// A harness whose node draws from entropy stream `seed` (another device, as far as its
    /// random choices go).
    fn with_entropy(seed: u64) -> Harness {
        let store = MemStore::default();
        let node = Node::recover(config(), Box::new(Counter(seed)), Instant(0), &store).unwrap();
        Harness {
            node,
            store,
            now: Instant(0),
        }
    }

    fn drain(&mut self) -> Vec<NodeOutput> {
        let mut out = Vec::new();
        while let Some(ready) = self.node.poll_ready() {
            out.extend(ready.commit(&mut self.store).unwrap());
        }
        out
    }

    fn input(&mut self, input: NodeInput) -> Vec<NodeOutput> {
        self.node.handle(self.now, input);
        self.drain()
    }

    fn tick(&mut self) -> Vec<NodeOutput> {
        self.node.handle_timeout(self.now);
        self.drain()
    }

    fn frame(&mut self, conn: u64, routing: Routing, payload: Payload) -> Vec<NodeOutput> {
        self.input(NodeInput::Frame(
            ConnectionId(conn),
            Frame::new(routing, payload).encode(),
        ))
    }

    /// Connect on `conn` and complete the handshake (registering first, the first time).
    fn open(&mut self, conn: u64) -> Vec<NodeOutput> {
        self.open_with(conn, None)
    }

    /// [`Harness::open`], the gateway's `HelloOk` carrying `peer_roots`.
    fn open_with(&mut self, conn: u64, peer_roots: Option<Vec<u8>>) -> Vec<NodeOutput> {
        let out = self.tick();
        assert!(out.contains(&NodeOutput::Connect), "{out:?}");
        let out = self.input(NodeInput::Connected(ConnectionId(conn)));
        if let Some(Payload::Register(register)) = sent(&out).into_iter().map(|f| f.payload).next()
        {
            assert_eq!(register.device_key, my_key().public().0);
            let out = self.frame(conn, Routing::default(), certificate_answer(self.now));
            assert!(
                matches!(sent(&out)[0].payload, Payload::Hello(_)),
                "the hello follows the certificate: {out:?}"
            );
        }
        self.frame(
            conn,
            Routing::default(),
            Payload::HelloOk(HelloOk {
                heartbeat_interval_ms: 5000,
                resume_token: [7; 32],
                resume_token_ttl_s: 60,
                external_sender: None,
                peer_roots: peer_roots.map(Into::into),
                peer_crls: None,
            }),
        )
    }

    fn deliver(&mut self, conn: u64, seq: u64) -> Vec<NodeOutput> {
        let routing = Routing {
            conversation: CONV,
            sender: PEER,
            seq,
            epoch: 0,
        };
        self.frame(
            conn,
            routing,
            Payload::Deliver(Deliver {
                msg_id: [seq as u8; 16],
                body: vec![seq as u8],
            }),
        )
    }
}

/// The test domain's root key.
fn root_key() -> DeviceKey {
    DeviceKey::from_seed([99; 32])
}

/// The gateway's answer to this device's `Register`.
fn certificate_answer(now: Instant) -> Payload {
    let now_s = now.as_micros() / 1_000_000;
    let cert = DeviceCertificate::issue(
        &root_key(),
        "localhost",
        1,
        my_key().public(),
        config().certificate_user(),
        now_s,
        now_s + 3600,
    );
    Payload::Certificate(Certificate {
        certificate: cert.encode().into(),
        root_key: root_key().public().0,
        voucher: None,
    })
}

fn sent(outputs: &[NodeOutput]) -> Vec<Frame> {
    outputs
        .iter()
        .filter_map(|o| match o {
            NodeOutput::Send(_, b) => Some(Frame::decode(b, PAYLOAD_BYTES_MAX).unwrap()),
            _ => None,
        })
        .collect()
}

fn delivered(outputs: &[NodeOutput]) -> Vec<u64> {
    outputs
        .iter()
        .filter_map(|o| match o {
            NodeOutput::Event(NodeEvent::Delivered { seq, .. }) => Some(*seq),
            _ => None,
        })
        .collect()
}

// ---- tests ----

#[test]
fn a_message_sent_offline_waits_in_the_outbox_and_goes_out_after_hello() {
    let mut h = Harness::new();
    let id = h
        .node
        .send(h.now, CONV, Bytes::from_static(b"queued"))
        .unwrap();
    h.drain();
    assert_eq!(h.node.outbox_len(), 1);
    let out = h.open(1);
    let frames = sent(&out);
    assert!(matches!(&frames[0].payload, Payload::Send(s) if s.msg_id() == id));
    let out = h.frame(
        1,
        Routing {
            conversation: CONV,
            seq: 1,
            ..Routing::default()
        },
        Payload::SendAck(SendAck {
            msg_id: id.to_bytes(),
        }),
    );
    assert!(out.contains(&NodeOutput::Event(NodeEvent::Accepted {
        conversation: CONV,
        msg_id: id,
        seq: 1
    })));
    assert_eq!(h.node.outbox_len(), 0);
}

#[test]
fn the_outbox_survives_a_restart() {
    let mut h = Harness::new();
    h.node
        .send(h.now, CONV, Bytes::from_static(b"durable"))
        .unwrap();
    h.drain();
    let node = Node::recover(config(), Box::new(Counter(2)), h.now, &h.store).unwrap();
    assert_eq!(node.outbox_len(), 1);
}

#[test]
fn deliveries_reach_the_application_once_and_in_order() {
    let mut h = Harness::new();
    h.open(1);
    assert_eq!(delivered(&h.deliver(1, 1)), vec![1]);
    assert_eq!(
        delivered(&h.deliver(1, 1)),
        Vec::<u64>::new(),
        "a duplicate is dropped"
    );
    // 3 arrives before 2: buffered, and a replay request goes out.
    let out = h.deliver(1, 3);
    assert!(delivered(&out).is_empty());
    assert!(sent(&out)
        .iter()
        .any(|f| f.payload == Payload::ReplayRequest(ReplayRequest { from_seq: 2 })));
    assert_eq!(delivered(&h.deliver(1, 2)), vec![2, 3]);
    assert_eq!(h.node.cursor(CONV), 3);
    assert_eq!(h.node.stats().duplicate_deliveries, 1);
}

#[test]
fn with_hold_until_taken_what_the_application_did_not_take_is_delivered_again_after_a_restart() {
    let mut config = config();
    config.hold_until_taken = true;
    let store = MemStore::default();
    let node = Node::recover(config.clone(), Box::new(Counter(1)), Instant(0), &store).unwrap();
    let mut h = Harness {
        node,
        store,
        now: Instant(0),
    };
    h.open(1);
    for seq in 1..=5 {
        assert_eq!(delivered(&h.deliver(1, seq)), vec![seq]);
    }
    // The application shows one message and stops (`sund follow --count 1`).
    h.node.taken(CONV, 1);
    h.drain();
    assert_eq!(h.node.unread_len(), 4);

    let mut node = Node::recover(config.clone(), Box::new(Counter(2)), h.now, &h.store).unwrap();
    let mut again = Vec::new();
    while let Some(ready) = node.poll_ready() {
        again.extend(ready.commit(&mut h.store).unwrap());
    }
    assert_eq!(
        delivered(&again),
        vec![2, 3, 4, 5],
        "in seq order, once each"
    );
    let bodies: Vec<_> = again
        .iter()
        .filter_map(|o| match o {
            NodeOutput::Event(NodeEvent::Delivered {
                body,
                sender,
                msg_id,
                ..
            }) => Some((body.clone(), *sender, *msg_id)),
            _ => None,
        })
        .collect();
    assert_eq!(
        bodies[0],
        (Bytes::from(vec![2u8]), PEER, MsgId::from_bytes([2; 16])),
        "the message comes back whole"
    );
    for seq in 2..=5 {
        node.taken(CONV, seq);
    }
    node.taken(CONV, 5); // twice is harmless
    while let Some(ready) = node.poll_ready() {
        ready.commit(&mut h.store).unwrap();
    }
    let mut node = Node::recover(config, Box::new(Counter(3)), h.now, &h.store).unwrap();
    assert!(node.poll_ready().is_none(), "everything was taken");
    assert_eq!(node.unread_len(), 0);
}

#[test]
fn without_hold_until_taken_nothing_is_kept_for_the_application() {
    let mut h = Harness::new();
    h.open(1);
    h.deliver(1, 1);
    assert_eq!(h.node.unread_len(), 0);
    let mut node = Node::recover(config(), Box::new(Counter(2)), h.now, &h.store).unwrap();
    assert!(node.poll_ready().is_none());
}

/// The `Send` frames in `outputs`, as (message id, what it comes after).
fn sends(outputs: &[NodeOutput]) -> Vec<(MsgId, Option<MsgId>)> {
    sent(outputs)
        .into_iter()
        .filter_map(|f| match f.payload {
            Payload::Send(s) => Some((s.msg_id(), s.after.map(MsgId::from_bytes))),
            _ => None,
        })
        .collect()
}

fn eager_and_held(h: &mut Harness) -> Vec<NodeOutput> {
    let mut out = Vec::new();
    while let Some(mut ready) = h.node.poll_ready() {
        out.extend(ready.take_eager());
        out.extend(ready.commit(&mut h.store).unwrap());
    }
    out
}

fn send_ack(h: &mut Harness, id: MsgId, seq: u64) -> Vec<NodeOutput> {
    let routing = Routing {
        conversation: CONV,
        seq,
        ..Routing::default()
    };
    h.frame(
        1,
        routing,
        Payload::SendAck(SendAck {
            msg_id: id.to_bytes(),
        }),
    )
}

/// `sender_out_of_order` about `msg` naming the gateway's `last`: a refusal, or with `held` the
/// notice of a message the gateway keeps until the one before it comes.
fn sender_order_error(h: &mut Harness, msg: MsgId, last: MsgId, held: bool) -> Vec<NodeOutput> {
    let report = ErrorReport {
        code: ErrorCode::SenderOutOfOrder as u16,
        message: if held { "held" } else { "out of order" }.into(),
        msg_id: Some(msg.to_bytes()),
        after: Some(last.to_bytes()),
        retry_after_ms: None,
        held: held.then_some(true),
    };
    let routing = Routing {
        conversation: CONV,
        ..Routing::default()
    };
    h.frame(1, routing, Payload::Error(report))
}

fn out_of_order(h: &mut Harness, refused: MsgId, last: MsgId) -> Vec<NodeOutput> {
    sender_order_error(h, refused, last, false)
}

#[test]
fn messages_queued_offline_go_out_in_the_order_they_were_sent_each_chained_to_the_one_before() {
    let mut h = Harness::new();
    // Offline: three messages queue up (random ids, so id order is not send order).
    let ids: Vec<MsgId> = (1..=3)
        .map(|i| {
            h.node
                .send(h.now, CONV, Bytes::from(format!("q{i}")))
                .unwrap()
        })
        .collect();
    h.drain();
    let out = h.open(1);
    let none = MsgId::from_bytes([0; 16]);
    assert_eq!(
        sends(&out),
        vec![
            (ids[0], Some(none)),
            (ids[1], Some(ids[0])),
            (ids[2], Some(ids[1]))
        ],
        "in send order, each after the one before"
    );
    // The same after a restart.
    let mut again = Harness {
        node: Node::recover(config(), Box::new(Counter(9)), h.now, &h.store).unwrap(),
        store: h.store.clone(),
        now: h.now,
    };
    assert_eq!(sends(&again.open(2)), sends(&out));
    // Acknowledged in order, the next message chains after the last acknowledged one.
    for (seq, id) in ids.iter().enumerate() {
        send_ack(&mut h, *id, seq as u64 + 1);
    }
    h.node.send(h.now, CONV, Bytes::from_static(b"q4")).unwrap();
    let out = eager_and_held(&mut h);
    assert_eq!(sends(&out)[0].1, Some(ids[2]));
}

#[test]
fn a_refusal_out_of_order_resends_what_waits_chained_from_the_gateways_last() {
    let mut h = Harness::new();
    h.open(1);
    let a = h.node.send(h.now, CONV, Bytes::from_static(b"a")).unwrap();
    let b = h.node.send(h.now, CONV, Bytes::from_static(b"b")).unwrap();
    eager_and_held(&mut h);
    // The gateway sequenced a message this device forgot (a crash took it before it was
    // written): it is the gateway's last, and `a` must come after it. Only `a` goes again:
    // `b`'s copy on the way names `a` still, and the gateway holds it until `a` comes.
    let forgotten = MsgId::from_bytes([0xf0; 16]);
    let out = out_of_order(&mut h, a, forgotten);
    assert_eq!(sends(&out), vec![(a, Some(forgotten))]);
    assert_eq!(h.node.stats().sender_resyncs, 1);
    // More refusals of the same wave (copies sent before) change nothing and send nothing
    // within the replay interval.
    let out = out_of_order(&mut h, b, forgotten);
    assert!(sends(&out).is_empty(), "{out:?}");
    // `a` itself is the gateway's last: its acknowledgement is on the way, and `b` was merely
    // overtaken; after the interval what waits goes again.
    h.now = h.now + Duration::from_secs(1);
    let out = out_of_order(&mut h, b, a);
    assert_eq!(sends(&out), vec![(a, Some(forgotten)), (b, Some(a))]);
}

fn held(h: &mut Harness, held: MsgId, last: MsgId) -> Vec<NodeOutput> {
    sender_order_error(h, held, last, true)
}

#[test]
fn a_message_the_gateway_holds_sends_again_only_the_one_before_it() {
    let mut h = Harness::new();
    h.now = h.now + Duration::from_secs(10);
    h.open(1);
    let ids: Vec<MsgId> = (0..5)
        .map(|i| {
            h.node
                .send(h.now, CONV, Bytes::from(format!("m{i}")))
                .unwrap()
        })
        .collect();
    eager_and_held(&mut h);
    // A round trip of 20 ms.
    h.now = h.now + Duration::from_millis(20);
    send_ack(&mut h, ids[0], 1);
    // ids[1] was lost on the way; the gateway holds ids[2] (and quietly ids[3], ids[4]).
    let out = held(&mut h, ids[2], ids[0]);
    assert_eq!(
        sends(&out),
        vec![(ids[1], Some(ids[0]))],
        "the one before it alone"
    );
    assert_eq!(h.node.stats().sender_gaps_filled, 1);
    assert_eq!(h.node.stats().sender_resyncs, 0);
    // Told again within a round trip: it went out after ids[2], and is on its way.
    h.now = h.now + Duration::from_millis(1);
    assert!(sends(&held(&mut h, ids[2], ids[0])).is_empty());
    // ids[3] was lost too: the gateway holds ids[4] and tells of that gap.
    let out = held(&mut h, ids[4], ids[0]);
    assert_eq!(sends(&out), vec![(ids[3], Some(ids[2]))]);
    // Told again after more than a round trip (the gateway tells every open gap again after
    // a while): lost again, it goes again.
    h.now = h.now + Duration::from_secs(1);
    let out = held(&mut h, ids[2], ids[0]);
    assert_eq!(sends(&out), vec![(ids[1], Some(ids[0]))]);
    // A late notice about a message settled since sends nothing.
    send_ack(&mut h, ids[1], 2);
    send_ack(&mut h, ids[2], 3);
    assert!(sends(&held(&mut h, ids[2], ids[0])).is_empty());
}

#[test]
fn a_held_notice_moves_the_chain_only_at_its_head() {
    let mut h = Harness::new();
    h.open(1);
    let a = h.node.send(h.now, CONV, Bytes::from_static(b"a")).unwrap();
    let b = h.node.send(h.now, CONV, Bytes::from_static(b"b")).unwrap();
    eager_and_held(&mut h);
    // The notice for b names a last this device does not know (older than what it knows, as
    // notices crossing acknowledgements do): a waits before b, so only a goes again.
    let other = MsgId::from_bytes([0xf0; 16]);
    let none = MsgId::from_bytes([0; 16]);
    let out = held(&mut h, b, other);
    assert_eq!(sends(&out), vec![(a, Some(none))]);
    assert_eq!(h.node.stats().sender_resyncs, 0);
    // The gateway holds a, the chain's head, and its last is another: the gateway lost
    // what this device's chain starts at (or sequenced one it forgot), so the chain starts
    // at the gateway's last and everything waiting goes again.
    let out = held(&mut h, a, other);
    assert_eq!(sends(&out), vec![(a, Some(other)), (b, Some(a))]);
    assert_eq!(h.node.stats().sender_resyncs, 1);
}

#[test]
fn a_held_copy_chained_before_the_device_learnt_the_gateways_last_goes_again_itself() {
    let mut h = Harness::new();
    h.open(1);
    let a = h.node.send(h.now, CONV, Bytes::from_static(b"a")).unwrap();
    let b = h.node.send(h.now, CONV, Bytes::from_static(b"b")).unwrap();
    eager_and_held(&mut h);
    // a was sequenced (its acknowledgement came); the gateway holds an old copy of b that
    // names another message: b goes again, after a.
    send_ack(&mut h, a, 1);
    let out = held(&mut h, b, a);
    assert_eq!(sends(&out), vec![(b, Some(a))]);
}

#[test]
fn a_message_refused_for_good_leaves_the_chain_and_the_next_goes_again_after_its_predecessor() {
    let mut h = Harness::new();
    h.open(1);
    let a = h.node.send(h.now, CONV, Bytes::from_static(b"a")).unwrap();
    let b = h.node.send(h.now, CONV, Bytes::from_static(b"b")).unwrap();
    eager_and_held(&mut h);
    let report = ErrorReport {
        code: ErrorCode::NotMember as u16,
        message: "no".into(),
        msg_id: Some(a.to_bytes()),
        after: None,
        retry_after_ms: None,
        held: None,
    };
    let routing = Routing {
        conversation: CONV,
        ..Routing::default()
    };
    let out = h.frame(1, routing, Payload::Error(report));
    assert_eq!(
        sends(&out),
        vec![(b, Some(MsgId::from_bytes([0; 16])))],
        "b now comes first"
    );
}

#[test]
fn each_delivery_is_acknowledged_with_the_new_cursor() {
    let mut h = Harness::new();
    h.open(1);
    let out = h.deliver(1, 1);
    let ack = sent(&out)
        .into_iter()
        .find(|f| f.payload == Payload::Ack(Ack {}))
        .unwrap();
    assert_eq!((ack.routing.conversation, ack.routing.seq), (CONV, 1));
}

#[test]
fn hello_presents_the_durable_cursors() {
    let mut h = Harness::new();
    h.open(1);
    h.deliver(1, 1);
    h.deliver(1, 2);
    let mut node = Node::recover(config(), Box::new(Counter(3)), h.now, &h.store).unwrap();
    node.handle_timeout(h.now);
    node.poll_ready();
    node.handle(h.now, NodeInput::Connected(ConnectionId(9)));
    let out = node.poll_ready().unwrap().commit(&mut h.store).unwrap();
    let hello = sent(&out).remove(0);
    assert_eq!(
        hello.payload,
        Payload::Hello(Hello {
            // It read seqs 1 and 2 in the session whose token it shows, from seq 0 on.
            cursors: vec![Cursor {
                since: Some(0),
                ..Cursor::read(CONV, 2, Some(MsgId::from_bytes([2; 16])))
            }],
            device_key: my_key().public().0,
            resume_token: Some([7; 32]),
            user: None,
            certificate: h.node.trust().certificate().map(|c| c.encode().into()),
            generation: Some(2),
        })
    );
    assert!(h.node.trust().certificate().is_some());
    assert_eq!(hello.routing.sender, my_key().device_id());
}

#[test]
fn reconnect_backoff_grows_with_full_jitter_and_is_capped() {
    let mut h = Harness::new();
    let mut delays = Vec::new();
    for _ in 0..12 {
        let out = h.tick();
        assert!(out.contains(&NodeOutput::Connect));
        h.input(NodeInput::ConnectFailed);
        let next = h.node.poll_timeout().unwrap();
        delays.push(next.saturating_since(h.now));
        h.now = next;
    }
    let config = config();
    for (attempt, d) in delays.iter().enumerate() {
        let cap = config
            .backoff_initial
            .saturating_mul(1 << attempt)
            .min(config.backoff_max);
        assert!(*d <= cap, "attempt {attempt}: {d:?} > {cap:?}");
    }
    assert!(
        delays[8..].iter().any(|d| *d > Duration::from_secs(1)),
        "later delays use the larger cap: {delays:?}"
    );
    assert_eq!(
        h.node.status(),
        ConnectionStatus::Reconnecting { attempt: 12 }
    );
}

/// A session the gateway ends with `code` right after `open`; returns the wait before the next
/// connect.
fn refused_session(h: &mut Harness, conn: u64, code: ErrorCode) -> Duration {
    h.open(conn);
    assert!(h.node.is_connected());
    let goodbye = Goodbye {
        code: code as u16,
        message: "not understood".into(),
        retry_after_ms: None,
    };
    let out = h.frame(conn, Routing::default(), Payload::Goodbye(goodbye));
    assert!(out.contains(&NodeOutput::Close(ConnectionId(conn))));
    let next = h.node.poll_timeout().unwrap();
    let wait = next.saturating_since(h.now);
    h.now = next;
    wait
}

#[test]
fn a_gateway_whose_frames_this_device_cannot_read_is_not_reconnected_to_in_a_tight_loop() {
    // A newer gateway sends, in every session, a frame with an opcode this device does not
    // know. Each ends the connection; the waits grow as after refusals, and the application
    // is told once, in words that say what to do.
    let mut h = Harness::new();
    let mut waits = Vec::new();
    let mut told = Vec::new();
    for conn in 1..=12 {
        h.open(conn);
        let mut bytes = Frame::new(
            Routing::default(),
            Payload::HeartbeatAck(Heartbeat {
                nonce: 1,
                crl_version: None,
                presence: None,
                peer_roots: None,
                peer_crls: None,
                contacts: None,
            }),
        )
        .encode()
        .to_vec();
        bytes[6..8].copy_from_slice(&0x7fffu16.to_be_bytes());
        let out = h.input(NodeInput::Frame(ConnectionId(conn), Bytes::from(bytes)));
        assert!(
            out.contains(&NodeOutput::Close(ConnectionId(conn))),
            "{out:?}"
        );
        told.extend(out.into_iter().filter_map(|o| match o {
            NodeOutput::Event(NodeEvent::Refused { code, message }) => Some((code, message)),
            _ => None,
        }));
        let next = h.node.poll_timeout().unwrap();
        waits.push(next.saturating_since(h.now));
        h.now = next;
    }
    let total: Duration = waits.iter().sum();
    assert!(
        total > Duration::from_secs(5),
        "twelve unreadable sessions take seconds, not a tight loop: {waits:?}"
    );
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(told[0].0, ErrorCode::MalformedFrame);
    assert!(
        told[0].1.contains("unknown opcode") && told[0].1.contains("upgrade sund"),
        "{}",
        told[0].1
    );
    assert_eq!(h.node.stats().unreadable_frames, 12);
}

#[test]
fn a_gateway_that_refuses_each_session_as_it_opens_is_not_reconnected_to_in_a_tight_loop() {
    // Each connect succeeds and each session opens, then the gateway ends it (a frame it does
    // not understand, say). Were the open session counted as a success, every reconnect would
    // come within `backoff_initial`: a tight loop against the gateway.
    let config = config();
    let mut h = Harness::new();
    let mut waits = Vec::new();
    for conn in 1..=12 {
        waits.push(refused_session(&mut h, conn, ErrorCode::MalformedFrame));
    }
    for (refusal, wait) in waits.iter().enumerate() {
        let cap = config
            .backoff_initial
            .saturating_mul(1 << (refusal + 1))
            .min(config.backoff_max);
        assert!(*wait <= cap, "refusal {refusal}: {wait:?} > {cap:?}");
    }
    let total: Duration = waits.iter().sum();
    assert!(
        total > Duration::from_secs(5),
        "twelve refused sessions take seconds, not a tight loop: {waits:?}"
    );
    // A session that lasts, then is refused, starts the count anew: the next wait is short.
    h.open(13);
    h.now = h.now + config.backoff_max;
    for _ in 0..3 {
        // Heartbeats answered keep the session open meanwhile.
        h.tick();
    }
    let goodbye = Goodbye {
        code: ErrorCode::MalformedFrame as u16,
        message: "not understood".into(),
        retry_after_ms: None,
    };
    h.frame(13, Routing::default(), Payload::Goodbye(goodbye));
    let wait = h.node.poll_timeout().unwrap().saturating_since(h.now);
    assert!(
        wait <= config.backoff_initial.saturating_mul(2),
        "a refusal after a lasting session waits little: {wait:?}"
    );
}

#[test]
fn devices_told_the_gateway_is_shutting_down_come_back_after_its_hint_and_spread_out() {
    // A gateway going away says when to come back (2 s). Each device waits at least that long
    // and at most twice that, and a hundred devices spread over the window instead of
    // reconnecting together the moment the gateway is back.
    let hint = Duration::from_secs(2);
    let mut waits = Vec::new();
    for seed in 1..=100 {
        let mut h = Harness::with_entropy(seed);
        h.open(1);
        // The session has lasted: this is no refusal of the device.
        h.now = h.now + config().backoff_max;
        for _ in 0..3 {
            h.tick();
        }
        let goodbye = Goodbye {
            code: ErrorCode::ShuttingDown as u16,
            message: "the gateway is shutting down; reconnect shortly".into(),
            retry_after_ms: Some(2_000),
        };
        let out = h.frame(1, Routing::default(), Payload::Goodbye(goodbye));
        assert!(out.contains(&NodeOutput::Close(ConnectionId(1))));
        assert!(matches!(
            h.node.status(),
            ConnectionStatus::Reconnecting { .. }
        ));
        let wait = h.node.poll_timeout().unwrap().saturating_since(h.now);
        assert!(
            wait >= hint && wait <= hint * 2,
            "device {seed} waits {wait:?}"
        );
        // Nothing connects before the wait is over; then it does.
        h.now = h.now + wait - Duration::from_millis(1);
        assert!(!h.tick().contains(&NodeOutput::Connect));
        h.now = h.now + Duration::from_millis(1);
        assert!(h.tick().contains(&NodeOutput::Connect));
        waits.push(wait);
    }
    waits.sort();
    let spread = waits[waits.len() - 1] - waits[0];
    assert!(
        spread >= Duration::from_millis(1_500),
        "reconnects spread over {spread:?} only"
    );
    // No tenth of the window holds more than a quarter of the devices: no herd.
    let mut buckets = [0usize; 10];
    for wait in &waits {
        let share = (*wait - hint).as_micros() * 10 / hint.as_micros();
        buckets[(share as usize).min(9)] += 1;
    }
    assert!(buckets.iter().all(|&n| n <= 25), "{buckets:?}");
}

#[test]
fn a_shutting_down_goodbye_is_no_refusal_and_restarts_in_a_row_do_not_grow_the_waits() {
    // Two drains a few seconds apart, then the gateway is still down for three attempts: the
    // waits after those failures are those of three failed connects, not doubled per goodbye.
    // (Found by the simulator: scenarios/drain-and-restart.sund took 12 s to recover.)
    let cfg = config();
    for seed in 1..=40 {
        let mut h = Harness::with_entropy(seed);
        for conn in 1..=2 {
            h.open(conn);
            let goodbye = Goodbye {
                code: ErrorCode::ShuttingDown as u16,
                message: "the gateway is shutting down; reconnect shortly".into(),
                retry_after_ms: Some(2_000),
            };
            h.frame(conn, Routing::default(), Payload::Goodbye(goodbye));
            h.now = h.node.poll_timeout().unwrap();
        }
        for attempt in 0..3 {
            let out = h.tick();
            assert!(out.contains(&NodeOutput::Connect), "{out:?}");
            h.input(NodeInput::ConnectFailed);
            let next = h.node.poll_timeout().unwrap();
            // The goodbye's own back-off counts as one failed connect, nothing more.
            let cap = cfg.backoff_initial.saturating_mul(1 << (attempt + 1));
            let wait = next.saturating_since(h.now);
            assert!(
                wait <= cap,
                "seed {seed}, failure {attempt}: {wait:?} > {cap:?}"
            );
            h.now = next;
        }
    }
}

#[test]
fn a_retry_hint_beyond_a_minute_is_cut_to_a_minute() {
    // A faulty or hostile gateway cannot keep its devices away for weeks with one goodbye.
    let mut h = Harness::new();
    h.open(1);
    let goodbye = Goodbye {
        code: ErrorCode::ShuttingDown as u16,
        message: "see you in seven weeks".into(),
        retry_after_ms: Some(u32::MAX),
    };
    h.frame(1, Routing::default(), Payload::Goodbye(goodbye));
    let wait = h.node.poll_timeout().unwrap().saturating_since(h.now);
    assert!(
        wait >= Duration::from_secs(60) && wait <= Duration::from_secs(120),
        "{wait:?}"
    );
}

#[test]
fn silence_from_the_gateway_drops_the_connection_and_reconnects() {
    let mut h = Harness::new();
    h.open(1);
    assert!(h.node.is_connected());
    h.now = h.now + Duration::from_secs(16);
    let out = h.tick();
    assert!(out.contains(&NodeOutput::Close(ConnectionId(1))));
    assert!(matches!(
        h.node.status(),
        ConnectionStatus::Reconnecting { .. }
    ));
}

/// The gateway opened the session and its `HelloOk` was lost (the simulator loses frames a
/// QUIC stream would not): the frames of the open session that follow it tell the device, which
/// gives the `HelloOk` a second more and then connects again, instead of ignoring deliveries
/// for the whole 15 s handshake timeout (`duplicate-sends`: a device deaf for 15 s after the
/// heal).
#[test]
fn frames_of_an_open_session_before_its_hello_ok_cut_the_wait_for_it() {
    let mut h = Harness::new();
    h.open(1);
    h.input(NodeInput::Closed(ConnectionId(1)));
    // Connect again: the Hello goes, its HelloOk is lost, the session's first frames come.
    loop {
        h.now = h.now + Duration::from_millis(100);
        if h.tick().contains(&NodeOutput::Connect) {
            break;
        }
    }
    let out = h.input(NodeInput::Connected(ConnectionId(2)));
    assert!(
        matches!(sent(&out)[0].payload, Payload::Hello(_)),
        "{out:?}"
    );
    let count = Payload::KeyPackageCount(KeyPackageCount {
        remaining: 0,
        last_resort: false,
        replenish_below: 0,
    });
    h.frame(2, Routing::default(), count);
    assert!(!h.node.is_connected());
    h.now = h.now + Duration::from_millis(900);
    assert!(
        !h.tick().contains(&NodeOutput::Close(ConnectionId(2))),
        "not yet"
    );
    h.now = h.now + Duration::from_millis(100);
    assert!(
        h.tick().contains(&NodeOutput::Close(ConnectionId(2))),
        "a second after the session's first frame, not 15 s after the Hello"
    );
    assert!(matches!(
        h.node.status(),
        ConnectionStatus::Reconnecting { .. }
    ));
}

fn hellos(outputs: &[NodeOutput]) -> Vec<Hello> {
    sent(outputs)
        .into_iter()
        .filter_map(|f| match f.payload {
            Payload::Hello(hello) => Some(hello),
            _ => None,
        })
        .collect()
}

/// Connects on `conn` after a first session on conn 1 ended; returns the `Hello`.
fn reconnect(h: &mut Harness, conn: u64) -> Hello {
    h.open(1);
    h.input(NodeInput::Closed(ConnectionId(1)));
    loop {
        h.now = h.now + Duration::from_millis(100);
        if h.tick().contains(&NodeOutput::Connect) {
            break;
        }
    }
    let out = h.input(NodeInput::Connected(ConnectionId(conn)));
    hellos(&out).remove(0)
}

/// The simulator's frames can be lost where a QUIC stream's would not: a `Hello` nothing
/// answers goes again, with the same number (the gateway answers a repeated one with the same
/// challenge), after a second, then after two more, not only after the 15 s timeout.
#[test]
fn an_unanswered_hello_goes_again_with_the_same_number_at_growing_intervals() {
    let mut h = Harness::new();
    let first = reconnect(&mut h, 2);
    let start = h.now;
    let mut again = Vec::new();
    while h.now < start + Duration::from_secs(14) {
        h.now = h.now + Duration::from_millis(100);
        for hello in hellos(&h.tick()) {
            again.push((h.now.saturating_since(start), hello));
        }
    }
    let at: Vec<u64> = again.iter().map(|(t, _)| t.as_secs()).collect();
    assert_eq!(at, [1, 3, 7], "{again:?}");
    for (_, hello) in &again {
        assert_eq!(
            hello.generation, first.generation,
            "the same session number"
        );
        assert_eq!(hello.resume_token, first.resume_token);
    }
    assert_eq!(h.node.stats().hellos_again, 3);
    h.now = start + Duration::from_secs(15);
    assert!(
        h.tick().contains(&NodeOutput::Close(ConnectionId(2))),
        "the handshake timeout still ends it"
    );
}

/// A challenge heard means the `Hello` arrived: the next resend (for a lost proof) waits a
/// whole wait from the challenge, and each challenge, repeated or not, is answered.
#[test]
fn a_challenge_puts_off_the_next_hello_and_every_challenge_gets_its_proof() {
    let mut h = Harness::new();
    reconnect(&mut h, 2);
    let challenge = Payload::Challenge(Challenge { nonce: [5; 32] });
    h.now = h.now + Duration::from_millis(900);
    let out = h.frame(2, Routing::default(), challenge.clone());
    assert!(matches!(sent(&out)[0].payload, Payload::Proof(_)));
    h.now = h.now + Duration::from_millis(900);
    assert!(
        hellos(&h.tick()).is_empty(),
        "a second after the challenge, not the hello"
    );
    h.now = h.now + Duration::from_millis(100);
    assert_eq!(
        hellos(&h.tick()).len(),
        1,
        "the proof was lost: hello again"
    );
    let out = h.frame(2, Routing::default(), challenge);
    assert!(matches!(sent(&out)[0].payload, Payload::Proof(_)));
}

/// The gateway opened the session and its `HelloOk` was lost: the repeated `Hello` is refused
/// as out of place, which cuts the wait to a second; no more `Hello`s go on this connection.
#[test]
fn a_hello_refused_as_already_open_cuts_the_wait_for_the_hello_ok() {
    let mut h = Harness::new();
    reconnect(&mut h, 2);
    h.now = h.now + Duration::from_secs(1);
    assert_eq!(hellos(&h.tick()).len(), 1);
    let report = ErrorReport {
        code: ErrorCode::UnexpectedOpcode as u16,
        message: "this session is already open".into(),
        msg_id: None,
        after: None,
        retry_after_ms: None,
        held: None,
    };
    h.frame(2, Routing::default(), Payload::Error(report));
    h.now = h.now + Duration::from_millis(900);
    let out = h.tick();
    assert!(hellos(&out).is_empty() && !out.contains(&NodeOutput::Close(ConnectionId(2))));
    h.now = h.now + Duration::from_millis(100);
    let out = h.tick();
    assert!(hellos(&out).is_empty(), "{out:?}");
    assert!(out.contains(&NodeOutput::Close(ConnectionId(2))), "{out:?}");
}

#[test]
fn going_offline_says_goodbye_and_stays_offline() {
    let mut h = Harness::new();
    h.open(1);
    h.node.go_offline(h.now);
    let out = h.drain();
    assert!(matches!(sent(&out)[0].payload, Payload::Goodbye(_)));
    assert_eq!(h.node.status(), ConnectionStatus::Offline);
    assert_eq!(h.node.poll_timeout(), None);
    h.node.go_online(h.now);
    assert_eq!(h.node.poll_timeout(), Some(h.now));
}

#[test]
fn oversized_bodies_and_a_full_outbox_are_refused() {
    let mut h = Harness::new();
    let max = config().body_bytes_max;
    let err = h
        .node
        .send(h.now, CONV, Bytes::from(vec![0; max + 1]))
        .unwrap_err();
    assert_eq!(err, SendError::BodyTooLarge { len: max + 1, max });
    let mut config = config();
    config.outbox_len_max = 2;
    let mut node = Node::recover(config, Box::new(Counter(4)), h.now, &h.store).unwrap();
    node.send(h.now, CONV, Bytes::new()).unwrap();
    node.send(h.now, CONV, Bytes::new()).unwrap();
    assert_eq!(
        node.send(h.now, CONV, Bytes::new()),
        Err(SendError::OutboxFull { max: 2 })
    );
}

#[test]
fn a_rejected_message_leaves_the_outbox_with_its_reason() {
    let mut h = Harness::new();
    let id = h.node.send(h.now, CONV, Bytes::from_static(b"x")).unwrap();
    h.open(1);
    let report = ErrorReport {
        code: ErrorCode::NotMember as u16,
        message: "no".into(),
        msg_id: Some(id.to_bytes()),
        after: None,
        retry_after_ms: None,
        held: None,
    };
    let out = h.frame(1, Routing::default(), Payload::Error(report));
    assert!(out.contains(&NodeOutput::Event(NodeEvent::Rejected {
        msg_id: id,
        code: ErrorCode::NotMember
    })));
    assert_eq!(h.node.outbox_len(), 0);
}

#[test]
fn garbage_from_the_gateway_drops_the_connection() {
    let mut h = Harness::new();
    h.open(1);
    let out = h.input(NodeInput::Frame(
        ConnectionId(1),
        Bytes::from_static(b"garbage"),
    ));
    assert!(out.contains(&NodeOutput::Close(ConnectionId(1))));
    assert!(!h.node.is_connected());
}

fn sent_ids(outputs: &[NodeOutput]) -> Vec<MsgId> {
    sent(outputs)
        .iter()
        .filter_map(|f| match &f.payload {
            Payload::Send(s) => Some(s.msg_id()),
            _ => None,
        })
        .collect()
}

#[test]
fn an_unacknowledged_message_is_resent_at_resend_after_not_at_the_next_heartbeat() {
    let mut h = Harness::new();
    h.open(1);
    let resend_after = config().resend_after;
    let heartbeat = h.now + Duration::from_secs(5);
    assert!(
        h.now + resend_after < heartbeat,
        "the test needs the resend first"
    );
    let sent_at = h.now;
    let id: MsgId = h.node.send(h.now, CONV, Bytes::from_static(b"x")).unwrap();
    h.drain();
    assert_eq!(
        h.node.poll_timeout(),
        Some(sent_at + resend_after),
        "the resend is the node's next deadline, ahead of the heartbeat"
    );
    h.now = sent_at + resend_after;
    let out = h.tick();
    assert_eq!(sent_ids(&out), vec![id]);
    assert_eq!(h.node.stats().resends, 1);
    assert!(
        !sent(&out)
            .iter()
            .any(|f| matches!(f.payload, Payload::Heartbeat(_))),
        "no heartbeat is due yet: {out:?}"
    );
    assert_eq!(h.node.poll_timeout(), Some(heartbeat));
    h.now = heartbeat;
    assert!(
        sent_ids(&h.tick()).is_empty(),
        "the heartbeat resends nothing"
    );
    h.now = sent_at + resend_after + resend_after;
    assert!(
        sent_ids(&h.tick()).is_empty(),
        "a round of resends without an answer doubles the wait"
    );
    h.now = sent_at + resend_after * 3;
    assert_eq!(sent_ids(&h.tick()), vec![id], "and again then");
}

/// The wait before a resend follows the link: a heartbeat answered 8 s after it went (a slow
/// link whose queue holds seconds of frames) makes a message wait longer than its answer
/// should take before it goes again, where a fixed `resend_after` would send a copy every 3 s
/// into the same queue (plain swarm seed 502431: 82 copies of each message).
#[test]
fn a_slow_links_answers_lengthen_the_wait_before_a_resend() {
    let mut h = Harness::new();
    h.open(1);
    let resend_after = config().resend_after;
    h.now = h.now + Duration::from_secs(5);
    let beat = sent(&h.tick())
        .into_iter()
        .find_map(|f| match f.payload {
            Payload::Heartbeat(beat) => Some(beat),
            _ => None,
        })
        .expect("a heartbeat is due");
    h.now = h.now + Duration::from_secs(8);
    h.frame(1, Routing::default(), Payload::HeartbeatAck(beat));
    let sent_at = h.now;
    let id: MsgId = h.node.send(h.now, CONV, Bytes::from_static(b"x")).unwrap();
    h.drain();
    // It waits 8 s plus four times 4 s (24 s), not 3: nothing goes again in the next 9 s
    // (before the link's idle timeout, 15 s after the answer).
    for rounds in 1..=3 {
        h.now = sent_at + resend_after * rounds;
        assert!(
            sent_ids(&h.tick()).is_empty(),
            "not after {rounds} x resend_after"
        );
    }
    assert_eq!(h.node.stats().resends, 0);
    send_ack(&mut h, id, 1);
    assert_eq!(h.node.outbox_len(), 0, "its answer settles it");
}

#[test]
fn replay_window_exceeded_reports_the_gap_and_moves_the_cursor() {
    let mut h = Harness::new();
    h.open(1);
    h.deliver(1, 1);
    let report = ErrorReport {
        code: ErrorCode::ReplayWindowExceeded as u16,
        message: "gone".into(),
        msg_id: None,
        after: None,
        retry_after_ms: None,
        held: None,
    };
    let out = h.frame(
        1,
        Routing {
            conversation: CONV,
            seq: 5,
            ..Routing::default()
        },
        Payload::Error(report),
    );
    assert!(out.contains(&NodeOutput::Event(NodeEvent::Gap {
        conversation: CONV,
        from: 2,
        to: 4
    })));
    assert_eq!(h.node.cursor(CONV), 4);
    assert_eq!(delivered(&h.deliver(1, 5)), vec![5]);
}

#[test]
fn our_own_message_delivered_back_settles_the_outbox_even_without_a_send_ack() {
    let mut h = Harness::new();
    h.open(1);
    let id = h
        .node
        .send(h.now, CONV, Bytes::from_static(b"mine"))
        .unwrap();
    h.drain();
    let routing = Routing {
        conversation: CONV,
        sender: my_key().device_id(),
        seq: 1,
        epoch: 0,
    };
    let out = h.frame(
        1,
        routing,
        Payload::Deliver(Deliver {
            msg_id: id.to_bytes(),
            body: b"mine".to_vec(),
        }),
    );
    assert!(out.contains(&NodeOutput::Event(NodeEvent::Accepted {
        conversation: CONV,
        msg_id: id,
        seq: 1
    })));
    assert_eq!(h.node.outbox_len(), 0);
}

// ---- authentication ----

#[test]
fn a_challenge_is_answered_with_a_proof_that_verifies() {
    let mut h = Harness::new();
    h.tick();
    h.input(NodeInput::Connected(ConnectionId(1)));
    let nonce = [3; 32];
    let out = h.frame(
        1,
        Routing::default(),
        Payload::Challenge(Challenge { nonce }),
    );
    let Payload::Proof(proof) = sent(&out).remove(0).payload else {
        panic!("expected a proof")
    };
    let message = session_proof_message(&nonce, my_key().device_id());
    assert!(my_key().public().verify(&message, &proof.signature));
}

/// A token the gateway no longer knows (its disk lost it, or it expired) is still shown at
/// each `Hello` until a `HelloOk` replaces it: it names the run of the device's last session,
/// which the gateway compares with what it sequenced since.
#[test]
fn a_refused_resume_token_is_kept_until_a_new_one_comes() {
    let mut h = Harness::new();
    h.open(1);
    h.input(NodeInput::Closed(ConnectionId(1)));
    h.now = h.now + Duration::from_secs(60);
    h.tick();
    let out = h.input(NodeInput::Connected(ConnectionId(2)));
    assert!(
        matches!(&sent(&out)[0].payload, Payload::Hello(hello) if hello.resume_token == Some([7; 32]))
    );
    let report = ErrorReport {
        code: ErrorCode::ResumeTokenInvalid as u16,
        message: "no".into(),
        msg_id: None,
        after: None,
        retry_after_ms: None,
        held: None,
    };
    h.frame(2, Routing::default(), Payload::Error(report));
    let node = Node::recover(config(), Box::new(Counter(8)), h.now, &h.store).unwrap();
    let mut node = node;
    node.handle_timeout(h.now);
    node.poll_ready();
    node.handle(h.now, NodeInput::Connected(ConnectionId(3)));
    let out = node.poll_ready().unwrap().commit(&mut h.store).unwrap();
    assert!(
        matches!(&sent(&out)[0].payload, Payload::Hello(hello) if hello.resume_token == Some([7; 32]))
    );
}

#[test]
fn a_device_the_gateway_does_not_admit_hears_why_and_keeps_retrying() {
    let mut h = Harness::new();
    h.tick();
    h.input(NodeInput::Connected(ConnectionId(1)));
    let goodbye = Goodbye {
        code: ErrorCode::DeviceNotAdmitted as u16,
        message: "ask the operator".into(),
        retry_after_ms: None,
    };
    let out = h.frame(1, Routing::default(), Payload::Goodbye(goodbye));
    assert!(out.contains(&NodeOutput::Event(NodeEvent::Refused {
        code: ErrorCode::DeviceNotAdmitted,
        message: "ask the operator".into()
    })));
    assert!(matches!(
        h.node.status(),
        ConnectionStatus::Reconnecting { attempt: 1 }
    ));
}

#[test]
fn a_revoked_device_stops_for_good_and_an_expired_certificate_is_renewed() {
    // Expired: the certificate is dropped and the next connection registers again.
    let mut h = Harness::new();
    h.open(1);
    assert!(h.node.trust().certificate().is_some());
    let expired = Goodbye {
        code: ErrorCode::CertificateExpired as u16,
        message: "expired".into(),
        retry_after_ms: None,
    };
    h.frame(1, Routing::default(), Payload::Goodbye(expired));
    assert!(h.node.trust().certificate().is_none());
    h.now = h.node.poll_timeout().unwrap();
    assert!(h.tick().contains(&NodeOutput::Connect));
    let out = h.input(NodeInput::Connected(ConnectionId(2)));
    assert!(matches!(sent(&out)[0].payload, Payload::Register(_)));

    // Revoked: an event, and no reconnect ever.
    let mut h = Harness::new();
    h.open(1);
    let revoked = Goodbye {
        code: ErrorCode::DeviceRevoked as u16,
        message: "this device was revoked".into(),
        retry_after_ms: None,
    };
    let out = h.frame(1, Routing::default(), Payload::Goodbye(revoked));
    assert!(
        out.contains(&NodeOutput::Event(NodeEvent::Revoked)),
        "{out:?}"
    );
    assert_eq!(h.node.status(), ConnectionStatus::Offline);
    assert_eq!(h.node.poll_timeout(), None, "nothing left to retry");
}

#[test]
fn a_crl_older_than_the_one_held_is_refused() {
    let mut h = Harness::new();
    h.open(1);
    let crl = |version: u64| {
        let revoked = [DeviceId(5)].into_iter().collect();
        let crl = sund_model::trust::Crl::issue(&root_key(), "localhost", version, 0, revoked);
        Payload::Crl(Crl {
            crl: crl.encode().into(),
        })
    };
    let out = h.frame(1, Routing::default(), crl(3));
    assert!(out.contains(&NodeOutput::Event(NodeEvent::CrlUpdated { version: 3 })));
    let out = h.frame(1, Routing::default(), crl(2));
    assert!(
        out.iter()
            .any(|o| matches!(o, NodeOutput::Event(NodeEvent::CrlRefused { .. }))),
        "{out:?}"
    );
    assert_eq!(h.node.trust().crl_version(), 3);
    // A heartbeat answer naming a newer version makes the device fetch it.
    let ack = Heartbeat {
        nonce: 1,
        crl_version: Some(4),
        presence: None,
        peer_roots: None,
        peer_crls: None,
        contacts: None,
    };
    let out = h.frame(1, Routing::default(), Payload::HeartbeatAck(ack));
    assert!(matches!(
        sent(&out)[0].payload,
        Payload::CrlFetch(CrlFetch {
            have_version: 3,
            peers: None
        })
    ));
}

#[test]
fn a_transmission_is_eager_but_its_outbox_entry_and_events_are_held() {
    let mut h = Harness::new();
    h.open(1);
    h.node
        .send(h.now, CONV, Bytes::from_static(b"fast"))
        .unwrap();
    let mut ready = h.node.poll_ready().expect("a send produces a batch");
    let eager = ready.take_eager();
    assert_eq!(sent(&eager).len(), 1, "the Send frame may leave at once");
    assert!(matches!(&sent(&eager)[0].payload, Payload::Send(_)));
    assert_eq!(ready.writes().len(), 1, "the outbox entry is written");
    let held = ready.commit(&mut h.store).unwrap();
    assert!(sent(&held).is_empty(), "nothing is sent twice: {held:?}");
}

#[test]
fn acks_and_deliveries_are_never_eager() {
    let mut h = Harness::new();
    h.open(1);
    h.node.handle(
        h.now,
        NodeInput::Frame(
            ConnectionId(1),
            Frame::new(
                Routing {
                    conversation: CONV,
                    sender: PEER,
                    seq: 1,
                    epoch: 0,
                },
                Payload::Deliver(Deliver {
                    msg_id: [1; 16],
                    body: vec![1],
                }),
            )
            .encode(),
        ),
    );
    let mut ready = h.node.poll_ready().unwrap();
    assert!(
        ready.take_eager().is_empty(),
        "an Ack promises a durable cursor"
    );
    let held = ready.commit(&mut h.store).unwrap();
    assert_eq!(delivered(&held), vec![1]);
}

#[test]
fn a_crash_after_an_eager_transmission_but_before_its_commit_forgets_only_that_send() {
    let mut h = Harness::new();
    h.open(1);
    h.node
        .send(h.now, CONV, Bytes::from_static(b"in flight"))
        .unwrap();
    let mut ready = h.node.poll_ready().unwrap();
    assert_eq!(sent(&ready.take_eager()).len(), 1);
    // The process dies here: the batch is never committed and `send` never returned.
    drop(ready.split());
    let restarted = Node::recover(config(), Box::new(Counter(2)), h.now, &h.store).unwrap();
    assert_eq!(restarted.outbox_len(), 0);
}

/// The gateway lost seqs 2..=4 (its disk lost writes it had reported durable): the node says so
/// to its user, moves past them and acknowledges; the message id at its cursor is forgotten,
/// since it read no message there.
#[test]
fn a_loss_notice_is_told_to_the_user_and_skipped() {
    let mut h = Harness::new();
    h.open(1);
    h.deliver(1, 1);
    let routing = Routing {
        conversation: CONV,
        seq: 5,
        ..Routing::default()
    };
    let report = ErrorReport {
        code: ErrorCode::HistoryLost as u16,
        message: "lost".into(),
        msg_id: None,
        after: None,
        retry_after_ms: None,
        held: None,
    };
    let out = h.frame(1, routing, Payload::Error(report));
    assert!(out.contains(&NodeOutput::Event(NodeEvent::HistoryLost {
        conversation: CONV,
        from: 2,
        to: 4,
    })));
    let ack = sent(&out)
        .into_iter()
        .find(|f| f.payload == Payload::Ack(Ack {}))
        .expect("acknowledged");
    assert_eq!(ack.routing.seq, 4);
    let out = h.deliver(1, 5);
    assert_eq!(delivered(&out), vec![5], "reading goes on after the loss");
}

/// The gateway says what this device read up to seq 2 is not what it holds: the user is
/// told, what was read stays, and the next Hello no longer names the message read at the
/// cursor (which is how the gateway learns the device heard).
#[test]
fn a_divergence_notice_is_told_and_the_cursor_stops_naming_its_message() {
    let mut h = Harness::new();
    h.open(1);
    h.deliver(1, 1);
    h.deliver(1, 2);
    let routing = Routing {
        conversation: CONV,
        seq: 2,
        ..Routing::default()
    };
    let report = ErrorReport {
        code: ErrorCode::HistoryDiverged as u16,
        message: "diverged".into(),
        msg_id: None,
        after: None,
        retry_after_ms: None,
        held: None,
    };
    let out = h.frame(1, routing, Payload::Error(report));
    assert!(out.contains(&NodeOutput::Event(NodeEvent::HistoryDiverged {
        conversation: CONV,
        upto: 2,
    })));
    let mut node = Node::recover(config(), Box::new(Counter(3)), h.now, &h.store).unwrap();
    node.handle_timeout(h.now);
    node.poll_ready();
    node.handle(h.now, NodeInput::Connected(ConnectionId(9)));
    let out = node.poll_ready().unwrap().commit(&mut h.store).unwrap();
    let Payload::Hello(hello) = sent(&out).remove(0).payload else {
        panic!("a Hello first");
    };
    assert_eq!(
        hello.cursors,
        vec![Cursor {
            since: Some(2),
            ..Cursor::new(CONV, 2)
        }],
        "same seq, no message named, and nothing shown as read in the token's run: what it \
         read up to 2 is not what that run holds"
    );
}

fn sends_limited(h: &mut Harness, refused: MsgId, retry_after_ms: Option<u32>) -> Vec<NodeOutput> {
    let message = "too many messages from this device";
    limited(h, ErrorCode::SendsLimited, message, refused, retry_after_ms)
}

/// The gateway refuses `refused` in `CONV` for now with `code` (a limit, or an authority
/// moving), with its hint.
fn limited(
    h: &mut Harness,
    code: ErrorCode,
    message: &str,
    refused: MsgId,
    retry_after_ms: Option<u32>,
) -> Vec<NodeOutput> {
    let report = ErrorReport {
        code: code as u16,
        message: message.into(),
        msg_id: Some(refused.to_bytes()),
        after: None,
        retry_after_ms,
        held: None,
    };
    let routing = Routing {
        conversation: CONV,
        ..Routing::default()
    };
    h.frame(1, routing, Payload::Error(report))
}

#[test]
fn a_rate_limited_message_waits_with_everything_after_it_and_all_go_in_order_after_the_hint() {
    let mut h = Harness::new();
    h.open(1);
    let a = h.node.send(h.now, CONV, Bytes::from_static(b"a")).unwrap();
    let b = h.node.send(h.now, CONV, Bytes::from_static(b"b")).unwrap();
    eager_and_held(&mut h);
    send_ack(&mut h, a, 1);
    // b was refused by the limit: the user hears it once, and nothing goes out for 300 ms,
    // not even a message sent meanwhile.
    let out = sends_limited(&mut h, b, Some(300));
    assert!(out.iter().any(|o| matches!(
        o,
        NodeOutput::Event(NodeEvent::Throttled { code: ErrorCode::SendsLimited, retry_after, .. })
            if *retry_after == Duration::from_millis(300)
    )));
    h.now = h.now + Duration::from_millis(100);
    let c = h.node.send(h.now, CONV, Bytes::from_static(b"c")).unwrap();
    assert!(sends(&eager_and_held(&mut h)).is_empty(), "held back");
    let out = sends_limited(&mut h, b, Some(300));
    assert!(
        !out.iter()
            .any(|o| matches!(o, NodeOutput::Event(NodeEvent::Throttled { .. }))),
        "a second refusal within the pause says nothing new"
    );
    assert_eq!(
        h.node.poll_timeout(),
        Some(Instant(400_000)),
        "the pause's end"
    );
    h.now = Instant(400_000);
    let out = h.tick();
    assert_eq!(
        sends(&out),
        vec![(b, Some(a)), (c, Some(b))],
        "in send order, chained"
    );
    assert_eq!(h.node.stats().throttled, 2);
    assert_eq!(
        h.node.stats().resends,
        0,
        "a refused message was never taken"
    );
    // Past the pause, sending is immediate again.
    send_ack(&mut h, b, 2);
    send_ack(&mut h, c, 3);
    let d = h.node.send(h.now, CONV, Bytes::from_static(b"d")).unwrap();
    assert_eq!(sends(&eager_and_held(&mut h)), vec![(d, Some(c))]);
    assert!(
        h.node.poll_timeout() > Some(h.now),
        "no timer left in the past"
    );
}

#[test]
fn a_message_refused_while_its_authority_moves_goes_again_after_the_hint_and_nothing_else_waits() {
    deferred_by(ErrorCode::AuthorityMoving);
}

#[test]
fn a_message_its_authority_limits_per_peer_goes_again_after_the_hint_and_nothing_else_waits() {
    deferred_by(ErrorCode::PeerLimited);
}

/// A refusal that holds back one conversation (the authority elsewhere is moving, or takes no
/// more from this device's gateway for now), and neither the device nor its other
/// conversations.
fn deferred_by(code: ErrorCode) {
    let other = ConversationId(0x0E);
    let mut h = Harness::new();
    h.open(1);
    let a = h.node.send(h.now, CONV, Bytes::from_static(b"a")).unwrap();
    let b = h.node.send(h.now, CONV, Bytes::from_static(b"b")).unwrap();
    eager_and_held(&mut h);
    // CONV is being handed over to another gateway: a is refused for now (b, behind it,
    // would be refused the same way). This is no rate limit: the user is told nothing.
    let moving = "this conversation's authority is moving to b.example";
    let out = limited(&mut h, code, moving, a, Some(500));
    assert!(
        !out.iter().any(|o| matches!(o, NodeOutput::Event(_))),
        "{out:?}"
    );
    // Another conversation is not held up.
    let x = h.node.send(h.now, other, Bytes::from_static(b"x")).unwrap();
    assert_eq!(sends(&eager_and_held(&mut h)), vec![(x, Some(MsgId(0)))]);
    assert_eq!(h.node.poll_timeout(), Some(Instant(500_000)), "the hint");
    h.now = Instant(499_999);
    assert!(sends(&h.tick()).is_empty(), "not before the hint");
    h.now = Instant(500_000);
    assert_eq!(
        sends(&h.tick()),
        vec![(a, Some(MsgId(0))), (b, Some(a))],
        "both again, in order, chained"
    );
    let stats = h.node.stats();
    let counted = if code == ErrorCode::PeerLimited {
        stats.peer_limited
    } else {
        stats.authority_moving
    };
    assert_eq!((counted, stats.throttled), (1, 0));
}

#[test]
fn an_invitation_refused_by_the_limit_holds_back_its_conversation_only() {
    let other = ConversationId(0x0E);
    let mut h = Harness::new();
    h.open(1);
    let a = h.node.send(h.now, CONV, Bytes::from_static(b"a")).unwrap();
    let b = h.node.send(h.now, CONV, Bytes::from_static(b"b")).unwrap();
    eager_and_held(&mut h);
    // a (standing for a commit that invites) is refused by the invitation limit: the user
    // hears it once, with the hint.
    let too_many = "too many invitations from this user: at most 60 per hour";
    let out = limited(
        &mut h,
        ErrorCode::InvitationsLimited,
        too_many,
        a,
        Some(2_000),
    );
    assert!(out.iter().any(|o| matches!(
        o,
        NodeOutput::Event(NodeEvent::Throttled { code: ErrorCode::InvitationsLimited, retry_after, .. })
            if *retry_after == Duration::from_secs(2)
    )));
    // The user's other conversations are not held up by it, as they are by the send limit.
    let x = h.node.send(h.now, other, Bytes::from_static(b"x")).unwrap();
    assert_eq!(sends(&eager_and_held(&mut h)), vec![(x, Some(MsgId(0)))]);
    // Its own conversation waits for the hint; a second refusal within it says nothing new.
    let c = h.node.send(h.now, CONV, Bytes::from_static(b"c")).unwrap();
    assert!(sends(&eager_and_held(&mut h)).is_empty(), "held back");
    let out = limited(
        &mut h,
        ErrorCode::InvitationsLimited,
        too_many,
        a,
        Some(2_000),
    );
    assert!(
        !out.iter()
            .any(|o| matches!(o, NodeOutput::Event(NodeEvent::Throttled { .. }))),
        "{out:?}"
    );
    assert_eq!(h.node.poll_timeout(), Some(Instant(2_000_000)), "the hint");
    h.now = Instant(2_000_000);
    assert_eq!(
        sends(&h.tick()),
        vec![(a, Some(MsgId(0))), (b, Some(a)), (c, Some(b))],
        "all again after the hint, in order, chained"
    );
    assert_eq!(h.node.stats().throttled, 2);
}

#[test]
fn a_rate_limit_without_a_hint_pauses_for_a_second() {
    let mut h = Harness::new();
    h.open(1);
    let a = h.node.send(h.now, CONV, Bytes::from_static(b"a")).unwrap();
    eager_and_held(&mut h);
    sends_limited(&mut h, a, None);
    assert_eq!(h.node.poll_timeout(), Some(h.now + Duration::from_secs(1)));
    // A refusal of a message no longer waiting (settled since) changes nothing.
    send_ack(&mut h, a, 1);
    let out = sends_limited(&mut h, a, Some(60_000));
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn peer_roots_signed_by_the_pinned_root_are_kept_across_restarts_and_others_refused() {
    use std::collections::BTreeMap;
    use sund_model::trust::peer_roots::PeerRoots;
    let b_root = DeviceKey::from_seed([0xB0; 32]).public();
    let roots = BTreeMap::from([("b.example".to_string(), b_root)]);
    let vouched = PeerRoots::issue(&root_key(), "localhost", roots.clone());
    let mut h = Harness::new();
    h.open_with(1, Some(vouched.encode()));
    h.drain();
    assert_eq!(h.node.trust().peer_roots(), Some(&vouched));
    // Kept across a restart; a set signed by another key is refused, in words, and the one
    // held stays.
    let node = Node::recover(config(), Box::new(Counter(2)), h.now, &h.store).unwrap();
    h.node = node;
    assert_eq!(h.node.trust().peer_roots(), Some(&vouched));
    let mallory = DeviceKey::from_seed([0x66; 32]);
    let forged = PeerRoots::issue(&mallory, "localhost", roots);
    let out = h.open_with(2, Some(forged.encode()));
    let refused = out.iter().find_map(|o| match o {
        NodeOutput::Event(NodeEvent::PeerRootsRefused { reason }) => Some(reason.clone()),
        _ => None,
    });
    assert!(
        refused.as_deref().is_some_and(|r| r.contains("not signed")),
        "{out:?}"
    );
    assert_eq!(h.node.trust().peer_roots(), Some(&vouched));
    assert_eq!(h.node.stats().peer_roots_refused, 1);
    // Bytes that are no set at all (after another restart).
    h.drain();
    h.node = Node::recover(config(), Box::new(Counter(3)), h.now, &h.store).unwrap();
    let out = h.open_with(3, Some(b"garbage".to_vec()));
    assert!(out
        .iter()
        .any(|o| matches!(o, NodeOutput::Event(NodeEvent::PeerRootsRefused { .. }))));
}
