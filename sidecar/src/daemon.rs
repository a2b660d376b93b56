//! `levqor-sidecar run`: the daemon. It starts the HTTP server and one task
//! per concern (Stripe provisioning and metering, audit streams, scheduled
//! backups), reloads its configuration on SIGHUP and stops on SIGTERM or
//! SIGINT: every task finishes or abandons its request in flight, advances no
//! cursor past what was not delivered, and the process exits 0 within 10 s.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::Target;
use crate::metrics::Metrics;

/// What every task shares.
pub struct App {
    pub config: watch::Receiver<Arc<Config>>,
    pub metrics: Metrics,
    pub stop: CancellationToken,
    health: Mutex<HashMap<&'static str, (Instant, Duration)>>,
}

impl App {
    pub fn new(config: Config) -> (Arc<App>, watch::Sender<Arc<Config>>) {
        let (tx, rx) = watch::channel(Arc::new(config));
        let app = App { config: rx, metrics: Metrics::new(), stop: CancellationToken::new(), health: Mutex::new(HashMap::new()) };
        (Arc::new(app), tx)
    }

    pub fn cfg(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    pub fn db(&self) -> Target {
        let c = self.cfg();
        Target { url: c.database.url.clone(), password_env: c.database.password_env.clone() }
    }

    /// A task says it is alive, and how long it may go quiet (an unhealthy
    /// /healthz after three times that).
    pub fn beat(&self, task: &'static str, every: Duration) {
        self.health.lock().unwrap().insert(task, (Instant::now(), every));
    }

    /// Tasks that have not said so for too long.
    pub fn stalled(&self) -> Vec<String> {
        self.health
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, (at, every))| at.elapsed() > (*every * 3).max(Duration::from_secs(15)))
            .map(|(t, _)| t.to_string())
            .collect()
    }

    /// Sleep, unless the sidecar is stopping (returns false then).
    pub async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.stop.cancelled() => false,
        }
    }
}

pub async fn run(path: PathBuf, config: Config) -> std::process::ExitCode {
    let (app, reload) = App::new(config);
    let cfg = app.cfg();
    let listener = match tokio::net::TcpListener::bind(&cfg.http.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %cfg.http.listen, error = %e, "cannot listen");
            return std::process::ExitCode::from(2);
        }
    };
    tracing::info!(listen = %cfg.http.listen, stripe = cfg.stripe.is_some(), siem = cfg.siem.len(),
                   backups = cfg.backup.as_ref().and_then(|b| b.schedule.clone()).unwrap_or_else(|| "off".into()),
                   "levqor-sidecar started");
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(crate::http::serve(app.clone(), listener));
    if cfg.stripe.is_some() {
        tasks.spawn(crate::billing::provision::run(app.clone()));
        tasks.spawn(crate::billing::meter::run(app.clone()));
    }
    tasks.spawn(crate::streams::run(app.clone()));
    if cfg.backup.as_ref().is_some_and(|b| b.schedule.is_some()) {
        tasks.spawn(crate::backup::schedule::run(app.clone()));
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).expect("SIGHUP handler");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = hup.recv() => match Config::load(&path).and_then(|c| c.check_secrets().map(|_| c)) {
                Ok(c) => {
                    if c.http.listen != app.cfg().http.listen {
                        tracing::warn!("http.listen changed: it takes effect at the next start");
                    }
                    let _ = reload.send(Arc::new(c));
                    tracing::info!(config = %path.display(), "configuration reloaded");
                }
                Err(e) => tracing::error!(error = %e, "configuration not reloaded; keeping the running one"),
            },
            Some(done) = tasks.join_next() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "a task of the sidecar failed");
                    app.stop.cancel();
                    break;
                }
            }
        }
    }
    tracing::info!("stopping: finishing what is in flight");
    app.stop.cancel();
    let drained = tokio::time::timeout(Duration::from_secs(8), async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!("tasks still busy after 8 s: abandoned (nothing they had not delivered was recorded as delivered)");
        tasks.abort_all();
    }
    tracing::info!("levqor-sidecar stopped");
    std::process::ExitCode::SUCCESS
}
