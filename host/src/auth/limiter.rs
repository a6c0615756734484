//! A limit on failed authentications per client address: past `limit` failures in
//! a window, the address is refused until the window ends, good credentials or not.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sync::lock;

/// Addresses tracked at most; past it, windows that have ended are dropped.
const TRACKED: usize = 10_000;

pub struct FailureLimiter {
    limit: u32,
    window: Duration,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl FailureLimiter {
    pub fn new(limit: u32, window: Duration) -> FailureLimiter {
        FailureLimiter {
            limit,
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(wait)` while `address` is over its limit.
    pub fn check(&self, address: IpAddr) -> Result<(), Duration> {
        let failures = lock(&self.failures);
        match failures.get(&address) {
            Some((start, count)) if *count >= self.limit => {
                let elapsed = start.elapsed();
                if elapsed < self.window {
                    Err(self.window - elapsed)
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }

    pub fn record_failure(&self, address: IpAddr) {
        let mut failures = lock(&self.failures);
        if failures.len() >= TRACKED {
            let window = self.window;
            failures.retain(|_, (start, _)| start.elapsed() < window);
        }
        let entry = failures.entry(address).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= self.window {
            *entry = (Instant::now(), 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_over_its_limit_waits_out_the_window_and_others_do_not() {
        let limiter = FailureLimiter::new(3, Duration::from_millis(200));
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        for _ in 0..3 {
            assert!(limiter.check(a).is_ok());
            limiter.record_failure(a);
        }
        assert!(limiter.check(a).is_err());
        assert!(limiter.check(b).is_ok());
        std::thread::sleep(Duration::from_millis(250));
        assert!(limiter.check(a).is_ok());
        limiter.record_failure(a);
        assert!(limiter.check(a).is_ok(), "a new window starts from zero");
    }
}
