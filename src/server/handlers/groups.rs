//! Consumer group APIs, answered by the group coordinator (src/group).

use kafka_protocol::messages::{RequestHeader, RequestKind, ResponseKind};

use crate::server::ConnCtx;

pub async fn dispatch(
    ctx: &ConnCtx,
    header: &RequestHeader,
    req: RequestKind,
) -> Option<ResponseKind> {
    crate::group::handlers::dispatch(ctx, header, req).await
}
