//! Following a response body to its end: for the layer that records the request (when a layer
//! on it watches for clients that leave), and for a [`ClientGone`] that fires if the client
//! leaves before the end.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Buf;
use http::header::CONTENT_LENGTH;
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame};

use super::exchange::Exchange;
use super::extent;
use crate::grpc::GrpcCode;
use crate::outcome::{Outcome, Phase};
use crate::signal::ClientGone;

/// How far a response body got, and whether it counts as complete.
///
/// Hyper finishes some bodies without polling them to their end, so a body counts as complete
/// when it returned its end, or `is_end_stream()` was true, or the bytes sent reached its exact
/// size (`size_hint` or `content-length`), or the response has no body by definition (a HEAD
/// request, 1xx, 204, 304). Measured in `tests/client_disconnect.rs`.
#[derive(Debug)]
struct Progress {
    status: StatusCode,
    /// The body's exact size, where it is known.
    expected: Option<u64>,
    bytes: u64,
    complete: bool,
}

impl Progress {
    fn new<B: Body>(status: StatusCode, headers: &HeaderMap, body: &B, is_head: bool) -> Self {
        let no_body = is_head
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let expected = body.size_hint().exact().or_else(|| {
            headers
                .get(CONTENT_LENGTH)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse().ok())
        });
        Progress {
            status,
            expected,
            bytes: 0,
            complete: no_body || body.is_end_stream() || expected == Some(0),
        }
    }
}

/// What a body's `poll_frame` returns.
type PolledFrame<B> = Poll<Option<Result<Frame<<B as Body>::Data>, <B as Body>::Error>>>;

/// Follows a body to its end. Dropped before the end, it fires the signal (when the server
/// dropped it: the client left) and tells the recording layer.
#[derive(Debug)]
pub(crate) struct Tail {
    progress: Progress,
    /// The exchange, when the layer that holds this tail records the request.
    owner: Option<Arc<Exchange>>,
    gone: Option<ClientGone>,
    /// The gRPC status the body sends in place of an error of its inner body.
    ending: Option<GrpcCode>,
    /// Set while the body is polled: still set when the tail is dropped, that poll panicked.
    polling: bool,
}

impl Tail {
    /// A tail for `body`, or `None` when there is nothing to follow (no exchange and no signal)
    /// or the body is complete already (then the recording layer records at once).
    pub(crate) fn new<B: Body>(
        owner: Option<Arc<Exchange>>,
        gone: Option<ClientGone>,
        status: StatusCode,
        headers: &HeaderMap,
        body: &B,
        is_head: bool,
    ) -> Option<Self> {
        if owner.is_none() && gone.is_none() {
            return None;
        }
        let tail = Tail {
            progress: Progress::new(status, headers, body, is_head),
            owner,
            gone,
            ending: None,
            polling: false,
        };
        // Complete already: dropped here, it records the end.
        (!tail.progress.complete).then_some(tail)
    }

    /// Records `ending` as the gRPC status when the body fails: the status the body sends in
    /// its place.
    pub(crate) fn ending(mut self, ending: Option<GrpcCode>) -> Self {
        self.ending = ending;
        self
    }

    /// Polls `body` on the tail's behalf. Drop the tail once it [`is_done`](Tail::is_done): that
    /// records the end.
    #[inline]
    fn poll_frame<B: Body>(
        &mut self,
        mut body: Pin<&mut B>,
        cx: &mut Context<'_>,
    ) -> PolledFrame<B> {
        self.polling = true;
        let polled = body.as_mut().poll_frame(cx);
        self.polling = false;
        let progress = &mut self.progress;
        match &polled {
            Poll::Pending => {}
            Poll::Ready(None) => progress.complete = true,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    progress.bytes += data.remaining() as u64;
                } else if let (Some(trailers), Some(owner)) = (frame.trailers_ref(), &self.owner) {
                    owner.grpc_status_in(trailers);
                }
                progress.complete = body.is_end_stream()
                    || progress.expected.is_some_and(|size| progress.bytes >= size);
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(gone) = &self.gone {
                    gone.abandon();
                }
                let failed = Outcome::failed(Phase::DuringBody, Some(progress.status));
                if let Some(owner) = self.owner.take() {
                    if let Some(code) = self.ending {
                        owner.set_grpc_status(code);
                    }
                    owner.step(|stage| stage.end(failed));
                }
                progress.complete = true;
            }
        }
        polled
    }

    /// Whether the body is complete (or failed): nothing more to follow.
    #[inline]
    fn is_done(&self) -> bool {
        self.progress.complete
    }
}

/// Polls `body`, through `tail` when there is one; drops the tail once the body is done,
/// which records the end then rather than when the server drops the body.
#[inline]
pub(crate) fn poll_followed<B: Body>(
    tail: &mut Option<Box<Tail>>,
    body: Pin<&mut B>,
    cx: &mut Context<'_>,
) -> PolledFrame<B> {
    let Some(following) = tail else {
        return body.poll_frame(cx);
    };
    let polled = following.poll_frame(body, cx);
    if following.is_done() {
        *tail = None;
    }
    polled
}

impl Drop for Tail {
    fn drop(&mut self) {
        let progress = &self.progress;
        if progress.complete {
            if let Some(owner) = &self.owner {
                owner.step(|stage| stage.body_end());
            }
            return;
        }
        if self.polling {
            if let Some(owner) = &self.owner {
                let panicked = Outcome::panicked(Phase::DuringBody, Some(progress.status));
                owner.step(|stage| stage.end(panicked));
            }
            return;
        }
        let reason = extent::drop_reason(false);
        if let Some(gone) = &self.gone {
            gone.cancel_for(reason);
        }
        if let Some(owner) = &self.owner {
            owner.dropped(reason, Some((progress.status, progress.bytes)));
        }
    }
}
