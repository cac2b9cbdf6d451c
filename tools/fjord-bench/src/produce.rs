//! `produce`: pipelined Produce requests over N connections, closed loop (max rate) or open
//! loop at a fixed rate with coordinated-omission correction (latency measured from the
//! intended send time, so a stalled broker cannot hide its stall by slowing the sender).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use bytes::{Bytes, BytesMut};
use clap::{Args, ValueEnum};
use glommio::channels::local_channel;
use glommio::sync::Semaphore;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{ApiKey, ProduceRequest};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

use crate::hist::{new_hist, LatencyTap, Progress, Report};
use crate::proto::{self, error_name, Client, TopicLayout, Versions};
use crate::Common;

#[derive(Args, Clone, Debug)]
pub struct ProduceArgs {
    #[arg(long)]
    pub topic: String,
    /// Create the topic with this many partitions first (an existing topic is fine).
    #[arg(long)]
    pub create_partitions: Option<i32>,
    /// Use every partition ("all") or only the first N.
    #[arg(long, default_value = "all", value_parser = parse_partitions_used)]
    pub partitions_used: PartitionsUsed,
    /// Bytes of value per record.
    #[arg(long, default_value_t = 1024)]
    pub record_size: usize,
    /// Records per batch (one batch per Produce request).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub batch_records: u64,
    /// 0 (no response), 1 (leader) or -1/all (all in-sync replicas).
    #[arg(long, default_value = "1", allow_hyphen_values = true, value_parser = parse_acks)]
    pub acks: i16,
    #[arg(long, value_enum, default_value_t = CompressionArg::None)]
    pub compression: CompressionArg,
    /// Record keys: none, random, or card:N (N distinct keys).
    #[arg(long, default_value = "none", value_parser = parse_keys)]
    pub keys: Keys,
    /// TCP connections per partition leader.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub connections: u64,
    /// Pipelined requests per connection.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub in_flight: u64,
    /// Target records per second over all connections (0 = as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Run for this many seconds (default 10 unless --records is given).
    #[arg(long, conflicts_with = "records")]
    pub duration: Option<f64>,
    /// Stop after this many records (rounded up to whole batches).
    #[arg(long)]
    pub records: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PartitionsUsed {
    All,
    First(usize),
}

fn parse_partitions_used(s: &str) -> Result<PartitionsUsed, String> {
    if s == "all" {
        return Ok(PartitionsUsed::All);
    }
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(PartitionsUsed::First(n)),
        _ => Err("expected 'all' or a positive number".into()),
    }
}

fn parse_acks(s: &str) -> Result<i16, String> {
    match s {
        "0" => Ok(0),
        "1" => Ok(1),
        "-1" | "all" => Ok(-1),
        _ => Err("expected 0, 1, -1 or all".into()),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
pub enum CompressionArg {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl CompressionArg {
    pub fn codec(self) -> Compression {
        match self {
            CompressionArg::None => Compression::None,
            CompressionArg::Gzip => Compression::Gzip,
            CompressionArg::Snappy => Compression::Snappy,
            CompressionArg::Lz4 => Compression::Lz4,
            CompressionArg::Zstd => Compression::Zstd,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Keys {
    None,
    Random,
    Cardinality(u64),
}

fn parse_keys(s: &str) -> Result<Keys, String> {
    match s {
        "none" => Ok(Keys::None),
        "random" => Ok(Keys::Random),
        _ => match s.strip_prefix("card:").map(|n| n.parse::<u64>()) {
            Some(Ok(n)) if n > 0 => Ok(Keys::Cardinality(n)),
            _ => Err("expected none, random or card:N".into()),
        },
    }
}

/// splitmix64: enough randomness for payloads and keys, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Upper-case letters, like Kafka's own perf tool: compressible about as much as text.
    pub fn letters(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            let mut r = self.next_u64();
            for _ in 0..8 {
                if v.len() == n {
                    break;
                }
                v.push(b'A' + (r % 26) as u8);
                r >>= 8;
            }
        }
        v
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Encodes one RecordBatch v2 (no producer id) holding the given keys/values.
pub fn encode_batch(
    records: impl Iterator<Item = (Option<Bytes>, Bytes)>,
    compression: Compression,
    timestamp_ms: i64,
) -> Result<Bytes> {
    let records: Vec<Record> = records
        .enumerate()
        .map(|(i, (key, value))| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            // offset - sequence must stay constant for the encoder to keep one batch; this
            // makes the base sequence -1 (no sequence).
            sequence: i as i32 - 1,
            timestamp: timestamp_ms,
            key,
            value: Some(value),
            headers: Default::default(),
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression,
        },
    )?;
    Ok(buf.freeze())
}

/// A pool of distinct pre-encoded batches, reused round-robin, so the hot loop never encodes
/// or compresses and the tool measures the broker, not itself.
pub fn build_pool(
    record_size: usize,
    batch_records: u64,
    compression: Compression,
    keys: Keys,
    variants: usize,
    seed: u64,
) -> Result<Vec<Bytes>> {
    let mut rng = Rng::new(seed);
    let ts = now_ms();
    let mut pool = Vec::with_capacity(variants);
    for _ in 0..variants {
        let mut recs = Vec::with_capacity(batch_records as usize);
        for _ in 0..batch_records {
            let key = match keys {
                Keys::None => None,
                Keys::Random => Some(Bytes::from(rng.letters(16))),
                Keys::Cardinality(n) => Some(Bytes::from(
                    format!("key-{}", rng.next_u64() % n).into_bytes(),
                )),
            };
            recs.push((key, Bytes::from(rng.letters(record_size))));
        }
        pool.push(encode_batch(recs.into_iter(), compression, ts)?);
    }
    Ok(pool)
}

/// What every executor of one produce run shares.
struct Shared {
    topic: String,
    version: i16,
    acks: i16,
    pool: Vec<Bytes>,
    batch_records: u64,
    record_size: u64,
    in_flight: u64,
    /// Time between two requests of one connection in open-loop mode.
    conn_interval: Option<Duration>,
    conns_total: u64,
    t0: Instant,
    deadline: Option<Instant>,
    records_limit: Option<u64>,
    records_claimed: AtomicU64,
    progress: Arc<Progress>,
}

#[derive(Clone)]
struct ConnSpec {
    index: u64,
    addr: String,
    partitions: Vec<i32>,
}

pub fn run(common: &Common, args: &ProduceArgs) -> Result<Report> {
    let (versions, layout) = setup(common, &args.topic, args.create_partitions)?;
    run_with(common, args, versions, layout)
}

/// ApiVersions + optional CreateTopics + Metadata, on a short-lived executor.
pub fn setup(
    common: &Common,
    topic: &str,
    create_partitions: Option<i32>,
) -> Result<(Versions, TopicLayout)> {
    setup_rf(common, topic, create_partitions, -1)
}

/// `setup` with a replication factor for a topic it creates (-1: the broker's default).
pub fn setup_rf(
    common: &Common,
    topic: &str,
    create_partitions: Option<i32>,
    replication_factor: i16,
) -> Result<(Versions, TopicLayout)> {
    let bootstrap = common.bootstrap.clone();
    let topic = topic.to_string();
    crate::on_executor(common.cpu_for(0), move || async move {
        let mut client = Client::connect(&bootstrap, None).await?;
        let layout =
            proto::prepare_topic_rf(&mut client, &topic, create_partitions, replication_factor)
                .await?;
        Ok((client.versions, layout))
    })
}

pub fn run_with(
    common: &Common,
    args: &ProduceArgs,
    versions: Versions,
    layout: TopicLayout,
) -> Result<Report> {
    let version = versions.pick(ApiKey::Produce)?;
    let mut used: Vec<i32> = layout.partitions.iter().map(|(p, _)| *p).collect();
    if let PartitionsUsed::First(n) = args.partitions_used {
        if n > used.len() {
            bail!(
                "--partitions-used {n} but {} has only {} partitions",
                layout.topic,
                used.len()
            );
        }
        used.truncate(n);
    }
    let mut conns = Vec::new();
    for (addr, partitions) in layout.by_leader(&used) {
        for _ in 0..args.connections {
            conns.push(ConnSpec {
                index: conns.len() as u64,
                addr: addr.clone(),
                partitions: partitions.clone(),
            });
        }
    }
    let conns_total = conns.len() as u64;
    let conn_interval = if args.rate > 0 {
        let conn_rate = args.rate as f64 / conns_total as f64;
        Some(Duration::from_secs_f64(
            args.batch_records as f64 / conn_rate,
        ))
    } else {
        None
    };
    let pool = build_pool(
        args.record_size,
        args.batch_records,
        args.compression.codec(),
        args.keys,
        16,
        42,
    )?;
    let duration = match (args.duration, args.records) {
        (Some(d), _) => Some(Duration::from_secs_f64(d.max(0.0))),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(10)),
    };
    let progress = Progress::new();
    let t0 = Instant::now();
    let shared = Arc::new(Shared {
        topic: layout.topic.clone(),
        version,
        acks: args.acks,
        pool,
        batch_records: args.batch_records,
        record_size: args.record_size as u64,
        in_flight: args.in_flight,
        conn_interval,
        conns_total,
        t0,
        deadline: duration.map(|d| t0 + d),
        records_limit: args.records,
        records_claimed: AtomicU64::new(0),
        progress: progress.clone(),
    });
    let threads = common.threads as usize;
    let results = crate::run_parallel(common, "produce", &progress, |i| {
        let mine: Vec<ConnSpec> = conns
            .iter()
            .filter(|c| c.index as usize % threads == i)
            .cloned()
            .collect();
        let shared = shared.clone();
        Box::new(move || thread_main(mine, shared))
    })?;
    let mut report = Report::new("produce");
    for r in results {
        report.merge(r);
    }
    if report.latency.is_none() && args.acks != 0 {
        report.latency = Some(new_hist());
    }
    report
        .extra
        .push(("produce_version".into(), version.into()));
    report
        .extra
        .push(("connections".into(), conns_total.into()));
    report.extra.push(("partitions".into(), used.len().into()));
    report.extra.push(("acks".into(), args.acks.into()));
    if args.rate > 0 {
        report.extra.push(("target_rate".into(), args.rate.into()));
    }
    Ok(report)
}

async fn thread_main(conns: Vec<ConnSpec>, shared: Arc<Shared>) -> Result<Report> {
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|c| glommio::spawn_local(conn_main(c, shared.clone())))
        .collect();
    let mut report = Report::new("produce");
    let mut connect_errors = Vec::new();
    let n = tasks.len();
    for t in tasks {
        match t.await {
            Ok(r) => report.merge(r),
            Err(e) => connect_errors.push(e),
        }
    }
    if n > 0 && connect_errors.len() == n {
        return Err(connect_errors.remove(0));
    }
    for e in connect_errors {
        *report.errors.entry(format!("connect: {e}")).or_insert(0) += 1;
    }
    Ok(report)
}

struct InFlight {
    correlation_id: i32,
    /// Intended send time in open loop, actual send time in closed loop.
    start: Instant,
    records: u64,
}

async fn conn_main(spec: ConnSpec, sh: Arc<Shared>) -> Result<Report> {
    let stream = proto::connect(&spec.addr, Some(proto::REQUEST_TIMEOUT)).await?;
    let (mut reader, mut writer) = proto::split(stream);
    let report = Rc::new(RefCell::new(Report::new("produce")));
    report.borrow_mut().latency = Some(new_hist());
    let sem = Rc::new(Semaphore::new(sh.in_flight));
    let (tx, rx) = local_channel::new_unbounded::<InFlight>();

    let reader_task = if sh.acks != 0 {
        let (report, sem, sh) = (report.clone(), sem.clone(), sh.clone());
        Some(glommio::spawn_local(async move {
            let mut tap = LatencyTap::new();
            while let Some(inf) = rx.recv().await {
                let Some(frame) = reader.next_or_stop(&report, &sem).await else {
                    break;
                };
                let now = Instant::now();
                let mut r = report.borrow_mut();
                match proto::decode_response::<ProduceRequest>(
                    frame,
                    inf.correlation_id,
                    sh.version,
                ) {
                    Ok(resp) => {
                        let mut ok = true;
                        for t in &resp.responses {
                            for p in &t.partition_responses {
                                if p.error_code != proto::ERROR_NONE {
                                    ok = false;
                                    *r.errors.entry(error_name(p.error_code)).or_insert(0) += 1;
                                }
                            }
                        }
                        if ok {
                            r.records += inf.records;
                            r.bytes += inf.records * sh.record_size;
                            sh.progress.add(inf.records, inf.records * sh.record_size);
                        }
                        tap.record(&mut r, &sh.progress, sh.t0, inf.start, now);
                    }
                    Err(e) => {
                        *r.errors.entry(format!("decode: {e}")).or_insert(0) += 1;
                        drop(r);
                        sem.close();
                        break;
                    }
                }
                drop(r);
                sem.signal(1);
            }
        }))
    } else {
        drop(rx);
        None
    };

    let mut buf = BytesMut::with_capacity(sh.pool.iter().map(|b| b.len()).max().unwrap_or(0) + 512);
    let phase = sh
        .conn_interval
        .map(|iv| iv.mul_f64(spec.index as f64 / sh.conns_total as f64));
    let mut k: u64 = 0;
    loop {
        let now = Instant::now();
        let intended = match (sh.conn_interval, phase) {
            (Some(iv), Some(ph)) => Some(sh.t0 + ph + iv.mul_f64(k as f64)),
            _ => None,
        };
        if let Some(deadline) = sh.deadline {
            if intended.unwrap_or(now).max(now) >= deadline {
                break;
            }
        }
        if let Some(at) = intended {
            if at > now {
                glommio::timer::sleep(at - now).await;
            }
        }
        if sh.acks != 0 && sem.acquire(1).await.is_err() {
            break;
        }
        if let Some(limit) = sh.records_limit {
            if sh
                .records_claimed
                .fetch_add(sh.batch_records, Ordering::Relaxed)
                >= limit
            {
                break;
            }
        }
        let partition = spec.partitions[((k + spec.index) % spec.partitions.len() as u64) as usize];
        let batch = sh.pool[((k + spec.index * 7) % sh.pool.len() as u64) as usize].clone();
        let req = ProduceRequest::default()
            .with_acks(sh.acks)
            .with_timeout_ms(30_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(proto::topic_name(&sh.topic))
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(partition)
                    .with_records(Some(batch))])]);
        let correlation_id = (k & 0x7fff_ffff) as i32;
        proto::encode_request(&mut buf, correlation_id, sh.version, &req)?;
        let sent = Instant::now();
        if sh.acks != 0 {
            let inf = InFlight {
                correlation_id,
                start: intended.unwrap_or(sent),
                records: sh.batch_records,
            };
            if tx.send(inf).await.is_err() {
                break;
            }
        }
        if let Err(e) = writer.write(&buf).await {
            *report
                .borrow_mut()
                .errors
                .entry(format!("io: {e}"))
                .or_insert(0) += 1;
            break;
        }
        if sh.acks == 0 {
            let mut r = report.borrow_mut();
            r.records += sh.batch_records;
            r.bytes += sh.batch_records * sh.record_size;
            r.elapsed = Instant::now() - sh.t0;
            sh.progress
                .add(sh.batch_records, sh.batch_records * sh.record_size);
        }
        k += 1;
    }
    drop(tx);
    if let Some(t) = reader_task {
        t.await;
    }
    let r = report.borrow().clone();
    Ok(r)
}
