//! Heartbeat (classic protocol): keeps a member's session alive and tells it of a rebalance.

use kafka_protocol::messages::heartbeat_request::HeartbeatRequest;
use kafka_protocol::messages::heartbeat_response::HeartbeatResponse;

use super::util::{on_coordinator, string_of, valid_group};
use crate::group::state;
use crate::server::errors as ec;
use crate::server::ConnCtx;

pub async fn handle(ctx: &ConnCtx, _version: i16, r: HeartbeatRequest) -> HeartbeatResponse {
    let group = string_of(&r.group_id.0);
    let mut resp = HeartbeatResponse::default();
    if !valid_group(&group) {
        resp.error_code = ec::INVALID_GROUP_ID;
        return resp;
    }
    let hr = state::HeartbeatRequest {
        group_id: group.clone(),
        generation_id: r.generation_id,
        member_id: string_of(&r.member_id),
        group_instance_id: r.group_instance_id.as_ref().map(string_of),
    };
    let out = on_coordinator(&ctx.shard.node, &group, move |_sh, g| async move {
        g.heartbeat(hr)
    })
    .await;
    resp.error_code = match out {
        None => super::util::no_coordinator(&ctx.shard.node, &group),
        Some(Ok(())) => ec::NONE,
        Some(Err(code)) => code,
    };
    resp
}
