//! What an OpenTelemetry backend receives, through `tracing-opentelemetry` and the SDK's
//! in-memory exporter, for requests served over real TCP on loopback: the server span's name,
//! kind, status and attributes; the `upstream` and `connect` spans of a call the handler makes,
//! as client spans; and one trace for all of it.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use http::{Request, StatusCode};
use opentelemetry::trace::{SpanKind, Status, TracerProvider as _};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tower::{ServiceBuilder, ServiceExt};
use tower_timeouts::{ClientDisconnectLayer, ResponseTimeoutLayer};
use tracing_subscriber::prelude::*;

/// Installs `tracing-opentelemetry` with an in-memory exporter as this thread's default.
fn install() -> (
    SdkTracerProvider,
    InMemorySpanExporter,
    tracing::subscriber::DefaultGuard,
) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("tests"));
    let guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
    (provider, exporter, guard)
}

/// The exported spans once `n` of them have ended (panics after [`common::SOON`]).
async fn exported(
    provider: &SdkTracerProvider,
    exporter: &InMemorySpanExporter,
    n: usize,
) -> Vec<SpanData> {
    tokio::time::timeout(common::SOON, async {
        loop {
            provider.force_flush().unwrap();
            let spans = exporter.get_finished_spans().unwrap();
            if spans.len() >= n {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("fewer than {n} spans: {:#?}", exporter.get_finished_spans()))
}

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    spans
        .iter()
        .find(|span| span.name == name)
        .unwrap_or_else(|| panic!("no `{name}` span in {spans:#?}"))
}

fn app(hole: SocketAddr) -> Router {
    let upstream = common::gateway_upstream(Duration::from_millis(100), Duration::from_secs(5));
    Router::new()
        .route("/fast", get(|| async { "fast" }))
        .route(
            "/slow",
            get(|| async { tokio::time::sleep(Duration::from_secs(10)).await }),
        )
        .route(
            "/upstream",
            get(move || {
                let upstream = upstream.clone();
                async move {
                    let request = Request::get(format!("http://{hole}/"))
                        .body(Body::empty())
                        .unwrap();
                    upstream.oneshot(request).await.unwrap()
                }
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(ClientDisconnectLayer::new())
                .layer(ResponseTimeoutLayer::new(Duration::from_millis(200))),
        )
}

async fn get_status(addr: SocketAddr, path: &str) -> StatusCode {
    let mut client = common::h1(addr).await;
    let response = client.send_request(common::get(addr, path)).await.unwrap();
    let status = response.status();
    common::body_bytes(response.into_body()).await;
    status
}

/// A 504 is a server span with status Error and the outcome's attributes; a 200 a server span
/// with its status unset and no `error.type`.
#[tokio::test(flavor = "current_thread")]
async fn the_server_span_is_exported_with_its_kind_status_and_attributes() {
    let (provider, exporter, _guard) = install();
    let hole = common::black_hole().await;
    let addr = common::serve(common::Server::AxumServe, app(hole.addr)).await;

    assert_eq!(get_status(addr, "/slow").await, StatusCode::GATEWAY_TIMEOUT);
    let spans = exported(&provider, &exporter, 1).await;
    let span = named(&spans, "request");
    assert_eq!(span.span_kind, SpanKind::Server);
    assert!(
        matches!(span.status, Status::Error { .. }),
        "{:?}",
        span.status
    );
    for (key, value) in [
        ("http.request.method", Value::from("GET")),
        ("url.path", Value::from("/slow")),
        ("http.response.status_code", Value::from(504_i64)),
        ("error.type", Value::from("http_response_timeout")),
        ("tower_timeouts.outcome", Value::from("response_timeout")),
    ] {
        assert_eq!(attribute(span, key), Some(&value), "{key} in {span:#?}");
    }

    exporter.reset();
    assert_eq!(get_status(addr, "/fast").await, StatusCode::OK);
    let spans = exported(&provider, &exporter, 1).await;
    let span = named(&spans, "request");
    assert_eq!(span.span_kind, SpanKind::Server);
    assert_eq!(span.status, Status::Unset);
    assert_eq!(
        attribute(span, "http.response.status_code"),
        Some(&Value::from(200_i64))
    );
    assert_eq!(attribute(span, "error.type"), None);
}

/// A call the handler makes upstream, to a black hole: the request span (599, Error), the
/// `upstream` span and the `connect` span, both client spans with `server.address` and
/// `server.port`, all in one trace, each the child of the one before.
#[tokio::test(flavor = "current_thread")]
async fn an_upstream_call_is_client_spans_in_the_requests_trace() {
    let (provider, exporter, _guard) = install();
    let hole = common::black_hole().await;
    let addr = common::serve(common::Server::AxumServe, app(hole.addr)).await;

    assert_eq!(get_status(addr, "/upstream").await.as_u16(), 599);
    let spans = exported(&provider, &exporter, 3).await;
    let (request, upstream, connect) = (
        named(&spans, "request"),
        named(&spans, "upstream"),
        named(&spans, "connect"),
    );
    assert_eq!(request.span_kind, SpanKind::Server);
    assert!(matches!(request.status, Status::Error { .. }));
    assert_eq!(
        attribute(request, "error.type"),
        Some(&Value::from("connection_timeout"))
    );
    for span in [upstream, connect] {
        assert_eq!(span.span_kind, SpanKind::Client, "{span:#?}");
        assert_eq!(
            attribute(span, "server.address"),
            Some(&Value::from("127.0.0.1")),
            "{span:#?}"
        );
        assert_eq!(
            attribute(span, "server.port"),
            Some(&Value::from(i64::from(hole.addr.port()))),
            "{span:#?}"
        );
    }
    assert!(matches!(upstream.status, Status::Error { .. }));
    let trace = request.span_context.trace_id();
    for span in [upstream, connect] {
        assert_eq!(span.span_context.trace_id(), trace, "one trace: {spans:#?}");
    }
    assert_eq!(upstream.parent_span_id, request.span_context.span_id());
    assert_eq!(connect.parent_span_id, upstream.span_context.span_id());
}
