//! ConsumerGroupHeartbeat (KIP-848): joins, heartbeats and leaves a consumer-protocol group in
//! one API; the server computes assignments. Topics cross the wire by id.

use kafka_protocol::messages::consumer_group_heartbeat_request::ConsumerGroupHeartbeatRequest;
use kafka_protocol::messages::consumer_group_heartbeat_response::{
    self as cgh, ConsumerGroupHeartbeatResponse,
};

use super::util::{on_coordinator, sb};
use crate::group::consumer_group::{HeartbeatRequest, HeartbeatResponse};
use crate::group::GROUP_ID_BYTES_MAX;
use crate::server::errors as ec;
use crate::server::ConnCtx;

pub async fn handle(
    ctx: &ConnCtx,
    _version: i16,
    r: ConsumerGroupHeartbeatRequest,
) -> ConsumerGroupHeartbeatResponse {
    let group = r.group_id.0.to_string();
    if group.len() > GROUP_ID_BYTES_MAX {
        return error_response(ec::INVALID_GROUP_ID, "group id too long");
    }
    let owned_ids: Option<Vec<(uuid::Uuid, Vec<i32>)>> = r.topic_partitions.map(|tps| {
        tps.into_iter()
            .map(|tp| (tp.topic_id, tp.partitions))
            .collect()
    });
    let req = HeartbeatRequest {
        group_id: group.clone(),
        member_id: r.member_id.to_string(),
        member_epoch: r.member_epoch,
        instance_id: r.instance_id.map(|x| x.to_string()),
        rack_id: r.rack_id.map(|x| x.to_string()),
        rebalance_timeout_ms: r.rebalance_timeout_ms,
        subscribed_topic_names: r
            .subscribed_topic_names
            .map(|ts| ts.into_iter().map(|t| t.0.to_string()).collect()),
        subscribed_topic_regex: r.subscribed_topic_regex.map(|x| x.to_string()),
        server_assignor: r.server_assignor.map(|x| x.to_string()),
        owned: None,
        client_id: ctx.client_id.clone(),
        client_host: format!("/{}", ctx.client_host),
    };
    let out = on_coordinator(&ctx.shard.node, &group, move |sh, g| async move {
        g.consumer_heartbeat(&sh, req, owned_ids).await
    })
    .await;
    match out {
        None => error_response(
            super::util::no_coordinator(&ctx.shard.node, &group),
            "coordinator not available",
        ),
        Some(Err((code, msg))) => error_response(code, &msg),
        Some(Ok((resp, assignment))) => to_wire(resp, assignment),
    }
}

fn error_response(code: i16, msg: &str) -> ConsumerGroupHeartbeatResponse {
    let mut r = ConsumerGroupHeartbeatResponse::default();
    r.error_code = code;
    r.error_message = Some(sb(msg));
    r
}

fn to_wire(
    resp: HeartbeatResponse,
    assignment: Option<Vec<(uuid::Uuid, Vec<i32>)>>,
) -> ConsumerGroupHeartbeatResponse {
    let mut r = ConsumerGroupHeartbeatResponse::default();
    r.error_code = resp.error_code;
    r.error_message = resp.error_message.as_deref().map(sb);
    r.member_id = resp.member_id.as_deref().map(sb);
    r.member_epoch = resp.member_epoch;
    r.heartbeat_interval_ms = resp.heartbeat_interval_ms;
    r.assignment = assignment.map(|tps| {
        let mut a = cgh::Assignment::default();
        for (id, ps) in tps {
            let mut tp = cgh::TopicPartitions::default();
            tp.topic_id = id;
            tp.partitions = ps;
            a.topic_partitions.push(tp);
        }
        a
    });
    r
}
