//! The path with nothing to record into: no hook anywhere in the process and no tracing
//! subscriber. The layers then open no exchange (see `record`'s module docs) and act alone;
//! what users can still see (the response, the `ClientGone` signal, the handler being dropped)
//! must be what it is on the recording path, in the compositions where layers are called
//! lazily. Over real TCP on loopback, with both servers.
//!
//! This file must configure no hook and set no subscriber: it is its own process for that.

mod common;

use std::time::Duration;

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use http::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tower::ServiceBuilder;
use tower_timeouts::{ClientDisconnectLayer, ClientGone, ResponseTimeoutLayer};

use common::{Live, SERVERS, SOON};

const SHORT: Duration = Duration::from_millis(200);
const LONG: Duration = Duration::from_secs(60);

#[derive(Clone)]
struct Probe {
    live: Live,
    started: mpsc::UnboundedSender<()>,
    fired: mpsc::UnboundedSender<()>,
}

/// Takes the request's signal and watches it from a spawned task, says it started, and never
/// answers.
async fn slow(State(probe): State<Probe>) -> &'static str {
    let _live = probe.live.enter();
    let gone = ClientGone::current().expect("a ClientDisconnectLayer is on the request");
    let fired = probe.fired.clone();
    tokio::spawn(async move {
        gone.gone().await;
        let _ = fired.send(());
    });
    let _ = probe.started.send(());
    std::future::pending::<()>().await;
    "never"
}

type Placement = fn(Router<Probe>) -> Router<Probe>;

/// The timeout outside the disconnect layer, in two `Router::layer` calls: the inner layer is
/// called lazily, from the outer one's poll.
fn timeout_outside(routes: Router<Probe>) -> Router<Probe> {
    routes
        .layer(ClientDisconnectLayer::new())
        .layer(ResponseTimeoutLayer::new(SHORT))
}

/// The stack applied twice, the outer limit the smaller.
fn stack_twice(routes: Router<Probe>) -> Router<Probe> {
    let stack = |limit| {
        ServiceBuilder::new()
            .layer(ClientDisconnectLayer::new())
            .layer(ResponseTimeoutLayer::new(limit))
    };
    routes.route_layer(stack(LONG)).layer(stack(SHORT))
}

/// tower-http's timeout between two disconnect layers: it drops what it wraps when it fires.
fn foreign_timeout_between(routes: Router<Probe>) -> Router<Probe> {
    let foreign =
        tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::GATEWAY_TIMEOUT, SHORT);
    routes
        .layer(ClientDisconnectLayer::new())
        .layer(foreign)
        .layer(ClientDisconnectLayer::new())
}

const PLACEMENTS: [(&str, Placement); 3] = [
    ("timeout outside", timeout_outside),
    ("stack twice", stack_twice),
    ("tower-http timeout between", foreign_timeout_between),
];

struct App {
    addr: std::net::SocketAddr,
    live: Live,
    started: mpsc::UnboundedReceiver<()>,
    fired: mpsc::UnboundedReceiver<()>,
}

async fn app(server: common::Server, placement: Placement) -> App {
    let (started, started_rx) = mpsc::unbounded_channel();
    let (fired, fired_rx) = mpsc::unbounded_channel();
    let live = Live::new();
    let probe = Probe {
        live: live.clone(),
        started,
        fired,
    };
    let routes = Router::new().route("/slow", get(slow));
    let router = placement(routes).with_state(probe);
    App {
        addr: common::serve(server, router).await,
        live,
        started: started_rx,
        fired: fired_rx,
    }
}

/// No signal fired, after the handler is gone (the signal would have fired before that).
async fn assert_no_signal(app: &mut App, case: &str) {
    app.live.wait_zero().await;
    tokio::task::yield_now().await;
    assert!(app.fired.try_recv().is_err(), "{case}: ClientGone fired");
}

#[tokio::test]
async fn a_timeout_is_never_a_client_leaving() {
    assert!(!tracing::dispatcher::has_been_set());
    for server in SERVERS {
        for (name, placement) in PLACEMENTS {
            let case = format!("{name} on {server:?}");
            let mut app = app(server, placement).await;
            let mut client = common::h1(app.addr).await;
            let response = timeout(SOON, client.send_request(common::get(app.addr, "/slow")))
                .await
                .unwrap_or_else(|_| panic!("{case}: no answer"))
                .unwrap();
            assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT, "{case}");
            assert_no_signal(&mut app, &case).await;
        }
    }
}

#[tokio::test]
async fn a_client_that_leaves_fires_the_signal_and_stops_the_handler() {
    assert!(!tracing::dispatcher::has_been_set());
    for server in SERVERS {
        for (name, placement) in PLACEMENTS {
            for http2 in [false, true] {
                let case = format!("{name} on {server:?}, HTTP/2: {http2}");
                let mut app = app(server, placement).await;
                if http2 {
                    let mut send = common::h2(app.addr).await;
                    let response = send.send_request(common::get(app.addr, "/slow"));
                    let mut response = Box::pin(response);
                    tokio::select! {
                        _ = &mut response => panic!("{case}: answered"),
                        _ = app.started.recv() => {}
                    }
                    // RST_STREAM CANCEL.
                    drop(response);
                } else {
                    let mut stream = TcpStream::connect(app.addr).await.unwrap();
                    stream
                        .write_all(b"GET /slow HTTP/1.1\r\nhost: localhost\r\n\r\n")
                        .await
                        .unwrap();
                    timeout(SOON, app.started.recv()).await.unwrap();
                    drop(stream);
                }
                timeout(SOON, app.fired.recv())
                    .await
                    .unwrap_or_else(|_| panic!("{case}: ClientGone did not fire"));
                app.live.wait_zero().await;
            }
        }
    }
}
