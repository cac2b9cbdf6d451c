//! FindCoordinator: every group is coordinated by this node (transaction coordinators are not
//! supported yet).

use kafka_protocol::messages::find_coordinator_request::FindCoordinatorRequest;
use kafka_protocol::messages::find_coordinator_response::{Coordinator, FindCoordinatorResponse};
use kafka_protocol::messages::BrokerId;
use kafka_protocol::protocol::StrBytes;

use super::util::{sb, valid_group};
use crate::server::errors as ec;
use crate::server::ConnCtx;

pub async fn handle(
    ctx: &ConnCtx,
    version: i16,
    r: FindCoordinatorRequest,
) -> FindCoordinatorResponse {
    let node = &ctx.shard.node;
    let mut resp = FindCoordinatorResponse::default();
    let keys: Vec<StrBytes> = if version >= 4 {
        r.coordinator_keys.clone()
    } else {
        vec![r.key.clone()]
    };
    let mut out = Vec::new();
    for k in keys {
        let mut c = Coordinator::default();
        c.key = k.clone();
        if r.key_type != 0 {
            c.error_code = ec::COORDINATOR_NOT_AVAILABLE;
            c.error_message = Some(sb("transactions are not supported yet"));
            c.node_id = BrokerId(-1);
            c.host = sb("");
            c.port = -1;
        } else if !valid_group(k.as_str()) {
            c.error_code = ec::INVALID_GROUP_ID;
            c.node_id = BrokerId(-1);
            c.host = sb("");
            c.port = -1;
        } else {
            c.node_id = BrokerId(node.node_id);
            c.host = sb(&node.advertised_host);
            c.port = node.advertised_port;
        }
        out.push(c);
    }
    if version >= 4 {
        resp.coordinators = out;
    } else if let Some(c) = out.into_iter().next() {
        resp.error_code = c.error_code;
        resp.error_message = c.error_message;
        resp.node_id = c.node_id;
        resp.host = c.host;
        resp.port = c.port;
    }
    resp
}
