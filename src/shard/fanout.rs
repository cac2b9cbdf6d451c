//! Fan-out of one request over the shards that own its parts: bucket the parts by shard, run
//! each bucket on its shard (concurrently), and zip the answers back into the request's order.
//! Bounded by the request: one job per shard, one output per part.

use std::future::Future;
use std::rc::Rc;

use super::{invoke, Shard};
use crate::cluster::node::Node;
use crate::partition::PartitionRef;

/// Runs `f` once per shard over the items that shard owns, concurrently, and returns the
/// outputs in the order of `items`. `f` must return one output per input, in order.
pub async fn per_shard<I, O, F, Fut>(shards: usize, items: Vec<(usize, I)>, f: F) -> Vec<O>
where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(Rc<Shard>, Vec<I>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Vec<O>> + 'static,
{
    let n = items.len();
    let mut buckets: Vec<(Vec<usize>, Vec<I>)> =
        (0..shards).map(|_| (Vec::new(), Vec::new())).collect();
    for (i, (shard, item)) in items.into_iter().enumerate() {
        let b = &mut buckets[shard.min(shards - 1)];
        b.0.push(i);
        b.1.push(item);
    }
    let mut futs = Vec::new();
    let mut orders = Vec::new();
    for (shard, (order, its)) in buckets.into_iter().enumerate() {
        if its.is_empty() {
            continue;
        }
        let f = f.clone();
        orders.push(order);
        futs.push(invoke(shard, move |sh| f(sh, its)));
    }
    let results = futures::future::join_all(futs).await;
    let mut out: Vec<Option<O>> = (0..n).map(|_| None).collect();
    for (order, res) in orders.into_iter().zip(results) {
        for (i, o) in order.into_iter().zip(res) {
            out[i] = Some(o);
        }
    }
    out.into_iter()
        .map(|o| o.expect("every item answered by its shard"))
        .collect()
}

/// One part of a per-partition request: the partition it is for and its input there.
pub struct PartitionJob<I> {
    pub topic: String,
    pub partition: i32,
    pub input: I,
}

/// Runs `f` once per job on the shard that owns its partition, with that partition (None when
/// the topic or partition does not exist), and returns the outputs in the order of `jobs`.
/// Shards run concurrently; one shard's jobs run one after another.
pub async fn per_partition<I, O, F, Fut>(node: &Node, jobs: Vec<PartitionJob<I>>, f: F) -> Vec<O>
where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(Option<PartitionRef>, PartitionJob<I>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = O> + 'static,
{
    let keyed = jobs
        .into_iter()
        .map(|job| (node.shard_of(&job.topic, job.partition), job))
        .collect();
    per_shard(
        node.shards(),
        keyed,
        move |sh, jobs: Vec<PartitionJob<I>>| {
            let f = f.clone();
            async move {
                let mut out = Vec::with_capacity(jobs.len());
                for job in jobs {
                    let part = sh.partition(&job.topic, job.partition).await;
                    out.push(f(part, job).await);
                }
                out
            }
        },
    )
    .await
}
