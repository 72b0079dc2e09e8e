//! Per-tenant request rate limits: a token bucket per tenant holding up to `burst` requests and
//! refilling at `requests_per_minute / 60` per second. A refused request learns how long until
//! the next token (the `Retry-After` header). Hand-written because the bucket's parameters
//! change at run time with the tenant's quotas and the whole thing is a dozen lines.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    /// Takes one token from `tenant`'s bucket, or says how long until one is available.
    pub fn check(&self, tenant: &str, per_minute: u32, burst: u32) -> Result<(), Duration> {
        self.check_at(tenant, per_minute, burst, Instant::now())
    }

    fn check_at(
        &self,
        tenant: &str,
        per_minute: u32,
        burst: u32,
        now: Instant,
    ) -> Result<(), Duration> {
        let rate = per_minute.max(1) as f64 / 60.0;
        let cap = burst.max(1) as f64;
        let mut g = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = g.entry(tenant.to_string()).or_insert(Bucket {
            tokens: cap,
            last: now,
        });
        let dt = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + dt * rate).min(cap);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
        }
    }

    pub fn forget(&self, tenant: &str) {
        self.buckets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tenant);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_bursts_then_refills() {
        let r = RateLimiter::default();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(r.check_at("a", 60, 3, t0).is_ok());
        }
        let wait = r.check_at("a", 60, 3, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-6);
        // Other tenants have their own bucket.
        assert!(r.check_at("b", 60, 3, t0).is_ok());
        // One second refills one request at 60/min.
        let t1 = t0 + Duration::from_secs(1);
        assert!(r.check_at("a", 60, 3, t1).is_ok());
        assert!(r.check_at("a", 60, 3, t1).is_err());
        // Refill is capped at the burst.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(r.check_at("a", 60, 3, t2).is_ok());
        }
        assert!(r.check_at("a", 60, 3, t2).is_err());
    }
}
