//! The signal a handler gets to learn that its client left.
//!
//! [`ClientDisconnectLayer`](crate::ClientDisconnectLayer) puts a [`ClientGone`] into every
//! request's extensions before it calls the inner service, and fires it when the client leaves.
//! Dropping the handler's future already stops the handler itself; the signal is for work the
//! handler spawned, which outlives that future.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response};
//! use tower_timeouts::ClientGone;
//!
//! async fn handler(request: Request<String>) -> Result<Response<String>, Infallible> {
//!     let gone = request.extensions().get::<ClientGone>().cloned();
//!     tokio::spawn(async move {
//!         let Some(gone) = gone else { return };
//!         tokio::select! {
//!             _ = gone.gone() => { /* the client left: stop the work */ }
//!             _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => { /* done */ }
//!         }
//!     });
//!     Ok(Response::new("started".to_owned()))
//! }
//! # let _ = handler;
//! ```
//!
//! In axum, `axum::Extension<ClientGone>` extracts it; with the crate's `axum` feature
//! `ClientGone` is an extractor itself (and `Option<ClientGone>` one that never fails).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// Fires when the client of a request leaves before its response is done.
///
/// Cheap to clone; all clones see the same signal. It fires only for a client that left: a
/// request that ends in any other way (a normal completion, a timeout, an error) never fires it.
#[derive(Clone, Default)]
pub struct ClientGone {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    gone: AtomicBool,
    notify: Notify,
}

impl fmt::Debug for ClientGone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientGone")
            .field("gone", &self.is_gone())
            .finish()
    }
}

impl ClientGone {
    pub(crate) fn new() -> Self {
        ClientGone::default()
    }

    /// Whether the client has left.
    pub fn is_gone(&self) -> bool {
        self.shared.gone.load(Ordering::Acquire)
    }

    /// Waits until the client has left; at once if it already has. Cancel-safe.
    pub async fn gone(&self) {
        let notified = self.shared.notify.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        if self.is_gone() {
            return;
        }
        notified.await;
    }

    pub(crate) fn fire(&self) {
        self.shared.gone.store(true, Ordering::Release);
        self.shared.notify.notify_waiters();
    }
}

#[cfg(feature = "axum")]
mod extract {
    use super::ClientGone;
    use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
    use http::request::Parts;
    use http::StatusCode;
    use std::convert::Infallible;

    /// Extracts the signal; fails with 500 when no `ClientDisconnectLayer` is installed.
    impl<S: Send + Sync> FromRequestParts<S> for ClientGone {
        type Rejection = (StatusCode, &'static str);

        async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
            parts.extensions.get::<ClientGone>().cloned().ok_or((
                StatusCode::INTERNAL_SERVER_ERROR,
                "ClientGone needs tower_timeouts::ClientDisconnectLayer around the route",
            ))
        }
    }

    /// Extracts the signal when a `ClientDisconnectLayer` is installed, `None` otherwise.
    impl<S: Send + Sync> OptionalFromRequestParts<S> for ClientGone {
        type Rejection = Infallible;

        async fn from_request_parts(
            parts: &mut Parts,
            _: &S,
        ) -> Result<Option<Self>, Self::Rejection> {
            Ok(parts.extensions.get::<ClientGone>().cloned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn fires_waiters_and_late_comers() {
        let gone = ClientGone::new();
        let waiter = tokio::spawn({
            let gone = gone.clone();
            async move { gone.gone().await }
        });
        tokio::task::yield_now().await;
        assert!(!gone.is_gone());
        assert!(!waiter.is_finished());
        gone.fire();
        waiter.await.unwrap();
        assert!(gone.is_gone());
        // A waiter that comes after the signal returns at once.
        gone.gone().await;
    }
}
