//! Metrics: what each shard counts, and the Prometheus text that shows it.
//!
//! Recording is shard-local and lock-free: every shard thread keeps plain `Cell` counters and
//! HdrHistograms in a thread-local `Recorder`; nothing is shared between cores on the hot path.
//! A scrape (`server/metrics_endpoint.rs`, a small std thread outside the shards) sends each
//! shard a job through the mesh; the job copies that shard's figures into a `Snapshot`
//! (`shard::snapshot`), and the endpoint renders the snapshots with the `prometheus` crate's
//! text encoder. A shard that does not answer within the scrape timeout is left out of that
//! scrape (and counted), never waited on forever.
//!
//! Owns: the recorder, snapshots and rendering. Imports nothing from the rest of the broker, so
//! every layer may record into it.

mod errors;
mod render;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

pub use errors::response_errors;
pub use render::render;

/// Latencies are kept in microseconds, from 1 µs to 60 s, at 2 significant digits (about 1%
/// error, a few KiB per histogram).
const LATENCY_US_MAX: u64 = 60_000_000;
const LATENCY_SIGFIG: u8 = 2;

/// Kafka API keys are below this (0–80 today); larger keys are not recorded.
const API_KEYS_MAX: usize = 128;

fn latency_histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts; failure would be a build defect.
    Histogram::new_with_bounds(1, LATENCY_US_MAX, LATENCY_SIGFIG).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, LATENCY_US_MAX)
}

#[derive(Clone, Default)]
pub struct ApiStats {
    pub requests: u64,
    pub latency_us: Option<Histogram<u64>>,
}

/// Bytes and records through one partition.
#[derive(Clone, Copy, Default, Debug, PartialEq)]
pub struct PartitionFlow {
    pub produce_bytes: u64,
    pub produce_records: u64,
    pub fetch_bytes: u64,
    pub fetch_records: u64,
}

/// One shard's counters. Only its own thread touches it.
#[derive(Default)]
struct Recorder {
    /// Set on shard threads when the endpoint is on: otherwise every hook returns at once,
    /// so a broker without --metrics-listen pays one thread-local read per hook.
    enabled: Cell<bool>,
    apis: RefCell<Vec<ApiStats>>,
    /// (api key, error code) → responses (or partitions of responses) carrying that error.
    errors: RefCell<HashMap<(i16, i16), u64>>,
    /// topic → partition index → flow. Looked up once per partition of a request.
    flows: RefCell<HashMap<Box<str>, Vec<PartitionFlow>>>,
    fsyncs: Cell<u64>,
    fsync_us: RefCell<Option<Histogram<u64>>>,
    dma_write_bytes: Cell<u64>,
    dma_read_bytes: Cell<u64>,
    cache_hits: Cell<u64>,
    cache_misses: Cell<u64>,
    idle_fetch_repeats: Cell<u64>,
    /// Disk reads of sequential readers, by how they were served (`READ_AHEAD_SERVED`).
    read_ahead: Cell<[u64; 4]>,
    connections_open: Cell<u64>,
    connections_total: Cell<u64>,
    cross_shard_sent: Cell<u64>,
    /// glommio hands out its executor stats as deltas (it resets them on each read).
    busy: Cell<Duration>,
    tasks: Cell<u64>,
}

thread_local! {
    static LOCAL: Recorder = Recorder::default();
}

/// Turns recording on for the calling (shard) thread.
pub fn enable_on_this_thread() {
    LOCAL.with(|r| r.enabled.set(true));
}

fn on() -> bool {
    LOCAL.with(|r| r.enabled.get())
}

/// A request of API `api` was answered after `started`.
pub fn request_done(api: i16, started: Instant) {
    if !on() {
        return;
    }
    let us = micros(started.elapsed());
    LOCAL.with(|r| {
        let mut apis = r.apis.borrow_mut();
        let i = api as usize;
        if i >= API_KEYS_MAX {
            return;
        }
        if apis.len() <= i {
            apis.resize_with(i + 1, ApiStats::default);
        }
        let a = &mut apis[i];
        a.requests += 1;
        let h = a.latency_us.get_or_insert_with(latency_histogram);
        // Clamped into the histogram's range above, so recording cannot fail.
        let _ = h.record(us);
    });
}

/// A response (or one partition of it) to `api` carried error `code`; 0 is ignored.
pub fn error(api: i16, code: i16) {
    if code == 0 || !on() {
        return;
    }
    LOCAL.with(|r| *r.errors.borrow_mut().entry((api, code)).or_insert(0) += 1);
}

fn with_flow(topic: &str, partition: i32, f: impl FnOnce(&mut PartitionFlow)) {
    if partition < 0 {
        return;
    }
    LOCAL.with(|r| {
        let mut flows = r.flows.borrow_mut();
        if !flows.contains_key(topic) {
            // Once per topic per shard, not per request.
            flows.insert(topic.into(), Vec::new());
        }
        if let Some(v) = flows.get_mut(topic) {
            let i = partition as usize;
            if v.len() <= i {
                v.resize(i + 1, PartitionFlow::default());
            }
            f(&mut v[i]);
        }
    });
}

/// Record batches appended to `topic`-`partition`: `records` as produced (batch bytes).
pub fn produced(topic: &str, partition: i32, records: &[u8]) {
    if !on() {
        return;
    }
    let (bytes, count) = (records.len() as u64, record_count(records));
    with_flow(topic, partition, |f| {
        f.produce_bytes += bytes;
        f.produce_records += count;
    });
}

/// Record batches served from `topic`-`partition`, as the chunks of a fetch response.
pub fn fetched(topic: &str, partition: i32, chunks: &[bytes::Bytes]) {
    if chunks.is_empty() || !on() {
        return;
    }
    let bytes: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    let count = chunks_record_count(chunks);
    with_flow(topic, partition, |f| {
        f.fetch_bytes += bytes;
        f.fetch_records += count;
    });
}

/// One fdatasync of a log, started at `started`.
pub fn fsync_done(started: Instant) {
    if !on() {
        return;
    }
    let us = micros(started.elapsed());
    LOCAL.with(|r| {
        r.fsyncs.set(r.fsyncs.get() + 1);
        let mut h = r.fsync_us.borrow_mut();
        let _ = h.get_or_insert_with(latency_histogram).record(us);
    });
}

pub fn dma_written(bytes: usize) {
    if !on() {
        return;
    }
    LOCAL.with(|r| {
        r.dma_write_bytes
            .set(r.dma_write_bytes.get() + bytes as u64)
    });
}

pub fn dma_read(bytes: usize) {
    if !on() {
        return;
    }
    LOCAL.with(|r| r.dma_read_bytes.set(r.dma_read_bytes.get() + bytes as u64));
}

/// A fetch without a session answered as its connection's last idle fetch (no decoding).
pub fn idle_fetch_repeat() {
    if !on() {
        return;
    }
    LOCAL.with(|r| r.idle_fetch_repeats.set(r.idle_fetch_repeats.get() + 1));
}

/// How a read that missed the batch cache was served.
#[derive(Clone, Copy)]
pub enum ReadServed {
    /// From the reader's window.
    Window,
    /// By an extent read ahead that had landed.
    ReadAhead,
    /// By an extent read ahead that it waited for.
    Waited,
    /// By a disk read of its own.
    Disk,
}

/// The `served` label of each `ReadServed`, in its order.
pub const READ_AHEAD_SERVED: [&str; 4] = ["window", "read_ahead", "read_ahead_waited", "disk"];

/// A read that missed the batch cache, served as `how`.
pub fn read_ahead_served(how: ReadServed) {
    if !on() {
        return;
    }
    LOCAL.with(|r| {
        let mut c = r.read_ahead.get();
        c[how as usize] += 1;
        r.read_ahead.set(c);
    });
}

/// A read served from the batch cache (`hit`) or from disk.
pub fn cache_lookup(hit: bool) {
    if !on() {
        return;
    }
    LOCAL.with(|r| {
        let c = if hit { &r.cache_hits } else { &r.cache_misses };
        c.set(c.get() + 1);
    });
}

pub fn cross_shard_sent() {
    if !on() {
        return;
    }
    LOCAL.with(|r| r.cross_shard_sent.set(r.cross_shard_sent.get() + 1));
}

/// Counts a client connection while it is alive.
pub struct ConnectionGuard(());

impl ConnectionGuard {
    pub fn open() -> ConnectionGuard {
        LOCAL.with(|r| {
            if !r.enabled.get() {
                return;
            }
            r.connections_open.set(r.connections_open.get() + 1);
            r.connections_total.set(r.connections_total.get() + 1);
        });
        ConnectionGuard(())
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        LOCAL.with(|r| {
            r.connections_open
                .set(r.connections_open.get().saturating_sub(1))
        });
    }
}

/// Record count of the v2 RecordBatches in `b` (a whole produce payload): each batch header
/// holds it at a fixed place, so this reads headers only, never records.
pub fn record_count(b: &[u8]) -> u64 {
    let mut n = 0u64;
    let mut pos = 0usize;
    // Bounded by the buffer: every step advances by a batch length of at least the header.
    while pos + BATCH_HEADER_BYTES <= b.len() {
        let len = i32::from_be_bytes([b[pos + 8], b[pos + 9], b[pos + 10], b[pos + 11]]);
        let count = i32::from_be_bytes([b[pos + 57], b[pos + 58], b[pos + 59], b[pos + 60]]);
        let total = 12 + len.max(0) as usize;
        if len < 49 || pos + total > b.len() {
            break;
        }
        n += count.max(0) as u64;
        pos += total;
    }
    n
}

/// Offset of records count (57) plus its 4 bytes.
const BATCH_HEADER_BYTES: usize = 61;

/// Like `record_count` over a fetch's chunks, where a batch may span chunks (a patched header
/// chunk followed by the rest of the batch) and the last one may be cut short.
fn chunks_record_count(chunks: &[bytes::Bytes]) -> u64 {
    if chunks.len() == 1 {
        return record_count(&chunks[0]);
    }
    // Rare multi-chunk case: cache reads give header + body pairs. Gather each pair's header
    // bytes on the stack; no record is copied.
    let mut n = 0u64;
    let mut head = [0u8; BATCH_HEADER_BYTES];
    let mut i = 0;
    while i < chunks.len() {
        let mut got = 0;
        let mut j = i;
        while got < BATCH_HEADER_BYTES && j < chunks.len() {
            let take = (BATCH_HEADER_BYTES - got).min(chunks[j].len());
            head[got..got + take].copy_from_slice(&chunks[j][..take]);
            got += take;
            j += 1;
        }
        if got < BATCH_HEADER_BYTES {
            break;
        }
        let len = i32::from_be_bytes([head[8], head[9], head[10], head[11]]);
        let count = i32::from_be_bytes([head[57], head[58], head[59], head[60]]);
        if len < 49 {
            break;
        }
        n += count.max(0) as u64;
        // Skip chunks until this batch's bytes are used up.
        let mut left = 12 + len as usize;
        while left > 0 && i < chunks.len() {
            if chunks[i].len() <= left {
                left -= chunks[i].len();
                i += 1;
            } else {
                // A batch ending inside a chunk: the rest of the chunk holds further batches.
                n += record_count(&chunks[i][left..]);
                i += 1;
                left = 0;
            }
        }
    }
    n
}

/// One shard's figures at one moment, sent to the scrape thread.
#[derive(Clone, Default)]
pub struct Snapshot {
    pub shard: usize,
    pub core: usize,
    pub apis: Vec<(i16, ApiStats)>,
    pub errors: Vec<(i16, i16, u64)>,
    /// (topic, partition, flow), for partitions that saw traffic through this shard.
    pub flows: Vec<(String, i32, PartitionFlow)>,
    pub fsyncs: u64,
    pub fsync_us: Option<Histogram<u64>>,
    pub dma_write_bytes: u64,
    pub dma_read_bytes: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub idle_fetch_repeats: u64,
    pub read_ahead: [u64; 4],
    pub cache_bytes: u64,
    pub cache_budget_bytes: u64,
    pub connections_open: u64,
    pub connections_total: u64,
    pub cross_shard_sent: u64,
    pub busy_seconds: f64,
    pub tasks: u64,
    /// Partitions this shard owns and has open.
    pub partitions: u64,
    /// (topic, partition, high watermark) of the partitions this shard owns.
    pub high_watermarks: Vec<(String, i32, i64)>,
    /// (group, state) of the groups this shard coordinates.
    pub groups: Vec<(String, String)>,
    /// group → (topic, partition, committed offset), for consumer lag.
    pub committed: Vec<(String, Vec<(String, i32, i64)>)>,
}

/// Copies what this thread's recorder counted; the shard adds what it owns (`shard::snapshot`).
pub fn recorded_snapshot() -> Snapshot {
    let stats = glommio::executor().executor_stats();
    LOCAL.with(|r| {
        r.busy.set(r.busy.get() + stats.total_runtime());
        r.tasks.set(r.tasks.get() + stats.tasks_executed());
        Snapshot {
            apis: r
                .apis
                .borrow()
                .iter()
                .enumerate()
                .filter(|(_, a)| a.requests > 0)
                .map(|(k, a)| (k as i16, a.clone()))
                .collect(),
            errors: r
                .errors
                .borrow()
                .iter()
                .map(|(&(a, c), &n)| (a, c, n))
                .collect(),
            flows: r
                .flows
                .borrow()
                .iter()
                .flat_map(|(t, v)| {
                    v.iter()
                        .enumerate()
                        .filter(|(_, f)| **f != PartitionFlow::default())
                        .map(move |(i, f)| (t.to_string(), i as i32, *f))
                })
                .collect(),
            fsyncs: r.fsyncs.get(),
            fsync_us: r.fsync_us.borrow().clone(),
            dma_write_bytes: r.dma_write_bytes.get(),
            dma_read_bytes: r.dma_read_bytes.get(),
            cache_hits: r.cache_hits.get(),
            cache_misses: r.cache_misses.get(),
            idle_fetch_repeats: r.idle_fetch_repeats.get(),
            read_ahead: r.read_ahead.get(),
            connections_open: r.connections_open.get(),
            connections_total: r.connections_total.get(),
            cross_shard_sent: r.cross_shard_sent.get(),
            busy_seconds: r.busy.get().as_secs_f64(),
            tasks: r.tasks.get(),
            ..Default::default()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(records: i32, body: usize) -> Vec<u8> {
        let mut b = vec![0u8; 61 + body];
        let len = (b.len() - 12) as i32;
        b[8..12].copy_from_slice(&len.to_be_bytes());
        b[57..61].copy_from_slice(&records.to_be_bytes());
        b
    }

    #[test]
    fn record_count_reads_every_batch_header_and_stops_at_a_cut() {
        let mut all = batch(3, 10);
        all.extend(batch(5, 0));
        all.extend(batch(7, 100));
        assert_eq!(record_count(&all), 15);
        // A fetch may end inside a batch: the partial one is not counted.
        assert_eq!(record_count(&all[..all.len() - 1]), 8);
        assert_eq!(record_count(&[]), 0);
        assert_eq!(record_count(&[0xff; 70]), 0);
    }

    #[test]
    fn chunked_batches_count_like_whole_ones() {
        let a = batch(3, 10);
        let b = batch(4, 50);
        let chunks: Vec<bytes::Bytes> = vec![
            bytes::Bytes::copy_from_slice(&a[..16]),
            bytes::Bytes::copy_from_slice(&a[16..]),
            bytes::Bytes::copy_from_slice(&b[..16]),
            bytes::Bytes::copy_from_slice(&b[16..]),
        ];
        assert_eq!(chunks_record_count(&chunks), 7);
    }

    #[test]
    fn recorder_counts_requests_errors_and_flows() {
        let t0 = Instant::now();
        request_done(0, t0);
        assert!(
            LOCAL.with(|r| r.apis.borrow().is_empty()),
            "off until enabled"
        );
        enable_on_this_thread();
        request_done(0, t0);
        request_done(0, t0);
        request_done(1, t0);
        request_done(500, t0);
        error(0, 0);
        error(0, 3);
        produced("t", 2, &batch(9, 20));
        fetched("t", 2, &[bytes::Bytes::from(batch(9, 20))]);
        LOCAL.with(|r| {
            let apis = r.apis.borrow();
            assert_eq!(apis[0].requests, 2);
            assert_eq!(apis[1].requests, 1);
            assert_eq!(r.errors.borrow().get(&(0, 3)), Some(&1));
            assert_eq!(r.errors.borrow().len(), 1);
            let f = r.flows.borrow()["t"][2];
            assert_eq!(
                (f.produce_bytes, f.produce_records, f.fetch_records),
                (81, 9, 9)
            );
        });
    }
}
