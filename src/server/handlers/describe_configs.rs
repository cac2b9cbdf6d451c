//! DescribeConfigs: topic configs (with their source) and the broker's settings.

use kafka_protocol::messages::describe_configs_request::DescribeConfigsRequest;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResponse, DescribeConfigsResult,
};

use super::util::sb;
use crate::cluster::topic_config::{self, ConfigType, TOPIC_CONFIGS};
use crate::server::errors as ec;
use crate::server::ConnCtx;
use crate::shard::fanout::{per_partition, PartitionJob};

pub const RESOURCE_TOPIC: i8 = 2;
pub const RESOURCE_BROKER: i8 = 4;
/// DescribeConfigs config sources.
pub const SOURCE_TOPIC: i8 = 1;
pub const SOURCE_DEFAULT: i8 = 5;
/// Kafka's DYNAMIC_BROKER_CONFIG and DYNAMIC_DEFAULT_BROKER_CONFIG sources.
pub const SOURCE_DYNAMIC_BROKER: i8 = 2;
pub const SOURCE_DYNAMIC_DEFAULT: i8 = 3;

/// A read-only entry of a topic's DescribeConfigs that names the segments recovery set aside as
/// damaged, so that `fjord topics describe` (or any admin client) shows lost ranges.
const QUARANTINE_KEY: &str = "fjord.quarantined.segments";

/// "partition N: file (damaged at byte B), offsets X..Y lost" for every quarantined segment of
/// the topic's open partitions.
async fn quarantined_segments(ctx: &ConnCtx, topic: &str, partitions: i32) -> Vec<String> {
    let node = ctx.shard.node.clone();
    let jobs = (0..partitions)
        .map(|partition| PartitionJob {
            topic: topic.to_string(),
            partition,
            input: (),
        })
        .collect();
    let found = per_partition(&node, jobs, |part, job| async move {
        let mut lines = Vec::new();
        if let Some(part) = part {
            for q in part.log.inner.borrow().quarantined.iter() {
                let file = q
                    .path
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default();
                lines.push(format!(
                    "partition {}: {file} (damaged at byte {}), offsets {}..{} lost",
                    job.partition, q.damaged_at_byte, q.gap_from_offset, q.gap_to_offset
                ));
            }
        }
        lines
    })
    .await;
    found.into_iter().flatten().collect()
}

fn config_type_code(k: ConfigType) -> i8 {
    // DescribeConfigs v3+ config types: BOOLEAN 1, STRING 2, INT 3, SHORT 4, LONG 5, DOUBLE 6, LIST 7.
    match k {
        ConfigType::Boolean => 1,
        ConfigType::String => 2,
        ConfigType::Int => 3,
        ConfigType::Long => 5,
        ConfigType::Double => 6,
        ConfigType::List => 7,
    }
}

pub async fn handle(ctx: &ConnCtx, req: DescribeConfigsRequest) -> DescribeConfigsResponse {
    let node = ctx.shard.node.clone();
    let mut resp = DescribeConfigsResponse::default();
    for res in req.resources {
        let mut r = DescribeConfigsResult::default();
        r.resource_type = res.resource_type;
        r.resource_name = res.resource_name.clone();
        let wanted = |name: &str| match &res.configuration_keys {
            None => true,
            Some(keys) => keys.is_empty() || keys.iter().any(|k| k.as_str() == name),
        };
        match res.resource_type {
            RESOURCE_TOPIC => {
                let img = node.image();
                match img.topic(res.resource_name.as_str()) {
                    None => {
                        r.error_code = ec::UNKNOWN_TOPIC_OR_PARTITION;
                        r.error_message = Some(sb("Topic does not exist"));
                    }
                    Some(t) => {
                        let partitions = t.partitions;
                        let damage =
                            quarantined_segments(ctx, res.resource_name.as_str(), partitions).await;
                        if !damage.is_empty() && wanted(QUARANTINE_KEY) {
                            let mut c = DescribeConfigsResourceResult::default();
                            c.name = sb(QUARANTINE_KEY);
                            c.value = Some(sb(&damage.join("; ")));
                            c.read_only = true;
                            c.config_source = SOURCE_DEFAULT;
                            r.configs.push(c);
                        }
                        for d in TOPIC_CONFIGS.iter().filter(|d| wanted(d.name)) {
                            let explicit = t.configs.get(d.name);
                            let mut c = DescribeConfigsResourceResult::default();
                            c.name = sb(d.name);
                            c.value = Some(sb(&explicit.cloned().unwrap_or_else(|| {
                                topic_config::default_value(d.name, &node.tuning)
                            })));
                            c.config_source = if explicit.is_some() {
                                SOURCE_TOPIC
                            } else {
                                SOURCE_DEFAULT
                            };
                            c.config_type = config_type_code(d.kind);
                            r.configs.push(c);
                        }
                    }
                }
            }
            RESOURCE_BROKER => {
                let broker_cfgs = [
                    (
                        "auto.create.topics.enable",
                        node.tuning.log.auto_create_topics.to_string(),
                    ),
                    ("num.partitions", node.tuning.log.num_partitions.to_string()),
                    (
                        "log.segment.bytes",
                        node.tuning.log.segment_bytes.to_string(),
                    ),
                    ("log.retention.ms", node.tuning.log.retention_ms.to_string()),
                    (
                        "message.max.bytes",
                        node.tuning.log.max_message_bytes.to_string(),
                    ),
                    (
                        "offsets.topic.num.partitions",
                        node.tuning.group.offsets_topic_num_partitions.to_string(),
                    ),
                    (
                        "socket.request.max.bytes",
                        node.tuning.memory.request_bytes_max.to_string(),
                    ),
                    // Where `fjord top --bootstrap` finds the Prometheus endpoint.
                    ("metrics.listen", node.tuning.metrics.listen.clone()),
                    ("node.id", node.node_id.to_string()),
                    ("broker.rack", node.tuning.node.rack.clone()),
                    (
                        "offsets.topic.replication.factor",
                        node.tuning
                            .group
                            .offsets_topic_replication_factor
                            .to_string(),
                    ),
                    // How many shards (cores) serve on this node (`fjord cluster status`).
                    ("fjord.shards", node.shards().to_string()),
                ];
                for (k, v) in broker_cfgs.iter().filter(|(k, _)| wanted(k)) {
                    let mut c = DescribeConfigsResourceResult::default();
                    c.name = sb(k);
                    c.value = Some(sb(v));
                    c.read_only = true;
                    c.config_source = SOURCE_DEFAULT;
                    r.configs.push(c);
                }
                // The dynamic ones (replication throttles), of the named broker or "" (all).
                let id = match res.resource_name.as_str() {
                    "" => -1,
                    n => n.parse::<i32>().unwrap_or(node.node_id),
                };
                let view = node.image().cluster.clone();
                for k in crate::quorum::controller::DYNAMIC_BROKER_CONFIGS {
                    if !wanted(k) {
                        continue;
                    }
                    let own = view
                        .as_ref()
                        .and_then(|v| v.broker_configs.get(&id)?.get(*k).cloned());
                    let all = view
                        .as_ref()
                        .and_then(|v| v.broker_configs.get(&-1)?.get(*k).cloned());
                    let mut c = DescribeConfigsResourceResult::default();
                    c.name = sb(k);
                    c.config_type = config_type_code(ConfigType::Long);
                    (c.value, c.config_source) = match (own, all) {
                        (Some(v), _) if id >= 0 => (Some(sb(&v)), SOURCE_DYNAMIC_BROKER),
                        (Some(v), _) | (None, Some(v)) => (Some(sb(&v)), SOURCE_DYNAMIC_DEFAULT),
                        (None, None) => (Some(sb(&i64::MAX.to_string())), SOURCE_DEFAULT),
                    };
                    r.configs.push(c);
                }
            }
            _ => {
                r.error_code = ec::INVALID_REQUEST;
                r.error_message = Some(sb("unsupported resource type"));
            }
        }
        resp.results.push(r);
    }
    resp
}
