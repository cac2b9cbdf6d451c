//! `e2e`: one task produces at a fixed rate (acks=1) records whose value starts with their
//! intended send time; another fetches (max_wait 100 ms, min_bytes 1) and records
//! now − send time per record. Stamping the intended, not the actual, send time keeps the
//! figure honest when the broker stalls the sender (coordinated omission).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use bytes::{Bytes, BytesMut};
use clap::Args;
use glommio::channels::local_channel;
use glommio::sync::Semaphore;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{ApiKey, ProduceRequest};
use kafka_protocol::records::{Compression, RecordBatchDecoder};

use crate::consume::{fetch_once, FetchParams, Position};
use crate::hist::{new_hist, record_us, Progress, Report};
use crate::produce::{encode_batch, now_ms, Rng};
use crate::proto::{self, error_name, Client, TopicLayout, Versions};
use crate::Common;

#[derive(Args, Clone, Debug)]
pub struct E2eArgs {
    #[arg(long)]
    pub topic: String,
    /// Create the topic with this many partitions first (an existing topic is fine).
    #[arg(long)]
    pub create_partitions: Option<i32>,
    /// Records per second.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub rate: u64,
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Bytes of value per record (at least 8: the timestamp).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(8..))]
    pub record_size: u64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos_since_epoch(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_nanos() as u64
}

pub fn run(common: &Common, args: &E2eArgs) -> Result<Report> {
    let (versions, layout) = crate::produce::setup(common, &args.topic, args.create_partitions)?;
    run_with(common, args, versions, layout)
}

pub fn run_with(
    common: &Common,
    args: &E2eArgs,
    versions: Versions,
    layout: TopicLayout,
) -> Result<Report> {
    let _ = epoch();
    let args = args.clone();
    let progress = Progress::new();
    let p = progress.clone();
    let mut common1 = common.clone();
    common1.threads = 1;
    let mut results = crate::run_parallel(&common1, "e2e", &progress, move |_| {
        let (args, versions, layout, p) =
            (args.clone(), versions.clone(), layout.clone(), p.clone());
        Box::new(move || e2e_main(args, versions, layout, p))
    })?;
    results
        .pop()
        .ok_or_else(|| anyhow!("e2e produced no result"))
}

struct Produced {
    sent: u64,
    acked: u64,
    errors: BTreeMap<String, u64>,
    done: bool,
}

impl proto::CountsErrors for Produced {
    fn errors(&mut self) -> &mut BTreeMap<String, u64> {
        &mut self.errors
    }
}

async fn e2e_main(
    args: E2eArgs,
    versions: Versions,
    layout: TopicLayout,
    progress: std::sync::Arc<Progress>,
) -> Result<Report> {
    let produce_version = versions.pick(ApiKey::Produce)?;
    let fetch_version = versions.pick(ApiKey::Fetch)?;
    let partitions: Vec<i32> = layout.partitions.iter().map(|(p, _)| *p).collect();
    let groups = layout.by_leader(&partitions);

    // Positions start at the end of the log, read before the first record is sent.
    let mut consumers = Vec::new();
    let mut positions: BTreeMap<i32, Position> = BTreeMap::new();
    for (addr, parts) in &groups {
        let mut c = Client::connect(addr, Some(versions.clone())).await?;
        let end = proto::list_offsets(&mut c, &layout.topic, parts, -1).await?;
        for p in parts {
            positions.insert(
                *p,
                Position {
                    offset: end[p],
                    high_watermark: end[p],
                },
            );
        }
        consumers.push((c, parts.clone()));
    }

    let produced = Rc::new(RefCell::new(Produced {
        sent: 0,
        acked: 0,
        errors: BTreeMap::new(),
        done: false,
    }));
    let producer = glommio::spawn_local(producer_task(
        args.clone(),
        produce_version,
        layout.clone(),
        produced.clone(),
    ));

    let params = FetchParams {
        topic: layout.topic.clone(),
        version: fetch_version,
        max_wait_ms: 100,
        min_bytes: 1,
        max_bytes: 50 << 20,
        partition_max_bytes: 1 << 20,
    };
    let mut report = Report::new("e2e");
    let mut hist = new_hist();
    let mut interval = new_hist();
    let mut last_merge = Instant::now();
    let t0 = Instant::now();
    let mut producer_done_at: Option<Instant> = None;
    let mut decode_errors = 0u64;
    loop {
        {
            let pr = produced.borrow();
            if pr.done {
                let at = *producer_done_at.get_or_insert_with(Instant::now);
                // Stop once everything acknowledged was seen, or after a grace period.
                if report.records >= pr.acked || at.elapsed() > Duration::from_secs(5) {
                    break;
                }
            }
        }
        for (client, parts) in consumers.iter_mut() {
            let mut batches: Vec<(i64, Bytes)> = Vec::new();
            fetch_once(
                client,
                &params,
                parts,
                &mut positions,
                &mut report.errors,
                |_, fo, _, b| {
                    batches.push((fo, Bytes::copy_from_slice(b)));
                },
            )
            .await?;
            let now = nanos_since_epoch(Instant::now());
            for (fetch_offset, mut b) in batches {
                match RecordBatchDecoder::decode(&mut b) {
                    Ok(set) => {
                        for r in set
                            .records
                            .iter()
                            .filter(|r| r.offset >= fetch_offset && !r.control)
                        {
                            let Some(v) = r.value.as_ref().filter(|v| v.len() >= 8) else {
                                decode_errors += 1;
                                continue;
                            };
                            let sent = u64::from_be_bytes(v[0..8].try_into()?);
                            let lat = Duration::from_nanos(now.saturating_sub(sent));
                            record_us(&mut hist, lat);
                            record_us(&mut interval, lat);
                            report.records += 1;
                            report.bytes += v.len() as u64;
                            progress.add(1, v.len() as u64);
                        }
                    }
                    Err(_) => decode_errors += 1,
                }
            }
        }
        if last_merge.elapsed() > Duration::from_millis(200) {
            progress.merge_interval(&mut interval);
            last_merge = Instant::now();
        }
    }
    report.elapsed = t0.elapsed();
    producer.await?;
    let pr = produced.borrow();
    report.latency = Some(hist);
    for (k, v) in &pr.errors {
        *report.errors.entry(format!("produce {k}")).or_insert(0) += v;
    }
    if decode_errors > 0 {
        report
            .errors
            .insert("undecodable record".into(), decode_errors);
    }
    report.extra.push(("target_rate".into(), args.rate.into()));
    report.extra.push(("produced".into(), pr.sent.into()));
    report.extra.push(("acked".into(), pr.acked.into()));
    progress.threads_done.load(Ordering::Relaxed);
    Ok(report)
}

async fn producer_task(
    args: E2eArgs,
    version: i16,
    layout: TopicLayout,
    produced: Rc<RefCell<Produced>>,
) -> Result<()> {
    let result = producer_loop(&args, version, &layout, &produced).await;
    let mut pr = produced.borrow_mut();
    pr.done = true;
    if let Err(e) = &result {
        *pr.errors.entry(format!("{e:#}")).or_insert(0) += 1;
    }
    Ok(())
}

async fn producer_loop(
    args: &E2eArgs,
    version: i16,
    layout: &TopicLayout,
    produced: &Rc<RefCell<Produced>>,
) -> Result<()> {
    // One connection to the first partition's leader; every partition written round robin
    // (a multi-broker cluster would need one connection per leader; e2e keeps it to one).
    let addr = layout
        .partitions
        .first()
        .map(|(_, a)| a.clone())
        .ok_or_else(|| anyhow!("no partition"))?;
    let stream = proto::connect(&addr, Some(proto::REQUEST_TIMEOUT)).await?;
    let (mut reader, mut writer) = proto::split(stream);
    let parts: Vec<i32> = layout
        .partitions
        .iter()
        .filter(|(_, a)| *a == addr)
        .map(|(p, _)| *p)
        .collect();
    // About one request per millisecond, whatever the rate.
    let batch_records = (args.rate / 1000).max(1);
    let interval = Duration::from_secs_f64(batch_records as f64 / args.rate as f64);
    let filler = Bytes::from(Rng::new(7).letters(args.record_size as usize - 8));
    let sem = Rc::new(Semaphore::new(5));
    let (tx, rx) = local_channel::new_unbounded::<(i32, u64)>();
    let reader_task = {
        let (sem, produced) = (sem.clone(), produced.clone());
        glommio::spawn_local(async move {
            while let Some((corr, n)) = rx.recv().await {
                let Some(frame) = reader.next_or_stop(&produced, &sem).await else {
                    break;
                };
                let mut pr = produced.borrow_mut();
                match proto::decode_response::<ProduceRequest>(frame, corr, version) {
                    Ok(resp) => {
                        let mut ok = true;
                        for t in &resp.responses {
                            for p in &t.partition_responses {
                                if p.error_code != proto::ERROR_NONE {
                                    ok = false;
                                    *pr.errors.entry(error_name(p.error_code)).or_insert(0) += 1;
                                }
                            }
                        }
                        if ok {
                            pr.acked += n;
                        }
                    }
                    Err(e) => {
                        *pr.errors.entry(format!("decode: {e}")).or_insert(0) += 1;
                    }
                }
                drop(pr);
                sem.signal(1);
            }
        })
    };
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(args.duration);
    let mut buf = BytesMut::new();
    let mut k = 0u64;
    loop {
        let intended = t0 + interval.mul_f64(k as f64);
        if intended >= deadline {
            break;
        }
        let now = Instant::now();
        if intended > now {
            glommio::timer::sleep(intended - now).await;
        }
        if sem.acquire(1).await.is_err() {
            break;
        }
        let stamp = nanos_since_epoch(intended).to_be_bytes();
        let records = (0..batch_records).map(|_| {
            let mut v = BytesMut::with_capacity(args.record_size as usize);
            v.extend_from_slice(&stamp);
            v.extend_from_slice(&filler);
            (None, v.freeze())
        });
        let batch = encode_batch(records, Compression::None, now_ms())?;
        let partition = parts[(k % parts.len() as u64) as usize];
        let req = ProduceRequest::default()
            .with_acks(1)
            .with_timeout_ms(30_000)
            .with_topic_data(vec![TopicProduceData::default()
                .with_name(proto::topic_name(&layout.topic))
                .with_partition_data(vec![PartitionProduceData::default()
                    .with_index(partition)
                    .with_records(Some(batch))])]);
        let corr = (k & 0x7fff_ffff) as i32;
        proto::encode_request(&mut buf, corr, version, &req)?;
        if tx.send((corr, batch_records)).await.is_err() {
            break;
        }
        writer.write(&buf).await?;
        produced.borrow_mut().sent += batch_records;
        k += 1;
    }
    drop(tx);
    reader_task.await;
    Ok(())
}
