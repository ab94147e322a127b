//! Pieces shared by the unit tests.

use std::sync::{Arc, Mutex};

use crate::outcome::Outcome;
use crate::record::Report;

/// Collects the outcomes the hook is told.
#[derive(Clone, Default)]
pub(crate) struct Outcomes(Arc<Mutex<Vec<Outcome>>>);

impl Outcomes {
    pub(crate) fn hook(&self) -> impl Fn(&Report<'_>) + Send + Sync + 'static {
        let outcomes = self.0.clone();
        move |report: &Report<'_>| outcomes.lock().unwrap().push(report.outcome().clone())
    }

    pub(crate) fn all(&self) -> Vec<Outcome> {
        self.0.lock().unwrap().clone()
    }

    /// The one outcome recorded; panics unless exactly one was.
    pub(crate) fn one(&self) -> Outcome {
        let all = self.all();
        assert_eq!(all.len(), 1, "expected exactly one outcome, got {all:?}");
        all.into_iter().next().unwrap()
    }
}
