//! Per-request overhead of the crate's layers, side by side with tower's and tower-http's,
//! measured in interleaved rounds.
//!
//! Run with: `cargo bench --bench overhead` (every driver, behaviour and case; about a minute
//! on 2 idle cores). Part of it, for a quick look: name drivers, behaviours or cases, e.g.
//! `cargo bench --bench overhead -- ct ours_response_timeout tower_timeout`; the same words
//! can go in `OVERHEAD_FILTER` (comma- or space-separated). A word is a driver (`ct`,
//! `mt_block_on`, `mt_spawned`, or `mt` for both of the last), a behaviour (`ready`,
//! `pending`), or else a part of a case's name; dimensions that no word names are all run, and
//! the baseline of each group (`bare`, `bare_subscribed`) always is. `overhead` means
//! everything; flags (`--bench`, …) are ignored; words that select nothing run nothing, so
//! `cargo bench -- scale` skips this bench.
//!
//! Settings, by environment variable: `OVERHEAD_ROUNDS` (measured rounds, 31),
//! `OVERHEAD_WARMUP` (rounds run first and thrown away, 2), `OVERHEAD_REQUESTS` (requests per
//! case per round, per worker for `mt_spawned`, 50,000), `OVERHEAD_SEED` (of the shuffles, 1).
//!
//! # What one request is
//!
//! Each case is one tower `Service<Request<Empty<Bytes>>>`, made once per driver and
//! behaviour, and cloned for every request as axum's router does. One request:
//! `ready().await`, `call`, await the response, then poll the `Full` body as hyper does (frames
//! until `is_end_stream()`) and drop it ([`support::serve_one`]). The inner service
//! ([`support::Inner`]) answers a 12-byte `Full` body, in one of two behaviours:
//! - `ready`: its future is ready at the first poll;
//! - `pending`: its future wakes its own task and returns `Pending` once, then is ready (what
//!   makes every timeout layer arm a timer).
//!
//! # Drivers
//!
//! - `ct`: a current-thread runtime; each request is one `rt.block_on(…)` on this thread. A
//!   `pending` request makes `block_on` park the runtime once, which polls its I/O driver (one
//!   `epoll_wait` system call, seen with strace) in every case alike: that group's baseline is
//!   the largest, and its overheads the noisiest;
//! - `mt_block_on`: the same, on a multi-thread runtime with 2 workers (which stay idle);
//! - `mt_spawned`: one task per worker spawned on that runtime, each running the requests in a
//!   loop timed inside the task, so neither the spawn nor the `block_on` is in the figure. The
//!   tasks start together, each on a worker of its own (a spinning barrier sees to it; the runs
//!   where they still shared one are counted and shown), so both workers are busy, as under
//!   load. The case's figure is the mean of the two tasks' time per request.
//!
//! # Cases
//!
//! With no tracing subscriber (none has been set in the process: asserted before every case)
//! and no hook configured, the crate's layers take their path where nothing can see a
//! recording (see the crate's `record` docs):
//! - `bare`: the inner service alone, the baseline;
//! - `tower_timeout`: `tower::timeout::TimeoutLayer::new(10 s)`;
//! - `tower_http_timeout`: `tower_http::timeout::TimeoutLayer::with_status_code(504, 10 s)`;
//! - `tower_http_on_early_drop`: tower-http's `OnEarlyDropLayer` in its cheapest configuration
//!   that still reports both early drops our `ClientDisconnectLayer` records (the response
//!   future's and the body's): `OnEarlyDropLayer::builder()` with a no-op closure in both slots,
//!   `.on_future_drop(|_: &Request<_>| || {})` and
//!   `.on_body_drop(OnBodyDropFn::new(|_: &Request<_>| |_: &Parts| || {}))`. They capture
//!   nothing, so the guards cost no allocation and no clock read; a closure runs only on a drop,
//!   which never happens here, so what a user would put in it is not in the figure. (The
//!   documented `EarlyDropsAsFailures::new(DefaultOnFailure::new())` also reads the clock and
//!   takes `Span::current()` twice per request.) The `()` slots are cheaper still but report
//!   nothing;
//! - `tower_http_timeout_on_early_drop`: both tower-http layers, on-early-drop outermost;
//! - `ours_response_timeout`: `ResponseTimeoutLayer::new(10 s)`;
//! - `ours_client_disconnect`: `ClientDisconnectLayer::new()`;
//! - `ours_full_stack`: `ClientDisconnectLayer` around `ResponseTimeoutLayer` (`ServiceBuilder`).
//!
//! With a subscriber, [`support::subscriber`] (a registry and a layer that formats every field
//! of every span and event into a byte counter), set as the global default once every case
//! above has run all its rounds (it cannot be unset):
//! - `bare_subscribed`: the inner service alone, the baseline of this phase;
//! - `ours_full_stack_subscribed`: `ours_full_stack`;
//! - `tower_http_trace_stack_subscribed`: `TraceLayer::new_for_http()` around on-early-drop
//!   around tower-http's timeout. Here on-early-drop is configured as cheaply as a user who
//!   wants a drop recorded in the request's trace (as ours records its 499) can: closures that
//!   take `Span::current()` (the `TraceLayer`'s request span) when the request is called, and
//!   would emit an event in it on a drop, the body's with the status sent.
//!
//! Every timeout is 10 s and never fires: the path measured is the one where the response
//! wins.
//!
//! # Rounds and figures
//!
//! A round runs every selected case once, `OVERHEAD_REQUESTS` requests each: the (driver,
//! behaviour) groups in a shuffled order, and within a group its cases in a shuffled order, so
//! that a case and its baseline run within a fraction of a second of each other and drift
//! (other work on the machine, frequency changes) lands on all cases alike. The subscribed
//! cases form a second phase of rounds of their own, after the first. For every round, a case's
//! overhead is its time per request minus the baseline's in the same round, group and phase.
//! Reported, per case: the median time per request and the median overhead with its quartiles
//! over the rounds; and these ratios of overheads, each the median of the per-round ratios with
//! their quartiles as the spread (lower is better for us):
//! - `ours_response_timeout` / `tower_timeout`;
//! - `ours_full_stack` / `tower_http_timeout_on_early_drop`;
//! - `ours_client_disconnect` / `tower_http_on_early_drop`;
//! - `ours_full_stack_subscribed` / `tower_http_trace_stack_subscribed` (over `bare_subscribed`).
//!
//! A round whose anchor overhead is not above zero gives no ratio (the count used is shown).
//! The figures are only meaningful relative to each other, within one run; nothing asserts
//! them. The run prints what it can read of the machine (CPU model, load, rustc, the versions
//! in `Cargo.lock`, the commit) and writes everything, per-round times included, to
//! `<target dir>/tower-timeouts-bench/overhead.json`, from which `scripts/perf_report.py`
//! draws the README's tables and `docs/overhead.svg`.
//!
//! The dev-dependencies turn on tokio's `test-util`. Since no clock is ever paused here,
//! `tokio::time::Instant::now()` takes its fast path (tokio 1.54 skips the clock's mutex until
//! a clock has been paused), so the clock reads of the timeout layers cost what they cost in a
//! server. Only the time driver still locks that mutex when it parks (on `ct`, once per
//! `pending` request, in every case alike).

// Wall-clock timing of the benchmark loops, not the runtime's (pausable) clock.
#![allow(clippy::disallowed_types)]

mod support;

use std::fmt;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::response::Parts;
use http::{Request, Response, StatusCode};
use http_body::Body;
use support::report::{filters, median, percentile, write_json, Json};
use support::{serve_one, subscriber, Inner, ReqBody};
use tokio::runtime::{Builder, Runtime};
use tower::{Service, ServiceBuilder};
use tower_http::on_early_drop::{OnBodyDropFn, OnEarlyDropLayer};
use tower_http::trace::TraceLayer;
use tower_timeouts::{ClientDisconnectLayer, ResponseTimeoutLayer};
use tracing::Span;

/// Long enough never to fire: every case measures the path where the response wins.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Worker threads of the multi-thread runtime, and tasks of `mt_spawned`.
const WORKERS: usize = 2;

const DEFAULT_ROUNDS: usize = 31;
const DEFAULT_WARM_UP: usize = 2;
const DEFAULT_REQUESTS: u64 = 50_000;
const DEFAULT_SEED: u64 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Driver {
    Ct,
    MtBlockOn,
    MtSpawned,
}

impl Driver {
    const ALL: [Driver; 3] = [Driver::Ct, Driver::MtBlockOn, Driver::MtSpawned];

    fn name(self) -> &'static str {
        match self {
            Driver::Ct => "ct",
            Driver::MtBlockOn => "mt_block_on",
            Driver::MtSpawned => "mt_spawned",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    Ready,
    Pending,
}

impl Behaviour {
    const ALL: [Behaviour; 2] = [Behaviour::Ready, Behaviour::Pending];

    fn name(self) -> &'static str {
        match self {
            Behaviour::Ready => "ready",
            Behaviour::Pending => "pending",
        }
    }

    fn inner(self) -> Inner {
        Inner {
            pending_once: self == Behaviour::Pending,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Unsubscribed,
    Subscribed,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Unsubscribed => "unsubscribed",
            Phase::Subscribed => "subscribed",
        }
    }

    fn baseline(self) -> &'static str {
        match self {
            Phase::Unsubscribed => "bare",
            Phase::Subscribed => "bare_subscribed",
        }
    }
}

/// Every case, with its phase and what it is, in the order of the tables.
const CASES: &[(&str, Phase, &str)] = &[
    ("bare", Phase::Unsubscribed, "the inner service alone"),
    (
        "tower_timeout",
        Phase::Unsubscribed,
        "tower::timeout::TimeoutLayer::new(10 s)",
    ),
    (
        "tower_http_timeout",
        Phase::Unsubscribed,
        "tower_http::timeout::TimeoutLayer::with_status_code(504, 10 s)",
    ),
    (
        "tower_http_on_early_drop",
        Phase::Unsubscribed,
        "tower_http OnEarlyDropLayer::builder() with no-op closures in both slots \
         (on_future_drop, on_body_drop)",
    ),
    (
        "tower_http_timeout_on_early_drop",
        Phase::Unsubscribed,
        "tower_http on-early-drop (no-op closures) around tower_http TimeoutLayer (504, 10 s)",
    ),
    (
        "ours_response_timeout",
        Phase::Unsubscribed,
        "ResponseTimeoutLayer::new(10 s)",
    ),
    (
        "ours_client_disconnect",
        Phase::Unsubscribed,
        "ClientDisconnectLayer::new()",
    ),
    (
        "ours_full_stack",
        Phase::Unsubscribed,
        "ClientDisconnectLayer around ResponseTimeoutLayer (10 s)",
    ),
    (
        "bare_subscribed",
        Phase::Subscribed,
        "the inner service alone, with the subscriber",
    ),
    (
        "ours_full_stack_subscribed",
        Phase::Subscribed,
        "ours_full_stack, with the subscriber",
    ),
    (
        "tower_http_trace_stack_subscribed",
        Phase::Subscribed,
        "TraceLayer::new_for_http() around on-early-drop (closures that keep Span::current() \
         for an event on a drop) around tower_http TimeoutLayer (504, 10 s), with the subscriber",
    ),
];

/// The ratios of overheads reported: (numerator, denominator, short label for the table).
const RATIOS: &[(&str, &str, &str)] = &[
    ("ours_response_timeout", "tower_timeout", "RT/tower"),
    (
        "ours_full_stack",
        "tower_http_timeout_on_early_drop",
        "stack/th-pair",
    ),
    (
        "ours_client_disconnect",
        "tower_http_on_early_drop",
        "CD/on-drop",
    ),
    (
        "ours_full_stack_subscribed",
        "tower_http_trace_stack_subscribed",
        "stack/th-trace (sub)",
    ),
];

// --------------------------------------------------------------------------------------------
// Configuration

#[derive(Debug)]
struct Config {
    rounds: usize,
    warm_up: usize,
    requests: u64,
    seed: u64,
    drivers: Vec<Driver>,
    behaviours: Vec<Behaviour>,
    /// Parts of case names; empty: every case.
    cases: Vec<String>,
    /// The words as given, for the record.
    words: Vec<String>,
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => value
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
        _ => default,
    }
}

impl Config {
    fn from_env() -> Config {
        let mut words: Vec<String> = filters();
        if let Ok(filter) = std::env::var("OVERHEAD_FILTER") {
            words.extend(
                filter
                    .split(|c: char| c == ',' || c.is_whitespace())
                    .map(str::to_owned),
            );
        }
        let words: Vec<String> = words
            .iter()
            .flat_map(|word| word.split('/'))
            .filter(|word| !word.is_empty() && *word != "overhead")
            .map(str::to_owned)
            .collect();

        let mut drivers = Vec::new();
        let mut behaviours = Vec::new();
        let mut cases = Vec::new();
        for word in &words {
            if let Some(behaviour) = Behaviour::ALL.into_iter().find(|b| b.name() == word) {
                behaviours.push(behaviour);
                continue;
            }
            let named: Vec<Driver> = Driver::ALL
                .into_iter()
                .filter(|d| d.name() == word || (word == "mt" && d.name().starts_with("mt_")))
                .collect();
            if !named.is_empty() {
                drivers.extend(named);
                continue;
            }
            cases.push(word.clone());
        }
        if drivers.is_empty() {
            drivers = Driver::ALL.to_vec();
        }
        if behaviours.is_empty() {
            behaviours = Behaviour::ALL.to_vec();
        }
        Config {
            rounds: env_number("OVERHEAD_ROUNDS", DEFAULT_ROUNDS).max(1),
            warm_up: env_number("OVERHEAD_WARMUP", DEFAULT_WARM_UP),
            requests: env_number("OVERHEAD_REQUESTS", DEFAULT_REQUESTS).max(1),
            seed: env_number("OVERHEAD_SEED", DEFAULT_SEED),
            drivers: Driver::ALL
                .into_iter()
                .filter(|d| drivers.contains(d))
                .collect(),
            behaviours: Behaviour::ALL
                .into_iter()
                .filter(|b| behaviours.contains(b))
                .collect(),
            cases,
            words,
        }
    }

    /// Whether `case` is named, by a part of its name, or by no word at all.
    fn names(&self, case: &str) -> bool {
        self.cases.is_empty() || self.cases.iter().any(|part| case.contains(part.as_str()))
    }

    /// The cases of `phase` to run: those named, and their baseline if any is.
    fn cases_of(&self, phase: Phase) -> Vec<&'static str> {
        let named: Vec<&'static str> = CASES
            .iter()
            .filter(|(name, p, _)| *p == phase && *name != phase.baseline() && self.names(name))
            .map(|(name, _, _)| *name)
            .collect();
        if named.is_empty() {
            return named;
        }
        std::iter::once(phase.baseline()).chain(named).collect()
    }
}

// --------------------------------------------------------------------------------------------
// Cases and drivers

struct Runtimes {
    ct: Runtime,
    mt: Runtime,
}

impl Runtimes {
    fn new() -> Runtimes {
        Runtimes {
            ct: Builder::new_current_thread().enable_all().build().unwrap(),
            mt: Builder::new_multi_thread()
                .worker_threads(WORKERS)
                .enable_all()
                .build()
                .unwrap(),
        }
    }
}

/// One case's run: `requests` requests (per worker for `mt_spawned`) on a driver.
struct Sample {
    ns_per_request: f64,
    /// `mt_spawned` only: both tasks started their loop on the same worker thread.
    one_worker: bool,
}

type Run = Box<dyn Fn(&Runtimes, Driver, u64) -> Sample>;

struct Case {
    name: &'static str,
    run: Run,
}

fn case<S, B>(name: &'static str, service: S) -> Case
where
    S: Service<Request<ReqBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: fmt::Debug,
    B: Body + Send + 'static,
{
    Case {
        name,
        run: Box::new(move |runtimes, driver, requests| match driver {
            Driver::Ct => block_on_loop(&runtimes.ct, &service, requests),
            Driver::MtBlockOn => block_on_loop(&runtimes.mt, &service, requests),
            Driver::MtSpawned => spawned_loops(&runtimes.mt, &service, requests),
        }),
    }
}

/// Each request one `block_on` on this thread, through its own clone of the service.
fn block_on_loop<S, B>(rt: &Runtime, service: &S, requests: u64) -> Sample
where
    S: Service<Request<ReqBody>, Response = Response<B>> + Clone,
    S::Error: fmt::Debug,
    B: Body,
{
    let start = Instant::now();
    for _ in 0..requests {
        let mut service = service.clone();
        rt.block_on(serve_one(&mut service));
    }
    Sample {
        ns_per_request: start.elapsed().as_nanos() as f64 / requests as f64,
        one_worker: false,
    }
}

/// One loop of `requests` requests per worker, each in a task of its own, timed inside it.
fn spawned_loops<S, B>(rt: &Runtime, service: &S, requests: u64) -> Sample
where
    S: Service<Request<ReqBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: fmt::Debug,
    B: Body + Send + 'static,
{
    let arrived = Arc::new(AtomicUsize::new(0));
    let loops: Vec<_> = (0..WORKERS)
        .map(|_| {
            let service = service.clone();
            let arrived = arrived.clone();
            rt.spawn(async move {
                // A barrier that holds its worker: a task waiting here keeps its thread busy,
                // so the other task can only start on another worker. (With an async barrier
                // both tasks often start on one worker, and the second waits in that worker's
                // LIFO slot, which no other worker may steal from: one worker does all the
                // work, one loop after the other.)
                arrived.fetch_add(1, Ordering::SeqCst);
                let deadline = Instant::now() + Duration::from_secs(1);
                while arrived.load(Ordering::SeqCst) < WORKERS && Instant::now() < deadline {
                    std::hint::spin_loop();
                }
                let thread = std::thread::current().id();
                let start = Instant::now();
                for _ in 0..requests {
                    let mut service = service.clone();
                    serve_one(&mut service).await;
                }
                (start.elapsed(), thread)
            })
        })
        .collect();
    let results: Vec<(Duration, std::thread::ThreadId)> = rt.block_on(async {
        let mut results = Vec::with_capacity(loops.len());
        for handle in loops {
            results.push(handle.await.expect("bench task"));
        }
        results
    });
    let total: Duration = results.iter().map(|(elapsed, _)| *elapsed).sum();
    Sample {
        ns_per_request: total.as_nanos() as f64 / (results.len() as u64 * requests) as f64,
        one_worker: results.windows(2).all(|pair| pair[0].1 == pair[1].1),
    }
}

/// The cases of `phase` named in `names`, around `inner`.
fn cases(phase: Phase, inner: Inner, names: &[&'static str]) -> Vec<Case> {
    let tower_http_timeout = || {
        tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::GATEWAY_TIMEOUT, TIMEOUT)
    };
    // The cheapest configuration that still reports both early drops: see the module docs.
    let on_early_drop = || {
        OnEarlyDropLayer::builder()
            .on_future_drop(|_: &Request<ReqBody>| || {})
            .on_body_drop(OnBodyDropFn::new(|_: &Request<ReqBody>| |_: &Parts| || {}))
    };
    // With a subscriber: what is needed to record a drop in the request's span.
    let on_early_drop_traced = || {
        OnEarlyDropLayer::builder()
            .on_future_drop(|_: &Request<ReqBody>| {
                let span = Span::current();
                move || tracing::warn!(parent: &span, "response future dropped")
            })
            .on_body_drop(OnBodyDropFn::new(|_: &Request<ReqBody>| {
                let span = Span::current();
                move |parts: &Parts| {
                    let status = parts.status.as_u16();
                    move || tracing::warn!(parent: &span, status, "response body dropped")
                }
            }))
    };
    let ours_full_stack = || {
        ServiceBuilder::new()
            .layer(ClientDisconnectLayer::new())
            .layer(ResponseTimeoutLayer::new(TIMEOUT))
            .service(inner)
    };

    let all = match phase {
        Phase::Unsubscribed => vec![
            case("bare", inner),
            case(
                "tower_timeout",
                ServiceBuilder::new()
                    .layer(tower::timeout::TimeoutLayer::new(TIMEOUT))
                    .service(inner),
            ),
            case(
                "tower_http_timeout",
                ServiceBuilder::new()
                    .layer(tower_http_timeout())
                    .service(inner),
            ),
            case(
                "tower_http_on_early_drop",
                ServiceBuilder::new().layer(on_early_drop()).service(inner),
            ),
            case(
                "tower_http_timeout_on_early_drop",
                ServiceBuilder::new()
                    .layer(on_early_drop())
                    .layer(tower_http_timeout())
                    .service(inner),
            ),
            case(
                "ours_response_timeout",
                ServiceBuilder::new()
                    .layer(ResponseTimeoutLayer::new(TIMEOUT))
                    .service(inner),
            ),
            case(
                "ours_client_disconnect",
                ServiceBuilder::new()
                    .layer(ClientDisconnectLayer::new())
                    .service(inner),
            ),
            case("ours_full_stack", ours_full_stack()),
        ],
        Phase::Subscribed => vec![
            case("bare_subscribed", inner),
            case("ours_full_stack_subscribed", ours_full_stack()),
            case(
                "tower_http_trace_stack_subscribed",
                ServiceBuilder::new()
                    .layer(TraceLayer::new_for_http())
                    .layer(on_early_drop_traced())
                    .layer(tower_http_timeout())
                    .service(inner),
            ),
        ],
    };
    all.into_iter()
        .filter(|case| names.contains(&case.name))
        .collect()
}

// --------------------------------------------------------------------------------------------
// Rounds

/// The cases of one driver and behaviour in one phase, and their times per request.
struct Group {
    phase: Phase,
    driver: Driver,
    behaviour: Behaviour,
    cases: Vec<Case>,
    /// `[case][round]`, ns per request.
    ns: Vec<Vec<f64>>,
    /// `mt_spawned`: measured runs whose two loops started on the same worker.
    one_worker_runs: usize,
}

/// SplitMix64: enough to shuffle the order of the cases, reproducibly.
struct Shuffler(u64);

impl Shuffler {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// `0..n` in a random order (Fisher–Yates).
    fn order(&mut self, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        order
    }
}

fn run_phase(
    phase: Phase,
    groups: &mut [Group],
    runtimes: &Runtimes,
    config: &Config,
    shuffler: &mut Shuffler,
) {
    let started = Instant::now();
    let total = config.warm_up + config.rounds;
    for round in 0..total {
        let measured = round >= config.warm_up;
        for g in shuffler.order(groups.len()) {
            let group = &mut groups[g];
            for c in shuffler.order(group.cases.len()) {
                if phase == Phase::Unsubscribed {
                    assert!(
                        !tracing::dispatcher::has_been_set(),
                        "a tracing subscriber was set before the unsubscribed cases ran"
                    );
                }
                let sample = (group.cases[c].run)(runtimes, group.driver, config.requests);
                if measured {
                    group.ns[c].push(sample.ns_per_request);
                    group.one_worker_runs += usize::from(sample.one_worker);
                }
            }
        }
        eprintln!(
            "{} round {}/{}{} done ({:.1} s)",
            phase.name(),
            round + 1,
            total,
            if measured { "" } else { " (warm-up)" },
            started.elapsed().as_secs_f64()
        );
    }
}

// --------------------------------------------------------------------------------------------
// Figures

/// Median and quartiles of a set of values.
#[derive(Clone, Copy, Debug)]
struct Spread {
    median: f64,
    p25: f64,
    p75: f64,
}

impl Spread {
    fn of(values: &[f64]) -> Spread {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Spread {
            median: median(&sorted),
            p25: percentile(&sorted, 0.25),
            p75: percentile(&sorted, 0.75),
        }
    }
}

struct CaseSummary {
    name: &'static str,
    ns: Vec<f64>,
    ns_median: f64,
    /// Per round, case minus baseline; empty for the baseline.
    overheads: Vec<f64>,
    overhead: Option<Spread>,
}

struct RatioSummary {
    numerator: &'static str,
    denominator: &'static str,
    /// Per round; `None` where the denominator's overhead was not above zero.
    per_round: Vec<Option<f64>>,
    spread: Option<Spread>,
}

impl RatioSummary {
    fn used(&self) -> usize {
        self.per_round.iter().flatten().count()
    }
}

struct GroupSummary {
    phase: Phase,
    driver: Driver,
    behaviour: Behaviour,
    cases: Vec<CaseSummary>,
    ratios: Vec<RatioSummary>,
    one_worker_runs: usize,
}

fn summarise(group: &Group) -> GroupSummary {
    let baseline = group
        .cases
        .iter()
        .position(|case| case.name == group.phase.baseline())
        .expect("the baseline runs in every group");
    let bare = &group.ns[baseline];
    let mut cases: Vec<CaseSummary> = group
        .cases
        .iter()
        .zip(&group.ns)
        .enumerate()
        .map(|(i, (case, ns))| {
            let overheads: Vec<f64> = if i == baseline {
                Vec::new()
            } else {
                ns.iter().zip(bare).map(|(ns, bare)| ns - bare).collect()
            };
            CaseSummary {
                name: case.name,
                ns: ns.clone(),
                ns_median: median(ns),
                overhead: (!overheads.is_empty()).then(|| Spread::of(&overheads)),
                overheads,
            }
        })
        .collect();
    cases.sort_by_key(|case| CASES.iter().position(|(name, _, _)| *name == case.name));

    let find = |name: &str| cases.iter().find(|case| case.name == name);
    let ratios = RATIOS
        .iter()
        .filter_map(|&(numerator, denominator, _)| {
            let (num, den) = (find(numerator)?, find(denominator)?);
            let per_round: Vec<Option<f64>> = num
                .overheads
                .iter()
                .zip(&den.overheads)
                .map(|(num, den)| (*den > 0.0).then(|| num / den))
                .collect();
            let used: Vec<f64> = per_round.iter().flatten().copied().collect();
            Some(RatioSummary {
                numerator,
                denominator,
                spread: (!used.is_empty()).then(|| Spread::of(&used)),
                per_round,
            })
        })
        .collect();
    GroupSummary {
        phase: group.phase,
        driver: group.driver,
        behaviour: group.behaviour,
        cases,
        ratios,
        one_worker_runs: group.one_worker_runs,
    }
}

fn signed(ns: f64) -> String {
    let rounded = ns.round();
    if rounded > 0.0 {
        format!("+{rounded:.0}")
    } else if rounded < 0.0 {
        format!("-{:.0}", -rounded)
    } else {
        "0".to_owned()
    }
}

fn ratio_cell(spread: Option<Spread>, used: usize, rounds: usize) -> String {
    match spread {
        None => "n/a".to_owned(),
        Some(s) => {
            let mut cell = format!("{:.2} ({:.2}-{:.2})", s.median, s.p25, s.p75);
            if used < rounds {
                cell.push_str(&format!(" [{used}/{rounds}]"));
            }
            cell
        }
    }
}

fn print_group(summary: &GroupSummary, config: &Config) {
    println!(
        "\n{} / {} ({}; baseline {}; {} requests{} x {} rounds)",
        summary.driver.name(),
        summary.behaviour.name(),
        summary.phase.name(),
        summary.phase.baseline(),
        config.requests,
        if summary.driver == Driver::MtSpawned {
            " per worker"
        } else {
            ""
        },
        config.rounds,
    );
    println!(
        "  {:<36} {:>9}  {:>9}  {:>19}",
        "case", "ns/req", "overhead", "p25..p75"
    );
    for case in &summary.cases {
        match case.overhead {
            None => println!("  {:<36} {:>9.0}", case.name, case.ns_median),
            Some(o) => println!(
                "  {:<36} {:>9.0}  {:>9}  {:>19}",
                case.name,
                case.ns_median,
                signed(o.median),
                format!("{}..{}", signed(o.p25), signed(o.p75)),
            ),
        }
    }
    if summary.driver == Driver::MtSpawned && summary.one_worker_runs > 0 {
        println!(
            "  ({} runs had both loops start on one worker)",
            summary.one_worker_runs
        );
    }
}

fn print_ratios(summaries: &[GroupSummary], config: &Config) {
    println!(
        "\nRatios of overheads: median of the per-round ratios (p25-p75); lower is better for us."
    );
    for &(numerator, denominator, label) in RATIOS {
        println!("  {label:<21} = {numerator} / {denominator}");
    }
    print!("\n  {:<22}", "driver/behaviour");
    for &(_, _, label) in RATIOS {
        print!(" {label:>26}");
    }
    println!();
    for driver in &config.drivers {
        for behaviour in &config.behaviours {
            let ratio = |numerator: &str| {
                summaries
                    .iter()
                    .filter(|s| s.driver == *driver && s.behaviour == *behaviour)
                    .flat_map(|s| &s.ratios)
                    .find(|r| r.numerator == numerator)
            };
            let cells: Vec<String> = RATIOS
                .iter()
                .map(|&(numerator, _, _)| match ratio(numerator) {
                    Some(r) => ratio_cell(r.spread, r.used(), config.rounds),
                    None => "-".to_owned(),
                })
                .collect();
            if cells.iter().all(|cell| cell == "-") {
                continue;
            }
            print!(
                "  {:<22}",
                format!("{}/{}", driver.name(), behaviour.name())
            );
            for cell in cells {
                print!(" {cell:>26}");
            }
            println!();
        }
    }
}

// --------------------------------------------------------------------------------------------
// The machine

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or("").trim().to_owned()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|load| {
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// The output of a command run in the crate's directory, or "unknown".
fn command(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| first_line(&String::from_utf8_lossy(&out.stdout)))
        .unwrap_or_else(|| "unknown".to_owned())
}

fn commit() -> String {
    let head = command("git", &["rev-parse", "--short", "HEAD"]);
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no", "--", "src"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .is_ok_and(|out| !out.stdout.is_empty());
    if dirty {
        format!("{head} (src/ modified)")
    } else {
        head
    }
}

/// The versions in `Cargo.lock` of the crates whose code is measured.
fn versions() -> Vec<(&'static str, String)> {
    const LOCK: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock"));
    const CRATES: [&str; 7] = [
        "tokio",
        "tower",
        "tower-http",
        "hyper",
        "http-body-util",
        "tracing",
        "tracing-subscriber",
    ];
    let mut found = Vec::new();
    for package in LOCK.split("[[package]]") {
        let field = |key: &str| {
            package.lines().find_map(|line| {
                line.strip_prefix(key)
                    .and_then(|rest| rest.trim().strip_prefix('='))
                    .map(|value| value.trim().trim_matches('"').to_owned())
            })
        };
        if let (Some(name), Some(version)) = (field("name "), field("version ")) {
            if let Some(krate) = CRATES.iter().find(|krate| **krate == name) {
                found.push((*krate, version));
            }
        }
    }
    found.sort_by_key(|(krate, _)| CRATES.iter().position(|k| k == krate));
    found
}

/// What the run can read of the machine and the code measured.
struct Machine {
    cpu: String,
    threads: usize,
    rustc: String,
    commit: String,
    versions: Vec<(&'static str, String)>,
    load_before: String,
    load_after: String,
}

impl Machine {
    fn read() -> Machine {
        Machine {
            cpu: cpu_model(),
            threads: std::thread::available_parallelism().map_or(0, |n| n.get()),
            rustc: command("rustc", &["-V"]),
            commit: commit(),
            versions: versions(),
            load_before: load_average(),
            load_after: String::new(),
        }
    }

    fn print(&self) {
        println!("  cpu: {} ({} threads available)", self.cpu, self.threads);
        println!(
            "  {}; tower-timeouts {} at {}",
            self.rustc,
            env!("CARGO_PKG_VERSION"),
            self.commit
        );
        let versions: Vec<String> = self
            .versions
            .iter()
            .map(|(krate, version)| format!("{krate} {version}"))
            .collect();
        println!("  {}", versions.join(", "));
        println!("  load average before: {}", self.load_before);
    }

    fn json(&self) -> Json {
        let versions = std::iter::once(("tower-timeouts", Json::str(env!("CARGO_PKG_VERSION"))))
            .chain(
                self.versions
                    .iter()
                    .map(|(k, v)| (*k, Json::str(v.as_str()))),
            );
        Json::obj([
            ("cpu", Json::str(self.cpu.as_str())),
            ("threads", Json::from(self.threads)),
            ("rustc", Json::str(self.rustc.as_str())),
            ("commit", Json::str(self.commit.as_str())),
            ("versions", Json::obj(versions)),
            ("load_before", Json::str(self.load_before.as_str())),
            ("load_after", Json::str(self.load_after.as_str())),
        ])
    }
}

// --------------------------------------------------------------------------------------------
// The results file

fn spread_json(spread: Option<Spread>) -> Json {
    spread.map_or(Json::Null, |s| {
        Json::obj([
            ("median", Json::Num(s.median)),
            ("p25", Json::Num(s.p25)),
            ("p75", Json::Num(s.p75)),
        ])
    })
}

fn numbers(values: impl IntoIterator<Item = f64>) -> Json {
    Json::Arr(values.into_iter().map(Json::Num).collect())
}

fn group_json(s: &GroupSummary) -> Json {
    let cases = s.cases.iter().map(|c| {
        Json::obj([
            ("name", Json::str(c.name)),
            ("median_ns", Json::Num(c.ns_median)),
            ("overhead", spread_json(c.overhead)),
            ("ns", numbers(c.ns.iter().copied())),
            ("overhead_per_round", numbers(c.overheads.iter().copied())),
        ])
    });
    let ratios = s.ratios.iter().map(|r| {
        Json::obj([
            ("numerator", Json::str(r.numerator)),
            ("denominator", Json::str(r.denominator)),
            ("rounds_used", Json::from(r.used())),
            ("ratio", spread_json(r.spread)),
            (
                "per_round",
                Json::Arr(r.per_round.iter().map(|&x| Json::from(x)).collect()),
            ),
        ])
    });
    Json::obj([
        ("phase", Json::str(s.phase.name())),
        ("driver", Json::str(s.driver.name())),
        ("behaviour", Json::str(s.behaviour.name())),
        ("baseline", Json::str(s.phase.baseline())),
        ("one_worker_runs", Json::from(s.one_worker_runs)),
        ("cases", Json::Arr(cases.collect())),
        ("ratios", Json::Arr(ratios.collect())),
    ])
}

fn results_json(
    config: &Config,
    machine: &Machine,
    elapsed: Duration,
    summaries: &[GroupSummary],
) -> Json {
    let cases = CASES.iter().map(|(name, phase, what)| {
        Json::obj([
            ("name", Json::str(*name)),
            ("phase", Json::str(phase.name())),
            ("is", Json::str(*what)),
        ])
    });
    let ratios = RATIOS.iter().map(|(numerator, denominator, label)| {
        Json::obj([
            ("numerator", Json::str(*numerator)),
            ("denominator", Json::str(*denominator)),
            ("label", Json::str(*label)),
        ])
    });
    Json::obj([
        ("bench", Json::str("overhead")),
        ("machine", machine.json()),
        (
            "config",
            Json::obj([
                ("rounds", Json::from(config.rounds)),
                ("warm_up", Json::from(config.warm_up)),
                ("requests", Json::from(config.requests)),
                ("seed", Json::from(config.seed)),
                ("workers", Json::from(WORKERS)),
                ("timeout_s", Json::from(TIMEOUT.as_secs())),
                (
                    "filter",
                    Json::Arr(config.words.iter().map(|w| Json::str(w.as_str())).collect()),
                ),
            ]),
        ),
        ("elapsed_s", Json::Num(elapsed.as_secs_f64())),
        ("cases", Json::Arr(cases.collect())),
        ("ratios", Json::Arr(ratios.collect())),
        (
            "groups",
            Json::Arr(summaries.iter().map(group_json).collect()),
        ),
    ])
}

// --------------------------------------------------------------------------------------------

fn main() {
    let config = Config::from_env();
    let phases: Vec<(Phase, Vec<&'static str>)> = [Phase::Unsubscribed, Phase::Subscribed]
        .into_iter()
        .map(|phase| (phase, config.cases_of(phase)))
        .filter(|(_, names)| !names.is_empty())
        .collect();
    if phases.is_empty() {
        let names: Vec<&str> = CASES.iter().map(|(name, _, _)| *name).collect();
        println!(
            "overhead: no case selected by {:?} (cases: {})",
            config.words,
            names.join(", ")
        );
        return;
    }
    assert!(
        !tracing::dispatcher::has_been_set(),
        "no tracing subscriber may be set before the bench starts"
    );

    let mut machine = Machine::read();
    println!("overhead: per-request cost of the layers, interleaved rounds");
    machine.print();
    let drivers: Vec<&str> = config.drivers.iter().map(|d| d.name()).collect();
    let behaviours: Vec<&str> = config.behaviours.iter().map(|b| b.name()).collect();
    println!(
        "  {} rounds (+{} warm-up), {} requests per case per round, seed {}; drivers: {}; \
         behaviours: {}",
        config.rounds,
        config.warm_up,
        config.requests,
        config.seed,
        drivers.join(", "),
        behaviours.join(", "),
    );

    let runtimes = Runtimes::new();
    let mut shuffler = Shuffler(config.seed);
    let started = Instant::now();
    let mut summaries = Vec::new();
    for (phase, names) in &phases {
        if *phase == Phase::Subscribed {
            tracing::dispatcher::set_global_default(subscriber())
                .expect("no subscriber was set before");
        }
        let mut groups: Vec<Group> = config
            .drivers
            .iter()
            .flat_map(|&driver| {
                config.behaviours.iter().map(move |&behaviour| Group {
                    phase: *phase,
                    driver,
                    behaviour,
                    cases: cases(*phase, behaviour.inner(), names),
                    ns: vec![Vec::new(); names.len()],
                    one_worker_runs: 0,
                })
            })
            .collect();
        run_phase(*phase, &mut groups, &runtimes, &config, &mut shuffler);
        summaries.extend(groups.iter().map(summarise));
    }
    let elapsed = started.elapsed();
    machine.load_after = load_average();
    drop(runtimes);

    for summary in &summaries {
        print_group(summary, &config);
    }
    print_ratios(&summaries, &config);
    println!(
        "\n{:.1} s for the rounds; load average before {}, after {}",
        elapsed.as_secs_f64(),
        machine.load_before,
        machine.load_after
    );
    write_json(
        "overhead.json",
        &results_json(&config, &machine, elapsed, &summaries),
    );
}
