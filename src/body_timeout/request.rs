//! The request-body limits: 408 for a client too slow to send its body.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::header::{HeaderValue, CONNECTION};
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use super::clock::Clock;
use super::{limit_methods, BodyTimeoutError, Limits};
use crate::outcome::Outcome;
use crate::record::{abandoning, Guarded, Joining, Recorder, Role};
use crate::response::{ResponseBody, ResponseConfig};
use crate::signal::ClientGone;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Applies [`RequestBodyTimeout`] to a service: 408 for a request body the client is too slow
/// to send. See the [module docs](crate::body_timeout).
///
/// ```
/// use std::time::Duration;
/// use tower_timeouts::RequestBodyTimeoutLayer;
///
/// let layer = RequestBodyTimeoutLayer::new()
///     .idle(Duration::from_secs(10))
///     .total(Duration::from_secs(60));
/// # let _ = layer;
/// ```
#[derive(Clone, Debug, Default)]
pub struct RequestBodyTimeoutLayer {
    config: Config,
}

#[derive(Clone, Debug, Default)]
struct Config {
    limits: Limits,
    responses: ResponseConfig,
    recorder: Recorder,
}

impl RequestBodyTimeoutLayer {
    /// A layer with no limit yet: set [`idle`](Self::idle), [`total`](Self::total) or both.
    pub const fn new() -> Self {
        RequestBodyTimeoutLayer {
            config: Config {
                limits: Limits {
                    idle: None,
                    total: None,
                },
                responses: ResponseConfig::new(),
                recorder: Recorder::new(),
            },
        }
    }

    limit_methods!(config.limits);
    crate::response::response_methods!(config.responses);
    crate::record::recorder_methods!(config.recorder);
}

impl<S> Layer<S> for RequestBodyTimeoutLayer {
    type Service = RequestBodyTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestBodyTimeout {
            inner,
            config: self.config.clone(),
        }
    }
}

/// Answers 408 in place of the inner service when the request body it waits for does not
/// arrive in time. Made by [`RequestBodyTimeoutLayer`].
#[derive(Clone, Debug)]
pub struct RequestBodyTimeout<S> {
    inner: S,
    config: Config,
}

impl<S> RequestBodyTimeout<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// What a request's body and its response future share: which limit fired, the future's
/// waker, and what the answer needs.
#[derive(Debug)]
struct Shared {
    /// `NOT_FIRED`, or which limit fired.
    fired: AtomicU8,
    waker: AtomicWaker,
    limits: Limits,
    responses: ResponseConfig,
    /// The request's `content-type`, when it is gRPC and gets gRPC answers.
    grpc: Option<HeaderValue>,
    http1: bool,
}

const NOT_FIRED: u8 = 0;
const IDLE: u8 = 1;
const TOTAL: u8 = 2;

impl Shared {
    fn fire(&self, error: &BodyTimeoutError) {
        let which = if error.is_idle() { IDLE } else { TOTAL };
        self.fired.store(which, Ordering::Release);
        self.waker.wake();
    }

    /// The limit that fired, if one did.
    fn fired(&self) -> Option<Duration> {
        match self.fired.load(Ordering::Acquire) {
            IDLE => self.limits.idle,
            TOTAL => self.limits.total,
            _ => None,
        }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for RequestBodyTimeout<S>
where
    S: Service<Request<TimedRequestBody<ReqBody>>, Response = Response<ResBody>>,
    ReqBody: Body,
    ReqBody::Error: Into<BoxError>,
    ResBody: Body,
    ResBody::Data: From<Bytes>,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = RequestFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let config = &self.config;
        let share = config
            .recorder
            .start(&mut request, Joining::new(Role::Server));
        let limits = config.limits;
        let shared = (!limits.is_none()).then(|| {
            Arc::new(Shared {
                fired: AtomicU8::new(NOT_FIRED),
                waker: AtomicWaker::new(),
                limits,
                responses: config.responses.clone(),
                grpc: config.responses.grpc_of(request.headers()),
                http1: request.version() <= Version::HTTP_11,
            })
        });
        let body_shared = shared.clone();
        // The total limit counts from the head: now.
        let request = request.map(|body| TimedRequestBody {
            inner: body,
            clock: Clock::new(limits, Instant::now),
            shared: body_shared,
            fired: false,
        });
        let inner = {
            let _calling = share.calling();
            self.inner.call(request)
        };
        RequestFuture {
            inner: Guarded::new(inner, share),
            shared,
        }
    }
}

pin_project! {
    /// The response future of [`RequestBodyTimeout`].
    pub struct RequestFuture<F> {
        #[pin]
        inner: Guarded<F>,
        shared: Option<Arc<Shared>>,
    }
}

impl<F> std::fmt::Debug for RequestFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestFuture")
            .field("inner", &self.inner)
            .field("shared", &self.shared)
            .finish()
    }
}

impl<F, B, E> Future for RequestFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
    B::Data: From<Bytes>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(shared) = this.shared.as_deref() {
            // Before the poll: a body read on another task wakes this one when it fires.
            shared.waker.register(cx.waker());
        }
        let polled = this.inner.as_mut().poll(cx);
        let fired = this
            .shared
            .as_deref()
            .and_then(|shared| Some((shared, shared.fired()?)));
        let Some((shared, limit)) = fired else {
            let result = ready!(polled);
            let finished = this.inner.finish();
            let wrap = |result: Result<Response<B>, E>| result.map(|r| r.map(ResponseBody::new));
            return Poll::Ready(finished.respond(wrap(result), None));
        };
        // The handler's answer to the body's error (axum's 400, say) is not the client's.
        let finished = this.inner.finish();
        abandoning(|| drop(polled));
        let outcome = Outcome::request_body_timeout(limit, StatusCode::REQUEST_TIMEOUT);
        let mut response = shared.responses.generate(outcome, shared.grpc.as_ref());
        if shared.http1 {
            // The rest of the body is not read: the connection cannot carry another request.
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        Poll::Ready(finished.respond(Ok(response), None))
    }
}

pin_project! {
    /// The request body of [`RequestBodyTimeout`]: the inner body, which fails with a
    /// [`BodyTimeoutError`] when a limit fires while it is waited for.
    pub struct TimedRequestBody<B> {
        #[pin]
        inner: B,
        #[pin]
        clock: Clock,
        shared: Option<Arc<Shared>>,
        fired: bool,
    }
}

impl<B> std::fmt::Debug for TimedRequestBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimedRequestBody")
            .field("clock", &self.clock)
            .field("fired", &self.fired)
            .finish_non_exhaustive()
    }
}

impl<B> Body for TimedRequestBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if *this.fired {
            return Poll::Ready(None);
        }
        let polled = this.inner.poll_frame(cx);
        if let Some(error) = this.clock.fired(cx, &polled, false) {
            *this.fired = true;
            if let Some(shared) = this.shared {
                shared.fire(&error);
            }
            // The handler's work is given up on, whatever it answers: a complete answer that
            // the layer throws away would otherwise leave its signal unaware. Read while the
            // handler is polled, where a `ClientDisconnect` around it makes its signal current.
            if let Some(gone) = ClientGone::current() {
                gone.abandon();
            }
            return Poll::Ready(Some(Err(error.into())));
        }
        polled.map(|frame| frame.map(|frame| frame.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.fired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
