//! Service metadata: the version endpoint.

use poem_openapi::{Object, OpenApi, payload::Json};

use super::Tag;

/// Build information.
#[derive(Debug, Object)]
pub struct VersionInfo {
    /// Product name.
    pub name: String,
    /// Semantic version of this build.
    pub version: String,
    /// Newest database migration this build knows.
    pub schema_version: i64,
}

/// Version endpoint.
pub struct SystemApi;

#[OpenApi(tag = "Tag::System")]
impl SystemApi {
    /// Version of this server.
    ///
    /// Least role: none (public).
    #[oai(path = "/version", method = "get", operation_id = "version_get")]
    async fn version_get(&self) -> Json<VersionInfo> {
        Json(VersionInfo {
            name: "aiops".to_owned(),
            version: crate::VERSION.to_owned(),
            schema_version: crate::store::MIGRATOR
                .iter()
                .map(|m| m.version)
                .max()
                .unwrap_or(0),
        })
    }
}
