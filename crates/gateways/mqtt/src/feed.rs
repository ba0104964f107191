//! The subscription feed of a connection: a task reading the server's one
//! ordered stream (`Services::wait_room_feed`) for the rooms its
//! subscriptions name, turning each event, and each ephemeral event (typing
//! changes and receipts, on `…/x/{type}`), into the PUBLISHes that match.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ruma::OwnedRoomId;
use tokio::sync::{mpsc, watch};
use weft_services::stream::{EphemeralItem, StoredEvent, client_event};
use weft_services::{Services, Session};

use crate::topics::{FilterRoom, ephemeral_topic, event_topic, matches, prefix, state_topic};

/// Events read per call.
const BATCH: usize = 100;

/// A subscription.
#[derive(Debug, Clone)]
pub struct Sub {
    pub filter: String,
    /// Granted QoS (0, 1 or 2).
    pub qos: u8,
    pub room: FilterRoom,
    /// The room of a filter naming one (`None` for all joined rooms).
    pub room_id: Option<OwnedRoomId>,
    /// Only events after this stream position ("from the moment of subscribing").
    pub from: i64,
}

/// The messages of one item of the stream: (topic, QoS, payload).
type Publishes = Vec<(String, u8, Bytes)>;

/// What the feed hands the connection, in stream order.
#[derive(Debug)]
pub enum FeedItem {
    /// An event at `position` and its messages (topic, QoS, payload).
    Event {
        position: i64,
        publishes: Vec<(String, u8, Bytes)>,
    },
    /// Everything up to here has been considered.
    Advance(i64),
}

async fn rooms_of(services: &Services, session: &Session, subs: &[Sub]) -> Vec<OwnedRoomId> {
    let mut rooms: Vec<OwnedRoomId> = subs.iter().filter_map(|s| s.room_id.clone()).collect();
    if subs.iter().any(|s| s.room == FilterRoom::All)
        && let Ok(joined) = services.joined_rooms(&session.user_id).await
    {
        rooms.extend(joined.into_iter().filter_map(|r| OwnedRoomId::try_from(r).ok()));
    }
    rooms.sort();
    rooms.dedup();
    rooms
}

fn payload(ev: &StoredEvent, session: &Session) -> Bytes {
    let json = client_event(ev, session);
    Bytes::from(serde_json::to_vec(&json).unwrap_or_default())
}

/// The topics an event is published on for one subscription: the event
/// topic, and for state events the state topic too.
fn topics_for(sub: &Sub, ev: &StoredEvent) -> Vec<String> {
    let p = prefix(&sub.room, &ev.room_id);
    let mut out = vec![event_topic(&p, &ev.event_type)];
    if let Some(key) = &ev.state_key {
        out.push(state_topic(&p, &ev.event_type, key));
    }
    out.retain(|t| matches(&sub.filter, t));
    out
}

fn publishes(subs: &[Sub], ev: &StoredEvent, session: &Session) -> Vec<(String, u8, Bytes)> {
    let mut out: Vec<(String, u8, Bytes)> = Vec::new();
    for sub in subs {
        if ev.position <= sub.from || sub.room_id.as_ref().is_some_and(|r| r.as_str() != ev.room_id) {
            continue;
        }
        for topic in topics_for(sub, ev) {
            // Overlapping subscriptions: one message, at the highest QoS.
            match out.iter_mut().find(|(t, _, _)| *t == topic) {
                Some(m) => m.1 = m.1.max(sub.qos),
                None => out.push((topic, sub.qos, Bytes::new())),
            }
        }
    }
    if !out.is_empty() {
        let body = payload(ev, session);
        for m in &mut out {
            m.2 = body.clone();
        }
    }
    out
}

/// The messages of an ephemeral event (typing, a receipt): on
/// `{room}/x/{type}` for every subscription that matches it.
fn ephemeral_publishes(subs: &[Sub], item: &EphemeralItem) -> Vec<(String, u8, Bytes)> {
    let mut out: Vec<(String, u8, Bytes)> = Vec::new();
    let event_type = item.event["type"].as_str().unwrap_or_default();
    for sub in subs {
        if item.position <= sub.from || sub.room_id.as_ref().is_some_and(|r| r.as_str() != item.room_id) {
            continue;
        }
        let topic = ephemeral_topic(&prefix(&sub.room, &item.room_id), event_type);
        if !matches(&sub.filter, &topic) {
            continue;
        }
        match out.iter_mut().find(|(t, _, _)| *t == topic) {
            Some(m) => m.1 = m.1.max(sub.qos),
            None => out.push((topic, sub.qos, Bytes::new())),
        }
    }
    if !out.is_empty() {
        let body = Bytes::from(serde_json::to_vec(&item.event).unwrap_or_default());
        for m in &mut out {
            m.2 = body.clone();
        }
    }
    out
}

/// The current state of the rooms of `sub` that its filter matches, as
/// (topic, payload), for retained messages on subscribe.
pub async fn state_publishes(services: &Services, session: &Session, sub: &Sub) -> Vec<(String, Bytes)> {
    let mut out = Vec::new();
    for room in rooms_of(services, session, std::slice::from_ref(sub)).await {
        let Ok(state) = services.room_state(&session.user_id, room.as_str()).await else {
            continue;
        };
        for ev in state {
            // Newer than the subscription: the feed delivers it (once).
            if ev.position > sub.from {
                continue;
            }
            let Some(key) = &ev.state_key else { continue };
            let topic = state_topic(&prefix(&sub.room, room.as_str()), &ev.event_type, key);
            if matches(&sub.filter, &topic) {
                out.push((topic, payload(&ev, session)));
            }
        }
    }
    out
}

/// Runs until the connection drops its receiver.
pub async fn run_feed(
    services: Arc<Services>,
    session: Session,
    mut subs_rx: watch::Receiver<Arc<Vec<Sub>>>,
    mut since: i64,
    tx: mpsc::Sender<FeedItem>,
) {
    loop {
        let subs = subs_rx.borrow_and_update().clone();
        if subs.is_empty() {
            if subs_rx.changed().await.is_err() {
                return;
            }
            continue;
        }
        let all_rooms = subs.iter().any(|s| s.room == FilterRoom::All);
        let rooms = rooms_of(&services, &session, &subs).await;
        // Short waits when following "all joined rooms", to notice joins.
        let wait = Duration::from_secs(if all_rooms { 2 } else { 20 });
        let got = tokio::select! {
            got = services.wait_room_feed(&session.user_id, &rooms, since, BATCH, wait) => got,
            changed = subs_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        let mut feed = match got {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("mqtt: reading the stream failed: {}", e.message);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if all_rooms {
            // A room joined while waiting: read again with it included, so
            // its events are not skipped.
            let now = rooms_of(&services, &session, &subs).await;
            if now != rooms {
                match services.room_feed_after(&session.user_id, &now, since, BATCH).await {
                    Ok(f) => feed = f,
                    Err(_) => continue,
                }
            }
        }
        // Events and ephemeral events merged in stream order.
        let mut items: Vec<(i64, Publishes)> = feed
            .events
            .iter()
            .map(|ev| (ev.position, publishes(&subs, ev, &session)))
            .chain(
                feed.ephemeral
                    .iter()
                    .map(|item| (item.position, ephemeral_publishes(&subs, item))),
            )
            .collect();
        items.sort_by_key(|(p, _)| *p);
        for (position, publishes) in items {
            if !publishes.is_empty() && tx.send(FeedItem::Event { position, publishes }).await.is_err() {
                return;
            }
        }
        if tx.send(FeedItem::Advance(feed.next)).await.is_err() {
            return;
        }
        since = feed.next;
    }
}
