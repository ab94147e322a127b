use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use tower_layer::Layer;
use tracing::Level;

use super::{Config, ResponseTimeout};
use crate::outcome::Outcome;
use crate::record::{OnOutcome, Recorder};
use crate::response::ResponseConfig;

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
    pub fn new(timeout: Duration) -> Self {
        ResponseTimeoutLayer {
            config: Config {
                timeout,
                status: StatusCode::GATEWAY_TIMEOUT,
                responses: ResponseConfig::default(),
                recorder: Recorder::default(),
            },
        }
    }

    /// Answers a timeout with `status` instead of 504.
    pub fn status(mut self, status: StatusCode) -> Self {
        self.config.status = status;
        self
    }

    /// Names the proxy in `Proxy-Status` (default `tower-timeouts`). A name that is not an
    /// RFC 8941 token is sent as a quoted string.
    pub fn proxy_name(mut self, name: &str) -> Self {
        self.config.responses = self.config.responses.proxy_name(Some(name));
        self
    }

    /// Sends no `Proxy-Status` header.
    pub fn without_proxy_status(mut self) -> Self {
        self.config.responses = self.config.responses.proxy_name(None);
        self
    }

    /// Builds the timeout response with `make` instead of the default one. The status it sets
    /// is what is sent (the outcome's [`sent_status`](Outcome::sent_status) is the configured
    /// one). `Proxy-Status` is added unless `make` sets it or it is turned off, and the
    /// [`Generated`](crate::Generated) marker is always added.
    pub fn response_with<F>(mut self, make: F) -> Self
    where
        F: Fn(&Outcome) -> Response<Bytes> + Send + Sync + 'static,
    {
        self.config.responses = self.config.responses.response_with(make);
        self
    }

    /// Calls `hook` once per request, when it ends. Used when this is the outermost of the
    /// crate's layers on the request; the outermost one records for all.
    pub fn on_outcome(mut self, hook: impl OnOutcome) -> Self {
        self.config.recorder = self.config.recorder.on_outcome(hook);
        self
    }

    /// The level of the event emitted for every outcome but a normal completion (default WARN).
    pub fn event_level(mut self, level: Level) -> Self {
        self.config.recorder = self.config.recorder.event_level(level);
        self
    }

    /// Records into the span current at `call` instead of opening a `request` span. See
    /// [`trace`](crate::trace).
    pub fn record_in_current_span(mut self) -> Self {
        self.config.recorder = self.config.recorder.record_in_current_span();
        self
    }

    pub(super) fn layer_service<S>(&self, inner: S) -> ResponseTimeout<S> {
        ResponseTimeout {
            inner,
            config: Arc::new(self.config.clone()),
        }
    }
}

impl<S> Layer<S> for ResponseTimeoutLayer {
    type Service = ResponseTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        self.layer_service(inner)
    }
}
