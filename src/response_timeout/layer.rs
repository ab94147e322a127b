use std::time::Duration;

use http::StatusCode;
use tower_layer::Layer;

use super::{Config, ResponseTimeout};
use crate::record::Recorder;
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
    pub const fn new(timeout: Duration) -> Self {
        ResponseTimeoutLayer {
            config: Config {
                timeout,
                status: StatusCode::GATEWAY_TIMEOUT,
                responses: ResponseConfig::new(),
                recorder: Recorder::new(),
            },
        }
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
