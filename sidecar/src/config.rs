//! The sidecar's configuration file (TOML), as DESIGN.md lays it out. Unknown
//! keys are errors, so a typo never silently switches billing, streaming or
//! backups off. Secrets never go in the file: every `*_env` key names the
//! environment variable that holds one, and [`Secret`] never prints it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: String, source: toml::de::Error },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub database: Database,
    #[serde(default)]
    pub http: Http,
    #[serde(default)]
    pub stripe: Option<Stripe>,
    #[serde(default)]
    pub siem: Vec<Siem>,
    #[serde(default)]
    pub audit: Audit,
    #[serde(default)]
    pub backup: Option<Backup>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Database {
    /// libpq key=value string or postgresql:// URL, without a password.
    pub url: String,
    /// The environment variable holding the password, if the role has one.
    pub password_env: Option<String>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Http {
    #[serde(default = "default_listen")]
    pub listen: String,
}

impl Default for Http {
    fn default() -> Self {
        Http { listen: default_listen() }
    }
}

fn default_listen() -> String {
    "127.0.0.1:9187".into()
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Stripe {
    #[serde(default = "default_stripe_base")]
    pub api_base: String,
    pub api_key_env: String,
    pub webhook_secret_env: Option<String>,
    #[serde(default = "one")]
    pub suspend_after_failed_payments: u32,
    /// A plan change that Stripe reports is applied even below the tenant's
    /// current usage (`change_plan(…, force => true)`).
    #[serde(default)]
    pub force_plan_changes: bool,
    /// The levqor plan -> the Stripe prices of its subscription.
    #[serde(default)]
    pub plans: BTreeMap<String, PlanPrices>,
    /// levqor counter metric -> Stripe meter event_name.
    #[serde(default)]
    pub meters: BTreeMap<String, String>,
    /// Meter requests in flight at once (each customer and meter one at a time).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// The ledger consumer whose cursor the meter keeps.
    #[serde(default = "default_consumer")]
    pub consumer: String,
    /// Seconds between two provisioning sweeps (notifications wake it sooner).
    #[serde(default = "default_sweep")]
    pub sweep_seconds: u64,
    /// Seconds between two looks at the ledger when it is idle.
    #[serde(default = "default_meter_interval")]
    pub meter_interval_seconds: u64,
    /// Seconds each Stripe request may take.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// The longest wait between two retries while Stripe fails.
    #[serde(default = "default_retry_max")]
    pub retry_max_seconds: u64,
}

#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlanPrices {
    pub prices: Vec<String>,
}

fn default_stripe_base() -> String {
    "https://api.stripe.com".into()
}
fn one() -> u32 {
    1
}
fn default_concurrency() -> usize {
    16
}
fn default_consumer() -> String {
    "stripe".into()
}
fn default_sweep() -> u64 {
    30
}
fn default_meter_interval() -> u64 {
    5
}
fn default_timeout() -> u64 {
    20
}
fn default_retry_max() -> u64 {
    60
}

/// An operator-wide audit stream: every tenant's events.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Siem {
    pub kind: SiemKind,
    pub url: String,
    /// The token (Splunk), API key (Datadog) or signing secret (webhook).
    #[serde(alias = "api_key_env", alias = "secret_env")]
    pub token_env: String,
    /// A name for logs and metrics; defaults to the kind and position.
    pub name: Option<String>,
    #[serde(default)]
    pub allow_http: bool,
    #[serde(default)]
    pub gzip: Option<bool>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SiemKind {
    SplunkHec,
    Datadog,
    Webhook,
}

impl SiemKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SiemKind::SplunkHec => "splunk_hec",
            SiemKind::Datadog => "datadog",
            SiemKind::Webhook => "webhook",
        }
    }
    pub fn parse(s: &str) -> Option<SiemKind> {
        [SiemKind::SplunkHec, SiemKind::Datadog, SiemKind::Webhook].into_iter().find(|k| k.as_str() == s)
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    #[serde(default = "default_batch_events")]
    pub batch_max_events: usize,
    #[serde(default = "default_batch_bytes")]
    pub batch_max_bytes: usize,
    /// Failed deliveries of one batch before it is parked.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Seconds between two looks at the chains when no notification came.
    #[serde(default = "default_poll")]
    pub poll_seconds: u64,
    /// Seconds each delivery may take.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// The longest wait between two retries while a receiver fails.
    #[serde(default = "default_retry_max")]
    pub retry_max_seconds: u64,
}

impl Default for Audit {
    fn default() -> Self {
        Audit {
            batch_max_events: default_batch_events(),
            batch_max_bytes: default_batch_bytes(),
            max_attempts: default_max_attempts(),
            poll_seconds: default_poll(),
            timeout_seconds: default_timeout(),
            retry_max_seconds: default_retry_max(),
        }
    }
}

fn default_batch_events() -> usize {
    500
}
fn default_batch_bytes() -> usize {
    1_000_000
}
fn default_max_attempts() -> u32 {
    12
}
fn default_poll() -> u64 {
    2
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Backup {
    /// Backups read tenants' rows: their own login role (levqor_backup).
    pub database_url: Option<String>,
    pub password_env: Option<String>,
    pub dir: PathBuf,
    /// Daily at HH:MM UTC, or `every 15m`; absent: no scheduled backups.
    pub schedule: Option<String>,
    #[serde(default = "default_keep_daily")]
    pub keep_daily: usize,
    #[serde(default = "default_keep_weekly")]
    pub keep_weekly: usize,
    /// The environment variable holding the archive encryption key.
    pub encryption_key_env: Option<String>,
    /// Include SSO client secrets in archives (off: they are left out).
    #[serde(default)]
    pub include_secrets: bool,
    /// pg_dump, for the tables' DDL (default: the PostgreSQL 15 one).
    pub pg_dump: Option<PathBuf>,
    /// dr-drill creates and drops a scratch database: a role that may
    /// create databases and install levqor there.
    pub admin_url: Option<String>,
    pub admin_password_env: Option<String>,
}

fn default_keep_daily() -> usize {
    7
}
fn default_keep_weekly() -> usize {
    4
}

/// A secret read from the environment; never shown in logs, errors or Debug.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn new(s: String) -> Secret {
        Secret(s)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[secret]")
    }
}

/// The secret in environment variable `name` (named by `what` in errors).
pub fn secret(what: &str, name: &str) -> Result<Secret, ConfigError> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Ok(Secret(v)),
        _ => Err(ConfigError::Invalid(format!("{what}: environment variable {name} is not set"))),
    }
}

fn check_url(what: &str, url: &str, allow_http: bool) -> Result<(), ConfigError> {
    let loopback = ["http://127.0.0.1", "http://localhost", "http://[::1]"].iter().any(|p| url.starts_with(p));
    if url.starts_with("https://") || (url.starts_with("http://") && (allow_http || loopback)) {
        Ok(())
    } else if url.starts_with("http://") {
        Err(ConfigError::Invalid(format!("{what}: plain http is allowed only on loopback or with allow_http = true, got {url:?}")))
    } else {
        Err(ConfigError::Invalid(format!("{what}: url must start with https://, got {url:?}")))
    }
}

fn check_env_name(what: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "{what}: expected the NAME of an environment variable (A-Z, 0-9, _), got {name:?}; secrets never go in the file"
        )))
    }
}

/// A connection string must not carry a password: it belongs in `password_env`.
fn check_dsn(what: &str, url: &str) -> Result<(), ConfigError> {
    if url.trim().is_empty() {
        return Err(ConfigError::Invalid(format!("{what} is empty")));
    }
    let lower = url.to_ascii_lowercase();
    let in_url = lower.starts_with("postgres") && url.split('@').next().is_some_and(|auth| auth.matches(':').count() >= 2);
    if lower.contains("password=") || in_url {
        return Err(ConfigError::Invalid(format!("{what}: put the password in password_env, not in the connection string")));
    }
    Ok(())
}

impl Config {
    pub fn parse(path: &str, text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|source| ConfigError::Parse { path: path.into(), source })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: p.clone(), source })?;
        Config::parse(&p, &text)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check_dsn("database.url", &self.database.url)?;
        if let Some(p) = &self.database.password_env {
            check_env_name("database.password_env", p)?;
        }
        if self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::Invalid(format!("http.listen: expected host:port, got {:?}", self.http.listen)));
        }
        if let Some(s) = &self.stripe {
            check_env_name("stripe.api_key_env", &s.api_key_env)?;
            if let Some(w) = &s.webhook_secret_env {
                check_env_name("stripe.webhook_secret_env", w)?;
            }
            check_url("stripe.api_base", &s.api_base, false)?;
            if s.concurrency == 0 || s.concurrency > 256 {
                return Err(ConfigError::Invalid("stripe.concurrency must be 1 to 256".into()));
            }
            for (plan, p) in &s.plans {
                if p.prices.is_empty() || p.prices.iter().any(|x| !x.starts_with("price_")) {
                    return Err(ConfigError::Invalid(format!(
                        "stripe.plans.{plan}.prices: one or more Stripe price ids (price_…)"
                    )));
                }
            }
            for (metric, event) in &s.meters {
                if event.is_empty() || event.len() > 100 {
                    return Err(ConfigError::Invalid(format!("stripe.meters.{metric}: a meter event_name of 1 to 100 characters")));
                }
            }
        }
        for (i, siem) in self.siem.iter().enumerate() {
            let what = format!("siem[{i}]");
            check_url(&what, &siem.url, siem.allow_http)?;
            check_env_name(&what, &siem.token_env)?;
        }
        if self.audit.batch_max_events == 0 || self.audit.batch_max_bytes < 1024 || self.audit.max_attempts == 0 {
            return Err(ConfigError::Invalid(
                "audit: batch_max_events and max_attempts at least 1, batch_max_bytes at least 1024".into(),
            ));
        }
        if let Some(b) = &self.backup {
            if let Some(u) = &b.database_url {
                check_dsn("backup.database_url", u)?;
            }
            if let Some(p) = &b.password_env {
                check_env_name("backup.password_env", p)?;
            }
            if let Some(u) = &b.admin_url {
                check_dsn("backup.admin_url", u)?;
            }
            if let Some(p) = &b.admin_password_env {
                check_env_name("backup.admin_password_env", p)?;
            }
            if let Some(k) = &b.encryption_key_env {
                check_env_name("backup.encryption_key_env", k)?;
            }
            if let Some(s) = &b.schedule {
                parse_schedule(s).ok_or_else(|| {
                    ConfigError::Invalid(format!("backup.schedule: expected HH:MM (daily, UTC) or \"every N[s|m|h]\" (at least 10 s), got {s:?}"))
                })?;
            }
            if b.keep_daily == 0 {
                return Err(ConfigError::Invalid("backup.keep_daily must be at least 1".into()));
            }
        }
        Ok(())
    }

    /// The secrets the configuration names, read now, so that a missing one is
    /// a configuration error at start rather than a failure later.
    pub fn check_secrets(&self) -> Result<(), ConfigError> {
        if let Some(p) = &self.database.password_env {
            secret("database.password_env", p)?;
        }
        if let Some(s) = &self.stripe {
            secret("stripe.api_key_env", &s.api_key_env)?;
            if let Some(w) = &s.webhook_secret_env {
                secret("stripe.webhook_secret_env", w)?;
            }
        }
        for (i, s) in self.siem.iter().enumerate() {
            secret(&format!("siem[{i}].token_env"), &s.token_env)?;
        }
        if let Some(b) = &self.backup {
            if let Some(k) = &b.encryption_key_env {
                secret("backup.encryption_key_env", k)?;
            }
            if let Some(p) = &b.password_env {
                secret("backup.password_env", p)?;
            }
        }
        Ok(())
    }
}

/// "02:00" -> (2, 0).
/// When scheduled backups run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Schedule {
    /// Every day at HH:MM UTC.
    Daily { hour: u32, minute: u32 },
    /// Every so often, from the daemon's start (`every 15m`: an RPO of 15 minutes).
    Every(std::time::Duration),
}

/// `HH:MM` (daily, UTC) or `every N[s|m|h]` (at least 10 s).
pub fn parse_schedule(s: &str) -> Option<Schedule> {
    if let Some(rest) = s.strip_prefix("every ") {
        let rest = rest.trim();
        let (n, unit) = rest.split_at(rest.find(|c: char| !c.is_ascii_digit())?);
        let n: u64 = n.parse().ok()?;
        let secs = match unit {
            "s" => n,
            "m" => n.checked_mul(60)?,
            "h" => n.checked_mul(3600)?,
            _ => return None,
        };
        return (secs >= 10).then(|| Schedule::Every(std::time::Duration::from_secs(secs)));
    }
    let (h, m) = s.split_once(':')?;
    let (h, m) = (h.parse::<u32>().ok()?, m.parse::<u32>().ok()?);
    (h < 24 && m < 60 && s.len() == 5).then_some(Schedule::Daily { hour: h, minute: m })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../levqor-sidecar.example.toml");
        let cfg = Config::parse("example", text).unwrap();
        assert_eq!(cfg.siem.len(), 3);
        let stripe = cfg.stripe.unwrap();
        assert_eq!(stripe.api_base, "https://api.stripe.com");
        assert_eq!(stripe.plans["starter"].prices, ["price_starter_base", "price_api_calls"]);
        assert_eq!(stripe.meters["api_calls_per_15min"], "api_calls");
        assert_eq!(cfg.backup.unwrap().schedule.as_deref(), Some("02:00"));
    }

    #[test]
    fn typos_inline_secrets_and_bad_values_are_refused() {
        let typo = "[database]\nurl = 'host=/tmp'\n[strpe]\napi_key_env = 'X'\n";
        assert!(matches!(Config::parse("t", typo), Err(ConfigError::Parse { .. })));
        let secret = "[database]\nurl = 'host=/tmp'\n[stripe]\napi_key_env = 'sk_live_abc123'\n";
        let err = Config::parse("t", secret).unwrap_err().to_string();
        assert!(err.contains("environment variable"), "{err}");
        assert!(!err.contains("abc123") || err.contains("NAME"), "{err}");
        let bad_url = "[database]\nurl = 'x'\n[[siem]]\nkind = 'webhook'\nurl = 'ftp://x'\ntoken_env = 'S'\n";
        assert!(Config::parse("t", bad_url).is_err());
        let plain_http = "[database]\nurl = 'x'\n[[siem]]\nkind = 'webhook'\nurl = 'http://siem.example.com'\ntoken_env = 'S'\n";
        assert!(Config::parse("t", plain_http).is_err(), "http only on loopback");
        let loopback = "[database]\nurl = 'x'\n[[siem]]\nkind = 'webhook'\nurl = 'http://127.0.0.1:9/'\ntoken_env = 'S'\n";
        assert!(Config::parse("t", loopback).is_ok());
        let empty_db = "[database]\nurl = ' '\n";
        assert!(Config::parse("t", empty_db).is_err());
        let password = "[database]\nurl = 'host=db user=x password=hunter2'\n";
        let err = Config::parse("t", password).unwrap_err().to_string();
        assert!(err.contains("password_env") && !err.contains("hunter2"), "{err}");
        let url_password = "[database]\nurl = 'postgresql://x:hunter2@db/app'\n";
        assert!(Config::parse("t", url_password).is_err());
        let schedule = "[database]\nurl = 'x'\n[backup]\ndir = '/tmp'\nschedule = '25:00'\n";
        assert!(Config::parse("t", schedule).is_err());
        assert_eq!(parse_schedule("every 15m"), Some(Schedule::Every(std::time::Duration::from_secs(900))));
        assert_eq!(parse_schedule("02:30"), Some(Schedule::Daily { hour: 2, minute: 30 }));
        assert_eq!(parse_schedule("every 5s"), None, "too often");
        assert_eq!(parse_schedule("every 3d"), None);
        let kinds = "[database]\nurl = 'x'\n[[siem]]\nkind = 'syslog'\nurl = 'https://x'\ntoken_env = 'S'\n";
        assert!(Config::parse("t", kinds).is_err());
    }

    #[test]
    fn secrets_never_print() {
        assert_eq!(format!("{:?}", Secret("sk_test_123".into())), "[secret]");
    }
}
