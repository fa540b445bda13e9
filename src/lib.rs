//! rcptgate: recipient validation for SMTP gateways.
//!
//! The whole recipient directory lives in memory as an immutable FST [`directory::Snapshot`];
//! [`directory::Directory::lookup`] answers a [`directory::Verdict`] for an RCPT address
//! without locks and, for ASCII addresses, without allocation. Sources (map files, Postfix
//! tables, CSV, LDIF) are parsed in [`sources`], merged and validated in [`sync`], and built
//! into a snapshot that is persisted and memory-mapped.

pub mod address;
pub mod config;
pub mod directory;
pub mod sources;
pub mod sync;

/// Entry points for the fuzz targets (not a stable API).
#[doc(hidden)]
pub mod internal;
pub mod proto;
pub mod server;

pub use directory::{Directory, Kind, Snapshot, Verdict};
