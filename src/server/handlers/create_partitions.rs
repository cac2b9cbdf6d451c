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

pub async fn handle(
    ctx: &ConnCtx,
    version: i16,
    req: CreatePartitionsRequest,
) -> CreatePartitionsResponse {
    let node = ctx.shard.node.clone();
    if node.cluster.is_some() {
        return forwarded(&node, version, req, &ctx.client_host).await;
    }
    let mut resp = CreatePartitionsResponse::default();
    for t in req.topics {
        let mut r = CreatePartitionsTopicResult::default();
        r.name = t.name.clone();
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

/// In a cluster the active controller places the new partitions; answered once this node's
/// image has them.
async fn forwarded(
    node: &crate::cluster::node::Node,
    version: i16,
    req: CreatePartitionsRequest,
    client_host: &str,
) -> CreatePartitionsResponse {
    let wanted: Vec<(String, i32)> = req
        .topics
        .iter()
        .map(|t| (t.name.0.to_string(), t.count))
        .collect();
    match crate::server::controller::forward_for_client(node, version, &req, client_host).await {
        Ok(resp) => {
            if !req.validate_only {
                let grown: Vec<(String, i32)> = resp
                    .results
                    .iter()
                    .filter(|r| r.error_code == ec::NONE)
                    .filter_map(|r| wanted.iter().find(|(n, _)| n == r.name.0.as_str()).cloned())
                    .collect();
                crate::server::controller::wait_for_image(
                    node,
                    std::time::Duration::from_secs(5),
                    |img| {
                        grown
                            .iter()
                            .all(|(n, c)| img.topic(n).is_some_and(|t| t.partitions >= *c))
                    },
                )
                .await;
            }
            resp
        }
        Err(e) => {
            let mut resp = CreatePartitionsResponse::default();
            for t in req.topics {
                let mut r = CreatePartitionsTopicResult::default();
                r.name = t.name;
                r.error_code = ec::NOT_CONTROLLER;
                r.error_message = Some(sb(&format!("{e:#}")));
                resp.results.push(r);
            }
            resp
        }
    }
}
