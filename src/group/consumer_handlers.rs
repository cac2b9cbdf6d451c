//! KIP-848 shell: ConsumerGroupHeartbeat (68) and ConsumerGroupDescribe (69) handlers, and the
//! consumer-group checks other group APIs make (OffsetCommit v9 member epochs, OffsetFetch v9,
//! ListGroups, DeleteGroups, classic JoinGroup). Translates topic ids at the wire boundary and
//! runs the state machine of `consumer_group.rs` on the group's coordinator shard.

use std::rc::Rc;

use kafka_protocol::messages::consumer_group_describe_request::ConsumerGroupDescribeRequest;
use kafka_protocol::messages::consumer_group_describe_response::{
    self as cgd, ConsumerGroupDescribeResponse, DescribedGroup,
};
use kafka_protocol::messages::consumer_group_heartbeat_request::ConsumerGroupHeartbeatRequest;
use kafka_protocol::messages::consumer_group_heartbeat_response::{
    self as cgh, ConsumerGroupHeartbeatResponse,
};
use kafka_protocol::protocol::StrBytes;

use super::consumer_group::{
    Assignment, Assignor, ConsumerConfig, GroupDescription, HeartbeatRequest, HeartbeatResponse,
    TopicSource,
};
use super::state::{self, JoinRequest, JoinResponse};
use super::{offsets_partition_for, GroupShard, GROUP_ID_BYTES_MAX, OFFSETS_TOPIC};
use crate::cluster::metadata::MetadataImage;
use crate::config::Tuning;
use crate::server::errors as ec;
use crate::server::handlers::util::{sb, tn};
use crate::server::ConnCtx;
use crate::shard::{invoke, Shard};

impl TopicSource for MetadataImage {
    fn partition_count(&self, topic: &str) -> Option<i32> {
        self.topic(topic).map(|t| t.partitions)
    }
    fn for_each_topic(&self, f: &mut dyn FnMut(&str)) {
        for t in self.topics.values().filter(|t| !t.internal) {
            f(&t.name);
        }
    }
}

/// The consumer-group settings of the tuning file (Kafka's `group.consumer.*`).
pub fn consumer_config(t: &Tuning) -> ConsumerConfig {
    let g = &t.group;
    ConsumerConfig {
        heartbeat_interval_ms: g.consumer_heartbeat_interval_ms,
        session_timeout_ms: u64::try_from(g.consumer_session_timeout_ms).unwrap_or(45_000),
        default_assignor: Assignor::parse(&g.consumer_assignor).unwrap_or(Assignor::Uniform),
        ..ConsumerConfig::default()
    }
}

/// Kafka's answer to a classic JoinGroup for a group the consumer protocol is using.
pub fn classic_join_refused(req: &JoinRequest) -> JoinResponse {
    JoinResponse {
        error_code: state::error_code::INCONSISTENT_GROUP_PROTOCOL,
        generation_id: -1,
        protocol_type: None,
        protocol_name: None,
        leader: String::new(),
        member_id: req.member_id.clone(),
        skip_assignment: false,
        members: Vec::new(),
    }
}

fn coordinator_of(shard: &Shard, group: &str) -> usize {
    let n = shard.node.tuning.group.offsets_topic_num_partitions;
    shard
        .node
        .shard_of(OFFSETS_TOPIC, offsets_partition_for(group, n))
}

/// Runs `f` with the group state of `group`'s coordinator shard.
async fn on_coordinator<F, R>(ctx: &ConnCtx, group: &str, f: F) -> Option<R>
where
    F: FnOnce(Rc<Shard>, Rc<GroupShard>) -> R + Send + 'static,
    R: Send + 'static,
{
    let target = coordinator_of(&ctx.shard, group);
    invoke(target, move |sh| async move {
        let g = sh.groups.borrow().clone()?;
        Some(f(sh, g))
    })
    .await
}

fn valid_group(group: &str) -> bool {
    !group.is_empty() && group.len() <= GROUP_ID_BYTES_MAX
}

pub async fn heartbeat(
    ctx: &ConnCtx,
    r: ConsumerGroupHeartbeatRequest,
) -> ConsumerGroupHeartbeatResponse {
    let group = r.group_id.0.to_string();
    if group.len() > GROUP_ID_BYTES_MAX {
        return error_response(ec::INVALID_GROUP_ID, "group id too long");
    }
    let owned_ids: Option<Vec<(uuid::Uuid, Vec<i32>)>> = r.topic_partitions.map(|tps| {
        tps.into_iter()
            .map(|tp| (tp.topic_id, tp.partitions))
            .collect()
    });
    let req = HeartbeatRequest {
        group_id: group.clone(),
        member_id: r.member_id.to_string(),
        member_epoch: r.member_epoch,
        instance_id: r.instance_id.map(|x| x.to_string()),
        rack_id: r.rack_id.map(|x| x.to_string()),
        rebalance_timeout_ms: r.rebalance_timeout_ms,
        subscribed_topic_names: r
            .subscribed_topic_names
            .map(|ts| ts.into_iter().map(|t| t.0.to_string()).collect()),
        subscribed_topic_regex: r.subscribed_topic_regex.map(|x| x.to_string()),
        server_assignor: r.server_assignor.map(|x| x.to_string()),
        owned: None,
        client_id: ctx.client_id.clone(),
        client_host: format!("/{}", ctx.client_host),
    };
    let out = on_coordinator(ctx, &group, move |sh, g| {
        let img = sh.node.image();
        let mut req = req;
        // Owned partitions of topics that no longer exist are simply gone.
        req.owned = owned_ids.map(|ids| {
            let mut a = Assignment::new();
            for (id, ps) in ids {
                if let Some(t) = img.topic_by_id(&id) {
                    a.entry(t.name.clone()).or_default().extend(ps);
                }
            }
            a
        });
        if req.member_epoch == 0 && !g.consumer.borrow().contains(&req.group_id) {
            // A classic group with members keeps its id; an empty one is taken over.
            match g.coord.borrow().state(&req.group_id) {
                Some(s) if s != state::GroupState::Empty => {
                    return Err((
                        ec::GROUP_ID_NOT_FOUND,
                        format!("Group {} is not a consumer group.", req.group_id),
                    ));
                }
                _ => {}
            }
            let _ = g.coord.borrow_mut().delete(&req.group_id);
        }
        let resp = g
            .consumer
            .borrow_mut()
            .heartbeat(crate::log::now_ms(), &**img, req);
        let assignment = resp.assignment.as_ref().map(|a| {
            a.iter()
                .filter_map(|(t, ps)| {
                    img.topic(t)
                        .map(|m| (m.id, ps.iter().copied().collect::<Vec<i32>>()))
                })
                .collect::<Vec<_>>()
        });
        Ok((resp, assignment))
    })
    .await;
    match out {
        None => error_response(ec::COORDINATOR_NOT_AVAILABLE, "coordinator not available"),
        Some(Err((code, msg))) => error_response(code, &msg),
        Some(Ok((resp, assignment))) => to_wire(resp, assignment),
    }
}

fn error_response(code: i16, msg: &str) -> ConsumerGroupHeartbeatResponse {
    let mut r = ConsumerGroupHeartbeatResponse::default();
    r.error_code = code;
    r.error_message = Some(sb(msg));
    r
}

fn to_wire(
    resp: HeartbeatResponse,
    assignment: Option<Vec<(uuid::Uuid, Vec<i32>)>>,
) -> ConsumerGroupHeartbeatResponse {
    let mut r = ConsumerGroupHeartbeatResponse::default();
    r.error_code = resp.error_code;
    r.error_message = resp.error_message.as_deref().map(sb);
    r.member_id = resp.member_id.as_deref().map(sb);
    r.member_epoch = resp.member_epoch;
    r.heartbeat_interval_ms = resp.heartbeat_interval_ms;
    r.assignment = assignment.map(|tps| {
        let mut a = cgh::Assignment::default();
        for (id, ps) in tps {
            let mut tp = cgh::TopicPartitions::default();
            tp.topic_id = id;
            tp.partitions = ps;
            a.topic_partitions.push(tp);
        }
        a
    });
    r
}

pub async fn describe(
    ctx: &ConnCtx,
    v: i16,
    r: ConsumerGroupDescribeRequest,
) -> ConsumerGroupDescribeResponse {
    let mut resp = ConsumerGroupDescribeResponse::default();
    let group_operations = crate::server::handlers::util::authorized_operations(
        r.include_authorized_operations,
        crate::server::handlers::util::GROUP_OPERATIONS,
    );
    for gid in r.group_ids {
        let group = gid.0.to_string();
        let mut dg = DescribedGroup::default();
        dg.group_id = gid.clone();
        dg.authorized_operations = group_operations;
        if !valid_group(&group) {
            dg.error_code = ec::INVALID_GROUP_ID;
            resp.groups.push(dg);
            continue;
        }
        let g2 = group.clone();
        let out = on_coordinator(ctx, &group, move |sh, g| {
            let d = g.consumer.borrow().describe(&g2)?;
            let img = sh.node.image();
            Some(describe_wire(&d, &img, v))
        })
        .await;
        match out {
            None => dg.error_code = ec::COORDINATOR_NOT_AVAILABLE,
            Some(None) => {
                dg.error_code = ec::GROUP_ID_NOT_FOUND;
                dg.error_message = Some(sb(&format!("Group {group} not found.")));
                dg.group_state = sb("Dead");
            }
            Some(Some(mut d)) => {
                d.group_id = gid;
                d.authorized_operations = group_operations;
                dg = d;
            }
        }
        resp.groups.push(dg);
    }
    resp
}

fn wire_assignment(a: &Assignment, img: &MetadataImage) -> cgd::Assignment {
    let mut out = cgd::Assignment::default();
    for (t, ps) in a {
        let Some(m) = img.topic(t) else { continue };
        let mut tp = cgd::TopicPartitions::default();
        tp.topic_id = m.id;
        tp.topic_name = tn(t);
        tp.partitions = ps.iter().copied().collect();
        out.topic_partitions.push(tp);
    }
    out
}

fn describe_wire(d: &GroupDescription, img: &MetadataImage, v: i16) -> DescribedGroup {
    let mut dg = DescribedGroup::default();
    dg.group_state = sb(d.state.as_str());
    dg.group_epoch = d.group_epoch;
    dg.assignment_epoch = d.assignment_epoch;
    dg.assignor_name = sb(d.assignor);
    for m in &d.members {
        let mut wm = cgd::Member::default();
        wm.member_id = sb(&m.member_id);
        wm.instance_id = m.instance_id.as_deref().map(sb);
        wm.rack_id = m.rack_id.as_deref().map(sb);
        wm.member_epoch = m.member_epoch;
        wm.client_id = sb(&m.client_id);
        wm.client_host = sb(&m.client_host);
        wm.subscribed_topic_names = m.subscribed_topic_names.iter().map(|t| tn(t)).collect();
        wm.subscribed_topic_regex = m.subscribed_topic_regex.as_deref().map(sb);
        wm.assignment = wire_assignment(&m.assignment, img);
        wm.target_assignment = wire_assignment(&m.target_assignment, img);
        if v >= 1 {
            // 1: a member using the consumer protocol (0 would be a classic member).
            wm.member_type = 1;
        }
        dg.members.push(wm);
    }
    dg
}

/// OffsetCommit checks: consumer groups validate the member epoch (v9+), classic groups the
/// generation. Creates the classic offsets-only group when neither protocol owns the id.
pub fn validate_commit(
    g: &GroupShard,
    group: &str,
    generation_or_epoch: i32,
    member: &str,
    instance: Option<&str>,
) -> Result<(), i16> {
    if let Some(r) = g
        .consumer
        .borrow()
        .validate_commit(group, member, generation_or_epoch)
    {
        return r;
    }
    g.coord
        .borrow()
        .validate_commit(group, generation_or_epoch, member, instance)?;
    g.coord.borrow_mut().ensure_group(group);
    Ok(())
}

/// OffsetFetch v9: a consumer-group member fetching with its member id and epoch.
pub async fn validate_fetch(
    ctx: &ConnCtx,
    group: &str,
    member_id: Option<StrBytes>,
    member_epoch: i32,
) -> Result<(), i16> {
    if member_epoch == -1 || !valid_group(group) {
        return Ok(());
    }
    let g2 = group.to_owned();
    let member_id = member_id.map(|m| m.to_string());
    on_coordinator(ctx, group, move |_sh, g| {
        g.consumer
            .borrow()
            .validate_fetch(&g2, member_id.as_deref(), member_epoch)
    })
    .await
    .unwrap_or(Err(ec::COORDINATOR_NOT_AVAILABLE))
}

/// DeleteGroups: a consumer group if the id is one, else the classic group.
pub fn delete_group(g: &GroupShard, group: &str) -> Result<(), i16> {
    match g.consumer.borrow_mut().delete(group) {
        Err(code) if code == ec::GROUP_ID_NOT_FOUND => g.coord.borrow_mut().delete(group),
        other => other,
    }
}

/// ListGroups rows of one shard: (group id, protocol type, state, group type).
pub fn list(g: &GroupShard) -> Vec<(String, String, String, &'static str)> {
    let mut out: Vec<_> = g
        .coord
        .borrow()
        .list()
        .into_iter()
        .map(|(id, p, st)| (id, p, st, "classic"))
        .collect();
    let consumer = g.consumer.borrow();
    // An id is in one state machine at a time, but drop any leftover classic duplicate.
    out.retain(|(id, _, _, _)| !consumer.contains(id));
    out.extend(
        consumer
            .list()
            .into_iter()
            .map(|(id, st)| (id, "consumer".to_owned(), st, "consumer")),
    );
    out
}
