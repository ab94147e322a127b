//! gRPC end to end: a real tonic server on 127.0.0.1, driven over one HTTP/2 connection by an
//! in-process tonic client, bare, with tonic's own `Server::timeout`, and with the crate's
//! layers; then how late a DEADLINE_EXCEEDED from our layer reaches the caller.
//!
//! Run with: `cargo bench --bench grpc` (a plain `main`, about 35 seconds on 2 cores). A filter
//! argument that is not part of "grpc" skips it (`cargo bench -- foo`); flags are ignored.
//! `GRPC_ROUNDS` (20), `GRPC_WARM_UP_ROUNDS` (2), `GRPC_REQUESTS` (20,000 per round) and
//! `GRPC_LATE_CALLS` (200 per server) change the sizes.
//!
//! The service is `probe.v1.Probe` (`proto/probe.proto`, generated into `tests/probe/mod.rs`):
//! `Call` answers an empty `CallReply` at once when `sleep_ms` is 0, else after sleeping
//! `sleep_ms` (a tokio sleep); `Stream` (unused here) answers an empty stream.
//!
//! Part 1, per-request cost. Servers, one listener each, all on the same server runtime, each
//! `tonic::transport::Server` serving `ProbeServer` through `serve_with_incoming` with
//! `TCP_NODELAY` set on accepted connections:
//! - `bare`: `Server::builder()` with nothing. Note that tonic's server always wraps the
//!   service in its own `GrpcTimeout`, which parses the `grpc-timeout` header and, when there
//!   is one (as here: every call sends one), arms a tokio `Sleep` per request: `bare` already
//!   pays for one timer;
//! - `tonic_timeout`: `Server::builder().timeout(10 s)` (the same `GrpcTimeout`, with a cap:
//!   the shorter of the header and 10 s);
//! - `ours_response_timeout`: `Server::builder().layer(ResponseTimeoutLayer::new(10 s))` (on
//!   top of tonic's `GrpcTimeout`, which stays);
//! - `ours_full_stack`: `Server::builder().layer(..)` with `ClientDisconnectLayer` around
//!   `ResponseTimeoutLayer::new(10 s)`.
//!
//! No timeout fires in part 1 (every call's deadline is 10 s). The server runtime is a
//! multi-thread tokio runtime with one worker thread (the flavour of a real server, on one
//! core). The client runs on a current-thread runtime on another thread, so each side has
//! about one of the machine's two cores. No tracing subscriber is set anywhere in the process
//! (so our layers' events and spans are off).
//!
//! A round against one server: connect a tonic `Channel` (one HTTP/2 connection; not timed),
//! then `CONCURRENCY` (32) tasks, each with a clone of one `ProbeClient`, send `Call`s one at a
//! time, each task taking the next call until `GRPC_REQUESTS` are used up (so 32 in flight);
//! then drop the channel. Every call is `CallRequest { sleep_ms: 0, .. }` with
//! `Request::set_timeout(10 s)`, so that every server has a `grpc-timeout` header to parse. A
//! call's latency is timed on the client from just before `ProbeClient::call` (which waits for
//! the channel to be ready, encodes, and goes through the channel's buffer task) until its
//! reply is decoded; the round's throughput is the call count over the time from the first
//! call to the last reply.
//!
//! To cancel out drift (other builds on the machine, frequency changes), the servers are
//! interleaved: after `GRPC_WARM_UP_ROUNDS` warm-up rounds each, `GRPC_ROUNDS` rounds each, in
//! a rotating order (bare, tonic, ours, full; tonic, ours, full, bare; …; the warm-up rounds
//! rotate too). A ratio is taken within each round (against the anchor's run of that round)
//! and the tables give the median of those per-round ratios with their spread (p25–p75 and
//! min–max over the rounds). Throughput ratio: `< 1` is slower than the anchor; latency
//! ratios: `> 1` is slower. The overhead in µs per call is, per round, the case's median
//! latency less the anchor's (the median over the rounds is given), and, from throughput,
//! `1/rps(case) − 1/rps(anchor)` (the wall time per call added to a saturated pipeline, with
//! both cores busy: about the CPU time added per call, client and server together).
//! The client's own work (tonic's client stack, HTTP/2 framing, protobuf) is in every figure,
//! so a difference between servers shows diluted: the figures are only meaningful relative to
//! each other, within one run.
//!
//! Part 2, lateness. Two more servers: `ours_response_timeout` as above
//! (`ResponseTimeoutLayer::new(10 s)`, default deadline margin 10 ms), and `bare` tonic (which
//! enforces `grpc-timeout` itself, answering CANCELLED "Timeout expired"). The handler sleeps
//! 30 s. `GRPC_LATE_CALLS` (200) calls per server, `LATE_CONCURRENCY` (8) at a time over one
//! channel per server, each with `set_timeout(100 ms)`, in `LATE_ROUNDS` (5) rounds that
//! alternate the order of the two servers. A call's arrival is timed from just before
//! `ProbeClient::call` until the client has the error. Tonic's client `Channel` also enforces
//! `grpc-timeout` locally (its own `GrpcTimeout`, started when the request enters the
//! channel), so the error the caller gets may be the client's own: a status decoded from the
//! server's answer carries the answer's headers as metadata (at least `content-type`), the
//! client's own `Status::cancelled("Timeout expired")` has none; the codes table says which
//! was seen. "late vs 90 ms" is arrival − 90 ms: how late the answer is after our layer's
//! binding limit (the caller's 100 ms less the 10 ms margin); "vs 100 ms" is arrival − 100 ms,
//! relative to the caller's own deadline (negative: before it). Tokio rounds a timer up to the
//! next millisecond, so about 0.5–1 ms is the timer's own granularity.
//!
//! Nothing asserts the figures. The results also go to
//! `<target dir>/tower-timeouts-bench/grpc.json`.

// Wall-clock timing of the load generator, not the runtime's (pausable) clock.
#![allow(clippy::disallowed_types)]

mod support;

#[path = "../tests/probe/mod.rs"]
mod probe;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use probe::probe_client::ProbeClient;
use probe::probe_server::{Probe, ProbeServer};
use probe::{CallReply, CallRequest};
use support::report::{median, percentile, selected, write_json, Json};
use tokio::net::TcpListener;
use tokio::runtime::Builder;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Code, Status};
use tower::ServiceBuilder;
use tower_timeouts::response_timeout::DEFAULT_DEADLINE_MARGIN;
use tower_timeouts::{ClientDisconnectLayer, ResponseTimeoutLayer};

/// Calls in flight at once in part 1, over one HTTP/2 connection.
const CONCURRENCY: usize = 32;
/// Long enough never to fire: the server-side limits and every call's `grpc-timeout`.
const TIMEOUT: Duration = Duration::from_secs(10);
/// A round that takes longer than this is a bug: the bench stops rather than hang.
const ROUND_LIMIT: Duration = Duration::from_secs(30);

/// Part 2: the caller's deadline, the handler's sleep, calls in flight at once, rounds.
const LATE_DEADLINE: Duration = Duration::from_millis(100);
const LATE_SLEEP_MS: u64 = 30_000;
const LATE_CONCURRENCY: usize = 8;
const LATE_ROUNDS: usize = 5;
/// A call that has no answer after this is counted as unanswered (and given up).
const LATE_CALL_LIMIT: Duration = Duration::from_secs(5);

const CASES: [&str; 4] = [
    "bare",
    "tonic_timeout",
    "ours_response_timeout",
    "ours_full_stack",
];
const BARE: usize = 0;
const TONIC: usize = 1;

const LATE_SERVERS: [&str; 2] = ["ours_response_timeout", "bare"];

/// The sizes, from the environment.
#[derive(Clone, Copy, Debug)]
struct Config {
    warm_up_rounds: usize,
    rounds: usize,
    requests: usize,
    late_calls: usize,
}

fn env_number(name: &str, default: usize, max: usize) -> usize {
    let value = match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => value
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
        _ => default,
    };
    assert!(
        (1..=max).contains(&value),
        "{name}={value} is out of range (1..={max})"
    );
    value
}

impl Config {
    fn from_env() -> Config {
        Config {
            warm_up_rounds: env_number("GRPC_WARM_UP_ROUNDS", 2, 100),
            rounds: env_number("GRPC_ROUNDS", 20, 1_000),
            requests: env_number("GRPC_REQUESTS", 20_000, 1_000_000),
            late_calls: env_number("GRPC_LATE_CALLS", 200, 10_000),
        }
    }
}

/// The `Probe` service: `call` answers at once, or after `sleep_ms`.
#[derive(Clone, Copy, Debug, Default)]
struct Handler;

#[tonic::async_trait]
impl Probe for Handler {
    async fn call(
        &self,
        request: tonic::Request<CallRequest>,
    ) -> Result<tonic::Response<CallReply>, Status> {
        let sleep_ms = request.get_ref().sleep_ms;
        if sleep_ms > 0 {
            tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
        }
        Ok(tonic::Response::new(CallReply::default()))
    }

    type StreamStream = tokio_stream::Empty<Result<CallReply, Status>>;

    async fn stream(
        &self,
        _: tonic::Request<CallRequest>,
    ) -> Result<tonic::Response<Self::StreamStream>, Status> {
        Ok(tonic::Response::new(tokio_stream::empty()))
    }
}

/// Binds a listener on loopback, spawns the tonic server `case` on it, and gives its address.
/// Must run on the server runtime.
async fn spawn_server(case: &str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let service = ProbeServer::new(Handler);
    match case {
        "bare" => {
            tokio::spawn(
                Server::builder()
                    .add_service(service)
                    .serve_with_incoming(incoming),
            );
        }
        "tonic_timeout" => {
            tokio::spawn(
                Server::builder()
                    .timeout(TIMEOUT)
                    .add_service(service)
                    .serve_with_incoming(incoming),
            );
        }
        "ours_response_timeout" => {
            tokio::spawn(
                Server::builder()
                    .layer(ResponseTimeoutLayer::new(TIMEOUT))
                    .add_service(service)
                    .serve_with_incoming(incoming),
            );
        }
        "ours_full_stack" => {
            tokio::spawn(
                Server::builder()
                    .layer(
                        ServiceBuilder::new()
                            .layer(ClientDisconnectLayer::new())
                            .layer(ResponseTimeoutLayer::new(TIMEOUT))
                            .into_inner(),
                    )
                    .add_service(service)
                    .serve_with_incoming(incoming),
            );
        }
        _ => unreachable!("no server {case}"),
    }
    addr
}

async fn connect(addr: SocketAddr) -> ProbeClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    ProbeClient::new(channel)
}

fn call_request(sleep_ms: u64, timeout: Duration) -> tonic::Request<CallRequest> {
    let mut request = tonic::Request::new(CallRequest {
        sleep_ms,
        note: String::new(),
        count: 0,
    });
    request.set_timeout(timeout);
    request
}

// ---------------------------------------------------------------------------------------------
// Part 1: per-request cost.

/// One round's raw figures.
#[derive(Clone, Copy, Debug)]
struct Round {
    requests_per_second: f64,
    /// Latencies in microseconds.
    p50: f64,
    p99: f64,
}

impl Round {
    fn field(&self, field: usize) -> f64 {
        [self.requests_per_second, self.p50, self.p99][field]
    }

    /// Wall time per call at this round's throughput, in µs.
    fn us_per_call(&self) -> f64 {
        1e6 / self.requests_per_second
    }
}

const FIELDS: [&str; 3] = ["requests_per_second", "p50_us", "p99_us"];
const FIELD_LABELS: [&str; 3] = ["req/s", "p50", "p99"];

/// One round of `requests` calls against the server at `addr`.
async fn round(addr: SocketAddr, requests: usize) -> Round {
    let client = connect(addr).await;
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let loops: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let mut client = client.clone();
            let next = next.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(2 * requests / CONCURRENCY + 1);
                while next.fetch_add(1, Ordering::Relaxed) < requests {
                    let request = call_request(0, TIMEOUT);
                    let sent = Instant::now();
                    let reply = client.call(request).await.expect("call");
                    latencies.push(sent.elapsed().as_nanos() as u64);
                    drop(reply);
                }
                (latencies, Instant::now())
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(requests);
    let mut end = start;
    for handle in loops {
        let (mut some, done) = handle.await.expect("client task");
        latencies.append(&mut some);
        end = end.max(done);
    }
    drop(client);
    assert_eq!(latencies.len(), requests);
    latencies.sort_unstable();
    let us = |ns: u64| ns as f64 / 1_000.0;
    Round {
        requests_per_second: requests as f64 / (end - start).as_secs_f64(),
        p50: us(percentile(&latencies, 0.50)),
        p99: us(percentile(&latencies, 0.99)),
    }
}

// ---------------------------------------------------------------------------------------------
// Part 2: lateness.

/// What one call of part 2 got.
#[derive(Clone, Debug)]
struct Late {
    /// From just before the call until the answer, in ms.
    arrival_ms: f64,
    /// `None`: the call succeeded (it should not); `"no answer"` when it ran out of time.
    code: Option<Code>,
    /// Where the status came from: `server` (decoded from an answer) or `client` (the
    /// channel's own timer or error).
    origin: &'static str,
    message: String,
}

/// `calls` calls with a 100 ms deadline to a handler that sleeps 30 s, `LATE_CONCURRENCY` at a
/// time, over `client`.
async fn late_calls(client: &ProbeClient<Channel>, calls: usize) -> Vec<Late> {
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..LATE_CONCURRENCY)
        .map(|_| {
            let mut client = client.clone();
            let next = next.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < calls {
                    let request = call_request(LATE_SLEEP_MS, LATE_DEADLINE);
                    let sent = Instant::now();
                    let answer = tokio::time::timeout(LATE_CALL_LIMIT, client.call(request)).await;
                    let arrival_ms = sent.elapsed().as_secs_f64() * 1e3;
                    seen.push(match answer {
                        Ok(Ok(_)) => Late {
                            arrival_ms,
                            code: None,
                            origin: "server",
                            message: "ok".to_owned(),
                        },
                        Ok(Err(status)) => Late {
                            arrival_ms,
                            code: Some(status.code()),
                            origin: if status.metadata().is_empty() {
                                "client"
                            } else {
                                "server"
                            },
                            message: status.message().to_owned(),
                        },
                        Err(_) => Late {
                            arrival_ms,
                            code: None,
                            origin: "client",
                            message: format!("no answer within {LATE_CALL_LIMIT:?}"),
                        },
                    });
                }
                seen
            })
        })
        .collect();
    let mut all = Vec::with_capacity(calls);
    for task in tasks {
        all.append(&mut task.await.expect("late task"));
    }
    all
}

// ---------------------------------------------------------------------------------------------

fn main() {
    if !selected("grpc") {
        println!("grpc: skipped (the filter does not match)");
        return;
    }
    let config = Config::from_env();
    let started = Instant::now();

    // The server side: one worker thread; the listeners are bound here, the servers run as
    // tasks on it.
    let server = Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("grpc-server")
        .enable_all()
        .build()
        .expect("server runtime");
    let (addrs, late_addrs): (Vec<SocketAddr>, Vec<SocketAddr>) = server.block_on(async {
        let mut addrs = Vec::new();
        for case in CASES {
            addrs.push(spawn_server(case).await);
        }
        let mut late_addrs = Vec::new();
        for case in LATE_SERVERS {
            late_addrs.push(spawn_server(case).await);
        }
        (addrs, late_addrs)
    });

    println!(
        "grpc: {CONCURRENCY} calls in flight over one HTTP/2 connection, {} calls per round, \
         {} warm-up and {} measured rounds per server, interleaved; then {} calls per server \
         with a {LATE_DEADLINE:?} deadline",
        config.requests, config.warm_up_rounds, config.rounds, config.late_calls
    );
    // The load generator, on a thread of its own.
    let client = std::thread::Builder::new()
        .name("grpc-client".into())
        .spawn(move || {
            let rt = Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("client runtime");
            let mut rounds: Vec<Vec<Round>> = vec![Vec::new(); CASES.len()];
            for r in 0..config.warm_up_rounds + config.rounds {
                for k in 0..CASES.len() {
                    let v = (r + k) % CASES.len();
                    let result = rt
                        .block_on(async {
                            tokio::time::timeout(ROUND_LIMIT, round(addrs[v], config.requests))
                                .await
                        })
                        .unwrap_or_else(|_| {
                            panic!("a round against {} took over {ROUND_LIMIT:?}", CASES[v])
                        });
                    if r >= config.warm_up_rounds {
                        rounds[v].push(result);
                    }
                }
            }

            let mut late: Vec<Vec<Late>> = vec![Vec::new(); LATE_SERVERS.len()];
            rt.block_on(async {
                let mut clients = Vec::new();
                for addr in &late_addrs {
                    clients.push(connect(*addr).await);
                }
                for r in 0..LATE_ROUNDS {
                    // This round's share of the calls (the first rounds take the remainder).
                    let calls = config.late_calls / LATE_ROUNDS
                        + usize::from(r < config.late_calls % LATE_ROUNDS);
                    for k in 0..LATE_SERVERS.len() {
                        let s = (r + k) % LATE_SERVERS.len();
                        late[s].append(&mut late_calls(&clients[s], calls).await);
                    }
                }
            });
            (rounds, late)
        })
        .expect("client thread");
    let (rounds, late) = client.join().expect("the load generator panicked");
    server.shutdown_timeout(Duration::from_secs(1));

    report(&config, &rounds, &late, started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// Report.

/// The median, quartiles and extremes of a set of per-round figures.
#[derive(Clone, Copy, Debug)]
struct Spread {
    median: f64,
    p25: f64,
    p75: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(values: &[f64]) -> Spread {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Spread {
            median: median(&sorted),
            p25: percentile(&sorted, 0.25),
            p75: percentile(&sorted, 0.75),
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max: sorted.last().copied().unwrap_or(f64::NAN),
        }
    }

    fn json(&self) -> Json {
        Json::obj([
            ("median", Json::Num(self.median)),
            ("p25", Json::Num(self.p25)),
            ("p75", Json::Num(self.p75)),
            ("min", Json::Num(self.min)),
            ("max", Json::Num(self.max)),
        ])
    }
}

/// Per round, `f(case's round, anchor's round)`.
fn paired(case: &[Round], anchor: &[Round], f: impl Fn(&Round, &Round) -> f64) -> Vec<f64> {
    case.iter().zip(anchor).map(|(c, a)| f(c, a)).collect()
}

/// The comparisons of `case` against `anchor`: per field, the spread of the per-round ratios;
/// and the per-round overheads in µs per call (median latency, and from throughput).
struct Versus {
    ratios: [Spread; 3],
    p50_delta_us: Spread,
    throughput_delta_us: Spread,
}

fn versus(case: &[Round], anchor: &[Round]) -> Versus {
    Versus {
        ratios: std::array::from_fn(|f| {
            Spread::of(&paired(case, anchor, |c, a| c.field(f) / a.field(f)))
        }),
        p50_delta_us: Spread::of(&paired(case, anchor, |c, a| c.p50 - a.p50)),
        throughput_delta_us: Spread::of(&paired(case, anchor, |c, a| {
            c.us_per_call() - a.us_per_call()
        })),
    }
}

impl Versus {
    fn json(&self) -> Json {
        Json::obj([
            (
                "ratio",
                Json::obj(FIELDS.iter().zip(&self.ratios).map(|(f, s)| (*f, s.json()))),
            ),
            ("p50_delta_us", self.p50_delta_us.json()),
            (
                "us_per_call_from_throughput_delta",
                self.throughput_delta_us.json(),
            ),
        ])
    }
}

/// The version of `name` in the crate's `Cargo.lock` (the first, if there are several).
fn locked_version(name: &str) -> Option<String> {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock")).ok()?;
    let needle = format!("name = \"{name}\"\nversion = \"");
    let start = lock.find(&needle)? + needle.len();
    let end = lock[start..].find('"')?;
    Some(lock[start..start + end].to_owned())
}

/// Lateness figures over one server's calls, in ms.
struct LateSummary {
    calls: usize,
    answered: usize,
    /// Arrival − (100 ms − margin): p50, p90, p99, max; and min.
    late_vs_binding: [f64; 5],
    /// The same, less 10 ms: relative to the caller's own deadline.
    late_vs_deadline: [f64; 5],
    /// (code, origin, message) → arrivals.
    codes: BTreeMap<(String, &'static str, String), Vec<f64>>,
}

fn summarize_late(calls: &[Late]) -> LateSummary {
    let binding_ms = (LATE_DEADLINE - DEFAULT_DEADLINE_MARGIN).as_secs_f64() * 1e3;
    let deadline_ms = LATE_DEADLINE.as_secs_f64() * 1e3;
    let mut arrivals: Vec<f64> = calls
        .iter()
        .filter(|c| c.code.is_some())
        .map(|c| c.arrival_ms)
        .collect();
    arrivals.sort_by(f64::total_cmp);
    let stats = |offset: f64| -> [f64; 5] {
        [0.50, 0.90, 0.99, 1.0, 0.0].map(|q| {
            if arrivals.is_empty() {
                f64::NAN
            } else {
                percentile(&arrivals, q) - offset
            }
        })
    };
    let mut codes: BTreeMap<(String, &'static str, String), Vec<f64>> = BTreeMap::new();
    for c in calls {
        let code = c
            .code
            .map_or_else(|| "-".to_owned(), |code| format!("{code:?}"));
        codes
            .entry((code, c.origin, c.message.clone()))
            .or_default()
            .push(c.arrival_ms);
    }
    LateSummary {
        calls: calls.len(),
        answered: arrivals.len(),
        late_vs_binding: stats(binding_ms),
        late_vs_deadline: stats(deadline_ms),
        codes,
    }
}

fn report(config: &Config, rounds: &[Vec<Round>], late: &[Vec<Late>], took: Duration) {
    let medians: Vec<[f64; 3]> = rounds
        .iter()
        .map(|rs| {
            std::array::from_fn(|f| median(&rs.iter().map(|r| r.field(f)).collect::<Vec<_>>()))
        })
        .collect();
    let vs_bare: Vec<Versus> = rounds.iter().map(|rs| versus(rs, &rounds[BARE])).collect();
    let vs_tonic: Vec<Versus> = rounds.iter().map(|rs| versus(rs, &rounds[TONIC])).collect();

    let versions = ["tonic", "h2", "hyper", "tokio"]
        .map(|name| (name, locked_version(name).unwrap_or_else(|| "?".to_owned())));
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "\nmachine: {cores} cores ({} {}); {}",
        std::env::consts::OS,
        std::env::consts::ARCH,
        versions
            .iter()
            .map(|(name, version)| format!("{name} {version}"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    println!(
        "\n## gRPC unary calls over 127.0.0.1, one HTTP/2 connection, {CONCURRENCY} in flight: \
         median of {} rounds of {} calls\n",
        config.rounds, config.requests
    );
    println!("| server | req/s | p50 µs | p99 µs |");
    println!("|---|---:|---:|---:|");
    for (v, name) in CASES.iter().enumerate() {
        let m = medians[v];
        println!("| {name} | {:.0} | {:.1} | {:.1} |", m[0], m[1], m[2]);
    }

    println!(
        "\nPer-round ratios, case over anchor (req/s: < 1 is slower; p50, p99: > 1 is slower):\n"
    );
    println!("| server | vs | figure | median | p25 | p75 | min | max |");
    println!("|---|---|---|---:|---:|---:|---:|---:|");
    let ratio_rows = |name: &str, anchor: &str, vs: &Versus| {
        for (f, label) in FIELD_LABELS.iter().enumerate() {
            let s = vs.ratios[f];
            println!(
                "| {name} | {anchor} | {label} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
                s.median, s.p25, s.p75, s.min, s.max
            );
        }
    };
    for (v, name) in CASES.iter().enumerate().skip(1) {
        ratio_rows(name, "bare", &vs_bare[v]);
    }
    for (v, name) in CASES.iter().enumerate().skip(2) {
        ratio_rows(name, "tonic_timeout", &vs_tonic[v]);
    }

    println!(
        "\nOverhead in µs per call, per round (median [p25, p75] over the rounds): Δp50 is the \
         case's median latency less the anchor's; Δ1/rps is the wall time per call added at \
         saturation (about the CPU time, both sides):\n"
    );
    println!("| server | vs | Δp50 µs | Δ1/rps µs |");
    println!("|---|---|---:|---:|");
    let delta_row = |name: &str, anchor: &str, vs: &Versus| {
        let (d, t) = (vs.p50_delta_us, vs.throughput_delta_us);
        println!(
            "| {name} | {anchor} | {:+.1} [{:+.1}, {:+.1}] | {:+.2} [{:+.2}, {:+.2}] |",
            d.median, d.p25, d.p75, t.median, t.p25, t.p75
        );
    };
    for (v, name) in CASES.iter().enumerate().skip(1) {
        delta_row(name, "bare", &vs_bare[v]);
    }
    for (v, name) in CASES.iter().enumerate().skip(2) {
        delta_row(name, "tonic_timeout", &vs_tonic[v]);
    }

    let binding = LATE_DEADLINE - DEFAULT_DEADLINE_MARGIN;
    let summaries: Vec<LateSummary> = late.iter().map(|calls| summarize_late(calls)).collect();
    println!(
        "\n## Lateness: a handler that sleeps 30 s, calls with a {LATE_DEADLINE:?} deadline, \
         {LATE_CONCURRENCY} at a time\n"
    );
    println!(
        "Arrival (from just before the call until the client has the error) less {binding:?} \
         (our binding limit: the deadline less the {DEFAULT_DEADLINE_MARGIN:?} margin), and \
         less {LATE_DEADLINE:?} (the caller's deadline; negative: before it), in ms:\n"
    );
    println!(
        "| server | calls | answered | vs {}ms p50 | p90 | p99 | max | min | vs {}ms p50 | p90 \
         | p99 | max | min |",
        binding.as_millis(),
        LATE_DEADLINE.as_millis()
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (s, name) in LATE_SERVERS.iter().enumerate() {
        let x = &summaries[s];
        let (b, d) = (x.late_vs_binding, x.late_vs_deadline);
        println!(
            "| {name} | {} | {} | {:+.2} | {:+.2} | {:+.2} | {:+.2} | {:+.2} | {:+.2} | {:+.2} \
             | {:+.2} | {:+.2} | {:+.2} |",
            x.calls, x.answered, b[0], b[1], b[2], b[3], b[4], d[0], d[1], d[2], d[3], d[4]
        );
    }
    println!(
        "\nWhat the caller got (origin `server`: decoded from the server's answer; `client`: the \
         client channel's own):\n"
    );
    println!("| server | code | origin | message | count | median arrival ms |");
    println!("|---|---|---|---|---:|---:|");
    for (s, name) in LATE_SERVERS.iter().enumerate() {
        for ((code, origin, message), arrivals) in &summaries[s].codes {
            println!(
                "| {name} | {code} | {origin} | {message} | {} | {:.2} |",
                arrivals.len(),
                median(arrivals)
            );
        }
    }
    let unexpected = summaries[0]
        .codes
        .iter()
        .filter(|((code, _, _), _)| code != "DeadlineExceeded")
        .map(|(_, arrivals)| arrivals.len())
        .sum::<usize>();
    println!(
        "\n{} calls to ours_response_timeout got another code than DeadlineExceeded.",
        unexpected
    );
    println!("\ngrpc: took {:.1} s", took.as_secs_f64());

    let fields = |values: [f64; 3]| {
        Json::obj(
            FIELDS
                .iter()
                .zip(values)
                .map(|(name, value)| (*name, Json::Num(value))),
        )
    };
    let late_stats = |values: [f64; 5]| {
        Json::obj(
            ["p50", "p90", "p99", "max", "min"]
                .into_iter()
                .zip(values)
                .map(|(name, value)| (name, Json::Num(value))),
        )
    };
    let json = Json::obj([
        ("bench", Json::str("grpc")),
        (
            "config",
            Json::obj([
                ("concurrency", CONCURRENCY.into()),
                ("requests_per_round", config.requests.into()),
                ("warm_up_rounds", config.warm_up_rounds.into()),
                ("rounds", config.rounds.into()),
                (
                    "protocol",
                    "gRPC unary over HTTP/2, one connection, 127.0.0.1".into(),
                ),
                (
                    "server",
                    "tonic::transport::Server, serve_with_incoming(TcpIncoming with \
                     TCP_NODELAY), tokio multi-thread runtime with 1 worker"
                        .into(),
                ),
                (
                    "client",
                    "tonic Channel + generated ProbeClient clones, tokio current-thread \
                     runtime on its own thread"
                        .into(),
                ),
                ("grpc_timeout_s", TIMEOUT.as_secs().into()),
                ("tracing_subscriber", Json::Bool(false)),
                ("cores", cores.into()),
                (
                    "versions",
                    Json::obj(versions.iter().map(|(n, v)| (*n, Json::str(v.clone())))),
                ),
                ("wall_time_s", Json::Num(took.as_secs_f64())),
            ]),
        ),
        (
            "cases",
            Json::Arr(
                CASES
                    .iter()
                    .enumerate()
                    .map(|(v, name)| {
                        Json::obj([
                            ("name", Json::str(*name)),
                            ("median", fields(medians[v])),
                            ("vs_bare", vs_bare[v].json()),
                            (
                                "vs_tonic_timeout",
                                if v >= 2 {
                                    vs_tonic[v].json()
                                } else {
                                    Json::Null
                                },
                            ),
                            (
                                "rounds",
                                Json::Arr(
                                    rounds[v]
                                        .iter()
                                        .map(|r| fields(std::array::from_fn(|f| r.field(f))))
                                        .collect(),
                                ),
                            ),
                        ])
                    })
                    .collect(),
            ),
        ),
        (
            "lateness",
            Json::obj([
                ("deadline_ms", Json::Num(LATE_DEADLINE.as_secs_f64() * 1e3)),
                (
                    "margin_ms",
                    Json::Num(DEFAULT_DEADLINE_MARGIN.as_secs_f64() * 1e3),
                ),
                ("concurrency", LATE_CONCURRENCY.into()),
                (
                    "servers",
                    Json::Arr(
                        LATE_SERVERS
                            .iter()
                            .enumerate()
                            .map(|(s, name)| {
                                let x = &summaries[s];
                                Json::obj([
                                    ("name", Json::str(*name)),
                                    ("calls", x.calls.into()),
                                    ("answered", x.answered.into()),
                                    ("late_vs_binding_ms", late_stats(x.late_vs_binding)),
                                    ("late_vs_deadline_ms", late_stats(x.late_vs_deadline)),
                                    (
                                        "codes",
                                        Json::Arr(
                                            x.codes
                                                .iter()
                                                .map(|((code, origin, message), arrivals)| {
                                                    Json::obj([
                                                        ("code", Json::str(code.clone())),
                                                        ("origin", Json::str(*origin)),
                                                        ("message", Json::str(message.clone())),
                                                        ("count", arrivals.len().into()),
                                                        (
                                                            "median_arrival_ms",
                                                            Json::Num(median(arrivals)),
                                                        ),
                                                    ])
                                                })
                                                .collect(),
                                        ),
                                    ),
                                ])
                            })
                            .collect(),
                    ),
                ),
            ]),
        ),
    ]);
    write_json("grpc.json", &json);
}
