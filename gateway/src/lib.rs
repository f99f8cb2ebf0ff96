//! `sund-gateway`: the gateway of one domain in production.
//!
//! This crate holds the production pieces around [`sund_model::gateway::Gateway`]: the redb
//! [`store`], and (landing with the core delivery issue) the quinn endpoint, the tokio driver
//! loop with group commit, configuration and graceful drain, and the `sund-gateway` binary.
//! Until the driver lands, the protocol runs in the simulator (`cargo sim`), which drives the very
//! same state machine.

#![forbid(unsafe_code)]

pub mod clock;
pub mod driver;
pub mod entropy;
pub mod quic;
pub mod store;

pub use sund_model::gateway;
