//! The sidecar's configuration file (TOML). Unknown keys are errors, so a typo
//! never silently disables billing or audit forwarding.

use std::path::Path;

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

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub database: Database,
    #[serde(default)]
    pub stripe: Option<Stripe>,
    #[serde(default)]
    pub siem: Vec<Siem>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Database {
    /// libpq connection string; a password belongs in PGPASSWORD or .pgpass.
    pub url: String,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Stripe {
    /// Name of the environment variable holding the secret key (never the key itself).
    pub api_key_env: String,
    #[serde(default = "default_stripe_base")]
    pub api_base: String,
}

fn default_stripe_base() -> String {
    "https://api.stripe.com".into()
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum Siem {
    SplunkHec { url: String, token_env: String },
    Datadog { url: String, api_key_env: String },
    Webhook { url: String, secret_env: String },
}

fn check_url(what: &str, url: &str) -> Result<(), ConfigError> {
    if url.starts_with("https://") || url.starts_with("http://") {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!("{what}: url must start with http:// or https://, got {url:?}")))
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
        if self.database.url.trim().is_empty() {
            return Err(ConfigError::Invalid("database.url is empty".into()));
        }
        if let Some(s) = &self.stripe {
            check_env_name("stripe.api_key_env", &s.api_key_env)?;
            check_url("stripe.api_base", &s.api_base)?;
        }
        for (i, siem) in self.siem.iter().enumerate() {
            let what = format!("siem[{i}]");
            match siem {
                Siem::SplunkHec { url, token_env } => {
                    check_url(&what, url)?;
                    check_env_name(&what, token_env)?
                }
                Siem::Datadog { url, api_key_env } => {
                    check_url(&what, url)?;
                    check_env_name(&what, api_key_env)?
                }
                Siem::Webhook { url, secret_env } => {
                    check_url(&what, url)?;
                    check_env_name(&what, secret_env)?
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../levqor-sidecar.example.toml");
        let cfg = Config::parse("example", text).unwrap();
        assert_eq!(cfg.siem.len(), 3);
        assert_eq!(cfg.stripe.unwrap().api_base, "https://api.stripe.com");
    }

    #[test]
    fn typos_and_inline_secrets_are_refused() {
        let typo = "[database]\nurl = 'host=/tmp'\n[strpe]\napi_key_env = 'X'\n";
        assert!(matches!(Config::parse("t", typo), Err(ConfigError::Parse { .. })));
        let secret = "[database]\nurl = 'host=/tmp'\n[stripe]\napi_key_env = 'sk_live_abc123'\n";
        let err = Config::parse("t", secret).unwrap_err().to_string();
        assert!(err.contains("environment variable"), "{err}");
        let bad_url = "[database]\nurl = 'x'\n[[siem]]\nkind = 'webhook'\nurl = 'ftp://x'\nsecret_env = 'S'\n";
        assert!(Config::parse("t", bad_url).is_err());
        let empty_db = "[database]\nurl = ' '\n";
        assert!(Config::parse("t", empty_db).is_err());
    }
}
