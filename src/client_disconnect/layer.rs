use tower_layer::Layer;
use tracing::Level;

use super::ClientDisconnect;
use crate::record::{OnOutcome, Recorder};

/// Applies [`ClientDisconnect`] to a service. Put it outermost.
///
/// ```
/// use tower_timeouts::{ClientDisconnectLayer, Outcome, Report};
///
/// let layer = ClientDisconnectLayer::new().on_outcome(|report: &Report<'_>| {
///     if let Outcome::ClientDisconnected { .. } = report.outcome() {
///         eprintln!("client left after {:?}", report.elapsed());
///     }
/// });
/// # let _ = layer;
/// ```
#[derive(Clone, Debug, Default)]
pub struct ClientDisconnectLayer {
    recorder: Recorder,
}

impl ClientDisconnectLayer {
    /// A layer with the default settings: events at WARN, no hook, a `request` span of its own.
    pub fn new() -> Self {
        ClientDisconnectLayer::default()
    }

    /// Calls `hook` once per request, when it ends (for a streamed body, at its end or when the
    /// client leaves).
    pub fn on_outcome(mut self, hook: impl OnOutcome) -> Self {
        self.recorder = self.recorder.on_outcome(hook);
        self
    }

    /// The level of the event emitted for every outcome but a normal completion (default WARN).
    pub fn event_level(mut self, level: Level) -> Self {
        self.recorder = self.recorder.event_level(level);
        self
    }

    /// Records into the span current at `call` instead of opening a `request` span. See
    /// [`trace`](crate::trace).
    pub fn record_in_current_span(mut self) -> Self {
        self.recorder = self.recorder.record_in_current_span();
        self
    }
}

impl<S> Layer<S> for ClientDisconnectLayer {
    type Service = ClientDisconnect<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ClientDisconnect {
            inner,
            recorder: self.recorder.clone(),
        }
    }
}
