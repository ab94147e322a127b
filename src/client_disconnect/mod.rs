//! Detect clients that leave before their response is done, record a 499, and cancel the work.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use axum::{routing::get, Router};
//! use tower::ServiceBuilder;
//! use tower_timeouts::{ClientDisconnectLayer, ResponseTimeoutLayer};
//!
//! let app: Router = Router::new().route("/", get(|| async { "hello" })).layer(
//!     ServiceBuilder::new()
//!         // Outermost, so that its elapsed time covers the whole request.
//!         .layer(ClientDisconnectLayer::new())
//!         .layer(ResponseTimeoutLayer::new(Duration::from_secs(10))),
//! );
//! # let _ = app;
//! ```
//!
//! # What counts as a client that left
//!
//! The only sign a tower service gets is that the server **drops** what it was given:
//!
//! - the response future, before it produced a response: a disconnect **before the head**,
//!   recorded with status 499 (never sent);
//! - the response body, before its end: a disconnect **during the body**, recorded with the
//!   status already sent and the body bytes handed to the server.
//!
//! A body counts as complete, and its drop as no disconnect, when it returned its end, or
//! `is_end_stream()` was true, or the bytes sent reached its exact size (`size_hint` or
//! `content-length`), or the response has no body by definition (a HEAD request, 1xx, 204,
//! 304). Hyper finishes `Full`, `Empty`, sized streams, HEAD, 204 and 304 responses without
//! polling them to their end; none of those is a disconnect.
//!
//! Never a disconnect either: a response one of the crate's layers generated (its outcome is
//! the timeout), an inner service that returned an error or panicked (recorded as
//! [`Outcome::Failed`](crate::Outcome::Failed) and [`Outcome::Panicked`](crate::Outcome::Panicked),
//! and the panic goes on).
//!
//! # When hyper lets a disconnect be seen
//!
//! Measured with hyper 1.x (see the crate's `tests/client_disconnect.rs`):
//!
//! - **HTTP/2** (h2 and h2c): always. A stream reset (`RST_STREAM`) or a closed connection
//!   drops the stream's future or body within a millisecond, whatever the request body's state.
//! - **HTTP/1.1**, default settings (`axum::serve`, hyper-util's `auto::Builder`): only once
//!   hyper has read the whole request. A GET, or a small body that arrived with the head, is
//!   seen within a millisecond of the client's FIN or RST. A larger, partial or chunked request
//!   body that the handler holds unread, `Expect: 100-continue`, or a pipelined request behind it
//!   keeps hyper from looking, and the handler runs to its end (a handler reading the body gets
//!   an error instead). Serve through the [connection watcher](crate::watch) and these are seen
//!   too.
//! - **HTTP/1.1 with `half_close(true)`**: never while a request is in flight; a body only at
//!   its next failed write.
//! - During the body (both versions): the body is dropped when a write fails or the
//!   connection closes, within a millisecond of the client leaving on loopback.
//!
//! # Cancelling spawned work
//!
//! The layer gives every request a [`ClientGone`], made when the handler first asks for it
//! ([`ClientGone::current`], or the axum extractor), and fires it when the client leaves. See
//! [`signal`](crate::signal).
//!
//! # Where to put it
//!
//! Anywhere among the crate's layers: whatever the order, a timeout of the crate is never
//! taken for a client leaving (it drops what it wraps as *abandoned*), and a client that leaves
//! is recorded as one whenever this layer is on the request (see [`record`](crate::record)).
//! Outermost is the usual place: its elapsed time then covers everything. Keep it, like the
//! crate's other layers, outside layers that are not the crate's and drop what they wrap (a
//! `tower_http` timeout, load shedding): a drop from outside all of the crate's layers looks
//! like the server's.

mod body;
mod future;
mod layer;

pub use self::body::DisconnectBody;
pub use self::future::ResponseFuture;
pub use self::layer::ClientDisconnectLayer;

use std::task::{Context, Poll};

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use crate::record::{nothing_can_see, Joining, Recorder, Role, Share};
use crate::signal::ClientGone;

/// A layer's configuration: the layer holds it and each of its services a clone, cheap to
/// make (what a clone would copy at length, such as a hook, is behind an `Arc` inside).
#[derive(Clone, Debug, Default)]
struct Config {
    recorder: Recorder,
    signal_in_extensions: bool,
}

/// Records clients that leave before their response is done, and fires their
/// [`ClientGone`] signal.
///
/// Made by [`ClientDisconnectLayer`]; see the [module docs](crate::client_disconnect).
#[derive(Clone, Debug)]
pub struct ClientDisconnect<S> {
    inner: S,
    config: Config,
}

impl<S> ClientDisconnect<S> {
    /// Wraps `inner` with the default settings.
    pub fn new(inner: S) -> Self {
        ClientDisconnectLayer::new().layer(inner)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ClientDisconnect<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: http_body::Body,
{
    type Response = Response<DisconnectBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // Apart from the path where nothing can see a recording, which takes no reference to
        // the request: it is handed on without a copy.
        if !nothing_can_see() || self.config.signal_in_extensions {
            return self.call_recorded(request);
        }
        let is_head = request.method() == http::Method::HEAD;
        // An outer layer's signal, or one the caller put there; else made on first use.
        let gone = request.extensions().get::<ClientGone>().cloned();
        // Current while the inner service is called, too: a layer inside may ask for it there
        // (tower's `MapRequest` runs in `call`).
        let scope = ClientGone::enter(gone);
        let inner = self.inner.call(request);
        ResponseFuture::new(inner, Share::none(), scope.leave(), is_head)
    }
}

impl<S> ClientDisconnect<S> {
    /// [`Service::call`] when something can see a recording, or the signal goes into the
    /// request's extensions.
    #[inline(never)]
    fn call_recorded<ReqBody>(&mut self, mut request: Request<ReqBody>) -> ResponseFuture<S::Future>
    where
        S: Service<Request<ReqBody>>,
    {
        let is_head = request.method() == http::Method::HEAD;
        let mut gone = request.extensions().get::<ClientGone>().cloned();
        if self.config.signal_in_extensions && gone.is_none() {
            let signal = ClientGone::new();
            request.extensions_mut().insert(signal.clone());
            gone = Some(signal);
        }
        let joining = Joining {
            watches_disconnects: true,
            ..Joining::new(Role::Server)
        };
        let share = self.config.recorder.start(&mut request, joining);
        let _calling = share.calling();
        let scope = ClientGone::enter(gone);
        let inner = self.inner.call(request);
        ResponseFuture::new(inner, share, scope.leave(), is_head)
    }
}

#[cfg(test)]
mod tests;
