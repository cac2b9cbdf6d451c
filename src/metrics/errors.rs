//! The error codes a response carries, for `fjord_request_errors_total`: top-level codes and,
//! where an API answers per topic or partition, each of those.

use kafka_protocol::messages::{ApiKey, ResponseKind};

use super::error;

/// Counts every non-zero error code in `resp`. Runs once per response, over fields the
/// response already holds; APIs not listed here are counted by their top-level code only
/// when they have one.
pub fn response_errors(resp: &ResponseKind) {
    if !super::on() {
        return;
    }
    use ResponseKind as R;
    let k = |a: ApiKey| a as i16;
    match resp {
        R::Produce(r) => {
            for t in &r.responses {
                for p in &t.partition_responses {
                    error(k(ApiKey::Produce), p.error_code);
                }
            }
        }
        R::Metadata(r) => {
            error(k(ApiKey::Metadata), r.error_code);
            for t in &r.topics {
                error(k(ApiKey::Metadata), t.error_code);
            }
        }
        R::ListOffsets(r) => {
            for t in &r.topics {
                for p in &t.partitions {
                    error(k(ApiKey::ListOffsets), p.error_code);
                }
            }
        }
        R::CreateTopics(r) => {
            for t in &r.topics {
                error(k(ApiKey::CreateTopics), t.error_code);
            }
        }
        R::DeleteTopics(r) => {
            for t in &r.responses {
                error(k(ApiKey::DeleteTopics), t.error_code);
            }
        }
        R::CreatePartitions(r) => {
            for t in &r.results {
                error(k(ApiKey::CreatePartitions), t.error_code);
            }
        }
        R::DeleteRecords(r) => {
            for t in &r.topics {
                for p in &t.partitions {
                    error(k(ApiKey::DeleteRecords), p.error_code);
                }
            }
        }
        R::DescribeConfigs(r) => {
            for t in &r.results {
                error(k(ApiKey::DescribeConfigs), t.error_code);
            }
        }
        R::FindCoordinator(r) => {
            error(k(ApiKey::FindCoordinator), r.error_code);
            for c in &r.coordinators {
                error(k(ApiKey::FindCoordinator), c.error_code);
            }
        }
        R::OffsetCommit(r) => {
            for t in &r.topics {
                for p in &t.partitions {
                    error(k(ApiKey::OffsetCommit), p.error_code);
                }
            }
        }
        R::OffsetFetch(r) => {
            error(k(ApiKey::OffsetFetch), r.error_code);
            for g in &r.groups {
                error(k(ApiKey::OffsetFetch), g.error_code);
            }
        }
        R::DescribeGroups(r) => {
            for g in &r.groups {
                error(k(ApiKey::DescribeGroups), g.error_code);
            }
        }
        R::DeleteGroups(r) => {
            for g in &r.results {
                error(k(ApiKey::DeleteGroups), g.error_code);
            }
        }
        R::JoinGroup(r) => error(k(ApiKey::JoinGroup), r.error_code),
        R::SyncGroup(r) => error(k(ApiKey::SyncGroup), r.error_code),
        R::Heartbeat(r) => error(k(ApiKey::Heartbeat), r.error_code),
        R::LeaveGroup(r) => error(k(ApiKey::LeaveGroup), r.error_code),
        R::ListGroups(r) => error(k(ApiKey::ListGroups), r.error_code),
        R::InitProducerId(r) => error(k(ApiKey::InitProducerId), r.error_code),
        R::ApiVersions(r) => error(k(ApiKey::ApiVersions), r.error_code),
        R::ConsumerGroupHeartbeat(r) => error(k(ApiKey::ConsumerGroupHeartbeat), r.error_code),
        R::DescribeCluster(r) => error(k(ApiKey::DescribeCluster), r.error_code),
        _ => {}
    }
}
