use std::fmt;
use std::time::Duration;

/// The connection to the upstream was not established within the limit of a
/// [`ConnectTimeout`](super::ConnectTimeout).
///
/// Only the middleware makes it. Its `Display` names the limit, and the upstream's address
/// only when [`with_address_in_errors`](super::ConnectTimeoutLayer::with_address_in_errors)
/// asked for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectTimeoutError {
    timeout: Duration,
    address: Option<String>,
}

impl ConnectTimeoutError {
    pub(crate) fn new(timeout: Duration, address: Option<String>) -> Self {
        ConnectTimeoutError { timeout, address }
    }

    /// The limit that was exceeded.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The upstream's address, when the layer was asked to include it.
    pub fn address(&self) -> Option<&str> {
        self.address.as_deref()
    }
}

impl fmt::Display for ConnectTimeoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "connection not established within {:?}", self.timeout)?;
        if let Some(address) = &self.address {
            write!(f, " to {address}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConnectTimeoutError {}
