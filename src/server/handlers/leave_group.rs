//! LeaveGroup (classic protocol): one member, or from v3 a batch of them.

use kafka_protocol::messages::leave_group_request::LeaveGroupRequest;
use kafka_protocol::messages::leave_group_response::{LeaveGroupResponse, MemberResponse};

use super::util::{on_coordinator, sb, string_of, valid_group};
use crate::group::state::LeaveMember;
use crate::server::errors as ec;
use crate::server::ConnCtx;

pub async fn handle(ctx: &ConnCtx, version: i16, r: LeaveGroupRequest) -> LeaveGroupResponse {
    let group = string_of(&r.group_id.0);
    let mut resp = LeaveGroupResponse::default();
    if !valid_group(&group) {
        resp.error_code = ec::INVALID_GROUP_ID;
        return resp;
    }
    let members: Vec<LeaveMember> = if version >= 3 {
        r.members
            .iter()
            .map(|m| LeaveMember {
                member_id: string_of(&m.member_id),
                group_instance_id: m.group_instance_id.as_ref().map(string_of),
            })
            .collect()
    } else {
        vec![LeaveMember {
            member_id: string_of(&r.member_id),
            group_instance_id: None,
        }]
    };
    let g2 = group.clone();
    let out = on_coordinator(&ctx.shard.node, &group, move |sh, g| async move {
        g.leave(&sh, &g2, &members)
    })
    .await;
    match out {
        None => resp.error_code = super::util::no_coordinator(&ctx.shard.node, &group),
        Some((top, per)) => {
            resp.error_code = top.err().unwrap_or(ec::NONE);
            if version >= 3 {
                for (m, code) in per {
                    let mut mr = MemberResponse::default();
                    mr.member_id = sb(&m.member_id);
                    mr.group_instance_id = m.group_instance_id.as_deref().map(sb);
                    mr.error_code = code;
                    resp.members.push(mr);
                }
            } else if resp.error_code == ec::NONE {
                resp.error_code = per.first().map(|(_, c)| *c).unwrap_or(ec::NONE);
            }
        }
    }
    resp
}
