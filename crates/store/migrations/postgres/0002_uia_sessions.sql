-- Weft schema: user-interactive auth sessions, as SQLite's 0021.
CREATE TABLE IF NOT EXISTS uia_sessions (
    session_id TEXT COLLATE "C" PRIMARY KEY,
    created_ms BIGINT NOT NULL,
    completed TEXT COLLATE "C" NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS uia_sessions_created ON uia_sessions (created_ms);
