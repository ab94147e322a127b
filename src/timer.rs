//! The timer of a response limit, re-armed from a small per-thread pool.
//!
//! Registering a fresh `tokio::time::Sleep` takes the timer driver's lock (and on a
//! multi-thread runtime may wake the driver's thread), and so does cancelling one that is
//! dropped before it fires: together, most of what a timeout costs a response that is not
//! ready at once. A boxed timer whose response finished is instead kept, still registered, in
//! a pool of the thread it finished on. The next response on that thread re-arms it to a
//! later deadline, which tokio does without its lock (it only moves the entry's deadline; its
//! driver re-files the entry when the old one comes). An earlier deadline, or a timer that
//! fired, is registered again as usual.
//!
//! A pooled timer keeps no waker (it is polled once with a no-op waker when put back), so it
//! neither wakes nor keeps alive the task it served. Timers are only taken back on the runtime
//! they were made on. A thread makes a bounded number of boxed timers; past that, timers are
//! inline, so that many responses pending at once cost no more memory than with
//! `tokio::time::timeout`.

use std::cell::RefCell;
use std::future::Future;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::runtime::{self, Handle};
use tokio::task::unconstrained;
use tokio::time::{sleep_until, Instant, Sleep};

/// Timers kept per thread for reuse, at most.
const POOL_CAPACITY: usize = 64;

/// Boxed (poolable) timers made per thread, at most; past that, a response whose thread has
/// none pooled gets a timer inline, as `tokio::time::timeout` does. A box costs a request an
/// allocation of its own, which at 100,000 requests in flight would double what each one
/// costs; with this bound it stays a few kilobytes per thread.
const BOXED_PER_THREAD: usize = 256;

thread_local! {
    static POOL: RefCell<Pool> = const {
        RefCell::new(Pool {
            runtime: None,
            sleeps: Vec::new(),
            boxed: 0,
        })
    };
}

struct Pool {
    /// The runtime every timer in `sleeps` belongs to.
    runtime: Option<runtime::Id>,
    sleeps: Vec<Pin<Box<Sleep>>>,
    /// Boxed timers made on this thread and not dropped since (roughly: a timer made on one
    /// thread may be dropped on another).
    boxed: usize,
}

impl Pool {
    /// A pooled timer re-armed for `deadline`, or a new boxed one, unless this thread made
    /// enough of those already.
    fn take(&mut self, deadline: Instant) -> Option<(Pin<Box<Sleep>>, runtime::Id)> {
        if self.sleeps.is_empty() && self.boxed >= BOXED_PER_THREAD {
            return None;
        }
        let runtime = Handle::current().id();
        if self.runtime != Some(runtime) {
            // Timers of another (perhaps finished) runtime are of no more use here.
            self.boxed = self.boxed.saturating_sub(self.sleeps.len());
            self.sleeps.clear();
            self.runtime = Some(runtime);
        }
        let sleep = match self.sleeps.pop() {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => {
                self.boxed += 1;
                Box::pin(sleep_until(deadline))
            }
        };
        Some((sleep, runtime))
    }

    fn put_back(&mut self, sleep: Pin<Box<Sleep>>, runtime: runtime::Id) {
        if self.runtime == Some(runtime) && self.sleeps.len() < POOL_CAPACITY {
            if self.sleeps.capacity() == 0 {
                self.sleeps.reserve_exact(POOL_CAPACITY);
            }
            self.sleeps.push(sleep);
        } else {
            self.boxed = self.boxed.saturating_sub(1);
        }
    }
}

pin_project! {
    /// A response's limit: armed at the first [`poll_expired`](Timer::poll_expired) (the first
    /// time the response is not ready), so that a response ready at once never reads the
    /// clock or registers a timer.
    pub(crate) struct Timer {
        #[pin]
        slot: Slot,
    }

    impl PinnedDrop for Timer {
        fn drop(this: Pin<&mut Self>) {
            if let SlotProj::Pooled { sleep, runtime } = this.project().slot.project() {
                if let Some(sleep) = sleep.take() {
                    put_back(sleep, *runtime);
                }
            }
        }
    }
}

pin_project! {
    #[project = SlotProj]
    enum Slot {
        /// To be armed for this long from the first poll.
        After { timeout: Duration },
        /// To be armed for this deadline.
        At { deadline: Instant },
        /// Beyond the clock's range: never fires.
        Never,
        Inline { #[pin] sleep: Sleep },
        Pooled { sleep: Option<Pin<Box<Sleep>>>, runtime: runtime::Id },
    }
}

impl Timer {
    /// A limit of `timeout` from the first poll.
    pub(crate) const fn after(timeout: Duration) -> Self {
        Timer {
            slot: Slot::After { timeout },
        }
    }

    /// A limit at `deadline`.
    pub(crate) const fn at(deadline: Instant) -> Self {
        Timer {
            slot: Slot::At { deadline },
        }
    }

    #[cfg(test)]
    pub(crate) fn is_armed(&self) -> bool {
        matches!(self.slot, Slot::Inline { .. } | Slot::Pooled { .. })
    }

    /// Whether the limit has passed, arming the timer if this is its first poll. A limit that
    /// has passed already (`Duration::ZERO`, a deadline in the past) is ready at once, without
    /// a timer; one beyond the clock's range is never ready and registers nothing. The timer
    /// is polled outside tokio's coop budget, so that a busy inner future cannot starve it.
    ///
    /// Like `tokio::time::sleep`, panics outside a Tokio runtime or when the runtime's timers
    /// are disabled, the first time it arms a timer.
    #[inline]
    pub(crate) fn poll_expired(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = match self.slot {
            Slot::After { timeout } if timeout.is_zero() => return Poll::Ready(()),
            Slot::After { timeout } => Instant::now().checked_add(timeout),
            Slot::At { deadline } if deadline <= Instant::now() => return Poll::Ready(()),
            Slot::At { deadline } => Some(deadline),
            Slot::Never => return Poll::Pending,
            Slot::Inline { .. } | Slot::Pooled { .. } => None,
        };
        if let Slot::After { .. } | Slot::At { .. } = self.slot {
            match deadline {
                Some(deadline) => self.as_mut().arm(deadline),
                None => {
                    self.project().slot.set(Slot::Never);
                    return Poll::Pending;
                }
            }
        }
        match self.project().slot.project() {
            SlotProj::Inline { sleep } => pin!(unconstrained(sleep)).poll(cx),
            SlotProj::Pooled {
                sleep: Some(sleep), ..
            } => pin!(unconstrained(sleep.as_mut())).poll(cx),
            _ => Poll::Pending,
        }
    }

    #[inline]
    fn arm(self: Pin<&mut Self>, deadline: Instant) {
        let pooled = POOL
            .try_with(|pool| pool.try_borrow_mut().ok()?.take(deadline))
            .ok()
            .flatten();
        self.project().slot.set(match pooled {
            Some((sleep, runtime)) => Slot::Pooled {
                sleep: Some(sleep),
                runtime,
            },
            None => Slot::Inline {
                sleep: sleep_until(deadline),
            },
        });
    }
}

/// Puts a boxed timer back into this thread's pool, or drops it.
fn put_back(mut sleep: Pin<Box<Sleep>>, runtime: runtime::Id) {
    if std::thread::panicking() {
        return;
    }
    // Forget the task's waker, so that a pooled timer neither wakes nor keeps alive the task
    // it served. A timer that fired (also when its runtime shut down, which tokio would not
    // let it be polled after) keeps no waker.
    if !sleep.is_elapsed() {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        let _ = pin!(unconstrained(sleep.as_mut())).poll(&mut cx);
    }
    // During the thread's teardown the pool is gone, and the timer is dropped as usual.
    let _ = POOL.try_with(|pool| {
        if let Ok(mut pool) = pool.try_borrow_mut() {
            pool.put_back(sleep, runtime);
        }
    });
}

impl std::fmt::Debug for Timer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let slot = match self.slot {
            Slot::After { .. } | Slot::At { .. } => "unarmed",
            Slot::Never => "never",
            Slot::Inline { .. } => "inline",
            Slot::Pooled { .. } => "pooled",
        };
        f.debug_tuple("Timer").field(&slot).finish()
    }
}

#[cfg(test)]
mod tests {
    use futures_util::task::{waker, ArcWake};
    use std::future::poll_fn;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    fn pooled() -> usize {
        POOL.with(|pool| pool.borrow().sleeps.len())
    }

    /// A timer armed for `after` from now, polled once so that it is registered, then put back.
    fn pool_one(after: Duration) {
        let timer = pin!(Timer::at(Instant::now() + after));
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        assert!(timer.poll_expired(&mut cx).is_pending());
    }

    async fn fires_after(limit: Duration) {
        let start = Instant::now();
        let mut timer = pin!(Timer::at(start + limit));
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        assert!(timer.as_mut().poll_expired(&mut cx).is_pending());
        assert_eq!(pooled(), 0, "the pooled timer was not taken");
        poll_fn(|cx| timer.as_mut().poll_expired(cx)).await;
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
    async fn boxed_timers_are_bounded_per_thread() {
        let deadline = Instant::now() + Duration::from_secs(1);
        let timers: Vec<_> = (0..BOXED_PER_THREAD + 10)
            .map(|_| {
                let mut timer = Box::pin(Timer::at(deadline));
                let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
                assert!(timer.as_mut().poll_expired(&mut cx).is_pending());
                timer
            })
            .collect();
        let kinds: Vec<_> = timers.iter().map(|timer| format!("{timer:?}")).collect();
        assert!(kinds[..BOXED_PER_THREAD]
            .iter()
            .all(|kind| kind.contains("pooled")));
        assert!(kinds[BOXED_PER_THREAD..]
            .iter()
            .all(|kind| kind.contains("inline")));
        drop(timers);
        assert_eq!(pooled(), POOL_CAPACITY);
        assert_eq!(POOL.with(|pool| pool.borrow().boxed), POOL_CAPACITY);
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
        let mut timer = Box::pin(Timer::at(Instant::now() + Duration::from_millis(10)));
        assert!(timer
            .as_mut()
            .poll_expired(&mut Context::from_waker(&task))
            .is_pending());
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
            let mut timer = pin!(Timer::at(start + Duration::from_millis(20)));
            poll_fn(|cx| timer.as_mut().poll_expired(cx)).await;
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
        let mut timer = Box::pin(Timer::after(Duration::from_secs(3600)));
        runtime.block_on(async {
            let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
            assert!(timer.as_mut().poll_expired(&mut cx).is_pending());
        });
        drop(runtime);
        drop(timer);
    }
}
