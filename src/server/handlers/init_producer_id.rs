//! InitProducerId: a producer id block from the controller for idempotent producers.

use kafka_protocol::messages::init_producer_id_request::InitProducerIdRequest;
use kafka_protocol::messages::init_producer_id_response::InitProducerIdResponse;
use kafka_protocol::messages::ProducerId;

use crate::cluster::controller;
use crate::server::errors as ec;
use crate::server::ConnCtx;
use crate::shard::on_controller;

pub async fn handle(ctx: &ConnCtx, req: InitProducerIdRequest) -> InitProducerIdResponse {
    let mut resp = InitProducerIdResponse::default();
    resp.ongoing_txn_producer_id = ProducerId(-1);
    resp.ongoing_txn_producer_epoch = -1;
    if req.transactional_id.is_some() {
        resp.error_code = ec::TRANSACTIONAL_ID_AUTHORIZATION_FAILED;
        resp.producer_id = ProducerId(-1);
        resp.producer_epoch = -1;
        return resp;
    }
    // An idempotent producer re-initializing with its id (KIP-360) gets the same id, next epoch.
    if req.producer_id.0 >= 0 && req.producer_epoch >= 0 && req.producer_epoch < i16::MAX - 1 {
        resp.producer_id = req.producer_id;
        resp.producer_epoch = req.producer_epoch + 1;
        return resp;
    }
    if ctx.shard.node.cluster.is_some() {
        let node = ctx.shard.node.clone();
        let got = crate::shard::invoke(node.controller_shard(), |_| async move {
            match crate::server::controller::handle() {
                Some(h) => h.next_producer_id().await,
                None => Err(ec::COORDINATOR_NOT_AVAILABLE),
            }
        })
        .await;
        match got {
            Ok(id) => {
                resp.producer_id = ProducerId(id);
                resp.producer_epoch = 0;
            }
            Err(code) => {
                resp.error_code = code;
                resp.producer_id = ProducerId(-1);
                resp.producer_epoch = -1;
            }
        }
        return resp;
    }
    match on_controller(&ctx.shard.node, controller::allocate_producer_id).await {
        Ok(id) => {
            resp.producer_id = ProducerId(id);
            resp.producer_epoch = 0;
        }
        Err(refused) => {
            let (code, _) = ec::controller(refused);
            resp.error_code = code;
            resp.producer_id = ProducerId(-1);
            resp.producer_epoch = -1;
        }
    }
    resp
}
