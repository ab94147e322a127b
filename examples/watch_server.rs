//! Run with: cargo run --release --features axum --example watch_server -- [LISTEN] [--no-watch]
//!
//! A server whose handlers never read their request body, served by `axum::serve` through the
//! connection watcher (`WatchedListener`), or without it (`--no-watch`). It prints one line per
//! request when it ends: the method, the status recorded (499 for a client that left), the
//! outcome, and the time from the request to its end. `scripts/nginx-compare`
//! plays the same clients against it and against nginx, side by side.
//!
//! - `/slow`: answers `done` after one second;
//! - `/stream`: an event stream that sends one event, then nothing;
//! - `/fast`: answers `fast` at once.
//!
//! Try it, with LISTEN the default `127.0.0.1:3000`:
//!
//! ```sh
//! head -c 65536 /dev/zero | curl -m 0.3 -T - localhost:3000/slow   # leaves after 0.3 s: 499
//! ```

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use futures_util::stream;
use tokio::net::TcpListener;
use tower_timeouts::watch::WatchedListener;
use tower_timeouts::{ClientDisconnectLayer, Report};

/// How long `/slow` takes.
const SLOW: Duration = Duration::from_secs(1);

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1).collect::<Vec<_>>();
    let watch = !args.iter().any(|arg| arg == "--no-watch");
    args.retain(|arg| arg != "--no-watch");
    let listen = args.first().map_or("127.0.0.1:3000", String::as_str);

    let app = Router::new()
        .route("/slow", get(slow).post(slow))
        .route("/stream", get(event_stream).post(event_stream))
        .route("/fast", get(|| async { "fast" }).post(|| async { "fast" }))
        .layer(
            ClientDisconnectLayer::new().on_outcome(|report: &Report<'_>| {
                let outcome = report.outcome();
                let status = outcome
                    .recorded_status()
                    .map_or(0, |status| status.as_u16());
                println!(
                    "{} {status} {} {:.1}ms",
                    report.method(),
                    outcome.kind(),
                    report.elapsed().as_secs_f64() * 1000.0
                );
            }),
        );
    let listener = TcpListener::bind(listen).await?.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    eprintln!(
        "watch_server on {listen}, {}",
        if watch { "watched" } else { "not watched" }
    );
    if watch {
        axum::serve(WatchedListener::new(listener), app).await
    } else {
        axum::serve(listener, app).await
    }
}

async fn slow() -> &'static str {
    tokio::time::sleep(SLOW).await;
    "done\n"
}

async fn event_stream() -> ([(&'static str, &'static str); 1], Body) {
    let first = stream::once(async { Ok::<_, Infallible>(Bytes::from("data: first\n\n")) });
    let events = stream::StreamExt::chain(first, stream::pending());
    (
        [("content-type", "text/event-stream")],
        Body::from_stream(events),
    )
}
