//! rcptgate: recipient validation for SMTP gateways.
//!
//! The whole recipient directory lives in memory as an immutable FST [`Snapshot`]. A
//! [`Directory`] holds the snapshot in service; [`Directory::lookup`] answers an [`Answer`]
//! for an RCPT address — the [`Verdict`] (DESIGN.md §4) and, from the same generation, the
//! recipient's route, profile, owner and customer — without locks and, for ASCII addresses,
//! without allocation.
//!
//! A [`Service`] keeps the directory alive: started from a [`Config`] on your tokio runtime,
//! it loads the persisted snapshot, rebuilds when source files change, syncs LDAP sources on
//! their interval, applies the deletion guard and tombstones, and writes the audit log. Its
//! [`Handle`] gives the directory, `reload`, typed control operations and `shutdown`. The
//! `rcptgate serve` daemon is one user of it.
//!
//! ```no_run
//! use rcptgate::{Config, Service, Verdict};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let service = Service::start(Config::load("config/rcptgate.toml".as_ref())?).await?;
//! let answer = service.directory().lookup("alice@contoso.com");
//! match answer.verdict() {
//!     Verdict::Accept(_) => println!("250 via {}", answer.route().unwrap_or("default")),
//!     Verdict::NotOurs => println!("not ours: relay control decides"),
//!     v => println!("{} {}", v.code().unwrap_or(""), v.text()),
//! }
//! service.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! Uncertainty is never a permanent answer: with nothing loaded, or data older than
//! `max_age`, an unknown recipient gets a temporary failure ([`Tempfail`]); a reject only
//! comes from a loaded, fresh snapshot that says the address is unknown in a domain it owns.
//!
//! The library logs through `tracing` and never writes to standard error itself.
#![warn(missing_docs)]

pub mod address;
pub mod config;
pub mod dane;
pub mod directory;
pub mod sources;
pub mod sync;

/// Entry points for the fuzz targets and benchmarks (not a stable API).
#[doc(hidden)]
pub mod internal;
pub mod proto;
pub mod server;
pub mod service;

pub use config::Config;
pub use directory::{
    Answer, Directory, Hit, Kind, LookupOptions, Match, Reject, Snapshot, Tempfail, Verdict,
};
pub use service::{Handle, Service, ServiceError};

/// The README's Rust examples, compiled and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
