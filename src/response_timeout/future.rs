use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode};
use pin_project_lite::pin_project;

use super::{Config, Limit};
use crate::deadline::{self, When};
use crate::outcome::Outcome;
use crate::record::{Guarded, Share};
use crate::response::{ResponseBody, ResponseConfig};
use crate::timer::Timer;

pin_project! {
    /// The response future of [`ResponseTimeout`](super::ResponseTimeout).
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Guarded<F>,
        #[pin]
        timer: Timer,
        // The limit, as reported.
        timeout: Duration,
        status: StatusCode,
        // The request's content-type, when it is gRPC.
        grpc: Option<Box<HeaderValue>>,
        responses: ResponseConfig,
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("timeout", &self.timeout)
            .field("timer", &self.timer)
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<F> ResponseFuture<F> {
    #[inline(always)]
    pub(super) fn new(inner: F, share: Share, limit: Limit, config: &Config) -> Self {
        ResponseFuture {
            inner: Guarded::new(inner, share),
            timer: match limit.when {
                When::At(Some(deadline)) => Timer::at(deadline),
                When::At(None) => Timer::never(),
                When::After(timeout) => Timer::after(timeout),
            },
            timeout: limit.timeout,
            status: config.status,
            grpc: limit.grpc,
            responses: config.responses.clone(),
        }
    }
}

#[cfg(test)]
impl<F> ResponseFuture<F> {
    /// Whether a timer was armed (and so registered).
    pub(super) fn has_timer(&self) -> bool {
        self.timer.is_armed()
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body,
    B::Data: From<bytes::Bytes>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // The inner future first: a response that is ready wins a tie with the timer, and a
        // response ready at its first poll never registers a timer.
        let polled = {
            // The timer's deadline is in force while the inner future is polled.
            let _scope = deadline::enter(this.timer.when());
            this.inner.as_mut().poll(cx)
        };
        if polled.is_ready() {
            let finished = this.inner.finish();
            // The response is mapped where it is (no binding to move it into), and in each
            // branch, so that it is written straight where it goes.
            let wrap = |result: Result<Response<B>, E>| result.map(|r| r.map(ResponseBody::new));
            if finished.is_nothing(None) {
                return polled.map(wrap);
            }
            return polled.map(|result| finished.respond(wrap(result), None));
        }
        ready!(this.timer.poll_expired(cx));
        let finished = this.inner.finish();
        let outcome = Outcome::response_timeout(*this.timeout, *this.status);
        let response = this.responses.generate(outcome, this.grpc.as_deref());
        Poll::Ready(finished.respond(Ok(response), None))
    }
}
