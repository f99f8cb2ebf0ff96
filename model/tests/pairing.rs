//! Pairing through the real gateway and node state machines: an existing device vouches for a
//! new device of its user, which registers with the pairing code (see `trust::pairing`).

mod support;

use std::time::Duration;

use sund_model::address::Address;
use sund_model::gateway::{AdminCommand, GatewayConfig, GatewayInput};
use sund_model::identity::DeviceKey;
use sund_model::ids::{ConnectionId, UserId};
use sund_model::node::{NodeConfig, NodeEvent};
use sund_model::trust::pairing::{PairingCode, PAIRING_TTL};
use sund_model::trust::EnrolmentToken;
use sund_model::wire::payload::{ErrorCode, PairVouch};
use sund_model::wire::{Frame, Payload, Routing};
use support::{node_config, Net};

/// A gateway that needs tokens, and alice's first device (conn 1) enrolled with one.
fn alice_enrolled() -> (Net, EnrolmentToken) {
    let mut net = Net::with_config(GatewayConfig::default());
    let token = net.enrolment_token("alice");
    let mut first = node_config(1, "alice");
    first.enrolment = Some(token.clone());
    net.add(1, first);
    assert!(net.node(1).trust().certificate().is_some());
    (net, token)
}

/// The code alice's first device shows for `secret`.
fn code_for(net: &mut Net, token: &EnrolmentToken, secret: [u8; 16]) -> PairingCode {
    let voucher = DeviceKey::from_seed([1; 32]).public().0[..16]
        .try_into()
        .unwrap();
    let _ = net;
    PairingCode {
        secret,
        voucher,
        root_fingerprint: token.root_fingerprint,
        gateway_pin: [0; 32],
        user: Address::new("alice", "localhost").unwrap(),
        gateway: "gateway.example.org:4433".into(),
    }
}

/// A new device of alice (key seed `seed`) set up from `code`.
fn paired_config(seed: u8, code: &PairingCode) -> NodeConfig {
    let mut config = node_config(seed, "alice");
    config.enrolment = Some(code.enrolment());
    config.pairing_voucher = Some(code.voucher);
    config
}

fn refused_with(net: &Net, conn: u64) -> Vec<ErrorCode> {
    net.events(conn)
        .iter()
        .filter_map(|e| match e {
            NodeEvent::Refused { code, .. } => Some(*code),
            _ => None,
        })
        .collect()
}

#[test]
fn a_device_paired_from_another_is_certified_and_both_hear_of_it() {
    let (mut net, token) = alice_enrolled();
    let now = net.now;
    let offer = net.node(1).offer_pairing(now);
    net.settle();
    assert!(net.events(1).contains(&NodeEvent::PairingReady {
        expires: offer.expires
    }));
    let code = code_for(&mut net, &token, offer.secret);
    let code = PairingCode::from_text(&code.to_text()).unwrap();

    net.add(2, paired_config(2, &code));
    let first = net.device(1);
    let second = net.device(2);
    assert!(net
        .events(2)
        .contains(&NodeEvent::Paired { voucher: first }));
    assert!(net
        .events(1)
        .contains(&NodeEvent::DeviceLinked { device: second }));
    let cert = net.node(2).trust().certificate().unwrap().clone();
    assert_eq!(cert.user, UserId::of("alice", "localhost"));
    assert_eq!(net.node(2).trust().paired_with().unwrap().device(), first);
    assert!(
        net.node(2).is_connected(),
        "the new device opened its session"
    );
    assert_eq!(net.gateway.stats().registry.pairings, 1);
    assert_eq!(net.node(1).trust().pending_vouch(), None);

    // The code was for one device.
    net.add(3, paired_config(3, &code));
    assert!(net.node(3).trust().certificate().is_none());
    assert!(refused_with(&net, 3).contains(&ErrorCode::EnrolmentTokenUsed));
}

#[test]
fn a_code_for_another_user_or_after_its_voucher_was_revoked_or_expired_is_refused() {
    let (mut net, token) = alice_enrolled();

    // A code claimed for another user.
    let now = net.now;
    let offer = net.node(1).offer_pairing(now);
    net.settle();
    let mut code = code_for(&mut net, &token, offer.secret);
    code.user = Address::new("mallory", "localhost").unwrap();
    let mut config = paired_config(2, &code);
    config.user = Some(UserId::of("mallory", "localhost"));
    net.add(2, config);
    assert!(net.node(2).trust().certificate().is_none());
    assert!(refused_with(&net, 2).contains(&ErrorCode::EnrolmentTokenInvalid));

    // Expired.
    let now = net.now;
    let offer = net.node(1).offer_pairing(now);
    net.settle();
    net.now = net.now + PAIRING_TTL + Duration::from_secs(1);
    let code = code_for(&mut net, &token, offer.secret);
    net.add(3, paired_config(3, &code));
    assert!(net.node(3).trust().certificate().is_none());
    assert!(refused_with(&net, 3).contains(&ErrorCode::EnrolmentTokenExpired));

    // The voucher is revoked after vouching (first it reconnects after the clock's jump).
    net.restart(1, {
        let mut c = node_config(1, "alice");
        c.enrolment = Some(token.clone());
        c
    });
    assert!(net.node(1).is_connected());
    let now = net.now;
    let offer = net.node(1).offer_pairing(now);
    net.settle();
    assert_eq!(
        net.node(1).trust().pending_vouch(),
        None,
        "the vouch reached the gateway"
    );
    let code = code_for(&mut net, &token, offer.secret);
    let first = net.device(1);
    net.admin(AdminCommand::RevokeDevice(first));
    net.add(4, paired_config(4, &code));
    assert!(net.node(4).trust().certificate().is_none());
    assert!(
        refused_with(&net, 4).contains(&ErrorCode::PairingRefused),
        "{:?} {:?}",
        net.events(4),
        net.events(1)
    );
}

#[test]
fn a_new_device_takes_no_certificate_unless_the_gateway_names_the_device_it_paired_with() {
    let (mut net, token) = alice_enrolled();
    let now = net.now;
    let offer = net.node(1).offer_pairing(now);
    net.settle();
    let code = code_for(&mut net, &token, offer.secret);
    let mut config = paired_config(2, &code);
    config.pairing_voucher = Some([0x99; 16]); // the code it scanned named another device
    net.add(2, config);
    assert!(net.node(2).trust().certificate().is_none());
    assert!(net.node(2).trust().paired_with().is_none());
    assert!(refused_with(&net, 2).contains(&ErrorCode::CertificateInvalid));
    assert!(!net.node(2).is_connected());
}

#[test]
fn a_vouch_with_a_bad_signature_is_refused_and_the_code_never_works() {
    let (mut net, token) = alice_enrolled();
    let now = net.now;
    let secret = [0x42; 16];
    let vouch = PairVouch {
        secret,
        expires: now.as_micros() / 1_000_000 + 60,
        signature: DeviceKey::from_seed([9; 32]).sign(b"not the vouch"),
    };
    let bytes = Frame::new(Routing::default(), Payload::PairVouch(vouch)).encode();
    net.gateway
        .handle(now, GatewayInput::Frame(ConnectionId(1), bytes));
    net.settle();
    let refused = net.seen[&1].iter().any(|f| {
        matches!(&f.payload, Payload::Error(e) if ErrorCode::from_u16(e.code) == ErrorCode::PairingRefused)
    });
    assert!(refused);
    assert_eq!(
        net.gateway
            .stats()
            .refusals
            .get(sund_model::wire::payload::ErrorCode::PairingRefused),
        1
    );
    let code = code_for(&mut net, &token, secret);
    net.add(2, paired_config(2, &code));
    assert!(net.node(2).trust().certificate().is_none());
}

#[test]
fn a_code_shown_while_the_gateway_is_unreachable_works_once_the_voucher_reaches_it() {
    let (mut net, token) = alice_enrolled();
    let now = net.now;
    net.node(1).go_offline(now);
    net.settle();
    let offer = net.node(1).offer_pairing(now);
    net.settle();
    let code = code_for(&mut net, &token, offer.secret);

    // The new device takes the code at once: trust on first use, not yet confirmed. The
    // gateway does not know the secret yet, so the device keeps trying.
    net.add(2, paired_config(2, &code));
    assert!(net.node(2).trust().certificate().is_none());
    assert!(refused_with(&net, 2).contains(&ErrorCode::EnrolmentTokenInvalid));

    // The first device restarts: the vouch waited in its store, and goes out once the
    // restarted device reaches the gateway.
    assert!(net.node(1).trust().pending_vouch().is_some());
    assert!(!net
        .events(1)
        .iter()
        .any(|e| matches!(e, NodeEvent::PairingReady { .. })));
    net.restart(1, {
        let mut c = node_config(1, "alice");
        c.enrolment = Some(token);
        c
    });
    assert_eq!(net.node(1).trust().pending_vouch(), None);
    assert!(net.events(1).contains(&NodeEvent::PairingReady {
        expires: offer.expires
    }));

    // The new device's next attempt succeeds and confirms the pairing.
    for _ in 0..20 {
        if net.node(2).trust().certificate().is_some() {
            break;
        }
        net.now = net.node(2).poll_timeout().unwrap();
        net.settle();
    }
    let first = net.device(1);
    assert!(net
        .events(2)
        .contains(&NodeEvent::Paired { voucher: first }));
    assert!(net.node(2).is_connected());
}

#[test]
fn a_device_may_hold_only_a_few_unused_codes_and_a_refusal_names_its_own_code() {
    let (mut net, _) = alice_enrolled();
    // A refusal naming another vouch (an older code) leaves the pending one alone.
    let now = net.now;
    net.node(1).offer_pairing(now);
    let pending = *net.node(1).trust().pending_vouch().unwrap();
    let report = sund_model::wire::payload::ErrorReport {
        code: ErrorCode::PairingRefused as u16,
        message: "an older code".into(),
        msg_id: Some([0x77; 16]),
        after: None,
        retry_after_ms: None,
        held: None,
    };
    let bytes = Frame::new(Routing::default(), Payload::Error(report)).encode();
    assert!(net.node(1).is_connected());
    net.node(1).handle(
        now,
        sund_model::node::NodeInput::Frame(ConnectionId(1), bytes),
    );
    assert_eq!(net.node(1).trust().pending_vouch(), Some(&pending));
    net.settle();

    for _ in 1..sund_model::trust::VOUCHES_PER_DEVICE_MAX {
        let now = net.now;
        net.node(1).offer_pairing(now);
        net.settle();
    }
    let ready = net
        .events(1)
        .iter()
        .filter(|e| matches!(e, NodeEvent::PairingReady { .. }))
        .count();
    assert_eq!(ready, sund_model::trust::VOUCHES_PER_DEVICE_MAX);
    let now = net.now;
    net.node(1).offer_pairing(now);
    net.settle();
    assert!(net.events(1).iter().any(
        |e| matches!(e, NodeEvent::PairingRefused { reason } if reason.contains("unused pairing codes"))
    ));
    assert_eq!(net.node(1).trust().pending_vouch(), None);
    assert_eq!(
        net.gateway
            .stats()
            .refusals
            .get(sund_model::wire::payload::ErrorCode::PairingRefused),
        1
    );
}
