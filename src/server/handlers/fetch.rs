//! Fetch: read from each partition's owning shard, long-poll up to max_wait_ms until min_bytes
//! have arrived. Sessionless (session id 0), which every client accepts (KIP-227).

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::fetch_request::FetchRequest;
#[cfg(test)]
use kafka_protocol::messages::fetch_response::FetchResponse;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::BrokerId;
use kafka_protocol::protocol::Encodable;

use super::util::tn;
use crate::server::errors as ec;
use crate::server::ConnCtx;
use crate::shard::fanout::per_shard;

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
    records: Vec<Bytes>,
}

impl Got {
    fn bytes(&self) -> usize {
        self.records.iter().map(|b| b.len()).sum()
    }
}

/// Upper bound on fetch rounds in one request: each round follows a wake-up or the deadline.
const FETCH_ROUNDS_MAX: usize = 64;

/// Answers a fetch as the encoded response body, in chunks: the record bytes are the stored
/// batches themselves (slices of the cache or of one disk read), never copied into the
/// response buffer.
pub async fn handle(ctx: &ConnCtx, version: i16, req: FetchRequest) -> Vec<Bytes> {
    let node = ctx.shard.node.clone();
    // Resolve topics (by id from v13) and the per-partition requests.
    let mut layout: Vec<(String, uuid::Uuid, Vec<(i32, Option<i16>)>)> = Vec::new();
    let mut wants: Vec<(usize, Want)> = Vec::new();
    {
        let img = node.image();
        for t in &req.topics {
            let meta = if version >= 13 {
                img.topic_by_id(&t.topic_id)
            } else {
                img.topic(t.topic.0.as_str())
            };
            let name = meta
                .map(|m| m.name.clone())
                .unwrap_or_else(|| t.topic.0.to_string());
            let mut parts = Vec::new();
            for p in &t.partitions {
                let pre = match meta {
                    None if version >= 13 => Some(ec::UNKNOWN_TOPIC_ID),
                    None => Some(ec::UNKNOWN_TOPIC_OR_PARTITION),
                    Some(m) if p.partition < 0 || p.partition >= m.partitions => {
                        Some(ec::UNKNOWN_TOPIC_OR_PARTITION)
                    }
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
    // A fetch asking for no limit, or for more than the broker serves, gets the broker's cap
    // (fetch.max.bytes): a response is assembled in memory before it is written.
    let cap = node.tuning.memory.fetch_bytes_max;
    let max_bytes = if req.max_bytes <= 0 {
        cap
    } else {
        (req.max_bytes as usize).min(cap)
    };
    let min_bytes = req.min_bytes.max(0) as usize;
    let deadline = Instant::now() + Duration::from_millis(req.max_wait_ms.clamp(0, 300_000) as u64);
    let shards = node.shards();
    let mut got: Vec<Got> = Vec::new();
    for _ in 0..FETCH_ROUNDS_MAX {
        got = read_round(shards, wants.clone(), max_bytes).await;
        let total: usize = got.iter().map(|g| g.bytes()).sum();
        let any_error = got.iter().any(|g| g.code != ec::NONE);
        if total >= min_bytes.max(1) || any_error || wants.is_empty() || Instant::now() >= deadline
        {
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
        let n = g.bytes();
        if n == 0 {
            continue;
        }
        if !first && n > budget {
            g.records.clear();
            continue;
        }
        budget = budget.saturating_sub(n);
        first = false;
    }
    let mut got = got.into_iter();
    let mut topics = Vec::with_capacity(layout.len());
    for (name, id, parts) in layout {
        let mut tr = FetchableTopicResponse::default();
        tr.topic = tn(&name);
        tr.topic_id = id;
        let mut records_of = Vec::with_capacity(parts.len());
        for (index, pre) in parts {
            let mut pd = PartitionData::default();
            pd.partition_index = index;
            pd.preferred_read_replica = BrokerId(-1);
            match pre {
                Some(code) => {
                    crate::metrics::error(kafka_protocol::messages::ApiKey::Fetch as i16, code);
                    pd.error_code = code;
                    pd.high_watermark = -1;
                    pd.last_stable_offset = -1;
                    pd.log_start_offset = -1;
                    records_of.push(Vec::new());
                }
                None => {
                    let g = got.next().unwrap_or(Got {
                        code: ec::UNKNOWN_SERVER_ERROR,
                        hwm: -1,
                        log_start: -1,
                        records: Vec::new(),
                    });
                    crate::metrics::fetched(&name, index, &g.records);
                    crate::metrics::error(kafka_protocol::messages::ApiKey::Fetch as i16, g.code);
                    pd.error_code = g.code;
                    pd.high_watermark = g.hwm;
                    pd.last_stable_offset = g.hwm;
                    pd.log_start_offset = g.log_start;
                    records_of.push(g.records);
                }
            }
            pd.records = Some(Bytes::new());
            if req.isolation_level == 1 {
                pd.aborted_transactions = Some(Vec::new());
            }
            tr.partitions.push(pd);
        }
        topics.push((tr, records_of));
    }
    encode_response(version, topics)
}

fn put_uvarint(b: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        b.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    b.put_u8(v as u8);
}

fn put_array_len(b: &mut BytesMut, flexible: bool, n: usize) {
    if flexible {
        put_uvarint(b, n as u64 + 1);
    } else {
        b.put_i32(n as i32);
    }
}

/// Encodes the FetchResponse body by hand around kafka-protocol's encoding of each partition's
/// fixed fields, splicing the record chunks in by reference. Falls back to kafka-protocol's own
/// encoding of a partition (one copy) if its layout is not the one expected.
fn encode_response(
    version: i16,
    topics: Vec<(FetchableTopicResponse, Vec<Vec<Bytes>>)>,
) -> Vec<Bytes> {
    let flexible = version >= 12;
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut head = BytesMut::with_capacity(256);
    head.put_i32(0); // throttle_time_ms
    if version >= 7 {
        head.put_i16(0); // error_code
        head.put_i32(0); // session_id: sessionless
    }
    put_array_len(&mut head, flexible, topics.len());
    for (tr, records_of) in topics {
        if version >= 13 {
            head.put_slice(tr.topic_id.as_bytes());
        } else {
            let name = tr.topic.0.as_bytes();
            if flexible {
                put_uvarint(&mut head, name.len() as u64 + 1);
            } else {
                head.put_i16(name.len() as i16);
            }
            head.put_slice(name);
        }
        put_array_len(&mut head, flexible, tr.partitions.len());
        for (mut pd, recs) in tr.partitions.into_iter().zip(records_of) {
            let at = head.len();
            let ok = pd.encode(&mut head, version).is_ok();
            // The empty records field and, when flexible, an empty tagged-field section.
            let tail: &[u8] = if flexible { &[1, 0] } else { &[0, 0, 0, 0] };
            if ok && head.len() >= at + tail.len() && &head[head.len() - tail.len()..] == tail {
                head.truncate(head.len() - tail.len());
                let n: usize = recs.iter().map(|r| r.len()).sum();
                if flexible {
                    put_uvarint(&mut head, n as u64 + 1);
                } else {
                    head.put_i32(n as i32);
                }
                for r in recs {
                    if r.len() < 4096 {
                        head.put_slice(&r);
                    } else {
                        chunks.push(head.split().freeze());
                        chunks.push(r);
                    }
                }
                if flexible {
                    head.put_u8(0);
                }
            } else {
                head.truncate(at);
                let mut all = BytesMut::new();
                for r in &recs {
                    all.put_slice(r);
                }
                pd.records = Some(all.freeze());
                if let Err(e) = pd.encode(&mut head, version) {
                    tracing::error!("cannot encode fetch partition: {e}");
                }
            }
        }
        if flexible {
            head.put_u8(0); // topic tagged fields
        }
    }
    if flexible {
        head.put_u8(0); // response tagged fields
    }
    chunks.push(head.freeze());
    chunks
}

async fn read_round(shards: usize, wants: Vec<(usize, Want)>, max_bytes: usize) -> Vec<Got> {
    per_shard(shards, wants, move |sh, ws: Vec<Want>| async move {
        let mut out = Vec::with_capacity(ws.len());
        // What this shard has read for the response: once it reaches the response's limit,
        // the rest of its partitions would be dropped from the response anyway (it keeps
        // partitions in request order within max_bytes), so they are not read at all.
        let mut read_bytes = 0usize;
        for w in ws {
            let Some(p) = sh.partition(&w.topic, w.partition).await else {
                out.push(Got {
                    code: ec::UNKNOWN_TOPIC_OR_PARTITION,
                    hwm: -1,
                    log_start: -1,
                    records: Vec::new(),
                });
                continue;
            };
            let hwm = p.high_watermark();
            let log_start = p.log.log_start_offset() as i64;
            let limit = w.max_bytes.min(max_bytes);
            if read_bytes >= max_bytes {
                out.push(Got {
                    code: ec::NONE,
                    hwm,
                    log_start,
                    records: Vec::new(),
                });
                continue;
            }
            match p.read(w.offset, limit).await {
                Ok(records) => {
                    read_bytes += records.iter().map(|r| r.len()).sum::<usize>();
                    out.push(Got {
                        code: ec::NONE,
                        hwm,
                        log_start,
                        records,
                    })
                }
                Err(code) => {
                    if code == ec::OFFSET_OUT_OF_RANGE {
                        tracing::debug!(
                            "fetch {}-{} at {} out of range [{log_start}, {hwm}]",
                            w.topic,
                            w.partition,
                            w.offset
                        );
                    }
                    out.push(Got {
                        code,
                        hwm,
                        log_start,
                        records: Vec::new(),
                    })
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
        waits.push(Box::pin(crate::shard::invoke(
            shard,
            move |sh| async move {
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
            },
        )));
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

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::protocol::Decodable;

    /// The hand-assembled body decodes, with kafka-protocol, to the same response.
    #[test]
    fn spliced_encoding_matches_kafka_protocol() {
        for version in [4i16, 7, 11, 12, 13, 16] {
            let mut tr = FetchableTopicResponse::default();
            tr.topic = tn("t");
            tr.topic_id = uuid::Uuid::from_u128(7);
            let mut recs = Vec::new();
            for p in 0..3 {
                let mut pd = PartitionData::default();
                pd.partition_index = p;
                pd.high_watermark = 10 + p as i64;
                pd.records = Some(Bytes::new());
                tr.partitions.push(pd);
                recs.push(vec![
                    Bytes::from(vec![p as u8; 10_000]),
                    Bytes::from(vec![9u8; 100]),
                ]);
            }
            let chunks = encode_response(version, vec![(tr, recs)]);
            let mut body = BytesMut::new();
            for c in chunks {
                body.put_slice(&c);
            }
            let mut b = body.freeze();
            let r = FetchResponse::decode(&mut b, version).unwrap();
            assert_eq!(b.len(), 0, "v{version}: whole body consumed");
            let parts = &r.responses[0].partitions;
            assert_eq!(parts.len(), 3);
            for (p, pd) in parts.iter().enumerate() {
                assert_eq!(pd.high_watermark, 10 + p as i64);
                let rec = pd.records.as_ref().unwrap();
                assert_eq!(rec.len(), 10_100);
                assert_eq!(rec[0], p as u8);
                assert_eq!(rec[10_099], 9);
            }
        }
    }
}
