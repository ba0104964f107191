//! Abuse limits against the real server: failed-login rate limits (per
//! address and per account), unknown access tokens charged to the
//! address, the HTTP listener's per-address connection cap and header
//! timeout, the raised open-file limit, and private data-directory
//! permissions.
//!
//! Loopback addresses other than 127.0.0.1 (127.0.0.2, …) stand in for
//! other clients: the server listens on 127.0.0.1 and sees each client's
//! bound source address.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A client whose connections come from `from`.
fn client_from(from: IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(from)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

async fn login_from(
    http: &reqwest::Client,
    base: &str,
    user: &str,
    password: &str,
    bearer: Option<&str>,
) -> (u16, Value) {
    let mut req = http.post(format!("{base}/_matrix/client/v3/login")).json(&json!({
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": user},
        "password": password,
        "device_id": "FIXED",
    }));
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("login request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Registers through user-interactive auth with `m.login.dummy`.
async fn register(base: &str, user: &str, password: &str) {
    let http = reqwest::Client::new();
    let url = format!("{base}/_matrix/client/v3/register");
    let body = json!({"username": user, "password": password});
    let first: Value = http.post(&url).json(&body).send().await.unwrap().json().await.unwrap();
    let mut body = body;
    body["auth"] = json!({"type": "m.login.dummy", "session": first["session"]});
    let resp = http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200, "register {user}");
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn assert_limited(status: u16, body: &Value) -> u64 {
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["errcode"], "M_LIMIT_EXCEEDED", "{body}");
    let ms = body["retry_after_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("429 without retry_after_ms: {body}"));
    assert!(ms > 0, "{body}");
    ms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn login_flood_with_bogus_token_gets_429_while_polite_client_keeps_its_latency() {
    // The shipped limits: only the switch differs from the default config.
    let server = TestServer::builder()
        .env("WEFT_RATE_LIMIT__ENABLED", "true")
        .start()
        .await;
    let base = server.base_url();
    server.register("victim").await;
    server.register("polite").await;
    let polite_password = TestServer::default_password("polite");

    // The polite client logs in from 127.0.0.2, one request at a time.
    let polite = client_from(loopback(2));
    let sample = |n: usize| {
        let polite = polite.clone();
        let base = base.clone();
        let password = polite_password.clone();
        async move {
            let mut took = Vec::new();
            for _ in 0..n {
                let t = Instant::now();
                let (st, body) = login_from(&polite, &base, "polite", &password, None).await;
                took.push(t.elapsed());
                assert_eq!(st, 200, "polite login: {body}");
            }
            took
        }
    };
    // The polite client's own sign-in bucket (burst 30, one a second)
    // must last the whole test: 1 + 3 × (4 + 4) = 25 logins.
    let _warm = sample(1).await;

    // Idle and flooded samples alternate, three rounds, so a change in the
    // machine's other load shows up in both.
    let counts: Arc<[AtomicUsize; 4]> = Arc::new(Default::default()); // 429, 403, other, total
    let (mut idle, mut flooded) = (Vec::new(), Vec::new());
    for _round in 0..3 {
        idle.extend(sample(4).await);

        // The flood: wrong passwords for another account from 127.0.0.1,
        // each with a made-up access token, from several connections.
        let stop = Arc::new(AtomicBool::new(false));
        let mut flooders = Vec::new();
        for _ in 0..3 {
            let (stop, counts, base) = (stop.clone(), counts.clone(), base.clone());
            let http = client_from(loopback(1));
            flooders.push(tokio::spawn(async move {
                for i in 0..20_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let (st, _) = login_from(&http, &base, "victim", &format!("guess-{i}"), Some("x")).await;
                    let slot = match st {
                        429 => 0,
                        403 => 1,
                        _ => 2,
                    };
                    counts[slot].fetch_add(1, Ordering::Relaxed);
                    counts[3].fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        // Let the flood get going (and into its limit) first.
        let (t, before) = (Instant::now(), counts[3].load(Ordering::Relaxed));
        while counts[3].load(Ordering::Relaxed) < before + 200 && t.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        flooded.extend(sample(4).await);
        let during = counts[3].load(Ordering::Relaxed) - before;
        stop.store(true, Ordering::Relaxed);
        for f in flooders {
            f.await.unwrap();
        }
        assert!(during >= 200, "the flood ran on while sampling: {during} requests");
    }
    let (idle, flooded) = (median(idle), median(flooded));
    let [limited, wrong, other, total] = counts.each_ref().map(|c| c.load(Ordering::Relaxed));
    eprintln!(
        "polite median idle {idle:?}, under flood {flooded:?}; flood: {total} requests, \
         {limited}x 429, {wrong}x 403, {other} other"
    );
    assert_eq!(other, 0, "the flood only gets 403 or 429");
    // Five failed logins per address in a burst (plus one every 10 s).
    assert!(wrong <= 8, "{wrong} guesses were checked; the rest must get 429");
    assert_eq!(limited, total - wrong);
    assert!(
        flooded <= idle * 2,
        "polite median latency {flooded:?} under the flood, {idle:?} idle: more than 2x"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tokens_are_charged_to_the_address() {
    let server = TestServer::builder()
        .env("WEFT_RATE_LIMIT__ENABLED", "true")
        .env("WEFT_RATE_LIMIT__PER_SECOND", "0.5")
        .env("WEFT_RATE_LIMIT__BURST", "10")
        .start()
        .await;
    let base = server.base_url();
    let http = client_from(loopback(3));
    let mut statuses = Vec::new();
    for i in 0..30 {
        let resp = http
            .get(format!("{base}/_matrix/client/v3/account/whoami"))
            .bearer_auth(format!("forged-{i}"))
            .send()
            .await
            .unwrap();
        let st = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if st == 429 {
            assert_limited(st, &body);
        } else {
            assert_eq!((st, body["errcode"].as_str()), (401, Some("M_UNKNOWN_TOKEN")), "{body}");
        }
        statuses.push(st);
    }
    let unknown = statuses.iter().filter(|s| **s == 401).count();
    assert!(
        (10..=12).contains(&unknown),
        "a burst of 10 unknown tokens, then 429: {statuses:?}"
    );
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    // Another address is not affected; a real token from there works.
    let alice = server.register("alice").await;
    let resp = client_from(loopback(4))
        .get(format!("{base}/_matrix/client/v3/account/whoami"))
        .bearer_auth(&alice.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// Sign-in requests (`/login`, `/register`, `/register/available`) take
/// one from a bucket per client address besides the general limit, with
/// or without an access token and whether they succeed or not; other
/// requests and other addresses are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_requests_are_limited_per_address() {
    let server = TestServer::builder()
        .env("WEFT_RATE_LIMIT__ENABLED", "true")
        .env("WEFT_RATE_LIMIT__LOGIN_PER_SECOND", "0.01")
        .env("WEFT_RATE_LIMIT__LOGIN_BURST", "4")
        .start()
        .await;
    let base = server.base_url();
    let walker = server.register("walker").await;
    let password = TestServer::default_password("walker");
    let http = client_from(loopback(60));

    let (st, body) = login_from(&http, &base, "walker", &password, None).await;
    assert_eq!(st, 200, "{body}");
    let resp = http
        .get(format!("{base}/_matrix/client/v3/register/available?username=free"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // With a valid access token the address's bucket pays all the same.
    let (st, body) = login_from(&http, &base, "walker", &password, Some(&walker.access_token)).await;
    assert_eq!(st, 200, "{body}");
    // A registration's first step (the UIA 401) counts too.
    let resp = http
        .post(format!("{base}/_matrix/client/v3/register"))
        .json(&json!({"username": "newbie", "password": "a-good-long-password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // The bucket is empty: refused before the password is looked at.
    let (st, body) = login_from(&http, &base, "walker", &password, None).await;
    assert_limited(st, &body);
    let (st, body) = login_from(&http, &base, "walker", &password, Some(&walker.access_token)).await;
    assert_limited(st, &body);
    let resp = http
        .get(format!("{base}/_matrix/client/v3/register/available?username=free"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);

    // Other requests from that address, and sign-ins from another, go on.
    let resp = http
        .get(format!("{base}/_matrix/client/v3/account/whoami"))
        .bearer_auth(&walker.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (st, body) = login_from(&client_from(loopback(61)), &base, "walker", &password, None).await;
    assert_eq!(st, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_series_on_one_account_is_limited_across_addresses() {
    let server = TestServer::builder()
        .env("WEFT_RATE_LIMIT__ENABLED", "true")
        .env("WEFT_RATE_LIMIT__FAILED_LOGIN_PER_SECOND", "0.5")
        .env("WEFT_RATE_LIMIT__FAILED_LOGIN_BURST", "3")
        .start()
        .await;
    let base = server.base_url();
    server.register("target").await;
    let password = TestServer::default_password("target");

    // Each guess from a different address: the account's bucket still empties.
    let mut statuses = Vec::new();
    let mut retry_after = 0;
    for i in 0..6u8 {
        let (st, body) = login_from(&client_from(loopback(10 + i)), &base, "target", "wrong-guess", None).await;
        if st == 429 {
            retry_after = assert_limited(st, &body);
        } else {
            assert_eq!((st, body["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{body}");
        }
        statuses.push(st);
    }
    assert_eq!(statuses, [403, 403, 403, 429, 429, 429]);
    assert!(retry_after <= 2000, "one try per 2 s: retry_after_ms {retry_after}");

    // While the account is limited even its password is not checked ...
    let (st, body) = login_from(&client_from(loopback(20)), &base, "target", &password, None).await;
    assert_limited(st, &body);
    let retry_after = body["retry_after_ms"].as_u64().unwrap();
    // ... and after waiting as told, the right password works again.
    tokio::time::sleep(Duration::from_millis(retry_after + 100)).await;
    let (st, body) = login_from(&client_from(loopback(21)), &base, "target", &password, None).await;
    assert_eq!(st, 200, "{body}");
    // A successful login is not counted: it works again at once.
    let (st, body) = login_from(&client_from(loopback(21)), &base, "target", &password, None).await;
    assert_eq!(st, 200, "{body}");

    // One address guessing at many accounts is limited too.
    let guesser = client_from(loopback(30));
    let mut statuses = Vec::new();
    for i in 0..5 {
        let (st, _) = login_from(&guesser, &base, &format!("someone-{i}"), "wrong-guess", None).await;
        statuses.push(st);
    }
    assert_eq!(statuses, [403, 403, 403, 429, 429]);
}

// Two processes on one PostgreSQL database (docs/scale-out.md): the
// sign-in buckets are rows of the database, so guesses and sign-ins spread
// over both processes empty one bucket, not one per process (which would
// let through twice the configured burst).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_limits_hold_across_processes() {
    let Some(servers) = TestServer::builder()
        .env("WEFT_RATE_LIMIT__ENABLED", "true")
        .env("WEFT_RATE_LIMIT__FAILED_LOGIN_PER_SECOND", "0.01")
        .env("WEFT_RATE_LIMIT__FAILED_LOGIN_BURST", "4")
        .env("WEFT_RATE_LIMIT__LOGIN_PER_SECOND", "0.01")
        .env("WEFT_RATE_LIMIT__LOGIN_BURST", "3")
        .user("target", "the-right-password")
        .user("walker", "walkers-own-password")
        .start_cluster(2)
        .await
    else {
        return;
    };
    let bases = [servers[0].base_url(), servers[1].base_url()];

    // Wrong guesses at one account, each from another address and
    // alternately through either process: the account's one bucket of 4.
    let mut statuses = Vec::new();
    for i in 0..6u8 {
        let base = &bases[usize::from(i % 2)];
        let (st, body) = login_from(&client_from(loopback(70 + i)), base, "target", "wrong-guess", None).await;
        if st == 429 {
            assert_limited(st, &body);
        } else {
            assert_eq!(body["errcode"], "M_FORBIDDEN", "{body}");
        }
        statuses.push(st);
    }
    assert_eq!(statuses, [403, 403, 403, 403, 429, 429]);
    for base in &bases {
        let (st, body) = login_from(&client_from(loopback(80)), base, "target", "the-right-password", None).await;
        assert_limited(st, &body);
    }

    // Sign-ins from one address, alternately through either process: the
    // address's one bucket of 3, right password or not.
    let http = client_from(loopback(90));
    let mut statuses = Vec::new();
    for i in 0..5 {
        let (st, body) = login_from(&http, &bases[i % 2], "walker", "walkers-own-password", None).await;
        assert!(st == 200 || st == 429, "{st} {body}");
        statuses.push(st);
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
}

/// Reads from `s` until EOF or error; true if the server closed it
/// within `within`.
async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline.into(), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

async fn connect_from(from: IpAddr, to: SocketAddr) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(from, 0)).unwrap();
    sock.connect(to).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_are_capped_per_address_and_time_out() {
    let server = TestServer::builder()
        .env("WEFT_LIMITS__MAX_CONNECTIONS_PER_IP", "50")
        .env("WEFT_LIMITS__HEADER_TIMEOUT_SECS", "3")
        .start()
        .await;
    let base = server.base_url();
    let addr: SocketAddr = base.trim_start_matches("http://").parse().unwrap();

    // 300 connections from 127.0.0.1 that never finish their request;
    // each task reports when the server closed it.
    let opened = Instant::now();
    let mut half = tokio::task::JoinSet::new();
    for _ in 0..300 {
        let mut s = connect_from(loopback(1), addr).await;
        s.write_all(b"GET /_matrix/client/versions HTTP/1.1\r\n").await.unwrap();
        half.spawn(async move {
            let closed = closed_within(&mut s, Duration::from_secs(15)).await;
            closed.then(|| opened.elapsed())
        });
    }

    // Another client is served promptly meanwhile.
    let other = client_from(loopback(2));
    let t = Instant::now();
    let resp = other
        .get(format!("{base}/_matrix/client/versions"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(t.elapsed() < Duration::from_secs(1), "took {:?}", t.elapsed());

    let mut at = Vec::new();
    while let Some(closed) = half.join_next().await {
        at.push(closed.unwrap().expect("every half-sent request is closed"));
    }
    at.sort();
    // Past the cap of 50 they are closed at once; the 50 admitted ones
    // after the 3 s header timeout.
    let early = at.iter().filter(|t| **t < Duration::from_secs(2)).count();
    assert_eq!(early, 250, "closed at: {at:?}");
    assert!(at[250] >= Duration::from_millis(2900), "closed at: {at:?}");
    assert!(at[299] < Duration::from_secs(10), "closed at: {at:?}");

    // Their slots are free again; an idle keep-alive connection is closed
    // after the timeout as well.
    let mut s = connect_from(loopback(1), addr).await;
    s.write_all(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    let t = Instant::now();
    assert!(closed_within(&mut s, Duration::from_secs(10)).await);
    assert!(
        t.elapsed() >= Duration::from_millis(2500),
        "closed after {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_file_soft_limit_is_raised_to_the_hard_limit() {
    // Start the server with a low soft limit (inherited from this process).
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain get/setrlimit on this test process (nextest runs each test in its own).
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
    }
    let hard = lim.rlim_max;
    if hard <= 512 {
        eprintln!("hard open-file limit {hard}: nothing to raise");
        return;
    }
    let low = libc::rlimit {
        rlim_cur: 256,
        rlim_max: hard,
    };
    // SAFETY: as above.
    unsafe {
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &low), 0);
    }
    let server = TestServer::start().await;
    let pid = server.pid().expect("server pid");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_owned();
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (soft, hard_seen) = (fields[3], fields[4]);
    assert_eq!(soft, hard_seen, "{line}");
    assert_eq!(soft, hard.to_string(), "{line}");
}

fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_directory_and_database_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("fresh");
    let mut spec = weft_testkit::ServeSpec::new(env!("CARGO_BIN_EXE_weft"), &data, root.path().join("log"));
    spec.wait_mqtt_tls = true;
    let mut server = weft_testkit::ServerProcess::start(spec).await.unwrap();
    // A write, so the WAL has content.
    register(&server.addrs.http, "perm", "a-long-password").await;

    let private = |what: &str| {
        let expect = [
            ("", 0o700),
            ("weft.db", 0o600),
            ("weft.db-wal", 0o600),
            ("weft.db-shm", 0o600),
            ("signing.key", 0o600),
            ("weft.toml", 0o600),
            ("tls", 0o700),
            ("tls/mqtt.key", 0o600),
        ];
        for (name, want) in expect {
            let p = if name.is_empty() { data.clone() } else { data.join(name) };
            assert_eq!(mode(&p), want, "{what}: mode of {} is {:o}", p.display(), mode(&p));
        }
    };
    private("fresh data directory");

    // A data directory an older version left readable by all is tightened
    // at the next start.
    server.terminate(Duration::from_secs(10)).await.expect("clean exit");
    let open = |name: &str, m: u32| {
        let p = if name.is_empty() { data.clone() } else { data.join(name) };
        if p.exists() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
        }
    };
    for (name, m) in [
        ("", 0o755),
        ("weft.db", 0o644),
        ("signing.key", 0o644),
        ("tls", 0o755),
        ("tls/mqtt.key", 0o644),
    ] {
        open(name, m);
    }
    server.restart().await.unwrap();
    for (name, want) in [
        ("", 0o700),
        ("weft.db", 0o600),
        ("weft.db-wal", 0o600),
        ("weft.db-shm", 0o600),
        ("signing.key", 0o600),
        ("tls", 0o700),
        ("tls/mqtt.key", 0o600),
    ] {
        let p = if name.is_empty() { data.clone() } else { data.join(name) };
        assert_eq!(
            mode(&p),
            want,
            "after restart: mode of {} is {:o}",
            p.display(),
            mode(&p)
        );
    }
}

/// A hand-made MQTT 3.1.1 CONNECT with user name and password, sent from
/// `from`; returns the CONNACK's return code.
async fn mqtt_connect(from: IpAddr, to: SocketAddr, client_id: &str, user: &str, password: &str) -> u8 {
    fn field(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut rest = Vec::new();
    field(&mut rest, "MQTT");
    rest.extend_from_slice(&[4, 0xC2, 0, 60]); // level 4; user, password, clean session; keepalive
    field(&mut rest, client_id);
    field(&mut rest, user);
    field(&mut rest, password);
    assert!(rest.len() < 128);
    let mut packet = vec![0x10, rest.len() as u8];
    packet.extend_from_slice(&rest);
    let mut s = connect_from(from, to).await;
    s.write_all(&packet).await.unwrap();
    let mut ack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut ack))
        .await
        .expect("CONNACK in time")
        .expect("CONNACK");
    assert_eq!(ack[..3], [0x20, 2, 0], "CONNACK {ack:?}");
    ack[3]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_password_guesses_share_the_failed_login_limit() {
    let root = tempfile::tempdir().unwrap();
    let mut spec = weft_testkit::ServeSpec::new(
        env!("CARGO_BIN_EXE_weft"),
        root.path().join("data"),
        root.path().join("log"),
    )
    .env("WEFT_RATE_LIMIT__ENABLED", "true")
    .env("WEFT_RATE_LIMIT__FAILED_LOGIN_PER_SECOND", "0.5")
    .env("WEFT_RATE_LIMIT__FAILED_LOGIN_BURST", "3");
    spec.wait_mqtt = true;
    let server = weft_testkit::ServerProcess::start(spec).await.unwrap();
    let mqtt = server.addrs.mqtt.expect("mqtt address");
    let base = server.addrs.http.clone();
    register(&base, "sensor", "the-right-password").await;

    // Guesses over MQTT from different addresses: 0x04 bad user name or
    // password three times, then 0x03 server unavailable (3.1.1's only
    // code for "not now").
    let mut codes = Vec::new();
    for i in 0..5u8 {
        codes.push(mqtt_connect(loopback(40 + i), mqtt, &format!("c{i}"), "sensor", "wrong").await);
    }
    assert_eq!(codes, [4, 4, 4, 3, 3]);
    // The account's bucket is the same for every door: HTTP is limited too.
    let (st, body) = login_from(&client_from(loopback(50)), &base, "sensor", "the-right-password", None).await;
    let wait = assert_limited(st, &body);
    tokio::time::sleep(Duration::from_millis(wait + 100)).await;
    assert_eq!(
        mqtt_connect(loopback(51), mqtt, "c-ok", "sensor", "the-right-password").await,
        0,
        "the right password works again after retry_after_ms"
    );
}

/// A password CONNECT takes from the address's sign-in bucket, as `/login`
/// does (a token CONNECT does not): the right password from one address
/// is refused with 0x03 once the bucket is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_password_connects_share_the_sign_in_limit() {
    let root = tempfile::tempdir().unwrap();
    let mut spec = weft_testkit::ServeSpec::new(
        env!("CARGO_BIN_EXE_weft"),
        root.path().join("data"),
        root.path().join("log"),
    )
    .env("WEFT_RATE_LIMIT__ENABLED", "true")
    .env("WEFT_RATE_LIMIT__LOGIN_PER_SECOND", "0.01")
    .env("WEFT_RATE_LIMIT__LOGIN_BURST", "3");
    spec.wait_mqtt = true;
    let server = weft_testkit::ServerProcess::start(spec).await.unwrap();
    let mqtt = server.addrs.mqtt.expect("mqtt address");
    let base = server.addrs.http.clone();
    register(&base, "sensor", "the-right-password").await;
    // A token got from another address (each has its own bucket).
    let (st, body) = login_from(&client_from(loopback(62)), &base, "sensor", "the-right-password", None).await;
    assert_eq!(st, 200, "{body}");
    let token = body["access_token"].as_str().expect("access_token").to_owned();
    let mut codes = Vec::new();
    for i in 0..4u8 {
        codes.push(mqtt_connect(loopback(61), mqtt, &format!("c{i}"), "sensor", "the-right-password").await);
    }
    assert_eq!(codes, [0, 0, 0, 3]);
    // HTTP /login from that address is limited too; a token CONNECT is not.
    let (st, body) = login_from(&client_from(loopback(61)), &base, "sensor", "the-right-password", None).await;
    assert_limited(st, &body);
    assert_eq!(mqtt_connect(loopback(61), mqtt, "c-token", "sensor", &token).await, 0);
}
