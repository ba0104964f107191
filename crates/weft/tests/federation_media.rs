//! Remote media across two real Weft servers over their TLS federation
//! listeners: a user of one server downloads (and thumbnails) media of
//! the other through their own server, which fetches it over federation
//! (signed, `multipart/mixed`) and then serves it from its cache; and
//! what the federation media endpoints refuse.

mod common;

use std::io::Cursor;

use common::federation::*;
use common::*;
use image::{DynamicImage, ImageFormat, ImageReader, RgbImage};
use reqwest::header;
use ruma::api::IncomingResponse;
use ruma::api::federation::authenticated_media::{FileOrLocation, get_content, get_content_thumbnail};
use serde_json::Value;

struct Got {
    status: u16,
    headers: header::HeaderMap,
    body: Vec<u8>,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    }
    fn err(&self) -> (u16, Value) {
        (self.status, self.json())
    }
}

async fn get(server: &TestServer, path: &str, token: &str) -> Got {
    let resp = server
        .http
        .get(format!("{}{path}", server.base_url()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.expect("body").to_vec();
    Got { status, headers, body }
}

/// Uploads `bytes` on `server`; answers the media ID.
async fn upload(server: &TestServer, c: &Client, bytes: Vec<u8>, content_type: &str, name: &str) -> String {
    let resp = server
        .http
        .post(format!("{}/_matrix/media/v3/upload?filename={name}", server.base_url()))
        .bearer_auth(&c.access_token)
        .header("content-type", content_type)
        .body(bytes)
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = resp.json().await.expect("json");
    let uri = v["content_uri"].as_str().expect("content_uri");
    let prefix = format!("mxc://{}/", server.server_name());
    uri.strip_prefix(&prefix).expect("local mxc").to_owned()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0])
        .collect()
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 128]));
    let mut out = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(img)
        .write_to(&mut out, ImageFormat::Png)
        .expect("png");
    out.into_inner()
}

#[tokio::test]
async fn remote_media_is_fetched_over_federation_and_then_served_from_the_cache() {
    let mut a = TestServer::builder().federating().start().await;
    let b = TestServer::builder().federating().start().await;
    let alice = a.register("alice").await;
    let bob = b.register("bob").await;
    let data = pattern(300_000);
    let id = upload(&a, &alice, data.clone(), "application/x-weft-test", "report.bin").await;
    let image = png(300, 200);
    let image_id = upload(&a, &alice, image, "image/png", "photo.png").await;

    // Through B: the exact bytes, type and name of A's upload.
    let path = format!("/_matrix/client/v1/media/download/{}/{id}", a.server_name());
    let got = get(&b, &path, &bob.access_token).await;
    assert_eq!(got.status, 200, "{}", got.json());
    assert_eq!(got.body.len(), data.len());
    assert!(got.body == data, "the bytes differ");
    assert_eq!(got.header("content-type"), "application/x-weft-test");
    assert!(
        got.header("content-disposition").contains("report.bin"),
        "{}",
        got.header("content-disposition")
    );
    // With a file name of the client's choice, and a range, as for local media.
    let named = get(&b, &format!("{path}/other.bin"), &bob.access_token).await;
    assert_eq!(named.status, 200);
    assert!(named.header("content-disposition").contains("other.bin"));
    assert!(named.body == data);
    let ranged = b
        .http
        .get(format!("{}{path}", b.base_url()))
        .bearer_auth(&bob.access_token)
        .header("range", "bytes=10-19")
        .send()
        .await
        .expect("range");
    assert_eq!(ranged.status().as_u16(), 206);
    assert_eq!(ranged.bytes().await.expect("body").to_vec(), data[10..20].to_vec());

    // An item A does not have: 404 M_NOT_FOUND, passed on by B.
    let unknown = get(
        &b,
        &format!("/_matrix/client/v1/media/download/{}/NoSuchMediaHere", a.server_name()),
        &bob.access_token,
    )
    .await;
    assert_err(&unknown.err(), 404, "M_NOT_FOUND");

    // A thumbnail of A's image, made on B from the fetched original.
    let thumb_path = format!(
        "/_matrix/client/v1/media/thumbnail/{}/{image_id}?width=64&height=64&method=scale",
        a.server_name()
    );
    let thumb = get(&b, &thumb_path, &bob.access_token).await;
    assert_eq!(thumb.status, 200, "{}", thumb.json());
    assert!(
        thumb.header("content-type").starts_with("image/"),
        "{}",
        thumb.header("content-type")
    );
    let decoded = ImageReader::new(Cursor::new(&thumb.body))
        .with_guessed_format()
        .expect("format")
        .decode()
        .expect("a thumbnail image");
    assert!(
        decoded.width() <= 64 && decoded.height() <= 64,
        "{}x{}",
        decoded.width(),
        decoded.height()
    );

    // A stops: B serves what it fetched from its cache.
    a.kill();
    let again = get(&b, &path, &bob.access_token).await;
    assert_eq!(again.status, 200, "{}", again.json());
    assert!(again.body == data, "the cached bytes differ");
    assert_eq!(again.header("content-type"), "application/x-weft-test");
    let thumb_again = get(&b, &thumb_path, &bob.access_token).await;
    assert_eq!(thumb_again.status, 200);
    assert!(thumb_again.body == thumb.body);
    // What B never fetched cannot come from a stopped A: 502, not 500.
    let down = get(
        &b,
        &format!("/_matrix/client/v1/media/download/{}/NeverFetched", a.server_name()),
        &bob.access_token,
    )
    .await;
    assert_eq!(down.status, 502, "{}", down.json());
}

#[tokio::test]
async fn the_federation_media_endpoints_want_a_signature() {
    let a = TestServer::builder().federating().start().await;
    let alice = a.register("alice").await;
    let id = upload(&a, &alice, pattern(1000), "application/octet-stream", "x.bin").await;
    let https = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .expect("client");
    let base = format!("https://{}", a.federation_addr().expect("a federation listener"));
    for path in [
        format!("/_matrix/federation/v1/media/download/{id}"),
        format!("/_matrix/federation/v1/media/thumbnail/{id}?width=32&height=32"),
    ] {
        let resp = https.get(format!("{base}{path}")).send().await.expect(&path);
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert_err(&(status, body), 401, "M_UNAUTHORIZED");
    }
}

#[tokio::test]
async fn legacy_downloads_of_remote_media_follow_the_legacy_switch() {
    let a = TestServer::builder().federating().start().await;
    let b = TestServer::builder()
        .federating()
        .env("WEFT_MEDIA__LEGACY_UNAUTHENTICATED", "false")
        .start()
        .await;
    let alice = a.register("alice").await;
    let id = upload(&a, &alice, pattern(5000), "text/plain", "a.txt").await;
    let legacy = format!("/_matrix/media/v3/download/{}/{id}", a.server_name());
    // B has unauthenticated media off: 404, without asking A.
    let off = b
        .http
        .get(format!("{}{legacy}", b.base_url()))
        .send()
        .await
        .expect("legacy");
    assert_eq!(off.status().as_u16(), 404);
    // A has it on (the default): a legacy request there fetches B's media.
    let bob = b.register("bob").await;
    let bid = upload(&b, &bob, pattern(7000), "text/plain", "b.txt").await;
    let on = a
        .http
        .get(format!(
            "{}/_matrix/media/v3/download/{}/{bid}",
            a.base_url(),
            b.server_name()
        ))
        .send()
        .await
        .expect("legacy");
    assert_eq!(on.status().as_u16(), 200);
    assert_eq!(on.bytes().await.expect("body").to_vec(), pattern(7000));
}

#[tokio::test]
async fn with_federation_off_remote_media_is_not_found() {
    let a = TestServer::builder().federating().start().await;
    let alice = a.register("alice").await;
    let id = upload(&a, &alice, pattern(100), "text/plain", "a.txt").await;
    let off = TestServer::builder()
        .env("WEFT_FEDERATION__ENABLED", "false")
        .start()
        .await;
    let carol = off.register("carol").await;
    let got = get(
        &off,
        &format!("/_matrix/client/v1/media/download/{}/{id}", a.server_name()),
        &carol.access_token,
    )
    .await;
    assert_err(&got.err(), 404, "M_NOT_FOUND");
}

/// `GET uri` on `to`'s federation listener, signed by `from`.
async fn signed_get_raw(from: &TestServer, to: &TestServer, uri: &str) -> http::Response<Vec<u8>> {
    let resp = signed_raw(from, to, "GET", uri, b"", Vec::new()).await;
    let mut out = http::Response::builder().status(resp.status().as_u16());
    for (k, v) in resp.headers() {
        out = out.header(k.as_str(), v.as_bytes());
    }
    out.body(resp.bytes().await.expect("body").to_vec()).expect("response")
}

#[tokio::test]
async fn the_federation_media_endpoints_answer_local_media_as_multipart() {
    let a = TestServer::builder().federating().start().await;
    let b = TestServer::builder().federating().start().await;
    let alice = a.register("alice").await;
    let data = pattern(40_000);
    let id = upload(&a, &alice, data.clone(), "application/x-weft-test", "f.bin").await;
    let image_id = upload(&a, &alice, png(200, 100), "image/png", "p.png").await;

    let resp = signed_get_raw(&b, &a, &format!("/_matrix/federation/v1/media/download/{id}")).await;
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap_or("").to_owned();
    assert!(ct.starts_with("multipart/mixed"), "{ct}");
    let answer = get_content::v1::Response::try_from_http_response(resp).expect("a multipart answer");
    let FileOrLocation::File(file) = answer.content else {
        panic!("a redirect instead of the file")
    };
    assert!(file.file == data, "the bytes differ");
    assert_eq!(file.content_type.as_deref(), Some("application/x-weft-test"));
    assert_eq!(
        file.content_disposition.and_then(|d| d.filename).as_deref(),
        Some("f.bin")
    );

    let resp = signed_get_raw(
        &b,
        &a,
        &format!("/_matrix/federation/v1/media/thumbnail/{image_id}?width=32&height=32&method=scale"),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let answer = get_content_thumbnail::v1::Response::try_from_http_response(resp).expect("a multipart answer");
    let FileOrLocation::File(file) = answer.content else {
        panic!("a redirect instead of the thumbnail")
    };
    let decoded = ImageReader::new(Cursor::new(&file.file))
        .with_guessed_format()
        .expect("format")
        .decode()
        .expect("a thumbnail image");
    assert!(decoded.width() <= 32 && decoded.height() <= 32);

    // An unknown item and one still waiting for its upload: 404.
    let (_, pending) = alice.post("/_matrix/media/v1/create", serde_json::json!({})).await;
    let pending_id = pending["content_uri"]
        .as_str()
        .and_then(|u| u.rsplit('/').next())
        .expect("content_uri")
        .to_owned();
    for missing in ["NoSuchMedia", pending_id.as_str()] {
        let resp = signed_get_raw(&b, &a, &format!("/_matrix/federation/v1/media/download/{missing}")).await;
        let status = resp.status().as_u16();
        let body: Value = serde_json::from_slice(resp.body()).unwrap_or(Value::Null);
        assert_err(&(status, body), 404, "M_NOT_FOUND");
    }
}

#[tokio::test]
async fn remote_media_over_the_size_limit_is_refused_and_not_kept() {
    let a = TestServer::builder().federating().start().await;
    let b = TestServer::builder()
        .federating()
        .env("WEFT_MEDIA__MAX_UPLOAD_BYTES", "10000")
        .start()
        .await;
    let alice = a.register("alice").await;
    let bob = b.register("bob").await;
    // Just over B's limit (read whole, then refused) and far over it (cut
    // off while read).
    for len in [20_000, 300_000] {
        let id = upload(&a, &alice, pattern(len), "application/octet-stream", "big.bin").await;
        let path = format!("/_matrix/client/v1/media/download/{}/{id}", a.server_name());
        let got = get(&b, &path, &bob.access_token).await;
        assert_eq!(got.status, 502, "{len}: {}", got.json());
        let code = if len == 20_000 { "M_TOO_LARGE" } else { "M_UNKNOWN" };
        assert_eq!(got.json()["errcode"], code, "{len}");
        let (ok, list, err) = b.cli("media", "list", &[]);
        assert!(ok, "{err}");
        assert!(!list.contains(&id), "{len}: kept: {list}");
    }
    // Within it: fetched.
    let id = upload(&a, &alice, pattern(9_000), "application/octet-stream", "ok.bin").await;
    let got = get(
        &b,
        &format!("/_matrix/client/v1/media/download/{}/{id}", a.server_name()),
        &bob.access_token,
    )
    .await;
    assert_eq!(got.status, 200);
    assert!(got.body == pattern(9_000));
    // Kept as a row named `{server}/{id}`, its uploader the server.
    let (ok, list, err) = b.cli("media", "list", &[]);
    assert!(ok, "{err}");
    let row = list
        .lines()
        .find(|l| l.contains(&format!("{}/{id}", a.server_name())))
        .unwrap_or_else(|| panic!("not cached: {list}"));
    assert!(row.contains(a.server_name()), "{row}");
}
