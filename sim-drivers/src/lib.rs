//! `sund-sim-drivers`: the scenario DSL on the production drivers.
//!
//! `cargo sim --drivers FILE` runs a scenario file on the real `sund-gateway` and `sund-node`
//! drivers (tokio, quinn, rustls, redb) inside turmoil's simulated network and clock, with the
//! model layer's invariant checker. Every source of randomness and time in those stacks is
//! seeded or simulated (`sund_runtime::seeded`), so one seed gives the same datagrams byte for
//! byte; the trace hash at this layer digests every datagram and every application event.
//!
//! - [`plan`]: what a scenario becomes on the drivers, or why it cannot run there;
//! - [`run`]: one run under turmoil, and its report.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod plan;
pub mod run;
