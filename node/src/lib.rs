//! `sund-node`: the device side of Sund in production.
//!
//! [`driver`] runs [`sund_model::node::Node`] on tokio with quinn and redb; [`device`] keeps a
//! device's key and settings in its data directory; the `sund` binary is the command-line tool.

#![forbid(unsafe_code)]

pub mod backup;
pub mod contact_files;
pub mod cutting;
pub mod device;
pub mod display;
pub mod driver;
pub mod settings;

pub use sund_model::node;
