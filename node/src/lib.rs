//! `sund-node`: the device side of Sund in production.
//!
//! This crate will hold the tokio driver of [`sund_model::node::Node`] (quinn transport, redb
//! store, OS entropy, the tokio clock) and the `sund` command-line tool. The drivers land with the
//! core delivery issue; until then the protocol runs only in the simulator (`cargo sim`), which
//! drives the very same state machine.

#![forbid(unsafe_code)]

pub use sund_model::node;
