//! Tower middleware that gives HTTP services exact timeout and cancellation semantics.
//!
//! A request can fail to end normally in a few ways, and each gets its own, well-known outcome:
//!
//! | what happened | outcome |
//! |---|---|
//! | connected, but the response did not arrive in time | **504** Gateway Timeout, `Proxy-Status: tower-timeouts; error=http_response_timeout` |
//! | the connection to the upstream was not established in time | **599** Network Connect Timeout Error (504 with `rfc9209_statuses`), `error=connection_timeout` |
//! | connecting to the upstream failed outright (refused, unreachable) | **502** Bad Gateway, `error=connection_refused`, … |
//! | the client closed its connection before the response was done | **499** Client Closed Request, *recorded* (span, event, hook), never sent; the work is cancelled |
//!
//! - [`ResponseTimeoutLayer`] answers a slow inner service with a generated response, never an
//!   error, so it fits `axum::Router::layer` as it is.
//! - [`ClientDisconnectLayer`] notices the client leaving (before the head or during the body),
//!   records a 499 and fires a [`ClientGone`] signal for the work the handler spawned.
//! - [`DetachLayer`], innermost and opt-in, lets handlers that are not cancel-safe run to
//!   their end (within a limit) when their client leaves, and tracks them for shutdown.
//! - On the upstream side of a gateway, [`ConnectTimeoutLayer`] times a client's connector, and
//!   [`UpstreamFailureLayer`] turns the client's errors into 599 and 502 responses.
//! - In the body phase ([`body_timeout`]), [`RequestBodyTimeoutLayer`] answers a client too
//!   slow to send its request body with 408, and [`ResponseBodyTimeoutLayer`] ends a response
//!   stream that stalls or runs too long (an HTTP/2 reset with `CANCEL`, gRPC trailers with
//!   `DEADLINE_EXCEEDED`), each recorded as its own outcome.
//! - At a deploy, [`Shutdown`] gives the requests in flight a grace, then answers each one still
//!   running with a 503 (gRPC `UNAVAILABLE`), recorded as `server_shutdown`, never as a 499.
//! - For gRPC requests, every generated response is a trailers-only gRPC status
//!   (`DEADLINE_EXCEEDED`, `UNAVAILABLE`, …; see [`grpc`]), [`ResponseTimeoutLayer`] honours
//!   the caller's `grpc-timeout` (capped by its own limit), and [`PropagateDeadlineLayer`]
//!   passes what is left of it on to upstream calls (see [`deadline`]).
//! - Every request through them ends with exactly one [`Outcome`], recorded once into one
//!   [span](trace), as an event when it is not a normal completion, and through an
//!   [`on_outcome`](ClientDisconnectLayer::on_outcome) hook, whatever the order of the layers
//!   and however often they are applied (see [`record`]).
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use axum::{routing::get, Router};
//! use tower::ServiceBuilder;
//! use tower_timeouts::{ClientDisconnectLayer, ResponseTimeoutLayer};
//!
//! let app: Router = Router::new().route("/", get(|| async { "hello" })).layer(
//!     ServiceBuilder::new()
//!         .layer(ClientDisconnectLayer::new())
//!         .layer(ResponseTimeoutLayer::new(Duration::from_secs(10))),
//! );
//! # let _ = app;
//! ```
//!
//! # Feature flags
//!
//! - `hyper` (on by default): generated 599 responses carry hyper's `ReasonPhrase` ("Network
//!   Connect Timeout Error") on HTTP/1.1, and [`UpstreamFailureLayer`] tells hyper's errors apart
//!   (a connection closed, a protocol error).
//! - `h2` (on by default): a response-body limit resets an HTTP/2 stream with `CANCEL` rather
//!   than `INTERNAL_ERROR` (see [`BodyTimeoutError`]).
//! - `axum`: [`ClientGone`] becomes an axum extractor, and [`watch::WatchedListener`] watches
//!   `axum::serve`'s connections.
//! - `metrics`: [`metrics::ServerMetrics`], a hook that records OpenTelemetry's HTTP server
//!   duration histogram through the `metrics` facade.

#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub mod access_log;
pub mod body_timeout;
pub mod client_disconnect;
pub mod connect_timeout;
pub mod deadline;
pub mod detach;
pub mod grpc;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod outcome;
pub mod propagate;
pub mod record;
pub mod response;
pub mod response_timeout;
pub mod shutdown;
pub mod signal;
mod timer;
pub mod trace;
pub mod upstream;
#[cfg(unix)]
pub mod watch;

#[cfg(test)]
mod test_support;

pub use self::body_timeout::{
    BodyTimeoutError, RequestBodyTimeout, RequestBodyTimeoutLayer, ResponseBodyTimeout,
    ResponseBodyTimeoutLayer,
};
pub use self::client_disconnect::{ClientDisconnect, ClientDisconnectLayer};
pub use self::connect_timeout::{ConnectTimeout, ConnectTimeoutError, ConnectTimeoutLayer};
pub use self::deadline::Deadline;
pub use self::detach::{Detach, DetachLayer};
pub use self::grpc::GrpcCode;
pub use self::outcome::{Outcome, Phase, ProxyError};
pub use self::propagate::{PropagateDeadline, PropagateDeadlineLayer};
pub use self::record::{OnOutcome, Report, RequestInfo};
pub use self::response::{Generated, ResponseBody};
pub use self::response_timeout::{ResponseTimeout, ResponseTimeoutLayer};
pub use self::shutdown::{Shutdown, ShutdownLayer};
pub use self::signal::ClientGone;
pub use self::upstream::{UpstreamFailure, UpstreamFailureLayer};
