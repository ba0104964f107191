-- Weft schema, version 7: content and user reports (`/rooms/{id}/report`,
-- `/users/{id}/report`), for the operator (`weft report list`).
CREATE TABLE reports (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    reporter TEXT NOT NULL,
    room_id TEXT,
    event_id TEXT,
    target_user TEXT,
    reason TEXT,
    received_ms INTEGER NOT NULL
);
