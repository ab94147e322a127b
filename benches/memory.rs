//! Memory: the size of each future and body wrapper, and heap allocations per request.
//!
//! Run with: `cargo bench --bench memory` (a plain `main`, a few seconds).
//!
//! Sizes are `std::mem::size_of` for a typical inner future,
//! `std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>`, and a `Full<Bytes>` body.
//!
//! Allocations are counted by a counting global allocator (`stats_alloc`, process-wide) over
//! 10,000 requests on a current-thread runtime, after 1,000 to warm up, each request driven as
//! in `benches/overhead.rs`: `ready`, `call`, await the response, finish a `Full` body as hyper
//! does, drop it. The `bare` row is the inner service's own cost; the others show it and what
//! they add to it. The rows with no subscriber run first, in a process that has never set one
//! (every callsite's interest "never", max level OFF).

mod support;

use std::alloc::System;
use std::convert::Infallible;
use std::fmt;
use std::future::{ready, Ready};
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::Full;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use support::{serve_one, subscriber, PendingOnce, ReqBody};
use tower::{Service, ServiceBuilder};
use tower_http::on_early_drop::{EarlyDropsAsFailures, OnEarlyDropLayer};
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tower_timeouts::{ClientDisconnectLayer, ClientGone, ResponseTimeoutLayer};
use tracing::level_filters::LevelFilter;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const TIMEOUT: Duration = Duration::from_secs(10);
const WARM_UP: u64 = 1_000;
const REQUESTS: u64 = 10_000;

type ResBody = Full<Bytes>;
type InnerFuture = Ready<Result<Response<ResBody>, Infallible>>;

fn response() -> Response<ResBody> {
    Response::new(Full::new(Bytes::from_static(b"hello, world")))
}

/// The inner service, with the typical future the sizes are given for.
fn inner_ready() -> impl Service<
    Request<ReqBody>,
    Response = Response<ResBody>,
    Error = Infallible,
    Future = InnerFuture,
> + Clone
       + Send
       + 'static {
    tower::service_fn(|_: Request<ReqBody>| ready(Ok(response())))
}

/// The inner service of the "pending once" column: pending once (waking its task), then ready.
fn inner_pending_once() -> impl Service<
    Request<ReqBody>,
    Response = Response<ResBody>,
    Error = Infallible,
    Future = PendingOnce<Result<Response<ResBody>, Infallible>>,
> + Clone
       + Send
       + 'static {
    tower::service_fn(|_: Request<ReqBody>| PendingOnce {
        value: Some(Ok(response())),
        pending: true,
    })
}

/// Allocations, frees and bytes allocated per request.
#[derive(Clone, Copy, Debug)]
struct PerRequest {
    allocations: f64,
    deallocations: f64,
    reallocations: f64,
    bytes: f64,
}

impl PerRequest {
    fn minus(self, other: PerRequest) -> PerRequest {
        PerRequest {
            allocations: self.allocations - other.allocations,
            deallocations: self.deallocations - other.deallocations,
            reallocations: self.reallocations - other.reallocations,
            bytes: self.bytes - other.bytes,
        }
    }
}

fn count<S, B>(mut service: S) -> PerRequest
where
    S: Service<Request<ReqBody>, Response = Response<B>>,
    S::Error: fmt::Debug,
    B: Body,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        for _ in 0..WARM_UP {
            serve_one(&mut service).await;
        }
        let region = Region::new(GLOBAL);
        for _ in 0..REQUESTS {
            serve_one(&mut service).await;
        }
        let change = region.change();
        let n = REQUESTS as f64;
        PerRequest {
            allocations: change.allocations as f64 / n,
            deallocations: change.deallocations as f64 / n,
            reallocations: change.reallocations as f64 / n,
            bytes: change.bytes_allocated as f64 / n,
        }
    })
}

/// The allocations of `f` alone, once warm.
fn count_once(mut f: impl FnMut()) -> stats_alloc::Stats {
    f();
    let region = Region::new(GLOBAL);
    f();
    region.change()
}

fn future_size<S: Service<Request<ReqBody>>>(_: &S) -> usize {
    std::mem::size_of::<S::Future>()
}

fn body_size<S, B>(_: &S) -> usize
where
    S: Service<Request<ReqBody>, Response = Response<B>>,
{
    std::mem::size_of::<B>()
}

/// Calls `$row!(name, |inner| service)` for every stack, the subscribed ones last.
macro_rules! stacks {
    ($row:ident) => {{
        let on_early_drop =
            || OnEarlyDropLayer::new(EarlyDropsAsFailures::new(DefaultOnFailure::new()));
        let tower_http_timeout = || {
            tower_http::timeout::TimeoutLayer::with_status_code(
                StatusCode::GATEWAY_TIMEOUT,
                TIMEOUT,
            )
        };
        $row!("bare", |inner| inner);
        $row!("tower::timeout::Timeout", |inner| ServiceBuilder::new()
            .layer(tower::timeout::TimeoutLayer::new(TIMEOUT))
            .service(inner));
        $row!("tower-http TimeoutLayer", |inner| ServiceBuilder::new()
            .layer(tower_http_timeout())
            .service(inner));
        $row!("tower-http OnEarlyDropLayer", |inner| ServiceBuilder::new()
            .layer(on_early_drop())
            .service(inner));
        $row!("tower-http OnEarlyDrop + Timeout", |inner| {
            ServiceBuilder::new()
                .layer(on_early_drop())
                .layer(tower_http_timeout())
                .service(inner)
        });
        $row!("ours ResponseTimeout", |inner| ServiceBuilder::new()
            .layer(ResponseTimeoutLayer::new(TIMEOUT))
            .service(inner));
        $row!("ours ClientDisconnect", |inner| ServiceBuilder::new()
            .layer(ClientDisconnectLayer::new())
            .service(inner));
        $row!("ours full stack", |inner| ServiceBuilder::new()
            .layer(ClientDisconnectLayer::new())
            .layer(ResponseTimeoutLayer::new(TIMEOUT))
            .service(inner));
        // Last, once the rows with no subscriber are done: from here on callsites are
        // interested.
        let dispatch = subscriber();
        tracing::dispatcher::with_default(&dispatch, || {
            $row!("ours full stack, subscriber", |inner| ServiceBuilder::new()
                .layer(ClientDisconnectLayer::new())
                .layer(ResponseTimeoutLayer::new(TIMEOUT))
                .service(inner));
            $row!(
                "tower-http Trace + OnEarlyDrop + Timeout, subscriber",
                |inner| ServiceBuilder::new()
                    .layer(TraceLayer::new_for_http())
                    .layer(on_early_drop())
                    .layer(tower_http_timeout())
                    .service(inner)
            );
        });
    }};
}

fn print_sizes() {
    println!(
        "\n## Sizes (bytes), inner future `Ready<Result<Response<Full<Bytes>>, Infallible>>`\n"
    );
    println!("| type | future | response body |");
    println!("|---|---:|---:|");
    macro_rules! size_row {
        ($name:expr, |$inner:ident| $service:expr) => {{
            let $inner = inner_ready();
            let service = $service;
            println!(
                "| {} | {} | {} |",
                $name,
                future_size(&service),
                body_size(&service)
            );
        }};
    }
    stacks!(size_row);

    println!("\n| other type | size |");
    println!("|---|---:|");
    type ConnectInner = Ready<Result<tokio::net::TcpStream, std::io::Error>>;
    let sizes = [
        (
            "`connect_timeout::ConnectFuture<Ready<Result<TcpStream, io::Error>>>`",
            std::mem::size_of::<tower_timeouts::connect_timeout::ConnectFuture<ConnectInner>>(),
        ),
        (
            "`tower::timeout::future::ResponseFuture<Ready<Result<TcpStream, io::Error>>>`",
            std::mem::size_of::<tower::timeout::future::ResponseFuture<ConnectInner>>(),
        ),
        (
            "`Ready<Result<TcpStream, io::Error>>`",
            std::mem::size_of::<ConnectInner>(),
        ),
        (
            "`response_timeout::ResponseFuture<F>` (named)",
            std::mem::size_of::<tower_timeouts::response_timeout::ResponseFuture<InnerFuture>>(),
        ),
        (
            "`client_disconnect::ResponseFuture<F>` (named)",
            std::mem::size_of::<tower_timeouts::client_disconnect::ResponseFuture<InnerFuture>>(),
        ),
        (
            "`DisconnectBody<Full<Bytes>>`",
            std::mem::size_of::<tower_timeouts::client_disconnect::DisconnectBody<ResBody>>(),
        ),
        (
            "`ResponseBody<Full<Bytes>>`",
            std::mem::size_of::<tower_timeouts::ResponseBody<ResBody>>(),
        ),
        (
            "`tower::timeout::future::ResponseFuture<F>` (named)",
            std::mem::size_of::<tower::timeout::future::ResponseFuture<InnerFuture>>(),
        ),
        (
            "F = `Ready<Result<Response<Full<Bytes>>, Infallible>>`",
            std::mem::size_of::<InnerFuture>(),
        ),
        ("`Full<Bytes>`", std::mem::size_of::<ResBody>()),
        (
            "`tokio::time::Sleep`",
            std::mem::size_of::<tokio::time::Sleep>(),
        ),
        (
            "`tokio::task::Unconstrained<Sleep>`",
            std::mem::size_of::<tokio::task::Unconstrained<tokio::time::Sleep>>(),
        ),
        ("`tracing::Span`", std::mem::size_of::<tracing::Span>()),
        (
            "`tokio::time::Instant`",
            std::mem::size_of::<tokio::time::Instant>(),
        ),
        ("`http::Method`", std::mem::size_of::<http::Method>()),
        ("`http::Uri`", std::mem::size_of::<http::Uri>()),
        (
            "`Option<http::HeaderValue>`",
            std::mem::size_of::<Option<http::HeaderValue>>(),
        ),
        (
            "`tower_timeouts::Outcome`",
            std::mem::size_of::<tower_timeouts::Outcome>(),
        ),
        ("`ClientGone`", std::mem::size_of::<ClientGone>()),
        (
            "`tokio::sync::Notify`",
            std::mem::size_of::<tokio::sync::Notify>(),
        ),
    ];
    for (name, size) in sizes {
        println!("| {name} | {size} |");
    }
}

fn print_allocations() {
    println!(
        "\n## Heap allocations per request ({REQUESTS} requests after {WARM_UP} to warm up, \
         current-thread runtime)\n"
    );
    println!(
        "| stack | inner ready: allocs | frees | reallocs | bytes | over bare: allocs | bytes \
         | inner pending once: allocs | over bare: allocs | bytes |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    assert_eq!(
        LevelFilter::current(),
        LevelFilter::OFF,
        "no subscriber yet"
    );
    let mut bare: Option<(PerRequest, PerRequest)> = None;
    macro_rules! alloc_row {
        ($name:expr, |$inner:ident| $service:expr) => {{
            let ready = count({
                let $inner = inner_ready();
                $service
            });
            let pending = count({
                let $inner = inner_pending_once();
                $service
            });
            let (bare_ready, bare_pending) = *bare.get_or_insert((ready, pending));
            let over = ready.minus(bare_ready);
            let over_pending = pending.minus(bare_pending);
            println!(
                "| {} | {:.2} | {:.2} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} | {:.2} | {:.0} |",
                $name,
                ready.allocations,
                ready.deallocations,
                ready.reallocations,
                ready.bytes,
                over.allocations,
                over.bytes,
                pending.allocations,
                over_pending.allocations,
                over_pending.bytes,
            );
        }};
    }
    stacks!(alloc_row);
}

/// Where the allocations come from: the pieces our layers use on every request, counted alone.
fn print_primitives() {
    println!("\n## Allocations of the pieces, alone\n");
    println!("| operation | allocs | bytes |");
    println!("|---|---:|---:|");
    // The size of the crate's `Scope(Arc<Exchange>)` and of `ClientGone`: one pointer.
    #[derive(Clone)]
    struct First(#[allow(dead_code)] u64);
    #[derive(Clone)]
    struct Second(#[allow(dead_code)] u64);
    let row = |name: &str, stats: stats_alloc::Stats| {
        println!(
            "| {name} | {} | {} |",
            stats.allocations, stats.bytes_allocated
        );
    };
    row(
        "first `extensions_mut().insert` of a pointer-sized value into a request with none",
        count_once(|| {
            let mut request = Request::new(());
            request.extensions_mut().insert(First(0));
            black_box(request);
        }),
    );
    let mut second = stats_alloc::Stats::default();
    count_once(|| {
        let mut request = Request::new(());
        request.extensions_mut().insert(First(0));
        let region = Region::new(GLOBAL);
        request.extensions_mut().insert(Second(0));
        second = region.change();
        black_box(request);
    });
    row("second `insert` (another pointer-sized type)", second);
    row(
        "`ClientGone::default()` (an `Arc` of a flag and a `Notify`)",
        count_once(|| drop(black_box(ClientGone::default()))),
    );
    row(
        "`Arc::new` of 256 bytes",
        count_once(|| drop(black_box(std::sync::Arc::new([0u8; 256])))),
    );
    row("`tokio::time::sleep` created and dropped (in a runtime)", {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        count_once(|| drop(black_box(tokio::time::sleep(TIMEOUT))))
    });
    row(
        "`tracing::info_span!` with no subscriber",
        count_once(|| drop(black_box(tracing::info_span!("request", a = 1)))),
    );
}

fn main() {
    // Allocations first: the size table also builds the subscribed stacks, which makes
    // callsites interested for the rest of the process.
    print_allocations();
    print_sizes();
    print_primitives();
}
