-- Weft schema: simplified sliding sync (MSC4186) connections. One row per
-- (user, device, conn_id): what the server has told that connection (which
-- rooms, up to which stream position, at which of its responses), as JSON
-- the services read and write. Kept in the database, not in one process's
-- memory, so any process sharing it can answer the connection's next
-- request. Deleted with the device.
CREATE TABLE sliding_sync_connections (
    user_id    TEXT NOT NULL,
    device_id  TEXT NOT NULL,
    conn_id    TEXT NOT NULL,
    state_json TEXT NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_id, conn_id)
);
