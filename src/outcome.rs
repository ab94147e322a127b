//! The outcome model: how a request through the crate's layers ended.
//!
//! Every request that passes through at least one of the crate's layers ends with exactly one
//! [`Outcome`]. The outermost layer on the request records it once: into the request's span,
//! as an event for anything but a normal completion, and through the
//! [`on_outcome`](crate::ResponseTimeoutLayer::on_outcome) hook.
//!
//! # Example
//!
//! ```
//! use http::StatusCode;
//! use tower_timeouts::Outcome;
//!
//! fn describe(outcome: &Outcome) -> String {
//!     match outcome {
//!         Outcome::Completed { status, .. } => format!("answered {status}"),
//!         Outcome::ClientDisconnected { .. } => "the client left".to_owned(),
//!         other => format!("{} ({:?})", other.kind(), other.error_type()),
//!     }
//! }
//! # let _ = describe;
//! ```

use std::fmt;
use std::time::Duration;

use http::StatusCode;

/// 499 Client Closed Request: nginx's code for a client that left before the response was
/// done. It is never sent, only recorded.
pub const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => unreachable!(),
};

/// 599 Network Connect Timeout Error: a non-standard status that proxies and HTTP clients use
/// when the connection to the upstream was not established in time.
pub const NETWORK_CONNECT_TIMEOUT: StatusCode = match StatusCode::from_u16(599) {
    Ok(status) => status,
    Err(_) => unreachable!(),
};

/// How a request through the crate's layers ended.
///
/// The enum and its variants are `#[non_exhaustive]`: new outcomes and new fields may be
/// added in minor releases, so match with `..` and a wildcard arm.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The inner service answered and, where a [`ClientDisconnectLayer`](crate::ClientDisconnectLayer)
    /// watches the body, the body was sent to its end.
    #[non_exhaustive]
    Completed {
        /// The status the inner service answered with.
        status: StatusCode,
    },
    /// The response did not arrive in time; the crate answered in its place.
    #[non_exhaustive]
    ResponseTimeout {
        /// The limit that was exceeded.
        timeout: Duration,
        /// The status that was sent (504 unless configured otherwise).
        status: StatusCode,
    },
    /// The deadline of the request being served had passed (or had less left than the
    /// margin) when a handler made an upstream call through a
    /// [`PropagateDeadlineLayer`](crate::PropagateDeadlineLayer): nothing was sent, and the
    /// layer answered at once.
    #[non_exhaustive]
    DeadlineExceeded {
        /// The status that was sent (504 unless configured otherwise; 200 with
        /// `grpc-status: 4` for gRPC).
        status: StatusCode,
    },
    /// The connection to the upstream was not established in time.
    #[non_exhaustive]
    ConnectTimeout {
        /// The limit that was exceeded, when it is known (a
        /// [`ConnectTimeoutLayer`](crate::ConnectTimeoutLayer)'s; `None` when the connector's
        /// own timeout fired, such as `HttpConnector::set_connect_timeout`).
        timeout: Option<Duration>,
        /// The status that was sent (599 unless configured otherwise).
        status: StatusCode,
    },
    /// Connecting to the upstream failed outright (refused, unreachable, …).
    #[non_exhaustive]
    ConnectFailed {
        /// The most specific RFC 9209 error type that could be told.
        error: ProxyError,
        /// The status that was sent (502 unless configured otherwise).
        status: StatusCode,
    },
    /// Connected, but the exchange with the upstream failed before a response head (the
    /// connection closed, a protocol error, …).
    #[non_exhaustive]
    UpstreamFailed {
        /// The most specific RFC 9209 error type that could be told.
        error: ProxyError,
        /// The status that was sent (502 unless configured otherwise).
        status: StatusCode,
    },
    /// The client closed its connection (or reset its HTTP/2 stream) before the response was
    /// done. Nothing could be sent about it: [`recorded_status`](Outcome::recorded_status) is
    /// 499 before the head, and the status already sent during the body.
    #[non_exhaustive]
    ClientDisconnected {
        /// Whether the client left before the response head or while the body was sent.
        phase: Phase,
        /// The status already sent, for a disconnect during the body.
        sent_status: Option<StatusCode>,
        /// Body bytes handed to the server before the client left.
        bytes_sent: u64,
    },
    /// The inner service returned an error (before the head), or the response body did
    /// (during the body). The error itself went on to the caller.
    #[non_exhaustive]
    Failed {
        /// Where the error happened.
        phase: Phase,
        /// The status already sent, for a failure during the body.
        sent_status: Option<StatusCode>,
    },
    /// The inner service's future, or the response body, panicked. The panic went on to the
    /// caller.
    #[non_exhaustive]
    Panicked {
        /// Where the panic happened.
        phase: Phase,
        /// The status already sent, for a panic during the body.
        sent_status: Option<StatusCode>,
    },
    /// The client was too slow to send its request body: a
    /// [`RequestBodyTimeoutLayer`](crate::RequestBodyTimeoutLayer) limit fired while the
    /// handler waited for the body, before the body had fully arrived. The handler was dropped,
    /// and the layer answered in its place (408 with `Connection: close` on HTTP/1; gRPC
    /// `DEADLINE_EXCEEDED`), whatever the handler made of the body's error.
    #[non_exhaustive]
    RequestBodyTimeout {
        /// The limit that fired (the idle or the total one).
        timeout: Duration,
        /// The status that was sent (408, or 200 with `grpc-status: 4` for gRPC).
        status: StatusCode,
    },
    /// The response body stalled or ran too long after its head: a
    /// [`ResponseBodyTimeoutLayer`](crate::ResponseBodyTimeoutLayer) limit fired and ended the
    /// response (an HTTP/2 stream reset with `CANCEL`, a closed HTTP/1 connection, or gRPC
    /// trailers with `DEADLINE_EXCEEDED`).
    #[non_exhaustive]
    ResponseBodyTimeout {
        /// The limit that fired (the idle or the total one).
        timeout: Duration,
        /// The status already sent with the head.
        sent_status: StatusCode,
        /// Body bytes handed to the server before the limit fired.
        bytes_sent: u64,
    },
    /// The server shut down before the response was done: a
    /// [`ShutdownLayer`](crate::ShutdownLayer)'s grace ran out, and it answered in the handler's
    /// place (503 with `Connection: close` on HTTP/1, gRPC `UNAVAILABLE`), ended the response
    /// body already under way, or saw the request dropped after that. Never a 499.
    #[non_exhaustive]
    ServerShutdown {
        /// Before the response head, or while the body was sent.
        phase: Phase,
        /// The status sent: the 503 (or 200 for gRPC) answered in the handler's place, the
        /// status already sent for a body ended, `None` when nothing could be sent.
        sent_status: Option<StatusCode>,
        /// Body bytes handed to the server before the end.
        bytes_sent: u64,
    },
    /// The response future was dropped before the response, and no
    /// [`ClientDisconnectLayer`](crate::ClientDisconnectLayer) was there to tell why (a client
    /// leaving, an outer timeout, a server shutting down all look the same from inside).
    #[non_exhaustive]
    Dropped {},
}

impl Outcome {
    pub(crate) fn completed(status: StatusCode) -> Self {
        Outcome::Completed { status }
    }

    pub(crate) fn response_timeout(timeout: Duration, status: StatusCode) -> Self {
        Outcome::ResponseTimeout { timeout, status }
    }

    pub(crate) fn deadline_exceeded(status: StatusCode) -> Self {
        Outcome::DeadlineExceeded { status }
    }

    pub(crate) fn connect_timeout(timeout: Option<Duration>, status: StatusCode) -> Self {
        Outcome::ConnectTimeout { timeout, status }
    }

    pub(crate) fn connect_failed(error: ProxyError, status: StatusCode) -> Self {
        Outcome::ConnectFailed { error, status }
    }

    pub(crate) fn upstream_failed(error: ProxyError, status: StatusCode) -> Self {
        Outcome::UpstreamFailed { error, status }
    }

    pub(crate) fn client_disconnected(
        phase: Phase,
        sent_status: Option<StatusCode>,
        bytes_sent: u64,
    ) -> Self {
        Outcome::ClientDisconnected {
            phase,
            sent_status,
            bytes_sent,
        }
    }

    pub(crate) fn failed(phase: Phase, sent_status: Option<StatusCode>) -> Self {
        Outcome::Failed { phase, sent_status }
    }

    pub(crate) fn panicked(phase: Phase, sent_status: Option<StatusCode>) -> Self {
        Outcome::Panicked { phase, sent_status }
    }

    pub(crate) fn request_body_timeout(timeout: Duration, status: StatusCode) -> Self {
        Outcome::RequestBodyTimeout { timeout, status }
    }

    pub(crate) fn response_body_timeout(
        timeout: Duration,
        sent_status: StatusCode,
        bytes_sent: u64,
    ) -> Self {
        Outcome::ResponseBodyTimeout {
            timeout,
            sent_status,
            bytes_sent,
        }
    }

    pub(crate) fn server_shutdown(
        phase: Phase,
        sent_status: Option<StatusCode>,
        bytes_sent: u64,
    ) -> Self {
        Outcome::ServerShutdown {
            phase,
            sent_status,
            bytes_sent,
        }
    }

    pub(crate) fn dropped() -> Self {
        Outcome::Dropped {}
    }

    /// The outcome of a generated response that passes a layer with `status`: a layer between
    /// may have rewritten the status it was generated with.
    pub(crate) fn sent_as(mut self, sent: StatusCode) -> Self {
        match &mut self {
            Outcome::Completed { status }
            | Outcome::ResponseTimeout { status, .. }
            | Outcome::DeadlineExceeded { status }
            | Outcome::ConnectTimeout { status, .. }
            | Outcome::ConnectFailed { status, .. }
            | Outcome::UpstreamFailed { status, .. }
            | Outcome::RequestBodyTimeout { status, .. } => *status = sent,
            Outcome::ServerShutdown {
                sent_status: Some(status),
                phase: Phase::BeforeHead,
                ..
            } => *status = sent,
            Outcome::ClientDisconnected { .. }
            | Outcome::ServerShutdown { .. }
            | Outcome::ResponseBodyTimeout { .. }
            | Outcome::Failed { .. }
            | Outcome::Panicked { .. }
            | Outcome::Dropped {} => {}
        }
        self
    }

    /// A short, stable name for the outcome: the value of the `tower_timeouts.outcome` span
    /// field (`completed`, `response_timeout`, `deadline_exceeded`, `connect_timeout`, `connect_failed`,
    /// `upstream_failed`, `request_body_timeout`, `response_body_timeout`,
    /// `client_disconnected`, `server_shutdown`, `failed`, `panicked`, `dropped`).
    pub fn kind(&self) -> &'static str {
        match self {
            Outcome::Completed { .. } => "completed",
            Outcome::ResponseTimeout { .. } => "response_timeout",
            Outcome::DeadlineExceeded { .. } => "deadline_exceeded",
            Outcome::ConnectTimeout { .. } => "connect_timeout",
            Outcome::ConnectFailed { .. } => "connect_failed",
            Outcome::UpstreamFailed { .. } => "upstream_failed",
            Outcome::RequestBodyTimeout { .. } => "request_body_timeout",
            Outcome::ResponseBodyTimeout { .. } => "response_body_timeout",
            Outcome::ClientDisconnected { .. } => "client_disconnected",
            Outcome::ServerShutdown { .. } => "server_shutdown",
            Outcome::Failed { .. } => "failed",
            Outcome::Panicked { .. } => "panicked",
            Outcome::Dropped { .. } => "dropped",
        }
    }

    /// The status that was actually sent to the client, if any: the
    /// `http.response.status_code` span field.
    ///
    /// `None` when no response head went out: a client gone before the head, a failure or a
    /// panic before the head, a dropped future.
    pub fn sent_status(&self) -> Option<StatusCode> {
        match self {
            Outcome::Completed { status }
            | Outcome::ResponseTimeout { status, .. }
            | Outcome::DeadlineExceeded { status }
            | Outcome::ConnectTimeout { status, .. }
            | Outcome::ConnectFailed { status, .. }
            | Outcome::UpstreamFailed { status, .. }
            | Outcome::RequestBodyTimeout { status, .. }
            | Outcome::ResponseBodyTimeout {
                sent_status: status,
                ..
            } => Some(*status),
            Outcome::ClientDisconnected { sent_status, .. }
            | Outcome::ServerShutdown { sent_status, .. }
            | Outcome::Failed { sent_status, .. }
            | Outcome::Panicked { sent_status, .. } => *sent_status,
            Outcome::Dropped {} => None,
        }
    }

    /// The status to log for the request: the one sent, or
    /// [499](CLIENT_CLOSED_REQUEST) for a client gone before the head. The
    /// `tower_timeouts.recorded_status` span field.
    pub fn recorded_status(&self) -> Option<StatusCode> {
        match self {
            Outcome::ClientDisconnected {
                sent_status: None, ..
            } => Some(CLIENT_CLOSED_REQUEST),
            other => other.sent_status(),
        }
    }

    /// The `error.type` value: an RFC 9209 error type where one fits, `client_disconnected` for a
    /// client that left, `None` for a normal completion.
    pub fn error_type(&self) -> Option<&'static str> {
        match self {
            Outcome::Completed { .. } => None,
            Outcome::ResponseTimeout { .. } => Some(ProxyError::HttpResponseTimeout.token()),
            Outcome::DeadlineExceeded { .. } => Some("deadline_exceeded"),
            Outcome::ConnectTimeout { .. } => Some(ProxyError::ConnectionTimeout.token()),
            Outcome::ConnectFailed { error, .. } | Outcome::UpstreamFailed { error, .. } => {
                Some(error.token())
            }
            Outcome::RequestBodyTimeout { .. } => Some("request_body_timeout"),
            Outcome::ResponseBodyTimeout { .. } => Some("response_body_timeout"),
            Outcome::ClientDisconnected { .. } => Some("client_disconnected"),
            Outcome::ServerShutdown { .. } => Some("server_shutdown"),
            Outcome::Failed {
                phase: Phase::BeforeHead,
                ..
            } => Some("service_error"),
            Outcome::Failed {
                phase: Phase::DuringBody,
                ..
            } => Some("body_error"),
            Outcome::Panicked { .. } => Some("panic"),
            Outcome::Dropped {} => Some("dropped"),
        }
    }

    /// The error type a generated response names in `Proxy-Status`: the RFC 9209 one. A
    /// deadline that passed before an upstream call is `http_response_timeout` there (the
    /// registry has nothing closer), `deadline_exceeded` as `error.type`; a request body too
    /// slow to arrive is `http_request_error` (the proxy answers a 4xx on the origin's behalf).
    pub(crate) fn proxy_error(&self) -> Option<&'static str> {
        match self {
            Outcome::DeadlineExceeded { .. } => Some(ProxyError::HttpResponseTimeout.token()),
            Outcome::RequestBodyTimeout { .. } => Some("http_request_error"),
            // Not a proxy's error: the server's own answer, with no RFC 9209 type.
            Outcome::ServerShutdown { .. } => None,
            other => other.error_type(),
        }
    }

    /// Whether the span status is an error (`otel.status_code = "ERROR"`).
    ///
    /// Following the OpenTelemetry HTTP server conventions: a completion is an error only with a
    /// 5xx status, and so is a request body too slow to arrive (a 4xx, the client's fault);
    /// every other incomplete exchange (a timeout, a failure, a client gone) is an error.
    pub fn is_error(&self) -> bool {
        match self {
            Outcome::Completed { status } | Outcome::RequestBodyTimeout { status, .. } => {
                status.is_server_error()
            }
            _ => true,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())?;
        if let Some(status) = self.recorded_status() {
            write!(f, " ({})", status.as_u16())?;
        }
        Ok(())
    }
}

/// When, in the life of an exchange, something happened.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Before the response head was produced.
    BeforeHead,
    /// After the head, while the response body was sent.
    DuringBody,
}

impl Phase {
    /// `before_head` or `during_body`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::BeforeHead => "before_head",
            Phase::DuringBody => "during_body",
        }
    }
}

/// An RFC 9209 Proxy-Status error type that the crate reports.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProxyError {
    /// `http_response_timeout`: connected, but the response did not arrive in time.
    HttpResponseTimeout,
    /// `connection_timeout`: the connection was not established in time.
    ConnectionTimeout,
    /// `connection_refused`: the upstream refused the connection.
    ConnectionRefused,
    /// `connection_terminated`: the connection closed before a response.
    ConnectionTerminated,
    /// `destination_unavailable`: the upstream cannot be reached (unreachable host or network).
    DestinationUnavailable,
    /// `destination_not_found`: the upstream's name did not resolve to anything.
    DestinationNotFound,
    /// `dns_error`: name resolution failed.
    DnsError,
    /// `dns_timeout`: name resolution did not finish in time.
    DnsTimeout,
    /// `tls_protocol_error`: the TLS handshake failed.
    TlsProtocolError,
    /// `http_protocol_error`: the upstream's response was not valid HTTP.
    HttpProtocolError,
    /// `proxy_internal_error`: anything the crate cannot tell more precisely.
    ProxyInternalError,
}

impl ProxyError {
    /// The RFC 9209 token, as it appears in `Proxy-Status: …; error=<token>`.
    pub fn token(self) -> &'static str {
        match self {
            ProxyError::HttpResponseTimeout => "http_response_timeout",
            ProxyError::ConnectionTimeout => "connection_timeout",
            ProxyError::ConnectionRefused => "connection_refused",
            ProxyError::ConnectionTerminated => "connection_terminated",
            ProxyError::DestinationUnavailable => "destination_unavailable",
            ProxyError::DestinationNotFound => "destination_not_found",
            ProxyError::DnsError => "dns_error",
            ProxyError::DnsTimeout => "dns_timeout",
            ProxyError::TlsProtocolError => "tls_protocol_error",
            ProxyError::HttpProtocolError => "http_protocol_error",
            ProxyError::ProxyInternalError => "proxy_internal_error",
        }
    }

    /// The status RFC 9209 recommends for this error type.
    pub fn recommended_status(self) -> StatusCode {
        match self {
            ProxyError::HttpResponseTimeout
            | ProxyError::ConnectionTimeout
            | ProxyError::DnsTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::DestinationUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::DestinationNotFound | ProxyError::ProxyInternalError => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ProxyError::ConnectionRefused
            | ProxyError::ConnectionTerminated
            | ProxyError::DnsError
            | ProxyError::TlsProtocolError
            | ProxyError::HttpProtocolError => StatusCode::BAD_GATEWAY,
        }
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.token())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_error_types() {
        let timeout =
            Outcome::response_timeout(Duration::from_secs(1), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(timeout.sent_status(), Some(StatusCode::GATEWAY_TIMEOUT));
        assert_eq!(timeout.error_type(), Some("http_response_timeout"));
        assert!(timeout.is_error());

        let gone = Outcome::client_disconnected(Phase::BeforeHead, None, 0);
        assert_eq!(gone.sent_status(), None);
        assert_eq!(gone.recorded_status().map(|s| s.as_u16()), Some(499));
        assert_eq!(gone.error_type(), Some("client_disconnected"));

        let gone_late = Outcome::client_disconnected(Phase::DuringBody, Some(StatusCode::OK), 10);
        assert_eq!(gone_late.sent_status(), Some(StatusCode::OK));
        assert_eq!(gone_late.recorded_status(), Some(StatusCode::OK));

        let ok = Outcome::completed(StatusCode::OK);
        assert!(!ok.is_error());
        assert_eq!(ok.error_type(), None);
        assert!(Outcome::completed(StatusCode::BAD_GATEWAY).is_error());
        assert!(!Outcome::completed(StatusCode::NOT_FOUND).is_error());
    }

    #[test]
    fn nonstandard_statuses() {
        assert_eq!(CLIENT_CLOSED_REQUEST.as_u16(), 499);
        assert_eq!(NETWORK_CONNECT_TIMEOUT.as_u16(), 599);
        assert!(NETWORK_CONNECT_TIMEOUT.is_server_error());
    }

    #[test]
    fn recommended_statuses() {
        assert_eq!(ProxyError::ConnectionTimeout.recommended_status(), 504);
        assert_eq!(ProxyError::ConnectionRefused.recommended_status(), 502);
        assert_eq!(ProxyError::DestinationUnavailable.recommended_status(), 503);
        assert_eq!(
            ProxyError::ConnectionRefused.to_string(),
            "connection_refused"
        );
    }
}
