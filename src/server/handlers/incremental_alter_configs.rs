//! IncrementalAlterConfigs: set, delete, append and subtract on a topic's configs.

use kafka_protocol::messages::incremental_alter_configs_request::IncrementalAlterConfigsRequest;
use kafka_protocol::messages::incremental_alter_configs_response::{
    AlterConfigsResourceResponse as IncResourceResponse, IncrementalAlterConfigsResponse,
};

use super::alter_configs::alter_resource;
use super::util::sb;
use crate::cluster::controller::{ConfigChange, ConfigOp};
use crate::server::ConnCtx;

pub async fn handle(
    ctx: &ConnCtx,
    req: IncrementalAlterConfigsRequest,
) -> IncrementalAlterConfigsResponse {
    let node = ctx.shard.node.clone();
    let mut resp = IncrementalAlterConfigsResponse::default();
    for res in req.resources {
        let changes = res
            .configs
            .iter()
            .map(|c| ConfigChange {
                name: c.name.to_string(),
                op: ConfigOp::from_kafka(c.config_operation),
                value: c.value.as_ref().map(|v| v.to_string()),
            })
            .collect();
        let name = res.resource_name.as_str();
        let altered = alter_resource(
            &node,
            res.resource_type,
            name,
            changes,
            true,
            req.validate_only,
        )
        .await;
        let mut r = IncResourceResponse::default();
        r.resource_type = res.resource_type;
        r.resource_name = res.resource_name;
        if let Err((code, message)) = altered {
            r.error_code = code;
            r.error_message = Some(sb(&message));
        }
        resp.responses.push(r);
    }
    resp
}
