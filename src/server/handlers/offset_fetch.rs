//! OffsetFetch: a group's committed offsets, from its coordinator shard (v8+: many groups in one
//! request; v9: consumer-group members fetch with their member epoch).

use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequest;
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponse, OffsetFetchResponseGroup, OffsetFetchResponsePartition,
    OffsetFetchResponsePartitions, OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::protocol::StrBytes;

use super::util::{on_coordinator, sb, tn, valid_group};
use crate::group::CommittedTopic;
use crate::server::errors as ec;
use crate::server::ConnCtx;

/// OffsetFetch v9: a consumer-group member fetching with its member id and epoch.
async fn validate_fetch(
    ctx: &ConnCtx,
    group: &str,
    member_id: Option<StrBytes>,
    member_epoch: i32,
) -> Result<(), i16> {
    if member_epoch == -1 || !valid_group(group) {
        return Ok(());
    }
    let g2 = group.to_owned();
    let member_id = member_id.map(|m| m.to_string());
    on_coordinator(&ctx.shard.node, group, move |_sh, g| async move {
        g.validate_fetch(&g2, member_id.as_deref(), member_epoch)
    })
    .await
    .unwrap_or_else(|| Err(super::util::no_coordinator(&ctx.shard.node, group)))
}

/// One group's committed offsets: None topics means every committed partition.
async fn fetch_group(
    ctx: &ConnCtx,
    group: String,
    topics: Option<Vec<(String, Vec<i32>)>>,
) -> Result<Vec<CommittedTopic>, i16> {
    if !valid_group(&group) {
        return Err(ec::INVALID_GROUP_ID);
    }
    let g2 = group.clone();
    on_coordinator(&ctx.shard.node, &group, move |_sh, g| async move {
        g.committed_offsets(&g2, topics)
    })
    .await
    .ok_or_else(|| super::util::no_coordinator(&ctx.shard.node, &group))
}

pub async fn handle(ctx: &ConnCtx, version: i16, r: OffsetFetchRequest) -> OffsetFetchResponse {
    let mut resp = OffsetFetchResponse::default();
    if version >= 8 {
        for g in r.groups {
            let topics = g.topics.map(|ts| {
                ts.into_iter()
                    .map(|t| (t.name.0.to_string(), t.partition_indexes))
                    .collect()
            });
            let mut rg = OffsetFetchResponseGroup::default();
            rg.group_id = g.group_id.clone();
            let gid = g.group_id.0.to_string();
            if let Err(code) = validate_fetch(ctx, &gid, g.member_id, g.member_epoch).await {
                rg.error_code = code;
                resp.groups.push(rg);
                continue;
            }
            match fetch_group(ctx, gid, topics).await {
                Err(code) => rg.error_code = code,
                Ok(rows) => {
                    for (t, ps) in rows {
                        let mut rt = OffsetFetchResponseTopics::default();
                        rt.name = tn(&t);
                        for c in ps {
                            let mut rp = OffsetFetchResponsePartitions::default();
                            rp.partition_index = c.partition;
                            rp.committed_offset = c.offset;
                            rp.committed_leader_epoch = c.leader_epoch;
                            rp.metadata = Some(sb(&c.metadata));
                            rt.partitions.push(rp);
                        }
                        rg.topics.push(rt);
                    }
                }
            }
            resp.groups.push(rg);
        }
        return resp;
    }
    let topics = r.topics.map(|ts| {
        ts.into_iter()
            .map(|t| (t.name.0.to_string(), t.partition_indexes))
            .collect()
    });
    match fetch_group(ctx, r.group_id.0.to_string(), topics).await {
        Err(code) => {
            if version >= 2 {
                resp.error_code = code;
            }
        }
        Ok(rows) => {
            for (t, ps) in rows {
                let mut rt = OffsetFetchResponseTopic::default();
                rt.name = tn(&t);
                for c in ps {
                    let mut rp = OffsetFetchResponsePartition::default();
                    rp.partition_index = c.partition;
                    rp.committed_offset = c.offset;
                    rp.committed_leader_epoch = if version >= 5 { c.leader_epoch } else { -1 };
                    rp.metadata = Some(sb(&c.metadata));
                    rt.partitions.push(rp);
                }
                resp.topics.push(rt);
            }
        }
    }
    resp
}
