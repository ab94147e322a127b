//! Fail a connector that does not establish the connection in time, with a typed
//! [`ConnectTimeoutError`].
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use hyper_util::client::legacy::{connect::HttpConnector, Client};
//! use hyper_util::rt::TokioExecutor;
//! use tower_timeouts::ConnectTimeoutLayer;
//! use tower_layer::Layer;
//!
//! let connector = ConnectTimeoutLayer::new(Duration::from_secs(2)).layer(HttpConnector::new());
//! let client: Client<_, String> = Client::builder(TokioExecutor::new()).build(connector);
//! # let _ = client;
//! ```
//!
//! # Behaviour
//!
//! - It wraps any connector, that is any `Service<http::Uri>`: hyper-util's `HttpConnector`, a
//!   TLS connector around it, a Unix-socket connector, your own. Its future is `Unpin + Send`
//!   (the timer is boxed, and only when the connect is not ready at its first poll), so it is
//!   usable as the connector of hyper-util's legacy `Client` and before `hyper::client::conn`
//!   handshakes.
//! - It times the **whole** connector: name resolution, TCP, TLS, whatever the inner
//!   connector does before it yields a connection.
//! - When the connector is called for an upstream call made through a
//!   [`PropagateDeadlineLayer`](crate::PropagateDeadlineLayer) (hyper-util's client connects
//!   as the call is polled), the limit is what is left of the call's deadline if that is
//!   shorter; see [`propagate`](crate::propagate).
//! - Errors are boxed (`tower::BoxError` style): a timeout is a [`ConnectTimeoutError`], any
//!   other error is the inner one, boxed. Find either by walking `source()` from the client's
//!   error; [`UpstreamFailureLayer`](crate::UpstreamFailureLayer) does that for you.
//! - Each attempt is a `connect` span (a child of the current one, so of the request's span
//!   when the client is called from a handler) with `server.address`, `server.port`,
//!   `tower_timeouts.connect_ms` and `tower_timeouts.connect_outcome` (`connected`,
//!   `timeout`, `error`).
//!
//! # Compared with `HttpConnector::set_connect_timeout`
//!
//! hyper-util's own setting times only the TCP connect (no DNS, no TLS) and divides its budget
//! among the resolved addresses. This layer times everything, once. When both are set,
//! whichever fires first ends the attempt: the layer's as a [`ConnectTimeoutError`], the
//! connector's as an `io::Error` of kind `TimedOut` inside the connector's error. Both become
//! [`Outcome::ConnectTimeout`](crate::Outcome::ConnectTimeout) in
//! [`UpstreamFailureLayer`](crate::UpstreamFailureLayer); only the first knows its limit.

mod error;
mod future;

pub use self::error::ConnectTimeoutError;
pub use self::future::ConnectFuture;

use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use tower_layer::Layer;
use tower_service::Service;

use crate::trace;

/// A layer's configuration: the layer holds it and each of its services a clone, cheap to
/// make (what a clone would copy at length, such as a hook, is behind an `Arc` inside).
#[derive(Clone, Copy, Debug)]
struct Config {
    timeout: Duration,
    with_address: bool,
}

/// Applies [`ConnectTimeout`] to a connector.
#[derive(Clone, Debug)]
pub struct ConnectTimeoutLayer {
    config: Config,
}

impl ConnectTimeoutLayer {
    /// A limit of `timeout` on each connect. `Duration::ZERO` fails every connect that is not
    /// ready at its first poll; a limit beyond the clock's range never fires.
    pub const fn new(timeout: Duration) -> Self {
        ConnectTimeoutLayer {
            config: Config {
                timeout,
                with_address: false,
            },
        }
    }

    /// Puts the upstream's address (the URI's authority) into [`ConnectTimeoutError`]'s
    /// `Display`. Off by default, so that nothing about the upstream leaks where errors are
    /// shown.
    pub const fn with_address_in_errors(mut self) -> Self {
        self.config.with_address = true;
        self
    }
}

impl<C> Layer<C> for ConnectTimeoutLayer {
    type Service = ConnectTimeout<C>;

    fn layer(&self, inner: C) -> Self::Service {
        ConnectTimeout {
            inner,
            config: self.config,
        }
    }
}

/// A connector that fails with [`ConnectTimeoutError`] when its inner connector does not
/// connect in time. Made by [`ConnectTimeoutLayer`]; see the
/// [module docs](crate::connect_timeout).
#[derive(Clone, Debug)]
pub struct ConnectTimeout<C> {
    inner: C,
    config: Config,
}

impl<C> ConnectTimeout<C> {
    /// Wraps `inner` with a limit of `timeout`.
    pub fn new(inner: C, timeout: Duration) -> Self {
        ConnectTimeoutLayer::new(timeout).layer(inner)
    }

    /// The inner connector.
    pub fn get_ref(&self) -> &C {
        &self.inner
    }

    /// The inner connector, mutably.
    pub fn get_mut(&mut self) -> &mut C {
        &mut self.inner
    }

    /// Unwraps the inner connector.
    pub fn into_inner(self) -> C {
        self.inner
    }
}

/// The error of a [`ConnectTimeout`]: a [`ConnectTimeoutError`] or the inner connector's.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<C> Service<Uri> for ConnectTimeout<C>
where
    C: Service<Uri>,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = ConnectFuture<C::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let span = tracing::info_span!(
            trace::CONNECT_SPAN_NAME,
            { trace::SERVER_ADDRESS } = uri.host().unwrap_or_default(),
            { trace::SERVER_PORT } = uri.port_u16().or_else(|| default_port(&uri)).map(i64::from),
            { trace::OTEL_KIND } = "client",
            { trace::CONNECT_MS } = tracing::field::Empty,
            { trace::CONNECT_OUTCOME } = tracing::field::Empty,
            { trace::OTEL_STATUS_CODE } = tracing::field::Empty,
        );
        let address = self
            .config
            .with_address
            .then(|| uri.authority().map(|authority| authority.to_string()))
            .flatten();
        // Shortened to the deadline of the upstream call, when a `PropagateDeadline` makes it.
        let timeout = match crate::deadline::call_instant() {
            Some(deadline) => self
                .config
                .timeout
                .min(deadline.saturating_duration_since(tokio::time::Instant::now())),
            None => self.config.timeout,
        };
        let inner = span.in_scope(|| self.inner.call(uri));
        ConnectFuture::new(inner, timeout, address, span)
    }
}

fn default_port(uri: &Uri) -> Option<u16> {
    match uri.scheme_str() {
        Some("https") => Some(443),
        Some("http") => Some(80),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
