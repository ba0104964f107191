//! What the federation endpoints and the federating parts of client
//! endpoints call: the check of an incoming request's signature (with a
//! rate limit per origin server), the profile query, remote profiles, and
//! delegation (`/.well-known/matrix/server`). The transport itself (keys,
//! discovery, the signed client) is `weft-federation`'s.

use ruma::api::federation::query::get_profile_information;
use ruma::{OwnedServerName, ServerName, UserId};
use serde_json::Value;
use weft_core::{Error, ErrorKind, Result};

use crate::Services;

impl Services {
    /// The origin server an incoming federation request proves with its
    /// `X-Matrix` signature (`401 M_UNAUTHORIZED` otherwise), charged one
    /// call to its own rate-limit bucket (`origin:SERVER`).
    pub async fn federation_origin(&self, request: &http::Request<&[u8]>) -> Result<OwnedServerName> {
        if !self.config.federation.enabled {
            return Err(Error::forbidden("Federation is disabled on this server"));
        }
        let origin = self.federation.verify_request(request).await?;
        self.limiter.check(&format!("origin:{origin}"))?;
        Ok(origin)
    }

    /// `GET /_matrix/federation/v1/query/profile` for `origin`: a local
    /// user's `displayname` and `avatar_url` (only `field` when named).
    /// `404 M_NOT_FOUND` for an unknown (or deactivated) user, `400` for a
    /// user of another server.
    pub async fn federation_profile(
        &self,
        origin: &ServerName,
        user_id: &UserId,
        field: Option<&str>,
    ) -> Result<serde_json::Map<String, Value>> {
        if user_id.server_name() != self.server_name {
            return Err(Error::invalid_param(format!(
                "{user_id} is not a user of this server (asked by {origin})"
            )));
        }
        let mut profile = self.local_profile(user_id.as_str()).await?;
        if let Some(field) = field {
            profile.retain(|k, _| k == field);
        }
        Ok(profile)
    }

    /// A user of another server's profile, asked of that server (all of it,
    /// or only `field`).
    pub(crate) async fn remote_profile(
        &self,
        user_id: &UserId,
        field: Option<&str>,
    ) -> Result<serde_json::Map<String, Value>> {
        let mut request = get_profile_information::v1::Request::new(user_id.to_owned());
        request.field = field.map(Into::into);
        let response = self.federation.client.send(user_id.server_name(), request).await?;
        Ok(response
            .into_iter()
            .filter(|(k, v)| (k == "displayname" || k == "avatar_url") && v.is_string())
            .filter(|(k, _)| field.is_none_or(|f| f == k))
            .collect())
    }

    /// The body of `GET /.well-known/matrix/server` on the client
    /// listener: `{"m.server": ...}` when `[federation] well_known_server`
    /// is set (and federation is on); `None`: 404.
    pub fn well_known_server(&self) -> Option<Value> {
        let f = &self.config.federation;
        let server = f.well_known_server.as_ref().filter(|_| f.enabled)?;
        Some(serde_json::json!({ "m.server": server }))
    }

    /// The `server` of `GET /_matrix/federation/v1/version`.
    pub fn federation_version(&self) -> (&'static str, &'static str) {
        ("Weft", env!("CARGO_PKG_VERSION"))
    }
}

/// A user ID as a typed one, for the services taking `&str`.
pub(crate) fn parse_user_id(user_id: &str) -> Result<&UserId> {
    <&UserId>::try_from(user_id).map_err(|e| Error::new(ErrorKind::InvalidParam, format!("Invalid user ID: {e}")))
}
