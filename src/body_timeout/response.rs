//! The response-body limits: a stream that stalls or runs too long after its head is ended.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Buf;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use super::clock::Clock;
use super::{limit_methods, Limits};
use crate::grpc::{self, GrpcCode};
use crate::outcome::Outcome;
use crate::record::{
    abandoning, nothing_can_see, poll_followed, Exchange, Followed, Guarded, Joining, Recorder,
    Role, Tail,
};
use crate::response::end_stream;
use crate::signal::ClientGone;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Applies [`ResponseBodyTimeout`] to a service: a response stream that stalls or runs too long
/// after its head is ended, and recorded. See the [module docs](crate::body_timeout).
///
/// ```
/// use std::time::Duration;
/// use tower_timeouts::ResponseBodyTimeoutLayer;
///
/// // An SSE stream with a heartbeat every 15 s is cut when two heartbeats are missed.
/// let layer = ResponseBodyTimeoutLayer::new().idle(Duration::from_secs(35));
/// # let _ = layer;
/// ```
#[derive(Clone, Debug, Default)]
pub struct ResponseBodyTimeoutLayer {
    config: Config,
}

#[derive(Clone, Debug, Default)]
struct Config {
    limits: Limits,
    recorder: Recorder,
}

impl ResponseBodyTimeoutLayer {
    /// A layer with no limit yet: set [`idle`](Self::idle), [`total`](Self::total) or both.
    pub const fn new() -> Self {
        ResponseBodyTimeoutLayer {
            config: Config {
                limits: Limits {
                    idle: None,
                    total: None,
                },
                recorder: Recorder::new(),
            },
        }
    }

    limit_methods!(config.limits);
    crate::record::recorder_methods!(config.recorder);
}

impl<S> Layer<S> for ResponseBodyTimeoutLayer {
    type Service = ResponseBodyTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ResponseBodyTimeout {
            inner,
            config: self.config.clone(),
        }
    }
}

/// Ends a response body that stalls or runs too long. Made by [`ResponseBodyTimeoutLayer`].
#[derive(Clone, Debug)]
pub struct ResponseBodyTimeout<S> {
    inner: S,
    config: Config,
}

impl<S> ResponseBodyTimeout<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

/// Whom a body tells when a limit ends it.
#[derive(Debug, Default)]
struct Ends {
    /// The request's exchange, whichever layer records it.
    exchange: Option<Arc<Exchange>>,
    /// For a gRPC request under a `ClientDisconnect` outside: its signal, which would not
    /// learn otherwise (the stream ends with trailers, no error passes it).
    gone: Option<ClientGone>,
    grpc: bool,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for ResponseBodyTimeout<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<TimedResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseBodyFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let config = &self.config;
        // The body is followed to its end, so that the outcome of a limit can be recorded.
        let joining = Joining {
            follows_body: true,
            ..Joining::new(Role::Server)
        };
        let share = config.recorder.start(&mut request, joining);
        let grpc = grpc::is_grpc(request.headers());
        let ends = Ends {
            exchange: if nothing_can_see() {
                None
            } else {
                Exchange::of(&request)
            },
            gone: if grpc { ClientGone::current() } else { None },
            grpc,
        };
        let inner = {
            let _calling = share.calling();
            self.inner.call(request)
        };
        ResponseBodyFuture {
            inner: Guarded::new(inner, share),
            limits: config.limits,
            ends: Some(ends),
        }
    }
}

pin_project! {
    /// The response future of [`ResponseBodyTimeout`].
    pub struct ResponseBodyFuture<F> {
        #[pin]
        inner: Guarded<F>,
        limits: Limits,
        ends: Option<Ends>,
    }
}

impl<F> std::fmt::Debug for ResponseBodyFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBodyFuture")
            .field("inner", &self.inner)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseBodyFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<TimedResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let result = ready!(this.inner.as_mut().poll(cx));
        let finished = this.inner.finish();
        let limits = *this.limits;
        let ends = this.ends.take().unwrap_or_default();
        let result = result.map(|response| {
            let status = response.status();
            response.map(|inner| TimedResponseBody {
                timed: Timed {
                    inner: Some(inner),
                    // The total limit counts from the head: now.
                    clock: Clock::new(limits, Instant::now),
                    status,
                    bytes: 0,
                    ends,
                },
                tail: None,
            })
        });
        Poll::Ready(finished.respond(result, None))
    }
}

pin_project! {
    /// The response body of [`ResponseBodyTimeout`]: the inner body, ended when a limit fires
    /// (with a [`BodyTimeoutError`], or gRPC trailers with `DEADLINE_EXCEEDED`).
    pub struct TimedResponseBody<B> {
        #[pin]
        timed: Timed<B>,
        // Follows the body to its end when this layer records the request.
        tail: Option<Box<Tail>>,
    }
}

pin_project! {
    struct Timed<B> {
        // `None` once a limit ended it.
        #[pin]
        inner: Option<B>,
        #[pin]
        clock: Clock,
        status: StatusCode,
        bytes: u64,
        ends: Ends,
    }
}

impl<B> std::fmt::Debug for TimedResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimedResponseBody")
            .field("clock", &self.timed.clock)
            .field("ended", &self.timed.inner.is_none())
            .finish_non_exhaustive()
    }
}

impl<B> Body for Timed<B>
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
        let mut this = self.project();
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(None);
        };
        let polled = inner.poll_frame(cx);
        let Some(error) = this.clock.fired(cx, &polled, true) else {
            if let Poll::Ready(Some(Ok(frame))) = &polled {
                if let Some(data) = frame.data_ref() {
                    *this.bytes += data.remaining() as u64;
                }
            }
            return polled.map(|frame| frame.map(|frame| frame.map_err(Into::into)));
        };
        // Dropped with the frame, if one came too late: the limit passed.
        abandoning(|| {
            drop(polled);
            this.inner.set(None);
        });
        let ends = std::mem::take(this.ends);
        if let Some(gone) = &ends.gone {
            gone.abandon();
        }
        let outcome = Outcome::response_body_timeout(error.limit(), *this.status, *this.bytes);
        Poll::Ready(Some(end_stream(
            ends.exchange.as_deref(),
            ends.grpc,
            GrpcCode::DEADLINE_EXCEEDED,
            outcome,
            error,
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

impl<B> Body for TimedResponseBody<B>
where
    B: Body,
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
        poll_followed(this.tail, this.timed, cx)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.timed.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.timed.size_hint()
    }
}

impl<B> Followed for TimedResponseBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    fn follow(&mut self, tail: Tail) {
        self.tail = Some(Box::new(tail));
    }
}
