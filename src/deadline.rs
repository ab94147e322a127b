//! A per-request time limit that overrides a layer's configured one.
//!
//! Put a [`Deadline`] into a request's extensions (from an earlier layer, a route, or a handler
//! that forwards the request) and [`ResponseTimeout`](crate::ResponseTimeout) uses it instead of
//! its configured limit, longer or shorter.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower_timeouts::Deadline;
//!
//! let mut request = http::Request::new(());
//! // This request may take 30 s, whatever the layer's default.
//! request.extensions_mut().insert(Deadline::after(Duration::from_secs(30)));
//! ```

use std::time::Duration;

use tokio::time::Instant;

/// A per-request time limit, read from the request's extensions.
///
/// [`Deadline::after`] is measured like the layer's own limit (from the first poll of the
/// response future); [`Deadline::at`] is an absolute point in time (`tokio::time::Instant`, so
/// paused-time tests work). A deadline already past times the request out at its first poll
/// unless the response is ready then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline {
    kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    After(Duration),
    At(Instant),
}

impl Deadline {
    /// A limit of `timeout`, in place of the layer's.
    pub const fn after(timeout: Duration) -> Self {
        Deadline {
            kind: Kind::After(timeout),
        }
    }

    /// A limit at `deadline`.
    pub const fn at(deadline: Instant) -> Self {
        Deadline {
            kind: Kind::At(deadline),
        }
    }

    pub(crate) fn limit(self) -> Limit {
        match self.kind {
            Kind::After(timeout) => Limit::After(timeout),
            Kind::At(at) => Limit::At(at, at.saturating_duration_since(Instant::now())),
        }
    }
}

/// The limit a response future works with.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Limit {
    /// Measured from the first poll.
    After(Duration),
    /// An absolute deadline, and the time that was left to it at `call` (what is reported).
    At(Instant, Duration),
}

impl Limit {
    /// The limit as reported in the outcome and the span.
    pub(crate) fn timeout(self) -> Duration {
        match self {
            Limit::After(timeout) | Limit::At(_, timeout) => timeout,
        }
    }
}
