//! Thousands of requests over many HTTP/1.1 and HTTP/2 connections, fast, timed out and
//! abandoned by their clients: every one ends with exactly one outcome of the kind the test
//! caused, no handler future outlives its request, and no task is left behind.
mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::RawQuery;
use axum::routing::get;
use axum::Router;
use http::{Request, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceBuilder;
use tower_timeouts::response::PROXY_STATUS;
use tower_timeouts::{ClientDisconnectLayer, Deadline, Outcome, Phase, ResponseTimeoutLayer};

use common::{Live, Outcomes, Server, Started, SOON};

/// The response timeout of the stack.
const LIMIT: Duration = Duration::from_millis(100);
/// Connections, each driven by one client task: the bound on concurrency.
const CONNECTIONS: usize = 50;
/// Requests per connection.
const PER_CONNECTION: usize = 40;
const TOTAL: usize = CONNECTIONS * PER_CONNECTION;
/// The load phase ends well within this, even on a loaded machine.
const LOAD_BOUND: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Answered at once: `completed` 200.
    Fast,
    /// A handler far slower than [`LIMIT`]: `response_timeout`, 504.
    Slow,
    /// The client leaves once the handler has started: `client_disconnected` before the head.
    Disconnect,
}

/// One in ten requests is slow, one in ten is abandoned; the rest are fast.
fn kind_of(request: usize) -> Kind {
    match request % 10 {
        3 => Kind::Slow,
        7 => Kind::Disconnect,
        _ => Kind::Fast,
    }
}

/// What the clients saw, counted once each request's result was checked.
#[derive(Default)]
struct Tally {
    fast: AtomicUsize,
    slow: AtomicUsize,
    disconnected: AtomicUsize,
}

fn app(outcomes: &Outcomes, live: &Live, started: &Started) -> Router {
    let fast_live = live.clone();
    let slow_live = live.clone();
    let hang_live = live.clone();
    let started = started.clone();
    Router::new()
        .route(
            "/fast",
            get(move || {
                let guard = fast_live.enter();
                async move {
                    drop(guard);
                    "fast"
                }
            }),
        )
        .route(
            "/slow",
            get(move || {
                let guard = slow_live.enter();
                async move {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    drop(guard);
                    "too late"
                }
            }),
        )
        .route(
            "/hang",
            get(move |RawQuery(query): RawQuery| {
                let guard = hang_live.enter();
                let started = started.clone();
                async move {
                    let id = query
                        .as_deref()
                        .and_then(|query| query.strip_prefix("id="))
                        .and_then(|id| id.parse().ok())
                        .expect("/hang?id=N");
                    started.report(id);
                    std::future::pending::<()>().await;
                    drop(guard);
                    "never"
                }
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(ClientDisconnectLayer::new().on_outcome(outcomes.hook()))
                // The abandoned requests must not time out before their clients leave.
                .map_request(|mut request: Request<Body>| {
                    if request.uri().path() == "/hang" {
                        request
                            .extensions_mut()
                            .insert(Deadline::after(Duration::from_secs(600)));
                    }
                    request
                })
                .layer(ResponseTimeoutLayer::new(LIMIT)),
        )
}

/// Checks the answer to a fast or slow request and counts it.
fn check(
    id: usize,
    kind: Kind,
    status: StatusCode,
    proxy_status: Option<&[u8]>,
    body: &[u8],
    tally: &Tally,
) {
    match kind {
        Kind::Fast => {
            assert_eq!(status, StatusCode::OK, "request {id}");
            assert_eq!(body, b"fast", "request {id}");
            tally.fast.fetch_add(1, Ordering::SeqCst);
        }
        Kind::Slow => {
            assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "request {id}");
            assert_eq!(
                proxy_status,
                Some(&b"tower-timeouts; error=http_response_timeout"[..]),
                "request {id}"
            );
            assert_eq!(body, b"504 Gateway Timeout\n", "request {id}");
            tally.slow.fetch_add(1, Ordering::SeqCst);
        }
        Kind::Disconnect => unreachable!("checked where the client leaves"),
    }
}

fn path(kind: Kind, id: usize) -> String {
    match kind {
        Kind::Fast => "/fast".to_owned(),
        Kind::Slow => "/slow".to_owned(),
        Kind::Disconnect => format!("/hang?id={id}"),
    }
}

/// An HTTP/1.1 connection: fast and slow requests one after another on it; an abandoned
/// request on a raw socket of its own, closed once the handler has started.
async fn h1_client(
    addr: SocketAddr,
    ids: std::ops::Range<usize>,
    started: Started,
    tally: Arc<Tally>,
) {
    let mut send = common::h1(addr).await;
    for id in ids {
        let kind = kind_of(id);
        if kind == Kind::Disconnect {
            let started = started.expect(id);
            let mut socket = TcpStream::connect(addr).await.unwrap();
            socket.set_nodelay(true).unwrap();
            let head = format!("GET {} HTTP/1.1\r\nHost: {addr}\r\n\r\n", path(kind, id));
            socket.write_all(head.as_bytes()).await.unwrap();
            common::started_or_panic(started, id).await;
            drop(socket);
            tally.disconnected.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let response = tokio::time::timeout(SOON, async {
            send.ready().await.unwrap();
            let response = send
                .send_request(common::get(addr, &path(kind, id)))
                .await
                .unwrap();
            let (parts, body) = response.into_parts();
            (parts, common::body_bytes(body).await)
        })
        .await
        .unwrap_or_else(|_| panic!("no answer to request {id} over HTTP/1.1"));
        let (parts, body) = response;
        check(
            id,
            kind,
            parts.status,
            parts.headers.get(PROXY_STATUS).map(|v| v.as_bytes()),
            &body,
            &tally,
        );
    }
}

/// An HTTP/2 connection: every request on it; an abandoned request's response future is
/// dropped once the handler has started, which resets the stream.
async fn h2_client(
    addr: SocketAddr,
    ids: std::ops::Range<usize>,
    started: Started,
    tally: Arc<Tally>,
) {
    let mut send = common::h2(addr).await;
    for id in ids {
        let kind = kind_of(id);
        tokio::time::timeout(SOON, send.ready())
            .await
            .expect("the HTTP/2 connection takes a request")
            .unwrap();
        if kind == Kind::Disconnect {
            let started = started.expect(id);
            let response = send.send_request(common::get(addr, &path(kind, id)));
            // Boxed, so that dropping it below really drops the future.
            let mut response = Box::pin(response);
            tokio::time::timeout(SOON, async {
                tokio::select! {
                    answer = &mut response => panic!("request {id} was answered: {answer:?}"),
                    started = started => started.unwrap(),
                }
            })
            .await
            .unwrap_or_else(|_| panic!("the handler of request {id} did not start"));
            drop(response);
            tally.disconnected.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let (parts, body) = tokio::time::timeout(SOON, async {
            let response = send
                .send_request(common::get(addr, &path(kind, id)))
                .await
                .unwrap();
            let (parts, body) = response.into_parts();
            (parts, common::body_bytes(body).await)
        })
        .await
        .unwrap_or_else(|_| panic!("no answer to request {id} over HTTP/2"));
        check(
            id,
            kind,
            parts.status,
            parts.headers.get(PROXY_STATUS).map(|v| v.as_bytes()),
            &body,
            &tally,
        );
    }
}

/// Waits, boundedly, for `condition` to hold.
async fn wait_until(what: &str, mut condition: impl FnMut() -> Option<String>) {
    let start = Instant::now();
    loop {
        let Some(unmet) = condition() else { return };
        assert!(
            start.elapsed() < SOON,
            "{what}: still not true after {SOON:?}: {unmet}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn run(server: Server) {
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();

    let outcomes = Outcomes::new();
    let live = Live::new();
    let started = Started::default();
    let tally = Arc::new(Tally::default());
    let addr = common::serve(server, app(&outcomes, &live, &started)).await;
    // The accept loop (axum::serve's, or the hyper-util one) stays for the whole test.
    let server_tasks = 1;

    let start = Instant::now();
    let mut clients = JoinSet::new();
    for connection in 0..CONNECTIONS {
        let ids = connection * PER_CONNECTION..(connection + 1) * PER_CONNECTION;
        let (started, tally) = (started.clone(), tally.clone());
        if connection % 2 == 0 {
            clients.spawn(h1_client(addr, ids, started, tally));
        } else {
            clients.spawn(h2_client(addr, ids, started, tally));
        }
    }
    tokio::time::timeout(LOAD_BOUND, async {
        while let Some(result) = clients.join_next().await {
            result.expect("a client failed");
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{server:?}: the clients did not finish in {LOAD_BOUND:?}"));
    let load_time = start.elapsed();
    let alive_after_load = metrics.num_alive_tasks();

    let expected = |kind| (0..TOTAL).filter(|&id| kind_of(id) == kind).count();
    let (fast, slow, disconnects) = (
        expected(Kind::Fast),
        expected(Kind::Slow),
        expected(Kind::Disconnect),
    );
    assert_eq!(tally.fast.load(Ordering::SeqCst), fast);
    assert_eq!(tally.slow.load(Ordering::SeqCst), slow);
    assert_eq!(tally.disconnected.load(Ordering::SeqCst), disconnects);

    outcomes.wait_for(TOTAL).await;
    live.wait_zero().await;
    // Every client connection is closed by now; the server's connection tasks (and HTTP/2
    // stream tasks) end as they notice.
    wait_until("no task left behind", || {
        let alive = metrics.num_alive_tasks();
        (alive > baseline + server_tasks).then(|| {
            format!("{alive} tasks alive, baseline {baseline} + {server_tasks} server task")
        })
    })
    .await;

    // Counted again once everything has settled, so a late extra outcome would show.
    let all = outcomes.all();
    assert_eq!(all.len(), TOTAL, "{server:?}: one outcome per request");
    let count = |matches: fn(&Outcome) -> bool| all.iter().filter(|o| matches(o)).count();
    let completed_200 =
        count(|o| matches!(o, Outcome::Completed { status, .. } if *status == StatusCode::OK));
    let timed_out = count(|o| {
        matches!(o, Outcome::ResponseTimeout { timeout, status, .. }
            if *timeout == LIMIT && *status == StatusCode::GATEWAY_TIMEOUT)
    });
    let gone = count(|o| {
        matches!(
            o,
            Outcome::ClientDisconnected {
                phase: Phase::BeforeHead,
                sent_status: None,
                ..
            }
        )
    });
    let others: Vec<_> = all
        .iter()
        .filter(|o| {
            !matches!(
                o,
                Outcome::Completed { .. }
                    | Outcome::ResponseTimeout { .. }
                    | Outcome::ClientDisconnected { .. }
            )
        })
        .collect();
    assert!(
        others.is_empty(),
        "{server:?}: unexpected outcomes {others:?}"
    );
    assert_eq!(completed_200, fast, "{server:?}: completed 200");
    assert_eq!(timed_out, slow, "{server:?}: response_timeout");
    assert_eq!(gone, disconnects, "{server:?}: client_disconnected");
    eprintln!(
        "{server:?}: {TOTAL} requests ({fast} fast, {slow} timed out, {disconnects} abandoned) \
         over {CONNECTIONS} connections (and a raw socket per abandoned HTTP/1.1 request) in \
         {load_time:?}; settled in {:?}; tasks: baseline {baseline}, {alive_after_load} right \
         after the clients finished, {} at the end",
        start.elapsed(),
        metrics.num_alive_tasks()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_outcome_per_request_under_load_axum_serve() {
    run(Server::AxumServe).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_outcome_per_request_under_load_hyper_auto() {
    run(Server::HyperAuto).await;
}
