//! AlterPartitionReassignments (KIP-455): move a partition's replicas to other nodes, or cancel
//! a running move. The active controller decides (a cluster forwards it there); the new
//! replicas then fetch from the leader like any follower, and the move completes when they are
//! all in the ISR. A single node has nowhere to move replicas to.

use kafka_protocol::messages::alter_partition_reassignments_request::AlterPartitionReassignmentsRequest;
use kafka_protocol::messages::alter_partition_reassignments_response::{
    AlterPartitionReassignmentsResponse, ReassignablePartitionResponse, ReassignableTopicResponse,
};

use super::util::sb;
use crate::server::errors as ec;
use crate::server::ConnCtx;

pub async fn handle(
    ctx: &ConnCtx,
    version: i16,
    req: AlterPartitionReassignmentsRequest,
) -> AlterPartitionReassignmentsResponse {
    let node = ctx.shard.node.clone();
    if node.cluster.is_some() {
        let forwarded =
            crate::server::controller::forward_for_client(&node, version, &req, &ctx.client_host);
        return match forwarded.await {
            Ok(r) => {
                // Answered once this node's image shows the accepted changes, so that a
                // ListPartitionReassignments or Metadata sent here next sees them.
                let accepted: Vec<(String, i32, Option<Vec<i32>>)> = req
                    .topics
                    .iter()
                    .flat_map(|t| {
                        t.partitions.iter().filter_map(|p| {
                            let ok = r.responses.iter().any(|x| {
                                x.name == t.name
                                    && x.partitions.iter().any(|y| {
                                        y.partition_index == p.partition_index
                                            && y.error_code == ec::NONE
                                    })
                            });
                            let target =
                                p.replicas.as_ref().map(|v| v.iter().map(|b| b.0).collect());
                            ok.then(|| (t.name.0.to_string(), p.partition_index, target))
                        })
                    })
                    .collect();
                if r.error_code == ec::NONE && !accepted.is_empty() {
                    crate::server::controller::wait_for_image(
                        &node,
                        std::time::Duration::from_secs(5),
                        |img| {
                            accepted.iter().all(|(t, p, target)| {
                                let a = img.topic(t).and_then(|m| m.assignments.get(*p as usize));
                                a.is_some_and(|a| match target {
                                    Some(want) => a.replicas.starts_with(want),
                                    None => a.adding.is_empty() && a.removing.is_empty(),
                                })
                            })
                        },
                    )
                    .await;
                }
                r
            }
            Err(e) => {
                tracing::debug!("AlterPartitionReassignments not forwarded: {e:#}");
                let mut r = AlterPartitionReassignmentsResponse::default();
                r.error_code = ec::NOT_CONTROLLER;
                r.error_message = Some(sb(&format!("{e:#}")));
                r
            }
        };
    }
    let mut resp = AlterPartitionReassignmentsResponse::default();
    resp.allow_replication_factor_change = req.allow_replication_factor_change;
    let img = node.image();
    let me = node.node_id;
    for t in req.topics {
        let mut tr = ReassignableTopicResponse::default();
        tr.name = t.name.clone();
        for p in t.partitions {
            let mut pr = ReassignablePartitionResponse::default();
            pr.partition_index = p.partition_index;
            let known = img
                .topic(t.name.0.as_str())
                .is_some_and(|m| (0..m.partitions).contains(&p.partition_index));
            let (code, msg) = match p.replicas {
                _ if !known => (ec::UNKNOWN_TOPIC_OR_PARTITION, None),
                None => (ec::NO_REASSIGNMENT_IN_PROGRESS, None),
                // The only replica there can be: nothing to move.
                Some(r) if r.len() == 1 && r[0].0 == me => (ec::NONE, None),
                Some(r) => (
                    ec::INVALID_REPLICA_ASSIGNMENT,
                    Some(format!(
                        "a single node ({me}) holds every partition, not {:?}",
                        r.iter().map(|b| b.0).collect::<Vec<_>>()
                    )),
                ),
            };
            pr.error_code = code;
            pr.error_message = msg.as_deref().map(sb);
            tr.partitions.push(pr);
        }
        resp.responses.push(tr);
    }
    resp
}
