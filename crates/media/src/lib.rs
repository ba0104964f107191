//! The bytes of the media repository: where uploads are kept
//! ([`BlobStore`], content-addressed, with the data directory's
//! [`FsBlobStore`] as the embedded default) and how thumbnails are made
//! ([`thumbnail`]). Which media ID names which blob, who uploaded it and
//! its tags are rows of the store, kept by the services; this crate knows
//! only bytes.

mod blob;
mod fs;
mod s3;
pub mod thumbnail;

pub use blob::{Blob, BlobRead, BlobStore, PutError};
pub use fs::FsBlobStore;
pub use s3::{S3BlobStore, S3Config};
