//! Answer with a 504 Gateway Timeout response when the inner service takes too long.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use axum::{routing::get, Router};
//! use tower_timeouts::ResponseTimeoutLayer;
//!
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     // No HandleErrorLayer: a timeout is a response, and the error type stays Infallible.
//!     .layer(ResponseTimeoutLayer::new(Duration::from_secs(10)));
//! # let _ = app;
//! ```
//!
//! # Behaviour
//!
//! - The time runs from the **first poll** of the response future. Servers poll it at once, so
//!   this is the time from `call` for all practical purposes, and it lets a response that is
//!   ready at its first poll skip the clock and the timer entirely.
//! - When the time is up, the inner future is dropped as *abandoned* (so that no layer inside
//!   takes the drop for a client leaving; see [`record`](crate::record)) and the layer answers
//!   with a generated response: 504, `Proxy-Status: tower-timeouts; error=http_response_timeout`, a
//!   short `text/plain` body, and a [`Generated`](crate::Generated) marker in its extensions.
//!   The status, the proxy name and the whole response are configurable.
//! - The service's error type is the inner one: an inner error passes through untouched.
//! - A response that is ready wins a tie with the timer: the inner future is always polled
//!   first.
//! - The timer is polled outside tokio's cooperative budget, so an inner future that keeps the
//!   task busy cannot starve it (tokio#4314).
//! - The timer is a plain `tokio::time::Sleep` in the response future, registered at the first
//!   poll that finds the response not ready and cancelled when the future is dropped, as
//!   `tower::timeout`'s.
//! - `Duration::ZERO` (or a [`Deadline`] already past) times out every request whose response
//!   is not ready at its first poll, without a timer. A limit beyond the clock's range
//!   (`Duration::MAX`) never fires and never registers a timer. Neither panics.
//! - A [`Deadline`] in the request's extensions replaces the configured
//!   limit for that request.
//!
//! # Differences from `tower::timeout` and `tower_http::timeout`
//!
//! `tower::timeout::Timeout` fails with a boxed `Elapsed` error, which hyper answers by closing
//! the connection and axum only accepts behind `HandleErrorLayer`. tower-http's `TimeoutLayer`
//! answers with an empty-bodied response but needs `ResBody: Default`, polls its sleep first
//! (so it always registers a timer and wins ties) and marks nothing. This layer answers with a
//! marked, explained response, keeps the inner body type in an enum
//! ([`ResponseBody`]) and records the outcome.

mod future;
mod layer;

pub use self::future::ResponseFuture;
pub use self::layer::ResponseTimeoutLayer;

use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tower_layer::Layer;
use tower_service::Service;

use crate::deadline::Deadline;
use crate::record::{nothing_can_see, Joining, Recorder, Role, Share};
use crate::response::{ResponseBody, ResponseConfig};
use crate::timer::Timer;

/// A layer's configuration: the layer holds it and each of its services a clone, cheap to
/// make (what a clone would copy at length, such as a hook, is behind an `Arc` inside).
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) timeout: Duration,
    pub(crate) status: StatusCode,
    pub(crate) responses: ResponseConfig,
    pub(crate) recorder: Recorder,
}

/// Answers with a generated response when the inner service does not respond in time.
///
/// Made by [`ResponseTimeoutLayer`]; see the [module docs](crate::response_timeout).
#[derive(Clone, Debug)]
pub struct ResponseTimeout<S> {
    inner: S,
    config: Config,
}

impl<S> ResponseTimeout<S> {
    /// Wraps `inner` with a limit of `timeout` and the default settings.
    pub fn new(inner: S, timeout: Duration) -> Self {
        ResponseTimeoutLayer::new(timeout).layer(inner)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ResponseTimeout<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: http_body::Body,
    ResBody::Data: From<bytes::Bytes>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // Apart from the path where nothing can see a recording, which takes no reference to
        // the request: it is handed on without a copy.
        if !nothing_can_see() {
            return self.call_recorded(request);
        }
        let (timeout, timer) = self.limit(&request);
        ResponseFuture::new(
            self.inner.call(request),
            Share::none(),
            timer,
            timeout,
            self.config.status,
            self.config.responses.clone(),
        )
    }
}

impl<S> ResponseTimeout<S> {
    /// The limit of `request` (as reported, and its timer): its [`Deadline`], or the layer's.
    #[inline(always)]
    fn limit<B>(&self, request: &Request<B>) -> (Duration, Timer) {
        match request.extensions().get::<Deadline>() {
            Some(deadline) => deadline.timer(),
            None => (self.config.timeout, Timer::after(self.config.timeout)),
        }
    }

    /// [`Service::call`] when something can see a recording.
    #[inline(never)]
    fn call_recorded<ReqBody>(&mut self, mut request: Request<ReqBody>) -> ResponseFuture<S::Future>
    where
        S: Service<Request<ReqBody>>,
    {
        let (timeout, timer) = self.limit(&request);
        let joining = Joining {
            role: Role::Server,
            limit: Some(timeout),
            watches_disconnects: false,
        };
        let share = self.config.recorder.start(&mut request, joining);
        let _calling = share.calling();
        ResponseFuture::new(
            self.inner.call(request),
            share,
            timer,
            timeout,
            self.config.status,
            self.config.responses.clone(),
        )
    }
}

#[cfg(test)]
mod tests;
