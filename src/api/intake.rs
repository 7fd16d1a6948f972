//! Group commit for the Alertmanager webhook.
//!
//! Each accepted notification is handed to a small set of writer tasks. A writer that is free
//! takes every notification waiting at that moment (up to [`BATCH_ALERTS`] alerts) and stores
//! them with one [`store::alerts::alert_intake`] statement: one round trip and one WAL flush for
//! the whole batch. A request is answered only after the statement holding its alerts
//! committed, so every `200` is durable, as with one statement per request.
//!
//! Batching costs nothing at low load: a writer that finds one notification waiting stores that
//! one at once. Under load the batches grow by themselves while the other writers commit.
//!
//! Failure isolation: when a batch of several notifications fails on a statement error, each
//! is stored again on its own, so one notification the database refuses cannot fail the others.
//! Connection-level failures (database unavailable) are answered to every notification of the
//! batch as they are: the webhook answers 5xx and Alertmanager retries.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::store::{
    self, StoreError,
    alerts::{IntakeJobs, IntakeNotification, UpsertOutcome},
};

/// Most alerts one batch stores.
pub const BATCH_ALERTS: usize = 2_000;

/// Notifications waiting for a writer before submitters wait for room.
const QUEUE: usize = 512;

/// What a submitter gets back: `None` when the token was refused.
pub type IntakeResult = Result<Option<Vec<UpsertOutcome>>, Arc<StoreError>>;

struct Pending {
    notification: IntakeNotification,
    reply: oneshot::Sender<IntakeResult>,
}

impl Pending {
    fn keys(&self) -> impl Iterator<Item = (&str, DateTime<Utc>)> {
        self.notification
            .alerts
            .iter()
            .map(|a| (a.fingerprint.as_str(), a.starts_at))
    }
}

/// The queue writers take from: new notifications, and those a writer put back because an
/// episode of theirs was already in its batch.
struct Source {
    rx: mpsc::Receiver<Pending>,
    deferred: VecDeque<Pending>,
}

/// Hands notifications to the writers.
pub struct Intake {
    tx: mpsc::Sender<Pending>,
}

impl Intake {
    /// Starts `writers` writer tasks on `pool` (each holds at most one connection at a time),
    /// enqueueing `jobs` with the alerts.
    pub fn spawn(pool: PgPool, writers: usize, jobs: IntakeJobs<'static>) -> Arc<Intake> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let source = Arc::new(Mutex::new(Source {
            rx,
            deferred: VecDeque::new(),
        }));
        for _ in 0..writers.max(1) {
            tokio::spawn(write_loop(pool.clone(), source.clone(), jobs));
        }
        Arc::new(Intake { tx })
    }

    /// Stores one notification (its alerts must not be empty) and returns once it committed.
    pub async fn submit(&self, notification: IntakeNotification) -> IntakeResult {
        let (reply, answer) = oneshot::channel();
        let closed = || Arc::new(StoreError::Database(sqlx::Error::PoolClosed));
        self.tx
            .send(Pending {
                notification,
                reply,
            })
            .await
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }
}

/// Takes the next batch: the first notification waiting (blocking until there is one), then
/// every other one already waiting, up to [`BATCH_ALERTS`] alerts, none repeating an episode.
/// `None` once the intake is dropped and drained.
async fn next_batch(source: &Mutex<Source>) -> Option<Vec<Pending>> {
    let mut source = source.lock().await;
    let first = match source.deferred.pop_front() {
        Some(p) => p,
        None => source.rx.recv().await?,
    };
    let mut alerts = first.notification.alerts.len();
    let mut episodes: HashSet<(String, DateTime<Utc>)> =
        first.keys().map(|(f, s)| (f.to_owned(), s)).collect();
    let mut batch = vec![first];
    let mut later = Vec::new();
    let mut from_deferred = source.deferred.len();
    while alerts < BATCH_ALERTS {
        let next = if from_deferred > 0 {
            from_deferred -= 1;
            source.deferred.pop_front()
        } else {
            source.rx.try_recv().ok()
        };
        let Some(next) = next else { break };
        let size = next.notification.alerts.len();
        if alerts + size > BATCH_ALERTS
            || next
                .keys()
                .any(|(f, s)| episodes.contains(&(f.to_owned(), s)))
        {
            later.push(next);
            continue;
        }
        episodes.extend(next.keys().map(|(f, s)| (f.to_owned(), s)));
        alerts += size;
        batch.push(next);
    }
    for p in later.into_iter().rev() {
        source.deferred.push_front(p);
    }
    Some(batch)
}

async fn write_loop(pool: PgPool, source: Arc<Mutex<Source>>, jobs: IntakeJobs<'static>) {
    while let Some(batch) = next_batch(&source).await {
        write_batch(&pool, batch, &jobs).await;
    }
}

async fn store_group(
    pool: &PgPool,
    notifications: &[IntakeNotification],
    jobs: &IntakeJobs<'_>,
) -> Result<Vec<Option<Vec<UpsertOutcome>>>, StoreError> {
    let mut conn = pool.acquire().await?;
    store::alerts::alert_intake(&mut conn, notifications, jobs).await
}

async fn write_batch(pool: &PgPool, batch: Vec<Pending>, jobs: &IntakeJobs<'_>) {
    let (notifications, replies): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|p| (p.notification, p.reply)).unzip();
    match store_group(pool, &notifications, jobs).await {
        Ok(answers) => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(Ok(answer));
            }
        }
        Err(e) if notifications.len() > 1 && statement_error(&e) => {
            tracing::warn!(error = %e, notifications = notifications.len(),
                "a webhook batch failed; storing its notifications one by one");
            for (notification, reply) in notifications.into_iter().zip(replies) {
                let one = std::slice::from_ref(&notification);
                let answer = store_group(pool, one, jobs)
                    .await
                    .map(|mut a| a.pop().flatten())
                    .map_err(Arc::new);
                let _ = reply.send(answer);
            }
        }
        Err(e) => {
            let e = Arc::new(e);
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// The database refused the statement (as opposed to being unreachable).
fn statement_error(e: &StoreError) -> bool {
    match e {
        StoreError::Database(sqlx::Error::Database(_)) => true,
        StoreError::Database(_) => false,
        StoreError::Conflict(_) | StoreError::ForeignKey(_) | StoreError::Check(_) => true,
    }
}
