//! One request's exchange: the recording state that every crate layer on the request reaches
//! through the request itself.
//!
//! The outermost of the crate's layers to get a request opens the exchange and puts a handle
//! to it (a [`Weak`] pointer) into the request's extensions. Every crate layer that gets the
//! request later, wherever and whenever (called lazily from a poll, as axum's `Route`,
//! `from_fn` and nested routers do; again, as a retry does; on another task, as
//! `tower::buffer` does), finds the handle and joins: it adds its hook (if the exchange has
//! none yet), its limit, and whether it watches for clients that leave. Only the layer that
//! opened the exchange records, once, from what passes through it.
//!
//! The handle is weak so that a request kept alive (a handler that forwards the request's
//! extensions to an upstream call it spawns) neither keeps the exchange nor its span open.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use tokio::time::Instant;
use tracing::{Level, Span};

use super::extent::{self, Extent};
use super::stage::Stage;
use super::{OnOutcome, Recorder, Report, RequestInfo};
use crate::grpc::{GrpcCode, GRPC_STATUS};
use crate::outcome::Outcome;
use crate::response::UpstreamPlace;
use crate::trace;

/// Which side of a request a layer serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// A server's request: a client called us.
    Server,
    /// An upstream call: we call another service, for a request a handler serves.
    Client,
}

/// One request's recording state, shared by the crate's layers on the request.
pub(crate) struct Exchange {
    role: Role,
    span: Span,
    start: Instant,
    method: Method,
    /// The outcome event's level; `None` when there is no event (an upstream call's outcome
    /// is its request's, not an event of its own).
    level: Option<Level>,
    /// The request: for a hook, or an event whose span is off.
    request: Option<Box<RequestInfo>>,
    /// The upstream call whose failure is the request's answer, for the event.
    upstream: OnceLock<UpstreamPlace>,
    /// The hook of the outermost layer on the request that has one.
    hook: OnceLock<Arc<dyn OnOutcome>>,
    /// The smallest limit a layer on the request applies, in ms (`u64::MAX` for none).
    limit_ms: AtomicU64,
    /// Whether a layer on the request watches for clients that leave.
    watches_disconnects: AtomicBool,
    /// Whether a layer on the request may end the body with an outcome of its own (a
    /// response-body limit): the body is then followed to its end.
    follows_body: AtomicBool,
    /// Whether the request is gRPC.
    grpc: bool,
    /// The gRPC status the response carried (in its head, or its trailers), when one passed:
    /// `NO_CODE` until then.
    grpc_code: AtomicU16,
    stage: Mutex<Stage>,
}

const NO_CODE: u16 = u16::MAX;

impl fmt::Debug for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exchange")
            .field("role", &self.role)
            .field("span", &self.span)
            .field("start", &self.start)
            .finish_non_exhaustive()
    }
}

/// The handle in a request's extensions.
#[derive(Clone)]
struct Handle(Weak<Exchange>);

/// What a layer brings to a request's exchange.
#[derive(Clone, Debug)]
pub(crate) struct Joining {
    pub(crate) role: Role,
    /// The limit the layer applies to the request.
    pub(crate) limit: Option<Duration>,
    pub(crate) watches_disconnects: bool,
    /// Whether the layer may end the response body with an outcome of its own.
    pub(crate) follows_body: bool,
    /// The deadline the request came with (on a server), or was sent with (an upstream call).
    pub(crate) budget: Option<Budget>,
}

/// A deadline a request carries in a header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Budget {
    /// A valid one.
    Given(Duration),
    /// A malformed one, ignored: the header's value.
    Invalid(HeaderValue),
}

impl Joining {
    /// What a layer with none of the optional parts brings.
    pub(crate) const fn new(role: Role) -> Self {
        Joining {
            role,
            limit: None,
            watches_disconnects: false,
            follows_body: false,
            budget: None,
        }
    }
}

/// Whether anything at all could see a recording: a hook configured anywhere in the process,
/// or a tracing subscriber interested in anything. When nothing could, the layers skip the
/// exchange entirely.
///
/// Both are global on purpose: every layer on a request sees the same answer, so they all
/// open and join an exchange, or none does.
#[inline]
pub(crate) fn nothing_can_see() -> bool {
    !super::HOOKS.load(Ordering::Relaxed)
        && tracing::level_filters::LevelFilter::current()
            == tracing::level_filters::LevelFilter::OFF
}

impl Exchange {
    /// Joins the exchange of `request` if it has one, else opens one; `None` when this layer
    /// does not record (it joined). Only for when something can see a recording.
    #[inline(never)]
    pub(crate) fn start<B>(
        recorder: &Recorder,
        request: &mut Request<B>,
        joining: Joining,
    ) -> Option<Arc<Exchange>> {
        let found = request
            .extensions()
            .get::<Handle>()
            .and_then(|handle| handle.0.upgrade());
        let parent = match found {
            // An upstream call a handler makes with its own request's extensions: an exchange
            // of its own, under that request's span.
            Some(server) if joining.role == Role::Client && server.role == Role::Server => {
                Some(server.span.clone())
            }
            Some(exchange) => {
                exchange.join(recorder, &joining);
                return None;
            }
            None => None,
        };
        // A request that a server-side layer gets while the crate's layers call or poll
        // another one on this thread is a call a handler makes upstream.
        let role = match extent::current() {
            Extent::Calling | Extent::Polling => Role::Client,
            _ => joining.role,
        };
        let exchange = Arc::new(Exchange::open(recorder, request, role, parent, &joining));
        request
            .extensions_mut()
            .insert(Handle(Arc::downgrade(&exchange)));
        Some(exchange)
    }

    #[inline(never)]
    fn open<B>(
        recorder: &Recorder,
        request: &Request<B>,
        role: Role,
        parent: Option<Span>,
        joining: &Joining,
    ) -> Self {
        let level = (role == Role::Server
            && tracing::level_filters::LevelFilter::current() >= recorder.level)
            .then_some(recorder.level);
        let grpc = crate::grpc::is_grpc(request.headers());
        let span = match role {
            // With no subscriber ever set, no span is made: tracing would otherwise hand each
            // one to its `log` fallback (when its `log` feature is on, as axum's default
            // features turn it on), at the cost of building all its fields for nothing.
            _ if !tracing::dispatcher::has_been_set() => Span::none(),
            Role::Server if recorder.current_span => Span::current(),
            Role::Server => trace::make_request_span(request, grpc),
            Role::Client => trace::make_upstream_span(request, parent.as_ref(), grpc),
        };
        let hook = OnceLock::new();
        if let Some(own) = &recorder.hook {
            let _ = hook.set(own.clone());
        }
        trace::record_budget(&span, joining.budget.as_ref());
        Exchange {
            role,
            grpc,
            grpc_code: AtomicU16::new(NO_CODE),
            start: Instant::now(),
            method: request.method().clone(),
            // For a hook (any in the process: a layer inside may bring one), and for an event
            // that names the request itself because the span that would is off.
            request: ((role == Role::Server && super::HOOKS.load(Ordering::Relaxed))
                || (level.is_some() && span.is_disabled()))
            .then(|| Box::new(RequestInfo::of(request))),
            upstream: OnceLock::new(),
            level,
            span,
            hook,
            limit_ms: AtomicU64::new(joining.limit.map_or(u64::MAX, whole_ms)),
            watches_disconnects: AtomicBool::new(joining.watches_disconnects),
            follows_body: AtomicBool::new(joining.follows_body),
            stage: Mutex::new(Stage::Open),
        }
    }

    fn join(&self, recorder: &Recorder, joining: &Joining) {
        trace::record_budget(&self.span, joining.budget.as_ref());
        if let Some(hook) = &recorder.hook {
            // The outermost layer's hook stays; a later one is set only if there was none.
            let _ = self.hook.set(hook.clone());
        }
        if let Some(limit) = joining.limit {
            self.limit_ms.fetch_min(whole_ms(limit), Ordering::Relaxed);
        }
        if joining.watches_disconnects {
            self.watches_disconnects.store(true, Ordering::Relaxed);
        }
        if joining.follows_body {
            self.follows_body.store(true, Ordering::Relaxed);
        }
    }

    /// The exchange of `request`, if a layer opened one.
    pub(crate) fn of<B>(request: &Request<B>) -> Option<Arc<Exchange>> {
        request.extensions().get::<Handle>()?.0.upgrade()
    }

    pub(crate) fn span(&self) -> &Span {
        &self.span
    }

    pub(crate) fn is_head_request(&self) -> bool {
        self.method == Method::HEAD
    }

    pub(crate) fn watches_disconnects(&self) -> bool {
        self.watches_disconnects.load(Ordering::Relaxed)
    }

    /// Moves the recording on with `step`, and records the outcome it yields, if any.
    pub(crate) fn step(&self, step: impl FnOnce(&mut Stage) -> Option<Outcome>) {
        let outcome = {
            let mut stage = self
                .stage
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            step(&mut stage)
        };
        if let Some(outcome) = outcome {
            self.record(&outcome);
        }
    }

    /// The head passed the recording layer: records it, or, when the body `may_follow` and a
    /// layer on the request watches for clients leaving during it or may end it with an outcome
    /// of its own (or the request is gRPC and its status is yet to come, in the trailers), waits
    /// for the end of the body. Returns whether the body is to be followed.
    pub(crate) fn head(&self, outcome: Outcome, headers: &HeaderMap, may_follow: bool) -> bool {
        let status_to_come = self.grpc && !self.grpc_status_in(headers);
        let follow = may_follow
            && (self.watches_disconnects()
                || self.follows_body.load(Ordering::Relaxed)
                || status_to_come);
        self.step(|stage| stage.head(outcome, follow));
        follow
    }

    /// The answer is a failed upstream call's, made at `place`.
    pub(crate) fn failed_upstream(&self, place: UpstreamPlace) {
        let _ = self.upstream.set(place);
    }

    /// Takes the gRPC status in `headers` (a head or trailers), if the request is gRPC and
    /// they carry one; returns whether they did.
    pub(crate) fn grpc_status_in(&self, headers: &HeaderMap) -> bool {
        if !self.grpc {
            return false;
        }
        match headers.get(GRPC_STATUS).and_then(GrpcCode::from_header) {
            Some(code) => {
                self.set_grpc_status(code);
                true
            }
            None => false,
        }
    }

    /// The response carries gRPC status `code`.
    pub(crate) fn set_grpc_status(&self, code: GrpcCode) {
        if self.grpc {
            self.grpc_code
                .store(u16::from(code.as_u8()), Ordering::Relaxed);
        }
    }

    /// The request's gRPC status, for a gRPC request: the one its response carried, or
    /// CANCELLED for a client that left.
    fn grpc_status(&self, outcome: &Outcome) -> Option<GrpcCode> {
        if !self.grpc {
            return None;
        }
        match self.grpc_code.load(Ordering::Relaxed) {
            _ if matches!(outcome, Outcome::ClientDisconnected { .. }) => Some(GrpcCode::CANCELLED),
            NO_CODE => None,
            code => u8::try_from(code).ok().map(GrpcCode::from_u8),
        }
    }

    /// What the recording layer followed was dropped before its end, for `reason`.
    pub(crate) fn dropped(&self, reason: Extent, sent: Option<(StatusCode, u64)>) {
        let watches = self.watches_disconnects();
        self.step(|stage| stage.dropped(reason, watches, sent));
    }

    fn record(&self, outcome: &Outcome) {
        let elapsed = self.start.elapsed();
        let limit_ms = self.limit_ms.load(Ordering::Relaxed);
        let grpc_status = self.grpc_status(outcome);
        let report = Report {
            outcome,
            method: &self.method,
            elapsed,
            grpc_status,
            request: self.request.as_deref(),
            upstream: self.upstream.get(),
        };
        trace::record_outcome(
            &self.span,
            self.role == Role::Client,
            self.level,
            &report,
            (limit_ms != u64::MAX).then_some(limit_ms),
            self.request.as_deref().filter(|_| self.span.is_disabled()),
        );
        if let Some(hook) = self.hook.get() {
            if catch_unwind(AssertUnwindSafe(|| hook.on_outcome(&report))).is_err() {
                tracing::error!(parent: &self.span, "tower-timeouts: the on_outcome hook panicked");
            }
        }
    }
}

/// A limit in whole milliseconds (`u64::MAX` stands for none).
fn whole_ms(limit: Duration) -> u64 {
    u64::try_from(limit.as_millis()).unwrap_or(u64::MAX)
}
