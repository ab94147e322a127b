//! The body limits: what a response body limit costs per frame, beside tower-http's
//! `TimeoutBody`, and how late each limit fires on a real clock.
//!
//! Run with: `cargo bench --bench body` (a plain `main`, under a minute on 2 cores). A filter
//! argument that is not part of "body" skips it (`cargo bench -- foo`); flags are ignored.
//! Settings, by environment variable: `BODY_ROUNDS` (measured rounds, 21), `BODY_WARMUP`
//! (rounds run first and thrown away, 2), `BODY_BODIES` (bodies per case per round, 10),
//! `BODY_SEED` (of the shuffled orders, 1), `BODY_LATE_SAMPLES` (per limit and transport, 20;
//! 0 skips part 2), `BODY_ONLY` (comma-separated names of drivers, variants or cases to run,
//! e.g. `ct,all_ready,ours_idle`; a dimension it names none of runs whole, and the bare body
//! always runs).
//!
//! # Part 1: cost per frame
//!
//! A body of 10,000 frames of 16 static bytes (`Frames`, written here: a frame is a
//! `Bytes::from_static`, no allocation), polled to its end with `poll_frame` (as
//! `BodyExt::frame` does) and dropped. The time is taken inside the task, from the first poll to
//! the drop; making the body (and, for ours, calling the layered service for it) is not timed.
//! Cases:
//! - `bare`: the body alone, the baseline;
//! - `tower_http_idle`: `tower_http::timeout::TimeoutBody::new(30 s, body)` (what tower-http's
//!   `ResponseBodyTimeoutLayer` wraps a body in);
//! - `tower_http_idle_deadline`: `TimeoutBody::new(30 s, DeadlineBody::new(300 s, body))`:
//!   tower-http's cheapest way to the same two limits as `ours_idle_total`;
//! - `ours_idle`: the `TimedResponseBody` of `ResponseBodyTimeoutLayer::new().idle(30 s)` around
//!   a `service_fn` that answers the request's body, called once per body;
//! - `ours_idle_total`: the same with `.idle(30 s).total(300 s)`.
//!
//! No limit fires. No tracing subscriber is set and no hook is configured, so our layer takes
//! the path where nothing can see a recording (it follows no body).
//!
//! Variants (how the body behaves, and what the runtime's timer driver knows):
//! - `all_ready`: every frame is ready at the first poll, so the whole body is polled in one
//!   poll of the task. `TimeoutBody` makes, registers and cancels a `Sleep` per frame. tokio
//!   wakes its driver (a write to an eventfd, a system call) whenever a timer is registered
//!   that is due before the driver's next planned wake-up, as known at its last park; on the
//!   current-thread runtime the one thread is busy polling, so that wake-up stays "none" and
//!   every frame's `Sleep` pays the system call. (tokio's coop budget does not cut this short:
//!   a `Sleep` that returns `Pending` gives its unit of budget back, so it never runs out.)
//! - `all_ready_sooner_timer`: the same, after registering another timer due in 1 s and
//!   yielding once, so that the driver parks knowing of a timer due before the body's 30 s:
//!   as in a server with other timers armed. `TimeoutBody`'s registrations wake nobody then;
//!   this is the anchor at its cheapest;
//! - `pending_every_10th`: before every 10th frame the body returns `Pending` once, after
//!   waking its own task (so the task is scheduled again at once, and the driver gets turned
//!   now and then, as the scheduler does every 61 task polls). Our body arms its timer at
//!   each of these polls (a clock read, and a move of its one registered timer to a later
//!   deadline, which tokio does without its lock); `TimeoutBody` still makes and registers a
//!   new `Sleep` for every frame.
//!
//! Drivers: `ct`, a task spawned on a current-thread runtime (the figures asked for first);
//! `mt`, a task spawned on a multi-thread runtime with 2 workers (its timer wheel and its
//! scheduler's wake path differ). Both time inside the task.
//!
//! Rounds: a round runs every (driver, variant) group once, in a shuffled order, and within a
//! group every case once (`BODY_BODIES` bodies), in a shuffled order; the shuffles come from
//! `BODY_SEED`. Per round, a case's figure is its ns per frame; its overhead is that less the
//! bare body's in the same round and group. Reported: medians over the rounds, and for the
//! ratios the median of the per-round ratios with their spread (p25–p75 and min–max): the time
//! over the bare body's, the time over `TimeoutBody`'s, and the overhead over `TimeoutBody`'s
//! (a round whose anchor overhead is not above zero gives no overhead ratio).
//!
//! # Part 2: how late each limit fires
//!
//! Real time, no paused clock, a multi-thread runtime with 2 workers. Each sample measures
//! the time from its start mark to the limit's effect, less the limit:
//! - response body, idle 100 ms: a body that sends one frame, then stalls; from the frame to
//!   the error (in process) or to the connection's end (TCP);
//! - response body, total 300 ms: a body with a frame every 20 ms, forever; from the response
//!   head to the error / the connection's end;
//! - request body, idle 100 ms and total 300 ms: a handler that reads the whole body (a
//!   `service_fn` that collects it, in process; axum's `Bytes` extractor over TCP), of which
//!   one frame arrives and then nothing; from the call (in process) or from writing the request
//!   (TCP) to the 408 response's head.
//!
//! Two transports, interleaved sample by sample in a shuffled order:
//! - `in_process`: the layer around a `service_fn`, called and its body polled in a task
//!   spawned on the runtime; the bodies are `StreamBody`s fed by mpsc channels; timed in the
//!   task;
//! - `tcp`: an axum server on 127.0.0.1 (on the same runtime) with the layers
//!   (`RequestBodyTimeoutLayer` outside `ResponseBodyTimeoutLayer`, one server with the idle
//!   limits, one with the total ones), and a raw HTTP/1.1 client on a blocking
//!   `std::net::TcpStream` on the main thread, one connection per sample. A response body cut
//!   by a limit shows as the connection closed without the last chunk (checked); the client's
//!   clock starts when it reads the head, a little after the server's total limit started.
//!
//! tokio rounds a deadline up to its next millisecond tick, and its driver sleeps in whole
//! milliseconds: 1 to 2 ms of lateness is the timer's own granularity (about 1.3 ms at the
//! median on the machine this was written on).
//!
//! Nothing asserts the figures. The results also go to
//! `<target dir>/tower-timeouts-bench/body.json`.

// Wall-clock timing of the loops, not the runtime's (pausable) clock.
#![allow(clippy::disallowed_types)]

mod support;

use std::convert::Infallible;
use std::future::{poll_fn, ready, Future};
use std::hint::black_box;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::process::Command;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, StreamBody};
use support::report::{median, percentile, selected, write_json, Json};
use tokio::runtime::{Builder, Runtime};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{IntervalStream, ReceiverStream};
use tokio_stream::StreamExt as _;
use tower::{service_fn, Layer, ServiceBuilder, ServiceExt};
use tower_http::timeout::{DeadlineBody, TimeoutBody};
use tower_timeouts::body_timeout::TimedResponseBody;
use tower_timeouts::{BodyTimeoutError, RequestBodyTimeoutLayer, ResponseBodyTimeoutLayer};

// ---------------------------------------------------------------------------------------------
// Settings

/// Frames per body.
const FRAMES: usize = 10_000;
/// `pending_every_10th`: the body is pending once before every this-many-th frame.
const PENDING_EVERY: usize = 10;
const CHUNK: &[u8; 16] = b"0123456789abcdef";
/// Part 1's limits: long enough never to fire.
const IDLE: Duration = Duration::from_secs(30);
const TOTAL: Duration = Duration::from_secs(300);
/// `all_ready_sooner_timer`: the other timer's delay.
const SOONER: Duration = Duration::from_secs(1);

/// Part 2's limits.
const LATE_IDLE: Duration = Duration::from_millis(100);
const LATE_TOTAL: Duration = Duration::from_millis(300);
/// Part 2's ticking body: a frame this often.
const TICK: Duration = Duration::from_millis(20);
/// A sample with no effect after this is a failure (and the bench goes on).
const SAMPLE_LIMIT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
struct Config {
    rounds: usize,
    warm_up: usize,
    bodies: usize,
    seed: u64,
    late_samples: usize,
    /// `BODY_ONLY`'s words.
    only: Vec<String>,
}

fn env_number(name: &str, default: u64, range: std::ops::RangeInclusive<u64>) -> u64 {
    let value = match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => value
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
        _ => default,
    };
    assert!(range.contains(&value), "{name}={value} is out of {range:?}");
    value
}

impl Config {
    fn from_env() -> Config {
        Config {
            rounds: env_number("BODY_ROUNDS", 21, 1..=1_000) as usize,
            warm_up: env_number("BODY_WARMUP", 2, 0..=100) as usize,
            bodies: env_number("BODY_BODIES", 10, 1..=1_000) as usize,
            seed: env_number("BODY_SEED", 1, 0..=u64::MAX),
            late_samples: env_number("BODY_LATE_SAMPLES", 20, 0..=1_000) as usize,
            only: std::env::var("BODY_ONLY")
                .unwrap_or_default()
                .split([',', ' '])
                .filter(|word| !word.is_empty())
                .map(str::to_owned)
                .collect(),
        }
    }

    /// The members of `all` that `BODY_ONLY` names, or all of them if it names none.
    fn picks<T: Copy>(&self, all: &[T], name: impl Fn(T) -> &'static str) -> Vec<T> {
        let named: Vec<T> = all
            .iter()
            .copied()
            .filter(|&x| self.only.iter().any(|word| word == name(x)))
            .collect();
        if named.is_empty() {
            all.to_vec()
        } else {
            named
        }
    }
}

/// SplitMix64: enough to shuffle an order, reproducibly (as in `benches/overhead.rs`).
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

/// Median, quartiles and extremes of a set of values.
#[derive(Clone, Copy, Debug)]
struct Spread {
    median: f64,
    p25: f64,
    p75: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(values: &[f64]) -> Option<Spread> {
        if values.is_empty() {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(Spread {
            median: median(&sorted),
            p25: percentile(&sorted, 0.25),
            p75: percentile(&sorted, 0.75),
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        })
    }

    fn json(spread: Option<Spread>) -> Json {
        spread.map_or(Json::Null, |s| {
            Json::obj([
                ("median", Json::Num(s.median)),
                ("p25", Json::Num(s.p25)),
                ("p75", Json::Num(s.p75)),
                ("min", Json::Num(s.min)),
                ("max", Json::Num(s.max)),
            ])
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Part 1: cost per frame

/// 10,000 frames of static bytes, each ready at once, or (`pending_every`) after one pending
/// poll that wakes its own task.
#[derive(Debug)]
struct Frames {
    sent: usize,
    pending_every: Option<usize>,
    pended: bool,
}

impl Frames {
    fn new(pending_every: Option<usize>) -> Frames {
        Frames {
            sent: 0,
            pending_every,
            pended: false,
        }
    }
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.sent == FRAMES {
            return Poll::Ready(None);
        }
        if let Some(every) = this.pending_every {
            if (this.sent + 1) % every == 0 && !this.pended {
                this.pended = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        this.pended = false;
        this.sent += 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(CHUNK)))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent == FRAMES
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(((FRAMES - self.sent) * CHUNK.len()) as u64)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    Bare,
    TowerHttpIdle,
    TowerHttpIdleDeadline,
    OursIdle,
    OursIdleTotal,
}

const CASES: [Case; 5] = [
    Case::Bare,
    Case::TowerHttpIdle,
    Case::TowerHttpIdleDeadline,
    Case::OursIdle,
    Case::OursIdleTotal,
];

/// (numerator, denominator) of the ratios reported, both over the bare body.
const RATIOS: [(Case, Case); 4] = [
    (Case::OursIdle, Case::TowerHttpIdle),
    (Case::OursIdleTotal, Case::TowerHttpIdle),
    (Case::OursIdleTotal, Case::TowerHttpIdleDeadline),
    (Case::TowerHttpIdleDeadline, Case::TowerHttpIdle),
];

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Bare => "bare",
            Case::TowerHttpIdle => "tower_http_idle",
            Case::TowerHttpIdleDeadline => "tower_http_idle_deadline",
            Case::OursIdle => "ours_idle",
            Case::OursIdleTotal => "ours_idle_total",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Case::Bare => "bare body",
            Case::TowerHttpIdle => "tower-http TimeoutBody (idle 30 s)",
            Case::TowerHttpIdleDeadline => "tower-http TimeoutBody + DeadlineBody (30 s, 300 s)",
            Case::OursIdle => "ours idle(30 s)",
            Case::OursIdleTotal => "ours idle(30 s).total(300 s)",
        }
    }

    fn index(self) -> usize {
        CASES.iter().position(|&c| c == self).expect("a case")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    AllReady,
    AllReadySoonerTimer,
    PendingEvery10th,
}

const VARIANTS: [Variant; 3] = [
    Variant::AllReady,
    Variant::AllReadySoonerTimer,
    Variant::PendingEvery10th,
];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::AllReady => "all_ready",
            Variant::AllReadySoonerTimer => "all_ready_sooner_timer",
            Variant::PendingEvery10th => "pending_every_10th",
        }
    }

    fn pending_every(self) -> Option<usize> {
        (self == Variant::PendingEvery10th).then_some(PENDING_EVERY)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Driver {
    Ct,
    Mt,
}

const DRIVERS: [Driver; 2] = [Driver::Ct, Driver::Mt];

impl Driver {
    fn name(self) -> &'static str {
        match self {
            Driver::Ct => "ct",
            Driver::Mt => "mt",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Driver::Ct => "current-thread runtime, one spawned task",
            Driver::Mt => "multi-thread runtime (2 workers), one spawned task",
        }
    }
}

/// Our body, as the layer makes it: the layered service called with a request whose body it
/// answers.
async fn ours(layer: ResponseBodyTimeoutLayer, frames: Frames) -> TimedResponseBody<Frames> {
    let service = layer.layer(service_fn(|request: Request<Frames>| {
        ready(Ok::<_, Infallible>(Response::new(request.into_body())))
    }));
    service
        .oneshot(Request::new(frames))
        .await
        .expect("infallible")
        .into_body()
}

/// Polls `body` to its end; the frames seen.
async fn poll_all<B>(mut body: Pin<&mut B>) -> usize
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    let mut frames = 0;
    while let Some(frame) = poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        black_box(frame.expect("no limit fires"));
        frames += 1;
        if frames > FRAMES {
            break;
        }
    }
    frames
}

/// The time from the first poll of `body` to its drop, after its end.
async fn drain<B>(body: B) -> Duration
where
    B: Body,
    B::Error: std::fmt::Debug,
{
    let mut body = Box::pin(body);
    let start = Instant::now();
    let frames = poll_all(body.as_mut()).await;
    drop(body);
    let took = start.elapsed();
    assert_eq!(frames, FRAMES);
    took
}

/// `bodies` bodies of `case`, each polled to its end: the time taken, all told.
async fn run_case(case: Case, variant: Variant, bodies: usize) -> Duration {
    let idle = ResponseBodyTimeoutLayer::new().idle(IDLE);
    let idle_total = ResponseBodyTimeoutLayer::new().idle(IDLE).total(TOTAL);
    let mut took = Duration::ZERO;
    for _ in 0..bodies {
        let frames = Frames::new(variant.pending_every());
        // Another timer, due before any the body registers, known to the driver at its last
        // park: the driver's next wake-up is no later than the body's timers.
        let mut sooner = pin!(tokio::time::sleep(SOONER));
        if variant == Variant::AllReadySoonerTimer {
            poll_fn(|cx| {
                assert!(sooner.as_mut().poll(cx).is_pending());
                Poll::Ready(())
            })
            .await;
            tokio::task::yield_now().await;
        }
        took += match case {
            Case::Bare => drain(frames).await,
            Case::TowerHttpIdle => drain(TimeoutBody::new(IDLE, frames)).await,
            Case::TowerHttpIdleDeadline => {
                let body = TimeoutBody::new(IDLE, DeadlineBody::new(TOTAL, frames));
                drain(body).await
            }
            Case::OursIdle => drain(ours(idle.clone(), frames).await).await,
            Case::OursIdleTotal => drain(ours(idle_total.clone(), frames).await).await,
        };
    }
    took
}

struct Runtimes {
    ct: Runtime,
    mt: Runtime,
}

impl Runtimes {
    fn new() -> Runtimes {
        Runtimes {
            ct: Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("current-thread runtime"),
            mt: Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("multi-thread runtime"),
        }
    }

    /// ns per frame of `case`, run in a task spawned on `driver`'s runtime.
    fn measure(&self, driver: Driver, case: Case, variant: Variant, bodies: usize) -> f64 {
        let runtime = match driver {
            Driver::Ct => &self.ct,
            Driver::Mt => &self.mt,
        };
        let took = runtime.block_on(async move {
            let task = tokio::spawn(run_case(case, variant, bodies));
            tokio::time::timeout(Duration::from_secs(60), task)
                .await
                .expect("a case runs in under a minute")
                .expect("the task ends")
        });
        took.as_nanos() as f64 / (bodies * FRAMES) as f64
    }
}

/// One (driver, variant): `ns[case][round]`, ns per frame.
struct Group {
    driver: Driver,
    variant: Variant,
    ns: Vec<Vec<f64>>,
}

fn run_cost(config: &Config, shuffler: &mut Shuffler) -> Vec<Group> {
    let runtimes = Runtimes::new();
    let variants = config.picks(&VARIANTS, Variant::name);
    let mut cases = config.picks(&CASES, Case::name);
    if !cases.contains(&Case::Bare) {
        cases.insert(0, Case::Bare);
    }
    let mut groups: Vec<Group> = config
        .picks(&DRIVERS, Driver::name)
        .into_iter()
        .flat_map(|driver| {
            variants.iter().map(move |&variant| Group {
                driver,
                variant,
                ns: vec![Vec::new(); CASES.len()],
            })
        })
        .collect();
    let started = Instant::now();
    let total = config.warm_up + config.rounds;
    for round in 0..total {
        let measured = round >= config.warm_up;
        for g in shuffler.order(groups.len()) {
            let group = &mut groups[g];
            for c in shuffler.order(cases.len()) {
                let case = cases[c];
                let ns = runtimes.measure(group.driver, case, group.variant, config.bodies);
                if measured {
                    group.ns[case.index()].push(ns);
                }
            }
        }
        eprintln!(
            "cost round {}/{}{} done ({:.1} s)",
            round + 1,
            total,
            if measured { "" } else { " (warm-up)" },
            started.elapsed().as_secs_f64()
        );
    }
    groups
}

/// A case's figures in its group.
struct CaseFigures {
    ns: Option<Spread>,
    /// Per round, less the bare body's.
    overhead: Option<Spread>,
    /// Per round, over the bare body's time.
    vs_bare: Option<Spread>,
}

/// A ratio's figures in a group.
struct RatioFigures {
    numerator: Case,
    denominator: Case,
    /// Per round, time over time.
    time: Option<Spread>,
    /// Per round, overhead over overhead (rounds whose denominator's overhead is above 0).
    overhead: Option<Spread>,
    overhead_rounds: usize,
}

fn case_figures(group: &Group, case: Case) -> CaseFigures {
    let ns = &group.ns[case.index()];
    let bare = &group.ns[Case::Bare.index()];
    let overheads: Vec<f64> = ns.iter().zip(bare).map(|(n, b)| n - b).collect();
    let vs_bare: Vec<f64> = ns.iter().zip(bare).map(|(n, b)| n / b).collect();
    CaseFigures {
        ns: Spread::of(ns),
        overhead: (case != Case::Bare)
            .then(|| Spread::of(&overheads))
            .flatten(),
        vs_bare: (case != Case::Bare).then(|| Spread::of(&vs_bare)).flatten(),
    }
}

fn ratio_figures(group: &Group, numerator: Case, denominator: Case) -> RatioFigures {
    let bare = &group.ns[Case::Bare.index()];
    let num = &group.ns[numerator.index()];
    let den = &group.ns[denominator.index()];
    let time: Vec<f64> = num.iter().zip(den).map(|(n, d)| n / d).collect();
    let overhead: Vec<f64> = num
        .iter()
        .zip(den)
        .zip(bare)
        .filter(|((_, d), b)| *d - *b > 0.0)
        .map(|((n, d), b)| (n - b) / (d - b))
        .collect();
    RatioFigures {
        numerator,
        denominator,
        time: Spread::of(&time),
        overhead_rounds: overhead.len(),
        overhead: Spread::of(&overhead),
    }
}

fn fmt_spread(spread: Option<Spread>, decimals: usize) -> String {
    spread.map_or_else(
        || "n/a".to_owned(),
        |s| {
            format!(
                "{:.d$} ({:.d$}–{:.d$}; {:.d$}–{:.d$})",
                s.median,
                s.p25,
                s.p75,
                s.min,
                s.max,
                d = decimals
            )
        },
    )
}

fn fmt_median(spread: Option<Spread>, decimals: usize) -> String {
    spread.map_or_else(
        || "n/a".to_owned(),
        |s| format!("{:.*}", decimals, s.median),
    )
}

fn print_cost(config: &Config, groups: &[Group]) {
    println!(
        "\n## Part 1: cost per frame, {} frames of {} bytes per body, {} bodies per case per \
         round, {} rounds (+{} warm-up), seed {}\n",
        FRAMES,
        CHUNK.len(),
        config.bodies,
        config.rounds,
        config.warm_up,
        config.seed
    );
    println!(
        "Per round: ns per frame; overhead = that less the bare body's; ratios per round. Cells: \
         median (p25–p75; min–max) over the rounds.\n"
    );
    for group in groups {
        println!(
            "### {} ({}), {}\n",
            group.driver.name(),
            group.driver.label(),
            group.variant.name()
        );
        println!("| case | ns/frame | +ns/frame over bare | time ÷ bare |");
        println!("|---|---:|---:|---:|");
        for case in CASES {
            let f = case_figures(group, case);
            println!(
                "| {} | {} | {} | {} |",
                case.label(),
                fmt_spread(f.ns, 2),
                fmt_spread(f.overhead, 2),
                fmt_spread(f.vs_bare, 3)
            );
        }
        println!("\n| ratio | time ÷ time | overhead ÷ overhead | rounds |");
        println!("|---|---:|---:|---:|");
        for (numerator, denominator) in RATIOS {
            let r = ratio_figures(group, numerator, denominator);
            println!(
                "| {} / {} | {} | {} | {}/{} |",
                r.numerator.name(),
                r.denominator.name(),
                fmt_spread(r.time, 3),
                fmt_spread(r.overhead, 3),
                r.overhead_rounds,
                config.rounds
            );
        }
        println!();
    }
}

/// The small table at the end, for one driver.
fn print_cost_summary(groups: &[Group], driver: Driver) {
    println!(
        "| variant | case | ns/frame | +ns/frame | ÷ bare (min–max) | ÷ TimeoutBody (min–max) \
         | overhead ÷ TimeoutBody's (p25–p75) | ÷ TimeoutBody+DeadlineBody (min–max) |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let range = |s: Option<Spread>, d: usize| {
        s.map_or_else(
            || "—".to_owned(),
            |s| format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.min, s.max, d = d),
        )
    };
    let quartiles = |s: Option<Spread>, d: usize| {
        s.map_or_else(
            || "—".to_owned(),
            |s| format!("{:.d$} ({:.d$}–{:.d$})", s.median, s.p25, s.p75, d = d),
        )
    };
    for group in groups.iter().filter(|g| g.driver == driver) {
        for case in CASES {
            let f = case_figures(group, case);
            if f.ns.is_none() {
                continue;
            }
            let (vs_timeout, overhead_ratio, vs_both) = match case {
                Case::Bare | Case::TowerHttpIdle => ("—".to_owned(), "—".to_owned(), "—".into()),
                _ => {
                    let r = ratio_figures(group, case, Case::TowerHttpIdle);
                    let both = if case == Case::OursIdleTotal {
                        range(
                            ratio_figures(group, case, Case::TowerHttpIdleDeadline).time,
                            3,
                        )
                    } else {
                        "—".to_owned()
                    };
                    (range(r.time, 3), quartiles(r.overhead, 3), both)
                }
            };
            let overhead = if case == Case::Bare {
                "—".to_owned()
            } else {
                fmt_median(f.overhead, 2)
            };
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                group.variant.name(),
                case.name(),
                fmt_median(f.ns, 2),
                overhead,
                if case == Case::Bare {
                    "—".to_owned()
                } else {
                    range(f.vs_bare, 3)
                },
                vs_timeout,
                overhead_ratio,
                vs_both
            );
        }
    }
}

fn cost_json(config: &Config, groups: &[Group]) -> Json {
    Json::obj([
        (
            "config",
            Json::obj([
                ("frames_per_body", FRAMES.into()),
                ("frame_bytes", CHUNK.len().into()),
                ("pending_every", PENDING_EVERY.into()),
                ("bodies_per_case_per_round", config.bodies.into()),
                ("rounds", config.rounds.into()),
                ("warm_up", config.warm_up.into()),
                ("seed", Json::from(config.seed)),
                ("idle_s", IDLE.as_secs().into()),
                ("total_s", TOTAL.as_secs().into()),
            ]),
        ),
        (
            "groups",
            Json::Arr(
                groups
                    .iter()
                    .map(|group| {
                        let cases = CASES.iter().map(|&case| {
                            let f = case_figures(group, case);
                            Json::obj([
                                ("name", Json::str(case.name())),
                                ("ns_per_frame", Spread::json(f.ns)),
                                ("overhead_ns_per_frame", Spread::json(f.overhead)),
                                ("time_over_bare", Spread::json(f.vs_bare)),
                                (
                                    "rounds_ns_per_frame",
                                    Json::Arr(
                                        group.ns[case.index()]
                                            .iter()
                                            .map(|&ns| Json::Num(ns))
                                            .collect(),
                                    ),
                                ),
                            ])
                        });
                        let ratios = RATIOS.iter().map(|&(numerator, denominator)| {
                            let r = ratio_figures(group, numerator, denominator);
                            Json::obj([
                                ("numerator", Json::str(numerator.name())),
                                ("denominator", Json::str(denominator.name())),
                                ("time", Spread::json(r.time)),
                                ("overhead", Spread::json(r.overhead)),
                                ("overhead_rounds", r.overhead_rounds.into()),
                            ])
                        });
                        Json::obj([
                            ("driver", Json::str(group.driver.name())),
                            ("variant", Json::str(group.variant.name())),
                            ("cases", Json::Arr(cases.collect())),
                            ("ratios", Json::Arr(ratios.collect())),
                        ])
                    })
                    .collect(),
            ),
        ),
    ])
}

// ---------------------------------------------------------------------------------------------
// Part 2: how late each limit fires

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Limit {
    ResponseIdle,
    ResponseTotal,
    RequestIdle,
    RequestTotal,
}

const LIMITS: [Limit; 4] = [
    Limit::ResponseIdle,
    Limit::ResponseTotal,
    Limit::RequestIdle,
    Limit::RequestTotal,
];

impl Limit {
    fn name(self) -> &'static str {
        match self {
            Limit::ResponseIdle => "response body idle 100 ms",
            Limit::ResponseTotal => "response body total 300 ms",
            Limit::RequestIdle => "request body idle 100 ms",
            Limit::RequestTotal => "request body total 300 ms",
        }
    }

    fn limit(self) -> Duration {
        match self {
            Limit::ResponseIdle | Limit::RequestIdle => LATE_IDLE,
            Limit::ResponseTotal | Limit::RequestTotal => LATE_TOTAL,
        }
    }

    fn is_idle(self) -> bool {
        self.limit() == LATE_IDLE
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    InProcess,
    Tcp,
}

const TRANSPORTS: [Transport; 2] = [Transport::InProcess, Transport::Tcp];

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::InProcess => "in_process",
            Transport::Tcp => "tcp",
        }
    }
}

type Fed = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

/// A body fed by hand through a channel.
fn fed() -> (mpsc::Sender<Result<Frame<Bytes>, Infallible>>, Fed) {
    let (tx, rx) = mpsc::channel(8);
    (tx, StreamBody::new(ReceiverStream::new(rx)))
}

fn data(bytes: &'static [u8]) -> Result<Frame<Bytes>, Infallible> {
    Ok(Frame::data(Bytes::from_static(bytes)))
}

/// A handler that reads the whole body and answers 400 if reading fails, as axum's extractors
/// do.
async fn reads_body<B: Body>(request: Request<B>) -> Result<Response<String>, Infallible> {
    Ok(match request.into_body().collect().await {
        Ok(body) => Response::new(format!("{} bytes", body.to_bytes().len())),
        Err(_) => {
            let mut response = Response::new("Failed to buffer the request body".to_owned());
            *response.status_mut() = StatusCode::BAD_REQUEST;
            response
        }
    })
}

/// The time from the sample's start mark to the limit's effect.
async fn in_process_sample(limit: Limit) -> Result<Duration, String> {
    match limit {
        Limit::ResponseIdle | Limit::ResponseTotal => {
            let layer = if limit.is_idle() {
                ResponseBodyTimeoutLayer::new().idle(LATE_IDLE)
            } else {
                ResponseBodyTimeoutLayer::new().total(LATE_TOTAL)
            };
            let (tx, body) = fed();
            let service = layer.layer(service_fn(|request: Request<Fed>| {
                ready(Ok::<_, Infallible>(Response::new(request.into_body())))
            }));
            let feeder = if limit.is_idle() {
                tx.send(data(b"first frame\n")).await.expect("send");
                None
            } else {
                // A frame every 20 ms, bounded (10 s), until the body is gone.
                Some(tokio::spawn(async move {
                    for _ in 0..500 {
                        if tx.send(data(b"tick\n")).await.is_err() {
                            break;
                        }
                        tokio::time::sleep(TICK).await;
                    }
                    tx
                }))
            };
            let response = service
                .oneshot(Request::new(body))
                .await
                .expect("infallible");
            let mut start = Instant::now();
            let mut body = Box::pin(response.into_body());
            let mut frames = 0;
            let error = loop {
                match poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
                    Some(Ok(_)) => {
                        frames += 1;
                        if limit.is_idle() {
                            // The idle wait starts at the next poll.
                            start = Instant::now();
                        }
                    }
                    Some(Err(error)) => break error,
                    None => return Err("the body ended".to_owned()),
                }
                if frames > 1_000 {
                    return Err("no limit fired".to_owned());
                }
            };
            let took = start.elapsed();
            let error = error
                .downcast::<BodyTimeoutError>()
                .map_err(|e| format!("another error: {e}"))?;
            if error.is_idle() != limit.is_idle() || frames == 0 {
                return Err(format!("{error:?} after {frames} frames"));
            }
            drop(body);
            if let Some(feeder) = feeder {
                feeder.abort();
            }
            Ok(took)
        }
        Limit::RequestIdle | Limit::RequestTotal => {
            let layer = if limit.is_idle() {
                RequestBodyTimeoutLayer::new().idle(LATE_IDLE)
            } else {
                RequestBodyTimeoutLayer::new().total(LATE_TOTAL)
            };
            let service = layer.layer(service_fn(reads_body));
            let (tx, body) = fed();
            tx.send(data(b"half of it\n")).await.expect("send");
            let start = Instant::now();
            let response = service
                .oneshot(Request::new(body))
                .await
                .expect("infallible");
            let took = start.elapsed();
            drop(tx);
            if response.status() != StatusCode::REQUEST_TIMEOUT {
                return Err(format!("status {}", response.status()));
            }
            Ok(took)
        }
    }
}

/// The axum app of the TCP servers: `/stall` (one frame, then nothing), `/tick` (a frame every
/// 20 ms), `/upload` (reads the whole body with axum's `Bytes` extractor).
fn app(idle: bool) -> Router {
    let (request, response) = if idle {
        (
            RequestBodyTimeoutLayer::new().idle(LATE_IDLE),
            ResponseBodyTimeoutLayer::new().idle(LATE_IDLE),
        )
    } else {
        (
            RequestBodyTimeoutLayer::new().total(LATE_TOTAL),
            ResponseBodyTimeoutLayer::new().total(LATE_TOTAL),
        )
    };
    Router::new()
        .route(
            "/stall",
            get(|| async {
                let frames =
                    tokio_stream::once(data(b"first frame\n")).chain(tokio_stream::pending());
                axum::body::Body::new(StreamBody::new(frames))
            }),
        )
        .route(
            "/tick",
            get(|| async {
                let ticks = IntervalStream::new(tokio::time::interval(TICK))
                    .take(500)
                    .map(|_| data(b"tick\n"));
                axum::body::Body::new(StreamBody::new(ticks))
            }),
        )
        .route(
            "/upload",
            post(|body: Bytes| async move { body.len().to_string() }),
        )
        .layer(ServiceBuilder::new().layer(request).layer(response))
}

async fn serve(idle: bool) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move { axum::serve(listener, app(idle)).await });
    addr
}

/// Reads from `stream` into `buffer` until `done(buffer)` or the connection's end (`true`
/// then), bounded in time by the stream's read timeout and in size.
fn read_until(
    stream: &mut std::net::TcpStream,
    buffer: &mut Vec<u8>,
    done: impl Fn(&[u8]) -> bool,
) -> Result<bool, String> {
    let deadline = Instant::now() + SAMPLE_LIMIT;
    let mut chunk = [0; 4096];
    while !done(buffer) {
        if Instant::now() > deadline || buffer.len() > 1 << 20 {
            return Err("nothing came in time".to_owned());
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(true),
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(true),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    Ok(false)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The time from the sample's start mark to the limit's effect, seen by a raw HTTP/1.1 client.
fn tcp_sample(
    limit: Limit,
    idle_addr: SocketAddr,
    total_addr: SocketAddr,
) -> Result<Duration, String> {
    let addr = if limit.is_idle() {
        idle_addr
    } else {
        total_addr
    };
    let mut stream = std::net::TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(SAMPLE_LIMIT))
        .map_err(|e| e.to_string())?;
    let head_done = |b: &[u8]| contains(b, b"\r\n\r\n");
    let mut buffer = Vec::new();
    match limit {
        Limit::ResponseIdle | Limit::ResponseTotal => {
            let path = if limit.is_idle() { "/stall" } else { "/tick" };
            let request = format!("GET {path} HTTP/1.1\r\nhost: bench\r\n\r\n");
            stream
                .write_all(request.as_bytes())
                .map_err(|e| format!("write: {e}"))?;
            // Idle: from the frame; total: from the head.
            let mark: &[u8] = if limit.is_idle() {
                b"first frame\n"
            } else {
                b"\r\n\r\n"
            };
            if read_until(&mut stream, &mut buffer, |b| contains(b, mark))? {
                return Err("closed before the mark".to_owned());
            }
            let start = Instant::now();
            if !read_until(&mut stream, &mut buffer, |_| false)? {
                unreachable!("reads until the end");
            }
            let took = start.elapsed();
            if !buffer.starts_with(b"HTTP/1.1 200") {
                return Err(format!("head {:?}", String::from_utf8_lossy(&buffer[..12])));
            }
            if buffer.ends_with(b"0\r\n\r\n") {
                return Err("the body ended normally".to_owned());
            }
            Ok(took)
        }
        Limit::RequestIdle | Limit::RequestTotal => {
            let request =
                b"POST /upload HTTP/1.1\r\nhost: bench\r\ncontent-length: 1000\r\n\r\nhalf of it\n";
            let start = Instant::now();
            stream
                .write_all(request)
                .map_err(|e| format!("write: {e}"))?;
            if read_until(&mut stream, &mut buffer, head_done)? {
                return Err("closed before the head".to_owned());
            }
            let took = start.elapsed();
            if !buffer.starts_with(b"HTTP/1.1 408") {
                return Err(format!(
                    "head {:?}",
                    String::from_utf8_lossy(&buffer[..buffer.len().min(12)])
                ));
            }
            Ok(took)
        }
    }
}

/// Lateness samples, in ms, and failures, per (transport, limit).
struct Lateness {
    late_ms: Vec<Vec<f64>>,
    failures: Vec<Vec<String>>,
}

fn slot(transport: Transport, limit: Limit) -> usize {
    let t = TRANSPORTS
        .iter()
        .position(|&x| x == transport)
        .expect("a transport");
    let l = LIMITS.iter().position(|&x| x == limit).expect("a limit");
    t * LIMITS.len() + l
}

fn run_lateness(config: &Config, shuffler: &mut Shuffler) -> Lateness {
    let runtime = Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("multi-thread runtime");
    let (idle_addr, total_addr) =
        runtime.block_on(async { (serve(true).await, serve(false).await) });
    let pairs: Vec<(Transport, Limit)> = TRANSPORTS
        .iter()
        .flat_map(|&t| LIMITS.iter().map(move |&l| (t, l)))
        .collect();
    let mut lateness = Lateness {
        late_ms: vec![Vec::new(); pairs.len()],
        failures: vec![Vec::new(); pairs.len()],
    };
    let started = Instant::now();
    for sample in 0..config.late_samples {
        for p in shuffler.order(pairs.len()) {
            let (transport, limit) = pairs[p];
            let took = match transport {
                Transport::InProcess => runtime.block_on(async move {
                    let task = tokio::spawn(in_process_sample(limit));
                    match tokio::time::timeout(SAMPLE_LIMIT, task).await {
                        Ok(Ok(took)) => took,
                        Ok(Err(e)) => Err(format!("task: {e}")),
                        Err(_) => Err("nothing came in time".to_owned()),
                    }
                }),
                Transport::Tcp => tcp_sample(limit, idle_addr, total_addr),
            };
            let s = slot(transport, limit);
            match took {
                Ok(took) => lateness.late_ms[s]
                    .push((took.as_secs_f64() - limit.limit().as_secs_f64()) * 1e3),
                Err(e) => lateness.failures[s].push(e),
            }
        }
        eprintln!(
            "lateness sample {}/{} done ({:.1} s)",
            sample + 1,
            config.late_samples,
            started.elapsed().as_secs_f64()
        );
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    lateness
}

fn print_lateness(config: &Config, lateness: &Lateness) {
    println!(
        "\n## Part 2: how late each limit fires, {} samples each, real time, multi-thread \
         runtime (2 workers)\n",
        config.late_samples
    );
    println!(
        "Lateness = the time from the start mark to the limit's effect, less the limit, in ms \
         (`in_process`: the layer around a service_fn, timed in a task; `tcp`: axum on \
         127.0.0.1, timed by a raw HTTP/1.1 client):\n"
    );
    println!("| limit | transport | samples | median | p90 | max | min | failures |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for limit in LIMITS {
        for transport in TRANSPORTS {
            let s = slot(transport, limit);
            let mut late = lateness.late_ms[s].clone();
            late.sort_by(f64::total_cmp);
            let cell = |q: f64| {
                if late.is_empty() {
                    "—".to_owned()
                } else {
                    format!("{:+.2}", percentile(&late, q))
                }
            };
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                limit.name(),
                transport.name(),
                late.len(),
                if late.is_empty() {
                    "—".to_owned()
                } else {
                    format!("{:+.2}", median(&late))
                },
                cell(0.9),
                cell(1.0),
                late.first().map_or("—".to_owned(), |m| format!("{m:+.2}")),
                lateness.failures[s].len()
            );
        }
    }
    for limit in LIMITS {
        for transport in TRANSPORTS {
            for failure in &lateness.failures[slot(transport, limit)] {
                println!("failure: {}, {}: {failure}", limit.name(), transport.name());
            }
        }
    }
}

fn lateness_json(config: &Config, lateness: &Lateness) -> Json {
    let rows = LIMITS.iter().flat_map(|&limit| {
        TRANSPORTS.iter().map(move |&transport| {
            let s = slot(transport, limit);
            Json::obj([
                ("limit", Json::str(limit.name())),
                ("transport", Json::str(transport.name())),
                ("late_ms", Spread::json(Spread::of(&lateness.late_ms[s]))),
                (
                    "samples_ms",
                    Json::Arr(lateness.late_ms[s].iter().map(|&x| Json::Num(x)).collect()),
                ),
                (
                    "failures",
                    Json::Arr(
                        lateness.failures[s]
                            .iter()
                            .map(|f| Json::str(f.as_str()))
                            .collect(),
                    ),
                ),
            ])
        })
    });
    Json::obj([
        ("samples", config.late_samples.into()),
        ("results", Json::Arr(rows.collect())),
    ])
}

// ---------------------------------------------------------------------------------------------

/// The version of `name` in the crate's `Cargo.lock` (the first, if there are several).
fn locked_version(name: &str) -> String {
    let found = || {
        let lock =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock")).ok()?;
        let needle = format!("name = \"{name}\"\nversion = \"");
        let start = lock.find(&needle)? + needle.len();
        let end = lock[start..].find('"')?;
        Some(lock[start..start + end].to_owned())
    };
    found().unwrap_or_else(|| "?".to_owned())
}

fn command(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_else(|| "?".to_owned())
}

fn machine() -> Vec<(&'static str, String)> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|model| model.trim().to_owned())
        })
        .unwrap_or_else(|| "?".to_owned());
    let threads = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned());
    vec![
        ("cpu", format!("{cpu}, {threads} threads")),
        ("rustc", command("rustc", &["-V"])),
        ("commit", command("git", &["rev-parse", "--short", "HEAD"])),
        ("tokio", locked_version("tokio")),
        ("tower-http", locked_version("tower-http")),
        ("hyper", locked_version("hyper")),
        ("axum", locked_version("axum")),
        ("load_before", load),
    ]
}

fn main() {
    if !selected("body") {
        return;
    }
    assert!(
        !tracing::dispatcher::has_been_set(),
        "no tracing subscriber may be set: our layers take their unrecorded path"
    );
    let config = Config::from_env();
    let facts = machine();
    println!("body: per-frame cost of the body limits, and how late they fire");
    for (name, value) in &facts {
        println!("  {name}: {value}");
    }
    let started = Instant::now();
    let mut shuffler = Shuffler(config.seed);
    let groups = run_cost(&config, &mut shuffler);
    let lateness = (config.late_samples > 0).then(|| run_lateness(&config, &mut shuffler));
    let took = started.elapsed();

    print_cost(&config, &groups);
    if let Some(lateness) = &lateness {
        print_lateness(&config, lateness);
    }
    for driver in DRIVERS {
        if !groups.iter().any(|group| group.driver == driver) {
            continue;
        }
        println!(
            "\n## Summary, {} ({}): median over {} rounds; ratios are medians of per-round \
             ratios\n",
            driver.name(),
            driver.label(),
            config.rounds
        );
        print_cost_summary(&groups, driver);
    }
    println!("\nbody: took {:.1} s", took.as_secs_f64());

    let json = Json::obj([
        ("bench", Json::str("body")),
        (
            "machine",
            Json::obj(facts.iter().map(|(k, v)| (*k, Json::str(v.as_str())))),
        ),
        ("elapsed_s", Json::Num(took.as_secs_f64())),
        ("cost", cost_json(&config, &groups)),
        (
            "lateness",
            lateness
                .as_ref()
                .map_or(Json::Null, |lateness| lateness_json(&config, lateness)),
        ),
    ]);
    write_json("body.json", &json);
}
