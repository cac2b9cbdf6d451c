//! kill -9 during acks=all appends loses nothing acknowledged; malformed input gets Kafka's
//! answer (or a closed connection) and never takes the broker down.

mod common;

use common::raw::batch;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use common::Broker;
use kafka_protocol::messages::produce_request::{
    PartitionProduceData, ProduceRequest, TopicProduceData,
};
use kafka_protocol::messages::{ApiKey, ProduceResponse, RequestHeader, TopicName};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;

struct Acked(Arc<Mutex<HashSet<String>>>);
impl ClientContext for Acked {}
impl ProducerContext for Acked {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        if let Ok(m) = r {
            let v = String::from_utf8_lossy(m.payload().unwrap_or_default()).to_string();
            self.0.lock().unwrap().insert(v);
        }
    }
}

fn read_all(b: &Broker, topic: &str, partitions: i32) -> HashSet<String> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .set("group.id", "crash-reader")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut end = 0i64;
    for p in 0..partitions {
        let (_, hi) = c
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .unwrap();
        end += hi;
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = HashSet::new();
    let mut n = 0i64;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while n < end && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            out.insert(String::from_utf8_lossy(m.payload().unwrap_or_default()).to_string());
            n += 1;
        }
    }
    assert_eq!(n, end, "read up to the high watermarks");
    out
}

#[test]
fn kill9_during_acks_all_loses_no_acknowledged_record() {
    let mut b = Broker::start();
    let acked = Arc::new(Mutex::new(HashSet::new()));
    for round in 0..4 {
        let p: ThreadedProducer<Acked> = ClientConfig::new()
            .set("bootstrap.servers", b.bootstrap())
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("message.timeout.ms", "3000")
            .set("topic.metadata.refresh.interval.ms", "500")
            .create_with_context(Acked(acked.clone()))
            .unwrap();
        let stop = std::time::Instant::now() + Duration::from_millis(400 + round * 150);
        let mut i = 0u64;
        while std::time::Instant::now() < stop {
            let v = format!("r{round}-{i}");
            let _ = p.send(BaseRecord::<(), _>::to("crash").payload(&v));
            i += 1;
            if i.is_multiple_of(200) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        b.kill9();
        // Let the producer give up on what was in flight; only delivered records count.
        let _ = p.flush(Duration::from_secs(5));
        drop(p);
        b.spawn();
        let stored = read_all(&b, "crash", 1);
        let acked_now = acked.lock().unwrap().clone();
        assert!(!acked_now.is_empty(), "some records were acknowledged");
        let missing: Vec<_> = acked_now.difference(&stored).take(5).collect();
        assert!(
            missing.is_empty(),
            "round {round}: acknowledged records lost after kill -9: {missing:?}"
        );
    }
}

fn frame(api: ApiKey, version: i16, body: &impl Encodable) -> Vec<u8> {
    let mut h = RequestHeader::default();
    h.request_api_key = api as i16;
    h.request_api_version = version;
    h.correlation_id = 7;
    h.client_id = Some(StrBytes::from_static_str("raw-test"));
    let mut buf = BytesMut::new();
    h.encode(&mut buf, api.request_header_version(version))
        .unwrap();
    body.encode(&mut buf, version).unwrap();
    let mut out = (buf.len() as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&buf);
    out
}

fn read_response(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; i32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).ok()?;
    Some(body)
}

fn connect(b: &Broker) -> TcpStream {
    let s = TcpStream::connect(b.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn produce_raw(b: &Broker, topic: &str, batch: bytes::Bytes) -> i16 {
    let mut pd = PartitionProduceData::default();
    pd.index = 0;
    pd.records = Some(batch);
    let mut td = TopicProduceData::default();
    td.name = TopicName(StrBytes::from_string(topic.to_string()));
    td.partition_data.push(pd);
    let mut req = ProduceRequest::default();
    req.acks = 1;
    req.timeout_ms = 5000;
    req.topic_data.push(td);
    let mut s = connect(b);
    s.write_all(&frame(ApiKey::Produce, 9, &req)).unwrap();
    let body = read_response(&mut s).expect("produce response");
    let mut buf = bytes::Bytes::from(body);
    let _ = kafka_protocol::messages::ResponseHeader::decode(
        &mut buf,
        ApiKey::Produce.response_header_version(9),
    )
    .unwrap();
    let resp = ProduceResponse::decode(&mut buf, 9).unwrap();
    resp.responses[0].partition_responses[0].error_code
}

#[test]
fn malformed_input_gets_kafka_errors_and_broker_stays_up() {
    let b = Broker::start_with(&["--cores", "2"]);
    // Create the topic through a real client first.
    let p: ThreadedProducer<rdkafka::producer::DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .create()
        .unwrap();
    p.send(BaseRecord::<(), _>::to("bad").payload("good"))
        .unwrap();
    p.flush(Duration::from_secs(10)).unwrap();

    // 1. CRC mismatch → CORRUPT_MESSAGE (2).
    let good = batch(3, 10);
    let mut bad = good.to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    assert_eq!(produce_raw(&b, "bad", bad.into()), 2);
    // 2. Oversized batch (> max.message.bytes) → MESSAGE_TOO_LARGE (10).
    assert_eq!(produce_raw(&b, "bad", batch(2, 2_000_000)), 10);
    // 3. Unknown topic → UNKNOWN_TOPIC_OR_PARTITION (3).
    assert_eq!(produce_raw(&b, "no-such-topic", good.clone()), 3);
    // 4. Truncated batch → CORRUPT_MESSAGE.
    assert_eq!(produce_raw(&b, "bad", good.slice(..good.len() - 5)), 2);
    // 5. A good one still works.
    assert_eq!(produce_raw(&b, "bad", good), 0);

    // 6. Unknown ApiVersions version → v0-format response with UNSUPPORTED_VERSION (35).
    let mut s = connect(&b);
    let mut raw = BytesMut::new();
    raw.put_i16(18);
    raw.put_i16(99);
    raw.put_i32(42);
    raw.put_i16(-1);
    let mut f = (raw.len() as i32).to_be_bytes().to_vec();
    f.extend_from_slice(&raw);
    s.write_all(&f).unwrap();
    let body = read_response(&mut s).expect("api versions reply");
    assert_eq!(i32::from_be_bytes(body[0..4].try_into().unwrap()), 42);
    assert_eq!(i16::from_be_bytes(body[4..6].try_into().unwrap()), 35);

    // 7. Garbage frames, a negative size, a huge size, an unknown api key, a truncated header:
    // the connection is closed, nothing else happens.
    for junk in [
        vec![0xff, 0xff, 0xff, 0xf0],
        vec![0x7f, 0xff, 0xff, 0xff, 1, 2, 3],
        vec![0, 0, 0, 8, 0x7f, 0x00, 0, 0, 0, 0, 0, 1],
        vec![0, 0, 0, 9, 0, 3, 0, 9, 0, 0, 0, 1, 0x7f],
        vec![0, 0, 0, 2, 0, 0],
    ] {
        let mut s = connect(&b);
        let _ = s.write_all(&junk);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    // 8. The broker is up and the stored data is intact: 1 + 3 records.
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .set("group.id", "x")
        .create()
        .unwrap();
    let (lo, hi) = c
        .fetch_watermarks("bad", 0, Duration::from_secs(10))
        .unwrap();
    assert_eq!((lo, hi), (0, 4));
    assert!(b.log().contains("CRC"), "a log line names the CRC mismatch");
}

/// Randomized frames (a fixed seed, printed): valid headers for every API we advertise with
/// random bodies, truncated bodies and random bytes. The broker answers or closes each
/// connection, and keeps serving.
#[test]
fn random_frames_never_take_the_broker_down() {
    let b = Broker::start_with(&["--cores", "2"]);
    let seed: u64 = std::env::var("FJORD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_f00d);
    eprintln!("random_frames seed {seed} (FJORD_FUZZ_SEED to replay)");
    let mut x = seed;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..400 {
        let api = (rnd() % 70) as i16;
        let version = (rnd() % 14) as i16;
        let body_len = (rnd() % 300) as usize;
        let mut raw = BytesMut::new();
        raw.put_i16(api);
        raw.put_i16(version);
        raw.put_i32(round);
        if rnd() % 4 != 0 {
            raw.put_i16(4);
            raw.put_slice(b"fuzz");
        }
        for _ in 0..body_len {
            raw.put_u8(rnd() as u8);
        }
        let mut f = (raw.len() as i32).to_be_bytes().to_vec();
        f.extend_from_slice(&raw);
        let mut s = connect(&b);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(&f);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    // Mutations of valid requests: these get past decoding and reach the handlers with odd
    // values (negative partitions, huge sizes, bad offsets).
    let mut valid: Vec<Vec<u8>> = Vec::new();
    {
        use kafka_protocol::messages::*;
        let mut md = MetadataRequest::default();
        let mut t = metadata_request::MetadataRequestTopic::default();
        t.name = Some(TopicName(StrBytes::from_static_str("fuzzed")));
        md.topics = Some(vec![t]);
        md.allow_auto_topic_creation = true;
        valid.push(frame(ApiKey::Metadata, 9, &md));
        let mut pd = PartitionProduceData::default();
        pd.records = Some(batch(3, 20));
        let mut td = TopicProduceData::default();
        td.name = TopicName(StrBytes::from_static_str("fuzzed"));
        td.partition_data.push(pd);
        let mut pr = ProduceRequest::default();
        pr.acks = 1;
        pr.timeout_ms = 1000;
        pr.topic_data.push(td);
        valid.push(frame(ApiKey::Produce, 9, &pr));
        let mut fp = fetch_request::FetchPartition::default();
        fp.partition_max_bytes = 1 << 20;
        let mut ft = fetch_request::FetchTopic::default();
        ft.topic = TopicName(StrBytes::from_static_str("fuzzed"));
        ft.partitions.push(fp);
        let mut fr = FetchRequest::default();
        fr.max_wait_ms = 10;
        fr.max_bytes = 1 << 20;
        fr.topics.push(ft);
        valid.push(frame(ApiKey::Fetch, 11, &fr));
        let mut lp = list_offsets_request::ListOffsetsPartition::default();
        lp.timestamp = -1;
        let mut lt = list_offsets_request::ListOffsetsTopic::default();
        lt.name = TopicName(StrBytes::from_static_str("fuzzed"));
        lt.partitions.push(lp);
        let mut lr = ListOffsetsRequest::default();
        lr.topics.push(lt);
        valid.push(frame(ApiKey::ListOffsets, 5, &lr));
        let mut ct = create_topics_request::CreatableTopic::default();
        ct.name = TopicName(StrBytes::from_static_str("fuzzed2"));
        ct.num_partitions = 2;
        ct.replication_factor = 1;
        let mut cr = CreateTopicsRequest::default();
        cr.topics.push(ct);
        valid.push(frame(ApiKey::CreateTopics, 5, &cr));
        let mut jp = join_group_request::JoinGroupRequestProtocol::default();
        jp.name = StrBytes::from_static_str("range");
        jp.metadata = bytes::Bytes::from_static(&[0, 1, 0, 0, 0, 0]);
        let mut jr = JoinGroupRequest::default();
        jr.group_id = GroupId(StrBytes::from_static_str("fuzz-group"));
        jr.session_timeout_ms = 6000;
        jr.rebalance_timeout_ms = 100;
        jr.protocol_type = StrBytes::from_static_str("consumer");
        jr.protocols.push(jp);
        valid.push(frame(ApiKey::JoinGroup, 5, &jr));
        let mut op = offset_commit_request::OffsetCommitRequestPartition::default();
        op.committed_offset = 5;
        let mut ot = offset_commit_request::OffsetCommitRequestTopic::default();
        ot.name = TopicName(StrBytes::from_static_str("fuzzed"));
        ot.partitions.push(op);
        let mut oc = OffsetCommitRequest::default();
        oc.group_id = GroupId(StrBytes::from_static_str("fuzz-group"));
        oc.generation_id_or_member_epoch = -1;
        oc.topics.push(ot);
        valid.push(frame(ApiKey::OffsetCommit, 7, &oc));
    }
    for _ in 0..400 {
        let mut f = valid[(rnd() % valid.len() as u64) as usize].clone();
        // Leave the size prefix alone most of the time so that the body is what changes.
        let flips = 1 + rnd() % 4;
        for _ in 0..flips {
            let at = 4 + (rnd() as usize) % (f.len() - 4);
            f[at] = rnd() as u8;
        }
        let mut s = connect(&b);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(&f);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    // Still up: a real client gets metadata.
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .set("group.id", "x")
        .create()
        .unwrap();
    c.fetch_metadata(None, Duration::from_secs(10))
        .expect("broker still answers after random frames");
    assert!(!b.log().contains("panicked"), "no panic in the broker log");
}
