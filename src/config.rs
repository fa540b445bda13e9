//! The daemon's TOML configuration, in two stages (as ripgrep does): the raw file, checked
//! for unknown keys and types with the line and column of every error, then the resolved
//! model with defaults applied and values validated.
//!
//! ```toml
//! [directory]
//! snapshot = "/var/lib/rcptgate/snapshot.bin"   # persisted, read at start (optional)
//! subaddress_separator = "+"                    # "" disables subaddressing
//! max_age = "24h"                               # then unknown -> tempfail; "0s" disables
//! debounce = "500ms"                            # quiet time after a source file changes
//! segments = false                              # true: one segment per group of sources
//! build_memory = "1GiB"                         # segmented builds: groups built at once fit
//! reject_text = "User unknown"
//!
//! [[source]]
//! name = "dirsync"
//! kind = "map"                                  # map | postfix | csv | ldif
//! path = "/srv/upload/customer.map"
//!
//! [policy]
//! listen = ["127.0.0.1:10040", "unix:/run/rcptgate/policy.sock"]
//!
//! [socketmap]
//! listen = ["127.0.0.1:10041"]
//!
//! [limits]
//! max_connections = 256
//! idle_timeout = "5m"
//!
//! [metrics]
//! listen = "127.0.0.1:9187"                     # /metrics (Prometheus) and /healthz
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::sources::Format;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    directory: RawDirectory,
    #[serde(default, rename = "source")]
    sources: Vec<RawSource>,
    #[serde(default)]
    policy: RawListeners,
    #[serde(default)]
    socketmap: RawListeners,
    #[serde(default)]
    milter: RawMilter,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    guard: RawGuard,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    control: RawControl,
    #[serde(default)]
    log: RawLog,
    dane: Option<RawDane>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDane {
    nameservers: Option<Vec<String>>,
    trust_anchor: Option<PathBuf>,
    rendering: Option<String>,
    fingerprint_digest: Option<String>,
    cache_size: Option<usize>,
    min_ttl: Option<String>,
    max_ttl: Option<String>,
    temp_ttl: Option<String>,
    query_timeout: Option<String>,
    decision_timeout: Option<String>,
    warm_routes: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMilter {
    #[serde(default)]
    listen: Vec<String>,
    header: Option<String>,
    header_details: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuard {
    max_deletions: Option<u64>,
    max_deletion_ratio: Option<f64>,
    deletion_grace: Option<String>,
    state: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    path: Option<PathBuf>,
    max_size: Option<u64>,
    keep: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    socket: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDirectory {
    snapshot: Option<PathBuf>,
    subaddress_separator: Option<String>,
    reject_text: Option<String>,
    syntax_text: Option<String>,
    tempfail_text: Option<String>,
    max_age: Option<String>,
    debounce: Option<String>,
    always_accept: Option<Vec<String>>,
    segments: Option<bool>,
    build_memory: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: String,
    kind: String,
    path: Option<PathBuf>,
    role: Option<String>,
    /// Accepted domains of this source (otherwise derived from its addresses).
    domains: Option<Vec<String>>,
    // kind = "ldap"
    url: Option<String>,
    starttls: Option<bool>,
    ca_file: Option<PathBuf>,
    bind: Option<String>,
    password_file: Option<PathBuf>,
    password_env: Option<String>,
    base_dns: Option<Vec<String>>,
    scope: Option<String>,
    filter: Option<String>,
    page_size: Option<i32>,
    timeout: Option<String>,
    retries: Option<u32>,
    interval: Option<String>,
    full_interval: Option<String>,
    include_disabled: Option<bool>,
    // kind = "graph"
    tenant_id: Option<String>,
    client_id: Option<String>,
    client_secret_file: Option<PathBuf>,
    client_secret_env: Option<String>,
    certificate_key: Option<PathBuf>,
    certificate: Option<PathBuf>,
    authority: Option<String>,
    graph_url: Option<String>,
    include_guests: Option<bool>,
    user_filter: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListeners {
    #[serde(default)]
    listen: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<usize>,
    idle_timeout: Option<String>,
    request_timeout: Option<String>,
    write_timeout: Option<String>,
    drain_timeout: Option<String>,
    max_request: Option<usize>,
    threads: Option<usize>,
}

/// Where a listener listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address (`127.0.0.1:10040`).
    Tcp(std::net::SocketAddr),
    /// A unix socket (`unix:/run/rcptgate/policy.sock`).
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// One configured source.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// Its name, unique in the config (logs, status, `--source`).
    pub name: String,
    /// How its file is read.
    pub format: Format,
    /// The file (every kind but `ldap`).
    pub path: PathBuf,
    /// Directory, additions or exceptions.
    pub role: crate::sources::Role,
    /// Accepted domains declared for this source; empty = derived from its addresses.
    pub domains: Vec<String>,
    /// `kind = "ldap"`: the directory, and how often to sync it.
    pub ldap: Option<crate::sources::ldap::LdapConfig>,
    /// `kind = "graph"`: the Entra ID tenant and app registration.
    pub graph: Option<crate::sources::graph::GraphConfig>,
    /// How often an LDAP source is synced.
    pub interval: Duration,
    /// Active Directory: syncs are incremental (uSNChanged) between full syncs this far
    /// apart; a full sync is what notices deleted objects.
    pub full_interval: Duration,
}

impl SourceConfig {
    /// A file source in the directory role, its format from the file name (`.map`, `.csv`,
    /// `.ldif`/`.ldf`, anything else a Postfix table); `None` for an empty name.
    pub fn file(name: &str, path: PathBuf) -> Option<SourceConfig> {
        (!name.is_empty()).then(|| SourceConfig {
            name: name.to_owned(),
            format: Format::from_path(&path),
            path,
            role: crate::sources::Role::Directory,
            domains: Vec::new(),
            ldap: None,
            graph: None,
            interval: Duration::from_secs(900),
            full_interval: Duration::from_secs(86_400),
        })
    }
}

/// The resolved configuration: [`Config::load`] reads it from TOML, or build it in code from
/// [`Config::default`] (no sources, no listeners, the documented defaults) and its fields.
///
/// ```
/// use rcptgate::config::{Config, SourceConfig};
/// let mut config = Config::default();
/// config.sources.push(SourceConfig::file("dirsync", "config/example.map".into()).unwrap());
/// assert_eq!(config.always_accept, ["postmaster"]);
/// ```
#[derive(Debug, Clone)]
pub struct Config {
    /// The persisted snapshot: read at start, replaced atomically after every good build.
    pub snapshot: Option<PathBuf>,
    /// After this long without a successful build, unknown recipients are deferred instead
    /// of rejected (DESIGN.md §4 step 7). `None` disables (`max_age = "0s"`).
    pub max_age: Option<Duration>,
    /// Quiet time after a source file changes before rebuilding.
    pub debounce: Duration,
    /// Keep the directory as a set of segments, one per group of sources that share
    /// domains (see README, Segments): a changed source file rebuilds and writes only its
    /// group's segment. Off by default.
    pub segments: bool,
    /// Segmented mode: the memory that the groups being built at once may take, estimated
    /// from their files' sizes (`build_memory = "1GiB"` by default). Groups are built in
    /// parallel, one per core, while they fit; a group larger than the budget is built alone.
    pub build_memory: u64,
    /// Subaddress separators (`+` by default; empty disables).
    pub separators: String,
    /// Local parts accepted in every domain we own (`postmaster` by default).
    pub always_accept: Vec<String>,
    /// Log level when `RUST_LOG` is not set (`info` by default).
    pub log_level: String,
    /// Log as JSON lines instead of text.
    pub log_json: bool,
    /// Reply texts of the policy service.
    pub texts: crate::proto::policy::Texts,
    /// Where the directory comes from, in order (the first claim of an address wins a tie).
    pub sources: Vec<SourceConfig>,
    /// Postfix policy listeners.
    pub policy_listen: Vec<ListenAddr>,
    /// Postfix socketmap listeners.
    pub socketmap_listen: Vec<ListenAddr>,
    /// Milter listeners (`smtpd_milters`, `INPUT_MAIL_FILTER`).
    pub milter_listen: Vec<ListenAddr>,
    /// The header the milter adds per accepted recipient (and deletes when it comes in):
    /// `None` adds none.
    pub milter_header: Option<String>,
    /// The milter header also names the recipient's customer and route.
    pub milter_header_details: bool,
    /// Connection limits of every listener.
    pub limits: crate::server::Limits,
    /// Worker threads of the daemon's runtime, where every connection is served (builds and
    /// syncs run on threads of their own). 1 by default: each request is then read, answered
    /// and written on one thread with no wake-up of another (2 workers cost 8-35 % more CPU
    /// per request in the policy benchmark, 14-18 % end to end through Postfix); one thread
    /// answers ~80k requests/s over TCP.
    pub threads: usize,
    /// `/metrics` and `/healthz` (TCP only).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Deletion guard and tombstones.
    pub guard: GuardConfig,
    /// The audit log, if kept.
    pub audit: Option<AuditConfig>,
    /// The control socket (`rcptgate status`, `approve`, `conflicts`), owner-only.
    pub control: Option<PathBuf>,
    /// Outbound TLS policy from DANE (`[dane]`): the `tls_policy` socketmap map and
    /// [`crate::Handle::tls_policy`]. `None` without a `[dane]` section.
    pub dane: Option<crate::dane::DaneConfig>,
}

/// The deletion guard and tombstones (DESIGN.md §6).
#[derive(Debug, Clone, PartialEq)]
pub struct GuardConfig {
    /// A build that removes more addresses than this is held.
    pub max_deletions: u64,
    /// ... or more than this share of the addresses in service.
    pub max_deletion_ratio: f64,
    /// A removed address stays accepted (`tombstone`) this long; zero turns tombstones off.
    pub deletion_grace: Duration,
    /// Where removal times are kept across restarts (default: the snapshot path +
    /// `.state.json`; none without a snapshot path).
    pub state: Option<PathBuf>,
}

impl Config {
    /// What `rcptgate serve` needs beyond a valid config (an embedded service needs no
    /// listener): at least one policy or socketmap listener.
    pub fn check_daemon(&self, path: &Path) -> Result<(), ConfigError> {
        if self.policy_listen.is_empty()
            && self.socketmap_listen.is_empty()
            && self.milter_listen.is_empty()
        {
            return Err(ConfigError::Value {
                path: path.display().to_string(),
                key: "policy.listen".into(),
                message:
                    "no listener configured (set policy.listen, socketmap.listen or milter.listen)"
                        .into(),
            });
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            snapshot: None,
            max_age: Some(Duration::from_secs(86_400)),
            debounce: Duration::from_millis(500),
            segments: false,
            build_memory: DEFAULT_BUILD_MEMORY,
            separators: "+".into(),
            always_accept: vec!["postmaster".into()],
            log_level: "info".into(),
            log_json: false,
            texts: crate::proto::policy::Texts::default(),
            sources: Vec::new(),
            policy_listen: Vec::new(),
            socketmap_listen: Vec::new(),
            milter_listen: Vec::new(),
            milter_header: None,
            milter_header_details: false,
            limits: crate::server::Limits::default(),
            threads: 1,
            metrics_listen: None,
            guard: GuardConfig::default(),
            audit: None,
            control: None,
            dane: None,
        }
    }
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            max_deletions: 500,
            max_deletion_ratio: 0.10,
            deletion_grace: Duration::from_secs(7 * 86_400),
            state: None,
        }
    }
}

/// The audit log: one JSON line per publish, rotated by size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// The log file.
    pub path: PathBuf,
    /// Rotate when the file would grow beyond this many bytes.
    pub max_size: u64,
    /// Rotated files kept (`audit.log.1` … `audit.log.N`).
    pub keep: u32,
}

/// A configuration that cannot be used, with the file and where in it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
// Each variant's `#[error]` text is its documentation.
#[allow(missing_docs)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {key}: {message}")]
    Value {
        path: String,
        key: String,
        message: String,
    },
}

/// Default `directory.build_memory`.
pub const DEFAULT_BUILD_MEMORY: u64 = 1 << 30;

/// Parse a size such as `"512MiB"`, `"2GiB"`, `"64M"` or `"1048576"` (bytes; K, M, G, T are
/// powers of 1024, with or without `iB` or `B`).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let unit = unit.trim_start();
    let unit = unit
        .strip_suffix("iB")
        .or_else(|| unit.strip_suffix('B'))
        .unwrap_or(unit);
    let shift = match unit {
        "" => 0,
        "K" | "k" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

/// Parse a duration such as `"90s"`, `"15m"`, `"24h"`, `"7d"`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let secs = match unit {
        "ms" => return Some(Duration::from_millis(n)),
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    Some(Duration::from_secs(secs))
}

fn parse_listen(s: &str) -> Option<ListenAddr> {
    match s.strip_prefix("unix:") {
        Some(p) if !p.is_empty() => Some(ListenAddr::Unix(PathBuf::from(p))),
        Some(_) => None,
        None => s.parse().ok().map(ListenAddr::Tcp),
    }
}

impl Config {
    /// Read and validate a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&path.display().to_string(), &text)
    }

    /// Parse configuration text; `name` is used in error messages.
    pub fn parse(name: &str, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((0, 0), |sp| line_col(text, sp.start));
            ConfigError::Syntax {
                path: name.to_owned(),
                line,
                column,
                message: e.message().to_owned(),
            }
        })?;
        let bad = |key: &str, message: String| ConfigError::Value {
            path: name.to_owned(),
            key: key.to_owned(),
            message,
        };
        if raw.sources.is_empty() {
            return Err(bad(
                "source",
                "no source configured (add a [[source]] with name, kind and path)".into(),
            ));
        }
        let mut sources = Vec::new();
        for (i, s) in raw.sources.iter().enumerate() {
            let format = Format::parse(&s.kind).ok_or_else(|| {
                bad(
                    &format!("source[{i}].kind"),
                    format!(
                        "{:?} is not one of map, postfix, csv, ldif, ldap, graph",
                        s.kind
                    ),
                )
            })?;
            if sources.iter().any(|o: &SourceConfig| o.name == s.name) {
                return Err(bad(
                    &format!("source[{i}].name"),
                    format!("{:?} is used twice", s.name),
                ));
            }
            let role = match &s.role {
                None => crate::sources::Role::Directory,
                Some(r) => crate::sources::Role::parse(r).ok_or_else(|| {
                    bad(
                        &format!("source[{i}].role"),
                        format!("{r:?} is not one of directory, additions, exceptions"),
                    )
                })?,
            };
            let key = |k: &str| format!("source[{i}].{k}");
            let graph_only = [
                ("tenant_id", s.tenant_id.is_some()),
                ("client_id", s.client_id.is_some()),
                ("client_secret_file", s.client_secret_file.is_some()),
                ("client_secret_env", s.client_secret_env.is_some()),
                ("certificate_key", s.certificate_key.is_some()),
                ("certificate", s.certificate.is_some()),
                ("authority", s.authority.is_some()),
                ("graph_url", s.graph_url.is_some()),
                ("include_guests", s.include_guests.is_some()),
                ("user_filter", s.user_filter.is_some()),
            ];
            let graph = if format == Format::Graph {
                Some(graph_config(s, &key).map_err(|(k, m)| bad(&k, m))?)
            } else {
                if let Some((k, _)) = graph_only.iter().find(|(_, set)| *set) {
                    return Err(bad(
                        &key(k),
                        format!("only for kind = \"graph\", not {:?}", s.kind),
                    ));
                }
                None
            };
            let ldap = if format == Format::Ldap {
                Some(ldap_config(s, &key).map_err(|(k, m)| bad(&k, m))?)
            } else if format == Format::Graph {
                let ldap_only = [
                    ("url", s.url.is_some()),
                    ("bind", s.bind.is_some()),
                    ("base_dns", s.base_dns.is_some()),
                    ("filter", s.filter.is_some()),
                    ("password_file", s.password_file.is_some()),
                    ("password_env", s.password_env.is_some()),
                    ("starttls", s.starttls.is_some()),
                ];
                if let Some((k, _)) = ldap_only.iter().find(|(_, set)| *set) {
                    return Err(bad(
                        &key(k),
                        "only for kind = \"ldap\", not \"graph\"".into(),
                    ));
                }
                None
            } else {
                let ldap_only = [
                    ("url", s.url.is_some()),
                    ("bind", s.bind.is_some()),
                    ("base_dns", s.base_dns.is_some()),
                    ("filter", s.filter.is_some()),
                    ("ca_file", s.ca_file.is_some()),
                    ("password_file", s.password_file.is_some()),
                    ("password_env", s.password_env.is_some()),
                    ("interval", s.interval.is_some()),
                    ("full_interval", s.full_interval.is_some()),
                ];
                if let Some((k, _)) = ldap_only.iter().find(|(_, set)| *set) {
                    return Err(bad(
                        &key(k),
                        format!("only for kind = \"ldap\", not {:?}", s.kind),
                    ));
                }
                None
            };
            let live = ldap.is_some() || graph.is_some();
            let path = match (&s.path, live) {
                (Some(p), false) => p.clone(),
                (None, false) => {
                    return Err(bad(&key("path"), "missing: the source file".into()));
                }
                (Some(_), true) => {
                    return Err(bad(
                        &key("path"),
                        "a live source (LDAP, Graph) has no path".into(),
                    ));
                }
                (None, true) => PathBuf::new(),
            };
            let interval = match &s.interval {
                None => Duration::from_secs(15 * 60),
                Some(t) => parse_duration(t)
                    .filter(|d| *d >= Duration::from_secs(1))
                    .ok_or_else(|| {
                        bad(
                            &key("interval"),
                            format!("{t:?} is not a duration like \"15m\""),
                        )
                    })?,
            };
            let full_interval = match &s.full_interval {
                None => Duration::from_secs(6 * 3600),
                Some(t) => parse_duration(t)
                    .filter(|d| *d >= interval)
                    .ok_or_else(|| {
                        bad(
                            &key("full_interval"),
                            format!("{t:?} is not a duration like \"6h\", at least the interval"),
                        )
                    })?,
            };
            for d in s.domains.iter().flatten() {
                if crate::address::normalize_domain(d).is_err() {
                    return Err(bad(&key("domains"), format!("{d:?} is not a domain name")));
                }
            }
            sources.push(SourceConfig {
                name: s.name.clone(),
                format,
                path,
                role,
                domains: s
                    .domains
                    .iter()
                    .flatten()
                    .filter_map(|d| crate::address::normalize_domain(d).ok())
                    .collect(),
                ldap,
                graph,
                interval,
                full_interval,
            });
        }
        let listen = |key: &str, list: &[String]| -> Result<Vec<ListenAddr>, ConfigError> {
            list.iter()
                .map(|l| {
                    parse_listen(l).ok_or_else(|| {
                        bad(key, format!("{l:?} is neither HOST:PORT nor unix:PATH"))
                    })
                })
                .collect()
        };
        let policy_listen = listen("policy.listen", &raw.policy.listen)?;
        let socketmap_listen = listen("socketmap.listen", &raw.socketmap.listen)?;
        let milter_listen = listen("milter.listen", &raw.milter.listen)?;
        let milter_header = match raw.milter.header.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(h) if h.bytes().all(|b| b.is_ascii_graphic() && b != b':') => Some(h.to_owned()),
            Some(h) => {
                return Err(bad(
                    "milter.header",
                    format!("{h:?} is not a header name (printable ASCII, no colon)"),
                ));
            }
        };
        let threads = match raw.limits.threads {
            Some(0) => return Err(bad("limits.threads", "must be at least 1".into())),
            Some(n) => n,
            None => 1,
        };
        let mut limits = crate::server::Limits::default();
        if let Some(n) = raw.limits.max_connections {
            if n == 0 {
                return Err(bad("limits.max_connections", "must be at least 1".into()));
            }
            limits.max_connections = n;
        }
        for (key, value, slot) in [
            (
                "limits.idle_timeout",
                &raw.limits.idle_timeout,
                &mut limits.idle_timeout,
            ),
            (
                "limits.request_timeout",
                &raw.limits.request_timeout,
                &mut limits.request_timeout,
            ),
            (
                "limits.write_timeout",
                &raw.limits.write_timeout,
                &mut limits.write_timeout,
            ),
            (
                "limits.drain_timeout",
                &raw.limits.drain_timeout,
                &mut limits.drain_timeout,
            ),
        ] {
            if let Some(t) = value {
                *slot = parse_duration(t)
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| bad(key, format!("{t:?} is not a duration like \"5m\"")))?;
            }
        }
        if let Some(n) = raw.limits.max_request {
            if n < 1024 {
                return Err(bad(
                    "limits.max_request",
                    "must be at least 1024 bytes".into(),
                ));
            }
            limits.policy.max_request = n;
        }
        let mut texts = crate::proto::policy::Texts::default();
        for (key, value, slot) in [
            (
                "directory.reject_text",
                &raw.directory.reject_text,
                &mut texts.unknown,
            ),
            (
                "directory.syntax_text",
                &raw.directory.syntax_text,
                &mut texts.syntax,
            ),
            (
                "directory.tempfail_text",
                &raw.directory.tempfail_text,
                &mut texts.tempfail,
            ),
        ] {
            if let Some(v) = value {
                if v.contains(['\n', '\r']) || v.len() > 200 {
                    return Err(bad(
                        key,
                        "must be one line of at most 200 characters".into(),
                    ));
                }
                *slot = v.clone();
            }
        }
        let separators = raw
            .directory
            .subaddress_separator
            .unwrap_or_else(|| "+".into());
        if !separators.is_ascii() || separators.contains(['@', '.', '"']) {
            return Err(bad(
                "directory.subaddress_separator",
                format!("{separators:?}: use ASCII characters other than @ . \""),
            ));
        }
        let duration = |key: &str, v: &Option<String>, default: Duration| match v {
            None => Ok(default),
            Some(t) => parse_duration(t)
                .ok_or_else(|| bad(key, format!("{t:?} is not a duration like \"24h\""))),
        };
        let max_age = duration(
            "directory.max_age",
            &raw.directory.max_age,
            Duration::from_secs(86_400),
        )?;
        let debounce = duration(
            "directory.debounce",
            &raw.directory.debounce,
            Duration::from_millis(500),
        )?;
        let build_memory = match &raw.directory.build_memory {
            None => DEFAULT_BUILD_MEMORY,
            Some(t) => parse_size(t).filter(|&n| n >= 1 << 20).ok_or_else(|| {
                bad(
                    "directory.build_memory",
                    format!("{t:?} is not a size of at least 1MiB like \"512MiB\" or \"2GiB\""),
                )
            })?,
        };
        let always_accept = raw
            .directory
            .always_accept
            .unwrap_or_else(|| vec!["postmaster".into()]);
        for a in &always_accept {
            if a.is_empty()
                || a.len() > crate::address::MAX_LOCAL
                || !a
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(bad(
                    "directory.always_accept",
                    format!("{a:?} is not a plain local part (letters, digits, - _ .)"),
                ));
            }
        }
        let log_level = raw.log.level.unwrap_or_else(|| "info".into());
        if !["error", "warn", "info", "debug", "trace"].contains(&log_level.as_str()) {
            return Err(bad(
                "log.level",
                format!("{log_level:?}: use error, warn, info, debug or trace"),
            ));
        }
        let log_json = match raw.log.format.as_deref() {
            None | Some("text") => false,
            Some("json") => true,
            Some(other) => {
                return Err(bad("log.format", format!("{other:?}: use text or json")));
            }
        };
        let metrics_listen = match &raw.metrics.listen {
            None => None,
            Some(l) => Some(
                l.parse()
                    .map_err(|_| bad("metrics.listen", format!("{l:?} is not HOST:PORT")))?,
            ),
        };
        let mut guard = GuardConfig::default();
        if let Some(n) = raw.guard.max_deletions {
            guard.max_deletions = n;
        }
        if let Some(r) = raw.guard.max_deletion_ratio {
            if !(0.0..=1.0).contains(&r) {
                return Err(bad(
                    "guard.max_deletion_ratio",
                    format!("{r} is not between 0 and 1 (0.10 is 10 %)"),
                ));
            }
            guard.max_deletion_ratio = r;
        }
        guard.deletion_grace = duration(
            "guard.deletion_grace",
            &raw.guard.deletion_grace,
            guard.deletion_grace,
        )?;
        guard.state = raw.guard.state.or_else(|| {
            raw.directory.snapshot.as_ref().map(|p| {
                let mut s = p.clone().into_os_string();
                s.push(".state.json");
                PathBuf::from(s)
            })
        });
        let audit = match raw.audit.path {
            None => None,
            Some(path) => Some(AuditConfig {
                path,
                max_size: match raw.audit.max_size {
                    Some(n) if n < 4096 => {
                        return Err(bad("audit.max_size", "must be at least 4096 bytes".into()));
                    }
                    Some(n) => n,
                    None => 10 << 20,
                },
                keep: raw.audit.keep.unwrap_or(5),
            }),
        };
        let dane = match raw.dane {
            None => None,
            Some(d) => Some(dane_config(d, &bad, &duration)?),
        };
        Ok(Config {
            dane,
            guard,
            audit,
            control: raw.control.socket,
            metrics_listen,
            snapshot: raw.directory.snapshot,
            max_age: (!max_age.is_zero()).then_some(max_age),
            debounce,
            segments: raw.directory.segments.unwrap_or(false),
            build_memory,
            separators,
            always_accept,
            log_level,
            log_json,
            texts,
            sources,
            policy_listen,
            socketmap_listen,
            milter_listen,
            milter_header,
            milter_header_details: raw.milter.header_details.unwrap_or(false),
            limits,
            threads,
        })
    }
}

/// Reads one duration key: (key, value, default).
type DurationParser<'a> =
    dyn Fn(&str, &Option<String>, Duration) -> Result<Duration, ConfigError> + 'a;

/// The settings of a `kind = "graph"` source; errors as (key, message).
fn graph_config(
    s: &RawSource,
    key: &dyn Fn(&str) -> String,
) -> Result<crate::sources::graph::GraphConfig, (String, String)> {
    use crate::sources::graph::{Credential, GraphConfig};
    use crate::sources::ldap::PasswordSource;
    let need = |v: &Option<String>, k: &str, what: &str| {
        v.clone()
            .filter(|x| !x.trim().is_empty())
            .ok_or_else(|| (key(k), format!("missing: {what}")))
    };
    let tenant_id = need(&s.tenant_id, "tenant_id", "the directory (tenant) ID")?;
    let client_id = need(&s.client_id, "client_id", "the application (client) ID")?;
    let credential = match (
        &s.client_secret_file,
        &s.client_secret_env,
        &s.certificate_key,
        &s.certificate,
    ) {
        (Some(f), None, None, None) => Credential::Secret(PasswordSource::File(f.clone())),
        (None, Some(v), None, None) => Credential::Secret(PasswordSource::Env(v.clone())),
        (None, None, Some(k), Some(c)) => Credential::Certificate {
            key: k.clone(),
            cert: c.clone(),
        },
        (None, None, None, None) => {
            return Err((
                key("client_secret_file"),
                "missing: client_secret_file, client_secret_env, or certificate_key with certificate".into(),
            ));
        }
        _ => {
            return Err((
                key("client_secret_file"),
                "one credential: client_secret_file, client_secret_env, or certificate_key with certificate".into(),
            ));
        }
    };
    let https = |v: &Option<String>, k: &str, default: &str| -> Result<String, (String, String)> {
        let u = v.clone().unwrap_or_else(|| default.to_owned());
        if !u.starts_with("https://") {
            return Err((key(k), format!("{u:?}: must be https://")));
        }
        Ok(u.trim_end_matches('/').to_owned())
    };
    let timeout = match &s.timeout {
        None => Duration::from_secs(60),
        Some(t) => parse_duration(t).filter(|d| !d.is_zero()).ok_or_else(|| {
            (
                key("timeout"),
                format!("{t:?} is not a duration like \"60s\""),
            )
        })?,
    };
    let page_size = s.page_size.unwrap_or(999);
    if !(1..=999).contains(&page_size) {
        return Err((
            key("page_size"),
            format!("{page_size}: Graph pages hold 1 to 999 objects"),
        ));
    }
    let mut g = GraphConfig::new(&tenant_id, &client_id, credential);
    g.authority = https(
        &s.authority,
        "authority",
        "https://login.microsoftonline.com",
    )?;
    g.graph_url = https(&s.graph_url, "graph_url", "https://graph.microsoft.com")?;
    g.ca_file = s.ca_file.clone();
    g.include_disabled = s.include_disabled.unwrap_or(true);
    g.include_guests = s.include_guests.unwrap_or(false);
    g.user_filter = s.user_filter.clone().filter(|f| !f.trim().is_empty());
    g.page_size = page_size as u32;
    g.timeout = timeout;
    g.retries = s.retries.unwrap_or(4);
    Ok(g)
}

/// The `[dane]` section.
fn dane_config(
    d: RawDane,
    bad: &dyn Fn(&str, String) -> ConfigError,
    duration: &DurationParser<'_>,
) -> Result<crate::dane::DaneConfig, ConfigError> {
    use crate::dane::{DaneConfig, Digest, Rendering};
    let mut c = DaneConfig::default();
    for ns in d.nameservers.unwrap_or_default() {
        let addr = ns
            .parse::<std::net::SocketAddr>()
            .or_else(|_| {
                ns.parse::<std::net::IpAddr>()
                    .map(|ip| std::net::SocketAddr::new(ip, 53))
            })
            .map_err(|_| bad("dane.nameservers", format!("{ns:?} is not IP or IP:PORT")))?;
        c.resolver.nameservers.push(addr);
    }
    if let Some(p) = d.trust_anchor {
        if !p.is_file() {
            return Err(bad(
                "dane.trust_anchor",
                format!(
                    "{}: no such file (DNSKEY records of the root in zone-file syntax)",
                    p.display()
                ),
            ));
        }
        c.resolver.trust_anchor = Some(p);
    }
    c.rendering = match d.rendering.as_deref() {
        None | Some("dane") => Rendering::Dane,
        Some("fingerprint") => Rendering::Fingerprint,
        Some(o) => {
            return Err(bad(
                "dane.rendering",
                format!("{o:?}: use dane or fingerprint"),
            ));
        }
    };
    c.digest = match d.fingerprint_digest.as_deref() {
        None | Some("sha256") => Digest::Sha256,
        Some("sha512") => Digest::Sha512,
        Some(o) => {
            return Err(bad(
                "dane.fingerprint_digest",
                format!("{o:?}: use sha256 or sha512 (as smtp_tls_fingerprint_digest)"),
            ));
        }
    };
    if let Some(n) = d.cache_size {
        if n == 0 {
            return Err(bad("dane.cache_size", "must be at least 1".into()));
        }
        c.cache_size = n;
    }
    c.min_ttl = duration("dane.min_ttl", &d.min_ttl, c.min_ttl)?;
    c.max_ttl = duration("dane.max_ttl", &d.max_ttl, c.max_ttl)?;
    if c.max_ttl < c.min_ttl {
        return Err(bad("dane.max_ttl", "is shorter than min_ttl".into()));
    }
    c.temp_ttl = duration("dane.temp_ttl", &d.temp_ttl, c.temp_ttl)?;
    c.resolver.timeout = duration("dane.query_timeout", &d.query_timeout, c.resolver.timeout)?;
    c.decision_timeout = duration(
        "dane.decision_timeout",
        &d.decision_timeout,
        c.decision_timeout,
    )?;
    if c.decision_timeout.is_zero() || c.resolver.timeout.is_zero() {
        return Err(bad(
            "dane.decision_timeout",
            "timeouts must be above zero".into(),
        ));
    }
    c.warm_routes = d.warm_routes.unwrap_or(true);
    Ok(c)
}

/// The LDAP settings of a `kind = "ldap"` source; errors as (key, message).
fn ldap_config(
    s: &RawSource,
    key: &dyn Fn(&str) -> String,
) -> Result<crate::sources::ldap::LdapConfig, (String, String)> {
    use crate::sources::ldap::{DEFAULT_FILTER, LdapConfig, PasswordSource};
    let url = s.url.clone().ok_or_else(|| {
        (
            key("url"),
            "missing: ldaps://HOST[:PORT] or ldap://HOST[:PORT]".into(),
        )
    })?;
    if !(url.starts_with("ldaps://") || url.starts_with("ldap://")) {
        return Err((key("url"), format!("{url:?} is not ldaps://… or ldap://…")));
    }
    let starttls = s.starttls.unwrap_or(false);
    if url.starts_with("ldap://") && !starttls && s.bind.is_some() {
        return Err((
            key("starttls"),
            "a bind over plain ldap:// would send the password in the clear: use ldaps:// or set starttls = true".into(),
        ));
    }
    let password = match (&s.password_file, &s.password_env) {
        (Some(_), Some(_)) => {
            return Err((
                key("password_file"),
                "set password_file or password_env, not both".into(),
            ));
        }
        (Some(p), None) => PasswordSource::File(p.clone()),
        (None, Some(v)) => PasswordSource::Env(v.clone()),
        (None, None) if s.bind.is_some() => {
            return Err((
                key("password_file"),
                "a bind needs a password: password_file = PATH or password_env = VARIABLE".into(),
            ));
        }
        (None, None) => PasswordSource::None,
    };
    let default_scope = match s.scope.as_deref().unwrap_or("sub") {
        "sub" | "subtree" => ldap3::Scope::Subtree,
        "one" | "onelevel" => ldap3::Scope::OneLevel,
        other => return Err((key("scope"), format!("{other:?} is not sub or one"))),
    };
    let mut bases = Vec::new();
    for b in s.base_dns.iter().flatten() {
        let (scope, dn) = match b.split_once(':') {
            Some(("one", dn)) => (ldap3::Scope::OneLevel, dn),
            Some(("sub", dn)) => (ldap3::Scope::Subtree, dn),
            _ => (default_scope, b.as_str()),
        };
        if !dn.contains('=') {
            return Err((
                key("base_dns"),
                format!("{b:?} is not a DN like \"OU=AADDC Users,DC=corp,DC=example\""),
            ));
        }
        bases.push((dn.trim().to_owned(), scope));
    }
    if bases.is_empty() {
        return Err((key("base_dns"), "missing: at least one base DN".into()));
    }
    let filter = s
        .filter
        .clone()
        .unwrap_or_else(|| DEFAULT_FILTER.to_owned());
    if !(filter.starts_with('(') && filter.ends_with(')')) {
        return Err((
            key("filter"),
            format!("{filter:?} is not an LDAP filter like \"(objectClass=user)\""),
        ));
    }
    let page_size = s.page_size.unwrap_or(1000);
    if !(1..=100_000).contains(&page_size) {
        return Err((
            key("page_size"),
            "must be between 1 and 100000 (AD allows 1000)".into(),
        ));
    }
    let timeout = match &s.timeout {
        None => Duration::from_secs(30),
        Some(t) => parse_duration(t).filter(|d| !d.is_zero()).ok_or_else(|| {
            (
                key("timeout"),
                format!("{t:?} is not a duration like \"30s\""),
            )
        })?,
    };
    Ok(LdapConfig {
        url,
        starttls,
        ca_file: s.ca_file.clone(),
        bind: s.bind.clone(),
        password,
        bases,
        filter,
        page_size,
        timeout,
        retries: s.retries.unwrap_or(3),
        include_disabled: s.include_disabled.unwrap_or(true),
    })
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |n| before.len() - n - 1)
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[directory]
snapshot = "/tmp/x.snap"
subaddress_separator = "+-"
reject_text = "No such user here"

[[source]]
name = "dirsync"
kind = "map"
path = "config/example.map"

[policy]
listen = ["127.0.0.1:10040", "unix:/run/rcptgate/policy.sock"]

[limits]
idle_timeout = "90s"
"#;

    #[test]
    fn a_good_config() {
        let c = Config::parse("t.toml", GOOD).expect("valid");
        assert_eq!(
            (c.sources[0].format, c.sources[0].path.as_path()),
            (Format::Map, Path::new("config/example.map"))
        );
        assert_eq!(
            c.policy_listen[1],
            ListenAddr::Unix("/run/rcptgate/policy.sock".into())
        );
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(90));
        assert_eq!(c.texts.unknown, "No such user here");
        assert_eq!(c.separators, "+-");
        assert_eq!(c.threads, 1, "one request-path thread by default");
        let two = GOOD.replace(
            "idle_timeout = \"90s\"",
            "idle_timeout = \"90s\"\nthreads = 2",
        );
        assert_eq!(Config::parse("t.toml", &two).expect("valid").threads, 2);
        let none = GOOD.replace(
            "idle_timeout = \"90s\"",
            "idle_timeout = \"90s\"\nthreads = 0",
        );
        let e = Config::parse("t.toml", &none).expect_err("0").to_string();
        assert_eq!(e, "t.toml: limits.threads: must be at least 1");
    }

    #[test]
    fn dane_settings() {
        assert!(Config::parse("t.toml", GOOD).expect("valid").dane.is_none());
        let with = format!(
            "{GOOD}\n[dane]\nnameservers = [\"127.0.0.1:5353\", \"::1\"]\nrendering = \"fingerprint\"\n\
fingerprint_digest = \"sha512\"\nmin_ttl = \"1m\"\nmax_ttl = \"2h\"\ndecision_timeout = \"5s\"\n"
        );
        let d = Config::parse("t.toml", &with)
            .expect("valid")
            .dane
            .expect("dane");
        assert_eq!(d.resolver.nameservers[0].port(), 5353);
        assert_eq!(d.resolver.nameservers[1].port(), 53);
        assert_eq!(d.rendering, crate::dane::Rendering::Fingerprint);
        assert_eq!(d.digest, crate::dane::Digest::Sha512);
        assert_eq!(
            (d.min_ttl, d.max_ttl),
            (Duration::from_secs(60), Duration::from_secs(7200))
        );
        assert_eq!(d.decision_timeout, Duration::from_secs(5));
        assert!(d.warm_routes);
        for (bad, key) in [
            ("nameservers = [\"dns.example\"]", "dane.nameservers"),
            ("rendering = \"tlsa\"", "dane.rendering"),
            (
                "trust_anchor = \"/nonexistent/root.key\"",
                "dane.trust_anchor",
            ),
            ("min_ttl = \"1h\"\nmax_ttl = \"1m\"", "dane.max_ttl"),
            ("cache_size = 0", "dane.cache_size"),
        ] {
            let e = Config::parse("t.toml", &format!("{GOOD}\n[dane]\n{bad}\n"))
                .expect_err(bad)
                .to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let unknown = GOOD.replace("[limits]", "[limits]\nmax_conections = 5");
        let e = Config::parse("t.toml", &unknown)
            .expect_err("unknown key")
            .to_string();
        assert!(
            e.starts_with("t.toml:16:1: unknown field `max_conections`"),
            "{e}"
        );
        let typed = GOOD.replace("idle_timeout = \"90s\"", "idle_timeout = 90");
        let e = Config::parse("t.toml", &typed)
            .expect_err("type")
            .to_string();
        assert!(e.starts_with("t.toml:16:16: invalid type"), "{e}");
        let dur = GOOD.replace("\"90s\"", "\"soon\"");
        let e = Config::parse("t.toml", &dur)
            .expect_err("duration")
            .to_string();
        assert_eq!(
            e,
            "t.toml: limits.idle_timeout: \"soon\" is not a duration like \"5m\""
        );
        let kind = GOOD.replace("kind = \"map\"", "kind = \"ldap3\"");
        let e = Config::parse("t.toml", &kind)
            .expect_err("kind")
            .to_string();
        assert!(e.starts_with("t.toml: source[0].kind:"), "{e}");
        let listen = GOOD.replace("127.0.0.1:10040", "localhost");
        let e = Config::parse("t.toml", &listen)
            .expect_err("listen")
            .to_string();
        assert!(e.starts_with("t.toml: policy.listen: \"localhost\""), "{e}");
        let none = "[directory]\n";
        let e = Config::parse("t.toml", none)
            .expect_err("no source")
            .to_string();
        assert!(e.starts_with("t.toml: source: no source configured"), "{e}");
        // A config without listeners serves a library; the daemon needs one.
        let quiet = GOOD.replace(
            "[policy]\nlisten = [\"127.0.0.1:10040\", \"unix:/run/rcptgate/policy.sock\"]\n",
            "",
        );
        assert_ne!(quiet, GOOD);
        let c = Config::parse("t.toml", &quiet).expect("valid without listeners");
        let e = c
            .check_daemon(Path::new("t.toml"))
            .expect_err("daemon")
            .to_string();
        assert!(e.contains("no listener configured"), "{e}");
    }

    #[test]
    fn lifecycle_settings() {
        let c = Config::parse("t.toml", GOOD).expect("valid");
        assert_eq!(c.guard.max_deletions, 500);
        assert_eq!(c.guard.deletion_grace, Duration::from_secs(7 * 86_400));
        assert_eq!(c.guard.state, Some(PathBuf::from("/tmp/x.snap.state.json")));
        assert_eq!(c.sources[0].role, crate::sources::Role::Directory);
        let more = format!(
            "{GOOD}\n[guard]\nmax_deletion_ratio = 0.25\ndeletion_grace = \"0s\"\n\n[audit]\npath = \"/var/log/a.log\"\n"
        )
        .replace("kind = \"map\"", "kind = \"map\"\nrole = \"exceptions\"");
        let c = Config::parse("t.toml", &more).expect("valid");
        assert_eq!(c.guard.max_deletion_ratio, 0.25);
        assert!(c.guard.deletion_grace.is_zero());
        assert_eq!(c.sources[0].role, crate::sources::Role::Exceptions);
        let audit = c.audit.expect("audit");
        assert_eq!((audit.max_size, audit.keep), (10 << 20, 5));
        let bad = more.replace("0.25", "25.0");
        let e = Config::parse("t.toml", &bad)
            .expect_err("ratio")
            .to_string();
        assert!(e.starts_with("t.toml: guard.max_deletion_ratio:"), "{e}");
        let bad = more.replace("\"exceptions\"", "\"allow\"");
        let e = Config::parse("t.toml", &bad).expect_err("role").to_string();
        assert!(e.starts_with("t.toml: source[0].role:"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15m"), Some(Duration::from_secs(900)));
        assert_eq!(parse_duration("7d"), Some(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("15"), None);
        assert_eq!(parse_duration("m"), None);
        assert_eq!(parse_duration("5y"), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("2GiB"), Some(2 << 30));
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("1 GB"), Some(1 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("16Ki"), None);
        assert_eq!(parse_size("GiB"), None);
        assert_eq!(parse_size("-1G"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }

    #[test]
    fn build_memory_is_checked() {
        let with = |v: &str| {
            GOOD.replace(
                "[directory]\n",
                &format!("[directory]\nbuild_memory = {v:?}\n"),
            )
        };
        let c = Config::parse("t.toml", &with("256MiB")).expect("valid");
        assert_eq!(c.build_memory, 256 << 20);
        let c = Config::parse("t.toml", GOOD).expect("valid");
        assert_eq!(c.build_memory, DEFAULT_BUILD_MEMORY);
        let e = Config::parse("t.toml", &with("12KiB"))
            .expect_err("too small")
            .to_string();
        assert!(
            e.starts_with("t.toml: directory.build_memory: \"12KiB\""),
            "{e}"
        );
        assert!(Config::parse("t.toml", &with("lots")).is_err());
    }
}
