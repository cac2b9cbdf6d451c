//! Produce: validate each partition's batches, append on the owning shard, answer per acks.

use bytes::Bytes;
use kafka_protocol::messages::produce_request::ProduceRequest;
use kafka_protocol::messages::produce_response::{
    BatchIndexAndErrorMessage, PartitionProduceResponse, ProduceResponse, TopicProduceResponse,
};

use kafka_protocol::messages::BrokerId;

use super::util::sb;
use crate::server::errors as ec;
use crate::server::ConnCtx;
use crate::shard::fanout::per_shard;

struct Item {
    topic: String,
    partition: i32,
    records: Option<Bytes>,
    /// Set on one item per shard: fired once that shard has queued all its batches.
    queued: Option<futures::channel::oneshot::Sender<()>>,
}

/// (error code, base offset, log append time, log start offset, error message, positions of
/// the records that made the batch fail: KIP-467 `record_errors`).
type Outcome = (i16, i64, i64, i64, Option<String>, Vec<i32>);

/// A partition's produce refused before it reached the log.
type Refusal = (i16, String, Vec<i32>);

/// Kafka's rule for compacted topics: every record needs a key. Returns the refusal of the
/// whole batch, naming the keyless records, or None. Batches that fail header validation are
/// left to `Partition::enqueue`, which reports them with their own error code.
fn refuse_keyless(
    records: &Bytes,
    topic: &str,
    partition: i32,
    max_batch_bytes: usize,
) -> Option<Refusal> {
    let mut infos = Vec::new();
    if crate::log::batch::validate_payload(records, max_batch_bytes, &mut infos).is_err() {
        return None;
    }
    match crate::log::compaction::keyless_records(records) {
        Ok(keyless) if keyless.is_empty() => None,
        Ok(keyless) => Some((
            ec::INVALID_RECORD,
            format!(
                "{} record(s) without a key refused: {topic}-{partition} is a compacted topic \
                 (cleanup.policy=compact) and every record needs a key",
                keyless.len()
            ),
            keyless,
        )),
        Err(e) => Some((ec::CORRUPT_MESSAGE, e, Vec::new())),
    }
}

pub async fn handle(
    ctx: &ConnCtx,
    version: i16,
    req: ProduceRequest,
    gate: &crate::server::OrderGate,
) -> Option<ProduceResponse> {
    let node = ctx.shard.node.clone();
    let acks = req.acks;
    let req_timeout_ms = req.timeout_ms;
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
                    Some((ec::INVALID_REQUIRED_ACKS, -1, -1, -1, None, Vec::new()))
                } else if txn {
                    Some((
                        ec::TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
                        -1,
                        -1,
                        -1,
                        Some("transactions are not supported".into()),
                        Vec::new(),
                    ))
                } else if topic
                    .map(|t| p.index < 0 || p.index >= t.partitions)
                    .unwrap_or(true)
                {
                    Some((ec::UNKNOWN_TOPIC_OR_PARTITION, -1, -1, -1, None, Vec::new()))
                } else if topic.is_some_and(|t| !node.leads(t, p.index)) {
                    Some((ec::NOT_LEADER_OR_FOLLOWER, -1, -1, -1, None, Vec::new()))
                } else if topic.map(|t| t.internal).unwrap_or(false) {
                    Some((
                        ec::INVALID_TOPIC_EXCEPTION,
                        -1,
                        -1,
                        -1,
                        Some("cannot produce to an internal topic".into()),
                        Vec::new(),
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
    let deadline = std::time::Instant::now()
        + std::time::Duration::from_millis(req_timeout_ms.clamp(0, 300_000) as u64);
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
                queued.push(Err((
                    ec::CORRUPT_MESSAGE,
                    "no records".to_string(),
                    Vec::new(),
                )));
                continue;
            };
            let Some(part) = sh.partition(&it.topic, it.partition).await else {
                queued.push(Err((
                    sh.node.not_served_code(&it.topic, it.partition),
                    String::new(),
                    Vec::new(),
                )));
                continue;
            };
            let Some(cfg) = sh.node.effective_config(&it.topic) else {
                queued.push(Err((
                    ec::UNKNOWN_TOPIC_OR_PARTITION,
                    String::new(),
                    Vec::new(),
                )));
                continue;
            };
            if cfg.compact {
                if let Some(refusal) =
                    refuse_keyless(&records, &it.topic, it.partition, cfg.max_message_bytes)
                {
                    queued.push(Err(refusal));
                    continue;
                }
            }
            let sync = sync || cfg.sync_every_write;
            if acks == -1 {
                if let Err((code, msg)) = part.check_min_isr(cfg.min_insync_replicas) {
                    queued.push(Err((code, msg, Vec::new())));
                    continue;
                }
            }
            let wait_isr = (acks == -1).then_some(cfg.min_insync_replicas);
            // A second handle on the same bytes (no copy), to count what was accepted.
            let counted = records.clone();
            let q = part.enqueue(records, &cfg, sh.cache_cap());
            if q.is_ok() {
                crate::metrics::produced(&it.topic, it.partition, &counted);
            }
            queued.push(
                q.map(|q| (part, q, sync, wait_isr))
                    .map_err(|(code, msg)| (code, msg, Vec::new())),
            );
        }
        for tx in senders {
            let _ = tx.send(());
        }
        let futs = queued.into_iter().map(|q| async move {
            let r = match q {
                Ok((part, q, sync, wait_isr)) => {
                    let done = part.complete(q, sync, window_us).await;
                    match (done, wait_isr) {
                        // acks=all on a replicated partition: the in-sync replicas have it too.
                        (Ok(a), Some(min_isr)) => part
                            .wait_replicated(a.end_offset, min_isr, deadline)
                            .await
                            .map(|_| a),
                        (r, _) => r,
                    }
                    .map_err(|(code, msg)| (code, msg, Vec::new()))
                }
                Err(e) => Err(e),
            };
            match r {
                Ok(a) => (
                    ec::NONE,
                    a.base_offset,
                    a.log_append_time_ms,
                    a.log_start_offset,
                    None,
                    Vec::new(),
                ),
                Err((code, msg, record_errors)) => (
                    code,
                    -1,
                    -1,
                    -1,
                    (!msg.is_empty()).then_some(msg),
                    record_errors,
                ),
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
            let (code, base, lat, lso, msg, record_errors) = match pre {
                Some(o) => o,
                None => results.next().unwrap_or((
                    ec::UNKNOWN_SERVER_ERROR,
                    -1,
                    -1,
                    -1,
                    None,
                    Vec::new(),
                )),
            };
            let mut pr = PartitionProduceResponse::default();
            pr.index = index;
            pr.error_code = code;
            pr.base_offset = base;
            pr.log_append_time_ms = lat;
            pr.log_start_offset = lso;
            pr.error_message = msg.map(|m| sb(&m));
            // Produce v8+ (KIP-467): which records made the batch fail; older versions have
            // only the error code, and the encoder leaves the field out.
            pr.record_errors = record_errors
                .into_iter()
                .map(|i| {
                    let mut e = BatchIndexAndErrorMessage::default();
                    e.batch_index = i;
                    e.batch_index_error_message =
                        Some(sb("record without a key on a compacted topic"));
                    e
                })
                .collect();
            if version >= 10 {
                if let Some(h) = super::util::leader_hint(&ctx.shard.node, code, &name, index) {
                    pr.current_leader.leader_id = BrokerId(h.leader);
                    pr.current_leader.leader_epoch = h.epoch;
                    if !resp.node_endpoints.iter().any(|e| e.node_id.0 == h.leader) {
                        let mut e =
                            kafka_protocol::messages::produce_response::NodeEndpoint::default();
                        e.node_id = BrokerId(h.leader);
                        e.host = sb(&h.host);
                        e.port = h.port;
                        e.rack = h.rack.as_deref().map(sb);
                        resp.node_endpoints.push(e);
                    }
                }
            }
            tr.partition_responses.push(pr);
        }
        resp.responses.push(tr);
    }
    Some(resp)
}
