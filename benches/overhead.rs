//! Per-request overhead of the crate's layers, side by side with tower's and tower-http's.
//!
//! Run with: `cargo bench --bench overhead` (a few minutes on 2 cores). Add a filter to run part
//! of it, e.g. `cargo bench --bench overhead -- current_thread/ready`.
//!
//! One criterion group per runtime flavour (current-thread, multi-thread with 2 workers) and
//! inner behaviour (ready at its first poll; pending once, waking itself, then ready). In each
//! group every row serves the same request the same way: `ready().await`, `call`, await the
//! response, then finish the body as hyper finishes a `Full` body (poll frames until
//! `is_end_stream()`) and drop it. The service is made once; the loop runs inside a spawned
//! task, one per worker thread (so both workers of the multi-thread runtime are busy, as under
//! load), timed from inside it, so the runtime's `block_on` and spawn are not measured. A row's
//! time is per request and per worker.
//!
//! Rows:
//! - `bare`: the inner `service_fn`-like service alone;
//! - `tower_timeout`: `tower::timeout::Timeout`;
//! - `tower_http_timeout`: `tower_http::timeout::TimeoutLayer::with_status_code(504, _)`;
//! - `tower_http_on_early_drop`: tower-http's `OnEarlyDropLayer` with its documented recording
//!   hook, `EarlyDropsAsFailures::new(DefaultOnFailure::new())`;
//! - `tower_http_timeout_on_early_drop`: both tower-http layers, on-early-drop outermost;
//! - `ours_response_timeout`, `ours_client_disconnect`, `ours_full_stack`
//!   (`ClientDisconnectLayer` around `ResponseTimeoutLayer`), with no tracing subscriber;
//! - `ours_full_stack_subscribed`: the full stack with a subscriber (a registry and a layer that
//!   formats every field of every span and event into a byte counter) as the default;
//! - `tower_http_trace_stack_subscribed`: for scale, tower-http's `TraceLayer` around its timeout
//!   and on-early-drop layers, with the same subscriber.
//!
//! A last group, `pieces`, times what our layers pay for on each request alone (the clock, a
//! request-extension insert, an `Arc`, the disabled span, a timer registered and cancelled, a
//! registered timer re-armed), for the analysis of the rows.
//!
//! "No subscriber" is a global subscriber that is interested in nothing (see [`Off`]), so that
//! the subscribed rows, which set theirs as a scoped default, leave nothing behind.
//!
//! The figures are only meaningful relative to each other, within one run: nothing asserts them.
//! The dev-dependencies turn on tokio's `test-util`, which makes `tokio::time::Instant::now()`
//! inside a runtime (ours, and the one in `tokio::time::sleep`) also lock the runtime's clock
//! mutex; `pieces/tokio_instant_now` next to `pieces/std_instant_now` shows what that costs.

// Wall-clock timing of the benchmark loop itself, not the runtime's (pausable) clock.
#![allow(clippy::disallowed_types)]

mod support;

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::task::Context;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use http::{Request, Response, StatusCode};
use http_body::Body;
use support::{serve_one, subscriber, Inner, ReqBody};
use tokio::runtime::{Builder, Runtime};
use tower::{Service, ServiceBuilder};
use tower_http::on_early_drop::{EarlyDropsAsFailures, OnEarlyDropLayer};
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tower_timeouts::{ClientDisconnectLayer, ResponseTimeoutLayer};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Dispatch, Event, Metadata, Subscriber};

/// Long enough never to fire: every row measures the path where the response wins.
const TIMEOUT: Duration = Duration::from_secs(10);

fn current_thread() -> Runtime {
    Builder::new_current_thread().enable_all().build().unwrap()
}

fn multi_thread(subscriber: Option<&Dispatch>) -> Runtime {
    thread_local! {
        static DEFAULT: RefCell<Option<tracing::subscriber::DefaultGuard>> =
            const { RefCell::new(None) };
    }
    let mut builder = Builder::new_multi_thread();
    builder.worker_threads(2).enable_all();
    if let Some(dispatch) = subscriber {
        // Each worker has the subscriber as its default for its whole life, and drops it when
        // it stops, so that later rows run with no subscriber at all.
        let dispatch = dispatch.clone();
        builder
            .on_thread_start(move || {
                let guard = tracing::dispatcher::set_default(&dispatch);
                DEFAULT.with(|default| *default.borrow_mut() = Some(guard));
            })
            .on_thread_stop(|| DEFAULT.with(|default| drop(default.borrow_mut().take())));
    }
    builder.build().unwrap()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Flavour {
    CurrentThread,
    MultiThread,
}

/// Adds one row: `iters` requests in a loop in one task per worker thread, each timed inside
/// its task from a common start; the row's time is the slowest task's. On the multi-thread
/// runtime both workers are busy, as in a server under load: an idle worker parked on the
/// timer driver would be woken by timer registrations and scheduler notifications at a rate
/// that depends on races, not on the layer being measured.
fn row<S, B>(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &Runtime,
    name: &str,
    service: S,
) where
    S: Service<Request<ReqBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: fmt::Debug,
    B: Body + Send + 'static,
{
    let tasks = rt.metrics().num_workers();
    group.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let start = Arc::new(tokio::sync::Barrier::new(tasks));
            let loops: Vec<_> = (0..tasks)
                .map(|_| {
                    let mut service = service.clone();
                    let start = start.clone();
                    rt.spawn(async move {
                        start.wait().await;
                        let start = Instant::now();
                        for _ in 0..iters {
                            serve_one(&mut service).await;
                        }
                        start.elapsed()
                    })
                })
                .collect();
            rt.block_on(async {
                let mut slowest = Duration::ZERO;
                for handle in loops {
                    slowest = slowest.max(handle.await.expect("bench task"));
                }
                slowest
            })
        })
    });
}

/// A row run with `dispatch` as the default subscriber, on `rt`'s threads and this one.
fn subscribed_row<S, B>(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    flavour: Flavour,
    dispatch: &Dispatch,
    name: &str,
    service: S,
) where
    S: Service<Request<ReqBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: fmt::Debug,
    B: Body + Send + 'static,
{
    let rt = match flavour {
        Flavour::CurrentThread => current_thread(),
        Flavour::MultiThread => multi_thread(Some(dispatch)),
    };
    tracing::dispatcher::with_default(dispatch, || row(group, &rt, name, service));
    drop(rt);
}

fn group(c: &mut Criterion, flavour: Flavour, pending_once: bool) {
    let name = format!(
        "{}/{}",
        match flavour {
            Flavour::CurrentThread => "current_thread",
            Flavour::MultiThread => "multi_thread",
        },
        if pending_once {
            "pending_once"
        } else {
            "ready"
        }
    );
    let rt = match flavour {
        Flavour::CurrentThread => current_thread(),
        Flavour::MultiThread => multi_thread(None),
    };
    let inner = Inner { pending_once };
    let on_early_drop =
        || OnEarlyDropLayer::new(EarlyDropsAsFailures::new(DefaultOnFailure::new()));
    let tower_http_timeout = || {
        tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::GATEWAY_TIMEOUT, TIMEOUT)
    };
    let ours_full_stack = || {
        ServiceBuilder::new()
            .layer(ClientDisconnectLayer::new())
            .layer(ResponseTimeoutLayer::new(TIMEOUT))
            .service(inner)
    };

    // The subscribed rows of the previous group must not leave their interest cached.
    tracing::callsite::rebuild_interest_cache();
    assert_eq!(
        LevelFilter::current(),
        LevelFilter::OFF,
        "a subscriber is still in place"
    );

    let mut group = c.benchmark_group(name);
    row(&mut group, &rt, "bare", inner);
    row(
        &mut group,
        &rt,
        "tower_timeout",
        ServiceBuilder::new()
            .layer(tower::timeout::TimeoutLayer::new(TIMEOUT))
            .service(inner),
    );
    row(
        &mut group,
        &rt,
        "tower_http_timeout",
        ServiceBuilder::new()
            .layer(tower_http_timeout())
            .service(inner),
    );
    row(
        &mut group,
        &rt,
        "tower_http_on_early_drop",
        ServiceBuilder::new().layer(on_early_drop()).service(inner),
    );
    row(
        &mut group,
        &rt,
        "tower_http_timeout_on_early_drop",
        ServiceBuilder::new()
            .layer(on_early_drop())
            .layer(tower_http_timeout())
            .service(inner),
    );
    row(
        &mut group,
        &rt,
        "ours_response_timeout",
        ServiceBuilder::new()
            .layer(ResponseTimeoutLayer::new(TIMEOUT))
            .service(inner),
    );
    row(
        &mut group,
        &rt,
        "ours_client_disconnect",
        ServiceBuilder::new()
            .layer(ClientDisconnectLayer::new())
            .service(inner),
    );
    row(&mut group, &rt, "ours_full_stack", ours_full_stack());

    let dispatch = subscriber();
    subscribed_row(
        &mut group,
        flavour,
        &dispatch,
        "ours_full_stack_subscribed",
        ours_full_stack(),
    );
    subscribed_row(
        &mut group,
        flavour,
        &dispatch,
        "tower_http_trace_stack_subscribed",
        ServiceBuilder::new()
            .layer(TraceLayer::new_for_http())
            .layer(on_early_drop())
            .layer(tower_http_timeout())
            .service(inner),
    );
    group.finish();
    drop(dispatch);
}

/// Stands in for "no subscriber" in a process that also runs subscribed rows: a process that
/// never sets a subscriber has every callsite's interest "never" and the max level OFF; this
/// global default keeps it so once the scoped subscribers of the subscribed rows are gone.
/// (`NoSubscriber` does not do: with no level hint, a rebuild sets the max level to TRACE.)
struct Off;

impl Subscriber for Off {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        Interest::never()
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::OFF)
    }

    fn enabled(&self, _: &Metadata<'_>) -> bool {
        false
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(0xDEAD)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, _: &Event<'_>) {}

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// The pieces our layers pay for on every request, alone, for the analysis of the rows above.
/// Run inside a current-thread runtime's context, as the layers are.
fn pieces(c: &mut Criterion) {
    // Pointer-sized, as the crate's `Scope(Arc<Exchange>)` and `ClientGone` are.
    #[derive(Clone)]
    struct First(#[allow(dead_code)] u64);
    #[derive(Clone)]
    struct Second(#[allow(dead_code)] u64);

    let rt = current_thread();
    let _context = rt.enter();
    let request = || Request::new(ReqBody::new());
    let mut group = c.benchmark_group("pieces");
    group.bench_function("tokio_instant_now", |b| b.iter(tokio::time::Instant::now));
    group.bench_function("std_instant_now", |b| b.iter(Instant::now));
    group.bench_function("request_new_drop", |b| b.iter(|| black_box(request())));
    group.bench_function("request_one_extension", |b| {
        b.iter(|| {
            let mut request = request();
            request.extensions_mut().insert(First(0));
            black_box(request)
        })
    });
    group.bench_function("request_two_extensions", |b| {
        b.iter(|| {
            let mut request = request();
            request.extensions_mut().insert(First(0));
            request.extensions_mut().insert(Second(0));
            black_box(request)
        })
    });
    group.bench_function("arc_new_drop_280_bytes", |b| {
        b.iter(|| black_box(std::sync::Arc::new(black_box([0u8; 280]))))
    });
    group.bench_function("client_gone_new_drop", |b| {
        b.iter(|| black_box(tower_timeouts::ClientGone::default()))
    });
    group.bench_function("make_span_no_subscriber", |b| {
        let request = request();
        b.iter(|| black_box(tower_timeouts::trace::make_span(black_box(&request))))
    });
    group.bench_function("sleep_create_drop", |b| {
        b.iter(|| black_box(tokio::time::sleep(TIMEOUT)))
    });
    // The timer work of a response that is pending once: register at the first pending poll,
    // cancel at drop (what `tower::timeout` does then, and we do).
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    group.bench_function("sleep_create_register_cancel", |b| {
        b.iter(|| {
            let mut sleep = pin!(tokio::time::sleep(TIMEOUT));
            let _ = black_box(sleep.as_mut().poll(&mut cx));
        })
    });
    // Re-arming a `Sleep` that is still registered, to a later deadline: tokio only extends
    // the entry's deadline (one CAS), with no timer-wheel work.
    group.bench_function("sleep_reset_registered_later", |b| {
        let mut sleep = Box::pin(tokio::time::sleep(TIMEOUT));
        let _ = sleep.as_mut().poll(&mut cx);
        b.iter(|| {
            sleep.as_mut().reset(tokio::time::Instant::now() + TIMEOUT);
            let _ = black_box(sleep.as_mut().poll(&mut cx));
        })
    });
    group.finish();
}

fn overhead(c: &mut Criterion) {
    tracing::dispatcher::set_global_default(Dispatch::new(Off)).expect("no global subscriber yet");
    for flavour in [Flavour::CurrentThread, Flavour::MultiThread] {
        for pending_once in [false, true] {
            group(c, flavour, pending_once);
        }
    }
    tracing::callsite::rebuild_interest_cache();
    pieces(c);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    targets = overhead
}
criterion_main!(benches);
