//! Retry delays: exponential in the attempt number, capped, with multiplicative jitter so that
//! jobs that failed together do not retry together. The delay is written to `jobs.run_at`, never
//! slept in memory, so it survives a worker restart.

use std::time::Duration;

use rand::RngExt;

/// A per-kind retry policy: `min(max, base * 2^(attempt-1)) * (1 ± jitter)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay after the first failed attempt.
    pub base: Duration,
    /// Upper bound before jitter.
    pub max: Duration,
    /// Relative spread, 0.0 to 1.0 (0.25 means ±25 %).
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(3600),
            jitter: 0.25,
        }
    }
}

impl Backoff {
    /// The delay after `attempt` (1-based) failed, for a uniform random `unit` in [0, 1).
    /// Pure, so tests pass the randomness in.
    pub fn delay_with(&self, attempt: i32, unit: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).clamp(0, 62) as u32;
        let raw = self
            .base
            .checked_mul(1u32.checked_shl(exponent.min(31)).unwrap_or(u32::MAX))
            .unwrap_or(self.max);
        let capped = raw.min(self.max);
        let jitter = self.jitter.clamp(0.0, 1.0);
        let factor = 1.0 + jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        capped.mul_f64(factor.max(0.0))
    }

    /// The delay after `attempt` failed, with fresh randomness.
    pub fn delay(&self, attempt: i32) -> Duration {
        let unit: f64 = rand::rng().random();
        self.delay_with(attempt, unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_then_caps() {
        let b = Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
            jitter: 0.0,
        };
        assert_eq!(b.delay_with(1, 0.5), Duration::from_secs(1));
        assert_eq!(b.delay_with(2, 0.5), Duration::from_secs(2));
        assert_eq!(b.delay_with(4, 0.5), Duration::from_secs(8));
        assert_eq!(b.delay_with(7, 0.5), Duration::from_secs(60));
        assert_eq!(b.delay_with(1000, 0.5), Duration::from_secs(60));
    }

    #[test]
    fn jitter_spreads_within_bounds() {
        let b = Backoff {
            base: Duration::from_secs(10),
            max: Duration::from_secs(60),
            jitter: 0.25,
        };
        assert_eq!(b.delay_with(1, 0.0), Duration::from_millis(7500));
        assert_eq!(b.delay_with(1, 1.0), Duration::from_millis(12500));
        for _ in 0..100 {
            let d = b.delay(1);
            assert!(d >= Duration::from_millis(7500) && d <= Duration::from_millis(12500));
        }
    }
}
