//! Controller operations: every change to the metadata image. Callers run them on the controller
//! shard (`shard::on_controller`), so changes are serialized; each is persisted before it is
//! published to the other shards. Knows nothing of shards or the wire.

use std::collections::BTreeMap;
use std::sync::Arc;

use uuid::Uuid;

use super::metadata::{self, TopicMeta};
use super::node::Node;
use super::topic_config;

/// Why a controller operation failed; the handlers map it to a Kafka error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    InvalidTopic,
    TopicExists,
    UnknownTopic,
    InvalidPartitions,
    InvalidReplicationFactor,
    InvalidConfig,
    InvalidRequest,
    /// The metadata could not be persisted.
    Storage,
    /// A bug: the state changed under the operation.
    Internal,
}

/// A controller operation's outcome: the value, or why it failed and a message for the client.
pub type OpResult<T> = Result<T, (Refused, String)>;

pub struct NewTopic {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i16,
    pub configs: BTreeMap<String, String>,
    pub internal: bool,
}

pub const PARTITIONS_MAX: i32 = 100_000;

fn check_new_topic(node: &Node, t: &NewTopic) -> OpResult<()> {
    if !t.internal {
        metadata::valid_topic_name(&t.name).map_err(|m| (Refused::InvalidTopic, m))?;
    }
    if node.image().topic(&t.name).is_some() {
        return Err((
            Refused::TopicExists,
            format!("Topic '{}' already exists.", t.name),
        ));
    }
    if t.partitions < 1 || t.partitions > PARTITIONS_MAX {
        return Err((
            Refused::InvalidPartitions,
            format!("Number of partitions must be between 1 and {PARTITIONS_MAX}."),
        ));
    }
    if t.replication_factor == 0 || t.replication_factor < -1 {
        return Err((
            Refused::InvalidReplicationFactor,
            "Replication factor must be larger than 0.".into(),
        ));
    }
    if t.replication_factor > 1 {
        return Err((
            Refused::InvalidReplicationFactor,
            format!(
                "Replication factor: {} larger than available brokers: 1.",
                t.replication_factor
            ),
        ));
    }
    for (k, v) in &t.configs {
        topic_config::validate(k, v).map_err(|m| (Refused::InvalidConfig, m))?;
    }
    Ok(())
}

/// Creates topics (or only validates them).
pub fn create_topics(
    node: &Node,
    topics: Vec<NewTopic>,
    validate_only: bool,
) -> Vec<OpResult<Arc<TopicMeta>>> {
    let mut out = Vec::new();
    for t in topics {
        if let Err(e) = check_new_topic(node, &t) {
            out.push(Err(e));
            continue;
        }
        let meta = TopicMeta {
            name: t.name.clone(),
            id: Uuid::new_v4(),
            partitions: t.partitions,
            configs: t.configs,
            internal: t.internal,
            assignments: Vec::new(),
        };
        if validate_only {
            out.push(Ok(Arc::new(meta)));
            continue;
        }
        // A crash between a delete's metadata write and its directory removal leaves old
        // data behind: it must not reappear in a new topic of the same name. The internal
        // topic is never deleted: partitions found on disk are its own, and are kept.
        if !t.internal {
            remove_stale_partition_dirs(node, &meta.name, 0..meta.partitions);
        }
        let next = node.image().with_topic(meta);
        if let Err(e) = metadata::save_image(&node.data_dir, &next) {
            tracing::error!("cannot persist metadata: {e}");
            out.push(Err((
                Refused::Storage,
                format!("cannot persist metadata: {e}"),
            )));
            continue;
        }
        let created = next.topic(&t.name).cloned();
        node.meta.store(Arc::new(next));
        tracing::info!("created topic {} with {} partitions", t.name, t.partitions);
        match created {
            Some(c) => out.push(Ok(c)),
            None => out.push(Err((Refused::Internal, "topic vanished".into()))),
        }
    }
    out
}

/// Creates the internal topic `name` (compacted, 100 MiB segments, Kafka's settings for
/// `__consumer_offsets`) if the image lacks it; a single node's start-up calls it.
pub fn ensure_internal_topic(node: &Node, name: &str, partitions: i32) -> OpResult<()> {
    if node.image().topic(name).is_some() {
        return Ok(());
    }
    let configs = [
        ("cleanup.policy", "compact"),
        ("segment.bytes", "104857600"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let topic = NewTopic {
        name: name.to_owned(),
        partitions,
        replication_factor: 1,
        configs,
        internal: true,
    };
    match create_topics(node, vec![topic], false).pop() {
        Some(r) => r.map(|_| ()),
        None => Err((Refused::Internal, "no answer".into())),
    }
}

fn remove_stale_partition_dirs(node: &Node, topic: &str, partitions: std::ops::Range<i32>) {
    for p in partitions {
        let dir = metadata::partition_dir(&node.data_dir, topic, p);
        if dir.exists() {
            tracing::warn!(
                "removing stale data of a deleted {topic}-{p} at {}",
                dir.display()
            );
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::error!("cannot remove {}: {e}", dir.display());
            }
        }
    }
}

/// Unpublishes a topic (the caller drops its partitions and removes its data) and returns it.
pub fn delete_topic(node: &Node, name: &str) -> OpResult<Arc<TopicMeta>> {
    let Some(t) = node.image().topic(name).cloned() else {
        return Err((
            Refused::UnknownTopic,
            "This server does not host this topic-partition.".into(),
        ));
    };
    if t.internal {
        return Err((
            Refused::InvalidTopic,
            "internal topics cannot be deleted".into(),
        ));
    }
    let next = node.image().without_topic(name);
    metadata::save_image(&node.data_dir, &next)
        .map_err(|e| (Refused::Storage, format!("cannot persist metadata: {e}")))?;
    node.meta.store(Arc::new(next));
    Ok(t)
}

/// Grows a topic's partition count (never shrinks).
pub fn create_partitions(node: &Node, name: &str, count: i32, validate_only: bool) -> OpResult<()> {
    let Some(t) = node.image().topic(name).cloned() else {
        return Err((
            Refused::UnknownTopic,
            "This server does not host this topic-partition.".into(),
        ));
    };
    if count < t.partitions {
        return Err((
            Refused::InvalidPartitions,
            format!(
                "Topic currently has {} partitions, which is higher than the requested {count}.",
                t.partitions
            ),
        ));
    }
    if count == t.partitions {
        return Err((
            Refused::InvalidPartitions,
            format!("Topic already has {count} partitions."),
        ));
    }
    if count > PARTITIONS_MAX {
        return Err((
            Refused::InvalidPartitions,
            format!("Number of partitions must be at most {PARTITIONS_MAX}."),
        ));
    }
    if validate_only {
        return Ok(());
    }
    remove_stale_partition_dirs(node, name, t.partitions..count);
    let mut meta = (*t).clone();
    meta.partitions = count;
    let next = node.image().with_topic(meta);
    metadata::save_image(&node.data_dir, &next)
        .map_err(|e| (Refused::Storage, format!("cannot persist metadata: {e}")))?;
    node.meta.store(Arc::new(next));
    Ok(())
}

/// An IncrementalAlterConfigs operation (AlterConfigs only sets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigOp {
    Set,
    Delete,
    /// Adds items to a list config.
    Append,
    /// Removes items from a list config.
    Subtract,
    /// A code Kafka does not define; refused with its number.
    Unknown(i8),
}

impl ConfigOp {
    /// Kafka's numbering: 0 set, 1 delete, 2 append, 3 subtract.
    pub fn from_kafka(code: i8) -> ConfigOp {
        match code {
            0 => ConfigOp::Set,
            1 => ConfigOp::Delete,
            2 => ConfigOp::Append,
            3 => ConfigOp::Subtract,
            other => ConfigOp::Unknown(other),
        }
    }

    fn kafka_code(self) -> i8 {
        match self {
            ConfigOp::Set => 0,
            ConfigOp::Delete => 1,
            ConfigOp::Append => 2,
            ConfigOp::Subtract => 3,
            ConfigOp::Unknown(code) => code,
        }
    }
}

/// One change to one config of a topic.
pub struct ConfigChange {
    pub name: String,
    pub op: ConfigOp,
    pub value: Option<String>,
}

/// Replaces (incremental=false) or edits a topic's config overrides, change by change.
pub fn alter_topic_configs(
    node: &Node,
    name: &str,
    changes: Vec<ConfigChange>,
    incremental: bool,
    validate_only: bool,
) -> OpResult<()> {
    let (_, configs) = resolve_topic_configs(node, name, changes, incremental)?;
    if validate_only {
        return Ok(());
    }
    let Some(t) = node.image().topic(name).cloned() else {
        return Err((
            Refused::UnknownTopic,
            format!("Topic {name} does not exist"),
        ));
    };
    let mut meta = (*t).clone();
    meta.configs = configs;
    let next = node.image().with_topic(meta);
    metadata::save_image(&node.data_dir, &next)
        .map_err(|e| (Refused::Storage, format!("cannot persist metadata: {e}")))?;
    node.meta.store(Arc::new(next));
    Ok(())
}

/// The topic's overrides now and after the changes, validated; changes nothing.
pub fn resolve_topic_configs(
    node: &Node,
    name: &str,
    changes: Vec<ConfigChange>,
    incremental: bool,
) -> OpResult<(BTreeMap<String, String>, BTreeMap<String, String>)> {
    let Some(t) = node.image().topic(name).cloned() else {
        return Err((
            Refused::UnknownTopic,
            format!("Topic {name} does not exist"),
        ));
    };
    let mut configs = if incremental {
        t.configs.clone()
    } else {
        BTreeMap::new()
    };
    for ConfigChange {
        name: k,
        op,
        value: v,
    } in changes
    {
        match (op, v) {
            (ConfigOp::Set, Some(v)) => {
                topic_config::validate(&k, &v).map_err(|m| (Refused::InvalidConfig, m))?;
                configs.insert(k, v);
            }
            (ConfigOp::Set, None) if !incremental => {}
            (ConfigOp::Delete, _) => {
                topic_config::def(&k).ok_or((
                    Refused::InvalidConfig,
                    format!("Unknown topic config name: {k}"),
                ))?;
                configs.remove(&k);
            }
            (ConfigOp::Append | ConfigOp::Subtract, Some(v)) => {
                let d = topic_config::def(&k).ok_or((
                    Refused::InvalidConfig,
                    format!("Unknown topic config name: {k}"),
                ))?;
                if d.kind != topic_config::ConfigType::List {
                    return Err((Refused::InvalidConfig, format!("Config {k} is not a list")));
                }
                let current = configs
                    .get(&k)
                    .cloned()
                    .unwrap_or_else(|| topic_config::default_value(&k, &node.tuning));
                let mut items: Vec<String> = current
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                for x in v.split(',').map(|s| s.trim().to_string()) {
                    if op == ConfigOp::Append && !items.contains(&x) {
                        items.push(x);
                    } else if op == ConfigOp::Subtract {
                        items.retain(|i| *i != x);
                    }
                }
                let joined = items.join(",");
                topic_config::validate(&k, &joined).map_err(|m| (Refused::InvalidConfig, m))?;
                configs.insert(k, joined);
            }
            _ => {
                return Err((
                    Refused::InvalidRequest,
                    format!("invalid operation {} for {k}", op.kafka_code()),
                ))
            }
        }
    }
    Ok((t.configs.clone(), configs))
}

/// Hands out a new producer id; ids are reserved in persisted blocks so none is reused.
pub fn allocate_producer_id(node: &Node) -> OpResult<i64> {
    use std::sync::atomic::Ordering;
    let id = node.next_producer_id.load(Ordering::Relaxed);
    if id >= node.producer_id_block_end.load(Ordering::Relaxed) {
        let end = id + metadata::PRODUCER_ID_BLOCK;
        let c = metadata::ClusterFile {
            cluster_id: node.cluster_id.clone(),
            producer_id_block_end: end,
        };
        metadata::save_cluster(&node.data_dir, &c).map_err(|e| {
            (
                Refused::Storage,
                format!("cannot persist producer id block: {e}"),
            )
        })?;
        node.producer_id_block_end.store(end, Ordering::Relaxed);
    }
    node.next_producer_id.store(id + 1, Ordering::Relaxed);
    Ok(id)
}
