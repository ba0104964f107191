//! The outgoing federation client: every request to another server goes
//! through [`FederationClient::send`], which resolves the destination
//! (`resolve.rs`), signs the request (`Authorization: X-Matrix`), sends it
//! over HTTPS with a timeout and reads the answer as ruma's typed response.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use ruma::api::auth_scheme::{AuthScheme, NoAuthentication};
use ruma::api::federation::authentication::{ServerSignatures, ServerSignaturesInput};
use ruma::api::path_builder::PathBuilder;
use ruma::api::{IncomingResponse, OutgoingRequest};
use ruma::signatures::Ed25519KeyPair;
use ruma::{OwnedServerName, ServerName};
use weft_core::config::FederationConfig;
use weft_core::{Error, ErrorKind, Result};

use crate::resolve::{NetLookups, Resolved, read_capped, resolve_with};

/// The largest response body read from another server.
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// The authentication schemes an outgoing request can carry: the X-Matrix
/// signature, or none (the key endpoints, `/version`).
pub trait SendAuth: AuthScheme {
    fn input<'a>(origin: &ServerName, destination: &ServerName, key: &'a Ed25519KeyPair) -> Self::Input<'a>;
}

impl SendAuth for ServerSignatures {
    fn input<'a>(origin: &ServerName, destination: &ServerName, key: &'a Ed25519KeyPair) -> ServerSignaturesInput<'a> {
        ServerSignaturesInput::new(origin.to_owned(), destination.to_owned(), key)
    }
}

impl SendAuth for NoAuthentication {
    fn input(_: &ServerName, _: &ServerName, _: &Ed25519KeyPair) {}
}

/// Which host a TLS name connects to, as discovery decided: reqwest
/// connects to the URL's host (which is also the SNI name), and this
/// resolver maps it to the discovered one (an SRV target, a delegated
/// host). Kept in memory; one entry per name, the latest discovery wins.
#[derive(Default)]
struct Targets(Mutex<HashMap<String, String>>);

impl reqwest::dns::Resolve for SharedTargets {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = self
            .0
            .0
            .lock()
            .get(name.as_str())
            .cloned()
            .unwrap_or_else(|| name.as_str().to_owned());
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[derive(Clone, Default)]
struct SharedTargets(Arc<Targets>);

/// Sends requests to other servers, signed as this server.
pub struct FederationClient {
    origin: OwnedServerName,
    key: Arc<Ed25519KeyPair>,
    http: reqwest::Client,
    lookups: NetLookups,
    targets: SharedTargets,
    enabled: bool,
}

impl FederationClient {
    /// The client of `origin` (our server name), signing with `key`; TLS as
    /// `[federation]` says: the system's roots plus `ca_file`, or no
    /// verification at all.
    pub fn new(config: &FederationConfig, origin: OwnedServerName, key: Arc<Ed25519KeyPair>) -> Result<Self> {
        let targets = SharedTargets::default();
        let timeout = Duration::from_secs(config.request_timeout_secs.max(1));
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("Weft/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::limited(5))
            .https_only(true)
            .dns_resolver(Arc::new(targets.clone()));
        if !config.verify_certificates {
            builder = builder.danger_accept_invalid_certs(true);
        }
        if let Some(ca) = &config.ca_file {
            let pem = std::fs::read(ca).map_err(|e| Error::internal(format!("[federation] ca_file {ca}: {e}")))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| Error::internal(format!("[federation] ca_file {ca}: {e}")))?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| Error::internal(format!("federation HTTP client: {e}")))?;
        Ok(Self {
            origin,
            key,
            lookups: NetLookups::new(http.clone()),
            http,
            targets,
            enabled: config.enabled,
        })
    }

    /// Our server name, the `origin` of every request.
    pub fn origin(&self) -> &ServerName {
        &self.origin
    }

    /// Where requests to `destination` go.
    pub async fn resolve(&self, destination: &ServerName) -> Result<Resolved> {
        resolve_with(destination.as_str(), &self.lookups)
            .await
            .map_err(|e| Error::new(ErrorKind::RemoteUnreachable, e))
    }

    /// Sends `request` to `destination` and reads its typed response.
    /// Errors: `M_*` errors of the remote server keep their errcode where
    /// Weft has it (else `502`); an unreachable server or an unreadable
    /// answer is a `502` saying which server and why.
    pub async fn send<R>(&self, destination: &ServerName, request: R) -> Result<R::IncomingResponse>
    where
        R: OutgoingRequest,
        R::Authentication: SendAuth,
        for<'a> R::PathBuilder: PathBuilder<Input<'a> = ()>,
    {
        self.send_capped(destination, request, MAX_RESPONSE_BYTES).await
    }

    /// As [`FederationClient::send`], reading at most `max_bytes` of the
    /// answer's body (more: `502`). For remote media, whose limit is
    /// `[media] max_upload_bytes`.
    pub async fn send_capped<R>(
        &self,
        destination: &ServerName,
        request: R,
        max_bytes: usize,
    ) -> Result<R::IncomingResponse>
    where
        R: OutgoingRequest,
        R::Authentication: SendAuth,
        for<'a> R::PathBuilder: PathBuilder<Input<'a> = ()>,
    {
        if !self.enabled {
            return Err(Error::forbidden(
                "Federation is disabled on this server ([federation] enabled)",
            ));
        }
        let unreachable = |why: String| Error::new(ErrorKind::RemoteUnreachable, format!("{destination}: {why}"));
        let target = self.resolve(destination).await?;
        let base = format!("https://{}:{}", target.tls_name, target.port);
        if target.connect_host != target.tls_name.trim_start_matches('[').trim_end_matches(']') {
            self.targets
                .0
                .0
                .lock()
                .insert(target.tls_name.clone(), target.connect_host.clone());
        }
        let auth = <R::Authentication as SendAuth>::input(&self.origin, destination, &self.key);
        let req: http::Request<Vec<u8>> = request
            .try_into_http_request(&base, auth, ())
            .map_err(|e| Error::internal(format!("building a request to {destination}: {e}")))?;
        let mut req = reqwest::Request::try_from(req)
            .map_err(|e| Error::internal(format!("building a request to {destination}: {e}")))?;
        if let Ok(host) = http::HeaderValue::from_str(&target.host_header) {
            req.headers_mut().insert(http::header::HOST, host);
        }
        let resp = self.http.execute(req).await.map_err(|e| {
            unreachable(format!(
                "unreachable at {}:{}: {}",
                target.connect_host,
                target.port,
                chain(&e)
            ))
        })?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = read_capped(resp, max_bytes)
            .await
            .ok_or_else(|| unreachable(format!("answered more than {max_bytes} bytes")))?;
        if !status.is_success() {
            return Err(remote_error(destination, status.as_u16(), &body));
        }
        let mut response = http::Response::new(body);
        *response.status_mut() = status;
        *response.headers_mut() = headers;
        R::IncomingResponse::try_from_http_response(response)
            .map_err(|e| unreachable(format!("answered with an unreadable response: {e}")))
    }
}

/// An error and its causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The error of a remote server's non-2xx answer: its Matrix errcode kept
/// where Weft has the kind, else `502` naming the server, status and
/// errcode.
fn remote_error(destination: &ServerName, status: u16, body: &[u8]) -> Error {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let errcode = v.get("errcode").and_then(|c| c.as_str()).unwrap_or("");
    let message = v.get("error").and_then(|c| c.as_str()).unwrap_or("");
    let said = format!("{destination} answered {status} {errcode}: {message}");
    let kind = match errcode {
        "M_NOT_FOUND" => ErrorKind::NotFound,
        "M_FORBIDDEN" => ErrorKind::Forbidden,
        "M_INVALID_PARAM" => ErrorKind::InvalidParam,
        "M_MISSING_PARAM" => ErrorKind::MissingParam,
        "M_BAD_JSON" => ErrorKind::BadJson,
        "M_LIMIT_EXCEEDED" => ErrorKind::LimitExceeded {
            retry_after_ms: v.get("retry_after_ms").and_then(|r| r.as_u64()).unwrap_or(1000),
        },
        // Their refusal of our signature is not the caller's: a 502.
        _ => return Error::new(ErrorKind::RemoteUnreachable, said),
    };
    Error::new(kind, said)
}
