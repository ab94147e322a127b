use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

use super::body::{DisconnectBody, Tracker};
use crate::outcome::{Outcome, Phase};
use crate::record::{head_outcome, Exchange, PanicGuard};
use crate::response::Generated;
use crate::signal::ClientGone;

pin_project! {
    /// The response future of [`ClientDisconnect`](super::ClientDisconnect).
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // Taken when the response (or an error) is produced; still here on drop means the
        // client left before the head.
        watch: Option<Watch>,
        owner: bool,
        is_head: bool,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(watch) = this.project().watch.take() {
                if watch.exchange.finish(Outcome::client_disconnected(Phase::BeforeHead, None, 0)) {
                    watch.gone.fire();
                }
            }
        }
    }
}

struct Watch {
    exchange: Arc<Exchange>,
    gone: ClientGone,
}

impl<F> std::fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("exchange", &self.watch.as_ref().map(|w| &w.exchange))
            .finish_non_exhaustive()
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn new(
        inner: F,
        exchange: Arc<Exchange>,
        owner: bool,
        gone: ClientGone,
        is_head: bool,
    ) -> Self {
        ResponseFuture {
            inner,
            watch: Some(Watch { exchange, gone }),
            owner,
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

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let watch = this
            .watch
            .as_ref()
            .expect("ResponseFuture polled after completion");
        let _entered = this.owner.then(|| watch.exchange.span().enter());
        let guard = PanicGuard::new(&watch.exchange, Outcome::panicked(Phase::BeforeHead, None));
        let polled = this.inner.poll(cx);
        guard.disarm();
        let Poll::Ready(result) = polled else {
            return Poll::Pending;
        };
        drop(_entered);
        let Some(Watch { exchange, gone }) = this.watch.take() else {
            unreachable!("checked above");
        };
        Poll::Ready(match result {
            Ok(response) => {
                // A response of ours: its outcome is already the request's (or, made under
                // another request's exchange, it is recorded here and now).
                if response.extensions().get::<Generated>().is_some() {
                    exchange.finish(head_outcome(&response));
                }
                let (parts, body) = response.into_parts();
                let tracker = Tracker::new(exchange, gone, &parts, &body, *this.is_head);
                Ok(Response::from_parts(
                    parts,
                    DisconnectBody::new(body, tracker),
                ))
            }
            Err(error) => {
                exchange.finish(Outcome::failed(Phase::BeforeHead, None));
                Err(error)
            }
        })
    }
}
