//! The four measurements.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::sync::{Mutex, Semaphore, watch};

use crate::api::{Api, Session};
use crate::server::{cpu_seconds, rss_kib, rss_split_kib};
use crate::stats::{r2, summarize};
use crate::{Bench, PASSWORD, Target, now_us};

pub const EVENT_TYPE: &str = "org.weft.telemetry";

// ---------------------------------------------------------------- send --

/// Durable send throughput: one run per `--send-inflight` value, each on a
/// fresh server.
pub async fn send(bench: &Bench) -> Result<Value> {
    let o = &bench.opts;
    if o.send_clients == 0 || o.send_events == 0 {
        bail!("--send-clients and --send-events must be positive");
    }
    let mut runs = Vec::new();
    for &inflight in &o.send_inflight {
        let shape = SendShape {
            clients: o.send_clients,
            inflight: inflight.clamp(1, 1024),
            events: o.send_events,
            max_secs: o.send_max_secs,
            shared_room: o.send_shared_room,
        };
        let target = bench.target(shape.clients, "s").await?;
        let run = send_run(&target, &shape).await;
        target.stop().await;
        runs.push(run?);
    }
    Ok(Value::Array(runs))
}

/// Send latency tail: a few clients with one request in flight each (a
/// request/response device), long enough to cross many group commits and
/// WAL checkpoints, so periodic stalls show in p99.9 and max.
pub async fn send_tail(bench: &Bench) -> Result<Value> {
    let o = &bench.opts;
    if o.tail_clients == 0 || o.tail_events == 0 {
        bail!("--tail-clients and --tail-events must be positive");
    }
    let shape = SendShape {
        clients: o.tail_clients,
        inflight: 1,
        events: o.tail_events,
        max_secs: o.tail_max_secs,
        shared_room: false,
    };
    let target = bench.target(shape.clients, "t").await?;
    let run = send_run(&target, &shape).await;
    target.stop().await;
    run
}

/// The shape of one send run.
struct SendShape {
    clients: usize,
    inflight: usize,
    events: u64,
    max_secs: u64,
    shared_room: bool,
}

/// The largest size the server's WAL file reached while `stop` was unset,
/// sampled every 50 ms (`None` for a server this run did not spawn).
fn sample_wal(target: &Target, stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<Option<u64>> {
    let wal = target.data_dir.as_ref().map(|d| d.join("weft.db-wal"));
    tokio::spawn(async move {
        let wal = wal?;
        let mut max = 0u64;
        while !*stop.borrow() {
            if let Ok(m) = tokio::fs::metadata(&wal).await {
                max = max.max(m.len());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some(max)
    })
}

async fn send_run(target: &Target, shape: &SendShape) -> Result<Value> {
    let (clients, inflight) = (shape.clients, shape.inflight);
    // Rooms: one per client, or one shared room everyone joins.
    let setup = Api::new(&target.url, 4)?;
    let mut rooms = Vec::with_capacity(clients);
    if shape.shared_room {
        let owner = target.session(0);
        let room = setup
            .create_room(&owner.token, &json!({ "preset": "public_chat", "name": "bench send" }))
            .await?;
        for c in 1..clients.min(target.sessions.len()) {
            setup.join(&target.session(c).token, &room).await?;
        }
        rooms = vec![room; clients];
    } else {
        for c in 0..clients {
            let room = setup
                .create_room(
                    &target.session(c).token,
                    &json!({ "preset": "private_chat", "name": format!("bench send {c}") }),
                )
                .await?;
            rooms.push(room);
        }
    }

    // Per-client connection pools; warm each up with `inflight` requests so
    // connection setup is not measured.
    let apis: Vec<Api> = (0..clients)
        .map(|_| Api::new(&target.url, inflight + 4))
        .collect::<Result<_>>()?;
    let run_tag = format!("{:x}{}", now_us(), inflight);
    {
        let mut warm = Vec::new();
        for c in 0..clients {
            for w in 0..inflight {
                let (api, token, room) = (apis[c].clone(), target.session(c).token.clone(), rooms[c].clone());
                let txn = format!("w{run_tag}-{c}-{w}");
                warm.push(tokio::spawn(async move {
                    let body = json!({ "warmup": true }).to_string();
                    api.send(&token, &room, EVENT_TYPE, &txn, body).await
                }));
            }
        }
        for h in warm {
            let status = h.await??;
            if !status.is_success() {
                bail!("warm-up send failed: {status}");
            }
        }
    }

    let remaining = Arc::new(AtomicI64::new(shape.events as i64));
    let errors = Arc::new(AtomicI64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let deadline = Instant::now() + Duration::from_secs(shape.max_secs);
    let cpu_before = target.pid.and_then(cpu_seconds);
    let (stop_wal, wal_stopped) = watch::channel(false);
    let wal = sample_wal(target, wal_stopped);
    let started = Instant::now();
    let mut workers = Vec::new();
    for c in 0..clients {
        for w in 0..inflight {
            let api = apis[c].clone();
            let token = target.session(c).token.clone();
            let room = rooms[c].clone();
            let (remaining, errors, first_error) = (remaining.clone(), errors.clone(), first_error.clone());
            let run_tag = run_tag.clone();
            workers.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut i = 0u64;
                while Instant::now() < deadline && remaining.fetch_sub(1, Ordering::Relaxed) > 0 {
                    i += 1;
                    let txn = format!("s{run_tag}-{c}-{w}-{i}");
                    let body = json!({
                        "sensor": format!("bench-{c}"),
                        "seq": i,
                        "value": (i * 7) % 1000,
                        "sent_us": now_us(),
                    })
                    .to_string();
                    let t = Instant::now();
                    let res = api.send(&token, &room, EVENT_TYPE, &txn, body).await;
                    let us = t.elapsed().as_micros() as u64;
                    match res {
                        Ok(s) if s.is_success() => lat.push((us, (t - started).as_micros() as u64)),
                        other => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            let mut fe = first_error.lock().await;
                            if fe.is_none() {
                                *fe = Some(match other {
                                    Ok(s) => format!("HTTP {s}"),
                                    Err(e) => format!("{e:#}"),
                                });
                            }
                        }
                    }
                }
                lat
            }));
        }
    }
    let mut lat = Vec::new();
    for w in workers {
        lat.extend(w.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = match (cpu_before, target.pid.and_then(cpu_seconds)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let _ = stop_wal.send(true);
    let wal_max = wal.await.ok().flatten();
    let ok = lat.len() as u64;
    let errors = errors.load(Ordering::Relaxed);
    let over = |ms: u64| lat.iter().filter(|(us, _)| *us > ms * 1000).count();
    let (over_10, over_50) = (over(10), over(50));
    // The slowest requests and when they started, to tell periodic stalls
    // (a checkpoint, a timer) from random ones.
    lat.sort_unstable_by_key(|l| std::cmp::Reverse(l.0));
    let slowest: Vec<Value> = lat
        .iter()
        .take(10)
        .map(|&(us, at)| json!({ "ms": r2(us as f64 / 1000.0), "at_s": r2(at as f64 / 1e6) }))
        .collect();
    Ok(json!({
        "clients": clients,
        "inflight_per_client": inflight,
        "rooms": if shape.shared_room { "shared" } else { "one per client" },
        "events_requested": shape.events,
        "ok": ok,
        "errors": errors,
        "first_error": *first_error.lock().await,
        "timed_out": ok + (errors as u64) < shape.events,
        "elapsed_s": r2(elapsed),
        "requests_per_s": r2(ok as f64 / elapsed),
        "latency_ms": summarize(lat.iter().map(|l| l.0).collect()),
        "over_10ms": over_10,
        "over_50ms": over_50,
        "slowest": slowest,
        "wal_max_bytes": wal_max,
        "server_cpu_s": cpu.map(r2),
        "server_cpu_us_per_event": cpu.filter(|_| ok > 0).map(|c| r2(c * 1e6 / ok as f64)),
    }))
}

// ------------------------------------------------------------- latency --

/// One publisher event as the publisher saw it.
#[derive(Clone, Copy, Default)]
struct Sent {
    /// Request start and acknowledgement, µs since bench start (0 = none).
    start_us: u64,
    ack_us: u64,
    ok: bool,
}

#[derive(Default)]
struct SubLog {
    /// (seq, sent_us from content, receive µs) in arrival order.
    received: Vec<(u64, u64, u64)>,
    syncs: u64,
    limited_syncs: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Publish-to-receive latency through /sync.
pub async fn latency(bench: &Bench) -> Result<Value> {
    let o = &bench.opts;
    let subs = o.latency_subscribers.max(1);
    let total = (o.latency_rate * o.latency_secs) as usize;
    if total == 0 {
        bail!("--latency-rate and --latency-secs must be positive");
    }
    let target = bench.target(subs + 1, "l").await?;
    let res = latency_on(bench, &target, subs, total).await;
    target.stop().await;
    res
}

async fn latency_on(bench: &Bench, target: &Target, subs: usize, total: usize) -> Result<Value> {
    let o = &bench.opts;
    let setup = Api::new(&target.url, 4)?;
    let publisher = target.session(0).clone();
    let room = setup
        .create_room(
            &publisher.token,
            &json!({ "preset": "public_chat", "name": "bench latency" }),
        )
        .await?;
    // Subscribers: users 1..=subs (reused round-robin with --token).
    let subscribers: Vec<Session> = (0..subs).map(|s| target.session(s + 1).clone()).collect();
    for sess in &subscribers {
        // With few --tokens a subscriber may be the publisher itself.
        if sess.token != publisher.token {
            setup.join(&sess.token, &room).await?;
        }
    }
    latency_run(
        bench,
        Plan {
            publish_url: target.url.clone(),
            publisher,
            subscribe_url: target.url.clone(),
            subscribers,
            room,
            total,
            rate: o.latency_rate,
            inflight: o.latency_inflight,
            max_secs: o.latency_secs * 3 + 10,
        },
    )
    .await
}

/// A publish-to-receive run: one publisher sends `total` events on one
/// server at `rate` per second (at most `inflight` at once, for at most
/// `max_secs`); the subscribers, members of `room`, long-poll `/sync` on
/// the same server or another.
struct Plan {
    publish_url: String,
    publisher: Session,
    subscribe_url: String,
    subscribers: Vec<Session>,
    room: String,
    total: usize,
    rate: u64,
    inflight: usize,
    max_secs: u64,
}

async fn latency_run(bench: &Bench, plan: Plan) -> Result<Value> {
    let o = &bench.opts;
    let Plan {
        publish_url,
        publisher,
        subscribe_url,
        subscribers,
        room,
        total,
        rate,
        inflight,
        max_secs,
    } = plan;
    let subs = subscribers.len();
    let setup = Api::new(&subscribe_url, 4)?;
    let mut filter = (!o.sync_filter.is_empty()).then(|| o.sync_filter.clone());
    let mut filter_rejected = false;
    let mut since_tokens = Vec::with_capacity(subs);
    for sess in &subscribers {
        let first = setup.sync(&sess.token, None, 0, filter.as_deref()).await;
        let (v, _) = match first {
            Ok(r) => r,
            Err(e) if filter.is_some() => {
                eprintln!("weft-bench: sync with filter failed ({e:#}); retrying without filter");
                filter = None;
                filter_rejected = true;
                setup.sync(&sess.token, None, 0, None).await?
            }
            Err(e) => return Err(e),
        };
        since_tokens.push(v["next_batch"].as_str().context("sync without next_batch")?.to_owned());
    }

    // Subscribers long-poll until told to stop; each counts the distinct
    // events it has seen so the run can end as soon as all have everything.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut handles = Vec::new();
    let mut seen_counts = Vec::new();
    for (s, since) in since_tokens.into_iter().enumerate() {
        let api = Api::new(&subscribe_url, 2)?;
        let token = subscribers[s].token.clone();
        let (room, filter, mut stop_rx) = (room.clone(), filter.clone(), stop_rx.clone());
        let seen_count = Arc::new(AtomicUsize::new(0));
        seen_counts.push(seen_count.clone());
        handles.push(tokio::spawn(async move {
            let mut log = SubLog::default();
            let mut since = since;
            let mut seen = HashSet::new();
            // Hard bound on the number of polls.
            for _ in 0..1_000_000u32 {
                let req = api.sync(&token, Some(&since), 30_000, filter.as_deref());
                let res = tokio::select! {
                    r = req => r,
                    _ = stop_rx.wait_for(|stop| *stop) => break,
                };
                log.syncs += 1;
                match res {
                    Ok((v, at)) => {
                        let recv_us = at.duration_since(crate::bench_start()).as_micros() as u64;
                        if let Some(nb) = v["next_batch"].as_str() {
                            since = nb.to_owned();
                        }
                        let tl = &v["rooms"]["join"][&room]["timeline"];
                        if tl["limited"].as_bool() == Some(true) {
                            log.limited_syncs += 1;
                        }
                        for ev in tl["events"].as_array().into_iter().flatten() {
                            if ev["type"] != EVENT_TYPE {
                                continue;
                            }
                            let (Some(seq), Some(sent)) =
                                (ev["content"]["seq"].as_u64(), ev["content"]["sent_us"].as_u64())
                            else {
                                continue;
                            };
                            seen.insert(seq);
                            log.received.push((seq, sent, recv_us));
                            seen_count.store(seen.len(), Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        log.errors += 1;
                        log.first_error.get_or_insert_with(|| format!("{e:#}"));
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            log
        }));
    }
    // Let the long-polls reach the server before publishing.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Publisher: event i is due at t0 + i/rate; at most `inflight` in flight.
    let sent: Arc<std::sync::Mutex<Vec<Sent>>> = Arc::new(std::sync::Mutex::new(vec![Sent::default(); total]));
    let sem = Arc::new(Semaphore::new(inflight.max(1)));
    let api = Api::new(&publish_url, inflight + 2)?;
    let t0 = Instant::now();
    let t0_us = t0.duration_since(crate::bench_start()).as_micros() as u64;
    let publish_deadline = t0 + Duration::from_secs(max_secs);
    let mut pubs = Vec::with_capacity(total);
    let run_tag = format!("{:x}", now_us());
    for i in 0..total {
        let due = t0 + Duration::from_secs_f64(i as f64 / rate.max(1) as f64);
        tokio::time::sleep_until(due.into()).await;
        if Instant::now() > publish_deadline {
            break;
        }
        let permit = sem.clone().acquire_owned().await?;
        let (api, token, room, sent) = (api.clone(), publisher.token.clone(), room.clone(), sent.clone());
        let txn = format!("l{run_tag}-{i}");
        pubs.push(tokio::spawn(async move {
            let start_us = now_us();
            let body = json!({ "seq": i, "sent_us": start_us, "sensor": "bench-pub" }).to_string();
            let ok = matches!(api.send(&token, &room, EVENT_TYPE, &txn, body).await, Ok(s) if s.is_success());
            sent.lock().expect("lock")[i] = Sent {
                start_us,
                ack_us: now_us(),
                ok,
            };
            drop(permit);
        }));
    }
    for p in pubs {
        p.await?;
    }
    let publish_elapsed = t0.elapsed().as_secs_f64();
    let sent = sent.lock().expect("lock").clone();
    let acked_ok = sent.iter().filter(|s| s.ok).count();
    let attempted = sent.iter().filter(|s| s.start_us > 0).count();

    // Let subscribers catch up (until each has seen every acknowledged
    // event, or the grace period ends), then stop them.
    let grace_deadline = Instant::now() + Duration::from_secs(o.latency_grace_secs);
    while Instant::now() < grace_deadline
        && seen_counts.iter().any(|c| c.load(Ordering::Relaxed) < acked_ok)
        && handles.iter().any(|h| !h.is_finished())
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop_tx.send(true);
    let mut logs = Vec::new();
    for h in handles {
        match tokio::time::timeout(Duration::from_secs(10), h).await {
            Ok(log) => logs.push(log?),
            Err(_) => bail!("subscriber did not stop"),
        }
    }

    // Analysis.
    let mut all_lat = Vec::new();
    let mut per_sub = Vec::new();
    // When the last subscriber got its last event, µs after publishing began.
    let mut last_receive_us = 0u64;
    for log in &logs {
        let mut seen = HashSet::new();
        let (mut dup, mut ooo) = (0u64, 0u64);
        // Out of order: received after an event whose send started only
        // after this one's send was acknowledged (so the server had to order
        // it first).
        let mut max_start_seen = 0u64;
        for &(seq, sent_us, recv_us) in &log.received {
            if !seen.insert(seq) {
                dup += 1;
                continue;
            }
            all_lat.push(recv_us.saturating_sub(sent_us));
            last_receive_us = last_receive_us.max(recv_us.saturating_sub(t0_us));
            if let Some(s) = sent.get(seq as usize) {
                if s.ack_us > 0 && max_start_seen > s.ack_us {
                    ooo += 1;
                }
                max_start_seen = max_start_seen.max(s.start_us);
            }
        }
        let lost = sent
            .iter()
            .enumerate()
            .filter(|(i, s)| s.ok && !seen.contains(&(*i as u64)))
            .count();
        per_sub.push(json!({
            "received": seen.len(),
            "lost": lost,
            "duplicated": dup,
            "out_of_order": ooo,
            "syncs": log.syncs,
            "limited_syncs": log.limited_syncs,
            "sync_errors": log.errors,
            "first_error": log.first_error,
        }));
    }
    let sum = |k: &str| per_sub.iter().map(|v| v[k].as_u64().unwrap_or(0)).sum::<u64>();
    Ok(json!({
        "subscribers": subs,
        "target_rate_per_s": rate,
        "publisher_inflight_max": inflight,
        "events_planned": total,
        "events_attempted": attempted,
        "events_acked": acked_ok,
        "publish_errors": attempted - acked_ok,
        "achieved_rate_per_s": r2(acked_ok as f64 / publish_elapsed),
        "publish_s": r2(publish_elapsed),
        // Events every subscriber received, per second from the first send
        // to the last receive.
        "received_per_s": r2(
            per_sub.iter().map(|v| v["received"].as_u64().unwrap_or(0)).min().unwrap_or(0) as f64
                / (last_receive_us.max(1) as f64 / 1e6)
        ),
        "publish_latency_ms": summarize(sent.iter().filter(|s| s.ok).map(|s| s.ack_us - s.start_us).collect()),
        "sync_filter": if filter_rejected { Value::from("rejected by server; ran without") } else { json!(filter) },
        "publish_to_receive_ms": summarize(all_lat),
        "lost_total": sum("lost"),
        "duplicated_total": sum("duplicated"),
        "out_of_order_total": sum("out_of_order"),
        "limited_syncs_total": sum("limited_syncs"),
        "per_subscriber": per_sub,
    }))
}

// ---------------------------------------------------------- federation --

/// Two federating servers on this machine: B's subscribers join a room of
/// A's publisher over federation, then two runs measured at B's `/sync`:
/// `latency` (a fixed rate) and `throughput` (as fast as A takes the
/// sends), each in a fresh room, with both servers' CPU per event.
pub async fn federation(bench: &Bench) -> Result<Value> {
    let subs = bench.opts.federation_subscribers.max(1);
    let a = bench.federating_target(1, "fa").await?;
    let b = match bench.federating_target(subs, "fb").await {
        Ok(b) => b,
        Err(e) => {
            a.stop().await;
            return Err(e);
        }
    };
    let res = federation_on(bench, &a, &b).await;
    a.stop().await;
    b.stop().await;
    res
}

async fn federation_on(bench: &Bench, a: &Target, b: &Target) -> Result<Value> {
    let o = &bench.opts;
    let a_name = a.server_name.clone().context("the sending server has no name")?;
    let (api_a, api_b) = (Api::new(&a.url, 4)?, Api::new(&b.url, 4)?);
    let publisher = a.session(0).clone();
    let runs = [
        (
            "latency",
            (o.federation_rate * o.federation_secs) as usize,
            o.federation_rate,
            8,
            o.federation_secs * 3 + 10,
        ),
        (
            "throughput",
            o.federation_events as usize,
            1_000_000,
            o.federation_inflight,
            120,
        ),
    ];
    let mut out = serde_json::Map::new();
    for (label, total, rate, inflight, max_secs) in runs {
        if total == 0 {
            bail!("--federation-rate, --federation-secs and --federation-events must be positive");
        }
        let room = api_a
            .create_room(
                &publisher.token,
                &json!({ "preset": "public_chat", "name": format!("bench federation {label}") }),
            )
            .await?;
        for sub in &b.sessions {
            api_b.join_via(&sub.token, &room, &a_name).await?;
        }
        let cpu = |t: &Target| t.pid.and_then(cpu_seconds);
        let before = (cpu(a), cpu(b));
        let mut run = latency_run(
            bench,
            Plan {
                publish_url: a.url.clone(),
                publisher: publisher.clone(),
                subscribe_url: b.url.clone(),
                subscribers: b.sessions.clone(),
                room,
                total,
                rate,
                inflight,
                max_secs,
            },
        )
        .await?;
        let acked = run["events_acked"].as_u64().unwrap_or(0).max(1) as f64;
        let per_event = |before: Option<f64>, after: Option<f64>| match (before, after) {
            (Some(x), Some(y)) => json!(r2((y - x) * 1e6 / acked)),
            _ => Value::Null,
        };
        run["server_cpu_us_per_event"] = json!({
            "sending": per_event(before.0, cpu(a)),
            "receiving": per_event(before.1, cpu(b)),
        });
        out.insert(label.into(), run);
    }
    Ok(Value::Object(out))
}

// ----------------------------------------------------------------- rss --

/// Server RSS idle and with `--rss-syncs` open long-polls.
pub async fn rss(bench: &Bench) -> Result<Value> {
    let o = &bench.opts;
    let users = o.rss_users.clamp(1, o.rss_syncs.max(1));
    let target = bench.target(users, "r").await?;
    let res = rss_run(bench, &target).await;
    target.stop().await;
    res
}

async fn rss_run(bench: &Bench, target: &Target) -> Result<Value> {
    let o = &bench.opts;
    let read = |pid: Option<u32>| pid.and_then(|p| rss_kib(p).ok());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = read(target.pid);
    let idle_split = target.pid.and_then(rss_split_kib);

    // A since token per user, so the long-polls actually wait.
    let api = Api::new(&target.url, o.rss_syncs + 16)?;
    let users = target.sessions.len().min(o.rss_users.max(1));
    let mut since = Vec::with_capacity(users);
    for u in 0..users {
        let (v, _) = api.sync(&target.session(u).token, None, 0, None).await?;
        since.push(v["next_batch"].as_str().context("no next_batch")?.to_owned());
    }
    let settle = Duration::from_secs(o.rss_settle_secs.min(25));
    let opened = Instant::now();
    let mut handles = Vec::with_capacity(o.rss_syncs);
    for i in 0..o.rss_syncs {
        let u = i % users;
        let (api, token, since) = (api.clone(), target.session(u).token.clone(), since[u].clone());
        handles.push(tokio::spawn(async move {
            api.sync(&token, Some(&since), 30_000, None).await.map(|_| ())
        }));
        // Don't open a thousand connections in one burst.
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let open_s = opened.elapsed().as_secs_f64();
    tokio::time::sleep(settle).await;
    let with_syncs = read(target.pid);
    let returned_early = handles.iter().filter(|h| h.is_finished()).count();
    let mut early_errors = 0;
    let mut first_error = None;
    for h in handles.iter_mut().filter(|h| h.is_finished()) {
        if let Ok(Err(e)) = h.await {
            early_errors += 1;
            first_error.get_or_insert_with(|| format!("{e:#}"));
        }
    }
    for h in &handles {
        h.abort();
    }
    drop(api);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = read(target.pid);
    let open = o.rss_syncs - returned_early;
    let per_sync = match (idle, with_syncs) {
        (Some((i, _)), Some((w, _))) if open > 0 => Some(r2((w as f64 - i as f64) / open as f64)),
        _ => None,
    };
    Ok(json!({
        "users": users,
        "syncs_requested": o.rss_syncs,
        "sync_timeout_ms": 30_000,
        "syncs_still_open": open,
        "syncs_returned_early": returned_early,
        "syncs_failed_early": early_errors,
        "first_error": first_error,
        "seconds_to_open": r2(open_s),
        "settle_s": settle.as_secs(),
        "rss_fresh_kib": target.rss_fresh_kib,
        "rss_idle_kib": idle.map(|v| v.0),
        "rss_idle_anon_kib": idle_split.map(|v| v.0),
        "rss_idle_file_kib": idle_split.map(|v| v.1),
        "rss_idle_note": "fresh: ready, no users yet; idle: after registering the users (password hashing), before the syncs; anon: heap and stacks, file: pages of the binary and libraries (shared, reclaimable)",
        "rss_with_syncs_kib": with_syncs.map(|v| v.0),
        "rss_per_open_sync_kib": per_sync,
        "rss_after_release_kib": after.map(|v| v.0),
        "rss_peak_kib": after.map(|v| v.1),
        "note": if target.pid.is_none() { "no server pid (use --server-pid with --url): RSS not measured" } else { "" },
    }))
}

// ---------------------------------------------------------- cold start --

/// Spawn-to-first-200-from-/versions, on a fresh and on an existing data dir.
pub async fn cold_start(bench: &Bench) -> Result<Value> {
    let o = &bench.opts;
    let launcher = bench.launcher().context("cold-start needs the weft binary")?;
    let (mut fresh, mut existing, mut listen_fresh) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..o.cold_runs.clamp(1, 20) {
        let dir = tempfile::Builder::new().prefix("weft-bench-cold-").tempdir()?;
        let data = dir.path().join("data");
        let log = dir.path().join("server.log");
        for phase in 0..2 {
            let t = Instant::now();
            let server = launcher.spawn(&data, &log, Duration::from_secs(60)).await?;
            let ready = server.wait_ready(Duration::from_secs(60)).await?;
            let ms = r2(ready.duration_since(t).as_secs_f64() * 1000.0);
            if phase == 0 {
                fresh.push(ms);
                listen_fresh.push(r2(server.listen_line_after.as_secs_f64() * 1000.0));
                // Make the data dir non-trivial for the restart: one user.
                Api::new(&server.url, 1)?
                    .register("coldstart", PASSWORD)
                    .await
                    .context("registering a user before restart")?;
            } else {
                existing.push(ms);
            }
            server.stop(Duration::from_secs(10)).await?;
        }
    }
    let median = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        s.get(s.len() / 2).copied()
    };
    Ok(json!({
        "runs": fresh.len(),
        "fresh_data_dir_ms": fresh,
        "fresh_data_dir_ms_median": median(&fresh),
        "existing_data_dir_ms": existing,
        "existing_data_dir_ms_median": median(&existing),
        "fresh_listen_line_ms": listen_fresh,
        "measured": "spawn of `weft serve` to first 200 from GET /_matrix/client/versions (2 ms polling)",
    }))
}
