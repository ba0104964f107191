//! Endpoints whose bodies are streams, for the media repository: an upload
//! is handed to its handler unread (the repository streams it to disk
//! under `media.max_upload_bytes`; the API's `limits.max_body_bytes` does
//! not apply), and a download answers a file or a byte range of it
//! without holding it in memory.

use std::future::Future;
use std::io;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, on};
use futures_util::TryStreamExt;
use ruma::api::error::FromHttpRequestError;
use ruma::api::{IncomingRequest, Metadata};
use tokio::io::AsyncRead;
use weft_core::Error;

use crate::AppState;
use crate::endpoint::{ApiResponse, CallerAuth, Head, RateClass, Routes, Ruma, RumaResponse, charge, paths_of};
use crate::extract::ApiError;

/// `R` and the request's headers, for endpoints that read a header ruma's
/// type does not (`Range` on downloads).
pub struct WithHeaders<R> {
    pub request: R,
    pub headers: HeaderMap,
}

impl<R: Metadata> Metadata for WithHeaders<R> {
    const METHOD: axum::http::Method = R::METHOD;
    const RATE_LIMITED: bool = R::RATE_LIMITED;
    type Authentication = R::Authentication;
    type PathBuilder = R::PathBuilder;
    const PATH_BUILDER: Self::PathBuilder = R::PATH_BUILDER;
}

impl<R: IncomingRequest> IncomingRequest for WithHeaders<R> {
    type EndpointError = R::EndpointError;
    type OutgoingResponse = R::OutgoingResponse;

    fn try_from_http_request<B, S>(req: axum::http::Request<B>, path_args: &[S]) -> Result<Self, FromHttpRequestError>
    where
        B: AsRef<[u8]>,
        S: AsRef<str>,
    {
        let headers = req.headers().clone();
        R::try_from_http_request(req, path_args).map(|request| Self { request, headers })
    }
}

/// A request body as a byte stream.
pub fn body_reader(body: Body) -> impl AsyncRead + Send + Unpin {
    tokio_util::io::StreamReader::new(body.into_data_stream().map_err(io::Error::other))
}

impl Routes {
    /// Declares an upload endpoint: as [`Routes::add`], but `R` is read
    /// from the request's head (path, query, headers) and the body is
    /// handed to `handler` unread.
    pub fn add_upload<R, T, F, Fut>(mut self, class: RateClass, handler: F) -> Self
    where
        R: IncomingRequest + Send + 'static,
        R::Authentication: CallerAuth,
        T: ApiResponse,
        F: Fn(AppState, Ruma<R>, Body) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<T, Error>> + Send + 'static,
    {
        let Ok(method) = MethodFilter::try_from(R::METHOD) else {
            // The method is a constant of the request type, not client input.
            panic!("endpoint {} has an unroutable method", std::any::type_name::<R>());
        };
        let endpoint = move |State(s): State<AppState>, req: Request| {
            let handler = handler.clone();
            async move {
                let (parts, body) = req.into_parts();
                let req = Head::<R>::read(parts, &s)
                    .await?
                    .with_body(bytes::Bytes::new(), &s)
                    .await?;
                charge(
                    &s,
                    class,
                    <R::Authentication as CallerAuth>::user(&req.caller),
                    req.peer,
                )
                .await?;
                handler(s, req, Body::new(body)).await.map(RumaResponse)
            }
        };
        let endpoint = move |st: State<AppState>, req: Request| {
            let fut = endpoint(st, req);
            async move { fut.await.map_err(ApiError) }
        };
        for path in paths_of::<R>() {
            self.router = self.router.route(&path, on(method, endpoint.clone()));
        }
        self
    }
}

/// Content types a browser may show inline: they cannot run script in the
/// server's origin. Everything else is an attachment.
const INLINE_TYPES: &[&str] = &[
    "text/plain",
    "text/csv",
    "application/json",
    "application/ld+json",
    "image/jpeg",
    "image/gif",
    "image/png",
    "image/apng",
    "image/webp",
    "image/avif",
    "video/mp4",
    "video/webm",
    "video/ogg",
    "video/quicktime",
    "audio/mp4",
    "audio/webm",
    "audio/aac",
    "audio/mpeg",
    "audio/ogg",
    "audio/wave",
    "audio/wav",
    "audio/x-wav",
    "audio/flac",
    "audio/x-flac",
];

/// A byte range a client asked for (`Range: bytes=…`), inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    From(u64),
    FromTo(u64, u64),
    Last(u64),
}

impl ByteRange {
    /// One range of a `Range` header; `None` (serve the whole file) for
    /// anything else, several ranges included, as RFC 9110 allows.
    pub fn parse(headers: &HeaderMap) -> Option<Self> {
        let v = headers.get(header::RANGE)?.to_str().ok()?.trim();
        let spec = v.strip_prefix("bytes=")?;
        if spec.contains(',') {
            return None;
        }
        let (a, b) = spec.split_once('-')?;
        let (a, b) = (a.trim(), b.trim());
        match (a.is_empty(), b.is_empty()) {
            (false, true) => a.parse().ok().map(Self::From),
            (false, false) => {
                let (a, b) = (a.parse().ok()?, b.parse().ok()?);
                (a <= b).then_some(Self::FromTo(a, b))
            }
            (true, false) => b.parse().ok().map(Self::Last),
            (true, true) => None,
        }
    }

    /// The first and last byte within a file of `len` bytes; `None`:
    /// unsatisfiable (416).
    pub fn within(self, len: u64) -> Option<(u64, u64)> {
        let (a, b) = match self {
            Self::From(a) => (a, len.checked_sub(1)?),
            Self::FromTo(a, b) => (a, b.min(len.checked_sub(1)?)),
            Self::Last(0) => return None,
            Self::Last(n) => (len.saturating_sub(n), len.checked_sub(1)?),
        };
        (a <= b && b < len).then_some((a, b))
    }
}

/// A media file (or part of it) on its way to the client.
pub struct FileResponse {
    status: StatusCode,
    headers: HeaderMap,
    body: Body,
}

impl FileResponse {
    /// The whole file (`range` `None`, 200) or the bytes `range` (206),
    /// from `reader`, which holds just those bytes.
    pub fn new(
        content_type: &str,
        filename: Option<&str>,
        total: u64,
        range: Option<(u64, u64)>,
        reader: impl AsyncRead + Send + Unpin + 'static,
    ) -> Self {
        let mut headers = HeaderMap::new();
        let safe_type = content_type.parse::<HeaderValue>().ok();
        headers.insert(
            header::CONTENT_TYPE,
            safe_type.unwrap_or(HeaderValue::from_static("application/octet-stream")),
        );
        headers.insert(header::CONTENT_DISPOSITION, disposition(content_type, filename));
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        // A file is never a page of this origin, even when opened as one.
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; \
                 style-src 'unsafe-inline'; media-src 'self'; object-src 'self';",
            ),
        );
        headers.insert(
            header::HeaderName::from_static("cross-origin-resource-policy"),
            HeaderValue::from_static("cross-origin"),
        );
        headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        let (status, len) = match range {
            Some((a, b)) => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes {a}-{b}/{total}")) {
                    headers.insert(header::CONTENT_RANGE, v);
                }
                (StatusCode::PARTIAL_CONTENT, b - a + 1)
            }
            None => (StatusCode::OK, total),
        };
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        // 64 KiB frames: the default 4 KiB makes a large download 16 times
        // as many frames and syscalls.
        let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(reader, 64 * 1024));
        Self { status, headers, body }
    }

    /// `416 Range Not Satisfiable` for a file of `total` bytes.
    pub fn unsatisfiable(total: u64) -> Self {
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&format!("bytes */{total}")) {
            headers.insert(header::CONTENT_RANGE, v);
        }
        Self {
            status: StatusCode::RANGE_NOT_SATISFIABLE,
            headers,
            body: Body::empty(),
        }
    }
}

impl ApiResponse for FileResponse {
    fn into_http(self) -> Response {
        (self.status, self.headers, self.body).into_response()
    }
}

/// `inline` only for the [`INLINE_TYPES`]; the file name (if any) in
/// RFC 6266's UTF-8 form, so no name can break out of the header.
fn disposition(content_type: &str, filename: Option<&str>) -> HeaderValue {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let kind = if INLINE_TYPES.contains(&essence.as_str()) {
        "inline"
    } else {
        "attachment"
    };
    let value = match filename {
        Some(name) if !name.is_empty() => format!("{kind}; filename*=utf-8''{}", rfc5987(name)),
        _ => kind.to_owned(),
    };
    HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("attachment"))
}

/// Percent-encodes all but RFC 5987's `attr-char`s.
fn rfc5987(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(v: &str) -> Option<ByteRange> {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
        ByteRange::parse(&h)
    }

    #[test]
    fn ranges() {
        assert_eq!(range("bytes=0-9").and_then(|r| r.within(100)), Some((0, 9)));
        assert_eq!(range("bytes=90-").and_then(|r| r.within(100)), Some((90, 99)));
        assert_eq!(range("bytes=-10").and_then(|r| r.within(100)), Some((90, 99)));
        assert_eq!(range("bytes=95-200").and_then(|r| r.within(100)), Some((95, 99)));
        assert_eq!(range("bytes=-500").and_then(|r| r.within(100)), Some((0, 99)));
        assert_eq!(range("bytes=100-").and_then(|r| r.within(100)), None);
        assert_eq!(range("bytes=0-0").and_then(|r| r.within(0)), None);
        assert_eq!(range("bytes=5-3"), None);
        assert_eq!(range("bytes=0-1,5-6"), None);
        assert_eq!(range("items=0-1"), None);
    }

    #[test]
    fn dispositions() {
        assert_eq!(
            disposition("image/png", Some("a b.png")),
            "inline; filename*=utf-8''a%20b.png"
        );
        assert_eq!(
            disposition("text/html", Some("x\"\r\n.html")),
            "attachment; filename*=utf-8''x%22%0D%0A.html"
        );
        assert_eq!(disposition("image/svg+xml", None), "attachment");
        assert_eq!(disposition("Text/Plain; charset=utf-8", None), "inline");
    }
}
