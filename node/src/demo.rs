//! `sund demo`: a gateway and three devices on loopback over real QUIC and redb. Alice creates
//! a room with Bob and Carol and a DM with Bob (MLS groups: Welcomes through the gateway),
//! encrypted messages flow, the gateway restarts, Alice sends a file into the room (Bob and
//! Carol fetch and verify it, and sign receipts Alice verifies), and at the end the gateway's
//! database is searched for every message text and pieces of the file: the gateway stored
//! ciphertext only.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use std::sync::Arc;

use sund_gateway::driver::{self, GatewayHandle, GatewayOptions};
use sund_model::gateway::GatewayConfig;
use sund_model::ids::{ConversationId, DeviceId, UserId};
use sund_model::node::{ConnectionStatus, NodeEvent};
use sund_node::device::Device;
use sund_node::driver::{self as node_driver, GroupRequest, NodeHandle};
use sund_runtime::environment::Production;

const NAMES: [&str; 3] = ["alice", "bob", "carol"];
const DEADLINE: Duration = Duration::from_secs(60);

async fn start_gateway(dir: &std::path::Path, listen: SocketAddr) -> Result<GatewayHandle, String> {
    let options = GatewayOptions {
        listen,
        environment: Arc::new(Production),
        data_dir: dir.join("gateway"),
        config: GatewayConfig::default(),
        federation: None,
    };
    driver::start(options)
        .await
        .map_err(|e| format!("gateway: {e}"))
}

/// Runs the demo; an error means something did not arrive exactly once.
pub async fn run() -> Result<(), String> {
    let dir =
        tempfile::tempdir().map_err(|e| format!("cannot create a temporary directory: {e}"))?;
    let gateway = start_gateway(dir.path(), "127.0.0.1:0".parse().expect("valid")).await?;
    let addr = gateway.addr;
    say!(
        "[gateway] listening on {addr} over QUIC, data in {}",
        dir.path().join("gateway").display()
    );
    let cert = dir.path().join("gateway/tls/cert.der");

    let mut devices = Vec::new();
    let mut names = BTreeMap::new();
    for name in NAMES {
        let token = gateway
            .enrolment_token(UserId::from_name(name))
            .await
            .ok_or("the gateway stopped")?;
        let device = Device::init(
            &dir.path().join(name),
            &addr.to_string(),
            &cert,
            Some(name),
            Some(&token.to_text()),
        )
        .map_err(|e| e.to_string())?;
        names.insert(device.key.device_id(), name);
        say!(
            "[{name:<7}] device {} set up with a one-time enrolment token",
            device.key.device_id()
        );
        devices.push(device);
    }
    let mut nodes = Vec::new();
    for device in &devices {
        // The demo's devices live for one run in a temporary directory: nothing is kept for a
        // later one.
        let options = node_driver::NodeOptions {
            hold_until_taken: false,
            timers: None,
            ..device.options()
        };
        nodes.push(
            node_driver::start(options)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let mut transcript = Transcript {
        names,
        conversations: BTreeMap::new(),
        delivered: BTreeMap::new(),
        connected: BTreeMap::new(),
    };
    // Everyone connects and uploads KeyPackages; then Alice creates the room and the DM.
    transcript.wait_connected(&mut nodes).await?;
    let bob = UserId::from_name("bob");
    let carol = UserId::from_name("carol");
    let room = group(&nodes[0], GroupRequest::Room(vec![bob, carol])).await?;
    let dm = group(&nodes[0], GroupRequest::Dm(bob)).await?;
    transcript.conversations.insert(room, "demo-room");
    transcript.conversations.insert(dm, "alice-bob");
    say!("[alice  ] creates MLS room demo-room (bob, carol) and a DM with bob");
    let mut expected: BTreeMap<(usize, ConversationId), u64> = BTreeMap::new();
    // Each group's first commit (seq 1) reaches its creator; the others join from Welcomes.
    expected.insert((0, room), 1);
    expected.insert((0, dm), 1);
    for (who, conv) in [(1, room), (2, room), (1, dm)] {
        expected.insert((who, conv), 1);
    }
    transcript.wait(&mut nodes, &expected).await?;

    let first = [
        (0, room, "hello everyone"),
        (1, room, "hi alice!"),
        (0, dm, "just between us, bob"),
        (2, room, "carol here"),
    ];
    for (who, conv, text) in first {
        send(&nodes[who], who, conv, text, &mut expected, &transcript).await?;
    }
    transcript.wait(&mut nodes, &expected).await?;

    say!("[gateway] graceful restart: drain, stop, start again from the same data directory");
    let stats = gateway.shutdown().await.map_err(|e| e.to_string())?;
    say!(
        "[gateway] stopped after sequencing {} messages and taking {} MLS KeyPackages from the devices; restarting",
        stats.delivery.sequenced, stats.key_packages.uploaded
    );
    let gateway = start_gateway(dir.path(), addr).await?;

    let second = [
        (1, room, "did the gateway just restart?"),
        (0, room, "it did, and nothing was lost"),
        (1, dm, "see you later"),
    ];
    for (who, conv, text) in second {
        send(&nodes[who], who, conv, text, &mut expected, &transcript).await?;
    }
    transcript.wait(&mut nodes, &expected).await?;

    let file =
        send_file_into_room(dir.path(), &devices[0], &mut nodes, room, &mut transcript).await?;

    let total: u64 = transcript.delivered.values().map(|v| v.len() as u64).sum();
    for node in nodes {
        node.stop().await.map_err(|e| e.to_string())?;
    }
    gateway.shutdown().await.map_err(|e| e.to_string())?;
    let mut texts: Vec<&[u8]> = first
        .iter()
        .chain(second.iter())
        .map(|m| m.2.as_bytes())
        .collect();
    // The file's name, and 64 bytes from each of its first, middle and last parts.
    let quarter = file.len() / 4;
    texts.push(FILE_NAME.as_bytes());
    for at in [16, 2 * quarter, file.len() - 80] {
        texts.push(&file[at..at + 64]);
    }
    search_gateway_database(&dir.path().join("gateway/gateway.redb"), &texts, &devices)?;
    say!("demo: {total} deliveries (messages, commits, a file and its receipts), each exactly once and in seq order; the gateway restart lost nothing");
    Ok(())
}

/// The demo's file.
const FILE_NAME: &str = "report.bin";
/// Its size: a few chunks.
const FILE_BYTES: usize = 3_000_000;

/// Alice sends a file into the room; Bob's and Carol's devices fetch it, verify every chunk
/// and save it; each signs a receipt, which Alice's device verifies. Returns the file's bytes.
async fn send_file_into_room(
    dir: &std::path::Path,
    alice: &Device,
    nodes: &mut [NodeHandle],
    room: ConversationId,
    transcript: &mut Transcript,
) -> Result<Vec<u8>, String> {
    use sund_model::files::{stream_chunker, FileName, FileSecret, ManifestBuilder};
    // Bytes that do not repeat, so that the chunker cuts them as it would a real file.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..FILE_BYTES)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    let files = dir.join("files");
    let saved = dir.join("saved");
    for d in [&files, &saved] {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let path = files.join(FILE_NAME);
    std::fs::write(&path, &data).map_err(|e| format!("{}: {e}", path.display()))?;
    let secret = FileSecret::for_conversation(&alice.key, room);
    let name = FileName::new(FILE_NAME).map_err(|e| e.to_string())?;
    let mut builder = ManifestBuilder::new(name, secret.clone());
    for chunk in stream_chunker(&secret, &data[..]) {
        let chunk = chunk.map_err(|e| e.to_string())?;
        builder.push(&chunk.data).map_err(|e| e.to_string())?;
    }
    let manifest = builder.finish();
    let chunks = manifest.chunks.len();
    let source = path.to_str().ok_or("a temporary path that is not UTF-8")?;
    nodes[0]
        .send_file(room, manifest, Bytes::from(source.to_string()))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    say!(
        "[alice  ] -> demo-room: a file, {FILE_NAME} ({} MB in {chunks} chunks, each sealed; the name and key travel inside an MLS message)",
        FILE_BYTES / 1_000_000
    );
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut saved_by = Vec::new();
    let mut receipts = Vec::new();
    while saved_by.len() < 2 || receipts.len() < 2 {
        if tokio::time::Instant::now() > deadline {
            return Err(format!("the file did not arrive within {DEADLINE:?}: saved by {saved_by:?}, receipts from {receipts:?}"));
        }
        for i in 0..nodes.len() {
            while let Ok(event) = nodes[i].events.try_recv() {
                let me = NAMES[i];
                match event {
                    NodeEvent::FileOffered { digest, .. } => {
                        nodes[i]
                            .fetch_file(room, digest)
                            .await
                            .map_err(|e| e.to_string())?;
                        say!("[{me:<7}] fetches {FILE_NAME}: only the chunks it lacks");
                    }
                    NodeEvent::FileComplete { digest, .. } => {
                        let into = saved.join(me);
                        std::fs::create_dir_all(&into)
                            .map_err(|e| format!("{}: {e}", into.display()))?;
                        let written = nodes[i]
                            .save_file(room, digest, into)
                            .await
                            .map_err(|e| e.to_string())??;
                        let back = std::fs::read(&written)
                            .map_err(|e| format!("{}: {e}", written.display()))?;
                        if back != data {
                            return Err(format!("{me} saved other bytes than alice sent"));
                        }
                        say!("[{me:<7}] has {FILE_NAME}: every chunk verified, saved whole, the same bytes");
                        saved_by.push(me);
                    }
                    NodeEvent::FileFailed { reason, .. } => {
                        return Err(format!("{me} could not fetch the file: {reason}"));
                    }
                    NodeEvent::FileReceipt {
                        device, verified, ..
                    } => {
                        let who = transcript.names.get(&device).copied().unwrap_or("?");
                        if !verified {
                            return Err(format!("{me} could not verify {who}'s receipt"));
                        }
                        say!("[{me:<7}] {FILE_NAME} delivered to {who}, verified (a receipt signed with {who}'s device key)");
                        receipts.push(who);
                    }
                    other => transcript.record(i, other)?,
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(data)
}

/// Asks for a group and returns its conversation.
async fn group(node: &NodeHandle, request: GroupRequest) -> Result<ConversationId, String> {
    node.group(request)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// Reads the gateway's database file and looks for every message text: none may be there. As a
/// control, the device ids the gateway does store in the clear must be found.
fn search_gateway_database(
    path: &std::path::Path,
    texts: &[&[u8]],
    devices: &[Device],
) -> Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    let control = devices
        .iter()
        .all(|d| contains(&d.key.device_id().to_bytes()));
    if !control {
        return Err("the search does not find what the gateway stores in the clear".into());
    }
    if let Some(text) = texts.iter().find(|t| contains(t)) {
        return Err(format!(
            "the gateway's database holds the plaintext {:?}",
            String::from_utf8_lossy(text)
        ));
    }
    say!(
        "[gateway] searched its database ({} KiB) for all {} message texts, the file's name and pieces of its bytes: none found, only ciphertext",
        bytes.len() / 1024,
        texts.len() - 4
    );
    Ok(())
}

async fn send(
    node: &NodeHandle,
    who: usize,
    conv: ConversationId,
    text: &str,
    expected: &mut BTreeMap<(usize, ConversationId), u64>,
    transcript: &Transcript,
) -> Result<(), String> {
    node.send(conv, Bytes::from(text.to_string()))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    say!(
        "[{:<7}] -> {}: {text}",
        NAMES[who],
        transcript.conversations[&conv]
    );
    let members: &[usize] = if transcript.conversations[&conv] == "demo-room" {
        &[0, 1, 2]
    } else {
        &[0, 1]
    };
    for &m in members {
        *expected.entry((m, conv)).or_default() += 1;
    }
    Ok(())
}

struct Transcript {
    names: BTreeMap<DeviceId, &'static str>,
    conversations: BTreeMap<ConversationId, &'static str>,
    /// Per (device, conversation): the seqs delivered (messages and commits), in order.
    delivered: BTreeMap<(usize, ConversationId), Vec<u64>>,
    /// Devices whose session is open.
    connected: BTreeMap<usize, bool>,
}

impl Transcript {
    /// Waits until every device has a session, and a little longer for its KeyPackages.
    async fn wait_connected(&mut self, nodes: &mut [NodeHandle]) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while self.connected.values().filter(|c| **c).count() < nodes.len() {
            for (i, node) in nodes.iter_mut().enumerate() {
                while let Ok(event) = node.events.try_recv() {
                    self.record(i, event)?;
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "the devices did not all connect within {DEADLINE:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(())
    }

    /// Drains events until every device has every message it should, checking order and
    /// uniqueness as it goes.
    async fn wait(
        &mut self,
        nodes: &mut [NodeHandle],
        expected: &BTreeMap<(usize, ConversationId), u64>,
    ) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let done = expected
                .iter()
                .all(|(k, n)| self.delivered.get(k).map_or(0, |v| v.len() as u64) >= *n);
            if done {
                return Ok(());
            }
            for (i, node) in nodes.iter_mut().enumerate() {
                while let Ok(event) = node.events.try_recv() {
                    self.record(i, event)?;
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!("not everything arrived within {DEADLINE:?}: expected {expected:?}, delivered {:?}", self.delivered));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn name_of(&self, conversation: ConversationId) -> &'static str {
        self.conversations
            .get(&conversation)
            .copied()
            .unwrap_or("?")
    }

    fn record(&mut self, device: usize, event: NodeEvent) -> Result<(), String> {
        let me = NAMES[device];
        match event {
            NodeEvent::Delivered {
                conversation,
                seq,
                sender,
                body,
                ..
            } => {
                let seqs = self.delivered.entry((device, conversation)).or_default();
                if seqs.last().is_none_or(|&last| seq != last + 1) {
                    return Err(format!(
                        "{me} got seq {seq} of {conversation} after {seqs:?}"
                    ));
                }
                seqs.push(seq);
                let from = self.names.get(&sender).copied().unwrap_or("?");
                let what = if let Some(Ok(file)) = sund_model::files::FileMessage::decode(&body) {
                    format!("a file, {}", file.manifest.name.as_str())
                } else if sund_model::node::files::Receipt::decode_message(&body).is_some() {
                    "a file receipt".to_string()
                } else {
                    crate::display::body(&body)
                };
                say!(
                    "[{me:<7}] <- {} seq {seq} from {from}: {what}",
                    self.name_of(conversation),
                );
            }
            NodeEvent::Joined {
                conversation, seq, ..
            } => {
                // A joiner reads from the commit that added it on.
                self.delivered
                    .entry((device, conversation))
                    .or_default()
                    .push(seq);
                say!(
                    "[{me:<7}] joined {} from its Welcome (epoch 1)",
                    self.name_of(conversation)
                );
            }
            NodeEvent::GroupChanged {
                conversation,
                seq,
                epoch,
                added,
                ..
            } => {
                let seqs = self.delivered.entry((device, conversation)).or_default();
                seqs.push(seq);
                let added: Vec<&str> = added
                    .iter()
                    .map(|d| self.names.get(d).copied().unwrap_or("?"))
                    .collect();
                say!(
                    "[{me:<7}] {} is at epoch {epoch}: added {}",
                    self.name_of(conversation),
                    added.join(", ")
                );
            }
            NodeEvent::Undecryptable { reason, .. } => {
                return Err(format!("{me} could not decrypt a message: {reason}"))
            }
            NodeEvent::Status(status) => {
                self.connected
                    .insert(device, status == ConnectionStatus::Connected);
                say!("[{me:<7}] connection {status:?}");
            }
            NodeEvent::Refused { message, .. } => {
                return Err(format!("{me} was refused: {message}"))
            }
            _ => {}
        }
        Ok(())
    }
}
