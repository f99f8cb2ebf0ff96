//! Nodes and a gateway wired together frame by frame: devices keep their KeyPackage pools topped
//! up at the gateway, fetches drain them, the owners replenish, and a device's MLS identity and
//! package keys survive its restart.

mod support;

use openmls_traits::OpenMlsProvider as _;
use sund_model::identity::DeviceKey;
use sund_model::ids::UserId;
use sund_model::mls::key_packages;
use sund_model::node::NodeConfig;
use support::{node_config, Net};

#[test]
fn devices_fill_their_pools_on_connect_and_refill_when_fetches_drain_them() {
    let mut net = Net::new();
    net.add(1, node_config(1, "alice"));
    net.add(2, node_config(2, "bob"));
    for conn in [1, 2] {
        assert_eq!(net.gateway.key_packages_left(net.device(conn)), 12);
        let node = &net.nodes[&conn].0;
        assert_eq!(node.stats().key_packages_uploaded, 12);
        assert!(
            !node.mls().unwrap().upload_pending(),
            "the count answered the upload"
        );
    }
    // Alice fetches Bob's packages until his pool runs below the threshold (10), and Bob tops
    // it up again on the count the gateway pushes.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let answer = net.fetch(1, "bob");
        assert_eq!(answer.found.len(), 1);
        assert!(!answer.found[0].last_resort);
        let package = answer.found[0].package.to_vec();
        assert!(!seen.contains(&package), "never the same package twice");
        // The package Bob made verifies as Bob's at the gateway's check.
        let crypto = openmls_rust_crypto::RustCrypto::default();
        assert!(key_packages::check(&crypto, &package, net.device(2)).is_ok());
        seen.push(package);
    }
    assert_eq!(
        net.gateway.key_packages_left(net.device(2)),
        12,
        "9 left was below 10: Bob topped up to his target"
    );
    assert_eq!(net.nodes[&2].0.stats().key_packages_uploaded, 15);
    assert_eq!(
        net.gateway.key_packages_left(net.device(1)),
        12,
        "Alice's pool untouched"
    );
}

#[test]
fn a_restarted_device_keeps_its_signing_key_and_package_keys() {
    let mut net = Net::new();
    net.add(2, node_config(2, "bob"));
    let before = net.nodes[&2].0.mls().unwrap().signature_key().to_vec();
    let records = net.nodes[&2].0.mls().unwrap().provider().storage().len();
    assert!(records > 12, "signer and one record per package: {records}");
    net.restart(2, node_config(2, "bob"));
    let mls = net.nodes[&2].0.mls().unwrap();
    assert_eq!(mls.signature_key(), before.as_slice());
    assert_eq!(
        mls.provider().storage().len(),
        records,
        "every private key came back from the store, and the full pool caused no new upload"
    );
    assert_eq!(net.gateway.key_packages_left(net.device(2)), 12);
}

#[test]
fn devices_without_mls_ignore_counts_and_upload_nothing() {
    let mut net = Net::new();
    let mut plain = NodeConfig::new(DeviceKey::from_seed([3; 32]));
    plain.user = Some(UserId::of("carol", "localhost"));
    net.add(3, plain);
    assert_eq!(net.gateway.key_packages_left(net.device(3)), 0);
    assert!(net.nodes[&3].0.mls().is_none());
}

/// A command-line driver stops the node only once its gateway holds its KeyPackages (see
/// `Node::key_packages_settled`): a first command that stopped earlier left the device's
/// upload unsent, and anyone starting a DM with it then found no device to add.
#[test]
fn a_node_is_settled_only_once_its_gateway_holds_its_key_packages_in_this_session() {
    let mut net = Net::new();
    let store = sund_model::env::MemStore::default();
    let node = sund_model::node::Node::recover(
        node_config(1, "alice"),
        Box::new(support::Counter(1)),
        net.now,
        &store,
    )
    .unwrap();
    net.nodes.insert(1, (node, store));
    assert!(
        net.nodes[&1].0.key_packages_settled(),
        "no session: nothing to wait for"
    );
    let mut open_and_unsettled = 0;
    while net.step() {
        let node = &net.nodes[&1].0;
        if node.is_connected() && !node.key_packages_settled() {
            open_and_unsettled += 1;
        }
    }
    assert!(
        open_and_unsettled > 0,
        "unsettled between the session's opening and the answer"
    );
    assert!(net.nodes[&1].0.key_packages_settled());
    assert_eq!(net.gateway.key_packages_left(net.device(1)), 12);
    // A new session is unsettled again until the gateway's count, which needs no upload.
    net.restart(1, node_config(1, "alice"));
    assert!(net.nodes[&1].0.key_packages_settled());
    assert_eq!(
        net.nodes[&1].0.stats().key_packages_uploaded,
        0,
        "a full pool"
    );
}
