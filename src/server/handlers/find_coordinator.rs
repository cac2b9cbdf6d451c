//! FindCoordinator: every group is coordinated by this node (transaction coordinators are not
//! supported yet).

use kafka_protocol::messages::find_coordinator_request::FindCoordinatorRequest;
use kafka_protocol::messages::find_coordinator_response::{Coordinator, FindCoordinatorResponse};
use kafka_protocol::messages::BrokerId;
use kafka_protocol::protocol::StrBytes;

use super::util::{sb, valid_group};
use crate::server::errors as ec;
use crate::server::ConnCtx;

pub async fn handle(
    ctx: &ConnCtx,
    version: i16,
    r: FindCoordinatorRequest,
) -> FindCoordinatorResponse {
    let node = &ctx.shard.node;
    let mut resp = FindCoordinatorResponse::default();
    let keys: Vec<StrBytes> = if version >= 4 {
        r.coordinator_keys.clone()
    } else {
        vec![r.key.clone()]
    };
    let mut out = Vec::new();
    for k in keys {
        let mut c = Coordinator::default();
        c.key = k.clone();
        if r.key_type != 0 {
            c.error_code = ec::COORDINATOR_NOT_AVAILABLE;
            c.error_message = Some(sb("transactions are not supported yet"));
            c.node_id = BrokerId(-1);
            c.host = sb("");
            c.port = -1;
        } else if !valid_group(k.as_str()) {
            c.error_code = ec::INVALID_GROUP_ID;
            c.node_id = BrokerId(-1);
            c.host = sb("");
            c.port = -1;
        } else if node.cluster.is_some() {
            match cluster_coordinator(node, k.as_str()).await {
                Ok((id, host, port)) => {
                    c.node_id = BrokerId(id);
                    c.host = sb(&host);
                    c.port = port;
                }
                Err(msg) => {
                    c.error_code = ec::COORDINATOR_NOT_AVAILABLE;
                    c.error_message = Some(sb(&msg));
                    c.node_id = BrokerId(-1);
                    c.host = sb("");
                    c.port = -1;
                }
            }
        } else {
            c.node_id = BrokerId(node.node_id);
            c.host = sb(&node.advertised_host);
            c.port = node.advertised_port;
        }
        out.push(c);
    }
    if version >= 4 {
        resp.coordinators = out;
    } else if let Some(c) = out.into_iter().next() {
        resp.error_code = c.error_code;
        resp.error_message = c.error_message;
        resp.node_id = c.node_id;
        resp.host = c.host;
        resp.port = c.port;
    }
    resp
}

/// In a cluster: the leader of the group's `__consumer_offsets` partition, creating the topic
/// through the controller on first use (`offsets.topic.replication.factor` replicas; with fewer
/// brokers it cannot be created yet and the group waits, as in Kafka).
async fn cluster_coordinator(
    node: &crate::cluster::node::Node,
    group: &str,
) -> Result<(i32, String, i32), String> {
    use crate::group::{offsets_partition_for, OFFSETS_TOPIC};
    if node.image().topic(OFFSETS_TOPIC).is_none() {
        create_offsets_topic(node).await?;
    }
    let img = node.image();
    let t = img
        .topic(OFFSETS_TOPIC)
        .ok_or("the offsets topic is not there yet")?;
    let p = offsets_partition_for(group, t.partitions);
    let leader = t.leader(p, node.node_id);
    let c = img.cluster.as_ref().ok_or("no cluster metadata yet")?;
    let b = c
        .brokers
        .iter()
        .find(|b| b.id == leader && !b.fenced)
        .ok_or_else(|| format!("{OFFSETS_TOPIC}-{p} has no leader"))?;
    Ok((b.id, b.host.clone(), b.port))
}

async fn create_offsets_topic(node: &crate::cluster::node::Node) -> Result<(), String> {
    use kafka_protocol::messages::create_topics_request::{
        CreatableTopic, CreatableTopicConfig, CreateTopicsRequest,
    };
    let mut t = CreatableTopic::default();
    t.name = super::util::tn(crate::group::OFFSETS_TOPIC);
    t.num_partitions = node.tuning.group.offsets_topic_num_partitions;
    t.replication_factor = node.tuning.group.offsets_topic_replication_factor;
    for (k, v) in [
        ("cleanup.policy", "compact"),
        ("segment.bytes", "104857600"),
    ] {
        let mut c = CreatableTopicConfig::default();
        c.name = sb(k);
        c.value = Some(sb(v));
        t.configs.push(c);
    }
    let mut req = CreateTopicsRequest::default();
    req.timeout_ms = 10_000;
    req.topics.push(t);
    let resp = crate::server::controller::forward(node, 5, &req)
        .await
        .map_err(|e| format!("{e:#}"))?;
    if let Some(r) = resp.topics.first() {
        if r.error_code != ec::NONE && r.error_code != ec::TOPIC_ALREADY_EXISTS {
            return Err(format!(
                "cannot create {}: error {} {}",
                crate::group::OFFSETS_TOPIC,
                r.error_code,
                r.error_message.as_deref().unwrap_or("")
            ));
        }
    }
    crate::server::controller::wait_for_image(node, std::time::Duration::from_secs(5), |img| {
        img.topic(crate::group::OFFSETS_TOPIC).is_some()
    })
    .await;
    Ok(())
}
