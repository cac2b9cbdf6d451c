//! Kafka error codes by their Kafka names, the one table the broker answers with. Every value is
//! `kafka_protocol::ResponseError`'s, so none can disagree with Kafka's numbering. Handlers map
//! domain errors to these at the boundary (`group/` uses `ResponseError` directly, since it must
//! not import `server`).
#![allow(dead_code)]

use kafka_protocol::ResponseError as E;

use crate::cluster::controller::Refused;

/// The code a refused controller operation is answered with, and its message.
pub fn controller((refused, message): (Refused, String)) -> (i16, String) {
    let code = match refused {
        Refused::InvalidTopic => INVALID_TOPIC_EXCEPTION,
        Refused::TopicExists => TOPIC_ALREADY_EXISTS,
        Refused::UnknownTopic => UNKNOWN_TOPIC_OR_PARTITION,
        Refused::InvalidPartitions => INVALID_PARTITIONS,
        Refused::InvalidReplicationFactor => INVALID_REPLICATION_FACTOR,
        Refused::InvalidConfig => INVALID_CONFIG,
        Refused::InvalidRequest => INVALID_REQUEST,
        Refused::Storage => KAFKA_STORAGE_ERROR,
        Refused::Internal => UNKNOWN_SERVER_ERROR,
    };
    (code, message)
}

/// No error. `ResponseError` has no variant for it.
pub const NONE: i16 = 0;
pub const UNKNOWN_SERVER_ERROR: i16 = E::UnknownServerError.code();
pub const OFFSET_OUT_OF_RANGE: i16 = E::OffsetOutOfRange.code();
pub const OFFSET_NOT_AVAILABLE: i16 = E::OffsetNotAvailable.code();
pub const CORRUPT_MESSAGE: i16 = E::CorruptMessage.code();
pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = E::UnknownTopicOrPartition.code();
pub const INVALID_FETCH_SIZE: i16 = E::InvalidFetchSize.code();
pub const OFFSET_METADATA_TOO_LARGE: i16 = E::OffsetMetadataTooLarge.code();
pub const NOT_LEADER_OR_FOLLOWER: i16 = E::NotLeaderOrFollower.code();
pub const ELECTION_NOT_NEEDED: i16 = E::ElectionNotNeeded.code();
pub const FENCED_LEADER_EPOCH: i16 = E::FencedLeaderEpoch.code();
pub const UNKNOWN_LEADER_EPOCH: i16 = E::UnknownLeaderEpoch.code();
pub const LEADER_NOT_AVAILABLE: i16 = E::LeaderNotAvailable.code();
pub const NOT_ENOUGH_REPLICAS: i16 = E::NotEnoughReplicas.code();
pub const NOT_ENOUGH_REPLICAS_AFTER_APPEND: i16 = E::NotEnoughReplicasAfterAppend.code();
pub const NOT_CONTROLLER: i16 = E::NotController.code();
pub const REQUEST_TIMED_OUT: i16 = E::RequestTimedOut.code();
pub const MESSAGE_TOO_LARGE: i16 = E::MessageTooLarge.code();
pub const COORDINATOR_NOT_AVAILABLE: i16 = E::CoordinatorNotAvailable.code();
pub const NOT_COORDINATOR: i16 = E::NotCoordinator.code();
pub const INVALID_TOPIC_EXCEPTION: i16 = E::InvalidTopicException.code();
pub const RECORD_LIST_TOO_LARGE: i16 = E::RecordListTooLarge.code();
pub const INVALID_REQUIRED_ACKS: i16 = E::InvalidRequiredAcks.code();
pub const ILLEGAL_GENERATION: i16 = E::IllegalGeneration.code();
pub const INVALID_GROUP_ID: i16 = E::InvalidGroupId.code();
pub const UNKNOWN_MEMBER_ID: i16 = E::UnknownMemberId.code();
pub const TOPIC_AUTHORIZATION_FAILED: i16 = E::TopicAuthorizationFailed.code();
pub const UNSUPPORTED_VERSION: i16 = E::UnsupportedVersion.code();
pub const TOPIC_ALREADY_EXISTS: i16 = E::TopicAlreadyExists.code();
pub const INVALID_PARTITIONS: i16 = E::InvalidPartitions.code();
pub const INVALID_REPLICATION_FACTOR: i16 = E::InvalidReplicationFactor.code();
pub const INVALID_REPLICA_ASSIGNMENT: i16 = E::InvalidReplicaAssignment.code();
pub const NO_REASSIGNMENT_IN_PROGRESS: i16 = E::NoReassignmentInProgress.code();
pub const INVALID_CONFIG: i16 = E::InvalidConfig.code();
pub const INVALID_REQUEST: i16 = E::InvalidRequest.code();
pub const UNSUPPORTED_FOR_MESSAGE_FORMAT: i16 = E::UnsupportedForMessageFormat.code();
pub const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = E::OutOfOrderSequenceNumber.code();
pub const INVALID_PRODUCER_EPOCH: i16 = E::InvalidProducerEpoch.code();
pub const UNSUPPORTED_COMPRESSION_TYPE: i16 = E::UnsupportedCompressionType.code();
pub const KAFKA_STORAGE_ERROR: i16 = E::KafkaStorageError.code();
pub const POLICY_VIOLATION: i16 = E::PolicyViolation.code();
pub const INVALID_TIMESTAMP: i16 = E::InvalidTimestamp.code();
pub const UNKNOWN_TOPIC_ID: i16 = E::UnknownTopicId.code();
pub const INCONSISTENT_TOPIC_ID: i16 = E::InconsistentTopicId.code();
pub const GROUP_ID_NOT_FOUND: i16 = E::GroupIdNotFound.code();
pub const NON_EMPTY_GROUP: i16 = E::NonEmptyGroup.code();
pub const GROUP_SUBSCRIBED_TO_TOPIC: i16 = E::GroupSubscribedToTopic.code();
pub const UNKNOWN_PRODUCER_ID: i16 = E::UnknownProducerId.code();
pub const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i16 = E::TransactionalIdAuthorizationFailed.code();
pub const INVALID_RECORD: i16 = E::InvalidRecord.code();
pub const FETCH_SESSION_ID_NOT_FOUND: i16 = E::FetchSessionIdNotFound.code();
pub const INVALID_FETCH_SESSION_EPOCH: i16 = E::InvalidFetchSessionEpoch.code();
