//! Run with: cargo run --example detached
//!
//! A server whose `/transfer` handler must not be cut in half: under `DetachLayer`, it runs to
//! its end even when its client leaves (the 499 is still recorded). At shutdown (Ctrl-C), the
//! requests in flight get a grace (`Shutdown`, then a 503), and the detached work drains after
//! the server, under a cap of its own, before the process exits.
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
use tower_timeouts::{
    ClientDisconnectLayer, DetachLayer, Outcome, Report, ResponseTimeoutLayer, Shutdown,
};

/// The grace of the requests in flight once the shutdown begins; then they get a 503.
const GRACE: Duration = Duration::from_secs(3);
/// How long detached work may still run once the server is done.
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

    let shutdown = Shutdown::new(GRACE);

    let app = Router::new()
        .route("/transfer", get(transfer).layer(detach))
        .layer(
            ServiceBuilder::new()
                .layer(shutdown.layer())
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
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        println!("shutting down: no new connections; {GRACE:?} for the requests in flight");
        on_signal.begin();
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.begun())
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
