//! Crash safety: SIGKILL the server while concurrent sends are in flight,
//! restart on the same data directory, and check that every acknowledged
//! event survived exactly once, in per-sender order.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};

const KIND: &str = "org.weft.crash";

fn content(task: usize, i: usize) -> Value {
    json!({"task": task, "i": i, "value": format!("{task}-{i}"), "unit": "C"})
}

fn txn(task: usize, i: usize) -> String {
    format!("crash-t{task}-i{i}")
}

struct TaskResult {
    task: usize,
    /// Event IDs acknowledged with 200, index = i.
    acked: Vec<String>,
    /// Non-200 HTTP answers received while the server was up.
    errors: Vec<(usize, u16, Value)>,
}

/// Starts `n` tasks that each send events back to back until a transport
/// error (the server died) or `max_per_task` events.
fn start_senders(
    alice: &Client,
    room: &str,
    n: usize,
    max_per_task: usize,
) -> Vec<tokio::task::JoinHandle<TaskResult>> {
    (0..n)
        .map(|task| {
            let c = alice.clone();
            let room = room.to_string();
            tokio::spawn(async move {
                let mut res = TaskResult {
                    task,
                    acked: Vec::new(),
                    errors: Vec::new(),
                };
                for i in 0..max_per_task {
                    let path = format!("rooms/{}/send/{}/{}", enc(&room), KIND, txn(task, i));
                    match c.try_request(Method::PUT, &path, Some(content(task, i))).await {
                        Ok((200, body)) => match body["event_id"].as_str() {
                            Some(id) => res.acked.push(id.to_string()),
                            None => {
                                res.errors.push((i, 200, body));
                                break;
                            }
                        },
                        Ok((st, body)) => {
                            res.errors.push((i, st, body));
                            break;
                        }
                        Err(_) => break,
                    }
                }
                res
            })
        })
        .collect()
}

async fn run_and_kill(
    server: &mut TestServer,
    alice: &Client,
    room: &str,
    tasks: usize,
    run_for: Duration,
) -> Vec<TaskResult> {
    let handles = start_senders(alice, room, tasks, 1_000_000);
    tokio::time::sleep(run_for).await;
    assert!(server.is_running(), "server died on its own under load");
    server.kill();
    let mut results = Vec::new();
    for h in handles {
        results.push(
            tokio::time::timeout(Duration::from_secs(30), h)
                .await
                .expect("sender hung after kill")
                .expect("sender"),
        );
    }
    results
}

/// (task, i) of a crash event.
fn key(ev: &Value) -> (usize, usize) {
    (
        ev["content"]["task"]
            .as_u64()
            .unwrap_or_else(|| panic!("no task: {ev}")) as usize,
        ev["content"]["i"].as_u64().unwrap_or_else(|| panic!("no i: {ev}")) as usize,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_concurrent_sends_loses_no_acknowledged_event() {
    let mut server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({"preset": "private_chat"})).await;

    let results = run_and_kill(&mut server, &alice, &room, 8, Duration::from_millis(1500)).await;
    for r in &results {
        assert!(
            r.errors.is_empty(),
            "task {} got non-200 answers while the server was up: {:?}",
            r.task,
            r.errors
        );
    }
    let total: usize = results.iter().map(|r| r.acked.len()).sum();
    eprintln!(
        "acknowledged events before SIGKILL: {total} ({:?})",
        results.iter().map(|r| r.acked.len()).collect::<Vec<_>>()
    );
    assert!(
        results.iter().all(|r| !r.acked.is_empty()),
        "every sender should get at least one event acknowledged in 1.5 s"
    );

    server.restart().await;
    let verify = server.login("alice", &alice.password).await;

    // Every acknowledged event is fetchable by ID, with its content.
    for r in &results {
        for (i, id) in r.acked.iter().enumerate() {
            let (st, ev) = verify.get(&format!("rooms/{}/event/{}", enc(&room), enc(id))).await;
            assert_eq!(
                st, 200,
                "acknowledged event {id} (task {} i {i}) lost after SIGKILL: {ev}",
                r.task
            );
            assert_eq!(ev["content"], content(r.task, i), "event {id} content");
            assert_eq!(ev["event_id"], id.as_str());
        }
    }

    // Full history: each acknowledged event exactly once; per-task order kept.
    let all = verify.all_messages(&room).await;
    let ids = event_ids(&all);
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "duplicate event IDs in /messages after crash");
    assert_eq!(
        all.first().map(|e| e["type"].clone()),
        Some(json!("m.room.create")),
        "history must start at m.room.create"
    );
    let mut count: HashMap<&str, usize> = HashMap::new();
    for id in &ids {
        *count.entry(id.as_str()).or_default() += 1;
    }
    for r in &results {
        for id in &r.acked {
            assert_eq!(
                count.get(id.as_str()).copied().unwrap_or(0),
                1,
                "acked event {id} of task {} not exactly once",
                r.task
            );
        }
    }
    let crash_events = of_type(&all, KIND);
    let mut per_task: HashMap<usize, Vec<(usize, String)>> = HashMap::new();
    for ev in &crash_events {
        let (t, i) = key(ev);
        assert_eq!(ev["content"], content(t, i));
        per_task
            .entry(t)
            .or_default()
            .push((i, ev["event_id"].as_str().unwrap().to_string()));
    }
    for r in &results {
        let seen = per_task.remove(&r.task).unwrap_or_default();
        let is: Vec<usize> = seen.iter().map(|(i, _)| *i).collect();
        // Task t sent i = 0, 1, 2, ... one at a time: history holds exactly
        // 0..acked (plus at most the one request in flight at the kill), in order.
        let n = r.acked.len();
        let expected: Vec<usize> = (0..n).collect();
        let expected_plus: Vec<usize> = (0..=n).collect();
        assert!(
            is == expected || is == expected_plus,
            "task {}: history has i = {is:?}, expected 0..{n} in send order (optionally followed by the in-flight {n})",
            r.task
        );
        for (i, id) in seen.iter().take(n) {
            assert_eq!(
                id, &r.acked[*i],
                "task {} i {i}: different event in history than acknowledged",
                r.task
            );
        }
    }
    assert!(per_task.is_empty(), "events from unknown tasks: {:?}", per_task.keys());

    // /sync from scratch agrees with /messages.
    let (st, s) = verify
        .sync_params(&[("timeout", "0"), ("filter", r#"{"room":{"timeline":{"limit":50}}}"#)])
        .await;
    assert_eq!(st, 200, "{s}");
    let jr = &s["rooms"]["join"][&room];
    assert!(jr.is_object(), "room missing from initial sync after crash: {s}");
    let tl = timeline(&s, &room);
    assert!(!tl.is_empty());
    assert_eq!(
        event_ids(&tl),
        ids[ids.len() - tl.len()..].to_vec(),
        "initial sync timeline is not the tail of /messages history"
    );
    if jr["timeline"]["limited"] == json!(true) {
        let pb = jr["timeline"]["prev_batch"]
            .as_str()
            .expect("prev_batch in limited timeline");
        let page = verify.messages(&room, Some(pb), "b", 5).await;
        let chunk = page["chunk"].as_array().unwrap();
        let expect_next = &ids[ids.len() - tl.len() - 1];
        assert_eq!(
            chunk[0]["event_id"],
            expect_next.as_str(),
            "prev_batch does not continue right before the timeline"
        );
    }

    // The server keeps working: a new event lands after everything else and
    // reaches an incremental sync.
    let since = s["next_batch"].as_str().unwrap().to_string();
    let new_id = verify
        .send(&room, KIND, "after-crash", json!({"task": 99, "i": 0}))
        .await;
    let s2 = verify.sync_full(Some(&since), 5000).await;
    assert_eq!(event_ids(&of_type(&timeline(&s2, &room), KIND)), vec![new_id.clone()]);
    let all2 = verify.all_messages(&room).await;
    assert_eq!(all2.len(), all.len() + 1);
    assert_eq!(all2.last().unwrap()["event_id"], new_id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_txn_after_sigkill_is_idempotent() {
    let mut server = TestServer::start().await;
    let alice = server.register("alice").await;
    let room = alice.create_room(json!({"preset": "private_chat"})).await;

    let results = run_and_kill(&mut server, &alice, &room, 4, Duration::from_millis(1000)).await;
    for r in &results {
        assert!(r.errors.is_empty(), "task {}: {:?}", r.task, r.errors);
        assert!(!r.acked.is_empty(), "task {} got nothing acknowledged", r.task);
    }
    server.restart().await;

    // The access token survives a crash.
    let (st, who) = alice.whoami().await;
    assert_eq!(st, 200, "access token lost after SIGKILL: {who}");
    assert_eq!(who["device_id"], alice.device_id.as_str());

    // A client that lost the connection retries its requests with the same
    // txnId: acknowledged ones map to the same event, the in-flight one is
    // created at most once.
    let mut in_flight_ids = Vec::new();
    for r in &results {
        let n = r.acked.len();
        let last = alice
            .send(&room, KIND, &txn(r.task, n - 1), content(r.task, n - 1))
            .await;
        assert_eq!(
            last,
            r.acked[n - 1],
            "task {}: retry of acknowledged txn {} created a new event",
            r.task,
            n - 1
        );
        let first = alice.send(&room, KIND, &txn(r.task, 0), content(r.task, 0)).await;
        assert_eq!(first, r.acked[0], "task {}: retry of txn 0", r.task);
        let inflight = alice.send(&room, KIND, &txn(r.task, n), content(r.task, n)).await;
        let again = alice.send(&room, KIND, &txn(r.task, n), content(r.task, n)).await;
        assert_eq!(inflight, again);
        in_flight_ids.push(inflight);
    }

    let all = alice.all_messages(&room).await;
    let crash_events = of_type(&all, KIND);
    let mut seen: HashMap<(usize, usize), Vec<String>> = HashMap::new();
    for ev in &crash_events {
        seen.entry(key(ev))
            .or_default()
            .push(ev["event_id"].as_str().unwrap().to_string());
    }
    for (r, inflight) in results.iter().zip(&in_flight_ids) {
        let n = r.acked.len();
        for i in 0..n {
            assert_eq!(
                seen.get(&(r.task, i)),
                Some(&vec![r.acked[i].clone()]),
                "task {} i {i}",
                r.task
            );
        }
        assert_eq!(
            seen.get(&(r.task, n)),
            Some(&vec![inflight.clone()]),
            "task {}: the in-flight txn {n} must exist exactly once after the retry",
            r.task
        );
        assert!(!seen.contains_key(&(r.task, n + 1)));
    }
}
