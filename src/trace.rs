//! The request span and its fields: OpenTelemetry HTTP fields plus the crate's own.
//!
//! The outermost of the crate's layers on a request opens one span for it, named `request`,
//! as a child of the span current at `call` (for instance tower-http's `TraceLayer` span),
//! and records the request's outcome into it for all of the crate's layers on the request.
//! When the request ends, every outcome other than a normal completion emits one event,
//! `request ended` (WARN by default), whose parent is that span and whose fields say how it
//! ended; then the span gets the outcome fields. The event comes first, so that a log line
//! shows the request from the span and its end from the event, each field once.
//!
//! A call a handler makes upstream through an [`UpstreamFailureLayer`](crate::UpstreamFailureLayer)
//! gets a span of its own, named `upstream` (`otel.kind = client`), under the request's span;
//! see [`UPSTREAM_SPAN_NAME`].
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower::ServiceBuilder;
//! use tower_http::trace::TraceLayer;
//! use tower_timeouts::{trace, ClientDisconnectLayer, ResponseTimeoutLayer};
//!
//! // One span per request: tower-http's TraceLayer opens it with our fields declared,
//! // and our layers record into it instead of opening a child span.
//! let stack = ServiceBuilder::new()
//!     .layer(TraceLayer::new_for_http().make_span_with(|request: &http::Request<axum::body::Body>| {
//!         trace::make_span(request)
//!     }))
//!     .layer(ClientDisconnectLayer::new().record_in_current_span())
//!     .layer(ResponseTimeoutLayer::new(Duration::from_secs(10)));
//! # let _ = stack;
//! ```
//!
//! # Fields
//!
//! | field | when |
//! |---|---|
//! | `http.request.method`, `url.path`, `user_agent.original` | at the start |
//! | `otel.kind` | `server`, at the start |
//! | `tower_timeouts.timeout_ms` | at the end, when a [`ResponseTimeout`](crate::ResponseTimeout) applies a limit: the one that fired, or the smallest |
//! | `tower_timeouts.outcome` | at the end: [`Outcome::kind`] |
//! | `http.response.status_code` | at the end, only when a status was actually sent |
//! | `tower_timeouts.recorded_status` | at the end: the status sent, or 499 for a client gone before the head |
//! | `error.type` | at the end, for anything but a normal completion: [`Outcome::error_type`] |
//! | `otel.status_code` | `ERROR` when [`Outcome::is_error`] |
//! | `tower_timeouts.elapsed_ms` | at the end |
//! | `rpc.system.name` (`grpc`), `rpc.method` (`package.Service/Method`) | at the start, for a gRPC request |
//! | `rpc.response.status_code` | at the end, for a gRPC request whose status is known: the one its response carried (a status the crate generated, or the inner service's, in the head or the trailers), `CANCELLED` for a client that left |
//! | `tower_timeouts.budget_ms` | at the start, when the request came with a deadline (`grpc-timeout`, or the configured header): what it said, before any margin or cap |
//! | `tower_timeouts.budget_invalid` | at the start, when that header was malformed (and ignored): its value, cut to 32 characters |
//!
//! For a gRPC request, `otel.status_code` follows OpenTelemetry's gRPC rules when the status
//! is known: on the request's span, `ERROR` for `UNKNOWN`, `DEADLINE_EXCEEDED`,
//! `UNIMPLEMENTED`, `INTERNAL`, `UNAVAILABLE` and `DATA_LOSS` only (a client that cancelled is
//! not the server's error); on an `upstream` span, for every code but `OK`.
//! `http.response.status_code` is 200 when a trailers-only gRPC status was sent.
//!
//! The `upstream` span has `http.request.method`, `url.full`, `server.address`, `server.port`,
//! `otel.kind = client`, the RPC fields and `tower_timeouts.budget_ms` (the deadline it was
//! sent with), and the same outcome fields, except that `http.response.status_code`
//! is the status the upstream sent, if it sent one. It emits no event.
//!
//! Tracing only records fields that were declared when the span was opened. If you make the
//! span yourself and use [`record_in_current_span`](crate::ClientDisconnectLayer::record_in_current_span),
//! declare these fields (as [`make_span`] does) or they are silently dropped.

use http::Request;
use tracing::field::Empty;
use tracing::{Level, Span};

use crate::grpc::GrpcCode;
use crate::outcome::Outcome;
use crate::record::{Budget, Report, RequestInfo};

/// `http.request.method`
pub const HTTP_REQUEST_METHOD: &str = "http.request.method";
/// `url.path`
pub const URL_PATH: &str = "url.path";
/// `user_agent.original`
pub const USER_AGENT_ORIGINAL: &str = "user_agent.original";
/// `http.response.status_code`
pub const HTTP_RESPONSE_STATUS_CODE: &str = "http.response.status_code";
/// `error.type`
pub const ERROR_TYPE: &str = "error.type";
/// `otel.kind`
pub const OTEL_KIND: &str = "otel.kind";
/// `otel.status_code`
pub const OTEL_STATUS_CODE: &str = "otel.status_code";
/// `tower_timeouts.outcome`
pub const OUTCOME: &str = "tower_timeouts.outcome";
/// `tower_timeouts.timeout_ms`
pub const TIMEOUT_MS: &str = "tower_timeouts.timeout_ms";
/// `tower_timeouts.recorded_status`
pub const RECORDED_STATUS: &str = "tower_timeouts.recorded_status";
/// `tower_timeouts.elapsed_ms`
pub const ELAPSED_MS: &str = "tower_timeouts.elapsed_ms";
/// `tower_timeouts.detached`: how detached work ended (`completed`, `failed`, `panicked`,
/// `cut`), on the event a [`Detach`](crate::Detach) emits; see
/// [`detach`](crate::detach#what-is-recorded).
pub const DETACHED: &str = "tower_timeouts.detached";

/// `rpc.system.name`: `grpc`, on the span of a gRPC request.
pub const RPC_SYSTEM_NAME: &str = "rpc.system.name";
/// `rpc.method`: the fully-qualified method (`package.Service/Method`), on the span of a gRPC
/// request.
pub const RPC_METHOD: &str = "rpc.method";
/// `rpc.response.status_code`: the gRPC status by name (`DEADLINE_EXCEEDED`), on the span of a
/// gRPC request.
pub const RPC_RESPONSE_STATUS_CODE: &str = "rpc.response.status_code";
/// `tower_timeouts.budget_ms`: the deadline the request came with (`grpc-timeout` or the
/// configured header), or, on an `upstream` span, the one it was sent with.
pub const BUDGET_MS: &str = "tower_timeouts.budget_ms";
/// `tower_timeouts.budget_invalid`: a malformed deadline header the request came with, which
/// was ignored.
pub const BUDGET_INVALID: &str = "tower_timeouts.budget_invalid";

/// `tower_timeouts.upstream`: on the outcome event of a request answered with a failed upstream
/// call's answer, where the call went (`host:port`).
pub const UPSTREAM: &str = "tower_timeouts.upstream";
/// `tower_timeouts.upstream_phase`: beside [`UPSTREAM`], when the call failed: `connecting`,
/// or `waiting_for_head`.
pub const UPSTREAM_PHASE: &str = "tower_timeouts.upstream_phase";

/// `url.full`, on the `upstream` span.
pub const URL_FULL: &str = "url.full";

/// `server.address`, on the `connect` and `upstream` spans.
pub const SERVER_ADDRESS: &str = "server.address";
/// `server.port`, on the `connect` and `upstream` spans.
pub const SERVER_PORT: &str = "server.port";
/// `tower_timeouts.connect_ms`, on the `connect` span: how long the attempt took.
pub const CONNECT_MS: &str = "tower_timeouts.connect_ms";
/// `tower_timeouts.connect_outcome`, on the `connect` span: `connected`, `timeout` or `error`.
pub const CONNECT_OUTCOME: &str = "tower_timeouts.connect_outcome";

/// The name of the span [`ConnectTimeout`](crate::ConnectTimeout) opens for a connect attempt.
pub const CONNECT_SPAN_NAME: &str = "connect";

/// The name of the span the crate opens for a request.
pub const SPAN_NAME: &str = "request";

/// The name of the span the crate opens for a call a handler makes upstream, through an
/// [`UpstreamFailureLayer`](crate::UpstreamFailureLayer).
pub const UPSTREAM_SPAN_NAME: &str = "upstream";

/// Opens the crate's request span (at INFO, named [`SPAN_NAME`]), a child of the current span,
/// with every field the crate records declared.
///
/// It is what the crate's layers use. It also fits tower-http's `TraceLayer::make_span_with`,
/// so that one span carries tower-http's events and our fields:
///
/// ```
/// use tower_http::trace::TraceLayer;
///
/// let trace = TraceLayer::new_for_http()
///     .make_span_with(|request: &http::Request<axum::body::Body>| {
///         tower_timeouts::trace::make_span(request)
///     });
/// # let _ = trace;
/// ```
pub fn make_span<B>(request: &Request<B>) -> Span {
    make_request_span(request, crate::grpc::is_grpc(request.headers()))
}

/// [`make_span`], for a request already known to be gRPC or not.
pub(crate) fn make_request_span<B>(request: &Request<B>, is_grpc: bool) -> Span {
    let span = tracing::info_span!(
        SPAN_NAME,
        { HTTP_REQUEST_METHOD } = %request.method(),
        { URL_PATH } = request.uri().path(),
        { USER_AGENT_ORIGINAL } = Empty,
        { OTEL_KIND } = "server",
        { RPC_SYSTEM_NAME } = Empty,
        { RPC_METHOD } = Empty,
        { RPC_RESPONSE_STATUS_CODE } = Empty,
        { BUDGET_MS } = Empty,
        { BUDGET_INVALID } = Empty,
        { HTTP_RESPONSE_STATUS_CODE } = Empty,
        { ERROR_TYPE } = Empty,
        { OTEL_STATUS_CODE } = Empty,
        { OUTCOME } = Empty,
        { TIMEOUT_MS } = Empty,
        { RECORDED_STATUS } = Empty,
        { ELAPSED_MS } = Empty,
    );
    if !span.is_disabled() {
        if let Some(agent) = request.headers().get(http::header::USER_AGENT) {
            span.record(
                USER_AGENT_ORIGINAL,
                String::from_utf8_lossy(agent.as_bytes()).as_ref(),
            );
        }
        record_rpc(&span, request, is_grpc);
    }
    span
}

/// The RPC fields of a request, when it is gRPC.
fn record_rpc<B>(span: &Span, request: &Request<B>, is_grpc: bool) {
    if is_grpc {
        span.record(RPC_SYSTEM_NAME, "grpc");
        span.record(RPC_METHOD, crate::grpc::rpc_method(request.uri().path()));
    }
}

/// Records the deadline a request came with, or was sent with.
pub(crate) fn record_budget(span: &Span, budget: Option<&Budget>) {
    match budget {
        None => {}
        Some(_) if span.is_disabled() => {}
        Some(Budget::Given(budget)) => {
            span.record(BUDGET_MS, duration_ms_ceil(*budget));
        }
        Some(Budget::Invalid(value)) => {
            let value = String::from_utf8_lossy(value.as_bytes());
            let value: String = value.chars().take(32).collect();
            span.record(BUDGET_INVALID, value.as_str());
        }
    }
}

/// Opens the span of a call a handler makes upstream (at INFO, named [`UPSTREAM_SPAN_NAME`],
/// `otel.kind = client`): a child of `parent` (the span of the request the handler serves,
/// when the upstream request carries that request's extensions), else of the current span.
pub(crate) fn make_upstream_span<B>(
    request: &Request<B>,
    parent: Option<&Span>,
    is_grpc: bool,
) -> Span {
    let uri = request.uri();
    let port = uri.port_u16().or(match uri.scheme_str() {
        Some("https") => Some(443),
        Some("http") => Some(80),
        _ => None,
    });
    macro_rules! upstream_span {
        ($($parent:tt)*) => {
            tracing::info_span!(
                $($parent)*
                UPSTREAM_SPAN_NAME,
                { HTTP_REQUEST_METHOD } = %request.method(),
                { URL_FULL } = %uri,
                { SERVER_ADDRESS } = uri.host(),
                { SERVER_PORT } = port.map(i64::from),
                { OTEL_KIND } = "client",
                { RPC_SYSTEM_NAME } = Empty,
                { RPC_METHOD } = Empty,
                { RPC_RESPONSE_STATUS_CODE } = Empty,
                { BUDGET_MS } = Empty,
                { HTTP_RESPONSE_STATUS_CODE } = Empty,
                { ERROR_TYPE } = Empty,
                { OTEL_STATUS_CODE } = Empty,
                { OUTCOME } = Empty,
                { TIMEOUT_MS } = Empty,
                { RECORDED_STATUS } = Empty,
                { ELAPSED_MS } = Empty,
            )
        };
    }
    let span = match parent {
        Some(parent) => upstream_span!(parent: parent,),
        None => upstream_span!(),
    };
    if !span.is_disabled() {
        record_rpc(&span, request, is_grpc);
    }
    span
}

/// Records the end of the request into `span`, and emits the event (at `level`) for anything
/// but a normal completion. `limit_ms` is the smallest limit the layers on the request applied;
/// `upstream` for the span of an upstream call, whose status code is the one received.
pub(crate) fn record_outcome(
    span: &Span,
    upstream: bool,
    level: Option<Level>,
    report: &Report<'_>,
    limit_ms: Option<u64>,
    request: Option<&RequestInfo>,
) {
    let outcome = report.outcome();
    let grpc_status = report.grpc_status();
    let elapsed_ms = duration_ms(report.elapsed());
    let error_type = outcome.error_type();
    // The limit that fired, or else the one that binds.
    let fired = match outcome {
        Outcome::ResponseTimeout { timeout, .. }
        | Outcome::RequestBodyTimeout { timeout, .. }
        | Outcome::ResponseBodyTimeout { timeout, .. }
        | Outcome::ConnectTimeout {
            timeout: Some(timeout),
            ..
        } => Some(duration_ms(*timeout)),
        _ => None,
    };
    // The event first, while the span still holds only what it said of the request: a line
    // of `fmt` (or `fmt().json()`) then shows the request from the span and its end from the
    // event, each field once.
    if let (Some(error_type), Some(level)) = (error_type, level) {
        emit_outcome(span, level, report, error_type, fired, request);
    }
    if span.is_disabled() {
        return;
    }
    span.record(OUTCOME, outcome.kind());
    let limit_ms = limit_ms.map(|ms| i64::try_from(ms).unwrap_or(i64::MAX));
    if let Some(ms) = fired.or(limit_ms) {
        span.record(TIMEOUT_MS, ms);
    }
    span.record(ELAPSED_MS, elapsed_ms);
    let status = match outcome {
        // A status an upstream sent us, not one of ours.
        Outcome::Completed { status } if upstream => Some(*status),
        _ if upstream => None,
        _ => outcome.sent_status(),
    };
    if let Some(status) = status {
        span.record(HTTP_RESPONSE_STATUS_CODE, i64::from(status.as_u16()));
    }
    if let Some(status) = outcome.recorded_status() {
        span.record(RECORDED_STATUS, i64::from(status.as_u16()));
    }
    if let Some(error_type) = error_type {
        span.record(ERROR_TYPE, error_type);
    }
    if let Some(code) = grpc_status {
        span.record(RPC_RESPONSE_STATUS_CODE, code.name());
    }
    // For gRPC, by its status: on a server, only the codes that are the server's fault
    // (CANCELLED is not); on a client, every code but OK.
    let is_error = match grpc_status {
        Some(code) if upstream => code != GrpcCode::OK,
        Some(code) => code.is_server_error(),
        None => outcome.is_error(),
    };
    if is_error {
        span.record(OTEL_STATUS_CODE, "ERROR");
    }
}

/// The event of an outcome other than a normal completion, at `level`, with `span` as its
/// parent; with what it says of the request (`request`) when the span is off.
fn emit_outcome(
    span: &Span,
    level: Level,
    report: &Report<'_>,
    error_type: &str,
    fired_ms: Option<i64>,
    request: Option<&RequestInfo>,
) {
    let outcome = report.outcome();
    let recorded_status = outcome
        .recorded_status()
        .map(|status| i64::from(status.as_u16()));
    let grpc_status = report.grpc_status().map(GrpcCode::name);
    let elapsed_ms = duration_ms(report.elapsed());
    let upstream = report.upstream();
    let method = request.map(|request| request.method().as_str());
    let path = request.map(|request| request.uri().path());
    let user_agent = request
        .and_then(RequestInfo::user_agent)
        .map(|agent| String::from_utf8_lossy(agent.as_bytes()));
    macro_rules! emit {
        ($level:expr) => {
            tracing::event!(
                parent: span,
                $level,
                { OUTCOME } = outcome.kind(),
                { ERROR_TYPE } = error_type,
                { RECORDED_STATUS } = recorded_status,
                { RPC_RESPONSE_STATUS_CODE } = grpc_status,
                { TIMEOUT_MS } = fired_ms,
                { ELAPSED_MS } = elapsed_ms,
                { UPSTREAM } = upstream.map(|(address, _)| address),
                { UPSTREAM_PHASE } = upstream.map(|(_, phase)| phase),
                { HTTP_REQUEST_METHOD } = method,
                { URL_PATH } = path,
                { USER_AGENT_ORIGINAL } = user_agent.as_deref(),
                "request ended",
            )
        };
    }
    match level {
        Level::TRACE => emit!(Level::TRACE),
        Level::DEBUG => emit!(Level::DEBUG),
        Level::INFO => emit!(Level::INFO),
        Level::WARN => emit!(Level::WARN),
        _ => emit!(Level::ERROR),
    }
}

/// `duration` in whole milliseconds, as a field's value. Integers go into fields as `i64`:
/// `tracing-opentelemetry` exports an `i64` as an integer attribute, but a `u64` as a string.
pub(crate) fn duration_ms(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// `duration` in whole milliseconds, rounded up (a budget of 0.4 ms is not "0 ms").
pub(crate) fn duration_ms_ceil(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_nanos().div_ceil(1_000_000)).unwrap_or(i64::MAX)
}
