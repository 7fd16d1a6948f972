//! Wake-ups. Enqueuers call [`Notifier::notify`] after their transaction commits; a background
//! task sends `NOTIFY aiops_jobs` at most once per debounce window (leading edge, plus one more
//! at the end of the window if more requests came in), so a burst of enqueues costs one
//! notification. Workers `LISTEN` on the channel and also poll, so a lost notification only
//! delays a job by the poll interval.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::mpsc;

use crate::store;

/// Cheap to clone; the sending task ends when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Notifier {
    tx: mpsc::Sender<()>,
}

impl Notifier {
    /// Starts the sending task on the current runtime.
    pub fn spawn(pool: PgPool, debounce: Duration) -> Notifier {
        let (tx, mut rx) = mpsc::channel::<()>(1);
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                match pool.acquire().await {
                    Ok(mut conn) => {
                        if let Err(e) = store::jobs::job_notify(&mut conn).await {
                            tracing::warn!(error = %e, "job wake-up NOTIFY failed; workers will poll");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "job wake-up NOTIFY failed; workers will poll")
                    }
                }
                tokio::time::sleep(debounce).await;
            }
        });
        Notifier { tx }
    }

    /// Asks for a wake-up; call after the enqueueing transaction committed. Never blocks.
    pub fn notify(&self) {
        // A full channel means a wake-up is already pending: nothing to add.
        let _ = self.tx.try_send(());
    }
}
