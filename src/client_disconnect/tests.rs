use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_layer::Layer;

use super::*;
use crate::outcome::{Outcome, Phase};
use crate::response_timeout::ResponseTimeoutLayer;
use crate::test_support::Outcomes;

type Frames = StreamBody<tokio_stream_like::Receiver>;

/// A body fed by a channel, so the test decides when frames come.
mod tokio_stream_like {
    use bytes::Bytes;
    use futures_util::Stream;
    use http_body::Frame;
    use std::convert::Infallible;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub(super) struct Receiver(pub(super) tokio::sync::mpsc::Receiver<Bytes>);

    impl Stream for Receiver {
        type Item = Result<Frame<Bytes>, Infallible>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.0
                .poll_recv(cx)
                .map(|data| data.map(|data| Ok(Frame::data(data))))
        }
    }
}

fn streaming() -> (tokio::sync::mpsc::Sender<Bytes>, Frames) {
    let (send, receive) = tokio::sync::mpsc::channel(4);
    (send, StreamBody::new(tokio_stream_like::Receiver(receive)))
}

fn noop_cx() -> Context<'static> {
    Context::from_waker(std::task::Waker::noop())
}

#[tokio::test(start_paused = true)]
async fn future_dropped_before_the_head_is_a_499_and_fires_the_signal() {
    let outcomes = Outcomes::default();
    let (seen, mut signal) = tokio::sync::oneshot::channel();
    let mut seen = Some(seen);
    let mut service = ClientDisconnectLayer::new()
        .on_outcome(outcomes.hook())
        .layer(service_fn(move |_: Request<()>| {
            // Made on first use, by the inner service's `call`.
            let gone = ClientGone::current().unwrap();
            let _ = seen.take().unwrap().send(gone);
            std::future::pending::<Result<Response<Empty<Bytes>>, Infallible>>()
        }));
    let mut future = Box::pin(service.call(Request::new(())));
    assert!(future.as_mut().poll(&mut noop_cx()).is_pending());
    let gone = signal.try_recv().unwrap();
    assert!(!gone.is_gone());
    drop(future);
    assert!(gone.is_gone());
    gone.gone().await;
    let outcome = outcomes.one();
    assert_eq!(
        outcome,
        Outcome::client_disconnected(Phase::BeforeHead, None, 0)
    );
    assert_eq!(outcome.recorded_status().map(|s| s.as_u16()), Some(499));
}

#[tokio::test(start_paused = true)]
async fn body_dropped_before_its_end_is_a_disconnect_during_the_body() {
    let outcomes = Outcomes::default();
    let (send, body) = streaming();
    let mut body = Some(body);
    let service = ClientDisconnectLayer::new()
        .on_outcome(outcomes.hook())
        .layer(service_fn(move |_: Request<()>| {
            let body = body.take().unwrap();
            async move { Ok::<_, Infallible>(Response::new(body)) }
        }));
    let response = service.oneshot(Request::new(())).await.unwrap();
    let mut body = response.into_body();
    send.send(Bytes::from_static(b"hello")).await.unwrap();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "hello");
    assert!(outcomes.all().is_empty());
    drop(body);
    assert_eq!(
        outcomes.one(),
        Outcome::client_disconnected(Phase::DuringBody, Some(StatusCode::OK), 5)
    );
}

#[tokio::test(start_paused = true)]
async fn bodies_hyper_finishes_without_polling_to_the_end_are_complete() {
    async fn outcome_of<B>(method: Method, response: Response<B>, poll_frames: usize) -> Outcome
    where
        B: Body + Send + 'static,
        B::Data: Send,
    {
        let outcomes = Outcomes::default();
        let mut response = Some(response);
        let service = ClientDisconnectLayer::new()
            .on_outcome(outcomes.hook())
            .layer(service_fn(move |_: Request<()>| {
                let response = response.take().unwrap();
                async move { Ok::<_, Infallible>(response) }
            }));
        let mut request = Request::new(());
        *request.method_mut() = method;
        let mut body = Box::pin(service.oneshot(request).await.unwrap().into_body());
        for _ in 0..poll_frames {
            let _ = body.as_mut().poll_frame(&mut noop_cx());
        }
        drop(body);
        outcomes.one()
    }

    let full = Response::new(Full::new(Bytes::from_static(b"abc")));
    assert_eq!(
        outcome_of(Method::GET, full, 1).await,
        Outcome::completed(StatusCode::OK)
    );

    let empty = Response::new(Empty::<Bytes>::new());
    assert_eq!(
        outcome_of(Method::GET, empty, 0).await,
        Outcome::completed(StatusCode::OK)
    );

    let head = Response::new(Full::new(Bytes::from_static(b"abc")));
    assert_eq!(
        outcome_of(Method::HEAD, head, 0).await,
        Outcome::completed(StatusCode::OK)
    );

    for status in [StatusCode::NO_CONTENT, StatusCode::NOT_MODIFIED] {
        let (_send, body) = streaming();
        let mut response = Response::new(body);
        *response.status_mut() = status;
        assert_eq!(
            outcome_of(Method::GET, response, 0).await,
            Outcome::completed(status)
        );
    }

    // A stream with a content-length: every byte sent, never polled to its end.
    let (send, body) = streaming();
    send.try_send(Bytes::from_static(b"12345")).unwrap();
    let response = Response::builder()
        .header(http::header::CONTENT_LENGTH, "5")
        .body(body)
        .unwrap();
    assert_eq!(
        outcome_of(Method::GET, response, 1).await,
        Outcome::completed(StatusCode::OK)
    );

    // The same stream, one byte short: the client left.
    let (send, body) = streaming();
    send.try_send(Bytes::from_static(b"1234")).unwrap();
    let response = Response::builder()
        .header(http::header::CONTENT_LENGTH, "5")
        .body(body)
        .unwrap();
    assert_eq!(
        outcome_of(Method::GET, response, 1).await,
        Outcome::client_disconnected(Phase::DuringBody, Some(StatusCode::OK), 4)
    );
}

#[tokio::test(start_paused = true)]
async fn a_generated_timeout_is_never_a_disconnect() {
    let outcomes = Outcomes::default();
    let (seen, signal) = tokio::sync::oneshot::channel();
    let mut seen = Some(seen);
    let service = ServiceBuilder::new()
        .layer(
            ClientDisconnectLayer::new()
                .signal_in_extensions()
                .on_outcome(outcomes.hook()),
        )
        .layer(ResponseTimeoutLayer::new(Duration::from_millis(100)))
        .service(service_fn(move |request: Request<()>| {
            let _ = seen
                .take()
                .unwrap()
                .send(request.extensions().get::<ClientGone>().cloned());
            std::future::pending::<Result<Response<Empty<Bytes>>, Infallible>>()
        }));
    let response = service.oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    // The server drops the body without reading it.
    drop(response);
    let gone = signal.await.unwrap().unwrap();
    assert!(!gone.is_gone());
    assert_eq!(
        outcomes.one(),
        Outcome::response_timeout(Duration::from_millis(100), StatusCode::GATEWAY_TIMEOUT)
    );
}

#[tokio::test(start_paused = true)]
async fn wrong_order_timeout_outside_is_still_not_a_disconnect() {
    let outcomes = Outcomes::default();
    let service = ServiceBuilder::new()
        .layer(ResponseTimeoutLayer::new(Duration::from_millis(100)).on_outcome(outcomes.hook()))
        .layer(ClientDisconnectLayer::new())
        .service(service_fn(|_: Request<()>| {
            std::future::pending::<Result<Response<Empty<Bytes>>, Infallible>>()
        }));
    let response = service.oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        outcomes.one(),
        Outcome::response_timeout(Duration::from_millis(100), StatusCode::GATEWAY_TIMEOUT)
    );
}

#[tokio::test(start_paused = true)]
async fn a_panic_is_not_a_disconnect() {
    let outcomes = Outcomes::default();
    let service = ClientDisconnectLayer::new()
        .on_outcome(outcomes.hook())
        .layer(service_fn(|_: Request<()>| async {
            tokio::task::yield_now().await;
            panic!("handler bug");
            #[allow(unreachable_code)]
            Ok::<Response<Empty<Bytes>>, Infallible>(Response::new(Empty::new()))
        }));
    let joined = tokio::spawn(service.oneshot(Request::new(()))).await;
    assert!(joined.unwrap_err().is_panic());
    assert_eq!(outcomes.one(), Outcome::panicked(Phase::BeforeHead, None));
}

#[tokio::test(start_paused = true)]
async fn errors_before_and_during_the_body_are_failures() {
    let outcomes = Outcomes::default();
    let service = ClientDisconnectLayer::new()
        .on_outcome(outcomes.hook())
        .layer(service_fn(|_: Request<()>| async {
            Err::<Response<Empty<Bytes>>, _>("boom")
        }));
    assert!(service.oneshot(Request::new(())).await.is_err());
    assert_eq!(outcomes.one(), Outcome::failed(Phase::BeforeHead, None));

    let outcomes = Outcomes::default();
    let service = ClientDisconnectLayer::new()
        .on_outcome(outcomes.hook())
        .layer(service_fn(|_: Request<()>| async {
            let stream = futures_util::stream::iter([
                Ok(http_body::Frame::data(Bytes::from_static(b"a"))),
                Err("broken"),
            ]);
            Ok::<_, Infallible>(Response::new(StreamBody::new(stream)))
        }));
    let body = service.oneshot(Request::new(())).await.unwrap().into_body();
    assert!(body.collect().await.is_err());
    assert_eq!(
        outcomes.one(),
        Outcome::failed(Phase::DuringBody, Some(StatusCode::OK))
    );
}

#[tokio::test(start_paused = true)]
async fn a_body_read_to_its_end_is_recorded_at_the_end() {
    let outcomes = Outcomes::default();
    let service = ClientDisconnectLayer::new()
        .on_outcome(outcomes.hook())
        .layer(service_fn(|_: Request<()>| async {
            let stream = futures_util::stream::iter([
                Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"a"))),
                Ok(http_body::Frame::data(Bytes::from_static(b"b"))),
            ]);
            Ok::<_, Infallible>(Response::new(StreamBody::new(stream)))
        }));
    let body = service.oneshot(Request::new(())).await.unwrap().into_body();
    let mut body = pin!(body);
    while let Some(frame) = body.frame().await {
        frame.unwrap();
    }
    // Recorded before the server drops the body.
    assert_eq!(outcomes.one(), Outcome::completed(StatusCode::OK));
    assert!(matches!(
        body.as_mut().poll_frame(&mut noop_cx()),
        Poll::Ready(None)
    ));
}

#[tokio::test(start_paused = true)]
async fn a_generated_response_from_a_fresh_request_keeps_its_outcome() {
    // A handler that builds a new request for an inner stack (as a gateway may) loses the
    // shared exchange; the marker still carries the outcome out.
    let outcomes = Outcomes::default();
    let upstream =
        ResponseTimeoutLayer::new(Duration::from_millis(100)).layer(service_fn(|_: Request<()>| {
            std::future::pending::<Result<Response<Empty<Bytes>>, Infallible>>()
        }));
    let service = ClientDisconnectLayer::new()
        .on_outcome(outcomes.hook())
        .layer(service_fn(move |_: Request<()>| {
            upstream.clone().oneshot(Request::new(()))
        }));
    let response = service.oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    drop(response);
    assert_eq!(
        outcomes.one(),
        Outcome::response_timeout(Duration::from_millis(100), StatusCode::GATEWAY_TIMEOUT)
    );
}

#[tokio::test(start_paused = true)]
async fn signal_in_extensions_puts_the_same_signal_there() {
    let outcomes = Outcomes::default();
    let (seen, mut signal) = tokio::sync::oneshot::channel();
    let mut seen = Some(seen);
    let mut service = ClientDisconnectLayer::new()
        .signal_in_extensions()
        .on_outcome(outcomes.hook())
        .layer(service_fn(move |request: Request<()>| {
            let from_extensions = request.extensions().get::<ClientGone>().cloned().unwrap();
            let current = ClientGone::current().unwrap();
            let _ = seen.take().unwrap().send((from_extensions, current));
            std::future::pending::<Result<Response<Empty<Bytes>>, Infallible>>()
        }));
    let mut future = Box::pin(service.call(Request::new(())));
    assert!(future.as_mut().poll(&mut noop_cx()).is_pending());
    let (from_extensions, current) = signal.try_recv().unwrap();
    drop(future);
    assert!(from_extensions.is_gone() && current.is_gone());
    assert_eq!(
        outcomes.one(),
        Outcome::client_disconnected(Phase::BeforeHead, None, 0)
    );
}

#[test]
fn the_signal_is_only_current_inside_the_layer() {
    assert!(ClientGone::current().is_none());
    let mut service = ClientDisconnectLayer::new().layer(service_fn(|_: Request<()>| async {
        let gone = ClientGone::current().expect("current while the handler is polled");
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
            "{}",
            gone.is_gone()
        )))))
    }));
    let mut future = pin!(service.call(Request::new(())));
    let Poll::Ready(Ok(response)) = future.as_mut().poll(&mut noop_cx()) else {
        panic!("the handler answers at once");
    };
    assert_eq!(response.status(), StatusCode::OK);
    assert!(ClientGone::current().is_none(), "restored after the poll");
}

/// A panic in the inner service's `call` must not leave the thread believing an owner is
/// calling in: the next request on this thread records its own outcome.
#[test]
fn a_panicking_call_leaves_no_trace_on_the_thread() {
    let mut panics = ServiceBuilder::new()
        .layer(ClientDisconnectLayer::new())
        .layer(ResponseTimeoutLayer::new(Duration::from_secs(1)))
        .service(service_fn(
            |_: Request<()>| -> std::future::Ready<Result<Response<Empty<Bytes>>, Infallible>> {
                panic!("call panics on purpose")
            },
        ));
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        panics.call(Request::new(()))
    }));
    assert!(unwound.is_err());
    assert!(ClientGone::current().is_none());

    let outcomes = Outcomes::default();
    let mut service = ResponseTimeoutLayer::new(Duration::from_secs(1))
        .on_outcome(outcomes.hook())
        .layer(service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
        }));
    let mut future = pin!(service.call(Request::new(())));
    assert!(future.as_mut().poll(&mut noop_cx()).is_ready());
    assert_eq!(outcomes.one(), Outcome::completed(StatusCode::OK));
}

#[cfg(feature = "axum")]
#[tokio::test]
async fn axum_extractors_find_the_signal() {
    use axum::routing::get;
    use axum::Router;

    async fn required(gone: ClientGone) -> String {
        format!("gone: {}", gone.is_gone())
    }
    async fn optional(gone: Option<ClientGone>) -> &'static str {
        if gone.is_some() {
            "watched"
        } else {
            "not watched"
        }
    }
    async fn extension(axum::Extension(gone): axum::Extension<ClientGone>) -> String {
        format!("gone: {}", gone.is_gone())
    }
    let routes = || {
        Router::new()
            .route("/required", get(required))
            .route("/optional", get(optional))
            .route("/extension", get(extension))
    };
    let body = |response: Response<axum::body::Body>| async move {
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status.as_u16(), String::from_utf8(bytes.to_vec()).unwrap())
    };
    let get = |path: &str| Request::get(path).body(axum::body::Body::empty()).unwrap();

    let lazy = routes().layer(ClientDisconnectLayer::new());
    let eager = routes().layer(ClientDisconnectLayer::new().signal_in_extensions());
    let none = routes();
    for (app, path, expected) in [
        (&lazy, "/required", (200, "gone: false")),
        (&lazy, "/optional", (200, "watched")),
        // Only with `signal_in_extensions` is it in the extensions.
        (&lazy, "/extension", (500, "")),
        (&eager, "/extension", (200, "gone: false")),
        (&eager, "/required", (200, "gone: false")),
        (&none, "/optional", (200, "not watched")),
        (&none, "/required", (500, "")),
    ] {
        let response = app.clone().oneshot(get(path)).await.unwrap();
        let (status, text) = body(response).await;
        assert_eq!(status, expected.0, "{path}: {text}");
        if expected.0 == 200 {
            assert_eq!(text, expected.1, "{path}");
        }
    }
}
