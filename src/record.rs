//! Recording outcomes: the per-request exchange that makes "exactly one outcome" hold, and the
//! hook that metrics code plugs into.
//!
//! # Example
//!
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tower_timeouts::{Outcome, Report, ResponseTimeoutLayer};
//!
//! let timeouts = Arc::new(AtomicU64::new(0));
//! let counter = timeouts.clone();
//! let layer = ResponseTimeoutLayer::new(Duration::from_secs(5)).on_outcome(move |report: &Report<'_>| {
//!     if let Outcome::ResponseTimeout { .. } = report.outcome() {
//!         counter.fetch_add(1, Ordering::Relaxed);
//!     }
//! });
//! # let _ = layer;
//! ```

use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Method, Request, StatusCode};
use tokio::time::Instant;
use tracing::{Level, Span};

use crate::outcome::{Outcome, Phase};
use crate::response::Generated;
use crate::trace;

/// What the [`on_outcome`](crate::ClientDisconnectLayer::on_outcome) hook is told when a
/// request ends.
#[derive(Debug)]
pub struct Report<'a> {
    outcome: &'a Outcome,
    method: &'a Method,
    elapsed: Duration,
}

impl<'a> Report<'a> {
    /// How the request ended.
    pub fn outcome(&self) -> &'a Outcome {
        self.outcome
    }

    /// The request's method.
    pub fn method(&self) -> &'a Method {
        self.method
    }

    /// The time from the outermost layer's `call` to the outcome: to the end of the body (or
    /// the client leaving) under a [`ClientDisconnectLayer`](crate::ClientDisconnectLayer), to
    /// the response head otherwise.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }
}

/// A hook called exactly once per request, when it ends, for metrics and logs.
///
/// Implemented for every `Fn(&Report<'_>) + Send + Sync + 'static` closure and, as a no-op, for
/// `()`. A hook that panics is caught: the panic is reported as an ERROR event and the request
/// and connection go on unharmed. (The one exception is Rust's own rule: a hook that panics
/// while the inner service's panic unwinds, when that panic is the outcome, aborts the process.)
pub trait OnOutcome: Send + Sync + 'static {
    /// Called once, when the request ends.
    fn on_outcome(&self, report: &Report<'_>);
}

impl<F> OnOutcome for F
where
    F: Fn(&Report<'_>) + Send + Sync + 'static,
{
    fn on_outcome(&self, report: &Report<'_>) {
        self(report)
    }
}

impl OnOutcome for () {
    fn on_outcome(&self, _: &Report<'_>) {}
}

/// How the owning layer records: the hook, the event level, where the span comes from.
#[derive(Clone)]
pub(crate) struct Recorder {
    hook: Option<Arc<dyn OnOutcome>>,
    level: Level,
    current_span: bool,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            hook: None,
            level: Level::WARN,
            current_span: false,
        }
    }
}

impl fmt::Debug for Recorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorder")
            .field("hook", &self.hook.as_ref().map(|_| ".."))
            .field("level", &self.level)
            .field("current_span", &self.current_span)
            .finish()
    }
}

impl Recorder {
    pub(crate) fn on_outcome(mut self, hook: impl OnOutcome) -> Self {
        self.hook = Some(Arc::new(hook));
        self
    }

    pub(crate) fn event_level(mut self, level: Level) -> Self {
        self.level = level;
        self
    }

    pub(crate) fn record_in_current_span(mut self) -> Self {
        self.current_span = true;
        self
    }

    /// Starts this layer's call of the inner service: as a layer that joins the exchange an
    /// outer layer of the crate opened for this request (when that layer is calling in, on this
    /// thread), or as the owner of a new one. `timeout` is the limit this layer applies, for
    /// the span.
    #[inline(always)]
    pub(crate) fn start<B>(&self, request: &Request<B>, timeout: Option<Duration>) -> Call {
        match context::join(timeout) {
            context::Role::Joined => Call {
                exchange: Exchange::joined(),
                calling: None,
                entered: None,
                timeout,
            },
            context::Role::Owner { nested } => {
                let exchange = Exchange::open(self, request, nested);
                Call {
                    calling: Some(context::Calling::enter()),
                    entered: exchange.span().map(|span| span.clone().entered()),
                    exchange,
                    timeout,
                }
            }
        }
    }
}

/// A layer's call of its inner service, under way: made by [`Recorder::start`] before the
/// call, made into the layer's [`Share`] by [`Call::end`] after it. While it lasts, the
/// request's span (if this layer opened one) is entered, and the crate's layers inside join
/// the exchange of this one; dropped by a panic of the call, it restores the thread's state.
///
/// A guard rather than a function taking the call as a closure: that way the inner future is
/// written where it will stay, not moved out of the closure's frame (a copy of the whole
/// future, for every request). It owns what it entered, so that the call site holds no borrow
/// of it across the call, which costs the ready path a few more copies.
pub(crate) struct Call {
    exchange: Exchange,
    /// The owner's mark on the thread; `None` for a layer that joined.
    calling: Option<context::Calling>,
    /// The request's span, entered for the call, if this layer opened one.
    entered: Option<tracing::span::EnteredSpan>,
    timeout: Option<Duration>,
}

impl Call {
    /// The call returned: this layer's share in the request's exchange.
    #[inline(always)]
    pub(crate) fn end(self) -> Share {
        let Call {
            exchange,
            calling,
            entered,
            timeout,
        } = self;
        drop(entered);
        if let Some(calling) = calling {
            let joined_ms = calling.leave();
            if let Some(watchers) = &exchange.watchers {
                let own_ms = timeout.map_or(u64::MAX, trace::duration_ms);
                let ms = own_ms.min(joined_ms);
                if ms != u64::MAX && !watchers.span.is_disabled() {
                    watchers.span.record(trace::TIMEOUT_MS, ms);
                }
            }
        }
        Share(exchange)
    }
}

/// One request's recording state, owned by the outermost of the crate's layers on the request
/// (in its response future, then, for a [`ClientDisconnect`](crate::ClientDisconnect), in its
/// body). The first [`finish`](Exchange::finish) decides the outcome; every later one is
/// ignored, which is what makes "exactly one outcome per request" hold whatever the layer
/// order and however futures and bodies are dropped.
pub(crate) struct Exchange {
    /// What is needed to show the outcome, made only when someone will see it: with no
    /// subscriber interested, no hook and no event enabled, the exchange is a flag.
    watchers: Option<Box<Watchers>>,
    /// `OPEN`, `FINISHED`, or `JOINED` in the share of a layer that joined another's exchange.
    // An atomic (not a cell) only so that futures and bodies stay `Sync`; there is one owner.
    state: AtomicU8,
}

struct Watchers {
    span: Span,
    start: Instant,
    hook: Option<(Arc<dyn OnOutcome>, Method)>,
    /// The request, for an event whose span is off.
    details: Option<Box<trace::RequestDetails>>,
    /// The outcome event's level; `None` when no event could be seen.
    level: Option<Level>,
}

impl fmt::Debug for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let watchers = self.watchers.as_deref();
        f.debug_struct("Exchange")
            .field("span", &watchers.map(|w| &w.span))
            .field("start", &watchers.map(|w| w.start))
            .field("finished", &self.is_finished())
            .finish_non_exhaustive()
    }
}

impl Exchange {
    /// Opens the exchange of a request; `nested` when it is made while another request's
    /// exchange polls (a gateway's call upstream): that one has the span and the event, and
    /// this one records into neither.
    #[inline]
    fn open<B>(recorder: &Recorder, request: &Request<B>, nested: bool) -> Self {
        // Whether an outcome event could be seen (the cheap, global check).
        let level = (!nested && tracing::level_filters::LevelFilter::current() >= recorder.level)
            .then_some(recorder.level);
        // No event, no hook, and no span that anyone could see (see `Watchers::new`).
        let unseen = level.is_none()
            && recorder.hook.is_none()
            && (nested || !tracing::dispatcher::has_been_set());
        Exchange {
            watchers: if unseen {
                None
            } else {
                Watchers::new(recorder, request, nested, level)
            },
            state: AtomicU8::new(OPEN),
        }
    }

    /// The share of a layer that joined another's exchange: records nothing.
    #[inline]
    fn joined() -> Self {
        Exchange {
            watchers: None,
            state: AtomicU8::new(JOINED),
        }
    }

    #[inline]
    pub(crate) fn is_finished(&self) -> bool {
        self.state.load(Ordering::Relaxed) == FINISHED
    }

    /// Records `outcome` if no outcome was recorded yet; returns whether it was.
    #[inline]
    pub(crate) fn finish(&self, outcome: Outcome) -> bool {
        if self.state.load(Ordering::Relaxed) != OPEN {
            return false;
        }
        self.state.store(FINISHED, Ordering::Relaxed);
        if let Some(watchers) = &self.watchers {
            watchers.record(&outcome);
        }
        true
    }

    #[inline]
    fn span(&self) -> Option<&Span> {
        self.watchers.as_ref().map(|watchers| &watchers.span)
    }

    /// Polls `inner` in the span, recording a panic as the outcome, and the outcome a layer
    /// inside decided.
    #[inline(always)]
    fn poll<F: Future>(&self, inner: Pin<&mut F>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Written out rather than as `guarded` around `inside`: the closures would each move
        // the output (a whole response) once more.
        let _entered = self.span().map(Span::enter);
        let panic_guard = PanicGuard {
            exchange: self,
            phase: Phase::BeforeHead,
            sent_status: None,
        };
        let polling = context::Polling::enter(self.is_finished());
        let output = inner.poll(cx);
        if let Some(outcome) = polling.leave() {
            self.finish(outcome);
        }
        std::mem::forget(panic_guard);
        output
    }

    /// Runs `f` (a poll of wrapped code), recording a panic in it as the outcome.
    #[inline(always)]
    pub(crate) fn guarded<T>(
        &self,
        phase: Phase,
        sent_status: Option<StatusCode>,
        f: impl FnOnce() -> T,
    ) -> T {
        let guard = PanicGuard {
            exchange: self,
            phase,
            sent_status,
        };
        let output = f();
        // Not panicking: nothing to record.
        std::mem::forget(guard);
        output
    }

    /// Runs `f` (a poll or a drop of the inner future), and records the outcome a layer
    /// inside decided, if one did.
    #[inline(always)]
    fn inside<T>(&self, f: impl FnOnce() -> T) -> T {
        let polling = context::Polling::enter(self.is_finished());
        let output = f();
        if let Some(outcome) = polling.leave() {
            self.finish(outcome);
        }
        output
    }
}

impl Watchers {
    /// What is needed to show the outcome, if anyone can see it.
    #[inline(never)]
    fn new<B>(
        recorder: &Recorder,
        request: &Request<B>,
        nested: bool,
        level: Option<Level>,
    ) -> Option<Box<Self>> {
        // With no subscriber ever set, no span is made: tracing would otherwise hand each one
        // to its `log` fallback (when its `log` feature is on, as axum's default features turn
        // it on), at the cost of building all its fields for nothing.
        let span = if nested || !tracing::dispatcher::has_been_set() {
            Span::none()
        } else if recorder.current_span {
            Span::current()
        } else {
            trace::make_span(request)
        };
        (level.is_some() || recorder.hook.is_some() || !span.is_disabled()).then(|| {
            Box::new(Watchers {
                start: Instant::now(),
                hook: recorder
                    .hook
                    .as_ref()
                    .map(|hook| (hook.clone(), request.method().clone())),
                // The event names the request itself only when the span that would is off.
                details: (level.is_some() && span.is_disabled())
                    .then(|| Box::new(trace::RequestDetails::of(request))),
                level,
                span,
            })
        })
    }

    fn record(&self, outcome: &Outcome) {
        let elapsed = self.start.elapsed();
        trace::record_outcome(
            &self.span,
            self.level,
            outcome,
            trace::duration_ms(elapsed),
            self.details.as_deref(),
        );
        if let Some((hook, method)) = &self.hook {
            let report = Report {
                outcome,
                method,
                elapsed,
            };
            if catch_unwind(AssertUnwindSafe(|| hook.on_outcome(&report))).is_err() {
                tracing::error!(parent: &self.span, "tower-timeouts: the on_outcome hook panicked");
            }
        }
    }
}

const OPEN: u8 = 0;
const FINISHED: u8 = 1;
const JOINED: u8 = 2;

/// A layer's share in a request's exchange: the exchange itself for the owner (the outermost
/// of the crate's layers), an empty one that records nothing for a layer that joined it.
#[derive(Debug)]
pub(crate) struct Share(Exchange);

impl Share {
    #[inline]
    fn owner(&self) -> Option<&Exchange> {
        (self.0.state.load(Ordering::Relaxed) != JOINED).then_some(&self.0)
    }

    /// Polls `inner`; as the owner, in the span and recording a panic as the outcome.
    #[inline(always)]
    pub(crate) fn poll<F: Future>(
        &self,
        inner: Pin<&mut F>,
        cx: &mut Context<'_>,
    ) -> Poll<F::Output> {
        match self.owner() {
            Some(exchange) => exchange.poll(inner, cx),
            None => inner.poll(cx),
        }
    }

    /// Drops the inner future with `drop`, so that the layers inside that joined find this
    /// request's outcome (or their own decision recorded).
    #[inline(always)]
    pub(crate) fn drop_inner(&self, drop: impl FnOnce()) {
        match self.owner() {
            Some(exchange) => {
                let _entered = exchange.span().map(Span::enter);
                exchange.inside(drop);
            }
            None => drop(),
        }
    }

    /// Records an outcome this layer decided (a timeout, an upstream failure, a client gone),
    /// before it drops the inner future; returns whether it is the request's outcome.
    #[inline]
    pub(crate) fn decide(&self, outcome: Outcome) -> bool {
        match self.owner() {
            Some(exchange) => exchange.finish(outcome),
            None => context::report(outcome),
        }
    }

    /// The inner service produced a head (or an error): the owner records it.
    #[inline(always)]
    pub(crate) fn head<B, E>(&self, result: &Result<http::Response<B>, E>) {
        if let Some(exchange) = self.owner() {
            exchange.finish(match result {
                Ok(response) => head_outcome(response),
                Err(_) => Outcome::failed(Phase::BeforeHead, None),
            });
        }
    }

    /// The future is dropped: an owner that recorded nothing yet records
    /// [`Outcome::Dropped`].
    #[inline(always)]
    pub(crate) fn dropped(&self) {
        if let Some(exchange) = self.owner() {
            exchange.finish(Outcome::dropped());
        }
    }

    /// The exchange, for the owner to hand on (to the response body).
    #[inline]
    pub(crate) fn take_exchange(&mut self) -> Option<Exchange> {
        self.owner()?;
        Some(std::mem::replace(&mut self.0, Exchange::joined()))
    }
}

/// The outcome of a response head: the one a [`Generated`] marker names (a response of ours
/// that crossed into another request's exchange, as in a gateway that builds a new request),
/// or a completion.
#[inline]
pub(crate) fn head_outcome<B>(response: &http::Response<B>) -> Outcome {
    match response.extensions().get::<Generated>() {
        Some(generated) => generated.outcome().clone(),
        None => Outcome::completed(response.status()),
    }
}

/// The builder methods of every layer that may own a request's recording.
macro_rules! recorder_methods {
    ($($recorder:ident).+) => {
        /// Calls `hook` once per request, when it ends. Used when this is the outermost of the
        /// crate's layers on the request, which records for all.
        pub fn on_outcome(mut self, hook: impl $crate::OnOutcome) -> Self {
            self.$($recorder).+ = self.$($recorder).+.on_outcome(hook);
            self
        }

        /// The level of the event emitted for every outcome but a normal completion (default
        /// WARN).
        pub fn event_level(mut self, level: tracing::Level) -> Self {
            self.$($recorder).+ = self.$($recorder).+.event_level(level);
            self
        }

        /// Records into the span current at `call` instead of opening a `request` span. See
        /// [`trace`](crate::trace).
        pub fn record_in_current_span(mut self) -> Self {
            self.$($recorder).+ = self.$($recorder).+.record_in_current_span();
            self
        }
    };
}
pub(crate) use recorder_methods;

/// Armed around a poll of wrapped code and forgotten after it: dropped, it means that code
/// panicked, and it records the panic as the outcome while the stack unwinds.
struct PanicGuard<'a> {
    exchange: &'a Exchange,
    phase: Phase,
    sent_status: Option<StatusCode>,
}

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        self.exchange
            .finish(Outcome::panicked(self.phase, self.sent_status));
    }
}

/// How the crate's layers on one request find each other without allocating: while the owner
/// calls the inner service, a thread-local says so, and the layers inside join instead of
/// opening an exchange of their own; while the owner polls (or drops) the inner future, the
/// outcome a layer inside decides is left in a thread-local for the owner to record.
///
/// Only the owner's synchronous `call` makes joiners: a request a handler makes later (a
/// gateway's call upstream, made while the owner polls) gets an exchange of its own.
mod context {
    use std::cell::Cell;
    use std::time::Duration;

    use crate::outcome::Outcome;
    use crate::trace;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Stage {
        Idle,
        /// An owner is calling the inner service.
        Calling,
        /// An owner is polling or dropping the inner future, its outcome not yet recorded.
        Open,
        /// The same, with the owner's outcome recorded already.
        Closed,
    }

    struct State {
        stage: Cell<Stage>,
        timeout_ms: Cell<u64>,
        outcome: Cell<Option<Outcome>>,
    }

    thread_local! {
        static STATE: State = const {
            State {
                stage: Cell::new(Stage::Idle),
                timeout_ms: Cell::new(u64::MAX),
                outcome: Cell::new(None),
            }
        };
    }

    /// What a layer's `call` is to the request.
    pub(super) enum Role {
        /// An outer layer of the crate owns the request and is calling in on this thread.
        Joined,
        /// The outermost of the crate's layers on this request; `nested` when another
        /// request's owner is polling on this thread (a gateway calling upstream).
        Owner { nested: bool },
    }

    /// Joins the exchange of the owner calling in on this thread, if one is, with the joining
    /// layer's limit.
    #[inline]
    pub(super) fn join(timeout: Option<Duration>) -> Role {
        STATE.with(|state| match state.stage.get() {
            Stage::Calling => {
                if let Some(timeout) = timeout {
                    let ms = trace::duration_ms(timeout);
                    state.timeout_ms.set(state.timeout_ms.get().min(ms));
                }
                Role::Joined
            }
            Stage::Open | Stage::Closed => Role::Owner { nested: true },
            Stage::Idle => Role::Owner { nested: false },
        })
    }

    /// Reports the outcome a joined layer decided; returns whether it is the request's.
    #[inline]
    pub(super) fn report(outcome: Outcome) -> bool {
        STATE.with(|state| {
            if state.stage.get() != Stage::Open {
                return false;
            }
            match state.outcome.take() {
                Some(earlier) => {
                    state.outcome.set(Some(earlier));
                    false
                }
                None => {
                    state.outcome.set(Some(outcome));
                    true
                }
            }
        })
    }

    /// The owner calling in. Restores what was there before when it is dropped, even by a
    /// panic.
    pub(super) struct Calling {
        stage: Stage,
        timeout_ms: u64,
    }

    impl Calling {
        #[inline]
        pub(super) fn enter() -> Self {
            STATE.with(|state| Calling {
                stage: state.stage.replace(Stage::Calling),
                timeout_ms: state.timeout_ms.replace(u64::MAX),
            })
        }

        /// The smallest limit the layers that joined apply, in ms (`u64::MAX` for none).
        #[inline]
        pub(super) fn leave(self) -> u64 {
            STATE.with(|state| state.timeout_ms.get())
        }
    }

    impl Drop for Calling {
        fn drop(&mut self) {
            STATE.with(|state| {
                state.stage.set(self.stage);
                state.timeout_ms.set(self.timeout_ms);
            });
        }
    }

    /// The owner polling or dropping the inner future. Restores what was there before when it
    /// is dropped, even by a panic.
    pub(super) struct Polling {
        stage: Stage,
        outcome: Option<Outcome>,
    }

    impl Polling {
        #[inline(always)]
        pub(super) fn enter(finished: bool) -> Self {
            let stage = if finished { Stage::Closed } else { Stage::Open };
            STATE.with(|state| Polling {
                stage: state.stage.replace(stage),
                outcome: state.outcome.take(),
            })
        }

        /// The outcome a layer inside decided, if one did.
        #[inline(always)]
        pub(super) fn leave(mut self) -> Option<Outcome> {
            let earlier = self.outcome.take();
            let stage = self.stage;
            // Nothing left for `drop` to restore.
            std::mem::forget(self);
            STATE.with(|state| {
                state.stage.set(stage);
                state.outcome.replace(earlier)
            })
        }
    }

    impl Drop for Polling {
        fn drop(&mut self) {
            STATE.with(|state| {
                state.stage.set(self.stage);
                state.outcome.set(self.outcome.take());
            });
        }
    }
}
