//! End to end: a real hyper server on 127.0.0.1, driven over HTTP/1.1 keep-alive connections by
//! an in-process load generator, bare and with the crate's layers.
//!
//! Run with: `cargo bench --bench e2e` (a plain `main`, about 15 seconds on 2 cores). A filter
//! argument that is not part of "e2e" skips it (`cargo bench -- foo`); flags are ignored.
//!
//! Servers, one listener each, all on the same server runtime:
//! - `bare`: a `service_fn` answering 200 with a `Full<Bytes>` body of 12 bytes;
//! - `ours_full_stack`: the same behind `ClientDisconnectLayer` around
//!   `ResponseTimeoutLayer::new(10 s)` (the timeout never fires);
//! - `tower_http`: for context, tower-http's `OnEarlyDropLayer` with
//!   `EarlyDropsAsFailures::new(DefaultOnFailure::new())` around
//!   `TimeoutLayer::with_status_code(504, 10 s)` (tower-http's documented configuration;
//!   `benches/overhead.rs` compares against cheaper no-op closures).
//!
//! Each connection is served by `hyper::server::conn::http1::Builder::serve_connection` (plain
//! HTTP/1.1, no protocol sniffing) through hyper-util's `TowerToHyperService`, in a task of its
//! own on the server runtime: a multi-thread tokio runtime with one worker thread (the flavour
//! of a real server, on one core). The load generator runs on a current-thread runtime on
//! another thread, so each side has about one of the machine's two cores. Both sides set
//! `TCP_NODELAY`. No tracing subscriber is set anywhere in the process (so our layers' events
//! and spans are off, as in the "no subscriber" rows of `overhead.rs`).
//!
//! A round against one server: open `CONNECTIONS` (32) connections with hyper's HTTP/1.1
//! client (not timed), then send `REQUESTS_PER_ROUND` (20,000) GET requests in all, one at a
//! time per connection (so 32 in flight), each connection taking the next request until the
//! count is used up; then close the connections. A request's latency is timed on the client
//! from just before `send_request` until its body is read to the end; the round's throughput is
//! the request count over the time from the first request to the last response.
//!
//! To cancel out drift (other builds on the machine, frequency changes), the servers are
//! interleaved: after `WARM_UP_ROUNDS` (2) warm-up rounds each, `ROUNDS` (25) rounds each, in a
//! rotating order (bare, ours, tower-http; ours, tower-http, bare; …; the warm-up rounds rotate
//! too). Every figure is the median over the
//! rounds; a ratio to bare is taken within each round (against the bare run of that round)
//! and then the median of those is reported. Throughput ratio: `< 1` is slower than bare;
//! latency ratios: `> 1` is slower than bare.
//!
//! The client's own work is in every figure, so a difference between servers shows diluted:
//! the figures are only meaningful relative to each other, within one run. Nothing asserts
//! them. The results also go to `<target dir>/tower-timeouts-bench/e2e.json`.

// Wall-clock timing of the load generator, not the runtime's (pausable) clock.
#![allow(clippy::disallowed_types)]

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use support::report::{median, percentile, selected, write_json, Json};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Builder;
use tower::{Service, ServiceBuilder};
use tower_http::on_early_drop::{EarlyDropsAsFailures, OnEarlyDropLayer};
use tower_http::trace::DefaultOnFailure;
use tower_timeouts::{ClientDisconnectLayer, ResponseTimeoutLayer};

const CONNECTIONS: usize = 32;
const REQUESTS_PER_ROUND: usize = 20_000;
const WARM_UP_ROUNDS: usize = 2;
const ROUNDS: usize = 25;
/// Long enough never to fire.
const TIMEOUT: Duration = Duration::from_secs(10);
/// A round that takes longer than this is a bug: the bench stops rather than hang.
const ROUND_LIMIT: Duration = Duration::from_secs(30);

const VARIANTS: [&str; 3] = ["bare", "ours_full_stack", "tower_http"];

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn hello(_: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(
        b"hello, world",
    ))))
}

/// Accepts connections on `listener` and serves each with `service`, until the runtime stops.
async fn serve<S, B>(listener: TcpListener, service: S)
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                eprintln!("accept: {error}");
                continue;
            }
        };
        stream.set_nodelay(true).expect("TCP_NODELAY");
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            // An error here is the client closing its connection at the end of a round.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One round's raw figures.
#[derive(Clone, Copy, Debug)]
struct Round {
    requests_per_second: f64,
    /// Latencies in microseconds.
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

impl Round {
    fn field(&self, field: usize) -> f64 {
        [
            self.requests_per_second,
            self.p50,
            self.p90,
            self.p99,
            self.max,
        ][field]
    }
}

const FIELDS: [&str; 5] = [
    "requests_per_second",
    "p50_us",
    "p90_us",
    "p99_us",
    "max_us",
];

/// One round against the server at `addr`.
async fn round(addr: SocketAddr) -> Round {
    let mut senders = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        let (sender, connection) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        senders.push(sender);
    }

    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let loops: Vec<_> = senders
        .into_iter()
        .map(|mut sender| {
            let next = next.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(2 * REQUESTS_PER_ROUND / CONNECTIONS);
                while next.fetch_add(1, Ordering::Relaxed) < REQUESTS_PER_ROUND {
                    sender.ready().await.expect("connection ready");
                    let request = Request::get("/")
                        .header(header::HOST, "127.0.0.1")
                        .body(Empty::new())
                        .expect("request");
                    let sent = Instant::now();
                    let response = sender.send_request(request).await.expect("response");
                    assert_eq!(response.status(), StatusCode::OK);
                    let body = response.into_body().collect().await.expect("body");
                    assert_eq!(body.to_bytes().len(), 12);
                    latencies.push(sent.elapsed().as_nanos() as u64);
                }
                (latencies, Instant::now())
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(REQUESTS_PER_ROUND);
    let mut end = start;
    for handle in loops {
        let (mut some, done) = handle.await.expect("client task");
        latencies.append(&mut some);
        end = end.max(done);
    }
    assert_eq!(latencies.len(), REQUESTS_PER_ROUND);
    latencies.sort_unstable();
    let us = |ns: u64| ns as f64 / 1_000.0;
    Round {
        requests_per_second: REQUESTS_PER_ROUND as f64 / (end - start).as_secs_f64(),
        p50: us(percentile(&latencies, 0.50)),
        p90: us(percentile(&latencies, 0.90)),
        p99: us(percentile(&latencies, 0.99)),
        max: us(percentile(&latencies, 1.0)),
    }
}

fn main() {
    if !selected("e2e") {
        println!("e2e: skipped (the filter does not match)");
        return;
    }

    // The server side: one worker thread; the listeners are bound here, the accept loops run
    // as tasks on it.
    let server = Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("e2e-server")
        .enable_all()
        .build()
        .expect("server runtime");
    let addrs: Vec<SocketAddr> = server.block_on(async {
        let mut addrs = Vec::new();
        for variant in VARIANTS {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            addrs.push(listener.local_addr().expect("local address"));
            let inner = tower::service_fn(hello);
            match variant {
                "bare" => {
                    tokio::spawn(serve(listener, inner));
                }
                "ours_full_stack" => {
                    tokio::spawn(serve(
                        listener,
                        ServiceBuilder::new()
                            .layer(ClientDisconnectLayer::new())
                            .layer(ResponseTimeoutLayer::new(TIMEOUT))
                            .service(inner),
                    ));
                }
                "tower_http" => {
                    tokio::spawn(serve(
                        listener,
                        ServiceBuilder::new()
                            .layer(OnEarlyDropLayer::new(EarlyDropsAsFailures::new(
                                DefaultOnFailure::new(),
                            )))
                            .layer(tower_http::timeout::TimeoutLayer::with_status_code(
                                StatusCode::GATEWAY_TIMEOUT,
                                TIMEOUT,
                            ))
                            .service(inner),
                    ));
                }
                _ => unreachable!(),
            }
        }
        addrs
    });

    println!(
        "e2e: {} connections, {REQUESTS_PER_ROUND} requests per round, {WARM_UP_ROUNDS} warm-up \
         and {ROUNDS} measured rounds per server, interleaved",
        CONNECTIONS
    );
    // The load generator, on a thread of its own.
    let client = std::thread::Builder::new()
        .name("e2e-client".into())
        .spawn(move || {
            let rt = Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("client runtime");
            let mut rounds: Vec<Vec<Round>> = vec![Vec::new(); VARIANTS.len()];
            for r in 0..WARM_UP_ROUNDS + ROUNDS {
                for k in 0..VARIANTS.len() {
                    let v = (r + k) % VARIANTS.len();
                    let result = rt
                        .block_on(async {
                            tokio::time::timeout(ROUND_LIMIT, round(addrs[v])).await
                        })
                        .unwrap_or_else(|_| {
                            panic!("a round against {} took over {ROUND_LIMIT:?}", VARIANTS[v])
                        });
                    if r >= WARM_UP_ROUNDS {
                        rounds[v].push(result);
                    }
                }
            }
            rounds
        })
        .expect("client thread");
    let rounds = client.join().expect("the load generator panicked");
    server.shutdown_timeout(Duration::from_secs(1));

    report(&rounds);
}

fn throughput_ratios(rounds: &[Round], bare: &[Round]) -> Vec<f64> {
    rounds
        .iter()
        .zip(bare)
        .map(|(r, b)| r.requests_per_second / b.requests_per_second)
        .collect()
}

fn report(rounds: &[Vec<Round>]) {
    let bare = &rounds[0];
    // Per variant: the median of each field, and the median of each field's per-round ratio
    // to bare.
    let medians: Vec<[f64; 5]> = rounds
        .iter()
        .map(|rs| {
            std::array::from_fn(|f| median(&rs.iter().map(|r| r.field(f)).collect::<Vec<_>>()))
        })
        .collect();
    let ratios: Vec<[f64; 5]> = rounds
        .iter()
        .map(|rs| {
            std::array::from_fn(|f| {
                median(
                    &rs.iter()
                        .zip(bare)
                        .map(|(r, b)| r.field(f) / b.field(f))
                        .collect::<Vec<_>>(),
                )
            })
        })
        .collect();

    println!(
        "\n## End to end, HTTP/1.1 over 127.0.0.1: median of {ROUNDS} rounds of \
         {REQUESTS_PER_ROUND} requests, {CONNECTIONS} connections\n"
    );
    println!(
        "| server | req/s | ×bare | p50 µs | p90 µs | p99 µs | max µs | p50 ×bare | p90 ×bare \
         | p99 ×bare | max ×bare |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (v, name) in VARIANTS.iter().enumerate() {
        let m = medians[v];
        let x = ratios[v];
        println!(
            "| {name} | {:.0} | {:.3} | {:.1} | {:.1} | {:.1} | {:.0} | {:.3} | {:.3} | {:.3} \
             | {:.3} |",
            m[0], x[0], m[1], m[2], m[3], m[4], x[1], x[2], x[3], x[4]
        );
    }
    // How much the rounds disagree: the middle half of the per-round throughput ratios.
    println!("\nThroughput ratio to bare, spread over the rounds:\n");
    println!("| server | p25 | median | p75 | min | max |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (v, name) in VARIANTS.iter().enumerate().skip(1) {
        let mut x: Vec<f64> = throughput_ratios(&rounds[v], bare);
        x.sort_by(f64::total_cmp);
        println!(
            "| {name} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
            percentile(&x, 0.25),
            median(&x),
            percentile(&x, 0.75),
            x[0],
            x[x.len() - 1]
        );
    }

    let fields = |values: [f64; 5]| {
        Json::obj(
            FIELDS
                .iter()
                .zip(values)
                .map(|(name, value)| (*name, Json::Num(value))),
        )
    };
    let json = Json::obj([
        ("bench", Json::str("e2e")),
        (
            "config",
            Json::obj([
                ("connections", CONNECTIONS.into()),
                ("requests_per_round", REQUESTS_PER_ROUND.into()),
                ("warm_up_rounds", WARM_UP_ROUNDS.into()),
                ("rounds", ROUNDS.into()),
                ("protocol", "HTTP/1.1 keep-alive, 127.0.0.1".into()),
                (
                    "server",
                    "hyper::server::conn::http1 + hyper_util TowerToHyperService, tokio \
                     multi-thread runtime with 1 worker"
                        .into(),
                ),
                (
                    "client",
                    "hyper::client::conn::http1, tokio current-thread runtime on its own \
                     thread"
                        .into(),
                ),
                ("tracing_subscriber", Json::Bool(false)),
                ("timeout_s", TIMEOUT.as_secs().into()),
            ]),
        ),
        (
            "variants",
            Json::Arr(
                VARIANTS
                    .iter()
                    .enumerate()
                    .map(|(v, name)| {
                        Json::obj([
                            ("name", Json::str(*name)),
                            ("median", fields(medians[v])),
                            ("median_ratio_to_bare", fields(ratios[v])),
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
    ]);
    write_json("e2e.json", &json);
}
