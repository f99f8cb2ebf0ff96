//! `sund demo`: a gateway and three devices on loopback over real QUIC and redb. Alice creates
//! a room with Bob and Carol and a DM with Bob (MLS groups: Welcomes through the gateway),
//! encrypted messages flow, the gateway restarts, and at the end the gateway's database is
//! searched for every message text: the gateway stored ciphertext only.

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

    let total: u64 = transcript.delivered.values().map(|v| v.len() as u64).sum();
    for node in nodes {
        node.stop().await.map_err(|e| e.to_string())?;
    }
    gateway.shutdown().await.map_err(|e| e.to_string())?;
    let texts: Vec<&str> = first.iter().chain(second.iter()).map(|m| m.2).collect();
    search_gateway_database(&dir.path().join("gateway/gateway.redb"), &texts, &devices)?;
    say!("demo: {total} deliveries (messages and commits), each exactly once and in seq order; the gateway restart lost nothing");
    Ok(())
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
    texts: &[&str],
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
    if let Some(text) = texts.iter().find(|t| contains(t.as_bytes())) {
        return Err(format!(
            "the gateway's database holds the plaintext {text:?}"
        ));
    }
    say!(
        "[gateway] searched its database ({} KiB) for all {} message texts: none found, only ciphertext",
        bytes.len() / 1024,
        texts.len()
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
                say!(
                    "[{me:<7}] <- {} seq {seq} from {from}: {}",
                    self.name_of(conversation),
                    crate::display::body(&body)
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
