//! Several `weft serve` processes on one PostgreSQL database
//! (docs/scale-out.md, "One leader"): the workers of which a deployment
//! runs exactly one (push delivery, application-service transactions,
//! …) run in the process holding the leader lock, and another takes over
//! when it dies. Each notification and each event reaches the push
//! gateway and the application service exactly once, whichever process
//! the client talks to.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::routing::{post, put};
use axum::{Json, Router};
use common::*;
use serde_json::{Value, json};

/// What the test's push gateway and application service received.
#[derive(Default)]
struct Seen {
    /// Event IDs of the notifications the gateway got, in order.
    pushed: Vec<String>,
    /// (transaction ID, body) of each application-service transaction.
    txns: Vec<(String, Value)>,
}

type Shared = Arc<Mutex<Seen>>;

async fn notify(State(s): State<Shared>, Json(body): Json<Value>) -> Json<Value> {
    let id = body["notification"]["event_id"].as_str().unwrap_or("").to_owned();
    s.lock().unwrap().pushed.push(id);
    Json(json!({ "rejected": [] }))
}

async fn transaction(State(s): State<Shared>, UrlPath(txn): UrlPath<String>, Json(body): Json<Value>) -> Json<Value> {
    s.lock().unwrap().txns.push((txn, body));
    Json(json!({}))
}

/// A push gateway and an application service in one small HTTP server.
async fn receiver() -> (SocketAddr, Shared, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shared = Shared::default();
    let app = Router::new()
        .route("/_matrix/push/v1/notify", post(notify))
        .route("/_matrix/app/v1/transactions/{txn}", put(transaction))
        .with_state(shared.clone());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, shared, task)
}

/// The `m.room.message` event IDs the service got, once per transaction
/// ID (a transaction sent again keeps its ID and body: that is not a
/// second delivery).
fn service_messages(seen: &Seen) -> Vec<String> {
    let mut ids: Vec<&str> = Vec::new();
    let mut out = Vec::new();
    for (id, body) in &seen.txns {
        if ids.contains(&id.as_str()) {
            continue;
        }
        ids.push(id);
        for ev in body["events"].as_array().into_iter().flatten() {
            if ev["type"] == "m.room.message" {
                out.push(ev["event_id"].as_str().unwrap_or("").to_owned());
            }
        }
    }
    out
}

/// Which of `servers` leads: the one whose log says so (waits up to 30 s
/// for exactly one to say it and not `skip`).
async fn leader(servers: &[TestServer], skip: Option<usize>) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let leading: Vec<usize> = (0..servers.len())
            .filter(|i| Some(*i) != skip && servers[*i].log_tail(400).contains("this process now leads"))
            .collect();
        if leading.len() == 1 {
            return leading[0];
        }
        assert!(leading.len() < 2, "two processes lead at once: {leading:?}");
        assert!(Instant::now() < deadline, "no process leads after 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until both the gateway and the service have `n` messages.
async fn wait_delivered(seen: &Shared, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        {
            let s = seen.lock().unwrap();
            if s.pushed.len() >= n && service_messages(&s).len() >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "after 40 s: pushed {:?}, service got {:?}",
                s.pushed,
                service_messages(&s)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// Two processes: bob's pusher (set through the process that does not
// lead) and an application service get each message exactly once, sent
// through either process; then the leader is killed (SIGKILL) and the
// survivor takes over and delivers the next messages, each once, without
// repeating the earlier ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_and_appservice_delivered_once_by_one_leader_and_after_it_dies() {
    let (addr, seen, _task) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let reg = dir.path().join("service.yaml");
    std::fs::write(
        &reg,
        format!(
            "id: \"cluster\"\nurl: \"http://{addr}\"\nas_token: \"as-cluster-token\"\n\
             hs_token: \"hs-cluster-token\"\nsender_localpart: \"clusterbot\"\n\
             namespaces:\n  users: []\n  aliases: []\n  rooms:\n    - exclusive: false\n      regex: \".*\"\n\
             rate_limited: false\n"
        ),
    )
    .unwrap();
    let Some(mut servers) = TestServer::builder()
        .env(
            "WEFT_APPSERVICE__REGISTRATION_FILES",
            &format!("[{:?}]", reg.display().to_string()),
        )
        .env("WEFT_PUSH__RETRY_INITIAL_MS", "100")
        .env("WEFT_APPSERVICE__RETRY_INITIAL_MS", "100")
        .start_cluster(2)
        .await
    else {
        return;
    };
    let lead = leader(&servers, None).await;
    let follow = 1 - lead;
    // Writes to the room go through one process at a time (the room
    // pipeline's cache is per process): set up on the leader.
    let alice_l = servers[lead].register("alice").await;
    let bob_l = servers[lead].register("bob").await;
    let room = room_with(&alice_l, &bob_l, "private_chat").await;
    let alice_f = servers[follow].with_token(&alice_l.access_token);
    let bob_f = servers[follow].with_token(&bob_l.access_token);
    // The pusher is set through the process that does not lead.
    let (st, body) = bob_f
        .post(
            "pushers/set",
            json!({
                "kind": "http", "app_id": "org.weft.test", "pushkey": "bob-key",
                "app_display_name": "Weft tests", "device_display_name": "phone", "lang": "en",
                "data": { "url": format!("http://{addr}/_matrix/push/v1/notify") },
            }),
        )
        .await;
    assert_eq!(st, 200, "{body}");

    let mut sent = Vec::new();
    for i in 0..3 {
        sent.push(
            alice_l
                .send_text(&room, &format!("l{i}"), &format!("through the leader {i}"))
                .await,
        );
    }
    for i in 0..3 {
        sent.push(
            alice_f
                .send_text(&room, &format!("f{i}"), &format!("through the other {i}"))
                .await,
        );
    }
    wait_delivered(&seen, sent.len()).await;
    // Time for a second delivery to show, if there were one.
    tokio::time::sleep(Duration::from_secs(2)).await;
    {
        let s = seen.lock().unwrap();
        assert_eq!(s.pushed, sent, "each notification pushed once, in order");
        assert_eq!(
            service_messages(&s),
            sent,
            "each event sent to the service once, in order"
        );
    }

    // The leader dies; the survivor takes over.
    servers[lead].kill();
    let new_lead = leader(&servers, Some(lead)).await;
    assert_eq!(new_lead, follow);
    for i in 0..3 {
        sent.push(
            alice_f
                .send_text(&room, &format!("s{i}"), &format!("after the leader died {i}"))
                .await,
        );
    }
    wait_delivered(&seen, sent.len()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = seen.lock().unwrap();
    assert_eq!(
        s.pushed, sent,
        "each notification pushed once, in order, across the takeover"
    );
    assert_eq!(
        service_messages(&s),
        sent,
        "each event sent to the service once, in order, across the takeover"
    );
}
