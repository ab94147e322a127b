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
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request};
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

    /// Joins the exchange an outer layer of the crate opened for this request, or opens one and
    /// puts it into the request's extensions for the layers inside. Returns the exchange and
    /// whether this layer opened it (and so owns the recording).
    pub(crate) fn join<B>(&self, request: &mut Request<B>) -> (Arc<Exchange>, bool) {
        if let Some(Scope(exchange)) = request.extensions().get::<Scope>() {
            return (exchange.clone(), false);
        }
        let span = if self.current_span {
            Span::current()
        } else {
            trace::make_span(request)
        };
        // The event names the request itself only when the span that would is off.
        let request_details = (span.is_disabled()
            && tracing::level_filters::LevelFilter::current() >= self.level)
            .then(|| trace::RequestDetails::of(request));
        let exchange = Arc::new(Exchange {
            span,
            start: Instant::now(),
            method: request.method().clone(),
            request_details,
            recorder: self.clone(),
            finished: AtomicBool::new(false),
            timeout_ms: AtomicU64::new(u64::MAX),
        });
        request.extensions_mut().insert(Scope(exchange.clone()));
        (exchange, true)
    }
}

/// The crate's per-request state, shared by all of the crate's layers on one request.
#[derive(Clone)]
struct Scope(Arc<Exchange>);

/// One request's recording state. The first layer to [`finish`](Exchange::finish) it decides
/// the outcome; every later attempt is ignored, which is what makes "exactly one outcome per
/// request" hold whatever the layer order and however futures and bodies are dropped.
pub(crate) struct Exchange {
    span: Span,
    start: Instant,
    method: Method,
    request_details: Option<trace::RequestDetails>,
    recorder: Recorder,
    finished: AtomicBool,
    /// The smallest time limit any layer applies to the request, in ms.
    timeout_ms: AtomicU64,
}

impl fmt::Debug for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exchange")
            .field("span", &self.span)
            .field("start", &self.start)
            .field("method", &self.method)
            .field("finished", &self.is_finished())
            .finish()
    }
}

impl Exchange {
    pub(crate) fn span(&self) -> &Span {
        &self.span
    }

    /// Records a time limit a layer applies; the span shows the smallest, the one that binds.
    pub(crate) fn record_timeout(&self, timeout: Duration) {
        let ms = trace::duration_ms(timeout);
        if ms < self.timeout_ms.fetch_min(ms, Ordering::AcqRel) {
            self.span.record(trace::TIMEOUT_MS, ms);
        }
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    /// Records `outcome` if no outcome was recorded yet; returns whether it was.
    pub(crate) fn finish(&self, outcome: Outcome) -> bool {
        if self.finished.swap(true, Ordering::AcqRel) {
            return false;
        }
        let elapsed = self.start.elapsed();
        trace::record_outcome(
            &self.span,
            self.recorder.level,
            &outcome,
            trace::duration_ms(elapsed),
            self.request_details.as_ref(),
        );
        if let Some(hook) = &self.recorder.hook {
            let report = Report {
                outcome: &outcome,
                method: &self.method,
                elapsed,
            };
            if catch_unwind(AssertUnwindSafe(|| hook.on_outcome(&report))).is_err() {
                tracing::error!(parent: &self.span, "tower-timeouts: the on_outcome hook panicked");
            }
        }
        true
    }
}

/// A layer's share in a request's exchange, for the layers whose part ends with the response
/// head ([`ResponseTimeout`](crate::ResponseTimeout),
/// [`UpstreamFailure`](crate::UpstreamFailure)). The owner records a normal head or an error
/// itself, and a future dropped before either as [`Outcome::Dropped`].
#[derive(Debug)]
pub(crate) struct Share {
    exchange: Arc<Exchange>,
    owner: bool,
}

impl Share {
    pub(crate) fn join<B>(recorder: &Recorder, request: &mut Request<B>) -> Self {
        let (exchange, owner) = recorder.join(request);
        Share { exchange, owner }
    }

    pub(crate) fn exchange(&self) -> &Exchange {
        &self.exchange
    }

    /// Enters the span while the owner polls, so that the inner service's events are in it.
    pub(crate) fn enter(&self) -> Option<tracing::span::Entered<'_>> {
        self.owner.then(|| self.exchange.span.enter())
    }

    /// Polls `inner`, recording a panic as the outcome.
    pub(crate) fn poll<F: std::future::Future>(
        &self,
        inner: std::pin::Pin<&mut F>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let guard = PanicGuard::new(&self.exchange, Outcome::panicked(Phase::BeforeHead, None));
        let polled = inner.poll(cx);
        guard.disarm();
        polled
    }

    /// The inner service produced a head (or an error): the owner records it.
    pub(crate) fn head<B, E>(&self, result: &Result<http::Response<B>, E>) {
        if self.owner {
            self.exchange.finish(match result {
                Ok(response) => head_outcome(response),
                Err(_) => Outcome::failed(Phase::BeforeHead, None),
            });
        }
    }
}

/// The outcome of a response head: the one a [`Generated`] marker names (a response of ours
/// that crossed into another request's exchange, as in a gateway that builds a new request),
/// or a completion.
pub(crate) fn head_outcome<B>(response: &http::Response<B>) -> Outcome {
    match response.extensions().get::<Generated>() {
        Some(generated) => generated.outcome().clone(),
        None => Outcome::completed(response.status()),
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        if self.owner {
            self.exchange.finish(Outcome::dropped());
        }
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

/// Marks a poll of wrapped code: if that code panics, the guard records the panic as the
/// outcome while the stack unwinds.
pub(crate) struct PanicGuard<'a> {
    exchange: &'a Exchange,
    outcome: Option<Outcome>,
}

impl<'a> PanicGuard<'a> {
    pub(crate) fn new(exchange: &'a Exchange, if_panicking: Outcome) -> Self {
        PanicGuard {
            exchange,
            outcome: Some(if_panicking),
        }
    }

    pub(crate) fn disarm(mut self) {
        self.outcome = None;
    }
}

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        if let Some(outcome) = self.outcome.take() {
            self.exchange.finish(outcome);
        }
    }
}
