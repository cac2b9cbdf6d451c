//! IncrementalAlterConfigs: set, delete, append and subtract on a topic's configs.

use kafka_protocol::messages::incremental_alter_configs_request::IncrementalAlterConfigsRequest;
use kafka_protocol::messages::incremental_alter_configs_response::{
    AlterConfigsResourceResponse as IncResourceResponse, IncrementalAlterConfigsResponse,
};

use super::alter_configs::alter_resource;
use super::util::sb;
use crate::server::ConnCtx;

pub async fn handle(
    ctx: &ConnCtx,
    req: IncrementalAlterConfigsRequest,
) -> IncrementalAlterConfigsResponse {
    let node = ctx.shard.node.clone();
    let mut resp = IncrementalAlterConfigsResponse::default();
    for res in req.resources {
        let mut r = IncResourceResponse::default();
        r.resource_type = res.resource_type;
        r.resource_name = res.resource_name.clone();
        let ops = res
            .configs
            .iter()
            .map(|c| {
                (
                    c.name.to_string(),
                    c.config_operation,
                    c.value.as_ref().map(|v| v.to_string()),
                )
            })
            .collect();
        if let Some((code, msg)) = alter_resource(
            &node,
            res.resource_type,
            res.resource_name.as_str(),
            ops,
            true,
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
