//! Tests: real devices (a `Node` with MLS each) on the two gateways of [`super::test_pair`],
//! frames moved between them and entries between the gateways until nothing moves. Shared by
//! the tests of MLS conversations across domains.

use super::test_pair::{Pair, NOW};
use super::{GatewayInput, GatewayOutput};
use crate::ids::{ConnectionId, DeviceId, UserId};
use crate::testing::drain_gateway;
use crate::wire::{Frame, Payload};

/// A real device (a `Node` with MLS) on a connection of its own to gateway `at`.
pub(crate) struct Device {
    pub(crate) at: usize,
    pub(crate) conn: ConnectionId,
    pub(crate) node: crate::node::Node,
    pub(crate) store: crate::env::MemStore,
    pub(crate) events: Vec<crate::node::NodeEvent>,
    pub(crate) sent: Vec<Frame>,
}

pub(crate) fn device(at: usize, seed: u8, user: UserId) -> Device {
    use crate::mls::device::DeviceMlsConfig;
    use crate::mls::{LifetimePolicy, Randomness};
    let mut config =
        crate::node::NodeConfig::new(crate::identity::DeviceKey::from_seed([seed; 32]));
    config.user = Some(user);
    config.mls = Some(DeviceMlsConfig {
        randomness: Randomness::Simulation,
        lifetime: LifetimePolicy::Unbounded,
        pool_target: 4,
        decrypt_sample: None,
        verified: None,
    });
    let store = crate::env::MemStore::default();
    let entropy = Box::new(crate::testing::TestEntropy(u64::from(seed)));
    let node = crate::node::Node::recover(config, entropy, NOW, &store).unwrap();
    Device {
        at,
        conn: ConnectionId(5000 + u64::from(seed)),
        node,
        store,
        events: Vec::new(),
        sent: Vec::new(),
    }
}

/// Moves frames between devices and their gateways, and entries between the
/// gateways, until nothing moves.
pub(crate) fn run(w: &mut Pair, devices: &mut [Device]) {
    use crate::node::{NodeInput, NodeOutput};
    for _ in 0..200 {
        let mut moved = false;
        for d in devices.iter_mut() {
            if d.node.poll_timeout().is_some_and(|at| at <= NOW) {
                d.node.handle_timeout(NOW);
            }
            while let Some(mut ready) = d.node.poll_ready() {
                let mut outputs = ready.take_eager();
                outputs.extend(ready.commit(&mut d.store).unwrap());
                for output in outputs {
                    let (g, _) = &mut w.gateways[d.at];
                    match output {
                        NodeOutput::Connect => {
                            g.handle(NOW, GatewayInput::Accepted(d.conn));
                            d.node.handle(NOW, NodeInput::Connected(d.conn));
                            moved = true;
                        }
                        NodeOutput::Send(conn, bytes) => {
                            d.sent.push(Frame::decode(&bytes, u32::MAX).unwrap());
                            g.handle(NOW, GatewayInput::Frame(conn, bytes));
                            moved = true;
                        }
                        NodeOutput::Event(event) => d.events.push(event),
                        _ => {}
                    }
                }
            }
        }
        let mut released: Vec<(usize, GatewayOutput)> = Vec::new();
        for at in 0..2 {
            let (g, store) = &mut w.gateways[at];
            released.extend(drain_gateway(g, store).into_iter().map(|o| (at, o)));
        }
        let handed = w.settle();
        for at in 0..2 {
            released.extend(
                std::mem::take(&mut w.released[at])
                    .into_iter()
                    .map(|o| (at, o)),
            );
        }
        for (at, output) in released {
            if let GatewayOutput::Send(conn, bytes) = output {
                if let Some(d) = devices.iter_mut().find(|d| d.at == at && d.conn == conn) {
                    d.node.handle(NOW, NodeInput::Frame(conn, bytes));
                    moved = true;
                }
            }
        }
        if !moved && handed.is_empty() && !wake_short_waits(devices) {
            return;
        }
    }
    panic!("the devices and gateways never went quiet");
}

/// Once all is quiet: devices told to send again within a second (a DM's claim across
/// domains waits for the peer's answer) are woken at their deadline. True if any was.
fn wake_short_waits(devices: &mut [Device]) -> bool {
    let soon = NOW + core::time::Duration::from_secs(1);
    let mut woke = false;
    for d in devices.iter_mut() {
        if let Some(at) = d.node.poll_timeout().filter(|at| *at > NOW && *at <= soon) {
            d.node.handle_timeout(at);
            woke = true;
        }
    }
    woke
}

/// The devices that alice's commits sent to a.example add, and whether each carried
/// a Welcome.
pub(crate) fn added_by_commits(alice: &Device) -> Vec<(Vec<DeviceId>, bool)> {
    use crate::mls::commit_authority::read_message;
    use crate::mls::group_ops::GroupOps;
    alice
        .sent
        .iter()
        .filter_map(|f| match &f.payload {
            Payload::Send(send) => {
                let (_, aad) = read_message(&send.body).ok()?;
                let ops = GroupOps::decode(&aad).ok()?;
                let added = ops
                    .added
                    .iter()
                    .map(|a| DeviceId::from_bytes(*a.device))
                    .collect();
                Some((added, send.welcome.is_some()))
            }
            _ => None,
        })
        .collect()
}

/// The bodies `d` was delivered in `conv` from `from`, in order.
pub(crate) fn read(
    d: &Device,
    conv: crate::ids::ConversationId,
    from: &Device,
) -> Vec<bytes::Bytes> {
    let from = from.node.device();
    d.events
        .iter()
        .filter_map(|e| match e {
            crate::node::NodeEvent::Delivered {
                conversation,
                body,
                sender,
                ..
            } if *conversation == conv && *sender == from => Some(body.clone()),
            _ => None,
        })
        .collect()
}
