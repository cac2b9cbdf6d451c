//! AlterConfigs: replaces a topic's whole config set, through the controller.

use kafka_protocol::messages::alter_configs_request::AlterConfigsRequest;
use kafka_protocol::messages::alter_configs_response::{
    AlterConfigsResourceResponse, AlterConfigsResponse,
};

use super::describe_configs::RESOURCE_TOPIC;
use super::util::sb;
use crate::cluster::controller::{self, ConfigChange, ConfigOp};
use crate::cluster::node::Node;
use crate::server::errors as ec;
use crate::server::ConnCtx;
use crate::shard::on_controller;

/// One resource of AlterConfigs / IncrementalAlterConfigs: (error code, message) on failure.
pub async fn alter_resource(
    node: &Node,
    resource_type: i8,
    name: &str,
    changes: Vec<ConfigChange>,
    incremental: bool,
    validate_only: bool,
) -> Result<(), (i16, String)> {
    if resource_type != RESOURCE_TOPIC {
        return Err((
            ec::INVALID_REQUEST,
            "only topic configs can be altered".into(),
        ));
    }
    if node.cluster.is_some() {
        return forwarded(node, name, changes, incremental, validate_only).await;
    }
    let name = name.to_owned();
    on_controller(node, move |node| {
        controller::alter_topic_configs(node, &name, changes, incremental, validate_only)
    })
    .await
    .map_err(ec::controller)
}

pub async fn handle(ctx: &ConnCtx, req: AlterConfigsRequest) -> AlterConfigsResponse {
    let node = ctx.shard.node.clone();
    let mut resp = AlterConfigsResponse::default();
    for res in req.resources {
        // AlterConfigs replaces the whole set: every entry is a "set".
        let changes = res
            .configs
            .iter()
            .map(|c| ConfigChange {
                name: c.name.to_string(),
                op: ConfigOp::Set,
                value: c.value.as_ref().map(|v| v.to_string()),
            })
            .collect();
        let name = res.resource_name.as_str();
        let altered = alter_resource(
            &node,
            res.resource_type,
            name,
            changes,
            false,
            req.validate_only,
        )
        .await;
        let mut r = AlterConfigsResourceResponse::default();
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

/// In a cluster: the changes are resolved against this node's image (the same rules as on one
/// node), then the active controller records the resulting sets and deletions.
async fn forwarded(
    node: &Node,
    name: &str,
    changes: Vec<ConfigChange>,
    incremental: bool,
    validate_only: bool,
) -> Result<(), (i16, String)> {
    use kafka_protocol::messages::incremental_alter_configs_request::{
        AlterConfigsResource, AlterableConfig, IncrementalAlterConfigsRequest,
    };
    let (current, next) = controller::resolve_topic_configs(node, name, changes, incremental)
        .map_err(ec::controller)?;
    let mut res = AlterConfigsResource::default();
    res.resource_type = RESOURCE_TOPIC;
    res.resource_name = sb(name);
    for (k, v) in &next {
        if current.get(k) != Some(v) {
            let mut c = AlterableConfig::default();
            c.name = sb(k);
            c.config_operation = 0;
            c.value = Some(sb(v));
            res.configs.push(c);
        }
    }
    for k in current.keys().filter(|k| !next.contains_key(*k)) {
        let mut c = AlterableConfig::default();
        c.name = sb(k);
        c.config_operation = 1;
        res.configs.push(c);
    }
    let mut req = IncrementalAlterConfigsRequest::default();
    req.validate_only = validate_only;
    req.resources.push(res);
    let resp = crate::server::controller::forward(node, 1, &req)
        .await
        .map_err(|e| (ec::NOT_CONTROLLER, format!("{e:#}")))?;
    if let Some(r) = resp.responses.first() {
        if r.error_code != ec::NONE {
            return Err((
                r.error_code,
                r.error_message
                    .as_ref()
                    .map(|m| m.to_string())
                    .unwrap_or_default(),
            ));
        }
    }
    if !validate_only {
        let name = name.to_string();
        crate::server::controller::wait_for_image(node, std::time::Duration::from_secs(5), |img| {
            img.topic(&name).is_some_and(|t| t.configs == next)
        })
        .await;
    }
    Ok(())
}
