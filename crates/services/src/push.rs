//! Push notifications: evaluation of every user's push rules against new
//! room events, unread counts, `/notifications`, pushers and delivery to
//! push gateways.
//!
//! Two background tasks read the one ordered stream, never the send path:
//!
//! - The **evaluator** takes the events after the position it last
//!   evaluated (the `meta` key `push_evaluated`), in stream order, and for
//!   every local joined member other than the sender (and a local user
//!   invited by the event) evaluates that member's push rules with ruma's
//!   [`Ruleset::get_actions`]. When the actions notify it adds a
//!   notification row (user, room, event, thread, actions, highlight); the
//!   rows of a batch and the new evaluated position are one write, so a
//!   restart resumes exactly there. Each row takes a stream position
//!   (`StreamKey::Notification`), which wakes `/sync`. A room's members,
//!   display names and power levels are kept per room while the evaluator
//!   walks (loaded once at the position the walk reaches the room, then
//!   updated by the state events it passes): a sensor room sending
//!   thousands of events costs one state load, not one per event.
//! - The **deliverer** runs one task per HTTP pusher, each sending that
//!   user's notification rows after the pusher's `last_sent` position, in
//!   order, one request at a time (at most
//!   `push.max_concurrent_requests` requests in flight over all pushers,
//!   each within `push.request_timeout_secs`). A gateway that cannot be
//!   reached, times out or answers 5xx or 429 is retried with exponential
//!   backoff (`push.retry_initial_ms` doubling up to `push.retry_max_ms`),
//!   the same notification first; another 4xx drops that notification. A
//!   pushkey the gateway lists in `rejected` deletes the pusher. Delivered
//!   positions are stored, so delivery resumes after a restart.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use ruma::api::client::push::get_notifications::v3::Notification;
use ruma::api::client::push::set_pusher::v3::PusherAction;
use ruma::api::client::push::{Pusher, PusherKind};
use ruma::power_levels::NotificationPowerLevels;
use ruma::push::{Action, FlattenedJson, PushConditionPowerLevelsCtx, PushConditionRoomCtx, PushFormat, Ruleset};
use ruma::room_version_rules::{AuthorizationRules, RoomPowerLevelsRules};
use ruma::serde::Raw;
use ruma::{Int, MilliSecondsSinceUnixEpoch, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UInt};
use serde_json::{Map, Value, json};
use tokio::sync::{Notify, Semaphore, mpsc};
use weft_core::config::PushConfig;
use weft_core::{Error, Result};
use weft_store::{NewNotification, NotificationRecord, PusherRecord, StoredEvent, StreamKey};

use crate::memo::PositionedMemo;
use crate::push_rules::{PUSH_RULES, ruleset_of};
use crate::{Services, Session};

/// `meta` key: the last event position the evaluator has evaluated.
const PUSH_EVALUATED: &str = "push_evaluated";
/// Events evaluated per batch (one write each).
const EVAL_BATCH: usize = 256;
/// Rooms whose member lists the evaluator keeps; past it, it starts over.
const MAX_ROOMS_KEPT: usize = 1024;
/// Notification rows a pusher task reads at once.
const DELIVERY_BATCH: usize = 32;
/// How often the deliverer looks for pushers it has no task for (set by
/// another process).
const RESCAN: Duration = Duration::from_secs(30);
/// The path every pusher URL must have (the push gateway API).
pub const NOTIFY_PATH: &str = "/_matrix/push/v1/notify";
/// Most notifications one `/notifications` page holds.
const MAX_NOTIFICATIONS_PAGE: u64 = 100;

type PusherKey = (String, String, String);

/// The delivery side's running state: the HTTP client, the limit on
/// requests in flight, and a wake-up for each pusher's task.
pub struct PushRuntime {
    // reqwest (with rustls) is already in the workspace (the tests' HTTP
    // client), is maintained, builds on our MSRV and gives per-request
    // timeouts, connection pooling and TLS without us assembling hyper-util's
    // client, connector and TLS layer by hand.
    client: reqwest::Client,
    permits: Arc<Semaphore>,
    tasks: Mutex<HashMap<PusherKey, Arc<Notify>>>,
    wake_tx: mpsc::UnboundedSender<String>,
    /// Held by the deliverer while it runs (this process leads).
    wake_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>,
    config: PushConfig,
    /// Each user's push rules as the evaluator last read them, valid
    /// while no position keyed to the user came since (setting account
    /// data makes one): the evaluator looks at every member's rules for
    /// every event.
    rulesets: PositionedMemo<String, Arc<Ruleset>>,
}

impl PushRuntime {
    pub(crate) fn new(config: &PushConfig) -> Result<Self> {
        let timeout = Duration::from_secs(config.request_timeout_secs.max(1));
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::internal(format!("push HTTP client: {e}")))?;
        let (wake_tx, wake_rx) = mpsc::unbounded_channel();
        Ok(Self {
            client,
            permits: Arc::new(Semaphore::new(config.max_concurrent_requests.max(1))),
            tasks: Mutex::new(HashMap::new()),
            wake_tx,
            wake_rx: tokio::sync::Mutex::new(wake_rx),
            config: config.clone(),
            rulesets: Default::default(),
        })
    }
}

/// A room as the evaluator sees it at the event it is at.
#[derive(Default)]
struct RoomCtx {
    version: Option<RoomVersionId>,
    creators: Vec<OwnedUserId>,
    /// Members: (membership, display name).
    members: HashMap<String, (String, Option<String>)>,
    /// The `m.room.power_levels` content, if any.
    power_levels: Option<Value>,
}

impl RoomCtx {
    fn apply(&mut self, ev: &StoredEvent, content: &Value) {
        let Some(key) = ev.state_key.as_deref() else { return };
        match ev.event_type.as_str() {
            "m.room.member" => {
                let membership = content["membership"].as_str().unwrap_or("leave").to_owned();
                let name = content["displayname"].as_str().map(str::to_owned);
                self.members.insert(key.to_owned(), (membership, name));
            }
            "m.room.power_levels" if key.is_empty() => self.power_levels = Some(content.clone()),
            "m.room.create" if key.is_empty() => {
                let mut creators: Vec<OwnedUserId> =
                    OwnedUserId::try_from(ev.sender.as_str()).ok().into_iter().collect();
                if let Some(extra) = content["additional_creators"].as_array() {
                    creators.extend(extra.iter().filter_map(|u| u.as_str()?.try_into().ok()));
                }
                self.creators = creators;
                let version = content["room_version"].as_str().unwrap_or("1");
                self.version = RoomVersionId::try_from(version).ok();
            }
            _ => {}
        }
    }

    fn joined(&self) -> impl Iterator<Item = &str> {
        self.members
            .iter()
            .filter(|(_, (m, _))| m == "join")
            .map(|(u, _)| u.as_str())
    }

    fn power_ctx(&self) -> PushConditionPowerLevelsCtx {
        let rules = self
            .version
            .as_ref()
            .and_then(|v| v.rules())
            .map(|r| RoomPowerLevelsRules::new(&r.authorization, self.creators.iter().cloned()))
            .unwrap_or_else(|| RoomPowerLevelsRules::new(&AuthorizationRules::V10, []));
        let int = |v: &Value| {
            v.as_i64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                .and_then(|n| Int::try_from(n).ok())
        };
        let mut users = BTreeMap::new();
        let mut users_default = Int::from(0u8);
        let mut notifications = NotificationPowerLevels::new();
        match &self.power_levels {
            Some(pl) => {
                if let Some(map) = pl["users"].as_object() {
                    for (u, level) in map {
                        if let (Ok(u), Some(level)) = (OwnedUserId::try_from(u.as_str()), int(level)) {
                            users.insert(u, level);
                        }
                    }
                }
                users_default = int(&pl["users_default"]).unwrap_or(users_default);
                if let Some(room) = int(&pl["notifications"]["room"]) {
                    notifications.room = room;
                }
            }
            // Without power levels the creator has 100.
            None => {
                for c in &self.creators {
                    users.insert(c.clone(), Int::from(100u8));
                }
            }
        }
        PushConditionPowerLevelsCtx::new(users, users_default, notifications, rules)
    }
}

/// `main`, or the root of the thread the event is in.
fn thread_of(content: &Value) -> String {
    let rel = &content["m.relates_to"];
    match (rel["rel_type"].as_str(), rel["event_id"].as_str()) {
        (Some("m.thread"), Some(root)) => root.to_owned(),
        _ => "main".to_owned(),
    }
}

impl Services {
    /// Starts the push evaluator and the deliverer (the server does,
    /// once): they run while this process leads (docs/scale-out.md).
    pub fn start_push(self: &Arc<Self>) {
        self.run_led("push evaluator", evaluator);
        self.run_led("push deliverer", deliverer);
    }

    /// Unread notification and highlight counts of `user_id` in
    /// `room_id`: notification rows after the user's newest `m.read` or
    /// `m.read.private` receipt that applies (unthreaded, or of the row's
    /// thread), all threads together.
    pub async fn unread_counts(&self, user_id: &str, room_id: &str) -> Result<(u64, u64)> {
        let counts = self.store.unread_counts(user_id, Some(room_id)).await?;
        Ok(counts
            .iter()
            .fold((0, 0), |(n, h), c| (n + c.notifications, h + c.highlights)))
    }

    /// A joined room's `unread_notifications` and, when `by_thread`, its
    /// `unread_thread_notifications` (then the first counts the main
    /// timeline only).
    pub(crate) async fn unread_sections(
        &self,
        user: &str,
        room_id: &str,
        by_thread: bool,
    ) -> Result<(Value, Option<Value>)> {
        let counts = self.room_unread_counts(user, room_id).await?;
        let (mut n, mut h) = (0u64, 0u64);
        let mut threads = Map::new();
        for c in counts.iter() {
            if by_thread && c.thread_id != "main" {
                if c.notifications > 0 {
                    threads.insert(
                        c.thread_id.clone(),
                        json!({ "notification_count": c.notifications, "highlight_count": c.highlights }),
                    );
                }
            } else {
                n += c.notifications;
                h += c.highlights;
            }
        }
        Ok((
            json!({ "notification_count": n, "highlight_count": h }),
            by_thread.then_some(Value::Object(threads)),
        ))
    }

    /// `GET /notifications`: the session user's notifications, newest
    /// first, before `from` (a token from an earlier page), at most
    /// `limit` (default 20, at most 100), only highlights when `only` is
    /// `highlight`. Answers the page and the next page's token.
    pub async fn notifications(
        &self,
        session: &Session,
        from: Option<&str>,
        limit: Option<u64>,
        only: Option<&str>,
    ) -> Result<(Vec<Notification>, Option<String>)> {
        let before = from
            .map(|f| {
                f.parse::<i64>()
                    .map_err(|_| Error::invalid_param("Invalid `from` token"))
            })
            .transpose()?;
        let limit = limit.unwrap_or(20).clamp(1, MAX_NOTIFICATIONS_PAGE) as usize;
        let only_highlight = only.is_some_and(|o| o.contains("highlight"));
        let user = session.user_id.as_str();
        let rows = self.store.notifications(user, before, limit, only_highlight).await?;
        let next = (rows.len() == limit)
            .then(|| rows.last().map(|r| r.position.to_string()))
            .flatten();
        let now = weft_core::now_ms();
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let Some(ev) = self.store.get_event(&r.event_id).await? else {
                continue;
            };
            let event = weft_rooms::client_event(&ev, Some((user, session.device_id.as_str())), now);
            let Ok(raw) = serde_json::value::to_raw_value(&event) else {
                continue;
            };
            let Ok(room_id) = OwnedRoomId::try_from(r.room_id.as_str()) else {
                continue;
            };
            let actions: Vec<Action> = serde_json::from_str(&r.actions_json).unwrap_or_default();
            let ts = MilliSecondsSinceUnixEpoch(UInt::new_saturating(r.ts));
            out.push(Notification::new(actions, Raw::from_json(raw), r.read, room_id, ts));
        }
        Ok((out, next))
    }

    /// `GET /pushers`: the session user's pushers.
    pub async fn pushers(&self, session: &Session) -> Result<Vec<Pusher>> {
        Ok(self
            .store
            .pushers(Some(session.user_id.as_str()))
            .await?
            .iter()
            .filter_map(|p| serde_json::from_str(&p.pusher_json).ok())
            .collect())
    }

    /// `POST /pushers/set`: adds, replaces (same `app_id` and `pushkey`)
    /// or deletes one of the session user's pushers. Only `http` pushers,
    /// whose `data.url` is an `http(s)` URL with the path
    /// `/_matrix/push/v1/notify` (else `400 M_INVALID_PARAM`).
    pub async fn set_pusher(&self, session: &Session, action: PusherAction) -> Result<()> {
        let user = session.user_id.as_str();
        let ids = match &action {
            PusherAction::Delete(ids) => Some(ids),
            PusherAction::Post(post) => Some(&post.pusher.ids),
            _ => None,
        };
        if let Some(ids) = ids {
            crate::text::check_text("app_id", &ids.app_id)?;
            crate::text::check_text("pushkey", &ids.pushkey)?;
        }
        match action {
            PusherAction::Delete(ids) => {
                self.store.delete_pusher(user, &ids.app_id, &ids.pushkey).await?;
                Ok(())
            }
            PusherAction::Post(post) => {
                let pusher = post.pusher;
                let ids = &pusher.ids;
                if ids.app_id.is_empty() || ids.app_id.len() > 64 {
                    return Err(Error::invalid_param("app_id must be 1 to 64 characters"));
                }
                if ids.pushkey.is_empty() || ids.pushkey.len() > 512 {
                    return Err(Error::invalid_param("pushkey must be 1 to 512 bytes"));
                }
                match &pusher.kind {
                    PusherKind::Http(data) => check_push_url(&data.url)?,
                    _ => return Err(Error::invalid_param("Only pushers of kind \"http\" are supported")),
                }
                let record = PusherRecord {
                    user_id: user.to_owned(),
                    app_id: ids.app_id.clone(),
                    pushkey: ids.pushkey.clone(),
                    pusher_json: serde_json::to_string(&pusher).map_err(Error::internal)?,
                    pushkey_ts: weft_core::now_ms(),
                    last_sent: 0,
                    from_event: 0,
                };
                self.store.set_pusher(record, post.append).await?;
                // The leader's deliverer finds a pusher set on another
                // process when a notification for the user is added (a
                // stream position it follows), or on its rescan.
                if self.is_leader() {
                    let _ = self.push.wake_tx.send(user.to_owned());
                }
                Ok(())
            }
            _ => Err(Error::invalid_param("Unknown pusher action")),
        }
    }

    /// Evaluates the events in (after, upto] (at most [`EVAL_BATCH`]),
    /// stores the notification rows with the new evaluated position, and
    /// answers that position.
    async fn evaluate_batch(&self, rooms: &mut HashMap<String, RoomCtx>, after: i64, upto: i64) -> Result<i64> {
        let events = self.store.events_after(after, upto, EVAL_BATCH).await?;
        let next = match events.last() {
            Some(last) if events.len() == EVAL_BATCH => last.position,
            _ => upto,
        };
        if events.is_empty() {
            return Ok(next);
        }
        let suffix = format!(":{}", self.server_name);
        let mut rulesets: HashMap<String, Arc<Ruleset>> = HashMap::new();
        let mut rows = Vec::new();
        for ev in &events {
            let pdu: Value = serde_json::from_str(&ev.pdu_json).unwrap_or_default();
            let content = &pdu["content"];
            if !rooms.contains_key(&ev.room_id) {
                if rooms.len() >= MAX_ROOMS_KEPT {
                    rooms.clear();
                }
                let mut ctx = RoomCtx::default();
                for s in self.store.state_at(&ev.room_id, ev.position - 1).await? {
                    let v: Value = serde_json::from_str(&s.pdu_json).unwrap_or_default();
                    ctx.apply(&s, &v["content"]);
                }
                rooms.insert(ev.room_id.clone(), ctx);
            }
            let Some(ctx) = rooms.get_mut(&ev.room_id) else {
                continue;
            };
            let mut targets: Vec<String> = ctx
                .joined()
                .filter(|u| *u != ev.sender && u.ends_with(&suffix))
                .map(str::to_owned)
                .collect();
            if ev.event_type == "m.room.member"
                && content["membership"] == "invite"
                && let Some(invitee) = ev.state_key.as_deref()
                && invitee != ev.sender
                && invitee.ends_with(&suffix)
                && !targets.iter().any(|t| t == invitee)
            {
                targets.push(invitee.to_owned());
            }
            if !targets.is_empty()
                && let (Ok(room_id), Ok(raw)) = (
                    OwnedRoomId::try_from(ev.room_id.as_str()),
                    serde_json::value::RawValue::from_string(ev.pdu_json.clone()),
                )
            {
                let raw: Raw<Value> = Raw::from_json(raw);
                // Flattened once for all the targets (ruma's `get_actions`
                // would flatten it for each).
                let flat = FlattenedJson::from_raw(&raw);
                let member_count = UInt::new_saturating(ctx.joined().count() as u64);
                let power = ctx.power_ctx();
                let thread = thread_of(content);
                targets.sort();
                for target in targets {
                    // An invite of the target is outside the timelines they
                    // read: it is pushed and listed, not counted as unread.
                    let thread =
                        if ev.state_key.as_deref() == Some(target.as_str()) && content["membership"] == "invite" {
                            String::new()
                        } else {
                            thread.clone()
                        };
                    let Ok(user_id) = OwnedUserId::try_from(target.as_str()) else {
                        continue;
                    };
                    if !rulesets.contains_key(&target) {
                        let rules = self
                            .push
                            .rulesets
                            .get_or_read(
                                self.store.as_ref(),
                                &target,
                                |k| matches!(k, StreamKey::User(u) if *u == target),
                                || async {
                                    let stored = self.store.get_account_data(&target, None, PUSH_RULES).await?;
                                    Ok(Arc::new(ruleset_of(&user_id, stored.as_deref())))
                                },
                            )
                            .await?;
                        rulesets.insert(target.clone(), rules);
                    }
                    let Some(rules) = rulesets.get(&target) else { continue };
                    let name = ctx
                        .members
                        .get(&target)
                        .and_then(|(_, n)| n.clone())
                        .filter(|n| !n.is_empty())
                        // Without a display name `contains_display_name`
                        // must not match anything (ruma would match an
                        // empty name everywhere): the full ID stands in.
                        .unwrap_or_else(|| user_id.to_string());
                    let pctx = PushConditionRoomCtx::new(room_id.clone(), member_count, user_id, name)
                        .with_power_levels(power.clone());
                    let actions = first_match_actions(rules, &flat, &pctx).await;
                    if !actions.iter().any(Action::should_notify) {
                        continue;
                    }
                    rows.push(NewNotification {
                        user_id: target,
                        room_id: ev.room_id.clone(),
                        event_id: ev.event_id.clone(),
                        event_position: ev.position,
                        thread_id: thread,
                        actions_json: serde_json::to_string(actions).map_err(Error::internal)?,
                        highlight: actions.iter().any(Action::is_highlight),
                        ts: ev.origin_server_ts,
                    });
                }
            }
            ctx.apply(ev, content);
        }
        self.store
            .add_notifications(rows, next)
            .await
            .map_err(|_| Error::internal("notifications not stored"))??;
        Ok(next)
    }

    /// Sends one notification row to an HTTP pusher.
    async fn deliver(&self, pusher: &PusherRecord, n: &NotificationRecord) -> Outcome {
        if n.event_position <= pusher.from_event {
            // The event predates the pusher (evaluated after it was set).
            return Outcome::Dropped;
        }
        let body = match self.notify_body(pusher, n).await {
            Ok(Some(b)) => b,
            Ok(None) => return Outcome::Dropped,
            Err(e) => {
                tracing::warn!("push: cannot build notification {}: {}", n.event_id, e.message);
                return Outcome::Retry;
            }
        };
        let Some(url) = pusher_url(pusher) else {
            return Outcome::Dropped;
        };
        let Ok(_permit) = self.push.permits.clone().acquire_owned().await else {
            return Outcome::Retry;
        };
        let resp = match self.push.client.post(url).json(&body).send().await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("push gateway for {} unreachable: {e}", pusher.user_id);
                return Outcome::Retry;
            }
        };
        let status = resp.status();
        if status.is_server_error() || status.as_u16() == 429 {
            return Outcome::Retry;
        }
        if !status.is_success() {
            tracing::warn!(
                "push gateway answered {status} for {} ({}); notification dropped",
                pusher.user_id,
                pusher.app_id
            );
            return Outcome::Dropped;
        }
        let answer: Value = resp.json().await.unwrap_or_default();
        let rejected = answer["rejected"]
            .as_array()
            .is_some_and(|r| r.iter().any(|k| k.as_str() == Some(pusher.pushkey.as_str())));
        if rejected {
            Outcome::Rejected
        } else {
            Outcome::Delivered
        }
    }

    /// The push gateway API body for one notification, as Sygnal takes it;
    /// `None` when the event is gone or the pusher unreadable.
    async fn notify_body(&self, pusher: &PusherRecord, n: &NotificationRecord) -> Result<Option<Value>> {
        let Ok(p) = serde_json::from_str::<Value>(&pusher.pusher_json) else {
            return Ok(None);
        };
        let mut data = p["data"].as_object().cloned().unwrap_or_default();
        data.remove("url");
        let event_id_only = data.get("format").and_then(|f| f.as_str()) == Some(PushFormat::EventIdOnly.as_str());
        let Some(ev) = self.store.get_event(&n.event_id).await? else {
            return Ok(None);
        };
        let pdu: Value = serde_json::from_str(&ev.pdu_json).unwrap_or_default();
        let actions: Value = serde_json::from_str(&n.actions_json).unwrap_or_default();
        let mut tweaks = Map::new();
        for a in actions.as_array().into_iter().flatten() {
            if let Some(name) = a["set_tweak"].as_str() {
                let value = a.get("value").cloned().unwrap_or(Value::Bool(true));
                tweaks.insert(name.to_owned(), value);
            }
        }
        let high = ev.event_type == "m.room.encrypted"
            || tweaks.get("highlight").is_some_and(|h| h == &Value::Bool(true))
            || tweaks.contains_key("sound");
        let unread: u64 = self
            .store
            .unread_counts(&pusher.user_id, None)
            .await?
            .iter()
            .map(|c| c.notifications)
            .sum();
        let device = json!({
            "app_id": pusher.app_id,
            "pushkey": pusher.pushkey,
            "pushkey_ts": pusher.pushkey_ts / 1000,
            "data": data,
            "tweaks": tweaks,
        });
        let mut notification = json!({
            "event_id": ev.event_id,
            "room_id": ev.room_id,
            "prio": if high { "high" } else { "low" },
            "counts": { "unread": unread },
            "devices": [device],
        });
        if !event_id_only {
            notification["type"] = json!(ev.event_type);
            notification["sender"] = json!(ev.sender);
            notification["content"] = pdu["content"].clone();
            if let Ok(room_id) = <&RoomId>::try_from(ev.room_id.as_str()) {
                let state = |t: &'static str, k: String, field: &'static str| async move {
                    self.rooms
                        .state_event(room_id, t, &k)
                        .await
                        .ok()
                        .flatten()
                        .and_then(|p| serde_json::from_str::<Value>(p.content.get()).ok())
                        .and_then(|c| c[field].as_str().map(str::to_owned))
                        .filter(|s| !s.is_empty())
                };
                if let Some(name) = state("m.room.member", ev.sender.clone(), "displayname").await {
                    notification["sender_display_name"] = json!(name);
                }
                if let Some(name) = state("m.room.name", String::new(), "name").await {
                    notification["room_name"] = json!(name);
                }
                if let Some(alias) = state("m.room.canonical_alias", String::new(), "alias").await {
                    notification["room_alias"] = json!(alias);
                }
            }
            if ev.event_type == "m.room.member" {
                notification["membership"] = pdu["content"]["membership"].clone();
                notification["user_is_target"] = json!(ev.state_key.as_deref() == Some(pusher.user_id.as_str()));
            }
        }
        Ok(Some(json!({ "notification": notification })))
    }
}

/// What became of one notification sent to a pusher.
enum Outcome {
    Delivered,
    /// The gateway rejected the pushkey: the pusher goes.
    Rejected,
    /// Not deliverable (refused with a 4xx, or its event is gone): skipped.
    Dropped,
    /// The gateway is down or overloaded: try again later.
    Retry,
}

/// A pusher URL must be `http(s)://HOST[:PORT]/_matrix/push/v1/notify`.
fn check_push_url(url: &str) -> Result<()> {
    let parsed = reqwest::Url::parse(url).map_err(|_| Error::invalid_param("data.url is not a URL"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none_or(str::is_empty) {
        return Err(Error::invalid_param("data.url must be an http or https URL"));
    }
    if parsed.path() != NOTIFY_PATH {
        return Err(Error::invalid_param(format!(
            "data.url must have the path {NOTIFY_PATH}"
        )));
    }
    Ok(())
}

fn pusher_url(p: &PusherRecord) -> Option<reqwest::Url> {
    let v: Value = serde_json::from_str(&p.pusher_json).ok()?;
    reqwest::Url::parse(v["data"]["url"].as_str()?).ok()
}

/// The evaluator: follows the stream, one batch of events at a time.
async fn evaluator(s: Arc<Services>) {
    let mut rx = s.store.subscribe_position();
    let mut pos = loop {
        match s.store.get_meta(PUSH_EVALUATED).await {
            Ok(v) => break v.and_then(|v| v.parse::<i64>().ok()).unwrap_or(0),
            Err(e) => {
                tracing::warn!("push: cannot read the evaluated position: {}", e.message);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let mut rooms: HashMap<String, RoomCtx> = HashMap::new();
    // Whether the last batch was full (more events are waiting).
    let mut behind = false;
    loop {
        let upto = *rx.borrow_and_update();
        if upto > pos {
            // Positions that carried no event (receipts, account data,
            // notification rows) need no reading.
            let has_events = behind || s.stream_touched(pos, upto, |k| matches!(k, StreamKey::Room(_)));
            if !has_events {
                pos = upto;
                continue;
            }
            match s.evaluate_batch(&mut rooms, pos, upto).await {
                Ok(next) => {
                    behind = next < upto;
                    pos = next;
                }
                Err(e) => {
                    tracing::warn!("push: evaluation failed, retrying: {}", e.message);
                    rooms.clear();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            continue;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// The deliverer: keeps one task per pusher and wakes a user's pushers
/// when notification rows for them appear.
async fn deliverer(s: Arc<Services>) {
    let mut rx = s.store.subscribe_position();
    let mut seen = *rx.borrow_and_update();
    let mut wake = s.push.wake_rx.lock().await;
    // Tasks of an earlier time this process led ended with it.
    s.push.tasks.lock().clear();
    while wake.try_recv().is_ok() {}
    let mut tick = tokio::time::interval(RESCAN);
    loop {
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
                let upto = *rx.borrow_and_update();
                let notified = s.stream_keys(seen, upto, |k| match k {
                    StreamKey::Notification(u, _) => Some(u),
                    _ => None,
                });
                match notified {
                    Some(users) => {
                        let users: HashSet<String> = users.into_iter().collect();
                        for u in users {
                            wake_pushers(&s, Some(&u)).await;
                        }
                    }
                    None => wake_pushers(&s, None).await,
                }
                seen = upto;
            }
            Some(user) = wake.recv() => wake_pushers(&s, Some(&user)).await,
            _ = tick.tick() => wake_pushers(&s, None).await,
        }
    }
}

/// Wakes the task of each pusher of `user` (of everyone when `None`),
/// starting the ones that have none.
async fn wake_pushers(s: &Arc<Services>, user: Option<&str>) {
    let pushers = match s.store.pushers(user).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("push: cannot list pushers: {}", e.message);
            return;
        }
    };
    let mut tasks = s.push.tasks.lock();
    for p in pushers {
        let key = (p.user_id, p.app_id, p.pushkey);
        match tasks.get(&key) {
            Some(n) => n.notify_one(),
            None => {
                let notify = Arc::new(Notify::new());
                tasks.insert(key.clone(), notify.clone());
                s.spawn_led(pusher_task(s.clone(), key, notify));
            }
        }
    }
}

/// Delivers one pusher's notification rows in order, retrying with
/// backoff; ends when the pusher is deleted.
async fn pusher_task(s: Arc<Services>, key: PusherKey, notify: Arc<Notify>) {
    let initial = Duration::from_millis(s.push.config.retry_initial_ms.max(1));
    let max = Duration::from_millis(s.push.config.retry_max_ms).max(initial);
    let mut backoff = initial;
    let (user, app_id, pushkey) = (&key.0, &key.1, &key.2);
    loop {
        let pusher = match s.store.pushers(Some(user)).await {
            Ok(list) => list.into_iter().find(|p| &p.app_id == app_id && &p.pushkey == pushkey),
            Err(_) => {
                tokio::time::sleep(initial).await;
                continue;
            }
        };
        let Some(pusher) = pusher else {
            s.push.tasks.lock().remove(&key);
            return;
        };
        let rows = match s
            .store
            .notifications_after(user, pusher.last_sent, DELIVERY_BATCH)
            .await
        {
            Ok(r) => r,
            Err(_) => {
                tokio::time::sleep(initial).await;
                continue;
            }
        };
        if rows.is_empty() {
            tokio::select! {
                _ = notify.notified() => {}
                _ = tokio::time::sleep(RESCAN) => {}
            }
            continue;
        }
        for n in rows {
            match s.deliver(&pusher, &n).await {
                Outcome::Delivered | Outcome::Dropped => {
                    backoff = initial;
                    if s.store.pusher_sent(user, app_id, pushkey, n.position).await.is_err() {
                        break;
                    }
                }
                Outcome::Rejected => {
                    tracing::info!("push gateway rejected pushkey of {user} ({app_id}): pusher deleted");
                    let _ = s.store.delete_pusher(user, app_id, pushkey).await;
                    s.push.tasks.lock().remove(&key);
                    return;
                }
                Outcome::Retry => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(max);
                    break;
                }
            }
        }
    }
}

/// The actions of the first of `rules` that applies to the event (none if
/// none does): ruma's `Ruleset::get_actions` on an event flattened once.
/// The targets are never the sender (whom `get_actions` skips).
async fn first_match_actions<'r>(
    rules: &'r Ruleset,
    event: &FlattenedJson,
    ctx: &PushConditionRoomCtx,
) -> &'r [Action] {
    for rule in rules {
        if rule.applies(event, ctx).await {
            return rule.actions();
        }
    }
    &[]
}
