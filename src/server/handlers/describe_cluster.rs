//! DescribeCluster: this node as the whole cluster and its controller.

use kafka_protocol::messages::describe_cluster_request::DescribeClusterRequest;
use kafka_protocol::messages::describe_cluster_response::{
    DescribeClusterBroker, DescribeClusterResponse,
};
use kafka_protocol::messages::BrokerId;

use super::util::sb;
use crate::server::ConnCtx;

pub fn handle(ctx: &ConnCtx, req: DescribeClusterRequest) -> DescribeClusterResponse {
    let node = &ctx.shard.node;
    let mut resp = DescribeClusterResponse::default();
    resp.cluster_id = sb(&node.cluster_id());
    resp.controller_id = BrokerId(node.node_id);
    resp.endpoint_type = 1;
    resp.cluster_authorized_operations = super::util::authorized_operations(
        req.include_cluster_authorized_operations,
        super::util::CLUSTER_OPERATIONS,
    );
    let img = node.image();
    match &img.cluster {
        Some(c) => {
            for x in &c.brokers {
                if x.fenced && !req.include_fenced_brokers {
                    continue;
                }
                let mut b = DescribeClusterBroker::default();
                b.broker_id = BrokerId(x.id);
                b.host = sb(&x.host);
                b.port = x.port;
                b.rack = x.rack.as_deref().map(sb);
                b.is_fenced = x.fenced;
                resp.brokers.push(b);
            }
        }
        None => {
            let mut b = DescribeClusterBroker::default();
            b.broker_id = BrokerId(node.node_id);
            b.host = sb(&node.advertised_host);
            b.port = node.advertised_port;
            resp.brokers.push(b);
        }
    }
    resp
}
