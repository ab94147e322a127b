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
