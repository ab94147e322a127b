use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Response, StatusCode};
use pin_project_lite::pin_project;
use tokio::time::Instant;

use crate::deadline::Limit;
use crate::outcome::Outcome;
use crate::record::Share;
use crate::response::{ResponseBody, ResponseConfig};
use crate::timer::Timer;

pin_project! {
    /// The response future of [`ResponseTimeout`](super::ResponseTimeout).
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
        // Armed at the first poll that finds the response not ready.
        #[pin]
        timer: Timer,
        // The limit, as reported; `None` when it never fires (beyond the clock's range).
        timeout: Option<Duration>,
        share: Share,
        status: StatusCode,
        responses: ResponseConfig,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            let mut this = this.project();
            if let StateProj::Running { .. } = this.state.as_mut().project() {
                this.share.drop_inner(|| this.state.set(State::Done));
                this.share.dropped();
            }
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Running { #[pin] inner: F },
        Done,
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("timeout", &self.timeout)
            .field("timer", &self.timer)
            .field("share", &self.share)
            .finish_non_exhaustive()
    }
}

impl<F> ResponseFuture<F> {
    #[inline(always)]
    pub(super) fn new(
        inner: F,
        limit: Limit,
        share: Share,
        status: StatusCode,
        responses: ResponseConfig,
    ) -> Self {
        let (timeout, timer) = match limit {
            Limit::After(timeout) => (timeout, Timer::new()),
            Limit::At(at, left) => (left, Timer::due(at)),
        };
        ResponseFuture {
            state: State::Running { inner },
            timer,
            timeout: Some(timeout),
            share,
            status,
            responses,
        }
    }
}

#[cfg(test)]
impl<F> ResponseFuture<F> {
    /// Whether a timer was created (and so registered when polled).
    pub(super) fn has_timer(&self) -> bool {
        self.timer.is_armed()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let StateProj::Running { inner } = this.state.as_mut().project() else {
            panic!("ResponseFuture polled after completion");
        };
        // The inner future first: a response that is ready wins a tie with the timer, and a
        // response ready at its first poll never touches the clock.
        if let Poll::Ready(result) = this.share.poll(inner, cx) {
            // Finished: nothing inside has anything left to record.
            this.state.set(State::Done);
            this.share.head(&result);
            return Poll::Ready(result.map(|response| response.map(ResponseBody::new)));
        }

        if !this.timer.is_armed() {
            let deadline = this.timer.due_deadline().or_else(|| {
                this.timeout
                    .and_then(|timeout| Instant::now().checked_add(timeout))
            });
            let Some(deadline) = deadline else {
                *this.timeout = None;
                return Poll::Pending;
            };
            this.timer.as_mut().arm(deadline);
        }
        ready!(this.timer.poll(cx));

        let timeout = this.timeout.unwrap_or_default();
        let outcome = Outcome::response_timeout(timeout, *this.status);
        // Recorded before the inner future is dropped, so that a layer inside does not take
        // the drop for a client that left.
        this.share.decide(outcome.clone());
        this.share.drop_inner(|| this.state.set(State::Done));
        Poll::Ready(Ok(this.responses.generate(outcome)))
    }
}
