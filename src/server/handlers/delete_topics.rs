//! DeleteTopics: by name or, from v6, by topic id, through the controller.

use kafka_protocol::messages::delete_topics_request::DeleteTopicsRequest;
use kafka_protocol::messages::delete_topics_response::{
    DeletableTopicResult, DeleteTopicsResponse,
};

use super::util::{sb, tn};
use crate::server::errors as ec;
use crate::server::ConnCtx;
use crate::shard;

pub async fn handle(ctx: &ConnCtx, version: i16, req: DeleteTopicsRequest) -> DeleteTopicsResponse {
    let node = ctx.shard.node.clone();
    let mut resp = DeleteTopicsResponse::default();
    let targets = targets(version, &req);
    for (name, id) in targets {
        let mut r = DeletableTopicResult::default();
        let resolved = match &name {
            Some(n) => Some(n.clone()),
            None => node.image().topic_by_id(&id).map(|t| t.name.clone()),
        };
        r.name = resolved.as_deref().map(tn);
        r.topic_id = resolved
            .as_deref()
            .and_then(|n| node.image().topic(n).map(|t| t.id))
            .unwrap_or(id);
        match resolved {
            None => r.error_code = ec::UNKNOWN_TOPIC_ID,
            Some(n) => {
                if let Err((code, msg)) =
                    shard::delete_topic(&node, n).await.map_err(ec::controller)
                {
                    r.error_code = code;
                    r.error_message = Some(sb(&msg));
                }
            }
        }
        resp.responses.push(r);
    }
    resp
}

/// In a cluster the active controller deletes the topics; the answer waits until this node no
/// longer serves them.
pub async fn forwarded(
    ctx: &ConnCtx,
    version: i16,
    req: DeleteTopicsRequest,
) -> DeleteTopicsResponse {
    let node = ctx.shard.node.clone();
    match crate::server::controller::forward_for_client(&node, version, &req, &ctx.client_host)
        .await
    {
        Ok(resp) => {
            let gone: Vec<uuid::Uuid> = resp
                .responses
                .iter()
                .filter(|r| r.error_code == ec::NONE)
                .map(|r| r.topic_id)
                .collect();
            crate::server::controller::wait_for_image(
                &node,
                std::time::Duration::from_secs(5),
                |img| gone.iter().all(|id| img.topic_by_id(id).is_none()),
            )
            .await;
            resp
        }
        Err(e) => {
            let mut resp = DeleteTopicsResponse::default();
            let names = targets(version, &req);
            for (name, id) in names {
                let mut r = DeletableTopicResult::default();
                r.name = name.as_deref().map(tn);
                r.topic_id = id;
                r.error_code = ec::NOT_CONTROLLER;
                r.error_message = Some(sb(&format!("{e:#}")));
                resp.responses.push(r);
            }
            resp
        }
    }
}

/// The topics a request names: by name, or from v6 by name or id.
fn targets(version: i16, req: &DeleteTopicsRequest) -> Vec<(Option<String>, uuid::Uuid)> {
    if version >= 6 {
        req.topics
            .iter()
            .map(|t| (t.name.as_ref().map(|n| n.0.to_string()), t.topic_id))
            .collect()
    } else {
        req.topic_names
            .iter()
            .map(|n| (Some(n.0.to_string()), uuid::Uuid::nil()))
            .collect()
    }
}
