//! Which device and room a topic belongs to: the presets (Zigbee2MQTT,
//! Tasmota, Home Assistant discovery) and the generic topic patterns.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{CommandPayload, Config, Mapping, MappingKind};

/// What a message on a topic is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Route {
    /// A reading of `device`; retained, it is the state under `state_key`.
    Reading { device: Device, state_key: String },
    /// The device's availability (LWT); state under `state_key`.
    Availability { device: Device, state_key: String },
    /// `zigbee2mqtt/bridge/devices`: names and models of the devices.
    Z2mDevices,
    /// `homeassistant/<component>/[<node>/]<object>/config`.
    HaDiscovery,
    /// Nothing to bridge (a command topic, the bridge's own traffic).
    Ignore,
}

/// A device as first seen: its key (the `<device>` of `@_mqtt_<device>`),
/// a display name, and where its commands go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub key: String,
    pub name: String,
    pub commands: Option<Commands>,
}

/// Where a device's commands go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Commands {
    /// One topic template (`{command}` filled in) and the payload's shape.
    Template { topic: String, payload: CommandPayload },
    /// Home Assistant: one command topic per entity; the value as payload.
    PerEntity(BTreeMap<String, String>),
}

impl Commands {
    /// The topic and payload for `command` = `value`.
    pub fn publish(&self, command: &str, value: &Value) -> Option<(String, Vec<u8>)> {
        let raw = |v: &Value| match v {
            Value::String(s) => s.clone().into_bytes(),
            other => other.to_string().into_bytes(),
        };
        match self {
            Commands::Template { topic, payload } => {
                if command.is_empty() || command.contains(['/', '+', '#']) {
                    return None;
                }
                let topic = topic.replace("{command}", command);
                let body = match payload {
                    CommandPayload::Json => serde_json::json!({ command: value }).to_string().into_bytes(),
                    CommandPayload::Value => raw(value),
                };
                Some((topic, body))
            }
            Commands::PerEntity(topics) => {
                let topic = topics
                    .get(command)
                    .or_else(|| (topics.len() == 1).then(|| topics.values().next())?)?;
                Some((topic.clone(), raw(value)))
            }
        }
    }
}

/// A device key as a Matrix localpart part: lower case, and every
/// character a localpart cannot hold (or `/`) as `_`.
pub fn device_key(name: &str) -> String {
    name.chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '=' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A topic pattern of a generic mapping.
#[derive(Debug, Clone)]
pub struct Pattern {
    levels: Vec<Level>,
}

#[derive(Debug, Clone, PartialEq)]
enum Level {
    Exact(String),
    Any,
    Capture(String),
    Rest,
}

impl Pattern {
    pub fn parse(topic: &str) -> Result<Pattern> {
        let parts: Vec<&str> = topic.split('/').collect();
        let mut levels = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            levels.push(match *p {
                "#" if i + 1 == parts.len() => Level::Rest,
                "#" => bail!("`#` must be the last level"),
                "+" => Level::Any,
                p if p.starts_with('+') => Level::Capture(p[1..].to_string()),
                p if p.contains(['+', '#']) => bail!("`+` or `#` inside a level"),
                p => Level::Exact(p.to_string()),
            });
        }
        if !levels.contains(&Level::Capture("device".into())) {
            bail!("the pattern needs a `+device` level");
        }
        Ok(Pattern { levels })
    }

    /// The MQTT subscription filter (captures as `+`).
    pub fn filter(&self) -> String {
        self.levels
            .iter()
            .map(|l| match l {
                Level::Exact(s) => s.as_str(),
                Level::Any | Level::Capture(_) => "+",
                Level::Rest => "#",
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// The captured levels, if the topic matches.
    pub fn captures(&self, topic: &str) -> Option<BTreeMap<String, String>> {
        let parts: Vec<&str> = topic.split('/').collect();
        let mut out = BTreeMap::new();
        for (i, l) in self.levels.iter().enumerate() {
            match l {
                Level::Rest => return Some(out),
                _ if i >= parts.len() => return None,
                Level::Exact(s) if s != parts[i] => return None,
                Level::Capture(name) => {
                    out.insert(name.clone(), parts[i].to_string());
                }
                _ => {}
            }
        }
        (parts.len() == self.levels.len()).then_some(out)
    }
}

/// The routing table: presets, then the learnt Home Assistant topics, then
/// the generic mappings.
pub struct Router {
    z2m: bool,
    tasmota: bool,
    ha: bool,
    mappings: Vec<(Pattern, Mapping)>,
    /// Exact topics learnt from Home Assistant discovery.
    pub learnt: BTreeMap<String, Route>,
}

pub const Z2M: &str = "zigbee2mqtt";
pub const HA: &str = "homeassistant";

impl Router {
    pub fn new(cfg: &Config) -> Router {
        let on = |p: &str| cfg.bridge.presets.iter().any(|x| x == p);
        Router {
            z2m: on("zigbee2mqtt"),
            tasmota: on("tasmota"),
            ha: on("homeassistant"),
            mappings: cfg
                .mapping
                .iter()
                .filter_map(|m| Some((Pattern::parse(&m.topic).ok()?, m.clone())))
                .collect(),
            learnt: BTreeMap::new(),
        }
    }

    /// The filters to subscribe to (learnt topics included).
    pub fn filters(&self) -> Vec<String> {
        let mut f = Vec::new();
        if self.z2m {
            f.push(format!("{Z2M}/#"));
        }
        if self.tasmota {
            f.extend(["tele/+/+".to_string(), "stat/+/+".to_string()]);
        }
        if self.ha {
            f.push(format!("{HA}/+/+/config"));
            f.push(format!("{HA}/+/+/+/config"));
        }
        f.extend(self.learnt.keys().cloned());
        f.extend(self.mappings.iter().map(|(p, _)| p.filter()));
        f.sort();
        f.dedup();
        f
    }

    pub fn route(&self, topic: &str) -> Route {
        let parts: Vec<&str> = topic.split('/').collect();
        if self.z2m && parts.len() >= 2 && parts[0] == Z2M {
            if parts[1] == "bridge" {
                return if topic == "zigbee2mqtt/bridge/devices" {
                    Route::Z2mDevices
                } else {
                    Route::Ignore
                };
            }
            let last = parts[parts.len() - 1];
            let (name_parts, kind) = match last {
                "set" | "get" if parts.len() > 2 => return Route::Ignore,
                "availability" if parts.len() > 2 => (&parts[1..parts.len() - 1], "availability"),
                _ => (&parts[1..], "reading"),
            };
            let name = name_parts.join("/");
            let device = Device {
                key: device_key(&name),
                name: name.clone(),
                commands: Some(Commands::Template {
                    topic: format!("{Z2M}/{name}/set"),
                    payload: CommandPayload::Json,
                }),
            };
            return if kind == "availability" {
                Route::Availability {
                    device,
                    state_key: name,
                }
            } else {
                Route::Reading {
                    device,
                    state_key: name,
                }
            };
        }
        if self.tasmota && parts.len() == 3 && (parts[0] == "tele" || parts[0] == "stat") {
            let dev = parts[1];
            let device = Device {
                key: device_key(dev),
                name: dev.to_string(),
                commands: Some(Commands::Template {
                    topic: format!("cmnd/{dev}/{{command}}"),
                    payload: CommandPayload::Value,
                }),
            };
            let state_key = format!("{dev}/{}/{}", parts[0], parts[2]);
            return if parts[0] == "tele" && parts[2] == "LWT" {
                Route::Availability {
                    device,
                    state_key: dev.to_string(),
                }
            } else {
                Route::Reading { device, state_key }
            };
        }
        if self.ha && parts.first() == Some(&HA) && parts.last() == Some(&"config") && (4..=5).contains(&parts.len()) {
            return Route::HaDiscovery;
        }
        if let Some(r) = self.learnt.get(topic) {
            return r.clone();
        }
        for (p, m) in &self.mappings {
            if let Some(caps) = p.captures(topic) {
                let Some(name) = caps.get("device").cloned() else {
                    continue;
                };
                let device = Device {
                    key: device_key(&name),
                    name: name.clone(),
                    commands: m.command_topic.as_ref().map(|t| Commands::Template {
                        topic: t.replace("{device}", &name),
                        payload: m.command_payload,
                    }),
                };
                return match m.kind {
                    MappingKind::Reading => Route::Reading {
                        device,
                        state_key: name,
                    },
                    MappingKind::Availability => Route::Availability {
                        device,
                        state_key: name,
                    },
                };
            }
        }
        Route::Ignore
    }
}

/// A Home Assistant discovery config, read: the device and the topics it
/// names. `None` when the payload is empty (the entity was removed) or
/// unreadable.
pub struct Discovery {
    pub device: Device,
    pub entity: String,
    pub state_topic: Option<String>,
    pub availability_topic: Option<String>,
}

pub fn ha_discovery(topic: &str, payload: &[u8]) -> Option<Discovery> {
    let parts: Vec<&str> = topic.split('/').collect();
    let object_id = parts.get(parts.len().checked_sub(2)?)?.to_string();
    let v: Value = serde_json::from_slice(payload).ok()?;
    let o = v.as_object()?;
    let base = o.get("~").and_then(Value::as_str).unwrap_or("");
    // Long names, then the abbreviations HA accepts.
    let get = |long: &str, short: &str| -> Option<String> {
        let s = o.get(long).or_else(|| o.get(short))?.as_str()?;
        Some(if let Some(rest) = s.strip_prefix('~') {
            format!("{base}{rest}")
        } else if let Some(head) = s.strip_suffix('~') {
            format!("{head}{base}")
        } else {
            s.to_string()
        })
    };
    let entity = device_key(&get("unique_id", "uniq_id").unwrap_or(object_id.clone()));
    let dev = o.get("device").or_else(|| o.get("dev")).and_then(Value::as_object);
    let dev_id = dev
        .and_then(|d| d.get("identifiers").or_else(|| d.get("ids")))
        .and_then(|i| match i {
            Value::String(s) => Some(s.clone()),
            Value::Array(a) => a.first()?.as_str().map(str::to_string),
            _ => None,
        });
    let dev_name = dev
        .and_then(|d| d.get("name"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let key = device_key(dev_id.as_deref().unwrap_or(&entity));
    let name = dev_name.or_else(|| get("name", "name")).unwrap_or(key.clone());
    let mut commands = BTreeMap::new();
    if let Some(t) = get("command_topic", "cmd_t") {
        commands.insert(object_id.clone(), t);
    }
    Some(Discovery {
        device: Device {
            key,
            name,
            commands: (!commands.is_empty()).then_some(Commands::PerEntity(commands)),
        },
        entity: object_id,
        state_topic: get("state_topic", "stat_t"),
        availability_topic: get("availability_topic", "avty_t"),
    })
}

/// `online` / `Online` / `{"state": "online"}` → true; `offline` → false.
pub fn online(payload: &[u8]) -> Option<bool> {
    let text = std::str::from_utf8(payload).ok()?.trim();
    let word = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(o)) => o.get("state")?.as_str()?.to_string(),
        _ => text.to_string(),
    };
    match word.to_ascii_lowercase().as_str() {
        "online" | "true" | "1" => Some(true),
        "offline" | "false" | "0" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(presets: &[&str], mappings: &str) -> Router {
        let cfg: Config = toml::from_str(&format!(
            "[homeserver]\nurl='http://x'\nserver_name='s'\n[appservice]\nas_token='a'\nhs_token='h'\n[broker]\n\
             [bridge]\npresets={presets:?}\n{mappings}"
        ))
        .unwrap();
        Router::new(&cfg)
    }

    #[test]
    fn patterns_capture_the_device() {
        let p = Pattern::parse("sensors/+device/state").unwrap();
        assert_eq!(p.filter(), "sensors/+/state");
        assert_eq!(p.captures("sensors/k1/state").unwrap()["device"], "k1");
        assert!(p.captures("sensors/k1/other").is_none());
        assert!(p.captures("sensors/k1/state/x").is_none());
        assert!(Pattern::parse("sensors/+/state").is_err());
        assert!(Pattern::parse("a/#/b").is_err());
    }

    #[test]
    fn presets_route() {
        let r = router(&["zigbee2mqtt", "tasmota"], "");
        match r.route("zigbee2mqtt/Kitchen Lamp") {
            Route::Reading { device, state_key } => {
                assert_eq!(device.key, "kitchen_lamp");
                assert_eq!(state_key, "Kitchen Lamp");
                let (t, p) = device.commands.unwrap().publish("state", &Value::from("ON")).unwrap();
                assert_eq!(t, "zigbee2mqtt/Kitchen Lamp/set");
                assert_eq!(p, br#"{"state":"ON"}"#);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.route("zigbee2mqtt/lamp/set"), Route::Ignore);
        assert!(matches!(
            r.route("zigbee2mqtt/lamp/availability"),
            Route::Availability { .. }
        ));
        assert_eq!(r.route("zigbee2mqtt/bridge/devices"), Route::Z2mDevices);
        assert_eq!(r.route("zigbee2mqtt/bridge/state"), Route::Ignore);
        match r.route("tele/plug1/SENSOR") {
            Route::Reading { device, state_key } => {
                assert_eq!(state_key, "plug1/tele/SENSOR");
                let (t, p) = device.commands.unwrap().publish("Power", &Value::from("ON")).unwrap();
                assert_eq!((t.as_str(), p.as_slice()), ("cmnd/plug1/Power", &b"ON"[..]));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(r.route("tele/plug1/LWT"), Route::Availability { .. }));
        assert_eq!(r.route("homeassistant/sensor/x/config"), Route::Ignore);
    }

    #[test]
    fn ha_discovery_reads_abbreviations() {
        let d = ha_discovery(
            "homeassistant/switch/node1/relay/config",
            br#"{"~":"home/relay1","name":"Relay","stat_t":"~/state","cmd_t":"~/set","avty_t":"~/avail","dev":{"ids":["relay-abc"],"name":"Garage relay"}}"#,
        )
        .unwrap();
        assert_eq!(d.device.key, "relay-abc");
        assert_eq!(d.device.name, "Garage relay");
        assert_eq!(d.state_topic.as_deref(), Some("home/relay1/state"));
        assert_eq!(d.availability_topic.as_deref(), Some("home/relay1/avail"));
        let (t, p) = d.device.commands.unwrap().publish("relay", &Value::from("ON")).unwrap();
        assert_eq!((t.as_str(), p.as_slice()), ("home/relay1/set", &b"ON"[..]));
    }
}
