//! A small typed client for the handful of Stripe endpoints billing uses:
//! form-encoded requests, `Authorization: Bearer sk_…`, `Idempotency-Key`s,
//! Stripe's error shape. (async-stripe covers the whole API with thousands of
//! generated types; these seven endpoints do not need it.)

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::config::Secret;

#[derive(Clone)]
pub struct Stripe {
    http: reqwest::Client,
    base: String,
    key: Secret,
}

/// Why a request failed.
#[derive(Debug, Clone)]
pub enum StripeError {
    /// Stripe answered with an error status.
    Status { status: u16, message: String, code: Option<String>, retry_after: Option<Duration> },
    /// No answer: refused, reset, timed out.
    Transport(String),
    /// An answer that is not what Stripe sends.
    Protocol(String),
}

impl StripeError {
    /// Worth trying again later: rate limited, Stripe's own trouble, or no answer.
    pub fn transient(&self) -> bool {
        match self {
            StripeError::Status { status, .. } => *status == 429 || *status == 409 || *status >= 500,
            StripeError::Transport(_) => true,
            StripeError::Protocol(_) => false,
        }
    }

    /// The API key itself was refused: nothing will work until it changes.
    pub fn unauthorized(&self) -> bool {
        matches!(self, StripeError::Status { status: 401 | 403, .. })
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            StripeError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A short kind for metrics: http_429, http_5xx, http_4xx, transport, protocol.
    pub fn kind(&self) -> &'static str {
        match self {
            StripeError::Status { status: 429, .. } => "http_429",
            StripeError::Status { status, .. } if *status >= 500 => "http_5xx",
            StripeError::Status { status: 401 | 403, .. } => "unauthorized",
            StripeError::Status { .. } => "http_4xx",
            StripeError::Transport(_) => "transport",
            StripeError::Protocol(_) => "protocol",
        }
    }
}

impl std::fmt::Display for StripeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StripeError::Status { status, message, code, .. } => {
                write!(f, "Stripe answered {status}: {message}")?;
                if let Some(c) = code {
                    write!(f, " ({c})")?;
                }
                Ok(())
            }
            StripeError::Transport(e) => write!(f, "no answer from Stripe: {e}"),
            StripeError::Protocol(e) => write!(f, "unexpected answer from Stripe: {e}"),
        }
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    message: Option<String>,
    code: Option<String>,
}

pub type Params = Vec<(String, String)>;

pub fn param(k: impl Into<String>, v: impl Into<String>) -> (String, String) {
    (k.into(), v.into())
}

impl Stripe {
    pub fn new(base: &str, key: Secret, timeout: Duration) -> Stripe {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .pool_max_idle_per_host(64)
            .user_agent(concat!("levqor-sidecar/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("an HTTP client");
        Stripe { http, base: base.trim_end_matches('/').to_string(), key }
    }

    async fn send(&self, req: reqwest::RequestBuilder, idempotency_key: Option<&str>) -> Result<Value, StripeError> {
        let mut req = req.bearer_auth(self.key.expose());
        if let Some(k) = idempotency_key {
            req = req.header("Idempotency-Key", k);
        }
        // The error's text never holds the key (it is in a header).
        let resp = req.send().await.map_err(|e| StripeError::Transport(without_url(e)))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|s| Duration::from_secs_f64(s.clamp(0.0, 3600.0)));
        let body = resp.bytes().await.map_err(|e| StripeError::Transport(without_url(e)))?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&body).map_err(|e| StripeError::Protocol(e.to_string()));
        }
        let (message, code) = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(b) => (b.error.message.unwrap_or_default(), b.error.code),
            Err(_) => (String::from_utf8_lossy(&body).chars().take(200).collect(), None),
        };
        Err(StripeError::Status { status, message, code, retry_after })
    }

    pub async fn post(&self, path: &str, params: &Params, idempotency_key: Option<&str>) -> Result<Value, StripeError> {
        self.send(self.http.post(format!("{}{path}", self.base)).form(params), idempotency_key).await
    }

    pub async fn get(&self, path: &str, query: &Params) -> Result<Value, StripeError> {
        self.send(self.http.get(format!("{}{path}", self.base)).query(query), None).await
    }

    pub async fn delete(&self, path: &str, idempotency_key: Option<&str>) -> Result<Value, StripeError> {
        self.send(self.http.delete(format!("{}{path}", self.base)), idempotency_key).await
    }

    // The endpoints.

    pub async fn create_customer(&self, tenant: &str, slug: &str) -> Result<String, StripeError> {
        let params = vec![
            param("name", slug),
            param("metadata[levqor_tenant_id]", tenant),
            param("metadata[levqor_slug]", slug),
        ];
        let v = self.post("/v1/customers", &params, Some(&format!("levqor-customer-{tenant}"))).await?;
        id(&v)
    }

    /// A subscription with these prices; returns its id, status and items
    /// (price id -> subscription item id).
    pub async fn create_subscription(
        &self,
        tenant: &str,
        customer: &str,
        prices: &[String],
        version: i32,
    ) -> Result<Subscription, StripeError> {
        let mut params = vec![param("customer", customer), param("metadata[levqor_tenant_id]", tenant)];
        for (i, p) in prices.iter().enumerate() {
            params.push(param(format!("items[{i}][price]"), p));
        }
        let v = self.post("/v1/subscriptions", &params, Some(&format!("levqor-subscription-{tenant}-v{version}"))).await?;
        Subscription::from(&v)
    }

    /// Move a subscription to these prices: items of other prices go, new ones come.
    pub async fn set_subscription_prices(
        &self,
        tenant: &str,
        subscription: &str,
        current: &[(String, String)],
        prices: &[String],
        version: i32,
    ) -> Result<Subscription, StripeError> {
        let mut params = Vec::new();
        let mut i = 0;
        for (price, item) in current {
            if !prices.contains(price) {
                params.push(param(format!("items[{i}][id]"), item));
                params.push(param(format!("items[{i}][deleted]"), "true"));
                i += 1;
            }
        }
        for p in prices {
            if !current.iter().any(|(price, _)| price == p) {
                params.push(param(format!("items[{i}][price]"), p));
                i += 1;
            }
        }
        // The target prices are part of the key: a plan changed again before
        // the first change was recorded is a new request, not a replay.
        let key = format!("levqor-subscription-{tenant}-v{version}-{}", prices_digest(prices));
        let v = self.post(&format!("/v1/subscriptions/{subscription}"), &params, Some(&key)).await?;
        Subscription::from(&v)
    }

    pub async fn cancel_subscription(&self, tenant: &str, subscription: &str) -> Result<String, StripeError> {
        let v = self.delete(&format!("/v1/subscriptions/{subscription}"), Some(&format!("levqor-cancel-{tenant}"))).await?;
        Ok(v.get("status").and_then(Value::as_str).unwrap_or("canceled").to_string())
    }

    /// One meter event; `identifier` makes a retry a duplicate Stripe drops.
    pub async fn meter_event(
        &self,
        event_name: &str,
        customer: &str,
        value: i64,
        timestamp: i64,
        identifier: &str,
        idempotency_key: &str,
    ) -> Result<(), StripeError> {
        let params = vec![
            param("event_name", event_name),
            param("payload[stripe_customer_id]", customer),
            param("payload[value]", value.to_string()),
            param("timestamp", timestamp.to_string()),
            param("identifier", identifier),
        ];
        // Stripe drops a second event with the same identifier; the
        // Idempotency-Key also replays the first answer to a retried request.
        self.post("/v1/billing/meter_events", &params, Some(idempotency_key)).await.map(|_| ())
    }

    /// Every meter: event_name -> meter id.
    pub async fn meters(&self) -> Result<Vec<(String, String)>, StripeError> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut q = vec![param("limit", "100")];
            if let Some(a) = &after {
                q.push(param("starting_after", a));
            }
            let v = self.get("/v1/billing/meters", &q).await?;
            let data = v.get("data").and_then(Value::as_array).cloned().unwrap_or_default();
            for m in &data {
                if let (Some(id), Some(event)) = (m.get("id").and_then(Value::as_str), m.get("event_name").and_then(Value::as_str)) {
                    out.push((event.to_string(), id.to_string()));
                }
            }
            let more = v.get("has_more").and_then(Value::as_bool).unwrap_or(false);
            match (more, data.last().and_then(|m| m.get("id")).and_then(Value::as_str)) {
                (true, Some(last)) => after = Some(last.to_string()),
                _ => return Ok(out),
            }
        }
    }

    /// The sum of a customer's meter events with timestamps in [start, end)
    /// (both on minute boundaries).
    pub async fn meter_total(&self, meter: &str, customer: &str, start: i64, end: i64) -> Result<f64, StripeError> {
        let mut total = 0.0;
        let mut after: Option<String> = None;
        loop {
            let mut q = vec![
                param("customer", customer),
                param("start_time", start.to_string()),
                param("end_time", end.to_string()),
                param("limit", "100"),
            ];
            if let Some(a) = &after {
                q.push(param("starting_after", a));
            }
            let v = self.get(&format!("/v1/billing/meters/{meter}/event_summaries"), &q).await?;
            let data = v.get("data").and_then(Value::as_array).cloned().unwrap_or_default();
            total += data.iter().filter_map(|s| s.get("aggregated_value").and_then(Value::as_f64)).sum::<f64>();
            let more = v.get("has_more").and_then(Value::as_bool).unwrap_or(false);
            match (more, data.last().and_then(|m| m.get("id")).and_then(Value::as_str)) {
                (true, Some(last)) => after = Some(last.to_string()),
                _ => return Ok(total),
            }
        }
    }
}

fn prices_digest(prices: &[String]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for p in prices {
        h.update(p.as_bytes());
        h.update(b"\n");
    }
    hex::encode(&h.finalize()[..8])
}

fn id(v: &Value) -> Result<String, StripeError> {
    v.get("id").and_then(Value::as_str).map(str::to_owned).ok_or_else(|| StripeError::Protocol("no id".into()))
}

/// reqwest's error text with the URL left out (no query strings in logs).
fn without_url(e: reqwest::Error) -> String {
    e.without_url().to_string()
}

#[derive(Debug, Clone)]
pub struct Subscription {
    pub id: String,
    pub status: String,
    /// (price id, subscription item id)
    pub items: Vec<(String, String)>,
}

impl Subscription {
    pub fn from(v: &Value) -> Result<Subscription, StripeError> {
        let items = v
            .pointer("/items/data")
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| {
                        let price = i.pointer("/price/id").and_then(Value::as_str)?;
                        let item = i.get("id").and_then(Value::as_str)?;
                        Some((price.to_string(), item.to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Subscription {
            id: id(v)?,
            status: v.get("status").and_then(Value::as_str).unwrap_or("unknown").to_string(),
            items,
        })
    }

    pub fn items_json(&self) -> Value {
        Value::Object(self.items.iter().map(|(p, i)| (p.clone(), Value::String(i.clone()))).collect())
    }
}
