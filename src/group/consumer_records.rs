//! The records a KIP-848 consumer group keeps in `__consumer_offsets`, in Kafka's layout: key
//! types 3–8 (classic encoding, like the other keys) with flexible version-0 values (compact
//! strings and arrays, tagged fields). Fjord writes types 3 (group epoch), 5 (member metadata),
//! 6 (target assignment epoch), 7 (a member's target assignment) and 8 (a member's current
//! assignment); it reads type 4 (subscription metadata, written by Kafka before 4.1) and ignores
//! it. Topics are named by id, as in Kafka. Decoding never panics and never preallocates beyond
//! the bytes that remain.

use uuid::Uuid;

use super::records::{DecodeError, Reader, Writer};

/// Partitions by topic id.
pub type TopicPartitions = Vec<(Uuid, Vec<i32>)>;

/// Which consumer-group record a key names (the group id is beside it in the key).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConsumerKey {
    /// ConsumerGroupMetadataKey (3): the group epoch.
    Metadata,
    /// ConsumerGroupPartitionMetadataKey (4): read and ignored.
    PartitionMetadata,
    /// ConsumerGroupMemberMetadataKey (5).
    Member(String),
    /// ConsumerGroupTargetAssignmentMetadataKey (6): the assignment epoch.
    TargetMetadata,
    /// ConsumerGroupTargetAssignmentMemberKey (7).
    TargetMember(String),
    /// ConsumerGroupCurrentMemberAssignmentKey (8).
    Assignment(String),
}

impl ConsumerKey {
    /// The key's version field, which Kafka uses as the record type.
    pub fn key_type(&self) -> i16 {
        match self {
            ConsumerKey::Metadata => 3,
            ConsumerKey::PartitionMetadata => 4,
            ConsumerKey::Member(_) => 5,
            ConsumerKey::TargetMetadata => 6,
            ConsumerKey::TargetMember(_) => 7,
            ConsumerKey::Assignment(_) => 8,
        }
    }

    pub fn member(&self) -> Option<&str> {
        match self {
            ConsumerKey::Member(m) | ConsumerKey::TargetMember(m) | ConsumerKey::Assignment(m) => {
                Some(m)
            }
            _ => None,
        }
    }

    /// The rest of a key of type `key_type` after its group id.
    pub(super) fn decode(key_type: i16, r: &mut Reader<'_>) -> Result<ConsumerKey, DecodeError> {
        Ok(match key_type {
            3 => ConsumerKey::Metadata,
            4 => ConsumerKey::PartitionMetadata,
            5 => ConsumerKey::Member(r.string()?),
            6 => ConsumerKey::TargetMetadata,
            7 => ConsumerKey::TargetMember(r.string()?),
            8 => ConsumerKey::Assignment(r.string()?),
            v => return Err(DecodeError::UnknownVersion(v)),
        })
    }
}

/// ConsumerGroupMetadataValue: the group epoch and the hash of the subscribed topics' metadata
/// (tag 0, KIP-1101) that tells a new coordinator whether topics changed meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupEpochValue {
    pub epoch: i32,
    pub metadata_hash: i64,
}

/// ConsumerGroupMemberMetadataValue.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemberValue {
    pub instance_id: Option<String>,
    pub rack_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub subscribed_topic_names: Vec<String>,
    pub subscribed_topic_regex: Option<String>,
    pub rebalance_timeout_ms: i32,
    pub server_assignor: Option<String>,
}

/// ConsumerGroupCurrentMemberAssignmentValue. `state` is Kafka's MemberState byte: 0 stable,
/// 1 unrevoked partitions, 2 unreleased partitions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AssignmentValue {
    pub member_epoch: i32,
    pub previous_member_epoch: i32,
    pub state: i8,
    pub assigned: TopicPartitions,
    pub revoking: TopicPartitions,
}

/// One consumer-group record; `None` values are tombstones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumerRecord {
    Metadata(Option<GroupEpochValue>),
    PartitionMetadata,
    Member(String, Option<MemberValue>),
    /// The target assignment's epoch.
    TargetMetadata(Option<i32>),
    TargetMember(String, Option<TopicPartitions>),
    Assignment(String, Option<AssignmentValue>),
}

/// Value version written and read for every type.
const VALUE_VERSION: i16 = 0;
/// Smallest encoded (topic id, partitions) entry: a UUID, an empty compact array, no tags.
const TOPIC_PARTITIONS_BYTES_MIN: usize = 18;

impl ConsumerRecord {
    pub(super) fn decode(kind: ConsumerKey, value: Option<&[u8]>) -> Result<Self, DecodeError> {
        let mut r = match value {
            Some(v) => {
                let mut r = Reader::new(v);
                let version = r.i16()?;
                if version != VALUE_VERSION {
                    return Err(DecodeError::UnknownVersion(version));
                }
                Some(r)
            }
            None => None,
        };
        let rec = match (kind, r.as_mut()) {
            (ConsumerKey::PartitionMetadata, _) => return Ok(ConsumerRecord::PartitionMetadata),
            (ConsumerKey::Metadata, None) => ConsumerRecord::Metadata(None),
            (ConsumerKey::Metadata, Some(r)) => {
                let epoch = r.i32()?;
                let mut metadata_hash = 0;
                r.tagged_fields(|tag, mut field| {
                    if tag == 0 {
                        metadata_hash = field.i64()?;
                    }
                    Ok(())
                })?;
                ConsumerRecord::Metadata(Some(GroupEpochValue {
                    epoch,
                    metadata_hash,
                }))
            }
            (ConsumerKey::Member(m), None) => ConsumerRecord::Member(m, None),
            (ConsumerKey::Member(m), Some(r)) => {
                let instance_id = r.compact_nullable_string()?;
                let rack_id = r.compact_nullable_string()?;
                let client_id = r.compact_string()?;
                let client_host = r.compact_string()?;
                let n = r.compact_array_len(1)?;
                let mut subscribed_topic_names = Vec::with_capacity(n.min(64));
                for _ in 0..n {
                    subscribed_topic_names.push(r.compact_string()?);
                }
                let value = MemberValue {
                    instance_id,
                    rack_id,
                    client_id,
                    client_host,
                    subscribed_topic_names,
                    subscribed_topic_regex: r.compact_nullable_string()?,
                    rebalance_timeout_ms: r.i32()?,
                    server_assignor: r.compact_nullable_string()?,
                };
                // Tag 0 (classic member metadata) is for members that use the classic protocol
                // in a consumer group, which Fjord does not mix.
                r.tagged_fields(|_, _| Ok(()))?;
                ConsumerRecord::Member(m, Some(value))
            }
            (ConsumerKey::TargetMetadata, None) => ConsumerRecord::TargetMetadata(None),
            (ConsumerKey::TargetMetadata, Some(r)) => {
                let epoch = r.i32()?;
                r.tagged_fields(|_, _| Ok(()))?;
                ConsumerRecord::TargetMetadata(Some(epoch))
            }
            (ConsumerKey::TargetMember(m), None) => ConsumerRecord::TargetMember(m, None),
            (ConsumerKey::TargetMember(m), Some(r)) => {
                let tps = r.topic_partitions()?;
                r.tagged_fields(|_, _| Ok(()))?;
                ConsumerRecord::TargetMember(m, Some(tps))
            }
            (ConsumerKey::Assignment(m), None) => ConsumerRecord::Assignment(m, None),
            (ConsumerKey::Assignment(m), Some(r)) => {
                let value = AssignmentValue {
                    member_epoch: r.i32()?,
                    previous_member_epoch: r.i32()?,
                    state: r.i8()?,
                    assigned: r.topic_partitions()?,
                    revoking: r.topic_partitions()?,
                };
                r.tagged_fields(|_, _| Ok(()))?;
                ConsumerRecord::Assignment(m, Some(value))
            }
        };
        if let Some(r) = r {
            r.finish()?;
        }
        Ok(rec)
    }

    /// The tombstone of `key`.
    pub fn tombstone(key: ConsumerKey) -> ConsumerRecord {
        match key {
            ConsumerKey::Metadata => ConsumerRecord::Metadata(None),
            ConsumerKey::PartitionMetadata => ConsumerRecord::PartitionMetadata,
            ConsumerKey::Member(m) => ConsumerRecord::Member(m, None),
            ConsumerKey::TargetMetadata => ConsumerRecord::TargetMetadata(None),
            ConsumerKey::TargetMember(m) => ConsumerRecord::TargetMember(m, None),
            ConsumerKey::Assignment(m) => ConsumerRecord::Assignment(m, None),
        }
    }

    /// The key this record is stored under.
    pub fn key(&self) -> ConsumerKey {
        match self {
            ConsumerRecord::Metadata(_) => ConsumerKey::Metadata,
            ConsumerRecord::PartitionMetadata => ConsumerKey::PartitionMetadata,
            ConsumerRecord::Member(m, _) => ConsumerKey::Member(m.clone()),
            ConsumerRecord::TargetMetadata(_) => ConsumerKey::TargetMetadata,
            ConsumerRecord::TargetMember(m, _) => ConsumerKey::TargetMember(m.clone()),
            ConsumerRecord::Assignment(m, _) => ConsumerKey::Assignment(m.clone()),
        }
    }

    /// The value's bytes; `None` for a tombstone.
    pub fn encode_value(&self) -> Option<Vec<u8>> {
        let mut w = Writer::default();
        w.i16(VALUE_VERSION);
        match self {
            ConsumerRecord::Metadata(Some(v)) => {
                w.i32(v.epoch);
                // One tagged field: tag 0, 8 bytes.
                w.uvarint(1);
                w.uvarint(0);
                w.uvarint(8);
                w.i64(v.metadata_hash);
            }
            ConsumerRecord::Member(_, Some(v)) => {
                w.compact_nullable_string(v.instance_id.as_deref());
                w.compact_nullable_string(v.rack_id.as_deref());
                w.compact_string(&v.client_id);
                w.compact_string(&v.client_host);
                w.compact_len(v.subscribed_topic_names.len());
                for t in &v.subscribed_topic_names {
                    w.compact_string(t);
                }
                w.compact_nullable_string(v.subscribed_topic_regex.as_deref());
                w.i32(v.rebalance_timeout_ms);
                w.compact_nullable_string(v.server_assignor.as_deref());
                w.uvarint(0);
            }
            ConsumerRecord::TargetMetadata(Some(epoch)) => {
                w.i32(*epoch);
                w.uvarint(0);
            }
            ConsumerRecord::TargetMember(_, Some(tps)) => {
                w.topic_partitions(tps);
                w.uvarint(0);
            }
            ConsumerRecord::Assignment(_, Some(v)) => {
                w.i32(v.member_epoch);
                w.i32(v.previous_member_epoch);
                w.buf.push(v.state as u8);
                w.topic_partitions(&v.assigned);
                w.topic_partitions(&v.revoking);
                w.uvarint(0);
            }
            _ => return None,
        }
        Some(w.buf)
    }
}

/// The flexible encodings (KIP-482) the consumer-group values use.
impl Writer {
    fn uvarint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }
    fn compact_len(&mut self, len: usize) {
        self.uvarint(len as u64 + 1);
    }
    fn compact_string(&mut self, s: &str) {
        // Kafka's strings are at most i16::MAX bytes: a longer one is cut at a char boundary.
        let mut end = s.len().min(i16::MAX as usize);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.compact_len(end);
        self.buf.extend_from_slice(&s.as_bytes()[..end]);
    }
    fn compact_nullable_string(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.compact_string(s),
            None => self.uvarint(0),
        }
    }
    fn topic_partitions(&mut self, tps: &TopicPartitions) {
        self.compact_len(tps.len());
        for (id, ps) in tps {
            self.buf.extend_from_slice(id.as_bytes());
            self.compact_len(ps.len());
            for p in ps {
                self.i32(*p);
            }
            self.uvarint(0);
        }
    }
}

impl<'a> Reader<'a> {
    fn uvarint(&mut self) -> Result<u64, DecodeError> {
        let mut v: u64 = 0;
        for i in 0..5 {
            let b = self.take(1)?[0];
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::InvalidLength(-1))
    }
    /// A compact length (stored + 1); None for null. Each element takes at least `min_bytes`,
    /// so a length the remaining bytes cannot hold is refused before anything is allocated.
    fn compact_nullable_len(&mut self, min_bytes: usize) -> Result<Option<usize>, DecodeError> {
        let n = self.uvarint()?;
        if n == 0 {
            return Ok(None);
        }
        let len = usize::try_from(n - 1).map_err(|_| DecodeError::InvalidLength(-1))?;
        if len.saturating_mul(min_bytes.max(1)) > self.remaining() {
            return Err(DecodeError::Truncated);
        }
        Ok(Some(len))
    }
    fn compact_array_len(&mut self, min_bytes: usize) -> Result<usize, DecodeError> {
        self.compact_nullable_len(min_bytes)?
            .ok_or(DecodeError::InvalidLength(-1))
    }
    fn compact_nullable_string(&mut self) -> Result<Option<String>, DecodeError> {
        let Some(len) = self.compact_nullable_len(1)? else {
            return Ok(None);
        };
        let raw = self.take(len)?;
        let s = std::str::from_utf8(raw).map_err(|_| DecodeError::InvalidUtf8)?;
        Ok(Some(s.to_owned()))
    }
    fn compact_string(&mut self) -> Result<String, DecodeError> {
        self.compact_nullable_string()?
            .ok_or(DecodeError::InvalidLength(-1))
    }
    fn i8(&mut self) -> Result<i8, DecodeError> {
        Ok(self.take(1)?[0] as i8)
    }
    fn topic_partitions(&mut self) -> Result<TopicPartitions, DecodeError> {
        let n = self.compact_array_len(TOPIC_PARTITIONS_BYTES_MIN)?;
        let mut out = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            let mut id = [0u8; 16];
            id.copy_from_slice(self.take(16)?);
            let k = self.compact_array_len(4)?;
            let mut ps = Vec::with_capacity(k);
            for _ in 0..k {
                ps.push(self.i32()?);
            }
            // Tag 0 (KIP-1251 assignment epochs) is not used by Fjord.
            self.tagged_fields(|_, _| Ok(()))?;
            out.push((Uuid::from_bytes(id), ps));
        }
        Ok(out)
    }
    /// Reads a tagged-field section, handing each field's bytes to `f`.
    fn tagged_fields(
        &mut self,
        mut f: impl FnMut(u64, Reader<'a>) -> Result<(), DecodeError>,
    ) -> Result<(), DecodeError> {
        let n = self.uvarint()?;
        for _ in 0..n {
            let tag = self.uvarint()?;
            let size = usize::try_from(self.uvarint()?).map_err(|_| DecodeError::Truncated)?;
            f(tag, Reader::new(self.take(size)?))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::records::{OffsetsKey, OffsetsRecord};
    use super::*;

    fn round_trip(group: &str, rec: ConsumerRecord) {
        let key = OffsetsKey::Consumer {
            group: group.into(),
            kind: rec.key(),
        }
        .encode();
        let value = rec.encode_value();
        let back = OffsetsRecord::decode(&key, value.as_deref()).unwrap();
        assert_eq!(
            back,
            OffsetsRecord::Consumer {
                group: group.into(),
                record: rec
            }
        );
    }

    fn id(n: u8) -> Uuid {
        Uuid::from_bytes([n; 16])
    }

    #[test]
    fn every_record_round_trips_with_its_tombstone() {
        let member = MemberValue {
            instance_id: Some("i-1".into()),
            rack_id: None,
            client_id: "rdkafka".into(),
            client_host: "/127.0.0.1".into(),
            subscribed_topic_names: vec!["a".into(), "b".into()],
            subscribed_topic_regex: Some("^t.*".into()),
            rebalance_timeout_ms: 300_000,
            server_assignor: Some("uniform".into()),
        };
        let assignment = AssignmentValue {
            member_epoch: 7,
            previous_member_epoch: 6,
            state: 1,
            assigned: vec![(id(1), vec![0, 2]), (id(2), vec![])],
            revoking: vec![(id(3), vec![5])],
        };
        for rec in [
            ConsumerRecord::Metadata(Some(GroupEpochValue {
                epoch: 9,
                metadata_hash: -42,
            })),
            ConsumerRecord::Metadata(None),
            ConsumerRecord::Member("m-1".into(), Some(member)),
            ConsumerRecord::Member("m-1".into(), None),
            ConsumerRecord::TargetMetadata(Some(9)),
            ConsumerRecord::TargetMetadata(None),
            ConsumerRecord::TargetMember("m-1".into(), Some(vec![(id(1), vec![0, 1, 2])])),
            ConsumerRecord::TargetMember("m-1".into(), None),
            ConsumerRecord::Assignment("m-1".into(), Some(assignment)),
            ConsumerRecord::Assignment("m-1".into(), None),
        ] {
            round_trip("g", rec);
        }
    }

    #[test]
    fn layout_matches_kafka() {
        // ConsumerGroupMetadataKey: version 3, group as a classic string.
        let key = OffsetsKey::Consumer {
            group: "g".into(),
            kind: ConsumerKey::Member("m".into()),
        }
        .encode();
        assert_eq!(key, b"\x00\x05\x00\x01g\x00\x01m");
        // TargetAssignmentMetadataValue v0: epoch, empty tag section.
        let v = ConsumerRecord::TargetMetadata(Some(3))
            .encode_value()
            .unwrap();
        assert_eq!(v, b"\x00\x00\x00\x00\x00\x03\x00");
        // Unknown tagged fields are skipped.
        let mut v = ConsumerRecord::TargetMetadata(Some(3))
            .encode_value()
            .unwrap();
        v.pop();
        v.extend_from_slice(b"\x01\x05\x02\xab\xcd");
        let rec = ConsumerRecord::decode(ConsumerKey::TargetMetadata, Some(&v)).unwrap();
        assert_eq!(rec, ConsumerRecord::TargetMetadata(Some(3)));
    }

    #[test]
    fn hostile_lengths_are_refused_without_allocating() {
        // A compact array claiming 2^31 topics in a few bytes.
        let v = b"\x00\x00\xff\xff\xff\xff\x07\x00";
        assert!(ConsumerRecord::decode(ConsumerKey::TargetMember("m".into()), Some(v)).is_err());
        // Every truncation of a valid value fails cleanly.
        let full = ConsumerRecord::Assignment(
            "m".into(),
            Some(AssignmentValue {
                member_epoch: 1,
                previous_member_epoch: 0,
                state: 0,
                assigned: vec![(id(1), vec![0, 1])],
                revoking: vec![],
            }),
        )
        .encode_value()
        .unwrap();
        for cut in 0..full.len() {
            assert!(ConsumerRecord::decode(
                ConsumerKey::Assignment("m".into()),
                Some(&full[..cut])
            )
            .is_err());
        }
    }
}
