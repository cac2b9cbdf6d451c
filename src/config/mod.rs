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
    pub metrics: MetricsSection,
    pub logging: LoggingSection,
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
    pub syncs_in_flight: Option<usize>,
}

/// The settings one shard runs with: the node-wide values with its core's overrides applied.
#[derive(Debug, Clone, Copy)]
pub struct ShardTuning {
    pub batch_cache_bytes_per_partition: usize,
    pub batch_cache_bytes_per_shard: usize,
    pub io_memory_bytes: usize,
    pub ring_depth: usize,
    pub spin_before_park_us: u64,
    pub syncs_in_flight: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    pub node_id: i32,
    pub listen: String,
    pub advertised_listener: String,
    pub data_dir: String,
    /// The controller quorum's voters, `ID@HOST:PORT,...` (Kafka's `controller.quorum.voters`);
    /// empty: a one-node cluster without a quorum.
    #[serde(default)]
    pub controllers: String,
    /// Rack of this node (Kafka's `broker.rack`); empty: none.
    #[serde(default)]
    pub rack: String,
    /// A broker that has not heartbeaten to the active controller for this long is fenced.
    #[serde(default = "default_broker_session_timeout_ms")]
    pub broker_session_timeout_ms: u64,
    #[serde(default = "default_broker_heartbeat_interval_ms")]
    pub broker_heartbeat_interval_ms: u64,
    /// Kafka's replica.lag.time.max.ms: a follower that has not caught up for this long leaves
    /// the ISR.
    #[serde(default = "default_replica_lag_time_max_ms")]
    pub replica_lag_time_max_ms: u64,
    /// Kafka's auto.leader.rebalance.enable: the active controller gives each partition back
    /// to its preferred replica (the first) once that is a live member of the ISR again.
    #[serde(default = "default_true")]
    pub auto_leader_rebalance_enable: bool,
    /// How often it looks (Kafka's leader.imbalance.check.interval.seconds, in ms here).
    #[serde(default = "default_leader_imbalance_check_interval_ms")]
    pub leader_imbalance_check_interval_ms: u64,
    /// Kafka's replica.selector.class (KIP-392): empty, no selection (consumers read from
    /// leaders); "rack" (or Kafka's RackAwareReplicaSelector class name): a leader sends a
    /// consumer whose client.rack differs from its own to an in-sync replica in that rack.
    #[serde(default)]
    pub replica_selector: String,
    /// Kafka's replica.fetch.max.bytes: what a follower asks per partition and fetch.
    #[serde(default = "default_replica_fetch_max_bytes")]
    pub replica_fetch_max_bytes: u64,
    /// Kafka's replica.fetch.response.max.bytes: what a follower asks per fetch in all.
    #[serde(default = "default_replica_fetch_response_max_bytes")]
    pub replica_fetch_response_max_bytes: u64,
    /// Kafka's replica.fetch.wait.max.ms: how long a leader holds a follower's fetch when it
    /// has nothing new.
    #[serde(default = "default_replica_fetch_wait_max_ms")]
    pub replica_fetch_wait_max_ms: u64,
    /// Kafka's num.replica.fetchers: fetchers per leader node on each shard; a followed
    /// partition is fetched by the one its name and index hash to.
    #[serde(default = "default_num_replica_fetchers")]
    pub num_replica_fetchers: usize,
}

fn default_replica_fetch_max_bytes() -> u64 {
    1 << 20
}
fn default_replica_fetch_response_max_bytes() -> u64 {
    10 << 20
}
fn default_replica_fetch_wait_max_ms() -> u64 {
    500
}
fn default_num_replica_fetchers() -> usize {
    1
}

fn default_true() -> bool {
    true
}
fn default_leader_imbalance_check_interval_ms() -> u64 {
    300_000
}

fn default_offsets_topic_replication_factor() -> i16 {
    3
}
fn default_broker_session_timeout_ms() -> u64 {
    9_000
}
fn default_replica_lag_time_max_ms() -> u64 {
    30_000
}
fn default_broker_heartbeat_interval_ms() -> u64 {
    2_000
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
    /// Allow more shards than cores (they then share cores and run unpinned).
    pub overprovisioned: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// HOST:PORT of the Prometheus endpoint; empty: no endpoint.
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggingSection {
    /// "text" or "json".
    pub format: String,
    /// Levels per module in RUST_LOG's syntax, e.g. "info,fjord::group=debug"; RUST_LOG's
    /// directives are applied after these.
    pub levels: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySection {
    pub batch_cache_bytes_per_partition: usize,
    /// All partition caches of one shard together stay within this; 0: an eighth of each
    /// core's share of the machine's memory (`auto_batch_cache_bytes_per_shard`).
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
    /// The most a partition's sequential reader reads ahead of its fetches (0: never).
    #[serde(default = "default_read_ahead_bytes_per_partition")]
    pub read_ahead_bytes_per_partition: usize,
    /// All read-ahead windows of one shard together stay within this.
    #[serde(default = "default_read_ahead_bytes_per_shard")]
    pub read_ahead_bytes_per_shard: usize,
    /// Incremental fetch sessions (KIP-227) one shard keeps (Kafka's
    /// max.incremental.fetch.session.cache.slots); 0 turns sessions off.
    #[serde(default = "default_fetch_session_cache_slots")]
    pub fetch_session_cache_slots: usize,
}

fn default_fetch_session_cache_slots() -> usize {
    1000
}

fn default_read_ahead_bytes_per_partition() -> usize {
    16 << 20
}

fn default_read_ahead_bytes_per_shard() -> usize {
    256 << 20
}

fn default_job_queue_max() -> usize {
    4096
}

fn default_visibility_sync_delay_us() -> u64 {
    0
}

fn default_cleaner_backoff_ms() -> u64 {
    15_000
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
    /// fdatasyncs one shard runs at once (see tuning/default.toml).
    #[serde(default = "default_syncs_in_flight")]
    pub syncs_in_flight: usize,
}

fn default_syncs_in_flight() -> usize {
    1
}

fn default_visibility() -> String {
    "synced".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    pub segment_bytes: u64,
    pub segment_ms: u64,
    pub retention_ms: i64,
    pub retention_bytes: i64,
    pub retention_check_interval_ms: u64,
    /// How often the cleaner looks for compacted partitions to clean (log.cleaner.backoff.ms).
    #[serde(default = "default_cleaner_backoff_ms")]
    pub cleaner_backoff_ms: u64,
    pub max_message_bytes: usize,
    pub num_partitions: i32,
    pub auto_create_topics: bool,
    pub message_timestamp_type: String,
    /// "acks": fdatasync before answering acks=all only; "always": before answering any write.
    pub fsync: String,
    /// Wait this long before starting an fdatasync so that one covers more writes.
    pub group_commit_window_us: u64,
    /// Consumers read only synced data; after a write, the partition's background sync waits
    /// this long so that one fdatasync covers the writes of that window (acks=1 throughput
    /// against the time before consumers see a record).
    #[serde(default = "default_visibility_sync_delay_us")]
    pub visibility_sync_delay_us: u64,
    /// "synced": consumers read only what is on stable storage; "written": what is written,
    /// as Kafka does (a power cut can take back records consumers have read).
    #[serde(default = "default_visibility")]
    pub visibility: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSection {
    pub offsets_topic_num_partitions: i32,
    /// In a cluster, `__consumer_offsets` is created with this many replicas (Kafka's
    /// offsets.topic.replication.factor); groups wait until there are that many brokers.
    #[serde(default = "default_offsets_topic_replication_factor")]
    pub offsets_topic_replication_factor: i16,
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
    /// Kafka's offsets.retention.minutes: committed offsets of a group nobody consumes with
    /// expire this long after it became empty (or after the commit, for a group that never
    /// had members).
    #[serde(default = "default_offsets_retention_ms")]
    pub offsets_retention_ms: u64,
    /// Kafka's offsets.retention.check.interval.ms.
    #[serde(default = "default_offsets_retention_check_interval_ms")]
    pub offsets_retention_check_interval_ms: u64,
}

fn default_offsets_retention_ms() -> u64 {
    7 * 24 * 3_600_000
}

fn default_offsets_retention_check_interval_ms() -> u64 {
    600_000
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

/// Where a value of the effective configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    /// A `--config` file, at this line.
    File {
        path: String,
        line: usize,
    },
    /// A `--set KEY=VALUE` argument, as given.
    Flag(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => write!(f, "default"),
            Source::File { path, line } => write!(f, "{path} line {line}"),
            Source::Flag(arg) => write!(f, "--set {arg}"),
        }
    }
}

/// The effective configuration and, for every key, its value and where it came from, in the
/// order of the embedded default (what `fjord config show` prints).
#[derive(Debug, Clone)]
pub struct Layered {
    pub tuning: Tuning,
    pub entries: Vec<Entry>,
}

#[derive(Debug, Clone)]
pub struct Entry {
    /// `section.key`, or `core` for the per-core overrides (an array of tables).
    pub key: String,
    pub value: toml::Value,
    pub source: Source,
}

/// Kafka broker property names accepted for the Fjord setting that means the same, with the
/// factor that turns Kafka's unit into Fjord's (hours into milliseconds, …).
const KAFKA_NAMES: &[(&str, &str, i64)] = &[
    ("broker.id", "node.node_id", 1),
    ("node.id", "node.node_id", 1),
    ("controller.quorum.voters", "node.controllers", 1),
    ("broker.rack", "node.rack", 1),
    (
        "broker.session.timeout.ms",
        "node.broker_session_timeout_ms",
        1,
    ),
    (
        "broker.heartbeat.interval.ms",
        "node.broker_heartbeat_interval_ms",
        1,
    ),
    ("replica.lag.time.max.ms", "node.replica_lag_time_max_ms", 1),
    (
        "auto.leader.rebalance.enable",
        "node.auto_leader_rebalance_enable",
        1,
    ),
    ("replica.selector.class", "node.replica_selector", 1),
    ("replica.fetch.max.bytes", "node.replica_fetch_max_bytes", 1),
    (
        "replica.fetch.response.max.bytes",
        "node.replica_fetch_response_max_bytes",
        1,
    ),
    (
        "replica.fetch.wait.max.ms",
        "node.replica_fetch_wait_max_ms",
        1,
    ),
    ("num.replica.fetchers", "node.num_replica_fetchers", 1),
    (
        "leader.imbalance.check.interval.seconds",
        "node.leader_imbalance_check_interval_ms",
        1000,
    ),
    ("log.dir", "node.data_dir", 1),
    ("log.dirs", "node.data_dir", 1),
    ("num.partitions", "log.num_partitions", 1),
    ("log.segment.bytes", "log.segment_bytes", 1),
    ("log.roll.ms", "log.segment_ms", 1),
    ("log.roll.hours", "log.segment_ms", 3_600_000),
    ("log.retention.ms", "log.retention_ms", 1),
    ("log.retention.minutes", "log.retention_ms", 60_000),
    ("log.retention.hours", "log.retention_ms", 3_600_000),
    ("log.retention.bytes", "log.retention_bytes", 1),
    (
        "log.retention.check.interval.ms",
        "log.retention_check_interval_ms",
        1,
    ),
    ("message.max.bytes", "log.max_message_bytes", 1),
    (
        "max.incremental.fetch.session.cache.slots",
        "memory.fetch_session_cache_slots",
        1,
    ),
    ("auto.create.topics.enable", "log.auto_create_topics", 1),
    (
        "log.message.timestamp.type",
        "log.message_timestamp_type",
        1,
    ),
    (
        "offsets.topic.num.partitions",
        "group.offsets_topic_num_partitions",
        1,
    ),
    (
        "offsets.retention.minutes",
        "group.offsets_retention_ms",
        60_000,
    ),
    (
        "offsets.retention.check.interval.ms",
        "group.offsets_retention_check_interval_ms",
        1,
    ),
    (
        "offsets.topic.replication.factor",
        "group.offsets_topic_replication_factor",
        1,
    ),
    (
        "group.initial.rebalance.delay.ms",
        "group.initial_rebalance_delay_ms",
        1,
    ),
    (
        "group.min.session.timeout.ms",
        "group.min_session_timeout_ms",
        1,
    ),
    (
        "group.max.session.timeout.ms",
        "group.max_session_timeout_ms",
        1,
    ),
    (
        "group.consumer.heartbeat.interval.ms",
        "group.consumer_heartbeat_interval_ms",
        1,
    ),
    (
        "group.consumer.session.timeout.ms",
        "group.consumer_session_timeout_ms",
        1,
    ),
    ("socket.request.max.bytes", "memory.request_bytes_max", 1),
    (
        "socket.send.buffer.bytes",
        "net.socket_send_buffer_bytes",
        1,
    ),
    (
        "socket.receive.buffer.bytes",
        "net.socket_recv_buffer_bytes",
        1,
    ),
];

/// One value named by the file or a flag, before it is merged.
struct Override {
    /// `section.key`, resolved from a Kafka name if need be.
    key: String,
    /// The name as written, for error messages.
    written: String,
    value: toml::Value,
    source: Source,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].lines().count().max(1)
        + usize::from(text[..offset.min(text.len())].ends_with('\n'))
}

fn to_value(v: &toml_edit::Value) -> toml::Value {
    use toml_edit::Value as E;
    match v {
        E::String(s) => toml::Value::String(s.value().clone()),
        E::Integer(i) => toml::Value::Integer(*i.value()),
        E::Float(f) => toml::Value::Float(*f.value()),
        E::Boolean(b) => toml::Value::Boolean(*b.value()),
        E::Datetime(d) => toml::Value::Datetime(*d.value()),
        E::Array(a) => toml::Value::Array(a.iter().map(to_value).collect()),
        E::InlineTable(t) => toml::Value::Table(
            t.iter()
                .map(|(k, v)| (k.to_string(), to_value(v)))
                .collect(),
        ),
    }
}

fn table_to_value(t: &toml_edit::Table) -> toml::Value {
    toml::Value::Table(
        t.iter()
            .filter_map(|(k, i)| match i {
                toml_edit::Item::Value(v) => Some((k.to_string(), to_value(v))),
                toml_edit::Item::Table(t) => Some((k.to_string(), table_to_value(t))),
                _ => None,
            })
            .collect(),
    )
}

fn type_name(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// The embedded default as a table, and its `section.key` names in file order.
fn default_layer() -> (toml::Table, Vec<String>) {
    // The default is part of the binary and checked by a unit test: failing to parse it is a
    // build defect, not bad input.
    let table: toml::Table =
        toml::from_str(DEFAULT_TUNING).expect("embedded tuning/default.toml parses");
    let doc = toml_edit::ImDocument::parse(DEFAULT_TUNING).expect("embedded default parses");
    let mut order = Vec::new();
    for (section, item) in doc.iter() {
        if let toml_edit::Item::Table(t) = item {
            let mut keys: Vec<(usize, String)> = t
                .iter()
                .map(|(k, i)| {
                    let pos = i.span().map(|s| s.start).unwrap_or(usize::MAX);
                    (pos, format!("{section}.{k}"))
                })
                .collect();
            keys.sort();
            order.extend(keys.into_iter().map(|(_, k)| k));
        }
    }
    order.push("core".to_string());
    (table, order)
}

/// Fjord's name for `written` (a Fjord `section.key` or a Kafka property name) and the factor
/// that converts its value; `written` may carry the section it was written under
/// (`log.num.partitions` for `num.partitions` under `[log]`).
fn resolve(written: &str, known: &[String]) -> Option<(String, i64)> {
    if known.iter().any(|k| k == written) && written != "core" {
        return Some((written.to_string(), 1));
    }
    let kafka = |name: &str| {
        KAFKA_NAMES
            .iter()
            .find(|(k, _, _)| *k == name)
            .map(|(_, f, m)| (f.to_string(), *m))
    };
    kafka(written).or_else(|| {
        let (section, rest) = written.split_once('.')?;
        let r = kafka(rest)?;
        // Only under the section Fjord keeps the setting in would a reader expect it.
        (r.0.split_once('.').map(|(s, _)| s) == Some(section)).then_some(r)
    })
}

/// Edit distance, for "did you mean"; names are short, so the quadratic table is small.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest known name (Fjord's or Kafka's), for "did you mean".
fn closest(written: &str, known: &[String]) -> Option<String> {
    let last = |k: &str| k.rsplit('.').next().unwrap_or(k).to_string();
    let candidates = known
        .iter()
        .filter(|k| k.as_str() != "core")
        .cloned()
        .chain(KAFKA_NAMES.iter().map(|(k, _, _)| k.to_string()));
    candidates
        .map(|k| {
            let d = edit_distance(written, &k).min(edit_distance(&last(written), &last(&k)) + 1);
            (d, k)
        })
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, k)| k)
}

impl Override {
    /// Applies the unit factor and checks the value has the default's type.
    fn checked(mut self, base: &toml::Table, factor: i64) -> Result<Override, ConfigError> {
        let (section, key) = self.key.split_once('.').unwrap_or(("", &self.key));
        let Some(default) = base.get(section).and_then(|s| s.get(key)) else {
            return Err(self.error("unknown key"));
        };
        if factor != 1 {
            if let toml::Value::Integer(i) = self.value {
                if i >= 0 {
                    self.value = toml::Value::Integer(i.saturating_mul(factor));
                }
            }
        }
        let same = std::mem::discriminant(default) == std::mem::discriminant(&self.value);
        if !same {
            return Err(self.error(&format!(
                "expected {}, got {}",
                type_name(default),
                type_name(&self.value)
            )));
        }
        if self.written.starts_with("log.dir") {
            if let toml::Value::String(s) = &self.value {
                if s.contains(',') {
                    return Err(self.error("Fjord keeps its data in one directory"));
                }
            }
        }
        Ok(self)
    }

    fn error(&self, message: &str) -> ConfigError {
        let key = if self.written == self.key {
            self.key.clone()
        } else {
            format!("{} ({})", self.written, self.key)
        };
        ConfigError::Invalid {
            path: self.source.to_string(),
            key,
            message: message.to_string(),
        }
    }
}

/// Collects every value a file names, with its line, resolving Kafka names.
fn file_overrides(
    text: &str,
    path: &str,
    base: &toml::Table,
    known: &[String],
    cores: &mut Option<(toml::Value, Vec<usize>)>,
) -> Result<Vec<Override>, ConfigError> {
    let doc = toml_edit::ImDocument::parse(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| format!("line {}: ", line_of(text, s.start)))
            .unwrap_or_default();
        ConfigError::Parse {
            path: path.to_string(),
            message: format!("{line}{}", e.message().trim_end().replace('\n', "; ")),
        }
    })?;
    let mut out = Vec::new();
    // Bounded by the file's nesting depth, which the TOML parser already limits.
    fn walk(
        t: &toml_edit::Table,
        prefix: &str,
        text: &str,
        path: &str,
        out: &mut Vec<(String, toml::Value, usize)>,
        cores: &mut Option<(toml::Value, Vec<usize>)>,
    ) -> Result<(), ConfigError> {
        for (k, item) in t.iter() {
            let name = if prefix.is_empty() {
                k.to_string()
            } else {
                format!("{prefix}.{k}")
            };
            let span = t
                .get_key_value(k)
                .and_then(|(key, _)| key.span())
                .or_else(|| item.span())
                .map(|s| s.start)
                .unwrap_or(0);
            let line = line_of(text, span);
            match item {
                toml_edit::Item::None => {}
                toml_edit::Item::Value(toml_edit::Value::InlineTable(it)) => {
                    let t = it.clone().into_table();
                    walk(&t, &name, text, path, out, cores)?;
                }
                toml_edit::Item::Value(v) => out.push((name, to_value(v), line)),
                toml_edit::Item::Table(t) => walk(t, &name, text, path, out, cores)?,
                toml_edit::Item::ArrayOfTables(a) if name == "core" => {
                    let lines = a
                        .iter()
                        .map(|t| t.span().map(|s| line_of(text, s.start)).unwrap_or(line))
                        .collect();
                    let v = toml::Value::Array(a.iter().map(table_to_value).collect());
                    *cores = Some((v, lines));
                }
                toml_edit::Item::ArrayOfTables(_) => {
                    return Err(ConfigError::Invalid {
                        path: format!("{path} line {line}"),
                        key: name,
                        message: "unknown key".into(),
                    })
                }
            }
        }
        Ok(())
    }
    let mut raw = Vec::new();
    walk(doc.as_table(), "", text, path, &mut raw, cores)?;
    for (written, value, line) in raw {
        let source = Source::File {
            path: path.to_string(),
            line,
        };
        let Some((key, factor)) = resolve(&written, known) else {
            let hint = closest(&written, known)
                .map(|c| format!(" (did you mean {c}?)"))
                .unwrap_or_default();
            return Err(ConfigError::Invalid {
                path: source.to_string(),
                key: written,
                message: format!("unknown key{hint}"),
            });
        };
        out.push(
            Override {
                key,
                written,
                value,
                source,
            }
            .checked(base, factor)?,
        );
    }
    Ok(out)
}

/// Reads `--set KEY=VALUE`: the value is taken as the type the default has.
fn flag_override(arg: &str, base: &toml::Table, known: &[String]) -> Result<Override, ConfigError> {
    let source = Source::Flag(arg.to_string());
    let Some((written, raw)) = arg.split_once('=') else {
        return Err(ConfigError::Parse {
            path: source.to_string(),
            message: "expected KEY=VALUE, e.g. --set num.partitions=4".into(),
        });
    };
    let written = written.trim().to_string();
    let raw = raw.trim();
    let Some((key, factor)) = resolve(&written, known) else {
        let hint = closest(&written, known)
            .map(|c| format!(" (did you mean {c}?)"))
            .unwrap_or_default();
        return Err(ConfigError::Invalid {
            path: source.to_string(),
            key: written,
            message: format!("unknown key{hint}"),
        });
    };
    let (section, k) = key.split_once('.').unwrap_or(("", &key));
    let default = base.get(section).and_then(|s| s.get(k));
    let bad = |what: &str| ConfigError::Invalid {
        path: source.to_string(),
        key: written.clone(),
        message: format!("expected {what}, got {raw:?}"),
    };
    let value = match default {
        Some(toml::Value::Integer(_)) => toml::Value::Integer(
            raw.replace('_', "")
                .parse()
                .map_err(|_| bad("an integer"))?,
        ),
        Some(toml::Value::Boolean(_)) => {
            toml::Value::Boolean(raw.parse().map_err(|_| bad("true or false"))?)
        }
        Some(toml::Value::Array(_)) => {
            let inner = raw.trim_start_matches('[').trim_end_matches(']');
            let items: Result<Vec<toml::Value>, _> = inner
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| s.parse::<i64>().map(toml::Value::Integer))
                .collect();
            toml::Value::Array(items.map_err(|_| bad("a list of integers, e.g. 0,1"))?)
        }
        _ => toml::Value::String(raw.trim_matches('"').to_string()),
    };
    Override {
        key,
        written,
        value,
        source,
    }
    .checked(base, factor)
}

impl Tuning {
    /// The embedded default, with `file` (text and name) merged over it: the file names only
    /// what differs. Every error names the file, the line and the key.
    pub fn parse(text: &str, path: &str) -> Result<Tuning, ConfigError> {
        Ok(Tuning::layered(Some((text, path)), &[])?.tuning)
    }

    /// The default, then `file`, then each `--set KEY=VALUE` in order; the merged result is
    /// validated as a whole, and an error names the source of the value at fault.
    pub fn layered(file: Option<(&str, &str)>, sets: &[String]) -> Result<Layered, ConfigError> {
        let (base, known) = default_layer();
        let mut cores = None;
        let mut overrides = match file {
            Some((text, path)) => file_overrides(text, path, &base, &known, &mut cores)?,
            None => Vec::new(),
        };
        for s in sets {
            overrides.push(flag_override(s, &base, &known)?);
        }
        let merge = |upto: usize| {
            let mut merged = base.clone();
            for o in &overrides[..upto] {
                let (section, key) = o.key.split_once('.').unwrap_or(("", &o.key));
                if let Some(toml::Value::Table(t)) = merged.get_mut(section) {
                    t.insert(key.to_string(), o.value.clone());
                }
            }
            if let Some((v, _)) = &cores {
                merged.insert("core".to_string(), v.clone());
            }
            merged
        };
        let tuning: Tuning = match toml::Value::Table(merge(overrides.len())).try_into() {
            Ok(t) => t,
            Err(e) => {
                // A value of the right type but out of its type's range (-1 for a size): name
                // the first override that alone breaks the default.
                for o in &overrides {
                    let (section, key) = o.key.split_once('.').unwrap_or(("", &o.key));
                    let mut one = base.clone();
                    if let Some(toml::Value::Table(t)) = one.get_mut(section) {
                        t.insert(key.to_string(), o.value.clone());
                    }
                    if let Err(e) = toml::Value::Table(one).try_into::<Tuning>() {
                        return Err(o.error(e.message().trim_end()));
                    }
                }
                let path = match (&cores, file) {
                    (Some((_, lines)), Some((_, path))) => Source::File {
                        path: path.to_string(),
                        line: lines.first().copied().unwrap_or(1),
                    }
                    .to_string(),
                    _ => "tuning".to_string(),
                };
                return Err(ConfigError::Invalid {
                    path,
                    key: "core".into(),
                    message: e.message().trim_end().to_string(),
                });
            }
        };
        let source_of = |key: &str| -> Source {
            if let Some(rest) = key.strip_prefix("core[") {
                let i: usize = rest
                    .split(']')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                if let (Some((_, lines)), Some((_, path))) = (&cores, file) {
                    return Source::File {
                        path: path.to_string(),
                        line: lines.get(i).copied().unwrap_or(1),
                    };
                }
            }
            overrides
                .iter()
                .rev()
                .find(|o| o.key == key)
                .map(|o| o.source.clone())
                .unwrap_or(Source::Default)
        };
        if let Err((key, message)) = tuning.validate() {
            let source = source_of(&key);
            let path = match &source {
                Source::Default => "tuning/default.toml (embedded)".to_string(),
                s => s.to_string(),
            };
            return Err(ConfigError::Invalid { path, key, message });
        }
        let merged = merge(overrides.len());
        let entries = known
            .iter()
            .filter_map(|k| {
                let value = match k.split_once('.') {
                    Some((s, key)) => merged.get(s)?.get(key)?.clone(),
                    None => merged.get(k)?.clone(),
                };
                Some(Entry {
                    key: k.clone(),
                    value,
                    source: if k == "core" {
                        source_of("core[0]")
                    } else {
                        source_of(k)
                    },
                })
            })
            .collect();
        Ok(Layered { tuning, entries })
    }

    /// Reads `file` (if any) and layers it and `sets` over the default.
    pub fn load_layered(file: Option<&Path>, sets: &[String]) -> Result<Layered, ConfigError> {
        match file {
            None => Tuning::layered(None, sets),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Read {
                    path: p.display().to_string(),
                    source: e,
                })?;
                Tuning::layered(Some((&text, &p.display().to_string())), sets)
            }
        }
    }

    pub fn load(file: Option<&Path>) -> Result<Tuning, ConfigError> {
        Ok(Tuning::load_layered(file, &[])?.tuning)
    }

    /// Checks the merged settings; an error is the key at fault and what is wrong with it.
    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |key: &str, message: &str| Err((key.to_string(), message.to_string()));
        if self.node.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad(
                "node.listen",
                "must be HOST:PORT with an IP address, e.g. 127.0.0.1:9092",
            );
        }
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return bad(
                "metrics.listen",
                "must be empty or HOST:PORT with an IP address, e.g. 127.0.0.1:9644",
            );
        }
        if !matches!(self.logging.format.as_str(), "text" | "json") {
            return bad("logging.format", "must be \"text\" or \"json\"");
        }
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.logging.levels) {
            return bad("logging.levels", &format!("{e}"));
        }
        if self.node.data_dir.is_empty() {
            return bad("node.data_dir", "must not be empty");
        }
        if self.node.replica_fetch_max_bytes < 1024 || self.node.replica_fetch_max_bytes > (1 << 30)
        {
            return bad(
                "node.replica_fetch_max_bytes",
                "must be between 1 KiB and 1 GiB",
            );
        }
        if self.node.replica_fetch_response_max_bytes < self.node.replica_fetch_max_bytes
            || self.node.replica_fetch_response_max_bytes > (1 << 30)
        {
            return bad(
                "node.replica_fetch_response_max_bytes",
                "must be at least node.replica_fetch_max_bytes and at most 1 GiB",
            );
        }
        if self.node.replica_fetch_wait_max_ms > 30_000 {
            return bad("node.replica_fetch_wait_max_ms", "must be at most 30000");
        }
        if !(1..=64).contains(&self.node.num_replica_fetchers) {
            return bad("node.num_replica_fetchers", "must be between 1 and 64");
        }
        let sel = self.node.replica_selector.as_str();
        if !(sel.is_empty() || sel == "rack" || sel.ends_with("RackAwareReplicaSelector")) {
            return bad(
                "node.replica_selector",
                "must be empty (consumers read from leaders) or \"rack\" (Kafka's RackAwareReplicaSelector)",
            );
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
        if self.memory.io_memory_bytes != 0 && self.memory.io_memory_bytes < 1 << 20 {
            return bad(
                "memory.io_memory_bytes",
                "must be 0 (auto) or at least 1 MiB",
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
        if self.io.syncs_in_flight < 1 || self.io.syncs_in_flight > 1024 {
            return bad("io.syncs_in_flight", "must be between 1 and 1024");
        }
        if !matches!(self.log.visibility.as_str(), "synced" | "written") {
            return bad("log.visibility", "must be \"synced\" or \"written\"");
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
                if m != 0 && m < 1 << 20 {
                    return bad(
                        &key("io_memory_bytes"),
                        "must be 0 (auto) or at least 1 MiB",
                    );
                }
            }
        }
        if self.group.offsets_retention_ms < 1_000 {
            return bad("group.offsets_retention_ms", "must be at least a second");
        }
        if self.group.offsets_retention_check_interval_ms < 1 {
            return bad(
                "group.offsets_retention_check_interval_ms",
                "must be at least 1",
            );
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
        // (The shard budget 0 is resolved here, after any per-core override.)
        let mut t = ShardTuning {
            batch_cache_bytes_per_partition: self.memory.batch_cache_bytes_per_partition,
            batch_cache_bytes_per_shard: self.memory.batch_cache_bytes_per_shard,
            io_memory_bytes: self.memory.io_memory_bytes,
            ring_depth: self.io.ring_depth,
            spin_before_park_us: self.io.spin_before_park_us,
            syncs_in_flight: self.io.syncs_in_flight,
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
            t.syncs_in_flight = c.syncs_in_flight.unwrap_or(t.syncs_in_flight);
        }
        if t.batch_cache_bytes_per_shard == 0 {
            t.batch_cache_bytes_per_shard = auto_batch_cache_bytes_per_shard();
        }
        if t.io_memory_bytes == 0 {
            t.io_memory_bytes = auto_io_memory_bytes(self.memory.read_ahead_bytes_per_shard);
        }
        t
    }

    /// Consumers may read what is written but not yet synced (`log.visibility = "written"`).
    pub fn visible_when_written(&self) -> bool {
        self.log.visibility == "written"
    }

    pub fn fsync_always(&self) -> bool {
        self.log.fsync == "always"
    }

    pub fn data_dir(&self) -> PathBuf {
        PathBuf::from(&self.node.data_dir)
    }
}

/// The machine's memory (MemTotal), or 0 when /proc/meminfo cannot tell.
pub fn mem_total_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// The default batch-cache budget of a shard: an eighth of a core's share of the machine's
/// memory, between 64 MiB and 16 GiB (512 MiB when the memory is unknown).
pub fn auto_batch_cache_bytes_per_shard() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let mem = mem_total_bytes();
    if mem == 0 {
        return 512 << 20;
    }
    (mem / cores / 8).clamp(64 << 20, 16 << 30) as usize
}

/// The default I/O memory of a shard (glommio's registered DMA buffer area, locked and
/// faulted in when the shard starts): room for its read-ahead (`read_ahead_bytes_per_shard`)
/// and 32 MiB for writes and other reads, at most a sixteenth of a core's share of the
/// machine's memory and under 1 GiB, at least 16 MiB (16 MiB when the memory is unknown). Reads into it need
/// no page pinning or faulting per read, and its huge pages reach the disk as large requests.
pub fn auto_io_memory_bytes(read_ahead_bytes_per_shard: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    io_memory_for(mem_total_bytes() / cores, read_ahead_bytes_per_shard)
}

/// `auto_io_memory_bytes` for a core's share of memory (`fjord tune` uses it too).
pub fn io_memory_for(per_core_mem: u64, read_ahead_bytes_per_shard: usize) -> usize {
    let want = (read_ahead_bytes_per_shard as u64).saturating_add(32 << 20);
    // Under 1 GiB: larger allocations are mapped lazily, without huge pages (`alloc`).
    want.min(per_core_mem / 16).clamp(16 << 20, 1023 << 20) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_parses() {
        let t = Tuning::load(None).unwrap();
        assert_eq!(t.node.listen, "127.0.0.1:9092");
    }

    /// The default shard cache budget follows the machine's memory; a set one is kept.
    #[test]
    fn the_default_cache_budget_follows_the_machine() {
        let t = Tuning::load(None).unwrap();
        assert_eq!(t.memory.batch_cache_bytes_per_shard, 0);
        let b = t.for_core(0).batch_cache_bytes_per_shard;
        assert_eq!(b, auto_batch_cache_bytes_per_shard());
        assert!((64 << 20..=16 << 30).contains(&b), "{b}");
        let cores = std::thread::available_parallelism().unwrap().get() as u64;
        if mem_total_bytes() > 0 {
            assert_eq!(
                b as u64,
                (mem_total_bytes() / cores / 8).clamp(64 << 20, 16 << 30)
            );
        }
        let text =
            format!("{DEFAULT_TUNING}\n[[core]]\nids = [1]\nbatch_cache_bytes_per_shard = 1234\n");
        let t = Tuning::parse(&text, "x.toml").unwrap();
        assert_eq!(t.for_core(1).batch_cache_bytes_per_shard, 1234);
    }

    /// The default I/O memory is the read-ahead's room plus 32 MiB, within a sixteenth of a
    /// core's share of memory; a set one (node-wide or per core) is kept; tiny ones are refused.
    #[test]
    fn the_default_io_memory_holds_the_read_ahead() {
        let mib = 1usize << 20;
        assert_eq!(io_memory_for(12 << 30, 256 * mib), 288 * mib);
        assert_eq!(io_memory_for(1 << 30, 256 * mib), 64 * mib);
        assert_eq!(io_memory_for(100 << 20, 256 * mib), 16 * mib);
        assert_eq!(io_memory_for(12 << 30, 0), 32 * mib);
        assert_eq!(io_memory_for(64 << 30, usize::MAX), 1023 * mib);
        let t = Tuning::load(None).unwrap();
        assert_eq!(t.memory.io_memory_bytes, 0);
        assert_eq!(
            t.for_core(0).io_memory_bytes,
            auto_io_memory_bytes(t.memory.read_ahead_bytes_per_shard)
        );
        let set = Tuning::load_layered(None, &["memory.io_memory_bytes=33554432".into()]).unwrap();
        assert_eq!(set.tuning.for_core(0).io_memory_bytes, 32 * mib);
        let text = format!("{DEFAULT_TUNING}\n[[core]]\nids = [1]\nio_memory_bytes = 0\n");
        let t = Tuning::parse(&text, "x.toml").unwrap();
        assert_eq!(t.for_core(1).io_memory_bytes, t.for_core(0).io_memory_bytes);
        for bad in ["memory.io_memory_bytes=4096"] {
            let e = Tuning::load_layered(None, &[bad.into()])
                .unwrap_err()
                .to_string();
            assert!(e.contains("io_memory_bytes"), "{e}");
        }
        let text = format!("{DEFAULT_TUNING}\n[[core]]\nids = [1]\nio_memory_bytes = 4096\n");
        let e = Tuning::parse(&text, "x.toml").unwrap_err().to_string();
        assert!(e.contains("io_memory_bytes"), "{e}");
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
    fn layers_resolve_kafka_names_and_keep_sources() {
        let file = "num.partitions = 3\n[log]\nretention.hours = 1\n";
        let sets = vec![
            "log.num_partitions=7".to_string(),
            "shards.cores=0,1".to_string(),
            "logging.levels=\"warn\"".to_string(),
        ];
        let l = Tuning::layered(Some((file, "f.toml")), &sets).unwrap();
        assert_eq!(l.tuning.log.num_partitions, 7);
        assert_eq!(l.tuning.log.retention_ms, 3_600_000);
        assert_eq!(l.tuning.shards.cores, vec![0, 1]);
        assert_eq!(l.tuning.logging.levels, "warn");
        let src = |k: &str| {
            l.entries
                .iter()
                .find(|e| e.key == k)
                .unwrap()
                .source
                .clone()
        };
        assert_eq!(
            src("log.num_partitions"),
            Source::Flag("log.num_partitions=7".into())
        );
        assert_eq!(
            src("log.retention_ms"),
            Source::File {
                path: "f.toml".into(),
                line: 3
            }
        );
        assert_eq!(src("io.ring_depth"), Source::Default);
        // A Kafka name under a section that does not hold it is not guessed at.
        let e = Tuning::parse("[io]\nnum.partitions = 3\n", "g.toml").unwrap_err();
        assert!(e.to_string().contains("g.toml line 2"), "{e}");
    }

    #[test]
    fn storage_knobs_validate_and_override_per_core() {
        let t = Tuning::load(None).unwrap();
        assert_eq!(t.for_core(0).syncs_in_flight, 1);
        assert!(!t.visible_when_written());
        let text = "[io]\nsyncs_in_flight = 4\n[log]\nvisibility = \"written\"\n[[core]]\nids = [1]\nsyncs_in_flight = 2\n";
        let l = Tuning::layered(Some((text, "s.toml")), &[]).unwrap();
        assert_eq!(l.tuning.for_core(0).syncs_in_flight, 4);
        assert_eq!(l.tuning.for_core(1).syncs_in_flight, 2);
        assert!(l.tuning.visible_when_written());
        for (text, key) in [
            ("[io]\nsyncs_in_flight = 0\n", "io.syncs_in_flight"),
            ("[log]\nvisibility = \"eventually\"\n", "log.visibility"),
        ] {
            let e = Tuning::layered(Some((text, "s.toml")), &[])
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{e}");
        }
    }

    #[test]
    fn bad_value_names_key() {
        let text = DEFAULT_TUNING.replace("ring_depth = 256", "ring_depth = 1");
        let e = Tuning::parse(&text, "x.toml").unwrap_err().to_string();
        assert!(e.contains("io.ring_depth"), "{e}");
    }
}
