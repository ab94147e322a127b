//! The connection watcher's cost: `axum::serve` with a [`WatchedListener`] against the same
//! server with the bare `TcpListener`, over real TCP on 127.0.0.1.
//!
//! Run with: `cargo bench --features axum --bench watch` (a plain `main`, about 40 seconds on 2
//! cores). A filter argument that is not part of "watch" skips it.
//!
//! Two servers, `bare` and `watched`, each an axum `Router` answering `GET /` with a 12-byte
//! body, served by `axum::serve` with `TCP_NODELAY` on a multi-thread runtime with one worker
//! thread; the load generator runs on a current-thread runtime on another thread (one core
//! each). No tracing subscriber is set.
//!
//! Each round measures, against one server:
//! - **keep-alive**: 32 connections with hyper's HTTP/1.1 client (opened untimed), 20,000
//!   requests in all, one at a time per connection: requests per second, and the median
//!   latency;
//! - **connection churn**: 2,000 connections, 16 at a time, each a raw socket sending one
//!   `Connection: close` request and reading the answer to its end: connections per second.
//!   Each watched connection makes and registers a duplicate of its socket, and drops it.
//!
//! The servers are interleaved (bare, watched; watched, bare; …), 2 warm-up and 25 measured
//! rounds each; a ratio is taken within each round and the median of the ratios reported,
//! with their spread (min–max).
//!
//! Then **memory**: 250 idle keep-alive connections to each server (each answered once), the
//! heap growth of the whole process (counted by `stats_alloc`) and the file descriptors it
//! holds, per connection, in the last of 3 rounds (the first ones also grow the reactor's
//! tables); the client's share is the same for both servers, so the difference is the
//! watcher's. Results also go to `<target dir>/tower-timeouts-bench/watch.json`.

// Wall-clock timing of the load generator, not the runtime's (pausable) clock.
#![allow(clippy::disallowed_types)]

mod support;

use std::alloc::System;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use support::report::{median, percentile, selected, write_json, Json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Builder;
use tower_timeouts::watch::WatchedListener;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const VARIANTS: [&str; 2] = ["bare", "watched"];
const CONNECTIONS: usize = 32;
const REQUESTS_PER_ROUND: usize = 20_000;
const CHURN_CONNECTIONS: usize = 2_000;
const CHURN_AT_ONCE: usize = 16;
/// Within the usual limit of 1,024 open files, with both ends and the duplicates.
const IDLE_CONNECTIONS: usize = 250;
/// Rounds of the memory count: the first ones grow the reactor's tables, which later ones
/// reuse.
const MEMORY_ROUNDS: usize = 3;
const WARM_UP_ROUNDS: usize = 2;
const ROUNDS: usize = 25;
/// A round that takes longer than this is a bug: the bench stops rather than hang.
const ROUND_LIMIT: Duration = Duration::from_secs(60);

/// One round's figures against one server.
#[derive(Clone, Copy, Debug)]
struct Round {
    requests_per_second: f64,
    p50_us: f64,
    connections_per_second: f64,
}

async fn keep_alive(addr: SocketAddr) -> (f64, f64) {
    let mut senders = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        let (sender, connection) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(connection);
        senders.push(sender);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let loops: Vec<_> = senders
        .into_iter()
        .map(|mut sender| {
            let next = next.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
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
    let (mut latencies, mut end) = (Vec::new(), start);
    for handle in loops {
        let (mut some, done) = handle.await.expect("client task");
        latencies.append(&mut some);
        end = end.max(done);
    }
    latencies.sort_unstable();
    let rate = REQUESTS_PER_ROUND as f64 / (end - start).as_secs_f64();
    (rate, percentile(&latencies, 0.5) as f64 / 1_000.0)
}

/// One `Connection: close` request on a connection of its own, its answer read to the end.
async fn one_request(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    stream
}

async fn churn(addr: SocketAddr) -> f64 {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let loops: Vec<_> = (0..CHURN_AT_ONCE)
        .map(|_| {
            let next = next.clone();
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < CHURN_CONNECTIONS {
                    let mut stream = one_request(addr).await;
                    let mut answer = Vec::new();
                    stream.read_to_end(&mut answer).await.expect("read");
                    assert!(answer.ends_with(b"hello, world"), "{answer:?}");
                }
            })
        })
        .collect();
    for handle in loops {
        handle.await.expect("client task");
    }
    CHURN_CONNECTIONS as f64 / start.elapsed().as_secs_f64()
}

async fn round(addr: SocketAddr) -> Round {
    let (requests_per_second, p50_us) = keep_alive(addr).await;
    let connections_per_second = churn(addr).await;
    Round {
        requests_per_second,
        p50_us,
        connections_per_second,
    }
}

/// The heap growth and the file descriptors per idle keep-alive connection to `addr`.
async fn per_connection(addr: SocketAddr) -> (f64, f64) {
    let fds = || std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count());
    let (fds_before, heap) = (fds(), Region::new(GLOBAL));
    let mut idle = Vec::with_capacity(IDLE_CONNECTIONS);
    for _ in 0..IDLE_CONNECTIONS {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
            .await
            .expect("write");
        let mut answer = Vec::new();
        while !answer.ends_with(b"hello, world") {
            let mut buf = [0; 1024];
            let n = stream.read(&mut buf).await.expect("read");
            assert!(n > 0, "EOF");
            answer.extend_from_slice(&buf[..n]);
        }
        idle.push(stream);
    }
    let stats = heap.change();
    let grown = stats.bytes_allocated as f64 - stats.bytes_deallocated as f64;
    let per_fd = (fds() - fds_before) as f64 / IDLE_CONNECTIONS as f64;
    drop(idle);
    // The server closes its ends in its own time: wait for that before the next count.
    let closing = Instant::now();
    while fds() > fds_before && closing.elapsed() < ROUND_LIMIT {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (grown / IDLE_CONNECTIONS as f64, per_fd)
}

fn main() {
    if !selected("watch") {
        println!("watch: skipped (the filter does not match)");
        return;
    }
    let server = Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("watch-server")
        .enable_all()
        .build()
        .expect("server runtime");
    let addrs: Vec<SocketAddr> = server.block_on(async {
        let mut addrs = Vec::new();
        for variant in VARIANTS {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            addrs.push(listener.local_addr().expect("local address"));
            let listener = listener.tap_io(|stream| {
                let _ = stream.set_nodelay(true);
            });
            let app = Router::new().route("/", get(|| async { "hello, world" }));
            match variant {
                "bare" => tokio::spawn(async move { axum::serve(listener, app).await }),
                _ => tokio::spawn(
                    async move { axum::serve(WatchedListener::new(listener), app).await },
                ),
            };
        }
        addrs
    });

    println!(
        "watch: keep-alive {CONNECTIONS} connections × {REQUESTS_PER_ROUND} requests, churn \
         {CHURN_CONNECTIONS} connections, {WARM_UP_ROUNDS} warm-up and {ROUNDS} measured rounds \
         per server, interleaved"
    );
    let client = std::thread::Builder::new()
        .name("watch-client".into())
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
                        .unwrap_or_else(|_| panic!("a round took over {ROUND_LIMIT:?}"));
                    if r >= WARM_UP_ROUNDS {
                        rounds[v].push(result);
                    }
                }
            }
            let mut memory = vec![(0.0, 0.0); VARIANTS.len()];
            for _ in 0..MEMORY_ROUNDS {
                for (v, addr) in addrs.iter().enumerate() {
                    memory[v] = rt.block_on(per_connection(*addr));
                }
            }
            (rounds, memory)
        })
        .expect("client thread");
    let (rounds, memory) = client.join().expect("the load generator panicked");
    server.shutdown_timeout(Duration::from_secs(1));
    report(&rounds, &memory);
}

/// One figure of a round.
type Figure = fn(&Round) -> f64;

/// The median of the per-round ratios watched ÷ bare of one figure, with their min and max.
fn ratios(rounds: &[Vec<Round>], figure: Figure) -> (f64, f64, f64) {
    let mut ratios: Vec<f64> = rounds[1]
        .iter()
        .zip(&rounds[0])
        .map(|(watched, bare)| figure(watched) / figure(bare))
        .collect();
    ratios.sort_by(f64::total_cmp);
    (median(&ratios), ratios[0], ratios[ratios.len() - 1])
}

fn report(rounds: &[Vec<Round>], memory: &[(f64, f64)]) {
    let figures: [(&str, Figure); 3] = [
        ("keep-alive requests/s", |r| r.requests_per_second),
        ("keep-alive p50 latency (µs)", |r| r.p50_us),
        ("churn connections/s", |r| r.connections_per_second),
    ];
    let mut json = Vec::new();
    println!(
        "\n{:<30} {:>12} {:>12} {:>24}",
        "figure (median of rounds)", "bare", "watched", "watched ÷ bare (min–max)"
    );
    for (name, figure) in figures {
        let medians: Vec<f64> = rounds
            .iter()
            .map(|r| median(&r.iter().map(figure).collect::<Vec<_>>()))
            .collect();
        let (ratio, low, high) = ratios(rounds, figure);
        println!(
            "{name:<30} {:>12.1} {:>12.1} {:>10.3} ({low:.3}–{high:.3})",
            medians[0], medians[1], ratio
        );
        json.push((
            name.to_string(),
            Json::obj([
                ("bare", Json::Num(medians[0])),
                ("watched", Json::Num(medians[1])),
                ("ratio", Json::Num(ratio)),
                ("ratio_min", Json::Num(low)),
                ("ratio_max", Json::Num(high)),
            ]),
        ));
    }
    println!(
        "\nper idle keep-alive connection ({IDLE_CONNECTIONS}, client included): heap bytes \
         bare {:.0}, watched {:.0} (+{:.0}); file descriptors bare {:.2}, watched {:.2}",
        memory[0].0,
        memory[1].0,
        memory[1].0 - memory[0].0,
        memory[0].1,
        memory[1].1
    );
    json.push((
        "per_connection".to_string(),
        Json::obj([
            ("heap_bytes_bare", Json::Num(memory[0].0)),
            ("heap_bytes_watched", Json::Num(memory[1].0)),
            ("fds_bare", Json::Num(memory[0].1)),
            ("fds_watched", Json::Num(memory[1].1)),
        ]),
    ));
    write_json("watch.json", &Json::obj(json));
}
