//! Turn the errors of a client service (a failed or timed-out connect, an upstream that hung
//! up) into 599, 502 and 504 responses.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use hyper_util::client::legacy::{connect::HttpConnector, Client};
//! use hyper_util::rt::TokioExecutor;
//! use tower::ServiceBuilder;
//! use tower_timeouts::{ConnectTimeoutLayer, ResponseTimeoutLayer, UpstreamFailureLayer};
//! use tower_layer::Layer;
//!
//! let connector = ConnectTimeoutLayer::new(Duration::from_secs(1)).layer(HttpConnector::new());
//! let client: Client<_, axum::body::Body> = Client::builder(TokioExecutor::new()).build(connector);
//! let upstream = ServiceBuilder::new()
//!     .layer(UpstreamFailureLayer::new())
//!     .layer(ResponseTimeoutLayer::new(Duration::from_secs(10)))
//!     .service(client);
//! # let _ = upstream;
//! ```
//!
//! # Statuses
//!
//! | the client's error | outcome | status (default) | with [`rfc9209_statuses`](UpstreamFailureLayer::rfc9209_statuses) | `Proxy-Status` `error=` |
//! |---|---|---|---|---|
//! | [`ConnectTimeoutError`](crate::ConnectTimeoutError), or an `io::Error` `TimedOut` from the connector | [`ConnectTimeout`](crate::Outcome::ConnectTimeout) | **599** Network Connect Timeout Error | 504 | `connection_timeout` |
//! | `io::Error` `ConnectionRefused` | [`ConnectFailed`](crate::Outcome::ConnectFailed) | **502** | 502 | `connection_refused` |
//! | `io::Error` `HostUnreachable`, `NetworkUnreachable`, `AddrNotAvailable` | `ConnectFailed` | 502 | 503 | `destination_unavailable` |
//! | the resolver's "dns error" | `ConnectFailed` | 502 | 502 | `dns_error` |
//! | a hyper error after connecting (closed, reset) | [`UpstreamFailed`](crate::Outcome::UpstreamFailed) | 502 | 502 | `connection_terminated` or `http_protocol_error` |
//! | anything else | `UpstreamFailed` | 502 | 500 | `proxy_internal_error` |
//!
//! A response timeout is [`ResponseTimeoutLayer`](crate::ResponseTimeoutLayer)'s: put it
//! inside this layer, around the client, for a **504** `http_response_timeout` when the
//! upstream accepted the connection but did not answer.
//!
//! The error is found anywhere in the `source()` chain, so wrapping layers do not break the
//! mapping (hyper-util's own `ConnectError` is not exported; the `io::Error` inside it is
//! reached through it). 599 responses carry hyper's `ReasonPhrase` ("Network Connect Timeout
//! Error") on HTTP/1 with the `hyper` feature (on by default).
//!
//! Upstream responses pass through untouched, an upstream's own 502 or 504 included: only the
//! responses this layer generates carry the [`Generated`](crate::Generated) marker. By default
//! `Proxy-Status` names only the error type: nothing about the upstream reaches the client
//! unless [`proxy_status_details`](UpstreamFailureLayer::proxy_status_details) is turned on.
//!
//! The service's error type is `Infallible`: every error of the inner service becomes a
//! response (an error of `poll_ready` answers the next call).

mod classify;
mod future;

pub use self::future::UpstreamFuture;

use self::future::Call;

use std::convert::Infallible;
use std::error::Error;
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};
use tower_layer::Layer;
use tower_service::Service;

use crate::record::{nothing_can_see, Joining, Recorder, Role};
use crate::response::{ResponseBody, ResponseConfig};

type BoxError = Box<dyn Error + Send + Sync>;

/// The statuses for each kind of upstream failure.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Statuses {
    rfc9209: bool,
    connect_timeout: Option<StatusCode>,
    connect_failed: Option<StatusCode>,
    upstream_failed: Option<StatusCode>,
}

/// How the layer answers an error: what its futures need.
#[derive(Clone, Debug, Default)]
pub(crate) struct Answers {
    statuses: Statuses,
    details: bool,
    responses: ResponseConfig,
}

/// A layer's configuration: the layer holds it and each of its services a clone, cheap to
/// make (what a clone would copy at length, such as a hook, is behind an `Arc` inside).
#[derive(Clone, Debug, Default)]
pub(crate) struct Config {
    answers: Answers,
    pub(crate) recorder: Recorder,
}

/// Applies [`UpstreamFailure`] to a client service: its errors become 599/502 responses.
///
/// ```
/// use http::StatusCode;
/// use tower_timeouts::UpstreamFailureLayer;
///
/// // For deployments that must not send non-standard codes: 504 for a connect timeout.
/// let strict = UpstreamFailureLayer::new().rfc9209_statuses();
/// let custom = UpstreamFailureLayer::new().connect_failed_status(StatusCode::SERVICE_UNAVAILABLE);
/// # let _ = (strict, custom);
/// ```
#[derive(Clone, Debug, Default)]
pub struct UpstreamFailureLayer {
    config: Config,
}

impl UpstreamFailureLayer {
    /// The default statuses: 599 for a connect timeout, 502 for everything else.
    pub const fn new() -> Self {
        UpstreamFailureLayer {
            config: Config {
                answers: Answers {
                    statuses: Statuses {
                        rfc9209: false,
                        connect_timeout: None,
                        connect_failed: None,
                        upstream_failed: None,
                    },
                    details: false,
                    responses: ResponseConfig::new(),
                },
                recorder: Recorder::new(),
            },
        }
    }

    /// The statuses RFC 9209 recommends for each error type: 504 for a connect timeout, 503
    /// for an unreachable destination, 502 for a refused connection, and so on. Explicit
    /// statuses set with the other methods still win.
    pub fn rfc9209_statuses(mut self) -> Self {
        self.config.answers.statuses.rfc9209 = true;
        self
    }

    /// The status for a connect timeout (default 599).
    pub fn connect_timeout_status(mut self, status: StatusCode) -> Self {
        self.config.answers.statuses.connect_timeout = Some(status);
        self
    }

    /// The status for a connect that failed outright (default 502).
    pub fn connect_failed_status(mut self, status: StatusCode) -> Self {
        self.config.answers.statuses.connect_failed = Some(status);
        self
    }

    /// The status for a failure after connecting (default 502).
    pub fn upstream_failed_status(mut self, status: StatusCode) -> Self {
        self.config.answers.statuses.upstream_failed = Some(status);
        self
    }

    /// Adds `details="<the error's innermost cause>"` to `Proxy-Status`. Off by default: it can
    /// reveal configuration and topology (RFC 9209 §6).
    pub fn proxy_status_details(mut self, enabled: bool) -> Self {
        self.config.answers.details = enabled;
        self
    }

    crate::response::response_methods!(config.answers.responses);
    crate::record::recorder_methods!(config.recorder);
}

impl<S> Layer<S> for UpstreamFailureLayer {
    type Service = UpstreamFailure<S>;

    fn layer(&self, inner: S) -> Self::Service {
        UpstreamFailure {
            inner,
            config: self.config.clone(),
            not_ready: None,
        }
    }
}

/// Answers the errors of a client service with generated responses. Made by
/// [`UpstreamFailureLayer`]; see the [module docs](crate::upstream).
#[derive(Debug)]
pub struct UpstreamFailure<S> {
    inner: S,
    config: Config,
    not_ready: Option<BoxError>,
}

impl<S: Clone> Clone for UpstreamFailure<S> {
    fn clone(&self) -> Self {
        UpstreamFailure {
            inner: self.inner.clone(),
            config: self.config.clone(),
            not_ready: None,
        }
    }
}

impl<S> UpstreamFailure<S> {
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

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for UpstreamFailure<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ResBody: http_body::Body,
    ResBody::Data: From<bytes::Bytes>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = Infallible;
    type Future = UpstreamFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.not_ready.is_none() {
            if let Err(error) = std::task::ready!(self.inner.poll_ready(cx)) {
                self.not_ready = Some(error.into());
            }
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let grpc = self.config.answers.responses.grpc_of(request.headers());
        let share = self
            .config
            .recorder
            .start(&mut request, Joining::new(Role::Client));
        let _calling = share.calling();
        let authority = (!nothing_can_see())
            .then(|| request.uri().authority().cloned())
            .flatten();
        // An error of `poll_ready` is answered at the first poll.
        let call = match self.not_ready.take() {
            Some(error) => Call::NotReady { error: Some(error) },
            None => Call::Called {
                future: self.inner.call(request),
            },
        };
        UpstreamFuture::new(call, share, self.config.answers.clone(), grpc, authority)
    }
}
