-- Weft schema, version 6: server-side key backup (`/room_keys`). See
-- ../README.md for what each table is for.

-- Each user's backup versions; the highest one not deleted is current.
-- `etag` changes whenever the version's keys change.
CREATE TABLE backup_versions (
    user_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    algorithm_json TEXT NOT NULL,
    etag INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, version)
);

-- The backed-up room keys of one version: `key_json` is the client's
-- KeyBackupData verbatim; the three columns beside it decide which of two
-- copies of a session is kept.
CREATE TABLE backup_keys (
    user_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    room_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    first_message_index INTEGER NOT NULL,
    forwarded_count INTEGER NOT NULL,
    is_verified INTEGER NOT NULL,
    key_json TEXT NOT NULL,
    PRIMARY KEY (user_id, version, room_id, session_id)
);
