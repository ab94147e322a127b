//! The signal a handler gets to learn that its client left.
//!
//! [`ClientDisconnectLayer`](crate::ClientDisconnectLayer) gives every request a [`ClientGone`],
//! made on first use, and fires it when the client leaves. Dropping the handler's future
//! already stops the handler itself; the signal is for work the handler spawned, which
//! outlives that future, and for a handler that a [`DetachLayer`](crate::DetachLayer) lets run
//! on.
//!
//! # Example
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response};
//! use tower_timeouts::ClientGone;
//!
//! async fn handler(_: Request<String>) -> Result<Response<String>, Infallible> {
//!     // `None` when no ClientDisconnectLayer is calling this handler.
//!     let gone = ClientGone::current();
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
//! # Where to get it
//!
//! - [`ClientGone::current`], from the handler or anything its future runs while it is polled.
//!   It is not there in a task the handler spawned: take it before spawning.
//! - With the crate's `axum` feature, `ClientGone` is an extractor (and `Option<ClientGone>`
//!   one that never fails).
//! - From the request's extensions, when the layer is set up with
//!   [`signal_in_extensions`](crate::ClientDisconnectLayer::signal_in_extensions) (for
//!   `axum::Extension<ClientGone>`, or a layer between that moves the request to another task,
//!   such as `tower::buffer`). That costs every request the signal and the extension, made
//!   eagerly; the default costs nothing until the signal is asked for.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// Fires when the client of a request leaves before its response is done.
///
/// Cheap to clone; all clones see the same signal. It fires only for a client that left: a
/// request that ends in any other way (a normal completion, a timeout, an error) never fires it.
///
/// Made on first use, so that requests nobody asks about cost nothing: get it with
/// [`ClientGone::current`] from the handler (or, in axum, with the extractor), or from the
/// request's extensions when the layer is set to put it there.
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

/// Whether a [`ClientDisconnect`](crate::ClientDisconnect) is calling or polling the inner
/// service on this thread, and whether its request's signal was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Current {
    None,
    /// A layer is in, and nobody asked for its signal yet.
    Unmade,
    /// A layer is in, and its signal is in [`MADE`].
    Made,
}

thread_local! {
    // Two thread-locals, so that the common case (nobody asks for the signal) touches only the
    // one that needs no destructor, which is the cheaper one to reach.
    static CURRENT: Cell<Current> = const { Cell::new(Current::None) };
    /// The signal of the layer that is in, once made.
    static MADE: Cell<Option<ClientGone>> = const { Cell::new(None) };
}

impl ClientGone {
    pub(crate) fn new() -> Self {
        ClientGone::default()
    }

    /// The signal of the request being handled: call it from the handler (or anything the
    /// handler's future runs while it is polled, such as an extractor), under a
    /// [`ClientDisconnectLayer`](crate::ClientDisconnectLayer). `None` elsewhere, for instance
    /// in a task the handler spawned: take the signal before spawning and move it in.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use http::{Request, Response};
    /// use tower_timeouts::ClientGone;
    ///
    /// async fn handler(_: Request<String>) -> Result<Response<String>, Infallible> {
    ///     let gone = ClientGone::current().expect("under a ClientDisconnectLayer");
    ///     tokio::spawn(async move {
    ///         tokio::select! {
    ///             _ = gone.gone() => { /* the client left: stop the work */ }
    ///             _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => { /* done */ }
    ///         }
    ///     });
    ///     Ok(Response::new("started".to_owned()))
    /// }
    /// # let _ = handler;
    /// ```
    pub fn current() -> Option<ClientGone> {
        let current = CURRENT.try_with(Cell::get).ok()?;
        let made = MADE
            .try_with(|made| match current {
                Current::None => None,
                Current::Unmade => {
                    let gone = ClientGone::new();
                    made.set(Some(gone.clone()));
                    Some(gone)
                }
                Current::Made => {
                    let gone = made.take();
                    made.set(gone.clone());
                    gone
                }
            })
            .ok()
            .flatten();
        if made.is_some() {
            CURRENT.set(Current::Made);
        }
        made
    }

    /// Makes `gone` the [`current`](ClientGone::current) signal for a call or a poll of the
    /// inner service, until [`Scope::leave`]; a guard rather than a function taking the call as
    /// a closure, so that what the call returns is not moved once more.
    #[inline(always)]
    pub(crate) fn enter(gone: Option<ClientGone>) -> Scope {
        let inner = if gone.is_some() {
            Current::Made
        } else {
            Current::Unmade
        };
        let outer = CURRENT.replace(inner);
        // The signal slot is touched only when there is a signal to put in or to keep aside.
        let outer_made = if inner == Current::Made || outer == Current::Made {
            MADE.replace(gone)
        } else {
            None
        };
        Scope { outer, outer_made }
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

/// The time a [`ClientGone`] is the current one (see [`ClientGone::enter`]). Dropped without
/// [`leave`](Scope::leave) (by a panic), it restores the signal it replaced.
pub(crate) struct Scope {
    outer: Current,
    /// The signal of the layer this one is inside, kept aside meanwhile.
    outer_made: Option<ClientGone>,
}

impl Scope {
    /// Restores the signal this one replaced; returns this one, or the one made meanwhile if
    /// there was none.
    #[inline(always)]
    pub(crate) fn leave(mut self) -> Option<ClientGone> {
        let outer = self.outer;
        let outer_made = self.outer_made.take();
        // Nothing left for `drop` to restore.
        std::mem::forget(self);
        let inner = CURRENT.replace(outer);
        if inner == Current::Made || outer == Current::Made {
            MADE.replace(outer_made)
        } else {
            None
        }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let inner = CURRENT.replace(self.outer);
        if inner == Current::Made || self.outer == Current::Made {
            MADE.set(self.outer_made.take());
        }
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
            ClientGone::current()
                .or_else(|| parts.extensions.get::<ClientGone>().cloned())
                .ok_or((
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
            Ok(ClientGone::current().or_else(|| parts.extensions.get::<ClientGone>().cloned()))
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
