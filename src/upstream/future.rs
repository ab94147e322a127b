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

    impl<F> PinnedDrop for UpstreamFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            let mut this = this.project();
            if this.inner.is_some() || this.failed.is_some() {
                this.share.drop_inner(|| this.inner.set(None));
                this.share.dropped();
            }
        }
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
    /// The inner future, or the error of `poll_ready` to answer at the first poll.
    pub(super) fn new(inner: Result<F, BoxError>, share: Share, config: Arc<Config>) -> Self {
        let (inner, failed) = match inner {
            Ok(inner) => (Some(inner), None),
            Err(error) => (None, Some(error)),
        };
        UpstreamFuture {
            inner,
            failed,
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
        let mut this = self.project();
        let error = match (this.inner.as_mut().as_pin_mut(), this.failed.take()) {
            (_, Some(error)) => error,
            (Some(inner), None) => {
                let result = std::task::ready!(this.share.poll(inner, cx));
                // Finished: nothing inside has anything left to record.
                this.inner.set(None);
                match result {
                    Ok(response) => {
                        let result = Ok::<_, Infallible>(response.map(ResponseBody::new));
                        this.share.head(&result);
                        return Poll::Ready(result);
                    }
                    Err(error) => error.into(),
                }
            }
            (None, None) => panic!("UpstreamFuture polled after completion"),
        };
        let outcome = classify(&*error, &this.config.statuses);
        this.share.decide(outcome.clone());
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
