//! The gateway state machine driven through its public protocol: what it answers, what it
//! refuses, and that nothing leaves before its commit.

use std::time::Duration;

use bytes::Bytes;
use std::collections::BTreeMap;
use sund_model::env::{MemStore, Store};
use sund_model::gateway::limits::{Rate, RateLimits};
use sund_model::gateway::{
    AdminAnswer, AdminCommand, Gateway, GatewayConfig, GatewayInput, GatewayOutput, HistoryKind,
    LostHistory,
};

use sund_model::identity::{session_proof_message, DeviceKey};
use sund_model::ids::{ConnectionId, ConversationId, DeviceId, MsgId, UserId};
use sund_model::testing::{drain_gateway, TestDevice};
use sund_model::time::Instant;
use sund_model::trust::{Crl, DeviceCertificate};
use sund_model::wire::payload::*;
use sund_model::wire::{Frame, Payload, Routing, PAYLOAD_BYTES_MAX};

// ---- helpers ----

const CONV: ConversationId = ConversationId(77);

fn key(seed: u8) -> DeviceKey {
    DeviceKey::from_seed([seed; 32])
}
fn alice() -> DeviceId {
    key(1).device_id()
}
fn bob() -> DeviceId {
    key(2).device_id()
}
fn mallory() -> DeviceId {
    key(3).device_id()
}
/// Alice's second device.
fn alice_phone() -> DeviceId {
    key(4).device_id()
}
fn key_of(device: DeviceId) -> DeviceKey {
    test_device(device, UserId(device.0)).key
}
/// The test device `device` (one of the four keys above), playing `user`.
fn test_device(device: DeviceId, user: UserId) -> TestDevice {
    (1..=4u8)
        .map(|seed| TestDevice::new([seed; 32], user))
        .find(|d| d.id() == device)
        .expect("a test device")
}

mod support;
use support::Counter;

fn open_config() -> GatewayConfig {
    GatewayConfig {
        open_enrolment: true,
        ..GatewayConfig::default()
    }
}

struct Harness {
    gateway: Gateway,
    store: MemStore,
    now: Instant,
    /// Each test device's certificate, registered at its first hello.
    certificates: BTreeMap<DeviceId, Vec<u8>>,
    /// What each (device, message id) was sent after: a message sent again keeps it, a new one
    /// comes after its device's last acknowledged message, as a node's outbox chains them.
    sent_after: BTreeMap<(DeviceId, u8), u8>,
    /// Each device's last acknowledged message id (0: none).
    acked_last: BTreeMap<DeviceId, u8>,
    /// Each device's last resume token, presented at its next hello as a node does.
    tokens: BTreeMap<DeviceId, [u8; 32]>,
    /// Restarts so far (each run draws its own entropy, as a real one does).
    restarts: u64,
}

impl Harness {
    fn new() -> Harness {
        Harness::with_config(open_config())
    }

    fn with_config(config: GatewayConfig) -> Harness {
        let gateway = Gateway::new(config, Instant(0), Box::new(Counter(9)));
        let mut h = Harness {
            gateway,
            store: MemStore::default(),
            now: Instant(0),
            certificates: BTreeMap::new(),
            sent_after: BTreeMap::new(),
            acked_last: BTreeMap::new(),
            tokens: BTreeMap::new(),
            restarts: 0,
        };
        h.input(support::admin(AdminCommand::CreateConversation(
            CONV,
            vec![alice(), bob()],
        )));
        h
    }

    /// A gateway recovered from this harness's store.
    fn restarted(&self, config: GatewayConfig) -> Harness {
        // Each run draws other tokens, as a real one does (the same stream twice would issue
        // a token the store holds for another device).
        let entropy = Counter(5 + self.store.commits() + 1_000 * (self.restarts + 1));
        let gateway = Gateway::recover(config, self.now, &self.store, Box::new(entropy)).unwrap();
        Harness {
            gateway,
            store: self.store.clone(),
            now: self.now,
            certificates: self.certificates.clone(),
            sent_after: self.sent_after.clone(),
            acked_last: self.acked_last.clone(),
            tokens: self.tokens.clone(),
            restarts: self.restarts + 1,
        }
    }

    /// Registers `device` for `user` on a connection of its own (`token`: the enrolment
    /// token's secret, zeros under open enrolment); the outputs of the `Register`.
    fn register(
        &mut self,
        conn: u64,
        device: DeviceId,
        user: UserId,
        token: [u8; 16],
    ) -> Vec<GatewayOutput> {
        self.input(GatewayInput::Accepted(ConnectionId(conn)));
        let register = test_device(device, user).register(token);
        let out = self.input(GatewayInput::Frame(ConnectionId(conn), register));
        if let Some(Payload::Certificate(answer)) =
            frames_to(&out, conn).into_iter().map(|f| f.payload).next()
        {
            self.certificates
                .insert(device, Vec::from(answer.certificate));
        }
        out
    }

    /// The device's certificate, registering it (open enrolment) if it has none.
    fn certificate(&mut self, device: DeviceId, user: Option<UserId>) -> Vec<u8> {
        if !self.certificates.contains_key(&device) {
            let user = user.unwrap_or(UserId(device.0));
            self.register(9_000, device, user, [0; 16]);
            self.input(GatewayInput::Closed(ConnectionId(9_000)));
        }
        self.certificates.get(&device).cloned().unwrap_or_default()
    }

    /// Feeds an input, commits every Ready, returns the released outputs.
    fn input(&mut self, input: GatewayInput) -> Vec<GatewayOutput> {
        self.gateway.handle(self.now, input);
        self.drain()
    }

    fn drain(&mut self) -> Vec<GatewayOutput> {
        drain_gateway(&mut self.gateway, &mut self.store)
    }

    fn frame(&mut self, conn: u64, routing: Routing, payload: Payload) -> Vec<GatewayOutput> {
        self.input(GatewayInput::Frame(
            ConnectionId(conn),
            Frame::new(routing, payload).encode(),
        ))
    }

    fn hello(
        &mut self,
        conn: u64,
        device: DeviceId,
        cursors: Vec<Cursor>,
        resume_token: Option<[u8; 32]>,
    ) -> Vec<GatewayOutput> {
        self.hello_as(conn, device, cursors, resume_token, None)
    }

    fn hello_as(
        &mut self,
        conn: u64,
        device: DeviceId,
        cursors: Vec<Cursor>,
        resume_token: Option<[u8; 32]>,
        user: Option<UserId>,
    ) -> Vec<GatewayOutput> {
        let certificate = self.certificate(device, user);
        let hello = test_device(device, UserId(device.0)).hello(
            Some(certificate),
            cursors,
            resume_token,
            user,
        );
        self.input(GatewayInput::Frame(ConnectionId(conn), hello))
    }

    /// Accept, hello (with the device's last resume token, as a node sends it), answer the
    /// challenge if one comes: the outputs once the session is open.
    fn connect_with(
        &mut self,
        conn: u64,
        device: DeviceId,
        cursors: Vec<Cursor>,
    ) -> Vec<GatewayOutput> {
        self.input(GatewayInput::Accepted(ConnectionId(conn)));
        let token = self.tokens.get(&device).copied();
        let out = self.hello(conn, device, cursors, token);
        let opened = |out: &[GatewayOutput]| {
            frames_to(out, conn)
                .iter()
                .any(|f| matches!(f.payload, Payload::HelloOk(_)))
        };
        let out = if opened(&out) {
            out
        } else {
            self.prove(conn, device, &out)
        };
        if let Some(token) = frames_to(&out, conn).iter().find_map(|f| match &f.payload {
            Payload::HelloOk(ok) => Some(ok.resume_token),
            _ => None,
        }) {
            self.tokens.insert(device, token);
        }
        out
    }

    /// Answers the challenge among `out` as `device`: the outputs after the proof.
    fn prove(&mut self, conn: u64, device: DeviceId, out: &[GatewayOutput]) -> Vec<GatewayOutput> {
        let challenge = frames_to(out, conn)
            .into_iter()
            .find_map(|f| match f.payload {
                Payload::Challenge(challenge) => Some(challenge),
                _ => None,
            })
            .unwrap_or_else(|| panic!("expected a challenge: {out:?}"));
        let proof = test_device(device, UserId(device.0)).proof(&challenge.nonce);
        self.input(GatewayInput::Frame(ConnectionId(conn), proof))
    }

    fn connect(&mut self, conn: u64, device: DeviceId) -> Vec<GatewayOutput> {
        self.connect_with(conn, device, vec![])
    }

    /// Accept, hello naming `user`, answer the challenge.
    fn connect_as(&mut self, conn: u64, device: DeviceId, user: UserId) -> Vec<GatewayOutput> {
        self.input(GatewayInput::Accepted(ConnectionId(conn)));
        let out = self.hello_as(conn, device, vec![], None, Some(user));
        self.prove(conn, device, &out)
    }

    fn send(&mut self, conn: u64, device: DeviceId, msg_id: u8, body: &[u8]) -> Vec<GatewayOutput> {
        let last = self.acked_last.get(&device).copied().unwrap_or(0);
        let after = *self.sent_after.entry((device, msg_id)).or_insert(last);
        let out = self.send_after(conn, device, msg_id, after, body);
        let acked = frames_to(&out, conn)
            .iter()
            .any(|f| matches!(f.payload, Payload::SendAck(a) if a.msg_id == [msg_id; 16]));
        if acked && after == last {
            self.acked_last.insert(device, msg_id);
        }
        out
    }

    fn send_after(
        &mut self,
        conn: u64,
        device: DeviceId,
        msg_id: u8,
        after: u8,
        body: &[u8],
    ) -> Vec<GatewayOutput> {
        let routing = Routing {
            conversation: CONV,
            sender: device,
            ..Routing::default()
        };
        let after = if after == 0 { [0; 16] } else { [after; 16] };
        self.frame(
            conn,
            routing,
            Payload::Send(Send {
                msg_id: [msg_id; 16],
                body: body.to_vec(),
                welcome: None,
                after: Some(after),
            }),
        )
    }

    fn ack(&mut self, conn: u64, seq: u64) -> Vec<GatewayOutput> {
        self.frame(
            conn,
            Routing {
                conversation: CONV,
                seq,
                ..Routing::default()
            },
            Payload::Ack(Ack {}),
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

fn error_code(frame: &Frame) -> Option<ErrorCode> {
    match &frame.payload {
        Payload::Error(e) => Some(ErrorCode::from_u16(e.code)),
        _ => None,
    }
}

fn token_of(outputs: &[GatewayOutput], conn: u64) -> [u8; 32] {
    frames_to(outputs, conn)
        .into_iter()
        .find_map(|f| match f.payload {
            Payload::HelloOk(ok) => Some(ok.resume_token),
            _ => None,
        })
        .expect("a HelloOk")
}

// ---- sessions ----

#[test]
fn hello_and_proof_open_a_session_with_heartbeat_interval_and_token() {
    let mut h = Harness::new();
    let out = h.connect(1, alice());
    let frames = frames_to(&out, 1);
    assert_eq!(frames.len(), 2, "HelloOk, then the KeyPackage count");
    let Payload::HelloOk(ok) = &frames[0].payload else {
        panic!("expected HelloOk")
    };
    assert!(matches!(
        frames[1].payload,
        Payload::KeyPackageCount(KeyPackageCount { remaining: 0, .. })
    ));
    assert_eq!(ok.heartbeat_interval_ms, 5000);
    assert_eq!(ok.resume_token_ttl_s, 7 * 24 * 3600);
    assert_eq!(h.gateway.stats().sessions.authenticated, 1);
}

#[test]
fn a_gateway_shutting_down_tells_each_device_when_to_come_back_and_only_then() {
    let mut h = Harness::with_config(GatewayConfig {
        shutdown_retry_after: Duration::from_millis(1_500),
        ..open_config()
    });
    // Other goodbyes carry no hint: a refused device backs off as it would anyway.
    h.input(GatewayInput::Accepted(ConnectionId(3)));
    let out = h.frame(
        3,
        Routing::default(),
        Payload::HeartbeatAck(Heartbeat {
            nonce: 1,
            crl_version: None,
            presence: None,
            peer_roots: None,
            peer_crls: None,
            contacts: None,
        }),
    );
    let hints: Vec<_> = frames_to(&out, 3)
        .into_iter()
        .filter_map(|f| match f.payload {
            Payload::Goodbye(g) => Some(g.retry_after_ms),
            _ => None,
        })
        .collect();
    assert_eq!(
        hints,
        [None],
        "a frame before the session is refused with a goodbye"
    );
    h.connect(1, alice());
    h.connect(2, bob());
    h.gateway.shut_down(h.now);
    let out = h.drain();
    for conn in [1, 2] {
        let hints: Vec<_> = frames_to(&out, conn)
            .into_iter()
            .filter_map(|f| match f.payload {
                Payload::Goodbye(g) => Some((ErrorCode::from_u16(g.code), g.retry_after_ms)),
                _ => None,
            })
            .collect();
        assert_eq!(hints, [(ErrorCode::ShuttingDown, Some(1_500))]);
        assert!(closed(&out, conn));
    }
}

#[test]
fn trust_root_and_crl_lookups_before_a_session_are_bounded_per_connection() {
    let mut h = Harness::new();
    h.input(GatewayInput::Accepted(ConnectionId(1)));
    for _ in 0..sund_model::gateway::session::LOOKUPS_MAX {
        let out = h.frame(
            1,
            Routing::default(),
            Payload::TrustRootFetch(TrustRootFetch {}),
        );
        assert!(
            frames_to(&out, 1)
                .iter()
                .any(|f| matches!(f.payload, Payload::TrustRoot(_))),
            "{out:?}"
        );
    }
    let out = h.frame(
        1,
        Routing::default(),
        Payload::TrustRootFetch(TrustRootFetch {}),
    );
    assert_eq!(goodbye_code(&out, 1), Some(ErrorCode::RateLimited));
    assert!(closed(&out, 1));
    // CRL requests count too before a session opens.
    h.input(GatewayInput::Accepted(ConnectionId(2)));
    for _ in 0..sund_model::gateway::session::LOOKUPS_MAX {
        h.frame(
            2,
            Routing::default(),
            Payload::CrlFetch(CrlFetch {
                have_version: 0,
                peers: None,
            }),
        );
    }
    let out = h.frame(
        2,
        Routing::default(),
        Payload::CrlFetch(CrlFetch {
            have_version: 0,
            peers: None,
        }),
    );
    assert_eq!(goodbye_code(&out, 2), Some(ErrorCode::RateLimited));
}

#[test]
fn frames_before_the_session_is_open_close_the_connection() {
    let mut h = Harness::new();
    h.input(GatewayInput::Accepted(ConnectionId(1)));
    let out = h.send(1, alice(), 1, b"early");
    assert_eq!(goodbye_code(&out, 1), Some(ErrorCode::NotAuthenticated));
    assert!(closed(&out, 1));
    // Also between Hello and Proof.
    h.input(GatewayInput::Accepted(ConnectionId(2)));
    h.hello(2, alice(), vec![], None);
    let out = h.send(2, alice(), 1, b"early");
    assert_eq!(goodbye_code(&out, 2), Some(ErrorCode::NotAuthenticated));
    assert_eq!(h.gateway.conversation_head(CONV), Some(0));
}

#[test]
fn a_proof_that_does_not_verify_closes_the_connection() {
    let mut h = Harness::new();
    h.input(GatewayInput::Accepted(ConnectionId(1)));
    let out = h.hello(1, alice(), vec![], None);
    let Payload::Challenge(challenge) = frames_to(&out, 1)[0].payload else {
        panic!()
    };
    let signature = key(2).sign(&session_proof_message(&challenge.nonce, alice()));
    let out = h.frame(1, Routing::default(), Payload::Proof(Proof { signature }));
    assert_eq!(goodbye_code(&out, 1), Some(ErrorCode::AuthenticationFailed));
    assert!(closed(&out, 1));
    assert_eq!(
        h.gateway
            .stats()
            .refusals
            .get(ErrorCode::AuthenticationFailed),
        1
    );
}

/// A device that heard no challenge (or whose proof was lost: the simulator's frames can be)
/// says hello again on the same connection: the same challenge comes again, its proof opens
/// the session, and a second proof of it changes nothing. Another device's hello there is
/// refused, and a hello on the open session is an error that leaves it open.
#[test]
fn a_repeated_hello_gets_the_same_challenge_and_a_repeated_proof_changes_nothing() {
    let mut h = Harness::new();
    h.input(GatewayInput::Accepted(ConnectionId(1)));
    let out = h.hello(1, alice(), vec![], None);
    let Payload::Challenge(first) = frames_to(&out, 1)[0].payload else {
        panic!("{out:?}")
    };
    let out = h.hello(1, alice(), vec![], None);
    let Payload::Challenge(again) = frames_to(&out, 1)[0].payload else {
        panic!("{out:?}")
    };
    assert_eq!(again.nonce, first.nonce, "the same challenge");
    let out = h.prove(1, alice(), &out);
    assert!(frames_to(&out, 1)
        .iter()
        .any(|f| matches!(f.payload, Payload::HelloOk(_))));
    assert_eq!(h.gateway.stats().sessions.authenticated, 1);
    let proof = test_device(alice(), UserId(alice().0)).proof(&first.nonce);
    let out = h.input(GatewayInput::Frame(ConnectionId(1), proof));
    assert!(out.is_empty(), "a second proof changes nothing: {out:?}");
    let out = h.hello(1, alice(), vec![], None);
    let frames = frames_to(&out, 1);
    assert_eq!(frames.len(), 1, "{out:?}");
    assert_eq!(error_code(&frames[0]), Some(ErrorCode::UnexpectedOpcode));
    assert!(!closed(&out, 1), "the session stays open");
    assert_eq!(h.gateway.stats().sessions.authenticated, 1);

    h.input(GatewayInput::Accepted(ConnectionId(2)));
    h.hello(2, bob(), vec![], None);
    let out = h.hello(2, alice(), vec![], None);
    assert_eq!(goodbye_code(&out, 2), Some(ErrorCode::NotAuthenticated));
    assert!(closed(&out, 2));
}

#[test]
fn a_proof_replayed_on_another_connection_is_refused() {
    let mut h = Harness::new();
    h.input(GatewayInput::Accepted(ConnectionId(1)));
    let out = h.hello(1, alice(), vec![], None);
    let Payload::Challenge(first) = frames_to(&out, 1)[0].payload else {
        panic!()
    };
    let recorded = key(1).sign(&session_proof_message(&first.nonce, alice()));
    h.frame(
        1,
        Routing::default(),
        Payload::Proof(Proof {
            signature: recorded,
        }),
    );
    // An eavesdropper replays the recorded proof against a fresh challenge.
    h.input(GatewayInput::Accepted(ConnectionId(2)));
    h.hello(2, alice(), vec![], None);
    let out = h.frame(
        2,
        Routing::default(),
        Payload::Proof(Proof {
            signature: recorded,
        }),
    );
    assert_eq!(goodbye_code(&out, 2), Some(ErrorCode::AuthenticationFailed));
}

#[test]
fn a_device_id_that_does_not_match_the_key_is_refused() {
    let mut h = Harness::new();
    h.input(GatewayInput::Accepted(ConnectionId(1)));
    let hello = Hello {
        cursors: vec![],
        device_key: key(1).public().0,
        resume_token: None,
        user: None,
        certificate: None,
        generation: None,
    };
    let out = h.frame(
        1,
        Routing {
            sender: bob(),
            ..Routing::default()
        },
        Payload::Hello(hello),
    );
    assert_eq!(goodbye_code(&out, 1), Some(ErrorCode::AuthenticationFailed));
}

#[test]
fn without_open_enrolment_a_device_registers_with_a_one_time_token() {
    let mut h = Harness::with_config(GatewayConfig::default());
    let out = h.register(1, alice(), alice_user(), [0; 16]);
    assert_eq!(
        goodbye_code(&out, 1),
        Some(ErrorCode::EnrolmentTokenInvalid)
    );
    // Another domain's user is its own gateway's to enrol.
    let out = h.input(support::admin(AdminCommand::IssueEnrolmentToken(
        "alice@b.example".into(),
    )));
    let Some(AdminAnswer::EnrolmentRefused { why }) = support::answer_in(&out) else {
        panic!("expected a refusal: {out:?}")
    };
    assert!(why.contains("a user of b.example"), "{why}");
    let out = h.input(support::admin(AdminCommand::IssueEnrolmentToken(
        "alice".into(),
    )));
    let Some(AdminAnswer::EnrolmentToken(token, address)) = support::answer_in(&out) else {
        panic!("expected a token: {out:?}")
    };
    assert_eq!(address.to_string(), "alice@localhost");
    assert_eq!(
        (token.user, token.domain.as_str()),
        (alice_user(), "localhost")
    );
    let out = h.register(2, alice(), alice_user(), token.secret);
    let Payload::Certificate(answer) = &frames_to(&out, 2)[0].payload else {
        panic!("expected a certificate: {out:?}")
    };
    let root = h.gateway.trust_root().clone();
    assert_eq!(answer.root_key, root.key.0);
    assert!(token.pins(&root));
    let cert = DeviceCertificate::decode(&answer.certificate).unwrap();
    assert_eq!((cert.user, cert.device()), (alice_user(), alice()));
    let out = h.connect(3, alice());
    assert!(matches!(frames_to(&out, 3)[0].payload, Payload::HelloOk(_)));
    // The token was used once: a second device cannot use it, even after a restart.
    let mut h2 = h.restarted(GatewayConfig::default());
    let out = h2.register(4, alice_phone(), alice_user(), token.secret);
    assert_eq!(goodbye_code(&out, 4), Some(ErrorCode::EnrolmentTokenUsed));
    // The certificate still opens sessions after the restart: the root survived.
    let out = h2.connect(5, alice());
    assert!(matches!(frames_to(&out, 5)[0].payload, Payload::HelloOk(_)));
}

#[test]
fn a_hello_without_a_valid_certificate_is_refused_with_its_own_error() {
    let mut h = Harness::new();
    let try_hello = |h: &mut Harness, conn: u64, device: DeviceId, certificate: Option<Vec<u8>>| {
        h.input(GatewayInput::Accepted(ConnectionId(conn)));
        let hello = Hello {
            cursors: vec![],
            device_key: key_of(device).public().0,
            resume_token: None,
            user: None,
            certificate: certificate.map(Into::into),
            generation: None,
        };
        let routing = Routing {
            sender: device,
            ..Routing::default()
        };
        let out = h.frame(conn, routing, Payload::Hello(hello));
        goodbye_code(&out, conn)
    };
    assert_eq!(
        try_hello(&mut h, 1, alice(), None),
        Some(ErrorCode::CertificateRequired)
    );
    // Bob's certificate shown with Alice's key.
    let bobs = h.certificate(bob(), None);
    assert_eq!(
        try_hello(&mut h, 2, alice(), Some(bobs)),
        Some(ErrorCode::CertificateInvalid)
    );
    // Tampered: one byte of the user changed.
    let mut tampered = h.certificate(alice(), None);
    tampered[60] ^= 1;
    assert_eq!(
        try_hello(&mut h, 3, alice(), Some(tampered)),
        Some(ErrorCode::CertificateInvalid)
    );
    // From another gateway's domain, signed by another root.
    let mut other = Harness::with_config(GatewayConfig {
        domain: "elsewhere.example".into(),
        ..open_config()
    });
    let foreign = other.certificate(alice(), None);
    assert_eq!(
        try_hello(&mut h, 4, alice(), Some(foreign)),
        Some(ErrorCode::ForeignDomain)
    );
    // Not yet valid: shown more than the hour of allowed clock skew before it was issued.
    h.now = Instant(7_200_000_000);
    let mallorys = h.certificate(mallory(), None);
    h.now = Instant(3_000_000_000);
    assert_eq!(
        try_hello(&mut h, 5, mallory(), Some(mallorys)),
        Some(ErrorCode::CertificateNotYetValid)
    );
    // Expired: a year and a day later.
    let valid = h.certificate(alice(), None);
    h.now = h.now + Duration::from_secs(366 * 24 * 3600);
    assert_eq!(
        try_hello(&mut h, 6, alice(), Some(valid)),
        Some(ErrorCode::CertificateExpired)
    );
    assert_eq!(
        h.gateway.stats().refusals.total(),
        6,
        "one goodbye per refused hello"
    );
}

#[test]
fn a_revoked_device_is_cut_off_and_everyone_connected_gets_the_new_crl() {
    let mut h = Harness::new();
    let alices_token = token_of(&h.connect(1, alice()), 1);
    h.connect(2, bob());
    let out = h.input(support::admin(AdminCommand::RevokeDevice(alice())));
    assert_eq!(goodbye_code(&out, 1), Some(ErrorCode::DeviceRevoked));
    let Payload::Crl(crl) = &frames_to(&out, 2)[0].payload else {
        panic!("Bob should get the new CRL: {out:?}")
    };
    let crl = Crl::decode(&crl.crl).unwrap();
    assert_eq!(crl.version, 1);
    assert!(crl.revoked.contains(&alice()));
    crl.verify(h.gateway.trust_root()).unwrap();
    // Neither the old resume token nor a fresh challenge opens a session again.
    h.input(GatewayInput::Accepted(ConnectionId(3)));
    let out = h.hello(3, alice(), vec![], Some(alices_token));
    assert_eq!(goodbye_code(&out, 3), Some(ErrorCode::DeviceRevoked));
    h.input(GatewayInput::Accepted(ConnectionId(4)));
    let out = h.hello(4, alice(), vec![], None);
    assert_eq!(goodbye_code(&out, 4), Some(ErrorCode::DeviceRevoked));
    // Nor does registering again, and the revocation survives a restart.
    let out = h.register(5, alice(), UserId(alice().0), [0; 16]);
    assert_eq!(goodbye_code(&out, 5), Some(ErrorCode::DeviceRevoked));
    let mut h2 = h.restarted(open_config());
    h2.input(GatewayInput::Accepted(ConnectionId(6)));
    let out = h2.hello(6, alice(), vec![], None);
    assert_eq!(goodbye_code(&out, 6), Some(ErrorCode::DeviceRevoked));
    // A device that was away fetches the CRL it lacks; one that has it gets nothing.
    let out = h2.connect(7, bob());
    assert!(matches!(frames_to(&out, 7)[0].payload, Payload::HelloOk(_)));
    let out = h2.frame(
        7,
        Routing::default(),
        Payload::CrlFetch(CrlFetch {
            have_version: 0,
            peers: None,
        }),
    );
    assert!(matches!(frames_to(&out, 7)[0].payload, Payload::Crl(_)));
    let out = h2.frame(
        7,
        Routing::default(),
        Payload::CrlFetch(CrlFetch {
            have_version: 1,
            peers: None,
        }),
    );
    assert!(frames_to(&out, 7).is_empty());
}

/// Found by the simulator's swarm (seed 1424 of the first swarm): a device that sent its
/// `Hello` before its revocation and its proof after it got a session.
#[test]
fn a_device_revoked_while_it_answers_its_challenge_gets_no_session() {
    let mut h = Harness::new();
    h.connect(1, alice());
    h.input(GatewayInput::Accepted(ConnectionId(2)));
    let challenged = h.hello(2, alice(), vec![], None);
    h.input(support::admin(AdminCommand::RevokeDevice(alice())));
    let out = h.prove(2, alice(), &challenged);
    assert_eq!(goodbye_code(&out, 2), Some(ErrorCode::DeviceRevoked));
    assert!(
        !frames_to(&out, 2)
            .iter()
            .any(|f| matches!(f.payload, Payload::HelloOk(_))),
        "no session for a revoked device: {out:?}"
    );
}

#[test]
fn a_resume_token_skips_the_challenge_and_is_rotated() {
    let mut h = Harness::new();
    let token = token_of(&h.connect(1, alice()), 1);
    h.input(GatewayInput::Accepted(ConnectionId(2)));
    let out = h.hello(2, alice(), vec![], Some(token));
    let next = token_of(&out, 2);
    assert_ne!(next, token, "tokens rotate on every use");
    assert_eq!(h.gateway.stats().sessions.resumed, 1);
    // The old token is spent.
    h.input(GatewayInput::Accepted(ConnectionId(3)));
    let frames = frames_to(&h.hello(3, alice(), vec![], Some(token)), 3);
    assert_eq!(error_code(&frames[0]), Some(ErrorCode::ResumeTokenInvalid));
    assert!(matches!(frames[1].payload, Payload::Challenge(_)));
}

#[test]
fn an_expired_or_foreign_resume_token_gets_its_own_error_and_a_challenge() {
    let mut h = Harness::new();
    let alices = token_of(&h.connect(1, alice()), 1);
    // Foreign: Bob presents Alice's token.
    h.input(GatewayInput::Accepted(ConnectionId(2)));
    let frames = frames_to(&h.hello(2, bob(), vec![], Some(alices)), 2);
    assert_eq!(error_code(&frames[0]), Some(ErrorCode::ResumeTokenInvalid));
    assert!(matches!(frames[1].payload, Payload::Challenge(_)));
    // Expired: eight days later, before the housekeeping tick forgets it.
    h.now = h.now + Duration::from_secs(8 * 24 * 3600);
    h.input(GatewayInput::Accepted(ConnectionId(3)));
    let frames = frames_to(&h.hello(3, alice(), vec![], Some(alices)), 3);
    assert_eq!(error_code(&frames[0]), Some(ErrorCode::ResumeTokenExpired));
    assert!(matches!(frames[1].payload, Payload::Challenge(_)));
    // After the tick the expired token is gone altogether.
    h.gateway.handle_timeout(h.now);
    h.drain();
    h.input(GatewayInput::Accepted(ConnectionId(4)));
    let frames = frames_to(&h.hello(4, alice(), vec![], Some(alices)), 4);
    assert_eq!(error_code(&frames[0]), Some(ErrorCode::ResumeTokenInvalid));
}

#[test]
fn resume_tokens_survive_a_gateway_restart() {
    let mut h = Harness::new();
    let token = token_of(&h.connect(1, alice()), 1);
    let mut h2 = h.restarted(open_config());
    h2.input(GatewayInput::Accepted(ConnectionId(2)));
    let out = h2.hello(2, alice(), vec![], Some(token));
    assert!(matches!(frames_to(&out, 2)[0].payload, Payload::HelloOk(_)));
}

/// Regression (found by the `gateway_inputs` fuzz target): a second `Hello` on an open session
/// re-homed the connection to another device, so a later session of the first device sent a
/// `Goodbye` on a connection the gateway had already closed.
#[test]
fn a_second_hello_on_an_open_session_is_refused() {
    let mut h = Harness::new();
    h.connect(1, alice());
    let frames = frames_to(&h.hello(1, bob(), vec![], None), 1);
    assert_eq!(error_code(&frames[0]), Some(ErrorCode::UnexpectedOpcode));
    h.input(GatewayInput::Closed(ConnectionId(1)));
    let out = h.connect(2, bob());
    assert!(frames_to(&out, 1).is_empty());
    assert!(!closed(&out, 1));
}

#[test]
fn a_silent_session_is_closed_after_the_idle_timeout() {
    let mut h = Harness::new();
    h.connect(1, alice());
    h.now = h.now + Duration::from_secs(16);
    h.gateway.handle_timeout(h.now);
    let out = h.drain();
    assert_eq!(goodbye_code(&out, 1), Some(ErrorCode::HeartbeatTimeout));
    assert_eq!(h.gateway.session_count(), 0);
}

#[test]
fn a_heartbeat_is_answered_with_its_nonce() {
    let mut h = Harness::new();
    h.connect(1, alice());
    let out = h.frame(
        1,
        Routing::default(),
        Payload::Heartbeat(Heartbeat {
            nonce: 41,
            crl_version: None,
            presence: None,
            peer_roots: None,
            peer_crls: None,
            contacts: None,
        }),
    );
    assert_eq!(
        frames_to(&out, 1)[0].payload,
        Payload::HeartbeatAck(Heartbeat {
            nonce: 41,
            crl_version: Some(0),
            presence: None,
            peer_roots: None,
            peer_crls: None,
            contacts: None,
        })
    );
}

#[test]
fn a_new_session_replaces_the_old_one_of_the_same_device() {
    let mut h = Harness::new();
    h.connect(1, alice());
    let out = h.connect(2, alice());
    assert_eq!(goodbye_code(&out, 1), Some(ErrorCode::SessionReplaced));
    assert!(closed(&out, 1));
}

// ---- sequencing and delivery ----

/// The `SendAck`s and `sender_out_of_order` refusals and holds to `conn`, as (message byte,
/// seq or the byte of the message the gateway says comes last).
fn send_answers(outputs: &[GatewayOutput], conn: u64) -> Vec<(&'static str, u8, u64)> {
    frames_to(outputs, conn)
        .into_iter()
        .filter_map(|f| match f.payload {
            Payload::SendAck(a) => Some(("ack", a.msg_id[0], f.routing.seq)),
            Payload::Error(e) if e.code == ErrorCode::SenderOutOfOrder as u16 => Some((
                if e.held == Some(true) {
                    "held"
                } else {
                    "out of order"
                },
                e.msg_id.unwrap()[0],
                u64::from(e.after.unwrap()[0]),
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn a_device_s_messages_are_sequenced_only_in_the_order_it_chained_them() {
    let mut h = Harness::new();
    h.connect(1, alice());
    // 2 comes after 1, which has not arrived (lost or overtaken): held, and the device told
    // so once, naming "none yet" as its last sequenced.
    let out = h.send_after(1, alice(), 2, 1, b"second");
    assert_eq!(send_answers(&out, 1), vec![("held", 2, 0)]);
    let out = h.send_after(1, alice(), 2, 1, b"second");
    assert_eq!(
        send_answers(&out, 1),
        vec![],
        "a copy of a held message: nothing more said"
    );
    assert_eq!(
        h.gateway.conversation_head(CONV),
        Some(0),
        "nothing sequenced yet"
    );
    // 1 comes: both are sequenced, in the order the device chained them.
    let out = h.send_after(1, alice(), 1, 0, b"first");
    assert_eq!(send_answers(&out, 1), vec![("ack", 1, 1), ("ack", 2, 2)]);
    let out = h.send_after(1, alice(), 2, 1, b"second");
    assert_eq!(send_answers(&out, 1), vec![("ack", 2, 2)]);
    // A copy of 1 is a duplicate whatever it names: its original seq.
    let out = h.send_after(1, alice(), 1, 9, b"first");
    assert_eq!(send_answers(&out, 1), vec![("ack", 1, 1)]);
    // Another device's chain is its own.
    h.connect(2, bob());
    let out = h.send_after(2, bob(), 7, 0, b"bob");
    assert_eq!(send_answers(&out, 2), vec![("ack", 7, 3)]);
    // The last survives a restart: a stale chain is refused, the right one taken.
    let mut h = h.restarted(open_config());
    h.connect(3, alice());
    let out = h.send_after(3, alice(), 4, 1, b"stale chain");
    assert_eq!(send_answers(&out, 3), vec![("out of order", 4, 2)]);
    let out = h.send_after(3, alice(), 4, 2, b"third");
    assert_eq!(send_answers(&out, 3), vec![("ack", 4, 4)]);
    assert_eq!(
        h.gateway.stats().delivery.out_of_sender_order,
        1,
        "counted since the restart"
    );
}

#[test]
fn a_chain_held_across_two_gaps_comes_out_whole_once_each_gap_fills() {
    let mut h = Harness::new();
    h.connect(1, alice());
    // 1 and 4 lost on the way: 2, 3, 5, 6 arrive.
    let mut told = Vec::new();
    for (id, after) in [(2, 1), (3, 2), (5, 4), (6, 5)] {
        told.extend(send_answers(&h.send_after(1, alice(), id, after, b"m"), 1));
    }
    assert_eq!(told, vec![("held", 2, 0), ("held", 5, 0)], "once per gap");
    let out = h.send_after(1, alice(), 1, 0, b"m");
    assert_eq!(
        send_answers(&out, 1),
        vec![("ack", 1, 1), ("ack", 2, 2), ("ack", 3, 3)]
    );
    let out = h.send_after(1, alice(), 4, 3, b"m");
    assert_eq!(
        send_answers(&out, 1),
        vec![("ack", 4, 4), ("ack", 5, 5), ("ack", 6, 6)]
    );
    let held = h.gateway.stats().held_sends;
    assert_eq!((held.held, held.gaps_told, held.taken), (4, 2, 4));
}

#[test]
fn a_message_that_names_one_sequenced_before_the_last_is_refused_not_held() {
    let mut h = Harness::new();
    h.connect(1, alice());
    h.send_after(1, alice(), 1, 0, b"m");
    h.send_after(1, alice(), 2, 1, b"m");
    // The device forgot 2 (it crashed before writing its acknowledgement): behind, not ahead.
    let out = h.send_after(1, alice(), 3, 1, b"m");
    assert_eq!(send_answers(&out, 1), vec![("out of order", 3, 2)]);
    // Its first message ever, while the gateway has sequenced others of it: refused too.
    let out = h.send_after(1, alice(), 4, 0, b"m");
    assert_eq!(send_answers(&out, 1), vec![("out of order", 4, 2)]);
    assert_eq!(h.gateway.stats().held_sends.held, 0);
}

#[test]
fn what_is_held_behind_a_refused_message_is_let_go_and_its_device_told_to_send_again() {
    let mut h = Harness::with_config(limited_config(Rate::per_second(4, 1)));
    h.connect(1, alice());
    h.send_after(1, alice(), 1, 0, b"m");
    // 2 is on its way; 3 and 4 overtake it.
    assert_eq!(
        send_answers(&h.send_after(1, alice(), 3, 2, b"m"), 1),
        vec![("held", 3, 1)]
    );
    h.send_after(1, alice(), 4, 3, b"m");
    // 2 comes past the send limit: refused, and 3 can no longer come in order.
    let out = h.send_after(1, alice(), 2, 1, b"m");
    assert_eq!(
        limit_refusal(&out, 1).map(|r| (r.0, r.1)),
        Some((ErrorCode::SendsLimited, 2))
    );
    assert_eq!(send_answers(&out, 1), vec![("out of order", 3, 1)]);
    assert_eq!(h.gateway.stats().held_sends.let_go, 2);
    assert_eq!(h.gateway.conversation_head(CONV), Some(1));
    // After the hint, the device sends what waits again, in order.
    h.now = h.now + Duration::from_millis(250);
    assert_eq!(
        send_answers(&h.send_after(1, alice(), 2, 1, b"m"), 1),
        vec![("ack", 2, 2)]
    );
}

#[test]
fn a_session_that_ends_takes_its_held_messages_with_it() {
    let mut h = Harness::new();
    h.connect(1, alice());
    h.send_after(1, alice(), 2, 1, b"m");
    h.input(GatewayInput::Closed(ConnectionId(1)));
    assert_eq!(h.gateway.stats().held_sends.let_go, 1);
    // On the next session, 1 alone is sequenced: 2 was not kept (the device sends it again).
    h.connect(2, alice());
    let out = h.send_after(2, alice(), 1, 0, b"m");
    assert_eq!(send_answers(&out, 2), vec![("ack", 1, 1)]);
    assert_eq!(h.gateway.conversation_head(CONV), Some(1));
}

#[test]
fn no_more_than_the_bound_is_held_per_sender() {
    use sund_model::gateway::held_sends::HELD_PER_SENDER_MAX;
    let mut h = Harness::new();
    h.connect(1, alice());
    let mut told = Vec::new();
    // 1 lost; 2..=HELD_PER_SENDER_MAX+2 arrive, each after the one before.
    let last = u8::try_from(HELD_PER_SENDER_MAX + 2).unwrap();
    for id in 2..=last {
        told.extend(send_answers(&h.send_after(1, alice(), id, id - 1, b"m"), 1));
    }
    assert_eq!(told.first(), Some(&("held", 2, 0)));
    assert_eq!(told.last(), Some(&("out of order", last, 0)));
    assert_eq!(told.len(), 2);
    let held = h.gateway.stats().held_sends;
    assert_eq!(held.full, 1);
    // Refused, the last lets go of what was held (the device sends everything again, as
    // told): nothing is held past the refusal.
    assert_eq!(held.let_go, HELD_PER_SENDER_MAX as u64);
    let out = h.send_after(1, alice(), 1, 0, b"m");
    assert_eq!(send_answers(&out, 1), vec![("ack", 1, 1)]);
    for id in 2..=last {
        let out = h.send_after(1, alice(), id, id - 1, b"m");
        assert_eq!(send_answers(&out, 1), vec![("ack", id, u64::from(id))]);
    }
}

/// A `Send` frame of alice's in `CONV` that comes after `after` (0: none; `None`: unchained,
/// as a group operation is).
fn alice_send(msg_id: u8, after: Option<u8>) -> GatewayInput {
    let routing = Routing {
        conversation: CONV,
        sender: alice(),
        ..Routing::default()
    };
    let payload = Payload::Send(Send {
        msg_id: [msg_id; 16],
        body: vec![msg_id],
        welcome: None,
        after: after.map(|a| if a == 0 { [0; 16] } else { [a; 16] }),
    });
    GatewayInput::Frame(ConnectionId(1), Frame::new(routing, payload).encode())
}

/// The sender-order rows a Ready writes (their values).
fn sender_order_rows(ready: &sund_model::env::Ready<GatewayOutput>) -> Vec<Vec<u8>> {
    ready
        .writes()
        .ops()
        .iter()
        .filter_map(|op| match op {
            sund_model::env::WriteOp::Put { table, value, .. }
                if *table == sund_model::gateway::sender_order::SENDER_ORDER_TABLE =>
            {
                Some(value.to_vec())
            }
            _ => None,
        })
        .collect()
}

/// Feeds `inputs` as a driver does (every frame a read brought, then one Ready), commits the
/// Ready and returns its sender-order rows and released outputs.
fn one_batch(h: &mut Harness, inputs: Vec<GatewayInput>) -> (Vec<Vec<u8>>, Vec<GatewayOutput>) {
    for input in inputs {
        h.gateway.handle(h.now, input);
    }
    let ready = h.gateway.poll_ready().expect("something to commit");
    let rows = sender_order_rows(&ready);
    let released = ready.commit(&mut h.store).unwrap();
    assert!(h.gateway.poll_ready().is_none(), "one Ready per batch");
    (rows, released)
}

#[test]
fn sender_order_is_written_only_when_the_log_cannot_tell_it_and_survives_restarts() {
    let mut h = Harness::new();
    h.connect(1, alice());
    h.connect(2, bob());
    // Chained messages: the log entries are the record, no row is written.
    let sends = vec![
        alice_send(1, Some(0)),
        alice_send(2, Some(1)),
        alice_send(3, Some(2)),
    ];
    let (rows, released) = one_batch(&mut h, sends);
    assert_eq!(rows, Vec::<Vec<u8>>::new());
    assert_eq!(send_answers(&released, 1).len(), 3);
    let mut h = h.restarted(open_config());
    h.connect(1, alice());
    h.connect(2, bob());
    let out = h.send_after(1, alice(), 4, 2, b"stale chain");
    assert_eq!(send_answers(&out, 1), vec![("out of order", 4, 3)]);
    // Garbage collection drops alice's entries: a row keeps her last.
    h.ack(1, 3);
    h.ack(2, 3);
    h.now = h.now + Duration::from_secs(1);
    h.gateway.handle_timeout(h.now);
    let ready = h.gateway.poll_ready().expect("a GC step");
    let mut row = vec![3; 16];
    row.extend_from_slice(&3u64.to_be_bytes());
    assert_eq!(sender_order_rows(&ready), vec![row]);
    ready.commit(&mut h.store).unwrap();
    assert_eq!(h.gateway.stats().delivery.gc_dropped, 3);
    let mut h = h.restarted(open_config());
    h.connect(1, alice());
    let out = h.send_after(1, alice(), 4, 2, b"stale chain");
    assert_eq!(send_answers(&out, 1), vec![("out of order", 4, 3)]);
    let (rows, released) = one_batch(&mut h, vec![alice_send(4, Some(3))]);
    assert!(rows.is_empty());
    assert_eq!(send_answers(&released, 1), vec![("ack", 4, 4)]);
    // An unchained message (a group operation) is never taken for her last: it writes a row.
    let (rows, _) = one_batch(&mut h, vec![alice_send(5, None), alice_send(6, Some(4))]);
    let mut row = vec![6; 16];
    row.extend_from_slice(&5u64.to_be_bytes());
    assert_eq!(rows, vec![row], "once, with the newest values");
    let mut h = h.restarted(open_config());
    h.connect(1, alice());
    let out = h.send_after(1, alice(), 7, 5, b"after the unchained one");
    assert_eq!(send_answers(&out, 1), vec![("out of order", 7, 6)]);
    let out = h.send_after(1, alice(), 7, 6, b"seventh");
    assert_eq!(send_answers(&out, 1), vec![("ack", 7, 7)]);
}

#[test]
fn a_message_is_acknowledged_only_in_the_ready_that_persists_it() {
    let mut h = Harness::new();
    h.connect(1, alice());
    h.connect(2, bob());
    let routing = Routing {
        conversation: CONV,
        sender: alice(),
        ..Routing::default()
    };
    let frame = Frame::new(
        routing,
        Payload::Send(Send {
            msg_id: [9; 16],
            body: b"hi".to_vec(),
            welcome: None,
            after: Some([0; 16]),
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
        !ready.writes().is_empty(),
        "the log entry is written in the same batch as the ack"
    );
    let outputs = ready.commit(&mut h.store).unwrap();
    let acks = frames_to(&outputs, 1);
    assert!(matches!(acks[0].payload, Payload::SendAck(a) if a.msg_id == [9; 16]));
    assert_eq!(acks[0].routing.seq, 1);
    let delivered = frames_to(&outputs, 2);
    assert!(matches!(&delivered[0].payload, Payload::Deliver(d) if d.body == b"hi"));
    assert_eq!(delivered[0].routing.sender, alice());
}

#[test]
fn a_retried_send_gets_the_original_seq_and_is_not_sequenced_again() {
    let mut h = Harness::new();
    h.connect(1, alice());
    h.send(1, alice(), 1, b"a");
    h.send(1, alice(), 2, b"b");
    let out = h.send(1, alice(), 1, b"a");
    assert_eq!(frames_to(&out, 1)[0].routing.seq, 1);
    assert_eq!(h.gateway.conversation_head(CONV), Some(2));
    assert_eq!(h.gateway.stats().delivery.duplicates, 1);
}

#[test]
fn a_non_member_is_refused_with_the_message_id() {
    let mut h = Harness::new();
    h.connect(1, mallory());
    let out = h.send(1, mallory(), 5, b"spam");
    let Payload::Error(report) = &frames_to(&out, 1)[0].payload else {
        panic!("expected an error")
    };
    assert_eq!(ErrorCode::from_u16(report.code), ErrorCode::NotMember);
    assert_eq!(report.msg_id, Some([5; 16]));
    assert_eq!(h.gateway.conversation_head(CONV), Some(0));
}

/// Found by fuzzing the gateway's inputs (corpus/gateway_inputs/crash-de0c5053…): a message
/// under the all-zeros id, which sender order reserves for "no message", crashed the gateway.
#[test]
fn a_message_with_the_reserved_all_zeros_id_is_refused_and_the_gateway_goes_on() {
    let mut h = Harness::new();
    h.connect(1, alice());
    let out = h.send_after(1, alice(), 0, 0, b"zero");
    let Payload::Error(report) = &frames_to(&out, 1)[0].payload else {
        panic!("expected an error")
    };
    assert_eq!(ErrorCode::from_u16(report.code), ErrorCode::MalformedFrame);
    assert!(report.message.contains("reserved"), "{}", report.message);
    assert_eq!(h.gateway.conversation_head(CONV), Some(0));
    let out = h.send(1, alice(), 1, b"next");
    assert!(frames_to(&out, 1)
        .iter()
        .any(|f| matches!(f.payload, Payload::SendAck(_))));
}

#[test]
fn malformed_and_oversized_frames_close_only_their_own_session() {
    let mut h = Harness::new();
    h.connect(1, alice());
    h.connect(2, bob());
    h.connect(3, mallory());
    let out = h.input(GatewayInput::Frame(
        ConnectionId(2),
        Bytes::from_static(b"not a sund frame at all"),
    ));
    assert_eq!(goodbye_code(&out, 2), Some(ErrorCode::MalformedFrame));
    assert!(closed(&out, 2));

    let mut unknown = Frame::new(
        Routing::default(),
        Payload::Heartbeat(Heartbeat {
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
    unknown[6..8].copy_from_slice(&0x7777u16.to_be_bytes());
    let out = h.input(GatewayInput::Frame(ConnectionId(3), Bytes::from(unknown)));
    assert_eq!(goodbye_code(&out, 3), Some(ErrorCode::MalformedFrame));

    let mut oversized = Frame::new(
        Routing::default(),
        Payload::Heartbeat(Heartbeat {
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
    oversized[8..12].copy_from_slice(&(PAYLOAD_BYTES_MAX + 1).to_be_bytes());
    h.connect(4, mallory());
    let out = h.input(GatewayInput::Frame(ConnectionId(4), Bytes::from(oversized)));
    assert_eq!(goodbye_code(&out, 4), Some(ErrorCode::MalformedFrame));

    // Alice's session is untouched.
    let out = h.send(1, alice(), 1, b"still here");
    assert!(matches!(frames_to(&out, 1)[0].payload, Payload::SendAck(_)));
    assert_eq!(
        h.gateway
            .stats()
            .refusals
            .get(sund_model::wire::payload::ErrorCode::MalformedFrame),
        3
    );
}

#[test]
fn resume_replays_everything_after_the_presented_cursor_in_order() {
    let mut h = Harness::new();
    h.connect(1, alice());
    // Bob had a session before, in which he read up to seq 2.
    h.connect(3, bob());
    for i in 1..=5 {
        h.send(1, alice(), i, &[i]);
    }
    let out = h.connect_with(2, bob(), vec![Cursor::new(CONV, 2)]);
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
    h.connect(1, alice());
    h.connect(2, bob());
    h.send(1, alice(), 1, b"x");
    h.send(1, alice(), 2, b"y");
    // Bob acknowledges nothing: after redeliver_after the window rewinds.
    h.now = h.now + Duration::from_secs(3);
    h.frame(
        2,
        Routing::default(),
        Payload::Heartbeat(Heartbeat {
            nonce: 1,
            crl_version: None,
            presence: None,
            peer_roots: None,
            peer_crls: None,
            contacts: None,
        }),
    );
    h.gateway.handle_timeout(h.now);
    let out = h.drain();
    let seqs: Vec<u64> = frames_to(&out, 2).iter().map(|f| f.routing.seq).collect();
    assert_eq!(seqs, vec![1, 2]);
    let stalled = h.gateway.stats().delivery;
    assert_eq!(stalled.replays, 0, "a stall is not a replay request");
    // Alice (who did not acknowledge her echoes either) and bob: two windows of two.
    assert_eq!(stalled.replayed, 4, "{stalled:?}");
    // Bob acknowledges 1, then asks for 2 again.
    h.ack(2, 1);
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
    assert_eq!(h.gateway.cursor(bob(), CONV), 1);
    // Counted for the metrics: one replay request, of one message.
    let stats = h.gateway.stats().delivery;
    assert_eq!(stats.replays, 1);
    assert_eq!(stats.replayed, stalled.replayed + 1);
}

// ---- storage ----

#[test]
fn recovery_restores_log_members_and_cursors_from_the_store() {
    let mut h = Harness::new();
    h.connect(1, alice());
    h.connect(2, bob());
    h.send(1, alice(), 1, b"one");
    h.send(1, alice(), 2, b"two");
    h.ack(2, 2);
    let recovered = h.restarted(GatewayConfig::default()).gateway;
    assert_eq!(recovered.conversation_head(CONV), Some(2));
    assert_eq!(recovered.cursor(bob(), CONV), 2);
    let log = recovered.conversations().next().unwrap();
    assert!(log.is_member(alice()) && log.is_member(bob()) && !log.is_member(mallory()));
    assert_eq!(&log.get(2).unwrap().body[..], b"two");
}

#[test]
fn a_corrupt_store_is_an_error_on_recovery() {
    let mut store = MemStore::default();
    let mut batch = sund_model::env::WriteBatch::default();
    batch.put(
        sund_model::gateway::sequencer::LOG_TABLE,
        vec![1, 2, 3],
        vec![4],
    );
    store.commit(batch).unwrap();
    let err = Gateway::recover(
        GatewayConfig::default(),
        Instant(0),
        &store,
        Box::new(Counter(1)),
    )
    .unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
}

#[test]
fn acknowledged_messages_are_collected_and_the_head_survives_recovery() {
    let mut h = Harness::new();
    h.connect(1, alice());
    h.connect(2, bob());
    for i in 1..=4 {
        h.send(1, alice(), i, &[i]);
    }
    h.ack(1, 4);
    h.ack(2, 4);
    h.now = h.now + Duration::from_secs(1);
    h.gateway.handle_timeout(h.now);
    h.drain();
    assert_eq!(h.gateway.stats().delivery.gc_dropped, 4);
    let log = h.gateway.conversations().next().unwrap();
    assert_eq!((log.first_seq(), log.head(), log.retained()), (5, 4, 0));
    let recovered = h.restarted(open_config()).gateway;
    assert_eq!(
        recovered.conversation_head(CONV),
        Some(4),
        "an empty log still knows its head"
    );
    // A retry of a collected message still gets its original seq.
    let out = h.send(1, alice(), 2, &[2]);
    assert_eq!(frames_to(&out, 1)[0].routing.seq, 2);
}

#[test]
fn a_gc_backlog_is_worked_off_in_small_steps_ahead_of_the_tick() {
    let config = GatewayConfig {
        gc_batch_max: 3,
        gc_backlog_interval: Duration::from_millis(5),
        ..open_config()
    };
    let mut h = Harness::with_config(config.clone());
    h.connect(1, alice());
    h.connect(2, bob());
    for i in 1..=8 {
        h.send(1, alice(), i, &[i]);
    }
    h.ack(1, 8);
    h.ack(2, 8);
    h.now = h.now + config.tick_interval;
    h.gateway.handle_timeout(h.now);
    h.drain();
    assert_eq!(h.gateway.stats().delivery.gc_dropped, 3, "one bounded step");
    assert_eq!(
        h.gateway.poll_timeout(),
        h.now + config.gc_backlog_interval,
        "more is waiting, so the next step comes before the tick"
    );
    let mut steps = 1;
    while h.gateway.stats().delivery.gc_dropped < 8 {
        h.now = h.gateway.poll_timeout();
        h.gateway.handle_timeout(h.now);
        let writes: usize = std::iter::from_fn(|| h.gateway.poll_ready())
            .map(|r| {
                let n = r.writes().len();
                r.commit(&mut h.store).unwrap();
                n
            })
            .sum();
        assert!(
            writes <= 2 * 3 + 2,
            "a step writes at most its bound: {writes}"
        );
        steps += 1;
        assert!(steps <= 3, "8 entries take 3 steps of 3");
    }
    // The last step (2 of 3) took everything: back to the tick.
    assert!(h.gateway.poll_timeout() > h.now + config.gc_backlog_interval);
    assert_eq!(h.gateway.stats().delivery.gc_dropped, 8);
}

#[test]
fn a_resume_from_before_the_retained_log_gets_replay_window_exceeded() {
    let mut h = Harness::with_config(GatewayConfig {
        retention_max: Duration::from_secs(10),
        ..open_config()
    });
    h.connect(1, alice());
    for i in 1..=3 {
        h.send(1, alice(), i, &[i]);
    }
    h.now = h.now + Duration::from_secs(11);
    h.send(1, alice(), 4, &[4]);
    h.gateway.handle_timeout(h.now);
    h.drain();
    // Bob was never online: 1..=3 expired unacknowledged.
    let frames = frames_to(&h.connect(2, bob()), 2);
    assert_eq!(
        error_code(&frames[2]),
        Some(ErrorCode::ReplayWindowExceeded),
        "{frames:?}"
    );
    assert_eq!(
        (frames[2].routing.conversation, frames[2].routing.seq),
        (CONV, 4)
    );
    assert!(matches!(frames[3].payload, Payload::Deliver(_)));
    assert_eq!(frames[3].routing.seq, 4);
    assert_eq!(h.gateway.stats().delivery.replay_window_exceeded, 1);
}

/// Regression (spotted while writing the `gateway_inputs` fuzz target): creating a conversation
/// with no members panicked.
#[test]
fn creating_a_conversation_without_members_creates_nothing() {
    let mut h = Harness::new();
    let empty = ConversationId(5);
    h.input(support::admin(AdminCommand::CreateConversation(
        empty,
        vec![],
    )));
    assert_eq!(h.gateway.conversation_head(empty), None);
    assert_eq!(
        h.restarted(open_config()).gateway.conversation_head(empty),
        None
    );
}

/// Regression (found by `sund demo` with a room an operator made while its member was
/// online): a device added to a plain conversation during its session got nothing of it until
/// its next session.
#[test]
fn a_device_added_to_a_conversation_while_online_reads_it_at_once() {
    let mut h = Harness::new();
    h.connect(1, alice());
    h.connect(3, mallory());
    h.send(1, alice(), 1, b"before");
    let out = h.input(support::admin(AdminCommand::CreateConversation(
        CONV,
        vec![mallory()],
    )));
    let seqs = |out: &[GatewayOutput]| -> Vec<u64> {
        frames_to(out, 3)
            .iter()
            .filter(|f| matches!(f.payload, Payload::Deliver(_)) && f.routing.conversation == CONV)
            .map(|f| f.routing.seq)
            .collect()
    };
    assert_eq!(seqs(&out), [1], "what the conversation holds, at once");
    assert_eq!(seqs(&h.send(1, alice(), 2, b"after")), [2]);
    // A conversation new since the session opened, too.
    let new = ConversationId(0x0A);
    h.input(support::admin(AdminCommand::CreateConversation(
        new,
        vec![alice(), mallory()],
    )));
    let routing = Routing {
        conversation: new,
        sender: mallory(),
        ..Routing::default()
    };
    let send = Payload::Send(Send {
        msg_id: [3; 16],
        body: b"in the new one".to_vec(),
        welcome: None,
        after: Some([0; 16]),
    });
    let sent = h.frame(3, routing, send);
    let to_alice = frames_to(&sent, 1);
    assert!(
        to_alice
            .iter()
            .any(|f| matches!(f.payload, Payload::Deliver(_)) && f.routing.conversation == new),
        "{to_alice:?}"
    );
}

#[test]
fn after_collection_and_more_sends_recovery_keeps_head_and_deduplication() {
    let mut h = Harness::new();
    h.connect(1, alice());
    h.connect(2, bob());
    for i in 1..=3 {
        h.send(1, alice(), i, &[i]);
    }
    h.ack(1, 3);
    h.ack(2, 3);
    h.now = h.now + Duration::from_secs(1);
    h.gateway.handle_timeout(h.now);
    h.drain();
    for i in 4..=6 {
        h.send(1, alice(), i, &[i]);
    }
    let mut h2 = h.restarted(open_config());
    assert_eq!(h2.gateway.conversation_head(CONV), Some(6));
    let log = h2.gateway.conversations().next().unwrap();
    assert_eq!((log.first_seq(), log.retained()), (4, 3));
    h2.connect(3, alice());
    // A retry of a collected message and of a retained one both get their original seqs.
    assert_eq!(
        frames_to(&h2.send(3, alice(), 2, &[2]), 3)[0].routing.seq,
        2
    );
    assert_eq!(
        frames_to(&h2.send(3, alice(), 5, &[5]), 3)[0].routing.seq,
        5
    );
    assert_eq!(
        frames_to(&h2.send(3, alice(), 7, &[7]), 3)[0].routing.seq,
        7
    );
}

// ---- KeyPackage directory ----

fn alice_user() -> UserId {
    UserId::of("alice", "localhost")
}
fn bob_user() -> UserId {
    UserId::of("bob", "localhost")
}

/// Real KeyPackages of `device`, made with Sund's MLS provider.
fn key_packages(device: DeviceId, n: usize, last_resort: bool) -> KeyPackageUpload {
    use sund_model::mls::{key_packages, LifetimePolicy, MlsProvider, MlsStorage, Randomness};
    let provider = MlsProvider::new(
        Box::new(Counter(device.0 as u64)),
        Randomness::Simulation,
        MlsStorage::new(),
    );
    let signer = provider.new_signer().unwrap();
    let (packages, last) = key_packages::generate(
        &provider,
        &signer,
        &device.to_bytes(),
        LifetimePolicy::Unbounded,
        Instant(0),
        n,
        last_resort,
    )
    .unwrap();
    KeyPackageUpload {
        packages: packages.into_iter().map(|p| p.to_vec().into()).collect(),
        last_resort: last.map(|p| p.to_vec().into()),
    }
}

impl Harness {
    fn upload(&mut self, conn: u64, upload: KeyPackageUpload) -> Vec<Frame> {
        let out = self.frame(conn, Routing::default(), Payload::KeyPackageUpload(upload));
        frames_to(&out, conn)
    }

    fn fetch(&mut self, conn: u64, users: &[UserId]) -> Vec<GatewayOutput> {
        let fetch = KeyPackageFetch {
            users: users.iter().map(|u| u.to_bytes().into()).collect(),
            domain: None,
        };
        self.frame(conn, Routing::default(), Payload::KeyPackageFetch(fetch))
    }
}

fn answer(frames: &[Frame]) -> KeyPackages {
    frames
        .iter()
        .find_map(|f| match &f.payload {
            Payload::KeyPackages(k) => Some(k.clone()),
            _ => None,
        })
        .expect("a KeyPackages answer")
}

fn count(frames: &[Frame]) -> Option<KeyPackageCount> {
    frames.iter().find_map(|f| match f.payload {
        Payload::KeyPackageCount(c) => Some(c),
        _ => None,
    })
}

/// Alice (laptop on 1, phone on 2) and Bob (on 3), each with a pool.
fn directory_harness() -> Harness {
    let mut h = Harness::new();
    h.connect_as(1, alice(), alice_user());
    h.connect_as(2, alice_phone(), alice_user());
    h.connect_as(3, bob(), bob_user());
    for (conn, device) in [(1, alice()), (2, alice_phone()), (3, bob())] {
        let frames = h.upload(conn, key_packages(device, 3, true));
        assert_eq!(count(&frames).unwrap().remaining, 3, "{frames:?}");
    }
    h
}

#[test]
fn a_fetch_returns_one_package_per_device_of_each_user_but_never_the_requester() {
    let mut h = directory_harness();
    let got = answer(&frames_to(&h.fetch(1, &[bob_user(), alice_user()]), 1));
    let devices: Vec<DeviceId> = got
        .found
        .iter()
        .map(|k| DeviceId::from_bytes(*k.device))
        .collect();
    assert_eq!(devices, vec![bob(), alice_phone()]);
    assert!(got.exhausted.is_empty());
    assert!(got.found.iter().all(|k| !k.last_resort));
    assert_eq!(h.gateway.key_packages_left(bob()), 2);
    assert_eq!(
        h.gateway.key_packages_left(alice()),
        3,
        "the requester's own pool is untouched"
    );
    let users: Vec<UserId> = got
        .found
        .iter()
        .map(|k| UserId::from_bytes(*k.user))
        .collect();
    assert_eq!(users, vec![bob_user(), alice_user()]);
}

#[test]
fn packages_are_never_handed_out_twice_then_the_last_resort_is_marked() {
    let mut h = directory_harness();
    let mut seen = Vec::new();
    for _ in 0..5 {
        let got = answer(&frames_to(&h.fetch(1, &[bob_user()]), 1));
        assert_eq!(got.found.len(), 1);
        seen.push((got.found[0].package.to_vec(), got.found[0].last_resort));
    }
    let one_time: Vec<_> = seen.iter().filter(|(_, lr)| !lr).map(|(p, _)| p).collect();
    assert_eq!(one_time.len(), 3);
    assert!(one_time[0] != one_time[1] && one_time[1] != one_time[2] && one_time[0] != one_time[2]);
    assert!(seen[3].1 && seen[4].1, "then the last resort, marked");
    assert_eq!(seen[3].0, seen[4].0);
}

#[test]
fn exhaustion_degrades_to_the_devices_that_have_packages() {
    let mut h = Harness::new();
    h.connect_as(1, alice(), alice_user());
    h.connect_as(2, alice_phone(), alice_user());
    h.connect_as(3, bob(), bob_user());
    h.upload(2, key_packages(alice_phone(), 1, false));
    let got = answer(&frames_to(&h.fetch(3, &[alice_user()]), 3));
    assert_eq!(got.found.len(), 1);
    assert_eq!(DeviceId::from_bytes(*got.found[0].device), alice_phone());
    assert_eq!(got.exhausted.len(), 1);
    assert_eq!(DeviceId::from_bytes(*got.exhausted[0]), alice());
    let again = answer(&frames_to(&h.fetch(3, &[alice_user()]), 3));
    assert!(again.found.is_empty());
    assert_eq!(
        again.exhausted.len(),
        2,
        "everyone exhausted, still a clear answer"
    );
}

#[test]
fn the_owner_online_is_told_to_replenish_when_its_pool_runs_low() {
    let mut h = directory_harness();
    // The threshold is 10: every fetch leaves Bob below it, so Bob hears his count.
    let out = h.fetch(1, &[bob_user()]);
    let to_bob = count(&frames_to(&out, 3)).expect("a count pushed to bob");
    assert_eq!(to_bob.remaining, 2);
    assert!(to_bob.last_resort);
    assert_eq!(to_bob.replenish_below, 10);
}

#[test]
fn invalid_or_foreign_packages_are_refused_and_nothing_is_stored() {
    let mut h = directory_harness();
    let garbage = KeyPackageUpload {
        packages: vec![b"not a key package".to_vec().into()],
        last_resort: None,
    };
    let frames = h.upload(1, garbage);
    assert_eq!(error_code(&frames[0]), Some(ErrorCode::KeyPackageRejected));
    // Bob's packages uploaded by Alice: the credential names another device.
    let frames = h.upload(1, key_packages(bob(), 1, false));
    assert_eq!(error_code(&frames[0]), Some(ErrorCode::KeyPackageRejected));
    let Payload::Error(report) = &frames[0].payload else {
        panic!()
    };
    assert!(
        report.message.contains("another device"),
        "{}",
        report.message
    );
    assert_eq!(h.gateway.key_packages_left(alice()), 3);
    assert_eq!(
        h.gateway
            .stats()
            .refusals
            .get(sund_model::wire::payload::ErrorCode::KeyPackageRejected),
        2
    );
}

#[test]
fn fetches_beyond_the_burst_are_rate_limited_per_requester() {
    let mut h = directory_harness();
    for _ in 0..20 {
        answer(&frames_to(
            &h.fetch(1, &[UserId::of("nobody", "localhost")]),
            1,
        ));
    }
    let frames = frames_to(&h.fetch(1, &[bob_user()]), 1);
    assert_eq!(error_code(&frames[0]), Some(ErrorCode::RateLimited));
    assert_eq!(
        h.gateway.key_packages_left(bob()),
        3,
        "a refused fetch takes nothing"
    );
    // Bob's own budget is separate.
    answer(&frames_to(&h.fetch(3, &[alice_user()]), 3));
    h.now = h.now + Duration::from_secs(3);
    answer(&frames_to(&h.fetch(1, &[bob_user()]), 1));
}

#[test]
fn a_device_bound_to_one_user_cannot_claim_another() {
    let mut h = directory_harness();
    h.input(GatewayInput::Closed(ConnectionId(3)));
    // Bob's certificate names Bob: the hello claiming Alice is refused before any challenge.
    h.input(GatewayInput::Accepted(ConnectionId(4)));
    let out = h.hello_as(4, bob(), vec![], None, Some(alice_user()));
    let frames = frames_to(&out, 4);
    assert!(matches!(
        &frames[0].payload,
        Payload::Goodbye(g) if ErrorCode::from_u16(g.code) == ErrorCode::UserMismatch
    ));
    assert_eq!(h.gateway.devices_of(alice_user()).count(), 2);
}

#[test]
fn pools_and_user_bindings_survive_a_restart() {
    let mut h = directory_harness();
    answer(&frames_to(&h.fetch(1, &[bob_user()]), 1));
    let mut back = h.restarted(open_config());
    assert_eq!(back.gateway.key_packages_left(bob()), 2);
    assert_eq!(back.gateway.devices_of(alice_user()).count(), 2);
    back.connect(1, alice());
    let got = answer(&frames_to(&back.fetch(1, &[bob_user()]), 1));
    assert_eq!(got.found.len(), 1);
    assert!(!got.found[0].last_resort);
}

// ---- a disk that lost writes it had reported durable ----

/// The operator outputs that report lost history.
/// What each finding among `outputs` was, and over which seqs.
fn found_ranges(outputs: &[GatewayOutput]) -> Vec<(HistoryKind, u64, u64)> {
    history(outputs)
        .iter()
        .map(|f| (f.kind, f.from, f.to))
        .collect()
}

fn history(outputs: &[GatewayOutput]) -> Vec<LostHistory> {
    outputs
        .iter()
        .filter_map(|o| match o {
            GatewayOutput::HistoryLost(h) => Some(*h),
            _ => None,
        })
        .collect()
}

/// Errors of `code` sent to `conn`, by the seq they name.
fn notices(outputs: &[GatewayOutput], conn: u64, code: ErrorCode) -> Vec<u64> {
    frames_to(outputs, conn)
        .into_iter()
        .filter(|f| error_code(f) == Some(code))
        .map(|f| f.routing.seq)
        .collect()
}

/// Alice sent seqs 1..=3 and read them; the gateway's disk kept only seq 1 (its fsync lied,
/// then it crashed): the recovered gateway, with bob connected at seq 1.
fn gateway_that_lost_seqs_2_and_3() -> Harness {
    let mut h = Harness::new();
    h.connect(1, alice());
    h.connect(2, bob());
    h.send(1, alice(), 1, b"one");
    h.ack(2, 1);
    let durable = h.store.clone();
    h.send(1, alice(), 2, b"two");
    h.send(1, alice(), 3, b"three");
    assert_eq!(h.gateway.conversation_head(CONV), Some(3));
    h.store = durable;
    let mut h = h.restarted(open_config());
    assert_eq!(
        h.gateway.conversation_head(CONV),
        Some(1),
        "seqs 2 and 3 are gone"
    );
    h.connect_with(2, bob(), vec![Cursor::new(CONV, 1)]);
    h
}

#[test]
fn a_cursor_beyond_the_head_marks_the_seqs_lost_and_tells_the_members_behind() {
    let mut h = gateway_that_lost_seqs_2_and_3();
    let read = Cursor::read(CONV, 3, Some(MsgId::from_bytes([3; 16])));
    let out = h.connect_with(3, alice(), vec![read]);
    let found = history(&out);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        (found[0].kind, found[0].device, found[0].from, found[0].to),
        (HistoryKind::Lost, alice(), 2, 3)
    );
    assert_eq!(
        notices(&out, 2, ErrorCode::HistoryLost),
        vec![4],
        "bob, waiting at seq 1, hears at once that 2..=3 are gone"
    );
    assert!(
        notices(&out, 3, ErrorCode::HistoryDiverged).is_empty(),
        "alice read nothing that was replaced"
    );
    // No seq alice read is given to another message.
    let out = h.send(2, bob(), 9, b"after");
    let ack = frames_to(&out, 2)
        .into_iter()
        .find(|f| matches!(f.payload, Payload::SendAck(_)))
        .expect("acknowledged");
    assert_eq!(ack.routing.seq, 4);
    // A second device showing the same cursor finds nothing new.
    let out = h.connect_with(4, alice(), vec![read]);
    assert!(history(&out).is_empty(), "{:?}", history(&out));
}

#[test]
fn a_device_that_read_seqs_given_to_other_messages_since_is_told_until_it_heard() {
    let mut h = gateway_that_lost_seqs_2_and_3();
    // Bob's message takes seq 2, which alice read as her own "two".
    h.send(2, bob(), 9, b"bob's");
    let read = Cursor::read(CONV, 3, Some(MsgId::from_bytes([3; 16])));
    let out = h.connect_with(3, alice(), vec![read]);
    let kinds: Vec<_> = found_ranges(&out);
    assert_eq!(
        kinds,
        vec![(HistoryKind::Lost, 3, 3), (HistoryKind::Diverged, 2, 2)]
    );
    assert_eq!(notices(&out, 3, ErrorCode::HistoryDiverged), vec![2]);
    let delivered = |out: &[GatewayOutput], conn| {
        frames_to(out, conn)
            .iter()
            .filter(|f| matches!(f.payload, Payload::Deliver(_)))
            .count()
    };
    assert_eq!(
        delivered(&out, 3),
        0,
        "the conversation waits behind the notice"
    );
    // The notice was lost with the connection: the next session hears it again (the
    // operator heard once).
    let out = h.connect_with(4, alice(), vec![read]);
    assert_eq!(notices(&out, 4, ErrorCode::HistoryDiverged), vec![2]);
    assert!(history(&out).is_empty(), "{:?}", history(&out));
    // Its acknowledgement answers the notice, and delivery goes on.
    h.ack(4, 3);
    let out = h.send(2, bob(), 10, b"more");
    assert_eq!(delivered(&out, 4), 1, "bob's next message, seq 4");
    let out = h.connect_with(5, alice(), vec![Cursor::new(CONV, 4)]);
    assert!(notices(&out, 5, ErrorCode::HistoryDiverged).is_empty());
}

/// The gateway restarted again (honestly) after the lossy crash, before alice came back: the
/// head it recovered this time is past what it lost, and still alice, whose last session was
/// before the loss, is told that bob's message took a seq she read. Bob, who read it in the
/// run that sequenced it, is not. Ten seeds of a 27,000-seed swarm (506537, 524733…) were
/// silent forks this way.
#[test]
fn a_device_away_while_the_gateway_restarted_twice_is_still_told_its_history_diverged() {
    let mut h = gateway_that_lost_seqs_2_and_3();
    h.send(2, bob(), 9, b"bob's");
    h.ack(2, 2);
    let mut h = h.restarted(open_config());
    assert_eq!(h.gateway.conversation_head(CONV), Some(2));
    let read = Cursor::read(CONV, 3, Some(MsgId::from_bytes([3; 16])));
    let out = h.connect_with(3, alice(), vec![read]);
    let kinds: Vec<_> = found_ranges(&out);
    assert_eq!(
        kinds,
        vec![(HistoryKind::Lost, 3, 3), (HistoryKind::Diverged, 2, 2)]
    );
    assert_eq!(notices(&out, 3, ErrorCode::HistoryDiverged), vec![2]);
    let bobs = Cursor::read(CONV, 2, Some(MsgId::from_bytes([9; 16])));
    let out = h.connect_with(4, bob(), vec![bobs]);
    assert!(history(&out).is_empty(), "{:?}", history(&out));
    assert!(notices(&out, 4, ErrorCode::HistoryDiverged).is_empty());
    // And again after one more restart: what alice was told stands, bob is still in step.
    let mut h = h.restarted(open_config());
    let out = h.connect_with(5, bob(), vec![bobs]);
    assert!(history(&out).is_empty(), "{:?}", history(&out));
    let out = h.connect_with(6, alice(), vec![read]);
    assert_eq!(notices(&out, 6, ErrorCode::HistoryDiverged), vec![2]);
}

#[test]
fn a_cursor_naming_another_message_than_the_one_at_its_seq_has_diverged() {
    let mut h = gateway_that_lost_seqs_2_and_3();
    h.send(2, bob(), 9, b"bob's");
    h.send(2, bob(), 10, b"bob's too");
    // Alice read her "two" at seq 2; the gateway now holds bob's message there.
    let read = Cursor::read(CONV, 2, Some(MsgId::from_bytes([2; 16])));
    let out = h.connect_with(3, alice(), vec![read]);
    assert_eq!(notices(&out, 3, ErrorCode::HistoryDiverged), vec![2]);
    // Bob read bob's message at seq 2: nothing to tell.
    let same = Cursor::read(CONV, 2, Some(MsgId::from_bytes([9; 16])));
    let out = h.connect_with(4, bob(), vec![same]);
    assert!(notices(&out, 4, ErrorCode::HistoryDiverged).is_empty());
}

/// Two lossy crashes in one lying spell: each run gave seq 3 to another message, and a device
/// read each. The first to come back marks 2..=3 lost and the placeholder keeps what it read
/// at 3; the second read something else there, so its history diverged, and it is told (two
/// untold devices would be a silent fork). Swarm seed 22782 of the plain family.
#[test]
fn two_devices_that_read_different_lost_messages_at_one_seq_are_not_both_left_untold() {
    let mut h = gateway_that_lost_seqs_2_and_3();
    let first = Cursor::read(CONV, 3, Some(MsgId::from_bytes([3; 16])));
    let out = h.connect_with(3, alice(), vec![first]);
    assert_eq!(
        history(&out).iter().map(|f| f.kind).collect::<Vec<_>>(),
        vec![HistoryKind::Lost]
    );
    assert!(notices(&out, 3, ErrorCode::HistoryDiverged).is_empty());
    let other = Cursor::read(CONV, 3, Some(MsgId::from_bytes([7; 16])));
    let out = h.connect_with(4, bob(), vec![other]);
    let found: Vec<_> = history(&out)
        .iter()
        .map(|f| (f.kind, f.device, f.to))
        .collect();
    assert_eq!(found, vec![(HistoryKind::Diverged, bob(), 3)]);
    assert_eq!(notices(&out, 4, ErrorCode::HistoryDiverged), vec![3]);
}

/// Alice, bob, mallory and alice's phone in `CONV` (the last two added by the operator);
/// seq 1 is durable and acknowledged by all, alice's 2 and 3 are sequenced after it. Returns
/// the harness and the store as it was before 2 and 3: what a lying disk gives back.
fn everyone_read_alices_two_and_three_that_the_disk_will_lose() -> (Harness, MemStore) {
    let mut h = Harness::new();
    h.input(support::admin(AdminCommand::CreateConversation(
        CONV,
        vec![mallory(), alice_phone()],
    )));
    h.connect(1, alice());
    h.connect(2, bob());
    h.connect(3, mallory());
    h.connect(4, alice_phone());
    h.send(1, alice(), 1, b"one");
    for conn in 2..=4 {
        h.ack(conn, 1);
    }
    let durable = h.store.clone();
    h.send(1, alice(), 2, b"two");
    h.send(1, alice(), 3, b"three");
    (h, durable)
}

/// Two lossy crashes in one lying spell, and the devices' cursors stop at different seqs:
/// bob read alice's 2 and 3 in the first run, carol read her own message at seq 2 in the
/// second. Bob comes back first and marks 2..=3 lost; the placeholders keep the run he read
/// them in (his token names it, his cursor says he read from seq 1 on). Carol read seq 2 in
/// another run, so she is told her history diverged; dave, who read alice's 2 in bob's run,
/// is not. Before, nobody was told (plain swarm seeds 693, 2338, 508215 and others).
#[test]
fn devices_that_read_lost_seqs_in_different_runs_are_told_even_at_different_seqs() {
    // Carol is mallory's key here, dave alice's phone.
    let (mut h, durable) = everyone_read_alices_two_and_three_that_the_disk_will_lose();
    // The disk lied: the gateway comes back from `durable`; carol sends into seq 2.
    h.store = durable.clone();
    let mut h = h.restarted(open_config());
    h.connect_with(5, mallory(), vec![Cursor::new(CONV, 1)]);
    let out = h.send(5, mallory(), 9, b"carol's");
    assert!(!frames_to(&out, 5).is_empty());
    assert_eq!(h.gateway.conversation_head(CONV), Some(2));
    // And again: the run carol read in is lost whole.
    h.store = durable;
    let mut h = h.restarted(open_config());
    let bobs = Cursor {
        since: Some(0),
        ..Cursor::read(CONV, 3, Some(MsgId::from_bytes([3; 16])))
    };
    let out = h.connect_with(6, bob(), vec![bobs]);
    assert_eq!(found_ranges(&out), vec![(HistoryKind::Lost, 2, 3)]);
    let carols = Cursor {
        since: Some(1),
        ..Cursor::read(CONV, 2, Some(MsgId::from_bytes([9; 16])))
    };
    let out = h.connect_with(7, mallory(), vec![carols]);
    assert_eq!(notices(&out, 7, ErrorCode::HistoryDiverged), vec![2]);
    let daves = Cursor {
        since: Some(0),
        ..Cursor::read(CONV, 2, Some(MsgId::from_bytes([2; 16])))
    };
    let out = h.connect_with(8, alice_phone(), vec![daves]);
    assert!(notices(&out, 8, ErrorCode::HistoryDiverged).is_empty());
    assert!(history(&out).is_empty(), "{:?}", history(&out));
}

/// A device whose cursor did not move under its latest token read what it read in the run of
/// an earlier one, and its cursor says which (`Cursor.since_run`). Three lossy crashes in one
/// lying spell: bob read alice's 2 and 3 in the first run, carol her own message at seq 2 in
/// the second; in the third carol came back, read nothing new, and so holds a token of a run
/// she read nothing in; erin (alice's phone here) likewise, having read alice's 2 and 3 in the
/// first. In the fourth, bob marks 2..=3 lost with the first run's stamp. Carol is told her
/// history diverged (before, her cursor claimed to have begun reading at 2 under her last
/// token, so nothing was compared: plain swarm seed 693, shrunk); erin, who read in bob's run,
/// is not, though her token names another run.
#[test]
fn a_device_that_read_nothing_under_its_last_token_shows_the_run_it_read_in() {
    let (mut h, durable) = everyone_read_alices_two_and_three_that_the_disk_will_lose();
    let stamp = |h: &Harness, device| -> [u8; 16] { h.tokens[&device][..16].try_into().unwrap() };
    let first_run = stamp(&h, bob());
    // The second run: carol sends into seq 2 and reads it.
    h.store = durable.clone();
    let mut h = h.restarted(open_config());
    h.connect_with(5, mallory(), vec![Cursor::new(CONV, 1)]);
    let out = h.send(5, mallory(), 9, b"carol's");
    assert!(!frames_to(&out, 5).is_empty());
    let second_run = stamp(&h, mallory());
    let carols = Cursor {
        since: Some(1),
        ..Cursor::read(CONV, 2, Some(MsgId::from_bytes([9; 16])))
    };
    let erins = Cursor {
        since: Some(1),
        ..Cursor::read(CONV, 3, Some(MsgId::from_bytes([3; 16])))
    };
    // The third run: carol and erin come back and read nothing new; each gets a token.
    h.store = durable.clone();
    let mut h = h.restarted(open_config());
    h.connect_with(6, mallory(), vec![carols]);
    h.connect_with(7, alice_phone(), vec![erins]);
    assert_ne!(stamp(&h, mallory()), second_run);
    // The fourth: bob comes back first.
    h.store = durable;
    let mut h = h.restarted(open_config());
    let bobs = Cursor {
        since: Some(1),
        ..Cursor::read(CONV, 3, Some(MsgId::from_bytes([3; 16])))
    };
    let out = h.connect_with(8, bob(), vec![bobs]);
    assert_eq!(found_ranges(&out), vec![(HistoryKind::Lost, 2, 3)]);
    let out = h.connect_with(
        9,
        mallory(),
        vec![Cursor {
            since_run: Some(second_run),
            ..carols
        }],
    );
    assert_eq!(notices(&out, 9, ErrorCode::HistoryDiverged), vec![2]);
    let out = h.connect_with(
        10,
        alice_phone(),
        vec![Cursor {
            since_run: Some(first_run),
            ..erins
        }],
    );
    assert!(notices(&out, 10, ErrorCode::HistoryDiverged).is_empty());
    assert!(history(&out).is_empty(), "{:?}", history(&out));
}

/// The device that marks seqs lost may not know the run it read them in: it was told its
/// history diverged, or lost, after them, and read on in a later run (plain swarm seed
/// 508215, 2026-12-07). Its placeholders keep no run there. The first device to show the run
/// it read them in stamps them, and the next ones are compared with it: carol and alice read
/// seq 2 in one run, dave in another, and dave is told his history diverged. Before, nobody
/// was compared there, and carol and dave held different messages at 2 untold (a silent fork).
#[test]
fn the_first_device_to_show_the_run_of_unstamped_lost_seqs_is_the_one_the_next_are_compared_with() {
    // Carol is mallory's key here, dave alice's phone.
    let (mut h, durable) = everyone_read_alices_two_and_three_that_the_disk_will_lose();
    h.store = durable;
    let mut h = h.restarted(open_config());
    let (one_run, another) = ([0xaa; 16], [0xbb; 16]);
    // Bob read 2 and 3, but in a run before the one his cursor counts from.
    let bobs = Cursor {
        since: Some(3),
        ..Cursor::read(CONV, 3, Some(MsgId::from_bytes([3; 16])))
    };
    let out = h.connect_with(6, bob(), vec![bobs]);
    assert_eq!(found_ranges(&out), vec![(HistoryKind::Lost, 2, 3)]);
    let read_at_two = |run: [u8; 16], id: u8| Cursor {
        since: Some(1),
        since_run: Some(run),
        ..Cursor::read(CONV, 2, Some(MsgId::from_bytes([id; 16])))
    };
    let out = h.connect_with(7, mallory(), vec![read_at_two(one_run, 9)]);
    assert!(notices(&out, 7, ErrorCode::HistoryDiverged).is_empty());
    assert!(history(&out).is_empty(), "{:?}", history(&out));
    // The stamp carol gave is durable.
    let mut h = h.restarted(open_config());
    let out = h.connect_with(8, alice_phone(), vec![read_at_two(another, 2)]);
    assert_eq!(notices(&out, 8, ErrorCode::HistoryDiverged), vec![2]);
    let out = h.connect_with(9, alice(), vec![read_at_two(one_run, 9)]);
    assert!(notices(&out, 9, ErrorCode::HistoryDiverged).is_empty());
}

#[test]
fn a_cursor_implausibly_far_beyond_the_head_is_not_believed() {
    let mut h = gateway_that_lost_seqs_2_and_3();
    let far = Cursor::new(CONV, 1 + sund_model::gateway::FENCE_MAX + 1);
    let out = h.connect_with(3, alice(), vec![far]);
    assert!(history(&out).is_empty());
    assert_eq!(h.gateway.conversation_head(CONV), Some(1));
}

fn limited_config(sends: Rate) -> GatewayConfig {
    GatewayConfig {
        limits: RateLimits {
            sends: Some(sends),
            ..RateLimits::default()
        },
        ..open_config()
    }
}

/// The error a refusal by a rate limit carries: its code, the message it names and its hint.
fn limit_refusal(outputs: &[GatewayOutput], conn: u64) -> Option<(ErrorCode, u8, Option<u32>)> {
    frames_to(outputs, conn)
        .into_iter()
        .find_map(|f| match f.payload {
            Payload::Error(e) => Some((
                ErrorCode::from_u16(e.code),
                e.msg_id.unwrap_or_default()[0],
                e.retry_after_ms,
            )),
            _ => None,
        })
}

#[test]
fn a_device_past_its_send_limit_is_refused_with_a_hint_and_taken_after_it() {
    let mut h = Harness::with_config(limited_config(Rate::per_second(4, 2)));
    h.connect(1, alice());
    h.connect(2, bob());
    assert!(limit_refusal(&h.send(1, alice(), 1, b"a"), 1).is_none());
    assert!(limit_refusal(&h.send(1, alice(), 2, b"b"), 1).is_none());
    let out = h.send(1, alice(), 3, b"c");
    assert_eq!(
        limit_refusal(&out, 1),
        Some((ErrorCode::SendsLimited, 3, Some(250))),
        "past the burst of 2: one more every 250 ms"
    );
    assert_eq!(h.gateway.conversation_head(CONV), Some(2), "nothing stored");
    // A retry of a sequenced message is answered from the deduplication record, not charged.
    let out = h.send(1, alice(), 1, b"a");
    assert_eq!(send_answers(&out, 1), vec![("ack", 1, 1)]);
    // Another device has its own bucket.
    assert!(limit_refusal(&h.send(2, bob(), 9, b"bob"), 2).is_none());
    h.now = h.now + Duration::from_millis(249);
    let out = h.send(1, alice(), 3, b"c");
    assert_eq!(limit_refusal(&out, 1).map(|r| r.2), Some(Some(1)));
    h.now = h.now + Duration::from_millis(1);
    let out = h.send(1, alice(), 3, b"c");
    assert_eq!(send_answers(&out, 1), vec![("ack", 3, 4)]);
    let stats = h.gateway.stats();
    assert_eq!(stats.limits.sends_limited, 2);
    assert_eq!(stats.refusals.get(ErrorCode::SendsLimited), 2);
}

#[test]
fn registrations_are_limited_per_source_address_and_told_when_to_come_back() {
    use sund_model::gateway::limits::SourceAddress;
    let mut config = open_config();
    config.limits.registrations = Some(Rate::per_hour(2, 2));
    let mut h = Harness::with_config(config);
    let here = SourceAddress::of("192.0.2.7".parse().unwrap());
    let elsewhere = SourceAddress::of("2001:db8::1".parse().unwrap());
    let register = |h: &mut Harness, conn: u64, source, seed: u8| {
        h.input(GatewayInput::AcceptedFrom(ConnectionId(conn), source));
        let frame = TestDevice::new([seed; 32], UserId::from_bytes([seed; 16])).register([0; 16]);
        h.input(GatewayInput::Frame(ConnectionId(conn), frame))
    };
    for (conn, seed) in [(1, 11), (2, 12)] {
        let out = register(&mut h, conn, here, seed);
        assert!(
            matches!(frames_to(&out, conn)[0].payload, Payload::Certificate(_)),
            "within the burst"
        );
    }
    let out = register(&mut h, 3, here, 13);
    let refused = frames_to(&out, 3)
        .into_iter()
        .find_map(|f| match f.payload {
            Payload::Goodbye(g) => Some((ErrorCode::from_u16(g.code), g.retry_after_ms, g.message)),
            _ => None,
        })
        .expect("a goodbye");
    assert_eq!(refused.0, ErrorCode::RegistrationsLimited);
    assert_eq!(refused.1, Some(1_800_000), "one more every half hour");
    assert!(
        refused.2.contains("2 per hour (bursts of 2)"),
        "{}",
        refused.2
    );
    assert!(out.contains(&GatewayOutput::Close(ConnectionId(3))));
    // Another address, and a connection whose driver gives none, are not charged.
    let out = register(&mut h, 4, elsewhere, 14);
    assert!(matches!(
        frames_to(&out, 4)[0].payload,
        Payload::Certificate(_)
    ));
    let out = h.register(5, alice(), UserId(alice().0), [0; 16]);
    assert!(matches!(
        frames_to(&out, 5)[0].payload,
        Payload::Certificate(_)
    ));
    h.now = h.now + Duration::from_secs(1_800);
    let out = register(&mut h, 6, here, 13);
    assert!(matches!(
        frames_to(&out, 6)[0].payload,
        Payload::Certificate(_)
    ));
    assert_eq!(h.gateway.stats().limits.registrations_limited, 1);
}

#[test]
fn a_gateway_without_limits_takes_every_message() {
    let mut config = open_config();
    config.limits = RateLimits {
        sends: None,
        conversations: None,
        ..RateLimits::default()
    };
    let mut h = Harness::with_config(config);
    h.connect(1, alice());
    for id in 1..=250u8 {
        assert!(limit_refusal(&h.send(1, alice(), id, b"x"), 1).is_none());
    }
    assert_eq!(h.gateway.conversation_head(CONV), Some(250));
}

#[test]
fn a_device_that_keeps_sending_while_refused_is_cut_off_with_the_hint() {
    let mut config = limited_config(Rate::per_second(1, 1));
    config.limits.send_refusals_max = 2;
    let mut h = Harness::with_config(config);
    h.connect(1, alice());
    assert!(limit_refusal(&h.send(1, alice(), 1, b"a"), 1).is_none());
    for id in [2, 3] {
        let out = h.send(1, alice(), id, b"more");
        assert_eq!(
            limit_refusal(&out, 1).map(|r| r.0),
            Some(ErrorCode::SendsLimited)
        );
        assert!(!closed(&out, 1));
    }
    let out = h.send(1, alice(), 4, b"still more");
    assert_eq!(goodbye_code(&out, 1), Some(ErrorCode::SendsLimited));
    assert!(closed(&out, 1), "the session ends");
    let hint = frames_to(&out, 1)
        .into_iter()
        .find_map(|f| match f.payload {
            Payload::Goodbye(g) => g.retry_after_ms,
            _ => None,
        });
    assert!(hint.is_some_and(|ms| ms > 0 && ms <= 1000), "{hint:?}");
    assert_eq!(h.gateway.stats().limits.cut_off, 1);
}

// ---- contacts and presence ----

impl Harness {
    fn social(&mut self, conn: u64, request: u64, payload: Payload) -> Vec<GatewayOutput> {
        let routing = Routing {
            seq: request,
            ..Routing::default()
        };
        self.frame(conn, routing, payload)
    }

    fn contact(&mut self, conn: u64, user: UserId, action: ContactAction) -> Vec<GatewayOutput> {
        let change = ContactChange {
            user: user.to_bytes().into(),
            action: action as u8,
            domain: None,
        };
        self.social(conn, 1 << 63 | 1, Payload::ContactChange(change))
    }

    fn watch(&mut self, conn: u64, users: &[UserId]) -> Vec<GatewayOutput> {
        let subscribe = PresenceSubscribe {
            users: users.iter().map(|u| u.to_bytes().into()).collect(),
        };
        self.social(conn, 1 << 63 | 2, Payload::PresenceSubscribe(subscribe))
    }
}

fn user_of(device: DeviceId) -> UserId {
    UserId(device.0)
}

/// Every presence entry sent to `conn`, as (user, state).
fn presence_to(out: &[GatewayOutput], conn: u64) -> Vec<(UserId, Seen)> {
    frames_to(out, conn)
        .into_iter()
        .filter_map(|f| match f.payload {
            Payload::PresenceNotify(n) => Some(n.entries),
            _ => None,
        })
        .flatten()
        .map(|e| (UserId::from_bytes(*e.user), Seen::from_u8(e.seen)))
        .collect()
}

fn listing_to(out: &[GatewayOutput], conn: u64) -> Option<(u64, Contacts)> {
    frames_to(out, conn)
        .into_iter()
        .find_map(|f| match f.payload {
            Payload::Contacts(c) => Some((f.routing.seq, c)),
            _ => None,
        })
}

fn error_to(out: &[GatewayOutput], conn: u64) -> Option<(ErrorCode, Routing, ErrorReport)> {
    frames_to(out, conn)
        .into_iter()
        .find_map(|f| match f.payload {
            Payload::Error(e) => Some((ErrorCode::from_u16(e.code), f.routing, e)),
            _ => None,
        })
}

/// The count of presence notifications the gateway claims in its heartbeat answer to `conn`.
fn presence_count(h: &mut Harness, conn: u64) -> Option<u64> {
    let out = h.frame(
        conn,
        Routing::default(),
        Payload::Heartbeat(Heartbeat {
            nonce: 1,
            crl_version: None,
            presence: None,
            peer_roots: None,
            peer_crls: None,
            contacts: None,
        }),
    );
    frames_to(&out, conn)
        .into_iter()
        .find_map(|f| match f.payload {
            Payload::HeartbeatAck(ack) => Some(ack.presence),
            _ => None,
        })
        .flatten()
}

#[test]
fn a_copy_of_a_watchlist_is_not_taken_anew_and_the_count_of_notifications_goes_on() {
    let mut h = Harness::new();
    h.connect(1, alice());
    h.connect(2, bob());
    let (a, b) = (user_of(alice()), user_of(bob()));
    h.contact(1, b, ContactAction::Add);
    h.contact(2, a, ContactAction::Add);
    let out = h.watch(1, &[b]);
    assert_eq!(presence_to(&out, 1), vec![(b, Seen::Online)]);
    let out = h.input(GatewayInput::Closed(ConnectionId(2)));
    assert_eq!(presence_to(&out, 1), vec![(b, Seen::Recently)]);
    assert_eq!(presence_count(&mut h, 1), Some(2));
    // The network delivers the watchlist twice: the copy is not answered, and the count goes
    // on, so a device that misses the next notification sees the count above what it heard
    // (taken anew, the count restarted and hid the loss: presence-scrape seed 1000).
    let out = h.watch(1, &[b]);
    assert!(presence_to(&out, 1).is_empty(), "{out:?}");
    h.connect(3, bob());
    assert_eq!(presence_count(&mut h, 1), Some(3));
}

#[test]
fn presence_flows_only_between_mutual_contacts_who_are_visible() {
    let mut h = Harness::new();
    h.connect(1, alice());
    h.connect(2, bob());
    let (a, b) = (user_of(alice()), user_of(bob()));
    let out = h.watch(1, &[b]);
    assert_eq!(
        presence_to(&out, 1),
        vec![(b, Seen::Unknown)],
        "not contacts yet"
    );

    // Alice asks; bob hears of it; neither sees the other yet.
    let out = h.contact(1, b, ContactAction::Add);
    let (request, mine) = listing_to(&out, 1).expect("an answer");
    assert_eq!(request, 1 << 63 | 1, "the answer names the request");
    assert_eq!(mine.outgoing, vec![b.to_bytes().into()]);
    let (unasked, theirs) = listing_to(&out, 2).expect("bob hears of the request");
    assert_eq!(unasked, 0);
    assert_eq!(theirs.incoming, vec![a.to_bytes().into()]);
    assert!(presence_to(&out, 1).is_empty());

    // Bob accepts: alice, watching, sees him online at once.
    let out = h.contact(2, a, ContactAction::Add);
    assert_eq!(presence_to(&out, 1), vec![(b, Seen::Online)]);

    // Invisible: offline to everyone, while bob's session works on.
    let out = h.social(
        2,
        1 << 63 | 5,
        Payload::PresenceUpdate(PresenceUpdate { invisible: true }),
    );
    assert!(listing_to(&out, 2).unwrap().1.invisible);
    assert_eq!(presence_to(&out, 1), vec![(b, Seen::Unknown)]);
    let out = h.social(
        2,
        1 << 63 | 6,
        Payload::PresenceUpdate(PresenceUpdate { invisible: false }),
    );
    assert_eq!(presence_to(&out, 1), vec![(b, Seen::Online)]);

    // Bob goes away: alice sees only a coarse bucket, never a time.
    h.now = Instant(h.now.0 + 3_600_000_000 * 5);
    let out = h.input(GatewayInput::Closed(ConnectionId(2)));
    assert_eq!(presence_to(&out, 1), vec![(b, Seen::Recently)]);

    // A restart keeps contacts and the last-seen hour: a new watchlist sees the same.
    let mut h = h.restarted(open_config());
    h.connect(3, alice());
    let out = h.watch(3, &[b]);
    assert_eq!(presence_to(&out, 3), vec![(b, Seen::Recently)]);
    assert_eq!(
        h.gateway.stats().presence.watchlists,
        1,
        "counted since the restart"
    );
}

#[test]
fn a_block_hides_presence_both_ways_and_keeps_key_packages_from_the_blocked() {
    let mut h = Harness::new();
    h.connect(1, alice());
    h.connect(2, bob());
    let (a, b) = (user_of(alice()), user_of(bob()));
    h.contact(1, b, ContactAction::Add);
    h.contact(2, a, ContactAction::Add);
    h.watch(1, &[b]);
    h.watch(2, &[a]);
    h.upload(2, KeyPackageUpload::default());
    let before = answer(&frames_to(&h.fetch(1, &[b]), 1));
    assert!(
        !before.found.is_empty() || !before.exhausted.is_empty(),
        "bob's device is listed before the block"
    );

    let out = h.contact(2, a, ContactAction::Block);
    assert_eq!(presence_to(&out, 1), vec![(b, Seen::Unknown)]);
    assert_eq!(presence_to(&out, 2), vec![(a, Seen::Unknown)]);
    let listing = listing_to(&out, 2).unwrap().1;
    assert_eq!(listing.blocked, vec![a.to_bytes().into()]);
    assert!(
        listing.incoming.is_empty(),
        "a blocked user's request is not shown"
    );

    let after = answer(&frames_to(&h.fetch(1, &[b]), 1));
    assert!(
        after.found.is_empty() && after.exhausted.is_empty(),
        "no device of bob for alice: no DM, no invitation"
    );
    // Alice adding bob again changes nothing bob sees.
    let out = h.contact(1, b, ContactAction::Add);
    assert!(presence_to(&out, 1).is_empty());
    assert!(listing_to(&out, 2).is_none_or(|(_, l)| l.incoming.is_empty()));
}

#[test]
fn contact_requests_and_watchlists_are_limited_with_distinct_codes() {
    let mut config = open_config();
    config.limits = RateLimits {
        contact_requests: Some(Rate::per_day(10, 3)),
        presence_subscriptions: Some(Rate::per_hour(10, 2)),
        watchlist_max: 4,
        ..RateLimits::default()
    };
    let mut h = Harness::with_config(config);
    h.connect(3, mallory());
    for n in 0..3u128 {
        let out = h.contact(3, UserId(1000 + n), ContactAction::Add);
        assert!(
            listing_to(&out, 3).is_some(),
            "request {n} within the burst"
        );
    }
    let out = h.contact(3, UserId(2000), ContactAction::Add);
    let (code, routing, report) = error_to(&out, 3).expect("refused");
    assert_eq!(code, ErrorCode::ContactsLimited);
    assert_eq!(routing.seq, 1 << 63 | 1, "the refusal names the request");
    assert_eq!(report.retry_after_ms, Some(8_640_000), "a tenth of a day");
    // Repeating a request already made is not a new one.
    let out = h.contact(3, UserId(1000), ContactAction::Add);
    assert!(listing_to(&out, 3).is_some());

    let many: Vec<UserId> = (0..5u128).map(|n| UserId(3000 + n)).collect();
    let out = h.watch(3, &many);
    let (code, _, report) = error_to(&out, 3).expect("too long");
    assert_eq!(code, ErrorCode::WatchlistTooLong);
    assert!(report.message.contains("at most 4"), "{}", report.message);
    let out = h.watch(3, &many[..4]);
    assert_eq!(presence_to(&out, 3).len(), 4);
    // Another watchlist (a new request id: the same id would be a copy of this one).
    let subscribe = PresenceSubscribe {
        users: many[..3].iter().map(|u| u.to_bytes().into()).collect(),
    };
    let out = h.social(3, 1 << 63 | 3, Payload::PresenceSubscribe(subscribe));
    let (code, _, report) = error_to(&out, 3).expect("limited");
    assert_eq!(code, ErrorCode::PresenceLimited);
    assert!(report.retry_after_ms.is_some());
    let stats = h.gateway.stats();
    assert_eq!(stats.limits.contacts_limited, 1);
    assert_eq!(stats.limits.presence_limited, 1);
    assert_eq!(stats.presence.watchlists_too_long, 1);
}

/// A gateway keeping at most 250 bytes per device, where alice has sent four messages of
/// 100 bytes.
fn four_hundred_bytes_against_a_quota_of_250() -> Harness {
    let mut h = Harness::with_config(GatewayConfig {
        mailbox_bytes_max: Some(250),
        ..open_config()
    });
    h.connect(1, alice());
    for i in 1..=4 {
        h.send(1, alice(), i, &[i; 100]);
    }
    h
}

#[test]
fn a_device_over_its_mailbox_quota_loses_the_oldest_and_is_told_of_the_gap() {
    // Alice reads as she sends; bob is away: 400 bytes wait for him.
    let mut h = four_hundred_bytes_against_a_quota_of_250();
    h.ack(1, 4);
    let log = h.gateway.conversations().next().unwrap();
    assert_eq!(log.bytes_after(0), 400);
    assert_eq!(log.bytes_after(3), 100);
    assert_eq!(log.bytes_after(4), 0);
    h.now = h.now + Duration::from_secs(1);
    h.gateway.handle_timeout(h.now);
    h.drain();
    // Measured at the first tick: the two oldest no longer fit in bob's 250 bytes.
    assert_eq!(h.gateway.stats().delivery.mailbox_over_quota, 1);
    assert_eq!(h.gateway.stats().delivery.mailbox_released, 2);
    let log = h.gateway.conversations().next().unwrap();
    assert_eq!((log.first_seq(), log.retained()), (3, 2));
    assert_eq!((log.bytes_after(0), log.bytes_after(3)), (200, 100));
    // Bob comes back: told that 1..=2 are gone, then given 3 and 4.
    let frames = frames_to(&h.connect(2, bob()), 2);
    let skip = frames
        .iter()
        .position(|f| error_code(f) == Some(ErrorCode::ReplayWindowExceeded))
        .unwrap_or_else(|| panic!("a gap notice: {frames:?}"));
    assert_eq!(frames[skip].routing.seq, 3);
    let delivered: Vec<u64> = frames[skip..]
        .iter()
        .filter(|f| matches!(f.payload, Payload::Deliver(_)))
        .map(|f| f.routing.seq)
        .collect();
    assert_eq!(delivered, vec![3, 4]);
    // Within the quota again: nothing more goes at the next check.
    h.now = h.now + Duration::from_secs(61);
    h.gateway.handle_timeout(h.now);
    h.drain();
    assert_eq!(h.gateway.stats().delivery.mailbox_over_quota, 1);
}

#[test]
fn members_all_over_their_quota_let_the_oldest_go_for_each_of_them() {
    let mut h = four_hundred_bytes_against_a_quota_of_250();
    // Neither has read: both are over the quota, so the two oldest go for both (one member
    // under it would have held them: collection takes the lowest of the members' floors).
    h.now = h.now + Duration::from_secs(1);
    h.gateway.handle_timeout(h.now);
    h.drain();
    assert_eq!(h.gateway.stats().delivery.mailbox_over_quota, 2);
    let log = h.gateway.conversations().next().unwrap();
    assert_eq!(log.first_seq(), 3);
}

/// A revoked device leaves the plain conversations it was in: no member list names it, and its
/// cursor no longer keeps what every other member has read (it kept it until retention ran
/// out, thirty days by default).
#[test]
fn a_revoked_device_leaves_its_plain_conversations_and_holds_nothing_back() {
    let mut h = Harness::new();
    h.connect(1, alice());
    h.connect(2, bob());
    one_batch(
        &mut h,
        vec![
            alice_send(1, Some(0)),
            alice_send(2, Some(1)),
            alice_send(3, Some(2)),
        ],
    );
    // alice read everything, bob nothing: all three are kept for bob.
    h.ack(1, 3);
    h.now = h.now + Duration::from_secs(1);
    h.gateway.handle_timeout(h.now);
    h.drain();
    assert_eq!(h.gateway.stats().delivery.gc_dropped, 0);
    h.input(support::admin(AdminCommand::RevokeDevice(bob())));
    assert!(!h.gateway.log(CONV).unwrap().is_member(bob()));
    assert!(h.gateway.log(CONV).unwrap().is_member(alice()));
    assert_eq!(h.gateway.stats().delivery.revoked_left, 1);
    h.now = h.now + Duration::from_secs(1);
    h.gateway.handle_timeout(h.now);
    h.drain();
    assert_eq!(
        h.gateway.stats().delivery.gc_dropped,
        3,
        "nothing kept for bob"
    );
    // Durably: not a member after a restart either, and not made one again.
    let mut h = h.restarted(open_config());
    assert!(!h.gateway.log(CONV).unwrap().is_member(bob()));
    h.input(support::admin(AdminCommand::CreateConversation(
        ConversationId(0xC2),
        vec![alice(), bob()],
    )));
    let made = h.gateway.log(ConversationId(0xC2)).unwrap();
    assert!(made.is_member(alice()) && !made.is_member(bob()));
}

/// Swarm seed 504383: every member of a plain conversation was revoked while it still held
/// messages (nobody had read them), and the gateway's restart refused its own store as
/// corrupt ("log entry for a conversation which has no members"): a gateway that could never
/// start again. A conversation with no member left is legitimate, and is restored.
#[test]
fn a_gateway_restarts_after_every_member_of_a_conversation_was_revoked() {
    let mut h = Harness::new();
    h.connect(1, alice());
    h.connect(2, bob());
    one_batch(&mut h, vec![alice_send(1, Some(0)), alice_send(2, Some(1))]);
    h.input(support::admin(AdminCommand::RevokeDevice(bob())));
    h.input(support::admin(AdminCommand::RevokeDevice(alice())));
    let log = h.gateway.log(CONV).unwrap();
    assert!(!log.is_member(alice()) && !log.is_member(bob()));
    assert_eq!(log.head(), 2);
    let h = h.restarted(open_config());
    let log = h.gateway.log(CONV).expect("the conversation is restored");
    assert_eq!(log.head(), 2, "seqs go on where they were");
    assert!(!log.is_member(alice()) && !log.is_member(bob()));
}
