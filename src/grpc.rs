//! gRPC: the statuses the crate answers gRPC requests with, and the `grpc-timeout` header.
//!
//! A request is gRPC when its `content-type` starts with `application/grpc` (which includes
//! grpc-web's `application/grpc-web`, `application/grpc-web+proto` and
//! `application/grpc-web-text`). For such a request, a response the crate generates is a
//! *trailers-only* response, which every gRPC client reads as a status:
//!
//! - HTTP 200, with the request's own `content-type`;
//! - `grpc-status`, and `grpc-message` percent-encoded as the gRPC spec says;
//! - no body;
//! - `Proxy-Status` and the [`Generated`](crate::Generated) marker, as on every generated
//!   response.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower_timeouts::grpc::{self, GrpcCode};
//!
//! assert_eq!(grpc::parse_timeout(b"250m"), Ok(Duration::from_millis(250)));
//! assert!(grpc::parse_timeout(b"+1S").is_err());
//! assert_eq!(grpc::encode_timeout(Duration::from_secs(30)), "30000000u");
//! assert_eq!(GrpcCode::DEADLINE_EXCEEDED.name(), "DEADLINE_EXCEEDED");
//! ```
//!
//! # Statuses
//!
//! | outcome | gRPC status (default) |
//! |---|---|
//! | [`ResponseTimeout`](crate::Outcome::ResponseTimeout) | `DEADLINE_EXCEEDED` (4) |
//! | [`DeadlineExceeded`](crate::Outcome::DeadlineExceeded) (nothing left to send an upstream call with) | `DEADLINE_EXCEEDED` (4) |
//! | [`ConnectTimeout`](crate::Outcome::ConnectTimeout), [`ConnectFailed`](crate::Outcome::ConnectFailed) (refused, unreachable, DNS) | `UNAVAILABLE` (14) |
//! | [`UpstreamFailed`](crate::Outcome::UpstreamFailed) `connection_terminated` (the upstream hung up or reset) | `UNAVAILABLE` (14) |
//! | `UpstreamFailed` `http_protocol_error`, `proxy_internal_error` | `INTERNAL` (13) |
//! | [`RequestBodyTimeout`](crate::Outcome::RequestBodyTimeout) (the client too slow to send) | `DEADLINE_EXCEEDED` (4) |
//! | [`ResponseBodyTimeout`](crate::Outcome::ResponseBodyTimeout) (a stream stalled; sent in the trailers) | `DEADLINE_EXCEEDED` (4) |
//! | [`ServerShutdown`](crate::Outcome::ServerShutdown) (a shutdown's grace ran out) | `UNAVAILABLE` (14), safe to retry elsewhere |
//! | [`ClientDisconnected`](crate::Outcome::ClientDisconnected) | recorded as `CANCELLED` (1) beside the 499; nothing is sent |
//!
//! Why: a timeout is `DEADLINE_EXCEEDED`, which clients do not retry on their own (Envoy and
//! linkerd2-proxy moved to it from `UNAVAILABLE` for that reason). A connect that failed sent
//! nothing, so `UNAVAILABLE`, which says the call is safe to retry. For an upstream that hung
//! up, gRPC's own table (`doc/statuscodes.md`, "Some data transmitted … before connection
//! breaks") says `UNAVAILABLE`, which is also what clients map a 502 to; a response that is not
//! valid HTTP is a broken invariant, `INTERNAL` ("Error parsing response proto", "Flow-control
//! protocol violation" in the same table). Change any of them with
//! [`grpc_code_with`](crate::ResponseTimeoutLayer::grpc_code_with), or answer gRPC requests
//! with the plain HTTP responses with [`without_grpc`](crate::ResponseTimeoutLayer::without_grpc).
//!
//! An upstream's own gRPC answer passes through untouched.
//!
//! # grpc-web
//!
//! grpc-web allows a trailers-only response (the status in the headers, no body), so the
//! generated responses work for it as they are. A grpc-web status that ends a stream after its
//! head must be a frame in the body, not HTTP trailers: put the crate's layers inside
//! `tonic_web::GrpcWebLayer`, where requests are plain gRPC and it does the translation.

use std::fmt;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::HeaderMap;

use crate::outcome::{Outcome, ProxyError};

/// `grpc-status`
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// `grpc-message`
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// `grpc-timeout`
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// A gRPC status code (`grpc-status`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrpcCode(u8);

macro_rules! codes {
    ($($name:ident = $value:literal,)*) => {
        impl GrpcCode {
            $(
                #[doc = concat!("`", stringify!($name), "` (", stringify!($value), ")")]
                pub const $name: GrpcCode = GrpcCode($value);
            )*

            /// The code's name, as `rpc.response.status_code` carries it
            /// (`DEADLINE_EXCEEDED`); the number for a code gRPC does not define.
            pub fn name(self) -> &'static str {
                match self.0 {
                    $($value => stringify!($name),)*
                    _ => "_OTHER",
                }
            }
        }
    };
}

codes! {
    OK = 0,
    CANCELLED = 1,
    UNKNOWN = 2,
    INVALID_ARGUMENT = 3,
    DEADLINE_EXCEEDED = 4,
    NOT_FOUND = 5,
    ALREADY_EXISTS = 6,
    PERMISSION_DENIED = 7,
    RESOURCE_EXHAUSTED = 8,
    FAILED_PRECONDITION = 9,
    ABORTED = 10,
    OUT_OF_RANGE = 11,
    UNIMPLEMENTED = 12,
    INTERNAL = 13,
    UNAVAILABLE = 14,
    DATA_LOSS = 15,
    UNAUTHENTICATED = 16,
}

impl GrpcCode {
    /// The code of `value`, any number from 0 to 255 (gRPC defines 0 to 16).
    pub const fn from_u8(value: u8) -> Self {
        GrpcCode(value)
    }

    /// The code's number.
    pub const fn as_u8(self) -> u8 {
        self.0
    }

    /// The code in a `grpc-status` header, if it holds one.
    pub fn from_header(value: &HeaderValue) -> Option<Self> {
        let bytes = value.as_bytes();
        if bytes.is_empty() || bytes.len() > 3 || !bytes.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let value = bytes
            .iter()
            .fold(0u16, |n, digit| n * 10 + u16::from(digit - b'0'));
        u8::try_from(value).ok().map(GrpcCode)
    }

    /// Whether a server span with this status is an error, by OpenTelemetry's gRPC rules:
    /// `UNKNOWN`, `DEADLINE_EXCEEDED`, `UNIMPLEMENTED`, `INTERNAL`, `UNAVAILABLE` and
    /// `DATA_LOSS` are; the rest (`CANCELLED` among them) are the caller's business.
    pub fn is_server_error(self) -> bool {
        matches!(self.0, 2 | 4 | 12 | 13 | 14 | 15)
    }

    pub(crate) fn header_value(self) -> HeaderValue {
        match self.0 {
            0 => HeaderValue::from_static("0"),
            1 => HeaderValue::from_static("1"),
            2 => HeaderValue::from_static("2"),
            4 => HeaderValue::from_static("4"),
            13 => HeaderValue::from_static("13"),
            14 => HeaderValue::from_static("14"),
            n => HeaderValue::from(u16::from(n)),
        }
    }
}

impl fmt::Debug for GrpcCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for GrpcCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The default gRPC status for a generated response (see the [module docs](self#statuses)).
pub fn default_code(outcome: &Outcome) -> GrpcCode {
    match outcome {
        Outcome::ResponseTimeout { .. }
        | Outcome::DeadlineExceeded { .. }
        | Outcome::RequestBodyTimeout { .. }
        | Outcome::ResponseBodyTimeout { .. } => GrpcCode::DEADLINE_EXCEEDED,
        Outcome::ConnectTimeout { .. }
        | Outcome::ConnectFailed { .. }
        | Outcome::ServerShutdown { .. } => GrpcCode::UNAVAILABLE,
        Outcome::UpstreamFailed {
            error: ProxyError::ConnectionTerminated,
            ..
        } => GrpcCode::UNAVAILABLE,
        Outcome::UpstreamFailed { .. } => GrpcCode::INTERNAL,
        Outcome::ClientDisconnected { .. } => GrpcCode::CANCELLED,
        _ => GrpcCode::UNKNOWN,
    }
}

/// Whether a request with these headers is gRPC: its `content-type` starts with
/// `application/grpc` (grpc-web's included).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    grpc_content_type(headers).is_some()
}

/// The request's `content-type`, when the request is gRPC.
pub(crate) fn grpc_content_type(headers: &HeaderMap) -> Option<&HeaderValue> {
    headers
        .get(CONTENT_TYPE)
        .filter(|value| value.as_bytes().starts_with(b"application/grpc"))
}

/// Why a `grpc-timeout` value was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct InvalidTimeout;

impl fmt::Display for InvalidTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("malformed grpc-timeout: 1 to 8 ASCII digits and one of H M S m u n")
    }
}

impl std::error::Error for InvalidTimeout {}

/// Parses a `grpc-timeout` value: 1 to 8 ASCII digits, then one unit (`H` hours, `M` minutes,
/// `S` seconds, `m` milliseconds, `u` microseconds, `n` nanoseconds). Nothing else: no sign, no
/// space, no other unit. `0n` is valid, and already expired.
pub fn parse_timeout(value: &[u8]) -> Result<Duration, InvalidTimeout> {
    let Some((&unit, digits)) = value.split_last() else {
        return Err(InvalidTimeout);
    };
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(InvalidTimeout);
    }
    // At most 99 999 999: no overflow below, in any unit.
    let n = digits
        .iter()
        .fold(0u64, |n, digit| n * 10 + u64::from(digit - b'0'));
    Ok(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return Err(InvalidTimeout),
    })
}

/// Encodes `timeout` as a `grpc-timeout` value: at most 8 digits, in the finest unit that
/// holds it, rounded up to that unit (as tonic does: `30000000u` for 30 s), so that parsing it
/// back gives `timeout` or at most one unit more. A timeout beyond 8 digits of hours is sent
/// as `99999999H`.
pub fn encode_timeout(timeout: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = timeout.as_nanos();
    let units: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    for (per, unit) in units {
        let n = nanos.div_ceil(per);
        if n <= MAX {
            return HeaderValue::from_str(&format!("{n}{unit}"))
                .expect("digits and a letter are a valid header value");
        }
    }
    HeaderValue::from_static("99999999H")
}

/// Percent-encodes a `grpc-message` as the gRPC spec says: bytes outside `%x20-%x7E`, and `%`
/// itself, become `%XX`.
pub(crate) fn encode_message(message: &str) -> HeaderValue {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    HeaderValue::from_str(&out).expect("printable ASCII is a valid header value")
}

/// The trailers that end a gRPC stream with `code` and `message`.
pub(crate) fn trailers(code: GrpcCode, message: &str) -> HeaderMap {
    let mut trailers = HeaderMap::with_capacity(2);
    trailers.insert(GRPC_STATUS, code.header_value());
    trailers.insert(GRPC_MESSAGE, encode_message(message));
    trailers
}

/// The message of a generated response's `grpc-message`: short, and nothing internal.
pub(crate) fn message(outcome: &Outcome) -> String {
    match outcome {
        Outcome::ResponseTimeout { timeout, .. } => {
            format!(
                "tower-timeouts: no response within {} ms",
                timeout.as_millis()
            )
        }
        Outcome::DeadlineExceeded { .. } => {
            "tower-timeouts: the deadline passed before the upstream call was sent".to_owned()
        }
        Outcome::ServerShutdown { .. } => "tower-timeouts: the server is shutting down".to_owned(),
        Outcome::RequestBodyTimeout { timeout, .. } => format!(
            "tower-timeouts: the request body did not arrive within {} ms",
            timeout.as_millis()
        ),
        Outcome::ResponseBodyTimeout { timeout, .. } => format!(
            "tower-timeouts: the response stream passed its {} ms limit",
            timeout.as_millis()
        ),
        Outcome::ConnectTimeout { .. } => {
            "tower-timeouts: upstream connect timed out (connection_timeout)".to_owned()
        }
        Outcome::ConnectFailed { error, .. } => {
            format!("tower-timeouts: upstream connect failed ({error})")
        }
        Outcome::UpstreamFailed { error, .. } => {
            format!("tower-timeouts: upstream failed ({error})")
        }
        other => format!("tower-timeouts: {}", other.kind()),
    }
}

/// `rpc.method`: the fully-qualified method of a gRPC path, `package.Service/Method`.
pub(crate) fn rpc_method(path: &str) -> &str {
    path.strip_prefix('/').unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_by_the_spec() {
        let cases: [(&[u8], Duration); 8] = [
            (b"0n", Duration::ZERO),
            (b"1H", Duration::from_secs(3600)),
            (b"2M", Duration::from_secs(120)),
            (b"3S", Duration::from_secs(3)),
            (b"250m", Duration::from_millis(250)),
            (b"7u", Duration::from_micros(7)),
            (b"99999999n", Duration::from_nanos(99_999_999)),
            (b"99999999H", Duration::from_secs(99_999_999 * 3600)),
        ];
        for (value, expected) in cases {
            assert_eq!(parse_timeout(value), Ok(expected), "{value:?}");
        }
    }

    #[test]
    fn every_malformed_form_is_rejected() {
        let malformed: [&[u8]; 16] = [
            b"",
            b"S",
            b"1",
            b"123456789S",
            b"+1S",
            b"-1S",
            b" 1S",
            b"1S ",
            b"1 S",
            b"1s",
            b"1h",
            b"1x",
            b"1.5S",
            b"0x1S",
            b"1SS",
            "١S".as_bytes(),
        ];
        for value in malformed {
            assert_eq!(parse_timeout(value), Err(InvalidTimeout), "{value:?}");
        }
    }

    #[test]
    fn timeouts_encode_in_the_finest_unit_that_fits_rounded_up() {
        assert_eq!(encode_timeout(Duration::ZERO), "0n");
        assert_eq!(
            encode_timeout(Duration::from_nanos(99_999_999)),
            "99999999n"
        );
        assert_eq!(encode_timeout(Duration::from_nanos(100_000_001)), "100001u");
        assert_eq!(encode_timeout(Duration::from_secs(30)), "30000000u");
        assert_eq!(encode_timeout(Duration::from_secs(3600)), "3600000m");
        assert_eq!(encode_timeout(Duration::MAX), "99999999H");
    }

    /// A small, seeded generator: the same inputs on every run.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// The spec's grammar, written apart from the parser: `TimeoutValue TimeoutUnit`, with
    /// `TimeoutValue → {positive integer as ASCII string of at most 8 digits}`.
    fn oracle(value: &[u8]) -> Option<Duration> {
        let text = std::str::from_utf8(value).ok()?;
        let unit = text.chars().last()?;
        let digits = &text[..text.len() - unit.len_utf8()];
        if !(1..=8).contains(&digits.len()) || !digits.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let n: u64 = digits.parse().ok()?;
        let per_unit = match unit {
            'H' => Duration::from_secs(3600),
            'M' => Duration::from_secs(60),
            'S' => Duration::from_secs(1),
            'm' => Duration::from_millis(1),
            'u' => Duration::from_micros(1),
            'n' => Duration::from_nanos(1),
            _ => return None,
        };
        Some(per_unit * u32::try_from(n).ok()?)
    }

    /// A million inputs, most of them near the grammar (digits, units, signs, spaces, dots,
    /// other letters, high bytes), some of them random bytes: the parser never panics and
    /// agrees with the oracle on every one.
    #[test]
    fn a_million_inputs_parse_as_the_grammar_says_without_a_panic() {
        const ALPHABET: &[u8] =
            b"0123456789012345678901234567890123456789HMSmun+- .xsh\xc3\xa9\x00\xff";
        let mut random = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut accepted = 0;
        for _ in 0..1_000_000 {
            let len = random.below(12) as usize;
            let value: Vec<u8> = (0..len)
                .map(|_| match random.below(10) {
                    0 => random.next() as u8,
                    _ => ALPHABET[random.below(ALPHABET.len() as u64) as usize],
                })
                .collect();
            let parsed = parse_timeout(&value).ok();
            assert_eq!(parsed, oracle(&value), "{value:?}");
            accepted += usize::from(parsed.is_some());
        }
        // The inputs cover both sides of the grammar.
        assert!(accepted > 10_000, "only {accepted} valid inputs");
    }

    /// Encoding then parsing gives the value back, rounded up to the unit it was sent in: never
    /// less than it, and less than one unit more.
    #[test]
    fn encode_then_parse_gives_the_value_back_rounded_up() {
        let mut random = XorShift(0x2545_f491_4f6c_dd1d);
        for i in 0..1_000_000u64 {
            // Every scale, from nanoseconds to beyond what 8 digits of hours hold.
            let timeout = Duration::from_nanos(random.next() >> random.below(64))
                + Duration::from_secs(if i % 1000 == 0 {
                    random.next() >> 20
                } else {
                    0
                });
            let value = encode_timeout(timeout);
            let bytes = value.as_bytes();
            assert!(bytes.len() <= 9, "{value:?}");
            let parsed = parse_timeout(bytes).expect("what is encoded parses");
            let unit = match bytes[bytes.len() - 1] {
                b'n' => Duration::from_nanos(1),
                b'u' => Duration::from_micros(1),
                b'm' => Duration::from_millis(1),
                b'S' => Duration::from_secs(1),
                b'M' => Duration::from_secs(60),
                _ => Duration::from_secs(3600),
            };
            if value == "99999999H" {
                assert!(timeout >= parsed - unit, "{timeout:?} as {value:?}");
                continue;
            }
            assert!(parsed >= timeout, "{timeout:?} as {value:?}");
            assert!(parsed - timeout < unit, "{timeout:?} as {value:?}");
        }
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(encode_message("a b:c"), "a b:c");
        assert_eq!(encode_message("100%"), "100%25");
        assert_eq!(encode_message("é\n"), "%C3%A9%0A");
    }

    #[test]
    fn status_headers() {
        let parse = |s: &'static str| GrpcCode::from_header(&HeaderValue::from_static(s));
        assert_eq!(parse("4"), Some(GrpcCode::DEADLINE_EXCEEDED));
        assert_eq!(parse("14"), Some(GrpcCode::UNAVAILABLE));
        assert_eq!(parse(""), None);
        assert_eq!(parse("+4"), None);
        assert_eq!(parse("256"), None);
        for n in 0..=255u8 {
            let code = GrpcCode::from_u8(n);
            assert_eq!(GrpcCode::from_header(&code.header_value()), Some(code));
        }
    }
}
