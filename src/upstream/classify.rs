//! Which outcome an upstream error is: the policy, apart from the mechanism that turns it into
//! a response.

use std::error::Error;
use std::io;

use http::StatusCode;

use super::Statuses;
use crate::connect_timeout::ConnectTimeoutError;
use crate::outcome::{Outcome, ProxyError};

/// Walks `error`'s `source()` chain for the most specific cause that can honestly be told.
///
/// The first match wins, outermost first: our [`ConnectTimeoutError`]; a hyper error (with the
/// `hyper` feature: the connection was made, the exchange failed); an `io::Error` from the
/// connector, by kind; a cause that says "dns error" (hyper-util's resolver). Anything else is
/// an upstream failure of type `proxy_internal_error`.
pub(crate) fn classify(error: &(dyn Error + 'static), statuses: &Statuses) -> Outcome {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(timeout) = error.downcast_ref::<ConnectTimeoutError>() {
            return Outcome::connect_timeout(Some(timeout.timeout()), statuses.connect_timeout());
        }
        #[cfg(feature = "hyper")]
        if let Some(error) = error.downcast_ref::<hyper::Error>() {
            let kind = if error.is_parse() || error.is_parse_status() || error.is_user() {
                ProxyError::HttpProtocolError
            } else {
                ProxyError::ConnectionTerminated
            };
            return Outcome::upstream_failed(kind, statuses.upstream_failed(kind));
        }
        if let Some(error) = error.downcast_ref::<io::Error>() {
            if let Some(outcome) = classify_io(error, statuses) {
                return outcome;
            }
        }
        if error.to_string() == "dns error" {
            let kind = ProxyError::DnsError;
            return Outcome::connect_failed(kind, statuses.connect_failed(kind));
        }
        cause = error.source();
    }
    let kind = ProxyError::ProxyInternalError;
    Outcome::upstream_failed(kind, statuses.upstream_failed(kind))
}

fn classify_io(error: &io::Error, statuses: &Statuses) -> Option<Outcome> {
    let kind = match error.kind() {
        io::ErrorKind::TimedOut => {
            return Some(Outcome::connect_timeout(None, statuses.connect_timeout()));
        }
        io::ErrorKind::ConnectionRefused => ProxyError::ConnectionRefused,
        io::ErrorKind::HostUnreachable
        | io::ErrorKind::NetworkUnreachable
        | io::ErrorKind::AddrNotAvailable => ProxyError::DestinationUnavailable,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof => {
            let kind = ProxyError::ConnectionTerminated;
            return Some(Outcome::upstream_failed(
                kind,
                statuses.upstream_failed(kind),
            ));
        }
        _ => return None,
    };
    Some(Outcome::connect_failed(kind, statuses.connect_failed(kind)))
}

impl Statuses {
    fn connect_timeout(&self) -> StatusCode {
        self.connect_timeout.unwrap_or(if self.rfc9209 {
            ProxyError::ConnectionTimeout.recommended_status()
        } else {
            crate::outcome::NETWORK_CONNECT_TIMEOUT
        })
    }

    fn connect_failed(&self, kind: ProxyError) -> StatusCode {
        self.connect_failed.unwrap_or(if self.rfc9209 {
            kind.recommended_status()
        } else {
            StatusCode::BAD_GATEWAY
        })
    }

    pub(super) fn upstream_failed(&self, kind: ProxyError) -> StatusCode {
        self.upstream_failed.unwrap_or(if self.rfc9209 {
            kind.recommended_status()
        } else {
            StatusCode::BAD_GATEWAY
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt;
    use std::time::Duration;

    /// An error that wraps another, like hyper-util's legacy `Error` and its `ConnectError`.
    #[derive(Debug)]
    struct Wrapped(&'static str, Box<dyn Error + Send + Sync>);

    impl fmt::Display for Wrapped {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for Wrapped {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&*self.1)
        }
    }

    fn wrapped(inner: impl Error + Send + Sync + 'static) -> Wrapped {
        Wrapped(
            "client error (Connect)",
            Box::new(Wrapped("tcp connect error", Box::new(inner))),
        )
    }

    #[test]
    fn connect_errors_anywhere_in_the_chain() {
        let statuses = Statuses::default();
        let timeout = ConnectTimeoutError::new(Duration::from_millis(100), None);
        assert_eq!(
            classify(&wrapped(timeout), &statuses),
            Outcome::connect_timeout(
                Some(Duration::from_millis(100)),
                StatusCode::from_u16(599).unwrap()
            )
        );
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(
            classify(&wrapped(refused), &statuses),
            Outcome::connect_failed(ProxyError::ConnectionRefused, StatusCode::BAD_GATEWAY)
        );
        let timed_out = io::Error::from(io::ErrorKind::TimedOut);
        assert_eq!(
            classify(&wrapped(timed_out), &statuses),
            Outcome::connect_timeout(None, StatusCode::from_u16(599).unwrap())
        );
        let unreachable = io::Error::from(io::ErrorKind::HostUnreachable);
        assert_eq!(
            classify(&wrapped(unreachable), &statuses),
            Outcome::connect_failed(ProxyError::DestinationUnavailable, StatusCode::BAD_GATEWAY)
        );
        let dns = Wrapped(
            "dns error",
            Box::new(io::Error::other("failed to lookup address information")),
        );
        assert_eq!(
            classify(&Wrapped("client error (Connect)", Box::new(dns)), &statuses),
            Outcome::connect_failed(ProxyError::DnsError, StatusCode::BAD_GATEWAY)
        );
        assert_eq!(
            classify(&io::Error::other("strange"), &statuses),
            Outcome::upstream_failed(ProxyError::ProxyInternalError, StatusCode::BAD_GATEWAY)
        );
    }

    #[test]
    fn rfc9209_statuses_and_overrides() {
        let strict = Statuses {
            rfc9209: true,
            ..Statuses::default()
        };
        let timeout = ConnectTimeoutError::new(Duration::from_millis(100), None);
        assert_eq!(
            classify(&timeout, &strict).sent_status(),
            Some(StatusCode::GATEWAY_TIMEOUT)
        );
        let unreachable = io::Error::from(io::ErrorKind::NetworkUnreachable);
        assert_eq!(
            classify(&unreachable, &strict).sent_status(),
            Some(StatusCode::SERVICE_UNAVAILABLE)
        );
        let custom = Statuses {
            connect_timeout: Some(StatusCode::SERVICE_UNAVAILABLE),
            ..Statuses::default()
        };
        assert_eq!(
            classify(&timeout, &custom).sent_status(),
            Some(StatusCode::SERVICE_UNAVAILABLE)
        );
    }
}
