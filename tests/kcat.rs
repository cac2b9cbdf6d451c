//! The broker driven by `kcat` (Debian's 1.7.1 on librdkafka 2.0.2: an old client, strict about
//! flexible-version encoding). kcat missing FAILS the tests (`apt-get install kcat`).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Broker;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use serde_json::Value;

fn need_kcat() {
    assert!(
        common::have("kcat"),
        "kcat is not installed: apt-get install kcat"
    );
}

/// Runs kcat with `args`, feeding `stdin`; fails the test on a non-zero exit or after `limit`.
fn kcat(b: &Broker, args: &[&str], stdin: &[u8], limit: Duration) -> String {
    let mut child = Command::new("kcat")
        .arg("-b")
        .arg(b.bootstrap())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kcat");
    let mut si = child.stdin.take().unwrap();
    let input = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = si.write_all(&input);
    });
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = writer.join();
    let out = t_out.join().unwrap();
    let err = t_err.join().unwrap();
    match status {
        Some(s) if s.success() => out,
        Some(s) => panic!("kcat {args:?} exited {s}\nstderr: {err}\nstdout: {out}"),
        None => {
            panic!("kcat {args:?} did not finish within {limit:?}\nstderr: {err}\nstdout: {out}")
        }
    }
}

fn create_topic(b: &Broker, name: &str, partitions: i32) {
    let a: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .create()
        .expect("admin");
    let r = futures::executor::block_on(a.create_topics(
        &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
        &AdminOptions::new(),
    ))
    .expect("create_topics");
    for x in r {
        x.expect("topic created");
    }
}

fn json_lines(s: &str) -> Vec<Value> {
    s.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("kcat JSON {l:?}: {e}")))
        .collect()
}

#[test]
fn metadata_lists_broker_topics_partitions_and_leaders() {
    need_kcat();
    let b = Broker::start();
    create_topic(&b, "meta4", 4);
    create_topic(&b, "meta1", 1);
    let out = kcat(&b, &["-L", "-J"], b"", Duration::from_secs(20));
    let md: Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("kcat -L -J output {out:?}: {e}"));
    assert_eq!(md["controllerid"], 0, "{md}");
    assert_eq!(
        md["brokers"],
        serde_json::json!([{"id": 0, "name": b.bootstrap()}]),
        "advertised broker"
    );
    let topics: HashMap<String, &Value> = md["topics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["topic"].as_str().unwrap().to_string(), t))
        .collect();
    for (name, n) in [("meta4", 4), ("meta1", 1)] {
        let t = topics
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing from kcat -L: {md}"));
        assert!(t.get("error").is_none(), "{name}: {t}");
        let parts = t["partitions"].as_array().unwrap();
        let mut ids: Vec<i64> = parts
            .iter()
            .map(|p| p["partition"].as_i64().unwrap())
            .collect();
        ids.sort();
        assert_eq!(ids, (0..n).collect::<Vec<i64>>(), "{name} partitions");
        for p in parts {
            assert_eq!(p["leader"], 0, "{name}: {p}");
            assert_eq!(p["replicas"], serde_json::json!([{"id": 0}]), "{name}: {p}");
            assert_eq!(p["isrs"], serde_json::json!([{"id": 0}]), "{name}: {p}");
        }
    }

    // One topic asked for by name; the plain-text listing as a person reads it.
    let out = kcat(&b, &["-L", "-t", "meta4"], b"", Duration::from_secs(20));
    assert!(
        out.contains(&format!("broker 0 at {} (controller)", b.bootstrap())),
        "{out}"
    );
    assert!(out.contains("topic \"meta4\" with 4 partitions:"), "{out}");
    assert!(
        out.contains("partition 3, leader 0, replicas: 0, isrs: 0"),
        "{out}"
    );
    assert!(!out.contains("meta1"), "asked for meta4 only: {out}");
}

#[test]
fn produce_consume_keys_headers_nulls_every_codec() {
    need_kcat();
    let b = Broker::start();
    let n = 200usize;
    for (codec, extra) in [
        ("none", &[][..]),
        ("gzip", &[][..]),
        ("snappy", &[][..]),
        ("lz4", &["-X", "enable.idempotence=true"][..]),
        ("zstd", &["-X", "acks=all"][..]),
    ] {
        let topic = format!("codec-{codec}");
        create_topic(&b, &topic, 3);
        let mut input = String::new();
        for i in 0..n {
            input.push_str(&format!("key-{}\t{codec}-value-{i}\n", i % 10));
        }
        // A tombstone: an empty value sent as NULL (-Z).
        input.push_str("key-tomb\t\n");
        let mut args = vec![
            "-P",
            "-t",
            &topic,
            "-K",
            "\t",
            "-z",
            codec,
            "-Z",
            "-H",
            "app=fjord",
            "-H",
            "codec=x",
        ];
        args.extend_from_slice(extra);
        kcat(&b, &args, input.as_bytes(), Duration::from_secs(30));

        let out = kcat(
            &b,
            &["-C", "-t", &topic, "-o", "beginning", "-e", "-J"],
            b"",
            Duration::from_secs(30),
        );
        let msgs = json_lines(&out);
        assert_eq!(
            msgs.len(),
            n + 1,
            "{codec}: consumed {} of {}",
            msgs.len(),
            n + 1
        );
        let mut key_partition: HashMap<String, i64> = HashMap::new();
        let mut offsets: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
        let mut values = Vec::new();
        for m in &msgs {
            let key = m["key"]
                .as_str()
                .unwrap_or_else(|| panic!("{codec}: key {m}"))
                .to_string();
            let p = m["partition"].as_i64().unwrap();
            assert_eq!(
                *key_partition.entry(key.clone()).or_insert(p),
                p,
                "{codec}: key {key} in two partitions"
            );
            offsets
                .entry(p)
                .or_default()
                .push(m["offset"].as_i64().unwrap());
            assert_eq!(
                m["headers"],
                serde_json::json!(["app", "fjord", "codec", "x"]),
                "{codec}: headers {m}"
            );
            assert_eq!(m["tstype"], "create", "{codec}: {m}");
            if key == "key-tomb" {
                assert!(m["payload"].is_null(), "{codec}: tombstone payload {m}");
            } else {
                let v = m["payload"].as_str().unwrap().to_string();
                let i: usize = v.rsplit('-').next().unwrap().parse().unwrap();
                assert_eq!(
                    key,
                    format!("key-{}", i % 10),
                    "{codec}: key/value pairing {m}"
                );
                values.push(v);
            }
        }
        for (p, offs) in &offsets {
            assert_eq!(
                *offs,
                (0..offs.len() as i64).collect::<Vec<_>>(),
                "{codec}: partition {p} offsets"
            );
        }
        assert!(
            offsets.len() >= 2,
            "{codec}: 11 keys all hashed to {} partition(s)",
            offsets.len()
        );
        values.sort();
        let mut want: Vec<String> = (0..n).map(|i| format!("{codec}-value-{i}")).collect();
        want.sort();
        assert_eq!(values, want, "{codec}: values");

        // Records of one key keep their produce order.
        let k3: Vec<usize> = msgs
            .iter()
            .filter(|m| m["key"] == "key-3")
            .map(|m| {
                m["payload"]
                    .as_str()
                    .unwrap()
                    .rsplit('-')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            k3,
            (0..n).filter(|i| i % 10 == 3).collect::<Vec<_>>(),
            "{codec}: order of key-3"
        );
    }

    // One partition, a start offset relative to the end, a count, and a message of 600 KB.
    create_topic(&b, "big", 1);
    let big = "x".repeat(600 * 1024);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("big.bin");
    std::fs::write(&f, &big).unwrap();
    kcat(
        &b,
        &[
            "-P",
            "-t",
            "big",
            "-p",
            "0",
            "-z",
            "lz4",
            f.to_str().unwrap(),
        ],
        b"",
        Duration::from_secs(30),
    );
    kcat(
        &b,
        &["-P", "-t", "big", "-p", "0"],
        b"a\nb\nc\n",
        Duration::from_secs(30),
    );
    let out = kcat(
        &b,
        &[
            "-C", "-t", "big", "-p", "0", "-o", "-2", "-e", "-f", "%o:%s\n",
        ],
        b"",
        Duration::from_secs(30),
    );
    assert_eq!(out, "2:b\n3:c\n", "offset -2 from the end");
    let out = kcat(
        &b,
        &[
            "-C",
            "-t",
            "big",
            "-p",
            "0",
            "-o",
            "beginning",
            "-c",
            "1",
            "-f",
            "%o:%S\n",
        ],
        b"",
        Duration::from_secs(30),
    );
    assert_eq!(out, format!("0:{}\n", big.len()), "600 KB message");
}

#[test]
fn query_and_consume_by_timestamp() {
    need_kcat();
    let b = Broker::start();
    create_topic(&b, "times", 2);
    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .set("linger.ms", "0")
        .create()
        .expect("producer");
    let base = 1_700_000_000_000i64;
    // Partition 0: ts base, base+1000, ... base+9000 in separate batches; partition 1: one
    // batch whose records are out of timestamp order.
    for i in 0..10 {
        p.send(
            BaseRecord::<(), _>::to("times")
                .partition(0)
                .payload(&format!("p0-{i}"))
                .timestamp(base + i * 1000),
        )
        .expect("send");
        p.flush(Duration::from_secs(10)).expect("flush");
    }
    for (i, ts) in [5000i64, 1000, 9000, 3000].iter().enumerate() {
        p.send(
            BaseRecord::<(), _>::to("times")
                .partition(1)
                .payload(&format!("p1-{i}"))
                .timestamp(base + ts),
        )
        .expect("send");
    }
    p.flush(Duration::from_secs(10)).expect("flush");

    let q = |spec: &str| -> i64 {
        let out = kcat(&b, &["-Q", "-J", "-t", spec], b"", Duration::from_secs(20));
        let v: Value = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("kcat -Q {spec}: {out:?}: {e}"));
        let part = spec.split(':').nth(1).unwrap();
        let r = &v["times"][part];
        assert!(r.get("error").is_none(), "kcat -Q {spec}: {r}");
        r["offset"]
            .as_i64()
            .unwrap_or_else(|| panic!("kcat -Q {spec}: {v}"))
    };
    assert_eq!(q(&format!("times:0:{}", base)), 0);
    assert_eq!(q(&format!("times:0:{}", base + 3000)), 3, "exact timestamp");
    assert_eq!(
        q(&format!("times:0:{}", base + 3500)),
        4,
        "first record at or after"
    );
    assert_eq!(q(&format!("times:0:{}", base - 1)), 0);
    assert_eq!(
        q(&format!("times:0:{}", base + 9001)),
        -1,
        "after the last timestamp: no offset"
    );
    assert_eq!(q("times:0:-1"), 10, "latest");
    assert_eq!(q("times:0:-2"), 0, "earliest");
    // In one batch with timestamps 5000, 1000, 9000, 3000: the first record whose timestamp is
    // >= the target.
    assert_eq!(
        q(&format!("times:1:{}", base + 2000)),
        0,
        "first record >= 2000 is offset 0 (5000)"
    );
    assert_eq!(
        q(&format!("times:1:{}", base + 6000)),
        2,
        "first record >= 6000 is offset 2 (9000)"
    );
    assert_eq!(q(&format!("times:1:{}", base + 9001)), -1);

    let out = kcat(
        &b,
        &[
            "-C",
            "-t",
            "times",
            "-p",
            "0",
            "-o",
            &format!("s@{}", base + 6500),
            "-e",
            "-f",
            "%o %s %T\n",
        ],
        b"",
        Duration::from_secs(20),
    );
    assert_eq!(
        out,
        format!(
            "7 p0-7 {}\n8 p0-8 {}\n9 p0-9 {}\n",
            base + 7000,
            base + 8000,
            base + 9000
        ),
        "consume from a timestamp"
    );
    let out = kcat(
        &b,
        &[
            "-C",
            "-t",
            "times",
            "-p",
            "0",
            "-o",
            "beginning",
            "-o",
            &format!("e@{}", base + 2000),
            "-f",
            "%o\n",
        ],
        b"",
        Duration::from_secs(20),
    );
    assert_eq!(out, "0\n1\n", "consume until a timestamp");
}
