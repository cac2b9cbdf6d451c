//! The Kafka listener of a shard: accept, framing (4-byte size + request header), dispatch by
//! ApiKey to `handlers/<api>.rs`, responses written in request order. Owns connections only;
//! partition data is reached through the shard module. `metrics_endpoint.rs` is the other
//! listener: the Prometheus endpoint's thread, which scrapes every shard through the mesh.

pub mod bounded_decode;
pub mod controller;
pub mod errors;
pub mod fetch_session;
pub mod handlers;
pub mod metrics_endpoint;
pub mod replication;

/// Response chunks smaller than this are gathered by copying.
const INLINE_CHUNK_BYTES: usize = 64 * 1024;

use std::rc::Rc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{AsyncReadExt, AsyncWriteExt, FutureExt};
use glommio::net::{TcpListener, TcpStream};
use kafka_protocol::messages::{ApiKey, RequestHeader, RequestKind, ResponseHeader, ResponseKind};
use kafka_protocol::protocol::Decodable;
use kafka_protocol::protocol::Encodable;

use crate::shard::budget::Charge;
use crate::shard::Shard;

/// What a request's handler knows about its client.
pub struct ConnCtx {
    pub shard: Rc<Shard>,
    pub client_id: String,
    pub client_host: String,
    /// The connection's last fetch, if it was idle (see `handlers::fetch::IdleFetch`).
    pub idle_fetch: handlers::fetch::IdleSlot,
}

/// The versions we answer, per API: only what works end to end.
pub fn supported_versions(key: ApiKey) -> Option<(i16, i16)> {
    let ours = match key {
        ApiKey::Produce => (3, 11),
        ApiKey::Fetch => (4, 16),
        ApiKey::ListOffsets => (1, 8),
        ApiKey::Metadata => (0, 12),
        ApiKey::ApiVersions => (0, 4),
        ApiKey::CreateTopics => (2, 7),
        ApiKey::DeleteTopics => (1, 6),
        ApiKey::CreatePartitions => (0, 3),
        ApiKey::DeleteRecords => (0, 2),
        ApiKey::DescribeConfigs => (1, 4),
        ApiKey::AlterConfigs => (0, 2),
        ApiKey::IncrementalAlterConfigs => (0, 1),
        ApiKey::InitProducerId => (0, 5),
        ApiKey::DescribeCluster => (0, 2),
        ApiKey::DescribeQuorum => (0, 1),
        ApiKey::ElectLeaders => (0, 2),
        ApiKey::DescribeLogDirs => (1, 4),
        ApiKey::AlterPartitionReassignments => (0, 1),
        ApiKey::ListPartitionReassignments => (0, 0),
        ApiKey::OffsetForLeaderEpoch => (2, 4),
        ApiKey::FindCoordinator => (0, 4),
        ApiKey::JoinGroup => (0, 9),
        ApiKey::SyncGroup => (0, 5),
        ApiKey::Heartbeat => (0, 4),
        ApiKey::LeaveGroup => (0, 5),
        ApiKey::OffsetCommit => (2, 9),
        ApiKey::OffsetFetch => (1, 9),
        ApiKey::ListGroups => (0, 5),
        ApiKey::DescribeGroups => (0, 5),
        ApiKey::DeleteGroups => (0, 2),
        ApiKey::OffsetDelete => (0, 0),
        ApiKey::ConsumerGroupHeartbeat => (0, 1),
        ApiKey::ConsumerGroupDescribe => (0, 1),
        _ => return None,
    };
    let crate_range = key.valid_versions();
    let min = ours.0.max(crate_range.min);
    let max = ours.1.min(crate_range.max);
    (min <= max).then_some((min, max))
}

pub async fn accept_loop(listener: TcpListener, shard: Rc<Shard>) {
    // Bounded by the process lifetime; each accepted connection is its own task.
    loop {
        match listener.accept().await {
            Ok(stream) => {
                let shard = shard.clone();
                glommio::spawn_local(async move {
                    let peer = stream
                        .peer_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    if let Err(e) = connection(stream, shard).await {
                        tracing::debug!("connection {peer} closed: {e}");
                    }
                })
                .detach();
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Requests one connection may have read but not yet answered.
const IN_FLIGHT_MAX: usize = 32;

/// Lets a connection read its next request before the current one is answered. A handler
/// releases it once its order-sensitive part is done (produce: batches queued); otherwise it
/// is released when the handler finishes. Responses always go out in request order.
pub struct OrderGate(std::cell::RefCell<Option<futures::channel::oneshot::Sender<()>>>);

impl OrderGate {
    pub fn release(&self) {
        if let Some(tx) = self.0.borrow_mut().take() {
            let _ = tx.send(());
        }
    }
}

/// A response (head, chunks), with the budget its bytes hold until it is written.
type Answer = Result<Option<(BytesMut, Vec<Bytes>, Charge)>, ConnError>;

/// The first allocation for a frame body: frames up to this size (nearly all) are read into
/// one buffer allocated once; larger ones grow by doubling as their bytes arrive, so that a
/// length announcing 100 MiB costs nothing until 100 MiB have actually been sent.
const FRAME_FIRST_ALLOC_BYTES: usize = 1 << 20;

/// Reads a frame body of `size` bytes. The peer must keep sending: a frame holds its share of
/// the shard's memory budget while it is read, so one that stalls for `idle` closes the
/// connection rather than holding the budget (and every other socket of the shard) hostage.
async fn read_frame<R: futures::AsyncRead + Unpin>(
    rd: &mut R,
    size: usize,
    idle: std::time::Duration,
) -> std::io::Result<Bytes> {
    let mut buf = vec![0u8; size.min(FRAME_FIRST_ALLOC_BYTES)];
    let mut filled = 0;
    // Bounded: each round reads at least one byte of the `size` expected.
    while filled < size {
        if filled == buf.len() {
            buf.resize(filled.saturating_mul(2).min(size), 0);
        }
        let read = rd.read(&mut buf[filled..]);
        let timer = glommio::timer::sleep(idle);
        futures::pin_mut!(read, timer);
        match futures::future::select(read, timer).await {
            futures::future::Either::Left((Ok(0), _)) => {
                return Err(std::io::ErrorKind::UnexpectedEof.into())
            }
            futures::future::Either::Left((Ok(n), _)) => filled += n,
            futures::future::Either::Left((Err(e), _)) => return Err(e),
            futures::future::Either::Right(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "request body stalled for {} ms at {filled} of {size} bytes",
                        idle.as_millis()
                    ),
                ))
            }
        }
    }
    Ok(Bytes::from(buf))
}

async fn connection(stream: TcpStream, shard: Rc<Shard>) -> Result<(), ConnError> {
    let _ = stream.set_nodelay(true);
    let _counted = crate::metrics::ConnectionGuard::open();
    let max = shard.node.tuning.memory.request_bytes_max;
    let body_idle =
        std::time::Duration::from_millis(shard.node.tuning.net.request_body_idle_timeout_ms);
    let host: Rc<str> = Rc::from(
        stream
            .peer_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default(),
    );
    let (mut rd, wr) = futures::AsyncReadExt::split(stream);
    let (mut tx, rx) = futures::channel::mpsc::channel::<glommio::Task<Answer>>(IN_FLIGHT_MAX);
    let writer = glommio::spawn_local(write_loop(wr, rx, host.clone()));
    let idle_fetch = handlers::fetch::IdleSlot::default();
    let mut size_buf = [0u8; 4];
    let read_result = loop {
        if let Err(e) = rd.read_exact(&mut size_buf).await {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                break Ok(());
            }
            break Err(e.into());
        }
        let size = i32::from_be_bytes(size_buf);
        if size < 8 || size as usize > max {
            tracing::warn!("closing connection from {host}: request size {size} outside [8, {max}] (socket.request.max.bytes)");
            return Err(ConnError::Protocol(format!("bad request size {size}")));
        }
        // Back-pressure: while the shard's budget is spent, this socket is not read.
        let charge = shard.memory.acquire(size as usize).await;
        let frame = match read_frame(&mut rd, size as usize, body_idle).await {
            Ok(f) => f,
            Err(e) => {
                if e.kind() == std::io::ErrorKind::TimedOut {
                    tracing::warn!("closing connection from {host}: {e}");
                }
                break Err(e.into());
            }
        };
        let (gate_tx, gate_rx) = futures::channel::oneshot::channel();
        let (shard, host2, idle2) = (shard.clone(), host.clone(), idle_fetch.clone());
        let task = glommio::spawn_local(async move {
            let gate = OrderGate(std::cell::RefCell::new(Some(gate_tx)));
            let mut out = BytesMut::new();
            let mut chunks = Vec::new();
            // A bug in one handler closes this connection with a log line; it must not take
            // the shard (and every other connection on it) down.
            let r = std::panic::AssertUnwindSafe(handle_frame(
                shard.clone(),
                host2,
                idle2,
                frame,
                &mut out,
                &mut chunks,
                &gate,
            ))
            .catch_unwind()
            .await
            .unwrap_or_else(|p| {
                let what = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!("request handler panicked: {what}");
                Err(ConnError::Protocol(format!("internal error: {what}")))
            });
            drop(gate);
            // The request's bytes are handled (produce data is in the log's queue or cache,
            // which have their own caps); the response's bytes are held until written.
            drop(charge);
            r.map(|due| {
                due.then(|| {
                    let bytes = out.len() + chunks.iter().map(|c| c.len()).sum::<usize>();
                    let held = shard.memory.charge(bytes);
                    (out, chunks, held)
                })
            })
        });
        if futures::SinkExt::send(&mut tx, task).await.is_err() {
            break Ok(());
        }
        let _ = gate_rx.await;
    };
    drop(tx);
    let write_result = writer.await;
    read_result.and(write_result)
}

/// Writes answers in request order; stops (closing the connection) at the first protocol error.
async fn write_loop(
    mut wr: futures::io::WriteHalf<TcpStream>,
    mut rx: futures::channel::mpsc::Receiver<glommio::Task<Answer>>,
    host: Rc<str>,
) -> Result<(), ConnError> {
    use futures::StreamExt;
    while let Some(task) = rx.next().await {
        match task.await {
            Ok(Some((head, chunks, _held))) => {
                // Small chunks are gathered by copying (one syscall for many), chunks of at
                // least INLINE_CHUNK_BYTES go out as they are. (Vectored sendmsg of every chunk
                // was measured at 0.7x the cached-consume throughput of this and not kept.)
                let mut out = BytesMut::with_capacity(64 * 1024);
                out.extend_from_slice(&head);
                for c in chunks {
                    if c.len() < INLINE_CHUNK_BYTES {
                        out.extend_from_slice(&c);
                    } else {
                        wr.write_all(&out).await?;
                        out.clear();
                        wr.write_all(&c).await?;
                    }
                }
                if !out.is_empty() {
                    wr.write_all(&out).await?;
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("closing connection from {host}: {e}");
                let _ = wr.close().await;
                return Err(e);
            }
        }
    }
    Ok(())
}

/// A request frame, decoded.
pub enum Decoded {
    /// ApiVersions at a version we do not know: answered in the v0 format.
    UnknownApiVersionsVersion { correlation_id: i32 },
    Request {
        key: ApiKey,
        version: i16,
        correlation_id: i32,
        header: RequestHeader,
        req: Box<RequestKind>,
    },
}

/// Decodes a request frame (without its size prefix): header, API key and version checks,
/// body. Errors are the cases where Kafka closes the connection. Public for the fuzz targets.
pub fn decode_request(frame: &Bytes) -> Result<Decoded, ConnError> {
    if frame.len() < 8 {
        return Err(ConnError::Protocol(format!(
            "frame of {} bytes is shorter than a header",
            frame.len()
        )));
    }
    let mut peek = &frame[..];
    let api_key = peek.get_i16();
    let version = peek.get_i16();
    let correlation_id = peek.get_i32();
    let Ok(key) = ApiKey::try_from(api_key) else {
        return Err(ConnError::Protocol(format!("unknown api key {api_key}")));
    };
    let supported = supported_versions(key);
    let in_range = matches!(supported, Some((lo, hi)) if version >= lo && version <= hi);
    if !in_range {
        if key == ApiKey::ApiVersions {
            return Ok(Decoded::UnknownApiVersionsVersion { correlation_id });
        }
        return Err(ConnError::Protocol(format!(
            "unsupported version {version} of {key:?}"
        )));
    }
    let mut body = frame.clone();
    let header = RequestHeader::decode(&mut body, key.request_header_version(version))
        .map_err(|e| ConnError::Protocol(format!("bad request header: {e}")))?;
    // Decoded through a probe first, so that no array count can make it allocate beyond what
    // the frame holds (see bounded_decode); again from the frame only if the probe had to
    // clamp a plain field.
    let malformed = |e: anyhow::Error| {
        ConnError::Protocol(format!("malformed {key:?} v{version} request: {e}"))
    };
    let mut probe = bounded_decode::ProbeBuf::new(body.clone());
    let probed = bounded_decode::probe_decode(key, &mut probe, version).map_err(malformed)?;
    let req = if probe.clamps == 0 {
        probed
    } else {
        drop(probed);
        RequestKind::decode(key, &mut body, version).map_err(malformed)?
    };
    Ok(Decoded::Request {
        key,
        version,
        correlation_id,
        header,
        req: Box::new(req),
    })
}

/// Decodes one request, runs its handler and encodes the response (size prefix included) into
/// `out`, followed by `chunks` when the handler answered with pre-encoded chunks. Returns false
/// when no response is due (acks=0 produce).
async fn handle_frame(
    shard: Rc<Shard>,
    client_host: Rc<str>,
    idle_fetch: handlers::fetch::IdleSlot,
    frame: Bytes,
    out: &mut BytesMut,
    chunks: &mut Vec<Bytes>,
    gate: &OrderGate,
) -> Result<bool, ConnError> {
    let (key, version, correlation_id, header, req) = match decode_request(&frame)? {
        Decoded::UnknownApiVersionsVersion { correlation_id } => {
            // Kafka answers an unknown ApiVersions version in the v0 format with error 35, so
            // that the client can retry with a version we know.
            let resp = handlers::api_versions::response(errors::UNSUPPORTED_VERSION);
            write_response(out, correlation_id, 0, 0, &ResponseKind::ApiVersions(resp))?;
            return Ok(true);
        }
        Decoded::Request {
            key,
            version,
            correlation_id,
            header,
            req,
        } => (key, version, correlation_id, header, req),
    };
    let ctx = ConnCtx {
        shard,
        client_id: header
            .client_id
            .as_ref()
            .map(|c| c.to_string())
            .unwrap_or_default(),
        client_host: client_host.to_string(),
        idle_fetch,
    };
    let started = std::time::Instant::now();
    let reply = handlers::dispatch(&ctx, &header, *req, gate).await;
    crate::metrics::request_done(key as i16, started);
    let Some(reply) = reply else {
        return Ok(false);
    };
    let header_version = key.response_header_version(version);
    match reply {
        handlers::Reply::Kind(resp) => {
            crate::metrics::response_errors(&resp);
            write_response(out, correlation_id, header_version, version, &resp)?
        }
        handlers::Reply::Encoded(body) => {
            write_encoded(out, chunks, correlation_id, header_version, body)?
        }
    }
    Ok(true)
}

/// A response whose body is encoded already: its size and header into `out`, the body as
/// `chunks`.
fn write_encoded(
    out: &mut BytesMut,
    chunks: &mut Vec<Bytes>,
    correlation_id: i32,
    header_version: i16,
    body: Vec<Bytes>,
) -> Result<(), ConnError> {
    let start = write_header(out, correlation_id, header_version)?;
    let len = out.len() - start - 4 + body.iter().map(|b| b.len()).sum::<usize>();
    out[start..start + 4].copy_from_slice(&(len as i32).to_be_bytes());
    *chunks = body;
    Ok(())
}

/// A response's size placeholder and header into `out`; returns where its size goes.
fn write_header(
    out: &mut BytesMut,
    correlation_id: i32,
    header_version: i16,
) -> Result<usize, ConnError> {
    let start = out.len();
    out.put_i32(0);
    let mut h = ResponseHeader::default();
    h.correlation_id = correlation_id;
    h.encode(out, header_version)
        .map_err(|e| ConnError::Protocol(format!("encode header: {e}")))?;
    Ok(start)
}

fn write_response(
    out: &mut BytesMut,
    correlation_id: i32,
    header_version: i16,
    version: i16,
    resp: &ResponseKind,
) -> Result<(), ConnError> {
    let start = write_header(out, correlation_id, header_version)?;
    resp.encode(out, version)
        .map_err(|e| ConnError::Protocol(format!("encode response: {e}")))?;
    let len = (out.len() - start - 4) as i32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}
