//! The media repository: upload and download throughput (MB/s) beside the
//! raw speed of writing (and syncing) the same bytes to the same disk,
//! and thumbnail generation time (first request) against a cached one.

use std::io::{Cursor, Write};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::Bench;

fn r2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    r2(bytes as f64 / 1_000_000.0 / secs.max(1e-9))
}

/// Distinct pseudo-random bytes per file (so no two uploads share a blob).
fn file_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A photo-like JPEG of `w` × `h`.
fn jpeg(w: u32, h: u32) -> Result<Vec<u8>> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, ((x ^ y) & 0xff) as u8])
    });
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img).write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg)?;
    Ok(out)
}

pub async fn media(bench: &Bench) -> Result<Value> {
    let o = &bench.opts;
    let target = bench.target(1, "media").await?;
    let token = target.session(0).token.clone();
    let http = reqwest::Client::builder().no_proxy().build()?;
    let size = o.media_file_mib.clamp(1, 90) * 1024 * 1024;
    let files = o.media_files.clamp(1, 50);

    // Raw disk: the same bytes written and fsynced to the same filesystem.
    let dir = match &target.data_dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir(),
    };
    let mut raw_secs = 0.0;
    for i in 0..files {
        let data = file_bytes(size as usize, 1000 + i);
        let path = dir.join(format!("bench-raw-{i}"));
        let t = Instant::now();
        let mut f = std::fs::File::create(&path)?;
        f.write_all(&data)?;
        f.sync_all()?;
        raw_secs += t.elapsed().as_secs_f64();
        std::fs::remove_file(&path)?;
    }

    let mut up_secs = 0.0;
    let mut ids = Vec::new();
    for i in 0..files {
        let data = file_bytes(size as usize, i);
        let t = Instant::now();
        let resp = http
            .post(format!("{}/_matrix/media/v3/upload?filename=f{i}.bin", target.url))
            .bearer_auth(&token)
            .header("content-type", "application/octet-stream")
            .body(data)
            .send()
            .await?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        up_secs += t.elapsed().as_secs_f64();
        if !status.is_success() {
            bail!("upload: {status} {v}");
        }
        let mxc = v["content_uri"].as_str().context("no content_uri")?;
        ids.push(mxc.trim_start_matches("mxc://").to_owned());
    }

    let mut down_secs = 0.0;
    for id in &ids {
        let t = Instant::now();
        let resp = http
            .get(format!("{}/_matrix/client/v1/media/download/{id}", target.url))
            .bearer_auth(&token)
            .send()
            .await?;
        let status = resp.status();
        let n = resp.bytes().await?.len() as u64;
        down_secs += t.elapsed().as_secs_f64();
        if !status.is_success() || n != size {
            bail!("download: {status}, {n} bytes");
        }
    }

    // Thumbnails of a 12-megapixel JPEG: first request (decode, resize,
    // encode, store), then the cached answer.
    let photo = jpeg(4000, 3000)?;
    let resp = http
        .post(format!("{}/_matrix/media/v3/upload?filename=photo.jpg", target.url))
        .bearer_auth(&token)
        .header("content-type", "image/jpeg")
        .body(photo.clone())
        .send()
        .await?;
    let v: Value = resp.json().await?;
    let id = v["content_uri"]
        .as_str()
        .context("no content_uri")?
        .trim_start_matches("mxc://")
        .to_owned();
    let mut thumbs = serde_json::Map::new();
    for (w, h, method) in [(320, 240, "scale"), (96, 96, "crop"), (800, 600, "scale")] {
        let mut times = Vec::new();
        for _ in 0..2 {
            let t = Instant::now();
            let resp = http
                .get(format!(
                    "{}/_matrix/client/v1/media/thumbnail/{id}?width={w}&height={h}&method={method}",
                    target.url
                ))
                .bearer_auth(&token)
                .send()
                .await?;
            let status = resp.status();
            let _ = resp.bytes().await?;
            if !status.is_success() {
                bail!("thumbnail: {status}");
            }
            times.push(r2(t.elapsed().as_secs_f64() * 1000.0));
        }
        thumbs.insert(
            format!("{w}x{h}_{method}"),
            json!({ "first_ms": times[0], "cached_ms": times[1] }),
        );
    }
    target.stop().await;
    let total = size * files;
    Ok(json!({
        "files": files,
        "file_bytes": size,
        "raw_disk_write_fsync_mb_s": mb_per_s(total, raw_secs),
        "upload_mb_s": mb_per_s(total, up_secs),
        "download_mb_s": mb_per_s(total, down_secs),
        "thumbnail_source": { "width": 4000, "height": 3000, "jpeg_bytes": photo.len() },
        "thumbnails": thumbs,
        "measured": "one client over loopback HTTP/1.1, files one after another; raw disk: \
                     write + fsync of the same bytes in the server's data directory",
    }))
}
