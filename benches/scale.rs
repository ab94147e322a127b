//! Scale: 100,000 requests in flight at once, through timeouts that all fire, and through
//! client-disconnect detection when all the clients leave at once.
//!
//! Run with: `cargo bench --bench scale` (a plain `main`, about a minute on 2 cores; progress
//! goes to stderr). A filter argument that is not part of "scale" skips it
//! (`cargo bench -- foo`); flags are ignored.
//!
//! In process, with no sockets: 100,000 real connections are out of reach here (`ulimit -n` is
//! 20,000, and the load generator would need as many descriptors again), so each request is a
//! tokio task that calls the service and awaits its response, as hyper's connection task does.
//! The inner service never answers (`service_fn` returning `std::future::pending()`). Every row
//! runs on a fresh multi-thread runtime with 2 worker threads; the main thread spawns the
//! 100,000 tasks (through the runtime's injection queue, as an accept loop on another thread
//! would) and otherwise sleeps in 1 ms steps while it waits. No tracing subscriber is set
//! anywhere in the process.
//!
//! Each part's rows run `ROUNDS` (3) times, interleaved in a rotating order (round 1: bare,
//! ours, …; round 2: ours, …, bare; …) so that drift from other work on the machine spreads
//! over all of them; the tables give the median over the rounds (and, for lateness, also the
//! worst round's max); the JSON has every round.
//!
//! Every task is the same generic `request` future (so the rows differ by the service alone):
//! `poll_ready`, note the call time, `call`, await the response (counting the request "in
//! flight" after its first poll), note the arrival time, check the response; a guard owned by
//! the task counts the task as finished when it is dropped, whether it completed or was
//! aborted.
//!
//! Memory per in-flight request: allocations are counted process-wide by `stats_alloc`, from
//! just before the first spawn until all 100,000 requests have been polled once; "live" is
//! bytes allocated minus bytes freed in that span, divided by 100,000. It counts requested
//! sizes (not the allocator's rounding); it includes the task itself (tokio allocates one cell
//! per task, cache-line aligned, holding the whole future, so a bigger future shows in steps of
//! 128 bytes) and everything the layers allocate per request. The `bare` row of each part is the
//! same task around the inner service with no layer: "over bare" is the layer's own cost. "left
//! after" is what is still live once every task is done and its `JoinHandle` dropped (should be
//! about 0; more would be a leak).
//!
//! (a) Timeouts, `TIMEOUT` (2 s), rows: `bare` (no layer, no timeout: measured, then aborted),
//! ours `ResponseTimeoutLayer` (expects a 504 response), ours full stack (`ClientDisconnectLayer`
//! around `ResponseTimeoutLayer`, 504), tower-http's
//! `TimeoutLayer::with_status_code(504, TIMEOUT)` (504), tower's `TimeoutLayer` (its `Elapsed`
//! error is the timeout); and, to tell the cost of the 504 we generate from the timer's, ours
//! `ResponseTimeoutLayer` with a minimal response (`without_proxy_status()` and a
//! `response_with` that makes an empty 504, no headers). Lateness of a request: its arrival
//! minus its deadline, the deadline being the call time plus `TIMEOUT` (ours counts from the
//! first poll, a few microseconds later; tokio rounds a timer up to the next millisecond, so
//! about 0.5 ms on average is the timer's own granularity). p50, p99 and max over the
//! 100,000; `> 20 ms` counts those later than the target; "calls spread" is the time from
//! the first call to the last (how long it took to get all of them in flight); "drain" is from the last deadline until the last
//! response arrived. The calls come as fast as one thread can spawn tasks (100,000 in about
//! 0.1 s), so the deadlines all fall in as short a window: lateness here shows whether a
//! layer's timeout path keeps up with about a million expiries a second on 2 workers as much
//! as how precise the timer is. Whatever a layer does when its timer fires (ours builds and
//! records a response) is on that path.
//!
//! (b) Clients leaving, rows: `bare`, ours `ClientDisconnectLayer` with an `on_outcome` hook that
//! counts `Outcome::ClientDisconnected`, ours full stack (the same hook, and a 10 s
//! `ResponseTimeoutLayer` inside, so 100,000 timers are registered too), tower-http's
//! `OnEarlyDropLayer` with `EarlyDropsAsFailures` around a counting `OnFailure` (counts
//! `DroppedFailure::Future`), and the same around tower-http's `TimeoutLayer` (10 s). Once all
//! are in flight, the main thread calls `JoinHandle::abort` on every task (tokio then drops each
//! task's future on a worker, as hyper's connection task drops the response future when the
//! connection goes). Times from the first `abort`: "aborts issued" (the main thread's loop),
//! "all counted" (the hook's 100,000th call) and "all dropped" (the last task's guard).
//!
//! (c) As (a), without `bare` and the minimal 504, the calls paced over 1 s (a sleep on the
//! calling thread every 1,000 calls): still all 100,000 in flight at once (the first deadline
//! is 2 s after the first call), but their deadlines come at 100,000 a second, a busy
//! server's rate, rather than the million a second of (a).
//!
//! Targets from the issue, reported, not asserted: memory per in-flight request no more than
//! tower-http's; every timeout fires within 20 ms of its deadline at 100,000 in flight. The
//! dev-dependencies turn on tokio's `test-util`, which makes `tokio::time::Instant::now()` lock
//! a mutex (ours calls it at the first poll and when the request starts, tokio's `sleep` at
//! creation); a build without it does not. The counting allocator is in place for the timings
//! too (each allocation and free adds to shared atomic counters), which makes allocations a
//! little dearer than in a normal build, for every row. The results also go to
//! `<target dir>/tower-timeouts-bench/scale.json`.

// Wall-clock timing, not the runtime's (pausable) clock.
#![allow(clippy::disallowed_types)]

mod support;

use std::alloc::System;
use std::convert::Infallible;
use std::future::{pending, poll_fn, Future, Pending};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use support::report::{median, percentile, selected, write_json, Json};
use support::ReqBody;
use tokio::runtime::{Builder, Runtime};
use tokio::task::JoinHandle;
use tower::{BoxError, Service, ServiceBuilder};
use tower_http::on_early_drop::{DroppedFailure, EarlyDropsAsFailures, OnEarlyDropLayer};
use tower_http::trace::OnFailure;
use tower_timeouts::{ClientDisconnectLayer, Outcome, Report, ResponseTimeoutLayer};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Requests in flight at once.
const IN_FLIGHT: usize = 100_000;
/// The timeout of part (a), which fires for every request.
const TIMEOUT: Duration = Duration::from_secs(2);
/// The timeout of part (b), which never fires.
const LONG_TIMEOUT: Duration = Duration::from_secs(10);
/// Rounds: every row runs this many times, interleaved with the others.
const ROUNDS: usize = 3;
/// In (c), the time over which the calls are paced: well inside `TIMEOUT`, so that every
/// request is in flight at once, yet the deadlines come at 100,000 a second, not a million.
const PACE: Duration = Duration::from_secs(1);
/// The target for lateness.
const TARGET_LATENESS: Duration = Duration::from_millis(20);
/// How long getting every request in flight may take before the row is given up.
const SETTLE_LIMIT: Duration = Duration::from_secs(20);
/// How long, after the last deadline or the aborts, the requests may take to finish.
const FINISH_LIMIT: Duration = Duration::from_secs(20);

type ResBody = Full<Bytes>;
type InnerResult = Result<Response<ResBody>, Infallible>;

/// The inner service: never answers.
fn never() -> impl Service<
    Request<ReqBody>,
    Response = Response<ResBody>,
    Error = Infallible,
    Future = Pending<InnerResult>,
> + Clone
       + Send
       + 'static {
    tower::service_fn(|_: Request<ReqBody>| pending::<InnerResult>())
}

/// What the tasks of one row record, allocated before the measured span.
struct Probe {
    base: Instant,
    /// Nanoseconds since `base`; `u64::MAX` for none.
    called: Vec<AtomicU64>,
    arrived: Vec<AtomicU64>,
    in_flight: AtomicUsize,
    expected: AtomicUsize,
    unexpected: AtomicUsize,
    finished: AtomicUsize,
    all_finished: OnceLock<Instant>,
}

impl Probe {
    fn new() -> Self {
        let none = || (0..IN_FLIGHT).map(|_| AtomicU64::new(u64::MAX)).collect();
        Probe {
            base: Instant::now(),
            called: none(),
            arrived: none(),
            in_flight: AtomicUsize::new(0),
            expected: AtomicUsize::new(0),
            unexpected: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            all_finished: OnceLock::new(),
        }
    }

    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }
}

/// Owned by each task: counts it as finished when it is dropped (done or aborted), after the
/// response future (the async fn's locals go before its arguments).
struct Finish(Arc<Probe>);

impl Drop for Finish {
    fn drop(&mut self) {
        if self.0.finished.fetch_add(1, Ordering::AcqRel) + 1 == IN_FLIGHT {
            let _ = self.0.all_finished.set(Instant::now());
        }
    }
}

/// The counter behind an outcome hook.
#[derive(Debug, Default)]
struct Tally {
    count: AtomicUsize,
    all_counted: OnceLock<Instant>,
}

impl Tally {
    fn add(&self) {
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 == IN_FLIGHT {
            let _ = self.all_counted.set(Instant::now());
        }
    }
}

/// One request, as a connection task drives it.
async fn request<S, B, E>(
    i: usize,
    mut service: S,
    finish: Finish,
    check: fn(&Result<Response<B>, E>) -> bool,
) where
    S: Service<Request<ReqBody>, Response = Response<B>, Error = E>,
{
    let probe = &*finish.0;
    if poll_fn(|cx| service.poll_ready(cx)).await.is_err() {
        probe.unexpected.fetch_add(1, Ordering::Relaxed);
        return;
    }
    probe.called[i].store(probe.now(), Ordering::Relaxed);
    let mut response = pin!(service.call(Request::new(ReqBody::new())));
    let mut first = true;
    let result = poll_fn(|cx| {
        let polled = response.as_mut().poll(cx);
        if first {
            first = false;
            probe.in_flight.fetch_add(1, Ordering::Release);
        }
        polled
    })
    .await;
    probe.arrived[i].store(probe.now(), Ordering::Relaxed);
    let counter = if check(&result) {
        &probe.expected
    } else {
        &probe.unexpected
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

fn is_504<B, E>(result: &Result<Response<B>, E>) -> bool {
    matches!(result, Ok(response) if response.status() == StatusCode::GATEWAY_TIMEOUT)
}

fn is_elapsed<B>(result: &Result<Response<B>, BoxError>) -> bool {
    matches!(result, Err(error) if error.is::<tower::timeout::error::Elapsed>())
}

/// For the rows where no response may arrive.
fn none_expected<B, E>(_: &Result<Response<B>, E>) -> bool {
    false
}

/// Sleeps in 1 ms steps until `done`, at most `limit`; whether it got there.
fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

/// How a row ends once every request is in flight.
#[derive(Clone, Copy, Debug, PartialEq)]
enum End {
    /// Wait for the timeouts (part a).
    Timeouts,
    /// Abort every task (part b, and the bare row of part a).
    Abort,
}

/// Part (a)'s figures of one run of a row, in milliseconds.
#[derive(Clone, Copy, Debug, Default)]
struct Lateness {
    p50: f64,
    p99: f64,
    max: f64,
    /// Negative would be a response before its deadline.
    min: f64,
    over_target: usize,
    calls_spread: f64,
    /// From the last deadline to the last response.
    drain: f64,
}

/// Part (b)'s figures of one run of a row, in milliseconds from the first `abort`.
#[derive(Clone, Copy, Debug, Default)]
struct Leaving {
    aborts_issued: f64,
    counted: Option<usize>,
    all_counted: Option<f64>,
    all_dropped: Option<f64>,
}

/// One run of a row.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    future_size: usize,
    settled: bool,
    finished_before_measure: usize,
    live_bytes: f64,
    allocations: f64,
    left_after: f64,
    expected: usize,
    unexpected: usize,
    panics: usize,
    all_finished: bool,
    lateness: Option<Lateness>,
    leaving: Option<Leaving>,
}

fn runtime() -> Runtime {
    Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Bytes still live per request, to a tenth of a byte (and no "-0.0").
fn live(stats: stats_alloc::Stats) -> f64 {
    let bytes = (stats.bytes_allocated as f64 - stats.bytes_deallocated as f64) / IN_FLIGHT as f64;
    (bytes * 10.0).round() / 10.0 + 0.0
}

fn ms_of(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs a row once: 100,000 requests in flight through `service`, measured, then ended by
/// `end`.
fn run<S, B, E>(
    service: S,
    check: fn(&Result<Response<B>, E>) -> bool,
    end: End,
    tally: Option<&Tally>,
    pace: Duration,
) -> Run
where
    S: Service<Request<ReqBody>, Response = Response<B>, Error = E> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    E: Send + 'static,
{
    let rt = runtime();
    let probe = Arc::new(Probe::new());
    let mut handles: Vec<JoinHandle<()>> = Vec::with_capacity(IN_FLIGHT);
    let mut run = Run::default();

    let region = Region::new(GLOBAL);
    let pacing = Instant::now();
    for i in 0..IN_FLIGHT {
        // Paced calls: the i-th is due at i/IN_FLIGHT of `pace` (checked every 1,000 calls).
        if !pace.is_zero() && i % 1000 == 0 {
            let due = pace.mul_f64(i as f64 / IN_FLIGHT as f64);
            std::thread::sleep(due.saturating_sub(pacing.elapsed()));
        }
        let task = request(i, service.clone(), Finish(probe.clone()), check);
        if i == 0 {
            run.future_size = std::mem::size_of_val(&task);
        }
        handles.push(rt.spawn(task));
    }
    run.settled = wait_until(SETTLE_LIMIT, || {
        probe.in_flight.load(Ordering::Acquire) == IN_FLIGHT
    });
    let change = region.change();
    run.finished_before_measure = probe.finished.load(Ordering::Acquire);
    run.live_bytes = live(change);
    run.allocations = change.allocations as f64 / IN_FLIGHT as f64;

    let ended = Instant::now();
    if end == End::Abort || !run.settled {
        for handle in &handles {
            handle.abort();
        }
    }
    let aborts_issued = ended.elapsed();
    let limit = match end {
        End::Timeouts => TIMEOUT + FINISH_LIMIT,
        End::Abort => FINISH_LIMIT,
    };
    run.all_finished = wait_until(limit, || {
        probe.finished.load(Ordering::Acquire) == IN_FLIGHT
    });
    if !run.all_finished {
        for handle in &handles {
            handle.abort();
        }
    }
    run.panics = rt.block_on(async {
        let mut panics = 0;
        for handle in handles.drain(..) {
            if let Err(error) = handle.await {
                panics += usize::from(error.is_panic());
            }
        }
        panics
    });
    run.left_after = live(region.change());
    drop(handles);
    rt.shutdown_timeout(Duration::from_secs(5));

    run.expected = probe.expected.load(Ordering::Acquire);
    run.unexpected = probe.unexpected.load(Ordering::Acquire);
    let since_end = |at: Option<&Instant>| at.map(|at| ms_of(at.saturating_duration_since(ended)));
    match end {
        End::Timeouts => run.lateness = Some(lateness(&probe)),
        End::Abort => {
            run.leaving = Some(Leaving {
                aborts_issued: ms_of(aborts_issued),
                counted: tally.map(|tally| tally.count.load(Ordering::Acquire)),
                all_counted: tally.and_then(|tally| since_end(tally.all_counted.get())),
                all_dropped: since_end(probe.all_finished.get()),
            })
        }
    }
    run
}

fn lateness(probe: &Probe) -> Lateness {
    let timeout = TIMEOUT.as_nanos() as i64;
    let mut late = Vec::with_capacity(IN_FLIGHT);
    let (mut first_call, mut last_call, mut last_arrival) = (u64::MAX, 0, 0);
    for (called, arrived) in probe.called.iter().zip(&probe.arrived) {
        let (called, arrived) = (
            called.load(Ordering::Relaxed),
            arrived.load(Ordering::Relaxed),
        );
        if called == u64::MAX || arrived == u64::MAX {
            continue;
        }
        first_call = first_call.min(called);
        last_call = last_call.max(called);
        last_arrival = last_arrival.max(arrived);
        late.push(arrived as i64 - called as i64 - timeout);
    }
    late.sort_unstable();
    if late.is_empty() {
        return Lateness::default();
    }
    let ms = |ns: i64| ns as f64 / 1e6;
    let target = TARGET_LATENESS.as_nanos() as i64;
    Lateness {
        p50: ms(percentile(&late, 0.50)),
        p99: ms(percentile(&late, 0.99)),
        max: ms(percentile(&late, 1.0)),
        min: ms(late[0]),
        over_target: late.iter().filter(|&&ns| ns > target).count(),
        calls_spread: ms(last_call as i64 - first_call as i64),
        drain: ms(last_arrival as i64 - last_call as i64 - timeout),
    }
}

/// A row: its name and how to run it once.
struct Row {
    name: &'static str,
    run: Box<dyn Fn() -> Run>,
}

fn row(name: &'static str, run: impl Fn() -> Run + 'static) -> Row {
    Row {
        name,
        run: Box::new(run),
    }
}

/// Runs every row `ROUNDS` times, interleaved, in a rotating order (round 2 starts with the
/// second row, …); returns each row's runs.
fn interleaved(part: &str, rows: &[Row]) -> Vec<Vec<Run>> {
    let mut runs = vec![Vec::with_capacity(ROUNDS); rows.len()];
    for round in 0..ROUNDS {
        for k in 0..rows.len() {
            let r = (round + k) % rows.len();
            let started = Instant::now();
            runs[r].push((rows[r].run)());
            eprintln!(
                "scale ({part}) round {}/{ROUNDS}: {} ({:.1} s)",
                round + 1,
                rows[r].name,
                started.elapsed().as_secs_f64()
            );
        }
    }
    runs
}

/// The rows of (a), with the calls `pace`d over that time (zero: as fast as they come); paced,
/// only the rows with a timeout.
fn part_a(pace: Duration) -> Vec<Row> {
    let tower_http_timeout = || {
        tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::GATEWAY_TIMEOUT, TIMEOUT)
    };
    let mut rows = vec![
        row("bare", || {
            run(never(), none_expected, End::Abort, None, Duration::ZERO)
        }),
        row("ours ResponseTimeout", move || {
            run(
                ServiceBuilder::new()
                    .layer(ResponseTimeoutLayer::new(TIMEOUT))
                    .service(never()),
                is_504,
                End::Timeouts,
                None,
                pace,
            )
        }),
        row("ours full stack", move || {
            run(
                ServiceBuilder::new()
                    .layer(ClientDisconnectLayer::new())
                    .layer(ResponseTimeoutLayer::new(TIMEOUT))
                    .service(never()),
                is_504,
                End::Timeouts,
                None,
                pace,
            )
        }),
        row("ours ResponseTimeout, minimal 504", move || {
            run(
                ServiceBuilder::new()
                    .layer(
                        ResponseTimeoutLayer::new(TIMEOUT)
                            .without_proxy_status()
                            .response_with(|_| {
                                let mut response = Response::new(Bytes::new());
                                *response.status_mut() = StatusCode::GATEWAY_TIMEOUT;
                                response
                            }),
                    )
                    .service(never()),
                is_504,
                End::Timeouts,
                None,
                pace,
            )
        }),
        row("tower-http TimeoutLayer", move || {
            run(
                ServiceBuilder::new()
                    .layer(tower_http_timeout())
                    .service(never()),
                is_504,
                End::Timeouts,
                None,
                pace,
            )
        }),
        row("tower TimeoutLayer", move || {
            run(
                ServiceBuilder::new()
                    .layer(tower::timeout::TimeoutLayer::new(TIMEOUT))
                    .service(never()),
                is_elapsed,
                End::Timeouts,
                None,
                pace,
            )
        }),
    ];
    if !pace.is_zero() {
        rows.retain(|row| row.name != "bare" && !row.name.contains("minimal"));
    }
    rows
}

/// Counts `Outcome::ClientDisconnected` into `tally`.
fn ours_hook(tally: &Arc<Tally>) -> impl Fn(&Report<'_>) + Send + Sync + 'static {
    let tally = tally.clone();
    move |report: &Report<'_>| {
        if matches!(report.outcome(), Outcome::ClientDisconnected { .. }) {
            tally.add();
        }
    }
}

/// A counting `OnFailure` for tower-http's `EarlyDropsAsFailures`: counts
/// `DroppedFailure::Future` into its tally.
#[derive(Clone, Debug)]
struct CountFutureDrops(Arc<Tally>);

impl OnFailure<DroppedFailure> for CountFutureDrops {
    fn on_failure(&mut self, failure: DroppedFailure, _: Duration, _: &tracing::Span) {
        if matches!(failure, DroppedFailure::Future(_)) {
            self.0.add();
        }
    }
}

type CountingHook = EarlyDropsAsFailures<CountFutureDrops>;

/// tower-http's `OnEarlyDropLayer` as `benches/overhead.rs` builds it, with the counting
/// `OnFailure` in place of `DefaultOnFailure`.
fn tower_http_on_early_drop(tally: &Arc<Tally>) -> OnEarlyDropLayer<CountingHook, CountingHook> {
    OnEarlyDropLayer::new(EarlyDropsAsFailures::new(CountFutureDrops(tally.clone())))
}

fn part_b() -> Vec<Row> {
    let tower_http_timeout = || {
        tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::GATEWAY_TIMEOUT,
            LONG_TIMEOUT,
        )
    };
    vec![
        row("bare", || {
            run(never(), none_expected, End::Abort, None, Duration::ZERO)
        }),
        row("ours ClientDisconnect", || {
            let tally = Arc::new(Tally::default());
            run(
                ServiceBuilder::new()
                    .layer(ClientDisconnectLayer::new().on_outcome(ours_hook(&tally)))
                    .service(never()),
                none_expected,
                End::Abort,
                Some(&tally),
                Duration::ZERO,
            )
        }),
        row("ours full stack", || {
            let tally = Arc::new(Tally::default());
            run(
                ServiceBuilder::new()
                    .layer(ClientDisconnectLayer::new().on_outcome(ours_hook(&tally)))
                    .layer(ResponseTimeoutLayer::new(LONG_TIMEOUT))
                    .service(never()),
                none_expected,
                End::Abort,
                Some(&tally),
                Duration::ZERO,
            )
        }),
        row("tower-http OnEarlyDrop", || {
            let tally = Arc::new(Tally::default());
            run(
                ServiceBuilder::new()
                    .layer(tower_http_on_early_drop(&tally))
                    .service(never()),
                none_expected,
                End::Abort,
                Some(&tally),
                Duration::ZERO,
            )
        }),
        row("tower-http OnEarlyDrop + Timeout", move || {
            let tally = Arc::new(Tally::default());
            run(
                ServiceBuilder::new()
                    .layer(tower_http_on_early_drop(&tally))
                    .layer(tower_http_timeout())
                    .service(never()),
                none_expected,
                End::Abort,
                Some(&tally),
                Duration::ZERO,
            )
        }),
    ]
}

/// A row's runs, summed up: medians over the rounds, the worst of some.
#[derive(Debug)]
struct Summary {
    name: &'static str,
    /// Medians; counts and flags are the worst over the rounds.
    median: Run,
    /// The largest lateness of all rounds, and the most requests over the target in a round.
    worst_max: Option<f64>,
    worst_over_target: Option<usize>,
    runs: Vec<Run>,
}

fn summarize(name: &'static str, runs: Vec<Run>) -> Summary {
    let med = |f: &dyn Fn(&Run) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    let med_opt = |f: &dyn Fn(&Run) -> Option<f64>| {
        let values: Vec<f64> = runs.iter().filter_map(f).collect();
        (values.len() == runs.len()).then(|| median(&values))
    };
    let lateness = runs.iter().all(|run| run.lateness.is_some()).then(|| {
        let l = |f: fn(&Lateness) -> f64| med(&|run| f(&run.lateness.unwrap_or_default()));
        Lateness {
            p50: l(|l| l.p50),
            p99: l(|l| l.p99),
            max: l(|l| l.max),
            min: l(|l| l.min),
            over_target: l(|l| l.over_target as f64) as usize,
            calls_spread: l(|l| l.calls_spread),
            drain: l(|l| l.drain),
        }
    });
    let leaving = runs.iter().all(|run| run.leaving.is_some()).then(|| {
        let l = |run: &Run| run.leaving.unwrap_or_default();
        Leaving {
            aborts_issued: med(&|run| l(run).aborts_issued),
            counted: runs.iter().map(|run| l(run).counted).min().flatten(),
            all_counted: med_opt(&|run| l(run).all_counted),
            all_dropped: med_opt(&|run| l(run).all_dropped),
        }
    });
    let median = Run {
        future_size: runs[0].future_size,
        settled: runs.iter().all(|run| run.settled),
        finished_before_measure: runs
            .iter()
            .map(|run| run.finished_before_measure)
            .max()
            .unwrap_or(0),
        live_bytes: med(&|run| run.live_bytes),
        allocations: med(&|run| run.allocations),
        left_after: med(&|run| run.left_after),
        expected: runs.iter().map(|run| run.expected).min().unwrap_or(0),
        unexpected: runs.iter().map(|run| run.unexpected).max().unwrap_or(0),
        panics: runs.iter().map(|run| run.panics).sum(),
        all_finished: runs.iter().all(|run| run.all_finished),
        lateness,
        leaving,
    };
    let lateness = || runs.iter().filter_map(|run| run.lateness);
    Summary {
        name,
        median,
        worst_max: lateness().map(|l| l.max).reduce(f64::max),
        worst_over_target: lateness().map(|l| l.over_target).max(),
        runs,
    }
}

impl Summary {
    fn over(&self, bare: &Summary) -> f64 {
        self.median.live_bytes - bare.median.live_bytes
    }

    fn problems(&self) -> String {
        let run = &self.median;
        let mut notes = Vec::new();
        if !run.settled {
            notes.push(format!("not all in flight within {SETTLE_LIMIT:?}"));
        }
        if run.finished_before_measure > 0 {
            notes.push(format!(
                "{} finished before the memory was measured",
                run.finished_before_measure
            ));
        }
        if !run.all_finished {
            notes.push("did not all finish in time".to_owned());
        }
        if run.unexpected > 0 {
            notes.push(format!("{} unexpected results", run.unexpected));
        }
        if run.panics > 0 {
            notes.push(format!("{} panics", run.panics));
        }
        if notes.is_empty() {
            "ok".to_owned()
        } else {
            notes.join("; ")
        }
    }
}

/// Prints (a), or with `bare` none, (c).
fn print_a(title: &str, rows: &[Summary], bare: Option<&Summary>) {
    println!("\n## {title} (2 worker threads; medians of {ROUNDS} rounds)\n");
    println!(
        "| row | task future B | live B/req | over bare B/req | allocs/req | left after B/req \
         | timeouts as expected | lateness p50 ms | p99 ms | max ms | worst max ms | min ms \
         | > 20 ms | calls spread ms | drain ms | notes |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for row in rows {
        let run = &row.median;
        let (late, expected) = match (&run.lateness, row.worst_max) {
            (Some(l), Some(worst)) => (
                format!(
                    "{:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {:.0} | {:.2}",
                    l.p50, l.p99, l.max, worst, l.min, l.over_target, l.calls_spread, l.drain
                ),
                run.expected.to_string(),
            ),
            _ => (
                "– | – | – | – | – | – | – | –".to_owned(),
                "– (aborted)".to_owned(),
            ),
        };
        println!(
            "| {} | {} | {:.0} | {} | {:.2} | {:.1} | {} | {} | {} |",
            row.name,
            run.future_size,
            run.live_bytes,
            bare.map_or("–".to_owned(), |bare| format!("{:.0}", row.over(bare))),
            run.allocations,
            run.left_after,
            expected,
            late,
            row.problems()
        );
    }
}

fn print_b(rows: &[Summary]) {
    let bare = &rows[0];
    println!(
        "\n## (b) {IN_FLIGHT} requests in flight, then every client leaves at once \
         (`JoinHandle::abort` on every task, 2 worker threads; medians of {ROUNDS} rounds)\n"
    );
    println!(
        "| row | task future B | live B/req | over bare B/req | allocs/req | left after B/req \
         | outcomes counted | aborts issued ms | all counted ms | all dropped ms | notes |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let opt = |ms: Option<f64>| ms.map_or("–".to_owned(), |ms| format!("{ms:.1}"));
    for row in rows {
        let run = &row.median;
        let leaving = run.leaving.unwrap_or_default();
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.2} | {:.1} | {} | {:.1} | {} | {} | {} |",
            row.name,
            run.future_size,
            run.live_bytes,
            row.over(bare),
            run.allocations,
            run.left_after,
            leaving
                .counted
                .map_or("–".to_owned(), |count| count.to_string()),
            leaving.aborts_issued,
            opt(leaving.all_counted),
            opt(leaving.all_dropped),
            row.problems()
        );
    }
}

fn find<'a>(rows: &'a [Summary], name: &str) -> &'a Summary {
    rows.iter().find(|row| row.name == name).expect("row")
}

/// The targets: a line of text each, and whether it is met.
fn targets(a: &[Summary], b: &[Summary], c: &[Summary]) -> Vec<(String, bool)> {
    let mut lines = Vec::new();
    let mut memory = |rows: &[Summary], ours: &str, theirs: &str| {
        let bare = &rows[0];
        let (o, t) = (find(rows, ours).over(bare), find(rows, theirs).over(bare));
        lines.push((
            format!(
                "memory per in-flight request, over bare: {ours} {o:.0} B vs {theirs} {t:.0} B"
            ),
            o <= t,
        ));
    };
    memory(a, "ours ResponseTimeout", "tower-http TimeoutLayer");
    memory(b, "ours ClientDisconnect", "tower-http OnEarlyDrop");
    memory(b, "ours full stack", "tower-http OnEarlyDrop + Timeout");
    for (part, rows) in [("calls in ~0.1 s", a), ("calls paced over 1 s", c)] {
        for name in ["ours ResponseTimeout", "ours full stack"] {
            let row = find(rows, name);
            let (worst, over) = (
                row.worst_max.unwrap_or(f64::NAN),
                row.worst_over_target.unwrap_or(IN_FLIGHT),
            );
            lines.push((
                format!(
                    "every timeout within {TARGET_LATENESS:?} of its deadline ({part}): {name}: \
                 worst max {worst:.2} ms, at most {over} of {IN_FLIGHT} over in a round, {} of \
                 {IN_FLIGHT} answered 504 in every round",
                    row.median.expected
                ),
                over == 0 && row.median.expected == IN_FLIGHT,
            ));
        }
    }
    lines
}

fn run_json(run: &Run) -> Json {
    let mut fields = vec![
        ("task_future_bytes", run.future_size.into()),
        ("live_bytes_per_request", run.live_bytes.into()),
        ("allocations_per_request", run.allocations.into()),
        ("left_after_bytes_per_request", run.left_after.into()),
        ("expected_results", run.expected.into()),
        ("unexpected_results", run.unexpected.into()),
        ("panics", run.panics.into()),
        ("all_in_flight", run.settled.into()),
        ("all_finished", run.all_finished.into()),
        (
            "finished_before_measure",
            run.finished_before_measure.into(),
        ),
    ];
    if let Some(l) = &run.lateness {
        fields.push((
            "lateness_ms",
            Json::obj([
                ("p50", l.p50.into()),
                ("p99", l.p99.into()),
                ("max", l.max.into()),
                ("min", l.min.into()),
                ("over_20ms", l.over_target.into()),
                ("calls_spread", l.calls_spread.into()),
                ("drain_after_last_deadline", l.drain.into()),
            ]),
        ));
    }
    if let Some(l) = &run.leaving {
        fields.push((
            "leaving_ms",
            Json::obj([
                ("aborts_issued", l.aborts_issued.into()),
                ("outcomes_counted", l.counted.into()),
                ("all_counted", l.all_counted.into()),
                ("all_dropped", l.all_dropped.into()),
            ]),
        ));
    }
    Json::obj(fields)
}

fn summary_json(row: &Summary, bare: &Summary) -> Json {
    Json::obj([
        ("name", Json::str(row.name)),
        ("live_bytes_per_request_over_bare", row.over(bare).into()),
        ("worst_max_lateness_ms", row.worst_max.into()),
        ("worst_over_20ms", row.worst_over_target.into()),
        ("median", run_json(&row.median)),
        ("rounds", Json::Arr(row.runs.iter().map(run_json).collect())),
    ])
}

fn main() {
    if !selected("scale") {
        println!("scale: skipped (the filter does not match)");
        return;
    }
    let started = Instant::now();
    println!(
        "scale: {IN_FLIGHT} requests in flight per run, each run on a fresh runtime, \
         {ROUNDS} interleaved rounds (progress on stderr)"
    );
    let summed = |part: &str, rows: Vec<Row>| {
        let runs = interleaved(part, &rows);
        rows.iter()
            .zip(runs)
            .map(|(row, runs)| summarize(row.name, runs))
            .collect::<Vec<_>>()
    };
    let a = summed("a", part_a(Duration::ZERO));
    let b = summed("b", part_b());
    let c = summed("c", part_a(PACE));
    print_a(
        &format!("(a) {IN_FLIGHT} requests in flight, each with a {TIMEOUT:?} timeout that fires"),
        &a,
        Some(&a[0]),
    );
    print_b(&b);
    print_a(
        &format!(
            "(c) as (a), the calls paced over {PACE:?}: all {IN_FLIGHT} are in flight when the \
             first timeout fires"
        ),
        &c,
        None,
    );

    let targets = targets(&a, &b, &c);
    println!("\n## Targets (reported, not asserted)\n");
    for (line, met) in &targets {
        println!("- {}: {line}", if *met { "met" } else { "NOT met" });
    }
    println!("\n(whole run: {:.1} s)", started.elapsed().as_secs_f64());

    let json = Json::obj([
        ("bench", Json::str("scale")),
        (
            "config",
            Json::obj([
                ("in_flight", IN_FLIGHT.into()),
                ("rounds", ROUNDS.into()),
                ("timeout_ms", (TIMEOUT.as_millis() as u64).into()),
                ("long_timeout_ms", (LONG_TIMEOUT.as_millis() as u64).into()),
                ("worker_threads", 2usize.into()),
                ("sockets", Json::Bool(false)),
                ("tracing_subscriber", Json::Bool(false)),
            ]),
        ),
        (
            "timeouts",
            Json::Arr(a.iter().map(|row| summary_json(row, &a[0])).collect()),
        ),
        (
            "timeouts_paced",
            Json::Arr(c.iter().map(|row| summary_json(row, &a[0])).collect()),
        ),
        (
            "clients_leaving",
            Json::Arr(b.iter().map(|row| summary_json(row, &b[0])).collect()),
        ),
        (
            "targets",
            Json::Arr(
                targets
                    .iter()
                    .map(|(line, met)| {
                        Json::obj([("check", Json::str(line.as_str())), ("met", (*met).into())])
                    })
                    .collect(),
            ),
        ),
    ]);
    write_json("scale.json", &json);
}
