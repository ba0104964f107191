//! Finding people and calling them: the user directory search and the
//! TURN credentials for calls.

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use weft_core::{Error, Result};

use crate::{Services, Session};

/// The most results one directory search returns.
pub const MAX_DIRECTORY_RESULTS: usize = 50;

/// TURN credentials for a client, as `GET /voip/turnServer` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TurnCredentials {
    pub username: String,
    pub password: String,
    pub uris: Vec<String>,
    pub ttl: u64,
}

/// The TURN REST API's credentials ("A REST API for access to TURN
/// services", as coturn's `use-auth-secret` checks them): the username is
/// `expiry:user`, the password base64(HMAC-SHA1(secret, username)).
pub fn turn_credentials(secret: &str, user: &str, expiry_secs: u64) -> Result<(String, String)> {
    let username = format!("{expiry_secs}:{user}");
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).map_err(Error::internal)?;
    mac.update(username.as_bytes());
    let password = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    Ok((username, password))
}

impl Services {
    /// `POST /user_directory/search`: active users whose ID or display name
    /// contains `term`, among those who share a room with the searcher or
    /// are in a room published in the directory. Answers the results (at
    /// most `limit`, itself at most [`MAX_DIRECTORY_RESULTS`]) and whether
    /// there were more.
    pub async fn search_user_directory(
        &self,
        session: &Session,
        term: &str,
        limit: usize,
    ) -> Result<(Vec<Value>, bool)> {
        let term = term.trim();
        if term.is_empty() {
            return Ok((vec![], false));
        }
        if term.len() > 255 {
            return Err(Error::invalid_param("search_term is too long"));
        }
        let limit = limit.clamp(1, MAX_DIRECTORY_RESULTS);
        let mut found = self
            .store
            .search_users(session.user_id.as_str(), term, limit + 1)
            .await?;
        let limited = found.len() > limit;
        found.truncate(limit);
        let results = found
            .into_iter()
            .map(|u| {
                let mut v = json!({ "user_id": u.user_id });
                if let Some(name) = u.displayname {
                    v["display_name"] = name.into();
                }
                if let Some(url) = u.avatar_url {
                    v["avatar_url"] = url.into();
                }
                v
            })
            .collect();
        Ok((results, limited))
    }

    /// `GET /voip/turnServer`: credentials for the configured TURN servers,
    /// or `None` when there are none.
    pub fn turn_server(&self, session: &Session) -> Result<Option<TurnCredentials>> {
        let voip = &self.config.voip;
        let Some(secret) = voip.turn_shared_secret.as_deref().filter(|s| !s.is_empty()) else {
            return Ok(None);
        };
        if voip.turn_uris.is_empty() {
            return Ok(None);
        }
        let expiry = weft_core::now_ms() / 1000 + voip.turn_ttl_secs;
        let (username, password) = turn_credentials(secret, session.user_id.as_str(), expiry)?;
        Ok(Some(TurnCredentials {
            username,
            password,
            uris: voip.turn_uris.clone(),
            ttl: voip.turn_ttl_secs,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checked against Python's `hmac`/`hashlib`, an implementation
    /// independent of ours.
    #[test]
    fn turn_credentials_are_the_rest_api_ones() {
        let (u, p) = turn_credentials("north", "@alice:example.org", 1_600_000_000).expect("credentials");
        assert_eq!(u, "1600000000:@alice:example.org");
        assert_eq!(p, "2uY6GSzqL4yE9Y0DpxcZoutDIiY=");
    }
}
