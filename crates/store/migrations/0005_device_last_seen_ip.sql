-- Weft schema, version 5: the address a device was last seen from, shown
-- by `GET /devices` as `last_seen_ip` next to `last_seen_ts`.
ALTER TABLE devices ADD COLUMN last_seen_ip TEXT;
