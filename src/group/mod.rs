//! Group coordinator: classic consumer groups and committed offsets. The state machine lives in
//! `state.rs` (sans-IO); this module is its I/O shell on the shard that owns the group's
//! `__consumer_offsets` partition.

pub mod handlers;

/// Per-shard group coordinator state (filled in by the coordinator shell).
pub struct GroupShard;
