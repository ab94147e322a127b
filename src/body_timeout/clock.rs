//! A body's two limits, idle and total, on one timer.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Instant;

use super::{BodyTimeoutError, Limits, Which};
use crate::deadline::{earliest, When};
use crate::timer::Timer;

pin_project! {
    /// A body's limits: an idle one between frames, measured while the body is waited for, and
    /// a total one from a start the owner chose. One timer serves both, aimed at whichever
    /// comes first, and is touched only when the body is pending: a frame that is ready at
    /// once reads no clock and registers no timer (with a total limit armed, it costs an
    /// atomic load).
    pub(crate) struct Clock {
        idle: Option<Duration>,
        // The total limit, and when it passes.
        total: Option<(Duration, Instant)>,
        // Whether the body was pending at its last poll: the idle wait is under way.
        waiting: bool,
        #[pin]
        timer: Timer,
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clock")
            .field("idle", &self.idle)
            .field("total", &self.total.map(|(limit, _)| limit))
            .field("timer", &self.timer)
            .finish()
    }
}

impl Clock {
    /// The clock of `limits`, the total one counted from `start` (read only when there is one).
    pub(crate) fn new(limits: Limits, start: impl FnOnce() -> Instant) -> Self {
        let total = limits.total.map(|limit| {
            // A limit beyond the clock's range never passes: the far future stands for it.
            let start = start();
            let at = start
                .checked_add(limit)
                .unwrap_or_else(|| start + Duration::from_secs(86_400 * 365 * 30));
            (limit, at)
        });
        Clock {
            idle: limits.idle,
            total,
            waiting: false,
            timer: Timer::never(),
        }
    }

    /// Whether a limit fired, once the body returned `polled`:
    ///
    /// - pending: the idle wait starts (at the first pending poll after a frame), and the timer
    ///   is polled, which registers it;
    /// - a frame: the idle wait is over. With `frames_count_late` (a response body), a total
    ///   limit that passed ends the body even though frames keep coming; a request body is
    ///   only ever blamed while it is waited for.
    /// - the end: nothing fires any more.
    pub(crate) fn fired<T>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        polled: &Poll<Option<T>>,
        frames_count_late: bool,
    ) -> Option<BodyTimeoutError> {
        let mut this = self.project();
        match polled {
            Poll::Ready(None) => None,
            Poll::Ready(Some(_)) => {
                *this.waiting = false;
                if !frames_count_late || !this.timer.has_fired() {
                    return None;
                }
                let (limit, at) = (*this.total)?;
                if armed_at(&this.timer).is_some_and(|armed| armed >= at) {
                    return Some(BodyTimeoutError::new(Which::Total, limit));
                }
                // An idle deadline passed while frames kept coming: aim at the total one.
                this.timer.reset_at(at);
                None
            }
            Poll::Pending => {
                if !*this.waiting {
                    *this.waiting = true;
                    let idle = this.idle.map(|idle| Instant::now() + idle);
                    match earliest(idle, this.total.map(|(_, at)| at)) {
                        // Aimed there already (a total limit alone): no new registration.
                        Some(deadline) if armed_at(&this.timer) == Some(deadline) => {}
                        Some(deadline) => this.timer.as_mut().reset_at(deadline),
                        None => return None,
                    }
                }
                this.timer
                    .as_mut()
                    .poll_expired(cx)
                    .is_ready()
                    .then(|| match *this.total {
                        Some((limit, at)) if armed_at(&this.timer).is_some_and(|d| d >= at) => {
                            BodyTimeoutError::new(Which::Total, limit)
                        }
                        _ => BodyTimeoutError::new(Which::Idle, this.idle.unwrap_or_default()),
                    })
            }
        }
    }
}

/// The deadline the timer is aimed at.
fn armed_at(timer: &Pin<&mut Timer>) -> Option<Instant> {
    match timer.when() {
        When::At(at) => at,
        When::After(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;

    use super::*;

    fn noop_cx() -> Context<'static> {
        Context::from_waker(std::task::Waker::noop())
    }

    const PENDING: Poll<Option<()>> = Poll::Pending;
    const FRAME: Poll<Option<()>> = Poll::Ready(Some(()));

    async fn wait_fired(clock: &mut Pin<&mut Clock>, late: bool) -> BodyTimeoutError {
        std::future::poll_fn(|cx| match clock.as_mut().fired(cx, &PENDING, late) {
            Some(fired) => Poll::Ready(fired),
            None => Poll::Pending,
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn idle_counts_only_while_waited_for_and_restarts_after_each_frame() {
        let idle = Duration::from_secs(1);
        let mut clock = pin!(Clock::new(
            Limits {
                idle: Some(idle),
                total: None
            },
            Instant::now
        ));
        // Not waited for: nothing counts.
        tokio::time::advance(Duration::from_secs(10)).await;
        let start = Instant::now();
        assert!(clock
            .as_mut()
            .fired(&mut noop_cx(), &PENDING, true)
            .is_none());
        tokio::time::advance(Duration::from_millis(900)).await;
        assert!(clock.as_mut().fired(&mut noop_cx(), &FRAME, true).is_none());
        // A new wait: a full idle limit again.
        let fired = wait_fired(&mut clock, true).await;
        assert_eq!(start.elapsed(), Duration::from_millis(1900));
        assert_eq!((fired.is_idle(), fired.limit()), (true, idle));
    }

    #[tokio::test(start_paused = true)]
    async fn total_counts_from_the_start_and_a_response_body_is_cut_even_when_frames_keep_coming() {
        let total = Duration::from_secs(2);
        let start = Instant::now();
        let limits = Limits {
            idle: Some(Duration::from_millis(500)),
            total: Some(total),
        };
        let mut clock = pin!(Clock::new(limits, Instant::now));
        // Frames arrive just inside the idle limit, forever.
        let fired = loop {
            assert!(clock
                .as_mut()
                .fired(&mut noop_cx(), &PENDING, true)
                .is_none());
            tokio::time::advance(Duration::from_millis(400)).await;
            if let Some(fired) = clock.as_mut().fired(&mut noop_cx(), &FRAME, true) {
                break fired;
            }
            assert!(start.elapsed() < Duration::from_secs(3));
        };
        assert_eq!((fired.is_idle(), fired.limit()), (false, total));
        assert!(start.elapsed() >= total);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_body_is_blamed_only_while_it_is_waited_for() {
        let total = Duration::from_secs(1);
        let limits = Limits {
            idle: None,
            total: Some(total),
        };
        let mut clock = pin!(Clock::new(limits, Instant::now));
        assert!(clock
            .as_mut()
            .fired(&mut noop_cx(), &PENDING, false)
            .is_none());
        tokio::time::advance(Duration::from_secs(5)).await;
        // The handler was busy; the frame was there when it came back.
        assert!(clock
            .as_mut()
            .fired(&mut noop_cx(), &FRAME, false)
            .is_none());
        // Waiting now, past the total: it fires.
        let fired = wait_fired(&mut clock, false).await;
        assert_eq!(fired.limit(), total);
    }

    #[tokio::test(start_paused = true)]
    async fn no_limits_and_absurd_limits_never_fire() {
        for limits in [
            Limits::default(),
            Limits {
                idle: None,
                total: Some(Duration::MAX),
            },
        ] {
            let mut clock = pin!(Clock::new(limits, Instant::now));
            assert!(clock
                .as_mut()
                .fired(&mut noop_cx(), &PENDING, true)
                .is_none());
            tokio::time::advance(Duration::from_secs(86_400)).await;
            assert!(clock
                .as_mut()
                .fired(&mut noop_cx(), &PENDING, true)
                .is_none());
        }
    }
}
