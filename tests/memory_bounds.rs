//! Memory bounds seen from outside: the broker process, raw Kafka frames over TCP, and the
//! broker's memory from /proc/PID/status.
//!
//! - A fetch that asks for no limit (max_bytes 0 or -1) or for more than the broker serves gets
//!   `memory.fetch_bytes_max`.
//! - A frame length costs nothing until the frame's bytes arrive, frames being read draw from
//!   the shard's `memory.inflight_bytes_per_shard` (a spent budget stops the reading), and a
//!   stalled body is dropped after `net.request_body_idle_timeout_ms`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::raw::{batch, call, connect, metadata, topic_name};
use common::Broker;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchRequest, FetchTopic};
use kafka_protocol::messages::produce_request::{
    PartitionProduceData, ProduceRequest, TopicProduceData,
};
use kafka_protocol::messages::{ApiKey, FetchResponse, ProduceResponse};

fn broker_with(replacements: &[(&str, &str)], extra: &[&str]) -> (Broker, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let mut text = fjord::config::DEFAULT_TUNING.to_string();
    for (from, to) in replacements {
        assert!(text.contains(from), "tuning/default.toml has {from}");
        text = text.replace(from, to);
    }
    let cfg = tmp.path().join("tuning.toml");
    std::fs::write(&cfg, text).unwrap();
    let mut args = vec!["--config", cfg.to_str().unwrap()];
    args.extend_from_slice(extra);
    let b = Broker::start_with(&args);
    (b, tmp)
}

/// (VmRSS, VmData) of a process in KiB.
fn mem_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("broker status");
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/PID/status"))
    };
    (field("VmRSS:"), field("VmData:"))
}

#[test]
fn fetch_asking_for_no_limit_gets_the_broker_cap() {
    let cap = 1usize << 20;
    let (b, _tmp) = broker_with(
        &[("fetch_bytes_max = 57671680", "fetch_bytes_max = 1048576")],
        &[],
    );
    let mut s = connect(&b);
    // Auto-created by Metadata; then 4 MiB in 40 batches of ~100 KiB.
    let md = metadata(&mut s, "capped");
    assert_eq!(md.topics[0].error_code, 0, "topic auto-created");
    let one = batch(100, 1000);
    for _ in 0..40 {
        let mut pd = PartitionProduceData::default();
        pd.index = 0;
        pd.records = Some(one.clone());
        let mut td = TopicProduceData::default();
        td.name = topic_name("capped");
        td.partition_data.push(pd);
        let mut req = ProduceRequest::default();
        req.acks = 1;
        req.timeout_ms = 5000;
        req.topic_data.push(td);
        let r: ProduceResponse = call(&mut s, ApiKey::Produce, 9, &req);
        assert_eq!(r.responses[0].partition_responses[0].error_code, 0);
    }
    for max_bytes in [0, -1, i32::MAX] {
        let mut fp = FetchPartition::default();
        fp.partition = 0;
        fp.fetch_offset = 0;
        fp.partition_max_bytes = i32::MAX;
        let mut ft = FetchTopic::default();
        ft.topic = topic_name("capped");
        ft.partitions.push(fp);
        let mut req = FetchRequest::default();
        req.replica_id = kafka_protocol::messages::BrokerId(-1);
        req.max_wait_ms = 0;
        req.min_bytes = 1;
        req.max_bytes = max_bytes;
        req.topics.push(ft);
        let r: FetchResponse = call(&mut s, ApiKey::Fetch, 4, &req);
        let pd = &r.responses[0].partitions[0];
        assert_eq!(pd.error_code, 0);
        let n = pd.records.as_ref().map(|r| r.len()).unwrap_or(0);
        eprintln!("fetch max_bytes {max_bytes}: {n} bytes of records");
        assert!(n > 0, "max_bytes {max_bytes}: records returned");
        // Whole batches: at most the cap plus the batch that crosses it.
        assert!(
            n <= cap + one.len(),
            "max_bytes {max_bytes}: {n} bytes returned, more than the broker's cap {cap}"
        );
    }
}

#[test]
fn frame_lengths_cost_nothing_until_their_bytes_arrive() {
    let frame_max = 8usize << 20;
    let (b, _tmp) = broker_with(
        &[
            (
                "request_bytes_max = 104857600",
                "request_bytes_max = 8388608",
            ),
            (
                "inflight_bytes_per_shard = 268435456",
                "inflight_bytes_per_shard = 16777216",
            ),
            (
                "request_body_idle_timeout_ms = 30000",
                "request_body_idle_timeout_ms = 1000",
            ),
        ],
        &["--cores", "1"],
    );
    let pid = b.child.as_ref().unwrap().id();
    let mut probe = connect(&b);
    metadata(&mut probe, "warm");
    let (rss0, data0) = mem_kib(pid);

    // A length over socket.request.max.bytes closes the connection at once.
    let mut over = connect(&b);
    over.write_all(&((frame_max + 1) as i32).to_be_bytes())
        .unwrap();
    let mut sink = Vec::new();
    let _ = over.read_to_end(&mut sink);
    assert!(sink.is_empty(), "no answer to an oversized frame");

    // 24 connections announce frames of the largest allowed size, send 100 bytes, then stall.
    let mut stalled = Vec::new();
    for _ in 0..24 {
        let mut s = connect(&b);
        s.write_all(&(frame_max as i32).to_be_bytes()).unwrap();
        s.write_all(&[0u8; 100]).unwrap();
        stalled.push(s);
    }
    let start = Instant::now();
    let (mut rss_peak, mut data_peak) = (rss0, data0);
    while start.elapsed() < Duration::from_secs(3) {
        let (r, d) = mem_kib(pid);
        rss_peak = rss_peak.max(r);
        data_peak = data_peak.max(d);
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "24 stalled 8 MiB frames: VmRSS {rss0} -> {rss_peak} KiB, VmData {data0} -> {data_peak} KiB"
    );
    // Two frames fit the 16 MiB budget; each holds a first buffer of at most 1 MiB.
    assert!(
        data_peak - data0 < 24 * 1024,
        "announced frames were allocated: VmData grew {} KiB",
        data_peak - data0
    );

    // The stalled bodies time out one budget-full at a time; then the shard serves again.
    let mut fresh = connect(&b);
    fresh
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let md = metadata(&mut fresh, "after");
    assert_eq!(md.topics[0].error_code, 0);
    let closed = stalled
        .iter_mut()
        .filter(|s: &&mut TcpStream| {
            let mut one = [0u8; 1];
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            match (&**s).read(&mut one) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
            }
        })
        .count();
    assert_eq!(closed, 24, "every stalled connection was closed");
    assert!(
        b.log().contains("request body stalled"),
        "the broker says why it closed them"
    );
}
