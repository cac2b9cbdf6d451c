//! Cluster metadata: the topic image every shard reads (copy-on-write, lock-free loads) and the
//! controller operations that change it. Changes are serialized on the controller shard and
//! persisted before they become visible. Never touches partition data.

pub mod controller;
pub mod metadata;
pub mod node;
pub mod topic_config;
