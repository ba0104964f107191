//! The admin CLI and the running server: with a server up, `weft user …`
//! goes through its admin socket (so the server publishes what the command
//! writes); with none, the CLI opens the database itself under the data
//! directory lock, which also keeps a second `weft serve` off the directory.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn socket_of(server: &TestServer) -> std::path::PathBuf {
    server.data_dir.join("admin.sock")
}

fn server_log(server: &TestServer) -> String {
    std::fs::read_to_string(server.stderr_log_path()).unwrap_or_default()
}

/// How many times the server logged running `op` over its admin socket,
/// once that count reaches `expected` (the log is copied to its file by
/// another thread, so the last line may come a moment late) or after 5 s.
fn socket_runs(server: &TestServer, op: &str, expected: usize) -> usize {
    let needle = format!("admin command {op} over {}", socket_of(server).display());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = server_log(server).matches(&needle).count();
        if n >= expected || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `weft user …` on the server's data directory (off the async runtime).
async fn cli(server: &TestServer, cmd: &str, rest: &[&str]) -> (bool, String, String) {
    let rest: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
    tokio::task::block_in_place(|| {
        let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
        server.cli("user", cmd, &rest)
    })
}

/// The environment `TestServer` gives the server, for a second one.
fn serve_command(data_dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_weft"));
    for (k, _) in std::env::vars() {
        if k.starts_with("WEFT_") {
            cmd.env_remove(&k);
        }
    }
    cmd.arg("serve").arg("--data-dir").arg(data_dir);
    for (k, v) in [
        ("WEFT_LISTEN", "127.0.0.1:0"),
        ("WEFT_REGISTRATION__MODE", "open"),
        ("WEFT_MQTT__LISTEN", "127.0.0.1:0"),
        ("WEFT_MQTT__TLS_LISTEN", "127.0.0.1:0"),
        ("WEFT_COAP__LISTEN", "127.0.0.1:0"),
        ("WEFT_COAP__DTLS_LISTEN", "127.0.0.1:0"),
    ] {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// One raw request line on the admin socket; the answer line as JSON.
fn raw_request(socket: &Path, line: &str) -> Value {
    let mut stream = UnixStream::connect(socket).expect("connect admin socket");
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    stream.write_all(line.as_bytes()).unwrap();
    stream.write_all(b"\n").unwrap();
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).expect("read answer");
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("answer {answer:?} is not JSON: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deactivate_via_running_server_wakes_sync_of_other_members() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let room = room_with(&alice, &bob, "private_chat").await;
    let first = bob.sync(None, 0).await;
    let since = first["next_batch"].as_str().expect("next_batch").to_owned();

    // Bob long-polls; the deactivation must end his wait with alice's leave.
    let poll = {
        let bob = bob.clone();
        let since = since.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let sync = bob.sync(Some(&since), 30_000).await;
            (sync, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, out, err) = cli(&server, "deactivate", &["alice"]).await;
    assert!(ok, "weft user deactivate: {out}\n{err}");
    assert_eq!(out, format!("deactivated {}\n", alice.user_id));
    let (sync, waited) = poll.await.expect("poll task");
    let leaves: Vec<Value> = of_type(&timeline(&sync, &room), "m.room.member")
        .into_iter()
        .filter(|e| e["state_key"] == alice.user_id.as_str() && e["content"]["membership"] == "leave")
        .collect();
    assert_eq!(leaves.len(), 1, "bob's sync should carry alice's leave: {sync}");
    assert!(
        waited < Duration::from_secs(10),
        "the long poll ended only after {waited:?}: the server did not publish the new positions"
    );
    assert_eq!(
        socket_runs(&server, "deactivate", 1),
        1,
        "log:\n{}",
        server_log(&server)
    );

    // Her token is gone and she cannot log in.
    assert_err(&alice.whoami().await, 401, "M_UNKNOWN_TOKEN");
    let (st, _) = server.login_raw("alice", &alice.password).await;
    assert_eq!(st, 403);
    let (ok, out, _) = cli(&server, "list", &[]).await;
    assert!(ok);
    assert!(
        out.lines().any(|l| l == format!("{}\tdeactivated", alice.user_id)),
        "{out}"
    );
    // An unknown user is an error, as before.
    let (ok, _, err) = cli(&server, "deactivate", &["nobody"]).await;
    assert!(!ok);
    assert!(err.contains("no such user @nobody:"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_token_revoke_psk_go_through_the_socket() {
    let server = TestServer::start().await;
    let (ok, out, err) = cli(&server, "create", &["carol", "--password", "carol-password-1"]).await;
    assert!(ok, "{out}\n{err}");
    assert_eq!(out, format!("created {}\n", server.user_id("carol")));
    assert_eq!(socket_runs(&server, "create_user", 1), 1);
    // Refusals come back as errors, printed as before.
    let (ok, _, err) = cli(&server, "create", &["carol", "--password", "carol-password-1"]).await;
    assert!(!ok, "a second create of carol must fail");
    assert!(!err.is_empty());
    assert_eq!(socket_runs(&server, "create_user", 2), 2);
    assert_eq!(server.login_raw("carol", "carol-password-1").await.0, 200);

    let (ok, out, err) = cli(&server, "token", &["carol", "--device-id", "PLUG"]).await;
    assert!(ok, "{out}\n{err}");
    assert_eq!(err.trim(), format!("device PLUG of {}", server.user_id("carol")));
    let token = out.trim().to_owned();
    assert_eq!(socket_runs(&server, "token", 1), 1);
    let plug = server.with_token(&token);
    let (st, who) = plug.whoami().await;
    assert_eq!(st, 200, "{who}");
    assert_eq!(who["device_id"], "PLUG");

    let (ok, out, _) = cli(&server, "devices", &["carol"]).await;
    assert!(ok);
    assert!(out.lines().any(|l| l.starts_with("PLUG\tweft user token\t")), "{out}");
    assert_eq!(socket_runs(&server, "devices", 1), 1);

    let (ok, out, err) = cli(&server, "psk", &["carol", "--device-id", "PLUG"]).await;
    assert!(ok, "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with("identity wpsk_") && lines[1].starts_with("key "),
        "{out}"
    );
    assert_eq!(socket_runs(&server, "psk", 1), 1);

    let (ok, out, err) = cli(&server, "revoke", &["carol", "PLUG"]).await;
    assert!(ok, "{out}\n{err}");
    assert_eq!(out, format!("revoked device PLUG of {}\n", server.user_id("carol")));
    assert_eq!(socket_runs(&server, "revoke", 1), 1);
    // Refused at once.
    assert_err(&plug.whoami().await, 401, "M_UNKNOWN_TOKEN");
    let (ok, _, err) = cli(&server, "revoke", &["carol", "PLUG"]).await;
    assert!(!ok);
    assert!(err.contains("has no device PLUG"), "{err}");

    let (ok, out, err) = cli(&server, "reset-password", &["carol", "--password", "carol-password-2"]).await;
    assert!(ok, "{out}\n{err}");
    assert_eq!(socket_runs(&server, "reset_password", 1), 1);
    assert_eq!(server.login_raw("carol", "carol-password-2").await.0, 200);
    assert_eq!(server.login_raw("carol", "carol-password-1").await.0, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_owner_only_and_speaks_versioned_json_lines() {
    let server = TestServer::start().await;
    let socket = socket_of(&server);
    let meta = std::fs::metadata(&socket).expect("admin.sock exists while the server runs");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "admin.sock must be 0600");

    let sock = socket.clone();
    let (created, wrong_version, unknown, garbage) = tokio::task::spawn_blocking(move || {
        (
            raw_request(
                &sock,
                r#"{"v":1,"command":{"op":"create_user","name":"dora","password":"dora-password-1","admin":true}}"#,
            ),
            raw_request(&sock, r#"{"v":99,"command":{"op":"list_users"}}"#),
            raw_request(&sock, r#"{"v":1,"command":{"op":"format_disk"}}"#),
            raw_request(&sock, "not json"),
        )
    })
    .await
    .unwrap();
    assert_eq!(
        created,
        json!({"v": 1, "ok": {"outcome": "created", "user_id": server.user_id("dora")}})
    );
    assert_eq!(wrong_version["v"], 1);
    assert_eq!(wrong_version["error"]["errcode"], "M_UNRECOGNIZED", "{wrong_version}");
    assert!(wrong_version["ok"].is_null());
    assert_eq!(unknown["error"]["errcode"], "M_BAD_JSON", "{unknown}");
    assert_eq!(garbage["error"]["errcode"], "M_BAD_JSON", "{garbage}");
    let (ok, out, _) = cli(&server, "list", &[]).await;
    assert!(ok);
    assert_eq!(out, format!("{}\tadmin\n", server.user_id("dora")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_serve_on_the_same_data_dir_fails_clearly() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let data_dir = server.data_dir.clone();
    let out = tokio::task::spawn_blocking(move || {
        let mut child = serve_command(&data_dir).spawn().expect("spawn second weft serve");
        // It must give up by itself; one that runs is stopped (and fails
        // the test below).
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().expect("try_wait").is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait_with_output().expect("wait")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second server must not run");
    assert!(
        stderr.contains("another `weft serve` is already running on the data directory"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening on"));
    // The first one is unharmed, socket included.
    assert_eq!(alice.whoami().await.0, 200);
    assert!(socket_of(&server).exists());
    let (ok, _, err) = cli(&server, "list", &[]).await;
    assert!(ok, "{err}");
    assert_eq!(socket_runs(&server, "list_users", 1), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_server_the_cli_opens_the_database_itself() {
    let mut server = TestServer::start().await;
    // Served a request: its SIGTERM handler is in place.
    assert_eq!(server.anon().get("/_matrix/client/versions").await.0, 200);
    server.terminate(Duration::from_secs(20)).await.expect("clean exit");
    assert!(!socket_of(&server).exists(), "a clean shutdown removes admin.sock");

    let (ok, out, err) = cli(&server, "create", &["erin", "--password", "erin-password-1"]).await;
    assert!(ok, "{out}\n{err}");
    assert_eq!(out, format!("created {}\n", server.user_id("erin")));
    let (ok, out, err) = cli(&server, "token", &["erin", "--device-id", "LAMP"]).await;
    assert!(ok, "{out}\n{err}");
    let token = out.trim().to_owned();
    assert_eq!(socket_runs(&server, "create_user", 0), 0);

    server.restart().await;
    let (st, who) = server.with_token(&token).whoami().await;
    assert_eq!(st, 200, "{who}");
    assert_eq!(server.login_raw("erin", "erin-password-1").await.0, 200);
    let (ok, _, _) = cli(&server, "revoke", &["erin", "LAMP"]).await;
    assert!(ok);
    assert_eq!(socket_runs(&server, "revoke", 1), 1);
    assert_err(&server.with_token(&token).whoami().await, 401, "M_UNKNOWN_TOKEN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_servers_socket_is_replaced() {
    let mut server = TestServer::start().await;
    server.kill();
    // SIGKILL leaves the socket file behind, with nobody listening.
    assert!(socket_of(&server).exists());
    let (ok, out, err) = cli(&server, "create", &["fred", "--password", "fred-password-1"]).await;
    assert!(ok, "the CLI must see the stale socket and work directly: {out}\n{err}");

    server.restart().await;
    let (ok, out, err) = cli(&server, "list", &[]).await;
    assert!(ok, "{err}");
    assert_eq!(out, format!("{}\t\n", server.user_id("fred")));
    assert_eq!(socket_runs(&server, "list_users", 1), 1);
    assert_eq!(server.login_raw("fred", "fred-password-1").await.0, 200);
}

/// Holds `DATA_DIR/weft.lock` as a direct `weft user …` command does.
fn hold_lock(data_dir: &Path) -> File {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data_dir.join("weft.lock"))
        .unwrap();
    file.try_lock().expect("the lock is free");
    file
}

/// Takes the data directory's lock now and releases it after 2 s, as a
/// direct command (or another process) would.
fn hold_lock_for_two_seconds(data_dir: &Path) -> std::thread::JoinHandle<()> {
    let lock = hold_lock(data_dir);
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        drop(lock);
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_server_waits_for_a_direct_command() {
    let mut server = TestServer::start().await;
    server.terminate(Duration::from_secs(20)).await.expect("clean exit");
    let released = hold_lock_for_two_seconds(&server.data_dir);
    let started = Instant::now();
    server.restart().await;
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "the server started while another process held the lock ({:?})",
        started.elapsed()
    );
    released.join().unwrap();
    server.register("gina").await;

    // A direct command waits likewise while the lock is held by someone
    // without a socket (here: the test), then runs.
    server.terminate(Duration::from_secs(20)).await.expect("clean exit");
    let released = hold_lock_for_two_seconds(&server.data_dir);
    let started = Instant::now();
    let (ok, out, err) = cli(&server, "list", &[]).await;
    assert!(ok, "{err}");
    assert!(started.elapsed() >= Duration::from_millis(1900));
    assert_eq!(out, format!("{}\t\n", server.user_id("gina")));
    released.join().unwrap();
}
