//! `sund-sim`: the deterministic simulator.
//!
//! One thread, virtual time, one event queue ordered by (time, insertion sequence), one `u64` seed
//! from which every random stream is derived. It drives the state machines of `sund-model`
//! through a faulty network ([`network`]) and crashable disks ([`disk`]), checks invariants after
//! every step, then heals all faults and demands convergence within a bound. Every run folds what
//! happened into a trace hash ([`trace`]); the same seed must give the same hash.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod checker;
pub mod disk;
pub mod event_log;
pub mod event_queue;
pub mod fuzzing;
pub mod network;
pub mod planted_hunt;
pub mod rng;
pub mod runner;
pub mod scenario;
pub mod shrink;
pub mod swarm;
pub mod trace;
pub mod world;
