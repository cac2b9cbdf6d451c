//! SyncGroup (classic protocol): the leader hands out assignments; every member waits for its own.

use kafka_protocol::messages::sync_group_request::SyncGroupRequest;
use kafka_protocol::messages::sync_group_response::SyncGroupResponse;

use super::util::{on_coordinator, sb, string_of, valid_group};
use crate::group::state::SyncRequest;
use crate::server::errors as ec;
use crate::server::ConnCtx;

pub async fn handle(ctx: &ConnCtx, version: i16, r: SyncGroupRequest) -> SyncGroupResponse {
    let group = string_of(&r.group_id.0);
    let mut resp = SyncGroupResponse::default();
    if !valid_group(&group) {
        resp.error_code = ec::INVALID_GROUP_ID;
        return resp;
    }
    let sr = SyncRequest {
        group_id: group.clone(),
        generation_id: r.generation_id,
        member_id: string_of(&r.member_id),
        group_instance_id: r.group_instance_id.as_ref().map(string_of),
        protocol_type: r.protocol_type.as_ref().map(string_of),
        protocol_name: r.protocol_name.as_ref().map(string_of),
        assignments: r
            .assignments
            .iter()
            .map(|a| (string_of(&a.member_id), a.assignment.clone()))
            .collect(),
    };
    let out = on_coordinator(&ctx.shard.node, &group, move |sh, g| async move {
        g.sync(&sh, sr).await.ok()
    })
    .await
    .flatten();
    match out {
        None => resp.error_code = super::util::no_coordinator(&ctx.shard.node, &group),
        Some(x) => {
            resp.error_code = x.error_code;
            if version >= 5 {
                resp.protocol_type = x.protocol_type.as_deref().map(sb);
                resp.protocol_name = x.protocol_name.as_deref().map(sb);
            }
            resp.assignment = x.assignment;
        }
    }
    resp
}
