-- Weft schema: user-interactive auth sessions (docs/operations.md), in the
-- database so the requests of one flow (e.g. /register, /delete_devices)
-- may reach different processes sharing it. A session lives an hour from
-- its creation; `completed` is the JSON array of stages done.
CREATE TABLE IF NOT EXISTS uia_sessions (
    session_id TEXT PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    completed TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS uia_sessions_created ON uia_sessions (created_ms);
