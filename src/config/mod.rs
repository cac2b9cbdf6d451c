//! Node settings and the per-core tuning file (`tuning/*.toml`). Owns parsing and validation;
//! every error names the file, the line and the key. Never touches the network or the disk
//! beyond reading the file it is given.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The commented default, embedded so that `fjord serve` needs no file.
pub const DEFAULT_TUNING: &str = include_str!("../../tuning/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: String,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tuning {
    pub node: NodeSection,
    pub shards: ShardsSection,
    pub memory: MemorySection,
    pub io: IoSection,
    pub log: LogSection,
    pub group: GroupSection,
    pub net: NetSection,
    /// Per-core overrides, `[[core]]` tables: the first one naming a core wins.
    #[serde(default)]
    pub core: Vec<CoreSection>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoreSection {
    /// Cores this section applies to.
    pub ids: Vec<usize>,
    pub batch_cache_bytes_per_partition: Option<usize>,
    pub batch_cache_bytes_per_shard: Option<usize>,
    pub io_memory_bytes: Option<usize>,
    pub ring_depth: Option<usize>,
    pub spin_before_park_us: Option<u64>,
}

/// The settings one shard runs with: the node-wide values with its core's overrides applied.
#[derive(Debug, Clone, Copy)]
pub struct ShardTuning {
    pub batch_cache_bytes_per_partition: usize,
    pub batch_cache_bytes_per_shard: usize,
    pub io_memory_bytes: usize,
    pub ring_depth: usize,
    pub spin_before_park_us: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    pub node_id: i32,
    pub listen: String,
    pub advertised_listener: String,
    pub data_dir: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardsSection {
    /// Core ids that run a shard; empty means every online core.
    pub cores: Vec<usize>,
    pub pin: bool,
    pub controller_shard: usize,
    /// Jobs queued from other shards to one shard; a sender waits when it is full.
    #[serde(default = "default_job_queue_max")]
    pub job_queue_max: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySection {
    pub batch_cache_bytes_per_partition: usize,
    /// All partition caches of one shard together stay within this.
    pub batch_cache_bytes_per_shard: usize,
    pub request_bytes_max: usize,
    pub io_memory_bytes: usize,
    /// Request frames being read or handled plus responses not yet written, per shard; when
    /// spent, the shard stops reading its sockets until some are answered.
    #[serde(default = "default_inflight_bytes_per_shard")]
    pub inflight_bytes_per_shard: usize,
    /// Broker-side cap on one fetch response (Kafka's fetch.max.bytes): applies to fetches
    /// that ask for no limit (max_bytes <= 0) or for more.
    #[serde(default = "default_fetch_bytes_max")]
    pub fetch_bytes_max: usize,
}

fn default_job_queue_max() -> usize {
    4096
}

fn default_inflight_bytes_per_shard() -> usize {
    256 << 20
}

fn default_fetch_bytes_max() -> usize {
    57_671_680
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IoSection {
    pub ring_depth: usize,
    pub spin_before_park_us: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    pub segment_bytes: u64,
    pub segment_ms: u64,
    pub retention_ms: i64,
    pub retention_bytes: i64,
    pub retention_check_interval_ms: u64,
    pub max_message_bytes: usize,
    pub num_partitions: i32,
    pub auto_create_topics: bool,
    pub message_timestamp_type: String,
    /// "acks": fdatasync before answering acks=all only; "always": before answering any write.
    pub fsync: String,
    /// Wait this long before starting an fdatasync so that one covers more writes.
    pub group_commit_window_us: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSection {
    pub offsets_topic_num_partitions: i32,
    pub initial_rebalance_delay_ms: u64,
    pub min_session_timeout_ms: i32,
    pub max_session_timeout_ms: i32,
    /// KIP-848 groups: group.consumer.heartbeat.interval.ms.
    #[serde(default = "default_consumer_heartbeat_interval_ms")]
    pub consumer_heartbeat_interval_ms: i32,
    /// KIP-848 groups: group.consumer.session.timeout.ms.
    #[serde(default = "default_consumer_session_timeout_ms")]
    pub consumer_session_timeout_ms: i32,
    /// KIP-848 groups: the assignor used when members name none ("uniform" or "range"),
    /// the first of Kafka's group.consumer.assignors.
    #[serde(default = "default_consumer_assignor")]
    pub consumer_assignor: String,
}

fn default_consumer_heartbeat_interval_ms() -> i32 {
    5_000
}

fn default_consumer_session_timeout_ms() -> i32 {
    45_000
}

fn default_consumer_assignor() -> String {
    "uniform".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSection {
    pub socket_send_buffer_bytes: usize,
    pub socket_recv_buffer_bytes: usize,
    /// A request whose body stops arriving for this long closes its connection (it holds
    /// memory budget while it is read).
    #[serde(default = "default_request_body_idle_timeout_ms")]
    pub request_body_idle_timeout_ms: u64,
}

fn default_request_body_idle_timeout_ms() -> u64 {
    30_000
}

impl Tuning {
    pub fn parse(text: &str, path: &str) -> Result<Tuning, ConfigError> {
        let t: Tuning = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| {
                    format!(
                        "line {}: ",
                        text[..s.start.min(text.len())].lines().count().max(1)
                    )
                })
                .unwrap_or_default();
            ConfigError::Parse {
                path: path.to_string(),
                message: format!("{line}{}", e.message()),
            }
        })?;
        t.validate(path)?;
        Ok(t)
    }

    pub fn load(file: Option<&Path>) -> Result<Tuning, ConfigError> {
        match file {
            None => Tuning::parse(DEFAULT_TUNING, "tuning/default.toml (embedded)"),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Read {
                    path: p.display().to_string(),
                    source: e,
                })?;
                Tuning::parse(&text, &p.display().to_string())
            }
        }
    }

    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, message: &str| {
            Err(ConfigError::Invalid {
                path: path.to_string(),
                key: key.to_string(),
                message: message.to_string(),
            })
        };
        if self.node.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad(
                "node.listen",
                "must be HOST:PORT with an IP address, e.g. 127.0.0.1:9092",
            );
        }
        if self.node.data_dir.is_empty() {
            return bad("node.data_dir", "must not be empty");
        }
        if self.log.segment_bytes < 14 * 1024 || self.log.segment_bytes > (1 << 32) {
            return bad("log.segment_bytes", "must be between 14 KiB and 4 GiB");
        }
        if self.log.num_partitions < 1 {
            return bad("log.num_partitions", "must be at least 1");
        }
        if self.log.max_message_bytes < 1024 {
            return bad("log.max_message_bytes", "must be at least 1024");
        }
        if !matches!(
            self.log.message_timestamp_type.as_str(),
            "CreateTime" | "LogAppendTime"
        ) {
            return bad(
                "log.message_timestamp_type",
                "must be CreateTime or LogAppendTime",
            );
        }
        if self.memory.request_bytes_max < 1024 || self.memory.request_bytes_max > i32::MAX as usize
        {
            return bad(
                "memory.request_bytes_max",
                "must be between 1024 and 2147483647",
            );
        }
        if self.memory.inflight_bytes_per_shard < self.memory.request_bytes_max {
            return bad(
                "memory.inflight_bytes_per_shard",
                "must be at least memory.request_bytes_max (one request must fit)",
            );
        }
        if self.memory.fetch_bytes_max < 1024 || self.memory.fetch_bytes_max > i32::MAX as usize {
            return bad(
                "memory.fetch_bytes_max",
                "must be between 1024 and 2147483647",
            );
        }
        if self.net.request_body_idle_timeout_ms < 10 {
            return bad("net.request_body_idle_timeout_ms", "must be at least 10");
        }
        if self.shards.job_queue_max < 16 {
            return bad("shards.job_queue_max", "must be at least 16");
        }
        if self.io.ring_depth < 8 || self.io.ring_depth > 32768 {
            return bad("io.ring_depth", "must be between 8 and 32768");
        }
        if !matches!(self.log.fsync.as_str(), "acks" | "always") {
            return bad("log.fsync", "must be \"acks\" or \"always\"");
        }
        if self.log.group_commit_window_us > 1_000_000 {
            return bad(
                "log.group_commit_window_us",
                "must be at most 1000000 (1 s)",
            );
        }
        let mut seen = std::collections::HashSet::new();
        for (i, c) in self.core.iter().enumerate() {
            let key = |k: &str| format!("core[{i}].{k}");
            if c.ids.is_empty() {
                return bad(&key("ids"), "must name at least one core");
            }
            for id in &c.ids {
                if !seen.insert(*id) {
                    return bad(
                        &key("ids"),
                        &format!("core {id} is named by two [[core]] sections"),
                    );
                }
            }
            if let Some(r) = c.ring_depth {
                if !(8..=32768).contains(&r) {
                    return bad(&key("ring_depth"), "must be between 8 and 32768");
                }
            }
            if let Some(m) = c.io_memory_bytes {
                if m < 1 << 20 {
                    return bad(&key("io_memory_bytes"), "must be at least 1 MiB");
                }
            }
        }
        if self.group.offsets_topic_num_partitions < 1 {
            return bad("group.offsets_topic_num_partitions", "must be at least 1");
        }
        if self.group.consumer_heartbeat_interval_ms < 1
            || self.group.consumer_heartbeat_interval_ms >= self.group.consumer_session_timeout_ms
        {
            return bad(
                "group.consumer_heartbeat_interval_ms",
                "must be at least 1 and below group.consumer_session_timeout_ms",
            );
        }
        if !matches!(self.group.consumer_assignor.as_str(), "uniform" | "range") {
            return bad(
                "group.consumer_assignor",
                "must be \"uniform\" or \"range\"",
            );
        }
        if self.group.min_session_timeout_ms > self.group.max_session_timeout_ms {
            return bad(
                "group.min_session_timeout_ms",
                "must not exceed group.max_session_timeout_ms",
            );
        }
        Ok(())
    }

    pub fn for_core(&self, core: usize) -> ShardTuning {
        let mut t = ShardTuning {
            batch_cache_bytes_per_partition: self.memory.batch_cache_bytes_per_partition,
            batch_cache_bytes_per_shard: self.memory.batch_cache_bytes_per_shard,
            io_memory_bytes: self.memory.io_memory_bytes,
            ring_depth: self.io.ring_depth,
            spin_before_park_us: self.io.spin_before_park_us,
        };
        if let Some(c) = self.core.iter().find(|c| c.ids.contains(&core)) {
            t.batch_cache_bytes_per_partition = c
                .batch_cache_bytes_per_partition
                .unwrap_or(t.batch_cache_bytes_per_partition);
            t.batch_cache_bytes_per_shard = c
                .batch_cache_bytes_per_shard
                .unwrap_or(t.batch_cache_bytes_per_shard);
            t.io_memory_bytes = c.io_memory_bytes.unwrap_or(t.io_memory_bytes);
            t.ring_depth = c.ring_depth.unwrap_or(t.ring_depth);
            t.spin_before_park_us = c.spin_before_park_us.unwrap_or(t.spin_before_park_us);
        }
        t
    }

    pub fn fsync_always(&self) -> bool {
        self.log.fsync == "always"
    }

    pub fn data_dir(&self) -> PathBuf {
        PathBuf::from(&self.node.data_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_parses() {
        let t = Tuning::load(None).unwrap();
        assert_eq!(t.node.listen, "127.0.0.1:9092");
    }

    #[test]
    fn core_overrides_apply() {
        let text = format!("{DEFAULT_TUNING}\n[[core]]\nids = [1]\nring_depth = 64\n");
        let t = Tuning::parse(&text, "x.toml").unwrap();
        assert_eq!(t.for_core(1).ring_depth, 64);
        assert_eq!(t.for_core(0).ring_depth, t.io.ring_depth);
        let dup = format!("{DEFAULT_TUNING}\n[[core]]\nids = [1]\n[[core]]\nids = [1]\n");
        assert!(Tuning::parse(&dup, "x.toml")
            .unwrap_err()
            .to_string()
            .contains("core[1].ids"));
    }

    #[test]
    fn examples_parse() {
        Tuning::parse(
            include_str!("../../tuning/low-latency.toml"),
            "low-latency.toml",
        )
        .unwrap();
        Tuning::parse(
            include_str!("../../tuning/throughput.toml"),
            "throughput.toml",
        )
        .unwrap();
    }

    #[test]
    fn unknown_key_names_line() {
        let text = DEFAULT_TUNING.replace("[io]", "[io]\nbogus = 1");
        let e = Tuning::parse(&text, "x.toml").unwrap_err().to_string();
        assert!(
            e.contains("x.toml") && e.contains("line") && e.contains("bogus"),
            "{e}"
        );
    }

    #[test]
    fn bad_value_names_key() {
        let text = DEFAULT_TUNING.replace("ring_depth = 256", "ring_depth = 1");
        let e = Tuning::parse(&text, "x.toml").unwrap_err().to_string();
        assert!(e.contains("io.ring_depth"), "{e}");
    }
}
