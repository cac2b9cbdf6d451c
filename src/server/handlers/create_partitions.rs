//! CreatePartitions: grows a topic's partition count (never shrinks), through the controller.

use std::sync::Arc;

use kafka_protocol::messages::create_partitions_request::CreatePartitionsRequest;
use kafka_protocol::messages::create_partitions_response::{
    CreatePartitionsResponse, CreatePartitionsTopicResult,
};

use super::util::sb;
use crate::cluster::controller;
use crate::server::ConnCtx;

pub async fn handle(ctx: &ConnCtx, req: CreatePartitionsRequest) -> CreatePartitionsResponse {
    let node = ctx.shard.node.clone();
    let mut resp = CreatePartitionsResponse::default();
    for t in req.topics {
        let mut r = CreatePartitionsTopicResult::default();
        r.name = t.name.clone();
        if let Err((code, msg)) = controller::create_partitions(
            Arc::clone(&node),
            t.name.0.to_string(),
            t.count,
            req.validate_only,
        )
        .await
        {
            r.error_code = code;
            r.error_message = Some(sb(&msg));
        }
        resp.results.push(r);
    }
    resp
}
