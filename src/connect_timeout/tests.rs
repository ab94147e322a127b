use std::convert::Infallible;
use std::future::{pending, ready, Future};
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use tokio::time::Instant;
use tower::{service_fn, ServiceExt};

use super::*;
use std::pin::Pin;

const LIMIT: Duration = Duration::from_millis(100);

fn uri() -> Uri {
    Uri::from_static("http://upstream.internal:8080/")
}

fn never() -> impl Service<
    Uri,
    Response = (),
    Error = std::io::Error,
    Future = impl Future<Output = Result<(), std::io::Error>> + Unpin,
> + Clone {
    service_fn(|_: Uri| Box::pin(pending::<Result<(), std::io::Error>>()))
}

fn assert_unpin_send<T: Unpin + Send>(_: &T) {}

#[tokio::test(start_paused = true)]
async fn a_hanging_connect_fails_at_the_limit_with_a_typed_error() {
    let connector = ConnectTimeoutLayer::new(LIMIT).layer(never());
    let start = Instant::now();
    let error = connector.oneshot(uri()).await.unwrap_err();
    assert_eq!(start.elapsed(), LIMIT);
    let error = error.downcast_ref::<ConnectTimeoutError>().unwrap();
    assert_eq!(error.timeout(), LIMIT);
    assert_eq!(error.address(), None);
    assert_eq!(error.to_string(), "connection not established within 100ms");
}

#[tokio::test(start_paused = true)]
async fn the_address_is_in_the_error_only_when_asked() {
    let connector = ConnectTimeoutLayer::new(LIMIT)
        .with_address_in_errors()
        .layer(never());
    let error = connector.oneshot(uri()).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "connection not established within 100ms to upstream.internal:8080"
    );
}

#[tokio::test(start_paused = true)]
async fn connected_and_failed_connects_pass_through() {
    let connector = ConnectTimeout::new(service_fn(|_: Uri| ready(Ok::<_, Infallible>(7))), LIMIT);
    assert_eq!(connector.oneshot(uri()).await.unwrap(), 7);

    let refused = ConnectTimeout::new(
        service_fn(|_: Uri| {
            ready(Err::<(), _>(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            )))
        }),
        LIMIT,
    );
    let error = refused.oneshot(uri()).await.unwrap_err();
    assert_eq!(
        error.downcast_ref::<std::io::Error>().unwrap().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
}

#[tokio::test(start_paused = true)]
async fn the_future_is_unpin_and_send_and_lazy() {
    let mut connector = ConnectTimeoutLayer::new(LIMIT).layer(never());
    let mut future = connector.call(uri());
    assert_unpin_send(&future);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    assert!(Pin::new(&mut future).poll(&mut cx).is_pending());
    assert!(format!("{future:?}").contains("timer: true"));

    let mut ready_connector =
        ConnectTimeout::new(service_fn(|_: Uri| ready(Ok::<_, Infallible>(()))), LIMIT);
    let mut future = pin!(ready_connector.call(uri()));
    assert!(matches!(future.as_mut().poll(&mut cx), Poll::Ready(Ok(()))));
    assert!(format!("{future:?}").contains("timer: false"));
}

#[tokio::test(start_paused = true)]
async fn zero_and_max() {
    let zero = ConnectTimeoutLayer::new(Duration::ZERO).layer(never());
    let start = Instant::now();
    assert!(zero
        .oneshot(uri())
        .await
        .unwrap_err()
        .is::<ConnectTimeoutError>());
    assert_eq!(start.elapsed(), Duration::ZERO);

    let slow = service_fn(|_: Uri| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, Infallible>(())
        })
    });
    let max = ConnectTimeoutLayer::new(Duration::MAX).layer(slow);
    assert!(max.oneshot(uri()).await.is_ok());
}

/// Called for an upstream call that a `PropagateDeadline` makes, the connect gets no more than
/// what is left of the call's deadline; a deadline in force for the served request alone does
/// not shorten it.
#[tokio::test(start_paused = true)]
async fn a_connect_for_a_call_with_a_deadline_is_shortened_to_it() {
    let mut connector = ConnectTimeoutLayer::new(Duration::from_secs(10)).layer(never());
    connector.ready().await.unwrap();
    let start = Instant::now();
    let error = {
        let _call = crate::deadline::enter_call(Some(start + LIMIT));
        connector.call(uri())
    }
    .await
    .unwrap_err();
    assert_eq!(start.elapsed(), LIMIT);
    assert_eq!(
        error
            .downcast_ref::<ConnectTimeoutError>()
            .unwrap()
            .timeout(),
        LIMIT
    );

    let start = Instant::now();
    let served = {
        let _served = crate::deadline::enter(crate::deadline::When::At(Some(start + LIMIT)));
        connector.call(uri())
    };
    let error = served.await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    drop(error);
}
