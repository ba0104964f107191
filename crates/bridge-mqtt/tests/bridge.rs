//! `weft-bridge-mqtt` end to end, all real processes: a Mosquitto broker
//! (`/usr/sbin/mosquitto`, persistence on, on a free port), the bridge
//! binary, and a homeserver that loads the registration the bridge wrote:
//! the real `weft` (testkit's TestServer), and a live Synapse (testkit's
//! rig). Traffic comes from `mosquitto_pub`; commands are read with
//! `mosquitto_sub`. Without Mosquitto (or Synapse) a test fails under `CI`
//! and skips with a note elsewhere.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weft_testkit::{Client, Synapse, TestServer, tool_missing};

const AS_TOKEN: &str = "bridge-as-token-0123456789";
const HS_TOKEN: &str = "bridge-hs-token-9876543210";
const READING: &str = "org.weft.mqtt.reading";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn have_mosquitto() -> bool {
    let ok = Path::new("/usr/sbin/mosquitto").exists()
        && weft_testkit::installed("mosquitto_pub")
        && weft_testkit::installed("mosquitto_sub")
        && weft_testkit::installed("stdbuf");
    if !ok {
        tool_missing(
            "mosquitto (/usr/sbin/mosquitto, mosquitto_pub, mosquitto_sub)",
            "apt-get install mosquitto mosquitto-clients",
        );
    }
    ok
}

/// Polls `f` every `every` until it gives `Ok(v)`, and answers `v`;
/// after `secs` seconds panics with `what` and the last `Err` (what was
/// there instead). Every wait of these tests goes through it (or
/// [`poll_blocking`] outside async code).
async fn poll<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(seen) if Instant::now() >= until => panic!("waited {secs} s for {what}; last seen: {seen}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// [`poll`] for code that is not async (it sleeps the thread).
fn poll_blocking<T>(secs: u64, what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let until = Instant::now() + Duration::from_secs(secs);
    loop {
        match f() {
            Ok(v) => return v,
            Err(seen) if Instant::now() >= until => panic!("waited {secs} s for {what}; last seen: {seen}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// [`poll`] for a condition with nothing to show when it is not met.
async fn wait_until<F, Fut>(secs: u64, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    poll(secs, what, || {
        let fut = f();
        async move { if fut.await { Ok(()) } else { Err("not yet".to_string()) } }
    })
    .await
}

/// Polls `room`'s timeline readings until there are `n` (or more); answers
/// them, oldest first.
async fn wait_readings(c: &Client, room: &str, n: usize, what: &str) -> Vec<Value> {
    poll(30, what, || async {
        let r = readings(c, room).await;
        if r.len() >= n {
            Ok(r)
        } else {
            Err(format!("{} of {n} readings: {r:?}", r.len()))
        }
    })
    .await
}

/// A Mosquitto broker with persistence, on a fixed port (kept across
/// restarts) and its own directory; killed when dropped.
struct Mosquitto {
    port: u16,
    /// With a TLS listener: its certificate, the clients' CA file.
    tls_ca: Option<PathBuf>,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    fn start(dir: &Path) -> Mosquitto {
        Self::start_with(dir, None)
    }

    /// With `tls`: (certificate, key) of a TLS listener instead of plain TCP.
    fn start_with(dir: &Path, tls: Option<(PathBuf, PathBuf)>) -> Mosquitto {
        let port = free_port();
        let tls_lines = tls
            .as_ref()
            .map(|(c, k)| format!("certfile {}\nkeyfile {}\n", c.display(), k.display()))
            .unwrap_or_default();
        let data = dir.join("mosquitto");
        std::fs::create_dir_all(&data).unwrap();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n{tls_lines}allow_anonymous true\npersistence true\n\
                 persistence_location {}/\nautosave_interval 1\nmax_queued_messages 100000\n\
                 user root\nlog_dest stderr\n",
                data.display()
            ),
        )
        .unwrap();
        let mut m = Mosquitto {
            port,
            tls_ca: tls.map(|(c, _)| c),
            conf,
            log: dir.join("mosquitto.log"),
            child: None,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("mosquitto");
        self.child = Some(child);
        poll_blocking(10, "mosquitto to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", self.port))
                .map(drop)
                .map_err(|e| format!("{e}; log: {}", weft_testkit::tail(&self.log, 20)))
        });
    }

    /// SIGTERM (Mosquitto saves its database), wait, start again.
    fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc_kill(c.id() as i32, 15) };
            let _ = c.wait();
        }
        self.spawn();
    }

    /// `mosquitto_pub -q 1`, one message per line of `lines`, in order, over
    /// one connection.
    fn publish_lines(&self, topic: &str, lines: &[String], retain: bool) {
        let mut cmd = Command::new("mosquitto_pub");
        if let Some(ca) = &self.tls_ca {
            cmd.arg("--cafile").arg(ca);
        }
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-q",
            "1",
            "-t",
            topic,
            "-l",
        ]);
        if retain {
            cmd.arg("-r");
        }
        let mut child = cmd.stdin(Stdio::piped()).spawn().expect("mosquitto_pub");
        {
            let mut stdin = child.stdin.take().unwrap();
            for l in lines {
                writeln!(stdin, "{l}").unwrap();
            }
        }
        assert!(child.wait().unwrap().success(), "mosquitto_pub {topic}");
    }

    fn publish(&self, topic: &str, payload: &str, retain: bool) {
        let mut cmd = Command::new("mosquitto_pub");
        if let Some(ca) = &self.tls_ca {
            cmd.arg("--cafile").arg(ca);
        }
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-q",
            "1",
            "-t",
            topic,
            "-m",
            payload,
        ]);
        if retain {
            cmd.arg("-r");
        }
        let out = cmd.output().expect("mosquitto_pub");
        assert!(
            out.status.success(),
            "mosquitto_pub {topic}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `mosquitto_sub -v` on `topics`, its lines collected.
    fn subscribe(&self, topics: &[&str]) -> (Child, Arc<Mutex<Vec<String>>>) {
        let mut cmd = Command::new("stdbuf");
        cmd.args([
            "-oL",
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-q",
            "1",
            "-v",
        ]);
        for t in topics {
            cmd.args(["-t", t]);
        }
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("mosquitto_sub");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l2.lock().unwrap().push(line);
            }
        });
        (child, lines)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// A TCP forwarder in front of the homeserver, so the bridge keeps one URL
/// while Weft restarts on new ports (and sees connection errors while it is
/// down).
struct Forward {
    port: u16,
    target: Arc<Mutex<String>>,
}

impl Forward {
    async fn start(target: &str) -> Forward {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = Arc::new(Mutex::new(target.to_string()));
        let t = target.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let to = t.lock().unwrap().clone();
                tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        Forward { port, target }
    }

    fn set(&self, http_url: &str) {
        *self.target.lock().unwrap() = http_url.trim_start_matches("http://").to_string();
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// The bridge: its config and registration in `dir`, the process started
/// by [`BridgeProc::start`].
struct BridgeProc {
    /// The transactions endpoint's port.
    port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// The bridge binary: this build's, or `BRIDGE_BIN` (a release build for
/// the bench; `WEFT_BIN` likewise chooses the `weft` binary).
fn bridge_bin() -> String {
    std::env::var("BRIDGE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_weft-bridge-mqtt").to_string())
}

impl BridgeProc {
    /// Writes the config and runs `generate-registration`; returns the
    /// bridge (not started) and the registration file.
    fn configure(
        dir: &Path,
        hs_url: &str,
        server_name: &str,
        broker_port: u16,
        alice: &str,
        extra: &str,
    ) -> (BridgeProc, PathBuf) {
        let config = dir.join("bridge.toml");
        let port = free_port();
        std::fs::write(
            &config,
            format!(
                r#"
[homeserver]
url = "{hs_url}"
server_name = "{server_name}"

[appservice]
id = "mqtt"
as_token = "{AS_TOKEN}"
hs_token = "{HS_TOKEN}"
listen = "127.0.0.1:{port}"

[broker]
host = "127.0.0.1"
port = {broker_port}
client_id = "bridge-test"
keep_alive_secs = 5

[bridge]
invite = ["{alice}"]
command_senders = ["{alice}"]
{extra}
"#
            ),
        )
        .unwrap();
        let reg = dir.join("registration.yaml");
        let out = Command::new(bridge_bin())
            .args(["generate-registration", "--config"])
            .arg(&config)
            .arg("--out")
            .arg(&reg)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "generate-registration: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            BridgeProc {
                port,
                config,
                log: dir.join("bridge.log"),
                child: None,
            },
            reg,
        )
    }

    fn start(&mut self) {
        let before = std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("subscribed")
            .count();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(bridge_bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_log("subscribed", before + 1);
    }

    /// Waits until the log has `n` lines containing `what`.
    fn wait_log(&self, what: &str, n: usize) {
        poll_blocking(20, &format!("{n}× {what:?} in the bridge log"), || {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.matches(what).count() >= n {
                Ok(())
            } else {
                Err(format!("the log:\n{text}"))
            }
        })
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for BridgeProc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- bridge log ---\n{}", weft_testkit::tail(&self.log, 60));
        }
    }
}

/// Joins the device room by its alias once the bridge has made it (and
/// invited alice).
async fn join_device(alice: &Client, alias: &str) -> String {
    poll(30, &format!("{} to join {alias}", alice.user_id), || async {
        let (status, resp) = alice
            .post(&format!("join/{}", weft_testkit::enc(alias)), json!({}))
            .await;
        match resp["room_id"].as_str() {
            Some(room) if status == 200 => Ok(room.to_string()),
            _ => Err(format!("{status} {resp}")),
        }
    })
    .await
}

/// The timeline (non-state) readings of a room, oldest first.
async fn readings(alice: &Client, room: &str) -> Vec<Value> {
    alice
        .all_messages(room)
        .await
        .into_iter()
        .filter(|e| e["type"] == READING && e.get("state_key").is_none())
        .collect()
}

/// The presets and commands, against any homeserver: `alice` is a user of
/// it, `server_name` its name.
async fn presets_and_commands(
    mq: &Mosquitto,
    bridge: &mut BridgeProc,
    alice: &Client,
    bob: &Client,
    server_name: &str,
) {
    // Retained before the bridge runs: Zigbee2MQTT's device list and a
    // lamp's availability, a Tasmota plug's LWT, a Home Assistant sensor's
    // discovery config.
    mq.publish(
        "zigbee2mqtt/bridge/devices",
        r#"[{"friendly_name":"Coordinator","type":"Coordinator","ieee_address":"0x00"},
            {"friendly_name":"kitchen_lamp","type":"Router","ieee_address":"0x0017880104e45517",
             "definition":{"vendor":"Philips","model":"9290012573A","description":"Hue white and color ambiance E27"}}]"#,
        true,
    );
    mq.publish("zigbee2mqtt/kitchen_lamp/availability", r#"{"state":"online"}"#, true);
    mq.publish("tele/plug1/LWT", "Online", true);
    mq.publish(
        "homeassistant/sensor/garage/temp/config",
        r#"{"name":"Garage temperature","stat_t":"garage/temp/state","uniq_id":"garage_temp","dev":{"ids":["garage1"],"name":"Garage"}}"#,
        true,
    );
    bridge.start();
    // The discovery config made the bridge subscribe to the state topic.
    bridge.wait_log("subscribed", 2);

    let lamp: Vec<String> = (1..=3)
        .map(|i| format!(r#"{{"state":"ON","brightness":{i},"temperature":21.50}}"#))
        .collect();
    mq.publish_lines("zigbee2mqtt/kitchen_lamp", &lamp, false);
    mq.publish_lines(
        "tele/plug1/SENSOR",
        &[
            r#"{"ENERGY":{"Power":12.5}}"#.into(),
            r#"{"ENERGY":{"Power":13.0}}"#.into(),
        ],
        false,
    );
    mq.publish_lines("garage/temp/state", &["18.25".into(), "18.5".into()], false);
    // Not bridged: the lamp's own command topic.
    mq.publish("zigbee2mqtt/kitchen_lamp/set", r#"{"state":"OFF"}"#, false);

    let lamp_room = join_device(alice, &format!("#_mqtt_kitchen_lamp:{server_name}")).await;
    let plug_room = join_device(alice, &format!("#_mqtt_plug1:{server_name}")).await;
    let garage_room = join_device(alice, &format!("#_mqtt_garage1:{server_name}")).await;

    wait_readings(alice, &lamp_room, 3, "the lamp's readings").await;
    wait_readings(alice, &plug_room, 2, "the plug's readings").await;
    wait_readings(alice, &garage_room, 2, "the garage's readings").await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let lamp_sender = format!("@_mqtt_kitchen_lamp:{server_name}");
    let r = readings(alice, &lamp_room).await;
    assert_eq!(r.len(), 3, "{r:#?}");
    for (i, e) in r.iter().enumerate() {
        assert_eq!(e["sender"], lamp_sender);
        assert_eq!(e["content"]["brightness"], i as i64 + 1, "order: {r:#?}");
        // Floats as exact decimal strings, as Weft's doors keep them.
        assert_eq!(e["content"]["temperature"], "21.50");
        assert_eq!(e["content"]["org.weft.mqtt.topic"], "zigbee2mqtt/kitchen_lamp");
    }
    let (status, avail) = alice
        .state(&lamp_room, "org.weft.mqtt.availability", "kitchen_lamp")
        .await;
    assert_eq!(status, 200, "{avail}");
    assert_eq!(avail["online"], true);
    let (_, topic) = alice.state(&lamp_room, "m.room.topic", "").await;
    assert!(
        topic["topic"].as_str().unwrap_or("").contains("9290012573A"),
        "the device list names the lamp: {topic}"
    );

    let r = readings(alice, &plug_room).await;
    assert_eq!(r.len(), 2, "{r:#?}");
    assert_eq!(r[0]["sender"], format!("@_mqtt_plug1:{server_name}"));
    assert_eq!(r[0]["content"]["ENERGY"]["Power"], "12.5");
    assert_eq!(r[1]["content"]["ENERGY"]["Power"], "13.0");
    let (status, lwt) = alice.state(&plug_room, "org.weft.mqtt.availability", "plug1").await;
    assert_eq!(status, 200, "{lwt}");
    assert_eq!(
        (lwt["online"].clone(), lwt["body"].clone()),
        (json!(true), json!("Online"))
    );

    let r = readings(alice, &garage_room).await;
    assert_eq!(r.len(), 2, "{r:#?}");
    assert_eq!(r[0]["sender"], format!("@_mqtt_garage1:{server_name}"));
    assert_eq!(
        r.iter().map(|e| e["content"]["body"].clone()).collect::<Vec<_>>(),
        vec![json!("18.25"), json!("18.5")]
    );
    let (_, name) = alice.state(&garage_room, "m.room.name", "").await;
    assert_eq!(name["name"], "Garage");

    // Commands: `!set` in Element's words, and an org.weft.command event.
    let (mut sub, got) = mq.subscribe(&["zigbee2mqtt/kitchen_lamp/set", "cmnd/plug1/#"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    alice
        .send(
            &lamp_room,
            "m.room.message",
            "c1",
            json!({"msgtype": "m.text", "body": "!set state OFF"}),
        )
        .await;
    alice
        .send(
            &plug_room,
            "org.weft.command",
            "c2",
            json!({"command": "Power", "value": "OFF"}),
        )
        .await;
    // From someone not in `command_senders`: refused, said in the room.
    alice.invite(&lamp_room, &bob.user_id).await;
    bob.join(&lamp_room).await;
    bob.send(
        &lamp_room,
        "m.room.message",
        "b1",
        json!({"msgtype": "m.text", "body": "!set state ON"}),
    )
    .await;
    // Not a command: ignored.
    alice
        .send(
            &lamp_room,
            "m.room.message",
            "c3",
            json!({"msgtype": "m.text", "body": "hello lamp"}),
        )
        .await;
    poll(20, "two commands on the broker", || async {
        let lines = got.lock().unwrap().clone();
        if lines.len() >= 2 {
            Ok(())
        } else {
            Err(format!("{lines:?}"))
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = got.lock().unwrap().clone();
    let _ = sub.kill();
    let _ = sub.wait();
    assert_eq!(
        lines,
        vec![
            r#"zigbee2mqtt/kitchen_lamp/set {"state":"OFF"}"#.to_string(),
            "cmnd/plug1/Power OFF".to_string()
        ]
    );
    // The result, reported in the room by the device's puppet.
    wait_until(20, "the command's notice", || async {
        alice
            .all_messages(&lamp_room)
            .await
            .iter()
            .any(|e| e["content"]["msgtype"] == "m.notice" && e["sender"] == lamp_sender)
    })
    .await;
    let notices: Vec<Value> = alice
        .all_messages(&lamp_room)
        .await
        .into_iter()
        .filter(|e| e["content"]["msgtype"] == "m.notice")
        .collect();
    let ok: Vec<&Value> = notices
        .iter()
        .filter(|n| n["content"]["org.weft.command.result"]["ok"] == true)
        .collect();
    assert_eq!(ok.len(), 1, "{notices:#?}");
    assert_eq!(
        ok[0]["content"]["org.weft.command.result"]["topic"],
        "zigbee2mqtt/kitchen_lamp/set"
    );
    wait_until(20, "the refusal's notice", || async {
        alice
            .all_messages(&lamp_room)
            .await
            .iter()
            .any(|e| e["content"]["msgtype"] == "m.notice" && e["content"]["org.weft.command.result"]["ok"] == false)
    })
    .await;
    let refused: Vec<Value> = alice
        .all_messages(&lamp_room)
        .await
        .into_iter()
        .filter(|e| e["content"]["msgtype"] == "m.notice" && e["content"]["org.weft.command.result"]["ok"] == false)
        .collect();
    assert_eq!(refused.len(), 1, "{refused:#?}");
    assert!(
        refused[0]["content"]["body"].as_str().unwrap().contains(&bob.user_id),
        "{refused:#?}"
    );
}

/// `bridge.spaces`: a device room made before the option was set and one
/// made after are both listed in the operator's space (`m.space.child`,
/// sent by the bridge's user, which alice invited and gave power level
/// 50) and restricted to its members: bob, in the space but invited to
/// neither room, joins both and reads their readings; carol, not in the
/// space, is refused with `403 M_FORBIDDEN`.
async fn shared_with_a_space(
    mq: &Mosquitto,
    bridge: &mut BridgeProc,
    alice: &Client,
    bob: &Client,
    carol: &Client,
    server_name: &str,
) {
    bridge.start();
    mq.publish("sensors/old/state", r#"{"n":1,"t":20.25}"#, false);
    let old_room = join_device(alice, &format!("#_mqtt_old:{server_name}")).await;
    wait_readings(alice, &old_room, 1, "the old device's reading").await;
    bridge.kill();

    let bot = format!("@_mqtt_bot:{server_name}");
    let space = alice
        .create_room(json!({
            "preset": "private_chat",
            "name": "Lab",
            "room_alias_name": "lab",
            "room_version": "10",
            "creation_content": {"type": "m.space"},
            "invite": [bot, bob.user_id],
            "power_level_content_override": {"users": {alice.user_id.clone(): 100, bot.clone(): 50}},
        }))
        .await;
    bob.join(&space).await;
    let text = std::fs::read_to_string(&bridge.config).unwrap();
    std::fs::write(
        &bridge.config,
        text.replace("[bridge]\n", &format!("[bridge]\nspaces = [\"#lab:{server_name}\"]\n")),
    )
    .unwrap();
    bridge.start();
    mq.publish("sensors/new/state", r#"{"n":2,"t":20.5}"#, false);
    let new_room = join_device(alice, &format!("#_mqtt_new:{server_name}")).await;

    for (room, device) in [(&old_room, "old"), (&new_room, "new")] {
        let path = format!(
            "rooms/{}/state/m.space.child/{}",
            weft_testkit::enc(&space),
            weft_testkit::enc(room)
        );
        let child = poll(30, &format!("the space's m.space.child for {device}"), || async {
            match alice.get(&path).await {
                (200, c) => Ok(c),
                (st, r) => Err(format!("{st} {r}")),
            }
        })
        .await;
        assert_eq!(child, json!({"via": [server_name]}), "m.space.child of {device}");
        let (st, parent) = alice.state(room, "m.space.parent", &space).await;
        assert_eq!(
            (st, parent),
            (200, json!({"via": [server_name]})),
            "m.space.parent in {device}'s room"
        );
        let rule = poll(30, &format!("{device}'s restricted join rule"), || async {
            match alice.state(room, "m.room.join_rules", "").await {
                (200, r) if r["join_rule"] == "restricted" => Ok(r),
                (st, r) => Err(format!("{st} {r}")),
            }
        })
        .await;
        assert_eq!(
            rule,
            json!({"join_rule": "restricted", "allow": [{"type": "m.room_membership", "room_id": space}]})
        );
        let (_, state) = alice.get(&format!("rooms/{}/state", weft_testkit::enc(&space))).await;
        let senders: Vec<&Value> = state
            .as_array()
            .unwrap_or_else(|| panic!("state of the space: {state}"))
            .iter()
            .filter(|e| e["type"] == "m.space.child" && e["state_key"] == room.as_str())
            .map(|e| &e["sender"])
            .collect();
        assert_eq!(
            senders,
            [&json!(bot)],
            "one m.space.child for {device}, sent by the bridge's user"
        );

        // carol is in no room that gives access: refused.
        let (st, r) = carol
            .post(
                &format!("join/{}", weft_testkit::enc(&format!("#_mqtt_{device}:{server_name}"))),
                json!({}),
            )
            .await;
        assert_eq!(
            (st, r["errcode"].as_str()),
            (403, Some("M_FORBIDDEN")),
            "carol joining {device}: {r}"
        );
        // bob, a member of the space, was never invited and gets in.
        let (st, r) = bob
            .post(
                &format!("join/{}", weft_testkit::enc(&format!("#_mqtt_{device}:{server_name}"))),
                json!({}),
            )
            .await;
        assert_eq!(
            (st, r["room_id"].as_str()),
            (200, Some(room.as_str())),
            "bob joining {device}: {r}"
        );
    }
    wait_readings(bob, &new_room, 1, "the new device's reading").await;
    let ts = |r: Vec<Value>| r.iter().map(|e| e["content"]["t"].clone()).collect::<Vec<_>>();
    assert_eq!(
        ts(readings(bob, &old_room).await),
        [json!("20.25")],
        "bob reads the old room"
    );
    assert_eq!(
        ts(readings(bob, &new_room).await),
        [json!("20.5")],
        "bob reads the new room"
    );
    // Restarting shares nothing twice.
    bridge.kill();
    bridge.start();
    mq.publish("sensors/new/state", r#"{"n":3,"t":20.75}"#, false);
    wait_readings(bob, &new_room, 2, "the third reading").await;
    let shared: Vec<(Value, Value)> = alice
        .all_messages(&new_room)
        .await
        .into_iter()
        .filter(|e| e["type"] == "m.room.join_rules" || e["type"] == "m.space.parent")
        .map(|e| (e["type"].clone(), e["content"]["join_rule"].clone()))
        .collect();
    assert_eq!(
        shared,
        [
            (json!("m.room.join_rules"), json!("invite")),
            (json!("m.space.parent"), Value::Null),
            (json!("m.room.join_rules"), json!("restricted")),
        ],
        "the new room's join rule changed once, one parent"
    );
}

async fn weft_with(reg: &Path) -> TestServer {
    TestServer::builder()
        .server_name("localhost")
        .env(
            "WEFT_APPSERVICE__REGISTRATION_FILES",
            &format!("[{:?}]", reg.display().to_string()),
        )
        .env("WEFT_APPSERVICE__RETRY_INITIAL_MS", "100")
        .env("WEFT_APPSERVICE__RETRY_MAX_MS", "500")
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn presets_and_commands_against_weft() {
    if !have_mosquitto() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mq = Mosquitto::start(dir.path());
    let (mut bridge, reg) = BridgeProc::configure(
        dir.path(),
        "http://127.0.0.1:1",
        "localhost",
        mq.port,
        "@alice:localhost",
        "",
    );
    let server = weft_with(&reg).await;
    // The registration was made before the server's port was known.
    let text = std::fs::read_to_string(&bridge.config).unwrap();
    std::fs::write(&bridge.config, text.replace("http://127.0.0.1:1", &server.base_url())).unwrap();
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    presets_and_commands(&mq, &mut bridge, &alice, &bob, "localhost").await;

    // The transactions endpoint wants the hs_token.
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/_matrix/app/v1/transactions/x1", bridge.port);
    let r = http.put(&url).json(&json!({"events": []})).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["errcode"], "M_UNAUTHORIZED");
    let r = http
        .put(&url)
        .bearer_auth("wrong")
        .json(&json!({"events": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["errcode"], "M_FORBIDDEN");
    let r = http
        .put(&url)
        .bearer_auth(HS_TOKEN)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = http
        .put(&url)
        .bearer_auth(HS_TOKEN)
        .json(&json!({"events": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Every /_matrix/app route wants it, in the header or the query.
    let base = format!("http://127.0.0.1:{}/_matrix/app/v1", bridge.port);
    for (method, path, ok) in [
        (reqwest::Method::POST, "ping", 200),
        (reqwest::Method::GET, "users/%40_mqtt_x%3Alocalhost", 404),
        (reqwest::Method::GET, "rooms/%23_mqtt_x%3Alocalhost", 404),
    ] {
        let call = |auth: Option<&str>, query: &str| {
            let mut req = http
                .request(method.clone(), format!("{base}/{path}{query}"))
                .json(&json!({}));
            if let Some(t) = auth {
                req = req.bearer_auth(t);
            }
            req.send()
        };
        let r = call(None, "").await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "{path} without a token");
        assert_eq!(r.json::<Value>().await.unwrap()["errcode"], "M_UNAUTHORIZED");
        let r = call(Some("wrong"), "").await.unwrap();
        assert_eq!(r.status().as_u16(), 403, "{path} with a wrong token");
        assert_eq!(r.json::<Value>().await.unwrap()["errcode"], "M_FORBIDDEN");
        let r = call(None, "?access_token=wrong").await.unwrap();
        assert_eq!(r.status().as_u16(), 403, "{path} with a wrong ?access_token");
        let r = call(Some(HS_TOKEN), "").await.unwrap();
        assert_eq!(r.status().as_u16(), ok, "{path} with the hs_token");
        let r = call(None, &format!("?access_token={HS_TOKEN}")).await.unwrap();
        assert_eq!(r.status().as_u16(), ok, "{path} with the hs_token in the query");
        if ok == 404 {
            assert_eq!(r.json::<Value>().await.unwrap()["errcode"], "M_NOT_FOUND");
        }
    }
}

/// QoS 1 readings published while the bridge is down, while the
/// homeserver is down and around a broker restart all arrive, once each,
/// in order.
#[tokio::test(flavor = "multi_thread")]
async fn no_reading_lost_across_restarts() {
    if !have_mosquitto() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut mq = Mosquitto::start(dir.path());
    let fwd = Forward::start("127.0.0.1:1").await;
    let (mut bridge, reg) = BridgeProc::configure(
        dir.path(),
        &fwd.url(),
        "localhost",
        mq.port,
        "@alice:localhost",
        "presets = []\n[[mapping]]\ntopic = \"sensors/+device/state\"\n",
    );
    let mut server = weft_with(&reg).await;
    fwd.set(&server.base_url());
    let alice = server.register("alice").await;
    bridge.start();

    let batch = |from: usize| -> Vec<String> { (from..from + 25).map(|n| format!(r#"{{"n":{n},"v":0.5}}"#)).collect() };
    // Two devices, so messages of both are in flight at once; each batch
    // goes to k1, then k2.
    let publish = |mq: &Mosquitto, from: usize| {
        mq.publish_lines("sensors/k1/state", &batch(from), false);
        mq.publish_lines("sensors/k2/state", &batch(from), false);
    };
    publish(&mq, 0);
    let room = join_device(&alice, "#_mqtt_k1:localhost").await;
    let room2 = join_device(&alice, "#_mqtt_k2:localhost").await;
    let ns = |r: Vec<Value>| {
        r.iter()
            .map(|e| e["content"]["n"].as_i64().unwrap())
            .collect::<Vec<_>>()
    };
    let wait_n = |n: usize| {
        let alice = alice.clone();
        let room = room.clone();
        let room2 = room2.clone();
        async move {
            poll(60, &format!("{n} readings of k1 and of k2"), || async {
                let (a, b) = (readings(&alice, &room).await, readings(&alice, &room2).await);
                if a.len() >= n && b.len() >= n {
                    Ok(())
                } else {
                    Err(format!("k1: {:?}, k2: {:?}", ns(a), ns(b)))
                }
            })
            .await;
        }
    };
    wait_n(25).await;

    // 1. The bridge is killed; readings published meanwhile wait at the broker.
    bridge.kill();
    publish(&mq, 25);
    bridge.start();
    wait_n(50).await;

    // 2. The homeserver is down: the bridge holds the messages (unacked)
    // and retries.
    server.terminate(Duration::from_secs(10)).await;
    publish(&mq, 50);
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.restart().await;
    fwd.set(&server.base_url());
    wait_n(75).await;

    // 2b. The homeserver is down and the bridge is killed holding
    // messages it could not deliver: it had not acknowledged them, so the
    // broker sends them again to the next bridge.
    server.terminate(Duration::from_secs(10)).await;
    publish(&mq, 75);
    tokio::time::sleep(Duration::from_secs(2)).await;
    bridge.kill();
    server.restart().await;
    fwd.set(&server.base_url());
    bridge.start();
    wait_n(100).await;

    // 3. Bridge down, readings queued at the broker, broker restarted (its
    // persistence keeps the session and the queue), bridge back.
    bridge.kill();
    publish(&mq, 100);
    mq.restart();
    bridge.start();
    // 4. Broker restarted under a running bridge; it reconnects.
    mq.restart();
    publish(&mq, 125);
    wait_n(150).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let got2 = ns(readings(&alice, &room2).await);
    assert_eq!(
        got2,
        (0..150).collect::<Vec<i64>>(),
        "every reading of k2 once, in order"
    );
    let got = ns(readings(&alice, &room).await);
    assert_eq!(got, (0..150).collect::<Vec<i64>>(), "every reading once, in order");
    let r = readings(&alice, &room).await;
    assert!(
        r.iter()
            .all(|e| e["sender"] == "@_mqtt_k1:localhost" && e["content"]["v"] == "0.5")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn presets_and_commands_against_synapse() {
    if !have_mosquitto() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mq = Mosquitto::start(dir.path());
    // Synapse's server name carries its port, unknown until it runs: the
    // registration's regexes only need the name, so it is written for a
    // placeholder and rewritten.
    let fwd = Forward::start("127.0.0.1:1").await;
    let reg_path = dir.path().join("registration.yaml");
    // Synapse reads the registration at start-up: write one for the name
    // it will have, which Synapse::builder picks itself; so start it with a
    // registration whose namespaces cover any `localhost:PORT`.
    let (mut bridge, reg) =
        BridgeProc::configure(dir.path(), &fwd.url(), "localhost:0", mq.port, "@alice:localhost:0", "");
    assert_eq!(reg, reg_path);
    let text = std::fs::read_to_string(&reg).unwrap();
    std::fs::write(&reg, text.replace(r"localhost:0", r"localhost:[0-9]+")).unwrap();
    let Some(syn) = weft_testkit::synapse_or_skip_with(Synapse::builder().extra_yaml(&format!(
        "app_service_config_files: [{:?}]\n",
        reg.display().to_string()
    )))
    .await
    else {
        return;
    };
    let name = syn.server_name().to_string();
    fwd.set(syn.client_url());
    let cfg = std::fs::read_to_string(&bridge.config).unwrap();
    std::fs::write(&bridge.config, cfg.replace("localhost:0", &name)).unwrap();
    let alice = syn.register_client("alice").await;
    let bob = syn.register_client("bob").await;
    presets_and_commands(&mq, &mut bridge, &alice, &bob, &name).await;
}

const SENSORS: &str = "presets = []\n[[mapping]]\ntopic = \"sensors/+device/state\"\n";

#[tokio::test(flavor = "multi_thread")]
async fn device_rooms_shared_with_a_space_against_weft() {
    if !have_mosquitto() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mq = Mosquitto::start(dir.path());
    let (mut bridge, reg) = BridgeProc::configure(
        dir.path(),
        "http://127.0.0.1:1",
        "localhost",
        mq.port,
        "@alice:localhost",
        SENSORS,
    );
    let server = weft_with(&reg).await;
    let text = std::fs::read_to_string(&bridge.config).unwrap();
    std::fs::write(&bridge.config, text.replace("http://127.0.0.1:1", &server.base_url())).unwrap();
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    shared_with_a_space(&mq, &mut bridge, &alice, &bob, &carol, "localhost").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn device_rooms_shared_with_a_space_against_synapse() {
    if !have_mosquitto() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mq = Mosquitto::start(dir.path());
    let fwd = Forward::start("127.0.0.1:1").await;
    let (mut bridge, reg) = BridgeProc::configure(
        dir.path(),
        &fwd.url(),
        "localhost:0",
        mq.port,
        "@alice:localhost:0",
        SENSORS,
    );
    let text = std::fs::read_to_string(&reg).unwrap();
    std::fs::write(&reg, text.replace(r"localhost:0", r"localhost:[0-9]+")).unwrap();
    let Some(syn) = weft_testkit::synapse_or_skip_with(Synapse::builder().extra_yaml(&format!(
        "app_service_config_files: [{:?}]\n",
        reg.display().to_string()
    )))
    .await
    else {
        return;
    };
    let name = syn.server_name().to_string();
    fwd.set(syn.client_url());
    let cfg = std::fs::read_to_string(&bridge.config).unwrap();
    std::fs::write(&bridge.config, cfg.replace("localhost:0", &name)).unwrap();
    let alice = syn.register_client("alice").await;
    let bob = syn.register_client("bob").await;
    let carol = syn.register_client("carol").await;
    shared_with_a_space(&mq, &mut bridge, &alice, &bob, &carol, &name).await;
}

/// Publishes `n` readings with QoS 1 from one rumqttc client, `rate` per
/// second (0: as fast as the broker takes them), round robin over `devices` devices
/// (`bench/dev<k>/state`), each stamped with the wall clock at publish;
/// waits until all are in their rooms; returns (readings/s from the first
/// publish to the last event stored, p50 and p99 of origin_server_ts −
/// stamp in ms).
async fn bench_run(
    mq: &Mosquitto,
    alice: &Client,
    server_name: &str,
    n: usize,
    devices: usize,
    rate: usize,
) -> (f64, i64, i64) {
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    let mut opts = rumqttc::MqttOptions::new("bench-publisher", "127.0.0.1", mq.port);
    opts.set_inflight(100);
    let (client, mut el) = rumqttc::AsyncClient::new(opts, 1000);
    let poller = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    // Warm-up: each room is made by its device's first reading.
    let mut rooms = Vec::new();
    for d in 0..devices {
        client
            .publish(
                format!("bench/dev{d}/state"),
                rumqttc::QoS::AtLeastOnce,
                false,
                r#"{"warmup":true}"#,
            )
            .await
            .unwrap();
    }
    for d in 0..devices {
        rooms.push(join_device(alice, &format!("#_mqtt_dev{d}:{server_name}")).await);
    }
    let start = now_ms();
    let paced = Instant::now();
    for i in 0..n {
        if rate > 0 {
            tokio::time::sleep_until((paced + Duration::from_secs_f64(i as f64 / rate as f64)).into()).await;
        }
        let body = format!(r#"{{"i":{i},"sent_ms":{},"v":21.5}}"#, now_ms());
        client
            .publish(
                format!("bench/dev{}/state", i % devices),
                rumqttc::QoS::AtLeastOnce,
                false,
                body,
            )
            .await
            .unwrap();
    }
    let mut all = Vec::new();
    for (d, room) in rooms.iter().enumerate() {
        let want = (0..n).filter(|i| i % devices == d).count();
        let events = poll(900, &format!("the {want} bench readings of dev{d}"), || async {
            let events: Vec<Value> = readings(alice, room)
                .await
                .into_iter()
                .filter(|e| e["content"].get("i").is_some())
                .collect();
            if events.len() >= want {
                Ok(events)
            } else {
                Err(format!("{} so far", events.len()))
            }
        })
        .await;
        assert_eq!(events.len(), want);
        let is: Vec<i64> = events.iter().map(|e| e["content"]["i"].as_i64().unwrap()).collect();
        let mut sorted = is.clone();
        sorted.sort();
        assert_eq!(is, sorted, "order within a device");
        all.extend(events);
    }
    poller.abort();
    let mut lat: Vec<i64> = all
        .iter()
        .map(|e| e["origin_server_ts"].as_i64().unwrap() - e["content"]["sent_ms"].as_i64().unwrap())
        .collect();
    let last = all
        .iter()
        .map(|e| e["origin_server_ts"].as_i64().unwrap())
        .max()
        .unwrap();
    lat.sort();
    let rate = n as f64 / ((last - start).max(1) as f64 / 1000.0);
    (rate, lat[lat.len() / 2], lat[lat.len() * 99 / 100])
}

/// `cargo nextest run -p weft-bridge-mqtt --test bridge bench --run-ignored only --no-capture`
/// (env BRIDGE_BENCH_SYNAPSE_N readings, default 300, over
/// BRIDGE_BENCH_DEVICES devices, default 4, published at BRIDGE_BENCH_RATE
/// per second, default 0: as fast as the broker takes them): readings/s
/// from Mosquitto into rooms on Synapse, and latency (publish to the
/// event's `origin_server_ts`). Into Weft: `weft-bench --scenarios bridge`
/// (crates/bench), which spawns Weft itself; Synapse is left here, where
/// the test rig starts it.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: run by hand"]
async fn bench_readings_into_synapse() {
    if !have_mosquitto() {
        return;
    }
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let devices = env("BRIDGE_BENCH_DEVICES", 4);
    let syn_n = env("BRIDGE_BENCH_SYNAPSE_N", 300);
    // Readings per second to publish at (0: as fast as the broker takes them).
    let rate = env("BRIDGE_BENCH_RATE", 0);
    let mapping = "presets = []\n[[mapping]]\ntopic = \"bench/+device/state\"\n";
    {
        let dir = tempfile::tempdir().unwrap();
        let mq = Mosquitto::start(dir.path());
        let fwd = Forward::start("127.0.0.1:1").await;
        let (mut bridge, reg) = BridgeProc::configure(
            dir.path(),
            &fwd.url(),
            "localhost:0",
            mq.port,
            "@alice:localhost:0",
            mapping,
        );
        let text = std::fs::read_to_string(&reg).unwrap();
        std::fs::write(&reg, text.replace("localhost:0", "localhost:[0-9]+")).unwrap();
        let Some(syn) = weft_testkit::synapse_or_skip_with(Synapse::builder().extra_yaml(&format!(
            "app_service_config_files: [{:?}]\n",
            reg.display().to_string()
        )))
        .await
        else {
            return;
        };
        let name = syn.server_name().to_string();
        fwd.set(syn.client_url());
        let cfg = std::fs::read_to_string(&bridge.config).unwrap();
        std::fs::write(&bridge.config, cfg.replace("localhost:0", &name)).unwrap();
        let alice = syn.register_client("alice").await;
        bridge.start();
        let (got, p50, p99) = bench_run(&mq, &alice, &name, syn_n, devices, rate).await;
        println!(
            "BENCH synapse: {syn_n} readings over {devices} devices, {got:.0} readings/s (published at {rate}/s, 0: unpaced), latency p50 {p50} ms, p99 {p99} ms"
        );
    }
}

/// The broker over TLS (`broker.tls`, `broker.ca_file`): a Mosquitto TLS
/// listener with a self-signed certificate (made with `openssl`), trusted
/// as the CA file.
#[tokio::test(flavor = "multi_thread")]
async fn broker_over_tls() {
    if !have_mosquitto() {
        return;
    }
    if !weft_testkit::tools_installed(&["openssl"], "apt-get install openssl") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("broker.crt"), dir.path().join("broker.key"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mq = Mosquitto::start_with(dir.path(), Some((cert.clone(), key)));
    let (mut bridge, reg) = BridgeProc::configure(
        dir.path(),
        "http://127.0.0.1:1",
        "localhost",
        mq.port,
        "@alice:localhost",
        "presets = []\n[[mapping]]\ntopic = \"sensors/+device/state\"\n",
    );
    let server = weft_with(&reg).await;
    let text = std::fs::read_to_string(&bridge.config).unwrap();
    let text = text.replace("http://127.0.0.1:1", &server.base_url()).replace(
        "keep_alive_secs = 5\n",
        &format!(
            "keep_alive_secs = 5\ntls = true\nca_file = {:?}\n",
            cert.display().to_string()
        ),
    );
    std::fs::write(&bridge.config, text).unwrap();
    let alice = server.register("alice").await;
    bridge.start();
    mq.publish_lines(
        "sensors/t1/state",
        &[r#"{"n":1,"t":20.25}"#.to_string(), r#"{"n":2,"t":20.5}"#.to_string()],
        false,
    );
    let room = join_device(&alice, "#_mqtt_t1:localhost").await;
    wait_readings(&alice, &room, 2, "two readings over TLS").await;
    let r = readings(&alice, &room).await;
    assert_eq!(
        r.iter().map(|e| e["content"]["t"].clone()).collect::<Vec<_>>(),
        vec![json!("20.25"), json!("20.5")]
    );
}
