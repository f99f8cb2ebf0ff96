//! Certificate renewal through the real gateway and node state machines: a device renews its
//! certificate over its session once it is within `RENEWAL_WINDOW` of expiry.

mod support;

use std::time::Duration;

use sund_model::node::NodeEvent;
use sund_model::trust::RENEWAL_WINDOW;
use support::{node_config, Net};

const DAY: Duration = Duration::from_secs(24 * 3600);

#[test]
fn a_certificate_close_to_expiry_is_renewed_at_the_next_session_and_kept() {
    let mut net = Net::new();
    net.add(1, node_config(1, "alice"));
    let first = net.node(1).trust().certificate().unwrap().clone();

    // Far from expiry: a new session changes nothing.
    net.now = net.now + DAY * 300;
    net.restart(1, node_config(1, "alice"));
    assert_eq!(net.node(1).trust().certificate(), Some(&first));
    assert_eq!(net.gateway.stats().registry.renewals, 0);

    // Inside the window: the session renews it, for the same key and user.
    net.now = net.now + DAY * 40;
    let now_s = net.now.as_micros() / 1_000_000;
    assert!(first.not_after_s - now_s < RENEWAL_WINDOW.as_secs());
    net.restart(1, node_config(1, "alice"));
    let renewed = net.node(1).trust().certificate().unwrap().clone();
    assert!(renewed.serial > first.serial);
    assert!(renewed.not_after_s > first.not_after_s + 300 * 24 * 3600);
    assert_eq!(renewed.device_key, first.device_key);
    assert_eq!(renewed.user, first.user);
    assert!(net.events(1).contains(&NodeEvent::Registered {
        serial: renewed.serial
    }));
    assert_eq!(net.gateway.stats().registry.renewals, 1);
    assert!(net.node(1).is_connected());

    // The renewed certificate is durable, and the next session neither renews nor registers.
    net.restart(1, node_config(1, "alice"));
    assert_eq!(net.node(1).trust().certificate(), Some(&renewed));
    assert_eq!(net.gateway.stats().registry.renewals, 1);
    assert!(net.node(1).is_connected());
}

#[test]
fn a_revoked_device_cannot_renew() {
    use sund_model::gateway::{AdminCommand, GatewayInput};
    use sund_model::ids::ConnectionId;
    use sund_model::wire::payload::{ErrorCode, RenewCertificate};
    use sund_model::wire::{Frame, Payload, Routing};
    let mut net = Net::new();
    net.add(1, node_config(1, "alice"));
    net.add(2, node_config(2, "bob"));
    let bob = net.device(2);
    let now = net.now;
    net.admin(AdminCommand::RevokeDevice(bob));
    // Bob's session is gone: a renewal on it is refused as unauthenticated, and nothing is
    // issued.
    let bytes = Frame::new(
        Routing::default(),
        Payload::RenewCertificate(RenewCertificate {}),
    )
    .encode();
    net.gateway
        .handle(now, GatewayInput::Frame(ConnectionId(2), bytes));
    net.settle();
    assert_eq!(net.gateway.stats().registry.renewals, 0);
    let last = net.seen[&2].last().unwrap();
    assert!(
        matches!(&last.payload, Payload::Goodbye(g) if matches!(ErrorCode::from_u16(g.code), ErrorCode::NotAuthenticated | ErrorCode::DeviceRevoked)),
        "{last:?}"
    );
}
