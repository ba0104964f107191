//! Rows of end-to-end encryption across servers: the log of local device
//! changes (stream IDs, `prev_id`, deletions), the cached device lists of
//! other servers' users (updates applied in order, stale otherwise), and
//! OpenID tokens.

mod common;
use common::Backend;

both!(
    local_device_changes_are_logged_with_stream_ids,
    remote_device_updates_apply_in_order_or_mark_the_list_stale,
    openid_tokens_expire
);

use std::sync::Arc;

use weft_store::{
    DeviceUpdateOutcome, KeyUpload, RemoteDevice, RemoteDeviceList, RemoteDeviceUpdate, Store, StreamKey,
};

fn keys(device: &str) -> KeyUpload {
    KeyUpload {
        device_keys: Some(format!("{{\"device_id\":\"{device}\",\"user_id\":\"@a:t\"}}")),
        one_time_keys: vec![],
        fallback_keys: vec![],
    }
}

async fn local_device_changes_are_logged_with_stream_ids(b: Backend) {
    let store = b.open();
    for d in ["D1", "D2"] {
        store.upsert_device("@a:t", d, None, d.as_bytes()).await.unwrap();
    }
    assert_eq!(store.device_list_stream_id("@a:t").await.unwrap(), 0);
    store.upload_keys("@a:t", "D1", keys("D1")).await.unwrap();
    let p1 = store.current_position();
    store.upload_keys("@a:t", "D2", keys("D2")).await.unwrap();
    let p2 = store.current_position();
    // The same keys again: no change, nothing logged.
    store.upload_keys("@a:t", "D2", keys("D2")).await.unwrap();
    assert_eq!(store.current_position(), p2);
    store
        .set_device_display_name("@a:t", "D1", Some("laptop"))
        .await
        .unwrap();
    let p3 = store.current_position();
    store.delete_devices_except("@a:t", None).await.unwrap();
    let p4 = store.current_position();

    let first = store.device_list_log("@a:t", p1).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(
        (first[0].device_id.as_str(), first[0].prev_id, first[0].deleted),
        ("D1", None, false)
    );
    let second = store.device_list_log("@a:t", p2).await.unwrap();
    assert_eq!(second[0].device_id, "D2");
    assert_eq!(second[0].prev_id, Some(first[0].stream_id));
    assert!(second[0].stream_id > first[0].stream_id);
    let renamed = store.device_list_log("@a:t", p3).await.unwrap();
    assert_eq!(renamed[0].device_id, "D1");
    assert_eq!(renamed[0].prev_id, Some(second[0].stream_id));
    // Both devices deleted at one position: two changes, each its own
    // stream ID, chained.
    let deleted = store.device_list_log("@a:t", p4).await.unwrap();
    let ids: Vec<(&str, bool)> = deleted.iter().map(|c| (c.device_id.as_str(), c.deleted)).collect();
    assert_eq!(ids, vec![("D1", true), ("D2", true)]);
    assert_eq!(deleted[0].prev_id, Some(renamed[0].stream_id));
    assert_eq!(deleted[1].prev_id, Some(deleted[0].stream_id));
    assert_eq!(store.device_list_stream_id("@a:t").await.unwrap(), deleted[1].stream_id);
    // Another user's log is their own.
    assert!(store.device_list_log("@b:t", p1).await.unwrap().is_empty());
}

fn update(device: &str, stream_id: i64, prev: &[i64], deleted: bool) -> RemoteDeviceUpdate {
    RemoteDeviceUpdate {
        user_id: "@r:remote".into(),
        device_id: device.into(),
        stream_id,
        prev_ids: prev.to_vec(),
        deleted,
        keys_json: (!deleted).then(|| format!("{{\"device_id\":\"{device}\"}}")),
        display_name: None,
    }
}

/// Whether the newest stream entries announce `@r:remote`'s device list.
fn announced(store: &Arc<dyn Store>, since: i64) -> bool {
    store
        .changes_since(since)
        .unwrap_or_default()
        .iter()
        .any(|(_, k)| *k == StreamKey::DeviceKeys("@r:remote".into()))
}

async fn remote_device_updates_apply_in_order_or_mark_the_list_stale(b: Backend) {
    let store = b.open();
    // Not cached: nothing stored, but announced.
    let before = store.current_position();
    assert_eq!(
        store
            .apply_remote_device_update(update("X", 5, &[4], false))
            .await
            .unwrap(),
        DeviceUpdateOutcome::NotCached
    );
    assert!(announced(&store, before));
    assert!(store.remote_device_list("@r:remote").await.unwrap().is_none());

    let list = RemoteDeviceList {
        user_id: "@r:remote".into(),
        stream_id: Some(10),
        stale: false,
        fetched_ms: 1,
        devices: vec![RemoteDevice {
            device_id: "A".into(),
            keys_json: Some("{\"device_id\":\"A\"}".into()),
            display_name: Some("phone".into()),
        }],
        cross_signing: vec![("master".into(), "{\"usage\":[\"master\"]}".into())],
    };
    let before = store.current_position();
    store.put_remote_device_list(list.clone(), false).await.unwrap();
    assert!(!announced(&store, before), "a first fetch is not a change");
    assert_eq!(store.remote_device_list("@r:remote").await.unwrap().unwrap(), list);

    // Follows 10: applied.
    let before = store.current_position();
    assert_eq!(
        store
            .apply_remote_device_update(update("B", 11, &[10], false))
            .await
            .unwrap(),
        DeviceUpdateOutcome::Applied
    );
    assert!(announced(&store, before));
    // A repeat: ignored, not announced.
    let before = store.current_position();
    assert_eq!(
        store
            .apply_remote_device_update(update("B", 11, &[10], false))
            .await
            .unwrap(),
        DeviceUpdateOutcome::Old
    );
    assert_eq!(store.current_position(), before);
    // A deletion following 11.
    assert_eq!(
        store
            .apply_remote_device_update(update("A", 12, &[11], true))
            .await
            .unwrap(),
        DeviceUpdateOutcome::Applied
    );
    let now = store.remote_device_list("@r:remote").await.unwrap().unwrap();
    assert_eq!(now.stream_id, Some(12));
    assert!(!now.stale);
    let devices: Vec<&str> = now.devices.iter().map(|d| d.device_id.as_str()).collect();
    assert_eq!(devices, vec!["B"]);

    // 13 was missed: 14 does not apply, the list is stale (and stays so).
    assert_eq!(
        store
            .apply_remote_device_update(update("C", 14, &[13], false))
            .await
            .unwrap(),
        DeviceUpdateOutcome::Stale
    );
    let stale = store.remote_device_list("@r:remote").await.unwrap().unwrap();
    assert!(stale.stale);
    assert_eq!(stale.devices.len(), 1, "a stale update was applied");
    assert_eq!(
        store
            .apply_remote_device_update(update("C", 15, &[14], false))
            .await
            .unwrap(),
        DeviceUpdateOutcome::Stale
    );
    // A resync replaces it all and makes it fresh.
    let mut fresh = list.clone();
    fresh.stream_id = Some(15);
    store.put_remote_device_list(fresh.clone(), true).await.unwrap();
    assert_eq!(store.remote_device_list("@r:remote").await.unwrap().unwrap(), fresh);

    // Cross-signing keys of a cached user are replaced; of others not kept.
    assert!(
        store
            .put_remote_cross_signing_keys("@r:remote", vec![("master".into(), "{\"new\":1}".into())])
            .await
            .unwrap()
    );
    let keys = store
        .remote_device_list("@r:remote")
        .await
        .unwrap()
        .unwrap()
        .cross_signing;
    assert_eq!(keys, vec![("master".to_owned(), "{\"new\":1}".to_owned())]);
    assert!(
        !store
            .put_remote_cross_signing_keys("@other:remote", vec![("master".into(), "{}".into())])
            .await
            .unwrap()
    );
    assert!(store.remote_device_list("@other:remote").await.unwrap().is_none());
}

async fn openid_tokens_expire(b: Backend) {
    let store = b.open();
    store.put_openid_token("tok", "@a:t", 2_000).await.unwrap();
    assert_eq!(
        store.openid_token_user("tok", 1_999).await.unwrap().as_deref(),
        Some("@a:t")
    );
    assert_eq!(store.openid_token_user("tok", 2_000).await.unwrap(), None);
    assert_eq!(store.openid_token_user("other", 1).await.unwrap(), None);
}
