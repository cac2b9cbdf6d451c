//! JoinGroup (classic protocol): joins the member on the group's coordinator shard and waits for
//! the rebalance to complete.

use kafka_protocol::messages::join_group_request::JoinGroupRequest;
use kafka_protocol::messages::join_group_response::{JoinGroupResponse, JoinGroupResponseMember};

use super::util::{on_coordinator, sb, string_of, valid_group};
use crate::group::state::JoinRequest;
use crate::server::errors as ec;
use crate::server::ConnCtx;

pub async fn handle(ctx: &ConnCtx, version: i16, r: JoinGroupRequest) -> JoinGroupResponse {
    let group = string_of(&r.group_id.0);
    let mut resp = JoinGroupResponse::default();
    resp.generation_id = -1;
    if !valid_group(&group) {
        resp.error_code = ec::INVALID_GROUP_ID;
        return resp;
    }
    let jr = JoinRequest {
        group_id: group.clone(),
        member_id: string_of(&r.member_id),
        group_instance_id: r.group_instance_id.as_ref().map(string_of),
        client_id: ctx.client_id.clone(),
        client_host: format!("/{}", ctx.client_host),
        session_timeout_ms: r.session_timeout_ms,
        rebalance_timeout_ms: if version >= 1 {
            r.rebalance_timeout_ms
        } else {
            -1
        },
        protocol_type: string_of(&r.protocol_type),
        protocols: r
            .protocols
            .iter()
            .map(|p| (string_of(&p.name), p.metadata.clone()))
            .collect(),
        require_known_member_id: version >= 4,
    };
    let out = on_coordinator(&ctx.shard.node, &group, move |sh, g| async move {
        let rx = g.join(&sh, jr);
        rx.await.ok()
    })
    .await
    .flatten();
    match out {
        None => resp.error_code = super::util::no_coordinator(&ctx.shard.node, &group),
        Some(j) => {
            resp.error_code = j.error_code;
            resp.generation_id = j.generation_id;
            if version >= 7 {
                resp.protocol_type = j.protocol_type.as_deref().map(sb);
            }
            resp.protocol_name = j.protocol_name.as_deref().map(sb).or_else(|| {
                if version < 7 {
                    Some(sb(""))
                } else {
                    None
                }
            });
            resp.leader = sb(&j.leader);
            resp.member_id = sb(&j.member_id);
            resp.skip_assignment = j.skip_assignment && version >= 9;
            for m in j.members {
                let mut rm = JoinGroupResponseMember::default();
                rm.member_id = sb(&m.member_id);
                rm.group_instance_id = if version >= 5 {
                    m.group_instance_id.as_deref().map(sb)
                } else {
                    None
                };
                rm.metadata = m.metadata;
                resp.members.push(rm);
            }
        }
    }
    resp
}
