//! The bridge's TOML configuration (docs/bridge-mqtt.md lists every key).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The prefix of every puppet's localpart and every alias's: `@_mqtt_<device>`,
/// `#_mqtt_<device>`. The registration's exclusive namespaces cover it.
pub const PREFIX: &str = "_mqtt_";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub homeserver: Homeserver,
    pub appservice: AppService,
    pub broker: Broker,
    #[serde(default)]
    pub bridge: Bridge,
    /// Generic topic-pattern mappings, tried after the presets.
    #[serde(default)]
    pub mapping: Vec<Mapping>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Homeserver {
    /// Client-Server API base URL, e.g. `http://127.0.0.1:8008`.
    pub url: String,
    /// The server name of user IDs and aliases (`example.org`).
    pub server_name: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppService {
    /// The registration's `id`.
    #[serde(default = "default_id")]
    pub id: String,
    pub as_token: String,
    pub hs_token: String,
    /// The bridge's own user (`@<sender_localpart>:server`).
    #[serde(default = "default_sender")]
    pub sender_localpart: String,
    /// Where the transactions endpoint listens.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The URL the homeserver calls (the registration's `url`); default
    /// `http://<listen>`.
    #[serde(default)]
    pub url: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Broker {
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// The MQTT client ID: the persistent session's name at the broker.
    #[serde(default = "default_client_id")]
    pub client_id: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// MQTT over TLS (then `port` is usually 8883).
    #[serde(default)]
    pub tls: bool,
    /// PEM CA file for TLS; default: the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bridge {
    /// Which presets are on: `zigbee2mqtt`, `tasmota`, `homeassistant`.
    #[serde(default = "default_presets")]
    pub presets: Vec<String>,
    /// Users invited to every device room.
    #[serde(default)]
    pub invite: Vec<String>,
    /// Rooms (usually spaces; IDs or aliases) every device room is shared
    /// with: added as their `m.space.child`, and joinable by their members
    /// (join rule `restricted`).
    #[serde(default)]
    pub spaces: Vec<String>,
    /// The room version of new device rooms (8 or later has restricted
    /// joins, which `spaces` needs).
    #[serde(default = "default_room_version")]
    pub room_version: String,
    /// Users whose commands are published (`"*"`: any member of the room).
    #[serde(default)]
    pub command_senders: Vec<String>,
    /// The file the bridge keeps its rooms and delivery counter in;
    /// relative: next to the config file.
    #[serde(default = "default_state_file")]
    pub state_file: PathBuf,
    /// Event type of readings (timeline) and retained values (state).
    #[serde(default = "default_reading_type")]
    pub reading_type: String,
}

impl Default for Bridge {
    fn default() -> Self {
        Bridge {
            presets: default_presets(),
            invite: Vec::new(),
            spaces: Vec::new(),
            room_version: default_room_version(),
            command_senders: Vec::new(),
            state_file: default_state_file(),
            reading_type: default_reading_type(),
        }
    }
}

/// `topic = "sensors/+device/state"`: a `+name` level captures that level
/// (`+device` names the device and is required), `+` alone matches any
/// level, a last `#` any rest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    pub topic: String,
    /// `reading` (timeline events, retained ones also state) or
    /// `availability` (state `org.weft.mqtt.availability`).
    #[serde(default)]
    pub kind: MappingKind,
    /// Where commands go: `{device}` and `{command}` are filled in.
    #[serde(default)]
    pub command_topic: Option<String>,
    /// `json` (`{"<command>": value}`) or `value` (the value as it is).
    #[serde(default)]
    pub command_payload: CommandPayload,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MappingKind {
    #[default]
    Reading,
    Availability,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CommandPayload {
    #[default]
    Json,
    Value,
}

fn default_id() -> String {
    "weft-bridge-mqtt".into()
}
fn default_sender() -> String {
    "_mqtt_bot".into()
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 29330))
}
fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    1883
}
fn default_client_id() -> String {
    "weft-bridge-mqtt".into()
}
fn default_keep_alive() -> u64 {
    30
}
fn default_presets() -> Vec<String> {
    vec!["zigbee2mqtt".into(), "tasmota".into(), "homeassistant".into()]
}
fn default_state_file() -> PathBuf {
    "bridge-mqtt-state".into()
}
fn default_room_version() -> String {
    "10".into()
}
fn default_reading_type() -> String {
    "org.weft.mqtt.reading".into()
}

pub const PRESETS: [&str; 3] = ["zigbee2mqtt", "tasmota", "homeassistant"];

impl Config {
    /// Reads and checks the file; relative paths in it are taken next to it.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut cfg: Config = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        if cfg.bridge.state_file.is_relative() {
            cfg.bridge.state_file = dir.join(&cfg.bridge.state_file);
        }
        if let Some(ca) = &cfg.broker.ca_file
            && ca.is_relative()
        {
            cfg.broker.ca_file = Some(dir.join(ca));
        }
        cfg.check().with_context(|| format!("in {}", path.display()))?;
        Ok(cfg)
    }

    fn check(&self) -> Result<()> {
        if self.appservice.as_token.is_empty() || self.appservice.hs_token.is_empty() {
            bail!("appservice.as_token and appservice.hs_token must not be empty");
        }
        if self.appservice.as_token == self.appservice.hs_token {
            bail!("appservice.as_token and appservice.hs_token must differ");
        }
        if self.homeserver.server_name.is_empty() {
            bail!("homeserver.server_name must not be empty");
        }
        if !self.homeserver.url.starts_with("http://") && !self.homeserver.url.starts_with("https://") {
            bail!("homeserver.url must be an http(s) URL");
        }
        for p in &self.bridge.presets {
            if !PRESETS.contains(&p.as_str()) {
                bail!("bridge.presets: unknown preset {p:?} (known: {})", PRESETS.join(", "));
            }
        }
        for u in self
            .bridge
            .invite
            .iter()
            .chain(self.bridge.command_senders.iter().filter(|u| *u != "*"))
        {
            ruma::UserId::parse(u.as_str()).with_context(|| format!("{u:?} is not a user ID"))?;
        }
        for r in &self.bridge.spaces {
            if ruma::RoomId::parse(r.as_str()).is_err() && ruma::RoomAliasId::parse(r.as_str()).is_err() {
                bail!("bridge.spaces: {r:?} is neither a room ID nor a room alias");
            }
        }
        for m in &self.mapping {
            crate::mapping::Pattern::parse(&m.topic).with_context(|| format!("mapping topic {:?}", m.topic))?;
        }
        Ok(())
    }

    pub fn url(&self) -> String {
        self.appservice
            .url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.appservice.listen))
    }

    /// The registration file in Synapse's format (YAML; strings written as
    /// JSON strings, which YAML reads the same).
    pub fn registration_yaml(&self) -> String {
        let q = |s: &str| serde_json::Value::from(s).to_string();
        let server = regex_escape(&self.homeserver.server_name);
        format!(
            "# Written by `weft-bridge-mqtt generate-registration`.\n\
             id: {id}\n\
             url: {url}\n\
             as_token: {as_token}\n\
             hs_token: {hs_token}\n\
             sender_localpart: {sender}\n\
             namespaces:\n  \
               users:\n    - exclusive: true\n      regex: {users}\n  \
               aliases:\n    - exclusive: true\n      regex: {aliases}\n  \
               rooms: []\n\
             rate_limited: false\n\
             protocols: [\"mqtt\"]\n",
            id = q(&self.appservice.id),
            url = q(&self.url()),
            as_token = q(&self.appservice.as_token),
            hs_token = q(&self.appservice.hs_token),
            sender = q(&self.appservice.sender_localpart),
            users = q(&format!("@{PREFIX}.*:{server}")),
            aliases = q(&format!("#{PREFIX}.*:{server}")),
        )
    }
}

fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("bridge.toml");
        std::fs::write(&p, text)?;
        Config::load(&p)
    }

    const BASE: &str = "[homeserver]\nurl = \"http://127.0.0.1:8008\"\nserver_name = \"example.org\"\n\
                        [appservice]\nas_token = \"a\"\nhs_token = \"h\"\n[broker]\n";

    #[test]
    fn registration_has_exclusive_namespaces_for_the_server() {
        let cfg = load(BASE).unwrap();
        let reg = cfg.registration_yaml();
        assert!(reg.contains(r##"regex: "@_mqtt_.*:example\\.org""##), "{reg}");
        assert!(reg.contains(r##"regex: "#_mqtt_.*:example\\.org""##), "{reg}");
        assert!(reg.contains("url: \"http://127.0.0.1:29330\""), "{reg}");
        assert!(
            reg.contains("as_token: \"a\"") && reg.contains("hs_token: \"h\""),
            "{reg}"
        );
        assert_eq!(reg.matches("exclusive: true").count(), 2);
        // Relative paths are next to the config file.
        assert!(cfg.bridge.state_file.is_absolute());
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        let err = |t: &str| format!("{:#}", load(t).unwrap_err());
        assert!(err(&format!("{BASE}[bridge]\npresets = [\"shelly\"]\n")).contains("unknown preset"));
        assert!(err(&format!("{BASE}[bridge]\ninvite = [\"alice\"]\n")).contains("not a user ID"));
        assert!(err(&format!("{BASE}[bridge]\nspaces = [\"lab\"]\n")).contains("neither a room ID"));
        assert!(
            load(&format!(
                "{BASE}[bridge]\nspaces = [\"!a:example.org\", \"#lab:example.org\"]\n"
            ))
            .is_ok()
        );
        assert!(err(&format!("{BASE}[[mapping]]\ntopic = \"a/+/b\"\n")).contains("+device"));
        assert!(err(&BASE.replace("hs_token = \"h\"", "hs_token = \"a\"")).contains("must differ"));
        assert!(err(&format!("{BASE}typo = 1\n")).contains("unknown field"));
    }
}
