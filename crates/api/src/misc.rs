//! Discovery, filters, account data, and the ephemeral endpoints: typing,
//! presence, receipts and read markers.

use ruma::api::auth_scheme::NoAuthentication;
use ruma::api::client::config::{
    get_global_account_data, get_room_account_data, set_global_account_data, set_room_account_data,
};
use ruma::api::client::discovery::discover_homeserver::{self, HomeserverInfo};
#[allow(deprecated)] // m.set_displayname and m.set_avatar_url: clients still read them
use ruma::api::client::discovery::get_capabilities::v3::{
    ChangePasswordCapability, GetLoginTokenCapability, ProfileFieldsCapability, RoomVersionStability,
    RoomVersionsCapability, SetAvatarUrlCapability, SetDisplayNameCapability, ThirdPartyIdChangesCapability,
};
use ruma::api::client::discovery::{get_capabilities, get_supported_versions};
use ruma::api::client::filter::{create_filter, get_filter};
use ruma::api::client::presence::{get_presence, set_presence};
use ruma::api::client::read_marker::set_read_marker;
use ruma::api::client::receipt::create_receipt;
use ruma::api::client::typing::create_typing_event::{self, v3::Typing};
use ruma::events::receipt::ReceiptThread;
use ruma::presence::PresenceState;
use ruma::profile::ProfileFieldName;
use weft_core::Error;
use weft_services::Versions;

use crate::AppState;
use crate::endpoint::{Full, Ruma, WithAuth, bad_json, raw};

/// `GET /_matrix/client/versions`, callable without any authentication
/// (ruma's takes an optional access token, so an unknown one would be
/// refused). The answer is [`Full`]: ruma's response has no place for
/// MSC3079's top-level keys and leaves out empty `unstable_features`.
pub async fn versions(
    s: AppState,
    _: Ruma<WithAuth<NoAuthentication, get_supported_versions::Request>>,
) -> Result<Full<Versions>, Error> {
    Ok(Full(s.versions()))
}

pub async fn well_known(
    s: AppState,
    _: Ruma<discover_homeserver::Request>,
) -> Result<discover_homeserver::Response, Error> {
    Ok(discover_homeserver::Response::new(HomeserverInfo::new(
        s.config.base_url(),
    )))
}

/// The capabilities Weft states, each one even where it has the spec's
/// default value: ruma's `Capabilities` leaves those out, and clients
/// (and the tests) read `m.change_password` and the others explicitly.
#[derive(serde::Serialize)]
pub struct CapabilitiesBody {
    capabilities: StatedCapabilities,
}

#[allow(deprecated)]
#[derive(serde::Serialize)]
struct StatedCapabilities {
    #[serde(rename = "m.change_password")]
    change_password: ChangePasswordCapability,
    #[serde(rename = "m.room_versions")]
    room_versions: RoomVersionsCapability,
    #[serde(rename = "m.set_displayname")]
    set_displayname: SetDisplayNameCapability,
    #[serde(rename = "m.set_avatar_url")]
    set_avatar_url: SetAvatarUrlCapability,
    #[serde(rename = "m.3pid_changes")]
    thirdparty_id_changes: ThirdPartyIdChangesCapability,
    /// Off: `POST /login/get_token` (QR sign-in of a new device) is not
    /// served, so its route is unknown (`404 M_UNRECOGNIZED`).
    #[serde(rename = "m.get_login_token")]
    get_login_token: GetLoginTokenCapability,
    /// Only `displayname` and `avatar_url` can be set.
    #[serde(rename = "m.profile_fields")]
    profile_fields: ProfileFieldsCapability,
}

#[allow(deprecated)]
pub async fn capabilities(
    s: AppState,
    _: Ruma<get_capabilities::v3::Request>,
) -> Result<Full<CapabilitiesBody>, Error> {
    let (default, supported) = s.room_versions();
    let available = supported
        .into_iter()
        .map(|v| (v, RoomVersionStability::Stable))
        .collect();
    Ok(Full(CapabilitiesBody {
        capabilities: StatedCapabilities {
            change_password: ChangePasswordCapability::new(true),
            room_versions: RoomVersionsCapability::new(default, available),
            set_displayname: SetDisplayNameCapability::new(true),
            set_avatar_url: SetAvatarUrlCapability::new(true),
            thirdparty_id_changes: ThirdPartyIdChangesCapability::new(false),
            get_login_token: GetLoginTokenCapability::new(false),
            profile_fields: profile_fields(),
        },
    }))
}

fn profile_fields() -> ProfileFieldsCapability {
    let mut c = ProfileFieldsCapability::new(true);
    c.allowed = Some(vec![ProfileFieldName::DisplayName, ProfileFieldName::AvatarUrl]);
    c
}

/// Typing and presence: checked, accepted, not yet relayed.
/// Typing: started for `timeout` (capped) or stopped; relayed to the
/// room's members through the stream.
pub async fn typing(
    s: AppState,
    req: Ruma<create_typing_event::v3::Request>,
) -> Result<create_typing_event::v3::Response, Error> {
    let b = &req.body;
    let timeout = match b.state {
        Typing::Yes(info) => Some(u64::try_from(info.timeout.as_millis()).unwrap_or(u64::MAX)),
        Typing::No => None,
    };
    s.set_typing(&req.caller, b.room_id.as_str(), b.user_id.as_str(), timeout)
        .await?;
    Ok(create_typing_event::v3::Response::new())
}

pub async fn presence(s: AppState, req: Ruma<set_presence::v3::Request>) -> Result<set_presence::v3::Response, Error> {
    let b = req.body;
    s.set_presence(&req.caller, b.user_id.as_str(), b.presence.as_str(), b.status_msg)
        .await?;
    Ok(set_presence::v3::Response::new())
}

pub async fn get_presence(
    s: AppState,
    req: Ruma<get_presence::v3::Request>,
) -> Result<get_presence::v3::Response, Error> {
    let v = s.get_presence(&req.caller, req.body.user_id.as_str()).await?;
    let mut resp = get_presence::v3::Response::new(PresenceState::from(v.presence.as_str()));
    resp.status_msg = v.status_msg;
    resp.currently_active = v.currently_active;
    resp.last_active_ago = v.last_active_ago.map(std::time::Duration::from_millis);
    Ok(resp)
}

/// A receipt (`m.read`, `m.read.private`, optionally threaded) or the
/// read marker (`m.fully_read`): stored, sent to the room in `/sync`.
pub async fn receipt(
    s: AppState,
    req: Ruma<create_receipt::v3::Request>,
) -> Result<create_receipt::v3::Response, Error> {
    let b = &req.body;
    let thread = match &b.thread {
        ReceiptThread::Unthreaded => None,
        ReceiptThread::Main => Some("main"),
        ReceiptThread::Thread(root) => Some(root.as_str()),
        _ => return Err(Error::invalid_param("Unknown thread_id")),
    };
    s.set_receipt(
        &req.caller,
        b.room_id.as_str(),
        b.receipt_type.as_str(),
        b.event_id.as_str(),
        thread,
    )
    .await?;
    Ok(create_receipt::v3::Response::new())
}

/// The read marker (room account data `m.fully_read`) and unthreaded
/// receipts in one request.
pub async fn read_markers(
    s: AppState,
    req: Ruma<set_read_marker::v3::Request>,
) -> Result<set_read_marker::v3::Response, Error> {
    let b = &req.body;
    s.set_read_markers(
        &req.caller,
        b.room_id.as_str(),
        b.fully_read.as_deref().map(|e| e.as_str()),
        b.read_receipt.as_deref().map(|e| e.as_str()),
        b.private_read_receipt.as_deref().map(|e| e.as_str()),
    )
    .await?;
    Ok(set_read_marker::v3::Response::new())
}

/// A sync filter, stored as ruma reads it (fields the spec does not
/// define are dropped).
pub async fn put_filter(
    s: AppState,
    req: Ruma<create_filter::v3::Request>,
) -> Result<create_filter::v3::Response, Error> {
    let b = req.body;
    let filter = serde_json::to_value(&b.filter).map_err(Error::internal)?;
    let id = s.put_filter(&req.caller, b.user_id.as_str(), filter).await?;
    Ok(create_filter::v3::Response::new(id))
}

pub async fn get_filter(s: AppState, req: Ruma<get_filter::v3::Request>) -> Result<get_filter::v3::Response, Error> {
    let b = &req.body;
    let filter = s.get_filter(&req.caller, b.user_id.as_str(), &b.filter_id).await?;
    // A filter stored before filters were read as the spec defines them
    // may not be one: the client uploads it again, as after any 404.
    let filter = serde_json::from_value(filter).map_err(|e| {
        tracing::warn!("stored filter {} is not a filter definition: {e}", b.filter_id);
        Error::not_found("Filter not found")
    })?;
    Ok(get_filter::v3::Response::new(filter))
}

pub async fn put_account_data(
    s: AppState,
    req: Ruma<set_global_account_data::v3::Request>,
) -> Result<set_global_account_data::v3::Response, Error> {
    let b = req.body;
    let content = serde_json::from_str(b.data.json().get()).map_err(bad_json)?;
    s.put_account_data(
        &req.caller,
        b.user_id.as_str(),
        None,
        &b.event_type.to_string(),
        content,
    )
    .await?;
    Ok(set_global_account_data::v3::Response::new())
}

pub async fn get_account_data(
    s: AppState,
    req: Ruma<get_global_account_data::v3::Request>,
) -> Result<get_global_account_data::v3::Response, Error> {
    let b = &req.body;
    let content = s
        .account_data(&req.caller, b.user_id.as_str(), None, &b.event_type.to_string())
        .await?;
    Ok(get_global_account_data::v3::Response::new(raw(content)?))
}

pub async fn put_room_account_data(
    s: AppState,
    req: Ruma<set_room_account_data::v3::Request>,
) -> Result<set_room_account_data::v3::Response, Error> {
    let b = req.body;
    let content = serde_json::from_str(b.data.json().get()).map_err(bad_json)?;
    s.put_account_data(
        &req.caller,
        b.user_id.as_str(),
        Some(b.room_id.as_str()),
        &b.event_type.to_string(),
        content,
    )
    .await?;
    Ok(set_room_account_data::v3::Response::new())
}

pub async fn get_room_account_data(
    s: AppState,
    req: Ruma<get_room_account_data::v3::Request>,
) -> Result<get_room_account_data::v3::Response, Error> {
    let b = &req.body;
    let content = s
        .account_data(
            &req.caller,
            b.user_id.as_str(),
            Some(b.room_id.as_str()),
            &b.event_type.to_string(),
        )
        .await?;
    Ok(get_room_account_data::v3::Response::new(raw(content)?))
}

/// `POST /appservice/{appserviceId}/ping`: the service asks the server to
/// ping it (`/_matrix/app/v1/ping`), to check that both can reach each
/// other.
pub async fn appservice_ping(
    s: AppState,
    req: Ruma<ruma::api::client::appservice::request_ping::v1::Request>,
) -> Result<ruma::api::client::appservice::request_ping::v1::Response, Error> {
    let b = &req.body;
    let took = s
        .ping_appservice(
            &req.caller,
            &b.appservice_id,
            b.transaction_id.as_ref().map(|t| t.as_str()),
        )
        .await?;
    Ok(ruma::api::client::appservice::request_ping::v1::Response::new(took))
}
