//! Token-bucket rate limiting, per user (or per IP before login), and the
//! stricter buckets for failed logins.

use std::collections::HashMap;
use std::time::Instant;

use parking_lot::Mutex;
use weft_core::config::RateLimitConfig;
use weft_core::{Error, ErrorKind, Result};

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

    /// The failed-login limiter: `failed_login_per_second` and
    /// `failed_login_burst` of `[rate_limit]`.
    pub fn failed_logins(cfg: &RateLimitConfig) -> Self {
        Self::with(cfg.enabled, cfg.failed_login_per_second, cfg.failed_login_burst)
    }

    /// The sign-in limiter: `login_per_second` and `login_burst` of
    /// `[rate_limit]`, one bucket per client address.
    pub fn logins(cfg: &RateLimitConfig) -> Self {
        Self::with(cfg.enabled, cfg.login_per_second, cfg.login_burst)
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
            let wait = ((1.0 - *tokens) / self.rate * 1000.0).ceil() as u64;
            Err(Error::new(
                ErrorKind::LimitExceeded {
                    retry_after_ms: wait.max(1),
                },
                "Too many requests",
            ))
        }
    }

    /// Gives back the request [`RateLimiter::check`] took from `key`'s
    /// bucket (e.g. a login attempt that turned out to succeed).
    pub fn refund(&self, key: &str) {
        if !self.enabled {
            return;
        }
        if let Some((tokens, _)) = self.buckets.lock().get_mut(key) {
            *tokens = (*tokens + 1.0).min(self.burst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refund_gives_back_one_request() {
        let l = RateLimiter::with(true, 0.001, 2.0);
        l.check("a").unwrap();
        l.check("a").unwrap();
        assert!(l.check("a").is_err());
        l.refund("a");
        l.check("a").unwrap();
        assert!(l.check("a").is_err());
        // Other keys have their own bucket.
        l.check("b").unwrap();
    }
}
