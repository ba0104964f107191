//! Token-bucket rate limiting, per user (or per IP before login).

use std::collections::HashMap;
use std::time::Instant;

use parking_lot::Mutex;
use weft_core::config::RateLimitConfig;
use weft_core::{Error, ErrorKind, Result};

pub struct RateLimiter {
    enabled: bool,
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    pub fn new(cfg: &RateLimitConfig) -> Self {
        Self {
            enabled: cfg.enabled && cfg.per_second > 0.0,
            rate: cfg.per_second,
            burst: cfg.burst.max(1.0),
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
        if buckets.len() > 100_000 {
            // Forget full buckets so memory stays bounded.
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rate < burst);
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
}
