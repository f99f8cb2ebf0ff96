//! `sund-gateway`: the gateway of one domain in production.
//!
//! This crate holds the production pieces around [`sund_model::gateway::Gateway`]: the redb
//! [`store`], the pipelined group [`committer`], the quinn endpoint ([`quic`]), the tokio
//! [`driver`] loop with graceful drain, and the `sund-gateway` binary. The node driver reuses the
//! store, the committer and the QUIC pieces. The simulator (`cargo sim`) drives the very same
//! state machine without any of them.

#![forbid(unsafe_code)]

pub mod clock;
pub mod committer;
pub mod driver;
pub mod entropy;
pub mod quic;
pub mod store;

pub use sund_model::gateway;
