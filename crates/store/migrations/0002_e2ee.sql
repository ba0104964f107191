-- Weft schema, version 2: end-to-end-encryption keys and to-device messages.
-- See ../README.md for what each table is for.

-- Device identity keys, the JSON exactly as the device uploaded it
-- (signatures included). `position` is the stream position of the upload.
CREATE TABLE device_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    keys_json TEXT NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

-- Newest stream position at which each user's device list changed (keys
-- uploaded or changed, a device with keys deleted). Positions only grow.
CREATE TABLE device_list_changes (
    user_id TEXT PRIMARY KEY,
    position INTEGER NOT NULL
);
CREATE INDEX device_list_changes_by_pos ON device_list_changes (position);

-- Unclaimed one-time keys; `key_id` is "algorithm:id".
CREATE TABLE one_time_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key_json TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, algorithm, key_id)
);

-- One fallback key per (device, algorithm); handed out (and marked used)
-- when no one-time key is left, never deleted by a claim.
CREATE TABLE fallback_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id TEXT NOT NULL,
    key_json TEXT NOT NULL,
    used INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, device_id, algorithm)
);

-- Pending to-device messages, one row per recipient device, each at its own
-- stream position. Deleted once the device syncs with a token at or past it.
CREATE TABLE to_device (
    position INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    event_type TEXT NOT NULL,
    content_json TEXT NOT NULL
);
CREATE INDEX to_device_by_device ON to_device (user_id, device_id, position);

-- Transaction IDs of /sendToDevice requests, for idempotent retries.
CREATE TABLE to_device_txns (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    txn_id TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, event_type, txn_id)
);
