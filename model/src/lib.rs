//! `sund-model`: every protocol rule of Sund as deterministic, sans-IO state machines.
//!
//! Nothing in this crate reads a clock, draws OS randomness, touches a file or a socket, or spawns
//! a thread. Time is an argument (`now`), randomness comes through [`env::Entropy`], and every
//! effect leaves a state machine as an output that a driver carries out: the deterministic
//! simulator in `sund-sim`, or the tokio/quinn/redb drivers in `sund-node` and `sund-gateway`.
//!
//! Map of the crate:
//! - [`wire`]: the frame format (128-byte header + CBOR payload), opcodes, payloads, limits.
//! - [`ids`], [`time`], [`timers`]: identifiers, the model's notion of time, timer tables.
//! - [`env`](mod@env): the environment traits (clock, entropy, transport, store) and the
//!   persist-then-speak [`env::Ready`] batch.
//! - [`effects`]: the sink handlers write their store writes and outputs into.
//! - [`gateway`]: the gateway state machine, a router over its sub-machines (sessions,
//!   delivery and the sequencer, the registry, MLS groups, the KeyPackage directory).
//! - [`node`]: the device state machine (outbox, cursors, gap detection, reconnect with backoff).
//! - [`files`]: files as a manifest plus sealed, content-defined chunks (chunking, chunk keys,
//!   sealing and the manifest codec).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod address;
pub(crate) mod codec;
pub mod effects;
pub mod env;
pub mod federation;
pub mod files;
pub mod gateway;
pub mod hex;
pub mod identity;
pub mod ids;
pub mod mls;
pub mod node;
pub mod planted;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod time;
pub mod timers;
pub mod trust;
pub mod wire;
