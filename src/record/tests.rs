//! The protocol in the compositions users write, with paused time: lazily called layers (as
//! axum's `Route`, `from_fn` and nested routers call them), the stack applied twice, a retry
//! between, a layer between that rewrites or gives up, another task between, upstream calls.
//! The same compositions over real sockets are in `tests/compositions.rs`.

use std::convert::Infallible;
use std::future::{pending, Future};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Context;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};
use tower_layer::Layer;

use crate::outcome::{Outcome, Phase};
use crate::test_support::Outcomes;
use crate::{ClientDisconnectLayer, ClientGone, ResponseTimeoutLayer, UpstreamFailureLayer};

type Body = Empty<Bytes>;

/// What the handler was given: the signals it asked for, and how many times it was called.
#[derive(Clone, Default)]
struct Probe {
    signals: Arc<Mutex<Vec<ClientGone>>>,
    calls: Arc<AtomicUsize>,
}

impl Probe {
    /// A handler that takes the request's signal, then answers 200 on call number `answers_on`
    /// (counting from 1), and never on the others; `None`: never.
    fn handler(
        &self,
        answers_on: Option<usize>,
    ) -> impl Service<
        Request<()>,
        Response = Response<Body>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
    > + Clone
           + Send {
        let probe = self.clone();
        service_fn(move |_: Request<()>| {
            let probe = probe.clone();
            async move {
                if let Some(gone) = ClientGone::current() {
                    probe.signals.lock().unwrap().push(gone);
                }
                let call = probe.calls.fetch_add(1, Ordering::SeqCst) + 1;
                if answers_on != Some(call) {
                    pending::<()>().await;
                }
                Ok::<_, Infallible>(Response::new(Body::new()))
            }
        })
    }

    fn fired(&self) -> Vec<bool> {
        let signals = self.signals.lock().unwrap();
        signals.iter().map(ClientGone::is_gone).collect()
    }
}

/// Calls `inner` from the poll of its future, not from `call`: what axum's `Route` (a
/// `oneshot`), `from_fn` and nested routers do.
fn lazy<S>(
    inner: S,
) -> impl Service<
    Request<()>,
    Response = S::Response,
    Error = S::Error,
    Future = impl Future<Output = Result<S::Response, S::Error>>,
> + Clone
where
    S: Service<Request<()>> + Clone,
{
    service_fn(move |request: Request<()>| inner.clone().oneshot(request))
}

fn timeout() -> ResponseTimeoutLayer {
    ResponseTimeoutLayer::new(Duration::from_millis(100))
}

fn timed_out(limit_ms: u64) -> Outcome {
    Outcome::response_timeout(Duration::from_millis(limit_ms), StatusCode::GATEWAY_TIMEOUT)
}

fn noop_cx() -> Context<'static> {
    Context::from_waker(std::task::Waker::noop())
}

/// Polls `future` once (the handler starts), then drops it, as a server does when its client
/// leaves.
fn leave<F: Future>(future: F) {
    let mut future = Box::pin(future);
    assert!(future.as_mut().poll(&mut noop_cx()).is_pending());
    drop(future);
}

#[tokio::test(start_paused = true)]
async fn an_outer_timeout_over_a_lazily_called_disconnect_layer_is_one_timeout() {
    let outcomes = Outcomes::default();
    let probe = Probe::default();
    let service = timeout().on_outcome(outcomes.hook()).layer(lazy(
        ClientDisconnectLayer::new()
            .on_outcome(outcomes.hook())
            .layer(lazy(probe.handler(None))),
    ));
    let response = service.oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(outcomes.one(), timed_out(100));
    assert_eq!(probe.fired(), [false], "a timeout is not a client leaving");
}

#[tokio::test(start_paused = true)]
async fn a_client_leaving_under_an_outer_timeout_is_a_499() {
    let outcomes = Outcomes::default();
    let probe = Probe::default();
    let mut service = timeout().on_outcome(outcomes.hook()).layer(lazy(
        ClientDisconnectLayer::new().layer(lazy(probe.handler(None))),
    ));
    leave(service.call(Request::new(())));
    assert_eq!(
        outcomes.one(),
        Outcome::client_disconnected(Phase::BeforeHead, None, 0)
    );
    assert_eq!(probe.fired(), [true]);
}

type StackBody = crate::client_disconnect::DisconnectBody<crate::ResponseBody<Body>>;

/// A user's stack: a `ClientDisconnectLayer` around a `ResponseTimeoutLayer` of `limit_ms`,
/// both with the hook, the signal in the extensions (so that a stack inside uses the same).
fn stack<S>(
    outcomes: &Outcomes,
    limit_ms: u64,
    inner: S,
) -> impl Service<
    Request<()>,
    Response = Response<StackBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<StackBody>, Infallible>>,
> + Clone
where
    S: Service<Request<()>, Response = Response<Body>, Error = Infallible> + Clone,
{
    ServiceBuilder::new()
        .layer(
            ClientDisconnectLayer::new()
                .signal_in_extensions()
                .on_outcome(outcomes.hook()),
        )
        .layer(
            ResponseTimeoutLayer::new(Duration::from_millis(limit_ms)).on_outcome(outcomes.hook()),
        )
        .service(inner)
}

#[tokio::test(start_paused = true)]
async fn the_stack_applied_twice_records_once_with_the_limit_that_fired() {
    for (outer_ms, inner_ms) in [(100, 300), (300, 100)] {
        let outcomes = Outcomes::default();
        let probe = Probe::default();
        let inner = lazy(stack(&outcomes, inner_ms, lazy(probe.handler(None))));
        let service = ServiceBuilder::new()
            .layer(
                ClientDisconnectLayer::new()
                    .signal_in_extensions()
                    .on_outcome(outcomes.hook()),
            )
            .layer(
                ResponseTimeoutLayer::new(Duration::from_millis(outer_ms))
                    .on_outcome(outcomes.hook()),
            )
            .service(inner);
        let response = service.oneshot(Request::new(())).await.unwrap();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(outcomes.one(), timed_out(outer_ms.min(inner_ms)));
        assert_eq!(probe.fired(), [false]);
    }
}

#[tokio::test(start_paused = true)]
async fn a_client_leaving_the_stack_applied_twice_is_one_499() {
    let outcomes = Outcomes::default();
    let probe = Probe::default();
    let inner = lazy(stack(&outcomes, 100, lazy(probe.handler(None))));
    let mut service = ServiceBuilder::new()
        .layer(ClientDisconnectLayer::new().on_outcome(outcomes.hook()))
        .layer(timeout().on_outcome(outcomes.hook()))
        .service(inner);
    leave(service.call(Request::new(())));
    assert_eq!(
        outcomes.one(),
        Outcome::client_disconnected(Phase::BeforeHead, None, 0)
    );
    assert_eq!(probe.fired(), [true]);
}

/// Retries a 504 once, with the request's extensions.
#[derive(Clone)]
struct RetryOnce {
    retried: bool,
}

impl<B, E> tower::retry::Policy<Request<()>, Response<B>, E> for RetryOnce {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        _: &mut Request<()>,
        result: &mut Result<Response<B>, E>,
    ) -> Option<Self::Future> {
        match result {
            Ok(response) if response.status() == StatusCode::GATEWAY_TIMEOUT && !self.retried => {
                self.retried = true;
                Some(std::future::ready(()))
            }
            _ => None,
        }
    }

    fn clone_request(&mut self, request: &Request<()>) -> Option<Request<()>> {
        let mut clone = Request::new(());
        *clone.method_mut() = request.method().clone();
        *clone.uri_mut() = request.uri().clone();
        *clone.headers_mut() = request.headers().clone();
        *clone.extensions_mut() = request.extensions().clone();
        Some(clone)
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_between_records_what_the_client_got() {
    let outcomes = Outcomes::default();
    let probe = Probe::default();
    let service = ServiceBuilder::new()
        .layer(ClientDisconnectLayer::new().on_outcome(outcomes.hook()))
        .layer(tower::retry::RetryLayer::new(RetryOnce { retried: false }))
        .layer(timeout().on_outcome(outcomes.hook()))
        .service(probe.handler(Some(2)));
    let response = service.oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(outcomes.one(), Outcome::completed(StatusCode::OK));
    assert_eq!(probe.calls.load(Ordering::SeqCst), 2);
    assert_eq!(probe.fired(), [false, false]);
}

#[tokio::test(start_paused = true)]
async fn a_client_leaving_during_the_retry_is_a_499_and_fires_the_signal() {
    let outcomes = Outcomes::default();
    let probe = Probe::default();
    let service = ServiceBuilder::new()
        .layer(ClientDisconnectLayer::new().on_outcome(outcomes.hook()))
        .layer(tower::retry::RetryLayer::new(RetryOnce { retried: false }))
        .layer(timeout())
        .service(probe.handler(None));
    let mut future = Box::pin(service.oneshot(Request::new(())));
    // The first attempt times out; the retry starts.
    let retried = tokio::time::timeout(Duration::from_millis(150), future.as_mut()).await;
    assert!(retried.is_err(), "the retry hangs too");
    assert_eq!(probe.calls.load(Ordering::SeqCst), 2);
    drop(future);
    assert_eq!(
        outcomes.one(),
        Outcome::client_disconnected(Phase::BeforeHead, None, 0)
    );
    // The request's one signal, which both attempts were given.
    assert_eq!(probe.fired(), [true, true]);
}

#[tokio::test(start_paused = true)]
async fn a_rewritten_generated_status_is_recorded_with_the_status_sent() {
    let outcomes = Outcomes::default();
    let probe = Probe::default();
    let service = ServiceBuilder::new()
        .layer(ClientDisconnectLayer::new().on_outcome(outcomes.hook()))
        .map_response(|mut response: Response<_>| {
            if response.status() == StatusCode::GATEWAY_TIMEOUT {
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            response
        })
        .layer(timeout())
        .service(probe.handler(None));
    let response = service.oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        outcomes.one(),
        Outcome::response_timeout(Duration::from_millis(100), StatusCode::SERVICE_UNAVAILABLE)
    );
}

#[tokio::test(start_paused = true)]
async fn the_hook_called_is_the_outermost_one_there_is() {
    let outer = Outcomes::default();
    let inner = Outcomes::default();
    let probe = Probe::default();
    let service = ClientDisconnectLayer::new().layer(lazy(
        timeout().on_outcome(outer.hook()).layer(lazy(
            timeout()
                .on_outcome(inner.hook())
                .layer(probe.handler(Some(1))),
        )),
    ));
    let response = service.oneshot(Request::new(())).await.unwrap();
    drop(response);
    assert_eq!(outer.one(), Outcome::completed(StatusCode::OK));
    assert_eq!(inner.all(), []);
}

#[tokio::test(start_paused = true)]
async fn a_layer_between_that_gives_up_is_not_a_client_leaving() {
    let outcomes = Outcomes::default();
    let probe = Probe::default();
    // tower's timeout drops what it wraps while the outer layer polls it.
    let service = ServiceBuilder::new()
        .layer(ClientDisconnectLayer::new().on_outcome(outcomes.hook()))
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_millis(50)))
        .service(lazy(
            ClientDisconnectLayer::new().layer(lazy(probe.handler(None))),
        ));
    let result = service.oneshot(Request::new(())).await;
    assert!(result.is_err(), "tower's timeout fails");
    assert_eq!(outcomes.one(), Outcome::failed(Phase::BeforeHead, None));
    assert_eq!(probe.fired(), [false]);
}

#[tokio::test(start_paused = true)]
async fn layers_called_on_another_task_join_the_same_exchange() {
    let outcomes = Outcomes::default();
    let probe = Probe::default();
    // `tower::buffer` calls the inner service on its worker task.
    let buffered = ServiceBuilder::new()
        .layer(ClientDisconnectLayer::new().on_outcome(outcomes.hook()))
        .buffer(4)
        .layer(timeout().on_outcome(outcomes.hook()))
        .service(probe.handler(None));
    let response = buffered.oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(outcomes.one(), timed_out(100));

    // A layer that runs the rest of the stack on a task of its own.
    let outcomes = Outcomes::default();
    let inner = timeout()
        .on_outcome(outcomes.hook())
        .layer(probe.handler(None));
    let spawned = ClientDisconnectLayer::new()
        .on_outcome(outcomes.hook())
        .layer(service_fn(move |request: Request<()>| {
            let call = inner.clone().oneshot(request);
            async move { tokio::spawn(call).await.unwrap() }
        }));
    let response = spawned.oneshot(Request::new(())).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(outcomes.one(), timed_out(100));
}

#[tokio::test(start_paused = true)]
async fn a_panicking_call_is_recorded_once_as_a_panic() {
    let outcomes = Outcomes::default();
    let mut service = ServiceBuilder::new()
        .layer(ClientDisconnectLayer::new().on_outcome(outcomes.hook()))
        .layer(timeout())
        .service(service_fn(
            |_: Request<()>| -> std::future::Ready<Result<Response<Body>, Infallible>> {
                panic!("call panics on purpose")
            },
        ));
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        service.call(Request::new(()))
    }));
    assert!(unwound.is_err());
    assert_eq!(outcomes.one(), Outcome::panicked(Phase::BeforeHead, None));
}

/// An upstream client that never answers.
fn silent_upstream() -> impl Service<
    Request<()>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
> + Clone
       + Send {
    service_fn(|_: Request<()>| pending::<Result<Response<Body>, Infallible>>())
}

#[tokio::test(start_paused = true)]
async fn an_upstream_call_is_an_exchange_of_its_own_and_its_answer_the_requests() {
    for (spawned, forwarded) in [(false, false), (false, true), (true, false), (true, true)] {
        let case = format!("spawned: {spawned}, extensions forwarded: {forwarded}");
        let served = Outcomes::default();
        let called = Outcomes::default();
        let upstream = ServiceBuilder::new()
            .layer(UpstreamFailureLayer::new().on_outcome(called.hook()))
            .layer(timeout())
            .service(silent_upstream());
        let gateway = ClientDisconnectLayer::new()
            .on_outcome(served.hook())
            .layer(service_fn(move |request: Request<()>| {
                let mut upstream_request = Request::new(());
                if forwarded {
                    *upstream_request.extensions_mut() = request.extensions().clone();
                }
                let call = upstream.clone().oneshot(upstream_request);
                async move {
                    if spawned {
                        tokio::spawn(call).await.unwrap()
                    } else {
                        call.await
                    }
                }
            }));
        let response = gateway.oneshot(Request::new(())).await.unwrap();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT, "{case}");
        assert_eq!(called.one(), timed_out(100), "{case}: the upstream call's");
        assert_eq!(served.one(), timed_out(100), "{case}: the request's");
    }
}
