//! PostgreSQL: rooms.

use super::*;

pub(super) fn persist_event(s: &PgStore, event: NewEvent) -> Pending<i64> {
    let _ = event;
    s.write(|_, _| Err(not_yet("persist_event")))
}

pub(super) async fn room_info(s: &PgStore, room_id: &str) -> Result<Option<RoomRecord>> {
    let _ = (s, room_id);
    Err(not_yet("room_info"))
}

pub(super) async fn get_event(s: &PgStore, event_id: &str) -> Result<Option<StoredEvent>> {
    let _ = (s, event_id);
    Err(not_yet("get_event"))
}

pub(super) async fn current_state(s: &PgStore, room_id: &str) -> Result<Vec<StoredEvent>> {
    let _ = (s, room_id);
    Err(not_yet("current_state"))
}

pub(super) async fn state_at(s: &PgStore, room_id: &str, pos: i64) -> Result<Vec<StoredEvent>> {
    let _ = (s, room_id, pos);
    Err(not_yet("state_at"))
}

pub(super) async fn state_changes(s: &PgStore, room_id: &str, after: i64, upto: i64) -> Result<Vec<StoredEvent>> {
    let _ = (s, room_id, after, upto);
    Err(not_yet("state_changes"))
}

pub(super) async fn room_events(
    s: &PgStore,
    room_id: &str,
    from: i64,
    to: i64,
    dir: Direction,
    limit: usize,
) -> Result<Vec<StoredEvent>> {
    let _ = (s, room_id, from, to, dir, limit);
    Err(not_yet("room_events"))
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn relations(
    s: &PgStore,
    room_id: &str,
    parent: &str,
    rel_type: Option<&str>,
    event_type: Option<&str>,
    from: i64,
    to: i64,
    dir: Direction,
    limit: usize,
) -> Result<Vec<StoredEvent>> {
    let _ = (s, room_id, parent, rel_type, event_type, from, to, dir, limit);
    Err(not_yet("relations"))
}

pub(super) async fn threads(
    s: &PgStore,
    room_id: &str,
    user: &str,
    only_participated: bool,
    before: i64,
    limit: usize,
) -> Result<Vec<ThreadRecord>> {
    let _ = (s, room_id, user, only_participated, before, limit);
    Err(not_yet("threads"))
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn search_events(
    s: &PgStore,
    rooms: &[String],
    query: &str,
    keys: &[SearchKey],
    by_rank: bool,
    offset: usize,
    limit: usize,
) -> Result<(Vec<(StoredEvent, f64)>, u64)> {
    let _ = (s, rooms, query, keys, by_rank, offset, limit);
    Err(not_yet("search_events"))
}

pub(super) async fn rooms_changed(s: &PgStore, since: i64, upto: i64) -> Result<Vec<(String, i64)>> {
    let _ = (s, since, upto);
    Err(not_yet("rooms_changed"))
}

pub(super) async fn user_memberships(s: &PgStore, user_id: &str) -> Result<Vec<MembershipRecord>> {
    let _ = (s, user_id);
    Err(not_yet("user_memberships"))
}

pub(super) async fn membership_history(s: &PgStore, room_id: &str, user_id: &str) -> Result<Vec<(i64, String)>> {
    let _ = (s, room_id, user_id);
    Err(not_yet("membership_history"))
}

pub(super) async fn visibility_history(s: &PgStore, room_id: &str) -> Result<Vec<(i64, String)>> {
    let _ = (s, room_id);
    Err(not_yet("visibility_history"))
}

pub(super) async fn txn_event(
    s: &PgStore,
    user_id: &str,
    device_id: &str,
    room_id: &str,
    event_type: &str,
    txn_id: &str,
) -> Result<Option<String>> {
    let _ = (s, user_id, device_id, room_id, event_type, txn_id);
    Err(not_yet("txn_event"))
}

pub(super) async fn forget_room(s: &PgStore, user_id: &str, room_id: &str) -> Result<()> {
    let _ = (s, user_id, room_id);
    Err(not_yet("forget_room"))
}

pub(super) async fn is_forgotten(s: &PgStore, user_id: &str, room_id: &str) -> Result<bool> {
    let _ = (s, user_id, room_id);
    Err(not_yet("is_forgotten"))
}
