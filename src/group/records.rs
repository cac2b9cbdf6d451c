//! Byte formats of the records Kafka writes to `__consumer_offsets`, so that Fjord's internal
//! topic can be read by Kafka tooling and Kafka's topic can be loaded by Fjord.
//!
//! Classic (non-flexible) schemas, big-endian. Keys: version 0/1 = offset commit, version 2 =
//! group metadata, 3–8 = KIP-848 consumer groups (their flexible values are in
//! `consumer_records`). A tombstone is a key with a null value. We write offset values at version 3
//! and group metadata values at version 3; we read versions 0–3 of both. Decoding never panics:
//! every length is checked against the bytes that remain.

use bytes::Bytes;
use std::fmt;

/// Key version Kafka writes for committed offsets (0 has the same layout).
pub const OFFSET_KEY_VERSION: i16 = 1;
/// Key version for group metadata.
pub const GROUP_KEY_VERSION: i16 = 2;
/// Offset value version we write (v3 carries the leader epoch).
pub const OFFSET_VALUE_VERSION: i16 = 3;
/// Group metadata value version we write (v3 carries group.instance.id).
pub const GROUP_VALUE_VERSION: i16 = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The input ended before the schema did.
    Truncated,
    /// A key or value version this code does not know.
    UnknownVersion(i16),
    /// A negative length other than -1 (null), or null where the schema forbids it.
    InvalidLength(i32),
    InvalidUtf8,
    /// Bytes left over after the schema ended: a sign of a wrong schema or corruption.
    TrailingBytes(usize),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "record truncated"),
            DecodeError::UnknownVersion(v) => write!(f, "unknown record version {v}"),
            DecodeError::InvalidLength(n) => write!(f, "invalid length {n}"),
            DecodeError::InvalidUtf8 => write!(f, "string is not valid UTF-8"),
            DecodeError::TrailingBytes(n) => write!(f, "{n} unexpected trailing bytes"),
        }
    }
}

impl std::error::Error for DecodeError {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OffsetsKey {
    Offset {
        group: String,
        topic: String,
        partition: i32,
    },
    Group {
        group: String,
    },
    /// A KIP-848 consumer group's record (key types 3–8, see `consumer_records`).
    Consumer {
        group: String,
        kind: super::consumer_records::ConsumerKey,
    },
}

impl OffsetsKey {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            OffsetsKey::Offset {
                group,
                topic,
                partition,
            } => {
                w.i16(OFFSET_KEY_VERSION);
                w.string(group);
                w.string(topic);
                w.i32(*partition);
            }
            OffsetsKey::Group { group } => {
                w.i16(GROUP_KEY_VERSION);
                w.string(group);
            }
            OffsetsKey::Consumer { group, kind } => {
                w.i16(kind.key_type());
                w.string(group);
                if let Some(member) = kind.member() {
                    w.string(member);
                }
            }
        }
        w.buf
    }

    pub fn decode(buf: &[u8]) -> Result<OffsetsKey, DecodeError> {
        let mut r = Reader::new(buf);
        let key = match r.i16()? {
            0 | 1 => OffsetsKey::Offset {
                group: r.string()?,
                topic: r.string()?,
                partition: r.i32()?,
            },
            2 => OffsetsKey::Group { group: r.string()? },
            v @ 3..=8 => {
                let group = r.string()?;
                let kind = super::consumer_records::ConsumerKey::decode(v, &mut r)?;
                OffsetsKey::Consumer { group, kind }
            }
            v => return Err(DecodeError::UnknownVersion(v)),
        };
        r.finish()?;
        Ok(key)
    }

    pub fn group(&self) -> &str {
        match self {
            OffsetsKey::Offset { group, .. }
            | OffsetsKey::Group { group }
            | OffsetsKey::Consumer { group, .. } => group,
        }
    }
}

/// A committed offset. Versions 0–2 carry no leader epoch (decoded as -1); the v1 expire
/// timestamp is read and dropped, as Kafka itself ignores it since KIP-211.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetValue {
    pub offset: i64,
    /// -1 when unknown.
    pub leader_epoch: i32,
    pub metadata: String,
    pub commit_timestamp_ms: i64,
}

impl OffsetValue {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.i16(OFFSET_VALUE_VERSION);
        w.i64(self.offset);
        w.i32(self.leader_epoch);
        w.string(&self.metadata);
        w.i64(self.commit_timestamp_ms);
        w.buf
    }

    pub fn decode(buf: &[u8]) -> Result<OffsetValue, DecodeError> {
        let mut r = Reader::new(buf);
        let version = r.i16()?;
        let value = match version {
            0..=2 => {
                let offset = r.i64()?;
                let metadata = r.nullable_string()?.unwrap_or_default();
                let commit_timestamp_ms = r.i64()?;
                if version == 1 {
                    let _expire_timestamp_ms = r.i64()?;
                }
                OffsetValue {
                    offset,
                    leader_epoch: -1,
                    metadata,
                    commit_timestamp_ms,
                }
            }
            3 => OffsetValue {
                offset: r.i64()?,
                leader_epoch: r.i32()?,
                metadata: r.nullable_string()?.unwrap_or_default(),
                commit_timestamp_ms: r.i64()?,
            },
            v => return Err(DecodeError::UnknownVersion(v)),
        };
        r.finish()?;
        Ok(value)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberMetadataValue {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub rebalance_timeout_ms: i32,
    pub session_timeout_ms: i32,
    /// The member's metadata for the group's selected protocol.
    pub subscription: Bytes,
    pub assignment: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMetadataValue {
    pub protocol_type: String,
    pub generation: i32,
    pub protocol: Option<String>,
    pub leader: Option<String>,
    /// -1 when unknown (versions before 2).
    pub current_state_timestamp_ms: i64,
    pub members: Vec<MemberMetadataValue>,
}

impl GroupMetadataValue {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.i16(GROUP_VALUE_VERSION);
        w.string(&self.protocol_type);
        w.i32(self.generation);
        w.nullable_string(self.protocol.as_deref());
        w.nullable_string(self.leader.as_deref());
        w.i64(self.current_state_timestamp_ms);
        w.len_i32(self.members.len());
        for m in &self.members {
            w.string(&m.member_id);
            w.nullable_string(m.group_instance_id.as_deref());
            w.string(&m.client_id);
            w.string(&m.client_host);
            w.i32(m.rebalance_timeout_ms);
            w.i32(m.session_timeout_ms);
            w.bytes(&m.subscription);
            w.bytes(&m.assignment);
        }
        w.buf
    }

    pub fn decode(buf: &[u8]) -> Result<GroupMetadataValue, DecodeError> {
        let mut r = Reader::new(buf);
        let version = r.i16()?;
        if !(0..=3).contains(&version) {
            return Err(DecodeError::UnknownVersion(version));
        }
        let protocol_type = r.string()?;
        let generation = r.i32()?;
        let protocol = r.nullable_string()?;
        let leader = r.nullable_string()?;
        let current_state_timestamp_ms = if version >= 2 { r.i64()? } else { -1 };
        let count = r.array_len()?;
        // Smallest possible member: 3 empty strings + 2 empty-or-absent fields + 2 i32 + 2 i32 lengths.
        let mut members = Vec::with_capacity(count.min(r.remaining() / 16));
        for _ in 0..count {
            let member_id = r.string()?;
            let group_instance_id = if version >= 3 {
                r.nullable_string()?
            } else {
                None
            };
            let client_id = r.string()?;
            let client_host = r.string()?;
            let rebalance_timeout_ms = if version >= 1 { Some(r.i32()?) } else { None };
            let session_timeout_ms = r.i32()?;
            members.push(MemberMetadataValue {
                member_id,
                group_instance_id,
                client_id,
                client_host,
                // v0 had a single timeout; Kafka uses the session timeout as rebalance timeout.
                rebalance_timeout_ms: rebalance_timeout_ms.unwrap_or(session_timeout_ms),
                session_timeout_ms,
                subscription: r.bytes()?,
                assignment: r.bytes()?,
            });
        }
        r.finish()?;
        Ok(GroupMetadataValue {
            protocol_type,
            generation,
            protocol,
            leader,
            current_state_timestamp_ms,
            members,
        })
    }
}

/// One `__consumer_offsets` record, decoded; `None` values are tombstones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OffsetsRecord {
    Offset {
        group: String,
        topic: String,
        partition: i32,
        value: Option<OffsetValue>,
    },
    Group {
        group: String,
        value: Option<GroupMetadataValue>,
    },
    /// A KIP-848 consumer group's record.
    Consumer {
        group: String,
        record: super::consumer_records::ConsumerRecord,
    },
}

impl OffsetsRecord {
    pub fn decode(key: &[u8], value: Option<&[u8]>) -> Result<OffsetsRecord, DecodeError> {
        Ok(match OffsetsKey::decode(key)? {
            OffsetsKey::Offset {
                group,
                topic,
                partition,
            } => OffsetsRecord::Offset {
                group,
                topic,
                partition,
                value: value.map(OffsetValue::decode).transpose()?,
            },
            OffsetsKey::Group { group } => OffsetsRecord::Group {
                group,
                value: value.map(GroupMetadataValue::decode).transpose()?,
            },
            OffsetsKey::Consumer { group, kind } => OffsetsRecord::Consumer {
                group,
                record: super::consumer_records::ConsumerRecord::decode(kind, value)?,
            },
        })
    }
}

#[derive(Default)]
pub(super) struct Writer {
    pub(super) buf: Vec<u8>,
}

impl Writer {
    pub(super) fn i16(&mut self, v: i16) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    pub(super) fn i32(&mut self, v: i32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    pub(super) fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    pub(super) fn len_i32(&mut self, len: usize) {
        // Lengths come from in-memory values bounded far below 2 GiB by request size limits.
        self.i32(i32::try_from(len).unwrap_or(i32::MAX));
    }
    pub(super) fn string(&mut self, s: &str) {
        // Kafka strings are at most i16::MAX bytes; longer ones are cut at a char boundary so
        // the record stays decodable rather than corrupting the length prefix.
        let mut end = s.len().min(i16::MAX as usize);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.i16(end as i16);
        self.buf.extend_from_slice(&s.as_bytes()[..end]);
    }
    pub(super) fn nullable_string(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.string(s),
            None => self.i16(-1),
        }
    }
    pub(super) fn bytes(&mut self, b: &[u8]) {
        self.len_i32(b.len());
        self.buf.extend_from_slice(b);
    }
}

pub(super) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    pub(super) fn remaining(&self) -> usize {
        self.buf.len()
    }
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    pub(super) fn i16(&mut self) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array()?))
    }
    pub(super) fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array()?))
    }
    pub(super) fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array()?))
    }
    pub(super) fn nullable_string(&mut self) -> Result<Option<String>, DecodeError> {
        let len = self.i16()?;
        if len == -1 {
            return Ok(None);
        }
        let len = usize::try_from(len).map_err(|_| DecodeError::InvalidLength(len.into()))?;
        let raw = self.take(len)?;
        let s = std::str::from_utf8(raw).map_err(|_| DecodeError::InvalidUtf8)?;
        Ok(Some(s.to_owned()))
    }
    pub(super) fn string(&mut self) -> Result<String, DecodeError> {
        self.nullable_string()?
            .ok_or(DecodeError::InvalidLength(-1))
    }
    /// Kafka's BYTES; a null (-1) is read as empty, as Kafka's loader tolerates it.
    pub(super) fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.i32()?;
        if len == -1 {
            return Ok(Bytes::new());
        }
        let len = usize::try_from(len).map_err(|_| DecodeError::InvalidLength(len))?;
        Ok(Bytes::copy_from_slice(self.take(len)?))
    }
    pub(super) fn array_len(&mut self) -> Result<usize, DecodeError> {
        let len = self.i32()?;
        if len == -1 {
            return Ok(0);
        }
        usize::try_from(len).map_err(|_| DecodeError::InvalidLength(len))
    }
    pub(super) fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.buf.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group_value() -> GroupMetadataValue {
        GroupMetadataValue {
            protocol_type: "consumer".into(),
            generation: 7,
            protocol: Some("range".into()),
            leader: Some("c-1".into()),
            current_state_timestamp_ms: 1_700_000_000_000,
            members: vec![
                MemberMetadataValue {
                    member_id: "c-1".into(),
                    group_instance_id: Some("i-1".into()),
                    client_id: "c".into(),
                    client_host: "/127.0.0.1".into(),
                    rebalance_timeout_ms: 300_000,
                    session_timeout_ms: 45_000,
                    subscription: Bytes::from_static(b"\x00\x01sub"),
                    assignment: Bytes::from_static(b"\x00\x01asg"),
                },
                MemberMetadataValue {
                    member_id: "c-2".into(),
                    group_instance_id: None,
                    client_id: "c".into(),
                    client_host: "/10.0.0.2".into(),
                    rebalance_timeout_ms: 1,
                    session_timeout_ms: 2,
                    subscription: Bytes::new(),
                    assignment: Bytes::new(),
                },
            ],
        }
    }

    #[test]
    fn offset_key_bytes_match_kafka_layout() {
        let key = OffsetsKey::Offset {
            group: "g".into(),
            topic: "t".into(),
            partition: 3,
        };
        let bytes = key.encode();
        assert_eq!(bytes, [0, 1, 0, 1, b'g', 0, 1, b't', 0, 0, 0, 3]);
        assert_eq!(OffsetsKey::decode(&bytes), Ok(key));
        let group = OffsetsKey::Group { group: "gg".into() };
        let bytes = group.encode();
        assert_eq!(bytes, [0, 2, 0, 2, b'g', b'g']);
        assert_eq!(OffsetsKey::decode(&bytes), Ok(group));
        // Version 0 offset keys share the layout.
        assert!(OffsetsKey::decode(&[0, 0, 0, 1, b'g', 0, 1, b't', 0, 0, 0, 3]).is_ok());
        assert_eq!(
            OffsetsKey::decode(&[0, 9]),
            Err(DecodeError::UnknownVersion(9))
        );
    }

    #[test]
    fn offset_value_round_trip_and_old_versions() {
        let v = OffsetValue {
            offset: 42,
            leader_epoch: 5,
            metadata: "meta".into(),
            commit_timestamp_ms: 1234,
        };
        let bytes = v.encode();
        assert_eq!(&bytes[..2], &[0, 3]);
        assert_eq!(bytes.len(), 2 + 8 + 4 + 2 + 4 + 8);
        assert_eq!(OffsetValue::decode(&bytes), Ok(v));

        let mut v1 = vec![0, 1];
        v1.extend_from_slice(&9i64.to_be_bytes());
        v1.extend_from_slice(&[0xff, 0xff]); // null metadata
        v1.extend_from_slice(&100i64.to_be_bytes());
        v1.extend_from_slice(&200i64.to_be_bytes());
        let d = OffsetValue::decode(&v1).expect("v1");
        assert_eq!(
            (d.offset, d.leader_epoch, d.commit_timestamp_ms),
            (9, -1, 100)
        );
        assert_eq!(d.metadata, "");
        // v0 and v2 share a layout: v1 without the expire timestamp.
        for version in [0u8, 2] {
            let mut old = v1[..v1.len() - 8].to_vec();
            old[1] = version;
            assert_eq!(OffsetValue::decode(&old), Ok(d.clone()));
        }
        let mut trailing = v1.clone();
        trailing.push(0);
        assert_eq!(
            OffsetValue::decode(&trailing),
            Err(DecodeError::TrailingBytes(1))
        );
        assert_eq!(
            OffsetValue::decode(&v1[..v1.len() - 1]),
            Err(DecodeError::Truncated)
        );
    }

    #[test]
    fn group_value_round_trip() {
        let v = group_value();
        let bytes = v.encode();
        assert_eq!(GroupMetadataValue::decode(&bytes), Ok(v.clone()));
        let empty = GroupMetadataValue {
            protocol: None,
            leader: None,
            members: vec![],
            ..v
        };
        assert_eq!(GroupMetadataValue::decode(&empty.encode()), Ok(empty));
        let rec = OffsetsRecord::decode(&OffsetsKey::Group { group: "g".into() }.encode(), None);
        assert_eq!(
            rec,
            Ok(OffsetsRecord::Group {
                group: "g".into(),
                value: None
            })
        );
    }

    #[test]
    fn group_value_v0_layout() {
        let mut w = Writer::default();
        w.i16(0);
        w.string("consumer");
        w.i32(3);
        w.nullable_string(Some("range"));
        w.nullable_string(Some("m"));
        w.len_i32(1);
        w.string("m");
        w.string("cid");
        w.string("host");
        w.i32(10_000);
        w.bytes(b"s");
        w.bytes(b"a");
        let d = GroupMetadataValue::decode(&w.buf).expect("v0");
        assert_eq!(d.current_state_timestamp_ms, -1);
        assert_eq!(d.members[0].rebalance_timeout_ms, 10_000);
        assert_eq!(d.members[0].group_instance_id, None);
        assert_eq!(&d.members[0].assignment[..], b"a");
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let valid = [
            group_value().encode(),
            OffsetValue {
                offset: 1,
                leader_epoch: 2,
                metadata: "m".into(),
                commit_timestamp_ms: 3,
            }
            .encode(),
            OffsetsKey::Group { group: "g".into() }.encode(),
        ];
        for i in 0..200_000u32 {
            let mut buf: Vec<u8> = if i % 2 == 0 {
                let len = (next() % 64) as usize;
                (0..len).map(|_| next() as u8).collect()
            } else {
                // Mutate valid records: the interesting failures live near valid layouts.
                let mut b = valid[(next() % 3) as usize].clone();
                for _ in 0..(next() % 4) {
                    let at = (next() as usize) % b.len();
                    b[at] = next() as u8;
                }
                b.truncate((next() as usize) % (b.len() + 1));
                b
            };
            if i % 3 == 0 && buf.len() >= 2 {
                buf[0] = 0;
                buf[1] = (next() % 4) as u8;
            }
            let _ = OffsetsKey::decode(&buf);
            let _ = OffsetValue::decode(&buf);
            let _ = GroupMetadataValue::decode(&buf);
            let _ = OffsetsRecord::decode(&buf, Some(&buf));
        }
    }
}
