//! Fjord: a Kafka-compatible, thread-per-core broker. The binary (`src/main.rs`) is a thin
//! wrapper over `cli`; the modules are public so that benches can reach the hot paths.
//!
//! Layers, each importing only from the layers below it (`tests/layering.rs` checks this):
//! `server` (listeners, one handler file per Kafka API) → `shard` (executors, the cross-shard
//! mesh, placement) → `group`, `partition`, `cluster` (the domain) → `log` and `quorum` (the
//! sans-IO controller quorum, not yet run by `fjord serve`). `config`,
//! `metrics`, `alloc` and `notify` are leaves every layer may use; `cli`, `admin`, `top` and
//! `tune` are the binary's commands, above everything.

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
pub mod notify;
pub mod partition;
pub mod quorum;
pub mod server;
pub mod shard;
pub mod top;
pub mod tune;
