//! Handlers by job kind, each with its options (timeout, backoff), and the cron schedules a worker
//! fires. A [`Registry`] is built once at start-up and shared by the worker's tasks; later engine
//! modules add their kinds to it. Knows nothing about SQL.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::cron::CronEntry;
use super::{Backoff, JobContext, JobError, NewJob, QueueError};

/// What a handler returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<(), JobError>> + Send>>;

/// A type-erased handler.
pub type Handler = Arc<dyn Fn(JobContext) -> HandlerFuture + Send + Sync>;

/// Per-kind options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KindOptions {
    /// An attempt running longer is stopped and fails (retryable). `jobs.timeout_seconds`
    /// overrides it per job.
    pub timeout: Duration,
    /// Delay before the next attempt after a retryable failure or a rescue.
    pub backoff: Backoff,
}

impl Default for KindOptions {
    fn default() -> Self {
        KindOptions {
            timeout: Duration::from_secs(300),
            backoff: Backoff::default(),
        }
    }
}

/// Handlers and cron schedules.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: BTreeMap<String, (Handler, KindOptions)>,
    cron: Vec<CronEntry>,
    forwards: BTreeMap<String, tokio::sync::broadcast::Sender<String>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("kinds", &self.kinds())
            .field("cron", &self.cron)
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Registers (or replaces) the handler of `kind`. The handler returns `Ok(())` to complete
    /// the job (unless it already completed it through [`super::GuardedTx::complete`]) or a
    /// [`JobError`] saying whether to retry.
    pub fn register<F, Fut>(&mut self, kind: &str, options: KindOptions, handler: F)
    where
        F: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), JobError>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |ctx| Box::pin(handler(ctx)));
        self.handlers.insert(kind.to_owned(), (handler, options));
    }

    /// Adds a cron schedule (cron crate syntax with seconds: `sec min hour dom month dow`) that
    /// enqueues `job` once per tick, whichever worker gets there first.
    pub fn cron(&mut self, name: &str, expr: &str, job: NewJob) -> Result<(), QueueError> {
        let entry = CronEntry::new(name, expr, job)?;
        self.cron.retain(|c| c.name != name);
        self.cron.push(entry);
        Ok(())
    }

    /// Registered kinds, sorted.
    pub fn kinds(&self) -> Vec<String> {
        self.handlers.keys().cloned().collect()
    }

    /// The handler and options of `kind`.
    pub fn handler(&self, kind: &str) -> Option<&(Handler, KindOptions)> {
        self.handlers.get(kind)
    }

    /// The options of `kind`, or the defaults for a kind this registry does not know.
    pub fn options(&self, kind: &str) -> KindOptions {
        self.handlers.get(kind).map(|(_, o)| *o).unwrap_or_default()
    }

    /// The cron schedules.
    pub fn cron_entries(&self) -> &[CronEntry] {
        &self.cron
    }

    /// Asks the running worker to also `LISTEN` on `channel`, on the connection it listens on
    /// for wake-ups (one listening connection per worker, whatever the number of channels), and
    /// to forward each payload to `to`.
    pub fn forward_notifications(
        &mut self,
        channel: &str,
        to: tokio::sync::broadcast::Sender<String>,
    ) {
        self.forwards.insert(channel.to_owned(), to);
    }

    /// The forwarded channels.
    pub(crate) fn forwards(&self) -> &BTreeMap<String, tokio::sync::broadcast::Sender<String>> {
        &self.forwards
    }
}
