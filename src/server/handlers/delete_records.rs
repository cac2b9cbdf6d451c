//! DeleteRecords: moves each partition's log start offset forward, on the shard that owns it.

use kafka_protocol::messages::delete_records_request::DeleteRecordsRequest;
use kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsResponse, DeleteRecordsTopicResult,
};

use super::util::per_shard;
use crate::server::errors as ec;
use crate::server::ConnCtx;

pub async fn handle(ctx: &ConnCtx, req: DeleteRecordsRequest) -> DeleteRecordsResponse {
    let node = ctx.shard.node.clone();
    let mut items = Vec::new();
    for t in &req.topics {
        for p in &t.partitions {
            let name = t.name.0.to_string();
            items.push((
                node.shard_of(&name, p.partition_index),
                (name, p.partition_index, p.offset),
            ));
        }
    }
    let results = per_shard(
        node.shards(),
        items,
        |sh, its: Vec<(String, i32, i64)>| async move {
            let mut out = Vec::new();
            for (t, p, off) in its {
                let Some(part) = sh.partition(&t, p).await else {
                    out.push((ec::UNKNOWN_TOPIC_OR_PARTITION, -1));
                    continue;
                };
                let hwm = part.high_watermark();
                // -1 means "up to the high watermark", as in Kafka.
                let target = if off == -1 { hwm } else { off };
                if target < 0 || target > hwm {
                    out.push((ec::OFFSET_OUT_OF_RANGE, -1));
                    continue;
                }
                match part.log.delete_records_before(target as u64).await {
                    Ok(low) => out.push((ec::NONE, low as i64)),
                    Err(e) => {
                        tracing::error!("delete records on {t}-{p}: {e}");
                        out.push((ec::KAFKA_STORAGE_ERROR, -1))
                    }
                }
            }
            out
        },
    )
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
