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
//! # Why the work was cancelled
//!
//! [`ClientGone::gone`] has one meaning: the client left. It never fires for a request the
//! crate gave up on while its client was still there (a 504 answered in the handler's place, a
//! 408 for a stalled upload, a stream cut by a response-body limit, a response body that
//! failed). Work that should stop then too waits on [`ClientGone::cancelled`], which returns the
//! reason: [`Cancelled::ClientLeft`] or [`Cancelled::Abandoned`]. One signal with a reason,
//! rather than a second signal, so that a handler takes one thing into the work it spawns, and
//! a new reason (a server shutting down) can be added without a new type.
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
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// Fires when the client of a request leaves before its response is done.
///
/// Cheap to clone; all clones see the same signal. It fires only for a client that left: a
/// request that ends in any other way (a normal completion, a timeout, an error) never fires it.
/// [`cancelled`](Self::cancelled) is the wider signal: it also fires, with
/// [`Cancelled::Abandoned`], when the crate's layers give up on the response (a timeout, a body
/// limit), so that spawned work can stop then too.
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
    /// `NONE`, or the [`Cancelled`] reason, set once.
    state: AtomicU8,
    notify: Notify,
}

const NONE: u8 = 0;
const CLIENT_LEFT: u8 = 1;
const ABANDONED: u8 = 2;
const SERVER_SHUTDOWN: u8 = 3;

/// Why a request's work was cancelled: what [`ClientGone::cancelled`] tells.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cancelled {
    /// The client left before its response was done: what [`ClientGone::gone`] waits for.
    ClientLeft,
    /// The crate's layers gave up on the response while the client was still there: a limit
    /// answered in the handler's place (a 504, a 408, a gRPC `DEADLINE_EXCEEDED`), a
    /// response-body limit ended the stream, or the response body failed.
    Abandoned,
    /// The server is shutting down: a [`ShutdownLayer`](crate::ShutdownLayer)'s grace ran out
    /// and it answered 503 (or ended the stream) in the handler's place, or the request was
    /// dropped after that.
    ServerShutdown,
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
        self.reason() == Some(Cancelled::ClientLeft)
    }

    /// Why the request's work was cancelled, if it was: the client left, or the crate's
    /// layers gave up on the response.
    pub fn reason(&self) -> Option<Cancelled> {
        match self.shared.state.load(Ordering::Acquire) {
            CLIENT_LEFT => Some(Cancelled::ClientLeft),
            ABANDONED => Some(Cancelled::Abandoned),
            SERVER_SHUTDOWN => Some(Cancelled::ServerShutdown),
            _ => None,
        }
    }

    /// Waits until the client has left; at once if it already has. Never returns for a
    /// request whose response was given up for another reason (see
    /// [`cancelled`](Self::cancelled)). Cancel-safe.
    pub async fn gone(&self) {
        while self.cancelled().await != Cancelled::ClientLeft {
            std::future::pending::<()>().await;
        }
    }

    /// Waits until the request's work is cancelled, for any reason, and tells which: the client
    /// left ([`Cancelled::ClientLeft`]), or the crate's layers gave up on the response
    /// ([`Cancelled::Abandoned`]: a timeout answered in its place, a body limit ended it). A
    /// response that completes normally never cancels. Cancel-safe.
    ///
    /// ```
    /// use tower_timeouts::signal::Cancelled;
    /// use tower_timeouts::ClientGone;
    ///
    /// async fn spawned_work(signal: ClientGone) {
    ///     tokio::select! {
    ///         reason = signal.cancelled() => match reason {
    ///             Cancelled::ClientLeft => { /* nobody is waiting: stop */ }
    ///             _ => { /* the response was given up: stop, and log why */ }
    ///         },
    ///         _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => { /* done */ }
    ///     }
    /// }
    /// # let _ = spawned_work;
    /// ```
    pub async fn cancelled(&self) -> Cancelled {
        let notified = self.shared.notify.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        if let Some(reason) = self.reason() {
            return reason;
        }
        notified.await;
        self.reason().unwrap_or(Cancelled::Abandoned)
    }

    /// The client left.
    #[cfg(test)]
    pub(crate) fn fire(&self) {
        self.cancel(CLIENT_LEFT);
    }

    /// The crate's layers gave up on the response while the client was still there.
    pub(crate) fn abandon(&self) {
        self.cancel(ABANDONED);
    }

    /// The server gave up on the response: it is shutting down.
    pub(crate) fn shut_down(&self) {
        self.cancel(SERVER_SHUTDOWN);
    }

    /// What the request's work was dropped early for, as the extent of the drop says.
    pub(crate) fn cancel_for(&self, reason: crate::record::Extent) {
        use crate::record::Extent;
        self.cancel(match reason {
            Extent::ServerDropped => CLIENT_LEFT,
            Extent::ShutDown => SERVER_SHUTDOWN,
            _ => ABANDONED,
        });
    }

    /// The first reason stays.
    fn cancel(&self, reason: u8) {
        let shared = &self.shared;
        if shared
            .state
            .compare_exchange(NONE, reason, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            shared.notify.notify_waiters();
        }
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
        assert_eq!(gone.cancelled().await, Cancelled::ClientLeft);
        // The first reason stays.
        gone.abandon();
        assert_eq!(gone.reason(), Some(Cancelled::ClientLeft));
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_response_cancels_without_saying_the_client_left() {
        let gone = ClientGone::new();
        let cancelled = tokio::spawn({
            let gone = gone.clone();
            async move { gone.cancelled().await }
        });
        let left = tokio::spawn({
            let gone = gone.clone();
            async move { gone.gone().await }
        });
        tokio::task::yield_now().await;
        gone.abandon();
        assert_eq!(cancelled.await.unwrap(), Cancelled::Abandoned);
        assert!(!gone.is_gone());
        assert_eq!(gone.reason(), Some(Cancelled::Abandoned));
        // `gone` still waits: the client did not leave.
        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        assert!(!left.is_finished());
        // Nor does a client leaving afterwards change the reason.
        gone.fire();
        assert!(!gone.is_gone());
    }
}
