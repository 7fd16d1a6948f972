//! The runbook execution state machine, as a pure function of (state, event) -> transition.
//!
//! Statuses are exactly the `execution_status` enum: pending -> approved -> running ->
//! completed | failed | cancelled | timeout. The store applies a transition with a
//! compare-and-set update on the status it read, so two workers (or an approver and a canceller)
//! racing on one execution produce one outcome.
//!
//! Rules:
//! - Terminal statuses (completed, failed, cancelled, timeout) absorb every event.
//! - Cancel wins: a cancel request moves any non-terminal execution to cancelled at once; a step
//!   finishing afterwards finds the execution terminal and changes nothing.
//! - Attempts never exceed their maximum (runbook `max_retries` + 1): a failed run with attempts
//!   left rolls back and schedules the next attempt, otherwise it fails.
//! - A run that fails or times out rolls back its completed steps; a cancelled run does not (the
//!   operator asked for nothing more to happen on the host).

use std::fmt;
use std::str::FromStr;

/// `execution_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Created; gates not yet passed, or waiting for approval.
    Pending,
    /// Approved by a permitted user; about to start.
    Approved,
    /// Steps are running (or rolling back before a retry).
    Running,
    /// Every step succeeded (or was allowed to fail).
    Completed,
    /// A step failed and no attempts are left.
    Failed,
    /// Cancelled by a user, refused by a gate, rejected, or its approval expired.
    Cancelled,
    /// The runbook's timeout passed.
    Timeout,
}

impl Status {
    /// Every status.
    pub const ALL: [Status; 7] = [
        Status::Pending,
        Status::Approved,
        Status::Running,
        Status::Completed,
        Status::Failed,
        Status::Cancelled,
        Status::Timeout,
    ];

    /// The enum label in PostgreSQL.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Approved => "approved",
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::Timeout => "timeout",
        }
    }

    /// Whether nothing can change this status any more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Completed | Status::Failed | Status::Cancelled | Status::Timeout
        )
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown execution status `{s}`"))
    }
}

/// The part of an execution the machine decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    /// Current status.
    pub status: Status,
    /// Current run attempt, starting at 1 once running (0 before).
    pub attempt: u32,
    /// Allowed attempts: runbook `max_retries` + 1.
    pub max_attempts: u32,
}

impl State {
    /// A new execution.
    pub fn new(max_retries: u32) -> State {
        State {
            status: Status::Pending,
            attempt: 0,
            max_attempts: max_retries.saturating_add(1),
        }
    }
}

/// Something that happened to an execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Every gate passed and no approval is needed (or it was given).
    GatesPassed,
    /// A gate refused the run.
    GateRefused(String),
    /// The run needs an approval first.
    ApprovalRequired,
    /// A permitted user approved.
    Approved,
    /// A permitted user rejected.
    Rejected(String),
    /// Nobody approved in time.
    ApprovalExpired,
    /// The last step finished successfully.
    RunSucceeded,
    /// A step failed without `continue_on_failure` and without step retries left.
    RunFailed(String),
    /// The runbook's timeout passed.
    TimedOut,
    /// A user asked to cancel.
    CancelRequested(String),
}

/// What the engine must do after a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Enqueue the start job (gates are evaluated again there).
    EnqueueStart,
    /// Record that the run waits for approval.
    AwaitApproval,
    /// Start the steps of run `attempt`.
    StartRun {
        /// The attempt now starting.
        attempt: u32,
    },
    /// Kill the command running right now, if any.
    KillRunning,
    /// Run the rollback commands of the completed steps, newest first.
    Rollback,
    /// After the rollback, start attempt `attempt` after the runbook's retry delay.
    ScheduleRetry {
        /// The next attempt.
        attempt: u32,
    },
    /// Record the final status with this reason (error_message, completed_at, duration).
    Finish(Option<String>),
    /// Count the outcome in the runbook's circuit breaker.
    RecordOutcome {
        /// Whether the run succeeded.
        success: bool,
    },
}

/// A transition's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The state after the event.
    pub next: State,
    /// Work for the engine, in order.
    pub effects: Vec<Effect>,
}

/// Why an event does not apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The execution already finished.
    #[error("execution is already {0}")]
    Terminal(Status),
    /// The event makes no sense in this status (e.g. approving a running execution).
    #[error("cannot apply {event} to an execution that is {status}")]
    NotApplicable {
        /// Current status.
        status: Status,
        /// The event's name.
        event: &'static str,
    },
}

fn event_name(e: &Event) -> &'static str {
    match e {
        Event::GatesPassed => "gates_passed",
        Event::GateRefused(_) => "gate_refused",
        Event::ApprovalRequired => "approval_required",
        Event::Approved => "approve",
        Event::Rejected(_) => "reject",
        Event::ApprovalExpired => "approval_expired",
        Event::RunSucceeded => "run_succeeded",
        Event::RunFailed(_) => "run_failed",
        Event::TimedOut => "timed_out",
        Event::CancelRequested(_) => "cancel",
    }
}

/// The transition function.
pub fn transition(state: State, event: &Event) -> Result<Transition, Refusal> {
    use Status::*;
    if state.status.is_terminal() {
        return Err(Refusal::Terminal(state.status));
    }
    let to = |status: Status, effects: Vec<Effect>| {
        Ok(Transition {
            next: State { status, ..state },
            effects,
        })
    };
    match (state.status, event) {
        (_, Event::CancelRequested(reason)) => {
            let mut effects = Vec::new();
            if state.status == Running {
                effects.push(Effect::KillRunning);
            }
            effects.push(Effect::Finish(Some(reason.clone())));
            to(Cancelled, effects)
        }
        (Pending | Approved, Event::GateRefused(reason)) => {
            to(Cancelled, vec![Effect::Finish(Some(reason.clone()))])
        }
        (Pending, Event::ApprovalRequired) => to(Pending, vec![Effect::AwaitApproval]),
        (Pending, Event::Approved) => to(Approved, vec![Effect::EnqueueStart]),
        (Pending, Event::Rejected(reason)) => {
            to(Cancelled, vec![Effect::Finish(Some(reason.clone()))])
        }
        (Pending, Event::ApprovalExpired) => to(
            Cancelled,
            vec![Effect::Finish(Some("approval expired".to_owned()))],
        ),
        (Pending | Approved, Event::GatesPassed) => Ok(Transition {
            next: State {
                status: Running,
                attempt: 1,
                ..state
            },
            effects: vec![Effect::StartRun { attempt: 1 }],
        }),
        (Running, Event::RunSucceeded) => to(
            Completed,
            vec![
                Effect::Finish(None),
                Effect::RecordOutcome { success: true },
            ],
        ),
        (Running, Event::RunFailed(reason)) => {
            if state.attempt < state.max_attempts {
                let attempt = state.attempt + 1;
                Ok(Transition {
                    next: State { attempt, ..state },
                    effects: vec![Effect::Rollback, Effect::ScheduleRetry { attempt }],
                })
            } else {
                to(
                    Failed,
                    vec![
                        Effect::Rollback,
                        Effect::Finish(Some(reason.clone())),
                        Effect::RecordOutcome { success: false },
                    ],
                )
            }
        }
        (Running, Event::TimedOut) => to(
            Timeout,
            vec![
                Effect::KillRunning,
                Effect::Rollback,
                Effect::Finish(Some("runbook timeout exceeded".to_owned())),
                Effect::RecordOutcome { success: false },
            ],
        ),
        (status, event) => Err(Refusal::NotApplicable {
            status,
            event: event_name(event),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event_strategy() -> impl Strategy<Value = Event> {
        prop_oneof![
            Just(Event::GatesPassed),
            Just(Event::GateRefused("rate limit".into())),
            Just(Event::ApprovalRequired),
            Just(Event::Approved),
            Just(Event::Rejected("no".into())),
            Just(Event::ApprovalExpired),
            Just(Event::RunSucceeded),
            Just(Event::RunFailed("exit 1".into())),
            Just(Event::TimedOut),
            Just(Event::CancelRequested("operator".into())),
        ]
    }

    fn apply(mut state: State, events: &[Event]) -> (State, Vec<State>) {
        let mut trace = vec![state];
        for e in events {
            if let Ok(t) = transition(state, e) {
                state = t.next;
                trace.push(state);
            }
        }
        (state, trace)
    }

    proptest! {
        #[test]
        fn terminal_states_absorb_every_event(
            max_retries in 0u32..4,
            prefix in proptest::collection::vec(event_strategy(), 0..30),
            suffix in proptest::collection::vec(event_strategy(), 1..20),
        ) {
            let (state, _) = apply(State::new(max_retries), &prefix);
            if state.status.is_terminal() {
                for e in &suffix {
                    prop_assert_eq!(transition(state, e), Err(Refusal::Terminal(state.status)));
                }
            }
        }

        #[test]
        fn cancel_wins_from_any_live_state(
            max_retries in 0u32..4,
            prefix in proptest::collection::vec(event_strategy(), 0..30),
            suffix in proptest::collection::vec(event_strategy(), 0..20),
        ) {
            let (state, _) = apply(State::new(max_retries), &prefix);
            if !state.status.is_terminal() {
                let t = transition(state, &Event::CancelRequested("stop".into())).unwrap();
                prop_assert_eq!(t.next.status, Status::Cancelled);
                prop_assert!(!t.effects.contains(&Effect::Rollback));
                let (after, _) = apply(t.next, &suffix);
                prop_assert_eq!(after.status, Status::Cancelled);
            }
        }

        #[test]
        fn attempts_never_exceed_their_maximum(
            max_retries in 0u32..5,
            events in proptest::collection::vec(event_strategy(), 0..60),
        ) {
            let (_, trace) = apply(State::new(max_retries), &events);
            for s in trace {
                prop_assert!(s.attempt <= s.max_attempts, "{:?}", s);
                prop_assert_eq!(s.max_attempts, max_retries + 1);
            }
        }

        #[test]
        fn only_documented_edges_are_taken(
            max_retries in 0u32..3,
            events in proptest::collection::vec(event_strategy(), 0..40),
        ) {
            use Status::*;
            let (_, trace) = apply(State::new(max_retries), &events);
            for pair in trace.windows(2) {
                let edge = (pair[0].status, pair[1].status);
                let allowed = matches!(
                    edge,
                    (Pending, Pending | Approved | Running | Cancelled)
                        | (Approved, Running | Cancelled)
                        | (Running, Running | Completed | Failed | Cancelled | Timeout)
                );
                prop_assert!(allowed, "unexpected edge {:?}", edge);
            }
        }
    }

    #[test]
    fn failure_retries_then_fails_with_rollback() {
        let s = State::new(1);
        let s = transition(s, &Event::GatesPassed).unwrap().next;
        let t = transition(s, &Event::RunFailed("exit 1".into())).unwrap();
        assert_eq!(t.next.status, Status::Running);
        assert_eq!(
            t.effects,
            vec![Effect::Rollback, Effect::ScheduleRetry { attempt: 2 }]
        );
        let t = transition(t.next, &Event::RunFailed("exit 1".into())).unwrap();
        assert_eq!(t.next.status, Status::Failed);
        assert_eq!(t.effects[0], Effect::Rollback);
        assert!(
            t.effects
                .contains(&Effect::RecordOutcome { success: false })
        );
    }

    #[test]
    fn approval_flow_and_misplaced_events() {
        let s = State::new(0);
        let s = transition(s, &Event::ApprovalRequired).unwrap().next;
        assert_eq!(s.status, Status::Pending);
        let t = transition(s, &Event::Approved).unwrap();
        assert_eq!(t.next.status, Status::Approved);
        assert_eq!(t.effects, vec![Effect::EnqueueStart]);
        assert!(matches!(
            transition(t.next, &Event::Approved),
            Err(Refusal::NotApplicable { .. })
        ));
        let running = transition(t.next, &Event::GatesPassed).unwrap().next;
        assert_eq!(running.status, Status::Running);
        assert!(transition(running, &Event::Rejected("late".into())).is_err());
        let timeout = transition(running, &Event::TimedOut).unwrap();
        assert_eq!(timeout.next.status, Status::Timeout);
        assert_eq!(timeout.effects[0], Effect::KillRunning);
    }

    #[test]
    fn statuses_round_trip_the_enum_labels() {
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>().unwrap(), s);
        }
    }
}
