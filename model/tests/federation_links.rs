//! Federation links end to end through two real `Federation` machines and their stores: every
//! entry queued durably on one side reaches the other exactly once and in order, whatever the
//! network and the crashes did on the way; authentication failures refuse the link.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use sund_model::env::MemStore;
use sund_model::federation::handshake::{peer_of, test_identity, LinkIdentity, PeerConfig};
use sund_model::federation::{Federation, FederationInput, FederationOutput, LinkTimers};
use sund_model::ids::ConnectionId;
use sund_model::testing::TestEntropy;
use sund_model::time::Instant;

struct Side {
    name: &'static str,
    me: LinkIdentity,
    peers: Vec<PeerConfig>,
    fed: Federation,
    store: MemStore,
    /// Queued and durable.
    sent: Vec<Bytes>,
    /// Queued, not yet committed (lost if the side crashes first).
    uncommitted: Vec<Bytes>,
    received: Vec<Bytes>,
    refused: Vec<String>,
    restarts: u64,
    /// Each time its link went down: whether the peer said it was shutting down.
    downs: Vec<bool>,
}

impl Side {
    fn new(name: &'static str, me: LinkIdentity, peers: Vec<PeerConfig>, now: Instant) -> Side {
        let store = MemStore::default();
        let fed = Federation::recover(
            me.clone(),
            peers.clone(),
            LinkTimers::default(),
            Box::new(TestEntropy(name.len() as u64)),
            &store,
            now,
        )
        .unwrap();
        Side {
            name,
            me,
            peers,
            fed,
            store,
            sent: Vec::new(),
            uncommitted: Vec::new(),
            received: Vec::new(),
            refused: Vec::new(),
            restarts: 0,
            downs: Vec::new(),
        }
    }

    fn peer(&self) -> String {
        self.peers[0].domain.clone()
    }

    /// Loses what is not committed and starts again from the store.
    fn crash(&mut self, now: Instant) {
        self.uncommitted.clear();
        self.restarts += 1;
        self.fed = Federation::recover(
            self.me.clone(),
            self.peers.clone(),
            LinkTimers::default(),
            Box::new(TestEntropy(1000 + self.restarts)),
            &self.store,
            now,
        )
        .unwrap();
    }
}

/// Two gateways and the connection between them.
struct Net {
    now: Instant,
    a: Side,
    b: Side,
    /// The open connection, if any.
    conn: Option<ConnectionId>,
    next_conn: u64,
    /// Frames in flight towards a and towards b, with the connection they travel on.
    to_a: VecDeque<(ConnectionId, Bytes)>,
    to_b: VecDeque<(ConnectionId, Bytes)>,
    /// While false, dials fail.
    reachable: bool,
}

#[derive(Clone, Copy)]
enum Who {
    A,
    B,
}

impl Net {
    fn new() -> Net {
        let now = Instant(1_000_000);
        let a_id = test_identity("a.example", 1);
        let b_id = test_identity("b.example", 2);
        let a = Side::new("a", a_id.clone(), vec![peer_of(&b_id)], now);
        let b = Side::new("bb", b_id, vec![peer_of(&a_id)], now);
        let mut net = Net {
            now,
            a,
            b,
            conn: None,
            next_conn: 1,
            to_a: VecDeque::new(),
            to_b: VecDeque::new(),
            reachable: true,
        };
        net.drive();
        net
    }

    fn side(&mut self, who: Who) -> &mut Side {
        match who {
            Who::A => &mut self.a,
            Who::B => &mut self.b,
        }
    }

    fn input(&mut self, who: Who, input: FederationInput) {
        let now = self.now;
        self.side(who).fed.handle(now, input);
    }

    fn close(&mut self, conn: ConnectionId) {
        if self.conn == Some(conn) {
            self.conn = None;
            self.to_a.clear();
            self.to_b.clear();
            self.input(Who::A, FederationInput::Closed(conn));
            self.input(Who::B, FederationInput::Closed(conn));
        }
    }

    /// Commits each side's writes and carries out what they release, until quiet.
    fn drive(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            for who in [Who::A, Who::B] {
                let side = self.side(who);
                let Some(ready) = side.fed.poll_ready() else {
                    continue;
                };
                moved = true;
                let outputs = ready.commit(&mut side.store).unwrap();
                let committed = core::mem::take(&mut side.uncommitted);
                side.sent.extend(committed);
                for output in outputs {
                    self.output(who, output);
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the machines did not quiet down");
    }

    fn output(&mut self, who: Who, output: FederationOutput) {
        match output {
            FederationOutput::Connect { peer } => {
                assert!(matches!(who, Who::A), "a.example sorts first and dials");
                assert_eq!(peer, "b.example");
                if !self.reachable {
                    self.input(who, FederationInput::ConnectFailed { peer });
                    return;
                }
                if let Some(old) = self.conn {
                    self.close(old);
                }
                let conn = ConnectionId(self.next_conn);
                self.next_conn += 1;
                self.conn = Some(conn);
                // Both ends of one connection derive the same binding.
                let binding = [conn.0 as u8; 32];
                self.input(Who::B, FederationInput::Accepted(conn, binding));
                self.input(
                    Who::A,
                    FederationInput::Connected {
                        peer,
                        conn,
                        binding,
                    },
                );
            }
            FederationOutput::Send(conn, bytes) => {
                if self.conn == Some(conn) {
                    match who {
                        Who::A => self.to_b.push_back((conn, bytes)),
                        Who::B => self.to_a.push_back((conn, bytes)),
                    }
                }
            }
            FederationOutput::Close(conn) => self.close(conn),
            FederationOutput::Received { peer, body, .. } => {
                let side = self.side(who);
                assert_eq!(peer, side.peer());
                side.received.push(body);
            }
            FederationOutput::Refused { reason, .. } => self.side(who).refused.push(reason),
            FederationOutput::LinkDown { graceful, .. } => self.side(who).downs.push(graceful),
            FederationOutput::LinkUp { .. } | FederationOutput::HistoryBehind { .. } => {}
        }
    }

    fn deliver(&mut self, who: Who) {
        let next = match who {
            Who::A => self.to_a.pop_front(),
            Who::B => self.to_b.pop_front(),
        };
        if let Some((conn, bytes)) = next {
            self.input(who, FederationInput::Frame(conn, bytes));
        }
    }

    fn enqueue(&mut self, who: Who, n: u64) {
        let now = self.now;
        let side = self.side(who);
        let body = Bytes::from(format!("{} #{n}", side.name));
        let peer = side.peer();
        side.fed.enqueue(now, &peer, body.clone()).unwrap();
        side.uncommitted.push(body);
    }

    fn advance(&mut self, by: Duration) {
        self.now = self.now + by;
        let now = self.now;
        self.a.fed.handle_timeout(now);
        self.b.fed.handle_timeout(now);
    }

    /// No more faults: deliver everything and let the timers run until both outboxes are
    /// empty (or a simulated hour passes).
    fn heal(&mut self) {
        self.reachable = true;
        for _ in 0..100_000 {
            self.drive();
            while !self.to_a.is_empty() || !self.to_b.is_empty() {
                self.deliver(Who::A);
                self.deliver(Who::B);
                self.drive();
            }
            let done = self.a.fed.queued("b.example") == 0
                && self.b.fed.queued("a.example") == 0
                && self.a.uncommitted.is_empty()
                && self.b.uncommitted.is_empty();
            if done {
                return;
            }
            let next = [self.a.fed.poll_timeout(), self.b.fed.poll_timeout()]
                .into_iter()
                .flatten()
                .min()
                .expect("an outbox waits, so a timer is set");
            self.now = self.now.max(next);
            let now = self.now;
            self.a.fed.handle_timeout(now);
            self.b.fed.handle_timeout(now);
            assert!(
                self.now.as_micros() < 3_600_000_000,
                "not delivered within an hour"
            );
        }
        panic!("heal did not finish");
    }
}

#[derive(Clone, Debug)]
enum Op {
    Enqueue(bool),
    Deliver(bool),
    Drop(bool),
    Duplicate(bool),
    Swap(bool),
    Disconnect,
    Unreachable(bool),
    Crash(bool),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => any::<bool>().prop_map(Op::Enqueue),
        10 => any::<bool>().prop_map(Op::Deliver),
        1 => any::<bool>().prop_map(Op::Drop),
        1 => any::<bool>().prop_map(Op::Duplicate),
        1 => any::<bool>().prop_map(Op::Swap),
        1 => Just(Op::Disconnect),
        1 => any::<bool>().prop_map(Op::Unreachable),
        1 => any::<bool>().prop_map(Op::Crash),
        3 => (1u64..30_000).prop_map(Op::Advance),
    ]
}

fn queue(net: &mut Net, to_a: bool) -> &mut VecDeque<(ConnectionId, Bytes)> {
    if to_a {
        &mut net.to_a
    } else {
        &mut net.to_b
    }
}

fn run(ops: &[Op]) -> Net {
    let mut net = Net::new();
    let mut n = 0;
    for op in ops {
        let who = |a: bool| if a { Who::A } else { Who::B };
        match *op {
            Op::Enqueue(a) => {
                n += 1;
                net.enqueue(who(a), n);
            }
            Op::Deliver(a) => net.deliver(who(a)),
            Op::Drop(a) => {
                queue(&mut net, a).pop_front();
            }
            Op::Duplicate(a) => {
                if let Some(front) = queue(&mut net, a).front().cloned() {
                    queue(&mut net, a).push_front(front);
                }
            }
            Op::Swap(a) => {
                let q = queue(&mut net, a);
                if q.len() >= 2 {
                    q.swap(0, 1);
                }
            }
            Op::Disconnect => {
                if let Some(conn) = net.conn {
                    net.close(conn);
                }
            }
            Op::Unreachable(on) => net.reachable = !on,
            Op::Crash(a) => {
                let now = net.now;
                if let Some(conn) = net.conn {
                    net.close(conn);
                }
                net.side(who(a)).crash(now);
            }
            Op::Advance(ms) => net.advance(Duration::from_millis(ms)),
        }
        // Crashes aside, each step's writes commit (a gateway commits its batches at once).
        if !matches!(op, Op::Enqueue(_)) || n % 3 == 0 {
            net.drive();
        }
    }
    net.heal();
    net
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_durable_entry_arrives_once_and_in_order(ops in proptest::collection::vec(op(), 0..300)) {
        let net = run(&ops);
        prop_assert_eq!(&net.b.received, &net.a.sent);
        prop_assert_eq!(&net.a.received, &net.b.sent);
        // Connections the faults broke may be refused (a handshake timed out, a duplicated
        // hello out of place); never for who the peer is.
        for reason in net.a.refused.iter().chain(&net.b.refused) {
            prop_assert!(!reason.contains("fingerprint") && !reason.contains("not a configured"), "{}", reason);
        }
    }
}

#[test]
fn entries_queue_while_the_peer_is_unreachable_and_flow_in_order_after() {
    let mut net = Net::new();
    net.reachable = false;
    if let Some(conn) = net.conn {
        net.close(conn);
    }
    net.drive();
    for n in 1..=500 {
        net.enqueue(Who::A, n);
        net.enqueue(Who::B, n);
    }
    net.drive();
    for _ in 0..20 {
        net.advance(Duration::from_secs(30));
        net.drive();
    }
    assert_eq!(net.a.fed.queued("b.example"), 500, "nothing got through");
    assert!(!net.a.fed.is_up("b.example"));
    net.heal();
    assert_eq!(net.b.received.len(), 500);
    assert_eq!(net.b.received, net.a.sent);
    assert_eq!(net.a.received, net.b.sent);
    assert!(net.a.fed.is_up("b.example") && net.b.fed.is_up("a.example"));
    let stats = net.a.fed.stats();
    assert!(stats.links_up >= 1);
}

#[test]
fn a_peer_that_shuts_down_says_so_and_its_link_comes_back_after_its_restart() {
    let mut net = Net::new();
    net.heal();
    assert!(net.a.fed.is_up("b.example") && net.b.fed.is_up("a.example"));
    // b.example stops on purpose: a goodbye on the link, then the close (which QUIC sends
    // after the stream's data).
    net.b.fed.shut_down();
    let ready = net.b.fed.poll_ready().expect("a goodbye");
    for output in ready.commit(&mut net.b.store).unwrap() {
        match output {
            FederationOutput::Send(conn, bytes) => {
                net.input(Who::A, FederationInput::Frame(conn, bytes))
            }
            FederationOutput::Close(_) => {}
            other => panic!("{other:?}"),
        }
    }
    net.drive();
    assert_eq!(
        net.a.downs,
        vec![true],
        "a.example heard a shutdown, not a fault"
    );
    assert!(!net.a.fed.is_up("b.example"));
    // b.example starts again; a.example dials it after its backoff and entries flow.
    net.b.crash(net.now);
    net.enqueue(Who::A, 1);
    net.heal();
    assert_eq!(net.b.received.len(), 1);
    assert!(net.a.fed.is_up("b.example"));
    // A connection that just closes is a fault.
    let conn = net.conn.expect("up");
    net.close(conn);
    net.drive();
    assert_eq!(net.a.downs, vec![true, false]);
}

#[test]
fn each_side_keeps_the_root_its_peer_proved_across_restarts_until_it_is_pinned_no_more() {
    let mut net = Net::new();
    assert!(net.a.fed.peer_roots().is_empty(), "nothing proved yet");
    net.heal();
    let b_root = net.b.me.root;
    let a_root = net.a.me.root;
    assert_eq!(
        net.a.fed.peer_roots().into_iter().collect::<Vec<_>>(),
        vec![("b.example".to_string(), b_root)]
    );
    assert_eq!(net.b.fed.peer_roots().get("a.example"), Some(&a_root));
    // Durable: known after a restart, with the link still down.
    net.a.crash(net.now);
    assert!(!net.a.fed.is_up("b.example"));
    assert_eq!(net.a.fed.peer_roots().get("b.example"), Some(&b_root));
    // The operator pins another root for b.example: the stored one is dropped.
    let mut repinned = net.a.peers.clone();
    repinned[0].root_fingerprint = "ab".repeat(16);
    let fed = Federation::recover(
        net.a.me.clone(),
        repinned,
        LinkTimers::default(),
        Box::new(TestEntropy(77)),
        &net.a.store,
        net.now,
    )
    .unwrap();
    assert!(fed.peer_roots().is_empty());
}

#[test]
fn a_peer_with_another_root_is_refused_and_nothing_reaches_it() {
    let now = Instant(1_000_000);
    let a_id = test_identity("a.example", 1);
    let b_id = test_identity("b.example", 2);
    let impostor = test_identity("a.example", 7);
    let mut net = Net::new();
    // b pins a's real root; the gateway dialing as a.example holds another.
    net.a = Side::new("a", impostor, vec![peer_of(&b_id)], now);
    net.b = Side::new("bb", b_id, vec![peer_of(&a_id)], now);
    net.drive();
    net.enqueue(Who::A, 1);
    net.drive();
    for _ in 0..50 {
        net.deliver(Who::A);
        net.deliver(Who::B);
        net.drive();
        net.advance(Duration::from_millis(500));
        net.drive();
    }
    assert!(net.b.received.is_empty());
    assert!(!net.b.fed.is_up("a.example"));
    assert!(
        net.b.refused.iter().any(|r| r.contains("fingerprint")),
        "{:?}",
        net.b.refused
    );
    assert!(net.b.fed.stats().handshakes_refused >= 1);
}

#[test]
fn a_frame_before_authentication_closes_the_connection() {
    let mut net = Net::new();
    // Drop a's hello and send b a forward in its place.
    let (conn, _) = net.to_b.pop_front().expect("a's hello");
    let forged = sund_model::wire::Frame::new(
        sund_model::wire::Routing {
            seq: 1,
            ..Default::default()
        },
        sund_model::wire::Payload::FederationForward(
            sund_model::wire::payload::FederationForward {
                body: b"sneaked in".to_vec().into(),
            },
        ),
    )
    .encode();
    net.input(Who::B, FederationInput::Frame(conn, forged));
    net.drive();
    assert!(net.b.received.is_empty());
    assert!(net.conn.is_none(), "closed");
    assert_eq!(net.b.fed.stats().protocol_errors, 1);
    assert!(net.b.refused[0].contains("before authentication"));
    net.heal();
}

#[test]
fn a_gateway_whose_data_is_older_than_its_peer_knows_numbers_past_the_peer_cursor() {
    let mut net = Net::new();
    net.heal();
    for n in 1..=5 {
        net.enqueue(Who::A, n);
    }
    net.heal();
    assert_eq!(net.b.received.len(), 5);
    // a's store is replaced by an empty one (restored from before it sent anything).
    net.a.store = MemStore::default();
    net.a.sent.clear();
    let now = net.now;
    if let Some(conn) = net.conn {
        net.close(conn);
    }
    net.a.crash(now);
    for n in 6..=8 {
        net.enqueue(Who::A, n);
    }
    net.drive();
    net.heal();
    // The three new entries arrive (not taken for duplicates of 1-3).
    assert_eq!(net.b.received.len(), 8, "{:?}", net.b.received);
    assert_eq!(&net.b.received[5..], &net.a.sent[..]);
    assert_eq!(net.a.fed.stats().cursor_ahead, 1);
}

#[test]
fn the_store_keeps_outbox_numbers_and_cursor_across_restarts() {
    let mut net = Net::new();
    for n in 1..=3 {
        net.enqueue(Who::A, n);
    }
    net.heal();
    let now = net.now;
    net.b.crash(now);
    if let Some(conn) = net.conn {
        net.close(conn);
    }
    for n in 4..=6 {
        net.enqueue(Who::A, n);
    }
    net.heal();
    assert_eq!(
        net.b.received, net.a.sent,
        "no entry twice after b's restart"
    );
}

#[test]
fn a_lost_entry_goes_again_without_a_reconnect() {
    let mut net = Net::new();
    net.heal();
    assert_eq!(net.a.fed.stats().links_up, 1);
    for n in 1..=3 {
        net.enqueue(Who::A, n);
    }
    net.drive();
    let lost = net.to_b.pop_front().expect("entry 1 in flight");
    assert!(!lost.1.is_empty());
    while !net.to_b.is_empty() || !net.to_a.is_empty() {
        net.deliver(Who::B);
        net.deliver(Who::A);
        net.drive();
    }
    // 2 and 3 arrived past the gap and were not taken; b told a of the gap once, and a
    // went back at once, without waiting for its resend timer.
    assert_eq!(net.b.fed.stats().gaps, 2);
    assert_eq!(net.b.received, net.a.sent);
    let stats = net.a.fed.stats();
    assert_eq!(stats.fast_resends, 1);
    assert_eq!(stats.resent, 3, "go-back-N from the gap");
    assert_eq!(stats.links_up, 1, "the link stayed up");
}

#[test]
fn a_lost_resend_still_goes_again_after_the_resend_timer() {
    let mut net = Net::new();
    net.heal();
    for n in 1..=3 {
        net.enqueue(Who::A, n);
    }
    net.drive();
    // Entry 1 lost, and its fast resend lost too.
    net.to_b.pop_front().expect("entry 1 in flight");
    let mut dropped_resend = false;
    while !net.to_b.is_empty() || !net.to_a.is_empty() {
        net.deliver(Who::B);
        net.deliver(Who::A);
        net.drive();
        if !dropped_resend && net.a.fed.stats().fast_resends == 1 {
            if let Some(frame) = net.to_b.pop_front() {
                assert!(!frame.1.is_empty());
                dropped_resend = true;
            }
        }
    }
    assert!(dropped_resend);
    assert!(net.b.received.is_empty(), "1 is still missing");
    // Gap reports at the same cursor change nothing; the timer goes back.
    net.heal();
    assert_eq!(net.b.received, net.a.sent);
    assert_eq!(net.a.fed.stats().fast_resends, 1);
}

/// Writes seed inputs for the `federation_entry_decode` fuzz target (run by hand with
/// `SUND_WRITE_SEEDS=1`): one entry of each kind.
#[test]
fn write_federation_entry_seeds() {
    if std::env::var("SUND_WRITE_SEEDS").is_err() {
        return;
    }
    use sund_model::federation::entry::{
        DmClaimAnswer, Entry, FetchAnswer, ForeignPackage, HandoverCertificate, Outcome,
    };
    use sund_model::ids::{ConversationId, DeviceId, MsgId, UserId};
    use sund_model::wire::payload::ErrorCode;
    let conversation = ConversationId(0xC0 << 120 | 1);
    let (sender, msg_id) = (DeviceId(0xB1), MsgId(0x5eed));
    let root = sund_model::identity::DeviceKey::from_seed([0xB0; 32]);
    let out = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../corpus/federation_entry_decode"
    );
    std::fs::create_dir_all(out).unwrap();
    let entries = [
        (
            "open",
            Entry::Open {
                conversation,
                members: vec![sender, DeviceId(0xB2)],
            },
        ),
        (
            "relay",
            Entry::Relay {
                conversation,
                sender,
                msg_id,
                after: Some(MsgId(0x1)),
                body: Bytes::from_static(b"ciphertext"),
                welcome: None,
                vouched: vec![],
            },
        ),
        (
            "relay-commit",
            Entry::Relay {
                conversation,
                sender,
                msg_id,
                after: None,
                body: Bytes::from_static(b"a commit"),
                welcome: Some(Bytes::from_static(b"an MLS Welcome")),
                vouched: vec![(DeviceId(0xB2), UserId(0xB0B))],
            },
        ),
        (
            "removed",
            Entry::Removed {
                conversation,
                seq: 9,
                devices: vec![DeviceId(0xB2)],
            },
        ),
        (
            "leave",
            Entry::Leave {
                conversation,
                device: sender,
            },
        ),
        ("dm-claim", Entry::DmClaim { conversation }),
        (
            "dm-claim-answer",
            Entry::DmClaimAnswer {
                conversation,
                answer: DmClaimAnswer::Granted,
            },
        ),
        (
            "sequenced",
            Entry::Sequenced {
                conversation,
                seq: 42,
                epoch: 0,
                sender,
                msg_id,
                chained: true,
                body: Bytes::from_static(b"ciphertext"),
            },
        ),
        (
            "answer-sequenced",
            Entry::Answer {
                conversation,
                sender,
                msg_id,
                outcome: Outcome::Sequenced(42),
            },
        ),
        (
            "answer-refused",
            Entry::Answer {
                conversation,
                sender,
                msg_id,
                outcome: Outcome::Refused {
                    code: ErrorCode::SenderOutOfOrder,
                    message: "this message comes after another".into(),
                    after: Some(MsgId(0x2)),
                },
            },
        ),
        (
            "answer-limited",
            Entry::Answer {
                conversation,
                sender,
                msg_id,
                outcome: Outcome::Limited {
                    code: ErrorCode::PeerLimited,
                    message: "the conversation's home gateway takes at most 2000 per second".into(),
                    retry_after_ms: 1_500,
                },
            },
        ),
        (
            "handover",
            Entry::Handover {
                conversation,
                term: 1,
                last_seq: 42,
                epoch: 0,
                members: vec![
                    ("a.example".into(), vec![DeviceId(0xA1)]),
                    ("b.example".into(), vec![sender, DeviceId(0xB2)]),
                ],
                signature: [0x5a; 64],
                mls: None,
            },
        ),
        (
            "handover-mls",
            Entry::Handover {
                conversation,
                term: 2,
                last_seq: 42,
                epoch: 7,
                members: vec![("b.example".into(), vec![sender])],
                signature: [0x5b; 64],
                mls: Some(sund_model::federation::entry::MlsHandover {
                    group: Bytes::from_static(b"\xa1\x00\x01"),
                    external_key: [0xE5; 32],
                    proposal: Bytes::from_static(b"mls proposal"),
                    senders: vec![(sender, msg_id)],
                }),
            },
        ),
        ("external-key", Entry::ExternalKey { key: [0xE5; 32] }),
        (
            "contact",
            Entry::Contact {
                from: UserId(0xA11CE),
                to: UserId(0xB0B),
                added: true,
            },
        ),
        (
            "moved",
            Entry::Moved {
                conversation,
                certificate: HandoverCertificate {
                    term: 1,
                    from: "a.example".into(),
                    to: "b.example".into(),
                    last_seq: 42,
                    epoch: 0,
                    from_signature: [0x5a; 64],
                    to_signature: [0xa5; 64],
                },
            },
        ),
        (
            "following",
            Entry::Following {
                conversation,
                term: 1,
                head: 40,
            },
        ),
        (
            "declined",
            Entry::Declined {
                conversation,
                term: 1,
                reason: "b.example does not federate with c.example, a member domain".into(),
            },
        ),
        (
            "revocations",
            Entry::Revocations {
                root: root.public(),
                crl: sund_model::trust::Crl::issue(
                    &root,
                    "b.example",
                    2,
                    1_700_000_000,
                    [sender, DeviceId(0xB2)].into_iter().collect(),
                )
                .encode()
                .into(),
            },
        ),
        (
            "key-package-request",
            Entry::KeyPackageRequest {
                request: 0x4b50,
                requester: UserId::of("alice", "a.example"),
                users: vec![
                    UserId::of("bob", "b.example"),
                    UserId::of("carol", "b.example"),
                ],
            },
        ),
        (
            "key-packages",
            Entry::KeyPackages {
                request: 0x4b50,
                answer: FetchAnswer::Found {
                    packages: vec![ForeignPackage {
                        user: UserId::of("bob", "b.example"),
                        device: DeviceId(0xB2),
                        package: Bytes::from_static(b"a TLS-encoded KeyPackage"),
                        last_resort: true,
                    }],
                    exhausted: vec![DeviceId(0xB3)],
                },
            },
        ),
        (
            "welcome",
            Entry::Welcome {
                conversation,
                seq: 7,
                kind: 1,
                devices: vec![sender, DeviceId(0xB2)],
                welcome: Bytes::from_static(b"an MLS Welcome"),
            },
        ),
        (
            "key-packages-limited",
            Entry::KeyPackages {
                request: 0x4b51,
                answer: FetchAnswer::Limited {
                    retry_after_ms: 1_500,
                },
            },
        ),
    ];
    // A signed bundle of a sequenced message, an answer and a following entry.
    let inner: Vec<Entry> = entries
        .iter()
        .filter(|(name, _)| ["sequenced", "answer-sequenced", "following"].contains(name))
        .map(|(_, entry)| entry.clone())
        .collect();
    let statements: Vec<[u8; 32]> = inner
        .iter()
        .filter_map(sund_model::federation::entry::statement_of)
        .collect();
    let bundle = Entry::Bundle {
        entries: inner,
        signature: Some(root.sign(&sund_model::federation::entry::bundle_statement(
            &statements,
        ))),
    };
    for (name, entry) in entries.into_iter().chain([("bundle", bundle)]) {
        std::fs::write(format!("{out}/seed-{name}"), entry.encode()).unwrap();
    }
}

/// Writes seed inputs for the `federation_handshake` fuzz target (run by hand with
/// `SUND_WRITE_SEEDS=1`): a certificate and each handshake message of a real exchange.
#[test]
fn write_federation_handshake_seeds() {
    let Ok(dir) = std::env::var("SUND_WRITE_SEEDS") else {
        return;
    };
    let _ = dir;
    use sund_model::federation::handshake::{answer, dial};
    let a = test_identity("a.example", 1);
    let b = test_identity("b.example", 2);
    let mut entropy = TestEntropy(7);
    let now = Instant(1_000_000_000);
    let (dialing, hello) = dial(&a, &peer_of(&b), [0x42; 32], &mut entropy);
    let (_, reply) = answer(&b, &[peer_of(&a)], &hello, [0x42; 32], now, &mut entropy).unwrap();
    let (finish, _, _) = dialing.finish(&a, &reply, now).unwrap();
    let out = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../corpus/federation_handshake"
    );
    for (name, bytes) in [
        ("certificate", a.certificate.encode()),
        ("hello", hello),
        ("reply", reply),
        ("finish", finish),
    ] {
        std::fs::write(format!("{out}/seed-{name}"), bytes).unwrap();
    }
}

mod in_the_gateway {
    use super::*;
    use sund_model::federation::certificate::GatewayCertificate;
    use sund_model::federation::handshake::PeerConfig;
    use sund_model::gateway::links::FEDERATION_IDENTITY_TABLE;
    use sund_model::gateway::{Gateway, GatewayConfig, GatewayInput, GatewayOutput};
    use sund_model::testing::drain_gateway;

    fn config(domain: &str, peer: &str) -> GatewayConfig {
        GatewayConfig {
            domain: domain.into(),
            federation_peers: vec![PeerConfig {
                domain: peer.into(),
                root_fingerprint: "00".repeat(16),
            }],
            ..GatewayConfig::default()
        }
    }

    fn link_certificate(store: &MemStore) -> GatewayCertificate {
        let value = store
            .records()
            .find(|(table, key, _)| *table == FEDERATION_IDENTITY_TABLE.0 && *key == b"link")
            .map(|(_, _, value)| value.to_vec())
            .expect("the link identity is stored");
        GatewayCertificate::decode(&value[32..]).unwrap()
    }

    #[test]
    fn a_gateway_with_peers_certifies_a_link_key_keeps_it_and_dials_the_peers_after_it() {
        let now = Instant(1_000_000_000);
        let mut store = MemStore::default();
        let mut gateway = Gateway::new(
            config("a.example", "b.example"),
            now,
            Box::new(TestEntropy(3)),
        );
        let outputs = drain_gateway(&mut gateway, &mut store);
        assert!(
            outputs.contains(&GatewayOutput::Federation(FederationOutput::Connect {
                peer: "b.example".into()
            }))
        );
        let cert = link_certificate(&store);
        assert_eq!(cert.verify(gateway.trust_root(), now), Ok(()));
        // A restart keeps the key and its certificate.
        let mut again = Gateway::recover(
            config("a.example", "b.example"),
            now,
            &store,
            Box::new(TestEntropy(4)),
        )
        .unwrap();
        drain_gateway(&mut again, &mut store);
        assert_eq!(link_certificate(&store), cert);
        assert!(again.federation().is_some());
        // The peer that sorts after does not dial; its link waits to be dialed.
        let mut b = Gateway::new(
            config("b.example", "a.example"),
            now,
            Box::new(TestEntropy(5)),
        );
        let mut b_store = MemStore::default();
        let outputs = drain_gateway(&mut b, &mut b_store);
        assert!(!outputs.iter().any(|o| matches!(
            o,
            GatewayOutput::Federation(FederationOutput::Connect { .. })
        )));
        // Frames on a link connection go to the links, not to the device sessions.
        b.handle(
            now,
            GatewayInput::Federation(FederationInput::Accepted(ConnectionId(9), [9; 32])),
        );
        b.handle(
            now,
            GatewayInput::Federation(FederationInput::Frame(
                ConnectionId(9),
                Bytes::from_static(b"junk"),
            )),
        );
        let outputs = drain_gateway(&mut b, &mut b_store);
        assert!(
            outputs.contains(&GatewayOutput::Federation(FederationOutput::Close(
                ConnectionId(9)
            )))
        );
        assert_eq!(b.federation().unwrap().stats().protocol_errors, 1);
    }

    #[test]
    fn a_gateway_without_peers_has_no_links_and_draws_nothing_for_them() {
        let now = Instant(1_000_000_000);
        let mut plain = Gateway::new(GatewayConfig::default(), now, Box::new(TestEntropy(3)));
        let mut store = MemStore::default();
        drain_gateway(&mut plain, &mut store);
        assert!(plain.federation().is_none());
        assert!(!store
            .records()
            .any(|(table, _, _)| table == FEDERATION_IDENTITY_TABLE.0));
        assert!(plain
            .federation_enqueue(now, "b.example", Bytes::from_static(b"x"))
            .is_err());
    }
}
