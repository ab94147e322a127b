//! Run with: cargo run --example gateway -- [UPSTREAM] [LISTEN]
//!
//! A small reverse proxy: every request to LISTEN (default `127.0.0.1:8080`) is forwarded, with
//! its method, path and query, headers and body, to UPSTREAM (default `http://127.0.0.1:3000`),
//! and every request's outcome is logged.
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

use std::convert::Infallible;
use std::error::Error;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::uri::{PathAndQuery, Uri};
use axum::http::{header, HeaderMap, Response, Version};
use axum::Router;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{Layer, ServiceBuilder, ServiceExt};
use tower_timeouts::{
    ClientDisconnectLayer, ConnectTimeout, ConnectTimeoutLayer, PropagateDeadline,
    PropagateDeadlineLayer, Report, ResponseTimeout, ResponseTimeoutLayer, UpstreamFailure,
    UpstreamFailureLayer,
};

/// The limit on establishing a connection to the upstream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The limit on the upstream's response head, connect included.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// The gateway's own limit on a request, for a caller that sends no deadline.
const GATEWAY_TIMEOUT: Duration = Duration::from_secs(30);
/// The plain-HTTP header of a caller's deadline, in milliseconds, honoured and passed on.
const DEADLINE_HEADER: &str = "x-request-timeout-ms";
/// Headers that describe one hop, not the message (RFC 9110 §7.6.1): never forwarded.
const HOP_BY_HOP: &str = "connection proxy-connection keep-alive te transfer-encoding upgrade";

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
    let connector = ConnectTimeoutLayer::new(connect_timeout).layer(HttpConnector::new());
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

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP.split(' ') {
        headers.remove(name);
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    tracing_subscriber::fmt().init();
    let mut args = std::env::args().skip(1);
    let mut arg = |default: &str| args.next().unwrap_or_else(|| default.to_owned());
    let base: Uri = arg("http://127.0.0.1:3000").parse()?;
    let listen = arg("127.0.0.1:8080");
    if base.scheme_str() != Some("http") || base.authority().is_none() {
        return Err(format!("UPSTREAM must look like http://host:port, not {base}").into());
    }

    let gateway = Gateway {
        http1: upstream(CONNECT_TIMEOUT, RESPONSE_TIMEOUT, false),
        http2: upstream(CONNECT_TIMEOUT, RESPONSE_TIMEOUT, true),
        base: base.clone(),
    };
    // A hook for every outcome; the crate's own WARN events add one line per failure.
    let log = |report: &Report<'_>| {
        let (method, elapsed) = (report.method(), report.elapsed());
        tracing::info!(%method, ?elapsed, "{}", report.outcome());
    };
    let app = Router::new().fallback(proxy).with_state(gateway).layer(
        ServiceBuilder::new()
            .layer(ClientDisconnectLayer::new().on_outcome(log))
            .layer(
                ResponseTimeoutLayer::new(GATEWAY_TIMEOUT)
                    .deadline_header(header::HeaderName::from_static(DEADLINE_HEADER)),
            ),
    );

    let listener = tokio::net::TcpListener::bind(&listen).await?;
    tracing::info!("forwarding http://{} to {base}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
