//! Small helpers shared by handlers: string conversions, authorized operations and routing to a
//! group's coordinator shard. Fan-out over partitions is `shard::fanout`.

use std::future::Future;
use std::rc::Rc;

use kafka_protocol::messages::TopicName;
use kafka_protocol::protocol::StrBytes;

use crate::cluster::node::Node;
use crate::group::{offsets_partition_for, GroupShard, GROUP_ID_BYTES_MAX, OFFSETS_TOPIC};
use crate::shard::{invoke, Shard};

/// Authorized operations (KIP-430), as bit sets of ACL operation codes (READ 3, WRITE 4,
/// CREATE 5, DELETE 6, ALTER 7, DESCRIBE 8, CLUSTER_ACTION 9, DESCRIBE_CONFIGS 10,
/// ALTER_CONFIGS 11, IDEMPOTENT_WRITE 12). Fjord has no authorizer, so, as Kafka without one,
/// a client that asks is allowed every operation the resource type supports.
pub const TOPIC_OPERATIONS: i32 = ops(&[3, 4, 5, 6, 7, 8, 10, 11]);
pub const GROUP_OPERATIONS: i32 = ops(&[3, 6, 8]);
pub const CLUSTER_OPERATIONS: i32 = ops(&[5, 7, 8, 9, 10, 11, 12]);

const fn ops(codes: &[i32]) -> i32 {
    let mut bits = 0;
    let mut i = 0;
    while i < codes.len() {
        bits |= 1 << codes[i];
        i += 1;
    }
    bits
}

/// The authorized-operations field: the set when the client asked for it, else Kafka's
/// "not requested" (i32::MIN).
pub fn authorized_operations(requested: bool, operations: i32) -> i32 {
    if requested {
        operations
    } else {
        i32::MIN
    }
}

/// A group id Kafka accepts: not empty and at most `GROUP_ID_BYTES_MAX` bytes.
pub fn valid_group(group: &str) -> bool {
    !group.is_empty() && group.len() <= GROUP_ID_BYTES_MAX
}

/// Runs `f` with the coordinator state of `group` on the shard that owns the group's
/// `__consumer_offsets` partition; None when that shard runs no coordinator or this node does
/// not lead that partition.
pub async fn on_coordinator<F, Fut, R>(node: &Node, group: &str, f: F) -> Option<R>
where
    F: FnOnce(Rc<Shard>, Rc<GroupShard>) -> Fut + Send + 'static,
    Fut: Future<Output = R> + 'static,
    R: Send + 'static,
{
    let mut partitions = node.tuning.group.offsets_topic_num_partitions;
    if node.cluster.is_some() {
        // In a cluster the group lives with the leader of its offsets partition: elsewhere
        // the client is told to find its coordinator again.
        let img = node.image();
        let t = img.topic(OFFSETS_TOPIC)?;
        partitions = t.partitions;
        if !node.leads(t, offsets_partition_for(group, partitions)) {
            return None;
        }
    }
    let p = offsets_partition_for(group, partitions);
    let target = node.shard_of(OFFSETS_TOPIC, p);
    invoke(target, move |sh| async move {
        let groups = sh.groups.borrow().clone()?;
        // The group's state is read from its partition first if this node has just come to
        // lead it; a shard that no longer leads it answers None (NOT_COORDINATOR).
        if !groups.ensure_loaded(&sh, p).await {
            return None;
        }
        Some(f(sh, groups).await)
    })
    .await
}

/// An owned copy of a wire string.
pub fn string_of(s: &StrBytes) -> String {
    s.as_str().to_string()
}

pub fn sb(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

pub fn tn(s: &str) -> TopicName {
    TopicName(sb(s))
}

/// The error for a group request this node cannot serve: NOT_COORDINATOR when, in a cluster,
/// another node leads the group's offsets partition (the client then looks its coordinator up
/// again), COORDINATOR_NOT_AVAILABLE otherwise.
pub fn no_coordinator(node: &Node, group: &str) -> i16 {
    if node.cluster.is_some() {
        let img = node.image();
        if let Some(t) = img.topic(OFFSETS_TOPIC) {
            if !node.leads(t, offsets_partition_for(group, t.partitions)) {
                return crate::server::errors::NOT_COORDINATOR;
            }
        }
    }
    crate::server::errors::COORDINATOR_NOT_AVAILABLE
}

/// KIP-951: where a partition refused with NOT_LEADER_OR_FOLLOWER or FENCED_LEADER_EPOCH is
/// led now, as this node's image says: `(leader, leader epoch, endpoint)`, so that clients
/// (librdkafka 2.4+, Java 3.7+) move to it without waiting for a metadata refresh.
pub struct LeaderHint {
    pub leader: i32,
    pub epoch: i32,
    pub host: String,
    pub port: i32,
    pub rack: Option<String>,
}

pub fn leader_hint(node: &Node, code: i16, topic: &str, partition: i32) -> Option<LeaderHint> {
    use crate::server::errors as ec;
    if code != ec::NOT_LEADER_OR_FOLLOWER && code != ec::FENCED_LEADER_EPOCH {
        return None;
    }
    let img = node.image();
    let t = img.topic(topic)?;
    let a = t.assignments.get(usize::try_from(partition).ok()?)?;
    if a.leader < 0 || a.leader == node.node_id {
        return None;
    }
    let b = img
        .cluster
        .as_ref()?
        .brokers
        .iter()
        .find(|b| b.id == a.leader && !b.fenced)?;
    Some(LeaderHint {
        leader: a.leader,
        epoch: a.leader_epoch,
        host: b.host.clone(),
        port: b.port,
        rack: b.rack.clone(),
    })
}
