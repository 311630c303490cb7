//! The threads mixes run on. A mix keeps every core busy for as long as it runs, while the
//! runtime's threads must still deliver each of its changes to thousands of subscribers at once:
//! so the engine's threads run at a lower scheduling priority, and the runtime wins whenever both
//! want a core. A mix on an otherwise idle machine runs as fast as before.

use std::panic::{catch_unwind, AssertUnwindSafe};

/// How much nicer than the runtime the engine's threads are: 10 gives a runtime thread about nine
/// tenths of a contended core. A mix spawns its parallel work onto this same pool, so all of it
/// runs at this priority.
const ENGINE_NICE: i32 = 10;

pub(super) struct EnginePool {
    pool: rayon::ThreadPool,
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
        Ok(Self { pool })
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
    // On Linux, PRIO_PROCESS with a thread id is that one thread's nice value. Relative to the
    // current one, so a server started under `nice` keeps its engine below its runtime too.
    // SAFETY: gettid takes no arguments and cannot fail.
    let thread = unsafe { libc::gettid() } as libc::id_t;
    // SAFETY: getpriority and setpriority take plain integers and touch no memory of ours; a
    // failure is reported through the return value and errno, which is read below.
    let lowered = (unsafe { libc::getpriority(libc::PRIO_PROCESS, thread) } + ENGINE_NICE).min(19);
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, thread, lowered) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "could not lower the engine threads' priority");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_below_the_runtime_s_priority_and_a_panic_comes_back_as_an_error() {
        let engine = EnginePool::new(1).unwrap();
        #[cfg(target_os = "linux")]
        {
            // SAFETY: as in `lower_priority`, plain integers in and out.
            let niceness = || unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
            let runtime_nice = niceness();
            // The engine's threads, and the rayon work a mix spawns from them (as the track workers
            // are): one task per pool thread, held at a barrier until all have started, so every
            // thread of the pool runs one and none runs outside it.
            let (engine_nice, spawned) = engine
                .run(move || {
                    let threads = rayon::current_num_threads();
                    let started = std::sync::Barrier::new(threads);
                    let spawned = std::sync::Mutex::new(Vec::new());
                    rayon::scope(|scope| {
                        for _ in 0..threads {
                            scope.spawn(|_| {
                                started.wait();
                                let thread = std::thread::current().name().unwrap_or_default().to_string();
                                spawned.lock().unwrap().push((thread, niceness()));
                            });
                        }
                    });
                    (niceness(), spawned.into_inner().unwrap())
                })
                .await
                .unwrap();
            assert_eq!(engine_nice, (runtime_nice + ENGINE_NICE).min(19));
            let threads: std::collections::BTreeSet<&str> = spawned.iter().map(|(thread, _)| thread.as_str()).collect();
            assert_eq!(threads.len(), spawned.len(), "each task on its own thread: {spawned:?}");
            for (thread, nice) in &spawned {
                assert!(thread.starts_with("mixd-engine-"), "spawned work ran on {thread:?}, outside the engine's pool");
                assert_eq!(*nice, engine_nice, "on {thread}");
            }
        }
        let panicked = engine.run(|| -> u32 { panic!("a broken stem") }).await;
        assert_eq!(panicked.unwrap_err().downcast_ref::<&str>(), Some(&"a broken stem"));
        assert_eq!(engine.run(|| 42).await.unwrap(), 42, "the pool survives a panic");
    }
}
