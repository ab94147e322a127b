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
//! - The limit is the earliest of the layer's own (or a [`Deadline`] a user put into the
//!   request in its place), the caller's deadline (`grpc-timeout` on a gRPC request, less a
//!   margin; see [`deadline`]), and a deadline in force that a layer put into
//!   the request. While the layer calls and polls the inner service, that deadline is in
//!   force: [`Deadline::current`].
//! - The layer's own limit runs from the **first poll** of the response future. Servers poll
//!   it at once, so this is the time from `call` for all practical purposes, and it lets a
//!   response that is ready at its first poll skip the clock and the timer entirely. A
//!   deadline (the caller's, a user's) is fixed at `call`.
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
//! - `Duration::ZERO` (or a [`Deadline`] already past, or `grpc-timeout: 0n`) times out every
//!   request whose response is not ready at its first poll, without a timer. A limit beyond the
//!   clock's range (`Duration::MAX`) never fires and never registers a timer. Neither panics.
//! - For a gRPC request, the answer is a trailers-only `DEADLINE_EXCEEDED` (HTTP 200); see
//!   [`grpc`].
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
pub use self::layer::{ResponseTimeoutLayer, DEFAULT_DEADLINE_MARGIN};

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use crate::deadline::{self, Deadline, When};
use crate::grpc;
use crate::record::{nothing_can_see, Budget, Joining, Recorder, Role, Share};
use crate::response::{ResponseBody, ResponseConfig};

/// A layer's configuration: the layer holds it and each of its services a clone, cheap to
/// make (what a clone would copy at length, such as a hook, is behind an `Arc` inside).
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) timeout: Duration,
    pub(crate) status: StatusCode,
    pub(crate) responses: ResponseConfig,
    pub(crate) recorder: Recorder,
    /// `None` for the defaults, so that a service, which axum clones for every request, stays
    /// small and costs nothing more to clone.
    pub(crate) incoming: Option<Arc<Incoming>>,
}

/// Which deadlines a caller may send, and the margin taken off them.
#[derive(Clone, Debug)]
pub(crate) struct Incoming {
    pub(crate) grpc_timeout: bool,
    pub(crate) header: Option<HeaderName>,
    pub(crate) margin: Duration,
}

/// The defaults: `grpc-timeout` honoured, no header, a margin of
/// [`DEFAULT_DEADLINE_MARGIN`].
static DEFAULT_INCOMING: Incoming = Incoming {
    grpc_timeout: true,
    header: None,
    margin: DEFAULT_DEADLINE_MARGIN,
};

impl Config {
    pub(crate) fn incoming(&self) -> &Incoming {
        self.incoming.as_deref().unwrap_or(&DEFAULT_INCOMING)
    }

    pub(crate) fn incoming_mut(&mut self) -> &mut Incoming {
        Arc::make_mut(
            self.incoming
                .get_or_insert_with(|| Arc::new(DEFAULT_INCOMING.clone())),
        )
    }
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
    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let limit = self.limit(&mut request);
        // Apart from the path where nothing can see a recording, which takes no further
        // reference to the request: it is handed on without a copy.
        if !nothing_can_see() {
            return self.call_recorded(request, limit);
        }
        let inner = {
            let _scope = deadline::enter(limit.when);
            self.inner.call(request)
        };
        ResponseFuture::new(inner, Share::none(), limit, &self.config)
    }
}

/// A request's limit, as a layer works it out at `call`.
#[derive(Debug)]
pub(super) struct Limit {
    /// When it fires.
    pub(super) when: When,
    /// The limit as reported: the time from `call` to the deadline.
    pub(super) timeout: Duration,
    /// The request's `content-type`, when it is gRPC (and gets gRPC answers). Boxed, so that
    /// the response future of every other request stays small.
    pub(super) grpc: Option<Box<HeaderValue>>,
}

impl<S> ResponseTimeout<S> {
    /// The limit of `request`: the earliest of the layer's own limit (or the [`Deadline`] a
    /// user put into the request, in its place), the caller's deadline, and the deadline in
    /// force that a layer put into the request (an outer layer's that honoured the caller's
    /// deadline, a [`PropagateDeadline`](crate::PropagateDeadline)'s). A caller's deadline
    /// goes into the request's extensions, as the deadline in force.
    #[inline(always)]
    fn limit<B>(&self, request: &mut Request<B>) -> Limit {
        let config = &self.config;
        let given = request.extensions().get::<Deadline>().copied();
        let content_type = grpc::grpc_content_type(request.headers());
        let caller = match self.budget(request, content_type.is_some()) {
            Some(Budget::Given(budget)) => Some(budget.saturating_sub(config.incoming().margin)),
            _ => None,
        };
        let grpc = content_type
            .filter(|_| config.responses.answers_grpc())
            .map(|content_type| Box::new(content_type.clone()));
        if given.is_none() && caller.is_none() {
            // The layer's own limit alone: from the first poll that finds the response not
            // ready, so that a response ready at once reads no clock.
            return Limit {
                when: When::After(config.timeout),
                timeout: config.timeout,
                grpc,
            };
        }
        let now = Instant::now();
        // The layer's own limit, or a user's deadline in its place.
        let mut deadline = match given {
            Some(given) if given.in_force_parts().is_none() => given.instant_from(now),
            _ => now.checked_add(config.timeout),
        };
        let mut timeout = match deadline {
            Some(deadline) => deadline.saturating_duration_since(now),
            None => Duration::MAX,
        };
        // Capped by the deadline in force that a layer put into the request, and by the
        // caller's, each reported as the limit it stands for.
        let mut cap = |at: Instant, limit: Duration| {
            if deadline.is_none_or(|deadline| at < deadline) {
                deadline = Some(at);
                timeout = limit;
            }
        };
        if let Some((at, limit)) = given.and_then(|given| given.in_force_parts()) {
            cap(at, limit);
        }
        if let Some(limit) = caller {
            cap(now.checked_add(limit).unwrap_or(now), limit);
            if let Some(deadline) = deadline {
                request
                    .extensions_mut()
                    .insert(Deadline::in_force(deadline, timeout));
            }
        }
        Limit {
            when: When::At(deadline),
            timeout,
            grpc,
        }
    }

    /// The deadline `request` came with: `grpc-timeout` for a gRPC request, or the configured
    /// header.
    #[inline(always)]
    fn budget<B>(&self, request: &Request<B>, is_grpc: bool) -> Option<Budget> {
        let incoming = self.config.incoming();
        let headers = request.headers();
        let parsed = if is_grpc && incoming.grpc_timeout {
            let value = headers.get(grpc::GRPC_TIMEOUT)?;
            (value, grpc::parse_timeout(value.as_bytes()).ok())
        } else {
            let value = headers.get(incoming.header.as_ref()?)?;
            (value, deadline::parse_millis(value.as_bytes()))
        };
        Some(match parsed {
            (_, Some(budget)) => Budget::Given(budget),
            (value, None) => Budget::Invalid(value.clone()),
        })
    }

    /// [`Service::call`] when something can see a recording.
    #[inline(never)]
    fn call_recorded<ReqBody>(
        &mut self,
        mut request: Request<ReqBody>,
        limit: Limit,
    ) -> ResponseFuture<S::Future>
    where
        S: Service<Request<ReqBody>>,
    {
        // The deadline the request came with, for the span: read again here, so that the
        // path where nothing can see a recording carries nothing for it.
        let is_grpc = grpc::grpc_content_type(request.headers()).is_some();
        let joining = Joining {
            limit: Some(limit.timeout),
            budget: self.budget(&request, is_grpc),
            ..Joining::new(Role::Server)
        };
        let share = self.config.recorder.start(&mut request, joining);
        let inner = {
            let _calling = share.calling();
            let _scope = deadline::enter(limit.when);
            self.inner.call(request)
        };
        ResponseFuture::new(inner, share, limit, &self.config)
    }
}

#[cfg(test)]
mod tests;
