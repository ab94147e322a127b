//! The request span and the outcome event: one span per request, shared by the crate's layers,
//! with the OpenTelemetry fields, living together with tower-http's TraceLayer.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use http::{Request, Response, StatusCode};
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_http::trace::TraceLayer;
use tower_timeouts::{trace, ClientDisconnectLayer, ResponseTimeoutLayer};

use common::{Capture, Written};

fn slow_or_fast() -> impl tower::Service<
    Request<Body>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    service_fn(|request: Request<Body>| async move {
        if request.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        tracing::info!("handler ran");
        Ok::<_, Infallible>(Response::new(Body::from("ok")))
    })
}

fn get(path: &str) -> Request<Body> {
    Request::builder()
        .uri(path)
        .header("user-agent", "tests/1.0")
        .body(Body::empty())
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn one_span_for_both_layers_with_the_outcome_fields() {
    let (capture, _guard) = Capture::install();
    let service = ServiceBuilder::new()
        .layer(ClientDisconnectLayer::new())
        .layer(ResponseTimeoutLayer::new(Duration::from_millis(100)))
        .service(slow_or_fast());
    let response = service.oneshot(get("/slow")).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    drop(response);

    let spans = capture.wait_spans(1).await;
    assert_eq!(spans.len(), 1, "one span per request: {spans:?}");
    let fields = &spans[0].fields;
    for (field, value) in [
        (trace::HTTP_REQUEST_METHOD, "GET"),
        (trace::URL_PATH, "/slow"),
        (trace::USER_AGENT_ORIGINAL, "tests/1.0"),
        (trace::OUTCOME, "response_timeout"),
        (trace::HTTP_RESPONSE_STATUS_CODE, "504"),
        (trace::RECORDED_STATUS, "504"),
        (trace::ERROR_TYPE, "http_response_timeout"),
        (trace::OTEL_STATUS_CODE, "ERROR"),
        (trace::TIMEOUT_MS, "100"),
        (trace::ELAPSED_MS, "100"),
    ] {
        assert_eq!(
            fields.get(field).map(String::as_str),
            Some(value),
            "{field} in {fields:?}"
        );
    }

    let events: Vec<_> = capture
        .events()
        .into_iter()
        .filter(|event| event.fields.contains_key(trace::OUTCOME))
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    let parent = events[0]
        .parent
        .as_ref()
        .expect("the event has the request span as parent");
    assert_eq!(
        parent.get(trace::URL_PATH).map(String::as_str),
        Some("/slow")
    );
    assert_eq!(
        events[0].fields.get(trace::ERROR_TYPE).map(String::as_str),
        Some("http_response_timeout")
    );
}

#[tokio::test(start_paused = true)]
async fn a_normal_completion_has_no_event_and_no_error_fields() {
    let (capture, _guard) = Capture::install();
    let service = ServiceBuilder::new()
        .layer(ClientDisconnectLayer::new())
        .layer(ResponseTimeoutLayer::new(Duration::from_millis(100)))
        .service(slow_or_fast());
    let response = service.oneshot(get("/fast")).await.unwrap();
    common::body_bytes(response.into_body()).await;

    let spans = capture.wait_spans(1).await;
    let fields = &spans[0].fields;
    assert_eq!(
        fields.get(trace::OUTCOME).map(String::as_str),
        Some("completed")
    );
    assert_eq!(
        fields
            .get(trace::HTTP_RESPONSE_STATUS_CODE)
            .map(String::as_str),
        Some("200")
    );
    assert!(!fields.contains_key(trace::ERROR_TYPE));
    assert!(!fields.contains_key(trace::OTEL_STATUS_CODE));
    assert!(capture
        .events()
        .iter()
        .all(|event| !event.fields.contains_key(trace::OUTCOME)));
    // The handler's own events happen inside the request span.
    let handler = capture
        .events()
        .into_iter()
        .find(|event| event.fields.get("message").map(String::as_str) == Some("handler ran"))
        .unwrap();
    assert!(handler
        .parent
        .is_some_and(|parent| parent.contains_key(trace::URL_PATH)));
}

#[tokio::test(start_paused = true)]
async fn event_level_is_configurable() {
    let (capture, _guard) = Capture::install();
    let service = ServiceBuilder::new()
        .layer(ClientDisconnectLayer::new().event_level(tracing::Level::DEBUG))
        .layer(ResponseTimeoutLayer::new(Duration::from_millis(100)))
        .service(slow_or_fast());
    let _ = service.oneshot(get("/slow")).await.unwrap();
    capture.wait_spans(1).await;
    let levels: Vec<_> = capture
        .events()
        .into_iter()
        .filter(|event| event.fields.contains_key(trace::OUTCOME))
        .map(|event| event.level)
        .collect();
    assert_eq!(levels, [tracing::Level::DEBUG]);
}

#[tokio::test(start_paused = true)]
async fn with_trace_layer_one_span_carries_both() {
    let (capture, _guard) = Capture::install();
    let service = ServiceBuilder::new()
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request<Body>| trace::make_span(request)),
        )
        .layer(ClientDisconnectLayer::new().record_in_current_span())
        .layer(ResponseTimeoutLayer::new(Duration::from_millis(100)))
        .service(slow_or_fast());
    let response = service.oneshot(get("/slow")).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    common::body_bytes(response.into_body()).await;

    let spans = capture.wait_spans(1).await;
    assert_eq!(spans.len(), 1, "{spans:?}");
    assert_eq!(
        spans[0].fields.get(trace::OUTCOME).map(String::as_str),
        Some("response_timeout")
    );
    // tower-http's own events are in the same span.
    let on_response = capture.events().into_iter().find(|event| {
        event.fields.get("message").map(String::as_str) == Some("finished processing request")
    });
    assert!(on_response.is_some_and(|event| event
        .parent
        .is_some_and(|parent| parent.contains_key(trace::TIMEOUT_MS))));
}

#[tokio::test(start_paused = true)]
async fn without_record_in_current_span_ours_is_a_child_of_trace_layers() {
    let (capture, _guard) = Capture::install();
    let service = ServiceBuilder::new()
        .layer(TraceLayer::new_for_http())
        .layer(ClientDisconnectLayer::new())
        .layer(ResponseTimeoutLayer::new(Duration::from_millis(100)))
        .service(slow_or_fast());
    let response = service.oneshot(get("/fast")).await.unwrap();
    common::body_bytes(response.into_body()).await;
    // Both spans are named `request`: tower-http's and ours.
    let spans = capture.wait_spans(2).await;
    let ours: Vec<_> = spans
        .iter()
        .filter(|span| span.fields.contains_key(trace::OUTCOME))
        .collect();
    assert_eq!(ours.len(), 1, "{spans:?}");
    assert_eq!(ours[0].parent_name.as_deref(), Some("request"));
}

#[tokio::test(start_paused = true)]
async fn the_span_shows_the_limit_that_binds() {
    let (capture, _guard) = Capture::install();
    let service = ServiceBuilder::new()
        .layer(ClientDisconnectLayer::new())
        .layer(ResponseTimeoutLayer::new(Duration::from_millis(150)))
        .layer(ResponseTimeoutLayer::new(Duration::from_millis(300)))
        .service(slow_or_fast());
    let response = service.oneshot(get("/slow")).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    drop(response);
    let spans = capture.wait_spans(1).await;
    assert_eq!(
        spans[0].fields.get(trace::TIMEOUT_MS).map(String::as_str),
        Some("150")
    );
    assert_eq!(
        spans[0].fields.get(trace::ELAPSED_MS).map(String::as_str),
        Some("150")
    );
}

/// The inner service runs in the request span both when it is called and when its future is
/// polled, so that what it logs (and the spans it opens) belong to the request; for each of the
/// crate's layers as the one that opens the span.
#[tokio::test(start_paused = true)]
async fn the_inner_service_is_called_and_polled_in_the_request_span() {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tower::Layer;

    #[derive(Clone)]
    struct LogsInCall;

    impl tower::Service<Request<Body>> for LogsInCall {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<Body>) -> Self::Future {
            tracing::info!(stage = "call");
            Box::pin(async {
                tracing::info!(stage = "poll");
                Ok(Response::new(Body::from("ok")))
            })
        }
    }

    async fn events_of(
        service: impl tower::Service<
            Request<Body>,
            Response = Response<impl http_body::Body>,
            Error = Infallible,
        >,
    ) -> Vec<common::Captured> {
        let (capture, _guard) = Capture::install();
        let response = service.oneshot(get("/")).await.unwrap();
        drop(response);
        capture.wait_spans(1).await;
        capture.events()
    }

    let stacks = [
        (
            "ClientDisconnect",
            events_of(ClientDisconnectLayer::new().layer(LogsInCall)).await,
        ),
        (
            "ResponseTimeout",
            events_of(ResponseTimeoutLayer::new(Duration::from_secs(1)).layer(LogsInCall)).await,
        ),
    ];
    for (layer, events) in stacks {
        for stage in ["call", "poll"] {
            let event = events
                .iter()
                .find(|event| event.fields.get("stage").map(String::as_str) == Some(stage))
                .unwrap_or_else(|| panic!("{layer}: no event in {stage}: {events:?}"));
            let parent = event.parent.as_ref();
            assert_eq!(
                parent
                    .and_then(|fields| fields.get(trace::URL_PATH))
                    .map(String::as_str),
                Some("/"),
                "{layer}: the {stage} event's parent is the request span: {event:?}"
            );
        }
    }
}

/// The `key=` of every field in a line of `fmt`'s default format.
fn keys(line: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut in_quotes = false;
    let mut word = String::new();
    for c in line.chars() {
        match c {
            '"' => in_quotes = !in_quotes,
            '=' if !in_quotes => keys.push(std::mem::take(&mut word)),
            c if !in_quotes && (c.is_whitespace() || "{}:,".contains(c)) => word.clear(),
            c if !in_quotes => word.push(c),
            _ => {}
        }
    }
    keys
}

/// Serves a request that times out (504) over TCP on loopback, with `subscriber` as the
/// default, and returns what `written` got once the request ended.
async fn log_a_timeout(
    subscriber: impl tracing::Subscriber + Send + Sync,
    written: &Written,
) -> Vec<String> {
    let _guard = tracing::subscriber::set_default(subscriber);
    let app = axum::Router::new()
        .route(
            "/slow",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_secs(10)).await;
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(ClientDisconnectLayer::new())
                .layer(ResponseTimeoutLayer::new(Duration::from_millis(50))),
        );
    let addr = common::serve(common::Server::AxumServe, app).await;
    let mut client = common::h1(addr).await;
    let response = client
        .send_request(common::get(addr, "/slow"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    common::body_bytes(response.into_body()).await;
    tokio::time::timeout(common::SOON, async {
        while !written
            .lines()
            .iter()
            .any(|line| line.contains("request ended"))
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    let lines = written.lines();
    eprintln!("{}", lines.join("\n"));
    lines
}

/// A request that fails, with `fmt`'s defaults (ANSI aside): one line, and no field in it
/// twice; the span's context says what the request was, the event how it ended.
#[tokio::test(flavor = "current_thread")]
async fn a_failed_request_is_one_line_with_every_field_once() {
    let written = Written::default();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(written.clone())
        .finish();
    let lines = log_a_timeout(subscriber, &written).await;
    let ours: Vec<_> = lines
        .iter()
        .filter(|line| line.contains("tower_timeouts"))
        .collect();
    assert_eq!(ours.len(), 1, "{lines:#?}");
    let keys = keys(ours[0]);
    let mut seen = std::collections::BTreeSet::new();
    let twice: Vec<_> = keys.iter().filter(|key| !seen.insert(*key)).collect();
    assert!(twice.is_empty(), "{twice:?} twice in {}", ours[0]);
    for key in [
        trace::URL_PATH,
        trace::OUTCOME,
        trace::ERROR_TYPE,
        trace::RECORDED_STATUS,
    ] {
        assert!(keys.iter().any(|k| k == key), "no {key} in {}", ours[0]);
    }
}

/// The same with `fmt().json()`: one JSON object, the request's fields under `span`, the
/// outcome's under `fields`, none in both.
#[tokio::test(flavor = "current_thread")]
async fn a_failed_request_in_json_has_every_field_once() {
    let written = Written::default();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_writer(written.clone())
        .finish();
    let lines = log_a_timeout(subscriber, &written).await;
    let ours: Vec<_> = lines
        .iter()
        .filter(|line| line.contains("tower_timeouts"))
        .collect();
    assert_eq!(ours.len(), 1, "{lines:#?}");
    let line: serde_json::Value = serde_json::from_str(ours[0]).unwrap();
    let keys = |object: &str| -> Vec<String> {
        line[object]
            .as_object()
            .expect(object)
            .keys()
            .cloned()
            .collect()
    };
    let (span, fields) = (keys("span"), keys("fields"));
    assert!(
        span.iter().all(|key| !fields.contains(key)),
        "{span:?} and {fields:?}"
    );
    assert_eq!(line["span"][trace::URL_PATH], "/slow");
    assert_eq!(line["fields"][trace::OUTCOME], "response_timeout");
    assert_eq!(line["fields"][trace::RECORDED_STATUS], 504);
}
