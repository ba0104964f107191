//! Federation endpoints of rooms: reading events, state and history, and
//! the membership handshakes (declared in `federation_routes`). Each only
//! translates between ruma's types and the services.

use ruma::api::federation::authorization::get_event_authorization;
use ruma::api::federation::backfill::get_backfill;
use ruma::api::federation::event::{get_event, get_missing_events, get_room_state, get_room_state_ids};
use ruma::api::federation::membership::{
    create_join_event, create_leave_event, prepare_join_event, prepare_leave_event,
};
use ruma::{MilliSecondsSinceUnixEpoch, UInt};
use weft_core::Error;

use crate::AppState;
use crate::endpoint::Ruma;

fn limit(n: UInt) -> usize {
    usize::try_from(u64::from(n)).unwrap_or(usize::MAX)
}

/// `GET /_matrix/federation/v1/event/{eventId}`.
pub async fn event(s: AppState, req: Ruma<get_event::v1::Request>) -> Result<get_event::v1::Response, Error> {
    let pdu = s.federation_event(&req.caller.0, &req.body.event_id).await?;
    Ok(get_event::v1::Response::new(
        s.server_name.clone(),
        MilliSecondsSinceUnixEpoch::now(),
        pdu,
    ))
}

/// `GET /_matrix/federation/v1/state/{roomId}`.
pub async fn state(s: AppState, req: Ruma<get_room_state::v1::Request>) -> Result<get_room_state::v1::Response, Error> {
    let (pdus, chain) = s
        .federation_state(&req.caller.0, &req.body.room_id, &req.body.event_id)
        .await?;
    Ok(get_room_state::v1::Response::new(chain, pdus))
}

/// `GET /_matrix/federation/v1/state_ids/{roomId}`.
pub async fn state_ids(
    s: AppState,
    req: Ruma<get_room_state_ids::v1::Request>,
) -> Result<get_room_state_ids::v1::Response, Error> {
    let (ids, chain) = s
        .federation_state_ids(&req.caller.0, &req.body.room_id, &req.body.event_id)
        .await?;
    Ok(get_room_state_ids::v1::Response::new(chain, ids))
}

/// `GET /_matrix/federation/v1/event_auth/{roomId}/{eventId}`.
pub async fn event_auth(
    s: AppState,
    req: Ruma<get_event_authorization::v1::Request>,
) -> Result<get_event_authorization::v1::Response, Error> {
    let chain = s
        .federation_event_auth(&req.caller.0, &req.body.room_id, &req.body.event_id)
        .await?;
    Ok(get_event_authorization::v1::Response::new(chain))
}

/// `GET /_matrix/federation/v1/backfill/{roomId}`.
pub async fn backfill(s: AppState, req: Ruma<get_backfill::v1::Request>) -> Result<get_backfill::v1::Response, Error> {
    let pdus = s
        .federation_backfill(&req.caller.0, &req.body.room_id, &req.body.v, limit(req.body.limit))
        .await?;
    Ok(get_backfill::v1::Response::new(
        s.server_name.clone(),
        MilliSecondsSinceUnixEpoch::now(),
        pdus,
    ))
}

/// `POST /_matrix/federation/v1/get_missing_events/{roomId}`.
pub async fn missing_events(
    s: AppState,
    req: Ruma<get_missing_events::v1::Request>,
) -> Result<get_missing_events::v1::Response, Error> {
    let b = &req.body;
    let events = s
        .federation_missing_events(
            &req.caller.0,
            &b.room_id,
            &b.earliest_events,
            &b.latest_events,
            limit(b.limit),
            i64::try_from(u64::from(b.min_depth)).unwrap_or(i64::MAX),
        )
        .await?;
    Ok(get_missing_events::v1::Response::new(events))
}

/// `GET /_matrix/federation/v1/make_join/{roomId}/{userId}`.
pub async fn make_join(
    s: AppState,
    req: Ruma<prepare_join_event::v1::Request>,
) -> Result<prepare_join_event::v1::Response, Error> {
    let (version, event) = s
        .federation_make_membership(
            &req.caller.0,
            &req.body.room_id,
            &req.body.user_id,
            "join",
            Some(&req.body.ver),
        )
        .await?;
    let mut response = prepare_join_event::v1::Response::new(event);
    response.room_version = Some(version);
    Ok(response)
}

/// `PUT /_matrix/federation/v2/send_join/{roomId}/{eventId}`.
pub async fn send_join(
    s: AppState,
    req: Ruma<create_join_event::v2::Request>,
) -> Result<create_join_event::v2::Response, Error> {
    let answer = s
        .federation_send_membership(
            &req.caller.0,
            &req.body.room_id,
            &req.body.event_id,
            &req.body.pdu,
            "join",
        )
        .await?
        .ok_or_else(|| Error::internal("no join answer"))?;
    let mut state = create_join_event::v2::RoomState::new();
    state.state = answer.state;
    state.auth_chain = answer.auth_chain;
    state.servers_in_room = Some(answer.servers_in_room);
    Ok(create_join_event::v2::Response::new(state))
}

/// `GET /_matrix/federation/v1/make_leave/{roomId}/{userId}`.
pub async fn make_leave(
    s: AppState,
    req: Ruma<prepare_leave_event::v1::Request>,
) -> Result<prepare_leave_event::v1::Response, Error> {
    let (version, event) = s
        .federation_make_membership(&req.caller.0, &req.body.room_id, &req.body.user_id, "leave", None)
        .await?;
    Ok(prepare_leave_event::v1::Response::new(Some(version), event))
}

/// `PUT /_matrix/federation/v2/send_leave/{roomId}/{eventId}`.
pub async fn send_leave(
    s: AppState,
    req: Ruma<create_leave_event::v2::Request>,
) -> Result<create_leave_event::v2::Response, Error> {
    s.federation_send_membership(
        &req.caller.0,
        &req.body.room_id,
        &req.body.event_id,
        &req.body.pdu,
        "leave",
    )
    .await?;
    Ok(create_leave_event::v2::Response::new())
}

/// `PUT /_matrix/federation/v2/invite/{roomId}/{eventId}`.
pub async fn invite(
    s: AppState,
    req: Ruma<ruma::api::federation::membership::create_invite::v2::Request>,
) -> Result<ruma::api::federation::membership::create_invite::v2::Response, Error> {
    let b = &req.body;
    let event = s
        .federation_invite(
            &req.caller.0,
            &b.room_id,
            &b.event_id,
            &b.room_version,
            &b.event,
            &b.invite_room_state,
        )
        .await?;
    Ok(ruma::api::federation::membership::create_invite::v2::Response::new(
        event,
    ))
}
