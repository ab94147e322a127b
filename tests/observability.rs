//! What operators see, over real TCP on loopback: the access log's lines (nginx `combined` and
//! JSON) and the metrics hook's histogram, for a request that completes (200), one whose client
//! leaves (499), one that times out (504), and upstream calls that time out connecting (599)
//! or are refused (502).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use http::Request;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tower::{ServiceBuilder, ServiceExt};
use tower_timeouts::access_log::{AccessLog, TARGET};
use tower_timeouts::{ClientDisconnectLayer, OnOutcome, ResponseTimeoutLayer};
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::prelude::*;

use common::{Written, SOON};

/// The app: `/fast`, `/slow` (past a 200 ms limit), `/hang` (reports that it started, never
/// answers), `/blackhole`, `/refused` and `/silent` (calls upstream), under `hook`.
fn app(
    hook: impl OnOutcome,
    started: mpsc::UnboundedSender<()>,
    hole: SocketAddr,
    refused: SocketAddr,
) -> Router {
    app_with_silent(hook, started, hole, refused, refused)
}

fn app_with_silent(
    hook: impl OnOutcome,
    started: mpsc::UnboundedSender<()>,
    hole: SocketAddr,
    refused: SocketAddr,
    silent: SocketAddr,
) -> Router {
    let forward = |to: SocketAddr| {
        let upstream =
            common::gateway_upstream(Duration::from_millis(50), Duration::from_millis(100));
        get(move || {
            let upstream = upstream.clone();
            async move {
                let request = Request::get(format!("http://{to}/"))
                    .body(Body::empty())
                    .unwrap();
                upstream.oneshot(request).await.unwrap()
            }
        })
    };
    Router::new()
        .route("/fast", get(|| async { "fast" }))
        .route(
            "/slow",
            get(|| async { tokio::time::sleep(Duration::from_secs(10)).await }),
        )
        .route(
            "/hang",
            get(move || async move {
                let _ = started.send(());
                std::future::pending::<()>().await
            }),
        )
        .route("/blackhole", forward(hole))
        .route("/refused", forward(refused))
        .route("/silent", forward(silent))
        .layer(
            ServiceBuilder::new()
                .layer(ClientDisconnectLayer::new().on_outcome(hook))
                .layer(ResponseTimeoutLayer::new(Duration::from_millis(200))),
        )
}

/// Serves `app` with the client's address in `ConnectInfo`; returns its address.
async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let make = app.into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, make).await.unwrap() });
    addr
}

/// Plays the five requests against `addr`, in order, each ended before the next: 200, 499,
/// 504, 599, 502.
async fn play(
    addr: SocketAddr,
    started: &mut mpsc::UnboundedReceiver<()>,
    ended: impl AsyncFn(usize),
) {
    let mut client = common::h1(addr).await;
    let mut n = 0;
    for (path, status) in [("/fast", 200)] {
        let response = client.send_request(common::get(addr, path)).await.unwrap();
        assert_eq!(response.status(), status);
        common::body_bytes(response.into_body()).await;
        n += 1;
        ended(n).await;
    }
    let mut leaving = TcpStream::connect(addr).await.unwrap();
    leaving
        .write_all(b"GET /hang HTTP/1.1\r\nhost: localhost\r\nuser-agent: leaving/1.0\r\n\r\n")
        .await
        .unwrap();
    tokio::time::timeout(SOON, started.recv())
        .await
        .unwrap()
        .unwrap();
    drop(leaving);
    n += 1;
    ended(n).await;
    for (path, status) in [("/slow", 504), ("/blackhole", 599), ("/refused", 502)] {
        let response = client.send_request(common::get(addr, path)).await.unwrap();
        assert_eq!(response.status(), status, "{path}");
        common::body_bytes(response.into_body()).await;
        n += 1;
        ended(n).await;
    }
}

/// The access log, both forms at once (a pair of hooks): one line per request and form, with
/// the status an operator greps for and the error type.
#[tokio::test(flavor = "current_thread")]
async fn the_access_log_has_one_line_per_request_with_status_and_error_type() {
    let written = Written::default();
    let access = tracing_subscriber::fmt::layer()
        .without_time()
        .with_level(false)
        .with_target(false)
        .with_ansi(false)
        .with_writer(written.clone())
        .with_filter(filter_fn(|meta| meta.target() == TARGET));
    let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(access));

    let hole = common::black_hole().await;
    let (refused, _socket) = common::refusing();
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let hook = (AccessLog::combined(), AccessLog::json());
    let addr = serve(app(hook, started_tx, hole.addr, refused)).await;
    play(addr, &mut started, async |n: usize| {
        written.wait_lines(2 * n).await;
    })
    .await;

    let lines = written.lines();
    eprintln!("{}", lines.join("\n"));
    assert_eq!(lines.len(), 10, "{lines:#?}");
    let expected = [
        ("GET /fast HTTP/1.1", "200", "completed", "-"),
        (
            "GET /hang HTTP/1.1",
            "499",
            "client_disconnected",
            "client_disconnected",
        ),
        (
            "GET /slow HTTP/1.1",
            "504",
            "response_timeout",
            "http_response_timeout",
        ),
        (
            "GET /blackhole HTTP/1.1",
            "599",
            "connect_timeout",
            "connection_timeout",
        ),
        (
            "GET /refused HTTP/1.1",
            "502",
            "connect_failed",
            "connection_refused",
        ),
    ];
    for (i, (request, status, outcome, error)) in expected.into_iter().enumerate() {
        let combined = &lines[2 * i];
        let json: serde_json::Value = serde_json::from_str(&lines[2 * i + 1]).unwrap();
        // `127.0.0.1 - - [24/Nov/2026:02:31:07 +0000] "GET /slow HTTP/1.1" 504 - "-" "…" 0.201 response_timeout http_response_timeout`
        assert!(combined.starts_with("127.0.0.1 - - ["), "{combined}");
        let after_time = combined.split_once("] ").unwrap().1;
        let fields: Vec<&str> = after_time.split('"').collect();
        assert_eq!(fields[1], request, "{combined}");
        assert_eq!(fields[2].trim(), format!("{status} -"), "{combined}");
        let tail: Vec<&str> = fields[6].split_whitespace().collect();
        assert_eq!(tail.len(), 3, "{combined}");
        assert!(tail[0].parse::<f64>().is_ok(), "request time in {combined}");
        assert_eq!(&tail[1..], [outcome, error], "{combined}");

        assert_eq!(json["status"], status.parse::<u16>().unwrap(), "{json}");
        assert_eq!(json["outcome"], outcome, "{json}");
        let error = (error != "-").then_some(error);
        assert_eq!(json["error_type"].as_str(), error, "{json}");
        assert_eq!(json["remote_addr"], "127.0.0.1", "{json}");
        assert_eq!(json["method"], "GET", "{json}");
    }
    assert!(lines[2].contains("\"leaving/1.0\""), "{}", lines[2]);
    let json: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(json["route"], "/fast");
    assert_eq!(json["uri"], "/fast");
    assert_eq!(json["protocol"], "HTTP/1.1");
}

/// The metrics hook, with a real recorder: one `http.server.request.duration` sample per
/// request, in seconds, labelled as OpenTelemetry says; a 499 without a status code.
#[cfg(feature = "metrics")]
#[tokio::test(flavor = "current_thread")]
async fn the_metrics_hook_records_one_labelled_duration_per_request() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use tower_timeouts::metrics::{ServerMetrics, HTTP_SERVER_REQUEST_DURATION};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");

    let hole = common::black_hole().await;
    let (refused, _socket) = common::refusing();
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let outcomes = common::Outcomes::new();
    let hook = (ServerMetrics::new(), outcomes.hook());
    let addr = serve(app(hook, started_tx, hole.addr, refused)).await;
    play(addr, &mut started, async |n: usize| {
        outcomes.wait_for(n).await;
    })
    .await;

    let mut series: Vec<(Vec<(String, String)>, usize)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == HTTP_SERVER_REQUEST_DURATION)
        .map(|(key, unit, _, value)| {
            assert_eq!(unit, Some(metrics::Unit::Seconds));
            let DebugValue::Histogram(samples) = value else {
                panic!("{value:?} is not a histogram");
            };
            assert!(samples.iter().all(|s| s.into_inner() < 10.0), "{samples:?}");
            let mut labels: Vec<(String, String)> = key
                .key()
                .labels()
                .map(|label| (label.key().to_owned(), label.value().to_owned()))
                .collect();
            labels.sort();
            (labels, samples.len())
        })
        .collect();
    series.sort();
    let expected = |pairs: &[(&str, &str)]| {
        let mut labels: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        labels.sort();
        (labels, 1)
    };
    let mut want = vec![
        expected(&[
            ("http.request.method", "GET"),
            ("http.response.status_code", "200"),
            ("http.route", "/fast"),
            ("tower_timeouts.outcome", "completed"),
        ]),
        expected(&[
            ("http.request.method", "GET"),
            ("error.type", "client_disconnected"),
            ("http.route", "/hang"),
            ("tower_timeouts.outcome", "client_disconnected"),
        ]),
        expected(&[
            ("http.request.method", "GET"),
            ("http.response.status_code", "504"),
            ("error.type", "http_response_timeout"),
            ("http.route", "/slow"),
            ("tower_timeouts.outcome", "response_timeout"),
        ]),
        expected(&[
            ("http.request.method", "GET"),
            ("http.response.status_code", "599"),
            ("error.type", "connection_timeout"),
            ("http.route", "/blackhole"),
            ("tower_timeouts.outcome", "connect_timeout"),
        ]),
        expected(&[
            ("http.request.method", "GET"),
            ("http.response.status_code", "502"),
            ("error.type", "connection_refused"),
            ("http.route", "/refused"),
            ("tower_timeouts.outcome", "connect_failed"),
        ]),
    ];
    want.sort();
    assert_eq!(series, want);
}

/// The crate's own line for a request answered with a failed upstream call's answer names the
/// upstream and the phase it failed in; the response names neither.
#[tokio::test(flavor = "current_thread")]
async fn an_upstream_failure_names_the_upstream_and_the_phase_in_the_log_only() {
    let written = Written::default();
    let logs = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(written.clone())
        .with_filter(filter_fn(|meta| meta.target() == "tower_timeouts::trace"));
    let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(logs));

    let hole = common::black_hole().await;
    let (refused, _socket) = common::refusing();
    // Accepts connections into its queue, never reads them: no response head.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let (started, _) = mpsc::unbounded_channel();
    let addr = serve(app_with_silent(
        (),
        started,
        hole.addr,
        refused,
        silent_addr,
    ))
    .await;
    let mut client = common::h1(addr).await;
    let cases = [
        ("/blackhole", hole.addr, 599, "connecting"),
        ("/refused", refused, 502, "connecting"),
        ("/silent", silent_addr, 504, "waiting_for_head"),
    ];
    for (n, (path, to, status, phase)) in cases.into_iter().enumerate() {
        let response = client.send_request(common::get(addr, path)).await.unwrap();
        assert_eq!(response.status(), status, "{path}");
        let head = format!("{:?}", response.headers());
        let body = common::body_bytes(response.into_body()).await;
        let port = to.port().to_string();
        assert!(!head.contains(&port), "{path}: {head}");
        assert!(
            !String::from_utf8_lossy(&body).contains(&port),
            "{path}: {body:?}"
        );

        let lines = written.wait_lines(n + 1).await;
        let line = &lines[n];
        eprintln!("{line}");
        assert!(
            line.contains(&format!("tower_timeouts.upstream=\"{to}\"")),
            "{line}"
        );
        let phase = format!("tower_timeouts.upstream_phase=\"{phase}\"");
        assert!(line.contains(&phase), "{line}");
    }
}
