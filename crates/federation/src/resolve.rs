//! Server discovery: from a server name to the address to connect to and
//! the name to present (`Host` header and TLS SNI), following the spec's
//! "Resolving server names" in its order:
//!
//! 1. an IP literal, with or without a port (default 8448);
//! 2. a hostname with an explicit port;
//! 3. `https://<hostname>/.well-known/matrix/server`, whose `m.server`
//!    (`delegated[:port]`) is resolved by steps 1, 2, 4 and 5 (on the
//!    delegated name, which becomes the `Host`);
//! 4. DNS SRV `_matrix-fed._tcp.<hostname>`, then the deprecated
//!    `_matrix._tcp.<hostname>`;
//! 5. `<hostname>:8448`.
//!
//! Well-known answers are kept in memory: a valid one for its
//! `Cache-Control: max-age` (at most 48 h, 24 h without one), a failure
//! (no file, not JSON, no valid `m.server`) for [`WELL_KNOWN_ERROR_TTL`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The federation port when nothing names another.
pub const DEFAULT_PORT: u16 = 8448;
/// How long a well-known answer without `Cache-Control` is kept.
pub const WELL_KNOWN_TTL: Duration = Duration::from_secs(24 * 3600);
/// The longest a well-known answer is kept, whatever its headers say.
pub const WELL_KNOWN_MAX_TTL: Duration = Duration::from_secs(48 * 3600);
/// How long a failed well-known lookup is kept before it is tried again.
pub const WELL_KNOWN_ERROR_TTL: Duration = Duration::from_secs(600);
/// The largest well-known body read.
pub const WELL_KNOWN_MAX_BYTES: usize = 64 * 1024;

/// Where to send a server's requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The host to connect to: an IP address or a name to look up (A/AAAA).
    pub connect_host: String,
    pub port: u16,
    /// The `Host` header of each request.
    pub host_header: String,
    /// The name the server's certificate must be valid for (SNI).
    pub tls_name: String,
}

/// A name split into host and optional port, if it is a valid
/// `host[:port]` (IPv6 literals in brackets).
pub fn split_host_port(name: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = name.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        ip.parse::<std::net::Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?.parse().ok()?),
        };
        return Some((format!("[{ip}]"), port));
    }
    let (host, port) = match name.rsplit_once(':') {
        Some((h, p)) => (h, Some(p.parse::<u16>().ok()?)),
        None => (name, None),
    };
    let valid = !host.is_empty()
        && host.len() <= 255
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'));
    valid.then(|| (host.to_owned(), port))
}

/// Whether `host` (as [`split_host_port`] gives it) is an IP literal.
fn is_ip(host: &str) -> bool {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .is_ok()
}

/// The `m.server` of a well-known body, if it is a valid `host[:port]`.
pub fn parse_well_known(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let server = v.get("m.server")?.as_str()?;
    split_host_port(server).map(|_| server.to_owned())
}

/// What discovery asks the network, so the rules can be tested without it.
pub trait Lookups: Send + Sync {
    /// The `m.server` of `https://<host>/.well-known/matrix/server`, if
    /// valid (cached by the implementation).
    fn well_known(&self, host: &str) -> impl Future<Output = Option<String>> + Send;
    /// The best target (lowest priority) of the SRV record `name`.
    fn srv(&self, name: &str) -> impl Future<Output = Option<(String, u16)>> + Send;
}

/// Resolves `server_name` by the spec's rules. `Err` when the name is not
/// a valid server name.
pub async fn resolve_with(server_name: &str, lookups: &impl Lookups) -> Result<Resolved, String> {
    let (host, port) = split_host_port(server_name).ok_or_else(|| format!("{server_name:?} is not a server name"))?;
    // 1 and 2: an IP literal, or an explicit port.
    if is_ip(&host) || port.is_some() {
        return Ok(direct(&host, port, server_name));
    }
    // 3: delegation.
    if let Some(delegated) = lookups.well_known(&host).await
        && let Some((d_host, d_port)) = split_host_port(&delegated)
    {
        if is_ip(&d_host) || d_port.is_some() {
            return Ok(direct(&d_host, d_port, &delegated));
        }
        return Ok(by_srv(&d_host, lookups).await);
    }
    // 4 and 5.
    Ok(by_srv(&host, lookups).await)
}

/// Connect to `host:port` (8448 by default), presenting `host_header`.
fn direct(host: &str, port: Option<u16>, host_header: &str) -> Resolved {
    Resolved {
        connect_host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
        port: port.unwrap_or(DEFAULT_PORT),
        host_header: host_header.to_owned(),
        tls_name: host.to_owned(),
    }
}

/// SRV `_matrix-fed._tcp`, then `_matrix._tcp`, then port 8448; the `Host`
/// and certificate name stay `host`.
async fn by_srv(host: &str, lookups: &impl Lookups) -> Resolved {
    for prefix in ["_matrix-fed._tcp.", "_matrix._tcp."] {
        if let Some((target, port)) = lookups.srv(&format!("{prefix}{host}")).await {
            return Resolved {
                connect_host: target.trim_end_matches('.').to_owned(),
                port,
                host_header: host.to_owned(),
                tls_name: host.to_owned(),
            };
        }
    }
    Resolved {
        connect_host: host.to_owned(),
        port: DEFAULT_PORT,
        host_header: host.to_owned(),
        tls_name: host.to_owned(),
    }
}

/// The network's answers: well-known over HTTPS (cached), SRV by DNS.
pub struct NetLookups {
    http: reqwest::Client,
    /// `None`: no DNS resolver could be made from the system's
    /// configuration; SRV steps are skipped.
    dns: Option<hickory_resolver::TokioResolver>,
    /// host → (its `m.server`, or `None` for a failure; when it expires).
    well_known: Mutex<HashMap<String, (Option<String>, Instant)>>,
}

impl NetLookups {
    /// `http` must not follow redirects to other schemes and should have a
    /// timeout; it is the federation client's own.
    pub fn new(http: reqwest::Client) -> Self {
        let dns = match hickory_resolver::TokioResolver::builder_tokio().and_then(|b| b.build()) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!("federation: no DNS resolver ({e}); SRV records are not looked up");
                None
            }
        };
        Self {
            http,
            dns,
            well_known: Mutex::new(HashMap::new()),
        }
    }

    async fn fetch_well_known(&self, host: &str) -> (Option<String>, Duration) {
        let url = format!("https://{host}/.well-known/matrix/server");
        let resp = match self.http.get(&url).send().await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) => {
                tracing::debug!("federation: {url}: {}", r.status());
                return (None, WELL_KNOWN_ERROR_TTL);
            }
            Err(e) => {
                tracing::debug!("federation: {url}: {e}");
                return (None, WELL_KNOWN_ERROR_TTL);
            }
        };
        let ttl = max_age(resp.headers())
            .unwrap_or(WELL_KNOWN_TTL)
            .min(WELL_KNOWN_MAX_TTL);
        match read_capped(resp, WELL_KNOWN_MAX_BYTES).await {
            Some(body) => match parse_well_known(&body) {
                Some(server) => (Some(server), ttl),
                None => (None, WELL_KNOWN_ERROR_TTL),
            },
            None => (None, WELL_KNOWN_ERROR_TTL),
        }
    }
}

/// `Cache-Control: max-age=N` of a response.
fn max_age(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let cc = headers.get(reqwest::header::CACHE_CONTROL)?.to_str().ok()?;
    cc.split(',')
        .filter_map(|d| d.trim().strip_prefix("max-age="))
        .find_map(|n| n.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// A response's body, or `None` if it is longer than `cap`.
pub(crate) async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        if out.len() + chunk.len() > cap {
            return None;
        }
        out.extend_from_slice(&chunk);
    }
    Some(out)
}

impl Lookups for NetLookups {
    async fn well_known(&self, host: &str) -> Option<String> {
        if let Some((answer, until)) = self.well_known.lock().get(host)
            && *until > Instant::now()
        {
            return answer.clone();
        }
        let (answer, ttl) = self.fetch_well_known(host).await;
        let mut cache = self.well_known.lock();
        // Expired entries go when the map is next written.
        let now = Instant::now();
        cache.retain(|_, (_, until)| *until > now);
        cache.insert(host.to_owned(), (answer.clone(), now + ttl));
        answer
    }

    async fn srv(&self, name: &str) -> Option<(String, u16)> {
        use hickory_resolver::proto::rr::RData;
        let lookup = self.dns.as_ref()?.srv_lookup(name).await.ok()?;
        lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(srv) => Some((
                    srv.priority,
                    std::cmp::Reverse(srv.weight),
                    srv.target.to_utf8(),
                    srv.port,
                )),
                _ => None,
            })
            .min()
            .map(|(_, _, target, port)| (target, port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers from fixed tables, counting nothing: the rules alone.
    #[derive(Default)]
    struct Fake {
        well_known: HashMap<String, Vec<u8>>,
        srv: HashMap<String, (String, u16)>,
    }

    impl Lookups for Fake {
        async fn well_known(&self, host: &str) -> Option<String> {
            parse_well_known(self.well_known.get(host)?)
        }
        async fn srv(&self, name: &str) -> Option<(String, u16)> {
            self.srv.get(name).cloned()
        }
    }

    fn r(connect: &str, port: u16, host: &str, tls: &str) -> Resolved {
        Resolved {
            connect_host: connect.into(),
            port,
            host_header: host.into(),
            tls_name: tls.into(),
        }
    }

    #[tokio::test]
    async fn ip_literals_and_explicit_ports() {
        let f = Fake::default();
        assert_eq!(
            resolve_with("1.2.3.4", &f).await.unwrap(),
            r("1.2.3.4", 8448, "1.2.3.4", "1.2.3.4")
        );
        assert_eq!(
            resolve_with("1.2.3.4:9000", &f).await.unwrap(),
            r("1.2.3.4", 9000, "1.2.3.4:9000", "1.2.3.4")
        );
        assert_eq!(
            resolve_with("[::1]:9000", &f).await.unwrap(),
            r("::1", 9000, "[::1]:9000", "[::1]")
        );
        assert_eq!(
            resolve_with("[::1]", &f).await.unwrap(),
            r("::1", 8448, "[::1]", "[::1]")
        );
        assert_eq!(
            resolve_with("example.org:8000", &f).await.unwrap(),
            r("example.org", 8000, "example.org:8000", "example.org")
        );
        assert!(resolve_with("bad name", &f).await.is_err());
        assert!(resolve_with("example.org:notaport", &f).await.is_err());
        assert!(resolve_with("", &f).await.is_err());
    }

    #[tokio::test]
    async fn explicit_port_skips_well_known() {
        let mut f = Fake::default();
        f.well_known
            .insert("example.org".into(), br#"{"m.server": "other.org:443"}"#.to_vec());
        assert_eq!(
            resolve_with("example.org:8448", &f).await.unwrap(),
            r("example.org", 8448, "example.org:8448", "example.org")
        );
    }

    #[tokio::test]
    async fn well_known_with_and_without_port() {
        let mut f = Fake::default();
        f.well_known
            .insert("a.org".into(), br#"{"m.server": "matrix.a.org:443"}"#.to_vec());
        f.well_known
            .insert("b.org".into(), br#"{"m.server": "matrix.b.org"}"#.to_vec());
        f.well_known
            .insert("c.org".into(), br#"{"m.server": "10.0.0.1"}"#.to_vec());
        f.srv
            .insert("_matrix-fed._tcp.matrix.b.org".into(), ("host.b.org.".into(), 8449));
        assert_eq!(
            resolve_with("a.org", &f).await.unwrap(),
            r("matrix.a.org", 443, "matrix.a.org:443", "matrix.a.org")
        );
        // No port: SRV of the delegated name, whose name stays the Host.
        assert_eq!(
            resolve_with("b.org", &f).await.unwrap(),
            r("host.b.org", 8449, "matrix.b.org", "matrix.b.org")
        );
        assert_eq!(
            resolve_with("c.org", &f).await.unwrap(),
            r("10.0.0.1", 8448, "10.0.0.1", "10.0.0.1")
        );
    }

    #[tokio::test]
    async fn invalid_well_known_falls_back() {
        let mut f = Fake::default();
        f.well_known.insert("a.org".into(), b"not json".to_vec());
        f.well_known.insert("b.org".into(), br#"{"m.server": 5}"#.to_vec());
        f.well_known
            .insert("c.org".into(), br#"{"m.server": "bad host:x"}"#.to_vec());
        f.srv.insert("_matrix._tcp.c.org".into(), ("old.c.org".into(), 8000));
        assert_eq!(
            resolve_with("a.org", &f).await.unwrap(),
            r("a.org", 8448, "a.org", "a.org")
        );
        assert_eq!(
            resolve_with("b.org", &f).await.unwrap(),
            r("b.org", 8448, "b.org", "b.org")
        );
        // The deprecated SRV record when there is no `_matrix-fed` one.
        assert_eq!(
            resolve_with("c.org", &f).await.unwrap(),
            r("old.c.org", 8000, "c.org", "c.org")
        );
        // `_matrix-fed` wins over `_matrix`.
        f.srv
            .insert("_matrix-fed._tcp.c.org".into(), ("new.c.org".into(), 8001));
        assert_eq!(
            resolve_with("c.org", &f).await.unwrap(),
            r("new.c.org", 8001, "c.org", "c.org")
        );
    }

    #[test]
    fn well_known_bodies() {
        assert_eq!(
            parse_well_known(br#"{"m.server":"x.org:443"}"#).as_deref(),
            Some("x.org:443")
        );
        assert_eq!(parse_well_known(br#"{"m.server":"x.org:99999"}"#), None);
        assert_eq!(parse_well_known(br#"{}"#), None);
        assert_eq!(parse_well_known(b"[]"), None);
    }
}
