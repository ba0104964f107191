-- Weft schema, version 3: cross-signing keys and signatures uploaded for
-- keys. See ../README.md for what each table is for.

-- A user's cross-signing keys ('master', 'self_signing', 'user_signing'),
-- the JSON exactly as uploaded.
CREATE TABLE cross_signing_keys (
    user_id TEXT NOT NULL,
    key_type TEXT NOT NULL,
    key_json TEXT NOT NULL,
    PRIMARY KEY (user_id, key_type)
);

-- Signatures uploaded later for a device's keys (target = device ID) or a
-- cross-signing key (target = its public key), merged in when keys are queried.
CREATE TABLE key_signatures (
    target_user TEXT NOT NULL,
    target_key TEXT NOT NULL,
    signer_user TEXT NOT NULL,
    signer_key TEXT NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (target_user, target_key, signer_user, signer_key)
);
