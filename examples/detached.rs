//! Run with: cargo run --example detached
//!
//! A server whose `/transfer` handler must not be cut in half: under `DetachLayer`, it runs to
//! its end even when its client leaves (the 499 is still recorded), and at shutdown the server
//! drains that detached work under a cap before it exits.
//!
//! Try it:
//!
//! ```sh
//! curl -m 0.5 localhost:3000/transfer   # leaves after 0.5 s; the transfer still commits
//! # then press Ctrl-C in the server's terminal: it waits up to 5 s for detached work
//! ```

use std::time::Duration;

use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_timeouts::detach::Finished;
use tower_timeouts::{ClientDisconnectLayer, DetachLayer, Outcome, Report, ResponseTimeoutLayer};

/// How long detached work may still run once the server stopped accepting.
const DRAIN_CAP: Duration = Duration::from_secs(5);

/// Two steps that must both happen, or neither.
async fn transfer() -> &'static str {
    println!("transfer: debited");
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("transfer: credited");
    "committed\n"
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let detach = DetachLayer::new(Duration::from_secs(30)).on_finish(|finished: &Finished| {
        println!("detached work ended after its client left: {finished:?}");
    });
    // Kept to drain the detached work at shutdown.
    let tracker = detach.tracker();

    let app = Router::new()
        .route("/transfer", get(transfer).layer(detach))
        .layer(
            ServiceBuilder::new()
                .layer(
                    ClientDisconnectLayer::new().on_outcome(|report: &Report<'_>| {
                        if let Outcome::ClientDisconnected { .. } = report.outcome() {
                            println!("recorded: the client left after {:?}", report.elapsed());
                        }
                    }),
                )
                .layer(ResponseTimeoutLayer::new(Duration::from_secs(10))),
        );

    let listener = TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://127.0.0.1:3000 (Ctrl-C to stop)");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
            println!("shutting down: no new connections");
        })
        .await?;

    // The server is done with its connections; detached handlers may still be running.
    tracker.close();
    println!(
        "draining {} detached handler(s), for at most {DRAIN_CAP:?}",
        tracker.len()
    );
    match tokio::time::timeout(DRAIN_CAP, tracker.wait()).await {
        Ok(()) => println!("all detached work finished"),
        Err(_) => println!("{} detached handler(s) cut at the cap", tracker.len()),
    }
    Ok(())
}
