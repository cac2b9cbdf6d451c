//! One file per Kafka API. Each handler takes the decoded request and returns the response;
//! errors become Kafka error codes here, at the boundary.

pub mod admin;
pub mod api_versions;
pub mod fetch;
pub mod groups;
pub mod list_offsets;
pub mod metadata;
pub mod produce;
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
        RequestKind::Produce(r) => produce::handle(ctx, r, gate)
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
    let v = header.request_api_version;
    Some(match req {
        RequestKind::ApiVersions(_) => ResponseKind::ApiVersions(api_versions::response(0)),
        RequestKind::Metadata(r) => ResponseKind::Metadata(metadata::handle(ctx, v, r).await),
        RequestKind::ListOffsets(r) => {
            ResponseKind::ListOffsets(list_offsets::handle(ctx, v, r).await)
        }
        RequestKind::OffsetForLeaderEpoch(r) => {
            ResponseKind::OffsetForLeaderEpoch(list_offsets::offset_for_leader_epoch(ctx, r).await)
        }
        RequestKind::CreateTopics(r) => {
            ResponseKind::CreateTopics(admin::create_topics(ctx, r).await)
        }
        RequestKind::DeleteTopics(r) => {
            ResponseKind::DeleteTopics(admin::delete_topics(ctx, v, r).await)
        }
        RequestKind::CreatePartitions(r) => {
            ResponseKind::CreatePartitions(admin::create_partitions(ctx, r).await)
        }
        RequestKind::DeleteRecords(r) => {
            ResponseKind::DeleteRecords(admin::delete_records(ctx, r).await)
        }
        RequestKind::DescribeConfigs(r) => {
            ResponseKind::DescribeConfigs(admin::describe_configs(ctx, r).await)
        }
        RequestKind::AlterConfigs(r) => {
            ResponseKind::AlterConfigs(admin::alter_configs(ctx, r).await)
        }
        RequestKind::IncrementalAlterConfigs(r) => {
            ResponseKind::IncrementalAlterConfigs(admin::incremental_alter_configs(ctx, r).await)
        }
        RequestKind::InitProducerId(r) => {
            ResponseKind::InitProducerId(admin::init_producer_id(ctx, r).await)
        }
        RequestKind::DescribeCluster(r) => {
            ResponseKind::DescribeCluster(admin::describe_cluster(ctx, r))
        }
        other => return groups::dispatch(ctx, header, other).await,
    })
}
