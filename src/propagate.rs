//! Pass what is left of a request's deadline on to the upstream calls its handler makes.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use hyper_util::client::legacy::{connect::HttpConnector, Client};
//! use hyper_util::rt::TokioExecutor;
//! use tower::ServiceBuilder;
//! use tower_timeouts::{
//!     ConnectTimeoutLayer, PropagateDeadlineLayer, ResponseTimeoutLayer, UpstreamFailureLayer,
//! };
//! use tower_layer::Layer;
//!
//! let connector = ConnectTimeoutLayer::new(Duration::from_secs(1)).layer(HttpConnector::new());
//! let client: Client<_, axum::body::Body> = Client::builder(TokioExecutor::new()).build(connector);
//! let upstream = ServiceBuilder::new()
//!     .layer(PropagateDeadlineLayer::new().header(http::HeaderName::from_static("x-deadline-ms")))
//!     .layer(UpstreamFailureLayer::new())
//!     .layer(ResponseTimeoutLayer::new(Duration::from_secs(10)))
//!     .service(client);
//! # let _ = upstream;
//! ```
//!
//! With tonic, wrap the channel: `MyClient::new(ServiceBuilder::new().layer(PropagateDeadlineLayer::new()).service(channel))`.
//!
//! # What it does
//!
//! For an outgoing request made while an incoming request with a deadline is served, it:
//! - sets `grpc-timeout` on a gRPC request to the time left, minus the
//!   [margin](PropagateDeadlineLayer::margin), in at most 8 digits in the finest unit that
//!   holds it (an earlier `grpc-timeout` already on the request is kept); on any other request,
//!   it sets the [header](PropagateDeadlineLayer::header) you name, in milliseconds, if any;
//! - puts that deadline into the request's extensions and keeps it in force while the call
//!   runs, so that a [`ResponseTimeout`](crate::ResponseTimeout) inside and the
//!   [`ConnectTimeout`](crate::ConnectTimeout) of the client's connector give up when it
//!   passes, if that is before their own limits;
//! - when nothing is left, answers at once and sends nothing: `DEADLINE_EXCEEDED` for gRPC, 504
//!   for HTTP, with the outcome [`DeadlineExceeded`](crate::Outcome::DeadlineExceeded).
//!
//! Each hop then gives up a little before the hop outside it, by the margins and the time the
//! request takes to get there, and the innermost timeout that fires is the one the caller
//! hears about.
//!
//! # How the call finds the deadline
//!
//! The earlier of:
//! - the [`Deadline`] in the outgoing request's extensions: a gateway that forwards the
//!   incoming request, extensions and all, passes on the deadline a
//!   [`ResponseTimeout`](crate::ResponseTimeout) put there;
//! - the deadline in force ([`Deadline::current`]): a request a handler builds fresh gets the
//!   deadline of the request it serves, while the server's `ResponseTimeout` polls the
//!   handler. For work the handler spawns, carry it in with [`deadline::carry`] or
//!   [`Deadline::scope`].
//!
//! A request made with no deadline anywhere passes through untouched.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use crate::deadline::{self, Deadline};
use crate::grpc;
use crate::outcome::Outcome;
use crate::record::{Budget, Guarded, Joining, Recorder, Role, Share};
use crate::response::{ResponseBody, ResponseConfig};

/// The margin taken off the deadline passed on, unless configured otherwise.
pub const DEFAULT_MARGIN: Duration = Duration::from_millis(10);

#[derive(Clone, Debug)]
struct Config {
    margin: Duration,
    header: Option<HeaderName>,
    status: StatusCode,
    responses: ResponseConfig,
    recorder: Recorder,
}

/// Applies [`PropagateDeadline`] to a client service: each upstream call gets what is left of
/// the deadline of the request being served. See the [module docs](crate::propagate).
///
/// ```
/// use std::time::Duration;
/// use tower_timeouts::PropagateDeadlineLayer;
///
/// let layer = PropagateDeadlineLayer::new()
///     .margin(Duration::from_millis(25))
///     .header(http::HeaderName::from_static("x-request-timeout-ms"));
/// # let _ = layer;
/// ```
#[derive(Clone, Debug)]
pub struct PropagateDeadlineLayer {
    config: Config,
}

impl Default for PropagateDeadlineLayer {
    fn default() -> Self {
        PropagateDeadlineLayer::new()
    }
}

impl PropagateDeadlineLayer {
    /// Passes deadlines on with `grpc-timeout` on gRPC requests, a margin of
    /// [`DEFAULT_MARGIN`] (10 ms), and no header on other requests.
    pub const fn new() -> Self {
        PropagateDeadlineLayer {
            config: Config {
                margin: DEFAULT_MARGIN,
                header: None,
                status: StatusCode::GATEWAY_TIMEOUT,
                responses: ResponseConfig::new(),
                recorder: Recorder::new(),
            },
        }
    }

    /// Takes `margin` off the time left before passing it on (default 10 ms), so that the
    /// upstream gives up, and its answer arrives, before this service's own deadline.
    pub fn margin(mut self, margin: Duration) -> Self {
        self.config.margin = margin;
        self
    }

    /// Sends the deadline in `header`, in milliseconds (rounded down), on requests that are
    /// not gRPC. A service of this crate honours it with
    /// [`ResponseTimeoutLayer::deadline_header`](crate::ResponseTimeoutLayer::deadline_header).
    pub fn header(mut self, header: HeaderName) -> Self {
        self.config.header = Some(header);
        self
    }

    /// Answers a call with no time left with `status` instead of 504 (requests that are not
    /// gRPC).
    pub fn status(mut self, status: StatusCode) -> Self {
        self.config.status = status;
        self
    }

    crate::response::response_methods!(config.responses);
    crate::record::recorder_methods!(config.recorder);
}

impl<S> Layer<S> for PropagateDeadlineLayer {
    type Service = PropagateDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PropagateDeadline {
            inner,
            config: self.config.clone(),
        }
    }
}

/// Passes what is left of the served request's deadline on to each call. Made by
/// [`PropagateDeadlineLayer`]; see the [module docs](crate::propagate).
#[derive(Clone, Debug)]
pub struct PropagateDeadline<S> {
    inner: S,
    config: Config,
}

impl<S> PropagateDeadline<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for PropagateDeadline<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: http_body::Body,
    ResBody::Data: From<bytes::Bytes>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = PropagateFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let now = Instant::now();
        let given = request
            .extensions()
            .get::<Deadline>()
            .and_then(|deadline| deadline.instant_from(now));
        let Some(deadline) = deadline::earliest(given, deadline::current_instant()) else {
            return PropagateFuture::new(
                Call::Called {
                    future: self.inner.call(request),
                },
                Share::none(),
                None,
                &self.config,
                None,
            );
        };
        let left = deadline
            .saturating_duration_since(now)
            .saturating_sub(self.config.margin);
        let grpc = grpc::grpc_content_type(request.headers()).cloned();
        let sent = if left.is_zero() {
            None
        } else {
            Some(self.send(&mut request, grpc.is_some(), left))
        };
        let joining = Joining {
            limit: Some(left),
            budget: Some(Budget::Given(sent.unwrap_or(Duration::ZERO))),
            ..Joining::new(Role::Client)
        };
        let share = self.config.recorder.start(&mut request, joining);
        let grpc = grpc.filter(|_| self.config.responses.answers_grpc());
        let Some(sent) = sent else {
            return PropagateFuture::new(Call::Expired, share, None, &self.config, grpc);
        };
        let deadline = now + sent;
        request
            .extensions_mut()
            .insert(Deadline::in_force(deadline, sent));
        let future = {
            let _calling = share.calling();
            let _scope = deadline::enter_call(Some(deadline));
            self.inner.call(request)
        };
        PropagateFuture::new(
            Call::Called { future },
            share,
            Some(deadline),
            &self.config,
            grpc,
        )
    }
}

impl<S> PropagateDeadline<S> {
    /// Writes the deadline into the request (gRPC: `grpc-timeout`, kept if it is earlier
    /// already; else the configured header, likewise): returns what was sent.
    fn send<B>(&self, request: &mut Request<B>, is_grpc: bool, left: Duration) -> Duration {
        let headers = request.headers_mut();
        if is_grpc {
            let earlier = headers
                .get(grpc::GRPC_TIMEOUT)
                .and_then(|value| grpc::parse_timeout(value.as_bytes()).ok())
                .filter(|&earlier| earlier <= left);
            if let Some(earlier) = earlier {
                return earlier;
            }
            headers.insert(grpc::GRPC_TIMEOUT, grpc::encode_timeout(left));
            return left;
        }
        let Some(header) = &self.config.header else {
            return left;
        };
        let earlier = headers
            .get(header)
            .and_then(|value| deadline::parse_millis(value.as_bytes()))
            .filter(|&earlier| earlier <= left);
        if let Some(earlier) = earlier {
            return earlier;
        }
        let ms = u64::try_from(left.as_millis())
            .unwrap_or(u64::MAX)
            .min(99_999_999);
        headers.insert(header.clone(), HeaderValue::from(ms));
        Duration::from_millis(ms)
    }
}

pin_project! {
    /// The call, or nothing when no time was left to make it.
    #[project = CallProj]
    enum Call<F> {
        Called { #[pin] future: F },
        Expired,
    }
}

impl<F: Future> Future for Call<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            CallProj::Called { future } => future.poll(cx).map(Some),
            CallProj::Expired => Poll::Ready(None),
        }
    }
}

pin_project! {
    /// The response future of [`PropagateDeadline`].
    pub struct PropagateFuture<F> {
        #[pin]
        inner: Guarded<Call<F>>,
        // In force while the call is polled.
        deadline: Option<Instant>,
        status: StatusCode,
        // The request's content-type, when it is gRPC.
        grpc: Option<HeaderValue>,
        responses: ResponseConfig,
    }
}

impl<F> std::fmt::Debug for PropagateFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PropagateFuture")
            .field("deadline", &self.deadline)
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<F> PropagateFuture<F> {
    fn new(
        call: Call<F>,
        share: Share,
        deadline: Option<Instant>,
        config: &Config,
        grpc: Option<HeaderValue>,
    ) -> Self {
        PropagateFuture {
            inner: Guarded::new(call, share),
            deadline,
            status: config.status,
            grpc,
            responses: config.responses.clone(),
        }
    }
}

impl<F, B, E> Future for PropagateFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body,
    B::Data: From<bytes::Bytes>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let polled = {
            let _scope = deadline::enter_call(*this.deadline);
            ready!(this.inner.as_mut().poll(cx))
        };
        let result = match polled {
            Some(result) => result.map(|response| response.map(ResponseBody::new)),
            None => {
                let outcome = Outcome::deadline_exceeded(*this.status);
                Ok(this.responses.generate(outcome, this.grpc.as_ref()))
            }
        };
        Poll::Ready(this.inner.finish().respond(result, None))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use http::{HeaderMap, Request, Response};
    use tower::{service_fn, ServiceExt};

    use super::*;
    use crate::response::Generated;

    /// An upstream that answers at once with the headers it got, and what it saw in force.
    fn echo(
        calls: Arc<AtomicUsize>,
    ) -> impl Service<
        Request<()>,
        Response = Response<String>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<String>, Infallible>>,
    > + Clone {
        service_fn(move |request: Request<()>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let headers: HeaderMap = request.headers().clone();
            let extension = request
                .extensions()
                .get::<Deadline>()
                .map(Deadline::remaining);
            let call = deadline::call_instant().map(|at| at - Instant::now());
            async move {
                let mut response = Response::new(format!("{extension:?} {call:?}"));
                *response.headers_mut() = headers;
                Ok::<_, Infallible>(response)
            }
        })
    }

    fn grpc() -> Request<()> {
        let mut request = Request::new(());
        request.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        request
    }

    async fn text(response: Response<ResponseBody<String>>) -> String {
        use http_body_util::BodyExt;
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn what_is_left_less_the_margin_goes_downstream() {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = PropagateDeadlineLayer::new().margin(Duration::from_millis(100));
        let _scope = deadline::enter(crate::deadline::When::At(Some(
            Instant::now() + Duration::from_secs(1),
        )));
        let response = layer
            .layer(echo(calls.clone()))
            .oneshot(grpc())
            .await
            .unwrap();
        assert_eq!(response.headers()["grpc-timeout"], "900000u");
        // In the extensions for a ResponseTimeout inside, and in force for a connector.
        assert_eq!(text(response).await, "Some(900ms) Some(900ms)");
        // Plain HTTP: only with a header named.
        let response = layer
            .layer(echo(calls.clone()))
            .oneshot(Request::new(()))
            .await
            .unwrap();
        assert!(response.headers().is_empty());
        let named = layer.header(http::HeaderName::from_static("x-deadline-ms"));
        let response = named
            .layer(echo(calls.clone()))
            .oneshot(Request::new(()))
            .await
            .unwrap();
        assert_eq!(response.headers()["x-deadline-ms"], "900");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_forwarded_deadline_counts_and_an_earlier_timeout_is_kept() {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = PropagateDeadlineLayer::new().margin(Duration::ZERO);
        // A gateway forwards the incoming request: its deadline in force and its stale
        // grpc-timeout (the whole budget it came with) go with it.
        let mut forwarded = grpc();
        forwarded.extensions_mut().insert(Deadline::in_force(
            Instant::now() + Duration::from_millis(400),
            Duration::from_millis(400),
        ));
        forwarded
            .headers_mut()
            .insert(grpc::GRPC_TIMEOUT, HeaderValue::from_static("1S"));
        let response = layer
            .layer(echo(calls.clone()))
            .oneshot(forwarded)
            .await
            .unwrap();
        assert_eq!(response.headers()["grpc-timeout"], "400000u");
        // A request made with a shorter timeout of its own keeps it.
        let _scope = deadline::enter(crate::deadline::When::At(Some(
            Instant::now() + Duration::from_secs(5),
        )));
        let mut own = grpc();
        own.headers_mut()
            .insert(grpc::GRPC_TIMEOUT, HeaderValue::from_static("20m"));
        let response = layer.layer(echo(calls)).oneshot(own).await.unwrap();
        assert_eq!(response.headers()["grpc-timeout"], "20m");
        assert_eq!(text(response).await, "Some(20ms) Some(20ms)");
    }

    #[tokio::test(start_paused = true)]
    async fn with_nothing_left_it_answers_at_once_and_sends_nothing() {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = PropagateDeadlineLayer::new();
        // 5 ms left, less than the 10 ms margin.
        let _scope = deadline::enter(crate::deadline::When::At(Some(
            Instant::now() + Duration::from_millis(5),
        )));
        let response = layer
            .layer(echo(calls.clone()))
            .oneshot(grpc())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "4");
        let outcome = response.extensions().get::<Generated>().unwrap().outcome();
        assert_eq!(outcome, &Outcome::deadline_exceeded(StatusCode::OK));
        let response = layer
            .layer(echo(calls.clone()))
            .oneshot(Request::new(()))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            response.headers()[crate::response::PROXY_STATUS],
            "tower-timeouts; error=http_response_timeout"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_deadline_anywhere_the_request_passes_untouched() {
        let calls = Arc::new(AtomicUsize::new(0));
        let response = PropagateDeadlineLayer::new()
            .layer(echo(calls))
            .oneshot(grpc())
            .await
            .unwrap();
        assert!(!response.headers().contains_key("grpc-timeout"));
        assert_eq!(text(response).await, "None None");
    }

    /// A `ResponseTimeout` inside gives up at the deadline passed on, and reports it as its
    /// limit.
    #[tokio::test(start_paused = true)]
    async fn a_response_timeout_inside_is_shortened() {
        let slow = service_fn(|_: Request<()>| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, Infallible>(Response::new(String::new()))
        });
        let client = tower::ServiceBuilder::new()
            .layer(PropagateDeadlineLayer::new().margin(Duration::ZERO))
            .layer(crate::ResponseTimeoutLayer::new(Duration::from_secs(10)))
            .service(slow);
        let _scope = deadline::enter(crate::deadline::When::At(Some(
            Instant::now() + Duration::from_millis(250),
        )));
        let start = Instant::now();
        let response = client.oneshot(Request::new(())).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(250));
        let outcome = response.extensions().get::<Generated>().unwrap().outcome();
        assert_eq!(
            outcome,
            &Outcome::response_timeout(Duration::from_millis(250), StatusCode::GATEWAY_TIMEOUT)
        );
    }
}
