//! Turning sources into a snapshot: merge and validation (DESIGN.md §6).

pub mod merge;

pub use merge::{Conflict, Merged, merge};
