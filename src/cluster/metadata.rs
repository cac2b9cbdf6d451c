//! The metadata image: topics, their ids, partition counts and config overrides. Persisted as
//! JSON (written to a temp file, fsync'd, renamed) under `<data_dir>/meta/`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopicMeta {
    pub name: String,
    pub id: Uuid,
    pub partitions: i32,
    #[serde(default)]
    pub configs: BTreeMap<String, String>,
    #[serde(default)]
    pub internal: bool,
    /// Per partition, in a cluster: its replicas and leader. Empty on a one-node cluster, where
    /// this node holds and leads every partition.
    #[serde(skip)]
    pub assignments: Vec<Assignment>,
}

/// Where a partition lives in a cluster (from the quorum's metadata image).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub replicas: Vec<i32>,
    /// The in-sync replicas, leader included.
    pub isr: Vec<i32>,
    /// -1 when no replica may lead.
    pub leader: i32,
    pub leader_epoch: i32,
    /// Bumped by every change of the partition (AlterPartition names it).
    pub partition_epoch: i32,
    /// A reassignment in progress (KIP-455): replicas joining and leaving; empty otherwise.
    pub adding: Vec<i32>,
    pub removing: Vec<i32>,
}

impl TopicMeta {
    /// The partition's leader: `local` on a one-node cluster.
    pub fn leader(&self, partition: i32, local: i32) -> i32 {
        if self.assignments.is_empty() {
            return local;
        }
        usize::try_from(partition)
            .ok()
            .and_then(|p| self.assignments.get(p))
            .map_or(-1, |a| a.leader)
    }

    /// The partition's leader epoch (0 on a single node, where no election ever happens).
    pub fn leader_epoch(&self, partition: i32) -> i32 {
        if self.assignments.is_empty() {
            return 0;
        }
        usize::try_from(partition)
            .ok()
            .and_then(|p| self.assignments.get(p))
            .map_or(-1, |a| a.leader_epoch)
    }

    /// KIP-320: the error for a request that expects leader epoch `current` (-1: any) of
    /// this partition, if the image's differs (FENCED_LEADER_EPOCH when older,
    /// UNKNOWN_LEADER_EPOCH when newer than what this node has seen).
    pub fn epoch_mismatch(&self, partition: i32, current: i32) -> Option<i16> {
        let mine = self.leader_epoch(partition);
        if current < 0 || current == mine {
            None
        } else if current < mine {
            Some(kafka_protocol::ResponseError::FencedLeaderEpoch.code())
        } else {
            Some(kafka_protocol::ResponseError::UnknownLeaderEpoch.code())
        }
    }
}

/// A registered broker as clients see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerView {
    pub id: i32,
    pub host: String,
    pub port: i32,
    pub rack: Option<String>,
    pub fenced: bool,
    /// The epoch of the broker's registration (tells this process's own from an earlier one).
    pub epoch: i64,
}

/// What a node of a multi-node cluster knows beyond the topics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterView {
    pub cluster_id: String,
    /// Every registered broker, fenced ones included (Metadata lists only the others).
    pub brokers: Vec<BrokerView>,
    /// The metadata log position this image stands for.
    pub applied_index: u64,
    /// Dynamic broker configs: broker id (-1: every broker) → name → value.
    pub broker_configs: BTreeMap<i32, BTreeMap<String, String>>,
}

impl ClusterView {
    /// A dynamic broker config of `broker_id`: its own value, else the cluster-wide one.
    pub fn broker_config(&self, broker_id: i32, name: &str) -> Option<&str> {
        [broker_id, -1]
            .iter()
            .find_map(|b| self.broker_configs.get(b)?.get(name))
            .map(String::as_str)
    }
}

#[derive(Debug, Clone, Default)]
pub struct MetadataImage {
    pub topics: BTreeMap<String, Arc<TopicMeta>>,
    pub by_id: HashMap<Uuid, String>,
    /// Set on a node of a cluster with a controller quorum; `None` on a one-node cluster.
    pub cluster: Option<Arc<ClusterView>>,
}

/// The image a node serves, built from the quorum's committed metadata image.
/// `internal_topic` names the one internal topic (`__consumer_offsets`).
pub fn from_quorum(q: &crate::quorum::MetadataImage, internal_topic: &str) -> MetadataImage {
    let mut img = MetadataImage::default();
    for t in q.topics.values() {
        let count = t.partitions.keys().next_back().map_or(0, |p| p + 1);
        let mut assignments = Vec::with_capacity(count as usize);
        for p in 0..count {
            assignments.push(match t.partitions.get(&p) {
                Some(r) => Assignment {
                    replicas: r.replicas.clone(),
                    isr: r.isr.clone(),
                    leader: r.leader,
                    leader_epoch: r.leader_epoch,
                    partition_epoch: r.partition_epoch,
                    adding: r.adding.clone(),
                    removing: r.removing.clone(),
                },
                None => Assignment {
                    replicas: Vec::new(),
                    isr: Vec::new(),
                    leader: -1,
                    leader_epoch: -1,
                    partition_epoch: -1,
                    adding: Vec::new(),
                    removing: Vec::new(),
                },
            });
        }
        img = img.with_topic(TopicMeta {
            name: t.name.clone(),
            id: t.topic_id,
            partitions: count,
            configs: t.configs.clone(),
            internal: t.name == internal_topic,
            assignments,
        });
    }
    let brokers = q
        .brokers
        .values()
        .map(|b| {
            let l = b.listeners.first();
            BrokerView {
                id: b.broker_id,
                host: l.map(|l| l.host.clone()).unwrap_or_default(),
                port: l.map_or(-1, |l| l.port as i32),
                rack: b.rack.clone(),
                fenced: b.fenced,
                epoch: b.broker_epoch,
            }
        })
        .collect();
    img.cluster = Some(Arc::new(ClusterView {
        cluster_id: q
            .cluster_id
            .map(|c| base64_url(c.as_bytes()))
            .unwrap_or_default(),
        brokers,
        applied_index: q.applied_index,
        broker_configs: q.broker_configs.clone(),
    }));
    img
}

#[derive(Debug, Serialize, Deserialize)]
struct TopicsFile {
    version: u32,
    topics: Vec<TopicMeta>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterFile {
    pub cluster_id: String,
    /// Producer ids below this may have been handed out; allocation resumes here on restart.
    pub producer_id_block_end: i64,
}

pub const PRODUCER_ID_BLOCK: i64 = 1000;

impl MetadataImage {
    pub fn topic(&self, name: &str) -> Option<&Arc<TopicMeta>> {
        self.topics.get(name)
    }
    pub fn topic_by_id(&self, id: &Uuid) -> Option<&Arc<TopicMeta>> {
        self.by_id.get(id).and_then(|n| self.topics.get(n))
    }
    pub fn with_topic(&self, t: TopicMeta) -> MetadataImage {
        let mut next = self.clone();
        next.by_id.insert(t.id, t.name.clone());
        next.topics.insert(t.name.clone(), Arc::new(t));
        next
    }
    pub fn without_topic(&self, name: &str) -> MetadataImage {
        let mut next = self.clone();
        if let Some(t) = next.topics.remove(name) {
            next.by_id.remove(&t.id);
        }
        next
    }
}

pub fn meta_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("meta")
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

pub fn load_image(data_dir: &Path) -> std::io::Result<MetadataImage> {
    let path = meta_dir(data_dir).join("topics.json");
    let mut img = MetadataImage::default();
    match std::fs::read(&path) {
        Ok(bytes) => {
            let f: TopicsFile = serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::other(format!("{}: damaged metadata file: {e}", path.display()))
            })?;
            for t in f.topics {
                img = img.with_topic(t);
            }
            Ok(img)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(img),
        Err(e) => Err(e),
    }
}

pub fn save_image(data_dir: &Path, img: &MetadataImage) -> std::io::Result<()> {
    let dir = meta_dir(data_dir);
    std::fs::create_dir_all(&dir)?;
    let f = TopicsFile {
        version: 1,
        topics: img.topics.values().map(|t| (**t).clone()).collect(),
    };
    let bytes = serde_json::to_vec_pretty(&f).map_err(std::io::Error::other)?;
    write_atomic(&dir.join("topics.json"), &bytes)
}

pub fn load_or_init_cluster(data_dir: &Path) -> std::io::Result<ClusterFile> {
    let dir = meta_dir(data_dir);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("cluster.json");
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            std::io::Error::other(format!("{}: damaged cluster file: {e}", path.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = Uuid::new_v4();
            let c = ClusterFile {
                cluster_id: base64_url(id.as_bytes()),
                producer_id_block_end: 0,
            };
            save_cluster(data_dir, &c)?;
            Ok(c)
        }
        Err(e) => Err(e),
    }
}

pub fn save_cluster(data_dir: &Path, c: &ClusterFile) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(c).map_err(std::io::Error::other)?;
    write_atomic(&meta_dir(data_dir).join("cluster.json"), &bytes)
}

/// Kafka cluster ids are 22-character URL-safe base64 UUIDs.
pub(crate) fn base64_url(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for b in bytes {
        acc = (acc << 8) | *b as u32;
        bits += 8;
        while bits >= 6 {
            bits -= 6;
            out.push(A[((acc >> bits) & 63) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(A[((acc << (6 - bits)) & 63) as usize] as char);
    }
    out
}

/// Kafka's topic name rules: 1..=249 chars of [a-zA-Z0-9._-], not "." or "..".
pub fn valid_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("Topic name is illegal, it can't be empty".into());
    }
    if name == "." || name == ".." {
        return Err("Topic name cannot be \".\" or \"..\"".into());
    }
    if name.len() > 249 {
        return Err("Topic name is illegal, it can't be longer than 249 characters".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
    {
        return Err(format!(
            "Topic name \"{name}\" is illegal, it contains a character other than ASCII alphanumerics, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Stable partition → shard placement (FNV-1a of the topic name and partition).
pub fn shard_of(topic: &str, partition: i32, shards: usize) -> usize {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in topic
        .as_bytes()
        .iter()
        .chain(partition.to_be_bytes().iter())
    {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    (h % shards.max(1) as u64) as usize
}

pub fn partition_dir(data_dir: &Path, topic: &str, partition: i32) -> PathBuf {
    data_dir.join(format!("{topic}-{partition}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn names_and_persistence() {
        assert!(valid_topic_name("a.b_c-1").is_ok());
        assert!(valid_topic_name("a b").is_err());
        assert!(valid_topic_name("..").is_err());
        assert_eq!(base64_url(&[0u8; 16]).len(), 22);
        let d = tempfile::tempdir().unwrap();
        let img = MetadataImage::default().with_topic(TopicMeta {
            name: "t".into(),
            id: Uuid::new_v4(),
            partitions: 3,
            configs: BTreeMap::new(),
            internal: false,
            assignments: Vec::new(),
        });
        save_image(d.path(), &img).unwrap();
        let back = load_image(d.path()).unwrap();
        assert_eq!(back.topic("t").unwrap().partitions, 3);
    }
}
