use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::record::{poll_followed, Followed, Tail};

pin_project! {
    /// The response body of [`ClientDisconnect`](super::ClientDisconnect): the inner body,
    /// followed to its end when someone could learn that the client left during it (the
    /// request's signal was asked for, or this layer records the request).
    pub struct DisconnectBody<B> {
        #[pin]
        inner: B,
        // Boxed, so that the body, which the server moves around, stays the size of the inner
        // one and a pointer when nothing follows it.
        tail: Option<Box<Tail>>,
    }
}

impl<B> std::fmt::Debug for DisconnectBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DisconnectBody")
            .field("following", &self.tail.is_some())
            .finish_non_exhaustive()
    }
}

impl<B> DisconnectBody<B> {
    #[inline]
    pub(super) fn new(inner: B) -> Self {
        DisconnectBody { inner, tail: None }
    }

    /// The inner body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B: Body> Followed for DisconnectBody<B> {
    fn follow(&mut self, tail: Tail) {
        self.tail = Some(Box::new(tail));
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
        let this = self.project();
        poll_followed(this.tail, this.inner, cx)
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
