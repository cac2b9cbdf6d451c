//! RecordBatch v2 header access and validation. Batches stay the producer's bytes: we read the
//! header in place and never decode records here.

use bytes::Bytes;

pub const HEADER_BYTES: usize = 61;
/// baseOffset (8) + batchLength (4): the part of the header not counted in batchLength.
pub const LOG_OVERHEAD: usize = 12;
const MAGIC_OFFSET: usize = 16;
const CRC_OFFSET: usize = 17;
const ATTRIBUTES_OFFSET: usize = 21;
pub const CRC_START: usize = ATTRIBUTES_OFFSET;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("record batch is truncated")]
    Truncated,
    #[error("record batch has magic {0}, only magic 2 is supported")]
    UnsupportedMagic(i8),
    #[error("record batch CRC mismatch")]
    CorruptCrc,
    #[error("record batch is malformed: {0}")]
    Malformed(&'static str),
    #[error("record batch of {0} bytes exceeds max.message.bytes")]
    TooLarge(usize),
}

/// A read-only view of the fixed header of one batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchHeader<'a>(&'a [u8]);

fn be_i64(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(a)
}
fn be_i32(b: &[u8], at: usize) -> i32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    i32::from_be_bytes(a)
}
fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}

impl<'a> BatchHeader<'a> {
    /// The caller guarantees `b.len() >= HEADER_BYTES`.
    pub fn new(b: &'a [u8]) -> Self {
        debug_assert!(b.len() >= HEADER_BYTES);
        BatchHeader(b)
    }
    pub fn base_offset(&self) -> i64 {
        be_i64(self.0, 0)
    }
    pub fn batch_length(&self) -> i32 {
        be_i32(self.0, 8)
    }
    /// Total bytes of the batch including the 12-byte log overhead.
    pub fn total_bytes(&self) -> usize {
        self.batch_length().max(0) as usize + LOG_OVERHEAD
    }
    /// The epoch of the leader that appended the batch (-1 before a broker stamped it).
    pub fn partition_leader_epoch(&self) -> i32 {
        be_i32(self.0, 12)
    }
    pub fn magic(&self) -> i8 {
        self.0[MAGIC_OFFSET] as i8
    }
    pub fn crc(&self) -> u32 {
        be_i32(self.0, CRC_OFFSET) as u32
    }
    pub fn attributes(&self) -> i16 {
        be_i16(self.0, ATTRIBUTES_OFFSET)
    }
    pub fn compression(&self) -> i16 {
        self.attributes() & 0x7
    }
    pub fn is_log_append_time(&self) -> bool {
        self.attributes() & 0x8 != 0
    }
    pub fn is_transactional(&self) -> bool {
        self.attributes() & 0x10 != 0
    }
    pub fn is_control(&self) -> bool {
        self.attributes() & 0x20 != 0
    }
    pub fn last_offset_delta(&self) -> i32 {
        be_i32(self.0, 23)
    }
    pub fn base_timestamp(&self) -> i64 {
        be_i64(self.0, 27)
    }
    pub fn max_timestamp(&self) -> i64 {
        be_i64(self.0, 35)
    }
    pub fn producer_id(&self) -> i64 {
        be_i64(self.0, 43)
    }
    pub fn producer_epoch(&self) -> i16 {
        be_i16(self.0, 51)
    }
    pub fn base_sequence(&self) -> i32 {
        be_i32(self.0, 53)
    }
    pub fn records_count(&self) -> i32 {
        be_i32(self.0, 57)
    }
    pub fn last_sequence(&self) -> i32 {
        let base = self.base_sequence();
        if base < 0 {
            return -1;
        }
        // Sequences wrap at i32::MAX back to 0, as in Kafka.
        let last = base as i64 + self.last_offset_delta() as i64;
        (last % (i32::MAX as i64 + 1)) as i32
    }
}

/// Summary of one validated batch inside a produce payload.
#[derive(Debug, Clone, Copy)]
pub struct BatchInfo {
    /// Byte position of the batch within the payload.
    pub pos: usize,
    pub len: usize,
    pub last_offset_delta: i32,
    pub records_count: i32,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub last_sequence: i32,
    pub is_transactional: bool,
    pub is_control: bool,
    /// The partitionLeaderEpoch field as received: meaningful in batches a leader sends its
    /// followers, ignored in a producer's.
    pub leader_epoch: i32,
}

pub fn crc_of(batch: &[u8]) -> u32 {
    crc32c::crc32c(&batch[CRC_START..])
}

/// Validates every batch of a produce payload (length, magic 2, CRC32C, header sanity) without
/// touching the records. `max_batch_bytes` is the topic's max.message.bytes.
pub fn validate_payload(
    payload: &[u8],
    max_batch_bytes: usize,
    out: &mut Vec<BatchInfo>,
) -> Result<(), BatchError> {
    let mut pos = 0usize;
    // A payload holds at most payload.len()/HEADER_BYTES batches: the loop is bounded.
    while pos < payload.len() {
        let rest = &payload[pos..];
        if rest.len() < HEADER_BYTES {
            return Err(BatchError::Truncated);
        }
        let h = BatchHeader::new(rest);
        let blen = h.batch_length();
        if blen < (HEADER_BYTES - LOG_OVERHEAD) as i32 {
            return Err(BatchError::Malformed("batch length smaller than header"));
        }
        let total = h.total_bytes();
        if total > rest.len() {
            return Err(BatchError::Truncated);
        }
        if h.magic() != 2 {
            return Err(BatchError::UnsupportedMagic(h.magic()));
        }
        if total > max_batch_bytes {
            return Err(BatchError::TooLarge(total));
        }
        let batch = &rest[..total];
        if crc_of(batch) != h.crc() {
            return Err(BatchError::CorruptCrc);
        }
        if h.last_offset_delta() < 0 || h.records_count() < 0 {
            return Err(BatchError::Malformed("negative record count"));
        }
        if h.compression() > 4 {
            return Err(BatchError::Malformed("unknown compression codec"));
        }
        out.push(BatchInfo {
            pos,
            len: total,
            last_offset_delta: h.last_offset_delta(),
            records_count: h.records_count(),
            max_timestamp: h.max_timestamp(),
            producer_id: h.producer_id(),
            producer_epoch: h.producer_epoch(),
            base_sequence: h.base_sequence(),
            last_sequence: h.last_sequence(),
            is_transactional: h.is_transactional(),
            is_control: h.is_control(),
            leader_epoch: h.partition_leader_epoch(),
        });
        pos += total;
    }
    if out.is_empty() {
        return Err(BatchError::Malformed("empty record set"));
    }
    Ok(())
}

/// Writes the broker-assigned fields into a batch header copy. Both lie before the CRC'd range,
/// so the CRC stays valid.
pub fn patch_header(batch: &mut [u8], base_offset: i64, leader_epoch: i32) {
    batch[0..8].copy_from_slice(&base_offset.to_be_bytes());
    batch[12..16].copy_from_slice(&leader_epoch.to_be_bytes());
}

/// For topics with message.timestamp.type=LogAppendTime: set the timestamp type bit and
/// maxTimestamp, then recompute the CRC (the records themselves are untouched).
pub fn set_log_append_time(batch: &mut [u8], now_ms: i64) {
    let attrs = be_i16(batch, ATTRIBUTES_OFFSET) | 0x8;
    batch[ATTRIBUTES_OFFSET..ATTRIBUTES_OFFSET + 2].copy_from_slice(&attrs.to_be_bytes());
    batch[35..43].copy_from_slice(&now_ms.to_be_bytes());
    let crc = crc_of(batch);
    batch[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
}

/// A stored batch as the cache keeps it: the producer's bytes plus what the broker assigned.
#[derive(Debug, Clone)]
pub struct StoredBatch {
    pub base_offset: u64,
    pub last_offset: u64,
    pub max_timestamp: i64,
    /// The epoch of the leader that appended it (served in place of the producer's bytes).
    pub leader_epoch: i32,
    /// The batch as produced (header fields not yet patched) or as read back (patched).
    pub bytes: Bytes,
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// Builds a minimal, valid uncompressed batch with `n` empty-value records.
    pub fn make_batch(n: i32, ts: i64) -> Vec<u8> {
        let mut records = Vec::new();
        for i in 0..n {
            // record: length varint, attributes, tsDelta, offsetDelta, keyLen(-1), valueLen(1) 'x', headers 0
            let body = [0u8, 0, (i as u8) << 1, 1, 2, b'x', 0];
            records.push((body.len() as u8) << 1);
            records.extend_from_slice(&body);
        }
        let mut b = vec![0u8; HEADER_BYTES];
        b.extend_from_slice(&records);
        let len = (b.len() - LOG_OVERHEAD) as i32;
        b[8..12].copy_from_slice(&len.to_be_bytes());
        b[16] = 2;
        b[23..27].copy_from_slice(&(n - 1).to_be_bytes());
        b[27..35].copy_from_slice(&ts.to_be_bytes());
        b[35..43].copy_from_slice(&ts.to_be_bytes());
        b[43..51].copy_from_slice(&(-1i64).to_be_bytes());
        b[51..53].copy_from_slice(&(-1i16).to_be_bytes());
        b[53..57].copy_from_slice(&(-1i32).to_be_bytes());
        b[57..61].copy_from_slice(&n.to_be_bytes());
        let crc = crc_of(&b);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        b
    }

    #[test]
    fn validates_and_rejects_corruption() {
        let b = make_batch(3, 1000);
        let mut out = Vec::new();
        validate_payload(&b, 1 << 20, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].last_offset_delta, 2);
        let mut bad = b.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        out.clear();
        assert_eq!(
            validate_payload(&bad, 1 << 20, &mut out),
            Err(BatchError::CorruptCrc)
        );
        out.clear();
        assert_eq!(
            validate_payload(&b[..40], 1 << 20, &mut out),
            Err(BatchError::Truncated)
        );
        out.clear();
        assert!(matches!(
            validate_payload(&b, 10, &mut out),
            Err(BatchError::TooLarge(_))
        ));
    }

    #[test]
    fn patch_keeps_crc_valid() {
        let mut b = make_batch(2, 5);
        patch_header(&mut b, 42, 7);
        let h = BatchHeader::new(&b);
        assert_eq!(h.base_offset(), 42);
        assert_eq!(crc_of(&b), h.crc());
        set_log_append_time(&mut b, 99);
        let h = BatchHeader::new(&b);
        assert!(h.is_log_append_time());
        assert_eq!(h.max_timestamp(), 99);
        assert_eq!(crc_of(&b), h.crc());
    }
}
