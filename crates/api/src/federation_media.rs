//! The federation media endpoints (authenticated media, spec v1.11):
//! local media for other servers, as `multipart/mixed` (ruma's types
//! encode it). Declared in `federation_routes`.

use ruma::api::federation::authenticated_media::{
    Content, ContentMetadata, FileOrLocation, get_content, get_content_thumbnail,
};
use ruma::http_headers::{ContentDisposition, ContentDispositionType};
use weft_core::Error;
use weft_services::media::FederationMedia;

use crate::AppState;
use crate::endpoint::Ruma;

fn content(m: FederationMedia) -> (ContentMetadata, FileOrLocation) {
    let disposition = ContentDisposition::new(ContentDispositionType::Attachment).with_filename(m.filename);
    (
        ContentMetadata::new(),
        FileOrLocation::File(Content::new(m.bytes, m.content_type, disposition)),
    )
}

/// `GET /_matrix/federation/v1/media/download/{mediaId}`.
pub async fn download(s: AppState, req: Ruma<get_content::v1::Request>) -> Result<get_content::v1::Response, Error> {
    let (metadata, file) = content(s.federation_media(&req.body.media_id).await?);
    Ok(get_content::v1::Response::new(metadata, file))
}

/// `GET /_matrix/federation/v1/media/thumbnail/{mediaId}`.
pub async fn thumbnail(
    s: AppState,
    req: Ruma<get_content_thumbnail::v1::Request>,
) -> Result<get_content_thumbnail::v1::Response, Error> {
    let b = &req.body;
    let spec = crate::media::spec(b.width, b.height, b.method.as_ref())?;
    let (metadata, file) = content(s.federation_thumbnail(&b.media_id, spec).await?);
    Ok(get_content_thumbnail::v1::Response::new(metadata, file))
}
