//! File management (`org.weft.files`): the files shared in a room and a
//! user's uploads, listed, filtered and searched; tags as room state
//! (`org.weft.file.tags`) under the room's power levels, their history
//! kept as events.

mod common;

use common::*;
use serde_json::{Value, json};

async fn upload(server: &TestServer, c: &Client, bytes: &[u8], ty: &str, name: &str) -> String {
    let resp = server
        .http
        .post(format!("{}/_matrix/media/v3/upload?filename={name}", server.base_url()))
        .bearer_auth(&c.access_token)
        .header("content-type", ty)
        .body(bytes.to_vec())
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = resp.json().await.expect("json");
    v["content_uri"].as_str().expect("content_uri").to_owned()
}

/// Uploads a file and shares it in `room` as an `m.file`/`m.image` message.
async fn share(server: &TestServer, c: &Client, room: &str, name: &str, ty: &str, bytes: &[u8], txn: &str) -> String {
    let mxc = upload(server, c, bytes, ty, name).await;
    let msgtype = if ty.starts_with("image/") { "m.image" } else { "m.file" };
    c.send(
        room,
        "m.room.message",
        txn,
        json!({"msgtype": msgtype, "body": name, "filename": name, "url": mxc,
               "info": {"mimetype": ty, "size": bytes.len()}}),
    )
    .await
}

fn names(v: &Value) -> Vec<String> {
    v["chunk"]
        .as_array()
        .unwrap_or_else(|| panic!("no chunk: {v}"))
        .iter()
        .map(|f| f["name"].as_str().unwrap_or("").to_owned())
        .collect()
}

fn files_path(room: &str, query: &str) -> String {
    format!("/_matrix/client/unstable/org.weft.files/rooms/{room}/files{query}")
}

#[tokio::test]
async fn room_files_listed_filtered_searched_and_tagged() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let bob = server.register("bob").await;
    let carol = server.register("carol").await;
    let room = room_with(&alice, &bob, "private_chat").await;

    let fw = share(
        &server,
        &alice,
        &room,
        "firmware-2.1.bin",
        "application/octet-stream",
        &[1; 300],
        "t1",
    )
    .await;
    alice.send_text(&room, "t2", "not a file").await;
    let snap = share(
        &server,
        &bob,
        &room,
        "camera snapshot.jpg",
        "image/jpeg",
        &[2; 200],
        "t3",
    )
    .await;
    let log = share(&server, &alice, &room, "boiler.log", "text/plain", &[3; 100], "t4").await;

    // Newest first, with what a file list shows.
    let (st, v) = bob.get(&files_path(&room, "")).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(names(&v), ["boiler.log", "camera snapshot.jpg", "firmware-2.1.bin"]);
    let first = &v["chunk"][0];
    assert_eq!(first["event_id"], json!(log));
    assert_eq!(first["mimetype"], json!("text/plain"));
    assert_eq!(first["size"], json!(100));
    assert_eq!(first["sender"], json!(alice.user_id));
    assert!(first["mxc"].as_str().unwrap().starts_with("mxc://"));
    assert!(first["origin_server_ts"].as_u64().is_some());
    assert_eq!(first["tags"], json!([]));

    // By type, by name, and paged.
    let (_, v) = bob.get(&files_path(&room, "?type=image/")).await;
    assert_eq!(names(&v), ["camera snapshot.jpg"]);
    let (_, v) = bob.get(&files_path(&room, "?q=FIRMWARE")).await;
    assert_eq!(names(&v), ["firmware-2.1.bin"]);
    let (_, v) = bob.get(&files_path(&room, "?limit=2")).await;
    assert_eq!(names(&v).len(), 2);
    let next = v["next_batch"].as_str().expect("next_batch").to_owned();
    let (_, v) = bob.get(&files_path(&room, &format!("?limit=2&from={next}"))).await;
    assert_eq!(names(&v), ["firmware-2.1.bin"]);
    assert!(v.get("next_batch").is_none(), "{v}");

    // Tags are state under the room's power levels: state_default (50)
    // by default, so bob (0) may not tag; alice (100) may.
    let tag_path = |ev: &str| format!("rooms/{room}/state/org.weft.file.tags/{ev}");
    let got = bob.put(&tag_path(&fw), json!({"tags": ["firmware"]})).await;
    assert_err(&got, 403, "M_FORBIDDEN");
    let (st, v) = alice.put(&tag_path(&fw), json!({"tags": ["firmware", "v2"]})).await;
    assert_eq!(st, 200, "{v}");
    let (_, v) = bob.get(&files_path(&room, "?tag=firmware")).await;
    assert_eq!(names(&v), ["firmware-2.1.bin"]);
    assert_eq!(v["chunk"][0]["tags"], json!(["firmware", "v2"]));
    // Searching finds tags too.
    let (_, v) = bob.get(&files_path(&room, "?q=v2")).await;
    assert_eq!(names(&v), ["firmware-2.1.bin"]);

    // The room lets members tag.
    let (_, mut pl) = alice.get(&format!("rooms/{room}/state/m.room.power_levels/")).await;
    pl["events"]["org.weft.file.tags"] = json!(0);
    let (st, v) = alice.put(&format!("rooms/{room}/state/m.room.power_levels/"), pl).await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = bob
        .put(&tag_path(&snap), json!({"tags": ["boiler room", "camera"]}))
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, _) = bob.put(&tag_path(&fw), json!({"tags": ["firmware"]})).await;
    assert_eq!(st, 200);
    let (_, v) = bob.get(&files_path(&room, "?tag=v2")).await;
    assert_eq!(names(&v), Vec::<String>::new());
    let (_, v) = alice.get(&files_path(&room, "?tag=camera")).await;
    assert_eq!(names(&v), ["camera snapshot.jpg"]);

    // The history of the tags is the room's: both versions are events.
    let tag_events: Vec<Value> = alice
        .all_messages(&room)
        .await
        .into_iter()
        .filter(|e| e["type"] == "org.weft.file.tags" && e["state_key"] == json!(fw))
        .collect();
    assert_eq!(tag_events.len(), 2, "{tag_events:?}");
    assert_eq!(tag_events[0]["content"]["tags"], json!(["firmware", "v2"]));
    assert_eq!(tag_events[1]["content"]["tags"], json!(["firmware"]));

    // Bad tags, or tags of something that is not a file: 400.
    for bad in [
        json!({"tags": "x"}),
        json!({"tags": [1]}),
        json!({"tags": ["a", "a"]}),
        json!({"tags": [""]}),
    ] {
        let got = bob.put(&tag_path(&fw), bad.clone()).await;
        assert_err(&got, 400, "M_BAD_JSON");
    }
    let text_event = alice
        .all_messages(&room)
        .await
        .into_iter()
        .find(|e| e["content"]["body"] == "not a file")
        .unwrap();
    let got = bob
        .put(
            &tag_path(text_event["event_id"].as_str().unwrap()),
            json!({"tags": ["x"]}),
        )
        .await;
    assert_err(&got, 400, "M_BAD_JSON");

    // A non-member sees nothing of the room's files.
    let got = carol.get(&files_path(&room, "")).await;
    assert_err(&got, 403, "M_FORBIDDEN");

    // Alice's own uploads, with the tags the room gave them.
    let (st, v) = alice.get("/_matrix/client/unstable/org.weft.files/uploads").await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(names(&v), ["boiler.log", "firmware-2.1.bin"]);
    assert_eq!(v["chunk"][1]["tags"], json!(["firmware"]));
    assert_eq!(v["chunk"][1]["size"], json!(300));
    let (_, v) = alice
        .get("/_matrix/client/unstable/org.weft.files/uploads?tag=firmware")
        .await;
    assert_eq!(names(&v), ["firmware-2.1.bin"]);
    let (_, v) = bob
        .get("/_matrix/client/unstable/org.weft.files/uploads?type=image/")
        .await;
    assert_eq!(names(&v), ["camera snapshot.jpg"]);
}
