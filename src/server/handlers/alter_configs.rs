//! AlterConfigs: replaces a topic's whole config set (or a broker's dynamic configs: the
//! replication throttles), through the controller.

use kafka_protocol::messages::alter_configs_request::AlterConfigsRequest;
use kafka_protocol::messages::alter_configs_response::{
    AlterConfigsResourceResponse, AlterConfigsResponse,
};

use super::describe_configs::{RESOURCE_BROKER, RESOURCE_TOPIC};
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
    if resource_type == RESOURCE_BROKER {
        return alter_broker(node, name, changes, incremental, validate_only).await;
    }
    if resource_type != RESOURCE_TOPIC {
        return Err((
            ec::INVALID_REQUEST,
            "only topic and broker configs can be altered".into(),
        ));
    }
    if node.cluster.is_some() {
        let (current, next) = controller::resolve_topic_configs(node, name, changes, incremental)
            .map_err(ec::controller)?;
        let topic = name.to_string();
        let want = next.clone();
        return forwarded(
            node,
            RESOURCE_TOPIC,
            name,
            current,
            next,
            validate_only,
            move |img| img.topic(&topic).is_some_and(|t| t.configs == want),
        )
        .await;
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

/// A broker's dynamic configs (resource name: its id, or "" for every broker): only in a
/// cluster, where they live in the metadata log; the controller judges names and values.
async fn alter_broker(
    node: &Node,
    name: &str,
    changes: Vec<ConfigChange>,
    incremental: bool,
    validate_only: bool,
) -> Result<(), (i16, String)> {
    let Some(view) = node.image().cluster.clone() else {
        return Err((
            ec::INVALID_REQUEST,
            "a single node has no dynamic broker configs: the replication throttles they hold \
             apply to clusters"
                .into(),
        ));
    };
    let id = if name.is_empty() {
        -1
    } else {
        match name.parse::<i32>() {
            Ok(id) if id >= 0 => id,
            _ => return Err((ec::INVALID_REQUEST, format!("{name:?} is not a broker id"))),
        }
    };
    let current = view.broker_configs.get(&id).cloned().unwrap_or_default();
    let mut next = if incremental {
        current.clone()
    } else {
        Default::default()
    };
    for c in changes {
        match (c.op, c.value) {
            (ConfigOp::Set, Some(v)) => {
                next.insert(c.name, v);
            }
            (ConfigOp::Delete, _) => {
                next.remove(&c.name);
            }
            (op, _) => {
                return Err((
                    ec::INVALID_REQUEST,
                    format!("{op:?} does not apply to broker config {}", c.name),
                ))
            }
        }
    }
    let want = next.clone();
    forwarded(
        node,
        RESOURCE_BROKER,
        name,
        current,
        next,
        validate_only,
        move |img| {
            img.cluster
                .as_ref()
                .is_some_and(|c| c.broker_configs.get(&id).cloned().unwrap_or_default() == want)
        },
    )
    .await
}

/// In a cluster: the changes, resolved against this node's image (the same rules as on one
/// node), go to the active controller as the resulting sets and deletions; answered once this
/// node's image shows them (`applied`).
async fn forwarded(
    node: &Node,
    resource_type: i8,
    name: &str,
    current: std::collections::BTreeMap<String, String>,
    next: std::collections::BTreeMap<String, String>,
    validate_only: bool,
    applied: impl Fn(&crate::cluster::metadata::MetadataImage) -> bool,
) -> Result<(), (i16, String)> {
    use kafka_protocol::messages::incremental_alter_configs_request::{
        AlterConfigsResource, AlterableConfig, IncrementalAlterConfigsRequest,
    };
    let mut res = AlterConfigsResource::default();
    res.resource_type = resource_type;
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
        crate::server::controller::wait_for_image(node, std::time::Duration::from_secs(5), applied)
            .await;
    }
    Ok(())
}
