//! The controller quorum, sans-IO: a Raft group (raft-rs) replicating the metadata log, and the
//! state machine the log is applied to.
//!
//! - `record`: the metadata log's records and their versioned binary encoding;
//! - `image`: the metadata image, applied deterministically from committed records, and its
//!   snapshots;
//! - `controller`: the active controller's pure rules (registration, sessions and fencing,
//!   replica placement, topics, producer ids) that turn requests into records;
//! - `storage`: the Raft log's storage contract, and an in-memory one whose synced part
//!   survives a simulated crash;
//! - `disk`: that storage on disk, fsynced, cutting a torn tail on restart;
//! - `node`: a quorum member driving raft-rs (tick, step, ready, advance) over that storage.
//!
//! Owns no socket, no clock, no thread: time arrives as `now_ms` or ticks, messages as values.
//! The glommio shell (transport between controller shards, fsyncing disk storage, publishing
//! images to shards) wraps it; `tests/quorum_sim.rs` runs it on a simulated network instead.
//! Never touches partition data or the topic metadata `cluster` serves today.

pub mod controller;
pub mod disk;
pub mod image;
pub mod node;
pub mod record;
pub mod storage;

pub use controller::{Controller, ControllerConfig, ControllerError};
pub use disk::DiskStorage;
pub use image::MetadataImage;
pub use node::{Applied, Proposal, ProposeError, QuorumConfig, QuorumError, QuorumNode};
pub use record::{MetadataRecord, PartitionRecord};
pub use storage::{LogState, MemDisk, MemStorage, QuorumStorage};
