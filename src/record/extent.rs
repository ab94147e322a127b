//! What the crate's layers are doing on this thread right now: the dynamic extent of a call, a
//! poll, or a drop of what a layer wraps.
//!
//! A future or body learns why it is dropped from the extent its drop runs in. Drops are
//! synchronous: when a layer drops its inner future, every future inside is dropped within that
//! one call, on this thread, before it returns. So a value set for the duration of the call
//! reaches exactly the drops it causes, and nothing else; no handle has to be carried from the
//! layer that drops to the layers that are dropped (which may be separated by any number of
//! layers that are not the crate's).
//!
//! The extent is also how a layer tells a request that a handler makes while the crate's layers
//! call or poll another one (an upstream call) from the request they are serving.

use std::cell::Cell;

/// What the crate's innermost active layer on this thread is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Extent {
    /// None of the crate's layers is calling, polling or dropping anything here.
    Idle,
    /// A layer is calling its inner service.
    Calling,
    /// A layer is polling its inner future or body.
    Polling,
    /// A layer drops what it wraps because its own caller dropped it, and nothing of the
    /// crate's caused that: the server dropped the request, so its client left.
    ServerDropped,
    /// A layer drops what it wraps for a reason of its own (its limit fired, the inner future
    /// panicked), or its caller dropped it while one of the crate's layers was polling (a layer
    /// between them gave up on it): not a client leaving.
    Abandoned,
    /// A layer drops what it wraps because the server is shutting down (a
    /// [`ShutdownLayer`](crate::ShutdownLayer) whose grace ran out): not a client leaving.
    ShutDown,
}

thread_local! {
    static EXTENT: Cell<Extent> = const { Cell::new(Extent::Idle) };
}

/// The extent on this thread.
#[inline]
pub(crate) fn current() -> Extent {
    EXTENT.with(Cell::get)
}

/// Why a future or body that is dropped before its end is dropped, from the extent its drop
/// runs in. `panicked` is whether it was dropped in the middle of its own poll (that poll
/// panicked).
#[inline]
pub(crate) fn drop_reason(panicked: bool) -> Extent {
    if panicked {
        return Extent::Abandoned;
    }
    match current() {
        // Dropped by something that is not the crate's, outside all of the crate's layers:
        // the server. Or within the drop of the server's request.
        Extent::Idle | Extent::ServerDropped => Extent::ServerDropped,
        Extent::Calling | Extent::Polling | Extent::Abandoned => Extent::Abandoned,
        Extent::ShutDown => Extent::ShutDown,
    }
}

/// Sets the extent until dropped (also by a panic), then restores the one it replaced.
#[must_use]
pub(crate) struct Guard {
    outer: Extent,
}

/// Enters `extent` on this thread.
#[inline(always)]
pub(crate) fn enter(extent: Extent) -> Guard {
    Guard {
        outer: EXTENT.with(|cell| cell.replace(extent)),
    }
}

impl Drop for Guard {
    #[inline(always)]
    fn drop(&mut self) {
        EXTENT.with(|cell| cell.set(self.outer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drop_outside_the_crate_is_the_server() {
        assert_eq!(drop_reason(false), Extent::ServerDropped);
        let _dropping = enter(Extent::ServerDropped);
        assert_eq!(drop_reason(false), Extent::ServerDropped);
    }

    #[test]
    fn a_drop_while_a_layer_polls_or_gives_up_is_not() {
        for extent in [Extent::Calling, Extent::Polling, Extent::Abandoned] {
            let _guard = enter(extent);
            assert_eq!(drop_reason(false), Extent::Abandoned, "{extent:?}");
        }
        assert_eq!(drop_reason(true), Extent::Abandoned, "a panicked poll");
    }

    #[test]
    fn extents_nest_and_restore_even_on_panic() {
        let outer = enter(Extent::Polling);
        let result = std::panic::catch_unwind(|| {
            let _inner = enter(Extent::Abandoned);
            assert_eq!(current(), Extent::Abandoned);
            panic!("inside");
        });
        assert!(result.is_err());
        assert_eq!(current(), Extent::Polling);
        drop(outer);
        assert_eq!(current(), Extent::Idle);
    }
}
