-- Weft schema: state shared by processes (UIA sessions, live MQTT client IDs), as SQLite's 0021.
CREATE TABLE IF NOT EXISTS uia_sessions (
    session_id TEXT COLLATE "C" PRIMARY KEY,
    created_ms BIGINT NOT NULL,
    completed TEXT COLLATE "C" NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS uia_sessions_created ON uia_sessions (created_ms);

-- The MQTT door's live client IDs, as SQLite's 0021.
CREATE TABLE IF NOT EXISTS mqtt_clients (
    client_key TEXT COLLATE "C" PRIMARY KEY,
    owner TEXT COLLATE "C" NOT NULL,
    since_ms BIGINT NOT NULL
);
