//! ListGroups: the groups of every coordinator shard, filtered by state and type.

use kafka_protocol::messages::list_groups_request::ListGroupsRequest;
use kafka_protocol::messages::list_groups_response::{ListGroupsResponse, ListedGroup};
use kafka_protocol::messages::GroupId;

use super::util::sb;
use crate::server::ConnCtx;
use crate::shard::invoke;

pub async fn handle(ctx: &ConnCtx, version: i16, r: ListGroupsRequest) -> ListGroupsResponse {
    let node = ctx.shard.node.clone();
    let filter: Vec<String> = r.states_filter.iter().map(|x| x.to_string()).collect();
    let types: Vec<String> = r.types_filter.iter().map(|x| x.to_string()).collect();
    let futs = (0..node.shards()).map(|i| {
        invoke(i, |sh| async move {
            let groups = sh.groups.borrow().clone();
            groups.map(|g| g.list()).unwrap_or_default()
        })
    });
    let mut resp = ListGroupsResponse::default();
    for list in futures::future::join_all(futs).await {
        for g in list {
            if !filter.is_empty() && !filter.iter().any(|f| f.eq_ignore_ascii_case(&g.state)) {
                continue;
            }
            if !types.is_empty() && !types.iter().any(|t| t.eq_ignore_ascii_case(g.group_type)) {
                continue;
            }
            let mut lg = ListedGroup::default();
            lg.group_id = GroupId(sb(&g.group_id));
            lg.protocol_type = sb(&g.protocol_type);
            if version >= 4 {
                lg.group_state = sb(&g.state);
            }
            if version >= 5 {
                lg.group_type = sb(g.group_type);
            }
            resp.groups.push(lg);
        }
    }
    resp
}
