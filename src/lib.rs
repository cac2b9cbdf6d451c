//! Fjord: a Kafka-compatible, thread-per-core broker. The binary (`src/main.rs`) is a thin
//! wrapper over `cli`; the modules are public so that benches can reach the hot paths.

// Nested result tuples read better in place than behind one-use aliases.
#![allow(clippy::type_complexity)]

pub mod admin;
pub mod alloc;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod group;
pub mod log;
pub mod metrics;
pub mod partition;
pub mod quorum;
pub mod server;
pub mod shard;
pub mod top;
pub mod tune;
