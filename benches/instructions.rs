//! Instructions per request, for a deterministic comparison: one stack, one path, `N`
//! requests in a loop on a current-thread runtime, meant to be run under valgrind's cachegrind
//! by `scripts/instructions.sh`, which takes the difference of two runs (`N` and `2N`) so that
//! start-up cancels out.
//!
//! Wall-clock benches on a shared 2-core VM move by 10–20% from run to run; an instruction
//! count does not move at all, which is what a change to the per-request path needs to be
//! judged by. It is not a time: an instruction that takes a lock or misses the cache counts
//! as one. `cargo bench --bench instructions` alone runs every row once and prints ns per
//! request (a smoke run); `instructions ROW ready|pending N` runs one.
//!
//! Rows: `bare`, `tower_timeout`, `tower_http_on_early_drop`, `tower_http_pair` (on-early-drop
//! around `TimeoutLayer`), `ours_response_timeout`, `ours_client_disconnect`, `ours_full_stack`;
//! no subscriber. On-early-drop is configured as in `benches/overhead.rs`: no-op closures in both
//! slots, the cheapest way to still be told of both early drops.

// Wall-clock timing of the smoke run, not the runtime's clock.
#![allow(clippy::disallowed_types)]

mod support;

use std::time::{Duration, Instant};

use http::response::Parts;
use http::{Request, Response, StatusCode};
use support::{serve_one, Inner, ReqBody};
use tower::{Service, ServiceBuilder};
use tower_http::on_early_drop::{OnBodyDropFn, OnEarlyDropLayer};
use tower_timeouts::{ClientDisconnectLayer, ResponseTimeoutLayer};

const TIMEOUT: Duration = Duration::from_secs(10);
const ROWS: [&str; 7] = [
    "bare",
    "tower_timeout",
    "tower_http_on_early_drop",
    "tower_http_pair",
    "ours_response_timeout",
    "ours_client_disconnect",
    "ours_full_stack",
];

async fn serve<S, B>(mut service: S, n: u64)
where
    S: Service<Request<ReqBody>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
{
    for _ in 0..n {
        serve_one(&mut service).await;
    }
}

/// The cheapest configuration of tower-http's on-early-drop that still reports both early drops.
macro_rules! on_early_drop {
    () => {
        OnEarlyDropLayer::builder()
            .on_future_drop(|_: &Request<ReqBody>| || {})
            .on_body_drop(OnBodyDropFn::new(|_: &Request<ReqBody>| |_: &Parts| || {}))
    };
}

/// Runs `n` requests through `row`; returns the wall time per request, in ns.
fn run(row: &str, pending_once: bool, n: u64) -> f64 {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let inner = Inner { pending_once };
    let start = Instant::now();
    rt.block_on(async move {
        match row {
            "bare" => serve(inner, n).await,
            "tower_timeout" => {
                serve(ServiceBuilder::new().timeout(TIMEOUT).service(inner), n).await
            }
            "tower_http_on_early_drop" => {
                serve(
                    ServiceBuilder::new().layer(on_early_drop!()).service(inner),
                    n,
                )
                .await
            }
            "tower_http_pair" => {
                let service = ServiceBuilder::new()
                    .layer(on_early_drop!())
                    .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                        StatusCode::GATEWAY_TIMEOUT,
                        TIMEOUT,
                    ))
                    .service(inner);
                serve(service, n).await
            }
            "ours_response_timeout" => {
                let service = ServiceBuilder::new()
                    .layer(ResponseTimeoutLayer::new(TIMEOUT))
                    .service(inner);
                serve(service, n).await
            }
            "ours_client_disconnect" => {
                let service = ServiceBuilder::new()
                    .layer(ClientDisconnectLayer::new())
                    .service(inner);
                serve(service, n).await
            }
            "ours_full_stack" => {
                let service = ServiceBuilder::new()
                    .layer(ClientDisconnectLayer::new())
                    .layer(ResponseTimeoutLayer::new(TIMEOUT))
                    .service(inner);
                serve(service, n).await
            }
            other => panic!("unknown row {other:?}; rows: {ROWS:?}"),
        }
    });
    start.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [row, path, n] if !row.starts_with('-') => {
            let n = n.parse().expect("N: a count of requests");
            run(row, path == "pending", n);
        }
        // `cargo bench` passes `--bench` (and maybe a filter): the smoke run.
        _ => {
            for row in ROWS {
                for (path, pending_once) in [("ready", false), ("pending", true)] {
                    let ns = run(row, pending_once, 100_000);
                    println!("instructions (smoke run): {row} {path}: {ns:.0} ns/request");
                }
            }
        }
    }
}
