//! The gRPC part of the demo, as a gRPC client (tonic's) sees it.
//!
//! - Server A: tonic, `Server::builder().layer(…)` with `ClientDisconnectLayer` (outermost) and
//!   `ResponseTimeoutLayer(500 ms)`. Its handler either sleeps or forwards the call to B through
//!   a tonic client wrapped in `PropagateDeadlineLayer` (margin 100 ms).
//! - Server B: tonic, `ResponseTimeoutLayer(5 s)`; its handler sleeps.
//! - A gRPC gateway: axum, forwarding every call over HTTP/2 through `UpstreamFailureLayer` and
//!   a hyper-util client whose connector has `ConnectTimeoutLayer(200 ms)`, to the black hole.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::Router;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tower::{Layer, ServiceBuilder, ServiceExt};
use tower_timeouts::{
    ClientDisconnectLayer, ClientGone, ConnectTimeout, ConnectTimeoutLayer, Deadline, GrpcCode,
    Outcome, PropagateDeadline, PropagateDeadlineLayer, Report, ResponseTimeoutLayer,
    UpstreamFailureLayer,
};

use crate::probe::probe_client::ProbeClient;
use crate::probe::probe_server::{Probe, ProbeServer};
use crate::probe::{CallReply, CallRequest};
use crate::{ms, Row, WAIT};

/// Server A's limit.
const LIMIT_A: Duration = Duration::from_millis(500);
/// Server B's limit: longer than any deadline it is sent.
const LIMIT_B: Duration = Duration::from_secs(5);
/// The margin A takes off what it passes on to B.
const MARGIN_TO_B: Duration = Duration::from_millis(100);
/// The gateway's limit on connecting upstream.
const GATEWAY_CONNECT: Duration = Duration::from_millis(200);
/// How long a slow handler would take if nothing stopped it.
const SLOW_MS: u64 = 5_000;

/// What a server's hook was told of one request.
struct Told {
    server: &'static str,
    outcome: Outcome,
    grpc: Option<GrpcCode>,
    elapsed: Duration,
}

impl Told {
    fn describe(&self) -> String {
        let status = self
            .outcome
            .recorded_status()
            .map_or_else(|| "-".to_owned(), |s| s.as_u16().to_string());
        let grpc = self
            .grpc
            .map_or_else(String::new, |code| format!(" rpc={code}"));
        let limit = match &self.outcome {
            Outcome::ResponseTimeout { timeout, .. } => format!(" limit={timeout:?}"),
            _ => String::new(),
        };
        format!(
            "{}: {} ({status}){grpc}{limit} in {}",
            self.server,
            self.outcome.kind(),
            ms(self.elapsed)
        )
    }
}

fn hook(
    server: &'static str,
    told: mpsc::UnboundedSender<Told>,
) -> impl Fn(&Report<'_>) + Send + Sync + 'static {
    move |report: &Report<'_>| {
        let _ = told.send(Told {
            server,
            outcome: report.outcome().clone(),
            grpc: report.grpc_status(),
            elapsed: report.elapsed(),
        });
    }
}

/// The `Probe` service of A and B.
#[derive(Clone)]
struct Handler {
    /// Tells the driver that a call started, with its `ClientGone` (A only).
    started: Option<mpsc::UnboundedSender<ClientGone>>,
    /// Where `forward` goes (A only).
    upstream: Option<ProbeClient<PropagateDeadline<Channel>>>,
}

#[tonic::async_trait]
impl Probe for Handler {
    async fn call(
        &self,
        request: tonic::Request<CallRequest>,
    ) -> Result<tonic::Response<CallReply>, tonic::Status> {
        if let (Some(started), Some(gone)) = (&self.started, ClientGone::current()) {
            let _ = started.send(gone);
        }
        let remaining_ms = Deadline::current().map_or(0, |d| d.remaining().as_millis() as u64);
        let request = request.into_inner();
        if request.note == "forward" {
            let mut upstream = self.upstream.clone().expect("A forwards to B");
            return upstream
                .call(CallRequest {
                    note: "from A".to_owned(),
                    ..request
                })
                .await;
        }
        tokio::time::sleep(Duration::from_millis(request.sleep_ms)).await;
        Ok(tonic::Response::new(CallReply {
            note: request.note,
            remaining_ms,
        }))
    }

    type StreamStream = tokio_stream::Empty<Result<CallReply, tonic::Status>>;

    async fn stream(
        &self,
        _: tonic::Request<CallRequest>,
    ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
        Ok(tonic::Response::new(tokio_stream::empty()))
    }
}

async fn listen() -> Result<(TcpListener, SocketAddr), String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot listen on 127.0.0.1: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("no address: {e}"))?;
    Ok((listener, addr))
}

async fn channel(addr: SocketAddr) -> Result<Channel, String> {
    Channel::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("bad uri: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))
}

type GatewayClient = Client<ConnectTimeout<HttpConnector>, Body>;

/// Starts B, A and the gateway; returns A's and the gateway's addresses.
async fn start(
    blackhole: SocketAddr,
    told: mpsc::UnboundedSender<Told>,
    started: mpsc::UnboundedSender<ClientGone>,
) -> Result<(SocketAddr, SocketAddr), String> {
    let (listener, b) = listen().await?;
    let b_server = Server::builder()
        .layer(ResponseTimeoutLayer::new(LIMIT_B).on_outcome(hook("B", told.clone())))
        .add_service(ProbeServer::new(Handler {
            started: None,
            upstream: None,
        }))
        .serve_with_incoming(TcpIncoming::from(listener));
    tokio::spawn(b_server);

    let to_b = ServiceBuilder::new()
        .layer(PropagateDeadlineLayer::new().margin(MARGIN_TO_B))
        .service(channel(b).await?);
    let (listener, a) = listen().await?;
    let stack = ServiceBuilder::new()
        .layer(ClientDisconnectLayer::new().on_outcome(hook("A", told.clone())))
        .layer(ResponseTimeoutLayer::new(LIMIT_A))
        .into_inner();
    let a_server = Server::builder()
        .layer(stack)
        .add_service(ProbeServer::new(Handler {
            started: Some(started),
            upstream: Some(ProbeClient::new(to_b)),
        }))
        .serve_with_incoming(TcpIncoming::from(listener));
    tokio::spawn(a_server);

    let connector = ConnectTimeoutLayer::new(GATEWAY_CONNECT).layer(HttpConnector::new());
    let client: GatewayClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(connector);
    let gateway = Router::new()
        .fallback(
            move |State(client): State<GatewayClient>, mut request: Request| async move {
                let path = request.uri().path().to_owned();
                *request.uri_mut() = format!("http://{blackhole}{path}")
                    .parse()
                    .expect("a valid URI");
                ServiceBuilder::new()
                    .layer(UpstreamFailureLayer::new())
                    .service(client)
                    .oneshot(request)
                    .await
                    .unwrap_or_else(|never| match never {})
            },
        )
        .with_state(client)
        .layer(ClientDisconnectLayer::new().on_outcome(hook("gateway", told)));
    let (listener, gateway_addr) = listen().await?;
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, gateway).await {
            eprintln!("gateway error: {error}");
        }
    });
    Ok((a, gateway_addr))
}

/// What one gRPC scenario expects.
struct Expect {
    /// The code the client gets.
    code: tonic::Code,
    /// What the servers record, in order: (server, outcome kind, gRPC status).
    recorded: &'static [(&'static str, &'static str, GrpcCode)],
    /// For a timeout of A's: the limit that fired.
    limit: Option<Duration>,
    client_gone_fires: bool,
}

enum Call {
    /// A call with this deadline (`grpc-timeout`) that sleeps `sleep_ms` or forwards.
    To {
        gateway: bool,
        deadline: Option<Duration>,
        sleep_ms: u64,
        note: &'static str,
    },
    /// A call the client drops once A's handler has started.
    Cancelled,
}

struct Scenario {
    name: &'static str,
    call: Call,
    expect: Expect,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "grpc fast",
        call: Call::To {
            gateway: false,
            deadline: Some(Duration::from_secs(2)),
            sleep_ms: 0,
            note: "fast",
        },
        expect: Expect {
            code: tonic::Code::Ok,
            recorded: &[("A", "completed", GrpcCode::OK)],
            limit: None,
            client_gone_fires: false,
        },
    },
    Scenario {
        name: "grpc caller's deadline",
        call: Call::To {
            gateway: false,
            deadline: Some(Duration::from_millis(200)),
            sleep_ms: SLOW_MS,
            note: "slow",
        },
        expect: Expect {
            code: tonic::Code::DeadlineExceeded,
            recorded: &[("A", "response_timeout", GrpcCode::DEADLINE_EXCEEDED)],
            // 200 ms less the default margin of 10 ms.
            limit: Some(Duration::from_millis(190)),
            client_gone_fires: false,
        },
    },
    Scenario {
        name: "grpc server's limit",
        call: Call::To {
            gateway: false,
            deadline: None,
            sleep_ms: SLOW_MS,
            note: "slow",
        },
        expect: Expect {
            code: tonic::Code::DeadlineExceeded,
            recorded: &[("A", "response_timeout", GrpcCode::DEADLINE_EXCEEDED)],
            limit: Some(LIMIT_A),
            client_gone_fires: false,
        },
    },
    Scenario {
        name: "grpc cancelled",
        call: Call::Cancelled,
        expect: Expect {
            code: tonic::Code::Cancelled,
            recorded: &[("A", "client_disconnected", GrpcCode::CANCELLED)],
            limit: None,
            client_gone_fires: true,
        },
    },
    Scenario {
        name: "grpc two hops",
        call: Call::To {
            gateway: false,
            deadline: Some(Duration::from_millis(400)),
            sleep_ms: SLOW_MS,
            note: "forward",
        },
        expect: Expect {
            code: tonic::Code::DeadlineExceeded,
            // B gives up first (what A had left, less 100 ms); A passes B's answer on.
            recorded: &[
                ("B", "response_timeout", GrpcCode::DEADLINE_EXCEEDED),
                ("A", "completed", GrpcCode::DEADLINE_EXCEEDED),
            ],
            limit: None,
            client_gone_fires: false,
        },
    },
    Scenario {
        name: "grpc gateway blackhole",
        call: Call::To {
            gateway: true,
            deadline: None,
            sleep_ms: 0,
            note: "fast",
        },
        expect: Expect {
            code: tonic::Code::Unavailable,
            recorded: &[("gateway", "connect_timeout", GrpcCode::UNAVAILABLE)],
            limit: None,
            client_gone_fires: false,
        },
    },
];

/// Plays the gRPC scenarios.
pub(crate) async fn run(blackhole: SocketAddr) -> Result<Vec<Row>, String> {
    let (told_tx, mut told) = mpsc::unbounded_channel();
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let (a, gateway) = start(blackhole, told_tx, started_tx).await?;
    println!(
        "\ngRPC: tonic A on {a}: ClientDisconnectLayer + ResponseTimeoutLayer({} ms), forwarding \
         to tonic B (ResponseTimeoutLayer({} s)) through PropagateDeadlineLayer (margin {} ms); \
         axum gRPC gateway on {gateway} to the black hole, ConnectTimeoutLayer({} ms)\n",
        LIMIT_A.as_millis(),
        LIMIT_B.as_secs(),
        MARGIN_TO_B.as_millis(),
        GATEWAY_CONNECT.as_millis()
    );
    let mut to_a = ProbeClient::new(channel(a).await?);
    let mut to_gateway = ProbeClient::new(channel(gateway).await?);

    let mut rows = Vec::new();
    for scenario in SCENARIOS {
        let mut row = Row {
            name: scenario.name,
            seen: "(nothing)".to_owned(),
            recorded: "(nothing)".to_owned(),
            problems: Vec::new(),
        };
        let expect = &scenario.expect;
        let begun = Instant::now();
        let (code, seen, gone) = match &scenario.call {
            Call::To {
                gateway,
                deadline,
                sleep_ms,
                note,
            } => {
                let mut request = tonic::Request::new(CallRequest {
                    sleep_ms: *sleep_ms,
                    note: (*note).to_owned(),
                    count: 0,
                });
                if let Some(deadline) = deadline {
                    request.set_timeout(*deadline);
                }
                let client = if *gateway { &mut to_gateway } else { &mut to_a };
                let result = timeout(WAIT, client.call(request)).await;
                let took = begun.elapsed();
                let gone = started.try_recv().ok();
                match result {
                    Err(_) => {
                        row.problems.push(format!("no answer within {WAIT:?}"));
                        continue;
                    }
                    Ok(Ok(_)) => (tonic::Code::Ok, format!("OK after {}", ms(took)), gone),
                    Ok(Err(status)) => (
                        status.code(),
                        format!(
                            "{:?} \"{}\" after {}",
                            status.code(),
                            status.message(),
                            ms(took)
                        ),
                        gone,
                    ),
                }
            }
            Call::Cancelled => {
                let mut request = tonic::Request::new(CallRequest {
                    sleep_ms: SLOW_MS,
                    note: "slow".to_owned(),
                    count: 0,
                });
                request.set_timeout(Duration::from_secs(2));
                let gone = tokio::select! {
                    result = to_a.call(request) => {
                        row.problems.push(format!("the call ended: {result:?}"));
                        None
                    }
                    gone = timeout(WAIT, started.recv()) => gone.ok().flatten(),
                };
                // Dropping the call's future resets its HTTP/2 stream (CANCEL).
                (
                    tonic::Code::Cancelled,
                    format!(
                        "nothing: it cancelled its call after {}",
                        ms(begun.elapsed())
                    ),
                    gone,
                )
            }
        };
        row.seen = seen;
        if code != expect.code {
            row.problems
                .push(format!("the client should get {:?}", expect.code));
        }
        let mut recorded = Vec::new();
        for (server, kind, grpc) in expect.recorded {
            match timeout(WAIT, told.recv()).await {
                Ok(Some(one)) => {
                    if one.server != *server
                        || one.outcome.kind() != *kind
                        || one.grpc != Some(*grpc)
                    {
                        row.problems.push(format!(
                            "expected {server}: {kind} rpc={grpc}, got {}",
                            one.describe()
                        ));
                    }
                    if let (Some(limit), Outcome::ResponseTimeout { timeout, .. }) =
                        (expect.limit, &one.outcome)
                    {
                        if *timeout != limit {
                            row.problems.push(format!("the limit should be {limit:?}"));
                        }
                    }
                    recorded.push(one.describe());
                }
                _ => row
                    .problems
                    .push(format!("nothing recorded by {server} within {WAIT:?}")),
            }
        }
        if !recorded.is_empty() {
            row.recorded = recorded.join("; ");
        }
        // The signal fires before the outcome is recorded: waited for only when it should.
        let fired = match gone {
            Some(gone) if expect.client_gone_fires => timeout(WAIT, gone.gone()).await.is_ok(),
            Some(gone) => gone.is_gone(),
            None => false,
        };
        if fired != expect.client_gone_fires {
            row.problems.push(format!(
                "ClientGone fired: {fired}, expected {}",
                expect.client_gone_fires
            ));
        }
        while let Ok(extra) = told.try_recv() {
            row.problems.push(format!(
                "an extra outcome was recorded: {}",
                extra.describe()
            ));
        }
        rows.push(row);
    }
    Ok(rows)
}
