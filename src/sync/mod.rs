//! Turning sources into a snapshot in service: merge and validation (DESIGN.md §6), and the
//! loader that rebuilds and publishes.

pub mod lifecycle;
pub mod loader;
pub mod merge;

pub use merge::{Conflict, Merged, merge};
