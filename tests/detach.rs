//! Detached handlers over real TCP on loopback: a client that closes its socket while the
//! handler works gets its 499 recorded, and the handler still runs to its end under
//! `DetachLayer`, and only then (see the `detach` module docs).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use common::{Capture, Live, Outcomes, SOON};
use http::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::task::TaskTracker;
use tower::ServiceBuilder;
use tower_timeouts::detach::Finished;
use tower_timeouts::trace::{DETACHED, HTTP_RESPONSE_STATUS_CODE, URL_PATH};
use tower_timeouts::{ClientDisconnectLayer, ClientGone, DetachLayer, Outcome, Phase};

/// How long `/work` works, unless the test holds it.
const WORK: Duration = Duration::from_millis(300);
/// The detached layer's limit.
const LIMIT: Duration = Duration::from_secs(5);

/// How long `/work` works: a time, or until the test releases it.
#[derive(Clone)]
enum Work {
    For(Duration),
    Until(Arc<Notify>),
}

/// The handlers' side: they report to the test through these.
#[derive(Clone)]
struct Probe {
    work: Work,
    live: Live,
    started: mpsc::UnboundedSender<()>,
    /// Side effects performed: a handler that ran to its end.
    done: Arc<AtomicUsize>,
    /// Handlers that saw their client's `ClientGone` fire.
    saw_gone: Arc<AtomicUsize>,
}

/// Works, then performs its side effect.
async fn works(State(probe): State<Probe>) -> &'static str {
    let _live = probe.live.enter();
    probe.started.send(()).unwrap();
    match probe.work {
        Work::For(time) => tokio::time::sleep(time).await,
        Work::Until(release) => release.notified().await,
    }
    probe.done.fetch_add(1, Ordering::SeqCst);
    "done"
}

/// Works for long, and stops when its client leaves.
async fn watchful(State(probe): State<Probe>) -> &'static str {
    let gone = ClientGone::current().expect("the request's signal, in the detached task");
    probe.started.send(()).unwrap();
    tokio::select! {
        () = gone.gone() => {
            probe.saw_gone.fetch_add(1, Ordering::SeqCst);
            "stopped"
        }
        () = tokio::time::sleep(SOON) => {
            probe.done.fetch_add(1, Ordering::SeqCst);
            "done"
        }
    }
}

/// What `on_finish` was told.
#[derive(Clone, Default)]
struct Ends(Arc<(Mutex<Vec<Finished>>, Notify)>);

impl Ends {
    fn hook(&self) -> impl Fn(&Finished) + Send + Sync + 'static {
        let ends = self.0.clone();
        move |end: &Finished| {
            ends.0.lock().unwrap().push(end.clone());
            ends.1.notify_waiters();
        }
    }

    fn all(&self) -> Vec<Finished> {
        self.0 .0.lock().unwrap().clone()
    }

    /// Waits until `n` ends were reported (panics after [`SOON`]).
    async fn wait_for(&self, n: usize) -> Vec<Finished> {
        tokio::time::timeout(SOON, async {
            loop {
                let notified = self.0 .1.notified();
                let mut notified = std::pin::pin!(notified);
                notified.as_mut().enable();
                if self.0 .0.lock().unwrap().len() >= n {
                    return self.all();
                }
                notified.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("expected {n} ends, got {:?}", self.all()))
    }
}

/// The test's side of one app.
struct Harness {
    probe: Probe,
    started: mpsc::UnboundedReceiver<()>,
    outcomes: Outcomes,
    ends: Ends,
    tracker: TaskTracker,
}

impl Harness {
    /// The app: `ClientDisconnectLayer` outside, `DetachLayer` inside when `detach`.
    fn new(work: Work, detach: bool) -> (Harness, Router) {
        let (started_tx, started) = mpsc::unbounded_channel();
        let probe = Probe {
            work,
            live: Live::new(),
            started: started_tx,
            done: Arc::default(),
            saw_gone: Arc::default(),
        };
        let outcomes = Outcomes::new();
        let ends = Ends::default();
        let layer = DetachLayer::new(LIMIT).on_finish(ends.hook());
        let tracker = layer.tracker();
        let routes = Router::new()
            .route("/work", get(works))
            .route("/watch", get(watchful))
            .with_state(probe.clone());
        let disconnect = ClientDisconnectLayer::new().on_outcome(outcomes.hook());
        let app = if detach {
            routes.layer(ServiceBuilder::new().layer(disconnect).layer(layer))
        } else {
            routes.layer(disconnect)
        };
        let harness = Harness {
            probe,
            started,
            outcomes,
            ends,
            tracker,
        };
        (harness, app)
    }

    fn done(&self) -> usize {
        self.probe.done.load(Ordering::SeqCst)
    }

    /// Sends `GET path`, waits until the handler started, then closes the socket.
    async fn leave_during(&mut self, addr: SocketAddr, path: &str) {
        let mut client = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n");
        client.write_all(request.as_bytes()).await.unwrap();
        tokio::time::timeout(SOON, self.started.recv())
            .await
            .expect("the handler started")
            .unwrap();
        drop(client);
    }

    /// Waits for the one outcome, a 499 before the head.
    async fn assert_499(&self) {
        let outcomes = self.outcomes.wait_for(1).await;
        assert!(
            matches!(
                outcomes[..],
                [Outcome::ClientDisconnected {
                    phase: Phase::BeforeHead,
                    ..
                }]
            ),
            "{outcomes:?}"
        );
    }
}

fn completed(status: u16) -> Finished {
    Finished::Completed {
        status: StatusCode::from_u16(status).unwrap(),
    }
}

#[tokio::test]
async fn a_detached_handler_runs_to_its_end_after_its_client_left() {
    let (capture, _guard) = Capture::install_crate_only();
    let (mut harness, app) = Harness::new(Work::For(WORK), true);
    let addr = common::serve(common::Server::AxumServe, app).await;
    harness.leave_during(addr, "/work").await;

    harness.assert_499().await;
    assert_eq!(harness.ends.wait_for(1).await, [completed(200)]);
    assert_eq!(harness.done(), 1);

    let events: Vec<_> = capture
        .events()
        .into_iter()
        .filter(|event| event.fields.contains_key(DETACHED))
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    let event = &events[0];
    assert_eq!(event.fields[DETACHED], "completed");
    assert_eq!(event.fields[HTTP_RESPONSE_STATUS_CODE], "200");
    assert_eq!(event.level, tracing::Level::INFO);
    let parent = event.parent.as_ref().expect("the request's span");
    assert_eq!(parent[URL_PATH], "/work");
}

#[tokio::test]
async fn without_detach_the_handler_is_dropped_when_its_client_leaves() {
    let (_capture, _guard) = Capture::install_crate_only();
    let (mut harness, app) = Harness::new(Work::For(WORK), false);
    let addr = common::serve(common::Server::AxumServe, app).await;
    harness.leave_during(addr, "/work").await;

    harness.assert_499().await;
    // The handler's future is gone, before its side effect: it can never happen now.
    harness.probe.live.wait_zero().await;
    assert_eq!(harness.done(), 0);
    assert_eq!(harness.ends.all(), []);
}

#[tokio::test]
async fn client_gone_fires_inside_a_detached_handler() {
    let (_capture, _guard) = Capture::install_crate_only();
    let (mut harness, app) = Harness::new(Work::For(WORK), true);
    let addr = common::serve(common::Server::AxumServe, app).await;
    harness.leave_during(addr, "/watch").await;

    harness.assert_499().await;
    assert_eq!(harness.ends.wait_for(1).await, [completed(200)]);
    assert_eq!(harness.probe.saw_gone.load(Ordering::SeqCst), 1);
    assert_eq!(harness.done(), 0);
}

/// Serves `app` until `stop` fires, with axum's graceful shutdown.
async fn serve_until_stopped(app: Router) -> (SocketAddr, oneshot::Sender<()>, Stopped) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    (addr, stop, Stopped(server))
}

/// The server's task, ended by a graceful shutdown.
struct Stopped(tokio::task::JoinHandle<()>);

impl Stopped {
    async fn wait(self) {
        tokio::time::timeout(SOON, self.0)
            .await
            .expect("the server shut down")
            .unwrap();
    }
}

#[tokio::test]
async fn a_shutdown_waits_for_detached_work_up_to_its_cap() {
    let (_capture, _guard) = Capture::install_crate_only();
    let release = Arc::new(Notify::new());
    let (mut harness, app) = Harness::new(Work::Until(release.clone()), true);
    let (addr, stop, server) = serve_until_stopped(app).await;
    harness.leave_during(addr, "/work").await;
    harness.assert_499().await;
    stop.send(()).unwrap();
    server.wait().await;

    // The server is done; the detached handler is not, until released.
    harness.tracker.close();
    assert_eq!(harness.tracker.len(), 1);
    assert_eq!(harness.done(), 0);
    release.notify_one();
    let waited = tokio::time::timeout(SOON, harness.tracker.wait()).await;
    assert!(
        waited.is_ok(),
        "the tracker waited for the detached handler"
    );
    assert_eq!(harness.done(), 1);
    assert_eq!(harness.ends.all(), [completed(200)]);
}

#[tokio::test]
async fn a_shutdown_gives_up_on_detached_work_at_its_cap() {
    let (_capture, _guard) = Capture::install_crate_only();
    // Slower than the cap, and than the layer's limit.
    let (mut harness, app) = Harness::new(Work::For(SOON), true);
    let (addr, stop, server) = serve_until_stopped(app).await;
    harness.leave_during(addr, "/work").await;
    harness.assert_499().await;
    stop.send(()).unwrap();
    server.wait().await;

    let cap = Duration::from_millis(500);
    harness.tracker.close();
    let waited = tokio::time::timeout(cap, harness.tracker.wait()).await;
    assert!(waited.is_err(), "the tracker gave up at the cap");
    assert_eq!(harness.tracker.len(), 1);
    assert_eq!(harness.done(), 0);
}
