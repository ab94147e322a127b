//! Shared pieces of the integration tests: real servers on loopback, real clients, an outcome
//! recorder for the hook and a span capture for tracing.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{oneshot, Notify};
use tower_timeouts::{Outcome, Report};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::{LookupSpan, SpanRef};
use tracing_subscriber::Layer;

/// Generous bound for anything that should happen "at once" on loopback.
pub const SOON: Duration = Duration::from_secs(10);

/// The servers users run axum apps on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    /// `axum::serve`
    AxumServe,
    /// hyper-util's `server::conn::auto::Builder` (HTTP/1 and h2c)
    HyperAuto,
    /// `axum::serve` with a `WatchedListener`: the connection watcher below hyper
    #[cfg(feature = "axum")]
    Watched,
}

#[cfg(feature = "axum")]
pub const SERVERS: [Server; 3] = [Server::AxumServe, Server::HyperAuto, Server::Watched];
#[cfg(not(feature = "axum"))]
pub const SERVERS: [Server; 2] = [Server::AxumServe, Server::HyperAuto];

/// Serves `app` on 127.0.0.1 with `server`, in the background; returns its address.
pub async fn serve(server: Server, app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    match server {
        Server::AxumServe => {
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        }
        #[cfg(feature = "axum")]
        Server::Watched => {
            let listener = tower_timeouts::watch::WatchedListener::new(listener);
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        }
        Server::HyperAuto => {
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    stream.set_nodelay(true).unwrap();
                    let service = hyper_util::service::TowerToHyperService::new(app.clone());
                    tokio::spawn(async move {
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        }
    }
    addr
}

async fn connect(addr: SocketAddr) -> TokioIo<TcpStream> {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    TokioIo::new(stream)
}

/// An HTTP/1.1 client on its own connection.
pub async fn h1(addr: SocketAddr) -> http1::SendRequest<Empty<Bytes>> {
    let (send, conn) = http1::handshake(connect(addr).await).await.unwrap();
    tokio::spawn(conn);
    send
}

/// An HTTP/2 (h2c, prior knowledge) client on its own connection.
pub async fn h2(addr: SocketAddr) -> http2::SendRequest<Empty<Bytes>> {
    let (send, conn) = http2::handshake(TokioExecutor::new(), connect(addr).await)
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

pub fn get(addr: SocketAddr, path: &str) -> http::Request<Empty<Bytes>> {
    request(http::Method::GET, addr, path)
}

pub fn request(method: http::Method, addr: SocketAddr, path: &str) -> http::Request<Empty<Bytes>> {
    http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(Empty::new())
        .unwrap()
}

/// Reads a whole body.
pub async fn body_bytes<B>(body: B) -> Bytes
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    body.collect().await.unwrap().to_bytes()
}

pub fn full(text: &'static str) -> Full<Bytes> {
    Full::new(Bytes::from_static(text.as_bytes()))
}

/// What the hook was told: the outcome, its elapsed time, and when.
type Told = (Outcome, Duration, tokio::time::Instant);

type Reports = (Mutex<Vec<Told>>, Notify);

/// Collects what the `on_outcome` hook is told.
#[derive(Clone, Default)]
pub struct Outcomes {
    inner: Arc<Reports>,
}

impl Outcomes {
    pub fn new() -> Self {
        Self::default()
    }

    /// A hook for `on_outcome`.
    pub fn hook(&self) -> impl Fn(&Report<'_>) + Send + Sync + Clone + 'static {
        let inner = self.inner.clone();
        move |report: &Report<'_>| {
            inner.0.lock().unwrap().push((
                report.outcome().clone(),
                report.elapsed(),
                tokio::time::Instant::now(),
            ));
            inner.1.notify_waiters();
        }
    }

    pub fn all(&self) -> Vec<Outcome> {
        self.inner
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(o, _, _)| o.clone())
            .collect()
    }

    pub fn with_elapsed(&self) -> Vec<(Outcome, Duration)> {
        let told = self.inner.0.lock().unwrap();
        told.iter().map(|(o, e, _)| (o.clone(), *e)).collect()
    }

    /// The `n`th outcome (from 1), and when the hook was told (panics after [`SOON`]).
    pub async fn nth(&self, n: usize) -> (Outcome, tokio::time::Instant) {
        self.wait_for(n).await;
        let told = &self.inner.0.lock().unwrap()[n - 1];
        (told.0.clone(), told.2)
    }

    /// Waits until at least `n` outcomes were recorded (panics after [`SOON`]).
    pub async fn wait_for(&self, n: usize) -> Vec<Outcome> {
        tokio::time::timeout(SOON, async {
            loop {
                let notified = self.inner.1.notified();
                let mut notified = std::pin::pin!(notified);
                notified.as_mut().enable();
                if self.inner.0.lock().unwrap().len() >= n {
                    return self.all();
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("expected {n} outcomes, got {:?}", self.all()))
    }
}

/// Handlers that report by id that they started, so that a client leaves only then.
#[derive(Clone, Default)]
pub struct Started(Arc<Mutex<std::collections::HashMap<usize, oneshot::Sender<()>>>>);

impl Started {
    pub fn expect(&self, id: usize) -> oneshot::Receiver<()> {
        let (send, receive) = oneshot::channel();
        self.0.lock().unwrap().insert(id, send);
        receive
    }

    pub fn report(&self, id: usize) {
        let send = self.0.lock().unwrap().remove(&id);
        if let Some(send) = send {
            let _ = send.send(());
        }
    }
}

/// Waits for the handler of request `id` to start (panics after [`SOON`]).
pub async fn started_or_panic(started: oneshot::Receiver<()>, id: usize) {
    tokio::time::timeout(SOON, started)
        .await
        .unwrap_or_else(|_| panic!("the handler of request {id} did not start"))
        .unwrap();
}

/// Counts live values: handler futures that were not dropped yet, for instance.
#[derive(Clone, Default)]
pub struct Live(Arc<AtomicUsize>);

pub struct LiveGuard(Arc<AtomicUsize>);

impl Live {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn enter(&self) -> LiveGuard {
        self.0.fetch_add(1, Ordering::SeqCst);
        LiveGuard(self.0.clone())
    }
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
    /// Waits until nothing is live (panics after [`SOON`]).
    pub async fn wait_zero(&self) {
        tokio::time::timeout(SOON, async {
            while self.count() != 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{} still live", self.count()));
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A span or event as the capture saw it: its name and fields.
#[derive(Clone, Debug)]
pub struct Captured {
    pub name: String,
    pub fields: BTreeMap<String, String>,
    /// For events: the fields of the parent span at the time of the event.
    pub parent: Option<BTreeMap<String, String>>,
    /// For spans: the name of the parent span.
    pub parent_name: Option<String>,
    /// For events: the level.
    pub level: tracing::Level,
}

/// Keeps a [`Capture`] installed; see [`Capture::install`].
pub struct CaptureGuard(tracing::subscriber::DefaultGuard, tracing::Dispatch);

/// Captures closed `request` spans and the events emitted in them; also closed `upstream`
/// spans (with their parent's name and fields), and how many spans of each name closed.
#[derive(Clone, Default)]
pub struct Capture {
    spans: Arc<Mutex<Vec<Captured>>>,
    events: Arc<Mutex<Vec<Captured>>>,
    upstream: Arc<Mutex<Vec<Captured>>>,
    closed: Arc<Mutex<BTreeMap<String, usize>>>,
}

impl Capture {
    /// Installs the capture as this thread's default subscriber (use a current-thread runtime).
    ///
    /// tracing caches a callsite's interest globally, and while only one dispatcher exists it
    /// asks whichever thread reaches the callsite first: a parallel test on a thread with no
    /// subscriber would then disable our spans for everyone. A second, inert dispatcher kept
    /// alive with the guard makes tracing ask every time.
    pub fn install() -> (Capture, CaptureGuard) {
        let capture = Capture::default();
        let subscriber = tracing_subscriber::registry().with(capture.clone());
        let guard = tracing::subscriber::set_default(subscriber);
        let inert = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
        (capture, CaptureGuard(guard, inert))
    }

    /// Like [`Capture::install`], but sees only the crate's own spans and events (and the spans
    /// it makes for others, such as `trace::make_span` in tower-http's `TraceLayer`): hyper's and
    /// h2's trace events would only slow a test that runs many servers down.
    pub fn install_crate_only() -> (Capture, CaptureGuard) {
        let capture = Capture::default();
        let only_ours = Targets::new().with_target("tower_timeouts", tracing::Level::TRACE);
        let subscriber =
            tracing_subscriber::registry().with(capture.clone().with_filter(only_ours));
        let guard = tracing::subscriber::set_default(subscriber);
        let inert = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
        (capture, CaptureGuard(guard, inert))
    }

    /// Closed `upstream` spans; `parent` holds the parent span's fields.
    pub fn upstream_spans(&self) -> Vec<Captured> {
        self.upstream.lock().unwrap().clone()
    }

    /// How many spans named `name` closed so far.
    pub fn closed_count(&self, name: &str) -> usize {
        self.closed.lock().unwrap().get(name).copied().unwrap_or(0)
    }

    /// How many spans closed so far, by name.
    pub fn closed_counts(&self) -> BTreeMap<String, usize> {
        self.closed.lock().unwrap().clone()
    }

    pub fn closed_spans(&self) -> Vec<Captured> {
        self.spans.lock().unwrap().clone()
    }

    pub fn events(&self) -> Vec<Captured> {
        self.events.lock().unwrap().clone()
    }

    /// Waits until `n` request spans closed (panics after [`SOON`]).
    pub async fn wait_spans(&self, n: usize) -> Vec<Captured> {
        tokio::time::timeout(SOON, async {
            while self.spans.lock().unwrap().len() < n {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("expected {n} spans, got {:?}", self.closed_spans()));
        self.closed_spans()
    }
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

struct SpanFields(BTreeMap<String, String>);

impl<S> Layer<S> for Capture
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(fields) = span.extensions_mut().get_mut::<SpanFields>() {
                values.record(&mut Fields(&mut fields.0));
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        let parent = ctx
            .event_span(event)
            .and_then(|span| span.extensions().get::<SpanFields>().map(|f| f.0.clone()));
        self.events.lock().unwrap().push(Captured {
            name: event.metadata().name().to_owned(),
            fields,
            parent,
            parent_name: None,
            level: *event.metadata().level(),
        });
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        *self
            .closed
            .lock()
            .unwrap()
            .entry(span.name().to_owned())
            .or_default() += 1;
        let fields_of = |span: &SpanRef<'_, S>| {
            span.extensions()
                .get::<SpanFields>()
                .map(|f| f.0.clone())
                .unwrap_or_default()
        };
        if span.name() == tower_timeouts::trace::SPAN_NAME {
            self.spans.lock().unwrap().push(Captured {
                name: span.name().to_owned(),
                fields: fields_of(&span),
                parent: None,
                parent_name: span.parent().map(|parent| parent.name().to_owned()),
                level: *span.metadata().level(),
            });
        } else if span.name() == tower_timeouts::trace::UPSTREAM_SPAN_NAME {
            self.upstream.lock().unwrap().push(Captured {
                name: span.name().to_owned(),
                fields: fields_of(&span),
                parent: span.parent().map(|parent| fields_of(&parent)),
                parent_name: span.parent().map(|parent| parent.name().to_owned()),
                level: *span.metadata().level(),
            });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Upstreams on loopback (see the shared reference, "Connect timeouts on loopback").

/// A listener whose accept queue is full: every further connect hangs (Linux drops the SYN).
/// The listener and the connections that fill its queue live as long as this value.
pub struct BlackHole {
    pub addr: SocketAddr,
    _listener: TcpListener,
    _fillers: Vec<TcpStream>,
}

/// Makes a [`BlackHole`], checking that a connect to it really hangs.
pub async fn black_hole() -> BlackHole {
    // How long a probe connect must hang for the queue to count as full. A probe that a
    // stalled machine lets time out is harmless: the first filler has filled the queue already.
    const PROBE: Duration = Duration::from_millis(100);
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let connect = TcpStream::connect(addr);
    let mut fillers = vec![tokio::time::timeout(SOON, connect).await.unwrap().unwrap()];
    for _ in 0..8 {
        match tokio::time::timeout(PROBE, TcpStream::connect(addr)).await {
            Ok(Ok(filler)) => fillers.push(filler),
            Ok(Err(error)) => panic!("filling the black hole's queue: {error}"),
            Err(_) => {
                return BlackHole {
                    addr,
                    _listener: listener,
                    _fillers: fillers,
                }
            }
        }
    }
    panic!("the accept queue of {addr} never filled");
}

/// A socket bound to a port that never listens: connects to it are refused at once. Keep the
/// socket alive so that nobody else gets the port.
pub fn refusing() -> (SocketAddr, TcpSocket) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, 1], 0).into()).unwrap();
    (socket.local_addr().unwrap(), socket)
}

/// A response head read off a raw socket, and what came after it.
#[derive(Debug)]
pub struct RawHead {
    pub status_line: String,
    pub headers: Vec<(String, String)>,
    /// What was read past the head.
    pub after: Vec<u8>,
    /// When the head had arrived.
    pub at: tokio::time::Instant,
}

impl RawHead {
    /// The value of header `name`, case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// Reads a response head (panics on EOF, or after [`SOON`]).
pub async fn read_head(stream: &mut TcpStream) -> RawHead {
    let mut seen = Vec::new();
    let end = tokio::time::timeout(SOON, async {
        let mut buf = [0; 4096];
        loop {
            if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                return end;
            }
            let n = stream.read(&mut buf).await.expect("reading the head");
            assert!(
                n > 0,
                "EOF before a head: {:?}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("a response head in time");
    let at = tokio::time::Instant::now();
    let head = String::from_utf8(seen[..end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap().to_owned();
    let headers = lines
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap();
            (name.trim().to_owned(), value.trim().to_owned())
        })
        .collect();
    RawHead {
        status_line,
        headers,
        after: seen[end + 4..].to_vec(),
        at,
    }
}

/// Reads until `seen` holds `needle` (panics on EOF, or after [`SOON`]).
pub async fn read_until(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    seen: &mut Vec<u8>,
    needle: &[u8],
) {
    tokio::time::timeout(SOON, async {
        let mut buf = [0; 4096];
        while !seen.windows(needle.len()).any(|w| w == needle) {
            let n = stream.read(&mut buf).await.expect("reading");
            assert!(n > 0, "EOF before {:?}", String::from_utf8_lossy(needle));
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {:?} in time", String::from_utf8_lossy(needle)));
}

/// Reads until the server closes the connection: an orderly EOF, not a reset (panics after
/// [`SOON`]).
pub async fn read_to_eof(stream: &mut TcpStream, seen: &mut Vec<u8>) {
    tokio::time::timeout(SOON, stream.read_to_end(seen))
        .await
        .expect("the server closes the connection")
        .expect("an orderly close (FIN), not a reset");
}

// ---------------------------------------------------------------------------------------------
// Logs.

/// What a `tracing_subscriber::fmt` layer writes, kept in memory: `.with_writer(written.clone())`.
#[derive(Clone, Default)]
pub struct Written(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Written {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Written {
    type Writer = Written;
    fn make_writer(&'a self) -> Written {
        self.clone()
    }
}

impl Written {
    pub fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Waits until `n` lines were written (panics after [`SOON`]).
    pub async fn wait_lines(&self, n: usize) -> Vec<String> {
        tokio::time::timeout(SOON, async {
            while self.lines().len() < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("expected {n} lines, got {:#?}", self.lines()));
        self.lines()
    }
}

// ---------------------------------------------------------------------------------------------
// A gateway's upstream side.

/// An upstream stack as a gateway's: `ConnectTimeoutLayer` (`connect`) around hyper-util's
/// `HttpConnector`, under `UpstreamFailureLayer` and `ResponseTimeoutLayer` (`head`).
pub fn gateway_upstream(
    connect: Duration,
    head: Duration,
) -> impl tower::Service<
    http::Request<axum::body::Body>,
    Response = http::Response<axum::body::Body>,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone {
    use tower::{Layer, ServiceExt};
    let connector = tower_timeouts::ConnectTimeoutLayer::new(connect)
        .layer(hyper_util::client::legacy::connect::HttpConnector::new());
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(connector);
    tower::ServiceBuilder::new()
        .layer(tower_timeouts::UpstreamFailureLayer::new())
        .layer(tower_timeouts::ResponseTimeoutLayer::new(head))
        .service(client)
        .map_response(|response| response.map(axum::body::Body::new))
}
