use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

use super::body::DisconnectBody;
use crate::record::{Guarded, Share};
use crate::signal::ClientGone;

pin_project! {
    /// The response future of [`ClientDisconnect`](super::ClientDisconnect).
    pub struct ResponseFuture<F> {
        #[pin]
        inner: Guarded<F>,
        // The request's signal, once someone asked for it.
        gone: Option<ClientGone>,
        is_head: bool,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // The inner future is dropped after this, by its guard, in the same extent.
            if let (Some(reason), Some(gone)) = (this.inner.early_drop_reason(), this.gone.as_ref()) {
                gone.cancel_for(reason);
            }
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("inner", &self.inner)
            .field("gone", &self.gone)
            .finish_non_exhaustive()
    }
}

impl<F> ResponseFuture<F> {
    #[inline(always)]
    pub(super) fn new(inner: F, share: Share, gone: Option<ClientGone>, is_head: bool) -> Self {
        ResponseFuture {
            inner: Guarded::new(inner, share),
            gone,
            is_head,
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body,
{
    type Output = Result<Response<DisconnectBody<B>>, E>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let scope = ClientGone::enter(this.gone.take());
        let polled = this.inner.as_mut().poll(cx);
        *this.gone = scope.leave();
        if polled.is_pending() {
            return Poll::Pending;
        }
        let finished = this.inner.finish();
        // The response is mapped where it is (no binding to move it into), and in each branch,
        // so that it is written straight where it goes.
        let wrap = |result: Result<Response<B>, E>| result.map(|r| r.map(DisconnectBody::new));
        if finished.is_nothing(this.gone.as_ref()) {
            return polled.map(wrap);
        }
        let gone = this.gone.take().map(|gone| (gone, *this.is_head));
        polled.map(|result| finished.respond(wrap(result), gone))
    }
}
