//! Shards: one glommio executor per core (started by `cli.rs`), each owning a set of partitions
//! outright. Owns the `Shard` (its open partitions, its group coordinator, its memory budget),
//! the cross-shard mesh (`invoke`) and the fan-out of a request over the shards that own its
//! partitions (`fanout`); runs controller operations on the controller shard
//! (`on_controller`) and gives the group coordinator its offsets partitions (`OffsetsLog`).
//! Shards share nothing mutable on the data path: another shard's partition is reached by
//! sending it a job. Placement (which shard owns a partition) is `cluster::metadata::shard_of`.

pub mod budget;
pub mod fanout;

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;

use futures::channel::oneshot;
use futures::FutureExt;
use glommio::sync::Semaphore;

use crate::cluster::controller::{self, OpResult};
use crate::cluster::metadata;
use crate::cluster::node::Node;
use crate::config::Tuning;
use crate::group::{OffsetsLog, OFFSETS_TOPIC};
use crate::partition::{Partition, PartitionRef};

/// A unit of work sent to another shard: it runs there and builds a shard-local future.
pub type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// The cross-shard mesh: one bounded job queue per shard (`shards.job_queue_max`), indexed by
/// shard id. A sender waits while the target's queue is full. The target's job loop only
/// receives and spawns, never sends, so a full queue slows its senders down and cannot deadlock.
pub type Mesh = Arc<Vec<flume::Sender<Job>>>;

pub struct Shard {
    pub id: usize,
    /// This shard's memory and I/O settings (tuning file, with its core's overrides).
    pub tuning: crate::config::ShardTuning,
    pub node: Arc<Node>,
    pub mesh: Mesh,
    /// Request frames and unsent responses of this shard's connections draw from this.
    pub memory: Rc<budget::MemoryBudget>,
    partitions: RefCell<HashMap<(Arc<str>, i32), PartitionRef>>,
    open_lock: Semaphore,
    pub groups: RefCell<Option<Rc<crate::group::GroupShard>>>,
    /// Fired by the shutdown job; the shard then flushes and its executor ends.
    pub stop_tx: RefCell<Option<oneshot::Sender<()>>>,
}

/// A partition map key, looked up by `(&str, i32)` without building an `Arc<str>`.
trait PartitionKey {
    fn parts(&self) -> (&str, i32);
}

impl PartitionKey for (Arc<str>, i32) {
    fn parts(&self) -> (&str, i32) {
        (&self.0, self.1)
    }
}

impl PartitionKey for (&str, i32) {
    fn parts(&self) -> (&str, i32) {
        (self.0, self.1)
    }
}

impl<'a> std::borrow::Borrow<dyn PartitionKey + 'a> for (Arc<str>, i32) {
    fn borrow(&self) -> &(dyn PartitionKey + 'a) {
        self
    }
}

impl std::hash::Hash for dyn PartitionKey + '_ {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        // As `(Arc<str>, i32)` hashes: the tuple's fields in order.
        self.parts().hash(h)
    }
}

impl PartialEq for dyn PartitionKey + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn PartitionKey + '_ {}

thread_local! {
    static SHARD: RefCell<Option<Rc<Shard>>> = const { RefCell::new(None) };
}

/// The shard running on this thread. Panics only if called outside a shard thread, which is a
/// programming error, never a data-dependent condition.
pub fn local() -> Rc<Shard> {
    SHARD.with(|s| s.borrow().clone().expect("called outside a shard thread"))
}

pub fn install(shard: Rc<Shard>) {
    SHARD.with(|s| *s.borrow_mut() = Some(shard));
}

impl Shard {
    pub fn new(
        id: usize,
        tuning: crate::config::ShardTuning,
        node: Arc<Node>,
        mesh: Mesh,
    ) -> Shard {
        Shard {
            id,
            tuning,
            memory: budget::MemoryBudget::new(node.tuning.memory.inflight_bytes_per_shard),
            node,
            mesh,
            partitions: RefCell::new(HashMap::new()),
            open_lock: Semaphore::new(1),
            groups: RefCell::new(None),
            stop_tx: RefCell::new(None),
        }
    }

    /// The partition if this shard owns it, the topic has it and (in a cluster) this node leads
    /// it: what clients are served from. Opens it on first use.
    pub async fn partition(&self, topic: &str, index: i32) -> Option<PartitionRef> {
        if self.node.cluster.is_some() {
            // Leadership moves in a cluster: a partition open here is served only while this
            // node leads it.
            let img = self.node.image();
            let t = img.topic(topic)?;
            if !self.node.leads(t, index) {
                return None;
            }
        }
        self.open_replica(topic, index).await
    }

    /// This node's replica of the partition, leader or follower (the replica fetcher's).
    pub async fn replica(&self, topic: &str, index: i32) -> Option<PartitionRef> {
        {
            let img = self.node.image();
            let t = img.topic(topic)?;
            let hosted = t.assignments.is_empty()
                || t.assignments
                    .get(usize::try_from(index).ok()?)
                    .is_some_and(|a| a.replicas.contains(&self.node.node_id));
            if !hosted {
                return None;
            }
        }
        self.open_replica(topic, index).await
    }

    /// Closes this node's replica of the partition, cuts its log before `offset` (or, with
    /// `start_over`, empties it to start at `offset`) and opens it again: a follower whose tail
    /// may differ from its leader's. The whole runs under the open lock, so nobody reopens the
    /// files meanwhile. Returns the reopened replica and its new log end.
    pub async fn truncate_replica(
        &self,
        expected: &PartitionRef,
        offset: u64,
        start_over: bool,
    ) -> Option<(PartitionRef, u64)> {
        let (topic, index) = (expected.topic.clone(), expected.index);
        let key: (Arc<str>, i32) = (topic.clone(), index);
        let _permit = self.open_lock.acquire_permit(1).await.ok()?;
        // Only the replica the caller looked at: if another task reopened it meanwhile (a
        // fetcher of the previous leader, say), its files are that one's now.
        let current = self.partitions.borrow().get(&key).cloned()?;
        if !Rc::ptr_eq(&current, expected) {
            return None;
        }
        drop(current);
        let old = self.partitions.borrow_mut().remove(&key)?;
        // No write may start on the old object any more (a fetcher of another leader may
        // still hold it), then its running write is waited for.
        old.log.retire("replica closed for truncation");
        // Bounded: a follower's writes are awaited by its fetcher, and a removal of old
        // segments is short; 30 s covers a very slow disk.
        for _ in 0..30_000 {
            if old.is_idle() {
                break;
            }
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
        drop(old);
        let dir = metadata::partition_dir(&self.node.data_dir, &topic, index);
        let end = match crate::log::storage::off_reactor(move || {
            crate::log::recovery::truncate_blocking(&dir, offset, start_over)
        })
        .await
        {
            Ok(end) => end,
            Err(e) => {
                tracing::error!("cannot truncate {topic}-{index} to {offset}: {e}");
                return None;
            }
        };
        tracing::info!("truncated replica {topic}-{index} to {end}");
        let p = self.open_locked(key).await?;
        // Its high watermark and log start may differ from the closed replica's.
        p.log_start_moved();
        Some((p, end))
    }

    /// Closes and deletes this node's replica of a partition that the image no longer places
    /// here (a reassignment moved it away). Under the open lock, briefly: the replica leaves
    /// the shard, refuses writes (waiting acks=all producers are told leadership moved) and its
    /// directory is renamed aside (`<dir>.<nanos>-delete`, as Kafka names it); the files go in
    /// the background once its running write is done. Nothing happens if the image lists this
    /// node again by the time the lock is held.
    pub async fn remove_replica(&self, topic: &str, index: i32) {
        let key: (Arc<str>, i32) = (Arc::from(topic), index);
        let Ok(_permit) = self.open_lock.acquire_permit(1).await else {
            return;
        };
        if self.hosts(topic, index) {
            return;
        }
        let old = self.partitions.borrow_mut().remove(&key);
        if let Some(old) = &old {
            let (replicas, epoch) = (old.replication().replicas.max(2), old.leader_epoch());
            old.set_replication(replicas, -1, epoch, self.node.node_id, Vec::new());
            old.log.retire("replica moved to other nodes");
        }
        let dir = metadata::partition_dir(&self.node.data_dir, topic, index);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let aside = dir.with_file_name(format!("{topic}-{index}.{nanos}-delete"));
        let moved = {
            let (from, to) = (dir.clone(), aside.clone());
            crate::log::storage::off_reactor(move || match std::fs::rename(&from, &to) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                r => r.map(|()| true),
            })
            .await
        };
        match moved {
            Ok(false) => return,
            Ok(true) => {}
            Err(e) => {
                tracing::warn!("cannot set aside {}: {e}", dir.display());
                return;
            }
        }
        let (topic, index) = (topic.to_string(), index);
        glommio::spawn_local(async move {
            if let Some(old) = old {
                // Bounded: a follower's writes are awaited by its fetcher; 30 s covers a slow
                // disk. The files are renamed already: nothing reopens them meanwhile.
                for _ in 0..30_000 {
                    if old.is_idle() {
                        break;
                    }
                    glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
            match crate::log::storage::remove_dir_all(aside.clone()).await {
                Ok(()) => {
                    tracing::info!("removed replica {topic}-{index}: it moved to other nodes")
                }
                Err(e) => tracing::warn!("cannot remove {}: {e}", aside.display()),
            }
        })
        .detach();
    }

    /// Whether the image places a replica of the partition on this node (always on a single
    /// node, and for a topic the image does not know: nothing to decide on then).
    fn hosts(&self, topic: &str, index: i32) -> bool {
        let img = self.node.image();
        img.topic(topic).is_none_or(|t| {
            t.assignments.is_empty()
                || t.assignments
                    .get(index as usize)
                    .is_some_and(|a| a.replicas.contains(&self.node.node_id))
        })
    }

    async fn open_replica(&self, topic: &str, index: i32) -> Option<PartitionRef> {
        if let Some(p) = self.opened(topic, index) {
            return Some(p);
        }
        let key: (Arc<str>, i32) = (Arc::from(topic), index);
        {
            let img = self.node.image();
            let t = img.topic(topic)?;
            if index < 0 || index >= t.partitions {
                return None;
            }
        }
        let _permit = self.open_lock.acquire_permit(1).await.ok()?;
        if let Some(p) = self.partitions.borrow().get(&key) {
            return Some(p.clone());
        }
        // The image may have moved the replica away while this waited for the lock.
        if !self.hosts(topic, index) {
            return None;
        }
        self.open_locked(key).await
    }

    /// Opens a partition (the caller holds the open lock); in a cluster its replica learns
    /// its role from the image at once, so that no produce meets it unaware of its ISR.
    async fn open_locked(&self, key: (Arc<str>, i32)) -> Option<PartitionRef> {
        let (topic, index) = (key.0.clone(), key.1);
        let dir = metadata::partition_dir(&self.node.data_dir, &topic, index);
        let visibility = if self.node.tuning.visible_when_written() {
            crate::partition::Visibility::Written
        } else {
            crate::partition::Visibility::Synced
        };
        match Partition::open(key.0.clone(), index, dir, visibility).await {
            Ok(p) => {
                if self.node.cluster.is_some() {
                    let img = self.node.image();
                    let me = self.node.node_id;
                    let a = img
                        .topic(&topic)
                        .and_then(|t| t.assignments.get(index as usize));
                    if let Some(a) = a {
                        let followers = a.isr.iter().copied().filter(|r| *r != me).collect();
                        p.set_replication(
                            a.replicas.len(),
                            a.leader,
                            a.leader_epoch,
                            me,
                            followers,
                        );
                    }
                }
                p.set_lag_max(std::time::Duration::from_millis(
                    self.node.tuning.node.replica_lag_time_max_ms.max(100),
                ));
                let p = Rc::new(p);
                self.partitions.borrow_mut().insert(key, p.clone());
                Some(p)
            }
            Err(e) => {
                tracing::error!("cannot open partition {topic}-{index}: {e}");
                None
            }
        }
    }

    /// Each partition's cache cap: its own limit, or its share of the shard's budget when many
    /// partitions live here.
    pub fn cache_cap(&self) -> usize {
        let n = self.partitions.borrow().len().max(1);
        self.tuning
            .batch_cache_bytes_per_partition
            .min(self.tuning.batch_cache_bytes_per_shard / n)
    }

    /// The replica if this shard has it open (never opens one). No allocation: a fetch looks
    /// up every partition it names this way, each round.
    pub fn opened(&self, topic: &str, index: i32) -> Option<PartitionRef> {
        self.partitions
            .borrow()
            .get(&(topic, index) as &dyn PartitionKey)
            .cloned()
    }

    pub fn open_partitions(&self) -> Vec<PartitionRef> {
        self.partitions.borrow().values().cloned().collect()
    }

    /// Drops a deleted topic's partitions from this shard and removes their directories.
    pub fn drop_topic(&self, topic: &str) {
        let doomed: Vec<(Arc<str>, i32)> = self
            .partitions
            .borrow()
            .keys()
            .filter(|(t, _)| &**t == topic)
            .cloned()
            .collect();
        for k in doomed {
            self.partitions.borrow_mut().remove(&k);
            // Long-polls and idle fetches waiting on it answer now that it is gone.
            crate::partition::journal_gone(&k.0, k.1);
        }
    }

    pub async fn open_owned_partitions(&self) {
        let owned: Vec<(String, i32)> = {
            let img = self.node.image();
            img.topics
                .values()
                .flat_map(|t| (0..t.partitions).map(move |p| (t.name.clone(), p)))
                .filter(|(t, p)| self.node.shard_of(t, *p) == self.id)
                .collect()
        };
        for (t, p) in owned {
            self.partition(&t, p).await;
        }
    }
}

/// The group coordinator of this shard reads and appends to the `__consumer_offsets` partitions
/// the shard owns, and nothing else.
impl OffsetsLog for Shard {
    fn tuning(&self) -> &Tuning {
        &self.node.tuning
    }

    fn shard_id(&self) -> usize {
        self.id
    }

    fn offsets_leader_epoch(&self, partition: i32) -> Option<i32> {
        if self.node.shard_of(OFFSETS_TOPIC, partition) != self.id {
            return None;
        }
        if self.node.cluster.is_none() {
            // A single node coordinates every group, and nobody else writes its partitions.
            return Some(0);
        }
        let img = self.node.image();
        let t = img.topic(OFFSETS_TOPIC)?;
        if !self.node.leads(t, partition) {
            return None;
        }
        let a = t.assignments.get(usize::try_from(partition).ok()?);
        Some(a.map(|a| a.leader_epoch).unwrap_or(0))
    }

    fn metadata(&self) -> std::sync::Arc<crate::cluster::metadata::MetadataImage> {
        self.node.meta.load_full()
    }

    async fn offsets_partition(&self, partition: i32) -> Option<PartitionRef> {
        self.partition(OFFSETS_TOPIC, partition).await
    }

    async fn append_offsets(&self, partition: i32, batch: bytes::Bytes) -> Result<(), String> {
        let part = self
            .partition(OFFSETS_TOPIC, partition)
            .await
            .ok_or("offsets partition unavailable")?;
        let cfg = self
            .node
            .effective_config(OFFSETS_TOPIC)
            .ok_or("offsets topic missing")?;
        part.produce(batch, -1, &cfg, self.cache_cap())
            .await
            .map(|_| ())
            .map_err(|(_, m)| m)
    }
}

/// A cross-shard job that panicked (a bug): its caller gets this instead of waiting forever.
#[derive(Debug, Clone, thiserror::Error)]
#[error("job on shard {shard} panicked: {message}")]
pub struct JobPanicked {
    pub shard: usize,
    pub message: String,
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// Runs `f` on shard `target` and returns its result. Local calls run inline. A panic in the
/// job is re-raised in the caller (whose connection task turns it into a closed connection
/// with a log line), so that the caller never waits forever; use `try_invoke` to handle it.
pub async fn invoke<F, Fut, R>(target: usize, f: F) -> R
where
    F: FnOnce(Rc<Shard>) -> Fut + Send + 'static,
    Fut: Future<Output = R> + 'static,
    R: Send + 'static,
{
    match try_invoke(target, f).await {
        Ok(r) => r,
        Err(e) => std::panic::panic_any(e.to_string()),
    }
}

/// Runs `f` on shard `target`; a panic there (in `f` or in its future) answers the caller with
/// `JobPanicked` and leaves the target shard running.
pub async fn try_invoke<F, Fut, R>(target: usize, f: F) -> Result<R, JobPanicked>
where
    F: FnOnce(Rc<Shard>) -> Fut + Send + 'static,
    Fut: Future<Output = R> + 'static,
    R: Send + 'static,
{
    let me = local();
    if me.id == target {
        return Ok(f(me).await);
    }
    let (tx, rx) = oneshot::channel::<Result<R, JobPanicked>>();
    let job: Job = Box::new(move || {
        Box::pin(async move {
            let r = match std::panic::catch_unwind(AssertUnwindSafe(|| f(local()))) {
                Ok(fut) => AssertUnwindSafe(fut).catch_unwind().await,
                Err(p) => Err(p),
            };
            let r = r.map_err(|p| {
                let message = panic_message(&*p);
                tracing::error!("job on shard {target} panicked: {message}");
                JobPanicked {
                    shard: target,
                    message,
                }
            });
            let _ = tx.send(r);
        })
    });
    crate::metrics::cross_shard_sent();
    if me.mesh[target].send_async(job).await.is_err() {
        // The target shard is gone (shutdown): wait forever would hang the client.
        return panic_free_never().await;
    }
    match rx.await {
        Ok(r) => r,
        // The job was dropped unrun: only when the target executor ends (shutdown).
        Err(_) => panic_free_never().await,
    }
}

/// A future that never completes; used only while the process is shutting down, when the
/// connection task is about to be dropped with its executor.
async fn panic_free_never<R>() -> R {
    futures::future::pending::<R>().await
}

/// Copies this shard's figures for a metrics scrape: what its recorder counted and what the shard
/// owns (open partitions, groups, cache sizes). Runs on the shard, as a mesh job.
pub fn snapshot(shard: &Shard, core: usize) -> crate::metrics::Snapshot {
    let mut s = crate::metrics::recorded_snapshot();
    s.shard = shard.id;
    s.core = core;
    let parts = shard.open_partitions();
    s.partitions = parts.len() as u64;
    s.cache_budget_bytes = shard.tuning.batch_cache_bytes_per_shard as u64;
    for p in &parts {
        s.cache_bytes += p.log.cache_bytes() as u64;
        s.high_watermarks
            .push((p.topic.to_string(), p.index, p.high_watermark()));
    }
    // try_borrow: a snapshot must never be the one to panic on a borrow that a group task
    // holds; a busy coordinator is simply left out of this scrape.
    let groups = shard.groups.try_borrow().ok().and_then(|g| g.clone());
    if let Some(g) = groups {
        g.snapshot_into(&mut s);
    }
    s
}

/// Runs a controller operation on the controller shard, where every change to the metadata image
/// is serialized.
pub async fn on_controller<F, R>(node: &Node, f: F) -> R
where
    F: FnOnce(&Node) -> R + Send + 'static,
    R: Send + 'static,
{
    invoke(
        node.controller_shard(),
        move |sh| async move { f(&sh.node) },
    )
    .await
}

/// Deletes a topic: the controller unpublishes it, every shard drops its open partitions, then
/// the data is removed.
pub async fn delete_topic(node: &Node, name: String) -> OpResult<()> {
    let shards = node.shards();
    invoke(node.controller_shard(), move |sh| async move {
        let topic = controller::delete_topic(&sh.node, &name)?;
        let drops = (0..shards).map(|s| {
            let name = name.clone();
            invoke(s, move |sh| async move { sh.drop_topic(&name) })
        });
        futures::future::join_all(drops).await;
        for p in 0..topic.partitions {
            let dir = metadata::partition_dir(&sh.node.data_dir, &name, p);
            // Off the reactor: a big partition's unlinks would stall every partition here.
            if let Err(e) = crate::log::storage::remove_dir_all(dir.clone()).await {
                tracing::warn!("cannot remove {}: {e}", dir.display());
            }
        }
        tracing::info!("deleted topic {name}");
        Ok(())
    })
    .await
}

/// The job loop every shard runs: executes jobs sent by other shards.
pub async fn serve_jobs(rx: flume::Receiver<Job>) {
    while let Ok(job) = rx.recv_async().await {
        glommio::spawn_local(job()).detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lookup by `(&str, i32)` finds what was stored under `(Arc<str>, i32)`: the two hash
    /// and compare alike.
    #[test]
    fn partition_keys_borrow_as_str_pairs() {
        let mut m: HashMap<(Arc<str>, i32), u32> = HashMap::new();
        for p in 0..500 {
            m.insert((Arc::from(format!("t{}", p % 7).as_str()), p), p as u32);
        }
        for p in 0..500 {
            let name = format!("t{}", p % 7);
            assert_eq!(
                m.get(&(name.as_str(), p) as &dyn PartitionKey),
                Some(&(p as u32))
            );
            assert_eq!(m.get(&(name.as_str(), p + 500) as &dyn PartitionKey), None);
        }
    }
    use crate::cluster::metadata::MetadataImage;
    use crate::config::Tuning;
    use arc_swap::ArcSwap;
    use glommio::{LocalExecutorBuilder, Placement};
    use std::path::PathBuf;
    use std::sync::atomic::AtomicI64;
    use std::time::Duration;

    fn test_node(shards: usize) -> (Arc<Node>, Mesh, Vec<flume::Receiver<Job>>) {
        let (mut senders, mut receivers) = (Vec::new(), Vec::new());
        for _ in 0..shards {
            let (tx, rx) = flume::bounded::<Job>(16);
            senders.push(tx);
            receivers.push(rx);
        }
        let node = Arc::new(Node {
            tuning: Tuning::load(None).expect("default tuning"),
            data_dir: PathBuf::from("/nonexistent"),
            node_id: 0,
            advertised_host: "127.0.0.1".into(),
            advertised_port: 9092,
            cluster: None,
            broker_epoch: std::sync::atomic::AtomicI64::new(-1),
            cluster_id: "test".into(),
            meta: ArcSwap::from_pointee(MetadataImage::default()),
            shard_count: shards,
            next_producer_id: AtomicI64::new(0),
            producer_id_block_end: AtomicI64::new(0),
        });
        (node, Arc::new(senders), receivers)
    }

    /// Starts shard `id` on its own executor: it serves jobs until its stop job arrives.
    fn spawn_shard(
        id: usize,
        node: Arc<Node>,
        mesh: Mesh,
        rx: flume::Receiver<Job>,
        body: impl FnOnce() -> Pin<Box<dyn Future<Output = ()>>> + Send + 'static,
    ) -> glommio::ExecutorJoinHandle<()> {
        LocalExecutorBuilder::new(Placement::Unbound)
            .spawn(move || async move {
                let sh = Rc::new(Shard::new(id, node.tuning.for_core(0), node.clone(), mesh));
                let (stop_tx, stop_rx) = oneshot::channel();
                *sh.stop_tx.borrow_mut() = Some(stop_tx);
                install(sh);
                glommio::spawn_local(serve_jobs(rx)).detach();
                body().await;
                let _ = stop_rx.await;
            })
            .expect("executor")
    }

    async fn stop(target: usize) {
        invoke(target, |sh| async move {
            if let Some(tx) = sh.stop_tx.borrow_mut().take() {
                let _ = tx.send(());
            }
        })
        .await
    }

    /// A job that panics on another shard answers its caller (re-raised by `invoke`, as an
    /// error by `try_invoke`) instead of leaving it waiting forever, and the shard it ran on
    /// keeps serving.
    #[test]
    fn a_panicking_job_answers_its_caller_and_the_shard_keeps_serving() {
        let (node, mesh, mut rxs) = test_node(2);
        let rx1 = rxs.pop().expect("rx1");
        let rx0 = rxs.pop().expect("rx0");
        let h1 = spawn_shard(1, node.clone(), mesh.clone(), rx1, || Box::pin(async {}));
        let h0 = spawn_shard(0, node, mesh, rx0, || {
            Box::pin(async {
                let limit = Duration::from_secs(10);
                let job = invoke(1, |_sh| async {
                    if true {
                        panic!("boom in a job");
                    }
                    7
                });
                let raced = glommio::timer::timeout(limit, async {
                    Ok(AssertUnwindSafe(job).catch_unwind().await)
                })
                .await;
                let caught = raced.expect("the caller of a panicking job is answered");
                let message = panic_message(&*caught.expect_err("the panic reaches the caller"));
                assert!(message.contains("boom in a job"), "{message}");

                let r = try_invoke(1, |_sh| async {
                    if true {
                        panic!("boom again");
                    }
                    7
                })
                .await;
                assert!(matches!(&r, Err(e) if e.shard == 1 && e.message == "boom again"));

                let id = glommio::timer::timeout(limit, async {
                    Ok(try_invoke(1, |sh| async move { sh.id }).await)
                })
                .await
                .expect("shard 1 still serves jobs");
                assert_eq!(id.expect("no panic"), 1);
                stop(1).await;
                stop(0).await;
            })
        });
        h0.join().expect("shard 0 ran the checks");
        h1.join().expect("shard 1 survived the panics");
    }

    /// Both shards flood each other with jobs that call back into the sender's shard, through
    /// queues of 16: senders wait for room (the queue never grows past its bound) and every
    /// job completes, because a job loop never waits on a send.
    #[test]
    fn bounded_job_queues_apply_back_pressure_without_deadlock() {
        let (node, mesh, mut rxs) = test_node(2);
        assert!(mesh.iter().all(|tx| tx.capacity() == Some(16)));
        let rx1 = rxs.pop().expect("rx1");
        let rx0 = rxs.pop().expect("rx0");
        let flood = |me: usize| -> Pin<Box<dyn Future<Output = ()>>> {
            Box::pin(async move {
                let other = 1 - me;
                let jobs = (0..2000u64).map(|i| {
                    invoke(other, move |_sh| async move {
                        invoke(me, move |sh| async move { sh.id as u64 + i }).await
                    })
                });
                let all = futures::future::join_all(jobs);
                let done =
                    glommio::timer::timeout(Duration::from_secs(60), async { Ok(all.await) })
                        .await
                        .expect("every job completes");
                let want: Vec<u64> = (0..2000u64).map(|i| me as u64 + i).collect();
                assert_eq!(done, want);
            })
        };
        // Each shard keeps serving until both floods are done, then stops itself.
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let body = move |me: usize, done: Arc<std::sync::atomic::AtomicUsize>| {
            move || -> Pin<Box<dyn Future<Output = ()>>> {
                Box::pin(async move {
                    flood(me).await;
                    done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let deadline = std::time::Instant::now() + Duration::from_secs(60);
                    while done.load(std::sync::atomic::Ordering::SeqCst) < 2
                        && std::time::Instant::now() < deadline
                    {
                        glommio::timer::sleep(Duration::from_millis(10)).await;
                    }
                    stop(me).await;
                })
            }
        };
        let h1 = spawn_shard(1, node.clone(), mesh.clone(), rx1, body(1, done.clone()));
        let h0 = spawn_shard(0, node, mesh, rx0, body(0, done.clone()));
        h0.join().expect("shard 0 completed its jobs");
        h1.join().expect("shard 1 completed its jobs");
        assert_eq!(done.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
