//! A damaged old segment costs only its damaged part: after kill -9 and one batch header
//! overwritten in the middle of the third of a dozen closed (long since fsynced) segments,
//! the restarted broker quarantines that segment's tail, serves everything before and after
//! it, reports the loss, and keeps the partition writable at its old end.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Broker;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Message, Offset, TopicPartitionList};

const TOPIC: &str = "damaged";
const VALUE_BYTES: usize = 600;

fn value(i: u64) -> String {
    let mut v = format!("{i:010}");
    v.extend(std::iter::repeat_n('d', VALUE_BYTES - v.len()));
    v
}

fn produce(b: &Broker, from: u64, n: u64) -> Vec<i64> {
    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("batch.size", "16384")
        .create()
        .unwrap();
    for i in from..from + n {
        let v = value(i);
        p.send(BaseRecord::<(), _>::to(TOPIC).payload(&v)).unwrap();
        p.poll(Duration::ZERO);
    }
    p.flush(Duration::from_secs(60))
        .expect("every record acknowledged");
    let c = consumer(b);
    let (lo, hi) = c
        .fetch_watermarks(TOPIC, 0, Duration::from_secs(10))
        .unwrap();
    vec![lo, hi]
}

fn consumer(b: &Broker) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .set("group.id", "damage-check")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap()
}

/// Every (offset, value) from the beginning up to `end`.
fn consume_until(b: &Broker, end: i64) -> Vec<(i64, String)> {
    let c = consumer(b);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(TOPIC, 0, Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.last().map(|(o, _)| *o + 1 < end).unwrap_or(true) && Instant::now() < deadline {
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            let m = m.expect("consume");
            let v = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
            out.push((m.offset(), v));
        }
    }
    out
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().map(|e| e == "log").unwrap_or(false))
        .collect();
    v.sort();
    v
}

/// (position, base offset) of each batch in a segment file.
fn batches(path: &Path) -> Vec<(usize, u64)> {
    let bytes = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut at = 0;
    while at + 61 <= bytes.len() {
        let base = i64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
        let len = i32::from_be_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        if len <= 0 {
            break;
        }
        out.push((at, base as u64));
        at += 12 + len as usize;
    }
    out
}

#[test]
fn damaged_closed_segment_is_quarantined_and_everything_else_served() {
    let mut b = Broker::start();
    let a: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .create()
        .unwrap();
    let t = NewTopic::new(TOPIC, 1, TopicReplication::Fixed(1)).set("segment.bytes", "1048576");
    for r in futures::executor::block_on(a.create_topics(&[t], &AdminOptions::new())).unwrap() {
        r.unwrap();
    }
    drop(a);
    let dir = b.data().join(format!("{TOPIC}-0"));
    let mut produced = 0u64;
    while segments(&dir).len() < 12 {
        produce(&b, produced, 2000);
        produced += 2000;
        assert!(produced < 200_000, "segments never rolled");
    }
    let end = produce(&b, produced, 0)[1];
    assert_eq!(end as u64, produced);
    b.kill9();

    // Overwrite one batch header in the middle of the third segment.
    let segs = segments(&dir);
    let third = &segs[2];
    let next_base: u64 = segs[3]
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .parse()
        .unwrap();
    let bs = batches(third);
    let (pos, damaged_base) = bs[bs.len() / 2];
    let mut bytes = std::fs::read(third).unwrap();
    bytes[pos..pos + 61].fill(0xEE);
    std::fs::write(third, &bytes).unwrap();

    b.spawn();
    let got = consume_until(&b, end);
    let lost = next_base - damaged_base;
    assert_eq!(
        got.len() as u64,
        produced - lost,
        "everything but the damaged tail of one segment is served"
    );
    for (off, v) in &got {
        let off = *off as u64;
        assert!(
            off < damaged_base || off >= next_base,
            "offset {off} lies in the quarantined range"
        );
        assert_eq!(*v, value(off), "offset {off} holds its own record");
    }
    let aside: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".quarantined-at-"))
        .collect();
    assert_eq!(aside.len(), 1, "the damaged segment is kept aside");
    assert!(b.log().contains("quarantined"), "the loss is logged");

    // Writable at the old end: no offset is reused.
    let after = produce(&b, produced, 50);
    assert_eq!(after[1], end + 50);
    let got = consume_until(&b, end + 50);
    assert!(got.iter().any(|(o, v)| *o == end && *v == value(produced)));

    // The operator sees the loss in `fjord topics describe`, also after another restart.
    b.stop();
    b.spawn();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fjord"))
        .args(["topics", "--bootstrap", &b.bootstrap(), "describe", TOPIC])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("fjord.quarantined.segments")
            && text.contains(&format!("offsets {damaged_base}..{next_base} lost")),
        "describe shows the quarantined range:\n{text}"
    );
    assert_eq!(
        consume_until(&b, end + 50).len() as u64,
        produced + 50 - lost
    );
}
