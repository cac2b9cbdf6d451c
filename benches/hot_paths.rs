//! Criterion benches of the hot paths: batch validation (CRC32C), DMA append with group commit,
//! request decode, fetch response assembly.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kafka_protocol::messages::fetch_response::{
    FetchResponse, FetchableTopicResponse, PartitionData,
};
use kafka_protocol::messages::produce_request::{
    PartitionProduceData, ProduceRequest, TopicProduceData,
};
use kafka_protocol::messages::TopicName;
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

fn batch(records: usize, value_bytes: usize) -> Bytes {
    let recs: Vec<Record> = (0..records)
        .map(|i| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: -1,
            timestamp: 1_700_000_000_000,
            key: Some(Bytes::from(format!("key-{i}"))),
            value: Some(Bytes::from(vec![b'x'; value_bytes])),
            headers: Default::default(),
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        recs.iter(),
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .expect("encode");
    buf.freeze()
}

fn validation(c: &mut Criterion) {
    let mut g = c.benchmark_group("validate_payload");
    for (n, size) in [(100usize, 1024usize), (1000, 100)] {
        let b = batch(n, size);
        g.throughput(Throughput::Bytes(b.len() as u64));
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{n}x{size}B")),
            &b,
            |bench, b| {
                let mut out = Vec::with_capacity(4);
                bench.iter(|| {
                    out.clear();
                    fjord::log::batch::validate_payload(black_box(b), 16 << 20, &mut out)
                        .expect("valid");
                })
            },
        );
    }
    g.finish();
}

fn decode_produce(c: &mut Criterion) {
    let b = batch(100, 1024);
    let mut pd = PartitionProduceData::default();
    pd.records = Some(b.clone());
    let mut td = TopicProduceData::default();
    td.name = TopicName(StrBytes::from_static_str("bench"));
    td.partition_data = vec![pd; 8];
    let mut req = ProduceRequest::default();
    req.acks = 1;
    req.topic_data.push(td);
    let mut buf = BytesMut::new();
    req.encode(&mut buf, 9).expect("encode");
    let frame = buf.freeze();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.bench_function("produce_v9_8x100KiB", |bench| {
        bench.iter(|| {
            let mut f = frame.clone();
            black_box(ProduceRequest::decode(&mut f, 9).expect("decode"))
        })
    });
    g.finish();
}

fn fetch_assembly(c: &mut Criterion) {
    let b = batch(100, 1024);
    let mut g = c.benchmark_group("fetch_response");
    g.throughput(Throughput::Bytes(b.len() as u64 * 16));
    g.bench_function("encode_16_partitions", |bench| {
        let mut out = BytesMut::with_capacity(4 << 20);
        bench.iter(|| {
            let mut resp = FetchResponse::default();
            let mut t = FetchableTopicResponse::default();
            t.topic = TopicName(StrBytes::from_static_str("bench"));
            for p in 0..16 {
                let mut pd = PartitionData::default();
                pd.partition_index = p;
                pd.high_watermark = 1000;
                pd.records = Some(b.clone());
                t.partitions.push(pd);
            }
            resp.responses.push(t);
            out.clear();
            resp.encode(&mut out, 12).expect("encode");
            black_box(out.len())
        })
    });
    // Fjord's own assembly: the encoded fields as chunks, the record bytes by reference, from
    // the batch cache (a 16-byte patched header and the producer's bytes per batch) or from
    // disk: the chunks the log's read path returns after a restart (nothing cached), slices of
    // the DMA read buffers.
    let window = Bytes::from(vec![7u8; 16 * b.len()]);
    let dir = tempfile::tempdir().expect("tempdir");
    let ex = dma_executor(dir.path());
    let disk: std::cell::RefCell<Vec<Vec<Bytes>>> = ex.run(async {
        let log_dir = dir.path().join("disk-0");
        let log = fjord::log::SharedLog::open(log_dir.clone())
            .await
            .expect("open log");
        let mut infos = Vec::new();
        fjord::log::batch::validate_payload(&b, 16 << 20, &mut infos).expect("valid");
        for _ in 0..16 {
            log.append(
                &b,
                &infos,
                &settings(),
                fjord::log::EpochStamp::Leader(0),
                None,
            )
            .await
            .expect("append");
        }
        log.sync_to(1600).await.expect("sync");
        log.flush().await.expect("flush");
        drop(log);
        let log = fjord::log::SharedLog::open(log_dir).await.expect("reopen");
        let mut out = Vec::new();
        for p in 0..16u64 {
            out.push(log.read_chunks(p * 100, b.len(), 1600).await.expect("read"));
        }
        std::cell::RefCell::new(out)
    });
    type RecordsOf<'a> = Box<dyn Fn(usize) -> Vec<Bytes> + 'a>;
    let shapes: [(&str, RecordsOf); 2] = [
        (
            "cached",
            Box::new(|p| {
                let at = p * b.len();
                vec![
                    window.slice(at..at + 16),
                    window.slice(at + 16..at + b.len()),
                ]
            }),
        ),
        ("disk", Box::new(|p| disk.borrow()[p].clone())),
    ];
    // Inside the executor: the disk chunks' buffers belong to it.
    ex.run(async {
    for (name, records_of) in &shapes {
        let build = || {
            let mut t = FetchableTopicResponse::default();
            t.topic = TopicName(StrBytes::from_static_str("bench"));
            let mut recs = Vec::new();
            for p in 0..16 {
                let mut pd = PartitionData::default();
                pd.partition_index = p as i32;
                pd.high_watermark = 1000;
                pd.records = Some(Bytes::new());
                t.partitions.push(pd);
                recs.push(records_of(p));
            }
            fjord::server::handlers::fetch::encode_response(12, 0, 0, vec![(t, recs)], &[])
        };
        // Bytes copied per fetched byte: what is not a slice of the stored bytes.
        let chunks = build();
        let (a, z) = (
            window.as_ptr() as usize,
            window.as_ptr() as usize + window.len(),
        );
        let stored = |c: &Bytes| {
            (c.as_ptr() as usize >= a && c.as_ptr() as usize + c.len() <= z)
                || fjord::log::dma_bytes::is_read_buffer(c)
        };
        let copied: usize = chunks
            .iter()
            .filter(|c| !stored(c))
            .map(|c| c.len())
            .sum();
        let records = 16 * b.len();
        eprintln!(
            "fetch_response/fjord_{name}: {copied} bytes encoded or copied for {records} record bytes (record bytes copied: {})",
            chunks.iter().map(|c| c.len()).sum::<usize>() - copied - records
        );
        g.bench_function(format!("fjord_{name}_16_partitions"), |bench| {
            bench.iter(|| black_box(build().len()))
        });
    }
    disk.borrow_mut().clear();
    });
    g.finish();
}

fn settings() -> fjord::log::LogSettings {
    fjord::log::LogSettings {
        segment_bytes: 1 << 30,
        segment_ms: u64::MAX / 2,
        retention_ms: -1,
        retention_bytes: -1,
        cache_bytes_max: 8 << 20,
        visibility_sync_delay_us: 0,
    }
}

/// A glommio executor whose first DMA read (glommio's device probe) is of a non-empty file.
fn dma_executor(dir: &std::path::Path) -> glommio::LocalExecutor {
    let probe = dir.join(".dma-probe");
    std::fs::write(&probe, vec![1u8; 4096]).expect("probe");
    let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .make()
        .expect("executor");
    ex.run(async {
        let f = glommio::io::DmaFile::open(&probe)
            .await
            .expect("probe open");
        let _ = f.read_at(0, 4096).await;
        let _ = f.close().await;
    });
    ex
}

/// DMA append through the real log (glommio executor, O_DIRECT file, tail-block rewrite).
fn append(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let payload = batch(100, 1024);
    let mut infos = Vec::new();
    fjord::log::batch::validate_payload(&payload, 16 << 20, &mut infos).expect("valid");
    let settings = settings();
    let ex = dma_executor(dir.path());
    let log_dir = dir.path().join("bench-0");
    let log = ex
        .run(fjord::log::SharedLog::open(log_dir))
        .expect("open log");
    let mut g = c.benchmark_group("append");
    g.throughput(Throughput::Bytes(payload.len() as u64));
    g.sample_size(30);
    g.bench_function("dma_100x1KiB_acks1", |bench| {
        bench.iter(|| {
            ex.run(async {
                log.append(
                    &payload,
                    &infos,
                    &settings,
                    fjord::log::EpochStamp::Leader(0),
                    None,
                )
                .await
                .expect("append")
            })
        })
    });
    g.bench_function("dma_100x1KiB_acks_all", |bench| {
        bench.iter(|| {
            ex.run(async {
                let o = log
                    .append(
                        &payload,
                        &infos,
                        &settings,
                        fjord::log::EpochStamp::Leader(0),
                        None,
                    )
                    .await
                    .expect("append");
                log.sync_to(o + 100).await.expect("sync");
            })
        })
    });
    g.finish();
}

criterion_group!(benches, validation, decode_produce, fetch_assembly, append);
criterion_main!(benches);
