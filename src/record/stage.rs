//! The life of one request's recording, as the layer that records it sees it: a state machine
//! with no tracing and no hook in it, so that it can be tested alone.
//!
//! ```text
//!            head passes, body not followed            ┌──────┐
//!   ┌──────┬──────────────────────────────────────────▶│ Done │◀─┐
//!   │ Open │  error, panic, dropped before the head    └──────┘  │ end of body, error, panic,
//!   └──────┴─┐                                                   │ dropped before the end
//!            │ head passes, body followed   ┌───────────────┐    │
//!            └─────────────────────────────▶│ Body(head)    │────┘
//!                                           └───────────────┘
//! ```
//!
//! Every transition into `Done` yields the outcome to record; nothing leaves `Done`, which is
//! what makes "recorded once" hold however futures and bodies are dropped.

use http::StatusCode;

use super::extent::Extent;
use crate::outcome::{Outcome, Phase};

/// Where a request's recording is.
#[derive(Debug)]
pub(crate) enum Stage {
    /// Before the response head passed the recording layer.
    Open,
    /// The head passed; the outcome waits for the end of the body. Holds the head's outcome.
    Body(Outcome),
    /// Recorded.
    Done,
}

impl Stage {
    /// The response head (the inner service's, or one a layer generated) passed the recording
    /// layer with `outcome`. Recorded at once unless the body is followed (a layer on the request
    /// watches for clients that leave during the body).
    pub(crate) fn head(&mut self, outcome: Outcome, follow_body: bool) -> Option<Outcome> {
        if !matches!(self, Stage::Open) {
            return None;
        }
        if follow_body {
            *self = Stage::Body(outcome);
            return None;
        }
        *self = Stage::Done;
        Some(outcome)
    }

    /// The body reached its end: the head's outcome is the request's.
    pub(crate) fn body_end(&mut self) -> Option<Outcome> {
        match std::mem::replace(self, Stage::Done) {
            Stage::Body(head) => Some(head),
            other => {
                *self = other;
                None
            }
        }
    }

    /// The exchange ended in a way that has its own outcome (an error, a panic), unless it
    /// ended already.
    pub(crate) fn end(&mut self, outcome: Outcome) -> Option<Outcome> {
        match std::mem::replace(self, Stage::Done) {
            Stage::Done => None,
            Stage::Open | Stage::Body(_) => Some(outcome),
        }
    }

    /// What was following the exchange (the response future before the head, the body after
    /// it) was dropped before its end, for `reason` (see [`Extent`]). It is a client that left
    /// when the server dropped it and a layer on the request watches for that; before the head
    /// without such a layer, the drop can't be told from any other ([`Outcome::Dropped`]).
    /// `sent` is the status and the body bytes that went out, after the head.
    pub(crate) fn dropped(
        &mut self,
        reason: Extent,
        watches_disconnects: bool,
        sent: Option<(StatusCode, u64)>,
    ) -> Option<Outcome> {
        let client_left = reason == Extent::ServerDropped && watches_disconnects;
        let shut_down = reason == Extent::ShutDown;
        match std::mem::replace(self, Stage::Done) {
            Stage::Done => None,
            Stage::Open if shut_down => Some(Outcome::server_shutdown(Phase::BeforeHead, None, 0)),
            Stage::Open if client_left => {
                Some(Outcome::client_disconnected(Phase::BeforeHead, None, 0))
            }
            Stage::Open => Some(Outcome::dropped()),
            Stage::Body(head) => Some(match (client_left, sent) {
                (_, Some((status, bytes))) if shut_down => {
                    Outcome::server_shutdown(Phase::DuringBody, Some(status), bytes)
                }
                (true, Some((status, bytes))) => {
                    Outcome::client_disconnected(Phase::DuringBody, Some(status), bytes)
                }
                // Cut by a layer's own decision: the head's outcome stands.
                _ => head,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn timeout() -> Outcome {
        Outcome::response_timeout(Duration::from_secs(1), StatusCode::GATEWAY_TIMEOUT)
    }

    #[test]
    fn a_head_not_followed_is_recorded_at_once_and_only_once() {
        let mut stage = Stage::Open;
        assert_eq!(stage.head(timeout(), false), Some(timeout()));
        assert_eq!(stage.head(Outcome::completed(StatusCode::OK), false), None);
        assert_eq!(stage.end(Outcome::failed(Phase::BeforeHead, None)), None);
        assert_eq!(stage.dropped(Extent::ServerDropped, true, None), None);
        assert_eq!(stage.body_end(), None);
    }

    #[test]
    fn a_followed_head_waits_for_the_end_of_the_body() {
        let mut stage = Stage::Open;
        let ok = Outcome::completed(StatusCode::OK);
        assert_eq!(stage.head(ok.clone(), true), None);
        assert_eq!(stage.body_end(), Some(ok));
        assert_eq!(stage.body_end(), None);
        assert_eq!(
            stage.dropped(Extent::ServerDropped, true, Some((StatusCode::OK, 3))),
            None
        );
    }

    #[test]
    fn dropped_before_the_head_by_the_server_is_a_client_that_left_only_if_watched() {
        let mut watched = Stage::Open;
        assert_eq!(
            watched.dropped(Extent::ServerDropped, true, None),
            Some(Outcome::client_disconnected(Phase::BeforeHead, None, 0))
        );
        let mut unwatched = Stage::Open;
        assert_eq!(
            unwatched.dropped(Extent::ServerDropped, false, None),
            Some(Outcome::dropped())
        );
    }

    #[test]
    fn dropped_by_a_layers_own_decision_is_never_a_client_that_left() {
        let mut before_head = Stage::Open;
        assert_eq!(
            before_head.dropped(Extent::Abandoned, true, None),
            Some(Outcome::dropped())
        );
        let mut during_body = Stage::Open;
        during_body.head(Outcome::completed(StatusCode::OK), true);
        assert_eq!(
            during_body.dropped(Extent::Abandoned, true, Some((StatusCode::OK, 5))),
            Some(Outcome::completed(StatusCode::OK))
        );
    }

    #[test]
    fn dropped_during_the_body_keeps_the_sent_status_and_bytes() {
        let mut stage = Stage::Open;
        stage.head(Outcome::completed(StatusCode::CREATED), true);
        assert_eq!(
            stage.dropped(Extent::ServerDropped, true, Some((StatusCode::CREATED, 42))),
            Some(Outcome::client_disconnected(
                Phase::DuringBody,
                Some(StatusCode::CREATED),
                42
            ))
        );
    }

    #[test]
    fn errors_and_panics_end_it_before_or_during_the_body() {
        let mut before = Stage::Open;
        let failed = Outcome::failed(Phase::BeforeHead, None);
        assert_eq!(before.end(failed.clone()), Some(failed));

        let mut during = Stage::Open;
        during.head(Outcome::completed(StatusCode::OK), true);
        let panicked = Outcome::panicked(Phase::DuringBody, Some(StatusCode::OK));
        assert_eq!(during.end(panicked.clone()), Some(panicked));
        assert_eq!(during.body_end(), None);
    }
}
