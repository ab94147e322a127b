//! Deadlines: a request's own limit, the caller's deadline (`grpc-timeout`), and the one in
//! force while a request is served, for the calls its handler makes.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use tower_timeouts::Deadline;
//!
//! async fn handler() -> String {
//!     // The deadline in force: the earliest of the limits of the crate's layers on the
//!     // request and of the caller's `grpc-timeout`. `None` outside such a request.
//!     match Deadline::current() {
//!         Some(deadline) => format!("{} ms left", deadline.remaining().as_millis()),
//!         None => "no deadline".to_owned(),
//!     }
//! }
//!
//! let mut request = http::Request::new(());
//! // This request may take 30 s, whatever the layers' limit.
//! request.extensions_mut().insert(Deadline::after(Duration::from_secs(30)));
//! # let _ = handler;
//! ```
//!
//! # Where a request's deadline comes from
//!
//! A [`ResponseTimeout`](crate::ResponseTimeout) gives up at the earliest of:
//! - its own limit, or the [`Deadline`] a user put into the request's extensions with
//!   [`Deadline::after`] or [`Deadline::at`], which replaces that limit, longer or shorter;
//! - the caller's deadline, for a gRPC request: `grpc-timeout`, minus the layer's
//!   [margin](crate::ResponseTimeoutLayer::deadline_margin). A caller can shorten the
//!   request's time, never lengthen it. A malformed `grpc-timeout` is ignored and recorded on
//!   the span (`tower_timeouts.budget_invalid`). On plain HTTP, a header the user names, in
//!   milliseconds ([`deadline_header`](crate::ResponseTimeoutLayer::deadline_header)), off by
//!   default;
//! - the deadline in force that a layer put into the request's extensions: an outer layer's
//!   that honoured the caller's deadline, or, on an upstream call, a
//!   [`PropagateDeadline`](crate::PropagateDeadline)'s (what is left of the served request's
//!   deadline).
//!
//! A layer that times out at a deadline in force reports the limit it stands for (the
//! caller's `grpc-timeout` less the margin, what an upstream call was sent with), so that two
//! layers on one request report the same limit whichever fires.
//!
//! Trust: a caller's deadline can only shorten the time a request gets, so the worst a caller
//! can do with it is give up early on its own request. Accept a plain-HTTP deadline header only
//! from callers you would let cancel their own requests, and strip it at the edge otherwise.
//!
//! # Where a handler finds it
//!
//! - [`Deadline::current`], while the layer polls the handler's future (and calls the inner
//!   service). It is not there in a task the handler spawns: carry it in with
//!   [`Deadline::scope`] or [`carry`].
//! - In the request's extensions, as a [`Deadline`] at an absolute instant, when the caller
//!   sent one (`grpc-timeout` or the configured header).
//! - With the `axum` feature, as an extractor (`Deadline`, which fails with 500 outside the
//!   layer, or `Option<Deadline>`).
//!
//! # Passing it downstream
//!
//! A [`PropagateDeadlineLayer`](crate::PropagateDeadlineLayer) on a client sends what is left
//! of it with each upstream call (`grpc-timeout`, or a header), and shortens the call's own
//! limits to it. See [`propagate`](crate::propagate).

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Instant;

/// A request's deadline.
///
/// Made by a user with [`Deadline::after`] or [`Deadline::at`] and put into a request's
/// extensions, it replaces the limit of the crate's [`ResponseTimeout`](crate::ResponseTimeout)
/// layers for that request (longer or shorter; a caller's `grpc-timeout` still caps it).
/// [`Deadline::current`] and the one a layer puts into the extensions are the deadline in
/// force, at an absolute instant (`tokio::time::Instant`, so paused-time tests work).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline {
    kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    After(Duration),
    At(Instant),
    /// Set by the crate (the deadline in force): it caps the limits of the layers that find
    /// it, where a user's deadline replaces them. `limit` is the limit it stands for (what a
    /// layer that times out at it reports).
    InForce {
        at: Instant,
        limit: Duration,
    },
}

impl Deadline {
    /// A limit of `timeout` from when the layer gets the request, in place of the layer's.
    pub const fn after(timeout: Duration) -> Self {
        Deadline {
            kind: Kind::After(timeout),
        }
    }

    /// A limit at `deadline`, in place of the layer's.
    pub const fn at(deadline: Instant) -> Self {
        Deadline {
            kind: Kind::At(deadline),
        }
    }

    /// The deadline in force at `at`, standing for a limit of `limit`, as the crate's layers
    /// make it.
    pub(crate) const fn in_force(at: Instant, limit: Duration) -> Self {
        Deadline {
            kind: Kind::InForce { at, limit },
        }
    }

    /// The time left: to the instant, for a deadline at one (zero once it has passed); the
    /// whole limit, for one made with [`Deadline::after`].
    pub fn remaining(&self) -> Duration {
        match self.kind {
            Kind::After(timeout) => timeout,
            Kind::At(at) | Kind::InForce { at, .. } => at.saturating_duration_since(Instant::now()),
        }
    }

    /// The instant, for a deadline at one.
    pub fn instant(&self) -> Option<Instant> {
        match self.kind {
            Kind::At(at) | Kind::InForce { at, .. } => Some(at),
            Kind::After(_) => None,
        }
    }

    /// The instant from `now`: `None` beyond the clock's range.
    pub(crate) fn instant_from(&self, now: Instant) -> Option<Instant> {
        match self.kind {
            Kind::After(timeout) => now.checked_add(timeout),
            Kind::At(at) | Kind::InForce { at, .. } => Some(at),
        }
    }

    /// For the deadline in force (set by the crate, not a user): its instant, and the limit
    /// it stands for.
    pub(crate) fn in_force_parts(&self) -> Option<(Instant, Duration)> {
        match self.kind {
            Kind::InForce { at, limit } => Some((at, limit)),
            Kind::After(_) | Kind::At(_) => None,
        }
    }

    /// The deadline in force: set while a [`ResponseTimeout`](crate::ResponseTimeout) calls
    /// its inner service or polls its future (the earliest, when several are on the request),
    /// and inside [`Deadline::scope`].
    pub fn current() -> Option<Deadline> {
        let at = current_instant()?;
        Some(Deadline::in_force(
            at,
            at.saturating_duration_since(Instant::now()),
        ))
    }

    /// Runs `future` with this deadline in force (capped by the one in force when polled, if
    /// earlier): for work a handler spawns, so that the upstream calls it makes get the
    /// request's deadline.
    ///
    /// ```
    /// use tower_timeouts::Deadline;
    ///
    /// async fn handler() {
    ///     if let Some(deadline) = Deadline::current() {
    ///         tokio::spawn(deadline.scope(async {
    ///             // Upstream calls made here get what is left of the request's deadline.
    ///         }));
    ///     }
    /// }
    /// # let _ = handler;
    /// ```
    pub fn scope<F: Future>(self, future: F) -> Scoped<F> {
        Scoped {
            deadline: self.instant_from(Instant::now()),
            future,
        }
    }
}

/// Runs `future` with the deadline in force now (if any) in force: [`Deadline::scope`] of
/// [`Deadline::current`], for `tokio::spawn(carry(async { … }))`.
pub fn carry<F: Future>(future: F) -> Scoped<F> {
    Scoped {
        deadline: current_instant(),
        future,
    }
}

pin_project! {
    /// A future run with a deadline in force; see [`Deadline::scope`] and [`carry`].
    #[derive(Debug)]
    pub struct Scoped<F> {
        deadline: Option<Instant>,
        #[pin]
        future: F,
    }
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _scope = enter(When::At(*this.deadline));
        this.future.poll(cx)
    }
}

/// When a layer's deadline is: at an instant (`None`: beyond the clock's range), or a limit
/// from the first poll that finds the response not ready, not yet armed (so that a response
/// ready at once costs no clock read). While not armed, the deadline in force it stands for is
/// the limit from now: at most the time of one poll earlier than the one that will be armed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum When {
    At(Option<Instant>),
    After(Duration),
}

/// The deadlines in force on a thread, as entered: the earliest instant, and the shortest limit
/// from now. Kept apart so that entering one reads no clock.
#[derive(Clone, Copy, Debug, Default)]
struct Scope {
    at: Option<Instant>,
    after: Option<Duration>,
}

impl Scope {
    #[inline(always)]
    fn with(self, when: When) -> Self {
        match when {
            When::At(at) => Scope {
                at: earliest(self.at, at),
                ..self
            },
            When::After(after) => Scope {
                after: Some(self.after.map_or(after, |outer| outer.min(after))),
                ..self
            },
        }
    }

    /// The earliest deadline in force, as an instant.
    fn resolve(self) -> Option<Instant> {
        let after = self
            .after
            .and_then(|after| Instant::now().checked_add(after));
        earliest(self.at, after)
    }
}

/// The earlier of two deadlines, `None` standing for none.
#[inline(always)]
pub(crate) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

thread_local! {
    /// The deadline in force on this thread, while a layer calls or polls.
    static CURRENT: Cell<Scope> = const { Cell::new(Scope { at: None, after: None }) };
    /// The deadline of the upstream call a [`PropagateDeadline`](crate::PropagateDeadline)
    /// makes, while it calls or polls: what a `ConnectTimeout` is shortened to. Apart from
    /// [`CURRENT`] so that only that opt-in layer shortens connects.
    static CALL: Cell<Scope> = const { Cell::new(Scope { at: None, after: None }) };
}

/// The deadline in force on this thread now.
#[inline]
pub(crate) fn current_instant() -> Option<Instant> {
    CURRENT.get().resolve()
}

/// The deadline of the upstream call being made on this thread now, if a
/// [`PropagateDeadline`](crate::PropagateDeadline) makes it.
#[inline]
pub(crate) fn call_instant() -> Option<Instant> {
    CALL.get().resolve()
}

/// Puts `deadline` in force (the earlier of it and the one in force already) until dropped.
#[inline(always)]
pub(crate) fn enter(deadline: When) -> ScopeGuard {
    ScopeGuard::enter(&CURRENT, deadline)
}

/// Puts `deadline` in force for an upstream call (see [`call_instant`]) until dropped.
#[inline]
pub(crate) fn enter_call(deadline: Option<Instant>) -> ScopeGuard {
    ScopeGuard::enter(&CALL, When::At(deadline))
}

/// Restores the deadline in force before [`enter`].
pub(crate) struct ScopeGuard {
    slot: &'static std::thread::LocalKey<Cell<Scope>>,
    outer: Scope,
}

impl ScopeGuard {
    #[inline(always)]
    fn enter(slot: &'static std::thread::LocalKey<Cell<Scope>>, deadline: When) -> Self {
        let outer = slot.get();
        slot.set(outer.with(deadline));
        ScopeGuard { slot, outer }
    }
}

impl Drop for ScopeGuard {
    #[inline(always)]
    fn drop(&mut self) {
        self.slot.set(self.outer);
    }
}

/// Parses a deadline header in milliseconds: 1 to 8 ASCII digits, nothing else (the rules of
/// `grpc-timeout` without its unit).
pub(crate) fn parse_millis(value: &[u8]) -> Option<Duration> {
    if value.is_empty() || value.len() > 8 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let ms = value
        .iter()
        .fold(0u64, |n, digit| n * 10 + u64::from(digit - b'0'));
    Some(Duration::from_millis(ms))
}

#[cfg(feature = "axum")]
mod extract {
    use super::Deadline;
    use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
    use http::request::Parts;
    use http::StatusCode;
    use std::convert::Infallible;

    fn find(parts: &Parts) -> Option<Deadline> {
        Deadline::current().or_else(|| parts.extensions.get::<Deadline>().copied())
    }

    /// Extracts the deadline in force; fails with 500 when no layer of the crate applies one.
    impl<S: Send + Sync> FromRequestParts<S> for Deadline {
        type Rejection = (StatusCode, &'static str);

        async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
            find(parts).ok_or((
                StatusCode::INTERNAL_SERVER_ERROR,
                "Deadline needs tower_timeouts::ResponseTimeoutLayer around the route",
            ))
        }
    }

    /// Extracts the deadline in force, `None` when no layer of the crate applies one.
    impl<S: Send + Sync> OptionalFromRequestParts<S> for Deadline {
        type Rejection = Infallible;

        async fn from_request_parts(
            parts: &mut Parts,
            _: &S,
        ) -> Result<Option<Self>, Self::Rejection> {
            Ok(find(parts))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn scopes_nest_to_the_earliest_and_restore() {
        let now = Instant::now();
        assert_eq!(Deadline::current(), None);
        {
            let _outer = enter(When::At(Some(now + Duration::from_secs(5))));
            {
                let _later = enter(When::At(Some(now + Duration::from_secs(9))));
                assert_eq!(current_instant(), Some(now + Duration::from_secs(5)));
                let _limit = enter(When::After(Duration::from_secs(3)));
                assert_eq!(current_instant(), Some(now + Duration::from_secs(3)));
                let _earlier = enter(When::At(Some(now + Duration::from_secs(1))));
                assert_eq!(current_instant(), Some(now + Duration::from_secs(1)));
            }
            assert_eq!(
                Deadline::current().unwrap().remaining(),
                Duration::from_secs(5)
            );
        }
        assert_eq!(Deadline::current(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn carried_into_a_spawned_task() {
        let at = Instant::now() + Duration::from_secs(2);
        let task = {
            let _scope = enter(When::At(Some(at)));
            tokio::spawn(carry(async { Deadline::current() }))
        };
        let carried = task.await.unwrap().unwrap();
        assert_eq!(carried.instant(), Some(at));
        let bare = tokio::spawn(async { Deadline::current() });
        assert_eq!(bare.await.unwrap(), None);
    }

    #[test]
    fn millisecond_headers() {
        assert_eq!(parse_millis(b"250"), Some(Duration::from_millis(250)));
        assert_eq!(parse_millis(b"0"), Some(Duration::ZERO));
        for bad in [&b""[..], b"+1", b"1 ", b"123456789", b"1m", b"-5"] {
            assert_eq!(parse_millis(bad), None, "{bad:?}");
        }
    }
}
