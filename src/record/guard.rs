//! A layer's hold on its inner future: the protocol every crate layer follows around it,
//! written once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Response;
use pin_project_lite::pin_project;
use tracing::span::Entered;

use super::exchange::{Exchange, Joining};
use super::extent::{self, Extent};
use super::tail::Tail;
use super::Recorder;
use crate::outcome::{Outcome, Phase};
use crate::response::Generated;
use crate::signal::ClientGone;

/// A layer's part in a request's recording: the exchange for the layer that records the
/// request; nothing for a layer that joined another's exchange, or when nothing could see a
/// recording.
#[derive(Debug, Default)]
pub(crate) struct Share(Option<Arc<Exchange>>);

impl Drop for Share {
    /// A share that still holds its exchange here was not handed to a [`Guarded`] (the inner
    /// service's `call` panicked) or its guard let it go without an outcome: recorded as a
    /// panic or a drop, unless recorded already.
    fn drop(&mut self) {
        if let Some(exchange) = self.0.take() {
            let outcome = if std::thread::panicking() {
                Outcome::panicked(Phase::BeforeHead, None)
            } else {
                Outcome::dropped()
            };
            exchange.step(|stage| stage.end(outcome));
        }
    }
}

impl Recorder {
    /// A layer got `request`: it joins the request's exchange, or opens one. Call the inner
    /// service inside [`Share::calling`].
    #[inline]
    pub(crate) fn start<B>(&self, request: &mut http::Request<B>, joining: Joining) -> Share {
        Share(Exchange::start(self, request, joining))
    }
}

/// While a layer that records calls its inner service: the request's span is entered, and a
/// request that the inner service makes meanwhile is an upstream call.
pub(crate) struct Calling<'a> {
    _entered: Entered<'a>,
    _extent: extent::Guard,
}

impl Share {
    /// Enters the call of the inner service (see [`Calling`]); nothing for a layer that does
    /// not record.
    #[inline]
    pub(crate) fn calling(&self) -> Option<Calling<'_>> {
        self.0.as_deref().map(|exchange| Calling {
            _entered: exchange.span().enter(),
            _extent: extent::enter(Extent::Calling),
        })
    }

    #[inline]
    fn entered(&self) -> Option<Entered<'_>> {
        self.0.as_deref().map(|exchange| exchange.span().enter())
    }
}

/// The outcome of a response that passes the recording layer: the one its [`Generated`]
/// marker names, with the status it passes with (a layer between may have rewritten it), or
/// a completion with its status.
fn head_outcome<B>(response: &Response<B>) -> Outcome {
    match response.extensions().get::<Generated>() {
        Some(generated) => generated.outcome().clone().sent_as(response.status()),
        None => Outcome::completed(response.status()),
    }
}

/// A body a crate layer returns, which can carry a [`Tail`].
pub(crate) trait Followed: http_body::Body {
    /// Follows the body with `tail` from now on.
    fn follow(&mut self, tail: Tail);
}

pin_project! {
    /// A layer's hold on its inner future, with the layer's [`Share`]:
    ///
    /// - [`poll`](Guarded::poll) polls the inner future in the `Polling` extent (and, for the
    ///   layer that records, in the request's span); a poll that panics leaves its mark, so
    ///   that the drop that follows knows;
    /// - [`abandon`](Guarded::abandon) drops the inner future on the layer's own decision, in
    ///   the `Abandoned` extent, so that no layer inside takes it for a client leaving;
    /// - dropped with the inner future still there, it drops it in the extent its own drop
    ///   says (the server dropped the request, or a layer gave up on it), then the recording
    ///   layer records that;
    /// - [`respond`](Guarded::respond) records what the layer returns, or hands the exchange
    ///   to the body.
    pub(crate) struct Guarded<F> {
        #[pin]
        state: State<F>,
        share: Share,
        // Set while the inner future is polled: still set when the guard is dropped, that
        // poll panicked.
        polling: bool,
    }

    impl<F> PinnedDrop for Guarded<F> {
        fn drop(this: Pin<&mut Self>) {
            let mut this = this.project();
            if let StateProj::Done = this.state.as_mut().project() {
                return;
            }
            let reason = extent::drop_reason(*this.polling);
            {
                let _entered = this.share.entered();
                let _extent = extent::enter(reason);
                this.state.set(State::Done);
            }
            if let Some(exchange) = &this.share.0 {
                if *this.polling {
                    let panicked = Outcome::panicked(Phase::BeforeHead, None);
                    exchange.step(|stage| stage.end(panicked));
                } else {
                    exchange.dropped(reason, None);
                }
            }
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Running { #[pin] inner: F },
        Done,
    }
}

impl<F> std::fmt::Debug for Guarded<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("running", &matches!(self.state, State::Running { .. }))
            .field("share", &self.share)
            .finish()
    }
}

impl<F> Guarded<F> {
    #[inline(always)]
    pub(crate) fn new(inner: F, share: Share) -> Self {
        Guarded {
            state: State::Running { inner },
            share,
            polling: false,
        }
    }

    /// Whether the inner future is still there.
    #[inline]
    pub(crate) fn is_running(&self) -> bool {
        matches!(self.state, State::Running { .. })
    }

    /// Whether, dropped now, this hold would drop its inner future because the server dropped
    /// the request (the client left); see [`extent::drop_reason`].
    #[inline]
    pub(crate) fn is_dropped_by_server(&self) -> bool {
        self.is_running() && extent::drop_reason(self.polling) == Extent::ServerDropped
    }

    /// Drops the inner future on this layer's own decision (its limit fired): no layer inside
    /// takes the drop for a client leaving.
    pub(crate) fn abandon(self: Pin<&mut Self>) {
        let mut this = self.project();
        let _entered = this.share.entered();
        let _extent = extent::enter(Extent::Abandoned);
        this.state.set(State::Done);
    }

    /// Records what the layer returns, if this layer records: an error or a response head
    /// (its outcome, see [`head_outcome`]). When a layer on the request watches for clients
    /// that leave, the outcome waits for the end of the body (unless the response is a
    /// generated one), which `gone` (the layer's own signal, with whether the request is a
    /// HEAD) also follows.
    pub(crate) fn respond<B: Followed, E>(
        self: Pin<&mut Self>,
        result: &mut Result<Response<B>, E>,
        gone: Option<(ClientGone, bool)>,
    ) {
        let owner = self.project().share.0.take();
        let response = match result {
            Ok(response) => response,
            Err(_) => {
                if let Some(exchange) = owner {
                    exchange.step(|stage| stage.end(Outcome::failed(Phase::BeforeHead, None)));
                }
                return;
            }
        };
        // A generated response is its outcome: its body is not followed, and a client that
        // leaves while it goes out does not change that.
        let generated = response.extensions().get::<Generated>().is_some();
        let owner = owner.filter(|exchange| exchange.head(head_outcome(response), !generated));
        let gone = gone.filter(|_| !generated);
        let is_head = match (&owner, &gone) {
            (Some(exchange), _) => exchange.is_head_request(),
            (None, Some((_, is_head))) => *is_head,
            (None, None) => return,
        };
        if let Some(tail) = Tail::new(
            owner,
            gone.map(|(gone, _)| gone),
            response.status(),
            response.headers(),
            response.body(),
            is_head,
        ) {
            response.body_mut().follow(tail);
        }
    }
}

impl<F: Future> Guarded<F> {
    /// Polls the inner future. Once it is ready, it is dropped.
    ///
    /// Panics if polled after the inner future finished or was abandoned.
    #[inline(always)]
    pub(crate) fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let mut this = self.project();
        let StateProj::Running { inner } = this.state.as_mut().project() else {
            panic!("a tower-timeouts response future was polled after it completed");
        };
        let _entered = this.share.entered();
        let _extent = extent::enter(Extent::Polling);
        *this.polling = true;
        let polled = inner.poll(cx);
        *this.polling = false;
        if polled.is_ready() {
            // Still in the poll's extent: whatever the finished future holds (a future a layer
            // between gave up on) is dropped as given up, not as the server's.
            this.state.set(State::Done);
        }
        polled
    }
}
