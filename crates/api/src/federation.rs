//! The Server-Server API endpoints (declared in `federation_routes`):
//! version, our keys, the notary key queries, the profile query,
//! transactions (`/send`), device lists and keys of local users, aliases,
//! the room directory and OpenID tokens. Each only translates between
//! ruma's types and the services.

use std::collections::BTreeMap;

use ruma::MilliSecondsSinceUnixEpoch;
use ruma::api::federation::device::get_devices;
use ruma::api::federation::directory::{get_public_rooms, get_public_rooms_filtered};
use ruma::api::federation::discovery::{
    get_remote_server_keys, get_remote_server_keys_batch, get_server_keys, get_server_version,
};
use ruma::api::federation::keys::{claim_keys, get_keys};
use ruma::api::federation::openid::get_openid_userinfo;
use ruma::api::federation::query::{get_profile_information, get_room_information};
use ruma::api::federation::transactions::send_transaction_message;
use weft_core::Error;
use weft_services::federation_e2ee::PublicRoomsPage;

use crate::AppState;
use crate::endpoint::{Full, Ruma, convert, raw};
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

/// `GET /_matrix/federation/v1/user/devices/{userId}`: a local user's
/// devices with keys, the list's stream ID, and cross-signing keys.
pub async fn user_devices(s: AppState, req: Ruma<get_devices::v1::Request>) -> Result<Full<serde_json::Value>, Error> {
    Ok(Full(s.federation_user_devices(&req.caller.0, &req.body.user_id).await?))
}

/// `POST /_matrix/federation/v1/user/keys/query`: local users' keys.
pub async fn user_keys_query(s: AppState, req: Ruma<get_keys::v1::Request>) -> Result<Full<serde_json::Value>, Error> {
    let wanted = req
        .body
        .device_keys
        .into_iter()
        .map(|(user, devices)| (user, devices.into_iter().map(|d| d.to_string()).collect()))
        .collect();
    Ok(Full(s.federation_query_keys(&req.caller.0, wanted).await?))
}

/// `POST /_matrix/federation/v1/user/keys/claim`: local users' one-time keys.
pub async fn user_keys_claim(
    s: AppState,
    req: Ruma<claim_keys::v1::Request>,
) -> Result<Full<serde_json::Value>, Error> {
    let wanted = convert(&req.body.one_time_keys)?;
    Ok(Full(s.federation_claim_keys(&req.caller.0, wanted).await?))
}

/// `GET /_matrix/federation/v1/query/directory`: a local alias's room.
pub async fn query_directory(
    s: AppState,
    req: Ruma<get_room_information::v1::Request>,
) -> Result<get_room_information::v1::Response, Error> {
    let (room_id, servers) = s
        .federation_query_directory(&req.caller.0, &req.body.room_alias)
        .await?;
    Ok(get_room_information::v1::Response::new(room_id, servers))
}

fn page_response(page: PublicRoomsPage) -> get_public_rooms::v1::Response {
    let mut response = get_public_rooms::v1::Response::new();
    response.chunk = page.chunk;
    response.next_batch = page.next_batch;
    response.prev_batch = page.prev_batch;
    response.total_room_count_estimate = Some(ruma::UInt::new_saturating(page.total));
    response
}

/// `GET /_matrix/federation/v1/publicRooms`: the local room directory.
pub async fn public_rooms(
    s: AppState,
    req: Ruma<get_public_rooms::v1::Request>,
) -> Result<get_public_rooms::v1::Response, Error> {
    let page = s
        .public_rooms_page(req.body.limit.map(u64::from), req.body.since.as_deref(), None)
        .await?;
    Ok(page_response(page))
}

/// `POST /_matrix/federation/v1/publicRooms`: the local room directory,
/// filtered by a search term.
pub async fn public_rooms_filtered(
    s: AppState,
    req: Ruma<get_public_rooms_filtered::v1::Request>,
) -> Result<get_public_rooms::v1::Response, Error> {
    let b = req.body;
    let page = s
        .public_rooms_page(
            b.limit.map(u64::from),
            b.since.as_deref(),
            b.filter.generic_search_term.as_deref(),
        )
        .await?;
    Ok(page_response(page))
}

/// `GET /_matrix/federation/v1/openid/userinfo`: whose OpenID token this is.
pub async fn openid_userinfo(
    s: AppState,
    req: Ruma<get_openid_userinfo::v1::Request>,
) -> Result<get_openid_userinfo::v1::Response, Error> {
    Ok(get_openid_userinfo::v1::Response::new(
        s.openid_userinfo(&req.body.access_token).await?,
    ))
}
