-- Weft schema: push notifications. The push worker (services/push.rs)
-- reads the event stream in order and adds one `notifications` row per
-- (local user, event) whose push rules say notify; each row takes its own
-- stream position, so /sync wakes when a user's unread counts change and
-- pushers deliver rows in position order. `push_evaluated` in `meta` is
-- the last event position the worker has evaluated, written in the same
-- transaction as the rows it led to: a restart resumes there, without
-- losing or repeating any.
CREATE TABLE notifications (
    position       INTEGER PRIMARY KEY,
    user_id        TEXT NOT NULL,
    room_id        TEXT NOT NULL,
    event_id       TEXT NOT NULL,
    -- The event's stream position (receipts compare against it).
    event_position INTEGER NOT NULL,
    -- 'main' for the main timeline, else the thread root's event ID; ''
    -- for an invite of the user (pushed and listed, never counted unread).
    thread_id      TEXT NOT NULL,
    actions_json   TEXT NOT NULL,
    highlight      INTEGER NOT NULL,
    ts             INTEGER NOT NULL
);
CREATE INDEX notifications_user ON notifications (user_id, position);
CREATE INDEX notifications_user_room ON notifications (user_id, room_id, event_position);

-- HTTP pushers (`/pushers/set`). `last_sent` is the position of the last
-- notification row delivered to (or given up on by) the pusher: delivery
-- resumes after it, in order, across restarts.
CREATE TABLE pushers (
    user_id     TEXT NOT NULL,
    app_id      TEXT NOT NULL,
    pushkey     TEXT NOT NULL,
    -- The pusher as the client set it (the spec's Pusher object).
    pusher_json TEXT NOT NULL,
    -- When the pushkey was set (ms since the epoch).
    pushkey_ts  INTEGER NOT NULL,
    last_sent   INTEGER NOT NULL,
    -- The stream position when the pusher was added: notifications of
    -- events up to it are not sent (they predate the pusher).
    from_event  INTEGER NOT NULL,
    PRIMARY KEY (app_id, pushkey, user_id)
);
CREATE INDEX pushers_user ON pushers (user_id);

-- Events already in the database when push arrives are not evaluated.
INSERT OR REPLACE INTO meta (key, value)
    SELECT 'push_evaluated', CAST(COALESCE(MAX(position), 0) AS TEXT) FROM events;
