//! MSC3079 (low-bandwidth Client-Server API), version 1 tables: integer
//! CBOR keys (Appendix A) and one-character CoAP path enums (Appendix B).
//! Both are optional shorthands: full keys and paths always work.

use serde_json::Value;

/// Appendix A: CBOR integer keys, version 1 (index + 1 = the integer).
pub const KEYS: &[&str] = &[
    "event_id",
    "type",
    "content",
    "state_key",
    "room_id",
    "sender",
    "user_id",
    "origin_server_ts",
    "unsigned",
    "prev_content",
    "state",
    "timeline",
    "events",
    "limited",
    "prev_batch",
    "transaction_id",
    "age",
    "redacted_because",
    "next_batch",
    "presence",
    "avatar_url",
    "account_data",
    "rooms",
    "join",
    "membership",
    "displayname",
    "body",
    "msgtype",
    "format",
    "formatted_body",
    "ephemeral",
    "invite_state",
    "leave",
    "third_party_invite",
    "is_direct",
    "hashes",
    "signatures",
    "depth",
    "prev_events",
    "prev_state",
    "auth_events",
    "origin",
    "creator",
    "join_rule",
    "history_visibility",
    "ban",
    "events_default",
    "kick",
    "redact",
    "state_default",
    "users",
    "users_default",
    "reason",
    "visibility",
    "room_alias_name",
    "name",
    "topic",
    "invite",
    "invite_3pid",
    "room_version",
    "creation_content",
    "initial_state",
    "preset",
    "servers",
    "identifier",
    "user",
    "medium",
    "address",
    "password",
    "token",
    "device_id",
    "initial_device_display_name",
    "access_token",
    "home_server",
    "well_known",
    "base_url",
    "device_lists",
    "to_device",
    "peek",
    "last_seen_ip",
    "display_name",
    "typing",
    "last_seen_ts",
    "algorithm",
    "sender_key",
    "session_id",
    "ciphertext",
    "one_time_keys",
    "timeout",
    "recent_rooms",
    "chunk",
    "m.fully_read",
    "device_keys",
    "failures",
    "device_display_name",
    "prev_sender",
    "replaces_state",
    "changed",
    "unstable_features",
    "versions",
    "devices",
    "errcode",
    "error",
    "room_alias",
];

/// The key name for an integer key, if the table has it.
pub fn key_name(n: i128) -> Option<&'static str> {
    usize::try_from(n)
        .ok()
        .filter(|n| *n >= 1)
        .and_then(|n| KEYS.get(n - 1))
        .copied()
}

/// The integer for a key name, if the table has it.
pub fn key_number(name: &str) -> Option<u64> {
    KEYS.iter().position(|k| *k == name).map(|i| i as u64 + 1)
}

/// Appendix B: path enums, version 1.
const PATHS: &[(&str, &str)] = &[
    ("0", "/_matrix/client/versions"),
    ("1", "/_matrix/client/r0/login"),
    ("2", "/_matrix/client/r0/capabilities"),
    ("3", "/_matrix/client/r0/logout"),
    ("4", "/_matrix/client/r0/register"),
    ("5", "/_matrix/client/r0/user/{}/filter"),
    ("6", "/_matrix/client/r0/user/{}/filter/{}"),
    ("7", "/_matrix/client/r0/sync"),
    ("8", "/_matrix/client/r0/rooms/{}/state/{}/{}"),
    ("9", "/_matrix/client/r0/rooms/{}/send/{}/{}"),
    ("A", "/_matrix/client/r0/rooms/{}/event/{}"),
    ("B", "/_matrix/client/r0/rooms/{}/state"),
    ("C", "/_matrix/client/r0/rooms/{}/members"),
    ("D", "/_matrix/client/r0/rooms/{}/joined_members"),
    ("E", "/_matrix/client/r0/rooms/{}/messages"),
    ("F", "/_matrix/client/r0/rooms/{}/redact/{}/{}"),
    ("G", "/_matrix/client/r0/createRoom"),
    ("H", "/_matrix/client/r0/directory/room/{}"),
    ("I", "/_matrix/client/r0/joined_rooms"),
    ("J", "/_matrix/client/r0/rooms/{}/invite"),
    ("K", "/_matrix/client/r0/rooms/{}/join"),
    ("L", "/_matrix/client/r0/join/{}"),
    ("M", "/_matrix/client/r0/rooms/{}/leave"),
    ("N", "/_matrix/client/r0/rooms/{}/forget"),
    ("O", "/_matrix/client/r0/rooms/{}/kick"),
    ("P", "/_matrix/client/r0/rooms/{}/ban"),
    ("Q", "/_matrix/client/r0/rooms/{}/unban"),
    ("R", "/_matrix/client/r0/directory/list/room/{}"),
    ("S", "/_matrix/client/r0/publicRooms"),
    ("T", "/_matrix/client/r0/user_directory/search"),
    ("U", "/_matrix/client/r0/profile/{}/displayname"),
    ("V", "/_matrix/client/r0/profile/{}/avatar_url"),
    ("W", "/_matrix/client/r0/profile/{}"),
    ("X", "/_matrix/client/r0/voip/turnServer"),
    ("Y", "/_matrix/client/r0/rooms/{}/typing/{}"),
    ("Z", "/_matrix/client/r0/rooms/{}/receipt/{}/{}"),
    ("a", "/_matrix/client/r0/rooms/{}/read_markers"),
    ("b", "/_matrix/client/r0/presence/{}/status"),
    ("c", "/_matrix/client/r0/sendToDevice/{}/{}"),
    ("d", "/_matrix/client/r0/devices"),
    ("e", "/_matrix/client/r0/devices/{}"),
    ("f", "/_matrix/client/r0/delete_devices"),
    ("g", "/_matrix/client/r0/keys/upload"),
    ("h", "/_matrix/client/r0/keys/query"),
    ("i", "/_matrix/client/r0/keys/claim"),
    ("j", "/_matrix/client/r0/keys/changes"),
    ("k", "/_matrix/client/r0/pushers"),
    ("l", "/_matrix/client/r0/pushers/set"),
    ("m", "/_matrix/client/r0/notifications"),
    ("n", "/_matrix/client/r0/pushrules/"),
    ("o", "/_matrix/client/r0/search"),
    ("p", "/_matrix/client/r0/user/{}/rooms/{}/tags"),
    ("q", "/_matrix/client/r0/user/{}/rooms/{}/tags/{}"),
    ("r", "/_matrix/client/r0/user/{}/account_data/{}"),
    ("s", "/_matrix/client/r0/user/{}/rooms/{}/account_data/{}"),
    ("t", "/_matrix/client/r0/rooms/{}/context/{}"),
    ("u", "/_matrix/client/r0/rooms/{}/report/{}"),
];

/// Expands a path enum (`/9/{room}/{type}/{txn}`) to its full path
/// segments; `None` if the path is not an enum path.
pub fn expand_path(path: &[String]) -> Option<Vec<String>> {
    let (first, params) = path.split_first()?;
    let (_, template) = PATHS.iter().find(|(k, _)| *k == first.as_str())?;
    let mut params = params.iter();
    let mut out = Vec::new();
    for seg in template.trim_start_matches('/').split('/') {
        if seg == "{}" {
            out.push(params.next()?.clone());
        } else {
            out.push(seg.to_owned());
        }
    }
    if params.next().is_some() {
        return None;
    }
    Some(out)
}

/// The JSON value as CBOR with the table's integer keys.
pub fn to_cbor_value(v: &Value) -> ciborium::Value {
    use ciborium::Value as C;
    match v {
        Value::Null => C::Null,
        Value::Bool(b) => C::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                C::Integer(i.into())
            } else if let Some(u) = n.as_u64() {
                C::Integer(u.into())
            } else {
                C::Float(n.as_f64().unwrap_or(0.0))
            }
        }
        Value::String(s) => C::Text(s.clone()),
        Value::Array(a) => C::Array(a.iter().map(to_cbor_value).collect()),
        Value::Object(o) => C::Map(
            o.iter()
                .map(|(k, v)| {
                    let key = match key_number(k) {
                        Some(n) => C::Integer(n.into()),
                        None => C::Text(k.clone()),
                    };
                    (key, to_cbor_value(v))
                })
                .collect(),
        ),
    }
}

/// Encodes with integer keys.
pub fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = ciborium::into_writer(&to_cbor_value(v), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn msc_example_decodes_to_the_json() {
        let hex = "a5026e6d2e726f6f6d2e6d65737361676503a2181b6b48656c6c6f20576f726c64181c666d2e74657874056e21666f6f3a6c6f63616c686f7374067040616c6963653a6c6f63616c686f737409a26a626f6f6c5f76616c7565f56a6e756c6c5f76616c7565f6";
        let bytes: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let expect = json!({
            "type": "m.room.message",
            "content": {"msgtype": "m.text", "body": "Hello World"},
            "sender": "@alice:localhost",
            "room_id": "!foo:localhost",
            "unsigned": {"bool_value": true, "null_value": null}
        });
        let (v, used) = crate::cbor::to_json_with_keys(&bytes).unwrap();
        assert!(used);
        assert_eq!(v, expect);
        assert_eq!(crate::cbor::to_json_with_keys(&encode(&expect)).unwrap().0, expect);
        // A string key wins over the same key as an integer.
        let mut m = Vec::new();
        ciborium::into_writer(
            &ciborium::Value::Map(vec![
                (ciborium::Value::Text("body".into()), ciborium::Value::Text("s".into())),
                (ciborium::Value::Integer(27.into()), ciborium::Value::Text("i".into())),
            ]),
            &mut m,
        )
        .unwrap();
        assert_eq!(crate::cbor::to_json_with_keys(&m).unwrap().0, json!({"body": "s"}));
    }

    #[test]
    fn path_enums_expand() {
        let p = |s: &str| s.split('/').map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(
            expand_path(&p("9/!r:x/m.room.message/t1")).unwrap().join("/"),
            "_matrix/client/r0/rooms/!r:x/send/m.room.message/t1"
        );
        assert_eq!(expand_path(&p("7")).unwrap().join("/"), "_matrix/client/r0/sync");
        assert_eq!(expand_path(&p("0")).unwrap().join("/"), "_matrix/client/versions");
        assert!(expand_path(&p("9/!r:x")).is_none());
        assert!(expand_path(&p("7/extra")).is_none());
        assert!(expand_path(&p("_matrix/client")).is_none());
    }
}
