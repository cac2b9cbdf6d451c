//! Incremental fetch sessions (KIP-227) against the real broker: raw Fetch frames with chosen
//! session ids and epochs, and kafka-python, which uses sessions on its own.

mod common;

use common::raw::{batch, call, connect, metadata, topic_name};
use common::Broker;
use kafka_protocol::messages::fetch_request::{
    FetchPartition, FetchRequest, FetchTopic, ForgottenTopic,
};
use kafka_protocol::messages::produce_request::{
    PartitionProduceData, ProduceRequest, TopicProduceData,
};
use kafka_protocol::messages::{ApiKey, BrokerId, FetchResponse, ProduceResponse};

const FETCH_SESSION_ID_NOT_FOUND: i16 = 70;
const INVALID_FETCH_SESSION_EPOCH: i16 = 71;

fn produce(s: &mut std::net::TcpStream, topic: &str, partition: i32, n: usize) {
    let mut pd = PartitionProduceData::default();
    pd.index = partition;
    pd.records = Some(batch(n, 100));
    let mut td = TopicProduceData::default();
    td.name = topic_name(topic);
    td.partition_data.push(pd);
    let mut req = ProduceRequest::default();
    req.acks = -1;
    req.timeout_ms = 5000;
    req.topic_data.push(td);
    let r: ProduceResponse = call(s, ApiKey::Produce, 9, &req);
    assert_eq!(r.responses[0].partition_responses[0].error_code, 0);
}

fn fetch(
    s: &mut std::net::TcpStream,
    session: (i32, i32),
    parts: &[(&str, i32, i64)],
    forget: &[(&str, i32)],
) -> FetchResponse {
    fetch_waiting(s, session, parts, forget, 100)
}

fn fetch_waiting(
    s: &mut std::net::TcpStream,
    session: (i32, i32),
    parts: &[(&str, i32, i64)],
    forget: &[(&str, i32)],
    max_wait_ms: i32,
) -> FetchResponse {
    let mut req = FetchRequest::default();
    req.replica_id = BrokerId(-1);
    req.max_wait_ms = max_wait_ms;
    req.min_bytes = 1;
    req.max_bytes = 1 << 20;
    req.session_id = session.0;
    req.session_epoch = session.1;
    for (t, p, offset) in parts {
        let mut fp = FetchPartition::default();
        fp.partition = *p;
        fp.fetch_offset = *offset;
        fp.partition_max_bytes = 1 << 20;
        let mut ft = FetchTopic::default();
        ft.topic = topic_name(t);
        ft.partitions.push(fp);
        req.topics.push(ft);
    }
    for (t, p) in forget {
        let mut f = ForgottenTopic::default();
        f.topic = topic_name(t);
        f.partitions.push(*p);
        req.forgotten_topics_data.push(f);
    }
    call(s, ApiKey::Fetch, 12, &req)
}

/// (partition, records bytes, high watermark) of every partition in a response.
fn seen(r: &FetchResponse) -> Vec<(i32, usize, i64)> {
    let mut v: Vec<(i32, usize, i64)> = r
        .responses
        .iter()
        .flat_map(|t| t.partitions.iter())
        .map(|p| {
            (
                p.partition_index,
                p.records.as_ref().map_or(0, |r| r.len()),
                p.high_watermark,
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn incremental_fetches_carry_only_what_changed() {
    let b = Broker::start_with(&["--set", "log.num_partitions=3"]);
    let mut s = connect(&b);
    assert_eq!(metadata(&mut s, "sess").topics[0].error_code, 0);
    for p in 0..3 {
        produce(&mut s, "sess", p, 5);
    }
    // Epoch 0 opens a session: a full answer, with a new session id.
    let all = [("sess", 0, 0), ("sess", 1, 0), ("sess", 2, 0)];
    let r = fetch(&mut s, (0, 0), &all, &[]);
    assert_eq!(r.error_code, 0);
    let id = r.session_id;
    assert!(id > 0, "a session was opened");
    let first = seen(&r);
    assert_eq!(first.len(), 3);
    assert!(
        first.iter().all(|(_, n, hw)| *n > 0 && *hw == 5),
        "{first:?}"
    );
    // Epoch 1, nothing named: positions are remembered (still at 0), so the data comes again.
    let r = fetch(&mut s, (id, 1), &[], &[]);
    assert_eq!((r.error_code, r.session_id), (0, id));
    assert_eq!(seen(&r).len(), 3);
    // Epoch 2: the client moved to the end of each partition; nothing new, nothing sent.
    let r = fetch(
        &mut s,
        (id, 2),
        &[("sess", 0, 5), ("sess", 1, 5), ("sess", 2, 5)],
        &[],
    );
    assert_eq!(r.error_code, 0);
    assert_eq!(seen(&r), vec![], "unchanged partitions are left out");
    // New data on partition 1 only: only partition 1 comes back.
    produce(&mut s, "sess", 1, 2);
    let r = fetch(&mut s, (id, 3), &[], &[]);
    let got = seen(&r);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].0, got[0].2), (1, 7));
    // Forget partition 1 and move on; new data there is not sent, new data on 2 is.
    produce(&mut s, "sess", 1, 1);
    produce(&mut s, "sess", 2, 1);
    let r = fetch(&mut s, (id, 4), &[], &[("sess", 1)]);
    let got = seen(&r);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].0, got[0].2), (2, 6));
    // Session errors, as Kafka answers them.
    let r = fetch(&mut s, (id, 4), &[], &[]);
    assert_eq!(
        r.error_code, INVALID_FETCH_SESSION_EPOCH,
        "a repeated epoch"
    );
    assert!(r.responses.is_empty());
    let r = fetch(&mut s, (id + 1, 1), &[], &[]);
    assert_eq!(
        r.error_code, FETCH_SESSION_ID_NOT_FOUND,
        "an unknown session"
    );
    // Epoch -1 closes the session and fetches in full without one.
    let r = fetch(&mut s, (id, -1), &all, &[]);
    assert_eq!((r.error_code, r.session_id), (0, 0));
    assert_eq!(seen(&r).len(), 3);
    let r = fetch(&mut s, (id, 5), &[], &[]);
    assert_eq!(r.error_code, FETCH_SESSION_ID_NOT_FOUND, "closed");
}

/// Produces `n` records to `topic`/`partition` from another connection, 300 ms from now (while
/// a fetch long-polls).
fn produce_soon(
    addr: std::net::SocketAddr,
    topic: &'static str,
    partition: i32,
    n: usize,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        produce(&mut c, topic, partition, n);
    })
}

/// Deletes the records of `topic`/`partition` before `offset` (DeleteRecords) from another
/// connection, 300 ms from now (while a fetch long-polls).
fn delete_records_soon(
    addr: std::net::SocketAddr,
    topic: &'static str,
    partition: i32,
    offset: i64,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        use kafka_protocol::messages::delete_records_request::{
            DeleteRecordsPartition, DeleteRecordsRequest, DeleteRecordsTopic,
        };
        use kafka_protocol::messages::DeleteRecordsResponse;
        std::thread::sleep(std::time::Duration::from_millis(300));
        let mut d = std::net::TcpStream::connect(addr).unwrap();
        let mut dp = DeleteRecordsPartition::default();
        dp.partition_index = partition;
        dp.offset = offset;
        let mut dt = DeleteRecordsTopic::default();
        dt.name = topic_name(topic);
        dt.partitions.push(dp);
        let mut req = DeleteRecordsRequest::default();
        req.topics.push(dt);
        req.timeout_ms = 5000;
        let r: DeleteRecordsResponse = call(&mut d, ApiKey::DeleteRecords, 2, &req);
        assert_eq!(r.topics[0].partitions[0].error_code, 0);
    })
}

/// (partition, log start offset) of every partition in a response.
fn starts(r: &FetchResponse) -> Vec<(i32, i64)> {
    r.responses
        .iter()
        .flat_map(|t| t.partitions.iter())
        .map(|p| (p.partition_index, p.log_start_offset))
        .collect()
}

/// A session whose partitions are all at their end is not looked at partition by partition:
/// its long-poll waits for the shard's change journal. New data on any one of its partitions,
/// and a moved log start offset, must still end the wait at once and come back alone; with
/// nothing new, the fetch waits out max_wait_ms.
#[test]
fn an_idle_session_of_many_partitions_wakes_on_any_change() {
    let b = Broker::start_with(&["--set", "log.num_partitions=40"]);
    let mut s = connect(&b);
    assert_eq!(metadata(&mut s, "many").topics[0].error_code, 0);
    produce(&mut s, "many", 7, 2);
    // Open the session at the end of every partition.
    let all: Vec<(&str, i32, i64)> = (0..40)
        .map(|p| ("many", p, if p == 7 { 2 } else { 0 }))
        .collect();
    let r = fetch(&mut s, (0, 0), &all, &[]);
    let id = r.session_id;
    assert!(id > 0);
    assert_eq!(seen(&r).len(), 40);
    assert!(seen(&r).iter().all(|(_, n, _)| *n == 0));
    // Nothing new: the fetch waits out its max_wait_ms and answers nothing.
    let t = std::time::Instant::now();
    let r = fetch_waiting(&mut s, (id, 1), &[], &[], 600);
    assert_eq!(seen(&r), vec![]);
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    // Data on partition 33 while the fetch waits: it comes back, alone, long before the
    // deadline.
    let addr = b.addr;
    let producer = produce_soon(addr, "many", 33, 3);
    let t = std::time::Instant::now();
    let r = fetch_waiting(&mut s, (id, 2), &[], &[], 10_000);
    producer.join().unwrap();
    let got = seen(&r);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].0, got[0].2), (33, 3));
    assert!(got[0].1 > 0, "with its records");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        t.elapsed()
    );
    // The client moves to the end of 33; the session is idle again, then partition 7's log
    // start moves (DeleteRecords): the waiting fetch reports it.
    // Nothing new for the moved partition either: the fetch waits out its max_wait_ms.
    let t = std::time::Instant::now();
    let r = fetch_waiting(&mut s, (id, 3), &[("many", 33, 3)], &[], 600);
    assert_eq!(seen(&r), vec![]);
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    let deleter = delete_records_soon(addr, "many", 7, 1);
    let t = std::time::Instant::now();
    let r = fetch_waiting(&mut s, (id, 4), &[], &[], 10_000);
    deleter.join().unwrap();
    assert_eq!(starts(&r), vec![(7, 1)]);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        t.elapsed()
    );
}

/// A full fetch (no session) long-polling many partitions of one shard watches them through the
/// shard's one signal: data produced mid-wait on any of them ends the wait at once.
#[test]
fn a_long_poll_over_many_partitions_wakes_on_data_in_any() {
    let b = Broker::start_with(&["--set", "log.num_partitions=40"]);
    let mut s = connect(&b);
    assert_eq!(metadata(&mut s, "wide").topics[0].error_code, 0);
    let all: Vec<(&str, i32, i64)> = (0..40).map(|p| ("wide", p, 0)).collect();
    // Nothing anywhere: the fetch waits out its max_wait_ms.
    let t = std::time::Instant::now();
    let r = fetch_waiting(&mut s, (0, -1), &all, &[], 500);
    assert!(seen(&r).iter().all(|(_, n, _)| *n == 0));
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    for p in [3, 38] {
        let producer = produce_soon(b.addr, "wide", p, 2);
        let t = std::time::Instant::now();
        let from: Vec<(&str, i32, i64)> = (0..40)
            .map(|q| ("wide", q, if q == 3 && p == 38 { 2 } else { 0 }))
            .collect();
        let r = fetch_waiting(&mut s, (0, -1), &from, &[], 10_000);
        producer.join().unwrap();
        let with_data: Vec<i32> = seen(&r)
            .iter()
            .filter(|(_, n, _)| *n > 0)
            .map(|(q, _, _)| *q)
            .collect();
        assert_eq!(with_data, vec![p]);
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            t.elapsed()
        );
    }
}

#[test]
fn a_full_cache_answers_without_a_session() {
    let b = Broker::start_with(&["--set", "max.incremental.fetch.session.cache.slots=1"]);
    let mut s = connect(&b);
    assert_eq!(metadata(&mut s, "full").topics[0].error_code, 0);
    produce(&mut s, "full", 0, 1);
    let r = fetch(&mut s, (0, 0), &[("full", 0, 0)], &[]);
    assert!(r.session_id > 0);
    // The only slot is taken by a session used just now: the next client fetches in full.
    let r = fetch(&mut s, (0, 0), &[("full", 0, 0)], &[]);
    assert_eq!((r.error_code, r.session_id), (0, 0));
    assert_eq!(seen(&r).len(), 1);
}

/// kafka-python opens a session and sends incremental fetches on its own; it must read every
/// record, including one produced while it polls.
#[test]
fn kafka_python_reads_everything_through_a_session() {
    if !common::have("python3") {
        eprintln!("SKIP: python3 not installed");
        return;
    }
    let b = Broker::start_with(&["--set", "log.num_partitions=8"]);
    let script = r#"
import sys, time, logging, kafka
seen = {"incremental": 0}
class Count(logging.Handler):
    def emit(self, rec):
        if "incremental fetch response" in rec.getMessage():
            seen["incremental"] += 1
h = Count(); h.setLevel(logging.DEBUG)
lg = logging.getLogger("kafka.consumer.fetcher"); lg.setLevel(logging.DEBUG); lg.addHandler(h)
bs = sys.argv[1]
p = kafka.KafkaProducer(bootstrap_servers=bs)
for i in range(400):
    p.send("py-sess", b"v%d" % i, partition=i % 8)
p.flush()
c = kafka.KafkaConsumer("py-sess", bootstrap_servers=bs, auto_offset_reset="earliest",
                        enable_auto_commit=False, fetch_max_wait_ms=100)
got, late_sent, t = set(), False, time.time()
while time.time() - t < 30 and len(got) < 401:
    for tp, msgs in c.poll(timeout_ms=200).items():
        for m in msgs:
            got.add(m.value)
    if len(got) == 400 and not late_sent:
        time.sleep(0.5)
        p.send("py-sess", b"late", partition=5); p.flush(); late_sent = True
print("GOT", len(got), "INCREMENTAL", seen["incremental"])
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script, &b.bootstrap()])
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("GOT"))
        .unwrap_or_else(|| panic!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f[1], "401", "every record, the late one too: {line}");
    let incremental: u32 = f[3].parse().unwrap();
    assert!(
        incremental > 0,
        "kafka-python used incremental fetches: {line}"
    );
}

/// A client without fetch sessions (librdkafka) sends the same full fetch again every
/// max_wait_ms while its partitions are idle. The repeat is answered as the last one was,
/// without looking at each partition again, while nothing changes for its partitions; data on
/// any of them ends its wait at once, a moved log start offset or a deleted topic is answered
/// as it now is, and changes elsewhere are not noticed.
#[test]
fn a_repeated_idle_full_fetch_is_answered_as_before_until_something_changes() {
    let b = Broker::start_with(&[
        "--set",
        "log.num_partitions=40",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let m = common::metrics_addr(&b);
    let repeats = || common::metric_total(m, "fjord_fetch_idle_repeats_total");
    let mut s = connect(&b);
    assert_eq!(metadata(&mut s, "rep").topics[0].error_code, 0);
    assert_eq!(metadata(&mut s, "elsewhere").topics[0].error_code, 0);
    produce(&mut s, "rep", 7, 2);
    let ends = |moved: &[(i32, i64)]| -> Vec<(&'static str, i32, i64)> {
        (0..40)
            .map(|p| {
                let at = moved.iter().find(|(q, _)| *q == p).map_or(0, |(_, o)| *o);
                ("rep", p, at)
            })
            .collect()
    };
    let waited_out = |t: std::time::Instant| {
        assert!(
            t.elapsed() >= std::time::Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        )
    };
    let at_end = ends(&[(7, 2)]);
    // The first idle fetch waits out max_wait_ms; its repeats do too, with the same answer.
    let t = std::time::Instant::now();
    let first = fetch_waiting(&mut s, (0, -1), &at_end, &[], 300);
    waited_out(t);
    assert_eq!(seen(&first).len(), 40);
    assert!(seen(&first)
        .iter()
        .all(|(p, n, hw)| *n == 0 && *hw == if *p == 7 { 2 } else { 0 }));
    assert_eq!(repeats(), 0.0);
    for i in 1..=3 {
        let t = std::time::Instant::now();
        let r = fetch_waiting(&mut s, (0, -1), &at_end, &[], 300);
        waited_out(t);
        assert_eq!((seen(&r), starts(&r)), (seen(&first), starts(&first)));
        assert_eq!(repeats(), i as f64, "answered as the last one was");
    }
    // Data on partition 33 while a repeat waits: it comes back at once.
    let producer = produce_soon(b.addr, "rep", 33, 3);
    let t = std::time::Instant::now();
    let r = fetch_waiting(&mut s, (0, -1), &at_end, &[], 10_000);
    producer.join().unwrap();
    let with_data: Vec<(i32, i64)> = seen(&r)
        .iter()
        .filter(|(_, n, _)| *n > 0)
        .map(|(p, _, hw)| (*p, *hw))
        .collect();
    assert_eq!(with_data, vec![(33, 3)]);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(repeats(), 3.0);
    // Idle again at the new ends. Data on another topic does not end the repeat's wait.
    let at_end = ends(&[(7, 2), (33, 3)]);
    let t = std::time::Instant::now();
    fetch_waiting(&mut s, (0, -1), &at_end, &[], 600);
    waited_out(t);
    let producer = produce_soon(b.addr, "elsewhere", 0, 1);
    let t = std::time::Instant::now();
    let r = fetch_waiting(&mut s, (0, -1), &at_end, &[], 600);
    producer.join().unwrap();
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(550),
        "{:?}",
        t.elapsed()
    );
    assert!(seen(&r).iter().all(|(_, n, _)| *n == 0));
    assert_eq!(repeats(), 4.0);
    // Partition 7's log start moves (DeleteRecords) while a repeat waits: the answer reports
    // it (a full fetch waits for data, not for that, so at its deadline).
    let addr = b.addr;
    let deleter = delete_records_soon(addr, "rep", 7, 1);
    let t = std::time::Instant::now();
    let r = fetch_waiting(&mut s, (0, -1), &at_end, &[], 600);
    deleter.join().unwrap();
    waited_out(t);
    assert!(starts(&r).contains(&(7, 1)), "{:?}", starts(&r));
    assert_eq!(repeats(), 4.0);
    // Idle (a new request: a longer wait), then the topic is deleted while its repeat waits:
    // the repeat answers at once that the partitions are gone.
    let t = std::time::Instant::now();
    fetch_waiting(&mut s, (0, -1), &at_end, &[], 2_000);
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(1_900),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(repeats(), 4.0);
    let deleter = std::thread::spawn(move || {
        use kafka_protocol::messages::{DeleteTopicsRequest, DeleteTopicsResponse};
        std::thread::sleep(std::time::Duration::from_millis(300));
        let mut req = DeleteTopicsRequest::default();
        req.topic_names.push(topic_name("rep"));
        req.timeout_ms = 5000;
        let mut d = std::net::TcpStream::connect(addr).unwrap();
        let r: DeleteTopicsResponse = call(&mut d, ApiKey::DeleteTopics, 4, &req);
        assert_eq!(r.responses[0].error_code, 0);
    });
    let t = std::time::Instant::now();
    let r = fetch_waiting(&mut s, (0, -1), &at_end, &[], 2_000);
    deleter.join().unwrap();
    assert!(
        t.elapsed() < std::time::Duration::from_millis(1_500),
        "{:?}",
        t.elapsed()
    );
    let codes: Vec<i16> = r
        .responses
        .iter()
        .flat_map(|t| t.partitions.iter())
        .map(|p| p.error_code)
        .collect();
    assert_eq!(codes.len(), 40);
    assert!(
        codes.iter().all(|c| *c == 3),
        "UNKNOWN_TOPIC_OR_PARTITION: {codes:?}"
    );
    assert_eq!(repeats(), 4.0);
}
