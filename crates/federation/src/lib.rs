//! The transport of the Server-Server API (docs/federation.md): server
//! discovery ([`resolve`]), the signed outgoing client
//! ([`FederationClient`]), the key ring ([`KeyRing`]: our keys, and other
//! servers' keys fetched, checked and kept in the database), and the check
//! of incoming requests' `X-Matrix` signatures
//! ([`Federation::verify_request`]). Everything later federation work
//! sends or verifies goes through here.

pub mod client;
pub mod keyring;
pub mod resolve;

use std::sync::Arc;

use ruma::api::auth_scheme::AuthScheme;
use ruma::api::federation::authentication::{ServerSignatures, XMatrix};
use ruma::signatures::{Ed25519KeyPair, PublicKeyMap};
use ruma::{OwnedServerName, ServerName};
use weft_core::config::FederationConfig;
use weft_core::{Error, ErrorKind, Result};
use weft_store::FederationStore;

pub use client::FederationClient;
pub use keyring::KeyRing;

/// Federation as the services hold it: our name, the client and the keys.
pub struct Federation {
    pub server_name: OwnedServerName,
    pub client: Arc<FederationClient>,
    pub keys: KeyRing,
}

impl Federation {
    /// `key` is the server's signing key, shared with the room service.
    pub fn new(
        config: &FederationConfig,
        server_name: OwnedServerName,
        key: Arc<Ed25519KeyPair>,
        store: Arc<dyn FederationStore>,
    ) -> Result<Self> {
        let client = Arc::new(FederationClient::new(config, server_name.clone(), key.clone())?);
        let keys = KeyRing::new(
            server_name.clone(),
            key,
            store,
            client.clone(),
            &config.trusted_key_servers,
        );
        Ok(Self {
            server_name,
            client,
            keys,
        })
    }

    /// Checks an incoming request's `Authorization: X-Matrix` header
    /// against its method, URI and body, and answers the origin server it
    /// proves. `401 M_UNAUTHORIZED` when the header is missing or
    /// malformed, names another destination than us, or its signature
    /// does not verify with the origin's key (fetched if not known).
    pub async fn verify_request(&self, request: &http::Request<&[u8]>) -> Result<OwnedServerName> {
        let unauthorized = |m: String| Error::new(ErrorKind::Unauthorized, m);
        // A body that is not JSON cannot have been signed: say so (as for
        // any other bad body) rather than blame the signature.
        let body = request.body();
        if !body.is_empty() && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err() {
            return Err(Error::new(ErrorKind::NotJson, "The request body is not valid JSON"));
        }
        let x_matrix = <ServerSignatures as AuthScheme>::extract_authentication(request)
            .map_err(|e| unauthorized(format!("Missing or malformed X-Matrix authorization: {e}")))?;
        if let Some(destination) = &x_matrix.destination
            && *destination != self.server_name
        {
            return Err(unauthorized(format!(
                "The request is for {destination}, this server is {}",
                self.server_name
            )));
        }
        let keys = self
            .keys
            .keys_of(&x_matrix.origin, &[x_matrix.key.to_string()])
            .await
            .map_err(|e| unauthorized(format!("No key {} of {}: {}", x_matrix.key, x_matrix.origin, e.message)))?;
        if keys.is_empty() {
            return Err(unauthorized(format!("{} has no key {}", x_matrix.origin, x_matrix.key)));
        }
        let mut map = PublicKeyMap::new();
        map.insert(x_matrix.origin.to_string(), keys);
        verify(&x_matrix, request, &self.server_name, &map)?;
        Ok(x_matrix.origin)
    }
}

fn verify(x_matrix: &XMatrix, request: &http::Request<&[u8]>, us: &ServerName, keys: &PublicKeyMap) -> Result<()> {
    x_matrix
        .verify_request(request, us, keys)
        .map_err(|e| Error::new(ErrorKind::Unauthorized, format!("Bad X-Matrix signature: {e}")))
}
