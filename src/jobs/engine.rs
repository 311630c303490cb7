//! The threads mixes run on. A mix keeps every core busy for as long as it runs, while the
//! runtime's threads must still deliver each of its changes to thousands of subscribers at once:
//! so the engine's threads run at a lower scheduling priority, and the runtime wins whenever both
//! want a core. A mix on an otherwise idle machine runs as fast as before.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// Linux nice value of the engine's threads: 10 gives a runtime thread about nine tenths of a
/// contended core. Threads the engine starts itself inherit it.
const ENGINE_NICE: i32 = 10;

#[derive(Clone)]
pub(super) struct EnginePool {
    pool: Arc<rayon::ThreadPool>,
}

impl EnginePool {
    /// At least one thread per core, and one per mixer slot so that every running mix has one.
    pub fn new(mix_slots: usize) -> std::io::Result<Self> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cores.max(mix_slots))
            .thread_name(|i| format!("mixd-engine-{i}"))
            .start_handler(|_| lower_priority())
            .build()
            .map_err(std::io::Error::other)?;
        Ok(Self { pool: Arc::new(pool) })
    }

    /// Runs `work` on an engine thread without blocking the runtime. A panic comes back as the
    /// error, so the job fails and the server keeps going.
    pub async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, Box<dyn std::any::Any + Send>> {
        let (done, outcome) = tokio::sync::oneshot::channel();
        self.pool.spawn(move || {
            let _ = done.send(catch_unwind(AssertUnwindSafe(work)));
        });
        // Without an answer the work never ran: the pool outlives every job it holds, so only a
        // thread that could not start loses one.
        outcome.await.unwrap_or_else(|_| Err(Box::new("the engine dropped a mix")))
    }
}

#[cfg(target_os = "linux")]
fn lower_priority() {
    // On Linux, PRIO_PROCESS with a thread id sets the nice value of that one thread.
    let thread = unsafe { libc::gettid() };
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, thread as libc::id_t, ENGINE_NICE) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "could not lower the engine threads' priority");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}
