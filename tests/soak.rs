//! Memory stays flat over time: the broker as a separate process, driven by librdkafka clients,
//! its resident memory (VmRSS from /proc/PID/status) sampled once a second.
//!
//! - `idle_long_polls_keep_memory_flat`: two consumers long-poll 500 idle partitions
//!   (fetch.wait.max.ms=20), the pattern that once leaked every timed-out fetch's waiter
//!   (about 4 MB/s).
//! - `soak_stream_group_and_idle_polls`: the same idle long-polls plus a steady produce/consume
//!   stream through a committing consumer group, for a minute.
//!
//! Memory legitimately grows while caches fill, so each test first warms up, then compares the
//! warm-up level with the rest of the run.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::Broker;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// Resident memory of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("broker status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

fn create_topic(b: &Broker, name: &str, partitions: i32) {
    let a: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .create()
        .expect("admin");
    let t = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let r = futures::executor::block_on(a.create_topics(&[t], &AdminOptions::new()))
        .expect("create_topics");
    for x in r {
        x.expect("topic created");
    }
}

/// Stops and joins the client threads when dropped, also when the test fails.
struct Clients {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Clients {
    fn new() -> Clients {
        Clients {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        }
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A consumer assigned every partition of an idle topic: it long-polls them all, each fetch
/// timing out after 20 ms with nothing to return. Counts the polls it made.
fn idle_poller(
    b: &Broker,
    topic: &str,
    partitions: i32,
    clients: &mut Clients,
    polls: Arc<AtomicU64>,
) {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .set("group.id", "idle-assign-only")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "20")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let stop = clients.stop.clone();
    clients.threads.push(std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if let Some(Err(e)) = c.poll(Duration::from_millis(100)) {
                panic!("idle consumer error: {e}");
            }
            polls.fetch_add(1, Ordering::Relaxed);
        }
    }));
}

/// Samples the broker's VmRSS once a second for `total`; returns (seconds since start, KiB).
fn sample_rss(b: &Broker, total: Duration, mut check: impl FnMut()) -> Vec<(f64, u64)> {
    let pid = b.child.as_ref().expect("running").id();
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut next = start;
    while start.elapsed() < total {
        check();
        samples.push((start.elapsed().as_secs_f64(), rss_kib(pid)));
        next += Duration::from_secs(1);
        // A measurement interval, not a synchronization: we want one sample per second.
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    samples
}

/// Resident memory after warm-up (mean of the samples in [warm_s - 3, warm_s]), at the end
/// (mean of the last 5 samples, so that one response in flight is not counted as growth), and
/// the growth between them, in KiB.
fn growth_after_warm_up(samples: &[(f64, u64)], warm_s: f64) -> (u64, u64, i64) {
    let mean = |xs: &[u64]| xs.iter().sum::<u64>() / xs.len().max(1) as u64;
    let base: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| *t >= warm_s - 3.0 && *t <= warm_s)
        .map(|s| s.1)
        .collect();
    assert!(!base.is_empty(), "samples cover the warm-up");
    let tail: Vec<u64> = samples.iter().rev().take(5).map(|s| s.1).collect();
    assert!(
        samples.last().map(|s| s.0).unwrap_or(0.0) > warm_s + 10.0,
        "samples run well past the warm-up"
    );
    let (base, end) = (mean(&base), mean(&tail));
    (base, end, end as i64 - base as i64)
}

fn print_samples(name: &str, samples: &[(f64, u64)]) {
    let line: Vec<String> = samples
        .iter()
        .map(|(t, k)| format!("{t:.0}s:{}MB", k / 1024))
        .collect();
    eprintln!("{name} VmRSS: {}", line.join(" "));
}

#[test]
fn idle_long_polls_keep_memory_flat() {
    let b = Broker::start();
    create_topic(&b, "idle", 500);
    let mut clients = Clients::new();
    let polls = Arc::new(AtomicU64::new(0));
    for _ in 0..2 {
        idle_poller(&b, "idle", 500, &mut clients, polls.clone());
    }
    let samples = sample_rss(&b, Duration::from_secs(28), || {});
    let n = polls.load(Ordering::Relaxed);
    drop(clients);
    print_samples("idle long-polls", &samples);
    let (base, end, growth) = growth_after_warm_up(&samples, 8.0);
    eprintln!("idle long-polls: {n} polls; VmRSS {base} KiB after warm-up, {end} KiB at the end, growth {growth} KiB");
    assert!(n > 100, "the consumers polled ({n} polls)");
    assert!(
        growth < 8 * 1024,
        "resident memory grew {growth} KiB in 20 s of idle long-polls ({base} -> {end} KiB)"
    );
}

#[test]
fn soak_stream_group_and_idle_polls() {
    // Small batch caches, so that they are full well within the warm-up.
    let tmp = tempfile::tempdir().unwrap();
    let text = fjord::config::DEFAULT_TUNING.replace(
        "batch_cache_bytes_per_partition = 8388608",
        "batch_cache_bytes_per_partition = 262144",
    );
    assert!(text.contains("batch_cache_bytes_per_partition = 262144"));
    let cfg = tmp.path().join("tuning.toml");
    std::fs::write(&cfg, text).unwrap();
    let b = Broker::start_with(&["--config", cfg.to_str().unwrap()]);
    create_topic(&b, "stream", 4);
    create_topic(&b, "idle", 300);
    let mut clients = Clients::new();
    let polls = Arc::new(AtomicU64::new(0));
    for _ in 0..2 {
        idle_poller(&b, "idle", 300, &mut clients, polls.clone());
    }

    // A steady stream: ~2,000 records of 200 bytes a second, acks=all.
    let produced = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    {
        let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", b.bootstrap())
            .set("acks", "all")
            .set("linger.ms", "5")
            .create()
            .expect("producer");
        let (stop, produced) = (clients.stop.clone(), produced.clone());
        let value = vec![b's'; 200];
        clients.threads.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..20 {
                    let key = (i % 64).to_string();
                    if p.send(BaseRecord::to("stream").key(&key).payload(&value))
                        .is_ok()
                    {
                        produced.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                }
                // Pacing, not synchronization: 20 records every 10 ms.
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = p.flush(Duration::from_secs(10));
        }));
    }
    // A group member that consumes the stream and commits every 500 records.
    let consumed = Arc::new(AtomicU64::new(0));
    let commits = Arc::new(AtomicU64::new(0));
    {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", b.bootstrap())
            .set("group.id", "soak-group")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("group consumer");
        c.subscribe(&["stream"]).expect("subscribe");
        let (stop, consumed, commits, failed) = (
            clients.stop.clone(),
            consumed.clone(),
            commits.clone(),
            failed.clone(),
        );
        clients.threads.push(std::thread::spawn(move || {
            let mut since_commit = 0;
            while !stop.load(Ordering::Relaxed) {
                match c.poll(Duration::from_millis(100)) {
                    Some(Ok(m)) => {
                        assert_eq!(m.payload().map(|p| p.len()), Some(200));
                        consumed.fetch_add(1, Ordering::Relaxed);
                        since_commit += 1;
                        if since_commit >= 500 {
                            since_commit = 0;
                            match c.commit_consumer_state(CommitMode::Sync) {
                                Ok(()) => commits.fetch_add(1, Ordering::Relaxed),
                                Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                            };
                        }
                    }
                    Some(Err(_)) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {}
                }
            }
        }));
    }

    let samples = sample_rss(&b, Duration::from_secs(70), || {});
    let (n_prod, n_cons, n_commits, n_failed) = (
        produced.load(Ordering::Relaxed),
        consumed.load(Ordering::Relaxed),
        commits.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    drop(clients);
    print_samples("soak", &samples);
    let (base, end, growth) = growth_after_warm_up(&samples, 20.0);
    eprintln!(
        "soak: {n_prod} produced, {n_cons} consumed, {n_commits} commits, {n_failed} errors; \
         VmRSS {base} KiB after warm-up, {end} KiB at the end, growth {growth} KiB"
    );
    assert!(
        n_prod > 50_000,
        "the stream ran ({n_prod} records produced)"
    );
    assert!(
        n_cons > n_prod / 2,
        "the group kept up ({n_cons} of {n_prod} consumed)"
    );
    assert!(n_commits > 50, "the group committed ({n_commits} commits)");
    assert!(
        growth < 6 * 1024,
        "resident memory grew {growth} KiB in 50 s of steady traffic ({base} -> {end} KiB)"
    );
}
