//! Partition replication between nodes, Kafka's way: followers fetch from leaders.
//!
//! - **Follower side**: each shard keeps, per leader node, the set of partitions it follows
//!   from that leader (from the metadata image) and one fetcher task per leader that sends one
//!   Fetch (with this node's replica id) for all of them, appends what comes back with the
//!   leader's offsets, syncs it, and fetches again from its new log end: the offset a follower
//!   fetches from is what it holds on disk (Redpanda's rule, stronger than Kafka's default).
//! - **Leader side**: a Fetch with a replica id is a follower's (`serve_follower`): the leader
//!   records the follower's position (which moves the high watermark, see `partition`), and
//!   answers up to its written log end rather than the high watermark, so that a follower
//!   writes and syncs while the leader syncs.
//!
//! The role and ISR of each replica come from the metadata image (`sync_shard`, run on every
//! shard when the image changes).
//!
//! - **Divergence** (KIP-101/279): every batch carries the epoch of the leader that appended
//!   it. A follower's fetch names the epoch of its last batch; when that epoch ended earlier
//!   in the leader's log (or the follower's log runs past its end), the leader answers
//!   DivergingEpoch instead of data and the follower cuts its log there before fetching on.
//! - **Fencing** (KIP-320): fetches name the leader epoch they expect; a leader of another
//!   epoch refuses them (FENCED_LEADER_EPOCH / UNKNOWN_LEADER_EPOCH).
//! - **ISR** changes on lag go through the controller (AlterPartition, `isr_keeper`).
//!
//! - **Reassignment** (KIP-455): a replica being added is a follower like any other and joins
//!   the ISR through the leader's `isr_keeper`; a replica the image no longer lists on this
//!   node is closed and its files removed (`Shard::remove_replica`), and so are directories of
//!   such replicas found when the node is first unfenced after a start (it was down while its
//!   replica moved away).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchRequest, FetchTopic};
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::BrokerId;

use crate::log::epochs::EpochEnd;
use crate::server::controller::wire::{self, Conn};
use crate::server::errors as ec;
use crate::server::handlers::util::tn;
use crate::shard::Shard;

/// The Fetch version followers send (topic names, flexible).
const REPLICA_FETCH_VERSION: i16 = 12;

type Key = (Arc<str>, i32);

/// One of a shard's fetchers: (leader node, index below `node.num_replica_fetchers`). A
/// partition is fetched by the fetcher its key hashes to, as Kafka spreads partitions over
/// its num.replica.fetchers threads per leader.
type Fetcher = (i32, usize);

fn fetcher_index(topic: &str, partition: i32, fetchers: usize) -> usize {
    // FNV-1a: stable across runs, so a partition keeps its fetcher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in topic.bytes().chain(partition.to_be_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % fetchers.max(1) as u64) as usize
}

#[derive(Default)]
struct Followed {
    /// Leader node → the partitions this shard follows from it.
    by_leader: BTreeMap<Fetcher, BTreeSet<Key>>,
    /// Fetchers running on this shard.
    running: BTreeSet<Fetcher>,
    /// The ISR keeper of this shard's led partitions runs.
    isr_keeper: bool,
    /// Directories of replicas this node no longer holds were looked for (once per process,
    /// when the node is first unfenced: its image is caught up then).
    strays_checked: bool,
}

/// How often a leader looks at its followers' lag (Kafka checks at half the lag limit).
const ISR_CHECK: Duration = Duration::from_millis(500);
/// How often a replica's high watermark is persisted (Kafka's
/// replica.high.watermark.checkpoint.interval.ms).
const HW_CHECKPOINT_EVERY: Duration = Duration::from_secs(5);

/// A topic's `*.replication.throttled.replicas`, parsed: `None` is "*" (every replica).
type ThrottleList = Option<HashSet<(i32, i32)>>;

thread_local! {
    /// Parsed throttle lists of the image with this applied index: (topic, config) → list.
    #[allow(clippy::type_complexity)]
    static THROTTLE_LISTS: RefCell<(u64, HashMap<(String, String), ThrottleList>)> =
        RefCell::new((0, HashMap::new()));
    /// This shard's share of the node's KIP-73 quotas: what leaders serve to throttled
    /// followers, and what throttled followers fetch.
    static LEADER_QUOTA: RefCell<Quota> = RefCell::new(Quota::default());
    static FOLLOWER_QUOTA: RefCell<Quota> = RefCell::new(Quota::default());
    static FOLLOWED: RefCell<Followed> = RefCell::new(Followed::default());
    /// Bumped by every `sync_shard`: a run that an image newer than its own overtook stops.
    static SYNC_GENERATION: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A replication quota (KIP-73) as a token bucket: up to one second of traffic at the rate may
/// go at once, then traffic waits for the bucket to refill. Time is passed in.
#[derive(Debug, Default)]
struct Quota {
    /// Bytes that may go now (negative: owed).
    tokens: f64,
    last: Option<Instant>,
}

impl Quota {
    /// Whether throttled traffic must wait, at `rate` bytes a second.
    fn exceeded(&mut self, rate: f64, now: Instant) -> bool {
        let elapsed = self
            .last
            .map_or(1.0, |l| now.saturating_duration_since(l).as_secs_f64());
        self.last = Some(now);
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.tokens <= 0.0
    }

    fn record(&mut self, bytes: usize) {
        self.tokens -= bytes as f64;
    }
}

/// This shard's share of a throttle rate (`*.replication.throttled.rate`) of the node, if the
/// traffic of follower `follower` is throttled: this node's replica of `partition` is listed
/// in the topic's `list_key` config (the leader list names serving replicas, the follower list
/// fetching ones) and the follower is outside the ISR (KIP-73 throttles only those, so that
/// the high watermark never waits for a quota).
fn throttle_rate(
    sh: &Shard,
    topic: &str,
    partition: i32,
    follower: i32,
    list_key: &str,
    rate_key: &str,
) -> Option<f64> {
    let img = sh.node.image();
    let rate: f64 = img
        .cluster
        .as_ref()?
        .broker_config(sh.node.node_id, rate_key)?
        .parse::<i64>()
        .ok()? as f64;
    let t = img.topic(topic)?;
    let a = t.assignments.get(partition as usize)?;
    if a.isr.contains(&follower) {
        return None;
    }
    let me = sh.node.node_id;
    let index = img.cluster.as_ref().map_or(0, |c| c.applied_index);
    let listed = THROTTLE_LISTS.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != index {
            // A new image: lists are parsed again as asked for (bounded by the topics).
            *c = (index, HashMap::new());
        }
        let parsed =
            c.1.entry((topic.to_string(), list_key.to_string()))
                .or_insert_with(|| {
                    t.configs
                        .get(list_key)
                        .and_then(|v| crate::cluster::topic_config::parse_throttled_replicas(v))
                        .map(|l| l.map(|pairs| pairs.into_iter().collect()))
                        .unwrap_or_else(|| Some(HashSet::new()))
                });
        parsed
            .as_ref()
            .is_none_or(|set| set.contains(&(partition, me)))
    });
    listed.then(|| rate / sh.node.shards().max(1) as f64)
}

/// Brings this shard's replicas in line with the node's image: each open replica learns its
/// role and ISR, and the partitions this shard follows get fetchers.
pub async fn sync_shard(sh: Rc<Shard>) {
    let node = sh.node.clone();
    let me = node.node_id;
    let generation = SYNC_GENERATION.with(|g| {
        g.set(g.get() + 1);
        g.get()
    });
    let current = || SYNC_GENERATION.with(|g| g.get()) == generation;
    let mut by_leader: BTreeMap<Fetcher, BTreeSet<Key>> = BTreeMap::new();
    let fetchers = node.tuning.node.num_replica_fetchers.max(1);
    let mut roles: Vec<(Key, usize, i32, i32, Vec<i32>)> = Vec::new();
    // Replicas this node held and no longer does (a reassignment moved them away).
    let mut moved_away: Vec<Key> = Vec::new();
    let check_strays;
    {
        let img = node.image();
        for part in sh.open_partitions() {
            let held = img.topic(&part.topic).is_none_or(|t| {
                t.assignments.is_empty()
                    || t.assignments
                        .get(part.index as usize)
                        .is_none_or(|a| a.replicas.contains(&me))
            });
            if !held {
                moved_away.push((part.topic.clone(), part.index));
            }
        }
        // Only once this process's own registration is unfenced: the image is then at least
        // as new as the registration (a stale one could name a replica moved back here since).
        let epoch = node.broker_epoch.load(std::sync::atomic::Ordering::Relaxed);
        let unfenced = epoch >= 0
            && img.cluster.as_ref().is_some_and(|c| {
                c.brokers
                    .iter()
                    .any(|b| b.id == me && b.epoch == epoch && !b.fenced)
            });
        check_strays = unfenced && FOLLOWED.with(|f| !f.borrow().strays_checked);
        if check_strays {
            for t in img.topics.values() {
                for (p, a) in t.assignments.iter().enumerate() {
                    let p = p as i32;
                    if a.replicas.contains(&me) || node.shard_of(&t.name, p) != sh.id {
                        continue;
                    }
                    let dir = crate::cluster::metadata::partition_dir(&node.data_dir, &t.name, p);
                    if dir.exists() {
                        moved_away.push((Arc::from(t.name.as_str()), p));
                    }
                }
            }
        }
        for t in img.topics.values() {
            let name: Arc<str> = Arc::from(t.name.as_str());
            for (p, a) in t.assignments.iter().enumerate() {
                let p = p as i32;
                if !a.replicas.contains(&me) || node.shard_of(&t.name, p) != sh.id {
                    continue;
                }
                let leader = a.leader == me;
                let followers: Vec<i32> = a.isr.iter().copied().filter(|r| *r != me).collect();
                roles.push((
                    (name.clone(), p),
                    a.replicas.len(),
                    a.leader,
                    a.leader_epoch,
                    followers,
                ));
                if !leader && a.leader >= 0 && a.replicas.len() > 1 {
                    by_leader
                        .entry((a.leader, fetcher_index(&t.name, p, fetchers)))
                        .or_default()
                        .insert((name.clone(), p));
                }
            }
        }
    }
    for ((t, p), replicas, leader, leader_epoch, isr_followers) in roles {
        let part = sh.replica(&t, p).await;
        if !current() {
            return;
        }
        if let Some(part) = part {
            part.set_replication(replicas, leader, leader_epoch, me, isr_followers);
        }
    }
    let start: Vec<Fetcher> = FOLLOWED.with(|f| {
        let mut f = f.borrow_mut();
        f.by_leader = by_leader;
        let wanted: Vec<Fetcher> = f.by_leader.keys().copied().collect();
        let start: Vec<Fetcher> = wanted
            .into_iter()
            .filter(|l| !f.running.contains(l))
            .collect();
        f.running.extend(start.iter().copied());
        start
    });
    for fetcher in start {
        glommio::spawn_local(fetch_loop(sh.clone(), fetcher)).detach();
    }
    let keeper = FOLLOWED.with(|f| !std::mem::replace(&mut f.borrow_mut().isr_keeper, true));
    if keeper {
        glommio::spawn_local(isr_keeper(sh.clone())).detach();
    }
    // After the roles: a removal waits for the open lock, which leadership must not wait for.
    for (t, p) in moved_away {
        if !current() {
            // A newer image's run takes over (and looks for strays again if this one did).
            return;
        }
        sh.remove_replica(&t, p).await;
    }
    if check_strays {
        FOLLOWED.with(|f| f.borrow_mut().strays_checked = true);
        if sh.id == 0 {
            // Replicas set aside for deletion by an earlier process that died before deleting.
            glommio::spawn_local(remove_set_aside(node.data_dir.clone())).detach();
        }
    }
}

/// Deletes `<topic>-<partition>.<nanos>-delete` directories (`Shard::remove_replica`) left in
/// the data directory by a process that stopped between setting one aside and deleting it.
async fn remove_set_aside(data_dir: std::path::PathBuf) {
    let dirs = crate::log::storage::off_reactor(move || {
        std::fs::read_dir(&data_dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| {
                        p.is_dir()
                            && p.file_name()
                                .and_then(|n| n.to_str())
                                .is_some_and(|n| n.ends_with("-delete"))
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    })
    .await;
    for d in dirs {
        match crate::log::storage::remove_dir_all(d.clone()).await {
            Ok(()) => tracing::info!("removed {}, left by an earlier run", d.display()),
            Err(e) => tracing::warn!("cannot remove {}: {e}", d.display()),
        }
    }
}

/// On the leaders of this shard: asks the controller (AlterPartition) to take followers that
/// fell `replica.lag.time.max.ms` behind out of the ISR and to let caught-up ones back in. The
/// new ISR takes effect when the committed image says so.
async fn isr_keeper(sh: Rc<Shard>) {
    use kafka_protocol::messages::alter_partition_request::{
        AlterPartitionRequest, PartitionData as AlterData, TopicData as AlterTopic,
    };
    let node = sh.node.clone();
    let lag_max = Duration::from_millis(node.tuning.node.replica_lag_time_max_ms.max(100));
    // Bounded by the process: one pass per ISR_CHECK over this shard's open partitions.
    loop {
        glommio::timer::sleep(ISR_CHECK).await;
        let epoch = node.broker_epoch.load(std::sync::atomic::Ordering::Relaxed);
        if epoch < 0 {
            continue;
        }
        let mut req = AlterPartitionRequest::default();
        req.broker_id = BrokerId(node.node_id);
        req.broker_epoch = epoch;
        for part in sh.open_partitions() {
            if let Some(hw) = part.hw_to_save(HW_CHECKPOINT_EVERY) {
                let dir = crate::cluster::metadata::partition_dir(
                    &node.data_dir,
                    &part.topic,
                    part.index,
                );
                match crate::log::recovery::write_high_watermark(&dir, hw).await {
                    Ok(()) => part.hw_saved(hw),
                    Err(e) => tracing::warn!(
                        "cannot persist the high watermark of {}-{}: {e}",
                        part.topic,
                        part.index
                    ),
                }
            }
            let img = node.image();
            let Some(t) = img.topic(&part.topic) else {
                continue;
            };
            let Some(a) = t.assignments.get(part.index as usize) else {
                continue;
            };
            if a.leader != node.node_id {
                continue;
            }
            // KIP-841: a fenced broker is not eligible to join the ISR, however caught up it
            // looked when it died. Proposing it would count it for the high watermark (as a
            // pending addition) until replica.lag.time.max.ms had passed, holding up every
            // acks=all write to the partition for that long.
            let eligible: Vec<i32> = a
                .replicas
                .iter()
                .copied()
                .filter(|r| {
                    *r == node.node_id
                        || img
                            .cluster
                            .as_ref()
                            .is_none_or(|c| c.brokers.iter().any(|b| b.id == *r && !b.fenced))
                })
                .collect();
            let Some(isr) = part.wanted_isr(node.node_id, &eligible, lag_max) else {
                continue;
            };
            tracing::info!(
                "{}-{}: asking to change the ISR from {:?} to {isr:?}",
                part.topic,
                part.index,
                a.isr
            );
            let mut pd = AlterData::default();
            pd.partition_index = part.index;
            pd.leader_epoch = a.leader_epoch;
            pd.partition_epoch = a.partition_epoch;
            pd.new_isr = isr.into_iter().map(BrokerId).collect();
            match req.topics.iter_mut().find(|x| x.topic_id == t.id) {
                Some(x) => x.partitions.push(pd),
                None => {
                    let mut x = AlterTopic::default();
                    x.topic_id = t.id;
                    x.partitions.push(pd);
                    req.topics.push(x);
                }
            }
        }
        if req.topics.is_empty() {
            continue;
        }
        match crate::server::controller::forward_quick(&node, 2, &req).await {
            Ok(resp) => {
                for t in resp.topics {
                    for p in t.partitions.iter().filter(|p| p.error_code != ec::NONE) {
                        tracing::debug!(
                            "AlterPartition {}: error {}",
                            p.partition_index,
                            p.error_code
                        );
                    }
                }
                // The change is visible once the image is: wait a moment before asking again.
                glommio::timer::sleep(ISR_CHECK).await;
            }
            Err(e) => tracing::debug!("AlterPartition: {e:#}"),
        }
    }
}

fn followed_from(fetcher: Fetcher) -> Vec<Key> {
    FOLLOWED.with(|f| {
        f.borrow()
            .by_leader
            .get(&fetcher)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    })
}

fn leader_addr(sh: &Shard, leader: i32) -> Option<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    let img = sh.node.image();
    let b = img
        .cluster
        .as_ref()?
        .brokers
        .iter()
        .find(|b| b.id == leader)?
        .clone();
    format!("{}:{}", b.host, b.port)
        .to_socket_addrs()
        .ok()?
        .next()
}

/// One shard's fetcher from one leader: runs while the shard follows anything from it.
async fn fetch_loop(sh: Rc<Shard>, fetcher: Fetcher) {
    let leader = fetcher.0;
    let mut conn: Option<Conn> = None;
    let mut backoff = Duration::from_millis(50);
    loop {
        let keys = followed_from(fetcher);
        if keys.is_empty() {
            FOLLOWED.with(|f| f.borrow_mut().running.remove(&fetcher));
            return;
        }
        if conn.is_none() {
            let Some(addr) = leader_addr(&sh, leader) else {
                glommio::timer::sleep(Duration::from_millis(200)).await;
                continue;
            };
            match Conn::connect(addr, Duration::from_millis(500)).await {
                Ok(c) => {
                    conn = Some(c);
                    backoff = Duration::from_millis(50);
                }
                Err(_) => {
                    glommio::timer::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            }
        }
        let mut req = FetchRequest::default();
        req.replica_id = BrokerId(sh.node.node_id);
        let tuning = &sh.node.tuning.node;
        req.max_wait_ms = tuning.replica_fetch_wait_max_ms.clamp(0, 30_000) as i32;
        req.min_bytes = 1;
        req.max_bytes = tuning.replica_fetch_response_max_bytes.min(i32::MAX as u64) as i32;
        req.session_epoch = -1;
        let mut parts = Vec::new();
        let mut by_topic: BTreeMap<Arc<str>, Vec<FetchPartition>> = BTreeMap::new();
        for (t, p) in keys {
            let Some(mut part) = sh.replica(&t, p).await else {
                continue;
            };
            if let Some((to, start_over)) = part.take_truncation() {
                let follower = !part.replication().leader;
                let still = FOLLOWED.with(|f| {
                    f.borrow()
                        .by_leader
                        .get(&fetcher)
                        .is_some_and(|s| s.contains(&(t.clone(), p)))
                });
                if follower && still && (start_over || to < part.log.log_end_offset()) {
                    let replicas = part.replication().replicas;
                    match sh.truncate_replica(&part, to, start_over).await {
                        Some((reopened, end)) => {
                            reopened.truncated(end, replicas);
                            part = reopened;
                        }
                        None => continue,
                    }
                }
            }
            let me = sh.node.node_id;
            let throttled = throttle_rate(
                &sh,
                &t,
                p,
                me,
                "follower.replication.throttled.replicas",
                "follower.replication.throttled.rate",
            );
            if let Some(rate) = throttled {
                if FOLLOWER_QUOTA.with(|q| q.borrow_mut().exceeded(rate, Instant::now())) {
                    continue;
                }
            }
            let mut fp = FetchPartition::default();
            fp.partition = p;
            fp.fetch_offset = part.log.log_end_offset() as i64;
            fp.log_start_offset = part.log.log_start_offset() as i64;
            fp.partition_max_bytes = sh
                .node
                .tuning
                .node
                .replica_fetch_max_bytes
                .min(i32::MAX as u64) as i32;
            fp.current_leader_epoch = part.leader_epoch();
            fp.last_fetched_epoch = part.log.latest_epoch();
            by_topic.entry(t.clone()).or_default().push(fp);
            let epoch = part.leader_epoch();
            parts.push(((t, p), part, epoch));
        }
        if by_topic.is_empty() {
            // Everything followed from this leader waits for the follower quota to refill.
            glommio::timer::sleep(Duration::from_millis(50)).await;
            continue;
        }
        for (t, ps) in by_topic {
            let mut ft = FetchTopic::default();
            ft.topic = tn(&t);
            ft.partitions = ps;
            req.topics.push(ft);
        }
        let c = conn.as_mut().expect("connected above");
        let call = c.call(REPLICA_FETCH_VERSION, &req);
        let resp = match wire::within(Duration::from_secs(10), call).await {
            Some(Ok(r)) => r,
            _ => {
                conn = None;
                glommio::timer::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut progressed = false;
        for tr in resp.responses {
            for pd in tr.partitions {
                let key: Key = (Arc::from(tr.topic.0.as_str()), pd.partition_index);
                let Some((_, part, sent_epoch)) = parts.iter().find(|(k, _, _)| *k == key) else {
                    continue;
                };
                // An answer to a fetch sent under another leader epoch says nothing about the
                // current leader's log (Kafka's fetcher drops it the same way).
                if part.leader_epoch() != *sent_epoch {
                    continue;
                }
                // A late answer from a leader this shard no longer follows for it.
                let still = FOLLOWED.with(|f| {
                    f.borrow()
                        .by_leader
                        .get(&fetcher)
                        .is_some_and(|s| s.contains(&key))
                });
                if !still {
                    continue;
                }
                let diverged = pd.diverging_epoch.epoch >= 0 && pd.diverging_epoch.end_offset >= 0;
                if pd.error_code == ec::NONE && diverged {
                    part.truncate_for_divergence(
                        pd.diverging_epoch.epoch,
                        pd.diverging_epoch.end_offset as u64,
                    );
                    continue;
                }
                if pd.error_code != ec::NONE {
                    if pd.error_code == ec::OFFSET_OUT_OF_RANGE && pd.high_watermark >= 0 {
                        let end = part.log.log_end_offset();
                        if pd.log_start_offset > end as i64 {
                            tracing::warn!(
                                "replica of {}-{} ends at {end}, before the leader's log start {}: starting over there",
                                key.0,
                                key.1,
                                pd.log_start_offset
                            );
                            part.start_over_at(pd.log_start_offset as u64);
                        } else if part.log.latest_epoch() < 0 {
                            // Without epochs to compare, the high watermark is what is
                            // surely shared.
                            tracing::warn!(
                                "replica of {}-{} at {end} is past the leader's log: cutting back",
                                key.0,
                                key.1
                            );
                            part.truncate_later(pd.high_watermark as u64);
                        }
                    }
                    continue;
                }
                if let Some(records) = pd.records.filter(|r| !r.is_empty()) {
                    let Some(cfg) = sh.node.effective_config(&key.0) else {
                        continue;
                    };
                    let throttled = throttle_rate(
                        &sh,
                        &key.0,
                        key.1,
                        sh.node.node_id,
                        "follower.replication.throttled.replicas",
                        "follower.replication.throttled.rate",
                    );
                    if throttled.is_some() {
                        FOLLOWER_QUOTA.with(|q| q.borrow_mut().record(records.len()));
                    }
                    match part.append_replicated(records, &cfg, sh.cache_cap()).await {
                        Ok(_) => progressed = true,
                        Err((code, msg)) => {
                            // Dropped, never cut for: the next fetch names this log's end and
                            // last epoch, and the leader's DivergingEpoch decides any cut.
                            tracing::debug!(
                                "replica of {}-{}: not appending what the leader sent ({code}): {msg}",
                                key.0,
                                key.1
                            );
                        }
                    }
                }
                part.leader_hw(pd.high_watermark.max(0) as u64);
                part.follow_log_start(pd.log_start_offset).await;
            }
        }
        if !progressed {
            // The leader long-polls; a fast empty answer (an error) must not spin.
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The replica id of a fetch: a follower's node id, or -1 for a consumer.
pub fn replica_id(version: i16, req: &FetchRequest) -> i32 {
    if version >= 15 {
        req.replica_state.replica_id.0
    } else {
        req.replica_id.0
    }
}

#[derive(Clone)]
struct FollowerWant {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    max_bytes: usize,
    /// The leader epoch the follower believes in (KIP-320), -1 for none.
    current_epoch: i32,
    /// The epoch of the follower's last batch (KIP-279), -1 for none.
    last_fetched_epoch: i32,
    /// The follower's log start offset (the leader's low watermark follows it).
    log_start: i64,
}

struct FollowerGot {
    code: i16,
    hw: i64,
    log_start: i64,
    records: Vec<Bytes>,
    /// Where the follower's log leaves this one: (epoch, end offset).
    diverging: Option<EpochEnd>,
}

impl FollowerGot {
    fn error(code: i16) -> FollowerGot {
        FollowerGot {
            code,
            hw: -1,
            log_start: -1,
            records: Vec::new(),
            diverging: None,
        }
    }
}

/// A follower's fetch, on the leader: positions recorded, data served up to the synced end.
pub async fn serve_follower(sh: &Rc<Shard>, version: i16, req: FetchRequest) -> Vec<Bytes> {
    let node = sh.node.clone();
    let follower = replica_id(version, &req);
    let mut wants: Vec<(usize, FollowerWant)> = Vec::new();
    let mut shape: Vec<(Arc<str>, uuid::Uuid, Vec<i32>)> = Vec::new();
    {
        let img = node.image();
        for t in &req.topics {
            let meta = if version >= 13 {
                img.topic_by_id(&t.topic_id)
            } else {
                img.topic(t.topic.0.as_str())
            };
            let name: Arc<str> =
                Arc::from(meta.map(|m| m.name.as_str()).unwrap_or(t.topic.0.as_str()));
            let mut idx = Vec::new();
            for p in &t.partitions {
                idx.push(p.partition);
                wants.push((
                    node.shard_of(&name, p.partition),
                    FollowerWant {
                        topic: name.clone(),
                        partition: p.partition,
                        offset: p.fetch_offset,
                        max_bytes: p.partition_max_bytes.max(0) as usize,
                        current_epoch: p.current_leader_epoch,
                        log_start: p.log_start_offset,
                        last_fetched_epoch: if version >= 12 {
                            p.last_fetched_epoch
                        } else {
                            -1
                        },
                    },
                ));
            }
            shape.push((name, t.topic_id, idx));
        }
    }
    let deadline = Instant::now() + Duration::from_millis(req.max_wait_ms.clamp(0, 30_000) as u64);
    let shards = node.shards();
    let mut got = Vec::new();
    // Bounded: at most a few rounds, each after a wake-up or the deadline.
    for round in 0..8 {
        let ws: Vec<(usize, FollowerWant)> = wants.clone();
        let first = round == 0;
        got = crate::shard::fanout::per_shard(
            shards,
            ws,
            move |sh, ws: Vec<FollowerWant>| async move {
                let mut out = Vec::with_capacity(ws.len());
                for w in ws {
                    out.push(follower_read(&sh, follower, &w, first).await);
                }
                out
            },
        )
        .await;
        let any = got.iter().any(|g: &FollowerGot| {
            !g.records.is_empty() || g.code != ec::NONE || g.diverging.is_some()
        });
        if any || Instant::now() >= deadline {
            break;
        }
        wait_any(shards, &wants, deadline).await;
    }
    let mut got = got.into_iter();
    let mut topics = Vec::new();
    for (name, id, idx) in shape {
        let mut tr = FetchableTopicResponse::default();
        tr.topic = tn(&name);
        tr.topic_id = id;
        let mut recs = Vec::new();
        for p in idx {
            let g = got
                .next()
                .unwrap_or_else(|| FollowerGot::error(ec::UNKNOWN_SERVER_ERROR));
            let mut pd = PartitionData::default();
            pd.partition_index = p;
            pd.error_code = g.code;
            pd.high_watermark = g.hw;
            pd.last_stable_offset = g.hw;
            pd.log_start_offset = g.log_start;
            pd.preferred_read_replica = BrokerId(-1);
            if let Some(d) = g.diverging {
                pd.diverging_epoch.epoch = d.epoch;
                pd.diverging_epoch.end_offset = d.end_offset as i64;
            }
            pd.records = Some(Bytes::new());
            tr.partitions.push(pd);
            recs.push(g.records);
        }
        topics.push((tr, recs));
    }
    crate::server::handlers::fetch::encode_response(version, ec::NONE, 0, topics, &[])
}

async fn follower_read(sh: &Shard, follower: i32, w: &FollowerWant, record: bool) -> FollowerGot {
    let Some(part) = sh.partition(&w.topic, w.partition).await else {
        return FollowerGot::error(sh.node.not_served_code(&w.topic, w.partition));
    };
    if let Err(code) = part.check_current_epoch(w.current_epoch) {
        return FollowerGot::error(code);
    }
    let hw = part.high_watermark();
    let log_start = part.log.log_start_offset() as i64;
    // The follower's last batch is of an epoch that ended earlier here, or its log runs past
    // where that epoch ended: it cuts back before anything counts (KIP-279).
    if let Some(d) = part.diverging(w.last_fetched_epoch, w.offset) {
        return FollowerGot {
            code: ec::NONE,
            hw,
            log_start,
            records: Vec::new(),
            diverging: Some(d),
        };
    }
    // A fetch from past this log's end is a follower whose tail diverged: it gets
    // OFFSET_OUT_OF_RANGE below and counts for nothing until it has cut back.
    let is_replica = {
        let img = sh.node.image();
        img.topic(&w.topic)
            .and_then(|t| t.assignments.get(w.partition as usize))
            .is_some_and(|a| a.replicas.contains(&follower))
    };
    if record && is_replica && w.offset >= 0 && w.offset as u64 <= part.log.log_end_offset() {
        part.follower_fetched(follower, w.offset as u64, w.log_start);
    }
    let hw = part.high_watermark();
    let throttled = throttle_rate(
        sh,
        &w.topic,
        w.partition,
        follower,
        "leader.replication.throttled.replicas",
        "leader.replication.throttled.rate",
    );
    if let Some(rate) = throttled {
        if LEADER_QUOTA.with(|q| q.borrow_mut().exceeded(rate, Instant::now())) {
            // Nothing this time: the follower asks again once its long poll is over.
            return FollowerGot {
                code: ec::NONE,
                hw,
                log_start,
                records: Vec::new(),
                diverging: None,
            };
        }
    }
    match part.read_for_follower(w.offset, w.max_bytes).await {
        Ok(records) => {
            if throttled.is_some() {
                let n = records.iter().map(Bytes::len).sum();
                LEADER_QUOTA.with(|q| q.borrow_mut().record(n));
            }
            FollowerGot {
                code: ec::NONE,
                hw,
                log_start,
                records,
                diverging: None,
            }
        }
        Err(code) => FollowerGot {
            code,
            hw,
            log_start,
            records: Vec::new(),
            diverging: None,
        },
    }
}

/// Waits until any of the partitions gets new synced data, or the deadline.
async fn wait_any(shards: usize, wants: &[(usize, FollowerWant)], deadline: Instant) {
    let mut buckets: Vec<Vec<(Arc<str>, i32, i64)>> = (0..shards).map(|_| Vec::new()).collect();
    for (s, w) in wants {
        buckets[(*s).min(shards - 1)].push((w.topic.clone(), w.partition, w.offset));
    }
    let mut waits = Vec::new();
    for (shard, keys) in buckets.into_iter().enumerate() {
        if keys.is_empty() {
            continue;
        }
        waits.push(Box::pin(crate::shard::invoke(
            shard,
            move |sh| async move {
                let mut rxs = Vec::new();
                for (t, p, offset) in &keys {
                    if let Some(part) = sh.partition(t, *p).await {
                        rxs.push(part.wait_for_written());
                        // Data that arrived since the read would not wake us: look first.
                        if part.log.log_end_offset() as i64 > *offset {
                            return;
                        }
                    }
                }
                crate::notify::first_or_deadline(rxs, deadline).await;
            },
        )));
    }
    if waits.is_empty() {
        return;
    }
    crate::notify::first_or_deadline(waits, deadline).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_spread_over_fetchers_and_stay_with_theirs() {
        let mut used = [0usize; 4];
        for p in 0..400 {
            let i = fetcher_index("orders", p, 4);
            assert_eq!(i, fetcher_index("orders", p, 4));
            used[i] += 1;
        }
        assert!(used.iter().all(|n| *n > 60), "{used:?}");
        assert_eq!(fetcher_index("orders", 7, 1), 0);
        assert_eq!(fetcher_index("orders", 7, 0), 0);
    }

    #[test]
    fn quota_lets_a_second_of_traffic_through_then_paces_it() {
        let mut q = Quota::default();
        let t0 = Instant::now();
        let rate = 1000.0;
        assert!(!q.exceeded(rate, t0));
        q.record(1500);
        // Owed 500 bytes: throttled until half a second has refilled them.
        assert!(q.exceeded(rate, t0 + Duration::from_millis(400)));
        assert!(!q.exceeded(rate, t0 + Duration::from_millis(600)));
        // A long pause refills at most one second's worth.
        assert!(!q.exceeded(rate, t0 + Duration::from_secs(60)));
        q.record(1000);
        assert!(q.exceeded(rate, t0 + Duration::from_secs(60)));
    }
}
