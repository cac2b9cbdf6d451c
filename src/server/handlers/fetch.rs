//! Fetch: read from each partition's owning shard, long-poll up to max_wait_ms until min_bytes
//! have arrived. Incremental fetch sessions (KIP-227) live in `server::fetch_session`.

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchRequest};
#[cfg(test)]
use kafka_protocol::messages::fetch_response::FetchResponse;
use kafka_protocol::messages::fetch_response::{
    FetchableTopicResponse, NodeEndpoint, PartitionData,
};
use kafka_protocol::messages::BrokerId;
use kafka_protocol::protocol::Encodable;

use std::sync::Arc;

use super::util::tn;
use crate::server::errors as ec;
use crate::server::fetch_session::{self, Plan};
use crate::server::ConnCtx;
use crate::shard::fanout::per_shard;
use crate::shard::Shard;

#[derive(Clone)]
struct Want {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    max_bytes: usize,
    /// Read from this node's follower replica (KIP-392: a consumer sent here by the leader).
    follower: bool,
    /// The consumer's rack (Fetch v11 RackId), when the leader may send it to a replica there.
    client_rack: Option<Arc<str>>,
}

#[derive(Clone)]
struct Got {
    code: i16,
    hwm: i64,
    log_start: i64,
    records: Vec<Bytes>,
    /// KIP-392: the replica the consumer should fetch from instead (-1: none).
    preferred: i32,
}

impl Got {
    fn error(code: i16) -> Got {
        Got {
            code,
            hwm: -1,
            log_start: -1,
            records: Vec::new(),
            preferred: -1,
        }
    }

    fn bytes(&self) -> usize {
        self.records.iter().map(|b| b.len()).sum()
    }
}

/// One partition of the response: from the request, or from the fetch session.
struct Entry {
    topic: Arc<str>,
    topic_id: uuid::Uuid,
    partition: i32,
    fetch_offset: i64,
    max_bytes: i32,
    /// An error found before reading (unknown topic or partition, bad size).
    pre: Option<i16>,
    /// Served by this node's follower replica (KIP-392, Fetch v11+).
    follower: bool,
    /// What the session last told the client (incremental fetches only).
    told: Option<(i64, i64)>,
}

/// KIP-392: a consumer's fetch (v11+) may be served by a follower replica on this node, up to
/// its high watermark, as Kafka's followers serve consumers that carry client metadata.
fn follows(
    node: &crate::cluster::node::Node,
    version: i16,
    m: &crate::cluster::metadata::TopicMeta,
    partition: i32,
) -> bool {
    version >= 11
        && usize::try_from(partition)
            .ok()
            .and_then(|p| m.assignments.get(p))
            .is_some_and(|a| a.replicas.contains(&node.node_id) && a.replicas.len() > 1)
}

/// Whether the leader sends consumers to a replica in their own rack (Kafka's
/// `replica.selector.class`, `RackAwareReplicaSelector`).
fn rack_selector(node: &crate::cluster::node::Node) -> bool {
    let s = node.tuning.node.replica_selector.as_str();
    s == "rack" || s.ends_with("RackAwareReplicaSelector")
}

/// Upper bound on fetch rounds in one request: each round follows a wake-up or the deadline.
const FETCH_ROUNDS_MAX: usize = 64;

/// A fetch without a session that found every partition it names at its end, and nothing
/// changed while it waited: its answer and what vouches for it. A client without fetch
/// sessions (librdkafka) asks again for the same partitions at the same offsets every
/// `max_wait_ms`, each time starting its list one partition further on. While the shards
/// journal no change of those partitions and the image is the same, the answer is the same,
/// so it is answered from here (no partition lookups, no encoding): an idle consumer of thousands of
/// partitions costs decoding its request, a comparison with the last one and a wait on the
/// journals. One per connection, held until its next fetch.
pub struct IdleFetch {
    version: i16,
    /// The request without its partitions.
    shape: FetchRequest,
    /// Its partitions, in its order.
    entries: Vec<(FetchTopicKey, FetchPartition)>,
    image: std::sync::Weak<crate::cluster::metadata::MetadataImage>,
    /// The shards' journal counts through which nothing changed for `keys`.
    marks: Vec<(usize, u64)>,
    keys: std::rc::Rc<std::collections::HashSet<fetch_session::Key>>,
    /// The encoded response body (partitions in the order of `entries`).
    body: Vec<Bytes>,
}

/// A connection's `IdleFetch`, if its last fetch was one.
pub type IdleSlot = std::rc::Rc<std::cell::RefCell<Option<IdleFetch>>>;

/// How a request names a topic: by name (before v13) or id.
type FetchTopicKey = (kafka_protocol::messages::TopicName, uuid::Uuid);

impl IdleFetch {
    /// Whether `req` asks what this one asked: the same fields and the same partitions in
    /// the same order, or that order started further on (as librdkafka rotates it).
    fn asks_as(&self, version: i16, req: &mut FetchRequest) -> bool {
        if version != self.version {
            return false;
        }
        // Every field but the partitions (`shape` holds none, nor forgotten topics).
        let topics = std::mem::take(&mut req.topics);
        let same_shape = *req == self.shape;
        req.topics = topics;
        if !same_shape {
            return false;
        }
        let req = &*req;
        let asked = req.topics.iter().flat_map(|t| {
            t.partitions
                .iter()
                .map(move |p| (&t.topic, &t.topic_id, p, &t.unknown_tagged_fields))
        });
        let n = self.entries.len();
        if asked.clone().count() != n || n == 0 {
            return false;
        }
        let eq =
            |(t, id, p, tagged): (_, _, &FetchPartition, &std::collections::BTreeMap<_, _>),
             e: &(FetchTopicKey, FetchPartition)| {
                tagged.is_empty() && p == &e.1 && id == &e.0 .1 && t == &e.0 .0
            };
        let Some(first) = asked.clone().next() else {
            return false;
        };
        let Some(k) = self.entries.iter().position(|e| eq(first, e)) else {
            return false;
        };
        asked
            .enumerate()
            .all(|(i, a)| eq(a, &self.entries[(k + i) % n]))
    }
}

/// The answer to `req` if it asks what the connection's idle fetch asked and nothing changed
/// for its partitions until its deadline: Ok(the body). Err(deadline) when something did (or
/// may have): the request then takes the full path, with what is left of its wait. None when
/// it is not that request.
async fn answer_idle(
    ctx: &ConnCtx,
    version: i16,
    req: &mut FetchRequest,
    deadline: Instant,
) -> Option<Result<Vec<Bytes>, Instant>> {
    let (image, mut marks, keys, body) = {
        let s = ctx.idle_fetch.borrow();
        let m = s.as_ref()?;
        if !m.asks_as(version, req) {
            return None;
        }
        (
            m.image.clone(),
            m.marks.clone(),
            m.keys.clone(),
            m.body.clone(),
        )
    };
    let node = &ctx.shard.node;
    let holds = |k: &fetch_session::Key| keys.contains(k);
    let changed = changed_where(node, Vec::new(), &image, &mut marks, deadline, holds).await;
    // The image is looked at before each wait; at the deadline, once more.
    let same_image = std::ptr::eq(image.as_ptr(), Arc::as_ptr(&node.image()));
    match changed {
        Some(k) if k.is_empty() && same_image => {
            // Unchanged through these marks: the next repeat need not look before them.
            if let Some(m) = ctx.idle_fetch.borrow_mut().as_mut() {
                if std::rc::Rc::ptr_eq(&m.keys, &keys) {
                    m.marks = marks;
                }
            }
            crate::metrics::idle_fetch_repeat();
            Some(Ok(body))
        }
        _ => {
            ctx.idle_fetch.borrow_mut().take();
            Some(Err(deadline))
        }
    }
}

/// The partitions a request names, resolved against the metadata image.
fn named_entries(
    node: &crate::cluster::node::Node,
    version: i16,
    req: &FetchRequest,
) -> Vec<Entry> {
    let img = node.image();
    let mut out = Vec::new();
    for t in &req.topics {
        let meta = if version >= 13 {
            img.topic_by_id(&t.topic_id)
        } else {
            img.topic(t.topic.0.as_str())
        };
        let name: Arc<str> = Arc::from(meta.map(|m| m.name.as_str()).unwrap_or(t.topic.0.as_str()));
        for p in &t.partitions {
            let pre = match meta {
                None if version >= 13 => Some(ec::UNKNOWN_TOPIC_ID),
                None => Some(ec::UNKNOWN_TOPIC_OR_PARTITION),
                Some(m) if p.partition < 0 || p.partition >= m.partitions => {
                    Some(ec::UNKNOWN_TOPIC_OR_PARTITION)
                }
                Some(m)
                    if !node.leads(m, p.partition) && !follows(node, version, m, p.partition) =>
                {
                    Some(ec::NOT_LEADER_OR_FOLLOWER)
                }
                Some(m)
                    if version >= 9
                        && m.epoch_mismatch(p.partition, p.current_leader_epoch)
                            .is_some() =>
                {
                    m.epoch_mismatch(p.partition, p.current_leader_epoch)
                }
                Some(_) if p.partition_max_bytes < 0 => Some(ec::INVALID_FETCH_SIZE),
                Some(_) => None,
            };
            out.push(Entry {
                topic: name.clone(),
                topic_id: t.topic_id,
                partition: p.partition,
                fetch_offset: p.fetch_offset,
                max_bytes: p.partition_max_bytes,
                pre,
                follower: meta.is_some_and(|m| !node.leads(m, p.partition)),
                told: None,
            });
        }
    }
    out
}

/// The partitions an incremental fetch reads: the session's, checked against the image again
/// (a topic may have gone since).
fn session_entries(
    node: &crate::cluster::node::Node,
    version: i16,
    parts: Vec<(fetch_session::Key, fetch_session::Cached)>,
) -> Vec<Entry> {
    let img = node.image();
    parts
        .into_iter()
        .map(|((topic, partition), c)| {
            let meta = img.topic(&topic);
            let pre = match meta {
                None if version >= 13 => Some(ec::UNKNOWN_TOPIC_ID),
                None => Some(ec::UNKNOWN_TOPIC_OR_PARTITION),
                Some(m) if partition < 0 || partition >= m.partitions => {
                    Some(ec::UNKNOWN_TOPIC_OR_PARTITION)
                }
                Some(m) if !node.leads(m, partition) && !follows(node, version, m, partition) => {
                    Some(ec::NOT_LEADER_OR_FOLLOWER)
                }
                Some(_) if c.max_bytes < 0 => Some(ec::INVALID_FETCH_SIZE),
                Some(_) => None,
            };
            let follower = meta.is_some_and(|m| !node.leads(m, partition));
            Entry {
                follower,
                topic,
                topic_id: c.topic_id,
                partition,
                fetch_offset: c.fetch_offset,
                max_bytes: c.max_bytes,
                pre,
                told: Some((c.high_watermark, c.log_start_offset)),
            }
        })
        .collect()
}

/// The partitions a request asks the session to forget, by name.
fn forgotten(
    node: &crate::cluster::node::Node,
    version: i16,
    req: &FetchRequest,
) -> Vec<fetch_session::Key> {
    let img = node.image();
    let mut out = Vec::new();
    for f in &req.forgotten_topics_data {
        let name: Option<Arc<str>> = if version >= 13 {
            img.topic_by_id(&f.topic_id)
                .map(|m| Arc::from(m.name.as_str()))
        } else {
            Some(Arc::from(f.topic.0.as_str()))
        };
        if let Some(name) = name {
            out.extend(f.partitions.iter().map(|p| (name.clone(), *p)));
        }
    }
    out
}

/// Answers a fetch as the encoded response body, in chunks: the record bytes are the stored
/// batches themselves (slices of the cache or of one disk read), never copied into the
/// response buffer. Fetch sessions (KIP-227) from version 7.
pub async fn handle(ctx: &ConnCtx, version: i16, mut req: FetchRequest) -> Vec<Bytes> {
    let node = ctx.shard.node.clone();
    if node.cluster.is_some() && crate::server::replication::replica_id(version, &req) >= 0 {
        return crate::server::replication::serve_follower(&ctx.shard, version, req).await;
    }
    let now = Instant::now();
    let mut deadline = now + Duration::from_millis(req.max_wait_ms.clamp(0, 300_000) as u64);
    // A repeat of the connection's idle fetch (see IdleFetch). One that saw a change goes on
    // with what is left of its wait.
    let sessionless = version < 7 || (req.session_id == 0 && req.session_epoch == -1);
    if sessionless && req.replica_id.0 < 0 {
        match answer_idle(ctx, version, &mut req, deadline).await {
            Some(Ok(body)) => return body,
            Some(Err(d)) => deadline = d,
            None => {}
        }
    }
    let (session_id, epoch) = if version >= 7 {
        (req.session_id, req.session_epoch)
    } else {
        (0, fetch_session::FINAL_EPOCH)
    };
    // The image the partitions are resolved against: a session settled under it stays
    // settled only while it is current.
    let image = node.image().clone();
    let named = named_entries(&node, version, &req);
    let plan = if version >= 7 {
        let for_session = named
            .iter()
            .map(|e| fetch_session::Named {
                key: (e.topic.clone(), e.partition),
                topic_id: e.topic_id,
                fetch_offset: e.fetch_offset,
                max_bytes: e.max_bytes,
            })
            .collect();
        let gone = forgotten(&node, version, &req);
        fetch_session::with(|c| c.plan(session_id, epoch, for_session, gone, now))
    } else {
        Plan::Sessionless
    };
    let opening = plan == Plan::Open;
    ctx.idle_fetch.borrow_mut().take();
    // A settled session's fetch looks only at the partitions that changed (or were named):
    // those are read once and answered, with the marks proving the rest unchanged.
    let mut carried: Option<Vec<(usize, u64)>> = None;
    let (entries, incremental_id) = match plan {
        Plan::Error(code) => {
            crate::metrics::error(kafka_protocol::messages::ApiKey::Fetch as i16, code);
            return encode_response(version, code, 0, Vec::new(), &[]);
        }
        Plan::Sessionless | Plan::Open => (named, None),
        Plan::Incremental { id, partitions } => {
            (session_entries(&node, version, partitions), Some(id))
        }
        Plan::Settled { id, named, settled } => {
            let mut look: Vec<fetch_session::Key> = named
                .into_iter()
                .chain(settled.pending.iter().cloned())
                .collect();
            let mut marks = settled.marks.clone();
            // Bounded by the deadline: each pass follows a change journaled on a session's
            // shard. A fetch asking for more than one byte takes the full path, which counts
            // bytes across waits.
            let keys = if req.min_bytes > 1 {
                None
            } else {
                loop {
                    let holds = |k: &fetch_session::Key| fetch_session::with(|c| c.holds(id, k));
                    match changed_where(&node, look, &settled.image, &mut marks, deadline, holds)
                        .await
                    {
                        None => break None,
                        Some(keys) => {
                            let parts = fetch_session::with(|c| c.partitions_of(id, Some(&keys)));
                            if keys.is_empty()
                                || Instant::now() >= deadline
                                || has_news(&node, parts).await
                            {
                                break Some(keys);
                            }
                            // Changed, but nothing to tell (a repeated wake, a position moved
                            // to the end): still settled, wait on.
                            look = Vec::new();
                        }
                    }
                }
            };
            if keys.is_some() {
                carried = Some(marks);
            }
            let parts = fetch_session::with(|c| c.partitions_of(id, keys.as_deref()));
            (session_entries(&node, version, parts), Some(id))
        }
    };
    let in_session = opening || incremental_id.is_some();
    let client_rack: Option<Arc<str>> = (version >= 11
        && !req.rack_id.is_empty()
        && node.cluster.is_some()
        && rack_selector(&node))
    .then(|| Arc::from(req.rack_id.as_str()));
    let wants: Vec<(usize, Want)> = entries
        .iter()
        .filter(|e| e.pre.is_none())
        .map(|e| {
            (
                node.shard_of(&e.topic, e.partition),
                Want {
                    topic: e.topic.clone(),
                    partition: e.partition,
                    offset: e.fetch_offset,
                    max_bytes: e.max_bytes.max(0) as usize,
                    follower: e.follower,
                    client_rack: client_rack.clone(),
                },
            )
        })
        .collect();
    // A fetch asking for no limit, or for more than the broker serves, gets the broker's cap
    // (fetch.max.bytes): a response is assembled in memory before it is written.
    let cap = node.tuning.memory.fetch_bytes_max;
    let max_bytes = if req.max_bytes <= 0 {
        cap
    } else {
        (req.max_bytes as usize).min(cap)
    };
    let min_bytes = req.min_bytes.max(0) as usize;
    let shards = node.shards();
    let mut got: Vec<Got> = Vec::new();
    // Where each shard's change journal stood before the last round read its partitions.
    let mut marks: Vec<(usize, u64)> = Vec::new();
    // Every partition at its end through the whole wait, and nothing changed (see IdleFetch).
    let mut idle = false;
    for _ in 0..FETCH_ROUNDS_MAX {
        match carried.as_mut() {
            // Shards of partitions named for the first time need marks too.
            Some(carried) => journal_marks(&wants, carried).await,
            None => {
                marks.clear();
                journal_marks(&wants, &mut marks).await;
            }
        }
        got = read_round(shards, wants.clone(), max_bytes).await;
        let total: usize = got.iter().map(|g| g.bytes()).sum();
        let any_error = got.iter().any(|g| g.code != ec::NONE || g.preferred >= 0);
        // A settled session's changed partitions are answered at once: its wait for news was
        // the journal's.
        if total >= min_bytes.max(1)
            || any_error
            || wants.is_empty()
            || carried.is_some()
            || Instant::now() >= deadline
        {
            break;
        }
        let woken = wait_for_data(shards, &wants, &got, deadline).await;
        if !woken || Instant::now() >= deadline {
            // The last round's answers stand if nothing a consumer sees changed on these
            // shards since (no high watermark or log start moved, the same image): an idle
            // long-poll over thousands of partitions looks at each of them once, not twice.
            let before = std::mem::take(&mut marks);
            journal_marks(&wants, &mut marks).await;
            let unchanged = before == marks
                && client_rack.is_none()
                && std::ptr::eq(Arc::as_ptr(&image), Arc::as_ptr(&node.image()));
            if !unchanged {
                got = read_round(shards, wants.clone(), max_bytes).await;
            }
            idle = unchanged
                && sessionless
                && req.forgotten_topics_data.is_empty()
                && req
                    .topics
                    .iter()
                    .all(|t| t.unknown_tagged_fields.is_empty())
                && entries.iter().all(|e| e.pre.is_none() && !e.follower)
                && got
                    .iter()
                    .all(|g| g.code == ec::NONE && g.records.is_empty() && g.preferred < 0);
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
    // Each entry's answer, in entry order.
    let mut got = got.into_iter();
    let answers: Vec<Got> = entries
        .iter()
        .map(|e| match e.pre {
            Some(code) => Got {
                code,
                hwm: -1,
                log_start: -1,
                records: Vec::new(),
                preferred: -1,
            },
            None => got.next().unwrap_or(Got {
                code: ec::UNKNOWN_SERVER_ERROR,
                hwm: -1,
                log_start: -1,
                records: Vec::new(),
                preferred: -1,
            }),
        })
        .collect();
    // An incremental answer leaves out partitions with nothing new for the client.
    let keep: Vec<bool> = entries
        .iter()
        .zip(&answers)
        .map(|(e, g)| match e.told {
            Some((hw, start)) => {
                g.code != ec::NONE || !g.records.is_empty() || g.hwm != hw || g.log_start != start
            }
            None => true,
        })
        .collect();
    let told: Vec<(fetch_session::Key, i64, i64)> = entries
        .iter()
        .zip(&answers)
        .zip(&keep)
        .filter(|(_, k)| **k)
        .map(|((e, g), _)| ((e.topic.clone(), e.partition), g.hwm, g.log_start))
        .collect();
    // What vouches for an idle answer (see IdleFetch).
    let idle = idle.then(|| {
        let keys = wants.iter().map(|(_, w)| (w.topic.clone(), w.partition));
        (marks.clone(), std::rc::Rc::new(keys.collect()))
    });
    // What the session's next fetch must look at: the partitions not at their end, and what
    // changes after the marks.
    let settled = in_session.then(|| fetch_session::Settled {
        image: Arc::downgrade(&image),
        marks: carried.take().unwrap_or(marks),
        pending: entries
            .iter()
            .zip(&answers)
            .filter(|(e, g)| {
                e.pre.is_some()
                    || g.code != ec::NONE
                    || !g.records.is_empty()
                    || g.preferred >= 0
                    || g.hwm > e.fetch_offset
            })
            .map(|(e, _)| (e.topic.clone(), e.partition))
            .collect(),
    });
    let response_session = match incremental_id {
        Some(id) => {
            fetch_session::with(|c| {
                c.answered(id, &told);
                c.settle(id, settled);
            });
            id
        }
        None if opening => {
            let parts = entries
                .iter()
                .zip(&answers)
                .map(|(e, g)| {
                    (
                        (e.topic.clone(), e.partition),
                        fetch_session::Cached {
                            topic_id: e.topic_id,
                            fetch_offset: e.fetch_offset,
                            max_bytes: e.max_bytes,
                            high_watermark: g.hwm,
                            log_start_offset: g.log_start,
                        },
                    )
                })
                .collect();
            let slots = node.tuning.memory.fetch_session_cache_slots;
            fetch_session::with(|c| {
                let id = c.open(parts, slots, Instant::now());
                c.settle(id, settled);
                id
            })
        }
        None => 0,
    };
    // Group into topics, in entry order (a topic's partitions are adjacent).
    let mut topics: Vec<(FetchableTopicResponse, Vec<Vec<Bytes>>)> = Vec::new();
    let mut endpoints: Vec<NodeEndpoint> = Vec::new();
    for ((e, g), k) in entries.iter().zip(answers).zip(keep) {
        if !k {
            continue;
        }
        let same = topics
            .last()
            .is_some_and(|(tr, _)| tr.topic.0.as_str() == &*e.topic && tr.topic_id == e.topic_id);
        if !same {
            let mut tr = FetchableTopicResponse::default();
            tr.topic = tn(&e.topic);
            tr.topic_id = e.topic_id;
            topics.push((tr, Vec::new()));
        }
        let mut pd = PartitionData::default();
        pd.partition_index = e.partition;
        pd.preferred_read_replica = BrokerId(if version >= 11 { g.preferred } else { -1 });
        crate::metrics::error(kafka_protocol::messages::ApiKey::Fetch as i16, g.code);
        if e.pre.is_none() {
            crate::metrics::fetched(&e.topic, e.partition, &g.records);
        }
        pd.error_code = g.code;
        if version >= 16 {
            if let Some(h) = super::util::leader_hint(&node, g.code, &e.topic, e.partition) {
                pd.current_leader.leader_id = BrokerId(h.leader);
                pd.current_leader.leader_epoch = h.epoch;
                if !endpoints.iter().any(|x| x.node_id.0 == h.leader) {
                    let mut x = NodeEndpoint::default();
                    x.node_id = BrokerId(h.leader);
                    x.host = super::util::sb(&h.host);
                    x.port = h.port;
                    x.rack = h.rack.as_deref().map(super::util::sb);
                    endpoints.push(x);
                }
            }
        }
        pd.high_watermark = g.hwm;
        pd.last_stable_offset = g.hwm;
        pd.log_start_offset = g.log_start;
        pd.records = Some(Bytes::new());
        if req.isolation_level == 1 {
            pd.aborted_transactions = Some(Vec::new());
        }
        let (tr, recs) = topics.last_mut().expect("pushed above");
        tr.partitions.push(pd);
        recs.push(g.records);
    }
    let body = encode_response(version, ec::NONE, response_session, topics, &endpoints);
    if let Some((marks, keys)) = idle {
        // The request itself is the shape: its partitions are moved out, nothing is cloned.
        let mut shape = req;
        let entries = std::mem::take(&mut shape.topics)
            .into_iter()
            .flat_map(|t| {
                let key = (t.topic, t.topic_id);
                t.partitions.into_iter().map(move |p| (key.clone(), p))
            })
            .collect();
        *ctx.idle_fetch.borrow_mut() = Some(IdleFetch {
            version,
            shape,
            entries,
            image: Arc::downgrade(&image),
            marks,
            keys,
            body: body.clone(),
        });
    }
    body
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
pub fn encode_response(
    version: i16,
    error_code: i16,
    session_id: i32,
    topics: Vec<(FetchableTopicResponse, Vec<Vec<Bytes>>)>,
    node_endpoints: &[NodeEndpoint],
) -> Vec<Bytes> {
    let flexible = version >= 12;
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut head = BytesMut::with_capacity(256);
    head.put_i32(0); // throttle_time_ms
    if version >= 7 {
        head.put_i16(error_code);
        head.put_i32(session_id);
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
            // The splice below recognises the end of the partition by an empty records field
            // and empty tagged fields; a partition with tagged fields of its own (diverging
            // epoch, current leader, snapshot id) takes the plain path.
            let tagged = pd.diverging_epoch != Default::default()
                || pd.current_leader != Default::default()
                || pd.snapshot_id != Default::default();
            let ok = !tagged && pd.encode(&mut head, version).is_ok();
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
                    // Record bytes are never copied: the encoded fields so far become one
                    // chunk and the records follow as they are.
                    if !head.is_empty() {
                        chunks.push(head.split().freeze());
                    }
                    chunks.push(r);
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
        if version >= 16 && !node_endpoints.is_empty() {
            // KIP-951: the response's tagged field 0, the endpoints of the leaders named in
            // partitions' CurrentLeader.
            let mut data = BytesMut::new();
            put_uvarint(&mut data, node_endpoints.len() as u64 + 1);
            for x in node_endpoints {
                if let Err(e) = x.encode(&mut data, version) {
                    tracing::error!("cannot encode a fetch node endpoint: {e}");
                }
            }
            put_uvarint(&mut head, 1);
            put_uvarint(&mut head, 0);
            put_uvarint(&mut head, data.len() as u64);
            head.put_slice(&data);
        } else {
            head.put_u8(0); // response tagged fields
        }
    }
    chunks.push(head.freeze());
    chunks
}

async fn read_round(shards: usize, wants: Vec<(usize, Want)>, max_bytes: usize) -> Vec<Got> {
    per_shard(shards, wants, move |sh, ws: Vec<Want>| async move {
        // Partitions with nothing past the fetch offset are answered at once, without a task:
        // a consumer at the end of thousands of idle partitions costs a lookup for each.
        let mut out: Vec<Option<Got>> = ws.iter().map(|w| at_end(&sh, w)).collect();
        let ws: Vec<(usize, Want)> = ws
            .into_iter()
            .enumerate()
            .filter(|(i, _)| out[*i].is_none())
            .collect();
        // The leading partitions whose limits together fit in the response's limit are read
        // at once: a catching-up consumer's reads of several partitions keep the disk busy
        // together instead of waiting for one another. Past that point they are read in
        // order, each only while the response has room: the response keeps partitions in
        // request order within max_bytes, so the rest would be dropped anyway.
        let mut planned = 0usize;
        let at_once = ws
            .iter()
            .take_while(|(_, w)| {
                planned = planned.saturating_add(w.max_bytes.min(max_bytes));
                planned <= max_bytes
            })
            .count();
        let mut ws = ws;
        let in_order = ws.split_off(at_once);
        let (first, reads): (Vec<usize>, Vec<_>) = ws
            .into_iter()
            .map(|(i, w)| (i, read_partition(&sh, w, max_bytes, true)))
            .unzip();
        let mut read_bytes = 0usize;
        for (i, g) in first
            .into_iter()
            .zip(futures::future::join_all(reads).await)
        {
            read_bytes += g.bytes();
            out[i] = Some(g);
        }
        for (i, w) in in_order {
            let g = read_partition(&sh, w, max_bytes, read_bytes < max_bytes).await;
            read_bytes += g.bytes();
            out[i] = Some(g);
        }
        out.into_iter()
            .map(|g| g.unwrap_or_else(|| Got::error(ec::UNKNOWN_SERVER_ERROR)))
            .collect()
    })
    .await
}

/// A partition the shard has open and serves to this fetch, with nothing past the fetch
/// offset: its answer without any read (None: not known at once, take the full path).
fn at_end(sh: &Shard, w: &Want) -> Option<Got> {
    if w.follower || w.client_rack.is_some() {
        return None;
    }
    let p = sh.opened(&w.topic, w.partition)?;
    if sh.node.cluster.is_some() {
        let img = sh.node.image();
        if !img
            .topic(&w.topic)
            .is_some_and(|t| sh.node.leads(t, w.partition))
        {
            return None;
        }
    }
    let hwm = p.high_watermark();
    let log_start = p.log.log_start_offset() as i64;
    (w.offset == hwm && w.offset >= log_start).then(|| Got {
        code: ec::NONE,
        hwm,
        log_start,
        records: Vec::new(),
        preferred: -1,
    })
}

/// One partition of a fetch on its shard: its records from the offset asked (unless `may_read`
/// is false: the response is full, so only its high watermark and log start), or the KIP-392
/// replica to read from instead, or the error.
async fn read_partition(sh: &Shard, w: Want, max_bytes: usize, may_read: bool) -> Got {
    let part = if w.follower {
        sh.replica(&w.topic, w.partition).await
    } else {
        sh.partition(&w.topic, w.partition).await
    };
    let Some(p) = part else {
        return Got {
            code: sh.node.not_served_code(&w.topic, w.partition),
            hwm: -1,
            log_start: -1,
            records: Vec::new(),
            preferred: -1,
        };
    };
    let hwm = p.high_watermark();
    let log_start = p.log.log_start_offset() as i64;
    let answer = |code, records, preferred| Got {
        code,
        hwm,
        log_start,
        records,
        preferred,
    };
    if !may_read {
        return answer(ec::NONE, Vec::new(), -1);
    }
    if let Some(r) = w
        .client_rack
        .as_deref()
        .and_then(|rack| preferred_replica(&sh.node, &p, &w.topic, w.partition, rack, w.offset))
    {
        return answer(ec::NONE, Vec::new(), r);
    }
    let read = match p.read(w.offset, w.max_bytes.min(max_bytes)).await {
        // A follower that has not got the offset yet: retriable, unlike out of range.
        Err(ec::OFFSET_OUT_OF_RANGE) if w.follower && w.offset as u64 > p.log.log_end_offset() => {
            Err(ec::OFFSET_NOT_AVAILABLE)
        }
        r => r,
    };
    match read {
        Ok(records) => answer(ec::NONE, records, -1),
        Err(code) => {
            if code == ec::OFFSET_OUT_OF_RANGE {
                tracing::debug!(
                    "fetch {}-{} at {} out of range [{log_start}, {hwm}]",
                    w.topic,
                    w.partition,
                    w.offset
                );
            }
            answer(code, Vec::new(), -1)
        }
    }
}

/// KIP-392 on the leader: an in-sync follower in the consumer's rack that already holds the
/// fetch offset, when this node is in another rack.
fn preferred_replica(
    node: &crate::cluster::node::Node,
    p: &crate::partition::Partition,
    topic: &str,
    partition: i32,
    rack: &str,
    offset: i64,
) -> Option<i32> {
    let img = node.image();
    let brokers = &img.cluster.as_ref()?.brokers;
    let rack_of = |id: i32| {
        brokers
            .iter()
            .find(|b| b.id == id && !b.fenced)
            .and_then(|b| b.rack.clone())
    };
    if rack_of(node.node_id).as_deref() == Some(rack) {
        return None;
    }
    let a = img
        .topic(topic)?
        .assignments
        .get(usize::try_from(partition).ok()?)?;
    if a.leader != node.node_id {
        return None;
    }
    a.isr.iter().copied().find(|r| {
        *r != node.node_id
            && rack_of(*r).as_deref() == Some(rack)
            && p.follower_holds(*r, offset.max(0) as u64)
    })
}

/// Each shard's change journal count, for the shards these partitions live on (added to
/// `marks` for the shards it lacks).
async fn journal_marks(wants: &[(usize, Want)], marks: &mut Vec<(usize, u64)>) {
    let mut shards: Vec<usize> = wants.iter().map(|(s, _)| *s).collect();
    shards.sort_unstable();
    shards.dedup();
    for s in shards {
        if marks.iter().any(|(m, _)| *m == s) {
            continue;
        }
        let seq = crate::shard::invoke(s, |_| async { crate::partition::journal_seq() }).await;
        marks.push((s, seq));
    }
}

/// For a session (or a repeated idle fetch) with marks: the partitions to look at, namely
/// `look` (named by the request, or pending) and those of its own (`holds`) the shards
/// journaled a change of since `marks` (which move on), waiting for one until the deadline.
/// None: the journal cannot tell (the image changed, or a shard's journal no longer reaches
/// back), so every partition needs a look.
async fn changed_where(
    node: &crate::cluster::node::Node,
    look: Vec<fetch_session::Key>,
    image: &std::sync::Weak<crate::cluster::metadata::MetadataImage>,
    marks: &mut [(usize, u64)],
    deadline: Instant,
    holds: impl Fn(&fetch_session::Key) -> bool,
) -> Option<Vec<fetch_session::Key>> {
    use futures::FutureExt;
    let mut keys: std::collections::BTreeSet<fetch_session::Key> = look.into_iter().collect();
    // One wait per shard at a time, kept across passes (a remote wait runs until it fires or
    // the deadline, so it is not started again while it runs).
    let mut waits: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = usize>>>> = Vec::new();
    let mut armed = vec![false; marks.len()];
    // Bounded by the deadline: each pass follows a change journaled on a session's shard.
    loop {
        if !std::ptr::eq(image.as_ptr(), Arc::as_ptr(&node.image())) {
            return None;
        }
        for (shard, seq) in marks.iter_mut() {
            let since = *seq;
            let (now, changed) = crate::shard::invoke(*shard, move |_| async move {
                crate::partition::changes_since(since)
            })
            .await?;
            *seq = now;
            keys.extend(changed.into_iter().filter(|k| holds(k)));
        }
        if !keys.is_empty() || Instant::now() >= deadline {
            return Some(keys.into_iter().collect());
        }
        for (i, &(shard, seq)) in marks.iter().enumerate() {
            if armed[i] {
                continue;
            }
            armed[i] = true;
            waits.push(Box::pin(
                crate::shard::invoke(shard, move |_| async move {
                    let changed = crate::partition::journal_changed();
                    if crate::partition::journal_seq() == seq {
                        crate::notify::first_or_deadline(vec![changed], deadline).await;
                    }
                })
                .map(move |()| i),
            ));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if waits.is_empty() {
            glommio::timer::sleep(left).await;
            return Some(Vec::new());
        }
        let timer = glommio::timer::sleep(left);
        futures::pin_mut!(timer);
        match futures::future::select(futures::future::select_all(waits), timer).await {
            futures::future::Either::Left(((i, _, rest), _)) => {
                armed[i] = false;
                waits = rest;
            }
            futures::future::Either::Right(_) => return Some(Vec::new()),
        }
    }
}

/// Whether any of a session's partitions has something to tell: records past the client's
/// position, a high watermark or log start offset other than it was told, or an error.
async fn has_news(
    node: &crate::cluster::node::Node,
    parts: Vec<(fetch_session::Key, fetch_session::Cached)>,
) -> bool {
    let items = parts
        .into_iter()
        .map(|((t, p), c)| (node.shard_of(&t, p), (t, p, c)))
        .collect();
    per_shard(
        node.shards(),
        items,
        |sh, its: Vec<(Arc<str>, i32, fetch_session::Cached)>| async move {
            let mut out = Vec::with_capacity(its.len());
            for (t, p, c) in its {
                let part = match sh.opened(&t, p) {
                    Some(x) => Some(x),
                    None => sh.replica(&t, p).await,
                };
                out.push(part.is_none_or(|x| {
                    let (hw, start) = (x.high_watermark(), x.log.log_start_offset() as i64);
                    hw > c.fetch_offset
                        || c.fetch_offset < start
                        || hw != c.high_watermark
                        || start != c.log_start_offset
                }));
            }
            out
        },
    )
    .await
    .into_iter()
    .any(|n| n)
}

/// A long-poll over at most this many partitions of a shard waits on each partition; a longer
/// one watches them all through the shard's one signal (`Partition::watch_data`), so that an
/// idle consumer of thousands of partitions does not register thousands of waiters per fetch.
const PER_PARTITION_WAITS_MAX: usize = 16;

/// Waits until any wanted partition gets data past what the last round saw (true), or the
/// deadline (false).
async fn wait_for_data(
    shards: usize,
    wants: &[(usize, Want)],
    got: &[Got],
    deadline: Instant,
) -> bool {
    let mut buckets: Vec<Vec<(Arc<str>, i32, i64)>> = (0..shards).map(|_| Vec::new()).collect();
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
                if its.len() <= PER_PARTITION_WAITS_MAX {
                    wait_each(&sh, &its, deadline).await
                } else {
                    wait_watched(&sh, &its, deadline).await
                }
            },
        )));
    }
    if waits.is_empty() {
        return false;
    }
    // Any shard's wake-up ends the wait; the others run out at the deadline on their own.
    // (A shard whose wait ran out answers false: the deadline has come for all.)
    crate::notify::first_or_deadline(waits, deadline)
        .await
        .unwrap_or(false)
}

/// The partition a long-poll waits on: the open one without a lookup of the image, else
/// through the replica rules (which may open it).
async fn waited(sh: &Shard, topic: &str, partition: i32) -> Option<crate::partition::PartitionRef> {
    match sh.opened(topic, partition) {
        Some(p) => Some(p),
        None => sh.replica(topic, partition).await,
    }
}

/// A few partitions: one waiter on each. True when one got data, false at the deadline.
async fn wait_each(sh: &Shard, its: &[(Arc<str>, i32, i64)], deadline: Instant) -> bool {
    let mut rxs = Vec::new();
    for (t, p, seen) in its {
        if let Some(part) = waited(sh, t, *p).await {
            if part.high_watermark() > *seen {
                return true;
            }
            rxs.push(part.wait_for_data());
        }
    }
    crate::notify::first_or_deadline(rxs, deadline)
        .await
        .is_some()
}

/// Many partitions: each is watched (a counter), and the shard's one signal wakes the wait,
/// which then checks its own partitions. True when one got data, false at the deadline.
async fn wait_watched(sh: &Shard, its: &[(Arc<str>, i32, i64)], deadline: Instant) -> bool {
    // Taken before any partition is looked at: data arriving from here on is seen.
    let mut changed = crate::partition::watched_data_changed();
    let mut seq = crate::partition::journal_seq();
    let mut watches = Vec::with_capacity(its.len());
    // Which watch a partition is: a wake-up (shared by every long-poll of the shard) checks
    // only the partitions the journal names since the last check, not all of its own.
    let mut index: std::collections::HashMap<(Arc<str>, i32), usize> =
        std::collections::HashMap::with_capacity(its.len());
    for (t, p, seen) in its {
        if let Some(part) = waited(sh, t, *p).await {
            index.insert((t.clone(), *p), watches.len());
            watches.push((part.watch_data(), *seen));
        }
    }
    let moved = |i: usize| {
        let (w, seen) = &watches[i];
        w.partition().high_watermark() > *seen
    };
    if (0..watches.len()).any(moved) {
        return true;
    }
    // Bounded by the deadline: each pass follows new data on a watched partition.
    loop {
        if crate::notify::first_or_deadline(vec![changed], deadline)
            .await
            .is_none()
        {
            return false;
        }
        changed = crate::partition::watched_data_changed();
        let any = match crate::partition::changes_since(seq) {
            Some((now, keys)) => {
                seq = now;
                keys.iter().any(|k| index.get(k).is_some_and(|&i| moved(i)))
            }
            // The journal no longer reaches back: look at every partition.
            None => {
                seq = crate::partition::journal_seq();
                (0..watches.len()).any(moved)
            }
        };
        if any {
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::protocol::Decodable;

    /// Bytes of `out` that are not inside one of `sources` (were copied or newly encoded).
    pub fn outside(out: &[Bytes], sources: &[Bytes]) -> usize {
        out.iter()
            .filter(|c| {
                !sources.iter().any(|s| {
                    let (a, b) = (s.as_ptr() as usize, s.as_ptr() as usize + s.len());
                    let p = c.as_ptr() as usize;
                    p >= a && p + c.len() <= b
                })
            })
            .map(|c| c.len())
            .sum()
    }

    /// Record bytes reach the response as they are: only the encoded fields are new bytes.
    #[test]
    fn record_bytes_are_never_copied() {
        let window = Bytes::from(vec![7u8; 300_000]);
        let mut tr = FetchableTopicResponse::default();
        tr.topic = tn("t");
        let mut recs = Vec::new();
        for p in 0..16 {
            let mut pd = PartitionData::default();
            pd.partition_index = p;
            pd.records = Some(Bytes::new());
            tr.partitions.push(pd);
            // Small slices (cache-served batches) and large ones (disk windows) alike.
            let at = p as usize * 10_000;
            recs.push(vec![
                window.slice(at..at + 16),
                window.slice(at + 16..at + 9_000),
            ]);
        }
        let chunks = encode_response(12, 0, 0, vec![(tr, recs)], &[]);
        let fields = outside(&chunks, std::slice::from_ref(&window));
        let total: usize = chunks.iter().map(|c| c.len()).sum();
        assert_eq!(total - fields, 16 * 9_000, "all record bytes by reference");
        assert!(
            fields < 16 * 40,
            "only the partitions' fields are encoded: {fields}"
        );
    }

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
            let chunks = encode_response(version, 0, 0, vec![(tr, recs)], &[]);
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

    /// KIP-951: a refused partition names its leader, and the response carries the leader's
    /// endpoint, in the encoding kafka-protocol (and so any client) reads.
    #[test]
    fn leader_hints_encode_as_kafka_reads_them() {
        let mut tr = FetchableTopicResponse::default();
        tr.topic_id = uuid::Uuid::from_u128(7);
        tr.topic = tn("t");
        let mut pd = PartitionData::default();
        pd.partition_index = 0;
        pd.error_code = ec::NOT_LEADER_OR_FOLLOWER;
        pd.current_leader.leader_id = BrokerId(3);
        pd.current_leader.leader_epoch = 5;
        pd.records = Some(Bytes::new());
        tr.partitions.push(pd);
        let mut ne = NodeEndpoint::default();
        ne.node_id = BrokerId(3);
        ne.host = crate::server::handlers::util::sb("10.0.0.3");
        ne.port = 9092;
        ne.rack = Some(crate::server::handlers::util::sb("r1"));
        let chunks = encode_response(16, 0, 0, vec![(tr, vec![Vec::new()])], &[ne.clone()]);
        let mut body = BytesMut::new();
        for c in chunks {
            body.put_slice(&c);
        }
        let mut b = body.freeze();
        let r = FetchResponse::decode(&mut b, 16).unwrap();
        assert_eq!(b.len(), 0);
        let pd = &r.responses[0].partitions[0];
        assert_eq!(
            (
                pd.current_leader.leader_id.0,
                pd.current_leader.leader_epoch
            ),
            (3, 5)
        );
        assert_eq!(r.node_endpoints, vec![ne]);
    }
}
