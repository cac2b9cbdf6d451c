//! Latency histograms, live progress on stderr and the final report (table or JSON).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Latencies are recorded in microseconds, from 1 µs to one hour, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds are valid")
}

pub fn record_us(hist: &mut Histogram<u64>, d: Duration) {
    hist.saturating_record((d.as_micros() as u64).max(1));
}

pub const PERCENTILES: [(&str, f64); 5] = [
    ("p50", 50.0),
    ("p90", 90.0),
    ("p99", 99.0),
    ("p99.9", 99.9),
    ("p99.99", 99.99),
];

pub fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Counters shared by every executor of a run, read once a second by the main thread.
pub struct Progress {
    pub records: AtomicU64,
    pub bytes: AtomicU64,
    pub interval: Mutex<Histogram<u64>>,
    pub threads_done: AtomicUsize,
    pub live: bool,
}

impl Progress {
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress {
            records: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            interval: Mutex::new(new_hist()),
            threads_done: AtomicUsize::new(0),
            live: std::io::stderr().is_terminal(),
        })
    }

    pub fn add(&self, records: u64, bytes: u64) {
        self.records.fetch_add(records, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn merge_interval(&self, h: &mut Histogram<u64>) {
        if !self.live || h.is_empty() {
            return;
        }
        if let Ok(mut shared) = self.interval.lock() {
            let _ = shared.add(&*h);
        }
        h.reset();
    }

    /// Blocks until `threads` executors have finished, printing a line a second if stderr is
    /// a terminal.
    pub fn watch(&self, label: &str, threads: usize) {
        let start = Instant::now();
        let mut last = (Instant::now(), 0u64, 0u64);
        while self.threads_done.load(Ordering::Acquire) < threads {
            std::thread::sleep(Duration::from_millis(50));
            if !self.live || last.0.elapsed() < Duration::from_secs(1) {
                continue;
            }
            let now = Instant::now();
            let records = self.records.load(Ordering::Relaxed);
            let bytes = self.bytes.load(Ordering::Relaxed);
            let secs = (now - last.0).as_secs_f64();
            let p99 = match self.interval.lock() {
                Ok(mut h) => {
                    let v = if h.is_empty() {
                        None
                    } else {
                        Some(ms(h.value_at_quantile(0.99)))
                    };
                    h.reset();
                    v
                }
                Err(_) => None,
            };
            let p99 = p99
                .map(|v| format!("{v:.2} ms"))
                .unwrap_or_else(|| "-".into());
            eprintln!(
                "[{label}] {:>5.1}s  {:>10.0} rec/s  {:>8.1} MB/s  p99 {p99}",
                start.elapsed().as_secs_f64(),
                (records - last.1) as f64 / secs,
                (bytes - last.2) as f64 / secs / 1e6,
            );
            last = (now, records, bytes);
        }
    }
}

/// The outcome of one load run.
#[derive(Clone)]
pub struct Report {
    pub name: String,
    pub records: u64,
    /// Payload bytes (produce: record values; consume: record batch bytes fetched).
    pub bytes: u64,
    pub elapsed: Duration,
    pub latency: Option<Histogram<u64>>,
    pub errors: BTreeMap<String, u64>,
    pub extra: Vec<(String, Value)>,
}

/// The latencies a pipelined reader task measures: into its run's report, and (when the
/// progress line is live) into an interval histogram merged into it every 200 ms.
pub struct LatencyTap {
    interval: Histogram<u64>,
    last_merge: Instant,
}

impl LatencyTap {
    pub fn new() -> LatencyTap {
        LatencyTap {
            interval: new_hist(),
            last_merge: Instant::now(),
        }
    }

    /// A response that arrived at `now` to a request sent at `sent`, in a run started at `t0`.
    pub fn record(
        &mut self,
        r: &mut Report,
        progress: &Progress,
        t0: Instant,
        sent: Instant,
        now: Instant,
    ) {
        r.elapsed = now - t0;
        let lat = now.saturating_duration_since(sent);
        if let Some(h) = r.latency.as_mut() {
            record_us(h, lat);
        }
        if progress.live {
            record_us(&mut self.interval, lat);
            if self.last_merge.elapsed() > Duration::from_millis(200) {
                progress.merge_interval(&mut self.interval);
                self.last_merge = Instant::now();
            }
        }
    }
}

impl crate::proto::CountsErrors for Report {
    fn errors(&mut self) -> &mut BTreeMap<String, u64> {
        &mut self.errors
    }
}

impl Report {
    pub fn new(name: &str) -> Report {
        Report {
            name: name.to_string(),
            records: 0,
            bytes: 0,
            elapsed: Duration::ZERO,
            latency: None,
            errors: BTreeMap::new(),
            extra: Vec::new(),
        }
    }

    pub fn records_per_sec(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.records as f64 / s
        } else {
            0.0
        }
    }

    pub fn mb_per_sec(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.bytes as f64 / s / 1e6
        } else {
            0.0
        }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Folds another executor's partial report into this one (elapsed: the longest).
    pub fn merge(&mut self, other: Report) {
        self.records += other.records;
        self.bytes += other.bytes;
        self.elapsed = self.elapsed.max(other.elapsed);
        if let Some(h) = other.latency {
            match &mut self.latency {
                Some(mine) => {
                    let _ = mine.add(&h);
                }
                None => self.latency = Some(h),
            }
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_insert(0) += v;
        }
        for (k, v) in other.extra {
            if !self.extra.iter().any(|(mine, _)| *mine == k) {
                self.extra.push((k, v));
            }
        }
    }

    pub fn latency_ms(&self, q: f64) -> Option<f64> {
        self.latency
            .as_ref()
            .filter(|h| !h.is_empty())
            .map(|h| ms(h.value_at_percentile(q)))
    }

    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "command": self.name,
            "records": self.records,
            "bytes": self.bytes,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "records_per_s": self.records_per_sec(),
            "mb_per_s": self.mb_per_sec(),
            "errors": self.errors,
        });
        if let Some(h) = self.latency.as_ref().filter(|h| !h.is_empty()) {
            let mut lat = serde_json::Map::new();
            for (name, q) in PERCENTILES {
                lat.insert(format!("{name}_ms"), json!(ms(h.value_at_percentile(q))));
            }
            lat.insert("max_ms".into(), json!(ms(h.max())));
            lat.insert("mean_ms".into(), json!(h.mean() / 1000.0));
            lat.insert("count".into(), json!(h.len()));
            v["latency"] = Value::Object(lat);
        }
        for (k, val) in &self.extra {
            v[k] = val.clone();
        }
        v
    }

    pub fn print(&self, as_json: bool) {
        if as_json {
            println!("{}", self.to_json());
            return;
        }
        println!("| {} | value |", self.name);
        println!("| --- | ---: |");
        println!("| records | {} |", self.records);
        println!("| elapsed | {:.2} s |", self.elapsed.as_secs_f64());
        println!("| records/s | {:.0} |", self.records_per_sec());
        println!("| MB/s | {:.2} |", self.mb_per_sec());
        if let Some(h) = self.latency.as_ref().filter(|h| !h.is_empty()) {
            for (name, q) in PERCENTILES {
                println!(
                    "| latency {name} | {:.3} ms |",
                    ms(h.value_at_percentile(q))
                );
            }
            println!("| latency max | {:.3} ms |", ms(h.max()));
        }
        for (k, val) in &self.extra {
            println!("| {k} | {val} |");
        }
        if self.errors.is_empty() {
            println!("| errors | 0 |");
        }
        for (k, n) in &self.errors {
            println!("| error {k} | {n} |");
        }
    }
}
