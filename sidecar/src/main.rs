//! levqor-sidecar: the daemon beside the database (Stripe metering, SIEM
//! forwarding, per-tenant backups). This release ships only configuration
//! checking; the daemon's commands arrive with their issues and say so
//! until then instead of pretending to work.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod config;

#[derive(Parser)]
#[command(name = "levqor-sidecar", version, about = "levqor's sidecar daemon and CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and validate a configuration file.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the daemon (not in this release).
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::CheckConfig { config } => match config::Config::load(&config) {
            Ok(cfg) => {
                println!(
                    "{}: ok (stripe: {}, siem destinations: {})",
                    config.display(),
                    if cfg.stripe.is_some() { "configured" } else { "off" },
                    cfg.siem.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("levqor-sidecar: {e}");
                ExitCode::from(1)
            }
        },
        Command::Run { .. } => {
            eprintln!("levqor-sidecar: the daemon is not part of this release (see README, 'What works today')");
            ExitCode::from(2)
        }
    }
}
