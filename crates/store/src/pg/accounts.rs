//! PostgreSQL: accounts.

use super::*;

pub(super) async fn create_user(s: &PgStore, user: NewUser) -> Result<()> {
    s.write_wait(move |c, _| {
        let n = c
            .execute(
                "INSERT INTO users (user_id, password_hash, admin, created_ms) VALUES ($1,$2,$3,$4) \
                 ON CONFLICT (user_id) DO NOTHING",
                &[
                    &user.user_id,
                    &user.password_hash,
                    &(user.admin as i64),
                    &(user.created_ms as i64),
                ],
            )
            .map_err(db_err)?;
        if n == 0 {
            return Err(Error::new(ErrorKind::UserInUse, "User ID already taken."));
        }
        Ok(())
    })
    .await
}

pub(super) async fn get_user(s: &PgStore, user_id: &str) -> Result<Option<UserRecord>> {
    let user_id = user_id.to_owned();
    s.read(move |c| {
        Ok(c.query_opt(
            &format!("SELECT {USER_COLS} FROM users WHERE user_id = $1"),
            &[&user_id],
        )?
        .map(|r| user_row(&r)))
    })
    .await
}

const USER_COLS: &str = "user_id, password_hash, admin, deactivated, displayname, avatar_url, created_ms";

/// A user from the columns of [`USER_COLS`] (flags are BIGINT 0/1).
fn user_row(r: &Row) -> UserRecord {
    UserRecord {
        user_id: r.get(0),
        password_hash: r.get(1),
        admin: r.get::<_, i64>(2) != 0,
        deactivated: r.get::<_, i64>(3) != 0,
        displayname: r.get(4),
        avatar_url: r.get(5),
        created_ms: r.get::<_, i64>(6).max(0) as u64,
    }
}

pub(super) async fn list_users(s: &PgStore) -> Result<Vec<UserRecord>> {
    let _ = s;
    Err(not_yet("list_users"))
}

pub(super) async fn set_password_hash(s: &PgStore, user_id: &str, hash: &str) -> Result<()> {
    let _ = (s, user_id, hash);
    Err(not_yet("set_password_hash"))
}

pub(super) async fn deactivate_user(s: &PgStore, user_id: &str) -> Result<()> {
    let _ = (s, user_id);
    Err(not_yet("deactivate_user"))
}

pub(super) async fn set_profile_field(
    s: &PgStore,
    user_id: &str,
    field: ProfileField,
    value: Option<String>,
) -> Result<()> {
    let _ = (s, user_id, field, value);
    Err(not_yet("set_profile_field"))
}

pub(super) async fn upsert_device(
    s: &PgStore,
    user_id: &str,
    device_id: &str,
    display_name: Option<&str>,
    token_hash: &[u8],
) -> Result<()> {
    let _ = (s, user_id, device_id, display_name, token_hash);
    Err(not_yet("upsert_device"))
}

pub(super) async fn lookup_token(s: &PgStore, token_hash: &[u8]) -> Result<Option<TokenOwner>> {
    let _ = (s, token_hash);
    Err(not_yet("lookup_token"))
}

pub(super) async fn list_devices(s: &PgStore, user_id: &str) -> Result<Vec<DeviceRecord>> {
    let _ = (s, user_id);
    Err(not_yet("list_devices"))
}

pub(super) async fn touch_device(
    s: &PgStore,
    user_id: &str,
    device_id: &str,
    ip: Option<&str>,
    ts_ms: u64,
) -> Result<()> {
    let _ = (s, user_id, device_id, ip, ts_ms);
    Err(not_yet("touch_device"))
}

pub(super) async fn set_device_display_name(
    s: &PgStore,
    user_id: &str,
    device_id: &str,
    display_name: Option<&str>,
) -> Result<bool> {
    let _ = (s, user_id, device_id, display_name);
    Err(not_yet("set_device_display_name"))
}

pub(super) async fn delete_device(s: &PgStore, user_id: &str, device_id: &str) -> Result<()> {
    let _ = (s, user_id, device_id);
    Err(not_yet("delete_device"))
}

pub(super) async fn delete_devices_except(s: &PgStore, user_id: &str, keep: Option<&str>) -> Result<()> {
    let _ = (s, user_id, keep);
    Err(not_yet("delete_devices_except"))
}

pub(super) async fn set_device_psk(
    s: &PgStore,
    user_id: &str,
    device_id: &str,
    identity: &str,
    psk: &[u8],
) -> Result<()> {
    let _ = (s, user_id, device_id, identity, psk);
    Err(not_yet("set_device_psk"))
}

pub(super) async fn lookup_psk(s: &PgStore, identity: &str) -> Result<Option<PskOwner>> {
    let _ = (s, identity);
    Err(not_yet("lookup_psk"))
}

pub(super) async fn create_backup_version(s: &PgStore, user_id: &str, algorithm_json: &str) -> Result<i64> {
    let _ = (s, user_id, algorithm_json);
    Err(not_yet("create_backup_version"))
}

pub(super) async fn backup_version(s: &PgStore, user_id: &str, version: Option<i64>) -> Result<Option<BackupVersion>> {
    let _ = (s, user_id, version);
    Err(not_yet("backup_version"))
}

pub(super) async fn update_backup_version(
    s: &PgStore,
    user_id: &str,
    version: i64,
    algorithm_json: &str,
) -> Result<bool> {
    let _ = (s, user_id, version, algorithm_json);
    Err(not_yet("update_backup_version"))
}

pub(super) async fn delete_backup_version(s: &PgStore, user_id: &str, version: i64) -> Result<bool> {
    let _ = (s, user_id, version);
    Err(not_yet("delete_backup_version"))
}

pub(super) async fn put_backup_keys(
    s: &PgStore,
    user_id: &str,
    version: i64,
    keys: Vec<BackupKey>,
) -> Result<BackupWrite> {
    let _ = (s, user_id, version, keys);
    Err(not_yet("put_backup_keys"))
}

pub(super) async fn backup_keys(
    s: &PgStore,
    user_id: &str,
    version: i64,
    room_id: Option<&str>,
    session_id: Option<&str>,
) -> Result<Vec<BackupKey>> {
    let _ = (s, user_id, version, room_id, session_id);
    Err(not_yet("backup_keys"))
}

pub(super) async fn delete_backup_keys(
    s: &PgStore,
    user_id: &str,
    version: i64,
    room_id: Option<&str>,
    session_id: Option<&str>,
) -> Result<BackupWrite> {
    let _ = (s, user_id, version, room_id, session_id);
    Err(not_yet("delete_backup_keys"))
}

pub(super) async fn upload_keys(
    s: &PgStore,
    user_id: &str,
    device_id: &str,
    upload: KeyUpload,
) -> Result<std::collections::BTreeMap<String, u64>> {
    let _ = (s, user_id, device_id, upload);
    Err(not_yet("upload_keys"))
}

pub(super) async fn get_device_keys(
    s: &PgStore,
    user_id: &str,
    device_ids: &[String],
) -> Result<Vec<DeviceKeysRecord>> {
    let _ = (s, user_id, device_ids);
    Err(not_yet("get_device_keys"))
}

pub(super) async fn one_time_key_counts(
    s: &PgStore,
    user_id: &str,
    device_id: &str,
) -> Result<std::collections::BTreeMap<String, u64>> {
    let _ = (s, user_id, device_id);
    Err(not_yet("one_time_key_counts"))
}

pub(super) async fn unused_fallback_key_types(s: &PgStore, user_id: &str, device_id: &str) -> Result<Vec<String>> {
    let _ = (s, user_id, device_id);
    Err(not_yet("unused_fallback_key_types"))
}

pub(super) async fn claim_keys(s: &PgStore, wanted: Vec<(String, String, String)>) -> Result<Vec<ClaimedKey>> {
    let _ = (s, wanted);
    Err(not_yet("claim_keys"))
}

pub(super) async fn device_list_changes(s: &PgStore, user_id: &str, since: i64, upto: i64) -> Result<Vec<String>> {
    let _ = (s, user_id, since, upto);
    Err(not_yet("device_list_changes"))
}

pub(super) async fn device_list_left(s: &PgStore, user_id: &str, since: i64, upto: i64) -> Result<Vec<String>> {
    let _ = (s, user_id, since, upto);
    Err(not_yet("device_list_left"))
}

pub(super) async fn send_to_device(
    s: &PgStore,
    sender: &str,
    sender_device: &str,
    event_type: &str,
    txn_id: &str,
    messages: Vec<NewToDevice>,
) -> Result<bool> {
    let _ = (s, sender, sender_device, event_type, txn_id, messages);
    Err(not_yet("send_to_device"))
}

pub(super) async fn to_device_messages(
    s: &PgStore,
    user_id: &str,
    device_id: &str,
    after: i64,
    upto: i64,
    limit: usize,
) -> Result<Vec<ToDeviceMessage>> {
    let _ = (s, user_id, device_id, after, upto, limit);
    Err(not_yet("to_device_messages"))
}

pub(super) async fn ack_to_device(s: &PgStore, user_id: &str, device_id: &str, upto: i64) -> Result<()> {
    let _ = (s, user_id, device_id, upto);
    Err(not_yet("ack_to_device"))
}

pub(super) async fn put_cross_signing_keys(s: &PgStore, user_id: &str, keys: Vec<(String, String)>) -> Result<()> {
    let _ = (s, user_id, keys);
    Err(not_yet("put_cross_signing_keys"))
}

pub(super) async fn get_cross_signing_keys(s: &PgStore, user_id: &str) -> Result<Vec<(String, String)>> {
    let _ = (s, user_id);
    Err(not_yet("get_cross_signing_keys"))
}

pub(super) async fn add_key_signatures(s: &PgStore, signatures: Vec<KeySignature>) -> Result<()> {
    let _ = (s, signatures);
    Err(not_yet("add_key_signatures"))
}

pub(super) async fn key_signatures(s: &PgStore, user_id: &str) -> Result<Vec<KeySignature>> {
    let _ = (s, user_id);
    Err(not_yet("key_signatures"))
}

pub(super) async fn put_filter(s: &PgStore, user_id: &str, filter_json: &str) -> Result<String> {
    let _ = (s, user_id, filter_json);
    Err(not_yet("put_filter"))
}

pub(super) async fn get_filter(s: &PgStore, user_id: &str, filter_id: &str) -> Result<Option<String>> {
    let _ = (s, user_id, filter_id);
    Err(not_yet("get_filter"))
}
