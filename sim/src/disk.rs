//! The simulated disk: ordered tables, atomic commits, and crashes that lose what was not
//! committed.
//!
//! Fidelity: a commit is all-or-nothing and, once its latency has passed, durable. The committed
//! state is a [`MemStore`]; the world keeps each actor's in-flight batches in a queue with their
//! completion times, and a crash drops that queue, so everything not yet committed is lost and
//! everything committed survives. Not modelled: torn writes, bit rot, a full disk, fsync lies.
//! Reads (used when an actor recovers) see committed data only.

pub use sund_model::env::MemStore;

/// One actor's disk.
pub type SimDisk = MemStore;
