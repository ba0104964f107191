//! End-to-end tests: the real `matrix-sdk` client (in-memory stores, E2EE
//! support compiled in) against the real `weft serve` binary on 127.0.0.1.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use matrix_sdk::config::SyncSettings;
use matrix_sdk::ruma::api::client::account::register;
use matrix_sdk::ruma::api::client::room::create_room;
use matrix_sdk::ruma::api::client::uiaa;
use matrix_sdk::ruma::events::room::message::{MessageType, OriginalSyncRoomMessageEvent, RoomMessageEventContent};
use matrix_sdk::ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};
use matrix_sdk::{Client, Room, RoomState};
use sdk_tests::{PASSWORD, POLL, WAIT, sync_until};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use weft_testkit::TestServer;

const SERVER_NAME: &str = "localhost:8008";

fn init_logging() {
    sdk_tests::init_logging("warn");
}

fn user_id(local: &str) -> OwnedUserId {
    UserId::parse(format!("@{local}:{SERVER_NAME}")).expect("valid user id")
}

async fn new_client(server: &TestServer) -> Result<Client> {
    Client::builder()
        .homeserver_url(server.base_url())
        .build()
        .await
        .context("building matrix-sdk client")
}

async fn login(server: &TestServer, name: &str) -> Result<Client> {
    let client = new_client(server).await?;
    let resp = client
        .matrix_auth()
        .login_username(name, PASSWORD)
        .initial_device_display_name("weft sdk test")
        .send()
        .await
        .with_context(|| format!("password login of {name}"))?;
    ensure!(
        resp.user_id == user_id(name),
        "login returned user_id {}, expected {}",
        resp.user_id,
        user_id(name)
    );
    Ok(client)
}

/// Registers `name` through the SDK, completing an `m.login.dummy` UIA stage
/// if the server asks for one (open registration).
async fn register(client: &Client, name: &str) -> Result<register::v3::Response> {
    let request = |auth: Option<uiaa::AuthData>| {
        let mut req = register::v3::Request::new();
        req.username = Some(name.to_owned());
        req.password = Some(PASSWORD.to_owned());
        req.initial_device_display_name = Some("weft sdk test".to_owned());
        req.auth = auth;
        req
    };
    match client.matrix_auth().register(request(None)).await {
        Ok(resp) => Ok(resp),
        Err(err) => {
            let info = err
                .as_uiaa_response()
                .ok_or_else(|| anyhow!("registration failed without a UIA challenge: {err}"))?;
            ensure!(
                info.flows.iter().any(|f| f.stages.contains(&uiaa::AuthType::Dummy)),
                "open registration should offer an m.login.dummy flow, got {:?}",
                info.flows
            );
            let mut dummy = uiaa::Dummy::new();
            dummy.session = info.session.clone();
            client
                .matrix_auth()
                .register(request(Some(uiaa::AuthData::Dummy(dummy))))
                .await
                .context("registration with m.login.dummy")
        }
    }
}

/// Long-polls `/sync` until `done` returns true, bounded by [`WAIT`].
async fn sync_one_until(
    client: &Client,
    what: &str,
    mut done: impl FnMut(&matrix_sdk::sync::SyncResponse) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let resp = client
            .sync_once(SyncSettings::default().timeout(POLL))
            .await
            .with_context(|| format!("sync while waiting for {what}"))?;
        if done(&resp) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {WAIT:?} waiting for {what}");
        }
    }
}

/// The timeline events of `room` in a sync response, as JSON.
fn timeline_json(resp: &matrix_sdk::sync::SyncResponse, room: &RoomId) -> Vec<Value> {
    resp.rooms
        .joined
        .get(room)
        .map(|update| {
            update
                .timeline
                .events
                .iter()
                .map(|ev| serde_json::from_str(ev.raw().json().get()).expect("event is JSON"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_registers_logs_in_and_whoami() -> Result<()> {
    init_logging();
    let server = sdk_tests::weft().start().await;

    // Registration through the SDK logs the client in.
    let client = new_client(&server).await?;
    let resp = register(&client, "carol").await?;
    assert_eq!(resp.user_id, user_id("carol"));
    assert!(resp.access_token.is_some(), "register should return a token");
    assert_eq!(client.user_id(), Some(&*user_id("carol")));
    let who = client.whoami().await.context("whoami after register")?;
    assert_eq!(who.user_id, user_id("carol"));
    assert_eq!(who.device_id, resp.device_id);

    // A second device logs in with the password.
    let second = login(&server, "carol").await?;
    let who2 = second.whoami().await.context("whoami after login")?;
    assert_eq!(who2.user_id, user_id("carol"));
    assert!(who2.device_id.is_some(), "whoami should report the device");
    assert_ne!(who2.device_id, who.device_id, "a new login should get a new device");
    assert!(!who2.is_guest);

    // Wrong password is refused.
    let bad = new_client(&server).await?;
    let err = bad
        .matrix_auth()
        .login_username("carol", "wrong password")
        .send()
        .await
        .expect_err("login with a wrong password must fail");
    assert_eq!(
        err.as_client_api_error().map(|e| e.status_code.as_u16()),
        Some(403),
        "wrong password: {err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_room_message_and_telemetry_roundtrip() -> Result<()> {
    init_logging();
    // Users made with the admin CLI before the server starts.
    let server = sdk_tests::weft_with_alice_and_bob().start().await;

    let alice = login(&server, "alice").await?;
    let bob = login(&server, "bob").await?;
    assert_eq!(alice.whoami().await?.user_id, user_id("alice"));
    assert_eq!(bob.whoami().await?.user_id, user_id("bob"));

    // Initial syncs (also flushes the SDK's E2EE key uploads).
    alice
        .sync_once(SyncSettings::default())
        .await
        .context("alice initial sync")?;
    bob.sync_once(SyncSettings::default())
        .await
        .context("bob initial sync")?;

    // Typed handler: bob's client should decode the text message itself.
    let (text_tx, mut text_rx) = mpsc::unbounded_channel::<(OwnedEventId, String)>();
    bob.add_event_handler(move |ev: OriginalSyncRoomMessageEvent| {
        let text_tx = text_tx.clone();
        async move {
            if let MessageType::Text(text) = ev.content.msgtype {
                let _ = text_tx.send((ev.event_id, text.body));
            }
        }
    });

    // alice creates a room and invites bob.
    let mut req = create_room::v3::Request::new();
    req.name = Some("weft sdk test".to_owned());
    let room = alice.create_room(req).await.context("createRoom")?;
    let room_id: OwnedRoomId = room.room_id().to_owned();
    room.invite_user_by_id(&user_id("bob")).await.context("invite bob")?;

    // bob sees the invite and joins.
    sync_one_until(&bob, "bob's invite", |r| r.rooms.invited.contains_key(&room_id)).await?;
    let invited = bob.get_room(&room_id).context("bob knows the invited room")?;
    assert_eq!(invited.state(), RoomState::Invited);
    let joined: Room = bob.join_room_by_id(&room_id).await.context("bob joins")?;
    assert_eq!(joined.state(), RoomState::Joined);

    // alice waits for bob's join to be reflected in her sync.
    let bob_id = user_id("bob");
    sync_one_until(&alice, "bob's join in alice's timeline", |r| {
        timeline_json(r, &room_id).iter().any(|ev| {
            ev["type"] == "m.room.member" && ev["state_key"] == bob_id.as_str() && ev["content"]["membership"] == "join"
        })
    })
    .await?;

    // alice sends a text message, then a custom telemetry event.
    let text_id = room
        .send(RoomMessageEventContent::text_plain("hello bob"))
        .await
        .context("send m.room.message")?
        .response
        .event_id;
    let telemetry = json!({
        "device_id": "sensor-17",
        "metric": "temperature",
        "value_milli_c": 21_375,
        "seq": 1,
    });
    let telemetry_id = room
        .send_raw("org.weft.telemetry", telemetry.clone())
        .await
        .context("send org.weft.telemetry")?
        .response
        .event_id;
    assert_ne!(text_id, telemetry_id);

    // bob receives both, in order.
    let mut received: Vec<Value> = Vec::new();
    sync_one_until(&bob, "alice's two events", |r| {
        received.extend(timeline_json(r, &room_id));
        received.iter().any(|ev| ev["event_id"] == telemetry_id.as_str())
    })
    .await?;
    let ours: Vec<&Value> = received
        .iter()
        .filter(|ev| ev["sender"] == user_id("alice").as_str() && ev.get("state_key").is_none())
        .collect();
    assert_eq!(ours.len(), 2, "expected exactly alice's two messages, got {ours:#?}");
    let (msg, tel) = (ours[0], ours[1]);
    assert_eq!(msg["event_id"], text_id.as_str(), "text message comes first");
    assert_eq!(msg["type"], "m.room.message");
    assert_eq!(msg["content"]["msgtype"], "m.text");
    assert_eq!(msg["content"]["body"], "hello bob");
    assert_eq!(tel["event_id"], telemetry_id.as_str(), "telemetry comes second");
    assert_eq!(tel["type"], "org.weft.telemetry");
    assert_eq!(tel["content"], telemetry);
    assert!(tel["origin_server_ts"].as_u64().is_some());

    // The typed event handler fired for the text message.
    let (handled_id, body) = tokio::time::timeout(Duration::from_secs(5), text_rx.recv())
        .await
        .context("event handler did not fire")?
        .context("handler channel closed")?;
    assert_eq!(handled_id, text_id);
    assert_eq!(body, "hello bob");

    // Both see each other as joined members.
    let members = joined
        .members(matrix_sdk::RoomMemberships::JOIN)
        .await
        .context("bob lists members")?;
    let mut ids: Vec<String> = members.iter().map(|m| m.user_id().to_string()).collect();
    ids.sort();
    assert_eq!(ids, vec![user_id("alice").to_string(), bob_id.to_string()]);
    Ok(())
}

// ------------------------------------------------------------------------
// End-to-end encryption. matrix-sdk (feature e2e-encryption) uploads device
// and one-time keys after login and queries keys of users it tracks; an
// encrypted room additionally needs /keys/claim, /sendToDevice and
// `to_device` + `device_lists` in /sync.
// ------------------------------------------------------------------------

/// Logs `name` in and runs one sync so the SDK uploads its device keys.
async fn login_and_upload_keys(server: &TestServer, name: &str) -> Result<Client> {
    let client = login(server, name).await?;
    client
        .sync_once(SyncSettings::default())
        .await
        .with_context(|| format!("{name} initial sync"))?;
    Ok(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_e2ee_device_keys_are_published() -> Result<()> {
    use std::collections::BTreeMap;

    use matrix_sdk::ruma::OneTimeKeyAlgorithm;
    use matrix_sdk::ruma::api::client::keys::{claim_keys, get_keys};

    init_logging();
    let server = sdk_tests::weft_with_alice_and_bob().start().await;
    let alice = login_and_upload_keys(&server, "alice").await?;
    let bob = login_and_upload_keys(&server, "bob").await?;

    let alice_id = user_id("alice");
    let alice_device = alice.device_id().context("alice has a device")?.to_owned();
    let alice_ed25519 = alice
        .encryption()
        .ed25519_key()
        .await
        .context("alice has an ed25519 key")?;

    // bob sees alice's device keys, signed by her device.
    let mut query = get_keys::v3::Request::new();
    query.device_keys.insert(alice_id.clone(), vec![]);
    let resp = bob.send(query).await.context("POST /keys/query")?;
    let raw = resp
        .device_keys
        .get(&alice_id)
        .and_then(|devices| devices.get(&alice_device))
        .with_context(|| format!("/keys/query lacks alice's device: {:?}", resp.device_keys))?;
    let keys: Value = serde_json::from_str(raw.json().get())?;
    assert_eq!(keys["user_id"], alice_id.as_str());
    assert_eq!(keys["device_id"], alice_device.as_str());
    assert_eq!(keys["keys"][format!("ed25519:{alice_device}")], alice_ed25519);
    assert!(keys["keys"][format!("curve25519:{alice_device}")].is_string());
    assert!(
        keys["signatures"][alice_id.as_str()][format!("ed25519:{alice_device}")].is_string(),
        "device keys must keep the device's signature: {keys}"
    );

    // bob can claim one of alice's one-time keys.
    let mut wanted = BTreeMap::new();
    wanted.insert(
        alice_id.clone(),
        BTreeMap::from([(alice_device.clone(), OneTimeKeyAlgorithm::SignedCurve25519)]),
    );
    let claimed = bob
        .send(claim_keys::v3::Request::new(wanted))
        .await
        .context("POST /keys/claim")?;
    let otks = claimed
        .one_time_keys
        .get(&alice_id)
        .and_then(|d| d.get(&alice_device))
        .context("no one-time key claimed for alice's device")?;
    assert_eq!(otks.len(), 1, "exactly one key per device: {otks:?}");
    let key_id = otks.keys().next().expect("one key").to_string();
    assert!(key_id.starts_with("signed_curve25519:"), "{key_id}");
    Ok(())
}

/// A room alice creates (encrypted or not) with bob invited; returns once
/// bob has joined and alice's client has seen the join: (alice's room,
/// bob's room).
async fn room_with_bob(alice: &Client, bob: &Client, encrypted: bool) -> Result<(Room, Room)> {
    use matrix_sdk::ruma::events::InitialStateEvent;
    use matrix_sdk::ruma::events::room::encryption::RoomEncryptionEventContent;

    let mut req = create_room::v3::Request::new();
    req.invite = vec![user_id("bob")];
    if encrypted {
        req.initial_state = vec![
            InitialStateEvent::with_empty_state_key(RoomEncryptionEventContent::with_recommended_defaults())
                .to_raw_any(),
        ];
    }
    let room = alice.create_room(req).await.context("create room")?;
    let room_id = room.room_id().to_owned();
    sync_one_until(bob, "bob's invite", |r| r.rooms.invited.contains_key(&room_id)).await?;
    let bob_room = bob.join_room_by_id(&room_id).await.context("bob joins")?;
    let bob_id = user_id("bob");
    sync_one_until(alice, "bob's join", |r| {
        timeline_json(r, &room_id).iter().any(|ev| {
            ev["type"] == "m.room.member" && ev["state_key"] == bob_id.as_str() && ev["content"]["membership"] == "join"
        })
    })
    .await?;
    Ok((room, bob_room))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_e2ee_encrypted_room_roundtrip() -> Result<()> {
    init_logging();
    let server = sdk_tests::weft_with_alice_and_bob().start().await;
    let alice = login_and_upload_keys(&server, "alice").await?;
    let bob = login_and_upload_keys(&server, "bob").await?;

    let (text_tx, mut text_rx) = mpsc::unbounded_channel::<String>();
    bob.add_event_handler(move |ev: OriginalSyncRoomMessageEvent| {
        let text_tx = text_tx.clone();
        async move {
            if let MessageType::Text(text) = ev.content.msgtype {
                let _ = text_tx.send(text.body);
            }
        }
    });

    let (room, _) = room_with_bob(&alice, &bob, true).await?;
    let room_id = room.room_id().to_owned();
    assert!(room.latest_encryption_state().await?.is_encrypted());

    // The SDK encrypts (Megolm) and shares the room key with bob's device
    // over Olm to-device messages.
    room.send(RoomMessageEventContent::text_plain("secret hello"))
        .await
        .context("send encrypted message")?;

    // bob's client decrypts it.
    let mut decrypted = 0;
    sync_one_until(&bob, "the encrypted message", |r| {
        if let Some(update) = r.rooms.joined.get(&room_id) {
            decrypted += update
                .timeline
                .events
                .iter()
                .filter(|ev| ev.encryption_info().is_some())
                .count();
        }
        !text_rx.is_empty()
    })
    .await?;
    assert_eq!(decrypted, 1, "bob's client should have decrypted one event");
    assert_eq!(text_rx.recv().await.as_deref(), Some("secret hello"));
    Ok(())
}

/// Bootstraps cross-signing, completing `m.login.password` UIA if asked.
/// Returns whether the server asked for UIA.
async fn bootstrap_cross_signing(client: &Client, name: &str) -> Result<bool> {
    match client.encryption().bootstrap_cross_signing(None).await {
        Ok(()) => Ok(false),
        Err(err) => {
            let info = err
                .as_uiaa_response()
                .ok_or_else(|| anyhow!("cross-signing bootstrap failed without a UIA challenge: {err}"))?;
            let mut password = uiaa::Password::new(
                uiaa::UserIdentifier::Matrix(uiaa::MatrixUserIdentifier::new(name.to_owned())),
                PASSWORD.to_owned(),
            );
            password.session = info.session.clone();
            client
                .encryption()
                .bootstrap_cross_signing(Some(uiaa::AuthData::Password(password)))
                .await
                .context("cross-signing bootstrap with m.login.password")?;
            Ok(true)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_e2ee_cross_signing_is_published() -> Result<()> {
    init_logging();
    let server = sdk_tests::weft_with_alice_and_bob().start().await;
    let alice = login_and_upload_keys(&server, "alice").await?;
    let bob = login_and_upload_keys(&server, "bob").await?;
    let alice_id = user_id("alice");

    // The first upload of cross-signing keys needs no re-authentication.
    let asked = bootstrap_cross_signing(&alice, "alice").await?;
    assert!(!asked, "first cross-signing upload should not need UIA");
    let status = alice
        .encryption()
        .cross_signing_status()
        .await
        .context("cross-signing status")?;
    assert!(status.is_complete(), "{status:?}");

    // bob fetches alice's identity; her device is signed by it (the
    // self-signing key's signature was uploaded via /keys/signatures/upload).
    let identity = bob
        .encryption()
        .request_user_identity(&alice_id)
        .await
        .context("request alice's identity")?
        .context("alice has a cross-signing identity")?;
    let own = alice
        .encryption()
        .get_user_identity(&alice_id)
        .await?
        .context("alice knows her own identity")?;
    assert_eq!(
        identity.master_key().get_first_key(),
        own.master_key().get_first_key(),
        "bob sees alice's master key"
    );
    let alice_device = alice.device_id().context("alice has a device")?.to_owned();
    let seen = bob
        .encryption()
        .get_device(&alice_id, &alice_device)
        .await?
        .context("bob knows alice's device")?;
    assert!(
        seen.is_cross_signed_by_owner(),
        "alice's device should carry her self-signing key's signature"
    );

    // Replacing the identity needs the password.
    use matrix_sdk::encryption::CrossSigningResetAuthType;
    let handle = alice
        .encryption()
        .reset_cross_signing()
        .await
        .context("reset cross-signing")?
        .context("replacing cross-signing keys must ask for UIA")?;
    let CrossSigningResetAuthType::Uiaa(info) = handle.auth_type() else {
        bail!("expected UIA to reset cross-signing");
    };
    let mut password = uiaa::Password::new(
        uiaa::UserIdentifier::Matrix(uiaa::MatrixUserIdentifier::new("alice".to_owned())),
        PASSWORD.to_owned(),
    );
    password.session = info.session.clone();
    handle
        .auth(Some(uiaa::AuthData::Password(password)))
        .await
        .context("reset with m.login.password")?;
    let renewed = bob
        .encryption()
        .request_user_identity(&alice_id)
        .await?
        .context("alice still has an identity")?;
    assert_ne!(
        renewed.master_key().get_first_key(),
        identity.master_key().get_first_key(),
        "bob sees alice's new master key"
    );
    Ok(())
}

// An unnamed room of two: matrix-sdk names it after the other member, from
// the room summary (`m.heroes`, member counts) that the incremental sync
// carrying bob's join updates, not "Empty Room".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_names_an_unnamed_two_member_room_after_the_other_member() -> Result<()> {
    init_logging();
    let server = sdk_tests::weft_with_alice_and_bob().start().await;
    let alice = login(&server, "alice").await?;
    let bob = login(&server, "bob").await?;
    alice
        .sync_once(SyncSettings::default())
        .await
        .context("alice initial sync")?;
    bob.sync_once(SyncSettings::default())
        .await
        .context("bob initial sync")?;

    let room = alice
        .create_room(create_room::v3::Request::new())
        .await
        .context("createRoom")?;
    let room_id: OwnedRoomId = room.room_id().to_owned();
    // Synced while alice is alone in it: the summary says one member.
    sync_one_until(&alice, "alice's new room", |r| r.rooms.joined.contains_key(&room_id)).await?;
    room.invite_user_by_id(&user_id("bob")).await.context("invite bob")?;
    sync_one_until(&bob, "bob's invite", |r| r.rooms.invited.contains_key(&room_id)).await?;
    bob.join_room_by_id(&room_id).await.context("bob joins")?;
    let bob_id = user_id("bob");
    sync_one_until(&alice, "bob's join in alice's timeline", |r| {
        timeline_json(r, &room_id).iter().any(|ev| {
            ev["type"] == "m.room.member" && ev["state_key"] == bob_id.as_str() && ev["content"]["membership"] == "join"
        })
    })
    .await?;

    let name = room.display_name().await.context("alice's display name of the room")?;
    match &name {
        matrix_sdk::RoomDisplayName::Calculated(n) => {
            ensure!(n.contains("bob"), "room named {n:?}, not after bob")
        }
        other => bail!("unnamed room of alice and bob shown as {other:?}"),
    }
    ensure!(
        room.joined_members_count() == 2,
        "alice's client counts {} joined members",
        room.joined_members_count()
    );
    Ok(())
}

// Server-side key backup (`/room_keys/*`): alice's first device backs up the
// room key of bob's encrypted message and sets up recovery (secret storage
// in account data); a fresh login of alice with an empty store recovers with
// the recovery key, downloads the room's keys from the backup and decrypts
// bob's message, which no device of hers shared a key for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_e2ee_key_backup_restores_on_a_new_device() -> Result<()> {
    use matrix_sdk::encryption::backups::BackupState;
    use matrix_sdk::encryption::recovery::RecoveryState;

    init_logging();
    let server = sdk_tests::weft_with_alice_and_bob().start().await;
    let alice = login_and_upload_keys(&server, "alice").await?;
    let bob = login_and_upload_keys(&server, "bob").await?;

    let (room, bob_room) = room_with_bob(&alice, &bob, true).await?;
    let room_id = room.room_id().to_owned();
    sync_one_until(&bob, "the room's encryption state", |_| true).await?;
    ensure!(
        bob_room.latest_encryption_state().await?.is_encrypted(),
        "bob should see the room as encrypted"
    );

    // bob sends; alice's first device gets the room key over to-device and
    // decrypts the message.
    const BODY: &str = "backed-up secret from bob";
    let event_id = bob_room
        .send(RoomMessageEventContent::text_plain(BODY))
        .await
        .context("bob sends an encrypted message")?
        .response
        .event_id;
    let mut seen: Option<Value> = None;
    sync_one_until(&alice, "bob's encrypted message", |r| {
        if let Some(update) = r.rooms.joined.get(&room_id) {
            for ev in &update.timeline.events {
                let json: Value = serde_json::from_str(ev.raw().json().get()).expect("event is JSON");
                if json["event_id"] == event_id.as_str() && ev.encryption_info().is_some() {
                    seen = Some(json);
                }
            }
        }
        seen.is_some()
    })
    .await?;
    let seen = seen.expect("set by sync_until");
    assert_eq!(seen["type"], "m.room.message", "alice's first device decrypts: {seen}");
    assert_eq!(seen["content"]["body"], BODY);

    // Cross-signing (its private keys go into secret storage too), backup
    // + secret storage; then wait until the room key is uploaded.
    bootstrap_cross_signing(&alice, "alice").await?;
    let recovery_key = alice
        .encryption()
        .recovery()
        .enable()
        .await
        .context("enable recovery (creates the backup)")?;
    alice
        .encryption()
        .backups()
        .wait_for_steady_state()
        .await
        .context("room keys uploaded to the backup")?;
    assert_eq!(alice.encryption().backups().state(), BackupState::Enabled);
    assert_eq!(alice.encryption().recovery().state(), RecoveryState::Enabled);

    // Over plain HTTP: the server holds the backup and at least that key.
    let http = server.with_token(&alice.access_token().context("alice's token")?);
    let (st, version) = http.get("room_keys/version").await;
    assert_eq!(st, 200, "{version}");
    assert_eq!(version["algorithm"], "m.megolm_backup.v1.curve25519-aes-sha2");
    let count = version["count"].as_u64().context("count is a number")?;
    assert!(count >= 1, "the room key should be backed up: {version}");
    let backup_version = version["version"].as_str().context("version string")?.to_owned();
    let (st, keys) = http
        .get(&format!("room_keys/keys/{room_id}?version={backup_version}"))
        .await;
    assert_eq!(st, 200, "{keys}");
    assert!(
        keys["sessions"].as_object().is_some_and(|s| !s.is_empty()),
        "the room's sessions should be in the backup: {keys}"
    );

    // A new device of alice (fresh in-memory store): not able to decrypt
    // until it recovers.
    let fresh = login_and_upload_keys(&server, "alice").await?;
    ensure!(fresh.device_id() != alice.device_id(), "a new login is a new device");
    let fresh_room = fresh.get_room(&room_id).context("the new device knows the room")?;
    let before = fresh_room.event(&event_id, None).await.context("fetch bob's event")?;
    let before_json: Value = serde_json::from_str(before.raw().json().get())?;
    assert_eq!(
        before_json["type"], "m.room.encrypted",
        "without the backup the new device cannot decrypt: {before_json}"
    );

    fresh
        .encryption()
        .recovery()
        .recover(&recovery_key)
        .await
        .context("recover with the recovery key")?;
    assert_eq!(fresh.encryption().recovery().state(), RecoveryState::Enabled);
    fresh
        .encryption()
        .backups()
        .download_room_keys_for_room(&room_id)
        .await
        .context("download the room's keys from the backup")?;

    let after = fresh_room
        .event(&event_id, None)
        .await
        .context("fetch bob's event again")?;
    let after_json: Value = serde_json::from_str(after.raw().json().get())?;
    assert!(
        after.encryption_info().is_some(),
        "decrypted with a backed-up key: {after_json}"
    );
    assert_eq!(after_json["type"], "m.room.message", "{after_json}");
    assert_eq!(after_json["content"]["body"], BODY);
    assert_eq!(after_json["sender"], user_id("bob").as_str());
    Ok(())
}

/// The number of signed_curve25519 one-time keys the server holds for the
/// device of `client` (an empty `/keys/upload`, over plain HTTP).
async fn otk_count(server: &TestServer, client: &Client) -> Result<u64> {
    let http = server.with_token(&client.access_token().context("token")?);
    let (st, body) = http.post("keys/upload", json!({})).await;
    ensure!(st == 200, "empty /keys/upload: {st} {body}");
    Ok(body["one_time_key_counts"]["signed_curve25519"].as_u64().unwrap_or(0))
}

// A second device of alice joins an encrypted room's conversation: bob's
// client sees alice's device list change and lists the new device; alice's
// first device (which bootstrapped cross-signing) and the new one verify
// each other by interactive SAS over to-device messages (same emoji on both
// sides, both confirm), which cross-signs the new device; bob and the new
// device then see it signed by alice's identity; bob's next message claims
// one of the new device's one-time keys and the new device decrypts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_e2ee_second_device_is_verified_by_sas_and_decrypts() -> Result<()> {
    use matrix_sdk::encryption::verification::Verification;
    use matrix_sdk::ruma::events::InitialStateEvent;
    use matrix_sdk::ruma::events::room::encryption::RoomEncryptionEventContent;

    init_logging();
    let server = sdk_tests::weft_with_alice_and_bob().start().await;
    let alice = login_and_upload_keys(&server, "alice").await?;
    let bob = login_and_upload_keys(&server, "bob").await?;
    let alice_id = user_id("alice");
    let bob_id = user_id("bob");
    bootstrap_cross_signing(&alice, "alice").await?;

    // The encrypted room of alice and bob.
    let mut req = create_room::v3::Request::new();
    req.invite = vec![bob_id.clone()];
    req.initial_state = vec![
        InitialStateEvent::with_empty_state_key(RoomEncryptionEventContent::with_recommended_defaults()).to_raw_any(),
    ];
    let room = alice.create_room(req).await.context("create encrypted room")?;
    let room_id = room.room_id().to_owned();
    sync_one_until(&bob, "bob's invite", |r| r.rooms.invited.contains_key(&room_id)).await?;
    let bob_room = bob.join_room_by_id(&room_id).await.context("bob joins")?;
    sync_one_until(&alice, "bob's join", |r| {
        timeline_json(r, &room_id).iter().any(|ev| {
            ev["type"] == "m.room.member" && ev["state_key"] == bob_id.as_str() && ev["content"]["membership"] == "join"
        })
    })
    .await?;
    sync_one_until(&bob, "the room's encryption state", |_| true).await?;
    ensure!(bob_room.latest_encryption_state().await?.is_encrypted());
    let first_id = alice.device_id().context("alice's first device")?.to_owned();
    let bob_devices = bob.encryption().get_user_devices(&alice_id).await?;
    let listed: Vec<String> = bob_devices.keys().map(|d| d.to_string()).collect();
    assert_eq!(listed, vec![first_id.to_string()], "bob knows alice's one device");

    // alice logs in a second device.
    let second = login_and_upload_keys(&server, "alice").await?;
    let second_id = second.device_id().context("alice's second device")?.to_owned();
    ensure!(second_id != first_id, "a new login is a new device");

    // bob's client hears of alice's device list change and lists it.
    sync_until(&[&bob], "bob's client to list alice's new device", || async {
        Ok(bob.encryption().get_device(&alice_id, &second_id).await?.is_some())
    })
    .await?;
    let mut listed: Vec<String> = bob
        .encryption()
        .get_user_devices(&alice_id)
        .await?
        .keys()
        .map(|d| d.to_string())
        .collect();
    listed.sort();
    let mut expected = vec![first_id.to_string(), second_id.to_string()];
    expected.sort();
    assert_eq!(listed, expected, "bob lists both of alice's devices");
    let unverified = bob
        .encryption()
        .get_device(&alice_id, &second_id)
        .await?
        .context("new device")?;
    assert!(
        !unverified.is_cross_signed_by_owner(),
        "the new device is not cross-signed before verification"
    );

    // Both of alice's devices know each other.
    sync_until(&[&alice, &second], "alice's devices to know each other", || async {
        Ok(alice.encryption().get_device(&alice_id, &second_id).await?.is_some()
            && second.encryption().get_device(&alice_id, &first_id).await?.is_some())
    })
    .await?;

    // The new device asks the first one to verify it (m.key.verification.request).
    let request = second
        .encryption()
        .get_device(&alice_id, &first_id)
        .await?
        .context("the first device, seen by the second")?
        .request_verification()
        .await
        .context("request verification")?;
    let flow_id = request.flow_id().to_owned();
    ensure!(
        request.is_self_verification(),
        "a verification between alice's own devices"
    );

    // The first device receives it over to-device and accepts (ready).
    sync_until(&[&alice], "the verification request on the first device", || async {
        Ok(alice
            .encryption()
            .get_verification_request(&alice_id, &flow_id)
            .await
            .is_some())
    })
    .await?;
    let incoming = alice
        .encryption()
        .get_verification_request(&alice_id, &flow_id)
        .await
        .context("the request on the first device")?;
    ensure!(!incoming.we_started());
    incoming.accept().await.context("accept the request")?;

    // The new device sees it ready and starts SAS.
    sync_until(&[&second], "the request to be ready on the new device", || async {
        Ok(request.is_ready())
    })
    .await?;
    let second_sas = request
        .start_sas()
        .await
        .context("start SAS")?
        .context("SAS should start on a ready request")?;

    // The first device accepts the SAS start.
    sync_until(&[&alice], "the SAS start on the first device", || async {
        Ok(alice.encryption().get_verification(&alice_id, &flow_id).await.is_some())
    })
    .await?;
    let first_sas = match alice.encryption().get_verification(&alice_id, &flow_id).await {
        Some(Verification::SasV1(sas)) => sas,
        _ => bail!("the first device's verification is not SAS"),
    };
    first_sas.accept().await.context("accept SAS")?;

    // Keys are exchanged: both sides show the same emoji.
    sync_until(&[&alice, &second], "both sides to show the emoji", || async {
        Ok(first_sas.can_be_presented() && second_sas.can_be_presented())
    })
    .await?;
    let symbols = |sas: &matrix_sdk::encryption::verification::SasVerification| -> Vec<&'static str> {
        sas.emoji()
            .map(|e| e.iter().map(|e| e.symbol).collect())
            .unwrap_or_default()
    };
    let shown = symbols(&first_sas);
    assert_eq!(shown.len(), 7, "seven emoji: {shown:?}");
    assert_eq!(shown, symbols(&second_sas), "both devices show the same emoji");

    // Both confirm; the MACs and done go over to-device.
    first_sas.confirm().await.context("first device confirms")?;
    second_sas.confirm().await.context("second device confirms")?;
    sync_until(&[&alice, &second], "both sides to finish SAS", || async {
        Ok(first_sas.is_done() && second_sas.is_done())
    })
    .await?;
    ensure!(!first_sas.is_cancelled() && !second_sas.is_cancelled());
    let on_first = alice
        .encryption()
        .get_device(&alice_id, &second_id)
        .await?
        .context("new device")?;
    let on_second = second
        .encryption()
        .get_device(&alice_id, &first_id)
        .await?
        .context("first device")?;
    assert!(on_first.is_verified(), "the first device trusts the new one");
    assert!(on_second.is_verified(), "the new device trusts the first one");

    // The first device signed the new one with its self-signing key: bob and
    // the new device see it cross-signed by alice's identity.
    sync_until(&[&bob, &second], "the new device's cross-signature", || async {
        let by_bob = bob.encryption().get_device(&alice_id, &second_id).await?;
        let by_second = second.encryption().get_device(&alice_id, &second_id).await?;
        Ok(by_bob.is_some_and(|d| d.is_cross_signed_by_owner())
            && by_second.is_some_and(|d| d.is_cross_signed_by_owner()))
    })
    .await?;
    let own = second
        .encryption()
        .get_device(&alice_id, &second_id)
        .await?
        .context("own device")?;
    assert!(
        own.is_verified(),
        "the new device trusts itself through alice's verified identity"
    );

    // bob's message: his client claims one of the new device's one-time
    // keys (the new device does not sync meanwhile, so it uploads none)
    // and shares the room key with it.
    let before = otk_count(&server, &second).await?;
    ensure!(before > 0, "the new device uploaded one-time keys");
    const BODY: &str = "for both of alice's devices";
    let event_id = bob_room
        .send(RoomMessageEventContent::text_plain(BODY))
        .await
        .context("bob sends an encrypted message")?
        .response
        .event_id;
    let after = otk_count(&server, &second).await?;
    assert_eq!(after, before - 1, "bob's client claimed one key of the new device");

    let mut seen: Option<Value> = None;
    sync_one_until(&second, "bob's message on the new device", |r| {
        if let Some(update) = r.rooms.joined.get(&room_id) {
            for ev in &update.timeline.events {
                let json: Value = serde_json::from_str(ev.raw().json().get()).expect("event is JSON");
                if json["event_id"] == event_id.as_str() && ev.encryption_info().is_some() {
                    seen = Some(json);
                }
            }
        }
        seen.is_some()
    })
    .await?;
    let seen = seen.expect("set by sync_until");
    assert_eq!(seen["type"], "m.room.message", "the new device decrypts: {seen}");
    assert_eq!(seen["content"]["body"], BODY);
    assert_eq!(seen["sender"], bob_id.as_str());
    Ok(())
}

/// matrix-sdk sends an attachment through Weft's media repository and the
/// other member's client downloads it byte for byte: in a plain room, and
/// in an encrypted room (where the server only ever holds ciphertext).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_attachments_plain_and_encrypted_round_trip() -> Result<()> {
    use matrix_sdk::attachment::AttachmentConfig;
    use matrix_sdk::media::{MediaFormat, MediaRequestParameters};
    use matrix_sdk::ruma::events::room::MediaSource;

    init_logging();
    let server = sdk_tests::weft_with_alice_and_bob().start().await;
    let alice = login_and_upload_keys(&server, "alice").await?;
    let bob = login_and_upload_keys(&server, "bob").await?;
    let (file_tx, mut file_rx) = mpsc::unbounded_channel::<(String, MediaSource)>();
    bob.add_event_handler(move |ev: OriginalSyncRoomMessageEvent| {
        let file_tx = file_tx.clone();
        async move {
            if let MessageType::File(f) = ev.content.msgtype {
                let _ = file_tx.send((f.body.clone(), f.source.clone()));
            }
        }
    });

    for encrypted in [false, true] {
        let (room, _) = room_with_bob(&alice, &bob, encrypted).await?;

        let data: Vec<u8> = (0..300_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 9) as u8)
            .collect();
        let name = if encrypted { "secret.bin" } else { "report.bin" };
        room.send_attachment(
            name,
            &mime::APPLICATION_OCTET_STREAM,
            data.clone(),
            AttachmentConfig::new(),
        )
        .await
        .context("send attachment")?;
        sync_one_until(&bob, "the attachment", |_| !file_rx.is_empty()).await?;
        let (body, source) = file_rx.recv().await.context("attachment event")?;
        assert_eq!(body, name);
        assert_eq!(matches!(source, MediaSource::Encrypted(_)), encrypted, "{source:?}");
        let got = bob
            .media()
            .get_media_content(
                &MediaRequestParameters {
                    source: source.clone(),
                    format: MediaFormat::File,
                },
                false,
            )
            .await
            .context("bob downloads")?;
        ensure!(got == data, "bob's download differs ({} bytes)", got.len());

        // What the server holds: the bytes themselves, or ciphertext only.
        let url = match &source {
            MediaSource::Plain(u) => u.clone(),
            MediaSource::Encrypted(f) => f.url.clone(),
        };
        let raw = server
            .http
            .get(format!(
                "{}/_matrix/client/v1/media/download/{}",
                server.base_url(),
                url.as_str().trim_start_matches("mxc://")
            ))
            .bearer_auth(bob.access_token().context("bob's token")?)
            .send()
            .await?
            .bytes()
            .await?;
        assert_eq!(raw.len(), data.len());
        assert_eq!(raw.as_ref() == data.as_slice(), !encrypted, "encrypted={encrypted}");
    }
    Ok(())
}

// Unread counts as matrix-sdk sees them: bob's client shows alice's
// messages as unread notifications (a mention as a highlight), its own not
// at all, and none once it sent a read receipt for the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_sees_unread_counts_rise_and_clear_after_a_read_receipt() -> Result<()> {
    use matrix_sdk::ruma::api::client::receipt::create_receipt::v3::ReceiptType;
    use matrix_sdk::ruma::events::receipt::ReceiptThread;

    init_logging();
    let server = sdk_tests::weft_with_alice_and_bob().start().await;
    let alice = login(&server, "alice").await?;
    let bob = login(&server, "bob").await?;
    alice
        .sync_once(SyncSettings::default())
        .await
        .context("alice initial sync")?;
    bob.sync_once(SyncSettings::default())
        .await
        .context("bob initial sync")?;
    let room = alice
        .create_room(create_room::v3::Request::new())
        .await
        .context("createRoom")?;
    let room_id: OwnedRoomId = room.room_id().to_owned();
    room.invite_user_by_id(&user_id("bob")).await.context("invite bob")?;
    sync_one_until(&bob, "bob's invite", |r| r.rooms.invited.contains_key(&room_id)).await?;
    bob.join_room_by_id(&room_id).await.context("bob joins")?;
    sync_one_until(&bob, "bob joined", |r| r.rooms.joined.contains_key(&room_id)).await?;
    let bob_room = bob.get_room(&room_id).context("bob's room")?;
    let counts = bob_room.unread_notification_counts();
    ensure!(
        (counts.notification_count, counts.highlight_count) == (0, 0),
        "nothing unread yet: {counts:?}"
    );

    room.send(RoomMessageEventContent::text_plain("hello bob"))
        .await
        .context("alice sends")?;
    let mention = json!({ "msgtype": "m.text", "body": "are you there?",
                          "m.mentions": { "user_ids": [user_id("bob")] } });
    let last = room
        .send_raw("m.room.message", mention)
        .await
        .context("alice mentions bob")?
        .response
        .event_id;
    bob_room
        .send(RoomMessageEventContent::text_plain("my own"))
        .await
        .context("bob sends")?;
    sync_one_until(&bob, "two unread, one highlight", |_| {
        let c = bob_room.unread_notification_counts();
        (c.notification_count, c.highlight_count) == (2, 1)
    })
    .await?;

    bob_room
        .send_single_receipt(ReceiptType::Read, ReceiptThread::Unthreaded, last)
        .await
        .context("bob's read receipt")?;
    sync_one_until(&bob, "nothing unread after the receipt", |_| {
        let c = bob_room.unread_notification_counts();
        (c.notification_count, c.highlight_count) == (0, 0)
    })
    .await?;
    Ok(())
}

/// The bodies of the `m.room.message` events matrix-sdk's event cache holds
/// for a room, oldest first.
async fn cached_bodies(client: &Client, room_id: &RoomId) -> Result<Vec<String>> {
    let room = client.get_room(room_id).context("the client knows the room")?;
    let (cache, _drop) = room.event_cache().await.context("room event cache")?;
    let mut out = Vec::new();
    for ev in cache.events().await.context("cached events")? {
        let json: Value = serde_json::from_str(ev.raw().json().get())?;
        if json["type"] == "m.room.message" {
            out.push(json["content"]["body"].as_str().unwrap_or_default().to_owned());
        }
    }
    Ok(out)
}

/// Waits (the event cache takes sync updates in a task of its own) until
/// the cached message bodies of a room are `want`; fails with what they
/// were after [`WAIT`].
async fn wait_for_bodies(client: &Client, room_id: &RoomId, want: &[&str]) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = cached_bodies(client, room_id).await?;
        if got == want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{room_id}: cached messages {got:?}, expected {want:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// matrix-sdk's sliding sync (simplified, MSC4186), discovered from
// `/versions`: a list of alice's two most recent rooms (of three) has
// those (names, recency, latest events) and counts all three; a message in
// the third moves it into the window, and the next response has that room
// alone, with its latest events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_sliding_sync_lists_rooms_and_their_latest_events() -> Result<()> {
    use matrix_sdk::ruma::events::StateEventType;
    use matrix_sdk::sliding_sync::{SlidingSyncList, SlidingSyncMode, Version};

    init_logging();
    let server = sdk_tests::weft_with_alice_and_bob().start().await;
    let alice = login(&server, "alice").await?;
    let http = server.with_token(&alice.access_token().context("alice's token")?);
    let mut rooms = Vec::new();
    for name in ["first", "second", "third"] {
        let id = http
            .create_room(json!({ "name": name, "preset": "private_chat" }))
            .await;
        http.send_text(&id, &format!("{name}-1"), &format!("{name}: hello"))
            .await;
        rooms.push(RoomId::parse(&id)?);
    }
    // `first` gets the latest message: it leads the list, then `third`.
    http.send_text(rooms[0].as_str(), "first-2", "first: latest").await;

    let versions = alice.available_sliding_sync_versions().await;
    ensure!(
        versions.iter().any(|v| matches!(v, Version::Native)),
        "simplified sliding sync should be discovered from /versions: {versions:?}"
    );
    alice.event_cache().subscribe().context("event cache")?;
    let sync = alice
        .sliding_sync("weft-test")?
        .version(Version::Native)
        .add_list(
            SlidingSyncList::builder("recent")
                .sync_mode(SlidingSyncMode::new_selective().add_range(0..=1))
                .timeline_limit(5)
                .required_state(vec![
                    (StateEventType::RoomCreate, String::new()),
                    (StateEventType::RoomName, String::new()),
                    (StateEventType::RoomMember, "$LAZY".to_owned()),
                ]),
        )
        .build()
        .await
        .context("building the sliding sync")?;
    let summary = sync.sync_once().await.context("first sliding sync")?;
    // The summary may name a room more than once (once per part of the
    // response that touched it).
    let mut got: Vec<_> = summary.rooms.clone();
    got.sort();
    got.dedup();
    let mut want = vec![rooms[0].clone(), rooms[2].clone()];
    want.sort();
    assert_eq!(got, want, "the two most recent rooms in the first response");
    let count = sync
        .on_list("recent", |l| std::future::ready(l.maximum_number_of_rooms()))
        .await
        .flatten();
    assert_eq!(count, Some(3), "the list counts all of alice's rooms");
    ensure!(alice.get_room(&rooms[1]).is_none(), "second is out of the window");

    let first = alice.get_room(&rooms[0]).context("first known after sliding sync")?;
    let third = alice.get_room(&rooms[2]).context("third known after sliding sync")?;
    assert_eq!(first.name().as_deref(), Some("first"), "name from required_state");
    assert_eq!(third.name().as_deref(), Some("third"));
    let stamp = |r: &Room| r.recency_stamp().map(u64::from);
    ensure!(stamp(&first).is_some(), "a recency stamp");
    ensure!(stamp(&first) > stamp(&third), "latest activity first");
    wait_for_bodies(&alice, &rooms[0], &["first: hello", "first: latest"]).await?;
    wait_for_bodies(&alice, &rooms[2], &["third: hello"]).await?;

    // A new message in `second` moves it into the window: the next
    // response has that room alone, with its latest events.
    http.send_text(rooms[1].as_str(), "second-2", "second: news").await;
    let deadline = Instant::now() + WAIT;
    loop {
        let summary = sync.sync_once().await.context("next sliding sync")?;
        if !summary.rooms.is_empty() {
            let mut got = summary.rooms.clone();
            got.dedup();
            assert_eq!(got, vec![rooms[1].clone()], "only the room that moved in");
            break;
        }
        ensure!(Instant::now() < deadline, "the new message never came");
    }
    wait_for_bodies(&alice, &rooms[1], &["second: hello", "second: news"]).await?;
    let second = alice.get_room(&rooms[1]).context("second")?;
    assert_eq!(second.name().as_deref(), Some("second"));
    ensure!(stamp(&second) > stamp(&first), "second is now the most recent");
    Ok(())
}

// Typing and read receipts through matrix-sdk's own APIs: bob's client
// learns (`subscribe_to_typing_notifications`) that alice types after her
// `typing_notice(true)`, and that she stopped; alice's
// `send_single_receipt` on bob's message shows in bob's client as her read
// receipt (`load_user_receipt`, `load_event_receipts`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_typing_and_read_receipts_reach_the_other_member() -> Result<()> {
    use matrix_sdk::ruma::api::client::receipt::create_receipt;
    use matrix_sdk::ruma::events::receipt::{ReceiptThread, ReceiptType};

    init_logging();
    let server = sdk_tests::weft_with_alice_and_bob().start().await;
    let alice = login(&server, "alice").await?;
    let bob = login(&server, "bob").await?;
    alice
        .sync_once(SyncSettings::default())
        .await
        .context("alice initial sync")?;
    bob.sync_once(SyncSettings::default())
        .await
        .context("bob initial sync")?;
    let alice_id = user_id("alice");

    let room = alice
        .create_room(create_room::v3::Request::new())
        .await
        .context("createRoom")?;
    let room_id: OwnedRoomId = room.room_id().to_owned();
    room.invite_user_by_id(&user_id("bob")).await.context("invite bob")?;
    sync_one_until(&bob, "bob's invite", |r| r.rooms.invited.contains_key(&room_id)).await?;
    bob.join_room_by_id(&room_id).await.context("bob joins")?;
    sync_one_until(&bob, "bob's room joined", |r| r.rooms.joined.contains_key(&room_id)).await?;
    let bob_room = bob.get_room(&room_id).context("bob's room")?;
    let sent = bob_room
        .send(RoomMessageEventContent::text_plain("read me"))
        .await
        .context("bob sends")?;
    let event_id = sent.response.event_id;
    sync_one_until(&alice, "bob's message at alice", |r| {
        timeline_json(r, &room_id)
            .iter()
            .any(|ev| ev["event_id"] == event_id.as_str())
    })
    .await?;

    // Typing.
    let (_guard, mut typing) = bob_room.subscribe_to_typing_notifications();
    room.typing_notice(true).await.context("alice typing_notice(true)")?;
    let mut seen: Vec<Vec<OwnedUserId>> = Vec::new();
    sync_one_until(&bob, "alice typing at bob", |_| {
        while let Ok(t) = typing.try_recv() {
            seen.push(t);
        }
        seen.last().is_some_and(|t| t == &vec![alice_id.clone()])
    })
    .await?;
    room.typing_notice(false).await.context("alice typing_notice(false)")?;
    sync_one_until(&bob, "alice stopped typing at bob", |_| {
        while let Ok(t) = typing.try_recv() {
            seen.push(t);
        }
        seen.last().is_some_and(|t| t.is_empty())
    })
    .await?;

    // A read receipt.
    ensure!(
        bob_room
            .load_user_receipt(ReceiptType::Read, ReceiptThread::Unthreaded, &alice_id)
            .await?
            .is_none_or(|(e, _)| e != event_id),
        "alice's receipt before she sent it"
    );
    room.send_single_receipt(
        create_receipt::v3::ReceiptType::Read,
        ReceiptThread::Unthreaded,
        event_id.clone(),
    )
    .await
    .context("alice send_single_receipt")?;
    let deadline = Instant::now() + WAIT;
    loop {
        bob.sync_once(SyncSettings::default().timeout(POLL))
            .await
            .context("bob sync for the receipt")?;
        let mine = bob_room
            .load_user_receipt(ReceiptType::Read, ReceiptThread::Unthreaded, &alice_id)
            .await?;
        if let Some((e, receipt)) = mine
            && e == event_id
        {
            ensure!(receipt.ts.is_some(), "receipt without ts");
            break;
        }
        if Instant::now() >= deadline {
            bail!("alice's read receipt never reached bob's client");
        }
    }
    let readers = bob_room
        .load_event_receipts(ReceiptType::Read, ReceiptThread::Unthreaded, &event_id)
        .await?;
    ensure!(
        readers.iter().any(|(u, _)| *u == alice_id),
        "alice not among the event's readers: {readers:?}"
    );
    Ok(())
}
