//! Commands for live LDAP sources: `sync` and `ldap-test`.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use rcptgate::directory;
use rcptgate::sources;

pub fn sync(
    config: &Path,
    only: Option<&str>,
    output: Option<&Path>,
    customer: &str,
) -> Result<ExitCode> {
    use std::io::IsTerminal;
    let cfg = rcptgate::config::Config::load(config)?;
    let picked: Vec<_> = cfg
        .sources
        .iter()
        .filter(|s| (s.ldap.is_some() || s.graph.is_some()) && only.is_none_or(|n| n == s.name))
        .collect();
    if picked.is_empty() {
        bail!(
            "{}: no LDAP or Graph source{}",
            config.display(),
            only.map(|n| format!(" named {n:?}")).unwrap_or_default()
        );
    }
    if output.is_some() && picked.len() > 1 {
        bail!("--output writes one source: pick it with --source NAME");
    }
    let tty = std::io::stderr().is_terminal();
    for s in picked {
        let name: Arc<str> = Arc::from(s.name.as_str());
        let mut last_line = Instant::now();
        let mut show = |objects: u64, pages: u64, elapsed: std::time::Duration| {
            let rate = objects as f64 / elapsed.as_secs_f64().max(1e-3);
            let line = format!(
                "  {objects} entries, {pages} pages, {rate:.0} entries/s, {:.1} s",
                elapsed.as_secs_f64()
            );
            if tty {
                eprint!("\r{line}   ");
            } else if pages == 1 || last_line.elapsed().as_secs() >= 2 {
                eprintln!("{line}");
                last_line = Instant::now();
            }
        };
        let (data, last) = if let Some(g) = &s.graph {
            eprintln!(
                "rcptgate: {}: syncing tenant {} from {}",
                s.name, g.tenant_id, g.graph_url
            );
            let mut last = sources::ldap::Progress::default();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let (data, _) = sources::graph::full(&name, g, now, |p| {
                last = sources::ldap::Progress {
                    entries: p.objects,
                    pages: p.pages,
                    elapsed: p.elapsed,
                };
                show(p.objects, p.pages, p.elapsed);
            })
            .with_context(|| format!("source {}", s.name))?;
            (data, last)
        } else {
            let Some(l) = &s.ldap else { continue };
            eprintln!(
                "rcptgate: {}: syncing {} ({} base DN(s))",
                s.name,
                l.url,
                l.bases.len()
            );
            let mut last = sources::ldap::Progress::default();
            let data = sources::ldap::fetch(&name, l, |p| {
                last = p;
                show(p.entries, p.pages, p.elapsed);
            })
            .with_context(|| format!("source {}", s.name))?;
            (data, last)
        };
        if tty {
            eprintln!();
        }
        let mut kinds: std::collections::BTreeMap<&str, usize> = Default::default();
        for e in &data.entries {
            *kinds.entry(e.kind.as_str()).or_default() += 1;
        }
        let mut domains: Vec<&str> = data.entries.iter().map(|e| &*e.domain).collect();
        domains.sort_unstable();
        domains.dedup();
        for d in &data.diagnostics {
            eprintln!("rcptgate: {d}");
        }
        println!(
            "{}: {} entries in {} page(s), {:.1} s: {} addresses in {} domain(s) ({}); {} diagnostics",
            s.name,
            last.entries,
            last.pages,
            last.elapsed.as_secs_f64(),
            data.entries.len(),
            domains.len(),
            kinds
                .iter()
                .map(|(k, n)| format!("{n} {k}"))
                .collect::<Vec<_>>()
                .join(", "),
            data.diagnostics.len()
        );
        if let Some(out) = output {
            let text = sources::mapfile::write(&data, customer, &s.domains);
            directory::write_atomic(out, text.as_bytes())
                .with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {}", out.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `graph-test`: each Graph source step by step.
pub fn graph_test(config: &Path, only: Option<&str>) -> Result<ExitCode> {
    source_test(config, only, "Graph", |s| {
        let g = s.graph.as_ref()?;
        let name: Arc<str> = Arc::from(s.name.as_str());
        Some((
            format!("tenant {}, {}", g.tenant_id, g.graph_url),
            sources::graph::test(&name, g),
        ))
    })
}

/// `ldap-test`: each LDAP source step by step.
pub fn ldap_test(config: &Path, only: Option<&str>) -> Result<ExitCode> {
    source_test(config, only, "LDAP", |s| {
        let l = s.ldap.as_ref()?;
        Some((l.url.clone(), sources::ldap_check::run(l)))
    })
}

/// Run `steps` for every source it applies to and print them; exit status 1 when one fails.
fn source_test(
    config: &Path,
    only: Option<&str>,
    kind: &str,
    steps: impl Fn(&rcptgate::config::SourceConfig) -> Option<(String, Vec<sources::ldap_check::Step>)>,
) -> Result<ExitCode> {
    use rcptgate::sources::ldap_check::Status;
    let cfg = rcptgate::config::Config::load(config)?;
    let mut failed = false;
    let mut any = false;
    for s in cfg
        .sources
        .iter()
        .filter(|s| only.is_none_or(|n| n == s.name))
    {
        let Some((what, list)) = steps(s) else {
            continue;
        };
        any = true;
        println!("{} ({what}):", s.name);
        for step in list {
            let tag = match step.status {
                Status::Ok => "ok  ",
                Status::Warn => "WARN",
                Status::Fail => {
                    failed = true;
                    "FAIL"
                }
            };
            println!("  {tag}  {:<12} {}", step.name, step.detail);
            if let Some(f) = step.fix {
                println!("        fix: {f}");
            }
        }
    }
    if !any {
        bail!("{}: no {kind} source to test", config.display());
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `sync --object`: provision on demand, each step shown; `--apply` asks the daemon.
pub fn provision(config: &Path, only: Option<&str>, object: &str, apply: bool) -> Result<ExitCode> {
    let cfg = rcptgate::config::Config::load(config)?;
    let picked: Vec<_> = cfg
        .sources
        .iter()
        .filter(|s| (s.ldap.is_some() || s.graph.is_some()) && only.is_none_or(|n| n == s.name))
        .collect();
    let s = match picked.as_slice() {
        [one] => *one,
        [] => bail!(
            "{}: no LDAP or Graph source{}",
            config.display(),
            only.map(|n| format!(" named {n:?}")).unwrap_or_default()
        ),
        _ => bail!("several live sources: pick one with --source NAME"),
    };
    if let Some(g) = &s.graph {
        return provision_graph(config, &cfg, s, g, object, apply);
    }
    let Some(l) = &s.ldap else {
        bail!("not an LDAP source")
    };
    println!("{} ({}): {object}", s.name, l.url);
    let Some(found) =
        sources::ldap::fetch_object(l, object).with_context(|| format!("source {}", s.name))?
    else {
        println!(
            "  FAIL  found        no object with that DN, user principal name, sAMAccountName, mail or proxy address"
        );
        return Ok(ExitCode::from(1));
    };
    let mut ok = true;
    match &found.base {
        Some((b, scope)) => println!(
            "  ok    found        {} under base {b} ({scope:?})",
            found.entry.dn
        ),
        None => {
            ok = false;
            println!(
                "  FAIL  found        {} is under none of base_dns: a sync never reads it",
                found.entry.dn
            );
            println!("        fix: add its OU to base_dns (or move the object)");
        }
    }
    if found.matches_filter {
        println!("  ok    filter       selected by {}", l.filter);
    } else {
        ok = false;
        println!(
            "  FAIL  filter       not selected by {}: a sync never reads it",
            l.filter
        );
    }
    for (k, v, _) in &found.entry.attrs {
        println!("        attribute    {k}: {v}");
    }
    let file: Arc<str> = Arc::from(l.url.as_str());
    let m = sources::ad::map_entry(
        &found.entry,
        &file,
        &sources::ad::AdOptions {
            include_disabled: l.include_disabled,
        },
    );
    for d in &m.diagnostics {
        println!("  WARN  mapping      {}", d.message);
    }
    ok &= show_mapping(&cfg, &m);
    finish(ok, apply, config, &s.name, object)
}

/// The end of `sync --object`: exit status 1 when a sync would not read the object;
/// with `--apply`, have the daemon publish it (never when a sync would not read it).
fn finish(ok: bool, apply: bool, config: &Path, source: &str, object: &str) -> Result<ExitCode> {
    match (ok, apply) {
        (true, false) => Ok(ExitCode::SUCCESS),
        (false, false) => Ok(ExitCode::from(1)),
        (false, true) => bail!("not applied: a sync would not read this object either (see above)"),
        (true, true) => apply_on_daemon(config, source, object),
    }
}

fn show_mapping(cfg: &rcptgate::config::Config, m: &sources::ad::Mapped) -> bool {
    let mut ok = true;
    if let Some(why) = m.skipped {
        ok = false;
        println!("  FAIL  mapping      no address: {why}");
    }
    let snap = cfg
        .snapshot
        .as_deref()
        .and_then(|p| rcptgate::Snapshot::open(p).ok());
    for e in &m.entries {
        let addr = sources::join_key(&e.local, &e.domain);
        let rule = match &e.owner {
            None => "primary (SMTP: in proxyAddresses, else mail)".to_owned(),
            Some(o) => format!("alias of {o} (smtp: in proxyAddresses, or mail)"),
        };
        println!("  ok    mapping      {addr}: {} — {rule}", e.kind.as_str());
        if let Some(snap) = &snap {
            let x = snap.explain(&addr, &rcptgate::LookupOptions::default());
            let now = match x.verdict.as_str() {
                "accept" => format!("in service ({})", x.record.unwrap_or_default()),
                "not_ours" => "its domain is not accepted in the snapshot in service".into(),
                v => format!("not in service ({v}): {}", x.step),
            };
            println!("        snapshot     {addr}: {now}");
        }
    }
    ok
}

fn apply_on_daemon(config: &Path, source: &str, object: &str) -> Result<ExitCode> {
    let path = super::control_socket(config)?;
    let reply = rcptgate::server::control::request(
        &path,
        &rcptgate::proto::control::Command::Provision(source.to_owned(), object.to_owned()),
    )
    .with_context(|| format!("talking to the daemon on {}", path.display()))?;
    match reply {
        rcptgate::service::Reply::Provisioned {
            generation,
            addresses,
        } => {
            println!(
                "  ok    applied      generation {generation} in service with {}",
                addresses.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        rcptgate::service::Reply::Error { message } => bail!("{message}"),
        other => bail!("the daemon answered something else: {other:?}"),
    }
}

fn provision_graph(
    config: &Path,
    cfg: &rcptgate::config::Config,
    s: &rcptgate::config::SourceConfig,
    g: &sources::graph::GraphConfig,
    object: &str,
    apply: bool,
) -> Result<ExitCode> {
    println!("{} (tenant {}): {object}", s.name, g.tenant_id);
    let Some((key, o)) =
        sources::graph::fetch_object(g, object).with_context(|| format!("source {}", s.name))?
    else {
        println!(
            "  FAIL  found        no user (by ID, user principal name, mail or proxy address) or group (by mail)"
        );
        return Ok(ExitCode::from(1));
    };
    let mut ok = true;
    println!(
        "  ok    found        {key}{}",
        o.get("userPrincipalName")
            .and_then(|v| v.as_str())
            .map(|u| format!(" ({u})"))
            .unwrap_or_default()
    );
    if let Some(why) = sources::graph::excluded(&key, &o, g) {
        ok = false;
        println!("  FAIL  scope        {why}: a sync leaves it out");
    } else {
        println!(
            "  ok    scope        kept by the source's rules (user_filter is not checked for one object)"
        );
    }
    for (k, v) in &o {
        println!("        attribute    {k}: {v}");
    }
    let name: Arc<str> = Arc::from(s.name.as_str());
    let m = sources::ad::map_entry(
        &sources::graph::dir_entry(&key, &o),
        &name,
        &sources::ad::AdOptions {
            include_disabled: g.include_disabled,
        },
    );
    ok &= show_mapping(cfg, &m);
    finish(ok, apply, config, &s.name, object)
}
