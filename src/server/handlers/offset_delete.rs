//! OffsetDelete: removes a group's committed offsets of some partitions (refused while subscribed).

use kafka_protocol::messages::offset_delete_request::OffsetDeleteRequest;
use kafka_protocol::messages::offset_delete_response::{
    OffsetDeleteResponse, OffsetDeleteResponsePartition, OffsetDeleteResponseTopic,
};

use super::util::{on_coordinator, string_of, valid_group};
use crate::server::errors as ec;
use crate::server::ConnCtx;

pub async fn handle(ctx: &ConnCtx, _version: i16, r: OffsetDeleteRequest) -> OffsetDeleteResponse {
    let group = string_of(&r.group_id.0);
    let mut resp = OffsetDeleteResponse::default();
    if !valid_group(&group) {
        resp.error_code = ec::INVALID_GROUP_ID;
        return resp;
    }
    let parts: Vec<(String, i32)> = r
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .map(move |p| (t.name.0.to_string(), p.partition_index))
        })
        .collect();
    let g2 = group.clone();
    let out = on_coordinator(&ctx.shard.node, &group, move |sh, g| async move {
        g.delete_offsets(sh.as_ref(), &g2, parts).await
    })
    .await;
    match out {
        None => resp.error_code = super::util::no_coordinator(&ctx.shard.node, &group),
        Some(Err(code)) => resp.error_code = code,
        Some(Ok(per)) => {
            let mut per = per.into_iter();
            for t in r.topics {
                let mut tr = OffsetDeleteResponseTopic::default();
                tr.name = t.name.clone();
                for p in t.partitions {
                    let mut pr = OffsetDeleteResponsePartition::default();
                    pr.partition_index = p.partition_index;
                    pr.error_code = per.next().unwrap_or(ec::UNKNOWN_SERVER_ERROR);
                    tr.partitions.push(pr);
                }
                resp.topics.push(tr);
            }
        }
    }
    resp
}
