-- Weft schema, version 10: read receipts. One row per (room, receipt
-- type, user, thread); `thread_id` is '' for an unthreaded receipt. A new
-- receipt replaces the old one and takes a new stream position, so /sync
-- finds what changed since a token by position.
CREATE TABLE receipts (
    room_id      TEXT NOT NULL,
    receipt_type TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    thread_id    TEXT NOT NULL DEFAULT '',
    event_id     TEXT NOT NULL,
    ts           INTEGER NOT NULL,
    position     INTEGER NOT NULL,
    PRIMARY KEY (room_id, receipt_type, user_id, thread_id)
);
CREATE INDEX receipts_room_position ON receipts (room_id, position);
CREATE INDEX receipts_position ON receipts (position);
