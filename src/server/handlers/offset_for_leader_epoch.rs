//! OffsetForLeaderEpoch: where each asked-for leader epoch ends.

use kafka_protocol::messages::offset_for_leader_epoch_request::OffsetForLeaderEpochRequest;
use kafka_protocol::messages::offset_for_leader_epoch_response::{
    EpochEndOffset, OffsetForLeaderEpochResponse, OffsetForLeaderTopicResult,
};

use super::util::tn;
use crate::server::errors as ec;
use crate::server::ConnCtx;
use crate::shard::fanout::{per_partition, PartitionJob};

/// What a partition's part of the request asks: the epoch to place, and the leader epoch the
/// asker believes in (KIP-320; -1 for none).
struct Ask {
    epoch: i32,
    current: i32,
}

/// Answered by the leader from its leader-epoch cache: the largest epoch at or below the
/// asked one and where it ends (followers find where they diverge; consumers validate their
/// position after a leader change). An epoch the log cannot place gets -1/-1, as Kafka.
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
                input: Ask {
                    epoch: p.leader_epoch,
                    current: p.current_leader_epoch,
                },
            });
        }
    }
    let results = per_partition(&node, jobs, |part, job| async move {
        let Some(part) = part else {
            let code = crate::shard::local()
                .node
                .not_served_code(&job.topic, job.partition);
            return (code, -1, -1);
        };
        if let Err(code) = part.check_current_epoch(job.input.current) {
            return (code, -1, -1);
        }
        match part.end_offset_for_epoch(job.input.epoch) {
            Some(e) => (ec::NONE, e.epoch, e.end_offset as i64),
            None => (ec::NONE, -1, -1),
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
