//! DescribeQuorum: the controller quorum's leader, epoch and voters. In a cluster it is
//! forwarded to the active controller; a one-node cluster is its own single voter.

use kafka_protocol::messages::describe_quorum_request::DescribeQuorumRequest;
use kafka_protocol::messages::describe_quorum_response::{
    DescribeQuorumResponse, PartitionData, ReplicaState, TopicData,
};
use kafka_protocol::messages::{BrokerId, TopicName};
use kafka_protocol::protocol::StrBytes;

use crate::server::errors as ec;
use crate::server::ConnCtx;

pub async fn handle(
    ctx: &ConnCtx,
    version: i16,
    req: DescribeQuorumRequest,
) -> DescribeQuorumResponse {
    let node = ctx.shard.node.clone();
    if node.cluster.is_some() {
        let forwarded =
            crate::server::controller::forward_for_client(&node, version, &req, &ctx.client_host);
        return match forwarded.await {
            Ok(r) => r,
            Err(e) => {
                let mut r = DescribeQuorumResponse::default();
                r.error_code = ec::NOT_CONTROLLER;
                r.error_message = Some(StrBytes::from_string(format!("{e:#}")));
                r
            }
        };
    }
    let mut p = PartitionData::default();
    p.leader_id = BrokerId(node.node_id);
    p.leader_epoch = 1;
    p.high_watermark = 0;
    let mut v = ReplicaState::default();
    v.replica_id = BrokerId(node.node_id);
    v.last_fetch_timestamp = -1;
    v.last_caught_up_timestamp = -1;
    p.current_voters.push(v);
    let mut t = TopicData::default();
    t.topic_name = TopicName(StrBytes::from_static_str("__cluster_metadata"));
    t.partitions.push(p);
    let mut r = DescribeQuorumResponse::default();
    r.topics.push(t);
    r
}
