//! Issue 10's contract, checked in every composition it names, over real TCP on loopback: one
//! outcome per client request (one hook call over all hooks, one `request` span with the outcome,
//! at most one outcome event), the outcome the client got, timeouts and disconnects never
//! confused, the binding limit on the span, and upstream calls that are never a second request.
//! The body limits are in the matrix too: a stalled upload answered 408 and a stalled stream
//! cut, each one outcome of its own, in the placements users write, and never a client leaving
//! for the request's `ClientGone` (which is cancelled as abandoned). So is a server's shutdown,
//! the shutdown layer outermost in each placement: a request still running when the grace runs
//! out answered 503 (`Connection: close` on HTTP/1.1), a stream under way cut, each recorded once
//! as `server_shutdown` and its `ClientGone` cancelled for the server's shutdown, never as a
//! client leaving; a request that ends within the grace, or whose client leaves within it, is
//! what it is without a shutdown.
//!
//! A *placement* builds the app the way an axum user writes it, from the crate's layers with a
//! hook on every one of them (all into one [`Outcomes`], so that a second call shows). A
//! *scenario* runs one request against it and checks everything the contract says of it. Every
//! placement runs its scenarios on every server (`common::SERVERS`), over HTTP/1.1 and HTTP/2, all cases of a test
//! at once on one thread (the tracing capture is per thread); a case's spans and events are told
//! apart by the `user-agent` its client sends. A failing test lists every failing case with
//! every broken rule, named `[placement | scenario | server | version]`.
//!
//! Nothing here orders events by sleeping: a client leaves, a shutdown begins or its grace ends,
//! once the handler said it started (a stream: that its frame went out), and the checks wait
//! (within [`SOON`]) for the report and for the handler to be dropped. Only then a short
//! [`GRACE`] gives a wrong second record (a 499 after a 504, a second hook call) the chance to
//! show before the counts are taken; the known ones are synchronous with the first record.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::{from_fn, map_request, map_response, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, CONNECTION, CONTENT_ENCODING, HOST, USER_AGENT};
use http::{HeaderMap, StatusCode, Uri};
use http_body::Frame;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tower::layer::util::{Identity, Stack};
use tower::retry::{Policy, RetryLayer};
use tower::util::BoxCloneSyncService;
use tower::{Layer as _, ServiceBuilder, ServiceExt};
use tower_http::compression::CompressionLayer;
use tower_http::trace::TraceLayer;
use tower_timeouts::response::PROXY_STATUS;
use tower_timeouts::signal::Cancelled;
use tower_timeouts::trace::{
    ERROR_TYPE, HTTP_RESPONSE_STATUS_CODE, OTEL_KIND, OUTCOME, RECORDED_STATUS, TIMEOUT_MS,
    USER_AGENT_ORIGINAL,
};
use tower_timeouts::{
    trace, ClientDisconnectLayer, ClientGone, ConnectTimeoutLayer, Generated, Outcome, Phase,
    ProxyError, RequestBodyTimeoutLayer, ResponseBody, ResponseBodyTimeoutLayer,
    ResponseTimeoutLayer, Shutdown, ShutdownLayer, UpstreamFailureLayer,
};
use tracing::Instrument as _;

use common::{Capture, Captured, Live, Outcomes, Server, SERVERS, SOON};
use tower_timeouts::trace::UPSTREAM_SPAN_NAME as UPSTREAM_SPAN;

/// The limit that fires in a scenario.
const SHORT: Duration = Duration::from_millis(200);
/// A limit that never fires in these tests.
const LONG: Duration = Duration::from_secs(60);
/// The connect limit of the gateway's upstream calls.
const CONNECT_LIMIT: Duration = Duration::from_millis(200);
/// After the expected record: the time a wrong extra record has to show before the counts are
/// taken. Not an ordering: everything the checks need was waited for already.
const GRACE: Duration = Duration::from_millis(150);
/// How often the waits look.
const TICK: Duration = Duration::from_millis(5);

const TIMEOUT_PROXY_STATUS: &str = "tower-timeouts; error=http_response_timeout";
const CONNECT_TIMEOUT_PROXY_STATUS: &str = "tower-timeouts; error=connection_timeout";
const REFUSED_PROXY_STATUS: &str = "tower-timeouts; error=connection_refused";
const REQUEST_BODY_PROXY_STATUS: &str = "tower-timeouts; error=http_request_error; status-code=408";

/// What a stalled upload sends of its body, before it stalls.
const UPLOAD_SENT: &[u8] = b"the first part of an upload that stalls";
/// The body size a stalled upload announces: more than it sends.
const UPLOAD_ANNOUNCED: usize = 1 << 20;
/// The one frame of a stalled stream, before it stalls.
const STREAM_FRAME: &[u8] = b"the first and only frame of a stream that stalls";

// ---------------------------------------------------------------------------------------------
// The handlers, and what they tell the test.

/// The handlers' side: what they saw, and when they started.
#[derive(Clone)]
struct Probe {
    live: Live,
    started: mpsc::UnboundedSender<()>,
    watched: mpsc::UnboundedSender<()>,
    /// Sent when a stream is polled again after its frame: the frame went out through every
    /// layer.
    frame_sent: mpsc::UnboundedSender<()>,
    /// Lets the gated handler answer.
    release: Arc<Notify>,
    /// What `ClientGone::current()` gave each handler call.
    signals: Arc<Mutex<Vec<Option<ClientGone>>>>,
    calls: Arc<AtomicUsize>,
}

/// The test's side of a [`Probe`].
struct Reports {
    started: mpsc::UnboundedReceiver<()>,
    /// One message per `ClientGone` that fired, sent by a task the handler spawned.
    watched: mpsc::UnboundedReceiver<()>,
    frame_sent: mpsc::UnboundedReceiver<()>,
}

impl Probe {
    fn new() -> (Probe, Reports) {
        let (started, started_rx) = mpsc::unbounded_channel();
        let (watched, watched_rx) = mpsc::unbounded_channel();
        let (frame_sent, frame_sent_rx) = mpsc::unbounded_channel();
        let probe = Probe {
            live: Live::new(),
            started,
            watched,
            frame_sent,
            release: Arc::default(),
            signals: Arc::default(),
            calls: Arc::default(),
        };
        let reports = Reports {
            started: started_rx,
            watched: watched_rx,
            frame_sent: frame_sent_rx,
        };
        (probe, reports)
    }

    /// Takes the request's `ClientGone`, if a `ClientDisconnectLayer` gives one, and watches it
    /// from a spawned task, as a handler's background work would.
    fn take_signal(&self) {
        let gone = ClientGone::current();
        if let Some(gone) = gone.clone() {
            let watched = self.watched.clone();
            tokio::spawn(async move {
                gone.gone().await;
                let _ = watched.send(());
            });
        }
        self.signals.lock().unwrap().push(gone);
    }

    fn signals(&self) -> Vec<Option<ClientGone>> {
        self.signals.lock().unwrap().clone()
    }
}

/// Large enough for `CompressionLayer` to compress it.
fn fast_body() -> String {
    "a fast answer, long enough to be worth compressing. ".repeat(40)
}

async fn fast(State(probe): State<Probe>) -> String {
    probe.take_signal();
    fast_body()
}

/// Never answers: live until dropped, and says when it started.
async fn slow(State(probe): State<Probe>) -> String {
    probe.take_signal();
    let _live = probe.live.enter();
    let _ = probe.started.send(());
    std::future::pending::<()>().await;
    unreachable!()
}

/// Answers once the test releases it: live until then, and says when it started.
async fn gated(State(probe): State<Probe>) -> String {
    probe.take_signal();
    let _live = probe.live.enter();
    let _ = probe.started.send(());
    probe.release.notified().await;
    fast_body()
}

/// Slow at its first call, fast after.
async fn flaky(State(probe): State<Probe>) -> String {
    if probe.calls.fetch_add(1, Ordering::SeqCst) == 0 {
        slow(State(probe.clone())).await;
    }
    fast(State(probe)).await
}

/// Reads the request body to its end, live until dropped; a read that fails (a body limit
/// fired) is answered 400 with a body, as axum's extractors answer.
async fn upload(
    State(probe): State<Probe>,
    request: Request,
) -> Result<String, (StatusCode, &'static str)> {
    probe.take_signal();
    let _live = probe.live.enter();
    let body = request.into_body().collect().await;
    let body = body.map_err(|_| (StatusCode::BAD_REQUEST, "Failed to buffer the request body"))?;
    Ok(format!("{} bytes", body.to_bytes().len()))
}

/// Like [`upload`], but a read that fails is answered 400 with no body, as a handler that
/// passes body errors on with `.map_err(|_| StatusCode::BAD_REQUEST)?` does.
async fn upload_empty_answer(
    State(probe): State<Probe>,
    request: Request,
) -> Result<String, StatusCode> {
    probe.take_signal();
    let _live = probe.live.enter();
    let body = request.into_body().collect().await;
    let body = body.map_err(|_| StatusCode::BAD_REQUEST)?;
    Ok(format!("{} bytes", body.to_bytes().len()))
}

/// Answers at once with a stream of one frame that then stalls, live until the stream is
/// dropped; says when it is polled past its frame.
async fn stream(State(probe): State<Probe>) -> Response {
    probe.take_signal();
    let state = (probe.live.enter(), probe.frame_sent.clone(), false);
    let frames = futures_util::stream::unfold(state, |(live, frame_sent, sent)| async move {
        if sent {
            // Polled again: the frame has passed every layer below the server.
            let _ = frame_sent.send(());
            std::future::pending::<()>().await;
        }
        let frame = Ok::<_, Infallible>(Bytes::from_static(STREAM_FRAME));
        Some((frame, (live, frame_sent, true)))
    });
    Response::new(Body::from_stream(frames))
}

fn routes(probe: Probe) -> Router {
    Router::new()
        .route("/fast", get(fast))
        .route("/slow", get(slow))
        .route("/gated", get(gated))
        .route("/flaky", get(flaky))
        .route("/upload", post(upload))
        .route("/upload-empty-answer", post(upload_empty_answer))
        .route("/stream", get(stream))
        .with_state(probe)
}

// ---------------------------------------------------------------------------------------------
// The layers of a case, each with the case's hook.

struct Kit {
    outcomes: Outcomes,
    /// The limit of the only (or inner) `ResponseTimeoutLayer`.
    limit: Duration,
    /// The limit of the outer stack, where the stack is applied twice.
    outer: Duration,
    /// How many times the retry placements retry a 504.
    retries: usize,
    /// The idle limit of the body limits.
    body_idle: Duration,
    /// The case's own shutdown: one-way, so never shared.
    shutdown: Shutdown,
}

type CdRt = ServiceBuilder<Stack<ResponseTimeoutLayer, Stack<ClientDisconnectLayer, Identity>>>;

impl Kit {
    fn cd(&self) -> ClientDisconnectLayer {
        ClientDisconnectLayer::new().on_outcome(self.outcomes.hook())
    }

    fn rt(&self) -> ResponseTimeoutLayer {
        self.rt_of(self.limit)
    }

    fn rt_of(&self, limit: Duration) -> ResponseTimeoutLayer {
        ResponseTimeoutLayer::new(limit).on_outcome(self.outcomes.hook())
    }

    /// The request-body limits: `body_idle` ([`SHORT`] where they fire) without a frame while
    /// the handler waits for one.
    fn rb(&self) -> RequestBodyTimeoutLayer {
        RequestBodyTimeoutLayer::new()
            .idle(self.body_idle)
            .total(LONG)
            .on_outcome(self.outcomes.hook())
    }

    /// The response-body limits: `body_idle` ([`SHORT`] where they fire) without a frame while
    /// the server waits for one.
    fn sb(&self) -> ResponseBodyTimeoutLayer {
        ResponseBodyTimeoutLayer::new()
            .idle(self.body_idle)
            .total(LONG)
            .on_outcome(self.outcomes.hook())
    }

    /// The case's shutdown layer.
    fn sd(&self) -> ShutdownLayer {
        self.shutdown.layer().on_outcome(self.outcomes.hook())
    }

    /// The documented stack: `ClientDisconnectLayer` outside `ResponseTimeoutLayer`.
    fn stack(&self, limit: Duration) -> CdRt {
        ServiceBuilder::new()
            .layer(self.cd())
            .layer(self.rt_of(limit))
    }

    fn retry(&self) -> RetryLayer<RetryTimeouts> {
        RetryLayer::new(RetryTimeouts { left: self.retries })
    }
}

/// Retries a 504, `left` times; clones a body-less request with its extensions.
#[derive(Clone)]
struct RetryTimeouts {
    left: usize,
}

impl<B> Policy<Request, http::Response<B>, Infallible> for RetryTimeouts {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _: &mut Request,
        result: &mut Result<http::Response<B>, Infallible>,
    ) -> Option<Self::Future> {
        let response = match result {
            Ok(response) => response,
            Err(never) => match *never {},
        };
        if response.status() != StatusCode::GATEWAY_TIMEOUT || self.left == 0 {
            return None;
        }
        self.left -= 1;
        Some(std::future::ready(()))
    }

    fn clone_request(&mut self, request: &Request) -> Option<Request> {
        let mut clone = Request::new(Body::empty());
        *clone.method_mut() = request.method().clone();
        *clone.uri_mut() = request.uri().clone();
        *clone.version_mut() = request.version();
        *clone.headers_mut() = request.headers().clone();
        *clone.extensions_mut() = request.extensions().clone();
        Some(clone)
    }
}

async fn pass(request: Request, next: Next) -> Response {
    next.run(request).await
}

async fn same_request(request: Request) -> Request {
    request
}

async fn tag<B>(mut response: http::Response<B>) -> http::Response<B> {
    response
        .headers_mut()
        .insert("x-mapped", http::HeaderValue::from_static("yes"));
    response
}

/// What a user might do to the crate's 504: answer 503 instead.
async fn rewrite_504<B>(mut response: http::Response<B>) -> http::Response<B> {
    let generated = response.extensions().get::<Generated>().is_some();
    if generated && response.status() == StatusCode::GATEWAY_TIMEOUT {
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    response
}

fn trace_layer() -> TraceLayer<
    tower_http::classify::SharedClassifier<tower_http::classify::ServerErrorsAsFailures>,
    fn(&Request) -> tracing::Span,
> {
    TraceLayer::new_for_http().make_span_with(trace::make_span::<Body> as fn(&Request) -> _)
}

// ---------------------------------------------------------------------------------------------
// Placements

/// An app built from the crate's layers, as an axum user writes it.
struct Placement {
    name: &'static str,
    build: fn(&Kit, Router) -> Router,
    /// Where the routes are (nested routers).
    prefix: &'static str,
    /// A `ClientDisconnectLayer` is on the request.
    disconnect: bool,
    /// The stack is applied twice: `Kit::outer` applies too.
    twice: bool,
    /// A `ResponseTimeoutLayer` is on the request: its limit is on the span.
    response_limit: bool,
    /// What the client gets for a timeout.
    timeout_status: StatusCode,
    /// The response is gzip-compressed.
    gzip: bool,
    scenarios: &'static [Scenario],
}

const BASIC: &[Scenario] = &[Scenario::Fast, Scenario::Slow, Scenario::Leaves];
const TWICE: &[Scenario] = &[
    Scenario::Fast,
    Scenario::Slow,
    Scenario::Leaves,
    Scenario::OuterFirst,
];
const RETRY: &[Scenario] = &[
    Scenario::Fast,
    Scenario::Slow,
    Scenario::Leaves,
    Scenario::RetryAnswers,
    Scenario::LeavesDuringRetry,
];

const DEFAULTS: Placement = Placement {
    name: "",
    build: |_, routes| routes,
    prefix: "",
    disconnect: true,
    twice: false,
    response_limit: true,
    timeout_status: StatusCode::GATEWAY_TIMEOUT,
    gzip: false,
    scenarios: BASIC,
};

/// The control: no `ClientDisconnectLayer` on the request.
static TIMEOUT_ALONE: Placement = Placement {
    name: "0 ResponseTimeoutLayer alone",
    build: |kit, routes| routes.layer(kit.rt()),
    disconnect: false,
    ..DEFAULTS
};

static ONE_SERVICE_BUILDER: Placement = Placement {
    name: "1 one ServiceBuilder (CD, RT)",
    build: |kit, routes| routes.layer(kit.stack(kit.limit)),
    ..DEFAULTS
};

static LAYER_CALLS_CD_OUTSIDE: Placement = Placement {
    name: "2 .layer(RT).layer(CD)",
    build: |kit, routes| routes.layer(kit.rt()).layer(kit.cd()),
    ..DEFAULTS
};

static LAYER_CALLS_RT_OUTSIDE: Placement = Placement {
    name: "3 .layer(CD).layer(RT)",
    build: |kit, routes| routes.layer(kit.cd()).layer(kit.rt()),
    ..DEFAULTS
};

/// Hooks on the inner layers only: the outermost layer, which records, has none.
static HOOKS_INSIDE_ONLY: Placement = Placement {
    name: "hooks on the inner layers only",
    build: |kit, routes| {
        routes
            .layer(kit.cd())
            .layer(ResponseTimeoutLayer::new(kit.limit))
            .layer(ResponseTimeoutLayer::new(LONG))
    },
    ..DEFAULTS
};

static ROUTE_LAYER_AND_LAYER: Placement = Placement {
    name: "4 .route_layer(stack).layer(stack)",
    build: |kit, routes| {
        routes
            .route_layer(kit.stack(kit.limit))
            .layer(kit.stack(kit.outer))
    },
    twice: true,
    scenarios: TWICE,
    ..DEFAULTS
};

static NESTED: Placement = Placement {
    name: "5 nested routers, each with the stack",
    build: |kit, routes| {
        Router::new()
            .nest("/api", routes.layer(kit.stack(kit.limit)))
            .layer(kit.stack(kit.outer))
    },
    prefix: "/api",
    twice: true,
    scenarios: TWICE,
    ..DEFAULTS
};

static FROM_FN_BETWEEN: Placement = Placement {
    name: "6a .layer(RT).layer(from_fn).layer(CD)",
    build: |kit, routes| routes.layer(kit.rt()).layer(from_fn(pass)).layer(kit.cd()),
    ..DEFAULTS
};

static MAP_REQUEST_BETWEEN: Placement = Placement {
    name: "6b .layer(RT).layer(map_request).layer(CD)",
    build: |kit, routes| {
        routes
            .layer(kit.rt())
            .layer(map_request(same_request))
            .layer(kit.cd())
    },
    ..DEFAULTS
};

static MAP_RESPONSE_BETWEEN: Placement = Placement {
    name: "6c .layer(RT).layer(map_response).layer(CD)",
    build: |kit, routes| {
        routes
            .layer(kit.rt())
            .layer(map_response(tag::<Body>))
            .layer(kit.cd())
    },
    ..DEFAULTS
};

static MIDDLEWARE_IN_ONE_SERVICE_BUILDER: Placement = Placement {
    name: "6d one ServiceBuilder (CD, from_fn, map_request, map_response, RT)",
    build: |kit, routes| {
        routes.layer(
            ServiceBuilder::new()
                .layer(kit.cd())
                .layer(from_fn(pass))
                .layer(map_request(same_request))
                .layer(map_response(tag::<ResponseBody<Body>>))
                .layer(kit.rt()),
        )
    },
    ..DEFAULTS
};

static FROM_FN_BETWEEN_RT_OUTSIDE: Placement = Placement {
    name: "6e .layer(CD).layer(from_fn).layer(RT)",
    build: |kit, routes| routes.layer(kit.cd()).layer(from_fn(pass)).layer(kit.rt()),
    ..DEFAULTS
};

static MAP_RESPONSE_REWRITES_504: Placement = Placement {
    name: "6f .layer(RT).layer(map_response: 504 -> 503).layer(CD)",
    build: |kit, routes| {
        routes
            .layer(kit.rt())
            .layer(map_response(rewrite_504::<Body>))
            .layer(kit.cd())
    },
    timeout_status: StatusCode::SERVICE_UNAVAILABLE,
    ..DEFAULTS
};

static RETRY_LAYER_CALLS: Placement = Placement {
    name: "7a .layer(RT).layer(RetryLayer).layer(CD)",
    build: |kit, routes| routes.layer(kit.rt()).layer(kit.retry()).layer(kit.cd()),
    scenarios: RETRY,
    ..DEFAULTS
};

static RETRY_ONE_SERVICE_BUILDER: Placement = Placement {
    name: "7b one ServiceBuilder (CD, RetryLayer, RT)",
    build: |kit, routes| {
        routes.layer(
            ServiceBuilder::new()
                .layer(kit.cd())
                .layer(kit.retry())
                .layer(kit.rt()),
        )
    },
    scenarios: RETRY,
    ..DEFAULTS
};

static TRACE_COMPRESSION_ONE_SERVICE_BUILDER: Placement = Placement {
    name: "8a one ServiceBuilder (Trace, Compression, CD.record_in_current_span, RT)",
    build: |kit, routes| {
        routes.layer(
            ServiceBuilder::new()
                .layer(trace_layer())
                .layer(CompressionLayer::new())
                .layer(kit.cd().record_in_current_span())
                .layer(kit.rt()),
        )
    },
    gzip: true,
    ..DEFAULTS
};

static TRACE_COMPRESSION_LAYER_CALLS: Placement = Placement {
    name: "8b .layer(RT).layer(CD.record_in_current_span).layer(Compression).layer(Trace)",
    build: |kit, routes| {
        routes
            .layer(kit.rt())
            .layer(kit.cd().record_in_current_span())
            .layer(CompressionLayer::new())
            .layer(trace_layer())
    },
    gzip: true,
    ..DEFAULTS
};

// The body limits (`RB` the request-body layer, `SB` the response-body layer) with no response
// limit, each where users put a layer: alone, outside or inside a `ClientDisconnectLayer` in
// another `Router::layer` call, in a nested router, with axum's `from_fn` between, under
// tower-http's compression and tracing. Then with every layer of the crate at once.

const UPLOAD: &[Scenario] = &[
    Scenario::Fast,
    Scenario::Leaves,
    Scenario::StalledUpload,
    Scenario::StalledUploadEmptyAnswer,
];
const STREAM: &[Scenario] = &[Scenario::Fast, Scenario::Leaves, Scenario::StalledStream];

const BODY_DEFAULTS: Placement = Placement {
    response_limit: false,
    ..DEFAULTS
};

/// The control: no `ClientDisconnectLayer` on the request.
static RB_ALONE: Placement = Placement {
    name: "10a RequestBodyTimeoutLayer alone",
    build: |kit, routes| routes.layer(kit.rb()),
    disconnect: false,
    scenarios: UPLOAD,
    ..BODY_DEFAULTS
};

static RB_OUTSIDE: Placement = Placement {
    name: "10b .layer(CD).layer(RB)",
    build: |kit, routes| routes.layer(kit.cd()).layer(kit.rb()),
    scenarios: UPLOAD,
    ..BODY_DEFAULTS
};

static RB_INSIDE: Placement = Placement {
    name: "10c .layer(RB).layer(CD)",
    build: |kit, routes| routes.layer(kit.rb()).layer(kit.cd()),
    scenarios: UPLOAD,
    ..BODY_DEFAULTS
};

static RB_NESTED: Placement = Placement {
    name: "10d nested router with RB, CD outside",
    build: |kit, routes| {
        Router::new()
            .nest("/api", routes.layer(kit.rb()))
            .layer(kit.cd())
    },
    prefix: "/api",
    scenarios: UPLOAD,
    ..BODY_DEFAULTS
};

static RB_FROM_FN_BETWEEN: Placement = Placement {
    name: "10e .layer(RB).layer(from_fn).layer(CD)",
    build: |kit, routes| routes.layer(kit.rb()).layer(from_fn(pass)).layer(kit.cd()),
    scenarios: UPLOAD,
    ..BODY_DEFAULTS
};

static RB_UNDER_TRACE_COMPRESSION: Placement = Placement {
    name: "10f .layer(RB).layer(CD.record_in_current_span).layer(Compression).layer(Trace)",
    build: |kit, routes| {
        routes
            .layer(kit.rb())
            .layer(kit.cd().record_in_current_span())
            .layer(CompressionLayer::new())
            .layer(trace_layer())
    },
    gzip: true,
    scenarios: UPLOAD,
    ..BODY_DEFAULTS
};

/// The control: no `ClientDisconnectLayer` on the request.
static SB_ALONE: Placement = Placement {
    name: "11a ResponseBodyTimeoutLayer alone",
    build: |kit, routes| routes.layer(kit.sb()),
    disconnect: false,
    scenarios: STREAM,
    ..BODY_DEFAULTS
};

static SB_OUTSIDE: Placement = Placement {
    name: "11b .layer(CD).layer(SB)",
    build: |kit, routes| routes.layer(kit.cd()).layer(kit.sb()),
    scenarios: STREAM,
    ..BODY_DEFAULTS
};

static SB_INSIDE: Placement = Placement {
    name: "11c .layer(SB).layer(CD)",
    build: |kit, routes| routes.layer(kit.sb()).layer(kit.cd()),
    scenarios: STREAM,
    ..BODY_DEFAULTS
};

static SB_NESTED: Placement = Placement {
    name: "11d nested router with SB, CD outside",
    build: |kit, routes| {
        Router::new()
            .nest("/api", routes.layer(kit.sb()))
            .layer(kit.cd())
    },
    prefix: "/api",
    scenarios: STREAM,
    ..BODY_DEFAULTS
};

static SB_FROM_FN_BETWEEN: Placement = Placement {
    name: "11e .layer(SB).layer(from_fn).layer(CD)",
    build: |kit, routes| routes.layer(kit.sb()).layer(from_fn(pass)).layer(kit.cd()),
    scenarios: STREAM,
    ..BODY_DEFAULTS
};

static SB_UNDER_TRACE_COMPRESSION: Placement = Placement {
    name: "11f .layer(SB).layer(CD.record_in_current_span).layer(Compression).layer(Trace)",
    build: |kit, routes| {
        routes
            .layer(kit.sb())
            .layer(kit.cd().record_in_current_span())
            .layer(CompressionLayer::new())
            .layer(trace_layer())
    },
    gzip: true,
    scenarios: STREAM,
    ..BODY_DEFAULTS
};

/// Every layer of the crate on the request, each with its hook: the stack of the body
/// limits' docs.
static ALL_LAYERS_ONE_SERVICE_BUILDER: Placement = Placement {
    name: "12a one ServiceBuilder (CD, RB, SB, RT)",
    build: |kit, routes| {
        routes.layer(
            ServiceBuilder::new()
                .layer(kit.cd())
                .layer(kit.rb())
                .layer(kit.sb())
                .layer(kit.rt()),
        )
    },
    scenarios: ALL,
    ..DEFAULTS
};

/// The same, one `Router::layer` call each, the body limits outermost.
static ALL_LAYERS_LAYER_CALLS: Placement = Placement {
    name: "12b .layer(RT).layer(CD).layer(SB).layer(RB)",
    build: |kit, routes| {
        routes
            .layer(kit.rt())
            .layer(kit.cd())
            .layer(kit.sb())
            .layer(kit.rb())
    },
    scenarios: ALL,
    ..DEFAULTS
};

const ALL: &[Scenario] = &[
    Scenario::Fast,
    Scenario::Slow,
    Scenario::Leaves,
    Scenario::StalledUpload,
    Scenario::StalledStream,
];

// The shutdown layer (`SD`), outermost among the crate's layers as its docs say, in the
// placements users write: one `ServiceBuilder`, `Router::layer` calls, outside a nested router,
// with axum's `from_fn` between it and the rest, under tower-http's tracing and compression,
// and with the body limits inside it. Each case has a `Shutdown` of its own.

const SHUTDOWN: &[Scenario] = &[
    Scenario::ShutdownSlow,
    Scenario::ShutdownStream,
    Scenario::ShutdownCompletes,
    Scenario::ShutdownLeaves,
];

const SHUTDOWN_DEFAULTS: Placement = Placement {
    scenarios: SHUTDOWN,
    ..DEFAULTS
};

static SD_ONE_SERVICE_BUILDER: Placement = Placement {
    name: "13a one ServiceBuilder (SD, CD, RT)",
    build: |kit, routes| {
        routes.layer(
            ServiceBuilder::new()
                .layer(kit.sd())
                .layer(kit.cd())
                .layer(kit.rt()),
        )
    },
    ..SHUTDOWN_DEFAULTS
};

static SD_LAYER_CALLS: Placement = Placement {
    name: "13b .layer(RT).layer(CD).layer(SD)",
    build: |kit, routes| routes.layer(kit.rt()).layer(kit.cd()).layer(kit.sd()),
    ..SHUTDOWN_DEFAULTS
};

static SD_NESTED: Placement = Placement {
    name: "13c nested router with the stack, SD outside",
    build: |kit, routes| {
        Router::new()
            .nest("/api", routes.layer(kit.stack(kit.limit)))
            .layer(kit.sd())
    },
    prefix: "/api",
    ..SHUTDOWN_DEFAULTS
};

static SD_FROM_FN_BETWEEN: Placement = Placement {
    name: "13d .layer(RT).layer(CD).layer(from_fn).layer(SD)",
    build: |kit, routes| {
        routes
            .layer(kit.rt())
            .layer(kit.cd())
            .layer(from_fn(pass))
            .layer(kit.sd())
    },
    ..SHUTDOWN_DEFAULTS
};

static SD_UNDER_TRACE_COMPRESSION_ONE_SERVICE_BUILDER: Placement = Placement {
    name: "13e one ServiceBuilder (Trace, Compression, SD.record_in_current_span, CD, RT)",
    build: |kit, routes| {
        routes.layer(
            ServiceBuilder::new()
                .layer(trace_layer())
                .layer(CompressionLayer::new())
                .layer(kit.sd().record_in_current_span())
                .layer(kit.cd())
                .layer(kit.rt()),
        )
    },
    gzip: true,
    ..SHUTDOWN_DEFAULTS
};

static SD_UNDER_TRACE_COMPRESSION_LAYER_CALLS: Placement = Placement {
    name:
        "13f .layer(RT).layer(CD).layer(SD.record_in_current_span).layer(Compression).layer(Trace)",
    build: |kit, routes| {
        routes
            .layer(kit.rt())
            .layer(kit.cd())
            .layer(kit.sd().record_in_current_span())
            .layer(CompressionLayer::new())
            .layer(trace_layer())
    },
    gzip: true,
    ..SHUTDOWN_DEFAULTS
};

/// Every layer of the crate on the request, the shutdown layer outermost.
static SD_ALL_LAYERS_ONE_SERVICE_BUILDER: Placement = Placement {
    name: "13g one ServiceBuilder (SD, CD, RB, SB, RT)",
    build: |kit, routes| {
        routes.layer(
            ServiceBuilder::new()
                .layer(kit.sd())
                .layer(kit.cd())
                .layer(kit.rb())
                .layer(kit.sb())
                .layer(kit.rt()),
        )
    },
    ..SHUTDOWN_DEFAULTS
};

/// The same, one `Router::layer` call each, the body limits right inside the shutdown layer.
static SD_ALL_LAYERS_LAYER_CALLS: Placement = Placement {
    name: "13h .layer(RT).layer(CD).layer(SB).layer(RB).layer(SD)",
    build: |kit, routes| {
        routes
            .layer(kit.rt())
            .layer(kit.cd())
            .layer(kit.sb())
            .layer(kit.rb())
            .layer(kit.sd())
    },
    ..SHUTDOWN_DEFAULTS
};

// ---------------------------------------------------------------------------------------------
// Scenarios

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    /// a. A fast handler: 200, `completed`.
    Fast,
    /// b. A slow handler past a short limit: the limit's status, `response_timeout`.
    Slow,
    /// c. The client leaves while the slow handler runs: `client_disconnected` (`dropped`
    /// with no `ClientDisconnectLayer`).
    Leaves,
    /// d. The stack twice, the outer limit the smaller: the outer one's timeout.
    OuterFirst,
    /// e. The first attempt times out and the retry answers: `completed`.
    RetryAnswers,
    /// e. The client leaves during the retry: `client_disconnected`.
    LeavesDuringRetry,
    /// f. A POST whose body stalls after its first bytes: 408 (with `Connection: close` on
    /// HTTP/1.1), `request_body_timeout`.
    StalledUpload,
    /// f. The same, the handler answering its failed read with an empty 400.
    StalledUploadEmptyAnswer,
    /// g. A stream that stalls after its first frame: the body is cut,
    /// `response_body_timeout` with the frame's bytes.
    StalledStream,
    /// h. The slow handler still running when the shutdown's grace runs out: 503 (with
    /// `Connection: close` on HTTP/1.1, and the connection closed), `server_shutdown` before
    /// the head.
    ShutdownSlow,
    /// i. A stream under way (one frame, then stalled) when the grace is ended: the body is
    /// cut, `server_shutdown` during the body with the frame's bytes.
    ShutdownStream,
    /// j. A request in flight when the shutdown begins that completes within the grace:
    /// `completed`.
    ShutdownCompletes,
    /// k. The client leaves after the shutdown began, within the grace: `client_disconnected`.
    ShutdownLeaves,
}

impl Scenario {
    fn label(self) -> &'static str {
        match self {
            Scenario::Fast => "a fast",
            Scenario::Slow => "b slow past the limit",
            Scenario::Leaves => "c client leaves",
            Scenario::OuterFirst => "d outer limit first",
            Scenario::RetryAnswers => "e retry answers",
            Scenario::LeavesDuringRetry => "e client leaves during the retry",
            Scenario::StalledUpload => "f stalled upload",
            Scenario::StalledUploadEmptyAnswer => "f stalled upload, an empty answer",
            Scenario::StalledStream => "g stalled stream",
            Scenario::ShutdownSlow => "h slow when the grace runs out",
            Scenario::ShutdownStream => "i streaming when the grace ends",
            Scenario::ShutdownCompletes => "j completes within the grace",
            Scenario::ShutdownLeaves => "k client leaves within the grace",
        }
    }

    /// (the only or inner limit, the outer limit)
    fn limits(self) -> (Duration, Duration) {
        match self {
            Scenario::Fast
            | Scenario::Slow
            | Scenario::RetryAnswers
            | Scenario::LeavesDuringRetry => (SHORT, LONG),
            // The client leaves long before any limit; the body limits fire long before the
            // response limits.
            Scenario::Leaves
            | Scenario::StalledUpload
            | Scenario::StalledUploadEmptyAnswer
            | Scenario::StalledStream => (LONG, LONG),
            // Only the shutdown ends what it ends.
            Scenario::ShutdownSlow
            | Scenario::ShutdownStream
            | Scenario::ShutdownCompletes
            | Scenario::ShutdownLeaves => (LONG, LONG),
            Scenario::OuterFirst => (LONG, SHORT),
        }
    }

    /// The idle limit of the body limits: [`SHORT`], but where only the shutdown may end
    /// anything.
    fn body_idle(self) -> Duration {
        if self.shuts_down() {
            LONG
        } else {
            SHORT
        }
    }

    fn shuts_down(self) -> bool {
        SHUTDOWN.contains(&self)
    }

    /// The grace of the case's shutdown: the slow handler's runs out on its own, after
    /// `begin`; the stream's is ended with `end_grace`; the others' never end in the test.
    fn grace(self) -> Duration {
        match self {
            Scenario::ShutdownSlow => SHORT,
            _ => LONG,
        }
    }

    fn retries(self) -> usize {
        match self {
            // Whichever attempt runs when the client leaves, it is a retry.
            Scenario::LeavesDuringRetry => 20,
            _ => 1,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Http {
    V1,
    V2,
}

const VERSIONS: [Http; 2] = [Http::V1, Http::V2];

/// The outcome a case must record.
#[derive(Clone, Debug, PartialEq)]
enum Expect {
    Completed(StatusCode),
    Timeout { limit: Duration, status: StatusCode },
    Disconnected,
    Dropped,
    ConnectTimeout { limit: Duration, status: StatusCode },
    Refused,
    RequestBodyTimeout { limit: Duration },
    ResponseBodyTimeout { limit: Duration, bytes: u64 },
    ShutdownBeforeHead,
    ShutdownDuringBody { bytes: u64 },
}

impl Expect {
    fn matches(&self, outcome: &Outcome) -> bool {
        match (self, outcome) {
            (Expect::Completed(expected), Outcome::Completed { status, .. }) => status == expected,
            (
                Expect::Timeout { limit, status },
                Outcome::ResponseTimeout {
                    timeout, status: s, ..
                },
            ) => timeout == limit && s == status,
            (
                Expect::Disconnected,
                Outcome::ClientDisconnected {
                    phase: Phase::BeforeHead,
                    sent_status: None,
                    bytes_sent: 0,
                    ..
                },
            ) => true,
            (Expect::Dropped, Outcome::Dropped { .. }) => true,
            (
                Expect::ConnectTimeout { limit, status },
                Outcome::ConnectTimeout {
                    timeout, status: s, ..
                },
            ) => *timeout == Some(*limit) && s == status,
            (
                Expect::Refused,
                Outcome::ConnectFailed {
                    error: ProxyError::ConnectionRefused,
                    status,
                    ..
                },
            ) => *status == StatusCode::BAD_GATEWAY,
            (
                Expect::RequestBodyTimeout { limit },
                Outcome::RequestBodyTimeout {
                    timeout, status, ..
                },
            ) => timeout == limit && *status == StatusCode::REQUEST_TIMEOUT,
            (
                Expect::ResponseBodyTimeout { limit, bytes },
                Outcome::ResponseBodyTimeout {
                    timeout,
                    sent_status,
                    bytes_sent,
                    ..
                },
            ) => timeout == limit && *sent_status == StatusCode::OK && bytes_sent == bytes,
            (
                Expect::ShutdownBeforeHead,
                Outcome::ServerShutdown {
                    phase: Phase::BeforeHead,
                    sent_status: Some(StatusCode::SERVICE_UNAVAILABLE),
                    bytes_sent: 0,
                    ..
                },
            ) => true,
            (
                Expect::ShutdownDuringBody { bytes },
                Outcome::ServerShutdown {
                    phase: Phase::DuringBody,
                    sent_status: Some(StatusCode::OK),
                    bytes_sent,
                    ..
                },
            ) => bytes_sent == bytes,
            _ => false,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Expect::Completed(_) => "completed",
            Expect::Timeout { .. } => "response_timeout",
            Expect::Disconnected => "client_disconnected",
            Expect::Dropped => "dropped",
            Expect::ConnectTimeout { .. } => "connect_timeout",
            Expect::Refused => "connect_failed",
            Expect::RequestBodyTimeout { .. } => "request_body_timeout",
            Expect::ResponseBodyTimeout { .. } => "response_body_timeout",
            Expect::ShutdownBeforeHead | Expect::ShutdownDuringBody { .. } => "server_shutdown",
        }
    }

    /// The fields of the request span; `None` for a field that must be absent. `binding` is
    /// the `tower_timeouts.timeout_ms` to expect, if any.
    fn span_fields(&self, binding: Option<Duration>) -> Vec<(&'static str, Option<String>)> {
        let status = |s: StatusCode| Some(s.as_u16().to_string());
        let mut fields = vec![(OUTCOME, Some(self.kind().to_owned()))];
        match self {
            Expect::Completed(code) => {
                fields.push((HTTP_RESPONSE_STATUS_CODE, status(*code)));
                fields.push((ERROR_TYPE, None));
            }
            Expect::Timeout { status: code, .. } => {
                fields.push((HTTP_RESPONSE_STATUS_CODE, status(*code)));
                fields.push((RECORDED_STATUS, status(*code)));
                fields.push((ERROR_TYPE, Some("http_response_timeout".to_owned())));
            }
            Expect::Disconnected => {
                fields.push((HTTP_RESPONSE_STATUS_CODE, None));
                fields.push((RECORDED_STATUS, Some("499".to_owned())));
                fields.push((ERROR_TYPE, Some("client_disconnected".to_owned())));
            }
            Expect::Dropped => {
                fields.push((HTTP_RESPONSE_STATUS_CODE, None));
                fields.push((ERROR_TYPE, Some("dropped".to_owned())));
            }
            Expect::ConnectTimeout { status: code, .. } => {
                fields.push((HTTP_RESPONSE_STATUS_CODE, status(*code)));
                fields.push((ERROR_TYPE, Some("connection_timeout".to_owned())));
            }
            Expect::Refused => {
                fields.push((HTTP_RESPONSE_STATUS_CODE, status(StatusCode::BAD_GATEWAY)));
                fields.push((ERROR_TYPE, Some("connection_refused".to_owned())));
            }
            Expect::RequestBodyTimeout { .. } => {
                let code = StatusCode::REQUEST_TIMEOUT;
                fields.push((HTTP_RESPONSE_STATUS_CODE, status(code)));
                fields.push((RECORDED_STATUS, status(code)));
                fields.push((ERROR_TYPE, Some("request_body_timeout".to_owned())));
            }
            Expect::ResponseBodyTimeout { .. } => {
                fields.push((HTTP_RESPONSE_STATUS_CODE, status(StatusCode::OK)));
                fields.push((RECORDED_STATUS, status(StatusCode::OK)));
                fields.push((ERROR_TYPE, Some("response_body_timeout".to_owned())));
            }
            Expect::ShutdownBeforeHead | Expect::ShutdownDuringBody { .. } => {
                let code = if *self == Expect::ShutdownBeforeHead {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                };
                fields.push((HTTP_RESPONSE_STATUS_CODE, status(code)));
                fields.push((RECORDED_STATUS, status(code)));
                fields.push((ERROR_TYPE, Some("server_shutdown".to_owned())));
            }
        }
        if let Some(binding) = binding {
            fields.push((TIMEOUT_MS, Some(binding.as_millis().to_string())));
        }
        fields
    }

    fn events(&self) -> usize {
        match self {
            Expect::Completed(_) => 0,
            _ => 1,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Checking a case

/// The broken rules of one case.
struct Check {
    case: String,
    failures: Vec<String>,
}

impl Check {
    fn new(case: String) -> Self {
        Check {
            case,
            failures: Vec::new(),
        }
    }

    fn fail(&mut self, what: impl fmt::Display) {
        self.failures.push(format!("{}: {what}", self.case));
    }

    fn ensure(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.fail(what());
        }
    }
}

/// Waits until `done` holds; false after [`SOON`].
async fn wait_until(mut done: impl FnMut() -> bool) -> bool {
    timeout(SOON, async {
        while !done() {
            tokio::time::sleep(TICK).await;
        }
    })
    .await
    .is_ok()
}

fn field<'a>(captured: &'a Captured, name: &str) -> Option<&'a str> {
    captured.fields.get(name).map(String::as_str)
}

/// The client a span or an event belongs to: its own `user_agent.original`, or its parent's.
fn agent_of(captured: &Captured) -> Option<&str> {
    field(captured, USER_AGENT_ORIGINAL).or_else(|| {
        captured
            .parent
            .as_ref()
            .and_then(|parent| parent.get(USER_AGENT_ORIGINAL))
            .map(String::as_str)
    })
}

fn outcome_events(capture: &Capture) -> Vec<Captured> {
    capture
        .events()
        .into_iter()
        .filter(|event| field(event, OUTCOME).is_some())
        .collect()
}

fn summary(spans: &[Captured]) -> Vec<String> {
    spans
        .iter()
        .map(|span| {
            format!(
                "{}(agent={:?}, outcome={:?}, status={:?}, recorded={:?}, timeout_ms={:?}, \
                 parent={:?})",
                span.name,
                agent_of(span),
                field(span, OUTCOME),
                field(span, HTTP_RESPONSE_STATUS_CODE),
                field(span, RECORDED_STATUS),
                field(span, TIMEOUT_MS),
                span.parent_name
            )
        })
        .collect()
}

/// Exactly one hook report over all hooks, the expected one.
fn check_reports(check: &mut Check, who: &str, reports: &[Outcome], expect: &Expect) {
    let ok = reports.len() == 1 && expect.matches(&reports[0]);
    check.ensure(ok, || {
        format!("{who}: expected exactly one report {expect:?}, got {reports:?}")
    });
}

/// Exactly one request span, with the expected fields.
fn check_span(check: &mut Check, spans: &[Captured], expect: &Expect, binding: Option<Duration>) {
    if spans.len() != 1 {
        check.fail(format!(
            "expected exactly one `request` span, got {}: {:?}",
            spans.len(),
            summary(spans)
        ));
    }
    // The span with the outcome, if any, else the first: its fields are checked anyway.
    let Some(span) = spans
        .iter()
        .find(|span| field(span, OUTCOME).is_some())
        .or(spans.first())
    else {
        return;
    };
    for (name, value) in expect.span_fields(binding) {
        let got = field(span, name);
        check.ensure(got == value.as_deref(), || {
            format!("span field {name}: expected {value:?}, got {got:?} in {span:?}")
        });
    }
}

/// Exactly the expected number of outcome events, of the expected kind.
fn check_events(check: &mut Check, events: &[Captured], expect: &Expect) {
    let kinds: Vec<_> = events.iter().map(|event| field(event, OUTCOME)).collect();
    let ok =
        events.len() == expect.events() && kinds.iter().all(|kind| *kind == Some(expect.kind()));
    check.ensure(ok, || {
        format!(
            "expected {} outcome event(s) `{}`, got {kinds:?}",
            expect.events(),
            expect.kind()
        )
    });
}

// ---------------------------------------------------------------------------------------------
// Clients

struct Fetched {
    status: StatusCode,
    headers: HeaderMap,
}

fn client_request(addr: SocketAddr, path: &str, agent: &str) -> http::Request<Empty<Bytes>> {
    http::Request::builder()
        .uri(format!("http://{addr}{path}"))
        .header(USER_AGENT, agent)
        .header(ACCEPT_ENCODING, "gzip")
        .body(Empty::new())
        .unwrap()
}

/// A GET on a fresh connection, read to its end.
async fn fetch(http: Http, addr: SocketAddr, path: &str, agent: &str) -> Result<Fetched, String> {
    let exchange = async {
        let request = client_request(addr, path, agent);
        let response = match http {
            Http::V1 => common::h1(addr).await.send_request(request).await,
            Http::V2 => common::h2(addr).await.send_request(request).await,
        }
        .map_err(|error| format!("GET {path}: {error}"))?;
        let (parts, body) = response.into_parts();
        common::body_bytes(body).await;
        Ok(Fetched {
            status: parts.status,
            headers: parts.headers,
        })
    };
    timeout(SOON, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("GET {path}: no answer within {SOON:?}")))
}

/// What keeps an HTTP/2 connection open after its stream was reset.
type Connection = Option<hyper::client::conn::http2::SendRequest<Empty<Bytes>>>;

/// Waits for the handler's next start.
async fn next_start(started: &mut mpsc::UnboundedReceiver<()>, path: &str) -> Result<(), String> {
    match timeout(SOON, started.recv()).await {
        Ok(Some(())) => Ok(()),
        _ => Err(format!(
            "GET {path}: the handler did not start within {SOON:?}"
        )),
    }
}

/// A GET whose client leaves once the handler started `starts` times and `before_leaving` ran:
/// HTTP/1.1 closes its socket (a GET is seen at once), HTTP/2 resets the stream and keeps the
/// connection.
async fn leave(
    http: Http,
    addr: SocketAddr,
    path: &str,
    agent: &str,
    started: &mut mpsc::UnboundedReceiver<()>,
    starts: usize,
    before_leaving: impl FnOnce(),
) -> Result<Connection, String> {
    match http {
        Http::V1 => {
            let mut stream = TcpStream::connect(addr)
                .await
                .map_err(|error| error.to_string())?;
            stream.set_nodelay(true).unwrap();
            let request =
                format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nuser-agent: {agent}\r\n\r\n");
            stream
                .write_all(request.as_bytes())
                .await
                .map_err(|error| error.to_string())?;
            for _ in 0..starts {
                next_start(started, path).await?;
            }
            before_leaving();
            drop(stream);
            Ok(None)
        }
        Http::V2 => {
            let mut send = common::h2(addr).await;
            let mut response = Box::pin(send.send_request(client_request(addr, path, agent)));
            for _ in 0..starts {
                tokio::select! {
                    answer = &mut response => {
                        return Err(format!(
                            "GET {path}: answered {:?} before the client left",
                            answer.map(|response| response.status())
                        ));
                    }
                    start = next_start(started, path) => start?,
                }
            }
            before_leaving();
            // RST_STREAM CANCEL; the connection stays.
            drop(response);
            Ok(Some(send))
        }
    }
}

/// A request body that sends its first bytes, then stalls for good.
struct StallingBody(Option<Bytes>);

impl http_body::Body for StallingBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut().0.take() {
            Some(first) => std::task::Poll::Ready(Some(Ok(Frame::data(first)))),
            None => std::task::Poll::Pending,
        }
    }
}

/// The head of an HTTP/1.1 answer, read off a socket.
fn parse_head(received: &[u8]) -> Result<Fetched, String> {
    let text = String::from_utf8_lossy(received);
    let Some((head, _)) = text.split_once("\r\n\r\n") else {
        return Err(format!("an incomplete answer: {text:?}"));
    };
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| StatusCode::from_bytes(code.as_bytes()).ok())
        .ok_or_else(|| format!("no status in {status_line:?}"))?;
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("a malformed header line {line:?}"))?;
        let name = http::HeaderName::from_bytes(name.trim().as_bytes());
        let value = http::HeaderValue::from_str(value.trim());
        match (name, value) {
            (Ok(name), Ok(value)) => headers.append(name, value),
            _ => return Err(format!("a malformed header line {line:?}")),
        };
    }
    Ok(Fetched { status, headers })
}

/// A POST whose body stalls after [`UPLOAD_SENT`], of the [`UPLOAD_ANNOUNCED`] bytes its head
/// announces. HTTP/1.1 on a raw socket, read until the server closes it (which it must do
/// after an answer with `Connection: close`); HTTP/2 with hyper's client.
async fn stalled_upload(
    http: Http,
    addr: SocketAddr,
    path: &str,
    agent: &str,
) -> Result<Fetched, String> {
    // What came on an HTTP/1.1 connection.
    let mut received = Vec::new();
    let exchange = async {
        match http {
            Http::V1 => {
                let mut stream = TcpStream::connect(addr)
                    .await
                    .map_err(|error| error.to_string())?;
                stream.set_nodelay(true).unwrap();
                let head = format!(
                    "POST {path} HTTP/1.1\r\nhost: localhost\r\nuser-agent: {agent}\r\n\
                     accept-encoding: gzip\r\ncontent-length: {UPLOAD_ANNOUNCED}\r\n\r\n"
                );
                stream
                    .write_all(head.as_bytes())
                    .await
                    .map_err(|error| error.to_string())?;
                stream
                    .write_all(UPLOAD_SENT)
                    .await
                    .map_err(|error| error.to_string())?;
                read_to_close(&mut stream, &mut received)
                    .await
                    .map_err(|error| format!("POST {path}: {error}"))?;
                parse_head(&received).map_err(|error| format!("POST {path}: {error}"))
            }
            Http::V2 => {
                let stream = TcpStream::connect(addr)
                    .await
                    .map_err(|error| error.to_string())?;
                stream.set_nodelay(true).unwrap();
                let (mut send, conn) = hyper::client::conn::http2::handshake(
                    TokioExecutor::new(),
                    TokioIo::new(stream),
                )
                .await
                .map_err(|error| error.to_string())?;
                tokio::spawn(conn);
                let request = http::Request::post(format!("http://{addr}{path}"))
                    .header(USER_AGENT, agent)
                    .header(ACCEPT_ENCODING, "gzip")
                    .header(http::header::CONTENT_LENGTH, UPLOAD_ANNOUNCED)
                    .body(StallingBody(Some(Bytes::from_static(UPLOAD_SENT))))
                    .unwrap();
                let response = send
                    .send_request(request)
                    .await
                    .map_err(|error| format!("POST {path}: {error}"))?;
                let (parts, body) = response.into_parts();
                // Read to its end, so that the client's side does not cancel the stream.
                let _ = body.collect().await;
                Ok(Fetched {
                    status: parts.status,
                    headers: parts.headers,
                })
            }
        }
    };
    let answered = timeout(SOON, exchange).await;
    answered.unwrap_or_else(|_| {
        Err(format!(
            "POST {path}: no answer, or the connection still open, after {SOON:?}, having read \
             {:?}",
            String::from_utf8_lossy(&received)
        ))
    })
}

/// Reads what a socket receives into `received` until the server closes it (kept by the
/// caller, so that a connection still open can be shown with what came on it).
async fn read_to_close(stream: &mut TcpStream, received: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0; 4096];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) => return Ok(()),
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            // A reset is a close too; what came before it is read already.
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
            Err(error) => return Err(error),
        }
    }
}

/// Keeps a client's connection open while it lives.
type Kept = Box<dyn std::any::Any + Send>;

/// The answer to a GET sent with hyper's client, with the connection it came on.
type Answer =
    Pin<Box<dyn Future<Output = Result<(http::Response<Incoming>, Kept), String>> + Send>>;

/// A GET on a fresh connection, sent when the answer is first polled.
async fn send_get(http: Http, addr: SocketAddr, path: &str, agent: &str) -> Answer {
    let request = client_request(addr, path, agent);
    let failed = format!("GET {path}");
    match http {
        Http::V1 => {
            let mut send = common::h1(addr).await;
            Box::pin(async move {
                let response = send.send_request(request).await;
                let response = response.map_err(|error| format!("{failed}: {error}"))?;
                Ok((response, Box::new(send) as Kept))
            })
        }
        Http::V2 => {
            let mut send = common::h2(addr).await;
            Box::pin(async move {
                let response = send.send_request(request).await;
                let response = response.map_err(|error| format!("{failed}: {error}"))?;
                Ok((response, Box::new(send) as Kept))
            })
        }
    }
}

/// A GET whose handler said it started, its answer still to come.
async fn started_get(
    http: Http,
    addr: SocketAddr,
    path: &str,
    agent: &str,
    started: &mut mpsc::UnboundedReceiver<()>,
) -> Result<Answer, String> {
    let mut answer = send_get(http, addr, path, agent).await;
    tokio::select! {
        answered = &mut answer => Err(format!(
            "GET {path}: answered {:?} before the handler started",
            answered.map(|(response, _)| response.status())
        )),
        start = next_start(started, path) => start.map(|()| answer),
    }
}

/// Waits for an answer and reads its body to the end.
async fn fetched(answer: Answer, path: &str) -> Result<Fetched, String> {
    let (response, _kept) = answer.await?;
    let (parts, body) = response.into_parts();
    body.collect()
        .await
        .map_err(|error| format!("GET {path}: the body failed: {error}"))?;
    Ok(Fetched {
        status: parts.status,
        headers: parts.headers,
    })
}

/// A GET whose handler never answers, once it started: the shutdown begins, and its grace runs
/// out. HTTP/1.1 on a raw socket, read until the server closes it (which it must do after an
/// answer with `Connection: close`); HTTP/2 with hyper's client.
async fn answered_at_shutdown(
    http: Http,
    addr: SocketAddr,
    path: &str,
    agent: &str,
    started: &mut mpsc::UnboundedReceiver<()>,
    shutdown: &Shutdown,
) -> Result<Fetched, String> {
    // What came on an HTTP/1.1 connection.
    let mut received = Vec::new();
    let exchange = async {
        match http {
            Http::V1 => {
                let mut stream = TcpStream::connect(addr)
                    .await
                    .map_err(|error| error.to_string())?;
                stream.set_nodelay(true).unwrap();
                let request = format!(
                    "GET {path} HTTP/1.1\r\nhost: localhost\r\nuser-agent: {agent}\r\n\
                     accept-encoding: gzip\r\n\r\n"
                );
                stream
                    .write_all(request.as_bytes())
                    .await
                    .map_err(|error| error.to_string())?;
                next_start(started, path).await?;
                shutdown.begin();
                read_to_close(&mut stream, &mut received)
                    .await
                    .map_err(|error| format!("GET {path}: {error}"))?;
                parse_head(&received).map_err(|error| format!("GET {path}: {error}"))
            }
            Http::V2 => {
                let answer = started_get(http, addr, path, agent, started).await?;
                shutdown.begin();
                fetched(answer, path).await
            }
        }
    };
    let answered = timeout(SOON, exchange).await;
    answered.unwrap_or_else(|_| {
        Err(format!(
            "GET {path}: no answer, or the connection still open, after {SOON:?}, having read \
             {:?}",
            String::from_utf8_lossy(&received)
        ))
    })
}

/// A GET of a stream that stalls after its frame: once the frame went out (and, with
/// `see_frame`, once the client got it), the shutdown's grace is ended; the body is read to its
/// end or its cut.
async fn cut_at_shutdown(
    http: Http,
    addr: SocketAddr,
    path: &str,
    agent: &str,
    frame_sent: &mut mpsc::UnboundedReceiver<()>,
    see_frame: bool,
    shutdown: &Shutdown,
) -> Result<Streamed, String> {
    let exchange = async {
        let (response, _kept) = send_get(http, addr, path, agent).await.await?;
        let (parts, mut body) = response.into_parts();
        let mut bytes = Vec::new();
        let mut ended = None;
        while see_frame && ended.is_none() && bytes.len() < STREAM_FRAME.len() {
            ended = read_frame(&mut body, &mut bytes).await;
        }
        if ended.is_none() {
            frame_sent
                .recv()
                .await
                .ok_or_else(|| format!("GET {path}: the stream said nothing"))?;
            shutdown.end_grace();
        }
        while ended.is_none() {
            ended = read_frame(&mut body, &mut bytes).await;
        }
        Ok(Streamed {
            status: parts.status,
            body: bytes,
            cut: ended == Some(true),
        })
    };
    timeout(SOON, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("GET {path}: not ended within {SOON:?}")))
}

/// Reads one frame of `body`, its data into `bytes`; once the body ended, whether it was cut.
async fn read_frame(body: &mut Incoming, bytes: &mut Vec<u8>) -> Option<bool> {
    match body.frame().await {
        None => Some(false),
        Some(Ok(frame)) => {
            if let Ok(data) = frame.into_data() {
                bytes.extend_from_slice(&data);
            }
            None
        }
        Some(Err(_)) => Some(true),
    }
}

/// A GET whose handler waits for the test, once it started: the shutdown begins, then the
/// handler is let go and answers within the grace.
async fn completes_in_grace(
    http: Http,
    addr: SocketAddr,
    path: &str,
    agent: &str,
    probe: &Probe,
    started: &mut mpsc::UnboundedReceiver<()>,
    shutdown: &Shutdown,
) -> Result<Fetched, String> {
    let exchange = async {
        let answer = started_get(http, addr, path, agent, started).await?;
        shutdown.begin();
        probe.release.notify_one();
        fetched(answer, path).await
    };
    timeout(SOON, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("GET {path}: no answer within {SOON:?}")))
}

/// What a client got of a stream.
struct Streamed {
    status: StatusCode,
    /// The body bytes that came before the end.
    body: Vec<u8>,
    /// The body ended in an error (a reset stream, a closed connection) rather than its end.
    cut: bool,
}

/// A GET on a fresh connection, its body read to its end or its cut.
async fn stalled_stream(
    http: Http,
    addr: SocketAddr,
    path: &str,
    agent: &str,
) -> Result<Streamed, String> {
    let exchange = async {
        let request = client_request(addr, path, agent);
        let response = match http {
            Http::V1 => common::h1(addr).await.send_request(request).await,
            Http::V2 => common::h2(addr).await.send_request(request).await,
        }
        .map_err(|error| format!("GET {path}: {error}"))?;
        let (parts, mut body) = response.into_parts();
        let mut bytes = Vec::new();
        let cut = loop {
            match body.frame().await {
                None => break false,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        bytes.extend_from_slice(&data);
                    }
                }
                Some(Err(_)) => break true,
            }
        };
        Ok(Streamed {
            status: parts.status,
            body: bytes,
            cut,
        })
    };
    timeout(SOON, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("GET {path}: not ended within {SOON:?}")))
}

// ---------------------------------------------------------------------------------------------
// Running the matrix

/// Runs one placement × scenario × server × version; returns the broken rules.
async fn run_case(
    capture: Capture,
    placement: &'static Placement,
    scenario: Scenario,
    server: Server,
    http: Http,
) -> Vec<String> {
    let mut check = Check::new(format!(
        "[{} | {} | {server:?} | {http:?}]",
        placement.name,
        scenario.label()
    ));
    let agent = format!(
        "compositions/{}/{scenario:?}/{server:?}/{http:?}",
        placement.name.split(' ').next().unwrap()
    );
    let (probe, mut reports) = Probe::new();
    let outcomes = Outcomes::new();
    let (limit, outer) = scenario.limits();
    let kit = Kit {
        outcomes: outcomes.clone(),
        limit,
        outer,
        retries: scenario.retries(),
        body_idle: scenario.body_idle(),
        shutdown: Shutdown::new(scenario.grace()),
    };
    let response_limit = if placement.twice {
        limit.min(outer)
    } else {
        limit
    };
    // The limit on the span: the one that fired, or else the response limit, if any.
    let binding = match scenario {
        Scenario::StalledUpload | Scenario::StalledUploadEmptyAnswer | Scenario::StalledStream => {
            Some(SHORT)
        }
        _ => placement.response_limit.then_some(response_limit),
    };
    let addr = common::serve(server, (placement.build)(&kit, routes(probe.clone()))).await;
    let path = |route: &str| format!("{}{route}", placement.prefix);

    let mut connection: Connection = None;
    let expect = match scenario {
        Scenario::Fast | Scenario::RetryAnswers => {
            let route = if scenario == Scenario::Fast {
                "/fast"
            } else {
                "/flaky"
            };
            match fetch(http, addr, &path(route), &agent).await {
                Ok(fetched) => {
                    check.ensure(fetched.status == StatusCode::OK, || {
                        format!("the client got {}, expected 200", fetched.status)
                    });
                    if placement.gzip {
                        let encoding = fetched.headers.get(CONTENT_ENCODING);
                        check.ensure(encoding.is_some_and(|e| e == "gzip"), || {
                            format!("expected a gzip-compressed answer, got {encoding:?}")
                        });
                    }
                }
                Err(error) => check.fail(error),
            }
            if scenario == Scenario::RetryAnswers {
                let calls = probe.calls.load(Ordering::SeqCst);
                check.ensure(calls == 2, || {
                    format!("the handler was called {calls} times, expected 2 (one retry)")
                });
            }
            Expect::Completed(StatusCode::OK)
        }
        Scenario::Slow | Scenario::OuterFirst => {
            match fetch(http, addr, &path("/slow"), &agent).await {
                Ok(fetched) => {
                    check.ensure(fetched.status == placement.timeout_status, || {
                        format!(
                            "the client got {}, expected {}",
                            fetched.status, placement.timeout_status
                        )
                    });
                    let proxy_status = fetched.headers.get(PROXY_STATUS);
                    check.ensure(
                        proxy_status.is_some_and(|value| value == TIMEOUT_PROXY_STATUS),
                        || format!("Proxy-Status: expected {TIMEOUT_PROXY_STATUS:?}, got {proxy_status:?}"),
                    );
                }
                Err(error) => check.fail(error),
            }
            Expect::Timeout {
                limit: response_limit,
                status: placement.timeout_status,
            }
        }
        Scenario::Leaves | Scenario::LeavesDuringRetry => {
            // During the retry: once the second attempt started.
            let starts = if scenario == Scenario::Leaves { 1 } else { 2 };
            match leave(
                http,
                addr,
                &path("/slow"),
                &agent,
                &mut reports.started,
                starts,
                || (),
            )
            .await
            {
                Ok(kept) => connection = kept,
                Err(error) => check.fail(error),
            }
            if placement.disconnect {
                Expect::Disconnected
            } else {
                Expect::Dropped
            }
        }
        Scenario::StalledUpload | Scenario::StalledUploadEmptyAnswer => {
            let route = if scenario == Scenario::StalledUpload {
                "/upload"
            } else {
                "/upload-empty-answer"
            };
            match stalled_upload(http, addr, &path(route), &agent).await {
                Ok(fetched) => {
                    check.ensure(fetched.status == StatusCode::REQUEST_TIMEOUT, || {
                        format!("the client got {}, expected 408", fetched.status)
                    });
                    // HTTP/2 has no `Connection`: the stream ends alone.
                    if http == Http::V1 {
                        let close = fetched.headers.get(CONNECTION);
                        check.ensure(
                            close.is_some_and(|value| {
                                value.as_bytes().eq_ignore_ascii_case(b"close")
                            }),
                            || format!("expected `connection: close` on the 408, got {close:?}"),
                        );
                    }
                    let proxy_status = fetched.headers.get(PROXY_STATUS);
                    check.ensure(
                        proxy_status.is_some_and(|value| value == REQUEST_BODY_PROXY_STATUS),
                        || format!("Proxy-Status: expected {REQUEST_BODY_PROXY_STATUS:?}, got {proxy_status:?}"),
                    );
                }
                Err(error) => check.fail(error),
            }
            Expect::RequestBodyTimeout { limit: SHORT }
        }
        Scenario::StalledStream => {
            match stalled_stream(http, addr, &path("/stream"), &agent).await {
                Ok(streamed) => {
                    check.ensure(streamed.status == StatusCode::OK, || {
                        format!("the client got {}, expected 200", streamed.status)
                    });
                    check.ensure(streamed.cut, || {
                        format!(
                            "the stream ended cleanly after {} bytes: it was not cut",
                            streamed.body.len()
                        )
                    });
                    // Compressed, the frame may still be in the encoder when the body is cut.
                    if !placement.gzip {
                        check.ensure(streamed.body == STREAM_FRAME, || {
                            format!(
                                "the client got {:?} before the cut, expected the one frame",
                                String::from_utf8_lossy(&streamed.body)
                            )
                        });
                    }
                }
                Err(error) => check.fail(error),
            }
            Expect::ResponseBodyTimeout {
                limit: SHORT,
                bytes: STREAM_FRAME.len() as u64,
            }
        }
        Scenario::ShutdownSlow => {
            let shutdown = &kit.shutdown;
            let slow = path("/slow");
            match answered_at_shutdown(http, addr, &slow, &agent, &mut reports.started, shutdown)
                .await
            {
                Ok(fetched) => {
                    check.ensure(fetched.status == StatusCode::SERVICE_UNAVAILABLE, || {
                        format!("the client got {}, expected 503", fetched.status)
                    });
                    // HTTP/2 has no `Connection`: the stream ends alone.
                    if http == Http::V1 {
                        let close = fetched.headers.get(CONNECTION);
                        check.ensure(
                            close.is_some_and(|value| {
                                value.as_bytes().eq_ignore_ascii_case(b"close")
                            }),
                            || format!("expected `connection: close` on the 503, got {close:?}"),
                        );
                    }
                    // The server's own answer: no proxy error to name.
                    let proxy_status = fetched.headers.get(PROXY_STATUS);
                    check.ensure(proxy_status.is_none(), || {
                        format!("Proxy-Status on the 503: {proxy_status:?}")
                    });
                }
                Err(error) => check.fail(error),
            }
            Expect::ShutdownBeforeHead
        }
        Scenario::ShutdownStream => {
            let route = path("/stream");
            let cut = cut_at_shutdown(
                http,
                addr,
                &route,
                &agent,
                &mut reports.frame_sent,
                !placement.gzip,
                &kit.shutdown,
            );
            match cut.await {
                Ok(streamed) => {
                    check.ensure(streamed.status == StatusCode::OK, || {
                        format!("the client got {}, expected 200", streamed.status)
                    });
                    check.ensure(streamed.cut, || {
                        format!(
                            "the stream ended cleanly after {} bytes: it was not cut",
                            streamed.body.len()
                        )
                    });
                    // Compressed, the frame may still be in the encoder when the body is cut.
                    if !placement.gzip {
                        check.ensure(streamed.body == STREAM_FRAME, || {
                            format!(
                                "the client got {:?} before the cut, expected the one frame",
                                String::from_utf8_lossy(&streamed.body)
                            )
                        });
                    }
                }
                Err(error) => check.fail(error),
            }
            Expect::ShutdownDuringBody {
                bytes: STREAM_FRAME.len() as u64,
            }
        }
        Scenario::ShutdownCompletes => {
            let route = path("/gated");
            let completes = completes_in_grace(
                http,
                addr,
                &route,
                &agent,
                &probe,
                &mut reports.started,
                &kit.shutdown,
            );
            match completes.await {
                Ok(fetched) => {
                    check.ensure(fetched.status == StatusCode::OK, || {
                        format!("the client got {}, expected 200", fetched.status)
                    });
                    if placement.gzip {
                        let encoding = fetched.headers.get(CONTENT_ENCODING);
                        check.ensure(encoding.is_some_and(|e| e == "gzip"), || {
                            format!("expected a gzip-compressed answer, got {encoding:?}")
                        });
                    }
                }
                Err(error) => check.fail(error),
            }
            check.ensure(
                kit.shutdown.is_begun() && !kit.shutdown.is_grace_over(),
                || format!("not within the grace: {:?}", kit.shutdown),
            );
            Expect::Completed(StatusCode::OK)
        }
        Scenario::ShutdownLeaves => {
            let begin = || kit.shutdown.begin();
            match leave(
                http,
                addr,
                &path("/slow"),
                &agent,
                &mut reports.started,
                1,
                begin,
            )
            .await
            {
                Ok(kept) => connection = kept,
                Err(error) => check.fail(error),
            }
            check.ensure(
                kit.shutdown.is_begun() && !kit.shutdown.is_grace_over(),
                || format!("not within the grace: {:?}", kit.shutdown),
            );
            Expect::Disconnected
        }
    };

    // What the checks need, waited for; then the grace for a wrong extra record.
    if !wait_until(|| !outcomes.all().is_empty()).await {
        check.fail(format!("no hook report within {SOON:?}"));
    }
    if !wait_until(|| probe.live.count() == 0).await {
        check.fail(format!(
            "the handler's future was not dropped within {SOON:?}"
        ));
    }
    tokio::time::sleep(GRACE).await;

    check_reports(&mut check, "hooks", &outcomes.all(), &expect);
    let mine = |captured: &Captured| agent_of(captured) == Some(agent.as_str());
    let spans: Vec<_> = capture.closed_spans().into_iter().filter(mine).collect();
    check_span(&mut check, &spans, &expect, binding);
    let events: Vec<_> = outcome_events(&capture).into_iter().filter(mine).collect();
    check_events(&mut check, &events, &expect);

    // ClientGone: fired for a client that left under a ClientDisconnectLayer, never otherwise.
    let signals = probe.signals();
    let given: Vec<ClientGone> = signals.iter().flatten().cloned().collect();
    if matches!(
        expect,
        Expect::RequestBodyTimeout { .. } | Expect::ResponseBodyTimeout { .. }
    ) {
        // A body limit gave the work up: cancelled as abandoned, never as a client that left.
        for gone in &given {
            let cancelled = timeout(SOON, gone.cancelled()).await;
            check.ensure(
                cancelled == Ok(Cancelled::Abandoned)
                    && gone.reason() == Some(Cancelled::Abandoned)
                    && !gone.is_gone(),
                || {
                    format!(
                        "ClientGone after a body limit: cancelled {cancelled:?}, reason {:?}, \
                         is_gone {}, expected Abandoned and not gone",
                        gone.reason(),
                        gone.is_gone()
                    )
                },
            );
        }
    }
    if matches!(
        expect,
        Expect::ShutdownBeforeHead | Expect::ShutdownDuringBody { .. }
    ) {
        // The server gave the work up: cancelled for its shutdown, never as a client that left.
        for gone in &given {
            let cancelled = timeout(SOON, gone.cancelled()).await;
            check.ensure(
                cancelled == Ok(Cancelled::ServerShutdown)
                    && gone.reason() == Some(Cancelled::ServerShutdown)
                    && !gone.is_gone(),
                || {
                    format!(
                        "ClientGone after the grace: cancelled {cancelled:?}, reason {:?}, \
                         is_gone {}, expected ServerShutdown and not gone",
                        gone.reason(),
                        gone.is_gone()
                    )
                },
            );
        }
    }
    if scenario == Scenario::ShutdownCompletes {
        check.ensure(given.iter().all(|gone| gone.reason().is_none()), || {
            format!("ClientGone cancelled for a request that completed: {signals:?}")
        });
    }
    let fired = given.iter().filter(|gone| gone.is_gone()).count();
    if placement.disconnect {
        check.ensure(given.len() == signals.len(), || {
            format!("a handler call got no ClientGone under a ClientDisconnectLayer: {signals:?}")
        });
    } else {
        check.ensure(given.is_empty(), || {
            format!("a ClientGone without a ClientDisconnectLayer: {signals:?}")
        });
    }
    if expect == Expect::Disconnected {
        check.ensure(!given.is_empty() && fired == given.len(), || {
            format!("ClientGone not fired: {signals:?}")
        });
        // The signal fired: the task watching it hears so.
        let mut watched = 0;
        let heard = timeout(SOON, async {
            while watched < fired {
                reports.watched.recv().await;
                watched += 1;
            }
        })
        .await;
        check.ensure(heard.is_ok(), || {
            format!("the spawned watcher heard {watched} of {fired} fired signals")
        });
    } else {
        let mut watched = 0;
        while reports.watched.try_recv().is_ok() {
            watched += 1;
        }
        check.ensure(fired == 0 && watched == 0, || {
            format!("ClientGone fired ({fired} of {} signals, {watched} heard by the watcher), but the client did not leave", given.len())
        });
    }
    drop(connection);
    check.failures
}

/// Runs every scenario of `placements` on every server and both versions, all at once, and
/// fails with every broken rule of every case.
async fn matrix(placements: &[&'static Placement]) {
    let (capture, _guard) = Capture::install_crate_only();
    let mut cases = JoinSet::new();
    let mut names = HashMap::new();
    for &placement in placements {
        for &scenario in placement.scenarios {
            for server in SERVERS {
                for http in VERSIONS {
                    let case = run_case(capture.clone(), placement, scenario, server, http);
                    let id = cases.spawn(case).id();
                    let name = format!(
                        "[{} | {} | {server:?} | {http:?}]",
                        placement.name,
                        scenario.label()
                    );
                    names.insert(id, name);
                }
            }
        }
    }
    let mut failures = Vec::new();
    let (mut total, mut failed) = (0, 0);
    while let Some(joined) = cases.join_next_with_id().await {
        total += 1;
        let broken = match joined {
            Ok((_, broken)) => broken,
            Err(error) => vec![format!("{}: panicked: {error}", names[&error.id()])],
        };
        failed += usize::from(!broken.is_empty());
        failures.extend(broken);
    }
    // Every request span and outcome event belongs to some case's client.
    let strays: Vec<_> = capture
        .closed_spans()
        .into_iter()
        .chain(outcome_events(&capture))
        .filter(|captured| agent_of(captured).is_none())
        .collect();
    if !strays.is_empty() {
        failures.push(format!(
            "request spans or outcome events of no client request: {strays:?}"
        ));
    }
    failures.sort();
    assert!(
        failures.is_empty(),
        "{failed} of {total} cases failed:\n{}",
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 0-8: the server-side placements

#[tokio::test]
async fn timeout_alone_records_dropped_and_gives_no_signal() {
    matrix(&[&TIMEOUT_ALONE]).await;
}

#[tokio::test]
async fn one_service_builder() {
    matrix(&[&ONE_SERVICE_BUILDER]).await;
}

#[tokio::test]
async fn two_layer_calls_disconnect_outside() {
    matrix(&[&LAYER_CALLS_CD_OUTSIDE]).await;
}

#[tokio::test]
async fn two_layer_calls_timeout_outside() {
    matrix(&[&LAYER_CALLS_RT_OUTSIDE]).await;
}

#[tokio::test]
async fn the_hook_of_an_inner_layer_is_called_once_when_the_outer_ones_have_none() {
    matrix(&[&HOOKS_INSIDE_ONLY]).await;
}

#[tokio::test]
async fn stack_applied_twice_route_layer_and_layer() {
    matrix(&[&ROUTE_LAYER_AND_LAYER]).await;
}

#[tokio::test]
async fn stack_applied_twice_nested_routers() {
    matrix(&[&NESTED]).await;
}

#[tokio::test]
async fn from_fn_map_request_map_response_between() {
    matrix(&[
        &FROM_FN_BETWEEN,
        &MAP_REQUEST_BETWEEN,
        &MAP_RESPONSE_BETWEEN,
        &MIDDLEWARE_IN_ONE_SERVICE_BUILDER,
        &FROM_FN_BETWEEN_RT_OUTSIDE,
    ])
    .await;
}

#[tokio::test]
async fn map_response_rewriting_the_504_is_recorded_with_its_status() {
    matrix(&[&MAP_RESPONSE_REWRITES_504]).await;
}

#[tokio::test]
async fn retry_between() {
    matrix(&[&RETRY_LAYER_CALLS, &RETRY_ONE_SERVICE_BUILDER]).await;
}

#[tokio::test]
async fn trace_and_compression_around() {
    matrix(&[
        &TRACE_COMPRESSION_ONE_SERVICE_BUILDER,
        &TRACE_COMPRESSION_LAYER_CALLS,
    ])
    .await;
}

// ---------------------------------------------------------------------------------------------
// 9: a gateway handler calling upstream, awaited or spawned, with the server request's
// extensions or a fresh request.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    Awaited,
    Spawned,
    /// Spawned, the task instrumented with the handler's current span.
    SpawnedInstrumented,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Build {
    /// From the server request's parts: its extensions go upstream.
    Forwarded,
    Fresh,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Upstream {
    Healthy,
    BlackHole,
    Refused,
}

type UpstreamStack = BoxCloneSyncService<Request, Response, Infallible>;

#[derive(Clone)]
struct Gateway {
    upstream: UpstreamStack,
    uri: Uri,
    call: Call,
    build: Build,
}

/// `UpstreamFailureLayer` outside `ResponseTimeoutLayer` around hyper-util's legacy `Client`,
/// `ConnectTimeoutLayer` on its connector; a hook on both layers.
fn upstream_stack(outcomes: &Outcomes) -> UpstreamStack {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let connector = ConnectTimeoutLayer::new(CONNECT_LIMIT).layer(http);
    let client = Client::builder(TokioExecutor::new()).build(connector);
    let service = ServiceBuilder::new()
        .layer(UpstreamFailureLayer::new().on_outcome(outcomes.hook()))
        .layer(ResponseTimeoutLayer::new(LONG).on_outcome(outcomes.hook()))
        .service(client)
        .map_response(|response| response.map(Body::new));
    BoxCloneSyncService::new(service)
}

async fn gateway(State(gateway): State<Gateway>, request: Request) -> Response {
    let upstream_request = match gateway.build {
        Build::Forwarded => {
            let (mut parts, _) = request.into_parts();
            parts.uri = gateway.uri.clone();
            parts.version = http::Version::HTTP_11;
            parts.headers.remove(HOST);
            Request::from_parts(parts, Body::empty())
        }
        Build::Fresh => Request::builder()
            .uri(gateway.uri.clone())
            .body(Body::empty())
            .unwrap(),
    };
    let call = gateway.upstream.clone().oneshot(upstream_request);
    let answer = match gateway.call {
        Call::Awaited => call.await,
        Call::Spawned => tokio::spawn(call).await.unwrap(),
        Call::SpawnedInstrumented => tokio::spawn(call.instrument(tracing::Span::current()))
            .await
            .unwrap(),
    };
    answer.unwrap_or_else(|never| match never {})
}

/// Runs the gateway cases of one way of calling upstream, one at a time (an `upstream` span
/// has no client's `user-agent` of its own to be told apart by).
async fn gateway_cases(call: Call, build: Build) {
    let (capture, _guard) = Capture::install_crate_only();
    let healthy = common::serve(
        Server::AxumServe,
        Router::new().route("/up", get(|| async { "upstream ok" })),
    )
    .await;
    let hole = common::black_hole().await;
    let (refused, _socket) = common::refusing();
    let mut failures = Vec::new();
    let (mut total, mut failed) = (0, 0);
    for upstream in [Upstream::Healthy, Upstream::BlackHole, Upstream::Refused] {
        for server in SERVERS {
            let target = match upstream {
                Upstream::Healthy => healthy,
                Upstream::BlackHole => hole.addr,
                Upstream::Refused => refused,
            };
            let case = gateway_case(&capture, call, build, upstream, target, server);
            let broken = case.await;
            total += 1;
            failed += usize::from(!broken.is_empty());
            failures.extend(broken);
        }
    }
    assert!(
        failures.is_empty(),
        "{failed} of {total} cases failed:\n{}",
        failures.join("\n")
    );
}

async fn gateway_case(
    capture: &Capture,
    call: Call,
    build: Build,
    upstream: Upstream,
    target: SocketAddr,
    server: Server,
) -> Vec<String> {
    let mut check = Check::new(format!(
        "[9 gateway, {call:?} upstream call, {build:?} request | g {upstream:?} upstream | {server:?} | V1]"
    ));
    let agent = format!("compositions/9/{call:?}/{build:?}/{upstream:?}/{server:?}");
    let outcomes = Outcomes::new();
    let upstream_outcomes = Outcomes::new();
    let state = Gateway {
        upstream: upstream_stack(&upstream_outcomes),
        uri: format!("http://{target}/up").parse().unwrap(),
        call,
        build,
    };
    let kit = Kit {
        outcomes: outcomes.clone(),
        limit: LONG,
        outer: LONG,
        retries: 0,
        body_idle: LONG,
        shutdown: Shutdown::new(LONG),
    };
    let app = Router::new()
        .route("/gw", get(gateway))
        .with_state(state)
        .layer(kit.stack(LONG));
    let addr = common::serve(server, app).await;

    let before_spans = capture.closed_spans().len();
    let before_upstream = capture.upstream_spans().len();
    let before_events = outcome_events(capture).len();

    let (status, proxy_status, expect) = match upstream {
        Upstream::Healthy => (StatusCode::OK, None, Expect::Completed(StatusCode::OK)),
        Upstream::BlackHole => {
            let status = StatusCode::from_u16(599).unwrap();
            let expect = Expect::ConnectTimeout {
                limit: CONNECT_LIMIT,
                status,
            };
            (status, Some(CONNECT_TIMEOUT_PROXY_STATUS), expect)
        }
        Upstream::Refused => (
            StatusCode::BAD_GATEWAY,
            Some(REFUSED_PROXY_STATUS),
            Expect::Refused,
        ),
    };
    match fetch(Http::V1, addr, "/gw", &agent).await {
        Ok(fetched) => {
            check.ensure(fetched.status == status, || {
                format!("the client got {}, expected {status}", fetched.status)
            });
            let got = fetched.headers.get(PROXY_STATUS);
            check.ensure(got.map(|v| v.to_str().unwrap()) == proxy_status, || {
                format!("Proxy-Status: expected {proxy_status:?}, got {got:?}")
            });
        }
        Err(error) => check.fail(error),
    }

    if !wait_until(|| !outcomes.all().is_empty() && !upstream_outcomes.all().is_empty()).await {
        check.fail(format!(
            "no report from the server's or the upstream's hooks within {SOON:?}"
        ));
    }
    if !wait_until(|| capture.closed_spans().len() > before_spans).await {
        check.fail(format!("no `request` span closed within {SOON:?}"));
    }
    tokio::time::sleep(GRACE).await;

    check_reports(&mut check, "server hooks", &outcomes.all(), &expect);
    check_reports(
        &mut check,
        "upstream hooks",
        &upstream_outcomes.all(),
        &expect,
    );

    let spans = capture.closed_spans()[before_spans..].to_vec();
    let binding = (upstream == Upstream::BlackHole).then_some(CONNECT_LIMIT);
    check_span(&mut check, &spans, &expect, binding);
    if let [span] = &spans[..] {
        check.ensure(agent_of(span) == Some(agent.as_str()), || {
            format!("the `request` span is not the client request's: {span:?}")
        });
    }
    let events = outcome_events(capture)[before_events..].to_vec();
    check_events(&mut check, &events, &expect);

    let upstream_spans = capture.upstream_spans()[before_upstream..].to_vec();
    check.ensure(upstream_spans.len() == 1, || {
        format!(
            "expected exactly one `{UPSTREAM_SPAN}` span, got {}: {:?}",
            upstream_spans.len(),
            summary(&upstream_spans)
        )
    });
    if let Some(span) = upstream_spans.first() {
        check.ensure(field(span, OTEL_KIND) == Some("client"), || {
            format!("the upstream span's otel.kind is not `client`: {span:?}")
        });
        if call != Call::Spawned || build == Build::Forwarded {
            let parent_agent = span
                .parent
                .as_ref()
                .and_then(|parent| parent.get(USER_AGENT_ORIGINAL));
            check.ensure(
                span.parent_name.as_deref() == Some(trace::SPAN_NAME)
                    && parent_agent == Some(&agent),
                || format!("the upstream span is not a child of the request's span: {span:?}"),
            );
        }
    }
    check.failures
}

#[tokio::test]
async fn gateway_awaited_forwarded_request() {
    gateway_cases(Call::Awaited, Build::Forwarded).await;
}

#[tokio::test]
async fn gateway_awaited_fresh_request() {
    gateway_cases(Call::Awaited, Build::Fresh).await;
}

#[tokio::test]
async fn gateway_spawned_forwarded_request() {
    gateway_cases(Call::Spawned, Build::Forwarded).await;
}

#[tokio::test]
async fn gateway_spawned_fresh_request() {
    gateway_cases(Call::Spawned, Build::Fresh).await;
}

#[tokio::test]
async fn gateway_spawned_instrumented_fresh_request() {
    gateway_cases(Call::SpawnedInstrumented, Build::Fresh).await;
}

// ---------------------------------------------------------------------------------------------
// 10-12: the body limits

#[tokio::test]
async fn request_body_limit_alone_answers_408_and_gives_no_signal() {
    matrix(&[&RB_ALONE]).await;
}

#[tokio::test]
async fn request_body_limit_outermost() {
    matrix(&[&RB_OUTSIDE]).await;
}

#[tokio::test]
async fn request_body_limit_inside_a_disconnect_layer() {
    matrix(&[&RB_INSIDE]).await;
}

#[tokio::test]
async fn request_body_limit_in_a_nested_router() {
    matrix(&[&RB_NESTED]).await;
}

#[tokio::test]
async fn request_body_limit_with_from_fn_between() {
    matrix(&[&RB_FROM_FN_BETWEEN]).await;
}

#[tokio::test]
async fn request_body_limit_under_trace_and_compression() {
    matrix(&[&RB_UNDER_TRACE_COMPRESSION]).await;
}

#[tokio::test]
async fn response_body_limit_alone_cuts_the_stream_and_gives_no_signal() {
    matrix(&[&SB_ALONE]).await;
}

#[tokio::test]
async fn response_body_limit_outermost() {
    matrix(&[&SB_OUTSIDE]).await;
}

#[tokio::test]
async fn response_body_limit_inside_a_disconnect_layer() {
    matrix(&[&SB_INSIDE]).await;
}

#[tokio::test]
async fn response_body_limit_in_a_nested_router() {
    matrix(&[&SB_NESTED]).await;
}

#[tokio::test]
async fn response_body_limit_with_from_fn_between() {
    matrix(&[&SB_FROM_FN_BETWEEN]).await;
}

#[tokio::test]
async fn response_body_limit_under_trace_and_compression() {
    matrix(&[&SB_UNDER_TRACE_COMPRESSION]).await;
}

#[tokio::test]
async fn every_layer_with_a_hook_one_service_builder() {
    matrix(&[&ALL_LAYERS_ONE_SERVICE_BUILDER]).await;
}

#[tokio::test]
async fn every_layer_with_a_hook_layer_calls() {
    matrix(&[&ALL_LAYERS_LAYER_CALLS]).await;
}

// ---------------------------------------------------------------------------------------------
// 13: the shutdown layer outermost

#[tokio::test]
async fn shutdown_layer_one_service_builder() {
    matrix(&[&SD_ONE_SERVICE_BUILDER]).await;
}

#[tokio::test]
async fn shutdown_layer_layer_calls() {
    matrix(&[&SD_LAYER_CALLS]).await;
}

#[tokio::test]
async fn shutdown_layer_outside_a_nested_router() {
    matrix(&[&SD_NESTED]).await;
}

#[tokio::test]
async fn shutdown_layer_with_from_fn_between() {
    matrix(&[&SD_FROM_FN_BETWEEN]).await;
}

#[tokio::test]
async fn shutdown_layer_under_trace_and_compression() {
    matrix(&[
        &SD_UNDER_TRACE_COMPRESSION_ONE_SERVICE_BUILDER,
        &SD_UNDER_TRACE_COMPRESSION_LAYER_CALLS,
    ])
    .await;
}

#[tokio::test]
async fn shutdown_layer_with_every_layer_with_a_hook() {
    matrix(&[
        &SD_ALL_LAYERS_ONE_SERVICE_BUILDER,
        &SD_ALL_LAYERS_LAYER_CALLS,
    ])
    .await;
}
