use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::uri::Authority;
use http::{HeaderValue, Response};
use pin_project_lite::pin_project;

use super::classify::classify;
use super::{Answers, BoxError};
use crate::outcome::{Outcome, ProxyError};
use crate::record::{Guarded, Share};
use crate::response::{Generated, ResponseBody};

pin_project! {
    /// The response future of [`UpstreamFailure`](super::UpstreamFailure).
    pub struct UpstreamFuture<F> {
        #[pin]
        inner: Guarded<Call<F>>,
        answers: Answers,
        // The request's content-type, when it is gRPC.
        grpc: Option<HeaderValue>,
        // Where the call goes, when something can see a recording: for the server's log.
        authority: Option<Authority>,
    }
}

pin_project! {
    /// The client's call, or the error of its `poll_ready`, answered at the first poll.
    #[project = CallProj]
    pub(super) enum Call<F> {
        Called { #[pin] future: F },
        NotReady { error: Option<BoxError> },
    }
}

impl<F, B, E> Future for Call<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<B>, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            CallProj::Called { future } => future.poll(cx).map_err(Into::into),
            CallProj::NotReady { error } => Poll::Ready(Err(error
                .take()
                .expect("an UpstreamFuture polled after completion"))),
        }
    }
}

impl<F> std::fmt::Debug for UpstreamFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamFuture")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<F> UpstreamFuture<F> {
    pub(super) fn new(
        call: Call<F>,
        share: Share,
        answers: Answers,
        grpc: Option<HeaderValue>,
        authority: Option<Authority>,
    ) -> Self {
        UpstreamFuture {
            inner: Guarded::new(call, share),
            answers,
            grpc,
            authority,
        }
    }
}

impl<F, B, E> Future for UpstreamFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body,
    B::Data: From<bytes::Bytes>,
    E: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let mut response = match ready!(this.inner.as_mut().poll(cx)) {
            Ok(response) if this.grpc.is_some() => {
                // A gRPC stream the upstream breaks off after the head ends with a status.
                let broken = Outcome::upstream_failed(
                    ProxyError::ConnectionTerminated,
                    this.answers
                        .statuses
                        .upstream_failed(ProxyError::ConnectionTerminated),
                );
                let code = this.answers.responses.grpc_code(&broken);
                Ok(response.map(|body| ResponseBody::new(body).ending_grpc_with(code, BROKEN_OFF)))
            }
            Ok(response) => Ok(response.map(ResponseBody::new)),
            Err(error) => {
                let outcome = classify(&*error, &this.answers.statuses);
                let details = this.answers.details.then(|| innermost(&*error).to_string());
                Ok(this.answers.responses.generate_with_details(
                    outcome,
                    details.as_deref(),
                    this.grpc.as_ref(),
                ))
            }
        };
        // A generated answer, ours or a layer's inside (a response timeout), says where the call
        // went, for the server's log.
        if let (Some(authority), Ok(response)) = (this.authority.take(), &mut response) {
            if let Some(generated) = response.extensions_mut().get_mut::<Generated>() {
                generated.set_upstream(authority);
            }
        }
        Poll::Ready(this.inner.finish().respond(response, None))
    }
}

/// The `grpc-message` of a gRPC stream the upstream broke off after the head.
const BROKEN_OFF: &str =
    "tower-timeouts: the upstream broke off the response (connection_terminated)";

fn innermost<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> &'a (dyn std::error::Error + 'static) {
    let mut error = error;
    while let Some(source) = error.source() {
        error = source;
    }
    error
}
