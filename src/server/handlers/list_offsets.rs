//! ListOffsets: earliest, latest, max timestamp, or the first offset at or after a timestamp.

use kafka_protocol::messages::list_offsets_request::ListOffsetsRequest;
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::records::RecordBatchDecoder;

use crate::partition::Partition;
use crate::server::errors as ec;
use crate::server::ConnCtx;
use crate::shard::fanout::{per_partition, PartitionJob};

pub const EARLIEST: i64 = -2;
pub const LATEST: i64 = -1;
pub const MAX_TIMESTAMP: i64 = -3;

/// (error, timestamp, offset, leader epoch of that offset)
async fn lookup(p: &Partition, asked: i64) -> (i16, i64, i64, i32) {
    let (code, ts, offset) = find(p, asked).await;
    let epoch = if code != ec::NONE {
        -1
    } else if asked == LATEST || offset >= p.high_watermark() {
        // The end of the log belongs to the current leader's epoch.
        p.leader_epoch()
    } else if offset >= 0 {
        p.log.epoch_at(offset as u64)
    } else {
        -1
    };
    (code, ts, offset, epoch)
}

/// (error, timestamp, offset)
async fn find(p: &Partition, ts: i64) -> (i16, i64, i64) {
    match ts {
        EARLIEST => (ec::NONE, -1, p.log.log_start_offset() as i64),
        LATEST => (ec::NONE, -1, p.high_watermark()),
        MAX_TIMESTAMP => {
            let (max_ts, batch_base) = p.log.inner.borrow().max_timestamp;
            if max_ts < 0 {
                return (ec::NONE, -1, -1);
            }
            // The record holding the max timestamp inside that batch.
            match p.log.read(batch_base, 1, p.high_watermark() as u64).await {
                Ok(bytes) => match record_at_or_after(bytes, max_ts) {
                    Some((t, o)) => (ec::NONE, t, o),
                    None => (ec::NONE, max_ts, batch_base as i64),
                },
                Err(_) => (ec::NONE, -1, -1),
            }
        }
        t if t < 0 => (ec::INVALID_REQUEST, -1, -1),
        t => match p.log.batch_for_timestamp(t).await {
            Ok(Some(batch)) => match record_at_or_after(batch, t) {
                Some((ts, o)) => (ec::NONE, ts, o),
                None => (ec::NONE, -1, -1),
            },
            Ok(None) => (ec::NONE, -1, -1),
            Err(_) => (ec::KAFKA_STORAGE_ERROR, -1, -1),
        },
    }
}

/// Decodes one batch (off the hot path) and returns the first record with timestamp >= ts.
fn record_at_or_after(mut batch: bytes::Bytes, ts: i64) -> Option<(i64, i64)> {
    let set = RecordBatchDecoder::decode(&mut batch).ok()?;
    set.records
        .iter()
        .find(|r| r.timestamp >= ts)
        .map(|r| (r.timestamp, r.offset))
}

pub async fn handle(ctx: &ConnCtx, version: i16, req: ListOffsetsRequest) -> ListOffsetsResponse {
    let node = ctx.shard.node.clone();
    let mut jobs = Vec::new();
    for t in &req.topics {
        for p in &t.partitions {
            jobs.push(PartitionJob {
                topic: t.name.0.to_string(),
                partition: p.partition_index,
                input: (p.timestamp, p.current_leader_epoch),
            });
        }
    }
    let results = per_partition(&node, jobs, |part, job| async move {
        let (ts, current) = job.input;
        match part {
            Some(part) => match part.check_current_epoch(current) {
                Ok(()) => lookup(&part, ts).await,
                Err(code) => (code, -1, -1, -1),
            },
            None => (
                crate::shard::local()
                    .node
                    .not_served_code(&job.topic, job.partition),
                -1,
                -1,
                -1,
            ),
        }
    })
    .await;
    let mut results = results.into_iter();
    let mut resp = ListOffsetsResponse::default();
    for t in req.topics {
        let mut tr = ListOffsetsTopicResponse::default();
        tr.name = t.name.clone();
        for p in t.partitions {
            let (code, ts, off, epoch) =
                results
                    .next()
                    .unwrap_or((ec::UNKNOWN_SERVER_ERROR, -1, -1, -1));
            let mut pr = ListOffsetsPartitionResponse::default();
            pr.partition_index = p.partition_index;
            pr.error_code = code;
            pr.timestamp = ts;
            pr.offset = off;
            pr.leader_epoch = if version >= 4 { epoch } else { -1 };
            tr.partitions.push(pr);
        }
        resp.topics.push(tr);
    }
    resp
}
