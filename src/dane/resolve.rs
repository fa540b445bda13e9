//! DNS for DANE: a validating hickory resolver over UDP and TCP, every answer classified by
//! the proof of every record in it (never trusting `Ok` alone), and one next hop's facts
//! gathered into a [`Decision`] (RFC 7672 §2.2).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::dnssec::{Proof, TrustAnchors};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, Record, RecordType};

use super::policy::{Decision, Host, Security, Target, Tlsa, tlsa_name};

/// Why DNS gave no answer. Each is a temporary failure, never "no records".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
// Each variant's `#[error]` text is its documentation.
#[allow(missing_docs)]
pub enum Failure {
    #[error("DNSSEC validation failed (bogus)")]
    Bogus,
    #[error("answer could not be validated ({0})")]
    Unverifiable(&'static str),
    #[error("timed out")]
    Timeout,
    #[error("server failure (SERVFAIL)")]
    ServFail,
    #[error("refused")]
    Refused,
    #[error("truncated answer and no TCP")]
    Truncated,
    #[error("network: {0}")]
    Network(String),
    #[error("{0}")]
    Other(String),
}

impl Failure {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Failure::Bogus => "bogus",
            Failure::Unverifiable(_) => "unverifiable",
            Failure::Timeout => "timeout",
            Failure::ServFail => "servfail",
            Failure::Refused => "refused",
            Failure::Truncated => "truncated",
            Failure::Network(_) => "network",
            Failure::Other(_) => "other",
        }
    }
}

/// A classified answer: records with their (weakest) security and smallest TTL, or a
/// validated or provably insecure denial.
#[derive(Debug, Clone)]
pub enum Answer<T> {
    /// Records of the asked type.
    Records(Vec<T>, Security, u32),
    /// The name exists without records of this type.
    NoData(Security, u32),
    /// The name does not exist.
    NxDomain(Security, u32),
}

/// Where DNS questions go and which keys they are validated with.
#[derive(Debug, Clone, Default)]
pub struct ResolverSettings {
    /// Name servers (`IP:PORT`), asked over UDP and TCP; empty: the system's resolvers.
    pub nameservers: Vec<SocketAddr>,
    /// DNSKEY records of the root in zone-file syntax; `None`: the built-in IANA root keys.
    pub trust_anchor: Option<std::path::PathBuf>,
    /// Per query (each attempt).
    pub timeout: Duration,
    /// The longest the resolver keeps a record itself (the decision cache's `max_ttl`: a
    /// decision never lives longer anyway). Zero: one day.
    pub record_cache_ttl: Duration,
}

/// A validating resolver.
#[derive(Clone)]
pub struct DnsResolver {
    inner: hickory_resolver::TokioResolver,
}

impl std::fmt::Debug for DnsResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DnsResolver")
    }
}

/// A resolver that cannot be built (a bad trust anchor file, no system resolvers).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ResolverError(String);

impl DnsResolver {
    /// Build the resolver: UDP and TCP to each name server (truncated answers are retried
    /// over TCP), DNSSEC validation from the trust anchor, no hosts file, no search list.
    pub fn new(s: &ResolverSettings) -> Result<DnsResolver, ResolverError> {
        let config = if s.nameservers.is_empty() {
            let (c, _) = hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| ResolverError(format!("reading /etc/resolv.conf: {e}")))?;
            let servers = c.name_servers().to_vec();
            if servers.is_empty() {
                return Err(ResolverError(
                    "no name servers in /etc/resolv.conf; set [dane] nameservers".into(),
                ));
            }
            ResolverConfig::from_name_servers(servers)
        } else {
            ResolverConfig::from_name_servers(
                s.nameservers
                    .iter()
                    .map(|a| {
                        let mut ns = NameServerConfig::udp_and_tcp(a.ip());
                        for c in &mut ns.connections {
                            c.port = a.port();
                        }
                        ns
                    })
                    .collect(),
            )
        };
        let anchors = match &s.trust_anchor {
            Some(p) => load_anchor(p)?,
            None => TrustAnchors::default(),
        };
        let mut opts = ResolverOpts::default();
        opts.use_hosts_file = ResolveHosts::Never;
        opts.timeout = s.timeout;
        opts.attempts = 2;
        opts.ndots = 0;
        opts.validate = true;
        let keep = if s.record_cache_ttl.is_zero() {
            Duration::from_secs(86_400)
        } else {
            s.record_cache_ttl
        };
        opts.positive_max_ttl = Some(keep);
        opts.negative_max_ttl = Some(keep);
        let inner = hickory_resolver::Resolver::builder_with_config(
            config,
            TokioRuntimeProvider::default(),
        )
        .with_options(opts)
        .with_trust_anchor(Arc::new(anchors))
        .build()
        .map_err(|e| ResolverError(format!("building the resolver: {e}")))?;
        Ok(DnsResolver { inner })
    }

    /// Ask `name` (absolute, with the trailing dot) for `rtype` and classify the answer.
    /// `fresh` forgets what the resolver cached for this question first, so the answer comes
    /// from the network (a refresh, `dane-check`); otherwise a cached answer comes with its
    /// remaining TTL.
    pub async fn query(
        &self,
        name: &str,
        rtype: RecordType,
        fresh: bool,
    ) -> Result<Answer<Record>, Failure> {
        if fresh {
            self.inner.clear_lookup_cache(name, rtype);
        }
        classify(self.inner.lookup(name, rtype).await, rtype)
    }
}

fn load_anchor(p: &Path) -> Result<TrustAnchors, ResolverError> {
    let text =
        std::fs::read_to_string(p).map_err(|e| ResolverError(format!("{}: {e}", p.display())))?;
    if !text
        .lines()
        .any(|l| l.split_whitespace().any(|w| w == "DNSKEY"))
    {
        return Err(ResolverError(format!(
            "{}: no DNSKEY record (the trust anchor is the root's DNSKEY records in zone-file syntax)",
            p.display()
        )));
    }
    text.parse::<TrustAnchors>()
        .map_err(|e| ResolverError(format!("{}: {e}", p.display())))
}

/// The weakest proof among records; `Err` unless every one is secure or insecure.
fn security<'a>(records: impl Iterator<Item = &'a Record>) -> Result<Security, Failure> {
    let mut sec = Security::Secure;
    for r in records {
        match r.proof {
            Proof::Secure => {}
            Proof::Insecure => sec = Security::Insecure,
            Proof::Bogus => return Err(Failure::Bogus),
            Proof::Indeterminate => return Err(Failure::Unverifiable("indeterminate proof")),
        }
    }
    Ok(sec)
}

fn classify(
    result: Result<hickory_resolver::lookup::Lookup, NetError>,
    rtype: RecordType,
) -> Result<Answer<Record>, Failure> {
    match result {
        Ok(lookup) => {
            let answers = lookup.answers();
            // Every record used, CNAMEs and signatures included, must carry a proof.
            let sec = security(answers.iter())?;
            let wanted: Vec<Record> = answers
                .iter()
                .filter(|r| r.record_type() == rtype)
                .cloned()
                .collect();
            let ttl = answers.iter().map(|r| r.ttl).min().unwrap_or(0);
            if wanted.is_empty() {
                return Ok(Answer::NoData(sec, ttl));
            }
            Ok(Answer::Records(wanted, sec, ttl))
        }
        Err(NetError::Dns(DnsError::NoRecordsFound(nr))) => {
            let soa = nr.soa.as_deref();
            let mut proofs: Vec<Proof> = soa.map(|s| s.proof).into_iter().collect();
            if let Some(a) = &nr.authorities {
                proofs.extend(a.iter().map(|r| r.proof));
            }
            let sec = if proofs.is_empty() {
                return Err(Failure::Unverifiable("denial without SOA or proof"));
            } else if proofs.contains(&Proof::Bogus) {
                return Err(Failure::Bogus);
            } else if proofs.contains(&Proof::Indeterminate) {
                return Err(Failure::Unverifiable("indeterminate denial"));
            } else if proofs.contains(&Proof::Insecure) {
                Security::Insecure
            } else {
                Security::Secure
            };
            let ttl = nr
                .negative_ttl
                .or_else(|| soa.map(|s| s.ttl.min(s.data.minimum)))
                .unwrap_or(0);
            match nr.response_code {
                ResponseCode::NXDomain => Ok(Answer::NxDomain(sec, ttl)),
                ResponseCode::NoError => Ok(Answer::NoData(sec, ttl)),
                _ => Err(Failure::ServFail),
            }
        }
        Err(NetError::Dns(DnsError::DnssecBogus)) => Err(Failure::Bogus),
        Err(NetError::Dns(DnsError::Nsec { proof, .. })) => match proof {
            Proof::Secure => Ok(Answer::NoData(Security::Secure, 0)),
            Proof::Insecure => Ok(Answer::NoData(Security::Insecure, 0)),
            Proof::Bogus => Err(Failure::Bogus),
            Proof::Indeterminate => Err(Failure::Unverifiable("indeterminate denial")),
        },
        Err(NetError::Dns(DnsError::ResponseCode(code))) => Err(match code {
            ResponseCode::ServFail => Failure::ServFail,
            ResponseCode::Refused => Failure::Refused,
            c => Failure::Other(format!("response code {c}")),
        }),
        Err(NetError::Timeout) => Err(Failure::Timeout),
        Err(NetError::Truncated) => Err(Failure::Truncated),
        Err(NetError::Io(e)) => Err(Failure::Network(e.to_string())),
        Err(NetError::NoConnections) => Err(Failure::Network("no connections".into())),
        Err(e) => Err(Failure::Other(e.to_string())),
    }
}

/// Every fact one decision rests on, for `dane-check`: each query with its outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Step {
    /// `MX example.com.`
    pub query: String,
    /// `secure`, `insecure`, `bogus`, …
    pub status: String,
    /// What came back, one line per record.
    pub records: Vec<String>,
}

/// Gather one target's facts and decide (no caching here). `fresh` asks the network rather
/// than the resolver's record cache; `trace` collects each query.
pub async fn decide(
    dns: &DnsResolver,
    target: &Target,
    fresh: bool,
    trace: Option<&mut Vec<Step>>,
) -> Decision {
    let mut steps = Vec::new();
    let d = decide_inner(dns, target, fresh, &mut steps).await;
    if let Some(t) = trace {
        *t = steps;
    }
    d
}

fn step<T>(query: String, r: &Result<Answer<T>, Failure>, show: impl Fn(&T) -> String) -> Step {
    let sec = |s: &Security| match s {
        Security::Secure => "secure",
        Security::Insecure => "insecure",
    };
    let (status, records) = match r {
        Ok(Answer::Records(v, s, ttl)) => (
            format!("{} (ttl {ttl})", sec(s)),
            v.iter().map(&show).collect(),
        ),
        Ok(Answer::NoData(s, _)) => (format!("{}, no records", sec(s)), Vec::new()),
        Ok(Answer::NxDomain(s, _)) => (format!("{}, name does not exist", sec(s)), Vec::new()),
        Err(f) => (format!("failed: {f}"), Vec::new()),
    };
    Step {
        query,
        status,
        records,
    }
}

async fn decide_inner(
    dns: &DnsResolver,
    target: &Target,
    fresh: bool,
    steps: &mut Vec<Step>,
) -> Decision {
    let (names, mut ttl) = if target.mx {
        let q = format!("{}.", target.name);
        let r = dns.query(&q, RecordType::MX, fresh).await;
        steps.push(step(format!("MX {q}"), &r, |r| match &r.data {
            RData::MX(mx) => format!("{} {}", mx.preference, mx.exchange),
            d => format!("{d}"),
        }));
        match r {
            Err(f) => return Decision::temp(format!("MX {q}: {f}")),
            Ok(Answer::Records(_, Security::Insecure, ttl)) => {
                return Decision::none(
                    "MX records are not signed (insecure zone): no DANE",
                    Some(Security::Insecure),
                    ttl,
                );
            }
            Ok(
                Answer::NoData(Security::Insecure, ttl) | Answer::NxDomain(Security::Insecure, ttl),
            ) => {
                return Decision::none(
                    "no MX, and not signed: no DANE",
                    Some(Security::Insecure),
                    ttl,
                );
            }
            Ok(Answer::NxDomain(Security::Secure, ttl)) => {
                return Decision::none(
                    "domain does not exist (signed denial)",
                    Some(Security::Secure),
                    ttl,
                );
            }
            // No MX: the domain itself is the host (RFC 5321 §5.1).
            Ok(Answer::NoData(Security::Secure, ttl)) => (vec![target.name.clone()], ttl),
            Ok(Answer::Records(records, Security::Secure, ttl)) => {
                let mut mxs: Vec<(u16, String)> = records
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => Some((
                            mx.preference,
                            mx.exchange
                                .to_ascii()
                                .trim_end_matches('.')
                                .to_ascii_lowercase(),
                        )),
                        _ => None,
                    })
                    .collect();
                if mxs.iter().all(|(_, h)| h.is_empty()) {
                    return Decision::none(
                        "null MX: the domain accepts no mail",
                        Some(Security::Secure),
                        ttl,
                    );
                }
                mxs.retain(|(_, h)| !h.is_empty());
                mxs.sort();
                let mut names: Vec<String> = Vec::new();
                for (_, h) in mxs {
                    if !names.contains(&h) {
                        names.push(h);
                    }
                }
                (names, ttl)
            }
        }
    } else {
        (vec![target.name.clone()], u32::MAX)
    };
    let facts =
        futures_join_all(names.iter().map(|h| host_facts(dns, h, target.port, fresh))).await;
    let mut hosts = Vec::with_capacity(facts.len());
    for (host, host_steps, host_ttl) in facts {
        steps.extend(host_steps);
        ttl = ttl.min(host_ttl);
        hosts.push(host);
    }
    Decision::from_hosts(hosts, ttl)
}

/// Run futures concurrently and keep their order (a few per domain: no extra crate).
async fn futures_join_all<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// A host's addresses and TLSA records, asked at once; TLSA only counts when the address
/// records are signed (RFC 7672 §2.2.2).
async fn host_facts(
    dns: &DnsResolver,
    name: &str,
    port: u16,
    fresh: bool,
) -> (Host, Vec<Step>, u32) {
    let q = format!("{name}.");
    let tq = tlsa_name(name, port);
    let (a, aaaa, tlsa) = tokio::join!(
        dns.query(&q, RecordType::A, fresh),
        dns.query(&q, RecordType::AAAA, fresh),
        dns.query(&tq, RecordType::TLSA, fresh)
    );
    let ip = |r: &Record| match &r.data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
        _ => None,
    };
    let mut steps = vec![
        step(format!("A {q}"), &a, |r| {
            ip(r).map_or(String::new(), |i| i.to_string())
        }),
        step(format!("AAAA {q}"), &aaaa, |r| {
            ip(r).map_or(String::new(), |i| i.to_string())
        }),
    ];
    let mut host = Host::new(name);
    let mut ttl = u32::MAX;
    for r in [&a, &aaaa] {
        match r {
            Ok(Answer::Records(recs, sec, t)) => {
                host.addresses.extend(recs.iter().filter_map(ip));
                ttl = ttl.min(*t);
                host.address_security = Some(match (host.address_security, sec) {
                    (Some(Security::Insecure), _) | (_, Security::Insecure) => Security::Insecure,
                    _ => Security::Secure,
                });
            }
            Ok(Answer::NoData(_, t) | Answer::NxDomain(_, t)) => ttl = ttl.min(*t),
            Err(f) => {
                host.failure = Some(format!("address lookup: {f}"));
            }
        }
    }
    if host.address_security == Some(Security::Secure) {
        steps.push(step(format!("TLSA {tq}"), &tlsa, |r| match &r.data {
            RData::TLSA(t) => to_tlsa(t).display(),
            d => format!("{d}"),
        }));
        match tlsa {
            Ok(Answer::Records(recs, sec, t)) => {
                ttl = ttl.min(t);
                host.tlsa_security = Some(sec);
                host.tlsa = recs
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::TLSA(t) => Some(to_tlsa(t)),
                        _ => None,
                    })
                    .collect();
            }
            Ok(Answer::NoData(sec, t) | Answer::NxDomain(sec, t)) => {
                ttl = ttl.min(t);
                host.tlsa_security = Some(sec);
            }
            Err(f) => host.failure = Some(format!("TLSA {tq}: {f}")),
        }
    }
    (host, steps, ttl)
}

fn to_tlsa(t: &hickory_resolver::proto::rr::rdata::TLSA) -> Tlsa {
    Tlsa {
        usage: u8::from(t.cert_usage),
        selector: u8::from(t.selector),
        matching: u8::from(t.matching),
        data: t.cert_data.clone(),
    }
}
