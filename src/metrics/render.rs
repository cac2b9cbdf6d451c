//! Turns shard snapshots into Prometheus metric families and encodes them with the
//! `prometheus` crate's text encoder. Series carry a `shard` label; per-group and
//! per-partition series are capped (`TOP_GROUPS`, `TOP_PARTITIONS`) to bound cardinality.

use std::collections::{BTreeMap, HashMap};

use hdrhistogram::Histogram;
use kafka_protocol::messages::ApiKey;
use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram as PHistogram, LabelPair, Metric, MetricFamily, MetricType,
};

use super::Snapshot;

/// Latency buckets, in seconds: 50 µs to 10 s.
const BUCKETS_S: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Groups with the largest lag that get a series of their own.
const TOP_GROUPS: usize = 50;
/// Partitions with the most bytes through them that get series of their own.
const TOP_PARTITIONS: usize = 20;

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name(k.to_string());
            l.set_value(v.to_string());
            l
        })
        .collect()
}

struct Family {
    mf: MetricFamily,
}

impl Family {
    fn new(name: &str, help: &str, t: MetricType) -> Family {
        let mut mf = MetricFamily::default();
        mf.set_name(name.to_string());
        mf.set_help(help.to_string());
        mf.set_field_type(t);
        Family { mf }
    }

    fn counter(&mut self, l: &[(&str, &str)], v: f64) {
        let mut c = Counter::default();
        c.set_value(v);
        let mut m = Metric::default();
        m.set_label(labels(l));
        m.set_counter(c);
        self.mf.mut_metric().push(m);
    }

    fn gauge(&mut self, l: &[(&str, &str)], v: f64) {
        let mut g = Gauge::default();
        g.set_value(v);
        let mut m = Metric::default();
        m.set_label(labels(l));
        m.set_gauge(g);
        self.mf.mut_metric().push(m);
    }

    /// An HdrHistogram in microseconds as a Prometheus histogram in seconds.
    fn histogram(&mut self, l: &[(&str, &str)], h: &Histogram<u64>) {
        let mut ph = PHistogram::default();
        ph.set_sample_count(h.len());
        // The sum from the recorded values' equivalents: within the histogram's precision.
        let sum_us: f64 = h
            .iter_recorded()
            .map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64)
            .sum();
        ph.set_sample_sum(sum_us / 1e6);
        let buckets = BUCKETS_S
            .iter()
            .map(|&le| {
                let mut b = Bucket::default();
                b.set_upper_bound(le);
                let le_us = (le * 1e6) as u64;
                b.set_cumulative_count(h.count_between(0, le_us));
                b
            })
            .collect();
        ph.set_bucket(buckets);
        let mut m = Metric::default();
        m.set_label(labels(l));
        m.set_histogram(ph);
        self.mf.mut_metric().push(m);
    }
}

fn api_name(k: i16) -> String {
    ApiKey::try_from(k)
        .map(|a| format!("{a:?}"))
        .unwrap_or_else(|_| k.to_string())
}

fn error_name(code: i16) -> String {
    kafka_protocol::error::ResponseError::try_from_code(code)
        .map(|e| format!("{e:?}"))
        .unwrap_or_else(|| code.to_string())
}

/// The text exposition of `snaps`; `queue_depths[i]` is the number of jobs waiting in shard
/// i's mesh queue, `missing` the shards that did not answer this scrape.
pub fn render(snaps: &[Snapshot], queue_depths: &[usize], missing: usize) -> String {
    use MetricType::{COUNTER, GAUGE, HISTOGRAM};
    let mut fams: Vec<Family> = Vec::new();
    let mut f = |name: &str, help: &str, t: MetricType| {
        fams.push(Family::new(name, help, t));
        fams.len() - 1
    };
    let requests = f(
        "fjord_requests_total",
        "Requests answered, by shard (that read it) and API.",
        COUNTER,
    );
    let latency = f(
        "fjord_request_latency_seconds",
        "Request latency from decoded to answered, by shard and API.",
        HISTOGRAM,
    );
    let errors = f(
        "fjord_request_errors_total",
        "Error codes in responses (per partition where the API answers per partition), by shard, API and error.",
        COUNTER,
    );
    let pbytes = f(
        "fjord_produce_bytes_total",
        "Record batch bytes appended, by shard owning the partition.",
        COUNTER,
    );
    let precs = f(
        "fjord_produce_records_total",
        "Records appended, by shard owning the partition.",
        COUNTER,
    );
    let fbytes = f(
        "fjord_fetch_bytes_total",
        "Record batch bytes returned by Fetch, by shard that answered.",
        COUNTER,
    );
    let frecs = f(
        "fjord_fetch_records_total",
        "Records returned by Fetch, by shard that answered.",
        COUNTER,
    );
    let fsyncs = f(
        "fjord_fsync_total",
        "fdatasync calls on log segments.",
        COUNTER,
    );
    let fsync_lat = f(
        "fjord_fsync_latency_seconds",
        "fdatasync latency.",
        HISTOGRAM,
    );
    let dma_w = f(
        "fjord_dma_write_bytes_total",
        "Bytes written to segments with direct I/O.",
        COUNTER,
    );
    let dma_r = f(
        "fjord_dma_read_bytes_total",
        "Bytes read from segments with direct I/O.",
        COUNTER,
    );
    let hits = f(
        "fjord_batch_cache_hits_total",
        "Fetch reads served from the batch cache.",
        COUNTER,
    );
    let misses = f(
        "fjord_batch_cache_misses_total",
        "Fetch reads that went to disk.",
        COUNTER,
    );
    let idle_repeats = f(
        "fjord_fetch_idle_repeats_total",
        "Fetches without a session answered as their connection's last idle fetch: the same \
         request, nothing changed for its partitions.",
        COUNTER,
    );
    let read_ahead = f(
        "fjord_read_ahead_reads_total",
        "Reads that missed the batch cache, by how they were served: from the reader's window, \
         by an extent read ahead that had landed, by one still being read (waited for), or by \
         a disk read of their own.",
        COUNTER,
    );
    let cache_bytes = f(
        "fjord_batch_cache_bytes",
        "Bytes held by the batch caches of the shard's partitions.",
        GAUGE,
    );
    let cache_budget = f(
        "fjord_batch_cache_budget_bytes",
        "The shard's batch cache budget (memory.batch_cache_bytes_per_shard).",
        GAUGE,
    );
    let conns = f("fjord_connections", "Open client connections.", GAUGE);
    let conns_total = f(
        "fjord_connections_total",
        "Client connections accepted.",
        COUNTER,
    );
    let xs = f(
        "fjord_cross_shard_messages_total",
        "Jobs this shard sent to other shards.",
        COUNTER,
    );
    let qd = f(
        "fjord_cross_shard_queue_depth",
        "Jobs waiting in the shard's incoming mesh queue.",
        GAUGE,
    );
    let busy = f(
        "fjord_reactor_busy_seconds_total",
        "Time the shard's reactor spent running tasks and polling I/O (rate() = busy ratio).",
        COUNTER,
    );
    let tasks = f(
        "fjord_reactor_tasks_total",
        "Tasks the shard's reactor ran.",
        COUNTER,
    );
    let parts = f(
        "fjord_partitions",
        "Partitions the shard owns and has open.",
        GAUGE,
    );
    let groups = f(
        "fjord_groups",
        "Consumer groups the shard coordinates, by state.",
        GAUGE,
    );
    let lag = f(
        "fjord_group_lag_records",
        "Records behind the high watermark summed over a group's committed partitions (the largest lags only).",
        GAUGE,
    );
    let hot_in = f(
        "fjord_partition_produce_bytes_total",
        "Record batch bytes appended, for the busiest partitions only.",
        COUNTER,
    );
    let hot_out = f(
        "fjord_partition_fetch_bytes_total",
        "Record batch bytes fetched, for the busiest partitions only.",
        COUNTER,
    );
    let up = f(
        "fjord_scrape_shards_missing",
        "Shards that did not answer this scrape in time.",
        GAUGE,
    );
    fams[up].gauge(&[], missing as f64);

    let mut hwm: HashMap<(&str, i32), i64> = HashMap::new();
    let mut flows: HashMap<(&str, i32), (u64, u64)> = HashMap::new();
    for s in snaps {
        for (t, p, h) in &s.high_watermarks {
            hwm.insert((t.as_str(), *p), *h);
        }
        for (t, p, fl) in &s.flows {
            let e = flows.entry((t.as_str(), *p)).or_default();
            e.0 += fl.produce_bytes;
            e.1 += fl.fetch_bytes;
        }
    }
    let mut group_lag: Vec<(&str, i64)> = Vec::new();
    for s in snaps {
        let shard = s.shard.to_string();
        let sh = ("shard", shard.as_str());
        for (api, a) in &s.apis {
            let name = api_name(*api);
            let l = [sh, ("api", name.as_str())];
            fams[requests].counter(&l, a.requests as f64);
            if let Some(h) = &a.latency_us {
                fams[latency].histogram(&l, h);
            }
        }
        for (api, code, n) in &s.errors {
            let (a, e) = (api_name(*api), error_name(*code));
            fams[errors].counter(&[sh, ("api", &a), ("error", &e)], *n as f64);
        }
        let total = s.flows.iter().fold([0u64; 4], |acc, (_, _, f)| {
            [
                acc[0] + f.produce_bytes,
                acc[1] + f.produce_records,
                acc[2] + f.fetch_bytes,
                acc[3] + f.fetch_records,
            ]
        });
        fams[pbytes].counter(&[sh], total[0] as f64);
        fams[precs].counter(&[sh], total[1] as f64);
        fams[fbytes].counter(&[sh], total[2] as f64);
        fams[frecs].counter(&[sh], total[3] as f64);
        fams[fsyncs].counter(&[sh], s.fsyncs as f64);
        if let Some(h) = &s.fsync_us {
            fams[fsync_lat].histogram(&[sh], h);
        }
        fams[dma_w].counter(&[sh], s.dma_write_bytes as f64);
        fams[dma_r].counter(&[sh], s.dma_read_bytes as f64);
        fams[hits].counter(&[sh], s.cache_hits as f64);
        fams[misses].counter(&[sh], s.cache_misses as f64);
        fams[idle_repeats].counter(&[sh], s.idle_fetch_repeats as f64);
        for (how, n) in super::READ_AHEAD_SERVED.iter().zip(s.read_ahead) {
            fams[read_ahead].counter(&[sh, ("served", how)], n as f64);
        }
        fams[cache_bytes].gauge(&[sh], s.cache_bytes as f64);
        fams[cache_budget].gauge(&[sh], s.cache_budget_bytes as f64);
        fams[conns].gauge(&[sh], s.connections_open as f64);
        fams[conns_total].counter(&[sh], s.connections_total as f64);
        fams[xs].counter(&[sh], s.cross_shard_sent as f64);
        let depth = queue_depths.get(s.shard).copied().unwrap_or(0);
        fams[qd].gauge(&[sh], depth as f64);
        let core = s.core.to_string();
        fams[busy].counter(&[sh, ("core", &core)], s.busy_seconds);
        fams[tasks].counter(&[sh], s.tasks as f64);
        fams[parts].gauge(&[sh], s.partitions as f64);
        let mut by_state: BTreeMap<&str, u64> = BTreeMap::new();
        for (_, st) in &s.groups {
            *by_state.entry(st.as_str()).or_default() += 1;
        }
        for (st, n) in by_state {
            fams[groups].gauge(&[sh, ("state", st)], n as f64);
        }
        for (g, committed) in &s.committed {
            let behind: i64 = committed
                .iter()
                .filter_map(|(t, p, off)| hwm.get(&(t.as_str(), *p)).map(|h| (h - off).max(0)))
                .sum();
            group_lag.push((g.as_str(), behind));
        }
    }
    group_lag.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    for (g, behind) in group_lag.into_iter().take(TOP_GROUPS) {
        fams[lag].gauge(&[("group", g)], behind as f64);
    }
    let mut hot: Vec<((&str, i32), (u64, u64))> = flows.into_iter().collect();
    hot.sort_by(|a, b| {
        (b.1 .0 + b.1 .1)
            .cmp(&(a.1 .0 + a.1 .1))
            .then(a.0.cmp(&b.0))
    });
    for ((t, p), (inb, outb)) in hot.into_iter().take(TOP_PARTITIONS) {
        let ps = p.to_string();
        let l = [("topic", t), ("partition", ps.as_str())];
        fams[hot_in].counter(&l, inb as f64);
        fams[hot_out].counter(&l, outb as f64);
    }
    let families: Vec<MetricFamily> = fams
        .into_iter()
        .map(|f| f.mf)
        .filter(|mf| !mf.get_metric().is_empty())
        .collect();
    // The encoder refuses only families without a name or metrics, which were dropped above.
    prometheus::TextEncoder::new()
        .encode_to_string(&families)
        .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
}
