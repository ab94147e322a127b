//! The timer of a response limit: armed at the first poll that finds the response not ready,
//! so that a response ready at once never registers a timer (nor, for a limit from that poll,
//! reads the clock).
//!
//! A plain `tokio::time::Sleep`, kept in the response future as `tower::timeout` keeps its own:
//! registered when first polled, cancelled when dropped. An earlier version kept finished
//! timers, still registered, in a per-thread pool for the next response to re-arm without
//! tokio's timer lock; measured side by side (`benches/overhead.rs`), re-arming cost more than
//! registering and cancelling a fresh timer except when both workers of a multi-thread
//! runtime contended for that lock, and a pooled timer was one more deadline that a paused
//! clock (`tokio::time::pause`) auto-advanced to in users' tests.

use std::future::Future;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};

use std::time::Duration;

use pin_project_lite::pin_project;

use crate::deadline::When;
use tokio::task::unconstrained;
use tokio::time::{sleep_until, Instant, Sleep};

pin_project! {
    /// A response's limit.
    pub(crate) struct Timer {
        #[pin]
        slot: Slot,
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
        Armed { #[pin] sleep: Sleep },
    }
}

impl Timer {
    /// A limit of `timeout` from the first poll.
    pub(crate) const fn after(timeout: Duration) -> Self {
        Timer {
            slot: Slot::After { timeout },
        }
    }

    /// A limit that never fires.
    pub(crate) const fn never() -> Self {
        Timer { slot: Slot::Never }
    }

    /// A limit at `deadline`.
    pub(crate) const fn at(deadline: Instant) -> Self {
        Timer {
            slot: Slot::At { deadline },
        }
    }

    /// When the timer fires: a limit from the first poll until it is armed, then the deadline
    /// it is armed for.
    pub(crate) fn when(&self) -> When {
        match &self.slot {
            Slot::After { timeout } => When::After(*timeout),
            Slot::At { deadline } => When::At(Some(*deadline)),
            Slot::Armed { sleep } => When::At(Some(sleep.deadline())),
            Slot::Never => When::At(None),
        }
    }

    /// Aims the timer at `deadline`: the armed timer is moved (one registration, where a new one
    /// would be a deregistration and a registration), an unarmed one armed at its next poll.
    #[inline]
    pub(crate) fn reset_at(self: Pin<&mut Self>, deadline: Instant) {
        let mut slot = self.project().slot;
        match slot.as_mut().project() {
            SlotProj::Armed { sleep } => sleep.reset(deadline),
            _ => slot.set(Slot::At { deadline }),
        }
    }

    /// Whether the armed timer has fired, without reading the clock or polling it: tokio's
    /// driver marks it when it fires.
    #[inline]
    pub(crate) fn has_fired(&self) -> bool {
        match &self.slot {
            Slot::Armed { sleep } => sleep.is_elapsed(),
            _ => false,
        }
    }

    #[cfg(test)]
    pub(crate) fn is_armed(&self) -> bool {
        matches!(self.slot, Slot::Armed { .. })
    }

    /// Whether the limit has passed, arming the timer if this is its first poll. A limit that
    /// has passed already (a zero limit, a deadline in the past) is ready at once, without
    /// a timer; one beyond the clock's range is never ready and registers nothing. The timer
    /// is polled outside tokio's coop budget, so that a busy inner future cannot starve it
    /// (tokio#4314).
    ///
    /// Like `tokio::time::sleep`, panics outside a Tokio runtime or when the runtime's timers
    /// are disabled, the first time it arms a timer.
    #[inline]
    pub(crate) fn poll_expired(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut slot = self.as_mut().project().slot;
        let deadline = match slot.as_mut().project() {
            SlotProj::After { timeout } if timeout.is_zero() => return Poll::Ready(()),
            SlotProj::After { timeout } => Instant::now().checked_add(*timeout),
            SlotProj::At { deadline } if *deadline <= Instant::now() => return Poll::Ready(()),
            SlotProj::At { deadline } => Some(*deadline),
            SlotProj::Never | SlotProj::Armed { .. } => None,
        };
        if let SlotProj::After { .. } | SlotProj::At { .. } = slot.as_mut().project() {
            slot.set(match deadline {
                Some(deadline) => Slot::Armed {
                    sleep: sleep_until(deadline),
                },
                None => Slot::Never,
            });
        }
        match slot.project() {
            SlotProj::Armed { sleep } => pin!(unconstrained(sleep)).poll(cx),
            _ => Poll::Pending,
        }
    }
}

impl std::fmt::Debug for Timer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let slot = match self.slot {
            Slot::After { .. } | Slot::At { .. } => "unarmed",
            Slot::Never => "never",
            Slot::Armed { .. } => "armed",
        };
        f.debug_tuple("Timer").field(&slot).finish()
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;

    fn noop_cx() -> Context<'static> {
        Context::from_waker(std::task::Waker::noop())
    }

    #[tokio::test(start_paused = true)]
    async fn it_arms_at_the_first_poll_and_fires_at_the_deadline() {
        let start = Instant::now();
        let mut timer = pin!(Timer::at(start + Duration::from_secs(1)));
        assert!(!timer.is_armed());
        assert!(timer.as_mut().poll_expired(&mut noop_cx()).is_pending());
        assert!(timer.is_armed());
        poll_fn(|cx| timer.as_mut().poll_expired(cx)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_limit_from_the_first_poll_is_measured_from_it() {
        let mut timer = pin!(Timer::after(Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(5)).await;
        let start = Instant::now();
        assert_eq!(timer.when(), When::After(Duration::from_secs(1)));
        assert!(timer.as_mut().poll_expired(&mut noop_cx()).is_pending());
        assert_eq!(timer.when(), When::At(Some(start + Duration::from_secs(1))));
        poll_fn(|cx| timer.as_mut().poll_expired(cx)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_limit_already_passed_is_ready_at_once_without_a_timer() {
        for mut timer in [
            Box::pin(Timer::after(Duration::ZERO)),
            Box::pin(Timer::at(Instant::now())),
            Box::pin(Timer::at(Instant::now() - Duration::from_millis(1))),
        ] {
            assert!(timer.as_mut().poll_expired(&mut noop_cx()).is_ready());
            assert!(!timer.is_armed());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_limit_beyond_the_clock_never_fires_and_registers_nothing() {
        let mut timer = pin!(Timer::after(Duration::MAX));
        assert!(timer.as_mut().poll_expired(&mut noop_cx()).is_pending());
        assert!(!timer.is_armed());
        tokio::time::advance(Duration::from_secs(3600 * 24 * 365)).await;
        assert!(timer.as_mut().poll_expired(&mut noop_cx()).is_pending());
    }
}
