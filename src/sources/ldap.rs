//! Live directory sync over LDAPS (or LDAP + StartTLS) from Active Directory, Azure AD Domain
//! Services or OpenLDAP (DESIGN.md §5). Every entry goes through the same AD mapper as LDIF
//! exports ([`super::ad::map_entry`]).
//!
//! Certificate verification is always on: against the system roots, or only against the CA
//! in `ca_file` (Azure AD DS often runs a self-signed certificate). Searches are paged (RFC
//! 2696; AD silently stops unpaged searches at 1000 entries). A failure anywhere — connect,
//! TLS, bind, a page that times out, a result code other than success, no entries at all —
//! is an error, never a partial result: the loader keeps the snapshot in service.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ldap3::adapters::{Adapter, EntriesOnly, PagedResults};
use ldap3::{LdapConn, LdapConnSettings, Scope, SearchEntry};

use super::ad::{self, AdOptions, DirEntry};
use super::{DomainDecl, Format, Location, SourceData};

/// The attributes the AD mapper reads.
pub const ATTRIBUTES: [&str; 6] = [
    "objectClass",
    "mail",
    "proxyAddresses",
    "userAccountControl",
    "msExchRecipientTypeDetails",
    "userPrincipalName",
];

/// Mail-enabled users, groups, contacts and public folders.
pub const DEFAULT_FILTER: &str = "(&(|(objectClass=user)(objectClass=group)(objectClass=contact)(objectClass=publicFolder)(objectClass=msExchDynamicDistributionList))(|(mail=*)(proxyAddresses=*)))";

/// A password that never appears in logs or `Debug` output.
#[derive(Clone, Default)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret.
    pub fn new(s: String) -> Secret {
        Secret(s)
    }

    /// The secret itself (to bind; never to log).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "(none)"
        } else {
            "(redacted)"
        })
    }
}

/// Where the bind password comes from (read at every sync, so a rotated password is used
/// without a restart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    /// Anonymous bind.
    None,
    /// The first line of this file.
    File(PathBuf),
    /// This environment variable.
    Env(String),
}

/// One LDAP source, as configured.
#[derive(Debug, Clone)]
pub struct LdapConfig {
    /// `ldaps://host[:port]` or `ldap://host[:port]`.
    pub url: String,
    /// Upgrade an `ldap://` connection with StartTLS (required for a bind over `ldap://`).
    pub starttls: bool,
    /// Trust only this CA (PEM) instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Bind DN or user principal name (`svc@corp.example`); none = anonymous.
    pub bind: Option<String>,
    /// Where the bind password comes from.
    pub password: PasswordSource,
    /// (base DN, scope) pairs.
    pub bases: Vec<(String, Scope)>,
    /// The LDAP filter.
    pub filter: String,
    /// Entries per page (paged results).
    pub page_size: i32,
    /// Connect, bind, and each page of a search.
    pub timeout: Duration,
    /// Attempts after a connection or timeout failure (never after a refused bind, which
    /// would lock the account).
    pub retries: u32,
    /// Keep disabled mail-enabled accounts as shared mailboxes.
    pub include_disabled: bool,
}

/// Why a sync failed, with what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
// Each variant's `#[error]` text is its documentation.
#[allow(missing_docs)]
pub enum LdapError {
    #[error("{0}")]
    Config(String),
    #[error(
        "cannot connect to {url}: {detail} (is the port open? a firewall or network security group may block it; LDAPS is 636, LDAP 389)"
    )]
    Connect { url: String, detail: String },
    #[error(
        "TLS with {url} failed: {detail} (a certificate from an unknown CA: set ca_file to the CA's PEM file; a name mismatch: use the host name the certificate is for)"
    )]
    Tls { url: String, detail: String },
    #[error("bind as {who} refused: {detail}")]
    Bind { who: String, detail: String },
    #[error("search of {base} failed: {detail}")]
    Search { base: String, detail: String },
    #[error("{url}: no answer within {secs} s ({during})")]
    Timeout {
        url: String,
        secs: u64,
        during: &'static str,
    },
    #[error(
        "search of {0} returned no entries; refusing an empty directory (check base_dns and filter)"
    )]
    Empty(String),
}

/// What AD's "data NNN" in a bind error (rc 49) means.
pub fn ad_bind_reason(text: &str) -> Option<&'static str> {
    let code = text.split("data ").nth(1)?.get(..3)?;
    Some(match code {
        "525" => "user not found (check the bind DN or user principal name)",
        "52e" => "invalid credentials (wrong password)",
        "530" => "not permitted to log on at this time",
        "531" => "not permitted to log on from this workstation",
        "532" => "password expired",
        "533" => "account disabled",
        "701" => "account expired",
        "773" => "the password must be reset",
        "775" => "account locked out",
        _ => return None,
    })
}

fn describe(rc: u32, text: &str) -> String {
    let name = match rc {
        1 => "operations error",
        2 => "protocol error",
        3 => "time limit exceeded",
        4 => {
            "size limit exceeded (the server stops unpaged searches: keep page_size at 1000 or less)"
        }
        8 => "stronger authentication required (use ldaps:// or starttls = true)",
        10 => "referral (the base DN is not on this server)",
        32 => "no such object (check the base DN)",
        34 => "invalid DN syntax",
        49 => "invalid credentials",
        50 => "insufficient access rights",
        51 => "busy",
        52 => "unavailable",
        53 => "unwilling to perform",
        _ => "error",
    };
    let mut s = format!("result code {rc} ({name})");
    if rc == 49
        && let Some(r) = ad_bind_reason(text)
    {
        s.push_str(&format!(": AD says {r}"));
    }
    let text = text.trim_matches(char::from(0)).trim();
    if !text.is_empty() {
        s.push_str(&format!(" [{text}]"));
    }
    s
}

impl LdapConfig {
    fn password(&self) -> Result<Secret, LdapError> {
        match &self.password {
            PasswordSource::None => Ok(Secret::default()),
            PasswordSource::File(p) => std::fs::read_to_string(p)
                .map(|s| Secret::new(s.trim_end_matches(['\r', '\n']).to_owned()))
                .map_err(|e| LdapError::Config(format!("password_file {}: {e}", p.display()))),
            PasswordSource::Env(v) => std::env::var(v)
                .map(Secret::new)
                .map_err(|_| LdapError::Config(format!("password_env {v} is not set"))),
        }
    }

    fn settings(&self) -> Result<LdapConnSettings, LdapError> {
        let mut s = LdapConnSettings::new()
            .set_conn_timeout(self.timeout)
            .set_starttls(self.starttls && self.url.starts_with("ldap://"));
        if let Some(ca) = &self.ca_file {
            s = s.set_config(Arc::new(tls_config(ca)?));
        }
        Ok(s)
    }
}

/// The CA certificates in `ca` (PEM), as the only trust anchors.
pub fn ca_roots(ca: &std::path::Path) -> Result<rustls::RootCertStore, LdapError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let bad = |why: String| LdapError::Config(format!("ca_file {}: {why}", ca.display()));
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca).map_err(|e| bad(e.to_string()))?;
    for c in certs {
        let c = c.map_err(|e| bad(e.to_string()))?;
        roots.add(c).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no certificate in the file".into()));
    }
    Ok(roots)
}

/// A rustls client configuration that trusts only the CA certificates in `ca` (PEM).
pub fn tls_config(ca: &std::path::Path) -> Result<rustls::ClientConfig, LdapError> {
    let roots = ca_roots(ca)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| LdapError::Config(format!("ca_file {}: {e}", ca.display())))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The adapters every search uses: entries only (AD's continuation references would make
/// the entry decoder panic), paged by `page_size` (AD stops unpaged searches at 1000).
pub fn paged<'a, S, A>(page_size: i32) -> Vec<Box<dyn Adapter<'a, S, A>>>
where
    S: AsRef<str> + Clone + std::fmt::Debug + Send + Sync + 'a,
    A: AsRef<[S]> + Clone + std::fmt::Debug + Send + Sync + 'a,
{
    vec![
        Box::new(EntriesOnly::new()),
        Box::new(PagedResults::new(page_size)),
    ]
}

/// A search result as the AD mapper reads it.
pub fn dir_entry(raw: ldap3::ResultEntry) -> DirEntry {
    let entry = SearchEntry::construct(raw);
    let mut attrs = Vec::new();
    for (k, vs) in entry.attrs {
        for v in vs {
            attrs.push((k.clone(), v, 0));
        }
    }
    DirEntry {
        dn: entry.dn,
        line: 0,
        attrs,
    }
}

/// How a sync is going (for progress bars).
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Entries read so far.
    pub entries: u64,
    /// Pages asked for so far (entries / page size, rounded up).
    pub pages: u64,
    /// Time since the sync started.
    pub elapsed: Duration,
}

fn classify(url: &str, e: ldap3::LdapError, during: &'static str, secs: u64) -> LdapError {
    let detail = e.to_string();
    match e {
        ldap3::LdapError::Timeout { .. } => LdapError::Timeout {
            url: url.to_owned(),
            secs,
            during,
        },
        _ if detail.contains("certificate")
            || detail.contains("UnknownIssuer")
            || detail.contains("tls")
            || detail.contains("TLS") =>
        {
            LdapError::Tls {
                url: url.to_owned(),
                detail,
            }
        }
        ldap3::LdapError::LdapResult { result } => LdapError::Search {
            base: String::new(),
            detail: describe(result.rc, &result.text),
        },
        _ => LdapError::Connect {
            url: url.to_owned(),
            detail,
        },
    }
}

/// Connect and bind: the connection, ready to search.
pub fn connect(cfg: &LdapConfig) -> Result<LdapConn, LdapError> {
    let secs = cfg.timeout.as_secs();
    let mut conn = LdapConn::with_settings(cfg.settings()?, &cfg.url)
        .map_err(|e| classify(&cfg.url, e, "connect", secs))?;
    if let Some(who) = &cfg.bind {
        let pw = cfg.password()?;
        let res = conn
            .with_timeout(cfg.timeout)
            .simple_bind(who, pw.expose())
            .map_err(|e| classify(&cfg.url, e, "bind", secs))?;
        if res.rc != 0 {
            return Err(LdapError::Bind {
                who: who.clone(),
                detail: describe(res.rc, &res.text),
            });
        }
    }
    Ok(conn)
}

/// One full sync: every base DN, paged, mapped. `progress` is called after every page's
/// worth of entries.
pub fn fetch(
    name: &Arc<str>,
    cfg: &LdapConfig,
    mut progress: impl FnMut(Progress),
) -> Result<SourceData, LdapError> {
    fetch_on(name, cfg, &mut progress, None)
}

/// [`fetch`], the first attempt on `conn` when there is one (bound already).
fn fetch_on(
    name: &Arc<str>,
    cfg: &LdapConfig,
    progress: &mut dyn FnMut(Progress),
    mut conn: Option<LdapConn>,
) -> Result<SourceData, LdapError> {
    let mut attempt = 0;
    loop {
        // A panic inside the LDAP client (it panics on some malformed server data) must not
        // take the daemon down: it is an error like any other.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            fetch_once(name, cfg, progress, conn.take())
        }))
        .unwrap_or_else(|_| {
            Err(LdapError::Connect {
                url: cfg.url.clone(),
                detail: "malformed data from the server".into(),
            })
        });
        match r {
            Err(LdapError::Connect { .. } | LdapError::Timeout { .. }) if attempt < cfg.retries => {
                attempt += 1;
                let wait = Duration::from_secs(1 << attempt.min(5));
                let why = r.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
                tracing::warn!(
                    source = %name,
                    attempt,
                    "{name}: {why}; retry {attempt} of {} in {wait:?}",
                    cfg.retries
                );
                std::thread::sleep(wait);
            }
            r => return r,
        }
    }
}

fn fetch_once(
    name: &Arc<str>,
    cfg: &LdapConfig,
    progress: &mut dyn FnMut(Progress),
    conn: Option<LdapConn>,
) -> Result<SourceData, LdapError> {
    let started = Instant::now();
    let mut conn = match conn {
        Some(c) => c,
        None => connect(cfg)?,
    };
    let mut out = SourceData::new(name, Format::Ldap);
    let mut p = Progress::default();
    for (base, scope) in &cfg.bases {
        let n = search_into(
            &mut conn,
            cfg,
            base,
            *scope,
            &cfg.filter,
            &mut out,
            &mut |_| {
                p.entries += 1;
                if p.entries % cfg.page_size.max(1) as u64 == 0 {
                    p.pages = p.entries / cfg.page_size.max(1) as u64;
                    p.elapsed = started.elapsed();
                    progress(p);
                }
            },
        )?;
        if n == 0 {
            return Err(LdapError::Empty(base.clone()));
        }
    }
    let _ = conn.unbind();
    p.pages = p.entries.div_ceil(cfg.page_size.max(1) as u64);
    p.elapsed = started.elapsed();
    progress(p);
    Ok(out)
}

/// One paged search of `base`; every entry mapped into `out`. Returns the entry count.
fn search_into(
    conn: &mut LdapConn,
    cfg: &LdapConfig,
    base: &str,
    scope: Scope,
    filter: &str,
    out: &mut SourceData,
    each: &mut dyn FnMut(u64),
) -> Result<u64, LdapError> {
    let secs = cfg.timeout.as_secs();
    let file: Arc<str> = Arc::from(cfg.url.as_str());
    let opts = AdOptions {
        include_disabled: cfg.include_disabled,
    };
    let mut search = conn
        .with_timeout(cfg.timeout)
        .streaming_search_with(
            paged(cfg.page_size),
            base,
            scope,
            filter,
            ATTRIBUTES.to_vec(),
        )
        .map_err(|e| in_search(base, classify(&cfg.url, e, "search", secs)))?;
    let mut n = 0u64;
    loop {
        let next = search
            .next()
            .map_err(|e| in_search(base, classify(&cfg.url, e, "search", secs)))?;
        let Some(raw) = next else { break };
        let mapped = ad::map_entry(&dir_entry(raw), &file, &opts);
        out.entries.extend(mapped.entries);
        out.diagnostics.extend(mapped.diagnostics);
        out.excluded.extend(mapped.excluded);
        n += 1;
        each(n);
    }
    let res = search.result();
    if res.rc != 0 {
        return Err(LdapError::Search {
            base: base.to_owned(),
            detail: describe(res.rc, &res.text),
        });
    }
    Ok(n)
}

/// Where an Active Directory sync left off: the server (its `dsServiceName`) and its
/// `highestCommittedUSN` read *before* the last search began, so nothing committed during a
/// search is missed (it is fetched again next time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsnMark {
    /// The server the mark belongs to (`dsServiceName`).
    pub server: String,
    /// Changes up to this USN are in the data.
    pub usn: u64,
    /// When the last full sync ran (Unix seconds).
    pub full_at: u64,
}

/// The server's identity and highest committed USN (AD only; `None` elsewhere).
pub fn usn_mark(conn: &mut LdapConn, cfg: &LdapConfig) -> Result<Option<(String, u64)>, LdapError> {
    let secs = cfg.timeout.as_secs();
    let res = conn
        .with_timeout(cfg.timeout)
        .search(
            "",
            Scope::Base,
            "(objectClass=*)",
            vec!["highestCommittedUSN", "dsServiceName"],
        )
        .map_err(|e| classify(&cfg.url, e, "rootDSE", secs))?;
    let Some(raw) = res.0.into_iter().next() else {
        return Ok(None);
    };
    let e = SearchEntry::construct(raw);
    let get = |k: &str| {
        e.attrs
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .and_then(|(_, v)| v.first().cloned())
    };
    Ok(match (get("dsServiceName"), get("highestCommittedUSN")) {
        (Some(server), Some(usn)) => usn.trim().parse().ok().map(|u| (server, u)),
        _ => None,
    })
}

/// What [`sync`] did.
#[derive(Debug)]
pub enum Synced {
    /// A full sync; the mark is `None` when the server is not Active Directory.
    Full(SourceData, Option<UsnMark>),
    /// The objects changed since the last mark were fetched again (`changed` of them) and
    /// applied to a copy of the previous data.
    Incremental {
        /// All of the source's data, with the changes applied.
        data: SourceData,
        /// Where the next incremental sync starts.
        mark: UsnMark,
        /// Objects changed since the last sync.
        changed: u64,
    },
    /// The server's USN has not moved: the previous data stands.
    Unchanged,
}

/// Sync a source: incrementally when the server is Active Directory (it has a
/// `highestCommittedUSN`), the last sync was against the same server, and the last full sync
/// is younger than `full_every`; in full otherwise. An incremental sync fetches the objects
/// whose `uSNChanged` is above the mark, and the DNs of every changed object (with any
/// filter), so an object changed out of the filter is dropped too. Deleted objects are not
/// seen by an incremental sync: the periodic full sync notices them (and the lifecycle turns
/// them into tombstones).
pub fn sync(
    name: &Arc<str>,
    cfg: &LdapConfig,
    prev: Option<(&SourceData, &UsnMark)>,
    now: u64,
    full_every: Duration,
    mut progress: impl FnMut(Progress),
) -> Result<Synced, LdapError> {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut conn = match connect(cfg) {
            Ok(c) => c,
            // Unreachable or slow: the full sync below retries with backoff.
            Err(LdapError::Connect { .. } | LdapError::Timeout { .. }) => {
                return Ok(Ok((None, None)));
            }
            Err(e) => return Err(e),
        };
        let mark = usn_mark(&mut conn, cfg)?;
        match (mark, prev) {
            (Some((server, usn)), Some((data, m)))
                if m.server == server
                    && usn >= m.usn
                    && now < m.full_at.saturating_add(full_every.as_secs()) =>
            {
                if usn == m.usn {
                    return Ok(Err(Synced::Unchanged));
                }
                let (data, changed) = incremental(&mut conn, cfg, data.clone(), m.usn)?;
                let _ = conn.unbind();
                Ok(Err(Synced::Incremental {
                    data,
                    mark: UsnMark {
                        server,
                        usn,
                        full_at: m.full_at,
                    },
                    changed,
                }))
            }
            // A full sync, on this connection.
            (mark, _) => Ok(Ok((
                mark.map(|(server, usn)| UsnMark {
                    server,
                    usn,
                    full_at: now,
                }),
                Some(conn),
            ))),
        }
    }))
    .unwrap_or_else(|_| {
        Err(LdapError::Connect {
            url: cfg.url.clone(),
            detail: "malformed data from the server".into(),
        })
    })?;
    match r {
        // A full sync, retried with backoff on fresh connections.
        Ok((mark, conn)) => Ok(Synced::Full(
            fetch_on(name, cfg, &mut progress, conn)?,
            mark,
        )),
        Err(done) => Ok(done),
    }
}

/// Fetch what changed above `usn` into `data`; returns it and how many objects changed.
fn incremental(
    conn: &mut LdapConn,
    cfg: &LdapConfig,
    mut data: SourceData,
    usn: u64,
) -> Result<(SourceData, u64), LdapError> {
    let above = ldap3::ldap_escape((usn + 1).to_string()).into_owned();
    let mut fresh = SourceData::new(&data.name, Format::Ldap);
    let mut touched: std::collections::HashSet<String> = Default::default();
    for (base, scope) in &cfg.bases {
        let filter = format!("(&{}(uSNChanged>={above}))", cfg.filter);
        search_into(conn, cfg, base, *scope, &filter, &mut fresh, &mut |_| {})?;
        // Every changed object, whatever the filter says now: one that no longer matches
        // loses its addresses.
        let secs = cfg.timeout.as_secs();
        let mut s = conn
            .with_timeout(cfg.timeout)
            .streaming_search_with(
                paged(cfg.page_size),
                base,
                *scope,
                &format!("(uSNChanged>={above})"),
                vec!["1.1"],
            )
            .map_err(|e| in_search(base, classify(&cfg.url, e, "search", secs)))?;
        while let Some(raw) = s
            .next()
            .map_err(|e| in_search(base, classify(&cfg.url, e, "search", secs)))?
        {
            touched.insert(SearchEntry::construct(raw).dn.to_ascii_lowercase());
        }
        let res = s.result();
        if res.rc != 0 {
            return Err(LdapError::Search {
                base: base.clone(),
                detail: describe(res.rc, &res.text),
            });
        }
    }
    for e in &fresh.entries {
        if let Some(dn) = &e.dn {
            touched.insert(dn.to_ascii_lowercase());
        }
    }
    let hit = |dn: &Option<Box<str>>| {
        dn.as_deref()
            .is_some_and(|d| touched.contains(&d.to_ascii_lowercase()))
    };
    data.entries.retain(|e| !hit(&e.dn));
    data.diagnostics.retain(|d| !hit(&d.dn));
    // Exclusions name their DN at the end of the origin: `source:line (DN)`.
    data.excluded.retain(|x| {
        !x.origin
            .rsplit_once(" (")
            .is_some_and(|(_, dn)| touched.contains(&dn.trim_end_matches(')').to_ascii_lowercase()))
    });
    data.entries.append(&mut fresh.entries);
    data.diagnostics.append(&mut fresh.diagnostics);
    data.excluded.append(&mut fresh.excluded);
    Ok((data, touched.len() as u64))
}

fn in_search(base: &str, e: LdapError) -> LdapError {
    match e {
        LdapError::Search { detail, .. } => LdapError::Search {
            base: base.to_owned(),
            detail,
        },
        other => other,
    }
}

/// Accepted domains a source declares in its configuration (`domains = [...]`).
pub fn declared_domains(names: &[String], source: &Arc<str>) -> Vec<DomainDecl> {
    names
        .iter()
        .map(|n| DomainDecl::new(n.clone(), Location::new(source, 0, 0)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ad_bind_sub_codes() {
        let text = "80090308: LdapErr: DSID-0C09041C, comment: AcceptSecurityContext error, data 52e, v4563";
        assert_eq!(
            ad_bind_reason(text),
            Some("invalid credentials (wrong password)")
        );
        assert!(describe(49, text).contains("AD says invalid credentials (wrong password)"));
        assert_eq!(
            ad_bind_reason("... data 775, v4563"),
            Some("account locked out")
        );
        assert_eq!(ad_bind_reason("no data here"), None);
        assert!(describe(4, "").contains("size limit exceeded"));
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let s = Secret::new("hunter2".into());
        assert_eq!(format!("{s:?}"), "(redacted)");
        assert_eq!(s.expose(), "hunter2");
    }
}

/// What `sync --object` found for one object (provision on demand).
#[derive(Debug, Clone)]
pub struct ObjectLookup {
    /// The object as read (the mapper's attributes).
    pub entry: DirEntry,
    /// The configured base DN (and scope) it lies under; `None`: out of scope, never synced.
    pub base: Option<(String, Scope)>,
    /// Whether the source's filter selects it (else it is never synced).
    pub matches_filter: bool,
}

/// Whether `dn` lies under `base` with `scope` (DNs compared case- and space-insensitively).
pub fn in_scope(dn: &str, base: &str, scope: Scope) -> bool {
    let norm = |s: &str| {
        s.split(',')
            .map(|rdn| rdn.trim().to_ascii_lowercase())
            .collect::<Vec<_>>()
    };
    let (d, b) = (norm(dn), norm(base));
    if d.len() < b.len() || d[d.len() - b.len()..] != b[..] {
        return false;
    }
    match scope {
        Scope::Base => d.len() == b.len(),
        Scope::OneLevel => d.len() == b.len() + 1,
        Scope::Subtree => true,
    }
}

/// Fetch one object by DN, user principal name or address — under the configured base DNs
/// first, then anywhere in the directory's naming context (to say it is out of scope) — and
/// check it against the source's filter.
pub fn fetch_object(cfg: &LdapConfig, object: &str) -> Result<Option<ObjectLookup>, LdapError> {
    let secs = cfg.timeout.as_secs();
    let mut conn = connect(cfg)?;
    let search = |conn: &mut LdapConn, base: &str, scope: Scope, filter: &str| {
        conn.with_timeout(cfg.timeout)
            .search(base, scope, filter, ATTRIBUTES.to_vec())
            .map_err(|e| in_search(base, classify(&cfg.url, e, "search", secs)))
            .map(|r| {
                r.0.into_iter()
                    .map(SearchEntry::construct)
                    .collect::<Vec<_>>()
            })
    };
    let found: Option<SearchEntry> = if object.contains('=') {
        search(&mut conn, object, Scope::Base, "(objectClass=*)")
            .ok()
            .and_then(|v| v.into_iter().next())
    } else {
        let x = ldap3::ldap_escape(object).into_owned();
        let filter = format!(
            "(|(userPrincipalName={x})(mail={x})(proxyAddresses=smtp:{x})(sAMAccountName={x}))"
        );
        let mut hit = None;
        for (base, scope) in &cfg.bases {
            if let Some(e) = search(&mut conn, base, *scope, &filter)?.into_iter().next() {
                hit = Some(e);
                break;
            }
        }
        if hit.is_none() {
            // Anywhere in the directory: to tell "out of scope" from "does not exist".
            let contexts = conn
                .with_timeout(cfg.timeout)
                .search(
                    "",
                    Scope::Base,
                    "(objectClass=*)",
                    vec!["defaultNamingContext", "namingContexts"],
                )
                .ok()
                .and_then(|r| r.0.into_iter().next())
                .map(SearchEntry::construct)
                .map(|root| {
                    root.attrs
                        .iter()
                        .filter(|(k, _)| {
                            k.eq_ignore_ascii_case("defaultNamingContext")
                                || k.eq_ignore_ascii_case("namingContexts")
                        })
                        .flat_map(|(_, v)| v.clone())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            for ctx in contexts {
                if let Ok(v) = search(&mut conn, &ctx, Scope::Subtree, &filter)
                    && let Some(e) = v.into_iter().next()
                {
                    hit = Some(e);
                    break;
                }
            }
        }
        hit
    };
    let Some(raw) = found else {
        let _ = conn.unbind();
        return Ok(None);
    };
    let base = cfg
        .bases
        .iter()
        .find(|(b, s)| in_scope(&raw.dn, b, *s))
        .cloned();
    let matches_filter = !search(&mut conn, &raw.dn, Scope::Base, &cfg.filter)?.is_empty();
    let _ = conn.unbind();
    let entry = DirEntry {
        dn: raw.dn.clone(),
        line: 0,
        attrs: raw
            .attrs
            .iter()
            .flat_map(|(k, vs)| vs.iter().map(move |v| (k.clone(), v.clone(), 0)))
            .collect(),
    };
    Ok(Some(ObjectLookup {
        entry,
        base,
        matches_filter,
    }))
}
