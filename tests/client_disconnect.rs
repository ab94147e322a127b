//! Clients that leave, over real TCP on loopback: what `ClientDisconnectLayer` records when a
//! client goes before the head or during the body, what it must never take for a disconnect,
//! and the limits of what hyper lets it see (see the `client_disconnect` module docs).
//!
//! Run with `cargo test --test client_disconnect -- --nocapture` to see the measured latency
//! from a client's close to the recorded outcome.

mod common;

use std::cell::RefCell;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use common::{Capture, Captured, Live, Outcomes, Server, SERVERS, SOON};
use futures_util::stream;
use http::header::CONTENT_LENGTH;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tower::util::MapRequestLayer;
use tower::ServiceBuilder;
use tower_timeouts::trace::{ERROR_TYPE, HTTP_RESPONSE_STATUS_CODE, OUTCOME, RECORDED_STATUS};
use tower_timeouts::{
    ClientDisconnectLayer, ClientGone, Outcome, Phase, Report, ResponseTimeoutLayer,
};
use tracing::{Dispatch, Level};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

/// Runs per case: enough to catch a flaky false positive or a rare missed disconnect.
const RUNS: usize = 20;
/// A generous bound from the client's close to the recorded outcome (hyper takes < 1 ms).
const WITHIN: Duration = Duration::from_secs(1);
/// How long the handlers with a bounded end work.
const BOUNDED: Duration = Duration::from_millis(300);
/// The one chunk the never-ending stream sends.
const CHUNK: &[u8] = b"the first and only chunk of a stream that never ends";
/// The request body the upload client announces; it sends only [`PARTIAL`] bytes of it.
const UPLOAD_LEN: usize = 1024 * 1024;
const PARTIAL: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// The app and what its handlers report.

/// The handlers' side of the harness: they report to the test through these.
#[derive(Clone)]
struct Probe {
    live: Live,
    started: mpsc::UnboundedSender<&'static str>,
    gone: mpsc::UnboundedSender<&'static str>,
    finished: mpsc::UnboundedSender<&'static str>,
}

impl Probe {
    /// Spawns work that outlives the handler and reports when the client-gone signal fires.
    fn watch(&self, gone: ClientGone, what: &'static str) {
        let report = self.gone.clone();
        tokio::spawn(async move {
            gone.gone().await;
            let _ = report.send(what);
        });
    }
}

/// The test's side: one per server.
struct Harness {
    outcomes: Outcomes,
    stamps: Stamps,
    live: Live,
    started: mpsc::UnboundedReceiver<&'static str>,
    gone: mpsc::UnboundedReceiver<&'static str>,
    finished: mpsc::UnboundedReceiver<&'static str>,
    /// The client-gone signal of every request, as the layer put it into the extensions.
    signals: Signals,
}

/// Every request's [`ClientGone`].
#[derive(Clone, Default)]
struct Signals(Arc<Mutex<Vec<ClientGone>>>);

impl Signals {
    /// How many requests had a signal, and how many of those fired.
    fn fired(&self) -> (usize, usize) {
        let signals = self.0.lock().unwrap();
        let fired = signals.iter().filter(|gone| gone.is_gone()).count();
        (signals.len(), fired)
    }
}

/// When the hook was called, in order.
#[derive(Clone, Default)]
struct Stamps(Arc<Mutex<Vec<Instant>>>);

impl Stamps {
    fn get(&self, index: usize) -> Instant {
        self.0.lock().unwrap()[index]
    }
}

impl Harness {
    /// The app behind the documented stack: `ClientDisconnectLayer` outermost, a (long)
    /// `ResponseTimeoutLayer` inside.
    fn new() -> (Harness, Router) {
        let outcomes = Outcomes::new();
        let stamps = Stamps::default();
        let live = Live::new();
        let (started_tx, started) = mpsc::unbounded_channel();
        let (gone_tx, gone) = mpsc::unbounded_channel();
        let (finished_tx, finished) = mpsc::unbounded_channel();
        let probe = Probe {
            live: live.clone(),
            started: started_tx,
            gone: gone_tx,
            finished: finished_tx,
        };
        let signals = Signals::default();
        let collected = signals.clone();
        // Asks for every request's signal (made on first use), to check that only the
        // requests whose client left fire theirs.
        let collect = MapRequestLayer::new(move |request: Request<Body>| {
            collected.0.lock().unwrap().extend(ClientGone::current());
            request
        });
        let hook = outcomes.hook();
        let stamped = stamps.clone();
        let disconnect = ClientDisconnectLayer::new().on_outcome(move |report: &Report<'_>| {
            // Stamped first: once `Outcomes::wait_for` returns, the stamp is there.
            stamped.0.lock().unwrap().push(Instant::now());
            hook(report);
        });
        let app = Router::new()
            .route("/slow", get(slow))
            .route("/stream", get(endless_stream))
            .route("/full", get(|| async { "hello, world" }))
            .route("/empty", get(|| async { Body::empty() }))
            .route("/no-content", get(|| async { StatusCode::NO_CONTENT }))
            .route("/not-modified", get(|| async { StatusCode::NOT_MODIFIED }))
            .route("/sized", get(sized_stream))
            .route("/chunked", get(chunked_stream))
            .route("/panic", get(panics))
            .route("/upload", post(upload))
            .route("/bounded", get(bounded))
            .route("/hold", post(hold))
            .with_state(probe)
            .layer(
                ServiceBuilder::new()
                    .layer(disconnect)
                    .layer(ResponseTimeoutLayer::new(Duration::from_secs(60)))
                    .layer(collect),
            );
        let harness = Harness {
            outcomes,
            stamps,
            live,
            started,
            gone,
            finished,
            signals,
        };
        (harness, app)
    }
}

/// Never answers; marks itself live and spawns work that waits for the client-gone signal.
async fn slow(State(probe): State<Probe>) -> &'static str {
    let gone = ClientGone::current().expect("under ClientDisconnectLayer");
    let _live = probe.live.enter();
    probe.watch(gone, "slow");
    let _ = probe.started.send("slow");
    std::future::pending::<()>().await;
    "never"
}

/// Sends one chunk, then waits forever; the body is live until it is dropped.
async fn endless_stream(State(probe): State<Probe>) -> Body {
    let gone = ClientGone::current().expect("under ClientDisconnectLayer");
    probe.watch(gone, "stream");
    let live = probe.live.enter();
    Body::from_stream(stream::unfold((live, true), |(live, first)| async move {
        if !first {
            std::future::pending::<()>().await;
        }
        Some((
            Ok::<_, Infallible>(Bytes::from_static(CHUNK)),
            (live, false),
        ))
    }))
}

const SIZED: [&[u8]; 2] = [b"sized part one, ", b"sized part two"];

/// A stream body with an exact, user-set `content-length`.
async fn sized_stream() -> Response<Body> {
    let len: usize = SIZED.iter().map(|part| part.len()).sum();
    let parts = stream::iter(SIZED.map(|part| Ok::<_, Infallible>(Bytes::from_static(part))));
    Response::builder()
        .header(CONTENT_LENGTH, len)
        .body(Body::from_stream(parts))
        .unwrap()
}

const CHUNKED: [&[u8]; 3] = [b"chunk one, ", b"chunk two, ", b"chunk three"];

/// A stream body of unknown size that ends (chunked on HTTP/1.1).
async fn chunked_stream() -> Body {
    Body::from_stream(stream::iter(
        CHUNKED.map(|part| Ok::<_, Infallible>(Bytes::from_static(part))),
    ))
}

async fn panics() -> &'static str {
    panic!("this handler panics on purpose")
}

/// Holds its request body without reading it, works for a bounded time, then answers.
async fn upload(State(probe): State<Probe>, body: Body) -> &'static str {
    let _live = probe.live.enter();
    let _ = probe.started.send("upload");
    tokio::time::sleep(BOUNDED).await;
    drop(body);
    let _ = probe.finished.send("upload");
    "uploaded"
}

/// Holds its request body without reading it and never answers.
async fn hold(State(probe): State<Probe>, body: Body) -> &'static str {
    let gone = ClientGone::current().expect("under ClientDisconnectLayer");
    let _live = probe.live.enter();
    probe.watch(gone, "hold");
    let _ = probe.started.send("hold");
    std::future::pending::<()>().await;
    drop(body);
    "never"
}

/// Works for a bounded time, then answers.
async fn bounded(State(probe): State<Probe>) -> &'static str {
    let _live = probe.live.enter();
    let _ = probe.started.send("bounded");
    tokio::time::sleep(BOUNDED).await;
    let _ = probe.finished.send("bounded");
    "finished"
}

// ---------------------------------------------------------------------------------------------
// Clients and waiting.

/// Receives the next report from a handler (panics after [`SOON`]).
async fn next(rx: &mut mpsc::UnboundedReceiver<&'static str>, what: &str) -> &'static str {
    tokio::time::timeout(SOON, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no `{what}` report within {SOON:?}"))
        .expect("the app is alive")
}

async fn raw_connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Reads until `needle` has arrived (panics on EOF or after [`SOON`]).
async fn read_until(stream: &mut TcpStream, needle: &[u8]) -> Vec<u8> {
    let mut seen = Vec::new();
    tokio::time::timeout(SOON, async {
        let mut buf = [0; 4096];
        while !seen.windows(needle.len()).any(|window| window == needle) {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "EOF before {:?}", String::from_utf8_lossy(needle));
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {:?} within {SOON:?}", String::from_utf8_lossy(needle)));
    seen
}

/// Reads until EOF (panics after [`SOON`]).
async fn read_to_end(stream: &mut TcpStream) -> Vec<u8> {
    let mut seen = Vec::new();
    tokio::time::timeout(SOON, stream.read_to_end(&mut seen))
        .await
        .expect("EOF in time")
        .unwrap();
    seen
}

/// How an HTTP/1.1 client leaves.
#[derive(Clone, Copy, Debug)]
enum H1Leave {
    /// Closes its socket: FIN.
    Fin,
    /// Closes its socket with `SO_LINGER` 0: RST.
    Rst,
}

impl H1Leave {
    fn close(self, stream: TcpStream) {
        if let H1Leave::Rst = self {
            // `set_zero_linger` would need tokio 1.50; a zero linger never blocks the drop.
            #[allow(deprecated)]
            stream.set_linger(Some(Duration::ZERO)).unwrap();
        }
        drop(stream);
    }
}

/// How an HTTP/2 client leaves.
#[derive(Clone, Copy, Debug)]
enum H2Leave {
    /// Drops the response future or body: `RST_STREAM CANCEL`, the connection stays open.
    ResetStream,
    /// Closes its TCP connection (FIN) under the streams, with no `RST_STREAM` or `GOAWAY`.
    CloseConnection,
}

/// An h2c (prior knowledge) client, and the means to close its TCP connection.
///
/// Ending hyper's client connection task would not do: hyper drives the h2 connection in a task
/// of its own, which shuts down gracefully once the streams are done.
async fn h2_client(addr: SocketAddr) -> (http2::SendRequest<Empty<Bytes>>, Closer) {
    let closer = Closer(Arc::new(Mutex::new(Some(raw_connect(addr).await))));
    let io = TokioIo::new(ClosableIo(closer.clone()));
    let (send, conn) = http2::handshake(TokioExecutor::new(), io).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, closer)
}

/// Closes a client's socket under the client.
#[derive(Clone)]
struct Closer(Arc<Mutex<Option<TcpStream>>>);

impl Closer {
    /// Drops the socket: the kernel sends a FIN at once. The client then reads EOF and fails
    /// its writes.
    fn close(&self) {
        drop(self.0.lock().unwrap().take());
    }
}

/// A client's socket that a [`Closer`] can close.
struct ClosableIo(Closer);

impl AsyncRead for ClosableIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.0 .0.lock().unwrap().as_mut() {
            Some(stream) => Pin::new(stream).poll_read(cx, buf),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl AsyncWrite for ClosableIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.0 .0.lock().unwrap().as_mut() {
            Some(stream) => Pin::new(stream).poll_write(cx, buf),
            None => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.0 .0.lock().unwrap().as_mut() {
            Some(stream) => Pin::new(stream).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.0 .0.lock().unwrap().as_mut() {
            Some(stream) => Pin::new(stream).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

/// Serves `app` with hyper-util's auto server, HTTP/1 `half_close(true)`.
async fn serve_half_close(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for _ in 0..1000 {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            stream.set_nodelay(true).unwrap();
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder.http1().half_close(true);
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

// ---------------------------------------------------------------------------------------------
// Assertions and figures.

fn is_completed(outcome: &Outcome, expected: StatusCode) -> bool {
    matches!(outcome, Outcome::Completed { status, .. } if *status == expected)
}

fn assert_gone_before_head(outcome: &Outcome) {
    assert!(
        matches!(
            outcome,
            Outcome::ClientDisconnected {
                phase: Phase::BeforeHead,
                sent_status: None,
                bytes_sent: 0,
                ..
            }
        ),
        "expected a disconnect before the head, got {outcome:?}"
    );
    assert_eq!(outcome.recorded_status().map(|s| s.as_u16()), Some(499));
}

fn assert_gone_during_body(outcome: &Outcome) {
    let expected_bytes = CHUNK.len() as u64;
    assert!(
        matches!(
            outcome,
            Outcome::ClientDisconnected {
                phase: Phase::DuringBody,
                sent_status: Some(StatusCode::OK),
                bytes_sent,
                ..
            } if *bytes_sent == expected_bytes
        ),
        "expected a disconnect during the body after {expected_bytes} bytes, got {outcome:?}"
    );
    assert_eq!(outcome.recorded_status(), Some(StatusCode::OK));
}

fn field<'a>(span: &'a Captured, name: &str) -> Option<&'a str> {
    span.fields.get(name).map(String::as_str)
}

/// The span of a client gone before the head: a recorded 499, no status sent.
fn assert_span_gone_before_head(span: &Captured) {
    assert_eq!(
        field(span, OUTCOME),
        Some("client_disconnected"),
        "{span:?}"
    );
    assert_eq!(
        field(span, ERROR_TYPE),
        Some("client_disconnected"),
        "{span:?}"
    );
    assert_eq!(field(span, RECORDED_STATUS), Some("499"), "{span:?}");
    assert_eq!(field(span, HTTP_RESPONSE_STATUS_CODE), None, "{span:?}");
}

/// The span of a client gone during a 200's body.
fn assert_span_gone_during_body(span: &Captured) {
    assert_eq!(
        field(span, OUTCOME),
        Some("client_disconnected"),
        "{span:?}"
    );
    assert_eq!(
        field(span, ERROR_TYPE),
        Some("client_disconnected"),
        "{span:?}"
    );
    assert_eq!(field(span, RECORDED_STATUS), Some("200"), "{span:?}");
    assert_eq!(
        field(span, HTTP_RESPONSE_STATUS_CODE),
        Some("200"),
        "{span:?}"
    );
}

/// The events of outcome `kind` emitted so far.
fn events_of(capture: &Capture, kind: &str) -> Vec<Captured> {
    capture
        .events()
        .into_iter()
        .filter(|event| field(event, OUTCOME) == Some(kind))
        .collect()
}

/// `min / median / max` of some latencies.
fn figures(latencies: &mut [Duration]) -> String {
    latencies.sort();
    let n = latencies.len();
    format!(
        "min {:?} / median {:?} / max {:?} over {n} runs",
        latencies[0],
        latencies[n / 2],
        latencies[n - 1]
    )
}

/// Waits for the `index`-th outcome (0-based) and returns it with the time from `closed` to
/// its record, asserted under [`WITHIN`].
async fn outcome_after(harness: &Harness, index: usize, closed: Instant) -> (Outcome, Duration) {
    let outcome = harness.outcomes.wait_for(index + 1).await[index].clone();
    let latency = harness.stamps.get(index).saturating_duration_since(closed);
    assert!(
        latency < WITHIN,
        "{outcome:?} recorded {latency:?} after the client left"
    );
    (outcome, latency)
}

/// Installs a [`Capture`] of the crate's spans and events only, as this thread's default: the
/// h2 and hyper trace events would only slow the server down.
///
/// Every test of this file that runs the crate installs one, even when it checks no span:
/// tracing caches each callsite's interest globally, and while only one subscriber is
/// registered, a callsite first hit on a thread without a default is cached as "never", so
/// the other tests would silently lose the crate's spans or events (seen once under load).
fn capture() -> (Capture, tracing::subscriber::DefaultGuard) {
    let capture = Capture::default();
    let only_ours = Targets::new().with_target("tower_timeouts", Level::TRACE);
    let subscriber = tracing_subscriber::registry().with(capture.clone().with_filter(only_ours));
    (capture, tracing::subscriber::set_default(subscriber))
}

/// After a disconnect: the spawned work saw the signal, and the handler (or body) was dropped.
async fn assert_signalled_and_dropped(harness: &mut Harness, what: &str) {
    assert_eq!(next(&mut harness.gone, "client gone").await, what);
    harness.live.wait_zero().await;
}

// ---------------------------------------------------------------------------------------------
// b. HTTP/1.1: the client closes its socket while the handler works.

#[tokio::test(flavor = "current_thread")]
async fn http1_close_before_head_records_499_cancels_and_signals() {
    let (capture, _guard) = capture();
    let mut spans = 0;
    let mut disconnects = 0;
    for server in SERVERS {
        let (mut harness, app) = Harness::new();
        let addr = common::serve(server, app).await;
        for leave in [H1Leave::Fin, H1Leave::Rst] {
            let mut latencies = Vec::new();
            for _ in 0..RUNS {
                let mut client = raw_connect(addr).await;
                client
                    .write_all(b"GET /slow HTTP/1.1\r\nhost: localhost\r\n\r\n")
                    .await
                    .unwrap();
                assert_eq!(next(&mut harness.started, "handler started").await, "slow");
                assert_eq!(harness.live.count(), 1);

                let closed = Instant::now();
                leave.close(client);
                let (outcome, latency) = outcome_after(&harness, disconnects, closed).await;
                assert_gone_before_head(&outcome);
                latencies.push(latency);
                assert_signalled_and_dropped(&mut harness, "slow").await;

                disconnects += 1;
                spans += 1;
                let closed_spans = capture.wait_spans(spans).await;
                assert_span_gone_before_head(&closed_spans[spans - 1]);
            }
            eprintln!(
                "HTTP/1.1 {server:?} {leave:?}: close -> 499 recorded: {}",
                figures(&mut latencies)
            );
        }
        assert_eq!(harness.outcomes.all().len(), disconnects);
        disconnects = 0;
    }
    let events = events_of(&capture, "client_disconnected");
    assert_eq!(events.len(), spans);
    for event in events {
        assert_eq!(field(&event, RECORDED_STATUS), Some("499"), "{event:?}");
        assert_eq!(event.parent.unwrap().get("url.path").unwrap(), "/slow");
    }
}

// ---------------------------------------------------------------------------------------------
// c. HTTP/2: the client resets the stream (or closes the connection) while the handler works.

#[tokio::test(flavor = "current_thread")]
async fn http2_reset_before_head_records_499_cancels_and_signals() {
    let (capture, _guard) = capture();
    let mut spans = 0;
    for server in SERVERS {
        let (mut harness, app) = Harness::new();
        let addr = common::serve(server, app).await;
        let mut disconnects = 0;
        for leave in [H2Leave::ResetStream, H2Leave::CloseConnection] {
            let mut latencies = Vec::new();
            // One connection for all the stream resets: it must stay usable.
            let (mut shared, _shared_closer) = h2_client(addr).await;
            for _ in 0..RUNS {
                let (mut send, closer) = match leave {
                    H2Leave::ResetStream => (shared.clone(), None),
                    H2Leave::CloseConnection => {
                        let (send, closer) = h2_client(addr).await;
                        (send, Some(closer))
                    }
                };
                let mut response = Box::pin(send.send_request(common::get(addr, "/slow")));
                tokio::select! {
                    result = &mut response => panic!("/slow answered: {result:?}"),
                    started = next(&mut harness.started, "handler started") => {
                        assert_eq!(started, "slow");
                    }
                }
                assert_eq!(harness.live.count(), 1);

                let closed = Instant::now();
                // On a closed connection the response future is kept until the outcome, so
                // that only the close can have told the server.
                let kept = match closer {
                    None => {
                        drop(response);
                        None
                    }
                    Some(closer) => {
                        closer.close();
                        Some(response)
                    }
                };
                let (outcome, latency) = outcome_after(&harness, disconnects, closed).await;
                drop(kept);
                assert_gone_before_head(&outcome);
                latencies.push(latency);
                assert_signalled_and_dropped(&mut harness, "slow").await;

                disconnects += 1;
                spans += 1;
                let closed_spans = capture.wait_spans(spans).await;
                assert_span_gone_before_head(&closed_spans[spans - 1]);
            }
            eprintln!(
                "HTTP/2 {server:?} {leave:?}: close -> 499 recorded: {}",
                figures(&mut latencies)
            );
            // The connection whose streams were reset still serves.
            let response = shared
                .send_request(common::get(addr, "/full"))
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(
                common::body_bytes(response.into_body()).await,
                "hello, world"
            );
            let outcome = harness.outcomes.wait_for(disconnects + 1).await[disconnects].clone();
            assert!(is_completed(&outcome, StatusCode::OK), "{outcome:?}");
            disconnects += 1;
            spans += 1;
            capture.wait_spans(spans).await;
        }
    }
    let events = events_of(&capture, "client_disconnected");
    assert_eq!(events.len(), SERVERS.len() * 2 * RUNS);
    for event in events {
        assert_eq!(field(&event, RECORDED_STATUS), Some("499"), "{event:?}");
    }
}

thread_local! {
    /// A worker thread's default subscriber, set for the life of the thread.
    static WORKER_DEFAULT: RefCell<Option<tracing::subscriber::DefaultGuard>> =
        const { RefCell::new(None) };
}

/// A two-worker runtime whose threads all have `dispatch` as their default subscriber, so that
/// no thread runs the crate without one (see [`capture`]).
fn multi_thread_runtime(dispatch: Dispatch) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || {
            let guard = tracing::dispatcher::set_default(&dispatch);
            WORKER_DEFAULT.with(|default| *default.borrow_mut() = Some(guard));
        })
        .on_thread_stop(|| WORKER_DEFAULT.with(|default| drop(default.borrow_mut().take())))
        .build()
        .unwrap()
}

/// The same figures on a multi-thread runtime, as servers usually run, with a subscriber that
/// takes the crate's spans and events only (no capture, no hyper or h2 tracing).
#[test]
fn close_to_record_latency_on_multi_thread_runtime() {
    let dispatch = Dispatch::new(
        tracing_subscriber::registry()
            .with(Targets::new().with_target("tower_timeouts", Level::TRACE)),
    );
    let _guard = tracing::dispatcher::set_default(&dispatch);
    multi_thread_runtime(dispatch).block_on(latency_on_multi_thread_runtime());
}

async fn latency_on_multi_thread_runtime() {
    for server in SERVERS {
        let (mut harness, app) = Harness::new();
        let addr = common::serve(server, app).await;
        let mut index = 0;

        let mut latencies = Vec::new();
        for _ in 0..RUNS {
            let mut client = raw_connect(addr).await;
            client
                .write_all(b"GET /slow HTTP/1.1\r\nhost: localhost\r\n\r\n")
                .await
                .unwrap();
            next(&mut harness.started, "handler started").await;
            let closed = Instant::now();
            drop(client);
            let (outcome, latency) = outcome_after(&harness, index, closed).await;
            assert_gone_before_head(&outcome);
            latencies.push(latency);
            index += 1;
        }
        eprintln!(
            "multi-thread HTTP/1.1 {server:?} Fin: close -> 499 recorded: {}",
            figures(&mut latencies)
        );

        let mut latencies = Vec::new();
        let (mut send, _closer) = h2_client(addr).await;
        for _ in 0..RUNS {
            let mut response = Box::pin(send.send_request(common::get(addr, "/slow")));
            tokio::select! {
                result = &mut response => panic!("/slow answered: {result:?}"),
                _ = next(&mut harness.started, "handler started") => {}
            }
            let closed = Instant::now();
            drop(response);
            let (outcome, latency) = outcome_after(&harness, index, closed).await;
            assert_gone_before_head(&outcome);
            latencies.push(latency);
            index += 1;
        }
        eprintln!(
            "multi-thread HTTP/2 {server:?} ResetStream: close -> 499 recorded: {}",
            figures(&mut latencies)
        );
        harness.live.wait_zero().await;
        for _ in 0..index {
            next(&mut harness.gone, "client gone").await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// d. During the body: the client reads the head and the first chunk, then leaves.

#[tokio::test(flavor = "current_thread")]
async fn http1_close_during_body_records_the_sent_status_and_bytes() {
    let (capture, _guard) = capture();
    let mut spans = 0;
    for server in SERVERS {
        let (mut harness, app) = Harness::new();
        let addr = common::serve(server, app).await;
        let mut index = 0;
        for leave in [H1Leave::Fin, H1Leave::Rst] {
            let mut latencies = Vec::new();
            for _ in 0..RUNS {
                let mut client = raw_connect(addr).await;
                client
                    .write_all(b"GET /stream HTTP/1.1\r\nhost: localhost\r\n\r\n")
                    .await
                    .unwrap();
                let seen = read_until(&mut client, CHUNK).await;
                assert!(seen.starts_with(b"HTTP/1.1 200 OK\r\n"));
                assert_eq!(harness.live.count(), 1);

                let closed = Instant::now();
                leave.close(client);
                let (outcome, latency) = outcome_after(&harness, index, closed).await;
                assert_gone_during_body(&outcome);
                latencies.push(latency);
                assert_signalled_and_dropped(&mut harness, "stream").await;

                index += 1;
                spans += 1;
                let closed_spans = capture.wait_spans(spans).await;
                assert_span_gone_during_body(&closed_spans[spans - 1]);
            }
            eprintln!(
                "HTTP/1.1 {server:?} {leave:?} during the body: close -> recorded: {}",
                figures(&mut latencies)
            );
        }
    }
    assert_eq!(events_of(&capture, "client_disconnected").len(), spans);
}

#[tokio::test(flavor = "current_thread")]
async fn http2_reset_during_body_records_the_sent_status_and_bytes() {
    let (capture, _guard) = capture();
    let mut spans = 0;
    for server in SERVERS {
        let (mut harness, app) = Harness::new();
        let addr = common::serve(server, app).await;
        let mut index = 0;
        for leave in [H2Leave::ResetStream, H2Leave::CloseConnection] {
            let mut latencies = Vec::new();
            let (shared, _shared_closer) = h2_client(addr).await;
            for _ in 0..RUNS {
                let (mut send, closer) = match leave {
                    H2Leave::ResetStream => (shared.clone(), None),
                    H2Leave::CloseConnection => {
                        let (send, closer) = h2_client(addr).await;
                        (send, Some(closer))
                    }
                };
                let response =
                    tokio::time::timeout(SOON, send.send_request(common::get(addr, "/stream")))
                        .await
                        .expect("head in time")
                        .unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                let mut body = response.into_body();
                let frame = tokio::time::timeout(SOON, body.frame())
                    .await
                    .expect("first chunk in time")
                    .expect("a first frame")
                    .unwrap();
                assert_eq!(frame.data_ref().map(|data| &data[..]), Some(CHUNK));
                assert_eq!(harness.live.count(), 1);

                let closed = Instant::now();
                // On a closed connection the body is kept until the outcome, so that only the
                // close can have told the server.
                let kept = match closer {
                    None => {
                        drop(body);
                        None
                    }
                    Some(closer) => {
                        closer.close();
                        Some(body)
                    }
                };
                let (outcome, latency) = outcome_after(&harness, index, closed).await;
                drop(kept);
                assert_gone_during_body(&outcome);
                latencies.push(latency);
                assert_signalled_and_dropped(&mut harness, "stream").await;

                index += 1;
                spans += 1;
                let closed_spans = capture.wait_spans(spans).await;
                assert_span_gone_during_body(&closed_spans[spans - 1]);
            }
            eprintln!(
                "HTTP/2 {server:?} {leave:?} during the body: close -> recorded: {}",
                figures(&mut latencies)
            );
        }
    }
    assert_eq!(events_of(&capture, "client_disconnected").len(), spans);
}

// ---------------------------------------------------------------------------------------------
// d. Responses that end normally are never disconnects, however hyper finishes their bodies.

/// A response that ends normally, and what the client must read.
struct Finished {
    method: Method,
    path: &'static str,
    status: StatusCode,
    body: &'static [u8],
}

const FINISHED: [Finished; 7] = [
    Finished {
        method: Method::GET,
        path: "/full",
        status: StatusCode::OK,
        body: b"hello, world",
    },
    Finished {
        method: Method::GET,
        path: "/empty",
        status: StatusCode::OK,
        body: b"",
    },
    Finished {
        method: Method::HEAD,
        path: "/full",
        status: StatusCode::OK,
        body: b"",
    },
    Finished {
        method: Method::GET,
        path: "/no-content",
        status: StatusCode::NO_CONTENT,
        body: b"",
    },
    Finished {
        method: Method::GET,
        path: "/not-modified",
        status: StatusCode::NOT_MODIFIED,
        body: b"",
    },
    Finished {
        method: Method::GET,
        path: "/sized",
        status: StatusCode::OK,
        body: b"sized part one, sized part two",
    },
    Finished {
        method: Method::GET,
        path: "/chunked",
        status: StatusCode::OK,
        body: b"chunk one, chunk two, chunk three",
    },
];

#[derive(Clone, Copy, Debug)]
enum Version {
    Http1,
    Http2,
}

/// Sends the request on a fresh connection, reads the response to its end, then closes at
/// once: the race most likely to make a finished body look like a client that left.
async fn fetch(version: Version, addr: SocketAddr, case: &Finished) -> (StatusCode, Bytes) {
    let request = common::request(case.method.clone(), addr, case.path);
    let response = match version {
        Version::Http1 => common::h1(addr).await.send_request(request).await,
        Version::Http2 => common::h2(addr).await.send_request(request).await,
    }
    .unwrap();
    let status = response.status();
    (status, common::body_bytes(response.into_body()).await)
}

async fn finished_responses_are_not_disconnects(version: Version) {
    let (capture, _guard) = capture();
    let mut spans = 0;
    for server in SERVERS {
        let (harness, app) = Harness::new();
        let addr = common::serve(server, app).await;
        let mut requests = 0;
        for case in &FINISHED {
            for _ in 0..RUNS {
                let (status, body) = tokio::time::timeout(SOON, fetch(version, addr, case))
                    .await
                    .expect("a response in time");
                assert_eq!(status, case.status, "{} {}", case.method, case.path);
                assert_eq!(body, case.body, "{} {}", case.method, case.path);
                requests += 1;
                let outcome = harness.outcomes.wait_for(requests).await[requests - 1].clone();
                assert!(
                    is_completed(&outcome, case.status),
                    "{version:?} {server:?} {} {}: {outcome:?}",
                    case.method,
                    case.path
                );
            }
        }
        // Nothing recorded a second outcome, or a late disconnect, after the fact.
        spans += requests;
        let closed_spans = capture.wait_spans(spans).await;
        assert_eq!(harness.outcomes.all().len(), requests);
        assert_eq!(harness.signals.fired(), (requests, 0), "(signals, fired)");
        for span in &closed_spans[spans - requests..] {
            assert_eq!(field(span, OUTCOME), Some("completed"), "{span:?}");
            assert_eq!(field(span, ERROR_TYPE), None, "{span:?}");
            assert!(field(span, HTTP_RESPONSE_STATUS_CODE).is_some(), "{span:?}");
        }
    }
    let ours: Vec<_> = capture
        .events()
        .into_iter()
        .filter(|event| field(event, OUTCOME).is_some())
        .collect();
    assert!(ours.is_empty(), "{ours:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn http1_finished_responses_are_completed() {
    finished_responses_are_not_disconnects(Version::Http1).await;
}

#[tokio::test(flavor = "current_thread")]
async fn http2_finished_responses_are_completed() {
    finished_responses_are_not_disconnects(Version::Http2).await;
}

// ---------------------------------------------------------------------------------------------
// A panicking handler is a panic, never a disconnect, and the server goes on.

#[tokio::test(flavor = "current_thread")]
async fn panicking_handler_is_recorded_as_panicked_and_the_server_goes_on() {
    let (capture, _guard) = capture();
    let mut spans = 0;
    for server in SERVERS {
        let (harness, app) = Harness::new();
        let addr = common::serve(server, app).await;
        let mut requests = 0;
        for version in [Version::Http1, Version::Http2] {
            let request = common::get(addr, "/panic");
            let answer = match version {
                Version::Http1 => common::h1(addr).await.send_request(request).await,
                Version::Http2 => common::h2(addr).await.send_request(request).await,
            };
            assert!(answer.is_err(), "{version:?} {server:?}: {answer:?}");
            requests += 1;
            let outcome = harness.outcomes.wait_for(requests).await[requests - 1].clone();
            assert!(
                matches!(
                    outcome,
                    Outcome::Panicked {
                        phase: Phase::BeforeHead,
                        sent_status: None,
                        ..
                    }
                ),
                "{version:?} {server:?}: {outcome:?}"
            );

            let ok = Finished {
                method: Method::GET,
                path: "/full",
                status: StatusCode::OK,
                body: b"hello, world",
            };
            let (status, body) = fetch(version, addr, &ok).await;
            assert_eq!((status, &body[..]), (StatusCode::OK, ok.body));
            requests += 1;
            let outcome = harness.outcomes.wait_for(requests).await[requests - 1].clone();
            assert!(is_completed(&outcome, StatusCode::OK), "{outcome:?}");
        }
        spans += requests;
        let closed_spans = capture.wait_spans(spans).await;
        assert_eq!(harness.outcomes.all().len(), requests);
        assert_eq!(harness.signals.fired(), (requests, 0), "(signals, fired)");
        let panicked = closed_spans
            .iter()
            .filter(|span| field(span, OUTCOME) == Some("panicked"))
            .count();
        assert_eq!(panicked, spans / 2);
    }
    assert!(events_of(&capture, "client_disconnected").is_empty());
    assert_eq!(events_of(&capture, "panicked").len(), spans / 2);
}

// ---------------------------------------------------------------------------------------------
// The documented limits of HTTP/1.1.

/// A small request body that arrived with the head: hyper has read the whole request, so it
/// sees the close at once even though the handler holds the body unread.
#[tokio::test(flavor = "current_thread")]
async fn http1_small_request_body_sent_with_the_head_does_not_hide_the_close() {
    let (_capture, _guard) = capture();
    for server in SERVERS {
        let (mut harness, app) = Harness::new();
        let addr = common::serve(server, app).await;
        for index in 0..RUNS {
            let mut client = raw_connect(addr).await;
            client
                .write_all(
                    b"POST /hold HTTP/1.1\r\nhost: localhost\r\ncontent-length: 5\r\n\r\nhello",
                )
                .await
                .unwrap();
            assert_eq!(next(&mut harness.started, "handler started").await, "hold");

            let closed = Instant::now();
            drop(client);
            let (outcome, _) = outcome_after(&harness, index, closed).await;
            assert_gone_before_head(&outcome);
            assert_signalled_and_dropped(&mut harness, "hold").await;
        }
    }
}

/// A request body that hyper has not read to its end (content-length, only part of it sent)
/// or that is chunked (even when complete), held unread by the handler, keeps hyper from
/// reading on, so it does not see the client leave: the handler runs to its end. (The
/// connection watcher sees it: `tests/watch.rs`.)
#[tokio::test(flavor = "current_thread")]
async fn http1_unread_request_body_hides_the_close() {
    let (_capture, _guard) = capture();
    let partial = {
        let mut request = format!(
            "POST /upload HTTP/1.1\r\nhost: localhost\r\ncontent-length: {UPLOAD_LEN}\r\n\r\n"
        )
        .into_bytes();
        request.resize(request.len() + PARTIAL, b'x');
        request
    };
    let chunked = b"POST /upload HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\n\
        5\r\nhello\r\n0\r\n\r\n"
        .to_vec();
    for server in [Server::AxumServe, Server::HyperAuto] {
        let (mut harness, app) = Harness::new();
        let addr = common::serve(server, app).await;
        let mut requests = 0;
        for (name, request) in [
            ("partial 1 MiB body", &partial),
            ("complete chunked body", &chunked),
        ] {
            let mut client = raw_connect(addr).await;
            client.write_all(request).await.unwrap();
            assert_eq!(
                next(&mut harness.started, "handler started").await,
                "upload"
            );

            let closed = Instant::now();
            drop(client);
            assert_eq!(
                next(&mut harness.finished, "handler finished").await,
                "upload"
            );
            let ran = closed.elapsed();
            requests += 1;
            let outcome = harness.outcomes.wait_for(requests).await[requests - 1].clone();
            eprintln!(
                "HTTP/1.1 {server:?} {name}, unread, client closed: handler ran {ran:?} more, outcome {outcome:?}"
            );
            assert!(
                !matches!(
                    outcome,
                    Outcome::ClientDisconnected {
                        phase: Phase::BeforeHead,
                        ..
                    }
                ),
                "{server:?} {name}: {outcome:?}"
            );
            harness.live.wait_zero().await;
        }
        assert_eq!(harness.outcomes.all().len(), requests);
    }
}

/// With `half_close(true)`, a client's FIN is not taken as leaving: the handler runs to its end.
#[tokio::test(flavor = "current_thread")]
async fn http1_half_close_hides_the_close() {
    let (_capture, _guard) = capture();
    let (mut harness, app) = Harness::new();
    let addr = serve_half_close(app).await;
    let mut requests = 0;

    // Shut down writing only: the client still reads the whole answer.
    let mut client = raw_connect(addr).await;
    client
        .write_all(b"GET /bounded HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        next(&mut harness.started, "handler started").await,
        "bounded"
    );
    client.shutdown().await.unwrap();
    assert_eq!(
        next(&mut harness.finished, "handler finished").await,
        "bounded"
    );
    let answer = read_to_end(&mut client).await;
    assert!(answer.starts_with(b"HTTP/1.1 200 OK\r\n"), "{answer:?}");
    assert!(answer.ends_with(b"finished"), "{answer:?}");
    requests += 1;
    let outcome = harness.outcomes.wait_for(requests).await[requests - 1].clone();
    assert!(is_completed(&outcome, StatusCode::OK), "{outcome:?}");

    // Close the socket: still not seen while the request is in flight.
    for leave in [H1Leave::Fin, H1Leave::Rst] {
        let mut client = raw_connect(addr).await;
        client
            .write_all(b"GET /bounded HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            next(&mut harness.started, "handler started").await,
            "bounded"
        );
        leave.close(client);
        assert_eq!(
            next(&mut harness.finished, "handler finished").await,
            "bounded"
        );
        requests += 1;
        let outcome = harness.outcomes.wait_for(requests).await[requests - 1].clone();
        eprintln!("HTTP/1.1 half_close(true) {leave:?} while in flight: outcome {outcome:?}");
        assert!(
            !matches!(
                outcome,
                Outcome::ClientDisconnected {
                    phase: Phase::BeforeHead,
                    ..
                }
            ),
            "{leave:?}: {outcome:?}"
        );
    }
    harness.live.wait_zero().await;
    assert_eq!(harness.outcomes.all().len(), requests);
}
