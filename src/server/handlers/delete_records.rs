//! DeleteRecords: moves each partition's log start offset forward, on the shard that owns it.

use kafka_protocol::messages::delete_records_request::DeleteRecordsRequest;
use kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsResponse, DeleteRecordsTopicResult,
};

use crate::server::errors as ec;
use crate::server::ConnCtx;
use crate::shard::fanout::{per_partition, PartitionJob};

/// Answered once every replica on a live node has moved its log start too (Kafka's low
/// watermark), or with REQUEST_TIMED_OUT at the request's timeout (the deletion stands).
pub async fn handle(ctx: &ConnCtx, req: DeleteRecordsRequest) -> DeleteRecordsResponse {
    let node = ctx.shard.node.clone();
    let deadline = std::time::Instant::now()
        + std::time::Duration::from_millis(req.timeout_ms.clamp(0, 300_000) as u64);
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
    let results = per_partition(&node, jobs, move |part, job| async move {
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
        let deleted = part.log.delete_records_before(target as u64).await;
        part.log_start_moved();
        match deleted {
            Ok(low) => {
                // Followers learn the new start from their next fetch and report theirs.
                loop {
                    let live: Vec<i32> = {
                        let sh = crate::shard::local();
                        let img = sh.node.image();
                        let Some(a) = img
                            .topic(&job.topic)
                            .and_then(|t| t.assignments.get(job.partition as usize).cloned())
                        else {
                            break;
                        };
                        let unfenced = |b: &i32| {
                            img.cluster
                                .as_ref()
                                .is_some_and(|c| c.brokers.iter().any(|x| x.id == *b && !x.fenced))
                        };
                        a.replicas
                            .iter()
                            .copied()
                            .filter(|r| *r != sh.node.node_id && unfenced(r))
                            .collect()
                    };
                    let lw = part.low_watermark(&live);
                    if lw >= low {
                        break;
                    }
                    if std::time::Instant::now() >= deadline {
                        return (ec::REQUEST_TIMED_OUT, lw as i64);
                    }
                    glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
                }
                (ec::NONE, low as i64)
            }
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
