//! The active controller's rules, pure: an image and a request in, records (or a Kafka error)
//! out. Time is passed in (monotonic ms); nothing here reads a clock or does I/O.
//!
//! The image handed in must be the one the records will meet when they commit: the committed
//! image plus every entry the leader has appended ahead of it (`QuorumNode::propose_with`
//! supplies it). Decisions are then exactly as good as if they were applied one at a time.
//!
//! Broker sessions (last heartbeat) live only in the active controller's memory, as in KRaft:
//! a heartbeat is not a log record. A controller that becomes active starts every unfenced
//! broker on a full session ([`Controller::activate`]), so a failover never fences a broker that
//! kept heartbeating.

use std::collections::{BTreeMap, BTreeSet};

use kafka_protocol::error::ResponseError;
use uuid::Uuid;

use super::image::MetadataImage;
use super::record::{BrokerRegistration, Listener, MetadataRecord, PartitionRecord, NO_LEADER};

/// The broker configs that can change at run time (through the metadata log): Kafka's
/// replication throttles (KIP-73), in bytes per second.
pub const DYNAMIC_BROKER_CONFIGS: &[&str] = &[
    "leader.replication.throttled.rate",
    "follower.replication.throttled.rate",
];

/// Partitions a topic may have (the node's own limit too).
pub const PARTITIONS_MAX: i32 = 100_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerConfig {
    /// Kafka's `broker.session.timeout.ms`.
    pub session_timeout_ms: u64,
    /// Producer ids handed out per AllocateProducerIds (Kafka: 1000).
    pub producer_id_block_size: i64,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            session_timeout_ms: 9_000,
            producer_id_block_size: 1_000,
        }
    }
}

/// A refusal, carrying the Kafka error the broker or client receives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControllerError {
    #[error("broker {0} is already registered by another live process")]
    DuplicateBrokerRegistration(i32),
    #[error("cluster id {got} does not match the quorum's {want}")]
    InconsistentClusterId { got: Uuid, want: Uuid },
    #[error("broker {0} is not registered")]
    BrokerIdNotRegistered(i32),
    #[error("broker {0} epoch {1} is stale")]
    StaleBrokerEpoch(i32, i64),
    #[error("replication factor {wanted} is above the {available} available brokers")]
    InvalidReplicationFactor { wanted: i32, available: usize },
    #[error("number of partitions {0} is invalid")]
    InvalidPartitions(i32),
    #[error("topic {0} already exists")]
    TopicAlreadyExists(String),
    #[error("topic {0} is unknown")]
    UnknownTopic(String),
    #[error("topic id {0} is unknown")]
    UnknownTopicId(Uuid),
    #[error("broker {0} does not lead the partition")]
    NotLeader(i32),
    #[error("leader epoch {got} is not the partition's {want}")]
    FencedLeaderEpoch { got: i32, want: i32 },
    #[error("partition epoch {got} is not the partition's {want}")]
    InvalidUpdateVersion { got: i32, want: i32 },
    #[error("replica {0} may not join the ISR (not a replica, or fenced)")]
    IneligibleReplica(i32),
    #[error("invalid replica assignment: {0}")]
    InvalidReplicaAssignment(String),
    #[error("the partition already has the leader the election would choose")]
    ElectionNotNeeded,
    #[error("the preferred replica is not a live member of the ISR")]
    PreferredLeaderNotAvailable,
    #[error("no live replica can lead the partition")]
    EligibleLeadersNotAvailable,
    #[error("no reassignment of the partition is in progress")]
    NoReassignmentInProgress,
    #[error("{0}")]
    InvalidConfig(String),
}

impl ControllerError {
    pub fn response_error(&self) -> ResponseError {
        match self {
            ControllerError::DuplicateBrokerRegistration(_) => {
                ResponseError::DuplicateBrokerRegistration
            }
            ControllerError::InconsistentClusterId { .. } => ResponseError::InconsistentClusterId,
            ControllerError::BrokerIdNotRegistered(_) => ResponseError::BrokerIdNotRegistered,
            ControllerError::StaleBrokerEpoch(..) => ResponseError::StaleBrokerEpoch,
            ControllerError::InvalidReplicationFactor { .. } => {
                ResponseError::InvalidReplicationFactor
            }
            ControllerError::InvalidPartitions(_) => ResponseError::InvalidPartitions,
            ControllerError::TopicAlreadyExists(_) => ResponseError::TopicAlreadyExists,
            ControllerError::UnknownTopic(_) => ResponseError::UnknownTopicOrPartition,
            ControllerError::UnknownTopicId(_) => ResponseError::UnknownTopicId,
            ControllerError::NotLeader(_) => ResponseError::NotLeaderOrFollower,
            ControllerError::FencedLeaderEpoch { .. } => ResponseError::FencedLeaderEpoch,
            ControllerError::InvalidUpdateVersion { .. } => ResponseError::InvalidUpdateVersion,
            ControllerError::IneligibleReplica(_) => ResponseError::IneligibleReplica,
            ControllerError::InvalidReplicaAssignment(_) => ResponseError::InvalidReplicaAssignment,
            ControllerError::ElectionNotNeeded => ResponseError::ElectionNotNeeded,
            ControllerError::PreferredLeaderNotAvailable => {
                ResponseError::PreferredLeaderNotAvailable
            }
            ControllerError::EligibleLeadersNotAvailable => {
                ResponseError::EligibleLeadersNotAvailable
            }
            ControllerError::NoReassignmentInProgress => ResponseError::NoReassignmentInProgress,
            ControllerError::InvalidConfig(_) => ResponseError::InvalidConfig,
        }
    }
    pub fn code(&self) -> i16 {
        self.response_error().code()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterRequest {
    pub broker_id: i32,
    pub incarnation_id: Uuid,
    pub directory_id: Uuid,
    /// The cluster id in the broker's `meta.properties`, if it has one yet.
    pub cluster_id: Option<Uuid>,
    pub listeners: Vec<Listener>,
    pub rack: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatRequest {
    pub broker_id: i32,
    pub broker_epoch: i64,
    /// The highest metadata log offset the broker has applied: it is unfenced only once this
    /// reaches its own registration (KIP-841: caught up before it may lead or join an ISR).
    pub metadata_offset: u64,
    /// SIGTERM: the broker asks to shut down (Kafka's controlled shutdown).
    pub want_shutdown: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatReply {
    /// Fenced as of the image the heartbeat was judged on plus the returned records.
    pub fenced: bool,
    /// The broker may exit: it leads nothing and is in no ISR it could hold up.
    pub should_shut_down: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateTopicRequest {
    pub name: String,
    /// Chosen by the caller (random in the server, seeded in the simulator).
    pub topic_id: Uuid,
    pub partitions: i32,
    pub replication_factor: i32,
    pub configs: BTreeMap<String, String>,
    /// The operator's own placement (CreateTopics assignments, `--replica-assignment`): one
    /// replica list per partition, preferred leader first. None: the controller places.
    pub assignment: Option<Vec<Vec<i32>>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Session {
    incarnation_id: Uuid,
    expires_at_ms: u64,
}

/// The active controller's memory beside the image: broker sessions.
#[derive(Debug, Clone)]
pub struct Controller {
    config: ControllerConfig,
    sessions: BTreeMap<i32, Session>,
    /// The Raft term this controller's sessions were started in; `None` when not active.
    active_term: Option<u64>,
}

impl Controller {
    pub fn new(config: ControllerConfig) -> Self {
        Controller {
            config,
            sessions: BTreeMap::new(),
            active_term: None,
        }
    }

    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }

    /// Call before every decision as leader of `term`. On a new term the sessions of an earlier
    /// reign are stale (heartbeats went to another controller meanwhile): every registered
    /// broker gets a full session from now, as Kafka's controller does on failover.
    pub fn activate(&mut self, term: u64, image: &MetadataImage, now_ms: u64) {
        if self.active_term == Some(term) {
            return;
        }
        self.active_term = Some(term);
        self.sessions = image
            .brokers
            .values()
            .map(|b| {
                (
                    b.broker_id,
                    Session {
                        incarnation_id: b.incarnation_id,
                        expires_at_ms: now_ms + self.config.session_timeout_ms,
                    },
                )
            })
            .collect();
    }

    /// Leadership lost: forget the sessions.
    pub fn deactivate(&mut self) {
        self.active_term = None;
        self.sessions.clear();
    }

    /// The records that form a new cluster, if the image has none yet.
    pub fn bootstrap(image: &MetadataImage, cluster_id: Uuid) -> Vec<MetadataRecord> {
        match image.cluster_id {
            None => vec![MetadataRecord::ClusterId { cluster_id }],
            Some(_) => Vec::new(),
        }
    }

    /// BrokerRegistration. `broker_epoch` is the log index the records will be written at
    /// (KRaft's rule: a broker epoch is the offset of its registration).
    pub fn register(
        &mut self,
        image: &MetadataImage,
        req: &RegisterRequest,
        broker_epoch: i64,
        now_ms: u64,
    ) -> Result<Vec<MetadataRecord>, ControllerError> {
        if let (Some(got), Some(want)) = (req.cluster_id, image.cluster_id) {
            if got != want {
                return Err(ControllerError::InconsistentClusterId { got, want });
            }
        }
        let mut out = Vec::new();
        if let Some(old) = image.brokers.get(&req.broker_id) {
            let same_process = old.incarnation_id == req.incarnation_id;
            let same_disk = old.directory_id == req.directory_id;
            // Live means within its session, fenced or not (Kafka's rule): a process still
            // catching up after registering keeps its id against a second process.
            let live = self.sessions.get(&req.broker_id).is_some_and(|s| {
                s.incarnation_id == old.incarnation_id && s.expires_at_ms > now_ms
            });
            if !same_process && !same_disk && live {
                return Err(ControllerError::DuplicateBrokerRegistration(req.broker_id));
            }
            // A restart (or a retry) replaces the old incarnation: fenced in the same change,
            // its leaderships move now rather than after its session runs out.
            if !old.fenced {
                out.extend(fence_changes(image, req.broker_id));
            }
        }
        out.push(MetadataRecord::RegisterBroker(BrokerRegistration {
            broker_id: req.broker_id,
            incarnation_id: req.incarnation_id,
            directory_id: req.directory_id,
            broker_epoch,
            listeners: req.listeners.clone(),
            rack: req.rack.clone(),
            fenced: true,
        }));
        self.sessions.insert(
            req.broker_id,
            Session {
                incarnation_id: req.incarnation_id,
                expires_at_ms: now_ms + self.config.session_timeout_ms,
            },
        );
        Ok(out)
    }

    /// BrokerHeartbeat: renews the session; unfences a fenced broker once it has caught up.
    pub fn heartbeat(
        &mut self,
        image: &MetadataImage,
        req: &HeartbeatRequest,
        now_ms: u64,
    ) -> Result<(HeartbeatReply, Vec<MetadataRecord>), ControllerError> {
        let b = image
            .brokers
            .get(&req.broker_id)
            .ok_or(ControllerError::BrokerIdNotRegistered(req.broker_id))?;
        if b.broker_epoch != req.broker_epoch {
            return Err(ControllerError::StaleBrokerEpoch(
                req.broker_id,
                req.broker_epoch,
            ));
        }
        self.sessions.insert(
            req.broker_id,
            Session {
                incarnation_id: b.incarnation_id,
                expires_at_ms: now_ms + self.config.session_timeout_ms,
            },
        );
        if req.want_shutdown {
            // Controlled shutdown, in one change: fenced, out of every ISR, its leaderships
            // moved to in-sync replicas, so clients move before the process goes. A partition
            // whose only in-sync replica it is keeps it, leaderless, as on any fencing.
            let reply = HeartbeatReply {
                fenced: true,
                should_shut_down: true,
            };
            if b.fenced {
                return Ok((reply, Vec::new()));
            }
            let mut recs = vec![MetadataRecord::FenceBroker {
                broker_id: b.broker_id,
                broker_epoch: b.broker_epoch,
            }];
            recs.extend(fence_changes(image, b.broker_id));
            return Ok((reply, recs));
        }
        let reply = |fenced| HeartbeatReply {
            fenced,
            should_shut_down: false,
        };
        if b.fenced && req.metadata_offset >= b.broker_epoch.max(0) as u64 {
            return Ok((reply(false), unfence_changes(image, b)));
        }
        Ok((reply(b.fenced), Vec::new()))
    }

    /// Fences every unfenced broker whose session ran out, each with its partition changes,
    /// in one change.
    pub fn expire_sessions(&mut self, image: &MetadataImage, now_ms: u64) -> Vec<MetadataRecord> {
        // A broker with no session here (registered in an entry this controller had not seen
        // when it activated) starts one now rather than being fenced unheard.
        for b in image.brokers.values() {
            let fresh = Session {
                incarnation_id: b.incarnation_id,
                expires_at_ms: now_ms + self.config.session_timeout_ms,
            };
            let s = self.sessions.entry(b.broker_id).or_insert(fresh.clone());
            if s.incarnation_id != b.incarnation_id {
                *s = fresh;
            }
        }
        let expired: Vec<i32> = image
            .brokers
            .values()
            .filter(|b| !b.fenced && self.sessions[&b.broker_id].expires_at_ms <= now_ms)
            .map(|b| b.broker_id)
            .collect();
        if expired.is_empty() {
            return Vec::new();
        }
        // Each fence must see the previous ones (a partition may lose two leaders at once).
        let mut scratch = image.clone();
        let mut out = Vec::new();
        for id in expired {
            let Some(b) = scratch.brokers.get(&id) else {
                continue;
            };
            let mut recs = vec![MetadataRecord::FenceBroker {
                broker_id: id,
                broker_epoch: b.broker_epoch,
            }];
            recs.extend(fence_changes(&scratch, id));
            scratch.apply_all(&recs);
            out.extend(recs);
        }
        out
    }

    /// When [`Controller::expire_sessions`] next has work, if ever.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.sessions.values().map(|s| s.expires_at_ms).min()
    }

    /// CreateTopics for one topic: replicas placed over unfenced brokers, across racks.
    pub fn create_topic(
        &self,
        image: &MetadataImage,
        req: &CreateTopicRequest,
    ) -> Result<Vec<MetadataRecord>, ControllerError> {
        if image.topic_ids.contains_key(&req.name) {
            return Err(ControllerError::TopicAlreadyExists(req.name.clone()));
        }
        if req.partitions <= 0 || req.partitions > PARTITIONS_MAX {
            return Err(ControllerError::InvalidPartitions(req.partitions));
        }
        let eligible: Vec<(i32, Option<&str>)> = image
            .brokers
            .values()
            .filter(|b| !b.fenced)
            .map(|b| (b.broker_id, b.rack.as_deref()))
            .collect();
        let placement = match &req.assignment {
            Some(a) => check_assignment(image, a)?,
            None => place_replicas(&eligible, req.partitions, req.replication_factor)?,
        };
        let mut out = vec![MetadataRecord::Topic {
            name: req.name.clone(),
            topic_id: req.topic_id,
        }];
        for (p, replicas) in placement.into_iter().enumerate() {
            // Fenced replicas of an operator's placement start outside the ISR.
            let isr: Vec<i32> = replicas
                .iter()
                .copied()
                .filter(|r| image.brokers.get(r).is_some_and(|b| !b.fenced))
                .collect();
            out.push(MetadataRecord::Partition(PartitionRecord {
                topic_id: req.topic_id,
                partition: p as i32,
                leader: isr[0],
                isr,
                replicas,
                leader_epoch: 0,
                partition_epoch: 0,
                adding: Vec::new(),
                removing: Vec::new(),
            }));
        }
        out.extend(
            req.configs
                .iter()
                .map(|(k, v)| MetadataRecord::TopicConfig {
                    topic_id: req.topic_id,
                    name: k.clone(),
                    value: Some(v.clone()),
                }),
        );
        Ok(out)
    }

    pub fn delete_topic(
        &self,
        image: &MetadataImage,
        name: &str,
    ) -> Result<Vec<MetadataRecord>, ControllerError> {
        let t = image
            .topic_by_name(name)
            .ok_or_else(|| ControllerError::UnknownTopic(name.to_string()))?;
        Ok(vec![MetadataRecord::RemoveTopic {
            topic_id: t.topic_id,
        }])
    }

    /// Sets (`Some`) or removes (`None`) topic config overrides.
    pub fn alter_topic_configs(
        &self,
        image: &MetadataImage,
        name: &str,
        changes: &[(String, Option<String>)],
    ) -> Result<Vec<MetadataRecord>, ControllerError> {
        let t = image
            .topic_by_name(name)
            .ok_or_else(|| ControllerError::UnknownTopic(name.to_string()))?;
        Ok(changes
            .iter()
            .map(|(k, v)| MetadataRecord::TopicConfig {
                topic_id: t.topic_id,
                name: k.clone(),
                value: v.clone(),
            })
            .collect())
    }

    /// Sets (`Some`) or removes (`None`) dynamic configs of broker `broker_id` (or of every
    /// broker: [`crate::quorum::record::ALL_BROKERS`]). Only the replication throttles are
    /// dynamic (KIP-73); each is a rate in bytes per second.
    pub fn alter_broker_configs(
        &self,
        broker_id: i32,
        changes: &[(String, Option<String>)],
    ) -> Result<Vec<MetadataRecord>, ControllerError> {
        if broker_id < crate::quorum::record::ALL_BROKERS {
            return Err(ControllerError::InvalidConfig(format!(
                "{broker_id} is not a broker id"
            )));
        }
        for (name, value) in changes {
            if !DYNAMIC_BROKER_CONFIGS.contains(&name.as_str()) {
                return Err(ControllerError::InvalidConfig(format!(
                    "{name} is not a dynamic broker config (dynamic: {})",
                    DYNAMIC_BROKER_CONFIGS.join(", ")
                )));
            }
            if let Some(v) = value {
                if v.trim().parse::<i64>().map_or(true, |r| r < 1) {
                    return Err(ControllerError::InvalidConfig(format!(
                        "Invalid value {v} for configuration {name}: a rate in bytes per second, at least 1"
                    )));
                }
            }
        }
        Ok(changes
            .iter()
            .map(|(name, value)| MetadataRecord::BrokerConfig {
                broker_id,
                name: name.clone(),
                value: value.as_ref().map(|v| v.trim().to_string()),
            })
            .collect())
    }

    /// CreatePartitions: grows a topic to `count` partitions (never shrinks); the new ones are
    /// placed like a new topic's, with the replication factor of the existing ones, or as the
    /// operator's `assignment` says (one replica list per new partition).
    pub fn create_partitions(
        &self,
        image: &MetadataImage,
        name: &str,
        count: i32,
        assignment: Option<&[Vec<i32>]>,
    ) -> Result<Vec<MetadataRecord>, ControllerError> {
        let t = image
            .topic_by_name(name)
            .ok_or_else(|| ControllerError::UnknownTopic(name.to_string()))?;
        let current = t.partitions.len() as i32;
        if count <= current || count > PARTITIONS_MAX {
            return Err(ControllerError::InvalidPartitions(count));
        }
        let rf = t
            .partitions
            .values()
            .next()
            .map_or(1, |p| p.target_replicas().len() as i32);
        let placement: Vec<Vec<i32>> = match assignment {
            Some(a) => {
                if a.len() as i32 != count - current {
                    return Err(ControllerError::InvalidReplicaAssignment(format!(
                        "{} assignments for {} new partitions",
                        a.len(),
                        count - current
                    )));
                }
                let a = check_assignment(image, a)?;
                if a[0].len() as i32 != rf {
                    return Err(ControllerError::InvalidReplicaAssignment(format!(
                        "{} replicas per partition, the topic has {rf}",
                        a[0].len()
                    )));
                }
                a
            }
            None => {
                let eligible: Vec<(i32, Option<&str>)> = image
                    .brokers
                    .values()
                    .filter(|b| !b.fenced)
                    .map(|b| (b.broker_id, b.rack.as_deref()))
                    .collect();
                place_replicas(&eligible, count, rf)?.split_off(current as usize)
            }
        };
        Ok(placement
            .into_iter()
            .zip(current..)
            .map(|(replicas, p)| {
                let isr: Vec<i32> = replicas
                    .iter()
                    .copied()
                    .filter(|r| image.is_unfenced(*r))
                    .collect();
                MetadataRecord::Partition(PartitionRecord {
                    topic_id: t.topic_id,
                    partition: p,
                    leader: isr[0],
                    isr,
                    replicas,
                    leader_epoch: 0,
                    partition_epoch: 0,
                    adding: Vec::new(),
                    removing: Vec::new(),
                })
            })
            .collect())
    }

    /// AlterPartitionReassignments for one partition (KIP-455): `target` moves its replicas
    /// there, `None` cancels the running move. A move adds the new replicas at once (they fetch
    /// from the leader and join the ISR when caught up) and completes when every target replica
    /// is in the ISR: the leaving replicas go, and a leader among them hands over to the first
    /// in-sync target replica. A new target replaces a running one, from the original replicas.
    /// `allow_rf_change: false` (KIP-860) refuses a target of another size than the original.
    pub fn alter_reassignment(
        &self,
        image: &MetadataImage,
        topic: &str,
        partition: i32,
        target: Option<&[i32]>,
        allow_rf_change: bool,
    ) -> Result<Vec<MetadataRecord>, ControllerError> {
        let t = image
            .topic_by_name(topic)
            .ok_or_else(|| ControllerError::UnknownTopic(topic.to_string()))?;
        let p = t
            .partitions
            .get(&partition)
            .ok_or_else(|| ControllerError::UnknownTopic(format!("{topic}-{partition}")))?;
        let original = p.original_replicas();
        let next = match target {
            None => {
                if !p.reassigning() {
                    return Err(ControllerError::NoReassignmentInProgress);
                }
                revert_reassignment(image, p)?
            }
            Some(target) => {
                let target = check_assignment(image, &[target.to_vec()])?.remove(0);
                if !allow_rf_change && target.len() != original.len() {
                    return Err(ControllerError::InvalidReplicationFactor {
                        wanted: target.len() as i32,
                        available: original.len(),
                    });
                }
                let mut next = p.clone();
                next.replicas = target.clone();
                next.replicas
                    .extend(original.iter().copied().filter(|r| !target.contains(r)));
                next.adding = target
                    .iter()
                    .copied()
                    .filter(|r| !original.contains(r))
                    .collect();
                next.removing = original
                    .iter()
                    .copied()
                    .filter(|r| !target.contains(r))
                    .collect();
                // Replicas an earlier target was adding, and this one does not, leave.
                keep_isr_and_leader_within_replicas(image, &mut next)?;
                complete_reassignment(image, next)
            }
        };
        if next == *p {
            return Ok(Vec::new());
        }
        let mut next = next;
        next.partition_epoch = p.partition_epoch + 1;
        Ok(vec![MetadataRecord::Partition(next)])
    }

    /// AlterPartition: the leader changes its partition's ISR (a follower caught up, or fell
    /// behind). Judged as Kafka's controller does: only the current leader, at the current
    /// leader and partition epochs; the new ISR holds the leader, only replicas, and (KIP-841)
    /// no fenced broker joins it.
    #[allow(clippy::too_many_arguments)]
    pub fn alter_partition(
        &self,
        image: &MetadataImage,
        broker_id: i32,
        broker_epoch: i64,
        topic_id: Uuid,
        partition: i32,
        leader_epoch: i32,
        partition_epoch: i32,
        new_isr: &[i32],
    ) -> Result<(PartitionRecord, Vec<MetadataRecord>), ControllerError> {
        let b = image
            .brokers
            .get(&broker_id)
            .ok_or(ControllerError::BrokerIdNotRegistered(broker_id))?;
        if b.broker_epoch != broker_epoch {
            return Err(ControllerError::StaleBrokerEpoch(broker_id, broker_epoch));
        }
        let p = image
            .topics
            .get(&topic_id)
            .and_then(|t| t.partitions.get(&partition))
            .ok_or(ControllerError::UnknownTopicId(topic_id))?;
        if p.leader != broker_id {
            return Err(ControllerError::NotLeader(broker_id));
        }
        if p.leader_epoch != leader_epoch {
            return Err(ControllerError::FencedLeaderEpoch {
                got: leader_epoch,
                want: p.leader_epoch,
            });
        }
        if p.partition_epoch != partition_epoch {
            return Err(ControllerError::InvalidUpdateVersion {
                got: partition_epoch,
                want: p.partition_epoch,
            });
        }
        let mut isr: Vec<i32> = Vec::with_capacity(new_isr.len());
        for r in new_isr {
            if !p.replicas.contains(r) {
                return Err(ControllerError::IneligibleReplica(*r));
            }
            if !p.isr.contains(r) && !image.is_unfenced(*r) {
                return Err(ControllerError::IneligibleReplica(*r));
            }
            if !isr.contains(r) {
                isr.push(*r);
            }
        }
        if !isr.contains(&broker_id) {
            return Err(ControllerError::IneligibleReplica(broker_id));
        }
        if isr == p.isr {
            return Ok((p.clone(), Vec::new()));
        }
        let mut next = p.clone();
        next.isr = isr;
        // An ISR that now holds every target replica completes a running reassignment.
        let mut next = complete_reassignment(image, next);
        next.partition_epoch = p.partition_epoch + 1;
        Ok((next.clone(), vec![MetadataRecord::Partition(next)]))
    }

    /// AllocateProducerIds: the block `[first, first + size)` and the record that reserves it.
    pub fn allocate_producer_ids(
        &self,
        image: &MetadataImage,
        broker_id: i32,
        broker_epoch: i64,
    ) -> Result<(i64, Vec<MetadataRecord>), ControllerError> {
        let b = image
            .brokers
            .get(&broker_id)
            .ok_or(ControllerError::BrokerIdNotRegistered(broker_id))?;
        if b.broker_epoch != broker_epoch {
            return Err(ControllerError::StaleBrokerEpoch(broker_id, broker_epoch));
        }
        let first = image.next_producer_id;
        Ok((
            first,
            vec![MetadataRecord::ProducerIds {
                broker_id,
                broker_epoch,
                next_producer_id: first + self.config.producer_id_block_size,
            }],
        ))
    }
}

/// The kinds of election ElectLeaders asks for (Kafka's ElectionType 0 and 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElectionKind {
    /// Move leadership to the first replica, if it is a live member of the ISR.
    Preferred,
    /// Give a leaderless partition a leader, from outside the ISR if no member is live: the
    /// records only the lost ISR held are gone (the operator's choice, as in Kafka).
    Unclean,
}

/// One partition's election: the records that make it, or why there is none.
pub fn elect(
    image: &MetadataImage,
    p: &PartitionRecord,
    kind: ElectionKind,
) -> Result<PartitionRecord, ControllerError> {
    let mut next = p.clone();
    match kind {
        ElectionKind::Preferred => {
            let preferred = p.replicas.first().copied().unwrap_or(NO_LEADER);
            if p.leader == preferred {
                return Err(ControllerError::ElectionNotNeeded);
            }
            if !p.isr.contains(&preferred) || !image.is_unfenced(preferred) {
                return Err(ControllerError::PreferredLeaderNotAvailable);
            }
            next.leader = preferred;
        }
        ElectionKind::Unclean => {
            if p.leader != NO_LEADER {
                return Err(ControllerError::ElectionNotNeeded);
            }
            let live = |r: &i32| image.is_unfenced(*r);
            if let Some(r) = p.replicas.iter().find(|r| p.isr.contains(r) && live(r)) {
                next.leader = *r;
            } else if let Some(r) = p.replicas.iter().find(|r| live(r)) {
                next.leader = *r;
                next.isr = vec![*r];
            } else {
                return Err(ControllerError::EligibleLeadersNotAvailable);
            }
        }
    }
    next.leader_epoch += 1;
    next.partition_epoch += 1;
    Ok(next)
}

/// Kafka's auto.leader.rebalance.enable: every partition whose preferred replica is a live
/// member of its ISR but not its leader gets it back as leader (at most `max` at once).
pub fn preferred_rebalance(image: &MetadataImage, max: usize) -> Vec<MetadataRecord> {
    image
        .partitions()
        .filter_map(|p| elect(image, p, ElectionKind::Preferred).ok())
        .take(max)
        .map(MetadataRecord::Partition)
        .collect()
}

/// unclean.leader.election.enable on a topic whose partition already lost its whole ISR (the
/// setting was turned on afterwards): elect a live replica now, as Kafka's controller does.
pub fn pending_unclean_elections(image: &MetadataImage) -> Vec<MetadataRecord> {
    image
        .partitions()
        .filter(|p| p.leader == NO_LEADER && unclean_allowed(image, p))
        .filter_map(|p| elect(image, p, ElectionKind::Unclean).ok())
        .map(MetadataRecord::Partition)
        .collect()
}

fn unclean_allowed(image: &MetadataImage, p: &PartitionRecord) -> bool {
    image
        .topics
        .get(&p.topic_id)
        .and_then(|t| t.configs.get("unclean.leader.election.enable"))
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// The partition changes that fencing `broker_id` brings, Kafka's way: it leaves every ISR;
/// where it was the last member the ISR keeps it and the partition has no leader (so no
/// acknowledged write is lost by electing an out-of-sync replica); a partition it led gets the
/// first other in-sync, unfenced replica in replica order, with a new leader epoch.
pub fn fence_changes(image: &MetadataImage, broker_id: i32) -> Vec<MetadataRecord> {
    let mut out = Vec::new();
    for p in image.partitions() {
        if !p.isr.contains(&broker_id) && p.leader != broker_id {
            continue;
        }
        let mut next = p.clone();
        let others: Vec<i32> = p.isr.iter().copied().filter(|r| *r != broker_id).collect();
        if !others.is_empty() {
            next.isr = others;
        }
        if p.leader == broker_id {
            next.leader = next
                .replicas
                .iter()
                .copied()
                .find(|r| *r != broker_id && next.isr.contains(r) && image.is_unfenced(*r))
                .unwrap_or(NO_LEADER);
            if next.leader == NO_LEADER && unclean_allowed(image, p) {
                // unclean.leader.election.enable: a live replica outside the ISR takes over.
                if let Some(r) = p
                    .replicas
                    .iter()
                    .copied()
                    .find(|r| *r != broker_id && image.is_unfenced(*r))
                {
                    next.leader = r;
                    next.isr = vec![r];
                }
            }
            next.leader_epoch += 1;
        }
        if next != *p {
            next.partition_epoch += 1;
            out.push(MetadataRecord::Partition(next));
        }
    }
    out
}

/// Unfencing `b`, with a leader for every leaderless partition whose ISR holds it.
fn unfence_changes(image: &MetadataImage, b: &BrokerRegistration) -> Vec<MetadataRecord> {
    let mut out = vec![MetadataRecord::UnfenceBroker {
        broker_id: b.broker_id,
        broker_epoch: b.broker_epoch,
    }];
    for p in image.partitions() {
        let in_isr = p.isr.contains(&b.broker_id);
        let unclean = !in_isr && p.replicas.contains(&b.broker_id) && unclean_allowed(image, p);
        if p.leader == NO_LEADER && (in_isr || unclean) {
            let mut next = p.clone();
            if unclean {
                next.isr = vec![b.broker_id];
            }
            next.leader = b.broker_id;
            next.leader_epoch += 1;
            next.partition_epoch += 1;
            out.push(MetadataRecord::Partition(next));
        }
    }
    out
}

/// A partition whose ISR holds every target replica of its reassignment, completed: only the
/// target replicas remain, and a leader that leaves hands over to the first live in-sync target
/// replica (a new leader epoch). Any other partition is returned as it is.
fn complete_reassignment(image: &MetadataImage, mut p: PartitionRecord) -> PartitionRecord {
    if !p.reassigning() {
        return p;
    }
    let target = p.target_replicas();
    if !target.iter().all(|r| p.isr.contains(r)) {
        return p;
    }
    let before = p.clone();
    p.replicas = target;
    p.adding.clear();
    p.removing.clear();
    // Never refused: every target replica is in the ISR.
    match keep_isr_and_leader_within_replicas(image, &mut p) {
        Ok(()) => p,
        Err(_) => before,
    }
}

/// A cancelled reassignment: back to the original replicas; the replicas being added leave the
/// ISR. If only added replicas are in sync, the cancel is refused unless the topic allows
/// unclean elections (Kafka's rule).
fn revert_reassignment(
    image: &MetadataImage,
    p: &PartitionRecord,
) -> Result<PartitionRecord, ControllerError> {
    let mut next = p.clone();
    next.replicas = p.original_replicas();
    next.adding.clear();
    next.removing.clear();
    keep_isr_and_leader_within_replicas(image, &mut next)?;
    Ok(next)
}

/// After `p.replicas` shrank: the ISR keeps only replicas, and a leader that is no longer a
/// replica makes way for the first live in-sync replica. If no in-sync replica would be left
/// (only replicas being dropped were in sync), the change would be an unclean election: refused
/// unless the topic allows those (then every kept replica counts as in sync), as Kafka does.
fn keep_isr_and_leader_within_replicas(
    image: &MetadataImage,
    p: &mut PartitionRecord,
) -> Result<(), ControllerError> {
    p.isr.retain(|r| p.replicas.contains(r));
    if p.isr.is_empty() {
        if !unclean_allowed(image, p) {
            return Err(ControllerError::InvalidReplicaAssignment(
                "no replica that stays is in sync: the change would need an unclean election"
                    .into(),
            ));
        }
        p.isr = p.replicas.clone();
    }
    if p.leader == NO_LEADER || p.isr.contains(&p.leader) {
        return Ok(());
    }
    let leader = p
        .replicas
        .iter()
        .copied()
        .find(|r| p.isr.contains(r) && image.is_unfenced(*r))
        .unwrap_or(NO_LEADER);
    p.leader = leader;
    p.leader_epoch += 1;
    Ok(())
}

/// An operator's placement, checked as Kafka does: every partition has the same number of
/// distinct replicas, all registered brokers, at least one of them unfenced.
fn check_assignment(
    image: &MetadataImage,
    assignment: &[Vec<i32>],
) -> Result<Vec<Vec<i32>>, ControllerError> {
    let bad = |m: String| Err(ControllerError::InvalidReplicaAssignment(m));
    let Some(first) = assignment.first() else {
        return bad("no partitions".into());
    };
    if assignment.len() > PARTITIONS_MAX as usize {
        return Err(ControllerError::InvalidPartitions(assignment.len() as i32));
    }
    for (p, replicas) in assignment.iter().enumerate() {
        if replicas.is_empty() || replicas.len() != first.len() {
            return bad(format!(
                "partition {p} has {} replicas, partition 0 has {}",
                replicas.len(),
                first.len()
            ));
        }
        let distinct: BTreeSet<i32> = replicas.iter().copied().collect();
        if distinct.len() != replicas.len() {
            return bad(format!("partition {p} names a broker twice: {replicas:?}"));
        }
        if let Some(r) = replicas.iter().find(|r| !image.brokers.contains_key(r)) {
            return bad(format!("partition {p}: broker {r} is not registered"));
        }
        if replicas
            .iter()
            .all(|r| image.brokers.get(r).is_none_or(|b| b.fenced))
        {
            return bad(format!("partition {p}: every replica is fenced"));
        }
    }
    Ok(assignment.to_vec())
}

/// Places `rf` replicas for each of `partitions` over `brokers` (id, rack), deterministically.
///
/// Brokers are ordered rack by rack in turn (rack A's first, rack B's first, …, rack A's
/// second, …), so neighbours in the order sit on different racks. Partition `p` starts at
/// position `p` and takes brokers in order, skipping any whose rack it already uses while an
/// unused rack remains: replicas of one partition land on distinct racks wherever the racks
/// allow, and leaders (the first replica) rotate over all brokers.
pub fn place_replicas(
    brokers: &[(i32, Option<&str>)],
    partitions: i32,
    rf: i32,
) -> Result<Vec<Vec<i32>>, ControllerError> {
    if rf <= 0 || rf as usize > brokers.len() {
        return Err(ControllerError::InvalidReplicationFactor {
            wanted: rf,
            available: brokers.len(),
        });
    }
    let mut by_rack: BTreeMap<Option<&str>, Vec<i32>> = BTreeMap::new();
    for (id, rack) in brokers {
        by_rack.entry(*rack).or_default().push(*id);
    }
    for ids in by_rack.values_mut() {
        ids.sort_unstable();
    }
    let racks_n = by_rack.len();
    let mut order: Vec<(i32, Option<&str>)> = Vec::with_capacity(brokers.len());
    let longest = by_rack.values().map(Vec::len).max().unwrap_or(0);
    for i in 0..longest {
        for (rack, ids) in &by_rack {
            if let Some(id) = ids.get(i) {
                order.push((*id, *rack));
            }
        }
    }
    let n = order.len();
    let mut out = Vec::with_capacity(partitions.max(0) as usize);
    for p in 0..partitions as usize {
        let mut chosen: Vec<i32> = Vec::with_capacity(rf as usize);
        let mut racks: BTreeSet<Option<&str>> = BTreeSet::new();
        // Two passes at most: first only new racks, then anyone not chosen yet.
        for pass in 0..2 {
            for k in 0..n {
                if chosen.len() == rf as usize {
                    break;
                }
                let (id, rack) = order[(p + k) % n];
                let rack_ok = pass == 1 || racks.len() == racks_n || !racks.contains(&rack);
                if rack_ok && !chosen.contains(&id) {
                    chosen.push(id);
                    racks.insert(rack);
                }
            }
        }
        out.push(chosen);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uuid(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn reg(id: i32, incarnation: u128, dir: u128, rack: Option<&str>) -> RegisterRequest {
        RegisterRequest {
            broker_id: id,
            incarnation_id: uuid(incarnation),
            directory_id: uuid(dir),
            cluster_id: None,
            listeners: vec![Listener {
                name: "PLAINTEXT".into(),
                host: "localhost".into(),
                port: 9000 + id as u16,
            }],
            rack: rack.map(str::to_string),
        }
    }

    /// Applies a decision as the quorum would, at the next index.
    fn commit(img: &mut MetadataImage, records: &[MetadataRecord]) {
        assert_eq!(img.apply_all(records), vec![]);
        img.applied_index += 1;
    }

    /// An image with brokers 1..=n registered and unfenced, sessions started at `now`.
    fn cluster(ctl: &mut Controller, n: i32, now: u64) -> MetadataImage {
        let mut img = MetadataImage::default();
        ctl.activate(1, &img, now);
        for id in 1..=n {
            let epoch = img.applied_index as i64 + 1;
            let recs = ctl
                .register(
                    &img,
                    &reg(id, id as u128, 100 + id as u128, None),
                    epoch,
                    now,
                )
                .unwrap();
            commit(&mut img, &recs);
            let hb = HeartbeatRequest {
                broker_id: id,
                broker_epoch: epoch,
                metadata_offset: img.applied_index,
                want_shutdown: false,
            };
            let (reply, recs) = ctl.heartbeat(&img, &hb, now).unwrap();
            assert!(!reply.fenced);
            commit(&mut img, &recs);
        }
        img
    }

    fn topic(name: &str, id: u128, partitions: i32, rf: i32) -> CreateTopicRequest {
        CreateTopicRequest {
            assignment: None,
            name: name.into(),
            topic_id: uuid(id),
            partitions,
            replication_factor: rf,
            configs: BTreeMap::new(),
        }
    }

    #[test]
    fn preferred_and_unclean_elections_follow_kafkas_rules() {
        let mut ctl = Controller::new(ControllerConfig::default());
        let mut img = cluster(&mut ctl, 3, 0);
        let mut req = topic("t", 9, 1, 3);
        req.assignment = Some(vec![vec![1, 2, 3]]);
        let recs = ctl.create_topic(&img, &req).unwrap();
        commit(&mut img, &recs);
        let part = |img: &MetadataImage| img.topics[&uuid(9)].partitions[&0].clone();
        assert_eq!(
            part(&img).leader,
            1,
            "the first replica of an assignment leads"
        );
        // Nothing to do while the preferred replica leads.
        assert_eq!(
            elect(&img, &part(&img), ElectionKind::Preferred),
            Err(ControllerError::ElectionNotNeeded)
        );
        assert!(preferred_rebalance(&img, 10).is_empty());
        // Broker 1 is fenced: 2 leads; while 1 is fenced or out of the ISR it cannot lead.
        let mut fence = vec![MetadataRecord::FenceBroker {
            broker_id: 1,
            broker_epoch: img.brokers[&1].broker_epoch,
        }];
        fence.extend(fence_changes(&img, 1));
        commit(&mut img, &fence);
        let p = part(&img);
        assert_eq!((p.leader, p.isr.clone()), (2, vec![2, 3]));
        assert_eq!(
            elect(&img, &p, ElectionKind::Preferred),
            Err(ControllerError::PreferredLeaderNotAvailable)
        );
        // Back, unfenced and in the ISR again: the rebalance gives it its leadership back.
        let b1 = img.brokers[&1].clone();
        let recs = unfence_changes(&img, &b1);
        commit(&mut img, &recs);
        let mut back = part(&img);
        back.isr = vec![2, 3, 1];
        back.partition_epoch += 1;
        commit(&mut img, &[MetadataRecord::Partition(back)]);
        let recs = preferred_rebalance(&img, 10);
        assert_eq!(recs.len(), 1);
        commit(&mut img, &recs);
        let p = part(&img);
        assert_eq!(p.leader, 1);
        assert_eq!(p.leader_epoch, 2, "every election raises the leader epoch");
        // Unclean: only for a leaderless partition; prefers a live ISR member, else any live
        // replica (which becomes the whole ISR).
        assert_eq!(
            elect(&img, &p, ElectionKind::Unclean),
            Err(ControllerError::ElectionNotNeeded)
        );
        let mut lost = p.clone();
        lost.leader = NO_LEADER;
        lost.isr = vec![3];
        let mut fence3 = vec![MetadataRecord::FenceBroker {
            broker_id: 3,
            broker_epoch: img.brokers[&3].broker_epoch,
        }];
        fence3.push(MetadataRecord::Partition(lost));
        commit(&mut img, &fence3);
        let e = elect(&img, &part(&img), ElectionKind::Unclean).unwrap();
        assert_eq!((e.leader, e.isr), (1, vec![1]));
        // With unclean.leader.election.enable on the topic, fencing the last ISR member
        // elects a live replica outside it at once.
        let mut ctl2 = Controller::new(ControllerConfig::default());
        let mut img2 = cluster(&mut ctl2, 3, 0);
        let mut req = topic("u", 7, 1, 3);
        req.assignment = Some(vec![vec![1, 2, 3]]);
        req.configs
            .insert("unclean.leader.election.enable".into(), "true".into());
        let recs = ctl2.create_topic(&img2, &req).unwrap();
        commit(&mut img2, &recs);
        let mut p = img2.topics[&uuid(7)].partitions[&0].clone();
        p.isr = vec![1];
        p.partition_epoch += 1;
        commit(&mut img2, &[MetadataRecord::Partition(p)]);
        let changes = fence_changes(&img2, 1);
        let MetadataRecord::Partition(after) = &changes[0] else {
            panic!("{changes:?}")
        };
        assert_eq!((after.leader, after.isr.clone()), (2, vec![2]));
    }

    #[test]
    fn reassignment_adds_then_completes_when_the_target_is_in_sync() {
        let mut ctl = Controller::new(ControllerConfig::default());
        let mut img = cluster(&mut ctl, 4, 0);
        let mut t = topic("t", 9, 1, 3);
        t.assignment = Some(vec![vec![1, 2, 3]]);
        {
            let recs = ctl.create_topic(&img, &t).unwrap();
            commit(&mut img, &recs)
        };
        let part = |img: &MetadataImage| img.topics[&uuid(9)].partitions[&0].clone();
        let epoch = |img: &MetadataImage, b: i32| img.brokers[&b].broker_epoch;
        // Move 1 (the leader) out and 4 in: 4 is added at once, outside the ISR.
        let recs = ctl
            .alter_reassignment(&img, "t", 0, Some(&[4, 2, 3]), true)
            .unwrap();
        commit(&mut img, &recs);
        let p = part(&img);
        assert_eq!(p.replicas, vec![4, 2, 3, 1]);
        assert_eq!((p.adding.clone(), p.removing.clone()), (vec![4], vec![1]));
        assert_eq!((p.leader, p.isr.clone()), (1, vec![1, 2, 3]));
        // The same target again changes nothing; a cancel of nothing is refused elsewhere.
        assert!(ctl
            .alter_reassignment(&img, "t", 0, Some(&[4, 2, 3]), true)
            .unwrap()
            .is_empty());
        // 4 catches up: the leader's ISR change completes the move, and 1 hands leadership
        // to the first in-sync target replica.
        let (next, recs) = ctl
            .alter_partition(
                &img,
                1,
                epoch(&img, 1),
                uuid(9),
                0,
                p.leader_epoch,
                p.partition_epoch,
                &[1, 2, 3, 4],
            )
            .unwrap();
        commit(&mut img, &recs);
        assert_eq!(next, part(&img));
        assert_eq!(next.replicas, vec![4, 2, 3]);
        assert_eq!(next.isr, vec![2, 3, 4]);
        assert_eq!((next.leader, next.leader_epoch), (4, p.leader_epoch + 1));
        assert!(!next.reassigning());
        // Nothing to cancel now.
        assert_eq!(
            ctl.alter_reassignment(&img, "t", 0, None, true)
                .unwrap_err(),
            ControllerError::NoReassignmentInProgress
        );
        // KIP-860: a caller that forbids a change of replication factor is refused one.
        assert!(matches!(
            ctl.alter_reassignment(&img, "t", 0, Some(&[4, 3]), false)
                .unwrap_err(),
            ControllerError::InvalidReplicationFactor { .. }
        ));
        // A pure shrink (every target replica in sync) completes at once; the leader stays.
        {
            let recs = ctl
                .alter_reassignment(&img, "t", 0, Some(&[4, 3]), true)
                .unwrap();
            commit(&mut img, &recs)
        };
        let p = part(&img);
        assert_eq!(
            (p.replicas.clone(), p.isr.clone(), p.leader),
            (vec![4, 3], vec![3, 4], 4)
        );
        // Bad targets: unknown broker, duplicates, empty.
        for bad in [&[4, 9][..], &[3, 3][..], &[][..]] {
            assert!(matches!(
                ctl.alter_reassignment(&img, "t", 0, Some(bad), true)
                    .unwrap_err(),
                ControllerError::InvalidReplicaAssignment(_)
            ));
        }
        assert!(matches!(
            ctl.alter_reassignment(&img, "t", 1, Some(&[1]), true)
                .unwrap_err(),
            ControllerError::UnknownTopic(_)
        ));
    }

    #[test]
    fn reassignment_cancel_and_replace_go_back_to_the_original_replicas() {
        let mut ctl = Controller::new(ControllerConfig::default());
        let mut img = cluster(&mut ctl, 5, 0);
        let mut t = topic("t", 9, 1, 3);
        t.assignment = Some(vec![vec![1, 2, 3]]);
        {
            let recs = ctl.create_topic(&img, &t).unwrap();
            commit(&mut img, &recs)
        };
        let part = |img: &MetadataImage| img.topics[&uuid(9)].partitions[&0].clone();
        let epoch = |img: &MetadataImage, b: i32| img.brokers[&b].broker_epoch;
        {
            let recs = ctl
                .alter_reassignment(&img, "t", 0, Some(&[4, 5, 3]), true)
                .unwrap();
            commit(&mut img, &recs)
        };
        // 4 joins the ISR, 5 not yet: still moving.
        let p = part(&img);
        let (_, recs) = ctl
            .alter_partition(
                &img,
                1,
                epoch(&img, 1),
                uuid(9),
                0,
                p.leader_epoch,
                p.partition_epoch,
                &[1, 2, 3, 4],
            )
            .unwrap();
        commit(&mut img, &recs);
        let p = part(&img);
        assert!(p.reassigning());
        assert_eq!(p.isr, vec![1, 2, 3, 4]);
        // A new target replaces the running one, computed from the original replicas 1, 2, 3.
        {
            let recs = ctl
                .alter_reassignment(&img, "t", 0, Some(&[5, 2, 3]), true)
                .unwrap();
            commit(&mut img, &recs)
        };
        let p = part(&img);
        assert_eq!(p.replicas, vec![5, 2, 3, 1]);
        assert_eq!((p.adding.clone(), p.removing.clone()), (vec![5], vec![1]));
        assert_eq!(p.isr, vec![1, 2, 3], "4 left with its target");
        // Cancelled: back to 1, 2, 3, 5 out of the ISR and the replicas, the leader unchanged.
        let before = p.clone();
        {
            let recs = ctl.alter_reassignment(&img, "t", 0, None, true).unwrap();
            commit(&mut img, &recs)
        };
        let p = part(&img);
        assert_eq!(p.replicas, vec![2, 3, 1]);
        assert!(!p.reassigning());
        assert_eq!((p.isr.clone(), p.leader), (vec![1, 2, 3], 1));
        assert_eq!(p.leader_epoch, before.leader_epoch);
        assert_eq!(p.partition_epoch, before.partition_epoch + 1);
    }

    #[test]
    fn a_cancel_that_would_elect_uncleanly_is_refused_unless_the_topic_allows_it() {
        let mut ctl = Controller::new(ControllerConfig::default());
        let mut img = cluster(&mut ctl, 4, 0);
        let mut t = topic("t", 9, 1, 2);
        t.assignment = Some(vec![vec![1, 2]]);
        let recs = ctl.create_topic(&img, &t).unwrap();
        commit(&mut img, &recs);
        let part = |img: &MetadataImage| img.topics[&uuid(9)].partitions[&0].clone();
        let recs = ctl
            .alter_reassignment(&img, "t", 0, Some(&[4, 3, 2]), true)
            .unwrap();
        commit(&mut img, &recs);
        // 4 joins the ISR, then 1 and 2 leave it: only an added replica is in sync (and leads).
        let p = part(&img);
        let e1 = img.brokers[&1].broker_epoch;
        let (_, recs) = ctl
            .alter_partition(
                &img,
                1,
                e1,
                uuid(9),
                0,
                p.leader_epoch,
                p.partition_epoch,
                &[1, 2, 4],
            )
            .unwrap();
        commit(&mut img, &recs);
        let recs = fence_changes(&img, 2);
        commit(&mut img, &recs);
        let recs = fence_changes(&img, 1);
        commit(&mut img, &recs);
        let p = part(&img);
        assert_eq!((p.isr.clone(), p.leader), (vec![4], 4), "{p:?}");
        assert!(matches!(
            ctl.alter_reassignment(&img, "t", 0, None, true)
                .unwrap_err(),
            ControllerError::InvalidReplicaAssignment(_)
        ));
        let recs = ctl
            .alter_topic_configs(
                &img,
                "t",
                &[("unclean.leader.election.enable".into(), Some("true".into()))],
            )
            .unwrap();
        commit(&mut img, &recs);
        let recs = ctl.alter_reassignment(&img, "t", 0, None, true).unwrap();
        commit(&mut img, &recs);
        let p = part(&img);
        assert_eq!(
            (p.replicas.clone(), p.isr.clone()),
            (vec![2, 1], vec![2, 1]),
            "{p:?}"
        );
        assert!(p.leader == 1 || p.leader == 2, "{p:?}");
    }

    #[test]
    fn create_partitions_takes_an_operators_assignment() {
        let mut ctl = Controller::new(ControllerConfig::default());
        let mut img = cluster(&mut ctl, 3, 0);
        {
            let recs = ctl.create_topic(&img, &topic("t", 9, 1, 2)).unwrap();
            commit(&mut img, &recs)
        };
        let a = vec![vec![3, 1], vec![2, 3]];
        {
            let recs = ctl.create_partitions(&img, "t", 3, Some(&a)).unwrap();
            commit(&mut img, &recs)
        };
        let parts = &img.topics[&uuid(9)].partitions;
        assert_eq!(parts[&1].replicas, vec![3, 1]);
        assert_eq!(
            (parts[&2].replicas.clone(), parts[&2].leader),
            (vec![2, 3], 2)
        );
        // The count must match the new partitions, the replication factor the topic's.
        let cases = [
            (5, vec![vec![1, 2]]),
            (4, vec![vec![1, 2, 3]]),
            (4, vec![vec![1]]),
        ];
        for (n, bad) in cases {
            assert!(matches!(
                ctl.create_partitions(&img, "t", n, Some(&bad)).unwrap_err(),
                ControllerError::InvalidReplicaAssignment(_)
            ));
        }
    }

    #[test]
    fn alter_partition_only_from_the_current_leader_at_the_current_epochs() {
        let mut ctl = Controller::new(ControllerConfig::default());
        let mut img = cluster(&mut ctl, 3, 0);
        let recs = ctl.create_topic(&img, &topic("t", 9, 1, 3)).unwrap();
        commit(&mut img, &recs);
        let p = img.topics[&uuid(9)].partitions[&0].clone();
        let epoch = |img: &MetadataImage, b: i32| img.brokers[&b].broker_epoch;
        let leader = p.leader;
        let follower = *p.replicas.iter().find(|r| **r != leader).unwrap();
        let shrunk: Vec<i32> = p.isr.iter().copied().filter(|r| *r != follower).collect();
        // Not the leader, a stale leader epoch, a stale partition epoch: refused.
        let e = ctl
            .alter_partition(
                &img,
                follower,
                epoch(&img, follower),
                uuid(9),
                0,
                p.leader_epoch,
                p.partition_epoch,
                &shrunk,
            )
            .unwrap_err();
        assert_eq!(e, ControllerError::NotLeader(follower));
        let e = ctl
            .alter_partition(
                &img,
                leader,
                epoch(&img, leader),
                uuid(9),
                0,
                p.leader_epoch + 1,
                p.partition_epoch,
                &shrunk,
            )
            .unwrap_err();
        assert!(matches!(e, ControllerError::FencedLeaderEpoch { .. }));
        let e = ctl
            .alter_partition(
                &img,
                leader,
                epoch(&img, leader),
                uuid(9),
                0,
                p.leader_epoch,
                p.partition_epoch + 1,
                &shrunk,
            )
            .unwrap_err();
        assert!(matches!(e, ControllerError::InvalidUpdateVersion { .. }));
        // The leader shrinks the ISR; the partition epoch moves.
        let (next, recs) = ctl
            .alter_partition(
                &img,
                leader,
                epoch(&img, leader),
                uuid(9),
                0,
                p.leader_epoch,
                p.partition_epoch,
                &shrunk,
            )
            .unwrap();
        assert_eq!(next.isr, shrunk);
        assert_eq!(next.partition_epoch, p.partition_epoch + 1);
        commit(&mut img, &recs);
        // A fenced broker may not join (KIP-841); once unfenced it may.
        let recs = fence_changes(&img, follower);
        commit(&mut img, &recs);
        let follower_epoch = epoch(&img, follower);
        commit(
            &mut img,
            &[MetadataRecord::FenceBroker {
                broker_id: follower,
                broker_epoch: follower_epoch,
            }],
        );
        let p = img.topics[&uuid(9)].partitions[&0].clone();
        let mut grown = p.isr.clone();
        grown.push(follower);
        let e = ctl
            .alter_partition(
                &img,
                leader,
                epoch(&img, leader),
                uuid(9),
                0,
                p.leader_epoch,
                p.partition_epoch,
                &grown,
            )
            .unwrap_err();
        assert_eq!(e, ControllerError::IneligibleReplica(follower));
        commit(
            &mut img,
            &[MetadataRecord::UnfenceBroker {
                broker_id: follower,
                broker_epoch: follower_epoch,
            }],
        );
        let (next, _) = ctl
            .alter_partition(
                &img,
                leader,
                epoch(&img, leader),
                uuid(9),
                0,
                p.leader_epoch,
                p.partition_epoch,
                &grown,
            )
            .unwrap();
        assert_eq!(next.isr, grown);
    }

    #[test]
    fn duplicate_id_refused_while_live_restart_with_same_dir_accepted() {
        let mut ctl = Controller::new(ControllerConfig::default());
        let mut img = cluster(&mut ctl, 3, 0);
        let recs = ctl.create_topic(&img, &topic("t", 9, 3, 3)).unwrap();
        commit(&mut img, &recs);
        // Another process (other incarnation, other disk) claims id 2 within its session.
        let err = ctl
            .register(&img, &reg(2, 77, 777, None), 99, 1_000)
            .unwrap_err();
        assert_eq!(err, ControllerError::DuplicateBrokerRegistration(2));
        assert_eq!(err.code(), 101);
        // Broker 2 restarts from its own data dir: accepted at once, old incarnation fenced,
        // leaderships moved in the same change.
        let recs = ctl
            .register(&img, &reg(2, 78, 102, None), 50, 1_000)
            .unwrap();
        commit(&mut img, &recs);
        let b = &img.brokers[&2];
        assert!(b.fenced && b.incarnation_id == uuid(78) && b.broker_epoch == 50);
        for p in img.partitions() {
            assert_ne!(p.leader, 2);
            assert!(!p.isr.contains(&2));
        }
        // The old incarnation's heartbeats are stale now.
        let hb = HeartbeatRequest {
            broker_id: 2,
            broker_epoch: 4,
            metadata_offset: 100,
            want_shutdown: false,
        };
        assert_eq!(
            ctl.heartbeat(&img, &hb, 1_100).unwrap_err().code(),
            ResponseError::StaleBrokerEpoch.code()
        );
        // Once the session of the new incarnation runs out, a third process may take the id.
        assert!(ctl
            .register(&img, &reg(2, 79, 779, None), 60, 5_000)
            .is_err());
        assert!(ctl
            .register(&img, &reg(2, 79, 779, None), 60, 10_001)
            .is_ok());
    }

    #[test]
    fn unfenced_only_once_caught_up() {
        let mut ctl = Controller::new(ControllerConfig::default());
        let mut img = MetadataImage::default();
        ctl.activate(1, &img, 0);
        let recs = ctl.register(&img, &reg(1, 1, 1, None), 1, 0).unwrap();
        commit(&mut img, &recs);
        let mut hb = HeartbeatRequest {
            broker_id: 1,
            broker_epoch: 1,
            metadata_offset: 0,
            want_shutdown: false,
        };
        let (reply, recs) = ctl.heartbeat(&img, &hb, 10).unwrap();
        assert!(reply.fenced && recs.is_empty());
        hb.metadata_offset = 1;
        let (reply, recs) = ctl.heartbeat(&img, &hb, 20).unwrap();
        assert!(!reply.fenced);
        commit(&mut img, &recs);
        assert!(img.is_unfenced(1));
        let other = RegisterRequest {
            cluster_id: Some(uuid(5)),
            ..reg(2, 2, 2, None)
        };
        img.cluster_id = Some(uuid(6));
        assert_eq!(
            ctl.register(&img, &other, 3, 30).unwrap_err().code(),
            ResponseError::InconsistentClusterId.code()
        );
    }

    #[test]
    fn session_timeout_fences_and_moves_leadership_in_one_change() {
        let mut ctl = Controller::new(ControllerConfig::default());
        let mut img = cluster(&mut ctl, 3, 0);
        let recs = ctl.create_topic(&img, &topic("t", 9, 6, 3)).unwrap();
        commit(&mut img, &recs);
        let recs = ctl.create_topic(&img, &topic("solo", 10, 3, 1)).unwrap();
        commit(&mut img, &recs);
        // Brokers 2 and 3 keep heartbeating, 1 goes silent.
        for id in [2, 3] {
            let hb = HeartbeatRequest {
                broker_id: id,
                broker_epoch: img.brokers[&id].broker_epoch,
                metadata_offset: img.applied_index,
                want_shutdown: false,
            };
            ctl.heartbeat(&img, &hb, 8_000).unwrap();
        }
        assert!(ctl.expire_sessions(&img, 8_999).is_empty());
        assert_eq!(ctl.next_deadline_ms(), Some(9_000));
        let recs = ctl.expire_sessions(&img, 9_000);
        assert!(matches!(
            recs[0],
            MetadataRecord::FenceBroker { broker_id: 1, .. }
        ));
        let before = img.clone();
        commit(&mut img, &recs);
        assert!(!img.is_unfenced(1));
        for p in img.partitions() {
            let old = before.topics[&p.topic_id].partitions[&p.partition].clone();
            if old.replicas == vec![1] {
                // Last ISR member: kept, no leader.
                assert_eq!((p.isr.clone(), p.leader), (vec![1], NO_LEADER));
            } else {
                assert!(!p.isr.contains(&1));
                assert!(p.leader != 1 && img.is_unfenced(p.leader));
            }
            if old.leader == 1 {
                assert_eq!(p.leader_epoch, old.leader_epoch + 1);
            }
        }
        // Broker 1 comes back, heartbeats with its epoch, and leads its lone partitions again.
        let hb = HeartbeatRequest {
            broker_id: 1,
            broker_epoch: img.brokers[&1].broker_epoch,
            metadata_offset: img.applied_index,
            want_shutdown: false,
        };
        let (reply, recs) = ctl.heartbeat(&img, &hb, 9_500).unwrap();
        assert!(!reply.fenced);
        commit(&mut img, &recs);
        let solo = img.topic_by_name("solo").unwrap();
        assert!(solo
            .partitions
            .values()
            .all(|p| p.leader != NO_LEADER && img.is_unfenced(p.leader)));
    }

    #[test]
    fn two_brokers_expiring_together_leave_no_fenced_leader() {
        let mut ctl = Controller::new(ControllerConfig::default());
        let mut img = cluster(&mut ctl, 3, 0);
        let recs = ctl.create_topic(&img, &topic("t", 9, 6, 3)).unwrap();
        commit(&mut img, &recs);
        let hb = HeartbeatRequest {
            broker_id: 3,
            broker_epoch: img.brokers[&3].broker_epoch,
            metadata_offset: img.applied_index,
            want_shutdown: false,
        };
        ctl.heartbeat(&img, &hb, 5_000).unwrap();
        let recs = ctl.expire_sessions(&img, 9_000);
        commit(&mut img, &recs);
        for p in img.partitions() {
            assert_eq!((p.leader, p.isr.clone()), (3, vec![3]));
        }
    }

    #[test]
    fn failover_gives_every_broker_a_fresh_session() {
        let mut ctl = Controller::new(ControllerConfig::default());
        let img = cluster(&mut ctl, 2, 0);
        let mut next = Controller::new(ControllerConfig::default());
        next.activate(2, &img, 20_000);
        assert!(next.expire_sessions(&img, 28_999).is_empty());
        assert_eq!(next.expire_sessions(&img, 29_000).len(), 2);
    }

    #[test]
    fn placement_spreads_over_racks_and_refuses_too_many_replicas() {
        let brokers = [
            (1, Some("a")),
            (2, Some("a")),
            (3, Some("b")),
            (4, Some("b")),
            (5, Some("c")),
        ];
        let p = place_replicas(&brokers, 10, 3).unwrap();
        let rack = |id: i32| brokers.iter().find(|b| b.0 == id).unwrap().1;
        let mut leaders = BTreeSet::new();
        for replicas in &p {
            assert_eq!(replicas.len(), 3);
            let racks: BTreeSet<_> = replicas.iter().map(|r| rack(*r)).collect();
            assert_eq!(racks.len(), 3, "{replicas:?}");
            leaders.insert(replicas[0]);
        }
        assert_eq!(leaders.len(), 5);
        // More replicas than racks: distinct brokers, every rack used.
        for replicas in place_replicas(&brokers, 5, 5).unwrap() {
            assert_eq!(replicas.iter().collect::<BTreeSet<_>>().len(), 5);
        }
        assert_eq!(
            place_replicas(&brokers, 1, 6).unwrap_err().code(),
            ResponseError::InvalidReplicationFactor.code()
        );
        assert!(place_replicas(&brokers, 1, 0).is_err());

        let mut ctl = Controller::new(ControllerConfig::default());
        let mut img = cluster(&mut ctl, 3, 0);
        let recs = ctl.expire_sessions(&img, 9_000);
        commit(&mut img, &recs);
        assert!(matches!(
            ctl.create_topic(&img, &topic("t", 1, 1, 1)),
            Err(ControllerError::InvalidReplicationFactor { available: 0, .. })
        ));
    }

    #[test]
    fn topics_configs_deletion_and_producer_ids() {
        let mut ctl = Controller::new(ControllerConfig::default());
        let mut img = cluster(&mut ctl, 1, 0);
        let mut req = topic("t", 9, 2, 1);
        req.configs.insert("retention.ms".into(), "5".into());
        let recs = ctl.create_topic(&img, &req).unwrap();
        commit(&mut img, &recs);
        assert_eq!(
            ctl.create_topic(&img, &req).unwrap_err().code(),
            ResponseError::TopicAlreadyExists.code()
        );
        let changes = [
            ("retention.ms".to_string(), None),
            ("cleanup.policy".to_string(), Some("compact".to_string())),
        ];
        let recs = ctl.alter_topic_configs(&img, "t", &changes).unwrap();
        commit(&mut img, &recs);
        let t = img.topic_by_name("t").unwrap();
        assert_eq!(t.configs.len(), 1);
        assert_eq!(t.configs["cleanup.policy"], "compact");
        let epoch = img.brokers[&1].broker_epoch;
        let (first, recs) = ctl.allocate_producer_ids(&img, 1, epoch).unwrap();
        commit(&mut img, &recs);
        let (second, _) = ctl.allocate_producer_ids(&img, 1, epoch).unwrap();
        assert_eq!((first, second), (0, 1_000));
        let recs = ctl.delete_topic(&img, "t").unwrap();
        commit(&mut img, &recs);
        assert!(img.topics.is_empty());
        assert!(ctl.delete_topic(&img, "t").is_err());
    }

    #[test]
    fn controlled_shutdown_moves_leadership_first_and_stays_fenced() {
        let mut ctl = Controller::new(ControllerConfig::default());
        let mut img = cluster(&mut ctl, 3, 0);
        let recs = ctl.create_topic(&img, &topic("t", 9, 6, 2)).unwrap();
        commit(&mut img, &recs);
        let mut hb = HeartbeatRequest {
            broker_id: 2,
            broker_epoch: img.brokers[&2].broker_epoch,
            metadata_offset: img.applied_index,
            want_shutdown: true,
        };
        let (reply, recs) = ctl.heartbeat(&img, &hb, 100).unwrap();
        assert!(reply.should_shut_down && reply.fenced);
        commit(&mut img, &recs);
        assert!(!img.is_unfenced(2));
        for p in img.partitions() {
            assert!(p.leader != 2 && !p.isr.contains(&2));
        }
        // Asking again changes nothing; a plain heartbeat later (a restart of the same
        // incarnation would re-register) unfences it once caught up.
        let (reply, recs) = ctl.heartbeat(&img, &hb, 200).unwrap();
        assert!(reply.should_shut_down && recs.is_empty());
        hb.want_shutdown = false;
        let (reply, recs) = ctl.heartbeat(&img, &hb, 300).unwrap();
        assert!(!reply.fenced && !reply.should_shut_down);
        commit(&mut img, &recs);
        assert!(img.is_unfenced(2));
    }
}
