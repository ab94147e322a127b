//! The body limits over real TCP on loopback, as clients see them: a stalled upload gets 408
//! (with `Connection: close` on HTTP/1.1) whatever the handler does with its body; a stalled or
//! endless response stream is cut (a closed HTTP/1.1 connection, `RST_STREAM(CANCEL)` on HTTP/2,
//! gRPC trailers with `DEADLINE_EXCEEDED`); a slow handler that has its whole body gets the
//! response timeout's 504, never a 408; and traffic within the limits is never cut.
//!
//! Run with `cargo test --test body_timeout -- --nocapture` to see how late each limit fired.

mod common;
mod probe;

use std::convert::Infallible;
use std::error::Error;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prost::Message;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::time::{timeout, Instant};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tower::ServiceBuilder;
use tower_timeouts::response::PROXY_STATUS;
use tower_timeouts::signal::Cancelled;
use tower_timeouts::{
    ClientDisconnectLayer, ClientGone, GrpcCode, Outcome, Report, RequestBodyTimeoutLayer,
    ResponseBodyTimeoutLayer, ResponseTimeoutLayer,
};

use common::{read_head, read_to_eof, read_until, Live, RawHead, SERVERS, SOON};
use probe::probe_client::ProbeClient;
use probe::probe_server::{Probe, ProbeServer};
use probe::{CallReply, CallRequest};

/// The idle limit of the stalling cases.
const IDLE: Duration = Duration::from_millis(300);
/// The total limit of the upload read on a task of its own.
const UPLOAD_TOTAL: Duration = Duration::from_millis(500);
/// The total limit of the endless stream.
const STREAM_TOTAL: Duration = Duration::from_millis(400);
/// A response timeout that never binds here.
const LONG: Duration = Duration::from_secs(30);
/// How late a limit may fire, at most, on a loaded machine: a generous bound, not a figure.
const LATE: Duration = Duration::from_secs(5);
/// The stalled upload announces this many bytes in its `content-length`...
const ANNOUNCED: usize = 2000;
/// ... and sends only this many, then keeps its socket open and sends nothing more.
const SENT: usize = 1000;
/// The `Proxy-Status` of a 408 the crate answered.
const REQUEST_PROXY_STATUS: &str = "tower-timeouts; error=http_request_error; status-code=408";
/// The one event of the stalled SSE stream...
const EVENT: &str = "the first and only event";
/// ... as it goes on the wire.
const EVENT_WIRE: &[u8] = b"data: the first and only event\n\n";
/// The endless stream sends [`TICK`] every [`TICK_EVERY`].
const TICK: &[u8] = b"tick\n";
const TICK_EVERY: Duration = Duration::from_millis(50);
/// The stream that ends, and the paced upload: [`CHUNKS`] chunks, [`CHUNK_GAP`] apart, far
/// within the idle limit, and longer in all than it, so that an idle wait that does not start
/// again after each frame shows.
const CHUNKS: usize = 16;
const CHUNK_GAP: Duration = Duration::from_millis(40);
/// The size of a piece of the paced upload.
const PIECE: usize = 100;

// ---------------------------------------------------------------------------------------------
// What the hooks are told.

/// What the hook was told of one request.
#[derive(Clone, Debug)]
struct Told {
    outcome: Outcome,
    grpc: Option<GrpcCode>,
    elapsed: Duration,
}

/// Collects the reports of every hook of a stack (all hooks report here, so that a second
/// report from any layer shows).
#[derive(Clone, Default)]
struct Reports(Arc<(Mutex<Vec<Told>>, Notify)>);

impl Reports {
    fn hook(&self) -> impl Fn(&Report<'_>) + Send + Sync + Clone + 'static {
        let inner = self.0.clone();
        move |report: &Report<'_>| {
            inner.0.lock().unwrap().push(Told {
                outcome: report.outcome().clone(),
                grpc: report.grpc_status(),
                elapsed: report.elapsed(),
            });
            inner.1.notify_waiters();
        }
    }

    fn all(&self) -> Vec<Told> {
        self.0 .0.lock().unwrap().clone()
    }

    /// Waits until at least `n` reports arrived (panics after [`SOON`]).
    async fn wait_for(&self, n: usize) -> Vec<Told> {
        let waited = timeout(SOON, async {
            loop {
                let notified = self.0 .1.notified();
                let mut notified = std::pin::pin!(notified);
                notified.as_mut().enable();
                if self.0 .0.lock().unwrap().len() >= n {
                    return;
                }
                notified.await;
            }
        })
        .await;
        let all = self.all();
        assert!(waited.is_ok(), "expected {n} reports, got {all:?}");
        all
    }

    /// The first report, once it is there; there must be no other yet.
    async fn only(&self) -> Told {
        let all = self.wait_for(1).await;
        assert_eq!(all.len(), 1, "one report per request: {all:?}");
        all[0].clone()
    }

    /// At the end of a case: still only `n` reports.
    fn assert_count(&self, n: usize) {
        let all = self.all();
        assert_eq!(all.len(), n, "one report per request: {all:?}");
    }
}

/// Prints how late a limit fired, as the client measured it (from `since`, the moment from
/// which the limit counts as the client can tell) and as the hook's `elapsed` tells; asserts
/// only a generous upper bound.
fn lateness(case: &str, limit: Duration, measured: Duration, told: &Told) {
    let late = |d: Duration| (d.as_secs_f64() - limit.as_secs_f64()) * 1e3;
    eprintln!(
        "lateness: {case}: limit {} ms; client saw it after {:.1} ms ({:+.1} ms); \
         hook elapsed {:.1} ms ({:+.1} ms)",
        limit.as_millis(),
        measured.as_secs_f64() * 1e3,
        late(measured),
        told.elapsed.as_secs_f64() * 1e3,
        late(told.elapsed),
    );
    assert!(
        measured < limit + LATE,
        "{case}: the {limit:?} limit fired only after {measured:?}"
    );
}

fn assert_request_body_timeout(told: &Told, limit: Duration) {
    assert!(
        matches!(
            told.outcome,
            Outcome::RequestBodyTimeout { timeout, status, .. }
                if timeout == limit && status == StatusCode::REQUEST_TIMEOUT
        ),
        "expected a request-body timeout of {limit:?} answered 408, got {told:?}"
    );
}

fn assert_response_body_timeout(told: &Told, limit: Duration, bytes: impl Fn(u64) -> bool) {
    assert!(
        matches!(
            told.outcome,
            Outcome::ResponseBodyTimeout { timeout, sent_status, bytes_sent, .. }
                if timeout == limit && sent_status == StatusCode::OK && bytes(bytes_sent)
        ),
        "expected a response-body timeout of {limit:?} after a 200, got {told:?}"
    );
}

fn bytes_sent(told: &Told) -> u64 {
    match told.outcome {
        Outcome::ResponseBodyTimeout { bytes_sent, .. } => bytes_sent,
        _ => panic!("not a response-body timeout: {told:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The axum app.

/// The handlers' side: what they report to the test.
#[derive(Clone)]
struct Handlers {
    /// Handler futures not dropped yet.
    live: Live,
    /// Request-body bytes the handlers read.
    read: Arc<AtomicUsize>,
    /// Set by a handler that ran to its end.
    finished: Arc<AtomicBool>,
    /// Every request's signal, as its handler took it.
    signals: Arc<Mutex<Vec<ClientGone>>>,
    /// What the tasks that produce the streams learned from the signal they took: why the work
    /// was cancelled, and whether the signal says the client left.
    cancelled: mpsc::UnboundedSender<(Cancelled, bool)>,
}

impl Handlers {
    fn take_signal(&self) -> ClientGone {
        let gone = ClientGone::current().expect("under a ClientDisconnectLayer");
        self.signals.lock().unwrap().push(gone.clone());
        gone
    }

    /// Runs `produce` (which feeds a response stream) on a task of its own, with the request's
    /// signal moved in: the task reports when the signal is cancelled.
    fn spawn_producer(&self, produce: impl std::future::Future<Output = ()> + Send + 'static) {
        let gone = self.take_signal();
        let told = self.cancelled.clone();
        tokio::spawn(async move {
            tokio::select! {
                biased;
                reason = gone.cancelled() => {
                    let _ = told.send((reason, gone.is_gone()));
                }
                () = produce => {}
            }
        });
    }
}

/// The test's side of one app.
struct Harness {
    handlers: Handlers,
    reports: Reports,
    cancelled: mpsc::UnboundedReceiver<(Cancelled, bool)>,
}

impl Harness {
    fn new() -> Harness {
        let (cancelled_tx, cancelled) = mpsc::unbounded_channel();
        Harness {
            handlers: Handlers {
                live: Live::new(),
                read: Arc::default(),
                finished: Arc::default(),
                signals: Arc::default(),
                cancelled: cancelled_tx,
            },
            reports: Reports::default(),
            cancelled,
        }
    }

    fn routes(&self) -> Router {
        Router::new()
            .route("/bytes", post(read_bytes))
            .route("/frames", post(read_frames))
            .route("/spawned", post(read_on_a_task))
            .route("/slow", post(slow_after_the_body))
            .route("/events", get(stalled_events))
            .route("/ticks", get(endless_ticks))
            .route("/chunks", get(chunks))
            .with_state(self.handlers.clone())
    }

    fn disconnect(&self) -> ClientDisconnectLayer {
        ClientDisconnectLayer::new().on_outcome(self.reports.hook())
    }

    fn response_timeout(&self, limit: Duration) -> ResponseTimeoutLayer {
        ResponseTimeoutLayer::new(limit).on_outcome(self.reports.hook())
    }

    /// `ClientDisconnectLayer` → `request` → `ResponseTimeoutLayer::new(limit)`.
    fn upload_app(&self, request: RequestBodyTimeoutLayer, limit: Duration) -> Router {
        self.routes().layer(
            ServiceBuilder::new()
                .layer(self.disconnect())
                .layer(request.on_outcome(self.reports.hook()))
                .layer(self.response_timeout(limit)),
        )
    }

    /// `ClientDisconnectLayer` → `response` → `ResponseTimeoutLayer::new(LONG)`.
    fn stream_app(&self, response: ResponseBodyTimeoutLayer) -> Router {
        self.routes().layer(
            ServiceBuilder::new()
                .layer(self.disconnect())
                .layer(response.on_outcome(self.reports.hook()))
                .layer(self.response_timeout(LONG)),
        )
    }

    /// Both body layers, with limits that traffic within them never reaches.
    fn both_app(&self) -> Router {
        let request = RequestBodyTimeoutLayer::new()
            .idle(IDLE)
            .total(Duration::from_secs(5))
            .on_outcome(self.reports.hook());
        let response = ResponseBodyTimeoutLayer::new()
            .idle(IDLE)
            .total(Duration::from_secs(5))
            .on_outcome(self.reports.hook());
        self.routes().layer(
            ServiceBuilder::new()
                .layer(self.disconnect())
                .layer(request)
                .layer(response)
                .layer(self.response_timeout(LONG)),
        )
    }

    /// The signal the (only) handler took is cancelled as abandoned, never as a client that
    /// left.
    async fn assert_abandoned(&self) {
        let signals = self.handlers.signals.lock().unwrap().clone();
        assert_eq!(signals.len(), 1, "one handler took its signal");
        let gone = &signals[0];
        let reason = timeout(SOON, gone.cancelled())
            .await
            .expect("the signal is cancelled");
        assert_eq!(reason, Cancelled::Abandoned);
        assert!(!gone.is_gone(), "the client did not leave");
    }

    /// What the stream's producer task learned from the signal moved into it.
    async fn producer_learned(&mut self) -> (Cancelled, bool) {
        timeout(SOON, self.cancelled.recv())
            .await
            .expect("the producer's signal is cancelled")
            .expect("the app is alive")
    }
}

/// Reads its body with the `Bytes` extractor.
async fn read_bytes(State(handlers): State<Handlers>, body: Bytes) -> String {
    handlers.take_signal();
    handlers.read.fetch_add(body.len(), Ordering::SeqCst);
    handlers.finished.store(true, Ordering::SeqCst);
    body.len().to_string()
}

/// Reads its body frame by frame, and answers what it makes of an error itself (a 400).
async fn read_frames(State(handlers): State<Handlers>, body: Body) -> (StatusCode, String) {
    let _live = handlers.live.enter();
    handlers.take_signal();
    let mut frames = body.into_data_stream();
    let mut read = 0;
    while let Some(frame) = frames.next().await {
        match frame {
            Ok(data) => {
                read += data.len();
                handlers.read.fetch_add(data.len(), Ordering::SeqCst);
            }
            Err(error) => return (StatusCode::BAD_REQUEST, format!("{error} after {read}")),
        }
    }
    handlers.finished.store(true, Ordering::SeqCst);
    (StatusCode::OK, read.to_string())
}

/// Reads its body on a task of its own, and awaits it.
async fn read_on_a_task(State(handlers): State<Handlers>, body: Body) -> (StatusCode, String) {
    let _live = handlers.live.enter();
    handlers.take_signal();
    let counted = handlers.read.clone();
    let reader = tokio::spawn(async move {
        let mut frames = body.into_data_stream();
        let mut read = 0;
        while let Some(frame) = frames.next().await {
            let data = frame?;
            read += data.len();
            counted.fetch_add(data.len(), Ordering::SeqCst);
        }
        Ok::<_, axum::Error>(read)
    });
    match reader.await {
        Ok(Ok(read)) => {
            handlers.finished.store(true, Ordering::SeqCst);
            (StatusCode::OK, read.to_string())
        }
        Ok(Err(error)) => (StatusCode::BAD_REQUEST, error.to_string()),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the reader failed".to_owned(),
        ),
    }
}

/// Reads its whole body, then works far longer than any limit.
async fn slow_after_the_body(State(handlers): State<Handlers>, body: Bytes) -> &'static str {
    let _live = handlers.live.enter();
    handlers.take_signal();
    handlers.read.fetch_add(body.len(), Ordering::SeqCst);
    tokio::time::sleep(LONG).await;
    handlers.finished.store(true, Ordering::SeqCst);
    "too late"
}

/// An SSE stream that sends one event, then never another (its producer keeps it open).
async fn stalled_events(
    State(handlers): State<Handlers>,
) -> Sse<ReceiverStream<Result<Event, Infallible>>> {
    let (send, receive) = mpsc::channel(1);
    handlers.spawn_producer(async move {
        let _ = send.send(Ok(Event::default().data(EVENT))).await;
        std::future::pending::<()>().await;
        drop(send);
    });
    Sse::new(ReceiverStream::new(receive))
}

/// A stream that sends [`TICK`] every [`TICK_EVERY`], forever.
async fn endless_ticks(State(handlers): State<Handlers>) -> Body {
    let (send, receive) = mpsc::channel(1);
    handlers.spawn_producer(async move {
        let mut every = tokio::time::interval(TICK_EVERY);
        loop {
            every.tick().await;
            let tick = Ok::<_, Infallible>(Bytes::from_static(TICK));
            if send.send(tick).await.is_err() {
                return;
            }
        }
    });
    Body::from_stream(ReceiverStream::new(receive))
}

/// A stream of [`CHUNKS`] chunks, [`CHUNK_GAP`] apart, that ends.
async fn chunks(State(handlers): State<Handlers>) -> Body {
    handlers.take_signal();
    Body::from_stream(futures_util::stream::unfold(0, |i| async move {
        if i == CHUNKS {
            return None;
        }
        tokio::time::sleep(CHUNK_GAP).await;
        Some((Ok::<_, Infallible>(Bytes::from(chunk(i))), i + 1))
    }))
}

fn chunk(i: usize) -> String {
    format!("chunk {i} of a stream that ends\n")
}

// ---------------------------------------------------------------------------------------------
// Clients.

async fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Sends a POST head that announces [`ANNOUNCED`] bytes, and [`SENT`] of them; then sends
/// nothing more, with the socket left open. Returns the socket, the moment the head was about
/// to go, and the moment the last byte went.
async fn stalled_upload(addr: SocketAddr, path: &str) -> (TcpStream, Instant, Instant) {
    let mut stream = connect(addr).await;
    let mut request =
        format!("POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: {ANNOUNCED}\r\n\r\n")
            .into_bytes();
    request.extend(std::iter::repeat_n(b'x', SENT));
    let head = Instant::now();
    stream.write_all(&request).await.unwrap();
    (stream, head, Instant::now())
}

/// Sends [`CHUNKS`] pieces of [`PIECE`] bytes, [`CHUNK_GAP`] apart, to `/bytes` (asking the
/// server to close after its answer); returns the response head and body.
async fn paced_upload(addr: SocketAddr) -> (RawHead, Vec<u8>) {
    let mut stream = connect(addr).await;
    let head = format!(
        "POST /bytes HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n",
        CHUNKS * PIECE
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..CHUNKS {
        tokio::time::sleep(CHUNK_GAP).await;
        stream.write_all(&[b'x'; PIECE]).await.unwrap();
    }
    let head = read_head(&mut stream).await;
    let mut body = head.after.clone();
    read_to_eof(&mut stream, &mut body).await;
    (head, body)
}

/// A response head read off a raw HTTP/1.1 connection, and what came after it.
/// Reads the 408 that a stalled upload gets, and the close after it; returns the time from
/// `since` to the head.
async fn expect_408_and_close(stream: &mut TcpStream, since: Instant) -> Duration {
    let head = read_head(stream).await;
    let measured = since.elapsed();
    assert!(
        head.status_line.starts_with("HTTP/1.1 408 "),
        "expected a 408: {head:?}"
    );
    assert_eq!(head.header("connection"), Some("close"), "{head:?}");
    assert_eq!(
        head.header(PROXY_STATUS.as_str()),
        Some(REQUEST_PROXY_STATUS),
        "{head:?}"
    );
    let mut rest = head.after;
    read_to_eof(stream, &mut rest).await;
    measured
}

/// Decodes a chunked body: its data, and whether the terminating `0\r\n\r\n` came.
fn decode_chunked(mut raw: &[u8]) -> (Vec<u8>, bool) {
    let mut data = Vec::new();
    loop {
        let Some(line_end) = raw.windows(2).position(|w| w == b"\r\n") else {
            assert!(raw.is_empty(), "a partial chunk-size line: {raw:?}");
            return (data, false);
        };
        let size = std::str::from_utf8(&raw[..line_end]).unwrap();
        let size = usize::from_str_radix(size.split(';').next().unwrap(), 16).unwrap();
        raw = &raw[line_end + 2..];
        if size == 0 {
            return (data, raw.starts_with(b"\r\n"));
        }
        assert!(raw.len() >= size + 2, "a partial chunk: {raw:?}");
        data.extend_from_slice(&raw[..size]);
        assert_eq!(&raw[size..size + 2], b"\r\n");
        raw = &raw[size + 2..];
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    H1,
    H2,
}

const PROTOS: [Proto; 2] = [Proto::H1, Proto::H2];

/// hyper-util's client: HTTP/1.1, or HTTP/2 with prior knowledge (h2c).
fn client(proto: Proto) -> Client<HttpConnector, Full<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let mut builder = Client::builder(TokioExecutor::new());
    if proto == Proto::H2 {
        builder.http2_only(true);
    }
    builder.build(connector)
}

fn request(method: Method, addr: SocketAddr, path: &str, body: Bytes) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(Full::new(body))
        .unwrap()
}

/// The HTTP/2 reason in an error's source chain, if any.
fn h2_reason(error: &(dyn Error + 'static)) -> Option<h2::Reason> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            return h2.reason();
        }
        next = error.source();
    }
    None
}

/// Whether an HTTP/1.1 body failed because the connection closed before its end.
fn cut_short(error: &(dyn Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::UnexpectedEof;
        }
        next = error.source();
    }
    false
}

/// The reset an HTTP/2 stream cut by a response-body limit gets: `CANCEL`, which hyper takes
/// from the error's source with the `h2` feature.
fn expected_reset() -> h2::Reason {
    if cfg!(feature = "h2") {
        h2::Reason::CANCEL
    } else {
        h2::Reason::INTERNAL_ERROR
    }
}

/// Reads a response body until it fails; returns the data read before and the error (panics
/// if it ends cleanly, or after [`SOON`]).
async fn read_until_error(body: &mut hyper::body::Incoming) -> (Vec<u8>, hyper::Error) {
    let mut data = Vec::new();
    let error = timeout(SOON, async {
        loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    data.extend_from_slice(frame.data_ref().unwrap_or(&Bytes::new()))
                }
                Some(Err(error)) => return error,
                None => panic!("the body ended cleanly after {} bytes", data.len()),
            }
        }
    })
    .await
    .expect("the body is cut in time");
    (data, error)
}

// ---------------------------------------------------------------------------------------------
// 1, 2. A stalled upload gets 408, whatever the handler does with its body.

/// The `Bytes` extractor waits for the rest of the body; the idle limit answers 408 and
/// closes the connection, and the handler never runs past its extractor.
#[tokio::test(flavor = "current_thread")]
async fn a_stalled_upload_read_by_the_bytes_extractor_gets_408_and_a_closed_connection() {
    for server in SERVERS {
        let harness = Harness::new();
        let app = harness.upload_app(RequestBodyTimeoutLayer::new().idle(IDLE), LONG);
        let addr = common::serve(server, app).await;

        let (mut stream, _, sent) = stalled_upload(addr, "/bytes").await;
        let measured = expect_408_and_close(&mut stream, sent).await;

        let told = harness.reports.only().await;
        assert_request_body_timeout(&told, IDLE);
        lateness(
            &format!("{server:?}, stalled upload, Bytes extractor, idle"),
            IDLE,
            measured,
            &told,
        );
        assert!(!harness.handlers.finished.load(Ordering::SeqCst));
        assert!(harness.handlers.signals.lock().unwrap().is_empty());
        harness.reports.assert_count(1);
    }
}

/// A handler that reads its body frame by frame, and would answer its own 400, is dropped; the
/// client gets the layer's 408.
#[tokio::test(flavor = "current_thread")]
async fn a_stalled_upload_read_frame_by_frame_gets_408_and_the_handler_is_dropped() {
    for server in SERVERS {
        let harness = Harness::new();
        let app = harness.upload_app(RequestBodyTimeoutLayer::new().idle(IDLE), LONG);
        let addr = common::serve(server, app).await;

        let (mut stream, _, sent) = stalled_upload(addr, "/frames").await;
        let measured = expect_408_and_close(&mut stream, sent).await;

        let told = harness.reports.only().await;
        assert_request_body_timeout(&told, IDLE);
        lateness(
            &format!("{server:?}, stalled upload, frame by frame, idle"),
            IDLE,
            measured,
            &told,
        );
        // It read all that was sent: the limit fired at the stall, not before.
        assert_eq!(harness.handlers.read.load(Ordering::SeqCst), SENT);
        assert!(!harness.handlers.finished.load(Ordering::SeqCst));
        harness.handlers.live.wait_zero().await;
        harness.assert_abandoned().await;
        harness.reports.assert_count(1);
    }
}

/// The body is read on a task of its own, which the handler awaits: the layer still learns
/// that the total limit fired, and answers 408.
///
/// Here hyper adds `Connection: close` itself (the reader task dropped the unfinished body
/// before the answer was written), so this case alone would not show the layer's header
/// missing; the two cases above do.
#[tokio::test(flavor = "current_thread")]
async fn a_stalled_upload_read_on_a_spawned_task_gets_408_at_the_total_limit() {
    for server in SERVERS {
        let harness = Harness::new();
        let app = harness.upload_app(RequestBodyTimeoutLayer::new().total(UPLOAD_TOTAL), LONG);
        let addr = common::serve(server, app).await;

        let (mut stream, head, _) = stalled_upload(addr, "/spawned").await;
        let measured = expect_408_and_close(&mut stream, head).await;

        let told = harness.reports.only().await;
        assert_request_body_timeout(&told, UPLOAD_TOTAL);
        lateness(
            &format!("{server:?}, stalled upload, spawned reader, total"),
            UPLOAD_TOTAL,
            measured,
            &told,
        );
        assert_eq!(harness.handlers.read.load(Ordering::SeqCst), SENT);
        assert!(!harness.handlers.finished.load(Ordering::SeqCst));
        harness.handlers.live.wait_zero().await;
        harness.assert_abandoned().await;
        harness.reports.assert_count(1);
    }
}

// ---------------------------------------------------------------------------------------------
// 3. A slow handler with its whole body is the response timeout's, not its client's.

/// The body arrives at once; the handler then works past the response timeout, long after
/// both request-body limits: 504, never 408.
#[tokio::test(flavor = "current_thread")]
async fn a_whole_upload_to_a_slow_handler_gets_504_not_408() {
    let limit = Duration::from_millis(300);
    for proto in PROTOS {
        let harness = Harness::new();
        let request_limits = RequestBodyTimeoutLayer::new()
            .idle(Duration::from_millis(100))
            .total(Duration::from_millis(200));
        let app = harness.upload_app(request_limits, limit);
        let addr = common::serve(common::Server::HyperAuto, app).await;

        let body = Bytes::from(vec![b'x'; ANNOUNCED]);
        let sent = Instant::now();
        let response = timeout(
            SOON,
            client(proto).request(request(Method::POST, addr, "/slow", body)),
        )
        .await
        .expect("a response in time")
        .unwrap();
        let measured = sent.elapsed();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT, "{proto:?}");

        let told = harness.reports.only().await;
        assert!(
            matches!(
                told.outcome,
                Outcome::ResponseTimeout { timeout, status, .. }
                    if timeout == limit && status == StatusCode::GATEWAY_TIMEOUT
            ),
            "{proto:?}: {told:?}"
        );
        lateness(
            &format!("{proto:?}, whole upload, slow handler, response timeout"),
            limit,
            measured,
            &told,
        );
        assert_eq!(harness.handlers.read.load(Ordering::SeqCst), ANNOUNCED);
        assert!(!harness.handlers.finished.load(Ordering::SeqCst));
        harness.handlers.live.wait_zero().await;
        harness.assert_abandoned().await;
        harness.reports.assert_count(1);
    }
}

// ---------------------------------------------------------------------------------------------
// 4, 5. A stalled or endless response stream is cut.

/// HTTP/1.1: the connection is closed after the one event, without the last chunk; the
/// stream's producer learns the work was abandoned.
#[tokio::test(flavor = "current_thread")]
async fn a_stalled_sse_stream_over_http1_is_cut_by_closing_the_connection() {
    for server in SERVERS {
        let mut harness = Harness::new();
        let app = harness.stream_app(ResponseBodyTimeoutLayer::new().idle(IDLE));
        let addr = common::serve(server, app).await;

        let mut stream = connect(addr).await;
        stream
            .write_all(b"GET /events HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut stream).await;
        assert!(head.status_line.starts_with("HTTP/1.1 200 "), "{head:?}");
        assert_eq!(head.header("content-type"), Some("text/event-stream"));
        assert_eq!(head.header("transfer-encoding"), Some("chunked"));
        let mut raw = head.after;
        read_until(&mut stream, &mut raw, EVENT_WIRE).await;
        let event = Instant::now();
        read_to_eof(&mut stream, &mut raw).await;
        let measured = event.elapsed();

        let (data, terminated) = decode_chunked(&raw);
        assert_eq!(
            data,
            EVENT_WIRE,
            "{server:?}: {:?}",
            String::from_utf8_lossy(&raw)
        );
        assert!(!terminated, "{server:?}: the cut stream looks complete");

        let told = harness.reports.only().await;
        assert_response_body_timeout(&told, IDLE, |b| b == EVENT_WIRE.len() as u64);
        lateness(
            &format!("{server:?}, stalled SSE over HTTP/1.1, idle"),
            IDLE,
            measured,
            &told,
        );
        assert_eq!(
            harness.producer_learned().await,
            (Cancelled::Abandoned, false)
        );
        harness.reports.assert_count(1);
    }
}

/// HTTP/2 (h2c): the stream is reset with `CANCEL` after the one event; the connection
/// stays usable.
#[tokio::test(flavor = "current_thread")]
async fn a_stalled_stream_over_http2_is_reset_with_cancel() {
    for server in SERVERS {
        let mut harness = Harness::new();
        let app = harness.stream_app(ResponseBodyTimeoutLayer::new().idle(IDLE));
        let addr = common::serve(server, app).await;
        let client = client(Proto::H2);

        let response = timeout(
            SOON,
            client.request(request(Method::GET, addr, "/events", Bytes::new())),
        )
        .await
        .expect("a head in time")
        .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let mut data = Vec::new();
        while data.len() < EVENT_WIRE.len() {
            let frame = timeout(SOON, body.frame())
                .await
                .expect("the event in time");
            let frame = frame
                .expect("more body")
                .expect("no error before the event");
            data.extend_from_slice(frame.data_ref().expect("data"));
        }
        assert_eq!(data, EVENT_WIRE);
        // `axum::serve` leaves Nagle's algorithm on: the small event may reach the client some
        // 40 ms after the server wrote it, and the client's figure is then early by as much.
        let event = Instant::now();
        let (more, error) = read_until_error(&mut body).await;
        let measured = event.elapsed();
        assert!(more.is_empty(), "{server:?}: {more:?}");
        assert_eq!(
            h2_reason(&error),
            Some(expected_reset()),
            "{server:?}: {error:?} (source {:?})",
            error.source()
        );

        let told = harness.reports.only().await;
        assert_response_body_timeout(&told, IDLE, |b| b == EVENT_WIRE.len() as u64);
        lateness(
            &format!("{server:?}, stalled SSE over HTTP/2, idle"),
            IDLE,
            measured,
            &told,
        );
        assert_eq!(
            harness.producer_learned().await,
            (Cancelled::Abandoned, false)
        );
        harness.reports.assert_count(1);

        // A reset stream, not a closed connection: the next request on it is served.
        let next = timeout(
            SOON,
            client.request(request(Method::GET, addr, "/chunks", Bytes::new())),
        )
        .await
        .expect("a head in time")
        .unwrap();
        assert_eq!(next.status(), StatusCode::OK);
        timeout(SOON, next.into_body().collect())
            .await
            .expect("the body in time")
            .unwrap();
    }
}

/// A stream that keeps sending is cut at the total limit: reset with `CANCEL` on HTTP/2,
/// truncated on HTTP/1.1.
#[tokio::test(flavor = "current_thread")]
async fn an_endless_stream_is_cut_at_the_total_limit() {
    for proto in PROTOS {
        let mut harness = Harness::new();
        let app = harness.stream_app(ResponseBodyTimeoutLayer::new().total(STREAM_TOTAL));
        let addr = common::serve(common::Server::HyperAuto, app).await;

        let sent = Instant::now();
        let response = timeout(
            SOON,
            client(proto).request(request(Method::GET, addr, "/ticks", Bytes::new())),
        )
        .await
        .expect("a head in time")
        .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let (data, error) = read_until_error(&mut response.into_body()).await;
        let measured = sent.elapsed();
        match proto {
            Proto::H2 => assert_eq!(
                h2_reason(&error),
                Some(expected_reset()),
                "{error:?} (source {:?})",
                error.source()
            ),
            Proto::H1 => assert!(cut_short(&error), "{error:?}"),
        }

        let told = harness.reports.only().await;
        let tick = TICK.len() as u64;
        assert_response_body_timeout(&told, STREAM_TOTAL, |b| b > 0 && b % tick == 0);
        // What was sent before the limit; an HTTP/2 reset may drop some of it on the way.
        assert!(
            data.len() as u64 <= bytes_sent(&told) && data.len() % TICK.len() == 0,
            "{proto:?}: read {} bytes, {told:?}",
            data.len()
        );
        lateness(
            &format!("{proto:?}, endless stream, total"),
            STREAM_TOTAL,
            measured,
            &told,
        );
        assert_eq!(
            harness.producer_learned().await,
            (Cancelled::Abandoned, false)
        );
        harness.reports.assert_count(1);
    }
}

// ---------------------------------------------------------------------------------------------
// 6. gRPC: a stalled server stream ends with DEADLINE_EXCEEDED.

/// The probe service: `stream` sends its first reply at once, then one every `sleep_ms`.
#[derive(Clone, Default)]
struct Streams {
    signals: Arc<Mutex<Vec<ClientGone>>>,
}

fn reply(note: &str, n: u32) -> CallReply {
    CallReply {
        note: format!("{note} {n}"),
        remaining_ms: 0,
    }
}

#[tonic::async_trait]
impl Probe for Streams {
    async fn call(
        &self,
        _: tonic::Request<CallRequest>,
    ) -> Result<tonic::Response<CallReply>, Status> {
        Err(Status::unimplemented("only streams here"))
    }

    type StreamStream = ReceiverStream<Result<CallReply, Status>>;

    async fn stream(
        &self,
        request: tonic::Request<CallRequest>,
    ) -> Result<tonic::Response<Self::StreamStream>, Status> {
        let gone = ClientGone::current().expect("under a ClientDisconnectLayer");
        self.signals.lock().unwrap().push(gone);
        let request = request.into_inner();
        let (send, receive) = mpsc::channel(1);
        tokio::spawn(async move {
            for n in 0..request.count {
                if n > 0 {
                    tokio::time::sleep(Duration::from_millis(request.sleep_ms)).await;
                }
                if send.send(Ok(reply(&request.note, n))).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(receive)))
    }
}

/// Serves `streams` with tonic on loopback, behind `ClientDisconnectLayer` → `response`.
async fn serve_grpc(
    reports: &Reports,
    response: ResponseBodyTimeoutLayer,
    streams: Streams,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let layers = ServiceBuilder::new()
        .layer(ClientDisconnectLayer::new().on_outcome(reports.hook()))
        .layer(response.on_outcome(reports.hook()));
    let server = tonic::transport::Server::builder()
        .layer(layers)
        .add_service(ProbeServer::new(streams))
        // No Nagle delay on the one small reply: the client's figure would be 40 ms off.
        .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)));
    tokio::spawn(server);
    addr
}

async fn grpc_client(addr: SocketAddr) -> ProbeClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    ProbeClient::new(channel)
}

fn stream_request(note: &str, count: u32, sleep_ms: u64) -> CallRequest {
    CallRequest {
        sleep_ms,
        note: note.to_owned(),
        count,
    }
}

/// The client gets the first reply, then the call's status: `DEADLINE_EXCEEDED` from the
/// trailers the layer ends the stream with (a reset would read as `CANCELLED`, `INTERNAL` or
/// `UNKNOWN`).
#[tokio::test(flavor = "current_thread")]
async fn a_stalled_grpc_stream_ends_with_deadline_exceeded_trailers() {
    let reports = Reports::default();
    let streams = Streams::default();
    let response = ResponseBodyTimeoutLayer::new().idle(IDLE);
    let addr = serve_grpc(&reports, response, streams.clone()).await;
    let mut client = grpc_client(addr).await;

    let mut replies = timeout(SOON, client.stream(stream_request("stall", 3, 60_000)))
        .await
        .expect("a head in time")
        .unwrap()
        .into_inner();
    let first = timeout(SOON, replies.message())
        .await
        .expect("the first reply in time")
        .unwrap();
    assert_eq!(first, Some(reply("stall", 0)));
    let replied = Instant::now();
    let status = timeout(SOON, replies.message())
        .await
        .expect("the call's status in time")
        .expect_err("the stream ends with an error status");
    let measured = replied.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(
        status.message(),
        format!(
            "tower-timeouts: the response stream passed its {} ms limit",
            IDLE.as_millis()
        )
    );

    let told = reports.only().await;
    // The one message on the wire: a 5-byte prefix and the encoded reply.
    let message = 5 + reply("stall", 0).encoded_len() as u64;
    assert_response_body_timeout(&told, IDLE, |b| b == message);
    assert_eq!(told.grpc, Some(GrpcCode::DEADLINE_EXCEEDED), "{told:?}");
    lateness("gRPC server stream, idle", IDLE, measured, &told);

    let gone = streams.signals.lock().unwrap()[0].clone();
    let reason = timeout(SOON, gone.cancelled()).await.expect("cancelled");
    assert_eq!(reason, Cancelled::Abandoned);
    assert!(!gone.is_gone());
    reports.assert_count(1);
}

// ---------------------------------------------------------------------------------------------
// 7. Traffic within the limits is never cut.

/// A fast upload and a stream that ends, under both body layers, over HTTP/1.1 and HTTP/2, and
/// an upload paced within the idle limit: 200s, complete bodies, `Completed` outcomes, and no
/// signal cancelled.
#[tokio::test(flavor = "current_thread")]
async fn uploads_and_streams_within_the_limits_complete() {
    let upload = Bytes::from(vec![b'x'; 64 * 1024]);
    let streamed: String = (0..CHUNKS).map(chunk).collect();
    for server in SERVERS {
        let harness = Harness::new();
        let addr = common::serve(server, harness.both_app()).await;
        for proto in PROTOS {
            let client = client(proto);
            let cases = [
                (
                    Method::POST,
                    "/bytes",
                    upload.clone(),
                    upload.len().to_string(),
                ),
                (Method::GET, "/chunks", Bytes::new(), streamed.clone()),
            ];
            for (method, path, body, expected) in cases {
                let fetched = timeout(SOON, async {
                    let response = client
                        .request(request(method, addr, path, body))
                        .await
                        .unwrap();
                    let status = response.status();
                    (status, response.into_body().collect().await.unwrap())
                })
                .await
                .unwrap_or_else(|_| panic!("{server:?} {proto:?} {path}: no response in time"));
                assert_eq!(fetched.0, StatusCode::OK, "{server:?} {proto:?} {path}");
                assert_eq!(
                    fetched.1.to_bytes(),
                    expected.as_bytes(),
                    "{server:?} {proto:?} {path}"
                );
            }
        }
        // An upload paced like the stream, on HTTP/1.1.
        let (head, body) = paced_upload(addr).await;
        assert!(
            head.status_line.starts_with("HTTP/1.1 200 "),
            "{server:?}: {head:?}"
        );
        assert_eq!(body, (CHUNKS * PIECE).to_string().as_bytes(), "{server:?}");

        let reports = harness.reports.wait_for(5).await;
        for told in &reports {
            assert!(
                matches!(told.outcome, Outcome::Completed { status, .. } if status == StatusCode::OK),
                "{server:?}: {reports:?}"
            );
        }
        harness.reports.assert_count(5);
        let signals = harness.handlers.signals.lock().unwrap().clone();
        assert_eq!(signals.len(), 5);
        assert!(
            signals.iter().all(|gone| gone.reason().is_none()),
            "{server:?}: {signals:?}"
        );
    }
}

/// A gRPC stream whose replies come within the idle limit ends with its own `OK`.
#[tokio::test(flavor = "current_thread")]
async fn a_grpc_stream_within_its_limit_completes() {
    let reports = Reports::default();
    let streams = Streams::default();
    let response = ResponseBodyTimeoutLayer::new()
        .idle(IDLE)
        .total(Duration::from_secs(5));
    let addr = serve_grpc(&reports, response, streams.clone()).await;
    let mut client = grpc_client(addr).await;

    // Longer in all than the idle limit, each reply far within it.
    let count = 8;
    let mut replies = timeout(SOON, client.stream(stream_request("paced", count, 60)))
        .await
        .expect("a head in time")
        .unwrap()
        .into_inner();
    for n in 0..count {
        let message = timeout(SOON, replies.message()).await.expect("in time");
        assert_eq!(message.unwrap(), Some(reply("paced", n)));
    }
    let end = timeout(SOON, replies.message()).await.expect("in time");
    assert_eq!(end.unwrap(), None);

    let told = reports.only().await;
    assert!(
        matches!(told.outcome, Outcome::Completed { status, .. } if status == StatusCode::OK),
        "{told:?}"
    );
    assert_eq!(told.grpc, Some(GrpcCode::OK), "{told:?}");
    let gone = streams.signals.lock().unwrap()[0].clone();
    assert_eq!(gone.reason(), None);
    reports.assert_count(1);
}
