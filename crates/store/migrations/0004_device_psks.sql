-- Weft schema, version 4: pre-shared keys for the CoAP door's DTLS
-- listener. See ../README.md for what each table is for.

-- One DTLS pre-shared key per device. Unlike access tokens the key itself
-- is stored (the DTLS handshake needs it), so this table is as sensitive
-- as the keys. Deleting the device (logout, device deletion, deactivation)
-- deletes its key with it.
CREATE TABLE device_psks (
    identity TEXT NOT NULL UNIQUE,
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    psk BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_id),
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
);
