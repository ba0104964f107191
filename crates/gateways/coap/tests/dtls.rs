//! End-to-end tests of the CoAP door's DTLS listener: the real `weft`
//! binary, real UDP, keys minted with the real `weft user psk`, and real
//! DTLS clients (libcoap's `coap-client-openssl`/`-gnutls`, and `dimpl`'s
//! client side driving CoAP messages built with `coap-lite`).

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType as M, ResponseType as R};
use common::{
    Client, Request, Server, TestServer, cbor, coap_client_dtls, coap_client_named, create_room, enc, register,
    request_packet, uncbor,
};
use dimpl::{Config, Dtls, PskResolver};
use serde_json::{Value, json};
use tokio::net::UdpSocket;
use weft_testkit::{ServeSpec, ServerProcess, weft_bin};

fn send_path(room: &str) -> String {
    format!("/_m/c/a/v1/r/{room}/s/m.room.message")
}

/// Runs a libcoap client against `coaps://ADDR{path}` with a PSK, the
/// body (if any) on stdin; gives up after 4 s without an answer.
async fn coaps_client(bin: &str, addr: SocketAddr, path: &str, psk: (&str, &str), body: Option<Vec<u8>>) -> Output {
    let uri = format!("coaps://{addr}{path}");
    let mut args: Vec<String> = vec![
        "-u".into(),
        psk.0.into(),
        "-k".into(),
        psk.1.into(),
        "-B".into(),
        "4".into(),
    ];
    if body.is_some() {
        args.extend(["-m", "post", "-t", "60", "-f", "-"].map(String::from));
    } else {
        args.extend(["-A", "50"].map(String::from));
    }
    args.push(uri);
    let bin = bin.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = Command::new(bin)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run coap-client");
        let mut stdin = child.stdin.take().unwrap();
        if let Some(b) = body {
            stdin.write_all(&b).unwrap();
        }
        drop(stdin);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

/// Registers bob and has him join alice's room: (token, user ID).
async fn join_bob(s: &Server, alice_token: &str, room: &str) -> (String, String) {
    let bob = s.register("bob").await;
    s.with_token(alice_token).invite(room, &bob.user_id).await;
    bob.join(room).await;
    (bob.access_token, bob.user_id)
}

/// No CoAP answer came back (libcoap logs its failure on stdout).
fn assert_unanswered(out: &Output) {
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        ciborium::from_reader::<Value, _>(out.stdout.as_slice()).is_err() || out.stdout.is_empty(),
        "answered: {text:?}"
    );
    assert!(!text.contains("event_id"), "answered: {text:?}");
}

/// The talk's compact POST over `coaps://` with a device's pre-shared key
/// and no access token, using libcoap's OpenSSL client; the event is
/// alice's, from the PSK's device, and HTTP sees it.
#[tokio::test]
async fn libcoap_posts_over_dtls_with_a_psk() {
    let Some(bin) = coap_client_dtls("coap-client-openssl") else {
        return;
    };
    let (s, token, room) = Server::with_alice_and_room().await;
    let (identity, key) = s.mint_psk("alice", "SENSOR1").await;
    assert!(identity.len() >= 16 && key.len() >= 32, "{identity} {key}");
    assert!(key.chars().all(|c| c.is_ascii_alphanumeric()), "printable key {key}");

    let content = json!({"msgtype": "m.text", "body": "hello over DTLS"});
    let out = coaps_client(
        &bin,
        s.coaps,
        &send_path(&enc(&room)),
        (&identity, &key),
        Some(cbor(&content)),
    )
    .await;
    assert!(out.status.success(), "{bin}: {}", String::from_utf8_lossy(&out.stderr));
    let v = uncbor(&out.stdout);
    let event_id = v["event_id"].as_str().expect("event_id in the CBOR answer").to_owned();

    let msgs = s.http_messages(&token, &room, "m.room.message").await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["event_id"], event_id.as_str());
    assert_eq!(msgs[0]["content"], content);
    assert_eq!(msgs[0]["sender"], "@alice:localhost:8008");

    // The session is the PSK's device, with OpenSSL's client and, when
    // installed, GnuTLS's too.
    let gnutls = coap_client_named("coap-client-gnutls");
    for client in std::iter::once(bin.as_str()).chain(gnutls.as_deref()) {
        let out = coaps_client(
            client,
            s.coaps,
            "/_matrix/client/v3/account/whoami",
            (&identity, &key),
            None,
        )
        .await;
        let who: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{client} whoami: {e}: {}", String::from_utf8_lossy(&out.stdout)));
        assert_eq!(who["user_id"], "@alice:localhost:8008");
        assert_eq!(who["device_id"], "SENSOR1");
    }
}

/// Runs `bin ARGS` in `dir` (so `-f body.cbor` is a relative path, as a
/// user types it), killed if it has not finished within 30 s.
async fn run_in(dir: &Path, bin: &str, args: &[&str]) -> Output {
    let child = tokio::process::Command::new(bin)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("run {bin}: {e}"));
    tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{bin} {args:?}: not done within 30 s"))
        .expect("coap-client's output")
}

/// The DER of the first certificate in a PEM file.
fn pem_der(path: &Path) -> Vec<u8> {
    use base64::Engine;
    let pem = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let b64: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
}

/// The talk's example exactly as printed: `coap-client-openssl -m post -f
/// body.cbor "coaps://HOST:PORT/_m/c/a/v1/r/ROOM/s/m.room.message?a=TOKEN"`.
/// No pre-shared key, so the session uses the server's certificate, and
/// the token in `?a=` authenticates the request; the event is alice's and
/// HTTP reads it back. The same with libcoap's GnuTLS client.
#[tokio::test]
async fn talk_example_posts_over_dtls_with_a_token() {
    let (s, token, room) = Server::with_alice_and_room().await;
    let dir = tempfile::tempdir().unwrap();
    let mut sent: Vec<(String, Value)> = Vec::new();
    for name in ["coap-client-openssl", "coap-client-gnutls"] {
        let Some(bin) = coap_client_named(name) else {
            continue;
        };
        let content = json!({"msgtype": "m.text", "body": format!("hello from {name}")});
        std::fs::write(dir.path().join("body.cbor"), cbor(&content)).unwrap();
        let uri = format!("coaps://{}/_m/c/a/v1/r/{room}/s/m.room.message?a={token}", s.coaps);
        let out = run_in(dir.path(), &bin, &["-m", "post", "-f", "body.cbor", &uri]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {stderr}");
        let v: Value = ciborium::from_reader(out.stdout.as_slice())
            .unwrap_or_else(|e| panic!("{name}: answer not CBOR ({e}): {:?} {stderr}", out.stdout));
        let event_id = v["event_id"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no event_id in {v}"));
        sent.push((event_id.to_owned(), content));

        let msgs = s.http_messages(&token, &room, "m.room.message").await;
        assert_eq!(msgs.len(), sent.len(), "{name}: {msgs:?}");
        for (m, (id, content)) in msgs.iter().zip(&sent) {
            assert_eq!(m["event_id"], id.as_str());
            assert_eq!(m["content"], *content);
            assert_eq!(m["sender"], "@alice:localhost:8008");
        }
    }
    assert!(!sent.is_empty(), "no libcoap DTLS client ran");
}

/// A certificate session (a client without a pre-shared key) is
/// authenticated per request, as on plain CoAP: without a token 4.01
/// `M_MISSING_TOKEN` and nothing stored; with `?a=` or option 256 the
/// token's user. DTLS 1.2 and 1.3; the certificate served is the one
/// generated for MQTT over TLS.
#[tokio::test]
async fn certificate_session_needs_a_token() {
    let (s, token, room) = Server::with_alice_and_room().await;
    let (bob_token, bob) = join_bob(&s, &token, &room).await;
    let generated = pem_der(&s.data_dir.join("tls/mqtt.crt"));
    let path = send_path(&room);
    for version in [Version::Dtls12, Version::Dtls13] {
        let mut c = DtlsClient::connect_cert(s.coaps, version)
            .await
            .unwrap_or_else(|e| panic!("{version:?} handshake: {e}"));
        assert_eq!(c.peer_cert.as_ref(), Some(&generated), "{version:?}");
        let (code, v) = c
            .call(Request::new(M::Post, &path).cbor(&json!({"msgtype": "m.text", "body": "no token"})))
            .await;
        assert_eq!(code, R::Unauthorized, "{version:?}: {v}");
        assert_eq!(v["errcode"], "M_MISSING_TOKEN");
        let (code, v) = c.call(Request::new(M::Get, "/_matrix/client/v3/account/whoami")).await;
        assert_eq!(code, R::Unauthorized, "{version:?}: {v}");

        let body = json!({"msgtype": "m.text", "body": format!("{version:?}")});
        let (code, v) = c.call(Request::new(M::Post, &path).q("a", &token).cbor(&body)).await;
        assert_eq!(code, R::Created, "{version:?}: {v}");
        let (code, v) = c
            .call(
                Request::new(M::Get, "/_matrix/client/v3/account/whoami")
                    .opt(CoapOption::Unknown(256), bob_token.as_bytes().to_vec()),
            )
            .await;
        assert_eq!(code, R::Content, "{version:?}: {v}");
        assert_eq!(v["user_id"], bob.as_str());
    }
    let msgs = s.http_messages(&token, &room, "m.room.message").await;
    let bodies: Vec<&Value> = msgs.iter().map(|m| &m["content"]["body"]).collect();
    assert_eq!(bodies, ["Dtls12", "Dtls13"]);
    assert!(msgs.iter().all(|m| m["sender"] == "@alice:localhost:8008"));

    // libcoap without a token: 4.01, nothing stored.
    if let Some(bin) = coap_client_dtls("coap-client-openssl") {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("body.cbor"), cbor(&json!({"body": "no token"}))).unwrap();
        let uri = format!("coaps://{}{path}", s.coaps);
        let out = run_in(dir.path(), &bin, &["-m", "post", "-f", "body.cbor", &uri]).await;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("4.01"), "{text}");
        assert!(text.contains("M_MISSING_TOKEN"), "{text}");
        assert_eq!(s.http_messages(&token, &room, "m.room.message").await.len(), 2);
    }
}

/// `[coap] dtls_cert`/`dtls_key` serve the operator's pair; an MQTT pair
/// DTLS cannot use (an Ed25519 key) gives way to the generated one; an
/// explicit pair DTLS cannot use stops the start with a message.
#[tokio::test]
async fn operator_certificate_and_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let write_pair = |name: &str, alg: &'static rcgen::SignatureAlgorithm| {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let cert = rcgen::CertificateParams::new(vec![format!("{name}.example.org")])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (c, k) = (
            dir.path().join(format!("{name}.crt")),
            dir.path().join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c.display().to_string(), k.display().to_string(), cert.der().to_vec())
    };
    let (ecdsa_cert, ecdsa_key, ecdsa_der) = write_pair("ecdsa", &rcgen::PKCS_ECDSA_P384_SHA384);
    let (ed_cert, ed_key, _) = write_pair("ed25519", &rcgen::PKCS_ED25519);

    // The operator's ECDSA pair.
    let s = Server::start_with(&[
        ("WEFT_COAP__DTLS_CERT", &ecdsa_cert),
        ("WEFT_COAP__DTLS_KEY", &ecdsa_key),
    ])
    .await;
    let c = DtlsClient::connect_cert(s.coaps, Version::Dtls12)
        .await
        .expect("handshake");
    assert_eq!(c.peer_cert, Some(ecdsa_der));
    drop(s);

    // MQTT's pair is Ed25519: DTLS serves the generated pair instead, and
    // PSK sessions are unaffected.
    let s = Server::start_with(&[("WEFT_MQTT__TLS_CERT", &ed_cert), ("WEFT_MQTT__TLS_KEY", &ed_key)]).await;
    let mut c = DtlsClient::connect_cert(s.coaps, Version::Dtls12)
        .await
        .expect("handshake");
    assert_eq!(c.peer_cert, Some(pem_der(&s.data_dir.join("tls/mqtt.crt"))));
    let (code, _) = c.call(Request::new(M::Get, "/_matrix/client/versions")).await;
    assert_eq!(code, R::Content);
    let (token, _) = register(&s, "alice").await;
    let room = create_room(&s, &token).await;
    let (identity, key) = s.mint_psk("alice", "SENSOR1").await;
    let mut p = DtlsClient::connect(s.coaps, &identity, key.as_bytes())
        .await
        .expect("PSK handshake");
    assert_eq!(p.peer_cert, None);
    let (code, v) = p
        .call(Request::new(M::Post, &send_path(&room)).cbor(&json!({"msgtype": "m.text", "body": "psk"})))
        .await;
    assert_eq!(code, R::Created, "{v}");
    drop(s);

    // An explicit Ed25519 pair: no start, and the reason.
    let data = dir.path().join("data");
    let spec = ServeSpec::new(weft_bin(), &data, dir.path().join("server.log"))
        .env("WEFT_COAP__DTLS_CERT", &ed_cert)
        .env("WEFT_COAP__DTLS_KEY", &ed_key);
    let mut spec = spec;
    spec.wait_coaps = true;
    spec.timeout = Duration::from_secs(20);
    let err = match ServerProcess::start(spec).await {
        Ok(_) => panic!("started with an Ed25519 DTLS key"),
        Err(e) => e,
    };
    assert!(err.contains("CoAP over DTLS") && err.contains("ECDSA"), "{err}");
}

/// A wrong key or an unknown identity fails the handshake: nothing is
/// answered and nothing is sent.
#[tokio::test]
async fn wrong_key_or_unknown_identity_fails_the_handshake() {
    let Some(bin) = coap_client_dtls("coap-client-openssl") else {
        return;
    };
    let (s, token, room) = Server::with_alice_and_room().await;
    let (identity, key) = s.mint_psk("alice", "SENSOR1").await;
    let content = json!({"msgtype": "m.text", "body": "must not arrive"});
    // The same key with its last character changed.
    let last = if key.ends_with('x') { 'y' } else { 'x' };
    let wrong_key = format!("{}{last}", &key[..key.len() - 1]);
    assert_ne!(wrong_key, key);
    for psk in [
        (identity.as_str(), wrong_key.as_str()),
        ("wpsk_nosuchidentity", key.as_str()),
    ] {
        let out = coaps_client(&bin, s.coaps, &send_path(&enc(&room)), psk, Some(cbor(&content))).await;
        assert_unanswered(&out);
    }
    // The Rust client sees the handshake fail too, both ways.
    assert!(
        DtlsClient::connect(s.coaps, "wpsk_nosuchidentity", key.as_bytes())
            .await
            .is_err()
    );
    assert!(
        DtlsClient::connect(s.coaps, &identity, wrong_key.as_bytes())
            .await
            .is_err()
    );
    assert!(s.http_messages(&token, &room, "m.room.message").await.is_empty());

    // The right key still works afterwards.
    let out = coaps_client(
        &bin,
        s.coaps,
        &send_path(&enc(&room)),
        (&identity, &key),
        Some(cbor(&content)),
    )
    .await;
    let v = uncbor(&out.stdout);
    let msgs = s.http_messages(&token, &room, "m.room.message").await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["event_id"], v["event_id"]);
}

/// Logging the device out (here: `/logout/all`) revokes its key: new
/// handshakes fail, an established session gets 4.01 at once, and an
/// observer on another session is told 4.01 instead of the next event.
#[tokio::test]
async fn revoked_psk_stops_working() {
    let (s, token, room) = Server::with_alice_and_room().await;
    let (bob_token, _) = join_bob(&s, &token, &room).await;
    let (identity, key) = s.mint_psk("alice", "SENSOR1").await;
    let mut c = DtlsClient::connect(s.coaps, &identity, key.as_bytes())
        .await
        .expect("handshake");
    let mut watcher = DtlsClient::connect(s.coaps, &identity, key.as_bytes())
        .await
        .expect("handshake");
    let mpath = format!("/_matrix/client/v3/rooms/{room}/messages");
    let (code, first) = watcher
        .exchange(&Request::new(M::Get, &mpath).opt(CoapOption::Observe, vec![]), None)
        .await;
    assert_eq!(code, R::Content);
    assert!(
        first.get_first_option(CoapOption::Observe).is_some(),
        "observer registered"
    );
    let path = send_path(&room);
    let content = json!({"msgtype": "m.text", "body": "before"});
    let (code, v) = c.call(Request::new(M::Post, &path).cbor(&content)).await;
    assert_eq!(code, R::Created, "{v}");
    assert_eq!(s.http_messages(&token, &room, "m.room.message").await.len(), 1);

    // The observer saw that one.
    let note = watcher.recv(Duration::from_secs(10)).await.expect("notification");
    watcher.ack(&note).await;
    assert_eq!(note.header.code, MessageClass::Response(R::Content));
    assert_eq!(uncbor(&note.payload)["chunk"][0]["content"], content);

    let (st, v) = s
        .with_token(&token)
        .post("/_matrix/client/v3/logout/all", json!({}))
        .await;
    assert_eq!(st, 200, "{v}");

    // Bob's next message is not shown to the revoked observer.
    let (st, v) = s
        .with_token(&bob_token)
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/b1", enc(&room)),
            json!({"msgtype": "m.text", "body": "secret"}),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let note = watcher.recv(Duration::from_secs(10)).await.expect("notification");
    watcher.ack(&note).await;
    assert_eq!(note.header.code, MessageClass::Response(R::Unauthorized));
    assert_eq!(uncbor(&note.payload)["errcode"], "M_UNKNOWN_TOKEN");

    // The open session: refused, like an unknown token.
    let (code, v) = c
        .call(Request::new(M::Post, &path).cbor(&json!({"msgtype": "m.text", "body": "after"})))
        .await;
    assert_eq!(code, R::Unauthorized, "{v}");
    assert_eq!(v["errcode"], "M_UNKNOWN_TOKEN");
    // A new handshake: fails.
    assert!(DtlsClient::connect(s.coaps, &identity, key.as_bytes()).await.is_err());
    if let Some(bin) = coap_client_dtls("coap-client-openssl") {
        let out = coaps_client(&bin, s.coaps, &path, (&identity, &key), Some(cbor(&content))).await;
        assert_unanswered(&out);
    }

    // Only the first message exists (read with a fresh login).
    let fresh = s.login("alice", &TestServer::default_password("alice")).await;
    let msgs = s.http_messages(&fresh.access_token, &room, "m.room.message").await;
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["content"]["body"], "before");
    assert_eq!(msgs[1]["content"]["body"], "secret");
}

/// A Rust DTLS client: sends over the session without a token, reads the
/// room back over the same session; an explicit token still wins; garbage
/// and bogus handshakes from other sockets disturb neither this session
/// nor the plain door.
#[tokio::test]
async fn rust_dtls_client_round_trip_and_garbage() {
    let (s, token, room) = Server::with_alice_and_room().await;
    let (bob_token, bob) = join_bob(&s, &token, &room).await;

    let (identity, key) = s.mint_psk("alice", "SENSOR2").await;
    let mut c = DtlsClient::connect(s.coaps, &identity, key.as_bytes())
        .await
        .expect("handshake");
    let path = send_path(&room);
    for i in 0..3 {
        let (code, v) = c
            .call(Request::new(M::Post, &path).cbor(&json!({"msgtype": "m.text", "body": format!("dtls {i}")})))
            .await;
        assert_eq!(code, R::Created, "{v}");
    }

    // Garbage, a truncated ClientHello and a plain CoAP message at the
    // DTLS port, from other sockets.
    let junk = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut hello = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 40, 1];
    hello.extend_from_slice(&[0u8; 12]);
    let plain = {
        let mut cl = Client::new(s.coaps).await;
        cl.packet(&Request::new(M::Get, "/_matrix/client/versions"))
            .to_bytes()
            .unwrap()
    };
    for d in [b"\x00garbage".to_vec(), vec![0xff; 2000], hello, plain] {
        junk.send_to(&d, s.coaps).await.unwrap();
    }
    // Garbage inside this session's address space: a bogus record.
    c.sock
        .send(&[23, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 9, 0, 3, 1, 2, 3])
        .await
        .unwrap();

    // An explicit token still wins over the session's device.
    let (code, v) = c
        .call(
            Request::new(M::Post, &path)
                .q("a", &bob_token)
                .cbor(&json!({"msgtype": "m.text", "body": "from bob"})),
        )
        .await;
    assert_eq!(code, R::Created, "{v}");

    // Read back over the same session.
    let mpath = format!("/_matrix/client/v3/rooms/{room}/messages");
    let (code, v) = c
        .call(Request::new(M::Get, &mpath).q("dir", "f").q("limit", "50"))
        .await;
    assert_eq!(code, R::Content, "{v}");
    let msgs: Vec<&Value> = v["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .collect();
    assert_eq!(msgs.len(), 4);
    for (i, m) in msgs[..3].iter().enumerate() {
        assert_eq!(m["content"]["body"], format!("dtls {i}"));
        assert_eq!(m["sender"], "@alice:localhost:8008");
    }
    assert_eq!(msgs[3]["sender"], bob.as_str());

    // HTTP agrees, and the plain door is unaffected.
    let http = s.http_messages(&token, &room, "m.room.message").await;
    assert_eq!(http.len(), 4);
    assert_eq!(http[0]["content"], json!({"msgtype": "m.text", "body": "dtls 0"}));
    let mut plain = Client::new(s.coap).await;
    let (code, v) = plain.call_cbor(Request::new(M::Get, "/_matrix/client/versions")).await;
    assert_eq!(code, R::Content);
    assert!(v["versions"].as_array().is_some_and(|a| !a.is_empty()));
    // /versions over DTLS advertises the DTLS port (MSC3079).
    let (code, v) = c.call(Request::new(M::Get, "/_matrix/client/versions")).await;
    assert_eq!(code, R::Content);
    assert_eq!(v["org.matrix.msc3079.low_bandwidth"]["dtls"], s.coaps.port());
}

/// At most `dtls_max_sessions` sessions: a further handshake is ignored
/// while the others are busy, and the existing sessions keep working.
#[tokio::test]
async fn session_cap_holds() {
    let s = Server::start_with(&[("WEFT_COAP__DTLS_MAX_SESSIONS", "2")]).await;
    let (token, _) = register(&s, "alice").await;
    let room = create_room(&s, &token).await;
    let (identity, key) = s.mint_psk("alice", "CAP").await;
    let mut a = DtlsClient::connect(s.coaps, &identity, key.as_bytes())
        .await
        .expect("first");
    let mut b = DtlsClient::connect(s.coaps, &identity, key.as_bytes())
        .await
        .expect("second");
    assert!(
        DtlsClient::connect(s.coaps, &identity, key.as_bytes()).await.is_err(),
        "third refused"
    );
    let path = send_path(&room);
    for c in [&mut a, &mut b] {
        let (code, v) = c
            .call(Request::new(M::Post, &path).cbor(&json!({"msgtype": "m.text", "body": "capped"})))
            .await;
        assert_eq!(code, R::Created, "{v}");
    }
    assert_eq!(s.http_messages(&token, &room, "m.room.message").await.len(), 2);
}

// ---- a small DTLS client on dimpl ----

struct FixedKey(Vec<u8>);

impl PskResolver for FixedKey {
    fn resolve(&self, _identity: &[u8]) -> Option<Vec<u8>> {
        Some(self.0.clone())
    }
}

struct DtlsClient {
    sock: UdpSocket,
    dtls: Dtls,
    timer: Option<Instant>,
    inbox: VecDeque<Vec<u8>>,
    connected: bool,
    /// The server's certificate (DER), on a certificate session.
    peer_cert: Option<Vec<u8>>,
    mid: u16,
    token: u32,
}

/// Which DTLS a certificate-mode client speaks.
#[derive(Clone, Copy, Debug)]
enum Version {
    Dtls12,
    Dtls13,
}

impl DtlsClient {
    /// Handshakes with `server` with a pre-shared key; `Err` if it does
    /// not complete within 4 s.
    async fn connect(server: SocketAddr, identity: &str, key: &[u8]) -> Result<DtlsClient, String> {
        let config = Config::builder()
            .with_psk_client(identity.as_bytes().to_vec(), Arc::new(FixedKey(key.to_vec())))
            .build()
            .map_err(|e| e.to_string())?;
        Self::handshake(server, Dtls::new_12_psk(Arc::new(config), Instant::now())).await
    }

    /// Handshakes with `server` without a pre-shared key: the server's
    /// certificate suites. The client has a throwaway certificate of its
    /// own (the engine wants one; the server does not ask for it).
    async fn connect_cert(server: SocketAddr, version: Version) -> Result<DtlsClient, String> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["client".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let own = dimpl::DtlsCertificate {
            certificate: cert.der().to_vec(),
            private_key: key.serialize_der(),
        };
        let config = Arc::new(Config::default());
        let dtls = match version {
            Version::Dtls12 => Dtls::new_12(config, own, Instant::now()),
            Version::Dtls13 => Dtls::new_13(config, own, Instant::now()),
        };
        Self::handshake(server, dtls).await
    }

    async fn handshake(server: SocketAddr, mut dtls: Dtls) -> Result<DtlsClient, String> {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.connect(server).await.unwrap();
        dtls.set_active(true);
        let mut c = DtlsClient {
            sock,
            dtls,
            timer: None,
            inbox: VecDeque::new(),
            connected: false,
            peer_cert: None,
            mid: 7000,
            token: 1,
        };
        c.dtls.handle_timeout(Instant::now()).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(4);
        while !c.connected {
            if !c.turn(deadline).await? {
                return Err("handshake timed out".into());
            }
        }
        Ok(c)
    }

    /// Sends what the engine has, then waits for one datagram or timer
    /// (until `deadline`: then `Ok(false)`).
    async fn turn(&mut self, deadline: Instant) -> Result<bool, String> {
        let was_connected = self.connected;
        let mut buf = vec![0u8; 4096];
        loop {
            match self.dtls.poll_output(&mut buf) {
                dimpl::Output::Packet(p) => {
                    let p = p.to_vec();
                    self.sock.send(&p).await.map_err(|e| e.to_string())?;
                }
                dimpl::Output::Timeout(t) => {
                    self.timer = Some(t);
                    break;
                }
                dimpl::Output::Connected => self.connected = true,
                dimpl::Output::PeerCert(d) => self.peer_cert = Some(d.to_vec()),
                dimpl::Output::ApplicationData(d) => self.inbox.push_back(d.to_vec()),
                dimpl::Output::CloseNotify => return Err("closed".into()),
                _ => {}
            }
        }
        if self.connected != was_connected || !self.inbox.is_empty() {
            return Ok(true);
        }
        let wake = self.timer.unwrap_or(deadline).min(deadline);
        let mut rbuf = vec![0u8; 65_536];
        tokio::select! {
            r = self.sock.recv(&mut rbuf) => {
                let n = r.map_err(|e| e.to_string())?;
                self.dtls.handle_timeout(Instant::now()).map_err(|e| e.to_string())?;
                self.dtls.handle_packet(&rbuf[..n]).map_err(|e| e.to_string())?;
            }
            _ = tokio::time::sleep_until(wake.into()) => {
                if Instant::now() >= deadline {
                    return Ok(false);
                }
                self.dtls.handle_timeout(Instant::now()).map_err(|e| e.to_string())?;
            }
        }
        Ok(true)
    }

    async fn recv(&mut self, wait: Duration) -> Option<Packet> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(d) = self.inbox.pop_front() {
                return Some(Packet::from_bytes(&d).expect("server sent a valid CoAP message"));
            }
            if !self.turn(deadline).await.ok()? {
                return None;
            }
        }
    }

    /// Acknowledges a confirmable message (a separate response or a
    /// notification).
    async fn ack(&mut self, p: &Packet) {
        if p.header.get_type() == MessageType::Confirmable {
            let mut a = Packet::new();
            a.header.set_type(MessageType::Acknowledgement);
            a.header.code = MessageClass::Empty;
            a.header.message_id = p.header.message_id;
            self.send(&a.to_bytes().unwrap()).await;
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.dtls.handle_timeout(Instant::now()).unwrap();
        self.dtls.send_application_data(bytes).unwrap();
        let mut buf = vec![0u8; 4096];
        loop {
            match self.dtls.poll_output(&mut buf) {
                dimpl::Output::Packet(p) => {
                    let p = p.to_vec();
                    self.sock.send(&p).await.unwrap();
                }
                dimpl::Output::Timeout(t) => {
                    self.timer = Some(t);
                    break;
                }
                dimpl::Output::ApplicationData(d) => self.inbox.push_back(d.to_vec()),
                _ => {}
            }
        }
    }

    /// A confirmable request → (code, body as JSON from CBOR); follows a
    /// separate response and Block2.
    async fn call(&mut self, r: Request<'_>) -> (R, Value) {
        let (code, first) = self.exchange(&r, None).await;
        let mut body = first.payload.clone();
        let mut block = first.get_first_option(CoapOption::Block2).cloned();
        while let Some(b) = block {
            let v = b.iter().fold(0u32, |a, x| (a << 8) | u32::from(*x));
            if v & 0x8 == 0 {
                break;
            }
            let next = (((v >> 4) + 1) << 4) | (v & 7);
            let (_, resp) = self.exchange(&r, Some(next)).await;
            body.extend_from_slice(&resp.payload);
            block = resp.get_first_option(CoapOption::Block2).cloned();
        }
        (code, uncbor(&body))
    }

    async fn exchange(&mut self, r: &Request<'_>, block2: Option<u32>) -> (R, Packet) {
        self.mid = self.mid.wrapping_add(1);
        self.token += 1;
        let mut p = request_packet(r, self.mid, self.token);
        if let Some(b) = block2 {
            let vb = b.to_be_bytes();
            let skip = vb.iter().take_while(|x| **x == 0).count();
            p.add_option(CoapOption::Block2, vb[skip..].to_vec());
        }
        let bytes = p.to_bytes().unwrap();
        let mut resp = None;
        for _ in 0..3 {
            self.send(&bytes).await;
            if let Some(r) = self.recv(Duration::from_secs(5)).await {
                resp = Some(r);
                break;
            }
        }
        let mut resp = resp.expect("no response over DTLS");
        if resp.header.code == MessageClass::Empty {
            resp = self.recv(Duration::from_secs(40)).await.expect("separate response");
            self.ack(&resp).await;
        }
        assert_eq!(resp.get_token(), p.get_token());
        let code = match resp.header.code {
            MessageClass::Response(c) => c,
            other => panic!("not a response: {other:?}"),
        };
        (code, resp)
    }
}
