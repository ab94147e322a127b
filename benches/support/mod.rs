//! What the benches share: the inner future that is pending once, the way a request is driven,
//! and the subscriber that records our span; [`report`] for the benches that write results.
#![allow(dead_code, unreachable_pub)]

pub mod report;

use std::fmt;
use std::future::{poll_fn, Future};
use std::hint::black_box;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{Empty, Full};
use tower::{Service, ServiceExt};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Dispatch, Event, Subscriber};
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

pub type ReqBody = Empty<Bytes>;

/// Ready at once, or pending once (after waking its task, so the task is scheduled again).
#[derive(Debug)]
pub struct PendingOnce<T> {
    pub value: Option<T>,
    pub pending: bool,
}

impl<T: Unpin> Future for PendingOnce<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        if self.pending {
            self.pending = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(self.value.take().expect("polled after completion"))
    }
}

/// The inner service of the per-request benches: answers a small `Full` body, at once or
/// after one pending poll.
#[derive(Clone, Copy, Debug)]
pub struct Inner {
    pub pending_once: bool,
}

impl<B> Service<Request<B>> for Inner {
    type Response = Response<Full<Bytes>>;
    type Error = std::convert::Infallible;
    type Future = PendingOnce<Result<Response<Full<Bytes>>, std::convert::Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<B>) -> Self::Future {
        PendingOnce {
            value: Some(Ok(Response::new(Full::new(Bytes::from_static(
                b"hello, world",
            ))))),
            pending: self.pending_once,
        }
    }
}

/// One request, end to end, as a server would drive it.
pub async fn serve_one<S, B>(service: &mut S)
where
    S: Service<Request<ReqBody>, Response = Response<B>>,
    S::Error: fmt::Debug,
    B: Body,
{
    let response = service
        .ready()
        .await
        .expect("ready")
        .call(Request::new(ReqBody::new()))
        .await
        .expect("response");
    let (parts, body) = response.into_parts();
    black_box(&parts);
    // As hyper does for a `Full` body: frames until `is_end_stream()`, then drop.
    let mut body = pin!(body);
    while !body.is_end_stream() {
        match poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            Some(frame) => drop(black_box(frame.ok())),
            None => break,
        }
    }
}

/// A subscriber that records every field of every span and event: a registry, and a layer
/// that formats each value into a byte counter (so it pays for the values, not for a writer).
pub fn subscriber() -> Dispatch {
    Dispatch::new(tracing_subscriber::registry().with(FieldRecorder))
}

struct FieldRecorder;

impl<S> Layer<S> for FieldRecorder
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: LayerContext<'_, S>) {
        attrs.record(&mut Counter(0));
    }

    fn on_record(&self, _: &Id, values: &Record<'_>, _: LayerContext<'_, S>) {
        values.record(&mut Counter(0));
    }

    fn on_event(&self, event: &Event<'_>, _: LayerContext<'_, S>) {
        event.record(&mut Counter(0));
    }
}

/// Counts the bytes of the formatted field names and values.
struct Counter(usize);

impl fmt::Write for Counter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0 += s.len();
        Ok(())
    }
}

impl Visit for Counter {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        use fmt::Write as _;
        let _ = write!(self, "{}={value:?}", field.name());
        black_box(self.0);
    }
}
