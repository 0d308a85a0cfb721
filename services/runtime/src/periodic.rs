//! A background task that does one step every tick until stopped: the
//! services' timer loops (routing's escalations, dispatch's clocks).

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running periodic task.
pub struct Periodic {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Periodic {
    /// Runs `step` now and then every `tick` (after each step ends). A step's
    /// error is logged under `name` and the next tick tries again.
    pub fn spawn<F, Fut, E>(name: &'static str, tick: Duration, mut step: F) -> Periodic
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<usize, E>> + Send,
        E: std::fmt::Display,
    {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            while !*stopped.borrow() {
                match step().await {
                    Ok(0) => {}
                    Ok(done) => tracing::debug!(task = name, done, "periodic step"),
                    Err(e) => {
                        tracing::warn!(task = name, error = %e, "periodic step failed; retrying")
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(tick) => {},
                    _ = stopped.changed() => {},
                }
            }
        });
        Periodic { stop, task }
    }

    /// Stops after the step in hand.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}
