//! PostgreSQL: ephemeral.

use super::*;

pub(super) fn put_account_data(
    s: &PgStore,
    user_id: &str,
    room_id: Option<&str>,
    data_type: &str,
    content_json: &str,
) -> Pending<i64> {
    let _ = (user_id, room_id, data_type, content_json);
    s.write(|_, _| Err(not_yet("put_account_data")))
}

pub(super) fn edit_account_data(
    s: &PgStore,
    user_id: &str,
    room_id: Option<&str>,
    data_type: &str,
    edit: AccountDataEdit,
) -> Pending<i64> {
    let _ = (user_id, room_id, data_type, edit);
    s.write(|_, _| Err(not_yet("edit_account_data")))
}

pub(super) async fn get_account_data(
    s: &PgStore,
    user_id: &str,
    room_id: Option<&str>,
    data_type: &str,
) -> Result<Option<String>> {
    let _ = (s, user_id, room_id, data_type);
    Err(not_yet("get_account_data"))
}

pub(super) async fn account_data_since(
    s: &PgStore,
    user_id: &str,
    since: i64,
    upto: i64,
) -> Result<Vec<AccountDataRecord>> {
    let _ = (s, user_id, since, upto);
    Err(not_yet("account_data_since"))
}

pub(super) fn put_receipt(s: &PgStore, receipt: ReceiptRecord) -> Pending<i64> {
    let _ = receipt;
    s.write(|_, _| Err(not_yet("put_receipt")))
}

pub(super) async fn receipts_since(s: &PgStore, room_id: &str, since: i64, upto: i64) -> Result<Vec<ReceiptRecord>> {
    let _ = (s, room_id, since, upto);
    Err(not_yet("receipts_since"))
}

pub(super) fn add_notifications(s: &PgStore, rows: Vec<NewNotification>, evaluated: i64) -> Pending<()> {
    let _ = (rows, evaluated);
    s.write(|_, _| Err(not_yet("add_notifications")))
}

pub(super) async fn unread_counts(s: &PgStore, user_id: &str, room_id: Option<&str>) -> Result<Vec<UnreadCount>> {
    let _ = (s, user_id, room_id);
    Err(not_yet("unread_counts"))
}

pub(super) async fn notifications(
    s: &PgStore,
    user_id: &str,
    before: Option<i64>,
    limit: usize,
    only_highlight: bool,
) -> Result<Vec<NotificationRecord>> {
    let _ = (s, user_id, before, limit, only_highlight);
    Err(not_yet("notifications"))
}

pub(super) async fn notifications_after(
    s: &PgStore,
    user_id: &str,
    after: i64,
    limit: usize,
) -> Result<Vec<NotificationRecord>> {
    let _ = (s, user_id, after, limit);
    Err(not_yet("notifications_after"))
}

pub(super) async fn set_pusher(s: &PgStore, pusher: PusherRecord, append: bool) -> Result<()> {
    let _ = (s, pusher, append);
    Err(not_yet("set_pusher"))
}

pub(super) async fn delete_pusher(s: &PgStore, user_id: &str, app_id: &str, pushkey: &str) -> Result<bool> {
    let _ = (s, user_id, app_id, pushkey);
    Err(not_yet("delete_pusher"))
}

pub(super) async fn pushers(s: &PgStore, user_id: Option<&str>) -> Result<Vec<PusherRecord>> {
    let _ = (s, user_id);
    Err(not_yet("pushers"))
}

pub(super) async fn pusher_sent(s: &PgStore, user_id: &str, app_id: &str, pushkey: &str, position: i64) -> Result<()> {
    let _ = (s, user_id, app_id, pushkey, position);
    Err(not_yet("pusher_sent"))
}

pub(super) async fn events_after(s: &PgStore, after: i64, upto: i64, limit: usize) -> Result<Vec<StoredEvent>> {
    let _ = (s, after, upto, limit);
    Err(not_yet("events_after"))
}

pub(super) fn set_typing(s: &PgStore, room_id: &str, user_id: &str, expires_ms: Option<u64>) -> Pending<Option<i64>> {
    let _ = (room_id, user_id, expires_ms);
    s.write(|_, _| Err(not_yet("set_typing")))
}

pub(super) async fn typing(s: &PgStore, room_id: &str, now_ms: u64) -> Result<(Vec<String>, i64)> {
    let _ = (s, room_id, now_ms);
    Err(not_yet("typing"))
}

pub(super) fn expire_typing(s: &PgStore, now_ms: u64) -> Pending<Vec<String>> {
    let _ = now_ms;
    s.write(|_, _| Err(not_yet("expire_typing")))
}

pub(super) async fn presence(s: &PgStore, user_id: &str) -> Result<Option<PresenceRecord>> {
    let _ = (s, user_id);
    Err(not_yet("presence"))
}

pub(super) fn edit_presence(s: &PgStore, user_id: &str, edit: PresenceEdit) -> Pending<Option<i64>> {
    let _ = (user_id, edit);
    s.write(|_, _| Err(not_yet("edit_presence")))
}

pub(super) async fn presence_since(s: &PgStore, viewer: &str, since: i64, upto: i64) -> Result<Vec<PresenceRecord>> {
    let _ = (s, viewer, since, upto);
    Err(not_yet("presence_since"))
}

pub(super) async fn share_room(s: &PgStore, a: &str, b: &str) -> Result<bool> {
    let _ = (s, a, b);
    Err(not_yet("share_room"))
}

pub(super) fn expire_presence(s: &PgStore, now_ms: u64, idle_ms: u64) -> Pending<Vec<String>> {
    let _ = (now_ms, idle_ms);
    s.write(|_, _| Err(not_yet("expire_presence")))
}

pub(super) async fn next_ephemeral_deadline(s: &PgStore, idle_ms: Option<u64>) -> Result<Option<u64>> {
    let _ = (s, idle_ms);
    Err(not_yet("next_ephemeral_deadline"))
}
