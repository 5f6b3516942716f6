//! The collective timeout: a thread that ends the process when a collective operation waits
//! longer than `ddp_timeout` for the other ranks (a peer that died or hangs), so no rank waits
//! forever. MPI has no timeouts of its own; NCCL's need its asynchronous error handling.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

struct State {
    /// The operation waiting and when it gives up.
    waiting: Option<(&'static str, Instant)>,
}

pub(super) struct Watchdog {
    shared: Arc<(Mutex<State>, Condvar)>,
    timeout: Duration,
}

/// While alive, the operation it names is being waited for.
pub(super) struct Armed<'a> {
    dog: &'a Watchdog,
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        let (lock, cv) = &*self.dog.shared;
        lock.lock().unwrap_or_else(|e| e.into_inner()).waiting = None;
        cv.notify_all();
    }
}

impl Watchdog {
    pub(super) fn start(rank: usize, timeout: Duration) -> Self {
        let shared = Arc::new((Mutex::new(State { waiting: None }), Condvar::new()));
        let watched = shared.clone();
        std::thread::Builder::new()
            .name("collective-timeout".into())
            .spawn(move || watch(rank, timeout, &watched))
            .expect("spawn the collective watchdog");
        Self { shared, timeout }
    }

    pub(super) fn arm(&self, what: &'static str) -> Armed<'_> {
        let (lock, cv) = &*self.shared;
        let deadline = Instant::now()
            .checked_add(self.timeout)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(u32::MAX as u64));
        lock.lock().unwrap_or_else(|e| e.into_inner()).waiting = Some((what, deadline));
        cv.notify_all();
        Armed { dog: self }
    }
}

fn watch(rank: usize, timeout: Duration, shared: &(Mutex<State>, Condvar)) {
    let (lock, cv) = shared;
    let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        match state.waiting {
            None => state = cv.wait(state).unwrap_or_else(|e| e.into_inner()),
            Some((what, deadline)) => {
                let now = Instant::now();
                if now >= deadline {
                    eprintln!(
                        "error: rank {rank}: waited {} s for the other ranks ({what}); one of them has stopped or hangs (`ddp_timeout` sets this limit). Ending this rank; resume from the last checkpoint.",
                        timeout.as_secs()
                    );
                    std::process::exit(1);
                }
                state = cv
                    .wait_timeout(state, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
    }
}
