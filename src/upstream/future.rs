use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

use super::classify::classify;
use super::{BoxError, Config};
use crate::record::Share;
use crate::response::ResponseBody;

pin_project! {
    /// The response future of [`UpstreamFailure`](super::UpstreamFailure).
    pub struct UpstreamFuture<F> {
        #[pin]
        inner: Option<F>,
        // An error of `poll_ready`, answered at the first poll.
        failed: Option<BoxError>,
        share: Share,
        config: Arc<Config>,
    }
}

impl<F> std::fmt::Debug for UpstreamFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamFuture")
            .field("share", &self.share)
            .finish_non_exhaustive()
    }
}

impl<F> UpstreamFuture<F> {
    pub(super) fn new(inner: F, share: Share, config: Arc<Config>) -> Self {
        UpstreamFuture {
            inner: Some(inner),
            failed: None,
            share,
            config,
        }
    }

    pub(super) fn failed(error: BoxError, share: Share, config: Arc<Config>) -> Self {
        UpstreamFuture {
            inner: None,
            failed: Some(error),
            share,
            config,
        }
    }
}

impl<F, B, E> Future for UpstreamFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.share.enter();
        let error = match (this.inner.as_pin_mut(), this.failed.take()) {
            (_, Some(error)) => error,
            (Some(inner), None) => match std::task::ready!(this.share.poll(inner, cx)) {
                Ok(response) => {
                    let result = Ok::<_, Infallible>(response.map(ResponseBody::new));
                    this.share.head(&result);
                    return Poll::Ready(result);
                }
                Err(error) => error.into(),
            },
            (None, None) => panic!("UpstreamFuture polled after completion"),
        };
        let outcome = classify(&*error, &this.config.statuses);
        this.share.exchange().finish(outcome.clone());
        let details = this.config.details.then(|| innermost(&*error).to_string());
        Poll::Ready(Ok(this
            .config
            .responses
            .generate_with_details(outcome, details.as_deref())))
    }
}

fn innermost<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> &'a (dyn std::error::Error + 'static) {
    let mut error = error;
    while let Some(source) = error.source() {
        error = source;
    }
    error
}
