//! Live-stream wake-ups for one API process: a single listening connection on
//! [`EVENTS_CHANNEL`], opened when the first stream subscribes and closed once no stream has
//! been subscribed for [`IDLE_CLOSE`]. A listening connection costs the database a transaction
//! for every `NOTIFY` anyone sends, so an API process that streams nothing listens to nothing.
//!
//! Streams register as watchers of their execution (`execution_watchers`), so that appends to
//! that execution notify at all, and poll as a fallback: a notification sent before the
//! listener was listening, or lost with a broken connection, delays an event by at most the
//! fallback interval.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::store;
use crate::store::executions::EVENTS_CHANNEL;

/// How long the listener stays open with no subscriber.
pub const IDLE_CLOSE: Duration = Duration::from_secs(10);

/// The process's shared listener (see the module comment).
pub struct LiveEvents {
    pool: PgPool,
    sender: Mutex<Option<broadcast::Sender<Uuid>>>,
}

impl LiveEvents {
    /// No listener yet; it opens on the first [`LiveEvents::subscribe`].
    pub fn new(pool: PgPool) -> Arc<LiveEvents> {
        Arc::new(LiveEvents {
            pool,
            sender: Mutex::new(None),
        })
    }

    /// Ids of executions with new events, as they are notified.
    pub fn subscribe(self: &Arc<Self>) -> broadcast::Receiver<Uuid> {
        let mut slot = self.sender.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sender) = slot.as_ref() {
            return sender.subscribe();
        }
        let (sender, receiver) = broadcast::channel(1024);
        *slot = Some(sender.clone());
        tokio::spawn(listen(self.clone(), sender));
        receiver
    }

    /// Closes the listener when nobody is subscribed; decided under the lock `subscribe` takes,
    /// so a stream subscribing meanwhile keeps it open.
    fn close_if_idle(&self, sender: &broadcast::Sender<Uuid>) -> bool {
        let mut slot = self.sender.lock().unwrap_or_else(|e| e.into_inner());
        if sender.receiver_count() == 0 {
            *slot = None;
            return true;
        }
        false
    }
}

async fn listen(live: Arc<LiveEvents>, sender: broadcast::Sender<Uuid>) {
    loop {
        let connected = async {
            let mut listener = PgListener::connect_with(&live.pool).await?;
            listener.listen(EVENTS_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = match connected.await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(error = %e, "live stream listener cannot listen; streams poll");
                tokio::time::sleep(Duration::from_secs(1)).await;
                if live.close_if_idle(&sender) {
                    return;
                }
                continue;
            }
        };
        loop {
            match tokio::time::timeout(IDLE_CLOSE, listener.try_recv()).await {
                Ok(Ok(Some(n))) => {
                    if let Ok(id) = n.payload().parse::<Uuid>() {
                        let _ = sender.send(id);
                    }
                }
                // The connection broke: reconnect (streams poll meanwhile).
                Ok(Ok(None)) | Ok(Err(_)) => break,
                Err(_) => {
                    if live.close_if_idle(&sender) {
                        return;
                    }
                }
            }
        }
    }
}

/// A stream's registration as a watcher of one execution; removed when dropped.
pub struct Watch {
    pool: PgPool,
    execution_id: Uuid,
    watcher_id: Uuid,
}

impl Watch {
    /// Registers a new watcher of `execution_id`.
    pub async fn register(pool: &PgPool, execution_id: Uuid) -> Result<Watch, store::StoreError> {
        let watch = Watch {
            pool: pool.clone(),
            execution_id,
            watcher_id: Uuid::new_v4(),
        };
        watch.refresh().await?;
        Ok(watch)
    }

    /// Extends the registration by the watcher TTL.
    pub async fn refresh(&self) -> Result<(), store::StoreError> {
        let mut conn = self.pool.acquire().await?;
        store::executions::watcher_register(&mut conn, self.execution_id, self.watcher_id).await
    }

    /// How often an open stream refreshes its registration.
    pub fn refresh_interval() -> Duration {
        Duration::from_secs(u64::from(
            store::executions::WATCHER_TTL_SECONDS.unsigned_abs() / 3,
        ))
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let pool = self.pool.clone();
        let (execution_id, watcher_id) = (self.execution_id, self.watcher_id);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Ok(mut conn) = pool.acquire().await {
                    let _ = store::executions::watcher_remove(&mut conn, execution_id, watcher_id)
                        .await;
                }
            });
        }
    }
}
