//! Group API handlers: route each group to its coordinator shard, translate between the wire
//! types and the state machine, map errors to Kafka codes.

use std::rc::Rc;

use bytes::Bytes;
use kafka_protocol::messages::delete_groups_response::{
    DeletableGroupResult, DeleteGroupsResponse,
};
use kafka_protocol::messages::describe_groups_response::{
    DescribeGroupsResponse, DescribedGroup, DescribedGroupMember,
};
use kafka_protocol::messages::find_coordinator_response::{Coordinator, FindCoordinatorResponse};
use kafka_protocol::messages::heartbeat_response::HeartbeatResponse;
use kafka_protocol::messages::join_group_response::{JoinGroupResponse, JoinGroupResponseMember};
use kafka_protocol::messages::leave_group_response::{LeaveGroupResponse, MemberResponse};
use kafka_protocol::messages::list_groups_response::{ListGroupsResponse, ListedGroup};
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponse, OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_delete_response::{
    OffsetDeleteResponse, OffsetDeleteResponsePartition, OffsetDeleteResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponse, OffsetFetchResponseGroup, OffsetFetchResponsePartition,
    OffsetFetchResponsePartitions, OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::sync_group_response::SyncGroupResponse;
use kafka_protocol::messages::{BrokerId, GroupId, RequestHeader, RequestKind, ResponseKind};
use kafka_protocol::protocol::StrBytes;

use super::records::{OffsetValue, OffsetsKey};
use super::state::{self, HeartbeatRequest, JoinRequest, LeaveMember, SyncRequest};
use super::{
    offsets_partition_for, GroupShard, GROUP_ID_BYTES_MAX, OFFSETS_TOPIC, OFFSET_METADATA_BYTES_MAX,
};
use crate::server::errors as ec;
use crate::server::handlers::util::{sb, tn};
use crate::server::ConnCtx;
use crate::shard::{invoke, Node, Shard};

fn coordinator_shard(node: &Node, group: &str) -> usize {
    node.shard_of(
        OFFSETS_TOPIC,
        offsets_partition_for(group, node.tuning.group.offsets_topic_num_partitions),
    )
}

fn valid_group(group: &str) -> bool {
    !group.is_empty() && group.len() <= GROUP_ID_BYTES_MAX
}

fn groups_of(sh: &Shard) -> Option<Rc<GroupShard>> {
    sh.groups.borrow().clone()
}

/// Runs `f` with the coordinator state of `group` on its shard.
async fn on_coordinator<F, Fut, R>(ctx: &ConnCtx, group: &str, f: F) -> Option<R>
where
    F: FnOnce(Rc<Shard>, Rc<GroupShard>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = R> + 'static,
    R: Send + 'static,
{
    let target = coordinator_shard(&ctx.shard.node, group);
    invoke(target, move |sh| async move {
        let g = groups_of(&sh)?;
        Some(f(sh, g).await)
    })
    .await
}

fn s(x: &StrBytes) -> String {
    x.as_str().to_string()
}

pub async fn dispatch(
    ctx: &ConnCtx,
    header: &RequestHeader,
    req: RequestKind,
) -> Option<ResponseKind> {
    let v = header.request_api_version;
    Some(match req {
        RequestKind::FindCoordinator(r) => {
            let node = &ctx.shard.node;
            let mut resp = FindCoordinatorResponse::default();
            let keys: Vec<StrBytes> = if v >= 4 {
                r.coordinator_keys.clone()
            } else {
                vec![r.key.clone()]
            };
            let mut out = Vec::new();
            for k in keys {
                let mut c = Coordinator::default();
                c.key = k.clone();
                if r.key_type != 0 {
                    c.error_code = ec::COORDINATOR_NOT_AVAILABLE;
                    c.error_message = Some(sb("transactions are not supported yet"));
                    c.node_id = BrokerId(-1);
                    c.host = sb("");
                    c.port = -1;
                } else if !valid_group(k.as_str()) {
                    c.error_code = ec::INVALID_GROUP_ID;
                    c.node_id = BrokerId(-1);
                    c.host = sb("");
                    c.port = -1;
                } else {
                    c.node_id = BrokerId(node.node_id);
                    c.host = sb(&node.advertised_host);
                    c.port = node.advertised_port;
                }
                out.push(c);
            }
            if v >= 4 {
                resp.coordinators = out;
            } else if let Some(c) = out.into_iter().next() {
                resp.error_code = c.error_code;
                resp.error_message = c.error_message;
                resp.node_id = c.node_id;
                resp.host = c.host;
                resp.port = c.port;
            }
            ResponseKind::FindCoordinator(resp)
        }
        RequestKind::JoinGroup(r) => {
            let group = s(&r.group_id.0);
            let mut resp = JoinGroupResponse::default();
            resp.generation_id = -1;
            if !valid_group(&group) {
                resp.error_code = ec::INVALID_GROUP_ID;
                return Some(ResponseKind::JoinGroup(resp));
            }
            let jr = JoinRequest {
                group_id: group.clone(),
                member_id: s(&r.member_id),
                group_instance_id: r.group_instance_id.as_ref().map(s),
                client_id: ctx.client_id.clone(),
                client_host: format!("/{}", ctx.client_host),
                session_timeout_ms: r.session_timeout_ms,
                rebalance_timeout_ms: if v >= 1 { r.rebalance_timeout_ms } else { -1 },
                protocol_type: s(&r.protocol_type),
                protocols: r
                    .protocols
                    .iter()
                    .map(|p| (s(&p.name), p.metadata.clone()))
                    .collect(),
                require_known_member_id: v >= 4,
            };
            let out = on_coordinator(ctx, &group, move |sh, g| async move {
                let rx = g.join(&sh, jr);
                rx.await.ok()
            })
            .await
            .flatten();
            match out {
                None => resp.error_code = ec::COORDINATOR_NOT_AVAILABLE,
                Some(j) => {
                    resp.error_code = j.error_code;
                    resp.generation_id = j.generation_id;
                    if v >= 7 {
                        resp.protocol_type = j.protocol_type.as_deref().map(sb);
                    }
                    resp.protocol_name = j.protocol_name.as_deref().map(sb).or_else(|| {
                        if v < 7 {
                            Some(sb(""))
                        } else {
                            None
                        }
                    });
                    resp.leader = sb(&j.leader);
                    resp.member_id = sb(&j.member_id);
                    resp.skip_assignment = j.skip_assignment && v >= 9;
                    for m in j.members {
                        let mut rm = JoinGroupResponseMember::default();
                        rm.member_id = sb(&m.member_id);
                        rm.group_instance_id = if v >= 5 {
                            m.group_instance_id.as_deref().map(sb)
                        } else {
                            None
                        };
                        rm.metadata = m.metadata;
                        resp.members.push(rm);
                    }
                }
            }
            ResponseKind::JoinGroup(resp)
        }
        RequestKind::SyncGroup(r) => {
            let group = s(&r.group_id.0);
            let mut resp = SyncGroupResponse::default();
            if !valid_group(&group) {
                resp.error_code = ec::INVALID_GROUP_ID;
                return Some(ResponseKind::SyncGroup(resp));
            }
            let sr = SyncRequest {
                group_id: group.clone(),
                generation_id: r.generation_id,
                member_id: s(&r.member_id),
                group_instance_id: r.group_instance_id.as_ref().map(s),
                protocol_type: r.protocol_type.as_ref().map(s),
                protocol_name: r.protocol_name.as_ref().map(s),
                assignments: r
                    .assignments
                    .iter()
                    .map(|a| (s(&a.member_id), a.assignment.clone()))
                    .collect(),
            };
            let out = on_coordinator(ctx, &group, move |sh, g| async move {
                g.sync(&sh, sr).await.ok()
            })
            .await
            .flatten();
            match out {
                None => resp.error_code = ec::COORDINATOR_NOT_AVAILABLE,
                Some(x) => {
                    resp.error_code = x.error_code;
                    if v >= 5 {
                        resp.protocol_type = x.protocol_type.as_deref().map(sb);
                        resp.protocol_name = x.protocol_name.as_deref().map(sb);
                    }
                    resp.assignment = x.assignment;
                }
            }
            ResponseKind::SyncGroup(resp)
        }
        RequestKind::Heartbeat(r) => {
            let group = s(&r.group_id.0);
            let mut resp = HeartbeatResponse::default();
            if !valid_group(&group) {
                resp.error_code = ec::INVALID_GROUP_ID;
                return Some(ResponseKind::Heartbeat(resp));
            }
            let hr = HeartbeatRequest {
                group_id: group.clone(),
                generation_id: r.generation_id,
                member_id: s(&r.member_id),
                group_instance_id: r.group_instance_id.as_ref().map(s),
            };
            let out = on_coordinator(ctx, &group, move |_sh, g| async move {
                g.coord.borrow_mut().heartbeat(crate::log::now_ms(), hr)
            })
            .await;
            resp.error_code = match out {
                None => ec::COORDINATOR_NOT_AVAILABLE,
                Some(Ok(())) => ec::NONE,
                Some(Err(code)) => code,
            };
            ResponseKind::Heartbeat(resp)
        }
        RequestKind::LeaveGroup(r) => {
            let group = s(&r.group_id.0);
            let mut resp = LeaveGroupResponse::default();
            if !valid_group(&group) {
                resp.error_code = ec::INVALID_GROUP_ID;
                return Some(ResponseKind::LeaveGroup(resp));
            }
            let members: Vec<LeaveMember> = if v >= 3 {
                r.members
                    .iter()
                    .map(|m| LeaveMember {
                        member_id: s(&m.member_id),
                        group_instance_id: m.group_instance_id.as_ref().map(s),
                    })
                    .collect()
            } else {
                vec![LeaveMember {
                    member_id: s(&r.member_id),
                    group_instance_id: None,
                }]
            };
            let g2 = group.clone();
            let out = on_coordinator(ctx, &group, move |sh, g| async move {
                let (top, per, actions) =
                    g.coord
                        .borrow_mut()
                        .leave(crate::log::now_ms(), &g2, &members);
                g.apply(&sh, actions);
                (top, per)
            })
            .await;
            match out {
                None => resp.error_code = ec::COORDINATOR_NOT_AVAILABLE,
                Some((top, per)) => {
                    resp.error_code = top.err().unwrap_or(ec::NONE);
                    if v >= 3 {
                        for (m, code) in per {
                            let mut mr = MemberResponse::default();
                            mr.member_id = sb(&m.member_id);
                            mr.group_instance_id = m.group_instance_id.as_deref().map(sb);
                            mr.error_code = code;
                            resp.members.push(mr);
                        }
                    } else if resp.error_code == ec::NONE {
                        resp.error_code = per.first().map(|(_, c)| *c).unwrap_or(ec::NONE);
                    }
                }
            }
            ResponseKind::LeaveGroup(resp)
        }
        RequestKind::OffsetCommit(r) => ResponseKind::OffsetCommit(offset_commit(ctx, r).await),
        RequestKind::OffsetFetch(r) => ResponseKind::OffsetFetch(offset_fetch(ctx, v, r).await),
        RequestKind::ListGroups(r) => {
            let node = ctx.shard.node.clone();
            let filter: Vec<String> = r.states_filter.iter().map(|x| x.to_string()).collect();
            let types: Vec<String> = r.types_filter.iter().map(|x| x.to_string()).collect();
            let futs = (0..node.shards()).map(|i| {
                invoke(i, |sh| async move {
                    groups_of(&sh)
                        .map(|g| super::consumer_handlers::list(&g))
                        .unwrap_or_default()
                })
            });
            let mut resp = ListGroupsResponse::default();
            for list in futures::future::join_all(futs).await {
                for (g, ptype, st, gtype) in list {
                    if !filter.is_empty() && !filter.iter().any(|f| f.eq_ignore_ascii_case(&st)) {
                        continue;
                    }
                    if !types.is_empty() && !types.iter().any(|t| t.eq_ignore_ascii_case(gtype)) {
                        continue;
                    }
                    let mut lg = ListedGroup::default();
                    lg.group_id = GroupId(sb(&g));
                    lg.protocol_type = sb(&ptype);
                    if v >= 4 {
                        lg.group_state = sb(&st);
                    }
                    if v >= 5 {
                        lg.group_type = sb(gtype);
                    }
                    resp.groups.push(lg);
                }
            }
            ResponseKind::ListGroups(resp)
        }
        RequestKind::DescribeGroups(r) => {
            let mut resp = DescribeGroupsResponse::default();
            let group_operations = crate::server::handlers::util::authorized_operations(
                r.include_authorized_operations,
                crate::server::handlers::util::GROUP_OPERATIONS,
            );
            for gid in r.groups {
                let group = s(&gid.0);
                let mut dg = DescribedGroup::default();
                dg.group_id = gid.clone();
                dg.authorized_operations = group_operations;
                if !valid_group(&group) {
                    dg.error_code = ec::INVALID_GROUP_ID;
                    resp.groups.push(dg);
                    continue;
                }
                let g2 = group.clone();
                let d = on_coordinator(ctx, &group, move |_sh, g| async move {
                    g.coord.borrow().describe(&g2)
                })
                .await;
                match d {
                    None => dg.error_code = ec::COORDINATOR_NOT_AVAILABLE,
                    Some(None) => dg.group_state = sb("Dead"),
                    Some(Some(d)) => {
                        dg.group_state = sb(d.state);
                        dg.protocol_type = sb(&d.protocol_type);
                        dg.protocol_data = sb(&d.protocol);
                        for m in d.members {
                            let mut dm = DescribedGroupMember::default();
                            dm.member_id = sb(&m.member_id);
                            dm.group_instance_id = if v >= 4 {
                                m.group_instance_id.as_deref().map(sb)
                            } else {
                                None
                            };
                            dm.client_id = sb(&m.client_id);
                            dm.client_host = sb(&m.client_host);
                            dm.member_metadata = m.metadata;
                            dm.member_assignment = m.assignment;
                            dg.members.push(dm);
                        }
                    }
                }
                resp.groups.push(dg);
            }
            ResponseKind::DescribeGroups(resp)
        }
        RequestKind::DeleteGroups(r) => {
            let mut resp = DeleteGroupsResponse::default();
            for gid in r.groups_names {
                let group = s(&gid.0);
                let mut dr = DeletableGroupResult::default();
                dr.group_id = gid.clone();
                if !valid_group(&group) {
                    dr.error_code = ec::INVALID_GROUP_ID;
                    resp.results.push(dr);
                    continue;
                }
                let g2 = group.clone();
                let out = on_coordinator(ctx, &group, move |sh, g| async move {
                    let r = super::consumer_handlers::delete_group(&g, &g2);
                    let had_offsets = g
                        .offsets
                        .borrow()
                        .get(&g2)
                        .map(|o| !o.is_empty())
                        .unwrap_or(false);
                    match r {
                        Ok(()) => {}
                        // A group known only by its offsets can be deleted too.
                        Err(code) if code == ec::GROUP_ID_NOT_FOUND && had_offsets => {}
                        Err(code) => return code,
                    }
                    let removed = g.offsets.borrow_mut().remove(&g2).unwrap_or_default();
                    let mut kvs: Vec<(Vec<u8>, Option<Vec<u8>>)> = removed
                        .into_keys()
                        .map(|(t, p)| {
                            (
                                OffsetsKey::Offset {
                                    group: g2.clone(),
                                    topic: t,
                                    partition: p,
                                }
                                .encode(),
                                None,
                            )
                        })
                        .collect();
                    kvs.push((OffsetsKey::Group { group: g2.clone() }.encode(), None));
                    match super::append_records(&sh, &g2, kvs).await {
                        Ok(()) => ec::NONE,
                        Err(_) => ec::KAFKA_STORAGE_ERROR,
                    }
                })
                .await;
                dr.error_code = out.unwrap_or(ec::COORDINATOR_NOT_AVAILABLE);
                resp.results.push(dr);
            }
            ResponseKind::DeleteGroups(resp)
        }
        RequestKind::OffsetDelete(r) => {
            let group = s(&r.group_id.0);
            let mut resp = OffsetDeleteResponse::default();
            if !valid_group(&group) {
                resp.error_code = ec::INVALID_GROUP_ID;
                return Some(ResponseKind::OffsetDelete(resp));
            }
            let parts: Vec<(String, i32)> = r
                .topics
                .iter()
                .flat_map(|t| {
                    t.partitions
                        .iter()
                        .map(move |p| (t.name.0.to_string(), p.partition_index))
                })
                .collect();
            let g2 = group.clone();
            let out = on_coordinator(ctx, &group, move |sh, g| async move {
                let st = g.coord.borrow().state(&g2);
                let known = st.is_some()
                    || g.consumer.borrow().contains(&g2)
                    || g.offsets.borrow().contains_key(&g2);
                if !known {
                    return Err(ec::GROUP_ID_NOT_FOUND);
                }
                // Members consuming the group's topics keep their offsets (conservative: any
                // non-empty group counts as subscribed).
                let busy = matches!(st, Some(s) if s != state::GroupState::Empty)
                    || g.consumer.borrow().is_active(&g2);
                let mut per = Vec::new();
                let mut kvs = Vec::new();
                for (t, p) in parts {
                    if busy {
                        per.push(ec::GROUP_SUBSCRIBED_TO_TOPIC);
                        continue;
                    }
                    if g.offsets
                        .borrow_mut()
                        .get_mut(&g2)
                        .and_then(|o| o.remove(&(t.clone(), p)))
                        .is_some()
                    {
                        kvs.push((
                            OffsetsKey::Offset {
                                group: g2.clone(),
                                topic: t,
                                partition: p,
                            }
                            .encode(),
                            None,
                        ));
                    }
                    per.push(ec::NONE);
                }
                if !kvs.is_empty() {
                    super::append_records(&sh, &g2, kvs)
                        .await
                        .map_err(|_| ec::KAFKA_STORAGE_ERROR)?;
                }
                Ok(per)
            })
            .await;
            match out {
                None => resp.error_code = ec::COORDINATOR_NOT_AVAILABLE,
                Some(Err(code)) => resp.error_code = code,
                Some(Ok(per)) => {
                    let mut per = per.into_iter();
                    for t in r.topics {
                        let mut tr = OffsetDeleteResponseTopic::default();
                        tr.name = t.name.clone();
                        for p in t.partitions {
                            let mut pr = OffsetDeleteResponsePartition::default();
                            pr.partition_index = p.partition_index;
                            pr.error_code = per.next().unwrap_or(ec::UNKNOWN_SERVER_ERROR);
                            tr.partitions.push(pr);
                        }
                        resp.topics.push(tr);
                    }
                }
            }
            ResponseKind::OffsetDelete(resp)
        }
        RequestKind::ConsumerGroupHeartbeat(r) => {
            ResponseKind::ConsumerGroupHeartbeat(super::consumer_handlers::heartbeat(ctx, r).await)
        }
        RequestKind::ConsumerGroupDescribe(r) => {
            ResponseKind::ConsumerGroupDescribe(super::consumer_handlers::describe(ctx, v, r).await)
        }
        other => {
            tracing::warn!("no handler for {:?}", std::mem::discriminant(&other));
            return None;
        }
    })
}

async fn offset_commit(
    ctx: &ConnCtx,
    r: kafka_protocol::messages::offset_commit_request::OffsetCommitRequest,
) -> OffsetCommitResponse {
    let node = ctx.shard.node.clone();
    let group = s(&r.group_id.0);
    let mut resp = OffsetCommitResponse::default();
    // Per partition: pre-computed error, or a commit to make.
    let mut commits: Vec<(String, i32, OffsetValue)> = Vec::new();
    let mut pre: Vec<Vec<Option<i16>>> = Vec::new();
    {
        let img = node.image();
        for t in &r.topics {
            let name = t.name.0.to_string();
            let topic = img.topic(&name);
            let mut row = Vec::new();
            for p in &t.partitions {
                let meta = p
                    .committed_metadata
                    .as_ref()
                    .map(|m| m.to_string())
                    .unwrap_or_default();
                if !valid_group(&group) {
                    row.push(Some(ec::INVALID_GROUP_ID));
                } else if topic
                    .map(|t| p.partition_index < 0 || p.partition_index >= t.partitions)
                    .unwrap_or(true)
                {
                    row.push(Some(ec::UNKNOWN_TOPIC_OR_PARTITION));
                } else if meta.len() > OFFSET_METADATA_BYTES_MAX {
                    row.push(Some(12)); // OFFSET_METADATA_TOO_LARGE
                } else {
                    commits.push((
                        name.clone(),
                        p.partition_index,
                        OffsetValue {
                            offset: p.committed_offset,
                            leader_epoch: p.committed_leader_epoch,
                            metadata: meta,
                            commit_timestamp_ms: crate::log::now_ms() as i64,
                        },
                    ));
                    row.push(None);
                }
            }
            pre.push(row);
        }
    }
    let outcome: i16 = if commits.is_empty() {
        ec::NONE
    } else {
        let generation = r.generation_id_or_member_epoch;
        let member = s(&r.member_id);
        let instance = r.group_instance_id.as_ref().map(s);
        let g2 = group.clone();
        on_coordinator(ctx, &group, move |sh, g| async move {
            if let Err(code) = super::consumer_handlers::validate_commit(
                &g,
                &g2,
                generation,
                &member,
                instance.as_deref(),
            ) {
                return code;
            }
            let kvs = commits
                .iter()
                .map(|(t, p, v)| {
                    (
                        OffsetsKey::Offset {
                            group: g2.clone(),
                            topic: t.clone(),
                            partition: *p,
                        }
                        .encode(),
                        Some(v.encode()),
                    )
                })
                .collect();
            if let Err(e) = super::append_records(&sh, &g2, kvs).await {
                tracing::warn!("offset commit for {g2} not persisted: {e}");
                return ec::KAFKA_STORAGE_ERROR;
            }
            let mut offs = g.offsets.borrow_mut();
            let entry = offs.entry(g2).or_default();
            for (t, p, v) in commits {
                entry.insert((t, p), v);
            }
            ec::NONE
        })
        .await
        .unwrap_or(ec::COORDINATOR_NOT_AVAILABLE)
    };
    for (t, row) in r.topics.iter().zip(pre) {
        let mut tr = OffsetCommitResponseTopic::default();
        tr.name = t.name.clone();
        for (p, code) in t.partitions.iter().zip(row) {
            let mut pr = OffsetCommitResponsePartition::default();
            pr.partition_index = p.partition_index;
            pr.error_code = code.unwrap_or(outcome);
            tr.partitions.push(pr);
        }
        resp.topics.push(tr);
    }
    resp
}

/// One group's committed offsets: None topics means every committed partition.
async fn fetch_group(
    ctx: &ConnCtx,
    group: String,
    topics: Option<Vec<(String, Vec<i32>)>>,
) -> Result<Vec<(String, Vec<(i32, i64, i32, String)>)>, i16> {
    if !valid_group(&group) {
        return Err(ec::INVALID_GROUP_ID);
    }
    let g2 = group.clone();
    on_coordinator(ctx, &group, move |_sh, g| async move {
        let offs = g.offsets.borrow();
        let committed = offs.get(&g2);
        let lookup = |t: &str, p: i32| committed.and_then(|c| c.get(&(t.to_string(), p)));
        match topics {
            Some(ts) => ts
                .into_iter()
                .map(|(t, ps)| {
                    let rows = ps
                        .into_iter()
                        .map(|p| match lookup(&t, p) {
                            Some(v) => (p, v.offset, v.leader_epoch, v.metadata.clone()),
                            None => (p, -1, -1, String::new()),
                        })
                        .collect();
                    (t, rows)
                })
                .collect(),
            None => {
                let mut out: Vec<(String, Vec<(i32, i64, i32, String)>)> = Vec::new();
                if let Some(c) = committed {
                    for ((t, p), v) in c {
                        match out.last_mut() {
                            Some((lt, rows)) if lt == t => {
                                rows.push((*p, v.offset, v.leader_epoch, v.metadata.clone()))
                            }
                            _ => out.push((
                                t.clone(),
                                vec![(*p, v.offset, v.leader_epoch, v.metadata.clone())],
                            )),
                        }
                    }
                }
                out
            }
        }
    })
    .await
    .ok_or(ec::COORDINATOR_NOT_AVAILABLE)
}

async fn offset_fetch(
    ctx: &ConnCtx,
    v: i16,
    r: kafka_protocol::messages::offset_fetch_request::OffsetFetchRequest,
) -> OffsetFetchResponse {
    let mut resp = OffsetFetchResponse::default();
    if v >= 8 {
        for g in r.groups {
            let topics = g.topics.map(|ts| {
                ts.into_iter()
                    .map(|t| (t.name.0.to_string(), t.partition_indexes))
                    .collect()
            });
            let mut rg = OffsetFetchResponseGroup::default();
            rg.group_id = g.group_id.clone();
            let gid = g.group_id.0.to_string();
            if let Err(code) =
                super::consumer_handlers::validate_fetch(ctx, &gid, g.member_id, g.member_epoch)
                    .await
            {
                rg.error_code = code;
                resp.groups.push(rg);
                continue;
            }
            match fetch_group(ctx, gid, topics).await {
                Err(code) => rg.error_code = code,
                Ok(rows) => {
                    for (t, ps) in rows {
                        let mut rt = OffsetFetchResponseTopics::default();
                        rt.name = tn(&t);
                        for (p, off, epoch, meta) in ps {
                            let mut rp = OffsetFetchResponsePartitions::default();
                            rp.partition_index = p;
                            rp.committed_offset = off;
                            rp.committed_leader_epoch = epoch;
                            rp.metadata = Some(sb(&meta));
                            rt.partitions.push(rp);
                        }
                        rg.topics.push(rt);
                    }
                }
            }
            resp.groups.push(rg);
        }
        return resp;
    }
    let topics = r.topics.map(|ts| {
        ts.into_iter()
            .map(|t| (t.name.0.to_string(), t.partition_indexes))
            .collect()
    });
    match fetch_group(ctx, r.group_id.0.to_string(), topics).await {
        Err(code) => {
            if v >= 2 {
                resp.error_code = code;
            }
        }
        Ok(rows) => {
            for (t, ps) in rows {
                let mut rt = OffsetFetchResponseTopic::default();
                rt.name = tn(&t);
                for (p, off, epoch, meta) in ps {
                    let mut rp = OffsetFetchResponsePartition::default();
                    rp.partition_index = p;
                    rp.committed_offset = off;
                    rp.committed_leader_epoch = if v >= 5 { epoch } else { -1 };
                    rp.metadata = Some(sb(&meta));
                    rt.partitions.push(rp);
                }
                resp.topics.push(rt);
            }
        }
    }
    resp
}

#[allow(dead_code)]
fn empty() -> Bytes {
    Bytes::new()
}
