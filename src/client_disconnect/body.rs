use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Buf;
use http::{header::CONTENT_LENGTH, response::Parts, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::outcome::{Outcome, Phase};
use crate::record::Exchange;
use crate::signal::ClientGone;

pin_project! {
    /// The response body of [`ClientDisconnect`](super::ClientDisconnect): the inner body,
    /// watched for the client leaving before its end.
    pub struct DisconnectBody<B> {
        #[pin]
        inner: B,
        tracker: Option<Tracker>,
    }
}

impl<B> std::fmt::Debug for DisconnectBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DisconnectBody")
            .field("watching", &self.tracker.is_some())
            .finish_non_exhaustive()
    }
}

impl<B> DisconnectBody<B> {
    #[inline]
    pub(super) fn new(inner: B, tracker: Tracker) -> Self {
        DisconnectBody {
            inner,
            tracker: Some(tracker),
        }
    }

    /// A body an outer layer of the crate follows.
    #[inline]
    pub(super) fn passed(inner: B) -> Self {
        DisconnectBody {
            inner,
            tracker: None,
        }
    }

    /// The inner body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

/// Follows a body to its end; dropped before the end, it records a client that left.
pub(super) struct Tracker {
    exchange: Exchange,
    gone: Option<ClientGone>,
    status: StatusCode,
    /// The body's exact size, where it is known.
    expected: Option<u64>,
    bytes_sent: u64,
    complete: bool,
}

impl Tracker {
    #[inline]
    pub(super) fn new<B: Body>(
        exchange: Exchange,
        gone: Option<ClientGone>,
        parts: &Parts,
        body: &B,
        is_head: bool,
    ) -> Self {
        let status = parts.status;
        let no_body = is_head
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let expected = body.size_hint().exact().or_else(|| {
            parts
                .headers
                .get(CONTENT_LENGTH)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse().ok())
        });
        Tracker {
            exchange,
            gone,
            status,
            expected,
            bytes_sent: 0,
            complete: no_body || body.is_end_stream() || expected == Some(0),
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if self.complete {
            self.exchange.finish(Outcome::completed(self.status));
        } else if self.exchange.finish(Outcome::client_disconnected(
            Phase::DuringBody,
            Some(self.status),
            self.bytes_sent,
        )) {
            if let Some(gone) = &self.gone {
                gone.fire();
            }
        }
    }
}

impl<B> Body for DisconnectBody<B>
where
    B: Body,
{
    type Data = B::Data;
    type Error = B::Error;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let Some(tracker) = this.tracker.as_mut() else {
            return this.inner.poll_frame(cx);
        };
        let polled = tracker
            .exchange
            .guarded(Phase::DuringBody, Some(tracker.status), || {
                this.inner.as_mut().poll_frame(cx)
            });
        match &polled {
            Poll::Pending => return polled,
            Poll::Ready(None) => tracker.complete = true,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    tracker.bytes_sent += data.remaining() as u64;
                }
                tracker.complete = this.inner.is_end_stream()
                    || tracker
                        .expected
                        .is_some_and(|size| tracker.bytes_sent >= size);
            }
            Poll::Ready(Some(Err(_))) => {
                tracker
                    .exchange
                    .finish(Outcome::failed(Phase::DuringBody, Some(tracker.status)));
                tracker.complete = true;
            }
        }
        if tracker.complete {
            // Records the completion now rather than when the server drops the body.
            *this.tracker = None;
        }
        polled
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
