//! ElectLeaders (KIP-460): preferred or unclean leader elections, decided by the active
//! controller (a cluster forwards it there). A single node leads every partition already.

use kafka_protocol::messages::elect_leaders_request::ElectLeadersRequest;
use kafka_protocol::messages::elect_leaders_response::{
    ElectLeadersResponse, PartitionResult, ReplicaElectionResult,
};
use kafka_protocol::protocol::StrBytes;

use crate::server::errors as ec;
use crate::server::ConnCtx;

pub async fn handle(ctx: &ConnCtx, version: i16, req: ElectLeadersRequest) -> ElectLeadersResponse {
    let node = ctx.shard.node.clone();
    if node.cluster.is_some() {
        let forwarded =
            crate::server::controller::forward_for_client(&node, version, &req, &ctx.client_host);
        return match forwarded.await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("ElectLeaders not forwarded: {e:#}");
                let mut r = ElectLeadersResponse::default();
                r.error_code = ec::NOT_CONTROLLER;
                r
            }
        };
    }
    let mut resp = ElectLeadersResponse::default();
    let img = node.image();
    for t in req.topic_partitions.unwrap_or_default() {
        let mut tr = ReplicaElectionResult::default();
        tr.topic = t.topic.clone();
        for p in t.partitions {
            let mut pr = PartitionResult::default();
            pr.partition_id = p;
            let known = img
                .topic(t.topic.0.as_str())
                .is_some_and(|m| (0..m.partitions).contains(&p));
            if known {
                pr.error_code = ec::ELECTION_NOT_NEEDED;
                pr.error_message = Some(StrBytes::from_static_str(
                    "a single node leads every partition",
                ));
            } else {
                pr.error_code = ec::UNKNOWN_TOPIC_OR_PARTITION;
            }
            tr.partition_result.push(pr);
        }
        resp.replica_election_results.push(tr);
    }
    resp
}
