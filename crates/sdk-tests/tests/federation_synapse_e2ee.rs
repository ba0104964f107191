//! End-to-end encryption across Weft and a live Synapse (issue #10):
//! matrix-sdk clients, one logged in on each server, in encrypted rooms
//! created on either side. Each sends an encrypted `m.text`; the other's
//! client decrypts it to the exact plaintext, and both servers hold only
//! the Megolm ciphertext.
//!
//! What crosses the federation on the way: `/user/keys/query` and
//! `/user/devices` (each server learning the other's devices),
//! `/user/keys/claim` (one-time keys for the Olm sessions),
//! `m.direct_to_device` EDUs (the room keys), `m.device_list_update` EDUs,
//! the invite and join handshakes and the events themselves.
//!
//! Without Synapse the test fails under `CI` and skips with a note
//! elsewhere.

use anyhow::{Context, Result, ensure};
use matrix_sdk::config::SyncSettings;
use matrix_sdk::ruma::api::client::room::create_room;
use matrix_sdk::ruma::events::InitialStateEvent;
use matrix_sdk::ruma::events::room::encryption::RoomEncryptionEventContent;
use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
use matrix_sdk::ruma::{OwnedEventId, OwnedUserId, RoomId};
use matrix_sdk::{Client, Room};
use sdk_tests::{PASSWORD, sync_until};
use serde_json::Value;
use weft_testkit::{enc, synapse_or_skip};

fn init_logging() {
    sdk_tests::init_logging("warn,matrix_sdk_crypto::backups=error");
}

/// A matrix-sdk client (in-memory stores) logged in with a password at
/// `homeserver`, after one sync (which uploads its device and one-time
/// keys).
async fn login(homeserver: &str, localpart: &str, password: &str) -> Result<Client> {
    let client = Client::builder()
        .homeserver_url(homeserver)
        .build()
        .await
        .context("building matrix-sdk client")?;
    client
        .matrix_auth()
        .login_username(localpart, password)
        .initial_device_display_name("weft federation e2ee test")
        .send()
        .await
        .with_context(|| format!("password login of {localpart} at {homeserver}"))?;
    client
        .sync_once(SyncSettings::default())
        .await
        .with_context(|| format!("{localpart}'s initial sync"))?;
    Ok(client)
}

/// Bootstraps cross-signing, completing `m.login.password` UIA if the
/// server asks for it.
async fn bootstrap_cross_signing(client: &Client, localpart: &str) -> Result<()> {
    use matrix_sdk::ruma::api::client::uiaa;
    match client.encryption().bootstrap_cross_signing(None).await {
        Ok(()) => Ok(()),
        Err(err) => {
            let info = err
                .as_uiaa_response()
                .with_context(|| format!("cross-signing bootstrap failed without a UIA challenge: {err}"))?;
            let mut password = uiaa::Password::new(
                uiaa::UserIdentifier::Matrix(uiaa::MatrixUserIdentifier::new(localpart.to_owned())),
                PASSWORD.to_owned(),
            );
            password.session = info.session.clone();
            client
                .encryption()
                .bootstrap_cross_signing(Some(uiaa::AuthData::Password(password)))
                .await
                .context("cross-signing bootstrap with m.login.password")
        }
    }
}

/// `owner` creates an encrypted room inviting `guest`; `guest` joins it.
/// Returns both clients' views of the room once each has seen the join.
async fn encrypted_room(owner: &Client, guest: &Client) -> Result<(Room, Room)> {
    let guest_id: OwnedUserId = guest.user_id().context("guest's user id")?.to_owned();
    let mut req = create_room::v3::Request::new();
    req.invite = vec![guest_id.clone()];
    req.initial_state = vec![
        InitialStateEvent::with_empty_state_key(RoomEncryptionEventContent::with_recommended_defaults()).to_raw_any(),
    ];
    let room = owner.create_room(req).await.context("create the encrypted room")?;
    let room_id = room.room_id().to_owned();
    sync_until(&[owner, guest], "the invite", async || {
        Ok(guest.get_room(&room_id).is_some())
    })
    .await?;
    let guest_room = guest.join_room_by_id(&room_id).await.context("the guest joins")?;
    sync_until(&[owner, guest], "the join on both sides", async || {
        let seen = room.get_member_no_sync(&guest_id).await?;
        Ok(seen.is_some_and(|m| *m.membership() == matrix_sdk::ruma::events::room::member::MembershipState::Join))
    })
    .await?;
    ensure!(
        room.latest_encryption_state().await?.is_encrypted(),
        "owner's room is encrypted"
    );
    ensure!(
        guest_room.latest_encryption_state().await?.is_encrypted(),
        "guest's room is encrypted"
    );
    Ok((room, guest_room))
}

/// `from` sends `body` encrypted; `to`'s client syncs until it has the
/// event decrypted. Returns the event ID and the decrypted event's JSON.
async fn send_and_decrypt(
    from: &Room,
    from_client: &Client,
    to_client: &Client,
    body: &str,
) -> Result<(OwnedEventId, Value)> {
    let room_id = from.room_id().to_owned();
    let event_id = from
        .send(RoomMessageEventContent::text_plain(body))
        .await
        .with_context(|| format!("send {body:?}"))?
        .response
        .event_id;
    let to_room = to_client.get_room(&room_id).context("the receiver knows the room")?;
    let mut seen: Option<(Value, bool)> = None;
    sync_until(&[from_client, to_client], &format!("{body:?} decrypted"), async || {
        if let Ok(ev) = to_room.event(&event_id, None).await {
            let json: Value = serde_json::from_str(ev.raw().json().get())?;
            let decrypted = ev.encryption_info().is_some();
            if decrypted {
                seen = Some((json, true));
                return Ok(true);
            }
            seen = Some((json, false));
        }
        Ok(false)
    })
    .await
    .with_context(|| format!("last seen: {seen:?}"))?;
    let (json, _) = seen.context("set by sync_until")?;
    Ok((event_id, json))
}

/// The event as a server holds it (`GET /rooms/{room}/event/{id}` with
/// the client's token, over plain HTTP): ciphertext only.
async fn assert_ciphertext_on_server(
    base_url: &str,
    client: &Client,
    room: &RoomId,
    event: &OwnedEventId,
) -> Result<()> {
    let mut http = weft_testkit::Client::at(base_url);
    http.access_token = client.access_token().context("token")?;
    let (status, ev) = http
        .get(&format!(
            "/_matrix/client/v3/rooms/{}/event/{}",
            enc(room.as_str()),
            enc(event.as_str())
        ))
        .await;
    ensure!(status == 200, "GET the event at {base_url}: {status} {ev}");
    ensure!(ev["type"] == "m.room.encrypted", "on the wire at {base_url}: {ev}");
    ensure!(
        ev["content"]["algorithm"] == "m.megolm.v1.aes-sha2",
        "Megolm at {base_url}: {ev}"
    );
    ensure!(
        ev["content"]["ciphertext"].as_str().is_some_and(|c| !c.is_empty()),
        "ciphertext at {base_url}: {ev}"
    );
    ensure!(ev["content"].get("body").is_none(), "no plaintext at {base_url}: {ev}");
    Ok(())
}

/// `first` sends an encrypted message that `second` decrypts, then the
/// other way round; each event is ciphertext on both servers.
/// `(client, its room, its server's client API URL)` for each side.
async fn exchange(first: (&Client, &Room, &str), second: (&Client, &Room, &str), tag: &str) -> Result<()> {
    let room_id = first.1.room_id().to_owned();
    for (from, to) in [(first, second), (second, first)] {
        let body = format!("{tag}: secret from {}", from.0.user_id().context("user id")?);
        let (event_id, json) = send_and_decrypt(from.1, from.0, to.0, &body).await?;
        assert_eq!(json["type"], "m.room.message", "{json}");
        assert_eq!(json["content"]["msgtype"], "m.text", "{json}");
        assert_eq!(json["content"]["body"], body.as_str(), "{json}");
        assert_eq!(json["sender"], from.0.user_id().context("user id")?.as_str());
        assert_ciphertext_on_server(from.2, from.0, &room_id, &event_id).await?;
        assert_ciphertext_on_server(to.2, to.0, &room_id, &event_id).await?;
    }
    Ok(())
}

/// Each room's pair of users is new, so both servers' `/user/keys/claim`
/// and device lists are used from scratch (a second exchange between the
/// same devices would reuse their Olm sessions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_clients_on_weft_and_synapse_exchange_encrypted_messages() -> Result<()> {
    init_logging();
    let Some(synapse) = synapse_or_skip().await else {
        return Ok(());
    };
    let weft = sdk_tests::weft()
        .federating()
        .user("alice", PASSWORD)
        .user("carol", PASSWORD)
        .start()
        .await;
    for name in ["bob", "dave"] {
        synapse
            .register(name, PASSWORD, false)
            .await
            .map_err(anyhow::Error::msg)?;
    }
    let weft_url = weft.base_url();
    let syn_url = synapse.client_url().to_owned();
    // A failure returns an error (no panic): both servers' logs go with it.
    let context = |what: &str| {
        format!(
            "{what}\nthe end of synapse's log:\n{}\nthe end of weft's log:\n{}",
            synapse.log_tail(60),
            weft.log_tail(60)
        )
    };

    // An encrypted room created on Weft, bob (Synapse) invited; alice
    // (Weft) sends first.
    let alice = login(&weft_url, "alice", PASSWORD).await?;
    let bob = login(&syn_url, "bob", PASSWORD).await?;
    assert_eq!(alice.user_id().unwrap().as_str(), weft.user_id("alice"));
    assert_eq!(bob.user_id().unwrap().as_str(), synapse.user_id("bob"));
    let (alice_room, bob_room) = encrypted_room(&alice, &bob)
        .await
        .with_context(|| context("weft's room"))?;
    exchange(
        (&alice, &alice_room, &weft_url),
        (&bob, &bob_room, &syn_url),
        "weft's room",
    )
    .await
    .with_context(|| context("weft's room"))?;

    // A new device on each side after the room is shared: its server
    // tells the other (`m.device_list_update`), whose client then shares
    // the room key with it too. Alice's new device reads bob's next
    // message; bob's new device reads alice's.
    let alice2 = login(&weft_url, "alice", PASSWORD).await?;
    let alice2_device = alice2.device_id().context("device id")?.to_owned();
    let alice_id = alice.user_id().context("user id")?.to_owned();
    sync_until(&[&bob, &alice, &alice2], "alice's new device on synapse", async || {
        Ok(bob.encryption().get_device(&alice_id, &alice2_device).await?.is_some())
    })
    .await
    .with_context(|| context("alice's new device"))?;
    let body = "weft's room: for alice's new device";
    let (_, json) = send_and_decrypt(&bob_room, &bob, &alice2, body)
        .await
        .with_context(|| context("bob to alice's new device"))?;
    assert_eq!(json["content"]["body"], body, "{json}");

    let bob2 = login(&syn_url, "bob", PASSWORD).await?;
    let bob2_device = bob2.device_id().context("device id")?.to_owned();
    let bob_id = bob.user_id().context("user id")?.to_owned();
    sync_until(&[&alice, &bob, &bob2], "bob's new device on weft", async || {
        Ok(alice.encryption().get_device(&bob_id, &bob2_device).await?.is_some())
    })
    .await
    .with_context(|| context("bob's new device"))?;
    let body = "weft's room: for bob's new device";
    let (_, json) = send_and_decrypt(&alice_room, &alice, &bob2, body)
        .await
        .with_context(|| context("alice to bob's new device"))?;
    assert_eq!(json["content"]["body"], body, "{json}");

    // The new devices log out: each server tells the other, whose client
    // drops the device.
    for (gone, gone_id, device, watcher) in [
        (&alice2, &alice_id, &alice2_device, &bob),
        (&bob2, &bob_id, &bob2_device, &alice),
    ] {
        gone.logout().await.context("log the new device out")?;
        let what = format!("{device} of {gone_id} gone on the other server");
        sync_until(&[watcher], &what, async || {
            let seen = watcher.encryption().get_device(gone_id, device).await?;
            Ok(seen.is_none_or(|d| d.is_deleted()))
        })
        .await
        .with_context(|| context(&what))?;
    }

    // Cross-signing set up on each side after the room is shared: the
    // other server learns the keys (`m.signing_key_update`, and the
    // device's new signature as a device list update), and its client sees
    // the master key and the device signed by its owner.
    for (owner, owner_name, watcher) in [(&alice, "alice", &bob), (&bob, "bob", &alice)] {
        bootstrap_cross_signing(owner, owner_name)
            .await
            .with_context(|| context(&format!("{owner_name}'s cross-signing")))?;
        let owner_id = owner.user_id().context("user id")?.to_owned();
        let owner_device = owner.device_id().context("device id")?.to_owned();
        let own = owner
            .encryption()
            .get_user_identity(&owner_id)
            .await?
            .context("the owner knows its identity")?;
        let what = format!("{owner_name}'s cross-signing identity on the other server");
        sync_until(&[watcher, owner], &what, async || {
            let identity = watcher.encryption().get_user_identity(&owner_id).await?;
            let device = watcher.encryption().get_device(&owner_id, &owner_device).await?;
            Ok(
                identity.is_some_and(|i| i.master_key().get_first_key() == own.master_key().get_first_key())
                    && device.is_some_and(|d| d.is_cross_signed_by_owner()),
            )
        })
        .await
        .with_context(|| context(&what))?;
    }

    // An encrypted room created on Synapse, carol (Weft) invited; dave
    // (Synapse) sends first.
    let carol = login(&weft_url, "carol", PASSWORD).await?;
    let dave = login(&syn_url, "dave", PASSWORD).await?;
    let (dave_room, carol_room) = encrypted_room(&dave, &carol)
        .await
        .with_context(|| context("synapse's room"))?;
    exchange(
        (&dave, &dave_room, &syn_url),
        (&carol, &carol_room, &weft_url),
        "synapse's room",
    )
    .await
    .with_context(|| context("synapse's room"))?;
    Ok(())
}
