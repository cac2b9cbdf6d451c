//! Shards: one glommio executor per core, pinned, each owning a set of partitions outright.
//! Owns the executors, the cross-shard mesh and partition placement. Shards share nothing
//! mutable on the data path: another shard's partition is reached by sending it a job.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use arc_swap::ArcSwap;
use futures::channel::oneshot;
use glommio::sync::Semaphore;

use crate::cluster::metadata::{self, MetadataImage};
use crate::cluster::topic_config::EffectiveConfig;
use crate::config::Tuning;
use crate::partition::{Partition, PartitionRef};

/// A unit of work sent to another shard: it runs there and builds a shard-local future.
pub type Job = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// Node-wide, immutable after start except the metadata image (swapped whole, never locked on
/// reads) and the producer id counter.
pub struct Node {
    pub tuning: Tuning,
    pub data_dir: PathBuf,
    pub node_id: i32,
    pub advertised_host: String,
    pub advertised_port: i32,
    pub cluster_id: String,
    pub meta: ArcSwap<MetadataImage>,
    pub mesh: Vec<flume::Sender<Job>>,
    pub next_producer_id: AtomicI64,
    pub producer_id_block_end: AtomicI64,
}

impl Node {
    pub fn shards(&self) -> usize {
        self.mesh.len()
    }
    pub fn image(&self) -> arc_swap::Guard<Arc<MetadataImage>> {
        self.meta.load()
    }
    pub fn controller_shard(&self) -> usize {
        self.tuning.shards.controller_shard.min(self.shards() - 1)
    }
    pub fn shard_of(&self, topic: &str, partition: i32) -> usize {
        metadata::shard_of(topic, partition, self.shards())
    }
    pub fn effective_config(&self, topic: &str) -> Option<EffectiveConfig> {
        let img = self.image();
        img.topic(topic)
            .map(|t| EffectiveConfig::resolve(&t.configs, &self.tuning))
    }
}

pub struct Shard {
    pub id: usize,
    /// This shard's memory and I/O settings (tuning file, with its core's overrides).
    pub tuning: crate::config::ShardTuning,
    pub node: Arc<Node>,
    partitions: RefCell<HashMap<(Arc<str>, i32), PartitionRef>>,
    open_lock: Semaphore,
    pub groups: RefCell<Option<Rc<crate::group::GroupShard>>>,
    /// Fired by the shutdown job; the shard then flushes and its executor ends.
    pub stop_tx: RefCell<Option<oneshot::Sender<()>>>,
}

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
    pub fn new(id: usize, tuning: crate::config::ShardTuning, node: Arc<Node>) -> Shard {
        Shard {
            id,
            tuning,
            node,
            partitions: RefCell::new(HashMap::new()),
            open_lock: Semaphore::new(1),
            groups: RefCell::new(None),
            stop_tx: RefCell::new(None),
        }
    }

    /// The partition if this shard owns it and the topic has it; opens it on first use.
    pub async fn partition(&self, topic: &str, index: i32) -> Option<PartitionRef> {
        let key: (Arc<str>, i32) = (Arc::from(topic), index);
        if let Some(p) = self.partitions.borrow().get(&key) {
            return Some(p.clone());
        }
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
        let dir = metadata::partition_dir(&self.node.data_dir, topic, index);
        match Partition::open(key.0.clone(), index, dir).await {
            Ok(p) => {
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

/// Runs `f` on shard `target` and returns its result. Local calls run inline.
pub async fn invoke<F, Fut, R>(target: usize, f: F) -> R
where
    F: FnOnce(Rc<Shard>) -> Fut + Send + 'static,
    Fut: Future<Output = R> + 'static,
    R: Send + 'static,
{
    let me = local();
    if me.id == target {
        return f(me).await;
    }
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move || {
        Box::pin(async move {
            let r = f(local()).await;
            let _ = tx.send(r);
        })
    });
    crate::metrics::cross_shard_sent();
    if me.node.mesh[target].send(job).is_err() {
        // The target shard is gone (shutdown): wait forever would hang the client.
        return panic_free_never::<R>().await;
    }
    match rx.await {
        Ok(r) => r,
        Err(_) => panic_free_never().await,
    }
}

/// A future that never completes; used only while the process is shutting down, when the
/// connection task is about to be dropped with its executor.
async fn panic_free_never<R>() -> R {
    futures::future::pending::<R>().await
}

/// The job loop every shard runs: executes jobs sent by other shards.
pub async fn serve_jobs(rx: flume::Receiver<Job>) {
    while let Ok(job) = rx.recv_async().await {
        glommio::spawn_local(job()).detach();
    }
}
