//! One access-log line per request, in nginx's `combined` format (with the request time, the
//! outcome and its error type) or as JSON, through a tracing target of its own.
//!
//! ```
//! use tower_timeouts::access_log::{AccessLog, TARGET};
//! use tower_timeouts::ClientDisconnectLayer;
//! use tracing::Level;
//! use tracing_subscriber::filter::filter_fn;
//! use tracing_subscriber::prelude::*;
//!
//! // The access log alone on stdout, as bare lines; everything else as usual, elsewhere.
//! let access = tracing_subscriber::fmt::layer()
//!     .with_writer(std::io::stdout)
//!     .without_time()
//!     .with_level(false)
//!     .with_target(false)
//!     .with_filter(filter_fn(|meta| meta.target() == TARGET));
//! let rest = tracing_subscriber::fmt::layer()
//!     .with_writer(std::io::stderr)
//!     .with_filter(filter_fn(|meta| meta.target() != TARGET && *meta.level() <= Level::INFO));
//! let _ = tracing_subscriber::registry().with(access).with(rest).try_init();
//!
//! let layer = ClientDisconnectLayer::new().on_outcome(AccessLog::combined());
//! # let _ = layer;
//! ```
//!
//! A client that left is logged 499, as nginx logs it; a response the crate generated with the
//! status it sent (599, 504, 502, 408, 503, or a gRPC status's 200) and, last on the line, its
//! `Proxy-Status` error type (`connection_timeout`, `http_response_timeout`,
//! `connection_refused`, …), or the outcome's [`error_type`](crate::Outcome::error_type):
//!
//! ```text
//! 127.0.0.1 - - [24/Nov/2026:02:31:07 +0000] "GET /slow HTTP/1.1" 504 - "-" "curl/8.5.0" 0.501 response_timeout http_response_timeout
//! 127.0.0.1 - - [24/Nov/2026:02:31:09 +0000] "POST /upload HTTP/1.1" 499 - "-" "curl/8.5.0" 0.302 client_disconnected client_disconnected
//! ```
//!
//! The fields: `$remote_addr` (axum's `ConnectInfo<SocketAddr>`, else `-`), `$remote_user`
//! (always `-`), `[$time_local]` (in UTC), `"$request"`, `$status` (the recorded status: 499
//! for a client gone before the head; `-` for a service that failed before any), the body
//! bytes (`-`: not counted), `"$http_referer"`, `"$http_user_agent"`, then `$request_time` in
//! seconds, the outcome ([`Outcome::kind`](crate::Outcome::kind)), and its error type (`-`
//! for a normal completion). Quotes, backslashes and control characters in the quoted fields
//! are escaped as nginx does (`\x22`).
//!
//! The JSON form has the same facts under names of their own, plus the matched route and the
//! gRPC status:
//!
//! ```text
//! {"time":"2026-11-24T02:31:07.123Z","remote_addr":"127.0.0.1","method":"GET","uri":"/slow","protocol":"HTTP/1.1","status":504,"request_time":0.501,"route":"/slow","user_agent":"curl/8.5.0","referer":null,"outcome":"response_timeout","error_type":"http_response_timeout","grpc_status":null}
//! ```
//!
//! Each line is an event at INFO with target [`TARGET`] and no parent span, so that a `fmt`
//! layer prints the line and nothing around it; the line is its `message`. It needs what the
//! request was ([`Report::request`]), which the crate takes for every request once a hook is
//! configured.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::record::{OnOutcome, Report};

/// The target of the access-log events.
pub const TARGET: &str = "tower_timeouts::access";

/// An [`OnOutcome`] hook that logs one line per request; see the [module docs](self).
#[derive(Clone, Copy, Debug)]
pub struct AccessLog {
    json: bool,
}

impl AccessLog {
    /// nginx's `combined` format, followed by the request time, the outcome and its error type.
    pub const fn combined() -> Self {
        AccessLog { json: false }
    }

    /// One JSON object per line.
    pub const fn json() -> Self {
        AccessLog { json: true }
    }

    /// The line for `report`, as the hook logs it (`None` for the report of an upstream call,
    /// which is not the server's request).
    pub fn line(&self, report: &Report<'_>) -> Option<String> {
        let request = report.request()?;
        let outcome = report.outcome();
        let status = outcome.recorded_status().map(|status| status.as_u16());
        let error_type = outcome.proxy_error().or(outcome.error_type());
        let seconds = report.elapsed().as_secs_f64();
        let peer = request.peer().map(|peer| peer.ip().to_string());
        let target = request
            .uri()
            .path_and_query()
            .map_or(request.uri().path(), |target| target.as_str());
        let header = |value: Option<&http::HeaderValue>| {
            value.map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
        };
        let (agent, referer) = (header(request.user_agent()), header(request.referer()));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut line = String::with_capacity(200);
        if self.json {
            let text = |line: &mut String, value: Option<&str>| match value {
                Some(value) => json_string(line, value),
                None => line.push_str("null"),
            };
            line.push_str("{\"time\":");
            json_string(&mut line, &rfc3339(now));
            line.push_str(",\"remote_addr\":");
            text(&mut line, peer.as_deref());
            line.push_str(",\"method\":");
            json_string(&mut line, request.method().as_str());
            line.push_str(",\"uri\":");
            json_string(&mut line, target);
            line.push_str(",\"protocol\":");
            json_string(&mut line, &format!("{:?}", request.version()));
            let status = status.map_or("null".to_owned(), |status| status.to_string());
            let _ = write!(line, ",\"status\":{status},\"request_time\":{seconds:.3}");
            line.push_str(",\"route\":");
            text(&mut line, request.route());
            line.push_str(",\"user_agent\":");
            text(&mut line, agent.as_deref());
            line.push_str(",\"referer\":");
            text(&mut line, referer.as_deref());
            line.push_str(",\"outcome\":");
            json_string(&mut line, outcome.kind());
            line.push_str(",\"error_type\":");
            text(&mut line, error_type);
            line.push_str(",\"grpc_status\":");
            text(&mut line, report.grpc_status().map(|code| code.name()));
            line.push('}');
        } else {
            let status = status.map_or("-".to_owned(), |status| status.to_string());
            let _ = write!(
                line,
                "{} - - [{}] \"",
                peer.as_deref().unwrap_or("-"),
                clf_time(now)
            );
            nginx_escaped(
                &mut line,
                &format!(
                    "{} {target} {:?}",
                    request.method().as_str(),
                    request.version()
                ),
            );
            let _ = write!(line, "\" {status} - \"");
            nginx_escaped(&mut line, referer.as_deref().unwrap_or("-"));
            line.push_str("\" \"");
            nginx_escaped(&mut line, agent.as_deref().unwrap_or("-"));
            let _ = write!(
                line,
                "\" {seconds:.3} {} {}",
                outcome.kind(),
                error_type.unwrap_or("-")
            );
        }
        Some(line)
    }
}

impl OnOutcome for AccessLog {
    fn on_outcome(&self, report: &Report<'_>) {
        // No line is made for nobody.
        if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
            return;
        }
        if let Some(line) = self.line(report) {
            tracing::event!(target: TARGET, parent: None, tracing::Level::INFO, "{line}");
        }
    }
}

/// `value` with `"`, `\` and control characters as `\xHH`, as nginx escapes its log fields.
fn nginx_escaped(out: &mut String, value: &str) {
    for c in value.chars() {
        if c == '"' || c == '\\' || c.is_control() {
            for byte in c.to_string().bytes() {
                let _ = write!(out, "\\x{byte:02X}");
            }
        } else {
            out.push(c);
        }
    }
}

/// `value` as a JSON string.
fn json_string(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// (year, month, day, hours, minutes, seconds) of `since_epoch`, in UTC.
fn civil(since_epoch: std::time::Duration) -> (i64, u32, u32, u64, u64, u64) {
    let secs = since_epoch.as_secs();
    let (days, day_secs) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        month,
        day,
        day_secs / 3_600,
        day_secs / 60 % 60,
        day_secs % 60,
    )
}

/// nginx's `$time_local`, in UTC: `24/Nov/2026:02:31:07 +0000`.
fn clf_time(since_epoch: std::time::Duration) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (year, month, day, h, m, s) = civil(since_epoch);
    let month = MONTHS[month as usize - 1];
    format!("{day:02}/{month}/{year}:{h:02}:{m:02}:{s:02} +0000")
}

/// RFC 3339 in UTC, to the millisecond: `2026-11-24T02:31:07.123Z`.
fn rfc3339(since_epoch: std::time::Duration) -> String {
    let (year, month, day, h, m, s) = civil(since_epoch);
    let ms = since_epoch.subsec_millis();
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{ms:03}Z")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn dates_are_civil_dates() {
        assert_eq!(clf_time(Duration::ZERO), "01/Jan/1970:00:00:00 +0000");
        // 2026-11-24T02:31:07.123Z
        let at = Duration::from_millis(1_795_487_467_123);
        assert_eq!(rfc3339(at), "2026-11-24T02:31:07.123Z");
        assert_eq!(clf_time(at), "24/Nov/2026:02:31:07 +0000");
        // A leap day.
        assert_eq!(
            rfc3339(Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn fields_are_escaped() {
        let mut out = String::new();
        nginx_escaped(&mut out, "a \"quoted\" \\ agent\n");
        assert_eq!(out, "a \\x22quoted\\x22 \\x5C agent\\x0A");
        let mut out = String::new();
        json_string(&mut out, "a \"quoted\" \\ agent\n\u{1}");
        assert_eq!(out, "\"a \\\"quoted\\\" \\\\ agent\\n\\u0001\"");
    }
}
