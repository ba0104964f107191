//! The media repository's rows: items, pending uploads, usage, listing,
//! quarantine, deletion (answering the blobs no row names any more) and
//! thumbnails.

mod common;
use common::Backend;

both!(
    media_rows_round_trip_usage_and_listing,
    a_pending_item_is_completed_once_by_its_uploader_in_time,
    deleting_answers_only_blobs_no_row_names,
    the_blob_gate_is_shared_by_uploads_and_held_alone_by_a_deletion
);

use weft_store::{MediaContent, MediaQuery, MediaRecord, MediaUsage, ThumbnailRecord};

fn content(sha: &str, size: u64) -> MediaContent {
    MediaContent {
        sha256: sha.repeat(64 / sha.len()),
        size,
        content_type: Some("image/png".into()),
        filename: Some("a.png".into()),
    }
}

fn item(id: &str, who: &str, at: u64, c: Option<MediaContent>) -> MediaRecord {
    MediaRecord {
        media_id: id.into(),
        uploader: who.into(),
        created_ms: at,
        pending_until_ms: c.is_none().then_some(at + 1000),
        content: c,
        quarantined: false,
    }
}

async fn media_rows_round_trip_usage_and_listing(b: Backend) {
    let store = b.open();
    store
        .create_media(item("A", "@a:t", 10, Some(content("a", 100))))
        .await
        .unwrap();
    store
        .create_media(item("B", "@a:t", 20, Some(content("a", 100))))
        .await
        .unwrap();
    store
        .create_media(item("C", "@b:t", 30, Some(content("c", 7))))
        .await
        .unwrap();
    store.create_media(item("P", "@a:t", 40, None)).await.unwrap();
    let a = store.media("A").await.unwrap().unwrap();
    assert_eq!(a, item("A", "@a:t", 10, Some(content("a", 100))));
    assert!(store.media("nope").await.unwrap().is_none());

    assert_eq!(
        store.media_usage("@a:t", 500).await.unwrap(),
        MediaUsage {
            items: 2,
            bytes: 200,
            pending: 1
        }
    );
    // An expired pending item no longer counts.
    assert_eq!(store.media_usage("@a:t", 5000).await.unwrap().pending, 0);

    let ids = |v: Vec<MediaRecord>| v.into_iter().map(|m| m.media_id).collect::<Vec<_>>();
    let all = store
        .list_media(MediaQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ids(all), ["P", "C", "B", "A"]);
    let mine = MediaQuery {
        uploader: Some("@a:t".into()),
        before_ms: Some(40),
        limit: 10,
    };
    assert_eq!(ids(store.list_media(mine).await.unwrap()), ["B", "A"]);
}

async fn a_pending_item_is_completed_once_by_its_uploader_in_time(b: Backend) {
    let store = b.open();
    store.create_media(item("P", "@a:t", 10, None)).await.unwrap();
    // Someone else, or too late: refused.
    assert!(!store.complete_media("P", "@b:t", content("d", 3), 20).await.unwrap());
    assert!(!store.complete_media("P", "@a:t", content("d", 3), 2000).await.unwrap());
    assert!(store.complete_media("P", "@a:t", content("d", 3), 20).await.unwrap());
    // Not twice.
    assert!(!store.complete_media("P", "@a:t", content("e", 3), 20).await.unwrap());
    let p = store.media("P").await.unwrap().unwrap();
    assert_eq!((p.content, p.pending_until_ms), (Some(content("d", 3)), None));
}

async fn deleting_answers_only_blobs_no_row_names(b: Backend) {
    let store = b.open();
    store
        .create_media(item("A", "@a:t", 10, Some(content("a", 1))))
        .await
        .unwrap();
    store
        .create_media(item("B", "@a:t", 20, Some(content("a", 1))))
        .await
        .unwrap();
    let thumb = ThumbnailRecord {
        media_id: "A".into(),
        width: 32,
        height: 32,
        method: "crop".into(),
        sha256: "f".repeat(64),
        size: 9,
        content_type: "image/png".into(),
    };
    store.put_thumbnail(thumb.clone()).await.unwrap();
    assert_eq!(store.thumbnail("A", 32, 32, "crop").await.unwrap(), Some(thumb));
    assert!(store.thumbnail("A", 32, 32, "scale").await.unwrap().is_none());
    assert!(store.set_quarantined("A", true).await.unwrap());
    assert!(store.media("A").await.unwrap().unwrap().quarantined);
    // A's blob is still B's; its thumbnail's blob is no one's.
    assert_eq!(store.delete_media(vec!["A".into()]).await.unwrap(), ["f".repeat(64)]);
    assert!(store.media("A").await.unwrap().is_none());
    assert!(store.thumbnail("A", 32, 32, "crop").await.unwrap().is_none());
    assert_eq!(store.delete_media(vec!["B".into()]).await.unwrap(), ["a".repeat(64)]);
}

/// `blob_gate`: uploads share it, a deletion waits for them and holds it
/// alone (new uploads wait for it), for every process on the database:
/// on PostgreSQL the deletion is a second store, as another process.
async fn the_blob_gate_is_shared_by_uploads_and_held_alone_by_a_deletion(b: Backend) {
    use std::time::Duration;
    let store = b.open();
    let other = match &b {
        Backend::Sqlite(_) => store.clone(),
        Backend::Postgres(_) => b.open(),
    };
    // The process leads (on PostgreSQL: holds the leader's advisory lock,
    // which the gate's must not be).
    let mut lead = store.leadership();
    tokio::time::timeout(Duration::from_secs(15), lead.wait_for(|l| *l))
        .await
        .expect("the store leads")
        .unwrap();
    let up1 = tokio::time::timeout(Duration::from_secs(5), store.blob_gate(false))
        .await
        .expect("the gate is free")
        .unwrap();
    let up2 = other.blob_gate(false).await.unwrap();
    let o = other.clone();
    let mut deletion = tokio::spawn(async move { o.blob_gate(true).await.unwrap() });
    let waited = tokio::time::timeout(Duration::from_millis(500), &mut deletion).await;
    assert!(waited.is_err(), "a deletion waits for the uploads");
    drop(up1);
    let waited = tokio::time::timeout(Duration::from_millis(500), &mut deletion).await;
    assert!(waited.is_err(), "a deletion waits for every upload");
    drop(up2);
    let held = tokio::time::timeout(Duration::from_secs(10), deletion)
        .await
        .expect("the deletion gets the gate once the uploads are done")
        .unwrap();
    let s = store.clone();
    let mut upload = tokio::spawn(async move { s.blob_gate(false).await.unwrap() });
    let waited = tokio::time::timeout(Duration::from_millis(500), &mut upload).await;
    assert!(waited.is_err(), "an upload waits for the deletion");
    drop(held);
    let _up = tokio::time::timeout(Duration::from_secs(10), upload)
        .await
        .expect("the upload gets the gate after the deletion")
        .unwrap();
}
