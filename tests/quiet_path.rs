//! The path with nothing to record into: no hook anywhere in the process and no tracing
//! subscriber. The layers then open no exchange (see `record`'s module docs) and act alone;
//! what users can still see (the response, the `ClientGone` signal, the handler being dropped)
//! must be what it is on the recording path, in the compositions where layers are called
//! lazily. Over real TCP on loopback, with every server. The body limits too: a stalled upload
//! answered 408, a stalled stream cut, and the handler's `ClientGone` cancelled as abandoned,
//! never as a client that left. A server's shutdown too: a request still running when the
//! grace ends answered 503 (`Connection: close` on HTTP/1.1), the handler dropped, and its
//! `ClientGone` cancelled for the server's shutdown.
//!
//! This file must configure no hook and set no subscriber: it is its own process for that.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::{from_fn, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tower::ServiceBuilder;
use tower_timeouts::signal::Cancelled;
use tower_timeouts::{
    ClientDisconnectLayer, ClientGone, RequestBodyTimeoutLayer, ResponseBodyTimeoutLayer,
    ResponseTimeoutLayer, Shutdown,
};

use common::{Live, SERVERS, SOON};

const SHORT: Duration = Duration::from_millis(200);
const LONG: Duration = Duration::from_secs(60);

/// What a stalled upload sends of its body, before it stalls.
const UPLOAD_SENT: &[u8] = b"the first part of an upload that stalls";
/// The one frame of a stalled stream, before it stalls.
const STREAM_FRAME: &[u8] = b"the first and only frame of a stream that stalls";

#[derive(Clone)]
struct Probe {
    live: Live,
    started: mpsc::UnboundedSender<()>,
    fired: mpsc::UnboundedSender<()>,
    /// The signals the handlers took.
    signals: Arc<Mutex<Vec<ClientGone>>>,
}

impl Probe {
    /// Takes the request's signal and watches it from a spawned task.
    fn take_signal(&self) {
        let gone = ClientGone::current().expect("a ClientDisconnectLayer is on the request");
        self.signals.lock().unwrap().push(gone.clone());
        let fired = self.fired.clone();
        tokio::spawn(async move {
            gone.gone().await;
            let _ = fired.send(());
        });
    }
}

/// Takes the request's signal, says it started, and never answers.
async fn slow(State(probe): State<Probe>) -> &'static str {
    let _live = probe.live.enter();
    probe.take_signal();
    let _ = probe.started.send(());
    std::future::pending::<()>().await;
    "never"
}

/// Takes the request's signal and reads the request body; a read that fails (a body limit
/// fired) is answered 400 with a body, as axum's extractors answer.
async fn upload(
    State(probe): State<Probe>,
    request: Request,
) -> Result<String, (StatusCode, &'static str)> {
    let _live = probe.live.enter();
    probe.take_signal();
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
    let _live = probe.live.enter();
    probe.take_signal();
    let body = request.into_body().collect().await;
    let body = body.map_err(|_| StatusCode::BAD_REQUEST)?;
    Ok(format!("{} bytes", body.to_bytes().len()))
}

/// Takes the request's signal and answers with a stream of one frame that then stalls, live
/// until the stream is dropped.
async fn stream(State(probe): State<Probe>) -> Response {
    let live = probe.live.enter();
    probe.take_signal();
    let frames = futures_util::stream::unfold((live, false), |(live, sent)| async move {
        if sent {
            std::future::pending::<()>().await;
        }
        let frame = Ok::<_, Infallible>(Bytes::from_static(STREAM_FRAME));
        Some((frame, (live, true)))
    });
    Response::new(Body::from_stream(frames))
}

type Placement = fn(Router<Probe>) -> Router<Probe>;

/// The timeout outside the disconnect layer, in two `Router::layer` calls: the inner layer is
/// called lazily, from the outer one's poll.
fn timeout_outside(routes: Router<Probe>) -> Router<Probe> {
    routes
        .layer(ClientDisconnectLayer::new())
        .layer(ResponseTimeoutLayer::new(SHORT))
}

/// The stack applied twice, the outer limit the smaller.
fn stack_twice(routes: Router<Probe>) -> Router<Probe> {
    let stack = |limit| {
        ServiceBuilder::new()
            .layer(ClientDisconnectLayer::new())
            .layer(ResponseTimeoutLayer::new(limit))
    };
    routes.route_layer(stack(LONG)).layer(stack(SHORT))
}

/// tower-http's timeout between two disconnect layers: it drops what it wraps when it fires.
fn foreign_timeout_between(routes: Router<Probe>) -> Router<Probe> {
    let foreign =
        tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::GATEWAY_TIMEOUT, SHORT);
    routes
        .layer(ClientDisconnectLayer::new())
        .layer(foreign)
        .layer(ClientDisconnectLayer::new())
}

const PLACEMENTS: [(&str, Placement); 3] = [
    ("timeout outside", timeout_outside),
    ("stack twice", stack_twice),
    ("tower-http timeout between", foreign_timeout_between),
];

fn request_body_limit() -> RequestBodyTimeoutLayer {
    RequestBodyTimeoutLayer::new().idle(SHORT).total(LONG)
}

fn response_body_limit() -> ResponseBodyTimeoutLayer {
    ResponseBodyTimeoutLayer::new().idle(SHORT).total(LONG)
}

/// The body limits inside the disconnect layer, which is applied in a `Router::layer` call of
/// its own.
fn body_limits_inside(routes: Router<Probe>) -> Router<Probe> {
    routes
        .layer(request_body_limit())
        .layer(response_body_limit())
        .layer(ClientDisconnectLayer::new())
}

/// The body limits outside the disconnect layer, each in a `Router::layer` call of its own: the
/// inner layers are called lazily, from the outer ones' polls.
fn body_limits_outside(routes: Router<Probe>) -> Router<Probe> {
    routes
        .layer(ClientDisconnectLayer::new())
        .layer(response_body_limit())
        .layer(request_body_limit())
}

async fn pass(request: Request, next: Next) -> Response {
    next.run(request).await
}

/// axum's `from_fn` between the body limits and the disconnect layer.
fn from_fn_between(routes: Router<Probe>) -> Router<Probe> {
    routes
        .layer(request_body_limit())
        .layer(response_body_limit())
        .layer(from_fn(pass))
        .layer(ClientDisconnectLayer::new())
}

const BODY_PLACEMENTS: [(&str, Placement); 3] = [
    ("body limits inside", body_limits_inside),
    ("body limits outside", body_limits_outside),
    ("from_fn between", from_fn_between),
];

struct App {
    addr: std::net::SocketAddr,
    live: Live,
    started: mpsc::UnboundedReceiver<()>,
    fired: mpsc::UnboundedReceiver<()>,
    signals: Arc<Mutex<Vec<ClientGone>>>,
}

async fn app(
    server: common::Server,
    placement: impl FnOnce(Router<Probe>) -> Router<Probe>,
) -> App {
    let (started, started_rx) = mpsc::unbounded_channel();
    let (fired, fired_rx) = mpsc::unbounded_channel();
    let live = Live::new();
    let signals = Arc::default();
    let probe = Probe {
        live: live.clone(),
        started,
        fired,
        signals: Arc::clone(&signals),
    };
    let routes = Router::new()
        .route("/slow", get(slow))
        .route("/upload", post(upload))
        .route("/upload-empty-answer", post(upload_empty_answer))
        .route("/stream", get(stream));
    let router = placement(routes).with_state(probe);
    App {
        addr: common::serve(server, router).await,
        live,
        started: started_rx,
        fired: fired_rx,
        signals,
    }
}

/// No signal fired, after the handler is gone (the signal would have fired before that).
async fn assert_no_signal(app: &mut App, case: &str) {
    app.live.wait_zero().await;
    tokio::task::yield_now().await;
    assert!(app.fired.try_recv().is_err(), "{case}: ClientGone fired");
}

/// The handler's signal, once the handler is gone: cancelled as abandoned, and never fired.
async fn assert_abandoned(app: &mut App, case: &str) {
    assert_no_signal(app, case).await;
    let signals = app.signals.lock().unwrap().clone();
    assert_eq!(signals.len(), 1, "{case}: the handler took one signal");
    for gone in signals {
        let cancelled = timeout(SOON, gone.cancelled()).await;
        assert_eq!(cancelled, Ok(Cancelled::Abandoned), "{case}: cancelled");
        assert_eq!(gone.reason(), Some(Cancelled::Abandoned), "{case}: reason");
        assert!(!gone.is_gone(), "{case}: the client did not leave");
    }
}

/// A POST whose body stalls after [`UPLOAD_SENT`] of the megabyte its head announces, on a raw
/// socket; the answer, read until the server closes the connection.
async fn stalled_upload(addr: std::net::SocketAddr, path: &str, case: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let head =
        format!("POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: 1048576\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(UPLOAD_SENT).await.unwrap();
    read_to_close(&mut stream, case).await
}

/// What `stream` receives until the server closes it (within [`SOON`]).
async fn read_to_close(stream: &mut TcpStream, case: &str) -> String {
    let mut received = Vec::new();
    let closed = timeout(SOON, async {
        let mut chunk = [0; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) => return,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
                // A reset is a close too; what came before it is read already.
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => return,
                Err(error) => panic!("{case}: {error}"),
            }
        }
    })
    .await;
    let answer = String::from_utf8_lossy(&received).into_owned();
    assert!(
        closed.is_ok(),
        "{case}: the connection still open after {SOON:?}, having read {answer:?}"
    );
    answer
}

/// 408 with `Connection: close` for a stalled upload to `path`, and the handler's signal
/// abandoned, in every body placement on both servers.
async fn stalled_uploads(path: &str) {
    assert!(!tracing::dispatcher::has_been_set());
    for server in SERVERS {
        for (name, placement) in BODY_PLACEMENTS {
            let case = format!("{name} on {server:?}");
            let mut app = app(server, placement).await;
            let answer = stalled_upload(app.addr, path, &case).await;
            let (head, _) = answer
                .split_once("\r\n\r\n")
                .unwrap_or_else(|| panic!("{case}: an incomplete answer {answer:?}"));
            let mut lines = head.split("\r\n");
            let status_line = lines.next().unwrap_or_default();
            assert!(
                status_line.starts_with("HTTP/1.1 408 "),
                "{case}: expected 408, got {head:?}"
            );
            assert!(
                lines.any(|line| line.eq_ignore_ascii_case("connection: close")),
                "{case}: expected `connection: close`, got {head:?}"
            );
            assert_abandoned(&mut app, &case).await;
        }
    }
}

#[tokio::test]
async fn a_stalled_upload_gets_408_and_close_and_its_signal_is_abandoned() {
    stalled_uploads("/upload").await;
}

/// The same, the handler answering its failed read with an empty 400, complete at its head:
/// with the body limits outside the disconnect layer, no body is left to follow, so the
/// request-body layer itself tells the signal when its limit fires.
#[tokio::test]
async fn a_stalled_upload_answered_empty_by_the_handler_has_its_signal_abandoned() {
    stalled_uploads("/upload-empty-answer").await;
}

#[tokio::test]
async fn a_stalled_stream_is_cut_and_its_signal_is_abandoned() {
    assert!(!tracing::dispatcher::has_been_set());
    for server in SERVERS {
        for (name, placement) in BODY_PLACEMENTS {
            for http2 in [false, true] {
                let case = format!("{name} on {server:?}, HTTP/2: {http2}");
                let mut app = app(server, placement).await;
                let request = common::get(app.addr, "/stream");
                let exchange = async {
                    let response = if http2 {
                        common::h2(app.addr).await.send_request(request).await
                    } else {
                        common::h1(app.addr).await.send_request(request).await
                    };
                    let response = response.unwrap_or_else(|error| panic!("{case}: {error}"));
                    assert_eq!(response.status(), StatusCode::OK, "{case}");
                    let mut body = response.into_body();
                    let mut received = Vec::new();
                    loop {
                        match body.frame().await {
                            None => panic!("{case}: the stream ended cleanly: not cut"),
                            Some(Ok(frame)) => {
                                if let Ok(data) = frame.into_data() {
                                    received.extend_from_slice(&data);
                                }
                            }
                            Some(Err(_)) => return received,
                        }
                    }
                };
                let received = timeout(SOON, exchange)
                    .await
                    .unwrap_or_else(|_| panic!("{case}: the stream not cut within {SOON:?}"));
                assert_eq!(received, STREAM_FRAME, "{case}: the frame before the cut");
                assert_abandoned(&mut app, &case).await;
            }
        }
    }
}

type ShutdownPlacement = fn(&Shutdown, Router<Probe>) -> Router<Probe>;

/// The shutdown layer outermost in one `ServiceBuilder`.
fn shutdown_one_service_builder(shutdown: &Shutdown, routes: Router<Probe>) -> Router<Probe> {
    routes.layer(
        ServiceBuilder::new()
            .layer(shutdown.layer())
            .layer(ClientDisconnectLayer::new())
            .layer(ResponseTimeoutLayer::new(LONG)),
    )
}

/// Each layer in a `Router::layer` call of its own, axum's `from_fn` between the shutdown layer
/// and the rest: the inner layers are called lazily, from the outer ones' polls.
fn shutdown_from_fn_between(shutdown: &Shutdown, routes: Router<Probe>) -> Router<Probe> {
    routes
        .layer(ResponseTimeoutLayer::new(LONG))
        .layer(ClientDisconnectLayer::new())
        .layer(from_fn(pass))
        .layer(shutdown.layer())
}

const SHUTDOWN_PLACEMENTS: [(&str, ShutdownPlacement); 2] = [
    (
        "shutdown layer in one ServiceBuilder",
        shutdown_one_service_builder,
    ),
    ("shutdown layer, from_fn between", shutdown_from_fn_between),
];

#[tokio::test]
async fn a_request_running_when_the_grace_ends_gets_503_and_close_and_its_signal_says_shutdown() {
    assert!(!tracing::dispatcher::has_been_set());
    for server in SERVERS {
        for (name, placement) in SHUTDOWN_PLACEMENTS {
            for http2 in [false, true] {
                let case = format!("{name} on {server:?}, HTTP/2: {http2}");
                let shutdown = Shutdown::new(LONG);
                let mut app = app(server, |routes| placement(&shutdown, routes)).await;
                if http2 {
                    let mut send = common::h2(app.addr).await;
                    let response = send.send_request(common::get(app.addr, "/slow"));
                    let mut response = Box::pin(response);
                    tokio::select! {
                        _ = &mut response => panic!("{case}: answered before the grace ended"),
                        started = timeout(SOON, app.started.recv()) => {
                            started.unwrap_or_else(|_| panic!("{case}: the handler did not start"));
                        }
                    }
                    shutdown.end_grace();
                    let response = timeout(SOON, response)
                        .await
                        .unwrap_or_else(|_| panic!("{case}: no answer"))
                        .unwrap_or_else(|error| panic!("{case}: {error}"));
                    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{case}");
                } else {
                    let mut stream = TcpStream::connect(app.addr).await.unwrap();
                    stream
                        .write_all(b"GET /slow HTTP/1.1\r\nhost: localhost\r\n\r\n")
                        .await
                        .unwrap();
                    timeout(SOON, app.started.recv())
                        .await
                        .unwrap_or_else(|_| panic!("{case}: the handler did not start"));
                    shutdown.end_grace();
                    // Read until the server closes the connection, as it must after the 503.
                    let answer = read_to_close(&mut stream, &case).await;
                    let (head, _) = answer
                        .split_once("\r\n\r\n")
                        .unwrap_or_else(|| panic!("{case}: an incomplete answer {answer:?}"));
                    let mut lines = head.split("\r\n");
                    let status_line = lines.next().unwrap_or_default();
                    assert!(
                        status_line.starts_with("HTTP/1.1 503 "),
                        "{case}: expected 503, got {head:?}"
                    );
                    assert!(
                        lines.any(|line| line.eq_ignore_ascii_case("connection: close")),
                        "{case}: expected `connection: close`, got {head:?}"
                    );
                }
                // The handler is dropped; its signal says why, and never that the client left.
                assert_no_signal(&mut app, &case).await;
                let signals = app.signals.lock().unwrap().clone();
                assert_eq!(signals.len(), 1, "{case}: the handler took one signal");
                for gone in signals {
                    let cancelled = timeout(SOON, gone.cancelled()).await;
                    assert_eq!(
                        cancelled,
                        Ok(Cancelled::ServerShutdown),
                        "{case}: cancelled"
                    );
                    assert_eq!(gone.reason(), Some(Cancelled::ServerShutdown), "{case}");
                    assert!(!gone.is_gone(), "{case}: the client did not leave");
                }
            }
        }
    }
}

#[tokio::test]
async fn a_timeout_is_never_a_client_leaving() {
    assert!(!tracing::dispatcher::has_been_set());
    for server in SERVERS {
        for (name, placement) in PLACEMENTS {
            let case = format!("{name} on {server:?}");
            let mut app = app(server, placement).await;
            let mut client = common::h1(app.addr).await;
            let response = timeout(SOON, client.send_request(common::get(app.addr, "/slow")))
                .await
                .unwrap_or_else(|_| panic!("{case}: no answer"))
                .unwrap();
            assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT, "{case}");
            assert_no_signal(&mut app, &case).await;
        }
    }
}

#[tokio::test]
async fn a_client_that_leaves_fires_the_signal_and_stops_the_handler() {
    assert!(!tracing::dispatcher::has_been_set());
    for server in SERVERS {
        for (name, placement) in PLACEMENTS {
            for http2 in [false, true] {
                let case = format!("{name} on {server:?}, HTTP/2: {http2}");
                let mut app = app(server, placement).await;
                if http2 {
                    let mut send = common::h2(app.addr).await;
                    let response = send.send_request(common::get(app.addr, "/slow"));
                    let mut response = Box::pin(response);
                    tokio::select! {
                        _ = &mut response => panic!("{case}: answered"),
                        _ = app.started.recv() => {}
                    }
                    // RST_STREAM CANCEL.
                    drop(response);
                } else {
                    let mut stream = TcpStream::connect(app.addr).await.unwrap();
                    stream
                        .write_all(b"GET /slow HTTP/1.1\r\nhost: localhost\r\n\r\n")
                        .await
                        .unwrap();
                    timeout(SOON, app.started.recv()).await.unwrap();
                    drop(stream);
                }
                timeout(SOON, app.fired.recv())
                    .await
                    .unwrap_or_else(|_| panic!("{case}: ClientGone did not fire"));
                app.live.wait_zero().await;
            }
        }
    }
}
