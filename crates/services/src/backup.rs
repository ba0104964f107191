//! Server-side key backup (`/room_keys`): a user's backup versions and the
//! encrypted Megolm sessions in them. The server never sees a key: it
//! keeps each session's `KeyBackupData` verbatim and only reads the three
//! fields that decide which of two copies to keep.

use std::collections::BTreeMap;

use serde_json::Value;
use weft_core::{Error, ErrorKind, Result};
use weft_store::{BackupKey, BackupWrite};

use crate::{Services, Session};

/// A backup version as `GET /room_keys/version` shows it.
#[derive(Clone, Debug)]
pub struct BackupInfo {
    /// `{"algorithm": …, "auth_data": …}`.
    pub algorithm: Value,
    pub count: u64,
    pub etag: String,
    pub version: String,
}

/// The keys of a backup version: room → session → `KeyBackupData`.
pub type BackupKeys = BTreeMap<String, BTreeMap<String, Value>>;

fn unknown_version() -> Error {
    Error::not_found("Unknown backup version")
}

/// A version as the client names it; ours are decimal numbers, so any
/// other string names no version.
fn parse_version(v: &str) -> Option<i64> {
    v.parse::<i64>().ok().filter(|v| *v > 0)
}

/// `{"algorithm": string, "auth_data": object}`, as the client sent it.
fn algorithm_of(body: &Value) -> Result<(String, String)> {
    let algorithm = body
        .get("algorithm")
        .and_then(Value::as_str)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| Error::bad_json("`algorithm` must be a non-empty string"))?;
    let auth_data = body
        .get("auth_data")
        .filter(|a| a.is_object())
        .ok_or_else(|| Error::bad_json("`auth_data` must be an object"))?;
    let json = serde_json::json!({ "algorithm": algorithm, "auth_data": auth_data });
    Ok((algorithm.to_owned(), json.to_string()))
}

/// Reads what ranks a session's copies out of its `KeyBackupData`.
fn backup_key(room_id: &str, session_id: &str, data: &Value) -> Result<BackupKey> {
    let field = |name: &str| {
        data.get(name)
            .and_then(Value::as_i64)
            .filter(|n| *n >= 0)
            .ok_or_else(|| {
                Error::bad_json(format!(
                    "`{name}` of session {session_id} must be a non-negative integer"
                ))
            })
    };
    let first_message_index = field("first_message_index")?;
    let forwarded_count = field("forwarded_count")?;
    let is_verified = data
        .get("is_verified")
        .and_then(Value::as_bool)
        .ok_or_else(|| Error::bad_json(format!("`is_verified` of session {session_id} must be a boolean")))?;
    if !data.get("session_data").is_some_and(Value::is_object) {
        return Err(Error::bad_json(format!(
            "`session_data` of session {session_id} must be an object"
        )));
    }
    if room_id.is_empty() || session_id.is_empty() {
        return Err(Error::invalid_param("Empty room or session ID"));
    }
    crate::text::check_text("Room ID", room_id)?;
    crate::text::check_text("Session ID", session_id)?;
    Ok(BackupKey {
        room_id: room_id.to_owned(),
        session_id: session_id.to_owned(),
        first_message_index,
        forwarded_count,
        is_verified,
        key_json: data.to_string(),
    })
}

/// The answer to a keys write: the etag and count, or why not.
fn written(w: BackupWrite, version: &str) -> Result<(String, u64)> {
    match w {
        BackupWrite::Done { etag, count } => Ok((etag.to_string(), count)),
        BackupWrite::WrongVersion { current: None } => Err(unknown_version()),
        BackupWrite::WrongVersion { current: Some(c) } => Err(Error::new(
            ErrorKind::WrongRoomKeysVersion {
                current_version: Some(c.to_string()),
            },
            format!("Backup version {version} is not the current one ({c})"),
        )),
    }
}

impl Services {
    /// Creates a backup version (`POST /room_keys/version`); it becomes
    /// the current one.
    pub async fn create_backup(&self, session: &Session, algorithm: &Value) -> Result<String> {
        let (_, json) = algorithm_of(algorithm)?;
        let v = self
            .store
            .create_backup_version(session.user_id.as_str(), &json)
            .await?;
        Ok(v.to_string())
    }

    /// The version named, or the current one.
    pub async fn backup_info(&self, session: &Session, version: Option<&str>) -> Result<BackupInfo> {
        let wanted = match version {
            Some(v) => Some(parse_version(v).ok_or_else(unknown_version)?),
            None => None,
        };
        let found = self
            .store
            .backup_version(session.user_id.as_str(), wanted)
            .await?
            .ok_or_else(|| match version {
                Some(_) => unknown_version(),
                None => Error::not_found("No current backup version"),
            })?;
        let algorithm = serde_json::from_str(&found.algorithm_json).map_err(Error::internal)?;
        Ok(BackupInfo {
            algorithm,
            count: found.count,
            etag: found.etag.to_string(),
            version: found.version.to_string(),
        })
    }

    /// Replaces a version's `auth_data` (`PUT /room_keys/version/{v}`); the
    /// algorithm cannot change.
    pub async fn update_backup(&self, session: &Session, version: &str, algorithm: &Value) -> Result<()> {
        if let Some(v) = algorithm.get("version")
            && v.as_str() != Some(version)
        {
            return Err(Error::invalid_param("The version in the body differs from the path's"));
        }
        let (name, json) = algorithm_of(algorithm)?;
        let current = self.backup_info(session, Some(version)).await?;
        if current.algorithm.get("algorithm").and_then(Value::as_str) != Some(name.as_str()) {
            return Err(Error::invalid_param("The algorithm of a backup version cannot change"));
        }
        let v = parse_version(version).ok_or_else(unknown_version)?;
        if !self
            .store
            .update_backup_version(session.user_id.as_str(), v, &json)
            .await?
        {
            return Err(unknown_version());
        }
        Ok(())
    }

    /// Deletes a version and its keys.
    pub async fn delete_backup(&self, session: &Session, version: &str) -> Result<()> {
        let v = parse_version(version).ok_or_else(unknown_version)?;
        if !self.store.delete_backup_version(session.user_id.as_str(), v).await? {
            return Err(unknown_version());
        }
        Ok(())
    }

    /// Stores keys in the current version, keeping the better copy of each
    /// session; answers the version's new etag and key count.
    pub async fn put_backup_keys(&self, session: &Session, version: &str, keys: &BackupKeys) -> Result<(String, u64)> {
        let mut rows = Vec::new();
        for (room, sessions) in keys {
            for (sid, data) in sessions {
                rows.push(backup_key(room, sid, data)?);
            }
        }
        let user = session.user_id.as_str();
        let Some(v) = parse_version(version) else {
            let current = self.store.backup_version(user, None).await?;
            return written(
                BackupWrite::WrongVersion {
                    current: current.map(|c| c.version),
                },
                version,
            );
        };
        written(self.store.put_backup_keys(user, v, rows).await?, version)
    }

    /// The keys of a version: all, one room's, or one session's (`404`
    /// if that session is not backed up).
    pub async fn backup_keys(
        &self,
        session: &Session,
        version: &str,
        room_id: Option<&str>,
        session_id: Option<&str>,
    ) -> Result<BackupKeys> {
        let user = session.user_id.as_str();
        let v = parse_version(version).ok_or_else(unknown_version)?;
        if self.store.backup_version(user, Some(v)).await?.is_none() {
            return Err(unknown_version());
        }
        let mut out = BackupKeys::new();
        for k in self.store.backup_keys(user, v, room_id, session_id).await? {
            let data = serde_json::from_str(&k.key_json).map_err(Error::internal)?;
            out.entry(k.room_id).or_default().insert(k.session_id, data);
        }
        if session_id.is_some() && out.is_empty() {
            return Err(Error::not_found("No key backed up for this session"));
        }
        Ok(out)
    }

    /// Deletes keys of the current version: all, one room's or one
    /// session's.
    pub async fn delete_backup_keys(
        &self,
        session: &Session,
        version: &str,
        room_id: Option<&str>,
        session_id: Option<&str>,
    ) -> Result<(String, u64)> {
        let user = session.user_id.as_str();
        let Some(v) = parse_version(version) else {
            return Err(unknown_version());
        };
        written(
            self.store.delete_backup_keys(user, v, room_id, session_id).await?,
            version,
        )
    }
}
