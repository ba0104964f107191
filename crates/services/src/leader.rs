//! Workers of which a deployment runs exactly one, in the process that
//! leads ([`weft_store::Store::leadership`]; docs/scale-out.md "One
//! leader"): push, the outgoing federation queue, application-service
//! delivery, typing and presence timeouts. On SQLite the one process leads
//! at once. On PostgreSQL a worker starts when its process becomes the
//! leader and stops (with every task it spawned through
//! [`Services::spawn_led`]) as soon as the process stops leading; the next
//! leader carries on from the positions in the database.

use std::future::Future;
use std::sync::Arc;

use crate::Services;

impl Services {
    /// Whether this process leads now. False in a process that runs no
    /// led worker (the admin CLI), which never competes for leadership.
    pub fn is_leader(&self) -> bool {
        self.leadership.get().is_some_and(|rx| *rx.borrow())
    }

    /// This process's leadership, competing for it from the first call.
    fn leading(&self) -> tokio::sync::watch::Receiver<bool> {
        self.leadership.get_or_init(|| self.store.leadership()).clone()
    }

    /// Runs `worker` (made anew by `make` each time) whenever this process
    /// leads, and drops it when it stops leading.
    pub(crate) fn run_led<F, Fut>(self: &Arc<Self>, name: &'static str, make: F)
    where
        F: Fn(Arc<Services>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let s = self.clone();
        tokio::spawn(async move {
            let mut leading = s.leading();
            loop {
                if leading.wait_for(|l| *l).await.is_err() {
                    return;
                }
                tracing::debug!("{name}: starts (this process leads)");
                tokio::select! {
                    _ = make(s.clone()) => return,
                    _ = leading.wait_for(|l| !*l) => {
                        tracing::info!("{name}: stopped (this process no longer leads)");
                    }
                }
            }
        });
    }

    /// Spawns a task of a led worker: it ends when this process stops
    /// leading (at once if it does not lead now).
    pub(crate) fn spawn_led<Fut>(&self, task: Fut)
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut leading = self.leading();
        if !*leading.borrow_and_update() {
            return;
        }
        tokio::spawn(async move {
            tokio::select! {
                _ = task => {}
                _ = leading.wait_for(|l| !*l) => {}
            }
        });
    }
}
