//! A gateway and nodes wired together frame by frame, for the integration tests: every `Ready`
//! is committed before its outputs move, and nothing moves until the test says so.

#![allow(dead_code)] // each test file uses a part

use std::collections::BTreeMap;

use bytes::Bytes;

use sund_model::env::MemStore;
use sund_model::files::seal_chunk;
use sund_model::gateway::transfers::read_chunk;
use sund_model::gateway::{
    AdminAnswer, AdminCommand, Gateway, GatewayConfig, GatewayInput, GatewayOutput,
};
use sund_model::identity::DeviceKey;
use sund_model::ids::{ConnectionId, DeviceId, UserId};
use sund_model::mls::device::DeviceMlsConfig;
use sund_model::mls::{LifetimePolicy, Randomness};
use sund_model::node::{Node, NodeConfig, NodeEvent, NodeInput, NodeOutput};
use sund_model::testing::{drain_gateway, drain_node};
use sund_model::time::Instant;
use sund_model::wire::payload::ChunkHead;
use sund_model::wire::payload::{KeyPackageFetch, KeyPackages};
use sund_model::wire::{Frame, Payload, Routing, PAYLOAD_BYTES_MAX};

/// Deterministic entropy for the tests (one stream per starting value).
pub use sund_model::testing::TestEntropy as Counter;

/// An operator's command as a gateway input (its answer is released with its commit).
pub fn admin(command: AdminCommand) -> GatewayInput {
    GatewayInput::Admin {
        request: 1,
        command,
    }
}

/// The answer to an admin command among released outputs.
pub fn answer_in(outputs: &[GatewayOutput]) -> Option<AdminAnswer> {
    outputs.iter().find_map(|o| match o {
        GatewayOutput::Admin { answer, .. } => Some(answer.clone()),
        _ => None,
    })
}

pub fn mls_config() -> DeviceMlsConfig {
    DeviceMlsConfig {
        randomness: Randomness::Simulation,
        lifetime: LifetimePolicy::Unbounded,
        pool_target: 12,
        decrypt_sample: None,
        verified: None,
    }
}

pub fn node_config(seed: u8, user: &str) -> NodeConfig {
    let mut config = NodeConfig::new(DeviceKey::from_seed([seed; 32]));
    config.user = Some(UserId::of(user, "localhost"));
    config.mls = Some(mls_config());
    config
}

/// One gateway, some nodes, each node on its own connection; frames move until nothing moves.
pub struct Net {
    pub now: Instant,
    pub gateway: Gateway,
    pub gateway_store: MemStore,
    pub nodes: BTreeMap<u64, (Node, MemStore)>,
    /// Events each node's application heard, in order.
    pub events: BTreeMap<u64, Vec<NodeEvent>>,
    /// Frames the gateway sent to each connection, decoded, for the test to inspect.
    pub seen: BTreeMap<u64, Vec<Frame>>,
    /// Answers to admin commands, in order.
    pub answers: Vec<AdminAnswer>,
    /// Chunk streams the gateway served to each connection: the head frame and the bytes.
    pub chunks: BTreeMap<u64, Vec<(Frame, Vec<u8>)>>,
    /// Files nodes send, by the source they name: the driver reads chunks from here.
    pub sources: BTreeMap<Bytes, Vec<u8>>,
    /// Chunk streams each node sent.
    pub chunks_sent: BTreeMap<u64, usize>,
    /// Chunk streams the gateway serves that are lost on the way (the next this many).
    pub lose_served: usize,
    /// Restarts so far: each restart's entropy is its own, as a real device's would be (a
    /// repeated seed would repeat message ids).
    pub restarts: u64,
    /// Frames from the gateway that are held back instead of delivered (late answers).
    pub hold: Option<fn(&Frame) -> bool>,
    /// The frames held back, by connection, in order.
    pub held: Vec<(u64, Bytes)>,
}

impl Net {
    pub fn new() -> Net {
        Net::with_config(GatewayConfig {
            open_enrolment: true,
            ..GatewayConfig::default()
        })
    }

    pub fn with_config(config: GatewayConfig) -> Net {
        Net {
            now: Instant(1_000_000),
            gateway: Gateway::new(config, Instant(1_000_000), Box::new(Counter(77))),
            gateway_store: MemStore::default(),
            nodes: BTreeMap::new(),
            seen: BTreeMap::new(),
            events: BTreeMap::new(),
            answers: Vec::new(),
            chunks: BTreeMap::new(),
            sources: BTreeMap::new(),
            chunks_sent: BTreeMap::new(),
            lose_served: 0,
            restarts: 0,
            hold: None,
            held: Vec::new(),
        }
    }

    pub fn add(&mut self, conn: u64, config: NodeConfig) {
        let store = MemStore::default();
        let node = Node::recover(config, Box::new(Counter(conn)), self.now, &store).unwrap();
        self.nodes.insert(conn, (node, store));
        self.settle();
    }

    /// Restarts a node from its store alone.
    pub fn restart(&mut self, conn: u64, config: NodeConfig) {
        let (_, store) = self.nodes.remove(&conn).unwrap();
        self.gateway
            .handle(self.now, GatewayInput::Closed(ConnectionId(conn)));
        self.restarts += 1;
        let seed = conn + 100 * self.restarts;
        let node = Node::recover(config, Box::new(Counter(seed)), self.now, &store).unwrap();
        self.nodes.insert(conn, (node, store));
        self.settle();
    }

    /// Commits what a node has written and drops its outputs, as if it crashed right after its
    /// store commit and before anything left.
    pub fn commit_and_lose_outputs(&mut self, conn: u64) {
        let (node, store) = self.nodes.get_mut(&conn).unwrap();
        while let Some(ready) = node.poll_ready() {
            ready.commit(store).unwrap();
        }
    }

    /// Moves time to the gateway's next timer, fires it and settles; repeated while `more` holds
    /// (at most 10,000 times).
    pub fn run_gateway_timers_while(&mut self, mut more: impl FnMut(&Gateway) -> bool) {
        for _ in 0..10_000 {
            if !more(&self.gateway) {
                return;
            }
            self.now = self.gateway.poll_timeout();
            self.gateway.handle_timeout(self.now);
            self.settle();
        }
        panic!("the gateway's timers did not get there");
    }

    /// Delivers everything until quiet; every Ready is committed before its outputs move.
    pub fn settle(&mut self) {
        for _ in 0..1000 {
            if !self.step() {
                return;
            }
        }
        panic!("the network did not settle");
    }

    /// One round: every node's outputs go to the gateway, then the gateway's to the nodes
    /// (what the nodes make of them waits for the next round). False if nothing moved.
    pub fn step(&mut self) -> bool {
        {
            let mut moved = false;
            let conns: Vec<u64> = self.nodes.keys().copied().collect();
            for conn in conns {
                let (node, store) = self.nodes.get_mut(&conn).unwrap();
                node.handle_timeout(self.now);
                let outputs = drain_node(node, store);
                for output in outputs {
                    moved = true;
                    match output {
                        NodeOutput::Connect => {
                            node.handle(self.now, NodeInput::Connected(ConnectionId(conn)));
                            self.gateway
                                .handle(self.now, GatewayInput::Accepted(ConnectionId(conn)));
                        }
                        NodeOutput::Send(_, bytes) => self
                            .gateway
                            .handle(self.now, GatewayInput::Frame(ConnectionId(conn), bytes)),
                        NodeOutput::Event(event) => {
                            self.events.entry(conn).or_default().push(event)
                        }
                        NodeOutput::Close(_) => {}
                        NodeOutput::SendChunk(chunk) => {
                            // As the node driver does: read the source, seal, check, send.
                            let file = &self.sources[&chunk.source];
                            let entry = chunk.manifest.chunks[chunk.index];
                            let start = chunk.offset as usize;
                            let plain = &file[start..start + entry.len as usize];
                            let (_, sealed) = seal_chunk(&chunk.manifest.secret, plain);
                            assert_eq!(sealed.id, chunk.id, "the source changed");
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
                            *self.chunks_sent.entry(conn).or_default() += 1;
                            self.gateway.handle(
                                self.now,
                                GatewayInput::Chunk {
                                    conn: chunk.conn,
                                    head,
                                    body: sealed.ciphertext.into(),
                                },
                            );
                        }
                    }
                }
            }
            let outputs = drain_gateway(&mut self.gateway, &mut self.gateway_store);
            for output in outputs {
                if let GatewayOutput::Admin { answer, .. } = &output {
                    self.answers.push(answer.clone());
                }
                if let GatewayOutput::ServeChunk(serve) = &output {
                    moved = true;
                    match read_chunk(&self.gateway_store, serve).unwrap() {
                        Some(_) if self.lose_served > 0 => self.lose_served -= 1,
                        Some(bytes) => {
                            let head_bytes = serve.head();
                            let head = Frame::decode(&head_bytes, PAYLOAD_BYTES_MAX).unwrap();
                            if let Some((node, _)) = self.nodes.get_mut(&serve.conn.0) {
                                node.handle(
                                    self.now,
                                    NodeInput::Chunk {
                                        conn: serve.conn,
                                        head: head_bytes,
                                        body: bytes.clone().into(),
                                    },
                                );
                            }
                            self.chunks
                                .entry(serve.conn.0)
                                .or_default()
                                .push((head, bytes));
                        }
                        None => self
                            .gateway
                            .handle(self.now, GatewayInput::ChunkDamaged(serve.clone())),
                    }
                }
                if let GatewayOutput::Send(conn, bytes) = output {
                    moved = true;
                    let frame = Frame::decode(&bytes, PAYLOAD_BYTES_MAX).unwrap();
                    if self.hold.is_some_and(|hold| hold(&frame)) {
                        self.held.push((conn.0, bytes));
                        continue;
                    }
                    self.seen.entry(conn.0).or_default().push(frame);
                    if let Some((node, _)) = self.nodes.get_mut(&conn.0) {
                        node.handle(self.now, NodeInput::Frame(conn, bytes));
                    }
                }
            }
            moved
        }
    }

    /// Delivers the held frame at `index` (late) and settles.
    pub fn release_held(&mut self, index: usize) {
        let (conn, bytes) = self.held.remove(index);
        if let Some((node, _)) = self.nodes.get_mut(&conn) {
            node.handle(self.now, NodeInput::Frame(ConnectionId(conn), bytes));
        }
        self.settle();
    }

    /// Runs an operator's command against the gateway's store (frames it releases are
    /// delivered) and returns its answer.
    pub fn admin(&mut self, command: AdminCommand) -> AdminAnswer {
        self.gateway.handle(self.now, admin(command));
        self.settle();
        self.answers.pop().expect("an admin command is answered")
    }

    /// A one-time enrolment token for `user`.
    pub fn enrolment_token(&mut self, user: &str) -> sund_model::trust::EnrolmentToken {
        match self.admin(AdminCommand::IssueEnrolmentToken(user.to_string())) {
            AdminAnswer::EnrolmentToken(token, _) => token,
            other => panic!("expected a token: {other:?}"),
        }
    }

    pub fn node(&mut self, conn: u64) -> &mut Node {
        &mut self.nodes.get_mut(&conn).unwrap().0
    }

    pub fn events(&self, conn: u64) -> &[NodeEvent] {
        self.events.get(&conn).map_or(&[], Vec::as_slice)
    }

    pub fn device(&self, conn: u64) -> DeviceId {
        DeviceKey::from_seed([conn as u8; 32]).device_id()
    }

    /// `conn` fetches packages of `user` through the gateway; returns the answer.
    pub fn fetch(&mut self, conn: u64, user: &str) -> KeyPackages {
        let fetch = KeyPackageFetch {
            users: vec![UserId::of(user, "localhost").to_bytes().into()],
            domain: None,
        };
        let bytes = Frame::new(Routing::default(), Payload::KeyPackageFetch(fetch)).encode();
        self.gateway
            .handle(self.now, GatewayInput::Frame(ConnectionId(conn), bytes));
        self.settle();
        self.seen[&conn]
            .iter()
            .rev()
            .find_map(|f| match &f.payload {
                Payload::KeyPackages(k) => Some(k.clone()),
                _ => None,
            })
            .expect("an answer")
    }
}
