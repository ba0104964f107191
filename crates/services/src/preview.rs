//! URL previews (`/preview_url`, docs/media.md): off by default; when on,
//! only pages on the hosts of `media.url_preview_allow` are fetched (each
//! redirect checked again), at most 1 MiB of page and 5 MiB of image, in
//! 10 s. The page's OpenGraph `og:title`, `og:description` and
//! `og:image` (stored as media, so the answer holds an `mxc://` URL), or
//! its `<title>` and `description`, make the answer.

use std::time::Duration;

use serde_json::{Map, Value, json};
use weft_core::{Error, ErrorKind, Result};

use crate::{Services, Session};

const MAX_PAGE: usize = 1024 * 1024;
const MAX_IMAGE: usize = 5 * 1024 * 1024;
const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_REDIRECTS: usize = 3;

/// Whether `host` is on the allow list.
fn allowed(allow: &[String], host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    allow.iter().any(|a| {
        let a = a.to_ascii_lowercase();
        match a.strip_prefix("*.") {
            Some(domain) => host.ends_with(&format!(".{domain}")),
            None => host == a,
        }
    })
}

impl Services {
    fn preview_client(&self) -> Result<reqwest::Client> {
        let allow = self.config.media.url_preview_allow.clone();
        reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(TIMEOUT)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                let ok = attempt.previous().len() < MAX_REDIRECTS
                    && attempt.url().host_str().is_some_and(|h| allowed(&allow, h));
                if ok { attempt.follow() } else { attempt.stop() }
            }))
            .build()
            .map_err(|e| Error::internal(format!("preview HTTP client: {e}")))
    }

    /// Fetches at most `max` bytes of `url`: (content type, bytes).
    async fn fetch_limited(
        &self,
        client: &reqwest::Client,
        url: reqwest::Url,
        max: usize,
    ) -> Result<(String, Vec<u8>)> {
        let failed =
            |e: String| Error::new(ErrorKind::Unknown, format!("Could not fetch the page: {e}")).with_status(502);
        let resp = client.get(url).send().await.map_err(|e| failed(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(failed(format!("it answered {}", resp.status())));
        }
        let ct = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let mut body = Vec::new();
        let mut resp = resp;
        while let Some(chunk) = resp.chunk().await.map_err(|e| failed(e.to_string()))? {
            let room = max.saturating_sub(body.len());
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if body.len() >= max {
                break;
            }
        }
        Ok((ct, body))
    }

    /// `GET /_matrix/client/v1/media/preview_url?url=…`. Off:
    /// `404 M_UNRECOGNIZED`; not http(s): `400 M_INVALID_PARAM`; a host
    /// not allowed: `403 M_FORBIDDEN`; a page that cannot be fetched: 502.
    pub async fn preview_url(&self, session: &Session, url: &str) -> Result<Value> {
        let cfg = &self.config.media;
        if !cfg.url_preview_enabled {
            return Err(Error::new(
                ErrorKind::Unrecognized {
                    method_not_allowed: false,
                },
                "URL previews are off on this server",
            ));
        }
        let url = reqwest::Url::parse(url).map_err(|_| Error::invalid_param("url is not a URL"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::invalid_param("Only http and https URLs are previewed"));
        }
        if !url.host_str().is_some_and(|h| allowed(&cfg.url_preview_allow, h)) {
            return Err(Error::forbidden("Previews of this host are not allowed here"));
        }
        let client = self.preview_client()?;
        let (ct, body) = self.fetch_limited(&client, url.clone(), MAX_PAGE).await?;
        let mut out = Map::new();
        let image_url = if ct.starts_with("image/") {
            Some((url.clone(), Some((ct, body))))
        } else {
            let page = String::from_utf8_lossy(&body).into_owned();
            let meta = page_meta(&page);
            for key in ["og:title", "og:description", "og:site_name", "og:type"] {
                if let Some(v) = meta.get(key) {
                    out.insert(key.into(), json!(v));
                }
            }
            if !out.contains_key("og:title")
                && let Some(t) = meta.get("title")
            {
                out.insert("og:title".into(), json!(t));
            }
            if !out.contains_key("og:description")
                && let Some(d) = meta.get("description")
            {
                out.insert("og:description".into(), json!(d));
            }
            meta.get("og:image").and_then(|i| url.join(i).ok()).map(|u| (u, None))
        };
        if let Some((image, fetched)) = image_url
            && image.host_str().is_some_and(|h| allowed(&cfg.url_preview_allow, h))
        {
            let got = match fetched {
                Some(x) => Ok(x),
                None => self.fetch_limited(&client, image, MAX_IMAGE).await,
            };
            if let Ok((ct, bytes)) = got
                && ct.starts_with("image/")
                && bytes.len() < MAX_IMAGE
            {
                let id = self.upload_media(session, Some(&ct), None, &mut &bytes[..]).await?;
                out.insert("og:image".into(), json!(self.mxc(&id)));
                out.insert("og:image:type".into(), json!(ct));
                out.insert("matrix:image:size".into(), json!(bytes.len()));
            }
        }
        Ok(Value::Object(out))
    }
}

/// The `<meta property|name=… content=…>` values and the `<title>` of a
/// page (first of each).
fn page_meta(html: &str) -> std::collections::HashMap<String, String> {
    let doc = scraper::Html::parse_document(html);
    let mut out = std::collections::HashMap::new();
    if let Ok(sel) = scraper::Selector::parse("meta") {
        for m in doc.select(&sel) {
            let el = m.value();
            let (Some(key), Some(content)) = (el.attr("property").or(el.attr("name")), el.attr("content")) else {
                continue;
            };
            out.entry(key.to_ascii_lowercase())
                .or_insert_with(|| content.trim().to_owned());
        }
    }
    if let Ok(sel) = scraper::Selector::parse("title")
        && let Some(t) = doc.select(&sel).next()
    {
        let text: String = t.text().collect();
        let text = text.trim();
        if !text.is_empty() {
            out.entry("title".into()).or_insert_with(|| text.to_owned());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list() {
        let allow = vec![
            "example.org".to_owned(),
            "*.news.example".to_owned(),
            "127.0.0.1".to_owned(),
        ];
        assert!(allowed(&allow, "example.org"));
        assert!(allowed(&allow, "EXAMPLE.org"));
        assert!(!allowed(&allow, "www.example.org"));
        assert!(allowed(&allow, "a.news.example"));
        assert!(!allowed(&allow, "news.example"));
        assert!(!allowed(&allow, "evilnews.example"));
        assert!(allowed(&allow, "127.0.0.1"));
        assert!(!allowed(&allow, "127.0.0.2"));
    }

    #[test]
    fn meta_and_title() {
        let m = page_meta(
            r#"<html><head><title> Hello </title><meta property="og:title" content="OG"><meta name="description" content="d"></head></html>"#,
        );
        assert_eq!(m.get("og:title").map(String::as_str), Some("OG"));
        assert_eq!(m.get("title").map(String::as_str), Some("Hello"));
        assert_eq!(m.get("description").map(String::as_str), Some("d"));
    }
}
