use tower_layer::Layer;

use super::ClientDisconnect;
use crate::record::Recorder;

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

    crate::record::recorder_methods!(recorder);
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
