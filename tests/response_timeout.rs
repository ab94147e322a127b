//! `ResponseTimeoutLayer` in an axum app, served over real TCP on loopback by both servers and
//! called by hyper clients over HTTP/1.1 and HTTP/2.
mod common;

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Extension, Router};
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, Response, StatusCode, Version};
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};
use tower_http::trace::TraceLayer;
use tower_timeouts::response::PROXY_STATUS;
use tower_timeouts::{Deadline, Generated, Outcome, ResponseTimeoutLayer};

use common::{serve, Live, SERVERS, SOON};

/// The layer's limit in these tests.
const LIMIT: Duration = Duration::from_millis(100);
/// Far beyond [`LIMIT`]: a handler this slow always loses to the timer, however loaded the
/// machine is.
const FOREVER: Duration = Duration::from_secs(60);
/// The size of the large body: a few KiB, not a multiple of any buffer size.
const BIG: usize = 96 * 1024 + 123;
/// The streamed body: this many chunks of [`CHUNK`] bytes.
const CHUNKS: usize = 16;
const CHUNK: usize = 4 * 1024;

const TIMEOUT_PROXY_STATUS: &str = "tower-timeouts; error=http_response_timeout";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    H1,
    H2,
}

const PROTOS: [Proto; 2] = [Proto::H1, Proto::H2];

/// How the layer is attached to the router.
#[derive(Clone, Copy, Debug)]
enum Attach {
    Layer,
    RouteLayer,
}

const ATTACHES: [Attach; 2] = [Attach::Layer, Attach::RouteLayer];

/// hyper-util's client: HTTP/1.1, or HTTP/2 with prior knowledge (h2c).
fn client(proto: Proto) -> Client<HttpConnector, Empty<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let mut builder = Client::builder(TokioExecutor::new());
    if proto == Proto::H2 {
        builder.http2_only(true);
    }
    builder.build(connector)
}

/// A response read to its end.
#[derive(Debug)]
struct Fetched {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
}

async fn fetch(proto: Proto, addr: std::net::SocketAddr, path: &str) -> Fetched {
    let client = client(proto);
    tokio::time::timeout(SOON, async {
        let response = client.request(common::get(addr, path)).await.unwrap();
        let (parts, body) = response.into_parts();
        Fetched {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body: common::body_bytes(body).await,
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no response to {path} over {proto:?} in {SOON:?}"))
}

fn expected_version(proto: Proto) -> Version {
    match proto {
        Proto::H1 => Version::HTTP_11,
        Proto::H2 => Version::HTTP_2,
    }
}

/// Bytes that are not all the same, so a shifted or truncated body shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn streamed_pattern() -> Vec<u8> {
    (0..CHUNKS * CHUNK).map(|i| (i % 253) as u8).collect()
}

/// The handlers: a slow one (kept count of, to see it dropped), fast ones with their own bodies.
fn routes(live: &Live) -> Router {
    let live = live.clone();
    Router::new()
        .route(
            "/slow",
            get(move || {
                let guard = live.enter();
                async move {
                    tokio::time::sleep(FOREVER).await;
                    drop(guard);
                    "too late"
                }
            }),
        )
        .route("/fast", get(|| async { "fast" }))
        .route("/big", get(|| async { pattern(BIG) }))
        .route("/stream", get(stream))
        .route("/upstream-504", get(upstream_504))
}

/// A body sent in chunks over more time than [`LIMIT`]: the limit is on the response head.
async fn stream() -> Body {
    let data = Bytes::from(streamed_pattern());
    let chunks = futures_util::stream::unfold(0, move |i| {
        let data = data.clone();
        async move {
            if i == CHUNKS {
                return None;
            }
            tokio::time::sleep(LIMIT / 10).await;
            Some((
                Ok::<_, Infallible>(data.slice(i * CHUNK..(i + 1) * CHUNK)),
                i + 1,
            ))
        }
    });
    Body::from_stream(chunks)
}

/// What an upstream that gave up itself would answer.
async fn upstream_504() -> impl IntoResponse {
    (
        StatusCode::GATEWAY_TIMEOUT,
        [("x-upstream", "origin")],
        "the origin gave up\n",
    )
}

fn app(attach: Attach, live: &Live) -> Router {
    let layer = ResponseTimeoutLayer::new(LIMIT);
    match attach {
        Attach::Layer => routes(live).layer(layer),
        Attach::RouteLayer => routes(live).route_layer(layer),
    }
}

fn assert_generated_504(fetched: &Fetched, context: &str) {
    assert_eq!(fetched.status, StatusCode::GATEWAY_TIMEOUT, "{context}");
    assert_eq!(
        fetched.headers.get(PROXY_STATUS).map(|v| v.as_bytes()),
        Some(TIMEOUT_PROXY_STATUS.as_bytes()),
        "{context}"
    );
    assert_eq!(
        fetched.headers[CONTENT_TYPE], "text/plain; charset=utf-8",
        "{context}"
    );
    assert_eq!(fetched.body, "504 Gateway Timeout\n", "{context}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handler_is_answered_504_over_the_wire() {
    for server in SERVERS {
        for attach in ATTACHES {
            let live = Live::new();
            let addr = serve(server, app(attach, &live)).await;
            for proto in PROTOS {
                let context = format!("{server:?}, {attach:?}, {proto:?}");
                let fetched = fetch(proto, addr, "/slow").await;
                assert_eq!(fetched.version, expected_version(proto), "{context}");
                assert_generated_504(&fetched, &context);
                // The timeout dropped the handler's future: nothing of it is left running.
                live.wait_zero().await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_handler_keeps_its_response_and_body() {
    let big = pattern(BIG);
    let streamed = streamed_pattern();
    for server in SERVERS {
        for attach in ATTACHES {
            let addr = serve(server, app(attach, &Live::new())).await;
            for proto in PROTOS {
                let context = format!("{server:?}, {attach:?}, {proto:?}");

                let fetched = fetch(proto, addr, "/fast").await;
                assert_eq!(fetched.status, StatusCode::OK, "{context}");
                assert_eq!(fetched.version, expected_version(proto), "{context}");
                assert!(!fetched.headers.contains_key(PROXY_STATUS), "{context}");
                assert_eq!(fetched.body, "fast", "{context}");

                let fetched = fetch(proto, addr, "/big").await;
                assert_eq!(fetched.status, StatusCode::OK, "{context}");
                assert_eq!(
                    fetched.headers["content-length"],
                    BIG.to_string().as_str(),
                    "{context}"
                );
                assert_eq!(fetched.body.len(), BIG, "{context}");
                assert!(fetched.body == big, "{context}: the large body differs");

                let fetched = fetch(proto, addr, "/stream").await;
                assert_eq!(fetched.status, StatusCode::OK, "{context}");
                assert!(!fetched.headers.contains_key(PROXY_STATUS), "{context}");
                assert!(
                    !fetched.headers.contains_key("content-length"),
                    "{context}: a streamed body has no length"
                );
                assert_eq!(fetched.body.len(), streamed.len(), "{context}");
                assert!(
                    fetched.body == streamed,
                    "{context}: the streamed body differs"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composes_with_service_builder_and_trace_layer() {
    let live = Live::new();
    // TraceLayer outside the timeout, both in one ServiceBuilder.
    let in_builder = routes(&live).layer(
        ServiceBuilder::new()
            .layer(TraceLayer::new_for_http())
            .layer(ResponseTimeoutLayer::new(LIMIT)),
    );
    // TraceLayer added by a later Router::layer, so outside; its span is the one ours opens in.
    let chained = routes(&live).layer(ResponseTimeoutLayer::new(LIMIT)).layer(
        TraceLayer::new_for_http()
            .make_span_with(|request: &Request| tower_timeouts::trace::make_span(request)),
    );
    for server in SERVERS {
        for (name, app) in [
            ("builder", in_builder.clone()),
            ("chained", chained.clone()),
        ] {
            let addr = serve(server, app).await;
            for proto in PROTOS {
                let context = format!("{server:?}, {name}, {proto:?}");
                assert_generated_504(&fetch(proto, addr, "/slow").await, &context);
                let fetched = fetch(proto, addr, "/fast").await;
                assert_eq!(fetched.status, StatusCode::OK, "{context}");
                assert_eq!(fetched.body, "fast", "{context}");
            }
        }
    }
    live.wait_zero().await;
}

/// How long [`takes_a_while`] takes, unless its `?ms=` says otherwise.
const HANDLER_TIME: Duration = Duration::from_millis(300);
/// The deadline of the route that allows more than the default.
const LONG_DEADLINE: Duration = Duration::from_secs(2);

/// A handler that takes [`HANDLER_TIME`], or `?ms=N` milliseconds.
async fn takes_a_while(request: Request) -> &'static str {
    let time = request
        .uri()
        .query()
        .and_then(|query| query.strip_prefix("ms="))
        .and_then(|ms| ms.parse().ok())
        .map_or(HANDLER_TIME, Duration::from_millis);
    tokio::time::sleep(time).await;
    "done"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_from_an_earlier_layer_overrides_the_limit() {
    // 1. A map_request middleware outside the timeout sets the deadline for one path.
    let by_middleware = Router::new()
        .route("/long", get(takes_a_while))
        .route("/default", get(takes_a_while))
        .layer(ResponseTimeoutLayer::new(LIMIT))
        .layer(axum::middleware::map_request(
            |mut request: Request| async move {
                if request.uri().path() == "/long" {
                    request
                        .extensions_mut()
                        .insert(Deadline::after(LONG_DEADLINE));
                }
                request
            },
        ));
    // 2. An Extension layer outside the timeout, on a router merged with one that has none.
    let by_extension = Router::new()
        .route("/default", get(takes_a_while))
        .layer(ResponseTimeoutLayer::new(LIMIT))
        .merge(
            Router::new()
                .route("/long", get(takes_a_while))
                .layer(ResponseTimeoutLayer::new(LIMIT))
                .layer(Extension(Deadline::after(LONG_DEADLINE))),
        );

    for server in SERVERS {
        for (name, app) in [
            ("map_request", by_middleware.clone()),
            ("Extension", by_extension.clone()),
        ] {
            let addr = serve(server, app).await;
            for proto in PROTOS {
                let context = format!("{server:?}, {name}, {proto:?}");
                // 300 ms, within the route's 2 s: the handler's own answer.
                let fetched = fetch(proto, addr, "/long").await;
                assert_eq!(fetched.status, StatusCode::OK, "{context}");
                assert_eq!(fetched.body, "done", "{context}");
                assert!(!fetched.headers.contains_key(PROXY_STATUS), "{context}");
                // The same handler without the deadline has the default 100 ms. It is made far
                // slower here, so that a stalled machine cannot let the handler win a tie.
                let fetched = fetch(proto, addr, "/default?ms=60000").await;
                assert_generated_504(&fetched, &context);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_status_and_custom_response_reach_the_client() {
    let live = Live::new();
    let problem = |outcome: &Outcome| {
        let status = outcome
            .sent_status()
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = format!(
            r#"{{"type":"about:blank","title":"{}","status":{}}}"#,
            status.canonical_reason().unwrap_or("timeout"),
            status.as_u16()
        );
        Response::builder()
            .status(status)
            .header(CONTENT_TYPE, "application/problem+json")
            .body(Bytes::from(body))
            .unwrap()
    };
    let app = Router::new()
        .nest(
            "/unavailable",
            routes(&live)
                .layer(ResponseTimeoutLayer::new(LIMIT).status(StatusCode::SERVICE_UNAVAILABLE)),
        )
        .nest(
            "/problem",
            routes(&live).layer(ResponseTimeoutLayer::new(LIMIT).response_with(problem)),
        )
        .nest(
            "/problem-503",
            routes(&live).layer(
                ResponseTimeoutLayer::new(LIMIT)
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .response_with(problem),
            ),
        );
    for server in SERVERS {
        let addr = serve(server, app.clone()).await;
        for proto in PROTOS {
            let context = format!("{server:?}, {proto:?}");

            let fetched = fetch(proto, addr, "/unavailable/slow").await;
            assert_eq!(fetched.status, StatusCode::SERVICE_UNAVAILABLE, "{context}");
            assert_eq!(
                fetched.headers[PROXY_STATUS], TIMEOUT_PROXY_STATUS,
                "{context}"
            );
            assert_eq!(fetched.body, "503 Service Unavailable\n", "{context}");

            let fetched = fetch(proto, addr, "/problem/slow").await;
            assert_eq!(fetched.status, StatusCode::GATEWAY_TIMEOUT, "{context}");
            assert_eq!(
                fetched.headers[PROXY_STATUS], TIMEOUT_PROXY_STATUS,
                "{context}"
            );
            assert_eq!(
                fetched.headers[CONTENT_TYPE], "application/problem+json",
                "{context}"
            );
            assert_eq!(
                fetched.body, r#"{"type":"about:blank","title":"Gateway Timeout","status":504}"#,
                "{context}"
            );

            let fetched = fetch(proto, addr, "/problem-503/slow").await;
            assert_eq!(fetched.status, StatusCode::SERVICE_UNAVAILABLE, "{context}");
            assert_eq!(
                fetched.headers[PROXY_STATUS], TIMEOUT_PROXY_STATUS,
                "{context}"
            );
            assert_eq!(
                fetched.headers[CONTENT_TYPE], "application/problem+json",
                "{context}"
            );
            assert_eq!(
                fetched.body,
                r#"{"type":"about:blank","title":"Service Unavailable","status":503}"#,
                "{context}"
            );

            // A fast handler behind the custom layers keeps its own answer.
            let fetched = fetch(proto, addr, "/problem-503/fast").await;
            assert_eq!(fetched.status, StatusCode::OK, "{context}");
            assert_eq!(fetched.body, "fast", "{context}");
        }
    }
    live.wait_zero().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_504_passes_untouched_over_the_wire() {
    for server in SERVERS {
        for attach in ATTACHES {
            let addr = serve(server, app(attach, &Live::new())).await;
            for proto in PROTOS {
                let context = format!("{server:?}, {attach:?}, {proto:?}");
                let fetched = fetch(proto, addr, "/upstream-504").await;
                assert_eq!(fetched.status, StatusCode::GATEWAY_TIMEOUT, "{context}");
                assert_eq!(fetched.headers["x-upstream"], "origin", "{context}");
                assert!(!fetched.headers.contains_key(PROXY_STATUS), "{context}");
                assert_eq!(fetched.body, "the origin gave up\n", "{context}");
            }
        }
    }
}

/// Extensions do not cross the wire, so the marker is checked on the router itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_generated_responses_carry_the_marker() {
    for attach in ATTACHES {
        let live = Live::new();
        let app = app(attach, &live);
        let oneshot = |path: &'static str| {
            let app = app.clone();
            async move {
                let request = http::Request::get(path).body(Body::empty()).unwrap();
                tokio::time::timeout(SOON, app.oneshot(request))
                    .await
                    .expect("the router answers")
                    .unwrap()
            }
        };

        let upstream = oneshot("/upstream-504").await;
        assert_eq!(upstream.status(), StatusCode::GATEWAY_TIMEOUT, "{attach:?}");
        assert!(
            upstream.extensions().get::<Generated>().is_none(),
            "{attach:?}: an upstream 504 is not ours"
        );
        assert!(!upstream.headers().contains_key(PROXY_STATUS), "{attach:?}");
        assert_eq!(
            common::body_bytes(upstream.into_body()).await,
            "the origin gave up\n"
        );

        let fast = oneshot("/fast").await;
        assert!(fast.extensions().get::<Generated>().is_none(), "{attach:?}");

        let generated = oneshot("/slow").await;
        assert_eq!(
            generated.status(),
            StatusCode::GATEWAY_TIMEOUT,
            "{attach:?}"
        );
        let marker = generated
            .extensions()
            .get::<Generated>()
            .unwrap_or_else(|| panic!("{attach:?}: no marker on the generated 504"));
        assert!(
            matches!(
                marker.outcome(),
                Outcome::ResponseTimeout { timeout, status, .. }
                    if *timeout == LIMIT && *status == StatusCode::GATEWAY_TIMEOUT
            ),
            "{attach:?}: {:?}",
            marker.outcome()
        );
        live.wait_zero().await;
    }
}

/// With the `axum` feature, the handler extracts the deadline in force: the layer's own, or the
/// earlier one a caller sent in the configured header; `Option<Deadline>` is `None` without the
/// layer.
#[cfg(feature = "axum")]
#[tokio::test]
async fn the_deadline_in_force_is_an_axum_extractor() {
    let header = http::HeaderName::from_static("x-deadline-ms");
    let handler = |deadline: Deadline| async move { deadline.remaining().as_millis().to_string() };
    let app = Router::new()
        .route("/", get(handler))
        .route(
            "/maybe",
            get(|deadline: Option<Deadline>| async move { format!("{}", deadline.is_some()) }),
        )
        .layer(ResponseTimeoutLayer::new(FOREVER).deadline_header(header.clone()));
    let bare = Router::new().route(
        "/maybe",
        get(|deadline: Option<Deadline>| async move { format!("{}", deadline.is_some()) }),
    );
    for server in SERVERS {
        let addr = serve(server, app.clone()).await;
        let own: u128 = String::from_utf8(fetch(Proto::H1, addr, "/").await.body.to_vec())
            .unwrap()
            .parse()
            .unwrap();
        assert!((50_000..=60_000).contains(&own), "{own} ms");

        let mut request = common::get(addr, "/");
        request
            .headers_mut()
            .insert(header.clone(), http::HeaderValue::from_static("3000"));
        let response = client(Proto::H1).request(request).await.unwrap();
        let body = common::body_bytes(response.into_body()).await;
        let sent: u128 = String::from_utf8(body.to_vec()).unwrap().parse().unwrap();
        // The 3 s sent, less the 10 ms margin, less the time it took.
        assert!((1..=2_990).contains(&sent), "{sent} ms");

        assert_eq!(fetch(Proto::H1, addr, "/maybe").await.body, "true");
        let bare_addr = serve(server, bare.clone()).await;
        assert_eq!(fetch(Proto::H1, bare_addr, "/maybe").await.body, "false");
    }
}
