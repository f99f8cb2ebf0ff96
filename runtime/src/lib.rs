//! `sund-runtime`: what Sund's two drivers share.
//!
//! The gateway driver (`sund-gateway`) and the node driver (`sund-node`) move bytes and time
//! between the world and the model's state machines. Everything they both need lives here, once:
//!
//! - [`environment`]: where a driver's clock, entropy, network and commits come from
//!   ([`environment::Production`] or the reproducible [`environment::Simulated`]);
//! - [`clock`], [`entropy`]: the model's `Clock` and `Entropy` for drivers;
//! - [`store`]: redb behind the model's `Store` trait, checked whole when it opens;
//! - [`value_files`]: large values (file chunks) in files beside the database;
//! - [`sim_disk`]: a simulated machine's disk (full, torn writes at a power cut, lying fsync);
//! - [`files`]: owner-only data directories and secret files;
//! - [`committer`]: pipelined group commit on a thread of its own;
//! - [`background`]: long jobs (a backup) on a thread that yields to the driver;
//! - [`sealed`], [`archive`]: a stream sealed under a passphrase, and the entries of a device's
//!   backup inside it (`sund backup`);
//! - [`metrics`]: histograms of the stages a message passes in a driver;
//! - [`tls`], [`endpoint`]: the gateway's TLS identity, certificate pinning, QUIC endpoints;
//! - [`memory`]: one malloc arena, so that what a file transfer frees is reused;
//! - [`seeded`]: seeded randomness and a simulated clock for quinn and rustls (simulation only);
//! - [`session`]: one session's reader and writer tasks (frames in batches, gathered writes,
//!   bounded closing);
//! - `turmoil` (feature `turmoil`): quinn over turmoil's simulated UDP.

// `unsafe` is allowed only where it is: `memory::one_malloc_arena` and `background` (thread
// priorities).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod archive;
pub mod background;
pub mod backup;
pub mod chunk_stream;
pub mod clock;
pub mod committer;
pub mod direct_io;
pub mod endpoint;
pub mod entropy;
pub mod environment;
pub mod files;
pub mod memory;
pub mod metrics;
pub mod sealed;
pub mod seeded;
pub mod session;
pub mod sim_disk;
pub mod store;
pub mod tls;
#[cfg(feature = "turmoil")]
pub mod turmoil;
pub mod value_files;
