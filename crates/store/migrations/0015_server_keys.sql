-- Weft schema: other servers' signing keys (federation, docs/federation.md).
-- Every key a server ever published, kept after it expires (old events stay
-- verifiable): refetched when `valid_until_ts` has passed.
CREATE TABLE server_keys (
    server_name TEXT NOT NULL,
    key_id TEXT NOT NULL,
    -- Unpadded base64 of the ed25519 public key.
    public_key TEXT NOT NULL,
    -- Until when the key may be used to verify (ms since the epoch).
    valid_until_ts INTEGER NOT NULL,
    -- Set for a key the server lists under `old_verify_keys`.
    expired_ts INTEGER,
    fetched_ts INTEGER NOT NULL,
    PRIMARY KEY (server_name, key_id)
);
-- The newest key response of each server as it signed it, served again by
-- our notary endpoint (`/_matrix/key/v2/query`) with our signature added.
CREATE TABLE server_key_responses (
    server_name TEXT PRIMARY KEY,
    json TEXT NOT NULL,
    valid_until_ts INTEGER NOT NULL,
    fetched_ts INTEGER NOT NULL
);
