//! The metadata image: what the committed metadata log says, applied in log order.
//!
//! Applying is deterministic and total: every node applies the same committed entries in the
//! same order and must reach the same image, so a record that does not fit the image (a fence
//! for a broker epoch that is gone, a partition of a deleted topic) is skipped the same way
//! everywhere and reported to the caller, never a panic. The controller rules make such records
//! rare: they are computed on the image the record will meet (see `node.rs`).
//!
//! A snapshot of the image is a record batch that rebuilds it from empty, behind a small header
//! naming the log position it stands for.

use std::collections::BTreeMap;

use uuid::Uuid;

use super::record::{
    decode_batch, encode_batch, BrokerRegistration, DecodeError, MetadataRecord, PartitionRecord,
    ALL_BROKERS, NO_LEADER,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicImage {
    pub name: String,
    pub topic_id: Uuid,
    pub partitions: BTreeMap<i32, PartitionRecord>,
    pub configs: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetadataImage {
    /// Raft index and term of the last entry applied (0, 0 for an empty log).
    pub applied_index: u64,
    pub applied_term: u64,
    pub cluster_id: Option<Uuid>,
    pub brokers: BTreeMap<i32, BrokerRegistration>,
    pub topics: BTreeMap<Uuid, TopicImage>,
    pub topic_ids: BTreeMap<String, Uuid>,
    /// Producer ids below this were handed out in blocks.
    pub next_producer_id: i64,
    /// Dynamic broker configs: broker id ([`ALL_BROKERS`] for every broker) → name → value.
    pub broker_configs: BTreeMap<i32, BTreeMap<String, String>>,
}

/// Why a committed record was skipped; every node skips it alike.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("cluster id is already {0}")]
    ClusterIdSet(Uuid),
    #[error("broker {0} with epoch {1} is not registered")]
    StaleBroker(i32, i64),
    #[error("topic {0} already exists")]
    TopicExists(String),
    #[error("topic id {0} is unknown")]
    UnknownTopic(Uuid),
    #[error("producer id block {0} does not follow {1}")]
    ProducerIdsBackwards(i64, i64),
}

pub const SNAPSHOT_VERSION: u8 = 1;

impl MetadataImage {
    pub fn topic_by_name(&self, name: &str) -> Option<&TopicImage> {
        self.topic_ids.get(name).and_then(|id| self.topics.get(id))
    }

    /// A dynamic broker config of `broker_id`: its own value, else the cluster-wide one.
    pub fn broker_config(&self, broker_id: i32, name: &str) -> Option<&str> {
        [broker_id, ALL_BROKERS]
            .iter()
            .find_map(|b| self.broker_configs.get(b)?.get(name))
            .map(String::as_str)
    }

    pub fn is_unfenced(&self, broker_id: i32) -> bool {
        self.brokers.get(&broker_id).is_some_and(|b| !b.fenced)
    }

    pub fn partitions(&self) -> impl Iterator<Item = &PartitionRecord> {
        self.topics.values().flat_map(|t| t.partitions.values())
    }

    /// Applies one committed entry's payload. Records that do not fit are skipped (and
    /// returned), the others applied; the image then stands at `index`.
    pub fn apply_entry(
        &mut self,
        index: u64,
        term: u64,
        data: &[u8],
    ) -> Result<Vec<ApplyError>, DecodeError> {
        // An empty entry is the one a new Raft leader appends: nothing to apply.
        let skipped = if data.is_empty() {
            Vec::new()
        } else {
            let batch = decode_batch(data);
            match batch {
                Ok(records) => self.apply_all(&records),
                Err(e) => {
                    // Still move to `index`: every node fails to decode it alike.
                    self.applied_index = index;
                    self.applied_term = term;
                    return Err(e);
                }
            }
        };
        self.applied_index = index;
        self.applied_term = term;
        Ok(skipped)
    }

    /// Applies records in order; returns those skipped.
    pub fn apply_all(&mut self, records: &[MetadataRecord]) -> Vec<ApplyError> {
        records.iter().filter_map(|r| self.apply(r).err()).collect()
    }

    pub fn apply(&mut self, record: &MetadataRecord) -> Result<(), ApplyError> {
        match record {
            MetadataRecord::ClusterId { cluster_id } => match self.cluster_id {
                Some(id) if id != *cluster_id => return Err(ApplyError::ClusterIdSet(id)),
                _ => self.cluster_id = Some(*cluster_id),
            },
            MetadataRecord::RegisterBroker(b) => {
                if let Some(old) = self.brokers.get(&b.broker_id) {
                    if old.broker_epoch >= b.broker_epoch {
                        return Err(ApplyError::StaleBroker(b.broker_id, b.broker_epoch));
                    }
                }
                self.brokers.insert(b.broker_id, b.clone());
            }
            MetadataRecord::FenceBroker {
                broker_id,
                broker_epoch,
            } => self.broker_mut(*broker_id, *broker_epoch)?.fenced = true,
            MetadataRecord::UnfenceBroker {
                broker_id,
                broker_epoch,
            } => self.broker_mut(*broker_id, *broker_epoch)?.fenced = false,
            MetadataRecord::Topic { name, topic_id } => {
                if self.topic_ids.contains_key(name) || self.topics.contains_key(topic_id) {
                    return Err(ApplyError::TopicExists(name.clone()));
                }
                self.topic_ids.insert(name.clone(), *topic_id);
                self.topics.insert(
                    *topic_id,
                    TopicImage {
                        name: name.clone(),
                        topic_id: *topic_id,
                        partitions: BTreeMap::new(),
                        configs: BTreeMap::new(),
                    },
                );
            }
            MetadataRecord::Partition(p) => {
                self.topic_mut(&p.topic_id)?
                    .partitions
                    .insert(p.partition, p.clone());
            }
            MetadataRecord::TopicConfig {
                topic_id,
                name,
                value,
            } => {
                let t = self.topic_mut(topic_id)?;
                match value {
                    Some(v) => t.configs.insert(name.clone(), v.clone()),
                    None => t.configs.remove(name),
                };
            }
            MetadataRecord::ProducerIds {
                next_producer_id, ..
            } => {
                if *next_producer_id <= self.next_producer_id {
                    return Err(ApplyError::ProducerIdsBackwards(
                        *next_producer_id,
                        self.next_producer_id,
                    ));
                }
                self.next_producer_id = *next_producer_id;
            }
            MetadataRecord::RemoveTopic { topic_id } => {
                let t = self
                    .topics
                    .remove(topic_id)
                    .ok_or(ApplyError::UnknownTopic(*topic_id))?;
                self.topic_ids.remove(&t.name);
            }
            MetadataRecord::BrokerConfig {
                broker_id,
                name,
                value,
            } => {
                let configs = self.broker_configs.entry(*broker_id).or_default();
                match value {
                    Some(v) => configs.insert(name.clone(), v.clone()),
                    None => configs.remove(name),
                };
                if configs.is_empty() {
                    self.broker_configs.remove(broker_id);
                }
            }
        }
        Ok(())
    }

    fn broker_mut(
        &mut self,
        broker_id: i32,
        broker_epoch: i64,
    ) -> Result<&mut BrokerRegistration, ApplyError> {
        self.brokers
            .get_mut(&broker_id)
            .filter(|b| b.broker_epoch == broker_epoch)
            .ok_or(ApplyError::StaleBroker(broker_id, broker_epoch))
    }

    fn topic_mut(&mut self, topic_id: &Uuid) -> Result<&mut TopicImage, ApplyError> {
        self.topics
            .get_mut(topic_id)
            .ok_or(ApplyError::UnknownTopic(*topic_id))
    }

    /// The records that rebuild this image from empty, in an order that applies cleanly.
    pub fn to_records(&self) -> Vec<MetadataRecord> {
        let mut out = Vec::new();
        if let Some(cluster_id) = self.cluster_id {
            out.push(MetadataRecord::ClusterId { cluster_id });
        }
        out.extend(
            self.brokers
                .values()
                .map(|b| MetadataRecord::RegisterBroker(b.clone())),
        );
        for t in self.topics.values() {
            out.push(MetadataRecord::Topic {
                name: t.name.clone(),
                topic_id: t.topic_id,
            });
            out.extend(
                t.partitions
                    .values()
                    .map(|p| MetadataRecord::Partition(p.clone())),
            );
            out.extend(t.configs.iter().map(|(k, v)| MetadataRecord::TopicConfig {
                topic_id: t.topic_id,
                name: k.clone(),
                value: Some(v.clone()),
            }));
        }
        for (broker_id, configs) in &self.broker_configs {
            out.extend(configs.iter().map(|(k, v)| MetadataRecord::BrokerConfig {
                broker_id: *broker_id,
                name: k.clone(),
                value: Some(v.clone()),
            }));
        }
        if self.next_producer_id > 0 {
            out.push(MetadataRecord::ProducerIds {
                broker_id: NO_LEADER,
                broker_epoch: -1,
                next_producer_id: self.next_producer_id,
            });
        }
        out
    }

    /// `version:u8 applied_index:u64be applied_term:u64be batch` (see `record.rs`).
    pub fn encode_snapshot(&self) -> Vec<u8> {
        let batch = encode_batch(&self.to_records());
        let mut out = Vec::with_capacity(17 + batch.len());
        out.push(SNAPSHOT_VERSION);
        out.extend_from_slice(&self.applied_index.to_be_bytes());
        out.extend_from_slice(&self.applied_term.to_be_bytes());
        out.extend_from_slice(&batch);
        out
    }

    pub fn decode_snapshot(bytes: &[u8]) -> Result<MetadataImage, SnapshotError> {
        if bytes.len() < 17 {
            return Err(SnapshotError::Decode(DecodeError::Truncated(bytes.len())));
        }
        if bytes[0] != SNAPSHOT_VERSION {
            return Err(SnapshotError::Decode(DecodeError::UnknownVersion(bytes[0])));
        }
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(b)
        };
        let mut img = MetadataImage {
            applied_index: word(1),
            applied_term: word(9),
            ..MetadataImage::default()
        };
        let records = decode_batch(&bytes[17..]).map_err(SnapshotError::Decode)?;
        if let Some(e) = img.apply_all(&records).into_iter().next() {
            // A snapshot we wrote always applies cleanly: this one is damaged.
            return Err(SnapshotError::Inconsistent(e));
        }
        Ok(img)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error("metadata snapshot undecodable: {0}")]
    Decode(DecodeError),
    #[error("metadata snapshot inconsistent: {0}")]
    Inconsistent(ApplyError),
}

#[cfg(test)]
mod tests {
    use super::super::record::tests::{every_kind, uuid};
    use super::*;

    #[test]
    fn applies_every_kind_and_skips_what_does_not_fit() {
        let mut img = MetadataImage::default();
        // every_kind() ends by removing the topic and fences/unfences mismatched epochs.
        let skipped = img.apply_all(&every_kind());
        assert_eq!(
            skipped,
            vec![
                ApplyError::StaleBroker(3, 12),
                ApplyError::StaleBroker(i32::MAX, i64::MIN)
            ]
        );
        assert_eq!(img.cluster_id, Some(uuid(1)));
        assert!(img.topics.is_empty() && img.topic_ids.is_empty());
        assert_eq!(img.next_producer_id, 2000);
        assert_eq!(
            img.apply(&MetadataRecord::ClusterId {
                cluster_id: uuid(9)
            }),
            Err(ApplyError::ClusterIdSet(uuid(1)))
        );
    }

    #[test]
    fn snapshot_round_trips_and_rejects_garbage() {
        let mut img = MetadataImage::default();
        let mut records = every_kind();
        records.pop(); // keep the topic
        img.apply_all(&records);
        img.applied_index = 42;
        img.applied_term = 3;
        assert_eq!(img.topics.len(), 1);
        let bytes = img.encode_snapshot();
        assert_eq!(MetadataImage::decode_snapshot(&bytes).unwrap(), img);
        for cut in 0..bytes.len() {
            assert!(MetadataImage::decode_snapshot(&bytes[..cut]).is_err());
        }
        let empty = MetadataImage::default();
        assert_eq!(
            MetadataImage::decode_snapshot(&empty.encode_snapshot()).unwrap(),
            empty
        );
    }

    #[test]
    fn undecodable_entry_still_advances_the_image() {
        let mut img = MetadataImage::default();
        assert!(img.apply_entry(5, 2, &[9, 9]).is_err());
        assert_eq!((img.applied_index, img.applied_term), (5, 2));
        assert_eq!(img.apply_entry(6, 2, &[]), Ok(vec![]));
        assert_eq!(img.applied_index, 6);
    }
}
