//! OffsetForLeaderEpoch: where each asked-for leader epoch ends.

use kafka_protocol::messages::offset_for_leader_epoch_request::OffsetForLeaderEpochRequest;
use kafka_protocol::messages::offset_for_leader_epoch_response::{
    EpochEndOffset, OffsetForLeaderEpochResponse, OffsetForLeaderTopicResult,
};

use super::util::tn;
use crate::partition::LEADER_EPOCH;
use crate::server::errors as ec;
use crate::server::ConnCtx;
use crate::shard::fanout::{per_partition, PartitionJob};

/// Single node with one leader epoch forever: epoch 0 ends at the log end offset.
pub async fn handle(
    ctx: &ConnCtx,
    req: OffsetForLeaderEpochRequest,
) -> OffsetForLeaderEpochResponse {
    let node = ctx.shard.node.clone();
    let mut jobs = Vec::new();
    for t in &req.topics {
        for p in &t.partitions {
            jobs.push(PartitionJob {
                topic: t.topic.0.to_string(),
                partition: p.partition,
                input: p.leader_epoch,
            });
        }
    }
    let results = per_partition(&node, jobs, |part, job| async move {
        match part {
            Some(part) if job.input <= LEADER_EPOCH => {
                (ec::NONE, LEADER_EPOCH, part.high_watermark())
            }
            Some(_) => (ec::NONE, -1, -1),
            None => (
                crate::shard::local()
                    .node
                    .not_served_code(&job.topic, job.partition),
                -1,
                -1,
            ),
        }
    })
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
