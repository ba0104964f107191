//! The media repository over HTTP: uploads (plain, asynchronous, over the
//! limit), downloads (authenticated and legacy, ranges, names and types),
//! thumbnails of real images, quotas, and what is left on disk.

mod common;

use std::io::Cursor;
use std::path::Path;

use common::*;
use image::{DynamicImage, ImageFormat, ImageReader, RgbImage};
use reqwest::header;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

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
}

async fn call(
    server: &TestServer,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Got {
    let mut req = server.http.request(method, format!("{}{path}", server.base_url()));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.expect("body").to_vec();
    Got { status, headers, body }
}

/// Uploads `bytes`; answers the media ID (the part after the server name).
async fn upload(server: &TestServer, c: &Client, bytes: Vec<u8>, content_type: &str, name: Option<&str>) -> String {
    let path = match name {
        Some(n) => format!("/_matrix/media/v3/upload?filename={n}"),
        None => "/_matrix/media/v3/upload".to_owned(),
    };
    let got = call(
        server,
        reqwest::Method::POST,
        &path,
        Some(&c.access_token),
        &[("content-type", content_type)],
        Some(bytes),
    )
    .await;
    assert_eq!(got.status, 200, "upload: {}", got.json());
    let uri = got.json()["content_uri"].as_str().expect("content_uri").to_owned();
    let prefix = format!("mxc://{}/", server.server_name);
    uri.strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{uri} is not on {prefix}"))
        .to_owned()
}

fn download_path(server: &TestServer, id: &str) -> String {
    format!("/_matrix/client/v1/media/download/{}/{id}", server.server_name)
}

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
        .collect()
}

#[tokio::test]
async fn uploads_round_trip_byte_identical_with_type_and_name() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    for (len, ty, name) in [
        (1usize, "application/octet-stream", "one.bin"),
        (5 << 20, "image/png", "five.png"),
        (50 << 20, "video/mp4", "fifty%20mib.mp4"),
    ] {
        let data = pattern(len, len as u8);
        let id = upload(&server, &alice, data.clone(), ty, Some(name)).await;
        let got = call(
            &server,
            reqwest::Method::GET,
            &download_path(&server, &id),
            Some(&alice.access_token),
            &[],
            None,
        )
        .await;
        assert_eq!(got.status, 200, "{len}: {}", got.json());
        assert_eq!(got.body.len(), len);
        assert!(got.body == data, "{len} bytes came back different");
        assert_eq!(got.header("content-type"), ty);
        assert_eq!(got.header("content-length"), len.to_string());
        // The name went up percent-encoded in the query and comes back in
        // RFC 6266's encoding: the same text here.
        assert!(
            got.header("content-disposition")
                .ends_with(&format!("filename*=utf-8''{name}")),
            "{}",
            got.header("content-disposition")
        );
    }
    // Inline only for safe types: HTML is an attachment.
    let id = upload(
        &server,
        &alice,
        b"<script>alert(1)</script>".to_vec(),
        "text/html",
        Some("x.html"),
    )
    .await;
    let got = call(
        &server,
        reqwest::Method::GET,
        &download_path(&server, &id),
        Some(&alice.access_token),
        &[],
        None,
    )
    .await;
    assert_eq!(got.status, 200);
    assert!(
        got.header("content-disposition").starts_with("attachment"),
        "{}",
        got.header("content-disposition")
    );
    assert!(got.header("content-security-policy").contains("sandbox"));
    // A name given in the download path wins.
    let got = call(
        &server,
        reqwest::Method::GET,
        &format!("{}/other.txt", download_path(&server, &id)),
        Some(&alice.access_token),
        &[],
        None,
    )
    .await;
    assert!(
        got.header("content-disposition")
            .ends_with("filename*=utf-8''other.txt"),
        "{}",
        got.header("content-disposition")
    );
}

#[tokio::test]
async fn downloads_need_a_token_unknown_ids_are_404_and_ranges_work() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let data = pattern(100_000, 7);
    let id = upload(&server, &alice, data.clone(), "application/octet-stream", None).await;
    let path = download_path(&server, &id);

    let got = call(&server, reqwest::Method::GET, &path, None, &[], None).await;
    assert_eq!(
        (got.status, got.json()["errcode"].clone()),
        (401, json!("M_MISSING_TOKEN"))
    );
    // Any user of the server may download (media is not per room).
    let got = call(&server, reqwest::Method::GET, &path, Some(&bob.access_token), &[], None).await;
    assert_eq!(got.status, 200);
    assert!(got.body == data);

    // Another server's media is fetched from it over federation
    // (federation_media.rs); one that cannot be reached is a 502, not a 500.
    let elsewhere = call(
        &server,
        reqwest::Method::GET,
        &format!("/_matrix/client/v1/media/download/elsewhere.invalid/{id}"),
        Some(&bob.access_token),
        &[],
        None,
    )
    .await;
    assert_eq!(elsewhere.status, 502, "{}", elsewhere.json());
    for missing in [download_path(&server, "NoSuchMediaId")] {
        let got = call(
            &server,
            reqwest::Method::GET,
            &missing,
            Some(&bob.access_token),
            &[],
            None,
        )
        .await;
        assert_eq!(
            (got.status, got.json()["errcode"].clone()),
            (404, json!("M_NOT_FOUND")),
            "{missing}"
        );
    }

    let ranged = |r: &'static str| {
        let (server, path, token) = (&server, path.clone(), bob.access_token.clone());
        async move { call(server, reqwest::Method::GET, &path, Some(&token), &[("range", r)], None).await }
    };
    let got = ranged("bytes=10-19").await;
    assert_eq!(got.status, 206);
    assert_eq!(got.body, &data[10..20]);
    assert_eq!(got.header("content-range"), "bytes 10-19/100000");
    let got = ranged("bytes=-5").await;
    assert_eq!((got.status, &got.body[..]), (206, &data[99_995..]));
    let got = ranged("bytes=100000-").await;
    assert_eq!(got.status, 416);
    assert_eq!(got.header("content-range"), "bytes */100000");

    // The legacy unauthenticated download serves the same bytes.
    let legacy = format!("/_matrix/media/v3/download/{}/{id}", server.server_name);
    let got = call(&server, reqwest::Method::GET, &legacy, None, &[], None).await;
    assert_eq!(got.status, 200);
    assert!(got.body == data);
    let got = call(
        &server,
        reqwest::Method::GET,
        "/_matrix/client/v1/media/config",
        Some(&bob.access_token),
        &[],
        None,
    )
    .await;
    assert_eq!(got.json()["m.upload.size"], json!(100 * 1024 * 1024));
}

#[tokio::test]
async fn an_upload_over_the_limit_is_413_and_leaves_nothing_on_disk() {
    let server = TestServer::builder()
        .env("WEFT_MEDIA__MAX_UPLOAD_BYTES", "1000000")
        .env("WEFT_MEDIA__LEGACY_UNAUTHENTICATED", "false")
        .start()
        .await;
    let alice = server.register("alice").await;
    let got = call(
        &server,
        reqwest::Method::POST,
        "/_matrix/media/v3/upload",
        Some(&alice.access_token),
        &[("content-type", "application/octet-stream")],
        Some(pattern(1_000_001, 1)),
    )
    .await;
    assert_eq!(
        (got.status, got.json()["errcode"].clone()),
        (413, json!("M_TOO_LARGE")),
        "{}",
        got.json()
    );
    let media = server.data_dir.join("media");
    assert!(
        media.join("blobs").is_dir(),
        "no media directory at {}",
        media.display()
    );
    assert_eq!(files_under(&media), Vec::<std::path::PathBuf>::new());
    // Exactly the limit is fine, and is the one file there.
    let id = upload(&server, &alice, pattern(1_000_000, 1), "application/octet-stream", None).await;
    let files = files_under(&media);
    assert_eq!(files.len(), 1, "{files:?}");
    let got = call(
        &server,
        reqwest::Method::GET,
        "/_matrix/client/v1/media/config",
        Some(&alice.access_token),
        &[],
        None,
    )
    .await;
    assert_eq!(got.json()["m.upload.size"], json!(1_000_000));
    // Files are the owner's only.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&files[0]).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Legacy unauthenticated media switched off.
    let legacy = format!("/_matrix/media/v3/download/{}/{id}", server.server_name);
    let got = call(&server, reqwest::Method::GET, &legacy, None, &[], None).await;
    assert_eq!((got.status, got.json()["errcode"].clone()), (404, json!("M_NOT_FOUND")));
}

#[tokio::test]
async fn equal_bytes_are_stored_once() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let data = pattern(300_000, 3);
    let a = upload(&server, &alice, data.clone(), "application/octet-stream", None).await;
    let b = upload(&server, &bob, data.clone(), "application/octet-stream", None).await;
    assert_ne!(a, b);
    let files = files_under(&server.data_dir.join("media"));
    assert_eq!(files.len(), 1, "{files:?}");
    let hex: String = Sha256::digest(&data).iter().map(|b| format!("{b:02x}")).collect();
    assert!(files[0].ends_with(&hex), "{files:?}");
}

#[tokio::test]
async fn asynchronous_upload_create_then_put() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let got = call(
        &server,
        reqwest::Method::POST,
        "/_matrix/media/v1/create",
        Some(&alice.access_token),
        &[],
        Some(b"{}".to_vec()),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.json());
    let uri = got.json()["content_uri"].as_str().expect("content_uri").to_owned();
    assert!(got.json()["unused_expires_at"].as_u64().is_some_and(|t| t > 0));
    let id = uri.rsplit('/').next().unwrap().to_owned();
    let put_path = format!("/_matrix/media/v3/upload/{}/{id}?filename=late.txt", server.server_name);

    // Not yet uploaded: a short wait ends in 504 M_NOT_YET_UPLOADED.
    let got = call(
        &server,
        reqwest::Method::GET,
        &format!("{}?timeout_ms=300", download_path(&server, &id)),
        Some(&bob.access_token),
        &[],
        None,
    )
    .await;
    assert_eq!(
        (got.status, got.json()["errcode"].clone()),
        (504, json!("M_NOT_YET_UPLOADED")),
        "{}",
        got.json()
    );

    // Only the creator may upload.
    let put = |token: String, body: &'static [u8]| {
        let server = &server;
        let put_path = put_path.clone();
        async move {
            call(
                server,
                reqwest::Method::PUT,
                &put_path,
                Some(&token),
                &[("content-type", "text/plain")],
                Some(body.to_vec()),
            )
            .await
        }
    };
    let got = put(bob.access_token.clone(), b"bob's").await;
    assert_eq!((got.status, got.json()["errcode"].clone()), (403, json!("M_FORBIDDEN")));

    // A download waiting for the bytes gets them when they come.
    let waiting = {
        let path = format!("{}?timeout_ms=10000", download_path(&server, &id));
        let http = server.http.clone();
        let url = format!("{}{path}", server.base_url());
        let token = bob.access_token.clone();
        tokio::spawn(async move {
            let r = http.get(url).bearer_auth(token).send().await.expect("waiting download");
            (r.status().as_u16(), r.bytes().await.expect("body").to_vec())
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let got = put(alice.access_token.clone(), b"hello later").await;
    assert_eq!(got.status, 200, "{}", got.json());
    assert_eq!(waiting.await.unwrap(), (200, b"hello later".to_vec()));

    // Not twice.
    let got = put(alice.access_token.clone(), b"again").await;
    assert_eq!(
        (got.status, got.json()["errcode"].clone()),
        (409, json!("M_CANNOT_OVERWRITE_MEDIA"))
    );
    let got = call(
        &server,
        reqwest::Method::GET,
        &download_path(&server, &id),
        Some(&bob.access_token),
        &[],
        None,
    )
    .await;
    assert_eq!(got.body, b"hello later");
    assert_eq!(got.header("content-type"), "text/plain");
    assert!(got.header("content-disposition").ends_with("late.txt"));
}

#[tokio::test]
async fn quota_and_pending_limits() {
    let server = TestServer::builder()
        .env("WEFT_MEDIA__QUOTA_BYTES_PER_USER", "250000")
        .env("WEFT_MEDIA__MAX_PENDING_UPLOADS", "2")
        .start()
        .await;
    let alice = server.register("alice").await;
    upload(&server, &alice, pattern(200_000, 1), "application/octet-stream", None).await;
    let got = call(
        &server,
        reqwest::Method::POST,
        "/_matrix/media/v3/upload",
        Some(&alice.access_token),
        &[("content-type", "application/octet-stream")],
        Some(pattern(60_000, 2)),
    )
    .await;
    assert_eq!((got.status, got.json()["errcode"].clone()), (413, json!("M_TOO_LARGE")));
    assert!(
        got.json()["error"].as_str().unwrap_or("").contains("quota"),
        "{}",
        got.json()
    );
    // What is left still fits.
    upload(&server, &alice, pattern(50_000, 3), "application/octet-stream", None).await;

    for _ in 0..2 {
        let got = call(
            &server,
            reqwest::Method::POST,
            "/_matrix/media/v1/create",
            Some(&alice.access_token),
            &[],
            Some(b"{}".to_vec()),
        )
        .await;
        assert_eq!(got.status, 200);
    }
    let got = call(
        &server,
        reqwest::Method::POST,
        "/_matrix/media/v1/create",
        Some(&alice.access_token),
        &[],
        Some(b"{}".to_vec()),
    )
    .await;
    assert_eq!(
        (got.status, got.json()["errcode"].clone()),
        (429, json!("M_LIMIT_EXCEEDED"))
    );
}

fn photo(w: u32, h: u32, format: ImageFormat) -> Vec<u8> {
    let img = RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, ((x + y) % 256) as u8])
    });
    let mut out = Vec::new();
    DynamicImage::ImageRgb8(img)
        .write_to(&mut Cursor::new(&mut out), format)
        .expect("encode");
    out
}

fn dims_and_format(bytes: &[u8]) -> (u32, u32, Option<ImageFormat>) {
    let r = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .expect("format");
    let f = r.format();
    let (w, h) = r.into_dimensions().expect("a decodable image");
    (w, h, f)
}

#[tokio::test]
async fn thumbnails_of_real_images_scale_and_crop() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let jpeg = upload(
        &server,
        &alice,
        photo(1200, 800, ImageFormat::Jpeg),
        "image/jpeg",
        Some("p.jpg"),
    )
    .await;
    let png = upload(
        &server,
        &alice,
        photo(640, 480, ImageFormat::Png),
        "image/png",
        Some("p.png"),
    )
    .await;
    let thumb = |id: &str, w: u32, h: u32, method: &str| {
        format!(
            "/_matrix/client/v1/media/thumbnail/{}/{id}?width={w}&height={h}&method={method}",
            server.server_name
        )
    };
    let cases = [
        (&jpeg, 320, 240, "scale", (320, 213), ImageFormat::Jpeg, "image/jpeg"),
        (&jpeg, 96, 96, "crop", (96, 96), ImageFormat::Jpeg, "image/jpeg"),
        (&png, 100, 100, "scale", (100, 75), ImageFormat::Png, "image/png"),
        (&png, 64, 32, "crop", (64, 32), ImageFormat::Png, "image/png"),
    ];
    for (id, w, h, method, expect, format, ty) in cases {
        for round in 0..2 {
            let got = call(
                &server,
                reqwest::Method::GET,
                &thumb(id, w, h, method),
                Some(&alice.access_token),
                &[],
                None,
            )
            .await;
            assert_eq!(got.status, 200, "{w}x{h} {method}: {}", got.json());
            assert_eq!(got.header("content-type"), ty);
            let (tw, th, f) = dims_and_format(&got.body);
            assert_eq!((tw, th), expect, "{w}x{h} {method}, round {round}");
            assert_eq!(f, Some(format));
        }
    }
    // Generated once: a second request is served from the store (one
    // thumbnail blob per size, plus the two originals).
    let files = files_under(&server.data_dir.join("media/blobs"));
    assert_eq!(files.len(), 2 + cases.len(), "{files:?}");

    // Not an image: 400.
    let text = upload(&server, &alice, b"plain".to_vec(), "text/plain", None).await;
    let got = call(
        &server,
        reqwest::Method::GET,
        &thumb(&text, 32, 32, "scale"),
        Some(&alice.access_token),
        &[],
        None,
    )
    .await;
    assert_eq!(got.status, 400, "{}", got.json());
    // A bad size: 400 M_INVALID_PARAM.
    let got = call(
        &server,
        reqwest::Method::GET,
        &thumb(&png, 0, 32, "scale"),
        Some(&alice.access_token),
        &[],
        None,
    )
    .await;
    assert_eq!(
        (got.status, got.json()["errcode"].clone()),
        (400, json!("M_INVALID_PARAM"))
    );
}

/// A PNG a few hundred bytes long that declares 60 000 × 60 000 pixels:
/// refused quickly, the server alive and well after.
#[tokio::test]
async fn a_decompression_bomb_is_refused_quickly() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    // Real compressed pixel data: rows of zeros, the first 64 KiB of them.
    let mut bomb = Vec::new();
    {
        let img = image::GrayImage::new(1, 1);
        DynamicImage::ImageLuma8(img)
            .write_to(&mut Cursor::new(&mut bomb), ImageFormat::Png)
            .unwrap();
    }
    // Patch the IHDR's width and height (bytes 16..24) and its CRC.
    bomb[16..20].copy_from_slice(&60_000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&60_000u32.to_be_bytes());
    let crc = crc32(&bomb[12..29]);
    bomb[29..33].copy_from_slice(&crc.to_be_bytes());
    let id = upload(&server, &alice, bomb, "image/png", None).await;
    let started = std::time::Instant::now();
    let got = call(
        &server,
        reqwest::Method::GET,
        &format!(
            "/_matrix/client/v1/media/thumbnail/{}/{id}?width=64&height=64",
            server.server_name
        ),
        Some(&alice.access_token),
        &[],
        None,
    )
    .await;
    assert_eq!(got.status, 400, "{}", got.json());
    assert!(
        got.json()["error"].as_str().unwrap_or("").contains("too large"),
        "{}",
        got.json()
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let (st, _) = alice.whoami().await;
    assert_eq!(st, 200);
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// `weft media list|stats|quarantine|purge` on a live server (through its
/// admin socket: the CLI never opens a second writer).
#[tokio::test(flavor = "multi_thread")]
async fn operators_list_count_quarantine_and_purge_media() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let shared = pattern(10_000, 9);
    let a1 = upload(&server, &alice, shared.clone(), "image/png", Some("a1.png")).await;
    let a2 = upload(&server, &alice, pattern(2_000, 1), "text/plain", Some("a2.txt")).await;
    let b1 = upload(&server, &bob, shared, "image/png", Some("b1.png")).await;
    let cli = |cmd: &'static str, rest: Vec<String>| {
        let server = &server;
        tokio::task::block_in_place(move || {
            let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
            server.cli("media", cmd, &rest)
        })
    };

    let (ok, out, err) = cli("list", vec![]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    // Newest first.
    assert!(
        lines[0].contains(&b1) && lines[0].contains("@bob:") && lines[0].contains("b1.png"),
        "{out}"
    );
    assert!(
        lines[2].contains(&a1) && lines[2].contains("10000\timage/png\ta1.png"),
        "{out}"
    );
    let (ok, out, _) = cli("list", vec!["--user".into(), "alice".into()]);
    assert!(ok);
    assert_eq!(out.lines().count(), 2, "{out}");

    let (ok, out, err) = cli("stats", vec![]);
    assert!(ok, "{err}");
    assert!(out.contains("items\t3\t22000 bytes"), "{out}");
    assert!(out.contains("files\t2\t12000 bytes"), "{out}");

    let dl = |id: String| {
        let path = download_path(&server, &id);
        let token = bob.access_token.clone();
        let server = &server;
        async move {
            call(server, reqwest::Method::GET, &path, Some(&token), &[], None)
                .await
                .status
        }
    };
    let (ok, out, err) = cli("quarantine", vec![format!("mxc://{}/{a2}", server.server_name)]);
    assert!(ok && out.contains("quarantined"), "{out}{err}");
    assert_eq!(dl(a2.clone()).await, 404);
    let (ok, _, _) = cli("quarantine", vec![a2.clone(), "--release".into()]);
    assert!(ok);
    assert_eq!(dl(a2.clone()).await, 200);
    let (ok, _, err) = cli("quarantine", vec!["NoSuchThing".into()]);
    assert!(!ok && err.contains("no media"), "{err}");

    // Nothing is older than a day; a purge needs a condition.
    let (ok, out, _) = cli("purge", vec!["--older-than".into(), "1d".into()]);
    assert!(ok && out.contains("deleted 0"), "{out}");
    let (ok, _, err) = cli("purge", vec![]);
    assert!(!ok, "{err}");
    // All of alice's media, on her request: bob's copy of the shared bytes stays.
    let (ok, out, err) = cli("purge", vec!["--user".into(), "alice".into()]);
    assert!(ok && out.contains("deleted 2"), "{out}{err}");
    assert_eq!(dl(a1).await, 404);
    assert_eq!(dl(a2).await, 404);
    assert_eq!(dl(b1.clone()).await, 200);
    assert_eq!(files_under(&server.data_dir.join("media/blobs")).len(), 1);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let (ok, out, _) = cli("purge", vec!["--older-than".into(), "1s".into()]);
    assert!(ok && out.contains("deleted 1"), "{out}");
    assert_eq!(dl(b1).await, 404);
    assert_eq!(files_under(&server.data_dir.join("media/blobs")).len(), 0);
}

/// A `kill -9` in the middle of an upload leaves no file under a blob name
/// (the partial upload was only ever in `media/tmp/`), and the restarted
/// server empties `media/tmp/` and serves uploads as before.
#[tokio::test]
async fn a_crash_during_upload_leaves_no_partial_file() {
    use tokio::io::AsyncWriteExt;

    let mut server = TestServer::start().await;
    let alice = server.register("alice").await;
    let before = upload(&server, &alice, pattern(1000, 5), "application/octet-stream", None).await;
    let addr = server.base_url().trim_start_matches("http://").to_owned();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.expect("connect");
    let total = 20 << 20;
    let head = format!(
        "POST /_matrix/media/v3/upload?filename=half.bin HTTP/1.1\r\nHost: {addr}\r\n\
         Authorization: Bearer {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {total}\r\n\r\n",
        alice.access_token
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&pattern(5 << 20, 6)).await.unwrap();
    conn.flush().await.unwrap();
    // The server is writing the upload to media/tmp/ now.
    let tmp = server.data_dir.join("media/tmp");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while files_under(&tmp).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the upload never reached media/tmp"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    server.kill();
    drop(conn);
    let blobs = server.data_dir.join("media/blobs");
    assert_eq!(files_under(&blobs).len(), 1, "only the complete upload is a blob");
    server.restart().await;
    assert!(files_under(&tmp).is_empty(), "media/tmp is emptied at start-up");
    assert_eq!(files_under(&blobs).len(), 1);
    let got = call(
        &server,
        reqwest::Method::GET,
        &download_path(&server, &before),
        Some(&alice.access_token),
        &[],
        None,
    )
    .await;
    assert_eq!((got.status, got.body), (200, pattern(1000, 5)));
    let (st, v) = alice.get("/_matrix/client/unstable/org.weft.files/uploads").await;
    assert_eq!(st, 200);
    assert_eq!(v["chunk"].as_array().map(Vec::len), Some(1), "{v}");
}

/// Serves `pages` (path → (content type, body)) over HTTP on a free port
/// of 127.0.0.1; answers its address.
async fn page_server(pages: Vec<(&'static str, &'static str, Vec<u8>)>) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let pages = std::sync::Arc::new(pages);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let pages = pages.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = conn.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let (ty, body) = match pages.iter().find(|(p, _, _)| *p == path) {
                    Some((_, ty, body)) => (*ty, body.clone()),
                    None => ("text/plain", b"not here".to_vec()),
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: {ty}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(&body).await;
            });
        }
    });
    addr
}

/// URL previews: off by default (404); on, only for allowed hosts (403
/// otherwise); a page's OpenGraph title, description and image (stored as
/// media, downloadable) make the answer.
#[tokio::test]
async fn url_previews_off_by_default_and_only_for_allowed_hosts() {
    let off = TestServer::start().await;
    let a = off.register("alice").await;
    let got = call(
        &off,
        reqwest::Method::GET,
        "/_matrix/client/v1/media/preview_url?url=http://127.0.0.1/",
        Some(&a.access_token),
        &[],
        None,
    )
    .await;
    assert_eq!(
        (got.status, got.json()["errcode"].clone()),
        (404, json!("M_UNRECOGNIZED"))
    );

    let png = photo(64, 48, ImageFormat::Png);
    let page = r#"<html><head><title>Greenhouse</title>
        <meta property="og:title" content="Greenhouse 3">
        <meta property="og:description" content="21.5 °C, 61 %">
        <meta property="og:image" content="/cam.png"></head><body>x</body></html>"#;
    let site = page_server(vec![
        ("/", "text/html; charset=utf-8", page.as_bytes().to_vec()),
        ("/cam.png", "image/png", png.clone()),
    ])
    .await;
    let server = TestServer::builder()
        .env("WEFT_MEDIA__URL_PREVIEW_ENABLED", "true")
        .env("WEFT_MEDIA__URL_PREVIEW_ALLOW", "[\"127.0.0.1\"]")
        .start()
        .await;
    let alice = server.register("alice").await;
    let preview = |url: String| {
        let server = &server;
        let token = alice.access_token.clone();
        async move {
            let path = format!("/_matrix/client/v1/media/preview_url?url={}", enc(&url));
            call(server, reqwest::Method::GET, &path, Some(&token), &[], None).await
        }
    };
    let got = preview(format!("http://{site}/")).await;
    assert_eq!(got.status, 200, "{}", got.json());
    let v = got.json();
    assert_eq!(v["og:title"], "Greenhouse 3");
    assert_eq!(v["og:description"], "21.5 °C, 61 %");
    assert_eq!(v["og:image:type"], "image/png");
    let mxc = v["og:image"].as_str().expect("og:image").to_owned();
    let img = call(
        &server,
        reqwest::Method::GET,
        &download_path(&server, mxc.rsplit('/').next().unwrap()),
        Some(&alice.access_token),
        &[],
        None,
    )
    .await;
    assert_eq!(img.body, png);

    // Not on the allow list (localhost is not 127.0.0.1 here), not http.
    let got = preview(format!("http://localhost:{}/", site.port())).await;
    assert_eq!((got.status, got.json()["errcode"].clone()), (403, json!("M_FORBIDDEN")));
    let got = preview("file:///etc/passwd".into()).await;
    assert_eq!(
        (got.status, got.json()["errcode"].clone()),
        (400, json!("M_INVALID_PARAM"))
    );
}

/// A `moto_server` (an S3-compatible server from PyPI) on a free port,
/// killed when dropped.
struct Moto {
    child: std::process::Child,
    url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn moto() -> Option<Moto> {
    if !weft_testkit::tools_installed(&["moto_server"], ".ci/run: pip install 'moto[server]' in its venv") {
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start moto_server");
    let m = Moto {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while http.get(&m.url).send().await.is_err() {
        assert!(std::time::Instant::now() < deadline, "moto_server did not start");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Some(m)
}

/// The S3-compatible backend: uploads (one PUT, and multipart above
/// 8 MiB) land in the bucket, not in the data directory; downloads,
/// ranges and thumbnails read them back; a purge deletes the objects.
#[tokio::test(flavor = "multi_thread")]
async fn the_s3_backend_keeps_blobs_in_the_bucket() {
    let Some(s3) = moto().await else { return };
    let http = reqwest::Client::new();
    let resp = http.put(format!("{}/weft-media", s3.url)).send().await.unwrap();
    assert!(resp.status().is_success(), "create bucket: {}", resp.status());
    let server = TestServer::builder()
        .env("WEFT_MEDIA__BACKEND", "s3")
        .env("WEFT_MEDIA__S3_ENDPOINT", &s3.url)
        .env("WEFT_MEDIA__S3_BUCKET", "weft-media")
        .env("WEFT_MEDIA__S3_ACCESS_KEY_ID", "testing")
        .env("WEFT_MEDIA__S3_SECRET_ACCESS_KEY", "testing")
        .start()
        .await;
    let alice = server.register("alice").await;
    let big = pattern(10 << 20, 8);
    let small = pattern(1000, 9);
    let big_id = upload(
        &server,
        &alice,
        big.clone(),
        "application/octet-stream",
        Some("big.bin"),
    )
    .await;
    let small_id = upload(&server, &alice, small.clone(), "text/plain", Some("s.txt")).await;
    for (id, data) in [(&big_id, &big), (&small_id, &small)] {
        let got = call(
            &server,
            reqwest::Method::GET,
            &download_path(&server, id),
            Some(&alice.access_token),
            &[],
            None,
        )
        .await;
        assert_eq!(got.status, 200);
        assert!(got.body == *data, "{} bytes came back different", data.len());
    }
    let got = call(
        &server,
        reqwest::Method::GET,
        &download_path(&server, &big_id),
        Some(&alice.access_token),
        &[("range", "bytes=9000000-9000009")],
        None,
    )
    .await;
    assert_eq!((got.status, &got.body[..]), (206, &big[9_000_000..9_000_010]));
    let png = upload(&server, &alice, photo(200, 100, ImageFormat::Png), "image/png", None).await;
    let got = call(
        &server,
        reqwest::Method::GET,
        &format!(
            "/_matrix/client/v1/media/thumbnail/{}/{png}?width=50&height=50&method=scale",
            server.server_name
        ),
        Some(&alice.access_token),
        &[],
        None,
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(dims_and_format(&got.body).0, 50);
    // The bytes are in the bucket, none in the data directory.
    assert!(files_under(&server.data_dir.join("media")).is_empty());
    let list = || {
        let http = http.clone();
        let url = format!("{}/weft-media?list-type=2", s3.url);
        async move { http.get(url).send().await.unwrap().text().await.unwrap() }
    };
    let listing = list().await;
    assert_eq!(listing.matches("<Key>blobs/").count(), 4, "{listing}");
    let hex: String = Sha256::digest(&big).iter().map(|b| format!("{b:02x}")).collect();
    assert!(listing.contains(&format!("<Key>blobs/{hex}</Key>")), "{listing}");
    // A purge of alice's media deletes the objects.
    let (ok, out, err) = tokio::task::block_in_place(|| server.cli("media", "purge", &["--user", "alice"]));
    assert!(ok && out.contains("deleted 3"), "{out}{err}");
    let listing = list().await;
    assert_eq!(listing.matches("<Key>blobs/").count(), 0, "{listing}");
}
