-- Weft schema: the outgoing federation queue and received transactions
-- (docs/federation.md "Sending: the outgoing queue", "Receiving transactions").

-- What is still to be sent to another server: PDUs (the stored PDU JSON)
-- and EDUs (`{"edu_type", "content"}`), in `id` order per destination. A row
-- is deleted once the destination accepted a transaction holding it.
-- AUTOINCREMENT: IDs are never reused, so transaction IDs made of them are
-- unique per destination across restarts.
CREATE TABLE federation_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    destination TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('pdu', 'edu')),
    json TEXT NOT NULL,
    queued_ms INTEGER NOT NULL
);
CREATE INDEX federation_outbox_by_destination ON federation_outbox (destination, kind, id);

-- Each destination's delivery state: when to try again after a failure,
-- the current backoff, why it last failed, when it last accepted one.
CREATE TABLE destinations (
    name TEXT PRIMARY KEY,
    retry_at_ms INTEGER NOT NULL DEFAULT 0,
    backoff_ms INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    last_success_ms INTEGER
);

-- Transactions received (`PUT /send/{txnId}`) and the answer given, so a
-- repeated one is answered the same without processing it again. Rows
-- older than a day are pruned when new ones are stored.
CREATE TABLE federation_txns_received (
    origin TEXT NOT NULL,
    txn_id TEXT NOT NULL,
    response_json TEXT NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (origin, txn_id)
);
CREATE INDEX federation_txns_received_by_time ON federation_txns_received (received_ms);
