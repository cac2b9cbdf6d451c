//! KIP-848 consumer groups (`group.protocol=consumer`) driven by librdkafka through the `rdkafka`
//! crate: server-side assignment over ConsumerGroupHeartbeat, OffsetCommit/OffsetFetch v9.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Broker, Rebalances};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

const TOPIC: &str = "kip848";
const GROUP: &str = "kip848-group";

/// A broker with a short consumer heartbeat interval so that reconciliation takes seconds.
fn broker() -> (Broker, tempfile::TempDir) {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tuning/default.toml"))
        .expect("default tuning");
    let text = text.replace(
        "consumer_heartbeat_interval_ms = 5000",
        "consumer_heartbeat_interval_ms = 500",
    );
    assert!(
        text.contains("consumer_heartbeat_interval_ms = 500"),
        "tuning/default.toml names the heartbeat interval"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tuning.toml");
    std::fs::write(&path, text).expect("write tuning");
    let b = Broker::start_with(&["--config", path.to_str().expect("utf-8 path")]);
    (b, dir)
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

fn produce(b: &Broker, partitions: i32, per_partition: usize, tag: &str) {
    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("producer");
    for part in 0..partitions {
        for i in 0..per_partition {
            let v = format!("{tag}-{part}-{i}");
            p.send(
                BaseRecord::<(), String>::to(TOPIC)
                    .partition(part)
                    .payload(&v),
            )
            .expect("enqueue");
        }
    }
    p.flush(Duration::from_secs(30)).expect("flush");
}

fn consumer(b: &Broker, client_id: &str) -> BaseConsumer {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .set("group.id", GROUP)
        .set("group.protocol", "consumer")
        .set("client.id", client_id)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    c.subscribe(&[TOPIC]).expect("subscribe");
    c
}

fn counting_consumer(b: &Broker, client_id: &str) -> (BaseConsumer<Rebalances>, Arc<AtomicUsize>) {
    let n = Arc::new(AtomicUsize::new(0));
    let c: BaseConsumer<Rebalances> = ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .set("group.id", GROUP)
        .set("group.protocol", "consumer")
        .set("client.id", client_id)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create_with_context(Rebalances(n.clone()))
        .expect("consumer");
    c.subscribe(&[TOPIC]).expect("subscribe");
    (c, n)
}

fn assigned<C: ConsumerContext>(c: &BaseConsumer<C>) -> BTreeSet<i32> {
    c.assignment()
        .map(|a| a.elements().iter().map(|e| e.partition()).collect())
        .unwrap_or_default()
}

type Seen = Vec<(usize, i32, i64, String)>;

/// Produces `per_partition` records to each of the six partitions and polls `cs` until they
/// have all arrived, then half a second more for anything read twice.
fn produce_and_read<C: ConsumerContext>(
    b: &Broker,
    cs: &[&BaseConsumer<C>],
    seen: &mut Seen,
    per_partition: usize,
    tag: &str,
) {
    produce(b, 6, per_partition, tag);
    let want = seen.len() + 6 * per_partition;
    let what = format!("{want} records");
    poll_until(cs, seen, Duration::from_secs(60), &what, &|s| {
        s.len() >= want
    });
    std::thread::sleep(Duration::from_millis(500));
    poll_until(cs, seen, Duration::from_secs(1), "stragglers", &|_| true);
}

/// Polls every consumer in turn until `done` holds; records what each one received.
fn poll_until<C: ConsumerContext>(
    cs: &[&BaseConsumer<C>],
    seen: &mut Seen,
    timeout: Duration,
    what: &str,
    done: &dyn Fn(&Seen) -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !done(seen) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; assignments {:?}",
            cs.iter().map(|c| assigned(c)).collect::<Vec<_>>()
        );
        for (i, c) in cs.iter().enumerate() {
            if let Some(m) = c.poll(Duration::from_millis(50)) {
                // A broker restarting is not an error of the group.
                if let Err(rdkafka::error::KafkaError::MessageConsumption(
                    rdkafka::types::RDKafkaErrorCode::AllBrokersDown
                    | rdkafka::types::RDKafkaErrorCode::BrokerTransportFailure,
                )) = &m
                {
                    continue;
                }
                let m = m.expect("consume error");
                let v = String::from_utf8(m.payload().unwrap_or_default().to_vec()).unwrap();
                seen.push((i, m.partition(), m.offset(), v));
            }
        }
    }
}

#[test]
fn two_consumers_split_six_partitions_then_one_takes_all() {
    let (b, _cfg) = broker();
    create_topic(&b, TOPIC, 6);
    let a = consumer(&b, "consumer-a");
    let c2 = consumer(&b, "consumer-b");
    let mut seen = Seen::new();

    // Both join: the uniform assignor gives each three partitions, after A revokes what B gets.
    poll_until(
        &[&a, &c2],
        &mut seen,
        Duration::from_secs(60),
        "a 3/3 split",
        &|_| assigned(&a).len() == 3 && assigned(&c2).len() == 3,
    );
    let (pa, pb) = (assigned(&a), assigned(&c2));
    assert!(pa.is_disjoint(&pb), "{pa:?} / {pb:?}");
    assert_eq!(
        pa.union(&pb).copied().collect::<BTreeSet<_>>(),
        (0..6).collect()
    );

    // Everything produced now is consumed exactly once, each record by its partition's owner.
    produce_and_read(&b, &[&a, &c2], &mut seen, 100, "first");
    assert_eq!(seen.len(), 600, "no duplicates");
    let distinct: BTreeSet<(i32, i64)> = seen.iter().map(|(_, p, o, _)| (*p, *o)).collect();
    assert_eq!(distinct.len(), 600);
    for (who, p, _, v) in &seen {
        let owner = if pa.contains(p) { 0 } else { 1 };
        assert_eq!(*who, owner, "partition {p} read by the wrong member");
        assert!(v.starts_with(&format!("first-{p}-")), "{v}");
    }
    // OffsetCommit v9 with the member epoch.
    a.commit_consumer_state(CommitMode::Sync).expect("commit a");
    c2.commit_consumer_state(CommitMode::Sync)
        .expect("commit b");

    // B leaves (epoch -1 on close): A is given all six partitions.
    drop(c2);
    seen.clear();
    poll_until(
        &[&a],
        &mut seen,
        Duration::from_secs(60),
        "A to own all 6",
        &|_| assigned(&a).len() == 6,
    );
    assert!(
        seen.is_empty(),
        "nothing new was produced: {:?}",
        &seen[..seen.len().min(5)]
    );

    // A resumes B's partitions from B's committed offsets: only the new records arrive.
    produce_and_read(&b, &[&a], &mut seen, 50, "second");
    let mut per: BTreeMap<i32, usize> = BTreeMap::new();
    for (_, p, o, v) in &seen {
        assert!(
            v.starts_with("second-"),
            "old record re-read: {v} at {p}/{o}"
        );
        assert!(*o >= 100);
        *per.entry(*p).or_default() += 1;
    }
    assert_eq!(per, (0..6).map(|p| (p, 50)).collect());

    // The committed offsets read back through OffsetFetch v9 (member id + epoch).
    a.commit_consumer_state(CommitMode::Sync)
        .expect("commit a again");
    let committed = a.committed(Duration::from_secs(10)).expect("committed");
    let offs: BTreeMap<i32, i64> = committed
        .elements()
        .iter()
        .map(|e| (e.partition(), e.offset().to_raw().unwrap_or(-1)))
        .collect();
    assert_eq!(offs, (0..6).map(|p| (p, 150)).collect());
}

/// The group's state is stored in `__consumer_offsets` (Kafka's consumer-group records): a
/// broker killed with -9 and started again on its data knows every member at its epoch with
/// its partitions, so the members heartbeat on as if nothing happened: no rebalance, no
/// partition lost or read twice.
#[test]
fn a_consumer_group_keeps_its_members_and_epochs_across_a_broker_kill() {
    let (mut b, _cfg) = broker();
    create_topic(&b, TOPIC, 6);
    let (a, na) = counting_consumer(&b, "consumer-a");
    let (c2, nb) = counting_consumer(&b, "consumer-b");
    let mut seen = Seen::new();
    poll_until(
        &[&a, &c2],
        &mut seen,
        Duration::from_secs(60),
        "a 3/3 split",
        &|_| assigned(&a).len() == 3 && assigned(&c2).len() == 3,
    );
    // Reconciliation is over once no callback came for a few heartbeats.
    let rebalances = || na.load(Ordering::SeqCst) + nb.load(Ordering::SeqCst);
    let mut settled = (rebalances(), Instant::now());
    while settled.1.elapsed() < Duration::from_secs(3) {
        poll_until(
            &[&a, &c2],
            &mut seen,
            Duration::from_secs(1),
            "a poll",
            &|_| true,
        );
        if rebalances() != settled.0 {
            settled = (rebalances(), Instant::now());
        }
    }
    let before = (assigned(&a), assigned(&c2), rebalances());
    produce_and_read(&b, &[&a, &c2], &mut seen, 20, "before");
    a.commit_consumer_state(CommitMode::Sync).expect("commit a");
    c2.commit_consumer_state(CommitMode::Sync)
        .expect("commit b");

    b.restart();
    // Through the outage and a few seconds of heartbeats after it.
    let until = Instant::now() + Duration::from_secs(8);
    poll_until(
        &[&a, &c2],
        &mut seen,
        Duration::from_secs(20),
        "8 s",
        &|_| Instant::now() > until,
    );
    seen.clear();
    produce_and_read(&b, &[&a, &c2], &mut seen, 20, "after");
    let after = (assigned(&a), assigned(&c2), rebalances());
    assert_eq!(
        after,
        before,
        "the members kept their partitions without a rebalance; broker log:\n{}",
        b.log()
    );
    assert_eq!(seen.len(), 120, "nothing read twice");
    for (who, p, _, v) in &seen {
        assert!(v.starts_with("after-"), "{v}");
        let owner = if before.0.contains(p) { 0 } else { 1 };
        assert_eq!(*who, owner, "partition {p} read by the wrong member");
    }
    assert!(
        b.log().contains("1 consumer groups"),
        "the group was loaded from __consumer_offsets: {}",
        b.log()
    );
}

#[test]
fn range_assignor_gives_contiguous_blocks() {
    let (b, _cfg) = broker();
    create_topic(&b, TOPIC, 4);
    let mk = |id: &str| -> BaseConsumer {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", b.bootstrap())
            .set("group.id", "kip848-range")
            .set("group.protocol", "consumer")
            .set("group.remote.assignor", "range")
            .set("client.id", id)
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        c.subscribe(&[TOPIC]).expect("subscribe");
        c
    };
    let a = mk("a");
    let c2 = mk("b");
    let mut seen = Seen::new();
    poll_until(
        &[&a, &c2],
        &mut seen,
        Duration::from_secs(60),
        "a 2/2 range split",
        &|_| assigned(&a).len() == 2 && assigned(&c2).len() == 2,
    );
    // Range gives contiguous blocks.
    let (pa, pb) = (assigned(&a), assigned(&c2));
    for s in [&pa, &pb] {
        let v: Vec<i32> = s.iter().copied().collect();
        assert_eq!(v[1], v[0] + 1, "contiguous: {v:?}");
    }
}

/// The same scenario with confluent-kafka (librdkafka 2.16), plus ConsumerGroupDescribe and
/// ListGroups v5 through its AdminClient: `tests/python/kip848.py`. A missing python3 or module
/// fails the test (pip install confluent-kafka).
#[test]
fn confluent_kafka_python_consumer_protocol() {
    let (b, _cfg) = broker();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/kip848.py");
    let mut child = std::process::Command::new("python3")
        .arg(script)
        .arg(b.bootstrap())
        .spawn()
        .expect("python3 runs (install python3 and pip install confluent-kafka)");
    let deadline = Instant::now() + Duration::from_secs(150);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait python3") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kip848.py did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_ne!(
        status.code(),
        Some(2),
        "confluent_kafka missing: pip install confluent-kafka"
    );
    assert!(status.success(), "kip848.py failed: {status}");
}
