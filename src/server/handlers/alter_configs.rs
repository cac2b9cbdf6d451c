//! AlterConfigs: replaces a topic's whole config set, through the controller.

use kafka_protocol::messages::alter_configs_request::AlterConfigsRequest;
use kafka_protocol::messages::alter_configs_response::{
    AlterConfigsResourceResponse, AlterConfigsResponse,
};

use super::describe_configs::RESOURCE_TOPIC;
use super::util::sb;
use crate::cluster::controller;
use crate::cluster::node::Node;
use crate::server::errors as ec;
use crate::server::ConnCtx;
use crate::shard::on_controller;

/// One resource of AlterConfigs / IncrementalAlterConfigs: (error code, message) on failure.
pub async fn alter_resource(
    node: &Node,
    resource_type: i8,
    name: &str,
    ops: Vec<(String, i8, Option<String>)>,
    incremental: bool,
    validate_only: bool,
) -> Option<(i16, String)> {
    if resource_type != RESOURCE_TOPIC {
        return Some((
            ec::INVALID_REQUEST,
            "only topic configs can be altered".into(),
        ));
    }
    let name = name.to_owned();
    on_controller(node, move |node| {
        controller::alter_topic_configs(node, &name, ops, incremental, validate_only)
    })
    .await
    .err()
    .map(ec::controller)
}

pub async fn handle(ctx: &ConnCtx, req: AlterConfigsRequest) -> AlterConfigsResponse {
    let node = ctx.shard.node.clone();
    let mut resp = AlterConfigsResponse::default();
    for res in req.resources {
        let mut r = AlterConfigsResourceResponse::default();
        r.resource_type = res.resource_type;
        r.resource_name = res.resource_name.clone();
        // AlterConfigs replaces the whole set: every entry is a "set" (op 0).
        let ops = res
            .configs
            .iter()
            .map(|c| {
                (
                    c.name.to_string(),
                    0i8,
                    c.value.as_ref().map(|v| v.to_string()),
                )
            })
            .collect();
        if let Some((code, msg)) = alter_resource(
            &node,
            res.resource_type,
            res.resource_name.as_str(),
            ops,
            false,
            req.validate_only,
        )
        .await
        {
            r.error_code = code;
            r.error_message = Some(sb(&msg));
        }
        resp.responses.push(r);
    }
    resp
}
