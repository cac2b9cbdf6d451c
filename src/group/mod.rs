//! Group coordinator: classic consumer groups and committed offsets. The state machine lives in
//! `state.rs` (sans-IO, time passed in); `records.rs` is the `__consumer_offsets` record format.
//! This module is the I/O shell on the shard that owns a group's `__consumer_offsets`
//! partition: it feeds requests and time to the state machine, answers pending requests, and
//! persists commits and group metadata in that partition. It never touches other partitions.
//! KIP-848 consumer groups (`group.protocol=consumer`) have their own state machine in
//! `consumer_group.rs`, driven by `consumer_handlers.rs`; a group id belongs to one protocol at a
//! time.

pub mod consumer_group;
pub mod consumer_handlers;
pub mod handlers;
pub mod records;
pub mod state;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use futures::channel::oneshot;
use kafka_protocol::records::{
    Compression, Record, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

use crate::log::now_ms;
use crate::shard::Shard;
use records::{GroupMetadataValue, OffsetValue, OffsetsKey, OffsetsRecord};
use state::{Action, GroupConfig, GroupCoordinator, JoinResponse, SyncResponse, Token};

pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// Kafka's offset.metadata.max.bytes.
pub const OFFSET_METADATA_BYTES_MAX: usize = 4096;
/// Group ids longer than this are refused with INVALID_GROUP_ID.
pub const GROUP_ID_BYTES_MAX: usize = 255;

/// Kafka's placement: abs(groupId.hashCode) % offsets.topic.num.partitions (Java String hash).
pub fn offsets_partition_for(group: &str, partitions: i32) -> i32 {
    let mut h: i32 = 0;
    for u in group.encode_utf16() {
        h = h.wrapping_mul(31).wrapping_add(u as i32);
    }
    let abs = if h == i32::MIN { 0 } else { h.abs() };
    abs % partitions.max(1)
}

enum Pending {
    Join(oneshot::Sender<JoinResponse>),
    Sync(oneshot::Sender<SyncResponse>),
}

/// The coordinator state of one shard: every group whose offsets partition this shard owns.
pub struct GroupShard {
    pub coord: RefCell<GroupCoordinator>,
    /// KIP-848 consumer groups.
    pub consumer: RefCell<consumer_group::ConsumerGroups>,
    /// group → (topic, partition) → committed offset.
    pub offsets: RefCell<HashMap<String, BTreeMap<(String, i32), OffsetValue>>>,
    pending: RefCell<HashMap<Token, Pending>>,
    next_token: Cell<Token>,
}

impl GroupShard {
    pub fn new(cfg: GroupConfig) -> GroupShard {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        GroupShard {
            coord: RefCell::new(GroupCoordinator::with_config(
                cfg,
                seed ^ (std::process::id() as u64) << 32,
            )),
            consumer: RefCell::new(consumer_group::ConsumerGroups::new(
                Default::default(),
                seed.rotate_left(17) ^ std::process::id() as u64,
            )),
            offsets: RefCell::new(HashMap::new()),
            pending: RefCell::new(HashMap::new()),
            next_token: Cell::new(1),
        }
    }

    fn token(&self) -> Token {
        let t = self.next_token.get();
        self.next_token.set(t + 1);
        t
    }

    pub fn join(
        self: &Rc<Self>,
        shard: &Rc<Shard>,
        req: state::JoinRequest,
    ) -> oneshot::Receiver<JoinResponse> {
        let (tx, rx) = oneshot::channel();
        // A consumer-protocol group with members cannot be joined by a classic member; an empty
        // one becomes a classic group (Kafka's conversion).
        if self.consumer.borrow().is_active(&req.group_id) {
            let _ = tx.send(consumer_handlers::classic_join_refused(&req));
            return rx;
        }
        let _ = self.consumer.borrow_mut().delete(&req.group_id);
        let token = self.token();
        self.pending.borrow_mut().insert(token, Pending::Join(tx));
        let actions = self.coord.borrow_mut().join(now_ms(), token, req);
        self.apply(shard, actions);
        rx
    }

    pub fn sync(
        self: &Rc<Self>,
        shard: &Rc<Shard>,
        req: state::SyncRequest,
    ) -> oneshot::Receiver<SyncResponse> {
        let (tx, rx) = oneshot::channel();
        let token = self.token();
        self.pending.borrow_mut().insert(token, Pending::Sync(tx));
        let actions = self.coord.borrow_mut().sync(now_ms(), token, req);
        self.apply(shard, actions);
        rx
    }

    /// Delivers the state machine's actions: answers waiting requests, persists group changes.
    pub fn apply(self: &Rc<Self>, shard: &Rc<Shard>, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::JoinResponse { token, resp } => {
                    if let Some(Pending::Join(tx)) = self.pending.borrow_mut().remove(&token) {
                        let _ = tx.send(resp);
                    }
                }
                Action::SyncResponse { token, resp } => {
                    if let Some(Pending::Sync(tx)) = self.pending.borrow_mut().remove(&token) {
                        let _ = tx.send(resp);
                    }
                }
                Action::GroupChanged { group_id } => {
                    let value = self.coord.borrow().group_metadata(&group_id);
                    let key = OffsetsKey::Group {
                        group: group_id.clone(),
                    }
                    .encode();
                    let value = value.map(|v| v.encode());
                    let shard = shard.clone();
                    glommio::spawn_local(async move {
                        if let Err(e) = append_records(&shard, &group_id, vec![(key, value)]).await
                        {
                            tracing::warn!("cannot persist metadata of group {group_id}: {e}");
                        }
                    })
                    .detach();
                }
            }
        }
    }

    /// Loads committed offsets and group metadata from this shard's offsets partitions.
    pub async fn load(self: &Rc<Self>, shard: &Rc<Shard>) {
        self.consumer
            .borrow_mut()
            .set_config(consumer_handlers::consumer_config(&shard.node.tuning));
        let n = shard.node.tuning.group.offsets_topic_num_partitions;
        let mut groups: HashMap<String, Option<GroupMetadataValue>> = HashMap::new();
        let mut loaded = 0usize;
        for p in 0..n {
            if shard.node.shard_of(OFFSETS_TOPIC, p) != shard.id {
                continue;
            }
            let Some(part) = shard.partition(OFFSETS_TOPIC, p).await else {
                continue;
            };
            let mut offset = part.log.log_start_offset();
            let end = part.log.log_end_offset();
            // Bounded by the log: each pass advances past at least one batch.
            while offset < end {
                let Ok(bytes) = part.log.read(offset, 1 << 20, end, 0).await else {
                    break;
                };
                if bytes.is_empty() {
                    break;
                }
                let mut buf = bytes.clone();
                let mut last = offset;
                while buf.len() >= crate::log::batch::HEADER_BYTES {
                    let Ok(set) = RecordBatchDecoder::decode(&mut buf) else {
                        break;
                    };
                    for r in set.records {
                        last = last.max(r.offset as u64);
                        let Some(k) = r.key.as_ref() else { continue };
                        match OffsetsRecord::decode(k, r.value.as_deref()) {
                            Ok(OffsetsRecord::Offset {
                                group,
                                topic,
                                partition,
                                value,
                            }) => {
                                let mut offs = self.offsets.borrow_mut();
                                let g = offs.entry(group).or_default();
                                match value {
                                    Some(v) => {
                                        g.insert((topic, partition), v);
                                    }
                                    None => {
                                        g.remove(&(topic, partition));
                                    }
                                }
                                loaded += 1;
                            }
                            Ok(OffsetsRecord::Group { group, value }) => {
                                groups.insert(group, value);
                            }
                            Err(e) => tracing::warn!(
                                "skipping undecodable __consumer_offsets record: {e}"
                            ),
                        }
                    }
                }
                offset = last + 1;
            }
        }
        let now = now_ms();
        let mut coord = self.coord.borrow_mut();
        for (g, v) in groups {
            match v {
                Some(v) => coord.restore(now, &g, &v),
                None => {
                    let _ = coord.delete(&g);
                }
            }
        }
        for (g, offs) in self.offsets.borrow().iter() {
            if !offs.is_empty() {
                coord.ensure_group(g);
            }
        }
        if loaded > 0 {
            tracing::info!("shard {}: loaded {loaded} offset commits", shard.id);
        }
    }

    /// Drives session and rebalance timeouts.
    pub async fn ticker(self: Rc<Self>, shard: Rc<Shard>) {
        loop {
            let now = now_ms();
            let classic = self.coord.borrow().next_deadline_ms();
            let consumer = self.consumer.borrow().next_deadline_ms();
            let next = classic
                .into_iter()
                .chain(consumer)
                .min()
                .unwrap_or(now + 100);
            let wait = next.saturating_sub(now).clamp(5, 100);
            glommio::timer::sleep(std::time::Duration::from_millis(wait)).await;
            let actions = self.coord.borrow_mut().tick(now_ms());
            self.apply(&shard, actions);
            for e in self.consumer.borrow_mut().tick(now_ms()) {
                tracing::info!(
                    "consumer group {}: member {} fenced ({})",
                    e.group_id,
                    e.member_id,
                    e.reason
                );
            }
        }
    }
}

/// Appends key/value records for `group` to its `__consumer_offsets` partition (acks=all).
pub async fn append_records(
    shard: &Rc<Shard>,
    group: &str,
    kvs: Vec<(Vec<u8>, Option<Vec<u8>>)>,
) -> Result<(), String> {
    let n = shard.node.tuning.group.offsets_topic_num_partitions;
    let p = offsets_partition_for(group, n);
    let part = shard
        .partition(OFFSETS_TOPIC, p)
        .await
        .ok_or("offsets partition unavailable")?;
    let ts = now_ms() as i64;
    let records: Vec<Record> = kvs
        .into_iter()
        .enumerate()
        .map(|(i, (k, v))| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: -1,
            timestamp: ts,
            key: Some(Bytes::from(k)),
            value: v.map(Bytes::from),
            headers: Default::default(),
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        records.iter(),
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .map_err(|e| e.to_string())?;
    let cfg = shard
        .node
        .effective_config(OFFSETS_TOPIC)
        .ok_or("offsets topic missing")?;
    let cache = shard.cache_cap();
    part.produce(buf.freeze(), -1, &cfg, cache)
        .await
        .map(|_| ())
        .map_err(|(_, m)| m)
}
