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

use crate::timer::Timer;

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

    /// The limit as reported (for an absolute deadline: the time left to it now), and its
    /// timer.
    pub(crate) fn timer(self) -> (Duration, Timer) {
        match self.kind {
            Kind::After(timeout) => (timeout, Timer::after(timeout)),
            Kind::At(at) => (at.saturating_duration_since(Instant::now()), Timer::at(at)),
        }
    }
}
