//! Kafka rules that librdkafka's own regression suite (tools/librdkafka-suite.py) found Fjord
//! breaking, checked here with librdkafka through the `rdkafka` crate against the real broker.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Broker;
use rdkafka::admin::TopicReplication;
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, ProducerContext};

fn admin(b: &Broker) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .create()
        .expect("admin")
}

fn create_topic(b: &Broker, name: &str, configs: &[(&str, &str)]) -> Result<(), RDKafkaErrorCode> {
    let mut t = NewTopic::new(name, 1, TopicReplication::Fixed(1));
    for (k, v) in configs {
        t = t.set(k, v);
    }
    let r = futures::executor::block_on(admin(b).create_topics(&[t], &AdminOptions::new()))
        .expect("create_topics");
    r.into_iter()
        .next()
        .expect("one result")
        .map(|_| ())
        .map_err(|(_, code)| code)
}

fn high_watermark(b: &Broker, topic: &str) -> i64 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .create()
        .expect("consumer");
    c.fetch_watermarks(topic, 0, Duration::from_secs(10))
        .expect("watermarks")
        .1
}

/// A record's delivery: its offset, or the error code it failed with.
type Outcome = Result<i64, RDKafkaErrorCode>;

/// Collects each record's delivery outcome by its position in the send order.
struct Deliveries(Arc<Mutex<Vec<(usize, Outcome)>>>);

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Box<usize>;
    fn delivery(&self, r: &DeliveryResult<'_>, id: Box<usize>) {
        let outcome = match r {
            Ok(m) => Ok(m.offset()),
            Err((e, _)) => Err(e.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fail)),
        };
        self.0.lock().expect("lock").push((*id, outcome));
    }
}

/// Sends `keys` (None: no key) to partition 0 of `topic` as one batch and returns each
/// record's outcome, in send order.
fn produce_one_batch(b: &Broker, topic: &str, keys: &[Option<&str>]) -> Vec<Outcome> {
    let got = Arc::new(Mutex::new(Vec::new()));
    let p: BaseProducer<Deliveries> = ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        // Everything sent below goes out in one ProduceRequest, as one batch.
        .set("linger.ms", "500")
        .set("batch.num.messages", "10000")
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .create_with_context(Deliveries(got.clone()))
        .expect("producer");
    for (i, key) in keys.iter().enumerate() {
        let value = format!("value {i}");
        let mut rec = BaseRecord::with_opaque_to(topic, Box::new(i))
            .partition(0)
            .payload(&value);
        if let Some(k) = key {
            rec = rec.key(*k);
        }
        p.send(rec).map_err(|(e, _)| e).expect("send");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.lock().expect("lock").len() < keys.len() && Instant::now() < deadline {
        p.poll(Duration::from_millis(100));
    }
    let mut out = got.lock().expect("lock").clone();
    assert_eq!(out.len(), keys.len(), "every record gets a delivery report");
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

/// Kafka refuses a record without a key on a compacted topic (INVALID_RECORD) and, since the
/// batch is written whole or not at all, fails the rest of its batch; the produce response
/// names the keyless records (KIP-467), so librdkafka fails those with INVALID_RECORD and the
/// others with its own _INVALID_DIFFERENT_RECORD. Nothing of the batch is stored.
#[test]
fn compacted_topic_refuses_records_without_key_and_names_them() {
    let b = Broker::start();
    create_topic(&b, "compacted", &[("cleanup.policy", "compact")]).expect("create");
    let keys: Vec<Option<&str>> = (0..20)
        .map(|i| if i % 7 == 3 { None } else { Some("k") })
        .collect();
    let outcomes = produce_one_batch(&b, "compacted", &keys);
    for (i, (key, outcome)) in keys.iter().zip(&outcomes).enumerate() {
        let want = if key.is_none() {
            RDKafkaErrorCode::InvalidRecord
        } else {
            RDKafkaErrorCode::InvalidDifferentRecord
        };
        assert_eq!(*outcome, Err(want), "record {i} (key {key:?})");
    }
    assert_eq!(
        high_watermark(&b, "compacted"),
        0,
        "nothing of the refused batch is stored"
    );

    // Keyed records alone are accepted; keyless ones are fine on a topic that is not compacted.
    let outcomes = produce_one_batch(&b, "compacted", &[Some("a"), Some("b"), Some("c")]);
    assert_eq!(outcomes, vec![Ok(0), Ok(1), Ok(2)]);
    create_topic(&b, "plain", &[]).expect("create");
    let outcomes = produce_one_batch(&b, "plain", &[None, Some("a"), None]);
    assert_eq!(outcomes, vec![Ok(0), Ok(1), Ok(2)]);
}

/// message.format.version is deprecated and meaningless for RecordBatch v2, but Kafka 3.x
/// accepts it (CreateTopics, AlterConfigs), validates it as a version and reports it;
/// librdkafka's test 0092 and tools that copy a topic's configs send it.
#[test]
fn message_format_version_is_accepted_and_ignored() {
    let b = Broker::start();
    create_topic(&b, "mfv", &[("message.format.version", "2.8")]).expect("accepted at creation");
    assert_eq!(
        create_topic(&b, "mfv-bad", &[("message.format.version", "banana")]),
        Err(RDKafkaErrorCode::InvalidConfig)
    );
    let a = admin(&b);
    let opts = AdminOptions::new();
    let describe = |name: &str| -> Option<String> {
        let r = futures::executor::block_on(
            a.describe_configs(&[ResourceSpecifier::Topic("mfv")], &opts),
        )
        .expect("describe");
        let res = r[0].as_ref().expect("describe result");
        res.get(name).and_then(|e| e.value.clone())
    };
    assert_eq!(describe("message.format.version").as_deref(), Some("2.8"));
    let alter = |value: &str| {
        futures::executor::block_on(
            a.alter_configs(
                &[AlterConfig::new(ResourceSpecifier::Topic("mfv"))
                    .set("message.format.version", value)
                    .set("retention.ms", "3600000")],
                &opts,
            ),
        )
        .expect("alter_configs")
    };
    alter("0.10.0.0");
    assert_eq!(
        describe("message.format.version").as_deref(),
        Some("0.10.0.0")
    );
    assert_eq!(describe("retention.ms").as_deref(), Some("3600000"));
    // A value that is no version is refused and changes nothing.
    alter("latest");
    assert_eq!(
        describe("message.format.version").as_deref(),
        Some("0.10.0.0")
    );

    // The topic still takes and serves v2 batches.
    let outcomes = produce_one_batch(&b, "mfv", &[None, Some("k")]);
    assert_eq!(outcomes, vec![Ok(0), Ok(1)]);
    assert_eq!(high_watermark(&b, "mfv"), 2);
}

/// Through confluent-kafka (Python), what librdkafka's test 0081 checks of the admin API:
/// authorized operations when asked for (KIP-430; no authorizer: everything the resource type
/// supports), and the topic configs flush.ms / flush.messages accepted and reported.
#[test]
fn authorized_operations_and_flush_configs() {
    let b = Broker::start();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/authorized_ops_and_flush.py"
    );
    let mut child = std::process::Command::new("python3")
        .arg(script)
        .arg(b.bootstrap())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with confluent-kafka (pip install confluent-kafka)");
    // The script bounds each of its waits; this bounds the whole.
    let deadline = Instant::now() + Duration::from_secs(180);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("authorized_ops_and_flush.py did not finish within 180 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("OK"),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
