//! The topic scheme (docs/mqtt.md):
//!
//! - `weft/r/{room_id}/e/{event_type}`: events of a room;
//! - `weft/r/{room_id}/s/{event_type}/{state_key}`: state of a room;
//! - `weft/r/{room_id}/x/{event_type}`: ephemeral events of a room
//!   (`m.typing`, `m.receipt`), subscribe only;
//! - `weft/a/{alias without #}/…`: the same, naming the room by an alias.
//!
//! Event types and state keys are any strings a room holds (events stored
//! before the services refused control characters included), but a topic
//! name must not hold U+0000 or the wildcards, and a type must stay one
//! level: [`escape`] writes those characters as `%XX` (their UTF-8 bytes,
//! upper-case hex), and [`unescape`] reads them back in a PUBLISH topic.
//! Escaped: `%` itself, `+`, `#`, control characters (U+0000–U+001F,
//! U+007F–U+009F) and Unicode noncharacters (which MQTT allows but clients
//! such as libmosquitto refuse), and in an event type `/` too. A state key
//! keeps its `/`: it is the rest of the topic, however many levels.

use std::borrow::Cow;
use std::fmt::Write;

/// Whether `c` must be escaped in a topic level.
fn needs_escape(c: char, keep_slash: bool) -> bool {
    let n = u32::from(c);
    matches!(c, '%' | '+' | '#')
        || (c == '/' && !keep_slash)
        || c.is_control()
        || (0xFDD0..=0xFDEF).contains(&n)
        || (n & 0xFFFE) == 0xFFFE
}

/// An event type (`keep_slash` false) or a state key (true) as it goes
/// into a topic name (see the module documentation).
pub fn escape(s: &str, keep_slash: bool) -> Cow<'_, str> {
    if !s.chars().any(|c| needs_escape(c, keep_slash)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c, keep_slash) {
            let mut b = [0u8; 4];
            for byte in c.encode_utf8(&mut b).bytes() {
                let _ = write!(out, "%{byte:02X}");
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Reads `%XX` escapes back; a `%` not followed by two hex digits stays as
/// it is. `None` if the bytes escaped are not UTF-8.
pub fn unescape(s: &str) -> Option<Cow<'_, str>> {
    if !s.contains('%') {
        return Some(Cow::Borrowed(s));
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(hex) = b.get(i + 1..i + 3)
            && let Ok(hex) = std::str::from_utf8(hex)
            && let Ok(byte) = u8::from_str_radix(hex, 16)
            && hex.bytes().all(|h| h.is_ascii_hexdigit())
        {
            out.push(byte);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

/// The topic of a room's event: `{prefix}/e/{event_type}`.
pub fn event_topic(prefix: &str, event_type: &str) -> String {
    format!("{prefix}/e/{}", escape(event_type, false))
}

/// The topic of a room's ephemeral event (typing, receipts):
/// `{prefix}/x/{event_type}`.
pub fn ephemeral_topic(prefix: &str, event_type: &str) -> String {
    format!("{prefix}/x/{}", escape(event_type, false))
}

/// The topic of a room's state: `{prefix}/s/{event_type}/{state_key}`.
pub fn state_topic(prefix: &str, event_type: &str, state_key: &str) -> String {
    format!("{prefix}/s/{}/{}", escape(event_type, false), escape(state_key, true))
}

/// Where a PUBLISH goes.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    /// A room ID, or an alias with its leading `#`.
    pub room: String,
    pub event_type: String,
    pub state_key: Option<String>,
    /// `f/{name}`: the payload is a file to store as media and share as
    /// an `m.file` (or `m.image`, …) message of that name.
    pub file: Option<String>,
}

/// Parses a PUBLISH topic; `None` if it is not one of ours.
pub fn parse_publish(topic: &str) -> Option<Target> {
    if topic.contains(['+', '#', '\0']) {
        return None;
    }
    let rest = topic.strip_prefix("weft/")?;
    let (kind, rest) = rest.split_once('/')?;
    let (room, rest) = rest.split_once('/')?;
    let room = match kind {
        "r" => room.to_owned(),
        "a" => format!("#{room}"),
        _ => return None,
    };
    if room.len() < 2 {
        return None;
    }
    let (class, rest) = rest.split_once('/')?;
    match class {
        "e" if !rest.is_empty() && !rest.contains('/') => Some(Target {
            room,
            event_type: unescape(rest)?.into_owned(),
            state_key: None,
            file: None,
        }),
        "f" if !rest.is_empty() && !rest.contains('/') => Some(Target {
            room,
            event_type: "m.room.message".into(),
            state_key: None,
            file: Some(unescape(rest)?.into_owned()),
        }),
        "s" => {
            // The state key is everything after the type (it may hold `/`).
            let (event_type, state_key) = rest.split_once('/')?;
            if event_type.is_empty() {
                return None;
            }
            Some(Target {
                room,
                event_type: unescape(event_type)?.into_owned(),
                state_key: Some(unescape(state_key)?.into_owned()),
                file: None,
            })
        }
        _ => None,
    }
}

/// Which rooms a subscription filter names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterRoom {
    /// `weft/r/+/…` or `weft/r/#`: every room the user is joined to.
    All,
    /// `weft/r/{room_id}/…`.
    Id(String),
    /// `weft/a/{alias}/…`: the alias as written (without `#`).
    Alias(String),
}

/// Parses a subscription filter; `None` if it can never match our topics.
pub fn parse_filter(filter: &str) -> Option<FilterRoom> {
    if filter.is_empty() || filter.contains('\0') || !valid_filter(filter) {
        return None;
    }
    let mut levels = filter.split('/');
    if levels.next()? != "weft" {
        return None;
    }
    let kind = levels.next()?;
    let room = levels.next().unwrap_or("#");
    match (kind, room) {
        ("r", "+" | "#") => Some(FilterRoom::All),
        ("r", id) if id.starts_with('!') && !id.contains(['+', '#']) => Some(FilterRoom::Id(id.to_owned())),
        ("a", alias) if !alias.is_empty() && !alias.contains(['+', '#']) => Some(FilterRoom::Alias(alias.to_owned())),
        _ => None,
    }
}

/// MQTT's rules for filters: `#` only as the whole last level, `+` only as
/// a whole level.
fn valid_filter(filter: &str) -> bool {
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "#" => i == levels.len() - 1,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// Whether `topic` matches `filter` (MQTT wildcard rules).
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The topic prefix of a room for a subscription: `weft/r/{id}` or `weft/a/{alias}`.
pub fn prefix(room: &FilterRoom, room_id: &str) -> String {
    match room {
        FilterRoom::Alias(a) => format!("weft/a/{a}"),
        _ => format!("weft/r/{room_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_topics() {
        assert_eq!(
            parse_publish("weft/r/!a:h/e/org.weft.telemetry"),
            Some(Target {
                room: "!a:h".into(),
                event_type: "org.weft.telemetry".into(),
                state_key: None,
                file: None,
            })
        );
        assert_eq!(
            parse_publish("weft/r/!a:h/f/snap%20shot.jpg"),
            Some(Target {
                room: "!a:h".into(),
                event_type: "m.room.message".into(),
                state_key: None,
                file: Some("snap shot.jpg".into()),
            })
        );
        assert_eq!(
            parse_publish("weft/a/lab:localhost:8008/s/m.room.name/"),
            Some(Target {
                room: "#lab:localhost:8008".into(),
                event_type: "m.room.name".into(),
                state_key: Some(String::new()),
                file: None,
            })
        );
        assert_eq!(
            parse_publish("weft/r/!a:h/s/x/a/b").unwrap().state_key.as_deref(),
            Some("a/b")
        );
        for bad in [
            "weft/r/!a:h/e/",
            "weft/r/!a:h/e/+",
            "weft/x/!a/e/t",
            "weft/r/!a:h/s/x",
            "foo",
            "weft/r/!a:h/e/a/b",
            "weft/r/!a:h/f/",
            "weft/r/!a:h/f/a/b",
            "weft/r/!a:h/x/m.typing",
        ] {
            assert_eq!(parse_publish(bad), None, "{bad}");
        }
    }

    #[test]
    fn escaping() {
        assert_eq!(escape("m.room.name", false), "m.room.name");
        assert_eq!(escape("@alice:h/x", true), "@alice:h/x");
        assert_eq!(escape("a/b+c#d%e\0f", false), "a%2Fb%2Bc%23d%25e%00f");
        assert_eq!(escape("a/b+c", true), "a/b%2Bc");
        assert_eq!(escape("x\u{85}y\u{FFFF}\u{FDD0}", false), "x%C2%85y%EF%BF%BF%EF%B7%90");
        for s in ["org.x\0y", "a/+#", "%", "%zz", "100%25", "é\u{7f}", "\u{1FFFE}"] {
            for keep in [false, true] {
                let e = escape(s, keep);
                assert!(!e.contains(['+', '#', '\0']), "{e}");
                assert!(keep || !e.contains('/'), "{e}");
                assert_eq!(unescape(&e).as_deref(), Some(s), "{s:?}");
            }
        }
        assert_eq!(unescape("50%"), Some("50%".into()));
        assert_eq!(unescape("%4"), Some("%4".into()));
        assert_eq!(unescape("%FF"), None);
        let t = parse_publish("weft/r/!a:h/s/org.x%2Fy/%40bob%3Ah%2B").unwrap();
        assert_eq!(t.event_type, "org.x/y");
        assert_eq!(t.state_key.as_deref(), Some("@bob:h+"));
        assert_eq!(state_topic("weft/r/!a:h", "t/+", "k/#"), "weft/r/!a:h/s/t%2F%2B/k/%23");
        assert_eq!(event_topic("weft/r/!a:h", "x\0"), "weft/r/!a:h/e/x%00");
    }

    #[test]
    fn filters_and_matching() {
        assert_eq!(parse_filter("weft/r/+/e/#"), Some(FilterRoom::All));
        assert_eq!(parse_filter("weft/r/!a:h/s/#"), Some(FilterRoom::Id("!a:h".into())));
        assert_eq!(
            parse_filter("weft/a/lab:h/e/+"),
            Some(FilterRoom::Alias("lab:h".into()))
        );
        assert_eq!(parse_filter("weft/r/!a:h/e/#/x"), None);
        assert_eq!(parse_filter("other/#"), None);
        assert!(matches("weft/r/+/e/#", "weft/r/!a:h/e/m.room.message"));
        assert!(matches("weft/r/!a:h/e/+", "weft/r/!a:h/e/t"));
        assert!(!matches("weft/r/!a:h/e/+", "weft/r/!a:h/s/t/"));
        assert!(matches("weft/r/!a:h/s/#", "weft/r/!a:h/s/m.room.name/"));
        assert!(matches("weft/r/!a:h/s/m.room.name/", "weft/r/!a:h/s/m.room.name/"));
        assert!(matches("weft/r/!a:h/#", "weft/r/!a:h"));
    }
}
