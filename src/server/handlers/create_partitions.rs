//! CreatePartitions: grows a topic's partition count (never shrinks), through the controller.

use kafka_protocol::messages::create_partitions_request::CreatePartitionsRequest;
use kafka_protocol::messages::create_partitions_response::{
    CreatePartitionsResponse, CreatePartitionsTopicResult,
};

use super::util::sb;
use crate::cluster::controller;
use crate::server::errors as ec;
use crate::server::ConnCtx;
use crate::shard::on_controller;

pub async fn handle(ctx: &ConnCtx, req: CreatePartitionsRequest) -> CreatePartitionsResponse {
    let node = ctx.shard.node.clone();
    let mut resp = CreatePartitionsResponse::default();
    for t in req.topics {
        let mut r = CreatePartitionsTopicResult::default();
        r.name = t.name.clone();
        if node.cluster.is_some() {
            // Growing a topic needs the controller to place the new partitions: not yet.
            r.error_code = ec::INVALID_REQUEST;
            r.error_message = Some(sb("CreatePartitions is not supported in a cluster yet"));
            resp.results.push(r);
            continue;
        }
        let (name, count, validate_only) = (t.name.0.to_string(), t.count, req.validate_only);
        let created = on_controller(&node, move |node| {
            controller::create_partitions(node, &name, count, validate_only)
        })
        .await;
        if let Err((code, msg)) = created.map_err(ec::controller) {
            r.error_code = code;
            r.error_message = Some(sb(&msg));
        }
        resp.results.push(r);
    }
    resp
}
