//! Token-bucket rate limiting: per user (or per IP before login) in this
//! process's memory ([`RateLimiter`]), and the sign-in buckets (failed
//! logins, sign-in requests) in the database, shared by every process
//! ([`SharedLimiter`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use weft_core::config::RateLimitConfig;
use weft_core::{Error, ErrorKind, Result};
use weft_store::Store;

/// Buckets kept at most; past it full buckets are forgotten, and if that
/// is not enough, all of them (memory stays bounded under a flood of keys).
const MAX_BUCKETS: usize = 100_000;

pub struct RateLimiter {
    enabled: bool,
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// The general limiter: `per_second` and `burst` of `[rate_limit]`.
    pub fn new(cfg: &RateLimitConfig) -> Self {
        Self::with(cfg.enabled, cfg.per_second, cfg.burst)
    }

    pub fn with(enabled: bool, per_second: f64, burst: f64) -> Self {
        Self {
            enabled: enabled && per_second > 0.0,
            rate: per_second,
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request from `key`'s bucket, or says how long to wait.
    pub fn check(&self, key: &str) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock();
        if buckets.len() > MAX_BUCKETS && !buckets.contains_key(key) {
            // Forget full buckets so memory stays bounded.
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rate < burst);
            if buckets.len() > MAX_BUCKETS {
                buckets.clear();
            }
        }
        let (tokens, at) = buckets.entry(key.to_owned()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(limited(((1.0 - *tokens) / self.rate * 1000.0).ceil() as u64))
        }
    }
}

fn limited(retry_after_ms: u64) -> Error {
    Error::new(
        ErrorKind::LimitExceeded {
            retry_after_ms: retry_after_ms.max(1),
        },
        "Too many requests",
    )
}

/// Full buckets are deleted from the database at most this often per
/// process.
const PRUNE_EVERY_MS: u64 = 60_000;

/// A limiter whose buckets are rows of the database (`rate_buckets`,
/// [`Store::take_rate_token`]), so the processes sharing it take from the
/// same ones: the sign-in limits, which N processes must not multiply by
/// N (brute-force protection). A check is one write, which a sign-in can
/// afford (a password check costs an argon2 hash) and a general request
/// cannot: those stay with [`RateLimiter`] (docs/scale-out.md).
pub struct SharedLimiter {
    store: Arc<dyn Store>,
    /// Names this limiter's buckets apart from other limiters' with the
    /// same keys.
    name: &'static str,
    enabled: bool,
    /// Microseconds between two requests at the sustained rate.
    interval_us: i64,
    /// How far ahead of now a bucket's arrival time may be: (burst - 1)
    /// intervals.
    tolerance_us: i64,
    /// When this process last deleted full buckets (ms since the epoch).
    pruned_ms: AtomicU64,
}

impl SharedLimiter {
    /// The failed-login limiter: `failed_login_per_second` and
    /// `failed_login_burst` of `[rate_limit]`.
    pub fn failed_logins(store: Arc<dyn Store>, cfg: &RateLimitConfig) -> Self {
        Self::with(
            store,
            "failed-login",
            cfg.enabled,
            cfg.failed_login_per_second,
            cfg.failed_login_burst,
        )
    }

    /// The sign-in limiter: `login_per_second` and `login_burst` of
    /// `[rate_limit]`, one bucket per client address.
    pub fn logins(store: Arc<dyn Store>, cfg: &RateLimitConfig) -> Self {
        Self::with(store, "sign-in", cfg.enabled, cfg.login_per_second, cfg.login_burst)
    }

    pub fn with(store: Arc<dyn Store>, name: &'static str, enabled: bool, per_second: f64, burst: f64) -> Self {
        let enabled = enabled && per_second > 0.0 && per_second.is_finite();
        let interval_us = if enabled {
            (1e6 / per_second).ceil().min(i64::MAX as f64) as i64
        } else {
            0
        };
        let tolerance = (burst.max(1.0) - 1.0) * interval_us as f64;
        Self {
            store,
            name,
            enabled,
            interval_us: interval_us.max(1),
            tolerance_us: tolerance.min(i64::MAX as f64) as i64,
            pruned_ms: AtomicU64::new(weft_core::now_ms()),
        }
    }

    /// The row of `key`'s bucket: a hash, so no account name or address is
    /// stored, and any key fits.
    fn bucket(&self, key: &str) -> String {
        let digest = Sha256::new()
            .chain_update(self.name)
            .chain_update([0])
            .chain_update(key)
            .finalize();
        digest[..16].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Takes one request from `key`'s bucket, or says how long to wait.
    pub async fn check(&self, key: &str) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        self.prune_now_and_then().await;
        match self
            .store
            .take_rate_token(&self.bucket(key), self.interval_us, self.tolerance_us)
            .await?
        {
            None => Ok(()),
            Some(wait_us) => Err(limited(wait_us.div_ceil(1000))),
        }
    }

    /// Gives back the request [`SharedLimiter::check`] took from `key`'s
    /// bucket (e.g. a login attempt that turned out to succeed).
    pub async fn refund(&self, key: &str) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        self.store.refund_rate_token(&self.bucket(key), self.interval_us).await
    }

    /// Deletes the full buckets, at most once per [`PRUNE_EVERY_MS`] in
    /// this process (bookkeeping: a failure is logged, never fails the
    /// request).
    async fn prune_now_and_then(&self) {
        let now = weft_core::now_ms();
        let last = self.pruned_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < PRUNE_EVERY_MS
            || self
                .pruned_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        if let Err(e) = self.store.prune_rate_buckets().await {
            tracing::warn!("deleting full rate-limit buckets: {}", e.message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_refusals() {
        let l = RateLimiter::with(true, 0.001, 2.0);
        l.check("a").unwrap();
        l.check("a").unwrap();
        assert!(l.check("a").is_err());
        // Other keys have their own bucket.
        l.check("b").unwrap();
    }
}
