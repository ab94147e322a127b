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

use common::Capture;

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
