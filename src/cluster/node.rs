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
    /// Set when the node is part of a cluster with a controller quorum (`--controllers`).
    pub cluster: Option<ClusterSettings>,
    /// This node's broker epoch from its registration (-1 before it registered): broker
    /// requests to the controller name it.
    pub broker_epoch: AtomicI64,
}

/// A clustered node's settings and identity, fixed at start.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// The quorum's voters: node id and controller listener.
    pub voters: Vec<(i32, std::net::SocketAddr)>,
    pub rack: Option<String>,
    /// KIP-858: the id of this node's data dir (meta.properties).
    pub directory_id: uuid::Uuid,
    /// New at every process start: tells a restart from a duplicate.
    pub incarnation_id: uuid::Uuid,
    /// The cluster id meta.properties holds, if the node has joined a cluster before.
    pub known_cluster_id: Option<String>,
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
    /// Kafka's cluster id: the quorum's once known, in a cluster.
    pub fn cluster_id(&self) -> String {
        match &self.image().cluster {
            Some(c) if !c.cluster_id.is_empty() => c.cluster_id.clone(),
            _ => self.cluster_id.clone(),
        }
    }
    /// This node's controller listener, if it is a voter.
    pub fn voter_address(&self) -> Option<std::net::SocketAddr> {
        let c = self.cluster.as_ref()?;
        c.voters
            .iter()
            .find(|(id, _)| *id == self.node_id)
            .map(|(_, a)| *a)
    }
    /// Whether this node leads the partition (and so serves its clients).
    pub fn leads(&self, t: &metadata::TopicMeta, partition: i32) -> bool {
        t.leader(partition, self.node_id) == self.node_id
    }
    /// The error for a partition this node cannot serve: not its leader, or not there at all.
    pub fn not_served_code(&self, topic: &str, partition: i32) -> i16 {
        let img = self.image();
        match img.topic(topic) {
            Some(t) if (0..t.partitions).contains(&partition) && !self.leads(t, partition) => {
                kafka_protocol::ResponseError::NotLeaderOrFollower.code()
            }
            _ => kafka_protocol::ResponseError::UnknownTopicOrPartition.code(),
        }
    }
    pub fn effective_config(&self, topic: &str) -> Option<EffectiveConfig> {
        let img = self.image();
        img.topic(topic)
            .map(|t| EffectiveConfig::resolve(&t.configs, &self.tuning))
    }
}
