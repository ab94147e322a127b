//! Checks that the shared test support compiles.
mod common;
