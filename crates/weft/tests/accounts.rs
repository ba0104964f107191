//! Accounts: whoami, login/logout, password change, deactivation, profile,
//! discovery endpoints and the admin CLI.

mod common;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whoami_login_and_logout() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;

    let (st, who) = alice.whoami().await;
    assert_eq!(st, 200, "{who}");
    assert_eq!(who["user_id"], alice.user_id.as_str());
    assert_eq!(who["device_id"], alice.device_id.as_str());
    assert_ne!(who["is_guest"], json!(true));

    // GET /login advertises password login.
    let (st, flows) = server.anon().get("login").await;
    assert_eq!(st, 200, "{flows}");
    assert!(
        flows["flows"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x["type"] == "m.login.password")),
        "GET /login must list m.login.password: {flows}"
    );

    // Login with a client-chosen device ID.
    let (st, r) = server
        .anon()
        .post(
            "login",
            json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"},
                   "password": alice.password, "device_id": "MYPHONE", "initial_device_display_name": "Phone"}),
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["device_id"], "MYPHONE");
    assert_eq!(r["user_id"], alice.user_id.as_str());
    let phone = server.with_token(r["access_token"].as_str().unwrap());
    let (_, who) = phone.whoami().await;
    assert_eq!(who["device_id"], "MYPHONE");

    // Logging in again as MYPHONE replaces its token: the old one (used
    // just now, so remembered by the server) no longer works.
    let again = server.login_device("alice", &alice.password, "MYPHONE").await;
    let (st, who) = again.whoami().await;
    assert_eq!((st, who["device_id"].as_str()), (200, Some("MYPHONE")), "{who}");
    assert_err(&phone.whoami().await, 401, "M_UNKNOWN_TOKEN");

    // Wrong password / unknown user.
    let got = server.login_raw("alice", "not-the-password").await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let got = server.login_raw("nobody", "whatever-password").await;
    assert_err(&got, 403, "M_FORBIDDEN");
    assert!(got.1["access_token"].is_null());

    // Three devices; /logout kills exactly one.
    let alice2 = server.login("alice", &alice.password).await;
    let alice3 = server.login("alice", &alice.password).await;
    let ids = [
        &alice.device_id,
        &alice2.device_id,
        &alice3.device_id,
        &"MYPHONE".to_string(),
    ];
    for (i, a) in ids.iter().enumerate() {
        for b in &ids[i + 1..] {
            assert_ne!(a, b, "logins must get distinct device IDs");
        }
    }
    let (st, r) = alice2.post("logout", json!({})).await;
    assert_eq!(st, 200, "{r}");
    let got = alice2.whoami().await;
    assert_err(&got, 401, "M_UNKNOWN_TOKEN");
    assert_eq!(
        got.1["soft_logout"],
        json!(false),
        "a logged-out token is a hard logout: {}",
        got.1
    );
    assert_eq!(
        alice.whoami().await.0,
        200,
        "logout of one device must not affect others"
    );
    assert_eq!(alice3.whoami().await.0, 200);

    // /logout/all kills every token of the user.
    let (st, r) = alice3.post("logout/all", json!({})).await;
    assert_eq!(st, 200, "{r}");
    for c in [&alice, &alice3, &phone] {
        let got = c.whoami().await;
        assert_err(&got, 401, "M_UNKNOWN_TOKEN");
    }
    // Logging in again works.
    let again = server.login("alice", &alice.password).await;
    assert_eq!(again.whoami().await.0, 200);
}

/// The forms `POST /login` accepts (`identifier` with a localpart or a
/// full user ID, the legacy `user`), what it answers, and the errors for
/// bodies it cannot use: never a 500, the server keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_forms_and_bad_login_bodies() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let anon = server.anon();

    // Legacy `user`, and a full user ID in `identifier`.
    let (st, r) = anon
        .post(
            "login",
            json!({"type": "m.login.password", "user": "alice", "password": alice.password}),
        )
        .await;
    assert_eq!(st, 200, "legacy user form: {r}");
    assert_eq!(r["user_id"], alice.user_id.as_str());
    assert_eq!(r["home_server"], server.server_name.as_str(), "{r}");
    assert!(r["well_known"]["m.homeserver"]["base_url"].is_string(), "{r}");
    let (st, who) = server.with_token(r["access_token"].as_str().unwrap()).whoami().await;
    assert_eq!((st, who["user_id"].clone()), (200, json!(alice.user_id)));
    let (st, r) = anon
        .post(
            "login",
            json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": alice.user_id},
                   "password": alice.password}),
        )
        .await;
    assert_eq!(st, 200, "full user ID: {r}");
    assert_eq!(r["user_id"], alice.user_id.as_str());

    // Bodies without a usable type, user or password.
    for body in [
        json!({}),
        json!({"type": 5, "user": "alice", "password": alice.password}),
        json!([1, 2]),
        json!("m.login.password"),
        json!({"type": "m.login.password", "user": "alice"}),
        json!({"type": "m.login.password", "password": alice.password}),
        json!({"type": "m.login.password", "identifier": {"type": "m.id.user"}, "password": alice.password}),
    ] {
        let got = anon.post("login", body.clone()).await;
        assert_err(&got, 400, "M_BAD_JSON");
        assert!(got.1["access_token"].is_null(), "{body}: {}", got.1);
    }
    let got = anon
        .request_raw(Method::POST, "login", "application/json", b"{\"type\": ".to_vec())
        .await;
    assert_err(&got, 400, "M_NOT_JSON");
    // Login types and identifiers Weft does not offer.
    let got = anon
        .post("login", json!({"type": "m.login.token", "token": "abc"}))
        .await;
    assert_err(&got, 400, "M_UNKNOWN");
    let got = anon
        .post(
            "login",
            json!({"type": "m.login.password", "password": alice.password,
                   "identifier": {"type": "m.id.thirdparty", "medium": "email", "address": "a@example.org"}}),
        )
        .await;
    assert_err(&got, 400, "M_UNKNOWN");
    // Still answering.
    let (st, r) = server.login_raw("alice", &alice.password).await;
    assert_eq!(st, 200, "{r}");

    // The username check needs its parameter.
    let got = anon.get("register/available").await;
    assert_err(&got, 400, "M_MISSING_PARAM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_follow_logins_and_logouts() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let alice2 = server.login("alice", &alice.password).await;

    let list = |v: &Value| -> Vec<String> {
        let mut ids: Vec<String> = v["devices"]
            .as_array()
            .unwrap_or_else(|| panic!("no devices array: {v}"))
            .iter()
            .map(|d| d["device_id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    let (st, d) = alice.get("devices").await;
    assert_eq!(st, 200, "{d}");
    let mut want = vec![alice.device_id.clone(), alice2.device_id.clone()];
    want.sort();
    assert_eq!(list(&d), want);

    let (st, _) = alice2.post("logout", json!({})).await;
    assert_eq!(st, 200);
    let (_, d) = alice.get("devices").await;
    assert_eq!(list(&d), vec![alice.device_id.clone()], "logout must delete the device");
}

/// Completes a UIA-protected POST with m.login.password.
async fn uia_password(c: &Client, path: &str, body: Value, password: &str) -> (u16, Value) {
    let (st, first) = c.post(path, body.clone()).await;
    assert_eq!(st, 401, "{path} without auth should ask for UIA: {first}");
    let flows = first["flows"].as_array().unwrap_or_else(|| panic!("no flows: {first}"));
    assert!(
        flows.iter().any(|f| f["stages"] == json!(["m.login.password"])),
        "{path} should offer m.login.password: {first}"
    );
    let mut b = body;
    b["auth"] = json!({
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": c.user_id},
        "password": password,
        "session": first["session"],
    });
    c.post(path, b).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_change_via_uia() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let other_device = server.login("alice", &alice.password).await;
    let old_pw = alice.password.clone();
    let new_pw = "a-brand-new-password-42";

    // Wrong current password: refused, nothing changes.
    let (st, first) = alice.post("account/password", json!({"new_password": new_pw})).await;
    assert_eq!(st, 401, "{first}");
    let (st, r) = alice
        .post(
            "account/password",
            json!({"new_password": new_pw, "auth": {
                "type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"},
                "password": "wrong-password", "session": first["session"]}}),
        )
        .await;
    assert_eq!(st, 401, "wrong password in UIA should be a 401 with errcode: {r}");
    assert_eq!(r["errcode"], "M_FORBIDDEN", "{r}");
    assert_eq!(
        server.login_raw("alice", new_pw).await.0,
        403,
        "password changed despite wrong auth"
    );

    let (st, r) = uia_password(&alice, "account/password", json!({"new_password": new_pw}), &old_pw).await;
    assert_eq!(st, 200, "password change: {r}");

    let (st, r) = server.login_raw("alice", new_pw).await;
    assert_eq!(st, 200, "login with new password: {r}");
    let got = server.login_raw("alice", &old_pw).await;
    assert_err(&got, 403, "M_FORBIDDEN");

    // logout_devices defaults to true: other devices are logged out, this one is not.
    assert_eq!(
        alice.whoami().await.0,
        200,
        "the device that changed the password must stay logged in"
    );
    let got = other_device.whoami().await;
    assert_err(&got, 401, "M_UNKNOWN_TOKEN");

    // logout_devices: false keeps other sessions.
    let keep = server.login("alice", new_pw).await;
    let (st, r) = uia_password(
        &alice,
        "account/password",
        json!({"new_password": "third-password-xyz", "logout_devices": false}),
        new_pw,
    )
    .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(
        keep.whoami().await.0,
        200,
        "logout_devices=false must keep other devices"
    );

    // Weak new password refused.
    let (st, r) = uia_password(
        &alice,
        "account/password",
        json!({"new_password": "short"}),
        "third-password-xyz",
    )
    .await;
    assert_err(&(st, r), 400, "M_WEAK_PASSWORD");
    assert_eq!(server.login_raw("alice", "third-password-xyz").await.0, 200);

    // The password stage naming the user by the legacy `user`, or not at
    // all (the session's user is meant).
    let mut password = "third-password-xyz".to_owned();
    for (i, who) in [json!({"user": "alice"}), json!({})].into_iter().enumerate() {
        let next = format!("password-number-{i}-xyz");
        let body = json!({"new_password": next, "logout_devices": false});
        let (st, first) = keep.post("account/password", body.clone()).await;
        assert_eq!(st, 401, "{first}");
        let mut auth = json!({"type": "m.login.password", "password": password, "session": first["session"]});
        auth.as_object_mut().unwrap().extend(who.as_object().unwrap().clone());
        let mut b = body;
        b["auth"] = auth;
        let (st, r) = keep.post("account/password", b).await;
        assert_eq!(st, 200, "{who}: {r}");
        assert_eq!(server.login_raw("alice", &next).await.0, 200, "{who}");
        password = next;
    }
    // An `auth` object of the wrong shape.
    let got = keep
        .post(
            "account/password",
            json!({"new_password": "whatever-password", "auth": {"type": "m.login.password", "identifier": "alice"}}),
        )
        .await;
    assert_err(&got, 400, "M_BAD_JSON");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_deactivation() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;

    let (st, r) = uia_password(&alice, "account/deactivate", json!({}), &alice.password).await;
    assert_eq!(st, 200, "deactivate: {r}");
    let unbind = r["id_server_unbind_result"].as_str().unwrap_or("");
    assert!(
        unbind == "success" || unbind == "no-support",
        "id_server_unbind_result is required: {r}"
    );

    let got = alice.whoami().await;
    assert_err(&got, 401, "M_UNKNOWN_TOKEN");
    let (st, r) = server.login_raw("alice", &alice.password).await;
    assert_eq!(st, 403, "deactivated user logged in: {r}");
    assert!(
        r["errcode"] == "M_USER_DEACTIVATED" || r["errcode"] == "M_FORBIDDEN",
        "{r}"
    );
    assert!(r["access_token"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_displayname_and_avatar() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let dn_path = format!("profile/{}/displayname", enc(&alice.user_id));

    let (st, r) = alice.put(&dn_path, json!({"displayname": "Alice 🌡"})).await;
    assert_eq!(st, 200, "{r}");
    let (st, dn) = bob.get(&dn_path).await;
    assert_eq!((st, dn.clone()), (200, json!({"displayname": "Alice 🌡"})), "{dn}");
    // Profile lookups need no auth... or at least work with it.
    let (st, prof) = alice.get(&format!("profile/{}", enc(&alice.user_id))).await;
    assert_eq!(st, 200, "{prof}");
    assert_eq!(prof["displayname"], "Alice 🌡");

    let av_path = format!("profile/{}/avatar_url", enc(&alice.user_id));
    let (st, _) = alice.put(&av_path, json!({"avatar_url": "mxc://localhost/abc"})).await;
    assert_eq!(st, 200);
    let (st, av) = alice.get(&av_path).await;
    assert_eq!((st, av), (200, json!({"avatar_url": "mxc://localhost/abc"})));
    let (_, prof) = alice.get(&format!("profile/{}", enc(&alice.user_id))).await;
    assert_eq!(prof["avatar_url"], "mxc://localhost/abc");
    assert_eq!(prof["displayname"], "Alice 🌡");

    // Bob cannot change Alice's profile.
    let got = bob.put(&dn_path, json!({"displayname": "pwned"})).await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let (_, dn) = alice.get(&dn_path).await;
    assert_eq!(dn["displayname"], "Alice 🌡");

    // Unknown user.
    let got = alice.get(&format!("profile/{}", enc(&server.user_id("ghost")))).await;
    assert_err(&got, 404, "M_NOT_FOUND");

    // Not a user ID at all.
    let got = alice.get("profile/not-a-user-id").await;
    assert_err(&got, 400, "M_INVALID_PARAM");
    let got = alice.get("profile/not-a-user-id/displayname").await;
    assert_err(&got, 400, "M_INVALID_PARAM");

    // Fields Weft does not keep, read or written, and a value that is not a string.
    let tz_path = format!("profile/{}/m.tz", enc(&alice.user_id));
    assert_err(&alice.get(&tz_path).await, 404, "M_UNRECOGNIZED");
    assert_err(
        &alice.put(&tz_path, json!({"m.tz": "Europe/Berlin"})).await,
        404,
        "M_UNRECOGNIZED",
    );
    let other_path = format!("profile/{}/org.example.mood", enc(&alice.user_id));
    assert_err(&alice.get(&other_path).await, 404, "M_UNRECOGNIZED");
    assert_err(
        &alice.put(&other_path, json!({"org.example.mood": "sunny"})).await,
        404,
        "M_UNRECOGNIZED",
    );
    assert_err(&alice.put(&dn_path, json!({"displayname": 5})).await, 400, "M_BAD_JSON");
    assert_err(&alice.put(&dn_path, json!(["Alice"])).await, 400, "M_BAD_JSON");
    let (_, dn) = alice.get(&dn_path).await;
    assert_eq!(dn["displayname"], "Alice 🌡");

    // `null`, or leaving the field out, clears it.
    let (st, r) = alice.put(&dn_path, json!({"displayname": null})).await;
    assert_eq!(st, 200, "{r}");
    assert_err(&alice.get(&dn_path).await, 404, "M_NOT_FOUND");
    let (st, r) = alice.put(&av_path, json!({})).await;
    assert_eq!(st, 200, "{r}");
    assert_err(&alice.get(&av_path).await, 404, "M_NOT_FOUND");
    let (st, prof) = bob.get(&format!("profile/{}", enc(&alice.user_id))).await;
    assert_eq!((st, prof.clone()), (200, json!({})), "{prof}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_endpoints() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;

    let (st, v) = server.anon().get("/_matrix/client/versions").await;
    assert_eq!(st, 200, "{v}");
    let versions = v["versions"].as_array().unwrap_or_else(|| panic!("no versions: {v}"));
    assert!(
        versions
            .iter()
            .any(|x| x.as_str().is_some_and(|s| s.starts_with("v1."))),
        "{v}"
    );
    assert!(versions.iter().all(|x| x.is_string()), "{v}");
    // The CoAP door is on: MSC3079 is advertised as that MSC describes.
    let low_bandwidth = &v["m.low_bandwidth"];
    for key in ["cbor_enum_version", "coap_enum_version", "observe"] {
        assert_eq!(low_bandwidth[key], 1, "{v}");
    }
    // The DTLS listener runs too (on a port of its own).
    assert!(low_bandwidth["dtls"].as_u64().is_some_and(|p| p > 0), "{v}");
    assert_eq!(&v["org.matrix.msc3079.low_bandwidth"], low_bandwidth, "{v}");
    assert_eq!(v["unstable_features"]["org.matrix.msc3079"], true, "{v}");

    let got = server.anon().get("capabilities").await;
    assert_err(&got, 401, "M_MISSING_TOKEN");
    let (st, caps) = alice.get("capabilities").await;
    assert_eq!(st, 200, "{caps}");
    let rv = &caps["capabilities"]["m.room_versions"];
    let default = rv["default"]
        .as_str()
        .unwrap_or_else(|| panic!("no default room version: {caps}"));
    assert_eq!(
        rv["available"][default], "stable",
        "default room version must be available and stable: {caps}"
    );
    let cp = &caps["capabilities"]["m.change_password"];
    assert!(
        cp.is_null() || cp["enabled"].is_boolean(),
        "m.change_password.enabled must be a boolean: {caps}"
    );
    // Every capability is stated, even at the spec's default value.
    let c = &caps["capabilities"];
    assert_eq!(c["m.change_password"], json!({"enabled": true}), "{caps}");
    assert_eq!(c["m.set_displayname"], json!({"enabled": true}), "{caps}");
    assert_eq!(c["m.set_avatar_url"], json!({"enabled": true}), "{caps}");
    assert_eq!(c["m.3pid_changes"], json!({"enabled": false}), "{caps}");
    assert_eq!(c["m.get_login_token"], json!({"enabled": false}), "{caps}");
    assert_eq!(
        c["m.profile_fields"],
        json!({"enabled": true, "allowed": ["displayname", "avatar_url"]}),
        "{caps}"
    );
    // The capability tells the truth: no login-token route.
    let got = alice.post("/_matrix/client/v1/login/get_token", json!({})).await;
    assert_err(&got, 404, "M_UNRECOGNIZED");
    assert_eq!(
        rv["available"],
        json!({"10": "stable", "11": "stable", "12": "stable"}),
        "{caps}"
    );

    // /versions needs no token, and a stale one sent along is not looked at.
    let (st, v2) = server
        .with_token("not-a-real-token")
        .get("/_matrix/client/versions")
        .await;
    assert_eq!((st, &v2), (200, &v), "{v2}");
    // Served at that one path, not under the version prefixes.
    let got = server.anon().get("versions").await;
    assert_err(&got, 404, "M_UNRECOGNIZED");

    // A room created without a version uses the advertised default.
    let room = alice.create_room(json!({})).await;
    let (st, create) = alice.get(&format!("rooms/{}/state/m.room.create", enc(&room))).await;
    assert_eq!(st, 200, "{create}");
    let rv_of_room = create["room_version"].as_str().unwrap_or("1");
    assert_eq!(rv_of_room, default, "{create}");

    let (st, wk) = server.anon().get("/.well-known/matrix/client").await;
    assert_eq!(st, 200, "{wk}");
    assert_eq!(
        wk.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()),
        Some(vec!["m.homeserver".to_owned()]),
        "{wk}"
    );
    let base = wk["m.homeserver"]["base_url"]
        .as_str()
        .unwrap_or_else(|| panic!("no m.homeserver.base_url: {wk}"));
    // A client following discovery must reach this server.
    let url = format!("{}/_matrix/client/versions", base.trim_end_matches('/'));
    let resp = server.http.get(&url).send().await;
    assert!(
        resp.as_ref().is_ok_and(|r| r.status().is_success()),
        "well-known base_url {base} does not reach the server (actual {}): {resp:?}",
        server.base_url()
    );
}

fn token_from_stdout(out: &str) -> String {
    out.split_whitespace()
        .last()
        .unwrap_or_else(|| panic!("no token printed: {out:?}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_cli_user_management() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;

    let (ok, out, err) = server.cli("user", "create", &["carol", "--password", "carol-password-1"]);
    assert!(ok, "weft user create failed: {out}\n{err}");
    let (ok, out, err) = server.cli("user", "create", &["dave", "--password", "dave-password-1", "--admin"]);
    assert!(ok, "weft user create --admin failed: {out}\n{err}");
    let (ok, _, _) = server.cli("user", "create", &["carol", "--password", "other-password"]);
    assert!(!ok, "creating an existing user must fail");
    let (ok, _, _) = server.cli("user", "create", &["Bad Name!", "--password", "other-password"]);
    assert!(!ok, "creating an invalid user name must fail");

    // The running server sees users created by the CLI.
    let carol = server.login("carol", "carol-password-1").await;
    assert_eq!(carol.user_id, server.user_id("carol"));
    let (_, r) = server.login_raw("carol", "other-password").await;
    assert!(
        r["access_token"].is_null(),
        "second create must not overwrite the password"
    );

    let (ok, out, err) = server.cli("user", "list", &[]);
    assert!(ok, "weft user list failed: {err}");
    for name in ["alice", "carol", "dave"] {
        assert!(
            out.lines()
                .any(|l| l.contains(&format!("@{name}:")) || l.split_whitespace().any(|w| w == name)),
            "`weft user list` does not show {name}:\n{out}"
        );
    }

    // Token minting.
    let (ok, out, err) = server.cli("user", "token", &["carol"]);
    assert!(ok, "weft user token failed: {err}");
    let tok = token_from_stdout(&out);
    let (st, who) = server.with_token(&tok).whoami().await;
    assert_eq!(st, 200, "token from CLI rejected: {who}");
    assert_eq!(who["user_id"], carol.user_id.as_str());
    let (ok, out, err) = server.cli("user", "token", &["carol", "--device-id", "CLIDEV"]);
    assert!(ok, "{err}");
    let cli_dev = token_from_stdout(&out);
    let (_, who) = server.with_token(&cli_dev).whoami().await;
    assert_eq!(who["device_id"], "CLIDEV");
    let (ok, _, _) = server.cli("user", "token", &["nobody"]);
    assert!(!ok, "token for a nonexistent user must fail");

    // Each device has its own token: revoking one leaves the others.
    let (ok, out, err) = server.cli("user", "token", &["carol", "--device-id", "SENSOR2"]);
    assert!(ok, "{err}");
    let sensor2 = token_from_stdout(&out);
    assert!(
        sensor2.len() <= 40,
        "tokens stay short for constrained devices: {sensor2}"
    );
    let (ok, out, err) = server.cli("user", "devices", &["carol"]);
    assert!(ok, "{err}");
    let listed: Vec<&str> = out.lines().filter_map(|l| l.split('\t').next()).collect();
    assert!(listed.contains(&"CLIDEV") && listed.contains(&"SENSOR2"), "{out}");
    let (ok, out, err) = server.cli("user", "revoke", &["carol", "CLIDEV"]);
    assert!(ok, "{out}{err}");
    let got = server.with_token(&cli_dev).whoami().await;
    assert_err(&got, 401, "M_UNKNOWN_TOKEN");
    let (st, who) = server.with_token(&sensor2).whoami().await;
    assert_eq!((st, who["device_id"].as_str()), (200, Some("SENSOR2")), "{who}");
    let (ok, out, _) = server.cli("user", "devices", &["carol"]);
    assert!(ok && !out.contains("CLIDEV"), "{out}");
    let (ok, _, _) = server.cli("user", "revoke", &["carol", "CLIDEV"]);
    assert!(!ok, "revoking an unknown device must fail");

    // Password reset.
    let (ok, _, err) = server.cli("user", "reset-password", &["carol", "--password", "carol-password-2"]);
    assert!(ok, "{err}");
    assert_eq!(server.login_raw("carol", "carol-password-2").await.0, 200);
    assert_eq!(
        server.login_raw("carol", "carol-password-1").await.0,
        403,
        "old password still works after reset"
    );

    // Deactivation: login refused and existing tokens revoked.
    let (ok, _, err) = server.cli("user", "deactivate", &["carol"]);
    assert!(ok, "{err}");
    assert_eq!(
        server.login_raw("carol", "carol-password-2").await.0,
        403,
        "deactivated user can still log in"
    );
    let got = carol.whoami().await;
    assert_err(&got, 401, "M_UNKNOWN_TOKEN");
    let got = server.with_token(&tok).whoami().await;
    assert_err(&got, 401, "M_UNKNOWN_TOKEN");

    // Unaffected user.
    assert_eq!(alice.whoami().await.0, 200);
}
