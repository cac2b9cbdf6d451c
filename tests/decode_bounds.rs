//! Request decoding cannot be made to allocate more than the frame can hold: frames whose array
//! counts claim billions of elements are refused without the allocation (and valid frames still
//! decode exactly). The largest single allocation during each decode is measured by a counting
//! allocator in this test binary.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::{BufMut, Bytes, BytesMut};
use fjord::server::{decode_request, Decoded};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, FetchRequest, MetadataRequest, ProduceRequest, RequestHeader, RequestKind, TopicName,
};
use kafka_protocol::protocol::{Encodable, StrBytes};

struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(layout.size())));
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(new_size)));
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Decodes `frame` and returns (decoded?, the largest single allocation in bytes).
fn decode_measured(frame: &Bytes) -> (Option<Decoded>, usize) {
    LARGEST.with(|l| l.set(0));
    let r = decode_request(frame).ok();
    (r, LARGEST.with(|l| l.get()))
}

fn header(api: ApiKey, version: i16) -> BytesMut {
    let mut h = RequestHeader::default();
    h.request_api_key = api as i16;
    h.request_api_version = version;
    h.correlation_id = 1;
    h.client_id = Some(StrBytes::from_static_str("c"));
    let mut b = BytesMut::new();
    h.encode(&mut b, api.request_header_version(version))
        .unwrap();
    b
}

fn frame_of(api: ApiKey, version: i16, body: &impl Encodable) -> Bytes {
    let mut b = header(api, version);
    body.encode(&mut b, version).unwrap();
    b.freeze()
}

/// Frames that claim huge arrays: (what, frame).
fn hostile_frames() -> Vec<(&'static str, Bytes)> {
    let mut out = Vec::new();
    // Metadata v0: topics count i32::MAX, then a few bytes.
    let mut b = header(ApiKey::Metadata, 0);
    b.put_i32(i32::MAX);
    b.put_slice(&[0, 1, b'x']);
    out.push(("Metadata v0 topics", b.freeze()));
    // Metadata v9 (flexible): compact topics count u32::MAX - 1 elements.
    let mut b = header(ApiKey::Metadata, 9);
    b.put_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f, 2, b'x', 0]);
    out.push(("Metadata v9 topics", b.freeze()));
    // Produce v3: one topic whose partition count is i32::MAX.
    let mut b = header(ApiKey::Produce, 3);
    b.put_i16(-1); // transactional id
    b.put_i16(1); // acks
    b.put_i32(1000); // timeout
    b.put_i32(1); // one topic
    b.put_i16(1);
    b.put_u8(b't');
    b.put_i32(i32::MAX); // partitions
    b.put_i32(0);
    out.push(("Produce v3 partitions", b.freeze()));
    // Produce v9 (flexible): topics count huge.
    let mut b = header(ApiKey::Produce, 9);
    b.put_u8(0); // null transactional id
    b.put_i16(1);
    b.put_i32(1000);
    b.put_slice(&[0xfe, 0xff, 0xff, 0xff, 0x0f]);
    b.put_slice(&[0, 0, 0]);
    out.push(("Produce v9 topics", b.freeze()));
    // Fetch v4: topics count huge after the fixed fields.
    let mut b = header(ApiKey::Fetch, 4);
    b.put_i32(-1);
    b.put_i32(500);
    b.put_i32(1);
    b.put_i32(1 << 20);
    b.put_i8(0);
    b.put_i32(0x7fff_0000);
    b.put_slice(&[0, 0]);
    out.push(("Fetch v4 topics", b.freeze()));
    // Found by cargo fuzz: Produce v10 whose topics count is a varint of eight 0x80 bytes and
    // 0x70; read from its fifth byte on, a wrongly aligned check would see a small value.
    out.push((
        "Produce v10 padded varint",
        Bytes::from_static(&[
            0, 0, 0, 10, 1, 0, 0, 0, 0, 0, 0, 0, 11, 128, 0, 3, 128, 128, 128, 128, 128, 128, 128,
            128, 112, 0, 105, 0, 1, 99, 96, 0,
        ]),
    ));
    out
}

#[test]
fn huge_array_counts_are_refused_without_allocating() {
    for (what, frame) in hostile_frames() {
        let (r, largest) = decode_measured(&frame);
        eprintln!(
            "{what}: {} byte frame, largest allocation {largest} bytes",
            frame.len()
        );
        assert!(r.is_none(), "{what}: refused");
        assert!(
            largest < 64 * 1024,
            "{what}: a {} byte frame allocated {largest} bytes at once",
            frame.len()
        );
    }
}

#[test]
fn valid_frames_decode_exactly_and_mutations_stay_bounded() {
    let mut md = MetadataRequest::default();
    let mut t = kafka_protocol::messages::metadata_request::MetadataRequestTopic::default();
    t.name = Some(TopicName(StrBytes::from_static_str("topic")));
    md.topics = Some(vec![t]);
    let mut pd = PartitionProduceData::default();
    pd.index = 3;
    pd.records = Some(Bytes::from_static(&[7u8; 100]));
    let mut td = TopicProduceData::default();
    td.name = TopicName(StrBytes::from_static_str("topic"));
    td.partition_data.push(pd);
    let mut pr = ProduceRequest::default();
    pr.acks = -1;
    pr.timeout_ms = 30_000;
    pr.topic_data.push(td);
    let mut fp = FetchPartition::default();
    fp.partition = 2;
    fp.partition_max_bytes = 1 << 20;
    let mut ft = FetchTopic::default();
    ft.topic = TopicName(StrBytes::from_static_str("topic"));
    ft.topic_id = uuid::Uuid::from_u128(5);
    ft.partitions.push(fp);
    let mut fr = FetchRequest::default();
    fr.max_bytes = 52_428_800;
    fr.max_wait_ms = 500;
    fr.topics.push(ft);
    let mut frames = Vec::new();
    for v in [0i16, 4, 9, 12] {
        frames.push(frame_of(ApiKey::Metadata, v, &md));
    }
    for v in [3i16, 9, 11] {
        frames.push(frame_of(ApiKey::Produce, v, &pr));
    }
    for v in [4i16, 12, 13, 16] {
        frames.push(frame_of(ApiKey::Fetch, v, &fr));
    }
    for f in &frames {
        let Some(Decoded::Request { req, .. }) = decode_request(f).ok() else {
            panic!("a valid frame decodes");
        };
        match *req {
            RequestKind::Fetch(r) => {
                assert_eq!(
                    r.max_bytes, 52_428_800,
                    "values past the frame's end are exact"
                );
                assert_eq!(r.topics[0].partitions[0].partition_max_bytes, 1 << 20);
            }
            RequestKind::Produce(r) => {
                assert_eq!(r.timeout_ms, 30_000);
                assert_eq!(
                    r.topic_data[0].partition_data[0]
                        .records
                        .as_ref()
                        .unwrap()
                        .len(),
                    100
                );
            }
            RequestKind::Metadata(r) => assert_eq!(r.topics.unwrap().len(), 1),
            _ => panic!("unexpected kind"),
        }
    }
    // Every 4-byte window of every frame overwritten with huge values: refused or decoded,
    // never a large allocation.
    let mut worst = 0;
    for f in &frames {
        for at in 8..f.len().saturating_sub(4) {
            for fill in [
                [0x7f, 0xff, 0xff, 0xff],
                [0xff, 0xff, 0xff, 0x0f],
                [0x40, 0, 0, 0],
            ] {
                let mut m = f.to_vec();
                m[at..at + 4].copy_from_slice(&fill);
                let (_, largest) = decode_measured(&Bytes::from(m));
                worst = worst.max(largest);
            }
        }
    }
    eprintln!("mutated frames: largest allocation {worst} bytes");
    assert!(
        worst < 256 * 1024,
        "a mutated frame allocated {worst} bytes at once"
    );
}
