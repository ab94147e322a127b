use std::convert::Infallible;
use std::future::{pending, Future};
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

use super::*;
use crate::outcome::{Outcome, Phase};
use crate::response::{Generated, PROXY_STATUS};
use crate::test_support::Outcomes;
use tower_layer::Layer;

const LIMIT: Duration = Duration::from_millis(100);

fn after(
    delay: Duration,
) -> impl Service<
    Request<()>,
    Response = Response<String>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<String>, Infallible>>,
> + Clone {
    service_fn(move |_: Request<()>| async move {
        tokio::time::sleep(delay).await;
        Ok::<_, Infallible>(Response::new("inner".to_owned()))
    })
}

async fn body<B: http_body::Body>(response: Response<B>) -> Bytes
where
    B::Error: std::fmt::Debug,
{
    response.into_body().collect().await.unwrap().to_bytes()
}

#[tokio::test(start_paused = true)]
async fn slow_response_becomes_504_at_the_limit() {
    let outcomes = Outcomes::default();
    let service = ResponseTimeoutLayer::new(LIMIT)
        .on_outcome(outcomes.hook())
        .layer(after(Duration::from_secs(10)));
    let start = Instant::now();
    let response = service.oneshot(Request::new(())).await.unwrap();
    assert_eq!(start.elapsed(), LIMIT);
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        response.headers()[PROXY_STATUS],
        "tower-timeouts; error=http_response_timeout"
    );
    let expected = Outcome::response_timeout(LIMIT, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        response
            .extensions()
            .get::<Generated>()
            .map(Generated::outcome),
        Some(&expected)
    );
    assert_eq!(body(response).await, "504 Gateway Timeout\n");
    assert_eq!(outcomes.one(), expected);
}

#[tokio::test(start_paused = true)]
async fn fast_response_passes_untouched() {
    let outcomes = Outcomes::default();
    let service = ResponseTimeoutLayer::new(LIMIT)
        .on_outcome(outcomes.hook())
        .layer(after(Duration::from_millis(99)));
    let response = service.oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.extensions().get::<Generated>().is_none());
    assert!(!response.body().is_generated());
    assert_eq!(body(response).await, "inner");
    assert_eq!(outcomes.one(), Outcome::completed(StatusCode::OK));
}

#[tokio::test(start_paused = true)]
async fn ready_response_wins_a_tie() {
    let service = ResponseTimeoutLayer::new(LIMIT).layer(after(LIMIT));
    let response = service.oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn no_timer_when_ready_at_first_poll() {
    let mut service = ResponseTimeoutLayer::new(LIMIT).layer(service_fn(|_: Request<()>| {
        std::future::ready(Ok::<_, Infallible>(Response::new(String::new())))
    }));
    let mut future = pin!(service.call(Request::new(())));
    let mut cx = Context::from_waker(std::task::Waker::noop());
    assert!(matches!(future.as_mut().poll(&mut cx), Poll::Ready(Ok(_))));
    assert!(!future.has_timer());

    let mut slow = ResponseTimeoutLayer::new(LIMIT).layer(after(Duration::from_secs(1)));
    let mut future = pin!(slow.call(Request::new(())));
    assert!(future.as_mut().poll(&mut cx).is_pending());
    assert!(future.has_timer());
}

#[tokio::test(start_paused = true)]
async fn zero_times_out_at_once_unless_ready() {
    let service = ResponseTimeoutLayer::new(Duration::ZERO).layer(after(Duration::from_millis(1)));
    let start = Instant::now();
    let response = service.oneshot(Request::new(())).await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);

    let ready = ResponseTimeoutLayer::new(Duration::ZERO).layer(service_fn(|_: Request<()>| {
        std::future::ready(Ok::<_, Infallible>(Response::new(String::new())))
    }));
    let response = ready.oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn max_never_fires_and_registers_no_timer() {
    let day = Duration::from_secs(86_400);
    let service = ResponseTimeoutLayer::new(Duration::MAX).layer(after(day));
    let start = Instant::now();
    let response = service.oneshot(Request::new(())).await.unwrap();
    assert_eq!(start.elapsed(), day);
    assert_eq!(response.status(), StatusCode::OK);

    let mut service = ResponseTimeoutLayer::new(Duration::MAX).layer(after(day));
    let mut future = pin!(service.call(Request::new(())));
    let mut cx = Context::from_waker(std::task::Waker::noop());
    assert!(future.as_mut().poll(&mut cx).is_pending());
    assert!(!future.has_timer());
}

#[tokio::test(start_paused = true)]
async fn deadline_in_extensions_overrides_the_limit() {
    let outcomes = Outcomes::default();
    let service = ResponseTimeoutLayer::new(LIMIT)
        .on_outcome(outcomes.hook())
        .layer(after(Duration::from_millis(500)));

    let mut longer = Request::new(());
    longer
        .extensions_mut()
        .insert(Deadline::after(Duration::from_secs(1)));
    let response = service.clone().oneshot(longer).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let mut shorter = Request::new(());
    shorter
        .extensions_mut()
        .insert(Deadline::after(Duration::from_millis(10)));
    let start = Instant::now();
    let response = service.clone().oneshot(shorter).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(start.elapsed(), Duration::from_millis(10));

    let mut absolute = Request::new(());
    absolute
        .extensions_mut()
        .insert(Deadline::at(Instant::now() + Duration::from_millis(30)));
    let start = Instant::now();
    let response = service.clone().oneshot(absolute).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(start.elapsed(), Duration::from_millis(30));

    let mut past = Request::new(());
    past.extensions_mut().insert(Deadline::at(Instant::now()));
    let response = service.oneshot(past).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);

    let recorded = outcomes.all();
    assert_eq!(recorded.len(), 4);
    assert_eq!(
        recorded[1],
        Outcome::response_timeout(Duration::from_millis(10), StatusCode::GATEWAY_TIMEOUT)
    );
    assert_eq!(
        recorded[2],
        Outcome::response_timeout(Duration::from_millis(30), StatusCode::GATEWAY_TIMEOUT)
    );
}

#[tokio::test(start_paused = true)]
async fn configured_status_and_response() {
    let service = ResponseTimeoutLayer::new(LIMIT)
        .status(StatusCode::SERVICE_UNAVAILABLE)
        .proxy_name("edge 1")
        .layer(after(Duration::from_secs(1)));
    let response = service.oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response.headers()[PROXY_STATUS],
        "\"edge 1\"; error=http_response_timeout"
    );

    let service = ResponseTimeoutLayer::new(LIMIT)
        .without_proxy_status()
        .response_with(|outcome| {
            let mut response = Response::new(Bytes::from_static(b"{}"));
            *response.status_mut() = outcome.sent_status().unwrap();
            response
        })
        .layer(after(Duration::from_secs(1)));
    let response = service.oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(!response.headers().contains_key(PROXY_STATUS));
    assert!(response.extensions().get::<Generated>().is_some());
    assert_eq!(body(response).await, "{}");
}

#[tokio::test(start_paused = true)]
async fn inner_error_passes_through_and_is_recorded() {
    let outcomes = Outcomes::default();
    let service = ResponseTimeoutLayer::new(LIMIT)
        .on_outcome(outcomes.hook())
        .layer(service_fn(|_: Request<()>| async {
            Err::<Response<String>, _>("boom")
        }));
    assert_eq!(service.oneshot(Request::new(())).await.unwrap_err(), "boom");
    assert_eq!(outcomes.one(), Outcome::failed(Phase::BeforeHead, None));
}

#[tokio::test(start_paused = true)]
async fn panic_is_recorded_as_a_panic_and_goes_on() {
    let outcomes = Outcomes::default();
    let service = ResponseTimeoutLayer::new(LIMIT)
        .on_outcome(outcomes.hook())
        .layer(service_fn(|_: Request<()>| async {
            tokio::task::yield_now().await;
            panic!("handler bug");
            #[allow(unreachable_code)]
            Ok::<Response<String>, Infallible>(Response::new(String::new()))
        }));
    let joined = tokio::spawn(service.oneshot(Request::new(()))).await;
    assert!(joined.unwrap_err().is_panic());
    assert_eq!(outcomes.one(), Outcome::panicked(Phase::BeforeHead, None));
}

#[tokio::test(start_paused = true)]
async fn dropped_future_is_recorded_once_as_dropped() {
    let outcomes = Outcomes::default();
    let service = ResponseTimeoutLayer::new(LIMIT)
        .on_outcome(outcomes.hook())
        .layer(after(Duration::from_secs(1)));
    let result =
        tokio::time::timeout(Duration::from_millis(10), service.oneshot(Request::new(()))).await;
    assert!(result.is_err());
    assert_eq!(outcomes.one(), Outcome::dropped());
}

#[tokio::test(start_paused = true)]
async fn a_panicking_hook_does_not_take_the_request_down() {
    let service = ResponseTimeoutLayer::new(LIMIT)
        .on_outcome(|_: &crate::Report<'_>| panic!("hook bug"))
        .layer(after(Duration::from_secs(1)));
    let response = service.oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn nested_timeouts_record_one_outcome_in_the_outer_layer() {
    let outer = Outcomes::default();
    let inner = Outcomes::default();
    let service = ServiceBuilder::new()
        .layer(ResponseTimeoutLayer::new(Duration::from_secs(1)).on_outcome(outer.hook()))
        .layer(ResponseTimeoutLayer::new(LIMIT).on_outcome(inner.hook()))
        .service(after(Duration::from_secs(10)));
    let response = service.oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        outer.one(),
        Outcome::response_timeout(LIMIT, StatusCode::GATEWAY_TIMEOUT)
    );
    assert!(inner.all().is_empty());
}

/// An inner future that is always ready to do more work: it spends the task's whole coop
/// budget on every poll and wakes itself (tokio#4314).
struct Busy;

impl Future for Busy {
    type Output = Result<Response<String>, Infallible>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut budget = pin!(tokio::task::consume_budget());
            if budget.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

#[test]
fn busy_inner_future_cannot_starve_the_timer() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let status = runtime.block_on(async {
            let service = ResponseTimeoutLayer::new(Duration::from_millis(20))
                .layer(service_fn(|_: Request<()>| Busy));
            service.oneshot(Request::new(())).await.unwrap().status()
        });
        let _ = done.send(status);
    });
    let status = finished
        .recv_timeout(Duration::from_secs(30))
        .expect("the timer never fired: the busy inner future starved it");
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test]
async fn error_type_stays_infallible_for_axum() {
    let app: axum::Router = axum::Router::new()
        .route("/", axum::routing::get(|| async { "hi" }))
        .layer(ResponseTimeoutLayer::new(LIMIT));
    let response = app
        .oneshot(Request::new(axum::body::Body::empty()))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let _: Result<_, Infallible> = Ok::<_, Infallible>(());
    let _ = pending::<()>;
}

// ---------------------------------------------------------------------------------------------
// gRPC requests and callers' deadlines.

fn grpc_request(timeout: Option<&'static str>) -> Request<()> {
    let mut request = Request::new(());
    request.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc+proto"),
    );
    if let Some(timeout) = timeout {
        request.headers_mut().insert(
            crate::grpc::GRPC_TIMEOUT,
            http::HeaderValue::from_static(timeout),
        );
    }
    request
}

/// The limit a request got: when the layer answered, from the start.
async fn timed_out_after<S>(
    service: S,
    request: Request<()>,
) -> (Duration, Response<ResponseBody<String>>)
where
    S: Service<Request<()>, Response = Response<ResponseBody<String>>, Error = Infallible>,
{
    let start = Instant::now();
    let response = service.oneshot(request).await.unwrap();
    (start.elapsed(), response)
}

#[tokio::test(start_paused = true)]
async fn a_grpc_timeout_is_a_trailers_only_deadline_exceeded() {
    let outcomes = Outcomes::default();
    let service = ResponseTimeoutLayer::new(LIMIT)
        .on_outcome(outcomes.hook())
        .layer(after(Duration::from_secs(10)));
    let (took, response) = timed_out_after(service, grpc_request(None)).await;
    assert_eq!(took, LIMIT);
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers();
    assert_eq!(
        headers[http::header::CONTENT_TYPE],
        "application/grpc+proto"
    );
    assert_eq!(headers["grpc-status"], "4");
    assert_eq!(
        headers["grpc-message"],
        "tower-timeouts: no response within 100 ms"
    );
    assert_eq!(
        headers[PROXY_STATUS],
        "tower-timeouts; error=http_response_timeout"
    );
    assert!(http_body::Body::is_end_stream(response.body()));
    assert_eq!(
        outcomes.one(),
        Outcome::response_timeout(LIMIT, StatusCode::OK)
    );
    assert!(body(response).await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_callers_deadline_shortens_the_limit_never_lengthens_it() {
    let layer = ResponseTimeoutLayer::new(Duration::from_secs(1)).deadline_margin(Duration::ZERO);
    let slow = after(Duration::from_secs(60));
    for (sent, expected) in [
        ("200m", Duration::from_millis(200)),
        ("5S", Duration::from_secs(1)),
        ("1H", Duration::from_secs(1)),
        ("99999999H", Duration::from_secs(1)),
        ("0n", Duration::ZERO),
    ] {
        let (took, response) =
            timed_out_after(layer.layer(slow.clone()), grpc_request(Some(sent))).await;
        assert_eq!(took, expected, "{sent}");
        assert_eq!(response.headers()["grpc-status"], "4", "{sent}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_margin_comes_off_the_callers_deadline() {
    let layer = ResponseTimeoutLayer::new(Duration::from_secs(1));
    let slow = after(Duration::from_secs(60));
    // The default margin, 10 ms.
    let (took, _) = timed_out_after(layer.layer(slow.clone()), grpc_request(Some("200m"))).await;
    assert_eq!(took, Duration::from_millis(190));
    // A deadline shorter than the margin times out at once.
    let layer = layer.deadline_margin(Duration::from_millis(300));
    let (took, _) = timed_out_after(layer.layer(slow), grpc_request(Some("200m"))).await;
    assert_eq!(took, Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_malformed_or_ignored_grpc_timeout_leaves_the_layers_limit() {
    let slow = after(Duration::from_secs(60));
    let (took, _) = timed_out_after(
        ResponseTimeoutLayer::new(LIMIT).layer(slow.clone()),
        grpc_request(Some("+1S")),
    )
    .await;
    assert_eq!(took, LIMIT);
    let (took, _) = timed_out_after(
        ResponseTimeoutLayer::new(LIMIT)
            .ignore_grpc_timeout()
            .layer(slow.clone()),
        grpc_request(Some("1m")),
    )
    .await;
    assert_eq!(took, LIMIT);
    // Not a gRPC request: grpc-timeout means nothing.
    let mut plain = grpc_request(Some("1m"));
    plain.headers_mut().remove(http::header::CONTENT_TYPE);
    let (took, response) =
        timed_out_after(ResponseTimeoutLayer::new(LIMIT).layer(slow), plain).await;
    assert_eq!(took, LIMIT);
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn a_plain_http_deadline_header_is_honoured_only_when_named() {
    let header = http::HeaderName::from_static("x-deadline-ms");
    let slow = after(Duration::from_secs(60));
    let request = || {
        let mut request = Request::new(());
        request
            .headers_mut()
            .insert(header.clone(), http::HeaderValue::from_static("250"));
        request
    };
    let (took, _) = timed_out_after(
        ResponseTimeoutLayer::new(LIMIT * 10).layer(slow.clone()),
        request(),
    )
    .await;
    assert_eq!(took, LIMIT * 10);
    let named = ResponseTimeoutLayer::new(LIMIT * 10)
        .deadline_header(header.clone())
        .deadline_margin(Duration::ZERO);
    let (took, response) = timed_out_after(named.layer(slow), request()).await;
    assert_eq!(took, Duration::from_millis(250));
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn the_handler_sees_the_deadline_in_force_in_its_extensions_and_scope() {
    let seen = service_fn(|request: Request<()>| async move {
        let extension = request.extensions().get::<Deadline>().copied();
        Ok::<_, Infallible>(Response::new(format!(
            "{:?} {:?}",
            extension.map(|d| d.remaining()),
            Deadline::current().map(|d| d.remaining())
        )))
    });
    let layer = ResponseTimeoutLayer::new(Duration::from_secs(1)).deadline_margin(Duration::ZERO);
    let response = layer
        .layer(seen)
        .oneshot(grpc_request(Some("300m")))
        .await
        .unwrap();
    assert_eq!(body(response).await, "Some(300ms) Some(300ms)");
    // Without a caller's deadline, only the scope has it.
    let response = layer.layer(seen).oneshot(Request::new(())).await.unwrap();
    assert_eq!(body(response).await, "None Some(1s)");
}

#[tokio::test(start_paused = true)]
async fn grpc_answers_can_be_recoded_or_turned_off() {
    let slow = after(Duration::from_secs(60));
    let recoded = ResponseTimeoutLayer::new(LIMIT)
        .grpc_code_with(|_: &Outcome| crate::GrpcCode::UNAVAILABLE)
        .layer(slow.clone());
    let (_, response) = timed_out_after(recoded, grpc_request(None)).await;
    assert_eq!(response.headers()["grpc-status"], "14");
    let plain = ResponseTimeoutLayer::new(LIMIT).without_grpc().layer(slow);
    let (_, response) = timed_out_after(plain, grpc_request(None)).await;
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(!response.headers().contains_key("grpc-status"));
}

/// The deadline in force while the handler runs is the one the layer's timer is armed for,
/// not a limit counted again from each poll.
#[tokio::test(start_paused = true)]
async fn the_deadline_in_force_is_the_armed_one_on_later_polls() {
    let later = service_fn(|_: Request<()>| async {
        let first = Deadline::current().map(|d| d.remaining());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = Deadline::current().map(|d| d.remaining());
        Ok::<_, Infallible>(Response::new(format!("{first:?} {second:?}")))
    });
    let response = ResponseTimeoutLayer::new(Duration::from_secs(1))
        .layer(later)
        .oneshot(Request::new(()))
        .await
        .unwrap();
    assert_eq!(body(response).await, "Some(1s) Some(900ms)");
}
