//! What requests and responses share beneath the endpoint layer: the
//! Matrix error response, the access token, bounded body reading, and
//! token redaction for logs.

use axum::body::Bytes;
use axum::http::request::Parts;
use weft_core::{Error, ErrorKind};
use weft_services::Session;

/// An error on its way to becoming a Matrix error response.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        Self(e)
    }
}

/// The access token of a request: `Authorization: Bearer`, or the
/// `access_token` query parameter.
pub fn access_token(parts: &Parts) -> Option<String> {
    if let Some(h) = parts.headers.get(axum::http::header::AUTHORIZATION) {
        let v = h.to_str().ok()?;
        return v.strip_prefix("Bearer ").map(|t| t.trim().to_owned());
    }
    let query = parts.uri.query()?;
    for pair in query.split('&') {
        if let Some(v) = pair.strip_prefix("access_token=") {
            return Some(percent_decode(v));
        }
    }
    None
}

pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What the rate-limit layer found the request's access token to be.
#[derive(Clone)]
pub struct TokenChecked(pub weft_core::Result<Session>);

/// Reads a request body of at most `limit` bytes. A larger body is still
/// read (and dropped) up to a bound before answering `M_TOO_LARGE`, so the
/// client has finished sending and reliably reads the 413, instead of
/// seeing its upload cut off by a reset.
pub(crate) async fn read_limited(mut body: axum::body::Body, limit: usize) -> Result<Bytes, Error> {
    use http_body_util::BodyExt;
    let drain_cap = limit.saturating_mul(4).max(1 << 20);
    let mut buf = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Error::new(ErrorKind::NotJson, format!("Could not read body: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        total = total.saturating_add(data.len());
        if total > limit {
            if total > drain_cap {
                break;
            }
            continue;
        }
        buf.extend_from_slice(&data);
    }
    if total > limit {
        return Err(Error::new(ErrorKind::TooLarge, "Request body too large"));
    }
    Ok(Bytes::from(buf))
}

/// Query parameters that carry secrets: access tokens (`access_token`,
/// and `a` of the talk's CoAP form), registration and login tokens.
const SECRET_PARAMS: [&str; 4] = ["access_token", "a", "token", "loginToken"];

/// A request target fit for logs: the values of secret query parameters
/// replaced with `<redacted>`.
pub fn redacted_uri(uri: &axum::http::Uri) -> String {
    let Some(query) = uri.query() else {
        return uri.path().to_owned();
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if SECRET_PARAMS.contains(&k) => format!("{k}=<redacted>"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{}?{}", uri.path(), query.join("&"))
}

#[cfg(test)]
mod tests {
    use super::redacted_uri;

    #[test]
    fn secret_query_parameters_are_redacted() {
        let uri = "/_matrix/client/v3/sync?since=s1&access_token=SECRET&timeout=0&a=CoapSecret&token=reg"
            .parse()
            .expect("uri");
        let got = redacted_uri(&uri);
        assert_eq!(
            got,
            "/_matrix/client/v3/sync?since=s1&access_token=<redacted>&timeout=0&a=<redacted>&token=<redacted>"
        );
        assert_eq!(redacted_uri(&"/x".parse().expect("uri")), "/x");
    }
}
