//! The controller listener's framing and a small async client for it.
//!
//! Every frame is Kafka's: a 4-byte size, then a request header. Kafka's own APIs
//! (BrokerRegistration, BrokerHeartbeat, CreateTopics, …) use Kafka's headers and bodies; two
//! private keys, outside Kafka's range, carry what Kafka has no message for here: a raft-rs
//! message between voters (Raft pushes where KRaft pulls) and a broker's fetch of the committed
//! metadata image. A private frame's header is `api_key: i16, version: i16, correlation_id:
//! i32`, its response header only the correlation id.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use kafka_protocol::messages::{RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};

/// A raft-rs `eraftpb::Message`, protobuf-encoded; no response.
pub const RAFT_MESSAGE_KEY: i16 = 32000;
/// Body: `applied_index: u64`, `wait_ms: u32`. Response: `applied_index: u64,
/// leader_id: i32, term: u64`, then the image as a snapshot when it is newer than the asker's
/// (empty otherwise).
pub const METADATA_FETCH_KEY: i16 = 32001;

/// Frames on the controller listener are small (metadata, raft messages of at most
/// `max_size_per_msg` plus a snapshot of the image).
pub const FRAME_BYTES_MAX: usize = 64 << 20;

/// Runs `f` for at most `d`; `None` if the time ran out first.
pub async fn within<T>(d: Duration, f: impl Future<Output = T>) -> Option<T> {
    let f = Box::pin(f);
    let t = Box::pin(glommio::timer::sleep(d));
    match futures::future::select(f, t).await {
        futures::future::Either::Left((v, _)) => Some(v),
        futures::future::Either::Right(_) => None,
    }
}

pub async fn read_frame(s: &mut TcpStream) -> std::io::Result<Bytes> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let n = i32::from_be_bytes(len);
    if n < 8 || n as usize > FRAME_BYTES_MAX {
        return Err(std::io::Error::other(format!("bad frame size {n}")));
    }
    let mut buf = vec![0u8; n as usize];
    s.read_exact(&mut buf).await?;
    Ok(Bytes::from(buf))
}

pub fn private_frame(key: i16, correlation_id: i32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + body.len());
    out.put_i32((8 + body.len()) as i32);
    out.put_i16(key);
    out.put_i16(0);
    out.put_i32(correlation_id);
    out.extend_from_slice(body);
    out
}

pub fn kafka_frame<R: Request>(
    version: i16,
    correlation_id: i32,
    client_id: &str,
    req: &R,
) -> anyhow::Result<Vec<u8>> {
    let mut h = RequestHeader::default();
    h.request_api_key = R::KEY;
    h.request_api_version = version;
    h.correlation_id = correlation_id;
    h.client_id = Some(StrBytes::from_string(client_id.to_string()));
    let mut buf = BytesMut::new();
    buf.put_i32(0);
    h.encode(&mut buf, R::header_version(version))?;
    req.encode(&mut buf, version)?;
    let n = (buf.len() - 4) as i32;
    buf[..4].copy_from_slice(&n.to_be_bytes());
    Ok(buf.to_vec())
}

/// A request's header and body without the size prefix: what an Envelope carries.
pub fn request_bytes<R: Request>(version: i16, client_id: &str, req: &R) -> anyhow::Result<Bytes> {
    let mut h = RequestHeader::default();
    h.request_api_key = R::KEY;
    h.request_api_version = version;
    h.correlation_id = 0;
    h.client_id = Some(StrBytes::from_string(client_id.to_string()));
    let mut buf = BytesMut::new();
    h.encode(&mut buf, R::header_version(version))?;
    req.encode(&mut buf, version)?;
    Ok(buf.freeze())
}

/// One connection to a controller listener; requests one at a time.
pub struct Conn {
    stream: TcpStream,
    pub addr: SocketAddr,
    correlation_id: i32,
}

impl Conn {
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<Conn> {
        let stream = TcpStream::connect_timeout(addr, timeout)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        stream
            .set_write_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Conn {
            stream,
            addr,
            correlation_id: 0,
        })
    }

    fn next_id(&mut self) -> i32 {
        self.correlation_id = self.correlation_id.wrapping_add(1);
        self.correlation_id
    }

    /// Sends a frame that gets no answer (a raft message).
    pub async fn send_private(&mut self, key: i16, body: &[u8]) -> std::io::Result<()> {
        let id = self.next_id();
        self.stream.write_all(&private_frame(key, id, body)).await
    }

    pub async fn call_private(&mut self, key: i16, body: &[u8]) -> std::io::Result<Bytes> {
        let id = self.next_id();
        self.stream.write_all(&private_frame(key, id, body)).await?;
        let mut resp = read_frame_any(&mut self.stream).await?;
        if resp.get_i32() != id {
            return Err(std::io::Error::other("correlation id mismatch"));
        }
        Ok(resp)
    }

    /// Sends an already framed request and returns the response frame as it came (for a
    /// voter that relays a request to the active controller).
    pub async fn relay(&mut self, frame: &[u8]) -> std::io::Result<Bytes> {
        self.stream.write_all(frame).await?;
        read_frame_any(&mut self.stream).await
    }

    pub async fn call<R: Request>(&mut self, version: i16, req: &R) -> anyhow::Result<R::Response> {
        let id = self.next_id();
        let frame = kafka_frame(version, id, "fjord-node", req)?;
        self.stream.write_all(&frame).await?;
        let mut b = read_frame_any(&mut self.stream).await?;
        let rh = ResponseHeader::decode(
            &mut b,
            <R::Response as HeaderVersion>::header_version(version),
        )?;
        if rh.correlation_id != id {
            anyhow::bail!("correlation id mismatch");
        }
        R::Response::decode(&mut b, version)
    }
}

/// A response frame: at least the 4-byte correlation id.
async fn read_frame_any(s: &mut TcpStream) -> std::io::Result<Bytes> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let n = i32::from_be_bytes(len);
    if n < 4 || n as usize > FRAME_BYTES_MAX {
        return Err(std::io::Error::other(format!("bad frame size {n}")));
    }
    let mut buf = vec![0u8; n as usize];
    s.read_exact(&mut buf).await?;
    Ok(Bytes::from(buf))
}

/// `1@host:port,2@host:port` → voters, each with an id of at least 1 (Raft reserves 0).
pub fn parse_voters(s: &str) -> Result<Vec<(i32, SocketAddr)>, String> {
    let mut out: Vec<(i32, SocketAddr)> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('@')
            .ok_or_else(|| format!("controller {part:?} is not ID@HOST:PORT"))?;
        let id: i32 = id
            .trim()
            .parse()
            .map_err(|_| format!("controller id {id:?} in {part:?} is not a number"))?;
        if id < 1 {
            return Err(format!(
                "controller id {id} in {part:?}: voter ids start at 1 (Raft reserves 0)"
            ));
        }
        use std::net::ToSocketAddrs;
        let addr = addr
            .trim()
            .to_socket_addrs()
            .map_err(|e| format!("controller address {addr:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("controller address {addr:?} resolves to nothing"))?;
        if out.iter().any(|(i, _)| *i == id) {
            return Err(format!("controller id {id} is listed twice"));
        }
        out.push((id, addr));
    }
    if out.is_empty() {
        return Err("no controller listed".into());
    }
    Ok(out)
}
