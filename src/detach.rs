//! Let handlers run to their end when their client leaves: for work that is not cancel-safe.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use axum::{routing::post, Router};
//! use tower::ServiceBuilder;
//! use tower_timeouts::{ClientDisconnectLayer, DetachLayer};
//!
//! async fn transfer() -> &'static str {
//!     // A transaction that must not be cut in half.
//!     "done"
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let detach = DetachLayer::new(Duration::from_secs(30));
//! let tracker = detach.tracker();
//! let app: Router = Router::new().route("/transfer", post(transfer)).layer(
//!     ServiceBuilder::new()
//!         .layer(ClientDisconnectLayer::new())
//!         // Innermost, closest to the handler.
//!         .layer(detach),
//! );
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! axum::serve(listener, app)
//!     .with_graceful_shutdown(shutdown_signal())
//!     .await?;
//! // The server is done; detached handlers get up to 10 s more.
//! tracker.close();
//! if tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await.is_err() {
//!     eprintln!("detached handlers still running at shutdown");
//! }
//! # Ok(())
//! # }
//! # async fn shutdown_signal() {}
//! ```
//!
//! # Behaviour
//!
//! - [`Detach`] calls the inner service as usual, then runs its future on a task of its own,
//!   and its response future waits for that task's output.
//! - When the response future is dropped before the output arrived (the client left, or a
//!   timeout outside gave up), the task is not stopped: the handler runs on, for at most the
//!   layer's limit from that moment. At the limit, the handler's future is dropped.
//! - While the task polls the handler, the request looks served: its span is entered, the
//!   [deadline in force](crate::Deadline::current) at `call` is in force, and
//!   [`ClientGone::current`](crate::ClientGone::current) is the request's signal, which fires
//!   when the client leaves, so that a handler that can stop early may.
//! - How detached work ends (and only detached work) is recorded once: an event on the
//!   request's span (see [below](#what-is-recorded)) and the
//!   [`on_finish`](DetachLayer::on_finish) hook.
//! - A handler that panics while its client is still there panics in the response future, so
//!   that the layers outside record a panic as they would without this layer.
//! - The response and the error pass through unchanged.
//!
//! Each request costs a task and a channel, and the request's signal is made at `call` (one
//! allocation) when a [`ClientDisconnectLayer`](crate::ClientDisconnectLayer) is outside.
//!
//! # Where to put it
//!
//! Inside [`ClientDisconnectLayer`](crate::ClientDisconnectLayer) and
//! [`ResponseTimeoutLayer`](crate::ResponseTimeoutLayer), closest to the handler. The layers
//! outside then see the client leave, or time out, as usual: a 499 is recorded, a 504 is
//! answered. A crate layer inside it runs in the task and never sees the client leave, and a
//! `ResponseTimeoutLayer` inside it would drop the handler at its limit, detached or not.
//!
//! It is opt-in per route: `Router::route_layer`, or `.layer` on a `MethodRouter`, puts it on
//! the routes whose handlers must not be cut, under a `ClientDisconnectLayer` on the whole
//! router.
//!
//! # What is recorded
//!
//! When detached work ends, an event named by the request's span as its parent:
//! `tower_timeouts.detached` is `completed` (INFO, with `http.response.status_code`), `failed`
//! (WARN, the inner service returned an error), `panicked` (ERROR) or `cut` (WARN, with
//! `tower_timeouts.timeout_ms`, the limit). `elapsed_ms` is the time since the work was
//! detached. The request's span stays open until then.
//!
//! # Graceful shutdown
//!
//! A server's graceful shutdown waits for its connections, not for detached work. Every task
//! is tracked by the layer's [`TaskTracker`] (shared across layers with
//! [`with_tracker`](DetachLayer::with_tracker)): once the server is done,
//! `tracker.close()` then `tokio::time::timeout(cap, tracker.wait())` waits for detached work
//! up to `cap`. Work still running when the runtime shuts down is dropped.

use std::fmt;
use std::future::{poll_fn, Future};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tower_layer::Layer;
use tower_service::Service;
use tracing::{Level, Span};

use crate::deadline::{self, Scoped};
use crate::record::{abandoning, polling};
use crate::signal::ClientGone;
use crate::trace::{self, DETACHED, HTTP_RESPONSE_STATUS_CODE, TIMEOUT_MS};

type OnFinish = Arc<dyn Fn(&Finished) + Send + Sync>;

/// What the task hands the response future: the inner future's output, or its panic.
type Output<B, E> = std::thread::Result<Result<Response<B>, E>>;

/// How detached work ended: what the [`on_finish`](DetachLayer::on_finish) hook is told.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Finished {
    /// The handler returned a response, which nobody received.
    Completed {
        /// The response's status.
        status: StatusCode,
    },
    /// The inner service returned an error.
    Failed,
    /// The handler panicked.
    Panicked,
    /// The handler was still running at the limit, counted from when it was detached, and was
    /// dropped.
    Cut {
        /// The layer's limit.
        limit: Duration,
    },
}

impl Finished {
    fn of<B, E>(output: &Output<B, E>) -> Self {
        match output {
            Ok(Ok(response)) => Finished::Completed {
                status: response.status(),
            },
            Ok(Err(_)) => Finished::Failed,
            Err(_) => Finished::Panicked,
        }
    }
}

/// A layer's configuration: the layer holds it and each of its services a clone.
#[derive(Clone)]
struct Config {
    limit: Duration,
    tracker: TaskTracker,
    on_finish: Option<OnFinish>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("limit", &self.limit)
            .field("tracker", &self.tracker)
            .field("on_finish", &self.on_finish.as_ref().map(|_| ".."))
            .finish()
    }
}

/// Applies [`Detach`] to a service.
///
/// ```
/// use std::time::Duration;
/// use tower_timeouts::detach::{DetachLayer, Finished};
///
/// let layer = DetachLayer::new(Duration::from_secs(30)).on_finish(|finished: &Finished| {
///     if let Finished::Cut { limit } = finished {
///         eprintln!("a detached handler was cut after {limit:?}");
///     }
/// });
/// # let _ = layer;
/// ```
#[derive(Clone, Debug)]
pub struct DetachLayer {
    config: Config,
}

impl DetachLayer {
    /// A layer whose handlers run on for at most `limit` once detached, tracked by a
    /// [`TaskTracker`] of its own.
    pub fn new(limit: Duration) -> Self {
        DetachLayer {
            config: Config {
                limit,
                tracker: TaskTracker::new(),
                on_finish: None,
            },
        }
    }

    /// The tracker of the layer's tasks, to wait for detached work at shutdown (see the
    /// [module docs](crate::detach#graceful-shutdown)).
    pub fn tracker(&self) -> TaskTracker {
        self.config.tracker.clone()
    }

    /// Tracks the layer's tasks with `tracker`, so that one tracker waits for several layers.
    pub fn with_tracker(mut self, tracker: TaskTracker) -> Self {
        self.config.tracker = tracker;
        self
    }

    /// Calls `hook` once when detached work ends (work whose response future was dropped
    /// before the output arrived), never for work whose response was received. A hook that
    /// panics is caught and reported as an ERROR event.
    pub fn on_finish(mut self, hook: impl Fn(&Finished) + Send + Sync + 'static) -> Self {
        self.config.on_finish = Some(Arc::new(hook));
        self
    }
}

impl<S> Layer<S> for DetachLayer {
    type Service = Detach<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Detach {
            inner,
            config: self.config.clone(),
        }
    }
}

/// Runs the inner future on a task that outlives the response future, for a limited time.
///
/// Made by [`DetachLayer`]; see the [module docs](crate::detach).
///
/// # Panics
///
/// `call` panics outside a Tokio runtime (it spawns a task).
#[derive(Clone, Debug)]
pub struct Detach<S> {
    inner: S,
    config: Config,
}

impl<S> Detach<S> {
    /// Wraps `inner`, with handlers that run on for at most `limit` once detached.
    pub fn new(inner: S, limit: Duration) -> Self {
        DetachLayer::new(limit).layer(inner)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Detach<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        // The request's span, signal and deadline are in force only while the layers outside
        // call this one (the recording layer enters the span, a ClientDisconnect puts its
        // signal in, a ResponseTimeout its deadline): taken now, for the task.
        let span = Span::current();
        let gone = ClientGone::current();
        let inner = deadline::carry(self.inner.call(request));
        let (tx, rx) = oneshot::channel();
        let recording = Recording {
            span,
            on_finish: self.config.on_finish.clone(),
        };
        let task = run(inner, gone, tx, self.config.limit, recording.clone());
        self.config.tracker.spawn(task);
        ResponseFuture {
            rx: Some(rx),
            recording,
        }
    }
}

/// The task: the inner future, attached to its response future until that is dropped, then
/// detached and bounded by `limit`.
async fn run<F, B, E>(
    inner: Scoped<F>,
    gone: Option<ClientGone>,
    mut tx: oneshot::Sender<Output<B, E>>,
    limit: Duration,
    recording: Recording,
) where
    F: Future<Output = Result<Response<B>, E>>,
{
    let (finished, detached) = {
        let mut work = pin!(Work {
            inner: Some(inner),
            span: &recording.span,
            gone,
        });
        // The handler is polled first: one that finished as its response future was dropped
        // was not cut.
        let attached = poll_fn(|cx| match work.as_mut().poll(cx) {
            Poll::Ready(output) => Poll::Ready(Some(output)),
            Poll::Pending => tx.poll_closed(cx).map(|()| None),
        })
        .await;
        match attached {
            Some(output) => match tx.send(output) {
                Ok(()) => return,
                // Dropped as the output arrived: nobody received it.
                Err(output) => (Finished::of(&output), Instant::now()),
            },
            None => {
                let detached = Instant::now();
                match tokio::time::timeout(limit, work.as_mut()).await {
                    Ok(output) => (Finished::of(&output), detached),
                    Err(_) => {
                        // Dropped before the cut is recorded, as abandoned: no layer inside
                        // takes it for a client leaving.
                        work.cut();
                        (Finished::Cut { limit }, detached)
                    }
                }
            }
        }
    };
    recording.finish(&finished, detached.elapsed());
}

pin_project! {
    /// The inner future as the task polls it: as if the request were still being served, with
    /// a panic caught.
    struct Work<'a, F> {
        // `None` once cut.
        #[pin]
        inner: Option<Scoped<F>>,
        span: &'a Span,
        gone: Option<ClientGone>,
    }
}

impl<F> Work<'_, F> {
    /// Drops the handler's future, as abandoned.
    fn cut(self: Pin<&mut Self>) {
        let mut inner = self.project().inner;
        abandoning(|| inner.set(None));
    }
}

impl<F: Future> Future for Work<'_, F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Pending;
        };
        let _entered = this.span.enter();
        // Entered only when there is one: entering none would make the handler a signal of its
        // own, which nothing fires.
        let scope = this.gone.take().map(|gone| ClientGone::enter(Some(gone)));
        // As the crate's layers poll: a request the handler makes is an upstream call.
        let polled = catch_unwind(AssertUnwindSafe(|| polling(|| inner.poll(cx))));
        *this.gone = scope.and_then(|scope| scope.leave());
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// Where the end of detached work is recorded.
#[derive(Clone)]
struct Recording {
    span: Span,
    on_finish: Option<OnFinish>,
}

impl Recording {
    fn finish(&self, finished: &Finished, elapsed: Duration) {
        let (kind, level, status, limit_ms) = match finished {
            Finished::Completed { status } => (
                "completed",
                Level::INFO,
                Some(i64::from(status.as_u16())),
                None,
            ),
            Finished::Failed => ("failed", Level::WARN, None, None),
            Finished::Panicked => ("panicked", Level::ERROR, None, None),
            Finished::Cut { limit } => ("cut", Level::WARN, None, Some(trace::duration_ms(*limit))),
        };
        let elapsed_ms = trace::duration_ms(elapsed);
        macro_rules! emit {
            ($level:expr) => {
                tracing::event!(
                    parent: &self.span,
                    $level,
                    { DETACHED } = kind,
                    { HTTP_RESPONSE_STATUS_CODE } = status,
                    { TIMEOUT_MS } = limit_ms,
                    elapsed_ms,
                    "tower-timeouts: detached handler finished",
                )
            };
        }
        match level {
            Level::INFO => emit!(Level::INFO),
            Level::WARN => emit!(Level::WARN),
            _ => emit!(Level::ERROR),
        }
        if let Some(hook) = &self.on_finish {
            if catch_unwind(AssertUnwindSafe(|| hook(finished))).is_err() {
                tracing::error!(parent: &self.span, "tower-timeouts: the on_finish hook panicked");
            }
        }
    }
}

/// The response future of [`Detach`]: waits for the output of the task that runs the inner
/// future. Dropped before it arrives, it leaves the task running, detached.
pub struct ResponseFuture<B, E> {
    rx: Option<oneshot::Receiver<Output<B, E>>>,
    recording: Recording,
}

impl<B, E> fmt::Debug for ResponseFuture<B, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("done", &self.rx.is_none())
            .finish_non_exhaustive()
    }
}

impl<B, E> Future for ResponseFuture<B, E> {
    type Output = Result<Response<B>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let rx = self
            .rx
            .as_mut()
            .expect("a tower-timeouts response future was polled after it completed");
        let output = ready!(Pin::new(rx).poll(cx));
        self.rx = None;
        match output {
            Ok(Ok(result)) => Poll::Ready(result),
            // The client is still there: the panic goes on, for the layers outside to record.
            Ok(Err(panic)) => resume_unwind(panic),
            Err(_) => panic!(
                "tower-timeouts: the task running a handler was dropped (its runtime shut down)"
            ),
        }
    }
}

impl<B, E> Drop for ResponseFuture<B, E> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        // Closed first: an output sent before is found here, and any later `send` fails, so
        // that the task records it. Either way, once.
        rx.close();
        if let Ok(output) = rx.try_recv() {
            self.recording
                .finish(&Finished::of(&output), Duration::ZERO);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use tower::{service_fn, ServiceBuilder, ServiceExt};

    use super::*;
    use crate::{ClientDisconnectLayer, Deadline, ResponseTimeoutLayer};

    /// Collects what the `on_finish` hook is told.
    #[derive(Clone, Default)]
    struct Ends(Arc<Mutex<Vec<Finished>>>);

    impl Ends {
        fn layer(&self, limit: Duration) -> DetachLayer {
            let ends = self.0.clone();
            DetachLayer::new(limit).on_finish(move |end: &Finished| {
                ends.lock().unwrap().push(end.clone());
            })
        }

        fn all(&self) -> Vec<Finished> {
            self.0.lock().unwrap().clone()
        }
    }

    type Result = std::result::Result<Response<&'static str>, Infallible>;

    /// A handler that takes `work`, then counts itself done and answers `status`.
    fn handler(
        work: Duration,
        status: StatusCode,
        done: Arc<AtomicUsize>,
    ) -> impl Service<Request<()>, Response = Response<&'static str>, Error = Infallible, Future: Send>
           + Clone {
        service_fn(move |_: Request<()>| {
            let done = done.clone();
            async move {
                tokio::time::sleep(work).await;
                done.fetch_add(1, Ordering::SeqCst);
                let mut response = Response::new("done");
                *response.status_mut() = status;
                Result::Ok(response)
            }
        })
    }

    /// Polls `future` once, then drops it: the client left while the handler was running.
    async fn leave<F: Future + Unpin>(mut future: F) {
        assert!(
            tokio::time::timeout(Duration::ZERO, &mut future)
                .await
                .is_err(),
            "the response arrived before the client left"
        );
        drop(future);
    }

    #[tokio::test(start_paused = true)]
    async fn the_output_passes_through_while_the_client_waits() {
        let ends = Ends::default();
        let done = Arc::new(AtomicUsize::new(0));
        let service = ends.layer(Duration::from_secs(1)).layer(handler(
            Duration::from_secs(3),
            StatusCode::CREATED,
            done,
        ));
        let response = service.oneshot(Request::new(())).await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(*response.body(), "done");

        let failing =
            ends.layer(Duration::from_secs(1))
                .layer(service_fn(|_: Request<()>| async {
                    std::result::Result::<Response<()>, &str>::Err("boom")
                }));
        assert_eq!(failing.oneshot(Request::new(())).await.unwrap_err(), "boom");
        assert_eq!(ends.all(), [], "the hook is for detached work only");
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_response_future_leaves_the_handler_running_to_its_end() {
        let ends = Ends::default();
        let done = Arc::new(AtomicUsize::new(0));
        let layer = ends.layer(Duration::from_secs(5));
        let tracker = layer.tracker();
        let mut service = layer.layer(handler(
            Duration::from_secs(1),
            StatusCode::ACCEPTED,
            done.clone(),
        ));
        leave(service.call(Request::new(()))).await;
        assert_eq!(done.load(Ordering::SeqCst), 0);

        tracker.close();
        tracker.wait().await;
        assert_eq!(done.load(Ordering::SeqCst), 1);
        assert_eq!(
            ends.all(),
            [Finished::Completed {
                status: StatusCode::ACCEPTED
            }]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_output_sent_just_before_the_drop_is_recorded_once() {
        let ends = Ends::default();
        let done = Arc::new(AtomicUsize::new(0));
        let layer = ends.layer(Duration::from_secs(5));
        let tracker = layer.tracker();
        let mut service = layer.layer(handler(Duration::ZERO, StatusCode::OK, done.clone()));
        let future = service.call(Request::new(()));
        // The task sends the output and ends; the response future never reads it.
        tracker.close();
        tracker.wait().await;
        assert_eq!(ends.all(), []);
        drop(future);
        assert_eq!(
            ends.all(),
            [Finished::Completed {
                status: StatusCode::OK
            }]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_counts_from_the_drop_and_cuts_the_handler() {
        let ends = Ends::default();
        let done = Arc::new(AtomicUsize::new(0));
        let limit = Duration::from_secs(1);
        let layer = ends.layer(limit);
        let tracker = layer.tracker();
        let mut service = layer.layer(handler(
            Duration::from_secs(10),
            StatusCode::OK,
            done.clone(),
        ));
        let mut future = service.call(Request::new(()));
        // Attached for longer than the limit: the limit does not run yet.
        let attached = Duration::from_secs(3);
        assert!(tokio::time::timeout(attached, &mut future).await.is_err());
        let left = Instant::now();
        drop(future);

        tracker.close();
        tracker.wait().await;
        assert_eq!(left.elapsed(), limit);
        assert_eq!(ends.all(), [Finished::Cut { limit }]);
        // The handler was dropped: it never finishes.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(done.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_is_not_taken_for_a_client_leaving_by_a_layer_inside() {
        let gone = Arc::new(std::sync::Mutex::new(None));
        let layer = DetachLayer::new(Duration::from_secs(1));
        let tracker = layer.tracker();
        let mut service = layer.layer(crate::ClientDisconnectLayer::new().layer(service_fn({
            let gone = gone.clone();
            move |_: Request<()>| {
                *gone.lock().unwrap() = ClientGone::current();
                std::future::pending::<std::result::Result<Response<String>, Infallible>>()
            }
        })));
        leave(service.call(Request::new(()))).await;
        tracker.close();
        tracker.wait().await;
        let gone = gone.lock().unwrap().take().unwrap();
        assert_eq!(gone.reason(), Some(crate::signal::Cancelled::Abandoned));
    }

    async fn panics_after(after: Duration) -> Result {
        tokio::time::sleep(after).await;
        panic!("boom")
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_after_the_drop_is_recorded() {
        let ends = Ends::default();
        let layer = ends.layer(Duration::from_secs(5));
        let tracker = layer.tracker();
        let mut service = layer.layer(service_fn(|_: Request<()>| {
            panics_after(Duration::from_secs(1))
        }));
        leave(service.call(Request::new(()))).await;
        tracker.close();
        tracker.wait().await;
        assert_eq!(ends.all(), [Finished::Panicked]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panic_while_the_client_waits_goes_on_in_the_response_future() {
        let ends = Ends::default();
        let service = ends
            .layer(Duration::from_secs(5))
            .layer(service_fn(|_: Request<()>| {
                panics_after(Duration::from_secs(1))
            }));
        let task = tokio::spawn(service.oneshot(Request::new(())));
        let error = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the response future ends")
            .unwrap_err();
        let panic = error.into_panic();
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"boom"));
        assert_eq!(ends.all(), []);
    }

    #[tokio::test(start_paused = true)]
    async fn the_handler_keeps_the_request_signal_and_deadline() {
        let ends = Ends::default();
        let (seen, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        let service = ServiceBuilder::new()
            .layer(ClientDisconnectLayer::new())
            .layer(ResponseTimeoutLayer::new(Duration::from_secs(2)))
            .layer(ends.layer(Duration::from_secs(5)))
            .service(service_fn(move |_: Request<()>| {
                let seen = seen.clone();
                async move {
                    let deadline = Deadline::current().map(|deadline| deadline.remaining());
                    seen.send(("deadline", deadline)).unwrap();
                    let gone = ClientGone::current().expect("the request's signal");
                    gone.gone().await;
                    seen.send(("gone", None)).unwrap();
                    Ok::<_, Infallible>(Response::new(String::from("stopped")))
                }
            }));
        let mut future = Box::pin(service.oneshot(Request::new(())));
        assert!(tokio::time::timeout(Duration::ZERO, &mut future)
            .await
            .is_err());
        let (_, deadline) = seen_rx.recv().await.unwrap();
        assert_eq!(deadline, Some(Duration::from_secs(2)));
        drop(future);
        assert_eq!(seen_rx.recv().await.unwrap(), ("gone", None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutdown_waits_for_detached_work_up_to_its_cap() {
        let cap = Duration::from_secs(5);
        for (work, finishes) in [
            (Duration::from_secs(2), true),
            (Duration::from_secs(60), false),
        ] {
            let ends = Ends::default();
            let done = Arc::new(AtomicUsize::new(0));
            let layer = ends.layer(Duration::from_secs(120));
            let tracker = layer.tracker();
            let mut service = layer.layer(handler(work, StatusCode::OK, done.clone()));
            leave(service.call(Request::new(()))).await;

            let start = Instant::now();
            tracker.close();
            let waited = tokio::time::timeout(cap, tracker.wait()).await;
            assert_eq!(waited.is_ok(), finishes, "{work:?}");
            assert_eq!(start.elapsed(), if finishes { work } else { cap });
            assert_eq!(done.load(Ordering::SeqCst), usize::from(finishes));
        }
    }
}
