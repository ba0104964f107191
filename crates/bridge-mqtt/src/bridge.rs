//! The bridge: broker messages → room events (in order, acknowledged to
//! the broker only once the homeserver has accepted them), and commands
//! from the rooms (pushed by the homeserver's transactions) → publishes.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::{Path as UrlPath, Query, Request, State as AxState};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router as AxRouter};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS, Transport};
use serde_json::{Map, Value, json};
use tokio::sync::{Mutex, mpsc};

use crate::config::{Config, PREFIX};
use crate::content::{command_value, payload_content};
use crate::mapping::{Commands, Device, Route, Router, ha_discovery, online};
use crate::matrix::{Homeserver, HsError, HsResult};
use crate::state::{DeviceRoom, State};

pub const AVAILABILITY_TYPE: &str = "org.weft.mqtt.availability";
pub const COMMAND_TYPE: &str = "org.weft.command";

pub struct Bridge {
    cfg: Config,
    hs: Homeserver,
    state: Mutex<State>,
    router: std::sync::RwLock<Router>,
    mqtt: AsyncClient,
    /// Recent transaction IDs from the homeserver (a repeat is dropped).
    seen_txns: std::sync::Mutex<VecDeque<String>>,
    /// Zigbee2MQTT's descriptions of its devices, by friendly name.
    z2m_info: std::sync::Mutex<HashMap<String, String>>,
    /// Events from transactions, to the command worker.
    commands: mpsc::UnboundedSender<Value>,
    /// The room IDs of `bridge.spaces`, in its order, once the bridge's
    /// user is in them (`None`: not yet; tried again when needed).
    spaces: Mutex<Vec<Option<String>>>,
    /// Held while a device room is being shared (one at a time, so two
    /// never both find something missing and both send it).
    sharing: Mutex<()>,
}

/// Calls `f` until the homeserver answers: a refusal is logged and gives
/// `None` (the message cannot be bridged; it is acknowledged and dropped),
/// an outage is retried with backoff (100 ms doubling to 10 s), forever.
async fn retry<T, F, Fut>(what: &str, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = HsResult<T>>,
{
    let mut wait = Duration::from_millis(100);
    loop {
        match f().await {
            Ok(v) => return Some(v),
            Err(e @ HsError::Refused { .. }) => {
                tracing::warn!("{what}: {e}");
                return None;
            }
            Err(e) => {
                tracing::warn!("{what}: {e}; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
}

fn tls_transport(cfg: &Config) -> Result<Transport> {
    if let Some(ca) = &cfg.broker.ca_file {
        let ca = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
        Ok(Transport::tls_with_config(rumqttc::TlsConfiguration::Simple {
            ca,
            alpn: None,
            client_auth: None,
        }))
    } else {
        Ok(Transport::tls_with_default_config())
    }
}

pub async fn run(cfg: Config) -> Result<()> {
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let state = State::open(&cfg.bridge.state_file)?;
    let mut router = Router::new(&cfg);
    router.learnt = state.saved.learnt.clone();
    let hs = Homeserver::new(
        &cfg.homeserver.url,
        &cfg.appservice.as_token,
        &cfg.homeserver.server_name,
    )?;

    let mut opts = MqttOptions::new(&cfg.broker.client_id, &cfg.broker.host, cfg.broker.port);
    opts.set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(cfg.broker.keep_alive_secs.max(5)))
        .set_max_packet_size(1 << 20, 1 << 20);
    if let Some(u) = &cfg.broker.username {
        opts.set_credentials(u, cfg.broker.password.clone().unwrap_or_default());
    }
    if cfg.broker.tls {
        opts.set_transport(tls_transport(&cfg)?);
    }
    let (mqtt, mut eventloop) = AsyncClient::new(opts, 1024);

    let listener = tokio::net::TcpListener::bind(cfg.appservice.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.appservice.listen))?;
    eprintln!("weft-bridge-mqtt: transactions listening on {}", listener.local_addr()?);
    eprintln!(
        "weft-bridge-mqtt: broker {}:{} as client {:?}",
        cfg.broker.host, cfg.broker.port, cfg.broker.client_id
    );

    let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel::<Value>();
    let bridge = Arc::new(Bridge {
        hs,
        commands: cmd_tx,
        state: Mutex::new(state),
        router: std::sync::RwLock::new(router),
        mqtt: mqtt.clone(),
        seen_txns: Default::default(),
        z2m_info: Default::default(),
        spaces: Mutex::new(vec![None; cfg.bridge.spaces.len()]),
        sharing: Mutex::new(()),
        cfg,
    });

    let app = AxRouter::new()
        .route("/_matrix/app/v1/transactions/{txn}", put(transaction))
        .route("/_matrix/app/v1/ping", post(ping))
        .route("/_matrix/app/v1/users/{id}", get(not_found))
        .route("/_matrix/app/v1/rooms/{alias}", get(not_found))
        .route_layer(axum::middleware::from_fn_with_state(bridge.clone(), require_hs_token))
        .with_state(bridge.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("transactions endpoint: {e}");
        }
    });

    // Device rooms made before `bridge.spaces` named a room are shared
    // with it now (nothing is done twice).
    {
        let bridge = bridge.clone();
        tokio::spawn(async move { bridge.share_all().await });
    }

    {
        let bridge = bridge.clone();
        tokio::spawn(async move {
            while let Some(ev) = cmd_rx.recv().await {
                bridge.room_event(&ev).await;
            }
        });
    }

    // The event loop only reads: messages go, in order, to the worker,
    // which acknowledges each once the homeserver has it.
    let (tx, rx) = mpsc::unbounded_channel::<Publish>();
    let worker = tokio::spawn(dispatch(bridge.clone(), rx));
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                eprintln!("weft-bridge-mqtt: connected (session present: {})", ack.session_present);
                let filters = bridge.router.read().map(|r| r.filters()).unwrap_or_default();
                let client = mqtt.clone();
                tokio::spawn(async move {
                    let subs = filters
                        .into_iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce));
                    if let Err(e) = client.subscribe_many(subs).await {
                        tracing::warn!("subscribe: {e}");
                    }
                });
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => eprintln!("weft-bridge-mqtt: subscribed"),
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if tx.send(p).is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("broker: {e}; reconnecting");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    // Only if a device's task died (a bug): exit with an error rather than
    // run on without acknowledging; what was not acknowledged is sent
    // again by the broker to the next run.
    worker.abort();
    anyhow::bail!("the message worker stopped")
}

/// How many messages may be on their way to the homeserver at once
/// (across devices; one device's go one after another).
const IN_FLIGHT: usize = 256;

/// Takes the broker's messages in order. Each device's readings go to the
/// homeserver one after another, in order, by a task of that device;
/// devices run side by side. Acknowledgements go back to the broker in
/// the order the messages came (as MQTT requires), each once its message
/// is done: a message is never acknowledged before the homeserver has
/// it, nor before the messages that came before it.
async fn dispatch(bridge: Arc<Bridge>, mut rx: mpsc::UnboundedReceiver<Publish>) {
    type Job = (Publish, Route, tokio::sync::oneshot::Sender<()>);
    let (ack_tx, mut ack_rx) = mpsc::channel::<(Publish, tokio::sync::oneshot::Receiver<()>)>(IN_FLIGHT);
    let acker = {
        let bridge = bridge.clone();
        tokio::spawn(async move {
            while let Some((p, done)) = ack_rx.recv().await {
                if done.await.is_err() {
                    return; // a device task ended: no ack, the broker sends it again
                }
                if let Err(e) = bridge.mqtt.ack(&p).await {
                    tracing::warn!("ack: {e}");
                }
            }
        })
    };
    let mut devices: HashMap<String, mpsc::UnboundedSender<Job>> = HashMap::new();
    while let Some(p) = rx.recv().await {
        let route = bridge.router.read().map(|r| r.route(&p.topic)).unwrap_or(Route::Ignore);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let key = match &route {
            Route::Reading { device, .. } | Route::Availability { device, .. } => Some(device.key.clone()),
            _ => None,
        };
        match key {
            Some(key) => {
                let queue = devices.entry(key).or_insert_with(|| {
                    let (q_tx, mut q_rx) = mpsc::unbounded_channel::<Job>();
                    let bridge = bridge.clone();
                    tokio::spawn(async move {
                        while let Some((p, route, done)) = q_rx.recv().await {
                            bridge.handle(&p, route).await;
                            let _ = done.send(());
                        }
                    });
                    q_tx
                });
                if queue.send((p.clone(), route, done_tx)).is_err() {
                    break;
                }
            }
            None => {
                // Device lists and discovery configs change the routing
                // of what follows: handled here, before the next message.
                bridge.handle(&p, route).await;
                let _ = done_tx.send(());
            }
        }
        if ack_tx.send((p, done_rx)).await.is_err() {
            break;
        }
    }
    acker.abort();
}

impl Bridge {
    fn puppet(&self, key: &str) -> String {
        self.hs.user_id(&format!("{PREFIX}{key}"))
    }

    /// One message from the broker, until the homeserver accepted it (or
    /// refused it for good).
    async fn handle(&self, p: &Publish, route: Route) {
        match route {
            Route::Ignore => {}
            Route::Z2mDevices => self.z2m_devices(&p.payload).await,
            Route::HaDiscovery => self.ha_config(&p.topic, &p.payload).await,
            Route::Reading { device, state_key } => {
                let Some(room) = self.ensure_room(&device).await else {
                    return;
                };
                let mut content = payload_content(&p.payload);
                content.insert("org.weft.mqtt.topic".into(), Value::from(p.topic.as_str()));
                let content = Value::Object(content);
                let puppet = self.puppet(&device.key);
                let ty = self.cfg.bridge.reading_type.clone();
                if p.retain {
                    retry(&format!("state of {}", p.topic), || {
                        self.hs.put_state(&room, &ty, &state_key, &content, &puppet)
                    })
                    .await;
                } else {
                    // Without a durable ID the message is not taken: the
                    // broker keeps it (no ack while this waits).
                    let txn = loop {
                        let got = self.state.lock().await.txn_id(p.pkid, p.dup, &p.topic, &p.payload);
                        let synced = match got {
                            Ok((t, None)) => Ok(t),
                            Ok((t, Some(log))) => tokio::task::spawn_blocking(move || log.sync_data())
                                .await
                                .map_err(std::io::Error::other)
                                .and_then(|r| r)
                                .map(|()| t)
                                .map_err(anyhow::Error::from),
                            Err(e) => Err(e),
                        };
                        match synced {
                            Ok(t) => break t,
                            Err(e) => {
                                tracing::error!("delivery log: {e:#}");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                        }
                    };
                    retry(&format!("reading on {}", p.topic), || {
                        self.hs.send(&room, &ty, &txn, &content, &puppet)
                    })
                    .await;
                }
            }
            Route::Availability { device, state_key } => {
                let Some(room) = self.ensure_room(&device).await else {
                    return;
                };
                let content = json!({
                    "online": online(&p.payload),
                    "body": String::from_utf8_lossy(&p.payload),
                    "org.weft.mqtt.topic": p.topic,
                });
                let puppet = self.puppet(&device.key);
                retry(&format!("availability on {}", p.topic), || {
                    self.hs
                        .put_state(&room, AVAILABILITY_TYPE, &state_key, &content, &puppet)
                })
                .await;
            }
        }
    }

    /// The device's room: known, found by its alias, or made now (puppet
    /// registered, room created by it with the alias, the configured users
    /// invited).
    async fn ensure_room(&self, device: &Device) -> Option<String> {
        {
            let mut st = self.state.lock().await;
            if let Some(r) = st.saved.rooms.get_mut(&device.key) {
                let room = r.room_id.clone();
                if merge_commands(&mut r.device, device) {
                    let _ = st.save();
                }
                return Some(room);
            }
        }
        let localpart = format!("{PREFIX}{}", device.key);
        let puppet = self.hs.user_id(&localpart);
        retry(&format!("registering {puppet}"), || self.hs.register(&localpart)).await?;
        let alias = format!("#{localpart}:{}", self.hs.server_name);
        let mut room = retry(&format!("resolving {alias}"), || self.hs.resolve_alias(&alias))
            .await
            .flatten();
        if room.is_none() {
            let info = self.z2m_info.lock().ok().and_then(|m| m.get(&device.name).cloned());
            let body = json!({
                "room_alias_name": localpart,
                "name": device.name,
                "topic": info.unwrap_or_else(|| format!("MQTT device {}, bridged by weft-bridge-mqtt", device.name)),
                "preset": "private_chat",
                "room_version": self.cfg.bridge.room_version,
                "invite": self.cfg.bridge.invite,
            });
            match self.hs.create_room(&puppet, &body).await {
                Ok(r) => room = Some(r),
                Err(HsError::Refused { errcode, .. }) if errcode == "M_ROOM_IN_USE" => {
                    room = retry(&format!("resolving {alias}"), || self.hs.resolve_alias(&alias))
                        .await
                        .flatten();
                }
                Err(e @ HsError::Refused { .. }) => tracing::warn!("creating {alias}: {e}"),
                Err(HsError::Retry(_)) => {
                    // The homeserver is away: look again, then create.
                    room = retry(&format!("resolving {alias}"), || self.hs.resolve_alias(&alias))
                        .await
                        .flatten();
                    if room.is_none() {
                        room = retry(&format!("creating {alias}"), || self.hs.create_room(&puppet, &body)).await;
                    }
                }
            }
        }
        let room = room?;
        eprintln!("weft-bridge-mqtt: device {} -> room {room} ({alias})", device.name);
        let mut st = self.state.lock().await;
        st.saved.rooms.insert(
            device.key.clone(),
            DeviceRoom {
                room_id: room.clone(),
                device: device.clone(),
            },
        );
        if let Err(e) = st.save() {
            tracing::error!("state file: {e:#}");
        }
        drop(st);
        self.share(&room, &puppet).await;
        Some(room)
    }

    fn bot(&self) -> String {
        self.hs.user_id(&self.cfg.appservice.sender_localpart)
    }

    /// The room IDs of `bridge.spaces` the bridge's user is in: each not
    /// yet joined is joined now (by ID or alias); one it cannot join (not
    /// invited) is logged and left out until the next try.
    async fn spaces(&self) -> Vec<String> {
        let bot = self.bot();
        let mut known = self.spaces.lock().await;
        for (slot, name) in known.iter_mut().zip(&self.cfg.bridge.spaces) {
            if slot.is_some() {
                continue;
            }
            match self.hs.join(name, &bot).await {
                Ok(id) => {
                    eprintln!("weft-bridge-mqtt: sharing device rooms with {name} ({id})");
                    *slot = Some(id);
                }
                Err(e) => tracing::error!(
                    "bridge.spaces: {bot} cannot join {name} ({e}): invite it there and give it the power \
                     to send m.space.child; device rooms are not shared with {name} until then"
                ),
            }
        }
        let mut ids: Vec<String> = Vec::new();
        for id in known.iter().flatten() {
            if !ids.contains(id) {
                ids.push(id.clone());
            }
        }
        ids
    }

    /// Every known device room, shared with `bridge.spaces` (at start-up,
    /// and when the bridge's user is invited somewhere).
    async fn share_all(&self) {
        if self.cfg.bridge.spaces.is_empty() {
            return;
        }
        let rooms: Vec<(String, String)> = self
            .state
            .lock()
            .await
            .saved
            .rooms
            .values()
            .map(|r| (r.room_id.clone(), self.puppet(&r.device.key)))
            .collect();
        for (room, puppet) in rooms {
            self.share(&room, &puppet).await;
        }
    }

    /// Shares a device room with the rooms of `bridge.spaces`: in each, an
    /// `m.space.child` for it (sent by the bridge's user); in the device
    /// room, an `m.space.parent` for each and the join rule `restricted`
    /// to their members (sent by its puppet, the room's creator). What is
    /// there already is not sent again; a refusal is logged.
    async fn share(&self, room: &str, puppet: &str) {
        if self.cfg.bridge.spaces.is_empty() {
            return;
        }
        let _one_at_a_time = self.sharing.lock().await;
        let spaces = self.spaces().await;
        if spaces.is_empty() {
            return;
        }
        let bot = self.bot();
        let via = json!({"via": [self.hs.server_name]});
        let has_via = |c: &Option<Option<Value>>| matches!(c, Some(Some(v)) if v["via"].as_array().is_some_and(|a| !a.is_empty()));
        for space in &spaces {
            let child = retry(&format!("m.space.child {room} in {space}"), || {
                self.hs.get_state(space, "m.space.child", room, &bot)
            })
            .await;
            if !has_via(&child)
                && retry(&format!("adding {room} to {space}"), || {
                    self.hs.put_state(space, "m.space.child", room, &via, &bot)
                })
                .await
                .is_none()
            {
                tracing::error!(
                    "bridge.spaces: {bot} may not send m.space.child in {space}: give it that power there \
                     (device room {room} is not listed in it)"
                );
            }
            let parent = retry(&format!("m.space.parent {space} in {room}"), || {
                self.hs.get_state(room, "m.space.parent", space, puppet)
            })
            .await;
            if !has_via(&parent) {
                retry(&format!("m.space.parent {space} in {room}"), || {
                    self.hs.put_state(room, "m.space.parent", space, &via, puppet)
                })
                .await;
            }
        }
        let rule = json!({
            "join_rule": "restricted",
            "allow": spaces.iter().map(|s| json!({"type": "m.room_membership", "room_id": s})).collect::<Vec<_>>(),
        });
        let now = retry(&format!("join rule of {room}"), || {
            self.hs.get_state(room, "m.room.join_rules", "", puppet)
        })
        .await
        .flatten();
        if now.as_ref() != Some(&rule) {
            retry(&format!("restricted join rule of {room}"), || {
                self.hs.put_state(room, "m.room.join_rules", "", &rule, puppet)
            })
            .await;
        }
    }

    async fn z2m_devices(&self, payload: &[u8]) {
        let Ok(Value::Array(list)) = serde_json::from_slice::<Value>(payload) else {
            return;
        };
        let mut updates = Vec::new();
        for d in list {
            let Some(name) = d["friendly_name"].as_str() else {
                continue;
            };
            if d["type"] == "Coordinator" {
                continue;
            }
            let def = &d["definition"];
            let text = format!(
                "{} {}: {} ({})",
                def["vendor"].as_str().unwrap_or("?"),
                def["model"].as_str().unwrap_or("?"),
                def["description"].as_str().unwrap_or(""),
                d["ieee_address"].as_str().unwrap_or(""),
            );
            if let Ok(mut m) = self.z2m_info.lock() {
                if m.get(name) == Some(&text) {
                    continue;
                }
                m.insert(name.to_string(), text.clone());
            }
            updates.push((name.to_string(), text));
        }
        for (name, text) in updates {
            let key = crate::mapping::device_key(&name);
            let room = self.state.lock().await.saved.rooms.get(&key).map(|r| r.room_id.clone());
            if let Some(room) = room {
                let puppet = self.puppet(&key);
                let content = json!({"topic": text});
                retry("room topic", || {
                    self.hs.put_state(&room, "m.room.topic", "", &content, &puppet)
                })
                .await;
            }
        }
    }

    async fn ha_config(&self, topic: &str, payload: &[u8]) {
        let Some(d) = ha_discovery(topic, payload) else { return };
        let mut new_topics = Vec::new();
        {
            let Ok(mut r) = self.router.write() else { return };
            let state_key = format!("{}/{}", d.device.key, d.entity);
            if let Some(t) = d.state_topic.clone() {
                let route = Route::Reading {
                    device: d.device.clone(),
                    state_key: state_key.clone(),
                };
                if r.learnt.insert(t.clone(), route.clone()) != Some(route) {
                    new_topics.push(t);
                }
            }
            if let Some(t) = d.availability_topic.clone() {
                let route = Route::Availability {
                    device: d.device.clone(),
                    state_key,
                };
                if r.learnt.insert(t.clone(), route.clone()) != Some(route) {
                    new_topics.push(t);
                }
            }
        }
        if !new_topics.is_empty() {
            let learnt = self.router.read().map(|r| r.learnt.clone()).unwrap_or_default();
            let mut st = self.state.lock().await;
            st.saved.learnt = learnt;
            if let Err(e) = st.save() {
                tracing::error!("state file: {e:#}");
            }
        }
        self.ensure_room(&d.device).await;
        for t in new_topics {
            if let Err(e) = self.mqtt.subscribe(t, QoS::AtLeastOnce).await {
                tracing::warn!("subscribe: {e}");
            }
        }
    }

    /// One event pushed by the homeserver: a command from an allowed
    /// sender in a device room becomes a publish; the result goes back to
    /// the room as a notice.
    async fn room_event(self: &Arc<Self>, ev: &Value) {
        let sender = ev["sender"].as_str().unwrap_or("");
        let room = ev["room_id"].as_str().unwrap_or("");
        // Invited (into a room of `bridge.spaces`, say): share there.
        if ev["type"] == "m.room.member"
            && ev["content"]["membership"] == "invite"
            && ev["state_key"].as_str() == Some(self.bot().as_str())
        {
            let bridge = self.clone();
            tokio::spawn(async move { bridge.share_all().await });
            return;
        }
        if sender.starts_with(&format!("@{PREFIX}")) || sender == self.hs.user_id(&self.cfg.appservice.sender_localpart)
        {
            return;
        }
        let content = &ev["content"];
        let (command, value) = match ev["type"].as_str() {
            Some(COMMAND_TYPE) => match content["command"].as_str() {
                Some(c) => (c.to_string(), content.get("value").cloned().unwrap_or(Value::Null)),
                None => return,
            },
            Some("m.room.message") if content["msgtype"] == "m.text" => {
                let Some(rest) = content["body"].as_str().and_then(|b| b.strip_prefix("!set ")) else {
                    return;
                };
                let mut it = rest.trim().splitn(2, ' ');
                let (Some(c), Some(v)) = (it.next(), it.next()) else {
                    return self
                        .notice(room, ev, None, "usage: !set <command> <value>", false)
                        .await;
                };
                (c.to_string(), command_value(v.trim()))
            }
            _ => return,
        };
        let Some(dr) = self.state.lock().await.device_of_room(room).cloned() else {
            return;
        };
        let allowed = self.cfg.bridge.command_senders.iter().any(|s| s == "*" || s == sender);
        if !allowed {
            let msg = format!("{sender} may not send commands to {}", dr.device.name);
            return self.notice(room, ev, Some(&dr.device.key), &msg, false).await;
        }
        let Some((topic, payload)) = dr.device.commands.as_ref().and_then(|c| c.publish(&command, &value)) else {
            let msg = format!("{} takes no command {command:?}", dr.device.name);
            return self.notice(room, ev, Some(&dr.device.key), &msg, false).await;
        };
        let text = String::from_utf8_lossy(&payload).into_owned();
        let (ok, msg) = match self.mqtt.publish(topic.clone(), QoS::AtLeastOnce, false, payload).await {
            Ok(()) => (true, format!("published to {topic}: {text}")),
            Err(e) => (false, format!("could not publish to {topic}: {e}")),
        };
        let mut extra = Map::new();
        extra.insert("topic".into(), Value::from(topic));
        extra.insert("payload".into(), Value::from(text));
        self.notice_with(room, ev, Some(&dr.device.key), &msg, ok, extra).await;
    }

    async fn notice(&self, room: &str, ev: &Value, device: Option<&str>, msg: &str, ok: bool) {
        self.notice_with(room, ev, device, msg, ok, Map::new()).await
    }

    async fn notice_with(
        &self,
        room: &str,
        ev: &Value,
        device: Option<&str>,
        msg: &str,
        ok: bool,
        extra: Map<String, Value>,
    ) {
        let Some(device) = device else { return };
        let event_id = ev["event_id"].as_str().unwrap_or("");
        let mut result = extra;
        result.insert("ok".into(), Value::Bool(ok));
        result.insert("event_id".into(), Value::from(event_id));
        let content = json!({
            "msgtype": "m.notice",
            "body": msg,
            "org.weft.command.result": result,
            "m.relates_to": {"m.in_reply_to": {"event_id": event_id}},
        });
        // Keyed by the command's event: a repeated transaction reports once.
        let txn = format!("cmd.{}", event_id.trim_start_matches('$'));
        let puppet = self.puppet(device);
        retry("command result", || {
            self.hs.send(room, "m.room.message", &txn, &content, &puppet)
        })
        .await;
    }
}

/// Adds the command topics of `new` (a Home Assistant entity) to `saved`;
/// true if anything changed.
fn merge_commands(saved: &mut Device, new: &Device) -> bool {
    match (&mut saved.commands, &new.commands) {
        (Some(Commands::PerEntity(a)), Some(Commands::PerEntity(b))) => {
            let before = a.len();
            let changed = b.iter().any(|(k, v)| a.get(k) != Some(v));
            a.extend(b.clone());
            changed || a.len() != before
        }
        (None, Some(c)) => {
            saved.commands = Some(c.clone());
            true
        }
        _ => false,
    }
}

/// The homeserver's token check, in front of every `/_matrix/app` route:
/// the right `hs_token` (`Authorization: Bearer`, or the older
/// `?access_token=`) passes; else the spec's answer, 401 `M_UNAUTHORIZED`
/// without a token, 403 `M_FORBIDDEN` for a wrong one.
async fn require_hs_token(
    AxState(b): AxState<Arc<Bridge>>,
    Query(q): Query<HashMap<String, String>>,
    h: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let given = h
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or(q.get("access_token").map(String::as_str));
    match given {
        None => (
            StatusCode::UNAUTHORIZED,
            Json(json!({"errcode": "M_UNAUTHORIZED", "error": "no hs_token"})),
        )
            .into_response(),
        Some(t) if constant_eq(t.as_bytes(), b.cfg.appservice.hs_token.as_bytes()) => next.run(req).await,
        Some(_) => (
            StatusCode::FORBIDDEN,
            Json(json!({"errcode": "M_FORBIDDEN", "error": "wrong hs_token"})),
        )
            .into_response(),
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn transaction(
    AxState(b): AxState<Arc<Bridge>>,
    UrlPath(txn): UrlPath<String>,
    body: axum::body::Bytes,
) -> (StatusCode, Json<Value>) {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"errcode": "M_NOT_JSON", "error": "not JSON"})),
        );
    };
    {
        let Ok(mut seen) = b.seen_txns.lock() else {
            return (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({})));
        };
        if seen.contains(&txn) {
            return (StatusCode::OK, Json(json!({})));
        }
        seen.push_back(txn);
        if seen.len() > 1000 {
            seen.pop_front();
        }
    }
    // Handled in order by the command worker, after the answer (the
    // homeserver is not kept waiting for the broker).
    for ev in body["events"].as_array().into_iter().flatten() {
        let _ = b.commands.send(ev.clone());
    }
    (StatusCode::OK, Json(json!({})))
}

async fn ping() -> Json<Value> {
    Json(json!({}))
}

async fn not_found() -> (StatusCode, Json<Value>) {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"errcode": "M_NOT_FOUND", "error": "rooms are made when a device first publishes"})),
    )
}
