//! The metrics hook's cost per request, against a bare hook.
//!
//! Run with: `cargo bench --features metrics --bench hooks` (a plain `main`, a few seconds).
//!
//! Both cases are a `ClientDisconnectLayer` around a service that answers a 12-byte `Full`
//! body at once, driven as `benches/overhead.rs` drives it (ready, call, the body to its end,
//! drop), on a current-thread runtime, with no tracing subscriber; each request is a GET of
//! `/users/42` with a `User-Agent`. The hooks: a closure that does nothing (`bare`), and
//! `metrics::ServerMetrics` with no recorder installed (the `metrics` facade's no-op), so the
//! figure is the hook's own work (its labels, the key, the facade's call), not an exporter's.
//! Any hook makes every request take the recording path, so both pay for the exchange and
//! the request's `RequestInfo`; the difference is the metrics hook itself.
//!
//! 21 rounds of 100,000 requests per case, interleaved (the order alternates); the figures are
//! medians over the rounds of each round's ns per request, and of the per-round difference and
//! ratio, with their min–max.

// Wall-clock timing, not the runtime's clock.
#![allow(clippy::disallowed_types)]

mod support;

use std::hint::black_box;
use std::time::Instant;

use http::Request;
use http_body::Body;
use support::report::{median, selected};
use support::Inner;
use tower::{Layer, Service, ServiceExt};
use tower_timeouts::metrics::ServerMetrics;
use tower_timeouts::{ClientDisconnectLayer, OnOutcome, Report};

const ROUNDS: usize = 21;
const REQUESTS: usize = 100_000;

/// ns per request over `REQUESTS` requests through `ClientDisconnectLayer` with `hook`.
async fn round(hook: impl OnOutcome + Clone) -> f64 {
    let mut service = ClientDisconnectLayer::new().on_outcome(hook).layer(Inner {
        pending_once: false,
    });
    let start = Instant::now();
    for _ in 0..REQUESTS {
        let request = Request::get("/users/42")
            .header("user-agent", "bench/1.0")
            .body(support::ReqBody::new())
            .expect("request");
        let response = ServiceExt::<Request<support::ReqBody>>::ready(&mut service)
            .await
            .expect("ready")
            .call(request)
            .await
            .expect("response");
        // As hyper does for a `Full` body: frames until `is_end_stream()`, then drop.
        let (parts, body) = response.into_parts();
        black_box(&parts);
        let mut body = std::pin::pin!(body);
        while !body.is_end_stream() {
            match std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
                Some(frame) => drop(black_box(frame.ok())),
                None => break,
            }
        }
    }
    start.elapsed().as_nanos() as f64 / REQUESTS as f64
}

fn main() {
    if !selected("hooks") {
        println!("hooks: skipped (the filter does not match)");
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let bare = |_: &Report<'_>| {};
    let metrics = ServerMetrics::new();
    let (mut bares, mut metered) = (Vec::new(), Vec::new());
    rt.block_on(async {
        // Warm-up.
        round(bare).await;
        round(metrics).await;
        for r in 0..ROUNDS {
            if r % 2 == 0 {
                bares.push(round(bare).await);
                metered.push(round(metrics).await);
            } else {
                metered.push(round(metrics).await);
                bares.push(round(bare).await);
            }
        }
    });
    let mut differences: Vec<f64> = metered.iter().zip(&bares).map(|(m, b)| m - b).collect();
    let mut ratios: Vec<f64> = metered.iter().zip(&bares).map(|(m, b)| m / b).collect();
    differences.sort_by(f64::total_cmp);
    ratios.sort_by(f64::total_cmp);
    println!(
        "hooks: bare hook {:.0} ns/request, metrics hook {:.0} ns/request (medians of {ROUNDS} rounds)",
        median(&bares),
        median(&metered)
    );
    println!(
        "hooks: metrics hook − bare hook: {:+.0} ns per request (min {:+.0}, max {:+.0}); ratio {:.2} ({:.2}–{:.2})",
        median(&differences),
        differences[0],
        differences[differences.len() - 1],
        median(&ratios),
        ratios[0],
        ratios[ratios.len() - 1]
    );
}
