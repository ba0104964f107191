-- The room DAG's bookkeeping, compacted (issue #10: the send path lost a
-- third of its throughput to it). Each local event used to add about
-- seven rows to B-trees keyed by event ID (random hashes), so each group
-- commit wrote many more WAL pages. Now a local event writes no row
-- beyond its own and an update of its room's row:
--
-- * An event's prev events and auth events are read from its PDU JSON
--   (`events.pdu_json`, `$.prev_events` / `$.auth_events`; redaction keeps
--   both), so `event_edges` and `event_auth` go.
-- * The one question that needed edges by their target, "does a stored
--   event already point at this new event?" (an event fetched late is no
--   forward extremity), can only be answered yes for an edge whose target
--   was not stored when the edge was: `dangling_prevs` keeps just those
--   (from remote events with a gap before them), and loses each row once
--   its target is stored. A local event's prev events are always stored.
-- * A room's forward extremities live in its row (`rooms.extremities`, a
--   JSON array of event IDs; one entry while the room is linear).

CREATE TABLE dangling_prevs (
    prev_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (prev_id, event_id)
) WITHOUT ROWID;
INSERT OR IGNORE INTO dangling_prevs (prev_id, event_id)
    SELECT g.prev_id, g.event_id FROM event_edges g
    WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = g.prev_id);

ALTER TABLE rooms ADD COLUMN extremities TEXT NOT NULL DEFAULT '[]';
UPDATE rooms SET extremities = COALESCE(
    (SELECT json_group_array(x.event_id) FROM room_extremities x WHERE x.room_id = rooms.room_id),
    '[]');

DROP TABLE room_extremities;
DROP TABLE event_auth;
DROP INDEX event_edges_by_prev;
DROP TABLE event_edges;
