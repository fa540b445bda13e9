//! `rcptgate dane-check`: the DANE diagnosis of one or more next hops.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};

use rcptgate::dane::{Dane, DaneConfig, check};

/// Options of `dane-check` beyond the domains.
pub struct CheckArgs<'a> {
    pub config: Option<&'a Path>,
    pub nameservers: &'a [SocketAddr],
    pub trust_anchor: Option<&'a PathBuf>,
    pub port: Option<u16>,
    pub timeout: Duration,
    pub json: bool,
}

pub fn dane_check(keys: &[String], a: &CheckArgs<'_>) -> Result<ExitCode> {
    let mut cfg = match a.config {
        Some(p) => rcptgate::config::Config::load(p)?.dane.unwrap_or_default(),
        None => DaneConfig::default(),
    };
    if !a.nameservers.is_empty() {
        cfg.resolver.nameservers = a.nameservers.to_vec();
    }
    if let Some(t) = a.trust_anchor {
        cfg.resolver.trust_anchor = Some(t.clone());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let all_ok = rt.block_on(async {
        let dane = Dane::new(cfg).context("DNS resolver")?;
        let opts = check::CheckOptions {
            port: a.port,
            timeout: a.timeout,
        };
        let mut all_ok = true;
        for key in keys {
            let report = check::check(&dane, key, &opts).await;
            all_ok &= report.ok;
            if a.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", check::render_text(&report));
            }
        }
        anyhow::Ok(all_ok)
    })?;
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
