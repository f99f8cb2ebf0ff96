//! `sund-gateway`: the gateway of one domain in production.
//!
//! This crate will hold the tokio driver of [`sund_model::gateway::Gateway`] (quinn endpoint,
//! redb database with group commit, configuration, graceful drain) and the `sund-gateway`
//! binary. The drivers land with the core delivery issue; until then the protocol runs only in
//! the simulator (`cargo sim`), which drives the very same state machine.

#![forbid(unsafe_code)]

pub use sund_model::gateway;
