//! Topic-level configs: names, validation, defaults from the tuning file.

use std::collections::BTreeMap;

use crate::config::Tuning;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigType {
    Long,
    Int,
    Double,
    String,
    Boolean,
    List,
}

pub struct ConfigDef {
    pub name: &'static str,
    pub kind: ConfigType,
    /// Allowed values for enumerated strings.
    pub choices: &'static [&'static str],
    pub min: i64,
}

pub const TOPIC_CONFIGS: &[ConfigDef] = &[
    ConfigDef {
        name: "cleanup.policy",
        kind: ConfigType::List,
        choices: &["delete", "compact"],
        min: 0,
    },
    ConfigDef {
        name: "compression.type",
        kind: ConfigType::String,
        choices: &["producer", "uncompressed", "gzip", "snappy", "lz4", "zstd"],
        min: 0,
    },
    ConfigDef {
        name: "delete.retention.ms",
        kind: ConfigType::Long,
        choices: &[],
        min: 0,
    },
    // Kafka's periodic flush. Fjord has none: a topic that sets either below Kafka's default
    // (never) has every write fdatasync'd before it is answered (as fsync = "always"), which is
    // at least as durable as asked.
    ConfigDef {
        name: "flush.messages",
        kind: ConfigType::Long,
        choices: &[],
        min: 1,
    },
    ConfigDef {
        name: "flush.ms",
        kind: ConfigType::Long,
        choices: &[],
        min: 0,
    },
    // Kafka's delay before a deleted segment's files go. Fjord unlinks at once: readers hold
    // open descriptors, so a segment deleted under a read is still read whole. Accepted (and
    // reported) so that tools copying Kafka topic configs work.
    ConfigDef {
        name: "file.delete.delay.ms",
        kind: ConfigType::Long,
        choices: &[],
        min: 0,
    },
    // KIP-354: the longest a record stays ineligible for compaction. The active segment of a
    // compacted topic rolls once its oldest record is this old, and a closed dirty segment that
    // old is cleaned whatever min.cleanable.dirty.ratio says.
    ConfigDef {
        name: "max.compaction.lag.ms",
        kind: ConfigType::Long,
        choices: &[],
        min: 1,
    },
    // KIP-73: the replicas whose replication traffic the leader (serving) and the follower
    // (fetching) hold to the brokers' leader/follower.replication.throttled.rate while they are
    // out of the ISR: "partition:broker" items, or "*" for every replica.
    ConfigDef {
        name: "leader.replication.throttled.replicas",
        kind: ConfigType::List,
        choices: &[],
        min: 0,
    },
    ConfigDef {
        name: "follower.replication.throttled.replicas",
        kind: ConfigType::List,
        choices: &[],
        min: 0,
    },
    ConfigDef {
        name: "max.message.bytes",
        kind: ConfigType::Int,
        choices: &[],
        min: 0,
    },
    // Deprecated since Kafka 3.0 and ignored for RecordBatch v2 (the only format Fjord stores),
    // but Kafka 3.x still accepts it in (Incremental)AlterConfigs and CreateTopics; clients and
    // tools that copy a topic's configs send it back.
    ConfigDef {
        name: "message.format.version",
        kind: ConfigType::String,
        choices: &[],
        min: 0,
    },
    ConfigDef {
        name: "message.timestamp.type",
        kind: ConfigType::String,
        choices: &["CreateTime", "LogAppendTime"],
        min: 0,
    },
    ConfigDef {
        name: "min.cleanable.dirty.ratio",
        kind: ConfigType::Double,
        choices: &[],
        min: 0,
    },
    ConfigDef {
        name: "min.insync.replicas",
        kind: ConfigType::Int,
        choices: &[],
        min: 1,
    },
    ConfigDef {
        name: "retention.bytes",
        kind: ConfigType::Long,
        choices: &[],
        min: -1,
    },
    ConfigDef {
        name: "retention.ms",
        kind: ConfigType::Long,
        choices: &[],
        min: -1,
    },
    ConfigDef {
        name: "segment.bytes",
        kind: ConfigType::Int,
        choices: &[],
        min: 14,
    },
    ConfigDef {
        name: "segment.ms",
        kind: ConfigType::Long,
        choices: &[],
        min: 1,
    },
    ConfigDef {
        name: "unclean.leader.election.enable",
        kind: ConfigType::Boolean,
        choices: &[],
        min: 0,
    },
];

pub fn def(name: &str) -> Option<&'static ConfigDef> {
    TOPIC_CONFIGS.iter().find(|d| d.name == name)
}

/// Checks one topic config entry; the message is what the client sees.
pub fn validate(name: &str, value: &str) -> Result<(), String> {
    let Some(d) = def(name) else {
        return Err(format!("Unknown topic config name: {name}"));
    };
    let bad = || Err(format!("Invalid value {value} for configuration {name}"));
    if name == "message.format.version" && !is_kafka_version(value.trim()) {
        return bad();
    }
    if name.ends_with(".replication.throttled.replicas") {
        return if parse_throttled_replicas(value).is_some() {
            Ok(())
        } else {
            bad()
        };
    }
    match d.kind {
        ConfigType::Long | ConfigType::Int => match value.trim().parse::<i64>() {
            Ok(v) if v >= d.min && (d.kind == ConfigType::Long || v <= i32::MAX as i64) => Ok(()),
            _ => bad(),
        },
        ConfigType::Double => match value.trim().parse::<f64>() {
            Ok(v) if (0.0..=1.0).contains(&v) => Ok(()),
            _ => bad(),
        },
        ConfigType::Boolean => match value.trim() {
            "true" | "false" => Ok(()),
            _ => bad(),
        },
        ConfigType::String => {
            if d.choices.is_empty() || d.choices.contains(&value.trim()) {
                Ok(())
            } else {
                bad()
            }
        }
        ConfigType::List => {
            let ok = value
                .split(',')
                .map(str::trim)
                .all(|v| d.choices.contains(&v))
                && !value.trim().is_empty();
            if ok {
                Ok(())
            } else {
                bad()
            }
        }
    }
}

/// A Kafka release or inter-broker protocol version as message.format.version takes it:
/// `0.10.0`, `0.10.0.0`, `2.8`, `3.0-IV1`.
fn is_kafka_version(v: &str) -> bool {
    let (release, iv) = match v.split_once("-IV") {
        Some((r, n)) => (r, Some(n)),
        None => (v, None),
    };
    let parts: Vec<&str> = release.split('.').collect();
    let numeric = |s: &str| !s.is_empty() && s.len() <= 4 && s.bytes().all(|b| b.is_ascii_digit());
    (2..=4).contains(&parts.len()) && parts.iter().all(|p| numeric(p)) && iv.is_none_or(numeric)
}

/// The broker default of each topic config (the value DescribeConfigs shows when unset).
pub fn default_value(name: &str, t: &Tuning) -> String {
    match name {
        "cleanup.policy" => "delete".into(),
        "compression.type" => "producer".into(),
        "delete.retention.ms" => "86400000".into(),
        "flush.messages" | "flush.ms" | "max.compaction.lag.ms" => i64::MAX.to_string(),
        "file.delete.delay.ms" => "60000".into(),
        "max.message.bytes" => t.log.max_message_bytes.to_string(),
        // What Kafka 3.x reports: the format follows the inter-broker protocol (3.0+).
        "message.format.version" => "3.0-IV1".into(),
        "message.timestamp.type" => t.log.message_timestamp_type.clone(),
        "min.cleanable.dirty.ratio" => "0.5".into(),
        "min.insync.replicas" => "1".into(),
        "retention.bytes" => t.log.retention_bytes.to_string(),
        "retention.ms" => t.log.retention_ms.to_string(),
        "segment.bytes" => t.log.segment_bytes.to_string(),
        "segment.ms" => t.log.segment_ms.to_string(),
        "unclean.leader.election.enable" => "false".into(),
        _ => String::new(),
    }
}

/// A `*.replication.throttled.replicas` value: `None` if malformed; `Some(None)` for "*" (every
/// replica); else the (partition, broker) pairs ("" is none).
#[allow(clippy::type_complexity)]
pub fn parse_throttled_replicas(value: &str) -> Option<Option<Vec<(i32, i32)>>> {
    let value = value.trim();
    if value == "*" {
        return Some(None);
    }
    let mut out = Vec::new();
    for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (p, b) = item.split_once(':')?;
        out.push((p.trim().parse().ok()?, b.trim().parse().ok()?));
    }
    Some(Some(out))
}

/// Effective settings of a topic, resolved from its overrides and the node defaults.
#[derive(Debug, Clone)]
pub struct EffectiveConfig {
    pub segment_bytes: u64,
    pub segment_ms: u64,
    pub retention_ms: i64,
    pub retention_bytes: i64,
    pub max_message_bytes: usize,
    pub log_append_time: bool,
    pub compact: bool,
    /// cleanup.policy includes "delete": time and size retention apply ("compact,delete" does both).
    pub delete: bool,
    /// delete.retention.ms: how long compaction keeps a tombstone after its timestamp.
    pub delete_retention_ms: i64,
    /// min.cleanable.dirty.ratio: dirty bytes / closed bytes needed before a cleaning pass.
    pub min_cleanable_dirty_ratio: f64,
    /// flush.messages or flush.ms asks for flushes: fdatasync every write before answering.
    pub sync_every_write: bool,
    /// max.compaction.lag.ms (i64::MAX: no bound).
    pub max_compaction_lag_ms: i64,
    /// The node's delay before the background sync that makes writes visible.
    pub visibility_sync_delay_us: u64,
    /// min.insync.replicas: an acks=all produce needs this many in-sync replicas.
    pub min_insync_replicas: usize,
}

impl EffectiveConfig {
    pub fn resolve(overrides: &BTreeMap<String, String>, t: &Tuning) -> EffectiveConfig {
        let get = |k: &str| {
            overrides
                .get(k)
                .cloned()
                .unwrap_or_else(|| default_value(k, t))
        };
        let num = |k: &str, d: i64| get(k).trim().parse::<i64>().unwrap_or(d);
        let compact = get("cleanup.policy").contains("compact");
        let max_compaction_lag_ms = num("max.compaction.lag.ms", i64::MAX).max(1);
        let mut segment_ms = num("segment.ms", t.log.segment_ms as i64).max(1) as u64;
        if compact {
            // KIP-354: the active segment is not compacted, so it rolls in time.
            segment_ms = segment_ms.min(max_compaction_lag_ms as u64);
        }
        EffectiveConfig {
            segment_bytes: num("segment.bytes", t.log.segment_bytes as i64).max(14) as u64,
            segment_ms,
            retention_ms: num("retention.ms", t.log.retention_ms),
            retention_bytes: num("retention.bytes", t.log.retention_bytes),
            max_message_bytes: num("max.message.bytes", t.log.max_message_bytes as i64).max(0)
                as usize,
            log_append_time: get("message.timestamp.type") == "LogAppendTime",
            compact,
            delete: get("cleanup.policy").contains("delete"),
            delete_retention_ms: num("delete.retention.ms", 86_400_000).max(0),
            min_cleanable_dirty_ratio: get("min.cleanable.dirty.ratio")
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .unwrap_or(0.5),
            sync_every_write: num("flush.messages", i64::MAX) < i64::MAX
                || num("flush.ms", i64::MAX) < i64::MAX,
            max_compaction_lag_ms,
            visibility_sync_delay_us: t.log.visibility_sync_delay_us,
            min_insync_replicas: num("min.insync.replicas", 1).max(1) as usize,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttled_replica_lists_parse_as_kafka_writes_them() {
        assert_eq!(parse_throttled_replicas("*"), Some(None));
        assert_eq!(parse_throttled_replicas(""), Some(Some(vec![])));
        assert_eq!(
            parse_throttled_replicas("0:1, 1:2,0:3"),
            Some(Some(vec![(0, 1), (1, 2), (0, 3)]))
        );
        for bad in ["0", "a:1", "0:1,x", "0:1:2"] {
            assert_eq!(parse_throttled_replicas(bad), None, "{bad}");
            assert!(validate("leader.replication.throttled.replicas", bad).is_err());
        }
        assert!(validate("follower.replication.throttled.replicas", "3:4").is_ok());
    }

    #[test]
    fn max_compaction_lag_rolls_compacted_segments_in_time() {
        let t = Tuning::load(None).unwrap();
        let mut o = BTreeMap::new();
        o.insert("max.compaction.lag.ms".to_string(), "100".to_string());
        // Not compacted: the lag bound means nothing, segment.ms stays.
        assert_eq!(
            EffectiveConfig::resolve(&o, &t).segment_ms,
            t.log.segment_ms
        );
        o.insert("cleanup.policy".to_string(), "compact".to_string());
        let c = EffectiveConfig::resolve(&o, &t);
        assert_eq!(c.segment_ms, 100);
        assert_eq!(c.max_compaction_lag_ms, 100);
        assert!(validate("max.compaction.lag.ms", "0").is_err());
        assert!(validate("file.delete.delay.ms", "10000").is_ok());
    }
    #[test]
    fn validation() {
        assert!(validate("retention.ms", "1000").is_ok());
        assert!(validate("retention.ms", "abc").is_err());
        assert!(validate("cleanup.policy", "compact,delete").is_ok());
        assert!(validate("cleanup.policy", "bogus").is_err());
        assert!(validate("no.such", "1").is_err());
        assert!(validate("segment.bytes", "99999999999").is_err());
        for v in ["0.10.0.0", "0.10.0", "2.8", "3.0-IV1", "0.10.0-IV1"] {
            assert!(validate("message.format.version", v).is_ok(), "{v}");
        }
        for v in ["", "3", "latest", "1.x", "3.0-IV", "0.10.0.0.0"] {
            assert!(validate("message.format.version", v).is_err(), "{v}");
        }
    }

    #[test]
    fn flush_settings_ask_for_synced_writes() {
        let t = Tuning::load(None).unwrap();
        let mut o = BTreeMap::new();
        assert!(!EffectiveConfig::resolve(&o, &t).sync_every_write);
        o.insert("flush.ms".to_string(), i64::MAX.to_string());
        assert!(!EffectiveConfig::resolve(&o, &t).sync_every_write);
        o.insert("flush.ms".to_string(), "12345678".to_string());
        assert!(EffectiveConfig::resolve(&o, &t).sync_every_write);
        o.remove("flush.ms");
        o.insert("flush.messages".to_string(), "1".to_string());
        assert!(EffectiveConfig::resolve(&o, &t).sync_every_write);
        assert!(validate("flush.messages", "0").is_err());
        assert!(validate("flush.ms", "0").is_ok());
    }

    #[test]
    fn cleanup_policy_flags() {
        let t = Tuning::load(None).unwrap();
        let mut o = BTreeMap::new();
        let e = EffectiveConfig::resolve(&o, &t);
        assert!(e.delete && !e.compact);
        o.insert("cleanup.policy".to_string(), "compact,delete".to_string());
        let e = EffectiveConfig::resolve(&o, &t);
        assert!(e.delete && e.compact);
        o.insert("cleanup.policy".to_string(), "compact".to_string());
        let e = EffectiveConfig::resolve(&o, &t);
        assert!(!e.delete && e.compact);
    }
}
