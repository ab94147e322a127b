//! The fast path allocates nothing: a request through the full stack, answered at once, with no
//! tracing subscriber and no hook, makes no heap allocation beyond the inner service's.
//!
//! Allocations are counted by a counting global allocator (`stats_alloc`), process-wide, so
//! this file is a program of its own (`harness = false`): libtest's main thread, waiting on its
//! test threads, allocates now and then on a loaded machine, which a count taken while a test
//! runs would take for ours. Counting is exact, not timing: the figure is asserted.

// The tests need Rust 1.85 (`Waker::noop`); the library's MSRV is older.
#![allow(clippy::incompatible_msrv)]

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::Full;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use tower::{Service, ServiceBuilder};
use tower_timeouts::{
    ClientDisconnectLayer, ResponseBodyTimeoutLayer, ResponseTimeoutLayer, Shutdown,
};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

const REQUESTS: usize = 1_000;

/// One request as a server drives it: call, poll to the response, read the body to its end.
fn serve_one<S, B>(service: &mut S, cx: &mut Context<'_>)
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible>,
    B: Body,
{
    assert!(service.poll_ready(cx).is_ready());
    let mut future = pin!(service.call(Request::new(())));
    let Poll::Ready(Ok(response)) = future.as_mut().poll(cx) else {
        panic!("the inner service answers at once");
    };
    let mut body = pin!(response.into_body());
    while !body.is_end_stream() {
        match body.as_mut().poll_frame(cx) {
            Poll::Ready(Some(_)) => {}
            Poll::Ready(None) => break,
            Poll::Pending => panic!("a Full body is ready"),
        }
    }
}

/// Allocations over `REQUESTS` requests, after as many to warm up.
fn allocations<S, B>(mut service: S) -> usize
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible>,
    B: Body,
{
    let mut cx = Context::from_waker(std::task::Waker::noop());
    for _ in 0..REQUESTS {
        serve_one(&mut service, &mut cx);
    }
    let region = Region::new(GLOBAL);
    for _ in 0..REQUESTS {
        serve_one(&mut service, &mut cx);
    }
    region.change().allocations
}

fn main() {
    the_fast_path_allocates_nothing_beyond_the_inner_service();
    println!("allocations: the fast path allocates nothing beyond the inner service: ok");
}

fn the_fast_path_allocates_nothing_beyond_the_inner_service() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _entered = runtime.enter();
    let inner = || {
        tower::service_fn(|_: Request<()>| {
            std::future::ready(Ok::<_, Infallible>(Response::new(Full::new(
                Bytes::from_static(b"hello"),
            ))))
        })
    };
    let bare = allocations(inner());
    let stack = allocations(
        ServiceBuilder::new()
            .layer(ClientDisconnectLayer::new())
            .layer(ResponseTimeoutLayer::new(Duration::from_secs(10)))
            .service(inner()),
    );
    assert_eq!(
        stack, bare,
        "the full stack allocated {stack} times in {REQUESTS} requests, the bare service {bare}"
    );
    // A shutdown's layer, and a response-body limit, on a plain request: nothing either. (A
    // request-body limit shares one allocation between the body and the future.)
    let shutdown = Shutdown::new(Duration::from_secs(10));
    let with_shutdown = allocations(
        ServiceBuilder::new()
            .layer(shutdown.layer())
            .layer(ClientDisconnectLayer::new())
            .layer(ResponseBodyTimeoutLayer::new().idle(Duration::from_secs(10)))
            .layer(ResponseTimeoutLayer::new(Duration::from_secs(10)))
            .service(inner()),
    );
    assert_eq!(
        with_shutdown, bare,
        "with the shutdown and body layers: {with_shutdown} allocations, bare {bare}"
    );
}
