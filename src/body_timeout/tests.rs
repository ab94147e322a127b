use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tower::{service_fn, ServiceBuilder, ServiceExt};

use tower_layer::Layer;

use super::*;
use crate::outcome::Outcome;
use crate::response::{Generated, PROXY_STATUS};
use crate::signal::Cancelled;
use crate::test_support::Outcomes;
use crate::{ClientDisconnectLayer, ClientGone, ResponseTimeoutLayer};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Frames = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

const IDLE: Duration = Duration::from_millis(100);

/// A body fed by hand: the sender sends its frames.
fn fed() -> (mpsc::Sender<Result<Frame<Bytes>, Infallible>>, Frames) {
    let (tx, rx) = mpsc::channel(8);
    (tx, StreamBody::new(ReceiverStream::new(rx)))
}

fn frame(text: &'static str) -> Result<Frame<Bytes>, Infallible> {
    Ok(Frame::data(Bytes::from_static(text.as_bytes())))
}

/// A handler that reads the whole body and answers 400 if reading fails, as axum's extractors
/// do.
async fn reads_body<B>(request: Request<B>) -> Result<Response<String>, Infallible>
where
    B: http_body::Body,
{
    Ok(match request.into_body().collect().await {
        Ok(body) => Response::new(format!("{} bytes", body.to_bytes().len())),
        Err(_) => {
            let mut response = Response::new("Failed to buffer the request body".to_owned());
            *response.status_mut() = StatusCode::BAD_REQUEST;
            response
        }
    })
}

fn request_with(body: Frames, version: Version) -> Request<Frames> {
    let mut request = Request::new(body);
    *request.version_mut() = version;
    request
}

#[tokio::test(start_paused = true)]
async fn a_stalled_upload_gets_408_whatever_the_handler_made_of_it() {
    for version in [Version::HTTP_11, Version::HTTP_2] {
        let outcomes = Outcomes::default();
        let service = ServiceBuilder::new()
            .layer(ClientDisconnectLayer::new().on_outcome(outcomes.hook()))
            .layer(RequestBodyTimeoutLayer::new().idle(IDLE))
            .service_fn(reads_body);
        let (tx, body) = fed();
        tx.send(frame("half")).await.unwrap();
        let start = Instant::now();
        let response = service.oneshot(request_with(body, version)).await.unwrap();
        assert_eq!(start.elapsed(), IDLE);
        assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(
            response.headers()[PROXY_STATUS],
            "tower-timeouts; error=http_request_error; status-code=408"
        );
        // HTTP/2 has no `Connection`, and needs none: the stream ends alone.
        let close = response.headers().get(http::header::CONNECTION);
        assert_eq!(close.is_some(), version == Version::HTTP_11, "{version:?}");
        let expected = Outcome::request_body_timeout(IDLE, StatusCode::REQUEST_TIMEOUT);
        assert_eq!(
            response.extensions().get::<Generated>().unwrap().outcome(),
            &expected
        );
        drop(response);
        assert_eq!(outcomes.one(), expected);
        drop(tx);
    }
}

#[tokio::test(start_paused = true)]
async fn the_total_limit_counts_from_the_head_and_fires_only_while_the_body_is_waited_for() {
    let total = Duration::from_secs(1);
    let outcomes = Outcomes::default();
    let service = ServiceBuilder::new()
        .layer(ClientDisconnectLayer::new().on_outcome(outcomes.hook()))
        .layer(RequestBodyTimeoutLayer::new().total(total))
        .service_fn(|request: Request<_>| async move {
            // Busy for most of the limit before it reads: not the client's fault, and the
            // frames that came meanwhile are read.
            tokio::time::sleep(Duration::from_millis(900)).await;
            reads_body(request).await
        });
    let (tx, body) = fed();
    tx.send(frame("some")).await.unwrap();
    let start = Instant::now();
    let response = service
        .oneshot(request_with(body, Version::HTTP_11))
        .await
        .unwrap();
    assert_eq!(start.elapsed(), total);
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    drop(response);
    assert_eq!(
        outcomes.one(),
        Outcome::request_body_timeout(total, StatusCode::REQUEST_TIMEOUT)
    );
    drop(tx);
}

#[tokio::test(start_paused = true)]
async fn a_body_read_on_another_task_still_gets_the_408() {
    let service = RequestBodyTimeoutLayer::new().idle(IDLE).layer(service_fn(
        |request: Request<_>| async move { tokio::spawn(reads_body(request)).await.unwrap() },
    ));
    let (tx, body) = fed();
    let response = service
        .oneshot(request_with(body, Version::HTTP_11))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    drop(tx);
}

#[tokio::test(start_paused = true)]
async fn a_body_that_arrived_whole_leaves_a_slow_handler_to_the_response_timeout() {
    let outcomes = Outcomes::default();
    let limit = Duration::from_millis(300);
    let service = ServiceBuilder::new()
        .layer(ResponseTimeoutLayer::new(limit).on_outcome(outcomes.hook()))
        .layer(RequestBodyTimeoutLayer::new().idle(IDLE).total(IDLE))
        .service_fn(|request: Request<_>| async move {
            let read = reads_body(request).await;
            tokio::time::sleep(Duration::from_secs(10)).await;
            read
        });
    let (tx, body) = fed();
    tx.send(frame("all of it")).await.unwrap();
    drop(tx);
    let response = service
        .oneshot(request_with(body, Version::HTTP_11))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    drop(response);
    assert_eq!(
        outcomes.one(),
        Outcome::response_timeout(limit, StatusCode::GATEWAY_TIMEOUT)
    );
}

#[tokio::test(start_paused = true)]
async fn a_grpc_upload_that_stalls_gets_deadline_exceeded() {
    let service = RequestBodyTimeoutLayer::new()
        .idle(IDLE)
        .layer(service_fn(reads_body));
    let (tx, body) = fed();
    let mut request = request_with(body, Version::HTTP_2);
    request.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    let response = service.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[crate::grpc::GRPC_STATUS], "4");
    assert_eq!(
        response.headers()[PROXY_STATUS],
        "tower-timeouts; error=http_request_error"
    );
    drop(tx);
}

/// A handler that answers once, with a body the sender feeds.
fn streaming(
    body: Frames,
) -> impl FnMut(Request<()>) -> std::future::Ready<Result<Response<Frames>, Infallible>> {
    let mut body = Some(body);
    move |_| std::future::ready(Ok(Response::new(body.take().expect("called once"))))
}

#[tokio::test(start_paused = true)]
async fn a_stalled_stream_is_cut_at_the_idle_limit_and_recorded_with_what_was_sent() {
    let outcomes = Outcomes::default();
    let (tx, body) = fed();
    let mut handler = streaming(body);
    let gone = std::sync::Arc::new(std::sync::Mutex::new(None));
    let service = ServiceBuilder::new()
        .layer(ClientDisconnectLayer::new().on_outcome(outcomes.hook()))
        .layer(ResponseBodyTimeoutLayer::new().idle(IDLE))
        .service_fn({
            let gone = gone.clone();
            move |request| {
                *gone.lock().unwrap() = ClientGone::current();
                handler(request)
            }
        });
    let response = service.oneshot(Request::new(())).await.unwrap();
    tx.send(frame("event: 1\n\n")).await.unwrap();
    let mut body = Box::pin(response.into_body());
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "event: 1\n\n");
    let start = Instant::now();
    let error = body.frame().await.unwrap().unwrap_err();
    assert_eq!(start.elapsed(), IDLE);
    let error = error.downcast::<BodyTimeoutError>().unwrap();
    assert!(error.is_idle());
    assert_eq!(error.limit(), IDLE);
    // hyper resets an HTTP/2 stream with the reason it finds in the error's source.
    let reason = std::error::Error::source(&*error)
        .and_then(|source| source.downcast_ref::<h2::Error>())
        .and_then(h2::Error::reason);
    assert_eq!(reason, Some(h2::Reason::CANCEL));
    drop(body);
    assert_eq!(
        outcomes.one(),
        Outcome::response_body_timeout(IDLE, StatusCode::OK, 10)
    );
    // The client did not leave; the work was given up on.
    let gone = gone.lock().unwrap().take().unwrap();
    assert_eq!(gone.reason(), Some(Cancelled::Abandoned));
    assert!(!gone.is_gone());
    drop(tx);
}

#[tokio::test(start_paused = true)]
async fn without_a_disconnect_layer_the_body_is_still_followed_and_recorded() {
    let outcomes = Outcomes::default();
    let (tx, body) = fed();
    let service = ResponseBodyTimeoutLayer::new()
        .total(Duration::from_secs(1))
        .on_outcome(outcomes.hook())
        .layer(service_fn(streaming(body)));
    let response = service.oneshot(Request::new(())).await.unwrap();
    let feeding = tokio::spawn(async move {
        // A frame every 300 ms, forever: only the total limit can end it.
        while tx.send(frame("tick")).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let start = Instant::now();
    let error = response
        .into_body()
        .collect()
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(start.elapsed() >= Duration::from_secs(1));
    assert!(!error.downcast::<BodyTimeoutError>().unwrap().is_idle());
    let Outcome::ResponseBodyTimeout {
        timeout,
        sent_status,
        bytes_sent,
    } = outcomes.one()
    else {
        panic!("{:?}", outcomes.all());
    };
    assert_eq!(
        (timeout, sent_status, bytes_sent % 4),
        (Duration::from_secs(1), StatusCode::OK, 0)
    );
    assert!(bytes_sent >= 12, "{bytes_sent}");
    feeding.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_grpc_stream_that_stalls_ends_with_deadline_exceeded_trailers() {
    let outcomes = Outcomes::default();
    let (tx, body) = fed();
    let service = ResponseBodyTimeoutLayer::new()
        .idle(IDLE)
        .on_outcome(outcomes.hook())
        .layer(service_fn(streaming(body)));
    let mut request = Request::new(());
    request.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    let response = service.oneshot(request).await.unwrap();
    let mut body = Box::pin(response.into_body());
    let trailers = body
        .frame()
        .await
        .unwrap()
        .unwrap()
        .into_trailers()
        .unwrap();
    assert_eq!(trailers[crate::grpc::GRPC_STATUS], "4");
    assert!(body.frame().await.is_none());
    assert!(http_body::Body::is_end_stream(&*body));
    assert!(matches!(
        outcomes.one(),
        Outcome::ResponseBodyTimeout { bytes_sent: 0, .. }
    ));
    drop(tx);
}

#[tokio::test(start_paused = true)]
async fn bodies_in_time_pass_untouched_and_complete() {
    let outcomes = Outcomes::default();
    let service = ServiceBuilder::new()
        .layer(ClientDisconnectLayer::new().on_outcome(outcomes.hook()))
        .layer(RequestBodyTimeoutLayer::new().idle(IDLE).total(IDLE))
        .layer(ResponseBodyTimeoutLayer::new().idle(IDLE).total(IDLE))
        .service_fn(
            |request: Request<TimedRequestBody<Full<Bytes>>>| async move {
                let body = request.into_body().collect().await?.to_bytes();
                Ok::<_, BoxError>(Response::new(Full::new(body)))
            },
        );
    let response = service
        .oneshot(Request::new(Full::new(Bytes::from_static(b"hello"))))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "hello"
    );
    assert_eq!(outcomes.one(), Outcome::completed(StatusCode::OK));
}
