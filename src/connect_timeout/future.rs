use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::task::{unconstrained, Unconstrained};
use tokio::time::{sleep_until, Instant, Sleep};
use tracing::Span;

use super::{BoxError, ConnectTimeoutError};
use crate::trace;

pin_project! {
    /// The future of [`ConnectTimeout`](super::ConnectTimeout). `Unpin` when the inner
    /// connector's future is.
    pub struct ConnectFuture<F> {
        #[pin]
        inner: F,
        // Boxed, so that the future stays `Unpin` (hyper-util's legacy `Client` needs that).
        sleep: Option<Pin<Box<Unconstrained<Sleep>>>>,
        timeout: Duration,
        started: Option<Instant>,
        address: Option<String>,
        span: Span,
    }
}

impl<F> std::fmt::Debug for ConnectFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectFuture")
            .field("timeout", &self.timeout)
            .field("timer", &self.sleep.is_some())
            .finish_non_exhaustive()
    }
}

impl<F> ConnectFuture<F> {
    pub(super) fn new(inner: F, timeout: Duration, address: Option<String>, span: Span) -> Self {
        ConnectFuture {
            inner,
            sleep: None,
            timeout,
            started: None,
            address,
            span,
        }
    }
}

impl<F, T, E> Future for ConnectFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let started = *this.started.get_or_insert_with(Instant::now);
        if let Poll::Ready(result) = this.inner.poll(cx) {
            let outcome = if result.is_ok() { "connected" } else { "error" };
            record(this.span, started, outcome);
            return Poll::Ready(result.map_err(Into::into));
        }
        if this.sleep.is_none() {
            let Some(deadline) = started.checked_add(*this.timeout) else {
                return Poll::Pending;
            };
            *this.sleep = Some(Box::pin(unconstrained(sleep_until(deadline))));
        }
        if let Some(sleep) = this.sleep.as_mut() {
            ready!(sleep.as_mut().poll(cx));
        }
        record(this.span, started, "timeout");
        let error = ConnectTimeoutError::new(*this.timeout, this.address.take());
        Poll::Ready(Err(error.into()))
    }
}

fn record(span: &Span, started: Instant, outcome: &'static str) {
    span.record(trace::CONNECT_MS, trace::duration_ms(started.elapsed()));
    span.record(trace::CONNECT_OUTCOME, outcome);
    if outcome != "connected" {
        span.record(trace::OTEL_STATUS_CODE, "ERROR");
    }
}
