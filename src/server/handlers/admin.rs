//! Admin APIs: CreateTopics, DeleteTopics, CreatePartitions, DeleteRecords, DescribeConfigs,
//! AlterConfigs, IncrementalAlterConfigs, InitProducerId, DescribeCluster.

use std::collections::BTreeMap;
use std::sync::Arc;

use kafka_protocol::messages::alter_configs_request::AlterConfigsRequest;
use kafka_protocol::messages::alter_configs_response::{
    AlterConfigsResourceResponse, AlterConfigsResponse,
};
use kafka_protocol::messages::create_partitions_request::CreatePartitionsRequest;
use kafka_protocol::messages::create_partitions_response::{
    CreatePartitionsResponse, CreatePartitionsTopicResult,
};
use kafka_protocol::messages::create_topics_request::CreateTopicsRequest;
use kafka_protocol::messages::create_topics_response::{
    CreatableTopicConfigs, CreatableTopicResult, CreateTopicsResponse,
};
use kafka_protocol::messages::delete_records_request::DeleteRecordsRequest;
use kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsResponse, DeleteRecordsTopicResult,
};
use kafka_protocol::messages::delete_topics_request::DeleteTopicsRequest;
use kafka_protocol::messages::delete_topics_response::{
    DeletableTopicResult, DeleteTopicsResponse,
};
use kafka_protocol::messages::describe_cluster_request::DescribeClusterRequest;
use kafka_protocol::messages::describe_cluster_response::{
    DescribeClusterBroker, DescribeClusterResponse,
};
use kafka_protocol::messages::describe_configs_request::DescribeConfigsRequest;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResponse, DescribeConfigsResult,
};
use kafka_protocol::messages::incremental_alter_configs_request::IncrementalAlterConfigsRequest;
use kafka_protocol::messages::incremental_alter_configs_response::{
    AlterConfigsResourceResponse as IncResourceResponse, IncrementalAlterConfigsResponse,
};
use kafka_protocol::messages::init_producer_id_request::InitProducerIdRequest;
use kafka_protocol::messages::init_producer_id_response::InitProducerIdResponse;
use kafka_protocol::messages::{BrokerId, ProducerId};

use super::util::{per_shard, sb, tn};
use crate::cluster::controller::{self, NewTopic};
use crate::cluster::topic_config::{self, ConfigType, TOPIC_CONFIGS};
use crate::server::errors as ec;
use crate::server::ConnCtx;

const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
/// DescribeConfigs config sources.
const SOURCE_TOPIC: i8 = 1;
const SOURCE_DEFAULT: i8 = 5;

pub async fn create_topics(ctx: &ConnCtx, req: CreateTopicsRequest) -> CreateTopicsResponse {
    let node = ctx.shard.node.clone();
    let mut resp = CreateTopicsResponse::default();
    let mut news = Vec::new();
    let mut pre: Vec<Option<(i16, String)>> = Vec::new();
    for t in &req.topics {
        let name = t.name.0.to_string();
        if req
            .topics
            .iter()
            .filter(|o| o.name.0.as_str() == name)
            .count()
            > 1
        {
            pre.push(Some((
                ec::INVALID_REQUEST,
                "Duplicate topic name in request".into(),
            )));
            continue;
        }
        if !t.assignments.is_empty() {
            let bad = t.assignments.iter().any(|a| {
                a.broker_ids.iter().any(|b| b.0 != node.node_id) || a.broker_ids.len() != 1
            });
            if bad {
                pre.push(Some((
                    ec::INVALID_REPLICA_ASSIGNMENT,
                    "Replica assignment names brokers that do not exist".into(),
                )));
                continue;
            }
        }
        let partitions = if !t.assignments.is_empty() {
            t.assignments.len() as i32
        } else if t.num_partitions == -1 {
            node.tuning.log.num_partitions
        } else {
            t.num_partitions
        };
        let mut configs = BTreeMap::new();
        for c in &t.configs {
            if let Some(v) = &c.value {
                configs.insert(c.name.to_string(), v.to_string());
            }
        }
        news.push(NewTopic {
            name,
            partitions,
            replication_factor: if t.assignments.is_empty() {
                t.replication_factor
            } else {
                1
            },
            configs,
            internal: false,
        });
        pre.push(None);
    }
    let mut results = controller::create_topics(Arc::clone(&node), news, req.validate_only)
        .await
        .into_iter();
    for (t, pre) in req.topics.iter().zip(pre) {
        let mut r = CreatableTopicResult::default();
        r.name = t.name.clone();
        let outcome = match pre {
            Some(e) => Err(e),
            None => results
                .next()
                .unwrap_or(Err((ec::UNKNOWN_SERVER_ERROR, "missing result".into()))),
        };
        match outcome {
            Ok(meta) => {
                r.topic_id = meta.id;
                r.num_partitions = meta.partitions;
                r.replication_factor = 1;
                let mut cfgs = Vec::new();
                for d in TOPIC_CONFIGS {
                    let mut c = CreatableTopicConfigs::default();
                    c.name = sb(d.name);
                    let explicit = meta.configs.get(d.name);
                    c.value = Some(sb(&explicit
                        .cloned()
                        .unwrap_or_else(|| topic_config::default_value(d.name, &node.tuning))));
                    c.config_source = if explicit.is_some() {
                        SOURCE_TOPIC
                    } else {
                        SOURCE_DEFAULT
                    };
                    cfgs.push(c);
                }
                r.configs = Some(cfgs);
            }
            Err((code, msg)) => {
                r.error_code = code;
                r.error_message = Some(sb(&msg));
                r.num_partitions = -1;
                r.replication_factor = -1;
                r.topic_config_error_code = code;
            }
        }
        resp.topics.push(r);
    }
    resp
}

pub async fn delete_topics(
    ctx: &ConnCtx,
    version: i16,
    req: DeleteTopicsRequest,
) -> DeleteTopicsResponse {
    let node = ctx.shard.node.clone();
    let mut resp = DeleteTopicsResponse::default();
    let targets: Vec<(Option<String>, uuid::Uuid)> = if version >= 6 {
        req.topics
            .iter()
            .map(|t| (t.name.as_ref().map(|n| n.0.to_string()), t.topic_id))
            .collect()
    } else {
        req.topic_names
            .iter()
            .map(|n| (Some(n.0.to_string()), uuid::Uuid::nil()))
            .collect()
    };
    for (name, id) in targets {
        let mut r = DeletableTopicResult::default();
        let resolved = match &name {
            Some(n) => Some(n.clone()),
            None => node.image().topic_by_id(&id).map(|t| t.name.clone()),
        };
        r.name = resolved.as_deref().map(tn);
        r.topic_id = resolved
            .as_deref()
            .and_then(|n| node.image().topic(n).map(|t| t.id))
            .unwrap_or(id);
        match resolved {
            None => r.error_code = ec::UNKNOWN_TOPIC_ID,
            Some(n) => {
                if let Err((code, msg)) = controller::delete_topic(Arc::clone(&node), n).await {
                    r.error_code = code;
                    r.error_message = Some(sb(&msg));
                }
            }
        }
        resp.responses.push(r);
    }
    resp
}

pub async fn create_partitions(
    ctx: &ConnCtx,
    req: CreatePartitionsRequest,
) -> CreatePartitionsResponse {
    let node = ctx.shard.node.clone();
    let mut resp = CreatePartitionsResponse::default();
    for t in req.topics {
        let mut r = CreatePartitionsTopicResult::default();
        r.name = t.name.clone();
        if let Err((code, msg)) = controller::create_partitions(
            Arc::clone(&node),
            t.name.0.to_string(),
            t.count,
            req.validate_only,
        )
        .await
        {
            r.error_code = code;
            r.error_message = Some(sb(&msg));
        }
        resp.results.push(r);
    }
    resp
}

pub async fn delete_records(ctx: &ConnCtx, req: DeleteRecordsRequest) -> DeleteRecordsResponse {
    let node = ctx.shard.node.clone();
    let mut items = Vec::new();
    for t in &req.topics {
        for p in &t.partitions {
            let name = t.name.0.to_string();
            items.push((
                node.shard_of(&name, p.partition_index),
                (name, p.partition_index, p.offset),
            ));
        }
    }
    let results = per_shard(
        node.shards(),
        items,
        |sh, its: Vec<(String, i32, i64)>| async move {
            let mut out = Vec::new();
            for (t, p, off) in its {
                let Some(part) = sh.partition(&t, p).await else {
                    out.push((ec::UNKNOWN_TOPIC_OR_PARTITION, -1));
                    continue;
                };
                let hwm = part.high_watermark();
                // -1 means "up to the high watermark", as in Kafka.
                let target = if off == -1 { hwm } else { off };
                if target < 0 || target > hwm {
                    out.push((ec::OFFSET_OUT_OF_RANGE, -1));
                    continue;
                }
                match part.log.delete_records_before(target as u64).await {
                    Ok(low) => out.push((ec::NONE, low as i64)),
                    Err(e) => {
                        tracing::error!("delete records on {t}-{p}: {e}");
                        out.push((ec::KAFKA_STORAGE_ERROR, -1))
                    }
                }
            }
            out
        },
    )
    .await;
    let mut results = results.into_iter();
    let mut resp = DeleteRecordsResponse::default();
    for t in req.topics {
        let mut tr = DeleteRecordsTopicResult::default();
        tr.name = t.name.clone();
        for p in t.partitions {
            let (code, low) = results.next().unwrap_or((ec::UNKNOWN_SERVER_ERROR, -1));
            let mut pr = DeleteRecordsPartitionResult::default();
            pr.partition_index = p.partition_index;
            pr.error_code = code;
            pr.low_watermark = low;
            tr.partitions.push(pr);
        }
        resp.topics.push(tr);
    }
    resp
}

/// A read-only entry of a topic's DescribeConfigs that names the segments recovery set aside as
/// damaged, so that `fjord topics describe` (or any admin client) shows lost ranges.
const QUARANTINE_KEY: &str = "fjord.quarantined.segments";

/// "partition N: file (damaged at byte B), offsets X..Y lost" for every quarantined segment of
/// the topic's open partitions.
async fn quarantined_segments(ctx: &ConnCtx, topic: &str, partitions: i32) -> Vec<String> {
    let node = ctx.shard.node.clone();
    let items: Vec<(usize, (String, i32))> = (0..partitions)
        .map(|p| (node.shard_of(topic, p), (topic.to_string(), p)))
        .collect();
    let found = per_shard(
        node.shards(),
        items,
        |sh, its: Vec<(String, i32)>| async move {
            let mut out = Vec::with_capacity(its.len());
            for (t, p) in its {
                let mut lines = Vec::new();
                if let Some(part) = sh.partition(&t, p).await {
                    for q in part.log.inner.borrow().quarantined.iter() {
                        let file = q
                            .path
                            .file_name()
                            .map(|f| f.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        lines.push(format!(
                            "partition {p}: {file} (damaged at byte {}), offsets {}..{} lost",
                            q.damaged_at_byte, q.gap_from_offset, q.gap_to_offset
                        ));
                    }
                }
                out.push(lines);
            }
            out
        },
    )
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

pub async fn describe_configs(
    ctx: &ConnCtx,
    req: DescribeConfigsRequest,
) -> DescribeConfigsResponse {
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
                ];
                for (k, v) in broker_cfgs.iter().filter(|(k, _)| wanted(k)) {
                    let mut c = DescribeConfigsResourceResult::default();
                    c.name = sb(k);
                    c.value = Some(sb(v));
                    c.read_only = true;
                    c.config_source = SOURCE_DEFAULT;
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

/// One resource of AlterConfigs / IncrementalAlterConfigs: (error code, message) on failure.
async fn alter_resource(
    node: &Arc<crate::shard::Node>,
    resource_type: i8,
    name: &str,
    ops: Vec<(String, i8, Option<String>)>,
    incremental: bool,
    validate_only: bool,
) -> Option<(i16, String)> {
    if resource_type != RESOURCE_TOPIC {
        return Some((
            ec::INVALID_REQUEST,
            "only topic configs can be altered".into(),
        ));
    }
    controller::alter_topic_configs(
        Arc::clone(node),
        name.to_string(),
        ops,
        incremental,
        validate_only,
    )
    .await
    .err()
}

pub async fn alter_configs(ctx: &ConnCtx, req: AlterConfigsRequest) -> AlterConfigsResponse {
    let node = ctx.shard.node.clone();
    let mut resp = AlterConfigsResponse::default();
    for res in req.resources {
        let mut r = AlterConfigsResourceResponse::default();
        r.resource_type = res.resource_type;
        r.resource_name = res.resource_name.clone();
        // AlterConfigs replaces the whole set: every entry is a "set" (op 0).
        let ops = res
            .configs
            .iter()
            .map(|c| {
                (
                    c.name.to_string(),
                    0i8,
                    c.value.as_ref().map(|v| v.to_string()),
                )
            })
            .collect();
        if let Some((code, msg)) = alter_resource(
            &node,
            res.resource_type,
            res.resource_name.as_str(),
            ops,
            false,
            req.validate_only,
        )
        .await
        {
            r.error_code = code;
            r.error_message = Some(sb(&msg));
        }
        resp.responses.push(r);
    }
    resp
}

pub async fn incremental_alter_configs(
    ctx: &ConnCtx,
    req: IncrementalAlterConfigsRequest,
) -> IncrementalAlterConfigsResponse {
    let node = ctx.shard.node.clone();
    let mut resp = IncrementalAlterConfigsResponse::default();
    for res in req.resources {
        let mut r = IncResourceResponse::default();
        r.resource_type = res.resource_type;
        r.resource_name = res.resource_name.clone();
        let ops = res
            .configs
            .iter()
            .map(|c| {
                (
                    c.name.to_string(),
                    c.config_operation,
                    c.value.as_ref().map(|v| v.to_string()),
                )
            })
            .collect();
        if let Some((code, msg)) = alter_resource(
            &node,
            res.resource_type,
            res.resource_name.as_str(),
            ops,
            true,
            req.validate_only,
        )
        .await
        {
            r.error_code = code;
            r.error_message = Some(sb(&msg));
        }
        resp.responses.push(r);
    }
    resp
}

pub async fn init_producer_id(ctx: &ConnCtx, req: InitProducerIdRequest) -> InitProducerIdResponse {
    let mut resp = InitProducerIdResponse::default();
    resp.ongoing_txn_producer_id = ProducerId(-1);
    resp.ongoing_txn_producer_epoch = -1;
    if req.transactional_id.is_some() {
        resp.error_code = ec::TRANSACTIONAL_ID_AUTHORIZATION_FAILED;
        resp.producer_id = ProducerId(-1);
        resp.producer_epoch = -1;
        return resp;
    }
    // An idempotent producer re-initializing with its id (KIP-360) gets the same id, next epoch.
    if req.producer_id.0 >= 0 && req.producer_epoch >= 0 && req.producer_epoch < i16::MAX - 1 {
        resp.producer_id = req.producer_id;
        resp.producer_epoch = req.producer_epoch + 1;
        return resp;
    }
    match controller::allocate_producer_id(ctx.shard.node.clone()).await {
        Ok(id) => {
            resp.producer_id = ProducerId(id);
            resp.producer_epoch = 0;
        }
        Err((code, _)) => {
            resp.error_code = code;
            resp.producer_id = ProducerId(-1);
            resp.producer_epoch = -1;
        }
    }
    resp
}

pub fn describe_cluster(ctx: &ConnCtx, req: DescribeClusterRequest) -> DescribeClusterResponse {
    let node = &ctx.shard.node;
    let mut resp = DescribeClusterResponse::default();
    resp.cluster_id = sb(&node.cluster_id);
    resp.controller_id = BrokerId(node.node_id);
    resp.endpoint_type = 1;
    resp.cluster_authorized_operations = super::util::authorized_operations(
        req.include_cluster_authorized_operations,
        super::util::CLUSTER_OPERATIONS,
    );
    let mut b = DescribeClusterBroker::default();
    b.broker_id = BrokerId(node.node_id);
    b.host = sb(&node.advertised_host);
    b.port = node.advertised_port;
    resp.brokers.push(b);
    resp
}
