//! Produce: validate each partition's batches, append on the owning shard, answer per acks.

use bytes::Bytes;
use kafka_protocol::messages::produce_request::ProduceRequest;
use kafka_protocol::messages::produce_response::{
    PartitionProduceResponse, ProduceResponse, TopicProduceResponse,
};

use super::util::{per_shard, sb};
use crate::server::errors as ec;
use crate::server::ConnCtx;

struct Item {
    topic: String,
    partition: i32,
    records: Option<Bytes>,
    /// Set on one item per shard: fired once that shard has queued all its batches.
    queued: Option<futures::channel::oneshot::Sender<()>>,
}

type Outcome = (i16, i64, i64, i64, Option<String>);

pub async fn handle(
    ctx: &ConnCtx,
    req: ProduceRequest,
    gate: &crate::server::OrderGate,
) -> Option<ProduceResponse> {
    let node = ctx.shard.node.clone();
    let acks = req.acks;
    let acks_ok = (-1..=1).contains(&acks);
    let txn = req.transactional_id.is_some();
    let mut items = Vec::new();
    let mut shape: Vec<(String, Vec<(i32, Option<Outcome>)>)> = Vec::new();
    {
        let img = node.image();
        for t in req.topic_data {
            let name = t.name.0.to_string();
            let topic = img.topic(&name);
            let mut parts = Vec::new();
            for p in t.partition_data {
                let pre: Option<Outcome> = if !acks_ok {
                    Some((ec::INVALID_REQUIRED_ACKS, -1, -1, -1, None))
                } else if txn {
                    Some((
                        ec::TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
                        -1,
                        -1,
                        -1,
                        Some("transactions are not supported".into()),
                    ))
                } else if topic
                    .map(|t| p.index < 0 || p.index >= t.partitions)
                    .unwrap_or(true)
                {
                    Some((ec::UNKNOWN_TOPIC_OR_PARTITION, -1, -1, -1, None))
                } else if topic.map(|t| t.internal).unwrap_or(false) {
                    Some((
                        ec::INVALID_TOPIC_EXCEPTION,
                        -1,
                        -1,
                        -1,
                        Some("cannot produce to an internal topic".into()),
                    ))
                } else {
                    items.push((
                        node.shard_of(&name, p.index),
                        Item {
                            topic: name.clone(),
                            partition: p.index,
                            records: p.records,
                            queued: None,
                        },
                    ));
                    None
                };
                parts.push((p.index, pre));
            }
            shape.push((name, parts));
        }
    }
    let sync = acks == -1 || node.tuning.fsync_always();
    let window_us = node.tuning.log.group_commit_window_us;
    // Each shard queues its partitions' batches, reports that through `queued`, then waits for
    // the writes. Once every shard has queued, the connection may read its next request: its
    // batches will be written after these (pipelining without reordering).
    let shards = node.shards();
    let mut items = items;
    let mut queued_rxs = Vec::new();
    let mut has_sender = vec![false; shards];
    for (shard, it) in items.iter_mut() {
        if !has_sender[*shard] {
            has_sender[*shard] = true;
            let (tx, rx) = futures::channel::oneshot::channel::<()>();
            it.queued = Some(tx);
            queued_rxs.push(rx);
        }
    }
    let results = per_shard(shards, items, move |sh, its: Vec<Item>| async move {
        let mut queued = Vec::with_capacity(its.len());
        let mut senders = Vec::new();
        for mut it in its {
            if let Some(tx) = it.queued.take() {
                senders.push(tx);
            }
            let Some(records) = it.records.filter(|r| !r.is_empty()) else {
                queued.push(Err((ec::CORRUPT_MESSAGE, "no records".to_string())));
                continue;
            };
            let Some(part) = sh.partition(&it.topic, it.partition).await else {
                queued.push(Err((ec::UNKNOWN_TOPIC_OR_PARTITION, String::new())));
                continue;
            };
            let Some(cfg) = sh.node.effective_config(&it.topic) else {
                queued.push(Err((ec::UNKNOWN_TOPIC_OR_PARTITION, String::new())));
                continue;
            };
            // A second handle on the same bytes (no copy), to count what was accepted.
            let counted = records.clone();
            let q = part.enqueue(records, &cfg, sh.cache_cap());
            if q.is_ok() {
                crate::metrics::produced(&it.topic, it.partition, &counted);
            }
            queued.push(q.map(|q| (part, q)));
        }
        for tx in senders {
            let _ = tx.send(());
        }
        let futs = queued.into_iter().map(|q| async move {
            let r = match q {
                Ok((part, q)) => part.complete(q, sync, window_us).await,
                Err(e) => Err(e),
            };
            match r {
                Ok(a) => (
                    ec::NONE,
                    a.base_offset,
                    a.log_append_time_ms,
                    a.log_start_offset,
                    None,
                ),
                Err((code, msg)) => (code, -1, -1, -1, (!msg.is_empty()).then_some(msg)),
            }
        });
        futures::future::join_all(futs).await
    });
    let all_queued = futures::future::join_all(queued_rxs);
    futures::pin_mut!(results);
    let results = match futures::future::select(all_queued, results).await {
        futures::future::Either::Left((_, results)) => {
            gate.release();
            results.await
        }
        futures::future::Either::Right((results, _)) => results,
    };
    if acks == 0 {
        return None;
    }
    let mut results = results.into_iter();
    let mut resp = ProduceResponse::default();
    for (name, parts) in shape {
        let mut tr = TopicProduceResponse::default();
        tr.name = super::util::tn(&name);
        for (index, pre) in parts {
            let (code, base, lat, lso, msg) = match pre {
                Some(o) => o,
                None => results
                    .next()
                    .unwrap_or((ec::UNKNOWN_SERVER_ERROR, -1, -1, -1, None)),
            };
            let mut pr = PartitionProduceResponse::default();
            pr.index = index;
            pr.error_code = code;
            pr.base_offset = base;
            pr.log_append_time_ms = lat;
            pr.log_start_offset = lso;
            pr.error_message = msg.map(|m| sb(&m));
            tr.partition_responses.push(pr);
        }
        resp.responses.push(tr);
    }
    Some(resp)
}
