//! The `bridge` scenario: QoS 1 readings published to a Mosquitto broker,
//! carried by `weft-bridge-mqtt` (an application service) into one room
//! per device on a spawned weft, and received by a user long-polling
//! `/sync`: readings per second, and the latency from publish to the
//! event in that user's `/sync`.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::{Value, json};
use tokio::net::TcpStream;

use crate::api::Api;
use crate::stats::{r2, summarize};
use crate::{Bench, now_us};

const SERVER_NAME: &str = "localhost";
const AS_TOKEN: &str = "weft-bench-bridge-as-token";
const HS_TOKEN: &str = "weft-bench-bridge-hs-token";
const READING: &str = "org.weft.mqtt.reading";

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until `path` (a log) contains `what`, at most `secs`.
async fn wait_log(path: &Path, what: &str, secs: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if std::fs::read_to_string(path).unwrap_or_default().contains(what) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "no {what:?} in {} within {secs} s:\n{}",
                path.display(),
                weft_testkit::tail(path, 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn bridge_config(hs_url: &str, listen: u16, broker: u16, invite: &str, state_file: &Path) -> String {
    format!(
        r#"[homeserver]
url = "{hs_url}"
server_name = "{SERVER_NAME}"

[appservice]
id = "bench-mqtt"
as_token = "{AS_TOKEN}"
hs_token = "{HS_TOKEN}"
listen = "127.0.0.1:{listen}"

[broker]
host = "127.0.0.1"
port = {broker}
client_id = "weft-bench-bridge"

[bridge]
presets = []
invite = [{invite:?}]
state_file = {state:?}

[[mapping]]
topic = "bench/+device/state"
"#,
        state = state_file.display().to_string(),
    )
}

/// Mosquitto, the bridge and weft, then one run per `--bridge-rates`.
pub async fn bridge(bench: &Bench) -> Result<Value> {
    let o = &bench.opts;
    if o.url.is_some() {
        bail!("the bridge scenario spawns its own server, broker and bridge; it cannot use --url");
    }
    if o.bridge_readings == 0 || o.bridge_devices == 0 || o.bridge_rates.is_empty() {
        bail!("--bridge-readings, --bridge-devices and --bridge-rates must be positive / non-empty");
    }
    if !o.mosquitto_bin.is_file() {
        return Ok(json!({ "error": format!("{} not installed", o.mosquitto_bin.display()) }));
    }
    let bridge_bin = crate::find_bridge_bin(o)?;
    let dir = tempfile::Builder::new().prefix("weft-bench-bridge-").tempdir()?;

    // The broker: no persistence, no queue limit (nothing is dropped).
    let broker = free_port()?;
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {broker} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n"),
    )?;
    let mosquitto_log = std::fs::File::create(dir.path().join("mosquitto.log"))?;
    let mut mosquitto = tokio::process::Command::new(&o.mosquitto_bin)
        .arg("-c")
        .arg(&conf)
        .stdout(mosquitto_log.try_clone()?)
        .stderr(mosquitto_log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", o.mosquitto_bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", broker)).await.is_err() {
        if Instant::now() >= deadline {
            bail!("mosquitto did not listen on port {broker} within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The registration first (the server reads it at start), then the
    // server, then the bridge's config with the server's URL and user.
    let listen = free_port()?;
    let config = dir.path().join("bridge.toml");
    let state_file = dir.path().join("bridge-state");
    std::fs::write(
        &config,
        bridge_config("http://127.0.0.1:1", listen, broker, "@nobody:localhost", &state_file),
    )?;
    let reg = dir.path().join("registration.yaml");
    let out = std::process::Command::new(&bridge_bin)
        .args(["generate-registration", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(&reg)
        .output()
        .with_context(|| format!("running {}", bridge_bin.display()))?;
    if !out.status.success() {
        bail!("generate-registration: {}", String::from_utf8_lossy(&out.stderr));
    }
    let target = bench
        .target_env(
            1,
            "br",
            &[
                ("WEFT_SERVER_NAME", SERVER_NAME.to_owned()),
                (
                    "WEFT_APPSERVICE__REGISTRATION_FILES",
                    json!([reg.display().to_string()]).to_string(),
                ),
            ],
        )
        .await?;
    let user = target.session(0).clone();
    std::fs::write(
        &config,
        bridge_config(&target.url, listen, broker, &user.user_id, &state_file),
    )?;
    let bridge_log = dir.path().join("bridge.log");
    let log = std::fs::File::create(&bridge_log)?;
    let mut bridge = tokio::process::Command::new(&bridge_bin)
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bridge_bin.display()))?;
    let bridge_pid = bridge.id();

    let result = async {
        wait_log(&bridge_log, "subscribed", 30).await?;
        let mut runs = Vec::new();
        for (k, &rate) in o.bridge_rates.iter().enumerate() {
            eprintln!(
                "weft-bench: bridge run {k}: {} readings at {rate}/s (0: unpaced)",
                o.bridge_readings
            );
            runs.push(run(bench, &target.url, &user.token, broker, k, rate, target.pid, bridge_pid).await?);
        }
        Ok::<_, anyhow::Error>(runs)
    }
    .await;
    let _ = bridge.kill().await;
    let _ = mosquitto.kill().await;
    target.stop().await;
    let runs = result.with_context(|| format!("bridge log:\n{}", weft_testkit::tail(&bridge_log, 30)))?;
    let version = std::process::Command::new(&o.mosquitto_bin)
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_owned));
    Ok(json!({
        "readings_per_run": o.bridge_readings,
        "devices": o.bridge_devices,
        "qos": 1,
        "broker": version,
        "bridge_bin": bridge_bin.display().to_string(),
        "latency": "publish (stamped in the payload) to the event in a /sync long-poll of a member of the device rooms",
        "readings_per_s": "readings / (last received - first published)",
        "runs": runs,
    }))
}

/// One run: `devices` new device rooms (`bench/r<k>d<d>/state`), joined by
/// the user; then `n` readings published at `rate`, received through
/// `/sync`.
#[allow(clippy::too_many_arguments)]
async fn run(
    bench: &Bench,
    url: &str,
    token: &str,
    broker: u16,
    k: usize,
    rate: u64,
    server_pid: Option<u32>,
    bridge_pid: Option<u32>,
) -> Result<Value> {
    let o = &bench.opts;
    let n = o.bridge_readings;
    let devices = o.bridge_devices.min(256);
    let api = Api::new(url, 4)?;
    let tag = format!("{:x}", now_us());
    let mut opts = MqttOptions::new(format!("weft-bench-pub{tag}"), "127.0.0.1", broker);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(100);
    let (client, mut el) = AsyncClient::new(opts, 1000);
    let poller = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let topic = |d: usize| format!("bench/r{k}d{d}/state");

    // Each device's first reading makes its room (and invites the user).
    for d in 0..devices {
        client
            .publish(topic(d), QoS::AtLeastOnce, false, r#"{"warmup":true}"#)
            .await?;
    }
    let mut rooms = HashMap::new();
    for d in 0..devices {
        let alias = format!("#_mqtt_r{k}d{d}:{SERVER_NAME}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let room = loop {
            match api.join_alias(token, &alias).await {
                Ok(r) => break r,
                Err(e) if Instant::now() >= deadline => return Err(e.context("the device room")),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        rooms.insert(room, d);
    }
    let filter = r#"{"room":{"timeline":{"limit":100000}},"presence":{"not_types":["*"]}}"#;
    let (first, _) = api.sync(token, None, 0, Some(filter)).await?;
    let mut since = first["next_batch"]
        .as_str()
        .context("sync without next_batch")?
        .to_owned();

    // The receiver: (i, device, received µs) of each reading of this run.
    let max = Duration::from_secs(o.bridge_max_secs);
    let receiver = {
        let api = api.clone();
        let token = token.to_owned();
        let tag = tag.clone();
        let rooms = rooms.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + max;
            let mut got: Vec<(u64, usize, u64)> = Vec::new();
            while (got.len() as u64) < n && Instant::now() < deadline {
                let Ok((v, at)) = api.sync(&token, Some(&since), 5_000, Some(filter)).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let recv_us = at.duration_since(crate::bench_start()).as_micros() as u64;
                if let Some(nb) = v["next_batch"].as_str() {
                    since = nb.to_owned();
                }
                for (room, d) in &rooms {
                    let events = v["rooms"]["join"][room]["timeline"]["events"].as_array();
                    for e in events.into_iter().flatten() {
                        let c = &e["content"];
                        if e["type"] == READING
                            && e.get("state_key").is_none()
                            && c["run"] == tag.as_str()
                            && let Some(i) = c["i"].as_u64()
                        {
                            got.push((i, *d, recv_us));
                        }
                    }
                }
            }
            got
        })
    };

    let cpu = |pid: Option<u32>| pid.and_then(crate::server::cpu_seconds);
    let (server_cpu0, bridge_cpu0) = (cpu(server_pid), cpu(bridge_pid));
    let first_us = now_us();
    let paced = Instant::now();
    let mut sent_at = Vec::with_capacity(n as usize);
    for i in 0..n {
        if rate > 0 {
            tokio::time::sleep_until((paced + Duration::from_secs_f64(i as f64 / rate as f64)).into()).await;
        }
        let sent_us = now_us();
        sent_at.push(sent_us);
        let body = format!(r#"{{"run":"{tag}","i":{i},"sent_us":{sent_us},"v":21.5}}"#);
        client
            .publish(topic(i as usize % devices), QoS::AtLeastOnce, false, body)
            .await?;
    }
    let published_us = now_us();
    let got = receiver.await?;
    let (server_cpu1, bridge_cpu1) = (cpu(server_pid), cpu(bridge_pid));
    poller.abort();

    let mut seen = vec![false; n as usize];
    let (mut dups, mut out_of_order) = (0u64, 0u64);
    let mut last_of: HashMap<usize, u64> = HashMap::new();
    let mut lat = Vec::with_capacity(got.len());
    let mut last_us = first_us;
    for &(i, d, recv_us) in &got {
        let Some(s) = seen.get_mut(i as usize) else { continue };
        if *s {
            dups += 1;
            continue;
        }
        *s = true;
        if last_of.get(&d).is_some_and(|&prev| prev > i) {
            out_of_order += 1;
        }
        last_of.insert(d, i);
        lat.push(recv_us.saturating_sub(sent_at[i as usize]));
        last_us = last_us.max(recv_us);
    }
    let received = seen.iter().filter(|s| **s).count() as u64;
    let secs = (last_us.saturating_sub(first_us)) as f64 / 1e6;
    let per = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if received > 0 => json!(r2((b - a) * 1e6 / received as f64)),
        _ => Value::Null,
    };
    let summary = summarize(lat);
    eprintln!(
        "weft-bench: bridge run {k}: {received}/{n} received, {:.0} readings/s, p50 {} ms, p99 {} ms",
        received as f64 / secs.max(1e-6),
        summary.p50,
        summary.p99
    );
    Ok(json!({
        "publish_rate": if rate == 0 { json!("unpaced") } else { json!(rate) },
        "published": n,
        "publish_secs": r2((published_us - first_us) as f64 / 1e6),
        "received": received,
        "lost": n - received,
        "duplicated": dups,
        "out_of_order_within_a_device": out_of_order,
        "readings_per_s": r2(received as f64 / secs.max(1e-6)),
        "latency_ms": summary,
        "server_cpu_us_per_reading": per(server_cpu0, server_cpu1),
        "bridge_cpu_us_per_reading": per(bridge_cpu0, bridge_cpu1),
    }))
}
