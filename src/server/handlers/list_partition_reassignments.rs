//! ListPartitionReassignments (KIP-455): the partitions whose replicas are moving, from this
//! node's metadata image (the controller's committed one). Partitions named but unknown, or not
//! moving, are left out, as Kafka does.

use kafka_protocol::messages::list_partition_reassignments_request::ListPartitionReassignmentsRequest;
use kafka_protocol::messages::list_partition_reassignments_response::{
    ListPartitionReassignmentsResponse, OngoingPartitionReassignment, OngoingTopicReassignment,
};
use kafka_protocol::messages::{BrokerId, TopicName};

use super::util::sb;
use crate::server::ConnCtx;

pub fn handle(
    ctx: &ConnCtx,
    req: ListPartitionReassignmentsRequest,
) -> ListPartitionReassignmentsResponse {
    let img = ctx.shard.node.image();
    let wanted: Vec<(String, Option<Vec<i32>>)> = match req.topics {
        Some(ts) => ts
            .into_iter()
            .map(|t| (t.name.0.to_string(), Some(t.partition_indexes)))
            .collect(),
        None => img
            .topics
            .values()
            .map(|t| (t.name.clone(), None))
            .collect(),
    };
    let ids = |v: &[i32]| v.iter().map(|b| BrokerId(*b)).collect::<Vec<_>>();
    let mut resp = ListPartitionReassignmentsResponse::default();
    for (name, partitions) in wanted {
        let Some(t) = img.topic(&name) else { continue };
        let mut out = OngoingTopicReassignment::default();
        out.name = TopicName(sb(&name));
        for (p, a) in t.assignments.iter().enumerate() {
            let p = p as i32;
            let named = partitions.as_ref().is_none_or(|ps| ps.contains(&p));
            if !named || (a.adding.is_empty() && a.removing.is_empty()) {
                continue;
            }
            let mut o = OngoingPartitionReassignment::default();
            o.partition_index = p;
            o.replicas = ids(&a.replicas);
            o.adding_replicas = ids(&a.adding);
            o.removing_replicas = ids(&a.removing);
            out.partitions.push(o);
        }
        if !out.partitions.is_empty() {
            resp.topics.push(out);
        }
    }
    resp
}
