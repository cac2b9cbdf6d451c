//! Retention deletes whole closed segments past retention.bytes and retention.ms; consumers
//! that ask for deleted offsets get OFFSET_OUT_OF_RANGE (then reset), the rest stays readable.

mod common;

use std::time::{Duration, Instant};

use common::Broker;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

fn broker_with_fast_retention() -> (Broker, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let text = fjord::config::DEFAULT_TUNING.replace(
        "retention_check_interval_ms = 30000",
        "retention_check_interval_ms = 200",
    );
    assert!(text.contains("retention_check_interval_ms = 200"));
    let cfg = tmp.path().join("tuning.toml");
    std::fs::write(&cfg, text).unwrap();
    let b = Broker::start_with(&["--config", cfg.to_str().unwrap()]);
    (b, tmp)
}

fn create(b: &Broker, name: &str, configs: &[(&str, &str)]) {
    let a: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .create()
        .unwrap();
    let mut t = NewTopic::new(name, 1, TopicReplication::Fixed(1));
    for (k, v) in configs {
        t = t.set(k, v);
    }
    for r in futures::executor::block_on(a.create_topics(&[t], &AdminOptions::new())).unwrap() {
        r.unwrap();
    }
}

fn produce(b: &Broker, topic: &str, n: usize, ts: Option<i64>) {
    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .set("linger.ms", "0")
        .set("batch.num.messages", "1")
        .create()
        .unwrap();
    let v = "r".repeat(500);
    for _ in 0..n {
        let mut rec = BaseRecord::<(), _>::to(topic).payload(&v);
        if let Some(ts) = ts {
            rec = rec.timestamp(ts);
        }
        p.send(rec).unwrap();
        p.poll(Duration::ZERO);
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

fn segments(b: &Broker, topic: &str) -> usize {
    std::fs::read_dir(b.data().join(format!("{topic}-0")))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .map(|e| e.file_name().to_string_lossy().ends_with(".log"))
                .unwrap_or(false)
        })
        .count()
}

fn watermarks(b: &Broker, topic: &str) -> (i64, i64) {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .set("group.id", "w")
        .create()
        .unwrap();
    c.fetch_watermarks(topic, 0, Duration::from_secs(10))
        .unwrap()
}

#[test]
fn size_and_time_retention_delete_whole_segments() {
    let (b, _cfg) = broker_with_fast_retention();
    create(
        &b,
        "by-size",
        &[("segment.bytes", "16384"), ("retention.bytes", "40000")],
    );
    create(
        &b,
        "by-time",
        &[("segment.bytes", "16384"), ("retention.ms", "60000")],
    );
    create(&b, "kept", &[("segment.bytes", "16384")]);
    produce(&b, "by-size", 400, None);
    let old = fjord::log::now_ms() as i64 - 3_600_000;
    produce(&b, "by-time", 300, Some(old));
    produce(&b, "kept", 300, Some(old));
    // Segments roll on the next append: one fresh record closes the old ones.
    produce(&b, "by-time", 1, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (lo_size, hi_size) = watermarks(&b, "by-size");
        let (lo_time, hi_time) = watermarks(&b, "by-time");
        // Time retention removes every closed segment of old records; the active segment,
        // which the fresh record made recent, stays (as in Kafka).
        if lo_size > 0 && lo_time > 0 && segments(&b, "by-time") == 1 {
            assert_eq!(hi_size, 400);
            assert_eq!(hi_time, 301);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "retention did not run: by-size [{lo_size},{hi_size}) by-time [{lo_time},{hi_time})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Size retention keeps at most retention.bytes of closed data plus the active segment.
    let size: u64 = std::fs::read_dir(b.data().join("by-size-0"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(
        size <= 40_000 + 16_384 + 4096,
        "size retention: {size} bytes left"
    );
    assert_eq!(
        segments(&b, "by-time"),
        1,
        "only the active segment is left"
    );
    // Without retention settings nothing is deleted (the 7-day default keeps 1-hour-old data).
    assert_eq!(watermarks(&b, "kept").0, 0);
    assert!(segments(&b, "kept") > 1);
}
