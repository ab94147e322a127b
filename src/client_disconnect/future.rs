use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

use super::body::DisconnectBody;
use crate::record::Guarded;
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
            if this.inner.is_dropped_by_server() {
                if let Some(gone) = this.gone.as_ref() {
                    gone.fire();
                }
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
    pub(super) fn new(inner: Guarded<F>, gone: Option<ClientGone>, is_head: bool) -> Self {
        ResponseFuture {
            inner,
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
        let Poll::Ready(result) = polled else {
            return Poll::Pending;
        };
        let result = result.map(|response| response.map(DisconnectBody::new));
        let gone = this.gone.take().map(|gone| (gone, *this.is_head));
        Poll::Ready(this.inner.respond(result, gone))
    }
}
