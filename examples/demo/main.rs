//! Run with: cargo run --features axum --example demo
//!
//! Starts an axum server (its connections watched by `WatchedListener`) with
//! `ClientDisconnectLayer` (outermost), `RequestBodyTimeoutLayer`,
//! `ResponseBodyTimeoutLayer` and `ResponseTimeoutLayer` (and `DetachLayer` on `/detached`),
//! then plays each scenario against it with a real client and prints what the client saw next
//! to what the layers recorded. Exits with status 1 if anything differs from what is expected.
//!
//! The `/upstream/…` routes forward to three upstreams the demo starts on loopback, through a
//! hyper-util `Client` whose connector is wrapped in `ConnectTimeoutLayer`, with
//! `UpstreamFailureLayer` and a `ResponseTimeoutLayer` around the client:
//!
//! - a black hole (an accept queue that is full: connects hang) → 599 `connection_timeout`;
//! - a bound socket that never listens (connects are refused) → 502 `connection_refused`;
//! - a listener that never accepts (connects succeed, nobody answers) → 504
//!   `http_response_timeout`.
//!
//! Then a shutdown (see `shutdown.rs`): three slow requests in flight, a grace that runs out,
//! a 503 for each and `server_shutdown` recorded, never a 499.
//!
//! Then the gRPC scenarios (see `grpc.rs`), played with tonic's client against tonic servers
//! and a gRPC gateway: what a gRPC client gets for each outcome, and what is recorded.
//!
//! Set `RUST_LOG` (to anything) to also see the crate's WARN events on stderr.

mod grpc;
#[path = "../../tests/probe/mod.rs"]
mod probe;
mod shutdown;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRef, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http::{header, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Empty};
use hyper::ext::ReasonPhrase;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_stream::StreamExt;
use tower::{Layer, ServiceBuilder, ServiceExt};
use tower_timeouts::detach::Finished;
use tower_timeouts::response::PROXY_STATUS;
use tower_timeouts::watch::WatchedListener;
use tower_timeouts::{
    ClientDisconnectLayer, ClientGone, ConnectTimeout, ConnectTimeoutLayer, DetachLayer, Outcome,
    Report, RequestBodyTimeoutLayer, ResponseBodyTimeoutLayer, ResponseTimeout,
    ResponseTimeoutLayer, UpstreamFailure, UpstreamFailureLayer,
};

/// The server's limit on every response. Longer than the upstream routes' own limits below:
/// each hop gives up a little before the hop outside it, so the inner one can say why.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);
/// The limit on connecting to an upstream (`ConnectTimeoutLayer`).
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
/// The limit on an upstream's response head, connect included (the inner
/// `ResponseTimeoutLayer`).
const UPSTREAM_RESPONSE_TIMEOUT: Duration = Duration::from_millis(300);
/// How long `/slow` would take if nothing stopped it.
const SLOW_HANDLER: Duration = Duration::from_secs(5);
/// The longest wait for the next frame of a request body (`RequestBodyTimeoutLayer`).
const UPLOAD_IDLE: Duration = Duration::from_millis(200);
/// The longest wait for the next frame of a response body (`ResponseBodyTimeoutLayer`).
const STREAM_IDLE: Duration = Duration::from_millis(200);
/// How long `/detached` works; it runs to its end even when its client leaves.
const DETACHED_WORK: Duration = Duration::from_millis(300);
/// The bound on detached work (`DetachLayer`), counted from when its client left.
const DETACH_LIMIT: Duration = Duration::from_secs(5);
/// The body the unread upload announces, and the part of it the client sends before leaving:
/// more than hyper reads with the head, so it leaves hyper blind to the close.
const UPLOAD_ANNOUNCED: usize = 1024 * 1024;
const UPLOAD_SENT: usize = 64 * 1024;
/// The bound on every single wait of the driver (a response, an outcome, a signal).
const WAIT: Duration = Duration::from_secs(2);
/// The bound on the whole demo.
const WHOLE_DEMO: Duration = Duration::from_secs(30);

/// The scenarios, played in order. Each one names how the client behaves and what must follow.
const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "fast",
        client: ClientAction::Get("/fast"),
        expect: Expect {
            client_status: Some(200),
            reason: Some("OK"),
            kind: "completed",
            recorded_status: 200,
            error_type: None,
            proxy_status: None,
            client_gone_fires: false,
            limit: None,
            detached_finishes: false,
        },
    },
    Scenario {
        name: "slow",
        client: ClientAction::Get("/slow"),
        expect: Expect {
            client_status: Some(504),
            reason: Some("Gateway Timeout"),
            kind: "response_timeout",
            recorded_status: 504,
            error_type: Some("http_response_timeout"),
            proxy_status: Some("tower-timeouts; error=http_response_timeout"),
            client_gone_fires: false,
            limit: Some(RESPONSE_TIMEOUT),
            detached_finishes: false,
        },
    },
    Scenario {
        name: "gone",
        client: ClientAction::LeaveOnceStarted("/hang"),
        expect: Expect {
            client_status: None,
            reason: None,
            kind: "client_disconnected",
            recorded_status: 499,
            error_type: Some("client_disconnected"),
            proxy_status: None,
            client_gone_fires: true,
            limit: None,
            detached_finishes: false,
        },
    },
    Scenario {
        name: "gone, detached",
        client: ClientAction::LeaveOnceStarted("/detached"),
        expect: Expect {
            client_status: None,
            reason: None,
            kind: "client_disconnected",
            recorded_status: 499,
            error_type: Some("client_disconnected"),
            proxy_status: None,
            client_gone_fires: true,
            limit: None,
            detached_finishes: true,
        },
    },
    Scenario {
        name: "gone, body unread",
        client: ClientAction::LeaveUploadOnceStarted("/hang"),
        expect: Expect {
            client_status: None,
            reason: None,
            kind: "client_disconnected",
            recorded_status: 499,
            error_type: Some("client_disconnected"),
            proxy_status: None,
            client_gone_fires: true,
            limit: None,
            detached_finishes: false,
        },
    },
    // The body phase.
    Scenario {
        name: "stalled upload",
        client: ClientAction::StallUpload("/upload"),
        expect: Expect {
            client_status: Some(408),
            reason: Some("Request Timeout"),
            kind: "request_body_timeout",
            recorded_status: 408,
            error_type: Some("request_body_timeout"),
            proxy_status: Some("tower-timeouts; error=http_request_error; status-code=408"),
            client_gone_fires: false,
            limit: Some(UPLOAD_IDLE),
            detached_finishes: false,
        },
    },
    Scenario {
        name: "stalled stream",
        client: ClientAction::ReadStream("/stream"),
        expect: Expect {
            client_status: Some(200),
            reason: Some("OK"),
            kind: "response_body_timeout",
            recorded_status: 200,
            error_type: Some("response_body_timeout"),
            proxy_status: None,
            client_gone_fires: false,
            limit: Some(STREAM_IDLE),
            detached_finishes: false,
        },
    },
    // The upstream side: the handler forwards to an upstream on loopback.
    Scenario {
        name: "upstream blackhole",
        client: ClientAction::Get("/upstream/blackhole"),
        expect: Expect {
            client_status: Some(599),
            // 599 has no canonical reason phrase: the crate's `hyper` feature (on by default)
            // gives it one, and without it hyper writes `<none>`.
            reason: Some(if cfg!(feature = "hyper") {
                "Network Connect Timeout Error"
            } else {
                "<none>"
            }),
            kind: "connect_timeout",
            recorded_status: 599,
            error_type: Some("connection_timeout"),
            proxy_status: Some("tower-timeouts; error=connection_timeout"),
            client_gone_fires: false,
            limit: Some(UPSTREAM_CONNECT_TIMEOUT),
            detached_finishes: false,
        },
    },
    Scenario {
        name: "upstream refused",
        client: ClientAction::Get("/upstream/refused"),
        expect: Expect {
            client_status: Some(502),
            reason: Some("Bad Gateway"),
            kind: "connect_failed",
            recorded_status: 502,
            error_type: Some("connection_refused"),
            proxy_status: Some("tower-timeouts; error=connection_refused"),
            client_gone_fires: false,
            limit: None,
            detached_finishes: false,
        },
    },
    Scenario {
        name: "upstream silent",
        client: ClientAction::Get("/upstream/silent"),
        expect: Expect {
            client_status: Some(504),
            reason: Some("Gateway Timeout"),
            kind: "response_timeout",
            recorded_status: 504,
            error_type: Some("http_response_timeout"),
            proxy_status: Some("tower-timeouts; error=http_response_timeout"),
            client_gone_fires: false,
            limit: Some(UPSTREAM_RESPONSE_TIMEOUT),
            detached_finishes: false,
        },
    },
];

struct Scenario {
    name: &'static str,
    client: ClientAction,
    expect: Expect,
}

enum ClientAction {
    /// `GET path` with hyper-util's client, reading the whole response.
    Get(&'static str),
    /// `GET path` over a raw socket, closed as soon as the handler has started.
    LeaveOnceStarted(&'static str),
    /// `POST path` over a raw socket with part of a large body, which the handler never reads,
    /// closed as soon as the handler has started: hyper does not see that close, the watcher
    /// does.
    LeaveUploadOnceStarted(&'static str),
    /// `POST path` over a raw socket, with half of its body, then nothing more; reads the
    /// answer until the server closes the connection.
    StallUpload(&'static str),
    /// `GET path` with hyper-util's client, reading the body until it ends or is cut.
    ReadStream(&'static str),
}

struct Expect {
    /// The status the client receives; `None` when it leaves before any response.
    client_status: Option<u16>,
    /// The reason phrase on the status line the client receives (HTTP/1.1).
    reason: Option<&'static str>,
    /// [`Outcome::kind`] of the one recorded outcome.
    kind: &'static str,
    /// [`Outcome::recorded_status`].
    recorded_status: u16,
    /// [`Outcome::error_type`].
    error_type: Option<&'static str>,
    /// The `Proxy-Status` header the client receives.
    proxy_status: Option<&'static str>,
    /// Whether the request's `ClientGone` signal fires.
    client_gone_fires: bool,
    /// For a timeout: the limit that fired, which tells whose timeout it was.
    limit: Option<Duration>,
    /// Whether a detached handler runs to its end after the client left.
    detached_finishes: bool,
}

// ---------------------------------------------------------------------------------------------
// The server: an ordinary axum app. Only `Probe` is demo plumbing, so the driver can watch.
// ---------------------------------------------------------------------------------------------

/// What the hook records for one request.
struct Recorded {
    outcome: Outcome,
    elapsed: Duration,
}

/// What the handlers tell the driver.
enum Event {
    /// A handler started; it hands over its request's signal so the driver can check it.
    Started {
        route: &'static str,
        gone: ClientGone,
    },
    /// Work a handler spawned saw the `ClientGone` signal fire.
    WorkCancelled { route: &'static str, at: Instant },
    /// Detached work ended after its client left (`DetachLayer::on_finish`).
    Detached { finished: Finished, at: Instant },
}

#[derive(Clone)]
struct Probe {
    events: mpsc::UnboundedSender<Event>,
}

impl Probe {
    fn send(&self, event: Event) {
        // The driver outlives the server's work; a send can only fail at exit.
        let _ = self.events.send(event);
    }
}

/// The client side of the upstream routes. Its error type is `Infallible`: every failure to
/// reach the upstream is already a response.
type Upstream = UpstreamFailure<ResponseTimeout<HttpClient<ConnectTimeout<HttpConnector>, Body>>>;

/// The hyper-util client, its connector timed by `ConnectTimeoutLayer`, with
/// `UpstreamFailureLayer` outside `ResponseTimeoutLayer`: the client's errors become 599 / 502
/// responses, and an upstream that accepts but does not answer gets a 504.
fn upstream() -> Upstream {
    let connector = ConnectTimeoutLayer::new(UPSTREAM_CONNECT_TIMEOUT).layer(HttpConnector::new());
    let client = HttpClient::builder(TokioExecutor::new()).build(connector);
    ServiceBuilder::new()
        .layer(UpstreamFailureLayer::new())
        .layer(ResponseTimeoutLayer::new(UPSTREAM_RESPONSE_TIMEOUT))
        .service(client)
}

#[derive(Clone)]
struct Gateway {
    upstream: Upstream,
    /// Each `/upstream/…` route and the base URI of the upstream it forwards to.
    targets: Arc<[(&'static str, Uri)]>,
}

#[derive(Clone)]
struct AppState {
    probe: Probe,
    gateway: Gateway,
}

impl FromRef<AppState> for Probe {
    fn from_ref(state: &AppState) -> Self {
        state.probe.clone()
    }
}

impl FromRef<AppState> for Gateway {
    fn from_ref(state: &AppState) -> Self {
        state.gateway.clone()
    }
}

fn app(state: AppState, outcomes: mpsc::UnboundedSender<Recorded>) -> Router {
    let probe = state.probe.clone();
    // Only `/detached` runs to its end when its client leaves: a layer on that route alone.
    let detach = DetachLayer::new(DETACH_LIMIT).on_finish(move |finished: &Finished| {
        probe.send(Event::Detached {
            finished: finished.clone(),
            at: Instant::now(),
        });
    });
    Router::new()
        .route("/fast", get(fast))
        .route("/slow", get(slow))
        .route("/hang", get(hang).post(hang))
        .route("/detached", get(detached).layer(detach))
        .route("/upload", post(upload))
        .route("/stream", get(stream))
        .route("/upstream/{target}", get(forward))
        .layer(
            ServiceBuilder::new()
                // Outermost, so that a dropped future really is a client that left. Its hook is
                // called once per request, whatever the outcome.
                .layer(
                    ClientDisconnectLayer::new().on_outcome(move |report: &Report<'_>| {
                        let _ = outcomes.send(Recorded {
                            outcome: report.outcome().clone(),
                            elapsed: report.elapsed(),
                        });
                    }),
                )
                // A client too slow to send its body gets 408; a stream that stalls is cut.
                .layer(RequestBodyTimeoutLayer::new().idle(UPLOAD_IDLE))
                .layer(ResponseBodyTimeoutLayer::new().idle(STREAM_IDLE))
                .layer(ResponseTimeoutLayer::new(RESPONSE_TIMEOUT)),
        )
        .with_state(state)
}

async fn fast(State(probe): State<Probe>) -> &'static str {
    let gone = ClientGone::current().expect("under ClientDisconnectLayer");
    probe.send(Event::Started {
        route: "/fast",
        gone,
    });
    "fast\n"
}

async fn slow(State(probe): State<Probe>) -> &'static str {
    let gone = ClientGone::current().expect("under ClientDisconnectLayer");
    probe.send(Event::Started {
        route: "/slow",
        gone,
    });
    tokio::time::sleep(SLOW_HANDLER).await;
    "slow\n"
}

async fn hang(State(probe): State<Probe>) -> &'static str {
    let gone = ClientGone::current().expect("under ClientDisconnectLayer");
    // This handler's own future is dropped when its client leaves; work it spawned is not, so
    // that work watches the signal and stops itself.
    let work = probe.clone();
    let signal = gone.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = signal.gone() => work.send(Event::WorkCancelled { route: "/hang", at: Instant::now() }),
            () = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    });
    probe.send(Event::Started {
        route: "/hang",
        gone,
    });
    std::future::pending().await
}

/// Work that must not be cut in half: it runs to its end under `DetachLayer`, even when its
/// client leaves; `ClientGone` still fires, for work that may stop.
async fn detached(State(probe): State<Probe>) -> &'static str {
    let gone = ClientGone::current().expect("under ClientDisconnectLayer");
    let work = probe.clone();
    let signal = gone.clone();
    tokio::spawn(async move {
        signal.gone().await;
        work.send(Event::WorkCancelled {
            route: "/detached",
            at: Instant::now(),
        });
    });
    probe.send(Event::Started {
        route: "/detached",
        gone,
    });
    tokio::time::sleep(DETACHED_WORK).await;
    "done\n"
}

/// Reads the whole upload, as axum's `Bytes` extractor would, and answers 400 when reading
/// fails, as it would: the layer answers 408 in its place when the client stalls.
async fn upload(State(probe): State<Probe>, body: Body) -> Response {
    let gone = ClientGone::current().expect("under ClientDisconnectLayer");
    probe.send(Event::Started {
        route: "/upload",
        gone,
    });
    match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => format!("{} bytes\n", bytes.len()).into_response(),
        Err(_) => (
            StatusCode::BAD_REQUEST,
            "Failed to buffer the request body\n",
        )
            .into_response(),
    }
}

/// An event stream that sends one event and then stalls.
async fn stream(State(probe): State<Probe>) -> Response {
    let gone = ClientGone::current().expect("under ClientDisconnectLayer");
    probe.send(Event::Started {
        route: "/stream",
        gone,
    });
    let events = tokio_stream::iter([Ok::<_, Infallible>(Bytes::from_static(b"data: 1\n\n"))])
        .chain(tokio_stream::pending());
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(events),
    )
        .into_response()
}

/// Forwards the request to the upstream its path names and answers with what came back.
async fn forward(
    State(probe): State<Probe>,
    State(gateway): State<Gateway>,
    request: Request,
) -> Response {
    let gone = ClientGone::current().expect("under ClientDisconnectLayer");
    let path = request.uri().path();
    let Some((route, base)) = gateway.targets.iter().find(|(route, _)| *route == path) else {
        return (StatusCode::NOT_FOUND, "no such upstream\n").into_response();
    };
    probe.send(Event::Started { route, gone });
    // Forward this very request, not a new one: its extensions carry the exchange that
    // `ClientDisconnectLayer` opened, so the upstream layers record into the same request (one
    // span, one outcome) instead of opening their own.
    let (mut parts, body) = request.into_parts();
    parts.uri = base.clone();
    // The connector speaks HTTP/1.1 whatever the client spoke; the client sets `Host` from the
    // URI.
    parts.version = Version::HTTP_11;
    parts.headers.remove(header::HOST);
    let response = gateway
        .upstream
        .oneshot(Request::from_parts(parts, body))
        .await
        .unwrap_or_else(|never: Infallible| match never {});
    response.map(Body::new)
}

// ---------------------------------------------------------------------------------------------
// The upstreams: three sockets on loopback that each fail in their own way.
// ---------------------------------------------------------------------------------------------

/// The upstreams' addresses, and the sockets that make them behave: held for the whole demo.
struct Upstreams {
    blackhole: SocketAddr,
    refused: SocketAddr,
    silent: SocketAddr,
    _held: (TcpListener, TcpStream, TcpSocket, TcpListener),
}

async fn start_upstreams() -> Result<Upstreams, String> {
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let io = |what: &'static str| move |e: std::io::Error| format!("{what}: {e}");

    // A black hole: an accept queue of length 0, filled by one connect that is never accepted.
    // The kernel then drops every further SYN, so a connect hangs until someone gives up.
    let socket = TcpSocket::new_v4().map_err(io("black hole socket"))?;
    socket.bind(loopback).map_err(io("black hole bind"))?;
    let full = socket.listen(0).map_err(io("black hole listen"))?;
    let blackhole = full.local_addr().map_err(io("black hole address"))?;
    let filler = timeout(WAIT, TcpStream::connect(blackhole))
        .await
        .map_err(|_| format!("the black hole's filler did not connect within {WAIT:?}"))?
        .map_err(io("the black hole's filler"))?;

    // Refused: a port that is bound (so nobody else gets it) but not listening.
    let refusing = TcpSocket::new_v4().map_err(io("refusing socket"))?;
    refusing.bind(loopback).map_err(io("refusing bind"))?;
    let refused = refusing.local_addr().map_err(io("refusing address"))?;

    // Silent: a listener with room in its backlog that never accepts. Connects succeed, the
    // request is sent, and nothing ever answers.
    let quiet = TcpListener::bind(loopback)
        .await
        .map_err(io("silent listener"))?;
    let silent = quiet.local_addr().map_err(io("silent address"))?;

    Ok(Upstreams {
        blackhole,
        refused,
        silent,
        _held: (full, filler, refusing, quiet),
    })
}

// ---------------------------------------------------------------------------------------------
// The driver: plays the scenarios and compares.
// ---------------------------------------------------------------------------------------------

struct Driver {
    addr: SocketAddr,
    client: HttpClient<HttpConnector, Empty<Bytes>>,
    events: mpsc::UnboundedReceiver<Event>,
    outcomes: mpsc::UnboundedReceiver<Recorded>,
}

/// One printed line, and what did not match.
struct Row {
    name: &'static str,
    seen: String,
    recorded: String,
    problems: Vec<String>,
}

/// What the client part of a scenario observed.
struct Seen {
    status: Option<http::StatusCode>,
    /// The reason phrase on the status line.
    reason: Option<String>,
    proxy_status: Option<String>,
    /// When the client closed its socket, for a client that leaves.
    left_at: Option<Instant>,
    text: String,
}

impl Driver {
    async fn play(&mut self, scenario: &Scenario) -> Row {
        let mut row = Row {
            name: scenario.name,
            seen: "(nothing)".to_owned(),
            recorded: "(nothing)".to_owned(),
            problems: Vec::new(),
        };
        let expect = &scenario.expect;

        let played = match self.run_client(&scenario.client).await {
            Ok(played) => Some(played),
            Err(problem) => {
                row.problems.push(problem);
                None
            }
        };
        if let Some((seen, _)) = &played {
            row.seen = seen.text.clone();
            if seen.status.map(|s| s.as_u16()) != expect.client_status {
                row.problems.push(format!(
                    "the client should have seen {}, it saw {}",
                    status_text(expect.client_status),
                    status_text(seen.status.map(|s| s.as_u16())),
                ));
            }
            if seen.reason.as_deref() != expect.reason {
                row.problems.push(format!(
                    "the reason phrase should be {:?}, it was {:?}",
                    expect.reason, seen.reason
                ));
            }
            if seen.proxy_status.as_deref() != expect.proxy_status {
                row.problems.push(format!(
                    "Proxy-Status should be {:?}, it was {:?}",
                    expect.proxy_status, seen.proxy_status
                ));
            }
        }

        // Even when the client part failed, show what the server recorded of it.
        match timeout(WAIT, self.outcomes.recv()).await {
            Ok(Some(recorded)) => {
                row.recorded = recorded.describe();
                row.problems.extend(recorded.mismatches(expect));
            }
            _ => row
                .problems
                .push(format!("no outcome was recorded within {WAIT:?}")),
        }

        if let Some((seen, gone)) = &played {
            if expect.client_gone_fires {
                match timeout(WAIT, self.events.recv()).await {
                    Ok(Some(Event::WorkCancelled { route, at })) => {
                        row.recorded.push_str(&format!(
                            "; ClientGone fired, seen by {route}'s spawned work"
                        ));
                        if let Some(left_at) = seen.left_at {
                            let after = at.saturating_duration_since(left_at);
                            row.recorded
                                .push_str(&format!(" {} after the client left", ms(after)));
                        }
                    }
                    _ => row.problems.push(format!(
                        "the spawned work did not see ClientGone fire within {WAIT:?}"
                    )),
                }
            } else if gone.is_gone() {
                row.problems
                    .push("ClientGone fired, but the client did not leave".to_owned());
            }
        }

        if let (true, Some((seen, _))) = (expect.detached_finishes, &played) {
            match timeout(WAIT, self.events.recv()).await {
                Ok(Some(Event::Detached { finished, at })) => {
                    row.recorded.push_str(&format!("; detached: {finished:?}"));
                    if let Some(left_at) = seen.left_at {
                        let after = at.saturating_duration_since(left_at);
                        row.recorded
                            .push_str(&format!(" {} after the client left", ms(after)));
                    }
                    if !matches!(finished, Finished::Completed { .. }) {
                        row.problems.push(format!(
                            "the detached handler should complete: {finished:?}"
                        ));
                    }
                }
                _ => row.problems.push(format!(
                    "the detached handler did not finish within {WAIT:?}"
                )),
            }
        }

        // Whatever is left belongs to this scenario: report it here, not in the next one.
        row.problems.extend(self.leftovers());
        row
    }

    /// Plays the client's part; returns what it saw and the signal of the request it made.
    async fn run_client(&mut self, action: &ClientAction) -> Result<(Seen, ClientGone), String> {
        match *action {
            ClientAction::Get(path) => {
                let uri: http::Uri = format!("http://{}{path}", self.addr)
                    .parse()
                    .map_err(|e| format!("bad uri for {path}: {e}"))?;
                let response = timeout(WAIT, self.client.get(uri))
                    .await
                    .map_err(|_| format!("no response to GET {path} within {WAIT:?}"))?
                    .map_err(|e| format!("GET {path} failed: {e}"))?;
                let status = response.status();
                // hyper's client keeps a reason phrase that is not the status's canonical one
                // (599 has none) in this extension.
                let reason = match response.extensions().get::<ReasonPhrase>() {
                    Some(reason) => Some(String::from_utf8_lossy(reason.as_bytes()).into_owned()),
                    None => status.canonical_reason().map(str::to_owned),
                };
                let proxy_status = response
                    .headers()
                    .get(PROXY_STATUS)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
                // Read the body to its end: only then is the request complete.
                timeout(WAIT, response.into_body().collect())
                    .await
                    .map_err(|_| format!("the body of GET {path} did not end within {WAIT:?}"))?
                    .map_err(|e| format!("reading the body of GET {path} failed: {e}"))?;
                let mut text = status.as_u16().to_string();
                if let Some(reason) = &reason {
                    text.push_str(&format!(" {reason}"));
                }
                if let Some(value) = &proxy_status {
                    text.push_str(&format!(", Proxy-Status: {value}"));
                }
                let gone = self.started(path).await?;
                Ok((
                    Seen {
                        status: Some(status),
                        reason,
                        proxy_status,
                        left_at: None,
                        text,
                    },
                    gone,
                ))
            }
            ClientAction::StallUpload(path) => self.stall_upload(path).await,
            ClientAction::ReadStream(path) => self.read_stream(path).await,
            ClientAction::LeaveOnceStarted(path) | ClientAction::LeaveUploadOnceStarted(path) => {
                let mut stream = self.connect().await?;
                let (method, request) = match action {
                    ClientAction::LeaveOnceStarted(_) => (
                        "GET",
                        format!("GET {path} HTTP/1.1\r\nhost: {}\r\n\r\n", self.addr).into_bytes(),
                    ),
                    _ => {
                        let head = format!(
                            "POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: {UPLOAD_ANNOUNCED}\r\n\r\n",
                            self.addr
                        );
                        ("POST", [head.as_bytes(), &[b'x'; UPLOAD_SENT]].concat())
                    }
                };
                stream
                    .write_all(&request)
                    .await
                    .map_err(|e| format!("sending {method} {path} failed: {e}"))?;
                // Leave only once the handler runs: a signal from the handler, not a guess.
                let gone = self.started(path).await?;
                let left_at = Instant::now();
                drop(stream);
                Ok((
                    Seen {
                        status: None,
                        reason: None,
                        proxy_status: None,
                        left_at: Some(left_at),
                        text: format!("no response: it left while {method} {path} ran"),
                    },
                    gone,
                ))
            }
        }
    }

    async fn connect(&self) -> Result<TcpStream, String> {
        let stream = timeout(WAIT, TcpStream::connect(self.addr))
            .await
            .map_err(|_| format!("connecting took more than {WAIT:?}"))?
            .map_err(|e| format!("connect failed: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("set_nodelay: {e}"))?;
        Ok(stream)
    }

    /// Sends half of an upload and stalls; reads what comes back until the server closes.
    async fn stall_upload(&mut self, path: &'static str) -> Result<(Seen, ClientGone), String> {
        let mut stream = self.connect().await?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: 2000\r\n\r\n",
            self.addr
        );
        stream
            .write_all(head.as_bytes())
            .await
            .and(stream.write_all(&[b'x'; 1000]).await)
            .map_err(|e| format!("sending POST {path} failed: {e}"))?;
        let gone = self.started(path).await?;
        let mut raw = Vec::new();
        timeout(WAIT, stream.read_to_end(&mut raw))
            .await
            .map_err(|_| format!("the server kept the connection of POST {path} open"))?
            .map_err(|e| format!("reading the answer to POST {path} failed: {e}"))?;
        let raw = String::from_utf8_lossy(&raw);
        let mut lines = raw.lines();
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ').skip(1);
        let status = parts.next().and_then(|code| code.parse().ok());
        let reason = parts.next().map(str::to_owned);
        let header = |name: &str| {
            raw.lines()
                .take_while(|line| !line.is_empty())
                .find_map(|line| {
                    let (key, value) = line.split_once(':')?;
                    key.eq_ignore_ascii_case(name)
                        .then(|| value.trim().to_owned())
                })
        };
        let proxy_status = header("proxy-status");
        let mut text = format!(
            "{status_line}, Proxy-Status: {}",
            proxy_status.as_deref().unwrap_or("-")
        );
        if header("connection").as_deref() == Some("close") {
            text.push_str(", Connection: close, then the server closed");
        }
        Ok((
            Seen {
                status,
                reason,
                proxy_status,
                left_at: None,
                text: text.replace("HTTP/1.1 ", ""),
            },
            gone,
        ))
    }

    /// Reads a stream until it ends or is cut.
    async fn read_stream(&mut self, path: &'static str) -> Result<(Seen, ClientGone), String> {
        let uri: http::Uri = format!("http://{}{path}", self.addr)
            .parse()
            .map_err(|e| format!("bad uri for {path}: {e}"))?;
        let response = timeout(WAIT, self.client.get(uri))
            .await
            .map_err(|_| format!("no response to GET {path} within {WAIT:?}"))?
            .map_err(|e| format!("GET {path} failed: {e}"))?;
        let status = response.status();
        let gone = self.started(path).await?;
        let mut body = response.into_body();
        let mut bytes = 0;
        let end = loop {
            match timeout(WAIT, body.frame()).await {
                Err(_) => {
                    return Err(format!(
                        "GET {path}: the stream was not cut within {WAIT:?}"
                    ))
                }
                Ok(None) => break "then it ended",
                Ok(Some(Ok(frame))) => bytes += frame.data_ref().map_or(0, Bytes::len),
                Ok(Some(Err(_))) => break "then the connection was cut",
            }
        };
        Ok((
            Seen {
                status: Some(status),
                reason: status.canonical_reason().map(str::to_owned),
                proxy_status: None,
                left_at: None,
                text: format!("{} OK, {bytes} bytes, {end}", status.as_u16()),
            },
            gone,
        ))
    }

    /// Waits for the handler of `route` to say it started.
    async fn started(&mut self, route: &str) -> Result<ClientGone, String> {
        match timeout(WAIT, self.events.recv()).await {
            Ok(Some(Event::Started { route: r, gone })) if r == route => Ok(gone),
            Ok(Some(Event::Started { route: r, .. })) => {
                Err(format!("expected the handler of {route} to start, {r} did"))
            }
            Ok(Some(Event::WorkCancelled { route: r, .. })) => Err(format!(
                "expected the handler of {route} to start, work of {r} was cancelled instead"
            )),
            Ok(Some(Event::Detached { finished, .. })) => Err(format!(
                "expected the handler of {route} to start, detached work ended instead: {finished:?}"
            )),
            _ => Err(format!(
                "the handler of {route} did not start within {WAIT:?}"
            )),
        }
    }

    /// What arrived beyond what the scenario accounted for: an extra outcome would break "one
    /// outcome per request".
    fn leftovers(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        while let Ok(recorded) = self.outcomes.try_recv() {
            problems.push(format!(
                "an extra outcome was recorded: {:?}",
                recorded.outcome
            ));
        }
        while let Ok(event) = self.events.try_recv() {
            match event {
                Event::WorkCancelled { route, .. } => {
                    problems.push(format!("ClientGone fired unexpectedly for {route}"));
                }
                Event::Detached { finished, .. } => {
                    problems.push(format!("detached work ended unexpectedly: {finished:?}"));
                }
                Event::Started { .. } => {}
            }
        }
        problems
    }
}

impl Recorded {
    /// `completed (200) in 0.4 ms`, `response_timeout (504) error.type=… in 200.9 ms`.
    fn describe(&self) -> String {
        let outcome = &self.outcome;
        let status = outcome
            .recorded_status()
            .map_or_else(|| "-".to_owned(), |s| s.as_u16().to_string());
        let error_type = outcome
            .error_type()
            .map_or_else(String::new, |e| format!(" error.type={e}"));
        let limit = limit_of(outcome).map_or_else(String::new, |l| format!(" limit={l:?}"));
        format!(
            "{} ({status}){error_type}{limit} in {}",
            outcome.kind(),
            ms(self.elapsed)
        )
    }

    fn mismatches(&self, expect: &Expect) -> Vec<String> {
        let outcome = &self.outcome;
        let mut problems = Vec::new();
        if outcome.kind() != expect.kind {
            problems.push(format!(
                "the outcome should be {}, it was {outcome:?}",
                expect.kind
            ));
        }
        let recorded_status = outcome.recorded_status().map(|s| s.as_u16());
        if recorded_status != Some(expect.recorded_status) {
            problems.push(format!(
                "the recorded status should be {}, it was {recorded_status:?}",
                expect.recorded_status
            ));
        }
        if outcome.error_type() != expect.error_type {
            problems.push(format!(
                "error.type should be {:?}, it was {:?}",
                expect.error_type,
                outcome.error_type()
            ));
        }
        if limit_of(outcome) != expect.limit {
            problems.push(format!(
                "the limit that fired should be {:?}, it was {:?}",
                expect.limit,
                limit_of(outcome)
            ));
        }
        problems
    }
}

/// The limit a timeout outcome names.
fn limit_of(outcome: &Outcome) -> Option<Duration> {
    match outcome {
        Outcome::ResponseTimeout { timeout, .. }
        | Outcome::RequestBodyTimeout { timeout, .. }
        | Outcome::ResponseBodyTimeout { timeout, .. } => Some(*timeout),
        Outcome::ConnectTimeout { timeout, .. } => *timeout,
        _ => None,
    }
}

fn status_text(status: Option<u16>) -> String {
    match status.map(http::StatusCode::from_u16) {
        None => "no response".to_owned(),
        Some(Ok(status)) => match status.canonical_reason() {
            Some(reason) => format!("{} {reason}", status.as_u16()),
            None => status.as_u16().to_string(),
        },
        Some(Err(_)) => "an invalid status".to_owned(),
    }
}

fn ms(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

async fn run() -> Result<Vec<Row>, String> {
    let (events_tx, events) = mpsc::unbounded_channel();
    let (outcomes_tx, outcomes) = mpsc::unbounded_channel();
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot listen on 127.0.0.1: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("no local address: {e}"))?;
    let upstreams = start_upstreams().await?;
    let base = |addr: SocketAddr| -> Result<Uri, String> {
        format!("http://{addr}/")
            .parse()
            .map_err(|e| format!("bad upstream uri for {addr}: {e}"))
    };
    let gateway = Gateway {
        upstream: upstream(),
        targets: Arc::new([
            ("/upstream/blackhole", base(upstreams.blackhole)?),
            ("/upstream/refused", base(upstreams.refused)?),
            ("/upstream/silent", base(upstreams.silent)?),
        ]),
    };
    let state = AppState {
        probe: Probe { events: events_tx },
        gateway,
    };
    let app = app(state, outcomes_tx);
    tokio::spawn(async move {
        // Watched: a client that leaves with its body unread is seen too.
        if let Err(error) = axum::serve(WatchedListener::new(listener), app).await {
            eprintln!("server error: {error}");
        }
    });
    println!(
        "axum on {addr}: ClientDisconnectLayer (outermost) + RequestBodyTimeoutLayer(idle {} ms) \
         + ResponseBodyTimeoutLayer(idle {} ms) + ResponseTimeoutLayer({} ms); \
         /detached: DetachLayer({} ms)",
        UPLOAD_IDLE.as_millis(),
        STREAM_IDLE.as_millis(),
        RESPONSE_TIMEOUT.as_millis(),
        DETACH_LIMIT.as_millis()
    );
    println!(
        "/upstream/*: UpstreamFailureLayer + ResponseTimeoutLayer({} ms) + hyper-util Client, \
         connector ConnectTimeoutLayer({} ms)",
        UPSTREAM_RESPONSE_TIMEOUT.as_millis(),
        UPSTREAM_CONNECT_TIMEOUT.as_millis()
    );
    println!(
        "upstreams: black hole {} (accept queue full), refused {} (bound, not listening), \
         silent {} (never accepts)\n",
        upstreams.blackhole, upstreams.refused, upstreams.silent
    );

    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let mut driver = Driver {
        addr,
        client: HttpClient::builder(TokioExecutor::new()).build(connector),
        events,
        outcomes,
    };
    let mut rows = Vec::with_capacity(SCENARIOS.len());
    for scenario in SCENARIOS {
        rows.push(driver.play(scenario).await);
    }
    rows.push(shutdown::run().await?);
    rows.extend(grpc::run(upstreams.blackhole).await?);
    drop(upstreams);
    Ok(rows)
}

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_writer(std::io::stderr)
            .init();
    }

    let rows = match timeout(WHOLE_DEMO, run()).await {
        Ok(Ok(rows)) => rows,
        Ok(Err(problem)) => {
            eprintln!("demo FAILED: {problem}");
            return ExitCode::FAILURE;
        }
        Err(_) => {
            eprintln!("demo FAILED: it did not finish within {WHOLE_DEMO:?}");
            return ExitCode::FAILURE;
        }
    };

    let name_width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0);
    let seen_width = rows.iter().map(|r| r.seen.len()).max().unwrap_or(0);
    for row in &rows {
        println!(
            "{:name_width$}  client saw {:seen_width$}  recorded {}",
            row.name, row.seen, row.recorded
        );
    }
    let problems: Vec<String> = rows
        .iter()
        .flat_map(|row| {
            row.problems
                .iter()
                .map(move |p| format!("{}: {p}", row.name))
        })
        .collect();
    if problems.is_empty() {
        println!("\nall {} scenarios behaved as expected", rows.len());
        ExitCode::SUCCESS
    } else {
        eprintln!("\ndemo FAILED:");
        for problem in &problems {
            eprintln!("  {problem}");
        }
        ExitCode::FAILURE
    }
}
