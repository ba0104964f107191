-- Weft schema: the rate-limit buckets several processes sharing one
-- database must share (docs/operations.md "State in one process's
-- memory"): failed password logins per account and per address, and
-- sign-in requests per address (crates/services/src/ratelimit.rs
-- `SharedLimiter`).
--
-- One row per bucket, as a generic cell rate algorithm: `tat_us` is the
-- bucket's "theoretical arrival time", in microseconds since the epoch.
-- A request at `now` is let through while `tat_us <= now + (burst - 1) *
-- interval`, and moves it to `max(tat_us, now) + interval`. A row whose
-- `tat_us` is in the past is a full bucket, the same as no row: those are
-- deleted now and then. `bucket` is a hash of the key (an account, an
-- address), never the key itself.
CREATE TABLE IF NOT EXISTS rate_buckets (
    bucket TEXT PRIMARY KEY,
    tat_us INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS rate_buckets_tat ON rate_buckets (tat_us);
