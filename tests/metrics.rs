//! The Prometheus endpoint scraped while real clients (librdkafka through the `rdkafka` crate)
//! produce and consume, and `fjord top` driven in a real terminal (tmux) against a live broker.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{http_get, metrics_addr, Broker};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// Parsed samples: (name, labels) → value.
struct Samples(Vec<(String, HashMap<String, String>, f64)>);

impl Samples {
    fn scrape(addr: SocketAddr) -> Samples {
        let (head, body) = http_get(addr, "/metrics");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("text/plain; version=0.0.4"), "{head}");
        let mut v = Vec::new();
        for line in body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                .collect();
            v.push((name.to_string(), labels, value.parse().expect("value")));
        }
        Samples(v)
    }

    /// Sum of `name` over series whose labels include all of `want`.
    fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| l.get(*k).map(|x| x == v).unwrap_or(false))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    fn shards(&self) -> std::collections::BTreeSet<String> {
        self.0
            .iter()
            .filter_map(|(_, l, _)| l.get("shard").cloned())
            .collect()
    }
}

/// Keeps librdkafka's latest statistics (it counts the requests it sent, per API) and how
/// many it has emitted.
#[derive(Clone, Default)]
struct StatsCtx(Arc<Mutex<(u64, Option<Statistics>)>>);

impl ClientContext for StatsCtx {
    fn stats(&self, s: Statistics) {
        let mut g = self.0.lock().unwrap();
        g.0 += 1;
        g.1 = Some(s);
    }
}

impl ProducerContext for StatsCtx {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

impl StatsCtx {
    /// Produce requests librdkafka sent, from statistics emitted after this call (two
    /// emissions later, so that none was computed before it).
    fn produce_requests_now(&self) -> i64 {
        let seen = self.0.lock().unwrap().0;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            {
                let g = self.0.lock().unwrap();
                if g.0 >= seen + 2 {
                    if let Some(s) = &g.1 {
                        return s
                            .brokers
                            .values()
                            .map(|b| b.req.get("Produce").copied().unwrap_or(0))
                            .sum();
                    }
                }
            }
            assert!(Instant::now() < deadline, "no statistics from librdkafka");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn metrics_match_what_clients_sent() {
    let b = Broker::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let m = metrics_addr(&b);
    let bs = b.bootstrap();
    let (head, _) = http_get(m, "/nope");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    let topic = "metered";
    let partitions = 4;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fjord"))
        .args(["topics", "--bootstrap", &bs, "create", topic])
        .arg(format!("--partitions={partitions}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let before = Samples::scrape(m);
    assert_eq!(before.sum("fjord_produce_records_total", &[]), 0.0);
    let shards = before.shards();
    assert!(!shards.is_empty());

    let ctx = StatsCtx::default();
    let p: ThreadedProducer<StatsCtx> = ClientConfig::new()
        .set("bootstrap.servers", &bs)
        .set("linger.ms", "2")
        .set("statistics.interval.ms", "100")
        .create_with_context(ctx.clone())
        .expect("producer");
    let n = 3000usize;
    let value = vec![b'x'; 200];
    for i in 0..n {
        let key = format!("k{i}");
        loop {
            match p.send(
                BaseRecord::to(topic)
                    .partition((i % partitions) as i32)
                    .key(&key)
                    .payload(&value),
            ) {
                Ok(()) => break,
                Err((e, _)) => {
                    assert!(
                        matches!(
                            e.rdkafka_error_code(),
                            Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                        ),
                        "{e}"
                    );
                    p.poll(Duration::from_millis(5));
                }
            }
        }
        if i == n / 2 {
            // A scrape in the middle of the run: figures move, the scrape answers.
            let mid = Samples::scrape(m);
            assert!(mid.sum("fjord_produce_records_total", &[]) <= i as f64);
            assert_eq!(mid.shards(), shards);
        }
    }
    p.flush(Duration::from_secs(30)).expect("flush");
    let sent_requests = ctx.produce_requests_now();

    let after_produce = Samples::scrape(m);
    assert_eq!(
        after_produce.sum("fjord_produce_records_total", &[]),
        n as f64
    );
    assert_eq!(
        after_produce.sum("fjord_requests_total", &[("api", "Produce")]),
        sent_requests as f64,
        "Produce requests counted by the broker vs sent by librdkafka"
    );
    assert_eq!(
        after_produce.sum("fjord_request_latency_seconds_count", &[("api", "Produce")]),
        sent_requests as f64
    );
    let produced_bytes = after_produce.sum("fjord_produce_bytes_total", &[]);
    // Every record's 200-byte value and its key are in the batches, plus headers.
    assert!(produced_bytes > (n * 200) as f64, "{produced_bytes}");
    assert!(after_produce.sum("fjord_dma_write_bytes_total", &[]) >= produced_bytes);
    assert!(after_produce.sum("fjord_connections_total", &[]) >= 1.0);

    // Consume everything once, in a group that then commits half of each partition.
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bs)
        .set("group.id", "metered-group")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for part in 0..partitions as i32 {
        tpl.add_partition_offset(topic, part, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut got = 0usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    while got < n {
        assert!(Instant::now() < deadline, "consumed {got} of {n}");
        if let Some(r) = c.poll(Duration::from_millis(200)) {
            r.expect("record");
            got += 1;
        }
    }
    let mut commit = TopicPartitionList::new();
    let mut expected_lag = 0i64;
    for part in 0..partitions as i32 {
        let (_, high) = c
            .fetch_watermarks(topic, part, Duration::from_secs(10))
            .unwrap();
        commit
            .add_partition_offset(topic, part, Offset::Offset(high / 2))
            .unwrap();
        expected_lag += high - high / 2;
    }
    c.commit(&commit, CommitMode::Sync).expect("commit");

    let s = Samples::scrape(m);
    assert_eq!(s.sum("fjord_fetch_records_total", &[]), n as f64);
    // Each batch went out once, as stored: the bytes fetched are the bytes produced.
    assert_eq!(s.sum("fjord_fetch_bytes_total", &[]), produced_bytes);
    assert!(s.sum("fjord_requests_total", &[("api", "Fetch")]) >= 1.0);
    assert!(
        s.sum("fjord_batch_cache_hits_total", &[]) + s.sum("fjord_batch_cache_misses_total", &[])
            >= 1.0
    );
    assert_eq!(
        s.sum("fjord_group_lag_records", &[("group", "metered-group")]),
        expected_lag as f64
    );
    assert!(s.sum("fjord_requests_total", &[("api", "OffsetCommit")]) >= 1.0);
    assert!(s.sum("fjord_partitions", &[]) >= partitions as f64);
    // Per-partition series for the busiest partitions.
    for part in 0..partitions {
        let ps = part.to_string();
        let l = [("topic", topic), ("partition", ps.as_str())];
        assert!(s.sum("fjord_partition_produce_bytes_total", &l) > 0.0);
    }
    // Every shard answered and has its own series.
    assert_eq!(s.sum("fjord_scrape_shards_missing", &[]), 0.0);
    assert_eq!(s.shards(), shards);
    for sh in &shards {
        assert!(s.sum("fjord_reactor_busy_seconds_total", &[("shard", sh)]) > 0.0);
    }
}

#[test]
fn bad_metrics_address_is_refused_in_one_line() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fjord"))
        .args(["serve", "--set", "metrics.listen=nowhere"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("metrics.listen") && err.contains("HOST:PORT"),
        "{err}"
    );
}

/// A tmux server of the test's own (its own socket), killed when the test ends.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Tmux {
        assert!(
            common::have("tmux"),
            "tmux is not installed: apt-get install tmux"
        );
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        Tmux {
            socket: format!("fjord-top-test-{}-{nanos}", std::process::id()),
        }
    }

    fn run(&self, args: &[&str]) -> (bool, String) {
        let out = std::process::Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run tmux");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "top"]).1
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- last screen ----\n{}", self.screen());
        }
        let _ = self.run(&["kill-server"]);
    }
}

/// Rows of the shard table on screen: (shard, req/s, MB/s in).
fn shard_rows(screen: &str) -> Vec<(String, f64, f64)> {
    screen
        .lines()
        .skip_while(|l| !l.starts_with("SHARD"))
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            if cols.len() < 6 || cols[0].parse::<u32>().is_err() {
                return None;
            }
            Some((
                cols[0].to_string(),
                cols[3].parse().ok()?,
                cols[4].parse().ok()?,
            ))
        })
        .collect()
}

#[test]
fn top_shows_one_row_per_shard_with_moving_figures_and_quits_on_q() {
    let b = Broker::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let m = metrics_addr(&b);
    let bs = b.bootstrap();
    let shards = Samples::scrape(m).shards();
    assert!(!shards.is_empty());

    // Load for as long as the test looks at the screen.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, bs) = (stop.clone(), bs.clone());
        std::thread::spawn(move || {
            let p: ThreadedProducer<StatsCtx> = ClientConfig::new()
                .set("bootstrap.servers", &bs)
                .set("linger.ms", "1")
                .create_with_context(StatsCtx::default())
                .expect("producer");
            let value = vec![b'v'; 1000];
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = p.send(BaseRecord::<(), _>::to("top-load").payload(&value));
                i += 1;
                if i.is_multiple_of(100) {
                    p.poll(Duration::from_millis(1));
                }
            }
            let _ = p.flush(Duration::from_secs(10));
        })
    };

    let t = Tmux::new();
    let cmd = format!(
        "{} top --bootstrap {bs} --interval-ms 500",
        env!("CARGO_BIN_EXE_fjord")
    );
    let (ok, out) = t.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "150",
        "-y",
        "40",
        &cmd,
    ]);
    assert!(ok, "tmux new-session: {out}");

    // One row per shard, and figures that move: some shard takes data in.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut screens = Vec::new();
    loop {
        let screen = t.screen();
        let rows = shard_rows(&screen);
        let listed: std::collections::BTreeSet<String> = rows.iter().map(|r| r.0.clone()).collect();
        let moving = rows.iter().any(|r| r.2 > 0.0) && rows.iter().any(|r| r.1 > 0.0);
        if rows.len() == shards.len() && listed == shards && moving {
            break;
        }
        screens.push(screen);
        assert!(
            Instant::now() < deadline,
            "no moving shard rows for {shards:?}; last screen:\n{}",
            screens.last().cloned().unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Other views answer their keys.
    t.run(&["send-keys", "-t", "top", "4"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !t.screen().contains("Produce") {
        assert!(Instant::now() < deadline, "APIs view never showed Produce");
        std::thread::sleep(Duration::from_millis(50));
    }
    t.run(&["send-keys", "-t", "top", "q"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.run(&["has-session", "-t", "top"]).0 {
        assert!(Instant::now() < deadline, "fjord top did not quit on q");
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.join().expect("load thread");
}

#[test]
fn top_without_an_endpoint_fails_in_one_line() {
    let b = Broker::start();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fjord"))
        .args(["top", "--bootstrap", &b.bootstrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--metrics-listen"), "{err}");
}
