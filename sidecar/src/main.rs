//! levqor-sidecar: the daemon and CLI beside the database (docs/sidecar.md):
//! Stripe billing (`billing`), audit streams to SIEMs (`streams`),
//! per-tenant backups (`backup`); `config`, `db`, `http`, `metrics` and
//! `retry` are shared by all three.
//!
//! Exit status: 0 success, 1 a failed check (drift, verification),
//! 2 bad usage or configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

mod backup;
mod billing;
mod config;
mod daemon;
mod db;
mod http;
mod metrics;
mod retry;
mod streams;

#[derive(Parser)]
#[command(name = "levqor-sidecar", version, about = "levqor's sidecar daemon and CLI")]
struct Cli {
    /// Log format: human-readable text, or one JSON object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: Stripe provisioning, metering and webhooks; audit streams; scheduled backups.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file (and, when the database answers, the plan mapping).
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Compare the usage ledger with Stripe's meter event summaries; exit 1 on drift.
    Reconcile {
        #[arg(long, short)]
        config: PathBuf,
        /// Start of the period (RFC 3339); default: the start of this month, UTC.
        #[arg(long)]
        since: Option<String>,
    },
    /// Back one tenant up into one archive file; its path is the last line printed.
    Backup {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check an archive's manifest and every checksum; exit 1 on any mismatch.
    VerifyBackup {
        #[arg(long)]
        from: PathBuf,
        /// The configuration, for the decryption key of an encrypted archive.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Restore one tenant from an archive, verified; never touches another tenant's rows.
    Restore {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        from: PathBuf,
        /// Another database to restore into (levqor installed there).
        #[arg(long)]
        into: Option<String>,
        /// Replace a live tenant's rows (only that tenant's, in one transaction).
        #[arg(long)]
        replace: bool,
    },
    /// The GDPR export of one tenant as JSON files and a manifest in a zip.
    Export {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Backup, verify, restore into a scratch database, compare, and report the time.
    DrDrill {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        tenant: String,
    },
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("LEVQOR_SIDECAR_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
    }
}

/// The configuration, or exit status 2 with a one-line cause.
fn load(path: &std::path::Path) -> Result<config::Config, ExitCode> {
    config::Config::load(path).map_err(|e| {
        eprintln!("levqor-sidecar: {e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run { config } => {
                let cfg = load(&config)?;
                if let Err(e) = cfg.check_secrets() {
                    eprintln!("levqor-sidecar: {e}");
                    return Err(ExitCode::from(2));
                }
                Ok(daemon::run(config, cfg).await)
            }
            Command::CheckConfig { config } => {
                let cfg = load(&config)?;
                Ok(check_config(&config, &cfg).await)
            }
            Command::Reconcile { config, since } => {
                let cfg = load(&config)?;
                let since = match since.as_deref().map(chrono::DateTime::parse_from_rfc3339) {
                    None => None,
                    Some(Ok(t)) => Some(t.with_timezone(&chrono::Utc)),
                    Some(Err(e)) => {
                        eprintln!("levqor-sidecar: --since: not an RFC 3339 time: {e}");
                        return Err(ExitCode::from(2));
                    }
                };
                match billing::reconcile::run(&cfg, since).await {
                    Ok(true) => Ok(ExitCode::SUCCESS),
                    Ok(false) => Ok(ExitCode::from(1)),
                    Err(e) => {
                        eprintln!("levqor-sidecar: reconcile: {e}");
                        Err(ExitCode::from(2))
                    }
                }
            }
            Command::Backup { config, tenant, out } => {
                let cfg = load(&config)?;
                Ok(backup::cli_backup(&cfg, &tenant, out).await)
            }
            Command::VerifyBackup { from, config } => {
                let cfg = match config {
                    Some(c) => Some(load(&c)?),
                    None => None,
                };
                Ok(backup::cli_verify(cfg.as_ref(), &from))
            }
            Command::Restore { config, tenant, from, into, replace } => {
                let cfg = load(&config)?;
                Ok(backup::cli_restore(&cfg, &tenant, &from, into.as_deref(), replace).await)
            }
            Command::Export { config, tenant, out } => {
                let cfg = load(&config)?;
                Ok(backup::cli_export(&cfg, &tenant, &out).await)
            }
            Command::DrDrill { config, tenant } => {
                let cfg = load(&config)?;
                Ok(backup::cli_drill(&cfg, &tenant).await)
            }
        }
    });
    result.unwrap_or_else(|code| code)
}

/// The file, its secrets, and (when the database answers) that every plan in
/// levqor.plans has prices and every counter metric it meters exists.
async fn check_config(path: &std::path::Path, cfg: &config::Config) -> ExitCode {
    let mut problems = Vec::new();
    if let Err(e) = cfg.check_secrets() {
        problems.push(e.to_string());
    }
    let target = db::Target { url: cfg.database.url.clone(), password_env: cfg.database.password_env.clone() };
    let mut database = "not checked";
    if let Ok(Ok(db)) = tokio::time::timeout(std::time::Duration::from_secs(5), db::connect(&target)).await {
        database = "reachable";
        if let Some(s) = &cfg.stripe {
            match db.client.query("SELECT name FROM levqor.plans ORDER BY name", &[]).await {
                Ok(rows) => {
                    for r in rows {
                        let plan: String = r.get(0);
                        if !s.plans.contains_key(&plan) {
                            problems.push(format!("plan {plan:?} has no [stripe.plans.{plan}] prices"));
                        }
                    }
                }
                Err(e) => problems.push(format!("cannot read levqor.plans: {}", db::describe(&e))),
            }
            match db.client.query("SELECT name FROM levqor.metrics WHERE kind = 'counter'", &[]).await {
                Ok(rows) => {
                    let known: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                    for m in s.meters.keys() {
                        if !known.contains(m) {
                            problems.push(format!("[stripe.meters] {m:?} is not a counter metric in levqor.metrics"));
                        }
                    }
                }
                Err(e) => problems.push(format!("cannot read levqor.metrics: {}", db::describe(&e))),
            }
        }
    }
    if problems.is_empty() {
        println!(
            "{}: ok (database: {database}, stripe: {}, siem destinations: {}, backups: {})",
            path.display(),
            if cfg.stripe.is_some() { "configured" } else { "off" },
            cfg.siem.len(),
            cfg.backup.as_ref().map(|b| b.schedule.clone().unwrap_or_else(|| "manual".into())).unwrap_or_else(|| "off".into())
        );
        ExitCode::SUCCESS
    } else {
        for p in &problems {
            eprintln!("levqor-sidecar: {}: {p}", path.display());
        }
        ExitCode::from(2)
    }
}
