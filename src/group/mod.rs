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
use crate::log::now_ms;
use crate::partition::PartitionRef;
use consumer_group::{Assignment, Assignor, ConsumerConfig, GroupDescription, TopicSource};
use consumer_records::{ConsumerKey, ConsumerRecord};
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
/// Groups whose committed offsets one metrics scrape reads per shard: bounds its size.
const GROUPS_PER_SNAPSHOT_MAX: usize = 1000;

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
    Sync(oneshot::Sender<SyncResponse>),
}

/// The coordinator state of one shard: every group whose offsets partition this shard owns.
pub struct GroupShard {
    coord: RefCell<GroupCoordinator>,
    /// KIP-848 consumer groups.
    consumer: RefCell<consumer_group::ConsumerGroups>,
    /// group → (topic, partition) → committed offset.
    offsets: RefCell<HashMap<String, BTreeMap<(String, i32), OffsetValue>>>,
    pending: RefCell<HashMap<Token, Pending>>,
    next_token: Cell<Token>,
    /// Offsets partitions whose groups this shard coordinates → the leader epoch they were
    /// loaded at. A partition led again, or at a new epoch, is loaded afresh.
    loaded: RefCell<HashMap<i32, i32>>,
    /// One load or unload at a time.
    load_lock: futures::lock::Mutex<()>,
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
            loaded: RefCell::new(HashMap::new()),
            load_lock: futures::lock::Mutex::new(()),
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
                let img = sh.metadata();
                if let Err(e) = me.store_consumer_group(sh.as_ref(), &img, &group).await {
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
        self.pending.borrow_mut().insert(token, Pending::Sync(tx));
        let actions = self.coord.borrow_mut().sync(now_ms(), token, req);
        self.apply(shard, actions);
        rx
    }

    /// Delivers the state machine's actions. Group changes are stored in `__consumer_offsets`
    /// first; SyncGroup answers of the same step wait for that store (Kafka answers SyncGroup
    /// once the assignment is stored) and become COORDINATOR_NOT_AVAILABLE if it fails, so no
    /// member runs with an assignment a new coordinator would not know.
    pub fn apply<S: OffsetsLog>(self: &Rc<Self>, shard: &Rc<S>, actions: Vec<Action>) {
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
        if changed.is_empty() {
            self.answer_syncs(syncs, None);
            return;
        }
        let (me, shard) = (self.clone(), shard.clone());
        glommio::spawn_local(async move {
            let mut failed = None;
            for (group_id, key, value) in changed {
                if let Err(e) = append_records(&*shard, &group_id, vec![(key, value)]).await {
                    tracing::warn!("cannot persist metadata of group {group_id}: {e}");
                    failed = Some(ResponseError::CoordinatorNotAvailable.code());
                }
            }
            me.answer_syncs(syncs, failed);
        })
        .detach();
    }

    fn answer_syncs(&self, syncs: Vec<(Token, SyncResponse)>, error: Option<i16>) {
        for (token, mut resp) in syncs {
            if let Some(code) = error.filter(|_| resp.error_code == state::NONE) {
                resp.error_code = code;
                resp.assignment = Bytes::new();
            }
            if let Some(Pending::Sync(tx)) = self.pending.borrow_mut().remove(&token) {
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
        if have.is_some() {
            self.loaded.borrow_mut().remove(&p);
            self.unload_partition(shard, p);
        }
        if let Some(epoch) = want {
            self.load_partition(shard, p).await;
            self.loaded.borrow_mut().insert(p, epoch);
        }
    }

    /// Forgets the groups of offsets partition `p`: another node coordinates them now.
    fn unload_partition<S: OffsetsLog>(self: &Rc<Self>, shard: &Rc<S>, p: i32) {
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
        self.offsets.borrow_mut().retain(|g, _| !mine(g));
        tracing::info!(
            "shard {}: no longer coordinating __consumer_offsets-{p} ({unloaded} classic groups)",
            shard.shard_id()
        );
        let _ = unloaded;
    }

    /// Loads committed offsets and group state from offsets partition `p`.
    async fn load_partition<S: OffsetsLog>(self: &Rc<Self>, shard: &Rc<S>, p: i32) {
        let Some(part) = shard.offsets_partition(p).await else {
            return;
        };
        let n = shard.tuning().group.offsets_topic_num_partitions;
        let mut groups: HashMap<String, Option<GroupMetadataValue>> = HashMap::new();
        let mut consumer: HashMap<String, BTreeMap<ConsumerKey, ConsumerRecord>> = HashMap::new();
        let mut loaded = 0usize;
        let mut offset = part.log.log_start_offset();
        let end = part.log.log_end_offset();
        // Bounded by the log: each pass advances past at least one batch.
        while offset < end {
            let Ok(bytes) = part.log.read(offset, 1 << 20, end).await else {
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
                        Ok(OffsetsRecord::Consumer { group, record }) => {
                            let key = record.key();
                            let recs = consumer.entry(group).or_default();
                            if record.encode_value().is_some() {
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
            for (g, offs) in self.offsets.borrow().iter() {
                if !offs.is_empty() && offsets_partition_for(g, n) == p {
                    coord.ensure_group(g);
                }
            }
        }
        let img = shard.metadata();
        for (g, recs) in &consumer {
            self.consumer
                .borrow_mut()
                .restore(now, g, recs, img.as_ref(), &|id: &uuid::Uuid| {
                    img.topic_by_id(id).map(|t| t.name.clone())
                });
        }
        // Records a damaged or foreign log left behind (members without a group, Kafka's
        // partition metadata) are tombstoned now.
        for g in consumer.keys() {
            if let Err(e) = self.store_consumer_group(shard.as_ref(), &img, g).await {
                tracing::warn!("cannot tidy the records of consumer group {g}: {e}");
            }
        }
        if loaded > 0 || classic > 0 || !consumer.is_empty() {
            tracing::info!(
                "shard {}: coordinating __consumer_offsets-{p}: {loaded} offset commits, {classic} classic groups, {} consumer groups",
                shard.shard_id(),
                consumer.len()
            );
        }
    }

    /// Appends what changed in a KIP-848 group's state (nothing if nothing did).
    async fn store_consumer_group<S: OffsetsLog>(
        &self,
        shard: &S,
        img: &MetadataImage,
        group: &str,
    ) -> Result<(), String> {
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
        if r.is_err() {
            self.consumer.borrow_mut().store_failed(group);
        }
        r
    }

    /// Drives session and rebalance timeouts.
    pub async fn ticker<S: OffsetsLog>(self: Rc<Self>, shard: Rc<S>) {
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
            if !touched.is_empty() {
                let img = shard.metadata();
                for g in touched {
                    if let Err(e) = self.store_consumer_group(shard.as_ref(), &img, &g).await {
                        tracing::warn!("cannot store consumer group {g}: {e}");
                    }
                }
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

/// One committed offset as OffsetFetch reports it (offset -1: nothing committed).
pub struct CommittedPartition {
    pub partition: i32,
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: String,
}

impl CommittedPartition {
    fn of(partition: i32, v: Option<&OffsetValue>) -> CommittedPartition {
        match v {
            Some(v) => CommittedPartition {
                partition,
                offset: v.offset,
                leader_epoch: v.leader_epoch,
                metadata: v.metadata.clone(),
            },
            None => CommittedPartition {
                partition,
                offset: -1,
                leader_epoch: -1,
                metadata: String::new(),
            },
        }
    }
}

/// A topic's committed offsets, in the order asked (or topic order when all were asked for).
pub type CommittedTopic = (String, Vec<CommittedPartition>);

/// The outcome of a KIP-848 heartbeat: the state machine's answer and the member's assignment
/// by topic id, or (error code, message).
pub type ConsumerHeartbeat = Result<
    (
        consumer_group::HeartbeatResponse,
        Option<Vec<(uuid::Uuid, Vec<i32>)>>,
    ),
    (i16, String),
>;

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
        if let Err(e) = append_records(shard, group, kvs).await {
            tracing::warn!("offset commit for {group} not persisted: {e}");
            return ResponseError::KafkaStorageError.code();
        }
        let mut offs = self.offsets.borrow_mut();
        let entry = offs.entry(group.to_owned()).or_default();
        for (t, p, v) in commits {
            entry.insert((t, p), v);
        }
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
        let offs = self.offsets.borrow();
        let committed = offs.get(group);
        let lookup = |t: &str, p: i32| committed.and_then(|c| c.get(&(t.to_string(), p)));
        match topics {
            Some(ts) => ts
                .into_iter()
                .map(|(t, ps)| {
                    let rows = ps
                        .into_iter()
                        .map(|p| CommittedPartition::of(p, lookup(&t, p)))
                        .collect();
                    (t, rows)
                })
                .collect(),
            None => {
                let mut out: Vec<CommittedTopic> = Vec::new();
                for ((t, p), v) in committed.into_iter().flatten() {
                    let row = CommittedPartition::of(*p, Some(v));
                    match out.last_mut() {
                        Some((lt, rows)) if lt == t => rows.push(row),
                        _ => out.push((t.clone(), vec![row])),
                    }
                }
                out
            }
        }
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
    pub async fn delete_group_and_offsets<S: OffsetsLog>(&self, shard: &S, group: &str) -> i16 {
        let r = self.delete_group(group);
        let had_offsets = self
            .offsets
            .borrow()
            .get(group)
            .map(|o| !o.is_empty())
            .unwrap_or(false);
        match r {
            Ok(()) => {}
            // A group known only by its offsets can be deleted too.
            Err(code) if code == ResponseError::GroupIdNotFound.code() && had_offsets => {}
            Err(code) => return code,
        }
        let img = shard.metadata();
        if self.store_consumer_group(shard, &img, group).await.is_err() {
            return ResponseError::KafkaStorageError.code();
        }
        let removed = self.offsets.borrow_mut().remove(group).unwrap_or_default();
        let mut kvs: Vec<(Vec<u8>, Option<Vec<u8>>)> = removed
            .into_keys()
            .map(|(t, p)| offset_tombstone(group, t, p))
            .collect();
        kvs.push((
            OffsetsKey::Group {
                group: group.to_owned(),
            }
            .encode(),
            None,
        ));
        match append_records(shard, group, kvs).await {
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
            || self.offsets.borrow().contains_key(group);
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
            if self
                .offsets
                .borrow_mut()
                .get_mut(group)
                .and_then(|o| o.remove(&(t.clone(), p)))
                .is_some()
            {
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
        &self,
        shard: &S,
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
                if let Err(e) = append_records(shard, &req.group_id, vec![tombstone]).await {
                    return Err((ResponseError::CoordinatorNotAvailable.code(), e));
                }
            }
        }
        let group = req.group_id.clone();
        let resp = self.consumer.borrow_mut().heartbeat(now_ms(), img, req);
        if let Err(e) = self.store_consumer_group(shard, img, &group).await {
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
            for (group, committed) in offsets.iter().take(GROUPS_PER_SNAPSHOT_MAX) {
                let c = committed
                    .iter()
                    .map(|((t, p), v)| (t.clone(), *p, v.offset))
                    .collect();
                s.committed.push((group.clone(), c));
            }
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
