//! OffsetCommit: checks each partition here, then commits the rest on the group's coordinator
//! shard (stored in `__consumer_offsets` before it is answered).

use kafka_protocol::messages::offset_commit_request::OffsetCommitRequest;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponse, OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};

use super::util::{on_coordinator, string_of, valid_group};
use crate::group::records::OffsetValue;
use crate::group::OFFSET_METADATA_BYTES_MAX;
use crate::server::errors as ec;
use crate::server::ConnCtx;

pub async fn handle(ctx: &ConnCtx, _version: i16, r: OffsetCommitRequest) -> OffsetCommitResponse {
    let node = ctx.shard.node.clone();
    let group = string_of(&r.group_id.0);
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
                    row.push(Some(ec::OFFSET_METADATA_TOO_LARGE));
                } else {
                    commits.push((
                        name.clone(),
                        p.partition_index,
                        OffsetValue {
                            offset: p.committed_offset,
                            leader_epoch: p.committed_leader_epoch,
                            metadata: meta,
                            commit_timestamp_ms: crate::group::now_ms() as i64,
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
        let member = string_of(&r.member_id);
        let instance = r.group_instance_id.as_ref().map(string_of);
        let g2 = group.clone();
        on_coordinator(&node, &group, move |sh, g| async move {
            g.commit_offsets(
                sh.as_ref(),
                &g2,
                generation,
                &member,
                instance.as_deref(),
                commits,
            )
            .await
        })
        .await
        .unwrap_or_else(|| super::util::no_coordinator(&ctx.shard.node, &group))
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
