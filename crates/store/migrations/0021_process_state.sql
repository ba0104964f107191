-- Weft schema: state several processes sharing one database must share
-- (docs/operations.md "State in one process's memory").
--
-- User-interactive auth sessions, so the requests of one flow (e.g.
-- /register, /delete_devices) may reach different processes. A session lives an hour from
-- its creation; `completed` is the JSON array of stages done.
CREATE TABLE IF NOT EXISTS uia_sessions (
    session_id TEXT PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    completed TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS uia_sessions_created ON uia_sessions (created_ms);

-- The MQTT door's live client IDs (docs/mqtt.md): which connection, of
-- which process, holds each (user, client ID), so a client connecting to
-- another process takes the session over ([MQTT-3.1.4-2]). `owner` is
-- "PROCESS-NONCE/CONNECTION"; the row goes when that connection ends.
CREATE TABLE IF NOT EXISTS mqtt_clients (
    client_key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    since_ms INTEGER NOT NULL
);
