//! The directory in service: an immutable [`Snapshot`] behind an `ArcSwap`, and the
//! [`Verdict`] every frontend renders (DESIGN.md §4).

mod build;
mod format;
mod snapshot;

use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::{ArcSwapOption, Guard};

pub use build::{
    BuildError, BuildInput, BuildStats, DomainSpec, Interner, NONE, RecordSpec, build, name_order,
};
pub use format::{Sec, SnapshotError, write_atomic};
pub use snapshot::{AddressCursor, DomainInfo, RecordInfo, Snapshot};

use crate::address::{AddrBuf, AddrError};

/// What kind of object an address belongs to. All but `CatchAll` are stored in the snapshot
/// (four bits); `CatchAll` only describes an accept-all domain answer. `Exception` is an
/// address that is never accepted (a lookup that finds it rejects).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Kind {
    User,
    Alias,
    Group,
    Shared,
    Contact,
    PublicFolder,
    Addition,
    Tombstone,
    Exception,
    CatchAll,
}

impl Kind {
    /// Bits of an FST value that hold the kind.
    pub(crate) const BITS: u32 = 4;

    /// Every stored kind, indexed by its code.
    pub const STORED: [Kind; 9] = [
        Kind::User,
        Kind::Alias,
        Kind::Group,
        Kind::Shared,
        Kind::Contact,
        Kind::PublicFolder,
        Kind::Addition,
        Kind::Tombstone,
        Kind::Exception,
    ];

    pub(crate) fn code(self) -> u64 {
        match self {
            Kind::User | Kind::CatchAll => 0,
            Kind::Alias => 1,
            Kind::Group => 2,
            Kind::Shared => 3,
            Kind::Contact => 4,
            Kind::PublicFolder => 5,
            Kind::Addition => 6,
            Kind::Tombstone => 7,
            Kind::Exception => 8,
        }
    }

    pub(crate) fn from_code(code: u64) -> Kind {
        let code = (code & ((1 << Self::BITS) - 1)) as usize;
        Kind::STORED.get(code).copied().unwrap_or(Kind::User)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::User => "user",
            Kind::Alias => "alias",
            Kind::Group => "group",
            Kind::Shared => "shared",
            Kind::Contact => "contact",
            Kind::PublicFolder => "public_folder",
            Kind::Addition => "addition",
            Kind::Tombstone => "tombstone",
            Kind::Exception => "exception",
            Kind::CatchAll => "catch_all",
        }
    }

    /// Parse the names used in map files, CSV and config (`kind=shared`).
    pub fn parse(s: &str) -> Option<Kind> {
        let k = match s.to_ascii_lowercase().as_str() {
            "user" | "mailbox" => Kind::User,
            "alias" => Kind::Alias,
            "group" | "distribution" | "dl" => Kind::Group,
            "shared" | "room" | "equipment" | "resource" => Kind::Shared,
            "contact" => Kind::Contact,
            "public_folder" | "publicfolder" => Kind::PublicFolder,
            "addition" => Kind::Addition,
            "tombstone" => Kind::Tombstone,
            "exception" => Kind::Exception,
            _ => return None,
        };
        Some(k)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an accepted address was matched (DESIGN.md §4 steps 4-6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    Exact,
    /// The address with its subaddress detail (`+tag`) removed.
    Subaddress,
    /// Nothing matched, but the domain accepts everything.
    AcceptAll,
}

/// A positive answer. Ids only (no strings), so a verdict is `Copy` and costs no allocation;
/// resolve names through the [`Snapshot`] of the same generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    pub kind: Kind,
    pub matched: Match,
    /// Length of the (folded) local part that matched: shorter than the query's for a
    /// subaddress match, 0 for an accept-all domain answer.
    pub local_len: u16,
    /// Domain index in the snapshot.
    pub domain: u32,
    /// Attribute set (profile, route) index in the snapshot.
    pub attrs: u32,
    /// Generation of the snapshot that answered.
    pub generation: u64,
}

/// Why a recipient is refused for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// A loaded snapshot says the address is unknown in a domain we own.
    UnknownUser,
    /// An exceptions source lists the address: never accepted, whatever else says so.
    Exception,
    /// Not a mailbox at all.
    Syntax(AddrError),
}

/// Why rcptgate cannot answer definitively right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tempfail {
    /// No snapshot has been loaded yet.
    NotLoaded,
    /// The sources have failed for longer than `max_age`: unknown addresses are deferred.
    Stale,
    /// Anything unexpected inside rcptgate.
    Internal,
}

/// The answer for one recipient (DESIGN.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept(Hit),
    Reject(Reject),
    /// The domain is not one of ours: frontends stay neutral.
    NotOurs,
    Tempfail(Tempfail),
}

impl Verdict {
    /// `accept`, `reject`, `tempfail` or `not_ours`.
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Accept(_) => "accept",
            Verdict::Reject(_) => "reject",
            Verdict::NotOurs => "not_ours",
            Verdict::Tempfail(_) => "tempfail",
        }
    }

    /// SMTP reply code and enhanced status code for the verdict; `None` when neutral.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            Verdict::Accept(_) => Some("250 2.1.5"),
            Verdict::Reject(Reject::UnknownUser | Reject::Exception) => Some("550 5.1.1"),
            Verdict::Reject(Reject::Syntax(_)) => Some("501 5.1.3"),
            Verdict::Tempfail(_) => Some("451 4.3.0"),
            Verdict::NotOurs => None,
        }
    }

    /// Default human text for the reply.
    pub fn text(&self) -> &'static str {
        match self {
            Verdict::Accept(_) => "Recipient ok",
            Verdict::Reject(Reject::UnknownUser | Reject::Exception) => "User unknown",
            Verdict::Reject(Reject::Syntax(_)) => "Bad recipient address syntax",
            Verdict::Tempfail(Tempfail::NotLoaded) => "Directory not loaded, try again later",
            Verdict::Tempfail(Tempfail::Stale) => "Directory out of date, try again later",
            Verdict::Tempfail(Tempfail::Internal) => "Temporary directory failure",
            Verdict::NotOurs => "Not a local domain",
        }
    }

    pub fn hit(&self) -> Option<&Hit> {
        match self {
            Verdict::Accept(h) => Some(h),
            _ => None,
        }
    }
}

/// One difference between two snapshots, as `local@domain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change<'a> {
    Added(&'a str),
    Removed(&'a str),
}

/// Every address added or removed from `old` to `new`, in (domain, local part) order, in one
/// streaming pass over both (no address set is held in memory).
pub fn diff(old: &Snapshot, new: &Snapshot, mut f: impl FnMut(Change<'_>)) {
    let (mut a, mut b) = (old.cursor(), new.cursor());
    let owned =
        |c: &mut AddressCursor<'_>| c.next_address().map(|(d, l)| (d.to_owned(), l.to_vec()));
    let (mut x, mut y) = (owned(&mut a), owned(&mut b));
    let show = |d: &str, l: &[u8]| format!("{}@{d}", String::from_utf8_lossy(l));
    loop {
        match (&x, &y) {
            (None, None) => break,
            (Some((d, l)), None) => {
                f(Change::Removed(&show(d, l)));
                x = owned(&mut a);
            }
            (None, Some((d, l))) => {
                f(Change::Added(&show(d, l)));
                y = owned(&mut b);
            }
            (Some(p), Some(q)) => match p.cmp(q) {
                std::cmp::Ordering::Equal => {
                    x = owned(&mut a);
                    y = owned(&mut b);
                }
                std::cmp::Ordering::Less => {
                    f(Change::Removed(&show(&p.0, &p.1)));
                    x = owned(&mut a);
                }
                std::cmp::Ordering::Greater => {
                    f(Change::Added(&show(&q.0, &q.1)));
                    y = owned(&mut b);
                }
            },
        }
    }
}

/// Lookup options that do not depend on the snapshot.
#[derive(Debug, Clone)]
pub struct LookupOptions {
    /// Subaddress separators (`+` by default; empty disables subaddressing).
    pub separators: Box<[u8]>,
}

impl Default for LookupOptions {
    fn default() -> Self {
        LookupOptions {
            separators: Box::from(&b"+"[..]),
        }
    }
}

/// The handle every frontend holds: the snapshot in service, swapped atomically.
///
/// `lookup` takes no lock: an `ArcSwap` guard load is a few nanoseconds even while the loader
/// publishes.
#[derive(Debug, Default)]
pub struct Directory {
    /// The snapshot in service; `None` until the first successful load.
    current: ArcSwapOption<Snapshot>,
    /// Set by the loader while sources have failed longer than `max_age` (§4 step 7).
    stale: AtomicBool,
    options: LookupOptions,
}

thread_local! {
    static BUF: RefCell<AddrBuf> = RefCell::new(AddrBuf::default());
}

impl Directory {
    pub fn new(options: LookupOptions) -> Directory {
        Directory {
            current: ArcSwapOption::const_empty(),
            stale: AtomicBool::new(false),
            options,
        }
    }

    /// Put `snapshot` in service; returns the one it replaces so the caller can drop it off
    /// the request path.
    pub fn publish(&self, snapshot: Arc<Snapshot>) -> Option<Arc<Snapshot>> {
        self.current.swap(Some(snapshot))
    }

    /// Mark the directory stale (or fresh again); see [`Tempfail::Stale`].
    pub fn set_stale(&self, stale: bool) {
        self.stale.store(stale, Ordering::Relaxed);
    }

    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }

    pub fn options(&self) -> &LookupOptions {
        &self.options
    }

    /// A consistent view of the snapshot in service, to resolve a [`Hit`] into names.
    pub fn view(&self) -> View<'_> {
        View {
            guard: self.current.load(),
            dir: self,
        }
    }

    /// Answer for one recipient, using a per-thread scratch buffer.
    pub fn lookup(&self, rcpt: &str) -> Verdict {
        BUF.with(|b| match b.try_borrow_mut() {
            Ok(mut buf) => self.lookup_in(rcpt, &mut buf),
            Err(_) => self.lookup_in(rcpt, &mut AddrBuf::default()),
        })
    }

    /// Answer for one recipient with a caller-owned scratch buffer.
    pub fn lookup_in(&self, rcpt: &str, buf: &mut AddrBuf) -> Verdict {
        let guard = self.current.load();
        verdict_for(guard.as_deref(), self, rcpt, buf)
    }
}

fn verdict_for(snap: Option<&Snapshot>, dir: &Directory, rcpt: &str, buf: &mut AddrBuf) -> Verdict {
    let Some(snap) = snap else {
        return Verdict::Tempfail(Tempfail::NotLoaded);
    };
    match snap.lookup(rcpt, &dir.options.separators, buf) {
        Verdict::Reject(Reject::UnknownUser) if dir.is_stale() => {
            Verdict::Tempfail(Tempfail::Stale)
        }
        v => v,
    }
}

/// A snapshot pinned for the duration of one request or command.
pub struct View<'d> {
    guard: Guard<Option<Arc<Snapshot>>>,
    dir: &'d Directory,
}

impl fmt::Debug for View<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("View")
            .field("generation", &self.snapshot().map(|s| s.generation()))
            .finish()
    }
}

impl View<'_> {
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.guard.as_deref()
    }

    pub fn lookup_in(&self, rcpt: &str, buf: &mut AddrBuf) -> Verdict {
        verdict_for(self.guard.as_deref(), self.dir, rcpt, buf)
    }
}
