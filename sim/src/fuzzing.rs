//! Fuzzing harnesses shared by the `cargo fuzz` targets in `fuzz/` and the corpus replay tests.
//!
//! Each `run_*` function takes raw fuzzer bytes, drives the code under test and panics only when
//! an invariant is broken, so that a fuzz target is a one-line call and `sim/tests/corpus_replay.rs`
//! re-checks every committed corpus input with exactly the same code on every `cargo test`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use sund_model::gateway::transfers::read_chunk;
use sund_model::gateway::{AdminCommand, Gateway, GatewayConfig, GatewayInput, GatewayOutput};
use sund_model::identity::DeviceKey;
use sund_model::ids::{ConnectionId, ConversationId, DeviceId, UserId};
use sund_model::testing::TestDevice;
use sund_model::time::Instant;
use sund_model::trust::DeviceCertificate;
use sund_model::wire::payload::{
    Ack, ChunkHead, ChunkRequest, ContactChange, ContactsFetch, Cursor, FileFetched, Goodbye,
    Heartbeat, Hello, HelloOk, KeyPackageFetch, KeyPackageUpload, Leave, ListedChunkWire,
    PresenceSubscribe, PresenceUpdate, ReplayRequest, Send, UploadOpen,
};
use sund_model::wire::{Frame, Payload, Routing, PAYLOAD_BYTES_MAX};

use crate::disk::SimDisk;
use crate::rng::SimRng;

/// The request id of the harness's admin commands.
const ADMIN_REQUEST: u64 = 7;

/// Most operations one input runs, so that one execution stays fast.
pub const GATEWAY_OPS_MAX: usize = 256;
/// Connection slots an input can address; each `Accept` opens a fresh connection id in a slot.
const SLOTS: usize = 4;
/// Longest message body a generated `Send` carries.
const BODY_BYTES_MAX: usize = 256;
/// Most cursors a generated `Hello` carries.
const CURSORS_MAX: usize = 8;
/// Longest time step of one `Advance`.
const ADVANCE_MS_MAX: u64 = 10_000;

/// Conversations an input can name: none, the two pre-created ones, and one that does not exist
/// at first (an `AddMember` can create it).
const CONVERSATIONS: [ConversationId; 4] = [
    ConversationId(0),
    ConversationId(1),
    ConversationId(2),
    ConversationId(99),
];
/// Device ids an input can name: 0 means "no sender"; 1..=3 are members of conversation 1,
/// 2 and 4 of conversation 2, 5 of none.
const DEVICES_MAX: u8 = 5;

/// Parses fuzzer input as a scenario file (lossy UTF-8). Any `Ok` or `Err` is fine; a panic is a bug.
pub fn run_scenario_parse(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let first = crate::scenario::parse("fuzz.sund", &text);
    if let Err(error) = &first {
        // Errors must point into the input: 1-based, at most one line past the last.
        let lines = text.lines().count().max(1);
        assert!(error.line >= 1, "error line is 1-based: {error}");
        assert!(
            error.line <= lines + 1,
            "error line past the input: {error}"
        );
        assert!(error.column >= 1, "error column is 1-based: {error}");
    }
}

/// A well-formed frame the interpreter builds with the wire types.
#[derive(Arbitrary, Debug)]
enum WellFormed {
    Hello {
        device: u8,
        cursors: Vec<(u8, u64)>,
        /// Present the last resume token the gateway issued on any connection (maybe another
        /// device's), or none.
        resume: bool,
        /// Claim the device id with another device's key.
        wrong_key: bool,
        /// Name one of three users (a device that named another before is refused).
        user: Option<u8>,
    },
    /// Answer the slot's last challenge as the device that said hello on it; `valid: false`
    /// flips one bit of the signature.
    Proof {
        valid: bool,
    },
    Send {
        conversation: u8,
        msg_id: u8,
        after: u8,
        body: Vec<u8>,
    },
    Ack {
        conversation: u8,
        seq: u64,
    },
    ReplayRequest {
        conversation: u8,
        from_seq: u64,
    },
    Heartbeat {
        nonce: u64,
    },
    HeartbeatAck {
        nonce: u64,
    },
    Goodbye {
        code: u16,
    },
    /// A gateway-to-node frame sent the wrong way.
    HelloOk {
        interval_ms: u32,
    },
    /// Arbitrary bytes posing as KeyPackages (real ones cost too much per execution; the
    /// directory's acceptance path has its own tests).
    KeyPackageUpload {
        packages: Vec<Vec<u8>>,
        last_resort: Option<Vec<u8>>,
    },
    /// A fetch of the gateway's own users, or (`foreign`) of another domain's.
    KeyPackageFetch {
        users: Vec<u8>,
        foreign: bool,
    },
    /// Ask the gateway to remove the session's device from a conversation.
    Leave {
        conversation: u8,
    },
    /// Open (or reopen) upload `upload` listing chunks by (id byte, length): small lengths,
    /// so that chunks are cheap to send.
    UploadOpen {
        conversation: u8,
        upload: u8,
        chunks: Vec<(u8, u16)>,
    },
    ChunkRequest {
        conversation: u8,
        upload: u8,
        ids: Vec<u8>,
    },
    FileFetched {
        conversation: u8,
        upload: u8,
    },
    /// Real KeyPackages of device `owner` (maybe not the session's device): `count` of its
    /// cached one-time packages from index `first`, and its last-resort package if asked.
    RealKeyPackages {
        owner: u8,
        first: u8,
        count: u8,
        last_resort: bool,
    },
    /// Add, remove, block or unblock one of the three users (any action byte: unknown ones
    /// must be refused).
    ContactChange {
        user: u8,
        action: u8,
        /// Of another domain's user (`b.example`).
        foreign: bool,
    },
    /// Be invisible or not.
    PresenceUpdate {
        invisible: bool,
    },
    /// Watch some of the three users (repeated: the list may pass the gateway's cap).
    PresenceSubscribe {
        users: Vec<u8>,
    },
    ContactsFetch,
}

/// One-time packages cached per device (and one last-resort package).
const CACHED_PACKAGES: usize = 12;

/// One device's cached one-time packages and its last-resort package.
type DevicePackages = (Vec<Vec<u8>>, Vec<u8>);

/// Real KeyPackages of device `d` (1..=DEVICES_MAX), made once per process with Sund's MLS
/// provider: generating them per execution would dominate it.
fn real_key_packages(d: u8) -> &'static DevicePackages {
    use sund_model::mls::{key_packages, LifetimePolicy, MlsProvider, MlsStorage, Randomness};
    static PACKAGES: std::sync::OnceLock<Vec<DevicePackages>> = std::sync::OnceLock::new();
    let all = PACKAGES.get_or_init(|| {
        (1..=DEVICES_MAX)
            .map(|d| {
                let provider = MlsProvider::new(
                    Box::new(SimRng::from_seed(u64::from(d))),
                    Randomness::Simulation,
                    MlsStorage::new(),
                );
                let signer = provider.new_signer().expect("a signing key");
                let (packages, last) = key_packages::generate(
                    &provider,
                    &signer,
                    &device(d).to_bytes(),
                    LifetimePolicy::Unbounded,
                    Instant(0),
                    CACHED_PACKAGES,
                    true,
                )
                .expect("KeyPackages");
                (
                    packages.into_iter().map(|p| p.to_vec()).collect(),
                    last.expect("a last-resort package").to_vec(),
                )
            })
            .collect()
    });
    &all[usize::from(d) - 1]
}

fn user(k: u8) -> UserId {
    UserId::of(["u0", "u1", "u2"][usize::from(k) % 3], "localhost")
}

/// One step of a fuzzed gateway run.
#[derive(Arbitrary, Debug)]
enum Op {
    /// The driver accepts a new connection in slot `k` (a no-op if the slot's connection is open).
    Accept(u8),
    /// The connection in slot `k` goes away.
    Close(u8),
    /// Raw bytes arrive as one frame on slot `k`.
    Raw(u8, Vec<u8>),
    /// A well-formed frame arrives on slot `k`.
    Frame(u8, WellFormed),
    /// A well-formed frame with one byte overwritten arrives on slot `k`.
    Tampered(u8, WellFormed, u16, u8),
    /// A chunk stream on slot `k`: a head naming (conversation, upload, id byte, declared
    /// length), then `len` bytes of `fill`.
    ChunkStream {
        slot: u8,
        conversation: u8,
        upload: u8,
        id: u8,
        declared: u16,
        len: u16,
        fill: u8,
    },
    /// Admin: add one device to a conversation (creating it if needed).
    AddMember(u8, u8),
    /// Time passes (up to 10 s) and the housekeeping tick runs.
    Advance(u16),
}

fn conversation(k: u8) -> ConversationId {
    CONVERSATIONS[usize::from(k) % CONVERSATIONS.len()]
}

fn device(k: u8) -> DeviceId {
    match k % (DEVICES_MAX + 1) {
        0 => DeviceId(0),
        d => device_key(d).device_id(),
    }
}

/// The key of device `d` (1..=DEVICES_MAX): fixed seeds, so inputs replay exactly. Derived once
/// per process: key derivation would otherwise dominate an execution.
fn device_key(d: u8) -> DeviceKey {
    static KEYS: std::sync::OnceLock<Vec<DeviceKey>> = std::sync::OnceLock::new();
    let keys = KEYS.get_or_init(|| {
        (1..=DEVICES_MAX)
            .map(|d| DeviceKey::from_seed([d; 32]))
            .collect()
    });
    keys[usize::from(d) - 1].clone()
}

/// What the harness remembers of the handshake to build `Hello` and `Proof` frames.
#[derive(Default)]
struct Handshakes {
    /// Per connection: the last challenge nonce and the device that said hello.
    challenges: BTreeMap<ConnectionId, [u8; 32]>,
    hellos: BTreeMap<ConnectionId, u8>,
    /// The last resume token any `HelloOk` carried.
    last_token: Option<[u8; 32]>,
    /// Each device's certificate, registered when the harness starts.
    certificates: BTreeMap<DeviceId, Vec<u8>>,
}

fn in_conversation(k: u8) -> Routing {
    Routing {
        conversation: conversation(k),
        ..Routing::default()
    }
}

fn well_formed_frame(frame: WellFormed, conn: ConnectionId, hs: &mut Handshakes) -> Frame {
    match frame {
        WellFormed::Proof { valid } => {
            let d = hs.hellos.get(&conn).copied().unwrap_or(1);
            let nonce = hs.challenges.get(&conn).copied().unwrap_or([0; 32]);
            let k = (d % (DEVICES_MAX + 1)).max(1);
            let proof = TestDevice {
                key: device_key(k),
                user: user(k),
            }
            .proof(&nonce);
            let mut frame = Frame::decode(&proof, PAYLOAD_BYTES_MAX).expect("our own frame");
            if let (false, Payload::Proof(p)) = (valid, &mut frame.payload) {
                p.signature[7] ^= 0x20;
            }
            frame
        }
        WellFormed::Hello {
            device: d,
            cursors,
            resume,
            wrong_key,
            user: claimed,
        } => {
            hs.hellos.insert(conn, d);
            let k = (d % (DEVICES_MAX + 1)).max(1);
            let key = if wrong_key {
                device_key(k % DEVICES_MAX + 1)
            } else {
                device_key(k)
            };
            let cursors = cursors
                .into_iter()
                .take(CURSORS_MAX)
                .map(|(c, seq)| Cursor::new(conversation(c), seq))
                .collect();
            let routing = Routing {
                sender: device(d),
                ..Routing::default()
            };
            let hello = Hello {
                cursors,
                device_key: key.public().0,
                resume_token: if resume { hs.last_token } else { None },
                user: claimed.map(|k| user(k).to_bytes()),
                certificate: hs
                    .certificates
                    .get(&device_key(k).device_id())
                    .map(|c| c.clone().into()),
                generation: None,
            };
            Frame::new(routing, Payload::Hello(hello))
        }
        WellFormed::Send {
            conversation: c,
            msg_id,
            after,
            mut body,
        } => {
            body.truncate(BODY_BYTES_MAX);
            let routing = Routing {
                conversation: conversation(c),
                ..Routing::default()
            };
            let mut id = [0u8; 16];
            id[15] = msg_id;
            Frame::new(
                routing,
                Payload::Send(Send {
                    msg_id: id,
                    body,
                    welcome: None,
                    after: (after != u8::MAX).then(|| {
                        let mut id = [0u8; 16];
                        id[15] = after;
                        id
                    }),
                }),
            )
        }
        WellFormed::Ack {
            conversation: c,
            seq,
        } => {
            let routing = Routing {
                conversation: conversation(c),
                seq,
                ..Routing::default()
            };
            Frame::new(routing, Payload::Ack(Ack {}))
        }
        WellFormed::ReplayRequest {
            conversation: c,
            from_seq,
        } => {
            let routing = Routing {
                conversation: conversation(c),
                ..Routing::default()
            };
            Frame::new(routing, Payload::ReplayRequest(ReplayRequest { from_seq }))
        }
        WellFormed::Heartbeat { nonce } => Frame::new(
            Routing::default(),
            Payload::Heartbeat(Heartbeat {
                nonce,
                crl_version: None,
                presence: None,
                peer_roots: None,
                peer_crls: None,
                contacts: None,
            }),
        ),
        WellFormed::HeartbeatAck { nonce } => Frame::new(
            Routing::default(),
            Payload::HeartbeatAck(Heartbeat {
                nonce,
                crl_version: None,
                presence: None,
                peer_roots: None,
                peer_crls: None,
                contacts: None,
            }),
        ),
        WellFormed::Goodbye { code } => Frame::new(
            Routing::default(),
            Payload::Goodbye(Goodbye {
                code,
                message: "bye".to_string(),
                retry_after_ms: None,
            }),
        ),
        WellFormed::HelloOk { interval_ms } => Frame::new(
            Routing::default(),
            Payload::HelloOk(HelloOk {
                resume_token: [0; 32],
                resume_token_ttl_s: 0,
                external_sender: None,
                peer_roots: None,
                heartbeat_interval_ms: interval_ms,
                peer_crls: None,
            }),
        ),
        WellFormed::KeyPackageUpload {
            packages,
            last_resort,
        } => Frame::new(
            Routing::default(),
            Payload::KeyPackageUpload(KeyPackageUpload {
                packages: packages.into_iter().take(8).map(Into::into).collect(),
                last_resort: last_resort.map(Into::into),
            }),
        ),
        WellFormed::RealKeyPackages {
            owner,
            first,
            count,
            last_resort,
        } => {
            let (packages, last) = real_key_packages((owner % DEVICES_MAX) + 1);
            let first = usize::from(first) % CACHED_PACKAGES;
            let count = usize::from(count) % 6;
            Frame::new(
                Routing::default(),
                Payload::KeyPackageUpload(KeyPackageUpload {
                    packages: (first..first + count)
                        .map(|i| packages[i % CACHED_PACKAGES].clone().into())
                        .collect(),
                    last_resort: last_resort.then(|| last.clone().into()),
                }),
            )
        }
        WellFormed::UploadOpen {
            conversation: c,
            upload,
            chunks,
        } => Frame::new(
            in_conversation(c),
            Payload::UploadOpen(UploadOpen {
                upload: [upload; 16],
                chunks: chunks
                    .into_iter()
                    .take(16)
                    .map(|(id, len)| ListedChunkWire {
                        id: [id; 32],
                        len: u32::from(len),
                    })
                    .collect(),
            }),
        ),
        WellFormed::ChunkRequest {
            conversation: c,
            upload,
            ids,
        } => Frame::new(
            in_conversation(c),
            Payload::ChunkRequest(ChunkRequest {
                upload: [upload; 16],
                ids: ids.into_iter().take(16).map(|id| [id; 32].into()).collect(),
            }),
        ),
        WellFormed::FileFetched {
            conversation: c,
            upload,
        } => Frame::new(
            in_conversation(c),
            Payload::FileFetched(FileFetched {
                upload: [upload; 16],
            }),
        ),
        WellFormed::Leave { conversation: c } => Frame::new(
            Routing {
                conversation: conversation(c),
                ..Routing::default()
            },
            Payload::Leave(Leave {}),
        ),
        WellFormed::KeyPackageFetch { users, foreign } => Frame::new(
            Routing::default(),
            Payload::KeyPackageFetch(KeyPackageFetch {
                users: users
                    .into_iter()
                    .take(4)
                    .map(|k| user(k).to_bytes().into())
                    .collect(),
                domain: foreign.then(|| "b.example".to_string()),
            }),
        ),
        WellFormed::ContactChange {
            user: k,
            action,
            foreign,
        } => Frame::new(
            Routing {
                seq: 1 << 63 | 1,
                ..Routing::default()
            },
            Payload::ContactChange(ContactChange {
                user: user(k).to_bytes().into(),
                action,
                domain: foreign.then(|| "b.example".to_string()),
            }),
        ),
        WellFormed::PresenceUpdate { invisible } => Frame::new(
            Routing::default(),
            Payload::PresenceUpdate(PresenceUpdate { invisible }),
        ),
        WellFormed::PresenceSubscribe { users } => Frame::new(
            Routing::default(),
            Payload::PresenceSubscribe(PresenceSubscribe {
                users: users
                    .into_iter()
                    .take(64)
                    .map(|k| user(k).to_bytes().into())
                    .collect(),
            }),
        ),
        WellFormed::ContactsFetch => {
            Frame::new(Routing::default(), Payload::ContactsFetch(ContactsFetch {}))
        }
    }
}

/// The driver side of a fuzzed gateway run: the gateway, its disk and what the checks remember.
struct Harness {
    config: GatewayConfig,
    now: Instant,
    gateway: Gateway,
    disk: SimDisk,
    /// Per slot: the slot's latest connection id and whether it is open.
    slots: [Option<(ConnectionId, bool)>; SLOTS],
    next_conn: u64,
    /// Connections the gateway closed; nothing may be sent on them afterwards.
    closed_by_gateway: BTreeSet<ConnectionId>,
    /// Highest head seen per conversation.
    heads: BTreeMap<ConversationId, u64>,
    /// Challenges, hellos and tokens seen, to build valid proofs and resumptions.
    handshakes: Handshakes,
}

impl Harness {
    fn new() -> Harness {
        let config = GatewayConfig {
            open_enrolment: true,
            ..GatewayConfig::default()
        };
        let now = Instant(0);
        let mut harness = Harness {
            gateway: Gateway::new(config.clone(), now, Box::new(SimRng::from_seed(0))),
            handshakes: Handshakes::default(),
            config,
            now,
            disk: SimDisk::default(),
            slots: [None; SLOTS],
            next_conn: 1,
            closed_by_gateway: BTreeSet::new(),
            heads: BTreeMap::new(),
        };
        // Every device registers (open enrolment) for the user its number names, on a
        // connection of its own that closes again.
        for d in 1..=DEVICES_MAX {
            let conn = ConnectionId(2_000_000 + u64::from(d));
            harness.input(GatewayInput::Accepted(conn));
            let device = TestDevice {
                key: device_key(d),
                user: user(d),
            };
            harness.input(GatewayInput::Frame(conn, device.register([0; 16])));
            harness.input(GatewayInput::Closed(conn));
        }
        let room = [device(1), device(2), device(3)];
        harness.admin(AdminCommand::CreateConversation(
            ConversationId(1),
            room.to_vec(),
        ));
        harness.admin(AdminCommand::CreateConversation(
            ConversationId(2),
            vec![device(2), device(4)],
        ));
        harness
    }

    fn input(&mut self, input: GatewayInput) {
        self.gateway.handle(self.now, input);
        self.drain();
    }

    fn admin(&mut self, command: AdminCommand) {
        let request = ADMIN_REQUEST;
        self.input(GatewayInput::Admin { request, command });
    }

    /// The connection id an op on slot `k` uses: the slot's latest (open or not), or one that was
    /// never accepted.
    fn conn(&self, k: u8) -> ConnectionId {
        let slot = usize::from(k) % SLOTS;
        match self.slots[slot] {
            Some((conn, _)) => conn,
            None => ConnectionId(1_000_000 + slot as u64),
        }
    }

    fn step(&mut self, op: Op) {
        match op {
            Op::Accept(k) => {
                let slot = usize::from(k) % SLOTS;
                if matches!(self.slots[slot], Some((_, true))) {
                    return;
                }
                let conn = ConnectionId(self.next_conn);
                self.next_conn += 1;
                self.slots[slot] = Some((conn, true));
                // Most connections come from one of four addresses (limits per address apply),
                // some from a driver that gives none.
                if k & 0x80 == 0 {
                    let ip = core::net::IpAddr::from([192, 0, 2, k % 4]);
                    let source = sund_model::gateway::limits::SourceAddress::of(ip);
                    self.input(GatewayInput::AcceptedFrom(conn, source));
                } else {
                    self.input(GatewayInput::Accepted(conn));
                }
            }
            Op::Close(k) => {
                let slot = usize::from(k) % SLOTS;
                if let Some((conn, open)) = &mut self.slots[slot] {
                    if *open {
                        *open = false;
                        let conn = *conn;
                        self.input(GatewayInput::Closed(conn));
                    }
                }
            }
            Op::Raw(k, bytes) => {
                let conn = self.conn(k);
                self.input(GatewayInput::Frame(conn, bytes.into()));
            }
            Op::Frame(k, frame) => {
                let conn = self.conn(k);
                let bytes = well_formed_frame(frame, conn, &mut self.handshakes).encode();
                self.input(GatewayInput::Frame(conn, bytes));
            }
            Op::Tampered(k, frame, at, value) => {
                let conn = self.conn(k);
                let mut bytes = well_formed_frame(frame, conn, &mut self.handshakes)
                    .encode()
                    .to_vec();
                let at = usize::from(at) % bytes.len();
                bytes[at] = value;
                self.input(GatewayInput::Frame(conn, bytes.into()));
            }
            Op::ChunkStream {
                slot,
                conversation: c,
                upload,
                id,
                declared,
                len,
                fill,
            } => {
                let conn = self.conn(slot);
                let head = ChunkHead {
                    upload: [upload; 16],
                    id: [id; 32],
                    len: u32::from(declared),
                };
                let head = Frame::new(in_conversation(c), Payload::Chunk(head)).encode();
                let body = vec![fill; usize::from(len)].into();
                self.input(GatewayInput::Chunk { conn, head, body });
            }
            Op::AddMember(c, d) => {
                let d = device(d);
                if d == DeviceId(0) {
                    return;
                }
                self.admin(AdminCommand::CreateConversation(conversation(c), vec![d]));
            }
            Op::Advance(ms) => {
                let ms = u64::from(ms) % (ADVANCE_MS_MAX + 1);
                self.now = self.now + Duration::from_millis(ms);
                self.gateway.handle_timeout(self.now);
                self.drain();
            }
        }
    }

    /// Commits every pending `Ready` and checks what it releases.
    fn drain(&mut self) {
        while let Some(ready) = self.gateway.poll_ready() {
            let outputs = ready
                .commit(&mut self.disk)
                .expect("the simulated disk accepts every commit");
            for output in outputs {
                match output {
                    GatewayOutput::Send(conn, bytes) => {
                        let frame = Frame::decode(&bytes, PAYLOAD_BYTES_MAX).unwrap_or_else(|e| {
                            panic!("gateway sent an undecodable frame on {conn:?}: {e}")
                        });
                        assert!(
                            !self.closed_by_gateway.contains(&conn),
                            "frame sent on {conn:?} after the gateway closed it: {:?}",
                            frame.payload
                        );
                        match frame.payload {
                            Payload::Challenge(c) => {
                                self.handshakes.challenges.insert(conn, c.nonce);
                            }
                            Payload::HelloOk(ok) => {
                                self.handshakes.last_token = Some(ok.resume_token)
                            }
                            Payload::Certificate(answer) => {
                                if let Ok(cert) = DeviceCertificate::decode(&answer.certificate) {
                                    self.handshakes
                                        .certificates
                                        .insert(cert.device(), answer.certificate.to_vec());
                                }
                            }
                            _ => {}
                        }
                    }
                    GatewayOutput::Close(conn) => {
                        self.closed_by_gateway.insert(conn);
                        for (c, open) in self.slots.iter_mut().flatten() {
                            if *c == conn {
                                *open = false;
                            }
                        }
                    }
                    GatewayOutput::Federation(_) => {
                        panic!("a federation output from a gateway with no federation peer")
                    }
                    GatewayOutput::Admin { request, .. } => {
                        assert_eq!(request, ADMIN_REQUEST, "answers name their request");
                    }
                    GatewayOutput::HistoryLost(_)
                    | GatewayOutput::HandedOver(_)
                    | GatewayOutput::PeerCrl(_)
                    | GatewayOutput::PeerLimited { .. }
                    | GatewayOutput::PeerIgnoresHints { .. } => {}
                    GatewayOutput::PauseReading(conn, pause) => {
                        assert!(
                            !self.closed_by_gateway.contains(&conn),
                            "a pause of {conn:?} after the gateway closed it"
                        );
                        assert!(
                            !pause.is_zero() && pause <= sund_model::gateway::READ_PAUSE_MAX,
                            "a pause of {pause:?}"
                        );
                    }
                    GatewayOutput::ServeChunk(serve) => {
                        // As a driver does: read and check. This disk never damages what it
                        // holds, so a chunk the index calls stored must read back whole.
                        let read = read_chunk(&self.disk, &serve)
                            .expect("the simulated disk reads what it holds");
                        let bytes = read.unwrap_or_else(|| {
                            panic!(
                                "the index serves {:?}, but its blob is not stored",
                                serve.id
                            )
                        });
                        assert_eq!(bytes.len(), serve.plan.sealed_len as usize);
                        assert!(
                            !self.closed_by_gateway.contains(&serve.conn),
                            "chunk served on {:?} after the gateway closed it",
                            serve.conn
                        );
                    }
                }
            }
        }
        for log in self.gateway.conversations() {
            let head = log.head();
            let seen = self.heads.entry(log.id()).or_insert(0);
            assert!(
                head >= *seen,
                "head of {:?} went back from {} to {}",
                log.id(),
                seen,
                head
            );
            *seen = head;
        }
        for (&conv, &seen) in &self.heads {
            assert!(
                self.gateway.conversation_head(conv).is_some(),
                "{conv:?} (head {seen}) disappeared"
            );
        }
    }

    /// Durability: a gateway recovered from the disk knows what the live one committed.
    fn check_recovery(&self) {
        let recovered = Gateway::recover(
            self.config.clone(),
            self.now,
            &self.disk,
            Box::new(SimRng::from_seed(1)),
        )
        .expect("recovery from committed data succeeds");
        let live: Vec<(ConversationId, u64)> = self
            .gateway
            .conversations()
            .map(|log| (log.id(), log.head()))
            .collect();
        let back: Vec<(ConversationId, u64)> = recovered
            .conversations()
            .map(|log| (log.id(), log.head()))
            .collect();
        assert_eq!(live, back, "recovered conversations and heads differ");
        for d in 0..=DEVICES_MAX {
            let d = device(d);
            assert_eq!(
                self.gateway.key_packages_left(d),
                recovered.key_packages_left(d),
                "recovered KeyPackage pool of {d:?} differs"
            );
        }
        for k in 0..3 {
            let live: Vec<DeviceId> = self.gateway.devices_of(user(k)).collect();
            let back: Vec<DeviceId> = recovered.devices_of(user(k)).collect();
            assert_eq!(live, back, "recovered devices of user {k} differ");
        }
        let (live_index, back_index) = (self.gateway.chunk_index(), recovered.chunk_index());
        live_index
            .consistency()
            .expect("the live chunk index is consistent");
        back_index
            .consistency()
            .expect("the recovered chunk index is consistent");
        assert_eq!(
            live_index.chunk_count(),
            back_index.chunk_count(),
            "recovered chunk count differs"
        );
        for k in 0..=DEVICES_MAX {
            assert_eq!(
                live_index.usage(user(k)),
                back_index.usage(user(k)),
                "recovered file quota use of user {k} differs"
            );
        }
        for log in self.gateway.conversations() {
            let conv = log.id();
            let back = recovered.conversations().find(|l| l.id() == conv);
            assert_eq!(
                Some(log.members()),
                back.map(|l| l.members()),
                "recovered members of {conv:?} differ"
            );
            for d in 0..=DEVICES_MAX {
                let d = device(d);
                assert_eq!(
                    self.gateway.cursor(d, conv),
                    recovered.cursor(d, conv),
                    "recovered cursor of {d:?} in {conv:?} differs"
                );
            }
            for seq in 1..=log.head() {
                assert_eq!(
                    log.get(seq),
                    back.and_then(|l| l.get(seq)),
                    "recovered entry {seq} of {conv:?} differs"
                );
            }
        }
    }
}

/// Interprets fuzzer bytes as up to [`GATEWAY_OPS_MAX`] gateway operations and checks, after every
/// step, that each frame the gateway sends decodes, that nothing is sent on a connection after the
/// gateway closed it and that no conversation head goes back; at the end, that a gateway recovered
/// from the committed disk has the same conversations, members, heads, entries and cursors.
pub fn run_gateway_ops(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let mut harness = Harness::new();
    for _ in 0..GATEWAY_OPS_MAX {
        if u.is_empty() {
            break;
        }
        let Ok(op) = Op::arbitrary(&mut u) else {
            break;
        };
        harness.step(op);
    }
    harness.check_recovery();
}

/// The operations [`run_gateway_ops`] would run for `data`, one `Debug` line each: for triaging a
/// crash input (`cargo fuzz` shows only bytes).
pub fn describe_gateway_ops(data: &[u8]) -> Vec<String> {
    let mut u = Unstructured::new(data);
    let mut ops = Vec::new();
    for _ in 0..GATEWAY_OPS_MAX {
        if u.is_empty() {
            break;
        }
        let Ok(op) = Op::arbitrary(&mut u) else {
            break;
        };
        ops.push(format!("{op:?}"));
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_short_inputs_run() {
        run_gateway_ops(&[]);
        run_gateway_ops(&[0]);
        run_gateway_ops(&[0xff; 64]);
        run_scenario_parse(b"");
        run_scenario_parse(b"name x\n\xff\xfe");
    }

    #[test]
    fn a_session_that_sends_survives_recovery() {
        let mut h = Harness::new();
        h.step(Op::Accept(0));
        h.step(Op::Frame(
            0,
            WellFormed::Hello {
                device: 1,
                cursors: vec![],
                resume: false,
                wrong_key: false,
                user: Some(1),
            },
        ));
        h.step(Op::Frame(0, WellFormed::Proof { valid: true }));
        h.step(Op::Frame(
            0,
            WellFormed::Send {
                conversation: 1,
                msg_id: 7,
                after: 0,
                body: b"hi".to_vec(),
            },
        ));
        h.step(Op::Frame(
            0,
            WellFormed::Ack {
                conversation: 1,
                seq: 1,
            },
        ));
        h.step(Op::Frame(
            0,
            WellFormed::KeyPackageUpload {
                packages: vec![b"garbage".to_vec()],
                last_resort: None,
            },
        ));
        h.step(Op::Frame(
            0,
            WellFormed::KeyPackageFetch {
                users: vec![1, 2],
                foreign: false,
            },
        ));
        assert_eq!(
            h.gateway
                .stats()
                .refusals
                .get(sund_model::wire::payload::ErrorCode::KeyPackageRejected),
            1
        );
        // This gateway federates with nobody: another domain's users are refused in words.
        h.step(Op::Frame(
            0,
            WellFormed::KeyPackageFetch {
                users: vec![3],
                foreign: true,
            },
        ));
        assert_eq!(
            h.gateway
                .stats()
                .refusals
                .get(sund_model::wire::payload::ErrorCode::UnknownDomain),
            1
        );
        assert_eq!(
            h.gateway.devices_of(user(1)).collect::<Vec<_>>(),
            vec![device(1)]
        );
        let real = WellFormed::RealKeyPackages {
            owner: 0,
            first: 0,
            count: 3,
            last_resort: true,
        };
        h.step(Op::Frame(0, real));
        assert_eq!(h.gateway.key_packages_left(device(1)), 3);
        let again = WellFormed::RealKeyPackages {
            owner: 0,
            first: 2,
            count: 2,
            last_resort: false,
        };
        h.step(Op::Frame(0, again));
        assert_eq!(
            h.gateway
                .stats()
                .refusals
                .get(sund_model::wire::payload::ErrorCode::KeyPackageRejected),
            2,
            "package 2 is already in the pool"
        );
        let foreign = WellFormed::RealKeyPackages {
            owner: 1,
            first: 0,
            count: 1,
            last_resort: false,
        };
        h.step(Op::Frame(0, foreign));
        assert_eq!(
            h.gateway
                .stats()
                .refusals
                .get(sund_model::wire::payload::ErrorCode::KeyPackageRejected),
            3,
            "device 2's package"
        );
        assert_eq!(h.gateway.key_packages_left(device(1)), 3);
        h.step(Op::Advance(10_000));
        assert_eq!(h.gateway.conversation_head(ConversationId(1)), Some(1));
        assert_eq!(h.gateway.cursor(device(1), ConversationId(1)), 1);
        h.check_recovery();
    }
}
