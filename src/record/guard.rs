//! A layer's hold on its inner future: the protocol every crate layer follows around it,
//! written once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Response;
use pin_project_lite::pin_project;
use tracing::span::{Entered, EnteredSpan};

use super::exchange::{self, Exchange, Joining};
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
    /// A share dropped with its exchange still in it never reached a [`Guarded`]: the inner
    /// service's `call` panicked. Recorded as a panic (as a drop, should it ever be dropped
    /// otherwise), unless recorded already.
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
    /// A layer got `request`: it joins the request's exchange, or opens one, when something
    /// can see a recording ([`nothing_can_see`]); call the inner service inside
    /// [`Share::calling`].
    #[inline]
    pub(crate) fn start<B>(&self, request: &mut http::Request<B>, joining: Joining) -> Share {
        if nothing_can_see() {
            return Share::none();
        }
        Share(Exchange::start(self, request, joining))
    }
}

impl Share {
    /// The share of a layer when nothing can see a recording (see [`nothing_can_see`]).
    #[inline(always)]
    pub(crate) const fn none() -> Self {
        Share(None)
    }
}

/// Whether nothing at all could see a recording: then the layers take the path without an
/// exchange, written apart in each layer's `call` so that it takes no reference to the
/// request (which is then handed on, and the inner future written, without a copy).
#[inline(always)]
pub(crate) fn nothing_can_see() -> bool {
    exchange::nothing_can_see()
}

/// Runs `f` (a drop of what a layer wraps) as *abandoned*: a layer gives up on it for a reason
/// of its own, so that no layer inside takes the drop for a client leaving.
#[inline]
pub(crate) fn abandoning<R>(f: impl FnOnce() -> R) -> R {
    dropping_in(Extent::Abandoned, f)
}

/// Runs `f` (a drop of what a layer wraps) in `extent`.
#[inline]
pub(crate) fn dropping_in<R>(extent: Extent, f: impl FnOnce() -> R) -> R {
    let _extent = extent::enter(extent);
    f()
}

/// Runs `f` (a poll of what a layer wraps, away from the layer's own poll: on a task of its
/// own) as the crate's layers poll: a drop within it is not the server's, and a request made
/// within it is an upstream call.
#[inline]
pub(crate) fn polling<R>(f: impl FnOnce() -> R) -> R {
    let _extent = extent::enter(Extent::Polling);
    f()
}

/// While a layer that records calls its inner service: the request's span is entered, and a
/// request that the inner service makes meanwhile is an upstream call. It owns what it entered,
/// so that the call site holds no borrow of the share across the call, and can move the share
/// into the future it builds around the call's.
pub(crate) struct Calling {
    _entered: EnteredSpan,
    _extent: extent::Guard,
}

impl Share {
    /// Enters the call of the inner service (see [`Calling`]); nothing for a layer that does
    /// not record.
    #[inline(always)]
    pub(crate) fn calling(&self) -> Option<Calling> {
        self.0.as_deref().map(|exchange| Calling {
            _entered: exchange.span().clone().entered(),
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

    /// The gRPC status the body ends with in place of an error of the inner body, if it does.
    fn grpc_ending(&self) -> Option<crate::grpc::GrpcCode> {
        None
    }
}

pin_project! {
    /// A layer's hold on its inner future, with the layer's [`Share`]:
    ///
    /// - [`poll`](Guarded::poll) polls the inner future in the `Polling` extent (and, for the
    ///   layer that records, in the request's span); a poll that panics leaves its mark, so
    ///   that the drop that follows knows;
    /// - [`finish`](Guarded::finish) drops the inner future, finished or given up on (its
    ///   limit fired), in the `Abandoned` extent, so that no layer inside takes it for a client
    ///   leaving; and hands over what is left to do: record what the layer returns, or hand
    ///   the exchange to the body;
    /// - dropped with the inner future still running, it drops it in the extent its own drop
    ///   says (the server dropped the request, or a layer gave up on it), then the recording
    ///   layer records that.
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
            let reason = extent::drop_reason(this.polling);
            this.drop_early(reason);
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
            .finish_non_exhaustive()
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

    /// Why, dropped now, this hold would drop its inner future before its end: `None` when it
    /// would not (the future is done); see [`extent::drop_reason`].
    #[inline]
    pub(crate) fn early_drop_reason(&self) -> Option<Extent> {
        matches!(self.state, State::Running { .. }).then(|| extent::drop_reason(self.polling))
    }

    /// Drops the inner future before its end, for `reason`, in that extent, and records the
    /// drop (a panic, when the poll that is unwinding panicked). Nothing once it is done.
    pub(crate) fn drop_early(self: Pin<&mut Self>, reason: Extent) {
        let mut this = self.project();
        if let StateProj::Done = this.state.as_mut().project() {
            return;
        }
        let panicked = *this.polling;
        {
            let _entered = this.share.entered();
            let _extent = extent::enter(reason);
            this.state.set(State::Done);
        }
        if let Some(exchange) = this.share.0.take() {
            if panicked {
                let panicked = Outcome::panicked(Phase::BeforeHead, None);
                exchange.step(|stage| stage.end(panicked));
            } else {
                exchange.dropped(reason, None);
            }
        }
    }

    /// The inner future returned its output, or the layer gives up on it (its limit fired):
    /// it is dropped as *abandoned*, so that no layer inside takes the drop for a client
    /// leaving, and neither does whatever a finished future still holds (a future that a layer
    /// between gave up on). What is left to do with what the layer returns is handed over.
    #[inline(always)]
    pub(crate) fn finish(self: Pin<&mut Self>) -> Finished {
        self.finish_in(Extent::Abandoned)
    }

    /// [`finish`](Self::finish), the inner future dropped in `extent` (*Abandoned*, or
    /// *ShutDown* for a layer that gives up on it because the server shuts down).
    #[inline(always)]
    pub(crate) fn finish_in(self: Pin<&mut Self>, extent: Extent) -> Finished {
        let mut this = self.project();
        {
            let _entered = this.share.entered();
            let _extent = extent::enter(extent);
            this.state.set(State::Done);
        }
        Finished(this.share.0.take())
    }
}

/// What is left to do with what a layer returns, once its inner future is done: the exchange,
/// for the layer that records the request.
#[must_use]
pub(crate) struct Finished(Option<Arc<Exchange>>);

impl Finished {
    /// Whether nothing is left to do for a layer with `gone` (its signal, if it has one).
    #[inline(always)]
    pub(crate) fn is_nothing(&self, gone: Option<&ClientGone>) -> bool {
        self.0.is_none() && gone.is_none()
    }

    /// Records what the layer returns, if this layer records: an error or a response head
    /// (its outcome, see [`head_outcome`]). When a layer on the request watches for clients
    /// that leave, the outcome waits for the end of the body (unless the response is a
    /// generated one), which `gone` (the layer's own signal, with whether the request is a
    /// HEAD) also follows.
    ///
    /// Apart from the path where there is nothing to do ([`is_nothing`](Self::is_nothing)),
    /// which the layer takes itself: the response is written straight where the layer returns
    /// it there, where a call that returns it would have it copied twice.
    #[inline(never)]
    pub(crate) fn respond<B: Followed, E>(
        self,
        mut result: Result<Response<B>, E>,
        gone: Option<(ClientGone, bool)>,
    ) -> Result<Response<B>, E> {
        let owner = self.0;
        let response = match &mut result {
            Ok(response) => response,
            Err(_) => {
                if let Some(exchange) = owner {
                    exchange.step(|stage| stage.end(Outcome::failed(Phase::BeforeHead, None)));
                }
                return result;
            }
        };
        // A generated response is its outcome: its body is not followed, and a client that
        // leaves while it goes out does not change that.
        let generated = response.extensions().get::<Generated>();
        if let (Some(exchange), Some(place)) = (&owner, generated.and_then(Generated::place)) {
            exchange.failed_upstream(place.clone());
        }
        let generated = generated.is_some();
        let owner = owner.filter(|exchange| {
            exchange.head(head_outcome(response), response.headers(), !generated)
        });
        let gone = match gone {
            // The crate answered in the handler's place: its work was given up on.
            Some((gone, _)) if generated => {
                match response
                    .extensions()
                    .get::<Generated>()
                    .map(Generated::outcome)
                {
                    Some(Outcome::ServerShutdown { .. }) => gone.shut_down(),
                    _ => gone.abandon(),
                }
                None
            }
            gone => gone,
        };
        let is_head = match (&owner, &gone) {
            (Some(exchange), _) => exchange.is_head_request(),
            (None, Some((_, is_head))) => *is_head,
            (None, None) => return result,
        };
        if let Some(tail) = Tail::new(
            owner,
            gone.map(|(gone, _)| gone),
            response.status(),
            response.headers(),
            response.body(),
            is_head,
        ) {
            let tail = tail.ending(response.body().grpc_ending());
            response.body_mut().follow(tail);
        }
        result
    }
}

impl<F: Future> Guarded<F> {
    /// Polls the inner future. Once it is ready, the caller calls [`finish`](Self::finish).
    ///
    /// Panics if polled after the inner future finished or was abandoned.
    #[inline(always)]
    pub(crate) fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let StateProj::Running { inner } = this.state.project() else {
            panic!("a tower-timeouts response future was polled after it completed");
        };
        let _entered = this.share.entered();
        let _extent = extent::enter(Extent::Polling);
        let _polling = Polling::enter(this.polling);
        // The tail, so that the output is written where the caller wants it.
        inner.poll(cx)
    }
}

/// Marks the inner future as being polled, until dropped; left marked when the drop is the
/// unwinding of a panic in the poll (the guard's drop knows by that).
struct Polling<'a>(&'a mut bool);

impl<'a> Polling<'a> {
    #[inline(always)]
    fn enter(polling: &'a mut bool) -> Self {
        *polling = true;
        Polling(polling)
    }
}

impl Drop for Polling<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        if !std::thread::panicking() {
            *self.0 = false;
        }
    }
}
