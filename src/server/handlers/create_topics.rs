//! CreateTopics: new topics through the controller (validate_only, configs, replication factor 1).

use std::collections::BTreeMap;

use kafka_protocol::messages::create_topics_request::CreateTopicsRequest;
use kafka_protocol::messages::create_topics_response::{
    CreatableTopicConfigs, CreatableTopicResult, CreateTopicsResponse,
};

use super::describe_configs::{SOURCE_DEFAULT, SOURCE_TOPIC};
use super::util::sb;
use crate::cluster::controller::{self, NewTopic, Refused};
use crate::cluster::topic_config::{self, TOPIC_CONFIGS};
use crate::server::errors as ec;
use crate::server::ConnCtx;
use crate::shard::on_controller;

pub async fn handle(ctx: &ConnCtx, req: CreateTopicsRequest) -> CreateTopicsResponse {
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
    let validate_only = req.validate_only;
    let mut results = on_controller(&node, move |node| {
        controller::create_topics(node, news, validate_only)
    })
    .await
    .into_iter();
    for (t, pre) in req.topics.iter().zip(pre) {
        let mut r = CreatableTopicResult::default();
        r.name = t.name.clone();
        let outcome = match pre {
            Some(e) => Err(e),
            None => results
                .next()
                .unwrap_or(Err((Refused::Internal, "missing result".into())))
                .map_err(ec::controller),
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

/// In a cluster the active controller creates the topics (Kafka's forwarding); the answer
/// waits until this node serves them, so the client's next Metadata sees them here.
pub async fn forwarded(
    ctx: &ConnCtx,
    version: i16,
    req: CreateTopicsRequest,
) -> CreateTopicsResponse {
    let node = ctx.shard.node.clone();
    let validate_only = req.validate_only;
    match crate::server::controller::forward_for_client(&node, version, &req, &ctx.client_host)
        .await
    {
        Ok(resp) => {
            if !validate_only {
                let created: Vec<String> = resp
                    .topics
                    .iter()
                    .filter(|t| t.error_code == ec::NONE)
                    .map(|t| t.name.0.to_string())
                    .collect();
                crate::server::controller::wait_for_image(
                    &node,
                    std::time::Duration::from_secs(5),
                    |img| created.iter().all(|n| img.topic(n).is_some()),
                )
                .await;
            }
            resp
        }
        Err(e) => {
            let mut resp = CreateTopicsResponse::default();
            for t in req.topics {
                let mut r = CreatableTopicResult::default();
                r.name = t.name;
                r.error_code = ec::NOT_CONTROLLER;
                r.error_message = Some(sb(&format!("{e:#}")));
                r.num_partitions = -1;
                r.replication_factor = -1;
                resp.topics.push(r);
            }
            resp
        }
    }
}
