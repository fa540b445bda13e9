//! Outbound TLS policy from DNSSEC (DANE, RFC 7672; DESIGN.md §8): for a next hop, the MX
//! hosts, their addresses and `_25._tcp` TLSA records, validated from the root, decided into
//! `dane-only` / `dane` / `encrypt` / no policy / `TEMP`, and cached by TTL.
//!
//! [`Dane`] is the engine: [`Dane::policy`] answers from its own decision cache (the
//! resolver does not cache validated negative answers) and resolves a domain once however
//! many requests wait for it (single flight); decisions are refreshed ahead of expiry so a
//! busy domain never waits on DNS, and a refresh that fails keeps the still-valid decision.
//! Uncertainty is never a downgrade: bogus, SERVFAIL and timeouts are `TEMP`, and a `TEMP`
//! is cached for seconds only.

pub mod check;
pub mod policy;
pub mod resolve;
pub mod verify;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

pub use policy::{Decision, Digest, Host, Level, Rendered, Rendering, Target, Tlsa};
pub use resolve::{DnsResolver, ResolverSettings};

/// How the engine resolves, caches and renders.
#[derive(Debug, Clone)]
pub struct DaneConfig {
    /// Name servers and trust anchor.
    pub resolver: ResolverSettings,
    /// How `tls_policy` answers are written.
    pub rendering: Rendering,
    /// The digest of the `fingerprint` rendering.
    pub digest: Digest,
    /// Decisions kept at most (least recently used ones go first).
    pub cache_size: usize,
    /// Shortest and longest time a decision is kept (DNS TTLs are clamped to this).
    pub min_ttl: Duration,
    /// See `min_ttl`.
    pub max_ttl: Duration,
    /// How long a `TEMP` decision is kept (and how soon a failed refresh is retried).
    pub temp_ttl: Duration,
    /// A whole decision (every query of one domain) must be made within this, or it is
    /// `TEMP`; keep it below the MTA's table timeout (Postfix: 10 s).
    pub decision_timeout: Duration,
    /// Resolve the directory's route next hops after every publish.
    pub warm_routes: bool,
}

impl Default for DaneConfig {
    fn default() -> Self {
        DaneConfig {
            resolver: ResolverSettings {
                nameservers: Vec::new(),
                trust_anchor: None,
                timeout: Duration::from_secs(2),
                record_cache_ttl: Duration::ZERO,
            },
            rendering: Rendering::Dane,
            digest: Digest::Sha256,
            cache_size: 100_000,
            min_ttl: Duration::from_secs(180),
            max_ttl: Duration::from_secs(86_400),
            temp_ttl: Duration::from_secs(30),
            decision_timeout: Duration::from_secs(8),
            warm_routes: true,
        }
    }
}

/// One cached decision, with its rendering.
#[derive(Debug, Clone)]
pub struct Cached {
    /// What the key named.
    pub target: Target,
    /// The decision.
    pub decision: Decision,
    /// Its socketmap answer in the configured rendering.
    pub answer: Rendered,
    /// How long it is kept from when it was made (clamped TTL).
    pub ttl: Duration,
}

struct Slot {
    current: Option<Arc<Cached>>,
    expires: Instant,
    refresh_at: Instant,
    inflight: Option<watch::Receiver<Option<Arc<Cached>>>>,
    used: u64,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Answers from the cache.
    pub hits: AtomicU64,
    /// Requests that had to wait for DNS.
    pub misses: AtomicU64,
    /// Refreshes ahead of expiry started.
    pub refreshes: AtomicU64,
    /// Refreshes that failed and kept the decision they were to replace.
    pub refresh_failures: AtomicU64,
    /// Decisions made, by level (`Level` order: dane-only, dane, encrypt, none, temp).
    pub decisions: [AtomicU64; 5],
    /// Failed DNS decisions by kind (`Failure::label` order below).
    pub errors: Mutex<HashMap<&'static str, u64>>,
}

fn level_slot(l: Level) -> usize {
    match l {
        Level::DaneOnly => 0,
        Level::Dane => 1,
        Level::Encrypt => 2,
        Level::None => 3,
        Level::Temp => 4,
    }
}

struct Inner {
    config: DaneConfig,
    dns: DnsResolver,
    cache: Mutex<HashMap<Target, Slot>>,
    tick: AtomicU64,
    stats: Stats,
}

/// The DANE engine: cheap to clone (one shared cache).
#[derive(Clone)]
pub struct Dane {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Dane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dane")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// The answer to a `tls_policy` request.
#[derive(Debug, Clone)]
pub enum PolicyAnswer {
    /// The key names nothing DANE applies to (an IP literal, not a domain).
    NotApplicable(policy::KeyError),
    /// A decision (cached or fresh).
    Decided(Arc<Cached>),
}

impl PolicyAnswer {
    /// The socketmap answer.
    pub fn rendered(&self) -> &Rendered {
        match self {
            PolicyAnswer::NotApplicable(_) => &Rendered::NotFound,
            PolicyAnswer::Decided(c) => &c.answer,
        }
    }
}

impl Dane {
    /// Build the engine (the resolver; no query is sent yet).
    pub fn new(config: DaneConfig) -> Result<Dane, resolve::ResolverError> {
        let mut settings = config.resolver.clone();
        // The resolver keeps records no longer than a decision may live.
        settings.record_cache_ttl = config.max_ttl.max(Duration::from_secs(1));
        let dns = DnsResolver::new(&settings)?;
        Ok(Dane {
            inner: Arc::new(Inner {
                config,
                dns,
                cache: Mutex::new(HashMap::new()),
                tick: AtomicU64::new(0),
                stats: Stats::default(),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DaneConfig {
        &self.inner.config
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// Decisions cached now.
    pub fn cached_entries(&self) -> usize {
        self.inner.cache.lock().map_or(0, |c| c.len())
    }

    /// The resolver (for `dane-check`).
    pub fn resolver(&self) -> &DnsResolver {
        &self.inner.dns
    }

    /// The policy for a `smtp_tls_policy_maps` key (`example.com`, `[mx.example.com]:587`).
    /// From the cache when it holds a valid decision (a refresh starts in the background
    /// when it is close to expiry); else one resolution for all who ask at once.
    pub async fn policy(&self, key: &[u8]) -> PolicyAnswer {
        match policy::parse_key(key) {
            Ok(t) => PolicyAnswer::Decided(self.decide(t).await),
            Err(e) => PolicyAnswer::NotApplicable(e),
        }
    }

    /// A valid cached decision for the key, without waiting on DNS (`None`: not cached or
    /// expired). Starts a refresh when one is due.
    pub fn cached(&self, key: &[u8]) -> Option<PolicyAnswer> {
        match policy::parse_key(key) {
            Err(e) => Some(PolicyAnswer::NotApplicable(e)),
            Ok(t) => self.cached_target(&t).map(PolicyAnswer::Decided),
        }
    }

    fn cached_target(&self, t: &Target) -> Option<Arc<Cached>> {
        let now = Instant::now();
        let tick = self.inner.tick.fetch_add(1, Ordering::Relaxed);
        let mut cache = self.inner.cache.lock().ok()?;
        let slot = cache.get_mut(t)?;
        let current = slot.current.clone().filter(|_| now < slot.expires)?;
        slot.used = tick;
        if now >= slot.refresh_at && slot.inflight.is_none() {
            self.inner.stats.refreshes.fetch_add(1, Ordering::Relaxed);
            slot.inflight = Some(self.spawn_resolution(t.clone(), true));
        }
        drop(cache);
        self.inner.stats.hits.fetch_add(1, Ordering::Relaxed);
        Some(current)
    }

    /// Decide for a target: cached, or resolved once for every concurrent asker.
    pub async fn decide(&self, t: Target) -> Arc<Cached> {
        if let Some(c) = self.cached_target(&t) {
            return c;
        }
        self.inner.stats.misses.fetch_add(1, Ordering::Relaxed);
        let rx = {
            let Ok(mut cache) = self.inner.cache.lock() else {
                return Arc::new(self.cached_from(t, Decision::temp("internal error (cache)")));
            };
            let tick = self.inner.tick.fetch_add(1, Ordering::Relaxed);
            if !cache.contains_key(&t) && cache.len() >= self.inner.config.cache_size.max(1) {
                evict(&mut cache, self.inner.config.cache_size.max(1));
            }
            let slot = cache.entry(t.clone()).or_insert_with(|| Slot {
                current: None,
                expires: Instant::now(),
                refresh_at: Instant::now(),
                inflight: None,
                used: tick,
            });
            slot.used = tick;
            match &slot.inflight {
                Some(rx) => rx.clone(),
                None => {
                    let rx = self.spawn_resolution(t.clone(), false);
                    slot.inflight = Some(rx.clone());
                    rx
                }
            }
        };
        wait(rx).await.unwrap_or_else(|| {
            Arc::new(self.cached_from(t, Decision::temp("resolution was cancelled")))
        })
    }

    fn cached_from(&self, target: Target, decision: Decision) -> Cached {
        let c = &self.inner.config;
        let ttl = if decision.level == Level::Temp {
            c.temp_ttl
        } else {
            Duration::from_secs(u64::from(decision.ttl)).clamp(c.min_ttl, c.max_ttl.max(c.min_ttl))
        };
        let answer = decision.render(c.rendering, c.digest);
        Cached {
            target,
            decision,
            answer,
            ttl,
        }
    }

    /// Resolve in a task of its own (a requester that gives up does not cancel it), store the
    /// result and wake everyone waiting. A refresh (`fresh`) asks the network, not the
    /// resolver's record cache, so DNS that went away is noticed while the decision is valid.
    fn spawn_resolution(&self, t: Target, fresh: bool) -> watch::Receiver<Option<Arc<Cached>>> {
        let (tx, rx) = watch::channel(None);
        let me = self.clone();
        tokio::spawn(async move {
            let timeout = me.inner.config.decision_timeout;
            let decision = match tokio::time::timeout(
                timeout,
                resolve::decide(&me.inner.dns, &t, fresh, None),
            )
            .await
            {
                Ok(d) => d,
                Err(_) => Decision::temp(format!("DNS did not answer within {timeout:?}")),
            };
            let fresh = Arc::new(me.cached_from(t.clone(), decision));
            let served = me.store(&t, fresh);
            let _ = tx.send(Some(served));
        });
        rx
    }

    /// Put a fresh decision in the cache and return what is served now: a `TEMP` does not
    /// replace a decision that is still valid (it is retried after `temp_ttl`).
    fn store(&self, t: &Target, fresh: Arc<Cached>) -> Arc<Cached> {
        let st = &self.inner.stats;
        st.decisions[level_slot(fresh.decision.level)].fetch_add(1, Ordering::Relaxed);
        if fresh.decision.level == Level::Temp {
            let kind = failure_kind(&fresh.decision.reason);
            if let Ok(mut e) = st.errors.lock() {
                *e.entry(kind).or_default() += 1;
            }
        }
        let now = Instant::now();
        let Ok(mut cache) = self.inner.cache.lock() else {
            return fresh;
        };
        let Some(slot) = cache.get_mut(t) else {
            return fresh;
        };
        slot.inflight = None;
        let old = slot.current.clone().filter(|_| now < slot.expires);
        if let Some(old) = old {
            if fresh.decision.level == Level::Temp {
                st.refresh_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    target_name = %t.name,
                    reason = %fresh.decision.reason,
                    "DANE refresh of {} failed ({}); keeping the {} decision until it expires",
                    t.name,
                    fresh.decision.reason,
                    old.decision.level.as_str()
                );
                slot.refresh_at = now + self.inner.config.temp_ttl;
                return old;
            }
            if fresh.decision.level.strength() < old.decision.level.strength() {
                tracing::warn!(
                    target_name = %t.name,
                    "DANE policy of {} weakened from {} to {}: {}",
                    t.name,
                    old.decision.level.as_str(),
                    fresh.decision.level.as_str(),
                    fresh.decision.reason
                );
            }
        }
        slot.expires = now + fresh.ttl;
        // Refresh ahead: when a fifth of the lifetime is left, or early enough that a
        // refresh that times out still ends before expiry (never before half of it). A TEMP
        // is simply redone when it expires.
        slot.refresh_at = if fresh.decision.level == Level::Temp {
            slot.expires
        } else {
            let lead = (fresh.ttl / 5).max(self.inner.config.decision_timeout * 2);
            now + fresh.ttl.saturating_sub(lead).max(fresh.ttl / 2)
        };
        slot.current = Some(fresh.clone());
        fresh
    }

    /// Resolve these next hops ahead of the first message (the directory's routes after a
    /// publish), a few at a time, in the background.
    pub fn warm(&self, targets: Vec<Target>) {
        if targets.is_empty() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let n = targets.len();
            let sem = Arc::new(tokio::sync::Semaphore::new(16));
            let mut set = tokio::task::JoinSet::new();
            for t in targets {
                let Ok(permit) = sem.clone().acquire_owned().await else {
                    break;
                };
                let me = me.clone();
                set.spawn(async move {
                    let _ = me.decide(t).await;
                    drop(permit);
                });
            }
            while set.join_next().await.is_some() {}
            tracing::debug!("DANE: {n} route next hop(s) resolved ahead");
        });
    }

    /// The Prometheus lines of the engine.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let st = &self.inner.stats;
        let _ = writeln!(out, "# TYPE rcptgate_dane_decisions_total counter");
        for l in [
            Level::DaneOnly,
            Level::Dane,
            Level::Encrypt,
            Level::None,
            Level::Temp,
        ] {
            let _ = writeln!(
                out,
                "rcptgate_dane_decisions_total{{policy=\"{}\"}} {}",
                l.as_str(),
                st.decisions[level_slot(l)].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# TYPE rcptgate_dane_cache_hits_total counter");
        let _ = writeln!(
            out,
            "rcptgate_dane_cache_hits_total {}",
            st.hits.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# TYPE rcptgate_dane_cache_misses_total counter");
        let _ = writeln!(
            out,
            "rcptgate_dane_cache_misses_total {}",
            st.misses.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# TYPE rcptgate_dane_cache_entries gauge");
        let _ = writeln!(out, "rcptgate_dane_cache_entries {}", self.cached_entries());
        let _ = writeln!(out, "# TYPE rcptgate_dane_refreshes_total counter");
        let _ = writeln!(
            out,
            "rcptgate_dane_refreshes_total {}",
            st.refreshes.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# TYPE rcptgate_dane_refresh_failures_total counter");
        let _ = writeln!(
            out,
            "rcptgate_dane_refresh_failures_total {}",
            st.refresh_failures.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# TYPE rcptgate_dane_dns_errors_total counter");
        if let Ok(e) = st.errors.lock() {
            let mut kinds: Vec<_> = e.iter().collect();
            kinds.sort();
            for (k, v) in kinds {
                let _ = writeln!(out, "rcptgate_dane_dns_errors_total{{kind=\"{k}\"}} {v}");
            }
        }
    }
}

/// The error kind of a `TEMP` reason, for metrics.
fn failure_kind(reason: &str) -> &'static str {
    for (needle, kind) in [
        ("bogus", "bogus"),
        ("could not be validated", "unverifiable"),
        ("timed out", "timeout"),
        ("did not answer within", "timeout"),
        ("SERVFAIL", "servfail"),
        ("refused", "refused"),
        ("network", "network"),
        ("truncated", "truncated"),
    ] {
        if reason.contains(needle) {
            return kind;
        }
    }
    "other"
}

/// Wait for a resolution's result.
async fn wait(mut rx: watch::Receiver<Option<Arc<Cached>>>) -> Option<Arc<Cached>> {
    loop {
        if let Some(c) = rx.borrow_and_update().clone() {
            return Some(c);
        }
        rx.changed().await.ok()?;
    }
}

/// Make room: drop expired decisions, then the least recently used eighth.
fn evict(cache: &mut HashMap<Target, Slot>, cap: usize) {
    let now = Instant::now();
    cache.retain(|_, s| s.inflight.is_some() || now < s.expires);
    if cache.len() < cap {
        return;
    }
    let mut used: Vec<u64> = cache
        .values()
        .filter(|s| s.inflight.is_none())
        .map(|s| s.used)
        .collect();
    if used.is_empty() {
        return;
    }
    let k = (cap / 8).max(1).min(used.len() - 1);
    let (_, cut, _) = used.select_nth_unstable(k);
    let cut = *cut;
    cache.retain(|_, s| s.inflight.is_some() || s.used > cut);
}

/// The next hop of a route (`smtp:[mx.example.com]:25` → `[mx.example.com]:25`), if it is
/// one an SMTP client delivers to.
pub fn route_target(route: &str) -> Option<Target> {
    let (transport, nexthop) = match route.split_once(':') {
        Some((t, n)) if !t.starts_with('[') => (t, n),
        _ => ("smtp", route),
    };
    if matches!(
        transport,
        "error" | "discard" | "local" | "virtual" | "lmtp" | "retry" | "hold" | "pipe"
    ) {
        return None;
    }
    let first = nexthop.split([',', ' ']).find(|s| !s.is_empty())?;
    policy::parse_key(first.as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_to_targets() {
        let t = |r: &str| route_target(r).map(|t| (t.name, t.port, t.mx));
        assert_eq!(
            t("smtp:[mx.example.com]:587"),
            Some(("mx.example.com".into(), 587, false))
        );
        assert_eq!(
            t("relay:example.net"),
            Some(("example.net".into(), 25, true))
        );
        assert_eq!(t("[10.0.0.1]"), None);
        assert_eq!(t("error:5.1.1 gone"), None);
        assert_eq!(t("lmtp:unix:/run/dovecot"), None);
        assert_eq!(t("smtp:"), None);
        assert_eq!(
            t("smtp:[a.example], [b.example]"),
            Some(("a.example".into(), 25, false))
        );
    }

    #[test]
    fn eviction_keeps_the_recent() {
        let mut m = HashMap::new();
        let far = Instant::now() + Duration::from_secs(60);
        for i in 0..64u64 {
            m.insert(
                Target {
                    name: format!("d{i}.example"),
                    port: 25,
                    mx: true,
                },
                Slot {
                    current: None,
                    expires: far,
                    refresh_at: far,
                    inflight: None,
                    used: i,
                },
            );
        }
        evict(&mut m, 64);
        assert!(m.len() < 64 && m.len() >= 48, "{}", m.len());
        assert!(m.values().all(|s| s.used > 7));
        assert!(m.keys().any(|k| k.name == "d63.example"));
    }

    #[test]
    fn failure_kinds() {
        assert_eq!(
            failure_kind("MX a.: DNSSEC validation failed (bogus)"),
            "bogus"
        );
        assert_eq!(failure_kind("DNS did not answer within 8s"), "timeout");
        assert_eq!(
            failure_kind("mx: TLSA x: server failure (SERVFAIL)"),
            "servfail"
        );
        assert_eq!(failure_kind("whatever"), "other");
    }
}
