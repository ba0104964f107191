//! The topic scheme (docs/mqtt.md):
//!
//! - `weft/r/{room_id}/e/{event_type}`: events of a room;
//! - `weft/r/{room_id}/s/{event_type}/{state_key}`: state of a room;
//! - `weft/a/{alias without #}/…`: the same, naming the room by an alias.

/// Where a PUBLISH goes.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    /// A room ID, or an alias with its leading `#`.
    pub room: String,
    pub event_type: String,
    pub state_key: Option<String>,
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
            event_type: rest.to_owned(),
            state_key: None,
        }),
        "s" => {
            // The state key is everything after the type (it may hold `/`).
            let (event_type, state_key) = rest.split_once('/')?;
            (!event_type.is_empty()).then(|| Target {
                room,
                event_type: event_type.to_owned(),
                state_key: Some(state_key.to_owned()),
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
                state_key: None
            })
        );
        assert_eq!(
            parse_publish("weft/a/lab:localhost:8008/s/m.room.name/"),
            Some(Target {
                room: "#lab:localhost:8008".into(),
                event_type: "m.room.name".into(),
                state_key: Some(String::new())
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
        ] {
            assert_eq!(parse_publish(bad), None, "{bad}");
        }
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
