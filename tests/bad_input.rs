//! Odd, oversized and malformed requests, written byte by byte to every server running the full
//! stack: nothing panics, every request that reaches the service has exactly one outcome, and
//! the server still answers afterwards. Also the extreme limits, `Duration::ZERO` and
//! `Duration::MAX`, in process.
mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Path;
use axum::routing::get;
use axum::Router;
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower::{service_fn, Layer, ServiceBuilder, ServiceExt};
use tower_timeouts::response::PROXY_STATUS;
use tower_timeouts::{ClientDisconnectLayer, Generated, Outcome, ResponseTimeoutLayer};

use common::{Capture, Outcomes, Server, SERVERS, SOON};

/// Panics anywhere in this test binary, including in tasks the servers spawn (whose panics
/// tokio would otherwise swallow).
fn panics() -> &'static AtomicUsize {
    static PANICS: OnceLock<&'static AtomicUsize> = OnceLock::new();
    PANICS.get_or_init(|| {
        let count: &'static AtomicUsize = Box::leak(Box::new(AtomicUsize::new(0)));
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            count.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
        count
    })
}

/// The full stack, with a counter outside it: every request the service was called with.
fn app(outcomes: &Outcomes, calls: &Arc<AtomicUsize>) -> Router {
    let calls = calls.clone();
    Router::new()
        .route("/", get(|| async { "ok" }).post(|| async { "posted" }))
        .route(
            "/p/{segment}",
            get(|Path(segment): Path<String>| async move { segment }),
        )
        .layer(
            ServiceBuilder::new()
                .map_request(move |request: Request<Body>| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    request
                })
                .layer(ClientDisconnectLayer::new().on_outcome(outcomes.hook()))
                .layer(ResponseTimeoutLayer::new(Duration::from_secs(10))),
        )
}

/// What came back on a raw connection.
#[derive(Debug)]
enum Answer {
    /// A response with this status (the connection may have stayed open or been closed).
    Status(u16),
    /// Closed (or reset) without a response.
    Closed,
}

/// One raw request: a name and the exact bytes.
struct Case {
    name: &'static str,
    bytes: Vec<u8>,
}

fn case(name: &'static str, bytes: impl Into<Vec<u8>>) -> Case {
    Case {
        name,
        bytes: bytes.into(),
    }
}

/// A well-formed request around `line` and `headers`, asking the server to close afterwards.
fn closing(line: &str, headers: &[u8]) -> Vec<u8> {
    let mut bytes = format!("{line}\r\nHost: 127.0.0.1\r\nConnection: close\r\n").into_bytes();
    bytes.extend_from_slice(headers);
    bytes.extend_from_slice(b"\r\n");
    bytes
}

fn cases() -> Vec<Case> {
    let long_method = "X".repeat(100);
    let many_headers: Vec<u8> = (0..500)
        .flat_map(|i| format!("x-header-{i}: value {i}\r\n").into_bytes())
        .collect();
    let almost_too_many_headers: Vec<u8> = (0..90)
        .flat_map(|i| format!("x-header-{i}: value {i}\r\n").into_bytes())
        .collect();
    let mut huge_value = b"x-huge: ".to_vec();
    huge_value.extend(vec![b'v'; 60 * 1024]);
    huge_value.extend_from_slice(b"\r\n");
    let mut huge_name = vec![b'n'; 60 * 1024];
    huge_name.extend_from_slice(b": value\r\n");
    let mut beyond_buffer = b"x-beyond: ".to_vec();
    beyond_buffer.extend(vec![b'v'; 1024 * 1024]);
    beyond_buffer.extend_from_slice(b"\r\n");
    let long_path = format!("/{}", "a".repeat(8 * 1024));
    let very_long_path = format!("/{}", "b/".repeat(35 * 1024));
    let long_segment = format!("/p/{}", "%41".repeat(4 * 1024));

    vec![
        case("a normal GET", closing("GET / HTTP/1.1", b"")),
        case("an extension method", closing("FOO / HTTP/1.1", b"")),
        case(
            "a 100-character method",
            closing(&format!("{long_method} / HTTP/1.1"), b""),
        ),
        case("a lowercase method", closing("get / HTTP/1.1", b"")),
        case("CONNECT", closing("CONNECT 127.0.0.1:1 HTTP/1.1", b"")),
        case("a 60 KiB header value", closing("GET / HTTP/1.1", &huge_value)),
        case("a 60 KiB header name", closing("GET / HTTP/1.1", &huge_name)),
        case("a 1 MiB header value", closing("GET / HTTP/1.1", &beyond_buffer)),
        case("90 headers", closing("GET / HTTP/1.1", &almost_too_many_headers)),
        case("500 headers", closing("GET / HTTP/1.1", &many_headers)),
        case("OPTIONS *", closing("OPTIONS * HTTP/1.1", b"")),
        case("asterisk GET", closing("GET * HTTP/1.1", b"")),
        case(
            "absolute-form",
            closing("GET http://example.com/ HTTP/1.1", b""),
        ),
        case(
            "absolute-form with a bad port",
            closing("GET http://example.com:99999/ HTTP/1.1", b""),
        ),
        case("//a/../b", closing("GET //a/../b HTTP/1.1", b"")),
        case("dot segments", closing("GET /../../../etc/passwd HTTP/1.1", b"")),
        case(
            "percent-encoded junk",
            closing("GET /%ff%fe%00%zz%%/%E2%82 HTTP/1.1", b""),
        ),
        case(
            "non-UTF-8 path parameter",
            closing("GET /p/%ff%fe HTTP/1.1", b""),
        ),
        case(
            "long path parameter",
            closing(&format!("GET {long_segment} HTTP/1.1"), b""),
        ),
        case(
            "an 8 KiB path",
            closing(&format!("GET {long_path} HTTP/1.1"), b""),
        ),
        case(
            "a 70 KiB path",
            closing(&format!("GET {very_long_path} HTTP/1.1"), b""),
        ),
        case(
            "a non-UTF-8 User-Agent",
            closing("GET / HTTP/1.1", b"User-Agent: \xff\xfe agent \x80\xc3\x28\r\n"),
        ),
        case(
            "a non-UTF-8 header",
            closing("GET / HTTP/1.1", b"x-junk: \xc0\xaf\xed\xa0\x80\r\n"),
        ),
        case(
            "duplicate Host headers",
            closing("GET / HTTP/1.1", b"Host: a.example\r\nHost: b.example\r\n"),
        ),
        case(
            "a body on GET",
            closing("GET / HTTP/1.1", b"Content-Length: 5\r\n\r\nhello"),
        ),
        case(
            "a POST with a body",
            closing("POST / HTTP/1.1", b"Content-Length: 5\r\n\r\nhello"),
        ),
        case(
            "a bad chunk size",
            closing("POST / HTTP/1.1", b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"),
        ),
        case("HTTP/1.0 without Host", "GET / HTTP/1.0\r\n\r\n"),
        case("no version", "GET /\r\n\r\n"),
        case("method only", "GET\r\n\r\n"),
        case("HTTP/9.9", "GET / HTTP/9.9\r\n\r\n"),
        case("HTTP/2.0 over HTTP/1", "GET / HTTP/2.0\r\n\r\n"),
        case("extra words", "GET / HTTP/1.1 extra\r\n\r\n"),
        case("double spaces", "GET  /  HTTP/1.1\r\n\r\n"),
        case("a tab in the target", "GET /a\tb HTTP/1.1\r\n\r\n"),
        case("a NUL in the method", "G\0T / HTTP/1.1\r\n\r\n"),
        case("a bad method character", "G(T / HTTP/1.1\r\n\r\n"),
        case("a header without colon", "GET / HTTP/1.1\r\nbad header\r\n\r\n"),
        case(
            "a space before the colon",
            "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
        ),
        case(
            "an obsolete line fold",
            "GET / HTTP/1.1\r\nHost: x\r\nx-fold: a\r\n b\r\n\r\n",
        ),
        case(
            "a NUL in a header value",
            "GET / HTTP/1.1\r\nHost: x\r\nx-nul: a\0b\r\n\r\n",
        ),
        case(
            "a bad Content-Length",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        ),
        case(
            "conflicting Content-Lengths",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        ),
        case(
            "Content-Length and chunked",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        case("bare LF line ends", "GET / HTTP/1.1\nHost: x\nConnection: close\n\n"),
        case(
            "a TLS ClientHello",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n".to_vec(),
        ),
        case(
            "binary junk",
            (0u8..=255).chain(*b"\r\n\r\n").collect::<Vec<u8>>(),
        ),
    ]
}

/// Writes `bytes` on a fresh connection and reads until the server closes it. A server that
/// closes early may make the write or the read fail; that is a close too.
async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> (Answer, Vec<u8>) {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    socket.set_nodelay(true).unwrap();
    let read = async {
        let _ = socket.write_all(bytes).await;
        let mut received = Vec::new();
        let mut buffer = [0; 16 * 1024];
        // Bounded: the server closes after one response (Connection: close, HTTP/1.0 or an
        // error), and the whole exchange is bounded by SOON below.
        loop {
            match socket.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
        received
    };
    let received = tokio::time::timeout(SOON, read)
        .await
        .expect("the server neither answered nor closed the connection");
    let answer = match received.strip_prefix(b"HTTP/1.") {
        Some(rest) => match rest.get(2..5) {
            Some(status) => {
                let status = std::str::from_utf8(status).expect("a status line");
                Answer::Status(status.parse().expect("a numeric status"))
            }
            // Cut short by a reset: the server closed the connection.
            None => Answer::Closed,
        },
        None => {
            assert!(
                received.is_empty(),
                "not an HTTP/1 response: {:?}",
                String::from_utf8_lossy(&received[..received.len().min(200)])
            );
            Answer::Closed
        }
    };
    (answer, received)
}

/// Runs every case against `server`; the spans are captured on this thread.
async fn survive_bad_input(server: Server, capture: &Capture) {
    let outcomes = Outcomes::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let addr = common::serve(server, app(&outcomes, &calls)).await;
    let spans_before = capture.closed_spans().len();

    for Case { name, bytes } in cases() {
        let (answer, _) = send_raw(addr, &bytes).await;
        // Every request the service saw has ended by the time the connection is closed.
        let called = calls.load(Ordering::SeqCst);
        outcomes.wait_for(called).await;
        eprintln!("{server:?}: {name}: {answer:?} (calls so far: {called})");
        if let Answer::Status(status) = answer {
            assert!(
                (100..600).contains(&status),
                "{server:?}: {name}: status {status}"
            );
            assert!(
                status < 500,
                "{server:?}: {name}: a server error ({status}) for bad input"
            );
        }
    }

    let called = calls.load(Ordering::SeqCst);
    assert!(called > 0, "some of the requests reached the service");
    let all = outcomes.wait_for(called).await;
    assert_eq!(
        all.len(),
        called,
        "{server:?}: one outcome per request that reached the service: {all:?}"
    );
    assert!(
        all.iter().all(|o| matches!(o, Outcome::Completed { .. })),
        "{server:?}: {all:?}"
    );

    // The request with the non-UTF-8 User-Agent was recorded, its agent made readable.
    let spans = capture.wait_spans(spans_before + called).await;
    assert!(
        spans[spans_before..].iter().any(|span| span
            .fields
            .get(tower_timeouts::trace::USER_AGENT_ORIGINAL)
            .is_some_and(|agent| agent.contains('\u{fffd}') && agent.contains("agent"))),
        "{server:?}: no span with the non-UTF-8 user agent"
    );

    // The server is still there and well.
    let mut send = common::h1(addr).await;
    let response = tokio::time::timeout(SOON, send.send_request(common::get(addr, "/")))
        .await
        .expect("an answer after the bad input")
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(common::body_bytes(response.into_body()).await, "ok");
    outcomes.wait_for(called + 1).await;
    assert_eq!(outcomes.all().len(), calls.load(Ordering::SeqCst));
}

// A current-thread runtime: the span capture is this thread's default subscriber, so the span
// code paths (the user agent among them) run for every request.
#[tokio::test]
async fn servers_survive_bad_input() {
    let panics = panics();
    let (capture, _guard) = Capture::install();
    for server in SERVERS {
        survive_bad_input(server, &capture).await;
    }
    assert_eq!(panics.load(Ordering::SeqCst), 0, "something panicked");
}

fn pending_service(
) -> impl tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone {
    service_fn(|_: Request<Body>| std::future::pending::<Result<Response<Body>, Infallible>>())
}

#[tokio::test(start_paused = true)]
async fn zero_limit_answers_a_pending_handler_at_once() {
    let panics = panics();
    let outcomes = Outcomes::new();
    let service = ResponseTimeoutLayer::new(Duration::ZERO)
        .on_outcome(outcomes.hook())
        .layer(pending_service());
    let start = Instant::now();
    // Paused time: were the timer not due at once, the clock would jump to the guard's end.
    let response = tokio::time::timeout(SOON, service.oneshot(Request::new(Body::empty())))
        .await
        .expect("a 504 without waiting")
        .unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(response.headers().contains_key(PROXY_STATUS));
    assert!(response.extensions().get::<Generated>().is_some());
    assert_eq!(
        common::body_bytes(response.into_body()).await,
        "504 Gateway Timeout\n"
    );
    assert!(matches!(
        outcomes.wait_for(1).await.as_slice(),
        [Outcome::ResponseTimeout { timeout, .. }] if timeout.is_zero()
    ));

    // The same through a router, behind the client-disconnect layer.
    let outcomes = Outcomes::new();
    let app = Router::new()
        .route("/", get(std::future::pending::<&'static str>))
        .layer(
            ServiceBuilder::new()
                .layer(ClientDisconnectLayer::new().on_outcome(outcomes.hook()))
                .layer(ResponseTimeoutLayer::new(Duration::ZERO)),
        );
    let response = tokio::time::timeout(SOON, app.oneshot(Request::new(Body::empty())))
        .await
        .expect("a 504 without waiting")
        .unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    drop(response);
    assert!(matches!(
        outcomes.wait_for(1).await.as_slice(),
        [Outcome::ResponseTimeout { .. }]
    ));
    assert_eq!(panics.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn zero_limit_lets_a_ready_handler_answer() {
    let outcomes = Outcomes::new();
    let app = Router::new()
        .route("/", get(|| async { "ready" }))
        .layer(ResponseTimeoutLayer::new(Duration::ZERO).on_outcome(outcomes.hook()));
    let response = app.oneshot(Request::new(Body::empty())).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.extensions().get::<Generated>().is_none());
    assert_eq!(common::body_bytes(response.into_body()).await, "ready");
    assert!(matches!(
        outcomes.wait_for(1).await.as_slice(),
        [Outcome::Completed { status, .. }] if *status == StatusCode::OK
    ));
}

#[tokio::test(start_paused = true)]
async fn max_limit_lets_a_50ms_handler_answer() {
    let panics = panics();
    let outcomes = Outcomes::new();
    let app = Router::new()
        .route(
            "/",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                "took 50 ms"
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(ClientDisconnectLayer::new().on_outcome(outcomes.hook()))
                .layer(ResponseTimeoutLayer::new(Duration::MAX)),
        );
    let start = Instant::now();
    let response = tokio::time::timeout(SOON, app.oneshot(Request::new(Body::empty())))
        .await
        .expect("the handler's answer")
        .unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(50));
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.extensions().get::<Generated>().is_none());
    assert_eq!(common::body_bytes(response.into_body()).await, "took 50 ms");
    assert!(matches!(
        outcomes.wait_for(1).await.as_slice(),
        [Outcome::Completed { status, .. }] if *status == StatusCode::OK
    ));
    assert_eq!(panics.load(Ordering::SeqCst), 0);
}

/// The extreme limits with the span capture on, so the span fields (the timeout in ms among
/// them) are computed too.
#[test]
fn extreme_limits_with_tracing_on() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let (capture, _guard) = Capture::install();
    runtime.block_on(async {
        let zero = ResponseTimeoutLayer::new(Duration::ZERO).layer(pending_service());
        let response = zero.oneshot(Request::new(Body::empty())).await.unwrap();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);

        let max =
            ResponseTimeoutLayer::new(Duration::MAX).layer(service_fn(|_: Request<Body>| async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<_, Infallible>(Response::new(Body::from("done")))
            }));
        let response = max.oneshot(Request::new(Body::empty())).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        drop(response);

        let spans = capture.wait_spans(2).await;
        let outcome = |i: usize| spans[i].fields.get(tower_timeouts::trace::OUTCOME).cloned();
        let timeout_ms = |i: usize| {
            spans[i]
                .fields
                .get(tower_timeouts::trace::TIMEOUT_MS)
                .cloned()
        };
        assert_eq!(outcome(0).as_deref(), Some("response_timeout"));
        assert_eq!(timeout_ms(0).as_deref(), Some("0"));
        assert_eq!(outcome(1).as_deref(), Some("completed"));
        // A limit that can never bind is not shown as one.
        assert_eq!(timeout_ms(1), None);
    });
}
