//! Server-side key backup: `/room_keys/version` and `/room_keys/keys` at
//! all three levels (every key, a room's, a session's).

use std::collections::BTreeMap;

use ruma::UInt;
use ruma::api::client::backup::{
    RoomKeyBackup, add_backup_keys, add_backup_keys_for_room, add_backup_keys_for_session, create_backup_version,
    delete_backup_keys, delete_backup_keys_for_room, delete_backup_keys_for_session, delete_backup_version,
    get_backup_info, get_backup_keys, get_backup_keys_for_room, get_backup_keys_for_session, get_latest_backup_info,
    update_backup_version,
};
use ruma::serde::Raw;
use serde_json::Value;
use weft_core::Error;
use weft_services::backup::{BackupInfo, BackupKeys};

use crate::AppState;
use crate::endpoint::{Ruma, bad_json, convert, raw};

fn value_of<T>(r: &Raw<T>) -> Result<Value, Error> {
    serde_json::from_str(r.json().get()).map_err(bad_json)
}

fn count(n: u64) -> UInt {
    UInt::try_from(n).unwrap_or(UInt::MAX)
}

fn sessions_of(
    s: &BTreeMap<String, Raw<ruma::api::client::backup::KeyBackupData>>,
) -> Result<BTreeMap<String, Value>, Error> {
    s.iter().map(|(k, v)| Ok((k.clone(), value_of(v)?))).collect()
}

pub async fn create_version(
    s: AppState,
    req: Ruma<create_backup_version::v3::Request>,
) -> Result<create_backup_version::v3::Response, Error> {
    let version = s.create_backup(&req.caller, &value_of(&req.body.algorithm)?).await?;
    Ok(create_backup_version::v3::Response::new(version))
}

fn info_parts(i: BackupInfo) -> Result<(Raw<ruma::api::client::backup::BackupAlgorithm>, UInt, String, String), Error> {
    Ok((raw(i.algorithm)?, count(i.count), i.etag, i.version))
}

pub async fn latest_version(
    s: AppState,
    req: Ruma<get_latest_backup_info::v3::Request>,
) -> Result<get_latest_backup_info::v3::Response, Error> {
    let (algorithm, count, etag, version) = info_parts(s.backup_info(&req.caller, None).await?)?;
    Ok(get_latest_backup_info::v3::Response::new(
        algorithm, count, etag, version,
    ))
}

pub async fn get_version(
    s: AppState,
    req: Ruma<get_backup_info::v3::Request>,
) -> Result<get_backup_info::v3::Response, Error> {
    let (algorithm, count, etag, version) = info_parts(s.backup_info(&req.caller, Some(&req.body.version)).await?)?;
    Ok(get_backup_info::v3::Response::new(algorithm, count, etag, version))
}

pub async fn update_version(
    s: AppState,
    req: Ruma<update_backup_version::v3::Request>,
) -> Result<update_backup_version::v3::Response, Error> {
    s.update_backup(&req.caller, &req.body.version, &value_of(&req.body.algorithm)?)
        .await?;
    Ok(update_backup_version::v3::Response::new())
}

pub async fn delete_version(
    s: AppState,
    req: Ruma<delete_backup_version::v3::Request>,
) -> Result<delete_backup_version::v3::Response, Error> {
    s.delete_backup(&req.caller, &req.body.version).await?;
    Ok(delete_backup_version::v3::Response::new())
}

pub async fn put_keys(
    s: AppState,
    req: Ruma<add_backup_keys::v3::Request>,
) -> Result<add_backup_keys::v3::Response, Error> {
    let mut keys = BackupKeys::new();
    for (room, backup) in &req.body.rooms {
        keys.insert(room.to_string(), sessions_of(&backup.sessions)?);
    }
    let (etag, n) = s.put_backup_keys(&req.caller, &req.body.version, &keys).await?;
    Ok(add_backup_keys::v3::Response::new(etag, count(n)))
}

pub async fn put_room_keys(
    s: AppState,
    req: Ruma<add_backup_keys_for_room::v3::Request>,
) -> Result<add_backup_keys_for_room::v3::Response, Error> {
    let keys = BackupKeys::from([(req.body.room_id.to_string(), sessions_of(&req.body.sessions)?)]);
    let (etag, n) = s.put_backup_keys(&req.caller, &req.body.version, &keys).await?;
    Ok(add_backup_keys_for_room::v3::Response::new(etag, count(n)))
}

pub async fn put_session_key(
    s: AppState,
    req: Ruma<add_backup_keys_for_session::v3::Request>,
) -> Result<add_backup_keys_for_session::v3::Response, Error> {
    let b = req.body;
    let keys = BackupKeys::from([(
        b.room_id.to_string(),
        BTreeMap::from([(b.session_id, value_of(&b.session_data)?)]),
    )]);
    let (etag, n) = s.put_backup_keys(&req.caller, &b.version, &keys).await?;
    Ok(add_backup_keys_for_session::v3::Response::new(etag, count(n)))
}

pub async fn get_keys(
    s: AppState,
    req: Ruma<get_backup_keys::v3::Request>,
) -> Result<get_backup_keys::v3::Response, Error> {
    let keys = s.backup_keys(&req.caller, &req.body.version, None, None).await?;
    let rooms: BTreeMap<String, Value> = keys
        .into_iter()
        .map(|(room, sessions)| (room, serde_json::json!({ "sessions": sessions })))
        .collect();
    let rooms: BTreeMap<ruma::OwnedRoomId, RoomKeyBackup> = convert(&rooms)?;
    Ok(get_backup_keys::v3::Response::new(rooms))
}

pub async fn get_room_keys(
    s: AppState,
    req: Ruma<get_backup_keys_for_room::v3::Request>,
) -> Result<get_backup_keys_for_room::v3::Response, Error> {
    let room = req.body.room_id.as_str();
    let mut keys = s.backup_keys(&req.caller, &req.body.version, Some(room), None).await?;
    let sessions = keys.remove(room).unwrap_or_default();
    Ok(get_backup_keys_for_room::v3::Response::new(convert(&sessions)?))
}

pub async fn get_session_key(
    s: AppState,
    req: Ruma<get_backup_keys_for_session::v3::Request>,
) -> Result<get_backup_keys_for_session::v3::Response, Error> {
    let b = req.body;
    let mut keys = s
        .backup_keys(&req.caller, &b.version, Some(b.room_id.as_str()), Some(&b.session_id))
        .await?;
    let data = keys
        .remove(b.room_id.as_str())
        .and_then(|mut s| s.remove(&b.session_id))
        .ok_or_else(|| Error::not_found("No key backed up for this session"))?;
    Ok(get_backup_keys_for_session::v3::Response::new(raw(data)?))
}

pub async fn delete_keys(
    s: AppState,
    req: Ruma<delete_backup_keys::v3::Request>,
) -> Result<delete_backup_keys::v3::Response, Error> {
    let (etag, n) = s.delete_backup_keys(&req.caller, &req.body.version, None, None).await?;
    Ok(delete_backup_keys::v3::Response::new(etag, count(n)))
}

pub async fn delete_room_keys(
    s: AppState,
    req: Ruma<delete_backup_keys_for_room::v3::Request>,
) -> Result<delete_backup_keys_for_room::v3::Response, Error> {
    let b = req.body;
    let (etag, n) = s
        .delete_backup_keys(&req.caller, &b.version, Some(b.room_id.as_str()), None)
        .await?;
    Ok(delete_backup_keys_for_room::v3::Response::new(etag, count(n)))
}

pub async fn delete_session_key(
    s: AppState,
    req: Ruma<delete_backup_keys_for_session::v3::Request>,
) -> Result<delete_backup_keys_for_session::v3::Response, Error> {
    let b = req.body;
    let (etag, n) = s
        .delete_backup_keys(&req.caller, &b.version, Some(b.room_id.as_str()), Some(&b.session_id))
        .await?;
    Ok(delete_backup_keys_for_session::v3::Response::new(etag, count(n)))
}
