//! OffsetForLeaderEpoch: where each asked-for leader epoch ends.

use kafka_protocol::messages::offset_for_leader_epoch_request::OffsetForLeaderEpochRequest;
use kafka_protocol::messages::offset_for_leader_epoch_response::{
    EpochEndOffset, OffsetForLeaderEpochResponse, OffsetForLeaderTopicResult,
};

use super::util::{per_shard, tn};
use crate::partition::LEADER_EPOCH;
use crate::server::errors as ec;
use crate::server::ConnCtx;

/// Single node with one leader epoch forever: epoch 0 ends at the log end offset.
pub async fn handle(
    ctx: &ConnCtx,
    req: OffsetForLeaderEpochRequest,
) -> OffsetForLeaderEpochResponse {
    let node = ctx.shard.node.clone();
    let mut items = Vec::new();
    for t in &req.topics {
        for p in &t.partitions {
            let name = t.topic.0.to_string();
            items.push((
                node.shard_of(&name, p.partition),
                (name, p.partition, p.leader_epoch),
            ));
        }
    }
    let results = per_shard(
        node.shards(),
        items,
        |sh, its: Vec<(String, i32, i32)>| async move {
            let mut out = Vec::new();
            for (t, p, epoch) in its {
                match sh.partition(&t, p).await {
                    Some(part) if epoch <= LEADER_EPOCH => {
                        out.push((ec::NONE, LEADER_EPOCH, part.high_watermark()))
                    }
                    Some(_) => out.push((ec::NONE, -1, -1)),
                    None => out.push((ec::UNKNOWN_TOPIC_OR_PARTITION, -1, -1)),
                }
            }
            out
        },
    )
    .await;
    let mut results = results.into_iter();
    let mut resp = OffsetForLeaderEpochResponse::default();
    for t in req.topics {
        let mut tr = OffsetForLeaderTopicResult::default();
        tr.topic = tn(t.topic.0.as_str());
        for p in t.partitions {
            let (code, epoch, end) = results.next().unwrap_or((ec::UNKNOWN_SERVER_ERROR, -1, -1));
            let mut e = EpochEndOffset::default();
            e.partition = p.partition;
            e.error_code = code;
            e.leader_epoch = epoch;
            e.end_offset = end;
            tr.partitions.push(e);
        }
        resp.topics.push(tr);
    }
    resp
}
