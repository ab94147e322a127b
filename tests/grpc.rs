//! gRPC over real TCP on loopback: tonic servers and clients, and a gRPC gateway.
//!
//! What a gRPC client sees of each outcome (its status code and message), what the crate
//! records of it (hook, span), deadlines from the caller honoured and capped, and the budget
//! passed from hop to hop.

mod common;
mod probe;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::Router;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Code, Status};
use tower::{Layer, ServiceBuilder, ServiceExt};
use tower_timeouts::{
    ClientDisconnectLayer, ClientGone, ConnectTimeoutLayer, Deadline, GrpcCode, Outcome,
    PropagateDeadline, PropagateDeadlineLayer, Report, ResponseTimeoutLayer, UpstreamFailureLayer,
};

use common::{Capture, Captured, Live, SOON};
use probe::probe_client::ProbeClient;
use probe::probe_server::{Probe, ProbeServer};
use probe::{CallReply, CallRequest};

// ---------------------------------------------------------------------------------------------
// The service under test.

/// What the hook was told of one request: the outcome and the gRPC status.
type Told = (Outcome, Option<GrpcCode>);

/// What the hook was told.
#[derive(Clone, Default)]
struct Reports(Arc<Mutex<Vec<Told>>>);

impl Reports {
    fn hook(&self) -> impl Fn(&Report<'_>) + Send + Sync + 'static {
        let reports = self.0.clone();
        move |report: &Report<'_>| {
            let entry = (report.outcome().clone(), report.grpc_status());
            reports.lock().unwrap().push(entry);
        }
    }

    /// Waits for `n` reports (panics after [`SOON`]).
    async fn wait_for(&self, n: usize) -> Vec<Told> {
        let waited = tokio::time::timeout(SOON, async {
            while self.0.lock().unwrap().len() < n {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
        let reports = self.0.lock().unwrap().clone();
        assert!(waited.is_ok(), "expected {n} reports, got {reports:?}");
        reports
    }
}

/// The `Probe` service: `call` sleeps `sleep_ms` (or answers `NOT_FOUND` for the note
/// `not_found`, or forwards to `upstream` for the note `forward`), and tells the deadline it
/// saw.
#[derive(Clone, Default)]
struct Handler {
    /// Handler futures not dropped yet.
    live: Live,
    /// Notified when a handler starts.
    started: Arc<Notify>,
    /// Set when a handler's `ClientGone` fires.
    gone: Arc<AtomicBool>,
    upstream: Option<ProbeClient<PropagateDeadline<Channel>>>,
}

fn remaining_ms() -> u64 {
    Deadline::current().map_or(0, |deadline| deadline.remaining().as_millis() as u64)
}

#[tonic::async_trait]
impl Probe for Handler {
    async fn call(
        &self,
        request: tonic::Request<CallRequest>,
    ) -> Result<tonic::Response<CallReply>, Status> {
        let _live = self.live.enter();
        let remaining_ms = remaining_ms();
        if let Some(gone) = ClientGone::current() {
            let flag = self.gone.clone();
            tokio::spawn(async move {
                gone.gone().await;
                flag.store(true, Ordering::SeqCst);
            });
        }
        self.started.notify_one();
        let request = request.into_inner();
        match request.note.as_str() {
            "not_found" => return Err(Status::not_found("no such probe: 100% missing")),
            "forward" => {
                let mut upstream = self.upstream.clone().expect("an upstream to forward to");
                let forwarded = CallRequest {
                    note: "from A".to_owned(),
                    ..request
                };
                return upstream.call(forwarded).await;
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(request.sleep_ms)).await;
        Ok(tonic::Response::new(CallReply {
            note: request.note,
            remaining_ms,
        }))
    }

    type StreamStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<CallReply, Status>> + Send>>;

    async fn stream(
        &self,
        request: tonic::Request<CallRequest>,
    ) -> Result<tonic::Response<Self::StreamStream>, Status> {
        let request = request.into_inner();
        let (send, receive) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            for n in 0..request.count {
                tokio::time::sleep(Duration::from_millis(request.sleep_ms)).await;
                let reply = CallReply {
                    note: format!("{} {n}", request.note),
                    remaining_ms: 0,
                };
                if send.send(Ok(reply)).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(receive))))
    }
}

/// Serves `handler` with tonic, behind `layer`, on loopback.
async fn serve<L, ResBody>(layer: L, handler: Handler) -> std::net::SocketAddr
where
    L: Layer<tonic::service::Routes> + Clone + Send + 'static,
    L::Service: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<ResBody>,
            Error = Infallible,
        > + Clone
        + Send
        + Sync
        + 'static,
    <L::Service as tower::Service<http::Request<tonic::body::Body>>>::Future: Send + 'static,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::builder()
        .layer(layer)
        .add_service(ProbeServer::new(handler))
        .serve_with_incoming(TcpIncoming::from(listener));
    tokio::spawn(server);
    addr
}

async fn channel(addr: std::net::SocketAddr, agent: &'static str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .user_agent(agent)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn call(sleep_ms: u64, note: &str, timeout: Option<Duration>) -> tonic::Request<CallRequest> {
    let mut request = tonic::Request::new(CallRequest {
        sleep_ms,
        note: note.to_owned(),
        count: 0,
    });
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    request
}

fn field<'a>(span: &'a Captured, name: &str) -> Option<&'a str> {
    span.fields.get(name).map(String::as_str)
}

/// The closed `request` span of the request whose user agent starts with `agent`.
fn span_of(capture: &Capture, agent: &str) -> Captured {
    let spans = capture.closed_spans();
    spans
        .iter()
        .find(|span| field(span, "user_agent.original").is_some_and(|ua| ua.starts_with(agent)))
        .unwrap_or_else(|| panic!("no request span of {agent} in {spans:?}"))
        .clone()
}

// ---------------------------------------------------------------------------------------------
// Deadlines from the caller.

/// The caller's deadline is honoured and capped: the call gets DEADLINE_EXCEEDED from our layer
/// at the earlier of the caller's deadline and the server's own limit, and the handler is
/// dropped.
#[tokio::test]
async fn a_deadline_gets_deadline_exceeded_at_the_earlier_of_the_callers_and_the_cap() {
    let (capture, _guard) = Capture::install_crate_only();
    // (the caller's deadline, the server's cap, the limit that binds: the caller's deadline
    // less the margin, or the cap)
    let cases = [
        ("caller-first", Some(Duration::from_millis(300)), 5_000, 200),
        ("cap-first", Some(Duration::from_secs(20)), 300, 300),
        ("no-deadline", None, 300, 300),
    ];
    for (agent, deadline, cap_ms, binding_ms) in cases {
        let reports = Reports::default();
        let handler = Handler::default();
        // A margin that wins the race with tonic's own enforcement of the deadline, at the
        // deadline itself, on a loaded machine.
        let layer = ResponseTimeoutLayer::new(Duration::from_millis(cap_ms))
            .deadline_margin(Duration::from_millis(100))
            .on_outcome(reports.hook());
        let addr = serve(layer, handler.clone()).await;
        let mut client = ProbeClient::new(channel(addr, agent).await);

        let started = tokio::time::Instant::now();
        let status = client
            .call(call(30_000, "slow", deadline))
            .await
            .unwrap_err();
        let took = started.elapsed();

        assert_eq!(status.code(), Code::DeadlineExceeded, "{agent}: {status:?}");
        assert_eq!(
            status.message(),
            format!("tower-timeouts: no response within {binding_ms} ms"),
            "{agent}"
        );
        assert_eq!(
            status.metadata().get("proxy-status").unwrap(),
            "tower-timeouts; error=http_response_timeout"
        );
        assert!(
            took >= Duration::from_millis(binding_ms),
            "{agent}: {took:?}"
        );
        println!(
            "{agent}: DEADLINE_EXCEEDED {:?} after the binding limit",
            took - Duration::from_millis(binding_ms)
        );

        let reports = reports.wait_for(1).await;
        // Sent as HTTP 200: a trailers-only gRPC status.
        assert!(
            matches!(
                &reports[..],
                [(Outcome::ResponseTimeout { timeout, status, .. }, Some(GrpcCode::DEADLINE_EXCEEDED))]
                    if *timeout == Duration::from_millis(binding_ms) && *status == 200
            ),
            "{agent}: {reports:?}"
        );
        wait_until(|| handler.live.count() == 0).await;

        let span = span_of(&capture, agent);
        assert_eq!(field(&span, "rpc.system.name"), Some("grpc"));
        assert_eq!(field(&span, "rpc.method"), Some("probe.v1.Probe/Call"));
        assert_eq!(
            field(&span, "rpc.response.status_code"),
            Some("DEADLINE_EXCEEDED")
        );
        assert_eq!(field(&span, "http.response.status_code"), Some("200"));
        assert_eq!(field(&span, "error.type"), Some("http_response_timeout"));
        assert_eq!(field(&span, "otel.status_code"), Some("ERROR"));
        let budget = deadline.map(|deadline| deadline.as_millis().to_string());
        assert_eq!(field(&span, "tower_timeouts.budget_ms"), budget.as_deref());
        assert_eq!(
            field(&span, "tower_timeouts.timeout_ms"),
            Some(binding_ms.to_string().as_str())
        );
    }
}

/// The handler sees the deadline in force, as an absolute instant, through `Deadline::current`.
#[tokio::test]
async fn the_handler_sees_the_deadline_in_force() {
    let handler = Handler::default();
    let addr = serve(ResponseTimeoutLayer::new(Duration::from_secs(60)), handler).await;
    let mut client = ProbeClient::new(channel(addr, "sees").await);
    let reply = client
        .call(call(0, "fast", Some(Duration::from_secs(2))))
        .await
        .unwrap()
        .into_inner();
    assert!(
        (1..=2_000).contains(&reply.remaining_ms),
        "the handler had {} ms left",
        reply.remaining_ms
    );
    // Without a caller's deadline, the layer's own limit.
    let reply = client
        .call(call(0, "fast", None))
        .await
        .unwrap()
        .into_inner();
    assert!(
        (50_000..=60_000).contains(&reply.remaining_ms),
        "{}",
        reply.remaining_ms
    );
}

/// A malformed `grpc-timeout` is ignored (the layer's own limit applies) and recorded on the
/// span; the call is answered normally.
#[tokio::test]
async fn a_malformed_grpc_timeout_is_ignored_and_recorded() {
    let (capture, _guard) = Capture::install_crate_only();
    let handler = Handler::default();
    let addr = serve(ResponseTimeoutLayer::new(Duration::from_secs(60)), handler).await;
    let mut client = ProbeClient::new(channel(addr, "malformed").await);
    let mut request = call(0, "fast", None);
    request
        .metadata_mut()
        .insert("grpc-timeout", "+5S".parse().unwrap());
    let reply = client.call(request).await.unwrap().into_inner();
    assert!(reply.remaining_ms > 50_000, "{}", reply.remaining_ms);
    let span = wait_span(&capture, "malformed").await;
    assert_eq!(field(&span, "tower_timeouts.budget_invalid"), Some("+5S"));
    assert_eq!(field(&span, "tower_timeouts.budget_ms"), None);
    assert_eq!(field(&span, "rpc.response.status_code"), Some("OK"));
}

async fn wait_span(capture: &Capture, agent: &str) -> Captured {
    let found = tokio::time::timeout(SOON, async {
        loop {
            let spans = capture.closed_spans();
            let found = spans.into_iter().find(|span| {
                field(span, "user_agent.original").is_some_and(|ua| ua.starts_with(agent))
            });
            if let Some(span) = found {
                return span;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("no span of {agent}: {:?}", capture.closed_spans()))
}

async fn wait_until(mut condition: impl FnMut() -> bool) {
    tokio::time::timeout(SOON, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("the condition held within the time allowed");
}

// ---------------------------------------------------------------------------------------------
// A client that cancels.

/// A client that cancels its call is recorded as 499 / CANCELLED (not an error of the server),
/// with the handler dropped and `ClientGone` fired.
#[tokio::test]
async fn a_client_that_cancels_is_recorded_as_499_and_cancelled() {
    let (capture, _guard) = Capture::install_crate_only();
    let reports = Reports::default();
    let handler = Handler::default();
    let stack = ServiceBuilder::new()
        .layer(ClientDisconnectLayer::new().on_outcome(reports.hook()))
        .layer(ResponseTimeoutLayer::new(Duration::from_secs(60)))
        .into_inner();
    let addr = serve(stack, handler.clone()).await;
    let mut client = ProbeClient::new(channel(addr, "cancels").await);

    // The call is dropped (tonic resets the stream with CANCEL) once the handler has started.
    tokio::select! {
        result = client.call(call(30_000, "slow", Some(Duration::from_secs(30)))) => {
            panic!("the slow call ended: {result:?}")
        }
        () = handler.started.notified() => {}
    }

    let reports = reports.wait_for(1).await;
    assert!(
        matches!(
            reports[..],
            [(
                Outcome::ClientDisconnected { .. },
                Some(GrpcCode::CANCELLED)
            )]
        ),
        "{reports:?}"
    );
    wait_until(|| handler.live.count() == 0).await;
    wait_until(|| handler.gone.load(Ordering::SeqCst)).await;
    let span = wait_span(&capture, "cancels").await;
    assert_eq!(field(&span, "tower_timeouts.recorded_status"), Some("499"));
    assert_eq!(field(&span, "rpc.response.status_code"), Some("CANCELLED"));
    assert_eq!(field(&span, "http.response.status_code"), None);
    // CANCELLED is the caller's doing, not the server's error (OpenTelemetry's gRPC rules).
    assert_eq!(field(&span, "otel.status_code"), None);
}

// ---------------------------------------------------------------------------------------------
// Calls that end normally.

/// A fast call passes through with its own status, message and trailers, unary and streaming,
/// and the status recorded is the one the service sent (from the trailers when it came there).
#[tokio::test]
async fn a_fast_call_passes_through_with_its_own_status_and_trailers() {
    let (capture, _guard) = Capture::install_crate_only();
    // Recorded by a ClientDisconnectLayer (which follows every body), and by a ResponseTimeout
    // alone (which follows a gRPC body to its trailers for the status).
    for (agent, with_disconnects) in [("pass-cd", true), ("pass-rt", false)] {
        let reports = Reports::default();
        let handler = Handler::default();
        let timeout = ResponseTimeoutLayer::new(Duration::from_secs(60));
        let addr = if with_disconnects {
            let stack = ServiceBuilder::new()
                .layer(ClientDisconnectLayer::new().on_outcome(reports.hook()))
                .layer(timeout)
                .into_inner();
            serve(stack, handler).await
        } else {
            serve(timeout.on_outcome(reports.hook()), handler).await
        };
        let mut client = ProbeClient::new(channel(addr, agent).await);

        let reply = client
            .call(call(0, "fast", Some(Duration::from_secs(5))))
            .await
            .unwrap();
        assert_eq!(reply.get_ref().note, "fast");

        let status = client.call(call(0, "not_found", None)).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), "no such probe: 100% missing");
        assert!(status.metadata().get("proxy-status").is_none());

        let mut stream = client
            .stream(CallRequest {
                sleep_ms: 1,
                note: "tick".to_owned(),
                count: 3,
            })
            .await
            .unwrap()
            .into_inner();
        let mut notes = Vec::new();
        while let Some(reply) = stream.message().await.unwrap() {
            notes.push(reply.note);
        }
        assert_eq!(notes, ["tick 0", "tick 1", "tick 2"]);
        assert!(stream.trailers().await.unwrap().is_some());

        let reports = reports.wait_for(3).await;
        let statuses: Vec<_> = reports
            .iter()
            .map(|(outcome, code)| {
                (
                    outcome.kind(),
                    outcome.sent_status().map(|s| s.as_u16()),
                    *code,
                )
            })
            .collect();
        assert_eq!(
            statuses,
            [
                ("completed", Some(200), Some(GrpcCode::OK)),
                ("completed", Some(200), Some(GrpcCode::NOT_FOUND)),
                ("completed", Some(200), Some(GrpcCode::OK)),
            ],
            "{agent}"
        );
    }
    let not_found = capture
        .closed_spans()
        .into_iter()
        .find(|span| field(span, "rpc.response.status_code") == Some("NOT_FOUND"))
        .expect("the span of the NOT_FOUND call");
    // NOT_FOUND is not the server's error.
    assert_eq!(field(&not_found, "otel.status_code"), None);
}

// ---------------------------------------------------------------------------------------------
// A gRPC gateway.

type UpstreamClient = Client<tower_timeouts::ConnectTimeout<HttpConnector>, Body>;

/// A gateway that forwards every request to `upstream` over HTTP/2, through
/// `UpstreamFailureLayer` and a `ConnectTimeoutLayer` of 200 ms, and records with `reports`.
async fn gateway(upstream: std::net::SocketAddr, reports: &Reports) -> std::net::SocketAddr {
    let connector =
        ConnectTimeoutLayer::new(Duration::from_millis(200)).layer(HttpConnector::new());
    let client: UpstreamClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(connector);
    let app = Router::new()
        .fallback(
            move |State(client): State<UpstreamClient>, mut request: Request| async move {
                let path = request.uri().path_and_query().unwrap().clone();
                *request.uri_mut() = format!("http://{upstream}{path}").parse().unwrap();
                let upstream = ServiceBuilder::new()
                    .layer(UpstreamFailureLayer::new())
                    .service(client);
                upstream.oneshot(request).await.unwrap()
            },
        )
        .with_state(client)
        .layer(ClientDisconnectLayer::new().on_outcome(reports.hook()));
    common::serve(common::Server::AxumServe, app).await
}

/// A gRPC gateway in front of an upstream that never accepts, or refuses: the gRPC client gets
/// UNAVAILABLE (nothing was sent: safe to retry), with `Proxy-Status` saying why.
#[tokio::test]
async fn a_grpc_gateway_in_front_of_a_dead_upstream_answers_unavailable() {
    let hole = common::black_hole().await;
    let (refusing, _socket) = common::refusing();
    for (upstream, error, message) in [
        (
            hole.addr,
            "connection_timeout",
            "tower-timeouts: upstream connect timed out (connection_timeout)",
        ),
        (
            refusing,
            "connection_refused",
            "tower-timeouts: upstream connect failed (connection_refused)",
        ),
    ] {
        let reports = Reports::default();
        let addr = gateway(upstream, &reports).await;
        let mut client = ProbeClient::new(channel(addr, "gateway").await);
        let status = client.call(call(0, "fast", None)).await.unwrap_err();
        let reports = reports.wait_for(1).await;
        assert_eq!(reports[0].1, Some(GrpcCode::UNAVAILABLE), "{reports:?}");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(status.message(), message);
        assert_eq!(
            status.metadata().get("proxy-status").unwrap(),
            format!("tower-timeouts; error={error}").as_str()
        );
    }
}

/// An HTTP/2 upstream that answers every request with a gRPC head and one message, then, once
/// `break_off` is notified, fails its body (hyper resets the stream).
async fn breaking_upstream(break_off: Arc<Notify>) -> std::net::SocketAddr {
    type Frame = Result<http_body::Frame<bytes::Bytes>, std::io::Error>;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = hyper::service::service_fn(move |_: http::Request<hyper::body::Incoming>| {
        let break_off = break_off.clone();
        async move {
            let reply = prost::Message::encode_to_vec(&CallReply {
                note: "first".to_owned(),
                remaining_ms: 0,
            });
            let mut message = vec![0];
            message.extend_from_slice(&u32::try_from(reply.len()).unwrap().to_be_bytes());
            message.extend_from_slice(&reply);
            let (frames, body) = tokio::sync::mpsc::channel::<Frame>(2);
            tokio::spawn(async move {
                let _ = frames
                    .send(Ok(http_body::Frame::data(message.into())))
                    .await;
                break_off.notified().await;
                let _ = frames.send(Err(std::io::Error::other("broke off"))).await;
            });
            let body = http_body_util::StreamBody::new(ReceiverStream::new(body));
            let response = http::Response::builder()
                .header(http::header::CONTENT_TYPE, "application/grpc")
                .body(body)
                .unwrap();
            Ok::<_, Infallible>(response)
        }
    });
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service.clone());
            tokio::spawn(connection);
        }
    });
    addr
}

/// A gRPC stream that the upstream breaks off after its head ends, through the gateway, with
/// trailers carrying UNAVAILABLE (not a reset stream, which a gRPC client reads as INTERNAL).
/// The upstream call is recorded as a failure during the body with that status; the request
/// the gateway served, as a response that completed with it.
#[tokio::test]
async fn a_stream_the_upstream_breaks_off_ends_with_a_grpc_status() {
    let (capture, _guard) = Capture::install_crate_only();
    let reports = Reports::default();
    let break_off = Arc::new(Notify::new());
    let addr = gateway(breaking_upstream(break_off.clone()).await, &reports).await;
    let mut client = ProbeClient::new(channel(addr, "broken").await);
    let request = CallRequest {
        sleep_ms: 0,
        note: "tick".to_owned(),
        count: 3,
    };
    let mut stream = client.stream(request).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.note, "first");
    // The head and a message went out: now the upstream breaks off.
    break_off.notify_one();
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status.message(),
        "tower-timeouts: the upstream broke off the response (connection_terminated)"
    );
    let reports = reports.wait_for(1).await;
    assert!(
        matches!(
            reports[..],
            [(Outcome::Completed { .. }, Some(GrpcCode::UNAVAILABLE))]
        ),
        "{reports:?}"
    );
    wait_until(|| !capture.upstream_spans().is_empty()).await;
    let upstream = &capture.upstream_spans()[0];
    assert_eq!(field(upstream, "tower_timeouts.outcome"), Some("failed"));
    assert_eq!(field(upstream, "error.type"), Some("body_error"));
    assert_eq!(
        field(upstream, "rpc.response.status_code"),
        Some("UNAVAILABLE")
    );
    let served = wait_span(&capture, "broken").await;
    assert_eq!(
        field(&served, "rpc.response.status_code"),
        Some("UNAVAILABLE")
    );
    assert_eq!(field(&served, "otel.status_code"), Some("ERROR"));
}

// ---------------------------------------------------------------------------------------------
// Three hops.

/// Client (deadline 1 s) → A (its own limit 5 s) → B (slow). A passes what is left of the
/// deadline on, less a margin; B gives up first and answers DEADLINE_EXCEEDED, which A passes
/// on as it is (A records a completion, not a timeout of its own). Each hop's span shows the
/// budget it was given.
#[tokio::test]
async fn three_hops_each_give_up_before_the_hop_outside() {
    let (capture, _guard) = Capture::install_crate_only();
    let reports_a = Reports::default();
    let reports_b = Reports::default();

    let b = Handler::default();
    // The default margins: 10 ms off the deadline each server gets.
    let b_addr = serve(
        ResponseTimeoutLayer::new(Duration::from_secs(10)).on_outcome(reports_b.hook()),
        b.clone(),
    )
    .await;
    let to_b = ServiceBuilder::new()
        .layer(PropagateDeadlineLayer::new().margin(Duration::from_millis(200)))
        .service(channel(b_addr, "hop-a").await);
    let a = Handler {
        upstream: Some(ProbeClient::new(to_b)),
        ..Handler::default()
    };
    let a_addr = serve(
        ResponseTimeoutLayer::new(Duration::from_secs(5)).on_outcome(reports_a.hook()),
        a,
    )
    .await;

    let mut client = ProbeClient::new(channel(a_addr, "client").await);
    let status = client
        .call(call(30_000, "forward", Some(Duration::from_secs(1))))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");

    // B timed out; A passed B's answer on.
    let b_reports = reports_b.wait_for(1).await;
    assert!(
        matches!(
            b_reports[..],
            [(
                Outcome::ResponseTimeout { .. },
                Some(GrpcCode::DEADLINE_EXCEEDED)
            )]
        ),
        "{b_reports:?}"
    );
    let a_reports = reports_a.wait_for(1).await;
    assert!(
        matches!(
            a_reports[..],
            [(Outcome::Completed { .. }, Some(GrpcCode::DEADLINE_EXCEEDED))]
        ),
        "A passes B's answer on, before its own limit: {a_reports:?}"
    );
    wait_until(|| b.live.count() == 0).await;

    // The budgets: 1 s at A; what was left less 200 ms sent to B; B's own span says the same.
    let span_a = wait_span(&capture, "client").await;
    assert_eq!(field(&span_a, "tower_timeouts.budget_ms"), Some("1000"));
    let span_b = wait_span(&capture, "hop-a").await;
    let upstream = capture.upstream_spans();
    assert_eq!(upstream.len(), 1, "{upstream:?}");
    let sent: u64 = field(&upstream[0], "tower_timeouts.budget_ms")
        .unwrap()
        .parse()
        .unwrap();
    let got: u64 = field(&span_b, "tower_timeouts.budget_ms")
        .unwrap()
        .parse()
        .unwrap();
    // At most 1 s, less A's 10 ms, less the 200 ms margin.
    assert!((1..=790).contains(&sent), "A sent B {sent} ms");
    assert!(got.abs_diff(sent) <= 1, "B got {got} ms, A sent {sent} ms");
    assert_eq!(
        field(&upstream[0], "rpc.response.status_code"),
        Some("DEADLINE_EXCEEDED")
    );
    assert_eq!(
        field(&upstream[0], "rpc.method"),
        Some("probe.v1.Probe/Call")
    );
    assert_eq!(
        upstream[0].parent_name.as_deref(),
        Some(tower_timeouts::trace::SPAN_NAME)
    );
}

// ---------------------------------------------------------------------------------------------
// tower-http's gRPC classifier.

/// Every response the crate generates for a gRPC request is a failure to tower-http's
/// `GrpcErrorsAsFailures` (which looks only at `grpc-status`), and so is counted as one by
/// `TraceLayer::new_for_grpc` and by retries and metrics built on it. The plain 504 it got
/// before was a success to it.
#[tokio::test(start_paused = true)]
async fn tower_https_grpc_classifier_sees_every_generated_response_as_a_failure() {
    use tower_http::classify::{ClassifiedResponse, ClassifyResponse, GrpcErrorsAsFailures};

    fn grpc_request() -> http::Request<()> {
        let mut request = http::Request::new(());
        request.headers_mut().insert(
            http::header::CONTENT_TYPE,
            "application/grpc".parse().unwrap(),
        );
        request
    }
    let pending = tower::service_fn(|_: http::Request<()>| async {
        std::future::pending::<Result<http::Response<Body>, Infallible>>().await
    });
    let failing = |kind: std::io::ErrorKind| {
        tower::service_fn(move |_: http::Request<()>| async move {
            Err::<http::Response<Body>, _>(std::io::Error::from(kind))
        })
    };

    let mut generated = Vec::new();
    let timeout = ResponseTimeoutLayer::new(Duration::from_millis(10));
    generated.push(
        timeout
            .layer(pending)
            .oneshot(grpc_request())
            .await
            .unwrap(),
    );
    for kind in [
        std::io::ErrorKind::TimedOut,
        std::io::ErrorKind::ConnectionRefused,
        std::io::ErrorKind::ConnectionReset,
        std::io::ErrorKind::Other,
    ] {
        let upstream = UpstreamFailureLayer::new().layer(failing(kind));
        generated.push(upstream.oneshot(grpc_request()).await.unwrap());
    }
    let expired = {
        let in_the_past = Deadline::at(tokio::time::Instant::now());
        let mut request = grpc_request();
        request.extensions_mut().insert(in_the_past);
        PropagateDeadlineLayer::new()
            .layer(pending)
            .oneshot(request)
            .await
            .unwrap()
    };
    generated.push(expired);

    let codes: Vec<_> = generated
        .iter()
        .map(|response| {
            response.headers()["grpc-status"]
                .to_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(codes, ["4", "14", "14", "14", "13", "4"]);
    for response in &generated {
        assert_eq!(response.status(), http::StatusCode::OK);
        assert!(response
            .extensions()
            .get::<tower_timeouts::Generated>()
            .is_some());
        let classified = GrpcErrorsAsFailures::new().classify_response(response);
        assert!(
            matches!(classified, ClassifiedResponse::Ready(Err(_))),
            "{:?} classified as a success",
            response.headers()
        );
    }

    // Turned off, the plain 504 again: no `grpc-status` in its head, none in trailers it does
    // not have, so a success to the classifier.
    let plain = timeout
        .without_grpc()
        .layer(pending)
        .oneshot(grpc_request())
        .await
        .unwrap();
    assert_eq!(plain.status(), http::StatusCode::GATEWAY_TIMEOUT);
    let ClassifiedResponse::RequiresEos(eos) =
        GrpcErrorsAsFailures::new().classify_response(&plain)
    else {
        panic!("a response without grpc-status is classified at its end");
    };
    assert!(tower_http::classify::ClassifyEos::classify_eos(eos, None).is_ok());
}

/// Over real TCP, through hyper-util's client: an upstream call made with a deadline through
/// `PropagateDeadlineLayer` gets a connect limit no longer than what is left of it, though the
/// connector's own limit is 10 s.
#[tokio::test]
async fn a_propagated_deadline_shortens_the_connect_of_an_upstream_call() {
    let hole = common::black_hole().await;
    let connector = ConnectTimeoutLayer::new(Duration::from_secs(10)).layer(HttpConnector::new());
    let client: UpstreamClient = Client::builder(TokioExecutor::new()).build(connector);
    let upstream = ServiceBuilder::new()
        .layer(PropagateDeadlineLayer::new())
        .layer(UpstreamFailureLayer::new())
        .service(client);
    let mut request = http::Request::new(Body::empty());
    *request.uri_mut() = format!("http://{}/", hole.addr).parse().unwrap();
    request
        .extensions_mut()
        .insert(Deadline::after(Duration::from_millis(300)));
    let response = upstream.oneshot(request).await.unwrap();
    assert_eq!(response.status().as_u16(), 599);
    let outcome = response
        .extensions()
        .get::<tower_timeouts::Generated>()
        .unwrap()
        .outcome();
    // What was left of 300 ms, less the 10 ms margin, when the connector was called.
    assert!(
        matches!(outcome, Outcome::ConnectTimeout { timeout: Some(limit), .. }
            if *limit <= Duration::from_millis(290)),
        "{outcome:?}"
    );
}
