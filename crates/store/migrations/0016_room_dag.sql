-- Rooms as DAGs (federation, docs/design-federation.md). Existing rooms are
-- linear chains: their edges, depths and extremities come from the stored
-- PDUs below; their state groups are built by the Rust step that runs
-- after this file (crates/store/src/sqlite/graph.rs, `fill_state_groups`).

-- depth: the PDU's depth (topological order, beside the stream order of
-- `position`). outlier: stored without the state before it (from a join's
-- auth chain or state, or fetched alone), not part of the timeline.
-- rejected: why the event failed its authorization (never served as
-- timeline, never state). soft_failed: passed auth at its own state but
-- not at the room's current state (kept, not served, not an extremity).
-- state_before / state_after: the state groups of the room's state before
-- and after the event (equal for a non-state or rejected event).
ALTER TABLE events ADD COLUMN depth INTEGER NOT NULL DEFAULT 0;
ALTER TABLE events ADD COLUMN outlier INTEGER NOT NULL DEFAULT 0;
ALTER TABLE events ADD COLUMN rejected TEXT;
ALTER TABLE events ADD COLUMN soft_failed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE events ADD COLUMN state_before INTEGER;
ALTER TABLE events ADD COLUMN state_after INTEGER;
UPDATE events SET depth = COALESCE(json_extract(pdu_json, '$.depth'), 0);

-- The DAG's edges: each event's prev_events.
CREATE TABLE event_edges (
    event_id TEXT NOT NULL,
    prev_id TEXT NOT NULL,
    PRIMARY KEY (event_id, prev_id)
);
CREATE INDEX event_edges_by_prev ON event_edges (prev_id);
INSERT OR IGNORE INTO event_edges (event_id, prev_id)
    SELECT e.event_id, p.value FROM events e, json_each(e.pdu_json, '$.prev_events') p;

-- Each event's auth_events (for auth chains: `/event_auth`, `/state_ids`,
-- state resolution).
CREATE TABLE event_auth (
    event_id TEXT NOT NULL,
    auth_id TEXT NOT NULL,
    PRIMARY KEY (event_id, auth_id)
);
INSERT OR IGNORE INTO event_auth (event_id, auth_id)
    SELECT e.event_id, a.value FROM events e, json_each(e.pdu_json, '$.auth_events') a;

-- The room's forward extremities: events nothing points at yet, which the
-- next local event is built on.
CREATE TABLE room_extremities (
    room_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (room_id, event_id)
);
INSERT INTO room_extremities (room_id, event_id)
    SELECT room_id, event_id FROM events
    WHERE position IN (SELECT MAX(position) FROM events GROUP BY room_id);

-- State groups: a state is a delta (`state_group_entries`) on its
-- `prev_group`, or a full snapshot (`prev_group` NULL). `chain` counts the
-- deltas down to the snapshot; a new group past 100 is a snapshot, so a
-- state is read from at most ~100 groups.
CREATE TABLE state_groups (
    id INTEGER PRIMARY KEY,
    room_id TEXT NOT NULL,
    prev_group INTEGER,
    chain INTEGER NOT NULL
);
CREATE TABLE state_group_entries (
    group_id INTEGER NOT NULL,
    event_type TEXT NOT NULL,
    state_key TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (group_id, event_type, state_key)
);

-- The group of each room's current state (the resolved state at its
-- forward extremities).
ALTER TABLE rooms ADD COLUMN state_group INTEGER;

-- `state_events` becomes the log of changes to the current state: at
-- stream position `position`, the key came to point at the event at
-- `event_position` (the same event for a local linear room; an older or
-- outlier event when state resolution or a join chose it).
ALTER TABLE state_events ADD COLUMN event_position INTEGER;
UPDATE state_events SET event_position = position;

-- The room state an invite from another server showed (stripped state
-- events as JSON), for a room this server is not in: what `/sync` shows
-- the invited user.
CREATE TABLE remote_invites (
    room_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    state_json TEXT NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
