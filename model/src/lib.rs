//! `sund-model`: every protocol rule of Sund as deterministic, sans-IO state machines.
//!
//! Nothing in this crate reads a clock, draws OS randomness, touches a file or a socket, or spawns
//! a thread. Time is an argument (`now`), randomness comes through [`env::Entropy`], and every
//! effect leaves a state machine as an output that a driver carries out: the deterministic
//! simulator in `sund-sim`, or the tokio/quinn/redb drivers in `sund-node` and `sund-gateway`.
//!
//! Map of the crate:
//! - [`wire`]: the frame format (128-byte header + CBOR payload), opcodes, payloads, limits.
//! - [`ids`], [`time`]: identifiers and the model's notion of time.
//! - [`env`]: the environment traits (clock, entropy, transport, store) and the
//!   persist-then-speak [`env::Ready`] batch.
//! - [`sequencer`]: one conversation's ordered, deduplicated log (the gateway's core).
//! - [`groups`]: conversations that are MLS groups at the gateway: kinds, roles, declared
//!   group operations.
//! - [`gateway`]: the gateway state machine (sessions, sequencing, fan-out, redelivery).
//! - [`node`]: the device state machine (outbox, cursors, gap detection, reconnect with backoff).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod directory;
pub mod env;
pub mod gateway;
pub mod groups;
pub mod identity;
pub mod ids;
pub mod mls;
pub mod node;
pub mod sequencer;
pub mod time;
pub mod trust;
pub mod wire;
