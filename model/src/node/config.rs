//! The node's tunables.

use std::time::Duration;

use crate::identity::DeviceKey;
use crate::ids::{DeviceId, UserId};
use crate::mls::device::DeviceMlsConfig;
use crate::trust::EnrolmentToken;
use crate::wire::PAYLOAD_BYTES_MAX;

/// How long a DM whose creation lost waits for the winner's Welcome before it is created
/// again ([`NodeConfig::dm_welcome_patience`]): far beyond any gateway's round trip, shorter
/// than a gateway's lapse of a DM grant (`gateway::dm_claims::DM_CLAIM_LAPSE`), so that the
/// second try after a lapse comes soon after it.
pub const DM_WELCOME_PATIENCE: Duration = Duration::from_secs(5 * 60);

/// Tunables of a node. Every queue and timer has a named bound here.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This device's key; the device id is derived from it.
    pub key: DeviceKey,
    /// This device (the id of `key`).
    pub device: DeviceId,
    /// Heartbeat period while connected (the gateway's `HelloOk` overrides it).
    pub heartbeat_interval: Duration,
    /// Silence from the gateway for this long means the connection is dead.
    pub idle_timeout: Duration,
    /// A handshake (hello to session) that has not completed in this long starts over with a
    /// new connection (a lost handshake frame is not retransmitted).
    pub handshake_timeout: Duration,
    /// First reconnect delay cap; doubles per failed attempt.
    pub backoff_initial: Duration,
    /// Largest reconnect delay cap.
    pub backoff_max: Duration,
    /// An unacknowledged message is resent after this long on the same connection.
    pub resend_after: Duration,
    /// A transfer with chunks in flight and no progress for this long asks again (a chunk
    /// stream or its acknowledgement lost without the connection failing).
    pub transfer_stall: Duration,
    /// A DM whose creation lost to another device's waits this long for that device's
    /// Welcome before creating it again (the other device may have gone before its gateway
    /// made the DM; see `mls::device_groups`).
    pub dm_welcome_patience: Duration,
    /// At most one replay request per conversation per this interval.
    pub replay_request_interval: Duration,
    /// Most out-of-order deliveries buffered per conversation.
    pub reorder_buffer_max: usize,
    /// Most messages waiting in the outbox; `send` refuses beyond it.
    pub outbox_len_max: usize,
    /// Largest message body.
    pub body_bytes_max: usize,
    /// The user this device belongs to, named in every hello (`None`: not bound to a user).
    pub user: Option<UserId>,
    /// MLS on this device (`None`: bodies stay plaintext and no KeyPackages are kept).
    pub mls: Option<DeviceMlsConfig>,
    /// The one-time enrolment token this device registers with when it has no certificate
    /// (`None`: register without one, which only a gateway with open enrolment accepts).
    pub enrolment: Option<EnrolmentToken>,
    /// For a device set up from a pairing code: the fingerprint (first 16 bytes of the key) of
    /// the device that showed it. Trusted on first use; the device takes its certificate only
    /// if the gateway names that device as the voucher (see `trust::pairing`).
    pub pairing_voucher: Option<[u8; 16]>,
    /// Keep each delivered message in the store until the application says it took it
    /// ([`crate::node::Node::taken`]), and deliver untaken ones again when the node starts: for
    /// an application that shows messages where a crash loses them (see `node::unread`).
    pub hold_until_taken: bool,
    /// A deliberate bug, planted by the simulator only (see [`crate::planted`]); `None` in
    /// every real device.
    pub planted: Option<crate::planted::PlantedBug>,
}

impl NodeConfig {
    /// Defaults for a device.
    pub fn new(key: DeviceKey) -> NodeConfig {
        NodeConfig {
            device: key.device_id(),
            key,
            heartbeat_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(15),
            handshake_timeout: Duration::from_secs(15),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            resend_after: Duration::from_secs(3),
            transfer_stall: Duration::from_secs(30),
            dm_welcome_patience: DM_WELCOME_PATIENCE,
            replay_request_interval: Duration::from_millis(500),
            reorder_buffer_max: 256,
            outbox_len_max: 10_000,
            body_bytes_max: PAYLOAD_BYTES_MAX as usize - 1024,
            user: None,
            mls: None,
            enrolment: None,
            pairing_voucher: None,
            hold_until_taken: false,
            planted: None,
        }
    }

    /// The user named in this device's certificate: the configured one, or for a device
    /// configured without a user (plain conversations only), a user of its own with the
    /// device's id.
    pub fn certificate_user(&self) -> UserId {
        self.user.unwrap_or(UserId(self.device.0))
    }
}
