use std::time::Duration;

use http::header::HeaderName;
use http::StatusCode;
use tower_layer::Layer;

use super::{Config, ResponseTimeout};
use crate::record::Recorder;
use crate::response::ResponseConfig;

/// The margin taken off a caller's deadline unless configured otherwise: see
/// [`ResponseTimeoutLayer::deadline_margin`].
pub const DEFAULT_DEADLINE_MARGIN: Duration = Duration::from_millis(10);

/// Applies [`ResponseTimeout`] to a service: answers 504 Gateway Timeout when the response does
/// not arrive within the limit.
///
/// ```
/// use std::time::Duration;
/// use http::StatusCode;
/// use tower_timeouts::ResponseTimeoutLayer;
///
/// let layer = ResponseTimeoutLayer::new(Duration::from_secs(10))
///     .status(StatusCode::SERVICE_UNAVAILABLE)
///     .proxy_name("edge-7")
///     .event_level(tracing::Level::INFO);
/// # let _ = layer;
/// ```
#[derive(Clone, Debug)]
pub struct ResponseTimeoutLayer {
    config: Config,
}

impl ResponseTimeoutLayer {
    /// A limit of `timeout` on each response, answered with 504 Gateway Timeout.
    pub const fn new(timeout: Duration) -> Self {
        ResponseTimeoutLayer {
            config: Config {
                timeout,
                status: StatusCode::GATEWAY_TIMEOUT,
                responses: ResponseConfig::new(),
                recorder: Recorder::new(),
                incoming: None,
            },
        }
    }

    /// Ignores the `grpc-timeout` of gRPC requests (honoured by default: it shortens the
    /// request's limit, never lengthens it). See [`deadline`](crate::deadline).
    pub fn ignore_grpc_timeout(mut self) -> Self {
        self.config.incoming_mut().grpc_timeout = false;
        self
    }

    /// Honours a deadline the caller sends in `header`, in milliseconds (1 to 8 digits,
    /// nothing else), as `grpc-timeout` is honoured on gRPC requests. Off by default: accept it
    /// only from callers you would let cancel their own requests (see
    /// [`deadline`](crate::deadline#where-a-requests-deadline-comes-from)).
    pub fn deadline_header(mut self, header: HeaderName) -> Self {
        self.config.incoming_mut().header = Some(header);
        self
    }

    /// Takes `margin` off the deadline a caller sends (default
    /// [10 ms](DEFAULT_DEADLINE_MARGIN)), so that this service gives up, and its answer
    /// arrives, a little before the caller gives up: Envoy's `grpc_timeout_header_offset`. A
    /// deadline shorter than the margin times out at once.
    ///
    /// Not zero by default because tonic enforces `grpc-timeout` itself, at the very deadline,
    /// on both sides: its client gives up with `CANCELLED` "Timeout expired", and its server,
    /// outside every layer given to `Server::layer`, drops the request and answers the same.
    /// With no margin, those race the `DEADLINE_EXCEEDED` of this layer, and a request the
    /// tonic server drops looks, to a [`ClientDisconnectLayer`](crate::ClientDisconnectLayer)
    /// inside, like a client that left.
    pub fn deadline_margin(mut self, margin: Duration) -> Self {
        self.config.incoming_mut().margin = margin;
        self
    }

    /// Answers a timeout with `status` instead of 504.
    pub fn status(mut self, status: StatusCode) -> Self {
        self.config.status = status;
        self
    }

    crate::response::response_methods!(config.responses);
    crate::record::recorder_methods!(config.recorder);
}

impl<S> Layer<S> for ResponseTimeoutLayer {
    type Service = ResponseTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ResponseTimeout {
            inner,
            config: self.config.clone(),
        }
    }
}
