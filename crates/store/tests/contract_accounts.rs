//! The accounts part of the storage contract, on both backends: users and
//! profiles, devices and tokens, key backup, filters, one-time keys and
//! claims of several devices at once, to-device messages to several users,
//! key signatures (and which survive deleted devices), and cached remote
//! device lists.

mod common;
use common::Backend;

both!(
    users_profiles_passwords_and_deactivation,
    devices_tokens_last_seen_and_purges,
    key_backup_versions_keys_and_etags,
    filters_are_numbered_per_user,
    one_time_keys_in_one_upload_and_claims_of_several_devices,
    to_device_messages_to_several_users_and_devices,
    signatures_of_cross_signing_keys_outlive_deleted_devices,
    remote_device_lists_replaced_whole_and_marked_stale,
    uia_sessions_seen_by_a_second_store_expire_and_finish,
    rate_buckets_are_shared_by_stores_refunded_and_pruned_when_full
);

use std::sync::Arc;

use weft_store::{
    BackupKey, BackupWrite, DeviceTarget, DeviceUpdateOutcome, KeySignature, KeyUpload, NewToDevice, NewUser,
    ProfileField, RemoteDevice, RemoteDeviceList, RemoteDeviceUpdate, Store, StreamKey,
};

async fn user(store: &Arc<dyn Store>, id: &str, admin: bool) {
    store
        .create_user(NewUser {
            user_id: id.into(),
            password_hash: Some(format!("hash-{id}")),
            admin,
            created_ms: 42,
        })
        .await
        .unwrap();
}

async fn users_profiles_passwords_and_deactivation(b: Backend) {
    let store = b.open();
    for (u, admin) in [("@c:t", false), ("@a:t", true), ("@b:t", false)] {
        user(&store, u, admin).await;
    }
    let again = store
        .create_user(NewUser {
            user_id: "@a:t".into(),
            password_hash: None,
            admin: false,
            created_ms: 1,
        })
        .await;
    assert_eq!(again.unwrap_err().errcode(), "M_USER_IN_USE");
    let all = store.list_users().await.unwrap();
    let ids: Vec<&str> = all.iter().map(|u| u.user_id.as_str()).collect();
    assert_eq!(ids, ["@a:t", "@b:t", "@c:t"]);
    assert!(all[0].admin && !all[1].admin);
    assert_eq!(all[0].created_ms, 42);
    assert_eq!(
        all[0].password_hash.as_deref(),
        Some("hash-@a:t"),
        "the first one stays"
    );

    store.set_password_hash("@b:t", "new").await.unwrap();
    store
        .set_profile_field("@b:t", ProfileField::DisplayName, Some("Bee".into()))
        .await
        .unwrap();
    store
        .set_profile_field("@b:t", ProfileField::AvatarUrl, Some("mxc://t/b".into()))
        .await
        .unwrap();
    let bee = store.get_user("@b:t").await.unwrap().unwrap();
    assert_eq!(bee.password_hash.as_deref(), Some("new"));
    assert_eq!(bee.displayname.as_deref(), Some("Bee"));
    assert_eq!(bee.avatar_url.as_deref(), Some("mxc://t/b"));
    store
        .set_profile_field("@b:t", ProfileField::DisplayName, None)
        .await
        .unwrap();
    let bee = store.get_user("@b:t").await.unwrap().unwrap();
    assert_eq!(bee.displayname, None);
    assert_eq!(bee.avatar_url.as_deref(), Some("mxc://t/b"));
    // Another user's profile is untouched.
    assert_eq!(store.get_user("@c:t").await.unwrap().unwrap().displayname, None);

    // Deactivation: flagged, no password, still listed; devices gone.
    store.upsert_device("@b:t", "D", None, b"tok-b").await.unwrap();
    store.deactivate_user("@b:t").await.unwrap();
    let bee = store.get_user("@b:t").await.unwrap().unwrap();
    assert!(bee.deactivated);
    assert_eq!(bee.password_hash, None);
    assert_eq!(store.list_users().await.unwrap().len(), 3);
    assert!(store.lookup_token(b"tok-b").await.unwrap().is_none());
    assert!(store.list_devices("@b:t").await.unwrap().is_empty());
    assert!(!store.get_user("@c:t").await.unwrap().unwrap().deactivated);
    assert!(store.get_user("@nobody:t").await.unwrap().is_none());
}

async fn devices_tokens_last_seen_and_purges(b: Backend) {
    let store = b.open();
    let replaced = store
        .upsert_device("@a:t", "PHONE", Some("phone"), b"t1")
        .await
        .unwrap();
    assert!(!replaced, "a new device replaces no token");
    store
        .upsert_device("@a:t", "KEEP", Some("laptop"), b"t2")
        .await
        .unwrap();
    store.upsert_device("@a:t", "OLD", None, b"t3").await.unwrap();
    store.upsert_device("@b:t", "PHONE", None, b"t4").await.unwrap();
    let owner = store.lookup_token(b"t1").await.unwrap().unwrap();
    assert_eq!((owner.user_id.as_str(), owner.device_id.as_str()), ("@a:t", "PHONE"));
    // A new login on the device: new token, name kept when none is given;
    // the old token's end is announced on the stream to every process.
    let head = store.current_position();
    assert!(store.upsert_device("@a:t", "PHONE", None, b"t1b").await.unwrap());
    let changes = store.changes_since(head).unwrap_or_default();
    assert!(
        changes
            .iter()
            .any(|(_, k)| *k == weft_store::StreamKey::Revoked("@a:t".into())),
        "no revocation announced: {changes:?}"
    );
    assert!(store.lookup_token(b"t1").await.unwrap().is_none());
    assert_eq!(store.lookup_token(b"t1b").await.unwrap().unwrap().device_id, "PHONE");

    store
        .touch_device("@a:t", "PHONE", Some("192.0.2.1"), 1_000)
        .await
        .unwrap();
    store.touch_device("@a:t", "PHONE", None, 2_000).await.unwrap();
    store
        .touch_device("@a:t", "NOPE", Some("192.0.2.9"), 3_000)
        .await
        .unwrap();
    let devices = store.list_devices("@a:t").await.unwrap();
    let ids: Vec<&str> = devices.iter().map(|d| d.device_id.as_str()).collect();
    assert_eq!(ids, ["KEEP", "OLD", "PHONE"]);
    let phone = &devices[2];
    assert_eq!(phone.display_name.as_deref(), Some("phone"));
    assert_eq!(phone.last_seen_ms, Some(2_000));
    assert_eq!(phone.last_seen_ip.as_deref(), Some("192.0.2.1"), "kept when none given");
    assert_eq!(devices[1].last_seen_ip, None);

    // A message pending for OLD, and a to-device transaction OLD sent.
    let msg = |target: DeviceTarget| {
        vec![NewToDevice {
            user_id: "@a:t".into(),
            target,
            content_json: "{}".into(),
        }]
    };
    assert!(
        store
            .send_to_device("@a:t", "OLD", "m.x", "txn", msg(DeviceTarget::One("OLD".into())))
            .await
            .unwrap()
    );
    let p = store.current_position();
    assert_eq!(
        store.to_device_messages("@a:t", "OLD", 0, p, 10).await.unwrap().len(),
        1
    );

    // All but KEEP go, with their tokens, messages and transactions.
    store.delete_devices_except("@a:t", Some("KEEP")).await.unwrap();
    let ids: Vec<String> = store
        .list_devices("@a:t")
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.device_id)
        .collect();
    assert_eq!(ids, ["KEEP"]);
    assert!(store.lookup_token(b"t1b").await.unwrap().is_none());
    assert!(store.lookup_token(b"t3").await.unwrap().is_none());
    assert_eq!(store.lookup_token(b"t2").await.unwrap().unwrap().device_id, "KEEP");
    assert_eq!(store.lookup_token(b"t4").await.unwrap().unwrap().user_id, "@b:t");
    assert!(
        store
            .to_device_messages("@a:t", "OLD", 0, p, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // A device of the same ID later is a new device: its transaction is new.
    store.upsert_device("@a:t", "OLD", None, b"t5").await.unwrap();
    assert!(
        store
            .send_to_device("@a:t", "OLD", "m.x", "txn", msg(DeviceTarget::All))
            .await
            .unwrap()
    );
    // No keys were deleted: no device-list change.
    assert!(
        store
            .device_list_changes("@a:t", 0, store.current_position())
            .await
            .unwrap()
            .is_empty()
    );
}

fn backup_key(room: &str, session: &str, index: i64, forwards: i64, verified: bool) -> BackupKey {
    BackupKey {
        room_id: room.into(),
        session_id: session.into(),
        first_message_index: index,
        forwarded_count: forwards,
        is_verified: verified,
        key_json: format!(r#"{{"i":{index},"f":{forwards},"v":{verified}}}"#),
    }
}

fn summary(keys: &[BackupKey]) -> Vec<(String, String, i64, i64, bool)> {
    keys.iter()
        .map(|k| {
            (
                k.room_id.clone(),
                k.session_id.clone(),
                k.first_message_index,
                k.forwarded_count,
                k.is_verified,
            )
        })
        .collect()
}

async fn key_backup_versions_keys_and_etags(b: Backend) {
    let store = b.open();
    let u = "@a:t";
    user(&store, u, false).await;
    assert!(store.backup_version(u, None).await.unwrap().is_none());
    assert_eq!(
        store
            .put_backup_keys(u, 1, vec![backup_key("!r", "s", 0, 0, false)])
            .await
            .unwrap(),
        BackupWrite::WrongVersion { current: None }
    );
    assert_eq!(
        store.create_backup_version(u, r#"{"algorithm":"one"}"#).await.unwrap(),
        1
    );
    assert_eq!(
        store.create_backup_version(u, r#"{"algorithm":"two"}"#).await.unwrap(),
        2
    );
    assert_eq!(store.create_backup_version("@b:t", "{}").await.unwrap(), 1, "per user");
    let current = store.backup_version(u, None).await.unwrap().unwrap();
    assert_eq!(
        (
            current.version,
            current.algorithm_json.as_str(),
            current.etag,
            current.count
        ),
        (2, r#"{"algorithm":"two"}"#, 0, 0)
    );
    assert_eq!(store.backup_version(u, Some(1)).await.unwrap().unwrap().version, 1);
    assert!(store.backup_version(u, Some(7)).await.unwrap().is_none());
    assert_eq!(
        store
            .put_backup_keys(u, 1, vec![backup_key("!r", "s", 0, 0, false)])
            .await
            .unwrap(),
        BackupWrite::WrongVersion { current: Some(2) }
    );

    // One upload; a session twice in it keeps its better copy.
    let written = store
        .put_backup_keys(
            u,
            2,
            vec![
                backup_key("!r", "s1", 5, 1, false),
                backup_key("!r", "s2", 0, 0, false),
                backup_key("!r", "s1", 3, 2, false),
                backup_key("!a", "s3", 0, 0, true),
                backup_key("!r", "s1", 3, 4, false),
            ],
        )
        .await
        .unwrap();
    assert_eq!(written, BackupWrite::Done { etag: 1, count: 3 });
    let all = store.backup_keys(u, 2, None, None).await.unwrap();
    assert_eq!(
        summary(&all),
        vec![
            ("!a".into(), "s3".into(), 0, 0, true),
            ("!r".into(), "s1".into(), 3, 2, false),
            ("!r".into(), "s2".into(), 0, 0, false),
        ]
    );
    assert_eq!(all[1].key_json, r#"{"i":3,"f":2,"v":false}"#);
    // A worse copy changes nothing (same etag); a verified one replaces.
    assert_eq!(
        store
            .put_backup_keys(u, 2, vec![backup_key("!r", "s1", 9, 0, false)])
            .await
            .unwrap(),
        BackupWrite::Done { etag: 1, count: 3 }
    );
    assert_eq!(
        store
            .put_backup_keys(u, 2, vec![backup_key("!r", "s1", 9, 0, true)])
            .await
            .unwrap(),
        BackupWrite::Done { etag: 2, count: 3 }
    );
    assert_eq!(
        summary(&store.backup_keys(u, 2, Some("!r"), Some("s1")).await.unwrap()),
        vec![("!r".into(), "s1".into(), 9, 0, true)]
    );
    assert_eq!(store.backup_keys(u, 2, Some("!r"), None).await.unwrap().len(), 2);
    assert!(store.backup_keys(u, 1, None, None).await.unwrap().is_empty());

    // Deleting keys: by session, then nothing (same etag).
    assert_eq!(
        store.delete_backup_keys(u, 2, Some("!r"), Some("s2")).await.unwrap(),
        BackupWrite::Done { etag: 3, count: 2 }
    );
    assert_eq!(
        store.delete_backup_keys(u, 2, Some("!x"), None).await.unwrap(),
        BackupWrite::Done { etag: 3, count: 2 }
    );
    assert_eq!(
        store.delete_backup_keys(u, 1, None, None).await.unwrap(),
        BackupWrite::WrongVersion { current: Some(2) }
    );
    let v2 = store.backup_version(u, Some(2)).await.unwrap().unwrap();
    assert_eq!((v2.etag, v2.count), (3, 2));

    assert!(
        store
            .update_backup_version(u, 2, r#"{"algorithm":"new"}"#)
            .await
            .unwrap()
    );
    assert!(!store.update_backup_version(u, 9, "{}").await.unwrap());
    assert_eq!(
        store.backup_version(u, None).await.unwrap().unwrap().algorithm_json,
        r#"{"algorithm":"new"}"#
    );
    // Deleting the current version: the one before is current again; its
    // number is never given out again.
    assert!(store.delete_backup_version(u, 2).await.unwrap());
    assert!(!store.delete_backup_version(u, 2).await.unwrap());
    assert!(!store.update_backup_version(u, 2, "{}").await.unwrap());
    assert_eq!(store.backup_version(u, None).await.unwrap().unwrap().version, 1);
    assert!(store.backup_keys(u, 2, None, None).await.unwrap().is_empty());
    assert_eq!(store.create_backup_version(u, "{}").await.unwrap(), 3);
    store
        .put_backup_keys(u, 3, vec![backup_key("!r", "s", 0, 0, false)])
        .await
        .unwrap();
    // Deactivation deletes every version and key.
    store.deactivate_user(u).await.unwrap();
    assert!(store.backup_version(u, None).await.unwrap().is_none());
    assert!(store.backup_keys(u, 3, None, None).await.unwrap().is_empty());
    assert_eq!(store.backup_version("@b:t", None).await.unwrap().unwrap().version, 1);
}

async fn filters_are_numbered_per_user(b: Backend) {
    let store = b.open();
    assert_eq!(store.put_filter("@a:t", r#"{"a":0}"#).await.unwrap(), "0");
    assert_eq!(store.put_filter("@a:t", r#"{"a":1}"#).await.unwrap(), "1");
    assert_eq!(store.put_filter("@b:t", r#"{"b":0}"#).await.unwrap(), "0");
    assert_eq!(
        store.get_filter("@a:t", "1").await.unwrap().as_deref(),
        Some(r#"{"a":1}"#)
    );
    assert_eq!(
        store.get_filter("@b:t", "0").await.unwrap().as_deref(),
        Some(r#"{"b":0}"#)
    );
    assert_eq!(store.get_filter("@b:t", "1").await.unwrap(), None);
    assert_eq!(store.get_filter("@a:t", "x").await.unwrap(), None);
    assert_eq!(store.get_filter("@a:t", "99").await.unwrap(), None);
}

const ALG: &str = "signed_curve25519";

fn otk(id: &str, content: &str) -> (String, String) {
    (format!("{ALG}:{id}"), format!(r#"{{"key":"{content}"}}"#))
}

async fn one_time_keys_in_one_upload_and_claims_of_several_devices(b: Backend) {
    let store = b.open();
    for d in ["D1", "D2"] {
        store.upsert_device("@a:t", d, None, d.as_bytes()).await.unwrap();
    }
    // An ID twice with the same content is one key.
    let counts = store
        .upload_keys(
            "@a:t",
            "D1",
            KeyUpload {
                one_time_keys: vec![otk("C", "c"), otk("A", "a"), otk("B", "b"), otk("A", "a")],
                fallback_keys: vec![otk("F1", "f1")],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(counts.get(ALG), Some(&3));
    // An ID twice in one upload with other content refuses all of it.
    let clash = store
        .upload_keys(
            "@a:t",
            "D1",
            KeyUpload {
                one_time_keys: vec![otk("D", "d"), otk("E", "e"), otk("D", "other")],
                ..Default::default()
            },
        )
        .await;
    assert_eq!(clash.unwrap_err().errcode(), "M_INVALID_PARAM");
    let counts = store
        .upload_keys(
            "@a:t",
            "D2",
            KeyUpload {
                one_time_keys: vec![("other_alg:X".into(), "{}".into())],
                fallback_keys: vec![otk("F2", "f2")],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(counts.into_iter().collect::<Vec<_>>(), [("other_alg".to_owned(), 1)]);
    assert_eq!(
        store.one_time_key_counts("@a:t", "D1").await.unwrap().get(ALG),
        Some(&3),
        "nothing of the refused upload"
    );
    assert!(store.claim_keys(vec![]).await.unwrap().is_empty());

    // One claim for several devices, D1 several times: its one-time keys
    // by ID, then its fallback key; D2 has only a fallback key (given
    // every time); unknown devices and algorithms get nothing.
    let w = |d: &str, alg: &str| ("@a:t".to_owned(), d.to_owned(), alg.to_owned());
    let claimed = store
        .claim_keys(vec![
            w("D1", ALG),
            w("D2", ALG),
            w("D1", ALG),
            w("D9", ALG),
            w("D1", "unknown_alg"),
            w("D1", ALG),
            w("D1", ALG),
            w("D2", ALG),
        ])
        .await
        .unwrap();
    let got: Vec<(String, String, String)> = claimed
        .into_iter()
        .map(|c| (c.device_id, c.key_id, c.key_json))
        .collect();
    let want = |d: &str, id: &str, content: &str| {
        let (key_id, json) = otk(id, content);
        (d.to_owned(), key_id, json)
    };
    assert_eq!(
        got,
        vec![
            want("D1", "A", "a"),
            want("D2", "F2", "f2"),
            want("D1", "B", "b"),
            want("D1", "C", "c"),
            want("D1", "F1", "f1"),
            want("D2", "F2", "f2"),
        ]
    );
    assert!(store.one_time_key_counts("@a:t", "D1").await.unwrap().is_empty());
    assert_eq!(
        store.one_time_key_counts("@a:t", "D2").await.unwrap().get("other_alg"),
        Some(&1)
    );
    for d in ["D1", "D2"] {
        assert!(store.unused_fallback_key_types("@a:t", d).await.unwrap().is_empty());
    }
    // The same fallback key again stays used; another one is unused.
    store
        .upload_keys(
            "@a:t",
            "D1",
            KeyUpload {
                fallback_keys: vec![otk("F1", "f1")],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(store.unused_fallback_key_types("@a:t", "D1").await.unwrap().is_empty());
    store
        .upload_keys(
            "@a:t",
            "D1",
            KeyUpload {
                fallback_keys: vec![otk("F3", "f3")],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(store.unused_fallback_key_types("@a:t", "D1").await.unwrap(), [ALG]);
    let next = store.claim_keys(vec![w("D1", ALG)]).await.unwrap();
    assert_eq!(next[0].key_id, format!("{ALG}:F3"));
}

async fn to_device_messages_to_several_users_and_devices(b: Backend) {
    let store = b.open();
    for (u, d) in [
        ("@b:t", "D3"),
        ("@b:t", "D1"),
        ("@b:t", "D2"),
        ("@c:t", "C1"),
        ("@c:t", "C2"),
    ] {
        store
            .upsert_device(u, d, None, format!("{u}{d}").as_bytes())
            .await
            .unwrap();
    }
    let start = store.current_position();
    let m = |u: &str, target: DeviceTarget, n: u32| NewToDevice {
        user_id: u.into(),
        target,
        content_json: format!(r#"{{"n":{n}}}"#),
    };
    assert!(
        store
            .send_to_device(
                "@a:t",
                "A",
                "m.x",
                "t1",
                vec![
                    m("@b:t", DeviceTarget::All, 1),
                    m("@c:t", DeviceTarget::One("C2".into()), 2),
                    m("@nobody:t", DeviceTarget::All, 3),
                    m("@b:t", DeviceTarget::One("D2".into()), 4),
                ],
            )
            .await
            .unwrap()
    );
    // Message by message, each user's devices by ID, one position each.
    let p = store.current_position();
    assert_eq!(p, start + 5);
    let user = |u: &str| StreamKey::User(u.into());
    assert_eq!(
        store.changes_since(start).unwrap(),
        vec![
            (start + 1, user("@b:t")),
            (start + 2, user("@b:t")),
            (start + 3, user("@b:t")),
            (start + 4, user("@c:t")),
            (start + 5, user("@b:t")),
        ]
    );
    let read = |msgs: Vec<weft_store::ToDeviceMessage>| -> Vec<(i64, String)> {
        msgs.into_iter().map(|m| (m.position, m.content_json)).collect()
    };
    assert_eq!(
        read(store.to_device_messages("@b:t", "D2", 0, p, 10).await.unwrap()),
        vec![
            (start + 2, r#"{"n":1}"#.to_owned()),
            (start + 5, r#"{"n":4}"#.to_owned())
        ]
    );
    assert_eq!(
        read(store.to_device_messages("@b:t", "D3", 0, p, 10).await.unwrap()),
        vec![(start + 3, r#"{"n":1}"#.to_owned())]
    );
    assert_eq!(
        read(store.to_device_messages("@c:t", "C2", 0, p, 10).await.unwrap()),
        vec![(start + 4, r#"{"n":2}"#.to_owned())]
    );
    assert!(
        store
            .to_device_messages("@c:t", "C1", 0, p, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // Limit and upper bound.
    assert_eq!(
        read(store.to_device_messages("@b:t", "D2", 0, p, 1).await.unwrap()),
        vec![(start + 2, r#"{"n":1}"#.to_owned())]
    );
    assert_eq!(
        store
            .to_device_messages("@b:t", "D2", 0, start + 4, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    let one = store.to_device_messages("@b:t", "D1", 0, p, usize::MAX).await.unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!((one[0].sender.as_str(), one[0].event_type.as_str()), ("@a:t", "m.x"));

    // Acknowledging part of a device's messages leaves the rest.
    store.ack_to_device("@b:t", "D2", start + 2).await.unwrap();
    assert_eq!(
        read(store.to_device_messages("@b:t", "D2", 0, p, 10).await.unwrap()),
        vec![(start + 5, r#"{"n":4}"#.to_owned())]
    );
    assert_eq!(store.to_device_messages("@b:t", "D1", 0, p, 10).await.unwrap().len(), 1);
    store.ack_to_device("@b:t", "D2", start + 2).await.unwrap();
    assert_eq!(store.current_position(), p, "acknowledging takes no position");
    // Another transaction ID is a new send.
    assert!(
        store
            .send_to_device("@a:t", "A", "m.x", "t2", vec![m("@c:t", DeviceTarget::All, 5)])
            .await
            .unwrap()
    );
    assert_eq!(store.current_position(), p + 2);
}

async fn signatures_of_cross_signing_keys_outlive_deleted_devices(b: Backend) {
    let store = b.open();
    let a = "@a:t";
    for d in ["D1", "D2"] {
        store.upsert_device(a, d, None, d.as_bytes()).await.unwrap();
    }
    store
        .upload_keys(
            a,
            "D1",
            KeyUpload {
                device_keys: Some(r#"{"device_id":"D1"}"#.into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // A master key whose public key is "PUB"; a key without "keys".
    store
        .put_cross_signing_keys(
            a,
            vec![
                (
                    "master".into(),
                    r#"{"keys":{"ed25519:PUB":"PUB"},"usage":["master"]}"#.into(),
                ),
                ("self_signing".into(), r#"{"usage":["self_signing"]}"#.into()),
            ],
        )
        .await
        .unwrap();
    let sig = |tu: &str, tk: &str, su: &str, sk: &str, s: &str| KeySignature {
        target_user: tu.into(),
        target_key: tk.into(),
        signer_user: su.into(),
        signer_key: sk.into(),
        signature: s.into(),
    };
    let start = store.current_position();
    store
        .add_key_signatures(vec![
            sig(a, "D1", a, "ed25519:SELF", "s1"),
            sig(a, "PUB", "@b:t", "ed25519:BMASTER", "s2"),
            sig("@c:t", "C1", "@c:t", "ed25519:CSELF", "s4"),
            sig(a, "D2", a, "ed25519:SELF", "s3"),
            sig(a, "D1", a, "ed25519:SELF", "s1-again"),
        ])
        .await
        .unwrap();
    // One device-list change per target user, users in order.
    assert_eq!(store.current_position(), start + 2);
    assert_eq!(
        store.changes_since(start).unwrap(),
        vec![
            (start + 1, StreamKey::DeviceKeys(a.into())),
            (start + 2, StreamKey::DeviceKeys("@c:t".into())),
        ]
    );
    // Only signed devices with keys are logged as changed devices.
    let logged: Vec<(String, bool)> = store
        .device_list_log(a, start + 1)
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.device_id, c.deleted))
        .collect();
    assert_eq!(logged, [("D1".to_owned(), false)]);
    assert!(store.device_list_log("@c:t", start + 2).await.unwrap().is_empty());
    let sigs = store.key_signatures(a).await.unwrap();
    assert_eq!(
        sigs,
        vec![
            sig(a, "D1", a, "ed25519:SELF", "s1-again"),
            sig(a, "D2", a, "ed25519:SELF", "s3"),
            sig(a, "PUB", "@b:t", "ed25519:BMASTER", "s2"),
        ]
    );

    // Deleting every device deletes the signatures of devices, not those
    // of the master key; one change, logging the device that had keys
    // (and one position telling every process of the revocation).
    store.delete_devices_except(a, None).await.unwrap();
    assert_eq!(
        store.key_signatures(a).await.unwrap(),
        vec![sig(a, "PUB", "@b:t", "ed25519:BMASTER", "s2")]
    );
    let p = store.current_position();
    assert_eq!(p, start + 4);
    assert!(
        store
            .changes_since(start + 2)
            .unwrap_or_default()
            .contains(&(start + 3, StreamKey::Revoked(a.to_owned()))),
        "the revocation is on the stream"
    );
    let logged: Vec<(String, bool)> = store
        .device_list_log(a, p)
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.device_id, c.deleted))
        .collect();
    assert_eq!(logged, [("D1".to_owned(), true)]);
    assert_eq!(store.key_signatures("@c:t").await.unwrap().len(), 1);
}

async fn remote_device_lists_replaced_whole_and_marked_stale(b: Backend) {
    let store = b.open();
    let r = "@r:remote";
    let dev = |id: &str, keys: Option<&str>, name: Option<&str>| RemoteDevice {
        device_id: id.into(),
        keys_json: keys.map(str::to_owned),
        display_name: name.map(str::to_owned),
    };
    let list = RemoteDeviceList {
        user_id: r.into(),
        stream_id: None,
        stale: false,
        fetched_ms: 1_700_000_000_000,
        devices: vec![
            dev("A", Some(r#"{"device_id":"A"}"#), Some("phone")),
            dev("B", None, None),
            dev("C", Some(r#"{"device_id":"C"}"#), None),
        ],
        cross_signing: vec![
            ("master".into(), r#"{"m":1}"#.into()),
            ("self_signing".into(), r#"{"s":1}"#.into()),
        ],
    };
    let before = store.current_position();
    store.put_remote_device_list(list.clone(), true).await.unwrap();
    assert_eq!(
        store.changes_since(before).unwrap(),
        vec![(before + 1, StreamKey::DeviceKeys(r.into()))]
    );
    assert_eq!(store.remote_device_list(r).await.unwrap().unwrap(), list);
    // Unknown stream ID: an update cannot follow it.
    let up = RemoteDeviceUpdate {
        user_id: r.into(),
        device_id: "D".into(),
        stream_id: 3,
        prev_ids: vec![2],
        deleted: false,
        keys_json: None,
        display_name: None,
    };
    assert_eq!(
        store.apply_remote_device_update(up.clone()).await.unwrap(),
        DeviceUpdateOutcome::Stale
    );
    // A fetched list replaces the old one whole and is fresh.
    let mut shorter = list.clone();
    shorter.stream_id = Some(2);
    shorter.devices = vec![dev("B", Some(r#"{"device_id":"B"}"#), Some("new"))];
    shorter.cross_signing = vec![("master".into(), r#"{"m":2}"#.into())];
    let before = store.current_position();
    store.put_remote_device_list(shorter.clone(), false).await.unwrap();
    assert_eq!(store.current_position(), before, "not announced");
    assert_eq!(store.remote_device_list(r).await.unwrap().unwrap(), shorter);
    // An update without keys keeps the stored keys and sets the name.
    let mut rename = up.clone();
    rename.device_id = "B".into();
    rename.display_name = Some("renamed".into());
    assert_eq!(
        store.apply_remote_device_update(rename).await.unwrap(),
        DeviceUpdateOutcome::Applied
    );
    let now = store.remote_device_list(r).await.unwrap().unwrap();
    assert_eq!(now.stream_id, Some(3));
    assert_eq!(
        now.devices,
        vec![dev("B", Some(r#"{"device_id":"B"}"#), Some("renamed"))]
    );

    // Marked stale: updates no longer apply until a fetch.
    store.mark_remote_device_list_stale(r).await.unwrap();
    assert!(store.remote_device_list(r).await.unwrap().unwrap().stale);
    let mut next = up.clone();
    next.stream_id = 4;
    next.prev_ids = vec![3];
    assert_eq!(
        store.apply_remote_device_update(next).await.unwrap(),
        DeviceUpdateOutcome::Stale
    );
    assert_eq!(store.remote_device_list(r).await.unwrap().unwrap().stream_id, Some(3));
    // Marking a list not cached stores nothing.
    store.mark_remote_device_list_stale("@x:remote").await.unwrap();
    assert!(store.remote_device_list("@x:remote").await.unwrap().is_none());
}

// A UIA session made through one store is known to another on the same
// database (a second process), keeps its completed stages, is not found
// once older than asked for, is pruned by a later session's creation and
// is gone once finished.
async fn uia_sessions_seen_by_a_second_store_expire_and_finish(b: Backend) {
    let a = b.open();
    a.create_uia_session("s-old", 1_000, 0).await.unwrap();
    a.create_uia_session("s1", 5_000, 0).await.unwrap();
    let other = b.open();
    assert_eq!(other.uia_session("s1", 0).await.unwrap(), Some(vec![]));
    assert_eq!(other.uia_session("nope", 0).await.unwrap(), None);
    // Older than the caller accepts: as good as gone.
    assert_eq!(other.uia_session("s1", 5_001).await.unwrap(), None);
    assert_eq!(
        other.uia_complete_stage("s1", "m.login.dummy").await.unwrap(),
        vec!["m.login.dummy".to_owned()]
    );
    assert_eq!(
        a.uia_complete_stage("s1", "m.login.password").await.unwrap(),
        vec!["m.login.dummy".to_owned(), "m.login.password".to_owned()]
    );
    assert_eq!(
        a.uia_complete_stage("nope", "m.login.dummy").await.unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        a.uia_session("nope", 0).await.unwrap(),
        None,
        "completing makes no session"
    );
    // A session made at 9000 prunes those made before 2000.
    other.create_uia_session("s2", 9_000, 2_000).await.unwrap();
    assert_eq!(a.uia_session("s-old", 0).await.unwrap(), None);
    assert!(a.uia_session("s1", 0).await.unwrap().is_some());
    other.delete_uia_session("s1").await.unwrap();
    assert_eq!(a.uia_session("s1", 0).await.unwrap(), None);
    assert_eq!(a.uia_session("s2", 0).await.unwrap(), Some(vec![]));
    drop(other);
}

// A rate-limit bucket taken from through one store is the same bucket for
// another on the same database (a second process): a burst of three, then
// refusals saying how long to wait; a refund gives one back; buckets are
// apart by name; pruning deletes only buckets that are full again.
async fn rate_buckets_are_shared_by_stores_refunded_and_pruned_when_full(b: Backend) {
    const TEN_S: i64 = 10_000_000;
    let a = b.open();
    let other = b.open();
    // A burst of 3: a tolerance of two intervals.
    let take = |s: &Arc<dyn Store>, bucket: &'static str| {
        let s = s.clone();
        async move { s.take_rate_token(bucket, TEN_S, 2 * TEN_S).await.unwrap() }
    };
    assert_eq!(take(&a, "k1").await, None);
    assert_eq!(take(&other, "k1").await, None);
    assert_eq!(take(&a, "k1").await, None);
    for s in [&a, &other] {
        let wait = take(s, "k1").await.expect("the fourth is refused");
        assert!(wait > 9_000_000 && wait <= 10_000_000, "wait {wait} µs");
    }
    // Refused requests took nothing: one refund lets exactly one through.
    other.refund_rate_token("k1", TEN_S).await.unwrap();
    assert_eq!(take(&a, "k1").await, None);
    assert!(take(&other, "k1").await.is_some());
    // Another bucket is full.
    assert_eq!(take(&other, "k2").await, None);
    // A bucket of one per microsecond is full again at once.
    assert_eq!(a.take_rate_token("fast", 1, 0).await.unwrap(), None);
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    assert_eq!(
        other.prune_rate_buckets().await.unwrap(),
        1,
        "only the full bucket goes"
    );
    assert_eq!(a.prune_rate_buckets().await.unwrap(), 0);
    assert!(take(&a, "k1").await.is_some(), "k1 is still empty");
    assert_eq!(take(&a, "k2").await, None);
    assert_eq!(take(&a, "k2").await, None);
    assert!(take(&a, "k2").await.is_some(), "k2 kept its first request");
}
