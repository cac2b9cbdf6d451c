//! ApiVersions: advertise exactly the APIs and versions that work.

use kafka_protocol::messages::api_versions_response::{ApiVersion, ApiVersionsResponse};
use kafka_protocol::messages::ApiKey;

pub fn response(error_code: i16) -> ApiVersionsResponse {
    let mut r = ApiVersionsResponse::default();
    r.error_code = error_code;
    for key in ApiKey::iter() {
        if let Some((min, max)) = crate::server::supported_versions(key) {
            let mut v = ApiVersion::default();
            v.api_key = key as i16;
            v.min_version = min;
            v.max_version = max;
            r.api_keys.push(v);
        }
    }
    r.finalized_features_epoch = -1;
    r
}
