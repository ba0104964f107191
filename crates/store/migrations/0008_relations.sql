-- Weft schema, version 8: relations between events (`m.relates_to`:
-- threads, edits, reactions, replies in threads), for
-- `/rooms/{id}/relations/…` and `/rooms/{id}/threads`.
CREATE TABLE relations (
    position INTEGER PRIMARY KEY,
    room_id TEXT NOT NULL,
    parent_event_id TEXT NOT NULL,
    rel_type TEXT NOT NULL,
    event_type TEXT NOT NULL,
    sender TEXT NOT NULL
);
CREATE INDEX relations_by_parent ON relations (parent_event_id, rel_type, position);
CREATE INDEX relations_threads ON relations (room_id, rel_type, position);

-- Relations of the events stored before this version (redacted events
-- have lost theirs with their content).
INSERT INTO relations (position, room_id, parent_event_id, rel_type, event_type, sender)
SELECT position, room_id,
       json_extract(pdu_json, '$.content."m.relates_to".event_id'),
       json_extract(pdu_json, '$.content."m.relates_to".rel_type'),
       event_type, sender
FROM events
WHERE redacted_by IS NULL
  AND json_valid(pdu_json)
  AND json_type(pdu_json, '$.content."m.relates_to".event_id') = 'text'
  AND json_type(pdu_json, '$.content."m.relates_to".rel_type') = 'text';
