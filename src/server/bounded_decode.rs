//! Request decoding that a frame cannot make allocate more than its own size.
//!
//! kafka-protocol 0.18 decodes an array by reading its element count (an i32, or an unsigned
//! varint in flexible versions) and calling `Vec::with_capacity(count)` before it decodes a
//! single element. The count comes from the wire: a 14-byte Metadata body can ask for 13 GB.
//!
//! The fix, without a schema of our own: decode each frame first through `ProbeBuf`, a buffer
//! that serves the frame's bytes with two checks, so that in the probe no array can be
//! preallocated beyond what the frame can hold:
//! - every unsigned varint (kafka-protocol reads them, and booleans, a byte at a time through
//!   `try_get_u8`) larger than the bytes left after it plus `SLACK` fails the read. In request
//!   schemas a varint is a compact length or count (which must fit in the frame), a tagged-field
//!   count or size (same), or a tag number (small). Every `try_get_u8` position is checked as if
//!   a varint started there, so no state can be fooled about where one starts; a varint's tail is
//!   never larger than the varint, so valid frames pass.
//! - every i32 larger than the bytes left after it plus `SLACK` is served as that bound instead
//!   (a "clamp"): an i32 is either a count (array, bytes length) or a plain field (a timeout,
//!   max_bytes), and plain fields are routinely larger than the frame.
//!
//! What the probe proves: a plain field's value does not steer decoding, so the probe takes
//! the same path as the real decode. A clamped array count asks for more elements than there
//! are bytes left, and every element of every request schema takes at least one byte, so the
//! probe fails; a clamped bytes length fails too (the real one would have as well). Hence:
//! - the probe fails: the frame is malformed, refused without a real decode;
//! - the probe succeeds with no clamp: its result is the request;
//! - the probe succeeds with clamps: they were all plain fields, the real decode follows the
//!   same path, and every count in it is within the bound; it runs and gives the exact values.
//!
//! Refused although valid, in theory: a tag number above the bytes after it plus `SLACK`
//! (Kafka's tags are single digits), a boolean encoded as a byte >= 0x80 followed by bytes that
//! read as a large varint (clients write 0 or 1), a varint padded past 32 bits.

use bytes::{Buf, Bytes};
use kafka_protocol::messages::{ApiKey, RequestKind};
use kafka_protocol::protocol::buf::ByteBuf;
use kafka_protocol::protocol::Decodable;

/// Counts up to this many elements beyond the bytes left are let through: harmless (a few KiB
/// of capacity), and they keep small tag numbers near the end of a frame from being clamped.
const SLACK: u64 = 64;

/// A varint is at most 5 bytes for a u32 (kafka-protocol's UnsignedVarInt reads at most 5).
const VARINT_BYTES_MAX: usize = 5;

pub struct ProbeBuf {
    inner: Bytes,
    /// i32 values served clamped.
    pub clamps: usize,
}

impl ProbeBuf {
    pub fn new(body: Bytes) -> ProbeBuf {
        ProbeBuf {
            inner: body,
            clamps: 0,
        }
    }

    /// The varint at the start of `inner` as kafka-protocol reads it: (value, length).
    fn peek_varint(&self) -> (u64, usize) {
        let mut value = 0u64;
        let mut len = 0;
        for (i, b) in self.inner.iter().take(VARINT_BYTES_MAX).enumerate() {
            value |= ((b & 0x7f) as u64) << (i * 7);
            len = i + 1;
            if *b < 0x80 {
                break;
            }
        }
        (value, len)
    }
}

impl Buf for ProbeBuf {
    fn remaining(&self) -> usize {
        self.inner.remaining()
    }

    fn chunk(&self) -> &[u8] {
        self.inner.chunk()
    }

    fn advance(&mut self, cnt: usize) {
        self.inner.advance(cnt);
    }

    fn try_get_i32(&mut self) -> Result<i32, bytes::TryGetError> {
        let v = self.inner.try_get_i32()?;
        let bound = self.inner.remaining() as u64 + SLACK;
        if v > 0 && v as u64 > bound {
            self.clamps += 1;
            return Ok(bound.min(i32::MAX as u64) as i32);
        }
        Ok(v)
    }

    fn try_get_u8(&mut self) -> Result<u8, bytes::TryGetError> {
        let (value, len) = self.peek_varint();
        let available = self.inner.remaining();
        if len > 0 && value > (available - len) as u64 + SLACK {
            return Err(bytes::TryGetError {
                requested: usize::try_from(value).unwrap_or(usize::MAX),
                available,
            });
        }
        self.inner.try_get_u8()
    }
}

impl ByteBuf for ProbeBuf {
    fn peek_bytes(&mut self, r: std::ops::Range<usize>) -> Bytes {
        self.inner.slice(r)
    }

    fn get_bytes(&mut self, size: usize) -> Bytes {
        self.inner.split_to(size)
    }
}

macro_rules! probe_kinds {
    ($key:expr, $buf:expr, $version:expr, $($api:ident => $req:ident),* $(,)?) => {
        match $key {
            $(ApiKey::$api => Ok(RequestKind::$api(
                <kafka_protocol::messages::$req as Decodable>::decode($buf, $version)?,
            )),)*
            other => anyhow::bail!("{other:?} requests are not decoded here"),
        }
    };
}

/// `RequestKind::decode` (which takes only `Bytes`) through a probe, for the APIs the broker
/// answers (`server::supported_versions`; frames of any other API are refused before decoding).
pub fn probe_decode(key: ApiKey, buf: &mut ProbeBuf, version: i16) -> anyhow::Result<RequestKind> {
    probe_kinds!(key, buf, version,
        Produce => ProduceRequest,
        Fetch => FetchRequest,
        ListOffsets => ListOffsetsRequest,
        Metadata => MetadataRequest,
        ApiVersions => ApiVersionsRequest,
        CreateTopics => CreateTopicsRequest,
        DeleteTopics => DeleteTopicsRequest,
        CreatePartitions => CreatePartitionsRequest,
        DeleteRecords => DeleteRecordsRequest,
        DescribeConfigs => DescribeConfigsRequest,
        AlterConfigs => AlterConfigsRequest,
        IncrementalAlterConfigs => IncrementalAlterConfigsRequest,
        InitProducerId => InitProducerIdRequest,
        DescribeCluster => DescribeClusterRequest,
        OffsetForLeaderEpoch => OffsetForLeaderEpochRequest,
        FindCoordinator => FindCoordinatorRequest,
        JoinGroup => JoinGroupRequest,
        SyncGroup => SyncGroupRequest,
        Heartbeat => HeartbeatRequest,
        LeaveGroup => LeaveGroupRequest,
        OffsetCommit => OffsetCommitRequest,
        OffsetFetch => OffsetFetchRequest,
        ListGroups => ListGroupsRequest,
        DescribeGroups => DescribeGroupsRequest,
        DeleteGroups => DeleteGroupsRequest,
        OffsetDelete => OffsetDeleteRequest,
        ConsumerGroupHeartbeat => ConsumerGroupHeartbeatRequest,
        ConsumerGroupDescribe => ConsumerGroupDescribeRequest,
        DescribeQuorum => DescribeQuorumRequest,
        ElectLeaders => ElectLeadersRequest,
        DescribeLogDirs => DescribeLogDirsRequest,
        AlterPartitionReassignments => AlterPartitionReassignmentsRequest,
        ListPartitionReassignments => ListPartitionReassignmentsRequest,
        // The controller listener's (server::controller).
        BrokerRegistration => BrokerRegistrationRequest,
        BrokerHeartbeat => BrokerHeartbeatRequest,
        AllocateProducerIds => AllocateProducerIdsRequest,
        Envelope => EnvelopeRequest,
        AlterPartition => AlterPartitionRequest,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::FetchRequest;
    use kafka_protocol::protocol::Encodable;

    #[test]
    fn plain_fields_are_clamped_in_the_probe_only() {
        let mut req = FetchRequest::default();
        req.max_bytes = 52_428_800;
        req.max_wait_ms = 500;
        for version in [4i16, 12] {
            let mut b = bytes::BytesMut::new();
            req.encode(&mut b, version).unwrap();
            let body = b.freeze();
            let mut probe = ProbeBuf::new(body.clone());
            let got = FetchRequest::decode(&mut probe, version).expect("probe decodes");
            assert!(probe.clamps >= 1, "max_bytes is past the frame's end");
            assert!(got.max_bytes < 1000, "the probe saw the clamped value");
            let real = RequestKind::decode(ApiKey::Fetch, &mut body.clone(), version).unwrap();
            let RequestKind::Fetch(real) = real else {
                panic!("a fetch")
            };
            assert_eq!(real.max_bytes, 52_428_800);
        }
    }
}
