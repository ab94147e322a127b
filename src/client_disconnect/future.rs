use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

use super::body::{DisconnectBody, Tracker};
use crate::outcome::{Outcome, Phase};
use crate::record::{head_outcome, Share};
use crate::response::Generated;
use crate::signal::ClientGone;

pin_project! {
    /// The response future of [`ClientDisconnect`](super::ClientDisconnect).
    pub struct ResponseFuture<F> {
        // `None` once the response (or an error) is produced; still here on drop means the
        // client left before the head.
        #[pin]
        inner: Option<F>,
        share: Share,
        gone: Option<ClientGone>,
        is_head: bool,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            let mut this = this.project();
            if this.inner.is_none() {
                return;
            }
            // Recorded before the inner future is dropped: the request's outcome.
            if this.share.decide(Outcome::client_disconnected(Phase::BeforeHead, None, 0)) {
                if let Some(gone) = this.gone.as_ref() {
                    gone.fire();
                }
            }
            this.share.drop_inner(|| this.inner.set(None));
        }
    }
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("share", &self.share)
            .field("gone", &self.gone)
            .finish_non_exhaustive()
    }
}

impl<F> ResponseFuture<F> {
    #[inline]
    pub(super) fn new(inner: F, share: Share, gone: Option<ClientGone>, is_head: bool) -> Self {
        ResponseFuture {
            inner: Some(inner),
            share,
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
        let inner = this
            .inner
            .as_mut()
            .as_pin_mut()
            .expect("ResponseFuture polled after completion");
        let scope = ClientGone::enter(this.gone.take());
        let polled = this.share.poll(inner, cx);
        *this.gone = scope.leave();
        let Poll::Ready(result) = polled else {
            return Poll::Pending;
        };
        // Finished: nothing inside has anything left to record.
        this.inner.set(None);
        Poll::Ready(match result {
            Ok(response) => {
                // The owner follows the body; a layer that joined leaves it to the owner.
                let Some(exchange) = this.share.take_exchange() else {
                    return Poll::Ready(Ok(response.map(DisconnectBody::passed)));
                };
                // A response of ours: its outcome is already the request's (or, made under
                // another request's exchange, it is recorded here and now).
                if response.extensions().get::<Generated>().is_some() {
                    exchange.finish(head_outcome(&response));
                }
                let (parts, body) = response.into_parts();
                let tracker =
                    Tracker::new(exchange, this.gone.take(), &parts, &body, *this.is_head);
                Ok(Response::from_parts(
                    parts,
                    DisconnectBody::new(body, tracker),
                ))
            }
            Err(error) => {
                this.share.decide(Outcome::failed(Phase::BeforeHead, None));
                Err(error)
            }
        })
    }
}
