-- Weft schema, version 11: typing notifications and presence, kept in the
-- database (not in one process's memory) so every process sharing it sees
-- them. Each change (start, stop, expiry; a new presence state) takes a
-- stream position, so /sync finds what changed since a token by position.

-- Who types where, until when (ms since the epoch). A row past its
-- `expires_ms` no longer counts; the expiry task deletes it.
CREATE TABLE typing (
    room_id    TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    expires_ms INTEGER NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX typing_expires ON typing (expires_ms);

-- The stream position of the last change of each room's typers.
CREATE TABLE typing_rooms (
    room_id  TEXT PRIMARY KEY,
    position INTEGER NOT NULL
);
CREATE INDEX typing_rooms_position ON typing_rooms (position);

-- One row per user who ever set presence (or synced with presence on).
-- `online_until_ms`: past it (no sync since) the user goes offline; 0: no
-- such deadline.
CREATE TABLE presence (
    user_id         TEXT PRIMARY KEY,
    presence        TEXT NOT NULL,
    status_msg      TEXT,
    last_active_ms  INTEGER NOT NULL,
    online_until_ms INTEGER NOT NULL,
    position        INTEGER NOT NULL
);
CREATE INDEX presence_position ON presence (position);
