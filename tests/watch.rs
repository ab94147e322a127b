//! The connection watcher, over real TCP (and TLS, and a Unix socket) on loopback: every HTTP/1
//! client that hyper cannot see leave (an unread body, a partial upload, `Expect:
//! 100-continue`, a chunked body, an idle stream) is recorded as having left, its handler
//! dropped and its signal fired; and nothing else is (pipelined requests, idle keep-alive, a
//! client that leaves after its whole answer, HTTP/2).
//!
//! Run with `cargo test --all-features --test watch -- --nocapture` to see how soon after the close each
//! departure is recorded.

#![cfg(unix)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use common::{Live, Outcomes, SOON};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::rustls;
use tower_timeouts::watch::{Watched, WatchedListener};
use tower_timeouts::{ClientDisconnectLayer, ClientGone, Outcome, Phase};

/// A generous bound from the client's close to the recorded outcome; without the watcher the
/// handlers here never end, so anything recorded at all is the watcher's doing.
const WITHIN: Duration = Duration::from_secs(1);
/// How long `/slow` takes to answer.
const SLOW: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------------------------
// The app: handlers that never read their request body, and what they report.

#[derive(Clone)]
struct Handles {
    records: Outcomes,
    live: Live,
    started: mpsc::UnboundedSender<&'static str>,
    signalled: mpsc::UnboundedSender<&'static str>,
}

struct Harness {
    handles: Handles,
    started: mpsc::UnboundedReceiver<&'static str>,
    signalled: mpsc::UnboundedReceiver<&'static str>,
}

impl Harness {
    fn new() -> (Harness, Router) {
        let (started_tx, started) = mpsc::unbounded_channel();
        let (signalled_tx, signalled) = mpsc::unbounded_channel();
        let handles = Handles {
            records: Outcomes::new(),
            live: Live::new(),
            started: started_tx,
            signalled: signalled_tx,
        };
        let app = Router::new()
            .route("/hold", get(hold).post(hold))
            .route("/stream", get(stream).post(stream))
            .route("/fast", get(fast).post(fast))
            .route("/slow", get(slow).post(slow))
            .layer(ClientDisconnectLayer::new().on_outcome(handles.records.hook()))
            .with_state(handles.clone());
        let harness = Harness {
            handles,
            started,
            signalled,
        };
        (harness, app)
    }

    async fn started(&mut self) -> &'static str {
        next(&mut self.started, "a handler to start").await
    }

    /// After a departure: the spawned work saw the signal, and the handler (or body) was
    /// dropped.
    async fn assert_signalled_and_dropped(&mut self, what: &str) {
        assert_eq!(next(&mut self.signalled, "the signal").await, what);
        self.handles.live.wait_zero().await;
    }
}

async fn next(receiver: &mut mpsc::UnboundedReceiver<&'static str>, what: &str) -> &'static str {
    tokio::time::timeout(SOON, receiver.recv())
        .await
        .unwrap_or_else(|_| panic!("no {what} within {SOON:?}"))
        .unwrap()
}

impl Handles {
    /// Marks a handler as started, and spawns work that waits for its client to leave.
    fn start(&self, name: &'static str) {
        let gone = ClientGone::current().expect("under ClientDisconnectLayer");
        let signalled = self.signalled.clone();
        tokio::spawn(async move {
            gone.gone().await;
            let _ = signalled.send(name);
        });
        let _ = self.started.send(name);
    }
}

/// Never reads its body, never answers.
async fn hold(State(handles): State<Handles>) -> &'static str {
    let _live = handles.live.enter();
    handles.start("hold");
    std::future::pending().await
}

/// Never reads its body; answers with a stream that sends one chunk, then nothing.
async fn stream(State(handles): State<Handles>) -> Body {
    handles.start("stream");
    Body::new(Idle {
        first: Some(Bytes::from_static(b"data: first\n\n")),
        _live: handles.live.enter(),
    })
}

struct Idle {
    first: Option<Bytes>,
    _live: common::LiveGuard,
}

impl http_body::Body for Idle {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        match self.first.take() {
            Some(first) => Poll::Ready(Some(Ok(http_body::Frame::data(first)))),
            None => Poll::Pending,
        }
    }
}

async fn fast() -> &'static str {
    "fast"
}

/// Never reads its body; answers after [`SLOW`].
async fn slow(State(handles): State<Handles>) -> &'static str {
    let _live = handles.live.enter();
    tokio::time::sleep(SLOW).await;
    "slow"
}

// ---------------------------------------------------------------------------------------------
// Servers and clients.

/// How the app is served; every way watches its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Serving {
    /// `axum::serve` with a `WatchedListener` over a `TcpListener`.
    Axum,
    /// hyper-util's `auto::Builder`, each accepted stream `Watched`.
    Hyper,
    /// The same, with rustls above the watched stream.
    Tls,
    /// `axum::serve` with a `WatchedListener` over a `UnixListener`.
    Unix,
}

const SERVINGS: [Serving; 4] = [Serving::Axum, Serving::Hyper, Serving::Tls, Serving::Unix];

/// Where a server listens.
#[derive(Clone)]
enum Addr {
    Tcp(SocketAddr),
    Tls(SocketAddr, tokio_rustls::TlsConnector),
    Unix(PathBuf),
}

async fn serve(serving: Serving, app: Router, half_close: bool) -> Addr {
    if serving == Serving::Unix {
        let path = std::env::temp_dir().join(format!(
            "tower-timeouts-watch-{}-{}.sock",
            std::process::id(),
            rand_suffix()
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let listener = WatchedListener::new(listener).half_close(half_close);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        return Addr::Unix(path);
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    match serving {
        Serving::Axum => {
            let listener = WatchedListener::new(listener).half_close(half_close);
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
            Addr::Tcp(addr)
        }
        Serving::Hyper | Serving::Tls => {
            let (acceptor, connector) = tls();
            let tls = serving == Serving::Tls;
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    stream.set_nodelay(true).unwrap();
                    let watched = Watched::new(stream).half_close(half_close);
                    let service = hyper_util::service::TowerToHyperService::new(app.clone());
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let builder =
                            hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                        let _ = if tls {
                            let Ok(stream) = acceptor.accept(watched).await else {
                                return;
                            };
                            builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await
                        } else {
                            builder
                                .serve_connection(TokioIo::new(watched), service)
                                .await
                        };
                    });
                }
            });
            if tls {
                Addr::Tls(addr, connector)
            } else {
                Addr::Tcp(addr)
            }
        }
        Serving::Unix => unreachable!(),
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A self-signed certificate for `localhost`: the server's acceptor and a client that trusts
/// it.
fn tls() -> (tokio_rustls::TlsAcceptor, tokio_rustls::TlsConnector) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = certified.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        tokio_rustls::TlsConnector::from(Arc::new(client)),
    )
}

/// A raw HTTP/1.1 client that writes what it is told and really closes its socket.
enum Client {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Unix(UnixStream),
}

/// How a client leaves.
#[derive(Clone, Copy, Debug)]
enum Leave {
    /// Closes its socket: FIN.
    Fin,
    /// Closes its socket with `SO_LINGER` 0: RST.
    Rst,
}

impl Client {
    async fn connect(addr: &Addr) -> Client {
        match addr {
            Addr::Tcp(addr) => {
                let stream = TcpStream::connect(addr).await.unwrap();
                stream.set_nodelay(true).unwrap();
                Client::Tcp(stream)
            }
            Addr::Tls(addr, connector) => {
                let stream = TcpStream::connect(addr).await.unwrap();
                stream.set_nodelay(true).unwrap();
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                Client::Tls(Box::new(connector.connect(name, stream).await.unwrap()))
            }
            Addr::Unix(path) => Client::Unix(UnixStream::connect(path).await.unwrap()),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.write_all(bytes).await.unwrap();
        self.flush().await.unwrap();
    }

    fn leave(self, how: Leave) {
        let tcp = match &self {
            Client::Tcp(stream) => Some(stream),
            Client::Tls(stream) => Some(stream.get_ref().0),
            Client::Unix(_) => None,
        };
        if let (Leave::Rst, Some(tcp)) = (how, tcp) {
            // A zero linger never blocks the drop.
            #[allow(deprecated)]
            tcp.set_linger(Some(Duration::ZERO)).unwrap();
        }
        drop(self);
    }

    /// Reads until `needle` has arrived (panics on EOF or after [`SOON`]).
    async fn read_until(&mut self, needle: &[u8]) -> Vec<u8> {
        let mut seen = Vec::new();
        common::read_until(self, &mut seen, needle).await;
        seen
    }

    /// Reads to the end of the stream (panics after [`SOON`]); an error counts as the end.
    async fn read_to_end(&mut self) -> Vec<u8> {
        let mut seen = Vec::new();
        tokio::time::timeout(SOON, async {
            let mut buf = [0; 4096];
            while let Ok(n @ 1..) = self.read(&mut buf).await {
                seen.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .expect("the connection stays open");
        seen
    }
}

impl AsyncRead for Client {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Client::Tcp(stream) => Pin::new(stream).poll_read(cx, buf),
            Client::Tls(stream) => Pin::new(stream).poll_read(cx, buf),
            Client::Unix(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Client {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Client::Tcp(stream) => Pin::new(stream).poll_write(cx, buf),
            Client::Tls(stream) => Pin::new(stream).poll_write(cx, buf),
            Client::Unix(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Client::Tcp(stream) => Pin::new(stream).poll_flush(cx),
            Client::Tls(stream) => Pin::new(stream).poll_flush(cx),
            Client::Unix(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Client::Tcp(stream) => Pin::new(stream).poll_shutdown(cx),
            Client::Tls(stream) => Pin::new(stream).poll_shutdown(cx),
            Client::Unix(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Requests.

/// A request for `path` with a body of `len` bytes, `sent` of which are sent.
fn upload(path: &str, len: usize, sent: usize) -> Vec<u8> {
    let mut request =
        format!("POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: {len}\r\n\r\n")
            .into_bytes();
    request.resize(request.len() + sent, b'x');
    request
}

/// The requests that leave hyper not reading, so blind to a close: name and bytes.
fn unread_requests(path: &str) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("small complete body", upload(path, 5, 5)),
        ("64 KiB complete body", upload(path, 64 * 1024, 64 * 1024)),
        (
            "partial upload (64 KiB of 1 MiB)",
            upload(path, 1024 * 1024, 64 * 1024),
        ),
        (
            "Expect: 100-continue",
            format!(
                "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: 100000\r\n\
                 expect: 100-continue\r\n\r\n"
            )
            .into_bytes(),
        ),
        (
            "complete chunked body",
            format!(
                "POST {path} HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\n\
                 5\r\nhello\r\n0\r\n\r\n"
            )
            .into_bytes(),
        ),
    ]
}

fn assert_left_before_head(outcome: &Outcome, what: &str) {
    assert!(
        matches!(
            outcome,
            Outcome::ClientDisconnected {
                phase: Phase::BeforeHead,
                sent_status: None,
                ..
            }
        ),
        "{what}: {outcome:?}"
    );
}

fn assert_completed(outcome: &Outcome, status: StatusCode, what: &str) {
    assert!(
        matches!(outcome, Outcome::Completed { status: s, .. } if *s == status),
        "{what}: {outcome:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Departures hyper cannot see, seen.

/// A client that leaves while its request body is unread, partial, announced with `Expect:
/// 100-continue` or chunked: recorded as a 499 before the head, the handler dropped, the
/// signal fired; by FIN or RST, over TCP (both servers), TLS and a Unix socket.
#[tokio::test]
async fn a_client_leaving_an_unread_body_is_seen() {
    for serving in SERVINGS {
        let (mut harness, app) = Harness::new();
        let addr = serve(serving, app, false).await;
        let mut n = 0;
        for (name, request) in unread_requests("/hold") {
            for leave in [Leave::Fin, Leave::Rst] {
                let mut client = Client::connect(&addr).await;
                client.send(&request).await;
                assert_eq!(harness.started().await, "hold");

                let closed = Instant::now();
                client.leave(leave);
                n += 1;
                let (outcome, at) = harness.handles.records.nth(n).await;
                let latency = at.saturating_duration_since(closed);
                eprintln!("{serving:?} {name}, {leave:?}: recorded {latency:?} after the close");
                let what = format!("{serving:?} {name} {leave:?}");
                assert_left_before_head(&outcome, &what);
                assert!(latency < WITHIN, "{what}: {latency:?}");
                harness.assert_signalled_and_dropped("hold").await;
            }
        }
        assert_eq!(harness.handles.records.all().len(), n, "{serving:?}");
    }
}

/// A client that leaves an idle stream, its request read or not: recorded as a departure
/// during the body, with the 200 sent, and the body dropped.
#[tokio::test]
async fn a_client_leaving_an_idle_stream_is_seen() {
    let requests = [
        (
            "GET",
            b"GET /stream HTTP/1.1\r\nhost: localhost\r\n\r\n".to_vec(),
        ),
        ("POST, body unread", upload("/stream", 64 * 1024, 64 * 1024)),
    ];
    for serving in SERVINGS {
        let (mut harness, app) = Harness::new();
        let addr = serve(serving, app, false).await;
        let mut n = 0;
        for (name, request) in &requests {
            let mut client = Client::connect(&addr).await;
            client.send(request).await;
            assert_eq!(harness.started().await, "stream");
            client.read_until(b"data: first\n\n").await;

            let closed = Instant::now();
            client.leave(Leave::Fin);
            n += 1;
            let (outcome, at) = harness.handles.records.nth(n).await;
            let latency = at.saturating_duration_since(closed);
            eprintln!("{serving:?} idle stream, {name}: recorded {latency:?} after the close");
            assert!(
                matches!(
                    outcome,
                    Outcome::ClientDisconnected {
                        phase: Phase::DuringBody,
                        sent_status: Some(StatusCode::OK),
                        ..
                    }
                ),
                "{serving:?} {name}: {outcome:?}"
            );
            assert!(latency < WITHIN, "{serving:?} {name}: {latency:?}");
            harness.assert_signalled_and_dropped("stream").await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// No false departures.

/// Bytes waiting unread in the socket (a body the handler ignores), pipelined requests behind a
/// slow one, a keep-alive connection idle between requests, and clients that close right after
/// their whole answer: every request completes, and nothing else is recorded.
#[tokio::test]
async fn unread_bytes_pipelining_keep_alive_and_a_close_after_the_answer_are_not_departures() {
    const GET_SLOW: &[u8] = b"GET /slow HTTP/1.1\r\nhost: localhost\r\n\r\n";
    const GET_FAST: &[u8] = b"GET /fast HTTP/1.1\r\nhost: localhost\r\n\r\n";
    for serving in SERVINGS {
        let (harness, app) = Harness::new();
        let records = &harness.handles.records;
        let addr = serve(serving, app, false).await;
        let what = format!("{serving:?}");

        // 56 KiB of body wait in the socket while the handler takes its time.
        let mut client = Client::connect(&addr).await;
        client.send(&upload("/slow", 64 * 1024, 64 * 1024)).await;
        let answer = client.read_until(b"slow").await;
        assert!(answer.starts_with(b"HTTP/1.1 200 OK\r\n"), "{what}");
        client.leave(Leave::Fin);

        // Two requests pipelined behind a slow one, in one write.
        let mut client = Client::connect(&addr).await;
        client.send(&[GET_SLOW, GET_FAST, GET_FAST].concat()).await;
        let mut answers = client.read_until(b"slow").await;
        while answers.windows(4).filter(|w| w == b"fast").count() < 2 {
            answers.extend(client.read_until(b"fast").await);
        }

        // The same connection, idle for a while, then one more request.
        tokio::time::sleep(SLOW).await;
        client.send(GET_FAST).await;
        client.read_until(b"fast").await;
        client.leave(Leave::Fin);

        for n in 1..=5 {
            assert_completed(&records.nth(n).await.0, StatusCode::OK, &what);
        }
        harness.handles.live.wait_zero().await;
        assert_eq!(records.all().len(), 5, "{what}: {:?}", records.all());
    }
}

/// A client that shuts down its writing side and waits for its answer has left, by default
/// (nginx and hyper's default agree): recorded as a 499, and it gets no answer.
#[tokio::test]
async fn a_half_close_is_leaving_by_default() {
    for serving in [Serving::Axum, Serving::Hyper, Serving::Unix] {
        let (mut harness, app) = Harness::new();
        let addr = serve(serving, app, false).await;
        let what = format!("{serving:?}");

        let requests = [
            b"GET /hold HTTP/1.1\r\nhost: localhost\r\n\r\n".to_vec(),
            upload("/hold", 64 * 1024, 64 * 1024),
        ];
        for (n, request) in requests.iter().enumerate() {
            let mut client = Client::connect(&addr).await;
            client.send(request).await;
            assert_eq!(harness.started().await, "hold");
            client.shutdown().await.unwrap();
            let (outcome, _) = harness.handles.records.nth(n + 1).await;
            assert_left_before_head(&outcome, &what);
            assert!(
                client.read_to_end().await.is_empty(),
                "{what}: an answer was sent"
            );
            harness.assert_signalled_and_dropped("hold").await;
        }
    }
}

/// With `half_close(true)`, a client that shut down its writing side still gets its answer,
/// and the request completes; a reset is still leaving.
#[tokio::test]
async fn an_allowed_half_close_gets_its_answer() {
    for serving in [Serving::Axum, Serving::Hyper, Serving::Unix] {
        let (mut harness, app) = Harness::new();
        let addr = serve(serving, app, true).await;
        let what = format!("{serving:?}");

        let mut client = Client::connect(&addr).await;
        client.send(&upload("/slow", 64 * 1024, 64 * 1024)).await;
        client.shutdown().await.unwrap();
        let answer = client.read_to_end().await;
        assert!(
            answer.starts_with(b"HTTP/1.1 200 OK\r\n") && answer.ends_with(b"slow"),
            "{what}: {:?}",
            String::from_utf8_lossy(&answer)
        );
        assert_completed(
            &harness.handles.records.nth(1).await.0,
            StatusCode::OK,
            &what,
        );

        if serving != Serving::Unix {
            let mut client = Client::connect(&addr).await;
            client.send(&upload("/hold", 64 * 1024, 64 * 1024)).await;
            assert_eq!(harness.started().await, "hold");
            client.leave(Leave::Rst);
            assert_left_before_head(&harness.handles.records.nth(2).await.0, &what);
            harness.assert_signalled_and_dropped("hold").await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/2.

/// h2c over a watched stream works as before: requests complete, and a stream reset by its
/// client is a departure, on a connection that serves on.
#[tokio::test]
async fn http2_is_unaffected() {
    let (mut harness, app) = Harness::new();
    let Addr::Tcp(addr) = serve(Serving::Hyper, app, false).await else {
        unreachable!()
    };
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let get = |path: &str| {
        Request::get(format!("http://{addr}{path}"))
            .body(Empty::new())
            .unwrap()
    };

    let response = send.send_request(get("/fast")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "fast"
    );

    // Dropping the response future resets the stream.
    let held = send.send_request(get("/hold"));
    let held = tokio::spawn(held);
    assert_eq!(harness.started().await, "hold");
    held.abort();
    let (outcome, _) = harness.handles.records.nth(2).await;
    assert_left_before_head(&outcome, "h2c reset");
    harness.assert_signalled_and_dropped("hold").await;

    let response = send.send_request(get("/fast")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (outcome, _) = harness.handles.records.nth(3).await;
    assert_completed(&outcome, StatusCode::OK, "h2c after the reset");
    assert_completed(&harness.handles.records.all()[0], StatusCode::OK, "h2c");
}

/// A client that closes a keep-alive connection between requests ends it cleanly: hyper sees
/// that close itself, and the watcher does not turn it into an error.
#[tokio::test]
async fn a_close_between_requests_ends_the_connection_cleanly() {
    let (harness, app) = Harness::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (results_tx, mut results) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            let results = results_tx.clone();
            tokio::spawn(async move {
                let result = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(Watched::new(stream)), service)
                    .await;
                let _ = results.send(result.map_err(|error| format!("{error:?}")));
            });
        }
    });
    for leave in [Leave::Fin, Leave::Rst] {
        let mut client = Client::connect(&Addr::Tcp(addr)).await;
        client
            .send(b"GET /fast HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await;
        client.read_until(b"fast").await;
        client.leave(leave);
        let result = tokio::time::timeout(SOON, results.recv())
            .await
            .unwrap()
            .unwrap();
        match leave {
            Leave::Fin => assert_eq!(result, Ok(()), "{leave:?}"),
            // A reset may be an error; not the watcher's.
            Leave::Rst => assert!(!format!("{result:?}").contains("ClientLeft"), "{result:?}"),
        }
    }
    assert_eq!(harness.handles.records.all().len(), 2);
}

// ---------------------------------------------------------------------------------------------
// Accounting.

/// Requests in the accounting run.
const TOTAL: usize = 10_000;
/// Client tasks in the accounting run: the bound on concurrency.
const CLIENTS: usize = 40;
/// The accounting run ends well within this, even on a loaded machine.
const LOAD_BOUND: Duration = Duration::from_secs(120);

/// What a client does, and how many requests it makes doing it.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// A GET on the client's keep-alive connection: completed.
    Fast,
    /// Two GETs pipelined in one write on the keep-alive connection: both completed.
    Pipelined,
    /// A POST whose body is not read, on a connection of its own, answered at once; the client
    /// reads the answer and closes: completed.
    UnreadAnswered,
    /// A request whose body the handler never reads (complete, partial, chunked or awaiting
    /// `100 Continue`), on a connection of its own, left once the handler started, by FIN or
    /// RST: a 499 before the head.
    UnreadLeft(usize, Leave),
    /// An idle stream, left after its first event: a departure during the body.
    StreamLeft,
}

impl Op {
    fn of(n: usize) -> Op {
        match n % 10 {
            0..=2 => Op::Fast,
            3 => Op::Pipelined,
            4 => Op::UnreadAnswered,
            5 => Op::UnreadLeft(n / 10 % 5, Leave::Fin),
            6 => Op::UnreadLeft(n / 10 % 5, Leave::Rst),
            7 => Op::StreamLeft,
            8 => Op::UnreadLeft((n / 10 + 2) % 5, Leave::Fin),
            _ => Op::Fast,
        }
    }

    fn requests(self) -> usize {
        match self {
            Op::Pipelined => 2,
            _ => 1,
        }
    }
}

/// Ten thousand requests over watched connections, mixing every departure the watcher sees
/// with every case it must not take for one: each request ends with exactly one outcome, of
/// the kind the client caused, and no handler outlives its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_outcome_per_request_over_watched_connections() {
    let outcomes = Outcomes::new();
    let live = Live::new();
    let started = common::Started::default();
    let app = accounting_app(&outcomes, &live, &started);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = Addr::Tcp(listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(WatchedListener::new(listener), app)
            .await
            .unwrap()
    });

    // Whole ops, dealt out to the clients, up to TOTAL requests.
    let mut ops = Vec::new();
    let mut requests = 0;
    while requests < TOTAL {
        let op = Op::of(ops.len());
        requests += op.requests();
        ops.push((ops.len(), op));
    }
    let expected_completed: usize = ops
        .iter()
        .filter(|(_, op)| matches!(op, Op::Fast | Op::Pipelined | Op::UnreadAnswered))
        .map(|(_, op)| op.requests())
        .sum();
    let expected_left_before = ops
        .iter()
        .filter(|(_, op)| matches!(op, Op::UnreadLeft(..)))
        .count();
    let expected_left_during = ops
        .iter()
        .filter(|(_, op)| matches!(op, Op::StreamLeft))
        .count();

    let began = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..CLIENTS {
        let mine: Vec<_> = ops.iter().copied().skip(client).step_by(CLIENTS).collect();
        let (addr, started) = (addr.clone(), started.clone());
        clients.spawn(async move {
            let mut keep_alive = Client::connect(&addr).await;
            for (id, op) in mine {
                accounting_op(&addr, &mut keep_alive, &started, id, op).await;
            }
        });
    }
    tokio::time::timeout(LOAD_BOUND, async {
        while let Some(result) = clients.join_next().await {
            result.unwrap();
        }
    })
    .await
    .expect("the accounting run ends within its bound");
    let outcomes_all = outcomes.wait_for(requests).await;
    live.wait_zero().await;
    eprintln!(
        "{requests} requests over watched connections in {:?}",
        began.elapsed()
    );

    let completed = outcomes_all
        .iter()
        .filter(|o| matches!(o, Outcome::Completed { status, .. } if *status == StatusCode::OK))
        .count();
    let left_before = outcomes_all
        .iter()
        .filter(|o| {
            matches!(
                o,
                Outcome::ClientDisconnected {
                    phase: Phase::BeforeHead,
                    ..
                }
            )
        })
        .count();
    let left_during = outcomes_all
        .iter()
        .filter(|o| {
            matches!(
                o,
                Outcome::ClientDisconnected {
                    phase: Phase::DuringBody,
                    ..
                }
            )
        })
        .count();
    assert_eq!(
        (completed, left_before, left_during, outcomes_all.len()),
        (
            expected_completed,
            expected_left_before,
            expected_left_during,
            requests
        ),
        "(completed, 499 before the head, left during the body, all)"
    );
}

fn accounting_app(outcomes: &Outcomes, live: &Live, started: &common::Started) -> Router {
    use axum::extract::RawQuery;
    let id_of = |query: Option<String>| -> usize {
        let id = query.as_deref().and_then(|query| query.strip_prefix("id="));
        id.and_then(|id| id.parse().ok()).expect("?id=N")
    };
    let (hold_live, stream_live) = (live.clone(), live.clone());
    let (hold_started, stream_started) = (started.clone(), started.clone());
    Router::new()
        .route("/fast", get(fast).post(fast))
        .route(
            "/hold",
            get(|| async { "unused" }).post(move |RawQuery(query): RawQuery| {
                let (id, live, started) = (id_of(query), hold_live.enter(), hold_started.clone());
                async move {
                    let _live = live;
                    started.report(id);
                    std::future::pending::<&'static str>().await
                }
            }),
        )
        .route(
            "/stream",
            get(move |RawQuery(query): RawQuery| {
                let (id, live, started) =
                    (id_of(query), stream_live.enter(), stream_started.clone());
                async move {
                    started.report(id);
                    Body::new(Idle {
                        first: Some(Bytes::from_static(b"data: first\n\n")),
                        _live: live,
                    })
                }
            }),
        )
        .layer(ClientDisconnectLayer::new().on_outcome(outcomes.hook()))
}

async fn accounting_op(
    addr: &Addr,
    keep_alive: &mut Client,
    started: &common::Started,
    id: usize,
    op: Op,
) {
    const GET_FAST: &[u8] = b"GET /fast HTTP/1.1\r\nhost: localhost\r\n\r\n";
    match op {
        Op::Fast => {
            keep_alive.send(GET_FAST).await;
            keep_alive.read_until(b"fast").await;
        }
        Op::Pipelined => {
            keep_alive.send(&[GET_FAST, GET_FAST].concat()).await;
            let mut seen = keep_alive.read_until(b"fast").await;
            while seen.windows(4).filter(|w| w == b"fast").count() < 2 {
                seen.extend(keep_alive.read_until(b"fast").await);
            }
        }
        Op::UnreadAnswered => {
            let mut client = Client::connect(addr).await;
            client.send(&upload("/fast", 16 * 1024, 16 * 1024)).await;
            client.read_until(b"fast").await;
            client.leave(Leave::Fin);
        }
        Op::UnreadLeft(which, leave) => {
            let path = format!("/hold?id={id}");
            let request = unread_requests(&path).swap_remove(which).1;
            let handler = started.expect(id);
            let mut client = Client::connect(addr).await;
            client.send(&request).await;
            common::started_or_panic(handler, id).await;
            client.leave(leave);
        }
        Op::StreamLeft => {
            let handler = started.expect(id);
            let mut client = Client::connect(addr).await;
            client
                .send(format!("GET /stream?id={id} HTTP/1.1\r\nhost: localhost\r\n\r\n").as_bytes())
                .await;
            common::started_or_panic(handler, id).await;
            client.read_until(b"data: first\n\n").await;
            client.leave(Leave::Fin);
        }
    }
}

/// `PeerAddr` gives a handler behind a `WatchedListener` its client's address, as
/// `ConnectInfo<SocketAddr>` does behind axum's own listeners.
#[tokio::test]
async fn peer_addr_is_the_clients_address() {
    use axum::extract::ConnectInfo;
    use tower_timeouts::watch::PeerAddr;

    let app = Router::new().route(
        "/",
        get(|ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>| async move { peer.to_string() }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = app.into_make_service_with_connect_info::<PeerAddr>();
    tokio::spawn(async move {
        axum::serve(WatchedListener::new(listener), app)
            .await
            .unwrap()
    });

    let Client::Tcp(stream) = Client::connect(&Addr::Tcp(addr)).await else {
        unreachable!()
    };
    let local = stream.local_addr().unwrap();
    let mut client = Client::Tcp(stream);
    client
        .send(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await;
    client.read_until(local.to_string().as_bytes()).await;
}
