//! The node: its identity, its settings and the current metadata image, shared read-only by every
//! shard. The image is swapped whole by the controller and never locked on reads. Knows nothing
//! of the shard runtime that carries requests between cores.

use std::path::PathBuf;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::metadata::{self, MetadataImage};
use super::topic_config::EffectiveConfig;
use crate::config::Tuning;

/// Node-wide, immutable after start except the metadata image (swapped whole, never locked on
/// reads) and the producer id counter.
pub struct Node {
    pub tuning: Tuning,
    pub data_dir: PathBuf,
    pub node_id: i32,
    pub advertised_host: String,
    pub advertised_port: i32,
    pub cluster_id: String,
    pub meta: ArcSwap<MetadataImage>,
    /// How many shards run on this node (the placement of partitions depends on it).
    pub shard_count: usize,
    pub next_producer_id: AtomicI64,
    pub producer_id_block_end: AtomicI64,
}

impl Node {
    pub fn shards(&self) -> usize {
        self.shard_count
    }
    pub fn image(&self) -> arc_swap::Guard<Arc<MetadataImage>> {
        self.meta.load()
    }
    pub fn controller_shard(&self) -> usize {
        self.tuning.shards.controller_shard.min(self.shards() - 1)
    }
    pub fn shard_of(&self, topic: &str, partition: i32) -> usize {
        metadata::shard_of(topic, partition, self.shards())
    }
    pub fn effective_config(&self, topic: &str) -> Option<EffectiveConfig> {
        let img = self.image();
        img.topic(topic)
            .map(|t| EffectiveConfig::resolve(&t.configs, &self.tuning))
    }
}
