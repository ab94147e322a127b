//! OpenTelemetry's HTTP server duration histogram, recorded through the [`metrics`] facade by
//! an [`OnOutcome`] hook (the `metrics` feature).
//!
//! ```
//! use tower_timeouts::access_log::AccessLog;
//! use tower_timeouts::metrics::ServerMetrics;
//! use tower_timeouts::ClientDisconnectLayer;
//!
//! // Install a recorder once (for instance `metrics_exporter_prometheus::PrometheusBuilder`,
//! // with `metrics::BUCKETS` for this histogram); then, as the hook, alone or with the access log:
//! let layer = ClientDisconnectLayer::new().on_outcome((ServerMetrics::new(), AccessLog::combined()));
//! # let _ = layer;
//! ```
//!
//! One histogram, [`HTTP_SERVER_REQUEST_DURATION`] (`http.server.request.duration`), in
//! seconds, one sample per request when it ends (the [`Report::elapsed`] time), with these
//! labels:
//!
//! | label | value |
//! |---|---|
//! | `http.request.method` | the method, or `_OTHER` for any method HTTP does not define |
//! | `http.response.status_code` | the status sent, only when one was (not for a 499) |
//! | `error.type` | [`Outcome::error_type`](crate::Outcome::error_type), for anything but a normal completion |
//! | `http.route` | the route that matched (axum's `MatchedPath`, with the `axum` feature), when known; never the raw path |
//! | `tower_timeouts.outcome` | [`Outcome::kind`](crate::Outcome::kind) |
//!
//! Every label's values come from a small fixed set or from the app's own routes, so the
//! number of series stays low by construction. A client that left has no status code, and is
//! found by `tower_timeouts_outcome="client_disconnected"` (a Prometheus exporter writes the
//! dots as underscores).
//!
//! Why the `metrics` facade rather than the `opentelemetry` metrics API: it is one small
//! dependency for a library, the app picks the exporter (Prometheus, StatsD, OpenTelemetry
//! through `metrics-exporter-opentelemetry`), and the hook costs nothing when no recorder is
//! installed. Histograms' buckets belong to the exporter; [`BUCKETS`] are OpenTelemetry's
//! recommended ones for this histogram.

use std::sync::Arc;

use metrics::{Label, SharedString, Unit};

use crate::record::{OnOutcome, Report};

/// `http.server.request.duration`, in seconds.
pub const HTTP_SERVER_REQUEST_DURATION: &str = "http.server.request.duration";

/// OpenTelemetry's recommended buckets for [`HTTP_SERVER_REQUEST_DURATION`], in seconds.
pub const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// An [`OnOutcome`] hook that records [`HTTP_SERVER_REQUEST_DURATION`] for every server
/// request; see the [module docs](self). Upstream calls are not recorded.
#[derive(Clone, Copy, Debug, Default)]
#[non_exhaustive]
pub struct ServerMetrics;

impl ServerMetrics {
    /// The hook. Describes the histogram (its unit and description) to the recorder installed
    /// now, if any.
    pub fn new() -> Self {
        metrics::describe_histogram!(
            HTTP_SERVER_REQUEST_DURATION,
            Unit::Seconds,
            "Duration of HTTP server requests."
        );
        ServerMetrics
    }
}

impl OnOutcome for ServerMetrics {
    fn on_outcome(&self, report: &Report<'_>) {
        let Some(request) = report.request() else {
            return;
        };
        let outcome = report.outcome();
        let mut labels = Vec::with_capacity(5);
        labels.push(Label::from_static_parts(
            "http.request.method",
            method_label(request.method()),
        ));
        if let Some(status) = outcome.sent_status() {
            labels.push(Label::new(
                "http.response.status_code",
                status.as_str().to_owned(),
            ));
        }
        if let Some(error_type) = outcome.error_type() {
            labels.push(Label::from_static_parts("error.type", error_type));
        }
        if let Some(route) = request.shared_route() {
            labels.push(Label::new(
                "http.route",
                SharedString::from_shared(Arc::clone(route)),
            ));
        }
        labels.push(Label::from_static_parts(
            "tower_timeouts.outcome",
            outcome.kind(),
        ));
        metrics::histogram!(HTTP_SERVER_REQUEST_DURATION, labels)
            .record(report.elapsed().as_secs_f64());
    }
}

/// The method, or `_OTHER` for one HTTP does not define (OpenTelemetry's rule, which keeps a
/// client from making a series per method name it invents).
fn method_label(method: &http::Method) -> &'static str {
    use http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::CONNECT => "CONNECT",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::PATCH => "PATCH",
        _ => "_OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_methods_are_other() {
        assert_eq!(method_label(&http::Method::GET), "GET");
        assert_eq!(method_label(&http::Method::PATCH), "PATCH");
        let invented = http::Method::from_bytes(b"PURGE").unwrap();
        assert_eq!(method_label(&invented), "_OTHER");
    }
}
