//! The gateway's tunables.

use std::time::Duration;

use super::delivery::DeliveryLimits;
use super::files::ChunkLimits;
use super::key_packages::DirectoryConfig;
use super::limits::RateLimits;
use crate::federation::handshake::PeerConfig;
use crate::federation::LinkTimers;
use crate::planted::PlantedBug;
use crate::wire::PAYLOAD_BYTES_MAX;

/// Tunables of a gateway. Every queue and timer has a named bound here.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// How often nodes are asked to send heartbeats.
    pub heartbeat_interval: Duration,
    /// A session that sends nothing for this long is closed.
    pub session_idle_timeout: Duration,
    /// A connection that has not opened a session within this of being accepted is closed.
    pub hello_timeout: Duration,
    /// Most unacknowledged deliveries in flight per device and conversation.
    pub delivery_window: u64,
    /// A stalled acknowledgement cursor triggers redelivery after this long.
    pub redeliver_after: Duration,
    /// Period of the housekeeping tick (timeouts, redelivery).
    pub tick_interval: Duration,
    /// Largest accepted frame payload.
    pub payload_bytes_max: u32,
    /// Messages older than this are dropped even if some member never acknowledged them.
    pub retention_max: Duration,
    /// How long a deduplication record outlives its message (a sender's late retry still gets
    /// its original seq within this window).
    pub dedup_retention: Duration,
    /// Most bytes of messages the gateway keeps for one device that has not read them, over
    /// all its conversations (`None`: no quota): past it, the oldest go for that device, which
    /// is told of the gap as after retention.
    pub mailbox_bytes_max: Option<u64>,
    /// Most log entries garbage-collected per conversation in one step. GC runs incrementally:
    /// one step per tick, and further steps every `gc_backlog_interval` while a step found more
    /// than it could take. Small steps keep each commit short, so GC adds little latency to the
    /// messages that share its commits.
    pub gc_batch_max: usize,
    /// How soon the next GC step runs while acknowledged or expired entries remain.
    pub gc_backlog_interval: Duration,
    /// Issue a certificate to any device that registers without an enrolment token (local use
    /// and demos); otherwise registration needs a one-time token from
    /// [`super::Gateway::issue_enrolment_token`]. Sessions need a certificate either way.
    pub open_enrolment: bool,
    /// The domain this gateway is the registration authority of (named in every certificate).
    pub domain: String,
    /// The gateways this one federates with (none: federation is off). Each names a domain
    /// and the fingerprint of its trust root, which its link must prove.
    pub federation_peers: Vec<PeerConfig>,
    /// The federation links' timers.
    pub federation_timers: LinkTimers,
    /// How long a resume token stays valid.
    pub resume_token_ttl: Duration,
    /// Limits of the KeyPackage directory.
    pub directory: DirectoryConfig,
    /// Limits of file transfers: quota per user, retention, uploads open at once.
    pub files: ChunkLimits,
    /// Rate limits per device and per user (abuse controls).
    pub limits: RateLimits,
    /// What a shutting-down gateway tells its devices to wait before reconnecting (each waits
    /// this plus a random share of it, so a restart does not bring them all back at once).
    pub shutdown_retry_after: Duration,
    /// A deliberate bug, planted by the simulator only (see [`crate::planted`]); `None` in
    /// every real gateway.
    pub planted: Option<PlantedBug>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            heartbeat_interval: Duration::from_secs(5),
            session_idle_timeout: Duration::from_secs(15),
            hello_timeout: Duration::from_secs(10),
            delivery_window: 128,
            redeliver_after: Duration::from_secs(2),
            tick_interval: Duration::from_millis(250),
            payload_bytes_max: PAYLOAD_BYTES_MAX,
            retention_max: Duration::from_secs(30 * 24 * 3600),
            dedup_retention: Duration::from_secs(30 * 24 * 3600),
            // A thousand messages of the largest size, a million of a typical one.
            mailbox_bytes_max: Some(1 << 30),
            gc_batch_max: 128,
            gc_backlog_interval: Duration::from_millis(5),
            open_enrolment: false,
            domain: crate::address::DEFAULT_DOMAIN.into(),
            federation_peers: Vec::new(),
            federation_timers: LinkTimers::default(),
            resume_token_ttl: Duration::from_secs(7 * 24 * 3600),
            directory: DirectoryConfig::default(),
            files: ChunkLimits::default(),
            limits: RateLimits::default(),
            shutdown_retry_after: Duration::from_secs(2),
            planted: None,
        }
    }
}

impl GatewayConfig {
    pub(super) fn delivery_limits(&self) -> DeliveryLimits {
        DeliveryLimits {
            window: self.delivery_window,
            redeliver_after: self.redeliver_after,
            retention_max: self.retention_max,
            dedup_retention: self.dedup_retention,
            mailbox_bytes_max: self.mailbox_bytes_max,
            gc_batch_max: self.gc_batch_max,
            gc_backlog_interval: self.gc_backlog_interval,
            resume_off_by_one: self.planted == Some(PlantedBug::ResumeOffByOne),
        }
    }
}
