//! The per-runbook circuit breaker, as pure transitions over the `circuit_breakers` row.
//!
//! Exactly the schema document's transitions:
//! - closed -> open after `failure_threshold` consecutive failures;
//! - open -> half_open once `reset_timeout_seconds` have passed since it opened (checked when an
//!   execution asks to be admitted);
//! - half_open -> closed after `success_threshold` consecutive successes;
//! - half_open -> open on any failure.
//!
//! While half_open only as many probe executions are admitted at once as successes are still
//! needed, so a broken remediation cannot run everywhere the moment the timeout passes.

use chrono::{DateTime, Duration, Utc};

/// `circuit_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Runs are admitted.
    Closed,
    /// Runs are refused until the reset timeout passes.
    Open,
    /// A limited number of probe runs are admitted.
    HalfOpen,
}

impl CircuitState {
    /// The enum label in PostgreSQL.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }

    /// Parses the enum label (unknown labels read as open: fail safe).
    pub fn parse(s: &str) -> CircuitState {
        match s {
            "closed" => CircuitState::Closed,
            "half_open" => CircuitState::HalfOpen,
            _ => CircuitState::Open,
        }
    }
}

/// The breaker's data, mirroring the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breaker {
    /// State.
    pub state: CircuitState,
    /// Consecutive failures.
    pub failure_count: i32,
    /// Consecutive successes while half_open.
    pub success_count: i32,
    /// Most recent failure.
    pub last_failure_at: Option<DateTime<Utc>>,
    /// When it last opened.
    pub opened_at: Option<DateTime<Utc>>,
    /// When it last became half_open.
    pub half_open_at: Option<DateTime<Utc>>,
    /// Failures before opening.
    pub failure_threshold: i32,
    /// Successes before closing.
    pub success_threshold: i32,
    /// Time in open before half_open.
    pub reset_timeout: Duration,
}

/// The answer to "may this execution run?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Closed: run.
    Allowed,
    /// Half-open: run as a probe.
    Probe,
    /// Refused, with a sentence saying why and when to expect a probe.
    Refused(String),
}

impl Breaker {
    /// A closed breaker with the default thresholds (5 failures, 3 successes, 300 s).
    pub fn new() -> Breaker {
        Breaker {
            state: CircuitState::Closed,
            failure_count: 0,
            success_count: 0,
            last_failure_at: None,
            opened_at: None,
            half_open_at: None,
            failure_threshold: 5,
            success_threshold: 3,
            reset_timeout: Duration::seconds(300),
        }
    }

    /// Asks to admit an execution; `probes_in_flight` counts admitted half-open probes that have
    /// not finished. May move open -> half_open.
    pub fn admit(&mut self, now: DateTime<Utc>, probes_in_flight: i64) -> Admission {
        self.elapse(now);
        if self.state == CircuitState::Open {
            let opened = self.opened_at.unwrap_or(now);
            return Admission::Refused(format!(
                "circuit breaker is open after {} consecutive failures; probes resume at {}",
                self.failure_count,
                (opened + self.reset_timeout).to_rfc3339()
            ));
        }
        match self.state {
            CircuitState::Closed => Admission::Allowed,
            CircuitState::HalfOpen => {
                let needed = i64::from((self.success_threshold - self.success_count).max(1));
                if probes_in_flight < needed {
                    Admission::Probe
                } else {
                    Admission::Refused(format!(
                        "circuit breaker is half-open and already has {probes_in_flight} probe(s) running"
                    ))
                }
            }
            // Unreachable: open either became half_open above or returned.
            CircuitState::Open => Admission::Refused("circuit breaker is open".to_owned()),
        }
    }

    /// open -> half_open once the reset timeout has passed, at the instant it passed: the
    /// stored row stays `open` until something reads it, and what is read (an admission or an
    /// outcome) sees the state the breaker has been in since.
    fn elapse(&mut self, now: DateTime<Utc>) {
        if self.state == CircuitState::Open {
            let resumes = self.opened_at.unwrap_or(now) + self.reset_timeout;
            if now >= resumes {
                self.state = CircuitState::HalfOpen;
                self.half_open_at = Some(resumes);
                self.success_count = 0;
            }
        }
    }

    /// Counts a successful execution that ended at `now`.
    pub fn record_success(&mut self, now: DateTime<Utc>) {
        self.elapse(now);
        match self.state {
            CircuitState::Closed => self.failure_count = 0,
            CircuitState::HalfOpen => {
                self.success_count += 1;
                if self.success_count >= self.success_threshold {
                    self.state = CircuitState::Closed;
                    self.failure_count = 0;
                    self.success_count = 0;
                }
            }
            // A run admitted before the breaker opened finished well; the breaker stays open.
            CircuitState::Open => {}
        }
    }

    /// Counts a failed (or timed-out) execution that ended at `now`.
    pub fn record_failure(&mut self, now: DateTime<Utc>) {
        self.elapse(now);
        self.last_failure_at = Some(now);
        match self.state {
            CircuitState::Closed => {
                self.failure_count += 1;
                if self.failure_count >= self.failure_threshold {
                    self.open(now);
                }
            }
            CircuitState::HalfOpen => {
                self.failure_count += 1;
                self.open(now);
            }
            CircuitState::Open => self.failure_count += 1,
        }
    }

    fn open(&mut self, now: DateTime<Utc>) {
        self.state = CircuitState::Open;
        self.opened_at = Some(now);
        self.success_count = 0;
    }

    /// An admin reset: closed with clean counters.
    pub fn reset(&mut self) {
        self.state = CircuitState::Closed;
        self.failure_count = 0;
        self.success_count = 0;
        self.opened_at = None;
        self.half_open_at = None;
    }
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn documented_transitions() {
        let mut b = Breaker::new();
        let now = t0();
        for i in 1..5 {
            b.record_failure(now);
            assert_eq!(b.state, CircuitState::Closed, "after {i} failures");
        }
        b.record_failure(now);
        assert_eq!(b.state, CircuitState::Open);
        assert!(matches!(
            b.admit(now + Duration::seconds(299), 0),
            Admission::Refused(_)
        ));
        assert_eq!(b.admit(now + Duration::seconds(300), 0), Admission::Probe);
        assert_eq!(b.state, CircuitState::HalfOpen);
        // Only as many probes at once as successes are still needed.
        assert_eq!(b.admit(now + Duration::seconds(301), 2), Admission::Probe);
        assert!(matches!(
            b.admit(now + Duration::seconds(301), 3),
            Admission::Refused(_)
        ));
        b.record_success(now + Duration::seconds(310));
        b.record_success(now + Duration::seconds(310));
        assert_eq!(b.state, CircuitState::HalfOpen);
        b.record_success(now + Duration::seconds(310));
        assert_eq!(b.state, CircuitState::Closed);
        assert_eq!(b.failure_count, 0);
    }

    #[test]
    fn half_open_reopens_on_any_failure_and_success_resets_closed_count() {
        let mut b = Breaker {
            failure_threshold: 2,
            ..Breaker::new()
        };
        let now = t0();
        b.record_failure(now);
        b.record_success(now);
        b.record_failure(now);
        assert_eq!(
            b.state,
            CircuitState::Closed,
            "failures must be consecutive"
        );
        b.record_failure(now);
        assert_eq!(b.state, CircuitState::Open);
        b.admit(now + Duration::seconds(600), 0);
        b.record_success(now + Duration::seconds(600));
        b.record_failure(now + Duration::seconds(601));
        assert_eq!(b.state, CircuitState::Open);
        assert_eq!(b.opened_at, Some(now + Duration::seconds(601)));
        b.reset();
        assert_eq!(b.state, CircuitState::Closed);
        assert_eq!(b.admit(now, 0), Admission::Allowed);
    }

    /// An outcome recorded after the reset timeout meets the breaker half-open even when no
    /// run was admitted since (the stored row still said open): a failure reopens it from then,
    /// a success counts towards closing it.
    #[test]
    fn outcomes_after_the_reset_timeout_meet_a_half_open_breaker() {
        let opened = t0();
        let tripped = || {
            let mut b = Breaker {
                failure_threshold: 1,
                success_threshold: 1,
                ..Breaker::new()
            };
            b.record_failure(opened);
            assert_eq!(b.state, CircuitState::Open);
            b
        };
        // Before the timeout an in-flight run's failure only counts.
        let mut b = tripped();
        b.record_failure(opened + Duration::seconds(100));
        assert_eq!((b.state, b.opened_at), (CircuitState::Open, Some(opened)));
        // After it, the failure reopens the breaker: the next probe waits a whole timeout.
        let mut b = tripped();
        let late = opened + Duration::seconds(314);
        b.record_failure(late);
        assert_eq!((b.state, b.opened_at), (CircuitState::Open, Some(late)));
        assert!(matches!(
            b.admit(late + Duration::seconds(2), 0),
            Admission::Refused(_)
        ));
        assert_eq!(b.admit(late + Duration::seconds(300), 0), Admission::Probe);
        // A success after it is a half-open success.
        let mut b = tripped();
        b.record_success(late);
        assert_eq!(b.state, CircuitState::Closed);
    }

    proptest! {
        #[test]
        fn open_never_admits_before_timeout(ops in proptest::collection::vec(0u8..3, 0..60)) {
            let mut b = Breaker { failure_threshold: 2, success_threshold: 2, ..Breaker::new() };
            let mut now = t0();
            for op in ops {
                now += Duration::seconds(37);
                match op {
                    0 => b.record_failure(now),
                    1 => b.record_success(now),
                    _ => {
                        let before = b.clone();
                        let admission = b.admit(now, 0);
                        if before.state == CircuitState::Open
                            && now < before.opened_at.unwrap() + before.reset_timeout
                        {
                            prop_assert!(matches!(admission, Admission::Refused(_)));
                        }
                    }
                }
                prop_assert!(b.success_count < b.success_threshold || b.state != CircuitState::HalfOpen);
                if b.state == CircuitState::Closed {
                    prop_assert!(b.failure_count < b.failure_threshold);
                }
            }
        }
    }
}
