//! `rcptgate serve`: configuration, logging, signals and listeners around the library's
//! directory service.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinSet;
use tracing::{error, info};

use rcptgate::config::Config;
use rcptgate::server::metrics::Metrics;
use rcptgate::server::{self, Context, Protocol};
use rcptgate::service::Service;

use super::{LogFormat, init_logging};

/// Beyond the listeners' own `drain_timeout`, how long their tasks may take to end.
const DRAIN_MARGIN: Duration = Duration::from_secs(2);

pub fn serve(config: &Path, log_format: Option<LogFormat>) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    cfg.check_daemon(config)?;
    let json = log_format.map_or(cfg.log_json, |f| f == LogFormat::Json);
    init_logging(&cfg.log_level, json);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.threads)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = runtime.block_on(run(cfg));
    // A sync still running in a blocking thread is not waited for: it publishes nothing
    // half-done, and the next start serves the persisted snapshot.
    runtime.shutdown_timeout(Duration::from_millis(200));
    result
}

async fn run(cfg: Config) -> Result<ExitCode> {
    // Signals first, before anything slow can happen.
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let metrics = Arc::new(Metrics::default());
    let service = Service::builder(cfg.clone())
        .metrics(metrics.clone())
        .start()
        .await
        .context("starting the directory service")?;
    let ctx = Arc::new(Context {
        directory: service.directory().clone(),
        texts: cfg.texts.clone(),
        limits: cfg.limits.clone(),
        metrics: metrics.clone(),
        dane: service.dane().cloned(),
        milter: rcptgate::server::MilterOptions {
            header: cfg.milter_header.clone(),
            details: cfg.milter_header_details,
        },
    });
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let mut listeners: JoinSet<(String, std::io::Result<()>)> = JoinSet::new();
    for (protocol, addrs) in [
        (Protocol::Policy, &cfg.policy_listen),
        (Protocol::Socketmap, &cfg.socketmap_listen),
        (Protocol::Milter, &cfg.milter_listen),
    ] {
        let name = match protocol {
            Protocol::Policy => "policy",
            Protocol::Socketmap => "socketmap",
            Protocol::Milter => "milter",
        };
        for a in addrs {
            let (bound, task) = server::bind_and_serve(a, protocol, ctx.clone(), stop_rx.clone())
                .await
                .with_context(|| format!("listening on {a}"))?;
            info!("{name} listening on {bound}");
            let label = format!("{name} {bound}");
            service.announce_listener(label.clone());
            listeners.spawn(async move { (label, task.await.unwrap_or_else(|e| Err(e.into()))) });
        }
    }
    if let Some(addr) = cfg.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let bound = l.local_addr()?;
        info!("metrics listening on {bound}");
        service.announce_listener(format!("metrics {bound}"));
        let task =
            server::metrics::serve(l, metrics.clone(), ctx.directory.clone(), stop_rx.clone());
        listeners.spawn(async move { (format!("metrics {bound}"), task.await) });
    }
    if let Some(path) = &cfg.control {
        let l = server::control::bind(path)
            .with_context(|| format!("control socket {}", path.display()))?;
        info!("control socket {}", path.display());
        let task = server::control::serve(l, service.clone(), stop_rx.clone());
        let label = format!("control {}", path.display());
        listeners.spawn(async move { (label, task.await) });
    }
    loop {
        tokio::select! {
            _ = hup.recv() => {
                info!("SIGHUP: full sync and rebuild");
                if service.request_sync("SIGHUP").is_err() {
                    error!("the directory service has stopped");
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            Some(done) = listeners.join_next() => {
                // A listener that ends on its own is never a silently closed port.
                let (label, result) = done.unwrap_or_else(|e| ("listener".into(), Err(e.into())));
                metrics.listeners_down.fetch_add(1, Relaxed);
                match result {
                    Ok(()) => error!(listener = %label, "listener {label} stopped; /healthz now answers 503"),
                    Err(e) => error!(listener = %label, error = %e, "listener {label} failed: {e}; /healthz now answers 503"),
                }
            }
        }
    }
    info!("shutting down: finishing requests in flight");
    stop.send(true).ok();
    let drain = cfg.limits.drain_timeout + DRAIN_MARGIN;
    if tokio::time::timeout(drain, async {
        while listeners.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        error!("listeners still open after {drain:?}; closing them");
        listeners.abort_all();
    }
    service.shutdown().await;
    if let Some(path) = &cfg.control {
        let _ = std::fs::remove_file(path);
    }
    info!("stopped");
    Ok(ExitCode::SUCCESS)
}
