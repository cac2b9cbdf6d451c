//! Group API handlers (not advertised until the coordinator is wired).

use kafka_protocol::messages::{RequestHeader, RequestKind, ResponseKind};

use crate::server::ConnCtx;

pub async fn dispatch(_ctx: &ConnCtx, _header: &RequestHeader, _req: RequestKind) -> Option<ResponseKind> {
    None
}
