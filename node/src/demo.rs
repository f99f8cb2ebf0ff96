//! `sund demo`: a gateway and three devices on loopback over real QUIC and redb, messages
//! flowing, a gateway restart survived, a readable transcript.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use sund_gateway::committer::CommitMode;
use sund_gateway::driver::{self, GatewayHandle, GatewayOptions};
use sund_gateway::entropy::EntropySource;
use sund_gateway::quic::Socket;
use sund_model::gateway::{GatewayConfig, GatewayInput};
use sund_model::ids::{ConversationId, DeviceId};
use sund_model::node::NodeEvent;
use sund_node::device::Device;
use sund_node::driver::{self as node_driver, NodeHandle};

const NAMES: [&str; 3] = ["alice", "bob", "carol"];
const DEADLINE: Duration = Duration::from_secs(60);

async fn start_gateway(dir: &std::path::Path, listen: SocketAddr) -> Result<GatewayHandle, String> {
    let options = GatewayOptions {
        socket: Socket::Bind(listen),
        entropy: EntropySource::Os,
        clock: None,
        data_dir: dir.join("gateway"),
        config: GatewayConfig::default(),
        commit: CommitMode::Pipelined,
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
    println!(
        "[gateway] listening on {addr} over QUIC, data in {}",
        dir.path().join("gateway").display()
    );
    let cert = dir.path().join("gateway/tls/cert.der");

    let mut devices = Vec::new();
    let mut names = BTreeMap::new();
    for name in NAMES {
        let device = Device::init(&dir.path().join(name), addr, &cert, Some(name))
            .map_err(|e| e.to_string())?;
        gateway
            .admin(GatewayInput::AdmitDevice(device.key.public()))
            .await;
        names.insert(device.key.device_id(), name);
        println!("[{name:<7}] device {} admitted", device.key.device_id());
        devices.push(device);
    }
    let room = ConversationId::from_name("demo-room");
    let dm = ConversationId::from_name("alice-bob");
    let ids: Vec<DeviceId> = devices.iter().map(|d| d.key.device_id()).collect();
    gateway
        .admin(GatewayInput::CreateConversation(room, ids.clone()))
        .await;
    gateway
        .admin(GatewayInput::CreateConversation(dm, ids[..2].to_vec()))
        .await;
    let conversations: BTreeMap<ConversationId, &str> = [(room, "demo-room"), (dm, "alice-bob")]
        .into_iter()
        .collect();
    println!("[gateway] conversations: demo-room (alice, bob, carol), alice-bob (alice, bob)");

    let mut nodes = Vec::new();
    for device in &devices {
        nodes.push(
            node_driver::start(device.options())
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let mut expected: BTreeMap<(usize, ConversationId), u64> = BTreeMap::new();
    let mut transcript = Transcript {
        names,
        conversations,
        delivered: BTreeMap::new(),
    };

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

    println!("[gateway] graceful restart: drain, stop, start again from the same data directory");
    let stats = gateway.shutdown().await.map_err(|e| e.to_string())?;
    println!(
        "[gateway] stopped after sequencing {} messages and taking {} MLS KeyPackages from the devices; restarting",
        stats.sequenced, stats.key_packages_uploaded
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
    println!("demo: {total} deliveries, each exactly once and in seq order; the gateway restart lost nothing");
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
    println!(
        "[{:<7}] -> {}: {text}",
        NAMES[who], transcript.conversations[&conv]
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
    /// Per (device, conversation): the seqs delivered, in order.
    delivered: BTreeMap<(usize, ConversationId), Vec<u64>>,
}

impl Transcript {
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
                if seqs.last().is_some_and(|&last| seq != last + 1) || (seqs.is_empty() && seq != 1)
                {
                    return Err(format!(
                        "{me} got seq {seq} of {conversation} after {seqs:?}"
                    ));
                }
                seqs.push(seq);
                let from = self.names.get(&sender).copied().unwrap_or("?");
                println!(
                    "[{me:<7}] <- {} seq {seq} from {from}: {}",
                    self.conversations[&conversation],
                    String::from_utf8_lossy(&body)
                );
            }
            NodeEvent::Status(status) => println!("[{me:<7}] connection {status:?}"),
            NodeEvent::Refused { message, .. } => {
                return Err(format!("{me} was refused: {message}"))
            }
            _ => {}
        }
        Ok(())
    }
}
