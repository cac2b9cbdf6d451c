//! Metadata: brokers, cluster id, topics with partitions and leaders; auto-creates topics.

use std::collections::BTreeMap;

use kafka_protocol::messages::metadata_request::MetadataRequest;
use kafka_protocol::messages::metadata_response::{
    MetadataResponse, MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::BrokerId;

use super::util::{sb, tn};
use crate::cluster::controller::{self, NewTopic, Refused};
use crate::cluster::metadata::TopicMeta;
use crate::partition::LEADER_EPOCH;
use crate::server::errors as ec;
use crate::server::ConnCtx;
use crate::shard::on_controller;

pub fn topic_entry(t: &TopicMeta, node_id: i32) -> MetadataResponseTopic {
    let mut rt = MetadataResponseTopic::default();
    rt.name = Some(tn(&t.name));
    rt.topic_id = t.id;
    rt.is_internal = t.internal;
    rt.topic_authorized_operations = i32::MIN;
    for p in 0..t.partitions {
        let mut rp = MetadataResponsePartition::default();
        rp.partition_index = p;
        rp.leader_id = BrokerId(node_id);
        rp.leader_epoch = LEADER_EPOCH;
        rp.replica_nodes = vec![BrokerId(node_id)];
        rp.isr_nodes = vec![BrokerId(node_id)];
        rt.partitions.push(rp);
    }
    rt
}

pub async fn handle(ctx: &ConnCtx, version: i16, req: MetadataRequest) -> MetadataResponse {
    let node = ctx.shard.node.clone();
    let mut resp = MetadataResponse::default();
    let mut b = MetadataResponseBroker::default();
    b.node_id = BrokerId(node.node_id);
    b.host = sb(&node.advertised_host);
    b.port = node.advertised_port;
    resp.brokers.push(b);
    resp.cluster_id = Some(sb(&node.cluster_id));
    resp.controller_id = BrokerId(node.node_id);
    resp.cluster_authorized_operations = super::util::authorized_operations(
        req.include_cluster_authorized_operations,
        super::util::CLUSTER_OPERATIONS,
    );
    let topic_operations = super::util::authorized_operations(
        req.include_topic_authorized_operations,
        super::util::TOPIC_OPERATIONS,
    );
    // v0: an empty list means all topics; v1+: null means all.
    let all = match &req.topics {
        None => true,
        Some(t) => t.is_empty() && version == 0,
    };
    if all {
        let img = node.image();
        for t in img.topics.values() {
            let mut rt = topic_entry(t, node.node_id);
            rt.topic_authorized_operations = topic_operations;
            resp.topics.push(rt);
        }
        return resp;
    }
    let auto_create =
        node.tuning.log.auto_create_topics && (version < 4 || req.allow_auto_topic_creation);
    let mut to_create = Vec::new();
    let mut order: Vec<(Option<String>, uuid::Uuid)> = Vec::new();
    {
        let img = node.image();
        for rt in req.topics.unwrap_or_default() {
            let name = match &rt.name {
                Some(n) => Some(n.0.to_string()),
                None => img.topic_by_id(&rt.topic_id).map(|t| t.name.clone()),
            };
            if let Some(n) = &name {
                if img.topic(n).is_none()
                    && auto_create
                    && crate::cluster::metadata::valid_topic_name(n).is_ok()
                    && !to_create.iter().any(|t: &NewTopic| &t.name == n)
                {
                    to_create.push(NewTopic {
                        name: n.clone(),
                        partitions: node.tuning.log.num_partitions,
                        replication_factor: -1,
                        configs: BTreeMap::new(),
                        internal: false,
                    });
                }
            }
            order.push((name, rt.topic_id));
        }
    }
    if !to_create.is_empty() {
        let created = on_controller(&node, move |node| {
            controller::create_topics(node, to_create, false)
        })
        .await;
        for r in created {
            if let Err((refused, msg)) = r {
                if refused != Refused::TopicExists {
                    tracing::warn!("auto-create failed: {msg}");
                }
            }
        }
    }
    let img = node.image();
    for (name, id) in order {
        match name.as_deref().and_then(|n| img.topic(n)) {
            Some(t) => {
                let mut rt = topic_entry(t, node.node_id);
                rt.topic_authorized_operations = topic_operations;
                resp.topics.push(rt);
            }
            None => {
                let mut rt = MetadataResponseTopic::default();
                rt.topic_id = id;
                rt.topic_authorized_operations = i32::MIN;
                match name {
                    Some(n) => {
                        rt.error_code = if crate::cluster::metadata::valid_topic_name(&n).is_err() {
                            ec::INVALID_TOPIC_EXCEPTION
                        } else {
                            ec::UNKNOWN_TOPIC_OR_PARTITION
                        };
                        rt.name = Some(tn(&n));
                    }
                    None => rt.error_code = ec::UNKNOWN_TOPIC_ID,
                }
                resp.topics.push(rt);
            }
        }
    }
    resp
}
