//! The media repository's endpoints (docs/media.md): uploads (plain and
//! asynchronous), authenticated downloads and thumbnails, the legacy
//! unauthenticated ones (`media.legacy_unauthenticated`), and `/config`.

use axum::body::Body;
use ruma::api::client::authenticated_media as authed;
use ruma::api::client::media::{
    create_content, create_content_async, create_mxc_uri, get_content, get_content_as_filename, get_content_thumbnail,
    get_media_config,
};
use ruma::{MilliSecondsSinceUnixEpoch, OwnedMxcUri, UInt};
use weft_core::Error;
use weft_services::media::Method;
use weft_services::media::{MediaFile, ThumbnailSpec};

use crate::AppState;
use crate::endpoint::{Full, Ruma};
use crate::streaming::{ByteRange, FileResponse, WithHeaders, body_reader};

pub async fn upload(
    s: AppState,
    req: Ruma<create_content::v3::Request>,
    body: Body,
) -> Result<create_content::v3::Response, Error> {
    let b = &req.body;
    let mut reader = body_reader(body);
    let id = s
        .upload_media(
            &req.caller,
            b.content_type.as_deref(),
            b.filename.as_deref(),
            &mut reader,
        )
        .await?;
    Ok(create_content::v3::Response::new(OwnedMxcUri::from(s.mxc(&id))))
}

pub async fn create(
    s: AppState,
    req: Ruma<create_mxc_uri::v1::Request>,
) -> Result<create_mxc_uri::v1::Response, Error> {
    let (id, until) = s.create_pending_media(&req.caller).await?;
    let mut resp = create_mxc_uri::v1::Response::new(OwnedMxcUri::from(s.mxc(&id)));
    resp.unused_expires_at = UInt::new(until).map(MilliSecondsSinceUnixEpoch);
    Ok(resp)
}

pub async fn upload_to(
    s: AppState,
    req: Ruma<create_content_async::v3::Request>,
    body: Body,
) -> Result<Full<serde_json::Value>, Error> {
    let b = &req.body;
    let mut reader = body_reader(body);
    s.upload_pending_media(
        &req.caller,
        b.server_name.as_str(),
        &b.media_id,
        b.content_type.as_deref(),
        b.filename.as_deref(),
        &mut reader,
    )
    .await?;
    // ruma's response (`{}`) has no constructor.
    Ok(Full(serde_json::json!({})))
}

/// Answers `file`, or the range the request's `Range` header asks for.
async fn answer(
    s: &AppState,
    file: MediaFile,
    headers: &axum::http::HeaderMap,
    name: Option<&str>,
) -> Result<FileResponse, Error> {
    let range = match ByteRange::parse(headers) {
        None => None,
        Some(r) => match r.within(file.size) {
            Some(r) => Some(r),
            None => return Ok(FileResponse::unsatisfiable(file.size)),
        },
    };
    let stream = s.media_read(&file, range).await?;
    let name = name.or(file.filename.as_deref());
    Ok(FileResponse::new(
        &file.content_type,
        name,
        stream.total,
        range,
        stream.reader,
    ))
}

pub async fn download(
    s: AppState,
    req: Ruma<WithHeaders<authed::get_content::v1::Request>>,
) -> Result<FileResponse, Error> {
    let b = &req.body.request;
    let file = s.media_file(b.server_name.as_str(), &b.media_id, b.timeout_ms).await?;
    answer(&s, file, &req.body.headers, None).await
}

pub async fn download_as(
    s: AppState,
    req: Ruma<WithHeaders<authed::get_content_as_filename::v1::Request>>,
) -> Result<FileResponse, Error> {
    let b = &req.body.request;
    let file = s.media_file(b.server_name.as_str(), &b.media_id, b.timeout_ms).await?;
    answer(&s, file, &req.body.headers, Some(&b.filename)).await
}

pub(crate) fn spec(width: UInt, height: UInt, method: Option<&ruma::media::Method>) -> Result<ThumbnailSpec, Error> {
    let side = |v: UInt| {
        u32::try_from(u64::from(v)).map_err(|_| Error::invalid_param("width and height must be at most 2048"))
    };
    Ok(ThumbnailSpec {
        width: side(width)?,
        height: side(height)?,
        method: match method {
            None | Some(ruma::media::Method::Scale) => Method::Scale,
            Some(ruma::media::Method::Crop) => Method::Crop,
            Some(other) => {
                return Err(Error::invalid_param(format!(
                    "Unknown thumbnail method {}",
                    other.as_str()
                )));
            }
        },
    })
}

pub async fn thumbnail(
    s: AppState,
    req: Ruma<WithHeaders<authed::get_content_thumbnail::v1::Request>>,
) -> Result<FileResponse, Error> {
    let b = &req.body.request;
    let spec = spec(b.width, b.height, b.method.as_ref())?;
    let file = s
        .media_thumbnail(b.server_name.as_str(), &b.media_id, spec, b.timeout_ms)
        .await?;
    answer(&s, file, &req.body.headers, None).await
}

pub async fn config(
    s: AppState,
    _: Ruma<authed::get_media_config::v1::Request>,
) -> Result<authed::get_media_config::v1::Response, Error> {
    Ok(authed::get_media_config::v1::Response::new(upload_size(&s)))
}

fn upload_size(s: &AppState) -> UInt {
    UInt::new(s.config.media.max_upload_bytes).unwrap_or(UInt::MAX)
}

// The legacy endpoints (spec before v1.11): unauthenticated downloads,
// served unless `media.legacy_unauthenticated` is off (then `404
// M_NOT_FOUND`, as Synapse answers for media it no longer serves there).

fn legacy_allowed(s: &AppState) -> Result<(), Error> {
    if s.config.media.legacy_unauthenticated {
        Ok(())
    } else {
        Err(Error::not_found(
            "Unauthenticated media is off on this server: use /_matrix/client/v1/media",
        ))
    }
}

#[allow(deprecated)]
pub async fn legacy_download(
    s: AppState,
    req: Ruma<WithHeaders<get_content::v3::Request>>,
) -> Result<FileResponse, Error> {
    legacy_allowed(&s)?;
    let b = &req.body.request;
    let file = s.media_file(b.server_name.as_str(), &b.media_id, b.timeout_ms).await?;
    answer(&s, file, &req.body.headers, None).await
}

#[allow(deprecated)]
pub async fn legacy_download_as(
    s: AppState,
    req: Ruma<WithHeaders<get_content_as_filename::v3::Request>>,
) -> Result<FileResponse, Error> {
    legacy_allowed(&s)?;
    let b = &req.body.request;
    let file = s.media_file(b.server_name.as_str(), &b.media_id, b.timeout_ms).await?;
    answer(&s, file, &req.body.headers, Some(&b.filename)).await
}

#[allow(deprecated)]
pub async fn legacy_thumbnail(
    s: AppState,
    req: Ruma<WithHeaders<get_content_thumbnail::v3::Request>>,
) -> Result<FileResponse, Error> {
    legacy_allowed(&s)?;
    let b = &req.body.request;
    let spec = spec(b.width, b.height, b.method.as_ref())?;
    let file = s
        .media_thumbnail(b.server_name.as_str(), &b.media_id, spec, b.timeout_ms)
        .await?;
    answer(&s, file, &req.body.headers, None).await
}

#[allow(deprecated)]
pub async fn legacy_config(
    s: AppState,
    _: Ruma<get_media_config::v3::Request>,
) -> Result<get_media_config::v3::Response, Error> {
    Ok(get_media_config::v3::Response::new(upload_size(&s)))
}

fn file_filter(q: crate::own::FileListQuery) -> weft_services::files::FileFilter {
    weft_services::files::FileFilter {
        tag: q.tag,
        mimetype: q.mimetype,
        since_ms: q.since,
        until_ms: q.until,
        search: q.q,
        from: q.from,
        limit: q.limit,
    }
}

pub async fn room_files(
    s: AppState,
    req: Ruma<crate::own::room_files::Request>,
) -> Result<Full<serde_json::Value>, Error> {
    let b = req.body;
    let room = b.room_id.to_string();
    Ok(Full(s.room_files(&req.caller, &room, &file_filter(b.query)).await?))
}

pub async fn my_uploads(
    s: AppState,
    req: Ruma<crate::own::my_uploads::Request>,
) -> Result<Full<serde_json::Value>, Error> {
    Ok(Full(s.my_uploads(&req.caller, &file_filter(req.body.query)).await?))
}

pub async fn preview(
    s: AppState,
    req: Ruma<authed::get_media_preview::v1::Request>,
) -> Result<Full<serde_json::Value>, Error> {
    Ok(Full(s.preview_url(&req.caller, &req.body.url).await?))
}

#[allow(deprecated)]
pub async fn legacy_preview(
    s: AppState,
    req: Ruma<ruma::api::client::media::get_media_preview::v3::Request>,
) -> Result<Full<serde_json::Value>, Error> {
    Ok(Full(s.preview_url(&req.caller, &req.body.url).await?))
}
