//! DeleteRecords: moves each partition's log start offset forward, on the shard that owns it.

use kafka_protocol::messages::delete_records_request::DeleteRecordsRequest;
use kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsResponse, DeleteRecordsTopicResult,
};

use crate::server::errors as ec;
use crate::server::ConnCtx;
use crate::shard::fanout::{per_partition, PartitionJob};

pub async fn handle(ctx: &ConnCtx, req: DeleteRecordsRequest) -> DeleteRecordsResponse {
    let node = ctx.shard.node.clone();
    let mut jobs = Vec::new();
    for t in &req.topics {
        for p in &t.partitions {
            jobs.push(PartitionJob {
                topic: t.name.0.to_string(),
                partition: p.partition_index,
                input: p.offset,
            });
        }
    }
    let results = per_partition(&node, jobs, |part, job| async move {
        let Some(part) = part else {
            return (
                crate::shard::local()
                    .node
                    .not_served_code(&job.topic, job.partition),
                -1,
            );
        };
        let hwm = part.high_watermark();
        // -1 means "up to the high watermark", as in Kafka.
        let target = if job.input == -1 { hwm } else { job.input };
        if target < 0 || target > hwm {
            return (ec::OFFSET_OUT_OF_RANGE, -1);
        }
        match part.log.delete_records_before(target as u64).await {
            Ok(low) => (ec::NONE, low as i64),
            Err(e) => {
                tracing::error!("delete records on {}-{}: {e}", job.topic, job.partition);
                (ec::KAFKA_STORAGE_ERROR, -1)
            }
        }
    })
    .await;
    let mut results = results.into_iter();
    let mut resp = DeleteRecordsResponse::default();
    for t in req.topics {
        let mut tr = DeleteRecordsTopicResult::default();
        tr.name = t.name.clone();
        for p in t.partitions {
            let (code, low) = results.next().unwrap_or((ec::UNKNOWN_SERVER_ERROR, -1));
            let mut pr = DeleteRecordsPartitionResult::default();
            pr.partition_index = p.partition_index;
            pr.error_code = code;
            pr.low_watermark = low;
            tr.partitions.push(pr);
        }
        resp.topics.push(tr);
    }
    resp
}
