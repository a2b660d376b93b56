//! Connections to the database: tokio-postgres, the password from the
//! environment, notifications (LISTEN) forwarded to a channel, and
//! reconnection with backoff after the server restarts.

use std::time::Duration;

use futures_util::stream::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tokio_util::sync::CancellationToken;

use crate::config::{secret, ConfigError};
use crate::retry::Backoff;

/// Where and as whom to connect.
#[derive(Clone, Debug)]
pub struct Target {
    pub url: String,
    pub password_env: Option<String>,
}

impl Target {
    /// The same server and role, another database.
    pub fn with_dbname(&self, db: &str) -> Target {
        let url = if self.url.starts_with("postgres://") || self.url.starts_with("postgresql://") {
            let (base, query) = self.url.split_once('?').map(|(b, q)| (b, format!("?{q}"))).unwrap_or((&self.url, String::new()));
            let host_part = base.splitn(4, '/').take(3).collect::<Vec<_>>().join("/");
            format!("{host_part}/{db}{query}")
        } else {
            // libpq key=value: a later key wins.
            format!("{} dbname={db}", self.url)
        };
        Target { url, password_env: self.password_env.clone() }
    }

    fn config(&self) -> Result<tokio_postgres::Config, ConfigError> {
        let mut cfg: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|e| ConfigError::Invalid(format!("database url: {e}")))?;
        if let Some(p) = &self.password_env {
            cfg.password(secret("database password", p)?.expose());
        }
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(Duration::from_secs(10));
        }
        cfg.application_name("levqor-sidecar");
        Ok(cfg)
    }
}

/// A connection and the notifications it receives.
pub struct Db {
    pub client: Client,
    pub notifications: mpsc::UnboundedReceiver<String>,
}

pub async fn connect(target: &Target) -> Result<Db, String> {
    let cfg = target.config().map_err(|e| e.to_string())?;
    let (client, mut connection) = cfg.connect(NoTls).await.map_err(|e| describe(&e))?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    let _ = tx.send(n.channel().to_string());
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "database connection closed");
                    break;
                }
            }
        }
    });
    Ok(Db { client, notifications: rx })
}

/// Connect, retrying with backoff (a log line per attempt) until it works or
/// the sidecar is told to stop (None).
pub async fn connect_retrying(target: &Target, what: &str, stop: &CancellationToken) -> Option<Db> {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
    loop {
        match connect(target).await {
            Ok(db) => {
                if backoff.attempts() > 0 {
                    tracing::info!(task = what, "database connection restored");
                }
                return Some(db);
            }
            Err(e) => {
                let wait = backoff.next_delay();
                tracing::warn!(task = what, error = %e, attempt = backoff.attempts(), retry_in_ms = wait.as_millis() as u64,
                               "cannot connect to the database");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.cancelled() => return None,
                }
            }
        }
    }
}

/// An error as one line: the server's message and SQLSTATE, or what failed
/// and why (tokio-postgres' own text leaves the cause out).
pub fn describe(e: &tokio_postgres::Error) -> String {
    match (e.as_db_error(), std::error::Error::source(e)) {
        (Some(d), _) => format!("{} (SQLSTATE {})", d.message(), d.code().code()),
        (None, Some(cause)) => format!("{e}: {cause}"),
        (None, None) => e.to_string(),
    }
}

/// Whether an error means the connection is gone (reconnect) rather than a
/// statement failed (report it).
pub fn is_connection_error(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(c) = e.code() {
        return c.code().starts_with("08") || c.code().starts_with("57P");
    }
    // No SQLSTATE: an I/O failure is the connection; anything else (a value
    // that does not serialize, say) is a bug to report, not to reconnect for.
    std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
}
