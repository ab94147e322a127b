//! Time limits on the body phase: a request body the client is too slow to send (408), and a
//! response stream that stalls or runs too long after its head.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use axum::{routing::post, Router};
//! use tower::ServiceBuilder;
//! use tower_timeouts::{
//!     ClientDisconnectLayer, RequestBodyTimeoutLayer, ResponseBodyTimeoutLayer,
//!     ResponseTimeoutLayer,
//! };
//!
//! let app: Router = Router::new()
//!     .route("/upload", post(|body: axum::body::Bytes| async move { body.len().to_string() }))
//!     .layer(
//!         ServiceBuilder::new()
//!             .layer(ClientDisconnectLayer::new())
//!             // A stalled upload gets 408 after 10 s without a frame, or 60 s in all.
//!             .layer(
//!                 RequestBodyTimeoutLayer::new()
//!                     .idle(Duration::from_secs(10))
//!                     .total(Duration::from_secs(60)),
//!             )
//!             // A response stream is cut after 30 s without a frame.
//!             .layer(ResponseBodyTimeoutLayer::new().idle(Duration::from_secs(30)))
//!             .layer(ResponseTimeoutLayer::new(Duration::from_secs(90))),
//!     );
//! # let _ = app;
//! ```
//!
//! # The request body: [`RequestBodyTimeoutLayer`]
//!
//! Two limits, each optional:
//!
//! - **idle**: the longest wait for the next frame, counted while the handler waits for it
//!   (from its first read, and again after each frame);
//! - **total**: the longest time from the request head to the end of the body.
//!
//! A limit fires only while the handler waits for the body and the body has not fully arrived,
//! so that a slow *handler* is never blamed on its client: if the whole request arrived, a late
//! response is the response timeout's 504, never a 408 (Envoy's rule). When one fires:
//!
//! - the handler's read fails with a [`BodyTimeoutError`];
//! - the handler's future is dropped (as *abandoned*: no layer takes it for a client leaving),
//!   whatever it made of the error (axum's `Bytes` and `Json` extractors would answer 400);
//! - the client gets **408 Request Timeout** with `Connection: close` on HTTP/1 (the rest of
//!   the body is not read), `Proxy-Status: tower-timeouts; error=http_request_error;
//!   status-code=408`, or a trailers-only `DEADLINE_EXCEEDED` for gRPC;
//! - the outcome is [`Outcome::RequestBodyTimeout`](crate::Outcome::RequestBodyTimeout)
//!   (`error.type` `request_body_timeout`; a 4xx, so the server span is not an error).
//!
//! The handler may read the body on a task of its own: the layer still learns that the limit
//! fired, and answers.
//!
//! # The response body: [`ResponseBodyTimeoutLayer`]
//!
//! The same two limits, each optional: **idle** between frames while the server waits for the
//! next one, **total** from the response head. When one fires after the head, the response
//! ends the only ways it can:
//!
//! - HTTP/2: the stream is reset with `CANCEL` (hyper takes the reason from the
//!   [`BodyTimeoutError`]'s source, an `h2::Error`, with the `h2` feature; `INTERNAL_ERROR`
//!   without it);
//! - HTTP/1: the connection is closed (the client sees a truncated body);
//! - gRPC: the stream ends with trailers, `grpc-status: 4` (`DEADLINE_EXCEEDED`), which a gRPC
//!   client reads as the call's status.
//!
//! The outcome is [`Outcome::ResponseBodyTimeout`](crate::Outcome::ResponseBodyTimeout), with
//! the status already sent and the body bytes sent. Like a client leaving during the body, it
//! needs the body followed to its end: the layer asks the recording layer to do so.
//!
//! # What spawned work learns
//!
//! When a limit fires, the inner body (or the handler) is dropped as *abandoned*, and the
//! request's [`ClientGone`](crate::ClientGone) keeps its meaning: it does not fire, since the
//! client did not leave. Its wider signal, [`ClientGone::cancelled`](crate::ClientGone::cancelled),
//! fires with [`Cancelled::Abandoned`](crate::signal::Cancelled::Abandoned), as it does for
//! every response the crate gives up on (a 504 too), so that spawned work can stop.
//!
//! # Differences from tower-http's `TimeoutBody` and `DeadlineBody`
//!
//! tower-http 0.7 has an idle limit (`TimeoutBody`, `RequestBodyTimeoutLayer`,
//! `ResponseBodyTimeoutLayer`) and a total one (`DeadlineBody`). Both end in a body error that
//! nothing records: under axum's extractors a slow upload becomes a 400, and a stalled stream
//! an unexplained reset. These layers answer 408 themselves, end gRPC streams with a status,
//! reset HTTP/2 streams with `CANCEL`, and record an outcome. `TimeoutBody` polls its timer
//! before every frame (a timer registration per frame); these layers' bodies
//! touch their timer only when the body is pending: a frame that is ready reads no clock and
//! registers no timer (`benches/body.rs`: about 16 ns a frame over the bare body, against
//! 90–540 ns for `TimeoutBody`).

mod clock;
mod request;
mod response;

pub use self::request::{
    RequestBodyTimeout, RequestBodyTimeoutLayer, RequestFuture, TimedRequestBody,
};
pub use self::response::{
    ResponseBodyFuture, ResponseBodyTimeout, ResponseBodyTimeoutLayer, TimedResponseBody,
};

use std::error::Error;
use std::fmt;
use std::time::Duration;

/// A body's limits.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Limits {
    pub(crate) idle: Option<Duration>,
    pub(crate) total: Option<Duration>,
}

impl Limits {
    fn is_none(&self) -> bool {
        self.idle.is_none() && self.total.is_none()
    }
}

/// Which limit fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    Idle,
    Total,
}

/// The error a body returns when one of its limits fires.
///
/// With the `h2` feature, its [`source`](Error::source) is an `h2::Error` with reason `CANCEL`,
/// from which hyper takes the reason of the HTTP/2 stream reset.
pub struct BodyTimeoutError {
    which: Which,
    limit: Duration,
    #[cfg(feature = "h2")]
    reason: h2::Error,
}

impl BodyTimeoutError {
    fn new(which: Which, limit: Duration) -> Self {
        BodyTimeoutError {
            which,
            limit,
            #[cfg(feature = "h2")]
            reason: h2::Reason::CANCEL.into(),
        }
    }

    /// Whether the idle limit fired (the total one otherwise).
    pub fn is_idle(&self) -> bool {
        self.which == Which::Idle
    }

    /// The limit that fired.
    pub fn limit(&self) -> Duration {
        self.limit
    }
}

impl fmt::Debug for BodyTimeoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BodyTimeoutError")
            .field("idle", &self.is_idle())
            .field("limit", &self.limit)
            .finish()
    }
}

impl fmt::Display for BodyTimeoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let which = if self.is_idle() { "idle" } else { "total" };
        write!(
            f,
            "body timed out: its {which} limit of {} ms passed",
            self.limit.as_millis()
        )
    }
}

impl Error for BodyTimeoutError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        #[cfg(feature = "h2")]
        return Some(&self.reason);
        #[cfg(not(feature = "h2"))]
        None
    }
}

/// The builder methods of both layers.
macro_rules! limit_methods {
    ($($limits:ident).+) => {
        /// The longest wait for the next frame, counted while the body is waited for (off by
        /// default). `Duration::ZERO` fires at the first wait; `Duration::MAX` never fires.
        pub fn idle(mut self, limit: std::time::Duration) -> Self {
            self.$($limits).+.idle = Some(limit);
            self
        }

        /// The longest time for the whole body, from the head (off by default).
        pub fn total(mut self, limit: std::time::Duration) -> Self {
            self.$($limits).+.total = Some(limit);
            self
        }
    };
}
use limit_methods;

#[cfg(test)]
mod tests;
