//! Log compaction (cleanup.policy=compact) against the real broker process, driven by
//! librdkafka through the `rdkafka` crate.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::Broker;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

type Rec = (i64, Option<Vec<u8>>, Option<Vec<u8>>);

fn producer(b: &Broker) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .set("linger.ms", "2")
        .set("batch.num.messages", "20")
        .set("acks", "all")
        .set("compression.codec", "lz4")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer")
}

fn create_topic(b: &Broker, name: &str, configs: &[(&str, &str)]) {
    let a: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .create()
        .expect("admin");
    let mut t = NewTopic::new(name, 1, TopicReplication::Fixed(1));
    for (k, v) in configs {
        t = t.set(k, v);
    }
    let r = futures::executor::block_on(a.create_topics(&[t], &AdminOptions::new()))
        .expect("create_topics");
    for x in r {
        x.expect("topic created");
    }
}

/// Every record of partition 0 from the beginning up to the high watermark.
fn read_all(b: &Broker, topic: &str) -> Vec<Rec> {
    read_from(b, topic, Offset::Beginning)
}

/// Records from `start` up to the high watermark. An OFFSET_OUT_OF_RANGE fails the read
/// (auto.offset.reset=error) rather than silently jumping.
fn read_from(b: &Broker, topic: &str, start: Offset) -> Vec<Rec> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .set("group.id", "compaction-reader")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "error")
        .create()
        .expect("consumer");
    let (_, hwm) = c
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .expect("watermarks");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, start).unwrap();
    c.assign(&tpl).unwrap();
    let mut out: Vec<Rec> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.last().map(|r| r.0 + 1 < hwm).unwrap_or(hwm > 0) && Instant::now() < deadline {
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            let m = m.expect("consume error");
            out.push((
                m.offset(),
                m.key().map(|k| k.to_vec()),
                m.payload().map(|v| v.to_vec()),
            ));
        }
    }
    assert_eq!(
        out.last().map(|r| r.0 + 1),
        Some(hwm),
        "read up to the high watermark {hwm}"
    );
    out
}

/// (total bytes of `.log` files, base offset of the active, i.e. last, segment).
fn log_files(dir: &Path) -> (u64, u64) {
    let mut total = 0;
    let mut last_base = 0;
    for e in std::fs::read_dir(dir).expect("partition dir") {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(stem) = name.strip_suffix(".log") {
            total += e.metadata().unwrap().len();
            last_base = last_base.max(stem.parse::<u64>().unwrap());
        }
    }
    (total, last_base)
}

#[test]
fn compacted_topic_keeps_latest_per_key_and_survives_restart() {
    // A tuning file like the default one, with a short cleaner interval.
    let tmp = tempfile::tempdir().unwrap();
    let default =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tuning/default.toml"))
            .unwrap();
    let tuned = default.replace(
        "retention_check_interval_ms = 30000",
        "retention_check_interval_ms = 200",
    );
    assert_ne!(
        tuned, default,
        "tuning/default.toml names retention_check_interval_ms"
    );
    let cfg = tmp.path().join("tuning.toml");
    std::fs::write(&cfg, tuned).unwrap();
    let mut b = Broker::start_with(&["--config", cfg.to_str().unwrap(), "--cores", "1"]);

    let seg = [("segment.bytes", "1024")];
    create_topic(
        &b,
        "compacted",
        &[
            seg[0],
            ("cleanup.policy", "compact"),
            ("min.cleanable.dirty.ratio", "0.01"),
        ],
    );
    // The same data in a plain topic gives the uncompacted size to compare with.
    create_topic(&b, "plain", &seg);

    let keys = 6;
    let p = producer(&b);
    let mut latest: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
    let mut send = |key: String, val: Option<String>| {
        for t in ["compacted", "plain"] {
            let mut r = BaseRecord::to(t).key(&key);
            if let Some(v) = &val {
                r = r.payload(v);
            }
            p.send(r).map_err(|(e, _)| e).expect("send");
        }
        latest.insert(key.into_bytes(), val.map(String::into_bytes));
    };
    for round in 0..300 {
        for k in 0..keys {
            send(
                format!("key-{k}"),
                Some(format!("value-{k}-{round}-{}", "x".repeat(20))),
            );
        }
        if round % 25 == 24 {
            p.flush(Duration::from_secs(30)).expect("flush");
        }
    }
    // A tombstone for key-3, then more updates so that it lands in a closed segment.
    send("key-3".into(), None);
    p.flush(Duration::from_secs(30)).expect("flush");
    for round in 300..320 {
        for k in [0, 1, 2, 4, 5] {
            send(
                format!("key-{k}"),
                Some(format!("value-{k}-{round}-{}", "x".repeat(20))),
            );
        }
        p.flush(Duration::from_secs(30)).expect("flush");
    }
    drop(p);

    let dir = b.data().join("compacted-0");
    let plain_dir = b.data().join("plain-0");
    let (plain_bytes, _) = log_files(&plain_dir);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (bytes, _) = log_files(&dir);
        if bytes * 4 < plain_bytes && b.log().contains("compacted compacted-0") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no compaction: {bytes} bytes vs {plain_bytes} uncompacted"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Wait for the pass that covers every closed segment (its checkpoint names the active base).
    let (bytes, active_base) = loop {
        let (bytes, active_base) = log_files(&dir);
        // First line: cleaned up to; then the segments' first-cleaning times.
        let cleaned: u64 = std::fs::read_to_string(dir.join("cleaner-offset-checkpoint"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()))
            .unwrap_or(0);
        if cleaned == active_base {
            break (bytes, active_base);
        }
        assert!(
            Instant::now() < deadline,
            "cleaned up to {cleaned}, active segment at {active_base}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("compacted log: {bytes} bytes; the same records uncompacted: {plain_bytes} bytes");

    let check = |got: &[Rec]| {
        let mut last: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
        let mut cleaned_seen: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut prev = -1;
        for (off, key, val) in got {
            assert!(*off > prev, "offsets ascend");
            prev = *off;
            let key = key
                .clone()
                .expect("compaction drops keyless records; none were sent");
            if (*off as u64) < active_base {
                let n = cleaned_seen.entry(key.clone()).or_default();
                *n += 1;
                assert_eq!(
                    *n,
                    1,
                    "one record per key below the active segment ({:?})",
                    String::from_utf8_lossy(&key)
                );
            }
            last.insert(key, val.clone());
        }
        assert_eq!(
            last, latest,
            "the latest value of every key, the tombstone included"
        );
    };
    let got = read_all(&b, "compacted");
    assert!(
        got.len() < 100,
        "{} records left of {}",
        got.len(),
        300 * keys + 101
    );
    check(&got);
    assert_eq!(
        got.last().map(|r| r.0),
        Some((300 * keys + 100) as i64),
        "offsets preserved"
    );

    // A fetch at an offset that was compacted away returns the next batch after it.
    let from10 = read_from(&b, "compacted", Offset::Offset(10));
    assert_eq!(
        got.iter().find(|r| r.0 == 10),
        None,
        "offset 10 was compacted away"
    );
    assert_eq!(
        from10,
        got.iter()
            .filter(|r| r.0 >= 10)
            .cloned()
            .collect::<Vec<_>>()
    );

    // A clean restart reads the same log; so does one after kill -9.
    assert!(b.stop().success(), "clean shutdown");
    b.spawn();
    assert_eq!(
        read_all(&b, "compacted"),
        got,
        "same records after a restart"
    );
    b.kill9();
    // io_uring tears down a killed process's listener asynchronously: wait until it is gone.
    let gone = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect_timeout(&b.addr, Duration::from_millis(100)).is_ok()
        && Instant::now() < gone
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    b.spawn();
    assert_eq!(read_all(&b, "compacted"), got, "same records after kill -9");
    assert!(!b.log().contains("damaged"), "recovery found no damage");

    // Appends continue after the restart, on top of the compacted log.
    let p = producer(&b);
    p.send(BaseRecord::to("compacted").key("key-9").payload("after"))
        .map_err(|(e, _)| e)
        .expect("send");
    p.flush(Duration::from_secs(30)).expect("flush");
    let again = read_all(&b, "compacted");
    assert_eq!(again.len(), got.len() + 1);
    assert_eq!(
        again.last().map(|r| r.2.clone()),
        Some(Some(b"after".to_vec()))
    );
}
