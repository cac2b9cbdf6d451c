//! Metadata log records and their binary encoding.
//!
//! One Raft entry carries one [`RecordBatch`]: the records of one controller decision, applied
//! together or not at all (fencing a broker and moving its leaderships is one change, as in
//! KRaft). The encoding is ours, compact and versioned:
//!
//! ```text
//! batch  := version:u8 count:uvarint record*count
//! record := tag:u8 fields…
//! ints   := zigzag varints (u64 values: plain uvarints); uuid := 16 bytes
//! string := len:uvarint utf8   option := 0 | 1 value   vec := count:uvarint item*count
//! ```
//!
//! Decoding trusts nothing: every length is checked against the bytes left and against a
//! limit, so garbage yields a [`DecodeError`], never a panic or a huge allocation. A reader
//! that meets a newer batch version refuses it rather than guess; adding a record kind means a
//! new tag, changing a record's fields means a new version.

use uuid::Uuid;

/// The version written by this build; decoding accepts exactly the versions it knows.
pub const BATCH_VERSION: u8 = 1;
/// A record batch never holds more records than this (a topic with this many partitions is
/// far beyond what one controller decision should carry).
pub const BATCH_RECORDS_MAX: u64 = 1_000_000;
/// Longest string field accepted (topic names are 249 bytes; config values are longer).
pub const STRING_BYTES_MAX: u64 = 1 << 20;
/// Longest list field accepted (replicas, ISR, listeners).
pub const LIST_ITEMS_MAX: u64 = 1 << 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("metadata record truncated at byte {0}")]
    Truncated(usize),
    #[error("metadata batch version {0} is not known to this build (knows {BATCH_VERSION})")]
    UnknownVersion(u8),
    #[error("unknown metadata record tag {0}")]
    UnknownTag(u8),
    #[error("varint longer than 10 bytes at byte {0}")]
    VarintOverflow(usize),
    #[error("length {0} above the limit at byte {1}")]
    TooLong(u64, usize),
    #[error("string is not UTF-8 at byte {0}")]
    BadUtf8(usize),
    #[error("flag byte {0} is neither 0 nor 1 at byte {1}")]
    BadFlag(u8, usize),
    #[error("value out of range at byte {0}")]
    OutOfRange(usize),
    #[error("{0} bytes left over after the batch")]
    TrailingBytes(usize),
}

/// One listener a broker advertises (Kafka's BrokerRegistration `Listeners`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub name: String,
    pub host: String,
    pub port: u16,
}

/// A broker's registration as the metadata log keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerRegistration {
    pub broker_id: i32,
    /// Random per process start: tells a restart (or a duplicate) from a retry.
    pub incarnation_id: Uuid,
    /// KIP-858 directory id of the broker's data dir: the same id means the same disk.
    pub directory_id: Uuid,
    /// The log offset of the registration, as in KRaft: strictly grows per broker id.
    pub broker_epoch: i64,
    pub listeners: Vec<Listener>,
    pub rack: Option<String>,
    pub fenced: bool,
}

/// A partition's full state; applying one replaces the previous state of that partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionRecord {
    pub topic_id: Uuid,
    pub partition: i32,
    pub replicas: Vec<i32>,
    pub isr: Vec<i32>,
    /// [`NO_LEADER`] when no in-sync replica is eligible.
    pub leader: i32,
    pub leader_epoch: i32,
    pub partition_epoch: i32,
    /// KIP-455 reassignment in progress: replicas joining (target minus original) and leaving
    /// (original minus target); both empty otherwise. `replicas` holds both during the move.
    pub adding: Vec<i32>,
    pub removing: Vec<i32>,
}

impl PartitionRecord {
    pub fn reassigning(&self) -> bool {
        !self.adding.is_empty() || !self.removing.is_empty()
    }

    /// The replicas the partition had before its reassignment (all of them when none runs).
    pub fn original_replicas(&self) -> Vec<i32> {
        self.replicas
            .iter()
            .copied()
            .filter(|r| !self.adding.contains(r))
            .collect()
    }

    /// The replicas the partition will have once its reassignment completes.
    pub fn target_replicas(&self) -> Vec<i32> {
        self.replicas
            .iter()
            .copied()
            .filter(|r| !self.removing.contains(r))
            .collect()
    }
}

/// Kafka's "no leader" broker id.
pub const NO_LEADER: i32 = -1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataRecord {
    /// Written once, by the first leader of a new quorum.
    ClusterId {
        cluster_id: Uuid,
    },
    RegisterBroker(BrokerRegistration),
    FenceBroker {
        broker_id: i32,
        broker_epoch: i64,
    },
    UnfenceBroker {
        broker_id: i32,
        broker_epoch: i64,
    },
    Topic {
        name: String,
        topic_id: Uuid,
    },
    Partition(PartitionRecord),
    /// `value: None` removes the override.
    TopicConfig {
        topic_id: Uuid,
        name: String,
        value: Option<String>,
    },
    /// Producer ids below `next_producer_id` are handed out (KIP-730's ProducerIdsRecord).
    ProducerIds {
        broker_id: i32,
        broker_epoch: i64,
        next_producer_id: i64,
    },
    RemoveTopic {
        topic_id: Uuid,
    },
    /// A dynamic broker config (Kafka's `kafka-configs --entity-type brokers`): of one broker,
    /// or of every broker with `broker_id` [`ALL_BROKERS`]. `value: None` removes it.
    BrokerConfig {
        broker_id: i32,
        name: String,
        value: Option<String>,
    },
}

/// The broker id of a cluster-wide dynamic broker config (Kafka's `--entity-default`).
pub const ALL_BROKERS: i32 = -1;

const TAG_CLUSTER_ID: u8 = 1;
const TAG_REGISTER_BROKER: u8 = 2;
const TAG_FENCE_BROKER: u8 = 3;
const TAG_UNFENCE_BROKER: u8 = 4;
const TAG_TOPIC: u8 = 5;
const TAG_PARTITION: u8 = 6;
const TAG_TOPIC_CONFIG: u8 = 7;
const TAG_PRODUCER_IDS: u8 = 8;
const TAG_REMOVE_TOPIC: u8 = 9;
/// A partition under reassignment: TAG_PARTITION's fields, then adding and removing replicas.
/// Partitions without one keep TAG_PARTITION, which earlier versions read.
const TAG_PARTITION_REASSIGNING: u8 = 10;
const TAG_BROKER_CONFIG: u8 = 11;

/// The records of one controller decision, encoded as one Raft entry.
pub type RecordBatch = Vec<MetadataRecord>;

pub fn encode_batch(records: &[MetadataRecord]) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(16 + 48 * records.len()));
    w.u8(BATCH_VERSION);
    w.uvarint(records.len() as u64);
    for r in records {
        w.record(r);
    }
    w.0
}

pub fn decode_batch(bytes: &[u8]) -> Result<RecordBatch, DecodeError> {
    let mut r = Reader { buf: bytes, pos: 0 };
    let version = r.u8()?;
    if version != BATCH_VERSION {
        return Err(DecodeError::UnknownVersion(version));
    }
    let count = r.len(BATCH_RECORDS_MAX)?;
    // Each record takes at least two bytes: cap the reservation by what the input can hold.
    let mut out = Vec::with_capacity(count.min(r.left() / 2));
    for _ in 0..count {
        out.push(r.record()?);
    }
    if r.left() != 0 {
        return Err(DecodeError::TrailingBytes(r.left()));
    }
    Ok(out)
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn uvarint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn varint(&mut self, v: i64) {
        self.uvarint(((v << 1) ^ (v >> 63)) as u64);
    }
    fn uuid(&mut self, id: &Uuid) {
        self.0.extend_from_slice(id.as_bytes());
    }
    fn str(&mut self, s: &str) {
        self.uvarint(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }
    fn opt_str(&mut self, s: &Option<String>) {
        match s {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
        }
    }
    fn ids(&mut self, ids: &[i32]) {
        self.uvarint(ids.len() as u64);
        for id in ids {
            self.varint(*id as i64);
        }
    }
    fn record(&mut self, r: &MetadataRecord) {
        match r {
            MetadataRecord::ClusterId { cluster_id } => {
                self.u8(TAG_CLUSTER_ID);
                self.uuid(cluster_id);
            }
            MetadataRecord::RegisterBroker(b) => {
                self.u8(TAG_REGISTER_BROKER);
                self.varint(b.broker_id as i64);
                self.uuid(&b.incarnation_id);
                self.uuid(&b.directory_id);
                self.varint(b.broker_epoch);
                self.uvarint(b.listeners.len() as u64);
                for l in &b.listeners {
                    self.str(&l.name);
                    self.str(&l.host);
                    self.uvarint(l.port as u64);
                }
                self.opt_str(&b.rack);
                self.u8(b.fenced as u8);
            }
            MetadataRecord::FenceBroker {
                broker_id,
                broker_epoch,
            } => {
                self.u8(TAG_FENCE_BROKER);
                self.varint(*broker_id as i64);
                self.varint(*broker_epoch);
            }
            MetadataRecord::UnfenceBroker {
                broker_id,
                broker_epoch,
            } => {
                self.u8(TAG_UNFENCE_BROKER);
                self.varint(*broker_id as i64);
                self.varint(*broker_epoch);
            }
            MetadataRecord::Topic { name, topic_id } => {
                self.u8(TAG_TOPIC);
                self.str(name);
                self.uuid(topic_id);
            }
            MetadataRecord::Partition(p) => {
                self.u8(if p.reassigning() {
                    TAG_PARTITION_REASSIGNING
                } else {
                    TAG_PARTITION
                });
                self.uuid(&p.topic_id);
                self.varint(p.partition as i64);
                self.ids(&p.replicas);
                self.ids(&p.isr);
                self.varint(p.leader as i64);
                self.varint(p.leader_epoch as i64);
                self.varint(p.partition_epoch as i64);
                if p.reassigning() {
                    self.ids(&p.adding);
                    self.ids(&p.removing);
                }
            }
            MetadataRecord::TopicConfig {
                topic_id,
                name,
                value,
            } => {
                self.u8(TAG_TOPIC_CONFIG);
                self.uuid(topic_id);
                self.str(name);
                self.opt_str(value);
            }
            MetadataRecord::ProducerIds {
                broker_id,
                broker_epoch,
                next_producer_id,
            } => {
                self.u8(TAG_PRODUCER_IDS);
                self.varint(*broker_id as i64);
                self.varint(*broker_epoch);
                self.varint(*next_producer_id);
            }
            MetadataRecord::RemoveTopic { topic_id } => {
                self.u8(TAG_REMOVE_TOPIC);
                self.uuid(topic_id);
            }
            MetadataRecord::BrokerConfig {
                broker_id,
                name,
                value,
            } => {
                self.u8(TAG_BROKER_CONFIG);
                self.varint(*broker_id as i64);
                self.str(name);
                self.opt_str(value);
            }
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.left() < n {
            return Err(DecodeError::Truncated(self.pos));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn uvarint(&mut self) -> Result<u64, DecodeError> {
        let start = self.pos;
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::VarintOverflow(start))
    }
    fn varint(&mut self) -> Result<i64, DecodeError> {
        let u = self.uvarint()?;
        Ok(((u >> 1) as i64) ^ -((u & 1) as i64))
    }
    fn i32(&mut self) -> Result<i32, DecodeError> {
        let at = self.pos;
        i32::try_from(self.varint()?).map_err(|_| DecodeError::OutOfRange(at))
    }
    /// A count or byte length, bounded by `max` and by the bytes left (every item takes at
    /// least one byte), so a lying length cannot make us allocate.
    fn len(&mut self, max: u64) -> Result<usize, DecodeError> {
        let at = self.pos;
        let n = self.uvarint()?;
        if n > max || n > self.left() as u64 {
            return Err(DecodeError::TooLong(n, at));
        }
        Ok(n as usize)
    }
    fn flag(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(DecodeError::BadFlag(b, self.pos - 1)),
        }
    }
    fn uuid(&mut self) -> Result<Uuid, DecodeError> {
        let b = self.take(16)?;
        let mut a = [0u8; 16];
        a.copy_from_slice(b);
        Ok(Uuid::from_bytes(a))
    }
    fn str(&mut self) -> Result<String, DecodeError> {
        let n = self.len(STRING_BYTES_MAX)?;
        let at = self.pos;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::BadUtf8(at))
    }
    fn opt_str(&mut self) -> Result<Option<String>, DecodeError> {
        Ok(if self.flag()? {
            Some(self.str()?)
        } else {
            None
        })
    }
    fn ids(&mut self) -> Result<Vec<i32>, DecodeError> {
        let n = self.len(LIST_ITEMS_MAX)?;
        (0..n).map(|_| self.i32()).collect()
    }
    fn record(&mut self) -> Result<MetadataRecord, DecodeError> {
        let tag = self.u8()?;
        Ok(match tag {
            TAG_CLUSTER_ID => MetadataRecord::ClusterId {
                cluster_id: self.uuid()?,
            },
            TAG_REGISTER_BROKER => {
                let broker_id = self.i32()?;
                let incarnation_id = self.uuid()?;
                let directory_id = self.uuid()?;
                let broker_epoch = self.varint()?;
                let n = self.len(LIST_ITEMS_MAX)?;
                let mut listeners = Vec::with_capacity(n);
                for _ in 0..n {
                    let name = self.str()?;
                    let host = self.str()?;
                    let at = self.pos;
                    let port =
                        u16::try_from(self.uvarint()?).map_err(|_| DecodeError::OutOfRange(at))?;
                    listeners.push(Listener { name, host, port });
                }
                MetadataRecord::RegisterBroker(BrokerRegistration {
                    broker_id,
                    incarnation_id,
                    directory_id,
                    broker_epoch,
                    listeners,
                    rack: self.opt_str()?,
                    fenced: self.flag()?,
                })
            }
            TAG_FENCE_BROKER => MetadataRecord::FenceBroker {
                broker_id: self.i32()?,
                broker_epoch: self.varint()?,
            },
            TAG_UNFENCE_BROKER => MetadataRecord::UnfenceBroker {
                broker_id: self.i32()?,
                broker_epoch: self.varint()?,
            },
            TAG_TOPIC => MetadataRecord::Topic {
                name: self.str()?,
                topic_id: self.uuid()?,
            },
            TAG_PARTITION | TAG_PARTITION_REASSIGNING => {
                let mut p = PartitionRecord {
                    topic_id: self.uuid()?,
                    partition: self.i32()?,
                    replicas: self.ids()?,
                    isr: self.ids()?,
                    leader: self.i32()?,
                    leader_epoch: self.i32()?,
                    partition_epoch: self.i32()?,
                    adding: Vec::new(),
                    removing: Vec::new(),
                };
                if tag == TAG_PARTITION_REASSIGNING {
                    p.adding = self.ids()?;
                    p.removing = self.ids()?;
                }
                MetadataRecord::Partition(p)
            }
            TAG_TOPIC_CONFIG => MetadataRecord::TopicConfig {
                topic_id: self.uuid()?,
                name: self.str()?,
                value: self.opt_str()?,
            },
            TAG_PRODUCER_IDS => MetadataRecord::ProducerIds {
                broker_id: self.i32()?,
                broker_epoch: self.varint()?,
                next_producer_id: self.varint()?,
            },
            TAG_REMOVE_TOPIC => MetadataRecord::RemoveTopic {
                topic_id: self.uuid()?,
            },
            TAG_BROKER_CONFIG => MetadataRecord::BrokerConfig {
                broker_id: self.i32()?,
                name: self.str()?,
                value: self.opt_str()?,
            },
            t => return Err(DecodeError::UnknownTag(t)),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn uuid(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    /// One record of every kind, with edge values where they matter.
    pub(crate) fn every_kind() -> Vec<MetadataRecord> {
        let t = uuid(7);
        vec![
            MetadataRecord::ClusterId {
                cluster_id: uuid(1),
            },
            MetadataRecord::RegisterBroker(BrokerRegistration {
                broker_id: 3,
                incarnation_id: uuid(2),
                directory_id: uuid(3),
                broker_epoch: 1 << 40,
                listeners: vec![
                    Listener {
                        name: "PLAINTEXT".into(),
                        host: "10.0.0.3".into(),
                        port: 9092,
                    },
                    Listener {
                        name: "CONTROLLER".into(),
                        host: "h".into(),
                        port: u16::MAX,
                    },
                ],
                rack: Some("rack-ä".into()),
                fenced: true,
            }),
            MetadataRecord::FenceBroker {
                broker_id: 3,
                broker_epoch: 12,
            },
            MetadataRecord::UnfenceBroker {
                broker_id: i32::MAX,
                broker_epoch: i64::MIN,
            },
            MetadataRecord::Topic {
                name: "orders".into(),
                topic_id: t,
            },
            MetadataRecord::Partition(PartitionRecord {
                topic_id: t,
                partition: 0,
                replicas: vec![1, 2, 3],
                isr: vec![3],
                leader: NO_LEADER,
                leader_epoch: 4,
                partition_epoch: i32::MIN,
                adding: Vec::new(),
                removing: Vec::new(),
            }),
            MetadataRecord::Partition(PartitionRecord {
                topic_id: t,
                partition: 1,
                replicas: vec![4, 5, 1, 2],
                isr: vec![1, 2, 4],
                leader: 1,
                leader_epoch: 0,
                partition_epoch: 7,
                adding: vec![4, 5],
                removing: vec![1],
            }),
            MetadataRecord::TopicConfig {
                topic_id: t,
                name: "retention.ms".into(),
                value: Some("1000".into()),
            },
            MetadataRecord::TopicConfig {
                topic_id: t,
                name: "cleanup.policy".into(),
                value: None,
            },
            MetadataRecord::ProducerIds {
                broker_id: 1,
                broker_epoch: 9,
                next_producer_id: 2000,
            },
            MetadataRecord::BrokerConfig {
                broker_id: 2,
                name: "leader.replication.throttled.rate".into(),
                value: Some("1048576".into()),
            },
            MetadataRecord::BrokerConfig {
                broker_id: ALL_BROKERS,
                name: "follower.replication.throttled.rate".into(),
                value: None,
            },
            MetadataRecord::RemoveTopic { topic_id: t },
        ]
    }

    #[test]
    fn every_record_round_trips() {
        let all = every_kind();
        let bytes = encode_batch(&all);
        assert_eq!(decode_batch(&bytes).unwrap(), all);
        for r in &all {
            let one = encode_batch(std::slice::from_ref(r));
            assert_eq!(decode_batch(&one).unwrap(), vec![r.clone()]);
        }
        assert_eq!(decode_batch(&encode_batch(&[])).unwrap(), vec![]);
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let bytes = encode_batch(&every_kind());
        for cut in 0..bytes.len() {
            assert!(decode_batch(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // Flip each byte through a few values: decoding may succeed (a changed number is still
        // a number) but must never panic.
        for i in 0..bytes.len() {
            for x in [0x01u8, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[i] ^= x;
                let _ = decode_batch(&b);
            }
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert_eq!(decode_batch(&extra), Err(DecodeError::TrailingBytes(1)));
        assert_eq!(decode_batch(&[2, 0]), Err(DecodeError::UnknownVersion(2)));
        assert_eq!(
            decode_batch(&[1, 1, 200]),
            Err(DecodeError::UnknownTag(200))
        );
        assert!(matches!(
            decode_batch(&[1, 0xff, 0xff, 0xff, 0xff, 0x0f]),
            Err(DecodeError::TooLong(..))
        ));
        assert!(matches!(
            decode_batch(&[1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Err(DecodeError::VarintOverflow(1))
        ));
    }

    #[test]
    fn random_garbage_never_panics() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for n in 0..20_000usize {
            let mut buf = vec![BATCH_VERSION];
            for _ in 0..(n % 64) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(x as u8);
            }
            let _ = decode_batch(&buf);
        }
    }
}
