//! The shutdown scenario: a server of its own, three clients with slow requests in flight, and
//! a shutdown whose grace runs out. Each client gets a 503 and its connection closes; each
//! request is recorded once as `server_shutdown`, never as a 499.

use std::time::Duration;

use axum::routing::get;
use axum::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tower::ServiceBuilder;
use tower_timeouts::signal::Cancelled;
use tower_timeouts::{ClientDisconnectLayer, ClientGone, Outcome, Report, Shutdown};

use super::{ms, Row, WAIT};

/// The grace the requests in flight get once the shutdown begins.
const GRACE: Duration = Duration::from_millis(300);
/// Clients with a request in flight when the shutdown begins.
const CLIENTS: usize = 3;

pub(super) async fn run() -> Result<Row, String> {
    let shutdown = Shutdown::new(GRACE);
    let (outcomes_tx, mut outcomes) = mpsc::unbounded_channel();
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let app = Router::new()
        .route(
            "/work",
            get(move || {
                let started = started_tx.clone();
                async move {
                    let _ = started.send(ClientGone::current());
                    std::future::pending::<&'static str>().await
                }
            }),
        )
        .layer(ServiceBuilder::new().layer(shutdown.layer()).layer(
            ClientDisconnectLayer::new().on_outcome(move |report: &Report<'_>| {
                let _ = outcomes_tx.send(report.outcome().clone());
            }),
        ));
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot listen on 127.0.0.1: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let serving = axum::serve(listener, app).with_graceful_shutdown(shutdown.begun());
    let server = tokio::spawn(async move { serving.await });
    println!(
        "\nshutdown: axum on {addr}: Shutdown(grace {} ms) outermost + ClientDisconnectLayer; \
         {CLIENTS} clients with a request in flight, then the shutdown begins",
        GRACE.as_millis()
    );

    let mut clients = Vec::with_capacity(CLIENTS);
    let mut signals = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let mut stream = timeout(WAIT, TcpStream::connect(addr))
            .await
            .map_err(|_| "connecting took too long".to_owned())?
            .map_err(|e| format!("connect failed: {e}"))?;
        let request = format!("GET /work HTTP/1.1\r\nhost: {addr}\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("sending failed: {e}"))?;
        clients.push(stream);
        // Each handler says it started: the shutdown begins with all of them in flight.
        match timeout(WAIT, started.recv()).await {
            Ok(Some(gone)) => signals.push(gone),
            _ => return Err("a handler did not start".to_owned()),
        }
    }
    let began = Instant::now();
    shutdown.begin();

    let mut problems = Vec::new();
    let mut seen = Vec::new();
    let mut after_grace = Vec::new();
    for mut stream in clients {
        let mut raw = Vec::new();
        match timeout(WAIT, stream.read_to_end(&mut raw)).await {
            Ok(Ok(_)) => {}
            _ => problems.push("a client's connection was not closed after its answer".to_owned()),
        }
        after_grace.push(began.elapsed().saturating_sub(GRACE));
        let raw = String::from_utf8_lossy(&raw);
        let status_line = raw.lines().next().unwrap_or("(nothing)").to_owned();
        let close = raw
            .lines()
            .take_while(|line| !line.is_empty())
            .any(|line| line.eq_ignore_ascii_case("connection: close"));
        if !status_line.starts_with("HTTP/1.1 503 ") || !close {
            problems.push(format!("a client saw {status_line:?}, close: {close}"));
        }
        seen.push(status_line.replace("HTTP/1.1 ", ""));
    }
    seen.dedup();

    let mut recorded = Vec::new();
    for _ in 0..CLIENTS {
        match timeout(WAIT, outcomes.recv()).await {
            Ok(Some(outcome)) => recorded.push(outcome),
            _ => problems.push("an outcome was not recorded".to_owned()),
        }
    }
    if let Ok(extra) = outcomes.try_recv() {
        problems.push(format!("an extra outcome was recorded: {extra:?}"));
    }
    for outcome in &recorded {
        if !matches!(outcome, Outcome::ServerShutdown { .. })
            || outcome.recorded_status().map(|s| s.as_u16()) != Some(503)
        {
            problems.push(format!("recorded {outcome:?}, not server_shutdown (503)"));
        }
    }
    let reasons: Vec<_> = signals
        .iter()
        .map(|gone| gone.as_ref().and_then(ClientGone::reason))
        .collect();
    if reasons
        .iter()
        .any(|reason| *reason != Some(Cancelled::ServerShutdown))
    {
        problems.push(format!("the handlers' signals say {reasons:?}"));
    }
    match timeout(WAIT, server).await {
        Ok(Ok(Ok(()))) => {}
        _ => problems.push("the server did not finish after its grace".to_owned()),
    }
    let latest = after_grace.iter().max().copied().unwrap_or_default();
    Ok(Row {
        name: "shutdown",
        seen: format!(
            "{CLIENTS}× {}, Connection: close, then closed, at most {} after the grace",
            seen.join(" / "),
            ms(latest)
        ),
        recorded: format!(
            "{CLIENTS}× server_shutdown (503), ClientGone cancelled with {}, never gone; the \
             server stopped",
            reasons
                .first()
                .copied()
                .flatten()
                .map_or_else(|| "nothing".to_owned(), |reason| format!("{reason:?}"))
        ),
        problems,
    })
}
