use tower_layer::Layer;

use super::{ClientDisconnect, Config};
use crate::record::Recorder;

/// Applies [`ClientDisconnect`] to a service.
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
    config: Config,
}

impl ClientDisconnectLayer {
    /// A layer with the default settings: events at WARN, no hook, a `request` span of its own.
    pub const fn new() -> Self {
        ClientDisconnectLayer {
            config: Config {
                recorder: Recorder::new(),
                signal_in_extensions: false,
            },
        }
    }

    /// Also puts each request's [`ClientGone`](crate::ClientGone) into its extensions before
    /// calling the inner service, for code that looks for it there (`axum::Extension<ClientGone>`,
    /// a layer that moves the request to another task, such as `tower::buffer`).
    ///
    /// Off by default: the signal is made on first use, through
    /// [`ClientGone::current`](crate::ClientGone::current) or the axum extractor, so that a
    /// request nobody asks about allocates nothing. With it on, every request pays for the
    /// signal and the extension.
    pub fn signal_in_extensions(mut self) -> Self {
        self.config.signal_in_extensions = true;
        self
    }

    crate::record::recorder_methods!(config.recorder);
}

impl<S> Layer<S> for ClientDisconnectLayer {
    type Service = ClientDisconnect<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ClientDisconnect {
            inner,
            config: self.config.clone(),
        }
    }
}
