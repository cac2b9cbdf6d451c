//! Fetch: read from each partition's owning shard, long-poll up to max_wait_ms until min_bytes
//! have arrived. Sessionless (session id 0), which every client accepts (KIP-227).

use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::fetch_request::FetchRequest;
use kafka_protocol::messages::fetch_response::{FetchResponse, FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::BrokerId;

use super::util::{per_shard, tn};
use crate::server::errors as ec;
use crate::server::ConnCtx;

#[derive(Clone)]
struct Want {
    topic: String,
    partition: i32,
    offset: i64,
    max_bytes: usize,
}

#[derive(Clone)]
struct Got {
    code: i16,
    hwm: i64,
    log_start: i64,
    records: Bytes,
}

/// Upper bound on fetch rounds in one request: each round follows a wake-up or the deadline.
const FETCH_ROUNDS_MAX: usize = 64;

pub async fn handle(ctx: &ConnCtx, version: i16, req: FetchRequest) -> FetchResponse {
    let node = ctx.shard.node.clone();
    let mut resp = FetchResponse::default();
    // Resolve topics (by id from v13) and the per-partition requests.
    let mut layout: Vec<(String, uuid::Uuid, Vec<(i32, Option<i16>)>)> = Vec::new();
    let mut wants: Vec<(usize, Want)> = Vec::new();
    {
        let img = node.image();
        for t in &req.topics {
            let meta = if version >= 13 { img.topic_by_id(&t.topic_id) } else { img.topic(t.topic.0.as_str()) };
            let name = meta.map(|m| m.name.clone()).unwrap_or_else(|| t.topic.0.to_string());
            let mut parts = Vec::new();
            for p in &t.partitions {
                let pre = match meta {
                    None if version >= 13 => Some(ec::UNKNOWN_TOPIC_ID),
                    None => Some(ec::UNKNOWN_TOPIC_OR_PARTITION),
                    Some(m) if p.partition < 0 || p.partition >= m.partitions => Some(ec::UNKNOWN_TOPIC_OR_PARTITION),
                    Some(_) if p.partition_max_bytes < 0 => Some(ec::INVALID_FETCH_SIZE),
                    Some(_) => {
                        wants.push((
                            node.shard_of(&name, p.partition),
                            Want {
                                topic: name.clone(),
                                partition: p.partition,
                                offset: p.fetch_offset,
                                max_bytes: p.partition_max_bytes.max(0) as usize,
                            },
                        ));
                        None
                    }
                };
                parts.push((p.partition, pre));
            }
            layout.push((name, t.topic_id, parts));
        }
    }
    let max_bytes = if req.max_bytes <= 0 { i32::MAX as usize } else { req.max_bytes as usize };
    let min_bytes = req.min_bytes.max(0) as usize;
    let deadline = Instant::now() + Duration::from_millis(req.max_wait_ms.clamp(0, 300_000) as u64);
    let shards = node.shards();
    let mut got: Vec<Got> = Vec::new();
    for _ in 0..FETCH_ROUNDS_MAX {
        got = read_round(shards, wants.clone(), max_bytes).await;
        let total: usize = got.iter().map(|g| g.records.len()).sum();
        let any_error = got.iter().any(|g| g.code != ec::NONE);
        if total >= min_bytes.max(1) || any_error || wants.is_empty() || Instant::now() >= deadline {
            break;
        }
        wait_for_data(shards, &wants, &got, deadline).await;
        if Instant::now() >= deadline {
            got = read_round(shards, wants.clone(), max_bytes).await;
            break;
        }
    }
    // Response-level max_bytes: keep partitions in request order until the budget is used,
    // but always the first non-empty one (KIP-74).
    let mut budget = max_bytes;
    let mut first = true;
    for g in got.iter_mut() {
        if g.records.is_empty() {
            continue;
        }
        if !first && g.records.len() > budget {
            g.records = Bytes::new();
            continue;
        }
        budget = budget.saturating_sub(g.records.len());
        first = false;
    }
    let mut got = got.into_iter();
    for (name, id, parts) in layout {
        let mut tr = FetchableTopicResponse::default();
        tr.topic = tn(&name);
        tr.topic_id = id;
        for (index, pre) in parts {
            let mut pd = PartitionData::default();
            pd.partition_index = index;
            pd.preferred_read_replica = BrokerId(-1);
            match pre {
                Some(code) => {
                    pd.error_code = code;
                    pd.high_watermark = -1;
                    pd.last_stable_offset = -1;
                    pd.log_start_offset = -1;
                    pd.records = Some(Bytes::new());
                }
                None => {
                    let g = got.next().unwrap_or(Got { code: ec::UNKNOWN_SERVER_ERROR, hwm: -1, log_start: -1, records: Bytes::new() });
                    pd.error_code = g.code;
                    pd.high_watermark = g.hwm;
                    pd.last_stable_offset = g.hwm;
                    pd.log_start_offset = g.log_start;
                    pd.records = Some(g.records);
                }
            }
            if req.isolation_level == 1 {
                pd.aborted_transactions = Some(Vec::new());
            }
            tr.partitions.push(pd);
        }
        resp.responses.push(tr);
    }
    resp
}

async fn read_round(shards: usize, wants: Vec<(usize, Want)>, max_bytes: usize) -> Vec<Got> {
    per_shard(shards, wants, move |sh, ws: Vec<Want>| async move {
        let mut out = Vec::with_capacity(ws.len());
        for w in ws {
            let Some(p) = sh.partition(&w.topic, w.partition).await else {
                out.push(Got { code: ec::UNKNOWN_TOPIC_OR_PARTITION, hwm: -1, log_start: -1, records: Bytes::new() });
                continue;
            };
            let hwm = p.high_watermark();
            let log_start = p.log.log_start_offset() as i64;
            let limit = w.max_bytes.min(max_bytes);
            match p.read(w.offset, limit).await {
                Ok(records) => out.push(Got { code: ec::NONE, hwm, log_start, records }),
                Err(code) => {
                    if code == ec::OFFSET_OUT_OF_RANGE {
                        tracing::debug!("fetch {}-{} at {} out of range [{log_start}, {hwm}]", w.topic, w.partition, w.offset);
                    }
                    out.push(Got { code, hwm, log_start, records: Bytes::new() })
                }
            }
        }
        out
    })
    .await
}

/// Waits until any wanted partition gets data past what the last round saw, or the deadline.
async fn wait_for_data(shards: usize, wants: &[(usize, Want)], got: &[Got], deadline: Instant) {
    let mut buckets: Vec<Vec<(String, i32, i64)>> = (0..shards).map(|_| Vec::new()).collect();
    for ((s, w), g) in wants.iter().zip(got.iter()) {
        buckets[(*s).min(shards - 1)].push((w.topic.clone(), w.partition, g.hwm.max(w.offset)));
    }
    let mut waits = Vec::new();
    for (shard, its) in buckets.into_iter().enumerate() {
        if its.is_empty() {
            continue;
        }
        waits.push(Box::pin(crate::shard::invoke(shard, move |sh| async move {
            let mut rxs = Vec::new();
            for (t, p, seen) in &its {
                if let Some(part) = sh.partition(t, *p).await {
                    if part.high_watermark() > *seen {
                        return;
                    }
                    rxs.push(part.wait_for_data());
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let timer = glommio::timer::sleep(left);
            futures::pin_mut!(timer);
            if rxs.is_empty() {
                timer.await;
            } else {
                let _ = futures::future::select(futures::future::select_all(rxs), timer).await;
            }
        })));
    }
    if waits.is_empty() {
        return;
    }
    // Any shard's wake-up ends the wait; the others run out at the deadline on their own.
    let left = deadline.saturating_duration_since(Instant::now());
    let timer = glommio::timer::sleep(left);
    futures::pin_mut!(timer);
    let _ = futures::future::select(futures::future::select_all(waits), timer).await;
}
