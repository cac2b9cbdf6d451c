//! Group coordinator: classic consumer groups and committed offsets. The state machine lives in
//! `state.rs` (sans-IO, time passed in); `records.rs` is the `__consumer_offsets` record format.
//! This module is the I/O shell on the shard that owns a group's `__consumer_offsets`
//! partition: it feeds requests and time to the state machine, answers pending requests, and
//! persists commits and group metadata in that partition. It reaches that partition only
//! through the narrow `OffsetsLog` trait (implemented by the shard), never other partitions.
//! KIP-848 consumer groups (`group.protocol=consumer`) have their own state machine in
//! `consumer_group.rs`; a group id belongs to one protocol at a time. The Kafka API handlers
//! that call in here live in `server/handlers/` (one file per API); this module never sees a
//! connection, and imports nothing from `server` or `shard`.

pub mod consumer_group;
pub mod consumer_records;
pub mod offsets;
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
use kafka_protocol::ResponseError;

use crate::cluster::metadata::MetadataImage;
use crate::config::Tuning;
use crate::partition::PartitionRef;
use consumer_group::{Assignment, Assignor, ConsumerConfig, GroupDescription, TopicSource};
use consumer_records::{ConsumerKey, ConsumerRecord};
use offsets::{Activity, CommittedOffsets};
pub use offsets::{CommittedPartition, CommittedTopic};
use records::{GroupMetadataValue, OffsetValue, OffsetsKey, OffsetsRecord};
use state::{
    Action, GroupConfig, GroupCoordinator, HeartbeatRequest, JoinRequest, JoinResponse,
    LeaveMember, SyncResponse, Token,
};

pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// Kafka's offset.metadata.max.bytes.
pub const OFFSET_METADATA_BYTES_MAX: usize = 4096;
/// Group ids longer than this are refused with INVALID_GROUP_ID.
pub const GROUP_ID_BYTES_MAX: usize = 255;
/// How long after a failed load of an offsets partition the next request tries again.
const LOAD_RETRY_MS: u64 = 1_000;
/// Groups whose committed offsets one metrics scrape reads per shard: bounds its size.
const GROUPS_PER_SNAPSHOT_MAX: usize = 1000;

/// The coordinators' clock: milliseconds since the Unix epoch as of the process start, moved on
/// by the monotonic clock since. Session and rebalance deadlines never jump when the wall
/// clock is set, and the timestamps stored with groups still read as dates.
pub fn now_ms() -> u64 {
    static START: std::sync::OnceLock<(std::time::Instant, u64)> = std::sync::OnceLock::new();
    let (at, wall) = *START.get_or_init(|| (std::time::Instant::now(), crate::log::now_ms()));
    wall + u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX / 2)
}

/// Kafka's placement: abs(groupId.hashCode) % offsets.topic.num.partitions (Java String hash).
pub fn offsets_partition_for(group: &str, partitions: i32) -> i32 {
    let mut h: i32 = 0;
    for u in group.encode_utf16() {
        h = h.wrapping_mul(31).wrapping_add(u as i32);
    }
    let abs = if h == i32::MIN { 0 } else { h.abs() };
    abs % partitions.max(1)
}

/// What the coordinator's I/O shell needs from the shard it runs on: the `__consumer_offsets`
/// partitions that shard owns, read at start and appended to. `Shard` implements it; the shell
/// never sees the rest of the shard.
// Shard-local futures are never sent across threads, so the futures need no Send bound.
#[allow(async_fn_in_trait)]
pub trait OffsetsLog: 'static {
    /// The node's settings (the offsets partition count, the group settings).
    fn tuning(&self) -> &Tuning;
    /// For log lines.
    fn shard_id(&self) -> usize;
    /// The leader epoch of an offsets partition that this shard owns and this node leads;
    /// None otherwise. A new epoch means another coordinator may have written meanwhile.
    fn offsets_leader_epoch(&self, partition: i32) -> Option<i32>;
    /// The node's metadata image: topic ids and partition counts.
    fn metadata(&self) -> std::sync::Arc<MetadataImage>;
    /// An offsets partition this shard owns, opened on first use.
    async fn offsets_partition(&self, partition: i32) -> Option<PartitionRef>;
    /// Appends one record batch to an offsets partition and waits until it is stored (acks=all).
    async fn append_offsets(&self, partition: i32, batch: Bytes) -> Result<(), String>;
}

enum Pending {
    Join(oneshot::Sender<JoinResponse>),
    /// With the group id: the answer waits while the group's metadata is being stored.
    Sync(oneshot::Sender<SyncResponse>, String),
}

/// The coordinator state of one shard: every group whose offsets partition this shard owns.
pub struct GroupShard {
    coord: RefCell<GroupCoordinator>,
    /// KIP-848 consumer groups.
    consumer: RefCell<consumer_group::ConsumerGroups>,
    /// Committed offsets of every group this shard coordinates.
    offsets: RefCell<CommittedOffsets>,
    pending: RefCell<HashMap<Token, Pending>>,
    next_token: Cell<Token>,
    /// Offsets partitions whose groups this shard coordinates → the leader epoch they were
    /// loaded at. A partition led again, or at a new epoch, is loaded afresh.
    loaded: RefCell<HashMap<i32, i32>>,
    /// One load or unload at a time.
    load_lock: futures::lock::Mutex<()>,
    /// When the ticker next looks for expired offsets (ms since the epoch).
    next_expiry_ms: Cell<u64>,
    /// A group's next deadline may have come nearer (a join, sync, leave, load, KIP-848
    /// heartbeat): the ticker, asleep until the nearest one, looks again.
    deadlines_moved: crate::notify::Notify,
    /// Classic groups whose metadata is being stored → (stores in flight, one failed).
    storing: RefCell<HashMap<String, (usize, bool)>>,
    /// SyncGroup answers held until their group's metadata is stored.
    held_syncs: RefCell<HashMap<String, Vec<(Token, SyncResponse)>>>,
    /// Groups with an OffsetCommit being appended → how many: expiry leaves them alone.
    commits_in_flight: RefCell<HashMap<String, usize>>,
    /// When a load of an offsets partition last failed: requests wait a moment before the next
    /// attempt instead of each reading the whole partition again.
    load_failed_ms: RefCell<HashMap<i32, u64>>,
    /// One store at a time per KIP-848 group, so that a failed store is followed by a full
    /// rewrite before anything newer. Entries go when nobody holds them.
    store_locks: RefCell<HashMap<String, Rc<futures::lock::Mutex<()>>>>,
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
            offsets: RefCell::new(CommittedOffsets::default()),
            pending: RefCell::new(HashMap::new()),
            next_token: Cell::new(1),
            loaded: RefCell::new(HashMap::new()),
            load_lock: futures::lock::Mutex::new(()),
            next_expiry_ms: Cell::new(0),
            deadlines_moved: crate::notify::Notify::new(),
            storing: RefCell::new(HashMap::new()),
            held_syncs: RefCell::new(HashMap::new()),
            store_locks: RefCell::new(HashMap::new()),
            commits_in_flight: RefCell::new(HashMap::new()),
            load_failed_ms: RefCell::new(HashMap::new()),
        }
    }

    fn token(&self) -> Token {
        let t = self.next_token.get();
        self.next_token.set(t + 1);
        t
    }

    pub fn join<S: OffsetsLog>(
        self: &Rc<Self>,
        shard: &Rc<S>,
        req: JoinRequest,
    ) -> oneshot::Receiver<JoinResponse> {
        let (tx, rx) = oneshot::channel();
        // A consumer-protocol group with members cannot be joined by a classic member; an empty
        // one becomes a classic group (Kafka's conversion).
        if self.consumer.borrow().is_active(&req.group_id) {
            let _ = tx.send(classic_join_refused(&req));
            return rx;
        }
        if self.consumer.borrow_mut().delete(&req.group_id).is_ok() {
            // The empty consumer group's records go: the id is a classic group now.
            let (me, sh, group) = (self.clone(), shard.clone(), req.group_id.clone());
            glommio::spawn_local(async move {
                if let Err(e) = me.store_consumer_group(&sh, &group).await {
                    tracing::warn!("cannot remove the records of consumer group {group}: {e}");
                }
            })
            .detach();
        }
        let token = self.token();
        self.pending.borrow_mut().insert(token, Pending::Join(tx));
        let actions = self.coord.borrow_mut().join(now_ms(), token, req);
        self.apply(shard, actions);
        rx
    }

    pub fn sync<S: OffsetsLog>(
        self: &Rc<Self>,
        shard: &Rc<S>,
        req: state::SyncRequest,
    ) -> oneshot::Receiver<SyncResponse> {
        let (tx, rx) = oneshot::channel();
        let token = self.token();
        self.pending
            .borrow_mut()
            .insert(token, Pending::Sync(tx, req.group_id.clone()));
        let actions = self.coord.borrow_mut().sync(now_ms(), token, req);
        self.apply(shard, actions);
        rx
    }

    /// Delivers the state machine's actions. Group changes are stored in `__consumer_offsets`
    /// first: a group's SyncGroup answers wait while its metadata is being stored (Kafka
    /// answers SyncGroup once the assignment is stored) and become COORDINATOR_NOT_AVAILABLE
    /// if that fails, so no member runs with an assignment a new coordinator would not know;
    /// the member then rejoins.
    pub fn apply<S: OffsetsLog>(self: &Rc<Self>, shard: &Rc<S>, actions: Vec<Action>) {
        self.deadlines_moved.notify_waiters();
        let mut changed: Vec<(String, Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        let mut syncs: Vec<(Token, SyncResponse)> = Vec::new();
        for a in actions {
            match a {
                Action::JoinResponse { token, resp } => {
                    if let Some(Pending::Join(tx)) = self.pending.borrow_mut().remove(&token) {
                        let _ = tx.send(resp);
                    }
                }
                Action::SyncResponse { token, resp } => syncs.push((token, resp)),
                Action::GroupChanged { group_id } => {
                    let value = self.coord.borrow().group_metadata(&group_id);
                    let key = OffsetsKey::Group {
                        group: group_id.clone(),
                    }
                    .encode();
                    changed.push((group_id, key, value.map(|v| v.encode())));
                }
            }
        }
        for (g, _, _) in &changed {
            self.storing.borrow_mut().entry(g.clone()).or_default().0 += 1;
        }
        for (token, resp) in syncs {
            self.answer_sync(token, resp);
        }
        if changed.is_empty() {
            return;
        }
        let (me, shard) = (self.clone(), shard.clone());
        glommio::spawn_local(async move {
            for (group_id, key, value) in changed {
                let r = append_records(&*shard, &group_id, vec![(key, value)]).await;
                if let Err(e) = &r {
                    tracing::warn!("cannot persist metadata of group {group_id}: {e}");
                }
                me.group_stored(&group_id, r.is_ok());
            }
        })
        .detach();
    }

    /// Answers a SyncGroup now, or holds it while its group's metadata is being stored.
    fn answer_sync(&self, token: Token, resp: SyncResponse) {
        let Some(Pending::Sync(tx, group)) = self.pending.borrow_mut().remove(&token) else {
            return;
        };
        if self.storing.borrow().contains_key(&group) {
            // Kept with its sender: put back under the token until the store completes.
            self.pending
                .borrow_mut()
                .insert(token, Pending::Sync(tx, group.clone()));
            self.held_syncs
                .borrow_mut()
                .entry(group)
                .or_default()
                .push((token, resp));
            return;
        }
        let _ = tx.send(resp);
    }

    /// One metadata store of `group` completed: once none is left in flight, its held
    /// SyncGroup answers go out (as errors if a store failed).
    fn group_stored(&self, group: &str, ok: bool) {
        let failed = {
            let mut storing = self.storing.borrow_mut();
            let Some(entry) = storing.get_mut(group) else {
                return;
            };
            entry.0 -= 1;
            entry.1 |= !ok;
            if entry.0 > 0 {
                return;
            }
            let failed = entry.1;
            storing.remove(group);
            failed
        };
        let held = self
            .held_syncs
            .borrow_mut()
            .remove(group)
            .unwrap_or_default();
        for (token, mut resp) in held {
            if failed && resp.error_code == state::NONE {
                resp.error_code = ResponseError::CoordinatorNotAvailable.code();
                resp.assignment = Bytes::new();
            }
            if let Some(Pending::Sync(tx, _)) = self.pending.borrow_mut().remove(&token) {
                let _ = tx.send(resp);
            }
        }
    }

    /// Brings this shard's coordinators in line with the offsets partitions it leads: loads
    /// the groups of each partition it has come to lead (or leads at a new leader epoch, since
    /// another coordinator may have written meanwhile) and forgets those of partitions it no
    /// longer leads. Called at start and whenever the metadata image moves an offsets
    /// partition.
    pub async fn sync_partitions<S: OffsetsLog>(self: &Rc<Self>, shard: &Rc<S>) {
        self.consumer
            .borrow_mut()
            .set_config(consumer_config(shard.tuning()));
        for p in 0..shard.tuning().group.offsets_topic_num_partitions {
            self.refresh_partition(shard, p).await;
        }
    }

    /// True when this shard coordinates the groups of offsets partition `p` at its current
    /// leader epoch, loading them first if needed. False: another node (or shard) does.
    pub async fn ensure_loaded<S: OffsetsLog>(self: &Rc<Self>, shard: &Rc<S>, p: i32) -> bool {
        let current = |me: &Self| {
            let want = shard.offsets_leader_epoch(p);
            want.is_some() && me.loaded.borrow().get(&p).copied() == want
        };
        if current(self) {
            return true;
        }
        let failed = self.load_failed_ms.borrow().get(&p).copied();
        if failed.is_some_and(|at| now_ms() < at + LOAD_RETRY_MS) {
            return false;
        }
        self.refresh_partition(shard, p).await;
        current(self)
    }

    async fn refresh_partition<S: OffsetsLog>(self: &Rc<Self>, shard: &Rc<S>, p: i32) {
        let _one_at_a_time = self.load_lock.lock().await;
        let want = shard.offsets_leader_epoch(p);
        let have = self.loaded.borrow().get(&p).copied();
        if want == have {
            return;
        }
        self.loaded.borrow_mut().remove(&p);
        // Whatever is held for p goes first, even if p was not loaded: state left by a
        // request that finished after an earlier unload must not mix with the log's.
        self.unload_partition(shard, p, have.is_some());
        let Some(epoch) = want else {
            return;
        };
        match self.load_partition(shard, p).await {
            Ok(restored) => {
                self.load_failed_ms.borrow_mut().remove(&p);
                self.loaded.borrow_mut().insert(p, epoch);
                // Records a damaged or foreign log left behind (members without a group,
                // Kafka's partition metadata) are tombstoned, after the lock is released.
                for g in restored {
                    let (me, sh) = (self.clone(), shard.clone());
                    glommio::spawn_local(async move {
                        if let Err(e) = me.store_consumer_group(&sh, &g).await {
                            tracing::warn!("cannot tidy the records of consumer group {g}: {e}");
                        }
                    })
                    .detach();
                }
            }
            Err(e) => {
                // Not coordinating: requests are refused and retried, which retries the load
                // (at most once per LOAD_RETRY_MS).
                tracing::warn!("cannot load __consumer_offsets-{p}: {e}");
                self.load_failed_ms.borrow_mut().insert(p, now_ms());
                self.unload_partition(shard, p, false);
            }
        }
    }

    /// The leader epoch at which this shard coordinates `group`'s partition, if it does:
    /// compared across an await, it tells whether the group moved meanwhile.
    fn era<S: OffsetsLog>(&self, shard: &S, group: &str) -> Option<i32> {
        let n = shard.tuning().group.offsets_topic_num_partitions;
        self.loaded
            .borrow()
            .get(&offsets_partition_for(group, n))
            .copied()
    }

    /// Forgets the groups of offsets partition `p`: another node coordinates them now.
    fn unload_partition<S: OffsetsLog>(self: &Rc<Self>, shard: &Rc<S>, p: i32, log: bool) {
        let n = shard.tuning().group.offsets_topic_num_partitions;
        let mine = |g: &str| offsets_partition_for(g, n) == p;
        let ids: Vec<String> = self.coord.borrow().group_ids();
        let mut actions = Vec::new();
        let mut unloaded = 0usize;
        for g in ids.iter().filter(|g| mine(g)) {
            actions.extend(self.coord.borrow_mut().unload(g));
            unloaded += 1;
        }
        self.apply(shard, actions);
        self.consumer.borrow_mut().unload(mine);
        self.offsets.borrow_mut().unload(mine);
        if log {
            tracing::info!(
                "shard {}: no longer coordinating __consumer_offsets-{p} ({unloaded} classic groups)",
                shard.shard_id()
            );
        }
    }

    /// Loads committed offsets and group state from offsets partition `p`; returns the
    /// KIP-848 groups restored.
    async fn load_partition<S: OffsetsLog>(
        self: &Rc<Self>,
        shard: &Rc<S>,
        p: i32,
    ) -> Result<Vec<String>, String> {
        let part = shard
            .offsets_partition(p)
            .await
            .ok_or("the partition cannot be opened")?;
        let n = shard.tuning().group.offsets_topic_num_partitions;
        let mut groups: HashMap<String, Option<GroupMetadataValue>> = HashMap::new();
        let mut consumer: HashMap<String, BTreeMap<ConsumerKey, ConsumerRecord>> = HashMap::new();
        let mut loaded = 0usize;
        let mut offset = part.log.log_start_offset();
        let end = part.log.log_end_offset();
        // Bounded by the log: each pass advances past at least one batch.
        while offset < end {
            let bytes = part
                .log
                .read(offset, 1 << 20, end)
                .await
                .map_err(|e| format!("read at offset {offset}: {e}"))?;
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
                            self.offsets
                                .borrow_mut()
                                .replay(group, topic, partition, value);
                            loaded += 1;
                        }
                        Ok(OffsetsRecord::Group { group, value }) => {
                            groups.insert(group, value);
                        }
                        Ok(OffsetsRecord::Consumer { group, record }) => {
                            let key = record.key();
                            let recs = consumer.entry(group).or_default();
                            if r.value.is_some() {
                                recs.insert(key, record);
                            } else {
                                recs.remove(&key);
                            }
                        }
                        Err(e) => {
                            tracing::warn!("skipping undecodable __consumer_offsets record: {e}")
                        }
                    }
                }
            }
            offset = last + 1;
        }
        let now = now_ms();
        let classic = groups.values().filter(|v| v.is_some()).count();
        let img = shard.metadata();
        for (g, recs) in &consumer {
            self.consumer
                .borrow_mut()
                .restore(now, g, recs, img.as_ref(), &|id: &uuid::Uuid| {
                    img.topic_by_id(id).map(|t| t.name.clone())
                });
        }
        {
            let mut coord = self.coord.borrow_mut();
            for (g, v) in groups {
                match v {
                    Some(v) => coord.restore(now, &g, &v),
                    None => {
                        let _ = coord.delete(&g);
                    }
                }
            }
            // A group known only by its offsets is an Empty classic group, as in Kafka,
            // unless it is a consumer group.
            let consumer_groups = self.consumer.borrow();
            for g in self.offsets.borrow().groups() {
                if offsets_partition_for(g, n) == p && !consumer_groups.contains(g) {
                    coord.ensure_group(g);
                }
            }
        }
        // Restored groups' members have sessions to time out.
        self.deadlines_moved.notify_waiters();
        if loaded > 0 || classic > 0 || !consumer.is_empty() {
            tracing::info!(
                "shard {}: coordinating __consumer_offsets-{p}: {loaded} offset commits, {classic} classic groups, {} consumer groups",
                shard.shard_id(),
                consumer.len()
            );
        }
        Ok(consumer.into_keys().collect())
    }

    /// Appends what changed in a KIP-848 group's state (nothing if nothing did), one store
    /// of the group at a time. The store runs in a task of its own: a request dropped while it
    /// waits (its connection closed) does not cut a store between handing records out and
    /// reporting whether they were stored.
    async fn store_consumer_group<S: OffsetsLog>(
        self: &Rc<Self>,
        shard: &Rc<S>,
        group: &str,
    ) -> Result<(), String> {
        let (me, shard, group) = (self.clone(), shard.clone(), group.to_owned());
        glommio::spawn_local(async move { me.store_consumer_group_locked(&shard, &group).await })
            .detach()
            .await
            .unwrap_or_else(|| Err("the store was cancelled".into()))
    }

    async fn store_consumer_group_locked<S: OffsetsLog>(
        &self,
        shard: &Rc<S>,
        group: &str,
    ) -> Result<(), String> {
        let lock = self
            .store_locks
            .borrow_mut()
            .entry(group.to_owned())
            .or_default()
            .clone();
        let r = {
            let _one_at_a_time = lock.lock().await;
            self.store_consumer_group_now(shard.as_ref(), group).await
        };
        drop(lock);
        let mut locks = self.store_locks.borrow_mut();
        if locks.get(group).is_some_and(|l| Rc::strong_count(l) == 1) {
            locks.remove(group);
        }
        r
    }

    async fn store_consumer_group_now<S: OffsetsLog>(
        &self,
        shard: &S,
        group: &str,
    ) -> Result<(), String> {
        let img = shard.metadata();
        let recs = self
            .consumer
            .borrow_mut()
            .records_to_store(group, &|t: &str| img.topic(t).map(|m| m.id));
        if recs.is_empty() {
            return Ok(());
        }
        let kvs = recs
            .into_iter()
            .map(|r| {
                let value = r.encode_value();
                let key = OffsetsKey::Consumer {
                    group: group.to_owned(),
                    kind: r.key(),
                };
                (key.encode(), value)
            })
            .collect();
        let r = append_records(shard, group, kvs).await;
        self.consumer.borrow_mut().store_done(group, r.is_ok());
        r
    }

    /// Drives session and rebalance timeouts. Sleeps until the nearest deadline (a group's, or
    /// the next offsets expiry check), or until one may have come nearer, and at most
    /// `TICK_MAX_MS`: an idle shard is not woken ten times a second for nothing.
    pub async fn ticker<S: OffsetsLog>(self: Rc<Self>, shard: Rc<S>) {
        loop {
            let moved = self.deadlines_moved.notified();
            let now = now_ms();
            let classic = self.coord.borrow().next_deadline_ms();
            let consumer = self.consumer.borrow().next_deadline_ms();
            let next = classic
                .into_iter()
                .chain(consumer)
                .chain(Some(self.next_expiry_ms.get()))
                .min()
                .unwrap_or(now + TICK_MAX_MS);
            if next > now {
                let wait = std::time::Duration::from_millis((next - now).min(TICK_MAX_MS));
                let due = std::time::Instant::now() + wait.max(TICK_MIN);
                if crate::notify::first_or_deadline(vec![moved], due)
                    .await
                    .is_some()
                {
                    // Look at the deadlines again; nothing is due yet unless one is.
                    continue;
                }
            } else {
                drop(moved);
                glommio::timer::sleep(TICK_MIN).await;
            }
            let actions = self.coord.borrow_mut().tick(now_ms());
            self.apply(&shard, actions);
            let expired = self.consumer.borrow_mut().tick(now_ms());
            let mut touched = std::collections::BTreeSet::new();
            for e in expired {
                tracing::info!(
                    "consumer group {}: member {} fenced ({})",
                    e.group_id,
                    e.member_id,
                    e.reason
                );
                touched.insert(e.group_id);
            }
            // Stored in the background (one store per group at a time): an append waiting for
            // replicas must not hold up the session timeouts of every other group.
            for g in touched {
                let (me, sh) = (self.clone(), shard.clone());
                glommio::spawn_local(async move {
                    if let Err(e) = me.store_consumer_group(&sh, &g).await {
                        tracing::warn!("cannot store consumer group {g}: {e}");
                    }
                })
                .detach();
            }
            let now = now_ms();
            if now >= self.next_expiry_ms.get() {
                let interval = shard.tuning().group.offsets_retention_check_interval_ms;
                self.next_expiry_ms.set(now + interval);
                let (me, sh) = (self.clone(), shard.clone());
                glommio::spawn_local(async move { me.expire_offsets(&sh, now).await }).detach();
            }
        }
    }
}

impl GroupShard {
    /// Kafka's offsets.retention.minutes: tombstones the committed offsets of groups nobody
    /// consumes with that have outlived the retention, then the groups themselves once they
    /// are empty and have no offsets left (Kafka deletes such groups too).
    async fn expire_offsets<S: OffsetsLog>(self: &Rc<Self>, shard: &Rc<S>, now: u64) {
        let retention = shard.tuning().group.offsets_retention_ms;
        let candidates = {
            let coord = self.coord.borrow();
            let consumer = self.consumer.borrow();
            self.offsets.borrow().expired(now, retention, |g| {
                // A group whose partition is (re)loading has no state yet: not judged now.
                if self.era(shard.as_ref(), g).is_none() || consumer.is_active(g) {
                    return Activity::Active;
                }
                match coord.state(g) {
                    Some(state::GroupState::Empty) => {
                        let since = coord
                            .group_metadata(g)
                            .map(|m| u64::try_from(m.current_state_timestamp_ms).unwrap_or(0));
                        Activity::EmptySince(since.unwrap_or(0))
                    }
                    Some(_) => Activity::Active,
                    None => Activity::Unknown,
                }
            })
        };
        let mut offsets = 0;
        for (g, expired) in candidates {
            // Confirmed now, with no await before the append is issued: a group that moved,
            // or has a commit in flight or committed again since, keeps what it has; a commit
            // that starts later is appended after these tombstones.
            if self.era(shard.as_ref(), &g).is_none()
                || self.commits_in_flight.borrow().contains_key(&g)
            {
                continue;
            }
            let mut kvs: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
            for (t, p, at) in expired {
                if self.offsets.borrow_mut().remove_if_unchanged(&g, &t, p, at) {
                    kvs.push(offset_tombstone(&g, t, p));
                }
            }
            if kvs.is_empty() {
                continue;
            }
            offsets += kvs.len();
            let mut delete_consumer_group = false;
            if !self.offsets.borrow().has_offsets(&g) {
                if self.coord.borrow_mut().delete(&g).is_ok() {
                    kvs.push((OffsetsKey::Group { group: g.clone() }.encode(), None));
                }
                delete_consumer_group = self.consumer.borrow_mut().delete(&g).is_ok();
            }
            if let Err(e) = append_records(shard.as_ref(), &g, kvs).await {
                tracing::warn!("cannot tombstone the expired offsets of group {g}: {e}");
            }
            if delete_consumer_group {
                if let Err(e) = self.store_consumer_group(shard, &g).await {
                    tracing::warn!("cannot remove the records of consumer group {g}: {e}");
                }
            }
        }
        if offsets > 0 {
            tracing::info!(
                "shard {}: expired {offsets} committed offsets (offsets.retention.minutes)",
                shard.shard_id()
            );
        }
    }
}

/// Counts an OffsetCommit of a group as in flight while it lives (also if its task is dropped).
struct CommitInFlight<'a> {
    map: &'a RefCell<HashMap<String, usize>>,
    group: String,
}

impl<'a> CommitInFlight<'a> {
    fn new(map: &'a RefCell<HashMap<String, usize>>, group: &str) -> Self {
        *map.borrow_mut().entry(group.to_owned()).or_default() += 1;
        CommitInFlight {
            map,
            group: group.to_owned(),
        }
    }
}

impl Drop for CommitInFlight<'_> {
    fn drop(&mut self) {
        let mut map = self.map.borrow_mut();
        if let Some(n) = map.get_mut(&self.group) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.group);
            }
        }
    }
}

/// The record that deletes a committed offset from `__consumer_offsets` (compaction drops both).
fn offset_tombstone(group: &str, topic: String, partition: i32) -> (Vec<u8>, Option<Vec<u8>>) {
    let key = OffsetsKey::Offset {
        group: group.to_owned(),
        topic,
        partition,
    };
    (key.encode(), None)
}

/// One row of ListGroups.
pub struct GroupListing {
    pub group_id: String,
    pub protocol_type: String,
    pub state: String,
    /// "classic" or "consumer" (KIP-848).
    pub group_type: &'static str,
}

/// The outcome of a KIP-848 heartbeat: the state machine's answer and the member's assignment
/// by topic id, or (error code, message).
pub type ConsumerHeartbeat = Result<
    (
        consumer_group::HeartbeatResponse,
        Option<Vec<(uuid::Uuid, Vec<i32>)>>,
    ),
    (i16, String),
>;

/// The longest the group ticker sleeps: deadlines that come nearer without a notice (none
/// should) are still met within this.
const TICK_MAX_MS: u64 = 1000;
/// The shortest: a burst of deadlines is handled in rounds, not in a busy loop.
const TICK_MIN: std::time::Duration = std::time::Duration::from_millis(5);

/// The group operations the API handlers call, each on the coordinator shard of the group.
impl GroupShard {
    /// Heartbeat of a classic member.
    pub fn heartbeat(&self, req: HeartbeatRequest) -> Result<(), i16> {
        self.coord.borrow_mut().heartbeat(now_ms(), req)
    }

    /// LeaveGroup: the top-level result and one code per leaving member.
    pub fn leave<S: OffsetsLog>(
        self: &Rc<Self>,
        shard: &Rc<S>,
        group: &str,
        members: &[LeaveMember],
    ) -> (Result<(), i16>, Vec<(LeaveMember, i16)>) {
        let (top, per, actions) = self.coord.borrow_mut().leave(now_ms(), group, members);
        self.apply(shard, actions);
        (top, per)
    }

    /// DescribeGroups of a classic group; None for a group this coordinator does not know.
    pub fn describe(&self, group: &str) -> Option<state::GroupDescription> {
        self.coord.borrow().describe(group)
    }

    /// ListGroups rows of this shard, classic and consumer groups.
    pub fn list(&self) -> Vec<GroupListing> {
        let consumer = self.consumer.borrow();
        // An id is in one state machine at a time, but drop any leftover classic duplicate.
        let classic = self
            .coord
            .borrow()
            .list()
            .into_iter()
            .filter(|(id, _, _)| !consumer.contains(id))
            .map(|(group_id, protocol_type, state)| GroupListing {
                group_id,
                protocol_type,
                state,
                group_type: "classic",
            });
        let mut out: Vec<GroupListing> = classic.collect();
        out.extend(
            consumer
                .list()
                .into_iter()
                .map(|(group_id, state)| GroupListing {
                    group_id,
                    protocol_type: "consumer".to_owned(),
                    state,
                    group_type: "consumer",
                }),
        );
        out
    }

    /// OffsetCommit checks: consumer groups validate the member epoch (v9+), classic groups the
    /// generation. Creates the classic offsets-only group when neither protocol owns the id.
    fn validate_commit(
        &self,
        group: &str,
        generation_or_epoch: i32,
        member: &str,
        instance: Option<&str>,
    ) -> Result<(), i16> {
        if let Some(r) = self
            .consumer
            .borrow()
            .validate_commit(group, member, generation_or_epoch)
        {
            return r;
        }
        self.coord
            .borrow()
            .validate_commit(group, generation_or_epoch, member, instance)?;
        self.coord.borrow_mut().ensure_group(group);
        self.deadlines_moved.notify_waiters();
        Ok(())
    }

    /// OffsetCommit: checks the member, stores the commits in `__consumer_offsets`, then makes
    /// them visible to OffsetFetch. Returns the code every committed partition gets.
    pub async fn commit_offsets<S: OffsetsLog>(
        &self,
        shard: &S,
        group: &str,
        generation_or_epoch: i32,
        member: &str,
        instance: Option<&str>,
        commits: Vec<(String, i32, OffsetValue)>,
    ) -> i16 {
        if let Err(code) = self.validate_commit(group, generation_or_epoch, member, instance) {
            return code;
        }
        let kvs = commits
            .iter()
            .map(|(t, p, v)| {
                (
                    OffsetsKey::Offset {
                        group: group.to_owned(),
                        topic: t.clone(),
                        partition: *p,
                    }
                    .encode(),
                    Some(v.encode()),
                )
            })
            .collect();
        let era = self.era(shard, group);
        let appended = {
            let _in_flight = CommitInFlight::new(&self.commits_in_flight, group);
            append_records(shard, group, kvs).await
        };
        if let Err(e) = appended {
            tracing::warn!("offset commit for {group} not persisted: {e}");
            return ResponseError::KafkaStorageError.code();
        }
        if self.era(shard, group) != era {
            // Stored, but another coordinator (or a reload) owns the group now: it has read
            // the commit from the log, or the client commits again there.
            return ResponseError::NotCoordinator.code();
        }
        self.offsets.borrow_mut().stored(group, commits);
        state::NONE
    }

    /// OffsetFetch v9: a consumer-group member fetching with its member id and epoch.
    pub fn validate_fetch(
        &self,
        group: &str,
        member_id: Option<&str>,
        member_epoch: i32,
    ) -> Result<(), i16> {
        self.consumer
            .borrow()
            .validate_fetch(group, member_id, member_epoch)
    }

    /// OffsetFetch: the committed offsets of `topics` (None: every committed partition).
    pub fn committed_offsets(
        &self,
        group: &str,
        topics: Option<Vec<(String, Vec<i32>)>>,
    ) -> Vec<CommittedTopic> {
        self.offsets.borrow().fetch(group, topics)
    }

    /// DeleteGroups: a consumer group if the id is one, else the classic group.
    fn delete_group(&self, group: &str) -> Result<(), i16> {
        match self.consumer.borrow_mut().delete(group) {
            Err(code) if code == ResponseError::GroupIdNotFound.code() => {
                self.coord.borrow_mut().delete(group)
            }
            other => other,
        }
    }

    /// DeleteGroups: removes the group and its committed offsets, tombstoned in
    /// `__consumer_offsets`. Returns the group's error code.
    pub async fn delete_group_and_offsets<S: OffsetsLog>(
        self: &Rc<Self>,
        shard: &Rc<S>,
        group: &str,
    ) -> i16 {
        let r = self.delete_group(group);
        let had_offsets = self.offsets.borrow().has_offsets(group);
        match r {
            Ok(()) => {}
            // A group known only by its offsets can be deleted too.
            Err(code) if code == ResponseError::GroupIdNotFound.code() && had_offsets => {}
            Err(code) => return code,
        }
        if self.store_consumer_group(shard, group).await.is_err() {
            return ResponseError::KafkaStorageError.code();
        }
        let removed = self.offsets.borrow_mut().remove_group(group);
        let mut kvs: Vec<(Vec<u8>, Option<Vec<u8>>)> = removed
            .into_iter()
            .map(|(t, p)| offset_tombstone(group, t, p))
            .collect();
        kvs.push((
            OffsetsKey::Group {
                group: group.to_owned(),
            }
            .encode(),
            None,
        ));
        match append_records(shard.as_ref(), group, kvs).await {
            Ok(()) => state::NONE,
            Err(_) => ResponseError::KafkaStorageError.code(),
        }
    }

    /// OffsetDelete: one code per (topic, partition), or the group's error code.
    pub async fn delete_offsets<S: OffsetsLog>(
        &self,
        shard: &S,
        group: &str,
        parts: Vec<(String, i32)>,
    ) -> Result<Vec<i16>, i16> {
        let st = self.coord.borrow().state(group);
        let known = st.is_some()
            || self.consumer.borrow().contains(group)
            || self.offsets.borrow().has_offsets(group);
        if !known {
            return Err(ResponseError::GroupIdNotFound.code());
        }
        // Members consuming the group's topics keep their offsets (conservative: any
        // non-empty group counts as subscribed).
        let busy = matches!(st, Some(s) if s != state::GroupState::Empty)
            || self.consumer.borrow().is_active(group);
        let mut per = Vec::new();
        let mut kvs = Vec::new();
        for (t, p) in parts {
            if busy {
                per.push(ResponseError::GroupSubscribedToTopic.code());
                continue;
            }
            if self.offsets.borrow_mut().remove(group, &t, p) {
                kvs.push(offset_tombstone(group, t, p));
            }
            per.push(state::NONE);
        }
        if !kvs.is_empty() {
            append_records(shard, group, kvs)
                .await
                .map_err(|_| ResponseError::KafkaStorageError.code())?;
        }
        Ok(per)
    }

    /// ConsumerGroupHeartbeat (KIP-848). `owned` names the member's partitions by topic id.
    /// The answer waits until what the heartbeat changed is stored in `__consumer_offsets`, as
    /// Kafka's coordinator answers once its records are committed; if that fails the member
    /// gets COORDINATOR_NOT_AVAILABLE and the next heartbeat stores the group again.
    pub async fn consumer_heartbeat<S: OffsetsLog>(
        self: &Rc<Self>,
        shard: &Rc<S>,
        mut req: consumer_group::HeartbeatRequest,
        owned: Option<Vec<(uuid::Uuid, Vec<i32>)>>,
    ) -> ConsumerHeartbeat {
        let image = shard.metadata();
        let img = image.as_ref();
        // Owned partitions of topics that no longer exist are simply gone.
        req.owned = owned.map(|ids| {
            let mut a = Assignment::new();
            for (id, ps) in ids {
                if let Some(t) = img.topic_by_id(&id) {
                    a.entry(t.name.clone()).or_default().extend(ps);
                }
            }
            a
        });
        if req.member_epoch == 0 && !self.consumer.borrow().contains(&req.group_id) {
            // A classic group with members keeps its id; an empty one is taken over.
            match self.coord.borrow().state(&req.group_id) {
                Some(s) if s != state::GroupState::Empty => {
                    return Err((
                        ResponseError::GroupIdNotFound.code(),
                        format!("Group {} is not a consumer group.", req.group_id),
                    ));
                }
                _ => {}
            }
            if self.coord.borrow_mut().delete(&req.group_id).is_ok() {
                // The empty classic group's record goes: the id is a consumer group now.
                let tombstone = (
                    OffsetsKey::Group {
                        group: req.group_id.clone(),
                    }
                    .encode(),
                    None,
                );
                let era = self.era(shard.as_ref(), &req.group_id);
                if let Err(e) = append_records(shard.as_ref(), &req.group_id, vec![tombstone]).await
                {
                    return Err((ResponseError::CoordinatorNotAvailable.code(), e));
                }
                if self.era(shard.as_ref(), &req.group_id) != era {
                    return Err((
                        ResponseError::NotCoordinator.code(),
                        "The group moved to another coordinator.".into(),
                    ));
                }
            }
        }
        let group = req.group_id.clone();
        let era = self.era(shard.as_ref(), &group);
        let resp = self.consumer.borrow_mut().heartbeat(now_ms(), img, req);
        self.deadlines_moved.notify_waiters();
        let stored = self.store_consumer_group(shard, &group).await;
        if self.era(shard.as_ref(), &group) != era {
            return Err((
                ResponseError::NotCoordinator.code(),
                "The group moved to another coordinator.".into(),
            ));
        }
        if let Err(e) = stored {
            tracing::warn!("cannot store consumer group {group}: {e}");
            return Err((
                ResponseError::CoordinatorNotAvailable.code(),
                format!("The group's state could not be stored: {e}"),
            ));
        }
        let assignment = resp.assignment.as_ref().map(|a| {
            a.iter()
                .filter_map(|(t, ps)| {
                    img.topic(t)
                        .map(|m| (m.id, ps.iter().copied().collect::<Vec<i32>>()))
                })
                .collect::<Vec<_>>()
        });
        Ok((resp, assignment))
    }

    /// Copies the groups' states and committed offsets into a metrics snapshot. A part that a
    /// group task has borrowed is left out of this scrape rather than waited for or panicked on.
    pub fn snapshot_into(&self, s: &mut crate::metrics::Snapshot) {
        if let (Ok(coord), Ok(consumer)) = (self.coord.try_borrow(), self.consumer.try_borrow()) {
            s.groups = coord
                .list()
                .into_iter()
                .map(|(id, _, state)| (id, state))
                .chain(consumer.list())
                .collect();
        }
        if let Ok(offsets) = self.offsets.try_borrow() {
            s.committed = offsets.sample(GROUPS_PER_SNAPSHOT_MAX);
        }
    }

    /// ConsumerGroupDescribe of a KIP-848 group; None for an unknown group.
    pub fn consumer_describe(&self, group: &str) -> Option<GroupDescription> {
        self.consumer.borrow().describe(group)
    }
}

impl TopicSource for MetadataImage {
    fn partition_count(&self, topic: &str) -> Option<i32> {
        self.topic(topic).map(|t| t.partitions)
    }
    fn for_each_topic(&self, f: &mut dyn FnMut(&str)) {
        for t in self.topics.values().filter(|t| !t.internal) {
            f(&t.name);
        }
    }
}

/// The consumer-group settings of the tuning file (Kafka's `group.consumer.*`).
fn consumer_config(t: &Tuning) -> ConsumerConfig {
    let g = &t.group;
    ConsumerConfig {
        heartbeat_interval_ms: g.consumer_heartbeat_interval_ms,
        session_timeout_ms: u64::try_from(g.consumer_session_timeout_ms).unwrap_or(45_000),
        default_assignor: Assignor::parse(&g.consumer_assignor).unwrap_or(Assignor::Uniform),
        ..ConsumerConfig::default()
    }
}

/// Kafka's answer to a classic JoinGroup for a group the consumer protocol is using.
fn classic_join_refused(req: &JoinRequest) -> JoinResponse {
    JoinResponse {
        error_code: ResponseError::InconsistentGroupProtocol.code(),
        generation_id: -1,
        protocol_type: None,
        protocol_name: None,
        leader: String::new(),
        member_id: req.member_id.clone(),
        skip_assignment: false,
        members: Vec::new(),
    }
}

/// Appends key/value records for `group` to its `__consumer_offsets` partition (acks=all).
pub async fn append_records<S: OffsetsLog>(
    shard: &S,
    group: &str,
    kvs: Vec<(Vec<u8>, Option<Vec<u8>>)>,
) -> Result<(), String> {
    let n = shard.tuning().group.offsets_topic_num_partitions;
    let p = offsets_partition_for(group, n);
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
    shard.append_offsets(p, buf.freeze()).await
}
