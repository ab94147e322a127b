//! The upstream half over real TCP on loopback: a gateway like `examples/gateway.rs` (an axum
//! app under `ClientDisconnectLayer` whose fallback forwards every request through hyper-util's
//! legacy `Client`, with `ConnectTimeoutLayer` on its connector and `UpstreamFailureLayer`
//! outside `ResponseTimeoutLayer` around it), served by both servers, in front of a black hole
//! (599 `connection_timeout`), a port that refuses (502 `connection_refused`), an upstream that
//! accepts but never answers (504 `http_response_timeout`) and a healthy upstream (passed through
//! untouched, its own 502 and 504 included).
//!
//! Upstreams are made on loopback only (see the shared reference, "Connect timeouts on
//! loopback"): a listener with a full accept queue, a bound socket that never listens, a
//! listener that never accepts.

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::routing::{any, get};
use axum::Router;
use bytes::Bytes;
use http::header::HOST;
use http::{HeaderMap, Method, Response, StatusCode, Uri, Version};
use http_body_util::{Empty, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::{timeout, Instant};
use tower::util::BoxCloneSyncService;
use tower::{Layer as _, ServiceBuilder, ServiceExt};
use tower_timeouts::response::PROXY_STATUS;
use tower_timeouts::{
    trace, ClientDisconnectLayer, ConnectTimeout, ConnectTimeoutLayer, Generated, Outcome,
    ProxyError, ResponseTimeoutLayer, UpstreamFailureLayer,
};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

use common::{black_hole, refusing, serve, Outcomes, Server, SERVERS, SOON};

/// The connect limit of the single-scenario tests.
const CONNECT_LIMIT: Duration = Duration::from_millis(200);
/// The response limit where a silent upstream is the point.
const RESPONSE_LIMIT: Duration = Duration::from_millis(300);
/// A limit that never fires in these tests.
const FOREVER: Duration = Duration::from_secs(60);
/// How late after its limit a generated answer may arrive on a loaded machine and still pass.
const MARGIN: Duration = Duration::from_secs(5);
/// A refused connect is answered in well under this, however loaded the machine.
const FAST: Duration = Duration::from_secs(2);
/// How many times the 599's arrival is measured.
const TIMING_RUNS: usize = 10;

const CONNECT_TIMEOUT_STATUS: &str = "tower-timeouts; error=connection_timeout";
const REFUSED_STATUS: &str = "tower-timeouts; error=connection_refused";
const RESPONSE_TIMEOUT_STATUS: &str = "tower-timeouts; error=http_response_timeout";

// ---------------------------------------------------------------------------------------------
// Upstreams on loopback

/// A listener that never accepts, with room in its queue: connects succeed, and no answer ever
/// comes. Connections stay in the queue until the listener is dropped, closed or not, so the
/// queue is sized above the number of requests a test sends it.
fn silent() -> (SocketAddr, TcpListener) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let listener = socket.listen(2048).unwrap();
    (listener.local_addr().unwrap(), listener)
}

const CHUNKS: [&str; 5] = [
    "one\n",
    "two two\n",
    "three three three\n",
    "four\n",
    "five!\n",
];

/// A healthy upstream: a streamed body with headers of its own, an echo of what was forwarded,
/// and its own 502 and 504.
fn healthy_app() -> Router {
    Router::new()
        .route("/stream", get(stream))
        .route("/echo", any(echo))
        .route("/bad-gateway", get(|| own_error(StatusCode::BAD_GATEWAY)))
        .route(
            "/gateway-timeout",
            get(|| own_error(StatusCode::GATEWAY_TIMEOUT)),
        )
}

async fn stream() -> Response<Body> {
    let chunks = futures_util::stream::unfold(0, |i| async move {
        if i == CHUNKS.len() {
            return None;
        }
        // One chunk per poll of the server, so the body really goes out in pieces.
        tokio::task::yield_now().await;
        Some((
            Ok::<_, Infallible>(Bytes::from_static(CHUNKS[i].as_bytes())),
            i + 1,
        ))
    });
    Response::builder()
        .header("x-upstream", "healthy")
        .header("x-multi", "one")
        .header("x-multi", "two")
        .body(Body::from_stream(chunks))
        .unwrap()
}

async fn echo(request: Request) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let body = common::body_bytes(body).await;
    let text = format!(
        "{} {} x-test={:?} host-is-upstream={} body={}",
        parts.method,
        parts.uri.path_and_query().unwrap(),
        parts.headers.get("x-test"),
        parts
            .headers
            .get(HOST)
            .is_some_and(|host| host != "gateway.test"),
        String::from_utf8_lossy(&body),
    );
    Response::builder()
        .status(StatusCode::CREATED)
        .header("x-upstream", "echo")
        .body(Body::from(text))
        .unwrap()
}

async fn own_error(status: StatusCode) -> Response<Body> {
    let body = format!("the upstream's own {}\n", status.as_u16());
    Response::builder()
        .status(status)
        .header("x-upstream", format!("own-{}", status.as_u16()))
        .body(Body::from(body))
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// The gateway (a small version of `examples/gateway.rs`, with the knobs the tests turn)

type Stack = BoxCloneSyncService<Request, Response<Body>, Infallible>;

/// hyper-util's `HttpConnector` under `ConnectTimeoutLayer`; `tcp_limit` is the connector's own
/// `set_connect_timeout`.
fn connector(limit: Duration, tcp_limit: Option<Duration>) -> ConnectTimeout<HttpConnector> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(tcp_limit);
    ConnectTimeoutLayer::new(limit).layer(http)
}

/// The upstream stack: `failure` outside `ResponseTimeoutLayer` around the legacy `Client`.
fn stack(
    failure: UpstreamFailureLayer,
    connector: ConnectTimeout<HttpConnector>,
    response_limit: Duration,
) -> Stack {
    let client = Client::builder(TokioExecutor::new()).build(connector);
    let service = ServiceBuilder::new()
        .layer(failure)
        .layer(ResponseTimeoutLayer::new(response_limit))
        .service(client)
        .map_response(|response| response.map(Body::new));
    BoxCloneSyncService::new(service)
}

/// The stack of most tests: default statuses, the connect limit, no response limit to speak of.
fn default_stack() -> Stack {
    stack(
        UpstreamFailureLayer::new(),
        connector(CONNECT_LIMIT, None),
        FOREVER,
    )
}

#[derive(Clone)]
struct Gateway {
    /// Path prefix → upstream; the prefix is cut off before forwarding.
    routes: Arc<Vec<(&'static str, SocketAddr)>>,
    upstream: Stack,
}

impl Gateway {
    fn new(upstream: Stack, routes: &[(&'static str, SocketAddr)]) -> Self {
        Gateway {
            routes: Arc::new(routes.to_vec()),
            upstream,
        }
    }

    /// The axum app: the forwarding fallback under `ClientDisconnectLayer`, whose hook feeds
    /// `outcomes`.
    fn app(self, outcomes: &Outcomes) -> Router {
        Router::new()
            .fallback(forward)
            .with_state(self)
            .layer(ClientDisconnectLayer::new().on_outcome(outcomes.hook()))
    }

    async fn serve(self, server: Server, outcomes: &Outcomes) -> SocketAddr {
        serve(server, self.app(outcomes)).await
    }
}

/// Forwards a request as the example does: new URI, HTTP/1.1, `Host` and hop-by-hop headers
/// dropped, everything else (the extensions included) kept.
async fn forward(State(gateway): State<Gateway>, request: Request) -> Response<Body> {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let (prefix, addr) = gateway
        .routes
        .iter()
        .find(|(prefix, _)| path.starts_with(prefix))
        .unwrap_or_else(|| panic!("no upstream for {path}"));
    let rest = &path[prefix.len()..];
    let rest = if rest.is_empty() { "/" } else { rest };
    parts.uri = format!("http://{addr}{rest}").parse::<Uri>().unwrap();
    parts.version = Version::HTTP_11;
    parts.headers.remove(HOST);
    for name in [
        "connection",
        "keep-alive",
        "te",
        "transfer-encoding",
        "upgrade",
    ] {
        parts.headers.remove(name);
    }
    let upstream = gateway.upstream.oneshot(Request::from_parts(parts, body));
    let mut response = upstream.await.unwrap_or_else(|never| match never {});
    response.headers_mut().remove("transfer-encoding");
    response
}

// ---------------------------------------------------------------------------------------------
// Clients

/// A response head read off the wire by hand, for the HTTP/1.1 reason phrase.
#[derive(Debug)]
struct Raw {
    status_line: String,
    headers: Vec<(String, String)>,
    /// From just before the request was written to the head's last byte read.
    elapsed: Duration,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` over a fresh HTTP/1.1 connection written and read by hand.
async fn raw_get(addr: SocketAddr, path: &str) -> Raw {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        // Before the write: the gateway cannot have started any clock before this one.
        let start = Instant::now();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0; 4096];
        // Bounded: a head is far below 64 KiB, and the whole exchange is under a timeout.
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            assert!(head.len() < 64 * 1024, "no end of head in {head:?}");
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed before the head: {head:?}");
            head.extend_from_slice(&buf[..n]);
        }
        let elapsed = start.elapsed();
        let head = String::from_utf8(head).unwrap();
        let head = &head[..head.find("\r\n\r\n").unwrap()];
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap().to_owned();
        let headers = lines
            .map(|line| {
                let (name, value) = line.split_once(':').unwrap();
                (name.to_ascii_lowercase(), value.trim().to_owned())
            })
            .collect();
        Raw {
            status_line,
            headers,
            elapsed,
        }
    };
    timeout(SOON, exchange)
        .await
        .unwrap_or_else(|_| panic!("GET {path}: no response head within {SOON:?}"))
}

/// A response read to its end.
#[derive(Debug)]
struct Fetched {
    status: StatusCode,
    headers: HeaderMap,
    reason: Option<Vec<u8>>,
    body: Bytes,
    elapsed: Duration,
}

/// `GET path` with hyper's client over a fresh connection, HTTP/1.1 or HTTP/2 (h2c).
async fn send(version: Version, addr: SocketAddr, path: &str) -> Fetched {
    let exchange = async {
        let request = common::get(addr, path);
        let start = Instant::now();
        let response = if version == Version::HTTP_2 {
            common::h2(addr).await.send_request(request).await
        } else {
            common::h1(addr).await.send_request(request).await
        };
        let response = response.unwrap();
        let elapsed = start.elapsed();
        let reason = response
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .map(|reason| reason.as_bytes().to_vec());
        let (parts, body) = response.into_parts();
        Fetched {
            status: parts.status,
            headers: parts.headers,
            reason,
            body: common::body_bytes(body).await,
            elapsed,
        }
    };
    timeout(SOON, exchange)
        .await
        .unwrap_or_else(|_| panic!("{version:?} GET {path}: no answer within {SOON:?}"))
}

const VERSIONS: [Version; 2] = [Version::HTTP_11, Version::HTTP_2];

// ---------------------------------------------------------------------------------------------
// Outcomes and figures

fn assert_connect_timeout(outcome: &Outcome, limit: Option<Duration>, status: u16) {
    match outcome {
        Outcome::ConnectTimeout {
            timeout, status: s, ..
        } => {
            assert_eq!(*timeout, limit, "{outcome:?}");
            assert_eq!(s.as_u16(), status, "{outcome:?}");
        }
        other => panic!("expected a connect timeout, got {other:?}"),
    }
}

fn assert_refused(outcome: &Outcome) {
    assert!(
        matches!(
            outcome,
            Outcome::ConnectFailed { error: ProxyError::ConnectionRefused, status, .. }
                if *status == StatusCode::BAD_GATEWAY
        ),
        "expected a refused connect, got {outcome:?}"
    );
}

fn assert_response_timeout(outcome: &Outcome, limit: Duration) {
    assert!(
        matches!(
            outcome,
            Outcome::ResponseTimeout { timeout, status, .. }
                if *timeout == limit && *status == StatusCode::GATEWAY_TIMEOUT
        ),
        "expected a response timeout of {limit:?}, got {outcome:?}"
    );
}

fn assert_completed(outcome: &Outcome, expected: StatusCode) {
    assert!(
        matches!(outcome, Outcome::Completed { status, .. } if *status == expected),
        "expected completed ({expected}), got {outcome:?}"
    );
}

/// `min / median / max` of `samples`, and how far each is past `limit`.
fn figures(samples: &[Duration], limit: Duration) -> String {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let (min, median, max) = (
        sorted[0],
        sorted[sorted.len() / 2],
        sorted[sorted.len() - 1],
    );
    let past = |d: Duration| d.saturating_sub(limit);
    format!(
        "min {min:.1?} / median {median:.1?} / max {max:.1?} \
         (past the limit: +{:.1?} / +{:.1?} / +{:.1?})",
        past(min),
        past(median),
        past(max)
    )
}

// ---------------------------------------------------------------------------------------------
// The black hole: 599 at the connect limit

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_hole_is_answered_599_at_the_connect_limit() {
    let hole = black_hole().await;
    for server in SERVERS {
        let outcomes = Outcomes::new();
        let addr = Gateway::new(default_stack(), &[("", hole.addr)])
            .serve(server, &outcomes)
            .await;

        let mut arrivals = Vec::new();
        for run in 0..TIMING_RUNS {
            let raw = raw_get(addr, "/anything?q=1").await;
            assert_eq!(
                raw.status_line, "HTTP/1.1 599 Network Connect Timeout Error",
                "{server:?}: {raw:?}"
            );
            assert_eq!(raw.header("proxy-status"), Some(CONNECT_TIMEOUT_STATUS));
            // Causal, not a timing guess: the gateway's clock starts after our clock.
            assert!(raw.elapsed >= CONNECT_LIMIT, "{server:?}: {raw:?}");
            assert!(raw.elapsed < CONNECT_LIMIT + MARGIN, "{server:?}: {raw:?}");
            arrivals.push(raw.elapsed);
            let recorded = outcomes.wait_for(run + 1).await;
            assert_eq!(recorded.len(), run + 1, "one outcome per request");
            assert_connect_timeout(&recorded[run], Some(CONNECT_LIMIT), 599);
        }
        let hook: Vec<Duration> = outcomes.with_elapsed().iter().map(|(_, e)| *e).collect();
        eprintln!(
            "599 arrival, {server:?}, connect limit {CONNECT_LIMIT:?}, {TIMING_RUNS} runs:\n  \
             client (request sent → head read): {}\n  \
             hook (Report::elapsed):             {}",
            figures(&arrivals, CONNECT_LIMIT),
            figures(&hook, CONNECT_LIMIT),
        );

        // hyper's client sees the reason phrase on HTTP/1.1; HTTP/2 has none.
        for version in VERSIONS {
            let fetched = send(version, addr, "/anything").await;
            assert_eq!(fetched.status.as_u16(), 599, "{server:?} {version:?}");
            assert_eq!(fetched.headers[PROXY_STATUS], CONNECT_TIMEOUT_STATUS);
            let reason =
                (version == Version::HTTP_11).then(|| b"Network Connect Timeout Error".to_vec());
            assert_eq!(fetched.reason, reason, "{server:?} {version:?}");
            assert_eq!(&fetched.body[..], b"599 Network Connect Timeout Error\n");
            assert!(fetched.elapsed < CONNECT_LIMIT + MARGIN, "{fetched:?}");
        }
        let recorded = outcomes.wait_for(TIMING_RUNS + 2).await;
        assert_eq!(recorded.len(), TIMING_RUNS + 2, "{server:?}: {recorded:?}");
        for outcome in &recorded[TIMING_RUNS..] {
            assert_connect_timeout(outcome, Some(CONNECT_LIMIT), 599);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc9209_statuses_answer_a_black_hole_with_504() {
    let hole = black_hole().await;
    for server in SERVERS {
        let outcomes = Outcomes::new();
        let upstream = stack(
            UpstreamFailureLayer::new().rfc9209_statuses(),
            connector(CONNECT_LIMIT, None),
            FOREVER,
        );
        let addr = Gateway::new(upstream, &[("", hole.addr)])
            .serve(server, &outcomes)
            .await;
        let raw = raw_get(addr, "/").await;
        assert_eq!(
            raw.status_line, "HTTP/1.1 504 Gateway Timeout",
            "{server:?}"
        );
        assert_eq!(raw.header("proxy-status"), Some(CONNECT_TIMEOUT_STATUS));
        assert!(raw.elapsed >= CONNECT_LIMIT && raw.elapsed < CONNECT_LIMIT + MARGIN);
        let fetched = send(Version::HTTP_2, addr, "/").await;
        assert_eq!(fetched.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(fetched.headers[PROXY_STATUS], CONNECT_TIMEOUT_STATUS);
        let recorded = outcomes.wait_for(2).await;
        assert_eq!(recorded.len(), 2, "{server:?}: {recorded:?}");
        for outcome in &recorded {
            assert_connect_timeout(outcome, Some(CONNECT_LIMIT), 504);
        }
    }
}

/// `ConnectTimeoutLayer` around a connector that has its own `set_connect_timeout`: whichever
/// fires first ends the attempt, and both are a connect timeout (599); only the layer's knows
/// its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layers_and_the_connectors_own_timeout_are_both_connect_timeouts() {
    let hole = black_hole().await;
    // (layer's limit, connector's limit, the limit the outcome knows)
    let cases = [
        (CONNECT_LIMIT, Some(FOREVER), Some(CONNECT_LIMIT)),
        (FOREVER, Some(CONNECT_LIMIT), None),
    ];
    for server in SERVERS {
        for (layer, tcp, known) in cases {
            let outcomes = Outcomes::new();
            let upstream = stack(UpstreamFailureLayer::new(), connector(layer, tcp), FOREVER);
            let addr = Gateway::new(upstream, &[("", hole.addr)])
                .serve(server, &outcomes)
                .await;
            let case = format!("{server:?}, layer {layer:?}, connector {tcp:?}");
            let raw = raw_get(addr, "/").await;
            assert_eq!(
                raw.status_line, "HTTP/1.1 599 Network Connect Timeout Error",
                "{case}"
            );
            assert_eq!(raw.header("proxy-status"), Some(CONNECT_TIMEOUT_STATUS));
            assert!(raw.elapsed >= CONNECT_LIMIT, "{case}: {raw:?}");
            assert!(raw.elapsed < CONNECT_LIMIT + MARGIN, "{case}: {raw:?}");
            let recorded = outcomes.wait_for(1).await;
            assert_eq!(recorded.len(), 1, "{case}: {recorded:?}");
            assert_connect_timeout(&recorded[0], known, 599);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Refused and silent upstreams

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_upstream_is_answered_502_at_once() {
    let (refused, _socket) = refusing();
    for server in SERVERS {
        let outcomes = Outcomes::new();
        let addr = Gateway::new(default_stack(), &[("", refused)])
            .serve(server, &outcomes)
            .await;
        let raw = raw_get(addr, "/").await;
        assert_eq!(raw.status_line, "HTTP/1.1 502 Bad Gateway", "{server:?}");
        assert_eq!(raw.header("proxy-status"), Some(REFUSED_STATUS));
        assert!(raw.elapsed < FAST, "{server:?}: {raw:?}");
        for version in VERSIONS {
            let fetched = send(version, addr, "/").await;
            assert_eq!(fetched.status, StatusCode::BAD_GATEWAY, "{version:?}");
            assert_eq!(fetched.headers[PROXY_STATUS], REFUSED_STATUS);
            assert_eq!(&fetched.body[..], b"502 Bad Gateway\n");
            assert!(fetched.elapsed < FAST, "{server:?}: {fetched:?}");
        }
        let recorded = outcomes.wait_for(3).await;
        assert_eq!(recorded.len(), 3, "{server:?}: {recorded:?}");
        recorded.iter().for_each(assert_refused);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_upstream_is_answered_504_at_the_response_limit() {
    let (quiet, _listener) = silent();
    for server in SERVERS {
        let outcomes = Outcomes::new();
        let upstream = stack(
            UpstreamFailureLayer::new(),
            connector(CONNECT_LIMIT, None),
            RESPONSE_LIMIT,
        );
        let addr = Gateway::new(upstream, &[("", quiet)])
            .serve(server, &outcomes)
            .await;
        let raw = raw_get(addr, "/").await;
        assert_eq!(
            raw.status_line, "HTTP/1.1 504 Gateway Timeout",
            "{server:?}"
        );
        assert_eq!(raw.header("proxy-status"), Some(RESPONSE_TIMEOUT_STATUS));
        assert!(raw.elapsed >= RESPONSE_LIMIT, "{server:?}: {raw:?}");
        assert!(raw.elapsed < RESPONSE_LIMIT + MARGIN, "{server:?}: {raw:?}");
        for version in VERSIONS {
            let fetched = send(version, addr, "/").await;
            assert_eq!(fetched.status, StatusCode::GATEWAY_TIMEOUT, "{version:?}");
            assert_eq!(fetched.headers[PROXY_STATUS], RESPONSE_TIMEOUT_STATUS);
            assert_eq!(&fetched.body[..], b"504 Gateway Timeout\n");
        }
        let recorded = outcomes.wait_for(3).await;
        assert_eq!(recorded.len(), 3, "{server:?}: {recorded:?}");
        for outcome in &recorded {
            assert_response_timeout(outcome, RESPONSE_LIMIT);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A healthy upstream: passed through untouched

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_upstream_passes_through_untouched() {
    let healthy = serve(Server::AxumServe, healthy_app()).await;
    for server in SERVERS {
        let outcomes = Outcomes::new();
        let addr = Gateway::new(default_stack(), &[("", healthy)])
            .serve(server, &outcomes)
            .await;
        let mut requests = 0;
        for version in VERSIONS {
            let case = format!("{server:?} {version:?}");

            let fetched = send(version, addr, "/stream").await;
            assert_eq!(fetched.status, StatusCode::OK, "{case}");
            assert_eq!(fetched.headers["x-upstream"], "healthy", "{case}");
            let multi: Vec<_> = fetched.headers.get_all("x-multi").iter().collect();
            assert_eq!(multi, ["one", "two"], "{case}");
            assert_eq!(fetched.body, CHUNKS.concat(), "{case}");
            assert!(!fetched.headers.contains_key(PROXY_STATUS), "{case}");
            requests += 1;
            let recorded = outcomes.wait_for(requests).await;
            assert_completed(&recorded[requests - 1], StatusCode::OK);

            for (path, status) in [
                ("/bad-gateway", StatusCode::BAD_GATEWAY),
                ("/gateway-timeout", StatusCode::GATEWAY_TIMEOUT),
            ] {
                let fetched = send(version, addr, path).await;
                assert_eq!(fetched.status, status, "{case} {path}");
                let own = format!("own-{}", status.as_u16());
                assert_eq!(fetched.headers["x-upstream"], own.as_str(), "{case}");
                let body = format!("the upstream's own {}\n", status.as_u16());
                assert_eq!(fetched.body, body, "{case} {path}");
                assert!(
                    !fetched.headers.contains_key(PROXY_STATUS),
                    "{case} {path}: the upstream's own {status} must not carry ours: {fetched:?}"
                );
                requests += 1;
                let recorded = outcomes.wait_for(requests).await;
                assert_completed(&recorded[requests - 1], status);
            }

            // Method, path and query, headers and body are forwarded.
            let client = {
                let mut builder = Client::builder(TokioExecutor::new());
                builder.http2_only(version == Version::HTTP_2);
                builder.build::<_, Full<Bytes>>(HttpConnector::new())
            };
            let request = http::Request::builder()
                .method(Method::POST)
                .uri(format!("http://{addr}/echo?x=1&y=two"))
                .header("x-test", "hello")
                .header(HOST, "gateway.test")
                .body(Full::new(Bytes::from_static(b"the payload")))
                .unwrap();
            let response = timeout(SOON, client.request(request))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(response.status(), StatusCode::CREATED, "{case}");
            assert_eq!(response.headers()["x-upstream"], "echo", "{case}");
            let body = timeout(SOON, common::body_bytes(response.into_body()))
                .await
                .unwrap();
            assert_eq!(
                body,
                "POST /echo?x=1&y=two x-test=Some(\"hello\") host-is-upstream=true \
                 body=the payload",
                "{case}"
            );
            requests += 1;
            let recorded = outcomes.wait_for(requests).await;
            assert_completed(&recorded[requests - 1], StatusCode::CREATED);
        }
        assert_eq!(outcomes.all().len(), requests, "{server:?}");
    }
}

/// The upstream stack alone, called in-process: the upstream's own 502 and 504 come back as
/// they are, without the `Generated` marker; what the stack generates carries it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_generated_responses_carry_the_marker() {
    let healthy = serve(Server::AxumServe, healthy_app()).await;
    let hole = black_hole().await;
    let (refused, _socket) = refusing();
    let call = |uri: String| async move {
        let request = http::Request::builder()
            .uri(uri)
            .body(Body::empty())
            .unwrap();
        let response = timeout(SOON, default_stack().oneshot(request))
            .await
            .expect("the stack answers in time")
            .unwrap_or_else(|never| match never {});
        let generated = response.extensions().get::<Generated>().cloned();
        let (parts, body) = response.into_parts();
        (parts, generated, common::body_bytes(body).await)
    };

    for (path, status) in [
        ("/bad-gateway", StatusCode::BAD_GATEWAY),
        ("/gateway-timeout", StatusCode::GATEWAY_TIMEOUT),
        ("/stream", StatusCode::OK),
    ] {
        let (parts, generated, body) = call(format!("http://{healthy}{path}")).await;
        assert_eq!(parts.status, status, "{path}");
        assert_eq!(
            generated, None,
            "{path}: the upstream's response is not ours"
        );
        assert!(!parts.headers.contains_key(PROXY_STATUS), "{path}");
        assert!(!body.is_empty(), "{path}");
    }

    let (parts, generated, _) = call(format!("http://{}/", hole.addr)).await;
    assert_eq!(parts.status.as_u16(), 599);
    let generated = generated.expect("a generated 599 is marked");
    assert_connect_timeout(generated.outcome(), Some(CONNECT_LIMIT), 599);

    let (parts, generated, _) = call(format!("http://{refused}/")).await;
    assert_eq!(parts.status, StatusCode::BAD_GATEWAY);
    assert_refused(generated.expect("a generated 502 is marked").outcome());
}

// ---------------------------------------------------------------------------------------------
// The connect span

/// A span as it was when it closed, with its ancestors' names and fields at that moment, the
/// parent first.
#[derive(Clone, Debug)]
struct ClosedSpan {
    name: &'static str,
    fields: BTreeMap<String, String>,
    ancestors: Vec<(&'static str, BTreeMap<String, String>)>,
}

/// Captures every span when it closes (common's `Capture` keeps only `request` spans, and not
/// their parents' fields).
#[derive(Clone, Default)]
struct SpanCapture(Arc<Mutex<Vec<ClosedSpan>>>);

impl SpanCapture {
    /// Installs the capture as this thread's default subscriber (use a current-thread runtime),
    /// until the guard is dropped.
    ///
    /// The guard also keeps a second, inert dispatcher registered. With one registered
    /// dispatcher only, tracing-core works out a callsite's interest with the default of the
    /// thread that hits the callsite first: when another test's thread (no subscriber) is first
    /// to open a `connect` span, the callsite is cached as never enabled, for this thread too,
    /// and the capture sees nothing. With two, every registered dispatcher is asked.
    fn install() -> (SpanCapture, CaptureGuard) {
        let capture = SpanCapture::default();
        let subscriber = tracing_subscriber::registry().with(capture.clone());
        let guard = CaptureGuard {
            _default: tracing::subscriber::set_default(subscriber),
            _second: tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()),
        };
        (capture, guard)
    }

    fn named(&self, name: &str) -> Vec<ClosedSpan> {
        let spans = self.0.lock().unwrap();
        spans.iter().filter(|s| s.name == name).cloned().collect()
    }

    /// Waits until `n` spans named `name` closed (panics after [`SOON`]).
    async fn wait_for(&self, name: &str, n: usize) -> Vec<ClosedSpan> {
        let waited = timeout(SOON, async {
            while self.named(name).len() < n {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        waited
            .await
            .unwrap_or_else(|_| panic!("expected {n} `{name}` spans, got {:?}", self.named(name)));
        self.named(name)
    }
}

struct CaptureGuard {
    _default: tracing::subscriber::DefaultGuard,
    _second: tracing::Dispatch,
}

struct SpanFields(BTreeMap<String, String>);

struct Visitor<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S> tracing_subscriber::Layer<S> for SpanCapture
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        attrs.record(&mut Visitor(&mut fields));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(fields) = span.extensions_mut().get_mut::<SpanFields>() {
                values.record(&mut Visitor(&mut fields.0));
            }
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let fields_of = |span: &tracing_subscriber::registry::SpanRef<'_, S>| {
            let extensions = span.extensions();
            extensions
                .get::<SpanFields>()
                .map(|f| f.0.clone())
                .unwrap_or_default()
        };
        let closed = ClosedSpan {
            name: span.name(),
            fields: fields_of(&span),
            ancestors: span
                .scope()
                .skip(1)
                .map(|ancestor| (ancestor.name(), fields_of(&ancestor)))
                .collect(),
        };
        self.0.lock().unwrap().push(closed);
    }
}

/// Each connect attempt is a `connect` span under the upstream call's span (`otel.kind=client`),
/// under the request's span, with the upstream's address and port, how long it took, and how it
/// ended.
#[tokio::test(flavor = "current_thread")]
async fn each_connect_is_a_span_under_the_request() {
    let (capture, _guard) = SpanCapture::install();
    let healthy = serve(Server::AxumServe, healthy_app()).await;
    let hole = black_hole().await;
    let (refused, _socket) = refusing();
    let routes = [
        ("/hole", hole.addr),
        ("/ok", healthy),
        ("/refused", refused),
    ];
    // (path, upstream, status, connect outcome)
    let cases = [
        ("/hole/a", hole.addr, 599, "timeout"),
        ("/ok/stream", healthy, 200, "connected"),
        ("/refused/b", refused, 502, "error"),
    ];
    let mut seen = 0;
    for server in SERVERS {
        let outcomes = Outcomes::new();
        // A new gateway, so a new client with an empty pool: every request connects.
        let addr = Gateway::new(default_stack(), &routes)
            .serve(server, &outcomes)
            .await;
        for (path, upstream, status, connect_outcome) in cases {
            let case = format!("{server:?} {path}");
            let fetched = send(Version::HTTP_11, addr, path).await;
            assert_eq!(fetched.status.as_u16(), status, "{case}");
            seen += 1;
            let spans = capture.wait_for(trace::CONNECT_SPAN_NAME, seen).await;
            assert_eq!(spans.len(), seen, "one connect per request: {spans:#?}");
            let span = &spans[seen - 1];
            let field = |name: &str| span.fields.get(name).map(String::as_str);
            assert_eq!(field(trace::SERVER_ADDRESS), Some("127.0.0.1"), "{case}");
            let port = upstream.port().to_string();
            assert_eq!(field(trace::SERVER_PORT), Some(port.as_str()), "{case}");
            assert_eq!(
                field(trace::CONNECT_OUTCOME),
                Some(connect_outcome),
                "{case}"
            );
            let connect_ms: u64 = field(trace::CONNECT_MS)
                .unwrap_or_else(|| panic!("{case}: no connect_ms in {span:?}"))
                .parse()
                .unwrap();
            if connect_outcome == "timeout" {
                // The timer cannot fire before the limit; how long after is not asserted.
                assert!(
                    connect_ms >= CONNECT_LIMIT.as_millis() as u64,
                    "{case}: {span:?}"
                );
            }
            assert!(
                connect_ms < (CONNECT_LIMIT + MARGIN).as_millis() as u64,
                "{span:?}"
            );

            let names: Vec<_> = span.ancestors.iter().map(|(name, _)| *name).collect();
            assert_eq!(
                names[..2],
                [trace::UPSTREAM_SPAN_NAME, trace::SPAN_NAME],
                "{case}: under the upstream call's span, under the request's"
            );
            let (_, call) = &span.ancestors[0];
            assert_eq!(
                call.get(trace::OTEL_KIND).map(String::as_str),
                Some("client")
            );
            assert_eq!(
                call.get(trace::SERVER_PORT).map(String::as_str),
                Some(port.as_str()),
                "{case}"
            );
            let (_, request) = &span.ancestors[1];
            assert_eq!(
                request.get(trace::URL_PATH).map(String::as_str),
                Some(path),
                "{case}: under this request's span"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Accounting under load

/// The kinds of upstream behind the load test's gateway, by path prefix.
const KINDS: [(&str, &str); 4] = [
    ("/ok", "completed"),
    ("/hole", "connect_timeout"),
    ("/refused", "connect_failed"),
    ("/silent", "response_timeout"),
];
const LOAD_REQUESTS: usize = 2000;
const LOAD_CONCURRENCY: usize = 32;
const LOAD_CONNECT_LIMIT: Duration = Duration::from_millis(100);
const LOAD_RESPONSE_LIMIT: Duration = Duration::from_millis(200);
/// The bound on the whole load run of one server.
const LOAD_DEADLINE: Duration = Duration::from_secs(60);

fn expected_status(kind: &str) -> u16 {
    match kind {
        "completed" => 200,
        "connect_timeout" => 599,
        "connect_failed" => 502,
        "response_timeout" => 504,
        _ => unreachable!(),
    }
}

/// Thousands of requests through one gateway against a healthy, a black-hole, a refusing and a
/// silent upstream, `LOAD_CONCURRENCY` at a time: every request gets the status of its kind,
/// and the hook hears exactly one outcome per request, each of the kind its upstream caused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_every_request_has_exactly_one_outcome_of_its_kind() {
    let healthy = serve(Server::AxumServe, healthy_app()).await;
    let hole = black_hole().await;
    let (refused, _socket) = refusing();
    for server in SERVERS {
        // A fresh silent upstream per run: its queue keeps every connection it was given.
        let (quiet, _listener) = silent();
        let routes = [
            ("/ok", healthy),
            ("/hole", hole.addr),
            ("/refused", refused),
            ("/silent", quiet),
        ];
        let upstream = stack(
            UpstreamFailureLayer::new(),
            connector(LOAD_CONNECT_LIMIT, None),
            LOAD_RESPONSE_LIMIT,
        );
        let outcomes = Outcomes::new();
        let addr = Gateway::new(upstream, &routes)
            .serve(server, &outcomes)
            .await;
        let client = Client::builder(TokioExecutor::new()).build::<_, Empty<Bytes>>({
            let mut http = HttpConnector::new();
            http.set_nodelay(true);
            http
        });

        let next = Arc::new(AtomicUsize::new(0));
        let statuses = Arc::new(Mutex::new(BTreeMap::<(&str, u16), usize>::new()));
        let start = Instant::now();
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..LOAD_CONCURRENCY {
            let (client, next, statuses) = (client.clone(), next.clone(), statuses.clone());
            workers.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= LOAD_REQUESTS {
                        return;
                    }
                    let (prefix, kind) = KINDS[i % KINDS.len()];
                    let path = if kind == "completed" {
                        format!("{prefix}/stream")
                    } else {
                        format!("{prefix}/{i}")
                    };
                    let request = common::get(addr, &path);
                    let exchange = async {
                        let response = client.request(request).await.unwrap();
                        let status = response.status().as_u16();
                        common::body_bytes(response.into_body()).await;
                        status
                    };
                    let status = timeout(SOON, exchange)
                        .await
                        .unwrap_or_else(|_| panic!("{path}: no answer within {SOON:?}"));
                    *statuses.lock().unwrap().entry((kind, status)).or_default() += 1;
                }
            });
        }
        let all_done = async {
            while let Some(worker) = workers.join_next().await {
                worker.unwrap();
            }
        };
        timeout(LOAD_DEADLINE, all_done)
            .await
            .unwrap_or_else(|_| panic!("{server:?}: the load did not finish in {LOAD_DEADLINE:?}"));
        let took = start.elapsed();

        let per_kind = LOAD_REQUESTS / KINDS.len();
        let statuses = statuses.lock().unwrap().clone();
        let expected: BTreeMap<(&str, u16), usize> = KINDS
            .iter()
            .map(|(_, kind)| ((*kind, expected_status(kind)), per_kind))
            .collect();
        assert_eq!(
            statuses, expected,
            "{server:?}: statuses seen by the client"
        );

        let recorded = outcomes.wait_for(LOAD_REQUESTS).await;
        assert_eq!(
            recorded.len(),
            LOAD_REQUESTS,
            "{server:?}: one outcome per request"
        );
        let mut counts = BTreeMap::<&str, usize>::new();
        for outcome in &recorded {
            *counts.entry(outcome.kind()).or_default() += 1;
            match outcome {
                Outcome::Completed { status, .. } => assert_eq!(*status, StatusCode::OK),
                Outcome::ConnectTimeout { .. } => {
                    assert_connect_timeout(outcome, Some(LOAD_CONNECT_LIMIT), 599)
                }
                Outcome::ConnectFailed { .. } => assert_refused(outcome),
                Outcome::ResponseTimeout { .. } => {
                    assert_response_timeout(outcome, LOAD_RESPONSE_LIMIT)
                }
                other => panic!("{server:?}: unexpected outcome {other:?}"),
            }
        }
        let expected: BTreeMap<&str, usize> =
            KINDS.iter().map(|(_, kind)| (*kind, per_kind)).collect();
        assert_eq!(counts, expected, "{server:?}: outcomes by kind");
        eprintln!(
            "load, {server:?}: {LOAD_REQUESTS} requests, {LOAD_CONCURRENCY} at a time, in \
             {took:.2?}; outcomes {counts:?}"
        );
    }
}
