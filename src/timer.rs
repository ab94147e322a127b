//! The timer of a response limit, re-armed from a small per-thread pool.
//!
//! Registering a fresh `tokio::time::Sleep` takes the timer driver's lock (and on a
//! multi-thread runtime may wake the driver's thread), and so does cancelling one that is
//! dropped before it fires: together, most of what a timeout costs a response that is not
//! ready at once. A timer whose response finished is instead kept, still registered, in a
//! pool of the thread it finished on. The next response on that thread re-arms it to a later
//! deadline, which tokio does without its lock (it only moves the entry's deadline; its
//! driver re-files the entry when the old one comes). An earlier deadline, or a timer that
//! fired, is registered again as usual.
//!
//! A pooled timer keeps no waker (it is polled once with a no-op waker when put back), so it
//! neither wakes nor keeps alive the task it served. Timers are only taken back on the runtime
//! they were made on.

use std::cell::RefCell;
use std::future::Future;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};

use tokio::runtime::{self, Handle};
use tokio::task::unconstrained;
use tokio::time::{sleep_until, Instant, Sleep};

/// Timers kept per thread, at most: enough to cover the responses that finish together on a
/// busy worker, few enough that what a pool holds does not matter.
const POOL_CAPACITY: usize = 32;

thread_local! {
    static POOL: RefCell<Pool> = const {
        RefCell::new(Pool {
            runtime: None,
            sleeps: Vec::new(),
        })
    };
}

struct Pool {
    /// The runtime every timer in `sleeps` belongs to.
    runtime: Option<runtime::Id>,
    sleeps: Vec<Pin<Box<Sleep>>>,
}

/// A timer, armed or not.
#[derive(Default)]
pub(crate) struct Timer {
    armed: Option<Armed>,
}

struct Armed {
    sleep: Pin<Box<Sleep>>,
    runtime: runtime::Id,
}

impl Timer {
    pub(crate) fn is_armed(&self) -> bool {
        self.armed.is_some()
    }

    /// Arms the timer for `deadline`. Like `tokio::time::sleep_until`, panics outside a Tokio
    /// runtime or when the runtime's timers are disabled.
    #[inline]
    pub(crate) fn arm(&mut self, deadline: Instant) {
        let runtime = Handle::current().id();
        let pooled = POOL
            .try_with(|pool| {
                let mut pool = pool.borrow_mut();
                if pool.runtime == Some(runtime) {
                    pool.sleeps.pop()
                } else {
                    None
                }
            })
            .ok()
            .flatten();
        let sleep = match pooled {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(sleep_until(deadline)),
        };
        self.armed = Some(Armed { sleep, runtime });
    }

    /// Polls the armed timer, outside the coop budget so that a busy inner future cannot
    /// starve it. Pending when the timer is not armed.
    #[inline]
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.armed {
            Some(armed) => pin!(unconstrained(armed.sleep.as_mut())).poll(cx),
            None => Poll::Pending,
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        let Some(Armed { mut sleep, runtime }) = self.armed.take() else {
            return;
        };
        if std::thread::panicking() {
            return;
        }
        // Forget the task's waker, so that a pooled timer neither wakes nor keeps alive the
        // task it served. A timer that fired (also when its runtime shut down, which tokio
        // would not let it be polled after) keeps no waker.
        if !sleep.is_elapsed() {
            let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
            let _ = pin!(unconstrained(sleep.as_mut())).poll(&mut cx);
        }
        // During the thread's teardown the pool is gone, and the timer is dropped as usual.
        let _ = POOL.try_with(|pool| {
            let Ok(mut pool) = pool.try_borrow_mut() else {
                return;
            };
            if pool.runtime != Some(runtime) {
                // Timers of another (perhaps finished) runtime are of no more use here.
                pool.sleeps.clear();
                pool.runtime = Some(runtime);
            }
            if pool.sleeps.capacity() == 0 {
                pool.sleeps.reserve_exact(POOL_CAPACITY);
            }
            if pool.sleeps.len() < POOL_CAPACITY {
                pool.sleeps.push(sleep);
            }
        });
    }
}

impl std::fmt::Debug for Timer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timer")
            .field("armed", &self.armed.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use futures_util::task::{waker, ArcWake};

    use super::*;

    fn pooled() -> usize {
        POOL.with(|pool| pool.borrow().sleeps.len())
    }

    /// A timer armed for `after` from now, polled once so that it is registered, then put back.
    fn pool_one(after: Duration) {
        let mut timer = Timer::default();
        timer.arm(Instant::now() + after);
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        assert!(timer.poll(&mut cx).is_pending());
    }

    async fn fires_after(limit: Duration) {
        let start = Instant::now();
        let mut timer = Timer::default();
        timer.arm(start + limit);
        assert_eq!(pooled(), 0, "the pooled timer was not taken");
        poll_fn(|cx| timer.poll(cx)).await;
        assert_eq!(start.elapsed(), limit);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pooled_timer_fires_at_its_new_deadline() {
        // Later than the pooled deadline: the entry is only moved.
        pool_one(Duration::from_secs(10));
        assert_eq!(pooled(), 1);
        tokio::time::advance(Duration::from_secs(5)).await;
        fires_after(Duration::from_secs(10)).await;

        // Earlier: registered again.
        pool_one(Duration::from_secs(10));
        fires_after(Duration::from_secs(1)).await;

        // A pooled timer that fired meanwhile.
        pool_one(Duration::from_millis(1));
        tokio::time::advance(Duration::from_secs(1)).await;
        fires_after(Duration::from_millis(500)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_pooled_timer_wakes_nobody() {
        struct Count(AtomicUsize);
        impl ArcWake for Count {
            fn wake_by_ref(count: &Arc<Self>) {
                count.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let task = waker(count.clone());
        let mut timer = Timer::default();
        timer.arm(Instant::now() + Duration::from_millis(10));
        assert!(timer.poll(&mut Context::from_waker(&task)).is_pending());
        drop(timer);
        assert_eq!(pooled(), 1);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        // Nor keeps it alive.
        drop(task);
        assert_eq!(Arc::strong_count(&count), 1);
    }

    #[test]
    fn timers_of_another_runtime_are_not_reused() {
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap()
        };
        runtime().block_on(async { pool_one(Duration::from_secs(3600)) });
        assert_eq!(pooled(), 1);
        // The first runtime is gone; its timer must not be armed on this one.
        runtime().block_on(async {
            let start = Instant::now();
            let mut timer = Timer::default();
            timer.arm(start + Duration::from_millis(20));
            poll_fn(|cx| timer.poll(cx)).await;
            assert_eq!(start.elapsed(), Duration::from_millis(20));
        });
        assert_eq!(pooled(), 1, "the old runtime's timer is still pooled");
    }

    #[test]
    fn a_timer_outliving_its_runtime_is_dropped_quietly() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let mut timer = Timer::default();
        runtime.block_on(async {
            timer.arm(Instant::now() + Duration::from_secs(3600));
            let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
            assert!(timer.poll(&mut cx).is_pending());
        });
        drop(runtime);
        drop(timer);
    }
}
