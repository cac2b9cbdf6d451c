//! ConsumerGroupDescribe (KIP-848): a consumer-protocol group's members, their assignments and
//! target assignments, topics named and identified.

use kafka_protocol::messages::consumer_group_describe_request::ConsumerGroupDescribeRequest;
use kafka_protocol::messages::consumer_group_describe_response::{
    self as cgd, ConsumerGroupDescribeResponse, DescribedGroup,
};

use super::util::{authorized_operations, on_coordinator, sb, tn, valid_group, GROUP_OPERATIONS};
use crate::cluster::metadata::MetadataImage;
use crate::group::consumer_group::{Assignment, GroupDescription};
use crate::server::errors as ec;
use crate::server::ConnCtx;

pub async fn handle(
    ctx: &ConnCtx,
    version: i16,
    r: ConsumerGroupDescribeRequest,
) -> ConsumerGroupDescribeResponse {
    let mut resp = ConsumerGroupDescribeResponse::default();
    let group_operations = authorized_operations(r.include_authorized_operations, GROUP_OPERATIONS);
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
        let out = on_coordinator(&ctx.shard.node, &group, move |sh, g| async move {
            let d = g.consumer_describe(&g2)?;
            let img = sh.node.image();
            Some(describe_wire(&d, &img, version))
        })
        .await;
        match out {
            None => dg.error_code = super::util::no_coordinator(&ctx.shard.node, &group),
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

fn describe_wire(d: &GroupDescription, img: &MetadataImage, version: i16) -> DescribedGroup {
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
        if version >= 1 {
            // 1: a member using the consumer protocol (0 would be a classic member).
            wm.member_type = 1;
        }
        dg.members.push(wm);
    }
    dg
}
