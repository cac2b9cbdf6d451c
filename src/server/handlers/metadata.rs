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
        match t.assignments.get(p as usize) {
            None => {
                rp.leader_id = BrokerId(node_id);
                rp.leader_epoch = LEADER_EPOCH;
                rp.replica_nodes = vec![BrokerId(node_id)];
                rp.isr_nodes = vec![BrokerId(node_id)];
            }
            Some(a) => {
                rp.leader_id = BrokerId(a.leader);
                rp.leader_epoch = a.leader_epoch;
                rp.replica_nodes = a.replicas.iter().map(|r| BrokerId(*r)).collect();
                rp.isr_nodes = a.isr.iter().map(|r| BrokerId(*r)).collect();
                if a.leader < 0 {
                    rp.error_code = ec::LEADER_NOT_AVAILABLE;
                }
            }
        }
        rt.partitions.push(rp);
    }
    rt
}

/// The brokers a client may talk to: every unfenced registered broker in a cluster, this node
/// alone otherwise.
pub fn brokers(node: &crate::cluster::node::Node) -> Vec<(i32, String, i32, Option<String>)> {
    match &node.image().cluster {
        Some(c) => c
            .brokers
            .iter()
            .filter(|b| !b.fenced)
            .map(|b| (b.id, b.host.clone(), b.port, b.rack.clone()))
            .collect(),
        None => vec![(
            node.node_id,
            node.advertised_host.clone(),
            node.advertised_port,
            None,
        )],
    }
}

pub async fn handle(ctx: &ConnCtx, version: i16, req: MetadataRequest) -> MetadataResponse {
    let node = ctx.shard.node.clone();
    let mut resp = MetadataResponse::default();
    for (id, host, port, rack) in brokers(&node) {
        let mut b = MetadataResponseBroker::default();
        b.node_id = BrokerId(id);
        b.host = sb(&host);
        b.port = port;
        b.rack = rack.map(|r| sb(&r));
        resp.brokers.push(b);
    }
    resp.cluster_id = Some(sb(&node.cluster_id()));
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
    if !to_create.is_empty() && node.cluster.is_some() {
        auto_create_in_cluster(&node, to_create).await;
    } else if !to_create.is_empty() {
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

/// Auto-creation in a cluster: a CreateTopics forwarded to the active controller; the topics
/// are answered once this node's image has them.
async fn auto_create_in_cluster(node: &crate::cluster::node::Node, topics: Vec<NewTopic>) {
    use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreateTopicsRequest};
    let mut req = CreateTopicsRequest::default();
    req.timeout_ms = 10_000;
    let names: Vec<String> = topics.iter().map(|t| t.name.clone()).collect();
    for t in topics {
        let mut c = CreatableTopic::default();
        c.name = tn(&t.name);
        c.num_partitions = t.partitions;
        c.replication_factor = -1;
        req.topics.push(c);
    }
    match crate::server::controller::forward(node, 5, &req).await {
        Ok(resp) => {
            for t in &resp.topics {
                if t.error_code != ec::NONE && t.error_code != ec::TOPIC_ALREADY_EXISTS {
                    tracing::warn!("auto-create of {} failed: error {}", t.name.0, t.error_code);
                }
            }
            crate::server::controller::wait_for_image(
                node,
                std::time::Duration::from_secs(5),
                |img| names.iter().all(|n| img.topic(n).is_some()),
            )
            .await;
        }
        Err(e) => tracing::warn!("auto-create failed: {e:#}"),
    }
}
