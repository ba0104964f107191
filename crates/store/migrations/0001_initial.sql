-- Weft schema, version 1. See ../README.md for what each table is for.
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

CREATE TABLE users (
    user_id TEXT PRIMARY KEY,
    password_hash TEXT,
    admin INTEGER NOT NULL DEFAULT 0,
    deactivated INTEGER NOT NULL DEFAULT 0,
    displayname TEXT,
    avatar_url TEXT,
    created_ms INTEGER NOT NULL
);

CREATE TABLE devices (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    display_name TEXT,
    token_hash BLOB UNIQUE,
    last_seen_ms INTEGER,
    PRIMARY KEY (user_id, device_id)
);

CREATE TABLE filters (
    user_id TEXT NOT NULL,
    filter_id INTEGER NOT NULL,
    filter_json TEXT NOT NULL,
    PRIMARY KEY (user_id, filter_id)
);

CREATE TABLE account_data (
    user_id TEXT NOT NULL,
    room_id TEXT NOT NULL DEFAULT '',
    data_type TEXT NOT NULL,
    content_json TEXT NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (user_id, room_id, data_type)
);
CREATE INDEX account_data_by_pos ON account_data (user_id, position);

CREATE TABLE rooms (
    room_id TEXT PRIMARY KEY,
    room_version TEXT NOT NULL,
    creator TEXT NOT NULL,
    is_public INTEGER NOT NULL DEFAULT 0
);

-- Every persisted event; `position` is its place in the server-wide stream.
CREATE TABLE events (
    position INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    room_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    state_key TEXT,
    sender TEXT NOT NULL,
    origin_server_ts INTEGER NOT NULL,
    pdu_json TEXT NOT NULL,
    redacted_by TEXT,
    txn_device TEXT,
    txn_id TEXT
);
CREATE INDEX events_by_room ON events (room_id, position);

-- History of state: one row per state event. `detail` holds the membership
-- of m.room.member and the visibility of m.room.history_visibility, so
-- membership and visibility at any position are one indexed query.
CREATE TABLE state_events (
    room_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    state_key TEXT NOT NULL,
    position INTEGER NOT NULL,
    detail TEXT,
    PRIMARY KEY (room_id, event_type, state_key, position)
);
CREATE INDEX state_events_by_pos ON state_events (room_id, position);

-- Current state of each room: the newest row of state_events per key.
CREATE TABLE current_state (
    room_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    state_key TEXT NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (room_id, event_type, state_key)
);

-- Current membership of every user in every room, for "my rooms" lookups.
CREATE TABLE memberships (
    room_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    membership TEXT NOT NULL,
    event_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX memberships_by_user ON memberships (user_id);

CREATE TABLE txns (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    -- Transactions are scoped like request paths: room and event type.
    room_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    txn_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, room_id, event_type, txn_id)
);

CREATE TABLE forgotten (
    user_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    PRIMARY KEY (user_id, room_id)
);

CREATE TABLE aliases (
    alias TEXT PRIMARY KEY,
    room_id TEXT NOT NULL,
    creator TEXT NOT NULL
);
CREATE INDEX aliases_by_room ON aliases (room_id);
