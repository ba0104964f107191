-- Weft schema: rate-limit buckets shared by processes, as SQLite's 0022.
CREATE TABLE IF NOT EXISTS rate_buckets (
    bucket TEXT COLLATE "C" PRIMARY KEY,
    tat_us BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS rate_buckets_tat ON rate_buckets (tat_us);
