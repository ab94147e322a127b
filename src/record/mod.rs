//! Recording outcomes: how the crate's layers on one request agree on its one outcome, and the
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
//!
//! # The protocol
//!
//! Every request gets exactly one outcome, recorded once, by one layer: the outermost of the
//! crate's layers on the request. It records from what passes through it: a response with a
//! [`Generated`](crate::Generated) marker is that marker's outcome (with the status it passes
//! with), any other response a completion with its status. So a retry's 200 is a completion,
//! whatever the first attempt's timeout said, and a generated 504 that a layer rewrote to 503
//! is recorded with 503.
//!
//! The layers on a request meet through the request itself (see `exchange.rs`): the first one
//! to get it opens an *exchange* and puts a handle into its extensions; every later one,
//! wherever and whenever it is called, joins with its hook, its limit and whether it watches
//! for clients that leave. Nothing else passes between them; in particular no layer but the
//! recording one decides anything about the outcome.
//!
//! Each layer holds its inner future in a `Guarded` (`guard.rs`), which is the protocol
//! around the inner future, written once:
//!
//! 1. `call`: `Recorder::start` joins or opens the exchange; the recording layer calls the
//!    inner service inside `Share::calling` (its span entered).
//! 2. `poll`: the inner future is polled in the *Polling* extent (`extent.rs`).
//! 3. `finish`: the inner future returned, or the layer gives up on it (its limit fired, and
//!    it answers with a generated response): it is dropped in the *Abandoned* extent.
//! 4. `Finished::respond`: what the layer returns passes through it; the recording layer
//!    records it, or, when a layer on the request watches for clients that leave, hands the
//!    exchange to the body's `Tail`, which records at the end of the body.
//! 5. `drop` with the inner future still there: the drop's extent says why. Outside all of the
//!    crate's layers (the server dropped the request) it is *ServerDropped*: a client that left,
//!    for every layer inside; while a crate layer polls or abandons, *Abandoned*; while a
//!    [`ShutdownLayer`](crate::ShutdownLayer) whose grace ran out drops what it wraps,
//!    *ShutDown* (the server's, never a client's). The inner future is dropped in that extent,
//!    then the recording layer records the drop (`Stage::dropped`).
//!
//! A `ClientDisconnect` fires its [`ClientGone`](crate::ClientGone) only when its future or its
//! body is dropped early in the *ServerDropped* extent. A timeout of the crate, inside or
//! outside it, abandons what it wraps, so a timeout never fires the signal, in any placement.
//! Dropped early in the *Abandoned* extent, or answered by a generated response, it cancels the
//! signal with [`Cancelled::Abandoned`](crate::signal::Cancelled::Abandoned) instead (in the
//! *ShutDown* extent, or answered by a shutdown's 503, with
//! [`Cancelled::ServerShutdown`](crate::signal::Cancelled::ServerShutdown)), which only
//! [`ClientGone::cancelled`](crate::ClientGone::cancelled) reports.
//!
//! The extents are a thread-local, and that is exact: a drop runs to its end on the thread
//! that began it, and every future inside is dropped within it, so a value set for the
//! duration of the drop reaches exactly the drops it causes. A handle carried through the
//! exchange would give the same answers, and would need the exchange on every path.
//!
//! The recording itself (`stage.rs`) is a small state machine: open, then (when the body is
//! followed) the body, then done; only the step into *done* yields an outcome, so nothing is
//! recorded twice.
//!
//! # When nothing can see a recording
//!
//! Before any hook is configured in the process and while no tracing subscriber is interested
//! in anything, no layer opens or joins an exchange: there is nothing to record into, and each
//! layer acts alone (its timeout, its signal), which the extents alone keep right. That is the
//! path with no allocation of the crate's own (but for a gRPC request, whose `content-type` a
//! `ResponseTimeout` keeps to answer it, and whose caller's deadline goes into its
//! extensions).
//!
//! # What tower's model makes impossible
//!
//! - A layer is on a request from its `call`. A client that leaves while a layer between the
//!   crate's layers (a `ConcurrencyLimit`, a `Buffer` that is full) holds the request in
//!   `poll_ready`, before the inner layer's `call`, is recorded by the outer layers only: as
//!   `dropped` if the only `ClientDisconnectLayer` is the inner one. That time is not counted
//!   by the inner layers either.
//! - A drop caused by something outside the outermost of the crate's layers (a
//!   `tower_http::timeout` layer around them, a load shedder) looks like the server dropping the
//!   request. Put the crate's layers outside the layers that drop what they wrap.
//! - A layer between that drops the inner future when the crate's layers are not polling (it
//!   moved the future to a task of its own) is taken for the server.
//! - A layer between that replaces the response body while it is sent drops the inner body
//!   outside any of the crate's extents: taken for the server.
//! - A request whose extensions a layer between does not carry over (a retry policy that
//!   builds a new request without them) is a new request to the layers inside it: as it is
//!   made while the crate's layers poll, an upstream call.

mod exchange;
mod extent;
mod guard;
mod stage;
mod tail;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Method;

use crate::grpc::GrpcCode;
use crate::outcome::Outcome;
use tracing::Level;

pub(crate) use self::exchange::{Budget, Exchange, Joining, Role};
pub(crate) use self::extent::Extent;
pub(crate) use self::guard::{
    abandoning, dropping_in, nothing_can_see, polling, Followed, Guarded, Share,
};
pub(crate) use self::tail::{poll_followed, Tail};

/// What the [`on_outcome`](crate::ClientDisconnectLayer::on_outcome) hook is told when a
/// request ends.
#[derive(Debug)]
pub struct Report<'a> {
    outcome: &'a Outcome,
    method: &'a Method,
    elapsed: Duration,
    grpc_status: Option<GrpcCode>,
    request: Option<&'a RequestInfo>,
    upstream: Option<&'a crate::response::UpstreamPlace>,
}

/// What a [`Report`] says of a server's request, for access logs and metrics: taken when the
/// request came in, on the requests of a process where a hook is configured.
#[derive(Clone, Debug)]
pub struct RequestInfo {
    method: Method,
    uri: http::Uri,
    version: http::Version,
    user_agent: Option<http::HeaderValue>,
    referer: Option<http::HeaderValue>,
    route: Option<Arc<str>>,
    peer: Option<std::net::SocketAddr>,
}

impl RequestInfo {
    pub(crate) fn of<B>(request: &http::Request<B>) -> Self {
        let headers = request.headers();
        #[cfg(feature = "axum")]
        let (route, peer) = {
            let extensions = request.extensions();
            let route = extensions.get::<axum::extract::MatchedPath>();
            let peer = extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|info| info.0);
            #[cfg(unix)]
            let peer = peer.or_else(|| {
                let info = extensions.get::<axum::extract::ConnectInfo<crate::watch::PeerAddr>>();
                info.map(|info| info.0 .0)
            });
            (route.map(|path| Arc::from(path.as_str())), peer)
        };
        #[cfg(not(feature = "axum"))]
        let (route, peer) = (None, None);
        RequestInfo {
            method: request.method().clone(),
            uri: request.uri().clone(),
            version: request.version(),
            user_agent: headers.get(http::header::USER_AGENT).cloned(),
            referer: headers.get(http::header::REFERER).cloned(),
            route,
            peer,
        }
    }

    /// The request's method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The request's URI, as it came (the path and query for an HTTP/1.1 server).
    pub fn uri(&self) -> &http::Uri {
        &self.uri
    }

    /// The request's HTTP version.
    pub fn version(&self) -> http::Version {
        self.version
    }

    /// The `User-Agent` header.
    pub fn user_agent(&self) -> Option<&http::HeaderValue> {
        self.user_agent.as_ref()
    }

    /// The `Referer` header.
    pub fn referer(&self) -> Option<&http::HeaderValue> {
        self.referer.as_ref()
    }

    /// The route that matched (axum's `MatchedPath`, with the `axum` feature, when the layer
    /// is inside the router: `Router::layer` or `route_layer`): a template such as
    /// `/users/{id}`, never the raw path.
    pub fn route(&self) -> Option<&str> {
        self.route.as_deref()
    }

    /// [`route`](Self::route), shared.
    #[cfg(feature = "metrics")]
    pub(crate) fn shared_route(&self) -> Option<&Arc<str>> {
        self.route.as_ref()
    }

    /// The client's address (axum's `ConnectInfo<SocketAddr>` or
    /// `ConnectInfo<`[`PeerAddr`](crate::watch::PeerAddr)`>`, with the `axum` feature, when the
    /// server was made with `into_make_service_with_connect_info`).
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        self.peer
    }
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
    /// the client leaving) when a [`ClientDisconnectLayer`](crate::ClientDisconnectLayer) is on
    /// the request, or a [`ResponseBodyTimeoutLayer`](crate::ResponseBodyTimeoutLayer) (which
    /// may end the body with an outcome of its own), or the request is gRPC and its status comes
    /// in the trailers; to the response head otherwise.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// For a gRPC request, its gRPC status: the one its response carried (a trailers-only
    /// status the crate generated, or the inner service's, in its head or its trailers), or
    /// `CANCELLED` for a client that left. `None` for any other request, and when no status
    /// passed (the body was not followed to its trailers, a failure before the head).
    pub fn grpc_status(&self) -> Option<GrpcCode> {
        self.grpc_status
    }

    /// What the request was, for a server's request in a process where a hook is configured
    /// (the hook of an upstream call is told nothing of it).
    pub fn request(&self) -> Option<&'a RequestInfo> {
        self.request
    }

    /// For a request answered with a failed upstream call's answer (a 599, a 502, an upstream
    /// 504): the upstream (`host:port`) and the phase, `connecting` or `waiting_for_head`.
    pub fn upstream(&self) -> Option<(&'a str, &'static str)> {
        let place = self.upstream?;
        Some((place.authority.as_str(), place.phase))
    }
}

/// A hook called exactly once per request, when it ends, for metrics and logs. With hooks on
/// several of the crate's layers on one request, the outermost one is called.
///
/// Implemented for every `Fn(&Report<'_>) + Send + Sync + 'static` closure and, as a no-op, for
/// `()`. A hook that panics is caught: the panic is reported as an ERROR event and the request
/// and connection go on unharmed. (The one exception is Rust's own rule: a panic of the inner
/// service is recorded when its future is dropped, and if that drop is part of the panic's own
/// unwinding, as it is when the future lives on the panicking thread's stack, a hook that
/// panics too aborts the process. A server's task is dropped after the unwinding.)
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

/// Both hooks, in order: `(AccessLog::combined(), metrics)`.
impl<A: OnOutcome, B: OnOutcome> OnOutcome for (A, B) {
    fn on_outcome(&self, report: &Report<'_>) {
        self.0.on_outcome(report);
        self.1.on_outcome(report);
    }
}

/// Whether a hook was ever configured in the process (see [the module docs](self#when-nothing-can-see-a-recording)).
static HOOKS: AtomicBool = AtomicBool::new(false);

/// How a layer records: the hook, the event level, where the span comes from. Used by the
/// layer that records a request (the outermost); a layer that joins another's exchange adds
/// only its hook, when the exchange has none.
#[derive(Clone)]
pub(crate) struct Recorder {
    hook: Option<Arc<dyn OnOutcome>>,
    level: Level,
    current_span: bool,
}

impl Recorder {
    pub(crate) const fn new() -> Self {
        Recorder {
            hook: None,
            level: Level::WARN,
            current_span: false,
        }
    }

    pub(crate) fn on_outcome(mut self, hook: impl OnOutcome) -> Self {
        HOOKS.store(true, Ordering::Relaxed);
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
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
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

/// The builder methods of every layer that may record a request.
macro_rules! recorder_methods {
    ($($recorder:ident).+) => {
        /// Calls `hook` once per request, when it ends: this layer's, unless a layer of the
        /// crate outside it on the request has a hook of its own. Also makes every request in
        /// the process take the recording path (see [`record`](crate::record)).
        pub fn on_outcome(mut self, hook: impl $crate::OnOutcome) -> Self {
            self.$($recorder).+ = self.$($recorder).+.on_outcome(hook);
            self
        }

        /// The level of the event emitted for every outcome but a normal completion (default
        /// WARN). Used when this is the outermost of the crate's layers on the request, which
        /// records for all.
        pub fn event_level(mut self, level: tracing::Level) -> Self {
            self.$($recorder).+ = self.$($recorder).+.event_level(level);
            self
        }

        /// Records into the span current at `call` instead of opening a `request` span, when
        /// this is the outermost of the crate's layers on the request. See
        /// [`trace`](crate::trace).
        pub fn record_in_current_span(mut self) -> Self {
            self.$($recorder).+ = self.$($recorder).+.record_in_current_span();
            self
        }
    };
}
pub(crate) use recorder_methods;
