-- Weft schema, version 9: full-text search over what `/search` looks at
-- (`content.body` of messages, `content.name` and `content.topic` of
-- room names and topics). Contentless: the text is in `events`; the rowid
-- is the event's position.
CREATE VIRTUAL TABLE event_search USING fts5(
    body, name, topic,
    content = '',
    contentless_delete = 1,
    tokenize = 'unicode61 remove_diacritics 2'
);

INSERT INTO event_search (rowid, body, name, topic)
SELECT position,
       CASE WHEN event_type = 'm.room.message' THEN json_extract(pdu_json, '$.content.body') END,
       CASE WHEN event_type = 'm.room.name' THEN json_extract(pdu_json, '$.content.name') END,
       CASE WHEN event_type = 'm.room.topic' THEN json_extract(pdu_json, '$.content.topic') END
FROM events
WHERE redacted_by IS NULL
  AND json_valid(pdu_json)
  AND ((event_type = 'm.room.message' AND json_type(pdu_json, '$.content.body') = 'text')
    OR (event_type = 'm.room.name' AND json_type(pdu_json, '$.content.name') = 'text')
    OR (event_type = 'm.room.topic' AND json_type(pdu_json, '$.content.topic') = 'text'));
