//! The command line: flags, logging, and one small module per command family.

mod build;
mod control;
mod dane;
mod ldap;
mod serve;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

use rcptgate::sources::{self, Severity, SourceData, SourceError};
use rcptgate::sync::Merged;

#[derive(Parser, Debug)]
#[command(
    name = "rcptgate",
    version,
    about = "Recipient validation for SMTP gateways"
)]
struct Cli {
    /// Log format (the config's `[log] format` when not given).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build a snapshot file from sources (FORMAT:PATH or PATH; format from the extension:
    /// .map, .csv, .ldif/.ldf, anything else is a Postfix table).
    Compile {
        #[arg(required = true)]
        sources: Vec<String>,
        /// Where to write the snapshot (atomically).
        #[arg(short, long)]
        output: PathBuf,
        /// Generation number stored in the snapshot.
        #[arg(long, default_value_t = 1)]
        generation: u64,
        /// Write a set of segments, one per customer (an index at OUTPUT, the segments in
        /// OUTPUT.parts/): a change to one customer then rebuilds one segment.
        #[arg(long)]
        segments: bool,
    },
    /// Lint sources: invalid addresses, conflicts, missing trailer, each with its location.
    /// Exits non-zero when there are errors.
    Check {
        #[arg(required = true)]
        sources: Vec<String>,
    },
    /// Answer for addresses, from a snapshot file or from sources built in memory:
    /// `lookup --snapshot FILE ADDRESS...` or `lookup SOURCE... ADDRESS...` (leading
    /// arguments that name existing files are sources).
    Lookup {
        /// Snapshot file to read (instead of sources).
        #[arg(long)]
        snapshot: Option<PathBuf>,
        /// One JSON object per address.
        #[arg(long)]
        json: bool,
        /// Subaddress separators ("" disables subaddressing).
        #[arg(long, default_value = "+")]
        separators: String,
        /// Local parts accepted in every domain we own.
        #[arg(long, value_delimiter = ',', default_value = "postmaster")]
        always_accept: Vec<String>,
        /// [SOURCE...] ADDRESS...
        #[arg(required = true, value_name = "ARGS")]
        args: Vec<String>,
    },
    /// Addresses added and removed between two snapshots (or sources).
    Diff { old: String, new: String },
    /// Run the daemon: Postfix policy and socketmap services over the configured directory.
    /// SIGHUP rebuilds from the sources; SIGTERM finishes requests in flight and exits.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration file and exit (non-zero with the key and line on error).
    ConfigCheck {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// One full sync of the configured LDAP or Graph source(s), with progress and a summary;
    /// `--output FILE` writes the result as a MAP upload (so the sync can feed other
    /// gateways too).
    Sync {
        #[arg(long, short)]
        config: PathBuf,
        /// One full sync, then exit (the daemon syncs on its own schedule).
        #[arg(long)]
        once: bool,
        /// Only this source (by name).
        #[arg(long)]
        source: Option<String>,
        /// Write the addresses as a MAP file (atomically).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Customer ID for the MAP file.
        #[arg(long, default_value = "1")]
        customer: String,
        /// Provision on demand: one object (DN, user principal name or address) of an LDAP
        /// source, each step shown (where it was found, the filter, the attributes, the
        /// mapping, the snapshot in service).
        #[arg(long)]
        object: Option<String>,
        /// With --object: have the running daemon fetch it and publish it now (same merge,
        /// guard and audit; the next full sync confirms or reverts it).
        #[arg(long, requires = "object")]
        apply: bool,
    },
    /// Test the connection to each LDAP source step by step (resolve, connect, TLS and the
    /// server certificate with its expiry, bind, search per base DN, a few mapped entries),
    /// saying what to fix. Exit status 1 when a step fails.
    LdapTest {
        #[arg(long, short)]
        config: PathBuf,
        /// Only this source (by name).
        #[arg(long)]
        source: Option<String>,
    },
    /// Test each Microsoft Graph source step by step (the token, each permission exercised,
    /// the users and groups with addresses, five mapped samples, the secret's expiry when
    /// readable), saying what to fix. Exit status 1 when a step fails.
    GraphTest {
        #[arg(long, short)]
        config: PathBuf,
        /// Only this source (by name).
        #[arg(long)]
        source: Option<String>,
    },
    /// The running daemon's state: snapshot, data age, a rebuild in progress, tombstones,
    /// removals held by the deletion guard (with a sample), the last error and the last
    /// build's diagnostics. Talks to `control.socket`.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Apply the removals the deletion guard holds.
    Approve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Rebuild now in the running daemon and say what it did.
    Reload {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Why addresses get the answer they get: the DESIGN §4 step that decided; for a hit the
    /// record and every claim (conflict losers too); for a miss what the sources listed but
    /// the build left out (disabled, guest, invalid syntax, conflict, exception), the
    /// audit log's removals, domains near an unknown one, the closest addresses of the domain.
    Explain {
        /// Ask the running daemon (its snapshot and audit log).
        #[arg(long, short, conflicts_with = "snapshot")]
        config: Option<PathBuf>,
        /// Or read this snapshot file.
        #[arg(long)]
        snapshot: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        /// Subaddress separators (with --snapshot).
        #[arg(long, default_value = "+")]
        separators: String,
        #[arg(required = true)]
        addresses: Vec<String>,
    },
    /// Diagnose DANE for next hops (`example.com`, `[mx.example.com]:587`): each DNS step
    /// with its DNSSEC status, TLSA sizes over UDP and TCP, the `tls_policy` answer, then
    /// STARTTLS to every MX address with the TLSA records as the only trust, and what to
    /// fix. Exit status 1 when something would make DANE senders defer.
    DaneCheck {
        #[arg(required = true)]
        domains: Vec<String>,
        /// Take `[dane]` (name servers, trust anchor, rendering) from this configuration.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Ask this name server (IP:PORT, repeatable) instead of the system's.
        #[arg(long = "nameserver")]
        nameservers: Vec<std::net::SocketAddr>,
        /// Root DNSKEY records in zone-file syntax instead of the built-in IANA root keys.
        #[arg(long)]
        trust_anchor: Option<PathBuf>,
        /// Connect to this port instead of 25.
        #[arg(long)]
        port: Option<u16>,
        /// Seconds per connection step.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// The user conflicts view: tombstoned addresses (removal time, time left) and addresses
    /// claimed by two owners. Actions: `delete ADDRESS...` drops tombstones now, `keep
    /// ADDRESS...` keeps them until the address returns, `export` writes CSV.
    Conflicts {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<control::ConflictAction>,
    },
}

/// Run the command line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Compile {
            sources,
            output,
            generation,
            segments,
        } => build::compile(&sources, &output, generation, segments),
        Command::Check { sources } => build::check(&sources),
        Command::Lookup {
            snapshot,
            json,
            separators,
            always_accept,
            args,
        } => {
            let n = if snapshot.is_some() {
                0
            } else {
                args.iter().take_while(|a| names_file(a)).count()
            };
            let (srcs, addrs) = args.split_at(n);
            let options = rcptgate::LookupOptions {
                separators: separators.as_bytes().into(),
                always_accept,
            };
            build::lookup(snapshot.as_deref(), srcs, json, options, addrs)
        }
        Command::Diff { old, new } => build::diff(&old, &new),
        Command::Serve { config } => serve::serve(&config, cli.log_format),
        Command::ConfigCheck { config } => rcptgate::config::Config::load(&config)
            .and_then(|c| c.check_daemon(&config).map(|()| c))
            .map(|c| {
                println!(
                    "{}: ok ({} source(s), {} policy and {} socketmap listener(s))",
                    config.display(),
                    c.sources.len(),
                    c.policy_listen.len(),
                    c.socketmap_listen.len()
                );
                ExitCode::SUCCESS
            })
            .map_err(Into::into),
        Command::Sync {
            config,
            once: _,
            source,
            output,
            customer,
            object,
            apply,
        } => match object {
            Some(o) => ldap::provision(&config, source.as_deref(), &o, apply),
            None => ldap::sync(&config, source.as_deref(), output.as_deref(), &customer),
        },
        Command::LdapTest { config, source } => ldap::ldap_test(&config, source.as_deref()),
        Command::GraphTest { config, source } => ldap::graph_test(&config, source.as_deref()),
        Command::Status { config, json } => control::status(&config, json),
        Command::Approve { config } => control::approve(&config),
        Command::Reload { config } => control::reload(&config),
        Command::Conflicts {
            config,
            json,
            action,
        } => control::conflicts(&config, json, action),
        Command::Explain {
            config,
            snapshot,
            json,
            separators,
            addresses,
        } => control::explain(
            config.as_deref(),
            snapshot.as_deref(),
            rcptgate::LookupOptions {
                separators: separators.as_bytes().into(),
                always_accept: vec!["postmaster".into()],
            },
            &addresses,
            json,
        ),
        Command::DaneCheck {
            domains,
            config,
            nameservers,
            trust_anchor,
            port,
            timeout,
            json,
        } => dane::dane_check(
            &domains,
            &dane::CheckArgs {
                config: config.as_deref(),
                nameservers: &nameservers,
                trust_anchor: trust_anchor.as_ref(),
                port,
                timeout: std::time::Duration::from_secs(timeout.max(1)),
                json,
            },
        ),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rcptgate: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Install the log subscriber: `RUST_LOG` if set, else `level`; text or JSON lines on
/// standard error.
fn init_logging(level: &str, json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.with_ansi(false).init();
    }
}

/// True when `arg` is `PATH` or `FORMAT:PATH` of an existing file.
fn names_file(arg: &str) -> bool {
    sources::parse_spec(arg).1.is_file()
}

/// Load every source; refused sources are returned separately (never half-used).
fn load_sources(specs: &[String]) -> (Vec<SourceData>, Vec<SourceError>) {
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for spec in specs {
        let (format, path) = sources::parse_spec(spec);
        match sources::load(format, path) {
            Ok(s) => ok.push(s),
            Err(e) => refused.push(e),
        }
    }
    (ok, refused)
}

/// Print every diagnostic and conflict; (errors, warnings).
fn print_diagnostics(srcs: &[SourceData], merged: &Merged) -> (usize, usize) {
    let mut errors = 0;
    let mut warnings = 0;
    let all = srcs
        .iter()
        .flat_map(|s| s.diagnostics.iter())
        .chain(merged.diagnostics.iter());
    for d in all {
        match d.severity {
            Severity::Error => errors += 1,
            Severity::Warning => warnings += 1,
        }
        eprintln!("{d}");
    }
    for c in &merged.conflicts {
        eprintln!("conflict: {c}");
    }
    (errors, warnings)
}

/// Refuse to go on when a source was refused.
fn no_refused(refused: &[SourceError], what: &str) -> Result<()> {
    for e in refused {
        eprintln!("{e}");
    }
    if !refused.is_empty() {
        bail!("{} source(s) refused; {what}", refused.len());
    }
    Ok(())
}

/// The config file's control socket path, or why there is none.
fn control_socket(config: &Path) -> Result<PathBuf> {
    let cfg = rcptgate::config::Config::load(config)?;
    match cfg.control {
        Some(p) => Ok(p),
        None => bail!(
            "{}: no control socket configured (set [control] socket = \"/run/rcptgate/control.sock\")",
            config.display()
        ),
    }
}
