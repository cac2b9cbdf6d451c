//! One file per Kafka API, named after it (`join_group.rs` answers JoinGroup). Each handler is
//! thin: decode the request, route each part to the shard that owns it, call the domain
//! (partition, group, cluster), map the domain's errors to Kafka codes here at the boundary, and
//! build the response. `util.rs` holds what several handlers share.

pub mod alter_configs;
pub mod alter_partition_reassignments;
pub mod api_versions;
pub mod consumer_group_describe;
pub mod consumer_group_heartbeat;
pub mod create_partitions;
pub mod create_topics;
pub mod delete_groups;
pub mod delete_records;
pub mod delete_topics;
pub mod describe_cluster;
pub mod describe_configs;
pub mod describe_groups;
pub mod describe_log_dirs;
pub mod describe_quorum;
pub mod elect_leaders;
pub mod fetch;
pub mod find_coordinator;
pub mod heartbeat;
pub mod incremental_alter_configs;
pub mod init_producer_id;
pub mod join_group;
pub mod leave_group;
pub mod list_groups;
pub mod list_offsets;
pub mod list_partition_reassignments;
pub mod metadata;
pub mod offset_commit;
pub mod offset_delete;
pub mod offset_fetch;
pub mod offset_for_leader_epoch;
pub mod produce;
pub mod sync_group;
pub mod util;

use kafka_protocol::messages::{RequestHeader, RequestKind, ResponseKind};

use super::{ConnCtx, OrderGate};

/// A handler's answer: a response to encode, or a body already encoded in chunks (fetch).
pub enum Reply {
    Kind(Box<ResponseKind>),
    Encoded(Vec<bytes::Bytes>),
}

/// Runs the handler of one request; `None` means no response is due (acks=0 produce).
/// `gate` lets the connection read its next request early (see `OrderGate`).
pub async fn dispatch(
    ctx: &ConnCtx,
    header: &RequestHeader,
    req: RequestKind,
    gate: &OrderGate,
) -> Option<Reply> {
    match req {
        RequestKind::Fetch(r) => Some(Reply::Encoded(
            fetch::handle(ctx, header.request_api_version, r).await,
        )),
        RequestKind::Produce(r) => produce::handle(ctx, header.request_api_version, r, gate)
            .await
            .map(|r| Reply::Kind(Box::new(ResponseKind::Produce(r)))),
        other => dispatch_kind(ctx, header, other)
            .await
            .map(|k| Reply::Kind(Box::new(k))),
    }
}

async fn dispatch_kind(
    ctx: &ConnCtx,
    header: &RequestHeader,
    req: RequestKind,
) -> Option<ResponseKind> {
    let version = header.request_api_version;
    Some(match req {
        RequestKind::ApiVersions(_) => ResponseKind::ApiVersions(api_versions::response(0)),
        RequestKind::Metadata(r) => ResponseKind::Metadata(metadata::handle(ctx, version, r).await),
        RequestKind::ListOffsets(r) => {
            ResponseKind::ListOffsets(list_offsets::handle(ctx, version, r).await)
        }
        RequestKind::OffsetForLeaderEpoch(r) => {
            ResponseKind::OffsetForLeaderEpoch(offset_for_leader_epoch::handle(ctx, r).await)
        }
        RequestKind::CreateTopics(r) if ctx.shard.node.cluster.is_some() => {
            ResponseKind::CreateTopics(create_topics::forwarded(ctx, version, r).await)
        }
        RequestKind::CreateTopics(r) => {
            ResponseKind::CreateTopics(create_topics::handle(ctx, r).await)
        }
        RequestKind::DeleteTopics(r) if ctx.shard.node.cluster.is_some() => {
            ResponseKind::DeleteTopics(delete_topics::forwarded(ctx, version, r).await)
        }
        RequestKind::DeleteTopics(r) => {
            ResponseKind::DeleteTopics(delete_topics::handle(ctx, version, r).await)
        }
        RequestKind::DescribeQuorum(r) => {
            ResponseKind::DescribeQuorum(describe_quorum::handle(ctx, version, r).await)
        }
        RequestKind::DescribeLogDirs(r) => {
            ResponseKind::DescribeLogDirs(describe_log_dirs::handle(ctx, version, r).await)
        }
        RequestKind::ElectLeaders(r) => {
            ResponseKind::ElectLeaders(elect_leaders::handle(ctx, version, r).await)
        }
        RequestKind::AlterPartitionReassignments(r) => ResponseKind::AlterPartitionReassignments(
            alter_partition_reassignments::handle(ctx, version, r).await,
        ),
        RequestKind::ListPartitionReassignments(r) => {
            ResponseKind::ListPartitionReassignments(list_partition_reassignments::handle(ctx, r))
        }
        RequestKind::CreatePartitions(r) => {
            ResponseKind::CreatePartitions(create_partitions::handle(ctx, version, r).await)
        }
        RequestKind::DeleteRecords(r) => {
            ResponseKind::DeleteRecords(delete_records::handle(ctx, r).await)
        }
        RequestKind::DescribeConfigs(r) => {
            ResponseKind::DescribeConfigs(describe_configs::handle(ctx, r).await)
        }
        RequestKind::AlterConfigs(r) => {
            ResponseKind::AlterConfigs(alter_configs::handle(ctx, r).await)
        }
        RequestKind::IncrementalAlterConfigs(r) => {
            ResponseKind::IncrementalAlterConfigs(incremental_alter_configs::handle(ctx, r).await)
        }
        RequestKind::InitProducerId(r) => {
            ResponseKind::InitProducerId(init_producer_id::handle(ctx, r).await)
        }
        RequestKind::DescribeCluster(r) => {
            ResponseKind::DescribeCluster(describe_cluster::handle(ctx, r))
        }
        RequestKind::FindCoordinator(r) => {
            ResponseKind::FindCoordinator(find_coordinator::handle(ctx, version, r).await)
        }
        RequestKind::JoinGroup(r) => {
            ResponseKind::JoinGroup(join_group::handle(ctx, version, r).await)
        }
        RequestKind::SyncGroup(r) => {
            ResponseKind::SyncGroup(sync_group::handle(ctx, version, r).await)
        }
        RequestKind::Heartbeat(r) => {
            ResponseKind::Heartbeat(heartbeat::handle(ctx, version, r).await)
        }
        RequestKind::LeaveGroup(r) => {
            ResponseKind::LeaveGroup(leave_group::handle(ctx, version, r).await)
        }
        RequestKind::OffsetCommit(r) => {
            ResponseKind::OffsetCommit(offset_commit::handle(ctx, version, r).await)
        }
        RequestKind::OffsetFetch(r) => {
            ResponseKind::OffsetFetch(offset_fetch::handle(ctx, version, r).await)
        }
        RequestKind::ListGroups(r) => {
            ResponseKind::ListGroups(list_groups::handle(ctx, version, r).await)
        }
        RequestKind::DescribeGroups(r) => {
            ResponseKind::DescribeGroups(describe_groups::handle(ctx, version, r).await)
        }
        RequestKind::DeleteGroups(r) => {
            ResponseKind::DeleteGroups(delete_groups::handle(ctx, version, r).await)
        }
        RequestKind::OffsetDelete(r) => {
            ResponseKind::OffsetDelete(offset_delete::handle(ctx, version, r).await)
        }
        RequestKind::ConsumerGroupHeartbeat(r) => ResponseKind::ConsumerGroupHeartbeat(
            consumer_group_heartbeat::handle(ctx, version, r).await,
        ),
        RequestKind::ConsumerGroupDescribe(r) => ResponseKind::ConsumerGroupDescribe(
            consumer_group_describe::handle(ctx, version, r).await,
        ),
        other => {
            tracing::warn!("no handler for {:?}", std::mem::discriminant(&other));
            return None;
        }
    })
}
