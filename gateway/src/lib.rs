//! `sund-gateway`: the gateway of one domain in production.
//!
//! This crate holds the tokio [`driver`] around [`sund_model::gateway::Gateway`] (connection
//! admission, group commit through the runtime's committer, graceful drain, stopping when the
//! store fails) and the `sund-gateway` binary. What the node driver shares with it (clock,
//! entropy, redb store, committer, QUIC endpoints and sessions) is in `sund-runtime`. The
//! simulator (`cargo sim`) drives the very same state machine without any of them.

#![forbid(unsafe_code)]

pub mod admin;
pub mod backup;
mod chunks;
#[cfg(unix)]
pub mod control;
pub mod driver;
pub mod federation;
pub mod metrics;
#[cfg(unix)]
pub mod web;

pub use sund_model::gateway;
