//! Kafka wire plumbing shared by every command: framing (4-byte size + header), correlation
//! ids, version negotiation, and the few admin calls (ApiVersions, Metadata, CreateTopics,
//! ListOffsets) the load commands need before they start.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_lite::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use glommio::net::TcpStream;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, CreateTopicsRequest, ListOffsetsRequest,
    MetadataRequest, RequestHeader, ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};

pub const CLIENT_ID: &str = "fjord-bench";

/// A response frame larger than this is a protocol error, not a big fetch: it bounds memory.
pub const FRAME_BYTES_MAX: usize = 256 << 20;

/// How long one request may stay unanswered before the connection is declared dead.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub const ERROR_NONE: i16 = 0;
pub const ERROR_UNSUPPORTED_VERSION: i16 = 35;
pub const ERROR_TOPIC_ALREADY_EXISTS: i16 = 36;

/// Version range of each API this tool knows the semantics of. Past these maxima a request
/// changes meaning (Produce v13 / Fetch v13 address topics by id, FindCoordinator v4 batches
/// keys, which we handle), so negotiation never goes higher.
pub fn implemented(key: ApiKey) -> Option<(i16, i16)> {
    Some(match key {
        ApiKey::Produce => (3, 12),
        ApiKey::Fetch => (4, 12),
        ApiKey::ListOffsets => (1, 7),
        ApiKey::Metadata => (1, 12),
        ApiKey::ApiVersions => (0, 3),
        ApiKey::CreateTopics => (2, 7),
        ApiKey::FindCoordinator => (0, 6),
        ApiKey::JoinGroup => (0, 9),
        ApiKey::SyncGroup => (0, 5),
        ApiKey::Heartbeat => (0, 4),
        ApiKey::LeaveGroup => (0, 5),
        // Kafka 4 accepts only v2+ (KIP-896); v10 would address topics by id.
        ApiKey::OffsetCommit => (2, 9),
        _ => return None,
    })
}

/// Versions the broker advertised, intersected with ours on demand.
#[derive(Clone, Debug, Default)]
pub struct Versions {
    pub broker: HashMap<i16, (i16, i16)>,
}

impl Versions {
    pub fn pick(&self, key: ApiKey) -> Result<i16> {
        let (our_min, our_max) =
            implemented(key).ok_or_else(|| anyhow!("{key:?} is not implemented by fjord-bench"))?;
        let (b_min, b_max) = self
            .broker
            .get(&(key as i16))
            .copied()
            .ok_or_else(|| anyhow!("broker does not support {key:?}"))?;
        let lo = our_min.max(b_min);
        let hi = our_max.min(b_max);
        if lo > hi {
            bail!("broker supports {key:?} v{b_min}..v{b_max}, fjord-bench speaks v{our_min}..v{our_max}");
        }
        Ok(hi)
    }
}

/// Kafka error name for a code, for reports.
pub fn error_name(code: i16) -> String {
    match kafka_protocol::ResponseError::try_from_code(code) {
        Some(e) => format!("{e:?}({code})"),
        None => format!("ERROR_{code}"),
    }
}

pub fn api_key_of(code: i16) -> Option<ApiKey> {
    ApiKey::try_from(code).ok()
}

/// Encodes a whole request frame (size prefix included) into `buf`, replacing its content.
pub fn encode_request<R: Request>(
    buf: &mut BytesMut,
    correlation_id: i32,
    version: i16,
    req: &R,
) -> Result<()> {
    buf.clear();
    buf.put_i32(0);
    let header = RequestHeader::default()
        .with_request_api_key(R::KEY)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str(CLIENT_ID)));
    header.encode(buf, R::header_version(version))?;
    req.encode(buf, version)?;
    let body_len = (buf.len() - 4) as i32;
    buf[0..4].copy_from_slice(&body_len.to_be_bytes());
    Ok(())
}

/// Decodes a response frame (size prefix already stripped) and checks its correlation id.
pub fn decode_response<R: Request>(
    mut frame: Bytes,
    correlation_id: i32,
    version: i16,
) -> Result<R::Response> {
    let header = ResponseHeader::decode(&mut frame, R::Response::header_version(version))?;
    if header.correlation_id != correlation_id {
        bail!(
            "response correlation id {} does not match request {}",
            header.correlation_id,
            correlation_id
        );
    }
    <R::Response as Decodable>::decode(&mut frame, version)
        .with_context(|| format!("decoding {:?} v{version} response", api_key_of(R::KEY)))
}

/// Something that tallies errors by name (a run's report).
pub trait CountsErrors {
    fn errors(&mut self) -> &mut std::collections::BTreeMap<String, u64>;
}

pub struct FrameReader {
    half: ReadHalf<TcpStream>,
    acc: BytesMut,
    chunk: Vec<u8>,
}

impl FrameReader {
    pub fn new(half: ReadHalf<TcpStream>) -> Self {
        FrameReader {
            half,
            acc: BytesMut::with_capacity(1 << 20),
            chunk: vec![0; 1 << 20],
        }
    }

    /// Next frame without its size prefix; `Ok(None)` on a clean EOF between frames.
    pub async fn next(&mut self) -> Result<Option<Bytes>> {
        loop {
            if self.acc.len() >= 4 {
                let size = i32::from_be_bytes([self.acc[0], self.acc[1], self.acc[2], self.acc[3]]);
                if size < 0 || size as usize > FRAME_BYTES_MAX {
                    bail!("bad frame size {size}");
                }
                let size = size as usize;
                if self.acc.len() >= 4 + size {
                    self.acc.advance(4);
                    return Ok(Some(self.acc.split_to(size).freeze()));
                }
                self.acc.reserve(4 + size - self.acc.len());
            }
            let n = self.half.read(&mut self.chunk).await?;
            if n == 0 {
                if self.acc.is_empty() {
                    return Ok(None);
                }
                bail!("connection closed in the middle of a frame");
            }
            self.acc.extend_from_slice(&self.chunk[..n]);
        }
    }

    /// The next frame of a pipelined reader task. On an I/O error it counts the error as
    /// "io: …" in `sink`, closes `senders` (so the sending side stops) and returns None.
    pub async fn next_or_stop<R: CountsErrors>(
        &mut self,
        sink: &std::cell::RefCell<R>,
        senders: &glommio::sync::Semaphore,
    ) -> Option<Bytes> {
        match self.expect().await {
            Ok(f) => Some(f),
            Err(e) => {
                *sink
                    .borrow_mut()
                    .errors()
                    .entry(format!("io: {e}"))
                    .or_insert(0) += 1;
                senders.close();
                None
            }
        }
    }

    pub async fn expect(&mut self) -> Result<Bytes> {
        self.next()
            .await?
            .ok_or_else(|| anyhow!("connection closed by peer"))
    }
}

pub struct FrameWriter {
    half: WriteHalf<TcpStream>,
}

impl FrameWriter {
    pub async fn write(&mut self, frame: &[u8]) -> Result<()> {
        self.half.write_all(frame).await?;
        Ok(())
    }
}

pub fn split(stream: TcpStream) -> (FrameReader, FrameWriter) {
    let (r, w) = futures_lite::io::split(stream);
    (FrameReader::new(r), FrameWriter { half: w })
}

pub async fn connect(addr: &str, read_timeout: Option<Duration>) -> Result<TcpStream> {
    let sock_addr = std::net::ToSocketAddrs::to_socket_addrs(addr)
        .with_context(|| format!("cannot resolve {addr}"))?
        .next()
        .ok_or_else(|| anyhow!("cannot resolve {addr}"))?;
    let stream = TcpStream::connect_timeout(sock_addr, Duration::from_secs(5))
        .await
        .map_err(|e| anyhow!("cannot connect to {addr}: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| anyhow!("set_nodelay: {e}"))?;
    stream
        .set_read_timeout(read_timeout)
        .map_err(|e| anyhow!("set_read_timeout: {e}"))?;
    Ok(stream)
}

/// A request/response connection (one request at a time) used for admin calls and fetch loops.
pub struct Client {
    pub reader: FrameReader,
    pub writer: FrameWriter,
    pub versions: Versions,
    pub addr: String,
    next_correlation_id: i32,
    buf: BytesMut,
}

impl Client {
    /// Connects and negotiates versions with ApiVersions (or reuses already known ones).
    pub async fn connect(addr: &str, versions: Option<Versions>) -> Result<Client> {
        let stream = connect(addr, Some(REQUEST_TIMEOUT)).await?;
        let (reader, writer) = split(stream);
        let mut client = Client {
            reader,
            writer,
            versions: versions.clone().unwrap_or_default(),
            addr: addr.to_string(),
            next_correlation_id: 1,
            buf: BytesMut::with_capacity(4096),
        };
        if versions.is_none() {
            client.versions = client
                .negotiate()
                .await
                .with_context(|| format!("ApiVersions with {addr}"))?;
        }
        Ok(client)
    }

    async fn negotiate(&mut self) -> Result<Versions> {
        let req = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str(CLIENT_ID))
            .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
        let mut resp: ApiVersionsResponse = self.call_v(&req, 3).await?;
        if resp.error_code == ERROR_UNSUPPORTED_VERSION {
            resp = self.call_v(&req, 0).await?;
        }
        if resp.error_code != ERROR_NONE {
            bail!("ApiVersions failed: {}", error_name(resp.error_code));
        }
        let broker = resp
            .api_keys
            .iter()
            .map(|k| (k.api_key, (k.min_version, k.max_version)))
            .collect();
        Ok(Versions { broker })
    }

    pub fn next_correlation_id(&mut self) -> i32 {
        let id = self.next_correlation_id;
        self.next_correlation_id = self.next_correlation_id.wrapping_add(1);
        id
    }

    pub async fn call<R: Request>(&mut self, req: &R) -> Result<R::Response> {
        let key = api_key_of(R::KEY).ok_or_else(|| anyhow!("unknown api key"))?;
        let version = self.versions.pick(key)?;
        self.call_v(req, version).await
    }

    pub async fn call_v<R: Request>(&mut self, req: &R, version: i16) -> Result<R::Response> {
        let id = self.next_correlation_id();
        encode_request(&mut self.buf, id, version, req)?;
        self.writer.write(&self.buf).await?;
        let frame = self.reader.expect().await?;
        if R::KEY == ApiKey::ApiVersions as i16 {
            // An ApiVersions reply to a version the broker does not know comes in v0 layout.
            let mut peek = frame.clone();
            let _correlation = peek.get_i32();
            if peek.remaining() >= 2 && peek.get_i16() == ERROR_UNSUPPORTED_VERSION {
                return decode_response::<R>(frame, id, 0);
            }
        }
        decode_response::<R>(frame, id, version)
    }
}

/// Where each partition of a topic lives.
#[derive(Clone, Debug)]
pub struct TopicLayout {
    pub topic: String,
    /// (partition, leader address) sorted by partition.
    pub partitions: Vec<(i32, String)>,
}

impl TopicLayout {
    /// Partitions grouped by leader address, in a stable order.
    pub fn by_leader(&self, used: &[i32]) -> Vec<(String, Vec<i32>)> {
        let mut groups: Vec<(String, Vec<i32>)> = Vec::new();
        for (p, addr) in &self.partitions {
            if !used.contains(p) {
                continue;
            }
            match groups.iter_mut().find(|(a, _)| a == addr) {
                Some((_, ps)) => ps.push(*p),
                None => groups.push((addr.clone(), vec![*p])),
            }
        }
        groups
    }
}

pub fn topic_name(t: &str) -> TopicName {
    TopicName(StrBytes::from_string(t.to_string()))
}

/// Creates the topic (ignoring "already exists") when asked, then reads its layout.
pub async fn prepare_topic(
    client: &mut Client,
    topic: &str,
    create_partitions: Option<i32>,
) -> Result<TopicLayout> {
    prepare_topic_rf(client, topic, create_partitions, -1).await
}

/// `prepare_topic` with a replication factor (-1: the broker's default).
pub async fn prepare_topic_rf(
    client: &mut Client,
    topic: &str,
    create_partitions: Option<i32>,
    replication_factor: i16,
) -> Result<TopicLayout> {
    if let Some(n) = create_partitions {
        let req = CreateTopicsRequest::default()
            .with_topics(vec![CreatableTopic::default()
                .with_name(topic_name(topic))
                .with_num_partitions(n)
                .with_replication_factor(replication_factor)])
            .with_timeout_ms(30_000);
        let version = client.versions.pick(ApiKey::CreateTopics)?;
        // Replication factor -1 (broker default) needs v4+.
        let req = if version < 4 {
            req.with_topics(vec![CreatableTopic::default()
                .with_name(topic_name(topic))
                .with_num_partitions(n)
                .with_replication_factor(replication_factor.max(1))])
        } else {
            req
        };
        let resp = client.call_v(&req, version).await?;
        for t in &resp.topics {
            if t.error_code != ERROR_NONE && t.error_code != ERROR_TOPIC_ALREADY_EXISTS {
                let msg = t
                    .error_message
                    .as_ref()
                    .map(|m| m.to_string())
                    .unwrap_or_default();
                bail!("CreateTopics {topic}: {} {msg}", error_name(t.error_code));
            }
        }
    }
    // A freshly created topic may take a moment to get leaders.
    let mut last_err = anyhow!("no metadata");
    for _ in 0..50 {
        match metadata(client, topic).await {
            Ok(layout) => return Ok(layout),
            Err(e) => last_err = e,
        }
        glommio::timer::sleep(Duration::from_millis(100)).await;
    }
    Err(last_err)
}

pub async fn metadata(client: &mut Client, topic: &str) -> Result<TopicLayout> {
    let req = MetadataRequest::default()
        .with_topics(Some(vec![
            MetadataRequestTopic::default().with_name(Some(topic_name(topic)))
        ]))
        .with_allow_auto_topic_creation(false);
    let resp = client.call(&req).await?;
    let brokers: HashMap<i32, String> = resp
        .brokers
        .iter()
        .map(|b| (b.node_id.0, format!("{}:{}", b.host.as_str(), b.port)))
        .collect();
    let t = resp
        .topics
        .iter()
        .find(|t| {
            t.name
                .as_ref()
                .map(|n| n.0.as_str() == topic)
                .unwrap_or(false)
        })
        .ok_or_else(|| anyhow!("topic {topic} missing from metadata"))?;
    if t.error_code != ERROR_NONE {
        bail!("topic {topic}: {}", error_name(t.error_code));
    }
    if t.partitions.is_empty() {
        bail!("topic {topic} has no partitions");
    }
    let mut partitions = Vec::new();
    for p in &t.partitions {
        if p.error_code != ERROR_NONE && p.leader_id.0 < 0 {
            bail!(
                "partition {topic}-{}: {}",
                p.partition_index,
                error_name(p.error_code)
            );
        }
        // A single-broker cluster is reached through the bootstrap address whatever it
        // advertises, which sidesteps misconfigured advertised listeners.
        let addr = if brokers.len() == 1 {
            client.addr.clone()
        } else {
            brokers.get(&p.leader_id.0).cloned().ok_or_else(|| {
                anyhow!(
                    "leader {} of {topic}-{} unknown",
                    p.leader_id.0,
                    p.partition_index
                )
            })?
        };
        partitions.push((p.partition_index, addr));
    }
    partitions.sort();
    Ok(TopicLayout {
        topic: topic.to_string(),
        partitions,
    })
}

/// Offsets at `timestamp` (-2 earliest, -1 latest) for the given partitions of one leader.
pub async fn list_offsets(
    client: &mut Client,
    topic: &str,
    partitions: &[i32],
    timestamp: i64,
) -> Result<HashMap<i32, i64>> {
    let req = ListOffsetsRequest::default()
        .with_replica_id(kafka_protocol::messages::BrokerId(-1))
        .with_topics(vec![ListOffsetsTopic::default()
            .with_name(topic_name(topic))
            .with_partitions(
                partitions
                    .iter()
                    .map(|p| {
                        ListOffsetsPartition::default()
                            .with_partition_index(*p)
                            .with_current_leader_epoch(-1)
                            .with_timestamp(timestamp)
                    })
                    .collect(),
            )]);
    let resp = client.call(&req).await?;
    let mut out = HashMap::new();
    for t in &resp.topics {
        for p in &t.partitions {
            if p.error_code != ERROR_NONE {
                bail!(
                    "ListOffsets {topic}-{}: {}",
                    p.partition_index,
                    error_name(p.error_code)
                );
            }
            out.insert(p.partition_index, p.offset);
        }
    }
    for p in partitions {
        if !out.contains_key(p) {
            bail!("ListOffsets returned nothing for {topic}-{p}");
        }
    }
    Ok(out)
}

/// One parsed RecordBatch header (v2), enough to advance offsets and count records.
#[derive(Clone, Copy, Debug)]
pub struct BatchHeader {
    pub base_offset: i64,
    pub batch_bytes: usize,
    pub last_offset_delta: i32,
    pub record_count: i32,
    pub is_control: bool,
}

pub const BATCH_HEADER_BYTES: usize = 61;

/// Walks the complete batches in a fetched records blob; a truncated tail batch is ignored,
/// as Kafka allows.
pub fn for_each_batch(records: &[u8], mut f: impl FnMut(BatchHeader, &[u8])) -> Result<()> {
    let mut pos = 0usize;
    while records.len() - pos >= 17 {
        let b = &records[pos..];
        let base_offset = i64::from_be_bytes(b[0..8].try_into()?);
        let length = i32::from_be_bytes(b[8..12].try_into()?);
        if length < 0 {
            bail!("negative batch length at byte {pos}");
        }
        let batch_bytes = 12 + length as usize;
        if b.len() < batch_bytes {
            break;
        }
        let magic = b[16] as i8;
        if magic != 2 {
            bail!("record batch magic {magic} at offset {base_offset} (only v2 is supported)");
        }
        if batch_bytes < BATCH_HEADER_BYTES {
            bail!("record batch at offset {base_offset} too short");
        }
        let attributes = i16::from_be_bytes(b[21..23].try_into()?);
        let header = BatchHeader {
            base_offset,
            batch_bytes,
            last_offset_delta: i32::from_be_bytes(b[23..27].try_into()?),
            record_count: i32::from_be_bytes(b[57..61].try_into()?),
            is_control: attributes & (1 << 5) != 0,
        };
        f(header, &b[..batch_bytes]);
        pos += batch_bytes;
    }
    Ok(())
}

pub fn batch_crc_ok(batch: &[u8]) -> bool {
    batch.len() >= BATCH_HEADER_BYTES
        && u32::from_be_bytes([batch[17], batch[18], batch[19], batch[20]])
            == crc32c::crc32c(&batch[21..])
}
