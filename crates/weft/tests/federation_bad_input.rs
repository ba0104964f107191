//! Bad input from a peer server, over real TLS sockets between two real
//! Weft servers (`TestServerBuilder::federating`): PDUs with a forged
//! signature, a wrong content hash or failing authorization inside a real
//! signed transaction; garbage, wrongly shaped and oversized requests on
//! every federation endpoint. Each is refused as the spec says, nothing is
//! stored that should not be, and the server keeps serving.

mod common;

use common::federation::*;
use common::*;
use ruma::signatures::Ed25519KeyPair;
use ruma::{CanonicalJsonObject, CanonicalJsonValue, RoomVersionId};
use serde_json::{Value, json};

/// Builds PDUs of B's users for a room A holds, the way B's server would:
/// on A's newest event, with the auth events A has, hashed and signed.
struct Forge<'a> {
    a: &'a TestServer,
    b: &'a TestServer,
    alice: &'a Client,
    room: String,
}

/// Two federating servers, alice on A and bob on B, in a room A made.
async fn alice_and_bob_in_a_room() -> (TestServer, TestServer, Client, Client, String) {
    let (a, b) = two_servers().await;
    let alice = a.register("alice").await;
    let bob = b.register("bob").await;
    let room = make_shared_room(&a, &alice, &bob).await;
    (a, b, alice, bob, room)
}

impl<'a> Forge<'a> {
    fn new(a: &'a TestServer, b: &'a TestServer, alice: &'a Client, room: &str) -> Self {
        Forge {
            a,
            b,
            alice,
            room: room.to_owned(),
        }
    }
}

impl Forge<'_> {
    /// The newest event of the room on A and its depth.
    async fn newest(&self) -> (String, u64) {
        let (status, page) = self
            .alice
            .get(&format!("rooms/{}/messages?dir=b&limit=1", enc(&self.room)))
            .await;
        assert_eq!(status, 200, "{page}");
        let id = page["chunk"][0]["event_id"].as_str().expect("an event").to_owned();
        let (status, pdu) = signed_get(self.b, self.a, &format!("/_matrix/federation/v1/event/{}", enc(&id))).await;
        assert_eq!(status, 200, "{pdu}");
        let depth = pdu["pdus"][0]["depth"].as_u64().expect("depth");
        (id, depth)
    }

    /// The event ID of the state event `(kind, key)` on A.
    async fn state_id(&self, kind: &str, key: &str) -> String {
        let (status, state) = self.alice.get(&format!("rooms/{}/state", enc(&self.room))).await;
        assert_eq!(status, 200, "{state}");
        state
            .as_array()
            .expect("state array")
            .iter()
            .find(|e| e["type"] == kind && e["state_key"] == key)
            .and_then(|e| e["event_id"].as_str())
            .unwrap_or_else(|| panic!("no {kind}/{key} in {state}"))
            .to_owned()
    }

    /// A PDU of `sender` (a user of B), hashed and signed with `key` under
    /// B's name. `tamper` changes it after signing.
    async fn pdu(
        &self,
        sender: &str,
        kind: &str,
        state_key: Option<&str>,
        content: Value,
        key: &Ed25519KeyPair,
        tamper: impl FnOnce(&mut CanonicalJsonObject),
    ) -> (String, Value) {
        let (prev, depth) = self.newest().await;
        let auth = vec![
            self.state_id("m.room.create", "").await,
            self.state_id("m.room.power_levels", "").await,
            self.state_id("m.room.member", sender).await,
        ];
        let mut v = json!({
            "room_id": self.room,
            "sender": sender,
            "type": kind,
            "content": content,
            "prev_events": [prev],
            "auth_events": auth,
            "depth": depth + 1,
            "origin_server_ts": 1_800_000_000_000u64 + depth,
        });
        if let Some(k) = state_key {
            v["state_key"] = json!(k);
        }
        let CanonicalJsonValue::Object(mut obj) = CanonicalJsonValue::try_from(v).expect("canonical JSON") else {
            unreachable!("an object")
        };
        let rules = RoomVersionId::V10.rules().expect("v10 rules");
        ruma::signatures::hash_and_sign_event(self.b.server_name(), key, &mut obj, &rules.redaction).expect("signed");
        let id = format!(
            "${}",
            ruma::signatures::reference_hash(&obj, &rules).expect("reference hash")
        );
        tamper(&mut obj);
        (id, serde_json::to_value(&obj).expect("JSON"))
    }

    /// Whether A serves the event over federation.
    async fn a_has(&self, id: &str) -> bool {
        let (status, _) = signed_get(self.b, self.a, &format!("/_matrix/federation/v1/event/{}", enc(id))).await;
        status == 200
    }
}

/// The error of `id` in a `/send` answer (None: accepted).
fn result_of(answer: &Value, id: &str) -> Option<String> {
    let r = &answer["pdus"][id];
    assert!(r.is_object(), "a result for {id}: {answer}");
    r["error"].as_str().map(str::to_owned)
}

#[tokio::test]
async fn forged_tampered_and_unauthorized_pdus_are_refused_and_a_genuine_one_lands() {
    let (a, b, alice, bob, room) = alice_and_bob_in_a_room().await;
    let a_name = a.server_name().to_owned();
    let forge = Forge::new(&a, &b, &alice, &room);
    let b_key = signing_key(&b);

    // Forged: signed under B's name and key ID with another key.
    let impostor =
        Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), b_key.version().to_owned()).expect("the impostor's key");
    let text = |body: &str| json!({ "msgtype": "m.text", "body": body });
    let (forged_id, forged) = forge
        .pdu(&bob.user_id, "m.room.message", None, text("forged"), &impostor, |_| {})
        .await;
    let answer = send_transaction(&b, &a_name, "forged", &json!({ "pdus": [forged] })).expect("answered");
    let error = result_of(&answer, &forged_id).expect("the forged PDU is refused");
    assert!(error.to_lowercase().contains("signature"), "{error}");
    assert!(!forge.a_has(&forged_id).await, "a forged PDU is not stored");

    // Unauthorized: bob (power 0) makes himself the room's admin.
    let mut levels = alice.state(&room, "m.room.power_levels", "").await.1;
    levels["users"][&bob.user_id] = json!(100);
    let (coup_id, coup) = forge
        .pdu(&bob.user_id, "m.room.power_levels", Some(""), levels, &b_key, |_| {})
        .await;
    let answer = send_transaction(&b, &a_name, "coup", &json!({ "pdus": [coup] })).expect("answered");
    let error = result_of(&answer, &coup_id).expect("the unauthorized PDU is refused");
    assert!(!error.is_empty());
    let (_, now) = alice.state(&room, "m.room.power_levels", "").await;
    assert!(now["users"].get(&bob.user_id).is_none(), "bob did not get power: {now}");
    assert!(
        log_lines(&a, &[&coup_id, "rejected"]).len() + log_lines(&a, &[&coup_id, "refused"]).len() > 0,
        "the log says why {coup_id} was refused"
    );

    // Wrong content hash: signed, then the body changed. The signature
    // covers the redacted event only, so it holds; the spec has the
    // receiver keep the event redacted.
    let (tampered_id, tampered) = forge
        .pdu(&bob.user_id, "m.room.message", None, text("original"), &b_key, |obj| {
            obj.insert(
                "content".into(),
                CanonicalJsonValue::try_from(text("tampered")).expect("content"),
            );
        })
        .await;
    let answer = send_transaction(&b, &a_name, "tampered", &json!({ "pdus": [tampered] })).expect("answered");
    assert_eq!(result_of(&answer, &tampered_id), None, "{answer}");

    // Genuine: it lands, after all of the above.
    let (good_id, good) = forge
        .pdu(&bob.user_id, "m.room.message", None, text("genuine"), &b_key, |_| {})
        .await;
    let answer = send_transaction(&b, &a_name, "genuine", &json!({ "pdus": [good] })).expect("answered");
    assert_eq!(result_of(&answer, &good_id), None, "{answer}");

    let messages = alice.all_messages(&room).await;
    let from_bob: Vec<(&str, &Value)> = messages
        .iter()
        .filter(|m| m["sender"] == bob.user_id.as_str() && m["type"] == "m.room.message")
        .map(|m| (m["event_id"].as_str().unwrap_or(""), &m["content"]))
        .collect();
    assert_eq!(
        from_bob,
        vec![(tampered_id.as_str(), &json!({})), (good_id.as_str(), &text("genuine"))],
        "the tampered event redacted, the genuine one whole, nothing else of bob's: {messages:?}"
    );
    assert!(
        messages
            .iter()
            .all(|m| m["event_id"] != forged_id.as_str() && m["event_id"] != coup_id.as_str()),
        "{messages:?}"
    );
}

/// NUL (U+0000), which PostgreSQL's text cannot hold, in a peer's PDUs:
/// in the content (JSON keeps it escaped; a relation naming such an ID is
/// no relation) the event lands, whole, and its body is found by search;
/// in a field stored as text (the state key, the type) the PDU is refused
/// as malformed. The same on both backends.
#[tokio::test]
async fn nul_in_a_peers_pdu_lands_in_content_and_is_refused_in_its_keys() {
    let (a, b, alice, bob, room) = alice_and_bob_in_a_room().await;
    let a_name = a.server_name().to_owned();
    let forge = Forge::new(&a, &b, &alice, &room);
    let b_key = signing_key(&b);
    let body = json!({
        "msgtype": "m.text",
        "body": "nulled\u{0}reading 42",
        "m.relates_to": { "rel_type": "org.example.re\u{0}l", "event_id": "$nul\u{0}led" },
    });
    let (text_id, text) = forge
        .pdu(&bob.user_id, "m.room.message", None, body.clone(), &b_key, |_| {})
        .await;
    let answer = send_transaction(&b, &a_name, "nul-body", &json!({ "pdus": [text] })).expect("answered");
    assert_eq!(result_of(&answer, &text_id), None, "{answer}");
    let (status, ev) = alice
        .get(&format!("rooms/{}/event/{}", enc(&room), enc(&text_id)))
        .await;
    assert_eq!(status, 200, "{ev}");
    assert_eq!(ev["content"], body, "the content whole, NUL included");
    let (status, found) = alice
        .post(
            "search",
            json!({"search_categories": {"room_events": {"search_term": "nulled"}}}),
        )
        .await;
    assert_eq!(status, 200, "{found}");
    let hits: Vec<&str> = found["search_categories"]["room_events"]["results"]
        .as_array()
        .expect("results")
        .iter()
        .filter_map(|r| r["result"]["event_id"].as_str())
        .collect();
    assert_eq!(hits, [text_id.as_str()], "{found}");

    let (key_id, key) = forge
        .pdu(
            &bob.user_id,
            "org.example.note",
            Some("k\u{0}ey"),
            json!({}),
            &b_key,
            |_| {},
        )
        .await;
    let (type_id, kind) = forge
        .pdu(&bob.user_id, "org.example\u{0}note", None, json!({}), &b_key, |_| {})
        .await;
    let answer = send_transaction(&b, &a_name, "nul-keys", &json!({ "pdus": [key, kind] })).expect("answered");
    for id in [&key_id, &type_id] {
        let error = result_of(&answer, id).expect("refused");
        assert!(error.contains("NUL"), "{error}");
        assert!(!forge.a_has(id).await, "{id} is not stored");
    }
}

/// A request and the answer it must get: method, path, body, status,
/// errcode.
type Case = (&'static str, String, Option<Vec<u8>>, u16, &'static str);

/// Requests no peer should send, one per endpoint family: each gets a
/// Matrix error with a 4xx status, never a 500, and the server keeps
/// serving.
#[tokio::test]
async fn garbage_on_every_federation_endpoint_gets_a_matrix_error() {
    let (a, b) = two_servers().await;
    let alice = a.register("alice").await;
    let bob = b.register("bob").await;
    let room = make_shared_room(&a, &alice, &bob).await;
    let (a_name, b_name) = (a.server_name().to_owned(), b.server_name().to_owned());
    let r = enc(&room);
    let event = alice.send_text(&room, "t1", "hello").await;
    let ev = enc(&event);
    let bob_id = enc(&bob.user_id);
    let alice_id = enc(&alice.user_id);

    let garbage = b"{\"pdus\": [".to_vec();
    let cases: Vec<Case> = vec![
        (
            "PUT",
            "/_matrix/federation/v1/send/g1".into(),
            Some(garbage.clone()),
            400,
            "M_NOT_JSON",
        ),
        (
            "PUT",
            "/_matrix/federation/v1/send/g2".into(),
            Some(br#"{"pdus": "x"}"#.to_vec()),
            400,
            "M_BAD_JSON",
        ),
        (
            "PUT",
            "/_matrix/federation/v1/send/g3".into(),
            Some(b"[1, 2]".to_vec()),
            400,
            "M_BAD_JSON",
        ),
        (
            "GET",
            "/_matrix/federation/v1/event/not-an-event-id".into(),
            None,
            400,
            "M_INVALID_PARAM",
        ),
        (
            "GET",
            format!("/_matrix/federation/v1/event/{}", enc("$nosuchevent")),
            None,
            404,
            "M_NOT_FOUND",
        ),
        (
            "GET",
            format!("/_matrix/federation/v1/state_ids/{r}"),
            None,
            400,
            "M_MISSING_PARAM",
        ),
        (
            "GET",
            "/_matrix/federation/v1/state_ids/not-a-room?event_id=x".into(),
            None,
            400,
            "M_INVALID_PARAM",
        ),
        (
            "GET",
            format!(
                "/_matrix/federation/v1/state/{}?event_id={ev}",
                enc(&format!("!nowhere:{a_name}"))
            ),
            None,
            403,
            "M_FORBIDDEN",
        ),
        (
            "GET",
            format!("/_matrix/federation/v1/backfill/{r}?v={ev}&limit=lots"),
            None,
            400,
            "M_INVALID_PARAM",
        ),
        (
            "POST",
            format!("/_matrix/federation/v1/get_missing_events/{r}"),
            Some(garbage.clone()),
            400,
            "M_NOT_JSON",
        ),
        (
            "POST",
            format!("/_matrix/federation/v1/get_missing_events/{r}"),
            Some(br#"{"latest_events": 7}"#.to_vec()),
            400,
            "M_BAD_JSON",
        ),
        (
            "GET",
            format!("/_matrix/federation/v1/make_join/{r}/{alice_id}"),
            None,
            403,
            "M_FORBIDDEN",
        ),
        (
            "GET",
            format!(
                "/_matrix/federation/v1/make_join/{}/{bob_id}",
                enc(&format!("!nowhere:{a_name}"))
            ),
            None,
            404,
            "M_NOT_FOUND",
        ),
        (
            "PUT",
            format!("/_matrix/federation/v2/send_join/{r}/{ev}"),
            Some(b"{}".to_vec()),
            400,
            "M_BAD_JSON",
        ),
        (
            "PUT",
            format!("/_matrix/federation/v2/send_leave/{r}/{ev}"),
            Some(garbage.clone()),
            400,
            "M_NOT_JSON",
        ),
        (
            "PUT",
            format!("/_matrix/federation/v2/invite/{r}/{ev}"),
            Some(br#"{"event": 1}"#.to_vec()),
            400,
            "M_BAD_JSON",
        ),
        (
            "POST",
            "/_matrix/federation/v1/user/keys/query".into(),
            Some(br#"{"device_keys": []}"#.to_vec()),
            400,
            "M_BAD_JSON",
        ),
        (
            "POST",
            "/_matrix/federation/v1/user/keys/claim".into(),
            Some(garbage.clone()),
            400,
            "M_NOT_JSON",
        ),
        (
            "GET",
            "/_matrix/federation/v1/user/devices/not-a-user".into(),
            None,
            400,
            "M_INVALID_PARAM",
        ),
        (
            "GET",
            "/_matrix/federation/v1/query/directory?room_alias=nope".into(),
            None,
            400,
            "M_INVALID_PARAM",
        ),
        (
            "GET",
            "/_matrix/federation/v1/query/profile".into(),
            None,
            400,
            "M_MISSING_PARAM",
        ),
        (
            "GET",
            "/_matrix/federation/v1/openid/userinfo?access_token=nope".into(),
            None,
            401,
            "M_UNKNOWN_TOKEN",
        ),
        (
            "GET",
            format!("/_matrix/federation/v1/media/download/{}", "nosuchmedia"),
            None,
            404,
            "M_NOT_FOUND",
        ),
        (
            "GET",
            "/_matrix/federation/v1/no/such/endpoint".into(),
            None,
            404,
            "M_UNRECOGNIZED",
        ),
    ];
    let mut wrong = Vec::new();
    for (method, path, body, want_status, want_code) in &cases {
        let body = body.clone().unwrap_or_default();
        // The signature covers the JSON body; garbage cannot be signed.
        let signed_body = if serde_json::from_slice::<Value>(&body).is_ok() {
            body.clone()
        } else {
            Vec::new()
        };
        let resp = signed_raw(&b, &a, method, path, &signed_body, body).await;
        let status = resp.status().as_u16();
        let answer: Value = resp.json().await.unwrap_or(Value::Null);
        if status != *want_status || answer["errcode"] != *want_code {
            wrong.push(format!(
                "{method} {path}: {status} {answer} (wanted {want_status} {want_code})"
            ));
        }
    }
    assert!(wrong.is_empty(), "unexpected answers:\n{}", wrong.join("\n"));

    // Too large for the body limit (1 MiB by default): 413, never read.
    let big =
        json!({ "pdus": [], "edus": [{ "edu_type": "org.example.big", "content": { "x": "y".repeat(2 << 20) } }] });
    let bytes = serde_json::to_vec(&big).expect("JSON");
    let resp = signed_raw(&b, &a, "PUT", "/_matrix/federation/v1/send/big", &bytes, bytes.clone()).await;
    assert_eq!(resp.status().as_u16(), 413);
    let answer: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(answer["errcode"], "M_TOO_LARGE", "{answer}");

    // Still serving: both APIs, and a real exchange across the servers.
    let (status, version) = signed_get(&b, &a, "/_matrix/federation/v1/version").await;
    assert_eq!(status, 200, "{version}");
    let reply = bob.send_text(&room, "t2", "still here").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let messages = alice.all_messages(&room).await;
        if let Some(seen) = messages.iter().find(|m| m["event_id"] == reply.as_str()) {
            assert_eq!(seen["content"]["body"], "still here");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "bob's reply never reached A: {messages:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        log_lines(&a, &["received transaction g"]).is_empty(),
        "refused transactions are not processed"
    );
    let _ = b_name;
}
