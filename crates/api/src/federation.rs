//! The Server-Server API endpoints (declared in `federation_routes`):
//! version, our keys, the notary key queries, the profile query, and
//! transactions (`/send`). Each only translates between ruma's types and
//! the services.

use std::collections::BTreeMap;

use ruma::MilliSecondsSinceUnixEpoch;
use ruma::api::federation::discovery::{
    get_remote_server_keys, get_remote_server_keys_batch, get_server_keys, get_server_version,
};
use ruma::api::federation::query::get_profile_information;
use ruma::api::federation::transactions::send_transaction_message;
use weft_core::Error;

use crate::AppState;
use crate::endpoint::{Ruma, raw};
use crate::own;

/// `GET /_matrix/federation/v1/version`: `Weft` and the crate version.
pub async fn version(
    s: AppState,
    _: Ruma<get_server_version::v1::Request>,
) -> Result<get_server_version::v1::Response, Error> {
    let (name, version) = s.federation_version();
    let mut server = get_server_version::v1::Server::new();
    server.name = Some(name.to_owned());
    server.version = Some(version.to_owned());
    let mut response = get_server_version::v1::Response::new();
    response.server = Some(server);
    Ok(response)
}

/// `GET /_matrix/key/v2/server`: our key, signed by it.
pub async fn server_keys(
    s: AppState,
    _: Ruma<get_server_keys::v2::Request>,
) -> Result<get_server_keys::v2::Response, Error> {
    server_keys_response(&s)
}

/// `GET /_matrix/key/v2/server/{keyId}` (deprecated): as
/// [`server_keys`], whatever the key ID.
pub async fn server_keys_by_id(
    s: AppState,
    _: Ruma<own::server_keys_by_id::Request>,
) -> Result<get_server_keys::v2::Response, Error> {
    server_keys_response(&s)
}

fn server_keys_response(s: &AppState) -> Result<get_server_keys::v2::Response, Error> {
    let keys = s.federation.keys.own_keys()?;
    Ok(get_server_keys::v2::Response::new(raw(
        serde_json::to_value(keys).map_err(Error::internal)?
    )?))
}

/// `POST /_matrix/key/v2/query`: as a notary, each asked server's keys
/// (stored, or fetched), signed by us too; servers whose keys cannot be
/// found are left out.
pub async fn query_keys(
    s: AppState,
    req: Ruma<get_remote_server_keys_batch::v2::Request>,
) -> Result<get_remote_server_keys_batch::v2::Response, Error> {
    let mut out = Vec::new();
    for (server, criteria) in &req.body.server_keys {
        let minimum = criteria
            .values()
            .filter_map(|c| c.minimum_valid_until_ts)
            .max()
            .map(|t| u64::from(t.get()));
        if let Some(keys) = s.federation.keys.notary_response(server, minimum).await {
            out.push(keys);
        }
    }
    Ok(get_remote_server_keys_batch::v2::Response::new(out))
}

/// `GET /_matrix/key/v2/query/{serverName}`: as [`query_keys`] for one
/// server.
pub async fn query_keys_of(
    s: AppState,
    req: Ruma<get_remote_server_keys::v2::Request>,
) -> Result<get_remote_server_keys::v2::Response, Error> {
    let minimum = req.body.minimum_valid_until_ts;
    let minimum = (minimum > MilliSecondsSinceUnixEpoch::now()).then(|| u64::from(minimum.get()));
    let keys = s.federation.keys.notary_response(&req.body.server_name, minimum).await;
    Ok(get_remote_server_keys::v2::Response::new(keys.into_iter().collect()))
}

/// `GET /_matrix/federation/v1/query/profile`: a local user's profile.
pub async fn query_profile(
    s: AppState,
    req: Ruma<get_profile_information::v1::Request>,
) -> Result<get_profile_information::v1::Response, Error> {
    let field = req.body.field.as_ref().map(|f| f.as_str());
    let profile = s.federation_profile(&req.caller.0, &req.body.user_id, field).await?;
    Ok(profile.into_iter().collect::<BTreeMap<_, _>>().into_iter().collect())
}

/// `PUT /_matrix/federation/v1/send/{txnId}`: a transaction of the
/// signing server; a result per PDU.
pub async fn send_transaction(
    s: AppState,
    req: Ruma<send_transaction_message::v1::Request>,
) -> Result<send_transaction_message::v1::Response, Error> {
    let origin = req.caller.0;
    let body = req.body;
    if body.origin != origin {
        return Err(Error::forbidden(format!(
            "The transaction's origin {} is not its signer {origin}",
            body.origin
        )));
    }
    let edus = body.edus.into_iter().map(|e| e.into_json()).collect();
    let pdus = s
        .receive_transaction(&origin, body.transaction_id.as_str(), body.pdus, edus)
        .await?;
    Ok(send_transaction_message::v1::Response::new(pdus))
}
