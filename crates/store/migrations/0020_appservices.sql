-- Weft schema: application services' delivery state (docs/appservices.md).
-- One row per registered service (by its registration `id`): the stream
-- position delivered up to, and the transaction being delivered (its ID,
-- body and the position it covers), kept until the service accepted it so
-- a retry, even after a restart, sends the same transaction again.
CREATE TABLE IF NOT EXISTS appservice_state (
    id TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    next_txn INTEGER NOT NULL DEFAULT 1,
    pending_upto INTEGER,
    pending_body TEXT,
    retry_at_ms INTEGER NOT NULL DEFAULT 0,
    backoff_ms INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    last_success_ms INTEGER
);
