//! Federation between gateways (issue 15), built in steps. This first step is the link layer:
//!
//! - [`certificate`]: a gateway's link key certified by its domain's trust root;
//! - [`handshake`]: mutual authentication of two gateways, each checking the other's root
//!   against the fingerprint its operator configured;
//! - [`link`]: the [`Federation`] sub-machine, one link per configured peer with a durable
//!   outbox whose entries reach the peer exactly once and in order, whatever is lost,
//!   duplicated, reordered, disconnected or crashed on the way.
//!
//! What travels in the entries (relayed sends, sequenced frames, KeyPackages, Welcomes, CRLs,
//! handovers) and the gateway's routing by `user@domain` come next; nothing in the gateway
//! uses these links yet.

pub mod certificate;
pub mod entry;
pub mod handshake;
pub mod link;

pub use link::{
    EnqueueError, Federation, FederationInput, FederationOutput, FederationStats, LinkReport,
    LinkTimers,
};
