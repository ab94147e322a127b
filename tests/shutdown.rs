//! A server's shutdown over real TCP on loopback, as clients see it: the requests in flight get
//! a grace; those still running when it runs out get a 503 (with `Connection: close` on
//! HTTP/1.1, `UNAVAILABLE` for gRPC) or have their stream cut; each is recorded once as
//! `server_shutdown`, never as a 499; a client that leaves within the grace is still a 499.
//!
//! The servers are `axum::serve(..).with_graceful_shutdown(shutdown.begun())` and hyper-util's
//! `auto::Builder` with a `GracefulShutdown` started by `shutdown.begun()` (and tonic's
//! `serve_with_incoming_shutdown` for gRPC). The stack is `shutdown.layer().on_outcome(hook)`,
//! then a `ClientDisconnectLayer`, then a 30 s `ResponseTimeoutLayer`. Each handler says when it
//! started, and a shutdown begins only once all of them have.
//!
//! Run with `cargo test --all-features --test shutdown -- --nocapture` to see how long after
//! the end of the grace the 503s arrived.

mod common;
mod probe;

use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures_util::StreamExt;
use http::StatusCode;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tonic::transport::server::TcpIncoming;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tower::layer::util::{Identity, Stack};
use tower::ServiceBuilder;
use tower_timeouts::signal::Cancelled;
use tower_timeouts::{
    ClientDisconnectLayer, ClientGone, GrpcCode, Outcome, Phase, Report, ResponseTimeoutLayer,
    Shutdown, ShutdownLayer,
};

use common::{read_head, read_to_eof, read_until, RawHead, Server, SERVERS, SOON};
use probe::probe_client::ProbeClient;
use probe::probe_server::{Probe, ProbeServer};
use probe::{CallReply, CallRequest};

/// A grace that the handlers of the first case finish within.
const LONG_GRACE: Duration = Duration::from_secs(5);
/// A grace that runs out while the handlers still run.
const SHORT_GRACE: Duration = Duration::from_millis(300);
/// The grace of the HTTP/2 case: GOAWAY must be seen within it, whatever the machine's load.
const H2_GRACE: Duration = Duration::from_secs(1);
/// How long a `/slow` handler works once the shutdown has begun.
const WORK: Duration = Duration::from_millis(300);
/// A response timeout that never binds here.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests in flight when a shutdown begins.
const IN_FLIGHT: usize = 3;
/// The one frame `/stream` sends before it stalls.
const TICK: &[u8] = b"tick\n";
/// The frame `/tick-tock` sends once the grace has run out.
const TOCK: &[u8] = b"tock\n";

// ---------------------------------------------------------------------------------------------
// What the hook was told.

/// One report: the outcome and the gRPC status.
type Told = (Outcome, Option<GrpcCode>);

#[derive(Clone, Default)]
struct Reports(Arc<(Mutex<Vec<Told>>, Notify)>);

impl Reports {
    fn hook(&self) -> impl Fn(&Report<'_>) + Send + Sync + Clone + 'static {
        let inner = self.0.clone();
        move |report: &Report<'_>| {
            let told = (report.outcome().clone(), report.grpc_status());
            inner.0.lock().unwrap().push(told);
            inner.1.notify_waiters();
        }
    }

    fn all(&self) -> Vec<Told> {
        self.0 .0.lock().unwrap().clone()
    }

    fn outcomes(&self) -> Vec<Outcome> {
        self.all().into_iter().map(|(outcome, _)| outcome).collect()
    }

    /// Waits until at least `n` reports came (panics after [`SOON`]).
    async fn wait_for(&self, n: usize) -> Vec<Outcome> {
        let waited = timeout(SOON, async {
            loop {
                let notified = self.0 .1.notified();
                let mut notified = pin!(notified);
                notified.as_mut().enable();
                if self.0 .0.lock().unwrap().len() >= n {
                    return;
                }
                notified.await;
            }
        })
        .await;
        let outcomes = self.outcomes();
        assert!(waited.is_ok(), "expected {n} reports, got {outcomes:?}");
        outcomes
    }
}

fn is_503(outcome: &Outcome) -> bool {
    matches!(
        outcome,
        Outcome::ServerShutdown {
            phase: Phase::BeforeHead,
            sent_status: Some(StatusCode::SERVICE_UNAVAILABLE),
            ..
        }
    ) && outcome.recorded_status() == Some(StatusCode::SERVICE_UNAVAILABLE)
}

fn is_499(outcome: &Outcome) -> bool {
    matches!(
        outcome,
        Outcome::ClientDisconnected {
            phase: Phase::BeforeHead,
            sent_status: None,
            ..
        }
    ) && outcome.recorded_status().map(|status| status.as_u16()) == Some(499)
}

fn is_completed_200(outcome: &Outcome) -> bool {
    matches!(
        outcome,
        Outcome::Completed {
            status: StatusCode::OK,
            ..
        }
    )
}

/// The stack under test: the shutdown's layer outermost.
type Layers =
    Stack<ResponseTimeoutLayer, Stack<ClientDisconnectLayer, Stack<ShutdownLayer, Identity>>>;

/// The stack under test, under `shutdown`, telling `reports`.
fn layers(shutdown: &Shutdown, reports: &Reports) -> Layers {
    ServiceBuilder::new()
        .layer(shutdown.layer().on_outcome(reports.hook()))
        .layer(ClientDisconnectLayer::new())
        .layer(ResponseTimeoutLayer::new(RESPONSE_TIMEOUT))
        .into_inner()
}

// ---------------------------------------------------------------------------------------------
// The server under test.

#[derive(Clone)]
struct Handlers {
    shutdown: Shutdown,
    /// Each handler's signal, sent as it starts.
    started: mpsc::UnboundedSender<Option<ClientGone>>,
    /// Set once the server's future returned.
    stopped: Arc<AtomicBool>,
    /// For each `/slow` handler at its end: whether the server's future had returned by then.
    finished: mpsc::UnboundedSender<bool>,
}

impl Handlers {
    fn say_started(&self) {
        let _ = self.started.send(ClientGone::current());
    }
}

/// Works for [`WORK`] once the shutdown has begun, then answers 200.
async fn slow(State(handlers): State<Handlers>) -> &'static str {
    handlers.say_started();
    handlers.shutdown.begun().await;
    tokio::time::sleep(WORK).await;
    let _ = handlers
        .finished
        .send(handlers.stopped.load(Ordering::SeqCst));
    "done"
}

/// Never answers.
async fn never(State(handlers): State<Handlers>) -> &'static str {
    handlers.say_started();
    std::future::pending().await
}

/// Answers 200 with a stream of one frame, [`TICK`], then nothing, ever.
async fn stream(State(handlers): State<Handlers>) -> Body {
    handlers.say_started();
    let frames = futures_util::stream::once(async { Ok::<_, std::io::Error>(Bytes::from(TICK)) })
        .chain(futures_util::stream::pending());
    Body::from_stream(frames)
}

/// Answers 200 with a stream of [`TICK`], then [`TOCK`] once the grace has run out, then
/// nothing, ever.
async fn tick_tock(State(handlers): State<Handlers>) -> Body {
    handlers.say_started();
    let grace_over = handlers.shutdown.grace_over();
    let tick = futures_util::stream::once(async { Ok::<_, std::io::Error>(Bytes::from(TICK)) });
    let tock = futures_util::stream::once(async move {
        grace_over.await;
        Ok(Bytes::from(TOCK))
    });
    Body::from_stream(tick.chain(tock).chain(futures_util::stream::pending()))
}

async fn fast() -> &'static str {
    "fast"
}

/// A server under a [`Shutdown`], and what its handlers tell.
struct Harness {
    shutdown: Shutdown,
    reports: Reports,
    addr: SocketAddr,
    /// The server's task: it ends when the server's future returns.
    server: JoinHandle<()>,
    started: mpsc::UnboundedReceiver<Option<ClientGone>>,
    finished: mpsc::UnboundedReceiver<bool>,
}

/// Whether the server drains when the shutdown begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Drain {
    /// Its graceful shutdown starts on `shutdown.begun()`.
    OnBegun,
    /// It is not told: it serves on, keep-alive and all.
    Never,
}

impl Harness {
    async fn start(server: Server, grace: Duration) -> Harness {
        Harness::start_with(server, grace, Drain::OnBegun).await
    }

    async fn start_with(server: Server, grace: Duration, drain: Drain) -> Harness {
        let shutdown = Shutdown::new(grace);
        let reports = Reports::default();
        let (started_tx, started) = mpsc::unbounded_channel();
        let (finished_tx, finished) = mpsc::unbounded_channel();
        let stopped = Arc::new(AtomicBool::new(false));
        let handlers = Handlers {
            shutdown: shutdown.clone(),
            started: started_tx,
            stopped: stopped.clone(),
            finished: finished_tx,
        };
        let app = Router::new()
            .route("/slow", get(slow))
            .route("/never", get(never))
            .route("/stream", get(stream))
            .route("/tick-tock", get(tick_tock))
            .route("/fast", get(fast))
            .with_state(handlers)
            .layer(layers(&shutdown, &reports));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let signal = shutdown.begun();
        let serving = async move {
            match drain {
                Drain::OnBegun => serve(server, listener, app, signal).await,
                Drain::Never => serve(server, listener, app, std::future::pending()).await,
            }
        };
        let server = tokio::spawn(async move {
            serving.await;
            stopped.store(true, Ordering::SeqCst);
        });
        Harness {
            shutdown,
            reports,
            addr,
            server,
            started,
            finished,
        }
    }

    /// Waits for the next handler to start; returns its signal.
    async fn next_started(&mut self) -> ClientGone {
        timeout(SOON, self.started.recv())
            .await
            .expect("a handler started in time")
            .expect("the server is up")
            .expect("a ClientGone under the ClientDisconnectLayer")
    }

    /// Sends a GET of `path` on a connection of its own and waits for its handler to start.
    async fn in_flight(&mut self, path: &str) -> (TcpStream, ClientGone) {
        let stream = send_get(self.addr, path).await;
        let gone = self.next_started().await;
        (stream, gone)
    }

    /// Waits for the server's future to return (panics after [`SOON`]).
    async fn wait_stopped(self) -> Reports {
        timeout(SOON, self.server)
            .await
            .expect("the server's future returned")
            .unwrap();
        self.reports
    }
}

/// Serves `app` on `listener` with `server` until `signal`, then drains.
async fn serve(
    server: Server,
    listener: TcpListener,
    app: Router,
    signal: impl std::future::Future<Output = ()> + Send + 'static,
) {
    match server {
        Server::AxumServe => axum::serve(listener, app)
            .with_graceful_shutdown(signal)
            .await
            .unwrap(),
        #[cfg(feature = "axum")]
        Server::Watched => axum::serve(tower_timeouts::watch::WatchedListener::new(listener), app)
            .with_graceful_shutdown(signal)
            .await
            .unwrap(),
        Server::HyperAuto => {
            let graceful = GracefulShutdown::new();
            let builder = auto::Builder::new(TokioExecutor::new());
            let mut begun = pin!(signal);
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = &mut begun => break,
                };
                let Ok((stream, _)) = accepted else {
                    continue;
                };
                stream.set_nodelay(true).unwrap();
                let service = TowerToHyperService::new(app.clone());
                let connection = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    let _ = connection.await;
                });
            }
            // Stop accepting, then tell every connection to end after its requests in flight.
            drop(listener);
            graceful.shutdown().await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1 clients.

async fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

async fn send_get(addr: SocketAddr, path: &str) -> TcpStream {
    let mut stream = connect(addr).await;
    let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// A response head read off a raw HTTP/1.1 connection, and what came after it.
/// Reads a whole response whose connection the server closes after it.
async fn read_response_and_close(mut stream: TcpStream) -> (RawHead, Vec<u8>) {
    let head = read_head(&mut stream).await;
    let mut body = head.after.clone();
    read_to_eof(&mut stream, &mut body).await;
    (head, body)
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

// ---------------------------------------------------------------------------------------------
// HTTP/2 (h2c, prior knowledge) clients, with the h2 crate, which shows GOAWAY and resets.

type H2Send = h2::client::SendRequest<Bytes>;

/// An h2c connection; the task drives it, and ends when the connection does.
async fn h2_connect(addr: SocketAddr) -> (H2Send, JoinHandle<Result<(), h2::Error>>) {
    let (send, connection) = h2::client::handshake(connect(addr).await).await.unwrap();
    (send, tokio::spawn(connection))
}

fn h2_get(addr: SocketAddr, path: &str) -> http::Request<()> {
    http::Request::get(format!("http://{addr}{path}"))
        .body(())
        .unwrap()
}

/// Opens a GET stream of `path`; the task gives its status, `connection` header and body.
async fn h2_stream(
    send: &mut H2Send,
    addr: SocketAddr,
    path: &str,
) -> JoinHandle<Result<(StatusCode, Option<String>, Vec<u8>), h2::Error>> {
    let ready = timeout(SOON, send.clone().ready())
        .await
        .expect("ready in time")
        .unwrap();
    *send = ready;
    let (response, _) = send.send_request(h2_get(addr, path), true).unwrap();
    tokio::spawn(async move {
        let response = response.await?;
        let status = response.status();
        let connection = response
            .headers()
            .get(http::header::CONNECTION)
            .map(|value| value.to_str().unwrap().to_owned());
        let mut body = response.into_body();
        let mut data = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            data.extend_from_slice(&chunk);
        }
        Ok((status, connection, data))
    })
}

/// Whether the connection refuses new streams now; the error says why.
async fn h2_refuses_streams(send: &mut H2Send) -> Option<h2::Error> {
    std::future::poll_fn(|cx| {
        Poll::Ready(match send.poll_ready(cx) {
            Poll::Ready(Err(error)) => Some(error),
            _ => None,
        })
    })
    .await
}

/// The reset a stream cut by the end of the grace gets: `CANCEL`, which hyper takes from the
/// error's source with the `h2` feature.
fn expected_reset() -> h2::Reason {
    if cfg!(feature = "h2") {
        h2::Reason::CANCEL
    } else {
        h2::Reason::INTERNAL_ERROR
    }
}

// ---------------------------------------------------------------------------------------------
// 1. A long grace: the requests in flight finish.

/// Three slow requests in flight when the shutdown begins, with a grace longer than their work:
/// each client gets its 200 (and then hyper closes the connection, as a graceful shutdown
/// does); each request is recorded once as a completion; no `ClientGone` is cancelled; the
/// server's future returns only after the handlers finished.
#[tokio::test]
async fn requests_that_finish_within_the_grace_complete() {
    for server in SERVERS {
        let mut harness = Harness::start(server, LONG_GRACE).await;
        let mut clients = Vec::new();
        let mut signals = Vec::new();
        for _ in 0..IN_FLIGHT {
            let (stream, gone) = harness.in_flight("/slow").await;
            clients.push(tokio::spawn(read_response_and_close(stream)));
            signals.push(gone);
        }
        harness.shutdown.begin();

        for client in clients {
            let (head, body) = timeout(SOON, client).await.unwrap().unwrap();
            assert!(
                head.status_line.starts_with("HTTP/1.1 200 "),
                "{server:?}: {head:?}"
            );
            assert_eq!(body, b"done", "{server:?}");
            // A graceful shutdown ends each HTTP/1 connection after its request in flight.
            assert_eq!(head.header("connection"), Some("close"), "{server:?}");
        }
        for _ in 0..IN_FLIGHT {
            let server_had_stopped = timeout(SOON, harness.finished.recv())
                .await
                .unwrap()
                .unwrap();
            assert!(!server_had_stopped, "{server:?}: the server did not wait");
        }
        assert!(!harness.shutdown.is_grace_over(), "{server:?}");
        let shutdown = harness.shutdown.clone();
        let reports = harness.wait_stopped().await;
        let outcomes = reports.outcomes();
        assert_eq!(outcomes.len(), IN_FLIGHT, "{server:?}: {outcomes:?}");
        assert!(
            outcomes.iter().all(is_completed_200),
            "{server:?}: {outcomes:?}"
        );
        for gone in &signals {
            assert!(!gone.is_gone(), "{server:?}");
            assert_eq!(gone.reason(), None, "{server:?}");
        }
        assert!(!shutdown.is_grace_over(), "{server:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 2. A short grace: a 503 for each request still running.

/// Three requests that never finish, on three HTTP/1.1 connections, when a short grace runs
/// out: each client gets `503` with `connection: close`, then the server closes the connection
/// (FIN); each request is recorded once as `server_shutdown` (503, before the head), never as
/// a 499; each handler's `ClientGone` is cancelled with `ServerShutdown`, and `gone()` does not
/// fire. Prints how long after the end of the grace the 503s arrived.
#[tokio::test]
async fn requests_still_running_when_the_grace_runs_out_get_503_and_a_closed_connection() {
    const ROUNDS: usize = 3;
    for server in SERVERS {
        let mut after_grace = Vec::new();
        for round in 0..ROUNDS {
            let mut harness = Harness::start(server, SHORT_GRACE).await;
            let mut clients = Vec::new();
            let mut signals = Vec::new();
            for _ in 0..IN_FLIGHT {
                let (stream, gone) = harness.in_flight("/never").await;
                clients.push(tokio::spawn(read_response_and_close(stream)));
                signals.push(gone);
            }
            let began = Instant::now();
            harness.shutdown.begin();
            let grace_end = began + SHORT_GRACE;

            let mut round_after = Vec::new();
            for client in clients {
                let (head, body) = timeout(SOON, client).await.unwrap().unwrap();
                assert!(
                    head.status_line.starts_with("HTTP/1.1 503 "),
                    "{server:?}: {head:?}"
                );
                assert_eq!(head.header("connection"), Some("close"), "{server:?}");
                assert_eq!(body, b"503 Service Unavailable\n", "{server:?}");
                assert!(
                    head.at >= grace_end,
                    "{server:?}: a 503 {:?} before the end of the grace",
                    grace_end - head.at
                );
                round_after.push(head.at - grace_end);
            }
            eprintln!("{server:?} round {round}: 503s {round_after:?} after the grace");
            after_grace.extend(round_after);

            let outcomes = harness.reports.wait_for(IN_FLIGHT).await;
            assert!(outcomes.iter().all(is_503), "{server:?}: {outcomes:?}");
            for gone in &signals {
                assert_eq!(gone.reason(), Some(Cancelled::ServerShutdown), "{server:?}");
                assert!(!gone.is_gone(), "{server:?}");
            }
            let reports = harness.wait_stopped().await;
            let outcomes = reports.outcomes();
            assert_eq!(outcomes.len(), IN_FLIGHT, "{server:?}: {outcomes:?}");
            assert!(!outcomes.iter().any(is_499), "{server:?}: {outcomes:?}");
        }
        after_grace.sort();
        eprintln!(
            "{server:?}: {} 503s after the grace: median {:?}, max {:?}",
            after_grace.len(),
            after_grace[after_grace.len() / 2],
            after_grace[after_grace.len() - 1]
        );
    }
}

/// The 503's own `Connection: close` ends the connection, even on a server that was not told to
/// drain (a server of the process not wired to `shutdown.begun()`): a server in its graceful
/// shutdown would close the connection after the 503 anyway (hyper then adds
/// `connection: close` itself), so only such a server shows the header doing its work.
#[tokio::test]
async fn the_503_closes_its_connection_even_on_a_server_not_draining() {
    for server in SERVERS {
        let mut harness = Harness::start_with(server, SHORT_GRACE, Drain::Never).await;
        let (mut stream, gone) = harness.in_flight("/never").await;
        harness.shutdown.begin();
        let head = read_head(&mut stream).await;
        assert!(
            head.status_line.starts_with("HTTP/1.1 503 "),
            "{server:?}: {head:?}"
        );
        assert_eq!(head.header("connection"), Some("close"), "{server:?}");
        let mut body = head.after;
        read_to_eof(&mut stream, &mut body).await;
        assert_eq!(body, b"503 Service Unavailable\n", "{server:?}");
        let outcomes = harness.reports.wait_for(1).await;
        assert!(
            matches!(&outcomes[..], [shut] if is_503(shut)),
            "{server:?}: {outcomes:?}"
        );
        assert_eq!(gone.reason(), Some(Cancelled::ServerShutdown), "{server:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 3. No new requests once the shutdown has begun.

/// Once the shutdown has begun, and while a request in flight keeps the server draining: an
/// idle HTTP/1.1 keep-alive connection opened before is closed by the server (FIN, nothing
/// sent), and a new connect to the listener's address is refused (`ConnectionRefused`: both
/// servers dropped their listener). The request in flight runs on until the end of the grace.
#[tokio::test]
async fn no_new_request_is_served_once_the_shutdown_has_begun() {
    for server in SERVERS {
        let mut harness = Harness::start(server, LONG_GRACE).await;
        let addr = harness.addr;

        // A keep-alive connection that served a request and is idle now.
        let mut idle = send_get(addr, "/fast").await;
        let head = read_head(&mut idle).await;
        assert!(head.status_line.starts_with("HTTP/1.1 200 "), "{head:?}");
        assert_eq!(head.header("connection"), None, "{server:?}: {head:?}");
        let mut body = head.after;
        read_until(&mut idle, &mut body, b"fast").await;

        let (in_flight, _gone) = harness.in_flight("/never").await;
        let in_flight = tokio::spawn(read_response_and_close(in_flight));
        harness.shutdown.begin();

        // The idle connection is closed, with nothing sent.
        let mut after = Vec::new();
        read_to_eof(&mut idle, &mut after).await;
        assert_eq!(after, b"", "{server:?}");

        // A new connection is refused.
        let connected = timeout(SOON, TcpStream::connect(addr))
            .await
            .expect("the connect ends in time");
        let error = connected.expect_err("a new connect is refused");
        assert_eq!(
            error.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{server:?}: {error}"
        );

        // The request in flight was still running, and gets its 503 at the end of the grace.
        assert!(!in_flight.is_finished(), "{server:?}");
        assert!(!harness.shutdown.is_grace_over(), "{server:?}");
        harness.shutdown.end_grace();
        let (head, _) = timeout(SOON, in_flight).await.unwrap().unwrap();
        assert!(head.status_line.starts_with("HTTP/1.1 503 "), "{head:?}");
        let reports = harness.wait_stopped().await;
        let outcomes = reports.outcomes();
        let [completed, shut] = &outcomes[..] else {
            panic!("{server:?}: two reports, not {outcomes:?}");
        };
        assert!(is_completed_200(completed), "{server:?}: {outcomes:?}");
        assert!(is_503(shut), "{server:?}: {outcomes:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 4. HTTP/2: GOAWAY, then a 503 on each stream still open.

/// Three concurrent streams on one h2c connection when a grace of a second runs out: the client
/// gets `GOAWAY` (`NO_ERROR`) as the shutdown begins, so the connection refuses new streams,
/// while the three streams stay open; at the end of the grace each gets a 503 (without a
/// `connection` header, which HTTP/2 forbids), and then the connection ends. Three
/// `server_shutdown` reports, no 499.
#[tokio::test]
async fn http2_streams_get_goaway_then_a_503_each() {
    for server in SERVERS {
        let mut harness = Harness::start(server, H2_GRACE).await;
        let addr = harness.addr;
        let (mut send, connection) = h2_connect(addr).await;
        let mut streams = Vec::new();
        let mut signals = Vec::new();
        for _ in 0..IN_FLIGHT {
            streams.push(h2_stream(&mut send, addr, "/never").await);
            signals.push(harness.next_started().await);
        }
        assert!(h2_refuses_streams(&mut send).await.is_none());
        let began = Instant::now();
        harness.shutdown.begin();

        // GOAWAY: the connection refuses new streams (polled, within a bound: nothing else on
        // the client side tells when the frame arrived).
        let goaway = timeout(SOON, async {
            loop {
                if let Some(error) = h2_refuses_streams(&mut send).await {
                    return error;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .expect("GOAWAY in time");
        let goaway_after = began.elapsed();
        assert!(goaway.is_go_away(), "{server:?}: {goaway:?}");
        assert!(goaway.is_remote(), "{server:?}: {goaway:?}");
        assert_eq!(goaway.reason(), Some(h2::Reason::NO_ERROR), "{server:?}");
        assert!(!harness.shutdown.is_grace_over(), "{server:?}");
        let refused = send
            .send_request(h2_get(addr, "/fast"), true)
            .expect_err("no new stream after GOAWAY");
        assert!(refused.is_go_away(), "{server:?}: {refused:?}");

        let mut after_grace = Vec::new();
        for stream in streams {
            let (status, connection, body) = timeout(SOON, stream).await.unwrap().unwrap().unwrap();
            after_grace.push(began.elapsed().saturating_sub(H2_GRACE));
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{server:?}");
            assert_eq!(connection, None, "{server:?}");
            assert_eq!(body, b"503 Service Unavailable\n", "{server:?}");
        }
        let ended = timeout(SOON, connection)
            .await
            .expect("the connection ends")
            .unwrap();
        eprintln!(
            "{server:?} h2: GOAWAY {goaway_after:?} after begin; 503s {after_grace:?} after the \
             grace; the connection then ended with {ended:?}"
        );

        for gone in &signals {
            assert_eq!(gone.reason(), Some(Cancelled::ServerShutdown), "{server:?}");
        }
        let reports = harness.wait_stopped().await;
        let outcomes = reports.outcomes();
        assert_eq!(outcomes.len(), IN_FLIGHT, "{server:?}: {outcomes:?}");
        assert!(outcomes.iter().all(is_503), "{server:?}: {outcomes:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 5. gRPC: UNAVAILABLE.

/// The `Probe` service: `call` says it started, then sleeps `sleep_ms`.
#[derive(Clone)]
struct GrpcHandler {
    started: mpsc::UnboundedSender<Option<ClientGone>>,
}

#[tonic::async_trait]
impl Probe for GrpcHandler {
    async fn call(
        &self,
        request: tonic::Request<CallRequest>,
    ) -> Result<tonic::Response<CallReply>, Status> {
        let _ = self.started.send(ClientGone::current());
        let request = request.into_inner();
        tokio::time::sleep(Duration::from_millis(request.sleep_ms)).await;
        Ok(tonic::Response::new(CallReply {
            note: request.note,
            remaining_ms: 0,
        }))
    }

    type StreamStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<CallReply, Status>> + Send>>;

    async fn stream(
        &self,
        _: tonic::Request<CallRequest>,
    ) -> Result<tonic::Response<Self::StreamStream>, Status> {
        Err(Status::unimplemented("not used here"))
    }
}

/// A slow unary call on a tonic server when a short grace runs out: the client gets
/// `UNAVAILABLE` (14, a trailers-only answer in the handler's place), recorded once as
/// `server_shutdown`; the handler's `ClientGone` is cancelled with `ServerShutdown`; the server
/// then stops.
#[tokio::test]
async fn a_grpc_call_still_running_when_the_grace_runs_out_gets_unavailable() {
    let shutdown = Shutdown::new(SHORT_GRACE);
    let reports = Reports::default();
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = tonic::transport::Server::builder()
        .layer(layers(&shutdown, &reports))
        .add_service(ProbeServer::new(GrpcHandler {
            started: started_tx,
        }))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown.begun());
    let server = tokio::spawn(serving);

    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ProbeClient::new(channel);
    let call = tokio::spawn(async move {
        client
            .call(CallRequest {
                sleep_ms: 60_000,
                note: "slow".to_owned(),
                count: 0,
            })
            .await
    });
    let gone = timeout(SOON, started.recv())
        .await
        .expect("the handler started in time")
        .unwrap()
        .expect("a ClientGone under the ClientDisconnectLayer");
    let began = Instant::now();
    shutdown.begin();

    let status = timeout(SOON, call)
        .await
        .unwrap()
        .unwrap()
        .expect_err("UNAVAILABLE");
    let after_grace = began.elapsed().saturating_sub(SHORT_GRACE);
    eprintln!("gRPC: {status:?}, {after_grace:?} after the grace");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.message(),
        "tower-timeouts: the server is shutting down"
    );
    assert_eq!(gone.reason(), Some(Cancelled::ServerShutdown));
    assert!(!gone.is_gone());

    timeout(SOON, server)
        .await
        .expect("the server stopped")
        .unwrap()
        .unwrap();
    reports.wait_for(1).await;
    let told = reports.all();
    assert!(
        matches!(
            &told[..],
            [(
                Outcome::ServerShutdown {
                    phase: Phase::BeforeHead,
                    sent_status: Some(StatusCode::OK),
                    ..
                },
                Some(GrpcCode::UNAVAILABLE)
            )]
        ),
        "{told:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. A client that leaves within the grace is still a 499.

/// Of three requests in flight, one client closes its connection after the shutdown began:
/// that request is recorded as a 499 (`client_disconnected`) and its `ClientGone` fires; the
/// other two still get their 503 when the grace ends (here ended early, once the 499 was
/// recorded, so that the order does not depend on the machine's speed).
#[tokio::test]
async fn a_client_that_leaves_within_the_grace_is_a_499_and_the_others_get_503() {
    for server in SERVERS {
        let mut harness = Harness::start(server, LONG_GRACE).await;
        let (leaving, leaving_gone) = harness.in_flight("/never").await;
        let mut staying = Vec::new();
        let mut signals = Vec::new();
        for _ in 1..IN_FLIGHT {
            let (stream, gone) = harness.in_flight("/never").await;
            staying.push(tokio::spawn(read_response_and_close(stream)));
            signals.push(gone);
        }
        harness.shutdown.begin();
        drop(leaving);

        let outcomes = harness.reports.wait_for(1).await;
        assert!(
            matches!(&outcomes[..], [left] if is_499(left)),
            "{server:?}: {outcomes:?}"
        );
        timeout(SOON, leaving_gone.gone())
            .await
            .expect("ClientGone fired");
        assert!(leaving_gone.is_gone());
        assert!(!harness.shutdown.is_grace_over(), "{server:?}");

        harness.shutdown.end_grace();
        for client in staying {
            let (head, _) = timeout(SOON, client).await.unwrap().unwrap();
            assert!(
                head.status_line.starts_with("HTTP/1.1 503 "),
                "{server:?}: {head:?}"
            );
            assert_eq!(head.header("connection"), Some("close"), "{server:?}");
        }
        for gone in &signals {
            assert_eq!(gone.reason(), Some(Cancelled::ServerShutdown), "{server:?}");
        }
        let reports = harness.wait_stopped().await;
        let outcomes = reports.outcomes();
        assert_eq!(outcomes.len(), IN_FLIGHT, "{server:?}: {outcomes:?}");
        assert!(is_499(&outcomes[0]), "{server:?}: {outcomes:?}");
        assert!(outcomes[1..].iter().all(is_503), "{server:?}: {outcomes:?}");
    }
}

/// A request still in flight when the runtime goes away after the grace (the process stopping
/// without waiting for the server): the handler is dropped without being polled to its 503,
/// and that is recorded once as `server_shutdown` with nothing sent, never as a 499; its
/// `ClientGone` is cancelled with `ServerShutdown`. The client sees its connection closed (an
/// orderly EOF) with no response.
#[test]
fn a_request_dropped_with_the_runtime_after_the_grace_is_server_shutdown() {
    use std::io::Read;

    for server in SERVERS {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut harness = runtime.block_on(Harness::start(server, LONG_GRACE));
        let mut client = std::net::TcpStream::connect(harness.addr).unwrap();
        client.set_read_timeout(Some(SOON)).unwrap();
        std::io::Write::write_all(
            &mut client,
            b"GET /never HTTP/1.1\r\nhost: localhost\r\n\r\n",
        )
        .unwrap();
        // The runtime runs only within `block_on`: the server serves until the handler started.
        let gone = runtime.block_on(harness.next_started());
        harness.shutdown.end_grace();
        // Nothing polls the request again: the runtime drops it with its connection.
        drop(runtime);

        let outcomes = harness.reports.outcomes();
        assert!(
            matches!(
                &outcomes[..],
                [Outcome::ServerShutdown {
                    phase: Phase::BeforeHead,
                    sent_status: None,
                    ..
                }]
            ),
            "{server:?}: {outcomes:?}"
        );
        assert_eq!(gone.reason(), Some(Cancelled::ServerShutdown), "{server:?}");
        assert!(!gone.is_gone(), "{server:?}");
        let mut seen = Vec::new();
        let read = client.read_to_end(&mut seen);
        assert!(read.is_ok(), "{server:?}: {read:?}");
        assert_eq!(seen, b"", "{server:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 7. A stream under way at the end of the grace is cut.

/// A response streaming when a short grace runs out (one frame sent, then nothing) on
/// HTTP/1.1: the client has the head and the frame, then the server closes the connection
/// without the chunked body's end; recorded once as `server_shutdown` during the body, with the
/// 200 and the bytes already sent.
#[tokio::test]
async fn an_http1_stream_under_way_at_the_end_of_the_grace_is_cut() {
    for server in SERVERS {
        let mut harness = Harness::start(server, SHORT_GRACE).await;
        let (mut stream, gone) = harness.in_flight("/stream").await;
        let head = read_head(&mut stream).await;
        assert!(head.status_line.starts_with("HTTP/1.1 200 "), "{head:?}");
        assert_eq!(
            head.header("transfer-encoding"),
            Some("chunked"),
            "{head:?}"
        );
        let mut raw = head.after;
        read_until(&mut stream, &mut raw, TICK).await;
        let began = Instant::now();
        harness.shutdown.begin();

        read_to_eof(&mut stream, &mut raw).await;
        let cut_after = began.elapsed().saturating_sub(SHORT_GRACE);
        let (data, terminated) = decode_chunked(&raw);
        assert_eq!(data, TICK, "{server:?}");
        assert!(!terminated, "{server:?}: the stream was not cut");
        eprintln!("{server:?} h1 stream: closed {cut_after:?} after the grace");

        let outcomes = harness.reports.wait_for(1).await;
        assert_stream_cut(server, &outcomes);
        assert_eq!(gone.reason(), Some(Cancelled::ServerShutdown), "{server:?}");
        assert!(!gone.is_gone(), "{server:?}");
        let reports = harness.wait_stopped().await;
        assert_eq!(reports.outcomes().len(), 1, "{server:?}");
    }
}

/// The same on HTTP/2: the client has the head and the frame, then the stream is reset with
/// `CANCEL`.
#[tokio::test]
async fn an_http2_stream_under_way_at_the_end_of_the_grace_is_reset() {
    for server in SERVERS {
        let mut harness = Harness::start(server, SHORT_GRACE).await;
        let addr = harness.addr;
        let (mut send, connection) = h2_connect(addr).await;
        send = timeout(SOON, send.ready()).await.unwrap().unwrap();
        let (response, _) = send.send_request(h2_get(addr, "/stream"), true).unwrap();
        let gone = harness.next_started().await;
        let response = timeout(SOON, response).await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let frame = timeout(SOON, body.data()).await.unwrap().unwrap().unwrap();
        assert_eq!(&frame[..], TICK);
        let began = Instant::now();
        harness.shutdown.begin();

        let error = timeout(SOON, body.data())
            .await
            .expect("the stream is reset in time")
            .expect("an error, not the end of the stream")
            .expect_err("an error, not more data");
        let cut_after = began.elapsed().saturating_sub(SHORT_GRACE);
        assert!(error.is_reset(), "{server:?}: {error:?}");
        assert!(error.is_remote(), "{server:?}: {error:?}");
        assert_eq!(error.reason(), Some(expected_reset()), "{server:?}");
        let ended = timeout(SOON, connection)
            .await
            .expect("the connection ends")
            .unwrap();
        eprintln!(
            "{server:?} h2 stream: reset {cut_after:?} after the grace; the connection then \
             ended with {ended:?}"
        );

        let outcomes = harness.reports.wait_for(1).await;
        assert_stream_cut(server, &outcomes);
        assert_eq!(gone.reason(), Some(Cancelled::ServerShutdown), "{server:?}");
        let reports = harness.wait_stopped().await;
        assert_eq!(reports.outcomes().len(), 1, "{server:?}");
    }
}

fn assert_stream_cut(server: Server, outcomes: &[Outcome]) {
    let bytes = TICK.len() as u64;
    assert!(
        matches!(
            outcomes,
            [Outcome::ServerShutdown {
                phase: Phase::DuringBody,
                sent_status: Some(StatusCode::OK),
                bytes_sent,
                ..
            }] if *bytes_sent == bytes
        ),
        "{server:?}: {outcomes:?}"
    );
}

/// A frame that becomes ready just as the grace runs out (the handler's stream waits for the
/// end of the grace) is dropped, not sent, and must not count as sent: the recorded
/// `bytes_sent` is what the client received.
#[tokio::test]
async fn a_frame_dropped_at_the_end_of_the_grace_is_not_counted_as_sent() {
    for server in SERVERS {
        let mut harness = Harness::start(server, SHORT_GRACE).await;
        let (mut stream, _gone) = harness.in_flight("/tick-tock").await;
        let head = read_head(&mut stream).await;
        assert!(head.status_line.starts_with("HTTP/1.1 200 "), "{head:?}");
        let mut raw = head.after;
        read_until(&mut stream, &mut raw, TICK).await;
        harness.shutdown.begin();

        read_to_eof(&mut stream, &mut raw).await;
        let (data, terminated) = decode_chunked(&raw);
        assert!(!terminated, "{server:?}: the stream was not cut");
        let outcomes = harness.reports.wait_for(1).await;
        assert!(
            matches!(
                &outcomes[..],
                [Outcome::ServerShutdown {
                    phase: Phase::DuringBody,
                    sent_status: Some(StatusCode::OK),
                    bytes_sent,
                    ..
                }] if *bytes_sent == data.len() as u64
            ),
            "{server:?}: the client got {} bytes ({:?}); recorded {outcomes:?}",
            data.len(),
            String::from_utf8_lossy(&data)
        );
    }
}
