//! Run with: cargo run --release --features axum --example gateway -- [UPSTREAM] [LISTEN]
//!
//! (`--release` matters for anything you time or load-test through it: a debug build is many
//! times slower per request. For trying the outcomes with curl, a debug build does.)
//!
//! A small reverse proxy: every request to LISTEN (default `127.0.0.1:8080`) is forwarded, with
//! its method, path and query, headers and body, to UPSTREAM (default `http://127.0.0.1:3000`),
//! and every request gets a line in the access log (nginx's `combined` format, with the request
//! time, the outcome and its error type; target `tower_timeouts::access`). Its connections are
//! watched (`WatchedListener`), so a client that leaves with its body unread is logged 499. On
//! Ctrl-C it stops accepting, gives the requests in flight 10 s, then answers those still
//! running 503 (`Shutdown`).
//!
//! The layers, from the socket inwards:
//!
//! ```text
//! ClientDisconnectLayer            outermost: opens the request's span, records one outcome per
//!                                  request (a 499 when the client leaves) and calls the hook
//!   ResponseTimeoutLayer           the gateway's own limit (30 s), shortened by a caller's
//!                                  `grpc-timeout` or `x-request-timeout-ms`
//!     axum Router, fallback proxy  rewrites the URI and forwards the request
//!       PropagateDeadlineLayer     sends the upstream what is left of the caller's deadline
//!                                  (`grpc-timeout`, `x-request-timeout-ms`), and shortens the
//!                                  limits below to it
//!         UpstreamFailureLayer     the client's errors become responses: 599 for a connect
//!                                  timeout, 502 for a refused connection, …
//!           ResponseTimeoutLayer   no response head in time: 504
//!             hyper-util Client    HTTP/1.1, or HTTP/2 (h2c) for gRPC requests
//!               ConnectTimeoutLayer  the whole connect attempt, timed (a `connect` span)
//!                 HttpConnector
//! ```
//!
//! For a gRPC request every answer of the gateway's own is a gRPC status: `DEADLINE_EXCEEDED`,
//! `UNAVAILABLE`, …
//!
//! With nothing on port 3000, `curl -i localhost:8080/` gets a 502 `connection_refused`, and
//! `curl -i -H 'x-request-timeout-ms: 50' localhost:8080/` against a slow upstream a 504 after
//! 40 ms (50 ms less the 10 ms margin).
//!
//! It sets `TCP_NODELAY` on both sides: without it, HTTP/2's small frames meet Nagle's algorithm
//! and delayed ACKs, and every h2c request through it took about 41 ms instead of 0.2 ms. It
//! removes hop-by-hop headers in both directions, those that `Connection` names included
//! (RFC 9110 §7.6.1). Logs go to stdout, filtered by `RUST_LOG` (default `info`), coloured only
//! on a terminal.

use std::convert::Infallible;
use std::error::Error;
use std::io::IsTerminal;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::uri::{PathAndQuery, Uri};
use axum::http::{header, HeaderMap, Response, Version};
use axum::serve::ListenerExt;
use axum::Router;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{Layer, ServiceBuilder, ServiceExt};
use tower_timeouts::access_log::AccessLog;
use tower_timeouts::watch::{PeerAddr, WatchedListener};
use tower_timeouts::{
    ClientDisconnectLayer, ConnectTimeout, ConnectTimeoutLayer, PropagateDeadline,
    PropagateDeadlineLayer, ResponseTimeout, ResponseTimeoutLayer, Shutdown, UpstreamFailure,
    UpstreamFailureLayer,
};
use tracing_subscriber::EnvFilter;

/// The limit on establishing a connection to the upstream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The limit on the upstream's response head, connect included.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// The gateway's own limit on a request, for a caller that sends no deadline.
const GATEWAY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the requests in flight may still run once a shutdown begins (Ctrl-C).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// The plain-HTTP header of a caller's deadline, in milliseconds, honoured and passed on.
const DEADLINE_HEADER: &str = "x-request-timeout-ms";
/// Headers that describe one hop, not the message (RFC 9110 §7.6.1): never forwarded, nor are
/// those that `Connection` names.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

/// The client side of the gateway. Its error type is `Infallible`: every failure to reach the
/// upstream is already a response.
type Upstream = PropagateDeadline<
    UpstreamFailure<ResponseTimeout<Client<ConnectTimeout<HttpConnector>, Body>>>,
>;

/// Builds the stack that calls the upstream, over HTTP/2 with prior knowledge (h2c) when
/// `http2`. `UpstreamFailureLayer` goes outside `ResponseTimeoutLayer`: the timeout answers a
/// silent upstream with a 504 of its own, and the errors that reach `UpstreamFailureLayer` are
/// the client's (connect timed out, refused, …). `PropagateDeadlineLayer` goes outermost, so
/// that the limits below it are shortened to the caller's deadline.
fn upstream(connect_timeout: Duration, response_timeout: Duration, http2: bool) -> Upstream {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let connector = ConnectTimeoutLayer::new(connect_timeout).layer(connector);
    let client = Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build(connector);
    ServiceBuilder::new()
        .layer(
            PropagateDeadlineLayer::new().header(header::HeaderName::from_static(DEADLINE_HEADER)),
        )
        .layer(UpstreamFailureLayer::new())
        .layer(ResponseTimeoutLayer::new(response_timeout))
        .service(client)
}

#[derive(Clone)]
struct Gateway {
    http1: Upstream,
    /// For gRPC requests.
    http2: Upstream,
    base: Uri, // the upstream's scheme and authority
}

/// Forwards one request. The upstream layers, called while `ClientDisconnectLayer` handles the
/// request, record into no span of their own: a response they generate carries its outcome back
/// to `ClientDisconnectLayer`, which records the request's one outcome in its span.
async fn proxy(State(gateway): State<Gateway>, request: Request) -> Response<Body> {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().cloned();
    let mut uri = gateway.base.into_parts();
    uri.path_and_query = Some(path.unwrap_or_else(|| PathAndQuery::from_static("/")));
    parts.uri = Uri::from_parts(uri).expect("scheme and authority come from a valid URI");
    // gRPC goes upstream over HTTP/2, everything else over HTTP/1.1, whatever the client spoke;
    // the client sets `Host` (or `:authority`) from the upstream's URI.
    let grpc = tower_timeouts::grpc::is_grpc(&parts.headers);
    parts.version = if grpc {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    parts.headers.remove(header::HOST);
    strip_hop_by_hop(&mut parts.headers);
    if grpc {
        // The one `TE` HTTP/2 allows, which gRPC requires (RFC 9113 §8.2.2).
        parts
            .headers
            .insert(header::TE, header::HeaderValue::from_static("trailers"));
    }
    let client = if grpc { gateway.http2 } else { gateway.http1 };
    // The forwarded request keeps its extensions: the deadline in force that the gateway's
    // `ResponseTimeoutLayer` put there goes with it to `PropagateDeadlineLayer`.
    let upstream = client.oneshot(Request::from_parts(parts, body));
    let mut response = upstream
        .await
        .unwrap_or_else(|never: Infallible| match never {});
    strip_hop_by_hop(response.headers_mut());
    response.map(Body::new)
}

/// Removes the hop-by-hop headers: the fixed ones, and every header `Connection` names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<header::HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| header::HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The gateway: every request forwarded to `base`, under the gateway's layers, each outcome
/// logged.
fn app(base: Uri, shutdown: &Shutdown) -> Router {
    let gateway = Gateway {
        http1: upstream(CONNECT_TIMEOUT, RESPONSE_TIMEOUT, false),
        http2: upstream(CONNECT_TIMEOUT, RESPONSE_TIMEOUT, true),
        base,
    };
    // One access-log line per request; the crate's own WARN events add one line per failure.
    Router::new().fallback(proxy).with_state(gateway).layer(
        ServiceBuilder::new()
            // Outermost: a request still running when the shutdown's grace ends gets a 503.
            .layer(shutdown.layer())
            .layer(ClientDisconnectLayer::new().on_outcome(AccessLog::combined()))
            .layer(
                ResponseTimeoutLayer::new(GATEWAY_TIMEOUT)
                    .deadline_header(header::HeaderName::from_static(DEADLINE_HEADER)),
            ),
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    let mut args = std::env::args().skip(1);
    let mut arg = |default: &str| args.next().unwrap_or_else(|| default.to_owned());
    let base: Uri = arg("http://127.0.0.1:3000").parse()?;
    let listen = arg("127.0.0.1:8080");
    if base.scheme_str() != Some("http") || base.authority().is_none() {
        return Err(format!("UPSTREAM must look like http://host:port, not {base}").into());
    }

    let listener = tokio::net::TcpListener::bind(&listen).await?;
    tracing::info!("forwarding http://{} to {base}", listener.local_addr()?);
    tracing::info!(
        connect_timeout = ?CONNECT_TIMEOUT,
        response_timeout = ?RESPONSE_TIMEOUT,
        gateway_timeout = ?GATEWAY_TIMEOUT,
        shutdown_grace = ?SHUTDOWN_GRACE,
        deadline_header = DEADLINE_HEADER,
        "limits: connecting to the upstream, its response head, a request without a deadline \
         (shortened by a caller's grpc-timeout or {DEADLINE_HEADER}), the requests in flight \
         at a shutdown",
    );
    let listener = WatchedListener::new(listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::warn!(%error, "TCP_NODELAY");
        }
    }));
    // Ctrl-C: no new connections, and the requests in flight get the grace, then a 503.
    let shutdown = Shutdown::new(SHUTDOWN_GRACE);
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!(grace = ?SHUTDOWN_GRACE, "shutting down");
            on_signal.begin();
        }
    });
    // The client's address, for the access log.
    let app = app(base, &shutdown).into_make_service_with_connect_info::<PeerAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.begun())
        .await?;
    Ok(())
}

/// Run by `cargo test` (`test = true` in Cargo.toml), over real TCP on loopback.
#[cfg(test)]
mod tests {
    use axum::routing::any;
    use http_body_util::BodyExt;
    use tokio::net::TcpListener;

    use super::*;

    /// Serves `app` on 127.0.0.1 in the background; returns its address.
    async fn serve(app: Router) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    }

    /// Hop-by-hop headers, those `Connection` names included, stop at the gateway in both
    /// directions; the others go through.
    #[tokio::test]
    async fn hop_by_hop_headers_stop_at_the_gateway_both_ways() {
        // The upstream answers with the names of the headers it got, and hop-by-hop headers of
        // its own.
        let upstream = serve(Router::new().route(
            "/",
            any(|headers: HeaderMap| async move {
                let mut names: Vec<_> = headers.keys().map(|name| name.to_string()).collect();
                names.sort();
                (
                    [
                        ("connection", "x-upstream-hop"),
                        ("x-upstream-hop", "1"),
                        ("x-upstream-end", "2"),
                    ],
                    names.join(" "),
                )
            }),
        ))
        .await;
        let shutdown = Shutdown::new(Duration::from_secs(1));
        let gateway = serve(app(
            format!("http://{upstream}").parse().unwrap(),
            &shutdown,
        ))
        .await;

        let client = Client::builder(TokioExecutor::new()).build_http::<Body>();
        let request = Request::get(format!("http://{gateway}/"))
            .header("connection", "keep-alive, x-client-hop")
            .header("x-client-hop", "secret")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("x-client-end", "yes")
            .body(Body::empty())
            .unwrap();
        let response = client.request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let got: Vec<&str> = std::str::from_utf8(&body).unwrap().split(' ').collect();

        assert!(got.contains(&"x-client-end"), "{got:?}");
        for hop in [
            "x-client-hop",
            "keep-alive",
            "proxy-connection",
            "connection",
        ] {
            assert!(!got.contains(&hop), "{hop} reached the upstream: {got:?}");
        }
        assert_eq!(headers["x-upstream-end"], "2");
        assert!(!headers.contains_key("x-upstream-hop"), "{headers:?}");
    }
}
