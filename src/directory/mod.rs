//! The directory in service: an immutable [`Snapshot`] behind an `ArcSwap`, and the
//! [`Verdict`] every frontend renders (DESIGN.md §4).

// Reachable from outside only through the hidden `internal` module (benchmarks).
mod arena;
#[allow(missing_docs)]
pub(crate) mod build;
pub mod explain;
pub(crate) mod filter;
mod format;
mod fstbuild;
pub mod segments;
mod snapshot;
mod walk;

use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwapOption, Guard};

pub use build::{BuildError, BuildStats};
pub(crate) use build::{
    BuildInput, DomainSpec, Interner, NONE, RecordSpec, build, name_order, split_by,
    split_by_customer,
};
pub(crate) use format::with_section;
pub use format::{Sec, SnapshotError, clean_temporaries, write_atomic};
pub use snapshot::{AddressCursor, DomainInfo, RecordInfo, Snapshot};
pub(crate) use walk::fuzz as fuzz_walk;

use crate::address::{AddrBuf, AddrError};

/// What kind of object an address belongs to. All but `CatchAll` are stored in the snapshot
/// (four bits); `CatchAll` only describes an accept-all domain answer. `Exception` is an
/// address that is never accepted (a lookup that finds it rejects).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Kind {
    /// A mailbox (its primary address).
    User,
    /// Another address of an object (owner set).
    Alias,
    /// A distribution or security group.
    Group,
    /// A shared, room or equipment mailbox.
    Shared,
    /// A mail contact (only when its domain is accepted).
    Contact,
    /// A public folder.
    PublicFolder,
    /// Listed by an additions source.
    Addition,
    /// Removed from the directory, still accepted during its grace period.
    Tombstone,
    /// Listed by an exceptions source: never accepted.
    Exception,
    /// No address matched in an accept-all domain.
    CatchAll,
    /// A reserved local part (`postmaster`, see [`LookupOptions::always_accept`]) the
    /// directory does not list; answered with the domain's defaults. Never stored.
    Reserved,
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
            Kind::User | Kind::CatchAll | Kind::Reserved => 0,
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

    /// The name used in output and config (`user`, `shared`, …).
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
            Kind::Reserved => "reserved",
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
    /// The address itself.
    Exact,
    /// The address with its subaddress detail (`+tag`) removed.
    Subaddress,
    /// Nothing matched, but the domain accepts everything.
    AcceptAll,
    /// Nothing matched, but the local part is reserved (`postmaster`).
    Reserved,
}

/// A positive answer. Ids only (no strings), so a verdict is `Copy` and costs no allocation;
/// resolve names through the [`Snapshot`] of the same generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    /// What kind of object accepted it.
    pub kind: Kind,
    /// How it matched.
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
    /// The recipient is ours: 250.
    Accept(Hit),
    /// The recipient is unknown or not a mailbox: 5xx.
    Reject(Reject),
    /// The domain is not one of ours: frontends stay neutral.
    NotOurs,
    /// rcptgate cannot answer definitively now: 4xx, never a bounce.
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

    /// The accepted record, if accepted.
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
    /// In the new snapshot only.
    Added(&'a str),
    /// In the old snapshot only.
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
    /// Local parts accepted in every domain we own, with the domain's route and profile,
    /// unless an exceptions source names the address (DESIGN.md §4 step 5). RFC 5321 §4.5.1
    /// makes `postmaster` a must; RFC 2142's `abuse` is a common addition. Compared
    /// case-insensitively.
    pub always_accept: Vec<String>,
}

impl Default for LookupOptions {
    fn default() -> Self {
        LookupOptions {
            separators: Box::from(&b"+"[..]),
            always_accept: vec!["postmaster".to_owned()],
        }
    }
}

impl LookupOptions {
    /// True when `local` (already folded) is one of [`Self::always_accept`].
    pub(crate) fn is_reserved(&self, local: &[u8]) -> bool {
        self.always_accept
            .iter()
            .any(|r| r.as_bytes().eq_ignore_ascii_case(local))
    }
}

/// The time in Unix seconds; injectable so tests (and embedders) can move it.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    })
}

/// The handle every frontend holds: the snapshot in service, swapped atomically, and the age
/// of its data.
///
/// Lookups take no lock: an `ArcSwap` guard load is a few nanoseconds even while the loader
/// publishes. A lookup that would reject an unknown address first checks the age of the data
/// (one clock read, on that path only): older than `max_age`, it answers
/// [`Tempfail::Stale`] instead, so a directory nobody refreshes can never bounce a new hire.
pub struct Directory {
    /// The snapshot in service; `None` until the first successful load.
    current: ArcSwapOption<Snapshot>,
    /// When the data in service was read (Unix seconds); `u64::MAX` = not known yet, so
    /// never stale on its own.
    data_time: AtomicU64,
    /// Seconds after `data_time` from which unknown addresses are deferred; 0 = never.
    max_age: AtomicU64,
    options: LookupOptions,
    clock: Clock,
}

impl fmt::Debug for Directory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Directory")
            .field(
                "generation",
                &self.current.load().as_deref().map(Snapshot::generation),
            )
            .field("data_time", &self.data_time.load(Ordering::Relaxed))
            .field("max_age", &self.max_age.load(Ordering::Relaxed))
            .field("options", &self.options)
            .finish()
    }
}

impl Default for Directory {
    fn default() -> Self {
        Directory::new(LookupOptions::default())
    }
}

thread_local! {
    static BUF: RefCell<AddrBuf> = const { RefCell::new(AddrBuf::new()) };
}

impl Directory {
    /// An empty directory (every lookup answers [`Tempfail::NotLoaded`]) with no `max_age`,
    /// on the system clock.
    pub fn new(options: LookupOptions) -> Directory {
        Directory::with_clock(options, system_clock())
    }

    /// Like [`Self::new`], with the clock `max_age` is measured on.
    pub fn with_clock(options: LookupOptions, clock: Clock) -> Directory {
        Directory {
            current: ArcSwapOption::const_empty(),
            data_time: AtomicU64::new(u64::MAX),
            max_age: AtomicU64::new(0),
            options,
            clock,
        }
    }

    /// Put `snapshot` in service; returns the one it replaces so the caller can drop it off
    /// the request path. The age of the data is not changed: see [`Self::set_data_time`].
    pub fn publish(&self, snapshot: Arc<Snapshot>) -> Option<Arc<Snapshot>> {
        self.current.swap(Some(snapshot))
    }

    /// Record when the data in service was read (Unix seconds). A build the deletion guard
    /// holds does not refresh it.
    pub fn set_data_time(&self, unix: u64) {
        self.data_time.store(unix, Ordering::Relaxed);
    }

    /// When the data in service was read, if known.
    pub fn data_time(&self) -> Option<u64> {
        Some(self.data_time.load(Ordering::Relaxed)).filter(|&t| t != u64::MAX)
    }

    /// After this long without fresh data, unknown addresses are deferred (`None`: never).
    pub fn set_max_age(&self, max_age: Option<Duration>) {
        let secs = max_age.map_or(0, |d| d.as_secs().max(1));
        self.max_age.store(secs, Ordering::Relaxed);
    }

    /// See [`Self::set_max_age`].
    pub fn max_age(&self) -> Option<Duration> {
        Some(self.max_age.load(Ordering::Relaxed))
            .filter(|&s| s > 0)
            .map(Duration::from_secs)
    }

    /// True when the data in service is older than `max_age` (§4 step 7).
    pub fn is_stale(&self) -> bool {
        let max = self.max_age.load(Ordering::Relaxed);
        let at = self.data_time.load(Ordering::Relaxed);
        max > 0 && at != u64::MAX && (self.clock)().saturating_sub(at) > max
    }

    /// The options lookups run with.
    pub fn options(&self) -> &LookupOptions {
        &self.options
    }

    /// The clock `max_age` is measured on.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The generation in service, if any.
    pub fn generation(&self) -> Option<u64> {
        self.current.load().as_deref().map(Snapshot::generation)
    }

    /// A consistent view of the snapshot in service, for several lookups against one
    /// generation.
    pub fn view(&self) -> View<'_> {
        View {
            guard: self.current.load(),
            dir: self,
        }
    }

    /// The answer for one recipient: its verdict, and the snapshot that gave it, so route,
    /// profile, owner and customer come from the same generation.
    ///
    /// ```
    /// # use rcptgate::{Directory, LookupOptions, Verdict};
    /// let dir = Directory::new(LookupOptions::default());
    /// // Nothing loaded yet: a temporary failure, never a reject.
    /// let answer = dir.lookup("alice@contoso.com");
    /// assert_eq!(answer.verdict().code(), Some("451 4.3.0"));
    /// assert_eq!(answer.route(), None);
    /// ```
    pub fn lookup(&self, rcpt: &str) -> Answer {
        let guard = self.current.load();
        let verdict = BUF.with(|b| match b.try_borrow_mut() {
            Ok(mut buf) => verdict_for(guard.as_deref(), self, rcpt, &mut buf),
            Err(_) => verdict_for(guard.as_deref(), self, rcpt, &mut AddrBuf::default()),
        });
        Answer { verdict, guard }
    }

    /// Only the verdict for one recipient (the cheapest call), using a per-thread scratch
    /// buffer. Resolve nothing against a later [`Self::view`]: use [`Self::lookup`] for that.
    pub fn verdict(&self, rcpt: &str) -> Verdict {
        BUF.with(|b| match b.try_borrow_mut() {
            Ok(mut buf) => self.verdict_in(rcpt, &mut buf),
            Err(_) => self.verdict_in(rcpt, &mut AddrBuf::default()),
        })
    }

    /// Only the verdict for one recipient, with a caller-owned scratch buffer.
    pub fn verdict_in(&self, rcpt: &str, buf: &mut AddrBuf) -> Verdict {
        let guard = self.current.load();
        verdict_for(guard.as_deref(), self, rcpt, buf)
    }
}

fn verdict_for(snap: Option<&Snapshot>, dir: &Directory, rcpt: &str, buf: &mut AddrBuf) -> Verdict {
    let Some(snap) = snap else {
        return Verdict::Tempfail(Tempfail::NotLoaded);
    };
    match snap.lookup(rcpt, &dir.options, buf) {
        Verdict::Reject(Reject::UnknownUser) if dir.is_stale() => {
            Verdict::Tempfail(Tempfail::Stale)
        }
        v => v,
    }
}

/// One recipient's answer, with the snapshot that gave it pinned: everything read from it
/// (route, profile, owner, customer) belongs to the same generation as the verdict.
pub struct Answer {
    verdict: Verdict,
    guard: Guard<Option<Arc<Snapshot>>>,
}

impl fmt::Debug for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Answer")
            .field("verdict", &self.verdict)
            .field("route", &self.route())
            .field("profile", &self.profile())
            .finish()
    }
}

impl Answer {
    /// The verdict (DESIGN.md §4).
    pub fn verdict(&self) -> Verdict {
        self.verdict
    }

    /// The accepted record's ids, if accepted.
    pub fn hit(&self) -> Option<&Hit> {
        self.verdict.hit()
    }

    /// The kind of object that accepted the address, if accepted.
    pub fn kind(&self) -> Option<Kind> {
        self.hit().map(|h| h.kind)
    }

    /// The snapshot that answered (`None` before the first load).
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.guard.as_deref()
    }

    /// Next hop for the accepted address (its own, else its owner's, else its domain's).
    pub fn route(&self) -> Option<&str> {
        self.snapshot()?.route(self.hit()?)
    }

    /// Profile of the accepted address (its own, else its owner's, else its domain's).
    pub fn profile(&self) -> Option<&str> {
        self.snapshot()?.profile(self.hit()?)
    }

    /// The customer the address's domain belongs to.
    pub fn customer(&self) -> Option<&str> {
        self.snapshot()?.customer(self.hit()?)
    }

    /// Generation of the snapshot that answered.
    pub fn generation(&self) -> Option<u64> {
        self.snapshot().map(Snapshot::generation)
    }

    /// Owner, origin and attributes of the accepted record, read from the snapshot's cold
    /// section (not on the hot path: it parses `rcpt` again). `rcpt` must be the address that
    /// was looked up.
    pub fn details(&self, rcpt: &str) -> Option<RecordInfo> {
        self.snapshot()?
            .record_info(rcpt, self.hit()?)
            .ok()
            .flatten()
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
    /// The pinned snapshot (`None` before the first load).
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.guard.as_deref()
    }

    /// The verdict for one recipient against the pinned snapshot.
    pub fn lookup_in(&self, rcpt: &str, buf: &mut AddrBuf) -> Verdict {
        verdict_for(self.guard.as_deref(), self.dir, rcpt, buf)
    }

    /// The verdict for a recipient as it came off the wire: bytes that are not UTF-8 are not
    /// a mailbox, which is a verdict (501) only in a domain we own.
    pub fn lookup_bytes(&self, rcpt: &[u8], buf: &mut AddrBuf) -> Verdict {
        match std::str::from_utf8(rcpt) {
            Ok(r) => self.lookup_in(r, buf),
            Err(_) => match self.snapshot() {
                None => Verdict::Tempfail(Tempfail::NotLoaded),
                Some(s) => s.syntax_verdict(rcpt, crate::address::AddrError::NotText),
            },
        }
    }
}
