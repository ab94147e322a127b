//! Server shutdown is not a client leaving: a grace for the requests in flight, then a real 503
//! for each one still running, each recorded as `server_shutdown`, never as a 499.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use axum::{routing::get, Router};
//! use tower::ServiceBuilder;
//! use tower_timeouts::{ClientDisconnectLayer, ResponseTimeoutLayer, Shutdown};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! // Requests in flight when the shutdown begins get 10 s to finish, then a 503.
//! let shutdown = Shutdown::new(Duration::from_secs(10));
//! let app: Router = Router::new().route("/", get(|| async { "hello" })).layer(
//!     ServiceBuilder::new()
//!         // Outermost, so that it sees every request and drops what it wraps itself.
//!         .layer(shutdown.layer())
//!         .layer(ClientDisconnectLayer::new())
//!         .layer(ResponseTimeoutLayer::new(Duration::from_secs(30))),
//! );
//!
//! // On SIGTERM (here: at once), begin the shutdown: the server stops accepting and the
//! // grace starts.
//! let on_signal = shutdown.clone();
//! tokio::spawn(async move {
//!     // tokio::signal::ctrl_c().await.ok();
//!     on_signal.begin();
//! });
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! axum::serve(listener, app)
//!     .with_graceful_shutdown(shutdown.begun())
//!     .await?;
//! # Ok(())
//! # }
//! ```
//!
//! # What happens, step by step
//!
//! 1. [`Shutdown::begin`] (call it on SIGTERM): [`Shutdown::begun`] resolves, so the server's
//!    graceful shutdown starts. axum and hyper-util stop accepting connections (a new connect
//!    is refused once the listener is dropped), close idle keep-alive connections, end each
//!    HTTP/1 connection after its request in flight, and send HTTP/2 clients `GOAWAY` (new
//!    streams are refused). The requests in flight run on.
//! 2. The grace runs from `begin`. A request that completes within it is an ordinary
//!    completion; a client that leaves within it is still a 499 (hyper still sees it).
//! 3. When the grace runs out ([`Shutdown::end_grace`] ends it early), every request still
//!    running is answered in the handler's place: **503 Service Unavailable** with
//!    `Connection: close` on HTTP/1 (so the connection closes after it, and a client that
//!    retries on 503 goes elsewhere), or a trailers-only `UNAVAILABLE` for gRPC, which clients
//!    may retry. A response already streaming its body is ended as a body limit ends it (an
//!    HTTP/2 reset with `CANCEL`, the HTTP/1 connection closed, gRPC trailers with
//!    `UNAVAILABLE`). The handler is dropped.
//! 4. Each of those is recorded once as [`Outcome::ServerShutdown`]
//!    (`error.type=server_shutdown`, an error on the span, the hook told), and the request's
//!    [`ClientGone`](crate::ClientGone) is cancelled with
//!    [`Cancelled::ServerShutdown`](crate::signal::Cancelled::ServerShutdown): `gone()` does
//!    not fire, since no client left. A request dropped after the grace (the runtime shutting
//!    down) is `server_shutdown` too.
//!
//! Detached work ([`DetachLayer`](crate::DetachLayer)) is not answered by the server: drain it
//! under a cap of its own once the server is done (`tracker.close()`, then
//! `tokio::time::timeout(cap, tracker.wait())`).
//!
//! # Where to put it
//!
//! Outermost, outside the crate's other layers: it then sees every request, and drops what it
//! wraps itself when the grace ran out, so that the layers inside learn why. One [`Shutdown`]
//! serves every router and server of the process that should drain together.
//!
//! A drop of a request *within* the grace is taken for a client leaving, as it is without
//! this layer: hyper keeps serving during a graceful shutdown, so that is what it is, unless
//! the runtime itself shuts down before the grace ends. Keep the grace shorter than the time
//! your deployment gives the process to stop (Kubernetes' `terminationGracePeriodSeconds`, 30 s
//! by default), or call [`Shutdown::end_grace`] before you stop the runtime.

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::header::{HeaderValue, CONNECTION};
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tower_layer::Layer;
use tower_service::Service;

use crate::grpc::GrpcCode;
use crate::outcome::{Outcome, Phase};
use crate::record::{
    dropping_in, nothing_can_see, poll_followed, Exchange, Extent, Followed, Guarded, Joining,
    Recorder, Role, Tail,
};
use crate::response::{end_stream, ResponseBody, ResponseConfig};

type BoxError = Box<dyn Error + Send + Sync>;

/// A server's shutdown: begun once, then a grace for the requests in flight. Cheap to clone;
/// all clones are the same shutdown. See the [module docs](self).
#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

struct Inner {
    grace: Duration,
    begun: CancellationToken,
    grace_over: CancellationToken,
    began_at: OnceLock<Instant>,
}

impl fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shutdown")
            .field("grace", &self.inner.grace)
            .field("begun", &self.is_begun())
            .field("grace_over", &self.is_grace_over())
            .finish()
    }
}

impl Shutdown {
    /// A shutdown not begun yet, whose requests in flight get `grace` once it begins.
    pub fn new(grace: Duration) -> Self {
        Shutdown {
            inner: Arc::new(Inner {
                grace,
                begun: CancellationToken::new(),
                grace_over: CancellationToken::new(),
                began_at: OnceLock::new(),
            }),
        }
    }

    /// Begins the shutdown (again: nothing): [`begun`](Self::begun) resolves, and the grace
    /// starts.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime: the grace is one timer task, spawned here.
    pub fn begin(&self) {
        let inner = &self.inner;
        if inner.began_at.set(Instant::now()).is_err() {
            return;
        }
        inner.begun.cancel();
        let grace_over = inner.grace_over.clone();
        let grace = inner.grace;
        tokio::spawn(async move {
            // A grace beyond the clock's range never ends on its own.
            if let Some(at) = Instant::now().checked_add(grace) {
                tokio::time::sleep_until(at).await;
                grace_over.cancel();
            }
        });
    }

    /// Ends the grace now: every request still running is answered 503 (begins the shutdown
    /// first, if it was not).
    pub fn end_grace(&self) {
        if self.inner.began_at.set(Instant::now()).is_ok() {
            self.inner.begun.cancel();
        }
        self.inner.grace_over.cancel();
    }

    /// Whether the shutdown has begun.
    pub fn is_begun(&self) -> bool {
        self.inner.begun.is_cancelled()
    }

    /// Whether the grace has run out.
    pub fn is_grace_over(&self) -> bool {
        self.inner.grace_over.is_cancelled()
    }

    /// Resolves once the shutdown has begun: the signal for the server's graceful shutdown
    /// (`axum::serve(..).with_graceful_shutdown(shutdown.begun())`, or hyper-util's
    /// `GracefulShutdown`).
    pub fn begun(&self) -> impl Future<Output = ()> + Send + 'static {
        self.inner.begun.clone().cancelled_owned()
    }

    /// Resolves once the grace has run out.
    pub fn grace_over(&self) -> impl Future<Output = ()> + Send + 'static {
        self.inner.grace_over.clone().cancelled_owned()
    }

    /// The layer that answers the requests still running when the grace runs out.
    pub fn layer(&self) -> ShutdownLayer {
        ShutdownLayer {
            shutdown: self.clone(),
            responses: ResponseConfig::new(),
            recorder: Recorder::new(),
        }
    }
}

/// Applies [`ShutdownService`]: made by [`Shutdown::layer`].
#[derive(Clone, Debug)]
pub struct ShutdownLayer {
    shutdown: Shutdown,
    responses: ResponseConfig,
    recorder: Recorder,
}

impl ShutdownLayer {
    crate::response::response_methods!(responses);
    crate::record::recorder_methods!(recorder);
}

impl<S> Layer<S> for ShutdownLayer {
    type Service = ShutdownService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ShutdownService {
            inner,
            layer: self.clone(),
        }
    }
}

/// Answers 503 in place of the inner service when a [`Shutdown`]'s grace runs out, and ends a
/// response body still under way. Made by [`ShutdownLayer`].
#[derive(Clone, Debug)]
pub struct ShutdownService<S> {
    inner: S,
    layer: ShutdownLayer,
}

impl<S> ShutdownService<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// What a request keeps to be answered or ended at the end of the grace.
#[derive(Debug)]
struct Answer {
    responses: ResponseConfig,
    /// The request's `content-type`, when it is gRPC and gets gRPC answers. Boxed, so that the
    /// future of every other request stays small.
    grpc: Option<Box<HeaderValue>>,
    http1: bool,
    /// The request's exchange, whichever layer records it.
    exchange: Option<Arc<Exchange>>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ShutdownService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
    ResBody::Data: From<Bytes>,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ShutdownBody<ResBody>>;
    type Error = S::Error;
    type Future = ShutdownFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let layer = &self.layer;
        // The body is followed to its end, so that a body ended at the end of the grace is
        // recorded.
        let joining = Joining {
            follows_body: true,
            ..Joining::new(Role::Server)
        };
        let share = layer.recorder.start(&mut request, joining);
        let answer = Answer {
            responses: layer.responses.clone(),
            grpc: layer.responses.grpc_of(request.headers()).map(Box::new),
            http1: request.version() <= Version::HTTP_11,
            exchange: if nothing_can_see() {
                None
            } else {
                Exchange::of(&request)
            },
        };
        let inner = {
            let _calling = share.calling();
            self.inner.call(request)
        };
        ShutdownFuture {
            inner: Guarded::new(inner, share),
            over: None,
            shutdown: layer.shutdown.clone(),
            answer: Some(answer),
        }
    }
}

pin_project! {
    /// The response future of [`ShutdownService`].
    pub struct ShutdownFuture<F> {
        #[pin]
        inner: Guarded<F>,
        // Made at the first poll that finds the response not ready.
        #[pin]
        over: Option<WaitForCancellationFutureOwned>,
        shutdown: Shutdown,
        answer: Option<Answer>,
    }

    impl<F> PinnedDrop for ShutdownFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // After the grace, a request still running is dropped by the server going away.
            if this.shutdown.is_grace_over() {
                this.inner.drop_early(Extent::ShutDown);
            }
        }
    }
}

impl<F> fmt::Debug for ShutdownFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShutdownFuture")
            .field("inner", &self.inner)
            .field("shutdown", &self.shutdown)
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ShutdownFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
    B::Data: From<Bytes>,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<ShutdownBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(result) = this.inner.as_mut().poll(cx) {
            let finished = this.inner.finish();
            let (exchange, grpc) = this.answer.take().map_or((None, false), |answer| {
                (answer.exchange, answer.grpc.is_some())
            });
            let shutdown = this.shutdown.clone();
            let result = result.map(|response| {
                let status = response.status();
                response.map(|inner| {
                    ShutdownBody::new(ResponseBody::new(inner), shutdown, status, exchange, grpc)
                })
            });
            return Poll::Ready(finished.respond(result, None));
        }
        if this.over.is_none() {
            let over = this.shutdown.inner.grace_over.clone().cancelled_owned();
            this.over.set(Some(over));
        }
        let Some(over) = this.over.as_pin_mut() else {
            return Poll::Pending;
        };
        if over.poll(cx).is_pending() {
            return Poll::Pending;
        }
        // The grace is over: the handler is dropped, and the server answers in its place.
        let finished = this.inner.finish_in(Extent::ShutDown);
        let answer = this.answer.take().expect("answered once");
        let outcome =
            Outcome::server_shutdown(Phase::BeforeHead, Some(StatusCode::SERVICE_UNAVAILABLE), 0);
        let response = answer.responses.generate(outcome, answer.grpc.as_deref());
        let status = response.status();
        let shutdown = this.shutdown.clone();
        let mut response = response.map(|generated| {
            ShutdownBody::new(generated, shutdown, status, None, answer.grpc.is_some())
        });
        if answer.http1 {
            // So that the connection closes after the 503, and a client that retries goes
            // elsewhere.
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        Poll::Ready(finished.respond(Ok(response), None))
    }
}

pin_project! {
    /// The response body of [`ShutdownService`]: the inner body (or the 503 it answered with),
    /// ended if the grace runs out while it is sent (with a [`ShutdownError`], or gRPC trailers
    /// with `UNAVAILABLE`).
    pub struct ShutdownBody<B> {
        #[pin]
        ending: Ending<B>,
        // Follows the body to its end when this layer records the request.
        tail: Option<Box<Tail>>,
    }

    impl<B> PinnedDrop for ShutdownBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            let ending = this.ending.project();
            // After the grace, a body still under way is dropped by the server going away: the
            // tail too, so that it records that.
            if ending.shutdown.is_grace_over() {
                let mut inner = ending.inner;
                let tail = this.tail;
                dropping_in(Extent::ShutDown, || {
                    inner.set(None);
                    drop(tail.take());
                });
            }
        }
    }
}

pin_project! {
    struct Ending<B> {
        // `None` once ended.
        #[pin]
        inner: Option<ResponseBody<B>>,
        // Made at the first poll that finds the body pending.
        #[pin]
        over: Option<WaitForCancellationFutureOwned>,
        shutdown: Shutdown,
        // Whether the response came before the grace ran out.
        under_way: bool,
        status: StatusCode,
        bytes: u64,
        exchange: Option<Arc<Exchange>>,
        grpc: bool,
    }
}

impl<B> ShutdownBody<B> {
    fn new(
        inner: ResponseBody<B>,
        shutdown: Shutdown,
        status: StatusCode,
        exchange: Option<Arc<Exchange>>,
        grpc: bool,
    ) -> Self {
        ShutdownBody {
            ending: Ending {
                inner: Some(inner),
                over: None,
                under_way: !shutdown.is_grace_over(),
                shutdown,
                status,
                bytes: 0,
                exchange,
                grpc,
            },
            tail: None,
        }
    }
}

impl<B> fmt::Debug for ShutdownBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShutdownBody")
            .field("ended", &self.ending.inner.is_none())
            .field("bytes", &self.ending.bytes)
            .finish_non_exhaustive()
    }
}

impl<B> Body for Ending<B>
where
    B: Body,
    B::Data: From<Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(None);
        };
        // The 503 answered at the end of the grace goes out whole.
        let generated = inner.is_generated();
        let polled = inner.poll_frame(cx);
        let over = match &polled {
            _ if generated => false,
            // A frame that keeps a stream flowing past the grace ends it, unless the response
            // came after the grace (a server not draining): it goes out whole.
            Poll::Ready(Some(Ok(_))) => *this.under_way && this.shutdown.is_grace_over(),
            Poll::Ready(_) => false,
            Poll::Pending => {
                if this.over.is_none() {
                    let over = this.shutdown.inner.grace_over.clone().cancelled_owned();
                    this.over.set(Some(over));
                }
                this.over
                    .as_pin_mut()
                    .is_some_and(|over| over.poll(cx).is_ready())
            }
        };
        if !over {
            if let Poll::Ready(Some(Ok(frame))) = &polled {
                if let Some(data) = frame.data_ref() {
                    *this.bytes += data.remaining() as u64;
                }
            }
            return polled.map(|frame| frame.map(|frame| frame.map_err(Into::into)));
        }
        // The grace is over: the rest of the body is not sent, this frame included.
        dropping_in(Extent::ShutDown, || {
            drop(polled);
            this.inner.set(None);
        });
        let outcome = Outcome::server_shutdown(Phase::DuringBody, Some(*this.status), *this.bytes);
        Poll::Ready(Some(end_stream(
            this.exchange.take().as_deref(),
            *this.grpc,
            GrpcCode::UNAVAILABLE,
            outcome,
            ShutdownError::new(),
        )))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(inner) => inner.size_hint(),
            None => SizeHint::with_exact(0),
        }
    }
}

impl<B> Body for ShutdownBody<B>
where
    B: Body,
    B::Data: From<Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        poll_followed(this.tail, this.ending, cx)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.ending.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.ending.size_hint()
    }
}

impl<B> Followed for ShutdownBody<B>
where
    B: Body,
    B::Data: From<Bytes>,
    B::Error: Into<BoxError>,
{
    fn follow(&mut self, tail: Tail) {
        self.tail = Some(Box::new(tail));
    }
}

/// The error a response body ends with when a shutdown's grace runs out while it is sent.
///
/// With the `h2` feature, its [`source`](Error::source) is an `h2::Error` with reason `CANCEL`,
/// from which hyper takes the reason of the HTTP/2 stream reset.
pub struct ShutdownError {
    #[cfg(feature = "h2")]
    reason: h2::Error,
}

impl ShutdownError {
    fn new() -> Self {
        ShutdownError {
            #[cfg(feature = "h2")]
            reason: h2::Reason::CANCEL.into(),
        }
    }
}

impl fmt::Debug for ShutdownError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShutdownError").finish()
    }
}

impl fmt::Display for ShutdownError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the server shut down while the response body was sent")
    }
}

impl Error for ShutdownError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        #[cfg(feature = "h2")]
        return Some(&self.reason);
        #[cfg(not(feature = "h2"))]
        None
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Mutex;

    use http_body_util::BodyExt;
    use tower::{service_fn, ServiceBuilder, ServiceExt};

    use super::*;
    use crate::signal::{Cancelled, ClientGone};
    use crate::test_support::Outcomes;
    use crate::ClientDisconnectLayer;

    const GRACE: Duration = Duration::from_secs(5);

    /// A handler that takes `work` and keeps its request's signal in `gone`.
    fn handler(
        work: Duration,
        gone: Arc<Mutex<Option<ClientGone>>>,
    ) -> impl tower::Service<
        Request<()>,
        Response = Response<String>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<String>, Infallible>>,
    > + Clone {
        service_fn(move |_: Request<()>| {
            *gone.lock().unwrap() = ClientGone::current();
            async move {
                tokio::time::sleep(work).await;
                Ok::<_, Infallible>(Response::new("done".to_owned()))
            }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_still_running_at_the_end_of_the_grace_gets_a_503_and_closes() {
        let shutdown = Shutdown::new(GRACE);
        let outcomes = Outcomes::default();
        let gone = Arc::default();
        let service = ServiceBuilder::new()
            .layer(shutdown.layer().on_outcome(outcomes.hook()))
            .layer(ClientDisconnectLayer::new())
            .service(handler(Duration::from_secs(60), Arc::clone(&gone)));
        let start = Instant::now();
        let call = tokio::spawn(service.oneshot(Request::new(())));
        tokio::time::sleep(Duration::from_secs(1)).await;
        shutdown.begin();
        let response = call.await.unwrap().unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(1) + GRACE);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[CONNECTION], "close");
        assert!(!response
            .headers()
            .contains_key(crate::response::PROXY_STATUS));
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "503 Service Unavailable\n");
        let expected =
            Outcome::server_shutdown(Phase::BeforeHead, Some(StatusCode::SERVICE_UNAVAILABLE), 0);
        assert_eq!(outcomes.one(), expected);
        let gone = gone.lock().unwrap().take().unwrap();
        assert_eq!(gone.reason(), Some(Cancelled::ServerShutdown));
        assert!(!gone.is_gone());
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_finishes_within_the_grace_completes() {
        let shutdown = Shutdown::new(GRACE);
        let outcomes = Outcomes::default();
        let service = ServiceBuilder::new()
            .layer(shutdown.layer().on_outcome(outcomes.hook()))
            .service(handler(Duration::from_secs(3), Arc::default()));
        let call = tokio::spawn(service.oneshot(Request::new(())));
        tokio::task::yield_now().await;
        shutdown.begin();
        let response = call.await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        drop(response);
        assert_eq!(outcomes.one(), Outcome::completed(StatusCode::OK));
    }

    #[tokio::test(start_paused = true)]
    async fn a_drop_within_the_grace_is_a_client_leaving_and_after_it_the_server() {
        for (end_grace, expected) in [
            (
                false,
                Outcome::client_disconnected(Phase::BeforeHead, None, 0),
            ),
            (true, Outcome::server_shutdown(Phase::BeforeHead, None, 0)),
        ] {
            let shutdown = Shutdown::new(GRACE);
            let outcomes = Outcomes::default();
            let gone = Arc::default();
            let mut service = ServiceBuilder::new()
                .layer(shutdown.layer().on_outcome(outcomes.hook()))
                .layer(ClientDisconnectLayer::new())
                .service(handler(Duration::from_secs(60), Arc::clone(&gone)));
            let mut future = Box::pin(service.call(Request::new(())));
            let polled = future
                .as_mut()
                .poll(&mut Context::from_waker(std::task::Waker::noop()));
            assert!(polled.is_pending());
            shutdown.begin();
            if end_grace {
                shutdown.end_grace();
            }
            drop(future);
            assert_eq!(outcomes.one(), expected);
            let reason = gone.lock().unwrap().take().unwrap().reason();
            let expected = if end_grace {
                Cancelled::ServerShutdown
            } else {
                Cancelled::ClientLeft
            };
            assert_eq!(reason, Some(expected));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_under_way_is_ended_at_the_end_of_the_grace() {
        let shutdown = Shutdown::new(GRACE);
        let outcomes = Outcomes::default();
        let service = ServiceBuilder::new()
            .layer(shutdown.layer().on_outcome(outcomes.hook()))
            .service_fn(|_: Request<()>| async {
                use tokio_stream::StreamExt;
                let frames = tokio_stream::iter([Ok::<_, Infallible>(Frame::data(
                    Bytes::from_static(b"tick"),
                ))])
                .chain(tokio_stream::pending());
                Ok::<_, Infallible>(Response::new(http_body_util::StreamBody::new(frames)))
            });
        let response = service.oneshot(Request::new(())).await.unwrap();
        let mut body = Box::pin(response.into_body());
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "tick"
        );
        shutdown.begin();
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(error.is::<ShutdownError>());
        assert_eq!(
            outcomes.one(),
            Outcome::server_shutdown(Phase::DuringBody, Some(StatusCode::OK), 4)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn detached_work_runs_on_past_the_503_learns_why_and_drains_under_its_own_cap() {
        let shutdown = Shutdown::new(GRACE);
        let detach = crate::DetachLayer::new(Duration::from_secs(60));
        let tracker = detach.tracker();
        let gone: Arc<Mutex<Option<ClientGone>>> = Arc::default();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let service = ServiceBuilder::new()
            .layer(shutdown.layer())
            .layer(ClientDisconnectLayer::new())
            .layer(detach)
            .service(service_fn({
                let gone = Arc::clone(&gone);
                let done = Arc::clone(&done);
                move |_: Request<()>| {
                    *gone.lock().unwrap() = ClientGone::current();
                    let done = Arc::clone(&done);
                    async move {
                        tokio::time::sleep(GRACE * 2).await;
                        done.store(true, std::sync::atomic::Ordering::SeqCst);
                        Ok::<_, Infallible>(Response::new("committed".to_owned()))
                    }
                }
            }));
        let call = tokio::spawn(service.oneshot(Request::new(())));
        tokio::task::yield_now().await;
        shutdown.begin();
        let response = call.await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let gone = gone.lock().unwrap().take().unwrap();
        assert_eq!(gone.reason(), Some(Cancelled::ServerShutdown));
        // The server is done; the detached work drains after it, under a cap of its own.
        tracker.close();
        let drained = tokio::time::timeout(GRACE * 2, tracker.wait()).await;
        assert!(drained.is_ok());
        assert!(done.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_that_comes_after_the_grace_goes_out_whole() {
        // A server that is not draining still takes requests: one answered at once is not cut.
        let shutdown = Shutdown::new(GRACE);
        shutdown.end_grace();
        let service = shutdown.layer().layer(service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(Response::new(http_body_util::Full::new(
                Bytes::from_static(b"whole"),
            )))
        }));
        let response = service.oneshot(Request::new(())).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "whole");
    }

    #[tokio::test(start_paused = true)]
    async fn a_grpc_request_gets_unavailable() {
        let shutdown = Shutdown::new(GRACE);
        let service = shutdown
            .layer()
            .layer(handler(Duration::from_secs(60), Arc::default()));
        let mut request = Request::new(());
        request.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        shutdown.end_grace();
        let response = service.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[crate::grpc::GRPC_STATUS], "14");
    }
}
