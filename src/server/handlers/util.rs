//! Small helpers shared by handlers: string conversions and fan-out over shards.

use std::future::Future;
use std::rc::Rc;

use kafka_protocol::messages::TopicName;
use kafka_protocol::protocol::StrBytes;

use crate::shard::{invoke, Shard};

pub fn sb(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

pub fn tn(s: &str) -> TopicName {
    TopicName(sb(s))
}

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
