//! DeleteGroups: removes empty groups and their committed offsets.

use kafka_protocol::messages::delete_groups_request::DeleteGroupsRequest;
use kafka_protocol::messages::delete_groups_response::{
    DeletableGroupResult, DeleteGroupsResponse,
};

use super::util::{on_coordinator, string_of, valid_group};
use crate::server::errors as ec;
use crate::server::ConnCtx;

pub async fn handle(ctx: &ConnCtx, _version: i16, r: DeleteGroupsRequest) -> DeleteGroupsResponse {
    let mut resp = DeleteGroupsResponse::default();
    for gid in r.groups_names {
        let group = string_of(&gid.0);
        let mut dr = DeletableGroupResult::default();
        dr.group_id = gid.clone();
        if !valid_group(&group) {
            dr.error_code = ec::INVALID_GROUP_ID;
            resp.results.push(dr);
            continue;
        }
        let g2 = group.clone();
        let out = on_coordinator(&ctx.shard.node, &group, move |sh, g| async move {
            g.delete_group_and_offsets(&sh, &g2).await
        })
        .await;
        dr.error_code = out.unwrap_or_else(|| super::util::no_coordinator(&ctx.shard.node, &group));
        resp.results.push(dr);
    }
    resp
}
