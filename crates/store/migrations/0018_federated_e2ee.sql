-- Weft schema: end-to-end encryption across servers, and OpenID tokens.
-- See ../README.md for what each table is for.

-- Each change of a local device's keys (uploaded, changed, signed,
-- renamed, deleted), in order: `stream_id` is what m.device_list_update
-- EDUs and /user/devices call the device list's stream ID; `position` the
-- stream position the change was announced at (`StreamKey::DeviceKeys`).
CREATE TABLE device_list_log (
    stream_id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    deleted INTEGER NOT NULL
);
CREATE INDEX device_list_log_by_user ON device_list_log (user_id, position);

-- Users of other servers whose device lists are cached: the stream ID of
-- the newest update applied (NULL: unknown, the list came from
-- /user/keys/query), and whether it is known to be out of date.
CREATE TABLE remote_device_lists (
    user_id TEXT PRIMARY KEY,
    stream_id INTEGER,
    stale INTEGER NOT NULL DEFAULT 0,
    fetched_ms INTEGER NOT NULL
);

-- Their devices, the keys JSON as their server sent it.
CREATE TABLE remote_device_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    keys_json TEXT,
    display_name TEXT,
    PRIMARY KEY (user_id, device_id)
);

-- Their cross-signing keys ('master', 'self_signing').
CREATE TABLE remote_cross_signing_keys (
    user_id TEXT NOT NULL,
    key_type TEXT NOT NULL,
    key_json TEXT NOT NULL,
    PRIMARY KEY (user_id, key_type)
);

-- OpenID tokens issued to local users (/user/{userId}/openid/request_token),
-- checked by other servers through /openid/userinfo until they expire.
CREATE TABLE openid_tokens (
    token TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    expires_ms INTEGER NOT NULL
);
