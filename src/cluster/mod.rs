//! Cluster metadata: the node (`node.rs`), the topic image every shard reads (copy-on-write,
//! lock-free loads) and the controller operations that change it. Changes are serialized on the
//! controller shard and persisted before they become visible. Never touches partition data and
//! knows nothing of shards: callers run controller operations where they must run.

pub mod controller;
pub mod meta_properties;
pub mod metadata;
pub mod node;
pub mod topic_config;
