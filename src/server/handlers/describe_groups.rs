//! DescribeGroups (classic groups): state, protocol and members.

use kafka_protocol::messages::describe_groups_request::DescribeGroupsRequest;
use kafka_protocol::messages::describe_groups_response::{
    DescribeGroupsResponse, DescribedGroup, DescribedGroupMember,
};

use super::util::{
    authorized_operations, on_coordinator, sb, string_of, valid_group, GROUP_OPERATIONS,
};
use crate::server::errors as ec;
use crate::server::ConnCtx;

pub async fn handle(
    ctx: &ConnCtx,
    version: i16,
    r: DescribeGroupsRequest,
) -> DescribeGroupsResponse {
    let mut resp = DescribeGroupsResponse::default();
    let group_operations = authorized_operations(r.include_authorized_operations, GROUP_OPERATIONS);
    for gid in r.groups {
        let group = string_of(&gid.0);
        let mut dg = DescribedGroup::default();
        dg.group_id = gid.clone();
        dg.authorized_operations = group_operations;
        if !valid_group(&group) {
            dg.error_code = ec::INVALID_GROUP_ID;
            resp.groups.push(dg);
            continue;
        }
        let g2 = group.clone();
        let d = on_coordinator(&ctx.shard.node, &group, move |_sh, g| async move {
            g.describe(&g2)
        })
        .await;
        match d {
            None => dg.error_code = super::util::no_coordinator(&ctx.shard.node, &group),
            Some(None) => dg.group_state = sb("Dead"),
            Some(Some(d)) => {
                dg.group_state = sb(d.state);
                dg.protocol_type = sb(&d.protocol_type);
                dg.protocol_data = sb(&d.protocol);
                for m in d.members {
                    let mut dm = DescribedGroupMember::default();
                    dm.member_id = sb(&m.member_id);
                    dm.group_instance_id = if version >= 4 {
                        m.group_instance_id.as_deref().map(sb)
                    } else {
                        None
                    };
                    dm.client_id = sb(&m.client_id);
                    dm.client_host = sb(&m.client_host);
                    dm.member_metadata = m.metadata;
                    dm.member_assignment = m.assignment;
                    dg.members.push(dm);
                }
            }
        }
        resp.groups.push(dg);
    }
    resp
}
