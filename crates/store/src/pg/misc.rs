//! PostgreSQL: misc.

use super::*;

pub(super) async fn search_users(s: &PgStore, requester: &str, term: &str, limit: usize) -> Result<Vec<UserRecord>> {
    let _ = (s, requester, term, limit);
    Err(not_yet("search_users"))
}

pub(super) async fn add_report(s: &PgStore, report: Report) -> Result<i64> {
    let _ = (s, report);
    Err(not_yet("add_report"))
}

pub(super) async fn reports(s: &PgStore, limit: usize) -> Result<Vec<Report>> {
    let _ = (s, limit);
    Err(not_yet("reports"))
}

pub(super) async fn public_rooms(s: &PgStore) -> Result<Vec<String>> {
    let _ = s;
    Err(not_yet("public_rooms"))
}

pub(super) async fn set_room_public(s: &PgStore, room_id: &str, public: bool) -> Result<()> {
    let _ = (s, room_id, public);
    Err(not_yet("set_room_public"))
}

pub(super) async fn create_alias(s: &PgStore, alias: &str, room_id: &str, creator: &str) -> Result<bool> {
    let _ = (s, alias, room_id, creator);
    Err(not_yet("create_alias"))
}

pub(super) async fn resolve_alias(s: &PgStore, alias: &str) -> Result<Option<AliasRecord>> {
    let _ = (s, alias);
    Err(not_yet("resolve_alias"))
}

pub(super) async fn delete_alias(s: &PgStore, alias: &str) -> Result<bool> {
    let _ = (s, alias);
    Err(not_yet("delete_alias"))
}

pub(super) async fn room_aliases(s: &PgStore, room_id: &str) -> Result<Vec<String>> {
    let _ = (s, room_id);
    Err(not_yet("room_aliases"))
}

pub(super) async fn sliding_connection(
    s: &PgStore,
    user_id: &str,
    device_id: &str,
    conn_id: &str,
) -> Result<Option<String>> {
    let _ = (s, user_id, device_id, conn_id);
    Err(not_yet("sliding_connection"))
}

pub(super) async fn put_sliding_connection(
    s: &PgStore,
    user_id: &str,
    device_id: &str,
    conn_id: &str,
    state_json: &str,
) -> Result<()> {
    let _ = (s, user_id, device_id, conn_id, state_json);
    Err(not_yet("put_sliding_connection"))
}

pub(super) async fn get_meta(s: &PgStore, key: &str) -> Result<Option<String>> {
    let k = key.to_owned();
    s.read(move |c| {
        Ok(c.query_opt("SELECT value FROM meta WHERE key = $1", &[&k])?
            .map(|r| r.get(0)))
    })
    .await
}

pub(super) async fn set_meta(s: &PgStore, key: &str, value: &str) -> Result<()> {
    let (k, v) = (key.to_owned(), value.to_owned());
    s.write_wait(move |c, _| {
        c.execute(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&k, &v],
        )
        .map_err(db_err)?;
        Ok(())
    })
    .await
}
